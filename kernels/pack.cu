// Bucket pack/unpack: many gradient tensors into one contiguous buffer (and back, times a scale)
// in ONE launch. The host cuts every tensor into chunks of CHUNK floats and uploads the table once
// per bucket; block b copies chunk b. Chunks are small (32 KB) so there are several per SM slot:
// the block scheduler then balances them over the SMs, which a few huge chunks (one tensor each)
// would not.
// A tensor's place in the flat buffer is 16-byte aligned only by chance (sizes are arbitrary), so
// each chunk first aligns its destination and writes 16-byte vectors; it reads 16-byte vectors too
// when the source is then aligned, else 4-byte loads, whose sectors L1 serves after the first.
#define CHUNK 8192

struct Chunk { unsigned long long ptr; long long flat_offset; int count; int pad; };

__device__ __forceinline__ float4 times(float4 v, float s) {
    v.x *= s; v.y *= s; v.z *= s; v.w *= s;
    return v;
}

__device__ __forceinline__ float4 load4(const float* __restrict__ p, float s) {
    float4 v;
    v.x = p[0] * s; v.y = p[1] * s; v.z = p[2] * s; v.w = p[3] * s;
    return v;
}

__device__ __forceinline__ void copy_chunk(float* __restrict__ dst, const float* __restrict__ src, int count, float scale) {
    const int t = threadIdx.x, nt = blockDim.x;
    // Up to 3 floats until dst is 16-byte aligned (float buffers are 4-byte aligned).
    int head = (int)(((16u - ((unsigned)(unsigned long long)dst & 15u)) & 15u) >> 2);
    if (head > count) head = count;
    if (t < head) dst[t] = src[t] * scale;
    dst += head;
    src += head;
    count -= head;
    const int n4 = count >> 2;
    float4* d4 = reinterpret_cast<float4*>(dst);
    int i = t;
    if ((((unsigned long long)src) & 15ULL) == 0) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        for (; i + 3 * nt < n4; i += 4 * nt) {  // four loads in flight per thread
            const float4 a = s4[i], b = s4[i + nt], c = s4[i + 2 * nt], d = s4[i + 3 * nt];
            d4[i] = times(a, scale); d4[i + nt] = times(b, scale);
            d4[i + 2 * nt] = times(c, scale); d4[i + 3 * nt] = times(d, scale);
        }
        for (; i < n4; i += nt) d4[i] = times(s4[i], scale);
    } else {
        for (; i + 3 * nt < n4; i += 4 * nt) {
            const float4 a = load4(src + 4 * i, scale), b = load4(src + 4 * (i + nt), scale);
            const float4 c = load4(src + 4 * (i + 2 * nt), scale), d = load4(src + 4 * (i + 3 * nt), scale);
            d4[i] = a; d4[i + nt] = b; d4[i + 2 * nt] = c; d4[i + 3 * nt] = d;
        }
        for (; i < n4; i += nt) d4[i] = load4(src + 4 * i, scale);
    }
    for (int r = 4 * n4 + t; r < count; r += nt) dst[r] = src[r] * scale;
}

extern "C" __global__ void pack_f32(const Chunk* __restrict__ chunks, float* __restrict__ flat) {
    const Chunk c = chunks[blockIdx.x];
    copy_chunk(flat + c.flat_offset, reinterpret_cast<const float*>(c.ptr), c.count, 1.f);
}

extern "C" __global__ void unpack_f32(const Chunk* __restrict__ chunks, const float* __restrict__ flat, float scale) {
    const Chunk c = chunks[blockIdx.x];
    copy_chunk(reinterpret_cast<float*>(c.ptr), flat + c.flat_offset, c.count, scale);
}
