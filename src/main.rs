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
    /// Write the online backbone of a checkpoint in torchvision names.
    Export(ExportArgs),
    /// Pooled backbone features (eval mode) of images, from a checkpoint or an exported backbone.
    Embed(EmbedArgs),
    /// Exactly one LEWEL training iteration from a given state and views (the parity hook).
    Step(StepArgs),
    /// Print the GPU, the driver and the CUDA libraries found, or why not.
    Info,
    /// Every GPU op, forward and backward, against the CPU reference (f32 and bf16); a table.
    Check(CheckArgs),
    /// Pack an ImageFolder (or its train/) into one file of RGB JPEGs with labels and CRCs.
    Pack(PackArgs),
    /// Look at a dataset: `lewel data show PATH --out grid.png`.
    #[command(subcommand)]
    Data(DataCmd),
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
    if a.count == 0 || a.size < 8 {
        return Err(Error::user("--count: at least 1, and --size at least 8"));
    }
    lewel::data::decode::set_jpeg_decoder(a.jpeg_decoder.parse()?)?;
    let samples = lewel::data::open_samples(&a.path)?;
    let grid = lewel::data::show::grid(&*samples, a.count, a.size, a.seed);
    lewel::data::show::write_png(&grid, &a.out)?;
    println!(
        "{}: {} samples, each as decoded, view 1, view 2 ({}x{} px)",
        a.out.display(),
        (grid.h - 4) / (a.size + 4),
        grid.w,
        grid.h
    );
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
    println!("{}", s.report(&a.out));
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
    #[arg(long, default_value_t = 4)]
    lewel_num_heads: usize,
    #[arg(long, default_value_t = 0.5, allow_negative_numbers = true)]
    lewel_loss_weight: f64,
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
    println!(
        "step | {} | loss {loss:.6} | wrote {}",
        method.name(),
        a.out.display()
    );
    Ok(())
}

/// Flags of `lewel pretrain`; each overrides the config file, which overrides the defaults.
#[derive(clap::Args, Default)]
struct PretrainArgs {
    /// A TOML file with any of the settings below (underscored names: batch_size = 64).
    #[arg(long)]
    config: Option<PathBuf>,
    /// Continue a run from its folder (or its checkpoint.json); its saved config is used.
    #[arg(long)]
    resume: Option<PathBuf>,
    /// Stop after this many epochs are done (resume later with --resume).
    #[arg(long)]
    stop_after: Option<usize>,
    /// resnet50, resnet18 or tiny (ResNet-50 at 1/8 width).
    #[arg(long)]
    arch: Option<String>,
    /// lewel-b-eman (EMAN, the default) or lewel-b.
    #[arg(long)]
    method: Option<String>,
    #[arg(long)]
    epochs: Option<usize>,
    #[arg(long)]
    warmup_epochs: Option<usize>,
    /// Total batch per iteration.
    #[arg(long)]
    batch_size: Option<usize>,
    /// Absolute learning rate for the total batch.
    #[arg(long, allow_negative_numbers = true)]
    lr: Option<f64>,
    /// Weight decay.
    #[arg(long, allow_negative_numbers = true)]
    wd: Option<f64>,
    /// Initial EMA momentum.
    #[arg(long, allow_negative_numbers = true)]
    enc_m: Option<f64>,
    #[arg(long)]
    lewel_num_heads: Option<usize>,
    #[arg(long, allow_negative_numbers = true)]
    lewel_loss_weight: Option<f64>,
    #[arg(long, allow_negative_numbers = true)]
    lewel_scale: Option<f32>,
    /// current or released-log.
    #[arg(long)]
    lars_exclude: Option<String>,
    /// Samples per BN statistics group (emulates per-GPU BN).
    #[arg(long)]
    bn_group: Option<usize>,
    #[arg(long)]
    seed: Option<u64>,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long)]
    device: Option<String>,
    /// Activation storage on the GPU: auto (bf16 on a GPU, f32 on the CPU), f32 or bf16.
    #[arg(long)]
    precision: Option<String>,
    /// Only deterministic cuDNN algorithms: a rerun on the same GPU is bitwise identical.
    #[arg(long)]
    deterministic: bool,
    /// Side of the training views in pixels (default: 48 on the synthetic set, 224 with --data).
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
    /// Memory images of the kNN monitor (the first of the training split); 0: all of it.
    #[arg(long)]
    knn_memory: Option<usize>,
    #[arg(long)]
    log_every: Option<usize>,
    /// The run folder: config.toml, metrics.jsonl, checkpoints.
    #[arg(long)]
    out: Option<PathBuf>,
    /// Training images: an ImageFolder root (or the folder holding its train/) or a file made by
    /// `lewel pack`. Without it: the built-in synthetic dataset.
    #[arg(long)]
    data: Option<PathBuf>,
    /// Labeled images of the kNN monitor (ImageFolder or packed); default: the val/ folder beside
    /// the data's train/.
    #[arg(long)]
    val_data: Option<PathBuf>,
    /// kNN monitor on real data: memory images per class (the first of each class).
    #[arg(long)]
    knn_memory_per_class: Option<usize>,
    /// kNN monitor on real data: query images per class (the first of each class).
    #[arg(long)]
    knn_query_per_class: Option<usize>,
    /// Threads decoding and augmenting real data; 0: one per core.
    #[arg(long)]
    loader_threads: Option<usize>,
    /// Stop when more than this fraction of the samples read could not be decoded.
    #[arg(long)]
    max_bad: Option<f64>,
    /// JPEG decoder: zune (pure Rust, the default) or libjpeg-turbo (PIL's pixels exactly, faster;
    /// needs libturbojpeg.so.0, Debian/Ubuntu package libturbojpeg0).
    #[arg(long, value_name = "zune|libjpeg-turbo")]
    jpeg_decoder: Option<String>,
    /// On a GPU, keep the loader's crops in ordinary (pageable) memory instead of page-locked
    /// memory: the driver then stages each upload, and the trainer waits for it.
    #[arg(long)]
    no_pin_memory: bool,
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    let mut c = match &a.config {
        Some(p) => PretrainConfig::from_toml(p)?,
        None => PretrainConfig::default(),
    };
    macro_rules! set {
        ($($f:ident),*) => { $( if let Some(v) = a.$f.clone() { c.$f = v; } )* };
    }
    set!(
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
    set!(
        lars_exclude,
        bn_group,
        seed,
        device,
        image_size,
        train_len,
        val_len,
        knn_k,
        knn_memory,
        log_every,
        out,
        precision,
        knn_memory_per_class,
        knn_query_per_class,
        loader_threads,
        max_bad,
        jpeg_decoder
    );
    if a.data.is_some() {
        c.data = a.data.clone();
    }
    if a.val_data.is_some() {
        c.val_data = a.val_data.clone();
    }
    if a.deterministic {
        c.deterministic = true;
    }
    if a.no_pin_memory {
        c.pin_memory = false;
    }
    if a.stop_after == Some(0) {
        return Err(Error::user("--stop-after: must be at least 1"));
    }
    let s = run::pretrain(&c, a.resume.as_deref(), a.stop_after)?;
    println!(
        "done | {} epochs, {} steps in {:.1} s | loss {:.4} -> {:.4} | kNN accuracy {:.2}% at init -> {:.2}% ({:+.2} points)",
        s.epochs_done,
        s.steps,
        s.seconds,
        s.first_loss,
        s.last_loss,
        s.knn_init.unwrap_or(f64::NAN),
        s.knn_final.unwrap_or(f64::NAN),
        s.knn_final.unwrap_or(f64::NAN) - s.knn_init.unwrap_or(f64::NAN)
    );
    Ok(())
}

#[derive(clap::Args)]
struct EmbedArgs {
    /// A run folder, its checkpoint.json, a LEWEL state or an exported backbone (.safetensors).
    #[arg(long)]
    checkpoint: PathBuf,
    /// `images`: float32 NCHW (N, 3, H, W), already normalized.
    #[arg(long)]
    images: PathBuf,
    /// Output: `features`, float32 (N, C).
    #[arg(long)]
    out: PathBuf,
}

#[derive(clap::Args)]
struct ExportArgs {
    /// A run folder, its checkpoint.json, or a checkpoint .safetensors.
    #[arg(long)]
    checkpoint: PathBuf,
    /// Output: the online backbone in torchvision names.
    #[arg(long)]
    out: PathBuf,
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        None => pretrain(PretrainArgs::default()),
        Some(Cmd::Export(a)) => {
            let n = run::export(&a.checkpoint, &a.out)?;
            println!("wrote {} ({n} tensors, torchvision names)", a.out.display());
            Ok(())
        }
        Some(Cmd::Pretrain(a)) => pretrain(a),
        Some(Cmd::Step(a)) => step(a),
        Some(Cmd::Embed(a)) => {
            let (n, c) = run::embed(&a.checkpoint, &a.images, &a.out)?;
            println!("wrote {} ({n} x {c} features)", a.out.display());
            Ok(())
        }
        Some(Cmd::Info) => {
            print!("{}", device::probe().report());
            Ok(())
        }
        Some(Cmd::Check(a)) => check(a),
        Some(Cmd::Pack(a)) => pack(a),
        Some(Cmd::Data(DataCmd::Show(a))) => data_show(a),
    }
}

fn check(a: CheckArgs) -> Result<()> {
    let ordinal = match a.device.parse::<device::DeviceChoice>()? {
        device::DeviceChoice::Cuda(n) => n,
        _ => return Err(Error::user("--device: lewel check needs cuda or cuda:N")),
    };
    let g = std::rc::Rc::new(lewel::gpu::Gpu::new(ordinal, true).map_err(|e| match e {
        Error::Cuda(m) => Error::user(m),
        e => e,
    })?);
    println!(
        "lewel check | {} (sm_{}{}) | cuda:{}",
        g.name, g.cc.0, g.cc.1, g.ordinal
    );
    let t = std::time::Instant::now();
    let mut rows = lewel::gpu::check::run_ops(&g, a.seed)?;
    rows.extend(lewel::gpu::check_step::run_steps(&g, a.seed)?);
    print!("{}", lewel::gpu::check::table(&rows));
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

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("lewel: error: {e}");
        std::process::exit(e.exit_code());
    }
}
