//! One LEWEL iteration on the GPU, the order of src/train.rs exactly: online(v1), online(v2) in
//! train mode; target(v1), target(v2) without gradient; the loss; backward; LARS over the flat
//! buffers; the compute-dtype copy refreshed; the EMA of the target in one launch (and of the BN
//! running statistics for EMAN). The CPU [`Lewel`] it wraps holds the module handles, the configs
//! and the host copy that checkpoints read ([`GpuLewel::sync_host`]).

use crate::backend::Cuda;
use crate::data::loader::CropBuf;
use crate::data::photometric_cuda::{AugBuffers, AugParams};
use crate::data::pinned::PinnedBuf;
use crate::error::Result;
use crate::gpu::{Gpu, GpuFloat};
use crate::graph::{BnMode, Graph};
use crate::optim::{self, ExcludeRule, GpuLars};
use crate::tensor::{Shape, Tensor};
use crate::train::{Lewel, Method, StepConfig};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::{CudaEvent, CudaSlice};
use std::rc::Rc;

/// Online and target graphs on one GPU, with the LARS momentum.
pub struct GpuLewel<E: GpuFloat>
where
    CudaBlas: Gemm<E>,
{
    pub host: Lewel,
    pub gpu: Rc<Gpu>,
    pub g: Graph<Cuda<E>>,
    pub tg: Graph<Cuda<E>>,
    momentum: CudaSlice<f32>,
    lars: Option<(ExcludeRule, GpuLars)>,
    /// Buffers of the photometric augmentation, for (batch, size).
    aug: Option<(usize, usize, AugBuffers)>,
    /// Step losses on their way to the host, oldest first: a queued copy into page-locked memory
    /// each, read by [`Self::take_loss`] (a training loop reads a step's loss once the next step
    /// is queued, so the host never waits with the GPU idle).
    /// With each: an event recorded before it where the step clock was restarted, and the event
    /// recorded behind its update (timing enabled; [`Self::update`]).
    queued: std::collections::VecDeque<(PinnedBuf, Option<CudaEvent>, Option<CudaEvent>)>,
    /// Page-locked slots already read, for reuse.
    spare: Vec<PinnedBuf>,
    /// The end event of the step read last: a step's time on the device runs from it.
    last_end: Option<CudaEvent>,
    /// The start event of the step being queued, where it needs one.
    start: Option<CudaEvent>,
    /// Timing events no longer needed, for reuse (a step creates none once running).
    spare_events: Vec<CudaEvent>,
    /// Images per eval-mode feature pass (the kNN monitor): at most the training batch, so the
    /// pass never needs more activation memory than a step (set by the run; 128 by default).
    pub feature_batch: usize,
}

impl<E: GpuFloat> GpuLewel<E>
where
    CudaBlas: Gemm<E>,
{
    /// Uploads a model (fresh or loaded from a checkpoint) with its LARS momentum.
    pub fn new(host: Lewel, gpu: Rc<Gpu>) -> Result<Self> {
        let g = Graph::upload_new(gpu.clone(), &host.g.store)?;
        let tg = Graph::upload_new(gpu.clone(), &host.tg.store)?;
        let momentum = gpu
            .stream
            .clone_htod(&host.momentum)
            .map_err(|e| gpu.err("uploading the LARS momentum", e))?;
        Ok(GpuLewel {
            host,
            gpu,
            g,
            tg,
            momentum,
            lars: None,
            aug: None,
            queued: Default::default(),
            spare: Vec::new(),
            last_end: None,
            start: None,
            spare_events: Vec::new(),
            feature_batch: 128,
        })
    }

    /// Device bytes held by both graphs and the momentum.
    pub fn device_bytes(&self) -> usize {
        self.g.device_bytes() + self.tg.device_bytes() + self.host.momentum.len() * 4
    }

    /// Forward and backward of one iteration on views (B, H, W, 3); leaves the f32 gradients in
    /// `g.grads` and returns the loss (waits for it).
    pub fn forward_backward(
        &mut self,
        v1: &[f32],
        v2: &[f32],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<f32> {
        self.queue_forward_backward(v1, v2, shape, sc)?;
        Ok(self.take_loss()?.0)
    }

    /// Forgets the last step's end: the next step's time runs from its own start (after a pause
    /// such as the kNN monitor and a checkpoint).
    pub fn restart_step_clock(&mut self) {
        self.spare_events.extend(self.last_end.take());
    }

    /// The same without waiting: the loss joins the queue [`Self::take_loss`] reads.
    pub fn queue_forward_backward(
        &mut self,
        v1: &[f32],
        v2: &[f32],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<()> {
        self.begin()?;
        let a = self.g.input(shape, v1);
        let b = self.g.input(shape, v2);
        self.forward_backward_inputs(a, b, sc)
    }

    /// The oldest queued loss (waits for its copy), and the step's milliseconds on the device:
    /// from the end of the step read before it (or from its own start after a restart of the
    /// clock) to its end, by CUDA events.
    pub fn take_loss(&mut self) -> Result<(f32, f64)> {
        let (slot, start, end) = self
            .queued
            .pop_front()
            .ok_or_else(|| crate::Error::Other("take_loss: no step is queued".into()))?;
        let e = |e| self.gpu.err("reading a step's loss", e);
        let b = slot.bytes().map_err(e)?;
        let loss = f32::from_ne_bytes([b[0], b[1], b[2], b[3]]);
        self.spare.push(slot);
        let Some(end) = end else {
            // No update followed (a check): no step time.
            self.spare_events.extend(start);
            return Ok((loss, 0.0));
        };
        let from = start.as_ref().or(self.last_end.as_ref());
        let ms = match from {
            Some(s) => s.elapsed_ms(&end).map_err(e)? as f64,
            None => 0.0,
        };
        self.spare_events.extend(start);
        self.spare_events.extend(self.last_end.replace(end));
        Ok((loss, ms))
    }

    /// An event with timing (a spare one, or a new one), recorded on the stream now.
    fn mark(&mut self) -> Result<CudaEvent> {
        let e = |e| self.gpu.err("a timing event", e);
        let ev = match self.spare_events.pop() {
            Some(ev) => ev,
            None => self
                .gpu
                .ctx
                .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                .map_err(e)?,
        };
        ev.record(&self.gpu.stream).map_err(e)?;
        Ok(ev)
    }

    /// Queues the forward and backward of one iteration from u8 crops (B, S, S, 3) of both views
    /// and their parameters (the photometric half of the augmentation runs here, on the GPU); the
    /// loss joins the queue [`Self::take_loss`] reads.
    pub fn queue_forward_backward_crops(
        &mut self,
        crops: [&CropBuf; 2],
        params: [&[AugParams]; 2],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<()> {
        let (batch, size) = (shape.dims()[0], shape.dims()[1]);
        if self
            .aug
            .as_ref()
            .is_none_or(|(b, s, _)| (*b, *s) != (batch, size))
        {
            self.aug = Some((batch, size, AugBuffers::new(&self.gpu, batch, size)?));
        }
        self.begin()?;
        let bufs = &mut self.aug.as_mut().unwrap().2;
        let a = self.g.input_crops(shape, crops[0], params[0], bufs);
        let b = self.g.input_crops(shape, crops[1], params[1], bufs);
        self.forward_backward_inputs(a, b, sc)
    }

    fn begin(&mut self) -> Result<()> {
        // The step's start, where no queued or read step's end stands before it.
        let start = if self.last_end.is_none() && self.queued.is_empty() {
            Some(self.mark()?)
        } else {
            None
        };
        let unused = std::mem::replace(&mut self.start, start);
        self.spare_events.extend(unused);
        self.g.reset();
        self.g.set_recording(true);
        self.tg.set_recording(false);
        Ok(())
    }

    fn forward_backward_inputs(&mut self, a: Tensor, b: Tensor, sc: &StepConfig) -> Result<()> {
        let (online_mode, target_mode) = sc.bn_modes();
        let (tg, target) = (&mut self.tg, &self.host.target);
        let mut run_target = |v: Tensor, og: &mut Graph<Cuda<E>>| {
            tg.reset();
            let x = tg.input_from(og, v);
            let (z, o) = target.forward(tg, x, target_mode);
            (og.input_from(tg, z), og.input_from(tg, o))
        };
        let loss = self
            .host
            .online
            .loss(&mut self.g, a, b, online_mode, &mut run_target);
        self.tg.check()?;
        self.g.backward(loss)?;
        let mut slot = match self.spare.pop() {
            Some(s) => s,
            None => PinnedBuf::new(&self.gpu.ctx, 4, false)
                .map_err(|e| self.gpu.err("page-locked memory for the loss", e))?,
        };
        let r = self.g.queue_fetch(loss, &mut slot);
        match r {
            Ok(()) => {
                let start = self.start.take();
                self.queued.push_back((slot, start, None));
                Ok(())
            }
            Err(e) => {
                self.spare.push(slot);
                Err(e)
            }
        }
    }

    /// The LARS step over the online parameters, then the EMA of the target.
    pub fn update(&mut self, sc: &StepConfig) -> Result<()> {
        let gpu = &*self.gpu;
        if self.lars.as_ref().is_none_or(|(r, _)| *r != sc.exclude) {
            let t = &self.g.store.table;
            let flags: Vec<bool> = t
                .entries
                .iter()
                .map(|e| optim::lars_excluded(&e.name, sc.exclude))
                .collect();
            self.lars = Some((sc.exclude, GpuLars::new(gpu, t, &flags)?));
        }
        let lars = &mut self.lars.as_mut().unwrap().1;
        lars.step(
            gpu,
            &mut self.g.w.params,
            &self.g.w.grads,
            &mut self.momentum,
            &sc.lars,
        )?;
        self.g.refresh()?;
        let (np, nb) = (self.host.online_params, self.host.online_buffers);
        optim::ema_update_cuda(
            gpu,
            &mut self.tg.w.params,
            &self.g.w.params.slice(..np),
            sc.ema_m,
        )?;
        if sc.method == Method::LewelBEman {
            optim::ema_update_cuda(
                gpu,
                &mut self.tg.w.buffers,
                &self.g.w.buffers.slice(..nb),
                sc.ema_m,
            )?;
            let nc = self.host.online_counters;
            for (tc, oc) in self
                .tg
                .store
                .counters
                .iter_mut()
                .zip(&self.g.store.counters[..nc])
            {
                tc.1 = oc.1;
            }
        }
        self.tg.refresh()?;
        // The step ends here, for its time (`take_loss`).
        let end = self.mark()?;
        match self.queued.back_mut() {
            Some(q) => self.spare_events.extend(q.2.replace(end)),
            None => self.spare_events.push(end),
        }
        Ok(())
    }

    /// Copies the device state (parameters, statistics, counters, momentum) into `host` (waits).
    pub fn sync_host(&mut self) -> Result<&Lewel> {
        self.g.download(&mut self.host.g.store)?;
        self.tg.download(&mut self.host.tg.store)?;
        self.host.momentum = self.gpu.download(&self.momentum)?;
        Ok(&self.host)
    }

    /// Pooled online backbone features (eval mode) of images (B, H, W, 3), not normalized.
    pub fn features(&mut self, x: &[f32], shape: Shape) -> Result<Vec<f32>> {
        self.g.set_recording(false);
        self.g.reset();
        let x = self.g.input(shape, x);
        let f = self
            .host
            .online
            .encoder
            .backbone
            .forward(&mut self.g, x, BnMode::Eval);
        let p = self.g.avgpool(f);
        let out = self.g.fetch(p);
        self.g.set_recording(true);
        self.g.check()?;
        out
    }
}
