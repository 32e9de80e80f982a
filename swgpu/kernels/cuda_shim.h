// Force-included (g++ -include) before every kernels/*.cu when the software GPU builds it as C++.
// Maps what the kernels use of CUDA C++ onto the fiber runtime (runtime.cpp) and plain C++:
// thread/block coordinates, __syncthreads, warp shuffles, static __shared__ arrays (rewritten by
// build.sh into SWGPU_SHARED), the _rn intrinsics (exact IEEE operations: built with
// -ffp-contract=off, nothing is fused), bit casts and the integer min/max overloads.
#pragma once
#include <math.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <type_traits>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __noinline__ __attribute__((noinline))
#define __launch_bounds__(...)
#define __restrict__ __restrict

namespace swgpu {
struct coord3 {
    unsigned x, y, z;
};
// A software thread; the runtime's full record starts with its coordinates.
struct ThreadHead {
    coord3 tid;
};
extern ThreadHead* cur_thread;
extern coord3 block_idx, block_dim, grid_dim;
void sync_block();
enum ShflMode { SHFL_IDX = 0, SHFL_UP = 1, SHFL_DOWN = 2, SHFL_XOR = 3 };
uint64_t shuffle(unsigned mask, uint64_t bits, int mode, int arg, int width);
void* shared_object(const void* tag, size_t bytes, const char* name);

template <typename V>
inline V shfl_any(unsigned mask, V v, int mode, int arg, int width) {
    static_assert(sizeof(V) == 4 || sizeof(V) == 8, "shuffles move 4 or 8 bytes");
    uint64_t b = 0;
    memcpy(&b, &v, sizeof(V));
    b = shuffle(mask, b, mode, arg, width);
    V r;
    memcpy(&r, &b, sizeof(V));
    return r;
}
}  // namespace swgpu

#define threadIdx (static_cast<const ::swgpu::coord3&>(::swgpu::cur_thread->tid))
#define blockIdx (static_cast<const ::swgpu::coord3&>(::swgpu::block_idx))
#define blockDim (static_cast<const ::swgpu::coord3&>(::swgpu::block_dim))
#define gridDim (static_cast<const ::swgpu::coord3&>(::swgpu::grid_dim))
#define warpSize 32

// `__shared__ T name[dims];` is rewritten to `SWGPU_SHARED(T, name, [dims]);`: one heap object of
// exactly sizeof(T[dims]) per block, filled with 0xFF bytes when the block starts.
#define SWGPU_SHARED(T, name, dims)                                                   \
    static const char name##_swgpu_tag = 0;                                           \
    typedef T name##_swgpu_type dims;                                                 \
    name##_swgpu_type& name = *static_cast<name##_swgpu_type*>(                       \
        ::swgpu::shared_object(&name##_swgpu_tag, sizeof(name##_swgpu_type), #name))

inline void __syncthreads() { ::swgpu::sync_block(); }
template <typename V>
inline V __shfl_xor_sync(unsigned mask, V v, int lane_mask, int width = 32) {
    return ::swgpu::shfl_any(mask, v, ::swgpu::SHFL_XOR, lane_mask, width);
}
template <typename V>
inline V __shfl_sync(unsigned mask, V v, int src, int width = 32) {
    return ::swgpu::shfl_any(mask, v, ::swgpu::SHFL_IDX, src, width);
}
template <typename V>
inline V __shfl_down_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    return ::swgpu::shfl_any(mask, v, ::swgpu::SHFL_DOWN, (int)delta, width);
}
template <typename V>
inline V __shfl_up_sync(unsigned mask, V v, unsigned delta, int width = 32) {
    return ::swgpu::shfl_any(mask, v, ::swgpu::SHFL_UP, (int)delta, width);
}

// Correctly rounded arithmetic: one IEEE operation each (no contraction under -ffp-contract=off).
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fsqrt_rn(float a) { return sqrtf(a); }
inline float __fmaf_rn(float a, float b, float c) { return fmaf(a, b, c); }
inline double __dadd_rn(double a, double b) { return a + b; }
inline double __dsub_rn(double a, double b) { return a - b; }
inline double __dmul_rn(double a, double b) { return a * b; }
inline double __ddiv_rn(double a, double b) { return a / b; }
inline double __dsqrt_rn(double a) { return sqrt(a); }
inline double __fma_rn(double a, double b, double c) { return fma(a, b, c); }
inline float __expf(float a) { return expf(a); }
inline float __logf(float a) { return logf(a); }
inline float rsqrtf(float a) { return 1.0f / sqrtf(a); }
inline float __saturatef(float a) { return fminf(fmaxf(a, 0.0f), 1.0f); }

template <typename To, typename From>
inline To swgpu_bits(From v) {
    static_assert(sizeof(To) == sizeof(From), "bit cast between equal sizes");
    To r;
    memcpy(&r, &v, sizeof(To));
    return r;
}
inline unsigned __float_as_uint(float v) { return swgpu_bits<unsigned>(v); }
inline int __float_as_int(float v) { return swgpu_bits<int>(v); }
inline float __uint_as_float(unsigned v) { return swgpu_bits<float>(v); }
inline float __int_as_float(int v) { return swgpu_bits<float>(v); }
inline long long __double_as_longlong(double v) { return swgpu_bits<long long>(v); }
inline double __longlong_as_double(long long v) { return swgpu_bits<double>(v); }

// CUDA's min/max: integers of any mix (the usual arithmetic conversions), fminf/fmaxf for floats.
template <typename A, typename B>
inline typename std::enable_if<std::is_integral<A>::value && std::is_integral<B>::value,
                               typename std::common_type<A, B>::type>::type
min(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a < (C)b ? (C)a : (C)b;
}
template <typename A, typename B>
inline typename std::enable_if<std::is_integral<A>::value && std::is_integral<B>::value,
                               typename std::common_type<A, B>::type>::type
max(A a, B b) {
    typedef typename std::common_type<A, B>::type C;
    return (C)a > (C)b ? (C)a : (C)b;
}
inline float min(float a, float b) { return fminf(a, b); }
inline float max(float a, float b) { return fmaxf(a, b); }
inline double min(double a, double b) { return fmin(a, b); }
inline double max(double a, double b) { return fmax(a, b); }
#define __shared__ __shared___is_only_emulated_for_static_arrays
