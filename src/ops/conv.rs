//! 2-D convolution, no bias, NHWC; weights [out, kh, kw, in] (cuDNN's KRSC for NHWC).
//!   y[n, oh, ow, o] = sum_{ky, kx, c} x[n, oh*s - pad + ky, ow*s - pad + kx, c] * w[o, ky, kx, c]
//! (zero outside the image). With K = kh*kw*c_in and col = im2col(x_n) of shape (Ho*Wo, K):
//!   forward        y_n (Ho*Wo, O)  = col (Ho*Wo, K) * w^T (K, O)
//!   grad input     dx_n += col2im( dy_n (Ho*Wo, O) * w (O, K) )
//!   grad weight    dw (O, K)      += sum_n dy_n^T (O, Ho*Wo) * col_n (Ho*Wo, K)
//! A 1x1 stride-1 unpadded conv uses x_n itself as col. Each GEMM covers a block of images (their
//! col rows stacked; blocks sized by the shape alone) and is tiled over the threads (ops::par_gemm,
//! every output one sum in a fixed order), so no result depends on the thread count. Column buffers
//! are reused between calls (ops::with_scratch).
//! Saved for backward: nothing but the input x. Backward: += into dx and dw.

use super::{gemm, par_gemm, with_scratch, Mat, Real};
use rayon::prelude::*;

// ----------------------------------------------------------------------------
// Params

/// Mirrored field for field by `struct ConvParams` in kernels/conv.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvParams {
    pub n: i32,
    pub h_in: i32,
    pub w_in: i32,
    pub c_in: i32,
    pub c_out: i32,
    pub kh: i32,
    pub kw: i32,
    pub stride: i32,
    pub pad: i32,
    pub h_out: i32,
    pub w_out: i32,
}

impl ConvParams {
    /// A square k x k convolution; output size as PyTorch: floor((h + 2 pad - k) / stride) + 1.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        n: usize,
        h: usize,
        w: usize,
        c_in: usize,
        c_out: usize,
        k: usize,
        stride: usize,
        pad: usize,
    ) -> Self {
        assert!(
            h + 2 * pad >= k && w + 2 * pad >= k && stride > 0,
            "conv2d: kernel {k} pad {pad} does not fit input {h}x{w}"
        );
        let h_out = (h + 2 * pad - k) / stride + 1;
        let w_out = (w + 2 * pad - k) / stride + 1;
        let i = |v: usize| i32::try_from(v).expect("conv2d: dimension exceeds i32");
        ConvParams {
            n: i(n),
            h_in: i(h),
            w_in: i(w),
            c_in: i(c_in),
            c_out: i(c_out),
            kh: i(k),
            kw: i(k),
            stride: i(stride),
            pad: i(pad),
            h_out: i(h_out),
            w_out: i(w_out),
        }
    }
    pub fn k_dim(&self) -> usize {
        (self.kh * self.kw * self.c_in) as usize
    }
    pub fn x_len(&self) -> usize {
        (self.n * self.h_in * self.w_in * self.c_in) as usize
    }
    pub fn w_len(&self) -> usize {
        self.c_out as usize * self.k_dim()
    }
    pub fn y_len(&self) -> usize {
        (self.n * self.h_out * self.w_out * self.c_out) as usize
    }
    /// Multiply-adds of the forward (each of the two backward GEMMs costs the same).
    pub fn macs(&self) -> u64 {
        (self.n as u64) * (self.h_out * self.w_out) as u64 * self.c_out as u64 * self.k_dim() as u64
    }
    fn pointwise(&self) -> bool {
        self.kh == 1 && self.kw == 1 && self.stride == 1 && self.pad == 0
    }
    fn check(&self, op: &str, x: usize, w: usize, y: usize) {
        assert!(
            x == self.x_len() && w == self.w_len() && y == self.y_len(),
            "{op}: lengths x {x} w {w} y {y}, expected {} {} {} for {:?}",
            self.x_len(),
            self.w_len(),
            self.y_len(),
            self
        );
    }
}

// ----------------------------------------------------------------------------
// CPU reference

/// The taps kx in [lo, hi) of a kernel row whose input columns ow*s - pad + kx lie inside the
/// image; in NHWC they are one contiguous run of (hi - lo) * C values of x.
fn tap_run(ow: isize, p: &ConvParams) -> (usize, usize) {
    let (s, pad, kw, w) = (
        p.stride as isize,
        p.pad as isize,
        p.kw as isize,
        p.w_in as isize,
    );
    let first = ow * s - pad; // input column of tap 0
    let lo = (-first).clamp(0, kw);
    let hi = (w - first).clamp(lo, kw);
    (lo as usize, hi as usize)
}

/// col (Ho*Wo, K) from one image x_n (H, W, C); taps outside the image are zero. Each kernel row
/// is copied as one run of contiguous input (a 7x7 stem with C = 3 copies 21 values at once, not
/// 3 per tap).
fn im2col<T: Real>(x_n: &[T], col: &mut [T], p: &ConvParams) {
    let kdim = p.k_dim();
    for oh in 0..p.h_out as usize {
        for ow in 0..p.w_out as usize {
            let row = &mut col[(oh * p.w_out as usize + ow) * kdim..][..kdim];
            im2col_row(x_n, row, oh, ow, p);
        }
    }
}

/// One row of im2col: the taps of output pixel (oh, ow) of image x_n (H, W, C).
fn im2col_row<T: Real>(x_n: &[T], row: &mut [T], oh: usize, ow: usize, p: &ConvParams) {
    let (h, w, c) = (p.h_in as isize, p.w_in as isize, p.c_in as usize);
    let kw = p.kw as usize;
    let (s, pad) = (p.stride as isize, p.pad as isize);
    let (oh, ow) = (oh as isize, ow as isize);
    let (lo, hi) = tap_run(ow, p);
    let iw_lo = ow * s - pad + lo as isize;
    for (ky, dst) in row.chunks_exact_mut(kw * c).enumerate() {
        let ih = oh * s - pad + ky as isize;
        if ih < 0 || ih >= h || lo == hi {
            dst.fill(T::zero());
            continue;
        }
        dst[..lo * c].fill(T::zero());
        dst[lo * c..hi * c]
            .copy_from_slice(&x_n[((ih * w + iw_lo) as usize) * c..][..(hi - lo) * c]);
        dst[hi * c..].fill(T::zero());
    }
}

/// dx_n (H, W, C) += col2im(dcol (Ho*Wo, K)); a fixed loop order, one image per call. Each kernel
/// row adds one contiguous run, in the same order per element as tap by tap.
fn col2im_add<T: Real>(dcol: &[T], dx_n: &mut [T], p: &ConvParams) {
    let (h, w, c) = (p.h_in as isize, p.w_in as isize, p.c_in as usize);
    let kw = p.kw as usize;
    let (s, pad) = (p.stride as isize, p.pad as isize);
    let kdim = p.k_dim();
    for oh in 0..p.h_out as isize {
        for ow in 0..p.w_out as isize {
            let row = &dcol[(oh * p.w_out as isize + ow) as usize * kdim..][..kdim];
            let (lo, hi) = tap_run(ow, p);
            if lo == hi {
                continue;
            }
            let iw_lo = ow * s - pad + lo as isize;
            for (ky, src) in row.chunks_exact(kw * c).enumerate() {
                let ih = oh * s - pad + ky as isize;
                if ih < 0 || ih >= h {
                    continue;
                }
                let dst = &mut dx_n[((ih * w + iw_lo) as usize) * c..][..(hi - lo) * c];
                for (d, v) in dst.iter_mut().zip(&src[lo * c..hi * c]) {
                    *d = *d + *v;
                }
            }
        }
    }
}

fn col_len(p: &ConvParams) -> usize {
    if p.pointwise() {
        0
    } else {
        (p.h_out * p.w_out) as usize * p.k_dim()
    }
}

/// Weights (O x K elements) below which an im2col conv runs its forward in blocks of `ROW_TILE`
/// output rows, each with its own GEMM (the weights packed again for each: cheap when they are
/// small, as in the stem and the narrow layers), so that the columns stay in cache instead of
/// going out to memory and back. (The data gradient image by image the same way measured slower:
/// its per-image GEMMs are too small.)
const SMALL_W: usize = 1 << 16;

/// Output rows per block of the small-weights forward.
const ROW_TILE: usize = 256;

/// Whether `p` takes the small-weights paths (an im2col conv: not pointwise).
fn small_weights(p: &ConvParams) -> bool {
    !p.pointwise() && p.w_len() <= SMALL_W
}

/// Column-buffer elements one GEMM block may use (8 MiB of f32). Blocks never split an image.
const COL_BLOCK_ELEMS: usize = 1 << 21;

/// Images per GEMM: as many as the batch has, fewer where their im2col columns would pass
/// `COL_BLOCK_ELEMS` (at least one; the whole batch for a pointwise conv, which has no columns).
/// It depends on the shape only. One GEMM over a block instead of one per image packs the weights
/// once per block, which is most of the cost at small spatial sizes.
fn block_cap(p: &ConvParams) -> usize {
    (COL_BLOCK_ELEMS / col_len(p).max(1)).max(1)
}

/// The blocks of images, in order: (first image, images).
fn blocks(p: &ConvParams, cap: usize) -> impl Iterator<Item = (usize, usize)> {
    let n = p.n as usize;
    (0..n).step_by(cap.max(1)).map(move |s| (s, cap.min(n - s)))
}

/// im2col of consecutive images (each `img_in` long in `x`) into consecutive row blocks of `col`,
/// the images in parallel.
fn im2col_images<T: Real>(x: &[T], col: &mut [T], p: &ConvParams) {
    let img_in = (p.h_in * p.w_in * p.c_in) as usize;
    let per = col_len(p);
    col.par_chunks_mut(per)
        .zip(x.par_chunks(img_in))
        .for_each(|(col_n, x_n)| im2col(x_n, col_n, p));
}

/// y (N, Ho, Wo, O) = conv(x (N, H, W, C), w (O, kh, kw, C)); y is overwritten.
/// Per block of images: im2col (the images in parallel), then one GEMM tiled over the threads
/// (`par_gemm`: each output is one sum in a fixed order, whatever the thread count).
pub fn forward_cpu<T: Real>(x: &[T], w: &[T], y: &mut [T], p: &ConvParams) {
    p.check("conv2d_forward", x.len(), w.len(), y.len());
    let img_in = (p.h_in * p.w_in * p.c_in) as usize;
    let img_out = (p.h_out * p.w_out * p.c_out) as usize;
    let (m, kdim, co) = ((p.h_out * p.w_out) as usize, p.k_dim(), p.c_out as usize);
    if img_out == 0 {
        return;
    }
    if small_weights(p) {
        // Blocks of output rows (across images), each im2col'd into a per-thread buffer that stays
        // in cache and multiplied at once: the columns never go out to memory. Every output is
        // the same sum as in the one large GEMM (a row split), bit for bit.
        y.par_chunks_mut(ROW_TILE * co)
            .enumerate()
            .for_each(|(b, y_b)| {
                let rows = y_b.len() / co;
                with_scratch(rows * kdim, |col: &mut [T]| {
                    for (i, row) in col.chunks_exact_mut(kdim).enumerate() {
                        let r = b * ROW_TILE + i;
                        let (img, pix) = (r / m, r % m);
                        let (oh, ow) = (pix / p.w_out as usize, pix % p.w_out as usize);
                        im2col_row(&x[img * img_in..][..img_in], row, oh, ow, p);
                    }
                    let (va, vw) = (Mat::rows(rows, kdim, 0), Mat::rows(co, kdim, 0).t());
                    let (one, zero, vy) = (T::one(), T::zero(), Mat::rows(rows, co, 0));
                    gemm("conv2d_forward", one, col, va, w, vw, zero, y_b, vy);
                });
            });
        return;
    }
    for (start, imgs) in blocks(p, block_cap(p)) {
        let x_b = &x[start * img_in..][..imgs * img_in];
        let y_b = &mut y[start * img_out..][..imgs * img_out];
        let gemm_b = |a: &[T], y_b: &mut [T]| {
            par_gemm(
                "conv2d_forward",
                T::one(),
                a,
                Mat::rows(imgs * m, kdim, 0),
                w,
                Mat::rows(co, kdim, 0).t(),
                T::zero(),
                y_b,
                Mat::rows(imgs * m, co, 0),
            )
        };
        if p.pointwise() {
            gemm_b(x_b, y_b);
        } else {
            with_scratch(imgs * col_len(p), |col: &mut [T]| {
                im2col_images(x_b, col, p);
                gemm_b(col, y_b);
            });
        }
    }
}

/// dx (N, H, W, C) += conv2d input gradient of dy (N, Ho, Wo, O) through w (O, kh, kw, C).
/// Per block: one tiled GEMM into columns, then col2im (the images in parallel).
pub fn backward_data_cpu<T: Real>(dy: &[T], w: &[T], dx: &mut [T], p: &ConvParams) {
    p.check("conv2d_backward_data", dx.len(), w.len(), dy.len());
    let img_in = (p.h_in * p.w_in * p.c_in) as usize;
    let img_out = (p.h_out * p.w_out * p.c_out) as usize;
    let (m, kdim, co) = ((p.h_out * p.w_out) as usize, p.k_dim(), p.c_out as usize);
    if img_in == 0 {
        return;
    }
    for (start, imgs) in blocks(p, block_cap(p)) {
        let dy_b = &dy[start * img_out..][..imgs * img_out];
        let dx_b = &mut dx[start * img_in..][..imgs * img_in];
        let (vdy, vw) = (Mat::rows(imgs * m, co, 0), Mat::rows(co, kdim, 0));
        let vcol = Mat::rows(imgs * m, kdim, 0);
        if p.pointwise() {
            par_gemm(
                "conv2d_backward_data",
                T::one(),
                dy_b,
                vdy,
                w,
                vw,
                T::one(),
                dx_b,
                vcol,
            );
            continue;
        }
        with_scratch(imgs * m * kdim, |col: &mut [T]| {
            par_gemm(
                "conv2d_backward_data",
                T::one(),
                dy_b,
                vdy,
                w,
                vw,
                T::zero(),
                col,
                vcol,
            );
            col.par_chunks(m * kdim)
                .zip(dx_b.par_chunks_mut(img_in))
                .for_each(|(col_n, dx_n)| col2im_add(col_n, dx_n, p));
        });
    }
}

/// dw (O, kh, kw, C) += conv2d weight gradient from x (N, H, W, C) and dy (N, Ho, Wo, O).
/// One tiled GEMM per block of images (blocks capped by `COL_BLOCK_ELEMS`, so by the shape
/// alone), each adding into dw in block order: no per-thread partials, and every boundary depends
/// on the shape only, never on the thread count.
pub fn backward_weight_cpu<T: Real>(x: &[T], dy: &[T], dw: &mut [T], p: &ConvParams) {
    p.check("conv2d_backward_weight", x.len(), dw.len(), dy.len());
    backward_weight_blocks(x, dy, dw, p, block_cap(p));
}

/// The weight gradient with at most `cap` images per GEMM.
fn backward_weight_blocks<T: Real>(x: &[T], dy: &[T], dw: &mut [T], p: &ConvParams, cap: usize) {
    let img_in = (p.h_in * p.w_in * p.c_in) as usize;
    let img_out = (p.h_out * p.w_out * p.c_out) as usize;
    let (m, kdim, co) = ((p.h_out * p.w_out) as usize, p.k_dim(), p.c_out as usize);
    if img_out == 0 || kdim == 0 {
        return;
    }
    for (start, imgs) in blocks(p, cap) {
        let x_b = &x[start * img_in..][..imgs * img_in];
        let dy_b = &dy[start * img_out..][..imgs * img_out];
        let gemm_b = |a: &[T], dw: &mut [T]| {
            par_gemm(
                "conv2d_backward_weight",
                T::one(),
                dy_b,
                Mat::rows(imgs * m, co, 0).t(),
                a,
                Mat::rows(imgs * m, kdim, 0),
                T::one(),
                dw,
                Mat::rows(co, kdim, 0),
            )
        };
        if p.pointwise() {
            gemm_b(x_b, dw);
        } else {
            with_scratch(imgs * col_len(p), |col: &mut [T]| {
                im2col_images(x_b, col, p);
                gemm_b(col, dw);
            });
        }
    }
}

// ----------------------------------------------------------------------------
// CUDA launchers

// ---- CUDA launchers: cuDNN, NHWC activations, KRSC weights, f32 compute. Algorithms are chosen
// by benchmarking (cudnnFind, ops::conv_find) the first time a (shape, dtype) is seen and cached
// on the Gpu; under --deterministic only deterministic ones. Backward adds (beta = 1) into dx, dw.

use super::conv_find::{choose, Finder, Rules};
use crate::gpu::{need, Dev, DevMut, Gpu, GpuFloat};
use crate::tensor::DType;
use cudarc::cudnn::sys::{
    cudnnConvolutionBwdDataAlgo_t as BwdData, cudnnConvolutionBwdFilterAlgo_t as BwdFilter,
    cudnnConvolutionFwdAlgo_t as Fwd, cudnnConvolutionMode_t, cudnnMathType_t, cudnnTensorFormat_t,
};
use cudarc::cudnn::{
    ConvBackwardData, ConvBackwardFilter, ConvDescriptor, ConvForward, FilterDescriptor,
    TensorDescriptor,
};
use std::any::Any;
use std::collections::HashMap;

/// The algorithms chosen for one convolution shape, each with the math type it was measured with.
#[derive(Clone, Copy, Debug)]
pub struct ConvAlgos {
    pub fwd: (Fwd, cudnnMathType_t),
    pub bwd_data: (BwdData, cudnnMathType_t),
    pub bwd_filter: (BwdFilter, cudnnMathType_t),
}

struct Descs<T: GpuFloat> {
    x: TensorDescriptor<T>,
    w: FilterDescriptor<T>,
    y: TensorDescriptor<T>,
    conv: ConvDescriptor<f32>,
}

/// The math type asked for: tensor cores for bf16, TF32 for f32 when on, exact FMA otherwise.
fn math_type<T: GpuFloat>(g: &Gpu) -> cudnnMathType_t {
    match (T::DTYPE, g.tf32()) {
        (DType::BF16, _) => cudnnMathType_t::CUDNN_TENSOR_OP_MATH,
        (DType::F32, true) => cudnnMathType_t::CUDNN_DEFAULT_MATH,
        (DType::F32, false) => cudnnMathType_t::CUDNN_FMA_MATH,
    }
}

fn descs<T: GpuFloat>(g: &Gpu, p: &ConvParams) -> crate::Result<Descs<T>> {
    let nhwc = cudnnTensorFormat_t::CUDNN_TENSOR_NHWC;
    let e = |e| g.err("cuDNN descriptor", e);
    let x = g
        .cudnn
        .create_4d_tensor::<T>(nhwc, [p.n, p.c_in, p.h_in, p.w_in])
        .map_err(e)?;
    let w = g
        .cudnn
        .create_4d_filter::<T>(nhwc, [p.c_out, p.c_in, p.kh, p.kw])
        .map_err(e)?;
    let y = g
        .cudnn
        .create_4d_tensor::<T>(nhwc, [p.n, p.c_out, p.h_out, p.w_out])
        .map_err(e)?;
    let conv = conv_desc(g, p)?;
    Ok(Descs { x, w, y, conv })
}

fn conv_desc(g: &Gpu, p: &ConvParams) -> crate::Result<ConvDescriptor<f32>> {
    g.cudnn
        .create_conv2d::<f32>(
            [p.pad, p.pad],
            [p.stride, p.stride],
            [1, 1],
            cudnnConvolutionMode_t::CUDNN_CROSS_CORRELATION,
        )
        .map_err(|e| g.err("cuDNN descriptor", e))
}

/// Everything a convolution call of one (shape, dtype) needs from cuDNN, made once: the tensor,
/// filter and convolution descriptors (one convolution descriptor per direction, each with the
/// math type its algorithm was chosen with), the algorithms and their workspace sizes. Kept in
/// [`ConvState`].
pub(crate) struct Plan<T: GpuFloat> {
    d: Descs<T>,
    conv_data: ConvDescriptor<f32>,
    conv_filter: ConvDescriptor<f32>,
    a: ConvAlgos,
    /// Workspace bytes of the forward, backward-data and backward-filter algorithms.
    ws: [usize; 3],
}

fn make_plan<T: GpuFloat>(
    g: &Gpu,
    p: &ConvParams,
    finder: &mut Option<Finder>,
) -> crate::Result<Plan<T>> {
    let mut d = descs::<T>(g, p)?;
    let a = algos(g, p, &mut d, finder)?;
    let (mut conv_data, mut conv_filter) = (conv_desc(g, p)?, conv_desc(g, p)?);
    let math = |c: &mut ConvDescriptor<f32>, m| {
        c.set_math_type(m).map_err(|e| g.err("cuDNN math type", e))
    };
    math(&mut d.conv, a.fwd.1)?;
    math(&mut conv_data, a.bwd_data.1)?;
    math(&mut conv_filter, a.bwd_filter.1)?;
    let e = |e| g.err("cuDNN workspace", e);
    let ws = [
        ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        }
        .get_workspace_size(a.fwd.0)
        .map_err(e)?,
        ConvBackwardData {
            conv: &conv_data,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        }
        .get_workspace_size(a.bwd_data.0)
        .map_err(e)?,
        ConvBackwardFilter {
            conv: &conv_filter,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        }
        .get_workspace_size(a.bwd_filter.0)
        .map_err(e)?,
    ];
    Ok(Plan {
        d,
        conv_data,
        conv_filter,
        a,
        ws,
    })
}

/// Runs `f` on the plan of (p, T), made on first use.
fn with_plan<T: GpuFloat, R>(
    g: &Gpu,
    p: &ConvParams,
    f: impl FnOnce(&Plan<T>) -> crate::Result<R>,
) -> crate::Result<R> {
    let key = (*p, T::DTYPE);
    g.with_state(|st: &mut ConvState| {
        if !st.plans.contains_key(&key) {
            let plan = make_plan::<T>(g, p, &mut st.finder)?;
            st.plans.insert(key, Box::new(plan));
        }
        let plan = st.plans[&key]
            .downcast_ref::<Plan<T>>()
            .expect("a conv plan is stored under its own dtype");
        f(plan)
    })
}

/// What convolutions keep per GPU ([`Gpu::with_state`]; dropped when TF32 is switched, since
/// algorithm choices depend on the math type): a [`Plan`] per (shape, dtype), and the cuDNN
/// handle that benchmarks algorithms, made when first needed.
#[derive(Default)]
pub(crate) struct ConvState {
    plans: HashMap<(ConvParams, DType), Box<dyn Any>>,
    finder: Option<Finder>,
}

/// The largest workspace a benchmarked algorithm may ask for: a quarter of the free memory when
/// the shape is first seen, at most 1 GiB.
fn workspace_limit(g: &Gpu) -> usize {
    let free = g.ctx.mem_get_info().map(|(f, _)| f).unwrap_or(0);
    (free / 4).min(1 << 30)
}

/// Benchmarks the three directions of one shape with cudnnFind (see ops::conv_find).
fn benchmark<T: GpuFloat>(
    g: &Gpu,
    p: &ConvParams,
    finder: &mut Option<Finder>,
) -> Result<ConvAlgos, String> {
    if finder.is_none() {
        *finder = Some(Finder::new(&g.stream)?);
    }
    let dtype = match T::DTYPE {
        DType::BF16 => cudarc::cudnn::sys::cudnnDataType_t::CUDNN_DATA_BFLOAT16,
        DType::F32 => cudarc::cudnn::sys::cudnnDataType_t::CUDNN_DATA_FLOAT,
    };
    let math = math_type::<T>(g);
    let r = finder.as_ref().unwrap().find(p, dtype, math)?;
    let rules = Rules {
        deterministic: g.deterministic,
        fma_only: math == cudnnMathType_t::CUDNN_FMA_MATH,
        max_workspace: workspace_limit(g),
    };
    let none = |dir: &str| format!("no {dir} algorithm met {rules:?}");
    let fwd = choose(&r.fwd, &rules).ok_or_else(|| none("forward"))?;
    let data = choose(&r.bwd_data, &rules).ok_or_else(|| none("backward-data"))?;
    let filter = choose(&r.bwd_filter, &rules).ok_or_else(|| none("backward-filter"))?;
    if std::env::var_os("LEWEL_CUDNN_LOG").is_some() {
        eprintln!(
            "cudnn {:?} {:?}: fwd {:?} {:.3} ms {} B | data {:?} {:.3} ms {} B | filter {:?} {:.3} ms {} B",
            T::DTYPE, p, fwd.algo, fwd.ms, fwd.workspace, data.algo, data.ms, data.workspace,
            filter.algo, filter.ms, filter.workspace
        );
    }
    Ok(ConvAlgos {
        fwd: (fwd.algo, fwd.math),
        bwd_data: (data.algo, data.math),
        bwd_filter: (filter.algo, filter.math),
    })
}

/// cuDNN's heuristic choice, the fallback when benchmarking fails; under --deterministic the
/// backward passes use ALGO_1 (ALGO_0 and ALGO_3 sum with atomics).
fn heuristic<T: GpuFloat>(g: &Gpu, d: &Descs<T>) -> crate::Result<ConvAlgos> {
    let e = |e| g.err("cuDNN algorithm choice", e);
    let math = math_type::<T>(g);
    let fwd = ConvForward {
        conv: &d.conv,
        x: &d.x,
        w: &d.w,
        y: &d.y,
    }
    .pick_algorithm()
    .map_err(e)?;
    if g.deterministic {
        return Ok(ConvAlgos {
            fwd: (fwd, math),
            bwd_data: (BwdData::CUDNN_CONVOLUTION_BWD_DATA_ALGO_1, math),
            bwd_filter: (BwdFilter::CUDNN_CONVOLUTION_BWD_FILTER_ALGO_1, math),
        });
    }
    let bwd_data = ConvBackwardData {
        conv: &d.conv,
        dx: &d.x,
        w: &d.w,
        dy: &d.y,
    }
    .pick_algorithm()
    .map_err(e)?;
    let bwd_filter = ConvBackwardFilter {
        conv: &d.conv,
        x: &d.x,
        dw: &d.w,
        dy: &d.y,
    }
    .pick_algorithm()
    .map_err(e)?;
    Ok(ConvAlgos {
        fwd: (fwd, math),
        bwd_data: (bwd_data, math),
        bwd_filter: (bwd_filter, math),
    })
}

/// The algorithms for a new shape: benchmarked (cuDNN's heuristic under --deterministic); a
/// failed benchmark falls back to the heuristic, and the reason is kept for `lewel check` and the
/// run's warning. The plan that holds them is kept (see [`ConvState`]).
fn algos<T: GpuFloat>(
    g: &Gpu,
    p: &ConvParams,
    d: &mut Descs<T>,
    finder: &mut Option<Finder>,
) -> crate::Result<ConvAlgos> {
    // Heuristic descriptors need the math type set before the query.
    d.conv
        .set_math_type(math_type::<T>(g))
        .map_err(|e| g.err("cuDNN math type", e))?;
    // Under --deterministic, cuDNN's heuristic: benchmarking picks by measured time, and timing
    // noise can pick another (deterministic, but differently summing) algorithm on a rerun, so
    // reruns would differ in their last bits (seen on the software GPU).
    if g.deterministic {
        return heuristic(g, d);
    }
    match benchmark::<T>(g, p, finder) {
        Ok(a) => Ok(a),
        Err(why) => {
            g.find_failure.borrow_mut().get_or_insert(why);
            heuristic(g, d)
        }
    }
}

/// y = conv(x, w).
pub fn forward_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConvParams,
    x: &impl Dev<T>,
    w: &impl Dev<T>,
    y: &mut impl DevMut<T>,
) -> crate::Result<()> {
    need(
        "conv::forward_cuda",
        &[
            ("x", x.len(), p.x_len()),
            ("w", w.len(), p.w_len()),
            ("y", y.len(), p.y_len()),
        ],
    )?;
    with_plan::<T, _>(g, p, |pl| {
        let d = &pl.d;
        let op = ConvForward {
            conv: &d.conv,
            x: &d.x,
            w: &d.w,
            y: &d.y,
        };
        let mut ws = g.workspace(pl.ws[0])?;
        // SAFETY: buffers match the descriptors built from p.
        unsafe {
            op.launch(
                pl.a.fwd.0,
                ws.as_mut(),
                (T::from_f32(1.0), T::from_f32(0.0)),
                &x.view(),
                &w.view(),
                &mut y.view_mut(),
            )
        }
        .map_err(|e| g.err("cuDNN conv forward", e))
    })
}

/// dx += conv_backward_data(dy, w).
pub fn backward_data_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConvParams,
    dy: &impl Dev<T>,
    w: &impl Dev<T>,
    dx: &mut impl DevMut<T>,
) -> crate::Result<()> {
    need(
        "conv::backward_data_cuda",
        &[
            ("dy", dy.len(), p.y_len()),
            ("w", w.len(), p.w_len()),
            ("dx", dx.len(), p.x_len()),
        ],
    )?;
    with_plan::<T, _>(g, p, |pl| {
        let d = &pl.d;
        let op = ConvBackwardData {
            conv: &pl.conv_data,
            dx: &d.x,
            w: &d.w,
            dy: &d.y,
        };
        let mut ws = g.workspace(pl.ws[1])?;
        // SAFETY: buffers match the descriptors built from p.
        unsafe {
            op.launch(
                pl.a.bwd_data.0,
                ws.as_mut(),
                (T::from_f32(1.0), T::from_f32(1.0)),
                &mut dx.view_mut(),
                &w.view(),
                &dy.view(),
            )
        }
        .map_err(|e| g.err("cuDNN conv backward data", e))
    })
}

/// dw += conv_backward_filter(x, dy).
pub fn backward_weight_cuda<T: GpuFloat>(
    g: &Gpu,
    p: &ConvParams,
    x: &impl Dev<T>,
    dy: &impl Dev<T>,
    dw: &mut impl DevMut<T>,
) -> crate::Result<()> {
    need(
        "conv::backward_weight_cuda",
        &[
            ("x", x.len(), p.x_len()),
            ("dy", dy.len(), p.y_len()),
            ("dw", dw.len(), p.w_len()),
        ],
    )?;
    with_plan::<T, _>(g, p, |pl| {
        let d = &pl.d;
        let op = ConvBackwardFilter {
            conv: &pl.conv_filter,
            x: &d.x,
            dw: &d.w,
            dy: &d.y,
        };
        let mut ws = g.workspace(pl.ws[2])?;
        // SAFETY: buffers match the descriptors built from p.
        unsafe {
            op.launch(
                pl.a.bwd_filter.0,
                ws.as_mut(),
                (T::from_f32(1.0), T::from_f32(1.0)),
                &x.view(),
                &mut dw.view_mut(),
                &dy.view(),
            )
        }
        .map_err(|e| g.err("cuDNN conv backward filter", e))
    })
}

// ----------------------------------------------------------------------------
// Kernels

use crate::backend::{Backend, Cpu, Cuda, Elem, Ve, VeMut};
use cudarc::cublas::{CudaBlas, Gemm};

/// The convolution's kernels on a backend (the graph's conv node).
pub trait ConvKernels: Backend {
    fn conv_forward(
        &self,
        p: &ConvParams,
        x: &Ve<Self>,
        w: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn conv_backward_data(
        &self,
        p: &ConvParams,
        dy: &Ve<Self>,
        w: &Ve<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()>;
    fn conv_backward_weight(
        &self,
        p: &ConvParams,
        x: &Ve<Self>,
        dy: &Ve<Self>,
        dw: &mut VeMut<Self>,
    ) -> crate::Result<()>;
}

impl<T: Real + Elem> ConvKernels for Cpu<T> {
    fn conv_forward(
        &self,
        p: &ConvParams,
        x: &&[T],
        w: &&[T],
        y: &mut &mut [T],
    ) -> crate::Result<()> {
        forward_cpu(x, w, y, p);
        Ok(())
    }
    fn conv_backward_data(
        &self,
        p: &ConvParams,
        dy: &&[T],
        w: &&[T],
        dx: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_data_cpu(dy, w, dx, p);
        Ok(())
    }
    fn conv_backward_weight(
        &self,
        p: &ConvParams,
        x: &&[T],
        dy: &&[T],
        dw: &mut &mut [T],
    ) -> crate::Result<()> {
        backward_weight_cpu(x, dy, dw, p);
        Ok(())
    }
}

impl<E: GpuFloat> ConvKernels for Cuda<E>
where
    CudaBlas: Gemm<E>,
{
    fn conv_forward(
        &self,
        p: &ConvParams,
        x: &Ve<Self>,
        w: &Ve<Self>,
        y: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        forward_cuda(&self.gpu, p, x, w, y)
    }
    fn conv_backward_data(
        &self,
        p: &ConvParams,
        dy: &Ve<Self>,
        w: &Ve<Self>,
        dx: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        backward_data_cuda(&self.gpu, p, dy, w, dx)
    }
    fn conv_backward_weight(
        &self,
        p: &ConvParams,
        x: &Ve<Self>,
        dy: &Ve<Self>,
        dw: &mut VeMut<Self>,
    ) -> crate::Result<()> {
        backward_weight_cuda(&self.gpu, p, x, dy, dw)
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gradcheck::{assert_ok, check, uniform};

    /// Direct seven-loop convolution, independent of im2col and GEMM.
    fn forward_direct(x: &[f64], w: &[f64], p: &ConvParams) -> Vec<f64> {
        let mut y = vec![0.0; p.y_len()];
        let (h, wd, c) = (p.h_in as isize, p.w_in as isize, p.c_in as usize);
        for n in 0..p.n as usize {
            for oh in 0..p.h_out as isize {
                for ow in 0..p.w_out as isize {
                    for o in 0..p.c_out as usize {
                        let mut acc = 0.0;
                        for ky in 0..p.kh as isize {
                            for kx in 0..p.kw as isize {
                                let ih = oh * p.stride as isize - p.pad as isize + ky;
                                let iw = ow * p.stride as isize - p.pad as isize + kx;
                                if ih < 0 || iw < 0 || ih >= h || iw >= wd {
                                    continue;
                                }
                                for ci in 0..c {
                                    let xv = x[((n as isize * h + ih) * wd + iw) as usize * c + ci];
                                    let wv = w[((o * p.kh as usize + ky as usize) * p.kw as usize
                                        + kx as usize)
                                        * c
                                        + ci];
                                    acc += xv * wv;
                                }
                            }
                        }
                        y[((n * p.h_out as usize + oh as usize) * p.w_out as usize
                            + ow as usize)
                            * p.c_out as usize
                            + o] = acc;
                    }
                }
            }
        }
        y
    }

    fn configs() -> Vec<ConvParams> {
        vec![
            ConvParams::new(2, 5, 6, 3, 4, 3, 2, 1), // stride 2, padding, odd sizes
            ConvParams::new(2, 4, 3, 5, 3, 1, 1, 0), // pointwise path
            ConvParams::new(3, 5, 5, 2, 3, 1, 2, 0), // strided 1x1 (downsample)
            ConvParams::new(1, 7, 7, 3, 2, 7, 2, 3), // the stem's 7x7/2
            ConvParams::new(2, 3, 4, 2, 2, 3, 1, 1), // 3x3 stride 1
            ConvParams::new(2, 3, 2, 2, 3, 7, 1, 3), // kernel rows clipped on both sides
        ]
    }

    #[test]
    fn forward_matches_direct_loops() {
        for p in configs() {
            let x = uniform(1, p.x_len(), -1.0, 1.0);
            let w = uniform(2, p.w_len(), -1.0, 1.0);
            let mut y = vec![0.0; p.y_len()];
            forward_cpu(&x, &w, &mut y, &p);
            let r = forward_direct(&x, &w, &p);
            for (a, b) in y.iter().zip(&r) {
                assert!((a - b).abs() < 1e-12, "{p:?}: {a} vs {b}");
            }
        }
    }

    #[test]
    fn gradcheck_conv2d() {
        for p in configs() {
            let inputs = vec![
                uniform(3, p.x_len(), -1.0, 1.0),
                uniform(4, p.w_len(), -1.0, 1.0),
            ];
            let fwd = |xs: &[Vec<f64>]| {
                let mut y = vec![0.0; p.y_len()];
                forward_cpu(&xs[0], &xs[1], &mut y, &p);
                y
            };
            let bwd = |xs: &[Vec<f64>], dy: &[f64]| {
                let mut dx = vec![0.0; p.x_len()];
                let mut dw = vec![0.0; p.w_len()];
                backward_data_cpu(dy, &xs[1], &mut dx, &p);
                backward_weight_cpu(&xs[0], dy, &mut dw, &p);
                vec![Some(dx), Some(dw)]
            };
            assert_ok(check("conv2d", &["x", "w"], &inputs, &fwd, &bwd));
        }
    }

    #[test]
    fn backward_accumulates() {
        let p = ConvParams::new(2, 5, 5, 3, 4, 3, 2, 1);
        let x = uniform(5, p.x_len(), -1.0, 1.0);
        let w = uniform(6, p.w_len(), -1.0, 1.0);
        let dy = uniform(7, p.y_len(), -1.0, 1.0);
        let (mut dx1, mut dw1) = (vec![0.0; p.x_len()], vec![0.0; p.w_len()]);
        backward_data_cpu(&dy, &w, &mut dx1, &p);
        backward_weight_cpu(&x, &dy, &mut dw1, &p);
        let (mut dx2, mut dw2) = (dx1.clone(), dw1.clone());
        backward_data_cpu(&dy, &w, &mut dx2, &p);
        backward_weight_cpu(&x, &dy, &mut dw2, &p);
        for (a, b) in dx1.iter().zip(&dx2).chain(dw1.iter().zip(&dw2)) {
            assert!((2.0 * a - b).abs() < 1e-12);
        }
    }

    #[test]
    fn weight_gradient_blocks_sum_the_same() {
        // Stacking a group's images into one GEMM, or cutting it into several, changes nothing
        // but rounding: the weight gradient at one image per GEMM against five.
        let p = ConvParams::new(5, 6, 6, 3, 4, 3, 2, 1);
        let x = uniform(10, p.x_len(), -1.0, 1.0);
        let dy = uniform(11, p.y_len(), -1.0, 1.0);
        let mut one = vec![0.0; p.w_len()];
        backward_weight_blocks(&x, &dy, &mut one, &p, 1);
        let mut all = vec![0.0; p.w_len()];
        backward_weight_blocks(&x, &dy, &mut all, &p, 5);
        for (a, b) in one.iter().zip(&all) {
            assert!((a - b).abs() < 1e-12, "{a} vs {b}");
        }
    }

    #[test]
    fn small_weight_paths_are_the_block_gemm_bit_for_bit() {
        // The stem-like and 3x3 shapes below take the small-weights forward (row tiles); it and
        // the data gradient must equal one GEMM over the whole batch's columns exactly.
        for p in [
            ConvParams::new(3, 20, 20, 3, 8, 7, 2, 3),
            ConvParams::new(2, 12, 12, 16, 8, 3, 1, 1),
            ConvParams::new(2, 9, 9, 8, 12, 1, 2, 0),
        ] {
            assert!(small_weights(&p));
            let f = |seed, len| -> Vec<f32> {
                uniform(seed, len, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect()
            };
            let (x, w, dy) = (f(1, p.x_len()), f(2, p.w_len()), f(3, p.y_len()));
            let (n, m, kdim, co) = (
                p.n as usize,
                (p.h_out * p.w_out) as usize,
                p.k_dim(),
                p.c_out as usize,
            );
            let img_in = (p.h_in * p.w_in * p.c_in) as usize;
            let mut col = vec![0.0f32; n * m * kdim];
            for (x_n, c_n) in x.chunks(img_in).zip(col.chunks_mut(m * kdim)) {
                im2col(x_n, c_n, &p);
            }
            let (va, vw) = (Mat::rows(n * m, kdim, 0), Mat::rows(co, kdim, 0));
            let mut want = vec![0.0f32; p.y_len()];
            gemm(
                "t",
                1.0,
                &col,
                va,
                &w,
                vw.t(),
                0.0,
                &mut want,
                Mat::rows(n * m, co, 0),
            );
            let mut got = vec![0.0f32; p.y_len()];
            forward_cpu(&x, &w, &mut got, &p);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{p:?} forward"
            );
            let mut dcol = vec![0.0f32; n * m * kdim];
            gemm(
                "t",
                1.0,
                &dy,
                Mat::rows(n * m, co, 0),
                &w,
                vw,
                0.0,
                &mut dcol,
                va,
            );
            let dx0 = f(4, p.x_len());
            let mut want = dx0.clone();
            for (c_n, dx_n) in dcol.chunks(m * kdim).zip(want.chunks_mut(img_in)) {
                col2im_add(c_n, dx_n, &p);
            }
            let mut got = dx0.clone();
            backward_data_cpu(&dy, &w, &mut got, &p);
            assert!(
                got.iter()
                    .zip(&want)
                    .all(|(a, b)| a.to_bits() == b.to_bits()),
                "{p:?} data grad"
            );
        }
    }

    #[test]
    fn passes_independent_of_thread_count() {
        let shapes = [
            ConvParams::new(20, 6, 6, 8, 8, 3, 1, 1),
            ConvParams::new(7, 5, 5, 6, 4, 1, 1, 0),
            ConvParams::new(9, 7, 7, 3, 5, 7, 2, 3),
            // Large enough for par_gemm to tile: (4*256 rows) x 288 -> 64, 1x1 likewise.
            ConvParams::new(4, 16, 16, 32, 64, 3, 1, 1),
            ConvParams::new(4, 16, 16, 64, 256, 1, 1, 0),
        ];
        for p in shapes {
            let f = |seed, len| -> Vec<f32> {
                uniform(seed, len, -1.0, 1.0)
                    .iter()
                    .map(|&v| v as f32)
                    .collect()
            };
            let (x, w, dy) = (f(8, p.x_len()), f(9, p.w_len()), f(10, p.y_len()));
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new()
                    .num_threads(threads)
                    .build()
                    .unwrap();
                pool.install(|| {
                    let mut y = vec![0.0f32; p.y_len()];
                    forward_cpu(&x, &w, &mut y, &p);
                    let mut dx = vec![0.0f32; p.x_len()];
                    backward_data_cpu(&dy, &w, &mut dx, &p);
                    let mut dw = vec![0.0f32; p.w_len()];
                    backward_weight_cpu(&x, &dy, &mut dw, &p);
                    [y, dx, dw]
                })
            };
            let a = run(1);
            for threads in [2, 3, 5] {
                let b = run(threads);
                for (u, v) in a.iter().zip(&b) {
                    assert!(
                        u.iter().zip(v).all(|(s, t)| s.to_bits() == t.to_bits()),
                        "{p:?}: {threads} threads differ from 1"
                    );
                }
            }
        }
    }
}
