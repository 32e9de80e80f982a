//! The training loader: DistributedSampler sharding, decode + two-view augmentation on worker
//! threads, batches prefetched ahead of the trainer with back-pressure, unreadable samples skipped.
//!
//! - **Sharding** (torch's DistributedSampler): a per-epoch shuffle from the seed, padded to a
//!   multiple of the world size by repeating leading indices, rank r taking every world-th index;
//!   then whole batches only (drop_last).
//! - **Threads**: a producer thread builds batches in order, each batch's samples in parallel on a
//!   pool of `threads` workers, and hands them over through a channel `prefetch` batches deep; the
//!   trainer blocks only when the loader is behind (the wait is measured per batch).
//! - **Determinism**: a sample's views depend only on (seed, epoch, sample index, view), and a batch
//!   is assembled slot by slot, so the batches are the same bit for bit on any number of threads.
//! - **Bad samples**: a sample that cannot be read or decoded is replaced by the next readable one
//!   in this rank's order for the epoch (so batch shapes never change), reported once with its
//!   name, and counted. When more than `max_bad` of the samples seen (and more than 10) were bad,
//!   the loader stops with an error.

use super::pil::{self, Rgb8};
use super::transforms;
use crate::error::{Error, Result};
use crate::rng::Rng;
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// A labeled set of images the loader can read.
pub trait Samples: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn label(&self, i: usize) -> usize;
    /// Number of classes (labels lie in 0..classes).
    fn classes(&self) -> usize;
    /// Sample i decoded to RGB, or why not (naming the file).
    fn decode(&self, i: usize) -> std::result::Result<Rgb8, String>;
}

/// torch's DistributedSampler order for one rank and epoch (shuffled from the seed).
pub fn shard(n: usize, seed: u64, epoch: u64, world: usize, rank: usize) -> Vec<usize> {
    assert!(world > 0 && rank < world && n > 0);
    let mut idx: Vec<usize> = (0..n).collect();
    let mut r = Rng::keyed(&[seed, 0x05a4_d7e2, epoch]);
    for j in (1..n).rev() {
        idx.swap(j, r.below(j as u64 + 1) as usize);
    }
    let total = n.div_ceil(world) * world;
    for k in n..total {
        idx.push(idx[k - n]);
    }
    idx.into_iter().skip(rank).step_by(world).collect()
}

#[derive(Clone, Debug)]
pub struct LoaderConfig {
    /// Samples per batch on this rank.
    pub batch: usize,
    /// Side of the square views.
    pub size: usize,
    pub seed: u64,
    /// Worker threads decoding and augmenting.
    pub threads: usize,
    /// Batches built ahead of the trainer.
    pub prefetch: usize,
    pub world: usize,
    pub rank: usize,
    /// The fraction of bad samples seen above which the loader stops.
    pub max_bad: f64,
    /// Whether the photometric half of the augmentation runs here (normalized f32 views) or is
    /// left to the GPU (u8 crops and their parameters).
    pub photometric: bool,
}

/// One batch: both views normalized, (B, size, size, 3) f32 each; or, when the photometric half
/// is left to the GPU, both views' u8 crops (B, size, size, 3) and their parameters.
#[derive(Clone, Debug, PartialEq)]
pub struct Batch {
    pub view1: Vec<f32>,
    pub view2: Vec<f32>,
    pub crops: [Vec<u8>; 2],
    pub params: [Vec<transforms::ViewParams>; 2],
    pub labels: Vec<usize>,
    /// The sample each slot holds (a substitute where the scheduled one was bad).
    pub indices: Vec<usize>,
    /// Bad samples met building this batch and not reported before: (index, reason).
    pub new_bad: Vec<(usize, String)>,
    /// Bad samples met building this batch (reported before or not).
    pub bad: usize,
    /// Milliseconds the trainer waited for this batch.
    pub wait_ms: f64,
}

/// Counts shared by the epochs of one run.
#[derive(Default)]
struct Tally {
    seen: usize,
    bad: usize,
    reported: HashSet<usize>,
}

pub struct Loader {
    pub cfg: LoaderConfig,
    samples: Arc<dyn Samples>,
    pool: Arc<rayon::ThreadPool>,
    tally: Arc<Mutex<Tally>>,
}

/// The batches of one epoch, in order.
pub struct Epoch {
    rx: Receiver<Result<Batch>>,
    _producer: std::thread::JoinHandle<()>,
}

impl Iterator for Epoch {
    type Item = Result<Batch>;
    fn next(&mut self) -> Option<Result<Batch>> {
        let t = Instant::now();
        let mut b = self.rx.recv().ok()?;
        if let Ok(b) = &mut b {
            b.wait_ms = t.elapsed().as_secs_f64() * 1e3;
        }
        Some(b)
    }
}

impl Loader {
    pub fn new(samples: Arc<dyn Samples>, cfg: LoaderConfig) -> Result<Loader> {
        if samples.is_empty() {
            return Err(Error::user("the dataset has no samples"));
        }
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(cfg.threads.max(1))
            .thread_name(|i| format!("lewel-loader-{i}"))
            .build()
            .map_err(|e| Error::Other(format!("loader threads: {e}")))?;
        Ok(Loader {
            cfg,
            samples,
            pool: Arc::new(pool),
            tally: Default::default(),
        })
    }

    /// Batches per epoch on this rank (drop_last).
    pub fn batches_per_epoch(&self) -> usize {
        self.samples.len().div_ceil(self.cfg.world) / self.cfg.batch
    }

    /// Samples seen and bad samples met so far.
    pub fn counts(&self) -> (usize, usize) {
        let t = self.tally.lock().unwrap();
        (t.seen, t.bad)
    }

    /// Starts producing the batches of `epoch` from batch `start` on (for a resume mid-epoch).
    pub fn epoch(&self, epoch: u64, start: usize) -> Epoch {
        let (tx, rx) = sync_channel(self.cfg.prefetch.max(1));
        let cfg = self.cfg.clone();
        let samples = self.samples.clone();
        let pool = self.pool.clone();
        let tally = self.tally.clone();
        let n_batches = self.batches_per_epoch();
        let producer = std::thread::spawn(move || {
            let order = shard(samples.len(), cfg.seed, epoch, cfg.world, cfg.rank);
            for b in start..n_batches {
                let batch = build(&*samples, &cfg, &pool, &tally, &order, epoch, b);
                let stop = batch.is_err();
                if tx.send(batch).is_err() || stop {
                    return;
                }
            }
        });
        Epoch {
            rx,
            _producer: producer,
        }
    }
}

/// One slot: the first readable sample from position `pos` of the order on, its two views (whole,
/// or the crops only) with their parameters, and the bad samples passed over.
type Slot = (
    usize,
    [(Rgb8, transforms::ViewParams); 2],
    Vec<(usize, String)>,
);

fn slot(
    samples: &dyn Samples,
    cfg: &LoaderConfig,
    order: &[usize],
    epoch: u64,
    pos: usize,
) -> Slot {
    let mut bad = Vec::new();
    for k in 0..order.len() {
        let i = order[(pos + k) % order.len()];
        match samples.decode(i) {
            Ok(img) => {
                // A substitute (k > 0) gets views of its own, not a copy of its own slot's.
                let key = epoch | (k as u64) << 40;
                let views = [1u8, 2].map(|v| {
                    let p = transforms::view_params(cfg.seed, key, i as u64, v, img.w, img.h);
                    let mut x = transforms::geometric(&img, &p, cfg.size);
                    if cfg.photometric {
                        transforms::photometric(&mut x, &p);
                    }
                    (x, p)
                });
                return (i, views, bad);
            }
            Err(why) => bad.push((i, why)),
        }
    }
    // Every sample of the shard is bad: the caller's threshold stops the run first.
    let blank = Rgb8::new(cfg.size, cfg.size, vec![0; cfg.size * cfg.size * 3]);
    let p = transforms::view_params(cfg.seed, epoch, order[pos] as u64, 1, cfg.size, cfg.size);
    (order[pos], [(blank.clone(), p), (blank, p)], bad)
}

fn build(
    samples: &dyn Samples,
    cfg: &LoaderConfig,
    pool: &rayon::ThreadPool,
    tally: &Mutex<Tally>,
    order: &[usize],
    epoch: u64,
    b: usize,
) -> Result<Batch> {
    let per = cfg.size * cfg.size * 3;
    let slots: Vec<Slot> = pool.install(|| {
        (b * cfg.batch..(b + 1) * cfg.batch)
            .into_par_iter()
            .map(|pos| slot(samples, cfg, order, epoch, pos))
            .collect()
    });
    let (f, u) = if cfg.photometric {
        (cfg.batch * per, 0)
    } else {
        (0, cfg.batch * per)
    };
    let mut batch = Batch {
        view1: vec![0.0; f],
        view2: vec![0.0; f],
        crops: [vec![0; u], vec![0; u]],
        params: [Vec::with_capacity(cfg.batch), Vec::with_capacity(cfg.batch)],
        labels: Vec::with_capacity(cfg.batch),
        indices: Vec::with_capacity(cfg.batch),
        new_bad: Vec::new(),
        bad: 0,
        wait_ms: 0.0,
    };
    let mut t = tally.lock().unwrap();
    for (s, (i, views, bad)) in slots.into_iter().enumerate() {
        let r = s * per..(s + 1) * per;
        let [(v1, p1), (v2, p2)] = views;
        if cfg.photometric {
            pil::normalize(&v1, &mut batch.view1[r.clone()]);
            pil::normalize(&v2, &mut batch.view2[r]);
        } else {
            batch.crops[0][r.clone()].copy_from_slice(&v1.data);
            batch.crops[1][r].copy_from_slice(&v2.data);
        }
        batch.params[0].push(p1);
        batch.params[1].push(p2);
        batch.labels.push(samples.label(i));
        batch.indices.push(i);
        t.seen += 1 + bad.len();
        t.bad += bad.len();
        batch.bad += bad.len();
        for (j, why) in bad {
            if t.reported.insert(j) {
                batch.new_bad.push((j, why));
            }
        }
    }
    if t.bad > 10 && t.bad as f64 > cfg.max_bad * t.seen as f64 {
        return Err(Error::user(format!(
            "{} of the {} samples read so far could not be decoded (more than --max-bad {}); check the dataset (lewel pack reports every bad file)",
            t.bad, t.seen, cfg.max_bad
        )));
    }
    Ok(batch)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Generated images of varied sizes; every `bad_every`-th sample fails to decode.
    struct Fake {
        n: usize,
        bad_every: usize,
    }

    impl Samples for Fake {
        fn len(&self) -> usize {
            self.n
        }
        fn label(&self, i: usize) -> usize {
            i % 7
        }
        fn classes(&self) -> usize {
            7
        }
        fn decode(&self, i: usize) -> std::result::Result<Rgb8, String> {
            if self.bad_every > 0 && i % self.bad_every == 3 {
                return Err(format!("img{i}.JPEG: truncated"));
            }
            let (w, h) = (40 + i % 13, 30 + i % 7);
            let mut r = Rng::keyed(&[i as u64]);
            let px = (0..w * h * 3).map(|_| r.below(256) as u8).collect();
            Ok(Rgb8::new(w, h, px))
        }
    }

    fn cfg(threads: usize) -> LoaderConfig {
        LoaderConfig {
            batch: 8,
            size: 16,
            seed: 5,
            threads,
            prefetch: 2,
            world: 1,
            rank: 0,
            max_bad: 0.01,
            photometric: true,
        }
    }

    fn run(l: &Loader, epoch: u64) -> Vec<Batch> {
        l.epoch(epoch, 0)
            .map(|b| {
                let mut b = b.unwrap();
                b.wait_ms = 0.0;
                b
            })
            .collect()
    }

    #[test]
    fn sharding_follows_distributed_sampler() {
        let n = 10;
        let world = 4;
        let parts: Vec<Vec<usize>> = (0..world).map(|r| shard(n, 1, 0, world, r)).collect();
        // Padded to 12: every rank 3 samples, every index at least once, two repeated.
        assert!(parts.iter().all(|p| p.len() == 3));
        let mut all: Vec<usize> = parts.concat();
        all.sort();
        all.dedup();
        assert_eq!(all, (0..n).collect::<Vec<_>>());
        // The padding repeats the leading indices of the shuffled order.
        let full = shard(n, 1, 0, 1, 0);
        assert_eq!(parts[0], vec![full[0], full[4], full[8]]);
        assert_eq!(parts[2], vec![full[2], full[6], full[0]]);
        assert_ne!(shard(n, 1, 1, 1, 0), full, "a new shuffle each epoch");
    }

    #[test]
    fn same_batches_bit_for_bit_with_1_and_8_threads() {
        let data: Arc<dyn Samples> = Arc::new(Fake {
            n: 50,
            bad_every: 0,
        });
        let one = run(&Loader::new(data.clone(), cfg(1)).unwrap(), 2);
        let eight = run(&Loader::new(data, cfg(8)).unwrap(), 2);
        assert_eq!(one.len(), 6, "50 samples, batch 8, drop_last");
        assert_eq!(one, eight);
        assert_ne!(one[0].view1, one[0].view2);
        // Crops for the GPU: the same parameters; the photometric half applied on the CPU to the
        // crops gives the CPU's views.
        let mut c = cfg(3);
        c.photometric = false;
        let data: Arc<dyn Samples> = Arc::new(Fake {
            n: 50,
            bad_every: 0,
        });
        let crops = run(&Loader::new(data, c).unwrap(), 2);
        assert_eq!(crops[0].params, one[0].params);
        assert!(crops[0].view1.is_empty());
        let per = 16 * 16 * 3;
        let mut img = Rgb8::new(16, 16, crops[0].crops[1][per..2 * per].to_vec());
        transforms::photometric(&mut img, &crops[0].params[1][1]);
        let mut v = vec![0.0; per];
        pil::normalize(&img, &mut v);
        assert_eq!(v, one[0].view2[per..2 * per]);
    }

    #[test]
    fn bad_samples_are_replaced_reported_once_and_counted() {
        let data: Arc<dyn Samples> = Arc::new(Fake {
            n: 400,
            bad_every: 100,
        });
        let mut c = cfg(2);
        c.max_bad = 0.05;
        let l = Loader::new(data, c).unwrap();
        let e0 = run(&l, 0);
        let e1 = run(&l, 1);
        let reported: Vec<usize> = e0
            .iter()
            .chain(&e1)
            .flat_map(|b| b.new_bad.iter().map(|x| x.0))
            .collect();
        // All four met in epoch 0 (50 whole batches visit every position), none again in epoch 1.
        let mut sorted = reported.clone();
        sorted.sort();
        assert_eq!(
            sorted,
            vec![3, 103, 203, 303],
            "each bad file reported once"
        );
        assert!(e1
            .iter()
            .all(|b| b.new_bad.is_empty() && b.bad > 0 || b.bad == 0));
        // Each epoch meets every bad sample at least once (twice when two are adjacent in the order:
        // in its own slot and as the substitute search of the slot before).
        let per_epoch = |e: &[Batch]| e.iter().map(|b| b.bad).sum::<usize>();
        assert!(per_epoch(&e0) >= 4 && per_epoch(&e1) >= 4);
        assert!(e0.iter().flat_map(|b| &b.indices).all(|i| i % 100 != 3));
        assert!(e0
            .iter()
            .all(|b| b.labels.len() == 8 && b.view1.len() == 8 * 16 * 16 * 3));
        let (seen, bad) = l.counts();
        assert_eq!(bad, per_epoch(&e0) + per_epoch(&e1));
        assert_eq!(seen, 2 * 400 + bad);
    }

    #[test]
    fn too_many_bad_samples_stop_with_a_clear_error() {
        let data: Arc<dyn Samples> = Arc::new(Fake {
            n: 200,
            bad_every: 4,
        });
        let l = Loader::new(data, cfg(2)).unwrap();
        let err = l.epoch(0, 0).find_map(|b| b.err()).expect("an error");
        assert!(err.to_string().contains("could not be decoded"), "{err}");
        assert_eq!(err.exit_code(), 2);
    }
}
