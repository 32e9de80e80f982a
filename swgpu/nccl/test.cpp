// Tests of the libnccl stand-in: ranks are forked processes sharing a unique id. Each case checks
// exact results (rank-order sums, chunked buffers, broadcast, all-gather, bf16) or that a failure
// (a peer killed, a peer that aborted, a world that never fills) ends the waiting rank with an
// error, quickly; and, with the libcuda stand-in loaded, that a collective on a side stream is
// deferred until an event wait behind it, and one queued without a wait before it ends the process.
// Usage: test LIBDIR (the folder holding libnccl.so.2 and libcuda.so.1). Exits nonzero on a failure.
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <dlfcn.h>
#include <functional>
#include <signal.h>
#include <string>
#include <sys/wait.h>
#include <unistd.h>
#include <vector>

struct Id {
    char internal[128];
};
typedef void* Comm;
typedef int (*get_id_t)(Id*);
typedef int (*init_t)(Comm*, int, Id, int);
typedef int (*allreduce_t)(const void*, void*, size_t, int, int, Comm, void*);
typedef int (*bcast_t)(const void*, void*, size_t, int, int, Comm, void*);
typedef int (*gather_t)(const void*, void*, size_t, int, Comm, void*);
typedef int (*destroy_t)(Comm);
typedef int (*async_t)(Comm, int*);

get_id_t get_id;
init_t init;
allreduce_t allreduce;
bcast_t bcast;
gather_t gather;
destroy_t destroy, abort_comm;
async_t async_error;
std::string g_libdir;

// The libcuda stand-in's calls the deferral cases make, loaded into the calling (forked) rank only.
struct Driver {
    int (*stream_create)(void**, unsigned);
    int (*event_create)(void**, unsigned);
    int (*event_record)(void*, void*);
    int (*wait_event)(void*, void*, unsigned);
    int (*mem_alloc)(unsigned long long*, size_t);
};
bool load_driver(Driver* d) {
    std::string lib = g_libdir + "/libcuda.so.1";
    void* h = dlopen(lib.c_str(), RTLD_NOW | RTLD_GLOBAL);
    if (!h) {
        fprintf(stderr, "dlopen %s: %s\n", lib.c_str(), dlerror());
        return false;
    }
    d->stream_create = (int (*)(void**, unsigned))dlsym(h, "cuStreamCreate");
    d->event_create = (int (*)(void**, unsigned))dlsym(h, "cuEventCreate");
    d->event_record = (int (*)(void*, void*))dlsym(h, "cuEventRecord");
    d->wait_event = (int (*)(void*, void*, unsigned))dlsym(h, "cuStreamWaitEvent");
    d->mem_alloc = (int (*)(unsigned long long*, size_t))dlsym(h, "cuMemAlloc_v2");
    return d->stream_create && d->event_create && d->event_record && d->wait_event && d->mem_alloc;
}

enum { Float32 = 7, Bfloat16 = 9, Sum = 0, Max = 2, Avg = 4, RemoteError = 6, SystemError = 2 };

int failures = 0;
#define CHECK(cond, ...)                                  \
    do {                                                  \
        if (!(cond)) {                                    \
            fprintf(stderr, "FAIL %s:%d: ", __FILE__, __LINE__); \
            fprintf(stderr, __VA_ARGS__);                 \
            fprintf(stderr, "\n");                        \
            return 1;                                     \
        }                                                 \
    } while (0)

// Runs body(rank) in `n` forked ranks; returns the number of ranks that exited nonzero.
int ranks(int n, const std::function<int(int, Id)>& body, std::vector<int>* codes = nullptr) {
    Id id;
    if (get_id(&id) != 0) return n;
    std::vector<pid_t> pids;
    for (int r = 0; r < n; r++) {
        pid_t p = fork();
        if (p == 0) _exit(body(r, id));
        pids.push_back(p);
    }
    int bad = 0;
    for (pid_t p : pids) {
        int st = 0;
        waitpid(p, &st, 0);
        int code = WIFEXITED(st) ? WEXITSTATUS(st) : 128 + WTERMSIG(st);
        if (codes) codes->push_back(code);
        if (code != 0) bad++;
    }
    return bad;
}

// Rank 0 large, the others small: (a + b) + c and a + (b + c) round differently.
float val(int r, size_t i) { return (r == 0 ? 1e8f : 5.0f) * (float)((i % 7) + 1); }

void run(const char* name, bool ok) {
    printf("%-60s %s\n", name, ok ? "ok" : "FAILED");
    if (!ok) failures++;
}

int main(int argc, char** argv) {
    if (argc != 2) {
        fprintf(stderr, "usage: test LIBDIR\n");
        return 2;
    }
    g_libdir = argv[1];
    std::string lib = g_libdir + "/libnccl.so.2";
    void* h = dlopen(lib.c_str(), RTLD_NOW);
    if (!h) {
        fprintf(stderr, "dlopen %s: %s\n", lib.c_str(), dlerror());
        return 2;
    }
    get_id = (get_id_t)dlsym(h, "ncclGetUniqueId");
    init = (init_t)dlsym(h, "ncclCommInitRank");
    allreduce = (allreduce_t)dlsym(h, "ncclAllReduce");
    bcast = (bcast_t)dlsym(h, "ncclBroadcast");
    gather = (gather_t)dlsym(h, "ncclAllGather");
    destroy = (destroy_t)dlsym(h, "ncclCommDestroy");
    abort_comm = (destroy_t)dlsym(h, "ncclCommAbort");
    async_error = (async_t)dlsym(h, "ncclCommGetAsyncError");
    setenv("SWGPU_NCCL_CHUNK_KIB", "1", 1);  // 256 floats a slot: every buffer below is chunked

    // Sums in rank order, bit for bit, on every rank, through many chunks; then the average.
    run("all-reduce sums in rank order (3 ranks, 1000 floats, 4 chunks)", ranks(3, [](int r, Id id) {
            Comm c;
            CHECK(init(&c, 3, id, r) == 0, "init");
            std::vector<float> x(1000), y(1000);
            for (size_t i = 0; i < x.size(); i++) x[i] = val(r, i);
            CHECK(allreduce(x.data(), y.data(), x.size(), Float32, Sum, c, nullptr) == 0, "allreduce");
            for (size_t i = 0; i < y.size(); i++) {
                float want = (val(0, i) + val(1, i)) + val(2, i);
                CHECK(memcmp(&y[i], &want, 4) == 0, "rank %d elem %zu: %.9g, want %.9g", r, i, y[i], want);
            }
            CHECK(allreduce(x.data(), x.data(), x.size(), Float32, Avg, c, nullptr) == 0, "in place");
            for (size_t i = 0; i < x.size(); i++) {
                float want = ((val(0, i) + val(1, i)) + val(2, i)) / 3.0f;
                CHECK(x[i] == want, "avg elem %zu", i);
            }
            std::vector<float> m = {(float)r, (float)-r};
            CHECK(allreduce(m.data(), m.data(), 2, Float32, Max, c, nullptr) == 0, "max");
            CHECK(m[0] == 2.0f && m[1] == 0.0f, "max");
            destroy(c);
            return 0;
        }) == 0);

    run("broadcast from rank 1 and all-gather in rank order", ranks(2, [](int r, Id id) {
            Comm c;
            CHECK(init(&c, 2, id, r) == 0, "init");
            std::vector<float> b(700, (float)r);
            if (r == 1)
                for (size_t i = 0; i < b.size(); i++) b[i] = (float)i;
            CHECK(bcast(b.data(), b.data(), b.size(), Float32, 1, c, nullptr) == 0, "bcast");
            for (size_t i = 0; i < b.size(); i++) CHECK(b[i] == (float)i, "bcast elem %zu", i);
            std::vector<float> s(300), g(600);
            for (size_t i = 0; i < s.size(); i++) s[i] = (float)(r * 1000 + i);
            CHECK(gather(s.data(), g.data(), s.size(), Float32, c, nullptr) == 0, "gather");
            for (size_t i = 0; i < g.size(); i++) CHECK(g[i] == (float)((i / 300) * 1000 + i % 300), "gather %zu", i);
            destroy(c);
            return 0;
        }) == 0);

    // SyncBN's form: each rank writes its part of the result buffer and gathers in place.
    run("in-place all-gather (3 ranks, 300 floats each, chunked)", ranks(3, [](int r, Id id) {
            Comm c;
            CHECK(init(&c, 3, id, r) == 0, "init");
            std::vector<float> g(900, -1.0f);
            for (size_t i = 0; i < 300; i++) g[r * 300 + i] = (float)(r * 1000 + i);
            CHECK(gather(g.data() + r * 300, g.data(), 300, Float32, c, nullptr) == 0, "gather");
            for (size_t i = 0; i < g.size(); i++) CHECK(g[i] == (float)((i / 300) * 1000 + i % 300), "gather %zu", i);
            destroy(c);
            return 0;
        }) == 0);

    run("an all-gather whose buffers overlap otherwise is refused", ranks(2, [](int r, Id id) {
            Comm c;
            CHECK(init(&c, 2, id, r) == 0, "init");
            std::vector<float> g(600, 0.0f);
            // Rank 1 sends from part 0: it would overwrite what it sends.
            float* send = r == 1 ? g.data() : g.data() + 1;
            int got = gather(send, g.data(), 300, Float32, c, nullptr);
            if (r == 1) CHECK(got == 4, "rank 1: got %d, not ncclInvalidArgument", got);
            if (r == 0) CHECK(got == 4, "rank 0: got %d, not ncclInvalidArgument", got);
            abort_comm(c);
            return 0;
        }) == 0);

    run("bf16 all-reduce rounds once to nearest even", ranks(2, [](int r, Id id) {
            Comm c;
            CHECK(init(&c, 2, id, r) == 0, "init");
            // 1 + 2^-8 (rank 0: 1.0, rank 1: 2^-8) is halfway between two bf16 values: ties to 1.0.
            uint16_t x = r == 0 ? 0x3f80 : 0x3b80, y = 0;
            CHECK(allreduce(&x, &y, 1, Bfloat16, Sum, c, nullptr) == 0, "allreduce");
            CHECK(y == 0x3f80, "got %04x", y);
            destroy(c);
            return 0;
        }) == 0);

    // A rank killed while the other waits in a collective: the waiting one fails within seconds,
    // naming it, and its communicator reports the error afterwards.
    std::vector<int> codes;
    auto t0 = std::chrono::steady_clock::now();
    ranks(2, [](int r, Id id) {
        Comm c;
        CHECK(init(&c, 2, id, r) == 0, "init");
        float x = 1, y = 0;
        CHECK(allreduce(&x, &y, 1, Float32, Sum, c, nullptr) == 0, "first allreduce");
        if (r == 1) raise(SIGKILL);
        int e = allreduce(&x, &y, 1, Float32, Sum, c, nullptr);
        CHECK(e == RemoteError, "allreduce with a dead peer returned %d", e);
        int a = -1;
        async_error(c, &a);
        CHECK(a == RemoteError, "async error %d", a);
        abort_comm(c);
        return 0;
    }, &codes);
    double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
    run("a killed peer fails the waiting rank within 5 s", codes.size() == 2 && codes[0] == 0 && dt < 5);

    codes.clear();
    ranks(2, [](int r, Id id) {
        Comm c;
        CHECK(init(&c, 2, id, r) == 0, "init");
        if (r == 1) {
            abort_comm(c);
            return 0;
        }
        float x = 1, y = 0;
        int e = allreduce(&x, &y, 1, Float32, Sum, c, nullptr);
        CHECK(e == RemoteError, "allreduce after the peer aborted returned %d", e);
        destroy(c);
        return 0;
    }, &codes);
    run("a peer that aborted fails the collective", codes == std::vector<int>({0, 0}));

    codes.clear();
    setenv("SWGPU_NCCL_TIMEOUT_S", "1", 1);
    ranks(2, [](int r, Id id) {
        if (r == 1) return 0;  // never joins
        Comm c;
        int e = init(&c, 2, id, r);
        CHECK(e == SystemError, "init without the peer returned %d", e);
        return 0;
    }, &codes);
    run("a world that never fills ends init at the timeout", codes == std::vector<int>({0, 0}));
    unsetenv("SWGPU_NCCL_TIMEOUT_S");

    // A collective on a side stream: nothing moves at the call; the main stream's wait on an event
    // recorded behind it runs it (the order a GPU keeps, made visible).
    run("a side stream's collective runs at the event wait behind it", ranks(2, [](int r, Id id) {
            Driver d;
            CHECK(load_driver(&d), "libcuda stand-in");
            Comm c;
            CHECK(init(&c, 2, id, r) == 0, "init");
            void *s, *ready, *done;
            CHECK(d.stream_create(&s, 0) == 0 && d.event_create(&ready, 0) == 0 && d.event_create(&done, 0) == 0,
                  "stream and events");
            unsigned long long p;
            const size_t n = 600;  // three slots: the deferred run is chunked too
            CHECK(d.mem_alloc(&p, n * 4) == 0, "cuMemAlloc");
            float* x = (float*)(uintptr_t)p;
            for (size_t i = 0; i < n; i++) x[i] = val(r, i);
            CHECK(d.event_record(ready, nullptr) == 0 && d.wait_event(s, ready, 0) == 0, "side waits on main");
            CHECK(allreduce(x, x, n, Float32, Sum, c, s) == 0, "allreduce on the side stream");
            for (size_t i = 0; i < n; i++) CHECK(x[i] == val(r, i), "rank %d elem %zu changed before any wait", r, i);
            CHECK(d.event_record(done, s) == 0 && d.wait_event(nullptr, done, 0) == 0, "main waits on side");
            for (size_t i = 0; i < n; i++) {
                float want = val(0, i) + val(1, i);
                CHECK(memcmp(&x[i], &want, 4) == 0, "rank %d elem %zu: %.9g after the wait, want %.9g", r, i, x[i],
                      want);
            }
            destroy(c);
            return 0;
        }) == 0);

    codes.clear();
    ranks(1, [](int, Id id) {
        Driver d;
        CHECK(load_driver(&d), "libcuda stand-in");
        Comm c;
        CHECK(init(&c, 1, id, 0) == 0, "init");
        void* s;
        unsigned long long p;
        CHECK(d.stream_create(&s, 0) == 0 && d.mem_alloc(&p, 64) == 0, "stream and memory");
        allreduce((void*)(uintptr_t)p, (void*)(uintptr_t)p, 16, Float32, Sum, c, s);  // no wait before it
        return 0;
    }, &codes);
    run("a side stream's collective queued without a wait ends the rank", codes == std::vector<int>({3}));

    if (failures) {
        fprintf(stderr, "swgpu nccl test: %d case(s) failed\n", failures);
        return 1;
    }
    printf("swgpu nccl test: all cases passed\n");
    return 0;
}
