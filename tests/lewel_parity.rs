//! `lewel step` against an independent PyTorch formulation of LEWEL (tests/parity/lewel_reference.py,
//! float64), on committed fixtures: ResNet-18 at 1/16 width (40 px) and ResNet-50 at 1/32 width
//! (64 px), batch 4, both methods, with LARS momentum buffers in the state.
//!
//! Tolerances: loss relative error <= 1e-5; every gradient relative L2 <= 1e-4; every state tensor
//! relative L2 <= 1e-5. Each is raised to 10x the entry's float32 noise when that is larger (the
//! `.noise` files: PyTorch's own float32 step against its float64 step), and the LARS momentum buffers
//! are held to the gradient tolerance, since a buffer is lr * tau * (g + wd p) and carries its
//! gradient's relative error. Counters (num_batches_tracked) must be equal.

use lewel::checkpoint::{read_file, Tensors};
use lewel::train::{step_files, Method, StepConfig};
use std::path::PathBuf;

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/parity/fixtures")
        .join(name)
}

fn rel_l2(a: &[f32], b: &[f32]) -> f64 {
    let (mut d, mut n) = (0.0f64, 0.0f64);
    let mut max_abs = 0.0f64;
    for (x, y) in a.iter().zip(b) {
        let e = *x as f64 - *y as f64;
        d += e * e;
        n += (*y as f64) * (*y as f64);
        max_abs = max_abs.max(e.abs());
    }
    if n == 0.0 {
        max_abs
    } else {
        (d / n).sqrt()
    }
}

fn check(name: &str, method: Method) {
    let m = method.name();
    let dir = std::env::temp_dir().join(format!("lewel-parity-{name}-{m}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("out.safetensors");
    let sc = StepConfig::recipe(method, 0.3, 0.99);
    step_files(
        &fixture(&format!("{name}.in.safetensors")),
        &fixture(&format!("{name}.views.safetensors")),
        &out,
        &sc,
        4,
        1.0,
        0.5,
    )
    .unwrap();
    let ours: Tensors = read_file(&out).unwrap();
    let theirs = read_file(&fixture(&format!("{name}.{m}.out.safetensors"))).unwrap();
    let noise = read_file(&fixture(&format!("{name}.{m}.noise.safetensors"))).unwrap();
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>(),
        "{name} {m}: output names differ"
    );
    let mut worst = (0.0f64, String::new());
    let mut failures = Vec::new();
    for (k, t) in &theirs {
        let o = &ours[k];
        assert_eq!((&o.shape, o.dtype), (&t.shape, t.dtype), "{name} {m}: {k}");
        if let Some(v) = t.to_i64() {
            assert_eq!(o.to_i64(), Some(v), "{name} {m}: {k}");
            continue;
        }
        let (a, b) = (o.to_f32().unwrap(), t.to_f32().unwrap());
        let base: f64 = if k == "loss" {
            1e-5
        } else if k.starts_with("grad.") || k.starts_with("state.momentum.") {
            1e-4
        } else {
            1e-5
        };
        let nz = noise
            .get(k.as_str())
            .and_then(|n| n.to_f32())
            .map_or(0.0, |v| v[0] as f64);
        let tol = base.max(10.0 * nz);
        let err = rel_l2(&a, &b);
        if err / tol > worst.0 {
            worst = (err / tol, format!("{k}: {err:.2e} of {tol:.2e}"));
        }
        if err > tol {
            failures.push(format!("{k}: rel err {err:.3e} > tol {tol:.1e}"));
        }
    }
    println!(
        "{name} {m}: {} entries, worst {:.3} of tolerance ({})",
        theirs.len(),
        worst.0,
        worst.1
    );
    assert!(
        failures.is_empty(),
        "{name} {m}: {} entries over tolerance, first: {:?}",
        failures.len(),
        &failures[..failures.len().min(5)]
    );
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn parity_resnet18_eman() {
    check("r18_div16", Method::LewelBEman);
}

#[test]
fn parity_resnet18_lewel_b() {
    check("r18_div16", Method::LewelB);
}

#[test]
fn parity_resnet50_eman() {
    check("r50_div32", Method::LewelBEman);
}

#[test]
fn parity_resnet50_lewel_b() {
    check("r50_div32", Method::LewelB);
}
