//! The GPU communicator: one NCCL communicator per process (one process per GPU), made after the
//! rendezvous ([`super::rendezvous`]) hands every rank rank 0's unique id. Collectives run on a
//! side stream of their own, in the order the training step makes them, the same on every rank:
//! the gradient buckets' all-reduces as backward finishes each (overlapping the rest of backward),
//! the loss all-reduce, SyncBN's sums, the broadcast of rank 0's BN running statistics before each
//! forward. Events order them against the compute stream: the side stream waits for the compute
//! work queued before each collective, and the compute stream waits for the collective's result
//! before its next use ([`Nccl::join`]); the host never waits.
//!
//! A watchdog thread keeps the run from hanging: it asks NCCL for an asynchronous error every
//! half second (a peer's death seen by the network or the transport) and watches the training
//! loop's progress; on an error, or when no step has finished for the timeout, it prints one line
//! naming this rank and what it waited for and ends the process (exit 1), as PyTorch's NCCL
//! watchdog does. `lewel pretrain --gpus N` then ends the other ranks.

use super::rendezvous;
use crate::error::{Error, Result};
use crate::gpu::Gpu;
use cudarc::driver::{CudaEvent, CudaStream, DevicePtrMut, DriverError};
use cudarc::nccl::{result, sys};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What the watchdog watches.
struct Watch {
    start: Instant,
    /// Milliseconds since `start` of the last progress report.
    last: AtomicU64,
    /// Whether the progress timeout applies now (off while the run does work of its own length,
    /// such as the kNN monitor).
    armed: AtomicBool,
    stop: AtomicBool,
}

/// One rank's NCCL communicator.
pub struct Nccl {
    comm: sys::ncclComm_t,
    pub rank: usize,
    pub world: usize,
    /// The compute stream (the GPU's).
    main: Arc<CudaStream>,
    /// Where the collectives run.
    side: Arc<CudaStream>,
    /// Recorded on `main` before each collective, waited on by `side`.
    ready: CudaEvent,
    /// Recorded on `side` after collectives, waited on by `main`.
    done: CudaEvent,
    /// Collectives queued since `main` last waited for `side`.
    pending: bool,
    watch: Arc<Watch>,
    watchdog: Option<std::thread::JoinHandle<()>>,
    /// A collective failed: the communicator is aborted, not destroyed, at the end.
    failed: bool,
}

/// The comm handle for the watchdog thread (NCCL allows ncclCommGetAsyncError from any thread).
struct Handle(sys::ncclComm_t);
// SAFETY: the watchdog only calls ncclCommGetAsyncError, which NCCL documents as safe to call
// from another thread while the communicator is in use; it stops before the comm is freed.
unsafe impl Send for Handle {}

/// NCCL's text for a failure: the code's name and, where the library gives one, its last error.
fn describe(e: sys::ncclResult_t, comm: sys::ncclComm_t) -> String {
    // SAFETY: both return pointers to static or library-owned NUL-terminated strings.
    let text = |p: *const std::ffi::c_char| {
        if p.is_null() {
            String::new()
        } else {
            unsafe { std::ffi::CStr::from_ptr(p) }
                .to_string_lossy()
                .into_owned()
        }
    };
    let what = text(unsafe { sys::ncclGetErrorString(e) });
    let last = text(unsafe { sys::ncclGetLastError(comm) });
    if last.is_empty() {
        format!("{e:?} ({what})")
    } else {
        format!("{e:?} ({what}): {last}")
    }
}

impl Nccl {
    /// Meets the other ranks and makes the communicator on `gpu`'s stream. `timeout` bounds the
    /// rendezvous; `progress_timeout` is the watchdog's limit on a step.
    pub fn connect(
        gpu: &Gpu,
        ranks: &super::ranks::Ranks,
        timeout: Duration,
        progress_timeout: Duration,
    ) -> Result<Nccl> {
        let (rank, world) = (ranks.rank, ranks.world);
        // SAFETY: only checks whether the library can be loaded.
        if !unsafe { sys::is_culib_present() } {
            return Err(Error::user(format!(
                "{world} ranks need NCCL: libnccl.so was not found on the library path (scripts/cuda-env.sh adds a PyTorch install's; `lewel info` shows what was found)"
            )));
        }
        let (addr, port) = ranks
            .master
            .clone()
            .ok_or_else(|| Error::Other("a world of several ranks without a rendezvous".into()))?;
        let id: rendezvous::Id = if rank == 0 {
            let id = result::get_uniqueid()
                .map_err(|e| Error::Other(format!("ncclGetUniqueId: {:?}", e.0)))?;
            let bytes = id.internal.map(|c| c as u8);
            rendezvous::serve(port, world, &bytes, timeout)?;
            bytes
        } else {
            rendezvous::join(&addr, port, rank, world, timeout)?
        };
        let watch = Arc::new(Watch {
            start: Instant::now(),
            last: AtomicU64::new(0),
            armed: AtomicBool::new(false),
            stop: AtomicBool::new(false),
        });
        let mut comm: sys::ncclComm_t = std::ptr::null_mut();
        let uid = sys::ncclUniqueId {
            internal: id.map(|b| b as std::ffi::c_char),
        };
        gpu.ctx
            .bind_to_thread()
            .map_err(|e| gpu.err("binding the context for NCCL", e))?;
        // SAFETY: `comm` receives the new communicator; the id came from rank 0's ncclGetUniqueId.
        let r = unsafe { sys::ncclCommInitRank(&mut comm, world as i32, uid, rank as i32) };
        if r != sys::ncclResult_t::ncclSuccess {
            return Err(Error::Other(format!(
                "rank {rank}: making the NCCL communicator of {world} ranks failed: {}",
                describe(r, comm)
            )));
        }
        let cu = |what: &str, e: cudarc::driver::DriverError| gpu.err(what, e);
        let side = gpu
            .ctx
            .new_stream()
            .map_err(|e| cu("making the collectives' stream", e))?;
        let flags = Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DISABLE_TIMING);
        let event = || {
            gpu.ctx
                .new_event(flags)
                .map_err(|e| cu("making the collectives' events", e))
        };
        let mut n = Nccl {
            comm,
            rank,
            world,
            main: gpu.stream.clone(),
            side,
            ready: event()?,
            done: event()?,
            pending: false,
            watch: watch.clone(),
            watchdog: None,
            failed: false,
        };
        let h = Handle(comm);
        n.watchdog = Some(
            std::thread::Builder::new()
                .name("lewel-nccl-watchdog".into())
                .spawn(move || watchdog(h, watch, rank, progress_timeout))
                .map_err(|e| Error::Other(format!("starting the NCCL watchdog: {e}")))?,
        );
        Ok(n)
    }

    /// A step (or another unit of the run) finished: the progress clock restarts.
    pub fn progress(&self) {
        let ms = self.watch.start.elapsed().as_millis() as u64;
        self.watch.last.store(ms, Ordering::Release);
    }

    /// Whether the progress timeout applies from now on (restarting its clock).
    pub fn arm(&self, on: bool) {
        self.progress();
        self.watch.armed.store(on, Ordering::Release);
    }

    fn check(&mut self, what: &str, r: sys::ncclResult_t) -> Result<()> {
        match r {
            sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress => Ok(()),
            e => {
                self.failed = true;
                Err(Error::Other(format!(
                    "rank {}: NCCL {what} failed: {}",
                    self.rank,
                    describe(e, self.comm)
                )))
            }
        }
    }

    /// Every rank's `buf` becomes the mean over the ranks (queued; later work on the compute
    /// stream sees the result).
    pub fn all_reduce_mean<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        self.all_reduce(buf, sys::ncclRedOp_t::ncclAvg)?;
        self.join()
    }

    /// As [`Nccl::all_reduce_mean`], but the compute stream goes on without waiting for it: work
    /// that reads `buf` must come after [`Nccl::join`]. Gradient buckets overlap backward so.
    pub fn all_reduce_mean_async<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        self.all_reduce(buf, sys::ncclRedOp_t::ncclAvg)
    }

    /// Every rank's `buf` becomes the sum over the ranks (queued; later work on the compute stream
    /// sees the result).
    pub fn all_reduce_sum<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        self.all_reduce(buf, sys::ncclRedOp_t::ncclSum)?;
        self.join()
    }

    /// Work queued on the compute stream from now on waits for every collective queued so far.
    pub fn join(&mut self) -> Result<()> {
        if !std::mem::take(&mut self.pending) {
            return Ok(());
        }
        let r = order(&self.done, &self.side, &self.main);
        self.ordered(r, "the compute stream after the collectives")
    }

    /// `r` of ordering `what`, as this rank's error (the communicator is then aborted at the end).
    fn ordered(&mut self, r: std::result::Result<(), DriverError>, what: &str) -> Result<()> {
        r.map_err(|e| {
            self.failed = true;
            Error::Cuda(format!("rank {}: ordering {what}: {e:?}", self.rank))
        })
    }

    fn all_reduce<B: DevicePtrMut<f32>>(
        &mut self,
        buf: &mut B,
        op: sys::ncclRedOp_t,
    ) -> Result<()> {
        // SAFETY: `p` is `n` f32 of device memory on this communicator's GPU, reduced in place.
        self.in_place("all-reduce", buf, |p, n, comm, s| unsafe {
            sys::ncclAllReduce(
                p as *const _,
                p as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                op,
                comm,
                s,
            )
        })
    }

    /// Every rank's `buf` becomes rank `root`'s (queued; later work on the compute stream sees
    /// the result).
    pub fn broadcast<B: DevicePtrMut<f32>>(&mut self, buf: &mut B, root: usize) -> Result<()> {
        // SAFETY: as above, sent from rank `root`'s in place.
        self.in_place("broadcast", buf, |p, n, comm, s| unsafe {
            sys::ncclBroadcast(
                p as *const _,
                p as *mut _,
                n,
                sys::ncclDataType_t::ncclFloat32,
                root as i32,
                comm,
                s,
            )
        })?;
        self.join()
    }

    /// `buf` holds `world` equal parts; every rank's part `rank` (written by it) becomes every
    /// rank's part `rank`: NCCL's in-place all-gather (queued; later work on the compute stream
    /// sees the result). SyncBN's statistics.
    pub fn all_gather<B: DevicePtrMut<f32>>(&mut self, buf: &mut B) -> Result<()> {
        let (rank, world) = (self.rank, self.world);
        assert!(
            buf.len().is_multiple_of(world),
            "Nccl::all_gather: {} floats in {world} parts",
            buf.len()
        );
        // SAFETY: `p` is `n` f32 of device memory on this communicator's GPU; this rank's part,
        // n / world floats from rank * (n / world), is inside it: NCCL's in-place form.
        self.in_place("all-gather", buf, |p, n, comm, s| unsafe {
            let k = n / world;
            sys::ncclAllGather(
                (p + (rank * k * 4) as u64) as *const _,
                p as *mut _,
                k,
                sys::ncclDataType_t::ncclFloat32,
                comm,
                s,
            )
        })?;
        self.join()
    }

    /// The side stream waits for the compute work queued so far.
    fn after_main(&mut self, what: &str) -> Result<()> {
        let r = order(&self.ready, &self.main, &self.side);
        self.ordered(r, &format!("the NCCL {what} after the compute stream"))
    }

    /// Every rank's `mine` (of one length on every rank), concatenated in rank order, on the host
    /// (waits for it): the kNN monitor's features, computed a share per rank.
    pub fn all_gather_host(&mut self, mine: &[f32]) -> Result<Vec<f32>> {
        let rank = self.rank;
        let cu = |what: &str, e: cudarc::driver::DriverError| {
            Error::Cuda(format!("rank {rank}: {what}: {e:?}"))
        };
        let main = self.main.clone();
        let send = main
            .clone_htod(mine)
            .map_err(|e| cu("uploading for an all-gather", e))?;
        let mut recv = main
            .alloc_zeros::<f32>(mine.len() * self.world)
            .map_err(|e| cu("allocating an all-gather's result", e))?;
        self.after_main("all-gather")?;
        let side = self.side.clone();
        let r = {
            let (sp, _a) = cudarc::driver::DevicePtr::device_ptr(&send, &side);
            let (rp, _b) = recv.device_ptr_mut(&side);
            // SAFETY: `sp` holds `mine.len()` f32 and `rp` world times that, on this GPU.
            unsafe {
                sys::ncclAllGather(
                    sp as *const _,
                    rp as *mut _,
                    mine.len(),
                    sys::ncclDataType_t::ncclFloat32,
                    self.comm,
                    side.cu_stream() as _,
                )
            }
        };
        self.pending = true;
        self.check("all-gather", r)?;
        self.join()?;
        let out = main
            .clone_dtoh(&recv)
            .map_err(|e| cu("downloading an all-gather's result", e))?;
        main.synchronize()
            .map_err(|e| cu("waiting for an all-gather", e))?;
        drop(send);
        Ok(out)
    }

    /// Queues collective `f` in place on `buf` (its device pointer, length, the comm and the side
    /// stream) behind the compute work queued so far, checking its result.
    fn in_place<B: DevicePtrMut<f32>>(
        &mut self,
        what: &str,
        buf: &mut B,
        f: impl FnOnce(
            cudarc::driver::sys::CUdeviceptr,
            usize,
            sys::ncclComm_t,
            sys::cudaStream_t,
        ) -> sys::ncclResult_t,
    ) -> Result<()> {
        let n = buf.len();
        self.after_main(what)?;
        let side = self.side.clone();
        let (p, _rec) = buf.device_ptr_mut(&side);
        let r = f(p, n, self.comm, side.cu_stream() as _);
        self.pending = true;
        self.check(what, r)
    }
}

/// SyncBN's statistics over a communicator: each batch-norm sum all-reduced in place on the GPU's
/// stream (a few thousand floats, latency-bound: LEWEL_SPEC's SyncBN runs one before each use).
pub struct BnSync(pub std::rc::Rc<std::cell::RefCell<Nccl>>);

impl crate::ops::batchnorm::SyncGroup for BnSync {
    fn world(&self) -> usize {
        self.0.borrow().world
    }
    fn rank(&self) -> usize {
        self.0.borrow().rank
    }
}

impl<'a> crate::ops::batchnorm::StatSync<cudarc::driver::CudaViewMut<'a, f32>> for BnSync {
    fn sum(&self, sums: &mut cudarc::driver::CudaViewMut<'a, f32>) -> Result<()> {
        self.0.borrow_mut().all_reduce_sum(sums)
    }
    fn gather(&self, all: &mut cudarc::driver::CudaViewMut<'a, f32>) -> Result<()> {
        self.0.borrow_mut().all_gather(all)
    }
}

/// `waiter` waits for the work queued so far on `on`, through `event` (recorded, then waited on).
fn order(
    event: &CudaEvent,
    on: &CudaStream,
    waiter: &CudaStream,
) -> std::result::Result<(), DriverError> {
    event.record(on).and_then(|()| waiter.wait(event))
}

/// The gradient buckets' all-reduce (the average over the ranks), each queued on the side
/// stream as backward finishes it; backward's end makes the compute stream wait for them all.
pub struct GradBuckets {
    pub nccl: std::rc::Rc<std::cell::RefCell<Nccl>>,
    /// Elements per bucket.
    pub elems: usize,
}

impl<E: crate::gpu::GpuFloat> crate::graph::GradReduce<crate::backend::Cuda<E>> for GradBuckets
where
    cudarc::cublas::CudaBlas: cudarc::cublas::Gemm<E>,
{
    fn bucket_elems(&self) -> usize {
        self.elems
    }
    fn bucket(
        &mut self,
        _dev: &crate::backend::Cuda<E>,
        grads: &mut cudarc::driver::CudaSlice<f32>,
        r: std::ops::Range<usize>,
    ) -> Result<()> {
        self.nccl
            .borrow_mut()
            .all_reduce_mean_async(&mut grads.slice_mut(r))
    }
    fn finish(&mut self, _dev: &crate::backend::Cuda<E>) -> Result<()> {
        self.nccl.borrow_mut().join()
    }
}

impl Drop for Nccl {
    fn drop(&mut self) {
        self.watch.stop.store(true, Ordering::Release);
        if let Some(t) = self.watchdog.take() {
            let _ = t.join();
        }
        // SAFETY: the watchdog has stopped; nothing else holds the communicator.
        unsafe {
            if self.failed {
                sys::ncclCommAbort(self.comm);
            } else {
                // Queued collectives finish first, as ncclCommDestroy requires.
                let _ = self.side.synchronize();
                sys::ncclCommDestroy(self.comm);
            }
        }
    }
}

fn watchdog(h: Handle, w: Arc<Watch>, rank: usize, limit: Duration) {
    while !w.stop.load(Ordering::Acquire) {
        std::thread::sleep(Duration::from_millis(200));
        if w.stop.load(Ordering::Acquire) {
            return;
        }
        let mut e = sys::ncclResult_t::ncclSuccess;
        // SAFETY: see `Handle`.
        let r = unsafe { sys::ncclCommGetAsyncError(h.0, &mut e) };
        if r == sys::ncclResult_t::ncclSuccess
            && !matches!(
                e,
                sys::ncclResult_t::ncclSuccess | sys::ncclResult_t::ncclInProgress
            )
        {
            eprintln!(
                "lewel: error: rank {rank}: NCCL reports {}; another rank has probably failed: ending this rank",
                describe(e, h.0)
            );
            std::process::exit(1);
        }
        let now = w.start.elapsed().as_millis() as u64;
        let idle = now.saturating_sub(w.last.load(Ordering::Acquire));
        if w.armed.load(Ordering::Acquire) && idle > limit.as_millis() as u64 {
            eprintln!(
                "lewel: error: rank {rank}: no training step finished in {:.0} s: another rank has stopped or hangs: ending this rank (LEWEL_DIST_TIMEOUT sets the limit in seconds)",
                limit.as_secs_f64()
            );
            std::process::exit(1);
        }
    }
}
