// The software GPU's execution model, linked into every kernel library (hidden symbols, so each
// library has its own copy and its globals are plain, fast accesses).
//
// A launch runs its blocks one after another on the calling OS thread. A block's threads are fibers
// with their own stacks; a fiber runs until it reaches __syncthreads, a warp shuffle, or its end, and
// only then does the scheduler switch to the next one. Warps run one at a time (run_block):
//   - when a warp's lanes wait at a shuffle, they exchange values and continue;
//   - when every live thread of the block waits at __syncthreads, all continue;
//   - anything else is a bug in the kernel (a barrier reached by part of the block, a shuffle with an
//     exited, missing or diverged lane): one line on stderr naming kernel, block and thread, and the
//     launch fails with CUDA_ERROR_LAUNCH_FAILED.
// SWGPU_SCHEDULE=forward|reverse|random:SEED orders the blocks, the warps of a block and the lanes
// of a warp.
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include <algorithm>
#include <utility>
#include <vector>

#include "abi.h"
#include "cuda_shim.h"
#include "runtime.h"

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/asan_interface.h>
#include <sanitizer/common_interface_defs.h>
#define SWGPU_ASAN 1
#else
#define SWGPU_ASAN 0
#endif

#if !defined(__x86_64__)
#error "the software GPU's context switch is written for x86-64"
#endif

// save_sp: where to store the current stack pointer; new_sp: the stack to resume. Callee-saved
// registers travel on the stacks themselves.
extern "C" void swgpu_ctx_switch(void** save_sp, void* new_sp);
extern "C" void swgpu_fiber_start();
extern "C" void swgpu_fiber_main();
asm(R"(
    .text
    .globl swgpu_ctx_switch
    .hidden swgpu_ctx_switch
    .type swgpu_ctx_switch, @function
swgpu_ctx_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size swgpu_ctx_switch, .-swgpu_ctx_switch

    .globl swgpu_fiber_start
    .hidden swgpu_fiber_start
    .type swgpu_fiber_start, @function
swgpu_fiber_start:
    andq $-16, %rsp
    call swgpu_fiber_main
    ud2
    .size swgpu_fiber_start, .-swgpu_fiber_start
)");

namespace swgpu {

ThreadHead* cur_thread;
coord3 block_idx, block_dim, grid_dim;

namespace {

enum State { READY, AT_BARRIER, AT_SHUFFLE, EXITED };

struct Thread {
    ThreadHead head;  // first: the shim reads threadIdx through it
    unsigned linear;  // x + y * bx + z * bx * by
    State state;
    void* sp;
    char* stack;  // lowest address (a guard page below)
    // shuffle request and answer
    unsigned sh_mask;
    int sh_mode, sh_arg, sh_width;
    uint64_t sh_val, sh_out;
    void* asan_fake;
};

const size_t kMaxThreads = 1024;
#if SWGPU_ASAN
const size_t kStack = 256 * 1024;
#else
const size_t kStack = 64 * 1024;
#endif
const size_t kGuard = 4096;
const size_t kSharedLimit = 48 * 1024;

struct Shared {
    const void* tag;
    void* ptr;
    size_t bytes;
    const char* name;
};

struct Launch {
    const char* kernel;
    void (*body)(void*);
    void* arg;
    unsigned nthreads;
    bool failed;
};

char* g_stacks;  // kMaxThreads stacks of kGuard + kStack bytes
Thread g_threads[kMaxThreads];
void* g_sched_sp;
Launch g_launch;
std::vector<Shared> g_shared;
size_t g_shared_bytes;
bool g_stacks_dirty;  // a failed block left fibers unfinished: their stack shadow may be poisoned
#if SWGPU_ASAN
const void* g_sched_stack_bottom;
size_t g_sched_stack_size;
#endif

struct Schedule {
    int kind;  // 0 forward, 1 reverse, 2 random
    uint64_t seed;
};
Schedule g_schedule;
bool g_schedule_read;
uint64_t g_launch_count;

uint64_t splitmix(uint64_t* s) {
    uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

void read_schedule() {
    if (g_schedule_read) return;
    g_schedule_read = true;
    const char* s = getenv("SWGPU_SCHEDULE");
    if (!s || !*s || !strcmp(s, "forward")) {
        g_schedule = {0, 0};
    } else if (!strcmp(s, "reverse")) {
        g_schedule = {1, 0};
    } else if (!strncmp(s, "random:", 7) && s[7]) {
        char* end = nullptr;
        unsigned long long seed = strtoull(s + 7, &end, 10);
        if (*end) {
            fprintf(stderr, "swgpu: SWGPU_SCHEDULE=%s: the seed must be a decimal number\n", s);
            exit(2);
        }
        g_schedule = {2, seed};
    } else {
        fprintf(stderr, "swgpu: SWGPU_SCHEDULE=%s: expected forward, reverse or random:SEED\n", s);
        exit(2);
    }
}

// Fills `order` with a permutation of [0, n) by the schedule: forward, reversed, or shuffled in
// groups of `group` (warps of lanes: shuffles the groups, then the members of each).
void make_order(std::vector<unsigned>& order, unsigned n, unsigned group, uint64_t* rng) {
    order.resize(n);
    for (unsigned i = 0; i < n; i++) order[i] = i;
    if (g_schedule.kind == 1) {
        std::reverse(order.begin(), order.end());
    } else if (g_schedule.kind == 2) {
        unsigned ngroups = (n + group - 1) / group;
        std::vector<unsigned> gperm(ngroups);
        for (unsigned i = 0; i < ngroups; i++) gperm[i] = i;
        for (unsigned i = ngroups; i > 1; i--) std::swap(gperm[i - 1], gperm[splitmix(rng) % i]);
        unsigned k = 0;
        for (unsigned gi : gperm) {
            unsigned lo = gi * group, hi = std::min(n, lo + group);
            unsigned start = k;
            for (unsigned i = lo; i < hi; i++) order[k++] = i;
            for (unsigned i = hi - lo; i > 1; i--)
                std::swap(order[start + i - 1], order[start + splitmix(rng) % i]);
        }
    }
}

bool ensure_stacks() {
    if (g_stacks) return true;
    size_t total = kMaxThreads * (kGuard + kStack);
    void* p = mmap(nullptr, total, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) {
        fprintf(stderr, "swgpu: cannot map %zu bytes of fiber stacks\n", total);
        return false;
    }
    g_stacks = static_cast<char*>(p);
    for (size_t i = 0; i < kMaxThreads; i++) {
        char* base = g_stacks + i * (kGuard + kStack);
        mprotect(base, kGuard, PROT_NONE);
        g_threads[i].stack = base + kGuard;
    }
    return true;
}

// Bytes of 0xFF after each shared object in the plain build (ASan's redzones do this job in the
// ASan build): reads past the end see NaNs, writes past it are reported when the block ends.
#if SWGPU_ASAN
const size_t kSharedGuard = 0;
#else
const size_t kSharedGuard = 256;
#endif

// Frees the block's shared objects; false (after a report) when one was written past its end.
bool free_shared() {
    bool ok = true;
    for (auto& s : g_shared) {
        const unsigned char* g = static_cast<const unsigned char*>(s.ptr) + s.bytes;
        for (size_t i = 0; i < kSharedGuard; i++)
            if (g[i] != 0xFF) {
                fprintf(stderr,
                        "swgpu: kernel %s, block (%u,%u,%u): __shared__ '%s' (%zu bytes) was written past its end "
                        "(byte %zu after it)\n",
                        g_launch.kernel, block_idx.x, block_idx.y, block_idx.z, s.name, s.bytes, i);
                ok = false;
                break;
            }
        free(s.ptr);
    }
    g_shared.clear();
    g_shared_bytes = 0;
    return ok;
}

Thread* current() { return reinterpret_cast<Thread*>(cur_thread); }

// From a fiber back to the scheduler; returns when the scheduler resumes this fiber.
void yield_to_scheduler(bool exiting) {
    Thread* t = current();
#if SWGPU_ASAN
    __sanitizer_start_switch_fiber(exiting ? nullptr : &t->asan_fake, g_sched_stack_bottom, g_sched_stack_size);
#else
    (void)exiting;
#endif
    swgpu_ctx_switch(&t->sp, g_sched_sp);
#if SWGPU_ASAN
    __sanitizer_finish_switch_fiber(t->asan_fake, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
}

// From the scheduler into fiber t, until it blocks or ends.
void resume(Thread* t) {
    cur_thread = &t->head;
#if SWGPU_ASAN
    void* fake = nullptr;
    __sanitizer_start_switch_fiber(&fake, t->stack, kStack);
    swgpu_ctx_switch(&g_sched_sp, t->sp);
    __sanitizer_finish_switch_fiber(fake, nullptr, nullptr);
#else
    swgpu_ctx_switch(&g_sched_sp, t->sp);
#endif
}

void init_fiber(Thread* t) {
#if SWGPU_ASAN
    if (g_stacks_dirty) __asan_unpoison_memory_region(t->stack, kStack);
#endif
    uint64_t* s = reinterpret_cast<uint64_t*>(t->stack + kStack);
    *--s = 0;
    *--s = reinterpret_cast<uint64_t>(&swgpu_fiber_start);
    for (int i = 0; i < 6; i++) *--s = 0;  // rbp rbx r12 r13 r14 r15
    t->sp = s;
    t->state = READY;
    t->asan_fake = nullptr;
}

const char* state_name(State s) {
    switch (s) {
        case READY: return "running";
        case AT_BARRIER: return "waiting at __syncthreads";
        case AT_SHUFFLE: return "waiting at a shuffle";
        case EXITED: return "exited";
    }
    return "?";
}

void report(const Thread* t, const char* fmt, ...) __attribute__((format(printf, 2, 3)));
void report(const Thread* t, const char* fmt, ...) {
    char msg[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(msg, sizeof msg, fmt, ap);
    va_end(ap);
    fprintf(stderr, "swgpu: kernel %s, block (%u,%u,%u), thread (%u,%u,%u): %s\n", g_launch.kernel,
            block_idx.x, block_idx.y, block_idx.z, t->head.tid.x, t->head.tid.y, t->head.tid.z, msg);
    g_launch.failed = true;
}

// Resolves the shuffles of warp w. Returns true when its lanes may continue, false after a report.
bool resolve_warp(unsigned w, unsigned n) {
    unsigned lo = w * 32, hi = std::min(n, lo + 32);
    const Thread* first = nullptr;
    for (unsigned i = lo; i < hi; i++)
        if (g_threads[i].state == AT_SHUFFLE) {
            first = &g_threads[i];
            break;
        }
    if (!first) return true;
    unsigned mask = first->sh_mask;
    int width = first->sh_width;
    if (width <= 0 || width > 32 || (width & (width - 1))) {
        report(first, "shuffle width %d (must be a power of 2, at most 32)", width);
        return false;
    }
    for (unsigned l = 0; l < 32; l++) {
        bool in_mask = (mask >> l) & 1u;
        unsigned i = lo + l;
        if (!in_mask) {
            if (i < hi && g_threads[i].state == AT_SHUFFLE && !((g_threads[i].sh_mask >> l) & 1u)) {
                report(&g_threads[i], "shuffle with mask 0x%08x that leaves out its own lane %u", g_threads[i].sh_mask, l);
                return false;
            }
            continue;
        }
        if (i >= hi) {
            report(first, "shuffle mask 0x%08x names lane %u, which this block (%u threads) does not have", mask, l, n);
            return false;
        }
        const Thread& t = g_threads[i];
        if (t.state != AT_SHUFFLE) {
            report(first, "shuffle mask 0x%08x includes lane %u (thread %u), which is %s", mask, l, i, state_name(t.state));
            return false;
        }
        if (t.sh_mask != mask || t.sh_width != width || t.sh_mode != first->sh_mode) {
            report(&t, "lanes of one warp at different shuffles (mask 0x%08x/0x%08x, width %d/%d, kind %d/%d)", t.sh_mask,
                   mask, t.sh_width, width, t.sh_mode, first->sh_mode);
            return false;
        }
    }
    for (unsigned l = 0; l < 32; l++) {
        if (!((mask >> l) & 1u)) continue;
        Thread& t = g_threads[lo + l];
        unsigned seg = l & ~(unsigned)(width - 1);
        int src;
        switch (t.sh_mode) {
            case SHFL_IDX: src = (int)seg + (t.sh_arg & (width - 1)); break;
            case SHFL_UP: src = (int)l - t.sh_arg < (int)seg ? (int)l : (int)l - t.sh_arg; break;
            case SHFL_DOWN: src = (int)(l - seg) + t.sh_arg >= width ? (int)l : (int)l + t.sh_arg; break;
            default: {
                int x = (int)l ^ t.sh_arg;
                src = x >= (int)seg + width || x < (int)seg ? (int)l : x;
            }
        }
        if (src < 0 || src > 31 || !((mask >> src) & 1u)) {
            report(&t, "shuffle reads lane %d, outside mask 0x%08x", src, mask);
            return false;
        }
        t.sh_out = g_threads[lo + src].sh_val;
    }
    for (unsigned l = 0; l < 32; l++)
        if ((mask >> l) & 1u) g_threads[lo + l].state = READY;
    return true;
}

// Runs one block to its end. False after a report.
//
// Warp by warp: a warp's lanes run (in the schedule's lane order) until each waits or ends; when its
// lanes wait at a shuffle it is resolved and they go on, so one warp runs ahead to the next barrier
// before the next warp starts. That is the widest skew between warps a GPU allows, so a missing
// barrier shows as a read of shared memory that another warp has not written yet (0xFF bytes, a
// NaN) or has already overwritten.
bool run_block(std::vector<unsigned>& order, uint64_t* rng) {
    unsigned n = g_launch.nthreads;
    for (unsigned i = 0; i < n; i++) init_fiber(&g_threads[i]);
    g_stacks_dirty = false;
    make_order(order, n, 32, rng);  // each warp's lanes are contiguous in `order`
    for (;;) {
        for (unsigned k = 0; k < n;) {
            unsigned w = order[k] / 32, end = k;
            while (end < n && order[end] / 32 == w) end++;
            for (;;) {
                for (unsigned j = k; j < end; j++) {
                    Thread* t = &g_threads[order[j]];
                    if (t->state == READY) resume(t);
                    if (g_launch.failed) {
                        g_stacks_dirty = true;
                        return false;
                    }
                }
                bool shuffling = false;
                for (unsigned j = k; j < end; j++) shuffling |= g_threads[order[j]].state == AT_SHUFFLE;
                if (!shuffling) break;
                if (!resolve_warp(w, n)) {
                    g_stacks_dirty = true;
                    return false;
                }
            }
            k = end;
        }
        unsigned exited = 0, barrier = 0;
        for (unsigned i = 0; i < n; i++) {
            exited += g_threads[i].state == EXITED;
            barrier += g_threads[i].state == AT_BARRIER;
        }
        if (exited == n) return true;
        if (exited) {
            const Thread* waiting = nullptr;
            const Thread* gone = nullptr;
            for (unsigned i = 0; i < n; i++) {
                if (!waiting && g_threads[i].state == AT_BARRIER) waiting = &g_threads[i];
                if (!gone && g_threads[i].state == EXITED) gone = &g_threads[i];
            }
            report(waiting, "__syncthreads reached by %u of %u threads; the other %u exited (first: thread (%u,%u,%u))",
                   barrier, n, exited, gone->head.tid.x, gone->head.tid.y, gone->head.tid.z);
            g_stacks_dirty = true;
            return false;
        }
        for (unsigned i = 0; i < n; i++) g_threads[i].state = READY;
    }
}

}  // namespace

void sync_block() {
    Thread* t = current();
    t->state = AT_BARRIER;
    yield_to_scheduler(false);
}

uint64_t shuffle(unsigned mask, uint64_t bits, int mode, int arg, int width) {
    Thread* t = current();
    t->sh_mask = mask;
    t->sh_mode = mode;
    t->sh_arg = arg;
    t->sh_width = width;
    t->sh_val = bits;
    t->state = AT_SHUFFLE;
    yield_to_scheduler(false);
    return t->sh_out;
}

void* shared_object(const void* tag, size_t bytes, const char* name) {
    for (auto& s : g_shared)
        if (s.tag == tag) return s.ptr;
    g_shared_bytes += bytes;
    if (g_shared_bytes > kSharedLimit) {
        report(current(), "static shared memory of the block reaches %zu bytes with '%s' (limit %zu)", g_shared_bytes,
               name, kSharedLimit);
        // Keep running this thread safely until the scheduler sees the failure at its next switch.
    }
    void* p = malloc(bytes + kSharedGuard + (bytes + kSharedGuard == 0));
    memset(p, 0xFF, bytes + kSharedGuard);
    g_shared.push_back({tag, p, bytes, name});
    return p;
}

int run_grid(const char* kernel, swgpu_dim3 grid, swgpu_dim3 block, void (*body)(void*), void* arg) {
    read_schedule();
    unsigned long long nthreads = (unsigned long long)block.x * block.y * block.z;
    const unsigned long long nblocks = (unsigned long long)grid.x * grid.y * grid.z;
    if (!block.x || !block.y || !block.z || !grid.x || !grid.y || !grid.z || nthreads > kMaxThreads || block.x > 1024 ||
        block.y > 1024 || block.z > 64 || grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) {
        fprintf(stderr,
                "swgpu: kernel %s: invalid launch configuration: grid (%u,%u,%u), block (%u,%u,%u) (blocks of 1 to 1024 "
                "threads, block z at most 64, grid y/z at most 65535)\n",
                kernel, grid.x, grid.y, grid.z, block.x, block.y, block.z);
        return 1;  // CUDA_ERROR_INVALID_VALUE
    }
    if (!ensure_stacks()) return 2;  // CUDA_ERROR_OUT_OF_MEMORY
    g_launch = {kernel, body, arg, (unsigned)nthreads, false};
    grid_dim = {grid.x, grid.y, grid.z};
    block_dim = {block.x, block.y, block.z};
    for (unsigned i = 0; i < nthreads; i++) {
        Thread& t = g_threads[i];
        t.linear = i;
        t.head.tid = {i % block.x, (i / block.x) % block.y, i / (block.x * block.y)};
    }
    uint64_t rng = g_schedule.seed * 0x2545f4914f6cdd1dull + (++g_launch_count);
    std::vector<unsigned> order;
    // Block order: forward and reverse walk the linear index; random permutes it.
    std::vector<unsigned long long> blocks;
    if (g_schedule.kind == 2) {
        blocks.resize(nblocks);
        for (unsigned long long i = 0; i < nblocks; i++) blocks[i] = i;
        for (unsigned long long i = nblocks; i > 1; i--) std::swap(blocks[i - 1], blocks[splitmix(&rng) % i]);
    }
    int rc = 0;
    for (unsigned long long k = 0; k < nblocks; k++) {
        unsigned long long b = g_schedule.kind == 0 ? k : g_schedule.kind == 1 ? nblocks - 1 - k : blocks[k];
        block_idx = {(unsigned)(b % grid.x), (unsigned)((b / grid.x) % grid.y), (unsigned)(b / ((unsigned long long)grid.x * grid.y))};
        bool ok = run_block(order, &rng);
        ok = free_shared() && ok;
        if (!ok) {
            rc = 719;  // CUDA_ERROR_LAUNCH_FAILED
            break;
        }
    }
    cur_thread = nullptr;
    return rc;
}

}  // namespace swgpu

extern "C" void swgpu_fiber_main() {
    using namespace swgpu;
#if SWGPU_ASAN
    __sanitizer_finish_switch_fiber(nullptr, &g_sched_stack_bottom, &g_sched_stack_size);
#endif
    g_launch.body(g_launch.arg);
    current()->state = EXITED;
    yield_to_scheduler(true);
    abort();  // an exited fiber is never resumed
}
