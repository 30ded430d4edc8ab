// Allreduce compression on device buffers: fp32 <-> bf16/fp16, with optional error feedback.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

// v = x + residual; out = round(v); residual = v - out (what rounding lost is sent next time).
extern "C" __global__ void compress_bf16(const float* __restrict__ x, float* __restrict__ residual,
                                         __nv_bfloat16* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = x[i] + (residual ? residual[i] : 0.f);
        __nv_bfloat16 c = __float2bfloat16_rn(v);
        out[i] = c;
        if (residual) residual[i] = v - __bfloat162float(c);
    }
}

extern "C" __global__ void compress_f16(const float* __restrict__ x, float* __restrict__ residual,
                                        __half* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x) {
        float v = x[i] + (residual ? residual[i] : 0.f);
        __half c = __float2half_rn(v);
        out[i] = c;
        if (residual) residual[i] = v - __half2float(c);
    }
}

extern "C" __global__ void decompress_bf16(const __nv_bfloat16* __restrict__ c, float* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __bfloat162float(c[i]);
}

extern "C" __global__ void decompress_f16(const __half* __restrict__ c, float* __restrict__ out, long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += (long long)gridDim.x * blockDim.x)
        out[i] = __half2float(c[i]);
}
