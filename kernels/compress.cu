// Allreduce helpers on device buffers: fp32 <-> bf16/fp16 compression with optional error
// feedback, and adding a received segment into the local buffer (segmented/ring allreduce).
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

// dst[i] += src[i], 16 bytes at a time when both are aligned.
extern "C" __global__ void segment_add_f32(float* __restrict__ dst, const float* __restrict__ src, long long n) {
    long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    if (((((unsigned long long)dst) | ((unsigned long long)src)) & 15ULL) == 0) {
        long long n4 = n >> 2;
        float4* d4 = reinterpret_cast<float4*>(dst);
        const float4* s4 = reinterpret_cast<const float4*>(src);
        for (long long i = tid; i < n4; i += stride) {
            float4 a = d4[i], b = s4[i];
            a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
            d4[i] = a;
        }
        for (long long i = (n4 << 2) + tid; i < n; i += stride) dst[i] += src[i];
    } else {
        for (long long i = tid; i < n; i += stride) dst[i] += src[i];
    }
}
