//! The `lewel` command line.

use clap::{Parser, Subcommand};
use lewel::demo::{run_demo, DemoConfig};
use lewel::device::{self, DeviceChoice};
use lewel::optim::{ExcludeRule, LarsConfig};
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

#[derive(Subcommand)]
enum Cmd {
    /// Train. With no arguments: the built-in synthetic dataset and a small model on the best device.
    /// (Until LEWEL lands this runs the engine demo: a small residual net on synthetic shapes.)
    Pretrain(PretrainArgs),
    /// Exactly one LEWEL training iteration from a given state and views (the parity hook).
    Step(StepArgs),
    /// Print the GPU, the driver and the CUDA libraries found, or why not.
    Info,
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
    let exclude = match a.lars_exclude.as_str() {
        "current" => ExcludeRule::Current {
            eman: method == Method::LewelBEman,
        },
        "released-log" => ExcludeRule::ReleasedLog,
        s => {
            return Err(Error::user(format!(
                "--lars-exclude: expected current or released-log, got '{s}'"
            )))
        }
    };
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

#[derive(clap::Args, Default)]
struct PretrainArgs {
    /// Epochs over the synthetic training split.
    #[arg(long, default_value_t = 4)]
    epochs: usize,
    /// Images per step.
    #[arg(long, default_value_t = 64)]
    batch_size: usize,
    /// Learning rate.
    #[arg(long, default_value_t = 0.05)]
    lr: f32,
    /// Seed of the data, the initialization and the shuffling.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto")]
    device: String,
}

fn pretrain(a: PretrainArgs) -> Result<()> {
    let choice: DeviceChoice = a.device.parse()?;
    let (dev, note) = device::resolve(choice)?;
    if let Some(n) = note {
        eprintln!("warning: {n}");
    }
    let cfg = DemoConfig {
        epochs: a.epochs,
        batch_size: a.batch_size,
        lr: a.lr,
        seed: a.seed,
        ..Default::default()
    };
    eprintln!(
        "device {dev:?}, {} CPU threads",
        rayon::current_num_threads()
    );
    let s = run_demo(&cfg, &mut std::io::stderr())?;
    println!(
        "done | {} steps in {:.1} s | loss {:.4} -> {:.4} | kNN accuracy {:.2}% at init -> {:.2}% (+{:.2} points)",
        s.steps,
        s.seconds,
        s.first_loss,
        s.last_loss,
        s.knn_init,
        s.knn_final,
        s.knn_final - s.knn_init
    );
    Ok(())
}

fn run(cli: Cli) -> Result<()> {
    match cli.cmd {
        None => pretrain(PretrainArgs::parse_defaults()),
        Some(Cmd::Pretrain(a)) => pretrain(a),
        Some(Cmd::Step(a)) => step(a),
        Some(Cmd::Info) => {
            print!("{}", device::probe().report());
            Ok(())
        }
    }
}

impl PretrainArgs {
    fn parse_defaults() -> PretrainArgs {
        #[derive(Parser)]
        struct Only {
            #[command(flatten)]
            a: PretrainArgs,
        }
        Only::parse_from(["lewel"]).a
    }
}

fn main() {
    let cli = Cli::parse();
    if let Err(e) = run(cli) {
        eprintln!("lewel: error: {e}");
        std::process::exit(e.exit_code());
    }
}
