// The interface between the libcuda stand-in and one kernel library (kernels/<file>.cu built with g++
// into <file>.so). Test infrastructure only.
#pragma once

#define SWGPU_ABI_VERSION 1

struct swgpu_dim3 {
    unsigned x, y, z;
};

// Runs a whole grid synchronously. `params` is cuLaunchKernel's kernelParams: one pointer per kernel
// parameter, to a value of that parameter's type. Returns 0, or a CUresult after printing one line
// naming the kernel, block and thread to stderr.
typedef int (*swgpu_launch_fn)(void* fn, const char* name, swgpu_dim3 grid, swgpu_dim3 block, void** params);

struct swgpu_kernel {
    const char* name;
    void* fn;
    swgpu_launch_fn launch;
};

struct swgpu_module_info {
    int abi;
    const char* file;         // "add.cu"
    const char* source_hash;  // 16 hex digits: FNV-1a 64 of common.cuh, a NUL byte, then the source
    int count;
    const swgpu_kernel* kernels;
};

// Exported (C name, default visibility) by every kernel library.
typedef const swgpu_module_info* (*swgpu_module_fn)(void);
#define SWGPU_MODULE_SYMBOL "swgpu_module"
