//! `lewel profile`: where a LEWEL training step's time goes.
//!
//! Runs whole steps (online and target forward, the loss, backward, LARS and the EMA) on random
//! views after a warm-up, with the graphs' profilers on ([`Graph::set_profile`]): every node's
//! forward and backward on the host's monotonic clock, plus the optimizer (LARS + EMA) and the
//! whole step. Tables per node kind (`conv`, `conv backward`, ...) and per node (the graph, the
//! node's index in its forward pass and its kind: layer names are not at hand in the graph), and a
//! line putting the sum of the parts against the measured step. On a GPU the device is
//! synchronized at both ends of every node, which removes the overlap of asynchronous launches:
//! the step is slower than in training, and each node's time is its own work.
//!
//! `--trace FILE` writes Chrome / Perfetto trace events (`chrome://tracing`, ui.perfetto.dev): one
//! complete event ("ph": "X", microseconds) per node per step on its graph's thread (1 online,
//! 2 target, 3 optimizer) and one per step on thread 0.
//!
//! [`Graph::set_profile`]: crate::graph::Graph::set_profile

use crate::backend::Cuda;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::lewel::LewelConfig;
use crate::model::resnet::Arch;
use crate::rng::Rng;
use crate::tensor::Shape;
use crate::train::{Lewel, Method, StepConfig, TrainBackend, Trainer};
use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::time::Instant;

/// What `lewel profile` runs.
#[derive(Clone, Debug)]
pub struct ProfileConfig {
    pub device: DeviceChoice,
    pub arch: Arch,
    pub method: Method,
    pub batch_size: usize,
    pub image_size: usize,
    /// Measured steps.
    pub steps: usize,
    /// Steps run first and not measured (cuDNN's algorithm search, first-touch allocations).
    pub warmup: usize,
    pub seed: u64,
}

impl ProfileConfig {
    /// Bad values, one line each.
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            return Err(Error::user("--steps: at least 1"));
        }
        if self.batch_size < 2 {
            return Err(Error::user(format!(
                "--batch-size: at least 2 (batch norm), got {}",
                self.batch_size
            )));
        }
        if self.image_size < 32 {
            return Err(Error::user(format!(
                "--image-size: at least 32 (ResNet downsamples 32x), got {}",
                self.image_size
            )));
        }
        Ok(())
    }
}

/// Which thread of the trace a span sits on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Lane {
    Step = 0,
    Online = 1,
    Target = 2,
    Optimizer = 3,
}

impl Lane {
    pub fn name(self) -> &'static str {
        match self {
            Lane::Step => "step",
            Lane::Online => "online",
            Lane::Target => "target",
            Lane::Optimizer => "optimizer",
        }
    }
}

/// One timed span: a node's forward or backward, the optimizer, or a whole step. Times are
/// nanoseconds since the profile's start.
#[derive(Clone, Debug)]
pub struct Span {
    pub lane: Lane,
    /// The kind: `conv`, `conv backward`, ..., `optimizer (LARS + EMA)`, `step`.
    pub name: &'static str,
    /// The node's index in its graph's forward pass (0 for the optimizer and steps).
    pub index: usize,
    /// The measured step it belongs to, from 0.
    pub step: usize,
    pub start_ns: u64,
    pub dur_ns: u64,
}

/// A finished profile.
#[derive(Clone, Debug)]
pub struct Profile {
    /// The device in words (`cpu`, or the GPU with its precision).
    pub device: String,
    /// Whether the device was synchronized around every node (a GPU).
    pub synced: bool,
    pub cfg: ProfileConfig,
    pub spans: Vec<Span>,
}

/// A row of a table: a kind or a node, its time over all measured steps and its count.
#[derive(Clone, Debug)]
pub struct Row {
    pub lane: Lane,
    pub name: &'static str,
    pub index: Option<usize>,
    pub total_ns: u64,
    pub count: usize,
}

const OPTIMIZER: &str = "optimizer (LARS + EMA)";

/// Opens the device and runs the profile.
pub fn run(cfg: &ProfileConfig) -> Result<(Profile, Option<String>)> {
    cfg.validate()?;
    let lc = LewelConfig::new(cfg.arch, 4, 1.0, 0.5);
    let m = Lewel::new(lc, cfg.seed);
    let (gpu, bf16) = match open(cfg.device)? {
        (crate::run::Target::Cpu, note) => return Ok((profile(m, "cpu".into(), cfg)?, note)),
        (crate::run::Target::Gpu(g, bf16), _) => (g, bf16),
    };
    let name = gpu_words(&gpu, bf16);
    let p = if bf16 {
        profile(m.to_device(Cuda::<half::bf16>::new(gpu))?, name, cfg)?
    } else {
        profile(m.to_device(Cuda::<f32>::new(gpu))?, name, cfg)?
    };
    Ok((p, None))
}

/// Opens the device as `lewel pretrain --precision auto` opens it (bf16 from compute capability
/// 8.0): the target, and a note when `auto` fell back to the CPU. Shared with `lewel bench`.
pub(crate) fn open(device: DeviceChoice) -> Result<(crate::run::Target, Option<String>)> {
    let pc = crate::run::PretrainConfig {
        device: match device {
            DeviceChoice::Auto => "auto".into(),
            DeviceChoice::Cpu => "cpu".into(),
            DeviceChoice::Cuda(n) => format!("cuda:{n}"),
        },
        precision: "auto".into(),
        deterministic: false,
        ..Default::default()
    };
    crate::run::open_device(device, &pc)
}

/// A GPU in words, as the first line of `lewel profile` and `lewel bench` shows it.
pub(crate) fn gpu_words(gpu: &crate::gpu::Gpu, bf16: bool) -> String {
    format!(
        "{} (sm_{}{}) cuda:{} {}",
        gpu.name,
        gpu.cc.0,
        gpu.cc.1,
        gpu.ordinal,
        if bf16 { "bf16" } else { "f32" }
    )
}

/// Warm-up, then the measured steps with both graphs' profilers on.
fn profile<B: TrainBackend<F = f32>>(
    mut m: Trainer<B>,
    device: String,
    cfg: &ProfileConfig,
) -> Result<Profile> {
    let synced = m.g.dev.has_device_memory();
    let shape = Shape::new(&[cfg.batch_size, cfg.image_size, cfg.image_size, 3]);
    let mut r = Rng::keyed(&[cfg.seed, 0x9f0f]);
    let mut views = || -> Vec<f32> { (0..shape.numel()).map(|_| r.normal() as f32).collect() };
    let (v1, v2) = (views(), views());
    // A small learning rate: the weights stay near their init, so no step meets NaNs or denormals.
    let sc = StepConfig::recipe(cfg.method, 1e-3, 0.99);
    let t0 = Instant::now();
    let ns = |t: Instant| t.saturating_duration_since(t0).as_nanos() as u64;
    let mut spans = Vec::new();
    for s in 0..cfg.warmup + cfg.steps {
        let step = s.checked_sub(cfg.warmup);
        m.g.set_profile(step.is_some());
        m.tg.set_profile(step.is_some());
        m.g.dev.sync()?;
        let a = Instant::now();
        m.forward_backward(&v1, &v2, shape, &sc)?;
        m.g.dev.sync()?;
        let u = Instant::now();
        m.update(&sc)?;
        m.g.dev.sync()?;
        let b = Instant::now();
        let Some(step) = step else { continue };
        spans.push(Span {
            lane: Lane::Step,
            name: "step",
            index: 0,
            step,
            start_ns: ns(a),
            dur_ns: ns(b) - ns(a),
        });
        for (lane, times) in [
            (Lane::Online, m.g.take_profile()),
            (Lane::Target, m.tg.take_profile()),
        ] {
            spans.extend(times.into_iter().map(|t| Span {
                lane,
                name: t.name,
                index: t.index,
                step,
                start_ns: ns(t.start),
                dur_ns: ns(t.start + t.dur) - ns(t.start),
            }));
        }
        spans.push(Span {
            lane: Lane::Optimizer,
            name: OPTIMIZER,
            index: 0,
            step,
            start_ns: ns(u),
            dur_ns: ns(b) - ns(u),
        });
    }
    m.g.set_profile(false);
    m.tg.set_profile(false);
    Ok(Profile {
        device,
        synced,
        cfg: cfg.clone(),
        spans,
    })
}

impl Profile {
    /// Nanoseconds over all measured steps: (the steps, the graph nodes, the optimizer).
    pub fn totals(&self) -> (u64, u64, u64) {
        let sum = |f: &dyn Fn(Lane) -> bool| -> u64 {
            self.spans
                .iter()
                .filter(|s| f(s.lane))
                .map(|s| s.dur_ns)
                .sum()
        };
        (
            sum(&|l| l == Lane::Step),
            sum(&|l| l == Lane::Online || l == Lane::Target),
            sum(&|l| l == Lane::Optimizer),
        )
    }

    /// The parts (nodes and optimizer) over the measured step time.
    pub fn coverage(&self) -> f64 {
        let (step, nodes, opt) = self.totals();
        (nodes + opt) as f64 / step.max(1) as f64
    }

    /// Rows per kind (`by_node` false) or per node, largest first; the steps themselves are left
    /// out.
    pub fn rows(&self, by_node: bool) -> Vec<Row> {
        // (lane, kind, index) where per node; (None, kind, None) per kind -> (ns, count)
        type Key = (Option<Lane>, &'static str, Option<usize>);
        let mut m: BTreeMap<Key, (u64, usize)> = BTreeMap::new();
        for s in self.spans.iter().filter(|s| s.lane != Lane::Step) {
            let key = match by_node {
                true => (
                    Some(s.lane),
                    s.name,
                    (s.lane != Lane::Optimizer).then_some(s.index),
                ),
                false => (None, s.name, None),
            };
            let e = m.entry(key).or_default();
            e.0 += s.dur_ns;
            e.1 += 1;
        }
        let mut rows: Vec<Row> = m
            .into_iter()
            .map(|((lane, name, index), (total_ns, count))| Row {
                lane: lane.unwrap_or(Lane::Online),
                name,
                index,
                total_ns,
                count,
            })
            .collect();
        rows.sort_by_key(|r| std::cmp::Reverse(r.total_ns));
        rows
    }

    fn header(&self) -> String {
        let c = &self.cfg;
        format!(
            "lewel profile | {} | {} {} | batch {} x {} px | {} warm-up + {} measured steps",
            self.device,
            c.arch.name(),
            c.method.name(),
            c.batch_size,
            c.image_size,
            c.warmup,
            c.steps
        )
    }

    /// The human table; `top` node rows at most.
    pub fn table(&self, top: usize) -> String {
        use std::fmt::Write;
        let (step, nodes, opt) = self.totals();
        let n = self.cfg.steps as f64;
        let ms = |ns: u64| ns as f64 / 1e6 / n;
        let steps: Vec<f64> = self
            .spans
            .iter()
            .filter(|s| s.lane == Lane::Step)
            .map(|s| s.dur_ns as f64 / 1e6)
            .collect();
        let min = steps.iter().cloned().fold(f64::INFINITY, f64::min);
        let max = steps.iter().cloned().fold(0.0, f64::max);
        let mut o = String::new();
        let _ = writeln!(o, "{}", self.header());
        if self.synced {
            let _ = writeln!(
                o,
                "GPU times: the device is synchronized before and after every node (no overlap of launches), so steps run slower than in training"
            );
        }
        let _ = writeln!(
            o,
            "step {:.3} ms (mean of {}; min {min:.3}, max {max:.3})",
            ms(step),
            self.cfg.steps
        );
        let _ = writeln!(
            o,
            "per-node sum {:.3} ms + optimizer {:.3} ms = {:.3} ms per step: {:.1}% of the measured step (graph nodes alone {:.1}%; the rest: input copies, gradient zeroing, the clock)",
            ms(nodes),
            ms(opt),
            ms(nodes + opt),
            100.0 * self.coverage(),
            100.0 * nodes as f64 / step.max(1) as f64
        );
        let share = |ns: u64| 100.0 * ns as f64 / step.max(1) as f64;
        let _ = writeln!(
            o,
            "\n{:<28} {:>10} {:>10} {:>7} {:>7}",
            "kind", "total ms", "ms/step", "share", "count"
        );
        for r in self.rows(false) {
            let _ = writeln!(
                o,
                "{:<28} {:>10.3} {:>10.3} {:>6.1}% {:>7}",
                r.name,
                r.total_ns as f64 / 1e6,
                ms(r.total_ns),
                share(r.total_ns),
                r.count
            );
        }
        let rows = self.rows(true);
        let _ = writeln!(
            o,
            "\n{:<36} {:>10} {:>10} {:>7} {:>7}   (top {} of {} nodes; graph #index = the node's place in its forward pass)",
            "node",
            "total ms",
            "ms/step",
            "share",
            "count",
            top.min(rows.len()),
            rows.len()
        );
        for r in rows.iter().take(top) {
            let _ = writeln!(
                o,
                "{:<36} {:>10.3} {:>10.3} {:>6.1}% {:>7}",
                r.label(),
                r.total_ns as f64 / 1e6,
                ms(r.total_ns),
                share(r.total_ns),
                r.count
            );
        }
        o
    }

    /// The same as JSON: the settings, the steps, the sums and every row.
    pub fn json(&self) -> Value {
        let (step, nodes, opt) = self.totals();
        let n = self.cfg.steps as f64;
        let ms = |ns: u64| ns as f64 / 1e6;
        let share = |ns: u64| ns as f64 / step.max(1) as f64;
        let row = |r: &Row| {
            let mut v = json!({
                "kind": r.name,
                "total_ms": ms(r.total_ns),
                "ms_per_step": ms(r.total_ns) / n,
                "share": share(r.total_ns),
                "count": r.count,
            });
            if let Some(i) = r.index {
                v["graph"] = json!(r.lane.name());
                v["index"] = json!(i);
            }
            v
        };
        let c = &self.cfg;
        json!({
            "device": self.device,
            "synchronized_per_node": self.synced,
            "arch": c.arch.name(),
            "method": c.method.name(),
            "batch_size": c.batch_size,
            "image_size": c.image_size,
            "warmup": c.warmup,
            "steps": c.steps,
            "step_ms": self.spans.iter().filter(|s| s.lane == Lane::Step).map(|s| ms(s.dur_ns)).collect::<Vec<_>>(),
            "step_ms_mean": ms(step) / n,
            "nodes_ms_per_step": ms(nodes) / n,
            "optimizer_ms_per_step": ms(opt) / n,
            "coverage": self.coverage(),
            "kinds": self.rows(false).iter().map(row).collect::<Vec<_>>(),
            "nodes": self.rows(true).iter().map(row).collect::<Vec<_>>(),
        })
    }

    /// Chrome / Perfetto trace events, microseconds.
    pub fn trace(&self) -> Value {
        let us = |ns: u64| ns as f64 / 1e3;
        let events: Vec<Value> = self
            .spans
            .iter()
            .map(|s| {
                let name = match s.lane {
                    Lane::Step => format!("step {}", s.step),
                    Lane::Optimizer => s.name.to_string(),
                    _ => format!("{} #{}", s.name, s.index),
                };
                json!({
                    "name": name,
                    "cat": s.lane.name(),
                    "ph": "X",
                    "ts": us(s.start_ns),
                    "dur": us(s.dur_ns),
                    "pid": 1,
                    "tid": s.lane as u32,
                    "args": {"step": s.step, "kind": s.name, "index": s.index},
                })
            })
            .collect();
        json!({ "traceEvents": events, "displayTimeUnit": "ms" })
    }
}

impl Row {
    /// `online #12 conv backward`, or the kind alone.
    pub fn label(&self) -> String {
        match self.index {
            Some(i) => format!("{} #{i} {}", self.lane.name(), self.name),
            None => self.name.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeSet;

    fn tiny() -> ProfileConfig {
        ProfileConfig {
            device: DeviceChoice::Cpu,
            arch: Arch::TINY,
            method: Method::LewelBEman,
            batch_size: 4,
            image_size: 32,
            steps: 2,
            warmup: 1,
            seed: 0,
        }
    }

    #[test]
    fn profile_covers_the_step_and_every_node_kind() {
        let cfg = tiny();
        let (p, note) = run(&cfg).unwrap();
        assert!(note.is_none());
        let c = p.coverage();
        assert!((0.9..=1.1).contains(&c), "parts / step = {c}");
        // Every kind the step's tapes hold, forward and backward, appears; and only those.
        let mut m = Lewel::new(LewelConfig::new(cfg.arch, 4, 1.0, 0.5), 0);
        let shape = Shape::new(&[4, 32, 32, 3]);
        let v = vec![0.5f32; shape.numel()];
        let sc = StepConfig::recipe(cfg.method, 1e-3, 0.99);
        m.forward_backward(&v, &v, shape, &sc).unwrap();
        let mut want: BTreeSet<&str> = BTreeSet::from([OPTIMIZER]);
        for n in m.g.tape() {
            want.insert(n.name());
            want.insert(n.backward_name());
        }
        let got: BTreeSet<&str> = p.rows(false).iter().map(|r| r.name).collect();
        assert_eq!(got, want);
        for k in [
            "conv",
            "batchnorm",
            "linear",
            "conv backward",
            "batchnorm backward",
        ] {
            assert!(got.contains(k), "{k}");
        }
        // Node rows per step: the same count each step.
        for r in p.rows(true) {
            assert_eq!(r.count % cfg.steps, 0, "{}", r.label());
        }
        let text = p.table(10);
        assert!(text.contains("% of the measured step"), "{text}");
        let j = p.json();
        assert_eq!(j["kinds"].as_array().unwrap().len(), want.len());
    }

    #[test]
    fn trace_is_trace_events_nested_in_their_steps() {
        let (p, _) = run(&tiny()).unwrap();
        let text = serde_json::to_string(&p.trace()).unwrap();
        let v: Value = serde_json::from_str(&text).unwrap();
        let ev = v["traceEvents"].as_array().unwrap();
        let mut steps = BTreeMap::new();
        for e in ev {
            for k in ["name", "ph", "ts", "dur", "pid", "tid"] {
                assert!(e.get(k).is_some(), "{k} missing in {e}");
            }
            assert_eq!(e["ph"], "X");
            assert!(e["dur"].as_f64().unwrap() >= 0.0);
            if e["cat"] == "step" {
                let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
                steps.insert(e["args"]["step"].as_u64().unwrap(), (ts, ts + dur));
            }
        }
        assert_eq!(steps.len(), 2);
        let mut per_step = [0usize; 2];
        for e in ev.iter().filter(|e| e["cat"] != "step") {
            let s = e["args"]["step"].as_u64().unwrap();
            let (a, b) = steps[&s];
            let (ts, dur) = (e["ts"].as_f64().unwrap(), e["dur"].as_f64().unwrap());
            assert!(
                ts >= a - 1e-3 && ts + dur <= b + 1e-3,
                "{e} outside step {s}"
            );
            per_step[s as usize] += 1;
        }
        assert_eq!(per_step[0], per_step[1]);
        assert!(per_step[0] > 50);
    }

    #[test]
    fn bad_values_are_user_errors() {
        for cfg in [
            ProfileConfig { steps: 0, ..tiny() },
            ProfileConfig {
                batch_size: 1,
                ..tiny()
            },
            ProfileConfig {
                image_size: 16,
                ..tiny()
            },
        ] {
            let e = cfg.validate().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
    }
}
