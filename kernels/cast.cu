// Conversions between the f32 master copies and bf16 compute copies, and a fill.
#include "common.cuh"

extern "C" __global__ void cast_f32_to_bf16(const float* x, bf16* y, u64 n) {
    FOR_EACH(i, n) y[i] = f32_to_bf16(x[i]);
}

extern "C" __global__ void cast_bf16_to_f32(const bf16* x, float* y, u64 n) {
    FOR_EACH(i, n) y[i] = bf16_to_f32(x[i]);
}

extern "C" __global__ void fill_f32(float* y, float v, u64 n) {
    FOR_EACH(i, n) y[i] = v;
}
