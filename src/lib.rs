//! lewel: LEWEL self-supervised pretraining of ResNet-50 (Huang et al., CVPR 2022), with an exact CPU
//! reference and a CUDA backend.
//!
//! Conventions, once:
//! - Activations are NHWC; the MLP heads work on rows (one row per position, channels contiguous).
//!   Conv weights are [out, kh, kw, in]; linear weights [out, in]. Checkpoints convert to PyTorch's
//!   OIHW and [out, in, 1].
//! - Parameters, gradients, optimizer state and statistics are f32; the CPU reference computes in f32
//!   (f64 in gradient checks, through the same generic code).
//! - Backward adds (`+=`) into every gradient; the graph zeroes activation gradients first.
//! - Library code returns `Result`; only `main` exits. Shape mismatches are bugs and assert with the
//!   op's name.
//! - The CPU path is deterministic at any thread count: reductions use fixed chunks combined in order.

pub mod backend;
pub mod bench;
pub mod check;
pub mod checkpoint;
pub mod error;
#[doc(hidden)]
pub mod fuzzing;
pub mod gradcheck;
pub mod import;
pub mod memory;
pub mod ops;
pub mod optim;
pub mod plot;
pub mod rng;
pub mod run;
pub mod signals;
pub mod tensor;
pub mod tensorboard;

pub use error::{Context, Error, Result};
pub mod data;
pub mod detectron2;
pub mod device;
pub mod dist;
pub mod eval;
pub mod gpu;
pub mod graph;
pub mod model;
pub mod profile;
pub mod train;
