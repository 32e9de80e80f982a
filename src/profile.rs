//! `lewel profile`: where a LEWEL training step's time goes, and how far each part is from what the
//! device could do.
//!
//! Runs whole steps (online and target forward, the loss, backward, LARS and the EMA) on random
//! views after a warm-up, with the graphs' profilers on ([`Graph::set_profile`]): every node's
//! forward and backward between two points on the device's timeline (the host's monotonic clock
//! on the CPU; on a GPU CUDA events recorded on the stream around the node's launches, so the step
//! runs as in training, without a synchronization per node), plus the optimizer (LARS + EMA) and
//! the whole step. Tables per node kind (`conv`, `conv backward`, ...) and per node (the graph, the
//! node's index in its forward pass, its kind and its layer), and a line putting the sum of the
//! parts against the measured step. The GPU's timeline also carries an NVTX range per node
//! (`nsys profile lewel profile ...`).
//!
//! Work and roofline: every node's FLOPs and bytes moved, forward and backward apart, come from
//! its shapes ([`node_cost`], the one place that counts them). Before the steps the device's own
//! peaks are measured ([`Peak`]): a GEMM (the linear op's, best of 3: `par_gemm` on the CPU,
//! cuBLAS on a GPU) and a large copy (best of 3, bytes read + written). Each row then shows its
//! GFLOP and GB per step, the achieved GFLOP/s and GB/s, its bound (compute where its FLOPs take
//! at least as long at the GEMM peak as its bytes at the copy peak, else memory) and its % of
//! roofline (the longer of those two times over the measured time).
//!
//! Layer names: a node with a parameter (conv, linear, batch norm, classifier) is named by its
//! parameter's module, `online_net.backbone.layer1.0.conv2`, `predictor_obj.mlp.0`; one without
//! (pooling, concat, align, loss, ...) after the named node before it: `online_net.backbone.bn1+
//! maxpool`.
//!
//! `--trace FILE` writes Chrome / Perfetto trace events (`chrome://tracing`, ui.perfetto.dev): one
//! complete event ("ph": "X", microseconds) per node per step on its graph's thread (1 online,
//! 2 target, 3 optimizer), with its layer, FLOPs, bytes and bound as args, and one per step on
//! thread 0.
//!
//! [`Graph::set_profile`]: crate::graph::Graph::set_profile

use crate::backend::{Backend, Cpu, Cuda};
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::graph::{Node, NodeTime};
use crate::memory::ParamStore;
use crate::model::lewel::LewelConfig;
use crate::model::resnet::Arch;
use crate::ops::linear::LinearParams;
use crate::rng::Rng;
use crate::tensor::{Shape, Tensor};
use crate::train::{Lewel, Method, StepConfig, TrainBackend, Trainer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;

/// What `lewel profile` runs.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    pub device: DeviceChoice,
    pub arch: Arch,
    pub method: Method,
    pub batch_size: usize,
    pub image_size: usize,
    /// Measured steps.
    pub steps: usize,
    /// Steps run first and not measured (cuDNN's algorithm search, first-touch allocations).
    pub warmup: usize,
    pub seed: u64,
}

impl ProfileConfig {
    /// Bad values, one line each.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::user("--steps: at least 1"));
        }
        if self.batch_size < 2 {
            return Err(Error::user(format!(
                "--batch-size: at least 2 (batch norm), got {}",
                self.batch_size
            )));
        }
        if self.image_size < 32 {
            return Err(Error::user(format!(
                "--image-size: at least 32 (ResNet downsamples 32x), got {}",
                self.image_size
            )));
        }
        Ok(())
    }
}

/// Which thread of the trace a span sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Step = 0,
    Online = 1,
    Target = 2,
    Optimizer = 3,
}

impl Lane {
    pub fn name(self) -> &'static str {
        match self {
            Lane::Step => "step",
            Lane::Online => "online",
            Lane::Target => "target",
            Lane::Optimizer => "optimizer",
        }
    }
}

/// One timed span: a node's forward or backward, the optimizer, or a whole step. Times are
/// nanoseconds since the profile's start.
#[derive(Clone, Debug)]
pub struct Span {
    pub lane: Lane,
    /// The kind: `conv`, `conv backward`, ..., `optimizer (LARS + EMA)`, `step`.
    pub name: &'static str,
    /// The node's index in its graph's forward pass (0 for the optimizer and steps).
    pub index: usize,
    /// The measured step it belongs to, from 0.
    pub step: usize,
    pub start_ns: u64,
    pub dur_ns: u64,
    /// A node's FLOPs and bytes ([`node_cost`]); None for the optimizer and the steps.
    pub cost: Option<Cost>,
}

/// A finished profile.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The device in words (`cpu`, or the GPU with its precision).
    pub device: String,
    /// Whether node times are CUDA events (a GPU) rather than the host's clock.
    pub events: bool,
    pub cfg: ProfileConfig,
    /// The device's peaks, measured before the steps.
    pub peak: Peak,
    pub spans: Vec<Span>,
    /// Each node's layer by (graph, index in its forward pass).
    pub layers: BTreeMap<(Lane, usize), String>,
}

/// A row of a table: a kind or a node, its time, work and count over all measured steps.
#[derive(Clone, Debug)]
pub struct Row {
    pub lane: Lane,
    pub name: &'static str,
    pub index: Option<usize>,
    /// A node row's layer.
    pub layer: Option<String>,
    pub total_ns: u64,
    pub count: usize,
    /// FLOPs and bytes over all measured steps; None for the optimizer (not a graph node).
    pub cost: Option<Cost>,
}

const OPTIMIZER: &str = "optimizer (LARS + EMA)";

/// Opens the device, measures its peaks and runs the profile.
pub fn run(cfg: &ProfileConfig) -> Result<(Profile, Option<String>)> {
    run_with(cfg, None)
}

/// [`run`] with the peaks given (tests) instead of measured.
fn run_with(cfg: &ProfileConfig, peak: Option<Peak>) -> Result<(Profile, Option<String>)> {
    cfg.validate()?;
    let lc = LewelConfig::new(cfg.arch, 4, 1.0, 0.5);
    let m = Lewel::new(lc, cfg.seed);
    let (gpu, bf16) = match open(cfg.device)? {
        (crate::run::Target::Cpu, note) => {
            let peak = match peak {
                Some(p) => p,
                None => cpu_peak()?,
            };
            return Ok((profile(m, "cpu".into(), peak, cfg)?, note));
        }
        (crate::run::Target::Gpu(g, bf16), _) => (g, bf16),
    };
    let name = gpu_words(&gpu, bf16);
    // Out of GPU memory (the model's buffers or a step's activations): one line naming the batch
    // tried and the memory free.
    let oom = |e| crate::run::oom(e, cfg.batch_size);
    let p = if bf16 {
        let dev = Cuda::<half::bf16>::new(gpu);
        let peak = match peak {
            Some(p) => p,
            None => gpu_peak(&dev, "bf16")?,
        };
        profile(m.to_device(dev).map_err(oom)?, name, peak, cfg).map_err(oom)?
    } else {
        let dev = Cuda::<f32>::new(gpu);
        let peak = match peak {
            Some(p) => p,
            None => gpu_peak(&dev, "f32")?,
        };
        profile(m.to_device(dev).map_err(oom)?, name, peak, cfg).map_err(oom)?
    };
    Ok((p, None))
}

/// Opens the device as `lewel pretrain --precision auto` opens it (bf16 from compute capability
/// 8.0): the target, and a note when `auto` fell back to the CPU. Shared with `lewel bench`.
pub(crate) fn open(device: DeviceChoice) -> Result<(crate::run::Target, Option<String>)> {
    let pc = crate::run::PretrainConfig {
        device: match device {
            DeviceChoice::Auto => "auto".into(),
            DeviceChoice::Cpu => "cpu".into(),
            DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        },
        precision: "auto".into(),
        deterministic: false,
        ..Default::default()
    };
    crate::run::open_device(device, &pc)
}

/// A GPU in words, as the first line of `lewel profile` and `lewel bench` shows it.
pub(crate) fn gpu_words(gpu: &crate::gpu::Gpu, bf16: bool) -> String {
    format!(
        "{} (sm_{}{}) cuda:{} {}",
        gpu.name,
        gpu.cc.0,
        gpu.cc.1,
        gpu.ordinal,
        if bf16 { "bf16" } else { "f32" }
    )
}

/// Warm-up, then the measured steps with both graphs' profilers on.
fn profile<B: TrainBackend<F = f32>>(
    mut m: Trainer<B>,
    device: String,
    peak: Peak,
    cfg: &ProfileConfig,
) -> Result<Profile> {
    let events = m.g.dev.has_device_memory();
    let shape = Shape::new(&[cfg.batch_size, cfg.image_size, cfg.image_size, 3]);
    let mut r = Rng::keyed(&[cfg.seed, 0x9f0f]);
    let mut views = || -> Vec<f32> { (0..shape.numel()).map(|_| r.normal() as f32).collect() };
    let (v1, v2) = (views(), views());
    // A small learning rate: the weights stay near their init, so no step meets NaNs or denormals.
    let sc = StepConfig::recipe(cfg.method, 1e-3, 0.99);
    let t0 = Instant::now();
    let ns = |t: Instant| t.saturating_duration_since(t0).as_nanos() as u64;
    let mut spans = Vec::new();
    let mut layers = BTreeMap::new();
    for s in 0..cfg.warmup + cfg.steps {
        let step = s.checked_sub(cfg.warmup);
        m.g.set_profile(step.is_some());
        m.tg.set_profile(step.is_some());
        m.g.dev.sync()?;
        let a = Instant::now();
        m.forward_backward(&v1, &v2, shape, &sc)?;
        m.g.dev.sync()?;
        let u = Instant::now();
        m.update(&sc)?;
        m.g.dev.sync()?;
        let b = Instant::now();
        let Some(step) = step else { continue };
        spans.push(Span {
            lane: Lane::Step,
            name: "step",
            index: 0,
            step,
            start_ns: ns(a),
            dur_ns: ns(b) - ns(a),
            cost: None,
        });
        for (lane, times, store) in [
            (Lane::Online, m.g.take_profile()?, &m.g.store),
            (Lane::Target, m.tg.take_profile()?, &m.tg.store),
        ] {
            for (i, name) in layer_names(&times, store) {
                layers.entry((lane, i)).or_insert(name);
            }
            spans.extend(times.into_iter().map(|t| Span {
                lane,
                name: t.name,
                index: t.index,
                step,
                start_ns: ns(t.start),
                dur_ns: ns(t.start + t.dur) - ns(t.start),
                cost: Some(t.cost),
            }));
        }
        spans.push(Span {
            lane: Lane::Optimizer,
            name: OPTIMIZER,
            index: 0,
            step,
            start_ns: ns(u),
            dur_ns: ns(b) - ns(u),
            cost: None,
        });
    }
    m.g.set_profile(false);
    m.tg.set_profile(false);
    Ok(Profile {
        device,
        events,
        cfg: cfg.clone(),
        peak,
        spans,
        layers,
    })
}

// ----------------------------------------------------------------------------
// Work per node

/// FLOPs and bytes moved of one pass of a node (or a sum of them).
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Cost {
    pub flops: f64,
    pub bytes: f64,
}

impl std::ops::Add for Cost {
    type Output = Cost;
    fn add(self, o: Cost) -> Cost {
        Cost {
            flops: self.flops + o.flops,
            bytes: self.bytes + o.bytes,
        }
    }
}

impl std::ops::AddAssign for Cost {
    fn add_assign(&mut self, o: Cost) {
        *self = *self + o;
    }
}

impl std::iter::Sum for Cost {
    fn sum<I: Iterator<Item = Cost>>(it: I) -> Cost {
        it.fold(Cost::default(), |a, b| a + b)
    }
}

/// What [`node_cost`] needs of the graph: bytes per element of the weights as convolutions and
/// GEMMs read them (the compute dtype: 4 on the CPU and in f32, 2 in bf16) and of `F` (parameters,
/// statistics, losses), and for each tensor its bytes per element (its slot's kind) and whether
/// it takes a gradient.
pub struct Sizes<'a> {
    pub weight: usize,
    pub f: usize,
    pub tensor: &'a dyn Fn(Tensor) -> (usize, bool),
}

/// [forward, backward] FLOPs and bytes of a node, from its shapes. Bytes are the least traffic of
/// the op as defined: every input read once and every output written once, a gradient that the
/// op adds into (`+=`, as every backward does, ops/mod.rs) read and written; a GEMM moves its A,
/// B and C (C twice where it accumulates), whatever its tiling rereads. Exceptions where the math
/// needs two passes: train-mode batch norm reads x twice forward (statistics, then the affine
/// map) and x, dy (and y through a fused ReLU) twice backward. Scratch the implementations keep
/// for themselves is not counted. FLOPs: 2 per multiply-add of the GEMM-like ops (conv: 2 N Ho Wo
/// Cout kh kw Cin per product; backward the weight gradient and, where the input takes a
/// gradient, the data gradient: twice the forward, once for a network's first conv), a small
/// count per element for the others (noted at each).
pub fn node_cost(n: &Node, s: &Sizes) -> [Cost; 2] {
    let c = |flops: f64, bytes: f64| Cost { flops, bytes };
    // A tensor's element count, its bytes, whether it takes a gradient.
    let el = |t: Tensor| t.numel() as f64;
    let by = |t: Tensor| el(t) * (s.tensor)(t).0 as f64;
    let ng = |t: Tensor| (s.tensor)(t).1;
    let (wb, fb) = (s.weight as f64, s.f as f64);
    let on = |b: bool| b as u8 as f64;
    match *n {
        // y = x * w: one GEMM (M = N Ho Wo, K = kh kw Cin, N = Cout); backward dw += x^T dy and,
        // where x takes one, dx += dy w.
        Node::Conv { x, y, p, .. } => {
            let (m, k, o) = (
                p.n as f64 * p.h_out as f64 * p.w_out as f64,
                p.kh as f64 * p.kw as f64 * p.c_in as f64,
                p.c_out as f64,
            );
            let (gemm, w) = (2.0 * m * k * o, k * o * wb);
            let dw = c(gemm, by(x) + by(y) + 2.0 * w);
            let dx = c(gemm, by(y) + w + 2.0 * by(x));
            [
                c(gemm, by(x) + w + by(y)),
                dw + if ng(x) { dx } else { Cost::default() },
            ]
        }
        Node::Linear { x, y, p, .. } => {
            let (r, i, o) = (p.rows as f64, p.c_in as f64, p.c_out as f64);
            let (gemm, w) = (2.0 * r * i * o, i * o * wb);
            let dw = c(gemm, by(x) + by(y) + 2.0 * w);
            let dx = c(gemm, by(y) + w + 2.0 * by(x));
            [
                c(gemm, by(x) + w + by(y)),
                dw + if ng(x) { dx } else { Cost::default() },
            ]
        }
        // Train forward: the statistics (sum and sum of squares, 3 per element) then
        // y = x * a + b (2), + res (1), relu (1). Eval: the affine map alone. Backward (train):
        // the sums of dy and dy * xhat (5 per element), then dx (7), relu's mask and dres (1
        // each); eval: one pass (5). Per channel: gamma, beta, running statistics, saved mean and
        // rstd in F.
        Node::Bn {
            x,
            y,
            res,
            relu,
            p,
            train,
            ..
        } => {
            let (e, ch) = (el(x), p.c as f64);
            let groups = if train { p.groups() as f64 } else { 1.0 };
            let (xb, yb) = (by(x), by(y));
            let rb = res.map_or(0.0, by);
            let dres = res.filter(|&r| ng(r)).map_or(0.0, by);
            let post = on(res.is_some()) + on(relu);
            let fwd = if train {
                c(
                    e * (5.0 + post),
                    2.0 * xb + yb + rb + fb * ch * (2.0 + 4.0 + 2.0 * groups),
                )
            } else {
                c(e * (2.0 + post), xb + yb + rb + fb * ch * 6.0)
            };
            let (passes, per) = if train { (2.0, 12.0) } else { (1.0, 5.0) };
            let bwd = c(
                e * (per + on(relu) + on(dres > 0.0)),
                passes * (xb + yb + on(relu) * yb)
                    + 2.0 * xb
                    + 2.0 * dres
                    + fb * ch * (1.0 + 4.0 + 2.0 * groups),
            );
            [fwd, bwd]
        }
        // k * k comparisons per output, the argmax written; backward: one add per output.
        Node::MaxPool { x, argmax, p, y } => {
            let kk = p.k as f64 * p.k as f64;
            [
                c(el(y) * kk, by(x) + by(y) + by(argmax)),
                match ng(x) {
                    true => c(el(y), by(y) + by(argmax) + 2.0 * by(x)),
                    false => Cost::default(),
                },
            ]
        }
        // One add per input element each way.
        Node::AvgPool { x, y, .. } => [
            c(el(x), by(x) + by(y)),
            match ng(x) {
                true => c(el(x), by(y) + 2.0 * by(x)),
                false => Cost::default(),
            },
        ],
        // Block copies; backward adds du into both inputs' gradients (a constant's into scratch).
        Node::Concat { g, x, u, .. } => [
            c(0.0, by(g) + by(x) + by(u)),
            c(el(u), by(u) + 2.0 * (by(g) + by(x))),
        ],
        Node::Split { z, zg, a, .. } => [
            c(0.0, by(z) + by(zg) + by(a)),
            match ng(z) {
                true => c(el(z), by(zg) + by(a) + 2.0 * by(z)),
                false => Cost::default(),
            },
        ],
        // Row L2 norm (3 per element) and softmax over positions (5); backward about 10.
        Node::Align { x, y, .. } => [
            c(8.0 * el(x), by(x) + by(y)),
            match ng(x) {
                true => c(10.0 * el(x), by(x) + 2.0 * by(y) + 2.0 * by(x)),
                false => Cost::default(),
            },
        ],
        // Per sample and head a GEMM (K, L) x (L, C/heads): 2 B L C K in all, K = D / heads;
        // backward two more (both gradients are always written).
        Node::Aggregate { x, w, v, p } => {
            let gemm = 2.0 * p.b as f64 * p.l as f64 * p.c as f64 * (p.d as f64 / p.heads as f64);
            [
                c(gemm, by(x) + by(w) + by(v)),
                c(gemm, by(w) + by(v) + 2.0 * by(x)) + c(gemm, by(x) + by(v) + 2.0 * by(w)),
            ]
        }
        // Three dot products per row (6 per element), the cosines and the loss in F; backward 8.
        Node::Loss {
            pred, target, p, ..
        } => [
            c(
                6.0 * el(pred),
                by(pred) + by(target) + fb * (p.n as f64 + 1.0),
            ),
            match ng(pred) {
                true => c(8.0 * el(pred), 3.0 * by(pred) + by(target) + fb),
                false => Cost::default(),
            },
        ],
        Node::Scale { x, y, .. } => [
            c(el(x), by(x) + by(y)),
            match ng(x) {
                true => c(2.0 * el(x), by(y) + 2.0 * by(x)),
                false => Cost::default(),
            },
        ],
        Node::Add { a, b, y } => {
            let back = |t: Tensor| match ng(t) {
                true => c(el(t), by(y) + 2.0 * by(t)),
                false => Cost::default(),
            };
            [c(el(y), by(a) + by(b) + by(y)), back(a) + back(b)]
        }
        // Bias, max, exp, sum per logit (5); logsumexp and cross-entropy per row and head in F;
        // backward the softmax minus the one-hot (5), the bias gradient summed over rows.
        Node::Xent {
            logits, labels, p, ..
        } => {
            let (rows, heads, classes) = (p.rows as f64, p.heads as f64, p.classes as f64);
            let bias = heads * classes * fb;
            [
                c(
                    5.0 * el(logits),
                    by(logits) + bias + by(labels) + fb * (2.0 * rows * heads + heads + 1.0),
                ),
                match ng(logits) {
                    true => c(
                        5.0 * el(logits),
                        3.0 * by(logits) + 3.0 * bias + by(labels) + fb * (rows * heads + 1.0),
                    ),
                    false => Cost::default(),
                },
            ]
        }
    }
}

/// The module a parameter belongs to: its name without the last part (`.weight`, `.bias`).
fn module_of(param: &str) -> &str {
    param.rsplit_once('.').map_or(param, |(m, _)| m)
}

/// Names the nodes of one forward pass (times in their order) by layer: (index, name) of each
/// forward, from the parameters' names in `store`.
fn layer_names<F>(times: &[NodeTime], store: &ParamStore<F>) -> Vec<(usize, String)> {
    let mut prev: Option<&str> = None;
    let mut out = Vec::new();
    for t in times.iter().filter(|t| !t.backward) {
        let name = match t.param {
            Some(p) => {
                let m = module_of(&store.table.entries[p.0].name);
                prev = Some(m);
                m.to_string()
            }
            None => match prev {
                Some(m) => format!("{m}+{}", t.name),
                None => t.name.to_string(),
            },
        };
        out.push((t.index, name));
    }
    out
}

// ----------------------------------------------------------------------------
// The device's peaks

/// The device's own peaks, measured at the start of a profile.
#[derive(Clone, Debug)]
pub struct Peak {
    /// FLOP/s of the GEMM.
    pub flops: f64,
    /// The GEMM measured (`sgemm 1024^3`).
    pub gemm: String,
    /// Bytes per second of the copy, read + written.
    pub bw: f64,
    /// The copy measured (`copy 256 MiB`).
    pub copy: String,
}

/// Where a row stands against the peaks.
#[derive(Clone, Copy, Debug)]
pub struct Roof {
    pub gflop_s: f64,
    pub gb_s: f64,
    /// `compute` or `memory`.
    pub bound: &'static str,
    /// max(FLOPs / peak FLOP/s, bytes / peak bandwidth) over the measured time, in percent.
    pub pct: f64,
    /// That max, in nanoseconds: the row's floor at the peaks.
    pub floor_ns: f64,
}

impl Peak {
    /// `c` done in `ns` nanoseconds against the peaks.
    pub fn roof(&self, c: Cost, ns: u64) -> Roof {
        let s = (ns as f64 / 1e9).max(1e-12);
        let (tc, tm) = (c.flops / self.flops, c.bytes / self.bw);
        Roof {
            gflop_s: c.flops / s / 1e9,
            gb_s: c.bytes / s / 1e9,
            bound: if tc >= tm { "compute" } else { "memory" },
            pct: 100.0 * tc.max(tm) / s,
            floor_ns: tc.max(tm) * 1e9,
        }
    }

    /// The header's line.
    pub fn words(&self) -> String {
        format!(
            "peak: {:.1} GFLOP/s ({}), {:.1} GB/s ({}, read + write)",
            self.flops / 1e9,
            self.gemm,
            self.bw / 1e9,
            self.copy
        )
    }
}

/// The GEMM grows from 256^3 by doubling until one takes 20 ms or it reaches this side (a CPU's
/// at 1024^3; the software GPU's stays small).
const GEMM_MAX_CPU: usize = 1024;
const GEMM_MAX_GPU: usize = 8192;
/// Bytes of the copy's source (as many again written).
const COPY_BYTES: usize = 256 << 20;
/// The smallest copy the bandwidth peak is measured with.
const MIN_COPY_BYTES: usize = 8 << 20;

/// Seconds of `f`, best of 3, from a synchronized device to a synchronized device (the device's
/// own clock: CUDA events on a GPU).
fn best_of_3<B: TrainBackend>(dev: &B, mut f: impl FnMut() -> Result<()>) -> Result<f64> {
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        dev.sync()?;
        let a = dev.mark(None)?;
        f()?;
        let b = dev.mark(None)?;
        dev.sync()?;
        best = best.min(dev.elapsed_ms(&a, &b)? / 1e3);
    }
    Ok(best.max(1e-9))
}

/// Measures `dev`'s peaks: the linear op's GEMM (n x n x n, `gemm` names it, `{gemm} n^3`) and
/// `copy` of [`COPY_BYTES`] between two buffers of activations.
fn measure_peak<B: TrainBackend>(
    dev: &B,
    gemm: &str,
    max_n: usize,
    copy: impl Fn(&B, &B::Buf<B::E>, &mut B::Buf<B::E>) -> Result<()>,
) -> Result<Peak> {
    let (mut n, mut best) = (256, None);
    loop {
        let len = n * n;
        // Values that are neither zero nor denormal (some GPUs run zeros faster).
        let host: Vec<f32> = (0..len)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        let bufs = (|| -> Result<_> {
            let (mut x, mut w) = (dev.alloc::<B::E>(len)?, dev.alloc::<B::E>(len)?);
            dev.upload_e(&host, &mut B::view_mut(&mut x, 0..len))?;
            dev.upload_e(&host, &mut B::view_mut(&mut w, 0..len))?;
            Ok((x, w, dev.alloc::<B::E>(len)?))
        })();
        let (x, w, mut y) = match (bufs, best) {
            (Ok(b), _) => b,
            // Out of memory at a larger size: the last size that fitted.
            (Err(_), Some(_)) => break,
            (Err(e), None) => return Err(e),
        };
        let p = LinearParams::new(n, n, n);
        let s = best_of_3(dev, || {
            dev.linear_forward(
                &p,
                &B::view(&x, 0..len),
                &B::view(&w, 0..len),
                &mut B::view_mut(&mut y, 0..len),
            )
        })?;
        best = Some((n, 2.0 * (n as f64).powi(3) / s));
        if n >= max_n || s >= 0.02 {
            break;
        }
        n *= 2;
    }
    let (n, flops) = best.expect("one size measured");
    // The copy at COPY_BYTES, halved while the device cannot hold two such buffers (a small GPU
    // still gets its peaks; the model's own allocation then says whether the batch fits).
    let mut bytes = COPY_BYTES;
    let (src, dst) = loop {
        let len = bytes / std::mem::size_of::<B::E>();
        match (dev.alloc::<B::E>(len), dev.alloc::<B::E>(len)) {
            (Ok(s), Ok(d)) => break (s, d),
            (Err(e), _) | (_, Err(e)) if bytes <= MIN_COPY_BYTES => return Err(e),
            _ => bytes /= 2,
        }
    };
    let (mut src, mut dst) = (src, dst);
    let len = bytes / std::mem::size_of::<B::E>();
    // Written once first: untouched host pages would read as the shared zero page.
    dev.zero(&mut src, len)?;
    dev.zero(&mut dst, len)?;
    let s = best_of_3(dev, || copy(dev, &src, &mut dst))?;
    Ok(Peak {
        flops,
        gemm: format!("{gemm} {n}^3"),
        bw: 2.0 * bytes as f64 / s,
        copy: format!("copy {} MiB", bytes >> 20),
    })
}

/// The CPU's peaks: `par_gemm` (the linear op's) on every thread, and a copy split over them.
fn cpu_peak() -> Result<Peak> {
    use rayon::prelude::*;
    measure_peak(&Cpu::<f32>::default(), "sgemm", GEMM_MAX_CPU, |_, s, d| {
        const CHUNK: usize = 1 << 18;
        d.par_chunks_mut(CHUNK)
            .zip(s.par_chunks(CHUNK))
            .for_each(|(d, s)| d.copy_from_slice(s));
        Ok(())
    })
}

/// A GPU's peaks: cuBLAS through the linear op in the compute dtype, a device-to-device copy.
fn gpu_peak<E: crate::gpu::GpuFloat>(dev: &Cuda<E>, dtype: &str) -> Result<Peak>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
    Cuda<E>: TrainBackend<E = E>,
{
    measure_peak(
        dev,
        &format!("cuBLAS {dtype} GEMM"),
        GEMM_MAX_GPU,
        |d, s, t| {
            let n = Cuda::<E>::len(s);
            d.copy(&Cuda::<E>::view(s, 0..n), &mut Cuda::<E>::view_mut(t, 0..n))
        },
    )
}

impl Profile {
    /// Nanoseconds over all measured steps: (the steps, the graph nodes, the optimizer).
    pub fn totals(&self) -> (u64, u64, u64) {
        let sum = |f: &dyn Fn(Lane) -> bool| -> u64 {
            self.spans
                .iter()
                .filter(|s| f(s.lane))
                .map(|s| s.dur_ns)
                .sum()
        };
        (
            sum(&|l| l == Lane::Step),
            sum(&|l| l == Lane::Online || l == Lane::Target),
            sum(&|l| l == Lane::Optimizer),
        )
    }

    /// The parts (nodes and optimizer) over the measured step time.
    pub fn coverage(&self) -> f64 {
        let (step, nodes, opt) = self.totals();
        (nodes + opt) as f64 / step.max(1) as f64
    }

    /// The graph nodes' work over all measured steps: (forward, backward).
    pub fn work(&self) -> (Cost, Cost) {
        let sum = |bwd: bool| -> Cost {
            self.spans
                .iter()
                .filter(|s| s.name.ends_with(" backward") == bwd)
                .filter_map(|s| s.cost)
                .sum()
        };
        (sum(false), sum(true))
    }

    /// Rows per kind (`by_node` false) or per node, largest first; the steps themselves are left
    /// out.
    pub fn rows(&self, by_node: bool) -> Vec<Row> {
        // (lane, kind, index) where per node; (None, kind, None) per kind -> (ns, count, cost)
        type Key = (Option<Lane>, &'static str, Option<usize>);
        let mut m: BTreeMap<Key, (u64, usize, Option<Cost>)> = BTreeMap::new();
        for s in self.spans.iter().filter(|s| s.lane != Lane::Step) {
            let key = match by_node {
                true => (
                    Some(s.lane),
                    s.name,
                    (s.lane != Lane::Optimizer).then_some(s.index),
                ),
                false => (None, s.name, None),
            };
            let e = m.entry(key).or_insert((0, 0, Some(Cost::default())));
            e.0 += s.dur_ns;
            e.1 += 1;
            e.2 = e.2.zip(s.cost).map(|(a, b)| a + b);
        }
        let mut rows: Vec<Row> = m
            .into_iter()
            .map(|((lane, name, index), (total_ns, count, cost))| {
                let lane = lane.unwrap_or(Lane::Online);
                Row {
                    lane,
                    name,
                    index,
                    layer: index.and_then(|i| self.layers.get(&(lane, i)).cloned()),
                    total_ns,
                    count,
                    cost,
                }
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.total_ns));
        rows
    }

    fn header(&self) -> String {
        let c = &self.cfg;
        format!(
            "lewel profile | {} | {} {} | batch {} x {} px | {} warm-up + {} measured steps",
            self.device,
            c.arch.name(),
            c.method.name(),
            c.batch_size,
            c.image_size,
            c.warmup,
            c.steps
        )
    }

    /// The numbers of a row after its count: GFLOP and GB per step, GFLOP/s, GB/s, bound,
    /// % of roofline.
    fn work_cells(&self, r: &Row) -> String {
        let n = self.cfg.steps as f64;
        match r.cost {
            Some(c) => {
                let f = self.peak.roof(c, r.total_ns);
                format!(
                    " {:>10.3} {:>8.3} {:>8.1} {:>7.1} {:>7} {:>6.1}",
                    c.flops / n / 1e9,
                    c.bytes / n / 1e9,
                    f.gflop_s,
                    f.gb_s,
                    f.bound,
                    f.pct
                )
            }
            None => format!(
                " {:>10} {:>8} {:>8} {:>7} {:>7} {:>6}",
                "-", "-", "-", "-", "-", "-"
            ),
        }
    }

    /// The human table; `top` node rows at most.
    pub fn table(&self, top: usize) -> String {
        use std::fmt::Write;
        let (step, nodes, opt) = self.totals();
        let n = self.cfg.steps as f64;
        let ms = |ns: u64| ns as f64 / 1e6 / n;
        let steps: Vec<f64> = self
            .spans
            .iter()
            .filter(|s| s.lane == Lane::Step)
            .map(|s| s.dur_ns as f64 / 1e6)
            .collect();
        let min = steps.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = steps.iter().cloned().fold(0.0, f64::max);
        let mut o = String::new();
        let _ = writeln!(o, "{}", self.header());
        let _ = writeln!(o, "{}", self.peak.words());
        if self.events {
            let _ = writeln!(
                o,
                "GPU times: CUDA events recorded on the stream around every node (no synchronization inside a step but one per graph at its first node)"
            );
        }
        let _ = writeln!(
            o,
            "step {:.3} ms (mean of {}; min {min:.3}, max {max:.3})",
            ms(step),
            self.cfg.steps
        );
        let _ = writeln!(
            o,
            "per-node sum {:.3} ms + optimizer {:.3} ms = {:.3} ms per step: {:.1}% of the measured step (graph nodes alone {:.1}%; the rest: input copies, gradient zeroing, the clock)",
            ms(nodes),
            ms(opt),
            ms(nodes + opt),
            100.0 * self.coverage(),
            100.0 * nodes as f64 / step.max(1) as f64
        );
        let (fwd, bwd) = self.work();
        let node_rows = self.rows(true);
        let floor: f64 = node_rows
            .iter()
            .filter_map(|r| r.cost.map(|c| self.peak.roof(c, r.total_ns).floor_ns))
            .sum();
        let _ = writeln!(
            o,
            "graph nodes per step: {:.3} GFLOP (forward {:.3}, backward {:.3}) and {:.3} GB moved, {:.1} GFLOP/s and {:.1} GB/s achieved; their roofline floor at the peaks {:.3} ms = {:.1}% of their time",
            (fwd.flops + bwd.flops) / n / 1e9,
            fwd.flops / n / 1e9,
            bwd.flops / n / 1e9,
            (fwd.bytes + bwd.bytes) / n / 1e9,
            (fwd.flops + bwd.flops) / (nodes.max(1) as f64),
            (fwd.bytes + bwd.bytes) / (nodes.max(1) as f64),
            floor / 1e6 / n,
            100.0 * floor / nodes.max(1) as f64
        );
        let share = |ns: u64| 100.0 * ns as f64 / step.max(1) as f64;
        let cols = format!(
            "{:>10} {:>10} {:>7} {:>7} {:>10} {:>8} {:>8} {:>7} {:>7} {:>6}",
            "total ms",
            "ms/step",
            "share",
            "count",
            "GFLOP/step",
            "GB/step",
            "GFLOP/s",
            "GB/s",
            "bound",
            "roof%"
        );
        let _ = writeln!(o, "\n{:<28} {cols}", "kind");
        for r in self.rows(false) {
            let _ = writeln!(
                o,
                "{:<28} {:>10.3} {:>10.3} {:>6.1}% {:>7}{}",
                r.name,
                r.total_ns as f64 / 1e6,
                ms(r.total_ns),
                share(r.total_ns),
                r.count,
                self.work_cells(&r)
            );
        }
        let shown = &node_rows[..top.min(node_rows.len())];
        let w = shown
            .iter()
            .map(|r| r.label().len())
            .max()
            .unwrap_or(0)
            .max(4);
        let _ = writeln!(
            o,
            "\n{:<w$} {cols}   (top {} of {} nodes; graph #index = the node's place in its forward pass, then its layer)",
            "node",
            shown.len(),
            node_rows.len()
        );
        for r in shown {
            let _ = writeln!(
                o,
                "{:<w$} {:>10.3} {:>10.3} {:>6.1}% {:>7}{}",
                r.label(),
                r.total_ns as f64 / 1e6,
                ms(r.total_ns),
                share(r.total_ns),
                r.count,
                self.work_cells(r)
            );
        }
        let _ = writeln!(
            o,
            "\nGFLOP and GB per step from the shapes; bound: compute where the FLOPs at the GEMM peak take at least as long as the bytes at the copy peak, else memory; roof%: the longer of the two over the measured time"
        );
        o
    }

    /// A row's work as JSON fields (per step; null for the optimizer).
    fn work_json(&self, r: &Row, v: &mut Value) {
        let n = self.cfg.steps as f64;
        let f = r.cost.map(|c| (c, self.peak.roof(c, r.total_ns)));
        v["flops"] = json!(f.map(|(c, _)| c.flops / n));
        v["bytes"] = json!(f.map(|(c, _)| c.bytes / n));
        v["gflop_per_s"] = json!(f.map(|(_, f)| f.gflop_s));
        v["gb_per_s"] = json!(f.map(|(_, f)| f.gb_s));
        v["bound"] = json!(f.map(|(_, f)| f.bound));
        v["roofline_pct"] = json!(f.map(|(_, f)| f.pct));
    }

    /// The same as JSON: the settings, the peaks, the steps, the sums and every row.
    pub fn json(&self) -> Value {
        let (step, nodes, opt) = self.totals();
        let n = self.cfg.steps as f64;
        let ms = |ns: u64| ns as f64 / 1e6;
        let share = |ns: u64| ns as f64 / step.max(1) as f64;
        let row = |r: &Row| {
            let mut v = json!({
                "kind": r.name,
                "total_ms": ms(r.total_ns),
                "ms_per_step": ms(r.total_ns) / n,
                "share": share(r.total_ns),
                "count": r.count,
            });
            if let Some(i) = r.index {
                v["graph"] = json!(r.lane.name());
                v["index"] = json!(i);
                v["layer"] = json!(r.layer);
            }
            self.work_json(r, &mut v);
            v
        };
        let c = &self.cfg;
        let (fwd, bwd) = self.work();
        json!({
            "device": self.device,
            "gpu_events": self.events,
            "arch": c.arch.name(),
            "method": c.method.name(),
            "batch_size": c.batch_size,
            "image_size": c.image_size,
            "warmup": c.warmup,
            "steps": c.steps,
            "peak": {
                "gflop_per_s": self.peak.flops / 1e9,
                "gemm": self.peak.gemm,
                "gb_per_s": self.peak.bw / 1e9,
                "copy": self.peak.copy,
            },
            "step_ms": self.spans.iter().filter(|s| s.lane == Lane::Step).map(|s| ms(s.dur_ns)).collect::<Vec<_>>(),
            "step_ms_mean": ms(step) / n,
            "nodes_ms_per_step": ms(nodes) / n,
            "optimizer_ms_per_step": ms(opt) / n,
            "coverage": self.coverage(),
            "forward_flops_per_step": fwd.flops / n,
            "backward_flops_per_step": bwd.flops / n,
            "forward_bytes_per_step": fwd.bytes / n,
            "backward_bytes_per_step": bwd.bytes / n,
            "kinds": self.rows(false).iter().map(row).collect::<Vec<_>>(),
            "nodes": self.rows(true).iter().map(row).collect::<Vec<_>>(),
        })
    }

    /// Chrome / Perfetto trace events, microseconds.
    pub fn trace(&self) -> Value {
        let us = |ns: u64| ns as f64 / 1e3;
        let events: Vec<Value> = self
            .spans
            .iter()
            .map(|s| {
                let layer = match s.lane {
                    Lane::Online | Lane::Target => self.layers.get(&(s.lane, s.index)),
                    _ => None,
                };
                let name = match (s.lane, layer) {
                    (Lane::Step, _) => format!("step {}", s.step),
                    (Lane::Optimizer, _) => s.name.to_string(),
                    (_, Some(l)) => format!("{} #{} {l}", s.name, s.index),
                    (_, None) => format!("{} #{}", s.name, s.index),
                };
                let mut args = json!({"step": s.step, "kind": s.name, "index": s.index});
                if let Some(c) = s.cost {
                    let f = self.peak.roof(c, s.dur_ns);
                    args["layer"] = json!(layer);
                    args["flops"] = json!(c.flops);
                    args["bytes"] = json!(c.bytes);
                    args["gflop_per_s"] = json!(f.gflop_s);
                    args["gb_per_s"] = json!(f.gb_s);
                    args["bound"] = json!(f.bound);
                    args["roofline_pct"] = json!(f.pct);
                }
                json!({
                    "name": name,
                    "cat": s.lane.name(),
                    "ph": "X",
                    "ts": us(s.start_ns),
                    "dur": us(s.dur_ns),
                    "pid": 1,
                    "tid": s.lane as u32,
                    "args": args,
                })
            })
            .collect();
        json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }
}

impl Row {
    /// `online #12 conv backward online_net.backbone.layer1.0.conv2`, or the kind alone.
    pub fn label(&self) -> String {
        match (self.index, &self.layer) {
            (Some(i), Some(l)) => format!("{} #{i} {} {l}", self.lane.name(), self.name),
            (Some(i), None) => format!("{} #{i} {}", self.lane.name(), self.name),
            (None, _) => self.name.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn tiny() -> ProfileConfig {
        ProfileConfig {
            device: DeviceChoice::Cpu,
            arch: Arch::TINY,
            method: Method::LewelBEman,
            batch_size: 4,
            image_size: 32,
            steps: 2,
            warmup: 1,
            seed: 0,
        }
    }

    #[test]
    fn profile_covers_the_step_and_every_node_kind() {
        let cfg = tiny();
        let (p, note) = run(&cfg).unwrap();
        assert!(note.is_none());
        let c = p.coverage();
        assert!((0.9..=1.1).contains(&c), "parts / step = {c}");
        // Every kind the step's tapes hold, forward and backward, appears; and only those.
        let mut m = Lewel::new(LewelConfig::new(cfg.arch, 4, 1.0, 0.5), 0);
        let shape = Shape::new(&[4, 32, 32, 3]);
        let v = vec![0.5f32; shape.numel()];
        let sc = StepConfig::recipe(cfg.method, 1e-3, 0.99);
        m.forward_backward(&v, &v, shape, &sc).unwrap();
        let mut want: BTreeSet<&str> = BTreeSet::from([OPTIMIZER]);
        for n in m.g.tape() {
            want.insert(n.name());
            want.insert(n.backward_name());
        }
        let got: BTreeSet<&str> = p.rows(false).iter().map(|r| r.name).collect();
        assert_eq!(got, want);
        for k in [
            "conv",
            "batchnorm",
            "linear",
            "conv backward",
            "batchnorm backward",
        ] {
            assert!(got.contains(k), "{k}");
        }
        // Node rows per step: the same count each step.
        for r in p.rows(true) {
            assert_eq!(r.count % cfg.steps, 0, "{}", r.label());
        }
        let text = p.table(10);
        assert!(text.contains("% of the measured step"), "{text}");
        // The peaks were measured, and every graph node row has work and a bound against them.
        assert!(p.peak.flops > 1e8 && p.peak.bw > 1e8, "{:?}", p.peak);
        assert!(
            text.contains("peak: ") && text.contains("GFLOP/s (sgemm "),
            "{text}"
        );
        let j = p.json();
        assert_eq!(j["kinds"].as_array().unwrap().len(), want.len());
        assert!(j["peak"]["gflop_per_s"].as_f64().unwrap() > 0.1);
        for r in j["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .chain(j["nodes"].as_array().unwrap())
        {
            if r["kind"] == OPTIMIZER {
                assert!(r["flops"].is_null() && r["bound"].is_null(), "{r}");
                continue;
            }
            assert!(r["bytes"].as_f64().unwrap() > 0.0, "{r}");
            assert!(r["flops"].as_f64().unwrap() >= 0.0, "{r}");
            assert!(r["gflop_per_s"].as_f64().is_some() && r["gb_per_s"].as_f64().is_some());
            assert!(r["roofline_pct"].as_f64().unwrap() > 0.0, "{r}");
            assert!(
                ["compute", "memory"].contains(&r["bound"].as_str().unwrap()),
                "{r}"
            );
        }
        let conv = j["kinds"]
            .as_array()
            .unwrap()
            .iter()
            .find(|r| r["kind"] == "conv")
            .unwrap();
        assert!(conv["flops"].as_f64().unwrap() > 1e6, "{conv}");
        // Layer names: every node has one; convs are the backbones'; the heads' by their modules.
        let nodes = p.rows(true);
        for r in nodes.iter().filter(|r| r.index.is_some()) {
            let l = r
                .layer
                .as_deref()
                .unwrap_or_else(|| panic!("{} unnamed", r.label()));
            if r.name.starts_with("conv") {
                assert!(
                    l.starts_with("online_net.backbone.") || l.starts_with("target_net.backbone."),
                    "{}",
                    r.label()
                );
            }
            let prefix = match r.lane {
                Lane::Target => "target_net.",
                _ => "",
            };
            assert!(l.starts_with(prefix), "{}", r.label());
        }
        for l in [
            "online_net.backbone.conv1",
            "online_net.backbone.layer1.0.downsample.0",
            "online_net.backbone.layer4.2.bn3",
            "online_net.neck.proj.mlp.1",
            "predictor_obj.mlp.0",
            "target_net.neck.proj_obj.mlp.3",
            "online_net.backbone.bn1+maxpool",
        ] {
            assert!(nodes.iter().any(|r| r.layer.as_deref() == Some(l)), "{l}");
        }
        let all = p.table(usize::MAX);
        assert!(
            all.contains("online #0 conv online_net.backbone.conv1 "),
            "{all}"
        );
    }

    fn fixed_peak() -> Peak {
        Peak {
            flops: 1e11,
            gemm: "test".into(),
            bw: 1e10,
            copy: "test".into(),
        }
    }

    #[test]
    fn conv_and_linear_cost_the_gemm_formula() {
        use crate::ops::conv::ConvParams;
        let t = |slot: u32, d: &[usize]| Tensor {
            slot,
            shape: Shape::new(d),
        };
        // (N, H, W, Cin) = (2, 9, 9, 3), 4 filters of 3 x 3, stride 2, pad 1 -> (2, 5, 5, 4).
        let p = ConvParams::new(2, 9, 9, 3, 4, 3, 2, 1);
        assert_eq!((p.h_out, p.w_out), (5, 5));
        let (x, y) = (t(0, &[2, 9, 9, 3]), t(1, &[2, 5, 5, 4]));
        let conv = Node::Conv {
            x,
            w: crate::memory::ParamId(0),
            y,
            p,
        };
        let gemm = 2.0 * (2.0 * 5.0 * 5.0) * 4.0 * (3.0 * 3.0 * 3.0);
        let (xn, wn, yn) = (2.0 * 81.0 * 3.0, 4.0 * 27.0, 2.0 * 25.0 * 4.0);
        for (e, x_grad) in [(4, true), (4, false), (2, true)] {
            let tensor = |t: Tensor| (e, t.slot != 0 || x_grad);
            let sz = Sizes {
                weight: e,
                f: 4,
                tensor: &tensor,
            };
            let [f, b] = node_cost(&conv, &sz);
            let e = e as f64;
            assert_eq!(f.flops, gemm);
            assert_eq!(f.bytes, (xn + wn + yn) * e);
            // Backward: the weight gradient, and the data gradient where x takes one.
            let dw = Cost {
                flops: gemm,
                bytes: (xn + yn + 2.0 * wn) * e,
            };
            let dx = Cost {
                flops: gemm,
                bytes: (yn + wn + 2.0 * xn) * e,
            };
            assert_eq!(b, if x_grad { dw + dx } else { dw }, "e {e}, dx {x_grad}");
        }
        // Linear (R, I) -> (R, O) with w (O, I): 2 R I O each product.
        let (x, y) = (t(0, &[3, 2, 5]), t(1, &[3, 2, 7]));
        let lin = Node::Linear {
            x,
            w: crate::memory::ParamId(1),
            y,
            p: LinearParams::new(6, 5, 7),
        };
        let tensor = |_: Tensor| (4, true);
        let sz = Sizes {
            weight: 4,
            f: 4,
            tensor: &tensor,
        };
        let [f, b] = node_cost(&lin, &sz);
        assert_eq!(f.flops, 2.0 * 6.0 * 5.0 * 7.0);
        assert_eq!(f.bytes, 4.0 * (30.0 + 35.0 + 42.0));
        assert_eq!(b.flops, 2.0 * f.flops);
        assert_eq!(lin.param(), Some(crate::memory::ParamId(1)));
        // The roofline: 1e9 FLOPs and 1e8 bytes in 20 ms at 1e11 FLOP/s and 1e10 B/s take 10 ms
        // each way; compute-bound (ties go to compute), at 50%.
        let r = fixed_peak().roof(
            Cost {
                flops: 1e9,
                bytes: 1e8,
            },
            20_000_000,
        );
        assert_eq!(r.bound, "compute");
        assert!((r.pct - 50.0).abs() < 1e-9 && (r.gflop_s - 50.0).abs() < 1e-9);
        let r = fixed_peak().roof(
            Cost {
                flops: 1e9,
                bytes: 2e8,
            },
            20_000_000,
        );
        assert_eq!(r.bound, "memory");
        assert!((r.pct - 100.0).abs() < 1e-9 && (r.gb_s - 10.0).abs() < 1e-9);
    }

    /// ResNet-50 at 224 px, batch 1: 4.1 GMACs in its convolutions (torchvision's 4.09 GFLOPs,
    /// counted as multiply-adds, fc included), so ~8.2 GFLOP at 2 per multiply-add.
    #[test]
    fn resnet50_forward_is_8_2_gflop() {
        use crate::graph::{BnMode, Graph};
        use crate::model::resnet::ResNet;
        let mut s = ParamStore::<f32>::new();
        let prefix = "online_net.backbone.";
        let net = ResNet::build(&mut s, prefix, Arch::RESNET50, &mut Rng::new(0));
        let mut g = Graph::cpu(s);
        let shape = Shape::new(&[1, 224, 224, 3]);
        let x = g.input(shape, &vec![0.1f32; shape.numel()]);
        let y = net.forward(&mut g, x, BnMode::Eval);
        assert_eq!(y.shape, Shape::new(&[1, 7, 7, 2048]));
        let tape = g.tape();
        let convs: Vec<&Node> = tape
            .iter()
            .filter(|n| matches!(n, Node::Conv { .. }))
            .collect();
        assert_eq!(convs.len(), 53);
        let gemm: f64 = convs.iter().map(|n| g.node_cost(n)[0].flops).sum();
        assert!(
            (gemm / 8.2e9 - 1.0).abs() < 0.02,
            "ResNet-50 convolutions: {gemm:.4e} FLOP"
        );
        // The other nodes (batch norm, pooling) add little.
        let all: f64 = tape.iter().map(|n| g.node_cost(n)[0].flops).sum();
        assert!(all > gemm && all < 1.05 * gemm, "{all:.4e} vs {gemm:.4e}");
        // The first conv's input (the image) takes no gradient: its backward is the weight
        // gradient alone; the next conv's is twice its forward.
        let [f0, b0] = g.node_cost(convs[0]);
        assert_eq!(b0.flops, f0.flops);
        let [f1, b1] = g.node_cost(convs[1]);
        assert_eq!(b1.flops, 2.0 * f1.flops);
        // Layer names: the conv's weight's module.
        let names: Vec<_> = layer_names(
            &tape
                .iter()
                .enumerate()
                .map(|(index, n)| NodeTime {
                    name: n.name(),
                    index,
                    backward: false,
                    param: n.param(),
                    cost: Cost::default(),
                    start: Instant::now(),
                    dur: Default::default(),
                })
                .collect::<Vec<_>>(),
            &g.store,
        );
        assert_eq!(names[0], (0, "online_net.backbone.conv1".to_string()));
        assert_eq!(names[1], (1, "online_net.backbone.bn1".to_string()));
        assert_eq!(names[2], (2, "online_net.backbone.bn1+maxpool".to_string()));
        assert_eq!(
            names[3],
            (3, "online_net.backbone.layer1.0.downsample.0".to_string())
        );
    }

    #[test]
    fn trace_is_trace_events_nested_in_their_steps() {
        let (p, _) = run_with(&tiny(), Some(fixed_peak())).unwrap();
        let text = serde_json::to_string(&p.trace()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let mut steps = BTreeMap::new();
        for e in ev {
            for k in ["name", "ph", "ts", "dur", "pid", "tid"] {
                assert!(e.get(k).is_some(), "{k} missing in {e}");
            }
            assert_eq!(e["ph"], "X");
            assert!(e["dur"].as_f64().unwrap() >= 0.0);
            if e["cat"] == "step" {
                let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
                steps.insert(e["args"]["step"].as_u64().unwrap(), (ts, ts + dur));
            }
        }
        assert_eq!(steps.len(), 2);
        let mut per_step = [0usize; 2];
        for e in ev.iter().filter(|e| e["cat"] != "step") {
            let s = e["args"]["step"].as_u64().unwrap();
            let (a, b) = steps[&s];
            let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
            assert!(
                ts >= a - 1e-3 && ts + dur <= b + 1e-3,
                "{e} outside step {s}"
            );
            per_step[s as usize] += 1;
            // Node events carry their layer and work; the optimizer's carries none.
            let a = &e["args"];
            if e["cat"] == "optimizer" {
                assert!(a.get("flops").is_none(), "{e}");
            } else {
                assert!(a["layer"].is_string(), "{e}");
                assert!(a["bytes"].as_f64().unwrap() > 0.0, "{e}");
                assert!(a["flops"].as_f64().is_some() && a["roofline_pct"].as_f64().is_some());
                assert!(a["bound"].is_string(), "{e}");
            }
        }
        assert_eq!(per_step[0], per_step[1]);
        assert!(per_step[0] > 50);
    }

    #[test]
    fn bad_values_are_user_errors() {
        for cfg in [
            ProfileConfig { steps: 0, ..tiny() },
            ProfileConfig {
                batch_size: 1,
                ..tiny()
            },
            ProfileConfig {
                image_size: 16,
                ..tiny()
            },
        ] {
            let e = cfg.validate().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }
}
