// libcuda.so.1 stand-in: the driver API calls cudarc 0.19.10 makes, on host memory, synchronously.
//
// - Device memory is host memory: every allocation is malloc'd, filled with 0xFF bytes (a NaN in
//   f32, bf16 and f64) and entered in a table. Copies and memsets are checked against the table:
//   a range outside one live allocation prints one stderr line and fails with
//   CUDA_ERROR_INVALID_VALUE. swgpu_check_device_range (swgpu/include/swgpu.h) exports the check.
// - Streams and events are tokens; every call completes before it returns, except work the
//   library stand-ins defer to a side stream (swgpu_stream_defer, below): that runs when the
//   program's own ordering (an event wait, a synchronization) says it must have run.
// - cuModuleLoadData takes the blobs the libnvrtc stand-in "compiles" (nvrtc.cpp): it loads the g++
//   build of that kernel file from $SWGPU_KERNELS and checks it was built from the same source.
// - cuLaunchKernel runs the grid through the kernel library's trampoline (swgpu/kernels/runtime.cpp).
#include <dlfcn.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <chrono>
#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "../include/swgpu.h"
#include "../kernels/abi.h"
#include "module_blob.h"

typedef int CUresult;
typedef int CUdevice;
typedef unsigned long long CUdeviceptr;
typedef void* CUcontext;
typedef void* CUstream;
typedef void* CUevent;
typedef void* CUmodule;
typedef void* CUfunction;
typedef void* CUmemoryPool;

#define EXPORT extern "C" __attribute__((visibility("default")))

enum {
    CUDA_SUCCESS = 0,
    CUDA_ERROR_INVALID_VALUE = 1,
    CUDA_ERROR_OUT_OF_MEMORY = 2,
    CUDA_ERROR_NOT_INITIALIZED = 3,
    CUDA_ERROR_NO_DEVICE = 100,
    CUDA_ERROR_INVALID_DEVICE = 101,
    CUDA_ERROR_INVALID_IMAGE = 200,
    CUDA_ERROR_INVALID_CONTEXT = 201,
    CUDA_ERROR_FILE_NOT_FOUND = 301,
    CUDA_ERROR_SHARED_OBJECT_INIT_FAILED = 303,
    CUDA_ERROR_INVALID_HANDLE = 400,
    CUDA_ERROR_NOT_FOUND = 500,
    CUDA_ERROR_NOT_READY = 600,
    CUDA_ERROR_ILLEGAL_ADDRESS = 700,
    CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES = 701,
    CUDA_ERROR_LAUNCH_FAILED = 719,
    CUDA_ERROR_NOT_SUPPORTED = 801,
    CUDA_ERROR_UNKNOWN = 999,
};

namespace {

const char kDeviceName[] = "lewel software GPU";
// The device memory reported, and enforced on device allocations: 80 GiB, or SWGPU_MEMORY_MIB
// (a small value makes out-of-memory paths testable). Host memory is the other limit.
size_t total_mem() {
    static const size_t v = [] {
        const char* s = getenv("SWGPU_MEMORY_MIB");
        return s && *s ? size_t(strtoull(s, nullptr, 10)) << 20 : size_t(80ull << 30);
    }();
    return v;
}

std::mutex g_mu;  // one call at a time: the kernel runtime has process-wide state
bool g_init;
// Devices reported: 1, or SWGPU_DEVICES (up to 16; one process per device for multi-GPU tests).
// They share this process's memory and allocation table; each has its own primary context token.
int device_count() {
    static const int v = [] {
        const char* s = getenv("SWGPU_DEVICES");
        long n = s && *s ? strtol(s, nullptr, 10) : 1;
        return n >= 1 && n <= 16 ? int(n) : 1;
    }();
    return v;
}
int g_ctx_token[16];  // device d's primary context handle points at g_ctx_token[d]
thread_local CUcontext g_current;

struct Alloc {
    size_t bytes;
    bool host;  // page-locked host memory (cuMemAllocHost): not a device range
};
std::map<uintptr_t, Alloc> g_allocs;
size_t g_used;  // device bytes allocated

struct Event {
    std::chrono::steady_clock::time_point t;
    bool recorded;
    CUstream stream;  // where it was last recorded, and behind how much of that stream's work
    uint64_t seq;
};

// ---- asynchronous copies with page-locked host memory --------------------------------------------
// Everything here runs when it is called, but the host may not treat a copy queued with page-locked
// memory as done until a synchronization covers it: cuEventSynchronize/Query on an event recorded
// after it on its stream, cuStreamSynchronize of its stream, or cuCtxSynchronize. So:
// - a device-to-host copy into page-locked memory fills the destination with 0xFF bytes (NaN as
//   floats) and delivers the bytes, as they were when queued, only at that synchronization;
// - a host-to-device copy from page-locked memory remembers a hash of the source; if the bytes
//   differ when the synchronization comes (or when another copy is queued from them), the host
//   wrote the buffer while the device could still be reading it: reported, and the process ends.
struct Pending {
    CUstream stream;
    uint64_t seq;
    uintptr_t host;
    size_t n;
    bool to_host;
    uint64_t hash;           // host-to-device: the source bytes when queued
    std::vector<char> data;  // device-to-host: the bytes to deliver
    const char* what;
};
std::vector<Pending> g_pending;
std::map<CUstream, uint64_t> g_seq;  // work queued so far per stream
struct Stream {
    int unused;
};

// ---- work deferred on side streams (swgpu_stream_defer) ------------------------------------------
// A library stand-in (the libnccl one) queues work on a stream the program made (a side stream)
// through swgpu_stream_defer. It runs only when the program's ordering says it must have run: at a
// cuStreamWaitEvent on an event recorded behind it, at cuEventSynchronize/Query of such an event,
// at cuStreamSynchronize or cuStreamDestroy of its stream, or at cuCtxSynchronize. Work on the
// NULL stream runs at once, as everything else does. So a program that reads a side stream's
// results without waiting for them reads them before they exist (and a test sees wrong numbers),
// as it could on a GPU. And work queued on a side stream that has not waited on any event since
// its previous work is reported and the process ends: its inputs, written on other streams, could
// still be in flight on a GPU. SWGPU_DEFER=0 runs deferred work at once.
struct Deferred {
    CUstream stream;
    uint64_t seq;
    void (*fn)(void*);
    void* data;
};
std::vector<Deferred> g_deferred;   // in the order queued
std::map<CUstream, bool> g_waited;  // the side stream waited on an event since its last deferred work

bool null_stream(CUstream s) { return !s || s == (CUstream)1 || s == (CUstream)2; }

// Runs the deferred work `pick` selects, oldest first, each outside g_mu (it may take it, and a
// collective may block for a while). The caller must not hold g_mu.
template <class F>
void run_deferred(F pick) {
    for (;;) {
        Deferred d;
        {
            std::lock_guard<std::mutex> l(g_mu);
            auto it = g_deferred.begin();
            while (it != g_deferred.end() && !pick(*it)) ++it;
            if (it == g_deferred.end()) return;
            d = *it;
            g_deferred.erase(it);
        }
        d.fn(d.data);
    }
}

struct Module {
    void* dl;
    const swgpu_module_info* info;
    std::string file;
};
struct Function {
    Module* module;
    const swgpu_kernel* kernel;
};

void say(const char* fmt, ...) __attribute__((format(printf, 1, 2)));
void say(const char* fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("swgpu: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
}

// The live allocation holding [p, p + bytes), or end().
std::map<uintptr_t, Alloc>::iterator find_alloc(uintptr_t p, size_t bytes) {
    auto it = g_allocs.upper_bound(p);
    if (it == g_allocs.begin()) return g_allocs.end();
    --it;
    uintptr_t lo = it->first, hi = lo + it->second.bytes;
    if (p >= lo && p <= hi && bytes <= hi - p) return it;
    return g_allocs.end();
}

int check_range_locked(const void* ptr, size_t bytes, const char* what) {
    uintptr_t p = (uintptr_t)ptr;
    auto it = find_alloc(p, bytes);
    if (it != g_allocs.end() && !it->second.host) return 0;
    // name the nearest allocation
    auto nb = g_allocs.upper_bound(p);
    char near[160] = "no device allocation near it";
    if (nb != g_allocs.begin()) {
        auto pr = std::prev(nb);
        snprintf(near, sizeof near, "nearest allocation below: 0x%llx + %zu bytes (ends %lld bytes before the range's end)",
                 (unsigned long long)pr->first, pr->second.bytes,
                 (long long)(p + bytes) - (long long)(pr->first + pr->second.bytes));
    }
    say("%s: device range 0x%llx + %zu bytes is not inside one live device allocation; %s", what,
        (unsigned long long)p, bytes, near);
    return 1;
}

CUresult alloc(CUdeviceptr* out, size_t bytes, bool host) {
    if (!out) return CUDA_ERROR_INVALID_VALUE;
    if (!host) {
        std::lock_guard<std::mutex> l(g_mu);
        if (g_used + bytes > total_mem()) return CUDA_ERROR_OUT_OF_MEMORY;
    }
    void* p = malloc(bytes ? bytes : 1);
    if (!p) {
        say("out of host memory allocating %zu bytes of device memory", bytes);
        return CUDA_ERROR_OUT_OF_MEMORY;
    }
    memset(p, 0xFF, bytes);
    std::lock_guard<std::mutex> l(g_mu);
    g_allocs[(uintptr_t)p] = Alloc{bytes, host};
    if (!host) g_used += bytes;
    *out = (CUdeviceptr)(uintptr_t)p;
    return CUDA_SUCCESS;
}

CUresult release(uintptr_t p, bool host, const char* what) {
    if (!p) return CUDA_SUCCESS;
    std::lock_guard<std::mutex> l(g_mu);
    auto it = g_allocs.find(p);
    if (it == g_allocs.end() || it->second.host != host) {
        say("%s(0x%llx): not the start of a live %s allocation", what, (unsigned long long)p, host ? "host" : "device");
        return CUDA_ERROR_INVALID_VALUE;
    }
    if (!host) g_used -= it->second.bytes;
    g_allocs.erase(it);
    free((void*)p);
    return CUDA_SUCCESS;
}

CUresult copy(void* dst, const void* src, size_t n, bool dst_dev, bool src_dev, const char* what) {
    if (!n) return CUDA_SUCCESS;
    {
        std::lock_guard<std::mutex> l(g_mu);
        if (dst_dev && check_range_locked(dst, n, what)) return CUDA_ERROR_INVALID_VALUE;
        if (src_dev && check_range_locked(src, n, what)) return CUDA_ERROR_INVALID_VALUE;
    }
    if (!dst || !src) return CUDA_ERROR_INVALID_VALUE;
    memmove(dst, src, n);
    return CUDA_SUCCESS;
}

CUresult fill(CUdeviceptr dst, const void* value, size_t elem, size_t count, const char* what) {
    {
        std::lock_guard<std::mutex> l(g_mu);
        if (count && check_range_locked((void*)(uintptr_t)dst, count * elem, what)) return CUDA_ERROR_INVALID_VALUE;
    }
    char* p = (char*)(uintptr_t)dst;
    if (elem == 1) {
        memset(p, *(const unsigned char*)value, count);
    } else {
        for (size_t i = 0; i < count; i++) memcpy(p + i * elem, value, elem);
    }
    return CUDA_SUCCESS;
}

uint64_t fnv(const void* p, size_t n) {
    uint64_t h = 0xcbf29ce484222325ull;
    for (size_t i = 0; i < n; i++) h = (h ^ ((const unsigned char*)p)[i]) * 0x100000001b3ull;
    return h;
}

// Page-locked host memory holds [p, p + n).
bool pinned_locked(const void* p, size_t n) {
    auto it = find_alloc((uintptr_t)p, n);
    return it != g_allocs.end() && it->second.host;
}

[[noreturn]] void host_race(const Pending& q, const char* when) {
    say("the host wrote page-locked memory 0x%llx + %zu bytes while the %s queued from it could still be reading "
        "it (found %s): record an event behind the copy and wait for it before writing the buffer again",
        (unsigned long long)q.host, q.n, q.what, when);
    fflush(stderr);
    _exit(3);
}

// Completes, for the host, the pending copies that `done` selects. Caller holds g_mu.
template <class F>
void retire_locked(F done, const char* when) {
    size_t k = 0;
    for (size_t i = 0; i < g_pending.size(); i++) {
        Pending& q = g_pending[i];
        if (!done(q)) {
            if (k != i) g_pending[k] = std::move(q);
            k++;
            continue;
        }
        if (q.to_host) {
            memcpy((void*)q.host, q.data.data(), q.n);
        } else if (fnv((const void*)q.host, q.n) != q.hash) {
            host_race(q, when);
        }
    }
    g_pending.resize(k);
}

// The compute capability reported: 9.0, or SWGPU_CC (e.g. 75 for 7.5: the paths for older GPUs).
int cc() {
    static const int v = [] {
        const char* s = getenv("SWGPU_CC");
        int c = s && *s ? atoi(s) : 90;
        return c >= 30 && c <= 120 ? c : 90;
    }();
    return v;
}

int attribute(int a) {
    switch (a) {
        case 1: return 1024;                // MAX_THREADS_PER_BLOCK
        case 2: return 1024;                // MAX_BLOCK_DIM_X
        case 3: return 1024;                // MAX_BLOCK_DIM_Y
        case 4: return 64;                  // MAX_BLOCK_DIM_Z
        case 5: return 0x7fffffff;          // MAX_GRID_DIM_X
        case 6: return 65535;               // MAX_GRID_DIM_Y
        case 7: return 65535;               // MAX_GRID_DIM_Z
        case 8: return 48 * 1024;           // MAX_SHARED_MEMORY_PER_BLOCK
        case 9: return 64 * 1024;           // TOTAL_CONSTANT_MEMORY
        case 10: return 32;                 // WARP_SIZE
        case 11: return 0x7fffffff;         // MAX_PITCH
        case 12: return 65536;              // MAX_REGISTERS_PER_BLOCK
        case 13: return 1980000;            // CLOCK_RATE (kHz)
        case 14: return 512;                // TEXTURE_ALIGNMENT
        case 15: return 1;                  // GPU_OVERLAP
        case 16: return 132;                // MULTIPROCESSOR_COUNT
        case 17: return 0;                  // KERNEL_EXEC_TIMEOUT
        case 18: return 0;                  // INTEGRATED
        case 19: return 1;                  // CAN_MAP_HOST_MEMORY
        case 20: return 0;                  // COMPUTE_MODE default
        case 31: return 1;                  // CONCURRENT_KERNELS
        case 32: return 1;                  // ECC_ENABLED
        case 33: return 0;                  // PCI_BUS_ID
        case 34: return 0;                  // PCI_DEVICE_ID
        case 36: return 2619000;            // MEMORY_CLOCK_RATE
        case 37: return 6144;               // GLOBAL_MEMORY_BUS_WIDTH
        case 38: return 50 * 1024 * 1024;   // L2_CACHE_SIZE
        case 39: return 2048;               // MAX_THREADS_PER_MULTIPROCESSOR
        case 40: return 2;                  // ASYNC_ENGINE_COUNT
        case 41: return 1;                  // UNIFIED_ADDRESSING
        case 50: return 0;                  // PCI_DOMAIN_ID
        case 75: return cc() / 10;          // COMPUTE_CAPABILITY_MAJOR
        case 76: return cc() % 10;          // COMPUTE_CAPABILITY_MINOR
        case 81: return 228 * 1024;         // MAX_SHARED_MEMORY_PER_MULTIPROCESSOR
        case 82: return 65536;              // MAX_REGISTERS_PER_MULTIPROCESSOR
        case 83: return 1;                  // MANAGED_MEMORY
        case 89: return 1;                  // CONCURRENT_MANAGED_ACCESS
        case 95: return 1;                  // COOPERATIVE_LAUNCH
        case 97: return 227 * 1024;         // MAX_SHARED_MEMORY_PER_BLOCK_OPTIN
        case 106: return 32;                // MAX_BLOCKS_PER_MULTIPROCESSOR
        case 115: return 1;                 // MEMORY_POOLS_SUPPORTED
        default: return 0;
    }
}

struct ErrName {
    int code;
    const char* name;
    const char* text;
};
const ErrName kErrors[] = {
    {0, "CUDA_SUCCESS", "no error"},
    {1, "CUDA_ERROR_INVALID_VALUE", "invalid argument"},
    {2, "CUDA_ERROR_OUT_OF_MEMORY", "out of memory"},
    {3, "CUDA_ERROR_NOT_INITIALIZED", "initialization error"},
    {100, "CUDA_ERROR_NO_DEVICE", "no CUDA-capable device is detected"},
    {101, "CUDA_ERROR_INVALID_DEVICE", "invalid device ordinal"},
    {200, "CUDA_ERROR_INVALID_IMAGE", "device kernel image is invalid"},
    {201, "CUDA_ERROR_INVALID_CONTEXT", "invalid device context"},
    {301, "CUDA_ERROR_FILE_NOT_FOUND", "file not found"},
    {303, "CUDA_ERROR_SHARED_OBJECT_INIT_FAILED", "shared object initialization failed"},
    {400, "CUDA_ERROR_INVALID_HANDLE", "invalid resource handle"},
    {500, "CUDA_ERROR_NOT_FOUND", "named symbol not found"},
    {600, "CUDA_ERROR_NOT_READY", "device not ready"},
    {700, "CUDA_ERROR_ILLEGAL_ADDRESS", "an illegal memory access was encountered"},
    {701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES", "too many resources requested for launch"},
    {719, "CUDA_ERROR_LAUNCH_FAILED", "unspecified launch failure"},
    {801, "CUDA_ERROR_NOT_SUPPORTED", "operation not supported"},
    {999, "CUDA_ERROR_UNKNOWN", "unknown error"},
};

const ErrName* err_entry(CUresult e) {
    for (const auto& x : kErrors)
        if (x.code == e) return &x;
    return nullptr;
}

CUresult need_device(CUdevice d) { return d >= 0 && d < device_count() ? CUDA_SUCCESS : CUDA_ERROR_INVALID_DEVICE; }

}  // namespace

EXPORT int swgpu_check_device_range(const void* ptr, size_t bytes, const char* what) {
    std::lock_guard<std::mutex> l(g_mu);
    return check_range_locked(ptr, bytes, what ? what : "swgpu_check_device_range");
}

EXPORT void swgpu_stream_defer(void* stream, void (*fn)(void*), void* data, const char* what) {
    static const bool on = [] {
        const char* v = getenv("SWGPU_DEFER");
        return !(v && (v[0] == '0' || v[0] == 'n' || v[0] == 'N' || v[0] == 'f' || v[0] == 'F'));
    }();
    CUstream s = (CUstream)stream;
    if (!on || null_stream(s)) {
        fn(data);
        return;
    }
    std::lock_guard<std::mutex> l(g_mu);
    if (!g_waited[s]) {
        say("%s queued on side stream %p, which has waited on no event since its previous work: its inputs, "
            "written on other streams, could still be in flight; record an event behind them and make this "
            "stream wait for it (cuStreamWaitEvent) first",
            what ? what : "work", s);
        fflush(stderr);
        _exit(3);
    }
    g_waited[s] = false;
    g_deferred.push_back(Deferred{s, ++g_seq[s], fn, data});
}

// ---- initialization, device, context

EXPORT CUresult cuInit(unsigned) {
    g_init = true;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDriverGetVersion(int* v) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = 13000;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetCount(int* n) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = device_count();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    if (need_device(ordinal) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_DEVICE;
    *d = ordinal;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    if (!name || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(name, (size_t)len, "%s", kDeviceName);
    return need_device(d);
}
EXPORT CUresult cuDeviceGetUuid(unsigned char* uuid, CUdevice d) {
    if (!uuid) return CUDA_ERROR_INVALID_VALUE;
    const char id[16] = {'s', 'w', 'g', 'p', 'u', '-', 'l', 'e', 'w', 'e', 'l', 0, 0, 0, 0, 1};
    memcpy(uuid, id, 16);
    uuid[15] = (unsigned char)(d + 1);
    return need_device(d);
}
EXPORT CUresult cuDeviceGetUuid_v2(unsigned char* uuid, CUdevice d) { return cuDeviceGetUuid(uuid, d); }
EXPORT CUresult cuDeviceGetAttribute(int* v, int attr, CUdevice d) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    *v = attribute(attr);
    return need_device(d);
}
EXPORT CUresult cuDeviceTotalMem_v2(size_t* bytes, CUdevice d) {
    if (!bytes) return CUDA_ERROR_INVALID_VALUE;
    *bytes = total_mem();
    return need_device(d);
}
EXPORT CUresult cuDeviceGetPCIBusId(char* s, int len, CUdevice d) {
    if (!s || len <= 0) return CUDA_ERROR_INVALID_VALUE;
    snprintf(s, (size_t)len, "0000:00:00.0");
    return need_device(d);
}
EXPORT CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    if (need_device(d) != CUDA_SUCCESS) return CUDA_ERROR_INVALID_DEVICE;
    *c = (CUcontext)&g_ctx_token[d];
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDevicePrimaryCtxRelease_v2(CUdevice d) { return need_device(d); }
EXPORT CUresult cuDevicePrimaryCtxRelease(CUdevice d) { return need_device(d); }
EXPORT CUresult cuDevicePrimaryCtxReset_v2(CUdevice d) { return need_device(d); }
EXPORT CUresult cuDevicePrimaryCtxGetState(CUdevice d, unsigned* flags, int* active) {
    if (flags) *flags = 0;
    if (active) *active = 1;
    return need_device(d);
}
EXPORT CUresult cuDevicePrimaryCtxSetFlags_v2(CUdevice d, unsigned) { return need_device(d); }
EXPORT CUresult cuCtxCreate_v4(CUcontext* c, void*, unsigned, CUdevice d) { return cuDevicePrimaryCtxRetain(c, d); }
EXPORT CUresult cuCtxDestroy_v2(CUcontext) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetCurrent(CUcontext* c) {
    if (!c) return CUDA_ERROR_INVALID_VALUE;
    *c = g_current;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetCurrent(CUcontext c) {
    g_current = c;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxPushCurrent_v2(CUcontext c) { return cuCtxSetCurrent(c); }
EXPORT CUresult cuCtxPopCurrent_v2(CUcontext* c) {
    if (c) *c = g_current;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetDevice(CUdevice* d) {
    if (!d) return CUDA_ERROR_INVALID_VALUE;
    int* t = (int*)g_current;
    *d = t >= g_ctx_token && t < g_ctx_token + 16 ? int(t - g_ctx_token) : 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSynchronize() {
    run_deferred([](const Deferred&) { return true; });
    std::lock_guard<std::mutex> l(g_mu);
    retire_locked([](const Pending&) { return true; }, "at cuCtxSynchronize");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxGetLimit(size_t* v, int) {
    if (v) *v = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetLimit(int, size_t) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetCacheConfig(int* c) {
    if (c) *c = 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuCtxSetCacheConfig(int) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxSetFlags(unsigned) { return CUDA_SUCCESS; }
EXPORT CUresult cuCtxGetStreamPriorityRange(int* lo, int* hi) {
    if (lo) *lo = 0;
    if (hi) *hi = -5;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuProfilerStart() { return CUDA_SUCCESS; }
EXPORT CUresult cuProfilerStop() { return CUDA_SUCCESS; }

EXPORT CUresult cuGetErrorName(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    const ErrName* x = err_entry(e);
    *s = x ? x->name : nullptr;
    return x ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
EXPORT CUresult cuGetErrorString(CUresult e, const char** s) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    const ErrName* x = err_entry(e);
    *s = x ? x->text : nullptr;
    return x ? CUDA_SUCCESS : CUDA_ERROR_INVALID_VALUE;
}
EXPORT CUresult cuGetExportTable(const void** table, const void*) {
    if (table) *table = nullptr;
    return CUDA_ERROR_NOT_SUPPORTED;  // the runtime API's private tables: nothing here uses them
}

// ---- streams and events: tokens; all work is already done when a call returns, but copies with
// page-locked memory complete for the host only at a synchronization (see Pending)

EXPORT CUresult cuStreamCreate(CUstream* s, unsigned) {
    if (!s) return CUDA_ERROR_INVALID_VALUE;
    *s = new Stream{0};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamCreateWithPriority(CUstream* s, unsigned f, int) { return cuStreamCreate(s, f); }
EXPORT CUresult cuStreamDestroy_v2(CUstream s) {
    run_deferred([s](const Deferred& d) { return d.stream == s; });
    {
        std::lock_guard<std::mutex> l(g_mu);
        g_waited.erase(s);
    }
    delete static_cast<Stream*>(s);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamSynchronize(CUstream s) {
    run_deferred([s](const Deferred& d) { return d.stream == s; });
    std::lock_guard<std::mutex> l(g_mu);
    retire_locked([s](const Pending& q) { return q.stream == s; }, "at cuStreamSynchronize");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamQuery(CUstream) { return CUDA_SUCCESS; }
// Runs the deferred work recorded in `ev` (none if it was never recorded).
static void run_recorded(Event* ev) {
    CUstream on;
    uint64_t seq;
    {
        std::lock_guard<std::mutex> l(g_mu);
        if (!ev->recorded) return;
        on = ev->stream;
        seq = ev->seq;
    }
    run_deferred([on, seq](const Deferred& d) { return d.stream == on && d.seq <= seq; });
}

// Everything recorded in `e` has run before `s` goes on: deferred work behind it runs now.
EXPORT CUresult cuStreamWaitEvent(CUstream s, CUevent e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    if (!null_stream(s)) {
        std::lock_guard<std::mutex> l(g_mu);
        g_waited[s] = true;
    }
    run_recorded(static_cast<Event*>(e));
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamIsCapturing(CUstream, int* status) {
    if (status) *status = 0;  // CU_STREAM_CAPTURE_STATUS_NONE
    return CUDA_SUCCESS;
}
EXPORT CUresult cuStreamBeginCapture_v2(CUstream, int) {
    say("stream capture (CUDA graphs) is not emulated");
    return CUDA_ERROR_NOT_SUPPORTED;
}
EXPORT CUresult cuLaunchHostFunc(CUstream, void (*fn)(void*), void* data) {
    if (!fn) return CUDA_ERROR_INVALID_VALUE;
    fn(data);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventCreate(CUevent* e, unsigned) {
    if (!e) return CUDA_ERROR_INVALID_VALUE;
    *e = new Event{std::chrono::steady_clock::now(), false};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventDestroy_v2(CUevent e) {
    delete static_cast<Event*>(e);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecord(CUevent e, CUstream s) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    std::lock_guard<std::mutex> l(g_mu);
    auto* ev = static_cast<Event*>(e);
    ev->t = std::chrono::steady_clock::now();
    ev->recorded = true;
    ev->stream = s;
    ev->seq = g_seq[s];
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventRecordWithFlags(CUevent e, CUstream s, unsigned) { return cuEventRecord(e, s); }
// Waits (trivially) for the work recorded in `e`; an event never recorded is complete at once.
EXPORT CUresult cuEventSynchronize(CUevent e) {
    if (!e) return CUDA_ERROR_INVALID_HANDLE;
    auto* ev = static_cast<Event*>(e);
    run_recorded(ev);
    std::lock_guard<std::mutex> l(g_mu);
    if (ev->recorded)
        retire_locked([ev](const Pending& q) { return q.stream == ev->stream && q.seq <= ev->seq; },
                      "at cuEventSynchronize");
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventQuery(CUevent e) { return cuEventSynchronize(e); }
EXPORT CUresult cuEventElapsedTime(float* ms, CUevent a, CUevent b) {
    if (!ms || !a || !b) return CUDA_ERROR_INVALID_VALUE;
    auto *ea = static_cast<Event*>(a), *eb = static_cast<Event*>(b);
    if (!ea->recorded || !eb->recorded) return CUDA_ERROR_INVALID_HANDLE;
    *ms = std::chrono::duration<float, std::milli>(eb->t - ea->t).count();
    return CUDA_SUCCESS;
}
EXPORT CUresult cuEventElapsedTime_v2(float* ms, CUevent a, CUevent b) { return cuEventElapsedTime(ms, a, b); }

// ---- memory

EXPORT CUresult cuMemAlloc_v2(CUdeviceptr* p, size_t bytes) { return alloc(p, bytes, false); }
EXPORT CUresult cuMemAllocAsync(CUdeviceptr* p, size_t bytes, CUstream) { return alloc(p, bytes, false); }
EXPORT CUresult cuMemAllocFromPoolAsync(CUdeviceptr* p, size_t bytes, CUmemoryPool, CUstream) {
    return alloc(p, bytes, false);
}
EXPORT CUresult cuMemAllocManaged(CUdeviceptr* p, size_t bytes, unsigned) { return alloc(p, bytes, false); }
EXPORT CUresult cuMemFree_v2(CUdeviceptr p) { return release((uintptr_t)p, false, "cuMemFree"); }
EXPORT CUresult cuMemFreeAsync(CUdeviceptr p, CUstream) { return release((uintptr_t)p, false, "cuMemFreeAsync"); }
EXPORT CUresult cuMemAllocHost_v2(void** p, size_t bytes) {
    if (!p) return CUDA_ERROR_INVALID_VALUE;
    CUdeviceptr d = 0;
    CUresult r = alloc(&d, bytes, true);
    *p = (void*)(uintptr_t)d;
    return r;
}
EXPORT CUresult cuMemHostAlloc(void** p, size_t bytes, unsigned) { return cuMemAllocHost_v2(p, bytes); }
// Frees after the copies with the buffer complete, as the real call synchronizes the device.
EXPORT CUresult cuMemFreeHost(void* p) {
    {
        std::lock_guard<std::mutex> l(g_mu);
        auto it = g_allocs.find((uintptr_t)p);
        if (it != g_allocs.end() && it->second.host) {
            uintptr_t lo = it->first, hi = lo + it->second.bytes;
            retire_locked([lo, hi](const Pending& q) { return q.host >= lo && q.host < hi; }, "at cuMemFreeHost");
        }
    }
    return release((uintptr_t)p, true, "cuMemFreeHost");
}
EXPORT CUresult cuMemHostRegister_v2(void*, size_t, unsigned) { return CUDA_SUCCESS; }
EXPORT CUresult cuMemHostUnregister(void*) { return CUDA_SUCCESS; }
EXPORT CUresult cuMemGetInfo_v2(size_t* free_bytes, size_t* total) {
    std::lock_guard<std::mutex> l(g_mu);
    if (total) *total = total_mem();
    if (free_bytes) *free_bytes = g_used < total_mem() ? total_mem() - g_used : 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuDeviceGetDefaultMemPool(CUmemoryPool* pool, CUdevice d) {
    if (pool && need_device(d) == CUDA_SUCCESS) *pool = (CUmemoryPool)&g_ctx_token[d];
    return need_device(d);
}
EXPORT CUresult cuDeviceGetMemPool(CUmemoryPool* pool, CUdevice d) { return cuDeviceGetDefaultMemPool(pool, d); }
EXPORT CUresult cuMemPoolSetAttribute(CUmemoryPool, int, void*) { return CUDA_SUCCESS; }
EXPORT CUresult cuMemPoolGetAttribute(CUmemoryPool, int, void* v) {
    if (v) memset(v, 0, 8);
    return CUDA_SUCCESS;
}
EXPORT CUresult cuMemPoolTrimTo(CUmemoryPool, size_t) { return CUDA_SUCCESS; }

EXPORT CUresult cuMemcpyHtoD_v2(CUdeviceptr dst, const void* src, size_t n) {
    return copy((void*)(uintptr_t)dst, src, n, true, false, "cuMemcpyHtoD");
}
EXPORT CUresult cuMemcpyHtoDAsync_v2(CUdeviceptr dst, const void* src, size_t n, CUstream s) {
    CUresult r = copy((void*)(uintptr_t)dst, src, n, true, false, "cuMemcpyHtoDAsync");
    if (r != CUDA_SUCCESS || !n) return r;
    std::lock_guard<std::mutex> l(g_mu);
    uint64_t seq = ++g_seq[s];
    if (!pinned_locked(src, n)) return r;
    uintptr_t lo = (uintptr_t)src, hi = lo + n;
    for (const Pending& q : g_pending)
        if (!q.to_host && q.host < hi && lo < q.host + q.n && fnv((const void*)q.host, q.n) != q.hash)
            host_race(q, "when another copy was queued from it");
    g_pending.push_back(Pending{s, seq, lo, n, false, fnv(src, n), {}, "cuMemcpyHtoDAsync"});
    return r;
}
EXPORT CUresult cuMemcpyDtoH_v2(void* dst, CUdeviceptr src, size_t n) {
    return copy(dst, (const void*)(uintptr_t)src, n, false, true, "cuMemcpyDtoH");
}
EXPORT CUresult cuMemcpyDtoHAsync_v2(void* dst, CUdeviceptr src, size_t n, CUstream s) {
    {
        std::lock_guard<std::mutex> l(g_mu);
        if (n && dst && pinned_locked(dst, n)) {
            if (check_range_locked((const void*)(uintptr_t)src, n, "cuMemcpyDtoHAsync")) return CUDA_ERROR_INVALID_VALUE;
            const char* from = (const char*)(uintptr_t)src;
            g_pending.push_back(
                Pending{s, ++g_seq[s], (uintptr_t)dst, n, true, 0, std::vector<char>(from, from + n), "cuMemcpyDtoHAsync"});
            memset(dst, 0xFF, n);
            return CUDA_SUCCESS;
        }
        if (n) ++g_seq[s];
    }
    return copy(dst, (const void*)(uintptr_t)src, n, false, true, "cuMemcpyDtoHAsync");
}
EXPORT CUresult cuMemcpyDtoD_v2(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    return copy((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, true, true, "cuMemcpyDtoD");
}
EXPORT CUresult cuMemcpyDtoDAsync_v2(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    return copy((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, true, true, "cuMemcpyDtoDAsync");
}
EXPORT CUresult cuMemcpyAsync(CUdeviceptr dst, CUdeviceptr src, size_t n, CUstream) {
    // unified addressing: either side may be host memory
    std::unique_lock<std::mutex> l(g_mu);
    bool dd = find_alloc((uintptr_t)dst, n) != g_allocs.end(), sd = find_alloc((uintptr_t)src, n) != g_allocs.end();
    l.unlock();
    return copy((void*)(uintptr_t)dst, (const void*)(uintptr_t)src, n, dd, sd, "cuMemcpyAsync");
}
EXPORT CUresult cuMemcpy(CUdeviceptr dst, CUdeviceptr src, size_t n) { return cuMemcpyAsync(dst, src, n, nullptr); }
EXPORT CUresult cuMemsetD8_v2(CUdeviceptr dst, unsigned char v, size_t n) { return fill(dst, &v, 1, n, "cuMemsetD8"); }
EXPORT CUresult cuMemsetD8Async(CUdeviceptr dst, unsigned char v, size_t n, CUstream) {
    return fill(dst, &v, 1, n, "cuMemsetD8Async");
}
EXPORT CUresult cuMemsetD16_v2(CUdeviceptr dst, unsigned short v, size_t n) { return fill(dst, &v, 2, n, "cuMemsetD16"); }
EXPORT CUresult cuMemsetD16Async(CUdeviceptr dst, unsigned short v, size_t n, CUstream) {
    return fill(dst, &v, 2, n, "cuMemsetD16Async");
}
EXPORT CUresult cuMemsetD32_v2(CUdeviceptr dst, unsigned v, size_t n) { return fill(dst, &v, 4, n, "cuMemsetD32"); }
EXPORT CUresult cuMemsetD32Async(CUdeviceptr dst, unsigned v, size_t n, CUstream) {
    return fill(dst, &v, 4, n, "cuMemsetD32Async");
}
EXPORT CUresult cuMemPrefetchAsync_v2(CUdeviceptr, size_t, int, unsigned, CUstream) { return CUDA_SUCCESS; }
EXPORT CUresult cuMemAdvise_v2(CUdeviceptr, size_t, int, int) { return CUDA_SUCCESS; }
EXPORT CUresult cuPointerGetAttribute(void* data, int attr, CUdeviceptr p) {
    if (!data) return CUDA_ERROR_INVALID_VALUE;
    std::lock_guard<std::mutex> l(g_mu);
    auto it = find_alloc((uintptr_t)p, 0);
    if (attr == 2) {  // CU_POINTER_ATTRIBUTE_MEMORY_TYPE: 1 host, 2 device
        *(unsigned*)data = it == g_allocs.end() || it->second.host ? 1u : 2u;
        return CUDA_SUCCESS;
    }
    return CUDA_ERROR_NOT_SUPPORTED;
}

// ---- modules and launches

EXPORT CUresult cuModuleLoadData(CUmodule* out, const void* image) {
    if (!out || !image) return CUDA_ERROR_INVALID_VALUE;
    swgpu_blob b;
    if (!swgpu_parse_blob(static_cast<const char*>(image), &b)) {
        say("cuModuleLoadData: not a software-GPU module (a real CUBIN, perhaps from a kernel cache shared with real "
            "CUDA? set LEWEL_CACHE_DIR to a folder of its own, as scripts/emu-env.sh does)");
        return CUDA_ERROR_INVALID_IMAGE;
    }
    std::string why;
    void* dl = nullptr;
    const swgpu_module_info* info = swgpu_open_kernel_library(b, &dl, &why);
    if (!info) {
        say("%s", why.c_str());
        return CUDA_ERROR_INVALID_IMAGE;
    }
    *out = new Module{dl, info, b.file};
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleLoad(CUmodule*, const char* path) {
    say("cuModuleLoad(%s): loading modules from files is not emulated", path ? path : "?");
    return CUDA_ERROR_NOT_SUPPORTED;
}
EXPORT CUresult cuModuleUnload(CUmodule m) {
    delete static_cast<Module*>(m);  // the library stays loaded: functions may outlive the handle
    return CUDA_SUCCESS;
}
EXPORT CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    if (!f || !m || !name) return CUDA_ERROR_INVALID_VALUE;
    auto* mod = static_cast<Module*>(m);
    for (int i = 0; i < mod->info->count; i++)
        if (!strcmp(mod->info->kernels[i].name, name)) {
            *f = new Function{mod, &mod->info->kernels[i]};
            return CUDA_SUCCESS;
        }
    say("cuModuleGetFunction: no kernel '%s' in kernels/%s (the software GPU exports the names listed by "
        "EXPORT_F32_BF16 and extern \"C\" __global__)",
        name, mod->file.c_str());
    return CUDA_ERROR_NOT_FOUND;
}
EXPORT CUresult cuModuleGetGlobal_v2(CUdeviceptr*, size_t*, CUmodule, const char* name) {
    say("cuModuleGetGlobal(%s): module globals are not emulated", name ? name : "?");
    return CUDA_ERROR_NOT_FOUND;
}
EXPORT CUresult cuFuncGetAttribute(int* v, int attr, CUfunction) {
    if (!v) return CUDA_ERROR_INVALID_VALUE;
    switch (attr) {
        case 0: *v = 1024; break;  // MAX_THREADS_PER_BLOCK
        case 4: *v = 32; break;    // NUM_REGS
        case 5: *v = 90; break;    // PTX_VERSION
        case 6: *v = 90; break;    // BINARY_VERSION
        default: *v = 0;
    }
    return CUDA_SUCCESS;
}
EXPORT CUresult cuFuncSetAttribute(CUfunction, int, int) { return CUDA_SUCCESS; }
EXPORT CUresult cuFuncSetCacheConfig(CUfunction, int) { return CUDA_SUCCESS; }
EXPORT CUresult cuOccupancyMaxActiveBlocksPerMultiprocessor(int* n, CUfunction, int block, size_t) {
    if (!n) return CUDA_ERROR_INVALID_VALUE;
    *n = block > 0 ? 2048 / block : 0;
    return CUDA_SUCCESS;
}
EXPORT CUresult cuOccupancyMaxActiveBlocksPerMultiprocessorWithFlags(int* n, CUfunction f, int block, size_t s,
                                                                     unsigned) {
    return cuOccupancyMaxActiveBlocksPerMultiprocessor(n, f, block, s);
}
EXPORT CUresult cuOccupancyMaxPotentialBlockSize(int* grid, int* block, CUfunction, void*, size_t, int limit) {
    if (grid) *grid = 132 * 2;
    if (block) *block = limit > 0 && limit < 1024 ? limit : 1024;
    return CUDA_SUCCESS;
}

EXPORT CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by,
                               unsigned bz, unsigned shared_bytes, CUstream, void** params, void** extra) {
    if (!f) return CUDA_ERROR_INVALID_HANDLE;
    auto* fn = static_cast<Function*>(f);
    if (extra) {
        say("kernel %s: cuLaunchKernel's `extra` argument packing is not emulated", fn->kernel->name);
        return CUDA_ERROR_NOT_SUPPORTED;
    }
    if (shared_bytes) {
        say("kernel %s: %u bytes of dynamic shared memory requested; the kernels use only static __shared__ "
            "arrays, and the software GPU emulates only those",
            fn->kernel->name, shared_bytes);
        return CUDA_ERROR_INVALID_VALUE;
    }
    std::lock_guard<std::mutex> l(g_mu);
    return fn->kernel->launch(fn->kernel->fn, fn->kernel->name, swgpu_dim3{gx, gy, gz}, swgpu_dim3{bx, by, bz}, params);
}
EXPORT CUresult cuLaunchCooperativeKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx,
                                          unsigned by, unsigned bz, unsigned shared_bytes, CUstream s, void** params) {
    return cuLaunchKernel(f, gx, gy, gz, bx, by, bz, shared_bytes, s, params, nullptr);
}
