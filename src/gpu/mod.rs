//! The CUDA backend: one GPU, its stream, the compiled kernels as typed handles, cuBLAS and cuDNN.
//!
//! Everything CUDA is dlopen'ed by cudarc, so this module builds everywhere; [`Gpu::new`] checks each
//! library before first use and turns absence into one sentence naming it and the fix
//! (scripts/cuda-env.sh). Op launchers live with their CPU references in `src/ops/<op>.rs`; this
//! module holds what they share: the kernel registry, buffers and their windows ([`Dev`],
//! [`DevMut`]), dtype plumbing with the f32 <-> T casts, the row-major GEMM and the cuDNN
//! convolution plans.

pub mod nvrtc;

use crate::error::{Error, Result};
use crate::tensor::DType;
use cudarc::cublas::{sys as blas_sys, CudaBlas, Gemm, GemmConfig, StridedBatchedConfig};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, CudaViewMut, DevicePtr,
    DevicePtrMut, DeviceRepr, LaunchArgs, LaunchConfig, PushKernelArg, ValidAsZeroBits,
};
use std::cell::{RefCell, RefMut};
use std::collections::HashMap;
use std::sync::Arc;

/// An element a buffer stores, on the host or on a device.
pub trait Elem:
    DeviceRepr + ValidAsZeroBits + Copy + Default + Send + Sync + Unpin + std::fmt::Debug + 'static
{
}
impl Elem for f32 {}
impl Elem for f64 {}
impl Elem for u8 {}
impl Elem for half::bf16 {}

/// A storage dtype of activations on the GPU: f32 or bf16 (arithmetic is f32 in every kernel).
pub trait GpuFloat: Elem + cudarc::cudnn::CudnnDataType {
    const DTYPE: DType;
    fn from_f32(v: f32) -> Self;
    fn to_f32(self) -> f32;
}

impl GpuFloat for f32 {
    const DTYPE: DType = DType::F32;
    fn from_f32(v: f32) -> Self {
        v
    }
    fn to_f32(self) -> f32 {
        self
    }
}

impl GpuFloat for half::bf16 {
    const DTYPE: DType = DType::BF16;
    fn from_f32(v: f32) -> Self {
        half::bf16::from_f32(v)
    }
    fn to_f32(self) -> f32 {
        half::bf16::to_f32(self)
    }
}

/// A device buffer or a read-only window of one.
pub trait Dev<T> {
    fn view(&self) -> CudaView<'_, T>;
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// A device buffer or a writable window of one.
pub trait DevMut<T>: Dev<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T>;
}

impl<T> Dev<T> for CudaSlice<T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
    fn len(&self) -> usize {
        CudaSlice::len(self)
    }
}

impl<T> Dev<T> for CudaView<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.slice(..)
    }
    fn len(&self) -> usize {
        CudaView::len(self)
    }
}

impl<T> Dev<T> for CudaViewMut<'_, T> {
    fn view(&self) -> CudaView<'_, T> {
        self.as_view()
    }
    fn len(&self) -> usize {
        CudaViewMut::len(self)
    }
}

impl<T> DevMut<T> for CudaSlice<T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.as_view_mut()
    }
}

impl<T> DevMut<T> for CudaViewMut<'_, T> {
    fn view_mut(&mut self) -> CudaViewMut<'_, T> {
        self.slice_mut(..)
    }
}

/// A kernel compiled for both storage dtypes (`<name>_f32`, `<name>_bf16`).
pub struct Pair {
    pub f32: CudaFunction,
    pub bf16: CudaFunction,
}

impl Pair {
    pub fn get<T: GpuFloat>(&self) -> &CudaFunction {
        match T::DTYPE {
            DType::F32 => &self.f32,
            DType::BF16 => &self.bf16,
        }
    }
}

fn load_fn(m: &Arc<CudaModule>, file: &str, name: &str) -> Result<CudaFunction> {
    m.load_function(name)
        .map_err(|e| Error::Cuda(format!("kernel {name} missing from kernels/{file}: {e:?}")))
}

/// Declares the kernel registry: for every file, its kernels, `pair` (both dtypes) or `one`.
macro_rules! registry {
    ($( $file:literal { $( $kind:ident $name:ident ),* $(,)? } )*) => {
        /// Every kernel the host launches, as a typed handle.
        pub struct Kernels { $( $( pub $name: registry!(@ty $kind), )* )* }

        impl Kernels {
            fn load(modules: &HashMap<&'static str, Arc<CudaModule>>) -> Result<Kernels> {
                Ok(Kernels { $( $(
                    $name: registry!(@load $kind, &modules[$file], $file, stringify!($name)),
                )* )* })
            }

            /// (file, C symbol) of every registered kernel: the compile test checks each exists.
            pub fn symbols() -> Vec<(&'static str, String)> {
                let mut v = Vec::new();
                $( $( registry!(@names $kind, v, $file, stringify!($name)); )* )*
                v
            }
        }
    };
    (@ty pair) => { Pair };
    (@ty one) => { CudaFunction };
    (@load pair, $m:expr, $f:expr, $n:expr) => {
        Pair { f32: load_fn($m, $f, &format!("{}_f32", $n))?, bf16: load_fn($m, $f, &format!("{}_bf16", $n))? }
    };
    (@load one, $m:expr, $f:expr, $n:expr) => { load_fn($m, $f, $n)? };
    (@names pair, $v:ident, $f:expr, $n:expr) => {
        $v.push(($f, format!("{}_f32", $n)));
        $v.push(($f, format!("{}_bf16", $n)));
    };
    (@names one, $v:ident, $f:expr, $n:expr) => { $v.push(($f, $n.to_string())); };
}

registry! {
    "add.cu" { pair add_fwd, pair scale_fwd, pair axpy }
    "batchnorm.cu" {
        pair bn_stats_partial, one bn_finalize_mean, one bn_sum_chunks, one bn_merge_ranks,
        one bn_finalize_var, one bn_eval_stats,
        pair bn_apply, pair bn_bwd_partial, one bn_bwd_finalize, pair bn_bwd_apply,
    }
    "augment.cu" { one aug_color, one aug_blur, pair aug_finish }
    "cast.cu" { pair cast_from_f32, pair accum_f32 }
    "concat.cu" { pair concat_fwd, pair concat_bwd, pair split_fwd, pair split_bwd }
    "l2norm.cu" { pair l2norm_fwd, pair l2norm_bwd }
    "loss.cu" { pair loss_rows, one loss_reduce, pair loss_bwd }
    "optim.cu" { one lars_norms, one lars_trust, one lars_update, one ema_update, one sgd_update, one nonfinite }
    "pool.cu" { pair maxpool_fwd, pair maxpool_bwd, pair avgpool_fwd, pair avgpool_bwd }
    "relu.cu" { pair relu_fwd, pair relu_bwd }
    "softmax.cu" { pair softmax_fwd, pair softmax_bwd, pair align_fwd, pair align_bwd }
    "xent.cu" { pair xent_rows, one xent_reduce, pair xent_bwd, pair xent_bias_bwd }
}

/// An error of a CUDA library call, which can say whether it was out of memory.
pub trait GpuError: std::fmt::Debug {
    fn out_of_memory(&self) -> bool {
        false
    }
}

impl GpuError for cudarc::driver::DriverError {
    fn out_of_memory(&self) -> bool {
        self.0 == cudarc::driver::sys::cudaError_enum::CUDA_ERROR_OUT_OF_MEMORY
    }
}

impl GpuError for cudarc::cublas::result::CublasError {
    fn out_of_memory(&self) -> bool {
        self.0 == blas_sys::cublasStatus_t::CUBLAS_STATUS_ALLOC_FAILED
    }
}

impl GpuError for cudarc::cudnn::CudnnError {
    fn out_of_memory(&self) -> bool {
        self.0 == cudarc::cudnn::sys::cudnnStatus_t::CUDNN_STATUS_ALLOC_FAILED
    }
}

/// A null device pointer for optional kernel arguments.
pub static NULL: u64 = 0;

/// One GPU with everything the ops need.
pub struct Gpu {
    pub ordinal: usize,
    pub ctx: Arc<CudaContext>,
    pub stream: Arc<CudaStream>,
    pub k: Kernels,
    pub blas: CudaBlas,
    pub cudnn: Arc<cudarc::cudnn::Cudnn>,
    pub name: String,
    pub cc: (i32, i32),
    /// Only deterministic cuDNN algorithms (and no float atomics anywhere: none of our kernels use
    /// them).
    pub deterministic: bool,
    /// LEWEL_SYNC_LAUNCH=1: the graphs wait for the GPU after every node and name the node an
    /// error surfaced at (a debugging switch: asynchronous errors otherwise surface at a later
    /// call).
    pub sync_launch: bool,
    /// Whether NVTX (libnvToolsExt) was found: the graphs then name every node's launches with a
    /// range, which Nsight Systems shows on the GPU's timeline.
    pub nvtx: bool,
    /// What ops keep per GPU, one value per type ([`Gpu::with_state`]).
    op_state: RefCell<HashMap<std::any::TypeId, Box<dyn std::any::Any>>>,
    /// Why benchmarking failed the first time it did (the heuristic was used instead).
    pub find_failure: RefCell<Option<String>>,
    pub(crate) workspace: RefCell<Option<CudaSlice<u8>>>,
    pub(crate) scratch: RefCell<Option<CudaSlice<f32>>>,
}

const HINT: &str =
    "run through scripts/cuda-env.sh, or put the library's folder on LD_LIBRARY_PATH";

impl Gpu {
    /// Opens GPU `ordinal`: checks the driver, the GPU (compute capability 7.5 or newer) and the
    /// libraries, then compiles (or loads from the cache) every kernel for this GPU's arch.
    pub fn new(ordinal: usize, deterministic: bool) -> Result<Gpu> {
        let probe = crate::device::probe();
        if let Err(e) = &probe.driver {
            return Err(Error::Cuda(format!("no NVIDIA driver ({e})")));
        }
        let Some(g) = probe.gpus.get(ordinal) else {
            return Err(Error::Cuda(format!(
                "there is no GPU {ordinal}: {} GPU(s) found",
                probe.gpus.len()
            )));
        };
        if g.1 < (7, 5) {
            return Err(Error::Cuda(format!(
                "GPU {ordinal}, {}, has compute capability {}.{}; lewel needs 7.5 or newer",
                g.0, g.1 .0, g.1 .1
            )));
        }
        for (lib, found) in &probe.libraries {
            if let (Err(e), true) = (found, *lib != "NCCL") {
                return Err(Error::Cuda(e.clone()));
            }
        }
        let cuda = |what: &str, e: String| Error::Cuda(format!("{what}: {e}"));
        let ctx = CudaContext::new(ordinal).map_err(|e| cuda("CUDA context", format!("{e:?}")))?;
        // SAFETY: called before any allocation; we order work on one stream ourselves.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.default_stream();
        let cc = g.1;
        let mut modules = HashMap::new();
        for (file, src) in nvrtc::SOURCES {
            let c = nvrtc::cubin_cached(file, src, cc)?;
            let from_cache = c.cached;
            let m = match ctx.load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin)) {
                Ok(m) => m,
                // A cached CUBIN the driver refuses (damaged, or from another toolchain) is
                // compiled again, once.
                Err(_) if from_cache => {
                    nvrtc::forget(file, src, cc);
                    let c = nvrtc::cubin_cached(file, src, cc)?;
                    ctx.load_module(cudarc::nvrtc::Ptx::from_binary(c.cubin))
                        .map_err(|e| cuda(&format!("loading kernels/{file}"), format!("{e:?}")))?
                }
                Err(e) => return Err(cuda(&format!("loading kernels/{file}"), format!("{e:?}"))),
            };
            modules.insert(*file, m);
        }
        let k = Kernels::load(&modules)?;
        let blas = CudaBlas::new(stream.clone())
            .map_err(|e| cuda(&format!("cuBLAS ({HINT})"), format!("{e:?}")))?;
        let cudnn = cudarc::cudnn::Cudnn::new(stream.clone())
            .map_err(|e| cuda(&format!("cuDNN ({HINT})"), format!("{e:?}")))?;
        let gpu = Gpu {
            ordinal,
            ctx,
            stream,
            k,
            blas,
            cudnn,
            name: g.0.clone(),
            cc,
            deterministic,
            sync_launch: std::env::var("LEWEL_SYNC_LAUNCH").is_ok_and(|v| v == "1"),
            nvtx: unsafe { cudarc::nvtx::sys::is_culib_present() },
            op_state: Default::default(),
            find_failure: Default::default(),
            workspace: Default::default(),
            scratch: Default::default(),
        };
        gpu.set_tf32(true)?;
        Ok(gpu)
    }

    /// Switches TF32 tensor cores for f32 GEMMs and convolutions on or off (off: exact f32, for
    /// checks against the CPU).
    pub fn set_tf32(&self, on: bool) -> Result<()> {
        let mode = if on {
            blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
        } else {
            blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH
        };
        // SAFETY: the handle is valid for the lifetime of self.
        let r = unsafe { blas_sys::cublasSetMathMode(*self.blas.handle(), mode) };
        if r != blas_sys::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
            return Err(Error::Cuda(format!("cublasSetMathMode: {r:?}")));
        }
        // Algorithm choices depend on the math type: choose again.
        self.op_state.borrow_mut().clear();
        Ok(())
    }

    /// Runs `f` on this GPU's value of `S` (an op's caches: made by `Default` on first use,
    /// dropped when TF32 is switched). `f` must not ask for op state itself.
    pub fn with_state<S: Default + 'static, R>(&self, f: impl FnOnce(&mut S) -> R) -> R {
        let mut m = self.op_state.borrow_mut();
        let s = m
            .entry(std::any::TypeId::of::<S>())
            .or_insert_with(|| Box::new(S::default()));
        f(s.downcast_mut::<S>()
            .expect("op state is stored under its own type"))
    }

    /// Whether TF32 is on (read back from cuBLAS, the one place it is set).
    pub fn tf32(&self) -> bool {
        let mut mode = blas_sys::cublasMath_t::CUBLAS_DEFAULT_MATH;
        // SAFETY: the handle is valid; the call writes one enum.
        unsafe { blas_sys::cublasGetMathMode(*self.blas.handle(), &mut mode) };
        mode == blas_sys::cublasMath_t::CUBLAS_TF32_TENSOR_OP_MATH
    }

    /// A failed call on this GPU, named; out of memory (from the driver, cuBLAS or cuDNN) is
    /// [`Error::OutOfMemory`].
    pub fn err(&self, what: &str, e: impl GpuError) -> Error {
        let m = format!("{what} on {} (cuda:{}): {e:?}", self.name, self.ordinal);
        if e.out_of_memory() {
            Error::OutOfMemory(m)
        } else {
            Error::Cuda(m)
        }
    }

    /// Uploads f32 host values as dtype T.
    pub fn upload<T: GpuFloat>(&self, v: &[f32]) -> Result<CudaSlice<T>> {
        let h: Vec<T> = v.iter().map(|&x| T::from_f32(x)).collect();
        self.stream
            .clone_htod(&h)
            .map_err(|e| self.err("upload", e))
    }

    /// Downloads as f32 host values (waits for the stream).
    pub fn download<T: GpuFloat>(&self, d: &impl Dev<T>) -> Result<Vec<f32>> {
        let h: Vec<T> = self
            .stream
            .clone_dtoh(&d.view())
            .map_err(|e| self.err("download", e))?;
        // The copy into pageable memory is queued on the stream: wait for it before reading.
        self.stream
            .synchronize()
            .map_err(|e| self.err("download", e))?;
        Ok(h.into_iter().map(T::to_f32).collect())
    }

    pub fn zeros<T: DeviceRepr + ValidAsZeroBits>(&self, n: usize) -> Result<CudaSlice<T>> {
        self.stream
            .alloc_zeros(n.max(1))
            .map_err(|e| self.err(&format!("allocating {n} elements"), e))
    }

    /// Zeroes a buffer or window on the stream.
    pub fn memset_zero<T: DeviceRepr + ValidAsZeroBits>(
        &self,
        v: &mut impl DevMut<T>,
    ) -> Result<()> {
        self.stream
            .memset_zeros(&mut v.view_mut())
            .map_err(|e| self.err("memset", e))
    }

    /// Device-to-device copy of all of `src` into the front of `dst`.
    pub fn copy<T>(&self, src: &impl Dev<T>, dst: &mut impl DevMut<T>) -> Result<()> {
        need("Gpu::copy", &[("dst", dst.len(), src.len())])?;
        self.stream
            .memcpy_dtod(&src.view(), &mut dst.view_mut())
            .map_err(|e| self.err("device copy", e))
    }

    pub fn sync(&self) -> Result<()> {
        self.stream.synchronize().map_err(|e| self.err("kernel", e))
    }

    /// Opens an NVTX range (where NVTX is there); [`Gpu::range_pop`] closes it.
    pub fn range_push(&self, name: &std::ffi::CStr) {
        if self.nvtx {
            // SAFETY: the library is present (checked at open) and the name is a C string.
            unsafe { cudarc::nvtx::sys::nvtxRangePushA(name.as_ptr()) };
        }
    }

    pub fn range_pop(&self) {
        if self.nvtx {
            // SAFETY: as in range_push.
            unsafe { cudarc::nvtx::sys::nvtxRangePop() };
        }
    }

    /// A workspace of at least `bytes`, grown (never shrunk) as plans need.
    pub(crate) fn workspace(&self, bytes: usize) -> Result<RefMut<'_, Option<CudaSlice<u8>>>> {
        let mut w = self.workspace.borrow_mut();
        if w.as_ref().is_none_or(|b| b.len() < bytes) {
            *w = Some(
                self.stream
                    .alloc_zeros::<u8>(bytes.max(1))
                    .map_err(|e| self.err(&format!("workspace of {bytes} bytes"), e))?,
            );
        }
        Ok(w)
    }

    /// An f32 scratch of at least `n` elements, grown (never shrunk) as launchers need; its contents
    /// are left over from earlier launches.
    pub(crate) fn scratch(&self, n: usize) -> Result<RefMut<'_, CudaSlice<f32>>> {
        let mut s = self.scratch.borrow_mut();
        if s.as_ref().is_none_or(|b| b.len() < n) {
            // Drop the old one before allocating, for peak memory: cudarc frees it in stream order,
            // after the launches already queued on it.
            *s = None;
            *s = Some(
                self.stream
                    .alloc_zeros::<f32>(n.max(1))
                    .map_err(|e| self.err(&format!("scratch of {n} f32"), e))?,
            );
        }
        Ok(RefMut::map(s, |s| s.as_mut().expect("allocated above")))
    }

    /// Row-major GEMM: C (m, n) = alpha * op(A) * op(B) + beta * C, with op(A) (m, k) and op(B)
    /// (k, n); `ta`/`tb` mean A is stored (k, m) / B is stored (n, k); lda, ldb, ldc are row
    /// strides. Batched over `batch` with element strides (sa, sb, sc) when batch > 1. f32
    /// accumulation for both dtypes.
    #[allow(clippy::too_many_arguments)]
    pub fn gemm<T: GpuFloat, A: DevicePtr<T>, B: DevicePtr<T>, C: DevicePtrMut<T>>(
        &self,
        (ta, tb): (bool, bool),
        (m, n, k): (usize, usize, usize),
        (a, lda): (&A, usize),
        (b, ldb): (&B, usize),
        beta: f32,
        (c, ldc): (&mut C, usize),
        (batch, sa, sb, sc): (usize, usize, usize, usize),
    ) -> Result<()>
    where
        CudaBlas: Gemm<T>,
    {
        use blas_sys::cublasOperation_t::{CUBLAS_OP_N, CUBLAS_OP_T};
        // Column-major view: C^T (n, m) = op(B)^T (n, k) * op(A)^T (k, m).
        let cfg = GemmConfig {
            transa: if tb { CUBLAS_OP_T } else { CUBLAS_OP_N },
            transb: if ta { CUBLAS_OP_T } else { CUBLAS_OP_N },
            m: n as i32,
            n: m as i32,
            k: k as i32,
            alpha: T::from_f32(1.0),
            lda: ldb as i32,
            ldb: lda as i32,
            beta: T::from_f32(beta),
            ldc: ldc as i32,
        };
        // SAFETY: the callers size a, b, c for these shapes and strides (asserted in the ops).
        let r = unsafe {
            if batch <= 1 {
                self.blas.gemm(cfg, b, a, c)
            } else {
                self.blas.gemm_strided_batched(
                    StridedBatchedConfig {
                        gemm: cfg,
                        batch_size: batch as i32,
                        stride_a: sb as i64,
                        stride_b: sa as i64,
                        stride_c: sc as i64,
                    },
                    b,
                    a,
                    c,
                )
            }
        };
        r.map_err(|e| self.err("cuBLAS gemm", e))
    }
}

/// Launches a built kernel call, naming the kernel in the error.
pub fn run(g: &Gpu, mut b: LaunchArgs<'_>, cfg: LaunchConfig, name: &str) -> Result<()> {
    // SAFETY: every launcher passes arguments matching its kernel's C signature and checks its
    // buffers' lengths against the params with `need` before building the launch.
    unsafe { b.launch(cfg) }
        .map(|_| ())
        .map_err(|e| g.err(name, e))
}

/// Fails unless every `(buffer, len, needed)` of launcher `op` holds at least `needed` elements
/// (more is fine: a window's tail, or `lewel check`'s sentinels).
pub fn need(op: &str, bufs: &[(&str, usize, usize)]) -> Result<()> {
    match bufs.iter().find(|(_, len, n)| len < n) {
        Some((what, len, n)) => Err(Error::Other(format!(
            "{op}: {what} holds {len} elements, needs {n}"
        ))),
        None => Ok(()),
    }
}

/// Pushes an optional buffer, or a null pointer.
pub fn opt<'a, 'c: 'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a CudaView<'c, T>>) {
    match v {
        Some(s) => b.arg(s),
        None => b.arg(&NULL),
    };
}

/// Pushes an optional mutable buffer, or a null pointer.
pub fn opt_mut<'a, 'c: 'a, T>(b: &mut LaunchArgs<'a>, v: Option<&'a mut CudaViewMut<'c, T>>) {
    match v {
        Some(s) => b.arg(s),
        None => b.arg(&NULL),
    };
}

/// A 1-D launch covering n elements with 256-thread blocks (grid-stride loops cover the rest).
pub fn grid_1d(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 65_535 * 8) as u32;
    LaunchConfig {
        grid_dim: (blocks, 1, 1),
        block_dim: (256, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// A launch of `blocks` blocks of `threads` threads.
pub fn blocks(blocks: usize, threads: u32) -> LaunchConfig {
    LaunchConfig {
        grid_dim: (blocks.max(1) as u32, 1, 1),
        block_dim: (threads, 1, 1),
        shared_mem_bytes: 0,
    }
}

/// dst = src rounded to T (to nearest even for bf16), over src's length.
pub fn cast_from_f32_cuda<T: GpuFloat>(
    g: &Gpu,
    src: &impl Dev<f32>,
    dst: &mut impl DevMut<T>,
) -> Result<()> {
    let n = src.len();
    need("cast_from_f32_cuda", &[("dst", dst.len(), n)])?;
    let (src, mut dst, n) = (src.view(), dst.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.cast_from_f32.get::<T>());
    b.arg(&src).arg(&mut dst).arg(&n);
    run(g, b, grid_1d(n as usize), "cast_from_f32")
}

/// acc += src widened to f32, over src's length.
pub fn accum_f32_cuda<T: GpuFloat>(
    g: &Gpu,
    src: &impl Dev<T>,
    acc: &mut impl DevMut<f32>,
) -> Result<()> {
    let n = src.len();
    need("accum_f32_cuda", &[("acc", acc.len(), n)])?;
    let (src, mut acc, n) = (src.view(), acc.view_mut(), n as u64);
    let mut b = g.stream.launch_builder(g.k.accum_f32.get::<T>());
    b.arg(&src).arg(&mut acc).arg(&n);
    run(g, b, grid_1d(n as usize), "accum_f32")
}
