//! `lewel bench`: whole LEWEL training steps per second, the figure to put beside PyTorch's
//! (`scripts/bench-vs-pytorch.sh`, `tests/parity/bench_step.py`).
//!
//! A step is what `lewel pretrain` runs per iteration: online and target forward of both views,
//! the loss, backward, LARS and the EMA, then the loss read back. It is timed on the host's
//! monotonic clock from a synchronized device to a synchronized device, so on a GPU it is the
//! step's whole time with its launches overlapping as in training (no per-node syncs, unlike
//! `lewel profile`). An image is one sample of the batch (its two views together):
//! images/s = batch / the median step.
//!
//! `--data none` (the default) times the model alone: two random views are drawn once, before the
//! clock. `--data builtin` draws each step's views inside the timed step the way `lewel pretrain`
//! does on the built-in synthetic set ([`crate::run::views_for_step`]: the epoch's shuffle, the
//! procedural images, the two-view augmentation on the rayon pool), so data time is included; its
//! share is reported per step.
//!
//! Peak memory: on the CPU the process's resident high-water mark (VmHWM of /proc/self/status,
//! the whole process since its start); on a GPU the trainer's own device allocations (weights,
//! gradients, LARS momentum and the graphs' slot arenas, which only grow: their high-water mark)
//! plus the cuDNN workspace, with the device's used memory (total - free, the CUDA context and
//! other processes included) beside it.

use crate::backend::Cuda;
use crate::device::DeviceChoice;
use crate::error::{Error, Result};
use crate::model::lewel::LewelConfig;
use crate::model::resnet::Arch;
use crate::profile::{gpu_words, open, ProfileConfig};
use crate::rng::Rng;
use crate::run::{PretrainConfig, Target};
use crate::tensor::Shape;
use crate::train::{Lewel, Method, StepConfig, TrainBackend, Trainer};
use serde_json::{json, Value};
use std::time::Instant;

/// Where each step's views come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BenchData {
    /// Random views drawn once before the clock: data time excluded.
    None,
    /// The built-in synthetic set through pretrain's augmentation, inside the timed step.
    Builtin,
}

impl BenchData {
    pub fn name(self) -> &'static str {
        match self {
            BenchData::None => "none",
            BenchData::Builtin => "builtin",
        }
    }
}

impl std::str::FromStr for BenchData {
    type Err = Error;
    fn from_str(s: &str) -> Result<BenchData> {
        match s {
            "none" => Ok(BenchData::None),
            "builtin" => Ok(BenchData::Builtin),
            _ => Err(Error::user(format!("--data: none or builtin, got {s:?}"))),
        }
    }
}

/// What `lewel bench` runs.
#[derive(Clone, Debug)]
pub struct BenchConfig {
    pub device: DeviceChoice,
    pub arch: Arch,
    pub method: Method,
    pub batch_size: usize,
    pub image_size: usize,
    /// Measured steps.
    pub steps: usize,
    /// Steps run first and not measured.
    pub warmup: usize,
    pub seed: u64,
    pub data: BenchData,
}

impl BenchConfig {
    /// Bad values, one line each: those of `lewel profile`, and the built-in set's largest view.
    pub fn validate(&self) -> Result<()> {
        ProfileConfig {
            device: self.device,
            arch: self.arch,
            method: self.method,
            batch_size: self.batch_size,
            image_size: self.image_size,
            steps: self.steps,
            warmup: self.warmup,
            seed: self.seed,
        }
        .validate()?;
        let max = crate::run::SOURCE_SIZE;
        if self.data == BenchData::Builtin && self.image_size > max {
            return Err(Error::user(format!(
                "--image-size: at most {max} with --data builtin (the built-in images' side), got {}",
                self.image_size
            )));
        }
        Ok(())
    }

    /// The built-in run's config whose step k `views_for_step` draws: this batch, size and seed.
    fn pretrain(&self) -> PretrainConfig {
        let d = PretrainConfig::default();
        PretrainConfig {
            batch_size: self.batch_size,
            image_size: Some(self.image_size),
            seed: self.seed,
            train_len: d.train_len.max(self.batch_size),
            ..d
        }
    }
}

/// A finished benchmark.
#[derive(Clone, Debug)]
pub struct Bench {
    pub cfg: BenchConfig,
    /// The device in words, as `lewel profile` shows it.
    pub device: String,
    /// Threads of the rayon pool (the CPU engine's kernels, the augmentation).
    pub threads: usize,
    /// Seconds of each measured step.
    pub step_s: Vec<f64>,
    /// Seconds spent drawing the views inside each measured step (`--data builtin`; else empty).
    pub data_s: Vec<f64>,
    /// The last step's loss.
    pub loss: f32,
    /// Peak memory in bytes (see the module's notes); none where it cannot be read.
    pub peak_bytes: Option<u64>,
    /// What `peak_bytes` counts.
    pub peak_what: &'static str,
    /// On a GPU: the device's used memory at the end (total - free).
    pub device_used_bytes: Option<u64>,
}

/// Opens the device and runs the benchmark. Out of GPU memory is a one-line error naming the batch
/// size tried and the memory free.
pub fn run(cfg: &BenchConfig) -> Result<(Bench, Option<String>)> {
    cfg.validate()?;
    let m = Lewel::new(LewelConfig::new(cfg.arch, 4, 1.0, 0.5), cfg.seed);
    let (gpu, bf16) = match open(cfg.device)? {
        (Target::Cpu, note) => {
            let mut m = m;
            let mut b = bench_steps(&mut m, "cpu".into(), cfg)?;
            b.peak_bytes = vm_hwm();
            b.peak_what = "process VmHWM";
            return Ok((b, note));
        }
        (Target::Gpu(g, bf16), _) => (g, bf16),
    };
    let name = gpu_words(&gpu, bf16);
    let batch = cfg.batch_size;
    let (mut b, trainer_bytes) = if bf16 {
        let m = m
            .to_device(Cuda::<half::bf16>::new(gpu.clone()))
            .map_err(|e| crate::run::oom(e, batch))?;
        bench_gpu(m, name, cfg)?
    } else {
        let m = m
            .to_device(Cuda::<f32>::new(gpu.clone()))
            .map_err(|e| crate::run::oom(e, batch))?;
        bench_gpu(m, name, cfg)?
    };
    let workspace = gpu.workspace.borrow().as_ref().map_or(0, |w| w.len());
    b.peak_bytes = Some((trainer_bytes + workspace) as u64);
    b.peak_what =
        "trainer's device allocations (weights, optimizer, graph arenas) + cuDNN workspace";
    b.device_used_bytes = gpu.ctx.mem_get_info().ok().map(|(f, t)| (t - f) as u64);
    Ok((b, None))
}

/// `bench_steps` on a GPU, with the trainer's device bytes at the end; out of memory names the
/// batch tried and the memory free.
fn bench_gpu<B: TrainBackend<F = f32>>(
    mut m: Trainer<B>,
    device: String,
    cfg: &BenchConfig,
) -> Result<(Bench, usize)> {
    let b = bench_steps(&mut m, device, cfg).map_err(|e| crate::run::oom(e, cfg.batch_size))?;
    Ok((b, m.device_bytes()))
}

/// Warm-up, then the measured steps, each from a synchronized device to a synchronized device.
fn bench_steps<B: TrainBackend<F = f32>>(
    m: &mut Trainer<B>,
    device: String,
    cfg: &BenchConfig,
) -> Result<Bench> {
    let shape = Shape::new(&[cfg.batch_size, cfg.image_size, cfg.image_size, 3]);
    // The same random views as `lewel profile`, drawn once (used with --data none).
    let fixed = match cfg.data {
        BenchData::None => {
            let mut r = Rng::keyed(&[cfg.seed, 0x9f0f]);
            let mut views =
                || -> Vec<f32> { (0..shape.numel()).map(|_| r.normal() as f32).collect() };
            Some((views(), views()))
        }
        BenchData::Builtin => None,
    };
    let pc = cfg.pretrain();
    // A small learning rate: the weights stay near their init, so no step meets NaNs or denormals.
    let sc = StepConfig::recipe(cfg.method, 1e-3, 0.99);
    let (mut step_s, mut data_s) = (Vec::new(), Vec::new());
    let mut loss = f32::NAN;
    for s in 0..cfg.warmup + cfg.steps {
        m.g.dev.sync()?;
        let t = Instant::now();
        let data = match &fixed {
            Some((v1, v2)) => {
                m.queue_forward_backward(v1, v2, shape, &sc)?;
                0.0
            }
            None => {
                let (v1, v2, sh) = crate::run::views_for_step(&pc, s);
                let d = t.elapsed().as_secs_f64();
                m.queue_forward_backward(&v1, &v2, sh, &sc)?;
                d
            }
        };
        m.update(&sc)?;
        loss = m.take_loss()?.0;
        m.g.dev.sync()?;
        let dt = t.elapsed().as_secs_f64();
        if s >= cfg.warmup {
            step_s.push(dt);
            if fixed.is_none() {
                data_s.push(data);
            }
        }
    }
    Ok(Bench {
        cfg: cfg.clone(),
        device,
        threads: rayon::current_num_threads(),
        step_s,
        data_s,
        loss,
        peak_bytes: None,
        peak_what: "",
        device_used_bytes: None,
    })
}

/// The process's resident high-water mark in bytes (Linux), none elsewhere.
fn vm_hwm() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = s.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kb: u64 = line
        .trim_start_matches("VmHWM:")
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    Some(kb * 1024)
}

/// The median (the mean of the two middle values of an even count, as Python's
/// `statistics.median`); NaN for none.
pub fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => s[n / 2],
        n => (s[n / 2 - 1] + s[n / 2]) / 2.0,
    }
}

impl Bench {
    pub fn median_s(&self) -> f64 {
        median(&self.step_s)
    }

    pub fn min_s(&self) -> f64 {
        self.step_s.iter().cloned().fold(f64::INFINITY, f64::min)
    }

    pub fn max_s(&self) -> f64 {
        self.step_s.iter().cloned().fold(0.0, f64::max)
    }

    /// Samples (each with its two views) per second of the median step.
    pub fn images_per_s(&self) -> f64 {
        self.cfg.batch_size as f64 / self.median_s()
    }

    /// A few lines for people.
    pub fn text(&self) -> String {
        let c = &self.cfg;
        let data = match c.data {
            BenchData::None => "data none (random views drawn once, not timed)".to_string(),
            BenchData::Builtin => format!(
                "data builtin (synthetic views drawn in each step: median {:.3} s of it)",
                median(&self.data_s)
            ),
        };
        let mem = match self.peak_bytes {
            Some(b) => format!("{:.1} MiB ({})", b as f64 / 1048576.0, self.peak_what),
            None => "unknown".into(),
        };
        let used = self.device_used_bytes.map_or(String::new(), |b| {
            format!(
                "; device memory used at the end {:.1} MiB",
                b as f64 / 1048576.0
            )
        });
        let steps: Vec<String> = self.step_s.iter().map(|s| format!("{s:.3}")).collect();
        format!(
            "lewel bench | {} | {} threads | {} {} | batch {} x {} px | {} | {} warm-up + {} measured steps\n\
             {:.2} images/s (an image = one sample, its two views): median step {:.3} s (min {:.3}, max {:.3})\n\
             steps (s): {}\n\
             peak memory {mem}{used} | last loss {:.4}",
            self.device,
            self.threads,
            c.arch.name(),
            c.method.name(),
            c.batch_size,
            c.image_size,
            data,
            c.warmup,
            c.steps,
            self.images_per_s(),
            self.median_s(),
            self.min_s(),
            self.max_s(),
            steps.join(" "),
            self.loss
        )
    }

    /// One JSON object (the keys `tests/parity/bench_step.py` prints, and more).
    pub fn json(&self) -> Value {
        let c = &self.cfg;
        let mut v = json!({
            "engine": format!("lewel {}", env!("CARGO_PKG_VERSION")),
            "device": self.device,
            "threads": self.threads,
            "arch": c.arch.name(),
            "method": c.method.name(),
            "batch": c.batch_size,
            "size": c.image_size,
            "data": c.data.name(),
            "warmup": c.warmup,
            "steps": c.steps,
            "seed": c.seed,
            "step_s": self.step_s,
            "median_s": self.median_s(),
            "min_s": self.min_s(),
            "max_s": self.max_s(),
            "images_per_s": self.images_per_s(),
            "peak_bytes": self.peak_bytes,
            "peak_what": self.peak_what,
            "loss": self.loss,
        });
        if c.data == BenchData::Builtin {
            v["data_s"] = json!(self.data_s);
        }
        if let Some(b) = self.device_used_bytes {
            v["device_used_bytes"] = json!(b);
        }
        v
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny(data: BenchData) -> BenchConfig {
        BenchConfig {
            device: DeviceChoice::Cpu,
            arch: Arch::TINY,
            method: Method::LewelBEman,
            batch_size: 4,
            image_size: 32,
            steps: 2,
            warmup: 0,
            seed: 0,
            data,
        }
    }

    #[test]
    fn median_of_odd_and_even_counts() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn bad_values_are_user_errors() {
        let b = tiny(BenchData::Builtin);
        for cfg in [
            BenchConfig {
                steps: 0,
                ..b.clone()
            },
            BenchConfig {
                batch_size: 1,
                ..b.clone()
            },
            BenchConfig {
                image_size: 16,
                ..b.clone()
            },
            BenchConfig {
                image_size: 96,
                ..b.clone()
            },
        ] {
            let e = cfg.validate().unwrap_err();
            assert_eq!(e.exit_code(), 2, "{e}");
        }
        assert!(BenchConfig {
            image_size: 96,
            ..tiny(BenchData::None)
        }
        .validate()
        .is_ok());
        assert_eq!("x".parse::<BenchData>().unwrap_err().exit_code(), 2);
    }

    /// With the built-in data, the timed steps train on pretrain's views of the same steps: the
    /// loss equals that of a trainer fed `views_for_step` directly.
    #[test]
    fn builtin_steps_train_on_pretrains_views() {
        let cfg = tiny(BenchData::Builtin);
        let (b, _) = run(&cfg).unwrap();
        assert_eq!(b.step_s.len(), 2);
        assert_eq!(b.data_s.len(), 2);
        let mut m = Lewel::new(LewelConfig::new(cfg.arch, 4, 1.0, 0.5), cfg.seed);
        let sc = StepConfig::recipe(cfg.method, 1e-3, 0.99);
        let mut loss = 0.0;
        for k in 0..2 {
            let (v1, v2, sh) = crate::run::views_for_step(&cfg.pretrain(), k);
            loss = m.forward_backward(&v1, &v2, sh, &sc).unwrap();
            m.update(&sc).unwrap();
        }
        assert_eq!(b.loss, loss);
    }
}
