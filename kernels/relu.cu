// ReLU (src/ops/relu.rs). y = max(x, 0); backward dx += dy * [y > 0].
#include "common.cuh"

template <typename T>
__device__ void relu_fwd(const T* x, T* y, u64 n) {
    FOR_EACH(i, n) st(y, i, fmaxf(ld(x, i), 0.0f));
}
EXPORT_F32_BF16(relu_fwd, (const T* x, T* y, u64 n), (x, y, n))

template <typename T>
__device__ void relu_bwd(const T* y, const T* dy, T* dx, u64 n) {
    FOR_EACH(i, n) {
        if (ld(y, i) > 0.0f) st(dx, i, ld(dx, i) + ld(dy, i));
    }
}
EXPORT_F32_BF16(relu_bwd, (const T* y, const T* dy, T* dx, u64 n), (y, dy, dx, n))
