//! One LEWEL training iteration, top to bottom (LEWEL_SPEC 3 and 6):
//!   online(v1), online(v2) in train mode; target(v1), target(v2) without gradient (eval mode for
//!   EMAN, train mode for LEWEL-B); the two-direction loss; backward; LARS; then the EMA of the target
//!   (parameters and BN running statistics for EMAN, with num_batches_tracked copied; parameters only
//!   for LEWEL-B), with this iteration's momentum.
//! The online store holds online_net.*, predictor.*, predictor_obj.*; the target store holds
//! target_net.* in the same order, so the online_net part of every flat buffer lines up with the
//! target's buffer element for element.

pub mod cuda;

use crate::backend::{Backend, Cpu};
use crate::checkpoint::{self, Owned, Tensors};
use crate::data::loader::CropBuf;
use crate::data::photometric_cuda::AugParams;
use crate::error::{Error, Result};
use crate::graph::Kernels;
use crate::graph::{BnMode, Graph};
use crate::memory::ParamStore;
use crate::model::lewel::{EncoderObj, LewelConfig, LewelOnline};
use crate::optim::{self, ExcludeRule, LarsConfig, OptimKernels};
use crate::rng::Rng;
use crate::tensor::{Shape, Tensor};
use std::collections::VecDeque;

/// The LEWEL variant.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Method {
    /// LEWEL-B with EMAN: target in eval mode, EMA over parameters and BN running statistics.
    LewelBEman,
    /// LEWEL-B: target in train mode (batch statistics), EMA over parameters only.
    LewelB,
}

impl std::str::FromStr for Method {
    type Err = Error;
    fn from_str(s: &str) -> Result<Method> {
        match s {
            "lewel-b-eman" => Ok(Method::LewelBEman),
            "lewel-b" => Ok(Method::LewelB),
            _ => Err(Error::user(format!(
                "--method: expected lewel-b-eman or lewel-b, got '{s}'"
            ))),
        }
    }
}

impl Method {
    pub fn name(self) -> &'static str {
        match self {
            Method::LewelBEman => "lewel-b-eman",
            Method::LewelB => "lewel-b",
        }
    }
}

/// What one iteration needs besides the state.
#[derive(Clone, Copy, Debug)]
pub struct StepConfig {
    pub method: Method,
    pub lars: LarsConfig,
    pub ema_m: f64,
    pub exclude: ExcludeRule,
    /// Samples per batch-norm statistics group (per-GPU batch emulation); None: the whole batch.
    pub bn_group: Option<usize>,
}

impl StepConfig {
    /// Batch-norm modes of the online and the target network: batch statistics (per group when
    /// emulating per-GPU BN) online; running statistics for EMAN's target, the online mode for
    /// LEWEL-B's.
    pub fn bn_modes(&self) -> (BnMode, BnMode) {
        let online = match self.bn_group {
            Some(n) => BnMode::TrainGhost(n),
            None => BnMode::Train,
        };
        let target = match self.method {
            Method::LewelBEman => BnMode::Eval,
            Method::LewelB => online,
        };
        (online, target)
    }

    /// The recipe's fixed values (LARS momentum 0.9, eta 0.001, wd 1.5e-6, the current exclusion
    /// rule, BN over the whole batch) with the given method, lr and EMA momentum.
    pub fn recipe(method: Method, lr: f64, ema_m: f64) -> StepConfig {
        StepConfig {
            method,
            lars: LarsConfig {
                lr,
                weight_decay: 1.5e-6,
                momentum: 0.9,
                eta: 0.001,
            },
            ema_m,
            exclude: ExcludeRule::Current {
                eman: method == Method::LewelBEman,
            },
            bn_group: None,
        }
    }
}

/// What a training loop needs of its device beyond the graph's kernels, the optimizer's and the
/// points on its timeline every [`crate::backend::Backend`] has: a loss on its way to the host, and
/// the inputs it makes itself. Implemented by the CPU here and by CUDA in `cuda.rs`.
pub trait TrainBackend: Kernels + OptimKernels + Clone {
    /// A step's loss on its way to the host.
    type Pending;
    /// Buffers of the photometric augmentation where the device runs it.
    type Aug: Default;
    /// Queues the copy of a loss to the host without waiting (into `reuse` where it can).
    fn queue_loss(
        g: &Graph<Self>,
        t: Tensor,
        reuse: Option<Self::Pending>,
    ) -> Result<Self::Pending>;
    /// The loss (waits for its copy).
    fn read_loss(&self, p: &Self::Pending) -> Result<f32>;
    /// The device, for the run's first line.
    fn describe(&self) -> String;
    /// Whether the device has memory of its own (reported with every step).
    fn has_device_memory(&self) -> bool;
    /// Both views made from u8 crops (B, S, S, 3) on the device: the photometric half of the
    /// augmentation runs there.
    fn input_crops(
        g: &mut Graph<Self>,
        aug: &mut Self::Aug,
        crops: [&CropBuf; 2],
        params: [&[AugParams]; 2],
        shape: Shape,
    ) -> Result<(Tensor, Tensor)>;
    /// The CUDA context, on a GPU (the loader pins its buffers there).
    fn context(&self) -> Option<std::sync::Arc<cudarc::driver::CudaContext>>;
    /// Why cuDNN benchmarking failed, once (the heuristic was used instead).
    fn take_find_failure(&self) -> Option<String>;
}

impl TrainBackend for Cpu<f32> {
    type Pending = f32;
    type Aug = ();
    fn queue_loss(g: &Graph<Self>, t: Tensor, _reuse: Option<f32>) -> Result<f32> {
        Ok(g.value(t)[0])
    }
    fn read_loss(&self, p: &f32) -> Result<f32> {
        Ok(*p)
    }
    fn describe(&self) -> String {
        format!("cpu f32 ({} threads)", rayon::current_num_threads())
    }
    fn has_device_memory(&self) -> bool {
        false
    }
    fn input_crops(
        _g: &mut Graph<Self>,
        _aug: &mut (),
        _crops: [&CropBuf; 2],
        _params: [&[AugParams]; 2],
        _shape: Shape,
    ) -> Result<(Tensor, Tensor)> {
        Err(Error::Other(
            "u8 crops reach the CPU engine: the loader should normalize".into(),
        ))
    }
    fn context(&self) -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
        None
    }
    fn take_find_failure(&self) -> Option<String> {
        None
    }
}

/// A step queued on the device: its loss on the way, and the marks its time runs between.
struct Queued<B: TrainBackend> {
    loss: B::Pending,
    /// Where the step clock was restarted before it.
    start: Option<B::Mark>,
    /// Behind its update.
    end: Option<B::Mark>,
    /// The NaN guard's check behind its update.
    health: Option<B::Health>,
}

/// The online and target models with their graphs on one device, the LARS momentum, and the
/// queue of steps whose losses are on their way to the host. One iteration, on every device:
/// [`Trainer::queue_forward_backward`] (or its crops form), [`Trainer::update`], and a step or more
/// later [`Trainer::take_loss`].
pub struct Trainer<B: TrainBackend> {
    pub cfg: LewelConfig,
    pub online: LewelOnline,
    pub target: EncoderObj,
    pub g: Graph<B>,
    pub tg: Graph<B>,
    /// LARS momentum, laid out by the online store's table.
    pub momentum: B::Buf<f32>,
    /// Lengths of the online_net part of the parameter and buffer tables, and its counter count.
    pub(crate) online_params: usize,
    pub(crate) online_buffers: usize,
    pub(crate) online_counters: usize,
    /// The LARS state for the exclusion rule it was made for.
    lars: Option<(ExcludeRule, B::Lars)>,
    aug: B::Aug,
    /// Steps whose losses are on their way, oldest first: a training loop reads a step's loss once
    /// the next step is queued, so the host never waits with a GPU idle.
    queued: VecDeque<Queued<B>>,
    /// Loss slots already read, for reuse.
    spare: Vec<B::Pending>,
    /// The end of the step read last: a step's time runs from it.
    last_end: Option<B::Mark>,
    /// The start of the step being queued, where it needs one.
    start: Option<B::Mark>,
    /// Marks no longer needed, for reuse (a step makes none once running).
    spare_marks: Vec<B::Mark>,
    /// Images per eval-mode feature pass (the kNN monitor): at most the training batch on a GPU,
    /// so the pass never needs more activation memory than a step (128 by default).
    pub feature_batch: usize,
    /// Host copies of the weights and the momentum where they live elsewhere (checkpoints).
    host_cache: (ParamStore<f32>, ParamStore<f32>, Vec<f32>),
    /// Runs on the gradients after every backward ([`GradHook`]).
    pub grad_hook: Option<GradHook<B>>,
    /// Runs on the BN running statistics before every forward ([`BufferHook`]).
    pub buffer_hook: Option<BufferHook<B>>,
    /// Runs on the loss before it is queued to the host ([`LossHook`]).
    pub loss_hook: Option<LossHook<B>>,
    /// The NaN guard: every update checks the online weights and gradients (one pass over each,
    /// queued like the loss) and [`Trainer::take_loss`] fails naming the first that is not finite.
    pub nan_guard: bool,
    spare_health: Vec<B::Health>,
    /// `--on-nan skip`: each step's online BN statistics (and counters) are kept before its
    /// forward, so a step whose loss or gradients are not finite can be undone.
    pub keep_buffers: bool,
    saved_buffers: Option<SavedBuffers<B>>,
    /// Test hook: the next backward leaves a NaN in this range of the gradients.
    poison: Option<std::ops::Range<usize>>,
}

/// A step's online BN statistics and counters as they were before its forward (`--on-nan skip`).
type SavedBuffers<B> = (<B as Backend>::Buf<f32>, Vec<(String, i64)>);

/// The LEWEL trainer on the CPU (the reference).
pub type Lewel = Trainer<Cpu<f32>>;

/// Called at the start of every step's forward with the device and the online and target BN
/// running statistics (flat f32 buffers): where data-parallel training broadcasts rank 0's, as
/// PyTorch DDP's `broadcast_buffers` does in the official runs (LEWEL_SPEC 6).
pub type BufferHook<B> =
    Box<dyn FnMut(&B, &mut <B as Backend>::Buf<f32>, &mut <B as Backend>::Buf<f32>) -> Result<()>>;

/// Called after every backward with the device and the flat f32 gradient buffer (every online
/// parameter, laid out by the online store's table), before the loss is queued: where
/// data-parallel training all-reduces the gradients. On a GPU it launches on the graph's stream.
pub type GradHook<B> = Box<dyn FnMut(&B, &mut <B as Backend>::Buf<f32>) -> Result<()>>;

/// Called after the gradient hook with the device and the step's loss (one f32 on the device):
/// where data-parallel training averages the loss over the ranks, so every rank logs the loss of
/// the whole batch.
pub type LossHook<B> = Box<dyn for<'a> FnMut(&B, &mut crate::backend::VfMut<'a, B>) -> Result<()>>;

/// A trainer's state on the host, for checkpoints and comparisons.
pub struct HostView<'a> {
    pub online: &'a ParamStore<f32>,
    pub target: &'a ParamStore<f32>,
    pub momentum: &'a [f32],
}

impl Trainer<Cpu<f32>> {
    /// Fresh models on the CPU: online initialized from `seed`, target a copy of online_net
    /// (LEWEL_SPEC 3.1). [`Trainer::to_device`] moves them.
    pub fn new(cfg: LewelConfig, seed: u64) -> Lewel {
        let mut s = ParamStore::new();
        let online = LewelOnline::build(&mut s, &cfg, &mut Rng::keyed(&[seed, 0x041]));
        let mut ts = ParamStore::new();
        let target = EncoderObj::build(
            &mut ts,
            "target_net.",
            &cfg,
            &mut Rng::keyed(&[seed, 0x7a6]),
        );
        let prefix_len = |names: Vec<&String>| {
            names
                .iter()
                .take_while(|n| n.starts_with("online_net."))
                .count()
        };
        let np = prefix_len(s.table.entries.iter().map(|e| &e.name).collect());
        let nb = prefix_len(s.buffer_table.entries.iter().map(|e| &e.name).collect());
        let nc = prefix_len(s.counters.iter().map(|c| &c.0).collect());
        // The target's tables must be the online_net prefix of the online tables, name for name.
        assert_eq!(ts.table.entries.len(), np, "Lewel: target parameter count");
        for (a, b) in s.table.entries.iter().zip(&ts.table.entries) {
            assert!(
                b.name == a.name.replacen("online_net.", "target_net.", 1)
                    && a.shape == b.shape
                    && a.offset == b.offset
            );
        }
        let online_params = s.table.entries.get(np).map_or(s.table.total, |e| e.offset);
        let online_buffers = s
            .buffer_table
            .entries
            .get(nb)
            .map_or(s.buffer_table.total, |e| e.offset);
        assert_eq!(
            (online_params, online_buffers, nc),
            (ts.table.total, ts.buffer_table.total, ts.counters.len())
        );
        let n = s.num_params();
        let mut m = Trainer {
            cfg,
            online,
            target,
            g: Graph::cpu(s),
            tg: Graph::cpu(ts),
            momentum: vec![0.0; n],
            online_params,
            online_buffers,
            online_counters: nc,
            lars: None,
            aug: (),
            queued: VecDeque::new(),
            spare: Vec::new(),
            last_end: None,
            start: None,
            spare_marks: Vec::new(),
            feature_batch: 128,
            host_cache: Default::default(),
            grad_hook: None,
            buffer_hook: None,
            loss_hook: None,
            nan_guard: true,
            spare_health: Vec::new(),
            keep_buffers: false,
            saved_buffers: None,
            poison: None,
        };
        m.copy_online_to_target();
        m
    }

    /// target_net <- online_net (parameters, buffers and counters).
    pub fn copy_online_to_target(&mut self) {
        let (s, t) = (&self.g.store, &mut self.tg.store);
        t.params.copy_from_slice(&s.params[..self.online_params]);
        t.buffers.copy_from_slice(&s.buffers[..self.online_buffers]);
        for (tc, oc) in t.counters.iter_mut().zip(&s.counters) {
            tc.1 = oc.1;
        }
    }

    /// The models (fresh or loaded from a checkpoint) with their LARS momentum on `dev`.
    pub fn to_device<D: TrainBackend<F = f32>>(self, dev: D) -> Result<Trainer<D>> {
        let momentum = dev.upload_buf(&self.momentum)?;
        Ok(Trainer {
            cfg: self.cfg,
            online: self.online,
            target: self.target,
            g: Graph::new(dev.clone(), self.g.store)?,
            tg: Graph::new(dev, self.tg.store)?,
            momentum,
            online_params: self.online_params,
            online_buffers: self.online_buffers,
            online_counters: self.online_counters,
            lars: None,
            aug: D::Aug::default(),
            queued: VecDeque::new(),
            spare: Vec::new(),
            last_end: None,
            start: None,
            spare_marks: Vec::new(),
            feature_batch: self.feature_batch,
            host_cache: Default::default(),
            grad_hook: None,
            buffer_hook: None,
            loss_hook: None,
            nan_guard: true,
            spare_health: Vec::new(),
            keep_buffers: false,
            saved_buffers: None,
            poison: None,
        })
    }
}

impl<B: TrainBackend> Trainer<B> {
    /// Bytes held by both graphs and the momentum.
    pub fn device_bytes(&self) -> usize {
        self.g.device_bytes() + self.tg.device_bytes() + B::len(&self.momentum) * 4
    }

    /// Forward and backward of one iteration on views (B, H, W, 3); leaves the f32 gradients in
    /// the online graph and returns the loss (waits for it).
    pub fn forward_backward(
        &mut self,
        v1: &[f32],
        v2: &[f32],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<f32> {
        self.queue_forward_backward(v1, v2, shape, sc)?;
        Ok(self.take_loss()?.0)
    }

    /// The same without waiting: the loss joins the queue [`Self::take_loss`] reads.
    pub fn queue_forward_backward(
        &mut self,
        v1: &[f32],
        v2: &[f32],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<()> {
        self.begin()?;
        let a = self.g.input(shape, v1);
        let b = self.g.input(shape, v2);
        self.forward_backward_inputs(a, b, sc)
    }

    /// The same from u8 crops (B, S, S, 3) of both views and their parameters: the photometric
    /// half of the augmentation runs on the device.
    pub fn queue_forward_backward_crops(
        &mut self,
        crops: [&CropBuf; 2],
        params: [&[AugParams]; 2],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<()> {
        self.begin()?;
        let (a, b) = B::input_crops(&mut self.g, &mut self.aug, crops, params, shape)?;
        self.forward_backward_inputs(a, b, sc)
    }

    /// Forgets the last step's end: the next step's time runs from its own start (after a pause
    /// such as the kNN monitor and a checkpoint).
    pub fn restart_step_clock(&mut self) {
        self.spare_marks.extend(self.last_end.take());
    }

    /// The oldest queued loss (waits for it), and the step's milliseconds on the device: from
    /// the end of the step read before it (or from its own start after a restart of the clock)
    /// to its end.
    pub fn take_loss(&mut self) -> Result<(f32, f64)> {
        let q = self
            .queued
            .pop_front()
            .ok_or_else(|| Error::Other("take_loss: no step is queued".into()))?;
        let dev = &self.g.dev;
        let loss = dev.read_loss(&q.loss)?;
        self.spare.push(q.loss);
        if !loss.is_finite() && self.nan_guard {
            return Err(Error::NonFinite(format!("the loss is {loss}")));
        }
        if let (Some(h), Some((_, lars))) = (q.health, &self.lars) {
            let flags = dev.read_health(lars, &h)?;
            self.spare_health.push(h);
            let names = &self.g.store.table.entries;
            let first = |bit: u8| {
                flags
                    .iter()
                    .position(|f| f & bit != 0)
                    .map(|i| &names[i].name)
            };
            if let Some(n) = first(2) {
                return Err(Error::NonFinite(format!(
                    "the gradient of {n} is not finite (NaN or infinite); the loss was {loss}"
                )));
            }
            if let Some(n) = first(1) {
                return Err(Error::NonFinite(format!(
                    "{n} became NaN or infinite in the update (finite gradients, loss {loss})"
                )));
            }
        }
        let Some(end) = q.end else {
            // No update followed (a check): no step time.
            self.spare_marks.extend(q.start);
            return Ok((loss, 0.0));
        };
        let ms = match q.start.as_ref().or(self.last_end.as_ref()) {
            Some(s) => dev.elapsed_ms(s, &end)?,
            None => 0.0,
        };
        self.spare_marks.extend(q.start);
        self.spare_marks.extend(self.last_end.replace(end));
        Ok((loss, ms))
    }

    /// A point on the device's timeline now.
    fn mark(&mut self) -> Result<B::Mark> {
        let reuse = self.spare_marks.pop();
        self.g.dev.mark(reuse)
    }

    fn begin(&mut self) -> Result<()> {
        // The step's start, where no queued or read step's end stands before it.
        let start = if self.last_end.is_none() && self.queued.is_empty() {
            Some(self.mark()?)
        } else {
            None
        };
        let unused = std::mem::replace(&mut self.start, start);
        self.spare_marks.extend(unused);
        self.g.reset();
        self.g.set_recording(true);
        self.tg.set_recording(false);
        if let Some(hook) = &mut self.buffer_hook {
            let (_, _, online) = B::f_side(&mut self.g.store, &mut self.g.w);
            let (_, _, target) = B::f_side(&mut self.tg.store, &mut self.tg.w);
            hook(&self.g.dev, online, target)?;
        }
        if self.keep_buffers {
            let dev = self.g.dev.clone();
            let counters = self.g.store.counters.clone();
            let (_, _, online) = B::f_side(&mut self.g.store, &mut self.g.w);
            let n = B::len(online);
            let mut saved = match self.saved_buffers.take() {
                Some((b, _)) if B::len(&b) == n => b,
                _ => dev.alloc::<f32>(n)?,
            };
            dev.copy(&B::view(online, 0..n), &mut B::view_mut(&mut saved, 0..n))?;
            self.saved_buffers = Some((saved, counters));
        }
        Ok(())
    }

    /// online(v1), online(v2) in train mode; target(v1), target(v2) without gradient; the loss;
    /// backward (the gradients in the online graph); the loss queued to the host.
    fn forward_backward_inputs(&mut self, a: Tensor, b: Tensor, sc: &StepConfig) -> Result<()> {
        let (online_mode, target_mode) = sc.bn_modes();
        let (tg, target) = (&mut self.tg, &self.target);
        let mut run_target = |v: Tensor, og: &mut Graph<B>| {
            tg.reset();
            let x = tg.input_from(og, v);
            let (z, o) = target.forward(tg, x, target_mode);
            (og.input_from(tg, z), og.input_from(tg, o))
        };
        let loss = self
            .online
            .loss(&mut self.g, a, b, online_mode, &mut run_target);
        self.tg.check()?;
        self.g.backward(loss)?;
        if let Some(hook) = &mut self.grad_hook {
            let (_, grads, _) = B::f_side(&mut self.g.store, &mut self.g.w);
            hook(&self.g.dev, grads)?;
        }
        if let Some(r) = self.poison.take() {
            let (_, grads, _) = B::f_side(&mut self.g.store, &mut self.g.w);
            let nan = vec![f32::NAN; r.len()];
            self.g.dev.upload_f(&nan, &mut B::view_mut(grads, r))?;
        }
        if let Some(hook) = &mut self.loss_hook {
            self.g.with_f_mut(loss, |dev, v| hook(dev, v))?;
        }
        let loss = B::queue_loss(&self.g, loss, self.spare.pop())?;
        let start = self.start.take();
        self.queued.push_back(Queued {
            loss,
            start,
            end: None,
            health: None,
        });
        Ok(())
    }

    /// The LARS step over the online parameters, then the EMA of the target (parameters, and for
    /// EMAN the BN running statistics with num_batches_tracked copied).
    pub fn update(&mut self, sc: &StepConfig) -> Result<()> {
        self.ensure_lars(sc.exclude)?;
        let dev = &self.g.dev;
        let lars = &mut self.lars.as_mut().unwrap().1;
        let (params, grads, buffers) = B::f_side(&mut self.g.store, &mut self.g.w);
        dev.lars_step(lars, params, grads, &mut self.momentum, &sc.lars)?;
        let (tparams, _, tbuffers) = B::f_side(&mut self.tg.store, &mut self.tg.w);
        dev.ema(tparams, params, sc.ema_m)?;
        if sc.method == Method::LewelBEman {
            dev.ema(tbuffers, buffers, sc.ema_m)?;
            let nc = self.online_counters;
            let (t, s) = (&mut self.tg.store.counters, &self.g.store.counters);
            for (tc, oc) in t.iter_mut().zip(&s[..nc]) {
                tc.1 = oc.1;
            }
        }
        let health = if self.nan_guard {
            let (params, grads, _) = B::f_side(&mut self.g.store, &mut self.g.w);
            Some(dev.queue_health(lars, params, grads, self.spare_health.pop())?)
        } else {
            None
        };
        dev.refresh(&mut self.g.store, &mut self.g.w)?;
        self.tg.dev.refresh(&mut self.tg.store, &mut self.tg.w)?;
        // The step ends here, for its time (`take_loss`).
        let end = self.mark()?;
        match self.queued.back_mut() {
            Some(q) => {
                self.spare_marks.extend(q.end.replace(end));
                self.spare_health
                    .extend(std::mem::replace(&mut q.health, health));
            }
            None => self.spare_marks.push(end),
        }
        Ok(())
    }

    /// The LARS state for `rule`: the exclusion flags depend only on the names and the rule, so
    /// they are computed once per rule.
    fn ensure_lars(&mut self, rule: ExcludeRule) -> Result<()> {
        if self.lars.as_ref().is_none_or(|(r, _)| *r != rule) {
            let t = &self.g.store.table;
            let flags = t
                .entries
                .iter()
                .map(|e| optim::lars_excluded(&e.name, rule))
                .collect();
            self.lars = Some((rule, self.g.dev.lars_new(t, flags)?));
        }
        Ok(())
    }

    /// Test hook: the next step's gradient of the online tensor `name` gets a NaN (its last
    /// element), as a numerical blow-up would leave it.
    pub fn poison_gradient(&mut self, name: &str) -> Result<()> {
        let e = self
            .g
            .store
            .table
            .entries
            .iter()
            .find(|e| e.name == name)
            .ok_or_else(|| Error::user(format!("no online tensor {name}")))?;
        let r = e.range();
        self.poison = Some(r.end - 1..r.end);
        Ok(())
    }

    /// `--on-nan skip`, between a step's backward and its update (waits for the step): when its
    /// loss or a gradient is NaN or infinite, the step is undone (the online BN statistics and
    /// counters as before its forward, no update, its loss dropped) and the reason returned.
    /// Needs `keep_buffers`.
    pub fn skip_if_non_finite(&mut self, sc: &StepConfig) -> Result<Option<String>> {
        let q = self
            .queued
            .back()
            .ok_or_else(|| Error::Other("skip_if_non_finite: no step is queued".into()))?;
        let dev = self.g.dev.clone();
        let loss = dev.read_loss(&q.loss)?;
        let why = if !loss.is_finite() {
            Some(format!("the loss is {loss}"))
        } else {
            self.ensure_lars(sc.exclude)?;
            let lars = &mut self.lars.as_mut().unwrap().1;
            let (params, grads, _) = B::f_side(&mut self.g.store, &mut self.g.w);
            let h = dev.queue_health(lars, params, grads, self.spare_health.pop())?;
            let flags = dev.read_health(lars, &h)?;
            self.spare_health.push(h);
            flags.iter().position(|f| f & 2 != 0).map(|i| {
                format!(
                    "the gradient of {} is not finite (NaN or infinite)",
                    self.g.store.table.entries[i].name
                )
            })
        };
        if why.is_some() {
            let (saved, counters) = self
                .saved_buffers
                .as_ref()
                .ok_or_else(|| Error::Other("skip_if_non_finite: keep_buffers is off".into()))?;
            let (_, _, online) = B::f_side(&mut self.g.store, &mut self.g.w);
            let n = B::len(saved);
            dev.copy(&B::view(saved, 0..n), &mut B::view_mut(online, 0..n))?;
            self.g.store.counters = counters.clone();
            dev.refresh(&mut self.g.store, &mut self.g.w)?;
            let q = self.queued.pop_back().expect("checked above");
            self.spare.push(q.loss);
            self.spare_marks.extend(q.start);
            self.spare_marks.extend(q.end);
        }
        Ok(why)
    }

    /// The state on the host: the stores themselves on the CPU, downloaded copies elsewhere.
    pub fn host(&mut self) -> Result<HostView<'_>> {
        let (co, ct, cm) = &mut self.host_cache;
        let dev = &self.g.dev;
        Ok(HostView {
            online: dev.host_store(&self.g.store, &self.g.w, co)?,
            target: dev.host_store(&self.tg.store, &self.tg.w, ct)?,
            momentum: dev.host_vec(&self.momentum, cm)?,
        })
    }

    /// Pooled online backbone features (eval mode) of images (B, H, W, 3), not normalized.
    pub fn features(&mut self, x: &[f32], shape: Shape) -> Result<Vec<f32>> {
        self.g.set_recording(false);
        self.g.reset();
        let x = self.g.input(shape, x);
        let f = self
            .online
            .encoder
            .backbone
            .forward(&mut self.g, x, BnMode::Eval);
        let p = self.g.avgpool(f);
        let out = self.g.fetch(p);
        self.g.set_recording(true);
        self.g.check()?;
        out
    }
}

// ----------------------------------------------------------------------------
// `lewel step`: one iteration from files

/// NCHW (B, C, H, W) -> NHWC.
pub fn nchw_to_nhwc(v: &[f32], b: usize, c: usize, h: usize, w: usize) -> Vec<f32> {
    let mut out = vec![0.0; v.len()];
    for n in 0..b {
        for ch in 0..c {
            for y in 0..h {
                for x in 0..w {
                    out[((n * h + y) * w + x) * c + ch] = v[((n * c + ch) * h + y) * w + x];
                }
            }
        }
    }
    out
}

/// Reads `view1` and `view2` (float32 NCHW (B, 3, H, W), already normalized) as NHWC.
fn read_views(path: &std::path::Path) -> Result<(Vec<f32>, Vec<f32>, Shape)> {
    let t = checkpoint::read_file(path)?;
    let what = path.display();
    let get = |n: &str| -> Result<(Vec<usize>, Vec<f32>)> {
        let o = t.get(n).ok_or_else(|| {
            Error::user(format!(
                "{what}: no tensor '{n}' (expected view1 and view2)"
            ))
        })?;
        let v = o
            .to_f32()
            .ok_or_else(|| Error::user(format!("{what}: {n} is {:?}, expected F32", o.dtype)))?;
        if o.shape.len() != 4
            || o.shape[1] != 3
            || o.shape[0] < 2
            || o.shape[2] < 32
            || o.shape[3] < 32
        {
            return Err(Error::user(format!(
                "{what}: {n} has shape {:?}, expected (B >= 2, 3, H >= 32, W >= 32)",
                o.shape
            )));
        }
        Ok((o.shape.clone(), v))
    };
    let (s1, v1) = get("view1")?;
    let (s2, v2) = get("view2")?;
    if s1 != s2 {
        return Err(Error::user(format!(
            "{what}: view1 {s1:?} and view2 {s2:?} differ in shape"
        )));
    }
    let (b, h, w) = (s1[0], s1[2], s1[3]);
    Ok((
        nchw_to_nhwc(&v1, b, 3, h, w),
        nchw_to_nhwc(&v2, b, 3, h, w),
        Shape::new(&[b, h, w, 3]),
    ))
}

/// `lewel step`: loads the full state (official names, PyTorch layouts, optional `momentum.<name>`
/// LARS buffers), runs exactly one iteration on the views and writes `loss`, `grad.<name>` for every
/// trainable parameter (before the update) and `state.<name>` for every entry of the state after the
/// LARS step and the EMA update, plus `state.momentum.<name>`.
pub fn step_files(
    state: &std::path::Path,
    views: &std::path::Path,
    out: &std::path::Path,
    sc: &StepConfig,
    heads: usize,
    scale: f32,
    loss_weight: f64,
) -> Result<f32> {
    let t = checkpoint::read_file(state)?;
    let what = state.display().to_string();
    let cfg = LewelConfig::infer(&t, heads, scale, loss_weight, &what)?;
    let (v1, v2, shape) = read_views(views)?;
    let mut m = Lewel::new(cfg, 0);
    checkpoint::load_store(&mut m.g.store, &t, &what)?;
    checkpoint::load_store(&mut m.tg.store, &t, &what)?;
    let known: std::collections::HashSet<&str> =
        m.g.store
            .table
            .entries
            .iter()
            .chain(&m.g.store.buffer_table.entries)
            .chain(&m.tg.store.table.entries)
            .chain(&m.tg.store.buffer_table.entries)
            .map(|e| e.name.as_str())
            .chain(
                m.g.store
                    .counters
                    .iter()
                    .chain(&m.tg.store.counters)
                    .map(|c| c.0.as_str()),
            )
            .collect();
    for (n, o) in &t {
        match n.strip_prefix("momentum.") {
            Some(p) => {
                let i = m.g.store.table.find(p).ok_or_else(|| {
                    Error::user(format!("{what}: {n} names no trainable parameter"))
                })?;
                let e = &m.g.store.table.entries[i];
                if o.shape != checkpoint::torch_shape(e.shape) || o.dtype != safetensors::Dtype::F32
                {
                    return Err(Error::user(format!(
                        "{what}: {n} is {:?} {:?}, expected F32 {:?}",
                        o.dtype,
                        o.shape,
                        checkpoint::torch_shape(e.shape)
                    )));
                }
                let r = e.range();
                let v = checkpoint::from_torch(e.shape, &o.to_f32().unwrap());
                m.momentum[r].copy_from_slice(&v);
            }
            None if !known.contains(n.as_str()) => {
                return Err(Error::user(format!(
                    "{what}: unexpected tensor {n} for a {} LEWEL state",
                    cfg.arch.name()
                )));
            }
            None => {}
        }
    }
    let loss = m.forward_backward(&v1, &v2, shape, sc)?;
    let mut o = Tensors::new();
    o.insert("loss".into(), Owned::f32(vec![], &[loss]));
    for e in &m.g.store.table.entries {
        let (sh, v) = checkpoint::to_torch(e.shape, &m.g.store.grads[e.range()]);
        o.insert(format!("grad.{}", e.name), Owned::f32(sh, &v));
    }
    m.update(sc)?;
    for (n, v) in checkpoint::store_tensors(&m.g.store)
        .into_iter()
        .chain(checkpoint::store_tensors(&m.tg.store))
    {
        o.insert(format!("state.{n}"), v);
    }
    for e in &m.g.store.table.entries {
        let (sh, v) = checkpoint::to_torch(e.shape, &m.momentum[e.range()]);
        o.insert(format!("state.momentum.{}", e.name), Owned::f32(sh, &v));
    }
    checkpoint::write_file_atomic(out, &o, None)?;
    Ok(loss)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::resnet::Arch;

    fn views(seed: u64, b: usize, s: usize) -> (Vec<f32>, Vec<f32>) {
        let mut r = Rng::new(seed);
        let n = b * s * s * 3;
        (
            (0..n).map(|_| r.normal() as f32).collect(),
            (0..n).map(|_| r.normal() as f32).collect(),
        )
    }

    fn sc(method: Method) -> StepConfig {
        StepConfig::recipe(method, 0.3, 0.99)
    }

    #[test]
    fn eman_step_updates_online_and_target() {
        let cfg = LewelConfig::new(Arch::TINY, 4, 1.0, 0.5);
        let mut m = Lewel::new(cfg, 0);
        assert_eq!(
            m.tg.store.params,
            m.g.store.params[..m.online_params].to_vec()
        );
        let (v1, v2) = views(1, 4, 32);
        let sh = Shape::new(&[4, 32, 32, 3]);
        let c = sc(Method::LewelBEman);
        let l0 = m.forward_backward(&v1, &v2, sh, &c).unwrap();
        assert!((l0 - 4.0).abs() < 0.6, "{l0}");
        let before = m.g.store.params.clone();
        let tb = m.tg.store.buffers.clone();
        m.update(&c).unwrap();
        assert_ne!(before, m.g.store.params);
        // EMAN: the target's running stats moved toward the online ones (which two forwards changed).
        assert_ne!(tb, m.tg.store.buffers);
        assert_eq!(
            m.tg.store.counters[0].1, 2,
            "num_batches_tracked copied from online (two views)"
        );
        // LEWEL-B: the target keeps its own buffers (updated by its own train-mode forwards).
        let mut m2 = Lewel::new(cfg, 0);
        let c2 = sc(Method::LewelB);
        m2.forward_backward(&v1, &v2, sh, &c2).unwrap();
        let tb2 = m2.tg.store.buffers.clone();
        m2.update(&c2).unwrap();
        assert_eq!(tb2, m2.tg.store.buffers);
        assert_eq!(
            m2.tg.store.counters[0].1, 2,
            "the target's own two train-mode forwards"
        );
    }

    /// A narrow ResNet-50 LEWEL state and views written to files, as `lewel step` reads them.
    fn state_files(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Lewel) {
        let cfg = LewelConfig::new(Arch { depth: 50, div: 32 }, 4, 1.0, 0.5);
        let m = Lewel::new(cfg, 3);
        let mut t = checkpoint::store_tensors(&m.g.store);
        t.extend(checkpoint::store_tensors(&m.tg.store));
        let sp = dir.join("in.safetensors");
        checkpoint::write_file_atomic(&sp, &t, None).unwrap();
        let (v1, v2) = views(5, 2, 32);
        // NHWC -> NCHW for the file
        let to_nchw = |v: &[f32]| {
            let mut o = vec![0.0; v.len()];
            for n in 0..2 {
                for y in 0..32 {
                    for x in 0..32 {
                        for c in 0..3 {
                            o[((n * 3 + c) * 32 + y) * 32 + x] = v[((n * 32 + y) * 32 + x) * 3 + c];
                        }
                    }
                }
            }
            o
        };
        let mut vt = Tensors::new();
        vt.insert(
            "view1".into(),
            Owned::f32(vec![2, 3, 32, 32], &to_nchw(&v1)),
        );
        vt.insert(
            "view2".into(),
            Owned::f32(vec![2, 3, 32, 32], &to_nchw(&v2)),
        );
        let vp = dir.join("views.safetensors");
        checkpoint::write_file_atomic(&vp, &vt, None).unwrap();
        (sp, vp, m)
    }

    #[test]
    fn step_files_matches_the_in_memory_step() {
        let dir = std::env::temp_dir().join(format!("lewel-step-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sp, vp, mut m) = state_files(&dir);
        let c = sc(Method::LewelBEman);
        let op = dir.join("out.safetensors");
        let loss = step_files(&sp, &vp, &op, &c, 4, 1.0, 0.5).unwrap();
        let out = checkpoint::read_file(&op).unwrap();
        // The same step in memory.
        let (v1, v2) = views(5, 2, 32);
        let l2 = m
            .forward_backward(&v1, &v2, Shape::new(&[2, 32, 32, 3]), &c)
            .unwrap();
        assert_eq!(loss.to_bits(), l2.to_bits());
        let e = m.g.store.table.entries[0].clone();
        let (_, g) = checkpoint::to_torch(e.shape, &m.g.store.grads[e.range()]);
        assert_eq!(out[&format!("grad.{}", e.name)].to_f32().unwrap(), g);
        m.update(&c).unwrap();
        let (_, p) = checkpoint::to_torch(e.shape, &m.g.store.params[e.range()]);
        assert_eq!(out[&format!("state.{}", e.name)].to_f32().unwrap(), p);
        let n_state = out
            .keys()
            .filter(|k| k.starts_with("state.") && !k.starts_with("state.momentum."))
            .count();
        assert_eq!(n_state, checkpoint::read_file(&sp).unwrap().len());
        assert!(out.contains_key("state.target_net.backbone.layer1.0.bn1.num_batches_tracked"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn step_files_bad_input_is_one_clear_line() {
        let dir = std::env::temp_dir().join(format!("lewel-step-bad-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (sp, vp, _) = state_files(&dir);
        let c = sc(Method::LewelBEman);
        let op = dir.join("out.safetensors");
        let missing =
            step_files(&dir.join("nope.safetensors"), &vp, &op, &c, 4, 1.0, 0.5).unwrap_err();
        assert_eq!(missing.exit_code(), 2);
        assert!(
            missing.to_string().contains("nope.safetensors"),
            "{missing}"
        );
        // views passed as the state
        let e = step_files(&vp, &vp, &op, &c, 4, 1.0, 0.5).unwrap_err();
        assert!(e.to_string().contains("not a LEWEL state"), "{e}");
        // heads that do not divide the channels
        let e = step_files(&sp, &vp, &op, &c, 3, 1.0, 0.5).unwrap_err();
        assert!(e.to_string().starts_with("--lewel-num-heads"), "{e}");
        // a state from another architecture: one tensor reshaped
        let mut t = checkpoint::read_file(&sp).unwrap();
        t.insert(
            "online_net.neck.proj_obj.mlp.3.weight".into(),
            Owned::f32(vec![4, 128, 1], &[0.0; 512]),
        );
        let bad = dir.join("bad.safetensors");
        checkpoint::write_file_atomic(&bad, &t, None).unwrap();
        let e = step_files(&bad, &vp, &op, &c, 4, 1.0, 0.5).unwrap_err();
        assert!(e.to_string().contains("online_net.neck.proj_obj.mlp.3.weight is F32 [4, 128, 1], expected F32 [8, 128, 1]"), "{e}");
        // views with the wrong shape
        let mut vt = Tensors::new();
        vt.insert("view1".into(), Owned::f32(vec![2, 1, 32, 32], &[0.0; 2048]));
        vt.insert("view2".into(), Owned::f32(vec![2, 1, 32, 32], &[0.0; 2048]));
        let vb = dir.join("vbad.safetensors");
        checkpoint::write_file_atomic(&vb, &vt, None).unwrap();
        let e = step_files(&sp, &vb, &op, &c, 4, 1.0, 0.5).unwrap_err();
        assert!(
            e.to_string()
                .contains("expected (B >= 2, 3, H >= 32, W >= 32)"),
            "{e}"
        );
        assert!(!op.exists(), "nothing written on failure");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The gradient hook sees the whole flat gradient buffer once per step, after backward, and
    /// what it writes is what the update uses.
    #[test]
    fn the_gradient_hook_runs_after_backward_on_the_flat_buffer() {
        let cfg = LewelConfig::new(Arch::TINY, 4, 1.0, 0.5);
        let (v1, v2) = views(7, 4, 32);
        let sh = Shape::new(&[4, 32, 32, 3]);
        let c = sc(Method::LewelBEman);
        let mut plain = Lewel::new(cfg, 0);
        plain.forward_backward(&v1, &v2, sh, &c).unwrap();
        let mut hooked = Lewel::new(cfg, 0);
        let calls = std::rc::Rc::new(std::cell::Cell::new(0));
        let seen = calls.clone();
        let n = plain.g.store.num_params();
        hooked.grad_hook = Some(Box::new(move |_dev, grads: &mut Vec<f32>| {
            assert_eq!(grads.len(), n, "the whole flat buffer");
            assert!(grads.iter().any(|&g| g != 0.0), "after backward");
            grads.iter_mut().for_each(|g| *g *= 2.0);
            seen.set(seen.get() + 1);
            Ok(())
        }));
        hooked.forward_backward(&v1, &v2, sh, &c).unwrap();
        assert_eq!(calls.get(), 1);
        let doubled: Vec<f32> = plain.g.store.grads.iter().map(|g| g * 2.0).collect();
        assert_eq!(hooked.g.store.grads, doubled);
        hooked.update(&c).unwrap();
        plain.g.store.grads = doubled;
        plain.update(&c).unwrap();
        assert_eq!(hooked.g.store.params, plain.g.store.params);
        // A failing hook fails the step.
        hooked.grad_hook = Some(Box::new(|_, _| {
            Err(Error::Other("all-reduce failed".into()))
        }));
        let e = hooked.forward_backward(&v1, &v2, sh, &c).unwrap_err();
        assert!(e.to_string().contains("all-reduce failed"), "{e}");
    }

    #[test]
    fn parse_methods() {
        assert_eq!("lewel-b".parse::<Method>().unwrap(), Method::LewelB);
        assert_eq!("byol".parse::<Method>().unwrap_err().exit_code(), 2);
    }
}
