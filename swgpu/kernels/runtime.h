// Launch trampolines: a kernel's table entry unpacks cuLaunchKernel's `void** kernelParams` by the
// kernel's own parameter types (deduced from its function pointer) and runs the grid on fibers.
#pragma once
#include <stddef.h>

#include <tuple>
#include <type_traits>
#include <utility>

#include "abi.h"

namespace swgpu {

// Runs the grid; body(arg) is one thread's work. Returns 0 or a CUresult (after a stderr line).
int run_grid(const char* kernel, swgpu_dim3 grid, swgpu_dim3 block, void (*body)(void*), void* arg);

template <typename... A>
struct Launcher {
    typedef void (*Fn)(A...);
    typedef std::tuple<typename std::decay<A>::type...> Args;
    struct Call {
        Fn fn;
        Args* args;
    };
    static void body(void* p) {
        Call* c = static_cast<Call*>(p);
        std::apply(c->fn, *c->args);  // each thread gets its own copies of the by-value parameters
    }
    template <size_t... I>
    static int go(void* fn, const char* name, swgpu_dim3 grid, swgpu_dim3 block, void** params,
                  std::index_sequence<I...>) {
        Args args{*static_cast<typename std::decay<A>::type*>(params[I])...};
        Call call{reinterpret_cast<Fn>(fn), &args};
        return run_grid(name, grid, block, &body, &call);
    }
    static int launch(void* fn, const char* name, swgpu_dim3 grid, swgpu_dim3 block, void** params) {
        if (sizeof...(A) > 0 && !params) return 1;  // CUDA_ERROR_INVALID_VALUE
        return go(fn, name, grid, block, params, std::index_sequence_for<A...>{});
    }
};

template <typename... A>
swgpu_kernel entry(const char* name, void (*fn)(A...)) {
    return swgpu_kernel{name, reinterpret_cast<void*>(fn), &Launcher<A...>::launch};
}

}  // namespace swgpu
