// Kernels for swgpu's self-test: one correct block reduction and one of each bug the software GPU
// must report.
#include "common.cuh"

// out[blockIdx.x] = sum of in[] over the block, through shuffles and shared memory.
extern "C" __global__ void reduce_ok(const float* in, float* out) {
    __shared__ float part[32];
    float v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    __syncthreads();
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < blockDim.x / 32; w++) s += part[w];
        out[blockIdx.x] = s;
    }
}

// The same without the barrier: warp 0 reads the other warps' parts before they are written.
extern "C" __global__ void reduce_no_barrier(const float* in, float* out) {
    __shared__ float part[32];
    float v = in[blockIdx.x * blockDim.x + threadIdx.x];
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    if (threadIdx.x % 32 == 0) part[threadIdx.x / 32] = v;
    if (threadIdx.x == 0) {
        float s = 0.0f;
        for (unsigned w = 0; w < blockDim.x / 32; w++) s += part[w];
        out[blockIdx.x] = s;
    }
}

extern "C" __global__ void partial_barrier(float* out) {
    if (threadIdx.x >= 32) return;
    __syncthreads();
    out[threadIdx.x] = 1.0f;
}

extern "C" __global__ void shuffle_exited_lane(float* out) {
    if (threadIdx.x == 5) return;
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, 1.0f, 1);
}

// Launched with 48 threads: the second warp has 16 lanes, but the mask names 32.
extern "C" __global__ void shuffle_missing_lane(float* out) {
    out[threadIdx.x] = __shfl_xor_sync(FULL_MASK, 1.0f, 1);
}

extern "C" __global__ void shared_overflow(float* out, int n) {
    __shared__ float a[4];
    a[threadIdx.x] = 1.0f;  // n > 4 threads write past the end
    __syncthreads();
    out[threadIdx.x] = a[threadIdx.x % 4] + (float)n;
}

// 2-D blocks, by-value struct and 64-bit parameters.
struct Dims {
    int w;
    int h;
};
extern "C" __global__ void coords(unsigned* out, Dims d, u64 base) {
    unsigned x = blockIdx.x * blockDim.x + threadIdx.x, y = blockIdx.y * blockDim.y + threadIdx.y;
    if (x < (unsigned)d.w && y < (unsigned)d.h) out[y * d.w + x] = (unsigned)base + y * 1000u + x;
}
