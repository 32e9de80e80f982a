//! `lewel pretrain`: the whole run. Config (flags or a TOML file, the effective one written into the
//! run folder), the data, the LEWEL iteration of train.rs once per batch with the schedules of
//! optim.rs, a progress bar on a terminal (plain lines otherwise), one grep-able line per logged step,
//! JSONL metrics, the kNN monitor at init and after every epoch, checkpoints after every epoch
//! (atomic; a manifest written last names the files and their CRC32), and exact resume.
//!
//! Resume is exact because nothing random is carried in generator state: every draw (data order,
//! augmentation) is a pure function of (seed, epoch, sample, view), the schedules are functions of the
//! iteration, and the checkpoint holds the weights, BN statistics, counters and LARS momentum.

use crate::backend::Backend;
use crate::backend::Cuda;
use crate::checkpoint::{self, Owned, Tensors};
use crate::data::augment;
use crate::data::loader::{Loader, LoaderConfig, Samples};
use crate::data::photometric_cuda::AugParams;
use crate::data::synthetic::{Split, Synthetic, CLASSES};
use crate::data::{pil, transforms};
use crate::device::{self, Device, DeviceChoice};
use crate::dist::nccl::Nccl;
use crate::dist::ranks::Ranks;
use crate::error::{Context, Error, Result};
use crate::eval::knn;
use crate::gpu::Gpu;
use crate::model::lewel::LewelConfig;
use crate::model::resnet::Arch;
use crate::optim::{self, ExcludeRule, LarsConfig};
use crate::rng::Rng;
use crate::tensor::Shape;
use crate::train::{HostView, Lewel, Method, StepConfig, TrainBackend, Trainer};
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
    /// Linear-warmup epochs; none: 2, or fewer when the run is shorter (`warmup()`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub warmup_epochs: Option<usize>,
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
    /// Train-mode BN statistics over the whole batch across the ranks (SyncBN, the official
    /// LEWEL-B recipe); without it each GPU's BN sees its own samples (the EMAN recipe).
    pub sync_bn: bool,
    pub seed: u64,
    pub device: String,
    /// Storage dtype of activations on the GPU: auto (bf16 on a GPU of compute capability 8.0 or newer, else f32), f32 or bf16.
    pub precision: String,
    /// Only deterministic cuDNN algorithms: a rerun is bitwise identical on the same GPU.
    pub deterministic: bool,
    /// Side of the training views in pixels; none: 48 on the synthetic set, 224 on real data.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_size: Option<usize>,
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
    /// kNN monitor on real data: memory images per class (the first of each class of the training
    /// set, or of the val set under the official protocol) and query images per class (the first of
    /// each class of the val set). LEWEL_SPEC 6: 5 and 25.
    pub knn_memory_per_class: usize,
    pub knn_query_per_class: usize,
    /// kNN monitor on real data: `disjoint` (memory from the training set, queries from the val
    /// set) or `official` (both from the val set, the memory inside the queries, as the official
    /// monitor and its logs).
    pub knn_protocol: String,
    /// Threads decoding and augmenting real data; 0: one per core.
    pub loader_threads: usize,
    /// Stop when more than this fraction of the samples read could not be decoded.
    pub max_bad: f64,
    /// JPEG decoder: zune (pure Rust) or libjpeg-turbo (PIL's exact pixels; loaded at run time).
    pub jpeg_decoder: String,
    /// On a GPU, the loader writes the crops into page-locked host memory (uploads are queued
    /// DMAs, not staged by the driver).
    pub pin_memory: bool,
    /// A step whose loss or gradients are NaN or infinite: `stop` the run (the last checkpoint is
    /// the last good state), or `skip` its update and go on (each step then waits for its own
    /// check), stopping after more than `max_nan_skips` skipped steps.
    pub on_nan: String,
    pub max_nan_skips: usize,
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
            warmup_epochs: None,
            batch_size: 64,
            lr: 1.0,
            wd: 1.5e-6,
            enc_m: 0.9,
            lewel_num_heads: 4,
            lewel_loss_weight: 0.5,
            lewel_scale: 1.0,
            lars_exclude: "current".into(),
            bn_group: 0,
            sync_bn: false,
            seed: 0,
            device: "auto".into(),
            precision: "auto".into(),
            deterministic: false,
            image_size: None,
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
            knn_protocol: "disjoint".into(),
            loader_threads: 0,
            max_bad: 0.01,
            jpeg_decoder: "zune".into(),
            pin_memory: true,
            on_nan: "stop".into(),
            max_nan_skips: 10,
        }
    }
}

/// Side of the rendered synthetic images the views are cropped from.
pub(crate) const SOURCE_SIZE: usize = 80;

/// Warmup epochs when none are given (LEWEL's scripts use 10 of 100-200; this is the built-in run's).
const DEFAULT_WARMUP: usize = 2;

/// Largest values a run accepts: beyond them a setting is a typo, and an allocation sized by it
/// would fail without a clear message.
const MAX_EPOCHS: usize = 100_000;
const MAX_BATCH: usize = 65_536;
const MAX_SYNTHETIC: usize = 10_000_000;
const MAX_THREADS: usize = 1024;

/// Settings the user gave, by config key (a config file's, then the flags'): a fresh run takes them
/// over the defaults; a resumed run checks them against its saved config.
pub type Given = serde_json::Map<String, serde_json::Value>;

/// Settings a resumed run may change: how it runs and what it reports, not what it trains. The
/// epochs extend (or shorten) the plan; every other setting is the run's own.
const CHANGEABLE_ON_RESUME: [&str; 16] = [
    "epochs",
    "on_nan",
    "max_nan_skips",
    "device",
    "precision",
    "deterministic",
    "log_every",
    "keep",
    "loader_threads",
    "max_bad",
    "pin_memory",
    "knn_k",
    "knn_memory",
    "knn_memory_per_class",
    "knn_query_per_class",
    "val_data",
];

/// The flag of a config key (`batch_size` -> `--batch-size`).
fn flag(key: &str) -> String {
    format!("--{}", key.replace('_', "-"))
}

impl PretrainConfig {
    /// Reads a TOML config; unknown keys and wrong types are errors naming the file and line.
    pub fn from_toml(path: &Path) -> Result<PretrainConfig> {
        Self::from_given(&Self::given_from_toml(path)?)
    }

    /// The settings a TOML config file gives, checked (unknown keys, types) against the config.
    pub fn given_from_toml(path: &Path) -> Result<Given> {
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::given_from_toml_str(&text, path)
    }

    /// `given_from_toml` on the file's text (`path` names it in errors).
    pub fn given_from_toml_str(text: &str, path: &Path) -> Result<Given> {
        let at = |e: toml::de::Error| {
            let line = e
                .span()
                .map_or(0, |s| text[..s.start].matches('\n').count() + 1);
            Error::user(format!("{} line {line}: {}", path.display(), e.message()))
        };
        toml::from_str::<PretrainConfig>(text).map_err(at)?;
        let table: toml::Table = toml::from_str(text).map_err(at)?;
        match serde_json::to_value(table) {
            Ok(serde_json::Value::Object(m)) => Ok(m),
            _ => Err(Error::user(format!(
                "{}: not a table of settings",
                path.display()
            ))),
        }
    }

    /// The defaults with the given settings over them.
    pub fn from_given(given: &Given) -> Result<PretrainConfig> {
        let mut v = Self::default().to_given();
        v.extend(given.clone());
        serde_json::from_value(serde_json::Value::Object(v))
            .map_err(|e| Error::user(format!("config: {e}")))
    }

    /// Every setting of this config, by key.
    pub fn to_given(&self) -> Given {
        match serde_json::to_value(self) {
            Ok(serde_json::Value::Object(m)) => m,
            _ => unreachable!("a config serializes to a map"),
        }
    }

    /// Side of the training views: the one given, else 48 on the synthetic set and 224 on real data.
    pub fn size(&self) -> usize {
        self.image_size
            .unwrap_or(if self.data.is_some() { 224 } else { 48 })
    }

    /// Warmup epochs: the ones given, else 2 clamped below the epochs (a short run is never blocked
    /// by a default it did not set).
    pub fn warmup(&self) -> usize {
        self.warmup_epochs
            .unwrap_or(DEFAULT_WARMUP.min(self.epochs.saturating_sub(1)))
    }

    /// The config with its automatic values made explicit (as written into the run folder).
    pub fn resolved(&self) -> PretrainConfig {
        let mut c = self.clone();
        c.image_size = Some(self.size());
        c.warmup_epochs = Some(self.warmup());
        c
    }

    /// What the automatic values became, for the run's first line (empty when nothing to say).
    fn auto_notes(&self) -> String {
        match self.warmup_epochs {
            None if self.warmup() < DEFAULT_WARMUP => format!(
                " (the default {DEFAULT_WARMUP} clamped below --epochs {})",
                self.epochs
            ),
            _ => String::new(),
        }
    }

    /// Checks every value; one line naming the flag on error.
    pub fn validate(&self) -> Result<(LewelConfig, StepConfig)> {
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
        if !["disjoint", "official"].contains(&self.knn_protocol.as_str()) {
            return bad(
                "knn-protocol",
                format!("expected disjoint or official, got '{}'", self.knn_protocol),
            );
        }
        self.device.parse::<DeviceChoice>()?;
        if !(1..=MAX_EPOCHS).contains(&self.epochs) {
            return bad(
                "epochs",
                format!("must lie in [1, {MAX_EPOCHS}], got {}", self.epochs),
            );
        }
        if self.warmup() >= self.epochs {
            return bad(
                "warmup-epochs",
                format!("{} must be below --epochs {}", self.warmup(), self.epochs),
            );
        }
        let synthetic = self.data.is_none();
        if synthetic && !(2..=MAX_SYNTHETIC).contains(&self.train_len) {
            return bad(
                "train-len",
                format!("must lie in [2, {MAX_SYNTHETIC}], got {}", self.train_len),
            );
        }
        if synthetic && !(1..=MAX_SYNTHETIC).contains(&self.val_len) {
            return bad(
                "val-len",
                format!("must lie in [1, {MAX_SYNTHETIC}], got {}", self.val_len),
            );
        }
        let max_batch = if synthetic {
            self.train_len.min(MAX_BATCH)
        } else {
            MAX_BATCH
        };
        if !(2..=max_batch).contains(&self.batch_size) {
            let what = if synthetic {
                format!(" (the training images: --train-len {})", self.train_len)
            } else {
                String::new()
            };
            return bad(
                "batch-size",
                format!(
                    "must lie in [2, {max_batch}]{what}, got {}",
                    self.batch_size
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
        if self.sync_bn && self.bn_group != 0 {
            return bad(
                "sync-bn",
                format!(
                    "takes BN statistics over the whole batch across GPUs; --bn-group {} splits them: give one or the other",
                    self.bn_group
                ),
            );
        }
        let max_size = if synthetic { SOURCE_SIZE } else { 1024 };
        if !(32..=max_size).contains(&self.size()) {
            return bad(
                "image-size",
                format!("must lie in [32, {max_size}], got {}", self.size()),
            );
        }
        if !(0.0..=1.0).contains(&self.max_bad) {
            return bad(
                "max-bad",
                format!("must lie in [0, 1], got {}", self.max_bad),
            );
        }
        if self.knn_memory_per_class == 0 {
            return bad(
                "knn-memory-per-class",
                "the kNN monitor needs at least one memory image per class, got 0".into(),
            );
        }
        if self.knn_query_per_class == 0 {
            return bad(
                "knn-query-per-class",
                "the kNN monitor needs at least one query image per class, got 0".into(),
            );
        }
        if self.knn_k == 0 {
            return bad("knn-k", "must be at least 1, got 0".into());
        }
        if self.log_every == 0 {
            return bad("log-every", "must be at least 1, got 0".into());
        }
        if !matches!(self.on_nan.as_str(), "stop" | "skip") {
            return bad(
                "on-nan",
                format!("must be stop or skip, got {:?}", self.on_nan),
            );
        }
        if self.keep == 0 {
            return bad(
                "keep",
                "must be at least 1 (checkpoints kept), got 0".into(),
            );
        }
        if self.loader_threads > MAX_THREADS {
            return bad(
                "loader-threads",
                format!(
                    "must lie in [0, {MAX_THREADS}] (0: one per core), got {}",
                    self.loader_threads
                ),
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

    /// A resumed run's config: the saved one with the settings given now. Settings that define
    /// what is trained cannot change (all of them are listed in one error); the epochs may grow or
    /// shrink, re-planning the schedule. Returns the config and a line naming what changed.
    fn for_resume(saved: &PretrainConfig, given: &Given) -> Result<(PretrainConfig, String)> {
        let mut cfg = saved.to_given();
        let (mut refused, mut changed) = (Vec::new(), Vec::new());
        for (key, value) in given {
            let mut value = value.clone();
            if matches!(key.as_str(), "data" | "val_data" | "out") {
                if let Some(p) = value.as_str() {
                    value = serde_json::Value::from(absolute(Path::new(p)).display().to_string());
                }
            }
            let old = cfg.get(key).cloned().unwrap_or(serde_json::Value::Null);
            if old == value {
                continue;
            }
            let show = |v: &serde_json::Value| match v {
                serde_json::Value::Null => "none".to_string(),
                serde_json::Value::String(s) => s.clone(),
                v => v.to_string(),
            };
            let line = format!("{} {} -> {}", flag(key), show(&old), show(&value));
            if CHANGEABLE_ON_RESUME.contains(&key.as_str()) {
                changed.push(line);
                cfg.insert(key.clone(), value);
            } else {
                refused.push(line);
            }
        }
        if !refused.is_empty() {
            return Err(Error::user(format!(
                "--resume: these settings are fixed by the run and cannot change when it resumes: {}; start a new run (--out) to change them",
                refused.join(", ")
            )));
        }
        let cfg = Self::from_given(&cfg)?;
        let note = if changed.is_empty() {
            String::new()
        } else {
            format!(" | changed on resume: {}", changed.join(", "))
        };
        Ok((cfg, note))
    }
}

/// An absolute form of a path (relative to the current directory), so a saved config works from
/// any directory; symlinks are kept as given.
fn absolute(p: &Path) -> PathBuf {
    std::path::absolute(p).unwrap_or_else(|_| p.to_path_buf())
}

/// The shape of the schedule: iterations per epoch (counted from the data the loop reads: one
/// place computes it), epochs, warmup epochs. LEWEL_SPEC 4.3 (lr) and 3.3 (EMA momentum).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Plan {
    pub iters: usize,
    pub epochs: usize,
    pub warmup: usize,
}

impl Plan {
    pub fn new(cfg: &PretrainConfig, iters: usize) -> Plan {
        Plan {
            iters,
            epochs: cfg.epochs,
            warmup: cfg.warmup(),
        }
    }

    /// Iterations of the whole run.
    pub fn total(&self) -> usize {
        self.iters * self.epochs
    }

    /// The learning rate and EMA momentum of step k (0-based) into `sc`.
    pub fn set_step(&self, cfg: &PretrainConfig, sc: &mut StepConfig, k: usize) {
        sc.lars.lr = optim::lr_at(
            cfg.lr,
            k / self.iters,
            k % self.iters,
            self.iters,
            self.warmup,
            self.epochs,
        );
        sc.ema_m = optim::ema_momentum(cfg.enc_m, k, self.total());
    }
}

/// Iterations per epoch of the built-in set (one rank, drop_last).
pub fn synthetic_iters(cfg: &PretrainConfig) -> usize {
    cfg.train_len / cfg.batch_size
}

/// The end of a run.
#[derive(Clone, Debug, PartialEq)]
pub struct Summary {
    /// kNN accuracy at init and at the end (none: the monitor was off).
    pub knn_init: Option<f64>,
    pub knn_final: Option<f64>,
    /// Loss of the run's first and last steps (none: no step was taken).
    pub first_loss: Option<f64>,
    pub last_loss: Option<f64>,
    pub epochs_done: usize,
    /// Steps taken by this invocation.
    pub steps: usize,
    pub seconds: f64,
    /// Set when a signal stopped the run before its end.
    pub stopped: Option<Stopped>,
}

/// A run stopped by a signal, its checkpoint written.
#[derive(Clone, Debug, PartialEq)]
pub struct Stopped {
    /// SIGINT, SIGTERM or SIGUSR1.
    pub signal: String,
    /// Steps done in all, of the run's total.
    pub step: usize,
    pub total: usize,
    /// The checkpoint to resume from, and the run folder.
    pub checkpoint: PathBuf,
    pub dir: PathBuf,
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
    pub first_loss: Option<f64>,
    /// How the data order and augmentation resume: no generator state is needed.
    pub rng: String,
    /// Ranks (GPUs) of the run that wrote it.
    #[serde(default = "one")]
    pub world: usize,
    /// Steps done in the epoch after `epoch` (a run stopped by a signal mid-epoch; 0 at an
    /// epoch's end), with the sum of their losses (for the epoch's mean), the loss of the last
    /// step and the bad samples skipped so far.
    #[serde(default)]
    pub in_epoch: usize,
    #[serde(default)]
    pub epoch_loss_sum: f64,
    #[serde(default)]
    pub last_loss: Option<f64>,
    #[serde(default)]
    pub skipped: usize,
    /// Steps whose update was skipped (`--on-nan skip`): in the whole run, and in the epoch
    /// after `epoch` (left out of its mean loss).
    #[serde(default)]
    pub nan_skips: usize,
    #[serde(default)]
    pub epoch_nan_skips: usize,
    pub config: PretrainConfig,
}

fn one() -> usize {
    1
}

/// The data of step k (0-based) of a run on the built-in set: a DistributedSampler-style shuffle
/// per epoch from the seed (one rank, drop_last), then two augmented views of each sample.
pub(crate) fn views_for_step(cfg: &PretrainConfig, k: usize) -> (Vec<f32>, Vec<f32>, Shape) {
    views_for_rank(cfg, k, 0, 1)
}

/// Rank `rank`'s part of step k's batch in a run of `world` ranks: the slice of the global batch
/// it takes (so the ranks together see exactly the batch one process would).
pub(crate) fn views_for_rank(
    cfg: &PretrainConfig,
    k: usize,
    rank: usize,
    world: usize,
) -> (Vec<f32>, Vec<f32>, Shape) {
    let data = Synthetic::new(cfg.seed, SOURCE_SIZE, cfg.train_len, cfg.val_len);
    let iters = synthetic_iters(cfg);
    let (epoch, i) = (k / iters, k % iters);
    let mut order: Vec<usize> = (0..cfg.train_len).collect();
    let mut r = Rng::keyed(&[cfg.seed, 0x5a3, epoch as u64]);
    for j in (1..order.len()).rev() {
        order.swap(j, r.below(j as u64 + 1) as usize);
    }
    let per = cfg.batch_size / world;
    let idx = &order[i * cfg.batch_size + rank * per..][..per];
    let size = cfg.size();
    let (v1, v2) = views_batch(&data, cfg.seed, epoch, idx, size);
    let shape = Shape::new(&[per, size, size, 3]);
    (v1, v2, shape)
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

/// How the kNN monitor's feature passes split over the ranks: each computes a contiguous share of
/// the images and `gather` (an all-gather, rank order) gives every rank all of them.
struct Shard<'a> {
    rank: usize,
    world: usize,
    gather: Option<&'a mut Gather>,
}

/// An all-gather of host floats (rank order).
type Gather = dyn FnMut(&[f32]) -> Result<Vec<f32>>;

/// Pooled online backbone features (eval mode), L2-normalized, of the items `item` yields: its
/// normalized (size, size, 3) eval view and label, or None for an image that could not be read
/// (left out). Over several ranks each computes its share and they are gathered, in item order.
fn features<B: TrainBackend>(
    m: &mut Trainer<B>,
    n: usize,
    size: usize,
    item: &(dyn Fn(usize) -> Option<(Vec<f32>, usize)> + Sync),
    shard: &mut Shard,
) -> Result<(Vec<f32>, Vec<usize>)> {
    let c = m.cfg.arch.out_channels();
    // This rank's rows [lo, hi) of `per` (the same count on every rank for the gather); a row
    // is the features and the label, -1 for an unreadable image or padding.
    let row = c + 1;
    let per = n.div_ceil(shard.world);
    let (lo, hi) = ((shard.rank * per).min(n), ((shard.rank + 1) * per).min(n));
    let mut mine = vec![0.0f32; per * row];
    mine.chunks_mut(row).for_each(|r| r[c] = -1.0);
    let own: Vec<usize> = (lo..hi).collect();
    // At most the training batch at a time: the pass shares the training graph's memory, so it
    // never asks for more than a training step did.
    let batch = m.feature_batch;
    for chunk in own.chunks(batch) {
        let items: Vec<(usize, (Vec<f32>, usize))> = chunk
            .par_iter()
            .filter_map(|&i| item(i).map(|x| (i, x)))
            .collect();
        if items.is_empty() {
            continue;
        }
        let x: Vec<f32> = items
            .iter()
            .flat_map(|(_, (v, _))| v.iter().copied())
            .collect();
        let shape = Shape::new(&[items.len(), size, size, 3]);
        let f = m.features(&x, shape).map_err(|e| match e {
            Error::OutOfMemory(m) => Error::user(format!(
                "out of GPU memory: {m}; in the kNN monitor's feature pass ({} images at a time): \
                 try a smaller --batch-size",
                items.len()
            )),
            e => e,
        })?;
        for ((i, (_, label)), f) in items.iter().zip(f.chunks(c)) {
            let r = &mut mine[(i - lo) * row..][..row];
            r[..c].copy_from_slice(f);
            r[c] = *label as f32;
        }
    }
    let all = match shard.gather.as_mut() {
        Some(gather) if shard.world > 1 => gather(&mine)?,
        _ => mine,
    };
    let (mut feats, mut labels) = (Vec::with_capacity(n * c), Vec::with_capacity(n));
    for r in all.chunks(row).filter(|r| r[c] >= 0.0) {
        feats.extend_from_slice(&r[..c]);
        labels.push(r[c] as usize);
    }
    if let Some(i) = feats.iter().position(|v| !v.is_finite()) {
        // Finite weights so large that the eval forward overflows: no accuracy to report, and no
        // checkpoint to write from them.
        return Err(Error::NonFinite(format!(
            "the kNN monitor's features are not finite (image {}, value {}): the weights overflow the forward pass; the run stops before this epoch's checkpoint, the last one is intact: resume from it with a lower --lr",
            i / c,
            feats[i]
        )));
    }
    knn::normalize_rows(&mut feats, c);
    Ok((feats, labels))
}

/// A hash of the state every rank must hold bit for bit (online and target parameters, LARS
/// momentum; not the BN running statistics, which under per-GPU BN differ until the next
/// broadcast), as four 16-bit pieces exact in f32, for an all-gather.
fn state_hash<B: TrainBackend>(m: &mut Trainer<B>) -> Result<[f32; 4]> {
    let h = m.host()?;
    let mut c = crc32fast::Hasher::new();
    let mut d = crc32fast::Hasher::new();
    for v in [&h.online.params[..], &h.target.params[..]] {
        v.iter().for_each(|x| c.update(&x.to_le_bytes()));
    }
    h.momentum.iter().for_each(|x| d.update(&x.to_le_bytes()));
    let (c, d) = (c.finalize(), d.finalize());
    Ok([c >> 16, c & 0xffff, d >> 16, d & 0xffff].map(|w| w as f32))
}

/// The ranks' state hashes, gathered: the first rank whose state differs from rank 0's is an
/// error on every rank (data parallelism keeps the ranks identical by construction; a rank that
/// drifted would otherwise train another model in silence).
fn same_state(all: &[f32], when: &str) -> Result<()> {
    let hex = |w: &[f32]| {
        w.iter()
            .map(|&x| format!("{:04x}", x as u32))
            .collect::<String>()
    };
    match all.chunks(4).position(|w| w != &all[..4]) {
        None => Ok(()),
        Some(r) => Err(Error::Other(format!(
            "rank {r}'s weights or momentum differ from rank 0's {when} (state hash {} against {}): the ranks no longer train one model (a nondeterministic kernel on one GPU, or a collective that went wrong); rerun with LEWEL_CHECK_RANKS=1 to find the first step",
            hex(&all[r * 4..][..4]),
            hex(&all[..4])
        ))),
    }
}

/// Compares the ranks' state (see [`same_state`]); nothing on one process.
fn check_ranks<B: TrainBackend>(m: &mut Trainer<B>, shard: &mut Shard, when: &str) -> Result<()> {
    let Some(gather) = shard.gather.as_mut().filter(|_| shard.world > 1) else {
        return Ok(());
    };
    let mine = state_hash(m)?;
    same_state(&gather(&mine)?, when)
}

/// The kNN monitor's labeled images.
enum KnnData {
    Synthetic(Synthetic),
    /// Real images: the memory and the queries, each a set and its indices (LEWEL_SPEC 6).
    Real {
        memory: (Arc<dyn Samples>, Vec<usize>),
        query: (Arc<dyn Samples>, Vec<usize>),
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
    /// The monitor's data, its part of the run's first line, and warnings. `train`: the training
    /// set (real data), where the disjoint protocol takes its memory.
    fn open(
        cfg: &PretrainConfig,
        train: Option<&Arc<dyn Samples>>,
    ) -> Result<(KnnData, String, Vec<String>)> {
        let mut warnings = Vec::new();
        // A vote over the whole memory predicts its most common class for every query (ties: the
        // smallest class index), whatever the features: the accuracy says nothing.
        let mut clamp = |memory: usize| {
            let k = cfg.knn_k;
            if k > memory {
                warnings.push(format!(
                    "--knn-k {k} exceeds the {memory} kNN memory images: using k = {memory}, a vote over the whole memory, which predicts its most common class for every query; lower --knn-k or raise the memory"
                ));
            } else if k == memory {
                warnings.push(format!(
                    "--knn-k {k} equals the {memory} kNN memory images: a vote over the whole memory predicts its most common class for every query; lower --knn-k or raise the memory"
                ));
            }
        };
        let (Some(data), Some(train)) = (&cfg.data, train) else {
            let d = Synthetic::new(cfg.seed, SOURCE_SIZE, cfg.train_len, cfg.val_len);
            clamp(match cfg.knn_memory {
                0 => d.train_len,
                n => n.min(d.train_len),
            });
            return Ok((KnnData::Synthetic(d), String::new(), warnings));
        };
        let val = match &cfg.val_data {
            Some(v) => Some(v.clone()),
            None => crate::data::sibling_val(data),
        };
        let Some(val) = val else {
            return Ok((
                KnnData::Off,
                " | kNN monitor off (no --val-data, no val/ beside train/)".to_string(),
                warnings,
            ));
        };
        let vs = crate::data::open_samples(&val).ctx("--val-data")?;
        let official = cfg.knn_protocol == "official";
        let (mem_set, what) = if official {
            (
                vs.clone(),
                "official protocol: memory and queries from val, the memory inside the queries",
            )
        } else {
            if vs.classes() != train.classes() || vs.class_names() != train.class_names() {
                return Err(Error::user(format!(
                    "--val-data {}: its {} classes are not the {} classes of --data {}; the kNN memory comes from --data and the queries from --val-data, so both need the same class folders (or use --knn-protocol official)",
                    val.display(),
                    vs.classes(),
                    train.classes(),
                    data.display()
                )));
            }
            (train.clone(), "memory from --data, queries from --val-data")
        };
        let memory = first_per_class(&*mem_set, cfg.knn_memory_per_class);
        let query = first_per_class(&*vs, cfg.knn_query_per_class);
        clamp(memory.len());
        let note = format!(
            " | kNN {} ({} memory, {} queries, {} classes; {what})",
            val.display(),
            memory.len(),
            query.len(),
            vs.classes()
        );
        let classes = vs.classes();
        Ok((
            KnnData::Real {
                memory: (mem_set, memory),
                query: (vs, query),
                classes,
            },
            note,
            warnings,
        ))
    }
}

/// kNN accuracy (%) of the online backbone's features; None when the monitor is off.
/// Over several ranks each computes a share of the features; rank 0 alone votes (the others get
/// None).
fn knn_monitor<B: TrainBackend>(
    m: &mut Trainer<B>,
    data: &KnnData,
    cfg: &PretrainConfig,
    shard: &mut Shard,
) -> Result<Option<f64>> {
    let c = m.cfg.arch.out_channels();
    let size = cfg.size();
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
                features(m, n_mem, size, &item(Split::Train), shard)?,
                features(m, d.val_len, size, &item(Split::Val), shard)?,
                CLASSES.len(),
            )
        }
        KnnData::Real {
            memory,
            query,
            classes,
        } => {
            // The eval transform at this size: the 256 -> 224 ratio of the recipe.
            let resize = (size * 256).div_ceil(224);
            let item = |(samples, idx): &(Arc<dyn Samples>, Vec<usize>)| {
                let (samples, idx) = (samples.clone(), idx.clone());
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
                features(m, memory.1.len(), size, &item(memory), shard)?,
                features(m, query.1.len(), size, &item(query), shard)?,
                *classes,
            )
        }
    };
    if shard.rank != 0 {
        return Ok(None);
    }
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

/// What `TrainData::open` gives: the data, its iterations per epoch, its part of the run's first
/// line, and the training images (real data).
type Opened = (TrainData, usize, String, Option<Arc<dyn Samples>>);

impl TrainData {
    /// The data, its iterations per epoch (the one place they are counted), its part of the run's
    /// first line, and the training images (real data).
    #[cfg(test)]
    fn open(cfg: &PretrainConfig) -> Result<Opened> {
        Self::open_rank(cfg, 0, 1)
    }

    /// The same for rank `rank` of `world`: it reads its own shard (DistributedSampler), in
    /// batches of its part of the global batch.
    fn open_rank(cfg: &PretrainConfig, rank: usize, world: usize) -> Result<Opened> {
        let Some(path) = &cfg.data else {
            let what = format!(
                "synthetic {} train / {} val, {}px",
                cfg.train_len,
                cfg.val_len,
                cfg.size()
            );
            return Ok((TrainData::Synthetic, synthetic_iters(cfg), what, None));
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
            cfg.size(),
            cfg.jpeg_decoder
        );
        let loader = Loader::new(
            samples.clone(),
            LoaderConfig {
                batch: cfg.batch_size / world,
                size: cfg.size(),
                seed: cfg.seed,
                threads,
                prefetch: 2,
                world,
                rank,
                max_bad: cfg.max_bad,
                photometric: true,
            },
        )?;
        let iters = loader.batches_per_epoch();
        Ok((TrainData::Real(loader), iters, what, Some(samples)))
    }
}

/// Where the model trains: the CPU reference, or a GPU in f32 or bf16.
pub(crate) enum Target {
    Cpu,
    /// The GPU, and whether it computes in bf16.
    Gpu(Rc<Gpu>, bool),
}

/// Opens the chosen device. `auto` falls back to the CPU with a note when the GPU cannot be
/// opened; `cuda` stops with the reason (exit code 2).
pub(crate) fn open_device(
    choice: DeviceChoice,
    cfg: &PretrainConfig,
) -> Result<(Target, Option<String>)> {
    let precision = cfg.precision.as_str();
    let ordinal = match device::resolve(choice) {
        Device::Cpu => {
            if precision == "bf16" {
                return Err(Error::user(
                    "--precision bf16: the CPU computes in f32 only; use --precision auto or f32, or --device cuda",
                ));
            }
            return Ok((Target::Cpu, None));
        }
        Device::Cuda(n) => n,
    };
    let gpu = match Gpu::new(ordinal, cfg.deterministic) {
        Ok(g) => Rc::new(g),
        Err(e) if choice == DeviceChoice::Auto => {
            return Ok((Target::Cpu, Some(format!("{e}; training on the CPU"))));
        }
        Err(Error::Cuda(m)) => {
            return Err(Error::user(format!(
            "--device {}: {m}; `lewel info` shows what was found; --device cpu trains on the CPU",
            cfg.device
        )))
        }
        Err(e) => return Err(e),
    };
    // bf16 GEMMs and convolutions need compute capability 8.0 (cuBLAS CUDA_R_16BF, cuDNN).
    let bf16_ok = gpu.cc >= (8, 0);
    if precision == "bf16" && !bf16_ok {
        return Err(Error::user(format!(
            "--precision bf16: {} has compute capability {}.{}; bf16 needs 8.0 or newer: use --precision auto or f32",
            gpu.name, gpu.cc.0, gpu.cc.1
        )));
    }
    let bf16 = precision != "f32" && bf16_ok;
    Ok((Target::Gpu(gpu, bf16), None))
}

/// A step whose work is done or queued, waiting for its loss to be logged.
struct StepDone {
    k: usize,
    epoch: usize,
    last_of_epoch: bool,
    lr: f64,
    ema_m: f64,
    data_ms: f64,
    /// Bad samples skipped so far.
    skipped: usize,
    mib: Option<usize>,
}

/// The losses logged so far.
struct StepLog {
    first_loss: Option<f64>,
    last_loss: Option<f64>,
}

impl StepLog {
    /// Logs a step once its loss is known (metrics.jsonl, the step line, the bar) and returns the
    /// loss; a non-finite loss stops the run. A step's time `ms` runs on the device's timeline
    /// (CUDA events on a GPU) from the end of the step before, so waits for data count.
    fn log(
        &mut self,
        log: &mut Log,
        cfg: &PretrainConfig,
        d: StepDone,
        loss: f32,
        ms: f64,
        total: usize,
    ) -> Result<f64> {
        let k = d.k;
        let loss = loss as f64;
        if !loss.is_finite() {
            return Err(Error::NonFinite(format!("the loss is {loss}")));
        }
        self.first_loss.get_or_insert(loss);
        self.last_loss = Some(loss);
        let ips = cfg.batch_size as f64 / (ms / 1e3);
        let (mib, data_ms, skipped) = (d.mib, d.data_ms, d.skipped);
        log.json(serde_json::json!({"step": k + 1, "epoch": d.epoch + 1, "loss": loss, "lr": d.lr, "ema_m": d.ema_m, "ms": ms, "img_per_s": ips, "data_ms": data_ms, "skipped": skipped, "device_mib": mib}))?;
        if (k + 1).is_multiple_of(cfg.log_every) || d.last_of_epoch {
            let mem = mib.map_or(String::new(), |v| format!(" | {v} MiB on device"));
            let bad = if skipped > 0 {
                format!(" | {skipped} skipped")
            } else {
                String::new()
            };
            log.line(&format!("step {}/{total} | loss {loss:.4} | lr {:.4} | m {:.5} | {ms:.0} ms ({data_ms:.0} data) | {ips:.0} img/s{mem}{bad}", k + 1, d.lr, d.ema_m));
        }
        if let Some(b) = &log.bar {
            b.set_message(format!("loss {loss:.4}"));
            b.inc(1);
        }
        Ok(loss)
    }
}

/// Out of GPU memory, restated with the batch size tried.
pub(crate) fn oom(e: Error, batch: usize) -> Error {
    match e {
        Error::OutOfMemory(m) => Error::user(format!(
            "out of GPU memory: {m}; batch size {batch}: try a smaller --batch-size"
        )),
        e => e,
    }
}

/// Where a run stands when it is saved: epochs done, and the steps done in the next epoch (0 at
/// an epoch's end) with what they leave for the epoch's mean.
struct Position {
    /// Epochs done.
    epoch: usize,
    iters: usize,
    in_epoch: usize,
    loss_sum: f64,
    knn_init: Option<f64>,
    knn_last: Option<f64>,
    first_loss: Option<f64>,
    last_loss: Option<f64>,
    skipped: usize,
    nan_skips: usize,
    epoch_nan_skips: usize,
    world: usize,
}

/// The end of an epoch on rank 0, on any device: the epoch's line and metrics with the kNN
/// monitor's accuracy, the checkpoint and its manifest (written atomically). Returns the accuracy.
fn end_of_epoch<B: TrainBackend>(
    m: &mut Trainer<B>,
    cfg: &PretrainConfig,
    log: &mut Log,
    at: Position,
    saved: &mut Option<Manifest>,
) -> Result<Option<f64>> {
    let logged = (at.iters - at.epoch_nan_skips).max(1);
    let (epoch, mean, knn_last) = (at.epoch, at.loss_sum / logged as f64, at.knn_last);
    match knn_last {
        Some(a) => log.line(&format!(
            "knn | epoch {epoch} | acc {a:.2}% | mean loss {mean:.4}"
        )),
        None => log.line(&format!("epoch {epoch} | mean loss {mean:.4}")),
    }
    log.json(serde_json::json!({"epoch": epoch, "knn_acc": knn_last, "mean_loss": mean}))?;
    save_at(m, cfg, at, saved)?;
    Ok(knn_last)
}

/// The checkpoint and manifest of the run at `at` (rank 0); `saved` is the manifest written
/// before, whose mid-epoch files this one replaces.
fn save_at<B: TrainBackend>(
    m: &mut Trainer<B>,
    cfg: &PretrainConfig,
    at: Position,
    saved: &mut Option<Manifest>,
) -> Result<PathBuf> {
    let mut mf = Manifest {
        epoch: at.epoch,
        step: at.epoch * at.iters + at.in_epoch,
        weights: String::new(),
        weights_crc32: 0,
        optimizer: String::new(),
        optimizer_crc32: 0,
        knn_init: at.knn_init,
        knn_last: at.knn_last,
        first_loss: at.first_loss,
        rng: "none saved: every draw is a pure function of (seed, epoch, sample, view)".into(),
        world: at.world,
        in_epoch: at.in_epoch,
        // What the next epoch has done: nothing yet at an epoch's end.
        epoch_loss_sum: if at.in_epoch == 0 { 0.0 } else { at.loss_sum },
        last_loss: at.last_loss,
        skipped: at.skipped,
        nan_skips: at.nan_skips,
        epoch_nan_skips: if at.in_epoch == 0 {
            0
        } else {
            at.epoch_nan_skips
        },
        config: cfg.clone(),
    };
    if let Err(e) = save(m.host()?, &cfg.out, &mut mf) {
        // A full disk, a quota: the manifest still names the checkpoint before, whole.
        let before = saved
            .as_ref()
            .map_or("no checkpoint was written before".to_string(), |o| {
                format!("the checkpoint before ({}) is intact", o.weights)
            });
        for f in [&mf.weights, &mf.optimizer] {
            if !f.is_empty()
                && saved
                    .as_ref()
                    .is_none_or(|o| &o.weights != f && &o.optimizer != f)
            {
                let _ = std::fs::remove_file(cfg.out.join(f));
            }
        }
        return Err(match e {
            Error::Io { path, source } => Error::Io {
                path: format!("writing the checkpoint failed ({before}): {path}"),
                source,
            },
            e => e,
        });
    }
    if let Some(old) = saved.take() {
        // A mid-epoch checkpoint is kept only until the next one.
        if old.in_epoch > 0 && old.weights != mf.weights {
            let _ = std::fs::remove_file(cfg.out.join(&old.weights));
            let _ = std::fs::remove_file(cfg.out.join(&old.optimizer));
        }
    }
    let path = cfg.out.join(&mf.weights);
    *saved = Some(mf);
    Ok(path)
}

/// Where a run reports: log and step lines on stdout, warnings on stderr (above the progress bar,
/// which draws on stderr when it is a terminal), metrics into metrics.jsonl.
struct Log {
    jsonl: Option<std::fs::File>,
    /// The same records as TensorBoard scalars (src/tensorboard.rs), beside metrics.jsonl.
    tb: Option<crate::tensorboard::Writer>,
    bar: Option<indicatif::ProgressBar>,
    /// Ranks other than 0 print only their warnings, named.
    rank: usize,
}

impl Log {
    fn print(&self, f: impl FnOnce()) {
        match &self.bar {
            Some(b) => b.suspend(f),
            None => f(),
        }
    }
    fn line(&self, s: &str) {
        if self.rank != 0 {
            return;
        }
        // A closed stdout (`lewel pretrain | head`) must not stop the run.
        self.print(|| {
            let _ = writeln!(std::io::stdout(), "{s}");
        })
    }
    fn warn(&self, s: &str) {
        self.print(|| {
            if self.rank != 0 {
                let _ = writeln!(std::io::stderr(), "warning: rank {}: {s}", self.rank);
            } else {
                let _ = writeln!(std::io::stderr(), "warning: {s}");
            }
        })
    }
    fn json(&mut self, v: serde_json::Value) -> Result<()> {
        if let Some(f) = &mut self.jsonl {
            writeln!(f, "{v}").map_err(|e| Error::io("metrics.jsonl", e))?;
        }
        match &mut self.tb {
            Some(tb) => tb.write(&v),
            None => Ok(()),
        }
    }
}

fn save(m: HostView<'_>, dir: &Path, man: &mut Manifest) -> Result<()> {
    let mut state = checkpoint::store_tensors(m.online);
    state.extend(checkpoint::store_tensors(m.target));
    let mut opt = Tensors::new();
    for e in &m.online.table.entries {
        let (sh, v) = checkpoint::to_torch(e.shape, &m.momentum[e.range()]);
        opt.insert(format!("momentum.{}", e.name), Owned::f32(sh, &v));
    }
    if man.in_epoch == 0 {
        man.weights = format!("checkpoint_{:04}.safetensors", man.epoch);
        man.optimizer = format!("optimizer_{:04}.safetensors", man.epoch);
    } else {
        // Mid-epoch (a run stopped by a signal): named by the step.
        man.weights = format!("checkpoint_s{:08}.safetensors", man.step);
        man.optimizer = format!("optimizer_s{:08}.safetensors", man.step);
    }
    checkpoint::write_file_atomic(&dir.join(&man.weights), &state, None)?;
    checkpoint::write_file_atomic(&dir.join(&man.optimizer), &opt, None)?;
    man.weights_crc32 = crc_of(&dir.join(&man.weights))?;
    man.optimizer_crc32 = crc_of(&dir.join(&man.optimizer))?;
    let json =
        serde_json::to_string_pretty(man).map_err(|e| Error::Other(format!("manifest: {e}")))?;
    checkpoint::write_bytes_atomic(&dir.join("checkpoint.json"), json.as_bytes())?;
    // Only now, with the manifest pointing at the new files, drop checkpoints beyond the newest `keep`.
    if man.in_epoch == 0 && man.epoch > man.config.keep {
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

/// A manifest from the text of checkpoint.json (`path` names it in errors). The files it names must
/// be plain file names (the run folder's): a path elsewhere would have `read_manifest` read, say,
/// /dev/zero to check its CRC.
pub fn parse_manifest(text: &str, path: &Path) -> Result<Manifest> {
    let man: Manifest = serde_json::from_str(text).map_err(|e| {
        Error::user(format!(
            "{}: not a lewel checkpoint manifest ({e})",
            path.display()
        ))
    })?;
    for (key, f) in [("weights", &man.weights), ("optimizer", &man.optimizer)] {
        if Path::new(f).file_name() != Some(std::ffi::OsStr::new(f)) {
            return Err(Error::user(format!(
                "{}: {key} \"{f}\" is not a file name in the run folder",
                path.display()
            )));
        }
    }
    Ok(man)
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
    let man = parse_manifest(&text, &mpath)?;
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

/// How a run is started, beside its config.
#[derive(Clone, Debug, Default)]
pub struct RunOptions {
    /// Stop once this many epochs are done (an interruption on purpose: resume continues it).
    pub stop_after: Option<usize>,
    /// Start over in a folder that holds a run: its config, metrics and checkpoints are deleted
    /// first (nothing else in the folder is touched).
    pub force: bool,
    /// Check everything and print the run's first line, then stop: nothing is written.
    pub dry_run: bool,
    /// This process's place in a data-parallel run (one process by default).
    pub ranks: Ranks,
    /// Test hook: act as if SIGTERM arrived once this many steps of the run are done.
    pub interrupt_at_step: Option<usize>,
    /// Test hook: step k (0-based) leaves a NaN in the gradient of the named online tensor.
    pub poison_gradient_at: Option<(usize, String)>,
}

/// The lock file of a run folder: held (flock) for the run's life, it holds the pid.
const LOCK: &str = "lewel.lock";

/// The exclusive lock on a run folder, released when dropped (and by the kernel when the process
/// dies, however it dies).
struct RunLock(#[allow(dead_code)] std::fs::File);

impl RunLock {
    /// Takes the folder's lock, or says which process holds it.
    fn acquire(dir: &Path) -> Result<RunLock> {
        let p = dir.join(LOCK);
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .map_err(|e| Error::io(&p, e))?;
        match f.try_lock() {
            Ok(()) => {
                f.set_len(0).map_err(|e| Error::io(&p, e))?;
                writeln!(f, "{}", std::process::id()).map_err(|e| Error::io(&p, e))?;
                Ok(RunLock(f))
            }
            Err(std::fs::TryLockError::WouldBlock) => Err(held(dir, &p)),
            Err(std::fs::TryLockError::Error(e)) => Err(Error::io(&p, e)),
        }
    }

    /// Fails, naming the holder, when another process holds the folder's lock; takes nothing.
    fn probe(dir: &Path) -> Result<()> {
        let p = dir.join(LOCK);
        let Ok(f) = std::fs::File::open(&p) else {
            return Ok(());
        };
        match f.try_lock_shared() {
            Err(std::fs::TryLockError::WouldBlock) => Err(held(dir, &p)),
            _ => Ok(()),
        }
    }
}

fn held(dir: &Path, lock: &Path) -> Error {
    let pid = std::fs::read_to_string(lock)
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
        .map_or("pid unknown".to_string(), |p| format!("pid {p}"));
    Error::user(format!(
        "{}: another lewel run ({pid}) is using this folder; wait for it to end, or choose another --out",
        dir.display()
    ))
}

/// The files of a run in `dir` (what --force deletes): config, metrics, manifest, checkpoints.
fn run_files(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    let mut v: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| {
            let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            matches!(n, "config.toml" | "metrics.jsonl" | "checkpoint.json")
                || n == crate::tensorboard::EVENTS_FILE
                || ((n.starts_with("checkpoint_") || n.starts_with("optimizer_"))
                    && n.ends_with(".safetensors"))
        })
        .collect();
    v.sort();
    v
}

/// A new run may start in `dir`: it holds no run, or `force` says to start over.
fn check_new_folder(dir: &Path, force: bool) -> Result<()> {
    let files = run_files(dir);
    if files.is_empty() || force {
        return Ok(());
    }
    let d = dir.display();
    let what = match read_manifest(dir) {
        Ok((_, man)) => format!(
            "holds a run ({} of {} epochs done); continue it with --resume {d} (with --epochs N to extend it)",
            man.epoch, man.config.epochs
        ),
        Err(_) if dir.join("checkpoint.json").exists() => {
            "holds a run whose checkpoint cannot be read".to_string()
        }
        Err(_) => {
            let names: Vec<String> = files
                .iter()
                .filter_map(|p| p.file_name().map(|n| n.to_string_lossy().into_owned()))
                .collect();
            format!(
                "holds a run that stopped before its first checkpoint ({})",
                names.join(", ")
            )
        }
    };
    Err(Error::user(format!(
        "--out {d}: {what}; start over with --force (deletes its config, metrics and checkpoints), or choose another --out"
    )))
}

/// Starts a new run in `cfg.out`. A folder that holds a run is refused unless `opts.force`.
pub fn pretrain(cfg: &PretrainConfig, opts: &RunOptions) -> Result<Summary> {
    let mut c = cfg.clone();
    // Saved absolute, so a resume works from any directory.
    c.out = absolute(&c.out);
    c.data = c.data.as_deref().map(absolute);
    c.val_data = c.val_data.as_deref().map(absolute);
    let notes = c.auto_notes();
    let c = c.resolved();
    if opts.ranks.rank == 0 {
        // Rank 0 alone owns the run folder.
        RunLock::probe(&c.out)?;
        check_new_folder(&c.out, opts.force)?;
    }
    run(c, None, notes, String::new(), opts)
}

/// Continues the run in `path` (a run folder or its checkpoint.json) with the settings `given`
/// now: `epochs` extends (or shortens) it, re-planning the schedule; settings that define what is
/// trained are refused if they differ from the run's.
pub fn resume(path: &Path, given: &Given, opts: &RunOptions) -> Result<Summary> {
    let dir = if path.is_dir() {
        path.to_path_buf()
    } else {
        path.parent().unwrap_or(Path::new(".")).to_path_buf()
    };
    let p = path.display();
    if !path.exists() {
        return Err(Error::user(format!("--resume {p}: no such run folder")));
    }
    if path.is_dir() && !dir.join("checkpoint.json").exists() {
        return Err(Error::user(if run_files(&dir).is_empty() {
            format!("--resume {p}: not a lewel run folder (no checkpoint.json)")
        } else {
            format!(
                "--resume {p}: the run stopped before its first checkpoint (written at the end of each epoch), so there is nothing to resume; start it again with --out {p} --force"
            )
        }));
    }
    if opts.ranks.rank == 0 {
        RunLock::probe(&dir)?;
    }
    let (dir, man) = read_manifest(path).ctx("--resume")?;
    let (mut cfg, mut notes) = PretrainConfig::for_resume(&man.config, given)?;
    cfg.out = absolute(&dir);
    if cfg.epochs <= man.epoch {
        return Err(Error::user(if given.contains_key("epochs") {
            format!(
                "--epochs {}: the run in {p} has done {} epochs; to extend it pass more",
                cfg.epochs, man.epoch
            )
        } else {
            format!(
                "--resume {p}: the run is complete ({} of {} epochs); pass --epochs N with N > {} to extend it",
                man.epoch, cfg.epochs, man.epoch
            )
        }));
    }
    if man.world != opts.ranks.world && cfg.sync_bn {
        notes += &format!(
            " | resumed on {} rank(s), the checkpoint was written by {}: BN is synced over the whole batch either way, but on real data each rank's shard changes",
            opts.ranks.world, man.world
        );
    } else if man.world != opts.ranks.world {
        notes += &format!(
            " | resumed on {} rank(s), the checkpoint was written by {}: BN sees {} samples per GPU instead of {}, and on real data each rank's shard changes, so the run is not the one an uninterrupted run would have been",
            opts.ranks.world,
            man.world,
            cfg.batch_size / opts.ranks.world.max(1),
            cfg.batch_size / man.world.max(1)
        );
    }
    if cfg.epochs != man.config.epochs {
        notes += &format!(
            " | re-planned from {} to {} epochs: the cosine lr and the EMA momentum follow the new plan from epoch {} on",
            man.config.epochs,
            cfg.epochs,
            man.epoch + 1
        );
    }
    run(cfg, Some(man), String::new(), notes, opts)
}

/// The run: `man` is the checkpoint it resumes from. Everything is checked and opened before the
/// folder is written.
fn run(
    cfg: PretrainConfig,
    man: Option<Manifest>,
    warmup_note: String,
    notes: String,
    opts: &RunOptions,
) -> Result<Summary> {
    let t0 = Instant::now();
    let ranks = opts.ranks.clone();
    let world = ranks.world;
    let (lc, sc) = cfg.validate()?;
    let mut choice = cfg.device.parse::<DeviceChoice>()?;
    if world > 1 {
        check_world(&cfg, world)?;
        // Per-GPU BN: each rank's BN sees its own samples (or its --bn-group groups of them);
        // --sync-bn: the whole batch's (data_parallel syncs the graphs).
        // `cuda` (and `auto`) on a rank mean the GPU of its local rank; cuda:N stays N.
        if !cfg.device.starts_with("cuda:") {
            choice = DeviceChoice::Cuda(ranks.local_rank);
        }
    }
    crate::data::decode::set_jpeg_decoder(cfg.jpeg_decoder.parse()?)?;
    let (train, iters, data_line, train_samples) = TrainData::open_rank(&cfg, ranks.rank, world)?;
    let plan = Plan::new(&cfg, iters);
    let (knn_data, knn_line, warnings) = KnnData::open(&cfg, train_samples.as_ref())?;

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
    let (target, note) = open_device(choice, &cfg).map_err(|e| match e {
        // A rank's device is its local rank's GPU, whatever --device said.
        Error::User(m) if world > 1 => Error::user(format!(
            "rank {} of {world} trains on cuda:{} (its local rank): {}",
            opts.ranks.rank,
            opts.ranks.local_rank,
            m.split_once(": ")
                .map_or(m.as_str(), |(_, why)| why)
                .trim_end_matches("; --device cpu trains on the CPU")
        )),
        e => e,
    })?;
    let batch = cfg.batch_size / world;
    let opened = OpenRun {
        t0,
        cfg,
        man,
        warmup_note,
        notes,
        lc,
        sc,
        train,
        iters,
        data_line,
        plan,
        knn_data,
        knn_line,
        warnings: note.into_iter().chain(warnings).collect(),
        start_epoch,
        params,
        ranks,
        nccl: None,
    };
    // Dispatched once, on the device and the precision: the loop is generic over the backend.
    match target {
        Target::Cpu => train_loop(m, opened, opts),
        Target::Gpu(gpu, false) => {
            let mut m = m
                .to_device(Cuda::<f32>::new(gpu.clone()))
                .map_err(|e| oom(e, batch))?;
            let opened = data_parallel(&mut m, &gpu, opened)?;
            train_loop(m, opened, opts)
        }
        Target::Gpu(gpu, true) => {
            let mut m = m
                .to_device(Cuda::<half::bf16>::new(gpu.clone()))
                .map_err(|e| oom(e, batch))?;
            let opened = data_parallel(&mut m, &gpu, opened)?;
            train_loop(m, opened, opts)
        }
    }
}

/// A run opened: its config, data, schedule and monitor, before the device takes the model.
struct OpenRun {
    t0: Instant,
    cfg: PretrainConfig,
    man: Option<Manifest>,
    warmup_note: String,
    notes: String,
    lc: LewelConfig,
    sc: StepConfig,
    train: TrainData,
    iters: usize,
    data_line: String,
    plan: Plan,
    knn_data: KnnData,
    knn_line: String,
    warnings: Vec<String>,
    start_epoch: usize,
    params: usize,
    ranks: Ranks,
    /// The communicator of a data-parallel run on GPUs.
    nccl: Option<Rc<std::cell::RefCell<Nccl>>>,
}

/// A global batch that splits over the ranks, on GPUs.
pub fn check_world(cfg: &PretrainConfig, world: usize) -> Result<()> {
    let b = cfg.batch_size;
    if !b.is_multiple_of(world) {
        return Err(Error::user(format!(
            "--batch-size {b}: the global batch does not split evenly over {world} ranks: use a multiple of {world}"
        )));
    }
    let per = b / world;
    if per < 2 {
        return Err(Error::user(format!(
            "--batch-size {b}: {per} sample per rank over {world} ranks; BN needs at least 2 on each GPU"
        )));
    }
    if cfg.bn_group != 0 && !per.is_multiple_of(cfg.bn_group) {
        return Err(Error::user(format!(
            "--bn-group {}: does not divide the {per} samples each of the {world} ranks takes",
            cfg.bn_group
        )));
    }
    if cfg.device == "cpu" {
        let instead = if cfg.sync_bn {
            "one process's BN already takes the whole batch, as --sync-bn does".to_string()
        } else {
            format!("--bn-group {per} gives their per-GPU BN in one process")
        };
        return Err(Error::user(format!(
            "--device cpu: a run of {world} ranks trains on GPUs, one per rank; on the CPU, {instead}"
        )));
    }
    Ok(())
}

/// On a GPU in a run of several ranks: meets the other ranks, makes rank 0's state everyone's,
/// and hooks the collectives into the step (gradients averaged in buckets during backward, loss
/// averaged, BN running statistics broadcast from rank 0 before every forward, as DDP does; with
/// --sync-bn the BN statistics summed over the ranks).
fn data_parallel<E: crate::gpu::GpuFloat>(
    m: &mut Trainer<Cuda<E>>,
    gpu: &Rc<Gpu>,
    mut o: OpenRun,
) -> Result<OpenRun>
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    if o.ranks.world == 1 {
        return Ok(o);
    }
    let secs = |var: &str, default: u64| -> Result<std::time::Duration> {
        match std::env::var(var) {
            Ok(v) => v
                .parse::<u64>()
                .ok()
                .filter(|&s| s > 0)
                .map(std::time::Duration::from_secs)
                .ok_or_else(|| Error::user(format!("{var}={v}: expected whole seconds above 0"))),
            Err(_) => Ok(std::time::Duration::from_secs(default)),
        }
    };
    let nccl = Nccl::connect(
        gpu,
        &o.ranks,
        secs("LEWEL_RENDEZVOUS_TIMEOUT", 300)?,
        secs("LEWEL_DIST_TIMEOUT", 1800)?,
    )?;
    let nccl = Rc::new(std::cell::RefCell::new(nccl));
    {
        // Every rank starts from rank 0's weights, statistics and momentum.
        let mut c = nccl.borrow_mut();
        let (p, _, b) = Cuda::<E>::f_side(&mut m.g.store, &mut m.g.w);
        c.broadcast(p, 0)?;
        c.broadcast(b, 0)?;
        let (p, _, b) = Cuda::<E>::f_side(&mut m.tg.store, &mut m.tg.w);
        c.broadcast(p, 0)?;
        c.broadcast(b, 0)?;
        c.broadcast(&mut m.momentum, 0)?;
        // The compute-dtype copies follow.
        m.g.dev.refresh(&mut m.g.store, &mut m.g.w)?;
        m.tg.dev.refresh(&mut m.tg.store, &mut m.tg.w)?;
        m.g.dev.sync()?;
    }
    // Gradients: averaged in buckets as backward finishes each (overlapping the rest of it), of
    // LEWEL_BUCKET_MB MiB (PyTorch DDP's 25 by default); 0: one all-reduce after backward.
    let mib = match std::env::var("LEWEL_BUCKET_MB") {
        Ok(v) => v
            .parse::<f64>()
            .ok()
            .filter(|x| x.is_finite() && *x >= 0.0)
            .ok_or_else(|| {
                Error::user(format!(
                    "LEWEL_BUCKET_MB={v}: expected MiB per gradient bucket (25 by default; 0: one all-reduce after backward)"
                ))
            })?,
        Err(_) => 25.0,
    };
    let elems = (mib * (1 << 20) as f64 / 4.0) as usize;
    if elems == 0 {
        let c = nccl.clone();
        m.grad_hook = Some(Box::new(move |_, grads| {
            c.borrow_mut().all_reduce_mean(grads)
        }));
    } else {
        m.g.set_grad_reduce(Some(Box::new(crate::dist::nccl::GradBuckets {
            nccl: nccl.clone(),
            elems,
        })));
    }
    let c = nccl.clone();
    m.loss_hook = Some(Box::new(move |_, loss| {
        c.borrow_mut().all_reduce_mean(loss)
    }));
    if o.cfg.sync_bn {
        // SyncBN: every train-mode BN of both networks sums its statistics over the ranks.
        let sync: Rc<crate::ops::batchnorm::DevSync> =
            Rc::new(crate::dist::nccl::BnSync(nccl.clone()));
        m.g.set_bn_sync(Some(sync.clone()));
        m.tg.set_bn_sync(Some(sync));
    }
    let c = nccl.clone();
    m.buffer_hook = Some(Box::new(move |_, online, target| {
        let mut c = c.borrow_mut();
        c.broadcast(online, 0)?;
        c.broadcast(target, 0)
    }));
    o.nccl = Some(nccl);
    Ok(o)
}

/// The loop over epochs and steps, the end of each epoch (kNN, checkpoint), on any device.
fn train_loop<B: TrainBackend>(
    mut m: Trainer<B>,
    o: OpenRun,
    opts: &RunOptions,
) -> Result<Summary> {
    let OpenRun {
        t0,
        cfg,
        man,
        warmup_note,
        notes,
        lc,
        mut sc,
        mut train,
        iters,
        data_line,
        plan,
        knn_data,
        knn_line,
        warnings,
        start_epoch,
        params,
        ranks,
        nccl,
    } = o;
    let (rank, world) = (ranks.rank, ranks.world);
    // Rank 0 alone reports and writes; the others train quietly (their errors still show).
    let lead = rank == 0;
    let mut gather = nccl
        .clone()
        .map(|c| move |v: &[f32]| c.borrow_mut().all_gather_host(v));
    let mut shard = Shard {
        rank,
        world,
        gather: gather.as_mut().map(|g| g as &mut Gather),
    };
    let dev = m.g.dev.clone();
    if dev.has_device_memory() {
        m.feature_batch = (cfg.batch_size / world).clamp(1, 128);
    }
    let mut log = Log {
        jsonl: None,
        tb: None,
        bar: None,
        rank,
    };
    let batch_line = if world > 1 {
        let from = match ranks.source {
            crate::dist::ranks::Source::Torchrun => "torchrun's ranks",
            crate::dist::ranks::Source::Slurm => "Slurm's ranks",
            _ => "ranks from flags",
        };
        let bn = if cfg.sync_bn {
            "SyncBN over all"
        } else {
            "BN per GPU"
        };
        format!(
            "{} ({} on each of {world} GPUs, {bn}, {from})",
            cfg.batch_size,
            cfg.batch_size / world
        )
    } else {
        cfg.batch_size.to_string()
    };
    for w in &warnings {
        log.warn(w);
    }
    log.line(&format!(
        "lewel pretrain | {} {} | {params} params | device {} | {data_line}{knn_line} | batch {} | {} epochs x {iters} iters = {} steps, warmup {}{} | lr {} wd {} m0 {} | out {}{notes}",
        cfg.method,
        lc.arch.name(),
        dev.describe(),
        batch_line,
        cfg.epochs,
        plan.total(),
        plan.warmup,
        warmup_note,
        cfg.lr,
        cfg.wd,
        cfg.enc_m,
        cfg.out.display()
    ));
    if opts.dry_run {
        log.line("dry run: everything checked, nothing written");
        return Ok(Summary {
            knn_init: man.as_ref().and_then(|m| m.knn_init),
            knn_final: man.as_ref().and_then(|m| m.knn_last),
            first_loss: None,
            last_loss: None,
            epochs_done: start_epoch,
            steps: 0,
            seconds: t0.elapsed().as_secs_f64(),
            stopped: None,
        });
    }

    // Everything is checked: from here on the run folder is written, under its lock, by rank 0
    // alone.
    let _lock = if lead {
        std::fs::create_dir_all(&cfg.out).map_err(|e| Error::io(&cfg.out, e))?;
        let lock = RunLock::acquire(&cfg.out)?;
        if man.is_none() {
            // Again under the lock: another run may have started here since the first look.
            check_new_folder(&cfg.out, opts.force)?;
            for f in run_files(&cfg.out) {
                std::fs::remove_file(&f).map_err(|e| Error::io(&f, e))?;
            }
        }
        remove_stale_temp_files(&cfg.out);
        let toml_text = toml::to_string(&cfg).map_err(|e| Error::Other(format!("config: {e}")))?;
        checkpoint::write_bytes_atomic(&cfg.out.join("config.toml"), toml_text.as_bytes())?;
        let metrics = cfg.out.join("metrics.jsonl");
        if let Some(man) = &man {
            // Steps after the checkpoint (a run killed before it could save) are run again:
            // their old records go, so each step is in the metrics once.
            truncate_metrics(&metrics, man)?;
            // TensorBoard's events mirror the metrics.
            crate::tensorboard::rewrite_from_metrics(&cfg.out)?;
        }
        log.jsonl = Some(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&metrics)
                .map_err(|e| Error::io(&metrics, e))?,
        );
        log.tb = Some(crate::tensorboard::Writer::open(&cfg.out)?);
        Some(lock)
    } else {
        None
    };
    if let (TrainData::Real(l), Some(ctx)) = (&mut train, dev.context()) {
        // On a GPU the loader makes the crops, in pinned memory; jitter, blur, solarize and
        // normalize run there.
        l.cfg.photometric = false;
        if cfg.pin_memory {
            if let Err(why) = l.pin_memory(&ctx) {
                log.warn(&why);
            }
        }
    }
    let total = plan.total();
    let tty = std::io::stderr().is_terminal();
    let (knn_init, first_loss) = match &man {
        Some(man) => {
            let at = if man.in_epoch > 0 {
                format!(
                    "step {} of {total} ({} of {iters} steps into epoch {})",
                    man.step,
                    man.in_epoch,
                    man.epoch + 1
                )
            } else {
                format!("epoch {} of {}", man.epoch, cfg.epochs)
            };
            log.line(&format!(
                "resumed from {} at {at}",
                cfg.out.join(&man.weights).display()
            ));
            (man.knn_init, man.first_loss)
        }
        None => {
            // Every rank computes its share of the kNN monitor's features; rank 0 votes.
            let acc = knn_monitor(&mut m, &knn_data, &cfg, &mut shard)?;
            if let Some(a) = acc {
                log.line(&format!("knn | epoch 0 | acc {a:.2}%"));
                log.json(serde_json::json!({"epoch": 0, "knn_acc": a}))?;
            }
            (acc, None)
        }
    };
    let mut knn_last = man.as_ref().map_or(knn_init, |m| m.knn_last);
    // Where the first epoch starts: a checkpoint written mid-epoch resumes at its step.
    let (start_in_epoch, resumed_loss_sum) = man.as_ref().map_or((0, (0.0, 0)), |m| {
        (m.in_epoch, (m.epoch_loss_sum, m.epoch_nan_skips))
    });
    if start_in_epoch >= iters {
        return Err(Error::user(format!(
            "{}: the checkpoint is at step {start_in_epoch} of an epoch of {iters} steps: the data changed since",
            cfg.out.join("checkpoint.json").display()
        )));
    }
    if tty && lead {
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
    let mut skipped = man.as_ref().map_or(0, |m| m.skipped);
    let mut steps = StepLog {
        first_loss,
        last_loss: man.as_ref().and_then(|m| m.last_loss),
    };
    // The manifest last written (its mid-epoch files go when the next is written), the steps
    // taken here and those not yet in a checkpoint.
    let mut saved = man.clone();
    let mut steps_run = 0usize;
    let mut unsaved = 0usize;
    let mut stopped = None;
    let skip_mode = cfg.on_nan == "skip";
    m.keep_buffers = skip_mode;
    let mut nan_skips = man.as_ref().map_or(0, |m| m.nan_skips);
    let progress = || {
        if let Some(c) = &nccl {
            c.borrow().progress();
        }
    };
    if let Some(c) = &nccl {
        c.borrow().arm(true);
    }
    // The ranks' state is compared at every epoch's end, and after every step with
    // LEWEL_CHECK_RANKS=1 (a download of the state per step: for debugging).
    let every_step_check = world > 1 && std::env::var("LEWEL_CHECK_RANKS").is_ok_and(|v| v == "1");
    'epochs: for epoch in start_epoch..cfg.epochs {
        let first = if epoch == start_epoch {
            start_in_epoch
        } else {
            0
        };
        let (mut loss_sum, mut epoch_nan_skips) = if epoch == start_epoch {
            resumed_loss_sum
        } else {
            (0.0, 0)
        };
        let mut batches = match &train {
            TrainData::Real(l) => Some(l.epoch(epoch as u64, first)),
            TrainData::Synthetic => None,
        };
        // A step's loss is read once the next step is queued (on a GPU the host never waits with
        // the GPU idle); steps are logged in order.
        let mut waiting: Option<StepDone> = None;
        for i in first..iters {
            let k = epoch * iters + i;
            // A stop asked for (a signal, on any rank) ends the run before this step, with
            // a checkpoint of the steps before it.
            let local = if opts.interrupt_at_step == Some(k) {
                Some(libc::SIGTERM)
            } else {
                crate::signals::requested()
            };
            // Ranks agree every STOP_EVERY steps (an all-gather of the flag), alone every step.
            if world == 1 || (i - first).is_multiple_of(STOP_EVERY) {
                if let Some(sig) = stop_agreed(&mut shard, local)? {
                    if let Some(w) = waiting.take() {
                        let (l, ms) = m
                            .take_loss()
                            .map_err(|e| non_finite_at(e, w.k, total, &saved))?;
                        progress();
                        loss_sum += steps.log(&mut log, &cfg, w, l, ms, total)?;
                    }
                    let at = Position {
                        epoch,
                        iters,
                        in_epoch: i,
                        loss_sum,
                        knn_init,
                        knn_last,
                        first_loss: steps.first_loss,
                        last_loss: steps.last_loss,
                        skipped,
                        nan_skips,
                        epoch_nan_skips,
                        world,
                    };
                    let checkpoint = match (&saved, lead) {
                        // Nothing new since the last checkpoint: it stands.
                        (Some(s), _) if unsaved == 0 => cfg.out.join(&s.weights),
                        (_, true) => save_at(&mut m, &cfg, at, &mut saved)?,
                        (_, false) => PathBuf::new(),
                    };
                    stopped = Some(Stopped {
                        signal: crate::signals::name(sig),
                        step: k,
                        total,
                        checkpoint,
                        dir: cfg.out.clone(),
                    });
                    break 'epochs;
                }
            }
            let ts = Instant::now();
            plan.set_step(&cfg, &mut sc, k);
            let batch = cfg.batch_size / world;
            if let Some((at, name)) = &opts.poison_gradient_at {
                if *at == k {
                    m.poison_gradient(name)?;
                }
            }
            let data_ms = match &mut batches {
                None => {
                    let (v1, v2, shape) = views_for_rank(&cfg, k, rank, world);
                    let data_ms = ts.elapsed().as_secs_f64() * 1e3;
                    m.queue_forward_backward(&v1, &v2, shape, &sc)
                        .map_err(|e| oom(e, batch))?;
                    data_ms
                }
                Some(ep) => {
                    let b = ep
                        .next()
                        .ok_or_else(|| Error::Other("the loader stopped early".into()))??;
                    for (j, why) in &b.new_bad {
                        log.warn(&format!("skipped sample {j}: {why}"));
                    }
                    let s = cfg.size();
                    let shape = Shape::new(&[batch, s, s, 3]);
                    if b.view1.is_empty() {
                        let p =
                            |i: usize| b.params[i].iter().map(AugParams::new).collect::<Vec<_>>();
                        let (p1, p2) = (p(0), p(1));
                        m.queue_forward_backward_crops(
                            [&b.crops[0], &b.crops[1]],
                            [&p1, &p2],
                            shape,
                            &sc,
                        )
                    } else {
                        m.queue_forward_backward(&b.view1, &b.view2, shape, &sc)
                    }
                    .map_err(|e| oom(e, batch))?;
                    let wait = b.wait_ms;
                    skipped += b.bad;
                    if let TrainData::Real(l) = &train {
                        // The copies from its crops are queued, each pinned buffer's event
                        // recorded behind them.
                        l.recycle(b);
                    }
                    wait
                }
            };
            if skip_mode {
                if let Some(why) = m.skip_if_non_finite(&sc)? {
                    // The step before is logged first: the metrics stay in step order.
                    if let Some(w) = waiting.take() {
                        let (l, ms) = m
                            .take_loss()
                            .map_err(|e| non_finite_at(e, w.k, total, &saved))?;
                        progress();
                        loss_sum += steps.log(&mut log, &cfg, w, l, ms, total)?;
                    }
                    nan_skips += 1;
                    epoch_nan_skips += 1;
                    steps_run += 1;
                    unsaved += 1;
                    if nan_skips > cfg.max_nan_skips {
                        return Err(non_finite_at(
                            Error::NonFinite(format!(
                                "{why}, and {nan_skips} steps were skipped, more than --max-nan-skips {}",
                                cfg.max_nan_skips
                            )),
                            k,
                            total,
                            &saved,
                        ));
                    }
                    log.warn(&format!(
                        "step {}: {why}: its update is skipped ({nan_skips} skipped, at most {})",
                        k + 1,
                        cfg.max_nan_skips
                    ));
                    log.json(serde_json::json!({"step": k + 1, "epoch": epoch + 1, "loss": null, "lr": sc.lars.lr, "ema_m": sc.ema_m, "skipped_update": why, "nan_skips": nan_skips}))?;
                    if let Some(b) = &log.bar {
                        b.inc(1);
                    }
                    continue;
                }
            }
            m.update(&sc)?;
            if every_step_check {
                check_ranks(&mut m, &mut shard, &format!("after step {}", k + 1))?;
            }
            if let Some(why) = dev.take_find_failure() {
                log.warn(&format!(
                    "benchmarking cuDNN algorithms failed ({why}); using cuDNN's heuristic choice"
                ));
            }
            let done = StepDone {
                k,
                epoch,
                last_of_epoch: i + 1 == iters,
                lr: sc.lars.lr,
                ema_m: sc.ema_m,
                data_ms,
                skipped,
                mib: dev.has_device_memory().then(|| m.device_bytes() >> 20),
            };
            steps_run += 1;
            unsaved += 1;
            if let Some(w) = waiting.replace(done) {
                let (l, ms) = m
                    .take_loss()
                    .map_err(|e| non_finite_at(e, w.k, total, &saved))?;
                progress();
                loss_sum += steps.log(&mut log, &cfg, w, l, ms, total)?;
            }
        }
        if let Some(w) = waiting.take() {
            let (l, ms) = m
                .take_loss()
                .map_err(|e| non_finite_at(e, w.k, total, &saved))?;
            progress();
            loss_sum += steps.log(&mut log, &cfg, w, l, ms, total)?;
        }
        epochs_done = epoch + 1;
        m.restart_step_clock();
        check_ranks(&mut m, &mut shard, &format!("after epoch {epochs_done}"))?;
        let acc = knn_monitor(&mut m, &knn_data, &cfg, &mut shard)?;
        if lead {
            let at = Position {
                epoch: epochs_done,
                iters,
                in_epoch: 0,
                loss_sum,
                knn_init,
                knn_last: acc,
                first_loss: steps.first_loss,
                last_loss: steps.last_loss,
                skipped,
                nan_skips,
                epoch_nan_skips,
                world,
            };
            knn_last = end_of_epoch(&mut m, &cfg, &mut log, at, &mut saved)?;
        }
        unsaved = 0;
        progress();
        if opts.stop_after == Some(epochs_done) {
            break;
        }
    }
    if let Some(b) = &log.bar {
        b.finish_and_clear();
    }
    Ok(Summary {
        knn_init,
        knn_final: knn_last,
        first_loss: steps.first_loss,
        last_loss: steps.last_loss,
        epochs_done,
        steps: steps_run,
        seconds: t0.elapsed().as_secs_f64(),
        stopped,
    })
}

/// A NaN or infinity met at step k (0-based): the message says where, and which checkpoint is
/// the last good one (none is written after it).
fn non_finite_at(e: Error, k: usize, total: usize, saved: &Option<Manifest>) -> Error {
    let Error::NonFinite(what) = e else {
        return e;
    };
    // --on-nan skip helps with a loss or gradient, not with weights an update overflowed.
    let skip = if what.contains("gradient") || what.contains("loss is") {
        ", or pass --on-nan skip"
    } else {
        ""
    };
    let last = match saved {
        Some(m) => format!(
            "the last checkpoint (step {}, {}) is intact: resume from it with a lower --lr{skip}",
            m.step, m.weights
        ),
        None => format!("no checkpoint was written yet: lower --lr{skip}"),
    };
    Error::NonFinite(format!(
        "step {} of {total}: {what}; the run stops; {last}",
        k + 1
    ))
}

/// Steps between the ranks' agreements on a stop (each an all-gather of one flag).
const STOP_EVERY: usize = 16;

/// The stop signal any rank has received (the first rank's, in rank order), or this process's
/// alone.
fn stop_agreed(shard: &mut Shard, local: Option<i32>) -> Result<Option<i32>> {
    let Some(gather) = shard.gather.as_mut() else {
        return Ok(local);
    };
    let all = gather(&[local.unwrap_or(0) as f32])?;
    Ok(all.iter().map(|&v| v as i32).find(|&v| v != 0))
}

/// Drops the temp files of atomic writes that a killed run left in its folder (called under the
/// folder's lock: no other lewel process writes there).
fn remove_stale_temp_files(dir: &Path) {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let n = e.file_name();
        let n = n.to_string_lossy();
        if n.starts_with('.') && n.contains(".tmp-") {
            let _ = std::fs::remove_file(e.path());
        }
    }
}

/// Keeps the records of metrics.jsonl up to the checkpoint `man` (steps up to its step, epochs up
/// to its epoch; anything else stays), rewritten atomically when some go.
fn truncate_metrics(path: &Path, man: &Manifest) -> Result<()> {
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(Error::io(path, e)),
    };
    let mut kept = String::with_capacity(text.len());
    let mut dropped = false;
    for line in text.lines() {
        let v: Option<serde_json::Value> = serde_json::from_str(line).ok();
        let num = |k: &str| v.as_ref().and_then(|v| v.get(k)).and_then(|x| x.as_u64());
        let keep = match (num("step"), num("epoch")) {
            (Some(step), _) => step as usize <= man.step,
            (None, Some(epoch)) => epoch as usize <= man.epoch,
            // A line cut short by a kill, or not a record: dropped.
            _ => v.is_some(),
        };
        if keep {
            kept.push_str(line);
            kept.push('\n');
        } else {
            dropped = true;
        }
    }
    if dropped || !text.ends_with('\n') && !text.is_empty() {
        checkpoint::write_bytes_atomic(path, kept.as_bytes())?;
    }
    Ok(())
}

/// The weights file behind a run folder, a manifest, or a state file given directly.
pub(crate) fn weights_file(checkpoint_path: &Path) -> Result<PathBuf> {
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

/// Images `lewel embed` reads: normalized tensors, or image files put through the eval transform.
pub(crate) enum EmbedInput {
    /// `images`, float32 NCHW (N, 3, H, W), already normalized.
    Tensor {
        v: Vec<f32>,
        n: usize,
        h: usize,
        w: usize,
    },
    /// An ImageFolder or a packed file (labeled).
    Set(crate::data::source::Source),
    /// Image files, in this order.
    Files(Vec<PathBuf>),
}

impl EmbedInput {
    pub(crate) fn open(path: &Path) -> Result<EmbedInput> {
        let p = path.display();
        let meta = std::fs::metadata(path).map_err(|e| Error::io(path, e))?;
        if meta.is_dir() {
            let mut files: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| Error::io(path, e))?
                .filter_map(|e| e.ok())
                .map(|e| e.path())
                .filter(|f| {
                    f.is_file()
                        && f.file_name()
                            .is_some_and(crate::data::folder::has_image_extension)
                })
                .collect();
            if files.is_empty() {
                // No images directly inside: an ImageFolder (class folders) or nothing.
                return Ok(EmbedInput::Set(crate::data::source::Source::open(path)?));
            }
            files.sort();
            return Ok(EmbedInput::Files(files));
        }
        if crate::data::pack::has_magic(path) {
            return Ok(EmbedInput::Set(crate::data::source::Source::open(path)?));
        }
        let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
        if crate::data::decode::sniff(&bytes) != crate::data::decode::Format::Unknown {
            return Ok(EmbedInput::Files(vec![path.to_path_buf()]));
        }
        let it = checkpoint::read_bytes(&bytes, path).map_err(|_| {
            Error::user(format!(
                "--images {p}: expected an image file, a folder of images, an ImageFolder, a file made by `lewel pack`, or a safetensors with a float32 NCHW tensor 'images'"
            ))
        })?;
        let im = it
            .get("images")
            .ok_or_else(|| Error::user(format!("{p}: no tensor 'images'")))?;
        let v = im
            .to_f32()
            .ok_or_else(|| Error::user(format!("{p}: images is {:?}, expected F32", im.dtype)))?;
        if im.shape.len() != 4 || im.shape[1] != 3 || im.shape[2] < 32 || im.shape[3] < 32 {
            return Err(Error::user(format!(
                "{p}: images has shape {:?}, expected (N, 3, H >= 32, W >= 32)",
                im.shape
            )));
        }
        Ok(EmbedInput::Tensor {
            v,
            n: im.shape[0],
            h: im.shape[2],
            w: im.shape[3],
        })
    }

    pub(crate) fn len(&self) -> usize {
        match self {
            EmbedInput::Tensor { n, .. } => *n,
            EmbedInput::Set(s) => s.len(),
            EmbedInput::Files(f) => f.len(),
        }
    }

    /// Image i as the network's NHWC input (h, w): normalized, through the eval transform for files.
    pub(crate) fn item(&self, i: usize, size: usize) -> Result<(Vec<f32>, usize, usize)> {
        let img = match self {
            EmbedInput::Tensor { v, h, w, .. } => {
                let one = &v[i * 3 * h * w..][..3 * h * w];
                return Ok((crate::train::nchw_to_nhwc(one, 1, 3, *h, *w), *h, *w));
            }
            EmbedInput::Set(s) => s.decode(i).map_err(|e| Error::user(e.to_string()))?,
            EmbedInput::Files(f) => {
                let b = std::fs::read(&f[i]).map_err(|e| Error::io(&f[i], e))?;
                crate::data::decode::decode(&b)
                    .map_err(|e| Error::user(format!("{}: {e}", f[i].display())))?
            }
        };
        let v = transforms::eval_view(&img, (size * 256).div_ceil(224), size);
        let mut out = vec![0.0; size * size * 3];
        pil::normalize(&v, &mut out);
        Ok((out, size, size))
    }
}

/// What `lewel embed` wrote.
pub struct Embedded {
    pub n: usize,
    pub dim: usize,
    /// Whether `labels` were written (an ImageFolder or a packed file).
    pub labeled: bool,
}

/// `lewel embed`: pooled backbone features (eval-mode BN, not normalized) from a LEWEL state (its
/// online backbone), a run folder, or an exported backbone. `images`: image files, a folder of
/// them, an ImageFolder or packed file (then `labels` too), each through the eval transform
/// (resize the shorter side to size * 256 / 224, center crop `size`, ImageNet mean/std); or a
/// safetensors of float32 NCHW `images`, already normalized.
pub fn embed(checkpoint_path: &Path, images: &Path, out: &Path, size: usize) -> Result<Embedded> {
    if !(32..=1024).contains(&size) {
        return Err(Error::user(format!(
            "--image-size: must lie in [32, 1024], got {size}"
        )));
    }
    let (s, net, arch, what) = crate::eval::linear::load_backbone(checkpoint_path, None)?;
    let input = EmbedInput::open(images)?;
    let n = input.len();
    let c = arch.out_channels();
    let mut g = crate::graph::Graph::cpu(s);
    g.set_recording(false);
    let mut feats = Vec::with_capacity(n * c);
    for start in (0..n).step_by(64) {
        let b = (n - start).min(64);
        let items = (start..start + b)
            .into_par_iter()
            .map(|i| input.item(i, size))
            .collect::<Result<Vec<_>>>()?;
        let (h, w) = (items[0].1, items[0].2);
        let x: Vec<f32> = items.into_iter().flat_map(|(v, _, _)| v).collect();
        g.reset();
        let x = g.input(Shape::new(&[b, h, w, 3]), &x);
        let f = net.forward(&mut g, x, crate::graph::BnMode::Eval);
        let p = g.avgpool(f);
        feats.extend_from_slice(g.value(p));
    }
    let mut o = Tensors::new();
    o.insert("features".into(), Owned::f32(vec![n, c], &feats));
    let labeled = matches!(input, EmbedInput::Set(_));
    if let EmbedInput::Set(set) = &input {
        let labels: Vec<i64> = (0..n).map(|i| set.label(i) as i64).collect();
        o.insert("labels".into(), Owned::i64(vec![n], &labels));
    }
    let mut meta = std::collections::HashMap::new();
    meta.insert("checkpoint".to_string(), what);
    if !matches!(input, EmbedInput::Tensor { .. }) {
        meta.insert(
            "transform".to_string(),
            format!(
                "resize {} (shorter side, PIL bilinear), center crop {size}, ImageNet mean/std",
                (size * 256).div_ceil(224)
            ),
        );
    }
    if let EmbedInput::Files(f) = &input {
        let names: Vec<String> = f.iter().map(|p| p.display().to_string()).collect();
        meta.insert(
            "files".to_string(),
            serde_json::to_string(&names).unwrap_or_default(),
        );
    }
    checkpoint::write_file_atomic(out, &o, Some(meta))?;
    Ok(Embedded { n, dim: c, labeled })
}

#[cfg(test)]
pub(crate) fn stop(epochs: usize) -> RunOptions {
    RunOptions {
        stop_after: Some(epochs),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ranks' state check: equal hashes pass; a rank whose parameters moved by one ulp, or
    /// whose momentum alone differs, is named on every rank.
    #[test]
    fn a_rank_whose_state_drifted_is_named() {
        let cfg =
            crate::model::lewel::LewelConfig::new(crate::model::resnet::Arch::TINY, 4, 1.0, 0.5);
        let mut m = crate::train::Lewel::new(cfg, 5);
        let h0 = state_hash(&mut m).unwrap();
        assert_eq!(state_hash(&mut m).unwrap(), h0);
        same_state(&[h0, h0, h0].concat(), "after epoch 1").unwrap();
        m.g.store.params[7] = f32::from_bits(m.g.store.params[7].to_bits() + 1);
        let h1 = state_hash(&mut m).unwrap();
        assert_ne!(h1, h0);
        let e = same_state(&[h0, h0, h1].concat(), "after step 3")
            .unwrap_err()
            .to_string();
        assert!(
            e.starts_with("rank 2's weights or momentum differ from rank 0's after step 3"),
            "{e}"
        );
        m.g.store.params[7] = f32::from_bits(m.g.store.params[7].to_bits() - 1);
        m.momentum[0] += 1.0;
        let h2 = state_hash(&mut m).unwrap();
        assert!(h2[..2] == h0[..2] && h2[2..] != h0[2..]);
        assert!(same_state(&[h0, h2].concat(), "x")
            .unwrap_err()
            .to_string()
            .starts_with("rank 1"));
    }

    fn small(out: PathBuf) -> PretrainConfig {
        PretrainConfig {
            epochs: 2,
            warmup_epochs: Some(1),
            batch_size: 16,
            train_len: 64,
            val_len: 40,
            image_size: Some(32),
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
                format!(
                    "{} {} {} {} {}",
                    v["step"], v["loss"], v["knn_acc"], v["lr"], v["mean_loss"]
                )
            })
            .collect()
    }

    /// A NaN in one gradient (the test hook) stops the run in that step with exit code 3,
    /// naming the tensor and the last checkpoint, which stays loadable; with `--on-nan skip` the
    /// step is skipped, counted and logged, and the run ends with finite weights; past
    /// `--max-nan-skips` it stops.
    #[test]
    fn a_nan_gradient_is_caught_named_and_stops_or_is_skipped() {
        let name = "online_net.backbone.layer1.0.conv1.weight";
        let poison = |k: usize| RunOptions {
            poison_gradient_at: Some((k, name.into())),
            ..Default::default()
        };
        let d = tmp("nan-stop");
        let e = pretrain(&small(d.clone()), &poison(5)).unwrap_err();
        assert_eq!(e.exit_code(), 3, "{e}");
        let msg = e.to_string();
        assert!(
            msg.starts_with(&format!(
                "step 6 of 8: the gradient of {name} is not finite"
            )),
            "{msg}"
        );
        assert!(
            msg.contains("the last checkpoint (step 4, checkpoint_0001.safetensors) is intact"),
            "{msg}"
        );
        let (_, man) = read_manifest(&d).unwrap();
        assert_eq!((man.epoch, man.step), (1, 4));
        let last_step = step_numbers(&d).last().copied();
        assert_eq!(last_step, Some(5), "steps after the bad one are not logged");

        let skip = |out: PathBuf, limit: usize| PretrainConfig {
            on_nan: "skip".into(),
            max_nan_skips: limit,
            ..small(out)
        };
        let d = tmp("nan-skip");
        let s = pretrain(&skip(d.clone(), 1), &poison(5)).unwrap();
        assert_eq!((s.epochs_done, s.steps), (2, 8));
        let recs: Vec<serde_json::Value> = std::fs::read_to_string(d.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        let skipped: Vec<_> = recs
            .iter()
            .filter(|r| r.get("skipped_update").is_some())
            .collect();
        assert_eq!(skipped.len(), 1);
        assert_eq!(
            (
                skipped[0]["step"].as_u64(),
                skipped[0]["nan_skips"].as_u64()
            ),
            (Some(6), Some(1))
        );
        assert!(skipped[0]["skipped_update"]
            .as_str()
            .unwrap()
            .contains(name));
        assert_eq!(
            step_numbers(&d),
            (1..=8).collect::<Vec<_>>(),
            "each step once, in order"
        );
        let w = checkpoint::read_file(&d.join("checkpoint_0002.safetensors")).unwrap();
        assert!(w
            .values()
            .all(|t| t.to_f32().is_none_or(|v| v.iter().all(|x| x.is_finite()))));
        let (_, man) = read_manifest(&d).unwrap();
        assert_eq!(man.nan_skips, 1);

        let d = tmp("nan-limit");
        let e = pretrain(&skip(d.clone(), 0), &poison(5)).unwrap_err();
        assert_eq!(e.exit_code(), 3);
        assert!(e.to_string().contains("more than --max-nan-skips 0"), "{e}");
    }

    /// A skipped step leaves no trace: weights, target, momentum and the BN statistics are
    /// bitwise what they were before it, and the next step runs as if it never happened.
    #[test]
    fn a_skipped_step_is_undone_bit_for_bit() {
        let cfg = small(tmp("undo"));
        let (lc, mut sc) = cfg.validate().unwrap();
        let plan = Plan::new(&cfg, synthetic_iters(&cfg));
        let mut m = crate::train::Lewel::new(lc, cfg.seed);
        m.keep_buffers = true;
        let snapshot = |m: &mut crate::train::Lewel| {
            let h = m.host().unwrap();
            let mut v = h.online.params.clone();
            v.extend(&h.online.buffers);
            v.extend(&h.target.params);
            v.extend(&h.target.buffers);
            v.extend(h.momentum);
            (
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                h.online.counters.clone(),
            )
        };
        let step = |m: &mut crate::train::Lewel, sc: &mut StepConfig, k: usize, bad: bool| {
            plan.set_step(&cfg, sc, k);
            let (v1, v2, shape) = views_for_step(&cfg, k);
            if bad {
                m.poison_gradient("online_net.backbone.conv1.weight")
                    .unwrap();
            }
            m.queue_forward_backward(&v1, &v2, shape, sc).unwrap();
            let why = m.skip_if_non_finite(sc).unwrap();
            if why.is_none() {
                m.update(sc).unwrap();
                m.take_loss().unwrap();
            }
            why
        };
        assert_eq!(step(&mut m, &mut sc, 0, false), None);
        let before = snapshot(&mut m);
        let why = step(&mut m, &mut sc, 1, true).expect("skipped");
        assert!(why.contains("online_net.backbone.conv1.weight"), "{why}");
        assert!(
            snapshot(&mut m) == before,
            "the skipped step changed the state"
        );
        // Without the skip the same state would have moved.
        assert_eq!(step(&mut m, &mut sc, 1, false), None);
        assert!(snapshot(&mut m) != before);
    }

    fn step_numbers(dir: &Path) -> Vec<u64> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter_map(|v| v.get("step").and_then(|s| s.as_u64()))
            .collect()
    }

    /// A stop asked for mid-epoch (the SIGTERM test hook) writes a checkpoint at that step;
    /// resuming gives the uninterrupted run's weights and metrics, each step once, even after a
    /// kill left records past the checkpoint, a cut-off line and a temp file behind.
    #[test]
    fn a_stop_mid_epoch_resumes_exactly_with_each_step_once() {
        let (a, b) = (tmp("nostop"), tmp("midstop"));
        let full = pretrain(&small(a.clone()), &RunOptions::default()).unwrap();
        assert_eq!(full.stopped, None);
        let hook = RunOptions {
            interrupt_at_step: Some(6),
            ..Default::default()
        };
        let first = pretrain(&small(b.clone()), &hook).unwrap();
        let st = first.stopped.expect("the run stops");
        assert_eq!((st.signal.as_str(), st.step, st.total), ("SIGTERM", 6, 8));
        assert_eq!(st.checkpoint, b.join("checkpoint_s00000006.safetensors"));
        assert_eq!((first.steps, first.epochs_done), (6, 1));
        let (_, man) = read_manifest(&b).unwrap();
        assert_eq!((man.epoch, man.step, man.in_epoch), (1, 6, 2));
        // What a kill after step 7 (before any checkpoint) leaves: step 7's record, half a
        // record, a temp file.
        let mut extra = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
        extra += "{\"step\": 7, \"epoch\": 2, \"loss\": 9.0}\n{\"step\": 8, \"ep";
        std::fs::write(b.join("metrics.jsonl"), extra).unwrap();
        std::fs::write(b.join(".checkpoint_0002.safetensors.tmp-1"), b"half").unwrap();
        // Stopped again before its first step: the checkpoint stands, nothing is rewritten.
        let again = resume(
            &b,
            &Given::new(),
            &RunOptions {
                interrupt_at_step: Some(6),
                ..Default::default()
            },
        )
        .unwrap();
        assert_eq!(again.stopped.unwrap().checkpoint, st.checkpoint);
        assert!(!b.join(".checkpoint_0002.safetensors.tmp-1").exists());
        let resumed = resume(&b, &Given::new(), &RunOptions::default()).unwrap();
        assert_eq!((resumed.steps, resumed.stopped), (2, None));
        assert_eq!(
            (resumed.knn_final, resumed.last_loss.map(f64::to_bits)),
            (full.knn_final, full.last_loss.map(f64::to_bits))
        );
        let wa = std::fs::read(a.join("checkpoint_0002.safetensors")).unwrap();
        let wb = std::fs::read(b.join("checkpoint_0002.safetensors")).unwrap();
        assert!(wa == wb, "weights after a mid-epoch resume differ");
        assert_eq!(
            losses(&a),
            losses(&b),
            "each step once, with the same values"
        );
        // The mid-epoch files went with the next checkpoint.
        assert!(!b.join("checkpoint_s00000006.safetensors").exists());
        assert!(!b.join("optimizer_s00000006.safetensors").exists());
    }

    #[test]
    fn resume_after_an_interruption_is_exact() {
        let (a, b) = (tmp("full"), tmp("split"));
        let full = pretrain(&small(a.clone()), &RunOptions::default()).unwrap();
        let first = pretrain(&small(b.clone()), &stop(1)).unwrap();
        assert_eq!(first.epochs_done, 1);
        assert!(b.join("checkpoint_0001.safetensors").exists());
        let resumed = resume(&b, &Given::new(), &RunOptions::default()).unwrap();
        assert_eq!(
            (
                resumed.knn_final,
                resumed.last_loss.map(f64::to_bits),
                resumed.epochs_done
            ),
            (full.knn_final, full.last_loss.map(f64::to_bits), 2)
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
        let e = embed(&a, &ip, &f1, 224).unwrap();
        assert_eq!((e.n, e.dim, e.labeled), (3, 256, false));
        embed(&ex, &ip, &f2, 224).unwrap();
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
                    warmup_epochs: Some(0),
                    ..Default::default()
                },
            ),
            (
                "--warmup-epochs",
                PretrainConfig {
                    epochs: 3,
                    warmup_epochs: Some(3),
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
        let e = resume(&d.join("nothing"), &Given::new(), &RunOptions::default()).unwrap_err();
        assert!(
            e.to_string().contains("--resume") && e.exit_code() == 2,
            "{e}"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Found in review beside the manifest fuzz target (fuzz/seeds/manifest/bad-dev-zero.json): a
    /// manifest naming a file outside the run folder had it read whole for its CRC (/dev/zero:
    /// memory without bound). The names must be the folder's own files.
    #[test]
    fn a_manifest_names_only_files_of_its_run_folder() {
        let dir = tmp("manifest-names");
        let run = dir.join("run");
        std::fs::create_dir_all(&run).unwrap();
        std::fs::write(dir.join("outside.safetensors"), b"x").unwrap();
        std::fs::write(run.join("optimizer_0001.safetensors"), b"y").unwrap();
        let (cx, cy) = (crc32fast::hash(b"x"), crc32fast::hash(b"y"));
        let text = |weights: &str| {
            let mut m = serde_json::json!({
                "epoch": 1, "step": 62, "weights": weights, "weights_crc32": cx,
                "optimizer": "optimizer_0001.safetensors", "optimizer_crc32": cy,
                "knn_init": null, "knn_last": null, "first_loss": null, "rng": "",
            });
            m["config"] = serde_json::to_value(PretrainConfig::default()).unwrap();
            m.to_string()
        };
        for bad in [
            "../outside.safetensors",
            "/dev/zero",
            "",
            "..",
            "sub/w.safetensors",
        ] {
            std::fs::write(run.join("checkpoint.json"), text(bad)).unwrap();
            let e = read_manifest(&run).unwrap_err().to_string();
            assert_eq!(
                e,
                format!(
                    "{}: weights \"{bad}\" is not a file name in the run folder",
                    run.join("checkpoint.json").display()
                )
            );
        }
        std::fs::copy(dir.join("outside.safetensors"), run.join("w.safetensors")).unwrap();
        std::fs::write(run.join("checkpoint.json"), text("w.safetensors")).unwrap();
        assert_eq!(read_manifest(&run).unwrap().1.weights, "w.safetensors");
        std::fs::remove_dir_all(&dir).unwrap();
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
            warmup_epochs: Some(1),
            batch_size: 64,
            image_size: Some(32),
            log_every: 1000,
            device: "cpu".into(),
            knn_k: 3,
            out: d.join(out),
            ..Default::default()
        };
        let full = pretrain(&cfg("full"), &RunOptions::default()).unwrap();
        assert!(
            full.knn_init.is_some(),
            "val/ beside train/ feeds the monitor"
        );
        pretrain(&cfg("split"), &stop(1)).unwrap();
        let resumed = resume(&d.join("split"), &Given::new(), &RunOptions::default()).unwrap();
        assert_eq!(
            (resumed.knn_final, resumed.last_loss.map(f64::to_bits)),
            (full.knn_final, full.last_loss.map(f64::to_bits))
        );
        let w = |r: &str| std::fs::read(d.join(r).join("checkpoint_0002.safetensors")).unwrap();
        assert!(w("full") == w("split"), "weights after resume differ");
        // Stopped mid-epoch: the loader starts the epoch's order at the checkpoint's batch.
        let hook = RunOptions {
            interrupt_at_step: Some(5),
            ..Default::default()
        };
        let st = pretrain(&cfg("mid"), &hook).unwrap().stopped.unwrap();
        assert_eq!(st.step, 5);
        let resumed = resume(&d.join("mid"), &Given::new(), &RunOptions::default()).unwrap();
        assert_eq!(resumed.steps, 3);
        assert_eq!(
            (resumed.knn_final, resumed.last_loss.map(f64::to_bits)),
            (full.knn_final, full.last_loss.map(f64::to_bits))
        );
        assert!(
            w("full") == w("mid"),
            "weights after a mid-epoch resume differ"
        );
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
            warmup_epochs: Some(1),
            batch_size: 32,
            image_size: Some(32),
            log_every: 1000,
            device: "cpu".into(),
            loader_threads: 2,
            out: d.join("run"),
            ..Default::default()
        };
        let s = pretrain(&cfg, &RunOptions::default()).unwrap();
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

    /// An ImageFolder of `classes` x `per_class` generated 40x32 JPEGs (noise keyed by `seed`).
    fn folder(root: &Path, classes: &[&str], per_class: usize, seed: u64) {
        for (c, class) in classes.iter().enumerate() {
            let dir = root.join(class);
            std::fs::create_dir_all(&dir).unwrap();
            for i in 0..per_class {
                let (w, h) = (40, 32);
                let mut r = Rng::keyed(&[seed, c as u64, i as u64]);
                let data = (0..w * h * 3).map(|_| r.below(256) as u8).collect();
                let jpg = encode_jpeg(&RgbImage { w, h, data }, 90).unwrap();
                std::fs::write(dir.join(format!("img{i:03}.jpg")), jpg).unwrap();
            }
        }
    }

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lewel-real-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// 2 classes x 20 images: 40 samples, 5 iterations per epoch at batch 8.
    fn small_real(d: &Path, out: &str) -> PretrainConfig {
        if !d.join("train").exists() {
            folder(&d.join("train"), &["cat", "dog"], 20, 1);
        }
        PretrainConfig {
            data: Some(d.join("train")),
            epochs: 3,
            warmup_epochs: Some(1),
            batch_size: 8,
            image_size: Some(32),
            log_every: 1000,
            device: "cpu".into(),
            loader_threads: 1,
            out: d.join(out),
            ..Default::default()
        }
    }

    fn step_lines(dir: &Path) -> Vec<serde_json::Value> {
        std::fs::read_to_string(dir.join("metrics.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|v| v.get("step").is_some())
            .collect()
    }

    /// LEWEL_SPEC 4.3, written out here rather than taken from optim.rs: step k (0-based) of a run
    /// of `e` epochs of `i` iterations, `w` of them warmup.
    fn spec_lr(base: f64, k: usize, i: usize, w: usize, e: usize) -> f64 {
        let epoch = k / i;
        if epoch < w {
            base * (k + 1) as f64 / (w * i) as f64
        } else {
            let t = (epoch - w) as f64 / (e - w) as f64;
            base * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
        }
    }

    /// LEWEL_SPEC 3.3: m_k = 1 - (1 - m0) (cos(pi k / K) + 1) / 2.
    fn spec_m(m0: f64, k: usize, total: usize) -> f64 {
        1.0 - (1.0 - m0) * ((std::f64::consts::PI * k as f64 / total as f64).cos() + 1.0) / 2.0
    }

    /// Each step's lr and EMA momentum in metrics.jsonl against the spec's formulas for a plan of
    /// `epochs` x `iters`, from step `from` (1-based) on.
    fn assert_schedule(
        lines: &[serde_json::Value],
        cfg: &PretrainConfig,
        iters: usize,
        epochs: usize,
        from: usize,
    ) {
        for v in lines
            .iter()
            .filter(|v| v["step"].as_u64().unwrap() as usize >= from)
        {
            let k = v["step"].as_u64().unwrap() as usize - 1;
            let (lr, m) = (v["lr"].as_f64().unwrap(), v["ema_m"].as_f64().unwrap());
            let want_lr = spec_lr(cfg.lr, k, iters, cfg.warmup(), epochs);
            let want_m = spec_m(cfg.enc_m, k, iters * epochs);
            assert!(
                (lr - want_lr).abs() <= 1e-12 * want_lr.abs().max(1.0)
                    && (m - want_m).abs() <= 1e-12,
                "step {}: lr {lr} m {m}, the spec says lr {want_lr} m {want_m} ({epochs} epochs x {iters} iters)",
                k + 1
            );
        }
    }

    /// On real data the schedule is sized by the data: I = floor(N / B) iterations per epoch
    /// (40 images at batch 8: 5), whatever --train-len says.
    #[test]
    fn schedule_on_real_data_is_sized_by_the_data() {
        let d = tmp("schedule");
        let cfg = small_real(&d, "run");
        let s = pretrain(&cfg, &RunOptions::default()).unwrap();
        assert_eq!((s.epochs_done, s.steps), (3, 15));
        let lines = step_lines(&d.join("run"));
        assert_eq!(lines.len(), 15, "3 epochs x 5 iterations");
        assert_schedule(&lines, &cfg, 5, 3, 1);
        // Warmup reaches the base lr at the end of epoch 1; the last epoch is not zero.
        assert_eq!(lines[4]["lr"].as_f64(), Some(cfg.lr));
        assert!(lines[14]["lr"].as_f64().unwrap() > 0.0);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A finished run is extended by --resume with more --epochs: the steps already taken keep
    /// their schedule, the new ones follow the plan over the new total; a complete run without
    /// more epochs, or fewer epochs than done, is refused.
    #[test]
    fn resume_extends_a_finished_run() {
        let d = tmp("extend");
        let mut cfg = small_real(&d, "run");
        cfg.epochs = 2;
        pretrain(&cfg, &RunOptions::default()).unwrap();
        let run = d.join("run");
        let e = resume(&run, &Given::new(), &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("complete (2 of 2 epochs)") && e.contains("--epochs N"),
            "{e}"
        );
        let mut g = Given::new();
        g.insert("epochs".into(), 2.into());
        let e = resume(&run, &g, &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--epochs 2:"), "{e}");
        g.insert("epochs".into(), 3.into());
        let s = resume(&run, &g, &RunOptions::default()).unwrap();
        assert_eq!((s.epochs_done, s.steps), (3, 5));
        let lines = step_lines(&run);
        assert_eq!(lines.len(), 15);
        assert_schedule(&lines[..10], &cfg, 5, 2, 1);
        assert_schedule(&lines, &cfg, 5, 3, 11);
        let saved = PretrainConfig::from_toml(&run.join("config.toml")).unwrap();
        assert_eq!(saved.epochs, 3, "config.toml says the new plan");
        assert!(run.join("checkpoint_0003.safetensors").exists());
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Settings that define what is trained cannot change on resume: all of them are named in one
    /// error, old and new value; nothing is written.
    #[test]
    fn resume_refuses_changed_training_settings() {
        let d = tmp("refuse");
        let mut cfg = small_real(&d, "run");
        cfg.epochs = 1;
        cfg.warmup_epochs = None;
        pretrain(&cfg, &RunOptions::default()).unwrap();
        let run = d.join("run");
        let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
        let mut g = Given::new();
        g.insert("epochs".into(), 2.into());
        g.insert("batch_size".into(), 16.into());
        g.insert("arch".into(), "resnet50".into());
        g.insert("lr".into(), 1.0.into()); // the same value: not a change
        let e = resume(&run, &g, &RunOptions::default()).unwrap_err();
        assert!(matches!(e, Error::User(_)));
        let e = e.to_string();
        assert!(
            e.contains("--batch-size 8 -> 16")
                && e.contains("--arch tiny -> resnet50")
                && !e.contains("--lr"),
            "{e}"
        );
        assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// --out on a folder holding a run is refused (naming --resume and --force) and nothing in it
    /// changes; --force starts over (the old metrics and checkpoints are gone).
    #[test]
    fn a_run_folder_is_never_clobbered() {
        let d = tmp("clobber");
        let mut cfg = small_real(&d, "run");
        cfg.epochs = 1;
        cfg.warmup_epochs = None;
        pretrain(&cfg, &RunOptions::default()).unwrap();
        let run = d.join("run");
        let before = std::fs::read(run.join("metrics.jsonl")).unwrap();
        let e = pretrain(&cfg, &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("--resume") && e.contains("--force") && e.contains("holds a run"),
            "{e}"
        );
        assert_eq!(std::fs::read(run.join("metrics.jsonl")).unwrap(), before);
        std::fs::write(run.join("notes.txt"), "mine").unwrap();
        std::fs::write(run.join("checkpoint_0009.safetensors"), "stale").unwrap();
        let force = RunOptions {
            force: true,
            ..Default::default()
        };
        pretrain(&cfg, &force).unwrap();
        assert_eq!(step_lines(&run).len(), 5, "one run's metrics, not two");
        assert!(!run.join("checkpoint_0009.safetensors").exists());
        assert_eq!(
            std::fs::read_to_string(run.join("notes.txt")).unwrap(),
            "mine"
        );
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// While a run holds a folder's lock, a second run there fails at once naming the holder's
    /// pid, and so does a resume of it.
    #[test]
    fn a_locked_run_folder_is_refused() {
        let d = tmp("lock");
        let cfg = small_real(&d, "run");
        std::fs::create_dir_all(&cfg.out).unwrap();
        let lock = RunLock::acquire(&cfg.out).unwrap();
        let pid = format!("pid {}", std::process::id());
        let e = pretrain(&cfg, &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("another lewel run") && e.contains(&pid), "{e}");
        assert!(!cfg.out.join("config.toml").exists(), "nothing written");
        drop(lock);
        let mut c1 = cfg.clone();
        c1.epochs = 1;
        c1.warmup_epochs = None;
        pretrain(&c1, &RunOptions::default()).unwrap();
        let _lock = RunLock::acquire(&cfg.out).unwrap();
        let mut g = Given::new();
        g.insert("epochs".into(), 2.into());
        let e = resume(&cfg.out, &g, &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains(&pid), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A run that stopped before its first checkpoint: resume says so in plain words, and a new
    /// run there is refused until --force.
    #[test]
    fn a_run_stopped_before_its_first_checkpoint_says_so() {
        let d = tmp("early");
        let cfg = small_real(&d, "run");
        std::fs::create_dir_all(&cfg.out).unwrap();
        std::fs::write(cfg.out.join("config.toml"), "epochs = 3\n").unwrap();
        std::fs::write(cfg.out.join("metrics.jsonl"), "").unwrap();
        let e = resume(&cfg.out, &Given::new(), &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("stopped before its first checkpoint") && e.contains("--force"),
            "{e}"
        );
        let e = pretrain(&cfg, &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("stopped before its first checkpoint"), "{e}");
        let e = resume(&d.join("nowhere"), &Given::new(), &RunOptions::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("no such run folder"), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// The kNN monitor on real data: under the official protocol the memory is inside the queries,
    /// so k = 1 finds every query itself (100%); the disjoint protocol's memory comes from the
    /// training set, so it cannot. Class folders that differ are refused under disjoint.
    #[test]
    fn knn_protocols_on_real_data() {
        let d = tmp("knn");
        folder(&d.join("val"), &["cat", "dog"], 6, 2);
        let mut cfg = small_real(&d, "official");
        cfg.epochs = 1;
        cfg.warmup_epochs = None;
        cfg.knn_k = 1;
        cfg.knn_memory_per_class = 6;
        cfg.knn_query_per_class = 6;
        cfg.knn_protocol = "official".into();
        let s = pretrain(&cfg, &RunOptions::default()).unwrap();
        assert_eq!(s.knn_init, Some(100.0));
        cfg.knn_protocol = "disjoint".into();
        cfg.out = d.join("disjoint");
        let (data, line, warnings) =
            KnnData::open(&cfg, TrainData::open(&cfg).unwrap().3.as_ref()).unwrap();
        assert!(
            line.contains("memory from --data") && warnings.is_empty(),
            "{line}"
        );
        let KnnData::Real { memory, query, .. } = &data else {
            panic!("real data gives a real monitor")
        };
        assert_eq!((memory.1.len(), query.1.len()), (12, 12));
        let train_names = memory.0.class_names();
        assert_eq!(
            train_names,
            Some(vec!["cat".to_string(), "dog".to_string()])
        );
        assert!(
            !Arc::ptr_eq(&memory.0, &query.0),
            "memory and queries from different sets"
        );
        // k above the memory is clamped, with a warning.
        cfg.knn_k = 20;
        cfg.knn_memory_per_class = 2;
        let (_, _, warnings) =
            KnnData::open(&cfg, TrainData::open(&cfg).unwrap().3.as_ref()).unwrap();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("--knn-k 20 exceeds the 4 kNN memory images")),
            "{warnings:?}"
        );
        cfg.knn_k = 4;
        let (_, _, warnings) =
            KnnData::open(&cfg, TrainData::open(&cfg).unwrap().3.as_ref()).unwrap();
        assert!(
            warnings
                .iter()
                .any(|w| w.contains("--knn-k 4 equals the 4 kNN memory images")),
            "{warnings:?}"
        );
        // Different class folders: refused under disjoint, accepted under official.
        folder(&d.join("val2"), &["cat", "emu"], 2, 3);
        cfg.val_data = Some(d.join("val2"));
        let e = KnnData::open(&cfg, TrainData::open(&cfg).unwrap().3.as_ref())
            .err()
            .unwrap()
            .to_string();
        assert!(
            e.starts_with("--val-data") && e.contains("--knn-protocol official"),
            "{e}"
        );
        cfg.knn_protocol = "official".into();
        assert!(KnnData::open(&cfg, TrainData::open(&cfg).unwrap().3.as_ref()).is_ok());
        std::fs::remove_dir_all(&d).unwrap();
    }
}
