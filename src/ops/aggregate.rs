//! Head-split spatial weighted aggregation (LEWEL_SPEC 2.2, steps 9-10). With n heads, K = D/n
//! attention channels and C/n feature channels per head, x the raw backbone map (B, L, C) and w the
//! alignment maps (B, L, D), both with positions as rows:
//!   v[b, k, h*C/n + j] = sum_p x[b, p, h*C/n + j] * w[b, p, h*K + k]
//! v is (B, K, C): row k is aligned embedding k, the (B, C, K) tensor of PyTorch seen column-wise.
//! Per (b, h) this is one GEMM: v_bh (K, C/n) = w_bh^T (K, L) * x_bh (L, C/n). Backward:
//!   dx_bh (L, C/n) += w_bh (L, K) * dv_bh (K, C/n)
//!   dw_bh (L, K)   += x_bh (L, C/n) * dv_bh^T (C/n, K)
//! Saved for backward: the inputs x and w.

use super::{gemm, Mat, Real};
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct AggregateParams` in kernels/aggregate.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AggregateParams {
    pub b: i32,
    pub l: i32,
    /// Feature channels (2048 for ResNet-50).
    pub c: i32,
    /// Attention channels (256).
    pub d: i32,
    pub heads: i32,
}

impl AggregateParams {
    pub fn new(b: usize, l: usize, c: usize, d: usize, heads: usize) -> AggregateParams {
        assert!(
            heads > 0 && c.is_multiple_of(heads) && d.is_multiple_of(heads),
            "aggregate: {heads} heads must divide feature channels {c} and attention channels {d}"
        );
        AggregateParams {
            b: b as i32,
            l: l as i32,
            c: c as i32,
            d: d as i32,
            heads: heads as i32,
        }
    }
    /// (B, L, C, D, K = D/n, C/n)
    fn dims(&self) -> (usize, usize, usize, usize, usize, usize) {
        let (b, l, c, d, n) = (
            self.b as usize,
            self.l as usize,
            self.c as usize,
            self.d as usize,
            self.heads as usize,
        );
        (b, l, c, d, d / n, c / n)
    }
    pub fn v_len(&self) -> usize {
        let (b, _, c, _, k, _) = self.dims();
        b * k * c
    }
    fn check(&self, op: &str, x: usize, w: usize, v: usize) {
        let (b, l, c, d, k, _) = self.dims();
        assert!(
            x == b * l * c && w == b * l * d && v == b * k * c,
            "{op}: lengths x {x} w {w} v {v}, expected {} {} {} for {self:?}",
            b * l * c,
            b * l * d,
            b * k * c
        );
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// v (B, K, C) from x (B, L, C) and w (B, L, D); v is overwritten.
pub fn forward_cpu<T: Real>(x: &[T], w: &[T], v: &mut [T], p: &AggregateParams) {
    p.check("aggregate_forward", x.len(), w.len(), v.len());
    let (_, l, c, d, k, cn) = p.dims();
    v.par_chunks_mut(k * c).enumerate().for_each(|(b, v_b)| {
        for h in 0..p.heads as usize {
            let vw_t = Mat {
                rows: k,
                cols: l,
                off: b * l * d + h * k,
                rs: 1,
                cs: d,
            };
            let vx = Mat::rows(l, cn, b * l * c + h * cn).with_rs(c);
            let vv = Mat::rows(k, cn, h * cn).with_rs(c);
            gemm(
                "aggregate_forward",
                T::one(),
                w,
                vw_t,
                x,
                vx,
                T::zero(),
                v_b,
                vv,
            );
        }
    });
}

/// dx (B, L, C) += and dw (B, L, D) += from dv (B, K, C).
pub fn backward_cpu<T: Real>(
    x: &[T],
    w: &[T],
    dv: &[T],
    dx: &mut [T],
    dw: &mut [T],
    p: &AggregateParams,
) {
    p.check("aggregate_backward", x.len(), w.len(), dv.len());
    assert!(
        dx.len() == x.len() && dw.len() == w.len(),
        "aggregate_backward: grad lengths"
    );
    let (_, l, c, d, k, cn) = p.dims();
    dx.par_chunks_mut(l * c)
        .zip(dw.par_chunks_mut(l * d))
        .enumerate()
        .for_each(|(b, (dx_b, dw_b))| {
            for h in 0..p.heads as usize {
                let vdv = Mat::rows(k, cn, b * k * c + h * cn).with_rs(c);
                let vw = Mat::rows(l, k, b * l * d + h * k).with_rs(d);
                let vdx = Mat::rows(l, cn, h * cn).with_rs(c);
                gemm(
                    "aggregate_backward_x",
                    T::one(),
                    w,
                    vw,
                    dv,
                    vdv,
                    T::one(),
                    dx_b,
                    vdx,
                );
                let vx = Mat::rows(l, cn, b * l * c + h * cn).with_rs(c);
                let vdw = Mat::rows(l, k, h * k).with_rs(d);
                gemm(
                    "aggregate_backward_w",
                    T::one(),
                    x,
                    vx,
                    dv,
                    vdv.t(),
                    T::one(),
                    dw_b,
                    vdw,
                );
            }
        });
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers: one cuBLAS strided-batched GEMM per head, batched over samples.

use crate::gpu::{need, Dev, DevMut, Gpu, GpuFloat};
use cudarc::cublas::{CudaBlas, Gemm};

/// Lengths of x (B, L, C), w (B, L, D) and v (B, K, C).
fn lens(p: &AggregateParams) -> (usize, usize, usize) {
    let (b, l, c, d, _, _) = p.dims();
    (b * l * c, b * l * d, p.v_len())
}

/// v (B, K, C) = per head w_bh^T x_bh.
pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &AggregateParams,
    x: &impl Dev<T>,
    w: &impl Dev<T>,
    v: &mut impl DevMut<T>,
) -> crate::Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (nx, nw, nv) = lens(p);
    need(
        "aggregate::forward_cuda",
        &[("x", x.len(), nx), ("w", w.len(), nw), ("v", v.len(), nv)],
    )?;
    let (x, w, mut v) = (x.view(), w.view(), v.view_mut());
    let (b, l, c, d, k, cn) = p.dims();
    for h in 0..p.heads as usize {
        let (wv, xv) = (w.slice(h * k..), x.slice(h * cn..));
        let mut vv = v.slice_mut(h * cn..);
        g.gemm(
            (true, false),
            (k, cn, l),
            (&wv, d),
            (&xv, c),
            0.0,
            (&mut vv, c),
            (b, l * d, l * c, k * c),
        )?;
    }
    Ok(())
}

/// dx += w_bh dv_bh and dw += x_bh dv_bh^T, per head.
pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &AggregateParams,
    (x, w, dv): (&impl Dev<T>, &impl Dev<T>, &impl Dev<T>),
    dx: &mut impl DevMut<T>,
    dw: &mut impl DevMut<T>,
) -> crate::Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (nx, nw, nv) = lens(p);
    need(
        "aggregate::backward_cuda",
        &[
            ("x", x.len(), nx),
            ("w", w.len(), nw),
            ("dv", dv.len(), nv),
            ("dx", dx.len(), nx),
            ("dw", dw.len(), nw),
        ],
    )?;
    let (x, w, dv) = (x.view(), w.view(), dv.view());
    let (mut dx, mut dw) = (dx.view_mut(), dw.view_mut());
    let (b, l, c, d, k, cn) = p.dims();
    for h in 0..p.heads as usize {
        let (wv, xv, dvv) = (w.slice(h * k..), x.slice(h * cn..), dv.slice(h * cn..));
        let mut dxv = dx.slice_mut(h * cn..);
        g.gemm(
            (false, false),
            (l, cn, k),
            (&wv, d),
            (&dvv, c),
            1.0,
            (&mut dxv, c),
            (b, l * d, k * c, l * c),
        )?;
        let mut dwv = dw.slice_mut(h * k..);
        g.gemm(
            (false, true),
            (l, k, cn),
            (&xv, c),
            (&dvv, c),
            1.0,
            (&mut dwv, d),
            (b, l * c, k * c, l * d),
        )?;
    }
    Ok(())
}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut};

/// The aggregation's kernels on a backend (the graph's aggregate node).
pub trait AggregateKernels: Backend {
    fn aggregate_forward(
        &self,
        p: &AggregateParams,
        x: &Ve<Self>,
        w: &Ve<Self>,
        v: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    /// dx, dw += the gradients of v.
    fn aggregate_backward(
        &self,
        p: &AggregateParams,
        xwdv: (&Ve<Self>, &Ve<Self>, &Ve<Self>),
        dx: &mut VeMut<Self>,
        dw: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> AggregateKernels for Cpu<T> {
    fn aggregate_forward(
        &self,
        p: &AggregateParams,
        x: &&[T],
        w: &&[T],
        v: &mut &mut [T],
    ) -> crate::Result<()> {
        forward_cpu(x, w, v, p);
        Ok(())
    }
    fn aggregate_backward(
        &self,
        p: &AggregateParams,
        (x, w, dv): (&&[T], &&[T], &&[T]),
        dx: &mut &mut [T],
        dw: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_cpu(x, w, dv, dx, dw, p);
        Ok(())
    }
}

impl<E: GpuFloat> AggregateKernels for Cuda<E>
where
    CudaBlas: Gemm<E>,
{
    fn aggregate_forward(
        &self,
        p: &AggregateParams,
        x: &Ve<Self>,
        w: &Ve<Self>,
        v: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        forward_cuda(&self.gpu, p, x, w, v)
    }
    fn aggregate_backward(
        &self,
        p: &AggregateParams,
        xwdv: (&Ve<Self>, &Ve<Self>, &Ve<Self>),
        dx: &mut VeMut<Self>,
        dw: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        backward_cuda(&self.gpu, p, xwdv, dx, dw)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    /// The spec's formula as plain loops.
    fn forward_loops(x: &[f64], w: &[f64], p: &AggregateParams) -> Vec<f64> {
        let (b, l, c, d, k, cn) = p.dims();
        let mut v = vec![0.0; p.v_len()];
        for bi in 0..b {
            for h in 0..p.heads as usize {
                for j in 0..cn {
                    for kk in 0..k {
                        let s: f64 = (0..l)
                            .map(|q| {
                                x[(bi * l + q) * c + h * cn + j] * w[(bi * l + q) * d + h * k + kk]
                            })
                            .sum();
                        v[(bi * k + kk) * c + h * cn + j] = s;
                    }
                }
            }
        }
        v
    }

    #[test]
    fn forward_matches_spec_loops() {
        let p = AggregateParams::new(2, 5, 8, 6, 2);
        let x = uniform(1, 80, 0.0, 2.0);
        let w = uniform(2, 60, 0.0, 1.0);
        let mut v = vec![0.0; p.v_len()];
        forward_cpu(&x, &w, &mut v, &p);
        for (a, b) in v.iter().zip(forward_loops(&x, &w, &p)) {
            assert!((a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn gradcheck_aggregate() {
        for p in [
            AggregateParams::new(2, 5, 8, 6, 2),
            AggregateParams::new(1, 3, 6, 9, 3),
            AggregateParams::new(2, 4, 4, 4, 1),
        ] {
            let (b, l, c, d, _, _) = p.dims();
            let inputs = vec![
                uniform(3, b * l * c, 0.0, 2.0),
                uniform(4, b * l * d, 0.0, 1.0),
            ];
            let fwd = |xs: &[Vec<f64>]| {
                let mut v = vec![0.0; p.v_len()];
                forward_cpu(&xs[0], &xs[1], &mut v, &p);
                v
            };
            let bwd = |xs: &[Vec<f64>], dv: &[f64]| {
                let (mut dx, mut dw) = (vec![0.0; xs[0].len()], vec![0.0; xs[1].len()]);
                backward_cpu(&xs[0], &xs[1], dv, &mut dx, &mut dw, &p);
                vec![Some(dx), Some(dw)]
            };
            assert_ok(check("aggregate", &["x", "w"], &inputs, &fwd, &bwd));
        }
    }
}
