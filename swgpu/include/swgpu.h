// The software GPU's shared contract, between the libcuda stand-in (which owns device memory) and
// the library stand-ins (libcublas, libcudnn). Test infrastructure only: never linked into lewel.
//
// - A device pointer is a host address: the stand-in libcuda allocates device memory with ordinary
//   host allocations (filled with 0xFF bytes, a NaN in f32/bf16/f64) and hands their addresses out.
// - Everything is synchronous: a launch, a copy or a library call runs to completion on the calling
//   thread before it returns. Streams and events are ordering tokens with nothing left to wait for,
//   except work deferred with swgpu_stream_defer.
#pragma once
#include <stddef.h>

#ifdef __cplusplus
extern "C" {
#endif

// Exported by the libcuda stand-in. Returns 0 when [ptr, ptr + bytes) lies inside one live device
// allocation; otherwise prints one line to stderr naming `what`, the range and the nearest
// allocation, and returns nonzero. The library stand-ins find it with dlsym(RTLD_DEFAULT, ...) and
// skip the check when it is absent.
int swgpu_check_device_range(const void* ptr, size_t bytes, const char* what);

// Exported by the libcuda stand-in. Queues fn(data) on `stream`: at once on the NULL stream;
// on a stream the program made, not before the program's ordering says it must have run (an
// event wait behind it, a synchronization of it, its stream or the context, the stream's
// destruction). The stream must have waited on an event since its previous deferred work, or the
// process ends with a line naming `what` (inputs from other streams could be in flight).
// SWGPU_DEFER=0 runs everything at once. Found as swgpu_check_device_range is.
void swgpu_stream_defer(void* stream, void (*fn)(void*), void* data, const char* what);

#ifdef __cplusplus
}
#endif
