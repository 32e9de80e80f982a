// Tests of the cuBLAS and cuDNN stand-ins against small reference loops written here from the
// documented semantics, plus identities that do not depend on either: a hand-computed example, the
// adjoint identity <conv(x, w), dy> = <x, bwd_data(dy, w)> = <w, bwd_filter(x, dy)>, and the
// rejection statuses. Usage: test LIBDIR. Exits nonzero on any failure.
//
// This program exports swgpu_check_device_range itself (built with -rdynamic), over "device"
// allocations it makes, so the stand-ins' range checks are exercised too.

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <cmath>
#include <random>
#include <string>
#include <vector>

// ---- a tiny "device" allocator with the swgpu range check -----------------------------------

struct Alloc {
    char* p;
    size_t n;
};
static std::vector<Alloc> g_allocs;
static int g_range_failures = 0;

extern "C" __attribute__((visibility("default"))) int swgpu_check_device_range(const void* ptr, size_t bytes,
                                                                                const char* what) {
    const char* q = static_cast<const char*>(ptr);
    for (const Alloc& a : g_allocs)
        if (q >= a.p && q + bytes <= a.p + a.n) return 0;
    ++g_range_failures;
    fprintf(stderr, "  (expected in range tests) range check failed: %s [%p, +%zu)\n", what, ptr, bytes);
    return 1;
}

static void* dalloc(size_t bytes) {
    char* p = static_cast<char*>(malloc(bytes ? bytes : 1));
    memset(p, 0xff, bytes);  // NaN, as the libcuda stand-in fills new device memory
    g_allocs.push_back({p, bytes});
    return p;
}

static void dfree_all() {
    for (Alloc& a : g_allocs) free(a.p);
    g_allocs.clear();
}

// ---- test bookkeeping ------------------------------------------------------------------------

static int g_fail = 0, g_pass = 0;

#define CHECK(cond, ...)                                              \
    do {                                                              \
        if (cond) {                                                   \
            ++g_pass;                                                 \
        } else {                                                      \
            ++g_fail;                                                 \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__);     \
            fprintf(stderr, __VA_ARGS__);                             \
            fprintf(stderr, "\n");                                    \
        }                                                             \
    } while (0)

static std::mt19937_64 g_rng(12345);
static float urand() { return std::uniform_real_distribution<float>(-1.0f, 1.0f)(g_rng); }

// bf16 helpers, written independently of the libraries' own
static uint16_t to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    uint32_t r = u + 0x7fff + ((u >> 16) & 1);
    return uint16_t(r >> 16);
}
static float from_bf16(uint16_t h) {
    uint32_t u = uint32_t(h) << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}
static float tf32(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    u = (u + 0x1000) & 0xffffe000u;
    memcpy(&f, &u, 4);
    return f;
}

static void* g_blas;
static void* g_dnn;

template <class F>
static F sym(void* lib, const char* name) {
    void* s = dlsym(lib, name);
    if (!s) {
        fprintf(stderr, "missing symbol %s\n", name);
        exit(2);
    }
    return reinterpret_cast<F>(s);
}

// ============================================ cuBLAS ============================================

typedef int (*create_t)(void**);
typedef int (*destroy_t)(void*);
typedef int (*sgemm_t)(void*, int, int, int, int, int, const float*, const float*, int, const float*, int,
                       const float*, float*, int);
typedef int (*sgemm_sb_t)(void*, int, int, int, int, int, const float*, const float*, int, long long,
                          const float*, int, long long, const float*, float*, int, long long, int);
typedef int (*gemmex_t)(void*, int, int, int, int, int, const void*, const void*, int, int, const void*, int,
                        int, const void*, void*, int, int, int, int);
typedef int (*gemmex_sb_t)(void*, int, int, int, int, int, const void*, const void*, int, int, long long,
                           const void*, int, int, long long, const void*, void*, int, int, long long, int, int,
                           int);
typedef int (*setmath_t)(void*, int);
typedef int (*getmath_t)(void*, int*);
typedef int (*getprop_t)(int, int*);

enum { N_ = 0, T_ = 1, C_ = 2 };

// op(X)[i][j] for a column-major X with leading dimension ld.
static double opx(const float* x, int trans, int ld, int i, int j) {
    return trans == N_ ? x[i + (long)j * ld] : x[j + (long)i * ld];
}

static void test_cublas() {
    printf("cuBLAS\n");
    auto create = sym<create_t>(g_blas, "cublasCreate_v2");
    auto destroy = sym<destroy_t>(g_blas, "cublasDestroy_v2");
    auto sgemm = sym<sgemm_t>(g_blas, "cublasSgemm_v2");
    auto sgemm_sb = sym<sgemm_sb_t>(g_blas, "cublasSgemmStridedBatched");
    auto gemmex = sym<gemmex_t>(g_blas, "cublasGemmEx");
    auto gemmex_sb = sym<gemmex_sb_t>(g_blas, "cublasGemmStridedBatchedEx");
    auto setmath = sym<setmath_t>(g_blas, "cublasSetMathMode");
    auto getmath = sym<getmath_t>(g_blas, "cublasGetMathMode");
    auto getprop = sym<getprop_t>(g_blas, "cublasGetProperty");
    int v = -1;
    CHECK(getprop(0, &v) == 0 && v == 13, "cublasGetProperty major %d", v);

    void* h = nullptr;
    CHECK(create(&h) == 0 && h, "cublasCreate");
    int mode = -1;
    CHECK(getmath(h, &mode) == 0 && mode == 0, "default math mode %d", mode);

    // Hand-computed 2x2: A = [1 2; 3 4], B = [5 6; 7 8] (column-major storage below).
    // A*B = [19 22; 43 50]; with alpha 2, beta 1 and C = [1 1; 1 1]: [39 45; 87 101].
    {
        float* a = (float*)dalloc(16);
        float* b = (float*)dalloc(16);
        float* c = (float*)dalloc(16);
        const float av[4] = {1, 3, 2, 4}, bv[4] = {5, 7, 6, 8}, cv[4] = {1, 1, 1, 1};
        memcpy(a, av, 16);
        memcpy(b, bv, 16);
        memcpy(c, cv, 16);
        float al = 2, be = 1;
        CHECK(sgemm(h, N_, N_, 2, 2, 2, &al, a, 2, b, 2, &be, c, 2) == 0, "sgemm 2x2");
        CHECK(c[0] == 39 && c[1] == 87 && c[2] == 45 && c[3] == 101, "sgemm 2x2 got %g %g %g %g", c[0], c[1],
              c[2], c[3]);
        // A^T * B = [1 3; 2 4] * [5 6; 7 8] = [26 30; 38 44]; beta 0 over NaN.
        memset(c, 0xff, 16);
        be = 0;
        al = 1;
        CHECK(sgemm(h, T_, N_, 2, 2, 2, &al, a, 2, b, 2, &be, c, 2) == 0, "sgemm T 2x2");
        CHECK(c[0] == 26 && c[1] == 38 && c[2] == 30 && c[3] == 44, "sgemm T 2x2 got %g %g %g %g", c[0], c[1],
              c[2], c[3]);
    }

    // Random GEMMs over every op pair, with padded leading dimensions, alpha and beta.
    const int m = 5, n = 4, k = 3;
    for (int ta = 0; ta < 3; ++ta)
        for (int tb = 0; tb < 3; ++tb) {
            int arows = ta == N_ ? m : k, acols = ta == N_ ? k : m;
            int brows = tb == N_ ? k : n, bcols = tb == N_ ? n : k;
            int lda = arows + 2, ldb = brows + 1, ldc = m + 3;
            float* a = (float*)dalloc(sizeof(float) * lda * acols);
            float* b = (float*)dalloc(sizeof(float) * ldb * bcols);
            float* c = (float*)dalloc(sizeof(float) * ldc * n);
            for (int i = 0; i < lda * acols; ++i) a[i] = urand();
            for (int i = 0; i < ldb * bcols; ++i) b[i] = urand();
            for (int i = 0; i < ldc * n; ++i) c[i] = urand();
            std::vector<float> c0(c, c + ldc * n);
            float al = 1.5f, be = -0.5f;
            CHECK(sgemm(h, ta, tb, m, n, k, &al, a, lda, b, ldb, &be, c, ldc) == 0, "sgemm %d%d", ta, tb);
            double err = 0;
            for (int j = 0; j < n; ++j)
                for (int i = 0; i < ldc; ++i) {
                    double want;
                    if (i < m) {
                        double s = 0;
                        for (int p = 0; p < k; ++p) s += opx(a, ta, lda, i, p) * opx(b, tb, ldb, p, j);
                        want = al * s + be * c0[i + j * ldc];
                    } else {
                        want = c0[i + j * ldc];  // padding rows untouched
                    }
                    err = std::max(err, std::fabs(want - c[i + j * ldc]));
                }
            CHECK(err < 1e-6, "sgemm op %d/%d max error %g", ta, tb, err);
        }

    // Strided batched: batch 3 with gaps between the matrices; op(A) = A^T.
    {
        int batch = 3, lda = k + 1, ldb = k + 2, ldc = m + 1;
        long long sa = (long long)lda * m + 5, sb = (long long)ldb * n + 3, sc = (long long)ldc * n + 7;
        size_t na = size_t(sa * (batch - 1) + lda * m), nb = size_t(sb * (batch - 1) + ldb * n),
               nc = size_t(sc * (batch - 1) + ldc * n);
        float* a = (float*)dalloc(4 * na);
        float* b = (float*)dalloc(4 * nb);
        float* c = (float*)dalloc(4 * nc);
        for (size_t i = 0; i < na; ++i) a[i] = urand();
        for (size_t i = 0; i < nb; ++i) b[i] = urand();
        float al = 0.75f, be = 0.0f;
        CHECK(sgemm_sb(h, T_, N_, m, n, k, &al, a, lda, sa, b, ldb, sb, &be, c, ldc, sc, batch) == 0,
              "sgemm strided batched");
        double err = 0;
        bool gaps_nan = true;
        for (int bi = 0; bi < batch; ++bi)
            for (int j = 0; j < n; ++j)
                for (int i = 0; i < m; ++i) {
                    double s = 0;
                    for (int p = 0; p < k; ++p)
                        s += (double)a[bi * sa + p + i * lda] * b[bi * sb + p + j * ldb];
                    err = std::max(err, std::fabs(al * s - c[bi * sc + i + j * ldc]));
                }
        for (int bi = 0; bi < batch; ++bi)
            for (int j = 0; j < n; ++j) gaps_nan &= std::isnan(c[bi * sc + m + j * ldc]);
        CHECK(err < 1e-6, "strided batched max error %g", err);
        CHECK(gaps_nan, "strided batched wrote outside the matrices");
        // The same extent one element short: the range check fails, and so does the call.
        size_t exact = size_t(sa * (batch - 1) + (long long)(m - 1) * lda + k);  // last element read + 1
        float* a_exact = (float*)dalloc(4 * exact);
        memcpy(a_exact, a, 4 * exact);
        CHECK(sgemm_sb(h, T_, N_, m, n, k, &al, a_exact, lda, sa, b, ldb, sb, &be, c, ldc, sc, batch) == 0,
              "A of exactly the extent read");
        float* a_short = (float*)dalloc(4 * (exact - 1));
        memcpy(a_short, a, 4 * (exact - 1));
        int before = g_range_failures;
        int st = sgemm_sb(h, T_, N_, m, n, k, &al, a_short, lda, sa, b, ldb, sb, &be, c, ldc, sc, batch);
        CHECK(st == 13 && g_range_failures == before + 1, "short A: status %d (want EXECUTION_FAILED 13)", st);
    }

    // bf16 in, bf16 out, f32 compute (GemmEx), and bf16 in / f32 out (strided batched Ex).
    {
        int lda = m, ldb = k, ldc = m;
        uint16_t* a = (uint16_t*)dalloc(2 * m * k);
        uint16_t* b = (uint16_t*)dalloc(2 * k * n);
        uint16_t* c = (uint16_t*)dalloc(2 * m * n);
        float* cf = (float*)dalloc(4 * m * n);
        for (int i = 0; i < m * k; ++i) a[i] = to_bf16(urand());
        for (int i = 0; i < k * n; ++i) b[i] = to_bf16(urand());
        for (int i = 0; i < m * n; ++i) c[i] = to_bf16(urand());
        std::vector<uint16_t> c0(c, c + m * n);
        float al = 1.0f, be = 2.0f;
        CHECK(gemmex(h, N_, N_, m, n, k, &al, a, 14, lda, b, 14, ldb, &be, c, 14, ldc, 68, -1) == 0,
              "GemmEx bf16");
        float be0 = 0.0f;
        CHECK(gemmex_sb(h, N_, N_, m, n, k, &al, a, 14, lda, 0, b, 14, ldb, 0, &be0, cf, 0, ldc, 0, 1, 68, -1) == 0,
              "GemmStridedBatchedEx bf16 -> f32");
        double err16 = 0, err32 = 0;
        for (int j = 0; j < n; ++j)
            for (int i = 0; i < m; ++i) {
                double s = 0;
                for (int p = 0; p < k; ++p) s += (double)from_bf16(a[i + p * lda]) * from_bf16(b[p + j * ldb]);
                double want = s + be * from_bf16(c0[i + j * m]);
                err16 = std::max(err16, std::fabs(want - from_bf16(c[i + j * ldc])) / (std::fabs(want) + 1e-3));
                err32 = std::max(err32, std::fabs(s - cf[i + j * ldc]));
            }
        CHECK(err16 <= 1.0 / 256, "bf16 GEMM relative error %g (over one bf16 ulp)", err16);
        CHECK(err32 < 1e-6, "bf16 -> f32 GEMM error %g", err32);
        // Rejections of type combinations.
        int st = gemmex(h, N_, N_, m, n, k, &al, a, 14, lda, b, 14, ldb, &be, c, 14, ldc, 64, -1);
        CHECK(st == 15, "bf16 with 16F compute: status %d (want NOT_SUPPORTED 15)", st);
        st = gemmex(h, N_, N_, m, n, k, &al, a, 14, lda, b, 0, ldb, &be, c, 14, ldc, 68, -1);
        CHECK(st == 15, "mixed A/B types: status %d (want 15)", st);
        st = gemmex(h, N_, N_, m, n, k, &al, a, 14, lda, b, 14, ldb, &be, c, 2, ldc, 68, -1);
        CHECK(st == 15, "bf16 in, f16 out: status %d (want 15)", st);
        st = gemmex(h, N_, N_, m, n, k, &al, a, 14, lda, b, 14, ldb, &be, c, 14, ldc, 68, 50);
        CHECK(st == 15, "bad algo: status %d (want 15)", st);
    }

    // Argument validation.
    {
        float* a = (float*)dalloc(4 * 64);
        float* b = (float*)dalloc(4 * 64);
        float* c = (float*)dalloc(4 * 64);
        float al = 1, be = 0;
        int st = sgemm(h, N_, N_, 4, 4, 4, &al, a, 3, b, 4, &be, c, 4);
        CHECK(st == 7, "lda < m: status %d (want INVALID_VALUE 7)", st);
        st = sgemm(h, T_, N_, 4, 4, 3, &al, a, 2, b, 4, &be, c, 4);
        CHECK(st == 7, "lda < k for op T: status %d (want 7)", st);
        st = sgemm(h, N_, T_, 4, 4, 4, &al, a, 4, b, 3, &be, c, 4);
        CHECK(st == 7, "ldb < n for op T: status %d (want 7)", st);
        st = sgemm(h, N_, N_, 4, 4, 4, &al, a, 4, b, 4, &be, c, 3);
        CHECK(st == 7, "ldc < m: status %d (want 7)", st);
        st = sgemm(h, N_, N_, -1, 4, 4, &al, a, 4, b, 4, &be, c, 4);
        CHECK(st == 7, "m < 0: status %d (want 7)", st);
        st = sgemm(h, 5, N_, 4, 4, 4, &al, a, 4, b, 4, &be, c, 4);
        CHECK(st == 7, "bad op: status %d (want 7)", st);
        st = sgemm(nullptr, N_, N_, 4, 4, 4, &al, a, 4, b, 4, &be, c, 4);
        CHECK(st == 1, "null handle: status %d (want NOT_INITIALIZED 1)", st);
        st = sgemm_sb(h, N_, N_, 4, 4, 4, &al, a, 4, 0, b, 4, 0, &be, c, 4, 0, -1);
        CHECK(st == 7, "negative batch: status %d (want 7)", st);
    }

    // TF32: under CUBLAS_TF32_TENSOR_OP_MATH the f32 multiplicands are rounded to TF32.
    {
        const int kk = 64;
        float* a = (float*)dalloc(4 * kk);
        float* b = (float*)dalloc(4 * kk);
        float* c = (float*)dalloc(4);
        for (int i = 0; i < kk; ++i) {
            a[i] = 1.0f + urand() * 0.001f;
            b[i] = 1.0f + urand() * 0.001f;
        }
        double exact = 0, t = 0;
        for (int i = 0; i < kk; ++i) {
            exact += (double)a[i] * b[i];
            t += (double)tf32(a[i]) * tf32(b[i]);
        }
        float al = 1, be = 0;
        CHECK(setmath(h, 3) == 0, "set TF32 math");
        int got = -1;
        CHECK(getmath(h, &got) == 0 && got == 3, "get TF32 math %d", got);
        sgemm(h, N_, N_, 1, 1, kk, &al, a, 1, b, kk, &be, c, 1);
        float c_tf32 = c[0];
        CHECK(setmath(h, 0) == 0, "set default math");
        sgemm(h, N_, N_, 1, 1, kk, &al, a, 1, b, kk, &be, c, 1);
        float c_exact = c[0];
        CHECK(std::fabs(c_exact - exact) < 1e-5 && std::fabs(c_tf32 - t) < 1e-5 && c_tf32 != c_exact,
              "tf32 %.9g (want %.9g), exact %.9g (want %.9g)", c_tf32, t, c_exact, exact);
        CHECK(setmath(h, 77) == 7, "invalid math mode accepted");
    }
    CHECK(destroy(h) == 0, "cublasDestroy");
}

// ============================================ cuDNN =============================================

typedef size_t (*getver_t)(void);
typedef int (*dnn_getprop_t)(int, int*);
typedef int (*dcreate_t)(void**);
typedef int (*ddestroy_t)(void*);
typedef int (*set_t4_t)(void*, int, int, int, int, int, int);
typedef int (*set_f4_t)(void*, int, int, int, int, int, int);
typedef int (*set_c2_t)(void*, int, int, int, int, int, int, int, int);
typedef int (*set_int_t)(void*, int);
typedef int (*outdim_t)(void*, void*, void*, int*, int*, int*, int*);
typedef int (*find_t)(void*, void*, void*, void*, void*, int, int*, void*);
typedef int (*wsz_t)(void*, void*, void*, void*, void*, int, size_t*);
typedef int (*conv_t)(void*, const void*, void*, const void*, void*, const void*, void*, int, void*, size_t,
                      const void*, void*, void*);

struct Perf {
    int algo;
    int status;
    float time;
    size_t memory;
    int determinism;
    int mathType;
    int reserved[3];
};

struct Dnn {
    set_t4_t set_t4;
    set_f4_t set_f4;
    set_c2_t set_c2;
    set_int_t set_math, set_groups;
    dcreate_t ct, cf, cc;
    outdim_t outdim;
    find_t find_fwd, find_data, find_filter, get_fwd;
    wsz_t ws_fwd, ws_data, ws_filter;
    conv_t fwd, data, filter;
    void* h;
};

// A convolution test case: layout, filter format, geometry, dtype, mode.
struct Case {
    const char* name;
    bool nhwc;       // tensors NHWC (else NCHW)
    bool krsc;       // filter KRSC (else KCRS)
    int N, C, H, W, K, R, S, ph, pw, su, sv, dh, dw, G;
    bool conv_mode;  // CUDNN_CONVOLUTION (else cross-correlation)
    bool bf16;
    int math;        // cudnnMathType_t
};

static int out_dim(int in, int pad, int f, int dil, int st) { return (in + 2 * pad - ((f - 1) * dil + 1)) / st + 1; }

// Element offsets of logical indices, written from the layout definitions.
static size_t tix(const Case& c, int Cn, int Hn, int Wn, int n, int ch, int h, int w) {
    return c.nhwc ? (((size_t)n * Hn + h) * Wn + w) * Cn + ch : (((size_t)n * Cn + ch) * Hn + h) * Wn + w;
}
static size_t fix(const Case& c, int Cg, int k, int ch, int r, int s) {
    return c.krsc ? (((size_t)k * c.R + r) * c.S + s) * Cg + ch : (((size_t)k * Cg + ch) * c.R + r) * c.S + s;
}

struct Bufs {
    int OH, OW, Cg, Kg;
    size_t nx, nw, ny;
    std::vector<double> x, w, dy;  // logical values (already bf16-representable when bf16)
    void *dx_, *dw_, *dy_, *xd, *wd, *yd;  // device buffers
};

static double ref_fwd(const Case& c, const Bufs& b, int n, int k, int oh, int ow) {
    int g = k / b.Kg;
    double s = 0;
    for (int ch = 0; ch < b.Cg; ++ch)
        for (int r = 0; r < c.R; ++r)
            for (int q = 0; q < c.S; ++q) {
                int ih = oh * c.su - c.ph + r * c.dh, iw = ow * c.sv - c.pw + q * c.dw;
                if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
                int rr = c.conv_mode ? c.R - 1 - r : r, qq = c.conv_mode ? c.S - 1 - q : q;
                s += b.x[tix(c, c.C, c.H, c.W, n, g * b.Cg + ch, ih, iw)] * b.w[fix(c, b.Cg, k, ch, rr, qq)];
            }
    return s;
}

static void put(void* d, size_t i, double v, bool bf16) {
    if (bf16) ((uint16_t*)d)[i] = to_bf16(float(v));
    else ((float*)d)[i] = float(v);
}
static double get(const void* d, size_t i, bool bf16) {
    return bf16 ? from_bf16(((const uint16_t*)d)[i]) : ((const float*)d)[i];
}

struct Descs {
    void *x, *w, *y, *conv;
};

// Every descriptor the tests create, destroyed at the end: (kind, descriptor), kind 0 tensor,
// 1 filter, 2 convolution.
static std::vector<std::pair<int, void*>> g_descs;
static void* new_desc(Dnn& D, int kind) {
    void* d = nullptr;
    int st = kind == 0 ? D.ct(&d) : kind == 1 ? D.cf(&d) : D.cc(&d);
    CHECK(st == 0 && d, "create descriptor kind %d", kind);
    g_descs.push_back({kind, d});
    return d;
}

static Descs make_descs(Dnn& D, const Case& c, const Bufs& b) {
    Descs d;
    d.x = new_desc(D, 0);
    d.y = new_desc(D, 0);
    d.w = new_desc(D, 1);
    d.conv = new_desc(D, 2);
    int fmt = c.nhwc ? 1 : 0, dt = c.bf16 ? 9 : 0;
    int st = D.set_t4(d.x, fmt, dt, c.N, c.C, c.H, c.W);
    CHECK(st == 0, "%s: x descriptor %d", c.name, st);
    st = D.set_t4(d.y, fmt, dt, c.N, c.K, b.OH, b.OW);
    CHECK(st == 0, "%s: y descriptor %d", c.name, st);
    st = D.set_f4(d.w, dt, c.krsc ? 1 : 0, c.K, b.Cg, c.R, c.S);
    CHECK(st == 0, "%s: w descriptor %d", c.name, st);
    st = D.set_c2(d.conv, c.ph, c.pw, c.su, c.sv, c.dh, c.dw, c.conv_mode ? 0 : 1, 0);
    CHECK(st == 0, "%s: conv descriptor %d", c.name, st);
    CHECK(D.set_math(d.conv, c.math) == 0, "%s: math type", c.name);
    CHECK(D.set_groups(d.conv, c.G) == 0, "%s: groups", c.name);
    return d;
}

static void run_case(Dnn& D, const Case& c) {
    Bufs b;
    b.OH = out_dim(c.H, c.ph, c.R, c.dh, c.su);
    b.OW = out_dim(c.W, c.pw, c.S, c.dw, c.sv);
    b.Cg = c.C / c.G;
    b.Kg = c.K / c.G;
    b.nx = (size_t)c.N * c.C * c.H * c.W;
    b.nw = (size_t)c.K * b.Cg * c.R * c.S;
    b.ny = (size_t)c.N * c.K * b.OH * b.OW;
    size_t es = c.bf16 ? 2 : 4;
    auto fill = [&](std::vector<double>& v, size_t n) {
        v.resize(n);
        for (double& e : v) {
            float f = urand();
            e = c.bf16 ? from_bf16(to_bf16(f)) : f;
        }
    };
    fill(b.x, b.nx);
    fill(b.w, b.nw);
    fill(b.dy, b.ny);
    b.xd = dalloc(es * b.nx);
    b.wd = dalloc(es * b.nw);
    b.yd = dalloc(es * b.ny);
    b.dy_ = dalloc(es * b.ny);
    b.dx_ = dalloc(es * b.nx);
    b.dw_ = dalloc(es * b.nw);
    for (size_t i = 0; i < b.nx; ++i) put(b.xd, i, b.x[i], c.bf16);
    for (size_t i = 0; i < b.nw; ++i) put(b.wd, i, b.w[i], c.bf16);
    for (size_t i = 0; i < b.ny; ++i) put(b.dy_, i, b.dy[i], c.bf16);
    Descs d = make_descs(D, c, b);

    // Output dims from the library agree with ours.
    int on, oc, oh, ow;
    int st = D.outdim(d.conv, d.x, d.w, &on, &oc, &oh, &ow);
    CHECK(st == 0 && on == c.N && oc == c.K && oh == b.OH && ow == b.OW, "%s: output dim %d (%d %d %d %d)", c.name,
          st, on, oc, oh, ow);

    // The algorithm lists: determinism flags as documented, workspace sizes as queried.
    Perf pf[8], pd[8], pw[8];
    int nf = 0, nd = 0, nw = 0;
    CHECK(D.find_fwd(D.h, d.x, d.w, d.conv, d.y, 8, &nf, pf) == 0 && nf > 0, "%s: find fwd", c.name);
    CHECK(D.find_data(D.h, d.w, d.y, d.conv, d.x, 8, &nd, pd) == 0 && nd > 0, "%s: find data", c.name);
    CHECK(D.find_filter(D.h, d.x, d.y, d.conv, d.w, 8, &nw, pw) == 0 && nw > 0, "%s: find filter", c.name);
    for (int i = 0; i < nd; ++i)
        CHECK((pd[i].determinism == 0) == (pd[i].algo == 0), "%s: bwd data algo %d determinism %d", c.name,
              pd[i].algo, pd[i].determinism);
    for (int i = 0; i < nw; ++i)
        CHECK((pw[i].determinism == 0) == (pw[i].algo == 0 || pw[i].algo == 3), "%s: bwd filter algo %d determinism %d",
              c.name, pw[i].algo, pw[i].determinism);
    for (int i = 0; i < nf; ++i) CHECK(pf[i].mathType == c.math, "%s: perf math type", c.name);
    for (int i = 0; i < nf; ++i)
        if (pf[i].status == 0) {
            size_t ws = 1234567;
            CHECK(D.ws_fwd(D.h, d.x, d.w, d.conv, d.y, pf[i].algo, &ws) == 0 && ws == pf[i].memory,
                  "%s: fwd workspace of algo %d", c.name, pf[i].algo);
        }

    bool tf32_on = !c.bf16 && c.math != 3;
    double tol = c.bf16 ? 1.0 / 128 : tf32_on ? 2e-3 : 1e-5;  // relative to the output's scale

    // Forward through every successful algorithm, with alpha 0.7 and beta 0.3 over an initial y.
    for (int i = 0; i < nf; ++i) {
        if (pf[i].status != 0) continue;
        std::vector<double> y0(b.ny);
        for (size_t j = 0; j < b.ny; ++j) {
            y0[j] = c.bf16 ? from_bf16(to_bf16(urand())) : urand();
            put(b.yd, j, y0[j], c.bf16);
        }
        void* ws = pf[i].memory ? dalloc(pf[i].memory) : nullptr;
        float al = 0.7f, be = 0.3f;
        st = D.fwd(D.h, &al, d.x, b.xd, d.w, b.wd, d.conv, pf[i].algo, ws, pf[i].memory, &be, d.y, b.yd);
        CHECK(st == 0, "%s: forward algo %d status %d", c.name, pf[i].algo, st);
        double err = 0, scale = 1e-30;
        for (int n = 0; n < c.N; ++n)
            for (int k = 0; k < c.K; ++k)
                for (int y = 0; y < b.OH; ++y)
                    for (int x = 0; x < b.OW; ++x) {
                        size_t j = tix(c, c.K, b.OH, b.OW, n, k, y, x);
                        double want = 0.7 * ref_fwd(c, b, n, k, y, x) + 0.3 * y0[j];
                        scale = std::max(scale, std::fabs(want));
                        err = std::max(err, std::fabs(want - get(b.yd, j, c.bf16)));
                    }
        CHECK(err <= tol * scale, "%s: forward algo %d error %g (scale %g)", c.name, pf[i].algo, err, scale);
    }

    // Forward with beta 0 over NaN: no NaN comes through.
    {
        memset(b.yd, 0xff, es * b.ny);
        float al = 1.0f, be = 0.0f;
        void* ws = pf[0].memory ? dalloc(pf[0].memory) : nullptr;
        st = D.fwd(D.h, &al, d.x, b.xd, d.w, b.wd, d.conv, pf[0].algo, ws, pf[0].memory, &be, d.y, b.yd);
        bool nan = false;
        for (size_t j = 0; j < b.ny; ++j) nan |= std::isnan(get(b.yd, j, c.bf16));
        CHECK(st == 0 && !nan, "%s: beta 0 over NaN y (status %d, NaN %d)", c.name, st, int(nan));
    }
    std::vector<double> yv(b.ny);  // conv(x, w) exactly as the library returns it, alpha 1
    for (size_t j = 0; j < b.ny; ++j) yv[j] = get(b.yd, j, c.bf16);

    // Backward data / filter through every successful algorithm; check against reference loops
    // and the adjoint identity <conv(x,w), dy> = <x, dx> = <w, dw>.
    double ydy = 0;
    for (size_t j = 0; j < b.ny; ++j) ydy += yv[j] * b.dy[j];
    // reference dx and dw from the definition (scatter of the forward)
    std::vector<double> rdx(b.nx, 0.0), rdw(b.nw, 0.0);
    for (int n = 0; n < c.N; ++n)
        for (int k = 0; k < c.K; ++k)
            for (int y = 0; y < b.OH; ++y)
                for (int x = 0; x < b.OW; ++x) {
                    double g = b.dy[tix(c, c.K, b.OH, b.OW, n, k, y, x)];
                    int grp = k / b.Kg;
                    for (int ch = 0; ch < b.Cg; ++ch)
                        for (int r = 0; r < c.R; ++r)
                            for (int q = 0; q < c.S; ++q) {
                                int ih = y * c.su - c.ph + r * c.dh, iw = x * c.sv - c.pw + q * c.dw;
                                if (ih < 0 || ih >= c.H || iw < 0 || iw >= c.W) continue;
                                int rr = c.conv_mode ? c.R - 1 - r : r, qq = c.conv_mode ? c.S - 1 - q : q;
                                size_t xi = tix(c, c.C, c.H, c.W, n, grp * b.Cg + ch, ih, iw);
                                size_t wi = fix(c, b.Cg, k, ch, rr, qq);
                                rdx[xi] += g * b.w[wi];
                                rdw[wi] += g * b.x[xi];
                            }
                }
    double sx = 1e-30, sw = 1e-30;
    for (double v : rdx) sx = std::max(sx, std::fabs(v));
    for (double v : rdw) sw = std::max(sw, std::fabs(v));
    for (int i = 0; i < nd; ++i) {
        if (pd[i].status != 0) continue;
        std::vector<double> dx0(b.nx);
        for (size_t j = 0; j < b.nx; ++j) {
            dx0[j] = c.bf16 ? from_bf16(to_bf16(urand())) : urand();
            put(b.dx_, j, dx0[j], c.bf16);
        }
        void* ws = pd[i].memory ? dalloc(pd[i].memory) : nullptr;
        float al = 1.0f, be = 1.0f;  // accumulate, as lewel does
        st = D.data(D.h, &al, d.w, b.wd, d.y, b.dy_, d.conv, pd[i].algo, ws, pd[i].memory, &be, d.x, b.dx_);
        CHECK(st == 0, "%s: backward data algo %d status %d", c.name, pd[i].algo, st);
        double err = 0, xdx = 0;
        for (size_t j = 0; j < b.nx; ++j) {
            double got = get(b.dx_, j, c.bf16) - dx0[j];
            err = std::max(err, std::fabs(rdx[j] + dx0[j] - get(b.dx_, j, c.bf16)));
            xdx += b.x[j] * got;
        }
        CHECK(err <= tol * std::max(sx, 1.0), "%s: backward data algo %d error %g (scale %g)", c.name, pd[i].algo,
              err, sx);
        if (!c.bf16)
            CHECK(std::fabs(xdx - ydy) <= tol * 10 * (std::fabs(ydy) + 1.0), "%s: adjoint <x,dx> %.9g vs <y,dy> %.9g",
                  c.name, xdx, ydy);
    }
    for (int i = 0; i < nw; ++i) {
        if (pw[i].status != 0) continue;
        void* ws = pw[i].memory ? dalloc(pw[i].memory) : nullptr;
        memset(b.dw_, 0xff, es * b.nw);  // beta 0 over NaN
        float al = 1.0f, be = 0.0f;
        st = D.filter(D.h, &al, d.x, b.xd, d.y, b.dy_, d.conv, pw[i].algo, ws, pw[i].memory, &be, d.w, b.dw_);
        CHECK(st == 0, "%s: backward filter algo %d status %d", c.name, pw[i].algo, st);
        double err = 0, wdw = 0;
        for (size_t j = 0; j < b.nw; ++j) {
            double got = get(b.dw_, j, c.bf16);
            err = std::max(err, std::fabs(rdw[j] - got));
            wdw += b.w[j] * got;
        }
        CHECK(err <= tol * std::max(sw, 1.0), "%s: backward filter algo %d error %g (scale %g)", c.name, pw[i].algo,
              err, sw);
        if (!c.bf16)
            CHECK(std::fabs(wdw - ydy) <= tol * 10 * (std::fabs(ydy) + 1.0), "%s: adjoint <w,dw> %.9g vs <y,dy> %.9g",
                  c.name, wdw, ydy);
        // beta 1 accumulates onto what is there, as lewel's dw += ... does.
        std::vector<double> dw0(b.nw);
        for (size_t j = 0; j < b.nw; ++j) {
            dw0[j] = c.bf16 ? from_bf16(to_bf16(urand())) : urand();
            put(b.dw_, j, dw0[j], c.bf16);
        }
        be = 1.0f;
        st = D.filter(D.h, &al, d.x, b.xd, d.y, b.dy_, d.conv, pw[i].algo, ws, pw[i].memory, &be, d.w, b.dw_);
        double err1 = 0;
        for (size_t j = 0; j < b.nw; ++j) err1 = std::max(err1, std::fabs(rdw[j] + dw0[j] - get(b.dw_, j, c.bf16)));
        CHECK(st == 0 && err1 <= tol * std::max(sw, 1.0) + (c.bf16 ? 1.0 / 64 : 0.0),
              "%s: backward filter algo %d beta 1: status %d error %g", c.name, pw[i].algo, st, err1);
    }
}

static void test_cudnn() {
    printf("cuDNN\n");
    auto getver = sym<getver_t>(g_dnn, "cudnnGetVersion");
    auto getprop = sym<dnn_getprop_t>(g_dnn, "cudnnGetProperty");
    size_t ver = getver();
    int major = -1, minor = -1;
    getprop(0, &major);
    getprop(1, &minor);
    CHECK(ver >= 90201 && ver / 10000 == 9 && major == 9 && minor == int(ver / 100 % 100), "cudnn version %zu", ver);

    Dnn D;
    D.ct = sym<dcreate_t>(g_dnn, "cudnnCreateTensorDescriptor");
    D.cf = sym<dcreate_t>(g_dnn, "cudnnCreateFilterDescriptor");
    D.cc = sym<dcreate_t>(g_dnn, "cudnnCreateConvolutionDescriptor");
    D.set_t4 = sym<set_t4_t>(g_dnn, "cudnnSetTensor4dDescriptor");
    D.set_f4 = sym<set_f4_t>(g_dnn, "cudnnSetFilter4dDescriptor");
    D.set_c2 = sym<set_c2_t>(g_dnn, "cudnnSetConvolution2dDescriptor");
    D.set_math = sym<set_int_t>(g_dnn, "cudnnSetConvolutionMathType");
    D.set_groups = sym<set_int_t>(g_dnn, "cudnnSetConvolutionGroupCount");
    D.outdim = sym<outdim_t>(g_dnn, "cudnnGetConvolution2dForwardOutputDim");
    D.find_fwd = sym<find_t>(g_dnn, "cudnnFindConvolutionForwardAlgorithm");
    D.find_data = sym<find_t>(g_dnn, "cudnnFindConvolutionBackwardDataAlgorithm");
    D.find_filter = sym<find_t>(g_dnn, "cudnnFindConvolutionBackwardFilterAlgorithm");
    D.get_fwd = sym<find_t>(g_dnn, "cudnnGetConvolutionForwardAlgorithm_v7");
    D.ws_fwd = sym<wsz_t>(g_dnn, "cudnnGetConvolutionForwardWorkspaceSize");
    D.ws_data = sym<wsz_t>(g_dnn, "cudnnGetConvolutionBackwardDataWorkspaceSize");
    D.ws_filter = sym<wsz_t>(g_dnn, "cudnnGetConvolutionBackwardFilterWorkspaceSize");
    D.fwd = sym<conv_t>(g_dnn, "cudnnConvolutionForward");
    D.data = sym<conv_t>(g_dnn, "cudnnConvolutionBackwardData");
    D.filter = sym<conv_t>(g_dnn, "cudnnConvolutionBackwardFilter");
    auto create = sym<dcreate_t>(g_dnn, "cudnnCreate");
    auto destroy = sym<ddestroy_t>(g_dnn, "cudnnDestroy");
    CHECK(create(&D.h) == 0, "cudnnCreate");

    // Hand-computed 2x2 filter over a 3x3 image 1..9 (NCHW, KCRS), no padding:
    // cross-correlation with w = [1 2; 3 4] gives [37 47; 67 77]; convolution (mirrored w) gives
    // [23 33; 53 63].
    for (int mode = 0; mode < 2; ++mode) {
        Case c = {"hand", false, false, 1, 1, 3, 3, 1, 2, 2, 0, 0, 1, 1, 1, 1, 1, mode == 0, false, 3};
        Bufs b;
        b.OH = b.OW = 2;
        b.Cg = b.Kg = 1;
        Descs d = make_descs(D, c, b);
        float* x = (float*)dalloc(36);
        float* w = (float*)dalloc(16);
        float* y = (float*)dalloc(16);
        for (int i = 0; i < 9; ++i) x[i] = float(i + 1);
        for (int i = 0; i < 4; ++i) w[i] = float(i + 1);
        float al = 1, be = 0;
        int st = D.fwd(D.h, &al, d.x, x, d.w, w, d.conv, 0, nullptr, 0, &be, d.y, y);
        const float cc[4] = {37, 47, 67, 77}, cv[4] = {23, 33, 53, 63};
        const float* want = mode == 0 ? cv : cc;
        CHECK(st == 0 && y[0] == want[0] && y[1] == want[1] && y[2] == want[2] && y[3] == want[3],
              "hand 2x2 mode %d: status %d got %g %g %g %g", mode, st, y[0], y[1], y[2], y[3]);
        // Backward data of dy = [1 0; 0 0] puts w (mirrored per mode) at the top-left.
        float* dy = (float*)dalloc(16);
        float* dx = (float*)dalloc(36);
        const float dyv[4] = {1, 0, 0, 0};
        memcpy(dy, dyv, 16);
        st = D.data(D.h, &al, d.w, w, d.y, dy, d.conv, 1, dalloc(4096), 4096, &be, d.x, dx);
        bool ok = st == 0 && dx[2] == 0 && dx[5] == 0 && dx[8] == 0 && dx[6] == 0 && dx[7] == 0;
        if (mode == 1) ok &= dx[0] == 1 && dx[1] == 2 && dx[3] == 3 && dx[4] == 4;
        else ok &= dx[0] == 4 && dx[1] == 3 && dx[3] == 2 && dx[4] == 1;
        CHECK(ok, "hand 2x2 backward data mode %d: status %d", mode, st);
        // Backward filter with dy = 1 everywhere: dw[r][s] = sum of the 2x2 window sums.
        const float ones[4] = {1, 1, 1, 1};
        memcpy(dy, ones, 16);
        float* dw = (float*)dalloc(16);
        size_t need = 0;
        D.ws_filter(D.h, d.x, d.y, d.conv, d.w, 1, &need);
        st = D.filter(D.h, &al, d.x, x, d.y, dy, d.conv, 1, dalloc(need), need, &be, d.w, dw);
        // cross-correlation: dw = [1+2+4+5, 2+3+5+6; 4+5+7+8, 5+6+8+9] = [12 16; 24 28]
        const float fc[4] = {12, 16, 24, 28}, fv[4] = {28, 24, 16, 12};
        const float* wf = mode == 0 ? fv : fc;
        CHECK(st == 0 && dw[0] == wf[0] && dw[1] == wf[1] && dw[2] == wf[2] && dw[3] == wf[3],
              "hand 2x2 backward filter mode %d: status %d got %g %g %g %g", mode, st, dw[0], dw[1], dw[2], dw[3]);
    }

    // Random cases against the reference loops and the adjoint identity.
    const Case cases[] = {
        // name           nhwc   krsc   N  C  H  W  K  R  S ph pw su sv dh dw G  conv   bf16   math
        {"nchw-s2-p1",    false, false, 2, 3, 7, 6, 4, 3, 3, 1, 1, 2, 2, 1, 1, 1, false, false, 3},
        {"nhwc-dil2-p2",  true,  true,  2, 5, 8, 7, 3, 3, 2, 2, 1, 1, 2, 2, 2, 1, false, false, 3},
        {"nhwc-groups",   true,  true,  3, 4, 5, 5, 6, 3, 3, 1, 1, 1, 1, 1, 1, 2, false, false, 3},
        {"nchw-convmode", false, false, 2, 2, 6, 6, 3, 2, 3, 1, 0, 1, 2, 1, 1, 1, true,  false, 3},
        {"nhwc-convmode", true,  true,  2, 4, 5, 6, 6, 3, 2, 1, 1, 2, 1, 1, 2, 2, true,  false, 3},
        {"nhwc-1x1-s2",   true,  true,  4, 8, 6, 6, 16, 1, 1, 0, 0, 2, 2, 1, 1, 1, false, false, 3},
        {"nhwc-tf32",     true,  true,  2, 6, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, 0},
        {"nhwc-bf16",     true,  true,  2, 6, 6, 5, 4, 3, 3, 1, 1, 2, 1, 1, 1, 1, false, true,  1},
        {"nchw-bf16",     false, false, 2, 3, 5, 5, 2, 2, 2, 0, 1, 1, 1, 1, 1, 1, false, true,  1},
    };
    for (const Case& c : cases) run_case(D, c);

    // Rejections.
    {
        Case c = {"reject", true, true, 2, 4, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, 3};
        Bufs b;
        b.OH = b.OW = 6;
        b.Cg = b.Kg = 4;
        Descs d = make_descs(D, c, b);
        Perf p[8];
        int n = 0;
        size_t ws = 0;
        void* x = dalloc(4 * 2 * 4 * 36);
        void* w = dalloc(4 * 4 * 4 * 9);
        void* y = dalloc(4 * 2 * 4 * 36);
        float al = 1, be = 0;
        CHECK(D.find_fwd(D.h, d.x, d.w, d.conv, d.y, 8, &n, p) == 0, "reject: baseline is valid");
        // bf16 data with a bf16 compute type: NOT_SUPPORTED.
        Descs e = make_descs(D, {"bf16", true, true, 2, 4, 6, 6, 4, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, true, 1}, b);
        D.set_c2(e.conv, 1, 1, 1, 1, 1, 1, 1, 9);
        int st = D.find_fwd(D.h, e.x, e.w, e.conv, e.y, 8, &n, p);
        CHECK(st == 3000, "bf16 compute type: status %d (want NOT_SUPPORTED 3000)", st);
        st = D.fwd(D.h, &al, e.x, x, e.w, w, e.conv, 1, nullptr, 0, &be, e.y, y);
        CHECK(st == 3000, "bf16 compute type forward: status %d (want 3000)", st);
        // KCRS filter with NHWC activations: NOT_SUPPORTED.
        void* wk = new_desc(D, 1);
        D.set_f4(wk, 0, 0, 4, 4, 3, 3);
        st = D.ws_fwd(D.h, d.x, wk, d.conv, d.y, 0, &ws);
        CHECK(st == 3000, "KCRS filter with NHWC x: status %d (want 3000)", st);
        // Channel mismatch between x and w: BAD_PARAM.
        void* w3 = new_desc(D, 1);
        D.set_f4(w3, 0, 1, 4, 3, 3, 3);
        st = D.fwd(D.h, &al, d.x, x, w3, w, d.conv, 0, nullptr, 0, &be, d.y, y);
        CHECK(st == 2000, "channel mismatch: status %d (want BAD_PARAM 2000)", st);
        // Groups that do not divide: x C 4 = w C 4 * groups 2 fails.
        void* cg = new_desc(D, 2);
        D.set_c2(cg, 1, 1, 1, 1, 1, 1, 1, 0);
        D.set_groups(cg, 2);
        st = D.ws_fwd(D.h, d.x, d.w, cg, d.y, 0, &ws);
        CHECK(st == 2000, "groups mismatch: status %d (want 2000)", st);
        // y with the wrong spatial size: rejected.
        void* y5 = new_desc(D, 0);
        D.set_t4(y5, 1, 0, 2, 4, 5, 6);
        st = D.fwd(D.h, &al, d.x, x, d.w, w, d.conv, 0, nullptr, 0, &be, y5, y);
        CHECK(st == 2000, "wrong y dims: status %d (want 2000)", st);
        // x f32 and w bf16: BAD_PARAM.
        void* wb = new_desc(D, 1);
        D.set_f4(wb, 9, 1, 4, 4, 3, 3);
        st = D.fwd(D.h, &al, d.x, x, wb, w, d.conv, 0, nullptr, 0, &be, d.y, y);
        CHECK(st == 2000, "dtype mismatch: status %d (want 2000)", st);
        // Workspace smaller than the algorithm needs: BAD_PARAM.
        D.ws_fwd(D.h, d.x, d.w, d.conv, d.y, 1, &ws);
        CHECK(ws > 0, "precomp gemm has a workspace");
        st = D.fwd(D.h, &al, d.x, x, d.w, w, d.conv, 1, dalloc(ws - 1), ws - 1, &be, d.y, y);
        CHECK(st == 2000, "small workspace: status %d (want 2000)", st);
        // Algorithm outside the enum: BAD_PARAM; an unsupported one: NOT_SUPPORTED.
        st = D.fwd(D.h, &al, d.x, x, d.w, w, d.conv, 8, nullptr, 0, &be, d.y, y);
        CHECK(st == 2000, "algo 8: status %d (want 2000)", st);
        st = D.fwd(D.h, &al, d.x, x, d.w, w, d.conv, 4, nullptr, 0, &be, d.y, y);
        CHECK(st == 3000, "FFT algo: status %d (want 3000)", st);
        // Descriptor setters.
        void* cbad = new_desc(D, 2);
        CHECK(D.set_c2(cbad, 0, 0, 0, 1, 1, 1, 1, 0) == 2000, "stride 0 accepted");
        CHECK(D.set_c2(cbad, -1, 0, 1, 1, 1, 1, 1, 0) == 2000, "negative pad accepted");
        CHECK(D.set_c2(cbad, 0, 0, 1, 1, 0, 1, 1, 0) == 2000, "dilation 0 accepted");
        CHECK(D.set_groups(cbad, 0) == 2000, "groups 0 accepted");
        CHECK(D.set_math(cbad, 9) == 2000, "math type 9 accepted");
        void* tbad = new_desc(D, 0);
        CHECK(D.set_t4(tbad, 1, 0, 0, 4, 4, 4) == 2000, "n = 0 accepted");
        CHECK(D.set_t4(tbad, 7, 0, 1, 4, 4, 4) == 2000, "format 7 accepted");
        // A y buffer one element short: the range check fails the call.
        int before = g_range_failures;
        void* y_short = dalloc(4 * (2 * 4 * 36) - 4);
        st = D.fwd(D.h, &al, d.x, x, d.w, w, d.conv, 0, nullptr, 0, &be, d.y, y_short);
        CHECK(st == 5000 && g_range_failures == before + 1, "short y: status %d (want EXECUTION_FAILED 5000)", st);
    }

    // Non-deterministic algorithms change their summation order between calls; deterministic ones
    // are bitwise stable.
    {
        Case c = {"nondet", true, true, 4, 16, 8, 8, 8, 3, 3, 1, 1, 1, 1, 1, 1, 1, false, false, 3};
        Bufs b;
        b.OH = b.OW = 8;
        b.Cg = 16;
        b.Kg = 8;
        Descs d = make_descs(D, c, b);
        size_t nx = 4 * 16 * 64, nw = 8 * 16 * 9, ny = 4 * 8 * 64;
        float* x = (float*)dalloc(4 * nx);
        float* dy = (float*)dalloc(4 * ny);
        float* w = (float*)dalloc(4 * nw);
        for (size_t i = 0; i < nx; ++i) x[i] = urand();
        for (size_t i = 0; i < ny; ++i) dy[i] = urand();
        for (size_t i = 0; i < nw; ++i) w[i] = urand();
        float al = 1, be = 0;
        auto run_filter = [&](int algo) {
            size_t need = 0;
            D.ws_filter(D.h, d.x, d.y, d.conv, d.w, algo, &need);
            float* dw = (float*)dalloc(4 * nw);
            D.filter(D.h, &al, d.x, x, d.y, dy, d.conv, algo, need ? dalloc(need) : nullptr, need, &be, d.w, dw);
            return std::vector<float>(dw, dw + nw);
        };
        auto run_data = [&](int algo) {
            size_t need = 0;
            D.ws_data(D.h, d.w, d.y, d.conv, d.x, algo, &need);
            float* dx = (float*)dalloc(4 * nx);
            D.data(D.h, &al, d.w, w, d.y, dy, d.conv, algo, need ? dalloc(need) : nullptr, need, &be, d.x, dx);
            return std::vector<float>(dx, dx + nx);
        };
        bool differs0 = false, differs_d0 = false;
        std::vector<float> f0 = run_filter(0), d0 = run_data(0);
        for (int t = 0; t < 6 && !(differs0 && differs_d0); ++t) {
            differs0 |= run_filter(0) != f0;
            differs_d0 |= run_data(0) != d0;
        }
        CHECK(differs0, "backward filter ALGO_0 was bitwise stable over 7 calls");
        CHECK(differs_d0, "backward data ALGO_0 was bitwise stable over 7 calls");
        CHECK(run_filter(1) == run_filter(1), "backward filter ALGO_1 not bitwise stable");
        CHECK(run_data(1) == run_data(1), "backward data ALGO_1 not bitwise stable");
    }
    auto dt = sym<ddestroy_t>(g_dnn, "cudnnDestroyTensorDescriptor");
    auto df = sym<ddestroy_t>(g_dnn, "cudnnDestroyFilterDescriptor");
    auto dc = sym<ddestroy_t>(g_dnn, "cudnnDestroyConvolutionDescriptor");
    for (auto& kd : g_descs) {
        int st = kd.first == 0 ? dt(kd.second) : kd.first == 1 ? df(kd.second) : dc(kd.second);
        CHECK(st == 0, "destroy descriptor kind %d", kd.first);
    }
    g_descs.clear();
    CHECK(destroy(D.h) == 0, "cudnnDestroy");
}

int main(int argc, char** argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s LIBDIR\n", argv[0]);
        return 2;
    }
    setvbuf(stdout, nullptr, _IONBF, 0);
    std::string dir = argv[1];
    g_blas = dlopen((dir + "/libcublas.so.13").c_str(), RTLD_NOW | RTLD_LOCAL);
    g_dnn = dlopen((dir + "/libcudnn.so.9").c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!g_blas || !g_dnn) {
        fprintf(stderr, "cannot load the stand-ins from %s: %s\n", dir.c_str(), dlerror());
        return 2;
    }
    test_cublas();
    test_cudnn();
    dfree_all();
    printf("%d checks passed, %d failed\n", g_pass, g_fail);
    return g_fail ? 1 : 0;
}
