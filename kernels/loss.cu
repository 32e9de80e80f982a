// Normalized MSE between prediction and target rows (src/ops/loss.rs):
//   loss = 2 - (2 / N) * sum_i <P_i / max(|P_i|, eps), T_i / max(|T_i|, eps)>
//   dP_i += g * (-2 / N) * (t - p (p . t)) / n_i    (t / eps when |P_i| <= eps)
// loss_rows: a block per row writes its cosine; loss_reduce: one block sums them in a fixed order.
#include "common.cuh"

struct LossParams {
    int n;
    int d;
    float eps;
};

// Sums over row r of |P_r|^2, |T_r|^2 and P_r . T_r, returned to every thread of the block.
template <typename T>
__device__ void row_moments(const T* pred, const T* target, LossParams p, int r, float* scratch, float* pp,
                            float* tt, float* pt) {
    u64 o = (u64)r * p.d;
    float a2 = 0.0f, b2 = 0.0f, ab = 0.0f;
    for (int j = threadIdx.x; j < p.d; j += blockDim.x) {
        float a = ld(pred, o + j), b = ld(target, o + j);
        a2 += a * a;
        b2 += b * b;
        ab += a * b;
    }
    *pp = block_sum(a2, scratch);
    *tt = block_sum(b2, scratch);
    *pt = block_sum(ab, scratch);
}

template <typename T>
__device__ void loss_rows(const T* pred, const T* target, LossParams p, float* cosv) {
    __shared__ float scratch[32];
    for (int r = blockIdx.x; r < p.n; r += gridDim.x) {
        float pp, tt, pt;
        row_moments(pred, target, p, r, scratch, &pp, &tt, &pt);
        if (threadIdx.x == 0) cosv[r] = pt / (fmaxf(sqrtf(pp), p.eps) * fmaxf(sqrtf(tt), p.eps));
    }
}
EXPORT_F32_BF16(loss_rows, (const T* pred, const T* target, LossParams p, float* cosv), (pred, target, p, cosv))

// One block: out[0] = 2 - 2 * sum(cos) / N.
extern "C" __global__ void loss_reduce(const float* cosv, LossParams p, float* out) {
    __shared__ float scratch[32];
    float s = 0.0f;
    for (int i = threadIdx.x; i < p.n; i += blockDim.x) s += cosv[i];
    s = block_sum(s, scratch);
    if (threadIdx.x == 0) out[0] = 2.0f - 2.0f * s / (float)p.n;
}

// dloss is the upstream gradient of the scalar loss, on the device.
template <typename T>
__device__ void loss_bwd(const T* pred, const T* target, const float* dloss, LossParams p, T* dpred) {
    __shared__ float scratch[32];
    float g = dloss[0] * -2.0f / (float)p.n;
    for (int r = blockIdx.x; r < p.n; r += gridDim.x) {
        u64 o = (u64)r * p.d;
        float pp, tt, pt;
        row_moments(pred, target, p, r, scratch, &pp, &tt, &pt);
        float np = sqrtf(pp), inv_t = 1.0f / fmaxf(sqrtf(tt), p.eps);
        if (np > p.eps) {
            float inv_p = 1.0f / np;
            float c = pt * inv_p * inv_t;  // p . t
            for (int j = threadIdx.x; j < p.d; j += blockDim.x) {
                float t = ld(target, o + j) * inv_t, u = ld(pred, o + j) * inv_p;
                st(dpred, o + j, ld(dpred, o + j) + g * (t - u * c) * inv_p);
            }
        } else {
            for (int j = threadIdx.x; j < p.d; j += blockDim.x) {
                float t = ld(target, o + j) * inv_t;
                st(dpred, o + j, ld(dpred, o + j) + g * t / p.eps);
            }
        }
    }
}
EXPORT_F32_BF16(loss_bwd, (const T* pred, const T* target, const float* dloss, LossParams p, T* dpred),
                (pred, target, dloss, p, dpred))
