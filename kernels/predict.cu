// Prediction for classification: top-k classes of each row with their softmax probabilities.
// One warp per row: an online (max, sum) pass for the softmax denominator, then k warp-wide
// argmax passes that skip the classes already taken (k is small, <= 32).
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ void topk_row(const T* __restrict__ logits, long long n, int C, long long ld, int k,
                         long long* __restrict__ out_idx, float* __restrict__ out_prob) {
    __shared__ int taken[8][32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + warp;
    if (row >= n) return;
    const T* z = logits + row * ld;
    float m = NEG_INF, s = 0.f;
    for (int j = lane; j < C; j += 32) {
        float v = to_f(z[j]);
        if (v == NEG_INF) continue;  // adds nothing; exp(-inf - -inf) would be NaN
        if (v > m) { s = s * __expf(m - v) + 1.f; m = v; } else { s += __expf(v - m); }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, off), s2 = __shfl_xor_sync(0xffffffff, s, off);
        float mx = fmaxf(m, m2);
        s = (mx == NEG_INF) ? 0.f : s * __expf(m - mx) + s2 * __expf(m2 - mx);
        m = mx;
    }
    // p = exp(z - m) / s rather than exp(z - lse): with logits of 1e4, lse = m + log(s) rounds to
    // float's 1e-3 spacing there, and that error would land in every probability.
    const float inv_s = 1.f / s;
    for (int t = 0; t < k; ++t) {
        float best = NEG_INF;
        int best_j = 0x7fffffff;
        for (int j = lane; j < C; j += 32) {
            bool used = false;
            for (int u = 0; u < t; ++u) used |= (taken[warp][u] == j);
            float v = to_f(z[j]);
            if (!used && (v > best || (v == best && j < best_j) || best_j == 0x7fffffff)) { best = v; best_j = j; }
        }
        for (int off = 16; off > 0; off >>= 1) {
            float b2 = __shfl_xor_sync(0xffffffff, best, off);
            int j2 = __shfl_xor_sync(0xffffffff, best_j, off);
            if (j2 != 0x7fffffff && (best_j == 0x7fffffff || b2 > best || (b2 == best && j2 < best_j))) {
                best = b2; best_j = j2;
            }
        }
        if (lane == 0) {
            taken[warp][t] = best_j;
            out_idx[row * k + t] = best_j;
            out_prob[row * k + t] = __expf(best - m) * inv_s;
        }
        __syncwarp();
    }
}

#define TOPK(NAME, T) \
extern "C" __global__ void NAME(const T* logits, long long n, int C, long long ld, int k, long long* idx, float* prob) { \
    topk_row<T>(logits, n, C, ld, k, idx, prob); \
}

TOPK(topk_f32, float)
TOPK(topk_f16, __half)
TOPK(topk_bf16, __nv_bfloat16)
