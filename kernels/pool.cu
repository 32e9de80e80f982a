// Pooling, NHWC (src/ops/pool.rs).
// maxpool: first maximum of the window in (ky, kx) order, padding -inf; the window-local index of the
// maximum is saved (one byte per output). Backward in gather form: each input sums dy over the outputs
// whose saved maximum it is, in (oh, ow) order, so no two threads write one element and no atomics.
// Global average pool: y[n, c] = mean over positions (summed in order); dx += dy / (H*W).
#include "common.cuh"

struct PoolParams {
    int n;
    int h_in;
    int w_in;
    int c;
    int h_out;
    int w_out;
    int k;
    int stride;
    int pad;
};

template <typename T>
__device__ void maxpool_fwd(const T* x, T* y, unsigned char* arg, PoolParams p) {
    FOR_EACH(i, (u64)p.n * p.h_out * p.w_out * p.c) {
        int c = (int)(i % p.c);
        u64 t = i / p.c;
        int ow = (int)(t % p.w_out);
        t /= p.w_out;
        int oh = (int)(t % p.h_out);
        int n = (int)(t / p.h_out);
        float best = -F32_INF;
        int bi = 0;
        for (int ky = 0; ky < p.k; ky++) {
            int ih = oh * p.stride - p.pad + ky;
            if (ih < 0 || ih >= p.h_in) continue;
            for (int kx = 0; kx < p.k; kx++) {
                int iw = ow * p.stride - p.pad + kx;
                if (iw < 0 || iw >= p.w_in) continue;
                float v = ld(x, (((u64)n * p.h_in + ih) * p.w_in + iw) * p.c + c);
                // NaN propagates (the last NaN of the window wins), as on the CPU and in PyTorch.
                if (v > best || isnan(v)) {
                    best = v;
                    bi = ky * p.k + kx;
                }
            }
        }
        st(y, i, best);
        arg[i] = (unsigned char)bi;
    }
}
EXPORT_F32_BF16(maxpool_fwd, (const T* x, T* y, unsigned char* arg, PoolParams p), (x, y, arg, p))

// First output index o with o * s - pad + k - 1 >= i, i.e. o >= (i + pad - k + 1) / s rounded up.
__device__ __forceinline__ int first_window(int i, const PoolParams& p) {
    int lo = i + p.pad - p.k + 1;
    return lo <= 0 ? 0 : (lo + p.stride - 1) / p.stride;
}

template <typename T>
__device__ void maxpool_bwd(const T* dy, const unsigned char* arg, T* dx, PoolParams p) {
    FOR_EACH(i, (u64)p.n * p.h_in * p.w_in * p.c) {
        int c = (int)(i % p.c);
        u64 t = i / p.c;
        int iw = (int)(t % p.w_in);
        t /= p.w_in;
        int ih = (int)(t % p.h_in);
        int n = (int)(t / p.h_in);
        int oh1 = min(p.h_out - 1, (ih + p.pad) / p.stride);
        int ow1 = min(p.w_out - 1, (iw + p.pad) / p.stride);
        float acc = 0.0f;
        for (int oh = first_window(ih, p); oh <= oh1; oh++) {
            int ky = ih - (oh * p.stride - p.pad);
            for (int ow = first_window(iw, p); ow <= ow1; ow++) {
                int kx = iw - (ow * p.stride - p.pad);
                u64 o = (((u64)n * p.h_out + oh) * p.w_out + ow) * p.c + c;
                if (arg[o] == ky * p.k + kx) acc += ld(dy, o);
            }
        }
        st(dx, i, ld(dx, i) + acc);
    }
}
EXPORT_F32_BF16(maxpool_bwd, (const T* dy, const unsigned char* arg, T* dx, PoolParams p), (dy, arg, dx, p))

// One thread per (n, c); neighbouring threads read neighbouring channels.
template <typename T>
__device__ void avgpool_fwd(const T* x, T* y, PoolParams p) {
    int hw = p.h_in * p.w_in;
    FOR_EACH(i, (u64)p.n * p.c) {
        int c = (int)(i % p.c);
        u64 n = i / p.c;
        float s = 0.0f;
        for (int q = 0; q < hw; q++) s += ld(x, (n * hw + q) * p.c + c);
        st(y, i, s / (float)hw);
    }
}
EXPORT_F32_BF16(avgpool_fwd, (const T* x, T* y, PoolParams p), (x, y, p))

template <typename T>
__device__ void avgpool_bwd(const T* dy, T* dx, PoolParams p) {
    int hw = p.h_in * p.w_in;
    FOR_EACH(i, (u64)p.n * hw * p.c) {
        int c = (int)(i % p.c);
        u64 n = i / ((u64)hw * p.c);
        st(dx, i, ld(dx, i) + ld(dy, n * p.c + c) / (float)hw);
    }
}
EXPORT_F32_BF16(avgpool_bwd, (const T* dy, T* dx, PoolParams p), (dy, dx, p))
