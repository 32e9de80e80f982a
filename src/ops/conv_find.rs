//! cuDNN algorithm choice by benchmarking (`cudnnFindConvolution*Algorithm`), once per shape.
//!
//! cudarc's safe cuDNN API offers only the heuristic (`cudnnGetConvolution*Algorithm_v7`) and keeps
//! its handle and descriptors crate-private, so the benchmark runs on a handle and descriptors of
//! its own, built here through `cudarc::cudnn::sys` on the same stream. cuDNN times every algorithm
//! on buffers it allocates itself (a few cudaMallocs the first time a shape is seen, never in the
//! steady state) and returns them fastest first, each with its workspace size, its determinism and
//! the math type it ran with. We take the fastest that succeeded, fits the workspace limit, is
//! deterministic when `--deterministic` asks for it, and uses no tensor cores when exact f32 was
//! asked for (TF32 off). If benchmarking itself fails, the caller falls back to the heuristic.

use cudarc::cudnn::sys::{self, cudnnDeterminism_t, cudnnMathType_t, cudnnStatus_t};
use std::ffi::c_int;

/// What one benchmarked direction gave: the algorithm and the math type to run it with.
#[derive(Clone, Copy, Debug)]
pub struct Found<A> {
    pub algo: A,
    pub math: cudnnMathType_t,
    /// Milliseconds cuDNN measured, for the record.
    pub ms: f32,
    pub workspace: usize,
}

/// The fields every cuDNN perf struct has, so one chooser serves all three directions.
pub trait Perf: Copy {
    type Algo: Copy;
    fn algo(&self) -> Self::Algo;
    fn ok(&self) -> bool;
    fn time(&self) -> f32;
    fn memory(&self) -> usize;
    fn deterministic(&self) -> bool;
    fn math(&self) -> cudnnMathType_t;
}

macro_rules! perf {
    ($t:ty, $a:ty) => {
        impl Perf for $t {
            type Algo = $a;
            fn algo(&self) -> $a {
                self.algo
            }
            fn ok(&self) -> bool {
                self.status == cudnnStatus_t::CUDNN_STATUS_SUCCESS
            }
            fn time(&self) -> f32 {
                self.time
            }
            fn memory(&self) -> usize {
                self.memory
            }
            fn deterministic(&self) -> bool {
                self.determinism == cudnnDeterminism_t::CUDNN_DETERMINISTIC
            }
            fn math(&self) -> cudnnMathType_t {
                self.mathType
            }
        }
    };
}
perf!(
    sys::cudnnConvolutionFwdAlgoPerf_t,
    sys::cudnnConvolutionFwdAlgo_t
);
perf!(
    sys::cudnnConvolutionBwdDataAlgoPerf_t,
    sys::cudnnConvolutionBwdDataAlgo_t
);
perf!(
    sys::cudnnConvolutionBwdFilterAlgoPerf_t,
    sys::cudnnConvolutionBwdFilterAlgo_t
);

/// The rules a benchmarked algorithm must meet.
#[derive(Clone, Copy, Debug)]
pub struct Rules {
    pub deterministic: bool,
    /// Exact f32: only results that ran without tensor cores.
    pub fma_only: bool,
    pub max_workspace: usize,
}

/// The fastest result that meets the rules.
pub fn choose<P: Perf>(results: &[P], r: &Rules) -> Option<Found<P::Algo>> {
    results
        .iter()
        .filter(|p| p.ok())
        .filter(|p| !r.deterministic || p.deterministic())
        .filter(|p| !r.fma_only || p.math() == cudnnMathType_t::CUDNN_FMA_MATH)
        .filter(|p| p.memory() <= r.max_workspace)
        .min_by(|a, b| a.time().total_cmp(&b.time()))
        .map(|p| Found {
            algo: p.algo(),
            math: p.math(),
            ms: p.time(),
            workspace: p.memory(),
        })
}

/// A cuDNN handle of our own for benchmarking, bound to a stream (held, so the stream and its
/// context outlive the handle).
pub struct Finder {
    handle: sys::cudnnHandle_t,
    _stream: std::sync::Arc<cudarc::driver::CudaStream>,
}

fn ok(s: cudnnStatus_t, what: &str) -> Result<(), String> {
    if s == cudnnStatus_t::CUDNN_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {s:?}"))
    }
}

impl Finder {
    /// A handle on `stream`.
    pub fn new(stream: &std::sync::Arc<cudarc::driver::CudaStream>) -> Result<Finder, String> {
        stream
            .context()
            .bind_to_thread()
            .map_err(|e| format!("binding the CUDA context: {e:?}"))?;
        let mut handle = std::ptr::null_mut();
        // SAFETY: writes one handle; destroyed in Drop.
        ok(unsafe { sys::cudnnCreate(&mut handle) }, "cudnnCreate")?;
        let f = Finder {
            handle,
            _stream: stream.clone(),
        };
        let raw = stream.cu_stream() as sys::cudaStream_t;
        // SAFETY: both handles are valid; the Finder holds the stream.
        ok(
            unsafe { sys::cudnnSetStream(f.handle, raw) },
            "cudnnSetStream",
        )?;
        Ok(f)
    }

    /// Benchmarks all three directions of one convolution. `dtype` is the storage type of x, w and
    /// y; the accumulation is f32; NHWC activations and KRSC filters as in ops::conv.
    pub fn find(
        &self,
        p: &crate::ops::conv::ConvParams,
        dtype: sys::cudnnDataType_t,
        math: cudnnMathType_t,
    ) -> Result<Results, String> {
        let d = RawDescs::new(p, dtype, math)?;
        const N: usize = 16;
        let mut count: c_int = 0;
        // SAFETY: zeroed perf structs are valid (plain data, enum fields 0 = a valid variant).
        let mut fwd = [unsafe { std::mem::zeroed::<sys::cudnnConvolutionFwdAlgoPerf_t>() }; N];
        // SAFETY: descriptors valid for the call; cuDNN writes at most N results and the count.
        ok(
            unsafe {
                sys::cudnnFindConvolutionForwardAlgorithm(
                    self.handle,
                    d.x,
                    d.w,
                    d.conv,
                    d.y,
                    N as c_int,
                    &mut count,
                    fwd.as_mut_ptr(),
                )
            },
            "cudnnFindConvolutionForwardAlgorithm",
        )?;
        let n_fwd = (count.max(0) as usize).min(N);
        let mut bwd_data =
            [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdDataAlgoPerf_t>() }; N];
        // SAFETY: as above.
        ok(
            unsafe {
                sys::cudnnFindConvolutionBackwardDataAlgorithm(
                    self.handle,
                    d.w,
                    d.y,
                    d.conv,
                    d.x,
                    N as c_int,
                    &mut count,
                    bwd_data.as_mut_ptr(),
                )
            },
            "cudnnFindConvolutionBackwardDataAlgorithm",
        )?;
        let n_data = (count.max(0) as usize).min(N);
        let mut bwd_filter =
            [unsafe { std::mem::zeroed::<sys::cudnnConvolutionBwdFilterAlgoPerf_t>() }; N];
        // SAFETY: as above.
        ok(
            unsafe {
                sys::cudnnFindConvolutionBackwardFilterAlgorithm(
                    self.handle,
                    d.x,
                    d.y,
                    d.conv,
                    d.w,
                    N as c_int,
                    &mut count,
                    bwd_filter.as_mut_ptr(),
                )
            },
            "cudnnFindConvolutionBackwardFilterAlgorithm",
        )?;
        let n_filter = (count.max(0) as usize).min(N);
        Ok(Results {
            fwd: fwd[..n_fwd].to_vec(),
            bwd_data: bwd_data[..n_data].to_vec(),
            bwd_filter: bwd_filter[..n_filter].to_vec(),
        })
    }
}

impl Drop for Finder {
    fn drop(&mut self) {
        // SAFETY: created in new, destroyed once.
        unsafe { sys::cudnnDestroy(self.handle) };
    }
}

/// What cuDNN measured for one shape, per direction, fastest first.
pub struct Results {
    pub fwd: Vec<sys::cudnnConvolutionFwdAlgoPerf_t>,
    pub bwd_data: Vec<sys::cudnnConvolutionBwdDataAlgoPerf_t>,
    pub bwd_filter: Vec<sys::cudnnConvolutionBwdFilterAlgoPerf_t>,
}

/// Raw descriptors for one convolution, destroyed on drop (including on an early error return).
struct RawDescs {
    x: sys::cudnnTensorDescriptor_t,
    w: sys::cudnnFilterDescriptor_t,
    y: sys::cudnnTensorDescriptor_t,
    conv: sys::cudnnConvolutionDescriptor_t,
}

impl RawDescs {
    fn new(
        p: &crate::ops::conv::ConvParams,
        dtype: sys::cudnnDataType_t,
        math: cudnnMathType_t,
    ) -> Result<RawDescs, String> {
        let mut d = RawDescs {
            x: std::ptr::null_mut(),
            w: std::ptr::null_mut(),
            y: std::ptr::null_mut(),
            conv: std::ptr::null_mut(),
        };
        let nhwc = sys::cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
        // SAFETY: each call creates or fills a descriptor owned by d (Drop skips null ones).
        unsafe {
            ok(sys::cudnnCreateTensorDescriptor(&mut d.x), "x descriptor")?;
            ok(sys::cudnnCreateTensorDescriptor(&mut d.y), "y descriptor")?;
            ok(sys::cudnnCreateFilterDescriptor(&mut d.w), "w descriptor")?;
            ok(
                sys::cudnnCreateConvolutionDescriptor(&mut d.conv),
                "conv descriptor",
            )?;
            ok(
                sys::cudnnSetTensor4dDescriptor(d.x, nhwc, dtype, p.n, p.c_in, p.h_in, p.w_in),
                "x descriptor",
            )?;
            ok(
                sys::cudnnSetTensor4dDescriptor(d.y, nhwc, dtype, p.n, p.c_out, p.h_out, p.w_out),
                "y descriptor",
            )?;
            ok(
                sys::cudnnSetFilter4dDescriptor(d.w, dtype, nhwc, p.c_out, p.c_in, p.kh, p.kw),
                "w descriptor",
            )?;
            ok(
                sys::cudnnSetConvolution2dDescriptor(
                    d.conv,
                    p.pad,
                    p.pad,
                    p.stride,
                    p.stride,
                    1,
                    1,
                    sys::cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
                    sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
                ),
                "conv descriptor",
            )?;
            ok(sys::cudnnSetConvolutionMathType(d.conv, math), "math type")?;
        }
        Ok(d)
    }
}

impl Drop for RawDescs {
    fn drop(&mut self) {
        // SAFETY: each non-null descriptor was created in new and is destroyed once.
        unsafe {
            if !self.x.is_null() {
                sys::cudnnDestroyTensorDescriptor(self.x);
            }
            if !self.y.is_null() {
                sys::cudnnDestroyTensorDescriptor(self.y);
            }
            if !self.w.is_null() {
                sys::cudnnDestroyFilterDescriptor(self.w);
            }
            if !self.conv.is_null() {
                sys::cudnnDestroyConvolutionDescriptor(self.conv);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sys::cudnnConvolutionBwdFilterAlgo_t as A;

    fn perf(
        algo: A,
        ok: bool,
        time: f32,
        memory: usize,
        det: bool,
        math: cudnnMathType_t,
    ) -> sys::cudnnConvolutionBwdFilterAlgoPerf_t {
        // SAFETY: plain data; every field is set below except the reserved ints.
        let mut p: sys::cudnnConvolutionBwdFilterAlgoPerf_t = unsafe { std::mem::zeroed() };
        p.algo = algo;
        p.status = if ok {
            cudnnStatus_t::CUDNN_STATUS_SUCCESS
        } else {
            cudnnStatus_t::CUDNN_STATUS_NOT_SUPPORTED
        };
        p.time = time;
        p.memory = memory;
        p.determinism = if det {
            cudnnDeterminism_t::CUDNN_DETERMINISTIC
        } else {
            cudnnDeterminism_t::CUDNN_NON_DETERMINISTIC
        };
        p.mathType = math;
        p
    }

    #[test]
    fn choose_applies_every_rule() {
        use cudnnMathType_t::{CUDNN_FMA_MATH as FMA, CUDNN_TENSOR_OP_MATH as TC};
        let r = [
            perf(
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_FFT,
                false,
                0.1,
                0,
                true,
                FMA,
            ),
            perf(
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0,
                true,
                0.2,
                0,
                false,
                TC,
            ),
            perf(
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3,
                true,
                0.3,
                1 << 30,
                true,
                TC,
            ),
            perf(
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                true,
                0.5,
                1 << 20,
                true,
                TC,
            ),
            perf(
                A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1,
                true,
                0.9,
                0,
                true,
                FMA,
            ),
        ];
        let rules = |deterministic, fma_only, max_workspace| Rules {
            deterministic,
            fma_only,
            max_workspace,
        };
        let pick = |r0: Rules| choose(&r, &r0).map(|f| (f.algo, f.ms));
        // The failed FFT is never taken, however fast.
        assert_eq!(
            pick(rules(false, false, usize::MAX)),
            Some((A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_0, 0.2))
        );
        assert_eq!(
            pick(rules(true, false, usize::MAX)),
            Some((A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_3, 0.3))
        );
        assert_eq!(
            pick(rules(true, false, 1 << 20)),
            Some((A::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, 0.5))
        );
        let f = choose(&r, &rules(true, true, usize::MAX)).unwrap();
        assert_eq!((f.ms, f.math), (0.9, FMA));
        assert!(choose(&r[..1], &rules(false, false, usize::MAX)).is_none());
    }
}
