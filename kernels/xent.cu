// Fused softmax + cross-entropy, forward and backward in one kernel.
// One warp per row: lanes stride over the classes, keep an online (max, sum of exp)
// pair so the row is read once for the forward pass, then read again (from L1/L2,
// the block's 8 rows are at most a few tens of KB) to write the gradient.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define NEG_INF __int_as_float(0xff800000)

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
__device__ __forceinline__ void from_f(float* p, float v) { *p = v; }
__device__ __forceinline__ void from_f(__half* p, float v) { *p = __float2half_rn(v); }
__device__ __forceinline__ void from_f(__nv_bfloat16* p, float v) { *p = __float2bfloat16_rn(v); }

// Merge two online-softmax partials (m, s): s is the sum of exp(z - m).
__device__ __forceinline__ void merge(float& m, float& s, float m2, float s2) {
    float mx = fmaxf(m, m2);
    if (mx == NEG_INF) { m = mx; s = 0.f; return; }
    s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
    m = mx;
}

// Add exp(v) to the running (m, s); a -inf adds nothing (and must not make exp(-inf - -inf) = NaN).
__device__ __forceinline__ void online(float& m, float& s, float v) {
    if (v == NEG_INF) return;
    if (v > m) { s = s * __expf(m - v) + 1.f; m = v; } else { s += __expf(v - m); }
}

template <typename T>
__device__ void xent_row(const T* __restrict__ logits, const long long* __restrict__ labels,
                         long long n, int C, long long ld, long long ignore_index, float smoothing,
                         float scale, int want_grad, T* __restrict__ grad, long long ldg,
                         float* __restrict__ loss, int* __restrict__ correct) {
    const int lane = threadIdx.x & 31;
    const long long row = (long long)blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    if (row >= n) return;
    const T* z = logits + row * ld;
    const long long y = labels[row];
    const bool ignored = (y == ignore_index);
    float m = NEG_INF, s = 0.f, zsum = 0.f, best = NEG_INF;
    int best_j = 0x7fffffff;
    // 16-byte loads when the row allows it: 4x (fp32) or 8x (fp16/bf16) fewer memory
    // instructions in flight per element, which is what keeps a memory-bound kernel fed.
    constexpr int V = 16 / sizeof(T);
    // 16-bit rows use the vector loads; other rows of up to 32 * REG classes are held in
    // registers (lane l keeps classes l, l + 32, ...), so the gradient pass reads no memory.
    const bool vec = sizeof(T) == 2 && (C % V == 0) && ((ld * sizeof(T)) % 16 == 0)
                     && ((((unsigned long long)logits) & 15ULL) == 0);
    constexpr int REG = 32;
    constexpr int VREG = 4;  // 16-bit rows of up to 32 * 4 * V = 1,024 classes: vectors kept in registers
    const bool vreg = vec && C <= 32 * VREG * V;
    const bool inreg = !vec && C <= 32 * REG;
    float vals[REG];
    uint4 raws[VREG];
    if (vreg) {
        const uint4* zv = reinterpret_cast<const uint4*>(z);
        #pragma unroll
        for (int q = 0; q < VREG; ++q) {
            const int jv = lane + 32 * q;
            if (jv < C / V) raws[q] = zv[jv];
        }
        #pragma unroll
        for (int q = 0; q < VREG; ++q) {
            const int jv = lane + 32 * q;
            if (jv < C / V) {
                const T* e = reinterpret_cast<const T*>(&raws[q]);
                #pragma unroll
                for (int k = 0; k < V; ++k) {
                    float v = to_f(e[k]);
                    online(m, s, v);
                    zsum += v;
                    if (v > best) { best = v; best_j = jv * V + k; }
                }
            }
        }
    } else if (inreg) {
        #pragma unroll
        for (int k = 0; k < REG; ++k) {
            const int j = lane + 32 * k;
            vals[k] = j < C ? to_f(z[j]) : NEG_INF;
        }
        #pragma unroll
        for (int k = 0; k < REG; ++k) {
            const int j = lane + 32 * k;
            if (j < C) {
                online(m, s, vals[k]);
                zsum += vals[k];
                if (vals[k] > best) { best = vals[k]; best_j = j; }
            }
        }
    } else if (vec) {
        const uint4* zv = reinterpret_cast<const uint4*>(z);
        #pragma unroll 2
        for (int jv = lane; jv < C / V; jv += 32) {
            uint4 raw = zv[jv];
            const T* e = reinterpret_cast<const T*>(&raw);
            #pragma unroll
            for (int k = 0; k < V; ++k) {
                float v = to_f(e[k]);
                online(m, s, v);
                zsum += v;
                if (v > best) { best = v; best_j = jv * V + k; }
            }
        }
    } else {
        for (int j = lane; j < C; j += 32) {
            float v = to_f(z[j]);
            online(m, s, v);
            zsum += v;
            if (v > best) { best = v; best_j = j; }
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        float m2 = __shfl_xor_sync(0xffffffff, m, off);
        float s2 = __shfl_xor_sync(0xffffffff, s, off);
        merge(m, s, m2, s2);
        zsum += __shfl_xor_sync(0xffffffff, zsum, off);
        float b2 = __shfl_xor_sync(0xffffffff, best, off);
        int j2 = __shfl_xor_sync(0xffffffff, best_j, off);
        if (b2 > best || (b2 == best && j2 < best_j)) { best = b2; best_j = j2; }
    }
    const float lse = m + __logf(s);
    if (lane == 0) {
        if (ignored) { loss[row] = 0.f; correct[row] = 0; }
        else {
            float zy = to_f(z[y]);
            float l = lse - zy;
            if (smoothing > 0.f) l = (1.f - smoothing) * l + smoothing * (lse - zsum / C);
            loss[row] = l;
            correct[row] = (best_j == (int)y);
        }
    }
    if (!want_grad) return;
    T* g = grad + row * ldg;
    const float off_target = smoothing / C;
    if (vreg && ((((unsigned long long)grad) & 15ULL) == 0) && ((ldg * sizeof(T)) % 16 == 0)) {
        uint4* gv = reinterpret_cast<uint4*>(g);
        #pragma unroll
        for (int q = 0; q < VREG; ++q) {
            const int jv = lane + 32 * q;
            if (jv < C / V) {
                const T* e = reinterpret_cast<const T*>(&raws[q]);
                uint4 out;
                T* o = reinterpret_cast<T*>(&out);
                #pragma unroll
                for (int k = 0; k < V; ++k) {
                    const int j = jv * V + k;
                    float v = 0.f;
                    if (!ignored) {
                        float q2 = off_target + (j == (int)y ? 1.f - smoothing : 0.f);
                        v = (__expf(to_f(e[k]) - lse) - q2) * scale;
                    }
                    from_f(&o[k], v);
                }
                gv[jv] = out;
            }
        }
        return;
    }
    if (inreg) {
        #pragma unroll
        for (int k = 0; k < REG; ++k) {
            const int j = lane + 32 * k;
            if (j < C) {
                float v = 0.f;
                if (!ignored) {
                    float q = off_target + (j == (int)y ? 1.f - smoothing : 0.f);
                    v = (__expf(vals[k] - lse) - q) * scale;
                }
                from_f(&g[j], v);
            }
        }
        return;
    }
    if (vec && ((((unsigned long long)grad) & 15ULL) == 0) && ((ldg * sizeof(T)) % 16 == 0)) {
        const uint4* zv = reinterpret_cast<const uint4*>(z);
        uint4* gv = reinterpret_cast<uint4*>(g);
        #pragma unroll 2
        for (int jv = lane; jv < C / V; jv += 32) {
            uint4 raw = zv[jv], out;
            const T* e = reinterpret_cast<const T*>(&raw);
            T* o = reinterpret_cast<T*>(&out);
            #pragma unroll
            for (int k = 0; k < V; ++k) {
                int j = jv * V + k;
                float v = 0.f;
                if (!ignored) {
                    float q = off_target + (j == (int)y ? 1.f - smoothing : 0.f);
                    v = (__expf(to_f(e[k]) - lse) - q) * scale;
                }
                from_f(&o[k], v);
            }
            gv[jv] = out;
        }
        return;
    }
    for (int j = lane; j < C; j += 32) {
        float v = 0.f;
        if (!ignored) {
            float p = __expf(to_f(z[j]) - lse);
            float q = off_target + (j == (int)y ? 1.f - smoothing : 0.f);
            v = (p - q) * scale;
        }
        from_f(&g[j], v);
    }
}

#define XENT(NAME, T) \
extern "C" __global__ void NAME(const T* logits, const long long* labels, long long n, int C, long long ld, \
                                long long ignore_index, float smoothing, float scale, int want_grad, T* grad, \
                                long long ldg, float* loss, int* correct) { \
    xent_row<T>(logits, labels, n, C, ld, ignore_index, smoothing, scale, want_grad, grad, ldg, loss, correct); \
}

XENT(xent_f32, float)
XENT(xent_f16, __half)
XENT(xent_bf16, __nv_bfloat16)
