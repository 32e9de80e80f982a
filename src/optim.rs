//! The optimizer and schedules of LEWEL_SPEC section 4 and the EMA of section 3.3.
//!
//! LARS, per parameter tensor p with gradient g (Frobenius norms over the whole tensor):
//!   LARS group:     tau = eta * |p| / (|g| + wd * |p|)   (no clipping, no epsilon; |p| = 0 gives 0)
//!                   u = lr * tau * (g + wd * p)
//!   excluded group: u = lr * g                            (tau = 1, no weight decay, full lr)
//!   buf = mu * buf + u  (buf starts at 0, so the first step stores u);  p -= buf
//! The learning rate is folded in before the momentum, unlike torch SGD.
//! Schedules: per-iteration linear warmup, then per-epoch cosine without a floor; EMA momentum
//! m_k = 1 - (1 - m0) * (cos(pi k / K) + 1) / 2 per iteration.

use crate::memory::SizeTable;
use rayon::prelude::*;

/// Which names skip LARS and weight decay.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExcludeRule {
    /// The current official code: 'bn', 'downsample.1', 'bias', and with EMAN also 'mlp.1'.
    Current { eman: bool },
    /// The older rule of the released 100-epoch log: the neck and predictor BN gamma ('mlp.1.weight')
    /// stay in the LARS group even for EMAN.
    ReleasedLog,
}

impl ExcludeRule {
    /// The `--lars-exclude` flag: `current` (the official code, whose 'mlp.1' rule applies to EMAN
    /// only) or `released-log`.
    pub fn from_flag(flag: &str, eman: bool) -> crate::Result<ExcludeRule> {
        match flag {
            "current" => Ok(ExcludeRule::Current { eman }),
            "released-log" => Ok(ExcludeRule::ReleasedLog),
            s => Err(crate::Error::user(format!(
                "--lars-exclude: expected current or released-log, got '{s}'"
            ))),
        }
    }
}

/// True when `name` goes to the excluded group (wd 0, no trust ratio).
pub fn lars_excluded(name: &str, rule: ExcludeRule) -> bool {
    let base = name.contains("bn") || name.contains("downsample.1") || name.contains("bias");
    match rule {
        ExcludeRule::Current { eman } => base || (eman && name.contains("mlp.1")),
        ExcludeRule::ReleasedLog => base,
    }
}

#[derive(Clone, Copy, Debug, PartialEq)]
pub struct LarsConfig {
    pub lr: f64,
    pub weight_decay: f64,
    pub momentum: f64,
    pub eta: f64,
}

/// One LARS step over flat buffers laid out by `table`; `excluded[i]` marks the excluded tensors.
/// Norms and the trust ratio are computed in f64.
pub fn lars_step(
    table: &SizeTable,
    excluded: &[bool],
    params: &mut [f32],
    grads: &[f32],
    buf: &mut [f32],
    c: &LarsConfig,
) {
    assert_eq!(
        excluded.len(),
        table.entries.len(),
        "lars_step: exclusion flags vs table"
    );
    assert!(
        params.len() == table.total && grads.len() == table.total && buf.len() == table.total,
        "lars_step: buffer lengths"
    );
    for (e, &excl) in table.entries.iter().zip(excluded) {
        let r = e.range();
        let (p, g, b) = (&mut params[r.clone()], &grads[r.clone()], &mut buf[r]);
        let (scale, wd) = if excl {
            (c.lr, 0.0)
        } else {
            let (pn, gn) = (sum_sq(p).sqrt(), sum_sq(g).sqrt());
            let denom = gn + c.weight_decay * pn;
            let tau = if pn > 0.0 && denom > 0.0 {
                c.eta * pn / denom
            } else {
                0.0
            };
            (c.lr * tau, c.weight_decay)
        };
        p.par_chunks_mut(PAR_CHUNK)
            .zip(g.par_chunks(PAR_CHUNK))
            .zip(b.par_chunks_mut(PAR_CHUNK))
            .for_each(|((p, g), b)| {
                for ((pv, gv), bv) in p.iter_mut().zip(g).zip(b.iter_mut()) {
                    let u = scale * (*gv as f64 + wd * *pv as f64);
                    let nb = c.momentum * *bv as f64 + u;
                    *bv = nb as f32;
                    *pv = (*pv as f64 - nb) as f32;
                }
            });
    }
}

/// Elements per parallel task of the optimizer's passes, and per partial sum of the norms: fixed,
/// so a norm is the same sum in the same order on any number of threads.
const PAR_CHUNK: usize = 1 << 14;

/// The sum of squares in f64: per-chunk partials added in chunk order.
fn sum_sq(v: &[f32]) -> f64 {
    let parts: Vec<f64> = v
        .par_chunks(PAR_CHUNK)
        .map(|c| c.iter().map(|x| (*x as f64).powi(2)).sum::<f64>())
        .collect();
    parts.iter().sum()
}

/// Plain SGD with momentum, as PyTorch's `torch.optim.SGD` (dampening 0, no Nesterov): the
/// linear probe's and fine-tuning's optimizer.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SgdConfig {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

/// One SGD step: d = g + wd * w; buf = m * buf + d; w -= lr * buf (PyTorch's first step sets
/// buf = d, which a zeroed buf gives too). In f64, each value rounded once to f32.
pub fn sgd_step(params: &mut [f32], grads: &[f32], buf: &mut [f32], c: &SgdConfig) {
    assert!(
        params.len() == grads.len() && params.len() == buf.len(),
        "sgd_step: buffer lengths"
    );
    for ((w, g), b) in params.iter_mut().zip(grads).zip(buf.iter_mut()) {
        let d = *g as f64 + c.weight_decay * *w as f64;
        let nb = c.momentum * *b as f64 + d;
        *b = nb as f32;
        *w = (*w as f64 - c.lr * nb) as f32;
    }
}

/// [`sgd_step`] on a GPU (kernels/optim.cu sgd_update), the same arithmetic.
pub fn sgd_step_cuda(
    g: &Gpu,
    params: &mut impl DevMut<f32>,
    grads: &impl Dev<f32>,
    buf: &mut impl DevMut<f32>,
    c: &SgdConfig,
) -> crate::Result<()> {
    let n = params.len();
    need(
        "sgd_step_cuda",
        &[("grads", grads.len(), n), ("momentum", buf.len(), n)],
    )?;
    let (mut w, gv, mut b) = (params.view_mut(), grads.view(), buf.view_mut());
    let n = n as u64;
    let mut l = g.stream.launch_builder(&g.k.sgd_update);
    l.arg(&mut w).arg(&gv).arg(&mut b).arg(&n);
    l.arg(&c.lr).arg(&c.momentum).arg(&c.weight_decay);
    run(g, l, grid_1d(n as usize), "sgd_update")
}

/// Learning rate at iteration `i` of epoch `epoch` (both 0-based).
pub fn lr_at(
    base: f64,
    epoch: usize,
    i: usize,
    iters_per_epoch: usize,
    warmup_epochs: usize,
    epochs: usize,
) -> f64 {
    if epoch < warmup_epochs {
        base * (epoch * iters_per_epoch + i + 1) as f64 / (warmup_epochs * iters_per_epoch) as f64
    } else {
        let t = (epoch - warmup_epochs) as f64 / (epochs - warmup_epochs) as f64;
        base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
    }
}

/// EMA momentum at global iteration k of `total`.
pub fn ema_momentum(m0: f64, k: usize, total: usize) -> f64 {
    1.0 - (1.0 - m0) * ((std::f64::consts::PI * k as f64 / total as f64).cos() + 1.0) / 2.0
}

/// target <- m * target + (1 - m) * online, elementwise (f64 arithmetic, f32 storage).
pub fn ema_update(target: &mut [f32], online: &[f32], m: f64) {
    assert_eq!(
        target.len(),
        online.len(),
        "ema_update: target {} vs online {}",
        target.len(),
        online.len()
    );
    target
        .par_chunks_mut(PAR_CHUNK)
        .zip(online.par_chunks(PAR_CHUNK))
        .for_each(|(t, o)| {
            for (t, o) in t.iter_mut().zip(o) {
                *t = (m * *t as f64 + (1.0 - m) * *o as f64) as f32;
            }
        });
}

// ---- CUDA launchers (kernels/optim.cu)

use crate::gpu::{blocks, grid_1d, need, run, Dev, DevMut, Gpu};
use cudarc::driver::{CudaSlice, PushKernelArg};

/// Elements per chunk of the flat buffers (a chunk never crosses a tensor).
const GPU_CHUNK: usize = 16_384;

/// LARS over flat device buffers: the chunk table and scratch, built once from the size table.
pub struct GpuLars {
    /// Elements the table covers: the least each flat buffer must hold.
    total: usize,
    chunks: usize,
    tensors: i32,
    chunk_tensor: CudaSlice<i32>,
    chunk_len: CudaSlice<i32>,
    chunk_start: CudaSlice<u64>,
    tensor_first: CudaSlice<i32>,
    tensor_chunks: CudaSlice<i32>,
    excluded: CudaSlice<u8>,
    /// Per chunk: the NaN guard's flags (kernel `nonfinite`), and on the host each chunk's tensor.
    flags: CudaSlice<f32>,
    chunk_tensor_host: Vec<usize>,
    partial: CudaSlice<f32>,
    scale: CudaSlice<f64>,
    wdv: CudaSlice<f64>,
}

impl GpuLars {
    pub fn new(g: &Gpu, table: &SizeTable, excluded: &[bool]) -> crate::Result<GpuLars> {
        assert_eq!(
            excluded.len(),
            table.entries.len(),
            "GpuLars: exclusion flags vs table"
        );
        let (mut ct, mut cl, mut cs, mut tf, mut tc) = (vec![], vec![], vec![], vec![], vec![]);
        for (t, e) in table.entries.iter().enumerate() {
            let r = e.range();
            tf.push(ct.len() as i32);
            let mut s = r.start;
            while s < r.end {
                let n = GPU_CHUNK.min(r.end - s);
                ct.push(t as i32);
                cl.push(n as i32);
                cs.push(s as u64);
                s += n;
            }
            tc.push(ct.len() as i32 - tf[t]);
        }
        let up = |e| g.err("uploading the LARS table", e);
        let st = &g.stream;
        let ex: Vec<u8> = excluded.iter().map(|&x| x as u8).collect();
        Ok(GpuLars {
            total: table.total,
            chunks: ct.len(),
            tensors: tf.len() as i32,
            chunk_tensor: st.clone_htod(&ct).map_err(up)?,
            chunk_len: st.clone_htod(&cl).map_err(up)?,
            chunk_start: st.clone_htod(&cs).map_err(up)?,
            tensor_first: st.clone_htod(&tf).map_err(up)?,
            tensor_chunks: st.clone_htod(&tc).map_err(up)?,
            excluded: st.clone_htod(&ex).map_err(up)?,
            flags: g.zeros(ct.len())?,
            chunk_tensor_host: ct.iter().map(|&t| t as usize).collect(),
            partial: g.zeros(2 * ct.len())?,
            scale: st.alloc_zeros(tf.len().max(1)).map_err(up)?,
            wdv: st.alloc_zeros(tf.len().max(1)).map_err(up)?,
        })
    }

    /// One LARS step, as [`lars_step`]: three launches over the flat buffers, each holding at
    /// least the table's total.
    pub fn step(
        &mut self,
        g: &Gpu,
        params: &mut impl DevMut<f32>,
        grads: &impl Dev<f32>,
        buf: &mut impl DevMut<f32>,
        c: &LarsConfig,
    ) -> crate::Result<()> {
        let n = self.total;
        need(
            "GpuLars::step",
            &[
                ("params", params.len(), n),
                ("grads", grads.len(), n),
                ("buf", buf.len(), n),
            ],
        )?;
        let (mut params, grads, mut buf) = (params.view_mut(), grads.view(), buf.view_mut());
        let pv = params.as_view();
        let mut b = g.stream.launch_builder(&g.k.lars_norms);
        b.arg(&pv)
            .arg(&grads)
            .arg(&self.chunk_len)
            .arg(&self.chunk_start);
        b.arg(&mut self.partial);
        run(g, b, blocks(self.chunks, 256), "lars_norms")?;
        let mut b = g.stream.launch_builder(&g.k.lars_trust);
        b.arg(&self.partial)
            .arg(&self.tensor_first)
            .arg(&self.tensor_chunks);
        b.arg(&self.excluded)
            .arg(&self.tensors)
            .arg(&c.lr)
            .arg(&c.weight_decay)
            .arg(&c.eta);
        b.arg(&mut self.scale).arg(&mut self.wdv);
        run(g, b, grid_1d(self.tensors as usize), "lars_trust")?;
        let mut b = g.stream.launch_builder(&g.k.lars_update);
        b.arg(&mut params)
            .arg(&grads)
            .arg(&mut buf)
            .arg(&self.chunk_tensor)
            .arg(&self.chunk_len);
        b.arg(&self.chunk_start)
            .arg(&self.scale)
            .arg(&self.wdv)
            .arg(&c.momentum);
        run(g, b, blocks(self.chunks, 256), "lars_update")
    }
}

impl GpuLars {
    /// Queues the NaN guard's check of `params` and `grads` (kernel `nonfinite`) and the download
    /// of its per-chunk flags into `dst` (page-locked, 4 bytes a chunk), without waiting.
    pub fn queue_health(
        &mut self,
        g: &Gpu,
        params: &impl Dev<f32>,
        grads: &impl Dev<f32>,
        dst: &mut crate::data::pinned::PinnedBuf,
    ) -> crate::Result<()> {
        let n = self.total;
        need(
            "GpuLars::queue_health",
            &[("params", params.len(), n), ("grads", grads.len(), n)],
        )?;
        let (pv, gv) = (params.view(), grads.view());
        let mut b = g.stream.launch_builder(&g.k.nonfinite);
        b.arg(&pv)
            .arg(&gv)
            .arg(&self.chunk_len)
            .arg(&self.chunk_start);
        b.arg(&mut self.flags);
        run(g, b, blocks(self.chunks, 256), "nonfinite")?;
        let (ptr, _rec) = cudarc::driver::DevicePtr::device_ptr(&self.flags, &g.stream);
        dst.download_from(&g.stream, ptr)
            .map_err(|e| g.err("queuing the download of the NaN guard's flags", e))
    }

    /// Bytes of the flags [`Self::queue_health`] downloads.
    pub fn health_bytes(&self) -> usize {
        4 * self.chunks
    }

    /// Per tensor, from downloaded chunk flags: bit 0 a value is not finite, bit 1 a gradient.
    pub fn tensor_health(&self, chunk_flags: &[u8]) -> Vec<u8> {
        let mut out = vec![0u8; self.tensors as usize];
        for (c, b) in chunk_flags.chunks_exact(4).enumerate() {
            let f = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]) as u8;
            out[self.chunk_tensor_host[c]] |= f;
        }
        out
    }
}

/// Per tensor of `table`: bit 0 when one of its values is NaN or infinite, bit 1 when one of its
/// gradients is (the NaN guard, on the CPU).
pub fn tensor_health(table: &SizeTable, params: &[f32], grads: &[f32]) -> Vec<u8> {
    let bad = |v: &[f32]| {
        v.par_chunks(PAR_CHUNK)
            .any(|c| c.iter().any(|x| !x.is_finite()))
    };
    table
        .entries
        .iter()
        .map(|e| {
            let r = e.range();
            bad(&params[r.clone()]) as u8 | (bad(&grads[r]) as u8) << 1
        })
        .collect()
}

/// target = m * target + (1 - m) * online over a flat buffer, as [`ema_update`], in one launch,
/// over target's length.
pub fn ema_update_cuda(
    g: &Gpu,
    target: &mut impl DevMut<f32>,
    online: &impl Dev<f32>,
    m: f64,
) -> crate::Result<()> {
    let n = target.len();
    need("ema_update_cuda", &[("online", online.len(), n)])?;
    let (mut target, online, n) = (target.view_mut(), online.view(), n as u64);
    let mut b = g.stream.launch_builder(&g.k.ema_update);
    b.arg(&mut target).arg(&online).arg(&n).arg(&m);
    run(g, b, grid_1d(n as usize), "ema_update")
}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda};
use crate::gpu::GpuFloat;
use cudarc::cublas::{CudaBlas, Gemm};

/// The optimizer's kernels on a backend: the LARS step and the EMA over flat buffers.
pub trait OptimKernels: Backend<F = f32> {
    /// What a LARS step over one table and one exclusion rule keeps between steps.
    type Lars;
    fn lars_new(&self, table: &SizeTable, excluded: Vec<bool>) -> crate::Result<Self::Lars>;
    fn lars_step(
        &self,
        lars: &mut Self::Lars,
        params: &mut Self::Buf<f32>,
        grads: &Self::Buf<f32>,
        momentum: &mut Self::Buf<f32>,
        c: &LarsConfig,
    ) -> crate::Result<()>;
    /// [`sgd_step`] over `r` of the flat buffers.
    fn sgd_step(
        &self,
        params: &mut Self::Buf<f32>,
        grads: &Self::Buf<f32>,
        momentum: &mut Self::Buf<f32>,
        r: std::ops::Range<usize>,
        c: &SgdConfig,
    ) -> crate::Result<()>;
    /// target = m * target + (1 - m) * online[..target's length].
    fn ema(
        &self,
        target: &mut Self::Buf<f32>,
        online: &Self::Buf<f32>,
        m: f64,
    ) -> crate::Result<()>;
    /// The NaN guard's check of the parameters and gradients of `lars`'s table, on its way to
    /// the host (into `reuse` where it can), read by [`Self::read_health`].
    type Health;
    fn queue_health(
        &self,
        lars: &mut Self::Lars,
        params: &Self::Buf<f32>,
        grads: &Self::Buf<f32>,
        reuse: Option<Self::Health>,
    ) -> crate::Result<Self::Health>;
    /// Per tensor: bit 0 a value is NaN or infinite, bit 1 a gradient is (waits for the check).
    fn read_health(&self, lars: &Self::Lars, h: &Self::Health) -> crate::Result<Vec<u8>>;
}

impl OptimKernels for Cpu<f32> {
    type Lars = (SizeTable, Vec<bool>);
    fn lars_new(&self, table: &SizeTable, excluded: Vec<bool>) -> crate::Result<Self::Lars> {
        Ok((table.clone(), excluded))
    }
    fn lars_step(
        &self,
        (table, excluded): &mut Self::Lars,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        momentum: &mut Vec<f32>,
        c: &LarsConfig,
    ) -> crate::Result<()> {
        lars_step(table, excluded, params, grads, momentum, c);
        Ok(())
    }
    fn sgd_step(
        &self,
        params: &mut Vec<f32>,
        grads: &Vec<f32>,
        momentum: &mut Vec<f32>,
        r: std::ops::Range<usize>,
        c: &SgdConfig,
    ) -> crate::Result<()> {
        sgd_step(
            &mut params[r.clone()],
            &grads[r.clone()],
            &mut momentum[r],
            c,
        );
        Ok(())
    }
    fn ema(&self, target: &mut Vec<f32>, online: &Vec<f32>, m: f64) -> crate::Result<()> {
        let n = target.len();
        ema_update(target, &online[..n], m);
        Ok(())
    }
    type Health = Vec<u8>;
    fn queue_health(
        &self,
        (table, _): &mut Self::Lars,
        params: &Vec<f32>,
        grads: &Vec<f32>,
        _reuse: Option<Vec<u8>>,
    ) -> crate::Result<Vec<u8>> {
        Ok(tensor_health(table, params, grads))
    }
    fn read_health(&self, _lars: &Self::Lars, h: &Vec<u8>) -> crate::Result<Vec<u8>> {
        Ok(h.clone())
    }
}

impl<E: GpuFloat> OptimKernels for Cuda<E>
where
    CudaBlas: Gemm<E>,
{
    type Lars = GpuLars;
    fn lars_new(&self, table: &SizeTable, excluded: Vec<bool>) -> crate::Result<GpuLars> {
        GpuLars::new(&self.gpu, table, &excluded)
    }
    fn lars_step(
        &self,
        lars: &mut GpuLars,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        momentum: &mut CudaSlice<f32>,
        c: &LarsConfig,
    ) -> crate::Result<()> {
        lars.step(&self.gpu, params, grads, momentum, c)
    }
    fn sgd_step(
        &self,
        params: &mut CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        momentum: &mut CudaSlice<f32>,
        r: std::ops::Range<usize>,
        c: &SgdConfig,
    ) -> crate::Result<()> {
        sgd_step_cuda(
            &self.gpu,
            &mut params.slice_mut(r.clone()),
            &grads.slice(r.clone()),
            &mut momentum.slice_mut(r),
            c,
        )
    }
    fn ema(
        &self,
        target: &mut CudaSlice<f32>,
        online: &CudaSlice<f32>,
        m: f64,
    ) -> crate::Result<()> {
        let n = target.len();
        ema_update_cuda(&self.gpu, target, &online.slice(..n), m)
    }
    type Health = crate::data::pinned::PinnedBuf;
    fn queue_health(
        &self,
        lars: &mut GpuLars,
        params: &CudaSlice<f32>,
        grads: &CudaSlice<f32>,
        reuse: Option<Self::Health>,
    ) -> crate::Result<Self::Health> {
        let g = &self.gpu;
        let mut slot = match reuse {
            Some(s) if s.len() == lars.health_bytes() => s,
            _ => crate::data::pinned::PinnedBuf::new(&g.ctx, lars.health_bytes(), false)
                .map_err(|e| g.err("page-locked memory for the NaN guard", e))?,
        };
        lars.queue_health(g, params, grads, &mut slot)?;
        Ok(slot)
    }
    fn read_health(&self, lars: &GpuLars, h: &Self::Health) -> crate::Result<Vec<u8>> {
        let b = h
            .bytes()
            .map_err(|e| self.gpu.err("reading the NaN guard's flags", e))?;
        Ok(lars.tensor_health(b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tensor::Shape;

    /// LEWEL_SPEC section 9: LR and MOM of the released log (1251 iterations per epoch, 10 warmup
    /// epochs of 100, base lr 3.6, m0 0.98), as printed there.
    #[test]
    fn schedules_reproduce_the_released_log() {
        let rows: [(usize, usize, f64, f64); 16] = [
            (0, 0, 2.8777e-4, 0.98),
            (0, 50, 0.014676, 0.9800000079),
            (0, 100, 0.029065, 0.9800000315),
            (0, 150, 0.043453, 0.9800000709),
            (0, 200, 0.057842, 0.9800001261),
            (0, 300, 0.086619, 0.9800002838),
            (0, 500, 0.14417, 0.9800007883),
            (0, 1000, 0.28806, 0.9800031531),
            (0, 1250, 0.36, 0.9800049265),
            (1, 1250, 0.72, 0.9800197170),
            (4, 1250, 1.8, 0.9801230773),
            (9, 1250, 3.6, 0.9804893572),
            (19, 1250, 3.51190, 0.9819096825),
            (49, 1250, 2.17424, 0.9899997489),
            (74, 1250, 0.691809, 0.9970708902),
            (99, 1250, 0.0010965, 0.9999999999968),
        ];
        for (e, i, lr, mom) in rows {
            let ours = lr_at(3.6, e, i, 1251, 10, 100);
            // The log prints 5-6 significant digits.
            assert!(
                (ours - lr).abs() <= 5e-5 * lr,
                "epoch {e} iter {i}: lr {ours} vs log {lr}"
            );
            let m = ema_momentum(0.98, e * 1251 + i, 125_100);
            assert!(
                (m - mom).abs() < 6e-11,
                "epoch {e} iter {i}: momentum {m:.13} vs log {mom}"
            );
        }
    }

    #[test]
    fn exclusion_rules() {
        let cur = ExcludeRule::Current { eman: true };
        let plain = ExcludeRule::Current { eman: false };
        for n in [
            "online_net.backbone.bn1.weight",
            "online_net.backbone.layer1.0.downsample.1.bias",
            "predictor.mlp.1.bias",
        ] {
            assert!(
                lars_excluded(n, cur)
                    && lars_excluded(n, plain)
                    && lars_excluded(n, ExcludeRule::ReleasedLog),
                "{n}"
            );
        }
        let g = "online_net.neck.proj.mlp.1.weight";
        assert!(lars_excluded(g, cur));
        assert!(!lars_excluded(g, plain));
        assert!(!lars_excluded(g, ExcludeRule::ReleasedLog));
        assert_eq!(ExcludeRule::from_flag("current", true).unwrap(), cur);
        assert_eq!(
            ExcludeRule::from_flag("released-log", true).unwrap(),
            ExcludeRule::ReleasedLog
        );
        assert_eq!(
            ExcludeRule::from_flag("old", true).unwrap_err().exit_code(),
            2
        );
        for n in [
            "online_net.backbone.conv1.weight",
            "online_net.backbone.layer1.0.downsample.0.weight",
            "predictor_obj.mlp.3.weight",
        ] {
            assert!(!lars_excluded(n, cur), "{n}");
        }
    }

    #[test]
    fn lars_by_hand() {
        let mut t = SizeTable::default();
        t.push("w", Shape::new(&[2]));
        t.push("bn.weight", Shape::new(&[2]));
        let mut p = vec![3.0f32, 4.0, 1.0, 2.0]; // |w| = 5
        let g = vec![0.6f32, 0.8, 0.5, -0.5]; // |g_w| = 1
        let mut buf = vec![0.0f32; 4];
        let c = LarsConfig {
            lr: 0.5,
            weight_decay: 0.1,
            momentum: 0.9,
            eta: 0.001,
        };
        lars_step(&t, &[false, true], &mut p, &g, &mut buf, &c);
        // tau = 0.001 * 5 / (1 + 0.5) ; u = 0.5 * tau * (g + 0.1 p)
        let tau = 0.001 * 5.0 / 1.5;
        let u0 = 0.5 * tau * (0.6 + 0.3);
        assert!((buf[0] as f64 - u0).abs() < 1e-9);
        assert!((p[0] as f64 - (3.0 - u0)).abs() < 5e-7);
        // excluded: u = lr * g
        assert!((buf[2] - 0.25).abs() < 1e-7 && (p[3] - 2.25).abs() < 1e-7);
        // second step: buf = 0.9 buf + u
        let b2 = buf[2];
        lars_step(&t, &[false, true], &mut p, &g, &mut buf, &c);
        assert!((buf[2] - (0.9 * b2 + 0.25)).abs() < 1e-7);
        // zero weights give tau = 0: no update
        let mut z = vec![0.0f32; 4];
        let mut bz = vec![0.0f32; 4];
        lars_step(&t, &[false, false], &mut z, &g, &mut bz, &c);
        assert_eq!(&z[..2], &[0.0, 0.0]);
    }

    #[test]
    fn ema_moves_toward_online() {
        let mut t = vec![1.0f32, 0.0];
        ema_update(&mut t, &[0.0, 1.0], 0.9);
        assert!((t[0] - 0.9).abs() < 1e-7 && (t[1] - 0.1).abs() < 1e-7);
    }
}
