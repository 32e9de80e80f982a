//! The engine demo: the small residual net learns to map synthetic images to
//! fixed random class prototypes under the normalized-MSE loss of LEWEL, with momentum SGD over the
//! flat parameter buffer, and the kNN monitor (k = 20, majority vote, L2-normalized pooled features)
//! measures the features at init and after every epoch. LEWEL pretraining replaces it with the LEWEL
//! issue.

use crate::autograd::{BnMode, Graph};
use crate::data::synthetic::{Split, Synthetic, CLASSES};
use crate::error::{Error, Result};
use crate::eval::knn;
use crate::model::demo::DemoNet;
use crate::rng::Rng;
use crate::tensor::Shape;
use rayon::prelude::*;
use std::io::Write;
use std::time::Instant;

#[derive(Clone, Debug)]
pub struct DemoConfig {
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub momentum: f32,
    pub seed: u64,
    pub image_size: usize,
    pub train_len: usize,
    pub val_len: usize,
    pub width: usize,
    pub log_every: usize,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            epochs: 4,
            batch_size: 64,
            lr: 0.05,
            momentum: 0.9,
            seed: 0,
            image_size: 32,
            train_len: 4000,
            val_len: 1000,
            width: 16,
            log_every: 20,
        }
    }
}

impl DemoConfig {
    pub fn validate(&self) -> Result<()> {
        let bad = |flag: &str, what: &str| Err(Error::user(format!("{flag}: {what}")));
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return bad(
                "--lr",
                &format!("must be a positive number, got {}", self.lr),
            );
        }
        if self.batch_size < 2 {
            return bad(
                "--batch-size",
                &format!(
                    "must be at least 2 (batch norm needs 2 values), got {}",
                    self.batch_size
                ),
            );
        }
        if self.batch_size > self.train_len {
            return bad(
                "--batch-size",
                &format!(
                    "{} exceeds the {} training images",
                    self.batch_size, self.train_len
                ),
            );
        }
        if self.epochs == 0 {
            return bad("--epochs", "must be at least 1");
        }
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct DemoSummary {
    pub knn_init: f64,
    pub knn_final: f64,
    pub first_loss: f32,
    pub last_loss: f32,
    pub steps: usize,
    pub seconds: f64,
}

/// Images `idx` of a split, stacked (B, S, S, 3), and their labels.
fn batch(data: &Synthetic, split: Split, idx: &[usize]) -> (Vec<f32>, Vec<usize>) {
    let imgs: Vec<Vec<f32>> = idx.par_iter().map(|&i| data.image(split, i)).collect();
    (imgs.concat(), idx.iter().map(|&i| data.label(i)).collect())
}

/// L2-normalized pooled features of a split's first `n` images, eval-mode BN.
fn features(
    g: &mut Graph<f32>,
    net: &DemoNet,
    data: &Synthetic,
    split: Split,
    n: usize,
) -> (Vec<f32>, Vec<usize>) {
    g.set_recording(false);
    let mut feats = Vec::new();
    let mut labels = Vec::new();
    let all: Vec<usize> = (0..n).collect();
    for chunk in all.chunks(256) {
        let (x, l) = batch(data, split, chunk);
        g.reset();
        let x = g.input(DemoNet::input_shape(chunk.len(), data.size), &x);
        let (pooled, _) = net.forward(g, x, BnMode::Eval);
        feats.extend_from_slice(g.value(pooled));
        labels.extend(l);
    }
    g.set_recording(true);
    knn::normalize_rows(&mut feats, 2 * net.width);
    (feats, labels)
}

fn knn_monitor(g: &mut Graph<f32>, net: &DemoNet, data: &Synthetic) -> f64 {
    let mem_n = data.train_len.min(1000);
    let (mem, mem_l) = features(g, net, data, Split::Train, mem_n);
    let (q, q_l) = features(g, net, data, Split::Val, data.val_len);
    knn::knn_accuracy(&mem, &mem_l, &q, &q_l, 2 * net.width, 20, CLASSES.len())
}

/// Runs the demo, writing one line per logged step to `log`.
pub fn run_demo(cfg: &DemoConfig, log: &mut dyn Write) -> Result<DemoSummary> {
    cfg.validate()?;
    let t0 = Instant::now();
    let data = Synthetic::new(cfg.seed, cfg.image_size, cfg.train_len, cfg.val_len);
    let embed = 16;
    let (net, store) = DemoNet::new(cfg.width, embed, cfg.seed);
    let mut g = Graph::new(store);
    let mut momentum = vec![0.0f32; g.store.num_params()];
    // One fixed random unit vector per class: the regression targets.
    let mut r = Rng::keyed(&[cfg.seed, 0x9707]);
    let protos: Vec<f32> = (0..CLASSES.len() * embed)
        .map(|_| r.normal() as f32)
        .collect();
    let io = |e: std::io::Error| Error::Other(format!("writing the log: {e}"));

    writeln!(
        log,
        "engine demo: {} params, {} train / {} val synthetic images of {}px in {} classes, batch {}, {} epochs",
        g.store.num_params(),
        cfg.train_len,
        cfg.val_len,
        cfg.image_size,
        CLASSES.len(),
        cfg.batch_size,
        cfg.epochs
    )
    .map_err(io)?;
    let knn_init = knn_monitor(&mut g, &net, &data);
    writeln!(log, "knn | epoch 0 | acc {knn_init:.2}%").map_err(io)?;

    let steps_per_epoch = cfg.train_len / cfg.batch_size;
    let total = steps_per_epoch * cfg.epochs;
    let (mut first_loss, mut last_loss) = (f32::NAN, f32::NAN);
    let mut knn_final = knn_init;
    let mut step = 0;
    for epoch in 0..cfg.epochs {
        let mut order: Vec<usize> = (0..cfg.train_len).collect();
        let mut r = Rng::keyed(&[cfg.seed, 0x5eed, epoch as u64]);
        for i in (1..order.len()).rev() {
            order.swap(i, r.below(i as u64 + 1) as usize);
        }
        for idx in order.chunks_exact(cfg.batch_size).take(steps_per_epoch) {
            let ts = Instant::now();
            let (x, labels) = batch(&data, Split::Train, idx);
            let target: Vec<f32> = labels
                .iter()
                .flat_map(|&l| protos[l * embed..][..embed].to_vec())
                .collect();
            g.reset();
            let x = g.input(DemoNet::input_shape(idx.len(), cfg.image_size), &x);
            let (_, emb) = net.forward(&mut g, x, BnMode::Train);
            let t = g.input(Shape::new(&[idx.len(), embed]), &target);
            let loss = g.loss(emb, t);
            g.store.zero_grads();
            g.backward(loss);
            // Momentum SGD over the flat buffer: buf = mu * buf + grad; p -= lr * buf.
            let st = &mut g.store;
            for ((p, gr), m) in st.params.iter_mut().zip(&st.grads).zip(momentum.iter_mut()) {
                *m = cfg.momentum * *m + gr;
                *p -= cfg.lr * *m;
            }
            let l = g.value(loss)[0];
            if !l.is_finite() {
                return Err(Error::Other(format!("loss became {l} at step {step}")));
            }
            if step == 0 {
                first_loss = l;
            }
            last_loss = l;
            step += 1;
            if step % cfg.log_every == 0 || step == total {
                let ms = ts.elapsed().as_secs_f64() * 1e3;
                writeln!(
                    log,
                    "step {step}/{total} | epoch {} | loss {l:.4} | lr {} | {ms:.0} ms | {:.0} img/s",
                    epoch + 1,
                    cfg.lr,
                    idx.len() as f64 / (ms / 1e3)
                )
                .map_err(io)?;
            }
        }
        knn_final = knn_monitor(&mut g, &net, &data);
        writeln!(log, "knn | epoch {} | acc {knn_final:.2}%", epoch + 1).map_err(io)?;
    }
    Ok(DemoSummary {
        knn_init,
        knn_final,
        first_loss,
        last_loss,
        steps: step,
        seconds: t0.elapsed().as_secs_f64(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_learns_and_is_deterministic() {
        let cfg = DemoConfig {
            epochs: 1,
            train_len: 640,
            val_len: 200,
            batch_size: 32,
            log_every: 5,
            ..Default::default()
        };
        let mut log = Vec::new();
        let a = run_demo(&cfg, &mut log).unwrap();
        let text = String::from_utf8(log).unwrap();
        assert!(text.contains("step 20/20 | epoch 1 | loss"), "{text}");
        assert!(a.last_loss < a.first_loss, "{a:?}");
        let b = run_demo(&cfg, &mut Vec::new()).unwrap();
        assert_eq!(
            a.last_loss.to_bits(),
            b.last_loss.to_bits(),
            "two runs, same loss bits"
        );
        assert_eq!(a.knn_final, b.knn_final);
    }

    #[test]
    fn bad_flags_are_user_errors() {
        let cfg = DemoConfig {
            lr: -1.0,
            ..Default::default()
        };
        let e = run_demo(&cfg, &mut Vec::new()).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().starts_with("--lr"), "{e}");
    }
}
