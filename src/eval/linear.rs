//! `lewel linear`: the linear probe of LEWEL_SPEC 8 (`main_lincls.py`'s recipe). The backbone is
//! frozen in eval mode (BN uses the pretrained running statistics; nothing of it changes, which is
//! checked after training by a hash of every backbone value), and linear heads on its pooled
//! features are trained with SGD (momentum 0.9, weight decay 0, lr 0.4 at batch 256, x0.1 at epochs
//! 30 and 40 of 50, heads initialized N(0, 0.01), bias 0) on DefaultTrain views
//! (RandomResizedCrop(size, scale (0.08, 1)), flip), then scored on the eval transform (resize to
//! size * 256 / 224, centre crop) by top-1 and top-5.
//!
//! Several learning rates train in one pass: one head per rate, all fed the same batch features
//! (one linear map of heads x classes outputs, `ops::xent` per head). The heads never interact, so
//! each is what a run with its rate alone would train. `features_cache` extracts centre-crop
//! features once and trains on those (no augmentation: much faster, and the probe sees the eval
//! view of every training image, which changes the training numbers and usually costs some
//! accuracy on ImageNet; the validation protocol is the same).
//!
//! Everything runs on one backend (the CPU or a GPU) through the graph: the backbone forward, the
//! heads, the cross-entropy and the SGD step. The run folder holds `linear.toml` (the settings),
//! `metrics.jsonl` (a line per epoch), `linear_state.safetensors` (heads, momentum, epoch: what
//! `--resume` continues from, written atomically every epoch) and `linear.json` (the results).

use crate::backend::{Cpu, Cuda};
use crate::checkpoint::{self, Owned, Tensors};
use crate::data::loader::Samples;
use crate::data::pil::{self, Rgb8};
use crate::data::transforms;
use crate::graph::{BnMode, Graph, Kernels};
use crate::memory::{ParamId, ParamStore};
use crate::model::resnet::{Arch, ResNet};
use crate::optim::{OptimKernels, SgdConfig};
use crate::rng::Rng;
use crate::tensor::Shape;
use crate::{Error, Result};
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The probe's settings (`linear.toml` in its folder).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct LinearConfig {
    /// The backbone: a run folder, its checkpoint.json, a LEWEL state or an exported backbone.
    pub checkpoint: PathBuf,
    /// Training images (an ImageFolder, its parent holding train/ and val/, or a packed file);
    /// none: the built-in synthetic set of the checkpoint's run.
    pub data: Option<PathBuf>,
    /// Validation images; none: val/ beside `data`'s train/.
    pub val_data: Option<PathBuf>,
    /// One head per learning rate (absolute, for `batch_size`).
    pub lrs: Vec<f64>,
    pub epochs: usize,
    /// Epochs at which every rate is multiplied by 0.1.
    pub milestones: Vec<usize>,
    pub batch_size: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Side of the crops; none: 224, or the run's image size on the synthetic set.
    pub image_size: Option<usize>,
    pub seed: u64,
    /// Score the validation set every this many epochs (and after the last).
    pub eval_every: usize,
    /// Train on centre-crop features extracted once (no augmentation).
    pub features_cache: bool,
    /// A randomly initialized backbone of the checkpoint's architecture (the baseline).
    pub random_init: bool,
    /// auto, cpu, cuda or cuda:N.
    pub device: String,
    /// Deliberately wrong, for testing the frozen-backbone check: the backbone's BN in train
    /// mode, so its running statistics move.
    #[serde(default)]
    pub train_bn: bool,
}

impl LinearConfig {
    /// The official recipe for `checkpoint`.
    pub fn new(checkpoint: PathBuf) -> LinearConfig {
        LinearConfig {
            checkpoint,
            data: None,
            val_data: None,
            lrs: vec![0.4],
            epochs: 50,
            milestones: vec![30, 40],
            batch_size: 256,
            momentum: 0.9,
            weight_decay: 0.0,
            image_size: None,
            seed: 0,
            eval_every: 5,
            features_cache: false,
            random_init: false,
            device: "auto".into(),
            train_bn: false,
        }
    }

    fn check(&self) -> Result<()> {
        if self.lrs.is_empty() {
            return Err(Error::user("--lr: at least one learning rate"));
        }
        for &lr in &self.lrs {
            if !(lr.is_finite() && lr > 0.0) {
                return Err(Error::user(format!(
                    "--lr: every learning rate must be a positive number, got {lr}"
                )));
            }
        }
        check_schedule(
            self.epochs,
            self.batch_size,
            self.eval_every,
            self.momentum,
            self.weight_decay,
        )?;
        if let Some(s) = self.image_size {
            if !(32..=1024).contains(&s) {
                return Err(Error::user(format!(
                    "--image-size: must lie in [32, 1024], got {s}"
                )));
            }
        }
        Ok(())
    }

    /// The learning-rate factor of `epoch` (0-based): 0.1 per milestone passed.
    pub fn lr_factor(&self, epoch: usize) -> f64 {
        0.1f64.powi(self.milestones.iter().filter(|&&m| epoch >= m).count() as i32)
    }
}

/// The settings the probe and fine-tuning share: counts at least 1, SGD momentum in [0, 1),
/// weight decay non-negative.
pub(crate) fn check_schedule(
    epochs: usize,
    batch_size: usize,
    eval_every: usize,
    momentum: f64,
    weight_decay: f64,
) -> Result<()> {
    for (flag, v) in [
        ("--epochs", epochs),
        ("--batch-size", batch_size),
        ("--eval-every", eval_every),
    ] {
        if v == 0 {
            return Err(Error::user(format!("{flag}: at least 1")));
        }
    }
    if !(0.0..1.0).contains(&momentum) {
        return Err(Error::user(format!(
            "--momentum: must lie in [0, 1), got {momentum}"
        )));
    }
    if !(weight_decay.is_finite() && weight_decay >= 0.0) {
        return Err(Error::user(format!(
            "--wd: must be a non-negative number, got {weight_decay}"
        )));
    }
    Ok(())
}

/// GPU `n` for an evaluation command, its failure to open a line naming `--device`.
pub(crate) fn open_gpu(n: usize, flag: &str) -> Result<std::rc::Rc<crate::gpu::Gpu>> {
    crate::gpu::Gpu::new(n, true)
        .map(std::rc::Rc::new)
        .map_err(|e| match e {
            Error::Cuda(m) => Error::user(format!(
                "--device {flag}: {m}; `lewel info` shows what was found; --device cpu runs on the CPU"
            )),
            e => e,
        })
}

/// A parameter's values on the host (only it is downloaded).
pub(crate) fn param_values<B: Kernels<F = f32>>(g: &mut Graph<B>, p: ParamId) -> Result<Vec<f32>> {
    let r = g.store.table.range(p.0);
    let (params, _, _) = B::f_side(&mut g.store, &mut g.w);
    g.dev.download(&B::view(params, r))
}

/// Adds a head's bias (one value per column) to every row of `logits`.
pub(crate) fn add_bias(logits: &mut [f32], bias: &[f32]) {
    for row in logits.chunks_mut(bias.len()) {
        row.iter_mut().zip(bias).for_each(|(v, b)| *v += b);
    }
}

/// Parses `--lr 0.1,0.4,1.6,30`.
pub fn parse_lrs(s: &str) -> Result<Vec<f64>> {
    s.split(',')
        .map(|v| {
            let v = v.trim();
            match v.parse::<f64>() {
                Ok(x) if x.is_finite() && x > 0.0 => Ok(x),
                _ => Err(Error::user(format!(
                    "--lr: expected positive numbers separated by commas, got {v:?} in {s:?}"
                ))),
            }
        })
        .collect()
}

/// One head's result.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct HeadResult {
    pub lr: f64,
    pub top1: f64,
    pub top5: f64,
    /// Mean training cross-entropy of the last epoch.
    pub train_loss: f64,
}

/// What a probe measured (`linear.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LinearSummary {
    pub heads: Vec<HeadResult>,
    /// Index of the best head by top-1 (the first of equals).
    pub best: usize,
    pub epochs: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub classes: usize,
    pub feature_dim: usize,
    pub device: String,
    pub seconds: f64,
}

// ----------------------------------------------------------------------------
// Data

/// The built-in synthetic set's images as a labeled sample set (its native size, u8).
struct SyntheticSamples {
    syn: crate::data::synthetic::Synthetic,
    split: crate::data::synthetic::Split,
}

impl Samples for SyntheticSamples {
    fn len(&self) -> usize {
        self.syn.len(self.split)
    }
    fn label(&self, i: usize) -> usize {
        self.syn.label(i)
    }
    fn classes(&self) -> usize {
        crate::data::synthetic::CLASSES.len()
    }
    fn decode(&self, i: usize) -> std::result::Result<Rgb8, String> {
        let s = self.syn.size;
        let px = self
            .syn
            .image_rgb(self.split, i)
            .iter()
            .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
            .collect();
        Ok(Rgb8::new(s, s, px))
    }
    /// `<class>_<index>.png`, as an ImageFolder written from the set would name it (split lists
    /// can name the built-in set's images).
    fn file_name(&self, i: usize) -> Option<String> {
        Some(format!(
            "{}_{i}.png",
            crate::data::synthetic::CLASSES[self.syn.label(i)]
        ))
    }
}

/// Train and validation sets with the crop size.
pub(crate) struct ProbeData {
    pub(crate) train: Arc<dyn Samples>,
    pub(crate) val: Arc<dyn Samples>,
    pub(crate) classes: usize,
    pub(crate) size: usize,
    pub(crate) what: String,
}

/// The data settings the evaluation commands share.
pub(crate) struct DataFlags<'a> {
    pub(crate) data: &'a Option<PathBuf>,
    pub(crate) val_data: &'a Option<PathBuf>,
    pub(crate) image_size: Option<usize>,
}

impl<'a> From<&'a LinearConfig> for DataFlags<'a> {
    fn from(c: &'a LinearConfig) -> Self {
        DataFlags {
            data: &c.data,
            val_data: &c.val_data,
            image_size: c.image_size,
        }
    }
}

/// The sets a probe or a fine-tuning reads: `--data` (an ImageFolder, its parent holding train/
/// and val/, a packed file, or `builtin`), else the built-in set of the checkpoint's run.
pub(crate) fn open_data(
    cfg: DataFlags<'_>,
    run: Option<&crate::run::PretrainConfig>,
) -> Result<ProbeData> {
    let builtin = crate::run::PretrainConfig::default();
    let synthetic = match (cfg.data, run) {
        (Some(d), _) if d.as_os_str() == "builtin" => Some(&builtin),
        (None, Some(rc)) if rc.data.is_none() => Some(rc),
        (None, _) => {
            return Err(Error::user(
                "--data: needed (an ImageFolder, a folder with train/ and val/, or builtin for the built-in set): the checkpoint is not a run on the built-in synthetic set",
            ))
        }
        _ => None,
    };
    if let Some(rc) = synthetic {
        let size = cfg.image_size.unwrap_or(rc.size());
        let syn = crate::data::synthetic::Synthetic::new(rc.seed, size, rc.train_len, rc.val_len);
        use crate::data::synthetic::Split;
        return Ok(ProbeData {
            train: Arc::new(SyntheticSamples {
                syn: syn.clone(),
                split: Split::Train,
            }),
            val: Arc::new(SyntheticSamples {
                syn,
                split: Split::Val,
            }),
            classes: crate::data::synthetic::CLASSES.len(),
            size,
            what: format!(
                "the built-in synthetic set (seed {}, {} train / {} val, {size}px)",
                rc.seed, rc.train_len, rc.val_len
            ),
        });
    }
    let data = cfg.data.as_ref().expect("a data path");
    let train_root = if data.join("train").is_dir() {
        data.join("train")
    } else {
        data.clone()
    };
    let val_root = match (cfg.val_data, crate::data::sibling_val(data)) {
        (Some(v), _) => v.clone(),
        (None, Some(v)) => v,
        (None, None) => {
            return Err(Error::user(format!(
                "--val-data: needed: {} has no val/ beside train/",
                data.display()
            )))
        }
    };
    let train = crate::data::open_samples(&train_root)?;
    let val = crate::data::open_samples(&val_root)?;
    for (set, root, flag) in [
        (&train, &train_root, "--data"),
        (&val, &val_root, "--val-data"),
    ] {
        if set.is_empty() {
            return Err(Error::user(format!("{flag} {}: no images", root.display())));
        }
    }
    if let (Some(a), Some(b)) = (train.class_names(), val.class_names()) {
        if a != b {
            return Err(Error::user(format!(
                "--val-data {}: its {} classes are not the training set's {} (by name and order)",
                val_root.display(),
                b.len(),
                a.len()
            )));
        }
    }
    let classes = train.classes();
    let what = format!(
        "{} ({} images) / {} ({} images), {classes} classes",
        train_root.display(),
        train.len(),
        val_root.display(),
        val.len()
    );
    Ok(ProbeData {
        train,
        val,
        classes,
        size: cfg.image_size.unwrap_or(224),
        what,
    })
}

/// A DefaultTrain view of sample `i` in `epoch` (keyed: the same on any thread count and after a
/// resume), normalized NHWC.
pub(crate) fn train_view(
    set: &dyn Samples,
    seed: u64,
    epoch: usize,
    i: usize,
    size: usize,
) -> Result<Vec<f32>> {
    let img = set.decode(i).map_err(Error::user)?;
    let mut r = Rng::keyed(&[seed, 0x11ea, epoch as u64, i as u64]);
    let c = transforms::sample_crop(&mut r, img.w, img.h, (0.08, 1.0), transforms::RATIO);
    let flip = r.uniform() < 0.5;
    let v = pil::resized_crop(&img, (c.top, c.left, c.h, c.w), (size, size), flip);
    let mut out = vec![0.0; size * size * 3];
    pil::normalize(&v, &mut out);
    Ok(out)
}

/// The eval view of sample `i`, normalized NHWC.
pub(crate) fn eval_view(set: &dyn Samples, i: usize, size: usize) -> Result<Vec<f32>> {
    let img = set.decode(i).map_err(Error::user)?;
    let v = transforms::eval_view(&img, (size * 256).div_ceil(224), size);
    let mut out = vec![0.0; size * size * 3];
    pil::normalize(&v, &mut out);
    Ok(out)
}

// ----------------------------------------------------------------------------
// The backbone

/// A backbone store from a checkpoint (a LEWEL state's online backbone, or an exported one);
/// with `random_init`, the same architecture freshly initialized from `seed`.
pub(crate) fn load_backbone(
    checkpoint_path: &Path,
    random_init: Option<u64>,
) -> Result<(ParamStore<f32>, ResNet, Arch, String)> {
    let weights = crate::run::weights_file(checkpoint_path)?;
    let what = weights.display().to_string();
    let t = checkpoint::read_file(&weights)?;
    let prefix = if t.contains_key("online_net.backbone.conv1.weight") {
        "online_net.backbone."
    } else {
        ""
    };
    let arch = Arch::infer(&t, prefix, &what)?;
    let mut s = ParamStore::new();
    let net = ResNet::build(
        &mut s,
        prefix,
        arch,
        &mut Rng::new(random_init.unwrap_or(0)),
    );
    if random_init.is_none() {
        checkpoint::load_store(&mut s, &t, &what)?;
    }
    Ok((s, net, arch, what))
}

/// A hash of every value of a store (parameters, BN statistics, counters).
pub(crate) fn store_hash(s: &ParamStore<f32>) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for v in s.params.iter().chain(&s.buffers) {
        h.update(&v.to_le_bytes());
    }
    for (_, c) in &s.counters {
        h.update(&c.to_le_bytes());
    }
    h.finalize()
}

// ----------------------------------------------------------------------------
// The probe on a backend

/// A batch's features: in the backbone's graph, or cached on the host.
enum Feats<'a> {
    Bb(crate::tensor::Tensor),
    Host(&'a [f32]),
}

/// Heads and their state on one backend.
struct Probe<B: Kernels + OptimKernels> {
    bb: Graph<B>,
    net: ResNet,
    heads: Graph<B>,
    w: ParamId,
    b: ParamId,
    momentum: B::Buf<f32>,
    k: usize,
    classes: usize,
    dim: usize,
    bn_mode: BnMode,
}

impl<B: Kernels<F = f32> + OptimKernels> Probe<B> {
    /// Pooled features of a batch of normalized NHWC images, in `bb` (not recorded).
    fn features(&mut self, x: &[f32], n: usize, size: usize) -> Result<crate::tensor::Tensor> {
        self.bb.reset();
        self.bb.set_recording(false);
        let x = self.bb.input(Shape::new(&[n, size, size, 3]), x);
        let f = self.net.forward(&mut self.bb, x, self.bn_mode);
        let p = self.bb.avgpool(f);
        self.bb.check()?;
        Ok(p)
    }

    /// One SGD step of every head on features `f` (in `bb`) with `labels`; returns each head's
    /// mean cross-entropy.
    fn train_step(
        &mut self,
        f: Feats<'_>,
        labels: &[f32],
        lrs: &[f64],
        sgd: &SgdConfig,
    ) -> Result<Vec<f32>> {
        let n = labels.len();
        self.heads.reset();
        self.heads.set_recording(true);
        let x = match f {
            Feats::Bb(t) => self.heads.input_from(&self.bb, t),
            Feats::Host(v) => self.heads.input(Shape::new(&[n, self.dim]), v),
        };
        let y = self.heads.input_f(Shape::new(&[n]), labels);
        let logits = self.heads.linear(x, self.w);
        let (loss, per_head) = self.heads.cross_entropy(logits, self.b, y, self.k);
        self.heads.check()?;
        self.heads.backward(loss)?;
        let (wr, br) = (
            self.heads.store.table.range(self.w.0),
            self.heads.store.table.range(self.b.0),
        );
        let (o, c) = (self.classes, self.dim);
        let dev = &self.heads.dev;
        let (params, grads, _) = B::f_side(&mut self.heads.store, &mut self.heads.w);
        for (h, &lr) in lrs.iter().enumerate() {
            let cfg = SgdConfig { lr, ..*sgd };
            let rw = wr.start + h * o * c..wr.start + (h + 1) * o * c;
            let rb = br.start + h * o..br.start + (h + 1) * o;
            dev.sgd_step(params, grads, &mut self.momentum, rw, &cfg)?;
            dev.sgd_step(params, grads, &mut self.momentum, rb, &cfg)?;
        }
        dev.refresh(&mut self.heads.store, &mut self.heads.w)?;
        self.heads.fetch(per_head)
    }

    /// Every head's logits (R, k * classes) of features `f`, `bias` (the heads', on the host) added.
    fn logits(&mut self, f: crate::tensor::Tensor, bias: &[f32]) -> Result<Vec<f32>> {
        self.heads.reset();
        self.heads.set_recording(false);
        let x = self.heads.input_from(&self.bb, f);
        let logits = self.heads.linear(x, self.w);
        self.heads.check()?;
        let mut l = self.heads.fetch(logits)?;
        add_bias(&mut l, bias);
        Ok(l)
    }

    /// The backbone's values on the host, hashed.
    fn backbone_hash(&self) -> Result<u32> {
        let mut cache = ParamStore::new();
        let st = self
            .bb
            .dev
            .host_store(&self.bb.store, &self.bb.w, &mut cache)?;
        Ok(store_hash(st))
    }
}

// ----------------------------------------------------------------------------
// The run

/// Images per backbone batch in feature extraction and validation.
pub(crate) const EVAL_BATCH: usize = 64;

/// Top-1 and top-5 hits of each head over `logits` (R, k * classes).
pub(crate) fn hits(
    logits: &[f32],
    labels: &[usize],
    k: usize,
    classes: usize,
) -> Vec<(usize, usize)> {
    (0..k)
        .map(|h| {
            let mut t = (0, 0);
            for (r, &y) in labels.iter().enumerate() {
                let row = &logits[(r * k + h) * classes..][..classes];
                let mine = row[y];
                // Rank of the true class: how many score higher (ties count against it: a
                // constant head is never right by accident).
                let above = row
                    .iter()
                    .enumerate()
                    .filter(|&(j, &v)| j != y && v >= mine)
                    .count();
                t.0 += (above == 0) as usize;
                t.1 += (above < 5) as usize;
            }
            t
        })
        .collect()
}

/// Normalized NHWC images of samples `idx` by `view`, in parallel; labels as floats.
pub(crate) fn batch(
    set: &dyn Samples,
    idx: &[usize],
    view: impl Fn(usize) -> Result<Vec<f32>> + Sync,
) -> Result<(Vec<f32>, Vec<f32>)> {
    let imgs = idx
        .par_iter()
        .map(|&i| view(i))
        .collect::<Result<Vec<_>>>()?;
    let labels = idx.iter().map(|&i| set.label(i) as f32).collect();
    Ok((imgs.concat(), labels))
}

/// Appends one line to `path`.
pub(crate) fn append_line(path: &Path, line: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| Error::io(path, e))?;
    writeln!(f, "{line}").map_err(|e| Error::io(path, e))
}

/// Keeps the lines of metrics.jsonl up to `epoch` (a resume continues after them).
pub(crate) fn truncate_metrics(path: &Path, epoch: usize) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(path) else {
        return Ok(());
    };
    let kept: String = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v["epoch"].as_u64())
                .is_some_and(|e| e as usize <= epoch)
        })
        .map(|l| format!("{l}\n"))
        .collect();
    checkpoint::write_bytes_atomic(path, kept.as_bytes())
}

/// Everything a probe needs besides its backend.
struct Job<'a> {
    cfg: &'a LinearConfig,
    data: &'a ProbeData,
    out: &'a Path,
    start_epoch: usize,
    /// Heads and momentum to continue from (a resume).
    state: Option<Tensors>,
    backbone: (ParamStore<f32>, ResNet, Arch),
    log: &'a dyn Fn(&str),
}

/// Writes the heads' state after `epoch` epochs, atomically.
fn save_state<B: Kernels<F = f32> + OptimKernels>(
    p: &Probe<B>,
    out: &Path,
    epoch: usize,
    losses: &[f64],
) -> Result<()> {
    let mut cache = ParamStore::new();
    let st = p
        .heads
        .dev
        .host_store(&p.heads.store, &p.heads.w, &mut cache)?;
    let mut mom_cache = Vec::new();
    let mom = p.heads.dev.host_vec(&p.momentum, &mut mom_cache)?;
    let mut t = Tensors::new();
    let (o, c, k) = (p.classes, p.dim, p.k);
    t.insert(
        "heads.weight".into(),
        Owned::f32(vec![k * o, c], st.param(p.w)),
    );
    t.insert("heads.bias".into(), Owned::f32(vec![k * o], st.param(p.b)));
    t.insert("momentum".into(), Owned::f32(vec![mom.len()], mom));
    t.insert(
        "train_loss".into(),
        Owned::f32(
            vec![losses.len()],
            &losses.iter().map(|&v| v as f32).collect::<Vec<_>>(),
        ),
    );
    t.insert("epoch".into(), Owned::i64_scalar(epoch as i64));
    checkpoint::write_file_atomic(&out.join("linear_state.safetensors"), &t, None)
}

fn run_probe<B: Kernels<F = f32> + OptimKernels>(
    dev: B,
    dev2: B,
    job: Job<'_>,
) -> Result<Vec<HeadResult>> {
    let Job {
        cfg,
        data,
        out,
        start_epoch,
        state,
        backbone,
        log,
    } = job;
    let (store, net, arch) = backbone;
    let (k, o, dim) = (cfg.lrs.len(), data.classes, arch.out_channels());
    let mut hs = ParamStore::new();
    // Every head starts from the same draw (the one a probe with that rate alone makes).
    let one: Vec<f32> = {
        let mut r = Rng::keyed(&[cfg.seed, 0x11ea_0001]);
        (0..o * dim).map(|_| (0.01 * r.normal()) as f32).collect()
    };
    let w = hs.add_param("heads.weight", Shape::new(&[k * o, dim]), |i| {
        one[i % (o * dim)]
    });
    let b = hs.add_param("heads.bias", Shape::new(&[k * o]), |_| 0.0);
    let mut momentum = vec![0.0f32; hs.num_params()];
    let mut losses = vec![f64::NAN; k];
    if let Some(t) = &state {
        let get = |n: &str, len: usize| -> Result<Vec<f32>> {
            t.get(n)
                .and_then(|o| o.to_f32())
                .filter(|v| v.len() == len)
                .ok_or_else(|| {
                    Error::user(format!(
                        "{}: no {n} of {len} values: not this probe's state",
                        out.join("linear_state.safetensors").display()
                    ))
                })
        };
        hs.param_mut(w)
            .copy_from_slice(&get("heads.weight", k * o * dim)?);
        hs.param_mut(b).copy_from_slice(&get("heads.bias", k * o)?);
        momentum = get("momentum", momentum.len())?;
        losses = get("train_loss", k)?.iter().map(|&v| v as f64).collect();
    }
    let momentum = dev2.upload_buf(&momentum)?;
    let bn_mode = if cfg.train_bn {
        BnMode::Train
    } else {
        BnMode::Eval
    };
    let mut p = Probe {
        bb: Graph::new(dev, store)?,
        net,
        heads: Graph::new(dev2, hs)?,
        w,
        b,
        momentum,
        k,
        classes: o,
        dim,
        bn_mode,
    };
    let before = p.backbone_hash()?;
    let sgd = SgdConfig {
        lr: 0.0,
        momentum: cfg.momentum,
        weight_decay: cfg.weight_decay,
    };
    let size = data.size;
    let (train, val) = (&*data.train, &*data.val);
    // Centre-crop features of the training set, once (--features-cache).
    let cache: Option<Vec<f32>> = if cfg.features_cache {
        let n = train.len();
        let mut all = Vec::with_capacity(n * dim);
        for start in (0..n).step_by(EVAL_BATCH) {
            let idx: Vec<usize> = (start..(start + EVAL_BATCH).min(n)).collect();
            let (x, _) = batch(train, &idx, |i| eval_view(train, i, size))?;
            let f = p.features(&x, idx.len(), size)?;
            all.extend(p.bb.fetch(f)?);
        }
        log(&format!("features cached: {n} x {dim} (centre crops)"));
        Some(all)
    } else {
        None
    };
    let evaluate = |p: &mut Probe<B>| -> Result<Vec<(f64, f64)>> {
        let n = val.len();
        let mut tot = vec![(0usize, 0usize); k];
        let bias = param_values(&mut p.heads, p.b)?;
        for start in (0..n).step_by(EVAL_BATCH) {
            let idx: Vec<usize> = (start..(start + EVAL_BATCH).min(n)).collect();
            let (x, _) = batch(val, &idx, |i| eval_view(val, i, size))?;
            let f = p.features(&x, idx.len(), size)?;
            let l = p.logits(f, &bias)?;
            let labels: Vec<usize> = idx.iter().map(|&i| val.label(i)).collect();
            for (t, h) in tot.iter_mut().zip(hits(&l, &labels, k, o)) {
                t.0 += h.0;
                t.1 += h.1;
            }
        }
        Ok(tot
            .iter()
            .map(|&(a, b)| (100.0 * a as f64 / n as f64, 100.0 * b as f64 / n as f64))
            .collect())
    };
    let mut acc = Vec::new();
    let metrics = out.join("metrics.jsonl");
    for epoch in start_epoch..cfg.epochs {
        let t0 = std::time::Instant::now();
        let factor = cfg.lr_factor(epoch);
        let lrs: Vec<f64> = cfg.lrs.iter().map(|l| l * factor).collect();
        let order = crate::data::loader::shard(train.len(), cfg.seed, epoch as u64, 1, 0);
        let mut sums = vec![0.0f64; k];
        let mut seen = 0usize;
        for idx in order.chunks(cfg.batch_size) {
            let (lv, labels): (Vec<f32>, Vec<f32>);
            let per_head = match &cache {
                Some(all) => {
                    let f: Vec<f32> = idx
                        .iter()
                        .flat_map(|&i| all[i * dim..(i + 1) * dim].iter().copied())
                        .collect();
                    labels = idx.iter().map(|&i| train.label(i) as f32).collect();
                    p.train_step(Feats::Host(&f), &labels, &lrs, &sgd)?
                }
                None => {
                    (lv, labels) =
                        batch(train, idx, |i| train_view(train, cfg.seed, epoch, i, size))?;
                    let f = p.features(&lv, idx.len(), size)?;
                    if seen == 0 && epoch == start_epoch {
                        let v = p.bb.fetch(f)?;
                        let norm: f64 = v
                            .chunks(dim)
                            .map(|r| r.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt())
                            .sum::<f64>()
                            / idx.len() as f64;
                        log(&format!(
                            "features: {dim}-d, mean L2 norm {norm:.3} (first batch)"
                        ));
                    }
                    p.train_step(Feats::Bb(f), &labels, &lrs, &sgd)?
                }
            };
            for (s, v) in sums.iter_mut().zip(&per_head) {
                *s += *v as f64 * idx.len() as f64;
            }
            seen += idx.len();
        }
        losses = sums.iter().map(|s| s / seen as f64).collect();
        let done = epoch + 1;
        let scored = done % cfg.eval_every == 0 || done == cfg.epochs;
        if scored {
            acc = evaluate(&mut p)?;
        }
        let mut line = serde_json::json!({
            "epoch": done,
            "lr_factor": factor,
            "train_loss": losses,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        if scored {
            line["top1"] = acc.iter().map(|a| a.0).collect();
            line["top5"] = acc.iter().map(|a| a.1).collect();
        }
        append_line(&metrics, &line.to_string())?;
        save_state(&p, out, done, &losses)?;
        let shown: Vec<String> = (0..k)
            .map(|h| {
                let a = if scored {
                    format!(" top-1 {:.2}%", acc[h].0)
                } else {
                    String::new()
                };
                format!("lr {} loss {:.4}{a}", cfg.lrs[h], losses[h])
            })
            .collect();
        log(&format!(
            "epoch {done}/{} | {} | {:.1} s",
            cfg.epochs,
            shown.join(" | "),
            t0.elapsed().as_secs_f64()
        ));
    }
    if acc.is_empty() {
        acc = evaluate(&mut p)?;
    }
    let after = p.backbone_hash()?;
    if after != before {
        return Err(Error::Other(format!(
            "the backbone changed during the linear probe (hash {before:08x} before, {after:08x} after): its weights or BN statistics were updated, so these accuracies are not a linear probe of the checkpoint"
        )));
    }
    Ok((0..k)
        .map(|h| HeadResult {
            lr: cfg.lrs[h],
            top1: acc[h].0,
            top5: acc[h].1,
            train_loss: losses[h],
        })
        .collect())
}

/// How [`linear`] starts.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Start {
    /// A new probe in an empty (or new) folder.
    New,
    /// Continues the folder's probe with its settings, to this many epochs where given.
    Resume(Option<usize>),
}

/// Runs (or continues) a probe in folder `out`.
pub fn linear(
    cfg: &LinearConfig,
    out: &Path,
    start: Start,
    log: &dyn Fn(&str),
) -> Result<LinearSummary> {
    cfg.check()?;
    let t0 = std::time::Instant::now();
    let state_path = out.join("linear_state.safetensors");
    let settings = out.join("linear.toml");
    let (cfg, start_epoch, state) = if let Start::Resume(epochs) = start {
        let text = std::fs::read_to_string(&settings).map_err(|e| Error::io(&settings, e))?;
        let saved: LinearConfig = toml::from_str(&text)
            .map_err(|e| Error::user(format!("{}: {e}", settings.display())))?;
        let mut c = saved;
        // Only the length of the run may change.
        c.epochs = epochs.unwrap_or(c.epochs);
        let state = checkpoint::read_file(&state_path)?;
        let epoch = state
            .get("epoch")
            .and_then(|o| o.to_i64())
            .ok_or_else(|| Error::user(format!("{}: no epoch", state_path.display())))?
            as usize;
        (c, epoch, Some(state))
    } else {
        if state_path.exists() || settings.exists() {
            return Err(Error::user(format!(
                "--out {}: holds a linear probe already; continue it with --resume, or choose another folder",
                out.display()
            )));
        }
        (cfg.clone(), 0, None)
    };
    cfg.check()?;
    if start_epoch > cfg.epochs {
        return Err(Error::user(format!(
            "--epochs {}: the probe in {} has done {start_epoch} already",
            cfg.epochs,
            out.display()
        )));
    }
    let run_cfg =
        if cfg.checkpoint.is_dir() || cfg.checkpoint.extension().is_some_and(|e| e == "json") {
            Some(crate::run::read_manifest(&cfg.checkpoint)?.1.config)
        } else {
            None
        };
    let data = open_data((&cfg).into(), run_cfg.as_ref())?;
    let (store, net, arch, what) =
        load_backbone(&cfg.checkpoint, cfg.random_init.then_some(cfg.seed))?;
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    truncate_metrics(&out.join("metrics.jsonl"), start_epoch)?;
    let text = toml::to_string(&cfg).map_err(|e| Error::Other(e.to_string()))?;
    checkpoint::write_bytes_atomic(&settings, text.as_bytes())?;
    let choice: crate::device::DeviceChoice = cfg.device.parse()?;
    let device = crate::device::resolve(choice);
    log(&format!(
        "lewel linear | {what}{} | {} | {} heads (lr {}) | batch {} | {} epochs | device {}",
        if cfg.random_init {
            " (random init)"
        } else {
            ""
        },
        data.what,
        cfg.lrs.len(),
        cfg.lrs
            .iter()
            .map(|l| l.to_string())
            .collect::<Vec<_>>()
            .join(", "),
        cfg.batch_size,
        cfg.epochs,
        match device {
            crate::device::Device::Cpu => "cpu".to_string(),
            crate::device::Device::Cuda(n) => format!("cuda:{n}"),
        }
    ));
    let job = Job {
        cfg: &cfg,
        data: &data,
        out,
        start_epoch,
        state,
        backbone: (store, net, arch),
        log,
    };
    let heads = match device {
        crate::device::Device::Cpu => run_probe(Cpu::<f32>::default(), Cpu::default(), job)?,
        crate::device::Device::Cuda(n) => {
            let gpu = open_gpu(n, &cfg.device)?;
            run_probe(Cuda::<f32>::new(gpu.clone()), Cuda::<f32>::new(gpu), job)?
        }
    };
    let best = (0..heads.len()).fold(0, |b, h| if heads[h].top1 > heads[b].top1 { h } else { b });
    let s = LinearSummary {
        best,
        epochs: cfg.epochs,
        train_images: data.train.len(),
        val_images: data.val.len(),
        classes: data.classes,
        feature_dim: arch.out_channels(),
        device: format!("{device:?}"),
        seconds: t0.elapsed().as_secs_f64(),
        heads,
    };
    let json = serde_json::to_string_pretty(&s).map_err(|e| Error::Other(e.to_string()))?;
    checkpoint::write_bytes_atomic(&out.join("linear.json"), json.as_bytes())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lewel-linear-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The online backbone of the built-in run (`lewel pretrain`, its defaults: the tiny model
    /// on the built-in set at 48 px, 12 epochs; kNN 43% at init -> 72%), exported with
    /// `lewel export` (1.5 MB).
    fn pretrained() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/linear/builtin_run_backbone.safetensors")
    }

    /// A probe on the built-in set, on cached features unless `f` says otherwise.
    fn probe(name: &str, f: impl FnOnce(&mut LinearConfig)) -> Result<LinearSummary> {
        let mut cfg = LinearConfig {
            data: Some("builtin".into()),
            lrs: vec![0.4],
            epochs: 6,
            milestones: vec![4],
            batch_size: 64,
            eval_every: 3,
            features_cache: true,
            device: "cpu".into(),
            ..LinearConfig::new(pretrained())
        };
        f(&mut cfg);
        linear(&cfg, &tmp(name), Start::New, &|_| {})
    }

    /// The probe of a pretrained backbone beats the same probe of a random one, for three seeds
    /// of the probe (measured: see the README's linear-probe section).
    #[test]
    fn a_pretrained_backbone_beats_a_random_one() {
        // Each backbone with its best of four rates (their feature scales differ).
        let best = |s: &LinearSummary| s.heads[s.best].top1;
        for seed in 0..3 {
            let lrs = vec![0.01, 0.1, 0.4, 1.6];
            let trained = probe(&format!("t{seed}"), |c| {
                c.seed = seed;
                c.lrs = lrs.clone()
            })
            .unwrap();
            let random = probe(&format!("r{seed}"), |c| {
                c.seed = seed;
                c.lrs = lrs.clone();
                c.random_init = true
            })
            .unwrap();
            let (a, b) = (best(&trained), best(&random));
            println!("seed {seed}: pretrained {a:.1}% random init {b:.1}%");
            assert!(a >= b + 25.0, "seed {seed}: pretrained {a}% vs random {b}%");
        }
    }

    /// Heads trained side by side in one pass equal heads trained alone: the same accuracies and
    /// training losses.
    #[test]
    fn several_learning_rates_in_one_pass_equal_separate_runs() {
        // Through the backbone every step (augmented views), two epochs.
        let set = |c: &mut LinearConfig, lrs: Vec<f64>| {
            c.lrs = lrs;
            c.features_cache = false;
            c.epochs = 2;
            c.eval_every = 2;
        };
        let both = probe("both", |c| set(c, vec![0.1, 1.6])).unwrap();
        for (i, lr) in [0.1, 1.6].into_iter().enumerate() {
            let alone = probe(&format!("alone{i}"), |c| set(c, vec![lr])).unwrap();
            let (a, b) = (&both.heads[i], &alone.heads[0]);
            assert_eq!((a.top1, a.top5), (b.top1, b.top5), "lr {lr}");
            let rel = (a.train_loss - b.train_loss).abs() / b.train_loss.abs();
            assert!(
                rel < 1e-5,
                "lr {lr}: loss {} vs {}",
                a.train_loss,
                b.train_loss
            );
        }
    }

    /// A backbone whose BN statistics move during the probe fails it loudly.
    #[test]
    fn a_backbone_that_changes_fails_the_frozen_check() {
        let e = probe("unfrozen", |c| {
            c.train_bn = true;
            c.features_cache = false;
            c.epochs = 1
        })
        .unwrap_err()
        .to_string();
        assert!(
            e.starts_with("the backbone changed during the linear probe"),
            "{e}"
        );
    }

    /// Two epochs, then a resume to four, give the state four epochs in one go give, bit for
    /// bit (augmented views through the backbone).
    #[test]
    fn resume_is_exact() {
        let (a, b) = (tmp("straight"), tmp("split"));
        let cfg = LinearConfig {
            data: Some("builtin".into()),
            lrs: vec![0.4, 1.0],
            epochs: 4,
            milestones: vec![3],
            batch_size: 256,
            eval_every: 2,
            device: "cpu".into(),
            ..LinearConfig::new(pretrained())
        };
        let full = linear(&cfg, &a, Start::New, &|_| {}).unwrap();
        let half = LinearConfig {
            epochs: 2,
            ..cfg.clone()
        };
        linear(&half, &b, Start::New, &|_| {}).unwrap();
        let e = linear(&half, &b, Start::New, &|_| {})
            .unwrap_err()
            .to_string();
        assert!(e.contains("--resume"), "{e}");
        let resumed = linear(&half, &b, Start::Resume(Some(4)), &|_| {}).unwrap();
        let read = |d: &Path| std::fs::read(d.join("linear_state.safetensors")).unwrap();
        assert!(read(&a) == read(&b), "the resumed state differs");
        assert_eq!(full.heads, resumed.heads);
        let lines = std::fs::read_to_string(b.join("metrics.jsonl")).unwrap();
        assert_eq!(lines.lines().count(), 4);
        assert!(full.heads[0].top1 > 50.0, "{:?}", full.heads);
    }

    #[test]
    fn bad_input_is_one_clear_line() {
        let e = parse_lrs("0.1,abc").unwrap_err().to_string();
        assert!(e.starts_with("--lr: expected positive numbers"), "{e}");
        assert!(parse_lrs("0.1,-2").is_err() && parse_lrs("0.4").is_ok());
        let e = probe("noval", |c| {
            c.data = Some(tmp("nothing-here"));
        })
        .unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let empty = tmp("empty-set");
        std::fs::create_dir_all(empty.join("train/a")).unwrap();
        std::fs::create_dir_all(empty.join("val/a")).unwrap();
        let e = probe("empty", |c| c.data = Some(empty.clone())).unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        println!("{e}");
    }
}
