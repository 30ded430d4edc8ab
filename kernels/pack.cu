// Bucket pack/unpack: many gradient tensors into one contiguous buffer (and back) in ONE launch.
// The host cuts every tensor into chunks of CHUNK floats and passes a table of chunks; each block
// copies one chunk with 16-byte loads when both ends are aligned, so a launch moves all tensors
// at close to memcpy bandwidth whatever their sizes.
#define CHUNK 32768

struct Chunk { unsigned long long ptr; long long flat_offset; int count; int pad; };

__device__ __forceinline__ void copy_chunk(float* __restrict__ dst, const float* __restrict__ src, int count, float scale) {
    bool aligned = ((((unsigned long long)dst) | ((unsigned long long)src)) & 15ULL) == 0;
    if (aligned) {
        int n4 = count >> 2;
        const float4* s4 = reinterpret_cast<const float4*>(src);
        float4* d4 = reinterpret_cast<float4*>(dst);
        #pragma unroll 4
        for (int i = threadIdx.x; i < n4; i += blockDim.x) {
            float4 v = s4[i];
            v.x *= scale; v.y *= scale; v.z *= scale; v.w *= scale;
            d4[i] = v;
        }
        for (int i = (n4 << 2) + threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i] * scale;
    } else {
        for (int i = threadIdx.x; i < count; i += blockDim.x) dst[i] = src[i] * scale;
    }
}

extern "C" __global__ void pack_f32(const Chunk* __restrict__ chunks, float* __restrict__ flat) {
    Chunk c = chunks[blockIdx.x];
    copy_chunk(flat + c.flat_offset, reinterpret_cast<const float*>(c.ptr), c.count, 1.f);
}

extern "C" __global__ void unpack_f32(const Chunk* __restrict__ chunks, const float* __restrict__ flat, float scale) {
    Chunk c = chunks[blockIdx.x];
    copy_chunk(reinterpret_cast<float*>(c.ptr), flat + c.flat_offset, c.count, scale);
}
