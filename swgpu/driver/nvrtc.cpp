// libnvrtc.so.13 stand-in. "Compiling" a kernel file records its name and source hash and returns a
// small blob (module_blob.h) as the CUBIN; the libcuda stand-in's cuModuleLoadData loads the g++
// build of that file from $SWGPU_KERNELS. Compiling already checks that build exists and matches
// the source, so a stale build fails with NVRTC's error path and a log saying what to do.
//
// nvrtcVersion answers 13.99, a version no real NVRTC has, so lewel's on-disk CUBIN cache (keyed by
// the NVRTC version) never mixes blobs with real CUBINs even in a shared cache folder.
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <string>

#include "module_blob.h"

#define EXPORT extern "C" __attribute__((visibility("default")))

typedef int nvrtcResult;
enum {
    NVRTC_SUCCESS = 0,
    NVRTC_ERROR_OUT_OF_MEMORY = 1,
    NVRTC_ERROR_PROGRAM_CREATION_FAILURE = 2,
    NVRTC_ERROR_INVALID_INPUT = 3,
    NVRTC_ERROR_INVALID_PROGRAM = 4,
    NVRTC_ERROR_INVALID_OPTION = 5,
    NVRTC_ERROR_COMPILATION = 6,
    NVRTC_ERROR_NO_LOWERED_NAMES_BEFORE_COMPILATION = 10,
};

namespace {

struct Program {
    std::string name;
    std::string hash;
    std::string log;
    std::string blob;  // empty until compiled
};

std::string source_hash(const char* src, int nheaders, const char* const* headers) {
    uint64_t h = 0xcbf29ce484222325ull;
    auto feed = [&h](const char* s) {
        for (; *s; s++) {
            h ^= (uint64_t)(unsigned char)*s;
            h *= 0x100000001b3ull;
        }
    };
    for (int i = 0; i < nheaders; i++) {
        if (headers && headers[i]) feed(headers[i]);
        h *= 0x100000001b3ull;  // the NUL byte after each header
    }
    feed(src);
    char buf[17];
    snprintf(buf, sizeof buf, "%016llx", (unsigned long long)h);
    return buf;
}

}  // namespace

EXPORT const char* nvrtcGetErrorString(nvrtcResult r) {
    switch (r) {
        case NVRTC_SUCCESS: return "NVRTC_SUCCESS";
        case NVRTC_ERROR_OUT_OF_MEMORY: return "NVRTC_ERROR_OUT_OF_MEMORY";
        case NVRTC_ERROR_PROGRAM_CREATION_FAILURE: return "NVRTC_ERROR_PROGRAM_CREATION_FAILURE";
        case NVRTC_ERROR_INVALID_INPUT: return "NVRTC_ERROR_INVALID_INPUT";
        case NVRTC_ERROR_INVALID_PROGRAM: return "NVRTC_ERROR_INVALID_PROGRAM";
        case NVRTC_ERROR_INVALID_OPTION: return "NVRTC_ERROR_INVALID_OPTION";
        case NVRTC_ERROR_COMPILATION: return "NVRTC_ERROR_COMPILATION";
        default: return "NVRTC_ERROR (software GPU stand-in)";
    }
}

EXPORT nvrtcResult nvrtcVersion(int* major, int* minor) {
    if (!major || !minor) return NVRTC_ERROR_INVALID_INPUT;
    *major = 13;
    *minor = 99;
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcGetNumSupportedArchs(int* n) {
    if (!n) return NVRTC_ERROR_INVALID_INPUT;
    *n = 1;
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcGetSupportedArchs(int* archs) {
    if (!archs) return NVRTC_ERROR_INVALID_INPUT;
    // the architecture the driver stand-in reports (SWGPU_CC), so that it is always supported
    const char* s = getenv("SWGPU_CC");
    int c = s && *s ? atoi(s) : 90;
    archs[0] = c >= 30 && c <= 120 ? c : 90;
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcCreateProgram(void** prog, const char* src, const char* name, int nheaders,
                                      const char* const* headers, const char* const* /*include_names*/) {
    if (!prog || !src || nheaders < 0) return NVRTC_ERROR_INVALID_INPUT;
    auto* p = new Program;
    p->name = name && *name ? name : "default_program";
    p->hash = source_hash(src, nheaders, headers);
    *prog = p;
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcDestroyProgram(void** prog) {
    if (!prog) return NVRTC_ERROR_INVALID_INPUT;
    delete static_cast<Program*>(*prog);
    *prog = nullptr;
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcCompileProgram(void* prog, int /*nopts*/, const char* const* /*opts*/) {
    if (!prog) return NVRTC_ERROR_INVALID_PROGRAM;
    auto* p = static_cast<Program*>(prog);
    swgpu_blob b{p->name, p->hash};
    std::string why;
    void* dl = nullptr;
    if (!swgpu_open_kernel_library(b, &dl, &why)) {
        p->log = "swgpu (software GPU): " + why + "\n";
        return NVRTC_ERROR_COMPILATION;
    }
    // The handle stays open: cuModuleLoadData opens the same library again (dlopen counts).
    p->log.clear();
    p->blob = swgpu_make_blob(p->name, p->hash);
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcGetProgramLogSize(void* prog, size_t* n) {
    if (!prog || !n) return NVRTC_ERROR_INVALID_INPUT;
    *n = static_cast<Program*>(prog)->log.size() + 1;
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcGetProgramLog(void* prog, char* out) {
    if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
    const std::string& l = static_cast<Program*>(prog)->log;
    memcpy(out, l.c_str(), l.size() + 1);
    return NVRTC_SUCCESS;
}

static nvrtcResult blob_size(void* prog, size_t* n) {
    if (!prog || !n) return NVRTC_ERROR_INVALID_INPUT;
    auto* p = static_cast<Program*>(prog);
    if (p->blob.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
    *n = p->blob.size();
    return NVRTC_SUCCESS;
}

static nvrtcResult blob_copy(void* prog, char* out) {
    if (!prog || !out) return NVRTC_ERROR_INVALID_INPUT;
    auto* p = static_cast<Program*>(prog);
    if (p->blob.empty()) return NVRTC_ERROR_INVALID_PROGRAM;
    memcpy(out, p->blob.data(), p->blob.size());
    return NVRTC_SUCCESS;
}

EXPORT nvrtcResult nvrtcGetCUBINSize(void* prog, size_t* n) { return blob_size(prog, n); }
EXPORT nvrtcResult nvrtcGetCUBIN(void* prog, char* out) { return blob_copy(prog, out); }
// A PTX request gets the same blob: there is only one kind of "binary" here.
EXPORT nvrtcResult nvrtcGetPTXSize(void* prog, size_t* n) { return blob_size(prog, n); }
EXPORT nvrtcResult nvrtcGetPTX(void* prog, char* out) { return blob_copy(prog, out); }

EXPORT nvrtcResult nvrtcAddNameExpression(void* prog, const char*) {
    return prog ? NVRTC_SUCCESS : NVRTC_ERROR_INVALID_PROGRAM;
}
EXPORT nvrtcResult nvrtcGetLoweredName(void* prog, const char* expr, const char** lowered) {
    if (!prog || !lowered) return NVRTC_ERROR_INVALID_INPUT;
    *lowered = expr;  // kernels are extern "C": the name is the symbol
    return NVRTC_SUCCESS;
}
