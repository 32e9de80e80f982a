// The neck's concat and split along positions (src/ops/concat.rs): U (B, 1+L, C) holds the pooled
// vector g[b] at row 0 and the map X[b] at rows 1..; split is the inverse. Backward is the other op,
// adding: every gradient element receives exactly one term.
#include "common.cuh"

struct ConcatParams {
    int b;
    int l;
    int c;
};

template <typename T>
__device__ void concat_fwd(const T* g, const T* x, T* u, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        int c = (int)(i % p.c);
        u64 row = i / p.c;
        u64 b = row / (p.l + 1);
        int pos = (int)(row % (p.l + 1));
        st(u, i, pos == 0 ? ld(g, b * p.c + c) : ld(x, (b * p.l + pos - 1) * p.c + c));
    }
}
EXPORT_F32_BF16(concat_fwd, (const T* g, const T* x, T* u, ConcatParams p), (g, x, u, p))

template <typename T>
__device__ void concat_bwd(const T* du, T* dg, T* dx, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        int c = (int)(i % p.c);
        u64 row = i / p.c;
        u64 b = row / (p.l + 1);
        int pos = (int)(row % (p.l + 1));
        if (pos == 0) {
            u64 j = b * p.c + c;
            st(dg, j, ld(dg, j) + ld(du, i));
        } else {
            u64 j = (b * p.l + pos - 1) * p.c + c;
            st(dx, j, ld(dx, j) + ld(du, i));
        }
    }
}
EXPORT_F32_BF16(concat_bwd, (const T* du, T* dg, T* dx, ConcatParams p), (du, dg, dx, p))

template <typename T>
__device__ void split_fwd(const T* z, T* zg, T* a, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        int c = (int)(i % p.c);
        u64 row = i / p.c;
        u64 b = row / (p.l + 1);
        int pos = (int)(row % (p.l + 1));
        if (pos == 0)
            st(zg, b * p.c + c, ld(z, i));
        else
            st(a, (b * p.l + pos - 1) * p.c + c, ld(z, i));
    }
}
EXPORT_F32_BF16(split_fwd, (const T* z, T* zg, T* a, ConcatParams p), (z, zg, a, p))

template <typename T>
__device__ void split_bwd(const T* dzg, const T* da, T* dz, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        int c = (int)(i % p.c);
        u64 row = i / p.c;
        u64 b = row / (p.l + 1);
        int pos = (int)(row % (p.l + 1));
        float d = pos == 0 ? ld(dzg, b * p.c + c) : ld(da, (b * p.l + pos - 1) * p.c + c);
        st(dz, i, ld(dz, i) + d);
    }
}
EXPORT_F32_BF16(split_bwd, (const T* dzg, const T* da, T* dz, ConcatParams p), (dzg, da, dz, p))
