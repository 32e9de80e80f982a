// Softmax over positions per sample and channel: the alignment maps (src/ops/softmax.rs).
//   y[b, p, d] = exp(x[b, p, d] - max_p) / sum_p' exp(x[b, p', d] - max_p)
//   dx[b, p, d] += y[b, p, d] * (dy[b, p, d] - sum_p' y[b, p', d] dy[b, p', d])
// One thread per (b, d) column walks the L positions; neighbouring threads read neighbouring d.
//
// align_fwd / align_bwd fuse the per-pixel L2 norm and temperature (l2norm.cu) with this softmax:
// one block per sample, a warp per row for the norms, then a thread per column for the softmax.
#include "common.cuh"

struct SoftmaxParams {
    int b;
    int l;
    int d;
};

template <typename T>
__device__ void softmax_fwd(const T* x, T* y, SoftmaxParams p) {
    FOR_EACH(i, (u64)p.b * p.d) {
        u64 b = i / p.d;
        int d = (int)(i % p.d);
        const u64 base = b * p.l * p.d + d;
        float m = -F32_INF;
        for (int q = 0; q < p.l; q++) m = fmaxf(m, ld(x, base + (u64)q * p.d));
        float s = 0.0f;
        for (int q = 0; q < p.l; q++) s += expf(ld(x, base + (u64)q * p.d) - m);
        float inv = 1.0f / s;
        for (int q = 0; q < p.l; q++) st(y, base + (u64)q * p.d, expf(ld(x, base + (u64)q * p.d) - m) * inv);
    }
}
EXPORT_F32_BF16(softmax_fwd, (const T* x, T* y, SoftmaxParams p), (x, y, p))

template <typename T>
__device__ void softmax_bwd(const T* y, const T* dy, T* dx, SoftmaxParams p) {
    FOR_EACH(i, (u64)p.b * p.d) {
        u64 b = i / p.d;
        int d = (int)(i % p.d);
        const u64 base = b * p.l * p.d + d;
        float s = 0.0f;
        for (int q = 0; q < p.l; q++) s += ld(y, base + (u64)q * p.d) * ld(dy, base + (u64)q * p.d);
        for (int q = 0; q < p.l; q++) {
            u64 j = base + (u64)q * p.d;
            st(dx, j, ld(dx, j) + ld(y, j) * (ld(dy, j) - s));
        }
    }
}
EXPORT_F32_BF16(softmax_bwd, (const T* y, const T* dy, T* dx, SoftmaxParams p), (y, dy, dx, p))

struct AlignParams {
    int b;
    int l;
    int d;
    float scale;
    float eps;
};

// y = softmax over positions of x / max(||x_row||, eps) / scale. grid (B), block 256.
// The normalized logits go through y itself: each column is later read by the thread that owns it,
// after a block barrier.
template <typename T>
__device__ void align_fwd(const T* x, T* y, AlignParams p) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    u64 base = (u64)blockIdx.x * p.l * p.d;
    for (int q = warp; q < p.l; q += nw) {
        u64 o = base + (u64)q * p.d;
        float s = 0.0f;
        for (int j = lane; j < p.d; j += WARP) {
            float v = ld(x, o + j);
            s += v * v;
        }
        float inv = 1.0f / (fmaxf(sqrtf(warp_sum(s)), p.eps) * p.scale);
        for (int j = lane; j < p.d; j += WARP) st(y, o + j, ld(x, o + j) * inv);
    }
    __syncthreads();
    for (int d = threadIdx.x; d < p.d; d += blockDim.x) {
        u64 o = base + d;
        float m = -F32_INF;
        for (int q = 0; q < p.l; q++) m = fmaxf(m, ld(y, o + (u64)q * p.d));
        float s = 0.0f;
        for (int q = 0; q < p.l; q++) s += expf(ld(y, o + (u64)q * p.d) - m);
        float inv = 1.0f / s;
        for (int q = 0; q < p.l; q++) {
            u64 j = o + (u64)q * p.d;
            st(y, j, expf(ld(y, j) - m) * inv);
        }
    }
}
EXPORT_F32_BF16(align_fwd, (const T* x, T* y, AlignParams p), (x, y, p))

// dx += d(l2norm)/dx of the softmax backward; `da` (f32, B*L*D) is scratch for the gradient at the
// normalized logits. grid (B), block 256.
template <typename T>
__device__ void align_bwd(const T* x, const T* y, const T* dy, float* da, T* dx, AlignParams p) {
    int lane = threadIdx.x % WARP, warp = threadIdx.x / WARP, nw = blockDim.x / WARP;
    u64 base = (u64)blockIdx.x * p.l * p.d;
    for (int d = threadIdx.x; d < p.d; d += blockDim.x) {
        u64 o = base + d;
        float s = 0.0f;
        for (int q = 0; q < p.l; q++) s += ld(y, o + (u64)q * p.d) * ld(dy, o + (u64)q * p.d);
        for (int q = 0; q < p.l; q++) {
            u64 j = o + (u64)q * p.d;
            da[j] = ld(y, j) * (ld(dy, j) - s);
        }
    }
    __syncthreads();
    for (int q = warp; q < p.l; q += nw) {
        u64 o = base + (u64)q * p.d;
        float ss = 0.0f, xd = 0.0f;
        for (int j = lane; j < p.d; j += WARP) {
            float v = ld(x, o + j);
            ss += v * v;
            xd += v * da[o + j];
        }
        float n = sqrtf(warp_sum(ss));
        xd = warp_sum(xd);
        if (n > p.eps) {
            float inv = 1.0f / n, ud = xd * inv;
            for (int j = lane; j < p.d; j += WARP) {
                float u = ld(x, o + j) * inv;
                st(dx, o + j, ld(dx, o + j) + (da[o + j] - u * ud) * inv / p.scale);
            }
        } else {
            for (int j = lane; j < p.d; j += WARP) st(dx, o + j, ld(dx, o + j) + da[o + j] / (p.eps * p.scale));
        }
    }
}
EXPORT_F32_BF16(align_bwd, (const T* x, const T* y, const T* dy, float* da, T* dx, AlignParams p),
                (x, y, dy, da, dx, p))
