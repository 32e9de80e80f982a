// Batch norm over rows, per channel (src/ops/batchnorm.rs has the math). x is (rows, C), NHWC maps
// seen as rows; rows split into consecutive statistics groups of group_rows (ghost BN).
//
// Statistics are two-pass (mean, then the mean of squared deviations) for accuracy at millions of
// rows, and deterministic: each block sums a fixed chunk of rows for 32 channels, threads over rows
// in a fixed stride, the block's 8 row-lanes combined in order; a second kernel sums the chunks of
// a group in order. No atomics.
//
// Forward (train):  bn_stats_partial (sum x) -> bn_finalize_mean -> bn_stats_partial (sum (x-mean)^2)
//                   -> bn_finalize_var (rstd, running stats of group 0) -> bn_apply
// SyncBN (world > 1): the two passes run over this rank's rows (world 1: its own mean, then
// the deviations about it and their squares, folded by bn_sum_chunks), the ranks' moments are
// all-gathered (NCCL, by the caller) and bn_merge_ranks merges them, read by bn_finalize_var as one chunk; backward
// all-reduces bn_bwd_finalize's sums before bn_bwd_apply. Counts are group_rows * world.
// Forward (eval):   bn_eval_stats (mean, rstd from the running stats) -> bn_apply
// bn_apply fuses the residual add and the ReLU: y = relu(gamma * (x - mean) * rstd + beta + res).
// Backward:         bn_bwd_partial (sum dy', sum dy' * xhat) -> bn_bwd_finalize (dgamma, dbeta)
//                   -> bn_bwd_apply (dx, and dres for the fused residual)
// where dy' = dy * [y > 0] when the ReLU was fused (y the saved output), dy otherwise.
#include "common.cuh"

struct BnParams {
    int rows;
    int c;
    int group_rows;
    float eps;
    float momentum;
    int world;  // ranks whose rows the statistics cover (SyncBN); 1 otherwise
};

// Values each group's statistics are taken over: its rows on every rank.
__device__ __forceinline__ float bn_count(const BnParams& p) { return (float)(p.group_rows * p.world); }

#define BN_TX 32
#define BN_TY 8

// Rows [r0, r1) of chunk k of group g.
__device__ __forceinline__ void bn_chunk(const BnParams& p, int chunks, int g, int k, int* r0, int* r1) {
    int per = (p.group_rows + chunks - 1) / chunks;
    int start = g * p.group_rows + k * per;
    int end = (g + 1) * p.group_rows;
    *r0 = start;
    *r1 = min(start + per, end);
}

// grid (ceil(C/32), G*chunks), block (32, 8). partial[(g*chunks + k) * C + c] = sum over the chunk
// of x (mean == null) or (x - mean[g, c])^2; `dev` (when not null, with `mean`) likewise receives
// the sums of x - mean[g, c] (SyncBN's correction of a rank's rounded mean).
template <typename T>
__device__ void bn_stats_partial(const T* x, BnParams p, int chunks, const float* mean, float* partial,
                                 float* dev) {
    __shared__ float sh[BN_TY][BN_TX + 1];
    __shared__ float sd[BN_TY][BN_TX + 1];
    int c = blockIdx.x * BN_TX + threadIdx.x;
    int g = blockIdx.y / chunks, k = blockIdx.y % chunks;
    int r0, r1;
    bn_chunk(p, chunks, g, k, &r0, &r1);
    float acc = 0.0f, accd = 0.0f;
    if (c < p.c) {
        float m = mean ? mean[g * p.c + c] : 0.0f;
        for (int r = r0 + threadIdx.y; r < r1; r += BN_TY) {
            float v = ld(x, (u64)r * p.c + c) - m;
            acc += mean ? v * v : v;
            accd += v;
        }
    }
    sh[threadIdx.y][threadIdx.x] = acc;
    sd[threadIdx.y][threadIdx.x] = accd;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        float s = 0.0f, d = 0.0f;
        for (int j = 0; j < BN_TY; j++) {
            s += sh[j][threadIdx.x];
            d += sd[j][threadIdx.x];
        }
        partial[(u64)blockIdx.y * p.c + c] = s;
        if (dev && mean) dev[(u64)blockIdx.y * p.c + c] = d;
    }
}
EXPORT_F32_BF16(bn_stats_partial, (const T* x, BnParams p, int chunks, const float* mean, float* partial, float* dev),
                (x, p, chunks, mean, partial, dev))

// The chunks' partial sums of element i = (group, channel), added in order.
__device__ __forceinline__ float bn_chunk_sum(const float* partial, const BnParams& p, int chunks, int i) {
    int g = i / p.c, c = i % p.c;
    float s = 0.0f;
    for (int k = 0; k < chunks; k++) s += partial[(u64)(g * chunks + k) * p.c + c];
    return s;
}

// One thread per (group, channel): mean = sum of the chunks in order / count.
extern "C" __global__ void bn_finalize_mean(const float* partial, BnParams p, int chunks, float* mean) {
    FOR_EACH(i, p.rows / p.group_rows * p.c) mean[i] = bn_chunk_sum(partial, p, chunks, i) / bn_count(p);
}

// SyncBN: sums[g, c] = the chunks' sums (the finalize kernels' first half), a rank's share of the
// statistics before they are gathered.
extern "C" __global__ void bn_sum_chunks(const float* partial, BnParams p, int chunks, float* sums) {
    FOR_EACH(i, p.rows / p.group_rows * p.c) sums[i] = bn_chunk_sum(partial, p, chunks, i);
}

// SyncBN: the ranks' gathered moments, each over group_rows rows: per rank (a (C), d (C), q (C)),
// its rounded mean a, the sums of x - a and of (x - a)^2. Merged in rank order in double: each
// rank's mean m = a + d / n and squared deviations about it q - d^2 / n (the corrected two-pass
// form, so that the rounding of a enters to second order only), then mean = the average of the
// m, m2 = the sum of (q - d^2 / n) + n * (m - mean)^2 (the CPU's merge_moments).
extern "C" __global__ void bn_merge_ranks(const float* all, BnParams p, float* mean, float* m2) {
    FOR_EACH(c, p.c) {
        double n = (double)p.group_rows, s = 0.0, q = 0.0;
        for (int r = 0; r < p.world; r++) {
            const float* part = all + (u64)r * 3 * p.c;
            s += (double)part[c] + (double)part[p.c + c] / n;
        }
        double mu = s / p.world;
        for (int r = 0; r < p.world; r++) {
            const float* part = all + (u64)r * 3 * p.c;
            double d = (double)part[p.c + c], m = (double)part[c] + d / n - mu;
            q += (double)part[2 * p.c + c] - d * d / n + n * m * m;
        }
        mean[c] = (float)mu;
        m2[c] = (float)q;
    }
}

// rstd = 1 / sqrt(var_b + eps); group 0 updates the running stats (unbiased variance), when given.
extern "C" __global__ void bn_finalize_var(const float* partial, BnParams p, int chunks, const float* mean,
                                           float* rstd, float* running_mean, float* running_var) {
    FOR_EACH(i, p.rows / p.group_rows * p.c) {
        int g = i / p.c, c = i % p.c;
        float var = bn_chunk_sum(partial, p, chunks, i) / bn_count(p);
        rstd[i] = 1.0f / sqrtf(var + p.eps);
        if (running_mean && g == 0) {
            float m = bn_count(p);
            running_mean[c] = (1.0f - p.momentum) * running_mean[c] + p.momentum * mean[i];
            running_var[c] = (1.0f - p.momentum) * running_var[c] + p.momentum * var * m / (m - 1.0f);
        }
    }
}

// Eval mode: the saved (1, C) statistics come from the running ones.
extern "C" __global__ void bn_eval_stats(const float* running_mean, const float* running_var, BnParams p,
                                         float* mean, float* rstd) {
    FOR_EACH(c, p.c) {
        mean[c] = running_mean[c];
        rstd[c] = 1.0f / sqrtf(running_var[c] + p.eps);
    }
}

template <typename T>
__device__ void bn_apply(const T* x, BnParams p, const float* mean, const float* rstd, const float* gamma,
                         const float* beta, const T* res, int relu, T* y) {
    FOR_EACH(i, (u64)p.rows * p.c) {
        int c = (int)(i % p.c);
        int g = (int)(i / p.c) / p.group_rows;
        int gc = g * p.c + c;
        float v = gamma[c] * (ld(x, i) - mean[gc]) * rstd[gc] + beta[c];
        if (res) v += ld(res, i);
        if (relu) v = fmaxf(v, 0.0f);
        st(y, i, v);
    }
}
EXPORT_F32_BF16(bn_apply,
                (const T* x, BnParams p, const float* mean, const float* rstd, const float* gamma,
                 const float* beta, const T* res, int relu, T* y),
                (x, p, mean, rstd, gamma, beta, res, relu, y))

// grid (ceil(C/32), G*chunks), block (32, 8). partial[((g*chunks + k) * 2 + 0) * C + c] = sum dy',
// [.. + 1] = sum dy' * xhat over the chunk.
template <typename T>
__device__ void bn_bwd_partial(const T* x, const T* dy, const T* y, BnParams p, int chunks, const float* mean,
                               const float* rstd, float* partial) {
    __shared__ float sa[BN_TY][BN_TX + 1];
    __shared__ float sb[BN_TY][BN_TX + 1];
    int c = blockIdx.x * BN_TX + threadIdx.x;
    int g = blockIdx.y / chunks, k = blockIdx.y % chunks;
    int r0, r1;
    bn_chunk(p, chunks, g, k, &r0, &r1);
    float a = 0.0f, b = 0.0f;
    if (c < p.c) {
        float m = mean[g * p.c + c], rs = rstd[g * p.c + c];
        for (int r = r0 + threadIdx.y; r < r1; r += BN_TY) {
            u64 i = (u64)r * p.c + c;
            float d = ld(dy, i);
            if (y && !(ld(y, i) > 0.0f)) d = 0.0f;
            a += d;
            b += d * (ld(x, i) - m) * rs;
        }
    }
    sa[threadIdx.y][threadIdx.x] = a;
    sb[threadIdx.y][threadIdx.x] = b;
    __syncthreads();
    if (threadIdx.y == 0 && c < p.c) {
        float s = 0.0f, t = 0.0f;
        for (int j = 0; j < BN_TY; j++) {
            s += sa[j][threadIdx.x];
            t += sb[j][threadIdx.x];
        }
        partial[((u64)blockIdx.y * 2) * p.c + c] = s;
        partial[((u64)blockIdx.y * 2 + 1) * p.c + c] = t;
    }
}
EXPORT_F32_BF16(bn_bwd_partial,
                (const T* x, const T* dy, const T* y, BnParams p, int chunks, const float* mean,
                 const float* rstd, float* partial),
                (x, dy, y, p, chunks, mean, rstd, partial))

// One thread per channel: the group sums gsum[(g*2 + {0,1}) * C + c] and dgamma += sum_g sum dy'*xhat,
// dbeta += sum_g sum dy', groups in order.
extern "C" __global__ void bn_bwd_finalize(const float* partial, BnParams p, int chunks, float* gsum,
                                           float* dgamma, float* dbeta) {
    int groups = p.rows / p.group_rows;
    FOR_EACH(c, p.c) {
        float tg = 0.0f, tb = 0.0f;
        for (int g = 0; g < groups; g++) {
            float s = 0.0f, t = 0.0f;
            for (int k = 0; k < chunks; k++) {
                u64 j = (u64)(g * chunks + k) * 2;
                s += partial[j * p.c + c];
                t += partial[(j + 1) * p.c + c];
            }
            gsum[(u64)(g * 2) * p.c + c] = s;
            gsum[(u64)(g * 2 + 1) * p.c + c] = t;
            tb += s;
            tg += t;
        }
        dgamma[c] += tg;
        dbeta[c] += tb;
    }
}

// dx += gamma * rstd * (dy' - mean(dy') - xhat * mean(dy' * xhat))   (train)
// dx += gamma * rstd * dy'                                          (eval)
// dres += dy' when the residual add was fused (dres != null).
template <typename T>
__device__ void bn_bwd_apply(const T* x, const T* dy, const T* y, BnParams p, const float* mean,
                             const float* rstd, const float* gamma, const float* gsum, int train, T* dx,
                             T* dres) {
    float inv_m = 1.0f / bn_count(p);
    FOR_EACH(i, (u64)p.rows * p.c) {
        int c = (int)(i % p.c);
        int g = (int)(i / p.c) / p.group_rows;
        int gc = g * p.c + c;
        float d = ld(dy, i);
        if (y && !(ld(y, i) > 0.0f)) d = 0.0f;
        if (dres) st(dres, i, ld(dres, i) + d);
        float rs = rstd[gc];
        float v;
        if (train) {
            float xhat = (ld(x, i) - mean[gc]) * rs;
            float sdy = gsum[(u64)(g * 2) * p.c + c], sdx = gsum[(u64)(g * 2 + 1) * p.c + c];
            v = gamma[c] * rs * (d - sdy * inv_m - xhat * sdx * inv_m);
        } else {
            v = gamma[c] * rs * d;
        }
        st(dx, i, ld(dx, i) + v);
    }
}
EXPORT_F32_BF16(bn_bwd_apply,
                (const T* x, const T* dy, const T* y, BnParams p, const float* mean, const float* rstd,
                 const float* gamma, const float* gsum, int train, T* dx, T* dres),
                (x, dy, y, p, mean, rstd, gamma, gsum, train, dx, dres))
