//! One LEWEL iteration on the GPU, the order of src/train.rs exactly: online(v1), online(v2) in
//! train mode; target(v1), target(v2) without gradient; the loss; backward; LARS over the flat
//! buffers; the compute-dtype copy refreshed; the EMA of the target in one launch (and of the BN
//! running statistics for EMAN). The CPU [`Lewel`] it wraps holds the module handles, the configs
//! and the host copy that checkpoints read ([`GpuLewel::sync_host`]).

use super::augment::{AugBuffers, AugParams};
use super::graph::DevGraph;
use super::{Gpu, GpuFloat};
use crate::autograd::{BnMode, Tape};
use crate::data::loader::CropBuf;
use crate::error::Result;
use crate::optim::{self, ExcludeRule, GpuLars};
use crate::tensor::{Shape, Tensor};
use crate::train::{Lewel, Method, StepConfig};
use cudarc::cublas::{CudaBlas, Gemm};
use cudarc::driver::CudaSlice;
use std::rc::Rc;

/// Online and target graphs on one GPU, with the LARS momentum.
pub struct GpuLewel<E: GpuFloat> {
    pub host: Lewel,
    pub gpu: Rc<Gpu>,
    pub g: DevGraph<E>,
    pub tg: DevGraph<E>,
    momentum: CudaSlice<f32>,
    lars: Option<(ExcludeRule, GpuLars)>,
    /// Buffers of the photometric augmentation, for (batch, size).
    aug: Option<(usize, usize, AugBuffers)>,
}

impl<E: GpuFloat> GpuLewel<E>
where
    CudaBlas: Gemm<E>,
{
    /// Uploads a model (fresh or loaded from a checkpoint) with its LARS momentum.
    pub fn new(host: Lewel, gpu: Rc<Gpu>) -> Result<Self> {
        let g = DevGraph::new(gpu.clone(), &host.g.store)?;
        let tg = DevGraph::new(gpu.clone(), &host.tg.store)?;
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
        })
    }

    /// Device bytes held by both graphs and the momentum.
    pub fn device_bytes(&self) -> usize {
        self.g.device_bytes() + self.tg.device_bytes() + self.host.momentum.len() * 4
    }

    /// Forward and backward of one iteration on views (B, H, W, 3); leaves the f32 gradients in
    /// `g.grads` and returns the loss.
    pub fn forward_backward(
        &mut self,
        v1: &[f32],
        v2: &[f32],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<f32> {
        self.begin();
        let a = self.g.input(shape, v1);
        let b = self.g.input(shape, v2);
        self.forward_backward_inputs(a, b, sc)
    }

    /// The same from u8 crops (B, S, S, 3) of both views and their parameters: the photometric
    /// half of the augmentation runs here, on the GPU.
    pub fn forward_backward_crops(
        &mut self,
        crops: [&CropBuf; 2],
        params: [&[AugParams]; 2],
        shape: Shape,
        sc: &StepConfig,
    ) -> Result<f32> {
        let (batch, size) = (shape.dims()[0], shape.dims()[1]);
        if self
            .aug
            .as_ref()
            .is_none_or(|(b, s, _)| (*b, *s) != (batch, size))
        {
            self.aug = Some((batch, size, AugBuffers::new(&self.gpu, batch, size)?));
        }
        self.begin();
        let bufs = &mut self.aug.as_mut().unwrap().2;
        let a = self.g.input_crops(shape, crops[0], params[0], bufs);
        let b = self.g.input_crops(shape, crops[1], params[1], bufs);
        self.forward_backward_inputs(a, b, sc)
    }

    fn begin(&mut self) {
        self.g.reset();
        self.g.set_recording(true);
        self.tg.set_recording(false);
    }

    fn forward_backward_inputs(&mut self, a: Tensor, b: Tensor, sc: &StepConfig) -> Result<f32> {
        let (online_mode, target_mode) = sc.bn_modes();
        let (tg, target) = (&mut self.tg, &self.host.target);
        let mut run_target = |v: Tensor, og: &mut DevGraph<E>| {
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
        Ok(self.g.fetch(loss)?[0])
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
            &mut self.g.params,
            &self.g.grads,
            &mut self.momentum,
            &sc.lars,
        )?;
        self.g.refresh()?;
        let (np, nb) = (self.host.online_params, self.host.online_buffers);
        optim::ema_update_cuda(
            gpu,
            &mut self.tg.params,
            &self.g.params.slice(..np),
            sc.ema_m,
        )?;
        if sc.method == Method::LewelBEman {
            optim::ema_update_cuda(
                gpu,
                &mut self.tg.buffers,
                &self.g.buffers.slice(..nb),
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
        self.tg.refresh()
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
