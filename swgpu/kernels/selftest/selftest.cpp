// swgpu self-test: drives the libcuda and libnvrtc stand-ins directly (as cudarc would) on
// bugs.cu, and checks that correct kernels compute and buggy ones are reported.
// Built and run by run.sh.
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>
#include <vector>

typedef int CUresult;
typedef unsigned long long CUdeviceptr;
extern "C" {
CUresult cuInit(unsigned);
CUresult cuMemAlloc_v2(CUdeviceptr*, size_t);
CUresult cuMemFree_v2(CUdeviceptr);
CUresult cuMemcpyHtoD_v2(CUdeviceptr, const void*, size_t);
CUresult cuMemcpyDtoH_v2(void*, CUdeviceptr, size_t);
CUresult cuMemsetD8_v2(CUdeviceptr, unsigned char, size_t);
CUresult cuModuleLoadData(void**, const void*);
CUresult cuModuleGetFunction(void**, void*, const char*);
CUresult cuLaunchKernel(void*, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, unsigned, void*, void**,
                        void**);
int nvrtcCreateProgram(void**, const char*, const char*, int, const char* const*, const char* const*);
int nvrtcCompileProgram(void*, int, const char* const*);
int nvrtcGetCUBINSize(void*, size_t*);
int nvrtcGetCUBIN(void*, char*);
}

static int failures = 0;
#define EXPECT(cond, ...)                          \
    do {                                           \
        if (!(cond)) {                             \
            fprintf(stderr, "selftest FAILED: ");  \
            fprintf(stderr, __VA_ARGS__);          \
            fprintf(stderr, "\n");                 \
            failures++;                            \
        } else {                                   \
            printf("selftest ok: ");               \
            printf(__VA_ARGS__);                   \
            printf("\n");                          \
        }                                          \
    } while (0)

static std::string slurp(const char* path) {
    FILE* f = fopen(path, "rb");
    if (!f) {
        fprintf(stderr, "cannot read %s\n", path);
        exit(2);
    }
    std::string s;
    char buf[4096];
    size_t n;
    while ((n = fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, n);
    fclose(f);
    return s;
}

static void* fn(void* mod, const char* name) {
    void* f = nullptr;
    if (cuModuleGetFunction(&f, mod, name) != 0) {
        fprintf(stderr, "no kernel %s\n", name);
        exit(1);
    }
    return f;
}

int main(int argc, char** argv) {
    if (argc != 2 && !(argc == 3 && !strcmp(argv[2], "overflow"))) {
        fprintf(stderr, "usage: selftest DIR_OF_bugs.cu [overflow]\n");
        return 2;
    }
    std::string dir = argv[1];
    std::string src = slurp((dir + "/bugs.cu").c_str()), hdr = slurp((dir + "/common.cuh").c_str());
    const char* headers[] = {hdr.c_str()};
    const char* names[] = {"common.cuh"};
    cuInit(0);
    void* prog = nullptr;
    nvrtcCreateProgram(&prog, src.c_str(), "bugs.cu", 1, headers, names);
    EXPECT(nvrtcCompileProgram(prog, 0, nullptr) == 0, "the kernel library matches bugs.cu");
    size_t n = 0;
    nvrtcGetCUBINSize(prog, &n);
    std::vector<char> blob(n);
    nvrtcGetCUBIN(prog, blob.data());
    void* mod = nullptr;
    EXPECT(cuModuleLoadData(&mod, blob.data()) == 0, "cuModuleLoadData loads it");
    if (!mod) return 1;

    // a stale build: another source hash
    {
        std::string other = src + "\n// changed\n";
        void* p2 = nullptr;
        nvrtcCreateProgram(&p2, other.c_str(), "bugs.cu", 1, headers, names);
        EXPECT(nvrtcCompileProgram(p2, 0, nullptr) == 6, "a changed source is refused (NVRTC_ERROR_COMPILATION)");
    }

    if (argc == 3) {  // only the shared-memory overflow: under ASan, a report that ends the process
        CUdeviceptr d = 0;
        cuMemAlloc_v2(&d, 64 * 4);
        int eight = 8;
        void* a[] = {&d, &eight};
        CUresult r = cuLaunchKernel(fn(mod, "shared_overflow"), 1, 1, 1, 8, 1, 1, 0, nullptr, a, nullptr);
        printf("selftest: shared_overflow returned %d\n", r);
        return r == 0 ? 0 : 1;
    }

    const unsigned blocks = 3, threads = 256;
    std::vector<float> h(blocks * threads);
    for (size_t i = 0; i < h.size(); i++) h[i] = (float)(i % 7);
    CUdeviceptr din = 0, dout = 0, dbig = 0;
    cuMemAlloc_v2(&din, h.size() * 4);
    cuMemAlloc_v2(&dout, 4096 * 4);
    cuMemAlloc_v2(&dbig, 4096 * 4);
    cuMemcpyHtoD_v2(din, h.data(), h.size() * 4);

    void* args2[] = {&din, &dout};
    EXPECT(cuLaunchKernel(fn(mod, "reduce_ok"), blocks, 1, 1, threads, 1, 1, 0, nullptr, args2, nullptr) == 0,
           "reduce_ok launches");
    std::vector<float> o(blocks);
    cuMemcpyDtoH_v2(o.data(), dout, blocks * 4);
    bool good = true;
    for (unsigned b = 0; b < blocks; b++) {
        float s = 0;
        for (unsigned t = 0; t < threads; t++) s += h[b * threads + t];
        good &= o[b] == s;
    }
    EXPECT(good, "reduce_ok sums every block (%g %g %g)", o[0], o[1], o[2]);

    cuMemsetD8_v2(dout, 0, 4096 * 4);
    cuLaunchKernel(fn(mod, "reduce_no_barrier"), blocks, 1, 1, threads, 1, 1, 0, nullptr, args2, nullptr);
    cuMemcpyDtoH_v2(o.data(), dout, blocks * 4);
    // Forward order runs warp 0 to its end first, before the other warps write their parts; reverse
    // order runs it last, which hides this bug (hence several schedules).
    const char* sched = getenv("SWGPU_SCHEDULE");
    if (!sched || !strcmp(sched, "forward"))
        EXPECT(o[0] != o[0], "a missing barrier reads unwritten shared memory as NaN (got %g)", o[0]);
    else
        printf("selftest info: missing barrier under %s: block 0 sum %g (NaN = caught)\n", sched, o[0]);

    void* args1[] = {&dout};
    EXPECT(cuLaunchKernel(fn(mod, "partial_barrier"), 1, 1, 1, 64, 1, 1, 0, nullptr, args1, nullptr) == 719,
           "a barrier reached by part of the block fails the launch");
    EXPECT(cuLaunchKernel(fn(mod, "shuffle_exited_lane"), 1, 1, 1, 32, 1, 1, 0, nullptr, args1, nullptr) == 719,
           "a shuffle with an exited lane fails the launch");
    EXPECT(cuLaunchKernel(fn(mod, "shuffle_missing_lane"), 1, 1, 1, 48, 1, 1, 0, nullptr, args1, nullptr) == 719,
           "a full-mask shuffle in a partial warp fails the launch");
    int eight = 8;
    void* args_sh[] = {&dout, &eight};
    const char* asan = getenv("SELFTEST_ASAN");
    if (!asan || strcmp(asan, "1") != 0)  // under ASan the overflow is an ASan report that ends the process
        EXPECT(cuLaunchKernel(fn(mod, "shared_overflow"), 1, 1, 1, 8, 1, 1, 0, nullptr, args_sh, nullptr) == 719,
               "a __shared__ overflow fails the launch");
    EXPECT(cuLaunchKernel(fn(mod, "reduce_ok"), 1, 1, 1, 2048, 1, 1, 0, nullptr, args2, nullptr) == 1,
           "a 2048-thread block is an invalid configuration");
    EXPECT(cuLaunchKernel(fn(mod, "reduce_ok"), 0, 1, 1, 256, 1, 1, 0, nullptr, args2, nullptr) == 1,
           "an empty grid is an invalid configuration");
    EXPECT(cuLaunchKernel(fn(mod, "reduce_ok"), 1, 1, 1, 256, 1, 1, 16, nullptr, args2, nullptr) == 1,
           "dynamic shared memory is refused");
    EXPECT(cuMemcpyHtoD_v2(din + 4, h.data(), h.size() * 4) == 1, "a copy past an allocation's end is refused");
    EXPECT(cuMemcpyDtoH_v2(h.data(), din - 4, 8) == 1, "a copy before an allocation's start is refused");

    struct {
        int w, h;
    } d = {37, 5};
    unsigned long long base = 7;
    void* args3[] = {&dbig, &d, &base};
    EXPECT(cuLaunchKernel(fn(mod, "coords"), 3, 2, 1, 16, 4, 1, 0, nullptr, args3, nullptr) == 0, "coords launches");
    std::vector<unsigned> c(37 * 5);
    cuMemcpyDtoH_v2(c.data(), dbig, c.size() * 4);
    good = true;
    for (int y = 0; y < 5; y++)
        for (int x = 0; x < 37; x++) good &= c[y * 37 + x] == 7u + y * 1000u + x;
    EXPECT(good, "2-D grid and block coordinates, struct and u64 parameters");

    cuMemFree_v2(din);
    cuMemFree_v2(dout);
    cuMemFree_v2(dbig);
    EXPECT(cuMemFree_v2(dbig) == 1, "a double free is refused");
    printf("selftest: %d failure(s)\n", failures);
    return failures ? 1 : 0;
}
