// libcublas.so.13 stand-in for the software GPU: the handle calls and the GEMMs lewel makes (through
// cudarc 0.19.10), computed on the CPU from cuBLAS's documented semantics with f64 accumulation.
// Device pointers are host addresses and every call completes before it returns (see swgpu.h).
//
// Numerics: products accumulate in f64 and are rounded once to the output type (through f32 for
// 16-bit outputs). With an f32 GEMM under CUBLAS_TF32_TENSOR_OP_MATH (or a *_FAST_TF32 compute
// type) the f32 multiplicands are first rounded to TF32, as tensor cores would; SWGPU_TF32=0 turns
// that off.

#include "mm.h"

using namespace swb;

namespace {

// Status codes (cublasStatus_t).
enum {
    ST_SUCCESS = 0,
    ST_NOT_INITIALIZED = 1,
    ST_ALLOC_FAILED = 3,
    ST_INVALID_VALUE = 7,
    ST_ARCH_MISMATCH = 8,
    ST_MAPPING_ERROR = 11,
    ST_EXECUTION_FAILED = 13,
    ST_INTERNAL_ERROR = 14,
    ST_NOT_SUPPORTED = 15,
    ST_LICENSE_ERROR = 16,
};

// cublasOperation_t
enum { OP_N = 0, OP_T = 1, OP_C = 2 };

// cublasMath_t (low bits; 16 = DISALLOW_REDUCED_PRECISION_REDUCTION may be or-ed in)
enum { MATH_DEFAULT = 0, MATH_TENSOR_OP = 1, MATH_PEDANTIC = 2, MATH_TF32 = 3, MATH_BF16X9 = 4,
       MATH_FP64_EMU = 8, MATH_DISALLOW_RRR = 16 };

// cudaDataType_t
enum { R_32F = 0, R_64F = 1, R_16F = 2, R_16BF = 14 };

// cublasComputeType_t
enum {
    C_16F = 64, C_16F_PEDANTIC = 65, C_32F = 68, C_32F_PEDANTIC = 69, C_64F = 70,
    C_64F_PEDANTIC = 71, C_32I = 72, C_32I_PEDANTIC = 73, C_32F_FAST_16F = 74,
    C_32F_FAST_16BF = 75, C_32F_FAST_TF32 = 77, C_32F_EMU_BF16X9 = 78, C_64F_EMU_FIXED = 79,
};

const uint32_t HANDLE_MAGIC = 0x5b1a5c0d;

Stats g_stats("cublas");

struct Handle {
    uint32_t magic = HANDLE_MAGIC;
    void* stream = nullptr;
    int math = MATH_DEFAULT;
    int pointer_mode = 0;  // 0 host, 1 device
    int atomics = 0;
    void* workspace = nullptr;
    size_t workspace_bytes = 0;
};

Handle* as_handle(void* h) {
    Handle* p = static_cast<Handle*>(h);
    if (!p || p->magic != HANDLE_MAGIC) return nullptr;
    return p;
}

bool log_on() {
    static int on = env_flag("SWGPU_CUBLAS_LOG", false) ? 1 : 0;
    return on != 0;
}

// The numeric recipe of one GEMM.
struct Recipe {
    Elem a, b, c;     // storage types
    bool scale_f64;   // alpha/beta are double (else float; half for 16F compute)
    bool scale_f16;
    bool tf32;        // round f32 multiplicands to TF32
    bool out_via_f16; // 16F compute: the accumulator is half (we still sum in f64, round at the end)
};

Elem elem_of(int t) {
    switch (t) {
        case R_32F: return E_F32;
        case R_64F: return E_F64;
        case R_16F: return E_F16;
        case R_16BF: return E_BF16;
        default: return E_BAD;
    }
}

// The supported (compute type, A/B type, C type) combinations of cublasGemmEx, from the cuBLAS
// documentation's table (real types only; the integer and fp8 rows are not emulated and report
// NOT_SUPPORTED).
int recipe_for(const Handle* h, int ctype, int at, int bt, int ct, Recipe* r) {
    if (at != bt) return ST_NOT_SUPPORTED;
    Elem ea = elem_of(at), ec = elem_of(ct);
    if (ea == E_BAD || ec == E_BAD) return ST_NOT_SUPPORTED;
    r->a = r->b = ea;
    r->c = ec;
    r->scale_f64 = false;
    r->scale_f16 = false;
    r->tf32 = false;
    r->out_via_f16 = false;
    bool mode_tf32 = (h->math & 0xf) == MATH_TF32;
    switch (ctype) {
        case C_16F:
        case C_16F_PEDANTIC:
            if (!(ea == E_F16 && ec == E_F16)) return ST_NOT_SUPPORTED;
            r->scale_f16 = true;
            r->out_via_f16 = true;
            return ST_SUCCESS;
        case C_32F:
        case C_32F_PEDANTIC:
            if (ea == E_BF16 && (ec == E_BF16 || ec == E_F32)) return ST_SUCCESS;
            if (ea == E_F16 && (ec == E_F16 || ec == E_F32)) return ST_SUCCESS;
            if (ea == E_F32 && ec == E_F32) {
                r->tf32 = ctype == C_32F && mode_tf32 && tf32_emulation();
                return ST_SUCCESS;
            }
            return ST_NOT_SUPPORTED;
        case C_32F_FAST_16F:
        case C_32F_FAST_16BF:
        case C_32F_FAST_TF32:
        case C_32F_EMU_BF16X9:
            if (!(ea == E_F32 && ec == E_F32)) return ST_NOT_SUPPORTED;
            // The fast modes lower the multiplicands; only TF32 is emulated (the 16-bit ones are
            // treated like TF32 here, a documented simplification).
            r->tf32 = ctype != C_32F_EMU_BF16X9 && tf32_emulation();
            return ST_SUCCESS;
        case C_64F:
        case C_64F_PEDANTIC:
        case C_64F_EMU_FIXED:
            if (!(ea == E_F64 && ec == E_F64)) return ST_NOT_SUPPORTED;
            r->scale_f64 = true;
            return ST_SUCCESS;
        default:
            return ST_INVALID_VALUE;
    }
}

double read_scale(const void* p, const Recipe& r) {
    if (r.scale_f64) return *static_cast<const double*>(p);
    if (r.scale_f16) return double(f16_to_f32(*static_cast<const uint16_t*>(p)));
    return double(*static_cast<const float*>(p));
}

// Bytes spanned by a column-major matrix of `rows` x `cols` with leading dimension ld, repeated
// `batch` times at `stride` elements; `first` receives the element offset of the lowest address.
size_t extent_elems(long rows, long cols, long ld, long long stride, long batch, long long* first) {
    *first = 0;
    if (rows <= 0 || cols <= 0 || batch <= 0) return 0;
    long long one = (long long)(cols - 1) * ld + rows;
    long long lo = 0, hi = one;
    if (batch > 1) {
        long long off = (long long)(batch - 1) * stride;
        lo = std::min<long long>(0, off);
        hi = std::max<long long>(one, off + one);
    }
    *first = lo;
    return size_t(hi - lo);
}

bool check_matrix(const void* p, Elem e, long rows, long cols, long ld, long long stride, long batch,
                  const char* what) {
    long long first;
    size_t n = extent_elems(rows, cols, ld, stride, batch, &first);
    if (n == 0) return true;
    const char* base = static_cast<const char*>(p) + first * (long long)elem_size(e);
    return range_ok(base, n * elem_size(e), what);
}

// Validates the shape arguments the way cuBLAS documents them.
int validate(int ta, int tb, int m, int n, int k, int lda, int ldb, int ldc, const void* alpha,
             const void* beta, int batch) {
    auto op_ok = [](int t) { return t == OP_N || t == OP_T || t == OP_C; };
    if (m < 0 || n < 0 || k < 0 || batch < 0) return ST_INVALID_VALUE;
    if (!op_ok(ta) || !op_ok(tb)) return ST_INVALID_VALUE;
    if (lda < std::max(1, ta == OP_N ? m : k)) return ST_INVALID_VALUE;
    if (ldb < std::max(1, tb == OP_N ? k : n)) return ST_INVALID_VALUE;
    if (ldc < std::max(1, m)) return ST_INVALID_VALUE;
    if (!alpha || !beta) return ST_INVALID_VALUE;
    return ST_SUCCESS;
}

// out[r * cols + c] = f64(src[r * sr + c * sc]) for r < rows, c < cols, in 64 x 64 tiles so both
// the reads and the writes stay in cache whichever stride is 1; TF32-rounded when `tf32`.
template <Elem E>
void pack_tiles(const void* src, long sr, long sc, long rows, long cols, bool tf32, double* out) {
    const long T = 64;
    for (long r0 = 0; r0 < rows; r0 += T)
        for (long c0 = 0; c0 < cols; c0 += T) {
            long r1 = std::min(rows, r0 + T), c1 = std::min(cols, c0 + T);
            if (sc == 1) {
                for (long r = r0; r < r1; ++r)
                    for (long c = c0; c < c1; ++c) out[r * cols + c] = load_elem(src, size_t(r * sr + c), E);
            } else {
                for (long c = c0; c < c1; ++c)
                    for (long r = r0; r < r1; ++r) out[r * cols + c] = load_elem(src, size_t(r * sr + c * sc), E);
            }
            if (tf32)
                for (long r = r0; r < r1; ++r)
                    for (long c = c0; c < c1; ++c) out[r * cols + c] = double(round_tf32(float(out[r * cols + c])));
        }
}

void pack(const void* src, Elem e, long sr, long sc, long rows, long cols, bool tf32, double* out) {
    switch (e) {
        case E_F32: pack_tiles<E_F32>(src, sr, sc, rows, cols, tf32, out); break;
        case E_F64: pack_tiles<E_F64>(src, sr, sc, rows, cols, tf32, out); break;
        case E_F16: pack_tiles<E_F16>(src, sr, sc, rows, cols, tf32, out); break;
        case E_BF16: pack_tiles<E_BF16>(src, sr, sc, rows, cols, tf32, out); break;
        default: break;
    }
}

// op(A) (m x k) as f64 [p][i] (i contiguous) and op(B) (k x n) as f64 [j][p] (p contiguous): the
// operand layouts of mm().
void pack_a(const void* a, Elem e, int trans, long ld, long m, long k, bool tf32, double* out) {
    // op(A)[i][p] is A[i + p * ld] (N) or A[p + i * ld] (T, C)
    if (trans == OP_N) pack(a, e, ld, 1, k, m, tf32, out);
    else pack(a, e, 1, ld, k, m, tf32, out);
}

void pack_b(const void* b, Elem e, int trans, long ld, long k, long n, bool tf32, double* out) {
    // op(B)[p][j] is B[p + j * ld] (N) or B[j + p * ld] (T, C)
    if (trans == OP_N) pack(b, e, ld, 1, n, k, tf32, out);
    else pack(b, e, 1, ld, n, k, tf32, out);
}

int gemm_core(void* hv, int ta, int tb, int m, int n, int k, const void* alpha, const void* a, int lda,
              long long sa, const void* b, int ldb, long long sb, const void* beta, void* c, int ldc,
              long long sc, int batch, const Recipe& r, const char* name) {
    Handle* h = as_handle(hv);
    if (!h) return ST_NOT_INITIALIZED;
    int st = validate(ta, tb, m, n, k, lda, ldb, ldc, alpha, beta, batch);
    if (st != ST_SUCCESS) return st;
    if (log_on())
        fprintf(stderr, "swgpu cublas %s: op %d/%d m %d n %d k %d ld %d/%d/%d strides %lld/%lld/%lld batch %d tf32 %d\n",
                name, ta, tb, m, n, k, lda, ldb, ldc, sa, sb, sc, batch, int(r.tf32));
    if (m == 0 || n == 0 || batch == 0) return ST_SUCCESS;
    Timer timer(g_stats, 0, "gemm", double(m) * n * k * batch);
    if (h->pointer_mode == 1) {
        size_t s = r.scale_f64 ? 8 : r.scale_f16 ? 2 : 4;
        if (!range_ok(alpha, s, "cublas alpha") || !range_ok(beta, s, "cublas beta"))
            return ST_EXECUTION_FAILED;
    }
    double al = read_scale(alpha, r), be = read_scale(beta, r);
    bool read_ab = k > 0 && al != 0.0;
    bool read_c = be != 0.0;
    if (read_ab) {
        long ar = ta == OP_N ? m : k, acols = ta == OP_N ? k : m;
        long br = tb == OP_N ? k : n, bcols = tb == OP_N ? n : k;
        if (!check_matrix(a, r.a, ar, acols, lda, sa, batch, "cublas A")) return ST_EXECUTION_FAILED;
        if (!check_matrix(b, r.b, br, bcols, ldb, sb, batch, "cublas B")) return ST_EXECUTION_FAILED;
    }
    if (!check_matrix(c, r.c, m, n, ldc, sc, batch, "cublas C")) return ST_EXECUTION_FAILED;

    std::vector<double> pa, pb, acc(size_t(m) * n);
    if (read_ab) {
        pa.resize(size_t(m) * k);
        pb.resize(size_t(n) * k);
    }
    size_t ea = elem_size(r.a), eb = elem_size(r.b), ec = elem_size(r.c);
    for (int bi = 0; bi < batch; ++bi) {
        const char* ab = static_cast<const char*>(a) + (long long)bi * sa * (long long)ea;
        const char* bb = static_cast<const char*>(b) + (long long)bi * sb * (long long)eb;
        char* cb = static_cast<char*>(c) + (long long)bi * sc * (long long)ec;
        std::fill(acc.begin(), acc.end(), 0.0);
        if (read_ab) {
            pack_a(ab, r.a, ta, lda, m, k, r.tf32, pa.data());
            pack_b(bb, r.b, tb, ldb, k, n, r.tf32, pb.data());
            mm(m, n, k, pa.data(), m, pb.data(), k, acc.data(), m);
        }
        for (long j = 0; j < n; ++j)
            for (long i = 0; i < m; ++i) {
                double v = al * acc[size_t(i + j * m)];
                if (r.out_via_f16) v = double(f16_to_f32(f32_to_f16(float(v))));
                size_t idx = size_t(i + j * (long)ldc);
                if (read_c) v += be * load_elem(cb, idx, r.c);
                store_elem(cb, idx, r.c, v);
            }
    }
    return ST_SUCCESS;
}

Recipe plain(Elem e, const Handle* h) {
    Recipe r;
    r.a = r.b = r.c = e;
    r.scale_f64 = e == E_F64;
    r.scale_f16 = false;
    r.out_via_f16 = false;
    r.tf32 = e == E_F32 && h && (h->math & 0xf) == MATH_TF32 && tf32_emulation();
    return r;
}

bool algo_ok(int algo) { return (algo >= -1 && algo <= 23) || (algo >= 99 && algo <= 115); }

}  // namespace

// ---- handle and library queries -----------------------------------------------------------------

SWB_EXPORT int cublasCreate_v2(void** handle) {
    if (!handle) return ST_INVALID_VALUE;
    *handle = new Handle();
    return ST_SUCCESS;
}

SWB_EXPORT int cublasDestroy_v2(void* handle) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    h->magic = 0;
    delete h;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasSetStream_v2(void* handle, void* stream) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    h->stream = stream;
    // cuBLAS drops a user workspace when the stream changes (it returns to its own pool).
    h->workspace = nullptr;
    h->workspace_bytes = 0;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasGetStream_v2(void* handle, void** stream) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (!stream) return ST_INVALID_VALUE;
    *stream = h->stream;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasSetWorkspace_v2(void* handle, void* workspace, size_t bytes) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (bytes > 0 && !workspace) return ST_INVALID_VALUE;
    // cuBLAS requires 256-byte alignment of a user workspace.
    if (workspace && (reinterpret_cast<uintptr_t>(workspace) % 256) != 0) return ST_INVALID_VALUE;
    if (workspace && !range_ok(workspace, bytes, "cublas workspace")) return ST_INVALID_VALUE;
    h->workspace = workspace;
    h->workspace_bytes = bytes;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasSetMathMode(void* handle, int mode) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    int base = mode & ~MATH_DISALLOW_RRR;
    if (!(base == MATH_DEFAULT || base == MATH_TENSOR_OP || base == MATH_PEDANTIC ||
          base == MATH_TF32 || base == MATH_BF16X9 || base == MATH_FP64_EMU))
        return ST_INVALID_VALUE;
    h->math = mode;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasGetMathMode(void* handle, int* mode) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (!mode) return ST_INVALID_VALUE;
    *mode = h->math;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasSetPointerMode_v2(void* handle, int mode) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (mode != 0 && mode != 1) return ST_INVALID_VALUE;
    h->pointer_mode = mode;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasGetPointerMode_v2(void* handle, int* mode) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (!mode) return ST_INVALID_VALUE;
    *mode = h->pointer_mode;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasSetAtomicsMode(void* handle, int mode) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (mode != 0 && mode != 1) return ST_INVALID_VALUE;
    h->atomics = mode;
    return ST_SUCCESS;
}

SWB_EXPORT int cublasGetAtomicsMode(void* handle, int* mode) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    if (!mode) return ST_INVALID_VALUE;
    *mode = h->atomics;
    return ST_SUCCESS;
}

// Reported version: cuBLAS 13.0.0 (the CUDA 13.0 toolkit's major).
static const int VER_MAJOR = 13, VER_MINOR = 0, VER_PATCH = 0;

SWB_EXPORT int cublasGetProperty(int type, int* value) {
    if (!value) return ST_INVALID_VALUE;
    switch (type) {
        case 0: *value = VER_MAJOR; return ST_SUCCESS;
        case 1: *value = VER_MINOR; return ST_SUCCESS;
        case 2: *value = VER_PATCH; return ST_SUCCESS;
        default: return ST_INVALID_VALUE;
    }
}

SWB_EXPORT int cublasGetVersion_v2(void* handle, int* version) {
    (void)handle;  // cuBLAS accepts a null handle here
    if (!version) return ST_INVALID_VALUE;
    *version = VER_MAJOR * 10000 + VER_MINOR * 100 + VER_PATCH;
    return ST_SUCCESS;
}

SWB_EXPORT size_t cublasGetCudartVersion(void) { return 13000; }

SWB_EXPORT const char* cublasGetStatusName(int status) {
    switch (status) {
        case ST_SUCCESS: return "CUBLAS_STATUS_SUCCESS";
        case ST_NOT_INITIALIZED: return "CUBLAS_STATUS_NOT_INITIALIZED";
        case ST_ALLOC_FAILED: return "CUBLAS_STATUS_ALLOC_FAILED";
        case ST_INVALID_VALUE: return "CUBLAS_STATUS_INVALID_VALUE";
        case ST_ARCH_MISMATCH: return "CUBLAS_STATUS_ARCH_MISMATCH";
        case ST_MAPPING_ERROR: return "CUBLAS_STATUS_MAPPING_ERROR";
        case ST_EXECUTION_FAILED: return "CUBLAS_STATUS_EXECUTION_FAILED";
        case ST_INTERNAL_ERROR: return "CUBLAS_STATUS_INTERNAL_ERROR";
        case ST_NOT_SUPPORTED: return "CUBLAS_STATUS_NOT_SUPPORTED";
        case ST_LICENSE_ERROR: return "CUBLAS_STATUS_LICENSE_ERROR";
        default: return "CUBLAS_STATUS_UNKNOWN";
    }
}

SWB_EXPORT const char* cublasGetStatusString(int status) {
    switch (status) {
        case ST_SUCCESS: return "the operation completed successfully";
        case ST_NOT_INITIALIZED: return "the library was not initialized";
        case ST_ALLOC_FAILED: return "the resource allocation failed";
        case ST_INVALID_VALUE: return "an invalid numeric value was used as an argument";
        case ST_ARCH_MISMATCH: return "an absent device architectural feature is required";
        case ST_MAPPING_ERROR: return "an access to GPU memory space failed";
        case ST_EXECUTION_FAILED: return "the GPU program failed to execute";
        case ST_INTERNAL_ERROR: return "an internal operation failed";
        case ST_NOT_SUPPORTED: return "the functionality requested is not supported";
        case ST_LICENSE_ERROR: return "error detected trying to check the license";
        default: return "unknown error";
    }
}

// ---- GEMMs ----------------------------------------------------------------------------------------

SWB_EXPORT int cublasSgemm_v2(void* handle, int ta, int tb, int m, int n, int k, const float* alpha,
                              const float* a, int lda, const float* b, int ldb, const float* beta,
                              float* c, int ldc) {
    Recipe r = plain(E_F32, as_handle(handle));
    return gemm_core(handle, ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1, r,
                     "Sgemm");
}

SWB_EXPORT int cublasDgemm_v2(void* handle, int ta, int tb, int m, int n, int k, const double* alpha,
                              const double* a, int lda, const double* b, int ldb, const double* beta,
                              double* c, int ldc) {
    Recipe r = plain(E_F64, as_handle(handle));
    return gemm_core(handle, ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1, r,
                     "Dgemm");
}

SWB_EXPORT int cublasSgemmStridedBatched(void* handle, int ta, int tb, int m, int n, int k,
                                         const float* alpha, const float* a, int lda, long long sa,
                                         const float* b, int ldb, long long sb, const float* beta,
                                         float* c, int ldc, long long sc, int batch) {
    Recipe r = plain(E_F32, as_handle(handle));
    return gemm_core(handle, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch,
                     r, "SgemmStridedBatched");
}

SWB_EXPORT int cublasDgemmStridedBatched(void* handle, int ta, int tb, int m, int n, int k,
                                         const double* alpha, const double* a, int lda, long long sa,
                                         const double* b, int ldb, long long sb, const double* beta,
                                         double* c, int ldc, long long sc, int batch) {
    Recipe r = plain(E_F64, as_handle(handle));
    return gemm_core(handle, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch,
                     r, "DgemmStridedBatched");
}

SWB_EXPORT int cublasGemmEx(void* handle, int ta, int tb, int m, int n, int k, const void* alpha,
                            const void* a, int atype, int lda, const void* b, int btype, int ldb,
                            const void* beta, void* c, int ctype, int ldc, int compute, int algo) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    Recipe r;
    int st = recipe_for(h, compute, atype, btype, ctype, &r);
    if (st != ST_SUCCESS) return st;
    if (!algo_ok(algo)) return ST_NOT_SUPPORTED;
    return gemm_core(handle, ta, tb, m, n, k, alpha, a, lda, 0, b, ldb, 0, beta, c, ldc, 0, 1, r,
                     "GemmEx");
}

SWB_EXPORT int cublasGemmStridedBatchedEx(void* handle, int ta, int tb, int m, int n, int k,
                                          const void* alpha, const void* a, int atype, int lda,
                                          long long sa, const void* b, int btype, int ldb, long long sb,
                                          const void* beta, void* c, int ctype, int ldc, long long sc,
                                          int batch, int compute, int algo) {
    Handle* h = as_handle(handle);
    if (!h) return ST_NOT_INITIALIZED;
    Recipe r;
    int st = recipe_for(h, compute, atype, btype, ctype, &r);
    if (st != ST_SUCCESS) return st;
    if (!algo_ok(algo)) return ST_NOT_SUPPORTED;
    return gemm_core(handle, ta, tb, m, n, k, alpha, a, lda, sa, b, ldb, sb, beta, c, ldc, sc, batch,
                     r, "GemmStridedBatchedEx");
}
