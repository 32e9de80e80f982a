//! Our CPU reference ops against values computed by PyTorch (not by this crate).
//!
//! The fixture tests/fixtures/ops/ops_reference.safetensors is written by
//! `python3 tests/fixtures/ops/make_ops_fixtures.py` (needs torch and safetensors). It holds float32
//! inputs and float64 outputs that PyTorch computed in float64 from exactly those inputs, all in
//! PyTorch's layouts (NCHW, OIHW, (B, C, L)). Each test converts to our layouts (NHWC,
//! [out, kh, kw, in], (B, L, C)), runs our op in f32 and compares elementwise with
//! |ours - theirs| <= ATOL + RTOL * |theirs|.
//!
//! Tolerance: our ops compute in f32 (reductions partly in f64); every case here sums at most a few
//! dozen terms of magnitude <= ~10, so the f32 rounding error is a few 1e-7 in absolute terms (the
//! worst observed, conv2d's weight gradient, is 1.5e-6 = 0.075 of the tolerance). 1e-5 keeps that
//! headroom yet catches any convention error (a transposed layout, a biased variance, a wrong softmax
//! axis, a missing factor), each of which moves values by O(1e-3) to O(1). Run with
//! `-- --nocapture` to see the per-tensor errors.

use lewel::ops::{aggregate, batchnorm, conv, l2norm, loss, pool, softmax};
use safetensors::{Dtype, SafeTensors};

const ATOL: f64 = 1e-5;
const RTOL: f64 = 1e-5;

fn fixture_bytes() -> Vec<u8> {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/ops/ops_reference.safetensors"
    );
    std::fs::read(path).unwrap_or_else(|e| {
        panic!("{path}: {e} (regenerate with `python3 tests/fixtures/ops/make_ops_fixtures.py`)")
    })
}

/// One tensor of the fixture: shape (PyTorch's) and values widened to f64.
fn read(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    let t = st
        .tensor(name)
        .unwrap_or_else(|e| panic!("fixture tensor {name}: {e}"));
    let data = t.data();
    let values: Vec<f64> = match t.dtype() {
        Dtype::F32 => data
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        Dtype::F64 => data
            .chunks_exact(8)
            .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
            .collect(),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("fixture tensor {name}: unexpected dtype {d:?}"),
    };
    assert_eq!(
        values.len(),
        t.shape().iter().product::<usize>(),
        "fixture tensor {name}: size"
    );
    (t.shape().to_vec(), values)
}

/// An input: stored as f32, read exactly.
fn input(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f32>) {
    assert_eq!(
        st.tensor(name).unwrap().dtype(),
        Dtype::F32,
        "{name} should be a float32 input"
    );
    let (shape, v) = read(st, name);
    (shape, v.into_iter().map(|x| x as f32).collect())
}

/// A PyTorch result: stored as f64.
fn reference(st: &SafeTensors, name: &str) -> (Vec<usize>, Vec<f64>) {
    assert_eq!(
        st.tensor(name).unwrap().dtype(),
        Dtype::F64,
        "{name} should be a float64 reference"
    );
    read(st, name)
}

/// out[j] = x[i] where the axes of out are the axes `perm` of x: out.shape[a] = shape[perm[a]].
fn permute<T: Copy>(x: &[T], shape: &[usize], perm: &[usize]) -> Vec<T> {
    assert_eq!(x.len(), shape.iter().product::<usize>());
    assert_eq!(shape.len(), perm.len());
    let rank = shape.len();
    let mut strides = vec![1usize; rank];
    for a in (0..rank.saturating_sub(1)).rev() {
        strides[a] = strides[a + 1] * shape[a + 1];
    }
    let out_shape: Vec<usize> = perm.iter().map(|&p| shape[p]).collect();
    let mut idx = vec![0usize; rank];
    let mut out = Vec::with_capacity(x.len());
    for _ in 0..x.len() {
        out.push(
            x[idx
                .iter()
                .zip(perm)
                .map(|(&i, &p)| i * strides[p])
                .sum::<usize>()],
        );
        for a in (0..rank).rev() {
            idx[a] += 1;
            if idx[a] < out_shape[a] {
                break;
            }
            idx[a] = 0;
        }
    }
    out
}

/// NCHW -> NHWC (also OIHW -> OHWI, our [out, kh, kw, in]).
fn nchw_to_nhwc<T: Copy>(x: &[T], shape: &[usize]) -> Vec<T> {
    assert_eq!(shape.len(), 4);
    permute(x, shape, &[0, 2, 3, 1])
}

/// (B, C, L) -> (B, L, C): PyTorch's channel-major maps to our position rows.
fn bcl_to_blc<T: Copy>(x: &[T], shape: &[usize]) -> Vec<T> {
    assert_eq!(shape.len(), 3);
    permute(x, shape, &[0, 2, 1])
}

/// NCHW or (N, C, L) -> rows (N*H*W or N*L, C): channels last, the other axes in order.
fn to_rows<T: Copy>(x: &[T], shape: &[usize]) -> Vec<T> {
    let mut perm = vec![0];
    perm.extend(2..shape.len());
    perm.push(1);
    permute(x, shape, &perm)
}

/// Elementwise comparison in our layout `shape` (for the message). Panics listing the first
/// mismatches. Prints the max abs error, the max rel error over nonzero references and the worst
/// error as a fraction of the tolerance (run with `-- --nocapture` to see them).
fn compare(op: &str, ours: &[f32], theirs: &[f64], shape: &[usize]) {
    assert_eq!(
        ours.len(),
        theirs.len(),
        "{op}: length ours {} theirs {}",
        ours.len(),
        theirs.len()
    );
    assert_eq!(
        ours.len(),
        shape.iter().product::<usize>(),
        "{op}: shape {shape:?}"
    );
    let (mut max_abs, mut max_rel, mut worst) = (0.0f64, 0.0f64, 0.0f64);
    let mut bad = Vec::new();
    for (i, (&a, &b)) in ours.iter().zip(theirs).enumerate() {
        let a = a as f64;
        let err = (a - b).abs();
        if err.is_nan() || err > ATOL + RTOL * b.abs() {
            bad.push((i, a, b));
        }
        max_abs = max_abs.max(err);
        worst = worst.max(err / (ATOL + RTOL * b.abs()));
        if b != 0.0 {
            max_rel = max_rel.max(err / b.abs());
        }
    }
    println!(
        "{op:<28} n {:>4}  max abs {max_abs:.3e}  max rel {max_rel:.3e}  worst err/tol {worst:.3}",
        ours.len()
    );
    if !bad.is_empty() {
        for &(i, a, b) in bad.iter().take(10) {
            let mut idx = vec![0; shape.len()];
            let mut r = i;
            for (a, &s) in idx.iter_mut().zip(shape).rev() {
                *a = r % s;
                r /= s;
            }
            eprintln!(
                "{op}: index {i} {idx:?} of {shape:?}: ours {a:.9e} theirs {b:.9e} (diff {:.3e})",
                (a - b).abs()
            );
        }
        panic!(
            "{op}: {} of {} elements differ from PyTorch beyond {ATOL:e} + {RTOL:e} * |ref|",
            bad.len(),
            ours.len()
        );
    }
}

#[test]
fn pytorch_conv2d() {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (xs, x) = input(&st, "conv2d.x");
    let (ws, w) = input(&st, "conv2d.w");
    let (dys, dy) = input(&st, "conv2d.dy");
    let (n, c_in, h, wd) = (xs[0], xs[1], xs[2], xs[3]);
    let (c_out, k) = (ws[0], ws[2]);
    let p = conv::ConvParams::new(n, h, wd, c_in, c_out, k, 2, 1);
    assert_eq!(
        [p.h_out as usize, p.w_out as usize],
        [dys[2], dys[3]],
        "conv2d: output size as PyTorch"
    );
    let (x, w, dy) = (
        nchw_to_nhwc(&x, &xs),
        nchw_to_nhwc(&w, &ws),
        nchw_to_nhwc(&dy, &dys),
    );

    let mut y = vec![0.0f32; p.y_len()];
    conv::forward_cpu(&x, &w, &mut y, &p);
    let (ys, y_ref) = reference(&st, "conv2d.y");
    compare(
        "conv2d y",
        &y,
        &nchw_to_nhwc(&y_ref, &ys),
        &[ys[0], ys[2], ys[3], ys[1]],
    );

    let mut dx = vec![0.0f32; p.x_len()];
    conv::backward_data_cpu(&dy, &w, &mut dx, &p);
    let (_, dx_ref) = reference(&st, "conv2d.dx");
    compare(
        "conv2d dx",
        &dx,
        &nchw_to_nhwc(&dx_ref, &xs),
        &[n, h, wd, c_in],
    );

    let mut dw = vec![0.0f32; p.w_len()];
    conv::backward_weight_cpu(&x, &dy, &mut dw, &p);
    let (_, dw_ref) = reference(&st, "conv2d.dw");
    compare(
        "conv2d dw",
        &dw,
        &nchw_to_nhwc(&dw_ref, &ws),
        &[c_out, k, k, c_in],
    );
}

/// Train-mode batch norm on `case`, whose x is NCHW (2d) or (N, C, L) (1d); both become rows
/// (N*H*W or N*L, C) with channels fastest.
fn batchnorm_case(case: &str) {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = |t: &str| format!("{case}.{t}");
    let (xs, x) = input(&st, &name("x"));
    let c = xs[1];
    let rows = x.len() / c;
    let x = to_rows(&x, &xs);
    let dy = to_rows(&input(&st, &name("dy")).1, &xs);
    let (_, gamma) = input(&st, &name("gamma"));
    let (_, beta) = input(&st, &name("beta"));
    let (_, rm0) = input(&st, &name("running_mean_in"));
    let (_, rv0) = input(&st, &name("running_var_in"));

    let p = batchnorm::BnParams::new(rows, c);
    assert_eq!(
        (p.eps, p.momentum),
        (1e-5, 0.1),
        "{case}: PyTorch's default eps and momentum"
    );
    let mut y = vec![0.0f32; rows * c];
    let (mut mean, mut rstd) = (vec![0.0f32; c], vec![0.0f32; c]);
    let (mut rm, mut rv) = (rm0.clone(), rv0.clone());
    batchnorm::forward_train_cpu(
        &x, &gamma, &beta, &mut y, &mut mean, &mut rstd, &mut rm, &mut rv, &p, None,
    )
    .unwrap();
    let (_, y_ref) = reference(&st, &name("y"));
    compare(&name("y"), &y, &to_rows(&y_ref, &xs), &[rows, c]);
    compare(
        &name("running_mean"),
        &rm,
        &reference(&st, &name("running_mean")).1,
        &[c],
    );
    let (_, rv_ref) = reference(&st, &name("running_var"));
    compare(&name("running_var"), &rv, &rv_ref, &[c]);

    // The fixture pins the unbiased variance m/(m-1) in the running update: the biased alternative is
    // far outside the tolerance, so the match above excludes it.
    for ch in 0..c {
        let col: Vec<f64> = (0..rows).map(|r| x[r * c + ch] as f64).collect();
        let mu = col.iter().sum::<f64>() / rows as f64;
        let var_b = col.iter().map(|v| (v - mu) * (v - mu)).sum::<f64>() / rows as f64;
        let biased = 0.9 * rv0[ch] as f64 + 0.1 * var_b;
        let unbiased = 0.9 * rv0[ch] as f64 + 0.1 * var_b * rows as f64 / (rows - 1) as f64;
        assert!(
            (rv_ref[ch] - unbiased).abs() < 1e-6,
            "{case}: PyTorch's running_var is not the unbiased update"
        );
        assert!(
            (rv_ref[ch] - biased).abs() > 1e-3,
            "{case}: fixture cannot tell biased from unbiased variance"
        );
    }

    let mut dx = vec![0.0f32; rows * c];
    let (mut dgamma, mut dbeta) = (vec![0.0f32; c], vec![0.0f32; c]);
    batchnorm::backward_train_cpu(
        &x,
        &dy,
        &gamma,
        &mean,
        &rstd,
        &mut dx,
        &mut dgamma,
        &mut dbeta,
        &p,
        None,
    )
    .unwrap();
    let (_, dx_ref) = reference(&st, &name("dx"));
    compare(&name("dx"), &dx, &to_rows(&dx_ref, &xs), &[rows, c]);
    compare(
        &name("dgamma"),
        &dgamma,
        &reference(&st, &name("dgamma")).1,
        &[c],
    );
    compare(
        &name("dbeta"),
        &dbeta,
        &reference(&st, &name("dbeta")).1,
        &[c],
    );
}

#[test]
fn pytorch_batchnorm2d_train() {
    batchnorm_case("batchnorm2d");
}

#[test]
fn pytorch_batchnorm1d_train() {
    batchnorm_case("batchnorm1d");
}

#[test]
fn pytorch_softmax_positions() {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (xs, x) = input(&st, "softmax.x");
    let (_, dy) = input(&st, "softmax.dy");
    let (b, d, l) = (xs[0], xs[1], xs[2]);
    let p = softmax::SoftmaxParams::new(b, l, d);
    let (x, dy) = (bcl_to_blc(&x, &xs), bcl_to_blc(&dy, &xs));

    let mut y = vec![0.0f32; x.len()];
    softmax::forward_cpu(&x, &mut y, &p);
    compare(
        "softmax y",
        &y,
        &bcl_to_blc(&reference(&st, "softmax.y").1, &xs),
        &[b, l, d],
    );

    let mut dx = vec![0.0f32; x.len()];
    softmax::backward_cpu(&y, &dy, &mut dx, &p);
    compare(
        "softmax dx",
        &dx,
        &bcl_to_blc(&reference(&st, "softmax.dx").1, &xs),
        &[b, l, d],
    );
}

fn loss_case(case: &str) {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = |t: &str| format!("{case}.{t}");
    let (ps, pred) = input(&st, &name("p"));
    let (_, target) = input(&st, &name("t"));
    let (_, dloss) = input(&st, &name("dloss"));
    let p = loss::LossParams::new(ps[0], ps[1]);

    let value = loss::forward_cpu(&pred, &target, &p);
    compare(
        &name("loss"),
        &[value],
        &reference(&st, &name("loss")).1,
        &[1],
    );

    let mut dpred = vec![0.0f32; pred.len()];
    loss::backward_cpu(&pred, &target, dloss[0], &mut dpred, &p);
    compare(&name("dp"), &dpred, &reference(&st, &name("dp")).1, &ps);
}

#[test]
fn pytorch_loss() {
    loss_case("loss");
}

/// A zero prediction row: F.normalize's clamp at eps = 1e-12 (gradient t_hat / eps on that row).
#[test]
fn pytorch_loss_zero_row() {
    loss_case("loss_zero_row");
}

#[test]
fn pytorch_maxpool() {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (xs, x) = input(&st, "maxpool.x");
    let (dys, dy) = input(&st, "maxpool.dy");
    let (n, c, h, w) = (xs[0], xs[1], xs[2], xs[3]);
    let p = pool::PoolParams::max(n, h, w, c, 3, 2, 1);
    assert_eq!(
        [p.h_out as usize, p.w_out as usize],
        [dys[2], dys[3]],
        "maxpool: output size as PyTorch"
    );
    let (x, dy) = (nchw_to_nhwc(&x, &xs), nchw_to_nhwc(&dy, &dys));

    let mut y = vec![0.0f32; p.y_len()];
    let mut argmax = vec![0.0f32; p.y_len()];
    pool::maxpool_forward_cpu(&x, &mut y, &mut argmax, &p);
    let (ys, y_ref) = reference(&st, "maxpool.y");
    compare(
        "maxpool y",
        &y,
        &nchw_to_nhwc(&y_ref, &ys),
        &[n, ys[2], ys[3], c],
    );

    let mut dx = vec![0.0f32; p.x_len()];
    pool::maxpool_backward_cpu(&dy, &argmax, &mut dx, &p);
    compare(
        "maxpool dx",
        &dx,
        &nchw_to_nhwc(&reference(&st, "maxpool.dx").1, &xs),
        &[n, h, w, c],
    );
}

fn l2norm_case(case: &str) {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let name = |t: &str| format!("{case}.{t}");
    let (xs, x) = input(&st, &name("x"));
    let (_, dy) = input(&st, &name("dy"));
    let (b, d, l) = (xs[0], xs[1], xs[2]);
    let p = l2norm::L2NormParams::new(b * l, d, 0.5);
    let (x, dy) = (bcl_to_blc(&x, &xs), bcl_to_blc(&dy, &xs));

    let mut y = vec![0.0f32; x.len()];
    l2norm::forward_cpu(&x, &mut y, &p);
    compare(
        &name("y"),
        &y,
        &bcl_to_blc(&reference(&st, &name("y")).1, &xs),
        &[b, l, d],
    );

    let mut dx = vec![0.0f32; x.len()];
    l2norm::backward_cpu(&x, &dy, &mut dx, &p);
    compare(
        &name("dx"),
        &dx,
        &bcl_to_blc(&reference(&st, &name("dx")).1, &xs),
        &[b, l, d],
    );
}

#[test]
fn pytorch_l2norm() {
    l2norm_case("l2norm");
}

/// A zero position and one with norm below eps: F.normalize's clamp, y = x / eps / scale.
#[test]
fn pytorch_l2norm_clamp() {
    l2norm_case("l2norm_clamp");
}

#[test]
fn pytorch_aggregate() {
    let bytes = fixture_bytes();
    let st = SafeTensors::deserialize(&bytes).unwrap();
    let (xs, x) = input(&st, "aggregate.x");
    let (ws, w) = input(&st, "aggregate.w");
    let (vs, dv) = input(&st, "aggregate.dv");
    let heads = read(&st, "aggregate.heads").1[0] as usize;
    let (b, c, l, d, k) = (xs[0], xs[1], xs[2], ws[1], vs[2]);
    assert_eq!(k, d / heads);
    let p = aggregate::AggregateParams::new(b, l, c, d, heads);
    // v row k is aligned embedding k: PyTorch's (B, C, K) transposed to (B, K, C), like (B, C, L).
    let (x, w, dv) = (
        bcl_to_blc(&x, &xs),
        bcl_to_blc(&w, &ws),
        bcl_to_blc(&dv, &vs),
    );

    let mut v = vec![0.0f32; p.v_len()];
    aggregate::forward_cpu(&x, &w, &mut v, &p);
    compare(
        "aggregate v",
        &v,
        &bcl_to_blc(&reference(&st, "aggregate.v").1, &vs),
        &[b, k, c],
    );

    let (mut dx, mut dw) = (vec![0.0f32; x.len()], vec![0.0f32; w.len()]);
    aggregate::backward_cpu(&x, &w, &dv, &mut dx, &mut dw, &p);
    compare(
        "aggregate dx",
        &dx,
        &bcl_to_blc(&reference(&st, "aggregate.dx").1, &xs),
        &[b, l, c],
    );
    compare(
        "aggregate dw",
        &dw,
        &bcl_to_blc(&reference(&st, "aggregate.dw").1, &ws),
        &[b, l, d],
    );
}

#[test]
fn permute_matches_hand_transposes() {
    // (2, 3) -> (3, 2)
    assert_eq!(
        permute(&[0, 1, 2, 3, 4, 5], &[2, 3], &[1, 0]),
        vec![0, 3, 1, 4, 2, 5]
    );
    // NCHW (1, 2, 1, 3) -> NHWC (1, 1, 3, 2): x[c, w] = 10 c + w
    assert_eq!(
        nchw_to_nhwc(&[0, 1, 2, 10, 11, 12], &[1, 2, 1, 3]),
        vec![0, 10, 1, 11, 2, 12]
    );
    // (B, C, L) = (2, 2, 2) -> (B, L, C)
    assert_eq!(
        bcl_to_blc(&[0, 1, 10, 11, 100, 101, 110, 111], &[2, 2, 2]),
        vec![0, 10, 1, 11, 100, 110, 101, 111]
    );
}
