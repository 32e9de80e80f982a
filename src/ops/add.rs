//! Residual add, elementwise: y = a + b. Saved for backward: nothing.
//! Backward: da += dy, db += dy.
//! Scale, elementwise: y = alpha * x (loss weights). Backward: dx += alpha * dy.

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// CPU reference

const CHUNK: usize = 1 << 14;

/// y = a + b; all three have the same length.
pub fn forward_cpu<T: Real>(a: &[T], b: &[T], y: &mut [T]) {
    assert!(
        a.len() == b.len() && b.len() == y.len(),
        "add_forward: a {} b {} y {}",
        a.len(),
        b.len(),
        y.len()
    );
    y.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(y, (a, b))| {
            for ((o, &u), &v) in y.iter_mut().zip(a).zip(b) {
                *o = u + v;
            }
        });
}

/// dx += dy (called once for each addend).
pub fn backward_cpu<T: Real>(dy: &[T], dx: &mut [T]) {
    assert_eq!(
        dy.len(),
        dx.len(),
        "add_backward: dy {} vs dx {}",
        dy.len(),
        dx.len()
    );
    dx.par_chunks_mut(CHUNK)
        .zip(dy.par_chunks(CHUNK))
        .for_each(|(dx, dy)| {
            for (d, &g) in dx.iter_mut().zip(dy) {
                *d = *d + g;
            }
        });
}

/// y = alpha * x.
pub fn scale_forward_cpu<T: Real>(x: &[T], alpha: T, y: &mut [T]) {
    assert_eq!(
        x.len(),
        y.len(),
        "scale_forward: x {} vs y {}",
        x.len(),
        y.len()
    );
    for (o, &v) in y.iter_mut().zip(x) {
        *o = alpha * v;
    }
}

/// dx += alpha * dy.
pub fn scale_backward_cpu<T: Real>(dy: &[T], alpha: T, dx: &mut [T]) {
    assert_eq!(
        dy.len(),
        dx.len(),
        "scale_backward: dy {} vs dx {}",
        dy.len(),
        dx.len()
    );
    for (d, &g) in dx.iter_mut().zip(dy) {
        *d = *d + alpha * g;
    }
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers (kernels/add.cu). Elementwise over the first input's length; the other
// buffers may be longer (windows of larger ones). The first input sets the count: pass it as a window
// of exactly the elements to process (lewel check's buffers carry a sentinel tail past them).

use crate::gpu::{grid_1d, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    a: &impl Dev<T>,
    bb: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = a.len();
    need(
        "add::forward_cuda",
        &[("b", bb.len(), n), ("y", y.len(), n)],
    )?;
    let (a, bb, mut y, n) = (a.view(), bb.view(), y.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.add_fwd.get::<T>());
    b.arg(&a).arg(&bb).arg(&mut y).arg(&n);
    run(g, b, grid_1d(n as usize), "add_fwd")
}

/// dx += dy (the add's backward, once per input).
pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    dy: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    scale_backward_cuda(g, dy, 1.0, dx)
}

pub fn scale_forward_cuda<T: GpuFloat>(
    g: &Gpu,
    x: &impl Dev<T>,
    alpha: f32,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = x.len();
    need("add::scale_forward_cuda", &[("y", y.len(), n)])?;
    let (x, mut y, n) = (x.view(), y.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.scale_fwd.get::<T>());
    b.arg(&x).arg(&alpha).arg(&mut y).arg(&n);
    run(g, b, grid_1d(n as usize), "scale_fwd")
}

/// dx += alpha * dy.
pub fn scale_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    dy: &impl Dev<T>,
    alpha: f32,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let n = dy.len();
    need("add::scale_backward_cuda", &[("dx", dx.len(), n)])?;
    let (dy, mut dx, n) = (dy.view(), dx.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.axpy.get::<T>());
    b.arg(&dy).arg(&alpha).arg(&mut dx).arg(&n);
    run(g, b, grid_1d(n as usize), "axpy")
}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut, Vf, VfMut};

/// Elementwise sums and scaling on a backend, of activations (`_e`) and of losses (`_f`).
pub trait AddKernels: Backend {
    fn add_e(&self, a: &Ve<Self>, b: &Ve<Self>, y: &mut VeMut<Self>) -> crate::Result<()>;
    fn add_f(&self, a: &Vf<Self>, b: &Vf<Self>, y: &mut VfMut<Self>) -> crate::Result<()>;
    fn scale_e(&self, x: &Ve<Self>, alpha: f64, y: &mut VeMut<Self>) -> crate::Result<()>;
    fn scale_f(&self, x: &Vf<Self>, alpha: f64, y: &mut VfMut<Self>) -> crate::Result<()>;
    /// dx += alpha * dy.
    fn axpy_e(&self, dy: &Ve<Self>, alpha: f64, dx: &mut VeMut<Self>) -> crate::Result<()>;
    fn axpy_f(&self, dy: &Vf<Self>, alpha: f64, dx: &mut VfMut<Self>) -> crate::Result<()>;
}

/// dx += alpha * dy on the CPU: the add's backward where alpha is 1.
fn axpy_cpu<T: Real>(dy: &[T], alpha: f64, dx: &mut [T]) {
    if alpha == 1.0 {
        backward_cpu(dy, dx)
    } else {
        scale_backward_cpu(dy, T::from_f64(alpha), dx)
    }
}

impl<T: Real + Elem> AddKernels for Cpu<T> {
    fn add_e(&self, a: &&[T], b: &&[T], y: &mut &mut [T]) -> crate::Result<()> {
        forward_cpu(a, b, y);
        Ok(())
    }
    fn add_f(&self, a: &&[T], b: &&[T], y: &mut &mut [T]) -> crate::Result<()> {
        forward_cpu(a, b, y);
        Ok(())
    }
    fn scale_e(&self, x: &&[T], alpha: f64, y: &mut &mut [T]) -> crate::Result<()> {
        scale_forward_cpu(x, T::from_f64(alpha), y);
        Ok(())
    }
    fn scale_f(&self, x: &&[T], alpha: f64, y: &mut &mut [T]) -> crate::Result<()> {
        scale_forward_cpu(x, T::from_f64(alpha), y);
        Ok(())
    }
    fn axpy_e(&self, dy: &&[T], alpha: f64, dx: &mut &mut [T]) -> crate::Result<()> {
        axpy_cpu(dy, alpha, dx);
        Ok(())
    }
    fn axpy_f(&self, dy: &&[T], alpha: f64, dx: &mut &mut [T]) -> crate::Result<()> {
        axpy_cpu(dy, alpha, dx);
        Ok(())
    }
}

impl<E: GpuFloat> AddKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn add_e(&self, a: &Ve<Self>, b: &Ve<Self>, y: &mut VeMut<Self>) -> crate::Result<()> {
        forward_cuda(&self.gpu, a, b, y)
    }
    fn add_f(&self, a: &Vf<Self>, b: &Vf<Self>, y: &mut VfMut<Self>) -> crate::Result<()> {
        forward_cuda(&self.gpu, a, b, y)
    }
    fn scale_e(&self, x: &Ve<Self>, alpha: f64, y: &mut VeMut<Self>) -> crate::Result<()> {
        scale_forward_cuda(&self.gpu, x, alpha as f32, y)
    }
    fn scale_f(&self, x: &Vf<Self>, alpha: f64, y: &mut VfMut<Self>) -> crate::Result<()> {
        scale_forward_cuda(&self.gpu, x, alpha as f32, y)
    }
    fn axpy_e(&self, dy: &Ve<Self>, alpha: f64, dx: &mut VeMut<Self>) -> crate::Result<()> {
        scale_backward_cuda(&self.gpu, dy, alpha as f32, dx)
    }
    fn axpy_f(&self, dy: &Vf<Self>, alpha: f64, dx: &mut VfMut<Self>) -> crate::Result<()> {
        scale_backward_cuda(&self.gpu, dy, alpha as f32, dx)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn gradcheck_add() {
        let inputs = vec![uniform(1, 23, -1.0, 1.0), uniform(2, 23, -1.0, 1.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; 23];
            forward_cpu(&xs[0], &xs[1], &mut y);
            y
        };
        let bwd = |_: &[Vec<f64>], dy: &[f64]| {
            let (mut da, mut db) = (vec![0.0; 23], vec![0.0; 23]);
            backward_cpu(dy, &mut da);
            backward_cpu(dy, &mut db);
            vec![Some(da), Some(db)]
        };
        assert_ok(check("add", &["a", "b"], &inputs, &fwd, &bwd));
    }

    #[test]
    fn gradcheck_scale() {
        let inputs = vec![uniform(3, 9, -1.0, 1.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; 9];
            scale_forward_cpu(&xs[0], 0.3, &mut y);
            y
        };
        let bwd = |_: &[Vec<f64>], dy: &[f64]| {
            let mut dx = vec![0.0; 9];
            scale_backward_cpu(dy, 0.3, &mut dx);
            vec![Some(dx)]
        };
        assert_ok(check("scale", &["x"], &inputs, &fwd, &bwd));
    }
}
