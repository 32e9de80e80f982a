// libnccl stand-in for the software GPU: the NCCL calls lewel makes, between processes on one
// machine over POSIX shared memory. Test infrastructure only: never linked into lewel.
//
// Device memory is host memory (include/swgpu.h). A collective queued on the NULL stream runs to
// completion inside its call; one queued on a stream the program made is deferred through the
// libcuda stand-in (swgpu_stream_defer) until the program's event waits or synchronizations say it
// must have run, so reading its result too early reads the old values, as on a GPU; its failure
// then shows in ncclCommGetAsyncError, as a real NCCL's would. Either way, when it runs, each rank
// copies its part into its own slot of a shared
// segment, the ranks meet at a barrier, each reads every slot and combines them **in rank order**
// (every rank gets the same bits, run after run), and they meet again before the slots are reused.
// Buffers longer than a slot go through in chunks.
//
// The segment is named by the unique id (ncclGetUniqueId draws 64 random bits), created by the
// first rank to arrive and unlinked by rank 0 once every rank has joined. A barrier that waits on
// a rank which aborted, destroyed its communicator or whose process is gone fails at once with a
// line naming that rank; one that waits longer than SWGPU_NCCL_TIMEOUT_S (default 300) fails
// naming the ranks it waited for. The failure is returned (ncclRemoteError / ncclSystemError) and
// kept for ncclCommGetAsyncError, as a real NCCL reports a peer's failure.
//
// Env: SWGPU_NCCL_TIMEOUT_S   barrier and join timeout in seconds (default 300)
//      SWGPU_NCCL_CHUNK_KIB   slot size per rank (default 1024)
#include <atomic>
#include <cerrno>
#include <cstdarg>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <fcntl.h>
#include <new>
#include <sched.h>
#include <signal.h>
#include <string>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "../blas/common.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef enum {
    ncclSuccess = 0,
    ncclUnhandledCudaError = 1,
    ncclSystemError = 2,
    ncclInternalError = 3,
    ncclInvalidArgument = 4,
    ncclInvalidUsage = 5,
    ncclRemoteError = 6,
    ncclInProgress = 7,
} ncclResult_t;

enum { tInt8 = 0, tUint8 = 1, tInt32 = 2, tUint32 = 3, tInt64 = 4, tUint64 = 5, tFloat16 = 6,
       tFloat32 = 7, tFloat64 = 8, tBfloat16 = 9 };
enum { opSum = 0, opProd = 1, opMax = 2, opMin = 3, opAvg = 4 };

struct ncclUniqueId {
    char internal[128];
};

namespace {

const char kIdMagic[16] = "swgpu-nccl-id";
const uint64_t kSegMagic = 0x6c63636e75706773ull;  // "sgpuncl"

struct RankSlot {
    std::atomic<int32_t> pid;     // 0 until the rank joins
    std::atomic<uint32_t> state;  // 0 absent, 1 joined, 2 destroyed, 3 aborted
    std::atomic<uint64_t> epoch;  // barriers passed
    char pad[48];
};

struct Header {
    std::atomic<uint64_t> magic;  // written last by the creator
    uint32_t nranks;
    uint32_t pad;
    uint64_t chunk;  // slot bytes per rank
    RankSlot ranks[1];
};

// What each rank says the collective in progress is (checked to agree before any data moves).
struct Call {
    uint64_t op;     // collective << 32 | data type << 16 | reduction op << 8 | root
    uint64_t count;
};

size_t header_bytes(int n) {
    size_t b = sizeof(Header) + sizeof(RankSlot) * (size_t)(n - 1) + sizeof(Call) * (size_t)n;
    return (b + 4095) & ~size_t(4095);
}

double timeout_s() {
    const char* s = getenv("SWGPU_NCCL_TIMEOUT_S");
    double v = s && *s ? atof(s) : 300.0;
    return v > 0 ? v : 300.0;
}

size_t chunk_bytes() {
    const char* s = getenv("SWGPU_NCCL_CHUNK_KIB");
    long v = s && *s ? atol(s) : 1024;
    if (v < 1) v = 1;
    return (size_t)v << 10;
}

using swb::now_s;

thread_local std::string g_last;  // ncclGetLastError

ncclResult_t fail(ncclResult_t r, int rank, const char* fmt, ...) {
    char buf[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(buf, sizeof buf, fmt, ap);
    va_end(ap);
    g_last = buf;
    if (rank >= 0)
        fprintf(stderr, "swgpu nccl: rank %d: %s\n", rank, buf);
    else
        fprintf(stderr, "swgpu nccl: %s\n", buf);
    return r;
}

// A process that no longer runs (or a zombie nobody has reaped).
bool process_gone(int pid) {
    if (pid <= 0) return false;
    if (kill(pid, 0) != 0 && errno == ESRCH) return true;
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/stat", pid);
    FILE* f = fopen(path, "r");
    if (!f) return false;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    const char* p = strrchr(buf, ')');
    return p && p[1] == ' ' && (p[2] == 'Z' || p[2] == 'X');
}

// Sleeps a little longer each time: waiting ranks leave the cores to the ranks still computing.
struct Backoff {
    int n = 0;
    void wait() {
        if (n < 20) {
            sched_yield();
        } else {
            long us = n < 200 ? 50 : 1000;
            struct timespec ts = {0, us * 1000};
            nanosleep(&ts, nullptr);
        }
        n++;
    }
};

}  // namespace

struct ncclComm {
    int rank, nranks, device;
    Header* h;
    size_t map_bytes;
    uint8_t* data;  // nranks slots of h->chunk bytes
    uint64_t epoch;
    ncclResult_t async;
    char name[64];
    int pending;  // deferred collectives not yet run
    bool dead;    // destroyed or aborted while some were pending: the last one frees it
};
typedef ncclComm* ncclComm_t;

namespace {

uint8_t* slot(ncclComm* c, int r) { return c->data + (size_t)r * c->h->chunk; }

Call* calls(ncclComm* c) { return (Call*)((uint8_t*)c->h + sizeof(Header) + sizeof(RankSlot) * (size_t)(c->nranks - 1)); }

ncclResult_t barrier(ncclComm* c, const char* what);

const char* kind_name(uint64_t k) {
    switch (k) {
        case 1: return "ncclAllReduce";
        case 2: return "ncclReduce";
        case 3: return "ncclBroadcast";
        case 4: return "ncclAllGather";
        default: return "?";
    }
}

// Every rank must be making the same call (collective, type, op, root, count): a mismatch means
// the ranks' programs diverged, which real NCCL turns into a hang or garbage. Here it fails,
// naming both calls. SWGPU_NCCL_TRACE=1 prints each call on stderr.
ncclResult_t agree(ncclComm* c, uint64_t kind, int t, int op, int root, size_t count) {
    Call mine = {kind << 32 | (uint64_t)t << 16 | (uint64_t)op << 8 | (uint64_t)(root & 0xff), count};
    calls(c)[c->rank] = mine;
    static const bool trace = swb::env_flag("SWGPU_NCCL_TRACE", false);
    if (trace)
        fprintf(stderr, "swgpu nccl: rank %d: call %llu: %s type %d op %d root %d count %zu\n", c->rank,
                (unsigned long long)(c->epoch / 2), kind_name(kind), t, op, root, count);
    ncclResult_t r = barrier(c, kind_name(kind));
    if (r != ncclSuccess) return r;
    for (int k = 0; k < c->nranks; k++) {
        Call o = calls(c)[k];
        if (o.op != mine.op || o.count != mine.count)
            return c->async = fail(ncclInvalidUsage, c->rank,
                                   "%s of %zu elements (type %d, op %d, root %d) here, but rank %d called %s of %llu "
                                   "elements (type %d, op %d, root %d): the ranks' programs diverged",
                                   kind_name(kind), count, t, op, root, k, kind_name(o.op >> 32),
                                   (unsigned long long)o.count, (int)(o.op >> 16 & 0xff), (int)(o.op >> 8 & 0xff),
                                   (int)(o.op & 0xff));
    }
    return ncclSuccess;
}

// Every rank has passed as many barriers as this one: the rest can read the slots (or reuse them).
ncclResult_t barrier(ncclComm* c, const char* what) {
    uint64_t my = ++c->epoch;
    c->h->ranks[c->rank].epoch.store(my, std::memory_order_release);
    double start = now_s(), last_check = start, limit = timeout_s();
    Backoff b;
    for (;;) {
        bool all = true;
        for (int r = 0; r < c->nranks; r++)
            if (c->h->ranks[r].epoch.load(std::memory_order_acquire) < my) all = false;
        if (all) return ncclSuccess;
        double t = now_s();
        if (t - last_check > 0.05) {
            last_check = t;
            for (int r = 0; r < c->nranks; r++) {
                RankSlot& s = c->h->ranks[r];
                if (s.epoch.load(std::memory_order_acquire) >= my) continue;
                uint32_t st = s.state.load(std::memory_order_acquire);
                if (st == 2 || st == 3)
                    return c->async = fail(ncclRemoteError, c->rank, "%s: rank %d %s its communicator", what, r,
                                           st == 3 ? "aborted" : "destroyed");
                if (process_gone(s.pid.load()))
                    return c->async = fail(ncclRemoteError, c->rank, "%s: rank %d (pid %d) is gone", what, r,
                                           s.pid.load());
            }
            if (t - start > limit) {
                std::string late;
                for (int r = 0; r < c->nranks; r++)
                    if (c->h->ranks[r].epoch.load() < my) late += (late.empty() ? "" : ",") + std::to_string(r);
                return c->async = fail(ncclSystemError, c->rank, "%s: waited %.0f s for rank(s) %s", what, t - start,
                                       late.c_str());
            }
        }
        b.wait();
    }
}

size_t type_size(int t) {
    switch (t) {
        case tInt8: case tUint8: return 1;
        case tFloat16: case tBfloat16: return 2;
        case tInt32: case tUint32: case tFloat32: return 4;
        case tInt64: case tUint64: case tFloat64: return 8;
        default: return 0;
    }
}

template <typename T>
T combine(T a, T b, int op) {
    switch (op) {
        case opProd: return a * b;
        case opMax: return a > b ? a : b;
        case opMin: return a < b ? a : b;
        default: return a + b;
    }
}

// out[i] = slot[0][i] op slot[1][i] op ... in rank order, for `n` elements at element offset 0.
template <typename T>
void reduce_typed(ncclComm* c, void* out, size_t n, int op) {
    T* o = (T*)out;
    for (size_t i = 0; i < n; i++) {
        T acc = ((const T*)slot(c, 0))[i];
        for (int r = 1; r < c->nranks; r++) acc = combine(acc, ((const T*)slot(c, r))[i], op);
        if (op == opAvg) acc = (T)(acc / (T)c->nranks);
        o[i] = acc;
    }
}

template <float (*Load)(uint16_t), uint16_t (*Store)(float)>
void reduce_half(ncclComm* c, void* out, size_t n, int op) {
    uint16_t* o = (uint16_t*)out;
    for (size_t i = 0; i < n; i++) {
        float acc = Load(((const uint16_t*)slot(c, 0))[i]);
        for (int r = 1; r < c->nranks; r++) acc = combine(acc, Load(((const uint16_t*)slot(c, r))[i]), op);
        if (op == opAvg) acc /= (float)c->nranks;
        o[i] = Store(acc);
    }
}

void reduce_any(ncclComm* c, void* out, size_t n, int t, int op) {
    switch (t) {
        case tInt8: reduce_typed<int8_t>(c, out, n, op); break;
        case tUint8: reduce_typed<uint8_t>(c, out, n, op); break;
        case tInt32: reduce_typed<int32_t>(c, out, n, op); break;
        case tUint32: reduce_typed<uint32_t>(c, out, n, op); break;
        case tInt64: reduce_typed<int64_t>(c, out, n, op); break;
        case tUint64: reduce_typed<uint64_t>(c, out, n, op); break;
        case tFloat32: reduce_typed<float>(c, out, n, op); break;
        case tFloat64: reduce_typed<double>(c, out, n, op); break;
        case tFloat16: reduce_half<swb::f16_to_f32, swb::f32_to_f16>(c, out, n, op); break;
        case tBfloat16: reduce_half<swb::bf16_to_f32, swb::f32_to_bf16>(c, out, n, op); break;
    }
}

// The buffer lies in one live device allocation (the libcuda stand-in's table, where it is loaded).
bool device_range_ok(const void* p, size_t bytes, const char* what) { return swb::range_ok(p, bytes, what); }

ncclResult_t check_call(ncclComm* c, const char* what, int t, int op) {
    if (!c || !c->h) return fail(ncclInvalidArgument, -1, "%s: no communicator", what);
    if (c->async != ncclSuccess)
        return fail(c->async, c->rank, "%s: the communicator has already failed (%s)", what, g_last.c_str());
    if (type_size(t) == 0) return fail(ncclInvalidArgument, c->rank, "%s: data type %d", what, t);
    if (op < opSum || op > opAvg) return fail(ncclInvalidArgument, c->rank, "%s: reduction op %d", what, op);
    return ncclSuccess;
}

enum : uint64_t { kAllReduce = 1, kReduce = 2, kBroadcast = 3, kAllGather = 4 };

// One collective's arguments, checked.
struct Job {
    ncclComm* c;
    uint64_t kind;
    const void* send;
    void* recv;
    size_t count;
    int t, op, root;
};

// The data movement of a checked collective, every rank in it together, a slot's worth at a time.
ncclResult_t exchange(const Job& j) {
    ncclComm* c = j.c;
    const char* what = kind_name(j.kind);
    ncclResult_t r = agree(c, j.kind, j.t, j.op, j.root, j.count);
    if (r != ncclSuccess) return r;
    size_t es = type_size(j.t), per = c->h->chunk / es;
    const uint8_t* send = (const uint8_t*)j.send;
    uint8_t* recv = (uint8_t*)j.recv;
    bool root = c->rank == j.root;
    if (j.kind == kAllReduce && j.count == 1 && j.t == tFloat32 && swb::env_flag("SWGPU_NCCL_TRACE", false))
        fprintf(stderr, "swgpu nccl: rank %d: all-reduce of one float: %.9g\n", c->rank, *(const float*)send);
    for (size_t off = 0; off < j.count; off += per) {
        size_t n = j.count - off < per ? j.count - off : per;
        if (j.kind != kBroadcast)
            memcpy(slot(c, c->rank), send + off * es, n * es);
        else if (root)
            memcpy(slot(c, j.root), send + off * es, n * es);
        if ((r = barrier(c, what)) != ncclSuccess) return r;
        switch (j.kind) {
            case kAllReduce: reduce_any(c, recv + off * es, n, j.t, j.op); break;
            case kReduce:
                if (root) reduce_any(c, recv + off * es, n, j.t, j.op);
                break;
            case kBroadcast: memcpy(recv + off * es, slot(c, j.root), n * es); break;
            case kAllGather:
                for (int k = 0; k < c->nranks; k++) memcpy(recv + ((size_t)k * j.count + off) * es, slot(c, k), n * es);
                break;
        }
        if ((r = barrier(c, what)) != ncclSuccess) return r;
    }
    if (j.kind == kBroadcast && swb::env_flag("SWGPU_NCCL_TRACE", false)) {
        uint64_t h = 1469598103934665603ull;
        for (size_t i = 0; i < j.count * es; i++) h = (h ^ recv[i]) * 1099511628211ull;
        fprintf(stderr, "swgpu nccl: rank %d: broadcast result %016llx at %p\n", c->rank, (unsigned long long)h,
                j.recv);
    }
    return ncclSuccess;
}

void unmap_and_free(ncclComm* c) {
    if (c->h) munmap(c->h, c->map_bytes);
    delete c;
}

// A deferred collective's turn (see the top): its failure is kept for ncclCommGetAsyncError.
void run_job(void* p) {
    Job* j = (Job*)p;
    ncclComm* c = j->c;
    if (!c->dead && c->async == ncclSuccess) {
        ncclResult_t r = exchange(*j);
        if (r != ncclSuccess && c->async == ncclSuccess) c->async = r;
    }
    delete j;
    if (--c->pending == 0 && c->dead) unmap_and_free(c);
}

// Runs a checked collective now (NULL stream) or defers it on its stream.
ncclResult_t launch(const Job& j, void* stream) {
    if (!stream) return exchange(j);
    j.c->pending++;
    swb::stream_defer(stream, run_job, new Job(j), kind_name(j.kind));
    return ncclSuccess;
}

}  // namespace

EXPORT ncclResult_t ncclGetVersion(int* v) {
    if (!v) return ncclInvalidArgument;
    *v = 22799;  // 2.27.99: no real NCCL has it
    return ncclSuccess;
}

EXPORT const char* ncclGetErrorString(ncclResult_t r) {
    switch (r) {
        case ncclSuccess: return "no error";
        case ncclUnhandledCudaError: return "unhandled cuda error";
        case ncclSystemError: return "unhandled system error";
        case ncclInternalError: return "internal error";
        case ncclInvalidArgument: return "invalid argument";
        case ncclInvalidUsage: return "invalid usage";
        case ncclRemoteError: return "remote process exited or there was a network error";
        case ncclInProgress: return "NCCL operation in progress";
        default: return "unknown result code";
    }
}

EXPORT const char* ncclGetLastError(ncclComm_t) { return g_last.c_str(); }

EXPORT ncclResult_t ncclGetUniqueId(ncclUniqueId* id) {
    if (!id) return ncclInvalidArgument;
    memset(id->internal, 0, sizeof id->internal);
    memcpy(id->internal, kIdMagic, sizeof kIdMagic);
    uint64_t r = 0;
    int fd = open("/dev/urandom", O_RDONLY);
    if (fd < 0 || read(fd, &r, sizeof r) != (ssize_t)sizeof r) {
        if (fd >= 0) close(fd);
        return fail(ncclSystemError, -1, "ncclGetUniqueId: cannot read /dev/urandom");
    }
    close(fd);
    snprintf(id->internal + 16, 32, "%016llx", (unsigned long long)r);
    return ncclSuccess;
}

namespace {

ncclResult_t init_rank(ncclComm_t* out, int nranks, ncclUniqueId id, int rank) {
    if (!out) return fail(ncclInvalidArgument, rank, "ncclCommInitRank: no output pointer");
    *out = nullptr;
    if (nranks < 1 || rank < 0 || rank >= nranks)
        return fail(ncclInvalidArgument, rank, "ncclCommInitRank: rank %d of %d", rank, nranks);
    if (memcmp(id.internal, kIdMagic, sizeof kIdMagic) != 0)
        return fail(ncclInvalidArgument, rank, "ncclCommInitRank: the unique id was not made by ncclGetUniqueId");
    char token[17];
    memcpy(token, id.internal + 16, 16);
    token[16] = 0;
    ncclComm* c = new (std::nothrow) ncclComm();
    if (!c) return fail(ncclSystemError, rank, "out of memory");
    c->rank = rank;
    c->nranks = nranks;
    c->async = ncclSuccess;
    snprintf(c->name, sizeof c->name, "/swgpu-nccl-%s", token);
    typedef int (*getdev_fn)(int*);
    getdev_fn getdev = (getdev_fn)dlsym(RTLD_DEFAULT, "cuCtxGetDevice");
    c->device = 0;
    if (getdev) getdev(&c->device);

    size_t hb = header_bytes(nranks), chunk = chunk_bytes();
    size_t total = hb + chunk * (size_t)nranks;
    bool creator = true;
    int fd = shm_open(c->name, O_RDWR | O_CREAT | O_EXCL, 0600);
    if (fd < 0 && errno == EEXIST) {
        creator = false;
        fd = shm_open(c->name, O_RDWR, 0600);
    }
    if (fd < 0) {
        int e = errno;
        std::string name = c->name;
        delete c;
        return fail(ncclSystemError, rank, "shm_open %s: %s", name.c_str(), strerror(e));
    }
    double start = now_s(), limit = timeout_s();
    if (creator) {
        if (ftruncate(fd, (off_t)total) != 0) {
            int e = errno;
            close(fd);
            shm_unlink(c->name);
            delete c;
            return fail(ncclSystemError, rank, "ftruncate of the shared segment to %zu bytes: %s", total, strerror(e));
        }
    } else {
        // The creator sizes the segment before it writes the magic.
        Backoff b;
        struct stat st;
        while (fstat(fd, &st) == 0 && (size_t)st.st_size < hb) {
            if (now_s() - start > limit) {
                close(fd);
                delete c;
                return fail(ncclSystemError, rank, "the shared segment was never set up");
            }
            b.wait();
        }
        if ((size_t)st.st_size != total) {
            close(fd);
            delete c;
            return fail(ncclInvalidUsage, rank,
                        "ncclCommInitRank: the ranks disagree on the number of ranks or SWGPU_NCCL_CHUNK_KIB "
                        "(segment of %zu bytes, this rank expects %zu)", (size_t)st.st_size, total);
        }
    }
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    close(fd);
    if (p == MAP_FAILED) {
        if (creator) shm_unlink(c->name);
        delete c;
        return fail(ncclSystemError, rank, "mmap of the shared segment: %s", strerror(errno));
    }
    c->h = (Header*)p;
    c->map_bytes = total;
    c->data = (uint8_t*)p + hb;
    if (creator) {
        c->h->nranks = (uint32_t)nranks;
        c->h->chunk = chunk;
        c->h->magic.store(kSegMagic, std::memory_order_release);
    } else {
        Backoff b;
        while (c->h->magic.load(std::memory_order_acquire) != kSegMagic) {
            if (now_s() - start > limit) {
                munmap(p, total);
                delete c;
                return fail(ncclSystemError, rank, "the shared segment was never set up");
            }
            b.wait();
        }
        if ((int)c->h->nranks != nranks) {
            int theirs = (int)c->h->nranks;
            munmap(p, total);
            delete c;
            return fail(ncclInvalidUsage, rank, "ncclCommInitRank: this rank says %d ranks, rank(s) before it %d",
                        nranks, theirs);
        }
    }
    int32_t zero = 0;
    if (!c->h->ranks[rank].pid.compare_exchange_strong(zero, (int32_t)getpid())) {
        int other = zero;
        munmap(p, total);
        delete c;
        return fail(ncclInvalidUsage, rank, "ncclCommInitRank: rank %d already joined (pid %d)", rank, other);
    }
    c->h->ranks[rank].state.store(1, std::memory_order_release);
    // Every rank joined: then the name can go (the mappings stay).
    Backoff b;
    for (;;) {
        bool all = true;
        for (int r = 0; r < nranks; r++)
            if (c->h->ranks[r].pid.load(std::memory_order_acquire) == 0) all = false;
        if (all) break;
        if (now_s() - start > limit) {
            std::string missing;
            for (int r = 0; r < nranks; r++)
                if (c->h->ranks[r].pid.load() == 0) missing += (missing.empty() ? "" : ",") + std::to_string(r);
            c->h->ranks[rank].state.store(3);
            if (rank == 0) shm_unlink(c->name);
            munmap(p, total);
            delete c;
            return fail(ncclSystemError, rank, "ncclCommInitRank: rank(s) %s never joined in %.0f s", missing.c_str(),
                        limit);
        }
        b.wait();
    }
    if (rank == 0) shm_unlink(c->name);
    *out = c;
    return ncclSuccess;
}

void release(ncclComm* c, uint32_t state) {
    if (!c) return;
    if (c->h) c->h->ranks[c->rank].state.store(state, std::memory_order_release);
    if (c->pending > 0)
        c->dead = true;  // the last deferred collective frees it (without running)
    else
        unmap_and_free(c);
}

}  // namespace

EXPORT ncclResult_t ncclCommInitRank(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank) {
    return init_rank(comm, nranks, id, rank);
}
// The config (blocking or not, CTA counts) changes nothing here: the communicator is ready on return.
EXPORT ncclResult_t ncclCommInitRankConfig(ncclComm_t* comm, int nranks, ncclUniqueId id, int rank, void*) {
    return init_rank(comm, nranks, id, rank);
}
EXPORT ncclResult_t ncclCommInitAll(ncclComm_t*, int, const int*) {
    return fail(ncclInvalidUsage, -1, "ncclCommInitAll (many GPUs in one process) is not emulated");
}
EXPORT ncclResult_t ncclCommFinalize(ncclComm_t c) { return c ? ncclSuccess : ncclInvalidArgument; }
EXPORT ncclResult_t ncclCommDestroy(ncclComm_t c) {
    release(c, 2);
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommAbort(ncclComm_t c) {
    release(c, 3);
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommGetAsyncError(ncclComm_t c, ncclResult_t* e) {
    if (!c || !e) return ncclInvalidArgument;
    *e = c->async;
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommCount(const ncclComm_t c, int* n) {
    if (!c || !n) return ncclInvalidArgument;
    *n = c->nranks;
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommCuDevice(const ncclComm_t c, int* d) {
    if (!c || !d) return ncclInvalidArgument;
    *d = c->device;
    return ncclSuccess;
}
EXPORT ncclResult_t ncclCommUserRank(const ncclComm_t c, int* r) {
    if (!c || !r) return ncclInvalidArgument;
    *r = c->rank;
    return ncclSuccess;
}
// Each collective runs inside its own call, so a group changes nothing.
EXPORT ncclResult_t ncclGroupStart() { return ncclSuccess; }
EXPORT ncclResult_t ncclGroupEnd() { return ncclSuccess; }

EXPORT ncclResult_t ncclAllReduce(const void* send, void* recv, size_t count, int t, int op, ncclComm_t c, void* s) {
    ncclResult_t r = check_call(c, "ncclAllReduce", t, op);
    if (r != ncclSuccess) return r;
    size_t es = type_size(t);
    if (!device_range_ok(send, count * es, "ncclAllReduce sendbuff") ||
        !device_range_ok(recv, count * es, "ncclAllReduce recvbuff"))
        return c->async = fail(ncclInvalidArgument, c->rank, "ncclAllReduce: a buffer outside device memory");
    return launch(Job{c, kAllReduce, send, recv, count, t, op, 0}, s);
}

EXPORT ncclResult_t ncclReduce(const void* send, void* recv, size_t count, int t, int op, int root, ncclComm_t c,
                               void* s) {
    ncclResult_t r = check_call(c, "ncclReduce", t, op);
    if (r != ncclSuccess) return r;
    if (root < 0 || root >= c->nranks) return fail(ncclInvalidArgument, c->rank, "ncclReduce: root %d", root);
    size_t es = type_size(t);
    if (!device_range_ok(send, count * es, "ncclReduce sendbuff") ||
        (c->rank == root && !device_range_ok(recv, count * es, "ncclReduce recvbuff")))
        return c->async = fail(ncclInvalidArgument, c->rank, "ncclReduce: a buffer outside device memory");
    return launch(Job{c, kReduce, send, recv, count, t, op, root}, s);
}

EXPORT ncclResult_t ncclBroadcast(const void* send, void* recv, size_t count, int t, int root, ncclComm_t c, void* s) {
    ncclResult_t r = check_call(c, "ncclBroadcast", t, opSum);
    if (r != ncclSuccess) return r;
    if (root < 0 || root >= c->nranks) return fail(ncclInvalidArgument, c->rank, "ncclBroadcast: root %d", root);
    size_t es = type_size(t);
    if ((c->rank == root && !device_range_ok(send, count * es, "ncclBroadcast sendbuff")) ||
        !device_range_ok(recv, count * es, "ncclBroadcast recvbuff"))
        return c->async = fail(ncclInvalidArgument, c->rank, "ncclBroadcast: a buffer outside device memory");
    return launch(Job{c, kBroadcast, send, recv, count, t, 0, root}, s);
}

EXPORT ncclResult_t ncclBcast(void* buf, size_t count, int t, int root, ncclComm_t c, void* s) {
    return ncclBroadcast(buf, buf, count, t, root, c, s);
}

EXPORT ncclResult_t ncclAllGather(const void* send, void* recv, size_t count, int t, ncclComm_t c, void* s) {
    ncclResult_t r = check_call(c, "ncclAllGather", t, opSum);
    if (r != ncclSuccess) return r;
    size_t es = type_size(t);
    if (!device_range_ok(send, count * es, "ncclAllGather sendbuff") ||
        !device_range_ok(recv, count * es * (size_t)c->nranks, "ncclAllGather recvbuff"))
        return c->async = fail(ncclInvalidArgument, c->rank, "ncclAllGather: a buffer outside device memory");
    // NCCL's in-place form is sendbuff == recvbuff + rank * sendcount; any other overlap is a race.
    const uint8_t *sb = (const uint8_t*)send, *rb = (const uint8_t*)recv;
    size_t part = count * es, whole = part * (size_t)c->nranks;
    if (sb < rb + whole && rb < sb + part && sb != rb + (size_t)c->rank * part)
        return c->async = fail(ncclInvalidArgument, c->rank,
                               "ncclAllGather: sendbuff overlaps recvbuff at byte %td, not at this rank's part "
                               "(%zu): not NCCL's in-place form",
                               sb - rb, (size_t)c->rank * part);
    return launch(Job{c, kAllGather, send, recv, count, t, 0, 0}, s);
}

EXPORT ncclResult_t ncclReduceScatter(const void*, void*, size_t, int, int, ncclComm_t c, void*) {
    return fail(ncclInvalidUsage, c ? c->rank : -1, "ncclReduceScatter is not emulated");
}
EXPORT ncclResult_t ncclSend(const void*, size_t, int, int, ncclComm_t c, void*) {
    return fail(ncclInvalidUsage, c ? c->rank : -1, "ncclSend is not emulated");
}
EXPORT ncclResult_t ncclRecv(void*, size_t, int, int, ncclComm_t c, void*) {
    return fail(ncclInvalidUsage, c ? c->rank : -1, "ncclRecv is not emulated");
}
