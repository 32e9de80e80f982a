//! CPU benchmark: conv2d forward + backward (im2col + `matrixmultiply::sgemm`, one GEMM per block
//! of images, blocks over rayon) at ResNet-50 layer shapes, batch 8, and at the built-in run's tiny
//! model shapes (1/8 width, 48 px), batch 64, next to the raw sgemm rate of the same FLOPs as
//! per-image GEMMs and as one batched GEMM per thread. Against the per-image GEMMs the ratio is the
//! conv's own overhead (im2col, col2im, buffers, partial sums) less what stacking images wins.
//!
//! Run: `cargo bench --bench ops` (about 15 s on 2 cores, after the build). Each timing is the
//! median of `REPS` repetitions after one warm-up call. See benches/README.md for recorded results.

use lewel::ops::conv::{backward_data_cpu, backward_weight_cpu, forward_cpu, ConvParams};
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::Mutex;
use std::time::Instant;

const BATCH: usize = 8;
/// The built-in run's batch: each view runs through the nets as its own batch of 64.
const TINY_BATCH: usize = 64;
const REPS: usize = 11;

/// One conv layer: square input `hw` x `hw`, square kernel `k`.
struct Shape {
    name: &'static str,
    hw: usize,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
}

const fn shape(
    name: &'static str,
    hw: usize,
    c_in: usize,
    c_out: usize,
    k: usize,
    stride: usize,
    pad: usize,
) -> Shape {
    Shape {
        name,
        hw,
        c_in,
        c_out,
        k,
        stride,
        pad,
    }
}

const SHAPES: &[Shape] = &[
    shape("stem 7x7/2 3->64 @224", 224, 3, 64, 7, 2, 3),
    shape("l1 1x1 64->64 @56", 56, 64, 64, 1, 1, 0),
    shape("l1 3x3 64->64 @56", 56, 64, 64, 3, 1, 1),
    shape("l1 1x1 64->256 @56", 56, 64, 256, 1, 1, 0),
    shape("l1 1x1 256->64 @56", 56, 256, 64, 1, 1, 0),
    shape("l2 3x3/2 128->128 @56", 56, 128, 128, 3, 2, 1),
    shape("l2 1x1/2 256->512 @56 ds", 56, 256, 512, 1, 2, 0),
    shape("l2 3x3 128->128 @28", 28, 128, 128, 3, 1, 1),
    shape("l2 1x1 128->512 @28", 28, 128, 512, 1, 1, 0),
    shape("l3 3x3 256->256 @14", 14, 256, 256, 3, 1, 1),
    shape("l3 1x1 256->1024 @14", 14, 256, 1024, 1, 1, 0),
    shape("l4 3x3 512->512 @7", 7, 512, 512, 3, 1, 1),
    shape("l4 1x1 512->2048 @7", 7, 512, 2048, 1, 1, 0),
];

/// The tiny model (ResNet-50 topology at 1/8 width) at 48 px, the built-in run's convs.
const TINY_SHAPES: &[Shape] = &[
    shape("stem 7x7/2 3->8 @48", 48, 3, 8, 7, 2, 3),
    shape("l1 1x1 8->8 @12", 12, 8, 8, 1, 1, 0),
    shape("l1 3x3 8->8 @12", 12, 8, 8, 3, 1, 1),
    shape("l1 1x1 8->32 @12", 12, 8, 32, 1, 1, 0),
    shape("l2 3x3/2 16->16 @12", 12, 16, 16, 3, 2, 1),
    shape("l2 1x1 16->64 @6", 6, 16, 64, 1, 1, 0),
    shape("l3 3x3 32->32 @3", 3, 32, 32, 3, 1, 1),
    shape("l3 1x1 32->128 @3", 3, 32, 128, 1, 1, 0),
    shape("l4 3x3 64->64 @2", 2, 64, 64, 3, 1, 1),
    shape("l4 1x1 64->256 @2", 2, 64, 256, 1, 1, 0),
];

/// Deterministic values in [-1, 1) (xorshift64*).
fn fill(len: usize, seed: u64) -> Vec<f32> {
    let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            s ^= s >> 12;
            s ^= s << 25;
            s ^= s >> 27;
            let r = s.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 40;
            (r as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

/// Median wall time in seconds of each closure, timed round-robin (so background load hits all
/// alike) after one warm-up call each.
fn time_all<const K: usize>(mut fs: [&mut dyn FnMut(); K]) -> [f64; K] {
    for f in fs.iter_mut() {
        f();
    }
    let mut t = [[0.0f64; REPS]; K];
    for r in 0..REPS {
        for (f, t) in fs.iter_mut().zip(t.iter_mut()) {
            let t0 = Instant::now();
            f();
            t[r] = t0.elapsed().as_secs_f64();
        }
    }
    t.map(|mut v| {
        v.sort_by(f64::total_cmp);
        v[REPS / 2]
    })
}

/// `n` rows split into one contiguous block per rayon thread: rows per block.
fn block_rows(n: usize) -> usize {
    n.div_ceil(rayon::current_num_threads().max(1)).max(1)
}

/// A matrix operand: data with (row stride, column stride).
type Op<'a> = (&'a [f32], usize, usize);

/// Bounds-checked `matrixmultiply::sgemm`: C (m x n) = A (m x k) * B (k x n) + beta C.
fn sgemm(m: usize, k: usize, n: usize, a: Op, b: Op, beta: f32, c: (&mut [f32], usize, usize)) {
    let last = |r: usize, cl: usize, rs: usize, cs: usize| (r - 1) * rs + (cl - 1) * cs;
    assert!(m > 0 && k > 0 && n > 0);
    assert!(last(m, k, a.1, a.2) < a.0.len() && last(k, n, b.1, b.2) < b.0.len());
    assert!(last(m, n, c.1, c.2) < c.0.len());
    let i = |v: usize| v as isize;
    // SAFETY: every operand was checked to lie inside its slice; `c` is a distinct &mut borrow.
    unsafe {
        matrixmultiply::sgemm(
            m,
            k,
            n,
            1.0,
            a.0.as_ptr(),
            i(a.1),
            i(a.2),
            b.0.as_ptr(),
            i(b.1),
            i(b.2),
            beta,
            c.0.as_mut_ptr(),
            i(c.1),
            i(c.2),
        )
    }
}

/// Median seconds of (forward, backward data, backward weight).
type Passes = [f64; 3];

/// Times the conv's three passes, each round-robin with two baselines, and returns
/// (conv, per-image sgemm, batched sgemm).
///
/// Per-image sgemm: the conv's own GEMMs alone (no im2col / col2im / allocation / partial sums),
/// rayon over the images, M = Ho*Wo, K = kh*kw*C, N = O, with the operand layouts and strides of
/// src/ops/conv.rs. Where the conv reuses one im2col buffer per worker thread (all but 1x1
/// stride 1), so does the baseline, so that both see the same cache footprint; a 1x1 stride-1
/// conv reads x_n and accumulates into dx_n (beta = 1), one per image, and so does the baseline.
///
/// Batched sgemm (context: what batching the images into one GEMM would give): the same FLOPs as
/// one GEMM over the whole batch, M = N*Ho*Wo, split into one row block per rayon thread (the
/// weight gradient, whose reduction dimension is then N*Ho*Wo, is split over its O rows).
fn time_shape(p: &ConvParams, pointwise: bool) -> (Passes, Passes, Passes) {
    let (m, kd, o) = ((p.h_out * p.w_out) as usize, p.k_dim(), p.c_out as usize);
    let n = p.n as usize;
    let threads = rayon::current_num_threads();
    let x = fill(p.x_len(), 1);
    let w = fill(p.w_len(), 2); // (O, K)
    let dy = fill(p.y_len(), 3); // (N*M, O)
    let mut y = vec![0.0f32; p.y_len()];
    let mut dx = vec![0.0f32; p.x_len()];
    let mut dw = vec![0.0f32; p.w_len()];

    // Per image.
    let bufs = if pointwise { n } else { threads };
    let buf = |i: usize| {
        if pointwise {
            i
        } else {
            rayon::current_thread_index().unwrap_or(0) % bufs
        }
    };
    let col: Vec<Vec<f32>> = (0..bufs).map(|b| fill(m * kd, 10 + b as u64)).collect(); // (M, K)
    let dcol: Vec<Mutex<Vec<f32>>> = (0..bufs)
        .map(|_| Mutex::new(vec![0.0f32; m * kd]))
        .collect();
    let mut gy = vec![0.0f32; n * m * o];
    // One weight-gradient partial per image, as the conv's groups for n <= 16.
    let mut gdw = vec![0.0f32; n * o * kd];

    // Batched.
    let col_all = fill(n * m * kd, 20); // (N*M, K)
    let mut bdcol = vec![0.0f32; n * m * kd];
    let mut by = vec![0.0f32; n * m * o];
    let mut bdw = vec![0.0f32; o * kd];
    let (rows, orows) = (block_rows(n * m), block_rows(o));
    // The data gradient GEMM accumulates straight into dx for 1x1 stride 1, else overwrites col.
    let beta_d = if pointwise { 1.0 } else { 0.0 };

    let [cf, gf, bf] = time_all([
        &mut || forward_cpu(black_box(&x), &w, &mut y, p),
        &mut || {
            gy.par_chunks_mut(m * o).enumerate().for_each(|(i, y_n)| {
                let a = (&col[buf(i)][..], kd, 1);
                sgemm(m, kd, o, a, (&w, 1, kd), 0.0, (y_n, o, 1));
            })
        },
        &mut || {
            by.par_chunks_mut(rows * o)
                .enumerate()
                .for_each(|(j, y_j)| {
                    let a = (&col_all[j * rows * kd..], kd, 1);
                    sgemm(y_j.len() / o, kd, o, a, (&w, 1, kd), 0.0, (y_j, o, 1));
                })
        },
    ]);
    let [cd, gd, bd] = time_all([
        &mut || backward_data_cpu(black_box(&dy), &w, &mut dx, p),
        &mut || {
            (0..n).into_par_iter().for_each(|i| {
                let dy_n = (&dy[i * m * o..][..m * o], o, 1);
                let mut c = dcol[buf(i)].lock().unwrap();
                sgemm(m, o, kd, dy_n, (&w, kd, 1), beta_d, (&mut c, kd, 1));
            })
        },
        &mut || {
            bdcol
                .par_chunks_mut(rows * kd)
                .enumerate()
                .for_each(|(j, c_j)| {
                    let dy_j = (&dy[j * rows * o..], o, 1);
                    sgemm(
                        c_j.len() / kd,
                        o,
                        kd,
                        dy_j,
                        (&w, kd, 1),
                        beta_d,
                        (c_j, kd, 1),
                    );
                })
        },
    ]);
    let [cw, gw, bw] = time_all([
        &mut || backward_weight_cpu(black_box(&x), &dy, &mut dw, p),
        &mut || {
            gdw.par_chunks_mut(o * kd)
                .enumerate()
                .for_each(|(i, dw_n)| {
                    let dy_t = (&dy[i * m * o..][..m * o], 1, o);
                    let a = (&col[buf(i)][..], kd, 1);
                    sgemm(o, m, kd, dy_t, a, 1.0, (dw_n, kd, 1));
                })
        },
        &mut || {
            bdw.par_chunks_mut(orows * kd)
                .enumerate()
                .for_each(|(j, dw_j)| {
                    let dy_t = (&dy[j * orows..], 1, o);
                    let a = (&col_all[..], kd, 1);
                    sgemm(dw_j.len() / kd, n * m, kd, dy_t, a, 1.0, (dw_j, kd, 1));
                })
        },
    ]);
    black_box((&y, &dx, &dw, &gy, &gdw, &dcol, &by, &bdcol, &bdw));
    ([cf, cd, cw], [gf, gd, gw], [bf, bd, bw])
}

/// GFLOP/s of a 1024^3 sgemm on one thread and split by rows over the rayon pool. Timed one after
/// the other, not round-robin: a rayon job right after a long single-thread stretch on the main
/// thread measured up to a third slower here (probably the woken workers starting on one core).
fn square_peak() -> (f64, f64) {
    const S: usize = 1024;
    let a = fill(S * S, 4);
    let b = fill(S * S, 5);
    let (mut c1, mut cn) = (vec![0.0f32; S * S], vec![0.0f32; S * S]);
    let rows = block_rows(S);
    let [t1] = time_all([&mut || sgemm(S, S, S, (&a, S, 1), (&b, S, 1), 0.0, (&mut c1, S, 1))]);
    let [tn] = time_all([&mut || {
        cn.par_chunks_mut(rows * S)
            .enumerate()
            .for_each(|(i, c_i)| {
                let a_i = (&a[i * rows * S..], S, 1);
                sgemm(c_i.len() / S, S, S, a_i, (&b, S, 1), 0.0, (c_i, S, 1));
            })
    }]);
    black_box((&c1, &cn));
    let flop = 2.0 * (S * S * S) as f64;
    (flop / t1 / 1e9, flop / tn / 1e9)
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("conv2d (im2col + matrixmultiply::sgemm, one GEMM per block of images) vs raw sgemm");
    println!("f32, NHWC, rayon threads {threads}, median of {REPS} after 1 warm-up");
    let (p1, pn) = square_peak();
    println!("peak: sgemm 1024^3  1 thread {p1:.1} GFLOP/s,  {threads} threads {pn:.1} GFLOP/s\n");
    table("ResNet-50", BATCH, SHAPES);
    println!();
    table("tiny", TINY_BATCH, TINY_SHAPES);
    println!(
        "\nM = Ho*Wo, K = kh*kw*C_in, N = C_out per image; GFLOP = 6 * MACs per fwd+bwd call \
         (3 GEMMs); colMB = im2col\nbuffer per image (0: a 1x1 stride-1 conv multiplies x itself); \
         conv ms = sum of the three passes' medians;\nGF/s = GFLOP / time; sgemm = GFLOP/s of the \
         same FLOPs as per-image GEMMs alone, rayon over images; ratio = conv GF/s / sgemm GF/s\n\
         (fwd, bwdD = data grad, bwdW = weight grad: the same per pass); batchd = GFLOP/s of the \
         same FLOPs as one\nbatched GEMM per pass (M = batch*Ho*Wo), split into one row block per \
         thread. The conv stacks the\nimages of a block into one GEMM (at most 8 MiB of columns)."
    );
}

/// One table: every shape at `batch`, a total line.
fn table(model: &str, batch: usize, shapes: &[Shape]) {
    let rule = "-".repeat(119);
    println!(
        "{:<26} {:>5} {:>5} {:>5} {:>6} {:>5} | {:>7} {:>6} | {:>6} | {:>5} | {:>4} {:>4} {:>4} | {:>6}",
        &format!("{model} (batch {batch})"),
        "M",
        "K",
        "N",
        "GFLOP",
        "colMB",
        "conv ms",
        "GF/s",
        "sgemm",
        "ratio",
        "fwd",
        "bwdD",
        "bwdW",
        "batchd"
    );
    println!("{rule}");
    let (mut flop_all, mut t_all) = (0.0, [0.0f64; 3]);
    for s in shapes {
        let p = ConvParams::new(batch, s.hw, s.hw, s.c_in, s.c_out, s.k, s.stride, s.pad);
        let (m, kd, o) = ((p.h_out * p.w_out) as usize, p.k_dim(), p.c_out as usize);
        // fwd + bwd-data + bwd-weight: three GEMMs of p.macs() multiply-adds each.
        let flop = 6.0 * p.macs() as f64;
        let pointwise = s.k == 1 && s.stride == 1 && s.pad == 0;
        let col_mb = if pointwise {
            0.0
        } else {
            (m * kd * 4) as f64 / 1e6
        };
        let (c, g, b) = time_shape(&p, pointwise);
        let t = [c, g, b].map(|v| v.iter().sum::<f64>());
        let pct = |i: usize| 100.0 * g[i] / c[i];
        println!(
            "{:<26} {:>5} {:>5} {:>5} {:>6.2} {:>5.2} | {:>7.2} {:>6.1} | {:>6.1} | {:>4.0}% | {:>3.0}% {:>3.0}% {:>3.0}% | {:>6.1}",
            s.name,
            m,
            kd,
            o,
            flop / 1e9,
            col_mb,
            t[0] * 1e3,
            flop / t[0] / 1e9,
            flop / t[1] / 1e9,
            100.0 * t[1] / t[0],
            pct(0),
            pct(1),
            pct(2),
            flop / t[2] / 1e9
        );
        flop_all += flop;
        for (a, v) in t_all.iter_mut().zip(t) {
            *a += v;
        }
    }
    println!("{rule}");
    println!(
        "{:<26} {:>17} {:>6.2} {:>5} | {:>7.2} {:>6.1} | {:>6.1} | {:>4.0}% | {:>14} | {:>6.1}",
        "all shapes",
        "",
        flop_all / 1e9,
        "",
        t_all[0] * 1e3,
        flop_all / t_all[0] / 1e9,
        flop_all / t_all[1] / 1e9,
        100.0 * t_all[1] / t_all[0],
        "",
        flop_all / t_all[2] / 1e9
    );
}
