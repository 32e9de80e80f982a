//! The neck's concat and split along the position axis (LEWEL_SPEC 2.2, steps 3 and 5).
//!   concat: U (B, 1+L, C) with U[b, 0] = g[b] (the pooled vector) and U[b, 1+p] = X[b, p]
//!   split:  Z (B, 1+L, D) -> z_g (B, D) = Z[b, 0] and A (B, L, D) = Z[b, 1..]
//! Each is the other's backward. Rows are positions, so both are block copies.
//! Saved for backward: nothing.

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct ConcatParams` in kernels/concat.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConcatParams {
    pub b: i32,
    /// Positions of the map (H*W); the joined tensor has 1 + l rows per sample.
    pub l: i32,
    pub c: i32,
}

impl ConcatParams {
    pub fn new(b: usize, l: usize, c: usize) -> ConcatParams {
        ConcatParams {
            b: b as i32,
            l: l as i32,
            c: c as i32,
        }
    }
    fn dims(&self) -> (usize, usize, usize) {
        (self.b as usize, self.l as usize, self.c as usize)
    }
    fn check(&self, op: &str, g: usize, x: usize, u: usize) {
        let (b, l, c) = self.dims();
        assert!(
            g == b * c && x == b * l * c && u == b * (1 + l) * c,
            "{op}: lengths {g} {x} {u}, expected {} {} {} for {self:?}",
            b * c,
            b * l * c,
            b * (1 + l) * c
        );
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// u (B, 1+L, C) = [g (B, C); x (B, L, C)] along positions; u is overwritten.
pub fn concat_cpu<T: Real>(g: &[T], x: &[T], u: &mut [T], p: &ConcatParams) {
    p.check("concat", g.len(), x.len(), u.len());
    let (_, l, c) = p.dims();
    u.par_chunks_mut((1 + l) * c)
        .enumerate()
        .for_each(|(b, u_b)| {
            u_b[..c].copy_from_slice(&g[b * c..][..c]);
            u_b[c..].copy_from_slice(&x[b * l * c..][..l * c]);
        });
}

/// Backward of concat: dg += du[:, 0], dx += du[:, 1..].
pub fn concat_backward_cpu<T: Real>(du: &[T], dg: &mut [T], dx: &mut [T], p: &ConcatParams) {
    p.check("concat_backward", dg.len(), dx.len(), du.len());
    let (_, l, c) = p.dims();
    dg.par_chunks_mut(c)
        .zip(dx.par_chunks_mut(l * c))
        .enumerate()
        .for_each(|(b, (dg_b, dx_b))| {
            let du_b = &du[b * (1 + l) * c..][..(1 + l) * c];
            for (d, v) in dg_b.iter_mut().zip(&du_b[..c]) {
                *d = *d + *v;
            }
            for (d, v) in dx_b.iter_mut().zip(&du_b[c..]) {
                *d = *d + *v;
            }
        });
}

/// z (B, 1+L, D) -> zg (B, D), a (B, L, D); both overwritten.
pub fn split_cpu<T: Real>(z: &[T], zg: &mut [T], a: &mut [T], p: &ConcatParams) {
    p.check("split", zg.len(), a.len(), z.len());
    let (_, l, c) = p.dims();
    zg.par_chunks_mut(c)
        .zip(a.par_chunks_mut(l * c))
        .enumerate()
        .for_each(|(b, (zg_b, a_b))| {
            let z_b = &z[b * (1 + l) * c..][..(1 + l) * c];
            zg_b.copy_from_slice(&z_b[..c]);
            a_b.copy_from_slice(&z_b[c..]);
        });
}

/// Backward of split: dz[:, 0] += dzg, dz[:, 1..] += da.
pub fn split_backward_cpu<T: Real>(dzg: &[T], da: &[T], dz: &mut [T], p: &ConcatParams) {
    p.check("split_backward", dzg.len(), da.len(), dz.len());
    let (_, l, c) = p.dims();
    dz.par_chunks_mut((1 + l) * c)
        .enumerate()
        .for_each(|(b, dz_b)| {
            let (head, tail) = dz_b.split_at_mut(c);
            for (d, v) in head.iter_mut().zip(&dzg[b * c..][..c]) {
                *d = *d + *v;
            }
            for (d, v) in tail.iter_mut().zip(&da[b * l * c..][..l * c]) {
                *d = *d + *v;
            }
        });
}

// ----------------------------------------------------------------------------
// Tests

// ---- CUDA launchers (kernels/concat.cu)

use crate::gpu::{grid_1d, run, Gpu, GpuFloat};
use cudarc::driver::{CudaSlice, PushKernelArg};

fn joined(p: &ConcatParams) -> usize {
    p.b as usize * (p.l as usize + 1) * p.c as usize
}

pub fn concat_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    gv: &CudaSlice<T>,
    x: &CudaSlice<T>,
    u: &mut CudaSlice<T>,
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(g.k.concat_fwd.get::<T>());
    b.arg(gv).arg(x).arg(u).arg(p);
    run(g, b, grid_1d(joined(p)), "concat_fwd")
}

pub fn concat_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    du: &CudaSlice<T>,
    dg: &mut CudaSlice<T>,
    dx: &mut CudaSlice<T>,
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(g.k.concat_bwd.get::<T>());
    b.arg(du).arg(dg).arg(dx).arg(p);
    run(g, b, grid_1d(joined(p)), "concat_bwd")
}

pub fn split_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    z: &CudaSlice<T>,
    zg: &mut CudaSlice<T>,
    a: &mut CudaSlice<T>,
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(g.k.split_fwd.get::<T>());
    b.arg(z).arg(zg).arg(a).arg(p);
    run(g, b, grid_1d(joined(p)), "split_fwd")
}

pub fn split_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    dzg: &CudaSlice<T>,
    da: &CudaSlice<T>,
    dz: &mut CudaSlice<T>,
) -> crate::Result<()> {
    let mut b = g.stream.launch_builder(g.k.split_bwd.get::<T>());
    b.arg(dzg).arg(da).arg(dz).arg(p);
    run(g, b, grid_1d(joined(p)), "split_bwd")
}

// SAFETY: #[repr(C)] of i32 fields, the layout of the kernels' ConcatParams.
unsafe impl cudarc::driver::DeviceRepr for ConcatParams {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn gradcheck_concat() {
        let p = ConcatParams::new(2, 5, 3);
        let inputs = vec![uniform(1, 6, -1.0, 1.0), uniform(2, 30, -1.0, 1.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut u = vec![0.0; 36];
            concat_cpu(&xs[0], &xs[1], &mut u, &p);
            u
        };
        let bwd = |_: &[Vec<f64>], du: &[f64]| {
            let (mut dg, mut dx) = (vec![0.0; 6], vec![0.0; 30]);
            concat_backward_cpu(du, &mut dg, &mut dx, &p);
            vec![Some(dg), Some(dx)]
        };
        assert_ok(check("concat", &["g", "x"], &inputs, &fwd, &bwd));
    }

    #[test]
    fn gradcheck_split() {
        let p = ConcatParams::new(3, 4, 2);
        let inputs = vec![uniform(3, 30, -1.0, 1.0)];
        // Both outputs, flattened one after the other.
        let fwd = |xs: &[Vec<f64>]| {
            let (mut zg, mut a) = (vec![0.0; 6], vec![0.0; 24]);
            split_cpu(&xs[0], &mut zg, &mut a, &p);
            [zg, a].concat()
        };
        let bwd = |_: &[Vec<f64>], dy: &[f64]| {
            let mut dz = vec![0.0; 30];
            split_backward_cpu(&dy[..6], &dy[6..], &mut dz, &p);
            vec![Some(dz)]
        };
        assert_ok(check("split", &["z"], &inputs, &fwd, &bwd));
    }

    #[test]
    fn split_inverts_concat() {
        let p = ConcatParams::new(2, 3, 4);
        let g = uniform(4, 8, -1.0, 1.0);
        let x = uniform(5, 24, -1.0, 1.0);
        let mut u = vec![0.0; 32];
        concat_cpu(&g, &x, &mut u, &p);
        assert_eq!(&u[..4], &g[..4]);
        assert_eq!(&u[4..16], &x[..12]);
        let (mut g2, mut x2) = (vec![0.0; 8], vec![0.0; 24]);
        split_cpu(&u, &mut g2, &mut x2, &p);
        assert_eq!((g2, x2), (g, x));
    }
}
