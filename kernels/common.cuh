// Shared helpers for every kernel. No system headers: NVRTC 13.0 ships none of cuda_bf16.h or
// cuda_fp16.h, so bf16 is handled as the top 16 bits of an f32, and fixed sizes are spelled out.
//
// Reductions run in a fixed order (butterfly shuffles inside a warp, then warps in index order
// through shared memory), so a launch with the same shape gives bitwise the same result every time.
// No float atomics anywhere: deterministic mode needs none to be switched off.
#pragma once

typedef unsigned short bf16;
typedef unsigned long long u64;

#define WARP 32
#define FULL_MASK 0xffffffffu
#define F32_INF __int_as_float(0x7f800000)

__device__ __forceinline__ float bf16_to_f32(bf16 v) { return __uint_as_float(((unsigned)v) << 16); }

// Round to nearest even; NaN stays a (quiet) NaN.
__device__ __forceinline__ bf16 f32_to_bf16(float f) {
    unsigned u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16)(u >> 16);
}

// Loads and stores in the compute dtype, arithmetic in f32.
__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, u64 i) { return bf16_to_f32(p[i]); }
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, u64 i, float v) { p[i] = f32_to_bf16(v); }

// Butterfly sum over a warp: every lane ends with the same, order-fixed total.
__device__ __forceinline__ float warp_sum(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}
__device__ __forceinline__ float warp_max(float v) {
    for (int o = WARP / 2; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(FULL_MASK, v, o));
    return v;
}

// Sum over a block (blockDim.x a multiple of 32, at most 1024); every thread gets the total.
// `scratch` holds 32 floats. Contains __syncthreads: call from all threads.
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0.0f;
    return warp_sum(v);
}
__device__ __forceinline__ float block_max(float v, float* scratch) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    v = warp_max(v);
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : -F32_INF;
    return warp_max(v);
}

// Grid-stride loop over [0, n).
#define FOR_EACH(i, n) \
    for (u64 i = (u64)blockIdx.x * blockDim.x + threadIdx.x; i < (u64)(n); i += (u64)gridDim.x * blockDim.x)

// Kernels over activations are templates on the storage type T (float or bf16), exported under C
// names with an _f32 and a _bf16 suffix so the host holds one typed handle per dtype. `params` may
// name T: each export sits in a namespace where T is that dtype.
#define EXPORT_F32_BF16(name, params, args)                                         \
    namespace name##_f32_ns {                                                        \
    typedef float T;                                                                 \
    extern "C" __global__ void name##_f32 params { name<T> args; }                   \
    }                                                                                \
    namespace name##_bf16_ns {                                                       \
    typedef bf16 T;                                                                  \
    extern "C" __global__ void name##_bf16 params { name<T> args; }                  \
    }
