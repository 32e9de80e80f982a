// Per-row L2 normalization with a temperature (src/ops/l2norm.rs):
//   y_r = x_r / max(||x_r||, eps) / scale
//   dx_r += (dy_r - u (u . dy_r)) / (n * scale), u = x_r / n    (n > eps)
//   dx_r += dy_r / (eps * scale)                                  (clamped)
// One warp per row (rows are pixels, D = 256 channels for ResNet-50); 8 rows per 256-thread block.
#include "common.cuh"

struct L2NormParams {
    int rows;
    int d;
    float scale;
    float eps;
};

template <typename T>
__device__ void l2norm_fwd(const T* x, T* y, L2NormParams p) {
    int lane = threadIdx.x % WARP;
    for (u64 r = (u64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP; r < (u64)p.rows;
         r += (u64)gridDim.x * (blockDim.x / WARP)) {
        const T* xr = x + r * p.d;
        float s = 0.0f;
        for (int j = lane; j < p.d; j += WARP) {
            float v = ld(xr, j);
            s += v * v;
        }
        float inv = 1.0f / (fmaxf(sqrtf(warp_sum(s)), p.eps) * p.scale);
        for (int j = lane; j < p.d; j += WARP) st(y + r * p.d, j, ld(xr, j) * inv);
    }
}
EXPORT_F32_BF16(l2norm_fwd, (const T* x, T* y, L2NormParams p), (x, y, p))

template <typename T>
__device__ void l2norm_bwd(const T* x, const T* dy, T* dx, L2NormParams p) {
    int lane = threadIdx.x % WARP;
    for (u64 r = (u64)blockIdx.x * (blockDim.x / WARP) + threadIdx.x / WARP; r < (u64)p.rows;
         r += (u64)gridDim.x * (blockDim.x / WARP)) {
        u64 o = r * p.d;
        float ss = 0.0f, xd = 0.0f;
        for (int j = lane; j < p.d; j += WARP) {
            float v = ld(x, o + j);
            ss += v * v;
            xd += v * ld(dy, o + j);
        }
        float n = sqrtf(warp_sum(ss));
        xd = warp_sum(xd);
        if (n > p.eps) {
            float inv = 1.0f / n;
            float ud = xd * inv;  // u . dy
            for (int j = lane; j < p.d; j += WARP) {
                float u = ld(x, o + j) * inv;
                st(dx, o + j, ld(dx, o + j) + (ld(dy, o + j) - u * ud) * inv / p.scale);
            }
        } else {
            for (int j = lane; j < p.d; j += WARP)
                st(dx, o + j, ld(dx, o + j) + ld(dy, o + j) / (p.eps * p.scale));
        }
    }
}
EXPORT_F32_BF16(l2norm_bwd, (const T* x, const T* dy, T* dx, L2NormParams p), (x, dy, dx, p))
