// The neck's concat and split along positions (src/ops/concat.rs): U (B, 1+L, C) holds the pooled
// vector g[b] at row 0 and the map X[b] at rows 1..; split is the inverse. Backward is the other op,
// adding: every gradient element receives exactly one term.
#include "common.cuh"

struct ConcatParams {
    int b;
    int l;
    int c;
};

// Element i of the joined (B, 1+L, C) tensor: its position row (0 = the pooled vector) and the index
// of the same element in g (B, C) when pos == 0, else in X (B, L, C).
__device__ __forceinline__ int joined_index(u64 i, const ConcatParams& p, u64* j) {
    int c = (int)(i % p.c);
    u64 row = i / p.c;
    u64 b = row / (p.l + 1);
    int pos = (int)(row % (p.l + 1));
    *j = pos == 0 ? b * p.c + c : (b * p.l + pos - 1) * p.c + c;
    return pos;
}

template <typename T>
__device__ void concat_fwd(const T* g, const T* x, T* u, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        u64 j;
        int pos = joined_index(i, p, &j);
        st(u, i, pos == 0 ? ld(g, j) : ld(x, j));
    }
}
EXPORT_F32_BF16(concat_fwd, (const T* g, const T* x, T* u, ConcatParams p), (g, x, u, p))

template <typename T>
__device__ void concat_bwd(const T* du, T* dg, T* dx, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        u64 j;
        int pos = joined_index(i, p, &j);
        T* dst = pos == 0 ? dg : dx;
        st(dst, j, ld(dst, j) + ld(du, i));
    }
}
EXPORT_F32_BF16(concat_bwd, (const T* du, T* dg, T* dx, ConcatParams p), (du, dg, dx, p))

template <typename T>
__device__ void split_fwd(const T* z, T* zg, T* a, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        u64 j;
        int pos = joined_index(i, p, &j);
        st(pos == 0 ? zg : a, j, ld(z, i));
    }
}
EXPORT_F32_BF16(split_fwd, (const T* z, T* zg, T* a, ConcatParams p), (z, zg, a, p))

template <typename T>
__device__ void split_bwd(const T* dzg, const T* da, T* dz, ConcatParams p) {
    FOR_EACH(i, (u64)p.b * (p.l + 1) * p.c) {
        u64 j;
        int pos = joined_index(i, p, &j);
        float d = pos == 0 ? ld(dzg, j) : ld(da, j);
        st(dz, i, ld(dz, i) + d);
    }
}
EXPORT_F32_BF16(split_bwd, (const T* dzg, const T* da, T* dz, ConcatParams p), (dzg, da, dz, p))
