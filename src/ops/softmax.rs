//! Softmax over positions, separately for each sample and channel (LEWEL_SPEC 2.2, step 8): the
//! alignment maps. x, y are (B, L, D) with positions as rows:
//!   y[b, p, d] = exp(x[b, p, d] - max_p) / sum_p' exp(x[b, p', d] - max_p)
//! Backward: dx[b, p, d] += y[b, p, d] * (dy[b, p, d] - sum_p' y[b, p', d] dy[b, p', d]).
//! Saved for backward: the output y.
//! The GPU also has the fused alignment map ([`AlignParams`]): this softmax applied to the per-row
//! L2 norm with temperature of src/ops/l2norm.rs, one kernel each way; its CPU reference is that
//! composition (l2norm, then softmax).

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct SoftmaxParams` in kernels/softmax.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SoftmaxParams {
    pub b: i32,
    pub l: i32,
    pub d: i32,
}

/// Parameters of the fused alignment map: softmax over positions of x / max(|x_row|, eps) / scale.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AlignParams {
    pub b: i32,
    pub l: i32,
    pub d: i32,
    pub scale: f32,
    pub eps: f32,
}

impl SoftmaxParams {
    pub fn new(b: usize, l: usize, d: usize) -> SoftmaxParams {
        SoftmaxParams {
            b: b as i32,
            l: l as i32,
            d: d as i32,
        }
    }
    fn len(&self) -> usize {
        (self.b * self.l * self.d) as usize
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// y (B, L, D) = softmax of x over L for every (b, d).
pub fn forward_cpu<T: Real>(x: &[T], y: &mut [T], p: &SoftmaxParams) {
    assert!(
        x.len() == p.len() && y.len() == p.len(),
        "softmax_forward: x {} y {} for {p:?}",
        x.len(),
        y.len()
    );
    let (l, d) = (p.l as usize, p.d as usize);
    y.par_chunks_mut(l * d)
        .zip(x.par_chunks(l * d))
        .for_each(|(y_b, x_b)| {
            let mut mx = vec![f64::NEG_INFINITY; d];
            for r in x_b.chunks(d) {
                for (m, v) in mx.iter_mut().zip(r) {
                    *m = m.max(v.as_f64());
                }
            }
            let mut sum = vec![0.0f64; d];
            for (yr, xr) in y_b.chunks_mut(d).zip(x_b.chunks(d)) {
                for ch in 0..d {
                    let e = (xr[ch].as_f64() - mx[ch]).exp();
                    sum[ch] += e;
                    yr[ch] = T::from_f64(e);
                }
            }
            for yr in y_b.chunks_mut(d) {
                for ch in 0..d {
                    yr[ch] = T::from_f64(yr[ch].as_f64() / sum[ch]);
                }
            }
        });
}

/// dx (B, L, D) += softmax backward from the saved output y and dy.
pub fn backward_cpu<T: Real>(y: &[T], dy: &[T], dx: &mut [T], p: &SoftmaxParams) {
    assert!(
        y.len() == p.len() && dy.len() == p.len() && dx.len() == p.len(),
        "softmax_backward: y {} dy {} dx {} for {p:?}",
        y.len(),
        dy.len(),
        dx.len()
    );
    let (l, d) = (p.l as usize, p.d as usize);
    dx.par_chunks_mut(l * d).enumerate().for_each(|(b, dx_b)| {
        let (y_b, dy_b) = (&y[b * l * d..][..l * d], &dy[b * l * d..][..l * d]);
        let mut dot = vec![0.0f64; d];
        for (yr, gr) in y_b.chunks(d).zip(dy_b.chunks(d)) {
            for ch in 0..d {
                dot[ch] += yr[ch].as_f64() * gr[ch].as_f64();
            }
        }
        for ((dr, yr), gr) in dx_b.chunks_mut(d).zip(y_b.chunks(d)).zip(dy_b.chunks(d)) {
            for ch in 0..d {
                dr[ch] = dr[ch] + T::from_f64(yr[ch].as_f64() * (gr[ch].as_f64() - dot[ch]));
            }
        }
    });
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers (kernels/softmax.cu): the softmax alone, and the fused alignment map
// (per-pixel L2 norm and temperature, then the softmax over positions), one kernel each way.

use crate::gpu::{blocks, grid_1d, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &SoftmaxParams,
    x: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = p.len();
    need(
        "softmax::forward_cuda",
        &[("x", x.len(), n), ("y", y.len(), n)],
    )?;
    let (x, mut y) = (x.view(), y.view_mut());
    let mut b = g.stream.launch_builder(g.k.softmax_fwd.get::<T>());
    b.arg(&x).arg(&mut y).arg(p);
    run(g, b, grid_1d(p.b as usize * p.d as usize), "softmax_fwd")
}

pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &SoftmaxParams,
    y: &impl Dev<T>,
    dy: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = p.len();
    need(
        "softmax::backward_cuda",
        &[("y", y.len(), n), ("dy", dy.len(), n), ("dx", dx.len(), n)],
    )?;
    let (y, dy, mut dx) = (y.view(), dy.view(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.softmax_bwd.get::<T>());
    b.arg(&y).arg(&dy).arg(&mut dx).arg(p);
    run(g, b, grid_1d(p.b as usize * p.d as usize), "softmax_bwd")
}

/// y = softmax_positions(l2norm(x) / scale), x and y (B, L, D).
pub fn align_forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &AlignParams,
    x: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = (p.b * p.l * p.d) as usize;
    need(
        "softmax::align_forward_cuda",
        &[("x", x.len(), n), ("y", y.len(), n)],
    )?;
    let (x, mut y) = (x.view(), y.view_mut());
    let mut b = g.stream.launch_builder(g.k.align_fwd.get::<T>());
    b.arg(&x).arg(&mut y).arg(p);
    run(g, b, blocks(p.b as usize, 256), "align_fwd")
}

/// dx += the alignment map's backward; `scratch` holds B*L*D f32.
pub fn align_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &AlignParams,
    (x, y, dy): (&impl Dev<T>, &impl Dev<T>, &impl Dev<T>),
    scratch: &mut impl DevMut<f32>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = (p.b * p.l * p.d) as usize;
    need(
        "softmax::align_backward_cuda",
        &[
            ("x", x.len(), n),
            ("y", y.len(), n),
            ("dy", dy.len(), n),
            ("scratch", scratch.len(), n),
            ("dx", dx.len(), n),
        ],
    )?;
    let (x, y, dy) = (x.view(), y.view(), dy.view());
    let (mut scratch, mut dx) = (scratch.view_mut(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.align_bwd.get::<T>());
    b.arg(&x)
        .arg(&y)
        .arg(&dy)
        .arg(&mut scratch)
        .arg(&mut dx)
        .arg(p);
    run(g, b, blocks(p.b as usize, 256), "align_bwd")
}

// SAFETY: #[repr(C)] of i32/f32 fields, the layouts of the kernels' structs.
unsafe impl cudarc::driver::DeviceRepr for SoftmaxParams {}
unsafe impl cudarc::driver::DeviceRepr for AlignParams {}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut, VfMut};

/// LEWEL's alignment map on a backend (the graph's fused align node): on the CPU, the L2
/// normalization and this softmax composed.
pub trait AlignKernels: Backend {
    fn align_forward(
        &self,
        p: &AlignParams,
        x: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    /// dx += the map's backward; `scratch` holds B*L*D values of `F`.
    fn align_backward(
        &self,
        p: &AlignParams,
        xydy: (&Ve<Self>, &Ve<Self>, &Ve<Self>),
        scratch: &mut VfMut<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl AlignParams {
    /// The two CPU steps: the L2 normalization of rows, the softmax over positions.
    fn steps(&self) -> (crate::ops::l2norm::L2NormParams, SoftmaxParams) {
        let (b, l, d) = (self.b as usize, self.l as usize, self.d as usize);
        let lp = crate::ops::l2norm::L2NormParams::new(b * l, d, self.scale);
        assert_eq!(lp.eps, self.eps, "AlignParams: eps differs from l2norm's");
        (lp, SoftmaxParams::new(b, l, d))
    }
}

impl<T: Real + Elem> AlignKernels for Cpu<T> {
    fn align_forward(&self, p: &AlignParams, x: &&[T], y: &mut &mut [T]) -> crate::Result<()> {
        let (lp, sp) = p.steps();
        self.with_scratch(x.len(), |a| {
            crate::ops::l2norm::forward_cpu(x, a, &lp);
            forward_cpu(a, y, &sp);
        });
        Ok(())
    }
    fn align_backward(
        &self,
        p: &AlignParams,
        (x, y, dy): (&&[T], &&[T], &&[T]),
        scratch: &mut &mut [T],
        dx: &mut &mut [T],
    ) -> crate::Result<()> {
        let (lp, sp) = p.steps();
        scratch.fill(T::zero());
        backward_cpu(y, dy, scratch, &sp);
        crate::ops::l2norm::backward_cpu(x, scratch, dx, &lp);
        Ok(())
    }
}

impl<E: GpuFloat> AlignKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn align_forward(
        &self,
        p: &AlignParams,
        x: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        align_forward_cuda(&self.gpu, p, x, y)
    }
    fn align_backward(
        &self,
        p: &AlignParams,
        xydy: (&Ve<Self>, &Ve<Self>, &Ve<Self>),
        scratch: &mut VfMut<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        align_backward_cuda(&self.gpu, p, xydy, scratch, dx)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn gradcheck_softmax() {
        let p = SoftmaxParams::new(2, 5, 3);
        let inputs = vec![uniform(1, 30, -2.0, 2.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; 30];
            forward_cpu(&xs[0], &mut y, &p);
            y
        };
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let mut y = vec![0.0; 30];
            forward_cpu(&xs[0], &mut y, &p);
            let mut dx = vec![0.0; 30];
            backward_cpu(&y, dy, &mut dx, &p);
            vec![Some(dx)]
        };
        assert_ok(check("softmax", &["x"], &inputs, &fwd, &bwd));
    }

    #[test]
    fn sums_to_one_over_positions() {
        let p = SoftmaxParams::new(2, 7, 4);
        let x = uniform(2, 56, -50.0, 50.0);
        let mut y = vec![0.0; 56];
        forward_cpu(&x, &mut y, &p);
        for b in 0..2 {
            for ch in 0..4 {
                let s: f64 = (0..7).map(|q| y[(b * 7 + q) * 4 + ch]).sum();
                assert!((s - 1.0).abs() < 1e-12);
            }
        }
    }
}
