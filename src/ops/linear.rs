//! Linear map over rows, no bias: PyTorch's 1x1 Conv1d of the MLP heads seen position by position.
//!   y (R, O) = x (R, I) * w^T,  w (O, I)  (the [out, in, 1] Conv1d weight without its last axis)
//!   dx (R, I) += dy (R, O) * w (O, I)
//!   dw (O, I) += dy^T (O, R) * x (R, I)
//! Each product is one GEMM whose output is tiled over the threads (ops::par_gemm): every element is
//! one sum over the whole of k, so the result does not depend on the thread count.
//! Saved for backward: the input x.

use super::{par_gemm, Mat, Real};

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct LinearParams` in kernels/linear.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinearParams {
    pub rows: i32,
    pub c_in: i32,
    pub c_out: i32,
}

impl LinearParams {
    pub fn new(rows: usize, c_in: usize, c_out: usize) -> LinearParams {
        LinearParams {
            rows: rows as i32,
            c_in: c_in as i32,
            c_out: c_out as i32,
        }
    }
    fn dims(&self) -> (usize, usize, usize) {
        (self.rows as usize, self.c_in as usize, self.c_out as usize)
    }
    fn check(&self, op: &str, x: usize, w: usize, y: usize) {
        let (r, i, o) = self.dims();
        assert!(
            x == r * i && w == o * i && y == r * o,
            "{op}: lengths x {x} w {w} y {y}, expected {} {} {} for {self:?}",
            r * i,
            o * i,
            r * o
        );
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// y (R, O) = x (R, I) w^T; y is overwritten.
pub fn forward_cpu<T: Real>(x: &[T], w: &[T], y: &mut [T], p: &LinearParams) {
    p.check("linear_forward", x.len(), w.len(), y.len());
    let (r, ci, co) = p.dims();
    par_gemm(
        "linear_forward",
        T::one(),
        x,
        Mat::rows(r, ci, 0),
        w,
        Mat::rows(co, ci, 0).t(),
        T::zero(),
        y,
        Mat::rows(r, co, 0),
    );
}

/// dx (R, I) += dy (R, O) w.
pub fn backward_data_cpu<T: Real>(dy: &[T], w: &[T], dx: &mut [T], p: &LinearParams) {
    p.check("linear_backward_data", dx.len(), w.len(), dy.len());
    let (r, ci, co) = p.dims();
    par_gemm(
        "linear_backward_data",
        T::one(),
        dy,
        Mat::rows(r, co, 0),
        w,
        Mat::rows(co, ci, 0),
        T::one(),
        dx,
        Mat::rows(r, ci, 0),
    );
}

/// dw (O, I) += dy^T x over all rows: one GEMM whose k is every row, so each element of dw is one
/// sum in a fixed order.
pub fn backward_weight_cpu<T: Real>(x: &[T], dy: &[T], dw: &mut [T], p: &LinearParams) {
    p.check("linear_backward_weight", x.len(), dw.len(), dy.len());
    let (r, ci, co) = p.dims();
    par_gemm(
        "linear_backward_weight",
        T::one(),
        dy,
        Mat::rows(r, co, 0).t(),
        x,
        Mat::rows(r, ci, 0),
        T::one(),
        dw,
        Mat::rows(co, ci, 0),
    );
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers: cuBLAS, f32 accumulation (TF32 when the GPU's f32 math mode allows it).

use crate::gpu::{need, Dev, DevMut, Gpu, GpuFloat};
use cudarc::cublas::{CudaBlas, Gemm};

/// (R, I, O) of p.
fn dims(p: &LinearParams) -> (usize, usize, usize) {
    (p.rows as usize, p.c_in as usize, p.c_out as usize)
}

pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &LinearParams,
    x: &impl Dev<T>,
    w: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (r, i, o) = dims(p);
    need(
        "linear::forward_cuda",
        &[
            ("x", x.len(), r * i),
            ("w", w.len(), o * i),
            ("y", y.len(), r * o),
        ],
    )?;
    g.gemm(
        (false, true),
        (r, o, i),
        (&x.view(), i),
        (&w.view(), i),
        0.0,
        (&mut y.view_mut(), o),
        (1, 0, 0, 0),
    )
}

/// dx += dy * w.
pub fn backward_data_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &LinearParams,
    dy: &impl Dev<T>,
    w: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (r, i, o) = dims(p);
    need(
        "linear::backward_data_cuda",
        &[
            ("dy", dy.len(), r * o),
            ("w", w.len(), o * i),
            ("dx", dx.len(), r * i),
        ],
    )?;
    g.gemm(
        (false, false),
        (r, i, o),
        (&dy.view(), o),
        (&w.view(), i),
        1.0,
        (&mut dx.view_mut(), i),
        (1, 0, 0, 0),
    )
}

/// dw += dy^T * x.
pub fn backward_weight_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &LinearParams,
    x: &impl Dev<T>,
    dy: &impl Dev<T>,
    dw: &mut impl DevMut<T>,
) -> crate::Result<()>
where
    CudaBlas: Gemm<T>,
{
    let (r, i, o) = dims(p);
    need(
        "linear::backward_weight_cuda",
        &[
            ("x", x.len(), r * i),
            ("dy", dy.len(), r * o),
            ("dw", dw.len(), o * i),
        ],
    )?;
    g.gemm(
        (true, false),
        (o, i, r),
        (&dy.view(), o),
        (&x.view(), i),
        1.0,
        (&mut dw.view_mut(), i),
        (1, 0, 0, 0),
    )
}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut};

/// The linear map's kernels on a backend (the graph's linear node).
pub trait LinearKernels: Backend {
    fn linear_forward(
        &self,
        p: &LinearParams,
        x: &Ve<Self>,
        w: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn linear_backward_data(
        &self,
        p: &LinearParams,
        dy: &Ve<Self>,
        w: &Ve<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn linear_backward_weight(
        &self,
        p: &LinearParams,
        x: &Ve<Self>,
        dy: &Ve<Self>,
        dw: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> LinearKernels for Cpu<T> {
    fn linear_forward(
        &self,
        p: &LinearParams,
        x: &&[T],
        w: &&[T],
        y: &mut &mut [T],
    ) -> crate::Result<()> {
        forward_cpu(x, w, y, p);
        Ok(())
    }
    fn linear_backward_data(
        &self,
        p: &LinearParams,
        dy: &&[T],
        w: &&[T],
        dx: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_data_cpu(dy, w, dx, p);
        Ok(())
    }
    fn linear_backward_weight(
        &self,
        p: &LinearParams,
        x: &&[T],
        dy: &&[T],
        dw: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_weight_cpu(x, dy, dw, p);
        Ok(())
    }
}

impl<E: GpuFloat> LinearKernels for Cuda<E>
where
    CudaBlas: Gemm<E>,
{
    fn linear_forward(
        &self,
        p: &LinearParams,
        x: &Ve<Self>,
        w: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        forward_cuda(&self.gpu, p, x, w, y)
    }
    fn linear_backward_data(
        &self,
        p: &LinearParams,
        dy: &Ve<Self>,
        w: &Ve<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        backward_data_cuda(&self.gpu, p, dy, w, dx)
    }
    fn linear_backward_weight(
        &self,
        p: &LinearParams,
        x: &Ve<Self>,
        dy: &Ve<Self>,
        dw: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        backward_weight_cuda(&self.gpu, p, x, dy, dw)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn gradcheck_linear() {
        for p in [LinearParams::new(7, 5, 3), LinearParams::new(150, 4, 6)] {
            let (r, i, o) = p.dims();
            let inputs = vec![uniform(1, r * i, -1.0, 1.0), uniform(2, o * i, -1.0, 1.0)];
            let fwd = |xs: &[Vec<f64>]| {
                let mut y = vec![0.0; r * o];
                forward_cpu(&xs[0], &xs[1], &mut y, &p);
                y
            };
            let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
                let (mut dx, mut dw) = (vec![0.0; r * i], vec![0.0; o * i]);
                backward_data_cpu(dy, &xs[1], &mut dx, &p);
                backward_weight_cpu(&xs[0], dy, &mut dw, &p);
                vec![Some(dx), Some(dw)]
            };
            assert_ok(check("linear", &["x", "w"], &inputs, &fwd, &bwd));
        }
    }

    #[test]
    fn forward_matches_loops() {
        let p = LinearParams::new(3, 2, 2);
        let x = [1.0, 2.0, 3.0, 4.0, 5.0, 6.0];
        let w = [1.0, -1.0, 0.5, 2.0];
        let mut y = [0.0; 6];
        forward_cpu(&x, &w, &mut y, &p);
        assert_eq!(y, [-1.0, 4.5, -1.0, 9.5, -1.0, 14.5]);
    }
}
