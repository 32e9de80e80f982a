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
// CUDA launchers

// ---- CUDA launchers (kernels/concat.cu)

use crate::gpu::{grid_1d, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

/// Lengths of the pooled (B, C), map (B, L, C) and joined (B, 1+L, C) tensors.
fn lens(p: &ConcatParams) -> (usize, usize, usize) {
    let (b, l, c) = p.dims();
    (b * c, b * l * c, b * (l + 1) * c)
}

/// u = [g; x] along positions.
pub fn concat_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    gv: &impl Dev<T>,
    x: &impl Dev<T>,
    u: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (ng, nx, nu) = lens(p);
    need(
        "concat::concat_cuda",
        &[("g", gv.len(), ng), ("x", x.len(), nx), ("u", u.len(), nu)],
    )?;
    let (gv, x, mut u) = (gv.view(), x.view(), u.view_mut());
    let mut b = g.stream.launch_builder(g.k.concat_fwd.get::<T>());
    b.arg(&gv).arg(&x).arg(&mut u).arg(p);
    run(g, b, grid_1d(nu), "concat_fwd")
}

/// dg += du's row 0, dx += du's rows 1..
pub fn concat_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    du: &impl Dev<T>,
    dg: &mut impl DevMut<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (ng, nx, nu) = lens(p);
    need(
        "concat::concat_backward_cuda",
        &[
            ("du", du.len(), nu),
            ("dg", dg.len(), ng),
            ("dx", dx.len(), nx),
        ],
    )?;
    let (du, mut dg, mut dx) = (du.view(), dg.view_mut(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.concat_bwd.get::<T>());
    b.arg(&du).arg(&mut dg).arg(&mut dx).arg(p);
    run(g, b, grid_1d(nu), "concat_bwd")
}

/// zg = z's row 0, a = z's rows 1..
pub fn split_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    z: &impl Dev<T>,
    zg: &mut impl DevMut<T>,
    a: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (ng, nx, nu) = lens(p);
    need(
        "concat::split_cuda",
        &[("z", z.len(), nu), ("zg", zg.len(), ng), ("a", a.len(), nx)],
    )?;
    let (z, mut zg, mut a) = (z.view(), zg.view_mut(), a.view_mut());
    let mut b = g.stream.launch_builder(g.k.split_fwd.get::<T>());
    b.arg(&z).arg(&mut zg).arg(&mut a).arg(p);
    run(g, b, grid_1d(nu), "split_fwd")
}

/// dz += [dzg; da].
pub fn split_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConcatParams,
    dzg: &impl Dev<T>,
    da: &impl Dev<T>,
    dz: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (ng, nx, nu) = lens(p);
    need(
        "concat::split_backward_cuda",
        &[
            ("dzg", dzg.len(), ng),
            ("da", da.len(), nx),
            ("dz", dz.len(), nu),
        ],
    )?;
    let (dzg, da, mut dz) = (dzg.view(), da.view(), dz.view_mut());
    let mut b = g.stream.launch_builder(g.k.split_bwd.get::<T>());
    b.arg(&dzg).arg(&da).arg(&mut dz).arg(p);
    run(g, b, grid_1d(nu), "split_bwd")
}

// SAFETY: #[repr(C)] of i32 fields, the layout of the kernels' ConcatParams.
unsafe impl cudarc::driver::DeviceRepr for ConcatParams {}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut};

/// Concat and split along positions on a backend (the graph's concat and split nodes).
pub trait ConcatKernels: Backend {
    fn concat(
        &self,
        p: &ConcatParams,
        g: &Ve<Self>,
        x: &Ve<Self>,
        u: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn concat_backward(
        &self,
        p: &ConcatParams,
        du: &Ve<Self>,
        dg: &mut VeMut<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn split(
        &self,
        p: &ConcatParams,
        z: &Ve<Self>,
        zg: &mut VeMut<Self>,
        a: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn split_backward(
        &self,
        p: &ConcatParams,
        dzg: &Ve<Self>,
        da: &Ve<Self>,
        dz: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> ConcatKernels for Cpu<T> {
    fn concat(&self, p: &ConcatParams, g: &&[T], x: &&[T], u: &mut &mut [T]) -> crate::Result<()> {
        concat_cpu(g, x, u, p);
        Ok(())
    }
    fn concat_backward(
        &self,
        p: &ConcatParams,
        du: &&[T],
        dg: &mut &mut [T],
        dx: &mut &mut [T],
    ) -> crate::Result<()> {
        concat_backward_cpu(du, dg, dx, p);
        Ok(())
    }
    fn split(
        &self,
        p: &ConcatParams,
        z: &&[T],
        zg: &mut &mut [T],
        a: &mut &mut [T],
    ) -> crate::Result<()> {
        split_cpu(z, zg, a, p);
        Ok(())
    }
    fn split_backward(
        &self,
        p: &ConcatParams,
        dzg: &&[T],
        da: &&[T],
        dz: &mut &mut [T],
    ) -> crate::Result<()> {
        split_backward_cpu(dzg, da, dz, p);
        Ok(())
    }
}

impl<E: GpuFloat> ConcatKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn concat(
        &self,
        p: &ConcatParams,
        g: &Ve<Self>,
        x: &Ve<Self>,
        u: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        concat_cuda(&self.gpu, p, g, x, u)
    }
    fn concat_backward(
        &self,
        p: &ConcatParams,
        du: &Ve<Self>,
        dg: &mut VeMut<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        concat_backward_cuda(&self.gpu, p, du, dg, dx)
    }
    fn split(
        &self,
        p: &ConcatParams,
        z: &Ve<Self>,
        zg: &mut VeMut<Self>,
        a: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        split_cuda(&self.gpu, p, z, zg, a)
    }
    fn split_backward(
        &self,
        p: &ConcatParams,
        dzg: &Ve<Self>,
        da: &Ve<Self>,
        dz: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        split_backward_cuda(&self.gpu, p, dzg, da, dz)
    }
}

// ----------------------------------------------------------------------------
// Tests

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
