// Softmax cross-entropy of K classifier heads side by side (src/ops/xent.rs), with each head's bias:
//   z[r, k, j] = logits[r, k*O + j] + bias[k*O + j]
//   lse[r, k] = log sum_j exp(z[r, k, j]);  ce[r, k] = lse[r, k] - z[r, k, label_r]
//   per_head[k] = sum_r ce[r, k] / R;  out[0] = sum_k per_head[k]
//   dlogits[r, k*O + j] += dout * (exp(z - lse) - [j == label_r]) / R;  dbias[k*O + j] += its sum over r
// xent_rows: a block per (row, head) writes lse and ce; xent_reduce: one block sums them in a fixed
// order; xent_bwd: a block per (row, head); xent_bias_bwd: a thread per column sums its rows in order.
// Labels come as floats (exact below 2^24); a label outside [0, O) makes that row's ce NaN.
#include "common.cuh"

struct XentParams {
    int rows;
    int classes;
    int heads;
};

// z[r, k, j] of one block's (row, head), for logits in the compute dtype.
template <typename T>
__device__ __forceinline__ float xent_z(const T* logits, const float* bias, XentParams p, int r, int k, int j) {
    int col = k * p.classes + j;
    return ld(logits, (u64)r * p.heads * p.classes + col) + bias[col];
}

template <typename T>
__device__ void xent_rows(const T* logits, const float* bias, const float* labels, XentParams p, float* lse,
                          float* ce) {
    __shared__ float scratch[32];
    for (int b = blockIdx.x; b < p.rows * p.heads; b += gridDim.x) {
        int r = b / p.heads, k = b % p.heads;
        float m = -F32_INF;
        for (int j = threadIdx.x; j < p.classes; j += blockDim.x) m = fmaxf(m, xent_z(logits, bias, p, r, k, j));
        m = block_max(m, scratch);
        float s = 0.0f;
        for (int j = threadIdx.x; j < p.classes; j += blockDim.x) s += expf(xent_z(logits, bias, p, r, k, j) - m);
        s = block_sum(s, scratch);
        if (threadIdx.x == 0) {
            float l = m + logf(s);
            int y = (int)labels[r];
            lse[b] = l;
            ce[b] = (y >= 0 && y < p.classes && (float)y == labels[r]) ? l - xent_z(logits, bias, p, r, k, y)
                                                                        : __int_as_float(0x7fc00000);
        }
    }
}
EXPORT_F32_BF16(xent_rows,
                (const T* logits, const float* bias, const float* labels, XentParams p, float* lse, float* ce),
                (logits, bias, labels, p, lse, ce))

// One block, a warp per head (heads in order, rows in a fixed order within each):
// per_head[k] = sum_r ce[r, k] / R; out[0] = sum_k per_head[k] in head order.
extern "C" __global__ void xent_reduce(const float* ce, XentParams p, float* per_head, float* out) {
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    for (int k = w; k < p.heads; k += nw) {
        float s = 0.0f;
        for (int r = lane; r < p.rows; r += WARP) s += ce[(u64)r * p.heads + k];
        s = warp_sum(s);
        if (lane == 0) per_head[k] = s / (float)p.rows;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        float t = 0.0f;
        for (int k = 0; k < p.heads; k++) t += per_head[k];
        out[0] = t;
    }
}

// The gradient of one (row, head, class), without the upstream factor.
template <typename T>
__device__ __forceinline__ float xent_g(const T* logits, const float* bias, const float* labels, const float* lse,
                                        XentParams p, int r, int k, int j) {
    float q = expf(xent_z(logits, bias, p, r, k, j) - lse[(u64)r * p.heads + k]);
    return (float)j == labels[r] ? q - 1.0f : q;
}

template <typename T>
__device__ void xent_bwd(const T* logits, const float* bias, const float* labels, const float* lse,
                         const float* dout, XentParams p, T* dlogits) {
    float f = dout[0] / (float)p.rows;
    for (int b = blockIdx.x; b < p.rows * p.heads; b += gridDim.x) {
        int r = b / p.heads, k = b % p.heads;
        for (int j = threadIdx.x; j < p.classes; j += blockDim.x) {
            u64 i = (u64)r * p.heads * p.classes + k * p.classes + j;
            st(dlogits, i, ld(dlogits, i) + f * xent_g(logits, bias, labels, lse, p, r, k, j));
        }
    }
}
EXPORT_F32_BF16(xent_bwd,
                (const T* logits, const float* bias, const float* labels, const float* lse, const float* dout,
                 XentParams p, T* dlogits),
                (logits, bias, labels, lse, dout, p, dlogits))

template <typename T>
__device__ void xent_bias_bwd(const T* logits, const float* bias, const float* labels, const float* lse,
                              const float* dout, XentParams p, float* dbias) {
    float f = dout[0] / (float)p.rows;
    FOR_EACH(col, p.heads * p.classes) {
        int k = (int)col / p.classes, j = (int)col % p.classes;
        float s = 0.0f;
        for (int r = 0; r < p.rows; r++) s += xent_g(logits, bias, labels, lse, p, r, k, j);
        dbias[col] += f * s;
    }
}
EXPORT_F32_BF16(xent_bias_bwd,
                (const T* logits, const float* bias, const float* labels, const float* lse, const float* dout,
                 XentParams p, float* dbias),
                (logits, bias, labels, lse, dout, p, dbias))
