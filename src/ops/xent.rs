//! Softmax cross-entropy of K linear classifier heads side by side, each with its bias (the linear
//! probe trains one head per learning rate on the same features; fine-tuning has one):
//!   z[r, k, j] = logits[r, k*O + j] + bias[k*O + j]     logits (R, K*O), bias (K*O), labels (R)
//!   ce[r, k] = logsumexp_j z[r, k, j] - z[r, k, label_r]
//!   per_head[k] = mean_r ce[r, k];  loss = sum_k per_head[k]  (PyTorch's CrossEntropyLoss per head)
//!   dlogits[r, k*O + j] += dloss * (softmax_j z[r, k] - [j == label_r]) / R
//!   dbias[k*O + j] += the same summed over r
//! The heads do not interact: head k's gradients are those of its own mean cross-entropy. Labels are
//! carried as floats (exact below 2^24); a label outside [0, O) gives a NaN loss. Saved for
//! backward: logsumexp per (row, head).

use super::Real;
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored by `struct XentParams` in kernels/xent.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct XentParams {
    pub rows: i32,
    /// Classes per head.
    pub classes: i32,
    pub heads: i32,
}

impl XentParams {
    pub fn new(rows: usize, classes: usize, heads: usize) -> XentParams {
        assert!(
            rows > 0 && classes > 0 && heads > 0,
            "xent: {rows} rows, {classes} classes, {heads} heads"
        );
        XentParams {
            rows: rows as i32,
            classes: classes as i32,
            heads: heads as i32,
        }
    }
    fn dims(&self) -> (usize, usize, usize) {
        (
            self.rows as usize,
            self.classes as usize,
            self.heads as usize,
        )
    }
    /// Logits per row: every head's classes.
    pub fn cols(&self) -> usize {
        (self.classes * self.heads) as usize
    }
    fn check(&self, op: &str, logits: usize, bias: usize, labels: usize) {
        let (r, _, _) = self.dims();
        assert!(
            logits == r * self.cols() && bias == self.cols() && labels == r,
            "{op}: lengths logits {logits} bias {bias} labels {labels} for {self:?}"
        );
    }
}

/// The class a label value names, when it is one.
fn class_of<T: Real>(label: T, classes: usize) -> Option<usize> {
    let v = label.as_f64();
    (v >= 0.0 && v < classes as f64 && v.fract() == 0.0).then_some(v as usize)
}

// ----------------------------------------------------------------------------
// CPU reference

/// logsumexp of (row r, head k)'s z, in f64.
fn lse_of<T: Real>(logits: &[T], bias: &[T], p: &XentParams, r: usize, k: usize) -> f64 {
    let (_, o, _) = p.dims();
    let z = |j: usize| logits[r * p.cols() + k * o + j].as_f64() + bias[k * o + j].as_f64();
    let m = (0..o).map(z).fold(f64::NEG_INFINITY, f64::max);
    m + (0..o).map(|j| (z(j) - m).exp()).sum::<f64>().ln()
}

/// (the loss, the mean cross-entropy of each head); `lse` (R, K) receives the logsumexps.
pub fn forward_cpu<T: Real>(
    logits: &[T],
    bias: &[T],
    labels: &[T],
    lse: &mut [T],
    p: &XentParams,
) -> (T, Vec<T>) {
    p.check("xent_forward", logits.len(), bias.len(), labels.len());
    let (r, o, k) = p.dims();
    assert_eq!(lse.len(), r * k, "xent_forward: lse length");
    let lse_ce: Vec<(f64, f64)> = (0..r * k)
        .into_par_iter()
        .map(|b| {
            let (row, head) = (b / k, b % k);
            let l = lse_of(logits, bias, p, row, head);
            let ce = match class_of(labels[row], o) {
                Some(y) => {
                    l - logits[row * p.cols() + head * o + y].as_f64() - bias[head * o + y].as_f64()
                }
                None => f64::NAN,
            };
            (l, ce)
        })
        .collect();
    for (d, (l, _)) in lse.iter_mut().zip(&lse_ce) {
        *d = T::from_f64(*l);
    }
    let ce: Vec<f64> = lse_ce.iter().map(|(_, c)| *c).collect();
    let per_head: Vec<f64> = (0..k)
        .map(|h| (0..r).map(|row| ce[row * k + h]).sum::<f64>() / r as f64)
        .collect();
    (
        T::from_f64(per_head.iter().sum()),
        per_head.into_iter().map(T::from_f64).collect(),
    )
}

/// dlogits (R, K*O) and dbias (K*O) += dloss * d loss / d (logits, bias).
#[allow(clippy::too_many_arguments)]
pub fn backward_cpu<T: Real>(
    logits: &[T],
    bias: &[T],
    labels: &[T],
    lse: &[T],
    dloss: T,
    dlogits: &mut [T],
    dbias: &mut [T],
    p: &XentParams,
) {
    p.check("xent_backward", logits.len(), bias.len(), labels.len());
    let (r, o, k) = p.dims();
    let cols = p.cols();
    assert!(
        dlogits.len() == r * cols && dbias.len() == cols && lse.len() == r * k,
        "xent_backward: gradient lengths"
    );
    let f = dloss.as_f64() / r as f64;
    let g = |row: usize, col: usize| -> f64 {
        let (head, j) = (col / o, col % o);
        let z = logits[row * cols + col].as_f64() + bias[col].as_f64();
        let q = (z - lse[row * k + head].as_f64()).exp();
        q - if class_of(labels[row], o) == Some(j) {
            1.0
        } else {
            0.0
        }
    };
    dlogits
        .par_chunks_mut(cols)
        .enumerate()
        .for_each(|(row, d)| {
            for (col, v) in d.iter_mut().enumerate() {
                *v = *v + T::from_f64(f * g(row, col));
            }
        });
    dbias.par_iter_mut().enumerate().for_each(|(col, v)| {
        let s: f64 = (0..r).map(|row| g(row, col)).sum();
        *v = *v + T::from_f64(f * s);
    });
}

// ----------------------------------------------------------------------------
// CUDA launchers (kernels/xent.cu)

use crate::gpu::{blocks, grid_1d, need, run, Dev, DevMut, Gpu, GpuFloat};
use cudarc::driver::PushKernelArg;

/// out[0] = the loss, per_head (K) the heads' mean cross-entropies; lse, ce (R*K) are written
/// (lse is kept for backward, ce is scratch).
#[allow(clippy::too_many_arguments)]
pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &XentParams,
    (logits, bias, labels): (&impl Dev<T>, &impl Dev<f32>, &impl Dev<f32>),
    (lse, ce): (&mut impl DevMut<f32>, &mut impl DevMut<f32>),
    per_head: &mut impl DevMut<f32>,
    out: &mut impl DevMut<f32>,
) -> crate::Result<()> {
    let (r, _, k) = p.dims();
    need(
        "xent::forward_cuda",
        &[
            ("logits", logits.len(), r * p.cols()),
            ("bias", bias.len(), p.cols()),
            ("labels", labels.len(), r),
            ("lse", lse.len(), r * k),
            ("ce", ce.len(), r * k),
            ("per_head", per_head.len(), k),
            ("out", out.len(), 1),
        ],
    )?;
    let (logits, bias, labels) = (logits.view(), bias.view(), labels.view());
    let (mut lse, mut ce) = (lse.view_mut(), ce.view_mut());
    let mut b = g.stream.launch_builder(g.k.xent_rows.get::<T>());
    b.arg(&logits).arg(&bias).arg(&labels).arg(p);
    b.arg(&mut lse).arg(&mut ce);
    run(g, b, blocks((r * k).min(65_535), 128), "xent_rows")?;
    let ce = ce.as_view();
    let (mut per_head, mut out) = (per_head.view_mut(), out.view_mut());
    let mut b = g.stream.launch_builder(&g.k.xent_reduce);
    b.arg(&ce).arg(p).arg(&mut per_head).arg(&mut out);
    run(g, b, blocks(1, 1024), "xent_reduce")
}

/// dlogits and dbias += dloss[0] * d loss / d (logits, bias).
#[allow(clippy::too_many_arguments)]
pub fn backward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &XentParams,
    (logits, bias, labels): (&impl Dev<T>, &impl Dev<f32>, &impl Dev<f32>),
    lse: &impl Dev<f32>,
    dloss: &impl Dev<f32>,
    dlogits: &mut impl DevMut<T>,
    dbias: &mut impl DevMut<f32>,
) -> crate::Result<()> {
    let (r, _, k) = p.dims();
    need(
        "xent::backward_cuda",
        &[
            ("logits", logits.len(), r * p.cols()),
            ("bias", bias.len(), p.cols()),
            ("labels", labels.len(), r),
            ("lse", lse.len(), r * k),
            ("dloss", dloss.len(), 1),
            ("dlogits", dlogits.len(), r * p.cols()),
            ("dbias", dbias.len(), p.cols()),
        ],
    )?;
    let (logits, bias, labels) = (logits.view(), bias.view(), labels.view());
    let (lse, dloss) = (lse.view(), dloss.view());
    let mut dlogits = dlogits.view_mut();
    let mut b = g.stream.launch_builder(g.k.xent_bwd.get::<T>());
    b.arg(&logits).arg(&bias).arg(&labels).arg(&lse).arg(&dloss);
    b.arg(p).arg(&mut dlogits);
    run(g, b, blocks((r * k).min(65_535), 128), "xent_bwd")?;
    let mut dbias = dbias.view_mut();
    let mut b = g.stream.launch_builder(g.k.xent_bias_bwd.get::<T>());
    b.arg(&logits).arg(&bias).arg(&labels).arg(&lse).arg(&dloss);
    b.arg(p).arg(&mut dbias);
    run(g, b, grid_1d(p.cols()), "xent_bias_bwd")
}

// SAFETY: #[repr(C)] of i32 fields, the layout of the kernels' XentParams.
unsafe impl cudarc::driver::DeviceRepr for XentParams {}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut, Vf, VfMut};

/// The cross-entropy's kernels on a backend (the graph's xent node).
pub trait XentKernels: Backend {
    /// out[0] = the loss, per_head (K) each head's mean; lse (R*K) saved for backward; ce (R*K)
    /// scratch where the backend wants it.
    #[allow(clippy::too_many_arguments)]
    fn xent_forward(
        &self,
        p: &XentParams,
        inputs: (&Ve<Self>, &Vf<Self>, &Vf<Self>),
        lse: &mut VfMut<Self>,
        ce: &mut VfMut<Self>,
        per_head: &mut VfMut<Self>,
        out: &mut VfMut<Self>,
    ) -> crate::Result<()>;
    /// dlogits, dbias += dloss[0] * d loss / d (logits, bias).
    #[allow(clippy::too_many_arguments)]
    fn xent_backward(
        &self,
        p: &XentParams,
        inputs: (&Ve<Self>, &Vf<Self>, &Vf<Self>),
        lse: &Vf<Self>,
        dloss: &Vf<Self>,
        dlogits: &mut VeMut<Self>,
        dbias: &mut VfMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> XentKernels for Cpu<T> {
    fn xent_forward(
        &self,
        p: &XentParams,
        (logits, bias, labels): (&&[T], &&[T], &&[T]),
        lse: &mut &mut [T],
        _ce: &mut &mut [T],
        per_head: &mut &mut [T],
        out: &mut &mut [T],
    ) -> crate::Result<()> {
        let (loss, heads) = forward_cpu(logits, bias, labels, lse, p);
        out[0] = loss;
        per_head.copy_from_slice(&heads);
        Ok(())
    }
    fn xent_backward(
        &self,
        p: &XentParams,
        (logits, bias, labels): (&&[T], &&[T], &&[T]),
        lse: &&[T],
        dloss: &&[T],
        dlogits: &mut &mut [T],
        dbias: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_cpu(logits, bias, labels, lse, dloss[0], dlogits, dbias, p);
        Ok(())
    }
}

impl<E: GpuFloat> XentKernels for Cuda<E>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn xent_forward(
        &self,
        p: &XentParams,
        inputs: (&Ve<Self>, &Vf<Self>, &Vf<Self>),
        lse: &mut VfMut<Self>,
        ce: &mut VfMut<Self>,
        per_head: &mut VfMut<Self>,
        out: &mut VfMut<Self>,
    ) -> crate::Result<()> {
        forward_cuda(&self.gpu, p, inputs, (lse, ce), per_head, out)
    }
    fn xent_backward(
        &self,
        p: &XentParams,
        inputs: (&Ve<Self>, &Vf<Self>, &Vf<Self>),
        lse: &Vf<Self>,
        dloss: &Vf<Self>,
        dlogits: &mut VeMut<Self>,
        dbias: &mut VfMut<Self>,
    ) -> crate::Result<()> {
        backward_cuda(&self.gpu, p, inputs, lse, dloss, dlogits, dbias)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    /// Logits and bias against central differences: three heads of five classes over four rows.
    #[test]
    fn gradcheck_xent() {
        let p = XentParams::new(4, 5, 3);
        let labels = [3.0, 0.0, 4.0, 1.0];
        let inputs = vec![uniform(1, 4 * 15, -2.0, 2.0), uniform(2, 15, -1.0, 1.0)];
        let fwd = |xs: &[Vec<f64>]| {
            let mut lse = vec![0.0; 12];
            vec![forward_cpu(&xs[0], &xs[1], &labels, &mut lse, &p).0]
        };
        let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
            let mut lse = vec![0.0; 12];
            forward_cpu(&xs[0], &xs[1], &labels, &mut lse, &p);
            let (mut dl, mut db) = (vec![0.0; 60], vec![0.0; 15]);
            backward_cpu(&xs[0], &xs[1], &labels, &lse, dy[0], &mut dl, &mut db, &p);
            vec![Some(dl), Some(db)]
        };
        assert_ok(check("xent", &["logits", "bias"], &inputs, &fwd, &bwd));
    }

    /// PyTorch's CrossEntropyLoss on a hand-worked case: uniform logits cost ln(O); a confident
    /// right answer costs about nothing; heads are independent means; a bad label is NaN.
    #[test]
    fn known_values() {
        let p = XentParams::new(2, 4, 2);
        let mut logits = vec![0.0f64; 16];
        // Row 0, head 1: class 2 far ahead.
        logits[4 + 2] = 50.0;
        let bias = vec![0.0; 8];
        let mut lse = vec![0.0; 4];
        let (loss, heads) = forward_cpu(&logits, &bias, &[2.0, 1.0], &mut lse, &p);
        let ln4 = 4f64.ln();
        assert!((heads[0] - ln4).abs() < 1e-12, "{heads:?}");
        assert!((heads[1] - ln4 / 2.0).abs() < 1e-12, "{heads:?}");
        assert!((loss - 1.5 * ln4).abs() < 1e-12);
        let (bad, _) = forward_cpu(&logits, &bias, &[2.0, 4.0], &mut lse, &p);
        assert!(bad.is_nan());
        let (bad, _) = forward_cpu(&logits, &bias, &[2.0, 0.5], &mut lse, &p);
        assert!(bad.is_nan());
    }
}
