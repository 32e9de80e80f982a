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
//! - **Host memory**: on a GPU the crops are written straight into page-locked (pinned) buffers,
//!   so the copy to the device is a DMA the driver queues without staging it through memory of its
//!   own; the trainer hands each batch back ([`Loader::recycle`]) once its copies are queued, and a
//!   buffer is written again only after the event recorded behind its last copy (`CropBuf::upload`,
//!   `CropBuf::write`).
//! - **Bad samples**: a sample that cannot be read or decoded is replaced by the next readable one
//!   in this rank's order for the epoch (so batch shapes never change), reported once with its
//!   name, and counted. When more than `max_bad` of the samples seen (and more than 10) were bad,
//!   the loader stops with an error.

use super::pil::{self, Rgb8};
use super::pinned::PinnedBuf;
use super::transforms;
use crate::error::{Error, Result};
use crate::rng::Rng;
use cudarc::driver::{CudaContext, CudaStream, CudaViewMut, DriverError};
use rayon::prelude::*;
use std::collections::HashSet;
use std::sync::atomic::Ordering::Relaxed;
use std::sync::mpsc::{sync_channel, Receiver};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Host memory holding one view's u8 crops of a batch (B, size, size, 3).
pub enum CropBuf {
    /// Ordinary memory (the CPU path, tests, and a GPU run without --pin-memory).
    Heap(Vec<u8>),
    /// Page-locked memory of a CUDA context: copies from it are DMAs queued on the stream, and it
    /// carries the event recorded behind the last copy that reads it ([`CropBuf::upload`]).
    Pinned(PinnedBuf),
}

impl CropBuf {
    pub fn len(&self) -> usize {
        match self {
            CropBuf::Heap(v) => v.len(),
            CropBuf::Pinned(p) => p.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes, for writing: for pinned memory this first waits until every copy queued from it
    /// has finished reading.
    pub fn write(&mut self) -> Result<&mut [u8]> {
        match self {
            CropBuf::Heap(v) => Ok(v),
            CropBuf::Pinned(p) => p
                .bytes_mut()
                .map_err(|e| Error::Cuda(format!("waiting for a pinned crop buffer: {e}"))),
        }
    }

    /// The bytes, for reading (waits like `write`). Pinned memory is allocated write-combined:
    /// reading it from the CPU is slow, so only checks do.
    pub fn read(&self) -> Result<&[u8]> {
        match self {
            CropBuf::Heap(v) => Ok(v),
            CropBuf::Pinned(p) => p
                .bytes()
                .map_err(|e| Error::Cuda(format!("waiting for a pinned crop buffer: {e}"))),
        }
    }

    pub fn is_pinned(&self) -> bool {
        matches!(self, CropBuf::Pinned(_))
    }

    /// Queues the copy of these bytes into `dst` on `stream`. From pageable memory the driver
    /// stages the bytes before it returns; from pinned memory the copy is a DMA that reads the
    /// buffer later, so the buffer's event is recorded behind it and the next `write` waits for it.
    pub fn upload(&self, stream: &Arc<CudaStream>, dst: &mut CudaViewMut<'_, u8>) -> Result<()> {
        let e = |e: DriverError| Error::Cuda(format!("uploading the crops: {e}"));
        match self {
            CropBuf::Heap(v) => stream.memcpy_htod(v, dst).map_err(e),
            CropBuf::Pinned(p) => p.upload_to(stream, dst).map_err(e),
        }
    }
}

impl std::fmt::Debug for CropBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = if self.is_pinned() { "pinned" } else { "heap" };
        write!(f, "CropBuf({kind}, {} bytes)", self.len())
    }
}

/// Two buffers are equal when their bytes are (a buffer that cannot be read equals nothing).
impl PartialEq for CropBuf {
    fn eq(&self, other: &CropBuf) -> bool {
        matches!((self.read(), other.read()), (Ok(a), Ok(b)) if a == b)
    }
}

/// Crop buffers handed back by the trainer, reused by later batches. In a GPU run with pinned
/// memory the trainer allocates them all up front ([`Loader::pin_memory`], on its own thread: the
/// loader's threads make no CUDA call but the waits of [`PinnedBuf`]); the heap serves otherwise,
/// and should the pinned ones ever run short.
#[derive(Default)]
struct BufPool {
    free: Mutex<Vec<CropBuf>>,
    /// Whether the crops live in pinned memory (buffers of the other kind are not kept).
    pinned: std::sync::atomic::AtomicBool,
    /// Buffers allocated so far.
    made: std::sync::atomic::AtomicUsize,
}

impl BufPool {
    fn take(&self, len: usize) -> CropBuf {
        let pinned = self.pinned.load(Relaxed);
        {
            let mut free = self.free.lock().unwrap();
            if let Some(k) = free
                .iter()
                .position(|b| b.len() == len && b.is_pinned() == pinned)
            {
                return free.swap_remove(k);
            }
        }
        self.made.fetch_add(1, Relaxed);
        CropBuf::Heap(vec![0; len])
    }

    fn give(&self, b: CropBuf) {
        let pinned = self.pinned.load(Relaxed);
        // Buffers of the other kind (made before the context was set) are dropped.
        if !b.is_empty() && b.is_pinned() == pinned {
            self.free.lock().unwrap().push(b);
        }
    }
}

/// A labeled set of images the loader can read.
pub trait Samples: Send + Sync {
    fn len(&self) -> usize;
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    fn label(&self, i: usize) -> usize;
    /// Number of classes (labels lie in 0..classes).
    fn classes(&self) -> usize;
    /// The class names (folder names), where the set has them: two sets with the same names
    /// label alike.
    fn class_names(&self) -> Option<Vec<String>> {
        None
    }
    /// Sample i decoded to RGB, or why not (naming the file).
    fn decode(&self, i: usize) -> std::result::Result<Rgb8, String>;
    /// Sample i's file name (no folder), where the set has one: what split lists name.
    fn file_name(&self, _i: usize) -> Option<String> {
        None
    }
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
#[derive(Debug, PartialEq)]
pub struct Batch {
    pub view1: Vec<f32>,
    pub view2: Vec<f32>,
    /// Empty where the views are normalized here.
    pub crops: [CropBuf; 2],
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
    bufs: Arc<BufPool>,
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
            bufs: Default::default(),
        })
    }

    /// From now on, crop buffers are page-locked memory of `ctx` (for `photometric: false`): all
    /// that a run keeps in flight (both views of the batches in the channel, the one being built
    /// and the one the trainer holds) are allocated here, on the caller's thread. Should that
    /// fail, the crops stay in pageable memory and the reason comes back for a warning.
    pub fn pin_memory(&self, ctx: &Arc<CudaContext>) -> std::result::Result<(), String> {
        let len = self.cfg.batch * self.cfg.size * self.cfg.size * 3;
        let count = 2 * (self.cfg.prefetch.max(1) + 3);
        let mut bufs = Vec::with_capacity(count);
        for _ in 0..count {
            match PinnedBuf::new(ctx, len, true) {
                Ok(b) => bufs.push(CropBuf::Pinned(b)),
                Err(e) => {
                    return Err(format!(
                        "allocating {count} x {} MiB of pinned host memory for the crops failed ({e}); the crops stay in pageable memory",
                        len >> 20
                    ))
                }
            }
        }
        self.bufs.made.fetch_add(count, Relaxed);
        let mut free = self.bufs.free.lock().unwrap();
        free.clear();
        free.extend(bufs);
        self.bufs.pinned.store(true, Relaxed);
        Ok(())
    }

    /// Hands a used batch's crop buffers back for reuse. Call it once the copies from them are
    /// queued: a pinned buffer is written again only after its last copy has finished.
    pub fn recycle(&self, b: Batch) {
        let [c0, c1] = b.crops;
        self.bufs.give(c0);
        self.bufs.give(c1);
    }

    /// Crop buffers allocated so far (reuse keeps this at the batches in flight).
    pub fn buffers_made(&self) -> usize {
        self.bufs.made.load(std::sync::atomic::Ordering::Relaxed)
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
        let bufs = self.bufs.clone();
        let n_batches = self.batches_per_epoch();
        let producer = std::thread::spawn(move || {
            let order = shard(samples.len(), cfg.seed, epoch, cfg.world, cfg.rank);
            for b in start..n_batches {
                let batch = build(&*samples, &cfg, &pool, &tally, &bufs, &order, epoch, b);
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

/// One slot once written: the sample it holds, both views' parameters, the bad samples passed over.
type Slot = (usize, [transforms::ViewParams; 2], Vec<(usize, String)>);

/// Where a slot's two views go: normalized f32, or the u8 crops.
enum Out<'a> {
    F32(&'a mut [f32], &'a mut [f32]),
    U8(&'a mut [u8], &'a mut [u8]),
}

/// Fills `out` with the views of the first readable sample from position `pos` of the order on.
fn slot(
    samples: &dyn Samples,
    cfg: &LoaderConfig,
    order: &[usize],
    epoch: u64,
    pos: usize,
    out: Out,
) -> Slot {
    let mut bad = Vec::new();
    for k in 0..order.len() {
        let i = order[(pos + k) % order.len()];
        match samples.decode(i) {
            Ok(img) => {
                // A substitute (k > 0) gets views of its own, not a copy of its own slot's.
                let key = epoch | (k as u64) << 40;
                let params = [1u8, 2]
                    .map(|v| transforms::view_params(cfg.seed, key, i as u64, v, img.w, img.h));
                match out {
                    Out::F32(o1, o2) => {
                        for (p, o) in params.iter().zip([o1, o2]) {
                            let mut x = transforms::geometric(&img, p, cfg.size);
                            transforms::photometric(&mut x, p);
                            pil::normalize(&x, o);
                        }
                    }
                    Out::U8(o1, o2) => {
                        for (p, o) in params.iter().zip([o1, o2]) {
                            transforms::geometric_into(&img, p, cfg.size, o);
                        }
                    }
                }
                return (i, params, bad);
            }
            Err(why) => bad.push((i, why)),
        }
    }
    // Every sample of the shard is bad: the caller's threshold stops the run first.
    // Black views, normalized on either path.
    let blank = Rgb8::new(cfg.size, cfg.size, vec![0; cfg.size * cfg.size * 3]);
    match out {
        Out::F32(o1, o2) => [o1, o2].map(|o| pil::normalize(&blank, o)),
        Out::U8(o1, o2) => [o1, o2].map(|o| o.copy_from_slice(&blank.data)),
    };
    let p = transforms::view_params(cfg.seed, epoch, order[pos] as u64, 1, cfg.size, cfg.size);
    (order[pos], [p, p], bad)
}

#[allow(clippy::too_many_arguments)]
fn build(
    samples: &dyn Samples,
    cfg: &LoaderConfig,
    pool: &rayon::ThreadPool,
    tally: &Mutex<Tally>,
    bufs: &BufPool,
    order: &[usize],
    epoch: u64,
    b: usize,
) -> Result<Batch> {
    let per = cfg.size * cfg.size * 3;
    let n = cfg.batch * per;
    let f = if cfg.photometric { n } else { 0 };
    let (mut view1, mut view2) = (vec![0.0; f], vec![0.0; f]);
    let mut crops = if cfg.photometric {
        [CropBuf::Heap(Vec::new()), CropBuf::Heap(Vec::new())]
    } else {
        [bufs.take(n), bufs.take(n)]
    };
    // Each slot writes its own range of the batch's buffers, on the worker that made its views.
    let outs: Vec<Out> = if cfg.photometric {
        view1
            .chunks_mut(per)
            .zip(view2.chunks_mut(per))
            .map(|(a, b)| Out::F32(a, b))
            .collect()
    } else {
        let [c1, c2] = &mut crops;
        c1.write()?
            .chunks_mut(per)
            .zip(c2.write()?.chunks_mut(per))
            .map(|(a, b)| Out::U8(a, b))
            .collect()
    };
    let slots: Vec<Slot> = pool.install(|| {
        outs.into_par_iter()
            .enumerate()
            .map(|(s, out)| slot(samples, cfg, order, epoch, b * cfg.batch + s, out))
            .collect()
    });
    let mut batch = Batch {
        view1,
        view2,
        crops,
        params: [Vec::with_capacity(cfg.batch), Vec::with_capacity(cfg.batch)],
        labels: Vec::with_capacity(cfg.batch),
        indices: Vec::with_capacity(cfg.batch),
        new_bad: Vec::new(),
        bad: 0,
        wait_ms: 0.0,
    };
    let mut t = tally.lock().unwrap();
    for (i, [p1, p2], bad) in slots {
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
        let mut img = Rgb8::new(
            16,
            16,
            crops[0].crops[1].read().unwrap()[per..2 * per].to_vec(),
        );
        transforms::photometric(&mut img, &crops[0].params[1][1]);
        let mut v = vec![0.0; per];
        pil::normalize(&img, &mut v);
        assert_eq!(v, one[0].view2[per..2 * per]);
    }

    #[test]
    fn recycled_crop_buffers_give_the_same_batches() {
        let data: Arc<dyn Samples> = Arc::new(Fake {
            n: 120,
            bad_every: 0,
        });
        let mut c = cfg(2);
        c.photometric = false;
        let fresh = run(&Loader::new(data.clone(), c.clone()).unwrap(), 1);
        assert_eq!(fresh.len(), 15);
        // Each batch handed back as the trainer does: later batches are written over the bytes of
        // earlier ones, and every byte is written again.
        let l = Loader::new(data, c).unwrap();
        let mut reused = Vec::new();
        for b in l.epoch(1, 0) {
            let b = b.unwrap();
            let copy = [0, 1].map(|v| CropBuf::Heap(b.crops[v].read().unwrap().to_vec()));
            let (params, indices) = (b.params.clone(), b.indices.clone());
            l.recycle(b);
            reused.push((copy, params, indices));
        }
        for (f, (copy, params, indices)) in fresh.iter().zip(&reused) {
            assert_eq!((&f.crops, &f.params, &f.indices), (copy, params, indices));
        }
        // Two buffers per batch in flight: the channel's 2, the one being built, the one in use.
        let made = l.buffers_made();
        assert!((2..=2 * 4).contains(&made), "{made} buffers for 15 batches");
        // Views made here (photometric on the CPU) take no crop buffers.
        let l = Loader::new(
            Arc::new(Fake {
                n: 40,
                bad_every: 0,
            }),
            cfg(2),
        )
        .unwrap();
        assert_eq!(run(&l, 0).len(), 5);
        assert_eq!(l.buffers_made(), 0);
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
