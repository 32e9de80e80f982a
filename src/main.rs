//! The `lewel` command line.

use clap::{Parser, Subcommand};
use lewel::device;
use lewel::optim::{ExcludeRule, LarsConfig};
use lewel::run::{self, PretrainConfig};
use lewel::train::{step_files, Method, StepConfig};
use lewel::{Error, Result};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "lewel",
    version,
    about = "LEWEL self-supervised pretraining of ResNet-50, on CUDA or the CPU"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
}

// Parsed once at start-up: the size difference between variants costs nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Cmd {
    /// LEWEL pretraining. With no arguments: the built-in synthetic dataset, the tiny model (ResNet-50
    /// at 1/8 width), the best device available, runs/lewel as the run folder.
    Pretrain(PretrainArgs),
    /// Write the online backbone of a checkpoint in torchvision names, or as a detectron2 .pkl.
    Export(ExportArgs),
    /// Pooled backbone features (eval mode) of images, from a checkpoint or an exported backbone.
    Embed(EmbedArgs),
    /// Exactly one LEWEL training iteration from a given state and views (the parity hook).
    Step(StepArgs),
    /// Convert a PyTorch checkpoint to lewel's safetensors, running nothing from it.
    ///
    /// Reads torch.save files (zip or legacy) through a pickle reader that refuses any global but
    /// PyTorch's tensors and containers. An official LEWEL checkpoint.pth.tar becomes a full state
    /// with its LARS buffers (for `lewel step --state`, `lewel embed --checkpoint`); a torchvision
    /// ResNet-18/50 state_dict or extract_backbone.py output a backbone file as `lewel export`
    /// writes.
    Import(ImportArgs),
    /// Print the GPU, the driver and the CUDA libraries found, or why not.
    Info,
    /// Every GPU op, forward and backward, against the CPU reference (f32 and bf16); a table.
    Check(CheckArgs),
    /// Where a training step's time goes: per node kind and per node, forward and backward, on
    /// random inputs after a warm-up; a table, --json, or a Chrome/Perfetto --trace.
    Profile(ProfileArgs),
    /// Whole training steps per second (median of the measured steps after a warm-up, min, max),
    /// peak memory, with data time excluded (random views) or included (the built-in set's
    /// augmentation); --json for scripts/bench-vs-pytorch.sh.
    Bench(BenchArgs),
    /// Pack an ImageFolder (or its train/) into one file of RGB JPEGs with labels and CRCs.
    Pack(PackArgs),
    /// Look at a dataset: `lewel data show PATH --out grid.png`.
    #[command(subcommand)]
    Data(DataCmd),
    /// Linear probe of a backbone (frozen, eval-mode BN): top-1/top-5 of linear heads, one per
    /// learning rate, trained in one pass (LEWEL_SPEC 8's recipe by default).
    Linear(LinearArgs),
    /// Semi-supervised fine-tuning of the whole network on a split (1percent, 10percent, a list).
    Finetune(FinetuneArgs),
    /// Each LEWEL head's alignment map over a few images, as a PNG grid (and one line per map).
    #[command(name = "show-align")]
    ShowAlign(ShowAlignArgs),
    /// Training curves of run folders as one PNG: loss (each step and epoch means), learning rate,
    /// EMA momentum against steps, kNN accuracy against epochs; several runs overlaid.
    Plot(PlotArgs),
}

#[derive(clap::Args)]
struct PlotArgs {
    /// Run folders (each holding its metrics.jsonl), one colour each.
    #[arg(required = true, value_name = "RUN")]
    runs: Vec<PathBuf>,
    /// The PNG to write (atomically).
    #[arg(long, default_value = "curves.png")]
    out: PathBuf,
}

fn plot(a: PlotArgs) -> Result<()> {
    let s = lewel::plot::plot(&a.runs, &a.out)?;
    for name in &s.empty {
        eprintln!("warning: {name}: no steps logged yet; left out of the plot");
    }
    let runs: Vec<String> = s
        .runs
        .iter()
        .map(|(name, steps, epochs)| format!("{name}: {steps} steps, {epochs} epochs"))
        .collect();
    let (w, h) = lewel::plot::SIZE;
    say(&format!(
        "{}: {} ({w}x{h} px; loss, learning rate, EMA momentum, kNN accuracy)",
        a.out.display(),
        runs.join("; ")
    ));
    Ok(())
}

#[derive(clap::Args)]
struct ShowAlignArgs {
    /// A run folder, its checkpoint.json, or a LEWEL state (.safetensors) with the online neck.
    #[arg(long)]
    checkpoint: PathBuf,
    /// An ImageFolder, a packed file, a folder of images, one image, or `synthetic` (the built-in
    /// set's held-out images).
    #[arg(long)]
    data: PathBuf,
    /// The PNG to write.
    #[arg(long, default_value = "maps.png")]
    out: PathBuf,
    /// Images (rows) to show.
    #[arg(long, default_value_t = 8)]
    count: usize,
    /// Side of the network input (resize + center crop). [default: the run's, else 48 on
    /// synthetic, 224 on images]
    #[arg(long)]
    size: Option<usize>,
    /// Which images: the built-in set's seed, or a labeled set's order. [default: the run's seed, else 0]
    #[arg(long)]
    seed: Option<u64>,
    /// Heads of a checkpoint file outside a run folder (a run's come from its config.toml). [default: 4]
    #[arg(long)]
    lewel_num_heads: Option<usize>,
    /// Scale of the alignment logits, likewise. [default: 1]
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f32)]
    lewel_scale: Option<f32>,
}

fn show_align(a: ShowAlignArgs) -> Result<()> {
    let o = lewel::eval::align::AlignOptions {
        checkpoint: a.checkpoint,
        data: a.data,
        count: a.count,
        size: a.size,
        seed: a.seed,
        heads: a.lewel_num_heads,
        scale: a.lewel_scale,
    };
    let s = lewel::eval::align::show_align(&o, &a.out)?;
    for line in &s.lines {
        say(line);
    }
    say(&format!(
        "{}: {} images x {} heads ({}x{} positions), columns: image, head 1..{} ({}x{} px)",
        a.out.display(),
        s.rows,
        s.heads,
        s.grid.0,
        s.grid.1,
        s.heads,
        s.image.w,
        s.image.h
    ));
    Ok(())
}

#[derive(clap::Subcommand)]
enum DataCmd {
    /// A PNG grid of samples: each decoded image beside its two augmented views (epoch 0).
    Show(ShowArgs),
}

#[derive(clap::Args)]
struct ShowArgs {
    /// An ImageFolder root or a packed file.
    path: PathBuf,
    /// Samples (rows) to show.
    #[arg(long, default_value_t = 8)]
    count: usize,
    /// Side of each cell and of the views, in pixels.
    #[arg(long, default_value_t = 224)]
    size: usize,
    /// Seed of the sample order and of the views (as `lewel pretrain --seed`).
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// The PNG to write.
    #[arg(long, default_value = "grid.png")]
    out: PathBuf,
    /// JPEG decoder: zune or libjpeg-turbo (as `lewel pretrain --jpeg-decoder`).
    #[arg(long, value_name = "zune|libjpeg-turbo", default_value = "zune")]
    jpeg_decoder: String,
}

fn data_show(a: ShowArgs) -> Result<()> {
    if !(1..=10_000).contains(&a.count) {
        return Err(Error::user(format!(
            "--count: must lie in [1, 10000], got {}",
            a.count
        )));
    }
    if !(32..=1024).contains(&a.size) {
        return Err(Error::user(format!(
            "--size: must lie in [32, 1024], got {}",
            a.size
        )));
    }
    lewel::data::decode::set_jpeg_decoder(a.jpeg_decoder.parse()?)?;
    let samples = lewel::data::open_samples(&a.path)?;
    let grid = lewel::data::show::grid(&*samples, a.count, a.size, a.seed);
    lewel::data::show::write_png(&grid.image, &a.out)?;
    say(&format!(
        "{}: {} samples, columns: original, view 1, view 2 ({}x{} px)",
        a.out.display(),
        grid.rows,
        grid.image.w,
        grid.image.h
    ));
    Ok(())
}

#[derive(clap::Args)]
struct PackArgs {
    /// ImageFolder root (<root>/<class>/<image>), or a folder whose train/ holds the classes.
    src: PathBuf,
    /// The packed file to write (atomically: a temp file beside it, then a rename).
    out: PathBuf,
    /// Re-encode images whose longer side exceeds N pixels, resized to N on that side.
    #[arg(long, value_name = "N")]
    max_side: Option<usize>,
    /// JPEG quality (1-100) of re-encoded images (CMYK, grayscale, PNG, resized).
    #[arg(long, value_name = "Q", default_value_t = 90)]
    quality: u8,
    /// JPEG decoder for checking and converting files: zune or libjpeg-turbo (PIL's pixels).
    #[arg(long, value_name = "zune|libjpeg-turbo", default_value = "zune")]
    jpeg_decoder: String,
}

fn pack(a: PackArgs) -> Result<()> {
    lewel::data::decode::set_jpeg_decoder(a.jpeg_decoder.parse()?)?;
    let o = lewel::data::pack::PackOptions {
        max_side: a.max_side,
        quality: a.quality,
        progress: true,
    };
    let s = lewel::data::pack::pack(&a.src, &a.out, &o)?;
    say(&s.report(&a.out));
    Ok(())
}

#[derive(clap::Args)]
struct CheckArgs {
    /// cuda or cuda:N.
    #[arg(long, default_value = "cuda")]
    device: String,
    /// Seed of the random inputs.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Only the op table: skip the whole training steps and the loss curve.
    #[arg(long)]
    ops_only: bool,
    /// Write one line per op-table output to this file: its name and a hash of the GPU's bytes
    /// (runs under different thread schedules of the software GPU must give equal files).
    #[arg(long)]
    digests: Option<PathBuf>,
}

#[derive(clap::Args)]
struct ProfileArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// tiny, resnet18 or resnet50.
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// lewel-b-eman or lewel-b.
    #[arg(long, default_value = "lewel-b-eman")]
    method: String,
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Side of the random square views.
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    /// Measured steps.
    #[arg(long, default_value_t = 3)]
    steps: usize,
    /// Steps run first and not measured.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the weights and the random views.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Node rows shown in the table (--json has them all).
    #[arg(long, default_value_t = 25)]
    top: usize,
    /// Print the tables as JSON instead.
    #[arg(long)]
    json: bool,
    /// Write Chrome/Perfetto trace events (one per node per step, one per step) to this file.
    #[arg(long)]
    trace: Option<PathBuf>,
}

fn profile(a: ProfileArgs) -> Result<()> {
    let cfg = lewel::profile::ProfileConfig {
        device: a.device.parse()?,
        arch: a.arch.parse()?,
        method: a.method.parse()?,
        batch_size: a.batch_size,
        image_size: a.image_size,
        steps: a.steps,
        warmup: a.warmup,
        seed: a.seed,
    };
    let (p, note) = lewel::profile::run(&cfg)?;
    if let Some(n) = note {
        eprintln!("lewel: note: {n}");
    }
    if let Some(path) = &a.trace {
        let text =
            serde_json::to_string(&p.trace()).map_err(|e| Error::Other(format!("trace: {e}")))?;
        lewel::checkpoint::write_bytes_atomic(path, text.as_bytes())?;
    }
    // Through `say`: a closed stdout (`lewel profile | head`) is not an error.
    if a.json {
        say(&format!("{:#}", p.json()));
    } else {
        say(p.table(a.top).trim_end());
        if let Some(path) = &a.trace {
            say(&format!("\ntrace: {}", path.display()));
        }
    }
    Ok(())
}

#[derive(clap::Args)]
struct BenchArgs {
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
    /// tiny, resnet18 or resnet50.
    #[arg(long, default_value = "resnet50")]
    arch: String,
    /// lewel-b-eman or lewel-b.
    #[arg(long, default_value = "lewel-b-eman")]
    method: String,
    /// Samples per step (each has two views).
    #[arg(long, default_value_t = 16)]
    batch_size: usize,
    /// Side of the square views.
    #[arg(long, default_value_t = 64)]
    image_size: usize,
    /// Measured steps.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Steps run first and not measured.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Seed of the weights and the views.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// none: random views drawn once, data time excluded; builtin: each step's views drawn in the
    /// step from the built-in synthetic set as `lewel pretrain` draws them, data time included.
    #[arg(long, value_name = "none|builtin", default_value = "none")]
    data: String,
    /// Print one JSON object on one line instead.
    #[arg(long)]
    json: bool,
}

fn bench(a: BenchArgs) -> Result<()> {
    let cfg = lewel::bench::BenchConfig {
        device: a.device.parse()?,
        arch: a.arch.parse()?,
        method: a.method.parse()?,
        batch_size: a.batch_size,
        image_size: a.image_size,
        steps: a.steps,
        warmup: a.warmup,
        seed: a.seed,
        data: a.data.parse()?,
    };
    let (b, note) = lewel::bench::run(&cfg)?;
    if let Some(n) = note {
        eprintln!("lewel: note: {n}");
    }
    if a.json {
        say(&b.json().to_string());
    } else {
        say(&b.text());
    }
    Ok(())
}

#[derive(clap::Args)]
struct StepArgs {
    /// Full state: online_net.*, target_net.*, predictor.*, predictor_obj.* (official names, PyTorch
    /// layouts), optionally momentum.<name> LARS buffers.
    #[arg(long)]
    state: PathBuf,
    /// view1 and view2, float32 NCHW (B, 3, H, W), already normalized.
    #[arg(long)]
    views: PathBuf,
    /// Output: loss, grad.<name>, state.<name>.
    #[arg(long)]
    out: PathBuf,
    /// lewel-b-eman or lewel-b.
    #[arg(long, default_value = "lewel-b-eman")]
    method: String,
    /// Learning rate of this iteration.
    #[arg(long, default_value_t = 0.3, allow_negative_numbers = true)]
    lr: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 1.5e-6, allow_negative_numbers = true)]
    wd: f64,
    /// LARS trust coefficient.
    #[arg(long, default_value_t = 0.001, allow_negative_numbers = true)]
    lars_eta: f64,
    /// LARS momentum.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true)]
    momentum: f64,
    /// EMA momentum of this iteration.
    #[arg(long, default_value_t = 0.98, allow_negative_numbers = true)]
    ema_m: f64,
    /// Heads of the LEWEL alignment maps.
    #[arg(long, default_value_t = 4)]
    lewel_num_heads: usize,
    /// Weight of the global (BYOL) loss; 1 gives BYOL.
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    lewel_loss_weight: f64,
    /// Scale of the alignment logits.
    #[arg(long, default_value_t = 1.0, allow_negative_numbers = true)]
    lewel_scale: f32,
    /// current (the official code) or released-log (the older rule of the released 100-epoch log).
    #[arg(long, default_value = "current")]
    lars_exclude: String,
    /// Samples per batch-norm statistics group (emulates per-GPU BN); default: the whole batch.
    #[arg(long)]
    bn_group: Option<usize>,
}

fn step(a: StepArgs) -> Result<()> {
    let method: Method = a.method.parse()?;
    let nonneg = |flag: &str, v: f64| -> Result<()> {
        if v.is_finite() && v >= 0.0 {
            Ok(())
        } else {
            Err(Error::user(format!(
                "{flag}: must be a non-negative number, got {v}"
            )))
        }
    };
    nonneg("--lr", a.lr)?;
    nonneg("--wd", a.wd)?;
    nonneg("--lars-eta", a.lars_eta)?;
    if !(0.0..=1.0).contains(&a.momentum) {
        return Err(Error::user(format!(
            "--momentum: must lie in [0, 1], got {}",
            a.momentum
        )));
    }
    if !(0.0..=1.0).contains(&a.ema_m) {
        return Err(Error::user(format!(
            "--ema-m: must lie in [0, 1], got {}",
            a.ema_m
        )));
    }
    let exclude = ExcludeRule::from_flag(&a.lars_exclude, method == Method::LewelBEman)?;
    if a.bn_group == Some(0) {
        return Err(Error::user("--bn-group: must be at least 1"));
    }
    let sc = StepConfig {
        method,
        lars: LarsConfig {
            lr: a.lr,
            weight_decay: a.wd,
            momentum: a.momentum,
            eta: a.lars_eta,
        },
        ema_m: a.ema_m,
        exclude,
        bn_group: a.bn_group,
    };
    let loss = step_files(
        &a.state,
        &a.views,
        &a.out,
        &sc,
        a.lewel_num_heads,
        a.lewel_scale,
        a.lewel_loss_weight,
    )?;
    say(&format!(
        "step | {} | loss {loss:.6} | wrote {}",
        method.name(),
        a.out.display()
    ));
    Ok(())
}

/// A finite number (NaN and infinities are refused at parsing, naming the flag).
fn finite_f64(s: &str) -> std::result::Result<f64, String> {
    match s.parse::<f64>() {
        Ok(v) if v.is_finite() => Ok(v),
        Ok(v) => Err(format!("expected a finite number, got {v}")),
        Err(e) => Err(format!("expected a number ({e})")),
    }
}

fn finite_f32(s: &str) -> std::result::Result<f32, String> {
    finite_f64(s).and_then(|v| {
        let f = v as f32;
        if f.is_finite() {
            Ok(f)
        } else {
            Err(format!("expected a finite 32-bit number, got {v}"))
        }
    })
}

/// Flags of `lewel pretrain`; each overrides the config file, which overrides the defaults. The
/// defaults shown in `--help` are read from `PretrainConfig::default()` (`with_defaults`).
#[derive(clap::Args, Default)]
struct PretrainArgs {
    /// A TOML file with any of the settings below (underscored names: batch_size = 64). [default: none]
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue the run in this folder (or its checkpoint.json). With --epochs N it is extended (or
    /// shortened) to N epochs; settings that define what is trained cannot change. [default: none]
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Start over in an --out folder that holds a run: its config, metrics and checkpoints are
    /// deleted first (nothing else there is touched).
    #[arg(long)]
    force: bool,
    /// Check the settings, the data and the device, print the run's first line, write nothing.
    #[arg(long)]
    dry_run: bool,
    /// Stop after this many epochs are done (resume later with --resume). [default: none]
    #[arg(long)]
    stop_after: Option<usize>,
    /// resnet50, resnet18 or tiny (ResNet-50 at 1/8 width).
    #[arg(long)]
    arch: Option<String>,
    /// lewel-b-eman (EMAN) or lewel-b (SyncBN-style target in train mode).
    #[arg(long)]
    method: Option<String>,
    /// Training epochs.
    #[arg(long)]
    epochs: Option<usize>,
    /// Epochs of linear lr warmup, per iteration. [default: 2, or --epochs - 1 when that is less]
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Total batch per iteration.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Absolute learning rate for the total batch (no automatic scaling).
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f64)]
    lr: Option<f64>,
    /// Weight decay.
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f64)]
    wd: Option<f64>,
    /// Initial EMA momentum m0 (it rises to 1 on a cosine).
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f64)]
    enc_m: Option<f64>,
    /// Heads of the LEWEL alignment maps.
    #[arg(long)]
    lewel_num_heads: Option<usize>,
    /// Weight of the global (BYOL) loss; 1 gives BYOL.
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f64)]
    lewel_loss_weight: Option<f64>,
    /// Scale of the alignment logits.
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f32)]
    lewel_scale: Option<f32>,
    /// LARS exclusion rule: current (the official code) or released-log.
    #[arg(long)]
    lars_exclude: Option<String>,
    /// Samples per BN statistics group (emulates per-GPU BN); 0: the whole batch.
    #[arg(long)]
    bn_group: Option<usize>,
    /// On several GPUs, BN statistics over the whole batch across all of them (SyncBN, the
    /// official LEWEL-B recipe) instead of each GPU's own samples. [default: off]
    #[arg(long)]
    sync_bn: bool,
    /// Seed of the weights, the data order and the augmentation.
    #[arg(long)]
    seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Activation storage on the GPU: auto (bf16 on a GPU of compute capability 8.0 or newer, else f32), f32 or bf16.
    #[arg(long)]
    precision: Option<String>,
    /// Only deterministic cuDNN algorithms: a rerun on the same GPU is bitwise identical.
    #[arg(long)]
    deterministic: bool,
    /// Side of the training views in pixels. [default: 48 on the synthetic set, 224 with --data]
    #[arg(long)]
    image_size: Option<usize>,
    /// Images in the synthetic training split.
    #[arg(long)]
    train_len: Option<usize>,
    /// Images in the synthetic validation split (kNN queries).
    #[arg(long)]
    val_len: Option<usize>,
    /// Neighbours of the kNN monitor.
    #[arg(long)]
    knn_k: Option<usize>,
    /// Synthetic set: memory images of the kNN monitor (the first of the training split); 0: all.
    #[arg(long)]
    knn_memory: Option<usize>,
    /// Log a step line every N steps (and at the end of each epoch).
    #[arg(long)]
    log_every: Option<usize>,
    /// Checkpoints kept in the run folder (the newest).
    #[arg(long)]
    keep: Option<usize>,
    /// When a step's loss or a gradient is NaN or infinite: stop (exit 3, the last checkpoint
    /// intact) or skip that step's update and go on (each step then waits for its check).
    #[arg(long)]
    on_nan: Option<String>,
    /// With --on-nan skip: stop (exit 3) once more steps than this were skipped.
    #[arg(long)]
    max_nan_skips: Option<usize>,
    /// The run folder: config.toml, metrics.jsonl, checkpoints, lewel.lock.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training images: an ImageFolder root (or the folder holding its train/) or a file made by
    /// `lewel pack`. [default: none: the built-in synthetic dataset]
    #[arg(long)]
    data: Option<PathBuf>,
    /// Labeled images of the kNN monitor's queries (ImageFolder or packed). [default: the val/
    /// folder beside the data's train/; none: the monitor is off]
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// kNN monitor on real data: memory images per class (the first of each class).
    #[arg(long)]
    knn_memory_per_class: Option<usize>,
    /// kNN monitor on real data: query images per class (the first of each class of --val-data).
    #[arg(long)]
    knn_query_per_class: Option<usize>,
    /// kNN monitor on real data: disjoint (memory from --data, queries from --val-data) or official
    /// (both from --val-data, the memory inside the queries, as the official monitor and its logs).
    #[arg(long)]
    knn_protocol: Option<String>,
    /// Threads decoding and augmenting real data; 0: one per core.
    #[arg(long)]
    loader_threads: Option<usize>,
    /// Stop when more than this fraction of the samples read could not be decoded.
    #[arg(long, value_parser = finite_f64)]
    max_bad: Option<f64>,
    /// JPEG decoder: zune (pure Rust) or libjpeg-turbo (PIL's pixels exactly, faster; needs
    /// libturbojpeg.so.0, Debian/Ubuntu package libturbojpeg0).
    #[arg(long, value_name = "zune|libjpeg-turbo")]
    jpeg_decoder: Option<String>,
    /// On a GPU, keep the loader's crops in ordinary (pageable) memory instead of page-locked
    /// memory: the driver then stages each upload, and the trainer waits for it.
    #[arg(long)]
    no_pin_memory: bool,
    /// Train on N GPUs of this machine: N worker processes, one per GPU, each taking 1/N of the
    /// batch (per-GPU BN, as the official EMAN runs). [default: 1]
    #[arg(long)]
    gpus: Option<usize>,
    /// This process's rank in a run started by another launcher (with --world-size); torchrun's
    /// RANK/WORLD_SIZE or Slurm's SLURM_PROCID/SLURM_NTASKS are read when no flag is given.
    /// [default: RANK, else SLURM_PROCID, else 0]
    #[arg(long)]
    rank: Option<usize>,
    /// Processes (GPUs) in the run, over all nodes (with --rank). [default: WORLD_SIZE, else
    /// SLURM_NTASKS, else 1]
    #[arg(long)]
    world_size: Option<usize>,
    /// Rank 0's host, where the ranks meet. [default: MASTER_ADDR, else 127.0.0.1]
    #[arg(long)]
    master_addr: Option<String>,
    /// Rank 0's rendezvous port. [default: MASTER_PORT, else 29500; with --gpus a free port]
    #[arg(long)]
    master_port: Option<u16>,
}

impl PretrainArgs {
    /// The settings given, by config key: the config file's, then the flags' over them.
    fn given(&self) -> Result<run::Given> {
        let mut g = match &self.config {
            Some(p) => PretrainConfig::given_from_toml(p)?,
            None => run::Given::new(),
        };
        macro_rules! put {
            ($($f:ident),*) => { $(
                if let Some(v) = &self.$f {
                    let v = serde_json::to_value(v)
                        .map_err(|e| Error::user(format!("--{}: {e}", stringify!($f))))?;
                    g.insert(stringify!($f).to_string(), v);
                }
            )* };
        }
        put!(
            arch,
            method,
            epochs,
            warmup_epochs,
            batch_size,
            lr,
            wd,
            enc_m,
            lewel_num_heads,
            lewel_loss_weight,
            lewel_scale
        );
        put!(
            lars_exclude,
            bn_group,
            seed,
            device,
            precision,
            image_size,
            train_len,
            val_len,
            knn_k,
            knn_memory,
            log_every,
            keep,
            on_nan,
            max_nan_skips,
            out,
            data,
            val_data
        );
        put!(
            knn_memory_per_class,
            knn_query_per_class,
            knn_protocol,
            loader_threads,
            max_bad,
            jpeg_decoder
        );
        if self.deterministic {
            g.insert("deterministic".into(), true.into());
        }
        if self.sync_bn {
            g.insert("sync_bn".into(), true.into());
        }
        if self.no_pin_memory {
            g.insert("pin_memory".into(), false.into());
        }
        Ok(g)
    }
}

/// `--gpus N` (N > 1): checks what can be checked here, then starts the workers and waits.
fn launch_gpus(n: usize, a: &PretrainArgs, given: &run::Given) -> Result<()> {
    if a.resume.is_none() {
        let cfg = PretrainConfig::from_given(given)?;
        cfg.validate()?;
        run::check_world(&cfg, n)?;
    }
    let p = device::probe();
    let found = (0..p.gpus.len()).filter(|&i| p.usable(i)).count();
    if found < n {
        let why = match &p.driver {
            Err(e) if p.gpus.is_empty() => format!(" ({e})"),
            _ => String::new(),
        };
        return Err(Error::user(format!(
            "--gpus {n}: this machine has {found} usable GPU(s){why}; `lewel info` lists them"
        )));
    }
    // The command line again without --gpus N (or --gpus=N).
    let mut args = Vec::new();
    let mut it = std::env::args_os().skip(2);
    while let Some(x) = it.next() {
        match x.to_str() {
            Some("--gpus") => {
                it.next();
            }
            Some(s) if s.starts_with("--gpus=") => {}
            _ => args.push(x),
        }
    }
    let code = lewel::dist::launch::launch(n, &args, a.master_port)?;
    if code != 0 {
        std::process::exit(code);
    }
    Ok(())
}

/// `[default: ...]` after the help of every `pretrain` flag that is a config key, read from the
/// defaults themselves; `[default: off]` after switches.
fn with_defaults(cmd: clap::Command) -> clap::Command {
    let defaults = PretrainConfig::default().to_given();
    cmd.mut_subcommand("pretrain", |sc| {
        let ids: Vec<String> = sc.get_arguments().map(|a| a.get_id().to_string()).collect();
        ids.into_iter().fold(sc, |sc, id| {
            let d = defaults.get(&id).cloned();
            sc.mut_arg(&id, |a| {
                let help = a.get_help().map(|h| h.to_string()).unwrap_or_default();
                if help.contains("[default:") {
                    return a;
                }
                let shown = match (&d, a.get_action()) {
                    (_, clap::ArgAction::SetTrue) => "off".to_string(),
                    (Some(serde_json::Value::String(s)), _) => s.clone(),
                    (Some(v), _) => v.to_string(),
                    (None, _) => return a,
                };
                a.help(format!("{help} [default: {shown}]"))
            })
        })
    })
}

/// A line on stdout; a closed stdout (`lewel ... | head`) is not an error.
fn say(line: &str) {
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{line}");
}

/// A value of a summary, or "-" when there is none.
fn or_dash(v: Option<f64>, f: impl Fn(f64) -> String) -> String {
    v.map_or("-".to_string(), f)
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    if a.stop_after == Some(0) {
        return Err(Error::user("--stop-after: must be at least 1"));
    }
    let given = a.given()?;
    if let Some(n) = a.gpus {
        if n == 0 {
            return Err(Error::user("--gpus: at least 1"));
        }
        if a.rank.is_some() || a.world_size.is_some() {
            return Err(Error::user(
                "--gpus starts its own ranks; it does not go with --rank/--world-size",
            ));
        }
        if std::env::var_os("RANK").is_some() && std::env::var_os("LEWEL_LAUNCHER").is_none() {
            return Err(Error::user(
                "--gpus: this process was started by torchrun (RANK is set), which starts the ranks itself: drop --gpus",
            ));
        }
        if n > 1 && std::env::var_os("LEWEL_LAUNCHER").is_none() {
            return launch_gpus(n, &a, &given);
        }
    }
    let env = |k: &str| std::env::var(k).ok();
    let flags = lewel::dist::ranks::RankFlags {
        rank: a.rank,
        world_size: a.world_size,
        master_addr: a.master_addr.clone(),
        master_port: a.master_port,
    };
    let ranks = lewel::dist::ranks::Ranks::resolve(&flags, &env)?;
    let lead = ranks.rank == 0;
    let opts = run::RunOptions {
        stop_after: a.stop_after,
        force: a.force,
        dry_run: a.dry_run,
        ranks,
        interrupt_at_step: None,
        poison_gradient_at: None,
    };
    // Ctrl-C, SIGTERM and SIGUSR1 finish the step, write a checkpoint and exit with 75.
    lewel::signals::install();
    let s = match &a.resume {
        Some(r) => {
            if a.force {
                return Err(Error::user(
                    "--force: starts a new run over an old one; it does not go with --resume",
                ));
            }
            run::resume(r, &given, &opts)?
        }
        None => run::pretrain(&PretrainConfig::from_given(&given)?, &opts)?,
    };
    if let Some(st) = &s.stopped {
        if lead {
            say(&format!(
                "stopped by {} after step {} of {} | checkpoint {} | continue with: lewel pretrain --resume {}",
                st.signal,
                st.step,
                st.total,
                st.checkpoint.display(),
                st.dir.display()
            ));
        }
        std::process::exit(lewel::signals::EXIT_STOPPED);
    }
    if a.dry_run || !lead {
        return Ok(());
    }
    let gain = s.knn_init.zip(s.knn_final).map(|(i, f)| f - i);
    say(&format!(
        "done | {} epochs, {} steps in {:.1} s | loss {} -> {} | kNN accuracy {} at init -> {} ({} points)",
        s.epochs_done,
        s.steps,
        s.seconds,
        or_dash(s.first_loss, |v| format!("{v:.4}")),
        or_dash(s.last_loss, |v| format!("{v:.4}")),
        or_dash(s.knn_init, |v| format!("{v:.2}%")),
        or_dash(s.knn_final, |v| format!("{v:.2}%")),
        or_dash(gain, |v| format!("{v:+.2}")),
    ));
    Ok(())
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// A run folder, its checkpoint.json, a LEWEL state or an exported backbone (.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// An image file, a folder of images (sorted by name), an ImageFolder or a `lewel pack` file
    /// (then `labels` are written too), each put through the eval transform: resize the shorter
    /// side to size * 256 / 224 (PIL bilinear), center crop, ImageNet mean/std. Or a safetensors
    /// holding `images`, float32 NCHW (N, 3, H, W), already normalized (used as it is).
    #[arg(long)]
    images: PathBuf,
    /// Side of the center crop for image files.
    #[arg(long, default_value_t = 224)]
    image_size: usize,
    /// Output: `features`, float32 (N, C), pooled, not normalized; `labels` (i64) for labeled sets.
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ImportArgs {
    /// A torch.save file (checkpoint.pth.tar, a state_dict .pth).
    file: PathBuf,
    /// Output .safetensors: a LEWEL state (official names, `momentum.<name>` LARS buffers) or a
    /// backbone (torchvision names).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// A run folder, its checkpoint.json, or a checkpoint .safetensors (for detectron2, also a
    /// backbone written by `lewel export`).
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output: the online backbone in torchvision names (a .safetensors), or for detectron2 a .pkl
    /// to give as MODEL.WEIGHTS (configs/detectron2/).
    #[arg(long)]
    out: PathBuf,
    /// torchvision (safetensors, torchvision names) or detectron2 (a pickle in detectron2's names).
    #[arg(
        long,
        value_name = "torchvision|detectron2",
        default_value = "torchvision"
    )]
    format: String,
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        None => {
            // No command is a usage error: nothing was done.
            eprint!("{USAGE}");
            std::process::exit(2)
        }
        Some(Cmd::Export(a)) => {
            use lewel::detectron2::{self, ExportFormat};
            match a.format.parse::<ExportFormat>()? {
                ExportFormat::Torchvision => {
                    let n = run::export(&a.checkpoint, &a.out)?;
                    say(&format!(
                        "wrote {} ({n} tensors, torchvision names)",
                        a.out.display()
                    ));
                }
                ExportFormat::Detectron2 => {
                    let e = detectron2::export(&a.checkpoint, &a.out)?;
                    if e.arch != lewel::model::resnet::Arch::RESNET50 {
                        eprintln!(
                            "warning: the backbone is {}; configs/detectron2/ build ResNet-50",
                            e.arch.name()
                        );
                    }
                    say(&format!(
                        "wrote {} ({} tensors, detectron2 names, {}, {:.1} MB)",
                        a.out.display(),
                        e.tensors,
                        e.arch.name(),
                        e.bytes as f64 / 1e6
                    ));
                }
            }
            Ok(())
        }
        Some(Cmd::Pretrain(a)) => pretrain(a),
        Some(Cmd::Step(a)) => step(a),
        Some(Cmd::Import(a)) => {
            let i = lewel::import::import(&a.file, &a.out)?;
            say(&i.summary);
            Ok(())
        }
        Some(Cmd::Embed(a)) => {
            let e = run::embed(&a.checkpoint, &a.images, &a.out, a.image_size)?;
            say(&format!(
                "wrote {} ({} x {} features{})",
                a.out.display(),
                e.n,
                e.dim,
                if e.labeled { " and labels" } else { "" }
            ));
            Ok(())
        }
        Some(Cmd::Info) => {
            print!("{}", device::probe().report());
            // How this process reads its launcher's variables (torchrun, Slurm), for multi-GPU
            // runs: a misread environment shows here before a run starts.
            let env = |k: &str| std::env::var(k).ok();
            let flags = lewel::dist::ranks::RankFlags::default();
            let ranks = match lewel::dist::ranks::Ranks::resolve(&flags, &env) {
                Ok(r) => r.describe(),
                Err(e) => e.to_string(),
            };
            println!("ranks      {ranks}");
            Ok(())
        }
        Some(Cmd::Check(a)) => check(a),
        Some(Cmd::Profile(a)) => profile(a),
        Some(Cmd::Bench(a)) => bench(a),
        Some(Cmd::Pack(a)) => pack(a),
        Some(Cmd::Data(DataCmd::Show(a))) => data_show(a),
        Some(Cmd::Linear(a)) => linear(a),
        Some(Cmd::Finetune(a)) => finetune(a),
        Some(Cmd::ShowAlign(a)) => show_align(a),
        Some(Cmd::Plot(a)) => plot(a),
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let ordinal = match a.device.parse::<device::DeviceChoice>()? {
        device::DeviceChoice::Cuda(n) => n,
        _ => return Err(Error::user("--device: lewel check needs cuda or cuda:N")),
    };
    let g = std::rc::Rc::new(lewel::gpu::Gpu::new(ordinal, true).map_err(|e| match e {
        Error::Cuda(m) => Error::user(format!(
            "lewel check: cannot open cuda:{ordinal}: {m}. `lewel info` shows what was found; without a GPU, run the checks on the software GPU: bash scripts/emu-env.sh target/release/lewel check (a C++ compiler is all it needs; see the README)"
        )),
        e => e,
    })?);
    println!(
        "lewel check | {} (sm_{}{}) | cuda:{}",
        g.name, g.cc.0, g.cc.1, g.ordinal
    );
    let t = std::time::Instant::now();
    let mut rows = lewel::check::run_ops(&g, a.seed)?;
    if let Some(p) = &a.digests {
        let text: String = lewel::check::digests()
            .iter()
            .map(|(name, h)| format!("{name} {h:016x}\n"))
            .collect();
        lewel::checkpoint::write_bytes_atomic(p, text.as_bytes())?;
    }
    if !a.ops_only {
        rows.extend(lewel::check::step::run_steps(&g, a.seed)?);
    }
    print!("{}", lewel::check::table(&rows));
    if let Some(why) = g.find_failure.borrow().as_ref() {
        println!(
            "note: benchmarking cuDNN algorithms failed ({why}); the heuristic choice was used"
        );
    }
    let failed = rows.iter().filter(|r| !r.pass()).count();
    println!(
        "{} checks, {failed} failed, {:.1} s",
        rows.len(),
        t.elapsed().as_secs_f64()
    );
    if failed > 0 {
        return Err(Error::Other(format!("lewel check: {failed} checks failed")));
    }
    Ok(())
}

/// The flags `lewel linear` and `lewel finetune` share.
#[derive(clap::Args)]
struct EvalArgs {
    /// Training images: an ImageFolder, a folder holding train/ and val/, a packed file, or
    /// builtin (the built-in synthetic set). Default: the built-in set of the checkpoint's run.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Validation images. Default: val/ beside --data's train/.
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// Epochs at which the learning rates are multiplied by 0.1.
    #[arg(long, default_value = "30,40")]
    milestones: String,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    /// Crop side. Default: 224, or the run's image size on its synthetic set.
    #[arg(long)]
    image_size: Option<usize>,
    /// Seed of the classifier's init, the data order and the views.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Score the validation set every N epochs (and after the last).
    #[arg(long, default_value_t = 5)]
    eval_every: usize,
    /// A randomly initialized backbone of the checkpoint's architecture (the baseline).
    #[arg(long)]
    random_init: bool,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

#[derive(clap::Args)]
struct LinearArgs {
    /// The backbone: a run folder, its checkpoint.json, a LEWEL state or an exported backbone.
    #[arg(long, required_unless_present = "resume")]
    checkpoint: Option<PathBuf>,
    /// Learning rates, one head each, trained in the same pass: 0.1,0.4,1.6,30. Absolute, for
    /// --batch-size.
    #[arg(long, default_value = "0.4")]
    lr: String,
    #[command(flatten)]
    eval: EvalArgs,
    /// Training epochs [default: 50].
    #[arg(long)]
    epochs: Option<usize>,
    /// SGD momentum.
    #[arg(long, default_value_t = 0.9, allow_negative_numbers = true, value_parser = finite_f64)]
    momentum: f64,
    /// Weight decay.
    #[arg(long, default_value_t = 0.0, allow_negative_numbers = true, value_parser = finite_f64)]
    wd: f64,
    /// Extract centre-crop features of the training set once and train on them (fast; no
    /// augmentation, which changes the training numbers and usually costs some accuracy).
    #[arg(long)]
    features_cache: bool,
    /// The probe's folder. Default: linear/ in the run folder, or runs/linear.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Testing only: the backbone's BN in train mode (the frozen-backbone check must fail).
    #[arg(long, hide = true)]
    debug_train_bn: bool,
    /// Continue the probe in this folder (with --epochs N: extended to N epochs).
    #[arg(long)]
    resume: Option<PathBuf>,
}

fn linear(a: LinearArgs) -> Result<()> {
    use lewel::eval::linear::{self as lin, LinearConfig};
    let e = a.eval;
    let milestones = parse_milestones(&e.milestones)?;
    let checkpoint = a.checkpoint.clone().unwrap_or_default();
    let cfg = LinearConfig {
        data: e.data,
        val_data: e.val_data,
        lrs: lin::parse_lrs(&a.lr)?,
        epochs: a.epochs.unwrap_or(50),
        milestones,
        batch_size: e.batch_size,
        momentum: a.momentum,
        weight_decay: a.wd,
        image_size: e.image_size,
        seed: e.seed,
        eval_every: e.eval_every,
        features_cache: a.features_cache,
        random_init: e.random_init,
        device: e.device,
        train_bn: a.debug_train_bn,
        ..LinearConfig::new(checkpoint.clone())
    };
    let (out, resume) = match (&a.resume, &a.out) {
        (Some(r), None) => (r.clone(), lin::Start::Resume(a.epochs)),
        (Some(_), Some(_)) => {
            return Err(Error::user(
                "--resume names the probe's folder; it does not go with --out",
            ))
        }
        (None, Some(o)) => (o.clone(), lin::Start::New),
        (None, None) if checkpoint.is_dir() => (checkpoint.join("linear"), lin::Start::New),
        (None, None) => (PathBuf::from("runs/linear"), lin::Start::New),
    };
    let s = lin::linear(&cfg, &out, resume, &|l| say(l))?;
    for (i, h) in s.heads.iter().enumerate() {
        say(&format!(
            "lr {} | top-1 {:.2}% | top-5 {:.2}% | train loss {:.4}{}",
            h.lr,
            h.top1,
            h.top5,
            h.train_loss,
            if i == s.best && s.heads.len() > 1 {
                " | best"
            } else {
                ""
            }
        ));
    }
    say(&format!(
        "done | {} epochs in {:.1} s | {} train / {} val images, {} classes | wrote {}",
        s.epochs,
        s.seconds,
        s.train_images,
        s.val_images,
        s.classes,
        out.join("linear.json").display()
    ));
    Ok(())
}

#[derive(clap::Args)]
struct FinetuneArgs {
    /// The backbone: a run folder, its checkpoint.json, a LEWEL state or an exported backbone.
    #[arg(long)]
    checkpoint: PathBuf,
    /// 1percent or 10percent (SimCLR's ImageNet lists, shipped), all, or a file naming the
    /// training images one per line.
    #[arg(long)]
    split: String,
    #[command(flatten)]
    eval: EvalArgs,
    /// The backbone's learning rate [default: 1e-4 for 1percent, 0.01 otherwise].
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f64)]
    lr: Option<f64>,
    /// The classifier's learning rate [default: 1.0 for 1percent, 0.1 otherwise].
    #[arg(long, allow_negative_numbers = true, value_parser = finite_f64)]
    lr_classifier: Option<f64>,
    #[arg(long, default_value_t = 50)]
    epochs: usize,
    /// Weight decay, on every parameter (BN and bias included).
    #[arg(long, default_value_t = 1e-4, allow_negative_numbers = true, value_parser = finite_f64)]
    wd: f64,
    /// The folder to write. Default: finetune-SPLIT/ in the run folder, or runs/finetune-SPLIT.
    #[arg(long)]
    out: Option<PathBuf>,
}

/// `--milestones 30,40`.
fn parse_milestones(s: &str) -> Result<Vec<usize>> {
    s.split(',')
        .filter(|v| !v.trim().is_empty())
        .map(|v| {
            v.trim().parse::<usize>().map_err(|_| {
                Error::user(format!(
                    "--milestones: expected epochs separated by commas, got {s:?}"
                ))
            })
        })
        .collect()
}

fn finetune(a: FinetuneArgs) -> Result<()> {
    use lewel::eval::finetune::{self as ft, FinetuneConfig};
    let e = a.eval;
    let cfg = FinetuneConfig {
        data: e.data,
        val_data: e.val_data,
        lr: a.lr,
        lr_classifier: a.lr_classifier,
        epochs: a.epochs,
        milestones: parse_milestones(&e.milestones)?,
        batch_size: e.batch_size,
        weight_decay: a.wd,
        image_size: e.image_size,
        seed: e.seed,
        eval_every: e.eval_every,
        random_init: e.random_init,
        device: e.device,
        ..FinetuneConfig::new(a.checkpoint.clone(), &a.split)
    };
    let tag: String = std::path::Path::new(&a.split)
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| "split".into());
    let out = match a.out {
        Some(o) => o,
        None if a.checkpoint.is_dir() => a.checkpoint.join(format!("finetune-{tag}")),
        None => PathBuf::from(format!("runs/finetune-{tag}")),
    };
    let s = ft::finetune(&cfg, &out, &|l| say(l))?;
    say(&format!(
        "done | top-1 {:.2}% | top-5 {:.2}% | train loss {:.4} | {} epochs on {} images in {:.1} s | wrote {}",
        s.top1,
        s.top5,
        s.train_loss,
        s.epochs,
        s.train_images,
        s.seconds,
        out.join("finetune.json").display()
    ));
    Ok(())
}

/// What `lewel` with no command prints.
const USAGE: &str = "\
lewel: LEWEL self-supervised pretraining of ResNet-50, on CUDA or the CPU

  lewel pretrain                      the built-in demo: a small model learns a synthetic set
                                      (about 4 minutes on 2 CPU cores; kNN accuracy rises)
  lewel pretrain --data /imagenet     real images (see lewel pretrain --help)
  lewel pretrain --resume runs/lewel  continue (or extend with --epochs N) a run
  lewel info                          the GPU and CUDA libraries found
  lewel --help                        every command
";

fn main() {
    use clap::{CommandFactory, FromArgMatches};
    let parsed = with_defaults(Cli::command())
        .try_get_matches()
        .and_then(|m| Cli::from_arg_matches(&m));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) {
                e.exit()
            }
            // Bad input is one line on stderr (clap's first line and its tip, if any), exit 2.
            let text = e.render().to_string();
            let mut lines = text.lines();
            let mut msg = lines.next().unwrap_or("").trim().to_string();
            if msg.ends_with(':') {
                // "the following required arguments were not provided:" and the list under it.
                let list: Vec<&str> = lines
                    .by_ref()
                    .map(str::trim)
                    .take_while(|l| !l.is_empty())
                    .collect();
                msg = format!("{msg} {}", list.join(", "));
            }
            if let Some(tip) = lines.find_map(|l| l.trim().strip_prefix("tip: ")) {
                msg = format!("{msg} ({tip})");
            }
            let msg = msg.strip_prefix("error: ").unwrap_or(&msg).to_string();
            eprintln!("lewel: error: {msg}");
            std::process::exit(2)
        }
    };
    if let Err(e) = run(cli) {
        eprintln!("lewel: error: {e}");
        std::process::exit(e.exit_code());
    }
}
