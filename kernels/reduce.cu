// Adding a received segment into the local buffer (segmented / ring allreduce): dst += src, fp32.
// dst is a slice at any offset of the local buffer, so it is aligned only by chance: a few head
// elements align dst, then 16-byte vectors; src is read as vectors when it is aligned too.
extern "C" __global__ void segment_add_f32(float* __restrict__ dst, const float* __restrict__ src, long long n) {
    const long long tid = blockIdx.x * (long long)blockDim.x + threadIdx.x, stride = (long long)gridDim.x * blockDim.x;
    long long head = (long long)(((16u - ((unsigned)(unsigned long long)dst & 15u)) & 15u) >> 2);
    if (head > n) head = n;
    if (tid < head) dst[tid] += src[tid];
    dst += head;
    src += head;
    n -= head;
    const long long n4 = n >> 2;
    float4* d4 = reinterpret_cast<float4*>(dst);
    if ((((unsigned long long)src) & 15ULL) == 0) {
        const float4* s4 = reinterpret_cast<const float4*>(src);
        for (long long i = tid; i < n4; i += stride) {
            float4 a = d4[i];
            const float4 b = s4[i];
            a.x += b.x; a.y += b.y; a.z += b.z; a.w += b.w;
            d4[i] = a;
        }
    } else {
        for (long long i = tid; i < n4; i += stride) {
            float4 a = d4[i];
            const float* b = src + 4 * i;
            a.x += b[0]; a.y += b[1]; a.z += b[2]; a.w += b[3];
            d4[i] = a;
        }
    }
    for (long long i = 4 * n4 + tid; i < n; i += stride) dst[i] += src[i];
}
