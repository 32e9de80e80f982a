//! `lewel check`: link 3 of the chain of trust (DESIGN "Tests"): every GPU op, forward and backward,
//! against the CPU reference on random inputs at ResNet-50 shapes, in f32 (TF32 off) and bf16.
//!
//! For each output: NaN/Inf first, then a sentinel tail written after every output buffer (an
//! out-of-bounds write changes it), then the normalized mean squared error
//! NMSE = |gpu - cpu|^2 / |cpu|^2 against a tolerance by dtype. Inputs are rounded to the dtype
//! before the CPU sees them, so the error measured is the GPU's arithmetic and storage alone.
//! Gradient buffers start from random values on both sides: the check also holds `+=`.

pub mod step;

use crate::error::{Error, Result};
use crate::gpu::{accum_f32_cuda, cast_from_f32_cuda, Gpu, GpuFloat};
use crate::ops::{
    add, aggregate, batchnorm, concat, conv, l2norm, linear, loss, pool, relu, softmax,
};
use crate::rng::Rng;
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaSlice, CudaViewMut};

/// Sentinel written after every output (exact in f32 and bf16).
const SENT: f32 = 1024.0;
const TAIL: usize = 64;
const SENT_CHANGED: &str = "wrote past its end (sentinel changed)";

thread_local! {
    /// (row name, hash of the GPU output's bytes) of every compared output, in table order.
    static DIGESTS: std::cell::RefCell<Vec<(String, u64)>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// The digests of the outputs compared since the last call (`lewel check --digests`): the same
/// kernels on the same inputs give the same bytes, whatever order the threads ran in.
pub fn digests() -> Vec<(String, u64)> {
    DIGESTS.with(|d| std::mem::take(&mut *d.borrow_mut()))
}

/// 64-bit FNV-1a of the values' bits (with the sentinel tail).
fn digest(name: String, v: &[f32]) {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for x in v {
        for b in x.to_bits().to_le_bytes() {
            h ^= b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    DIGESTS.with(|d| d.borrow_mut().push((name, h)));
}

/// One line of the table.
#[derive(Clone, Debug)]
pub struct Row {
    pub op: String,
    pub dtype: &'static str,
    pub output: &'static str,
    pub nmse: f64,
    pub tol: f64,
    /// Empty when the row passes; else why not.
    pub failure: String,
}

impl Row {
    /// The failing row of a check that stopped with an error (the table goes on).
    pub fn error(op: &str, dtype: &'static str, e: &crate::Error) -> Row {
        Row {
            op: op.into(),
            dtype,
            output: "(error)",
            nmse: f64::NAN,
            tol: 0.0,
            failure: format!("error: {e}"),
        }
    }

    pub fn pass(&self) -> bool {
        self.failure.is_empty()
    }
}

/// NMSE tolerance per dtype: f32 without TF32 differs from the CPU only by summation order;
/// bf16 rounds every stored activation to 8 mantissa bits (NMSE about 1e-6 per rounding).
fn tol<T: GpuFloat>() -> f64 {
    match T::DTYPE {
        crate::tensor::DType::F32 => 1e-9,
        crate::tensor::DType::BF16 => 1e-4,
    }
}

fn dtype_name<T: GpuFloat>() -> &'static str {
    match T::DTYPE {
        crate::tensor::DType::F32 => "f32",
        crate::tensor::DType::BF16 => "bf16",
    }
}

struct Ctx<'a> {
    g: &'a Gpu,
    rng: Rng,
    rows: Vec<Row>,
    /// $LEWEL_CHECK_ONLY's words, when set.
    only: Option<Vec<String>>,
}

impl Ctx<'_> {
    /// Runs one section of the table (skipped when $LEWEL_CHECK_ONLY names others). An error inside
    /// it (a launch failure, a library's NOT_SUPPORTED) becomes one failing row, after the rows the
    /// section already made, and the table goes on.
    fn section(
        &mut self,
        name: &str,
        dtype: &'static str,
        f: impl FnOnce(&mut Self) -> Result<()>,
    ) {
        if let Some(words) = &self.only {
            if !words.iter().any(|w| name.contains(w.as_str())) {
                return;
            }
        }
        if let Err(e) = f(self) {
            self.rows.push(Row::error(name, dtype, &e));
        }
    }

    /// Random values rounded to T.
    fn rand<T: GpuFloat>(&mut self, n: usize, scale: f32) -> Vec<f32> {
        (0..n)
            .map(|_| T::from_f32(self.rng.normal() as f32 * scale).to_f32())
            .collect()
    }

    /// A device copy of v followed by the sentinel tail.
    fn put<T: GpuFloat>(&self, v: &[f32]) -> Result<CudaSlice<T>> {
        let mut h = v.to_vec();
        h.extend(std::iter::repeat_n(SENT, TAIL));
        self.g.upload(&h)
    }

    /// Compares a device output (with its tail) against the CPU's values.
    fn cmp<T: GpuFloat>(
        &mut self,
        op: &str,
        output: &'static str,
        d: &CudaSlice<T>,
        cpu: &[f32],
        tol: f64,
    ) -> Result<()> {
        let all = self.g.download(d)?;
        digest(format!("{op}|{}|{output}", dtype_name::<T>()), &all);
        let (gpu, tail) = all.split_at(cpu.len());
        let mut failure = String::new();
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, b) in gpu.iter().zip(cpu) {
            num += ((a - b) as f64).powi(2);
            den += (*b as f64).powi(2);
        }
        let nmse = num / den.max(1e-30);
        if let Some(i) = gpu.iter().position(|v| !v.is_finite()) {
            failure = format!("non-finite at {i}: {}", gpu[i]);
        } else if tail.iter().any(|&v| v != SENT) {
            failure = SENT_CHANGED.into();
        } else if nmse.is_nan() || nmse > tol {
            failure = format!("NMSE {nmse:.2e} > {tol:.0e}");
        }
        self.rows.push(Row {
            op: op.into(),
            dtype: dtype_name::<T>(),
            output,
            nmse,
            tol,
            failure,
        });
        Ok(())
    }

    /// Records a row that passes only when the device output equals the CPU's bit for bit (its
    /// NMSE over finite values is shown) and its sentinel tail is intact.
    fn bitwise<S: GpuFloat>(
        &mut self,
        (op, dtype, output): (&str, &'static str, &'static str),
        d: &CudaSlice<S>,
        cpu: &[f32],
    ) -> Result<()> {
        let all = self.g.download(d)?;
        digest(format!("{op}|{dtype}|{output}"), &all);
        let (gpu, tail) = all.split_at(cpu.len());
        let (mut num, mut den) = (0.0f64, 0.0f64);
        for (a, b) in gpu.iter().zip(cpu) {
            if a.is_finite() && b.is_finite() {
                num += ((a - b) as f64).powi(2);
                den += (*b as f64).powi(2);
            }
        }
        let first = gpu
            .iter()
            .zip(cpu)
            .position(|(a, b)| a.to_bits() != b.to_bits());
        let failure = match first {
            Some(i) => format!(
                "differs at {i}: gpu {:#010x}, cpu {:#010x}",
                gpu[i].to_bits(),
                cpu[i].to_bits()
            ),
            None if tail.iter().any(|&v| v != SENT) => SENT_CHANGED.into(),
            None => String::new(),
        };
        self.rows.push(Row {
            op: op.into(),
            dtype,
            output,
            nmse: num / den.max(1e-30),
            tol: 0.0,
            failure,
        });
        Ok(())
    }
}

/// Runs every op check in f32 (TF32 off) and bf16; returns the table.
pub fn run_ops(g: &Gpu, seed: u64) -> Result<Vec<Row>> {
    let mut c = Ctx {
        g,
        rng: Rng::keyed(&[seed, 0xc4ec]),
        rows: Vec::new(),
        only: only_filter(),
    };
    let tf32 = g.tf32();
    g.set_tf32(false)?;
    ops::<f32>(&mut c);
    ops::<half::bf16>(&mut c);
    g.set_tf32(tf32)?;
    c.section("LARS/EMA/SGD", "f32", optim);
    c.section("cast", "f32", cast::<f32>);
    c.section("cast", "bf16", cast::<half::bf16>);
    c.section("augment", "u8", |c| {
        let rows = crate::data::photometric_cuda::check(c.g, seed)?;
        c.rows.extend(rows);
        Ok(())
    });
    Ok(c.rows)
}

/// $LEWEL_CHECK_ONLY: comma-separated words; when set, only the sections whose name contains one
/// of them run (the whole-step checks after the op table are not affected).
fn only_filter() -> Option<Vec<String>> {
    let v = std::env::var("LEWEL_CHECK_ONLY").ok()?;
    let words: Vec<String> = v
        .split(',')
        .map(|w| w.trim().to_string())
        .filter(|w| !w.is_empty())
        .collect();
    (!words.is_empty()).then_some(words)
}

/// Every op section in dtype T (each conv, linear and batch-norm shape is a section of its own).
/// Each runs on its own: an error inside one is its failing row.
fn ops<T: GpuFloat>(c: &mut Ctx)
where
    CudaBlas: Gemm<T>,
{
    let dt = dtype_name::<T>();
    c.section("relu/add/scale", dt, elementwise::<T>);
    convs::<T>(c);
    bns::<T>(c);
    c.section("pool", dt, pools::<T>);
    linears::<T>(c);
    c.section("concat/split", dt, concat_split::<T>);
    c.section("l2norm/softmax/align", dt, norms::<T>);
    c.section("aggregate", dt, aggregate_rows::<T>);
    c.section("loss", dt, loss_rows::<T>);
    c.section("xent", dt, xent_rows::<T>);
}

fn elementwise<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    let t = tol::<T>();
    let g = c.g;
    // relu, add, scale at a ResNet-50 layer1 map (2 x 56 x 56 x 256). The launchers run over their
    // first input's length, so that input is passed as a window of the logical n elements: its
    // sentinel tail is not part of the op (else the tail is processed and the output's sentinel
    // overwritten).
    let n = 2 * 56 * 56 * 256;
    let (x, b, dy, dx0) = (
        c.rand::<T>(n, 1.0),
        c.rand::<T>(n, 1.0),
        c.rand::<T>(n, 1.0),
        c.rand::<T>(n, 1.0),
    );
    let (dx_, x_, b_) = (c.put::<T>(&dx0)?, c.put::<T>(&x)?, c.put::<T>(&b)?);
    let dy_ = c.put::<T>(&dy)?;
    let mut y_ = c.put::<T>(&vec![0.0; n])?;
    relu::forward_cuda(g, &x_.slice(..n), &mut y_)?;
    let mut y = vec![0.0; n];
    relu::forward_cpu(&x, &mut y);
    c.cmp("relu fwd 2x56x56x256", "y", &y_, &y, t)?;
    let mut d_ = dx_.clone();
    relu::backward_cuda(g, &x_.slice(..n), &dy_, &mut d_)?; // mask from x: same sign pattern as y
    let mut d = dx0.clone();
    relu::backward_cpu(&x, &dy, &mut d);
    c.cmp("relu bwd", "dx", &d_, &d, t)?;
    add::forward_cuda(g, &x_.slice(..n), &b_, &mut y_)?;
    add::forward_cpu(&x, &b, &mut y);
    c.cmp("add fwd", "y", &y_, &y, t)?;
    let mut d_ = dx_.clone();
    add::scale_backward_cuda(g, &dy_.slice(..n), 0.5, &mut d_)?;
    let mut d = dx0.clone();
    add::scale_backward_cpu(&dy, 0.5, &mut d);
    c.cmp("scale bwd (axpy)", "dx", &d_, &d, t)?;
    drop((dx_, x_, b_, dy_, y_));
    Ok(())
}

fn convs<T: GpuFloat>(c: &mut Ctx) {
    let t = tol::<T>();
    let g = c.g;
    // convolutions: the stem, a 1x1, a 3x3, a strided 3x3 and the strided 1x1 downsample.
    let shapes = [
        (
            "conv 7x7/2 3->64 @224",
            conv::ConvParams::new(2, 224, 224, 3, 64, 7, 2, 3),
        ),
        (
            "conv 1x1 256->64 @56",
            conv::ConvParams::new(2, 56, 56, 256, 64, 1, 1, 0),
        ),
        (
            "conv 3x3 64->64 @56",
            conv::ConvParams::new(2, 56, 56, 64, 64, 3, 1, 1),
        ),
        (
            "conv 3x3/2 128->128 @56",
            conv::ConvParams::new(2, 56, 56, 128, 128, 3, 2, 1),
        ),
        (
            "conv 1x1/2 1024->2048 @14",
            conv::ConvParams::new(2, 14, 14, 1024, 2048, 1, 2, 0),
        ),
    ];
    for (name, p) in shapes {
        c.section(name, dtype_name::<T>(), |c| {
            let ws = (2.0 / p.k_dim() as f32).sqrt();
            let (x, w) = (c.rand::<T>(p.x_len(), 1.0), c.rand::<T>(p.w_len(), ws));
            let (dy, dx0, dw0) = (
                c.rand::<T>(p.y_len(), 1.0),
                c.rand::<T>(p.x_len(), 1.0),
                c.rand::<T>(p.w_len(), 1.0),
            );
            let (x_, w_, dy_) = (c.put::<T>(&x)?, c.put::<T>(&w)?, c.put::<T>(&dy)?);
            let mut y_ = c.put::<T>(&vec![0.0; p.y_len()])?;
            conv::forward_cuda(g, &p, &x_, &w_, &mut y_)?;
            let mut y = vec![0.0; p.y_len()];
            conv::forward_cpu(&x, &w, &mut y, &p);
            c.cmp(name, "y", &y_, &y, t)?;
            let mut dx_ = c.put::<T>(&dx0)?;
            conv::backward_data_cuda(g, &p, &dy_, &w_, &mut dx_)?;
            let mut dx = dx0.clone();
            conv::backward_data_cpu(&dy, &w, &mut dx, &p);
            c.cmp(name, "dx", &dx_, &dx, t)?;
            let mut dw_ = c.put::<T>(&dw0)?;
            conv::backward_weight_cuda(g, &p, &x_, &dy_, &mut dw_)?;
            let mut dw = dw0.clone();
            conv::backward_weight_cpu(&x, &dy, &mut dw, &p);
            c.cmp(name, "dw", &dw_, &dw, t)?;
            Ok(())
        });
    }
}

fn bns<T: GpuFloat>(c: &mut Ctx) {
    // batch norm: 2-D train with 2 ghost groups, the residual add and ReLU fused; eval; 1-D train.
    let dt = dtype_name::<T>();
    c.section("bn2d train ghost2 +res+relu 2x28x28x512", dt, |c| {
        bn::<T>(
            c,
            "bn2d train ghost2 +res+relu 2x28x28x512",
            2 * 28 * 28,
            512,
            28 * 28,
            true,
            true,
            1,
        )
    });
    c.section(
        "bn2d train syncbn(x2 mirrored) +res+relu 2x28x28x256",
        dt,
        |c| {
            bn::<T>(
                c,
                "bn2d train syncbn(x2 mirrored) +res+relu 2x28x28x256",
                2 * 28 * 28,
                256,
                2 * 28 * 28,
                true,
                true,
                2,
            )
        },
    );
    c.section("bn2d eval 2x28x28x512", dt, |c| {
        bn::<T>(
            c,
            "bn2d eval 2x28x28x512",
            2 * 28 * 28,
            512,
            2 * 28 * 28,
            false,
            false,
            1,
        )
    });
    c.section("bn1d train 4x50 rows x 4096", dt, |c| {
        bn::<T>(
            c,
            "bn1d train 4x50 rows x 4096",
            4 * 50,
            4096,
            4 * 50,
            true,
            false,
            1,
        )
    });
}

fn pools<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    let t = tol::<T>();
    let g = c.g;
    // pooling
    let p = pool::PoolParams::max(2, 112, 112, 64, 3, 2, 1);
    let (x, dy, dx0) = (
        c.rand::<T>(p.x_len(), 1.0),
        c.rand::<T>(p.y_len(), 1.0),
        c.rand::<T>(p.x_len(), 1.0),
    );
    let x_ = c.put::<T>(&x)?;
    let mut y_ = c.put::<T>(&vec![0.0; p.y_len()])?;
    let mut arg_ = g.zeros::<u8>(p.y_len())?;
    pool::maxpool_forward_cuda(g, &p, &x_, &mut y_, &mut arg_)?;
    let (mut y, mut arg) = (vec![0.0; p.y_len()], vec![0.0; p.y_len()]);
    pool::maxpool_forward_cpu(&x, &mut y, &mut arg, &p);
    c.cmp("maxpool 3x3/2 2x112x112x64", "y", &y_, &y, t)?;
    let mut dx_ = c.put::<T>(&dx0)?;
    pool::maxpool_backward_cuda(g, &p, &c.put::<T>(&dy)?, &arg_, &mut dx_)?;
    let mut dx = dx0.clone();
    pool::maxpool_backward_cpu(&dy, &arg, &mut dx, &p);
    c.cmp("maxpool 3x3/2 2x112x112x64", "dx", &dx_, &dx, t)?;
    // NaN propagates through max pooling, as on the CPU and in PyTorch: a window holding a NaN
    // gives NaN (bit for bit the input's), and its gradient goes to the NaN's position (summed
    // where windows overlap, which bf16 storage rounds: compared by NMSE).
    let p = pool::PoolParams::max(1, 8, 8, 4, 3, 2, 1);
    let mut x = c.rand::<T>(p.x_len(), 1.0);
    for i in [0, 37, 38, 130, 255] {
        x[i] = f32::NAN;
    }
    let dy = c.rand::<T>(p.y_len(), 1.0);
    let mut y_ = c.put::<T>(&vec![0.0; p.y_len()])?;
    let mut arg_ = g.zeros::<u8>(p.y_len())?;
    pool::maxpool_forward_cuda(g, &p, &c.put::<T>(&x)?, &mut y_, &mut arg_)?;
    let (mut y, mut arg) = (vec![0.0; p.y_len()], vec![0.0; p.y_len()]);
    pool::maxpool_forward_cpu(&x, &mut y, &mut arg, &p);
    let dt = dtype_name::<T>();
    c.bitwise(("maxpool with NaN 1x8x8x4", dt, "y"), &y_, &y)?;
    let mut dx_ = c.put::<T>(&vec![0.0; p.x_len()])?;
    pool::maxpool_backward_cuda(g, &p, &c.put::<T>(&dy)?, &arg_, &mut dx_)?;
    let mut dx = vec![0.0; p.x_len()];
    pool::maxpool_backward_cpu(&dy, &arg, &mut dx, &p);
    c.cmp("maxpool with NaN 1x8x8x4", "dx", &dx_, &dx, t)?;
    let p = pool::PoolParams::global_avg(4, 7, 7, 2048);
    let (x, dy, dx0) = (
        c.rand::<T>(p.x_len(), 1.0),
        c.rand::<T>(p.y_len(), 1.0),
        c.rand::<T>(p.x_len(), 1.0),
    );
    let mut y_ = c.put::<T>(&vec![0.0; p.y_len()])?;
    pool::avgpool_forward_cuda(g, &p, &c.put::<T>(&x)?, &mut y_)?;
    let mut y = vec![0.0; p.y_len()];
    pool::avgpool_forward_cpu(&x, &mut y, &p);
    c.cmp("avgpool 4x7x7x2048", "y", &y_, &y, t)?;
    let mut dx_ = c.put::<T>(&dx0)?;
    pool::avgpool_backward_cuda(g, &p, &c.put::<T>(&dy)?, &mut dx_)?;
    let mut dx = dx0.clone();
    pool::avgpool_backward_cpu(&dy, &mut dx, &p);
    c.cmp("avgpool 4x7x7x2048", "dx", &dx_, &dx, t)?;
    Ok(())
}

fn linears<T: GpuFloat>(c: &mut Ctx)
where
    CudaBlas: Gemm<T>,
{
    let t = tol::<T>();
    let g = c.g;
    // linear: the neck's first layer (2048 -> 4096) and last (4096 -> 256) over 4 x 50 rows.
    for (name, p) in [
        (
            "linear 200x2048->4096",
            linear::LinearParams::new(200, 2048, 4096),
        ),
        (
            "linear 200x4096->256",
            linear::LinearParams::new(200, 4096, 256),
        ),
    ] {
        c.section(name, dtype_name::<T>(), |c| {
            let (r, i, o) = (p.rows as usize, p.c_in as usize, p.c_out as usize);
            let (x, w) = (
                c.rand::<T>(r * i, 1.0),
                c.rand::<T>(o * i, (1.0 / i as f32).sqrt()),
            );
            let (dy, dx0, dw0) = (
                c.rand::<T>(r * o, 1.0),
                c.rand::<T>(r * i, 1.0),
                c.rand::<T>(o * i, 1.0),
            );
            let (x_, w_, dy_) = (c.put::<T>(&x)?, c.put::<T>(&w)?, c.put::<T>(&dy)?);
            let mut y_ = c.put::<T>(&vec![0.0; r * o])?;
            linear::forward_cuda(g, &p, &x_, &w_, &mut y_)?;
            let mut y = vec![0.0; r * o];
            linear::forward_cpu(&x, &w, &mut y, &p);
            c.cmp(name, "y", &y_, &y, t)?;
            let mut dx_ = c.put::<T>(&dx0)?;
            linear::backward_data_cuda(g, &p, &dy_, &w_, &mut dx_)?;
            let mut dx = dx0.clone();
            linear::backward_data_cpu(&dy, &w, &mut dx, &p);
            c.cmp(name, "dx", &dx_, &dx, t)?;
            let mut dw_ = c.put::<T>(&dw0)?;
            linear::backward_weight_cuda(g, &p, &x_, &dy_, &mut dw_)?;
            let mut dw = dw0.clone();
            linear::backward_weight_cpu(&x, &dy, &mut dw, &p);
            c.cmp(name, "dw", &dw_, &dw, t)?;
            Ok(())
        });
    }
}

fn concat_split<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    let t = tol::<T>();
    let g = c.g;
    // the neck at ResNet-50 224 px: concat / split.
    let (bsz, l, ch) = (4usize, 49usize, 2048usize);
    let p = concat::ConcatParams::new(bsz, l, ch);
    let (gv, x, du) = (
        c.rand::<T>(bsz * ch, 1.0),
        c.rand::<T>(bsz * l * ch, 1.0),
        c.rand::<T>(bsz * (l + 1) * ch, 1.0),
    );
    let (dg0, dx0) = (c.rand::<T>(bsz * ch, 1.0), c.rand::<T>(bsz * l * ch, 1.0));
    let mut u_ = c.put::<T>(&vec![0.0; du.len()])?;
    concat::concat_cuda(g, &p, &c.put::<T>(&gv)?, &c.put::<T>(&x)?, &mut u_)?;
    let mut u = vec![0.0; du.len()];
    concat::concat_cpu(&gv, &x, &mut u, &p);
    c.cmp("concat 4x(1+49)x2048", "u", &u_, &u, t)?;
    let (mut dg_, mut dx_) = (c.put::<T>(&dg0)?, c.put::<T>(&dx0)?);
    concat::concat_backward_cuda(g, &p, &c.put::<T>(&du)?, &mut dg_, &mut dx_)?;
    let (mut dg, mut dx) = (dg0.clone(), dx0.clone());
    concat::concat_backward_cpu(&du, &mut dg, &mut dx, &p);
    c.cmp("concat 4x(1+49)x2048", "dg", &dg_, &dg, t)?;
    c.cmp("concat 4x(1+49)x2048", "dx", &dx_, &dx, t)?;
    let (mut zg_, mut a_) = (c.put::<T>(&dg0)?, c.put::<T>(&dx0)?);
    concat::split_cuda(g, &p, &c.put::<T>(&du)?, &mut zg_, &mut a_)?;
    let (mut zg, mut a) = (dg0.clone(), dx0.clone());
    concat::split_cpu(&du, &mut zg, &mut a, &p);
    c.cmp("split 4x(1+49)x2048", "zg", &zg_, &zg, t)?;
    c.cmp("split 4x(1+49)x2048", "a", &a_, &a, t)?;
    let mut dz_ = c.put::<T>(&du)?;
    concat::split_backward_cuda(g, &p, &c.put::<T>(&gv)?, &c.put::<T>(&x)?, &mut dz_)?;
    let mut dz = du.clone();
    concat::split_backward_cpu(&gv, &x, &mut dz, &p);
    c.cmp("split 4x(1+49)x2048", "dz", &dz_, &dz, t)?;
    Ok(())
}

fn norms<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    let t = tol::<T>();
    let g = c.g;
    // the alignment maps' pieces: per-pixel L2 norm, softmax over positions, and the fused map.
    let (bsz, l, d) = (4usize, 49usize, 256usize);
    let rows = bsz * l;
    let (x, dy, dx0) = (
        c.rand::<T>(rows * d, 1.0),
        c.rand::<T>(rows * d, 1.0),
        c.rand::<T>(rows * d, 0.01),
    );
    let (x_, dy_) = (c.put::<T>(&x)?, c.put::<T>(&dy)?);
    let lp = l2norm::L2NormParams::new(rows, d, 0.5);
    let mut y_ = c.put::<T>(&vec![0.0; rows * d])?;
    l2norm::forward_cuda(g, &lp, &x_, &mut y_)?;
    let mut a = vec![0.0; rows * d];
    l2norm::forward_cpu(&x, &mut a, &lp);
    c.cmp("l2norm 196x256 /0.5", "y", &y_, &a, t)?;
    let mut dx_ = c.put::<T>(&dx0)?;
    l2norm::backward_cuda(g, &lp, &x_, &dy_, &mut dx_)?;
    let mut dx = dx0.clone();
    l2norm::backward_cpu(&x, &dy, &mut dx, &lp);
    c.cmp("l2norm 196x256 /0.5", "dx", &dx_, &dx, t)?;
    let sp = softmax::SoftmaxParams::new(bsz, l, d);
    softmax::forward_cuda(g, &sp, &x_, &mut y_)?;
    let mut y = vec![0.0; rows * d];
    softmax::forward_cpu(&x, &mut y, &sp);
    c.cmp("softmax positions 4x49x256", "y", &y_, &y, t)?;
    let mut dx_ = c.put::<T>(&dx0)?;
    softmax::backward_cuda(g, &sp, &c.put::<T>(&y)?, &dy_, &mut dx_)?;
    let mut dx = dx0.clone();
    softmax::backward_cpu(&y, &dy, &mut dx, &sp);
    c.cmp("softmax positions 4x49x256", "dx", &dx_, &dx, t)?;
    // fused alignment map against l2norm then softmax on the CPU
    let ap = softmax::AlignParams {
        b: bsz as i32,
        l: l as i32,
        d: d as i32,
        scale: 0.5,
        eps: lp.eps,
    };
    softmax::align_forward_cuda(g, &ap, &x_, &mut y_)?;
    let mut ys = vec![0.0; rows * d];
    softmax::forward_cpu(&a, &mut ys, &sp);
    c.cmp("align (l2norm+softmax) 4x49x256", "y", &y_, &ys, t)?;
    let mut scratch = g.zeros::<f32>(rows * d)?;
    let mut dx_ = c.put::<T>(&dx0)?;
    let ys_ = c.put::<T>(&ys)?;
    softmax::align_backward_cuda(g, &ap, (&x_, &ys_, &dy_), &mut scratch, &mut dx_)?;
    let mut da = vec![0.0; rows * d];
    softmax::backward_cpu(&ys, &dy, &mut da, &sp);
    let mut dx = dx0.clone();
    l2norm::backward_cpu(&x, &da, &mut dx, &lp);
    c.cmp("align (l2norm+softmax) 4x49x256", "dx", &dx_, &dx, t)?;
    Ok(())
}

fn aggregate_rows<T: GpuFloat>(c: &mut Ctx) -> Result<()>
where
    CudaBlas: Gemm<T>,
{
    let t = tol::<T>();
    let g = c.g;
    // aggregation of the position features by the alignment maps, 4 heads.
    let (bsz, l, ch, d, heads) = (4usize, 49usize, 2048usize, 256usize, 4usize);
    let ap = aggregate::AggregateParams::new(bsz, l, ch, d, heads);
    let (x, w) = (
        c.rand::<T>(bsz * l * ch, 1.0),
        c.rand::<T>(bsz * l * d, 0.1),
    );
    let (dv, dx0, dw0) = (
        c.rand::<T>(ap.v_len(), 1.0),
        c.rand::<T>(bsz * l * ch, 1.0),
        c.rand::<T>(bsz * l * d, 1.0),
    );
    let (x_, w_) = (c.put::<T>(&x)?, c.put::<T>(&w)?);
    let mut v_ = c.put::<T>(&vec![0.0; ap.v_len()])?;
    aggregate::forward_cuda(g, &ap, &x_, &w_, &mut v_)?;
    let mut v = vec![0.0; ap.v_len()];
    aggregate::forward_cpu(&x, &w, &mut v, &ap);
    c.cmp("aggregate 4x49 2048/256 h4", "v", &v_, &v, t)?;
    let (mut dx_, mut dw_) = (c.put::<T>(&dx0)?, c.put::<T>(&dw0)?);
    aggregate::backward_cuda(g, &ap, (&x_, &w_, &c.put::<T>(&dv)?), &mut dx_, &mut dw_)?;
    let (mut dx, mut dw) = (dx0.clone(), dw0.clone());
    aggregate::backward_cpu(&x, &w, &dv, &mut dx, &mut dw, &ap);
    c.cmp("aggregate 4x49 2048/256 h4", "dx", &dx_, &dx, t)?;
    c.cmp("aggregate 4x49 2048/256 h4", "dw", &dw_, &dw, t)?;
    Ok(())
}

fn loss_rows<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    let t = tol::<T>();
    let g = c.g;
    // the loss over 64 rows of 256.
    let lp = loss::LossParams::new(64, 256);
    let (pr, tg, dp0) = (
        c.rand::<T>(64 * 256, 1.0),
        c.rand::<T>(64 * 256, 1.0),
        c.rand::<T>(64 * 256, 0.01),
    );
    let (pr_, tg_) = (c.put::<T>(&pr)?, c.put::<T>(&tg)?);
    let mut cosv = g.zeros::<f32>(64)?;
    let mut out_ = c.put::<f32>(&[0.0])?;
    loss::forward_cuda(g, &lp, (&pr_, &tg_), &mut cosv, &mut out_)?;
    let l_cpu = loss::forward_cpu(&pr, &tg, &lp);
    c.cmp("loss 64x256", "loss", &out_, &[l_cpu], 1e-10)?;
    let mut dp_ = c.put::<T>(&dp0)?;
    loss::backward_cuda(g, &lp, (&pr_, &tg_), &c.put::<f32>(&[0.7])?, &mut dp_)?;
    let mut dp = dp0.clone();
    loss::backward_cpu(&pr, &tg, 0.7, &mut dp, &lp);
    c.cmp("loss 64x256", "dpred", &dp_, &dp, t)?;
    Ok(())
}

/// The classifier heads' cross-entropy: 96 rows, 3 heads of 100 classes (the linear probe's
/// multi-lr form), with a bias; one label out of range is not used (labels are real classes).
fn xent_rows<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    use crate::ops::xent;
    let t = tol::<T>();
    let g = c.g;
    let p = xent::XentParams::new(96, 100, 3);
    let (r, cols) = (96, 300);
    let (logits, bias, dl0, db0) = (
        c.rand::<T>(r * cols, 3.0),
        c.rand::<f32>(cols, 0.5),
        c.rand::<T>(r * cols, 0.01),
        c.rand::<f32>(cols, 0.01),
    );
    let labels: Vec<f32> = (0..r).map(|i| ((i * 37) % 100) as f32).collect();
    let (lg_, b_, lb_) = (
        c.put::<T>(&logits)?,
        c.put::<f32>(&bias)?,
        c.put::<f32>(&labels)?,
    );
    let (mut lse_, mut ce_) = (g.zeros::<f32>(r * 3)?, g.zeros::<f32>(r * 3)?);
    let (mut heads_, mut out_) = (c.put::<f32>(&[0.0; 3])?, c.put::<f32>(&[0.0])?);
    xent::forward_cuda(
        g,
        &p,
        (&lg_, &b_, &lb_),
        (&mut lse_, &mut ce_),
        &mut heads_,
        &mut out_,
    )?;
    let mut lse = vec![0.0; r * 3];
    let (loss, heads) = xent::forward_cpu(&logits, &bias, &labels, &mut lse, &p);
    let name = "xent 96 rows, 3 heads x 100";
    c.cmp(name, "loss", &out_, &[loss], 1e-10)?;
    c.cmp(name, "per head", &heads_, &heads, 1e-10)?;
    let (mut dl_, mut db_) = (c.put::<T>(&dl0)?, c.put::<f32>(&db0)?);
    xent::backward_cuda(
        g,
        &p,
        (&lg_, &b_, &lb_),
        &lse_,
        &c.put::<f32>(&[0.7])?,
        &mut dl_,
        &mut db_,
    )?;
    let (mut dl, mut db) = (dl0.clone(), db0.clone());
    xent::backward_cpu(&logits, &bias, &labels, &lse, 0.7, &mut dl, &mut db, &p);
    c.cmp(name, "dlogits", &dl_, &dl, t)?;
    c.cmp(name, "dbias", &db_, &db, 1e-10)?;
    Ok(())
}

/// A SyncBN sync on one device as if `world` ranks held this rank's rows: every sum times the
/// world; the gather fills the other ranks' parts from this one's (`mirror_parts`). The CPU's form
/// and the GPU's, which goes through the host.
pub(crate) struct Mirrored(
    pub(crate) usize,
    pub(crate) Option<std::sync::Arc<cudarc::driver::CudaStream>>,
);

impl batchnorm::SyncGroup for Mirrored {
    fn world(&self) -> usize {
        self.0
    }
    fn rank(&self) -> usize {
        0
    }
}

impl batchnorm::StatSync<[f64]> for Mirrored {
    fn sum(&self, s: &mut [f64]) -> Result<()> {
        s.iter_mut().for_each(|v| *v *= self.0 as f64);
        Ok(())
    }
    fn gather(&self, all: &mut [f64]) -> Result<()> {
        mirror_parts(all, self.0);
        Ok(())
    }
}

/// Mirrored's gather: part 0 (a rank's (a, d, q) of C each, `batchnorm::merge_moments`) copied to
/// every other part, rank r's mean a shifted by r / 4 and its q scaled by 1 + r / 2, so that the
/// merge of unequal ranks is exercised (the same on the CPU and the GPU).
fn mirror_parts<T: num_traits::Float>(all: &mut [T], world: usize) {
    let k = all.len() / world;
    let c = k / 3;
    let (first, rest) = all.split_at_mut(k);
    for (r, part) in rest.chunks_exact_mut(k).enumerate() {
        let r = T::from(r + 1).unwrap();
        let (quarter, half) = (T::from(0.25).unwrap(), T::from(0.5).unwrap());
        part.copy_from_slice(first);
        for ch in 0..c {
            part[ch] = first[ch] + r * quarter;
            part[2 * c + ch] = first[2 * c + ch] * (T::one() + r * half);
        }
    }
}

impl<'a> batchnorm::StatSync<CudaViewMut<'a, f32>> for Mirrored {
    fn sum(&self, s: &mut CudaViewMut<'a, f32>) -> Result<()> {
        let stream = self.1.as_ref().expect("Mirrored: a GPU stream");
        let err = |e| Error::Other(format!("Mirrored: {e:?}"));
        let mut h = stream.clone_dtoh(&s.as_view()).map_err(err)?;
        stream.synchronize().map_err(err)?;
        h.iter_mut().for_each(|v| *v *= self.0 as f32);
        stream.memcpy_htod(&h, s).map_err(err)?;
        stream.synchronize().map_err(err)
    }
    fn gather(&self, all: &mut CudaViewMut<'a, f32>) -> Result<()> {
        let stream = self.1.as_ref().expect("Mirrored: a GPU stream");
        let err = |e| Error::Other(format!("Mirrored: {e:?}"));
        let mut h = stream.clone_dtoh(&all.as_view()).map_err(err)?;
        stream.synchronize().map_err(err)?;
        mirror_parts(&mut h, self.0);
        stream.memcpy_htod(&h, all).map_err(err)?;
        stream.synchronize().map_err(err)
    }
}

/// One batch-norm configuration, forward and backward; `world` > 1: SyncBN over that many
/// mirrored ranks (the GPU's sum, all-reduce and count path against the CPU's).
#[allow(clippy::too_many_arguments)]
fn bn<T: GpuFloat>(
    c: &mut Ctx,
    name: &str,
    rows: usize,
    ch: usize,
    group_rows: usize,
    train: bool,
    fused: bool,
    world: usize,
) -> Result<()> {
    let g = c.g;
    let t = tol::<T>();
    let p = batchnorm::BnParams::new(rows, ch)
        .ghost(group_rows)
        .synced(world);
    let mirror = Mirrored(world, Some(g.stream.clone()));
    let (host_sync, dev_sync): (Option<&batchnorm::HostSync>, Option<&batchnorm::DevSync>) =
        match world {
            1 => (None, None),
            _ => (Some(&mirror), Some(&mirror)),
        };
    let groups = p.groups();
    let n = rows * ch;
    let x: Vec<f32> = c.rand::<T>(n, 2.0).iter().map(|v| v + 0.5).collect();
    let x: Vec<f32> = x.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    let (res, dy, dx0, dres0) = (
        c.rand::<T>(n, 1.0),
        c.rand::<T>(n, 1.0),
        c.rand::<T>(n, 1.0),
        c.rand::<T>(n, 1.0),
    );
    let gamma: Vec<f32> = (0..ch).map(|_| 1.0 + 0.2 * c.rng.normal() as f32).collect();
    let beta: Vec<f32> = (0..ch).map(|_| 0.2 * c.rng.normal() as f32).collect();
    let rm: Vec<f32> = (0..ch).map(|_| 0.3 * c.rng.normal() as f32).collect();
    let rv: Vec<f32> = (0..ch)
        .map(|_| 1.0 + 0.5 * c.rng.uniform() as f32)
        .collect();
    let (dg0, db0): (Vec<f32>, Vec<f32>) = (c.rand::<f32>(ch, 1.0), c.rand::<f32>(ch, 1.0));

    // CPU
    let (mut y, mut mean, mut rstd) =
        (vec![0.0; n], vec![0.0; groups * ch], vec![0.0; groups * ch]);
    let (mut rm_c, mut rv_c) = (rm.clone(), rv.clone());
    if train {
        batchnorm::forward_train_cpu(
            &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, &mut rm_c, &mut rv_c, &p, host_sync,
        )?;
    } else {
        batchnorm::forward_eval_cpu(&x, &gamma, &beta, &rm, &rv, &mut y, &p);
    }
    if fused {
        for (v, r) in y.iter_mut().zip(&res) {
            *v = (*v + r).max(0.0);
        }
    }
    let dy_eff: Vec<f32> = if fused {
        dy.iter()
            .zip(&y)
            .map(|(d, o)| if *o > 0.0 { *d } else { 0.0 })
            .collect()
    } else {
        dy.clone()
    };
    let (mut dx, mut dgam, mut dbet, mut dres) =
        (dx0.clone(), dg0.clone(), db0.clone(), dres0.clone());
    if fused {
        for (a, b) in dres.iter_mut().zip(&dy_eff) {
            *a += b;
        }
    }
    if train {
        batchnorm::backward_train_cpu(
            &x, &dy_eff, &gamma, &mean, &rstd, &mut dx, &mut dgam, &mut dbet, &p, host_sync,
        )?;
    } else {
        batchnorm::backward_eval_cpu(
            &x, &dy_eff, &gamma, &rm, &rv, &mut dx, &mut dgam, &mut dbet, &p,
        );
    }

    // GPU
    let x_ = c.put::<T>(&x)?;
    let (gamma_, beta_) = (c.put::<f32>(&gamma)?, c.put::<f32>(&beta)?);
    let (mut rm_, mut rv_) = (c.put::<f32>(&rm)?, c.put::<f32>(&rv)?);
    let res_ = c.put::<T>(&res)?;
    let mut y_ = c.put::<T>(&vec![0.0; n])?;
    let (mut mean_, mut rstd_) = (
        c.put::<f32>(&vec![0.0; groups * ch])?,
        c.put::<f32>(&vec![0.0; groups * ch])?,
    );
    if train {
        batchnorm::forward_train_cuda(
            g,
            &p,
            &x_,
            (&gamma_, &beta_),
            (&mut rm_, &mut rv_),
            fused.then(|| res_.as_view()),
            fused,
            &mut y_,
            (&mut mean_, &mut rstd_),
            dev_sync,
        )?;
    } else {
        batchnorm::forward_eval_cuda(
            g,
            &p,
            &x_,
            (&gamma_, &beta_),
            (&rm_, &rv_),
            fused.then(|| res_.as_view()),
            fused,
            &mut y_,
            (&mut mean_, &mut rstd_),
        )?;
    }
    c.cmp(name, "y", &y_, &y, t)?;
    if train {
        c.cmp(name, "mean", &mean_, &mean, 1e-9)?;
        c.cmp(name, "rstd", &rstd_, &rstd, 1e-9)?;
        c.cmp(name, "running_mean", &rm_, &rm_c, 1e-9)?;
        c.cmp(name, "running_var", &rv_, &rv_c, 1e-9)?;
    }
    let dy_ = c.put::<T>(&dy)?;
    let (mut dx_, mut dres_) = (c.put::<T>(&dx0)?, c.put::<T>(&dres0)?);
    let (mut dg_, mut db_) = (c.put::<f32>(&dg0)?, c.put::<f32>(&db0)?);
    batchnorm::backward_cuda(
        g,
        &p,
        train,
        &x_,
        &dy_,
        fused.then(|| y_.as_view()),
        (&mean_, &rstd_),
        &gamma_,
        (&mut dg_, &mut db_),
        &mut dx_,
        fused.then(|| dres_.as_view_mut()),
        dev_sync,
    )?;
    c.cmp(name, "dx", &dx_, &dx, t)?;
    c.cmp(name, "dgamma", &dg_, &dgam, t)?;
    c.cmp(name, "dbeta", &db_, &dbet, t)?;
    if fused {
        c.cmp(name, "dres", &dres_, &dres, t)?;
    }
    Ok(())
}

/// LARS and EMA over flat f32 buffers (three tensors, the middle one excluded).
fn optim(c: &mut Ctx) -> Result<()> {
    use crate::memory::SizeTable;
    use crate::optim::{ema_update, ema_update_cuda, lars_step, GpuLars, LarsConfig};
    use crate::tensor::Shape;
    let g = c.g;
    let mut table = SizeTable::default();
    table.push("a.weight", Shape::new(&[64, 64, 3, 3]));
    table.push("a.bias", Shape::new(&[300]));
    table.push("b.weight", Shape::new(&[20_000, 3]));
    let excluded = [false, true, false];
    let n = table.total;
    let (w, gr, buf) = (
        c.rand::<f32>(n, 0.1),
        c.rand::<f32>(n, 0.01),
        c.rand::<f32>(n, 0.01),
    );
    let cfg = LarsConfig {
        lr: 0.9,
        weight_decay: 1.5e-6,
        momentum: 0.9,
        eta: 0.001,
    };
    let (mut w_, gr_, mut buf_) = (c.put::<f32>(&w)?, c.put::<f32>(&gr)?, c.put::<f32>(&buf)?);
    // The flat buffers carry the sentinel tail; LARS reads only the table's range.
    let mut lars = GpuLars::new(g, &table, &excluded)?;
    lars.step(g, &mut w_, &gr_, &mut buf_, &cfg)?;
    let (mut w_c, mut buf_c) = (w.clone(), buf.clone());
    lars_step(&table, &excluded, &mut w_c, &gr, &mut buf_c, &cfg);
    c.cmp("LARS step 3 tensors", "params", &w_, &w_c, 1e-12)?;
    c.cmp("LARS step 3 tensors", "momentum", &buf_, &buf_c, 1e-12)?;
    // The NaN guard's flags: a NaN weight in the first tensor, an infinite gradient at the very
    // end of the last one and a NaN gradient in the excluded one; the CPU's flags to the bit.
    let (mut wb, mut gb) = (w.clone(), gr.clone());
    wb[5] = f32::NAN;
    gb[n - 1] = f32::NEG_INFINITY;
    gb[64 * 64 * 9 + 7] = f32::NAN;
    let (wb_, gb_) = (c.put::<f32>(&wb)?, c.put::<f32>(&gb)?);
    let mut dst = crate::data::pinned::PinnedBuf::new(&g.ctx, lars.health_bytes(), false)
        .map_err(|e| g.err("page-locked memory", e))?;
    let mut flags = Vec::new();
    for (wv, gv) in [(&w_, &gr_), (&wb_, &gb_)] {
        lars.queue_health(g, wv, gv, &mut dst)?;
        flags.push(lars.tensor_health(dst.bytes().map_err(|e| g.err("reading flags", e))?));
    }
    let want = vec![
        crate::optim::tensor_health(&table, &g.download(&w_)?[..n], &gr),
        crate::optim::tensor_health(&table, &wb, &gb),
    ];
    let ok = flags == want && want[1] == [1, 2, 2];
    c.rows.push(Row {
        op: "NaN guard flags".into(),
        dtype: "f32",
        output: "per tensor",
        nmse: if ok { 0.0 } else { 1.0 },
        tol: 0.0,
        failure: if ok {
            String::new()
        } else {
            format!("GPU {flags:?}, CPU {want:?} (want [1, 2, 2] for the second)")
        },
    });
    // SGD (the probe's and fine-tuning's) over the middle of the buffers, twice (momentum used).
    let sgd = crate::optim::SgdConfig {
        lr: 0.4,
        momentum: 0.9,
        weight_decay: 1e-4,
    };
    let r = 1000..n - 1000;
    let (mut w_, mut buf_) = (c.put::<f32>(&w)?, c.put::<f32>(&buf)?);
    let (mut w_c, mut buf_c) = (w.clone(), buf.clone());
    for _ in 0..2 {
        crate::optim::sgd_step_cuda(
            g,
            &mut w_.slice_mut(r.clone()),
            &gr_.slice(r.clone()),
            &mut buf_.slice_mut(r.clone()),
            &sgd,
        )?;
        crate::optim::sgd_step(
            &mut w_c[r.clone()],
            &gr[r.clone()],
            &mut buf_c[r.clone()],
            &sgd,
        );
    }
    c.cmp("SGD 2 steps", "params", &w_, &w_c, 1e-12)?;
    c.cmp("SGD 2 steps", "momentum", &buf_, &buf_c, 1e-12)?;
    let online = c.rand::<f32>(n, 0.1);
    let mut t_ = g.upload::<f32>(&w)?;
    let on_ = g.upload::<f32>(&online)?;
    ema_update_cuda(g, &mut t_, &on_, 0.996)?;
    let mut t_c = w.clone();
    ema_update(&mut t_c, &online, 0.996);
    let all = g.download(&t_)?;
    let nmse = all[..n]
        .iter()
        .zip(&t_c)
        .map(|(a, b)| ((a - b) as f64).powi(2))
        .sum::<f64>()
        / t_c.iter().map(|b| (*b as f64).powi(2)).sum::<f64>();
    c.rows.push(Row {
        op: "EMA update".into(),
        dtype: "f32",
        output: "target",
        nmse,
        tol: 0.0,
        failure: if nmse == 0.0 {
            String::new()
        } else {
            format!("not bitwise equal (NMSE {nmse:.2e})")
        },
    });
    Ok(())
}

/// The mixed-precision conversions against the host's: the cast to T (round to nearest even for
/// bf16, half::bf16::from_f32) and the f32 accumulation, both bitwise.
fn cast<T: GpuFloat>(c: &mut Ctx) -> Result<()> {
    let g = c.g;
    let dtype = dtype_name::<T>();
    // Values over many binades, then what rounding gets wrong: ties to even both ways (1 + 2^-8
    // stays 1, 1 + 3 * 2^-8 goes up), overflow of the largest f32 to infinity, infinities, quiet
    // and signalling NaN, subnormals, negative zero.
    let mut src: Vec<f32> = (0..100_000)
        .map(|i| c.rng.normal() as f32 * 10f32.powi(i % 17 - 8))
        .collect();
    src.extend(
        [
            0x3f80_8000u32,
            0x3f81_8000,
            0xbf80_8000,
            0x7f7f_ffff,
            0x7f80_0000,
            0xff80_0000,
            0x7fc0_0001,
            0x7f80_0001,
            0x0000_0001,
            0x0040_8000,
            0x8000_0000,
        ]
        .map(f32::from_bits),
    );
    let n = src.len();
    // Sources carry no tail, so the launch covers exactly n and the destination's tail must survive.
    let mut dst_ = c.put::<T>(&vec![0.0; n])?;
    cast_from_f32_cuda(g, &g.upload::<f32>(&src)?, &mut dst_)?;
    let cpu: Vec<f32> = src.iter().map(|&v| T::from_f32(v).to_f32()).collect();
    c.bitwise(("cast from f32 100k + specials", dtype, "dst"), &dst_, &cpu)?;
    let (acc0, inc) = (c.rand::<f32>(n, 1.0), c.rand::<T>(n, 1.0));
    let mut acc_ = c.put::<f32>(&acc0)?;
    accum_f32_cuda(g, &g.upload::<T>(&inc)?, &mut acc_)?;
    let cpu: Vec<f32> = acc0.iter().zip(&inc).map(|(a, b)| a + b).collect();
    c.bitwise(("accumulate into f32 100k", dtype, "acc"), &acc_, &cpu)
}

/// The table as text.
pub fn table(rows: &[Row]) -> String {
    let mut s = format!(
        "{:<40} {:<5} {:<13} {:>10} {:>8}  result\n",
        "op", "dtype", "output", "NMSE", "tol"
    );
    for r in rows {
        s += &format!(
            "{:<40} {:<5} {:<13} {:>10.2e} {:>8.0e}  {}\n",
            r.op,
            r.dtype,
            r.output,
            r.nmse,
            r.tol,
            if r.pass() { "ok" } else { &r.failure }
        );
    }
    s
}
