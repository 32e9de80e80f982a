// Residual add and scale (src/ops/add.rs), elementwise.
//   add:   y = a + b;      backward dx += dy (once per input)
//   scale: y = alpha * x;  backward dx += alpha * dy
#include "common.cuh"

template <typename T>
__device__ void add_fwd(const T* a, const T* b, T* y, u64 n) {
    FOR_EACH(i, n) st(y, i, ld(a, i) + ld(b, i));
}
EXPORT_F32_BF16(add_fwd, (const T* a, const T* b, T* y, u64 n), (a, b, y, n))

template <typename T>
__device__ void scale_fwd(const T* x, float alpha, T* y, u64 n) {
    FOR_EACH(i, n) st(y, i, alpha * ld(x, i));
}
EXPORT_F32_BF16(scale_fwd, (const T* x, float alpha, T* y, u64 n), (x, alpha, y, n))

// dx += alpha * dy; the add's backward is alpha = 1.
template <typename T>
__device__ void axpy(const T* dy, float alpha, T* dx, u64 n) {
    FOR_EACH(i, n) st(dx, i, ld(dx, i) + alpha * ld(dy, i));
}
EXPORT_F32_BF16(axpy, (const T* dy, float alpha, T* dx, u64 n), (dy, alpha, dx, n))
