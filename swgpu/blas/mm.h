// A blocked f64 matrix product for the stand-ins:
//   C[j * ldc + i] += sum_{p < P} A[p * lda + i] * B[j * ldb + p]   for i < M, j < N,
// each element summed in increasing p (products rounded, then added, one at a time: no FMA, no
// reordering), so the result does not depend on the blocking, the vector width or the threads.
#pragma once

#include <vector>

#include "common.h"

namespace swb {

typedef double v4d __attribute__((vector_size(32), aligned(8)));

static inline v4d ld4(const double* p) {
    v4d v;
    memcpy(&v, p, sizeof v);
    return v;
}
static inline void st4(double* p, v4d v) { memcpy(p, &v, sizeof v); }

// One column group [j0, j1) of the product. The operands are copied block by block into contiguous
// panels first (A as strips of 8 rows, B as quads of columns, p-major), so the inner loop reads
// memory sequentially whatever the leading dimensions are.
__attribute__((target_clones("avx2", "default"))) inline void mm_columns(long M, long P, const double* A,
                                                                          long lda, const double* B, long ldb,
                                                                          double* C, long ldc, long j0, long j1) {
    const long PB = 256, IB = 128;
    std::vector<double> apan(size_t(PB) * IB), bpan(size_t(PB) * 4);
    for (long p0 = 0; p0 < P; p0 += PB) {
        long p1 = std::min(P, p0 + PB), np = p1 - p0;
        for (long i0 = 0; i0 < M; i0 += IB) {
            long i1 = std::min(M, i0 + IB);
            long strips = (i1 - i0) / 8, iv = i0 + strips * 8;  // rows [i0, iv) go through the panels
            for (long st = 0; st < strips; ++st)
                for (long p = p0; p < p1; ++p)
                    memcpy(&apan[(size_t(st) * np + size_t(p - p0)) * 8], A + p * lda + i0 + st * 8, 8 * sizeof(double));
            long j = j0;
            for (; j + 4 <= j1; j += 4) {
                for (long p = p0; p < p1; ++p)
                    for (int q = 0; q < 4; ++q) bpan[size_t(p - p0) * 4 + q] = B[(j + q) * ldb + p];
                double* c0 = C + j * ldc;
                double* c1 = c0 + ldc;
                double* c2 = c1 + ldc;
                double* c3 = c2 + ldc;
                for (long st = 0; st < strips; ++st) {
                    long i = i0 + st * 8;
                    v4d x00 = ld4(c0 + i), x01 = ld4(c0 + i + 4), x10 = ld4(c1 + i), x11 = ld4(c1 + i + 4);
                    v4d x20 = ld4(c2 + i), x21 = ld4(c2 + i + 4), x30 = ld4(c3 + i), x31 = ld4(c3 + i + 4);
                    const double* a = &apan[size_t(st) * np * 8];
                    const double* bq = bpan.data();
                    for (long p = 0; p < np; ++p, a += 8, bq += 4) {
                        v4d a0 = ld4(a), a1 = ld4(a + 4);
                        v4d q;
                        q = a0 * bq[0]; x00 += q;
                        q = a1 * bq[0]; x01 += q;
                        q = a0 * bq[1]; x10 += q;
                        q = a1 * bq[1]; x11 += q;
                        q = a0 * bq[2]; x20 += q;
                        q = a1 * bq[2]; x21 += q;
                        q = a0 * bq[3]; x30 += q;
                        q = a1 * bq[3]; x31 += q;
                    }
                    st4(c0 + i, x00); st4(c0 + i + 4, x01); st4(c1 + i, x10); st4(c1 + i + 4, x11);
                    st4(c2 + i, x20); st4(c2 + i + 4, x21); st4(c3 + i, x30); st4(c3 + i + 4, x31);
                }
                for (long i = iv; i < i1; ++i) {
                    double y0 = c0[i], y1 = c1[i], y2 = c2[i], y3 = c3[i];
                    for (long p = p0; p < p1; ++p) {
                        double av = A[p * lda + i];
                        const double* bq = &bpan[size_t(p - p0) * 4];
                        y0 += av * bq[0];
                        y1 += av * bq[1];
                        y2 += av * bq[2];
                        y3 += av * bq[3];
                    }
                    c0[i] = y0; c1[i] = y1; c2[i] = y2; c3[i] = y3;
                }
            }
            for (; j < j1; ++j) {
                const double* b = B + j * ldb;
                double* c = C + j * ldc;
                for (long i = i0; i < i1; ++i) {
                    double y = c[i];
                    for (long p = p0; p < p1; ++p) y += A[p * lda + i] * b[p];
                    c[i] = y;
                }
            }
        }
    }
}

// The whole product, split over column groups on threads when `parallel`.
inline void mm(long M, long N, long P, const double* A, long lda, const double* B, long ldb, double* C, long ldc,
               bool parallel = true) {
    if (M <= 0 || N <= 0 || P <= 0) return;
    const long JB = 32;
    long groups = (N + JB - 1) / JB;
    auto body = [&](long g) { mm_columns(M, P, A, lda, B, ldb, C, ldc, g * JB, std::min(N, (g + 1) * JB)); };
    if (parallel) parallel_for(groups, double(M) * N * P, body);
    else
        for (long g = 0; g < groups; ++g) body(g);
}

}  // namespace swb
