//! Per-row L2 normalization with a temperature (LEWEL_SPEC 2.2, steps 6-7): each row is one pixel's
//! D-channel projection.
//!   n = ||x_r||_2,  y_r = x_r / max(n, eps) / scale,  eps = 1e-12 (F.normalize's clamp)
//! Backward with u = x_r / n when n > eps:  dx_r += (dy_r - u (u . dy_r)) / (n * scale)
//! and dx_r += dy_r / (eps * scale) when the clamp is active (the clamp passes no gradient to n).
//! Saved for backward: the input x.

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct L2NormParams` in kernels/l2norm.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct L2NormParams {
    pub rows: i32,
    pub d: i32,
    pub scale: f32,
    pub eps: f32,
}

impl L2NormParams {
    pub fn new(rows: usize, d: usize, scale: f32) -> L2NormParams {
        assert!(scale > 0.0, "l2norm: scale must be positive, got {scale}");
        L2NormParams {
            rows: rows as i32,
            d: d as i32,
            scale,
            eps: 1e-12,
        }
    }
}

// ----------------------------------------------------------------------------
// CPU reference

fn norm<T: Real>(r: &[T]) -> f64 {
    r.iter()
        .map(|v| v.as_f64() * v.as_f64())
        .sum::<f64>()
        .sqrt()
}

/// y (R, D) = x / max(||x||, eps) / scale, row by row.
pub fn forward_cpu<T: Real>(x: &[T], y: &mut [T], p: &L2NormParams) {
    let (r, d) = (p.rows as usize, p.d as usize);
    assert!(
        x.len() == r * d && y.len() == r * d,
        "l2norm_forward: x {} y {} for {p:?}",
        x.len(),
        y.len()
    );
    y.par_chunks_mut(d)
        .zip(x.par_chunks(d))
        .for_each(|(y_r, x_r)| {
            let inv = T::from_f64(1.0 / (norm(x_r).max(p.eps as f64) * p.scale as f64));
            for (o, v) in y_r.iter_mut().zip(x_r) {
                *o = *v * inv;
            }
        });
}

/// dx (R, D) += backward of the normalization.
pub fn backward_cpu<T: Real>(x: &[T], dy: &[T], dx: &mut [T], p: &L2NormParams) {
    let (r, d) = (p.rows as usize, p.d as usize);
    assert!(
        x.len() == r * d && dy.len() == r * d && dx.len() == r * d,
        "l2norm_backward: x {} dy {} dx {} for {p:?}",
        x.len(),
        dy.len(),
        dx.len()
    );
    dx.par_chunks_mut(d)
        .zip(x.par_chunks(d).zip(dy.par_chunks(d)))
        .for_each(|(dx_r, (x_r, dy_r))| {
            let n = norm(x_r);
            let s = p.scale as f64;
            if n > p.eps as f64 {
                let dot: f64 = x_r
                    .iter()
                    .zip(dy_r)
                    .map(|(a, b)| a.as_f64() * b.as_f64())
                    .sum::<f64>()
                    / n;
                for ((o, xv), g) in dx_r.iter_mut().zip(x_r).zip(dy_r) {
                    let u = xv.as_f64() / n;
                    *o = *o + T::from_f64((g.as_f64() - u * dot) / (n * s));
                }
            } else {
                let k = T::from_f64(1.0 / (p.eps as f64 * s));
                for (o, g) in dx_r.iter_mut().zip(dy_r) {
                    *o = *o + *g * k;
                }
            }
        });
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers (kernels/l2norm.cu): a warp per row, 8 rows per block.

use crate::gpu::{blocks, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &L2NormParams,
    x: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = p.rows as usize * p.d as usize;
    need(
        "l2norm::forward_cuda",
        &[("x", x.len(), n), ("y", y.len(), n)],
    )?;
    let (x, mut y) = (x.view(), y.view_mut());
    let mut b = g.stream.launch_builder(g.k.l2norm_fwd.get::<T>());
    b.arg(&x).arg(&mut y).arg(p);
    run(
        g,
        b,
        blocks((p.rows as usize).div_ceil(8), 256),
        "l2norm_fwd",
    )
}

pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &L2NormParams,
    x: &impl Dev<T>,
    dy: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = p.rows as usize * p.d as usize;
    need(
        "l2norm::backward_cuda",
        &[("x", x.len(), n), ("dy", dy.len(), n), ("dx", dx.len(), n)],
    )?;
    let (x, dy, mut dx) = (x.view(), dy.view(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.l2norm_bwd.get::<T>());
    b.arg(&x).arg(&dy).arg(&mut dx).arg(p);
    run(
        g,
        b,
        blocks((p.rows as usize).div_ceil(8), 256),
        "l2norm_bwd",
    )
}

// SAFETY: #[repr(C)] of i32/f32 fields, the layout of the kernels' L2NormParams.
unsafe impl cudarc::driver::DeviceRepr for L2NormParams {}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn gradcheck_l2norm() {
        for scale in [1.0f32, 0.5] {
            let p = L2NormParams::new(5, 7, scale);
            let inputs = vec![uniform(1, 35, -1.0, 1.0)];
            let fwd = |xs: &[Vec<f64>]| {
                let mut y = vec![0.0; 35];
                forward_cpu(&xs[0], &mut y, &p);
                y
            };
            let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
                let mut dx = vec![0.0; 35];
                backward_cpu(&xs[0], dy, &mut dx, &p);
                vec![Some(dx)]
            };
            assert_ok(check("l2norm", &["x"], &inputs, &fwd, &bwd));
        }
    }

    #[test]
    fn rows_have_unit_norm_over_scale() {
        let p = L2NormParams::new(3, 4, 0.5);
        let x = uniform(2, 12, -3.0, 3.0);
        let mut y = vec![0.0; 12];
        forward_cpu(&x, &mut y, &p);
        for r in y.chunks(4) {
            assert!((norm(r) - 2.0).abs() < 1e-12);
        }
        let z = vec![0.0f64; 4];
        let mut yz = vec![1.0; 4];
        forward_cpu(&z, &mut yz, &L2NormParams::new(1, 4, 1.0));
        assert_eq!(yz, vec![0.0; 4]);
    }
}
