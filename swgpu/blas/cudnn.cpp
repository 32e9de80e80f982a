// libcudnn.so.9 stand-in for the software GPU: handles, tensor/filter/convolution descriptors, the
// algorithm queries and the three 2-D convolutions lewel makes (through cudarc 0.19.10 and
// src/ops/conv_find.rs), computed on the CPU from the descriptors with f64 accumulation.
// Device pointers are host addresses and every call completes before it returns (see swgpu.h).
//
// Numerics: f64 sums rounded once to the output type (through f32 for 16-bit data). With f32 data
// and a math type other than CUDNN_FMA_MATH the multiplicands are rounded to TF32 first, as tensor
// cores would (SWGPU_TF32=0 or NVIDIA_TF32_OVERRIDE=0 turn that off). The algorithms the real
// library documents as non-deterministic (backward-data ALGO_0, backward-filter ALGO_0 and ALGO_3)
// add f32 partial sums in an order that changes from call to call, so a bitwise rerun check sees
// them (SWGPU_NONDET=0 makes them deterministic; SWGPU_NONDET_SEED=n fixes the order sequence).
// SWGPU_CUDNN_LOG=1 prints each algorithm list and launch to stderr.

#include <atomic>
#include <random>

#include "mm.h"

using namespace swb;

namespace {

// cudnnStatus_t (the general codes)
enum {
    ST_SUCCESS = 0,
    ST_NOT_INITIALIZED = 1001,
    ST_BAD_PARAM = 2000,
    ST_INVALID_VALUE = 2001,
    ST_NOT_SUPPORTED = 3000,
    ST_INTERNAL_ERROR = 4000,
    ST_EXECUTION_FAILED = 5000,
};

// cudnnDataType_t
enum { DT_FLOAT = 0, DT_DOUBLE = 1, DT_HALF = 2, DT_INT8 = 3, DT_INT8x4 = 5, DT_UINT8x4 = 7,
       DT_INT8x32 = 8, DT_BFLOAT16 = 9, DT_LAST = 21 };
// cudnnTensorFormat_t
enum { FMT_NCHW = 0, FMT_NHWC = 1, FMT_NCHW_VECT_C = 2 };
// cudnnConvolutionMode_t
enum { MODE_CONVOLUTION = 0, MODE_CROSS_CORRELATION = 1 };
// cudnnMathType_t
enum { MATH_DEFAULT = 0, MATH_TENSOR_OP = 1, MATH_ALLOW_CONVERSION = 2, MATH_FMA = 3 };
// cudnnDeterminism_t
enum { NON_DETERMINISTIC = 0, DETERMINISTIC = 1 };

// Algorithm numbers.
enum { FWD_IMPLICIT_GEMM = 0, FWD_IMPLICIT_PRECOMP_GEMM = 1, FWD_GEMM = 2, FWD_DIRECT = 3,
       FWD_FFT = 4, FWD_FFT_TILING = 5, FWD_WINOGRAD = 6, FWD_WINOGRAD_NONFUSED = 7, FWD_COUNT = 8 };
enum { BWD_DATA_0 = 0, BWD_DATA_1 = 1, BWD_DATA_FFT = 2, BWD_DATA_FFT_TILING = 3,
       BWD_DATA_WINOGRAD = 4, BWD_DATA_WINOGRAD_NONFUSED = 5, BWD_DATA_COUNT = 6 };
enum { BWD_FILTER_0 = 0, BWD_FILTER_1 = 1, BWD_FILTER_FFT = 2, BWD_FILTER_3 = 3,
       BWD_FILTER_WINOGRAD = 4, BWD_FILTER_WINOGRAD_NONFUSED = 5, BWD_FILTER_FFT_TILING = 6,
       BWD_FILTER_COUNT = 7 };

const int DIM_MAX = 8;

const uint32_t MAGIC_HANDLE = 0xd1ac0001, MAGIC_TENSOR = 0xd1ac0002, MAGIC_FILTER = 0xd1ac0003,
               MAGIC_CONV = 0xd1ac0004;

struct Handle {
    uint32_t magic = MAGIC_HANDLE;
    void* stream = nullptr;
};

struct Tensor {
    uint32_t magic = MAGIC_TENSOR;
    bool set = false;
    int dtype = DT_FLOAT;
    int format = -1;  // the format it was set with, -1 when set by strides
    int nb = 0;
    int dims[DIM_MAX] = {};
    long long strides[DIM_MAX] = {};
};

struct Filter {
    uint32_t magic = MAGIC_FILTER;
    bool set = false;
    int dtype = DT_FLOAT;
    int format = FMT_NCHW;
    int nb = 0;
    int dims[DIM_MAX] = {};  // K, C, spatial...
};

struct Conv {
    uint32_t magic = MAGIC_CONV;
    bool set = false;
    int nspatial = 0;
    int pad[DIM_MAX] = {}, stride[DIM_MAX] = {}, dil[DIM_MAX] = {};
    int mode = MODE_CROSS_CORRELATION;
    int compute = DT_FLOAT;
    int math = MATH_DEFAULT;
    int groups = 1;
    int reorder = 0;
};

template <class T>
T* as(void* p, uint32_t magic) {
    T* t = static_cast<T*>(p);
    if (!t || t->magic != magic) return nullptr;
    return t;
}

Stats g_stats("cudnn");

bool log_on() {
    static int on = env_flag("SWGPU_CUDNN_LOG", false) ? 1 : 0;
    return on != 0;
}

bool dtype_valid(int d) { return d >= 0 && d <= DT_LAST; }

Elem elem_of(int d) {
    switch (d) {
        case DT_FLOAT: return E_F32;
        case DT_DOUBLE: return E_F64;
        case DT_HALF: return E_F16;
        case DT_BFLOAT16: return E_BF16;
        default: return E_BAD;
    }
}

const char* dtype_name(int d) {
    switch (d) {
        case DT_FLOAT: return "FLOAT";
        case DT_DOUBLE: return "DOUBLE";
        case DT_HALF: return "HALF";
        case DT_BFLOAT16: return "BFLOAT16";
        default: return "other";
    }
}

bool vect_type(int d) { return d == DT_INT8x4 || d == DT_UINT8x4 || d == DT_INT8x32; }

// Packed strides of a tensor of `nb` dims (N, C, spatial...) in NCHW or NHWC order.
void packed_strides(int format, int nb, const int* dims, long long* strides) {
    if (format == FMT_NHWC) {
        // C fastest, then the spatial dims from last to first, then N.
        long long s = 1;
        strides[1] = s;
        s *= dims[1];
        for (int i = nb - 1; i >= 2; --i) {
            strides[i] = s;
            s *= dims[i];
        }
        strides[0] = s;
    } else {
        long long s = 1;
        for (int i = nb - 1; i >= 0; --i) {
            strides[i] = s;
            s *= dims[i];
        }
    }
}

long long tensor_extent(const Tensor* t) {
    long long e = 1;
    for (int i = 0; i < t->nb; ++i) e += (long long)(t->dims[i] - 1) * t->strides[i];
    return e;
}

long long filter_elems(const Filter* f) {
    long long e = 1;
    for (int i = 0; i < f->nb; ++i) e *= f->dims[i];
    return e;
}

// ---- the convolution problem ----------------------------------------------------------------------

struct Problem {
    int N, C, H, W, K, R, S, OH, OW, G, Cg, Kg;
    int pad_h, pad_w, su, sv, dil_h, dil_w;
    bool flip;  // CUDNN_CONVOLUTION: the filter is applied mirrored
    long long xs[4], ys[4];  // element strides n, c, h, w
    long long ws[4];         // element strides k, c, r, s of the filter
    Elem e;
    int dtype, compute, math;
    bool tf32;
    long long x_extent, y_extent, w_elems;
};

bool channels_last(const Tensor* t) {
    // C has the smallest stride (as set with NHWC or equivalent strides).
    if (t->format >= 0) return t->format == FMT_NHWC;
    return t->strides[1] == 1 && t->dims[1] > 1;
}

// Validates x, w, conv and y together, as cudnnConvolutionForward and the queries do (the backward
// calls describe the same problem with dx/dy/dw in the same places).
int make_problem(void* xv, void* wv, void* cv, void* yv, Problem* p) {
    Tensor* x = as<Tensor>(xv, MAGIC_TENSOR);
    Tensor* y = as<Tensor>(yv, MAGIC_TENSOR);
    Filter* w = as<Filter>(wv, MAGIC_FILTER);
    Conv* c = as<Conv>(cv, MAGIC_CONV);
    if (!x || !y || !w || !c || !x->set || !y->set || !w->set || !c->set) return ST_BAD_PARAM;
    if (x->nb != y->nb || x->nb != w->nb) return ST_BAD_PARAM;
    if (x->nb < 3) return ST_BAD_PARAM;
    if (x->nb != c->nspatial + 2) return ST_BAD_PARAM;
    if (x->dtype != y->dtype || x->dtype != w->dtype) return ST_BAD_PARAM;
    if (x->nb != 4) return ST_NOT_SUPPORTED;  // the stand-in does 2-D convolutions only
    int groups = c->groups;
    if (x->dims[1] != w->dims[1] * groups) return ST_BAD_PARAM;
    if (w->dims[0] % groups != 0) return ST_BAD_PARAM;
    if (y->dims[1] % groups != 0) return ST_BAD_PARAM;
    for (int i = 0; i < 4; ++i)
        if (x->strides[i] < 0 || y->strides[i] < 0) return ST_NOT_SUPPORTED;
    // Supported (data, compute) pairs: FLOAT/FLOAT, DOUBLE/DOUBLE, HALF/HALF, HALF/FLOAT,
    // BFLOAT16/FLOAT.
    int d = x->dtype, ct = c->compute;
    bool cfg_ok = (d == DT_FLOAT && ct == DT_FLOAT) || (d == DT_DOUBLE && ct == DT_DOUBLE) ||
                  (d == DT_HALF && (ct == DT_HALF || ct == DT_FLOAT)) ||
                  (d == DT_BFLOAT16 && ct == DT_FLOAT);
    if (!cfg_ok) return ST_NOT_SUPPORTED;
    // A KRSC (NHWC) filter goes with channels-last activations and a KCRS (NCHW) filter with
    // channels-first ones.
    bool x_cl = channels_last(x);
    if (w->format == FMT_NHWC && !x_cl) return ST_NOT_SUPPORTED;
    if (w->format == FMT_NCHW && x_cl) return ST_NOT_SUPPORTED;
    if (w->format == FMT_NCHW_VECT_C) return ST_NOT_SUPPORTED;
    p->N = x->dims[0];
    p->C = x->dims[1];
    p->H = x->dims[2];
    p->W = x->dims[3];
    p->K = w->dims[0];
    p->R = w->dims[2];
    p->S = w->dims[3];
    p->G = groups;
    p->Cg = p->C / groups;
    p->Kg = p->K / groups;
    p->pad_h = c->pad[0];
    p->pad_w = c->pad[1];
    p->su = c->stride[0];
    p->sv = c->stride[1];
    p->dil_h = c->dil[0];
    p->dil_w = c->dil[1];
    long long eff_r = (long long)(p->R - 1) * p->dil_h + 1, eff_s = (long long)(p->S - 1) * p->dil_w + 1;
    long long ph = p->H + 2LL * p->pad_h, pw = p->W + 2LL * p->pad_w;
    if (eff_r > ph || eff_s > pw) return ST_BAD_PARAM;
    p->OH = int(1 + (ph - eff_r) / p->su);
    p->OW = int(1 + (pw - eff_s) / p->sv);
    if (y->dims[0] != p->N || y->dims[1] != p->K) return ST_BAD_PARAM;
    if (y->dims[2] != p->OH || y->dims[3] != p->OW) return ST_BAD_PARAM;
    p->flip = c->mode == MODE_CONVOLUTION;
    for (int i = 0; i < 4; ++i) {
        p->xs[i] = x->strides[i];
        p->ys[i] = y->strides[i];
    }
    if (w->format == FMT_NHWC) {
        // K, R, S, C in memory
        p->ws[1] = 1;
        p->ws[3] = p->Cg;
        p->ws[2] = (long long)p->Cg * p->S;
        p->ws[0] = (long long)p->Cg * p->S * p->R;
    } else {
        p->ws[3] = 1;
        p->ws[2] = p->S;
        p->ws[1] = (long long)p->S * p->R;
        p->ws[0] = (long long)p->S * p->R * p->Cg;
    }
    p->e = elem_of(d);
    p->dtype = d;
    p->compute = ct;
    p->math = c->math;
    p->tf32 = d == DT_FLOAT && c->math != MATH_FMA && tf32_emulation();
    p->x_extent = tensor_extent(x);
    p->y_extent = tensor_extent(y);
    p->w_elems = filter_elems(w);
    return ST_SUCCESS;
}

double macs(const Problem& p) {
    return double(p.N) * p.OH * p.OW * p.K * p.Cg * p.R * p.S;
}

// ---- algorithm tables -------------------------------------------------------------------------
// Each direction offers a few algorithms, fastest first (times are made up from the problem size),
// with workspace sizes and the determinism the real library documents.

struct Algo {
    int algo;
    int status;
    float ms;
    size_t ws;
    int det;
};

size_t esz(const Problem& p) { return elem_size(p.e); }

std::vector<Algo> fwd_algos(const Problem& p) {
    double t = macs(p) * 1e-9 + 0.01;
    size_t im2col = esz(p) * size_t(p.C) * p.R * p.S * p.OH * p.OW;
    return {
        {FWD_IMPLICIT_PRECOMP_GEMM, ST_SUCCESS, float(t * 1.0), 256 + 4 * size_t(p.Cg) * p.R * p.S, DETERMINISTIC},
        {FWD_IMPLICIT_GEMM, ST_SUCCESS, float(t * 1.3), 0, DETERMINISTIC},
        {FWD_GEMM, ST_SUCCESS, float(t * 1.6), im2col * size_t(p.N), DETERMINISTIC},
        {FWD_FFT, ST_NOT_SUPPORTED, -1.0f, 0, DETERMINISTIC},
    };
}

std::vector<Algo> bwd_data_algos(const Problem& p) {
    double t = macs(p) * 1e-9 + 0.01;
    return {
        {BWD_DATA_0, ST_SUCCESS, float(t * 1.0), 0, NON_DETERMINISTIC},
        {BWD_DATA_1, ST_SUCCESS, float(t * 1.2), 256 + 4 * size_t(p.Kg) * p.R * p.S, DETERMINISTIC},
        {BWD_DATA_WINOGRAD_NONFUSED, ST_NOT_SUPPORTED, -1.0f, 0, DETERMINISTIC},
    };
}

std::vector<Algo> bwd_filter_algos(const Problem& p) {
    double t = macs(p) * 1e-9 + 0.01;
    size_t im2col = esz(p) * size_t(p.C) * p.R * p.S * p.OH * p.OW;
    return {
        {BWD_FILTER_0, ST_SUCCESS, float(t * 1.0), 0, NON_DETERMINISTIC},
        {BWD_FILTER_3, ST_SUCCESS, float(t * 1.1), 4 * size_t(p.K) * p.Cg * p.R * p.S, NON_DETERMINISTIC},
        {BWD_FILTER_1, ST_SUCCESS, float(t * 1.4), im2col, DETERMINISTIC},
        {BWD_FILTER_FFT, ST_NOT_SUPPORTED, -1.0f, 0, DETERMINISTIC},
    };
}

// Finds `algo` in a table: ST_SUCCESS with *a set, NOT_SUPPORTED for an algorithm the table does
// not run, BAD_PARAM for a value outside the enum.
int lookup(const std::vector<Algo>& t, int algo, int count, Algo* a) {
    if (algo < 0 || algo >= count) return ST_BAD_PARAM;
    for (const Algo& x : t)
        if (x.algo == algo) {
            if (x.status != ST_SUCCESS) return x.status;
            *a = x;
            return ST_SUCCESS;
        }
    return ST_NOT_SUPPORTED;
}

// The perf structs of cudnnConvolution{Fwd,BwdData,BwdFilter}AlgoPerf_t share one layout.
struct Perf {
    int algo;
    int status;
    float time;
    size_t memory;
    int determinism;
    int mathType;
    int reserved[3];
};

const char* dir_name(int dir) { return dir == 0 ? "fwd" : dir == 1 ? "bwd-data" : "bwd-filter"; }

void log_problem(const char* what, const Problem& p) {
    fprintf(stderr,
            "swgpu cudnn %s: n %d c %d %dx%d -> k %d %dx%d, filter %dx%d pad %d,%d stride %d,%d dil %d,%d groups %d, %s, math %d%s\n",
            what, p.N, p.C, p.H, p.W, p.K, p.OH, p.OW, p.R, p.S, p.pad_h, p.pad_w, p.su, p.sv, p.dil_h,
            p.dil_w, p.G, dtype_name(p.dtype), p.math, p.tf32 ? " (tf32)" : "");
}

int fill_perf(int dir, const Problem& p, int requested, int* returned, void* out) {
    if (requested <= 0 || !returned || !out) return ST_BAD_PARAM;
    std::vector<Algo> t = dir == 0 ? fwd_algos(p) : dir == 1 ? bwd_data_algos(p) : bwd_filter_algos(p);
    int n = std::min<int>(requested, int(t.size()));
    Perf* o = static_cast<Perf*>(out);
    for (int i = 0; i < n; ++i) {
        Perf q;
        memset(&q, 0, sizeof q);
        q.algo = t[size_t(i)].algo;
        q.status = t[size_t(i)].status;
        q.time = t[size_t(i)].ms;
        q.memory = t[size_t(i)].ws;
        q.determinism = t[size_t(i)].det;
        q.mathType = p.math;
        o[i] = q;
    }
    *returned = n;
    if (log_on()) {
        log_problem(dir_name(dir), p);
        for (int i = 0; i < n; ++i)
            fprintf(stderr, "  algo %d status %d time %.4f ms workspace %zu %s math %d\n", o[i].algo,
                    o[i].status, double(o[i].time), o[i].memory,
                    o[i].determinism == DETERMINISTIC ? "deterministic" : "non-deterministic",
                    o[i].mathType);
    }
    return ST_SUCCESS;
}

// ---- non-deterministic summation order ------------------------------------------------------------

uint64_t splitmix(uint64_t& s) {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

bool nondet_on() {
    static int on = env_flag("SWGPU_NONDET", true) ? 1 : 0;
    return on != 0;
}

// A fresh seed per call: from SWGPU_NONDET_SEED when set, else from the system's entropy.
uint64_t next_seed() {
    static std::atomic<uint64_t> counter{0};
    static uint64_t base = [] {
        const char* s = getenv("SWGPU_NONDET_SEED");
        if (s && *s) return uint64_t(strtoull(s, nullptr, 10));
        std::random_device rd;
        return (uint64_t(rd()) << 32) ^ rd();
    }();
    uint64_t c = counter.fetch_add(1);
    uint64_t s = base ^ (c * 0x2545f4914f6cdd1dull);
    return splitmix(s);
}

// A permutation of [0, n) from `seed`.
std::vector<int> permutation(int n, uint64_t seed) {
    std::vector<int> v(static_cast<size_t>(n));
    for (int i = 0; i < n; ++i) v[size_t(i)] = i;
    for (int i = n - 1; i > 0; --i) {
        int j = int(splitmix(seed) % uint64_t(i + 1));
        std::swap(v[size_t(i)], v[size_t(j)]);
    }
    return v;
}

// Adds chunk partials (each rounded to f32, as f32 atomics would hold them) in the order `perm`.
double sum_f32_in_order(const double* parts, const std::vector<int>& perm) {
    float s = 0.0f;
    for (int i : perm) s += float(parts[i]);
    return double(s);
}

// ---- tensor canonicalization ----------------------------------------------------------------------

// x (n, c, h, w with strides xs) -> f64 [n][h][w][c].
std::vector<double> load_nhwc(const void* base, Elem e, const long long* st, int N, int C, int H, int W,
                              bool tf32) {
    std::vector<double> out(size_t(N) * H * W * C);
    for (int n = 0; n < N; ++n)
        for (int h = 0; h < H; ++h)
            for (int w = 0; w < W; ++w) {
                double* o = &out[((size_t(n) * H + h) * W + w) * C];
                long long off = n * st[0] + h * st[2] + w * st[3];
                for (int c = 0; c < C; ++c) {
                    double v = load_elem(base, size_t(off + c * st[1]), e);
                    if (tf32) v = double(round_tf32(float(v)));
                    o[c] = v;
                }
            }
    return out;
}

// Writes acc (f64 [n][h][w][c]) into a strided tensor as alpha * acc + beta * old.
void store_nhwc(void* base, Elem e, const long long* st, int N, int C, int H, int W, const double* acc,
                double alpha, double beta) {
    for (int n = 0; n < N; ++n)
        for (int h = 0; h < H; ++h)
            for (int w = 0; w < W; ++w) {
                const double* a = &acc[((size_t(n) * H + h) * W + w) * C];
                long long off = n * st[0] + h * st[2] + w * st[3];
                for (int c = 0; c < C; ++c) {
                    size_t i = size_t(off + c * st[1]);
                    double v = alpha * a[c];
                    if (beta != 0.0) v += beta * load_elem(base, i, e);
                    store_elem(base, i, e, v);
                }
            }
}

// The filter element (k, c, r, s) as used by the correlation: mirrored for CUDNN_CONVOLUTION.
double load_filter(const void* w, const Problem& p, int k, int c, int r, int s) {
    if (p.flip) {
        r = p.R - 1 - r;
        s = p.S - 1 - s;
    }
    size_t i = size_t(k * p.ws[0] + c * p.ws[1] + r * p.ws[2] + s * p.ws[3]);
    double v = load_elem(w, i, p.e);
    if (p.tf32) v = double(round_tf32(float(v)));
    return v;
}

// ---- the three convolutions -----------------------------------------------------------------------

// The three convolutions as matrix products (mm.h) over patches of the input ("im2col"), in
// chunks of output pixels so the patch buffers stay bounded. P = R * S * Cg is the patch length,
// ordered (r, s, c) with c fastest.

// Output pixels per chunk: about 4 M doubles of patches.
long pixel_chunk(long P) { return std::max(1L, (4L << 20) / std::max(1L, P)); }

// The filter of group g as f64 [k][p] (p = (r, s, c) fastest), mirrored under CUDNN_CONVOLUTION.
std::vector<double> filter_kp(const Problem& p, const void* w, int g) {
    long P = long(p.R) * p.S * p.Cg;
    std::vector<double> out(size_t(p.Kg) * P);
    if (!p.flip && p.ws[1] == 1 && p.ws[0] == P) {
        // KRSC: each output channel's P values are contiguous, in (r, s, c) order already.
        size_t base = size_t(g) * p.Kg * P, n = size_t(p.Kg) * P;
        for (size_t i = 0; i < n; ++i) {
            double v = load_elem(w, base + i, p.e);
            out[i] = p.tf32 ? double(round_tf32(float(v))) : v;
        }
        return out;
    }
    for (int k = 0; k < p.Kg; ++k)
        for (int r = 0; r < p.R; ++r)
            for (int s = 0; s < p.S; ++s)
                for (int c = 0; c < p.Cg; ++c)
                    out[size_t(k) * P + (size_t(r) * p.S + s) * p.Cg + c] = load_filter(w, p, g * p.Kg + k, c, r, s);
    return out;
}

// Input coordinates of tap (r, s) of output pixel (oh, ow); false when it falls in the padding.
inline bool tap(const Problem& p, int oh, int ow, int r, int s, int* ih, int* iw) {
    *ih = oh * p.su - p.pad_h + r * p.dil_h;
    *iw = ow * p.sv - p.pad_w + s * p.dil_w;
    return *ih >= 0 && *ih < p.H && *iw >= 0 && *iw < p.W;
}

// Patches of output pixels [q0, q1) for group g: out[(q - q0) * P + p] (row-major), or with
// `transposed` out[p * (q1 - q0) + (q - q0)]. Taps in the padding are zero.
void patches(const Problem& p, const std::vector<double>& X, int g, long q0, long q1, bool transposed,
             double* out) {
    long P = long(p.R) * p.S * p.Cg, nq = q1 - q0;
    for (long q = q0; q < q1; ++q) {
        int n = int(q / (long(p.OH) * p.OW)), rem = int(q % (long(p.OH) * p.OW));
        int oh = rem / p.OW, ow = rem % p.OW;
        for (int r = 0; r < p.R; ++r)
            for (int s = 0; s < p.S; ++s) {
                int ih, iw;
                bool in = tap(p, oh, ow, r, s, &ih, &iw);
                const double* xi = in ? &X[((size_t(n) * p.H + ih) * p.W + iw) * p.C + size_t(g) * p.Cg] : nullptr;
                long base = (long(r) * p.S + s) * p.Cg;
                if (!transposed) {
                    double* o = out + (q - q0) * P + base;
                    for (int c = 0; c < p.Cg; ++c) o[c] = in ? xi[c] : 0.0;
                } else {
                    for (int c = 0; c < p.Cg; ++c) out[(base + c) * nq + (q - q0)] = in ? xi[c] : 0.0;
                }
            }
    }
}

// y[n,oh,ow,k] = sum_{r,s,c} x[n, oh*su - pad_h + r*dil_h, ow*sv - pad_w + s*dil_w, g*Cg + c]
//                * w[k, c, r, s], g = k / Kg; returned as f64 [n][oh][ow][k].
std::vector<double> forward_acc(const Problem& p, const void* x, const void* w) {
    std::vector<double> X = load_nhwc(x, p.e, p.xs, p.N, p.C, p.H, p.W, p.tf32);
    long P = long(p.R) * p.S * p.Cg, npix = long(p.N) * p.OH * p.OW, chunk = pixel_chunk(P);
    std::vector<double> Y(size_t(npix) * p.K, 0.0);
    std::vector<double> colT(size_t(std::min(chunk, npix)) * P), out(size_t(std::min(chunk, npix)) * p.Kg);
    for (int g = 0; g < p.G; ++g) {
        std::vector<double> Wkp = filter_kp(p, w, g);
        for (long q0 = 0; q0 < npix; q0 += chunk) {
            long q1 = std::min(npix, q0 + chunk), nq = q1 - q0;
            patches(p, X, g, q0, q1, true, colT.data());
            // out[k][q] = sum_p colT[p][q] * w[k][p]
            std::fill(out.begin(), out.begin() + nq * p.Kg, 0.0);
            mm(nq, p.Kg, P, colT.data(), nq, Wkp.data(), P, out.data(), nq);
            for (long q = 0; q < nq; ++q)
                for (int k = 0; k < p.Kg; ++k)
                    Y[size_t(q0 + q) * p.K + size_t(g) * p.Kg + k] = out[size_t(k) * nq + q];
        }
    }
    return Y;
}

// dx[n,ih,iw,g*Cg+c] = sum over the (output pixel, tap) pairs that read it of
// sum_k dy[n,oh,ow,g*Kg+k] * w[g*Kg+k, c, r, s]: a product into per-pixel patch gradients, then
// scattered back ("col2im") in pixel order. With `nondet`, k is split into blocks whose results are
// rounded to f32 and added in a per-call random order, as atomics would.
std::vector<double> backward_data_acc(const Problem& p, const void* dy, const void* w, bool nondet) {
    std::vector<double> DY = load_nhwc(dy, p.e, p.ys, p.N, p.K, p.OH, p.OW, p.tf32);
    long P = long(p.R) * p.S * p.Cg, npix = long(p.N) * p.OH * p.OW, chunk = pixel_chunk(P);
    int kblocks = nondet ? std::min(p.Kg, 4) : 1;
    size_t nx = size_t(p.N) * p.H * p.W * p.C;
    std::vector<double> DX(nx * size_t(kblocks), 0.0);
    std::vector<double> col(size_t(std::min(chunk, npix)) * P);
    for (int g = 0; g < p.G; ++g) {
        std::vector<double> Wkp = filter_kp(p, w, g);
        for (int b = 0; b < kblocks; ++b) {
            int k0 = p.Kg * b / kblocks, k1 = p.Kg * (b + 1) / kblocks;
            double* dxb = &DX[nx * size_t(b)];
            for (long q0 = 0; q0 < npix; q0 += chunk) {
                long q1 = std::min(npix, q0 + chunk);
                std::fill(col.begin(), col.begin() + (q1 - q0) * P, 0.0);
                mm(P, q1 - q0, k1 - k0, &Wkp[size_t(k0) * P], P, &DY[size_t(q0) * p.K + size_t(g) * p.Kg + k0], p.K,
                   col.data(), P);
                for (long q = q0; q < q1; ++q) {
                    int n = int(q / (long(p.OH) * p.OW)), rem = int(q % (long(p.OH) * p.OW));
                    int oh = rem / p.OW, ow = rem % p.OW;
                    for (int r = 0; r < p.R; ++r)
                        for (int s = 0; s < p.S; ++s) {
                            int ih, iw;
                            if (!tap(p, oh, ow, r, s, &ih, &iw)) continue;
                            double* o = dxb + ((size_t(n) * p.H + ih) * p.W + iw) * p.C + size_t(g) * p.Cg;
                            const double* cv = &col[size_t(q - q0) * P + (size_t(r) * p.S + s) * p.Cg];
                            for (int c = 0; c < p.Cg; ++c) o[c] += cv[c];
                        }
                }
            }
        }
    }
    if (kblocks > 1) {
        std::vector<int> perm = permutation(kblocks, next_seed());
        std::vector<double> parts(static_cast<size_t>(kblocks));
        for (size_t i = 0; i < nx; ++i) {
            for (int b = 0; b < kblocks; ++b) parts[size_t(b)] = DX[nx * size_t(b) + i];
            DX[i] = sum_f32_in_order(parts.data(), perm);
        }
        DX.resize(nx);
    }
    return DX;
}

// dw[k,c,r,s] = sum_{n,oh,ow} dy[n,oh,ow,k] * x[n, oh*su - pad_h + r*dil_h, ow*sv - pad_w + s*dil_w,
// g*Cg + c]; returned as f64 [k][r][s][c] (of the mirrored filter under CUDNN_CONVOLUTION). With
// `nondet`, the output pixels are split into up to 4 ranges whose partial sums are rounded to f32
// and added in a per-call random order.
std::vector<double> backward_filter_acc(const Problem& p, const void* x, const void* dy, bool nondet) {
    std::vector<double> X = load_nhwc(x, p.e, p.xs, p.N, p.C, p.H, p.W, p.tf32);
    long P = long(p.R) * p.S * p.Cg, npix = long(p.N) * p.OH * p.OW, chunk = pixel_chunk(P);
    // dy transposed to [k][pixel]
    std::vector<double> DYT(size_t(p.K) * npix);
    {
        std::vector<double> DY = load_nhwc(dy, p.e, p.ys, p.N, p.K, p.OH, p.OW, p.tf32);
        for (long q = 0; q < npix; ++q)
            for (int k = 0; k < p.K; ++k) DYT[size_t(k) * npix + q] = DY[size_t(q) * p.K + k];
    }
    int parts_n = nondet ? int(std::min<long>(npix, 4)) : 1;
    std::vector<int> perm = permutation(parts_n, nondet ? next_seed() : 0);
    // Output channels per pass: all of a group, or (non-deterministic) as many as keep the partial
    // sums near 4 M doubles.
    long kbn = nondet ? std::max(1L, std::min<long>(p.Kg, (4L << 20) / (long(parts_n) * P))) : p.Kg;
    std::vector<double> DW(size_t(p.K) * P, 0.0);
    std::vector<double> col(size_t(std::min(chunk, npix)) * P);
    std::vector<double> partial(nondet ? size_t(parts_n) * kbn * P : 0);
    std::vector<double> vals(static_cast<size_t>(parts_n));
    for (int g = 0; g < p.G; ++g)
        for (long k0 = 0; k0 < p.Kg; k0 += kbn) {
            long k1 = std::min<long>(p.Kg, k0 + kbn), kk = g * long(p.Kg) + k0;
            if (nondet) std::fill(partial.begin(), partial.end(), 0.0);
            for (int part = 0; part < parts_n; ++part) {
                long lo = npix * part / parts_n, hi = npix * (part + 1) / parts_n;
                double* C = nondet ? &partial[size_t(part) * kbn * P] : &DW[size_t(kk) * P];
                for (long q0 = lo; q0 < hi; q0 += chunk) {
                    long q1 = std::min(hi, q0 + chunk);
                    patches(p, X, g, q0, q1, false, col.data());
                    // C[k][p] += sum_q col[q][p] * dyT[k][q]
                    mm(P, k1 - k0, q1 - q0, col.data(), P, &DYT[size_t(kk) * npix + q0], npix, C, P);
                }
            }
            if (nondet)
                for (long k = 0; k < k1 - k0; ++k)
                    for (long q = 0; q < P; ++q) {
                        for (int t = 0; t < parts_n; ++t) vals[size_t(t)] = partial[(size_t(t) * kbn + k) * P + q];
                        DW[size_t(kk + k) * P + q] = sum_f32_in_order(vals.data(), perm);
                    }
        }
    return DW;
}

double read_scale(const void* s, const Problem& p) {
    if (p.dtype == DT_DOUBLE) return *static_cast<const double*>(s);
    return double(*static_cast<const float*>(s));
}

bool check_tensor(const void* ptr, const Problem& p, long long extent, const char* what) {
    return range_ok(ptr, size_t(extent) * elem_size(p.e), what);
}

// Common launch checks: pointers, the algorithm's support and workspace, device ranges.
int launch_checks(const Problem& p, const Algo& a, void* ws, size_t ws_bytes) {
    if (ws_bytes < a.ws) return ST_BAD_PARAM;
    if (a.ws > 0 && !ws) return ST_BAD_PARAM;
    if (ws && ws_bytes > 0) {
        if (!range_ok(ws, ws_bytes, "cudnn workspace")) return ST_EXECUTION_FAILED;
        // The algorithm owns its workspace during the call: leave it clobbered.
        memset(ws, 0xff, std::min(ws_bytes, a.ws));
    }
    (void)p;
    return ST_SUCCESS;
}

}  // namespace

// ---- library and handle ---------------------------------------------------------------------------

// Reported version: cuDNN 9.21.0 (CUDNN_VERSION = major * 10000 + minor * 100 + patch).
static const int VER_MAJOR = 9, VER_MINOR = 21, VER_PATCH = 0;

SWB_EXPORT size_t cudnnGetVersion(void) { return size_t(VER_MAJOR * 10000 + VER_MINOR * 100 + VER_PATCH); }
SWB_EXPORT size_t cudnnGetMaxDeviceVersion(void) { return 1200; }
SWB_EXPORT size_t cudnnGetCudartVersion(void) { return 13000; }

SWB_EXPORT int cudnnGetProperty(int type, int* value) {
    if (!value) return ST_BAD_PARAM;
    switch (type) {
        case 0: *value = VER_MAJOR; return ST_SUCCESS;
        case 1: *value = VER_MINOR; return ST_SUCCESS;
        case 2: *value = VER_PATCH; return ST_SUCCESS;
        default: return ST_BAD_PARAM;
    }
}

SWB_EXPORT int cudnnAdvVersionCheck(void) { return ST_SUCCESS; }
SWB_EXPORT int cudnnCnnVersionCheck(void) { return ST_SUCCESS; }
SWB_EXPORT int cudnnOpsVersionCheck(void) { return ST_SUCCESS; }
SWB_EXPORT int cudnnGraphVersionCheck(void) { return ST_SUCCESS; }

SWB_EXPORT const char* cudnnGetErrorString(int status) {
    switch (status) {
        case ST_SUCCESS: return "CUDNN_STATUS_SUCCESS";
        case ST_NOT_INITIALIZED: return "CUDNN_STATUS_NOT_INITIALIZED";
        case ST_BAD_PARAM: return "CUDNN_STATUS_BAD_PARAM";
        case ST_INVALID_VALUE: return "CUDNN_STATUS_INVALID_VALUE";
        case ST_NOT_SUPPORTED: return "CUDNN_STATUS_NOT_SUPPORTED";
        case ST_INTERNAL_ERROR: return "CUDNN_STATUS_INTERNAL_ERROR";
        case ST_EXECUTION_FAILED: return "CUDNN_STATUS_EXECUTION_FAILED";
        default: return "CUDNN_STATUS_UNKNOWN";
    }
}

SWB_EXPORT void cudnnGetLastErrorString(char* message, size_t max_size) {
    if (message && max_size > 0) message[0] = 0;
}

SWB_EXPORT int cudnnCreate(void** handle) {
    if (!handle) return ST_BAD_PARAM;
    *handle = new Handle();
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnDestroy(void* handle) {
    Handle* h = as<Handle>(handle, MAGIC_HANDLE);
    if (!h) return ST_BAD_PARAM;
    h->magic = 0;
    delete h;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnSetStream(void* handle, void* stream) {
    Handle* h = as<Handle>(handle, MAGIC_HANDLE);
    if (!h) return ST_BAD_PARAM;
    h->stream = stream;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetStream(void* handle, void** stream) {
    Handle* h = as<Handle>(handle, MAGIC_HANDLE);
    if (!h || !stream) return ST_BAD_PARAM;
    *stream = h->stream;
    return ST_SUCCESS;
}

// ---- tensor descriptors ---------------------------------------------------------------------------

SWB_EXPORT int cudnnCreateTensorDescriptor(void** d) {
    if (!d) return ST_BAD_PARAM;
    *d = new Tensor();
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnDestroyTensorDescriptor(void* d) {
    if (!d) return ST_SUCCESS;
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t) return ST_BAD_PARAM;
    t->magic = 0;
    delete t;
    return ST_SUCCESS;
}

static int set_tensor_strided(Tensor* t, int dtype, int nb, const int* dims, const long long* strides,
                              int format) {
    if (!dtype_valid(dtype)) return ST_BAD_PARAM;
    if (nb < 3 || nb > DIM_MAX) return ST_NOT_SUPPORTED;
    long long span = 1;
    for (int i = 0; i < nb; ++i) {
        if (dims[i] <= 0 || strides[i] < 0) return ST_BAD_PARAM;
        span += (long long)(dims[i] - 1) * strides[i];
    }
    if (span > (1LL << 31)) return ST_NOT_SUPPORTED;  // 2 Giga-elements at most
    t->dtype = dtype;
    t->nb = nb;
    for (int i = 0; i < nb; ++i) {
        t->dims[i] = dims[i];
        t->strides[i] = strides[i];
    }
    t->format = format;
    t->set = true;
    return ST_SUCCESS;
}

static int set_tensor_format(Tensor* t, int format, int dtype, int nb, const int* dims) {
    if (format != FMT_NCHW && format != FMT_NHWC && format != FMT_NCHW_VECT_C) return ST_BAD_PARAM;
    if (format == FMT_NCHW_VECT_C && !vect_type(dtype)) return ST_BAD_PARAM;
    if (nb < 3 || nb > DIM_MAX) return ST_NOT_SUPPORTED;
    for (int i = 0; i < nb; ++i)
        if (dims[i] <= 0) return ST_BAD_PARAM;
    long long strides[DIM_MAX];
    packed_strides(format == FMT_NHWC ? FMT_NHWC : FMT_NCHW, nb, dims, strides);
    return set_tensor_strided(t, dtype, nb, dims, strides, format);
}

SWB_EXPORT int cudnnSetTensor4dDescriptor(void* d, int format, int dtype, int n, int c, int h, int w) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t) return ST_BAD_PARAM;
    int dims[4] = {n, c, h, w};
    return set_tensor_format(t, format, dtype, 4, dims);
}

SWB_EXPORT int cudnnSetTensor4dDescriptorEx(void* d, int dtype, int n, int c, int h, int w, int ns, int cs,
                                            int hs, int ws) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t) return ST_BAD_PARAM;
    int dims[4] = {n, c, h, w};
    long long st[4] = {ns, cs, hs, ws};
    return set_tensor_strided(t, dtype, 4, dims, st, -1);
}

SWB_EXPORT int cudnnSetTensorNdDescriptor(void* d, int dtype, int nb, const int* dims, const int* strides) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t || !dims || !strides) return ST_BAD_PARAM;
    if (nb < 3 || nb > DIM_MAX) return ST_NOT_SUPPORTED;
    long long st[DIM_MAX];
    for (int i = 0; i < nb; ++i) st[i] = strides[i];
    return set_tensor_strided(t, dtype, nb, dims, st, -1);
}

SWB_EXPORT int cudnnSetTensorNdDescriptorEx(void* d, int format, int dtype, int nb, const int* dims) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t || !dims) return ST_BAD_PARAM;
    return set_tensor_format(t, format, dtype, nb, dims);
}

SWB_EXPORT int cudnnGetTensor4dDescriptor(void* d, int* dtype, int* n, int* c, int* h, int* w, int* ns,
                                          int* cs, int* hs, int* ws) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t || !t->set || t->nb != 4) return ST_BAD_PARAM;
    if (dtype) *dtype = t->dtype;
    int* outs[4] = {n, c, h, w};
    int* souts[4] = {ns, cs, hs, ws};
    for (int i = 0; i < 4; ++i) {
        if (outs[i]) *outs[i] = t->dims[i];
        if (souts[i]) *souts[i] = int(t->strides[i]);
    }
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetTensorNdDescriptor(void* d, int requested, int* dtype, int* nb, int* dims, int* strides) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t || !t->set || requested < 0) return ST_BAD_PARAM;
    if (dtype) *dtype = t->dtype;
    if (nb) *nb = t->nb;
    for (int i = 0; i < std::min(requested, t->nb); ++i) {
        if (dims) dims[i] = t->dims[i];
        if (strides) strides[i] = int(t->strides[i]);
    }
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetTensorSizeInBytes(void* d, size_t* size) {
    Tensor* t = as<Tensor>(d, MAGIC_TENSOR);
    if (!t || !t->set || !size) return ST_BAD_PARAM;
    Elem e = elem_of(t->dtype);
    size_t es = e == E_BAD ? 1 : elem_size(e);
    *size = size_t(tensor_extent(t)) * es;
    return ST_SUCCESS;
}

// ---- filter descriptors ---------------------------------------------------------------------------

SWB_EXPORT int cudnnCreateFilterDescriptor(void** d) {
    if (!d) return ST_BAD_PARAM;
    *d = new Filter();
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnDestroyFilterDescriptor(void* d) {
    if (!d) return ST_SUCCESS;
    Filter* f = as<Filter>(d, MAGIC_FILTER);
    if (!f) return ST_BAD_PARAM;
    f->magic = 0;
    delete f;
    return ST_SUCCESS;
}

static int set_filter(Filter* f, int dtype, int format, int nb, const int* dims) {
    if (!dtype_valid(dtype)) return ST_BAD_PARAM;
    if (format != FMT_NCHW && format != FMT_NHWC && format != FMT_NCHW_VECT_C) return ST_BAD_PARAM;
    if (format == FMT_NCHW_VECT_C && !vect_type(dtype)) return ST_BAD_PARAM;
    if (nb < 3 || nb > DIM_MAX) return ST_NOT_SUPPORTED;
    for (int i = 0; i < nb; ++i)
        if (dims[i] <= 0) return ST_BAD_PARAM;
    f->dtype = dtype;
    f->format = format;
    f->nb = nb;
    for (int i = 0; i < nb; ++i) f->dims[i] = dims[i];
    f->set = true;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnSetFilter4dDescriptor(void* d, int dtype, int format, int k, int c, int h, int w) {
    Filter* f = as<Filter>(d, MAGIC_FILTER);
    if (!f) return ST_BAD_PARAM;
    int dims[4] = {k, c, h, w};
    return set_filter(f, dtype, format, 4, dims);
}

SWB_EXPORT int cudnnSetFilterNdDescriptor(void* d, int dtype, int format, int nb, const int* dims) {
    Filter* f = as<Filter>(d, MAGIC_FILTER);
    if (!f || !dims) return ST_BAD_PARAM;
    return set_filter(f, dtype, format, nb, dims);
}

SWB_EXPORT int cudnnGetFilter4dDescriptor(void* d, int* dtype, int* format, int* k, int* c, int* h, int* w) {
    Filter* f = as<Filter>(d, MAGIC_FILTER);
    if (!f || !f->set || f->nb != 4) return ST_BAD_PARAM;
    if (dtype) *dtype = f->dtype;
    if (format) *format = f->format;
    if (k) *k = f->dims[0];
    if (c) *c = f->dims[1];
    if (h) *h = f->dims[2];
    if (w) *w = f->dims[3];
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetFilterNdDescriptor(void* d, int requested, int* dtype, int* format, int* nb, int* dims) {
    Filter* f = as<Filter>(d, MAGIC_FILTER);
    if (!f || !f->set || requested < 0) return ST_BAD_PARAM;
    if (dtype) *dtype = f->dtype;
    if (format) *format = f->format;
    if (nb) *nb = f->nb;
    for (int i = 0; i < std::min(requested, f->nb); ++i)
        if (dims) dims[i] = f->dims[i];
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetFilterSizeInBytes(void* d, size_t* size) {
    Filter* f = as<Filter>(d, MAGIC_FILTER);
    if (!f || !f->set || !size) return ST_BAD_PARAM;
    Elem e = elem_of(f->dtype);
    *size = size_t(filter_elems(f)) * (e == E_BAD ? 1 : elem_size(e));
    return ST_SUCCESS;
}

// ---- convolution descriptors ----------------------------------------------------------------------

SWB_EXPORT int cudnnCreateConvolutionDescriptor(void** d) {
    if (!d) return ST_BAD_PARAM;
    *d = new Conv();
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnDestroyConvolutionDescriptor(void* d) {
    if (!d) return ST_SUCCESS;
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c) return ST_BAD_PARAM;
    c->magic = 0;
    delete c;
    return ST_SUCCESS;
}

static int set_conv(Conv* c, int n, const int* pad, const int* stride, const int* dil, int mode, int compute) {
    if (n < 1) return ST_BAD_PARAM;
    if (n > DIM_MAX - 2) return ST_NOT_SUPPORTED;
    if (mode != MODE_CONVOLUTION && mode != MODE_CROSS_CORRELATION) return ST_BAD_PARAM;
    if (!dtype_valid(compute)) return ST_BAD_PARAM;
    for (int i = 0; i < n; ++i)
        if (pad[i] < 0 || stride[i] <= 0 || dil[i] <= 0) return ST_BAD_PARAM;
    c->nspatial = n;
    for (int i = 0; i < n; ++i) {
        c->pad[i] = pad[i];
        c->stride[i] = stride[i];
        c->dil[i] = dil[i];
    }
    c->mode = mode;
    c->compute = compute;
    c->set = true;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnSetConvolution2dDescriptor(void* d, int pad_h, int pad_w, int u, int v, int dil_h, int dil_w,
                                               int mode, int compute) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c) return ST_BAD_PARAM;
    int pad[2] = {pad_h, pad_w}, st[2] = {u, v}, dl[2] = {dil_h, dil_w};
    return set_conv(c, 2, pad, st, dl, mode, compute);
}

SWB_EXPORT int cudnnSetConvolutionNdDescriptor(void* d, int n, const int* pad, const int* stride, const int* dil,
                                               int mode, int compute) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || !pad || !stride || !dil) return ST_BAD_PARAM;
    return set_conv(c, n, pad, stride, dil, mode, compute);
}

SWB_EXPORT int cudnnGetConvolution2dDescriptor(void* d, int* pad_h, int* pad_w, int* u, int* v, int* dil_h,
                                               int* dil_w, int* mode, int* compute) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || !c->set || c->nspatial != 2) return ST_BAD_PARAM;
    if (pad_h) *pad_h = c->pad[0];
    if (pad_w) *pad_w = c->pad[1];
    if (u) *u = c->stride[0];
    if (v) *v = c->stride[1];
    if (dil_h) *dil_h = c->dil[0];
    if (dil_w) *dil_w = c->dil[1];
    if (mode) *mode = c->mode;
    if (compute) *compute = c->compute;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolutionNdDescriptor(void* d, int requested, int* n, int* pad, int* stride, int* dil,
                                               int* mode, int* compute) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || !c->set || requested < 0) return ST_BAD_PARAM;
    if (n) *n = c->nspatial;
    for (int i = 0; i < std::min(requested, c->nspatial); ++i) {
        if (pad) pad[i] = c->pad[i];
        if (stride) stride[i] = c->stride[i];
        if (dil) dil[i] = c->dil[i];
    }
    if (mode) *mode = c->mode;
    if (compute) *compute = c->compute;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnSetConvolutionMathType(void* d, int math) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c) return ST_BAD_PARAM;
    if (math < MATH_DEFAULT || math > MATH_FMA) return ST_BAD_PARAM;
    c->math = math;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolutionMathType(void* d, int* math) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || !math) return ST_BAD_PARAM;
    *math = c->math;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnSetConvolutionGroupCount(void* d, int groups) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || groups < 1) return ST_BAD_PARAM;
    c->groups = groups;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolutionGroupCount(void* d, int* groups) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || !groups) return ST_BAD_PARAM;
    *groups = c->groups;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnSetConvolutionReorderType(void* d, int reorder) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || reorder < 0 || reorder > 1) return ST_BAD_PARAM;
    c->reorder = reorder;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolutionReorderType(void* d, int* reorder) {
    Conv* c = as<Conv>(d, MAGIC_CONV);
    if (!c || !reorder) return ST_BAD_PARAM;
    *reorder = c->reorder;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolutionNdForwardOutputDim(void* cv, void* xv, void* wv, int nb, int* out) {
    Conv* c = as<Conv>(cv, MAGIC_CONV);
    Tensor* x = as<Tensor>(xv, MAGIC_TENSOR);
    Filter* w = as<Filter>(wv, MAGIC_FILTER);
    if (!c || !x || !w || !out || !c->set || !x->set || !w->set) return ST_BAD_PARAM;
    if (x->nb != w->nb || x->nb != c->nspatial + 2 || nb != x->nb) return ST_BAD_PARAM;
    if (x->dims[1] != w->dims[1] * c->groups) return ST_BAD_PARAM;
    int res[DIM_MAX];
    res[0] = x->dims[0];
    res[1] = w->dims[0];
    for (int i = 0; i < c->nspatial; ++i) {
        long long eff = (long long)(w->dims[i + 2] - 1) * c->dil[i] + 1;
        long long padded = x->dims[i + 2] + 2LL * c->pad[i];
        if (eff > padded) return ST_BAD_PARAM;
        res[i + 2] = int(1 + (padded - eff) / c->stride[i]);
    }
    for (int i = 0; i < nb; ++i) out[i] = res[i];
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolution2dForwardOutputDim(void* cv, void* xv, void* wv, int* n, int* c, int* h, int* w) {
    int out[4];
    Tensor* x = as<Tensor>(xv, MAGIC_TENSOR);
    if (!x || x->nb != 4) return ST_BAD_PARAM;
    int st = cudnnGetConvolutionNdForwardOutputDim(cv, xv, wv, 4, out);
    if (st != ST_SUCCESS) return st;
    if (!n || !c || !h || !w) return ST_BAD_PARAM;
    *n = out[0];
    *c = out[1];
    *h = out[2];
    *w = out[3];
    return ST_SUCCESS;
}

// ---- algorithm queries ----------------------------------------------------------------------------

SWB_EXPORT int cudnnGetConvolutionForwardAlgorithmMaxCount(void* handle, int* count) {
    if (!as<Handle>(handle, MAGIC_HANDLE) || !count) return ST_BAD_PARAM;
    *count = FWD_COUNT;
    return ST_SUCCESS;
}
SWB_EXPORT int cudnnGetConvolutionBackwardDataAlgorithmMaxCount(void* handle, int* count) {
    if (!as<Handle>(handle, MAGIC_HANDLE) || !count) return ST_BAD_PARAM;
    *count = BWD_DATA_COUNT;
    return ST_SUCCESS;
}
SWB_EXPORT int cudnnGetConvolutionBackwardFilterAlgorithmMaxCount(void* handle, int* count) {
    if (!as<Handle>(handle, MAGIC_HANDLE) || !count) return ST_BAD_PARAM;
    *count = BWD_FILTER_COUNT;
    return ST_SUCCESS;
}

static int query(int dir, void* handle, void* x, void* w, void* conv, void* y, int requested, int* returned,
                 void* perf) {
    if (!as<Handle>(handle, MAGIC_HANDLE)) return ST_BAD_PARAM;
    Problem p;
    int st = make_problem(x, w, conv, y, &p);
    if (st != ST_SUCCESS) return st;
    return fill_perf(dir, p, requested, returned, perf);
}

SWB_EXPORT int cudnnFindConvolutionForwardAlgorithm(void* handle, void* x, void* w, void* conv, void* y,
                                                    int requested, int* returned, void* perf) {
    return query(0, handle, x, w, conv, y, requested, returned, perf);
}
SWB_EXPORT int cudnnGetConvolutionForwardAlgorithm_v7(void* handle, void* x, void* w, void* conv, void* y,
                                                      int requested, int* returned, void* perf) {
    return query(0, handle, x, w, conv, y, requested, returned, perf);
}
SWB_EXPORT int cudnnFindConvolutionBackwardDataAlgorithm(void* handle, void* w, void* dy, void* conv, void* dx,
                                                         int requested, int* returned, void* perf) {
    return query(1, handle, dx, w, conv, dy, requested, returned, perf);
}
SWB_EXPORT int cudnnGetConvolutionBackwardDataAlgorithm_v7(void* handle, void* w, void* dy, void* conv, void* dx,
                                                           int requested, int* returned, void* perf) {
    return query(1, handle, dx, w, conv, dy, requested, returned, perf);
}
SWB_EXPORT int cudnnFindConvolutionBackwardFilterAlgorithm(void* handle, void* x, void* dy, void* conv, void* dw,
                                                           int requested, int* returned, void* perf) {
    return query(2, handle, x, dw, conv, dy, requested, returned, perf);
}
SWB_EXPORT int cudnnGetConvolutionBackwardFilterAlgorithm_v7(void* handle, void* x, void* dy, void* conv,
                                                             void* dw, int requested, int* returned, void* perf) {
    return query(2, handle, x, dw, conv, dy, requested, returned, perf);
}

static int workspace_size(int dir, void* handle, void* x, void* w, void* conv, void* y, int algo, size_t* size) {
    if (!as<Handle>(handle, MAGIC_HANDLE) || !size) return ST_BAD_PARAM;
    Problem p;
    int st = make_problem(x, w, conv, y, &p);
    if (st != ST_SUCCESS) return st;
    Algo a;
    if (dir == 0) st = lookup(fwd_algos(p), algo, FWD_COUNT, &a);
    else if (dir == 1) st = lookup(bwd_data_algos(p), algo, BWD_DATA_COUNT, &a);
    else st = lookup(bwd_filter_algos(p), algo, BWD_FILTER_COUNT, &a);
    if (st != ST_SUCCESS) return st;
    *size = a.ws;
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnGetConvolutionForwardWorkspaceSize(void* handle, void* x, void* w, void* conv, void* y,
                                                       int algo, size_t* size) {
    return workspace_size(0, handle, x, w, conv, y, algo, size);
}
SWB_EXPORT int cudnnGetConvolutionBackwardDataWorkspaceSize(void* handle, void* w, void* dy, void* conv, void* dx,
                                                            int algo, size_t* size) {
    return workspace_size(1, handle, dx, w, conv, dy, algo, size);
}
SWB_EXPORT int cudnnGetConvolutionBackwardFilterWorkspaceSize(void* handle, void* x, void* dy, void* conv,
                                                              void* dw, int algo, size_t* size) {
    return workspace_size(2, handle, x, dw, conv, dy, algo, size);
}

// ---- the convolutions -----------------------------------------------------------------------------

SWB_EXPORT int cudnnConvolutionForward(void* handle, const void* alpha, void* xd, const void* x, void* wd,
                                       const void* w, void* convd, int algo, void* ws, size_t ws_bytes,
                                       const void* beta, void* yd, void* y) {
    if (!as<Handle>(handle, MAGIC_HANDLE)) return ST_BAD_PARAM;
    if (!alpha || !beta || !x || !w || !y) return ST_BAD_PARAM;
    Problem p;
    int st = make_problem(xd, wd, convd, yd, &p);
    if (st != ST_SUCCESS) return st;
    Algo a;
    st = lookup(fwd_algos(p), algo, FWD_COUNT, &a);
    if (st != ST_SUCCESS) return st;
    st = launch_checks(p, a, ws, ws_bytes);
    if (st != ST_SUCCESS) return st;
    double al = read_scale(alpha, p), be = read_scale(beta, p);
    if (!check_tensor(x, p, p.x_extent, "cudnn conv forward x") ||
        !check_tensor(w, p, p.w_elems, "cudnn conv forward w") ||
        !check_tensor(y, p, p.y_extent, "cudnn conv forward y"))
        return ST_EXECUTION_FAILED;
    if (log_on()) {
        log_problem("forward", p);
        fprintf(stderr, "  algo %d alpha %g beta %g workspace %zu\n", algo, al, be, ws_bytes);
    }
    Timer timer(g_stats, 0, "forward", macs(p));
    std::vector<double> acc;
    if (al != 0.0) acc = forward_acc(p, x, w);
    else acc.assign(size_t(p.N) * p.OH * p.OW * p.K, 0.0);
    store_nhwc(y, p.e, p.ys, p.N, p.K, p.OH, p.OW, acc.data(), al, be);
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnConvolutionBackwardData(void* handle, const void* alpha, void* wd, const void* w, void* dyd,
                                            const void* dy, void* convd, int algo, void* ws, size_t ws_bytes,
                                            const void* beta, void* dxd, void* dx) {
    if (!as<Handle>(handle, MAGIC_HANDLE)) return ST_BAD_PARAM;
    if (!alpha || !beta || !w || !dy || !dx) return ST_BAD_PARAM;
    Problem p;
    int st = make_problem(dxd, wd, convd, dyd, &p);
    if (st != ST_SUCCESS) return st;
    Algo a;
    st = lookup(bwd_data_algos(p), algo, BWD_DATA_COUNT, &a);
    if (st != ST_SUCCESS) return st;
    st = launch_checks(p, a, ws, ws_bytes);
    if (st != ST_SUCCESS) return st;
    double al = read_scale(alpha, p), be = read_scale(beta, p);
    if (!check_tensor(dy, p, p.y_extent, "cudnn conv backward-data dy") ||
        !check_tensor(w, p, p.w_elems, "cudnn conv backward-data w") ||
        !check_tensor(dx, p, p.x_extent, "cudnn conv backward-data dx"))
        return ST_EXECUTION_FAILED;
    if (log_on()) {
        log_problem("backward-data", p);
        fprintf(stderr, "  algo %d alpha %g beta %g workspace %zu\n", algo, al, be, ws_bytes);
    }
    bool nondet = a.det == NON_DETERMINISTIC && nondet_on();
    Timer timer(g_stats, 1, "backward data", macs(p));
    std::vector<double> acc;
    if (al != 0.0) acc = backward_data_acc(p, dy, w, nondet);
    else acc.assign(size_t(p.N) * p.H * p.W * p.C, 0.0);
    store_nhwc(dx, p.e, p.xs, p.N, p.C, p.H, p.W, acc.data(), al, be);
    return ST_SUCCESS;
}

SWB_EXPORT int cudnnConvolutionBackwardFilter(void* handle, const void* alpha, void* xd, const void* x, void* dyd,
                                              const void* dy, void* convd, int algo, void* ws, size_t ws_bytes,
                                              const void* beta, void* dwd, void* dw) {
    if (!as<Handle>(handle, MAGIC_HANDLE)) return ST_BAD_PARAM;
    if (!alpha || !beta || !x || !dy || !dw) return ST_BAD_PARAM;
    Problem p;
    int st = make_problem(xd, dwd, convd, dyd, &p);
    if (st != ST_SUCCESS) return st;
    Algo a;
    st = lookup(bwd_filter_algos(p), algo, BWD_FILTER_COUNT, &a);
    if (st != ST_SUCCESS) return st;
    st = launch_checks(p, a, ws, ws_bytes);
    if (st != ST_SUCCESS) return st;
    double al = read_scale(alpha, p), be = read_scale(beta, p);
    if (!check_tensor(x, p, p.x_extent, "cudnn conv backward-filter x") ||
        !check_tensor(dy, p, p.y_extent, "cudnn conv backward-filter dy") ||
        !check_tensor(dw, p, p.w_elems, "cudnn conv backward-filter dw"))
        return ST_EXECUTION_FAILED;
    if (log_on()) {
        log_problem("backward-filter", p);
        fprintf(stderr, "  algo %d alpha %g beta %g workspace %zu\n", algo, al, be, ws_bytes);
    }
    bool nondet = a.det == NON_DETERMINISTIC && nondet_on();
    Timer timer(g_stats, 2, "backward filter", macs(p));
    std::vector<double> acc;
    if (al != 0.0) acc = backward_filter_acc(p, x, dy, nondet);
    else acc.assign(size_t(p.K) * p.R * p.S * p.Cg, 0.0);
    // acc is [k][r][s][c] of the correlation filter; write back through the filter layout,
    // mirrored again under CUDNN_CONVOLUTION.
    Elem e = p.e;
    for (int k = 0; k < p.K; ++k)
        for (int r = 0; r < p.R; ++r)
            for (int s = 0; s < p.S; ++s)
                for (int c = 0; c < p.Cg; ++c) {
                    int rr = p.flip ? p.R - 1 - r : r, ss = p.flip ? p.S - 1 - s : s;
                    size_t i = size_t(k * p.ws[0] + c * p.ws[1] + rr * p.ws[2] + ss * p.ws[3]);
                    double v = al * acc[((size_t(k) * p.R + r) * p.S + s) * p.Cg + c];
                    if (be != 0.0) v += be * load_elem(dw, i, e);
                    store_elem(dw, i, e, v);
                }
    return ST_SUCCESS;
}
