//! Normalized MSE between prediction rows P and target rows T (N, D) (LEWEL_SPEC 3.2, step 3):
//!   loss = 2 - (2 / N) * sum_i <P_i / max(||P_i||, eps), T_i / max(||T_i||, eps)>,  eps = 1e-12
//! The target is detached: only P gets a gradient. With p = P_i / n_i (n_i = ||P_i|| > eps), t the
//! normalized target row and upstream scalar g:
//!   dP_i += g * (-2 / N) * (t - p (p . t)) / n_i      (t / eps when the clamp is active)
//! Saved for backward: P and T.

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct LossParams` in kernels/loss.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LossParams {
    pub n: i32,
    pub d: i32,
    pub eps: f32,
}

impl LossParams {
    pub fn new(n: usize, d: usize) -> LossParams {
        LossParams {
            n: n as i32,
            d: d as i32,
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

/// The loss of pred (N, D) against target (N, D); cosines summed in f64, rows in order.
pub fn forward_cpu<T: Real>(pred: &[T], target: &[T], p: &LossParams) -> T {
    let (n, d) = (p.n as usize, p.d as usize);
    assert!(
        pred.len() == n * d && target.len() == n * d,
        "loss_forward: pred {} target {} for {p:?}",
        pred.len(),
        target.len()
    );
    let eps = p.eps as f64;
    let cos: Vec<f64> = pred
        .par_chunks(d)
        .zip(target.par_chunks(d))
        .map(|(a, b)| {
            let dot: f64 = a.iter().zip(b).map(|(u, v)| u.as_f64() * v.as_f64()).sum();
            dot / (norm(a).max(eps) * norm(b).max(eps))
        })
        .collect();
    T::from_f64(2.0 - 2.0 * cos.iter().sum::<f64>() / n as f64)
}

/// dpred (N, D) += dloss * d loss / d pred.
pub fn backward_cpu<T: Real>(pred: &[T], target: &[T], dloss: T, dpred: &mut [T], p: &LossParams) {
    let (n, d) = (p.n as usize, p.d as usize);
    assert!(
        pred.len() == n * d && target.len() == n * d && dpred.len() == n * d,
        "loss_backward: pred {} target {} dpred {} for {p:?}",
        pred.len(),
        target.len(),
        dpred.len()
    );
    let eps = p.eps as f64;
    let k = -2.0 * dloss.as_f64() / n as f64;
    dpred.par_chunks_mut(d).enumerate().for_each(|(i, dp)| {
        let (a, b) = (&pred[i * d..][..d], &target[i * d..][..d]);
        let (na, nb) = (norm(a), norm(b).max(eps));
        if na > eps {
            let dot: f64 = a
                .iter()
                .zip(b)
                .map(|(u, v)| u.as_f64() * v.as_f64())
                .sum::<f64>()
                / (na * nb);
            for ((o, u), v) in dp.iter_mut().zip(a).zip(b) {
                let (pu, tv) = (u.as_f64() / na, v.as_f64() / nb);
                *o = *o + T::from_f64(k * (tv - pu * dot) / na);
            }
        } else {
            for (o, v) in dp.iter_mut().zip(b) {
                *o = *o + T::from_f64(k * v.as_f64() / nb / eps);
            }
        }
    });
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers (kernels/loss.cu)

use crate::gpu::{blocks, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

/// out[0] = the loss; `cosv` (N f32) is scratch.
pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &LossParams,
    (pred, target): (&impl Dev<T>, &impl Dev<T>),
    cosv: &mut impl DevMut<f32>,
    out: &mut impl DevMut<f32>,
) -> crate::Result<()> {
    let (rows, n) = (p.n as usize, p.n as usize * p.d as usize);
    need(
        "loss::forward_cuda",
        &[
            ("pred", pred.len(), n),
            ("target", target.len(), n),
            ("cosv", cosv.len(), rows),
            ("out", out.len(), 1),
        ],
    )?;
    let (pred, target) = (pred.view(), target.view());
    let (mut cosv, mut out) = (cosv.view_mut(), out.view_mut());
    let mut b = g.stream.launch_builder(g.k.loss_rows.get::<T>());
    b.arg(&pred).arg(&target).arg(p).arg(&mut cosv);
    run(g, b, blocks(rows.min(65_535), 128), "loss_rows")?;
    let cosv = cosv.as_view();
    let mut b = g.stream.launch_builder(&g.k.loss_reduce);
    b.arg(&cosv).arg(p).arg(&mut out);
    run(g, b, blocks(1, 1024), "loss_reduce")
}

/// dpred += d loss / d pred * dloss[0].
pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &LossParams,
    (pred, target): (&impl Dev<T>, &impl Dev<T>),
    dloss: &impl Dev<f32>,
    dpred: &mut impl DevMut<T>,
) -> crate::Result<()> {
    let (rows, n) = (p.n as usize, p.n as usize * p.d as usize);
    need(
        "loss::backward_cuda",
        &[
            ("pred", pred.len(), n),
            ("target", target.len(), n),
            ("dloss", dloss.len(), 1),
            ("dpred", dpred.len(), n),
        ],
    )?;
    let (pred, target, dloss) = (pred.view(), target.view(), dloss.view());
    let mut dpred = dpred.view_mut();
    let mut b = g.stream.launch_builder(g.k.loss_bwd.get::<T>());
    b.arg(&pred).arg(&target).arg(&dloss).arg(p).arg(&mut dpred);
    run(g, b, blocks(rows.min(65_535), 128), "loss_bwd")
}

// SAFETY: #[repr(C)] of i32/f32 fields, the layout of the kernels' LossParams.
unsafe impl cudarc::driver::DeviceRepr for LossParams {}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut, Vf, VfMut};

/// The loss's kernels on a backend (the graph's loss node).
pub trait LossKernels: Backend {
    /// out[0] = the loss; `cosv` is per-row scratch (B f32 values) where the backend wants one.
    fn loss_forward(
        &self,
        p: &LossParams,
        pt: (&Ve<Self>, &Ve<Self>),
        cosv: &mut VfMut<Self>,
        out: &mut VfMut<Self>,
    ) -> crate::Result<()>;
    /// dpred += d loss / d pred * dloss[0].
    fn loss_backward(
        &self,
        p: &LossParams,
        pt: (&Ve<Self>, &Ve<Self>),
        dloss: &Vf<Self>,
        dpred: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> LossKernels for Cpu<T> {
    fn loss_forward(
        &self,
        p: &LossParams,
        (pred, target): (&&[T], &&[T]),
        _cosv: &mut &mut [T],
        out: &mut &mut [T],
    ) -> crate::Result<()> {
        out[0] = forward_cpu(pred, target, p);
        Ok(())
    }
    fn loss_backward(
        &self,
        p: &LossParams,
        (pred, target): (&&[T], &&[T]),
        dloss: &&[T],
        dpred: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_cpu(pred, target, dloss[0], dpred, p);
        Ok(())
    }
}

impl<E: GpuFloat> LossKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn loss_forward(
        &self,
        p: &LossParams,
        pt: (&Ve<Self>, &Ve<Self>),
        cosv: &mut VfMut<Self>,
        out: &mut VfMut<Self>,
    ) -> crate::Result<()> {
        forward_cuda(&self.gpu, p, pt, cosv, out)
    }
    fn loss_backward(
        &self,
        p: &LossParams,
        pt: (&Ve<Self>, &Ve<Self>),
        dloss: &Vf<Self>,
        dpred: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        backward_cuda(&self.gpu, p, pt, dloss, dpred)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    #[test]
    fn gradcheck_loss() {
        let p = LossParams::new(5, 7);
        let target = uniform(9, 35, -1.0, 1.0);
        let inputs = vec![uniform(1, 35, -1.0, 1.0)];
        let fwd = |xs: &[Vec<f64>]| vec![forward_cpu(&xs[0], &target, &p)];
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let mut dp = vec![0.0; 35];
            backward_cpu(&xs[0], &target, dy[0], &mut dp, &p);
            vec![Some(dp)]
        };
        assert_ok(check("loss", &["pred"], &inputs, &fwd, &bwd));
    }

    #[test]
    fn range_and_extremes() {
        let p = LossParams::new(2, 3);
        let a = [1.0, 2.0, 3.0, -1.0, 0.5, 2.0];
        assert!(forward_cpu::<f64>(&a, &a, &p).abs() < 1e-12);
        let neg: Vec<f64> = a.iter().map(|v| -2.0 * v).collect();
        assert!((forward_cpu(&a, &neg, &p) - 4.0).abs() < 1e-12);
    }
}
