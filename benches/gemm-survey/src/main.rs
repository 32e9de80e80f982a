//! sgemm at lewel's CPU shapes: C (m x n) = A (m x k) B (k x n), row-major, f32, C overwritten.
//! Candidates: matrixmultiply as lewel uses it (no threading feature: one thread per call; "mm rows"
//! is lewel's own split, blocks of 64 rows on rayon), and gemm (sarah-ek's, used by faer and
//! candle), single-threaded and on rayon. Each shape:
//! the median of 7 timed runs after 2 warm-ups, GFLOP/s = 2 m n k / t; results checked against each
//! other (max relative difference).
use std::time::Instant;

fn shapes() -> Vec<(&'static str, usize, usize, usize)> {
    // (what, m, k, n): ResNet-50 LEWEL at 64 px, batch 16 (forward im2col GEMMs: rows = N*H*W,
    // k = Cin*kh*kw, n = Cout) and the neck's MLP; the tiny built-in model at 48 px, batch 64.
    vec![
        ("r50 stem 7x7 (16x32x32, 147 -> 64)", 16 * 32 * 32, 147, 64),
        ("r50 layer1 1x1 (16x16x16, 64 -> 256)", 16 * 16 * 16, 64, 256),
        ("r50 layer1 3x3 (16x16x16, 576 -> 64)", 16 * 16 * 16, 576, 64),
        ("r50 layer2 3x3 (16x8x8, 1152 -> 128)", 16 * 8 * 8, 1152, 128),
        ("r50 layer3 3x3 (16x4x4, 2304 -> 256)", 16 * 4 * 4, 2304, 256),
        ("r50 layer4 3x3 (16x2x2, 4608 -> 512)", 16 * 2 * 2, 4608, 512),
        ("r50 layer4 1x1 (16x2x2, 512 -> 2048)", 16 * 2 * 2, 512, 2048),
        ("neck fc (16x5, 2048 -> 4096)", 16 * 5, 2048, 4096),
        ("tiny layer1 3x3 (64x12x12, 72 -> 8)", 64 * 12 * 12, 72, 8),
        ("tiny layer1 3x3 as C^T (8 x 72 -> 9216)", 8, 72, 64 * 12 * 12),
        ("tiny layer3 3x3 (64x3x3, 288 -> 32)", 64 * 3 * 3, 288, 32),
        ("square 512", 512, 512, 512),
    ]
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[v.len() / 2]
}

fn time(mut f: impl FnMut()) -> f64 {
    for _ in 0..2 {
        f();
    }
    median(
        (0..7)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .collect(),
    )
}

fn mm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize) {
    // SAFETY: a is m x k, b is k x n, c is m x n, all row-major and distinct.
    unsafe {
        matrixmultiply::sgemm(
            m, k, n, 1.0, a.as_ptr(), k as isize, 1, b.as_ptr(), n as isize, 1, 0.0,
            c.as_mut_ptr(), n as isize, 1,
        )
    }
}

fn gm(a: &[f32], b: &[f32], c: &mut [f32], m: usize, k: usize, n: usize, par: gemm::Parallelism) {
    // SAFETY: as above; read_dst false: c is overwritten.
    unsafe {
        gemm::gemm(
            m, n, k, c.as_mut_ptr(), 1, n as isize, false, a.as_ptr(), 1, k as isize, b.as_ptr(),
            1, n as isize, 0.0, 1.0, false, false, false, par,
        )
    }
}

fn main() {
    let threads = rayon::current_num_threads();
    println!("sgemm GFLOP/s, median of 7 after 2 warm-ups; {threads} rayon threads");
    println!(
        "{:<40} {:>9} {:>9} {:>9} {:>9}  {:>8}",
        "shape (m x k -> n)", "mm 1t", "mm rows", "gemm 1t", "gemm par", "max rel"
    );
    for (what, m, k, n) in shapes() {
        let a: Vec<f32> = (0..m * k).map(|i| ((i * 7919) % 1000) as f32 / 1000.0 - 0.5).collect();
        let b: Vec<f32> = (0..k * n).map(|i| ((i * 104729) % 1000) as f32 / 1000.0 - 0.5).collect();
        let mut c1 = vec![0.0f32; m * n];
        let mut c2 = vec![0.0f32; m * n];
        let mut c3 = vec![0.0f32; m * n];
        let flop = 2.0 * (m * n * k) as f64;
        let t1 = time(|| mm(&a, &b, &mut c1, m, k, n));
        // lewel's own split: blocks of 64 rows in parallel, each a single-threaded sgemm.
        let t2 = time(|| {
            use rayon::prelude::*;
            c2.par_chunks_mut(64 * n).enumerate().for_each(|(i, cb)| {
                let rows = cb.len() / n;
                mm(&a[i * 64 * k..(i * 64 + rows) * k], &b, cb, rows, k, n)
            })
        });
        let t3 = time(|| gm(&a, &b, &mut c3, m, k, n, gemm::Parallelism::None));
        let t4 = time(|| gm(&a, &b, &mut c3, m, k, n, gemm::Parallelism::Rayon(threads)));
        let rel = c1
            .iter()
            .zip(&c2)
            .zip(&c3)
            .map(|((x, y), z)| ((x - y).abs().max((x - z).abs()) / x.abs().max(1.0)) as f64)
            .fold(0.0, f64::max);
        let g = |t: f64| flop / t / 1e9;
        println!(
            "{what:<40} {:>9.1} {:>9.1} {:>9.1} {:>9.1}  {rel:>8.1e}",
            g(t1),
            g(t2),
            g(t3),
            g(t4)
        );
    }
}
