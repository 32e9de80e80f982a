//! The trainer's device hooks on a GPU ([`TrainBackend`] for [`Cuda`]): losses copied into page-locked memory and read a step later, the photometric augmentation on
//! the device.

use crate::backend::Cuda;
use crate::data::loader::CropBuf;
use crate::data::photometric_cuda::{AugBuffers, AugParams};
use crate::data::pinned::PinnedBuf;
use crate::error::Result;
use crate::gpu::GpuFloat;
use crate::graph::Graph;
use crate::tensor::{Shape, Tensor};
use crate::train::TrainBackend;
use cudarc::cublas::{CudaBlas, Gemm};

impl<E: GpuFloat> TrainBackend for Cuda<E>
where
    CudaBlas: Gemm<E>,
{
    type Pending = PinnedBuf;
    /// The augmentation's buffers, for (batch, size).
    type Aug = Option<(usize, usize, AugBuffers)>;

    fn queue_loss(g: &Graph<Self>, t: Tensor, reuse: Option<PinnedBuf>) -> Result<PinnedBuf> {
        let gpu = &g.dev.gpu;
        let mut slot = match reuse {
            Some(s) => s,
            None => PinnedBuf::new(&gpu.ctx, 4, false)
                .map_err(|e| gpu.err("page-locked memory for the loss", e))?,
        };
        g.queue_fetch(t, &mut slot)?;
        Ok(slot)
    }

    fn read_loss(&self, p: &PinnedBuf) -> Result<f32> {
        let b = p
            .bytes()
            .map_err(|e| self.gpu.err("reading a step's loss", e))?;
        Ok(f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn describe(&self) -> String {
        let g = &self.gpu;
        let dtype = if E::DTYPE == crate::tensor::DType::F32 {
            "f32"
        } else {
            "bf16"
        };
        format!(
            "{} cuda:{} {dtype}{} ({} CPU threads for data)",
            g.name,
            g.ordinal,
            if g.deterministic {
                " deterministic"
            } else {
                ""
            },
            rayon::current_num_threads()
        )
    }

    fn has_device_memory(&self) -> bool {
        true
    }

    fn input_crops(
        g: &mut Graph<Self>,
        aug: &mut Self::Aug,
        crops: [&CropBuf; 2],
        params: [&[AugParams]; 2],
        shape: Shape,
    ) -> Result<(Tensor, Tensor)> {
        let (batch, size) = (shape.dims()[0], shape.dims()[1]);
        if aug
            .as_ref()
            .is_none_or(|(b, s, _)| (*b, *s) != (batch, size))
        {
            *aug = Some((batch, size, AugBuffers::new(&g.dev.gpu, batch, size)?));
        }
        let bufs = &mut aug.as_mut().unwrap().2;
        let a = g.input_crops(shape, crops[0], params[0], bufs);
        let b = g.input_crops(shape, crops[1], params[1], bufs);
        Ok((a, b))
    }

    fn context(&self) -> Option<std::sync::Arc<cudarc::driver::CudaContext>> {
        Some(self.gpu.ctx.clone())
    }

    fn take_find_failure(&self) -> Option<String> {
        self.gpu.find_failure.borrow_mut().take()
    }
}
