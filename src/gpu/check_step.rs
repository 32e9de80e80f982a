//! `lewel check`, the links after the ops: one whole LEWEL step of the small model on the GPU
//! against the CPU (f32 with TF32 off, and bf16), two GPU runs under --deterministic compared
//! bitwise, and the first 20 steps of the built-in run's loss curve, GPU bf16 against the CPU.

use super::check::Row;
use super::train::GpuLewel;
use super::{Gpu, GpuFloat};
use crate::error::Result;
use crate::model::lewel::LewelConfig;
use crate::model::resnet::Arch;
use crate::rng::Rng;
use crate::run::PretrainConfig;
use crate::tensor::Shape;
use crate::train::{Lewel, Method, StepConfig};
use cudarc::cublas::{CudaBlas, Gemm};
use std::rc::Rc;

/// A row comparing values by NMSE (non-finite values fail first).
fn row(
    op: &str,
    dtype: &'static str,
    output: &'static str,
    got: &[f32],
    want: &[f32],
    tol: f64,
) -> Row {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().zip(want) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    let nmse = num / den.max(1e-30);
    let failure = if got.len() != want.len() {
        format!("{} values, expected {}", got.len(), want.len())
    } else if let Some(i) = got.iter().position(|v| !v.is_finite()) {
        format!("non-finite at {i}: {}", got[i])
    } else if nmse.is_nan() || nmse > tol {
        format!("NMSE {nmse:.2e} > {tol:.0e}")
    } else {
        String::new()
    };
    Row {
        op: op.into(),
        dtype,
        output,
        nmse,
        tol,
        failure,
    }
}

fn dtype_name<E: GpuFloat>() -> &'static str {
    match E::DTYPE {
        crate::tensor::DType::F32 => "f32",
        crate::tensor::DType::BF16 => "bf16",
    }
}

/// Whole-step NMSE tolerances: f32 differs by summation order only, through a deep network;
/// bf16 rounds every activation.
fn step_tol<E: GpuFloat>() -> f64 {
    match E::DTYPE {
        crate::tensor::DType::F32 => 1e-8,
        crate::tensor::DType::BF16 => 2e-2,
    }
}

/// Runs every whole-step check; returns the rows.
pub fn run_steps(g: &Rc<Gpu>, seed: u64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let tf32 = g.tf32();
    g.set_tf32(false)?;
    let r = one_step::<f32>(g, seed, &mut rows)
        .and_then(|_| one_step::<half::bf16>(g, seed, &mut rows));
    g.set_tf32(tf32)?;
    r?;
    determinism::<half::bf16>(g, seed, &mut rows)?;
    determinism::<f32>(g, seed, &mut rows)?;
    loss_curve(g, &mut rows)?;
    Ok(rows)
}

/// The small model, batch 8 at 64 px, both methods' shared parts: one step from the same state.
fn one_step<E: GpuFloat>(g: &Rc<Gpu>, seed: u64, rows: &mut Vec<Row>) -> Result<()>
where
    CudaBlas: Gemm<E>,
{
    let dt = dtype_name::<E>();
    let tol = step_tol::<E>();
    let cfg = LewelConfig::new(Arch::TINY, 4, 1.0, 0.5);
    let shape = Shape::new(&[8, 64, 64, 3]);
    let mut r = Rng::keyed(&[seed, 0x57e9]);
    // Views rounded to the dtype first, so the CPU sees the GPU's inputs.
    let mut views = || -> Vec<f32> {
        (0..shape.numel())
            .map(|_| E::from_f32(r.normal() as f32).to_f32())
            .collect()
    };
    let (v1, v2) = (views(), views());
    for method in [Method::LewelBEman, Method::LewelB] {
        let sc = StepConfig::recipe(method, 0.5, 0.99);
        let name = format!("whole step {} tiny 8x64", method.name());
        // Both from the same seed: the same initial state.
        let mut cpu = Lewel::new(cfg, seed);
        let mut gpu = GpuLewel::<E>::new(Lewel::new(cfg, seed), g.clone())?;
        let lc = cpu.forward_backward(&v1, &v2, shape, &sc);
        let lg = gpu.forward_backward(&v1, &v2, shape, &sc)?;
        rows.push(row(&name, dt, "loss", &[lg], &[lc], tol));
        let gg = gpu.g.download_grads()?;
        rows.push(row(&name, dt, "grads", &gg, &cpu.g.store.grads, tol));
        cpu.update(&sc);
        gpu.update(&sc)?;
        let h = gpu.sync_host()?;
        for (output, got, want) in [
            ("params", &h.g.store.params, &cpu.g.store.params),
            ("bn stats", &h.g.store.buffers, &cpu.g.store.buffers),
            ("target", &h.tg.store.params, &cpu.tg.store.params),
            ("momentum", &h.momentum, &cpu.momentum),
        ] {
            rows.push(row(&name, dt, output, got, want, tol));
        }
        let counters_match = h.tg.store.counters == cpu.tg.store.counters
            && h.g.store.counters == cpu.g.store.counters;
        let mut c = row(&name, dt, "counters", &[0.0], &[0.0], 0.0);
        if !counters_match {
            c.failure = "num_batches_tracked differs".into();
        }
        rows.push(c);
    }
    Ok(())
}

/// Three steps, twice, from the same state under --deterministic: every bit equal.
fn determinism<E: GpuFloat>(g: &Rc<Gpu>, seed: u64, rows: &mut Vec<Row>) -> Result<()>
where
    CudaBlas: Gemm<E>,
{
    assert!(
        g.deterministic,
        "determinism check needs a --deterministic GPU"
    );
    let cfg = LewelConfig::new(Arch::TINY, 4, 1.0, 0.5);
    let shape = Shape::new(&[8, 64, 64, 3]);
    let sc = StepConfig::recipe(Method::LewelBEman, 0.5, 0.99);
    let run = || -> Result<(Vec<f32>, Vec<f32>)> {
        let mut m = GpuLewel::<E>::new(Lewel::new(cfg, seed), g.clone())?;
        let mut r = Rng::keyed(&[seed, 0xde7]);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let v1: Vec<f32> = (0..shape.numel()).map(|_| r.normal() as f32).collect();
            let v2: Vec<f32> = (0..shape.numel()).map(|_| r.normal() as f32).collect();
            losses.push(m.forward_backward(&v1, &v2, shape, &sc)?);
            m.update(&sc)?;
        }
        let h = m.sync_host()?;
        let mut all = h.g.store.params.clone();
        all.extend(&h.g.store.buffers);
        all.extend(&h.tg.store.params);
        all.extend(&h.momentum);
        Ok((losses, all))
    };
    let (l1, a1) = run()?;
    let (l2, a2) = run()?;
    let differing = a1
        .iter()
        .zip(&a2)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count()
        + l1.iter()
            .zip(&l2)
            .filter(|(x, y)| x.to_bits() != y.to_bits())
            .count();
    rows.push(Row {
        op: "deterministic rerun, 3 steps".into(),
        dtype: dtype_name::<E>(),
        output: "bits differing",
        nmse: differing as f64,
        tol: 0.0,
        failure: if differing == 0 {
            String::new()
        } else {
            format!("{differing} values differ between two identical runs")
        },
    });
    Ok(())
}

/// The built-in run (its defaults: tiny model, batch 64, 48 px synthetic views, the schedules)
/// for 20 steps on the CPU and on the GPU in bf16 with TF32: the loss curves must agree.
fn loss_curve(g: &Rc<Gpu>, rows: &mut Vec<Row>) -> Result<()> {
    let cfg = PretrainConfig::default().resolved();
    let (lc, mut sc) = cfg.validate()?;
    let mut cpu = Lewel::new(lc, cfg.seed);
    let mut gpu = GpuLewel::<half::bf16>::new(Lewel::new(lc, cfg.seed), g.clone())?;
    let (mut lcpu, mut lgpu) = (Vec::new(), Vec::new());
    let plan = crate::run::Plan::new(&cfg, crate::run::synthetic_iters(&cfg));
    for k in 0..20 {
        let (v1, v2, shape) = crate::run::views_for_step(&cfg, k);
        plan.set_step(&cfg, &mut sc, k);
        lcpu.push(cpu.forward_backward(&v1, &v2, shape, &sc));
        cpu.update(&sc);
        lgpu.push(gpu.forward_backward(&v1, &v2, shape, &sc)?);
        gpu.update(&sc)?;
    }
    // Per step relative difference; the row's number is the largest.
    let worst = lcpu
        .iter()
        .zip(&lgpu)
        .map(|(c, g)| ((c - g).abs() / c.abs().max(1e-6)) as f64)
        .fold(0.0, f64::max);
    let tol = 5e-2;
    let curve: Vec<String> = lcpu
        .iter()
        .zip(&lgpu)
        .map(|(c, g)| format!("{c:.4}/{g:.4}"))
        .collect();
    println!("loss curve cpu/gpu-bf16, steps 1-20: {}", curve.join(" "));
    rows.push(Row {
        op: "loss curve, 20 steps of the built-in run".into(),
        dtype: "bf16",
        output: "max rel diff",
        nmse: worst,
        tol,
        failure: if worst <= tol {
            String::new()
        } else {
            format!("a step's loss differs by {worst:.2e} (relative) > {tol:.0e}")
        },
    });
    Ok(())
}
