// Conversions between f32 master copies and the storage dtype T (src/gpu/mod.rs), elementwise:
//   cast_from_f32: dst = (T)src, to nearest even for bf16 (the compute copy of the parameters)
//   accum_f32:     acc += (float)src (a compute-dtype gradient summed into its f32 master)
#include "common.cuh"

template <typename T>
__device__ void cast_from_f32(const float* src, T* dst, u64 n) {
    FOR_EACH(i, n) st(dst, i, src[i]);
}
EXPORT_F32_BF16(cast_from_f32, (const float* src, T* dst, u64 n), (src, dst, n))

template <typename T>
__device__ void accum_f32(const T* src, float* acc, u64 n) {
    FOR_EACH(i, n) acc[i] += ld(src, i);
}
EXPORT_F32_BF16(accum_f32, (const T* src, float* acc, u64 n), (src, acc, n))
