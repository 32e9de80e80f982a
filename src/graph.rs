//! The training graph, once for every device: each op call infers its output's shape, takes slots
//! from the arena, launches the op's kernel on the backend ([`crate::backend`]) and records a
//! [`Node`]; [`Graph::backward`] replays the nodes in reverse. No op math lives here: every node
//! calls its op family's kernel trait (`src/ops/<op>.rs`), implemented by the CPU (the reference
//! functions, f32 or f64) and by CUDA (f32 or bf16 activations).
//!
//! Memory by hand:
//! - The weights: on the CPU the store's own vectors; on a GPU flat device buffers carved by the
//!   store's size table ([`crate::backend::DevWeights`]).
//! - An activation arena of slots handed out in op order and reused every step: a slot grows only
//!   when a step needs it larger than before, so a steady state of equal steps allocates nothing.
//!   Slots hold activations (`E`), values of `F` (losses, BN statistics, scratch) or argmax indices.
//! - Activation gradients are lent by liveness: a zeroed buffer at the first backward node that
//!   touches a slot, given back after the last, so the peak is the widest set alive at once.
//! - Errors are sticky, as in CUDA itself: the first failure (out of memory, a launch error) is
//!   kept, later ops do nothing, and [`Graph::check`] or [`Graph::backward`] returns it; the model
//!   code stays free of error plumbing.
//!
//! Forward without recording (`set_recording(false)`) serves the EMA target and evaluation.

use crate::backend::{Backend, Cpu, Cuda, Elem};
use crate::error::{Error, Result};
use crate::gpu::GpuFloat;
use crate::memory::{BufferId, CounterId, ParamId, ParamStore, SizeTable};
use crate::ops::aggregate::AggregateParams;
use crate::ops::batchnorm::{BnParams, SyncGroup};
use crate::ops::concat::ConcatParams;
use crate::ops::conv::ConvParams;
use crate::ops::l2norm::L2NormParams;
use crate::ops::linear::LinearParams;
use crate::ops::loss::LossParams;
use crate::ops::pool::PoolParams;
use crate::ops::softmax::AlignParams;
use crate::ops::Real;
use crate::profile::Cost;
use crate::tensor::{Shape, Tensor};
use cudarc::cublas::{CudaBlas, Gemm};
use std::ffi::CStr;
use std::ops::Range;

/// Every op family's kernels: what a [`Graph`] needs of its backend.
pub trait Kernels:
    Backend
    + crate::ops::conv::ConvKernels
    + crate::ops::batchnorm::BnKernels
    + crate::ops::pool::PoolKernels
    + crate::ops::linear::LinearKernels
    + crate::ops::concat::ConcatKernels
    + crate::ops::softmax::AlignKernels
    + crate::ops::aggregate::AggregateKernels
    + crate::ops::loss::LossKernels
    + crate::ops::add::AddKernels
    + crate::ops::xent::XentKernels
{
}

impl<T: Real + Elem> Kernels for Cpu<T> {}

impl<E: GpuFloat> Kernels for Cuda<E> where CudaBlas: Gemm<E> {}

/// A batch-norm layer's handles: affine parameters, running statistics, batch counter.
#[derive(Clone, Copy, Debug)]
pub struct BnLayer {
    pub gamma: ParamId,
    pub beta: ParamId,
    pub running_mean: BufferId,
    pub running_var: BufferId,
    pub num_batches_tracked: CounterId,
}

/// Batch statistics (train) or running statistics (eval).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BnMode {
    Train,
    /// Train with statistics per group of this many samples ("ghost" batch norm).
    TrainGhost(usize),
    Eval,
}

/// A slot's value in the compute dtype.
macro_rules! ev {
    ($s:expr, $t:expr) => {{
        let m = $s.meta[$t.slot as usize];
        debug_assert_eq!(m.kind, Kind::E, "an F or index tensor read as activations");
        $s.e.view($t.slot as usize, m.len)
    }};
}

/// A slot's value in `F`.
macro_rules! fv {
    ($s:expr, $t:expr) => {{
        let m = $s.meta[$t.slot as usize];
        debug_assert_eq!(m.kind, Kind::F, "activations read as F");
        $s.f.view($t.slot as usize, m.len)
    }};
}

/// A slot's gradient in the compute dtype.
macro_rules! gv {
    ($s:expr, $t:expr) => {
        $s.ge.view($t.slot as usize, $s.meta[$t.slot as usize].len)
    };
}

/// What a slot stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Activations in the compute dtype.
    E,
    /// `F`: losses, BN statistics, scratch.
    F,
    /// Maxpool argmax.
    I,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    kind: Kind,
    len: usize,
    needs_grad: bool,
}

/// One recorded op.
#[derive(Clone, Debug)]
pub enum Node {
    Conv {
        x: Tensor,
        w: ParamId,
        y: Tensor,
        p: ConvParams,
    },
    /// relu?(batchnorm(x) + res?).
    Bn {
        x: Tensor,
        y: Tensor,
        res: Option<Tensor>,
        relu: bool,
        bn: BnLayer,
        saved: Tensor,
        p: BnParams,
        train: bool,
    },
    MaxPool {
        x: Tensor,
        argmax: Tensor,
        p: PoolParams,
        y: Tensor,
    },
    AvgPool {
        x: Tensor,
        y: Tensor,
        p: PoolParams,
    },
    Linear {
        x: Tensor,
        w: ParamId,
        y: Tensor,
        p: LinearParams,
    },
    Concat {
        g: Tensor,
        x: Tensor,
        u: Tensor,
        p: ConcatParams,
    },
    Split {
        z: Tensor,
        zg: Tensor,
        a: Tensor,
        p: ConcatParams,
    },
    /// LEWEL's alignment map: softmax over positions of L2-normalized rows.
    Align {
        x: Tensor,
        y: Tensor,
        scratch: Tensor,
        p: AlignParams,
    },
    Aggregate {
        x: Tensor,
        w: Tensor,
        v: Tensor,
        p: AggregateParams,
    },
    Loss {
        pred: Tensor,
        target: Tensor,
        y: Tensor,
        p: LossParams,
    },
    Scale {
        x: Tensor,
        y: Tensor,
        alpha: f64,
    },
    Add {
        a: Tensor,
        b: Tensor,
        y: Tensor,
    },
    /// Softmax cross-entropy of classifier heads with their bias (`ops::xent`).
    Xent {
        logits: Tensor,
        bias: ParamId,
        labels: Tensor,
        y: Tensor,
        lse: Tensor,
        p: crate::ops::xent::XentParams,
    },
}

impl Node {
    /// The node's forward and backward names (NVTX ranges; the first names it in errors).
    fn ranges(&self) -> (&'static CStr, &'static CStr) {
        match self {
            Node::Conv { .. } => (c"conv", c"conv backward"),
            Node::Bn { .. } => (c"batchnorm", c"batchnorm backward"),
            Node::MaxPool { .. } => (c"maxpool", c"maxpool backward"),
            Node::AvgPool { .. } => (c"avgpool", c"avgpool backward"),
            Node::Linear { .. } => (c"linear", c"linear backward"),
            Node::Concat { .. } => (c"concat", c"concat backward"),
            Node::Split { .. } => (c"split", c"split backward"),
            Node::Align { .. } => (c"align", c"align backward"),
            Node::Aggregate { .. } => (c"aggregate", c"aggregate backward"),
            Node::Loss { .. } => (c"loss", c"loss backward"),
            Node::Scale { .. } => (c"scale", c"scale backward"),
            Node::Add { .. } => (c"add", c"add backward"),
            Node::Xent { .. } => (c"xent", c"xent backward"),
        }
    }

    /// The op's name, for errors.
    pub fn name(&self) -> &'static str {
        self.ranges().0.to_str().unwrap_or("?")
    }

    /// Its backward's name (`conv backward`, ...), as profiles show it.
    pub fn backward_name(&self) -> &'static str {
        self.ranges().1.to_str().unwrap_or("?")
    }

    /// The gradient slots its backward touches: the inputs whose gradients it adds to, and the
    /// outputs whose gradients it reads.
    fn grad_touches(&self) -> [Option<Tensor>; 3] {
        match *self {
            Node::Conv { x, y, .. }
            | Node::MaxPool { x, y, .. }
            | Node::AvgPool { x, y, .. }
            | Node::Linear { x, y, .. }
            | Node::Align { x, y, .. }
            | Node::Scale { x, y, .. }
            | Node::Loss { pred: x, y, .. }
            | Node::Xent { logits: x, y, .. } => [Some(x), Some(y), None],
            Node::Bn { x, y, res, .. } => [Some(x), Some(y), res],
            Node::Concat { g, x, u, .. } => [Some(g), Some(x), Some(u)],
            Node::Split { z, zg, a, .. } => [Some(z), Some(zg), Some(a)],
            Node::Aggregate { x, w, v, .. } => [Some(x), Some(w), Some(v)],
            Node::Add { a, b, y } => [Some(a), Some(b), Some(y)],
        }
    }

    /// The parameter that names the node's layer (a conv's or linear's weight, a batch norm's
    /// gamma, a classifier's bias), where it has one.
    pub fn param(&self) -> Option<ParamId> {
        match *self {
            Node::Conv { w, .. } | Node::Linear { w, .. } => Some(w),
            Node::Bn { bn, .. } => Some(bn.gamma),
            Node::Xent { bias, .. } => Some(bias),
            _ => None,
        }
    }

    /// The parameters whose gradients its backward writes.
    fn grad_params(&self) -> [Option<ParamId>; 2] {
        match *self {
            Node::Conv { w, .. } | Node::Linear { w, .. } => [Some(w), None],
            Node::Bn { bn, .. } => [Some(bn.gamma), Some(bn.beta)],
            Node::Xent { bias, .. } => [Some(bias), None],
            _ => [None, None],
        }
    }
}

/// Data-parallel gradient reduction in buckets, as PyTorch DDP's: backward hands each bucket of
/// the flat `F` gradient buffer over as soon as it has written the last of it (compute-dtype
/// gradients folded in), so reducing it overlaps the rest of backward.
pub trait GradReduce<B: Backend> {
    /// Elements per bucket, at least (a parameter is never split; the first parameters may make
    /// a smaller last bucket).
    fn bucket_elems(&self) -> usize;
    /// The gradients in `r` are final: start reducing them.
    fn bucket(&mut self, dev: &B, grads: &mut B::Buf<B::F>, r: Range<usize>) -> Result<()>;
    /// Backward has handed every bucket over: whatever reads the gradients next waits for them.
    fn finish(&mut self, dev: &B) -> Result<()>;
}

/// The buckets of a tape's flat gradient buffer, in the order backward finishes them: (the tape
/// index after whose backward the bucket is final, its range). Buckets are runs of whole
/// parameters in table order, made from the table's end (the heads, which backward reaches
/// first) toward its start; a bucket is final after the earliest node that writes any of its
/// gradients (backward replays the tape in reverse); one that no node writes is final at once
/// (index `tape.len()`). Fills `plan`, with `last` as scratch (both reused step to step).
fn plan_buckets(tape: &[Node], table: &SizeTable, elems: usize, (plan, last): &mut BucketPlan) {
    let n = tape.len();
    last.clear();
    last.resize(table.entries.len(), n);
    plan.clear();
    for (j, node) in tape.iter().enumerate().rev() {
        for p in node.grad_params().into_iter().flatten() {
            last[p.0] = j;
        }
    }
    let (mut end, mut at, mut len) = (table.total, n, 0);
    for (i, e) in table.entries.iter().enumerate().rev() {
        at = if at == n { last[i] } else { at.min(last[i]) };
        len += e.shape.numel();
        if len >= elems.max(1) || i == 0 {
            plan.push((at, e.offset..end));
            (end, at, len) = (e.offset, n, 0);
        }
    }
    // Backward reaches high indices first; ties in table order from the end (starts are
    // distinct: an unstable sort, which does not allocate, gives the one order).
    plan.sort_unstable_by(|a, b| b.0.cmp(&a.0).then(b.1.start.cmp(&a.1.start)));
}

/// Gradient buckets in firing order (see [`plan_buckets`]) and its scratch.
type BucketPlan = (Vec<(usize, Range<usize>)>, Vec<usize>);

/// Per-slot storage of one element type, grown on demand and kept across steps. The gradient
/// pools also lend buffers for part of a step: [`Pool::acquire`] and [`Pool::release`] move them
/// between slots and a spare list.
struct Pool<B: Backend, T: Elem> {
    bufs: Vec<Option<B::Buf<T>>>,
    spare: Vec<B::Buf<T>>,
}

impl<B: Backend, T: Elem> Pool<B, T> {
    fn new() -> Self {
        Pool {
            bufs: Vec::new(),
            spare: Vec::new(),
        }
    }
    /// Lends slot `i` the smallest spare buffer of at least `len` elements, or a new one, zeroed
    /// up to `len`; returns the bytes newly allocated. A step that repeats the one before makes
    /// the same choices, so a steady state allocates nothing.
    fn acquire(&mut self, dev: &B, i: usize, len: usize) -> Result<usize> {
        if self.bufs.len() <= i {
            self.bufs.resize_with(i + 1, || None);
        }
        assert!(
            self.bufs[i].is_none(),
            "Graph: gradient slot {i} lent twice"
        );
        let best = (0..self.spare.len())
            .filter(|&k| B::len(&self.spare[k]) >= len)
            .min_by_key(|&k| (B::len(&self.spare[k]), k));
        let (mut b, grown) = match best {
            Some(k) => (self.spare.swap_remove(k), 0),
            None => (
                dev.alloc::<T>(len.max(1))?,
                len.max(1) * std::mem::size_of::<T>(),
            ),
        };
        let r = dev.zero(&mut b, len);
        self.bufs[i] = Some(b);
        r.map(|_| grown)
    }
    /// Returns slot `i`'s buffer to the spare list.
    fn release(&mut self, i: usize) {
        if let Some(b) = self.bufs.get_mut(i).and_then(Option::take) {
            self.spare.push(b);
        }
    }
    /// Elements held, lent or spare.
    fn held(&self) -> usize {
        let lent: usize = self.bufs.iter().flatten().map(|b| B::len(b)).sum();
        lent + self.spare.iter().map(|b| B::len(b)).sum::<usize>()
    }
    fn release_all(&mut self) {
        for i in 0..self.bufs.len() {
            self.release(i);
        }
    }
    /// Makes slot `i` hold at least `len` elements; returns the bytes newly allocated.
    fn ensure(&mut self, dev: &B, i: usize, len: usize) -> Result<usize> {
        if self.bufs.len() <= i {
            self.bufs.resize_with(i + 1, || None);
        }
        if self.bufs[i].as_ref().is_some_and(|b| B::len(b) >= len) {
            return Ok(0);
        }
        let old = self.bufs[i].take().map_or(0, |b| B::len(&b));
        self.bufs[i] = Some(dev.alloc::<T>(len.max(1))?);
        Ok((len.max(1) - old.min(len)) * std::mem::size_of::<T>())
    }
    fn get(&self, i: usize) -> &B::Buf<T> {
        self.bufs[i].as_ref().expect("Graph: slot without storage")
    }
    /// The first `len` elements of slot `i`.
    fn view(&self, i: usize, len: usize) -> B::View<'_, T> {
        B::view(self.get(i), 0..len)
    }
    fn take(&mut self, i: usize) -> B::Buf<T> {
        self.bufs[i].take().expect("Graph: slot without storage")
    }
    fn put(&mut self, i: usize, b: B::Buf<T>) {
        self.bufs[i] = Some(b);
    }
}

/// Parameters, activations and the tape of one model on one backend.
pub struct Graph<B: Kernels> {
    pub dev: B,
    /// Names, shapes and offsets of the weights, and the `num_batches_tracked` counters; on the
    /// CPU also their values (on a GPU the host vectors are empty and the values live in `w`).
    pub store: ParamStore<B::F>,
    pub w: B::Weights,
    e: Pool<B, B::E>,
    f: Pool<B, B::F>,
    u: Pool<B, B::I>,
    ge: Pool<B, B::E>,
    gf: Pool<B, B::F>,
    meta: Vec<Meta>,
    tape: Vec<Node>,
    recording: bool,
    err: Option<Error>,
    /// Bytes held by this graph (weights and arena), which only grows.
    bytes: usize,
    /// The range the op being recorded opened.
    open: Option<&'static CStr>,
    /// Backward's gradient lending plan, reused.
    spans: Spans,
    /// The ranks whose batch statistics `BnMode::Train` shares (SyncBN), where set.
    bn_sync: Option<std::rc::Rc<B::Sync>>,
    /// Where backward hands the finished gradient buckets (data parallel), where set.
    grad_reduce: Option<Box<dyn GradReduce<B>>>,
    /// Its bucket plan, reused.
    buckets: BucketPlan,
    /// Per-node times, where profiling is on ([`Graph::set_profile`]).
    profile: Option<Profile<B::Mark>>,
}

/// One node's forward or backward ([`Graph::set_profile`]): on the device's timeline (the host's
/// monotonic clock on the CPU, CUDA events on a GPU), placed on the host's clock.
#[derive(Clone, Copy, Debug)]
pub struct NodeTime {
    /// The op's range name: `conv`, `batchnorm`, ..., `conv backward`, ...
    pub name: &'static str,
    /// The node's place in its forward pass since the last [`Graph::reset`] (its tape index where
    /// the graph records); a backward has its node's index.
    pub index: usize,
    /// Whether this is the node's backward.
    pub backward: bool,
    /// The parameter naming the node's layer ([`Node::param`]), in the graph's store.
    pub param: Option<ParamId>,
    /// FLOPs and bytes of this pass, from the shapes ([`crate::profile::node_cost`]).
    pub cost: Cost,
    pub start: std::time::Instant,
    pub dur: std::time::Duration,
}

/// A profiled pass whose times are not read yet: its two points on the device's timeline.
struct PendingTime<M> {
    name: &'static str,
    index: usize,
    backward: bool,
    param: Option<ParamId>,
    cost: Cost,
    start: M,
    end: M,
}

/// The profiler's state: the passes so far, the open forward's start, the next forward's index,
/// the point (with the host's clock then) this step's times count from, and marks to reuse.
struct Profile<M> {
    times: Vec<PendingTime<M>>,
    open: Option<M>,
    next: usize,
    origin: Option<(M, std::time::Instant)>,
    spare: Vec<M>,
}

impl<M> Default for Profile<M> {
    fn default() -> Self {
        Profile {
            times: Vec::new(),
            open: None,
            next: 0,
            origin: None,
            spare: Vec::new(),
        }
    }
}

impl<T: Real + Elem> Graph<Cpu<T>> {
    /// A graph on the CPU over a store that holds the values.
    pub fn cpu(store: ParamStore<T>) -> Self {
        Graph::new(Cpu::default(), store).expect("the CPU backend does not fail")
    }

    /// The values of a tensor (activations or a loss).
    pub fn value(&self, t: Tensor) -> &[T] {
        match self.kind(t) {
            Kind::E => ev!(self, t),
            Kind::F => fv!(self, t),
            Kind::I => panic!("value: index tensors are internal"),
        }
    }
}

impl<B: Kernels> Graph<B> {
    /// A graph over `store`'s weights, put where the backend keeps them.
    pub fn new(dev: B, mut store: ParamStore<B::F>) -> Result<Self> {
        let (w, bytes) = dev.weights(&mut store)?;
        Ok(Graph {
            dev,
            store,
            w,
            e: Pool::new(),
            f: Pool::new(),
            u: Pool::new(),
            ge: Pool::new(),
            gf: Pool::new(),
            meta: Vec::new(),
            tape: Vec::new(),
            recording: true,
            err: None,
            bytes,
            open: None,
            spans: Spans::default(),
            bn_sync: None,
            grad_reduce: None,
            buckets: Default::default(),
            profile: None,
        })
    }

    /// Train-mode batch norm (`BnMode::Train`, not ghost groups) takes its statistics over the
    /// rows of every rank in `sync` (SyncBN); None: over this graph's own rows.
    pub fn set_bn_sync(&mut self, sync: Option<std::rc::Rc<B::Sync>>) {
        self.bn_sync = sync.filter(|s| s.world() > 1);
    }

    /// Backward hands its gradient buckets to `r` as it finishes each (data-parallel training);
    /// None: the gradients are simply final when backward returns.
    pub fn set_grad_reduce(&mut self, r: Option<Box<dyn GradReduce<B>>>) {
        self.grad_reduce = r;
    }

    /// Bytes held by this graph: weights plus the arena's high-water mark.
    pub fn device_bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets activations and the tape; slot memory is kept for the next step.
    pub fn reset(&mut self) {
        self.meta.clear();
        self.tape.clear();
        if let Some(p) = &mut self.profile {
            p.next = 0;
        }
    }

    /// With profiling on, every node's forward (launch to record) and backward is timed between two
    /// points on the device's timeline ([`Backend::mark`]: the host's monotonic clock on the CPU,
    /// CUDA events recorded on the stream around the node's launches on a GPU, so the step runs as
    /// in training, without synchronizing) into a list [`Self::take_profile`] reads and empties.
    /// Off (the default), it costs one branch per node.
    pub fn set_profile(&mut self, on: bool) {
        match (on, &self.profile) {
            (true, None) => self.profile = Some(Profile::default()),
            (false, _) => self.profile = None,
            _ => {}
        }
    }

    /// The node times recorded since the last call (empty with profiling off). Waits for the
    /// device to finish what was launched; each time is placed on the host's clock from the
    /// first node's point, taken after a synchronization.
    pub fn take_profile(&mut self) -> Result<Vec<NodeTime>> {
        let Some(mut p) = self.profile.take() else {
            return Ok(Vec::new());
        };
        let r = self.resolve(&mut p);
        self.profile = Some(p);
        r
    }

    fn resolve(&self, p: &mut Profile<B::Mark>) -> Result<Vec<NodeTime>> {
        self.dev.sync()?;
        let mut out = Vec::with_capacity(p.times.len());
        let Some((origin, host)) = p.origin.take() else {
            return Ok(out);
        };
        let secs = |ms: f64| std::time::Duration::from_secs_f64(ms.max(0.0) / 1e3);
        for t in std::mem::take(&mut p.times) {
            out.push(NodeTime {
                name: t.name,
                index: t.index,
                backward: t.backward,
                param: t.param,
                cost: t.cost,
                start: host + secs(self.dev.elapsed_ms(&origin, &t.start)?),
                dur: secs(self.dev.elapsed_ms(&t.start, &t.end)?),
            });
            p.spare.extend([t.start, t.end]);
        }
        p.spare.push(origin);
        Ok(out)
    }

    /// A point on the device's timeline now, for the profiler (reusing a spare one); the first
    /// of a step also fixes the step's origin, after a synchronization.
    fn profile_mark(&mut self) -> Result<B::Mark> {
        let Some(p) = &mut self.profile else {
            return Err(Error::Other("profile_mark without a profile".into()));
        };
        if p.origin.is_none() {
            let reuse = p.spare.pop();
            self.dev.sync()?;
            let o = self.dev.mark(reuse)?;
            let host = std::time::Instant::now();
            if let Some(p) = &mut self.profile {
                p.origin = Some((o, host));
            }
        }
        let reuse = self.profile.as_mut().and_then(|p| p.spare.pop());
        self.dev.mark(reuse)
    }

    /// Closes the profiled span of `n`'s forward or backward that began at `start`.
    fn profile_push(
        &mut self,
        n: &Node,
        backward: bool,
        index: usize,
        start: B::Mark,
    ) -> Result<()> {
        let end = self.profile_mark()?;
        let cost = self.node_cost(n)[backward as usize];
        let (fwd, bwd) = n.ranges();
        if let Some(p) = &mut self.profile {
            p.times.push(PendingTime {
                name: if backward { bwd } else { fwd }.to_str().unwrap_or("?"),
                index,
                backward,
                param: n.param(),
                cost,
                start,
                end,
            });
        }
        Ok(())
    }

    /// FLOPs and bytes of `n`'s [forward, backward] on this graph's element types
    /// ([`crate::profile::node_cost`]). `n` must be of the current step (since the last
    /// [`Self::reset`]): what its tensors hold and which take gradients is read off the arena.
    pub fn node_cost(&self, n: &Node) -> [Cost; 2] {
        let tensor = |t: Tensor| {
            let m = self.meta[t.slot as usize];
            (Self::elem_size(m.kind), m.needs_grad)
        };
        crate::profile::node_cost(
            n,
            &crate::profile::Sizes {
                weight: std::mem::size_of::<B::E>(),
                f: std::mem::size_of::<B::F>(),
                tensor: &tensor,
            },
        )
    }

    /// With recording off, ops compute without taping and their outputs take no gradient.
    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
    }

    pub fn tape(&self) -> &[Node] {
        &self.tape
    }

    /// The first error since the last check, if any (and clears it).
    pub fn check(&mut self) -> Result<()> {
        match self.err.take() {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    fn fail(&mut self, r: Result<()>) {
        if let (Err(e), None) = (r, &self.err) {
            self.err = Some(e);
        }
    }

    fn failed(&self) -> bool {
        self.err.is_some()
    }

    fn elem_size(k: Kind) -> usize {
        match k {
            Kind::E => std::mem::size_of::<B::E>(),
            Kind::F => std::mem::size_of::<B::F>(),
            Kind::I => std::mem::size_of::<B::I>(),
        }
    }

    fn alloc(&mut self, kind: Kind, shape: Shape, needs_grad: bool) -> Tensor {
        let i = self.meta.len();
        let len = shape.numel();
        self.meta.push(Meta {
            kind,
            len,
            needs_grad: needs_grad && self.recording,
        });
        if !self.failed() {
            let r = match kind {
                Kind::E => self.e.ensure(&self.dev, i, len),
                Kind::F => self.f.ensure(&self.dev, i, len),
                Kind::I => self.u.ensure(&self.dev, i, len),
            };
            match r {
                Ok(b) => self.bytes += b,
                Err(e) => {
                    let e = self
                        .dev
                        .out_of_memory(e, len * Self::elem_size(kind), self.bytes);
                    self.fail(Err(e))
                }
            }
        }
        Tensor {
            slot: i as u32,
            shape,
        }
    }

    fn ng(&self, t: Tensor) -> bool {
        self.meta[t.slot as usize].needs_grad
    }

    fn kind(&self, t: Tensor) -> Kind {
        self.meta[t.slot as usize].kind
    }

    /// Opens the NVTX range of the op about to launch; [`Self::record`] closes it.
    fn begin(&mut self, op: &'static CStr) {
        self.open = Some(op);
        if self.profile.is_some() {
            let r = self.profile_mark();
            let r = match (r, &mut self.profile) {
                (Ok(t), Some(p)) => {
                    p.open = Some(t);
                    Ok(())
                }
                (r, _) => r.map(|_| ()),
            };
            self.fail(r);
        }
        self.dev.range_push(op);
    }

    fn record(&mut self, n: Node) {
        if let Some(p) = &mut self.profile {
            let (start, index) = (p.open.take(), p.next);
            p.next += 1;
            if let Some(start) = start {
                let r = self.profile_push(&n, false, index, start);
                self.fail(r);
            }
        }
        self.dev.range_pop();
        let open = self.open.take();
        debug_assert_eq!(open, Some(n.ranges().0), "an op opened another op's range");
        if self.dev.sync_launch() && !self.failed() {
            let r = self.dev.sync().map_err(|e| {
                Error::Other(format!(
                    "forward of node {} ({}): {e}",
                    self.tape.len(),
                    n.name()
                ))
            });
            self.fail(r);
        }
        if self.recording {
            self.tape.push(n);
        }
    }

    /// Runs `f` with slot `y`'s storage in the pool `pool` picks taken out (so other slots can
    /// be read meanwhile); a failure becomes the graph's error.
    fn with_slot<T: Elem>(
        &mut self,
        pool: fn(&mut Self) -> &mut Pool<B, T>,
        y: Tensor,
        f: impl FnOnce(&Self, &mut B::ViewMut<'_, T>) -> Result<()>,
    ) {
        if self.failed() {
            return;
        }
        let i = y.slot as usize;
        let mut b = pool(self).take(i);
        let r = f(self, &mut B::view_mut(&mut b, 0..y.numel()));
        pool(self).put(i, b);
        self.fail(r);
    }

    /// [`Self::with_slot`] for an activation slot.
    fn with_e(
        &mut self,
        y: Tensor,
        f: impl FnOnce(&Self, &mut B::ViewMut<'_, B::E>) -> Result<()>,
    ) {
        self.with_slot(|s| &mut s.e, y, f)
    }

    /// [`Self::with_slot`] for a slot of `F`.
    fn with_f(
        &mut self,
        y: Tensor,
        f: impl FnOnce(&Self, &mut B::ViewMut<'_, B::F>) -> Result<()>,
    ) {
        self.with_slot(|s| &mut s.f, y, f)
    }

    /// A parameter in the compute dtype.
    fn weight(&self, w: ParamId) -> B::View<'_, B::E> {
        let r = self.store.table.range(w.0);
        B::view(B::compute_params(&self.store, &self.w), r)
    }

    pub fn param_shape(&self, w: ParamId) -> Shape {
        self.store.shape(w)
    }

    /// A constant input from host values (images, targets): no gradient.
    pub fn input(&mut self, shape: Shape, data: &[B::F]) -> Tensor {
        assert_eq!(
            data.len(),
            shape.numel(),
            "input: {} values for {shape}",
            data.len()
        );
        let t = self.alloc(Kind::E, shape, false);
        self.with_e(t, |s, b| s.dev.upload_e(data, b));
        t
    }

    /// A constant `F` input from host values (class labels): no gradient.
    pub fn input_f(&mut self, shape: Shape, data: &[B::F]) -> Tensor {
        assert_eq!(
            data.len(),
            shape.numel(),
            "input_f: {} values for {shape}",
            data.len()
        );
        let t = self.alloc(Kind::F, shape, false);
        self.with_f(t, |s, b| s.dev.upload_f(data, b));
        t
    }

    /// A constant input copied from another graph on the same device (the target's outputs).
    pub fn input_from(&mut self, src: &Graph<B>, t: Tensor) -> Tensor {
        let y = self.alloc(Kind::E, t.shape, false);
        if let Some(e) = &src.err {
            self.err.get_or_insert(e.again());
        }
        self.with_e(y, |s, b| s.dev.copy(&ev!(src, t), b));
        y
    }

    /// The values of a tensor on the host (waits).
    pub fn fetch(&self, t: Tensor) -> Result<Vec<B::F>> {
        if let Some(e) = &self.err {
            return Err(e.again());
        }
        match self.kind(t) {
            Kind::E => Ok(self
                .dev
                .download(&ev!(self, t))?
                .into_iter()
                .map(B::e_to_f)
                .collect()),
            Kind::F => self.dev.download(&fv!(self, t)),
            Kind::I => panic!("fetch: index tensors are internal"),
        }
    }

    /// An f32 tensor's values, writable in place on the device (a step's loss, averaged over
    /// the ranks of a data-parallel run).
    pub fn with_f_mut<R>(
        &mut self,
        t: Tensor,
        f: impl FnOnce(&B, &mut crate::backend::VfMut<'_, B>) -> Result<R>,
    ) -> Result<R> {
        if let Some(e) = &self.err {
            return Err(e.again());
        }
        let m = self.meta[t.slot as usize];
        assert_eq!(m.kind, Kind::F, "with_f_mut: f32 tensors only");
        let b = self.f.bufs[t.slot as usize]
            .as_mut()
            .expect("Graph: slot without storage");
        let mut v = B::view_mut(b, 0..m.len);
        f(&self.dev, &mut v)
    }

    /// The same memory seen with another shape of equal size.
    pub fn reshape(&self, t: Tensor, shape: Shape) -> Tensor {
        assert_eq!(t.numel(), shape.numel(), "reshape: {} to {shape}", t.shape);
        Tensor {
            slot: t.slot,
            shape,
        }
    }

    // ------------------------------------------------------------------------
    // Ops

    /// x (N, H, W, C) conv w (O, k, k, C), stride, pad -> (N, Ho, Wo, O).
    pub fn conv2d(&mut self, x: Tensor, w: ParamId, stride: usize, pad: usize) -> Tensor {
        self.begin(c"conv");
        let ws = self.store.shape(w);
        let [n, h, wd, c] = dims4("conv2d", x.shape);
        assert!(
            ws.rank() == 4 && ws.dim(3) == c && ws.dim(1) == ws.dim(2),
            "conv2d: weight {ws} for input {}",
            x.shape
        );
        let p = ConvParams::new(n, h, wd, c, ws.dim(0), ws.dim(1), stride, pad);
        let y = self.alloc(
            Kind::E,
            Shape::new(&[n, p.h_out as usize, p.w_out as usize, ws.dim(0)]),
            true,
        );
        self.with_e(y, |s, yb| {
            s.dev.conv_forward(&p, &ev!(s, x), &s.weight(w), yb)
        });
        self.record(Node::Conv { x, w, y, p });
        y
    }

    /// relu?(batchnorm(x) + res?), batch norm over every axis but the last (channels).
    pub fn bn_act(
        &mut self,
        x: Tensor,
        bn: BnLayer,
        mode: BnMode,
        res: Option<Tensor>,
        relu: bool,
    ) -> Tensor {
        self.begin(c"batchnorm");
        let c = x.shape.dim(-1);
        let rows = x.numel() / c;
        let per_sample = rows / x.shape.dim(0);
        let mut p = BnParams::new(rows, c);
        if let BnMode::TrainGhost(samples) = mode {
            p = p.ghost(samples * per_sample);
        }
        let sync = match mode {
            BnMode::Train => self.bn_sync.clone(),
            _ => None,
        };
        if let Some(s) = &sync {
            p = p.synced(s.world());
        }
        let train = mode != BnMode::Eval;
        let groups = if train { p.groups() } else { 1 };
        if let Some(r) = res {
            assert_eq!(
                r.shape, x.shape,
                "bn_act: residual {} for {}",
                r.shape, x.shape
            );
        }
        let t = &self.store;
        assert!(
            t.table.range(bn.gamma.0).end == t.table.range(bn.beta.0).start
                && t.buffer_table.range(bn.running_mean.0).end
                    == t.buffer_table.range(bn.running_var.0).start,
            "bn_act: a layer's weight and bias, and its running mean and var, must be adjacent"
        );
        let y = self.alloc(Kind::E, x.shape, true);
        let saved = self.alloc(Kind::F, Shape::new(&[2, groups, c]), false);
        if train {
            self.store.counters[bn.num_batches_tracked.0].1 += 1;
        }
        if !self.failed() {
            let (rm, rv) = (
                self.store.buffer_table.range(bn.running_mean.0),
                self.store.buffer_table.range(bn.running_var.0),
            );
            let (gr, br) = (
                self.store.table.range(bn.gamma.0),
                self.store.table.range(bn.beta.0),
            );
            let mut sv = self.f.take(saved.slot as usize);
            let mut yb = self.e.take(y.slot as usize);
            let r = {
                let mut saved_v = B::view_mut(&mut sv, 0..2 * groups * c);
                let (params, _, buffers) = B::f_side(&mut self.store, &mut self.w);
                let (gamma, beta) = (B::view(params, gr), B::view(params, br));
                let resv = res.map(|r| ev!(self, r));
                let xv = ev!(self, x);
                let yv = &mut B::view_mut(&mut yb, 0..y.numel());
                let r = if train {
                    let mut running = B::view_mut(buffers, rm.start..rv.end);
                    self.dev.bn_forward_train(
                        &p,
                        &xv,
                        (&gamma, &beta),
                        &mut running,
                        resv,
                        relu,
                        yv,
                        &mut saved_v,
                        sync.as_deref(),
                    )
                } else {
                    let (rmv, rvv) = (B::view(buffers, rm), B::view(buffers, rv));
                    self.dev.bn_forward_eval(
                        &p,
                        &xv,
                        (&gamma, &beta),
                        (&rmv, &rvv),
                        resv,
                        relu,
                        yv,
                        &mut saved_v,
                    )
                };
                r
            };
            self.e.put(y.slot as usize, yb);
            self.f.put(saved.slot as usize, sv);
            self.fail(r);
        }
        self.record(Node::Bn {
            x,
            y,
            res,
            relu,
            bn,
            saved,
            p,
            train,
        });
        y
    }

    /// Max pooling k x k, stride, pad on (N, H, W, C).
    pub fn maxpool(&mut self, x: Tensor, k: usize, stride: usize, pad: usize) -> Tensor {
        self.begin(c"maxpool");
        let [n, h, w, c] = dims4("maxpool", x.shape);
        let p = PoolParams::max(n, h, w, c, k, stride, pad);
        let shape = Shape::new(&[n, p.h_out as usize, p.w_out as usize, c]);
        let y = self.alloc(Kind::E, shape, self.ng(x));
        let argmax = self.alloc(Kind::I, shape, false);
        if !self.failed() {
            let mut am = self.u.take(argmax.slot as usize);
            self.with_e(y, |s, yb| {
                s.dev
                    .maxpool_forward(&p, &ev!(s, x), yb, &mut B::view_mut(&mut am, 0..y.numel()))
            });
            self.u.put(argmax.slot as usize, am);
        }
        self.record(Node::MaxPool { x, argmax, p, y });
        y
    }

    /// Global average pool: (N, H, W, C) -> (N, C).
    pub fn avgpool(&mut self, x: Tensor) -> Tensor {
        self.begin(c"avgpool");
        let [n, h, w, c] = dims4("avgpool", x.shape);
        let p = PoolParams::global_avg(n, h, w, c);
        let y = self.alloc(Kind::E, Shape::new(&[n, c]), self.ng(x));
        self.with_e(y, |s, yb| s.dev.avgpool_forward(&p, &ev!(s, x), yb));
        self.record(Node::AvgPool { x, y, p });
        y
    }

    /// Linear map of the last axis: (..., I) -> (..., O) with w (O, I).
    pub fn linear(&mut self, x: Tensor, w: ParamId) -> Tensor {
        self.begin(c"linear");
        let ws = self.store.shape(w);
        let ci = x.shape.dim(-1);
        assert!(
            ws.rank() == 2 && ws.dim(1) == ci,
            "linear: weight {ws} for input {}",
            x.shape
        );
        let p = LinearParams::new(x.numel() / ci, ci, ws.dim(0));
        let mut d = x.shape.dims().to_vec();
        *d.last_mut().unwrap() = ws.dim(0);
        let y = self.alloc(Kind::E, Shape::new(&d), true);
        self.with_e(y, |s, yb| {
            s.dev.linear_forward(&p, &ev!(s, x), &s.weight(w), yb)
        });
        self.record(Node::Linear { x, w, y, p });
        y
    }

    /// [g (B, C); x (B, L, C)] along positions -> (B, 1+L, C).
    pub fn concat_positions(&mut self, g: Tensor, x: Tensor) -> Tensor {
        self.begin(c"concat");
        let (b, c) = (g.shape.dim(0), g.shape.dim(-1));
        assert!(
            g.numel() == b * c && x.shape.dim(0) == b && x.shape.dim(-1) == c,
            "concat: {} and {}",
            g.shape,
            x.shape
        );
        let l = x.numel() / (b * c);
        let p = ConcatParams::new(b, l, c);
        let u = self.alloc(
            Kind::E,
            Shape::new(&[b, 1 + l, c]),
            self.ng(g) || self.ng(x),
        );
        self.with_e(u, |s, ub| s.dev.concat(&p, &ev!(s, g), &ev!(s, x), ub));
        self.record(Node::Concat { g, x, u, p });
        u
    }

    /// z (B, 1+L, D) -> (z_g (B, D), a (B, L, D)).
    pub fn split_positions(&mut self, z: Tensor) -> (Tensor, Tensor) {
        self.begin(c"split");
        let [b, l1, d] = dims3("split", z.shape);
        let p = ConcatParams::new(b, l1 - 1, d);
        let zg = self.alloc(Kind::E, Shape::new(&[b, d]), self.ng(z));
        let a = self.alloc(Kind::E, Shape::new(&[b, l1 - 1, d]), self.ng(z));
        if !self.failed() {
            let mut ab = self.e.take(a.slot as usize);
            self.with_e(zg, |s, gb| {
                s.dev
                    .split(&p, &ev!(s, z), gb, &mut B::view_mut(&mut ab, 0..a.numel()))
            });
            self.e.put(a.slot as usize, ab);
        }
        self.record(Node::Split { z, zg, a, p });
        (zg, a)
    }

    /// LEWEL's alignment maps of a (B, L, D): softmax over positions of each row divided by its
    /// L2 norm and by `scale`.
    pub fn align_maps(&mut self, a: Tensor, scale: f32) -> Tensor {
        self.begin(c"align");
        let [b, l, d] = dims3("align_maps", a.shape);
        let p = AlignParams {
            b: b as i32,
            l: l as i32,
            d: d as i32,
            scale,
            eps: L2NormParams::new(1, d, scale).eps,
        };
        let y = self.alloc(Kind::E, a.shape, self.ng(a));
        // Backward scratch, taken now so the arena's layout does not depend on the pass.
        let scratch_len = if self.recording { a.numel() } else { 1 };
        let scratch = self.alloc(Kind::F, Shape::new(&[scratch_len]), false);
        self.with_e(y, |s, yb| s.dev.align_forward(&p, &ev!(s, a), yb));
        self.record(Node::Align {
            x: a,
            y,
            scratch,
            p,
        });
        y
    }

    /// Head-split aggregation of x (B, L, C) by maps w (B, L, D) -> (B, D/heads, C).
    pub fn aggregate(&mut self, x: Tensor, w: Tensor, heads: usize) -> Tensor {
        self.begin(c"aggregate");
        let [b, l, c] = dims3("aggregate", x.shape);
        let [b2, l2, d] = dims3("aggregate", w.shape);
        assert!(
            b == b2 && l == l2,
            "aggregate: x {} vs maps {}",
            x.shape,
            w.shape
        );
        let p = AggregateParams::new(b, l, c, d, heads);
        let v = self.alloc(
            Kind::E,
            Shape::new(&[b, d / heads, c]),
            self.ng(x) || self.ng(w),
        );
        self.with_e(v, |s, vb| {
            s.dev.aggregate_forward(&p, &ev!(s, x), &ev!(s, w), vb)
        });
        self.record(Node::Aggregate { x, w, v, p });
        v
    }

    /// Normalized MSE of pred rows against target rows (last axis = features) -> scalar.
    /// The target takes no gradient.
    pub fn loss(&mut self, pred: Tensor, target: Tensor) -> Tensor {
        self.begin(c"loss");
        assert_eq!(
            pred.numel(),
            target.numel(),
            "loss: pred {} vs target {}",
            pred.shape,
            target.shape
        );
        let d = pred.shape.dim(-1);
        let p = LossParams::new(pred.numel() / d, d);
        let y = self.alloc(Kind::F, Shape::scalar(), self.ng(pred));
        let cosv = self.alloc(Kind::F, Shape::new(&[pred.numel() / d]), false);
        if !self.failed() {
            let mut cb = self.f.take(cosv.slot as usize);
            self.with_f(y, |s, yb| {
                s.dev.loss_forward(
                    &p,
                    (&ev!(s, pred), &ev!(s, target)),
                    &mut B::view_mut(&mut cb, 0..cosv.numel()),
                    yb,
                )
            });
            self.f.put(cosv.slot as usize, cb);
        }
        self.record(Node::Loss { pred, target, y, p });
        y
    }

    /// Softmax cross-entropy of `heads` classifier heads side by side: logits (R, heads * O) plus
    /// `bias` (heads * O), against `labels` (R, an `F` tensor from [`Graph::input_f`]). Returns
    /// (the sum over heads of each head's mean cross-entropy, a scalar to run backward from; each
    /// head's mean, (heads)).
    pub fn cross_entropy(
        &mut self,
        logits: Tensor,
        bias: ParamId,
        labels: Tensor,
        heads: usize,
    ) -> (Tensor, Tensor) {
        self.begin(c"xent");
        let cols = self.store.shape(bias).numel();
        let rows = labels.numel();
        assert!(
            heads > 0 && cols.is_multiple_of(heads) && logits.numel() == rows * cols,
            "cross_entropy: logits {} for {rows} labels and a bias of {cols} in {heads} heads",
            logits.shape
        );
        let p = crate::ops::xent::XentParams::new(rows, cols / heads, heads);
        let y = self.alloc(Kind::F, Shape::scalar(), self.ng(logits));
        let per_head = self.alloc(Kind::F, Shape::new(&[heads]), false);
        let lse = self.alloc(Kind::F, Shape::new(&[rows * heads]), false);
        let ce = self.alloc(Kind::F, Shape::new(&[rows * heads]), false);
        if !self.failed() {
            let (mut yb, mut hb, mut lb, mut cb) = (
                self.f.take(y.slot as usize),
                self.f.take(per_head.slot as usize),
                self.f.take(lse.slot as usize),
                self.f.take(ce.slot as usize),
            );
            let br = self.store.table.range(bias.0);
            let r = {
                let (params, _, _) = B::f_side(&mut self.store, &mut self.w);
                self.dev.xent_forward(
                    &p,
                    (
                        &ev!(self, logits),
                        &B::view(params, br),
                        &self.f.view(labels.slot as usize, rows),
                    ),
                    &mut B::view_mut(&mut lb, 0..lse.numel()),
                    &mut B::view_mut(&mut cb, 0..ce.numel()),
                    &mut B::view_mut(&mut hb, 0..heads),
                    &mut B::view_mut(&mut yb, 0..1),
                )
            };
            self.f.put(y.slot as usize, yb);
            self.f.put(per_head.slot as usize, hb);
            self.f.put(lse.slot as usize, lb);
            self.f.put(ce.slot as usize, cb);
            self.fail(r);
        }
        self.record(Node::Xent {
            logits,
            bias,
            labels,
            y,
            lse,
            p,
        });
        (y, per_head)
    }

    /// alpha * x.
    pub fn scale(&mut self, x: Tensor, alpha: f64) -> Tensor {
        self.begin(c"scale");
        let kind = self.kind(x);
        let y = self.alloc(kind, x.shape, self.ng(x));
        match kind {
            Kind::E => self.with_e(y, |s, yb| s.dev.scale_e(&ev!(s, x), alpha, yb)),
            _ => self.with_f(y, |s, yb| s.dev.scale_f(&fv!(s, x), alpha, yb)),
        }
        self.record(Node::Scale { x, y, alpha });
        y
    }

    pub fn add(&mut self, a: Tensor, b: Tensor) -> Tensor {
        self.begin(c"add");
        assert_eq!(a.shape, b.shape, "add: {} + {}", a.shape, b.shape);
        let kind = self.kind(a);
        assert_eq!(kind, self.kind(b), "add: operands of different storage");
        let y = self.alloc(kind, a.shape, self.ng(a) || self.ng(b));
        match kind {
            Kind::E => self.with_e(y, |s, yb| s.dev.add_e(&ev!(s, a), &ev!(s, b), yb)),
            _ => self.with_f(y, |s, yb| s.dev.add_f(&fv!(s, a), &fv!(s, b), yb)),
        }
        self.record(Node::Add { a, b, y });
        y
    }

    // ------------------------------------------------------------------------
    // Backward

    /// d(out)/d(everything): zeroes the parameter gradients, seeds d out = 1, replays the tape in
    /// reverse (every node adds into its inputs' gradients and the parameters'), then folds the
    /// compute-dtype weight gradients into the `F` gradients. Returns the first error of the
    /// step, forward included. With a [`GradReduce`] set, each bucket is folded and handed over
    /// as soon as the node that finishes it has run.
    ///
    /// Activation gradients live only while backward needs them: a slot's gradient is lent a
    /// zeroed buffer at the first node that touches it (the last of its consumers; backward runs
    /// the tape in reverse) and gives it back after the last (the node that produced it), so the
    /// peak is the widest set alive at once, not the sum over the network.
    pub fn backward(&mut self, out: Tensor) -> Result<()> {
        assert_eq!(out.numel(), 1, "backward: output must be a scalar");
        assert_eq!(self.kind(out), Kind::F, "backward: output must be a loss");
        self.check()?;
        self.ge.release_all();
        self.gf.release_all();
        let tape = std::mem::take(&mut self.tape);
        let mut spans = std::mem::take(&mut self.spans);
        spans.compute(&tape, &self.meta);
        let (mut nb, mut nd) = (0, 0);
        let mut reduce = self.grad_reduce.take();
        let mut buckets = std::mem::take(&mut self.buckets);
        if let Some(r) = &reduce {
            plan_buckets(&tape, &self.store.table, r.bucket_elems(), &mut buckets);
        }
        let plan = &buckets.0;
        let mut fired = 0;
        // Folds and hands over the buckets final once backward has run node `j` (`tape.len()`:
        // before any).
        let mut fire = |g: &mut Self, j: usize, reduce: &mut Option<Box<dyn GradReduce<B>>>| {
            let Some(r) = reduce.as_mut() else {
                return Ok(());
            };
            while let Some((_, range)) = plan.get(fired).filter(|b| b.0 == j) {
                fired += 1;
                g.dev.finish_grads(&mut g.store, &mut g.w, range.clone())?;
                let (_, grads, _) = B::f_side(&mut g.store, &mut g.w);
                r.bucket(&g.dev, grads, range.clone())?;
            }
            Ok(())
        };
        let r = (|| {
            self.dev.zero_grads(&mut self.store, &mut self.w)?;
            self.lend(out.slot)?;
            let mut b = self.gf.take(out.slot as usize);
            let r = self.dev.seed_one(&mut b);
            self.gf.put(out.slot as usize, b);
            r?;
            fire(self, tape.len(), &mut reduce)?;
            for (j, node) in tape.iter().enumerate().rev() {
                while let Some(&(_, s)) = spans.born.get(nb).filter(|b| b.0 as usize == j) {
                    nb += 1;
                    if s != out.slot {
                        self.lend(s)?;
                    }
                }
                let t0 = match self.profile {
                    Some(_) => Some(self.profile_mark()?),
                    None => None,
                };
                self.dev.range_push(node.ranges().1);
                let r = self.backward_node(node);
                self.dev.range_pop();
                r?;
                if let Some(t0) = t0 {
                    self.profile_push(node, true, j, t0)?;
                }
                if self.dev.sync_launch() {
                    self.dev.sync().map_err(|e| {
                        Error::Other(format!("backward of node {j} ({}): {e}", node.name()))
                    })?;
                }
                while let Some(&(_, s)) = spans.dies.get(nd).filter(|d| d.0 as usize == j) {
                    nd += 1;
                    match self.meta[s as usize].kind {
                        Kind::E => self.ge.release(s as usize),
                        _ => self.gf.release(s as usize),
                    }
                }
                fire(self, j, &mut reduce)?;
            }
            Ok(())
        })();
        self.tape = tape;
        self.spans = spans;
        self.ge.release_all();
        self.gf.release_all();
        let r = r.and_then(|()| match reduce.as_mut() {
            Some(red) => red.finish(&self.dev),
            None => {
                let all = 0..self.store.table.total;
                self.dev.finish_grads(&mut self.store, &mut self.w, all)
            }
        });
        self.grad_reduce = reduce;
        self.buckets = buckets;
        r
    }

    /// Activation-gradient bytes: (held by the gradient pools, which is the peak of what
    /// backward kept alive at once, needed were every slot to keep its own).
    pub fn grad_bytes(&self) -> (usize, usize) {
        let held = self.ge.held() * std::mem::size_of::<B::E>()
            + self.gf.held() * std::mem::size_of::<B::F>();
        let all = self
            .meta
            .iter()
            .filter(|m| m.needs_grad)
            .map(|m| m.len * Self::elem_size(m.kind))
            .sum();
        (held, all)
    }

    /// Lends slot `i` a zeroed gradient buffer of its kind.
    fn lend(&mut self, i: u32) -> Result<()> {
        let i = i as usize;
        let m = self.meta[i];
        let grown = match m.kind {
            Kind::E => self.ge.acquire(&self.dev, i, m.len),
            _ => self.gf.acquire(&self.dev, i, m.len),
        }
        .map_err(|e| {
            self.dev
                .out_of_memory(e, m.len * Self::elem_size(m.kind), self.bytes)
        })?;
        self.bytes += grown;
        Ok(())
    }

    /// Runs `f` with the activation gradient of `t` taken out, if `t` takes a gradient.
    fn with_ge(
        &mut self,
        t: Tensor,
        f: impl FnOnce(&mut Self, &mut B::ViewMut<'_, B::E>) -> Result<()>,
    ) -> Result<()> {
        if !self.ng(t) {
            return Ok(());
        }
        let i = t.slot as usize;
        let mut b = self.ge.take(i);
        let r = f(self, &mut B::view_mut(&mut b, 0..self.meta[i].len));
        self.ge.put(i, b);
        r
    }

    /// The activation gradient of `t` taken out: its own where it takes one, else a zeroed
    /// scratch (for kernels that write every input's gradient in one pass).
    fn take_ge(&mut self, t: Tensor) -> Result<B::Buf<B::E>> {
        if self.ng(t) {
            Ok(self.ge.take(t.slot as usize))
        } else {
            self.dev.alloc(t.numel())
        }
    }

    fn put_ge(&mut self, t: Tensor, b: B::Buf<B::E>) {
        if self.ng(t) {
            self.ge.put(t.slot as usize, b);
        }
    }

    fn backward_node(&mut self, node: &Node) -> Result<()> {
        match *node {
            Node::Conv { x, w, y, p } => {
                let r = self.store.table.range(w.0);
                let wg = B::weight_grads(&mut self.store, &mut self.w);
                self.dev.conv_backward_weight(
                    &p,
                    &ev!(self, x),
                    &gv!(self, y),
                    &mut B::view_mut(wg, r),
                )?;
                self.with_ge(x, |s, dx| {
                    s.dev.conv_backward_data(&p, &gv!(s, y), &s.weight(w), dx)
                })
            }
            Node::Bn {
                x,
                y,
                res,
                relu,
                bn,
                saved,
                p,
                train,
            } => {
                assert!(self.ng(x), "Graph: batch norm of a constant");
                let c = p.c as usize;
                let groups = if train { p.groups() } else { 1 };
                let (gr, br) = (
                    self.store.table.range(bn.gamma.0),
                    self.store.table.range(bn.beta.0),
                );
                let (rm, rv) = (
                    self.store.buffer_table.range(bn.running_mean.0),
                    self.store.buffer_table.range(bn.running_var.0),
                );
                let mut dres_buf = match res {
                    Some(r) if self.ng(r) => Some(self.ge.take(r.slot as usize)),
                    _ => None,
                };
                let i = x.slot as usize;
                let mut dx = self.ge.take(i);
                let sv = self.f.get(saved.slot as usize);
                let (mean, rstd) = (
                    B::view(sv, 0..groups * c),
                    B::view(sv, groups * c..2 * groups * c),
                );
                let (params, grads, buffers) = B::f_side(&mut self.store, &mut self.w);
                let gamma = B::view(params, gr.clone());
                let (rmv, rvv) = (B::view(buffers, rm), B::view(buffers, rv));
                let mut dgb = B::view_mut(grads, gr.start..br.end);
                // Recorded over several ranks (SyncBN): the sync of the forward.
                let sync = match (train && p.world > 1, &self.bn_sync) {
                    (false, _) => None,
                    (true, Some(s)) => Some(s.clone()),
                    (true, None) => panic!("Graph: a SyncBN node without the graph's sync"),
                };
                let out = self.dev.bn_backward(
                    &p,
                    train,
                    (&ev!(self, x), &gv!(self, y)),
                    relu.then(|| ev!(self, y)),
                    (&mean, &rstd),
                    (&rmv, &rvv),
                    &gamma,
                    &mut dgb,
                    &mut B::view_mut(&mut dx, 0..self.meta[i].len),
                    dres_buf
                        .as_mut()
                        .map(|b| B::view_mut(b, 0..self.meta[res.unwrap().slot as usize].len)),
                    sync.as_deref(),
                );
                self.ge.put(i, dx);
                if let (Some(b), Some(r)) = (dres_buf, res) {
                    self.ge.put(r.slot as usize, b);
                }
                out
            }
            Node::MaxPool { x, argmax, p, y } => self.with_ge(x, |s, dx| {
                let am = B::view(s.u.get(argmax.slot as usize), 0..argmax.numel());
                s.dev.maxpool_backward(&p, &gv!(s, y), &am, dx)
            }),
            Node::AvgPool { x, y, p } => {
                self.with_ge(x, |s, dx| s.dev.avgpool_backward(&p, &gv!(s, y), dx))
            }
            Node::Linear { x, w, y, p } => {
                let r = self.store.table.range(w.0);
                let wg = B::weight_grads(&mut self.store, &mut self.w);
                self.dev.linear_backward_weight(
                    &p,
                    &ev!(self, x),
                    &gv!(self, y),
                    &mut B::view_mut(wg, r),
                )?;
                self.with_ge(x, |s, dx| {
                    s.dev.linear_backward_data(&p, &gv!(s, y), &s.weight(w), dx)
                })
            }
            Node::Concat { g, x, u, p } => {
                // The kernel writes both input gradients in one pass; a constant side gets scratch.
                let (mut dg, mut dx) = (self.take_ge(g)?, self.take_ge(x)?);
                let r = self.dev.concat_backward(
                    &p,
                    &gv!(self, u),
                    &mut B::view_mut(&mut dg, 0..g.numel()),
                    &mut B::view_mut(&mut dx, 0..x.numel()),
                );
                self.put_ge(g, dg);
                self.put_ge(x, dx);
                r
            }
            Node::Split { z, zg, a, p } => self.with_ge(z, |s, dz| {
                s.dev.split_backward(&p, &gv!(s, zg), &gv!(s, a), dz)
            }),
            Node::Align { x, y, scratch, p } => {
                let i = scratch.slot as usize;
                let mut sc = self.f.take(i);
                let len = self.meta[i].len;
                let r = self.with_ge(x, |s, dx| {
                    s.dev.align_backward(
                        &p,
                        (&ev!(s, x), &ev!(s, y), &gv!(s, y)),
                        &mut B::view_mut(&mut sc, 0..len),
                        dx,
                    )
                });
                self.f.put(i, sc);
                r
            }
            Node::Aggregate { x, w, v, p } => {
                let (mut dx, mut dw) = (self.take_ge(x)?, self.take_ge(w)?);
                let r = self.dev.aggregate_backward(
                    &p,
                    (&ev!(self, x), &ev!(self, w), &gv!(self, v)),
                    &mut B::view_mut(&mut dx, 0..x.numel()),
                    &mut B::view_mut(&mut dw, 0..w.numel()),
                );
                self.put_ge(x, dx);
                self.put_ge(w, dw);
                r
            }
            Node::Loss { pred, target, y, p } => self.with_ge(pred, |s, dp| {
                let dl = B::view(s.gf.get(y.slot as usize), 0..1);
                s.dev
                    .loss_backward(&p, (&ev!(s, pred), &ev!(s, target)), &dl, dp)
            }),
            Node::Xent {
                logits,
                bias,
                labels,
                y,
                lse,
                p,
            } => {
                let br = self.store.table.range(bias.0);
                let i = logits.slot as usize;
                let mut dl = self.ge.take(i);
                let (params, grads, _) = B::f_side(&mut self.store, &mut self.w);
                let r = self.dev.xent_backward(
                    &p,
                    (
                        &self.e.view(i, self.meta[i].len),
                        &B::view(params, br.clone()),
                        &self.f.view(labels.slot as usize, labels.numel()),
                    ),
                    &self.f.view(lse.slot as usize, lse.numel()),
                    &B::view(self.gf.get(y.slot as usize), 0..1),
                    &mut B::view_mut(&mut dl, 0..self.meta[i].len),
                    &mut B::view_mut(grads, br),
                );
                self.ge.put(i, dl);
                r
            }
            Node::Scale { x, y, alpha } => self.axpy_grad(x, y, alpha),
            Node::Add { a, b, y } => {
                self.axpy_grad(a, y, 1.0)?;
                self.axpy_grad(b, y, 1.0)
            }
        }
    }

    /// dx += alpha * dy, in the slots' own kind.
    fn axpy_grad(&mut self, x: Tensor, y: Tensor, alpha: f64) -> Result<()> {
        if !self.ng(x) {
            return Ok(());
        }
        let i = x.slot as usize;
        let n = self.meta[i].len;
        match self.kind(x) {
            Kind::E => self.with_ge(x, |s, dx| s.dev.axpy_e(&gv!(s, y), alpha, dx)),
            _ => {
                let mut dx = self.gf.take(i);
                let r = self.dev.axpy_f(
                    &self.gf.view(y.slot as usize, n),
                    alpha,
                    &mut B::view_mut(&mut dx, 0..n),
                );
                self.gf.put(i, dx);
                r
            }
        }
    }
}

/// Where backward lends and takes back each slot's gradient, recomputed every backward into the
/// same vectors (no allocation once running).
#[derive(Default)]
struct Spans {
    /// Per slot: the last node in tape order touching its gradient (the first in backward's), and
    /// the first (backward's last); `u32::MAX` where none does.
    first: Vec<u32>,
    last: Vec<u32>,
    /// (node, slot) where a gradient is lent, and where it is given back: by node from the end of
    /// the tape (backward's order), then by slot.
    born: Vec<(u32, u32)>,
    dies: Vec<(u32, u32)>,
}

impl Spans {
    fn compute(&mut self, tape: &[Node], meta: &[Meta]) {
        const NONE: u32 = u32::MAX;
        self.first.clear();
        self.first.resize(meta.len(), NONE);
        self.last.clear();
        self.last.resize(meta.len(), NONE);
        for (j, n) in tape.iter().enumerate() {
            for t in n.grad_touches().into_iter().flatten() {
                let s = t.slot as usize;
                if meta[s].needs_grad {
                    self.first[s] = j as u32;
                    if self.last[s] == NONE {
                        self.last[s] = j as u32;
                    }
                }
            }
        }
        self.born.clear();
        self.dies.clear();
        for s in 0..meta.len() {
            if self.first[s] != NONE {
                self.born.push((self.first[s], s as u32));
                self.dies.push((self.last[s], s as u32));
            }
        }
        let backward_order = |&(j, s): &(u32, u32)| (std::cmp::Reverse(j), s);
        self.born.sort_unstable_by_key(backward_order);
        self.dies.sort_unstable_by_key(backward_order);
    }
}

pub(crate) fn dims4(op: &str, s: Shape) -> [usize; 4] {
    assert_eq!(s.rank(), 4, "{op}: expected (N, H, W, C), got {s}");
    [s.dim(0), s.dim(1), s.dim(2), s.dim(3)]
}

pub(crate) fn dims3(op: &str, s: Shape) -> [usize; 3] {
    assert_eq!(s.rank(), 3, "{op}: expected (B, L, C), got {s}");
    [s.dim(0), s.dim(1), s.dim(2)]
}

// ----------------------------------------------------------------------------
// On a GPU only

impl<E: GpuFloat> Graph<Cuda<E>>
where
    CudaBlas: Gemm<E>,
{
    /// The f32 gradients on the host (waits).
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        self.dev.gpu.download(&self.w.grads)
    }

    /// An input made on the device from u8 crops (B, S, S, 3): the photometric half of the
    /// augmentation (`data::photometric_cuda`) writes the normalized views straight into the slot.
    pub fn input_crops(
        &mut self,
        shape: Shape,
        crops: &crate::data::loader::CropBuf,
        params: &[crate::data::photometric_cuda::AugParams],
        bufs: &mut crate::data::photometric_cuda::AugBuffers,
    ) -> Tensor {
        let t = self.alloc(Kind::E, shape, false);
        self.with_e(t, |s, b| {
            crate::data::photometric_cuda::photometric_cuda::<E>(
                &s.dev.gpu,
                bufs,
                crops,
                params,
                shape.dims()[1],
                b,
            )
        });
        t
    }

    /// Queues the copy of an f32 tensor (a loss) into page-locked memory without waiting; the
    /// bytes are there once `dst.bytes()` returns.
    pub fn queue_fetch(&self, t: Tensor, dst: &mut crate::data::pinned::PinnedBuf) -> Result<()> {
        if let Some(e) = &self.err {
            return Err(e.again());
        }
        assert_eq!(self.kind(t), Kind::F, "queue_fetch: f32 tensors only");
        assert_eq!(dst.len(), t.numel() * 4, "queue_fetch: destination size");
        let g = &self.dev.gpu;
        let v = fv!(self, t);
        let (ptr, _rec) = cudarc::driver::DevicePtr::device_ptr(&v, &g.stream);
        dst.download_from(&g.stream, ptr)
            .map_err(|e| g.err("queuing the download of a tensor", e))
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};
    use crate::memory::ParamStore;
    use crate::rng::Rng;

    struct Net {
        w1: ParamId,
        bn1: BnLayer,
        w2: ParamId,
        bn2: BnLayer,
        proj: ParamId,
        bn3: BnLayer,
        head: ParamId,
    }

    fn bn_layer(s: &mut ParamStore<f64>, name: &str, c: usize) -> BnLayer {
        BnLayer {
            gamma: s.add_param(&format!("{name}.weight"), Shape::new(&[c]), |i| {
                1.0 + 0.1 * i as f64
            }),
            beta: s.add_param(&format!("{name}.bias"), Shape::new(&[c]), |i| {
                0.05 * i as f64
            }),
            running_mean: s.add_buffer(&format!("{name}.running_mean"), Shape::new(&[c]), 0.0),
            running_var: s.add_buffer(&format!("{name}.running_var"), Shape::new(&[c]), 1.0),
            num_batches_tracked: s.add_counter(&format!("{name}.num_batches_tracked")),
        }
    }

    fn build() -> (ParamStore<f64>, Net) {
        let mut s = ParamStore::new();
        let mut r = Rng::new(5);
        let mut init = move |_: usize| r.normal() * 0.5;
        let w1 = s.add_param("conv1.weight", Shape::new(&[4, 3, 3, 2]), &mut init);
        let bn1 = bn_layer(&mut s, "bn1", 4);
        let w2 = s.add_param("conv2.weight", Shape::new(&[4, 1, 1, 4]), &mut init);
        let bn2 = bn_layer(&mut s, "bn2", 4);
        let proj = s.add_param("proj.weight", Shape::new(&[4, 4]), &mut init);
        let bn3 = bn_layer(&mut s, "bn3", 4);
        let head = s.add_param("head.weight", Shape::new(&[3, 4]), &mut init);
        (
            s,
            Net {
                w1,
                bn1,
                w2,
                bn2,
                proj,
                bn3,
                head,
            },
        )
    }

    /// Every kind of node on the tape: a small residual trunk, then a LEWEL-style neck.
    fn forward(g: &mut Graph<Cpu<f64>>, net: &Net, x: &[f64], target: &[f64]) -> Tensor {
        g.reset();
        let b = 2;
        let x = g.input(Shape::new(&[b, 7, 6, 2]), x);
        let h = g.conv2d(x, net.w1, 2, 1); // (2, 4, 3, 4)
        let h = g.bn_act(h, net.bn1, BnMode::TrainGhost(1), None, true);
        let h = g.maxpool(h, 3, 1, 1); // (2, 4, 3, 4)
        let r = g.conv2d(h, net.w2, 1, 0);
        let fmap = g.bn_act(r, net.bn2, BnMode::Eval, Some(h), true);
        let pooled = g.avgpool(fmap); // (2, 4)
        let pix = g.reshape(fmap, Shape::new(&[b, 12, 4]));
        let u = g.concat_positions(pooled, pix); // (2, 13, 4)
        let z = g.linear(u, net.proj);
        let z = g.bn_act(z, net.bn3, BnMode::Train, None, false);
        let (zg, a) = g.split_positions(z);
        let maps = g.align_maps(a, 0.5);
        let v = g.aggregate(pix, maps, 2); // (2, 2, 4)
        let o = g.linear(v, net.head); // (2, 2, 3)
        let t = g.input(Shape::new(&[b, 2, 3]), target);
        let l1 = g.loss(o, t);
        let zt = g.input(Shape::new(&[b, 4]), &target[..8]);
        let l2 = g.loss(zg, zt);
        let l2 = g.scale(l2, 0.7);
        g.add(l1, l2)
    }

    #[test]
    fn gradcheck_graph() {
        let (store, net) = build();
        let x = uniform(1, 2 * 7 * 6 * 2, -1.0, 1.0);
        let target = uniform(2, 12, -1.0, 1.0);
        let g = std::cell::RefCell::new(Graph::cpu(store));
        let params = vec![g.borrow().store.params.clone()];
        let fwd = |ps: &[Vec<f64>]| {
            let mut g = g.borrow_mut();
            g.store.params.copy_from_slice(&ps[0]);
            let out = forward(&mut g, &net, &x, &target);
            g.value(out).to_vec()
        };
        let bwd = |ps: &[Vec<f64>], dy: &[f64]| {
            let mut g = g.borrow_mut();
            g.store.params.copy_from_slice(&ps[0]);
            let out = forward(&mut g, &net, &x, &target);
            g.backward(out).unwrap();
            vec![Some(g.store.grads.iter().map(|v| v * dy[0]).collect())]
        };
        assert_ok(check("graph", &["params"], &params, &fwd, &bwd));
        let g = g.borrow();
        assert_eq!(g.tape().len(), 17);
        assert!(g
            .store
            .counters
            .iter()
            .any(|(n, c)| n == "bn1.num_batches_tracked" && *c > 0));
        assert!(g
            .store
            .counters
            .iter()
            .any(|(n, c)| n == "bn2.num_batches_tracked" && *c == 0));
    }

    #[test]
    fn no_recording_means_no_tape_and_no_grad() {
        let (store, net) = build();
        let mut g = Graph::cpu(store);
        g.set_recording(false);
        let x = uniform(1, 2 * 7 * 6 * 2, -1.0, 1.0);
        let target = uniform(2, 12, -1.0, 1.0);
        let out = forward(&mut g, &net, &x, &target);
        assert!(g.tape().is_empty());
        assert!(g.value(out)[0].is_finite());
    }

    #[test]
    fn steps_reuse_memory_and_lend_gradients() {
        let (store, net) = build();
        let mut g = Graph::cpu(store);
        let x = uniform(1, 2 * 7 * 6 * 2, -1.0, 1.0);
        let target = uniform(2, 12, -1.0, 1.0);
        let out = forward(&mut g, &net, &x, &target);
        g.backward(out).unwrap();
        let bytes = g.device_bytes();
        let first = g.value(out)[0];
        let grads = g.store.grads.clone();
        // Gradients are lent by liveness: the pools hold less than every slot keeping its own.
        let (held, all) = g.grad_bytes();
        assert!(held > 0 && held < all, "held {held} of {all}");
        let out = forward(&mut g, &net, &x, &target);
        g.backward(out).unwrap();
        assert_eq!(g.device_bytes(), bytes, "a repeated step allocates nothing");
        assert_eq!(g.value(out)[0], first, "same inputs, same loss");
        assert_eq!(
            g.store.grads, grads,
            "backward sets the gradients, not adds to the last"
        );
    }
}
