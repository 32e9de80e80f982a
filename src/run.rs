//! `lewel pretrain`: the whole run. Config (flags or a TOML file, the effective one written into the
//! run folder), the data, the LEWEL iteration of train.rs once per batch with the schedules of
//! optim.rs, a progress bar on a terminal (plain lines otherwise), one grep-able line per logged step,
//! JSONL metrics, the kNN monitor at init and after every epoch, checkpoints after every epoch
//! (atomic; a manifest written last names the files and their CRC32), and exact resume.
//!
//! Resume is exact because nothing random is carried in generator state: every draw (data order,
//! augmentation) is a pure function of (seed, epoch, sample, view), the schedules are functions of the
//! iteration, and the checkpoint holds the weights, BN statistics, counters and LARS momentum.

use crate::checkpoint::{self, Owned, Tensors};
use crate::data::augment;
use crate::data::loader::{Batch, Loader, LoaderConfig, Samples};
use crate::data::synthetic::{Split, Synthetic, CLASSES};
use crate::data::{pil, transforms};
use crate::device::{self, Device, DeviceChoice};
use crate::error::{Context, Error, Result};
use crate::eval::knn;
use crate::gpu::augment::AugParams;
use crate::gpu::train::GpuLewel;
use crate::gpu::Gpu;
use crate::model::lewel::LewelConfig;
use crate::model::resnet::Arch;
use crate::optim::{self, ExcludeRule, LarsConfig};
use crate::rng::Rng;
use crate::tensor::Shape;
use crate::train::{Lewel, Method, StepConfig};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::rc::Rc;
use std::sync::Arc;
use std::time::Instant;

/// Everything that defines a run. Flags and the TOML file use the same names (the file with
/// underscores: `batch_size = 64`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PretrainConfig {
    pub arch: String,
    pub method: String,
    pub epochs: usize,
    pub warmup_epochs: usize,
    /// Total batch per iteration.
    pub batch_size: usize,
    /// Absolute learning rate for the total batch.
    pub lr: f64,
    pub wd: f64,
    /// Initial EMA momentum m0.
    pub enc_m: f64,
    pub lewel_num_heads: usize,
    pub lewel_loss_weight: f64,
    pub lewel_scale: f32,
    /// current or released-log.
    pub lars_exclude: String,
    /// Samples per BN statistics group (per-GPU batch emulation); 0: the whole batch.
    pub bn_group: usize,
    pub seed: u64,
    pub device: String,
    /// Storage dtype of activations on the GPU: auto (bf16 on a GPU, f32 on the CPU), f32 or bf16.
    pub precision: String,
    /// Only deterministic cuDNN algorithms: a rerun is bitwise identical on the same GPU.
    pub deterministic: bool,
    /// Side of the training views in pixels; 0: 48 on the synthetic set, 224 on real data.
    pub image_size: usize,
    pub train_len: usize,
    pub val_len: usize,
    pub knn_k: usize,
    /// Memory images of the kNN monitor: the first this many of the training split (labels are
    /// read only by the monitor); 0: the whole training split.
    pub knn_memory: usize,
    pub log_every: usize,
    /// Checkpoints kept (the newest ones).
    pub keep: usize,
    pub out: PathBuf,
    /// Training images: an ImageFolder root (or its parent holding train/) or a packed file;
    /// none: the built-in synthetic dataset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub data: Option<PathBuf>,
    /// Labeled images of the kNN monitor (ImageFolder or packed); default: the val/ folder beside
    /// the data's train/, when there is one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub val_data: Option<PathBuf>,
    /// kNN monitor on real data: the first this many images per class of the val set are the
    /// memory, the first `knn_query_per_class` the queries (LEWEL_SPEC 10: 5 and 25).
    pub knn_memory_per_class: usize,
    pub knn_query_per_class: usize,
    /// Threads decoding and augmenting real data; 0: one per core.
    pub loader_threads: usize,
    /// Stop when more than this fraction of the samples read could not be decoded.
    pub max_bad: f64,
    /// JPEG decoder: zune (pure Rust) or libjpeg-turbo (PIL's exact pixels; loaded at run time).
    pub jpeg_decoder: String,
    /// On a GPU, the loader writes the crops into page-locked host memory (uploads are queued
    /// DMAs, not staged by the driver).
    pub pin_memory: bool,
}

/// The defaults are the built-in synthetic run, tuned to show learning in a few minutes on 2 CPU
/// cores (kNN accuracy at init and after 12 epochs: see the README). The LEWEL recipe values differ
/// where a 12-epoch run needs it: m0 0.9 (0.98-0.996 in the scripts: a 744-step run needs a target
/// that follows faster) and lr 1.0 for batch 64. Set them from the recipe for real runs. Batch 64
/// rather than 32: at 32, seed 1's loss fell toward collapse after epoch 3 and its kNN accuracy
/// from 59% to 51% (+11.6 at the end); at 64 no seed collapsed (README).
impl Default for PretrainConfig {
    fn default() -> Self {
        PretrainConfig {
            arch: "tiny".into(),
            method: "lewel-b-eman".into(),
            epochs: 12,
            warmup_epochs: 2,
            batch_size: 64,
            lr: 1.0,
            wd: 1.5e-6,
            enc_m: 0.9,
            lewel_num_heads: 4,
            lewel_loss_weight: 0.5,
            lewel_scale: 1.0,
            lars_exclude: "current".into(),
            bn_group: 0,
            seed: 0,
            device: "auto".into(),
            precision: "auto".into(),
            deterministic: false,
            image_size: 0,
            train_len: 4000,
            val_len: 1000,
            knn_k: 20,
            knn_memory: 500,
            log_every: 25,
            keep: 2,
            out: PathBuf::from("runs/lewel"),
            data: None,
            val_data: None,
            knn_memory_per_class: 5,
            knn_query_per_class: 25,
            loader_threads: 0,
            max_bad: 0.01,
            jpeg_decoder: "zune".into(),
            pin_memory: true,
        }
    }
}

/// Side of the rendered synthetic images the views are cropped from.
const SOURCE_SIZE: usize = 80;

impl PretrainConfig {
    /// Reads a TOML config; unknown keys are errors naming the file.
    pub fn from_toml(path: &Path) -> Result<PretrainConfig> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        toml::from_str(&text).map_err(|e| {
            let line = e
                .span()
                .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
            Error::user(format!("{} line {line}: {}", path.display(), e.message()))
        })
    }

    /// The config with its automatic values made explicit (as written into the run folder).
    pub fn resolved(&self) -> PretrainConfig {
        let mut c = self.clone();
        if c.image_size == 0 {
            c.image_size = if c.data.is_some() { 224 } else { 48 };
        }
        c
    }

    /// Checks every value (automatic ones resolved first); one line naming the flag on error.
    pub fn validate(&self) -> Result<(LewelConfig, StepConfig)> {
        self.resolved().check()
    }

    fn check(&self) -> Result<(LewelConfig, StepConfig)> {
        let bad = |flag: &str, what: String| Err(Error::user(format!("--{flag}: {what}")));
        let arch: Arch = self.arch.parse()?;
        let method: Method = self.method.parse()?;
        self.jpeg_decoder
            .parse::<crate::data::decode::JpegDecoder>()?;
        let finite_pos = |v: f64| v.is_finite() && v > 0.0;
        if !finite_pos(self.lr) {
            return bad("lr", format!("must be a positive number, got {}", self.lr));
        }
        if !(self.wd.is_finite() && self.wd >= 0.0) {
            return bad(
                "wd",
                format!("must be a non-negative number, got {}", self.wd),
            );
        }
        if !(0.0..1.0).contains(&self.enc_m) {
            return bad("enc-m", format!("must lie in [0, 1), got {}", self.enc_m));
        }
        if !["auto", "f32", "bf16"].contains(&self.precision.as_str()) {
            return bad(
                "precision",
                format!("expected auto, f32 or bf16, got '{}'", self.precision),
            );
        }
        if self.epochs == 0 {
            return bad("epochs", "must be at least 1, got 0".into());
        }
        if self.warmup_epochs >= self.epochs {
            return bad(
                "warmup-epochs",
                format!(
                    "{} must be below --epochs {}",
                    self.warmup_epochs, self.epochs
                ),
            );
        }
        let synthetic = self.data.is_none();
        if self.batch_size < 2 || (synthetic && self.batch_size > self.train_len) {
            return bad(
                "batch-size",
                format!(
                    "must lie in [2, {}] (the training images), got {}",
                    self.train_len, self.batch_size
                ),
            );
        }
        if self.bn_group != 0
            && (self.bn_group < 2 || !self.batch_size.is_multiple_of(self.bn_group))
        {
            return bad(
                "bn-group",
                format!(
                    "must be at least 2 and divide --batch-size {}, got {}",
                    self.batch_size, self.bn_group
                ),
            );
        }
        let max_size = if synthetic { SOURCE_SIZE } else { 1024 };
        if self.image_size < 32 || self.image_size > max_size {
            return bad(
                "image-size",
                format!("must lie in [32, {max_size}], got {}", self.image_size),
            );
        }
        if !(0.0..=1.0).contains(&self.max_bad) {
            return bad(
                "max-bad",
                format!("must lie in [0, 1], got {}", self.max_bad),
            );
        }
        if !synthetic && (self.knn_memory_per_class == 0 || self.knn_query_per_class == 0) {
            return bad(
                "knn-memory-per-class",
                "the kNN monitor needs at least one memory and one query image per class".into(),
            );
        }
        if self.knn_k == 0 || self.val_len == 0 {
            return bad(
                "knn-k",
                "the kNN monitor needs k >= 1 and a validation split".into(),
            );
        }
        let exclude = ExcludeRule::from_flag(&self.lars_exclude, method == Method::LewelBEman)?;
        let lc = LewelConfig::new(
            arch,
            self.lewel_num_heads,
            self.lewel_scale,
            self.lewel_loss_weight,
        );
        lc.validate()?;
        let sc = StepConfig {
            method,
            lars: LarsConfig {
                lr: self.lr,
                weight_decay: self.wd,
                momentum: 0.9,
                eta: 0.001,
            },
            ema_m: self.enc_m,
            exclude,
            bn_group: (self.bn_group != 0).then_some(self.bn_group),
        };
        Ok((lc, sc))
    }
}

/// The end of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// kNN accuracy at init and at the end (none: the monitor was off).
    pub knn_init: Option<f64>,
    pub knn_final: Option<f64>,
    pub first_loss: f64,
    pub last_loss: f64,
    pub epochs_done: usize,
    pub steps: usize,
    pub seconds: f64,
}

/// What is saved beside the weights.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Manifest {
    /// Epochs completed.
    pub epoch: usize,
    /// Iterations completed.
    pub step: usize,
    pub weights: String,
    pub weights_crc32: u32,
    pub optimizer: String,
    pub optimizer_crc32: u32,
    /// kNN accuracy at init and after the last epoch (none: the monitor was off).
    pub knn_init: Option<f64>,
    pub knn_last: Option<f64>,
    pub first_loss: f64,
    /// How the data order and augmentation resume: no generator state is needed.
    pub rng: String,
    pub config: PretrainConfig,
}

/// The data of step k (0-based) of a run: a DistributedSampler-style shuffle per epoch from the
/// seed (one rank, drop_last), then two augmented views of each sample.
pub(crate) fn views_for_step(cfg: &PretrainConfig, k: usize) -> (Vec<f32>, Vec<f32>, Shape) {
    let data = Synthetic::new(cfg.seed, SOURCE_SIZE, cfg.train_len, cfg.val_len);
    let iters = cfg.train_len / cfg.batch_size;
    let (epoch, i) = (k / iters, k % iters);
    let mut order: Vec<usize> = (0..cfg.train_len).collect();
    let mut r = Rng::keyed(&[cfg.seed, 0x5a3, epoch as u64]);
    for j in (1..order.len()).rev() {
        order.swap(j, r.below(j as u64 + 1) as usize);
    }
    let idx = &order[i * cfg.batch_size..][..cfg.batch_size];
    let (v1, v2) = views_batch(&data, cfg.seed, epoch, idx, cfg.image_size);
    let shape = Shape::new(&[cfg.batch_size, cfg.image_size, cfg.image_size, 3]);
    (v1, v2, shape)
}

/// The learning rate and EMA momentum of step k (0-based) into `sc`.
pub(crate) fn schedule_step(cfg: &PretrainConfig, sc: &mut StepConfig, k: usize) {
    let iters = cfg.train_len / cfg.batch_size;
    let total = iters * cfg.epochs;
    sc.lars.lr = optim::lr_at(
        cfg.lr,
        k / iters,
        k % iters,
        iters,
        cfg.warmup_epochs,
        cfg.epochs,
    );
    sc.ema_m = optim::ema_momentum(cfg.enc_m, k, total);
}

fn views_batch(
    data: &Synthetic,
    seed: u64,
    epoch: usize,
    idx: &[usize],
    out: usize,
) -> (Vec<f32>, Vec<f32>) {
    let pairs: Vec<(Vec<f32>, Vec<f32>)> = idx
        .par_iter()
        .map(|&i| {
            let img = data.image_rgb(Split::Train, i);
            let s = data.size;
            let a = augment::view(
                &img,
                s,
                out,
                &mut Rng::keyed(&[seed, epoch as u64, i as u64, 0]),
            );
            let b = augment::view(
                &img,
                s,
                out,
                &mut Rng::keyed(&[seed, epoch as u64, i as u64, 1]),
            );
            (a, b)
        })
        .collect();
    let (a, b): (Vec<_>, Vec<_>) = pairs.into_iter().unzip();
    (a.concat(), b.concat())
}

/// Pooled online backbone features (eval mode), L2-normalized, of the items `item` yields: its
/// normalized (size, size, 3) eval view and label, or None for an image that could not be read.
fn features(
    m: &mut Engine,
    n: usize,
    size: usize,
    item: &(dyn Fn(usize) -> Option<(Vec<f32>, usize)> + Sync),
) -> Result<(Vec<f32>, Vec<usize>)> {
    let c = m.cpu().cfg.arch.out_channels();
    let (mut feats, mut labels) = (Vec::with_capacity(n * c), Vec::with_capacity(n));
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(128) {
        let items: Vec<(Vec<f32>, usize)> = chunk.par_iter().filter_map(|&i| item(i)).collect();
        if items.is_empty() {
            continue;
        }
        let x: Vec<f32> = items.iter().flat_map(|(v, _)| v.iter().copied()).collect();
        feats.extend(m.features(&x, Shape::new(&[items.len(), size, size, 3]))?);
        labels.extend(items.iter().map(|(_, l)| *l));
    }
    knn::normalize_rows(&mut feats, c);
    Ok((feats, labels))
}

/// The kNN monitor's labeled images.
enum KnnData {
    Synthetic(Synthetic),
    /// Real images: memory and query indices (the first few per class, LEWEL_SPEC 10).
    Real {
        samples: Arc<dyn Samples>,
        memory: Vec<usize>,
        query: Vec<usize>,
        classes: usize,
    },
    /// No labeled set: the monitor is off.
    Off,
}

/// The first `per_class` indices of every class, in the set's order.
fn first_per_class(samples: &dyn Samples, per_class: usize) -> Vec<usize> {
    let mut seen = vec![0usize; samples.classes()];
    (0..samples.len())
        .filter(|&i| {
            let l = samples.label(i);
            seen[l] += 1;
            seen[l] <= per_class
        })
        .collect()
}

impl KnnData {
    fn open(cfg: &PretrainConfig) -> Result<(KnnData, String)> {
        let Some(data) = &cfg.data else {
            let d = Synthetic::new(cfg.seed, SOURCE_SIZE, cfg.train_len, cfg.val_len);
            return Ok((KnnData::Synthetic(d), String::new()));
        };
        let val = match &cfg.val_data {
            Some(v) => Some(v.clone()),
            None => crate::data::sibling_val(data),
        };
        let Some(val) = val else {
            return Ok((
                KnnData::Off,
                " | kNN monitor off (no --val-data)".to_string(),
            ));
        };
        let samples = crate::data::open_samples(&val).ctx("--val-data")?;
        let memory = first_per_class(&*samples, cfg.knn_memory_per_class);
        let query = first_per_class(&*samples, cfg.knn_query_per_class);
        let note = format!(
            " | kNN {} ({} memory, {} queries, {} classes)",
            val.display(),
            memory.len(),
            query.len(),
            samples.classes()
        );
        let classes = samples.classes();
        Ok((
            KnnData::Real {
                samples,
                memory,
                query,
                classes,
            },
            note,
        ))
    }
}

/// kNN accuracy (%) of the online backbone's features; None when the monitor is off.
fn knn_monitor(m: &mut Engine, data: &KnnData, cfg: &PretrainConfig) -> Result<Option<f64>> {
    let c = m.cpu().cfg.arch.out_channels();
    let size = cfg.image_size;
    let ((mem, ml), (q, ql), classes) = match data {
        KnnData::Off => return Ok(None),
        KnnData::Synthetic(d) => {
            let item = |split: Split| {
                move |i: usize| {
                    Some((
                        augment::eval_view(&d.image_rgb(split, i), d.size, size),
                        d.label(i),
                    ))
                }
            };
            let n_mem = match cfg.knn_memory {
                0 => d.train_len,
                n => n.min(d.train_len),
            };
            (
                features(m, n_mem, size, &item(Split::Train))?,
                features(m, d.val_len, size, &item(Split::Val))?,
                CLASSES.len(),
            )
        }
        KnnData::Real {
            samples,
            memory,
            query,
            classes,
        } => {
            // The eval transform at this size: the 256 -> 224 ratio of the recipe.
            let resize = (size * 256).div_ceil(224);
            let item = |idx: &[usize]| {
                let idx = idx.to_vec();
                let samples = samples.clone();
                move |k: usize| {
                    let i = idx[k];
                    let img = samples.decode(i).ok()?;
                    let v = transforms::eval_view(&img, resize, size);
                    let mut out = vec![0.0; size * size * 3];
                    pil::normalize(&v, &mut out);
                    Some((out, samples.label(i)))
                }
            };
            (
                features(m, memory.len(), size, &item(memory))?,
                features(m, query.len(), size, &item(query))?,
                *classes,
            )
        }
    };
    Ok(Some(knn::knn_accuracy(
        &mem, &ml, &q, &ql, c, cfg.knn_k, classes,
    )))
}

/// Where the training batches come from.
enum TrainData {
    /// The built-in set: step k's views from `views_for_step`.
    Synthetic,
    Real(Loader),
}

impl TrainData {
    /// The data, its iterations per epoch, and its part of the run's first line.
    fn open(cfg: &PretrainConfig) -> Result<(TrainData, usize, String)> {
        let Some(path) = &cfg.data else {
            let what = format!(
                "synthetic {} train / {} val, {}px",
                cfg.train_len, cfg.val_len, cfg.image_size
            );
            return Ok((TrainData::Synthetic, cfg.train_len / cfg.batch_size, what));
        };
        let samples = crate::data::open_samples(path).ctx("--data")?;
        let n = samples.len();
        if cfg.batch_size > n {
            return Err(Error::user(format!(
                "--batch-size {}: {} holds only {n} images",
                cfg.batch_size,
                path.display()
            )));
        }
        let threads = match cfg.loader_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
            t => t,
        };
        let what = format!(
            "{} ({n} images, {} classes), {}px, {threads} loader threads, JPEG decoder {}",
            path.display(),
            samples.classes(),
            cfg.image_size,
            cfg.jpeg_decoder
        );
        let loader = Loader::new(
            samples,
            LoaderConfig {
                batch: cfg.batch_size,
                size: cfg.image_size,
                seed: cfg.seed,
                threads,
                prefetch: 2,
                world: 1,
                rank: 0,
                max_bad: cfg.max_bad,
                photometric: true,
            },
        )?;
        let iters = loader.batches_per_epoch();
        Ok((TrainData::Real(loader), iters, what))
    }
}

/// The model where it trains: the CPU reference, or the GPU in f32 or bf16.
enum Engine {
    Cpu(Box<Lewel>),
    F32(Box<GpuLewel<f32>>),
    Bf16(Box<GpuLewel<half::bf16>>),
}

/// Runs the same expression on either GPU engine.
macro_rules! on_gpu {
    ($e:expr, $m:ident => $body:expr, $c:ident => $cpu:expr) => {
        match $e {
            Engine::Cpu($c) => $cpu,
            Engine::F32($m) => $body,
            Engine::Bf16($m) => $body,
        }
    };
}

impl Engine {
    /// Moves the model to the chosen device. `auto` falls back to the CPU with a note when the GPU
    /// cannot be opened; `cuda` stops with the reason (exit code 2).
    fn open(
        m: Lewel,
        choice: DeviceChoice,
        cfg: &PretrainConfig,
    ) -> Result<(Engine, Option<String>)> {
        let precision = cfg.precision.as_str();
        let ordinal = match device::resolve(choice) {
            Device::Cpu => {
                if precision == "bf16" {
                    return Err(Error::user(
                        "--precision bf16: the CPU computes in f32 only; use --precision auto or f32, or --device cuda",
                    ));
                }
                return Ok((Engine::Cpu(Box::new(m)), None));
            }
            Device::Cuda(n) => n,
        };
        let gpu = match Gpu::new(ordinal, cfg.deterministic) {
            Ok(g) => Rc::new(g),
            Err(e) if choice == DeviceChoice::Auto => {
                let note = format!("{e}; training on the CPU");
                return Ok((Engine::Cpu(Box::new(m)), Some(note)));
            }
            Err(Error::Cuda(m)) => return Err(Error::user(m)),
            Err(e) => return Err(e),
        };
        let batch = cfg.batch_size;
        let e = if precision == "f32" {
            Engine::F32(Box::new(GpuLewel::new(m, gpu).map_err(|e| oom(e, batch))?))
        } else {
            Engine::Bf16(Box::new(GpuLewel::new(m, gpu).map_err(|e| oom(e, batch))?))
        };
        Ok((e, None))
    }

    /// The device, for the run's first line.
    fn describe(&self) -> String {
        let threads = rayon::current_num_threads();
        on_gpu!(self,
            m => format!("{} cuda:{} {}{} ({threads} CPU threads for data)", m.gpu.name, m.gpu.ordinal,
                if matches!(self, Engine::F32(_)) { "f32" } else { "bf16" },
                if m.gpu.deterministic { " deterministic" } else { "" }),
            _c => format!("cpu f32 ({threads} threads)"))
    }

    /// The CUDA context, on a GPU.
    fn context(&self) -> Option<Arc<cudarc::driver::CudaContext>> {
        on_gpu!(self, m => Some(m.gpu.ctx.clone()), _c => None)
    }

    /// The host model (module handles and configs; its values are stale on a GPU until `host`).
    fn cpu(&self) -> &Lewel {
        on_gpu!(self, m => &m.host, c => c)
    }

    fn forward_backward(
        &mut self,
        v1: &[f32],
        v2: &[f32],
        shape: Shape,
        sc: &StepConfig,
        batch: usize,
    ) -> Result<f32> {
        on_gpu!(self,
            m => m.forward_backward(v1, v2, shape, sc).map_err(|e| oom(e, batch)),
            c => Ok(c.forward_backward(v1, v2, shape, sc)))
    }

    /// The same from a batch of u8 crops: the photometric augmentation runs on the GPU.
    fn forward_backward_crops(
        &mut self,
        b: &Batch,
        shape: Shape,
        sc: &StepConfig,
        batch: usize,
    ) -> Result<f32> {
        let p = |i: usize| b.params[i].iter().map(AugParams::new).collect::<Vec<_>>();
        let (p1, p2) = (p(0), p(1));
        on_gpu!(self,
            m => m.forward_backward_crops([&b.crops[0], &b.crops[1]], [&p1, &p2], shape, sc)
                .map_err(|e| oom(e, batch)),
            _c => Err(Error::Other("u8 crops reach the CPU engine: the loader should normalize".into())))
    }

    fn update(&mut self, sc: &StepConfig) -> Result<()> {
        on_gpu!(self, m => m.update(sc), c => {
            c.update(sc);
            Ok(())
        })
    }

    /// The model with current values, for checkpoints.
    fn host(&mut self) -> Result<&Lewel> {
        on_gpu!(self, m => m.sync_host(), c => Ok(&**c))
    }

    /// Pooled online backbone features (eval mode) of images (B, H, W, 3).
    fn features(&mut self, x: &[f32], shape: Shape) -> Result<Vec<f32>> {
        on_gpu!(self, m => m.features(x, shape), c => {
            c.g.set_recording(false);
            c.g.reset();
            let xt = c.g.input(shape, x);
            let f = c.online.encoder.backbone.forward(&mut c.g, xt, crate::autograd::BnMode::Eval);
            let p = c.g.avgpool(f);
            let out = c.g.value(p).to_vec();
            c.g.set_recording(true);
            Ok(out)
        })
    }

    /// Why cuDNN benchmarking failed, once (the heuristic was used instead).
    fn take_find_failure(&self) -> Option<String> {
        on_gpu!(self, m => m.gpu.find_failure.borrow_mut().take(), _c => None)
    }

    /// Device bytes held (None on the CPU).
    fn device_bytes(&self) -> Option<usize> {
        on_gpu!(self, m => Some(m.device_bytes()), _c => None)
    }
}

/// Out of GPU memory, restated with the batch size tried.
fn oom(e: Error, batch: usize) -> Error {
    match e {
        Error::Cuda(m) if m.contains("out of GPU memory") => Error::user(format!(
            "{m}; batch size {batch}: try a smaller --batch-size"
        )),
        e => e,
    }
}

struct Log {
    jsonl: std::fs::File,
    bar: Option<indicatif::ProgressBar>,
}

impl Log {
    fn line(&self, s: &str) {
        match &self.bar {
            Some(b) => b.println(s),
            None => eprintln!("{s}"),
        }
    }
    fn json(&mut self, v: serde_json::Value) -> Result<()> {
        writeln!(self.jsonl, "{v}").map_err(|e| Error::io("metrics.jsonl", e))
    }
}

fn save(m: &Lewel, dir: &Path, man: &mut Manifest) -> Result<()> {
    let mut state = checkpoint::store_tensors(&m.g.store);
    state.extend(checkpoint::store_tensors(&m.tg.store));
    let mut opt = Tensors::new();
    for e in &m.g.store.table.entries {
        let (sh, v) = checkpoint::to_torch(e.shape, &m.momentum[e.range()]);
        opt.insert(format!("momentum.{}", e.name), Owned::f32(sh, &v));
    }
    man.weights = format!("checkpoint_{:04}.safetensors", man.epoch);
    man.optimizer = format!("optimizer_{:04}.safetensors", man.epoch);
    checkpoint::write_file_atomic(&dir.join(&man.weights), &state, None)?;
    checkpoint::write_file_atomic(&dir.join(&man.optimizer), &opt, None)?;
    man.weights_crc32 = crc_of(&dir.join(&man.weights))?;
    man.optimizer_crc32 = crc_of(&dir.join(&man.optimizer))?;
    let json =
        serde_json::to_string_pretty(man).map_err(|e| Error::Other(format!("manifest: {e}")))?;
    checkpoint::write_bytes_atomic(&dir.join("checkpoint.json"), json.as_bytes())?;
    // Only now, with the manifest pointing at the new files, drop checkpoints beyond the newest `keep`.
    if man.epoch > man.config.keep {
        let old = man.epoch - man.config.keep;
        for f in [
            format!("checkpoint_{old:04}.safetensors"),
            format!("optimizer_{old:04}.safetensors"),
        ] {
            let _ = std::fs::remove_file(dir.join(f));
        }
    }
    Ok(())
}

fn crc_of(p: &Path) -> Result<u32> {
    let b = std::fs::read(p).map_err(|e| Error::io(p, e))?;
    Ok(crc32fast::hash(&b))
}

/// Reads a run folder's manifest (or the manifest file itself) and checks the files it names.
pub fn read_manifest(path: &Path) -> Result<(PathBuf, Manifest)> {
    let (dir, mpath) = if path.is_dir() {
        (path.to_path_buf(), path.join("checkpoint.json"))
    } else {
        (
            path.parent().unwrap_or(Path::new(".")).to_path_buf(),
            path.to_path_buf(),
        )
    };
    let text = std::fs::read_to_string(&mpath).map_err(|e| Error::io(&mpath, e))?;
    let man: Manifest = serde_json::from_str(&text).map_err(|e| {
        Error::user(format!(
            "{}: not a lewel checkpoint manifest ({e})",
            mpath.display()
        ))
    })?;
    for (f, crc) in [
        (&man.weights, man.weights_crc32),
        (&man.optimizer, man.optimizer_crc32),
    ] {
        let got = crc_of(&dir.join(f))?;
        if got != crc {
            return Err(Error::user(format!(
                "{}: CRC32 {got:08x}, the manifest says {crc:08x}: the file is damaged",
                dir.join(f).display()
            )));
        }
    }
    Ok((dir, man))
}

/// Runs (or resumes) pretraining. `stop_after`: stop once this many epochs are done (an interruption
/// on purpose; the run resumes with `resume`).
pub fn pretrain(
    cfg: &PretrainConfig,
    resume: Option<&Path>,
    stop_after: Option<usize>,
) -> Result<Summary> {
    let t0 = Instant::now();
    let (cfg, man) = match resume {
        // The run continues in the folder that holds the manifest, wherever its config says it was.
        Some(p) => {
            let (dir, man) = read_manifest(p).ctx("--resume")?;
            (
                PretrainConfig {
                    out: dir,
                    ..man.config.clone()
                },
                Some(man),
            )
        }
        None => (cfg.clone(), None),
    };
    let cfg = cfg.resolved();
    let (lc, mut sc) = cfg.validate()?;
    let choice = cfg.device.parse::<DeviceChoice>()?;
    // The data first: a bad path stops the run before anything is written.
    crate::data::decode::set_jpeg_decoder(cfg.jpeg_decoder.parse()?)?;
    let (mut train, iters, data_line) = TrainData::open(&cfg)?;
    let (knn_data, knn_line) = KnnData::open(&cfg)?;
    std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
    let toml_text = toml::to_string(&cfg).map_err(|e| Error::Other(format!("config: {e}")))?;
    checkpoint::write_bytes_atomic(&cfg.out.join("config.toml"), toml_text.as_bytes())?;

    let mut m = Lewel::new(lc, cfg.seed);
    let mut start_epoch = 0;
    if let Some(man) = &man {
        let dir = &cfg.out;
        let state = checkpoint::read_file(&dir.join(&man.weights))?;
        checkpoint::load_store(&mut m.g.store, &state, &man.weights)?;
        checkpoint::load_store(&mut m.tg.store, &state, &man.weights)?;
        let opt = checkpoint::read_file(&dir.join(&man.optimizer))?;
        for e in m.g.store.table.entries.clone() {
            let o = opt
                .get(&format!("momentum.{}", e.name))
                .and_then(|o| o.to_f32())
                .ok_or_else(|| {
                    Error::user(format!("{}: no momentum for {}", man.optimizer, e.name))
                })?;
            let r = e.range();
            m.momentum[r].copy_from_slice(&checkpoint::from_torch(e.shape, &o));
        }
        start_epoch = man.epoch;
    }

    let params = m.g.store.num_params();
    let (mut m, note) = Engine::open(m, choice, &cfg)?;
    if let (TrainData::Real(l), Some(ctx)) = (&mut train, m.context()) {
        // On a GPU the loader makes the crops, in pinned memory; jitter, blur, solarize and
        // normalize run there.
        l.cfg.photometric = false;
        if cfg.pin_memory {
            l.pin_memory(ctx);
        }
    }
    let total = iters * cfg.epochs;
    let tty = std::io::stderr().is_terminal();
    let jsonl = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(cfg.out.join("metrics.jsonl"))
        .map_err(|e| Error::io(cfg.out.join("metrics.jsonl"), e))?;
    let mut log = Log { jsonl, bar: None };
    if let Some(n) = note {
        log.line(&format!("warning: {n}"));
    }
    log.line(&format!(
        "lewel pretrain | {} {} | {params} params | device {} | {data_line}{knn_line} | batch {} | {} epochs x {iters} iters | lr {} wd {} m0 {} | out {}",
        cfg.method,
        lc.arch.name(),
        m.describe(),
        cfg.batch_size,
        cfg.epochs,
        cfg.lr,
        cfg.wd,
        cfg.enc_m,
        cfg.out.display()
    ));
    let (knn_init, mut first_loss) = match &man {
        Some(man) => {
            log.line(&format!(
                "resumed from {} at epoch {}",
                cfg.out.join(&man.weights).display(),
                man.epoch
            ));
            (man.knn_init, man.first_loss)
        }
        None => {
            let acc = knn_monitor(&mut m, &knn_data, &cfg)?;
            if let Some(a) = acc {
                log.line(&format!("knn | epoch 0 | acc {a:.2}%"));
                log.json(serde_json::json!({"epoch": 0, "knn_acc": a}))?;
            }
            (acc, f64::NAN)
        }
    };
    let mut knn_last = man.as_ref().map_or(knn_init, |m| m.knn_last);
    let mut last_loss = f64::NAN;
    if tty {
        let bar =
            indicatif::ProgressBar::new(total as u64).with_position((start_epoch * iters) as u64);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
        );
        log.bar = Some(bar);
    }
    let mut epochs_done = start_epoch;
    // Bad samples met in the batches trained on by this process (the loader's own count runs
    // ahead by the prefetched batches).
    let mut skipped = 0usize;
    for epoch in start_epoch..cfg.epochs {
        let mut loss_sum = 0.0;
        let mut batches = match &train {
            TrainData::Real(l) => Some(l.epoch(epoch as u64, 0)),
            TrainData::Synthetic => None,
        };
        for i in 0..iters {
            let ts = Instant::now();
            let k = epoch * iters + i;
            schedule_step(&cfg, &mut sc, k);
            let (loss, data_ms) = match &mut batches {
                None => {
                    let (v1, v2, shape) = views_for_step(&cfg, k);
                    let data_ms = ts.elapsed().as_secs_f64() * 1e3;
                    let loss = m.forward_backward(&v1, &v2, shape, &sc, cfg.batch_size)?;
                    (loss, data_ms)
                }
                Some(ep) => {
                    let b = ep
                        .next()
                        .ok_or_else(|| Error::Other("the loader stopped early".into()))??;
                    for (j, why) in &b.new_bad {
                        log.line(&format!("warning: skipped sample {j}: {why}"));
                    }
                    let s = cfg.image_size;
                    let shape = Shape::new(&[cfg.batch_size, s, s, 3]);
                    let loss = if b.view1.is_empty() {
                        m.forward_backward_crops(&b, shape, &sc, cfg.batch_size)?
                    } else {
                        m.forward_backward(&b.view1, &b.view2, shape, &sc, cfg.batch_size)?
                    };
                    let wait = b.wait_ms;
                    skipped += b.bad;
                    if let TrainData::Real(l) = &train {
                        // The copies from its crops are queued (done, even: the loss was read).
                        l.recycle(b);
                        if let Some(why) = l.take_pin_failure() {
                            log.line(&format!("warning: {why}"));
                        }
                    }
                    (loss, wait)
                }
            };
            let loss = loss as f64;
            if !loss.is_finite() {
                return Err(Error::Other(format!(
                    "the loss became {loss} at step {k}: lower --lr"
                )));
            }
            m.update(&sc)?;
            if let Some(why) = m.take_find_failure() {
                log.line(&format!("warning: benchmarking cuDNN algorithms failed ({why}); using cuDNN's heuristic choice"));
            }
            if first_loss.is_nan() {
                first_loss = loss;
            }
            last_loss = loss;
            loss_sum += loss;
            let ms = ts.elapsed().as_secs_f64() * 1e3;
            let ips = cfg.batch_size as f64 / (ms / 1e3);
            let mib = m.device_bytes().map(|b| b >> 20);
            log.json(serde_json::json!({"step": k + 1, "epoch": epoch + 1, "loss": loss, "lr": sc.lars.lr, "ema_m": sc.ema_m, "ms": ms, "img_per_s": ips, "data_ms": data_ms, "skipped": skipped, "device_mib": mib}))?;
            if (k + 1) % cfg.log_every == 0 || i + 1 == iters {
                let mem = mib.map_or(String::new(), |v| format!(" | {v} MiB on device"));
                let bad = if skipped > 0 {
                    format!(" | {skipped} skipped")
                } else {
                    String::new()
                };
                log.line(&format!("step {}/{total} | loss {loss:.4} | lr {:.4} | m {:.5} | {ms:.0} ms ({data_ms:.0} data) | {ips:.0} img/s{mem}{bad}", k + 1, sc.lars.lr, sc.ema_m));
            }
            if let Some(b) = &log.bar {
                b.set_message(format!("loss {loss:.4}"));
                b.inc(1);
            }
        }
        knn_last = knn_monitor(&mut m, &knn_data, &cfg)?;
        let mean = loss_sum / iters as f64;
        match knn_last {
            Some(a) => log.line(&format!(
                "knn | epoch {} | acc {a:.2}% | mean loss {mean:.4}",
                epoch + 1
            )),
            None => log.line(&format!("epoch {} | mean loss {mean:.4}", epoch + 1)),
        }
        log.json(serde_json::json!({"epoch": epoch + 1, "knn_acc": knn_last, "mean_loss": mean}))?;
        epochs_done = epoch + 1;
        let mut mf = Manifest {
            epoch: epochs_done,
            step: epochs_done * iters,
            weights: String::new(),
            weights_crc32: 0,
            optimizer: String::new(),
            optimizer_crc32: 0,
            knn_init,
            knn_last,
            first_loss,
            rng: "none saved: every draw is a pure function of (seed, epoch, sample, view)".into(),
            config: cfg.clone(),
        };
        save(m.host()?, &cfg.out, &mut mf)?;
        if stop_after == Some(epochs_done) {
            break;
        }
    }
    if let Some(b) = &log.bar {
        b.finish_and_clear();
    }
    Ok(Summary {
        knn_init,
        knn_final: knn_last,
        first_loss,
        last_loss,
        epochs_done,
        steps: epochs_done * iters,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

/// The weights file behind a run folder, a manifest, or a state file given directly.
fn weights_file(checkpoint_path: &Path) -> Result<PathBuf> {
    if checkpoint_path.is_dir() || checkpoint_path.extension().is_some_and(|e| e == "json") {
        let (dir, man) = read_manifest(checkpoint_path)?;
        Ok(dir.join(man.weights))
    } else {
        Ok(checkpoint_path.to_path_buf())
    }
}

/// `lewel export`: the online backbone in torchvision names (f32, OIHW, num_batches_tracked as i64).
pub fn export(checkpoint_path: &Path, out: &Path) -> Result<usize> {
    let weights = weights_file(checkpoint_path)?;
    let t = checkpoint::read_file(&weights)?;
    let prefix = "online_net.backbone.";
    let bb: Tensors = t
        .into_iter()
        .filter_map(|(n, o)| n.strip_prefix(prefix).map(|s| (s.to_string(), o)))
        .collect();
    if !bb.contains_key("conv1.weight") {
        return Err(Error::user(format!(
            "{}: no {prefix}conv1.weight: not a LEWEL checkpoint",
            weights.display()
        )));
    }
    checkpoint::write_file_atomic(out, &bb, None)?;
    Ok(bb.len())
}

/// `lewel embed`: pooled backbone features (eval-mode BN, not normalized) of `images` (float32 NCHW,
/// normalized) from a LEWEL state (its online backbone), a run folder, or an exported backbone.
pub fn embed(checkpoint_path: &Path, images: &Path, out: &Path) -> Result<(usize, usize)> {
    let weights = weights_file(checkpoint_path)?;
    let what = weights.display().to_string();
    let t = checkpoint::read_file(&weights)?;
    let prefix = if t.contains_key("online_net.backbone.conv1.weight") {
        "online_net.backbone."
    } else {
        ""
    };
    let arch = Arch::infer(&t, prefix, &what)?;
    let mut s = crate::memory::ParamStore::new();
    let net = crate::model::resnet::ResNet::build(&mut s, prefix, arch, &mut Rng::new(0));
    checkpoint::load_store(&mut s, &t, &what)?;
    let it = checkpoint::read_file(images)?;
    let im = it
        .get("images")
        .ok_or_else(|| Error::user(format!("{}: no tensor 'images'", images.display())))?;
    let v = im.to_f32().ok_or_else(|| {
        Error::user(format!(
            "{}: images is {:?}, expected F32",
            images.display(),
            im.dtype
        ))
    })?;
    if im.shape.len() != 4 || im.shape[1] != 3 || im.shape[2] < 32 || im.shape[3] < 32 {
        return Err(Error::user(format!(
            "{}: images has shape {:?}, expected (N, 3, H >= 32, W >= 32)",
            images.display(),
            im.shape
        )));
    }
    let (n, h, w) = (im.shape[0], im.shape[2], im.shape[3]);
    let c = arch.out_channels();
    let mut g = crate::autograd::Graph::new(s);
    g.set_recording(false);
    let mut feats = Vec::with_capacity(n * c);
    let img_len = 3 * h * w;
    for start in (0..n).step_by(64) {
        let b = (n - start).min(64);
        let x = crate::train::nchw_to_nhwc(&v[start * img_len..][..b * img_len], b, 3, h, w);
        g.reset();
        let x = g.input(Shape::new(&[b, h, w, 3]), &x);
        let f = net.forward(&mut g, x, crate::autograd::BnMode::Eval);
        let p = g.avgpool(f);
        feats.extend_from_slice(g.value(p));
    }
    let mut o = Tensors::new();
    o.insert("features".into(), Owned::f32(vec![n, c], &feats));
    checkpoint::write_file_atomic(out, &o, None)?;
    Ok((n, c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn small(out: PathBuf) -> PretrainConfig {
        PretrainConfig {
            epochs: 2,
            warmup_epochs: 1,
            batch_size: 16,
            train_len: 64,
            val_len: 40,
            image_size: 32,
            log_every: 1000,
            device: "cpu".into(),
            out,
            ..Default::default()
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lewel-run-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn losses(dir: &Path) -> Vec<String> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| {
                let v: serde_json::Value = serde_json::from_str(l).unwrap();
                format!("{} {} {} {}", v["step"], v["loss"], v["knn_acc"], v["lr"])
            })
            .collect()
    }

    #[test]
    fn resume_after_an_interruption_is_exact() {
        let (a, b) = (tmp("full"), tmp("split"));
        let full = pretrain(&small(a.clone()), None, None).unwrap();
        let first = pretrain(&small(b.clone()), None, Some(1)).unwrap();
        assert_eq!(first.epochs_done, 1);
        assert!(b.join("checkpoint_0001.safetensors").exists());
        let resumed = pretrain(&PretrainConfig::default(), Some(&b), None).unwrap();
        assert_eq!(
            (
                resumed.knn_final,
                resumed.last_loss.to_bits(),
                resumed.epochs_done
            ),
            (full.knn_final, full.last_loss.to_bits(), 2)
        );
        let wa = std::fs::read(a.join("checkpoint_0002.safetensors")).unwrap();
        let wb = std::fs::read(b.join("checkpoint_0002.safetensors")).unwrap();
        assert!(
            wa == wb,
            "weights after resume differ from the uninterrupted run"
        );
        assert_eq!(losses(&a), losses(&b));
        // the manifest names the newest files; the CRC catches a damaged file
        let (_, man) = read_manifest(&b).unwrap();
        assert_eq!((man.epoch, man.step), (2, 8));
        let mut bytes = wb.clone();
        let n = bytes.len();
        bytes[n - 1] ^= 1;
        std::fs::write(b.join("checkpoint_0002.safetensors"), bytes).unwrap();
        let e = read_manifest(&b).unwrap_err();
        assert!(e.to_string().contains("the file is damaged"), "{e}");
        // export writes torchvision names
        let ex = a.join("backbone.safetensors");
        let n = export(&a, &ex).unwrap();
        let t = checkpoint::read_file(&ex).unwrap();
        assert_eq!(t.len(), n);
        assert_eq!(t["conv1.weight"].shape, vec![8, 3, 7, 7]);
        assert_eq!(
            t["layer1.0.bn1.num_batches_tracked"].dtype,
            safetensors::Dtype::I64
        );
        assert!(!t.keys().any(|k| k.starts_with("fc.") || k.contains("neck")));
        // embed: the run folder and the exported backbone give the same features
        let mut r = Rng::new(9);
        let imgs: Vec<f32> = (0..3 * 3 * 40 * 40).map(|_| r.normal() as f32).collect();
        let mut it = Tensors::new();
        it.insert("images".into(), Owned::f32(vec![3, 3, 40, 40], &imgs));
        let ip = a.join("images.safetensors");
        checkpoint::write_file_atomic(&ip, &it, None).unwrap();
        let (f1, f2) = (a.join("f1.safetensors"), a.join("f2.safetensors"));
        assert_eq!(embed(&a, &ip, &f1).unwrap(), (3, 256));
        embed(&ex, &ip, &f2).unwrap();
        let (v1, v2) = (
            checkpoint::read_file(&f1).unwrap(),
            checkpoint::read_file(&f2).unwrap(),
        );
        assert_eq!(v1["features"], v2["features"]);
        assert!(v1["features"]
            .to_f32()
            .unwrap()
            .iter()
            .all(|v| v.is_finite() && *v >= 0.0));
        std::fs::remove_dir_all(&a).unwrap();
        std::fs::remove_dir_all(&b).unwrap();
    }

    #[test]
    fn bad_config_is_one_clear_line() {
        let d = tmp("bad");
        std::fs::create_dir_all(&d).unwrap();
        let f = d.join("c.toml");
        std::fs::write(&f, "batch_size = 64\nlearning_rate = 3\n").unwrap();
        let e = PretrainConfig::from_toml(&f).unwrap_err();
        assert!(
            e.to_string().contains("c.toml") && e.to_string().contains("learning_rate"),
            "{e}"
        );
        let cases: [(&str, PretrainConfig); 8] = [
            (
                "--lr",
                PretrainConfig {
                    lr: -1.0,
                    ..Default::default()
                },
            ),
            (
                "--method",
                PretrainConfig {
                    method: "byol".into(),
                    ..Default::default()
                },
            ),
            (
                "--lewel-num-heads",
                PretrainConfig {
                    lewel_num_heads: 3,
                    ..Default::default()
                },
            ),
            (
                "--arch",
                PretrainConfig {
                    arch: "vit".into(),
                    ..Default::default()
                },
            ),
            (
                "--bn-group",
                PretrainConfig {
                    bn_group: 5,
                    ..Default::default()
                },
            ),
            (
                "--lars-exclude",
                PretrainConfig {
                    lars_exclude: "old".into(),
                    ..Default::default()
                },
            ),
            (
                "--epochs",
                PretrainConfig {
                    epochs: 0,
                    warmup_epochs: 0,
                    ..Default::default()
                },
            ),
            (
                "--warmup-epochs",
                PretrainConfig {
                    epochs: 3,
                    warmup_epochs: 3,
                    ..Default::default()
                },
            ),
        ];
        for (flag, c) in cases {
            let e = c.validate().unwrap_err();
            assert!(
                e.to_string().starts_with(flag) && e.exit_code() == 2,
                "{flag}: {e}"
            );
        }
        let e = pretrain(&PretrainConfig::default(), Some(&d.join("nothing")), None).unwrap_err();
        assert!(
            e.to_string().contains("--resume") && e.exit_code() == 2,
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }
}

#[cfg(test)]
mod real_data_tests {
    use super::*;
    use crate::data::decode::{encode_jpeg, RgbImage};

    /// An ImageFolder of 2 classes: 297 generated JPEGs, the odd-but-valid fixtures (CMYK,
    /// grayscale, progressive, a PNG named .JPEG) and the three corrupt ones (truncated, random
    /// bytes, empty): 1% of the files are bad.
    fn dataset(root: &Path) {
        let fx = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data/odd");
        for (c, class) in ["a", "b"].iter().enumerate() {
            let dir = root.join("train").join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..148 + c {
                let (w, h) = (40 + i % 9, 32 + i % 5);
                let mut r = Rng::keyed(&[c as u64, i as u64]);
                let data = (0..w * h * 3).map(|_| r.below(256) as u8).collect();
                let jpg = encode_jpeg(&RgbImage { w, h, data }, 90).unwrap();
                std::fs::write(dir.join(format!("gen{i:03}.JPEG")), jpg).unwrap();
            }
            for f in std::fs::read_dir(fx.join(class)).unwrap() {
                let f = f.unwrap().path();
                std::fs::copy(&f, dir.join(f.file_name().unwrap())).unwrap();
            }
        }
    }

    /// Interrupted after epoch 1 and resumed, a run on real images (with a val/ for the monitor)
    /// ends with the same weights and metrics as an uninterrupted one: the views are the same.
    #[test]
    fn resume_on_real_data_is_exact() {
        let d = std::env::temp_dir().join(format!("lewel-real-resume-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        dataset(&d);
        let val = d.join("val");
        std::fs::create_dir_all(&val).unwrap();
        for class in ["a", "b"] {
            let src = d.join("train").join(class);
            std::fs::create_dir_all(val.join(class)).unwrap();
            for i in 0..4 {
                let f = format!("gen{i:03}.JPEG");
                std::fs::copy(src.join(&f), val.join(class).join(&f)).unwrap();
            }
        }
        let cfg = |out: &str| PretrainConfig {
            data: Some(d.join("train")),
            epochs: 2,
            warmup_epochs: 1,
            batch_size: 64,
            image_size: 32,
            log_every: 1000,
            device: "cpu".into(),
            knn_k: 3,
            out: d.join(out),
            ..Default::default()
        };
        let full = pretrain(&cfg("full"), None, None).unwrap();
        assert!(
            full.knn_init.is_some(),
            "val/ beside train/ feeds the monitor"
        );
        pretrain(&cfg("split"), None, Some(1)).unwrap();
        let resumed = pretrain(&PretrainConfig::default(), Some(&d.join("split")), None).unwrap();
        assert_eq!(
            (resumed.knn_final, resumed.last_loss.to_bits()),
            (full.knn_final, full.last_loss.to_bits())
        );
        let w = |r: &str| std::fs::read(d.join(r).join("checkpoint_0002.safetensors")).unwrap();
        assert!(w("full") == w("split"), "weights after resume differ");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn a_dataset_with_1_percent_corrupt_files_trains_and_counts_them() {
        let d = std::env::temp_dir().join(format!("lewel-real-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        dataset(&d);
        let cfg = PretrainConfig {
            data: Some(d.clone()),
            epochs: 2,
            warmup_epochs: 1,
            batch_size: 32,
            image_size: 32,
            log_every: 1000,
            device: "cpu".into(),
            loader_threads: 2,
            out: d.join("run"),
            ..Default::default()
        };
        let s = pretrain(&cfg, None, None).unwrap();
        assert_eq!(s.epochs_done, 2);
        assert!(s.knn_init.is_none(), "no val/: the monitor is off");
        let last: serde_json::Value = std::fs::read_to_string(d.join("run/metrics.jsonl"))
            .unwrap()
            .lines()
            .rfind(|l| l.contains("\"step\""))
            .map(|l| serde_json::from_str(l).unwrap())
            .unwrap();
        // 303 files: the three corrupt ones are met at least once an epoch (a batch of 32 drops
        // the last 15 positions of each epoch's order, so an epoch may miss one).
        let skipped = last["skipped"].as_u64().unwrap();
        assert!((3..=12).contains(&skipped), "skipped {skipped}");
        assert!(last["data_ms"].as_f64().is_some());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
