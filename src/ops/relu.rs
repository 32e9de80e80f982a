//! ReLU, elementwise: y = max(x, 0). Saved for backward: the output y.
//! Backward: dx += dy * [y > 0] (PyTorch's rule: zero gradient at x = 0).

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// CPU reference

const CHUNK: usize = 1 << 14;

/// y = max(x, 0); x and y have the same length.
pub fn forward_cpu<T: Real>(x: &[T], y: &mut [T]) {
    assert_eq!(
        x.len(),
        y.len(),
        "relu_forward: x {} vs y {}",
        x.len(),
        y.len()
    );
    y.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(y, x)| {
            for (o, &v) in y.iter_mut().zip(x) {
                *o = if v > T::zero() { v } else { T::zero() };
            }
        });
}

/// dx += dy where y > 0.
pub fn backward_cpu<T: Real>(y: &[T], dy: &[T], dx: &mut [T]) {
    assert!(
        y.len() == dy.len() && dy.len() == dx.len(),
        "relu_backward: y {} dy {} dx {}",
        y.len(),
        dy.len(),
        dx.len()
    );
    dx.par_chunks_mut(CHUNK)
        .zip(y.par_chunks(CHUNK).zip(dy.par_chunks(CHUNK)))
        .for_each(|(dx, (y, dy))| {
            for ((d, &v), &g) in dx.iter_mut().zip(y).zip(dy) {
                if v > T::zero() {
                    *d = *d + g;
                }
            }
        });
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers (kernels/relu.cu). Elementwise over the first input's length; the other
// buffers may be longer (windows of larger ones). The first input sets the count: pass it as a window
// of exactly the elements to process (lewel check's buffers carry a sentinel tail past them).

use crate::gpu::{grid_1d, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    x: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = x.len();
    need("relu::forward_cuda", &[("y", y.len(), n)])?;
    let (x, mut y, n) = (x.view(), y.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.relu_fwd.get::<T>());
    b.arg(&x).arg(&mut y).arg(&n);
    run(g, b, grid_1d(n as usize), "relu_fwd")
}

pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    y: &impl Dev<T>,
    dy: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = y.len();
    need(
        "relu::backward_cuda",
        &[("dy", dy.len(), n), ("dx", dx.len(), n)],
    )?;
    let (y, dy, mut dx, n) = (y.view(), dy.view(), dx.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.relu_bwd.get::<T>());
    b.arg(&y).arg(&dy).arg(&mut dx).arg(&n);
    run(g, b, grid_1d(n as usize), "relu_bwd")
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, away_from_zero, check};

    #[test]
    fn gradcheck_relu() {
        let inputs = vec![away_from_zero(1, 37, 0.05, 2.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; xs[0].len()];
            forward_cpu(&xs[0], &mut y);
            y
        };
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let mut y = vec![0.0; xs[0].len()];
            forward_cpu(&xs[0], &mut y);
            let mut dx = vec![0.0; y.len()];
            backward_cpu(&y, dy, &mut dx);
            vec![Some(dx)]
        };
        assert_ok(check("relu", &["x"], &inputs, &fwd, &bwd));
    }
}
