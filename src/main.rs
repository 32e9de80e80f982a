//! The `lewel` command line.

use clap::{Parser, Subcommand};
use lewel::device::{self, DeviceChoice};
use lewel::train::{run_demo, DemoConfig};
use lewel::Result;

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
    /// Print the GPU, the driver and the CUDA libraries found, or why not.
    Info,
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
