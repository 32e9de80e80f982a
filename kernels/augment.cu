// The photometric half of LEWEL's augmentation on the GPU, on u8 (B, S, S, 3) crops that the
// loader made on the CPU, from per-sample parameters drawn on the CPU (src/data/photometric_cuda.rs mirrors
// AugParams; src/data/pil.rs is the reference, itself bit-exact with PIL):
//   aug_color:   ColorJitter's four ops in the drawn order, then grayscale; one block per image
//                (contrast needs the image's mean luma: an integer block sum, order-free)
//   aug_blur:    one pass of PIL's box blur (fractional radius, 24-bit fixed point, edges
//                replicated), horizontal or vertical; the host runs 3 + 3 passes, ping-pong
//   aug_finish:  solarize, then ToTensor + Normalize into the model's input dtype
// Every float step rounds as PIL's C code does: f32 and f64 operations are written with _rn
// intrinsics so that no multiply-add is fused, and integer sums are exact.
#include "common.cuh"

// Mirrored field for field by `struct AugParams` in src/data/photometric_cuda.rs.
struct AugParams {
    int order[4];       // jitter ops in order (0 brightness, 1 contrast, 2 saturation, 3 hue);
                        // order[0] < 0: no jitter
    float brightness;
    float contrast;
    float saturation;
    int hue_shift;      // added to PIL's 8-bit hue, mod 256
    int gray;
    int solarize;
    int blur;           // 0: no blur
    int blur_r;         // integer part of the box radius
    unsigned blur_ww;   // weight of the 2r+1 inner taps, 24-bit fixed point
    unsigned blur_fw;   // weight of each of the two outer taps
};

__device__ __forceinline__ int luma(int r, int g, int b) {
    return (int)(((unsigned)r * 19595u + (unsigned)g * 38470u + (unsigned)b * 7471u + 0x8000u) >> 16);
}

__device__ __forceinline__ int clip255(int v) { return v < 0 ? 0 : (v > 255 ? 255 : v); }

// Image.blend(a, b, alpha) for one value: a + alpha * (b - a) in f32, truncated.
__device__ __forceinline__ int blend1(int a, int b, float alpha) {
    float v = __fadd_rn((float)a, __fmul_rn(alpha, (float)(b - a)));
    if (alpha >= 0.0f && alpha <= 1.0f) return (int)v;
    if (v <= 0.0f) return 0;
    if (v >= 255.0f) return 255;
    return (int)v;
}

__device__ void rgb_to_hsv(int r, int g, int b, int* hh, int* ss, int* vv) {
    int maxc = max(r, max(g, b)), minc = min(r, min(g, b));
    *vv = maxc;
    if (maxc == minc) {
        *hh = 0;
        *ss = 0;
        return;
    }
    float cr = (float)(maxc - minc);
    float s = __fdiv_rn(cr, (float)maxc);
    float rc = __fdiv_rn((float)(maxc - r), cr);
    float gc = __fdiv_rn((float)(maxc - g), cr);
    float bc = __fdiv_rn((float)(maxc - b), cr);
    float h;
    if (r == maxc) h = __fsub_rn(bc, gc);
    else if (g == maxc) h = (float)__dsub_rn(__dadd_rn(2.0, (double)rc), (double)bc);
    else h = (float)__dsub_rn(__dadd_rn(4.0, (double)gc), (double)rc);
    h = (float)fmod(__dadd_rn(__ddiv_rn((double)h, 6.0), 1.0), 1.0);
    *hh = clip255((int)__dmul_rn((double)h, 255.0));
    *ss = clip255((int)__dmul_rn((double)s, 255.0));
}

__device__ void hsv_to_rgb(int h, int s, int v, int* out) {
    if (s == 0) {
        out[0] = out[1] = out[2] = v;
        return;
    }
    double hf = __ddiv_rn(__dmul_rn((double)h, 6.0), 255.0);
    int i = (int)floor(hf);
    float f = (float)__dsub_rn(hf, (double)i);
    float fs = (float)__ddiv_rn((double)s, 255.0);
    double vf = (double)v;
    int p = clip255((int)round(__dmul_rn(vf, __dsub_rn(1.0, (double)fs))));
    int q = clip255((int)round(__dmul_rn(vf, __dsub_rn(1.0, (double)__fmul_rn(fs, f)))));
    int t = clip255((int)round(__dmul_rn(vf, __dsub_rn(1.0, __dmul_rn((double)fs, __dsub_rn(1.0, (double)f))))));
    switch (i % 6) {
        case 0: out[0] = v; out[1] = t; out[2] = p; break;
        case 1: out[0] = q; out[1] = v; out[2] = p; break;
        case 2: out[0] = p; out[1] = v; out[2] = t; break;
        case 3: out[0] = p; out[1] = q; out[2] = v; break;
        case 4: out[0] = t; out[1] = p; out[2] = v; break;
        default: out[0] = v; out[1] = p; out[2] = q; break;
    }
}

// Integer sum over the block; every thread gets the total. scratch: 32 entries.
__device__ __forceinline__ unsigned long long block_sum_u64(unsigned long long v, unsigned long long* scratch) {
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    int lane = threadIdx.x % WARP, w = threadIdx.x / WARP, nw = blockDim.x / WARP;
    __syncthreads();
    if (lane == 0) scratch[w] = v;
    __syncthreads();
    v = lane < nw ? scratch[lane] : 0ull;
    for (int o = WARP / 2; o > 0; o >>= 1) v += __shfl_xor_sync(FULL_MASK, v, o);
    return v;
}

// One block per image; blockDim.x a multiple of 32. img: (B, hw, 3) u8, in place.
extern "C" __global__ void aug_color(unsigned char* img, const AugParams* params, int hw) {
    __shared__ unsigned long long scratch[32];
    const AugParams P = params[blockIdx.x];
    unsigned char* im = img + (u64)blockIdx.x * hw * 3;
    if (P.order[0] >= 0) {
        for (int k = 0; k < 4; k++) {
            int op = P.order[k];
            if (op == 1) {
                unsigned long long part = 0;
                for (int i = threadIdx.x; i < hw; i += blockDim.x)
                    part += luma(im[3 * i], im[3 * i + 1], im[3 * i + 2]);
                unsigned long long sum = block_sum_u64(part, scratch);
                int mean = (int)__dadd_rn(__ddiv_rn((double)sum, (double)hw), 0.5);
                if (P.contrast != 1.0f)
                    for (int i = threadIdx.x; i < hw * 3; i += blockDim.x)
                        im[i] = (unsigned char)blend1(mean, im[i], P.contrast);
            } else {
                for (int i = threadIdx.x; i < hw; i += blockDim.x) {
                    int r = im[3 * i], g = im[3 * i + 1], b = im[3 * i + 2];
                    int o[3];
                    if (op == 0) {
                        o[0] = blend1(0, r, P.brightness);
                        o[1] = blend1(0, g, P.brightness);
                        o[2] = blend1(0, b, P.brightness);
                    } else if (op == 2) {
                        int l = luma(r, g, b);
                        o[0] = blend1(l, r, P.saturation);
                        o[1] = blend1(l, g, P.saturation);
                        o[2] = blend1(l, b, P.saturation);
                    } else {
                        int h, s, v;
                        rgb_to_hsv(r, g, b, &h, &s, &v);
                        hsv_to_rgb((h + P.hue_shift) & 255, s, v, o);
                    }
                    im[3 * i] = (unsigned char)o[0];
                    im[3 * i + 1] = (unsigned char)o[1];
                    im[3 * i + 2] = (unsigned char)o[2];
                }
            }
            __syncthreads();
        }
    }
    if (P.gray) {
        for (int i = threadIdx.x; i < hw; i += blockDim.x) {
            unsigned char l = (unsigned char)luma(im[3 * i], im[3 * i + 1], im[3 * i + 2]);
            im[3 * i] = im[3 * i + 1] = im[3 * i + 2] = l;
        }
    }
}

// One box pass over (B, s, s, 3): out = the blurred in, or in itself for images without blur.
extern "C" __global__ void aug_blur(const unsigned char* in, unsigned char* out,
                                    const AugParams* params, int batch, int s, int vertical) {
    u64 n = (u64)batch * s * s * 3;
    FOR_EACH(i, n) {
        int c = (int)(i % 3);
        u64 p = i / 3;
        int x = (int)(p % s), y = (int)((p / s) % s), b = (int)(p / ((u64)s * s));
        const AugParams& P = params[b];
        if (!P.blur) {
            out[i] = in[i];
            continue;
        }
        const unsigned char* base = in + (u64)b * s * s * 3 + c;
        int pos = vertical ? y : x;
        int stride = vertical ? s * 3 : 3;
        const unsigned char* line = base + (vertical ? (u64)x * 3 : (u64)y * s * 3);
        int r = P.blur_r;
        unsigned acc = 0;
        for (int k = -r; k <= r; k++) acc += line[(u64)min(max(pos + k, 0), s - 1) * stride];
        unsigned far = line[(u64)min(max(pos - r - 1, 0), s - 1) * stride] +
                       line[(u64)min(max(pos + r + 1, 0), s - 1) * stride];
        unsigned bulk = acc * P.blur_ww + far * P.blur_fw;
        out[i] = (unsigned char)((bulk + (1u << 23)) >> 24);
    }
}

// Solarize at 128, then ((v / 255) - mean) / std in f32, into T. mean_std: 3 means, 3 stds.
template <typename T>
__device__ void aug_finish(const unsigned char* in, T* out, const AugParams* params,
                           const float* mean_std, int batch, int hw) {
    u64 n = (u64)batch * hw * 3;
    FOR_EACH(i, n) {
        int c = (int)(i % 3);
        int b = (int)(i / ((u64)hw * 3));
        int v = in[i];
        if (params[b].solarize && v >= 128) v = 255 - v;
        float x = __fdiv_rn(__fsub_rn(__fdiv_rn((float)v, 255.0f), mean_std[c]), mean_std[3 + c]);
        st(out, i, x);
    }
}
EXPORT_F32_BF16(aug_finish,
                (const unsigned char* in, T* out, const AugParams* params, const float* mean_std,
                 int batch, int hw),
                (in, out, params, mean_std, batch, hw))
