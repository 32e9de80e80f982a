// Software GPU: a libnvToolsExt stand-in. lewel pushes an NVTX range around every graph node's
// launches (forward and backward); Nsight shows them on a real GPU. Here the ranges are written,
// one line each ("push NAME", "pop"), to the file SWGPU_NVTX_LOG names, so a test can see that
// every node is covered and the ranges nest. Only the two calls lewel makes are provided.
#include <cstdio>
#include <cstdlib>
#include <mutex>

namespace {
std::mutex mu;
thread_local int depth = 0;

FILE* log_file() {
    static FILE* f = [] {
        const char* p = std::getenv("SWGPU_NVTX_LOG");
        return (p && *p) ? std::fopen(p, "a") : nullptr;
    }();
    return f;
}
}  // namespace

#define EXPORT extern "C" __attribute__((visibility("default")))

// Returns the level of the range started (0 for the outermost), as NVTX does.
EXPORT int nvtxRangePushA(const char* message) {
    std::lock_guard<std::mutex> g(mu);
    if (FILE* f = log_file()) std::fprintf(f, "push %s\n", message ? message : "");
    return depth++;
}

// Returns the level of the range ended, or a negative value when none is open.
EXPORT int nvtxRangePop(void) {
    std::lock_guard<std::mutex> g(mu);
    if (depth == 0) {
        if (FILE* f = log_file()) std::fprintf(f, "pop without push\n");
        return -2;
    }
    if (FILE* f = log_file()) std::fprintf(f, "pop\n");
    return --depth;
}
