//! The device a [`crate::graph::Graph`] runs on: its buffers, windows of them, copies, and where a
//! model's weights live. The graph records and replays ops once for every device; the op kernels
//! are per op family traits in `src/ops/<op>.rs` (`graph::Kernels` gathers them), each implemented
//! there for both backends:
//! - [`Cpu<T>`]: host vectors, the reference functions of `src/ops/` in `T` (f32; f64 for gradient
//!   checks). Activations, parameters and statistics all in `T`; the weights stay in the graph's
//!   `ParamStore` itself.
//! - [`Cuda<E>`]: one GPU, activations in `E` (f32 or bf16), parameters, gradients, statistics and
//!   losses in f32, the weights in flat device buffers ([`DevWeights`]) with a copy of the
//!   parameters in `E` for the convolutions and GEMMs.

use crate::error::{Error, Result};
pub use crate::gpu::Elem;
use crate::gpu::{Dev, Gpu, GpuFloat};
use crate::memory::ParamStore;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, CudaView, CudaViewMut};
use num_traits::Float;
use std::ops::Range;
use std::rc::Rc;
use std::sync::Mutex;

/// A read-only window of a backend's buffer.
pub type View<'a, B, T> = <B as Backend>::View<'a, T>;
/// A writable window of a backend's buffer.
pub type ViewMut<'a, B, T> = <B as Backend>::ViewMut<'a, T>;
/// Activations (the compute dtype).
pub type Ve<'a, B> = View<'a, B, <B as Backend>::E>;
pub type VeMut<'a, B> = ViewMut<'a, B, <B as Backend>::E>;
/// Parameters, gradients, statistics, losses (f32 on the GPU).
pub type Vf<'a, B> = View<'a, B, <B as Backend>::F>;
pub type VfMut<'a, B> = ViewMut<'a, B, <B as Backend>::F>;

/// Buffers, windows and weights of one device.
pub trait Backend: Sized {
    /// Activations and convolution/GEMM operands.
    type E: Elem;
    /// Parameters, gradients, BN statistics, losses.
    type F: Elem + Float;
    /// Maxpool argmax.
    type I: Elem;
    type Buf<T: Elem>;
    type View<'a, T: Elem>;
    type ViewMut<'a, T: Elem>;
    /// The weights where they are not the store's host vectors.
    type Weights;
    /// A point on the device's timeline: an instant on the CPU, a CUDA event on a GPU (step
    /// times, and the profiler's node times without synchronizing).
    type Mark;

    /// A point now, in the device's order of work (reusing `reuse` where it can).
    fn mark(&self, reuse: Option<Self::Mark>) -> Result<Self::Mark>;
    /// Milliseconds from one point to a later one (both passed on a GPU: after a sync).
    fn elapsed_ms(&self, from: &Self::Mark, to: &Self::Mark) -> Result<f64>;

    fn alloc<T: Elem>(&self, n: usize) -> Result<Self::Buf<T>>;
    fn len<T: Elem>(b: &Self::Buf<T>) -> usize;
    /// Zeroes the first `n` elements.
    fn zero<T: Elem>(&self, b: &mut Self::Buf<T>, n: usize) -> Result<()>;
    fn view<T: Elem>(b: &Self::Buf<T>, r: Range<usize>) -> Self::View<'_, T>;
    fn view_mut<T: Elem>(b: &mut Self::Buf<T>, r: Range<usize>) -> Self::ViewMut<'_, T>;
    fn copy<T: Elem>(&self, src: &Self::View<'_, T>, dst: &mut Self::ViewMut<'_, T>) -> Result<()>;
    /// Host values into activations.
    fn upload_e(&self, src: &[Self::F], dst: &mut Self::ViewMut<'_, Self::E>) -> Result<()>;
    /// Host values into an `F` window (labels, constants).
    fn upload_f(&self, src: &[Self::F], dst: &mut Self::ViewMut<'_, Self::F>) -> Result<()>;
    /// A window's values on the host (waits).
    fn download<T: Elem>(&self, v: &Self::View<'_, T>) -> Result<Vec<T>>;
    fn e_to_f(v: Self::E) -> Self::F;
    /// Sets the first element to 1 (the seed of backward).
    fn seed_one(&self, b: &mut Self::Buf<Self::F>) -> Result<()>;
    /// Wait and check after every node (`LEWEL_SYNC_LAUNCH=1`).
    fn sync_launch(&self) -> bool;
    /// Opens a named range around the launches that follow (NVTX on a GPU, for Nsight); ranges
    /// nest and [`Backend::range_pop`] closes the innermost.
    fn range_push(&self, name: &'static std::ffi::CStr);
    fn range_pop(&self);
    fn sync(&self) -> Result<()>;
    /// An allocation failure of `bytes`, restated with what the device has and the graph holds.
    fn out_of_memory(&self, e: Error, bytes: usize, held: usize) -> Error;

    /// The weights of `store` on this device; returns them with their bytes.
    fn weights(&self, store: &mut ParamStore<Self::F>) -> Result<(Self::Weights, usize)>;
    /// The parameters in the compute dtype (what convolutions and GEMMs read).
    fn compute_params<'a>(
        st: &'a ParamStore<Self::F>,
        w: &'a Self::Weights,
    ) -> &'a Self::Buf<Self::E>;
    /// The weight gradients in the compute dtype (what convolutions and GEMMs write).
    fn weight_grads<'a>(
        st: &'a mut ParamStore<Self::F>,
        w: &'a mut Self::Weights,
    ) -> &'a mut Self::Buf<Self::E>;
    /// (parameters, their gradients, BN running statistics), all in `F`.
    #[allow(clippy::type_complexity)]
    fn f_side<'a>(
        st: &'a mut ParamStore<Self::F>,
        w: &'a mut Self::Weights,
    ) -> (
        &'a mut Self::Buf<Self::F>,
        &'a mut Self::Buf<Self::F>,
        &'a mut Self::Buf<Self::F>,
    );
    /// The compute-dtype copy of the parameters from the masters (after every update).
    fn refresh(&self, st: &mut ParamStore<Self::F>, w: &mut Self::Weights) -> Result<()>;
    /// A buffer holding host values.
    fn upload_buf<T: Elem>(&self, v: &[T]) -> Result<Self::Buf<T>>;
    /// The store with its values on the host: `st` itself where they live there, else
    /// downloaded into `cache` (waits).
    fn host_store<'a>(
        &self,
        st: &'a ParamStore<Self::F>,
        w: &Self::Weights,
        cache: &'a mut ParamStore<Self::F>,
    ) -> Result<&'a ParamStore<Self::F>>;
    /// A buffer's values on the host: the buffer itself where it lives there, else downloaded
    /// into `cache` (waits).
    fn host_vec<'a, T: Elem>(&self, b: &'a Self::Buf<T>, cache: &'a mut Vec<T>) -> Result<&'a [T]>;
    /// Zeroes every parameter gradient (the start of backward).
    fn zero_grads(&self, st: &mut ParamStore<Self::F>, w: &mut Self::Weights) -> Result<()>;
    /// Folds the compute-dtype weight gradients in `r` (of the flat table) into the `F` gradients
    /// (the end of backward, or of a gradient bucket's part of it).
    fn finish_grads(
        &self,
        st: &mut ParamStore<Self::F>,
        w: &mut Self::Weights,
        r: Range<usize>,
    ) -> Result<()>;
}

// ----------------------------------------------------------------------------
// CPU

/// The CPU in `T`: the reference functions on host vectors.
pub struct Cpu<T> {
    /// A temporary of the fused nodes' CPU forms (the masked gradient of BN+ReLU, the L2-normalized
    /// rows of the alignment map), kept so a steady state allocates nothing.
    scratch: Mutex<Vec<T>>,
}

impl<T> Clone for Cpu<T> {
    /// Another handle on the CPU (with its own temporary).
    fn clone(&self) -> Self {
        Cpu::default()
    }
}

impl<T> Default for Cpu<T> {
    fn default() -> Self {
        Cpu {
            scratch: Mutex::new(Vec::new()),
        }
    }
}

impl<T: Float + Elem> Cpu<T> {
    /// Runs `f` on a zeroed temporary of `n` elements.
    pub(crate) fn with_scratch<R>(&self, n: usize, f: impl FnOnce(&mut [T]) -> R) -> R {
        let mut s = self.scratch.lock().unwrap_or_else(|e| e.into_inner());
        s.clear();
        s.resize(n, T::zero());
        f(&mut s)
    }
}

impl<T: Float + Elem> Backend for Cpu<T> {
    type E = T;
    type F = T;
    type I = T;
    type Buf<U: Elem> = Vec<U>;
    type View<'a, U: Elem> = &'a [U];
    type ViewMut<'a, U: Elem> = &'a mut [U];
    type Weights = ();
    type Mark = std::time::Instant;

    fn mark(&self, _reuse: Option<std::time::Instant>) -> Result<std::time::Instant> {
        Ok(std::time::Instant::now())
    }
    fn elapsed_ms(&self, from: &std::time::Instant, to: &std::time::Instant) -> Result<f64> {
        Ok(to.duration_since(*from).as_secs_f64() * 1e3)
    }

    fn alloc<U: Elem>(&self, n: usize) -> Result<Vec<U>> {
        Ok(vec![U::default(); n])
    }
    fn len<U: Elem>(b: &Vec<U>) -> usize {
        b.len()
    }
    fn zero<U: Elem>(&self, b: &mut Vec<U>, n: usize) -> Result<()> {
        b[..n].fill(U::default());
        Ok(())
    }
    fn view<U: Elem>(b: &Vec<U>, r: Range<usize>) -> &[U] {
        &b[r]
    }
    fn view_mut<U: Elem>(b: &mut Vec<U>, r: Range<usize>) -> &mut [U] {
        &mut b[r]
    }
    fn copy<U: Elem>(&self, src: &&[U], dst: &mut &mut [U]) -> Result<()> {
        dst[..src.len()].copy_from_slice(src);
        Ok(())
    }
    fn upload_e(&self, src: &[T], dst: &mut &mut [T]) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn upload_f(&self, src: &[T], dst: &mut &mut [T]) -> Result<()> {
        dst.copy_from_slice(src);
        Ok(())
    }
    fn download<U: Elem>(&self, v: &&[U]) -> Result<Vec<U>> {
        Ok(v.to_vec())
    }
    fn e_to_f(v: T) -> T {
        v
    }
    fn seed_one(&self, b: &mut Vec<T>) -> Result<()> {
        b[0] = T::one();
        Ok(())
    }
    fn sync_launch(&self) -> bool {
        false
    }
    fn range_push(&self, _name: &'static std::ffi::CStr) {}
    fn range_pop(&self) {}
    fn sync(&self) -> Result<()> {
        Ok(())
    }
    fn out_of_memory(&self, e: Error, _bytes: usize, _held: usize) -> Error {
        e
    }
    fn weights(&self, _store: &mut ParamStore<T>) -> Result<((), usize)> {
        Ok(((), 0))
    }
    fn compute_params<'a>(st: &'a ParamStore<T>, _w: &'a ()) -> &'a Vec<T> {
        &st.params
    }
    fn weight_grads<'a>(st: &'a mut ParamStore<T>, _w: &'a mut ()) -> &'a mut Vec<T> {
        &mut st.grads
    }
    fn f_side<'a>(
        st: &'a mut ParamStore<T>,
        _w: &'a mut (),
    ) -> (&'a mut Vec<T>, &'a mut Vec<T>, &'a mut Vec<T>) {
        (&mut st.params, &mut st.grads, &mut st.buffers)
    }
    fn refresh(&self, _st: &mut ParamStore<T>, _w: &mut ()) -> Result<()> {
        Ok(())
    }
    fn upload_buf<U: Elem>(&self, v: &[U]) -> Result<Vec<U>> {
        Ok(v.to_vec())
    }
    fn host_store<'a>(
        &self,
        st: &'a ParamStore<T>,
        _w: &(),
        _cache: &'a mut ParamStore<T>,
    ) -> Result<&'a ParamStore<T>> {
        Ok(st)
    }
    fn host_vec<'a, U: Elem>(&self, b: &'a Vec<U>, _cache: &'a mut Vec<U>) -> Result<&'a [U]> {
        Ok(b)
    }
    fn zero_grads(&self, st: &mut ParamStore<T>, _w: &mut ()) -> Result<()> {
        st.zero_grads();
        Ok(())
    }
    fn finish_grads(&self, _st: &mut ParamStore<T>, _w: &mut (), _r: Range<usize>) -> Result<()> {
        Ok(())
    }
}

// ----------------------------------------------------------------------------
// CUDA

/// One GPU, activations in `E`.
#[derive(Clone)]
pub struct Cuda<E> {
    pub gpu: Rc<Gpu>,
    _e: std::marker::PhantomData<E>,
}

impl<E> Cuda<E> {
    pub fn new(gpu: Rc<Gpu>) -> Self {
        Cuda {
            gpu,
            _e: std::marker::PhantomData,
        }
    }
}

/// A model's weights on a GPU: flat buffers carved by the store's size tables.
pub struct DevWeights<E> {
    /// f32 master parameters.
    pub params: CudaSlice<f32>,
    /// The parameters in the compute dtype (what convolutions and GEMMs read), refreshed from the
    /// masters after every update.
    pub params_c: CudaSlice<E>,
    /// f32 gradients (BN affine gradients land here directly; LARS reads them).
    pub grads: CudaSlice<f32>,
    /// Convolution and linear weight gradients in the compute dtype, added into `grads` at the end
    /// of backward.
    pub grads_c: CudaSlice<E>,
    /// BN running statistics.
    pub buffers: CudaSlice<f32>,
}

impl<E: GpuFloat> Backend for Cuda<E>
where
    CudaBlas: Gemm<E>,
{
    type E = E;
    type F = f32;
    type I = u8;
    type Buf<U: Elem> = CudaSlice<U>;
    type View<'a, U: Elem> = CudaView<'a, U>;
    type ViewMut<'a, U: Elem> = CudaViewMut<'a, U>;
    type Weights = DevWeights<E>;
    type Mark = cudarc::driver::CudaEvent;

    fn mark(&self, reuse: Option<cudarc::driver::CudaEvent>) -> Result<cudarc::driver::CudaEvent> {
        let g = &self.gpu;
        let e = |e| g.err("a timing event", e);
        let ev = match reuse {
            Some(ev) => ev,
            None => g
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(e)?,
        };
        ev.record(&g.stream).map_err(e)?;
        Ok(ev)
    }
    fn elapsed_ms(
        &self,
        from: &cudarc::driver::CudaEvent,
        to: &cudarc::driver::CudaEvent,
    ) -> Result<f64> {
        from.elapsed_ms(to)
            .map(|ms| ms as f64)
            .map_err(|e| self.gpu.err("reading a time between events", e))
    }

    fn alloc<U: Elem>(&self, n: usize) -> Result<CudaSlice<U>> {
        self.gpu.zeros(n)
    }
    fn len<U: Elem>(b: &CudaSlice<U>) -> usize {
        b.len()
    }
    fn zero<U: Elem>(&self, b: &mut CudaSlice<U>, n: usize) -> Result<()> {
        self.gpu.memset_zero(&mut b.slice_mut(..n))
    }
    fn view<U: Elem>(b: &CudaSlice<U>, r: Range<usize>) -> CudaView<'_, U> {
        b.slice(r)
    }
    fn view_mut<U: Elem>(b: &mut CudaSlice<U>, r: Range<usize>) -> CudaViewMut<'_, U> {
        b.slice_mut(r)
    }
    fn copy<U: Elem>(&self, src: &CudaView<'_, U>, dst: &mut CudaViewMut<'_, U>) -> Result<()> {
        self.gpu.copy(src, dst)
    }
    fn upload_f(&self, src: &[f32], dst: &mut CudaViewMut<'_, f32>) -> Result<()> {
        self.gpu
            .stream
            .memcpy_htod(src, dst)
            .map_err(|e| self.gpu.err("uploading an input", e))
    }
    fn upload_e(&self, src: &[f32], dst: &mut CudaViewMut<'_, E>) -> Result<()> {
        let h: Vec<E> = src.iter().map(|&v| E::from_f32(v)).collect();
        self.gpu
            .stream
            .memcpy_htod(&h, dst)
            .map_err(|e| self.gpu.err("uploading an input", e))
    }
    fn download<U: Elem>(&self, v: &CudaView<'_, U>) -> Result<Vec<U>> {
        let g = &self.gpu;
        let h = g
            .stream
            .clone_dtoh(&v.view())
            .map_err(|e| g.err("downloading a tensor", e))?;
        // The copy into pageable memory is queued on the stream: wait for it before reading.
        g.sync()?;
        Ok(h)
    }
    fn e_to_f(v: E) -> f32 {
        v.to_f32()
    }
    fn seed_one(&self, b: &mut CudaSlice<f32>) -> Result<()> {
        // 1.0 by a memset of its bits: nothing to upload, nothing to wait for.
        let g = &self.gpu;
        let (ptr, rec) = cudarc::driver::DevicePtr::device_ptr(&*b, &g.stream);
        let r = unsafe {
            cudarc::driver::sys::cuMemsetD32Async(ptr, 1.0f32.to_bits(), 1, g.stream.cu_stream())
                .result()
        }
        .map_err(|e| g.err("seeding the loss gradient", e));
        drop(rec);
        r
    }
    fn sync_launch(&self) -> bool {
        self.gpu.sync_launch
    }
    fn range_push(&self, name: &'static std::ffi::CStr) {
        self.gpu.range_push(name)
    }
    fn range_pop(&self) {
        self.gpu.range_pop()
    }
    fn sync(&self) -> Result<()> {
        self.gpu.sync()
    }
    fn out_of_memory(&self, e: Error, bytes: usize, held: usize) -> Error {
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
            held >> 20
        ))
    }
    fn weights(&self, store: &mut ParamStore<f32>) -> Result<(DevWeights<E>, usize)> {
        let g = &*self.gpu;
        let (n, nb) = (store.table.total, store.buffer_table.total);
        let mut w = DevWeights {
            params: g.zeros(n)?,
            params_c: g.zeros(n)?,
            grads: g.zeros(n)?,
            grads_c: g.zeros(n)?,
            buffers: g.zeros(nb)?,
        };
        let bytes = n * (4 + 2 * std::mem::size_of::<E>() + 4) + nb * 4;
        upload_store(g, store, &mut w)?;
        Ok((w, bytes))
    }
    fn compute_params<'a>(_st: &'a ParamStore<f32>, w: &'a DevWeights<E>) -> &'a CudaSlice<E> {
        &w.params_c
    }
    fn weight_grads<'a>(
        _st: &'a mut ParamStore<f32>,
        w: &'a mut DevWeights<E>,
    ) -> &'a mut CudaSlice<E> {
        &mut w.grads_c
    }
    fn f_side<'a>(
        _st: &'a mut ParamStore<f32>,
        w: &'a mut DevWeights<E>,
    ) -> (
        &'a mut CudaSlice<f32>,
        &'a mut CudaSlice<f32>,
        &'a mut CudaSlice<f32>,
    ) {
        (&mut w.params, &mut w.grads, &mut w.buffers)
    }
    fn refresh(&self, _st: &mut ParamStore<f32>, w: &mut DevWeights<E>) -> Result<()> {
        crate::gpu::cast_from_f32_cuda(&self.gpu, &w.params, &mut w.params_c)
    }
    fn upload_buf<U: Elem>(&self, v: &[U]) -> Result<CudaSlice<U>> {
        let g = &self.gpu;
        let b = g
            .stream
            .clone_htod(v)
            .map_err(|e| g.err("uploading a buffer", e))?;
        // The copy reads pageable host memory: done before the caller may free it.
        g.sync()?;
        Ok(b)
    }
    fn host_store<'a>(
        &self,
        st: &'a ParamStore<f32>,
        w: &DevWeights<E>,
        cache: &'a mut ParamStore<f32>,
    ) -> Result<&'a ParamStore<f32>> {
        let g = &self.gpu;
        cache.table.clone_from(&st.table);
        cache.buffer_table.clone_from(&st.buffer_table);
        cache.counters.clone_from(&st.counters);
        cache.params.resize(st.table.total, 0.0);
        cache.grads.resize(st.table.total, 0.0);
        cache.buffers.resize(st.buffer_table.total, 0.0);
        // The device buffers may be longer (an empty table still allocates one element).
        if st.table.total > 0 {
            g.stream
                .memcpy_dtoh(&w.params.slice(..st.table.total), &mut cache.params)
                .map_err(|e| g.err("downloading parameters", e))?;
        }
        if st.buffer_table.total > 0 {
            g.stream
                .memcpy_dtoh(
                    &w.buffers.slice(..st.buffer_table.total),
                    &mut cache.buffers,
                )
                .map_err(|e| g.err("downloading BN statistics", e))?;
        }
        g.sync()?;
        Ok(cache)
    }
    fn host_vec<'a, U: Elem>(&self, b: &'a CudaSlice<U>, cache: &'a mut Vec<U>) -> Result<&'a [U]> {
        let g = &self.gpu;
        cache.resize(b.len(), U::default());
        g.stream
            .memcpy_dtoh(b, cache)
            .map_err(|e| g.err("downloading a buffer", e))?;
        g.sync()?;
        Ok(cache)
    }
    fn zero_grads(&self, _st: &mut ParamStore<f32>, w: &mut DevWeights<E>) -> Result<()> {
        self.gpu.memset_zero(&mut w.grads)?;
        self.gpu.memset_zero(&mut w.grads_c)
    }
    fn finish_grads(
        &self,
        _st: &mut ParamStore<f32>,
        w: &mut DevWeights<E>,
        r: Range<usize>,
    ) -> Result<()> {
        let src = w.grads_c.slice(r.clone());
        crate::gpu::accum_f32_cuda(&self.gpu, &src, &mut w.grads.slice_mut(r))
    }
}

/// Moves a host store's parameters, running statistics and counters into device weights (the host
/// vectors are left empty: the values live on the device), and refreshes the compute copy.
pub(crate) fn upload_store<E: GpuFloat>(
    g: &Gpu,
    store: &mut ParamStore<f32>,
    w: &mut DevWeights<E>,
) -> Result<()> {
    let st = &g.stream;
    st.memcpy_htod(&store.params, &mut w.params)
        .map_err(|e| g.err("uploading parameters", e))?;
    st.memcpy_htod(&store.buffers, &mut w.buffers)
        .map_err(|e| g.err("uploading BN statistics", e))?;
    // The copies read pageable host memory: wait before the vectors go.
    g.sync()?;
    store.params = Vec::new();
    store.grads = Vec::new();
    store.buffers = Vec::new();
    crate::gpu::cast_from_f32_cuda(g, &w.params, &mut w.params_c)
}
