//! `lewel finetune`: semi-supervised fine-tuning (LEWEL_SPEC 8, `main_semi.py`'s recipe). The
//! whole network trains, BN in train mode (running statistics updating), with a new linear
//! classifier (PyTorch's default Linear init: uniform +-1/sqrt(C) for weight and bias). SGD,
//! momentum 0.9, weight decay 1e-4 on every parameter (BN and bias included), two rates: the
//! classifier's and the backbone's (the official scripts: 1% split backbone 1e-4 / classifier 1.0,
//! 10% split 0.01 / 0.1), x0.1 at epochs 30 and 40 of 50, batch 256, DefaultTrain views; top-1 and
//! top-5 on the eval transform. The training set is a split of the ImageFolder's train/: SimCLR's
//! standard 1% and 10% ImageNet lists (shipped in data/splits/, checked by CRC32 and count), or a
//! file naming images one per line. On one device BN sees the whole batch (the official runs use
//! per-GPU BN over 4 GPUs per node; a small difference, not emulated here).

use super::linear::{self, ProbeData};
use crate::backend::{Cpu, Cuda};
use crate::checkpoint::{self, Tensors};
use crate::data::loader::Samples;
use crate::graph::{BnMode, Graph, Kernels};
use crate::memory::ParamStore;
use crate::optim::{OptimKernels, SgdConfig};
use crate::rng::Rng;
use crate::tensor::Shape;
use crate::{Error, Result};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// SimCLR's 1% ImageNet split (12,811 file names, CRLF), as LEWEL_SPEC 5.3 describes it.
const ONE_PERCENT: &str = include_str!("../../data/splits/1percent.txt");
/// SimCLR's 10% split (128,116 file names).
const TEN_PERCENT: &str = include_str!("../../data/splits/10percent.txt");
/// (CRC32, names) of the shipped lists: what the copies must be.
const ONE_PERCENT_CHECK: (u32, usize) = (0xd820_8d8c, 12_811);
const TEN_PERCENT_CHECK: (u32, usize) = (0xd818_519f, 128_116);

/// The fine-tuning settings (`finetune.toml` in its folder).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct FinetuneConfig {
    /// The backbone: a run folder, its checkpoint.json, a LEWEL state or an exported backbone.
    pub checkpoint: PathBuf,
    /// An ImageFolder (or a folder with train/ and val/), or builtin.
    pub data: Option<PathBuf>,
    pub val_data: Option<PathBuf>,
    /// 1percent, 10percent, all, or a file of image names (one per line).
    pub split: String,
    /// The backbone's rate; none: the split's official one.
    pub lr: Option<f64>,
    /// The classifier's rate; none: the split's official one.
    pub lr_classifier: Option<f64>,
    pub epochs: usize,
    pub milestones: Vec<usize>,
    pub batch_size: usize,
    pub momentum: f64,
    pub weight_decay: f64,
    pub image_size: Option<usize>,
    pub seed: u64,
    pub eval_every: usize,
    /// The same architecture freshly initialized (the baseline).
    pub random_init: bool,
    pub device: String,
}

impl FinetuneConfig {
    pub fn new(checkpoint: PathBuf, split: &str) -> FinetuneConfig {
        FinetuneConfig {
            checkpoint,
            data: None,
            val_data: None,
            split: split.to_string(),
            lr: None,
            lr_classifier: None,
            epochs: 50,
            milestones: vec![30, 40],
            batch_size: 256,
            momentum: 0.9,
            weight_decay: 1e-4,
            image_size: None,
            seed: 0,
            eval_every: 5,
            random_init: false,
            device: "auto".into(),
        }
    }

    /// (backbone, classifier) rates: the given ones, else the split's official pair.
    pub fn rates(&self) -> (f64, f64) {
        let (b, c) = match self.split.as_str() {
            "1percent" => (1e-4, 1.0),
            _ => (0.01, 0.1),
        };
        (self.lr.unwrap_or(b), self.lr_classifier.unwrap_or(c))
    }

    fn check(&self) -> Result<()> {
        let (b, c) = self.rates();
        for (flag, v) in [("--lr", b), ("--lr-classifier", c)] {
            if !(v.is_finite() && v >= 0.0) {
                return Err(Error::user(format!(
                    "{flag}: must be a non-negative number, got {v}"
                )));
            }
        }
        linear::check_schedule(
            self.epochs,
            self.batch_size,
            self.eval_every,
            self.momentum,
            self.weight_decay,
        )
    }
}

/// What a fine-tuning measured (`finetune.json`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FinetuneSummary {
    pub top1: f64,
    pub top5: f64,
    pub train_loss: f64,
    pub lr: f64,
    pub lr_classifier: f64,
    pub epochs: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub classes: usize,
    pub seconds: f64,
}

/// The names a split keeps, and where they came from.
fn split_names(split: &str) -> Result<(Vec<String>, String)> {
    let (text, what) = match split {
        "1percent" | "10percent" => {
            let (t, (crc, n)) = if split == "1percent" {
                (ONE_PERCENT, ONE_PERCENT_CHECK)
            } else {
                (TEN_PERCENT, TEN_PERCENT_CHECK)
            };
            let got = crc32fast::hash(t.as_bytes());
            let names = t.lines().filter(|l| !l.trim().is_empty()).count();
            if (got, names) != (crc, n) {
                return Err(Error::Other(format!(
                    "the shipped {split} list is damaged: CRC32 {got:08x} with {names} names, expected {crc:08x} with {n}"
                )));
            }
            (t.to_string(), format!("SimCLR's {split} split"))
        }
        file => {
            let p = Path::new(file);
            let t = std::fs::read_to_string(p).map_err(|e| {
                Error::user(format!(
                    "--split {file}: not 1percent, 10percent or all, and not a readable list of image names ({e})"
                ))
            })?;
            (t, format!("the split in {file}"))
        }
    };
    let names: Vec<String> = text
        .lines()
        .map(|l| l.trim())
        .filter(|l| !l.is_empty())
        .map(|l| {
            // Lines may carry a folder ("n01440764/n01440764_10026.JPEG") or a label first.
            let last = l.split_whitespace().last().unwrap_or(l);
            last.rsplit('/').next().unwrap_or(last).to_string()
        })
        .collect();
    if names.is_empty() {
        return Err(Error::user(format!("--split {split}: names no image")));
    }
    Ok((names, what))
}

/// The samples of `set` a split keeps (in the set's order); every name must be there.
fn apply_split(set: &dyn Samples, names: &[String], what: &str) -> Result<Vec<usize>> {
    let mut at = std::collections::HashMap::with_capacity(set.len());
    for i in 0..set.len() {
        match set.file_name(i) {
            Some(n) => {
                at.insert(n, i);
            }
            None => {
                return Err(Error::user(format!(
                    "--split: {what} names files, but the training set has no file names (a packed file or the built-in set): give an ImageFolder"
                )))
            }
        }
    }
    let missing: Vec<&String> = names.iter().filter(|n| !at.contains_key(*n)).collect();
    if let Some(first) = missing.first() {
        return Err(Error::user(format!(
            "--split: {what} names {} images; {} of them are not in the training set (the first: {first})",
            names.len(),
            missing.len()
        )));
    }
    let mut idx: Vec<usize> = names.iter().map(|n| at[n]).collect();
    idx.sort_unstable();
    idx.dedup();
    Ok(idx)
}

/// A subset of a sample set.
struct Subset {
    set: Arc<dyn Samples>,
    idx: Vec<usize>,
}

impl Samples for Subset {
    fn len(&self) -> usize {
        self.idx.len()
    }
    fn label(&self, i: usize) -> usize {
        self.set.label(self.idx[i])
    }
    fn classes(&self) -> usize {
        self.set.classes()
    }
    fn decode(&self, i: usize) -> std::result::Result<crate::data::pil::Rgb8, String> {
        self.set.decode(self.idx[i])
    }
    fn file_name(&self, i: usize) -> Option<String> {
        self.set.file_name(self.idx[i])
    }
}

/// Trains on `data` from `store` (the backbone with the classifier appended); returns the summary's
/// numbers.
fn run_ft<B: Kernels<F = f32> + OptimKernels>(
    dev: B,
    cfg: &FinetuneConfig,
    data: &ProbeData,
    out: &Path,
    (store, net, fc, dim): (
        ParamStore<f32>,
        crate::model::resnet::ResNet,
        (crate::memory::ParamId, crate::memory::ParamId),
        usize,
    ),
    log: &dyn Fn(&str),
) -> Result<(f64, f64, f64)> {
    let (w, b) = fc;
    let o = data.classes;
    let momentum = dev.upload_buf(&vec![0.0f32; store.num_params()])?;
    let mut g = Graph::new(dev, store)?;
    let mut momentum = momentum;
    let fc_start = g.store.table.range(w.0).start;
    let total = g.store.num_params();
    assert_eq!(
        g.store.table.range(b.0).end,
        total,
        "the classifier comes last"
    );
    let (lr_b, lr_c) = cfg.rates();
    let size = data.size;
    let (train, val) = (&*data.train, &*data.val);
    let metrics = out.join("metrics.jsonl");
    let mut acc = (f64::NAN, f64::NAN);
    let mut loss = f64::NAN;
    for epoch in 0..cfg.epochs {
        let t0 = std::time::Instant::now();
        let f = 0.1f64.powi(cfg.milestones.iter().filter(|&&m| epoch >= m).count() as i32);
        let order = crate::data::loader::shard(train.len(), cfg.seed, epoch as u64, 1, 0);
        let (mut sum, mut seen) = (0.0f64, 0usize);
        for idx in order.chunks(cfg.batch_size) {
            if idx.len() < 2 {
                // BN in train mode needs two values per channel (PyTorch refuses one too).
                continue;
            }
            let (x, labels) = linear::batch(train, idx, |i| {
                linear::train_view(train, cfg.seed, epoch, i, size)
            })?;
            g.reset();
            g.set_recording(true);
            let xi = g.input(Shape::new(&[idx.len(), size, size, 3]), &x);
            let feat = net.forward(&mut g, xi, BnMode::Train);
            let pooled = g.avgpool(feat);
            let logits = g.linear(pooled, w);
            let yl = g.input_f(Shape::new(&[idx.len()]), &labels);
            let (l, _) = g.cross_entropy(logits, b, yl, 1);
            g.check()?;
            g.backward(l)?;
            let dev = &g.dev;
            let (params, grads, _) = B::f_side(&mut g.store, &mut g.w);
            let sgd = |lr: f64| SgdConfig {
                lr: lr * f,
                momentum: cfg.momentum,
                weight_decay: cfg.weight_decay,
            };
            dev.sgd_step(params, grads, &mut momentum, 0..fc_start, &sgd(lr_b))?;
            dev.sgd_step(params, grads, &mut momentum, fc_start..total, &sgd(lr_c))?;
            dev.refresh(&mut g.store, &mut g.w)?;
            sum += g.fetch(l)?[0] as f64 * idx.len() as f64;
            seen += idx.len();
        }
        loss = sum / seen.max(1) as f64;
        let done = epoch + 1;
        let scored = done % cfg.eval_every == 0 || done == cfg.epochs;
        if scored {
            let n = val.len();
            let (mut t1, mut t5) = (0usize, 0usize);
            let bias = linear::param_values(&mut g, b)?;
            for start in (0..n).step_by(linear::EVAL_BATCH) {
                let idx: Vec<usize> = (start..(start + linear::EVAL_BATCH).min(n)).collect();
                let (x, _) = linear::batch(val, &idx, |i| linear::eval_view(val, i, size))?;
                g.reset();
                g.set_recording(false);
                let xi = g.input(Shape::new(&[idx.len(), size, size, 3]), &x);
                let feat = net.forward(&mut g, xi, BnMode::Eval);
                let pooled = g.avgpool(feat);
                let logits = g.linear(pooled, w);
                g.check()?;
                let mut l = g.fetch(logits)?;
                linear::add_bias(&mut l, &bias);
                let labels: Vec<usize> = idx.iter().map(|&i| val.label(i)).collect();
                let h = linear::hits(&l, &labels, 1, o)[0];
                t1 += h.0;
                t5 += h.1;
            }
            acc = (100.0 * t1 as f64 / n as f64, 100.0 * t5 as f64 / n as f64);
        }
        let mut line = serde_json::json!({
            "epoch": done,
            "lr_factor": f,
            "train_loss": loss,
            "seconds": t0.elapsed().as_secs_f64(),
        });
        if scored {
            line["top1"] = acc.0.into();
            line["top5"] = acc.1.into();
        }
        linear::append_line(&metrics, &line.to_string())?;
        log(&format!(
            "epoch {done}/{} | loss {loss:.4}{} | {:.1} s",
            cfg.epochs,
            if scored {
                format!(" | top-1 {:.2}% top-5 {:.2}%", acc.0, acc.1)
            } else {
                String::new()
            },
            t0.elapsed().as_secs_f64()
        ));
    }
    // The fine-tuned network in torchvision names (fc included), as torchvision's resnet loads it.
    let mut cache = ParamStore::new();
    let st = g.dev.host_store(&g.store, &g.w, &mut cache)?;
    let t: Tensors = checkpoint::store_tensors(st)
        .into_iter()
        .map(|(n, v)| {
            let n = n
                .strip_prefix("online_net.backbone.")
                .unwrap_or(&n)
                .to_string();
            (n, v)
        })
        .collect();
    // The store writes 2-D weights as the heads' Conv1d [O, I, 1]; torchvision's fc is [O, I].
    let mut t = t;
    t.insert(
        "fc.weight".into(),
        checkpoint::Owned::f32(vec![o, dim], st.param(w)),
    );
    checkpoint::write_file_atomic(&out.join("finetuned.safetensors"), &t, None)?;
    Ok((acc.0, acc.1, loss))
}

/// Fine-tunes in folder `out` (a new one).
pub fn finetune(cfg: &FinetuneConfig, out: &Path, log: &dyn Fn(&str)) -> Result<FinetuneSummary> {
    cfg.check()?;
    let t0 = std::time::Instant::now();
    let settings = out.join("finetune.toml");
    if settings.exists() {
        return Err(Error::user(format!(
            "--out {}: holds a fine-tuning already; choose another folder",
            out.display()
        )));
    }
    let run_cfg =
        if cfg.checkpoint.is_dir() || cfg.checkpoint.extension().is_some_and(|e| e == "json") {
            Some(crate::run::read_manifest(&cfg.checkpoint)?.1.config)
        } else {
            None
        };
    let mut data = linear::open_data(
        linear::DataFlags {
            data: &cfg.data,
            val_data: &cfg.val_data,
            image_size: cfg.image_size,
        },
        run_cfg.as_ref(),
    )?;
    let split_what = if cfg.split == "all" {
        "all of the training set".to_string()
    } else {
        let (names, what) = split_names(&cfg.split)?;
        let idx = apply_split(&*data.train, &names, &what)?;
        let n = idx.len();
        data.train = Arc::new(Subset {
            set: data.train.clone(),
            idx,
        });
        format!("{what}: {n} images")
    };
    let (mut store, net, arch, what) =
        linear::load_backbone(&cfg.checkpoint, cfg.random_init.then_some(cfg.seed))?;
    let (o, dim) = (data.classes, arch.out_channels());
    // PyTorch's default Linear init: uniform in +-1/sqrt(fan_in), weight and bias.
    let bound = 1.0 / (dim as f64).sqrt();
    let mut r = Rng::keyed(&[cfg.seed, 0xf1_7e]);
    let w = store.add_param("fc.weight", Shape::new(&[o, dim]), |_| {
        r.range(-bound, bound) as f32
    });
    let b = store.add_param("fc.bias", Shape::new(&[o]), |_| {
        r.range(-bound, bound) as f32
    });
    std::fs::create_dir_all(out).map_err(|e| Error::io(out, e))?;
    let text = toml::to_string(cfg).map_err(|e| Error::Other(e.to_string()))?;
    checkpoint::write_bytes_atomic(&settings, text.as_bytes())?;
    let _ = std::fs::remove_file(out.join("metrics.jsonl"));
    let (lr_b, lr_c) = cfg.rates();
    let device = crate::device::resolve(cfg.device.parse()?);
    log(&format!(
        "lewel finetune | {what}{} | {} | {split_what} | lr {lr_b} backbone, {lr_c} classifier | batch {} | {} epochs | device {device:?}",
        if cfg.random_init { " (random init)" } else { "" },
        data.what,
        cfg.batch_size,
        cfg.epochs,
    ));
    let parts = (store, net, (w, b), dim);
    let (top1, top5, train_loss) = match device {
        crate::device::Device::Cpu => run_ft(Cpu::<f32>::default(), cfg, &data, out, parts, log)?,
        crate::device::Device::Cuda(n) => {
            let gpu = linear::open_gpu(n, &cfg.device)?;
            run_ft(Cuda::<f32>::new(gpu), cfg, &data, out, parts, log)?
        }
    };
    let s = FinetuneSummary {
        top1,
        top5,
        train_loss,
        lr: lr_b,
        lr_classifier: lr_c,
        epochs: cfg.epochs,
        train_images: data.train.len(),
        val_images: data.val.len(),
        classes: o,
        seconds: t0.elapsed().as_secs_f64(),
    };
    let json = serde_json::to_string_pretty(&s).map_err(|e| Error::Other(e.to_string()))?;
    checkpoint::write_bytes_atomic(&out.join("finetune.json"), json.as_bytes())?;
    Ok(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp_keep(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("lewel-ft-{name}-{}", std::process::id()))
    }

    fn tmp(name: &str) -> PathBuf {
        let d = tmp_keep(name);
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    /// The shipped lists are SimCLR's: their CRC32, counts and classes (LEWEL_SPEC 5.3: 12,811
    /// and 128,116 names over 1000 classes), and the same bytes as ../shared's copies when present.
    #[test]
    fn the_shipped_splits_are_simclrs() {
        for (split, text, (crc, n)) in [
            ("1percent", ONE_PERCENT, ONE_PERCENT_CHECK),
            ("10percent", TEN_PERCENT, TEN_PERCENT_CHECK),
        ] {
            let (names, _) = split_names(split).unwrap();
            assert_eq!((crc32fast::hash(text.as_bytes()), names.len()), (crc, n));
            let classes: std::collections::HashSet<&str> =
                names.iter().map(|n| n.split('_').next().unwrap()).collect();
            assert_eq!(classes.len(), 1000, "{split}");
            let shared = Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("../shared/data/imagenet_subsets")
                .join(format!("{split}.txt"));
            if let Ok(b) = std::fs::read(&shared) {
                assert!(
                    b == text.as_bytes(),
                    "{split} differs from {}",
                    shared.display()
                );
            }
        }
    }

    /// A generated ImageFolder (the built-in set's shapes as PNG files, 200 per class) with a 1%
    /// split file (2 per class): fine-tuning runs end to end, writes its files, and the built-in
    /// run's backbone does better than a random one.
    #[test]
    fn finetuning_a_one_percent_split_of_an_imagefolder() {
        let root = tmp("folder");
        let syn = crate::data::synthetic::Synthetic::new(3, 48, 2000, 300);
        let mut split = String::new();
        for (sub, sp, n) in [
            ("train", crate::data::synthetic::Split::Train, 2000),
            ("val", crate::data::synthetic::Split::Val, 300),
        ] {
            for i in 0..n {
                let class = crate::data::synthetic::CLASSES[syn.label(i)];
                let dir = root.join(sub).join(class);
                std::fs::create_dir_all(&dir).unwrap();
                let px: Vec<u8> = syn
                    .image_rgb(sp, i)
                    .iter()
                    .map(|v| (v * 255.0).round() as u8)
                    .collect();
                let name = format!("{class}_{i}.png");
                crate::data::show::write_png(
                    &crate::data::pil::Rgb8::new(48, 48, px),
                    &dir.join(&name),
                )
                .unwrap();
                if sub == "train" && i < 20 {
                    split.push_str(&format!("{class}/{name}\r\n"));
                }
            }
        }
        let list = root.join("split.txt");
        std::fs::write(&list, &split).unwrap();
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/linear/builtin_run_backbone.safetensors");
        let run = |name: &str, random: bool| {
            let cfg = FinetuneConfig {
                data: Some(root.clone()),
                lr: Some(0.01),
                lr_classifier: Some(0.1),
                epochs: 30,
                milestones: vec![20],
                batch_size: 20,
                eval_every: 30,
                random_init: random,
                device: "cpu".into(),
                ..FinetuneConfig::new(fixture.clone(), list.to_str().unwrap())
            };
            finetune(&cfg, &tmp(name), &|_| {}).unwrap()
        };
        let (a, b) = (run("pre", false), run("rand", true));
        println!("pretrained {:.1}% random {:.1}%", a.top1, b.top1);
        assert_eq!((a.train_images, a.val_images), (20, 300));
        assert!(a.top1 >= b.top1 + 10.0, "pretrained {a:?} random {b:?}");
        let t = checkpoint::read_file(&tmp_keep("pre").join("finetuned.safetensors")).unwrap();
        assert!(t.contains_key("conv1.weight") && t["fc.weight"].shape == vec![10, 256]);
    }

    /// A set with (or without) file names.
    struct Named(Vec<&'static str>, bool);
    impl Samples for Named {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn label(&self, _i: usize) -> usize {
            0
        }
        fn classes(&self) -> usize {
            1
        }
        fn decode(&self, _i: usize) -> std::result::Result<crate::data::pil::Rgb8, String> {
            Err("not here".into())
        }
        fn file_name(&self, i: usize) -> Option<String> {
            self.1.then(|| self.0[i].to_string())
        }
    }

    /// Missing split images are counted and the first named; a set without file names, an empty
    /// list and an unreadable one are one line each.
    #[test]
    fn bad_splits_are_one_line() {
        let d = tmp("bad");
        std::fs::create_dir_all(&d).unwrap();
        let list = d.join("s.txt");
        std::fs::write(&list, "n1/a.png\r\nb.png\nc.png\n").unwrap();
        let (names, what) = split_names(list.to_str().unwrap()).unwrap();
        assert_eq!(names, ["a.png", "b.png", "c.png"]);
        let set = Named(vec!["c.png", "a.png", "x.png"], true);
        let e = apply_split(&set, &names, &what).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(
            e.to_string().contains(
                "names 3 images; 1 of them are not in the training set (the first: b.png)"
            ),
            "{e}"
        );
        let set = Named(vec!["c.png", "a.png", "b.png"], true);
        assert_eq!(apply_split(&set, &names, &what).unwrap(), vec![0, 1, 2]);
        let e = apply_split(&Named(vec!["a.png"], false), &names, &what).unwrap_err();
        assert!(e.to_string().contains("no file names"), "{e}");
        std::fs::write(&list, "\n\n").unwrap();
        assert!(split_names(list.to_str().unwrap()).is_err());
        let e = split_names("/nonexistent/list.txt")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("--split /nonexistent/list.txt"), "{e}");
    }
}
