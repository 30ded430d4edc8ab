// Fused softmax + cross-entropy: per-row loss, correct prediction and the gradient w.r.t. the
// logits in one kernel, plus the batch totals, so a training step costs one launch and one small
// device-to-host copy.
//
// One warp per row, WARPS rows per block. Rows of up to 1,024 classes (the usual classifier heads)
// are loaded into registers once: 32 values per lane, with 16-byte loads when the row is 16-byte
// aligned. Max/argmax, the sum of exponentials and the gradient then come from registers, so every
// logit is read from memory once and every gradient element written once: the minimum traffic.
// With the row resident the exact max is as cheap as an online one, and each exponential is
// computed once and kept (in place of the logit) for the gradient.
// Wider rows stream: one read with an online (max, sum) pair, then a second read to write the
// gradient; that read mostly hits L2, which still holds the block's few rows.
//
// Totals: each block sums its rows (loss in double) into one partial; the last block to finish
// (ticket counter) adds the partials in a fixed order, so the loss sum is deterministic.
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#define WARPS 8            // rows per block; the host launches 32 * WARPS threads
#define REG_CLASSES 1024   // rows up to this many classes stay in registers (32 per lane)
#define NEG_INF __int_as_float(0xff800000)
#define NEG_MAX __int_as_float(0xff7fffff)  // -FLT_MAX: a finite start for the online max
#define NO_INDEX 0x7fffffff

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// -inf in every T of a 32-bit word: the padding of the slots past a row's end.
template <typename T> __device__ __forceinline__ unsigned neg_inf_bits();
template <> __device__ __forceinline__ unsigned neg_inf_bits<float>() { return 0xff800000u; }
template <> __device__ __forceinline__ unsigned neg_inf_bits<__half>() { return 0xfc00fc00u; }
template <> __device__ __forceinline__ unsigned neg_inf_bits<__nv_bfloat16>() { return 0xff80ff80u; }

// What one row needs besides its logits.
struct RowArgs {
    long long y;      // the label (only meaningful when keep)
    bool keep;        // counted: label valid and not ignored
    float zy;         // the target logit
    float smoothing;  // label-smoothing epsilon
    float scale;      // gradient scale
};

// A row's results, identical on every lane after the butterfly reductions.
struct RowOut { float loss; int correct; };

__device__ __forceinline__ void warp_argmax(float& best, int& bj) {
    for (int off = 16; off > 0; off >>= 1) {
        float b2 = __shfl_xor_sync(0xffffffff, best, off);
        int j2 = __shfl_xor_sync(0xffffffff, bj, off);
        // Ties go to the smaller class, as argmax's first maximum.
        if (b2 > best || (b2 == best && j2 < bj)) { best = b2; bj = j2; }
    }
    if (bj == NO_INDEX) bj = 0;  // every logit -inf (or NaN): argmax says 0
}

__device__ __forceinline__ float warp_sum(float v) {
    for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffff, v, off);
    return v;
}

// Loss from the row's max m, sum of exp(z - m) and sum of logits, written so that huge logits
// lose nothing: m - zy is exact when they are close, and log(s) is small.
__device__ __forceinline__ float row_loss(const RowArgs& a, float m, float s, float zsum, int C) {
    const float log_s = __logf(s);
    float l = (m - a.zy) + log_s;
    if (a.smoothing > 0.f) l = (1.f - a.smoothing) * l + a.smoothing * ((m - zsum / C) + log_s);
    return l;
}

// d(loss)/d(z_j) * scale: softmax minus the (smoothed) one-hot target; nothing for ignored rows.
__device__ __forceinline__ float grad_of(const RowArgs& a, float e, float inv_s, int j, float off_target) {
    if (!a.keep) return 0.f;
    const float q = off_target + (j == (int)a.y ? 1.f - a.smoothing : 0.f);
    return (e * inv_s - q) * a.scale;
}

// Rows of C <= REG_CLASSES, 16-byte aligned, C % V == 0: lane l holds the 16-byte vectors l, l + 32,
// ... (V classes each), converted to float.
template <typename T>
__device__ __forceinline__ RowOut xent_regs(const T* __restrict__ z, T* __restrict__ g, int C, const RowArgs& a) {
    constexpr int V = 16 / sizeof(T);
    constexpr int NV = 32 / V;  // vectors per lane
    const int lane = threadIdx.x & 31;
    const int nv = C / V;       // vectors in the row
    float x[32];
    {
        // Slots past the row hold -inf: they add nothing to the max or the sum of exponentials.
        const unsigned pad = neg_inf_bits<T>();
        uint4 raw[NV];
        const uint4* zv = reinterpret_cast<const uint4*>(z);
        #pragma unroll
        for (int q = 0; q < NV; ++q) {  // every load issued before any is used
            raw[q] = make_uint4(pad, pad, pad, pad);
            if (lane + 32 * q < nv) raw[q] = zv[lane + 32 * q];
        }
        #pragma unroll
        for (int q = 0; q < NV; ++q) {
            const T* e = reinterpret_cast<const T*>(&raw[q]);
            #pragma unroll
            for (int k = 0; k < V; ++k) x[q * V + k] = to_f(e[k]);
        }
    }
    // Pass 1: max and its first index; the logit sum only when smoothing needs it.
    float best = NEG_INF, zsum = 0.f;
    int bj = NO_INDEX;
    #pragma unroll
    for (int i = 0; i < 32; ++i) {
        if (x[i] > best) { best = x[i]; bj = (lane + 32 * (i / V)) * V + i % V; }
        if (a.smoothing > 0.f && lane + 32 * (i / V) < nv) zsum += x[i];
    }
    warp_argmax(best, bj);
    // Every logit -inf: use 0 so exp(z - m) is 0 rather than NaN (the loss is then NaN, as in
    // float64 arithmetic).
    const float m = best == NEG_INF ? 0.f : best;
    // Pass 2: the exponentials, kept in place of the logits for the gradient (padding is -inf: 0).
    float s = 0.f;
    #pragma unroll
    for (int i = 0; i < 32; ++i) {
        x[i] = __expf(x[i] - m);
        s += x[i];
    }
    s = warp_sum(s);
    if (a.smoothing > 0.f) zsum = warp_sum(zsum);
    RowOut out = {a.keep ? row_loss(a, m, s, zsum, C) : 0.f, a.keep && bj == (int)a.y};
    if (g == nullptr) return out;
    // Pass 3: the gradient, from registers.
    const float inv_s = 1.f / s, off_target = a.smoothing / C;
    uint4* gv = reinterpret_cast<uint4*>(g);
    #pragma unroll
    for (int q = 0; q < NV; ++q) {
        if (lane + 32 * q < nv) {
            uint4 pk;
            T* o = reinterpret_cast<T*>(&pk);
            #pragma unroll
            for (int k = 0; k < V; ++k)
                o[k] = from_f<T>(grad_of(a, x[q * V + k], inv_s, (lane + 32 * q) * V + k, off_target));
            gv[lane + 32 * q] = pk;
        }
    }
    return out;
}

// Add exp(v) to the running (m, s) pair. m starts at -FLT_MAX rather than -inf, so a -inf logit
// adds exp(-inf) = 0 and never computes exp(-inf - -inf) = NaN.
__device__ __forceinline__ void online(float& m, float& s, float v) {
    if (v > m) { s = s * __expf(m - v) + 1.f; m = v; } else { s += __expf(v - m); }
}

// Any C and layout: two reads of the row (16-byte loads when aligned).
template <typename T>
__device__ RowOut xent_stream(const T* __restrict__ z, T* __restrict__ g, int C, bool vec, const RowArgs& a) {
    constexpr int V = 16 / sizeof(T);
    const int lane = threadIdx.x & 31;
    float m = NEG_MAX, s = 0.f, zsum = 0.f, best = NEG_INF;
    int bj = NO_INDEX;
    if (vec) {
        const uint4* zv = reinterpret_cast<const uint4*>(z);
        #pragma unroll 2
        for (int jv = lane; jv < C / V; jv += 32) {
            uint4 raw = zv[jv];
            const T* e = reinterpret_cast<const T*>(&raw);
            #pragma unroll
            for (int k = 0; k < V; ++k) {
                const float v = to_f(e[k]);
                online(m, s, v);
                zsum += v;
                if (v > best) { best = v; bj = jv * V + k; }
            }
        }
    } else {
        for (int j = lane; j < C; j += 32) {
            const float v = to_f(z[j]);
            online(m, s, v);
            zsum += v;
            if (v > best) { best = v; bj = j; }
        }
    }
    for (int off = 16; off > 0; off >>= 1) {
        const float m2 = __shfl_xor_sync(0xffffffff, m, off), s2 = __shfl_xor_sync(0xffffffff, s, off);
        const float mx = fmaxf(m, m2);
        s = s * __expf(m - mx) + s2 * __expf(m2 - mx);
        m = mx;
    }
    warp_argmax(best, bj);
    zsum = warp_sum(zsum);
    RowOut out = {a.keep ? row_loss(a, m, s, zsum, C) : 0.f, a.keep && bj == (int)a.y};
    if (g == nullptr) return out;
    const float inv_s = 1.f / s, off_target = a.smoothing / C;
    if (vec) {
        const uint4* zv = reinterpret_cast<const uint4*>(z);
        uint4* gv = reinterpret_cast<uint4*>(g);
        #pragma unroll 2
        for (int jv = lane; jv < C / V; jv += 32) {
            uint4 raw = zv[jv], pk;
            const T* e = reinterpret_cast<const T*>(&raw);
            T* o = reinterpret_cast<T*>(&pk);
            #pragma unroll
            for (int k = 0; k < V; ++k) o[k] = from_f<T>(grad_of(a, __expf(to_f(e[k]) - m), inv_s, jv * V + k, off_target));
            gv[jv] = pk;
        }
    } else {
        for (int j = lane; j < C; j += 32) g[j] = from_f<T>(grad_of(a, __expf(to_f(z[j]) - m), inv_s, j, off_target));
    }
    return out;
}

// Block partial -> the last block adds all partials into stats[0..3] (loss, correct, kept, bad).
// stats layout (float64): [0..3] totals, [4] ticket counter (0 before a launch, and again after
// it), [8 + 4b ...] partials.
__device__ void block_totals(double* stats, float loss, int correct, int kept, int bad) {
    __shared__ double part[WARPS][4];
    __shared__ bool last;
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) { part[warp][0] = loss; part[warp][1] = correct; part[warp][2] = kept; part[warp][3] = bad; }
    __syncthreads();
    volatile double* partials = stats + 8;
    if (threadIdx.x < 4) {
        double t = 0.0;
        for (int w = 0; w < WARPS; ++w) t += part[w][threadIdx.x];
        partials[4 * (long long)blockIdx.x + threadIdx.x] = t;
    }
    __threadfence();  // the partial is visible before the ticket says so
    __syncthreads();
    if (threadIdx.x == 0) last = atomicAdd(reinterpret_cast<unsigned*>(stats + 4), 1u) == gridDim.x - 1;
    __syncthreads();
    if (!last) return;
    __threadfence();
    double t[4] = {0.0, 0.0, 0.0, 0.0};
    for (long long b = threadIdx.x; b < gridDim.x; b += blockDim.x)
        for (int i = 0; i < 4; ++i) t[i] += partials[4 * b + i];
    for (int i = 0; i < 4; ++i)
        for (int off = 16; off > 0; off >>= 1) t[i] += __shfl_xor_sync(0xffffffff, t[i], off);
    __syncthreads();  // part[][] is reused
    if (lane == 0) for (int i = 0; i < 4; ++i) part[warp][i] = t[i];
    __syncthreads();
    if (threadIdx.x < 4) {
        double u = 0.0;
        for (int w = 0; w < WARPS; ++w) u += part[w][threadIdx.x];
        stats[threadIdx.x] = u;
    }
    if (threadIdx.x == 0) *reinterpret_cast<unsigned*>(stats + 4) = 0u;  // the buffer can be reused
}

// The row's setup, the chosen path, then the block's totals. REGS: C <= REG_CLASSES, C % V == 0
// and 16-byte aligned rows of logits and gradient (the host checks); otherwise the streaming path.
template <typename T, bool REGS>
__device__ __forceinline__ void xent(const T* __restrict__ logits, const long long* __restrict__ labels, long long n,
                                     int C, long long ld, long long ignore_index, float smoothing, float scale,
                                     T* __restrict__ grad, long long ldg, double* stats) {
    const long long row = (long long)blockIdx.x * WARPS + (threadIdx.x >> 5);
    RowOut out = {0.f, 0};
    int kept = 0, bad = 0;
    if (row < n) {  // no early return: the whole block meets in block_totals
        const T* z = logits + row * ld;
        T* g = grad ? grad + row * ldg : nullptr;
        const long long y = labels[row];
        const bool in_range = y >= 0 && y < C;
        RowArgs a;
        a.y = y;
        a.keep = y != ignore_index && in_range;
        a.zy = to_f(z[a.keep ? y : 0]);  // issued now so its latency overlaps the row's loads
        a.smoothing = smoothing;
        a.scale = scale;
        kept = a.keep;
        bad = y != ignore_index && !in_range;
        if constexpr (REGS) {
            out = xent_regs<T>(z, g, C, a);
        } else {
            constexpr int V = 16 / sizeof(T);
            const bool vec = C % V == 0 && (ld * (long long)sizeof(T)) % 16 == 0
                             && (((unsigned long long)logits) & 15ULL) == 0
                             && (grad == nullptr || ((ldg * (long long)sizeof(T)) % 16 == 0
                                                     && (((unsigned long long)grad) & 15ULL) == 0));
            out = xent_stream<T>(z, g, C, vec, a);
        }
    }
    block_totals(stats, out.loss, out.correct, kept, bad);
}

// grad may be null (forward only). Launch WARPS * 32 threads and ceil(n / WARPS) blocks; stats is
// a float64 buffer of 8 + 4 * blocks whose ticket starts at 0. Each path is its own kernel, so the register path's
// count is its own: capped at 80 (3 blocks, 24 warps per SM: with every load of a row issued at
// once that keeps ample bytes in flight); a cap of 64 spills.
#define XENT(NAME, T) \
extern "C" __global__ void __launch_bounds__(WARPS * 32, 3) xent_regs_##NAME( \
        const T* logits, const long long* labels, long long n, int C, long long ld, long long ignore_index, \
        float smoothing, float scale, T* grad, long long ldg, double* stats) { \
    xent<T, true>(logits, labels, n, C, ld, ignore_index, smoothing, scale, grad, ldg, stats); \
} \
extern "C" __global__ void __launch_bounds__(WARPS * 32) xent_stream_##NAME( \
        const T* logits, const long long* labels, long long n, int C, long long ld, long long ignore_index, \
        float smoothing, float scale, T* grad, long long ldg, double* stats) { \
    xent<T, false>(logits, labels, n, C, ld, ignore_index, smoothing, scale, grad, ldg, stats); \
}

XENT(f32, float)
XENT(f16, __half)
XENT(bf16, __nv_bfloat16)
