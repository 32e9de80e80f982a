//! Pooling, NHWC.
//! maxpool k x k, stride s, pad p (padding is -inf, as PyTorch):
//!   y[n, oh, ow, c] = max over the window; argmax = first maximum in (ky, kx) scan order.
//!   Saved for backward: the window-local argmax index (ky * k + kx) of every output, as a value.
//!   Backward in gather form: every input element sums dy over the outputs whose argmax it is, so no
//!   two threads write one element (ResNet's 3x3/2 windows overlap) and no atomics are needed.
//! global average pool: y[n, c] = mean over (h, w) of x[n, h, w, c]; dx += dy / (H*W).

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct PoolParams` in kernels/pool.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolParams {
    pub n: i32,
    pub h_in: i32,
    pub w_in: i32,
    pub c: i32,
    pub h_out: i32,
    pub w_out: i32,
    pub k: i32,
    pub stride: i32,
    pub pad: i32,
}

impl PoolParams {
    /// Max pooling with output floor((h + 2 pad - k) / stride) + 1, as PyTorch (ceil_mode off).
    pub fn max(
        n: usize,
        h: usize,
        w: usize,
        c: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> PoolParams {
        assert!(
            pad * 2 <= k && h + 2 * pad >= k && w + 2 * pad >= k,
            "maxpool: kernel {k} pad {pad} on {h}x{w}"
        );
        let i = |v: usize| v as i32;
        PoolParams {
            n: i(n),
            h_in: i(h),
            w_in: i(w),
            c: i(c),
            h_out: i((h + 2 * pad - k) / stride + 1),
            w_out: i((w + 2 * pad - k) / stride + 1),
            k: i(k),
            stride: i(stride),
            pad: i(pad),
        }
    }
    /// Global average pooling: the whole map to one value per channel.
    pub fn global_avg(n: usize, h: usize, w: usize, c: usize) -> PoolParams {
        let i = |v: usize| v as i32;
        PoolParams {
            n: i(n),
            h_in: i(h),
            w_in: i(w),
            c: i(c),
            h_out: 1,
            w_out: 1,
            k: 0,
            stride: 1,
            pad: 0,
        }
    }
    pub fn x_len(&self) -> usize {
        (self.n * self.h_in * self.w_in * self.c) as usize
    }
    pub fn y_len(&self) -> usize {
        (self.n * self.h_out * self.w_out * self.c) as usize
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// y, argmax (N, Ho, Wo, C) = maxpool(x (N, H, W, C)).
pub fn maxpool_forward_cpu<T: Real>(x: &[T], y: &mut [T], argmax: &mut [T], p: &PoolParams) {
    assert!(
        x.len() == p.x_len() && y.len() == p.y_len() && argmax.len() == p.y_len(),
        "maxpool_forward: x {} y {} argmax {} for {p:?}",
        x.len(),
        y.len(),
        argmax.len()
    );
    let (h, w, c) = (p.h_in as isize, p.w_in as isize, p.c as usize);
    let (ho, wo) = (p.h_out as usize, p.w_out as usize);
    let img_in = (h * w) as usize * c;
    y.par_chunks_mut(ho * wo * c)
        .zip(argmax.par_chunks_mut(ho * wo * c))
        .enumerate()
        .for_each(|(n, (y_n, a_n))| {
            let x_n = &x[n * img_in..][..img_in];
            for oh in 0..ho {
                for ow in 0..wo {
                    let out = (oh * wo + ow) * c;
                    let (best, arg) = (&mut y_n[out..][..c], &mut a_n[out..][..c]);
                    best.fill(T::neg_infinity());
                    arg.fill(T::zero());
                    // Taps in row-major order, the channels innermost (contiguous in NHWC): per
                    // channel the first maximum wins, and a NaN wins and stays, as before.
                    for ky in 0..p.k as isize {
                        let ih = oh as isize * p.stride as isize - p.pad as isize + ky;
                        if ih < 0 || ih >= h {
                            continue;
                        }
                        for kx in 0..p.k as isize {
                            let iw = ow as isize * p.stride as isize - p.pad as isize + kx;
                            if iw < 0 || iw >= w {
                                continue;
                            }
                            let tap = T::from_f64((ky * p.k as isize + kx) as f64);
                            let x_t = &x_n[(ih * w + iw) as usize * c..][..c];
                            for ((b, a), &v) in best.iter_mut().zip(arg.iter_mut()).zip(x_t) {
                                if v > *b || v.is_nan() {
                                    *b = v;
                                    *a = tap;
                                }
                            }
                        }
                    }
                }
            }
        });
}

/// dx (N, H, W, C) += gather of dy (N, Ho, Wo, C) through the saved argmax.
pub fn maxpool_backward_cpu<T: Real>(dy: &[T], argmax: &[T], dx: &mut [T], p: &PoolParams) {
    assert!(
        dx.len() == p.x_len() && dy.len() == p.y_len() && argmax.len() == p.y_len(),
        "maxpool_backward: dx {} dy {} argmax {} for {p:?}",
        dx.len(),
        dy.len(),
        argmax.len()
    );
    let (h, w, c) = (p.h_in as usize, p.w_in as usize, p.c as usize);
    let (ho, wo) = (p.h_out as isize, p.w_out as isize);
    let (k, s, pad) = (p.k as isize, p.stride as isize, p.pad as isize);
    let img_out = (ho * wo) as usize * c;
    dx.par_chunks_mut(h * w * c)
        .enumerate()
        .for_each(|(n, dx_n)| {
            let dy_n = &dy[n * img_out..][..img_out];
            let a_n = &argmax[n * img_out..][..img_out];
            for ih in 0..h as isize {
                // outputs whose window covers row ih: oh*s - pad <= ih <= oh*s - pad + k - 1
                let oh_lo = ((ih + pad - k + 1).max(0) + s - 1) / s;
                let oh_hi = ((ih + pad) / s).min(ho - 1);
                for iw in 0..w as isize {
                    let ow_lo = ((iw + pad - k + 1).max(0) + s - 1) / s;
                    let ow_hi = ((iw + pad) / s).min(wo - 1);
                    for ch in 0..c {
                        let mut acc = T::zero();
                        for oh in oh_lo..=oh_hi {
                            let ky = ih - (oh * s - pad);
                            for ow in ow_lo..=ow_hi {
                                let kx = iw - (ow * s - pad);
                                let o = (oh * wo + ow) as usize * c + ch;
                                if a_n[o].as_f64() as isize == ky * k + kx {
                                    acc = acc + dy_n[o];
                                }
                            }
                        }
                        let d = &mut dx_n[(ih as usize * w + iw as usize) * c + ch];
                        *d = *d + acc;
                    }
                }
            }
        });
}

/// y (N, C) = mean over (H, W) of x (N, H, W, C).
pub fn avgpool_forward_cpu<T: Real>(x: &[T], y: &mut [T], p: &PoolParams) {
    let (hw, c) = ((p.h_in * p.w_in) as usize, p.c as usize);
    assert!(
        x.len() == p.x_len() && y.len() == p.n as usize * c,
        "avgpool_forward: x {} y {} for {p:?}",
        x.len(),
        y.len()
    );
    y.par_chunks_mut(c).enumerate().for_each(|(n, y_n)| {
        let mut acc = vec![0.0f64; c];
        for r in x[n * hw * c..][..hw * c].chunks(c) {
            for (a, v) in acc.iter_mut().zip(r) {
                *a += v.as_f64();
            }
        }
        for (o, a) in y_n.iter_mut().zip(&acc) {
            *o = T::from_f64(a / hw as f64);
        }
    });
}

/// dx (N, H, W, C) += dy (N, C) / (H*W).
pub fn avgpool_backward_cpu<T: Real>(dy: &[T], dx: &mut [T], p: &PoolParams) {
    let (hw, c) = ((p.h_in * p.w_in) as usize, p.c as usize);
    assert!(
        dx.len() == p.x_len() && dy.len() == p.n as usize * c,
        "avgpool_backward: dx {} dy {} for {p:?}",
        dx.len(),
        dy.len()
    );
    let inv = T::from_f64(1.0 / hw as f64);
    dx.par_chunks_mut(hw * c).enumerate().for_each(|(n, dx_n)| {
        let dy_n = &dy[n * c..][..c];
        for r in dx_n.chunks_mut(c) {
            for (d, g) in r.iter_mut().zip(dy_n) {
                *d = *d + *g * inv;
            }
        }
    });
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers (kernels/pool.cu). The GPU saves the window-local argmax as one byte.

use crate::gpu::{grid_1d, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

pub fn maxpool_forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &PoolParams,
    x: &impl Dev<T>,
    y: &mut impl DevMut<T>,
    argmax: &mut impl DevMut<u8>,
) -> crate::Result<()> {
    assert!(
        p.k * p.k <= 256,
        "maxpool: window too large for a byte index"
    );
    let (nx, ny) = (p.x_len(), p.y_len());
    need(
        "pool::maxpool_forward_cuda",
        &[
            ("x", x.len(), nx),
            ("y", y.len(), ny),
            ("argmax", argmax.len(), ny),
        ],
    )?;
    let (x, mut y, mut argmax) = (x.view(), y.view_mut(), argmax.view_mut());
    let mut b = g.stream.launch_builder(g.k.maxpool_fwd.get::<T>());
    b.arg(&x).arg(&mut y).arg(&mut argmax).arg(p);
    run(g, b, grid_1d(ny), "maxpool_fwd")
}

pub fn maxpool_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &PoolParams,
    dy: &impl Dev<T>,
    argmax: &impl Dev<u8>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (nx, ny) = (p.x_len(), p.y_len());
    need(
        "pool::maxpool_backward_cuda",
        &[
            ("dy", dy.len(), ny),
            ("argmax", argmax.len(), ny),
            ("dx", dx.len(), nx),
        ],
    )?;
    let (dy, argmax, mut dx) = (dy.view(), argmax.view(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.maxpool_bwd.get::<T>());
    b.arg(&dy).arg(&argmax).arg(&mut dx).arg(p);
    run(g, b, grid_1d(nx), "maxpool_bwd")
}

pub fn avgpool_forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &PoolParams,
    x: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (nx, ny) = (p.x_len(), p.y_len());
    need(
        "pool::avgpool_forward_cuda",
        &[("x", x.len(), nx), ("y", y.len(), ny)],
    )?;
    let (x, mut y) = (x.view(), y.view_mut());
    let mut b = g.stream.launch_builder(g.k.avgpool_fwd.get::<T>());
    b.arg(&x).arg(&mut y).arg(p);
    run(g, b, grid_1d(p.n as usize * p.c as usize), "avgpool_fwd")
}

pub fn avgpool_backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &PoolParams,
    dy: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (nx, ny) = (p.x_len(), p.y_len());
    need(
        "pool::avgpool_backward_cuda",
        &[("dy", dy.len(), ny), ("dx", dx.len(), nx)],
    )?;
    let (dy, mut dx) = (dy.view(), dx.view_mut());
    let mut b = g.stream.launch_builder(g.k.avgpool_bwd.get::<T>());
    b.arg(&dy).arg(&mut dx).arg(p);
    run(g, b, grid_1d(nx), "avgpool_bwd")
}

// SAFETY: #[repr(C)] of i32 fields, the layout of the kernels' PoolParams.
unsafe impl cudarc::driver::DeviceRepr for PoolParams {}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut, View, ViewMut};

/// The pools' kernels on a backend (the graph's maxpool and avgpool nodes).
pub trait PoolKernels: Backend {
    fn maxpool_forward(
        &self,
        p: &PoolParams,
        x: &Ve<Self>,
        y: &mut VeMut<Self>,
        argmax: &mut ViewMut<Self, Self::I>,
    ) -> crate::Result<()>;
    fn maxpool_backward(
        &self,
        p: &PoolParams,
        dy: &Ve<Self>,
        argmax: &View<Self, Self::I>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn avgpool_forward(
        &self,
        p: &PoolParams,
        x: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn avgpool_backward(
        &self,
        p: &PoolParams,
        dy: &Ve<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> PoolKernels for Cpu<T> {
    fn maxpool_forward(
        &self,
        p: &PoolParams,
        x: &&[T],
        y: &mut &mut [T],
        argmax: &mut &mut [T],
    ) -> crate::Result<()> {
        maxpool_forward_cpu(x, y, argmax, p);
        Ok(())
    }
    fn maxpool_backward(
        &self,
        p: &PoolParams,
        dy: &&[T],
        argmax: &&[T],
        dx: &mut &mut [T],
    ) -> crate::Result<()> {
        maxpool_backward_cpu(dy, argmax, dx, p);
        Ok(())
    }
    fn avgpool_forward(&self, p: &PoolParams, x: &&[T], y: &mut &mut [T]) -> crate::Result<()> {
        avgpool_forward_cpu(x, y, p);
        Ok(())
    }
    fn avgpool_backward(&self, p: &PoolParams, dy: &&[T], dx: &mut &mut [T]) -> crate::Result<()> {
        avgpool_backward_cpu(dy, dx, p);
        Ok(())
    }
}

impl<E: GpuFloat> PoolKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn maxpool_forward(
        &self,
        p: &PoolParams,
        x: &Ve<Self>,
        y: &mut VeMut<Self>,
        argmax: &mut ViewMut<Self, u8>,
    ) -> crate::Result<()> {
        maxpool_forward_cuda(&self.gpu, p, x, y, argmax)
    }
    fn maxpool_backward(
        &self,
        p: &PoolParams,
        dy: &Ve<Self>,
        argmax: &View<Self, u8>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        maxpool_backward_cuda(&self.gpu, p, dy, argmax, dx)
    }
    fn avgpool_forward(
        &self,
        p: &PoolParams,
        x: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        avgpool_forward_cuda(&self.gpu, p, x, y)
    }
    fn avgpool_backward(
        &self,
        p: &PoolParams,
        dy: &Ve<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        avgpool_backward_cuda(&self.gpu, p, dy, dx)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, distinct, uniform};

    fn gradcheck_max(p: PoolParams, seed: u64) {
        let inputs = vec![distinct(seed, p.x_len(), 0.01)];
        let fwd = |xs: &[Vec<f64>]| {
            let (mut y, mut a) = (vec![0.0; p.y_len()], vec![0.0; p.y_len()]);
            maxpool_forward_cpu(&xs[0], &mut y, &mut a, &p);
            y
        };
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let (mut y, mut a) = (vec![0.0; p.y_len()], vec![0.0; p.y_len()]);
            maxpool_forward_cpu(&xs[0], &mut y, &mut a, &p);
            let mut dx = vec![0.0; p.x_len()];
            maxpool_backward_cpu(dy, &a, &mut dx, &p);
            vec![Some(dx)]
        };
        assert_ok(check("maxpool", &["x"], &inputs, &fwd, &bwd));
    }

    #[test]
    fn gradcheck_maxpool() {
        gradcheck_max(PoolParams::max(2, 7, 6, 3, 3, 2, 1), 1); // ResNet's 3x3/2 pad 1, odd sizes
        gradcheck_max(PoolParams::max(1, 8, 8, 2, 3, 2, 1), 2);
        gradcheck_max(PoolParams::max(1, 5, 5, 2, 2, 1, 0), 3);
    }

    #[test]
    fn maxpool_shape_and_values() {
        // 1 channel 4x4, 3x3/2 pad 1 -> 2x2; each output is the max of its clipped window.
        let x: Vec<f64> = (0..16).map(|v| v as f64).collect();
        let p = PoolParams::max(1, 4, 4, 1, 3, 2, 1);
        assert_eq!((p.h_out, p.w_out), (2, 2));
        let (mut y, mut a) = (vec![0.0; 4], vec![0.0; 4]);
        maxpool_forward_cpu(&x, &mut y, &mut a, &p);
        assert_eq!(y, vec![5.0, 7.0, 13.0, 15.0]);
    }

    #[test]
    fn gradcheck_avgpool() {
        let p = PoolParams::global_avg(2, 3, 5, 4);
        let inputs = vec![uniform(4, p.x_len(), -1.0, 1.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut y = vec![0.0; 8];
            avgpool_forward_cpu(&xs[0], &mut y, &p);
            y
        };
        let bwd = |_: &[Vec<f64>], dy: &[f64]| {
            let mut dx = vec![0.0; p.x_len()];
            avgpool_backward_cpu(dy, &mut dx, &p);
            vec![Some(dx)]
        };
        assert_ok(check("avgpool", &["x"], &inputs, &fwd, &bwd));
    }
}
