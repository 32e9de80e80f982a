//! The training graph on the GPU: the same [`Tape`] the models are written against, recording the
//! same math as the CPU [`crate::autograd::Graph`], with every op launched on one stream.
//!
//! Memory by hand:
//! - Flat device buffers carved by the store's size table: f32 master parameters, their copy in
//!   the compute dtype `E` (what convolutions and GEMMs read), f32 gradients (what LARS reads),
//!   `E` weight gradients (what cuDNN and cuBLAS write; added into the f32 gradients after
//!   backward), and the f32 BN running statistics. `num_batches_tracked` stays on the host.
//! - An activation arena of slots handed out in op order and reused every step: a slot grows (one
//!   cudaMalloc) only when a step needs it larger than before, so a steady state of equal steps
//!   allocates nothing. Slots hold `E` activations, f32 values (losses, BN statistics, scratch) or
//!   bytes (maxpool argmax).
//! - Errors are sticky, as in CUDA itself: the first failure (out of memory, a launch error) is
//!   kept, later ops do nothing, and [`DevGraph::check`] returns it; the model code stays free of
//!   error plumbing.

use crate::autograd::{dims3, dims4, BnLayer, BnMode, Tape};
use crate::error::{Error, Result};
use crate::gpu::{Gpu, GpuFloat};
use crate::memory::{ParamId, ParamStore};
use crate::ops::aggregate::AggregateParams;
use crate::ops::batchnorm::BnParams;
use crate::ops::concat::ConcatParams;
use crate::ops::conv::ConvParams;
use crate::ops::l2norm::L2NormParams;
use crate::ops::linear::LinearParams;
use crate::ops::loss::LossParams;
use crate::ops::pool::PoolParams;
use crate::ops::softmax::AlignParams;
use crate::ops::{self};
use crate::tensor::{Shape, Tensor};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, CudaView, DeviceRepr, ValidAsZeroBits};
use std::rc::Rc;

/// A read-only view of a slot's `E` value; a macro, not a method, so it borrows only the fields it
/// reads and other fields (the flat gradient buffers) can be written meanwhile.
macro_rules! ev {
    ($s:expr, $t:expr) => {{
        let m = $s.meta[$t.slot as usize];
        debug_assert_eq!(m.kind, Kind::E, "an f32 or byte tensor read as activations");
        $s.e.get($t.slot as usize, m.len)
    }};
}

/// A read-only view of a slot's `E` gradient.
macro_rules! gv {
    ($s:expr, $t:expr) => {
        $s.ge.get($t.slot as usize, $s.meta[$t.slot as usize].len)
    };
}

/// A parameter in the compute dtype.
macro_rules! wv {
    ($s:expr, $w:expr) => {
        $s.params_c.slice($s.store.table.range($w.0))
    };
}

/// Two windows `$a` before `$b` of one buffer, both writable, bound to `$x` and `$y` in the
/// caller's scope (cudarc's views cannot be re-sliced past the borrow of a local).
macro_rules! two_mut {
    ($buf:expr, $a:expr, $b:expr => $x:ident, $y:ident) => {
        let (a, b) = ($a, $b);
        assert!(a.end <= b.start, "two_mut: {a:?} must lie before {b:?}");
        let (mut lo, mut hi) = $buf.split_at_mut(b.start);
        let mut $x = lo.slice_mut(a);
        let mut $y = hi.slice_mut(..b.end - b.start);
    };
}

/// What a slot stores.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Kind {
    /// Activations in the compute dtype.
    E,
    /// f32: losses, BN statistics, scratch.
    F32,
    /// Bytes: maxpool argmax.
    U8,
}

#[derive(Clone, Copy, Debug)]
struct Meta {
    kind: Kind,
    len: usize,
    needs_grad: bool,
}

/// One recorded op (the GPU's fused forms where the CPU tape has several nodes).
#[derive(Clone, Debug)]
enum Node {
    Conv {
        x: Tensor,
        w: ParamId,
        y: Tensor,
        p: ConvParams,
    },
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
        alpha: f32,
    },
    Add {
        a: Tensor,
        b: Tensor,
        y: Tensor,
    },
}

impl Node {
    /// The op's name, for errors.
    fn name(&self) -> &'static str {
        match self {
            Node::Conv { .. } => "conv",
            Node::Bn { .. } => "batchnorm",
            Node::MaxPool { .. } => "maxpool",
            Node::AvgPool { .. } => "avgpool",
            Node::Linear { .. } => "linear",
            Node::Concat { .. } => "concat",
            Node::Split { .. } => "split",
            Node::Align { .. } => "align",
            Node::Aggregate { .. } => "aggregate",
            Node::Loss { .. } => "loss",
            Node::Scale { .. } => "scale",
            Node::Add { .. } => "add",
        }
    }
}

/// Per-slot device storage of one element type, grown on demand and kept across steps. The
/// gradient pools also lend buffers for part of a step: [`Pool::acquire`] and [`Pool::release`]
/// move them between slots and a spare list.
struct Pool<T> {
    bufs: Vec<Option<CudaSlice<T>>>,
    spare: Vec<CudaSlice<T>>,
}

impl<T: DeviceRepr + ValidAsZeroBits> Pool<T> {
    fn new() -> Self {
        Pool {
            bufs: Vec::new(),
            spare: Vec::new(),
        }
    }
    /// Lends slot `i` the smallest spare buffer of at least `len` elements, or a new one, zeroed
    /// up to `len`; returns the bytes newly allocated. A step that repeats the one before makes
    /// the same choices, so a steady state allocates nothing.
    fn acquire(&mut self, gpu: &Gpu, i: usize, len: usize) -> Result<usize> {
        if self.bufs.len() <= i {
            self.bufs.resize_with(i + 1, || None);
        }
        assert!(
            self.bufs[i].is_none(),
            "DevGraph: gradient slot {i} lent twice"
        );
        let best = (0..self.spare.len())
            .filter(|&k| self.spare[k].len() >= len)
            .min_by_key(|&k| (self.spare[k].len(), k));
        let (mut b, grown) = match best {
            Some(k) => (self.spare.swap_remove(k), 0),
            None => (
                gpu.zeros::<T>(len.max(1))?,
                len.max(1) * std::mem::size_of::<T>(),
            ),
        };
        let r = gpu.memset_zero(&mut b.slice_mut(..len));
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
        let lent: usize = self.bufs.iter().flatten().map(|b| b.len()).sum();
        lent + self.spare.iter().map(|b| b.len()).sum::<usize>()
    }
    fn release_all(&mut self) {
        for i in 0..self.bufs.len() {
            self.release(i);
        }
    }
    /// Makes slot `i` hold at least `len` elements; returns the bytes newly allocated.
    fn ensure(&mut self, gpu: &Gpu, i: usize, len: usize) -> Result<usize> {
        if self.bufs.len() <= i {
            self.bufs.resize_with(i + 1, || None);
        }
        if self.bufs[i].as_ref().is_some_and(|b| b.len() >= len) {
            return Ok(0);
        }
        let old = self.bufs[i].take().map_or(0, |b| b.len());
        self.bufs[i] = Some(gpu.zeros::<T>(len)?);
        Ok((len.max(1) - old.min(len)) * std::mem::size_of::<T>())
    }
    fn get(&self, i: usize, len: usize) -> CudaView<'_, T> {
        self.bufs[i]
            .as_ref()
            .expect("DevGraph: slot without storage")
            .slice(..len)
    }
    fn take(&mut self, i: usize) -> CudaSlice<T> {
        self.bufs[i].take().expect("DevGraph: slot without storage")
    }
    fn put(&mut self, i: usize, b: CudaSlice<T>) {
        self.bufs[i] = Some(b);
    }
}

/// Parameters, activations and the tape of one model on one GPU, in compute dtype `E`.
pub struct DevGraph<E: GpuFloat> {
    pub gpu: Rc<Gpu>,
    /// Names, shapes and offsets (the host vectors are empty: the values live on the device), and
    /// the `num_batches_tracked` counters.
    pub store: ParamStore<f32>,
    /// f32 master parameters.
    pub params: CudaSlice<f32>,
    /// The parameters in the compute dtype, refreshed from the masters by [`Self::refresh`].
    params_c: CudaSlice<E>,
    /// f32 gradients (BN affine gradients land here directly).
    pub grads: CudaSlice<f32>,
    /// Convolution and linear weight gradients in the compute dtype.
    grads_c: CudaSlice<E>,
    /// BN running statistics.
    pub buffers: CudaSlice<f32>,
    e: Pool<E>,
    f: Pool<f32>,
    u: Pool<u8>,
    ge: Pool<E>,
    gf: Pool<f32>,
    meta: Vec<Meta>,
    tape: Vec<Node>,
    recording: bool,
    err: Option<Error>,
    /// Device bytes held by this graph (flat buffers and arena), which only grows.
    bytes: usize,
}

impl<E: GpuFloat> DevGraph<E>
where
    CudaBlas: Gemm<E>,
{
    /// Uploads a store (parameters and running statistics) to the GPU.
    pub fn new(gpu: Rc<Gpu>, host: &ParamStore<f32>) -> Result<Self> {
        let n = host.table.total;
        let nb = host.buffer_table.total;
        let mut store = host.clone();
        store.params = Vec::new();
        store.grads = Vec::new();
        store.buffers = Vec::new();
        let es = std::mem::size_of::<E>();
        let mut g = DevGraph {
            params: gpu.zeros(n)?,
            params_c: gpu.zeros(n)?,
            grads: gpu.zeros(n)?,
            grads_c: gpu.zeros(n)?,
            buffers: gpu.zeros(nb)?,
            gpu,
            store,
            e: Pool::new(),
            f: Pool::new(),
            u: Pool::new(),
            ge: Pool::new(),
            gf: Pool::new(),
            meta: Vec::new(),
            tape: Vec::new(),
            recording: true,
            err: None,
            bytes: n * (4 + es + 4 + es) + nb * 4,
        };
        g.upload(host)?;
        Ok(g)
    }

    /// Parameters, running statistics and counters from a host store of the same table.
    pub fn upload(&mut self, host: &ParamStore<f32>) -> Result<()> {
        assert_eq!(
            host.table, self.store.table,
            "DevGraph::upload: tables differ"
        );
        let st = &self.gpu.stream;
        st.memcpy_htod(&host.params, &mut self.params)
            .map_err(|e| self.gpu.err("uploading parameters", e))?;
        st.memcpy_htod(&host.buffers, &mut self.buffers)
            .map_err(|e| self.gpu.err("uploading BN statistics", e))?;
        self.store.counters.clone_from(&host.counters);
        self.refresh()
    }

    /// Parameters, running statistics and counters into a host store of the same table (waits).
    pub fn download(&self, host: &mut ParamStore<f32>) -> Result<()> {
        let st = &self.gpu.stream;
        host.params.resize(self.store.table.total, 0.0);
        host.buffers.resize(self.store.buffer_table.total, 0.0);
        st.memcpy_dtoh(&self.params, &mut host.params)
            .map_err(|e| self.gpu.err("downloading parameters", e))?;
        st.memcpy_dtoh(&self.buffers, &mut host.buffers)
            .map_err(|e| self.gpu.err("downloading BN statistics", e))?;
        host.counters.clone_from(&self.store.counters);
        self.gpu.sync()
    }

    /// The f32 gradients on the host (waits).
    pub fn download_grads(&self) -> Result<Vec<f32>> {
        self.gpu.download(&self.grads)
    }

    /// The compute-dtype copy of the parameters from the masters (after every update).
    pub fn refresh(&mut self) -> Result<()> {
        crate::gpu::cast_from_f32_cuda(&self.gpu, &self.params, &mut self.params_c)
    }

    /// Device bytes held by this graph: flat buffers plus the arena's high-water mark.
    pub fn device_bytes(&self) -> usize {
        self.bytes
    }

    /// Forgets activations and the tape; slot memory is kept for the next step.
    pub fn reset(&mut self) {
        self.meta.clear();
        self.tape.clear();
    }

    pub fn set_recording(&mut self, on: bool) {
        self.recording = on;
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

    fn alloc(&mut self, kind: Kind, shape: Shape, needs_grad: bool) -> Tensor {
        let i = self.meta.len();
        let len = shape.numel();
        self.meta.push(Meta {
            kind,
            len,
            needs_grad: needs_grad && self.recording,
        });
        if !self.failed() {
            let gpu = self.gpu.clone();
            let r = match kind {
                Kind::E => self.e.ensure(&gpu, i, len),
                Kind::F32 => self.f.ensure(&gpu, i, len),
                Kind::U8 => self.u.ensure(&gpu, i, len),
            };
            match r {
                Ok(b) => self.bytes += b,
                Err(e) => self.fail(Err(self.oom(e, len * kind_size::<E>(kind)))),
            }
        }
        Tensor {
            slot: i as u32,
            shape,
        }
    }

    /// An allocation failure restated with what was asked and what is free.
    fn oom(&self, e: Error, bytes: usize) -> Error {
        let free = self
            .gpu
            .ctx
            .mem_get_info()
            .map(|(f, t)| format!("{} MiB free of {} MiB", f >> 20, t >> 20))
            .unwrap_or_else(|_| "free memory unknown".into());
        let e = match e {
            Error::OutOfMemory(m) | Error::Cuda(m) => m,
            e => e.to_string(),
        };
        Error::OutOfMemory(format!(
            "{} MiB for activations on {} ({free}; this graph holds {} MiB): {e}",
            bytes.div_ceil(1 << 20),
            self.gpu.name,
            self.bytes >> 20
        ))
    }

    fn ng(&self, t: Tensor) -> bool {
        self.meta[t.slot as usize].needs_grad
    }

    fn kind(&self, t: Tensor) -> Kind {
        self.meta[t.slot as usize].kind
    }

    fn record(&mut self, n: Node) {
        if self.gpu.sync_launch && !self.failed() {
            let r = self.gpu.sync().map_err(|e| {
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

    fn vf(&self, t: Tensor) -> CudaView<'_, f32> {
        let m = self.meta[t.slot as usize];
        debug_assert_eq!(m.kind, Kind::F32);
        self.f.get(t.slot as usize, m.len)
    }

    /// A constant input from host values (images).
    pub fn input(&mut self, shape: Shape, data: &[f32]) -> Tensor {
        assert_eq!(
            data.len(),
            shape.numel(),
            "input: {} values for {shape}",
            data.len()
        );
        let t = self.alloc(Kind::E, shape, false);
        if !self.failed() {
            let h: Vec<E> = data.iter().map(|&v| E::from_f32(v)).collect();
            let i = t.slot as usize;
            let mut b = self.e.take(i);
            let r = self
                .gpu
                .stream
                .memcpy_htod(&h, &mut b.slice_mut(..h.len()))
                .map_err(|e| self.gpu.err("uploading an input", e));
            self.e.put(i, b);
            self.fail(r);
        }
        t
    }

    /// A constant input copied from another graph on the same GPU (the target's outputs).
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
        if !self.failed() {
            let i = t.slot as usize;
            let mut b = self.e.take(i);
            let n = shape.numel();
            let r = crate::data::photometric_cuda::photometric_cuda::<E>(
                &self.gpu,
                bufs,
                crops,
                params,
                shape.dims()[1],
                &mut b.slice_mut(..n),
            );
            self.e.put(i, b);
            self.fail(r);
        }
        t
    }

    pub fn input_from(&mut self, src: &DevGraph<E>, t: Tensor) -> Tensor {
        let y = self.alloc(Kind::E, t.shape, false);
        if let Some(e) = &src.err {
            self.err.get_or_insert(e.again());
        }
        if !self.failed() {
            let i = y.slot as usize;
            let mut b = self.e.take(i);
            let r = self.gpu.copy(&ev!(src, t), &mut b.slice_mut(..t.numel()));
            self.e.put(i, b);
            self.fail(r);
        }
        y
    }

    /// The values of a tensor on the host (waits).
    pub fn fetch(&self, t: Tensor) -> Result<Vec<f32>> {
        if let Some(e) = &self.err {
            return Err(e.again());
        }
        let st = &self.gpu.stream;
        let dl = |e| self.gpu.err("downloading a tensor", e);
        match self.kind(t) {
            Kind::E => {
                let mut h = vec![E::default(); t.numel()];
                st.memcpy_dtoh(&ev!(self, t), &mut h).map_err(dl)?;
                self.gpu.sync()?;
                Ok(h.into_iter().map(E::to_f32).collect())
            }
            Kind::F32 => {
                let mut h = vec![0.0f32; t.numel()];
                st.memcpy_dtoh(&self.vf(t), &mut h).map_err(dl)?;
                self.gpu.sync()?;
                Ok(h)
            }
            Kind::U8 => panic!("fetch: byte tensors are internal"),
        }
    }

    /// Queues the copy of an f32 tensor (a loss) into page-locked memory without waiting; the
    /// bytes are there once `dst.bytes()` returns.
    pub fn queue_fetch(&self, t: Tensor, dst: &mut crate::data::pinned::PinnedBuf) -> Result<()> {
        if let Some(e) = &self.err {
            return Err(e.again());
        }
        assert_eq!(self.kind(t), Kind::F32, "queue_fetch: f32 tensors only");
        assert_eq!(dst.len(), t.numel() * 4, "queue_fetch: destination size");
        let v = self.vf(t);
        let (ptr, _rec) = cudarc::driver::DevicePtr::device_ptr(&v, &self.gpu.stream);
        dst.download_from(&self.gpu.stream, ptr)
            .map_err(|e| self.gpu.err("queuing the download of a tensor", e))
    }

    /// Runs `f` with slot `y`'s `E` storage taken out (so other slots can be read meanwhile).
    fn with_e(&mut self, y: Tensor, f: impl FnOnce(&Self, &mut CudaSlice<E>) -> Result<()>) {
        if self.failed() {
            return;
        }
        let i = y.slot as usize;
        let mut b = self.e.take(i);
        let r = f(self, &mut b);
        self.e.put(i, b);
        self.fail(r);
    }

    // ------------------------------------------------------------------------
    // Backward

    /// d(out)/d(everything): seeds d out = 1, replays the tape in reverse, then adds the
    /// compute-dtype weight gradients into the f32 gradients. Returns the first error of the
    /// step, forward included.
    ///
    /// Activation gradients live only while backward needs them: a slot's gradient is lent a
    /// zeroed buffer at the first node that touches it (the last of its consumers; backward runs
    /// the tape in reverse) and gives it back after the last (the node that produced it), so the
    /// peak is the widest set alive at once, not the sum over the network.
    pub fn backward(&mut self, out: Tensor) -> Result<()> {
        assert_eq!(out.numel(), 1, "backward: output must be a scalar");
        assert_eq!(self.kind(out), Kind::F32, "backward: output must be a loss");
        self.check()?;
        let gpu = self.gpu.clone();
        self.ge.release_all();
        self.gf.release_all();
        let tape = std::mem::take(&mut self.tape);
        let (born, dies) = grad_spans(&tape, &self.meta);
        let r = (|| {
            gpu.memset_zero(&mut self.grads)?;
            gpu.memset_zero(&mut self.grads_c)?;
            self.lend(out.slot)?;
            {
                // d out = 1.0 by a memset of its bits: nothing to upload, nothing to wait for.
                let b = self.gf.take(out.slot as usize);
                let (ptr, rec) = cudarc::driver::DevicePtr::device_ptr(&b, &gpu.stream);
                let r = unsafe {
                    cudarc::driver::sys::cuMemsetD32Async(
                        ptr,
                        1.0f32.to_bits(),
                        1,
                        gpu.stream.cu_stream(),
                    )
                    .result()
                }
                .map_err(|e| gpu.err("seeding the loss gradient", e));
                drop(rec);
                self.gf.put(out.slot as usize, b);
                r?;
            }
            for (j, node) in tape.iter().enumerate().rev() {
                for &s in &born[j] {
                    if s != out.slot {
                        self.lend(s)?;
                    }
                }
                self.backward_node(node)?;
                if gpu.sync_launch {
                    gpu.sync().map_err(|e| {
                        Error::Other(format!("backward of node {j} ({}): {e}", node.name()))
                    })?;
                }
                for &s in &dies[j] {
                    match self.meta[s as usize].kind {
                        Kind::E => self.ge.release(s as usize),
                        _ => self.gf.release(s as usize),
                    }
                }
            }
            Ok(())
        })();
        self.tape = tape;
        self.ge.release_all();
        self.gf.release_all();
        r?;
        crate::gpu::accum_f32_cuda(&gpu, &self.grads_c, &mut self.grads)
    }

    /// Activation-gradient bytes: (held by the gradient pools, which is the peak of what
    /// backward kept alive at once, needed were every slot to keep its own).
    pub fn grad_bytes(&self) -> (usize, usize) {
        let held = self.ge.held() * std::mem::size_of::<E>() + self.gf.held() * 4;
        let all = self
            .meta
            .iter()
            .filter(|m| m.needs_grad)
            .map(|m| m.len * kind_size::<E>(m.kind))
            .sum();
        (held, all)
    }

    /// Lends slot `i` a zeroed gradient buffer of its kind.
    fn lend(&mut self, i: u32) -> Result<()> {
        let i = i as usize;
        let m = self.meta[i];
        let grown = match m.kind {
            Kind::E => self.ge.acquire(&self.gpu, i, m.len),
            _ => self.gf.acquire(&self.gpu, i, m.len),
        }
        .map_err(|e| self.oom(e, m.len * kind_size::<E>(m.kind)))?;
        self.bytes += grown;
        Ok(())
    }

    fn gf_view(&self, t: Tensor) -> CudaView<'_, f32> {
        self.gf.get(t.slot as usize, self.meta[t.slot as usize].len)
    }

    /// Runs `f` with the `E` gradient of `t` taken out, if `t` takes a gradient.
    fn with_ge(
        &mut self,
        t: Tensor,
        f: impl FnOnce(&Self, &mut CudaSlice<E>, usize) -> Result<()>,
    ) -> Result<()> {
        if !self.ng(t) {
            return Ok(());
        }
        let i = t.slot as usize;
        let mut b = self.ge.take(i);
        let r = f(self, &mut b, self.meta[i].len);
        self.ge.put(i, b);
        r
    }

    fn backward_node(&mut self, node: &Node) -> Result<()> {
        let gpu = self.gpu.clone();
        let g = &*gpu;
        match *node {
            Node::Conv { x, w, y, p } => {
                let r = self.store.table.range(w.0);
                let dw = &mut self.grads_c.slice_mut(r);
                ops::conv::backward_weight_cuda(g, &p, &ev!(self, x), &gv!(self, y), dw)?;
                self.with_ge(x, |s, dx, n| {
                    ops::conv::backward_data_cuda(
                        g,
                        &p,
                        &gv!(s, y),
                        &wv!(s, w),
                        &mut dx.slice_mut(..n),
                    )
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
                assert!(self.ng(x), "DevGraph: batch norm of a constant");
                let c = p.c as usize;
                let groups = if train { p.groups() } else { 1 };
                let (gr, br) = (
                    self.store.table.range(bn.gamma.0),
                    self.store.table.range(bn.beta.0),
                );
                let mut dres_buf = match res {
                    Some(r) if self.ng(r) => Some(self.ge.take(r.slot as usize)),
                    _ => None,
                };
                let i = x.slot as usize;
                let mut dx = self.ge.take(i);
                let sv = self.f.get(saved.slot as usize, 2 * groups * c);
                let (mean, rstd) = sv.split_at(groups * c);
                let gamma = self.params.slice(gr.clone());
                two_mut!(self.grads, gr, br => dgamma, dbeta);
                let out = ops::batchnorm::backward_cuda(
                    g,
                    &p,
                    train,
                    &ev!(self, x),
                    &gv!(self, y),
                    relu.then(|| ev!(self, y)),
                    (&mean, &rstd),
                    &gamma,
                    (&mut dgamma, &mut dbeta),
                    &mut dx.slice_mut(..self.meta[i].len),
                    dres_buf
                        .as_mut()
                        .map(|b| b.slice_mut(..self.meta[res.unwrap().slot as usize].len)),
                );
                self.ge.put(i, dx);
                if let (Some(b), Some(r)) = (dres_buf, res) {
                    self.ge.put(r.slot as usize, b);
                }
                out
            }
            Node::MaxPool { x, argmax, p, y } => self.with_ge(x, |s, dx, n| {
                let am =
                    s.u.get(argmax.slot as usize, s.meta[argmax.slot as usize].len);
                ops::pool::maxpool_backward_cuda(g, &p, &gv!(s, y), &am, &mut dx.slice_mut(..n))
            }),
            Node::AvgPool { x, y, p } => self.with_ge(x, |s, dx, n| {
                ops::pool::avgpool_backward_cuda(g, &p, &gv!(s, y), &mut dx.slice_mut(..n))
            }),
            Node::Linear { x, w, y, p } => {
                let r = self.store.table.range(w.0);
                let dw = &mut self.grads_c.slice_mut(r);
                ops::linear::backward_weight_cuda(g, &p, &ev!(self, x), &gv!(self, y), dw)?;
                self.with_ge(x, |s, dx, n| {
                    ops::linear::backward_data_cuda(
                        g,
                        &p,
                        &gv!(s, y),
                        &wv!(s, w),
                        &mut dx.slice_mut(..n),
                    )
                })
            }
            Node::Concat { g: gt, x, u, p } => {
                // The kernel writes both input gradients in one pass; a constant side gets scratch.
                let (ig, ix) = (gt.slot as usize, x.slot as usize);
                let mut dg = if self.ng(gt) {
                    self.ge.take(ig)
                } else {
                    g.zeros(gt.numel())?
                };
                let mut dx = if self.ng(x) {
                    self.ge.take(ix)
                } else {
                    g.zeros(x.numel())?
                };
                let r = ops::concat::concat_backward_cuda(
                    g,
                    &p,
                    &gv!(self, u),
                    &mut dg.slice_mut(..gt.numel()),
                    &mut dx.slice_mut(..x.numel()),
                );
                if self.ng(gt) {
                    self.ge.put(ig, dg);
                }
                if self.ng(x) {
                    self.ge.put(ix, dx);
                }
                r
            }
            Node::Split { z, zg, a, p } => self.with_ge(z, |s, dz, n| {
                ops::concat::split_backward_cuda(
                    g,
                    &p,
                    &gv!(s, zg),
                    &gv!(s, a),
                    &mut dz.slice_mut(..n),
                )
            }),
            Node::Align { x, y, scratch, p } => {
                let i = scratch.slot as usize;
                let mut sc = self.f.take(i);
                let len = self.meta[i].len;
                let r = self.with_ge(x, |s, dx, n| {
                    ops::softmax::align_backward_cuda(
                        g,
                        &p,
                        (&ev!(s, x), &ev!(s, y), &gv!(s, y)),
                        &mut sc.slice_mut(..len),
                        &mut dx.slice_mut(..n),
                    )
                });
                self.f.put(i, sc);
                r
            }
            Node::Aggregate { x, w, v, p } => {
                let (ix, iw) = (x.slot as usize, w.slot as usize);
                let mut dx = if self.ng(x) {
                    self.ge.take(ix)
                } else {
                    g.zeros(x.numel())?
                };
                let mut dw = if self.ng(w) {
                    self.ge.take(iw)
                } else {
                    g.zeros(w.numel())?
                };
                let r = ops::aggregate::backward_cuda(
                    g,
                    &p,
                    (&ev!(self, x), &ev!(self, w), &gv!(self, v)),
                    &mut dx.slice_mut(..x.numel()),
                    &mut dw.slice_mut(..w.numel()),
                );
                if self.ng(x) {
                    self.ge.put(ix, dx);
                }
                if self.ng(w) {
                    self.ge.put(iw, dw);
                }
                r
            }
            Node::Loss { pred, target, y, p } => self.with_ge(pred, |s, dp, n| {
                ops::loss::backward_cuda(
                    g,
                    &p,
                    (&ev!(s, pred), &ev!(s, target)),
                    &s.gf_view(y),
                    &mut dp.slice_mut(..n),
                )
            }),
            Node::Scale { x, y, alpha } => self.axpy_grad(x, y, alpha),
            Node::Add { a, b, y } => {
                self.axpy_grad(a, y, 1.0)?;
                self.axpy_grad(b, y, 1.0)
            }
        }
    }

    /// dx += alpha * dy, in the slots' own kind.
    fn axpy_grad(&mut self, x: Tensor, y: Tensor, alpha: f32) -> Result<()> {
        if !self.ng(x) {
            return Ok(());
        }
        let gpu = self.gpu.clone();
        let i = x.slot as usize;
        let n = self.meta[i].len;
        match self.kind(x) {
            Kind::E => {
                let mut dx = self.ge.take(i);
                let r = ops::add::scale_backward_cuda(
                    &gpu,
                    &gv!(self, y),
                    alpha,
                    &mut dx.slice_mut(..n),
                );
                self.ge.put(i, dx);
                r
            }
            _ => {
                let mut dx = self.gf.take(i);
                let r = ops::add::scale_backward_cuda(
                    &gpu,
                    &self.gf_view(y),
                    alpha,
                    &mut dx.slice_mut(..n),
                );
                self.gf.put(i, dx);
                r
            }
        }
    }
}

/// The gradient slots each backward node touches: the inputs whose gradients it adds to, and the
/// outputs whose gradients it reads.
fn grad_touches(n: &Node) -> Vec<Tensor> {
    match *n {
        Node::Conv { x, y, .. }
        | Node::MaxPool { x, y, .. }
        | Node::AvgPool { x, y, .. }
        | Node::Linear { x, y, .. }
        | Node::Align { x, y, .. }
        | Node::Scale { x, y, .. } => vec![x, y],
        Node::Bn { x, y, res, .. } => [Some(x), Some(y), res].into_iter().flatten().collect(),
        Node::Concat { g, x, u, .. } => vec![g, x, u],
        Node::Split { z, zg, a, .. } => vec![z, zg, a],
        Node::Aggregate { x, w, v, .. } => vec![x, w, v],
        Node::Loss { pred, y, .. } => vec![pred, y],
        Node::Add { a, b, y } => vec![a, b, y],
    }
}

/// For each node of the tape, the gradient slots first touched there by backward (which runs
/// the tape in reverse) and the ones last touched there.
fn grad_spans(tape: &[Node], meta: &[Meta]) -> (Vec<Vec<u32>>, Vec<Vec<u32>>) {
    let (mut first, mut last) = (vec![None; meta.len()], vec![None; meta.len()]);
    for (j, n) in tape.iter().enumerate() {
        for t in grad_touches(n) {
            let s = t.slot as usize;
            if meta[s].needs_grad {
                first[s] = Some(j);
                last[s].get_or_insert(j);
            }
        }
    }
    let (mut born, mut dies) = (vec![Vec::new(); tape.len()], vec![Vec::new(); tape.len()]);
    for s in 0..meta.len() {
        if let (Some(f), Some(l)) = (first[s], last[s]) {
            born[f].push(s as u32);
            dies[l].push(s as u32);
        }
    }
    (born, dies)
}

fn kind_size<E>(k: Kind) -> usize {
    match k {
        Kind::E => std::mem::size_of::<E>(),
        Kind::F32 => 4,
        Kind::U8 => 1,
    }
}

impl<E: GpuFloat> Tape for DevGraph<E>
where
    CudaBlas: Gemm<E>,
{
    fn param_shape(&self, w: ParamId) -> Shape {
        self.store.shape(w)
    }

    fn reshape(&self, t: Tensor, shape: Shape) -> Tensor {
        assert_eq!(t.numel(), shape.numel(), "reshape: {} to {shape}", t.shape);
        Tensor {
            slot: t.slot,
            shape,
        }
    }

    fn conv2d(&mut self, x: Tensor, w: ParamId, stride: usize, pad: usize) -> Tensor {
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
            ops::conv::forward_cuda(
                &s.gpu,
                &p,
                &ev!(s, x),
                &wv!(s, w),
                &mut yb.slice_mut(..y.numel()),
            )
        });
        self.record(Node::Conv { x, w, y, p });
        y
    }

    fn bn_act(
        &mut self,
        x: Tensor,
        bn: BnLayer,
        mode: BnMode,
        res: Option<Tensor>,
        relu: bool,
    ) -> Tensor {
        let c = x.shape.dim(-1);
        let rows = x.numel() / c;
        let per_sample = rows / x.shape.dim(0);
        let mut p = BnParams::new(rows, c);
        if let BnMode::TrainGhost(samples) = mode {
            p = p.ghost(samples * per_sample);
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
        let y = self.alloc(Kind::E, x.shape, true);
        let saved = self.alloc(Kind::F32, Shape::new(&[2, groups, c]), false);
        if train {
            self.store.counters[bn.num_batches_tracked.0].1 += 1;
        }
        if !self.failed() {
            let (rm, rv) = (
                self.store.buffer_table.range(bn.running_mean.0),
                self.store.buffer_table.range(bn.running_var.0),
            );
            let mut sv = self.f.take(saved.slot as usize);
            let mut yb = self.e.take(y.slot as usize);
            let mut svv = sv.slice_mut(..2 * groups * c);
            let (mut mean, mut rstd) = svv.split_at_mut(groups * c);
            let (gr, br) = (
                self.store.table.range(bn.gamma.0),
                self.store.table.range(bn.beta.0),
            );
            let (gamma, beta) = (self.params.slice(gr), self.params.slice(br));
            let resv = res.map(|r| ev!(self, r));
            let xv = ev!(self, x);
            let yv = &mut yb.slice_mut(..y.numel());
            let r = if train {
                two_mut!(self.buffers, rm, rv => rmv, rvv);
                ops::batchnorm::forward_train_cuda(
                    &self.gpu,
                    &p,
                    &xv,
                    (&gamma, &beta),
                    (&mut rmv, &mut rvv),
                    resv,
                    relu,
                    yv,
                    (&mut mean, &mut rstd),
                )
            } else {
                let (rmv, rvv) = (self.buffers.slice(rm), self.buffers.slice(rv));
                ops::batchnorm::forward_eval_cuda(
                    &self.gpu,
                    &p,
                    &xv,
                    (&gamma, &beta),
                    (&rmv, &rvv),
                    resv,
                    relu,
                    yv,
                    (&mut mean, &mut rstd),
                )
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

    fn maxpool(&mut self, x: Tensor, k: usize, stride: usize, pad: usize) -> Tensor {
        let [n, h, w, c] = dims4("maxpool", x.shape);
        let p = PoolParams::max(n, h, w, c, k, stride, pad);
        let shape = Shape::new(&[n, p.h_out as usize, p.w_out as usize, c]);
        let y = self.alloc(Kind::E, shape, self.ng(x));
        let argmax = self.alloc(Kind::U8, shape, false);
        if !self.failed() {
            let mut am = self.u.take(argmax.slot as usize);
            self.with_e(y, |s, yb| {
                ops::pool::maxpool_forward_cuda(
                    &s.gpu,
                    &p,
                    &ev!(s, x),
                    &mut yb.slice_mut(..y.numel()),
                    &mut am.slice_mut(..y.numel()),
                )
            });
            self.u.put(argmax.slot as usize, am);
        }
        self.record(Node::MaxPool { x, argmax, p, y });
        y
    }

    fn avgpool(&mut self, x: Tensor) -> Tensor {
        let [n, h, w, c] = dims4("avgpool", x.shape);
        let p = PoolParams::global_avg(n, h, w, c);
        let y = self.alloc(Kind::E, Shape::new(&[n, c]), self.ng(x));
        self.with_e(y, |s, yb| {
            ops::pool::avgpool_forward_cuda(&s.gpu, &p, &ev!(s, x), &mut yb.slice_mut(..y.numel()))
        });
        self.record(Node::AvgPool { x, y, p });
        y
    }

    fn linear(&mut self, x: Tensor, w: ParamId) -> Tensor {
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
            ops::linear::forward_cuda(
                &s.gpu,
                &p,
                &ev!(s, x),
                &wv!(s, w),
                &mut yb.slice_mut(..y.numel()),
            )
        });
        self.record(Node::Linear { x, w, y, p });
        y
    }

    fn concat_positions(&mut self, g: Tensor, x: Tensor) -> Tensor {
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
        self.with_e(u, |s, ub| {
            ops::concat::concat_cuda(
                &s.gpu,
                &p,
                &ev!(s, g),
                &ev!(s, x),
                &mut ub.slice_mut(..u.numel()),
            )
        });
        self.record(Node::Concat { g, x, u, p });
        u
    }

    fn split_positions(&mut self, z: Tensor) -> (Tensor, Tensor) {
        let [b, l1, d] = dims3("split", z.shape);
        let p = ConcatParams::new(b, l1 - 1, d);
        let zg = self.alloc(Kind::E, Shape::new(&[b, d]), self.ng(z));
        let a = self.alloc(Kind::E, Shape::new(&[b, l1 - 1, d]), self.ng(z));
        if !self.failed() {
            let mut ab = self.e.take(a.slot as usize);
            self.with_e(zg, |s, gb| {
                ops::concat::split_cuda(
                    &s.gpu,
                    &p,
                    &ev!(s, z),
                    &mut gb.slice_mut(..zg.numel()),
                    &mut ab.slice_mut(..a.numel()),
                )
            });
            self.e.put(a.slot as usize, ab);
        }
        self.record(Node::Split { z, zg, a, p });
        (zg, a)
    }

    fn align_maps(&mut self, a: Tensor, scale: f32) -> Tensor {
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
        let scratch = self.alloc(Kind::F32, Shape::new(&[scratch_len]), false);
        self.with_e(y, |s, yb| {
            ops::softmax::align_forward_cuda(&s.gpu, &p, &ev!(s, a), &mut yb.slice_mut(..y.numel()))
        });
        self.record(Node::Align {
            x: a,
            y,
            scratch,
            p,
        });
        y
    }

    fn aggregate(&mut self, x: Tensor, w: Tensor, heads: usize) -> Tensor {
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
            ops::aggregate::forward_cuda(
                &s.gpu,
                &p,
                &ev!(s, x),
                &ev!(s, w),
                &mut vb.slice_mut(..v.numel()),
            )
        });
        self.record(Node::Aggregate { x, w, v, p });
        v
    }

    fn loss(&mut self, pred: Tensor, target: Tensor) -> Tensor {
        assert_eq!(
            pred.numel(),
            target.numel(),
            "loss: pred {} vs target {}",
            pred.shape,
            target.shape
        );
        let d = pred.shape.dim(-1);
        let p = LossParams::new(pred.numel() / d, d);
        let y = self.alloc(Kind::F32, Shape::scalar(), self.ng(pred));
        let cosv = self.alloc(Kind::F32, Shape::new(&[pred.numel() / d]), false);
        if !self.failed() {
            let (iy, ic) = (y.slot as usize, cosv.slot as usize);
            let (mut yb, mut cb) = (self.f.take(iy), self.f.take(ic));
            let r = ops::loss::forward_cuda(
                &self.gpu,
                &p,
                (&ev!(self, pred), &ev!(self, target)),
                &mut cb.slice_mut(..cosv.numel()),
                &mut yb.slice_mut(..1),
            );
            self.f.put(iy, yb);
            self.f.put(ic, cb);
            self.fail(r);
        }
        self.record(Node::Loss { pred, target, y, p });
        y
    }

    fn scale(&mut self, x: Tensor, alpha: f64) -> Tensor {
        let kind = self.kind(x);
        let y = self.alloc(kind, x.shape, self.ng(x));
        let alpha = alpha as f32;
        if !self.failed() {
            let gpu = self.gpu.clone();
            let i = y.slot as usize;
            let r = match kind {
                Kind::E => {
                    let mut b = self.e.take(i);
                    let r = ops::add::scale_forward_cuda(
                        &gpu,
                        &ev!(self, x),
                        alpha,
                        &mut b.slice_mut(..y.numel()),
                    );
                    self.e.put(i, b);
                    r
                }
                _ => {
                    let mut b = self.f.take(i);
                    let r = ops::add::scale_forward_cuda(
                        &gpu,
                        &self.vf(x),
                        alpha,
                        &mut b.slice_mut(..y.numel()),
                    );
                    self.f.put(i, b);
                    r
                }
            };
            self.fail(r);
        }
        self.record(Node::Scale { x, y, alpha });
        y
    }

    fn add(&mut self, a: Tensor, b: Tensor) -> Tensor {
        assert_eq!(a.shape, b.shape, "add: {} + {}", a.shape, b.shape);
        let kind = self.kind(a);
        assert_eq!(kind, self.kind(b), "add: operands of different storage");
        let y = self.alloc(kind, a.shape, self.ng(a) || self.ng(b));
        if !self.failed() {
            let gpu = self.gpu.clone();
            let i = y.slot as usize;
            let r = match kind {
                Kind::E => {
                    let mut o = self.e.take(i);
                    let r = ops::add::forward_cuda(
                        &gpu,
                        &ev!(self, a),
                        &ev!(self, b),
                        &mut o.slice_mut(..y.numel()),
                    );
                    self.e.put(i, o);
                    r
                }
                _ => {
                    let mut o = self.f.take(i);
                    let r = ops::add::forward_cuda(
                        &gpu,
                        &self.vf(a),
                        &self.vf(b),
                        &mut o.slice_mut(..y.numel()),
                    );
                    self.f.put(i, o);
                    r
                }
            };
            self.fail(r);
        }
        self.record(Node::Add { a, b, y });
        y
    }
}
