//! Central finite differences in f64 against an analytic backward: the first link of the chain of
//! trust. The scalar probed is L = sum(dy * y) for a fixed random dy, so dL/dx = backward(dy).

use crate::rng::Rng;

/// What a passing check measured.
#[derive(Debug, Clone)]
pub struct Report {
    pub checked: usize,
    pub max_abs_err: f64,
    pub max_rel_err: f64,
}

/// The forward under test: inputs -> output.
pub type Forward<'a> = dyn Fn(&[Vec<f64>]) -> Vec<f64> + 'a;
/// The backward under test: (inputs, dy) -> one gradient per input (`None`: not differentiable).
pub type Backward<'a> = dyn Fn(&[Vec<f64>], &[f64]) -> Vec<Option<Vec<f64>>> + 'a;

/// Elements probed per input at most; larger inputs are sampled at random positions.
pub const MAX_PROBES: usize = 160;
const STEP: f64 = 1e-6;
const ATOL: f64 = 1e-6;
const RTOL: f64 = 1e-5;

/// Checks `bwd` against central differences of `fwd` at `inputs`. `names` label the inputs in the
/// failure message. Returns the worst mismatch as an error.
pub fn check(
    op: &str,
    names: &[&str],
    inputs: &[Vec<f64>],
    fwd: &Forward,
    bwd: &Backward,
) -> Result<Report, String> {
    assert_eq!(names.len(), inputs.len(), "gradcheck {op}: names vs inputs");
    let y = fwd(inputs);
    let mut rng = Rng::keyed(&[0x9c, y.len() as u64]);
    let dy: Vec<f64> = (0..y.len()).map(|_| rng.range(-1.0, 1.0)).collect();
    let grads = bwd(inputs, &dy);
    assert_eq!(
        grads.len(),
        inputs.len(),
        "gradcheck {op}: backward returned wrong count"
    );
    let loss = |xs: &[Vec<f64>]| -> f64 { fwd(xs).iter().zip(&dy).map(|(a, b)| a * b).sum() };

    let mut rep = Report {
        checked: 0,
        max_abs_err: 0.0,
        max_rel_err: 0.0,
    };
    let mut xs = inputs.to_vec();
    for (i, g) in grads.iter().enumerate() {
        let Some(g) = g else { continue };
        assert_eq!(
            g.len(),
            inputs[i].len(),
            "gradcheck {op}: grad of {} has wrong length",
            names[i]
        );
        let n = inputs[i].len();
        let probes: Vec<usize> = if n <= MAX_PROBES {
            (0..n).collect()
        } else {
            (0..MAX_PROBES)
                .map(|_| rng.below(n as u64) as usize)
                .collect()
        };
        for j in probes {
            let x0 = xs[i][j];
            let h = STEP * x0.abs().max(1.0);
            xs[i][j] = x0 + h;
            let lp = loss(&xs);
            xs[i][j] = x0 - h;
            let lm = loss(&xs);
            xs[i][j] = x0;
            let num = (lp - lm) / (2.0 * h);
            let ana = g[j];
            let abs = (num - ana).abs();
            let rel = abs / num.abs().max(ana.abs()).max(1e-12);
            rep.checked += 1;
            if abs > ATOL + RTOL * num.abs().max(ana.abs()) {
                return Err(format!(
                    "gradcheck {op}: d/d{}[{j}] analytic {ana:.9e} vs numeric {num:.9e} (abs err {abs:.2e})",
                    names[i]
                ));
            }
            rep.max_abs_err = rep.max_abs_err.max(abs);
            if abs > ATOL {
                rep.max_rel_err = rep.max_rel_err.max(rel);
            }
        }
    }
    assert!(rep.checked > 0, "gradcheck {op}: nothing was checked");
    Ok(rep)
}

/// Uniform values in [lo, hi) from a seed, for test inputs.
pub fn uniform(seed: u64, n: usize, lo: f64, hi: f64) -> Vec<f64> {
    let mut r = Rng::keyed(&[0x11, seed]);
    (0..n).map(|_| r.range(lo, hi)).collect()
}

/// Values in [lo, hi) whose magnitudes stay at least `gap` away from zero (inputs of ReLU kept away
/// from the kink).
pub fn away_from_zero(seed: u64, n: usize, gap: f64, hi: f64) -> Vec<f64> {
    let mut r = Rng::keyed(&[0x12, seed]);
    (0..n)
        .map(|_| {
            let m = r.range(gap, hi);
            if r.uniform() < 0.5 {
                -m
            } else {
                m
            }
        })
        .collect()
}

/// A random permutation of evenly spaced values: no two inputs within `spacing` of each other, so
/// max-pooling has no near-ties for finite differences to straddle.
pub fn distinct(seed: u64, n: usize, spacing: f64) -> Vec<f64> {
    let mut r = Rng::keyed(&[0x13, seed]);
    let mut v: Vec<f64> = (0..n)
        .map(|i| (i as f64 - n as f64 / 2.0) * spacing)
        .collect();
    for i in (1..n).rev() {
        v.swap(i, r.below(i as u64 + 1) as usize);
    }
    v
}

/// Asserts that `check` passes and prints what it measured (visible with --nocapture).
pub fn assert_ok(r: Result<Report, String>) -> Report {
    match r {
        Ok(rep) => {
            println!(
                "checked {} elements, max abs err {:.2e}, max rel err {:.2e}",
                rep.checked, rep.max_abs_err, rep.max_rel_err
            );
            rep
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // y = x^2 elementwise: the checker accepts 2x and rejects a gradient off by 1%.
    #[test]
    fn checker_rejects_a_wrong_gradient() {
        let x = vec![uniform(1, 20, -2.0, 2.0)];
        let fwd = |xs: &[Vec<f64>]| xs[0].iter().map(|v| v * v).collect::<Vec<_>>();
        let good = |xs: &[Vec<f64>], dy: &[f64]| {
            vec![Some(
                xs[0].iter().zip(dy).map(|(v, d)| 2.0 * v * d).collect(),
            )]
        };
        let bad = |xs: &[Vec<f64>], dy: &[f64]| {
            vec![Some(
                xs[0].iter().zip(dy).map(|(v, d)| 2.02 * v * d).collect(),
            )]
        };
        assert_ok(check("square", &["x"], &x, &fwd, &good));
        let err = check("square", &["x"], &x, &fwd, &bad).unwrap_err();
        assert!(err.contains("gradcheck square: d/dx["), "{err}");
    }
}
