//! `lewel check`, the links after the ops: one whole LEWEL step of the small model on the GPU
//! against the CPU (f32 with TF32 off, and bf16), two GPU runs under --deterministic compared
//! bitwise, and the first 20 steps of the built-in run's loss curve, GPU bf16 against the CPU.

use super::Row;
use super::{Gpu, GpuFloat};
use crate::backend::Cuda;
use crate::error::Result;
use crate::memory::SizeTable;
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

/// On a failing row over a flat buffer, names the `k` tensors of `table` with the largest
/// squared error (their own NMSE and share of the error), appended to the failure text.
fn name_worst(mut r: Row, table: &SizeTable, got: &[f32], want: &[f32], k: usize) -> Row {
    if r.pass() || got.len() != want.len() || table.total != want.len() {
        return r;
    }
    let mut per: Vec<(f64, f64, &str)> = table
        .entries
        .iter()
        .map(|e| {
            let (mut num, mut den) = (0.0f64, 0.0f64);
            for (a, b) in got[e.range()].iter().zip(&want[e.range()]) {
                num += ((a - b) as f64).powi(2);
                den += (*b as f64).powi(2);
            }
            (num, den, e.name.as_str())
        })
        .collect();
    let total: f64 = per.iter().map(|p| p.0).sum::<f64>().max(1e-300);
    per.sort_by(|a, b| b.0.total_cmp(&a.0));
    let worst: Vec<String> = per
        .iter()
        .take(k)
        .filter(|p| p.0 > 0.0)
        .map(|(num, den, name)| {
            format!(
                "{name} {:.1e} ({:.0}%)",
                num / den.max(1e-30),
                100.0 * num / total
            )
        })
        .collect();
    r.failure += &format!("; worst: {}", worst.join(", "));
    r
}

fn dtype_name<E: GpuFloat>() -> &'static str {
    match E::DTYPE {
        crate::tensor::DType::F32 => "f32",
        crate::tensor::DType::BF16 => "bf16",
    }
}

/// Whole-step NMSE tolerances for what the forward pass decides alone (loss, BN statistics, the
/// EMA target, counters): f32 differs by summation order only, through a deep network; bf16
/// rounds every activation. The rows that follow the gradients use [`Floors`] as well.
fn step_tol<E: GpuFloat>() -> f64 {
    match E::DTYPE {
        crate::tensor::DType::F32 => 1e-8,
        crate::tensor::DType::BF16 => 2e-2,
    }
}

/// How far the GPU may be from the CPU, in units of the CPU reference's own error (NMSE).
const FLOOR_K: f64 = 10.0;

/// The same in units of relative difference (the loss curve): about sqrt(FLOOR_K).
const FLOOR_K_REL: f64 = 3.0;

/// Relative size of the perturbation that stands in for the dtype's rounding: bf16's unit
/// roundoff (2^-9).
const BF16_ROUNDING: f64 = 1.0 / 512.0;

/// The CPU reference's own error in the outputs that follow the gradients, as NMSE: how much
/// they change when the arithmetic changes at the dtype's precision and nothing else does.
///
/// Why: the gradients of a ReLU network are discontinuous in its activations. A forward pass
/// whose activations differ by a relative error e (summation order in f32, about 1e-4 after the
/// tiny ResNet's 50 batch-norm layers at init; rounding in bf16, tens of percent) flips about a
/// fraction e of the ReLU masks (and of max-pool choices), and each flip changes the gradient
/// of its element by its whole size. So the gradients' NMSE grows like e, not like e^2 as the
/// forward values' NMSE does: the CPU's f32 gradients of this step differ from the same step in
/// f64 by NMSE ~1e-4 (and by as much when the views change by one f32 ulp), and bf16 rounding
/// of the views alone leaves the CPU's gradients uncorrelated with themselves (NMSE ~2). A fixed
/// tolerance cannot tell a correct GPU from a wrong one here; a multiple of the floor can
/// (a gradient dropped, doubled or overwritten is an NMSE of 0.25 to 1 and more).
struct Floors {
    grads: f64,
    params: f64,
    momentum: f64,
}

impl Floors {
    /// f32: the CPU's f32 step against the same step computed in f64 (the update then applied in
    /// f32 to the f64 gradients). bf16: the CPU's step against the CPU's step from views changed
    /// by bf16's unit roundoff (the CPU has no bf16 arithmetic to compare with).
    fn measure<E: GpuFloat>(
        cfg: LewelConfig,
        seed: u64,
        (v1, v2, shape): (&[f32], &[f32], Shape),
        sc: &StepConfig,
        cpu: &Lewel,
        world: usize,
    ) -> Floors {
        let mut other = Lewel::new(cfg, seed);
        mirror_cpu(&mut other.g, &mut other.tg, world);
        match E::DTYPE {
            crate::tensor::DType::F32 => {
                let g64 = f64_grads(&other, v1, v2, shape, sc, world);
                other.g.store.grads = g64.iter().map(|&v| v as f32).collect();
            }
            crate::tensor::DType::BF16 => {
                let mut r = Rng::keyed(&[seed, 0xf100]);
                let mut perturb = |v: &[f32]| -> Vec<f32> {
                    v.iter()
                        .map(|&x| (x as f64 * (1.0 + BF16_ROUNDING * r.normal())) as f32)
                        .collect()
                };
                let (p1, p2) = (perturb(v1), perturb(v2));
                other
                    .forward_backward(&p1, &p2, shape, sc)
                    .expect("the CPU backend does not fail");
            }
        }
        let grads = nmse(&other.g.store.grads, &cpu.g.store.grads);
        other.update(sc).expect("the CPU backend does not fail");
        Floors {
            grads,
            params: nmse(&other.g.store.params, &cpu.g.store.params),
            momentum: nmse(&other.momentum, &cpu.momentum),
        }
    }
}

fn nmse(got: &[f32], want: &[f32]) -> f64 {
    let (mut num, mut den) = (0.0f64, 0.0f64);
    for (a, b) in got.iter().zip(want) {
        num += ((a - b) as f64).powi(2);
        den += (*b as f64).powi(2);
    }
    num / den.max(1e-30)
}

/// The gradients of one step of `m`'s current state in f64 (the CPU graph at f64, its target
/// too): the exact-arithmetic reference for the f32 floor.
fn f64_grads(
    m: &Lewel,
    v1: &[f32],
    v2: &[f32],
    shape: Shape,
    sc: &StepConfig,
    world: usize,
) -> Vec<f64> {
    use crate::backend::Cpu;
    use crate::graph::Graph;
    use crate::memory::ParamStore;
    let widen = |s: &ParamStore<f32>| ParamStore::<f64> {
        table: s.table.clone(),
        params: s.params.iter().map(|&v| v as f64).collect(),
        grads: vec![0.0; s.grads.len()],
        buffer_table: s.buffer_table.clone(),
        buffers: s.buffers.iter().map(|&v| v as f64).collect(),
        counters: s.counters.clone(),
    };
    let mut g = Graph::cpu(widen(&m.g.store));
    let mut tg = Graph::cpu(widen(&m.tg.store));
    mirror_cpu(&mut g, &mut tg, world);
    let (online_mode, target_mode) = sc.bn_modes();
    tg.set_recording(false);
    let wide = |v: &[f32]| -> Vec<f64> { v.iter().map(|&x| x as f64).collect() };
    let a = g.input(shape, &wide(v1));
    let b = g.input(shape, &wide(v2));
    let target = &m.target;
    let mut run_target = |v: crate::tensor::Tensor, og: &mut Graph<Cpu<f64>>| {
        tg.reset();
        let x = tg.input(v.shape, og.value(v));
        let (z, o) = target.forward(&mut tg, x, target_mode);
        (
            og.input(z.shape, tg.value(z)),
            og.input(o.shape, tg.value(o)),
        )
    };
    let loss = m.online.loss(&mut g, a, b, online_mode, &mut run_target);
    g.backward(loss).expect("the CPU backend does not fail");
    g.store.grads
}

/// SyncBN over `world` mirrored ranks (every statistic sum times `world`, as if each rank held
/// these rows; the gathered moments varied per rank, `mirror_parts`) on both CPU graphs of a
/// step; world 1: none.
fn mirror_cpu<T: crate::ops::Real + crate::backend::Elem>(
    g: &mut crate::graph::Graph<crate::backend::Cpu<T>>,
    tg: &mut crate::graph::Graph<crate::backend::Cpu<T>>,
    world: usize,
) {
    let sync = || -> Option<Rc<crate::ops::batchnorm::HostSync>> {
        Some(Rc::new(super::Mirrored(world, None)))
    };
    g.set_bn_sync(sync());
    tg.set_bn_sync(sync());
}

/// Runs every whole-step check; returns the rows. An error inside one check (out of memory, a
/// launch failure) becomes its failing row, and the others still run.
pub fn run_steps(g: &Rc<Gpu>, seed: u64) -> Result<Vec<Row>> {
    let mut rows = Vec::new();
    let guard = |rows: &mut Vec<Row>, op: &str, dtype: &'static str, r: Result<()>| {
        if let Err(e) = r {
            rows.push(Row::error(op, dtype, &e));
        }
    };
    let tf32 = g.tf32();
    g.set_tf32(false)?;
    let r = one_step::<f32>(g, seed, &mut rows);
    guard(&mut rows, "whole step", "f32", r);
    let r = one_step::<half::bf16>(g, seed, &mut rows);
    guard(&mut rows, "whole step", "bf16", r);
    g.set_tf32(tf32)?;
    let r = determinism::<half::bf16>(g, seed, &mut rows);
    guard(&mut rows, "deterministic rerun", "bf16", r);
    let r = determinism::<f32>(g, seed, &mut rows);
    guard(&mut rows, "deterministic rerun", "f32", r);
    let r = loss_curve(g, &mut rows);
    guard(&mut rows, "loss curve", "bf16", r);
    Ok(rows)
}

/// The most the activation-gradient pools may hold, as a share of every slot keeping its own
/// gradient (the row "grad memory"): the small model at 8x64 measured 8.2% (1.27 of 15.62 MiB in
/// f32); every gradient kept for the whole step would read 100%.
const GRAD_MEMORY_SHARE: f64 = 0.2;

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
    // LEWEL-B once more with SyncBN over two mirrored ranks: the GPU's sum, all-reduce and count
    // path through every BN of both networks, forward and backward, against the CPU's.
    for (method, world) in [
        (Method::LewelBEman, 1),
        (Method::LewelB, 1),
        (Method::LewelB, 2),
    ] {
        let sc = StepConfig::recipe(method, 0.5, 0.99);
        let name = match world {
            1 => format!("whole step {} tiny 8x64", method.name()),
            _ => format!(
                "whole step {} syncbn(x{world} mirrored) tiny 8x64",
                method.name()
            ),
        };
        // Both from the same seed: the same initial state.
        let mut cpu = Lewel::new(cfg, seed);
        let mut gpu = Lewel::new(cfg, seed).to_device(Cuda::<E>::new(g.clone()))?;
        mirror_cpu(&mut cpu.g, &mut cpu.tg, world);
        if world > 1 {
            let sync = || -> Option<Rc<crate::ops::batchnorm::DevSync>> {
                Some(Rc::new(super::Mirrored(world, Some(g.stream.clone()))))
            };
            gpu.g.set_bn_sync(sync());
            gpu.tg.set_bn_sync(sync());
        }
        let lc = cpu.forward_backward(&v1, &v2, shape, &sc)?;
        let lg = gpu.forward_backward(&v1, &v2, shape, &sc)?;
        rows.push(row(&name, dt, "loss", &[lg], &[lc], tol));
        // Activation gradients are lent only while backward needs them: what the pools hold
        // against what every slot keeping its own would take.
        let (held, all) = gpu.g.grad_bytes();
        println!(
            "{name} {dt}: activation gradients hold {:.2} MiB where keeping all would take {:.2} MiB",
            held as f64 / 1048576.0,
            all as f64 / 1048576.0
        );
        let mut m = row(&name, dt, "grad memory", &[0.0], &[0.0], GRAD_MEMORY_SHARE);
        m.nmse = held as f64 / all.max(1) as f64;
        if m.nmse > GRAD_MEMORY_SHARE {
            m.failure = format!(
                "activation gradients hold {held} bytes, {:.0}% of keeping all ({all})",
                100.0 * m.nmse
            );
        }
        rows.push(m);
        let gg = gpu.g.download_grads()?;
        let (table, btable) = (cpu.g.store.table.clone(), cpu.g.store.buffer_table.clone());
        let ttable = cpu.tg.store.table.clone();
        cpu.update(&sc)?;
        let floors = Floors::measure::<E>(cfg, seed, (&v1, &v2, shape), &sc, &cpu, world);
        println!(
            "{name} {dt}: the CPU reference's own error (NMSE, {}): grads {:.2e}, params {:.2e}, \
             momentum {:.2e}; the GPU may differ by {FLOOR_K} times that",
            match E::DTYPE {
                crate::tensor::DType::F32 => "f32 against f64",
                crate::tensor::DType::BF16 => "views changed by bf16's unit roundoff",
            },
            floors.grads,
            floors.params,
            floors.momentum
        );
        // `cpu.update` leaves the gradients as they were.
        let grads_tol = tol.max(FLOOR_K * floors.grads);
        let r = row(&name, dt, "grads", &gg, &cpu.g.store.grads, grads_tol);
        rows.push(name_worst(r, &table, &gg, &cpu.g.store.grads, 4));
        gpu.update(&sc)?;
        let h = gpu.host()?;
        for (output, got, want, t, floor) in [
            (
                "params",
                &h.online.params[..],
                &cpu.g.store.params[..],
                &table,
                floors.params,
            ),
            (
                "bn stats",
                &h.online.buffers[..],
                &cpu.g.store.buffers[..],
                &btable,
                0.0,
            ),
            (
                "target",
                &h.target.params[..],
                &cpu.tg.store.params[..],
                &ttable,
                0.0,
            ),
            (
                "momentum",
                h.momentum,
                &cpu.momentum[..],
                &table,
                floors.momentum,
            ),
        ] {
            let r = row(&name, dt, output, got, want, tol.max(FLOOR_K * floor));
            rows.push(name_worst(r, t, got, want, 4));
        }
        let counters_match =
            h.target.counters == cpu.tg.store.counters && h.online.counters == cpu.g.store.counters;
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
        let mut m = Lewel::new(cfg, seed).to_device(Cuda::<E>::new(g.clone()))?;
        let mut r = Rng::keyed(&[seed, 0xde7]);
        let mut losses = Vec::new();
        for _ in 0..3 {
            let v1: Vec<f32> = (0..shape.numel()).map(|_| r.normal() as f32).collect();
            let v2: Vec<f32> = (0..shape.numel()).map(|_| r.normal() as f32).collect();
            losses.push(m.forward_backward(&v1, &v2, shape, &sc)?);
            m.update(&sc)?;
        }
        let h = m.host()?;
        let mut all = h.online.params.clone();
        all.extend(&h.online.buffers);
        all.extend(&h.target.params);
        all.extend(h.momentum);
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
/// for 20 steps on the CPU and on the GPU in bf16 with TF32: the loss curves must agree as well
/// as the CPU's curve agrees with itself from views changed by bf16's unit roundoff (the
/// trajectories part as the gradients do, see [`Floors`]), and within 5% in any case.
fn loss_curve(g: &Rc<Gpu>, rows: &mut Vec<Row>) -> Result<()> {
    let cfg = PretrainConfig::default().resolved();
    let (lc, mut sc) = cfg.validate()?;
    let mut cpu = Lewel::new(lc, cfg.seed);
    let mut cpu_p = Lewel::new(lc, cfg.seed);
    let mut gpu = Lewel::new(lc, cfg.seed).to_device(Cuda::<half::bf16>::new(g.clone()))?;
    let (mut lcpu, mut lcpu_p, mut lgpu) = (Vec::new(), Vec::new(), Vec::new());
    let plan = crate::run::Plan::new(&cfg, crate::run::synthetic_iters(&cfg));
    let mut r = Rng::keyed(&[cfg.seed, 0xf101]);
    let mut perturb = |v: &[f32]| -> Vec<f32> {
        v.iter()
            .map(|&x| (x as f64 * (1.0 + BF16_ROUNDING * r.normal())) as f32)
            .collect()
    };
    for k in 0..20 {
        let (v1, v2, shape) = crate::run::views_for_step(&cfg, k);
        plan.set_step(&cfg, &mut sc, k);
        lcpu.push(cpu.forward_backward(&v1, &v2, shape, &sc)?);
        cpu.update(&sc)?;
        let (p1, p2) = (perturb(&v1), perturb(&v2));
        lcpu_p.push(cpu_p.forward_backward(&p1, &p2, shape, &sc)?);
        cpu_p.update(&sc)?;
        lgpu.push(gpu.forward_backward(&v1, &v2, shape, &sc)?);
        gpu.update(&sc)?;
    }
    // Per step relative difference; the row's number is the largest.
    let worst_of = |other: &[f32]| {
        lcpu.iter()
            .zip(other)
            .map(|(c, g)| ((c - g).abs() / c.abs().max(1e-6)) as f64)
            .fold(0.0, f64::max)
    };
    let (worst, floor) = (worst_of(&lgpu), worst_of(&lcpu_p));
    let tol = 5e-2f64.max(FLOOR_K_REL * floor);
    let curve: Vec<String> = lcpu
        .iter()
        .zip(&lcpu_p)
        .zip(&lgpu)
        .map(|((c, p), g)| format!("{c:.4}/{p:.4}/{g:.4}"))
        .collect();
    println!(
        "loss curve cpu/cpu-perturbed/gpu-bf16, steps 1-20: {}",
        curve.join(" ")
    );
    println!(
        "loss curve: the CPU against itself from views changed by bf16's unit roundoff: \
         max rel diff {floor:.2e}; the GPU may differ by {FLOOR_K_REL} times that (at least 5e-2)"
    );
    rows.push(Row {
        op: "loss curve, 20 steps of the built-in run".into(),
        dtype: "bf16",
        output: "max rel diff",
        nmse: worst,
        tol,
        failure: if worst <= tol {
            String::new()
        } else {
            format!("a step's loss differs by {worst:.2e} (relative) > {tol:.1e}")
        },
    });
    Ok(())
}
