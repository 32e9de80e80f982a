// LARS and EMA/EMAN over the flat f32 buffers (src/optim.rs has the rules). The flat buffer is cut
// into chunks that never cross a tensor; a chunk table (tensor, start, length) built once on the host
// drives every launch. Updates run in f64 and round once, as the CPU reference does. NVRTC contracts
// a * b + c into one FMA unless told otherwise, which the CPU (src/optim.rs) never does: every f64
// operation of lars_trust, lars_update and ema_update is written with a `_rn` intrinsic, so each
// product and sum is rounded on its own and a step matches the CPU to the last bit where the norms
// do (the norms are float block sums, in another order than the CPU's f64 sums).
//   lars_norms:  a block per chunk: sum w^2 and sum g^2 of the chunk (fixed-order block reduction)
//   lars_trust:  a thread per tensor: sums its chunks in order; scale = lr (excluded) or lr * tau,
//                tau = eta |w| / (|g| + wd |w|) (0 when |w| = 0 or the denominator is 0)
//   lars_update: u = scale * (g + wd' w); buf = m buf + u; w -= buf   (wd' = 0 when excluded)
//   ema_update:  t = m t + (1 - m) o, over parameters (and BN running stats under EMAN)
//   nonfinite:   a block per chunk: 1 if one of its weights is NaN or infinite, + 2 if one of its
//                gradients is (the NaN guard reads these behind each step)
//   sgd_update:  d = g + wd w; buf = m buf + d; w -= lr buf  (PyTorch's SGD: the linear probe and
//                fine-tuning)
#include "common.cuh"

extern "C" __global__ void lars_norms(const float* w, const float* g, const int* chunk_len, const u64* chunk_start,
                                      float* partial) {
    __shared__ float scratch[32];
    u64 s = chunk_start[blockIdx.x];
    int n = chunk_len[blockIdx.x];
    float a = 0.0f, b = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        float wv = w[s + i], gv = g[s + i];
        a += wv * wv;
        b += gv * gv;
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    if (threadIdx.x == 0) {
        partial[2 * blockIdx.x] = a;
        partial[2 * blockIdx.x + 1] = b;
    }
}

// NaN or infinite: not within [-FLT_MAX, FLT_MAX] (comparisons with NaN are false).
__device__ __forceinline__ float not_finite(float v) { return fabsf(v) <= 3.402823466e38f ? 0.0f : 1.0f; }

extern "C" __global__ void nonfinite(const float* w, const float* g, const int* chunk_len, const u64* chunk_start,
                                     float* flags) {
    __shared__ float scratch[32];
    u64 s = chunk_start[blockIdx.x];
    int n = chunk_len[blockIdx.x];
    float a = 0.0f, b = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        a = fmaxf(a, not_finite(w[s + i]));
        b = fmaxf(b, not_finite(g[s + i]));
    }
    a = block_sum(a, scratch);
    b = block_sum(b, scratch);
    if (threadIdx.x == 0) flags[blockIdx.x] = (a > 0.0f ? 1.0f : 0.0f) + (b > 0.0f ? 2.0f : 0.0f);
}

extern "C" __global__ void lars_trust(const float* partial, const int* tensor_first_chunk, const int* tensor_chunks,
                                      const unsigned char* excluded, int tensors, double lr, double wd, double eta,
                                      double* scale, double* wdv) {
    FOR_EACH(t, tensors) {
        if (excluded[t]) {
            scale[t] = lr;
            wdv[t] = 0.0;
            continue;
        }
        double pn = 0.0, gn = 0.0;
        for (int j = tensor_first_chunk[t]; j < tensor_first_chunk[t] + tensor_chunks[t]; j++) {
            pn += (double)partial[2 * j];
            gn += (double)partial[2 * j + 1];
        }
        pn = sqrt(pn);
        gn = sqrt(gn);
        double denom = __dadd_rn(gn, __dmul_rn(wd, pn));
        double tau = (pn > 0.0 && denom > 0.0) ? __ddiv_rn(__dmul_rn(eta, pn), denom) : 0.0;
        scale[t] = __dmul_rn(lr, tau);
        wdv[t] = wd;
    }
}

extern "C" __global__ void lars_update(float* w, const float* g, float* buf, const int* chunk_tensor,
                                       const int* chunk_len, const u64* chunk_start, const double* scale,
                                       const double* wdv, double momentum) {
    int t = chunk_tensor[blockIdx.x];
    u64 s = chunk_start[blockIdx.x];
    int n = chunk_len[blockIdx.x];
    double sc = scale[t], wd = wdv[t];
    for (int i = threadIdx.x; i < n; i += blockDim.x) {
        u64 j = s + i;
        double u = __dmul_rn(sc, __dadd_rn((double)g[j], __dmul_rn(wd, (double)w[j])));
        double nb = __dadd_rn(__dmul_rn(momentum, (double)buf[j]), u);
        buf[j] = (float)nb;
        w[j] = (float)__dsub_rn((double)w[j], nb);
    }
}

extern "C" __global__ void ema_update(float* target, const float* online, u64 n, double m) {
    double r = __dsub_rn(1.0, m);
    FOR_EACH(i, n) target[i] = (float)__dadd_rn(__dmul_rn(m, (double)target[i]), __dmul_rn(r, (double)online[i]));
}

extern "C" __global__ void sgd_update(float* w, const float* g, float* buf, u64 n, double lr, double m, double wd) {
    FOR_EACH(i, n) {
        double d = __dadd_rn((double)g[i], __dmul_rn(wd, (double)w[i]));
        double nb = __dadd_rn(__dmul_rn(m, (double)buf[i]), d);
        buf[i] = (float)nb;
        w[i] = (float)__dsub_rn((double)w[i], __dmul_rn(lr, nb));
    }
}
