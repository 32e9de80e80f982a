// Shared helpers of the software-GPU cuBLAS and cuDNN stand-ins: number formats, device-range
// checks, environment switches and a deterministic parallel loop. Test infrastructure only.
#pragma once

#include <dlfcn.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <cmath>
#include <thread>
#include <vector>

#include "../include/swgpu.h"

namespace swb {

// ---- number formats ---------------------------------------------------------------------------

inline float bits_to_f32(uint32_t u) {
    float f;
    memcpy(&f, &u, 4);
    return f;
}
inline uint32_t f32_to_bits(float f) {
    uint32_t u;
    memcpy(&u, &f, 4);
    return u;
}

// bf16 is the upper half of an f32.
inline float bf16_to_f32(uint16_t h) { return bits_to_f32(uint32_t(h) << 16); }

// f32 -> bf16, round to nearest even; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x0040u);
    uint32_t lsb = (u >> 16) & 1u;
    u += 0x7fffu + lsb;
    return uint16_t(u >> 16);
}

// IEEE binary16 -> f32 (exact).
inline float f16_to_f32(uint16_t h) {
    uint32_t sign = uint32_t(h & 0x8000u) << 16;
    int exp = (h >> 10) & 0x1f;
    uint32_t man = h & 0x3ffu;
    if (exp == 0x1f) return bits_to_f32(sign | 0x7f800000u | (man << 13));
    if (exp == 0) {
        // zero or subnormal: man * 2^-24
        float v = float(man) * 5.9604644775390625e-8f;
        return sign ? -v : v;
    }
    return bits_to_f32(sign | (uint32_t(exp - 15 + 127) << 23) | (man << 13));
}

// f32 -> binary16, round to nearest even, overflow to infinity.
inline uint16_t f32_to_f16(float f) {
    uint32_t u = f32_to_bits(f);
    uint16_t sign = uint16_t((u >> 16) & 0x8000u);
    uint32_t a = u & 0x7fffffffu;
    if (a > 0x7f800000u) return uint16_t(sign | 0x7e00u);
    if (a >= 0x477ff000u) return uint16_t(sign | 0x7c00u);  // rounds to >= 65520: infinity
    if (a < 0x38800000u) {
        // result is subnormal (or zero): value / 2^-24, rounded to nearest even
        float v = bits_to_f32(a);
        double q = double(v) / 5.9604644775390625e-8;
        double r = std::nearbyint(q);  // default rounding mode: nearest even
        return uint16_t(sign | uint16_t(r));
    }
    uint32_t lsb = (a >> 13) & 1u;
    a += 0xfffu + lsb;
    uint32_t exp = (a >> 23) - 127 + 15;
    return uint16_t(sign | (exp << 10) | ((a >> 13) & 0x3ffu));
}

// TF32: f32 with a 10-bit mantissa, round to nearest (ties away, as the tensor-core conversion
// does; the difference from ties-to-even only shows on exact ties).
inline float round_tf32(float f) {
    uint32_t u = f32_to_bits(f);
    if ((u & 0x7f800000u) == 0x7f800000u) return f;
    u += 0x1000u;
    u &= 0xffffe000u;
    return bits_to_f32(u);
}

// Storage element kinds shared by both libraries.
enum Elem { E_F32, E_F64, E_F16, E_BF16, E_BAD };

inline size_t elem_size(Elem e) {
    switch (e) {
        case E_F32: return 4;
        case E_F64: return 8;
        case E_F16:
        case E_BF16: return 2;
        default: return 0;
    }
}

inline double load_elem(const void* base, size_t i, Elem e) {
    switch (e) {
        case E_F32: return double(static_cast<const float*>(base)[i]);
        case E_F64: return static_cast<const double*>(base)[i];
        case E_F16: return double(f16_to_f32(static_cast<const uint16_t*>(base)[i]));
        case E_BF16: return double(bf16_to_f32(static_cast<const uint16_t*>(base)[i]));
        default: return NAN;
    }
}

// Stores an f64 result the way a kernel with f32 accumulation would: through f32 for the 16-bit
// and f32 outputs.
inline void store_elem(void* base, size_t i, Elem e, double v) {
    switch (e) {
        case E_F32: static_cast<float*>(base)[i] = float(v); break;
        case E_F64: static_cast<double*>(base)[i] = v; break;
        case E_F16: static_cast<uint16_t*>(base)[i] = f32_to_f16(float(v)); break;
        case E_BF16: static_cast<uint16_t*>(base)[i] = f32_to_bf16(float(v)); break;
        default: break;
    }
}

// ---- device ranges ------------------------------------------------------------------------------

typedef int (*range_fn)(const void*, size_t, const char*);
typedef void (*defer_fn)(void*, void (*)(void*), void*, const char*);

// A symbol of the libcuda stand-in: from the global scope, or else from an already loaded libcuda
// (cudarc loads libcuda with RTLD_LOCAL, which keeps its symbols out of the global scope); null
// while none is loaded.
inline void* driver_symbol(const char* sym) {
    void* f = dlsym(RTLD_DEFAULT, sym);
    for (const char* name : {"libcuda.so.1", "libcuda.so"}) {
        if (f) break;
        if (void* h = dlopen(name, RTLD_LAZY | RTLD_NOLOAD)) {
            f = dlsym(h, sym);
            dlclose(h);  // drops only the reference RTLD_NOLOAD added
        }
    }
    return f;
}

// The checker, looked up again until found, so a libcuda loaded later is still used.
inline range_fn range_checker() {
    static range_fn found = nullptr;
    if (!found) found = reinterpret_cast<range_fn>(driver_symbol("swgpu_check_device_range"));
    return found;
}

// Runs fn(data) on `stream` as the libcuda stand-in orders deferred work (swgpu.h); at once when
// no stand-in is loaded.
inline void stream_defer(void* stream, void (*fn)(void*), void* data, const char* what) {
    static defer_fn found = nullptr;
    if (!found) found = reinterpret_cast<defer_fn>(driver_symbol("swgpu_stream_defer"));
    if (found)
        found(stream, fn, data, what);
    else
        fn(data);
}

// True when [p, p + bytes) is inside one live device allocation, or when no checker is loaded.
inline bool range_ok(const void* p, size_t bytes, const char* what) {
    if (bytes == 0) return true;
    range_fn f = range_checker();
    if (!f) return true;
    return f(p, bytes, what) == 0;
}

// ---- environment ------------------------------------------------------------------------------

inline bool env_flag(const char* name, bool dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    return !(v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F');
}

inline int env_int(const char* name, int dflt) {
    const char* v = getenv(name);
    if (!v || !*v) return dflt;
    return atoi(v);
}

// Emulate TF32 rounding of f32 multiplicands where the math mode allows tensor cores
// (SWGPU_TF32=0 turns it off).
// NVIDIA_TF32_OVERRIDE=0, which turns TF32 off in the real libraries, turns it off here too.
inline bool tf32_emulation() {
    static int on = [] {
        const char* o = getenv("NVIDIA_TF32_OVERRIDE");
        if (o && o[0] == '0' && o[1] == 0) return 0;
        return env_flag("SWGPU_TF32", true) ? 1 : 0;
    }();
    return on != 0;
}

// ---- parallel loop --------------------------------------------------------------------------
// Runs body(i) for i in [0, n), each index on exactly one thread, in increasing order within a
// thread. Results are deterministic as long as body(i) writes only what index i owns.

template <class F>
void parallel_for(long n, double work, F body) {
    static int threads = [] {
        int t = env_int("SWGPU_THREADS", 0);
        if (t <= 0) t = int(std::thread::hardware_concurrency());
        return std::max(1, std::min(t, 64));
    }();
    long t = std::min<long>(threads, n);
    if (t <= 1 || work < 2e6) {
        for (long i = 0; i < n; ++i) body(i);
        return;
    }
    std::vector<std::thread> pool;
    pool.reserve(size_t(t - 1));
    auto run = [&](long part) {
        long lo = n * part / t, hi = n * (part + 1) / t;
        for (long i = lo; i < hi; ++i) body(i);
    };
    for (long p = 1; p < t; ++p) pool.emplace_back(run, p);
    run(0);
    for (auto& th : pool) th.join();
}

// Dot product of two contiguous f64 vectors with four partial sums (a fixed order).
inline double dot(const double* a, const double* b, long n) {
    double s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        s0 += a[i] * b[i];
        s1 += a[i + 1] * b[i + 1];
        s2 += a[i + 2] * b[i + 2];
        s3 += a[i + 3] * b[i + 3];
    }
    for (; i < n; ++i) s0 += a[i] * b[i];
    return (s0 + s1) + (s2 + s3);
}

// ---- time accounting (SWGPU_BLAS_STATS=1 prints a summary at exit) -----------------------------

struct Stats {
    const char* lib;
    const char* names[16] = {};
    double secs[16] = {};
    double macs[16] = {};
    long calls[16] = {};
    explicit Stats(const char* l) : lib(l) {}
    ~Stats();
};

inline Stats::~Stats() {
    if (!env_flag("SWGPU_BLAS_STATS", false)) return;
    fprintf(stderr, "swgpu %s stats: device range checks %s\n", lib,
            range_checker() ? "active" : "absent (no swgpu_check_device_range found)");
    for (int i = 0; i < 16; ++i)
        if (names[i] && calls[i])
            fprintf(stderr, "swgpu %s stats: %-28s %6ld calls %8.3f s %8.3f GMAC/s\n", lib, names[i], calls[i],
                    secs[i], secs[i] > 0 ? macs[i] / secs[i] * 1e-9 : 0.0);
}

inline double now_s() {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return double(ts.tv_sec) + 1e-9 * double(ts.tv_nsec);
}

// Adds one call's time to slot `i` of `st` when it goes out of scope.
struct Timer {
    Stats& st;
    int i;
    double t0, macs;
    Timer(Stats& s, int slot, const char* name, double m) : st(s), i(slot), t0(now_s()), macs(m) { st.names[i] = name; }
    ~Timer() {
        st.secs[i] += now_s() - t0;
        st.macs[i] += macs;
        st.calls[i] += 1;
    }
};

}  // namespace swb

#define SWB_EXPORT extern "C" __attribute__((visibility("default")))
