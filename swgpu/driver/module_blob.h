// What the libnvrtc stand-in hands out as a "CUBIN", and how the libcuda stand-in turns it into a
// loaded kernel library. Header-only: both stand-ins include it.
//
// Blob: the magic bytes, then "<file name>\0<source hash, 16 hex digits>\0". The source hash is
// src/gpu/nvrtc.rs's (FNV-1a 64 of common.cuh, a NUL byte, then the file), so a blob names exactly
// the source lewel embedded; the kernel library records the hash of the source it was built from.
#pragma once
#include <dlfcn.h>
#include <stdlib.h>
#include <string.h>

#include <string>

#include "../kernels/abi.h"

static const char kSwgpuMagic[8] = {'\x7f', 'S', 'W', 'G', 'P', 'U', '1', '\0'};

struct swgpu_blob {
    std::string file;
    std::string hash;
};

static inline std::string swgpu_make_blob(const std::string& file, const std::string& hash) {
    std::string b(kSwgpuMagic, sizeof kSwgpuMagic);
    b += file;
    b.push_back('\0');
    b += hash;
    b.push_back('\0');
    return b;
}

static inline bool swgpu_parse_blob(const char* p, swgpu_blob* out) {
    if (memcmp(p, kSwgpuMagic, sizeof kSwgpuMagic) != 0) return false;
    p += sizeof kSwgpuMagic;
    size_t n = strnlen(p, 4096);
    if (n == 0 || n == 4096) return false;
    out->file.assign(p, n);
    p += n + 1;
    n = strnlen(p, 64);
    if (n != 16) return false;
    out->hash.assign(p, n);
    return true;
}

static inline bool swgpu_env_flag(const char* name) {
    const char* v = getenv(name);
    return v && *v && strcmp(v, "0") != 0;
}

// dlopens $SWGPU_KERNELS/<stem>.so for blob's file and checks its ABI and source hash (skipped when
// SWGPU_ALLOW_SOURCE_MISMATCH=1: swgpu/mutants.sh runs an unchanged lewel against kernels built from
// mutated sources). On failure returns null with one sentence in *why.
static inline const swgpu_module_info* swgpu_open_kernel_library(const swgpu_blob& b, void** dl_out, std::string* why) {
    const char* dir = getenv("SWGPU_KERNELS");
    if (!dir || !*dir) {
        *why = "SWGPU_KERNELS is not set: run through scripts/emu-env.sh, which builds the kernel libraries and sets it";
        return nullptr;
    }
    std::string stem = b.file;
    if (stem.size() > 3 && stem.compare(stem.size() - 3, 3, ".cu") == 0) stem.resize(stem.size() - 3);
    std::string path = std::string(dir) + "/" + stem + ".so";
    void* dl = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (!dl) {
        *why = "kernels/" + b.file + ": cannot load its software-GPU build " + path + ": " + dlerror() +
               " (rebuild: scripts/emu-env.sh builds it)";
        return nullptr;
    }
    auto mod = reinterpret_cast<swgpu_module_fn>(dlsym(dl, SWGPU_MODULE_SYMBOL));
    const swgpu_module_info* info = mod ? mod() : nullptr;
    if (!info || info->abi != SWGPU_ABI_VERSION) {
        *why = path + " is not a kernel library of this software GPU version: rebuild it (scripts/emu-env.sh)";
        return nullptr;
    }
    if (b.hash != info->source_hash && !swgpu_env_flag("SWGPU_ALLOW_SOURCE_MISMATCH")) {
        *why = "kernels/" + b.file + ": the program embeds source " + b.hash + " but " + path + " was built from source " +
               info->source_hash +
               ": rebuild the software GPU from the same kernels/ (scripts/emu-env.sh does on every change) and rebuild "
               "lewel if kernels/ changed since it was built";
        return nullptr;
    }
    *dl_out = dl;
    return info;
}
