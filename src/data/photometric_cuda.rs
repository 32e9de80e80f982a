//! The photometric half of the augmentation on the GPU (kernels/augment.cu): jitter in the drawn
//! order, grayscale, PIL's box blur, solarize and normalize, on the u8 crops the loader made, from
//! the parameters it drew on the CPU. `check` holds it to `data::transforms::photometric` (itself
//! bit-exact with PIL) bit for bit.

use crate::check::Row;
use crate::data::loader::CropBuf;
use crate::data::pil::{self, Rgb8};
use crate::data::pinned::PinnedBuf;
use crate::data::transforms::{self, ViewParams};
use crate::data::{MEAN, STD};
use crate::error::Result;
use crate::gpu::{blocks, grid_1d, need, run, DevMut, Gpu, GpuFloat};
use crate::rng::Rng;
use cudarc::driver::CudaSlice;
use cudarc::driver::PushKernelArg;

/// Mirrored field for field by `struct AugParams` in kernels/augment.cu.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct AugParams {
    pub order: [i32; 4],
    pub brightness: f32,
    pub contrast: f32,
    pub saturation: f32,
    pub hue_shift: i32,
    pub gray: i32,
    pub solarize: i32,
    pub blur: i32,
    pub blur_r: i32,
    pub blur_ww: u32,
    pub blur_fw: u32,
}

const WORDS: usize = std::mem::size_of::<AugParams>() / 4;

impl AugParams {
    /// The kernel's view of one view's parameters.
    pub fn new(p: &ViewParams) -> AugParams {
        let mut a = AugParams {
            order: [-1; 4],
            brightness: 1.0,
            contrast: 1.0,
            saturation: 1.0,
            ..Default::default()
        };
        if let Some(j) = &p.jitter {
            a.order = j.order.map(|o| o as i32);
            a.brightness = j.brightness;
            a.contrast = j.contrast;
            a.saturation = j.saturation;
            a.hue_shift = pil::hue_shift(j.hue as f64) as i32;
        }
        a.gray = p.gray as i32;
        a.solarize = p.solarize as i32;
        if let Some(sigma) = p.blur {
            let radius = pil::box_radius(sigma, pil::BLUR_PASSES);
            if radius != 0.0 {
                let (r, ww, fw) = pil::box_weights(radius);
                a.blur = 1;
                a.blur_r = r as i32;
                a.blur_ww = ww;
                a.blur_fw = fw;
            }
        }
        a
    }

    /// As 32-bit words, the layout the kernel reads.
    fn words(&self) -> [u32; WORDS] {
        let o = self.order.map(|v| v as u32);
        [
            o[0],
            o[1],
            o[2],
            o[3],
            self.brightness.to_bits(),
            self.contrast.to_bits(),
            self.saturation.to_bits(),
            self.hue_shift as u32,
            self.gray as u32,
            self.solarize as u32,
            self.blur as u32,
            self.blur_r as u32,
            self.blur_ww,
            self.blur_fw,
        ]
    }
}

/// Device buffers for one batch of crops: the crops (in place), a ping-pong twin, the parameters;
/// and two page-locked staging buffers the parameters are uploaded from, used in turn (a view's
/// upload is a queued DMA: the host writes a staging buffer again only after its last copy).
pub struct AugBuffers {
    pub crops: CudaSlice<u8>,
    tmp: CudaSlice<u8>,
    params: CudaSlice<u32>,
    mean_std: CudaSlice<f32>,
    staging: [PinnedBuf; 2],
    turn: usize,
}

impl AugBuffers {
    pub fn new(g: &Gpu, batch: usize, size: usize) -> Result<AugBuffers> {
        let n = batch * size * size * 3;
        let e = |e| g.err("augment buffers", e);
        let ms: Vec<f32> = MEAN.iter().chain(STD.iter()).copied().collect();
        Ok(AugBuffers {
            crops: g.stream.alloc_zeros::<u8>(n).map_err(e)?,
            tmp: g.stream.alloc_zeros::<u8>(n).map_err(e)?,
            params: g.stream.alloc_zeros::<u32>(batch * WORDS).map_err(e)?,
            mean_std: g.stream.clone_htod(&ms).map_err(e)?,
            staging: [
                PinnedBuf::new(&g.ctx, batch * WORDS * 4, true).map_err(e)?,
                PinnedBuf::new(&g.ctx, batch * WORDS * 4, true).map_err(e)?,
            ],
            turn: 0,
        })
    }
}

/// Uploads `crops` ((B, size, size, 3) u8) and their parameters, runs the photometric ops and
/// writes the normalized views into `out` (B, size, size, 3) in T. From pinned memory
/// (`CropBuf::Pinned`) the upload is a DMA queued on the stream and this returns without waiting
/// for it; from pageable memory the driver first stages the bytes in memory of its own.
pub fn photometric_cuda<T: GpuFloat>(
    g: &Gpu,
    bufs: &mut AugBuffers,
    crops: &CropBuf,
    params: &[AugParams],
    size: usize,
    out: &mut impl DevMut<T>,
) -> Result<()> {
    let batch = params.len();
    let n = batch * size * size * 3;
    need(
        "augment::photometric_cuda",
        &[
            ("crops", crops.len(), n),
            ("device crops", bufs.crops.len(), n),
            ("params", bufs.params.len(), batch * WORDS),
            ("out", out.len(), n),
        ],
    )?;
    let e = |e| g.err("augment upload", e);
    crops.upload(&g.stream, &mut bufs.crops.slice_mut(..n))?;
    let staging = &mut bufs.staging[bufs.turn];
    bufs.turn ^= 1;
    let bytes = staging.bytes_mut().map_err(e)?;
    for (w, p) in bytes.chunks_exact_mut(WORDS * 4).zip(params) {
        for (b, v) in w.chunks_exact_mut(4).zip(p.words()) {
            b.copy_from_slice(&v.to_ne_bytes());
        }
    }
    // Safety: u32 words as their bytes; `need` checked the length above.
    let mut dst = unsafe { bufs.params.transmute_mut::<u8>(batch * WORDS * 4) }
        .expect("the parameter buffer holds the batch");
    staging.upload_to(&g.stream, &mut dst).map_err(e)?;
    let (hw, b, s) = ((size * size) as i32, batch as i32, size as i32);
    let mut l = g.stream.launch_builder(&g.k.aug_color);
    l.arg(&mut bufs.crops).arg(&bufs.params).arg(&hw);
    run(g, l, blocks(batch, 256), "aug_color")?;
    // Three horizontal passes, then three vertical: crops -> tmp -> crops ...; six passes end in
    // crops.
    for pass in 0..2 * pil::BLUR_PASSES {
        let vertical = (pass >= pil::BLUR_PASSES) as i32;
        let (src, dst) = if pass % 2 == 0 {
            (&bufs.crops, &mut bufs.tmp)
        } else {
            (&bufs.tmp, &mut bufs.crops)
        };
        let mut l = g.stream.launch_builder(&g.k.aug_blur);
        l.arg(src)
            .arg(dst)
            .arg(&bufs.params)
            .arg(&b)
            .arg(&s)
            .arg(&vertical);
        run(g, l, grid_1d(n), "aug_blur")?;
    }
    let mut o = out.view_mut();
    let mut l = g.stream.launch_builder(g.k.aug_finish.get::<T>());
    l.arg(&bufs.crops)
        .arg(&mut o)
        .arg(&bufs.params)
        .arg(&bufs.mean_std)
        .arg(&b)
        .arg(&hw);
    run(g, l, grid_1d(n), "aug_finish")
}

/// `lewel check` rows: random crops and random view parameters of both views (blur and solarize
/// forced on for some), GPU against the CPU's photometric + normalize, bit for bit, f32 and bf16.
pub fn check(g: &Gpu, seed: u64) -> Result<Vec<Row>> {
    let (batch, size) = (16usize, 40usize);
    let mut r = Rng::keyed(&[seed, 0xa46]);
    let mut crops = Vec::with_capacity(batch * size * size * 3);
    let mut params = Vec::with_capacity(batch);
    let mut want = vec![0.0f32; batch * size * size * 3];
    for i in 0..batch {
        // A smooth image with noise, so that every op changes something.
        let px: Vec<u8> = (0..size * size * 3)
            .map(|k| ((k / 3 % size) * 5 + (k / 3 / size) * 3 + r.below(40) as usize) as u8)
            .collect();
        let mut p = transforms::view_params(seed, 0, i as u64, 1 + (i % 2) as u8, 500, 375);
        if i % 4 == 0 {
            p.blur = Some(0.1 + 1.9 * (i as f32 / batch as f32));
            p.solarize = true;
        }
        let mut img = Rgb8::new(size, size, px.clone());
        transforms::photometric(&mut img, &p);
        let per = size * size * 3;
        pil::normalize(&img, &mut want[i * per..(i + 1) * per]);
        crops.extend_from_slice(&px);
        params.push(AugParams::new(&p));
    }
    let mut bufs = AugBuffers::new(g, batch, size)?;
    let heap = CropBuf::Heap(crops);
    // The loader's pinned buffers on the GPU path: the same bytes, uploaded by a queued DMA.
    let mut pinned = CropBuf::Pinned(
        PinnedBuf::new(&g.ctx, heap.len(), true)
            .map_err(|e| g.err("augment check: pinned memory", e))?,
    );
    pinned.write()?.copy_from_slice(heap.read()?);
    let mut rows = Vec::new();
    let mut heap = heap;
    for (crops, from) in [(&mut heap, ""), (&mut pinned, ", from pinned memory")] {
        rows.push(one::<f32>(
            g, &mut bufs, crops, &params, size, &want, from, false,
        )?);
        rows.push(one::<half::bf16>(
            g, &mut bufs, crops, &params, size, &want, from, false,
        )?);
    }
    // As the loader does: the buffer is written again (the next batch) as soon as its upload is
    // queued. The write waits for the copy (the event recorded behind it), so the views are the
    // first bytes'; without that wait a GPU may copy the new bytes, and the software GPU stops
    // the process.
    rows.push(one::<f32>(
        g,
        &mut bufs,
        &mut pinned,
        &params,
        size,
        &want,
        ", pinned memory rewritten right after the upload",
        true,
    )?);
    Ok(rows)
}

#[allow(clippy::too_many_arguments)]
fn one<T: GpuFloat>(
    g: &Gpu,
    bufs: &mut AugBuffers,
    crops: &mut CropBuf,
    params: &[AugParams],
    size: usize,
    want: &[f32],
    from: &str,
    rewrite: bool,
) -> Result<Row> {
    let mut out = g
        .stream
        .alloc_zeros::<T>(want.len())
        .map_err(|e| g.err("augment check", e))?;
    photometric_cuda::<T>(g, bufs, crops, params, size, &mut out)?;
    if rewrite {
        crops.write()?.fill(0);
    }
    let got = g.download(&out)?;
    // The CPU's f32 rounded to T is what the kernel must store.
    let bad = got
        .iter()
        .zip(want)
        .filter(|(a, b)| a.to_bits() != T::from_f32(**b).to_f32().to_bits())
        .count();
    Ok(Row {
        op: format!("augment photometric (jitter, gray, blur, solarize, normalize){from}"),
        dtype: if T::DTYPE == crate::tensor::DType::F32 {
            "f32"
        } else {
            "bf16"
        },
        output: "views",
        nmse: bad as f64 / want.len() as f64,
        tol: 0.0,
        failure: if bad == 0 {
            String::new()
        } else {
            format!("{bad} of {} values differ from the CPU", want.len())
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn params_layout_matches_the_kernel_struct() {
        // 14 four-byte fields, in the order of kernels/augment.cu.
        assert_eq!(std::mem::size_of::<AugParams>(), 56);
        let p = AugParams {
            order: [2, 0, 3, 1],
            hue_shift: 244,
            blur_fw: 7,
            ..Default::default()
        };
        let w = p.words();
        assert_eq!(&w[..4], &[2, 0, 3, 1]);
        assert_eq!((w[7], w[13]), (244, 7));
        let src =
            std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels/augment.cu"))
                .unwrap();
        let body = &src[src.find("struct AugParams {").unwrap()..];
        let body = &body[..body.find("};").unwrap()];
        let fields: Vec<&str> = body
            .lines()
            .skip(1)
            .filter_map(|l| l.trim().split(';').next())
            .filter(|l| !l.is_empty() && !l.starts_with("//"))
            .map(|l| l.split_whitespace().last().unwrap())
            .collect();
        assert_eq!(
            fields,
            [
                "order[4]",
                "brightness",
                "contrast",
                "saturation",
                "hue_shift",
                "gray",
                "solarize",
                "blur",
                "blur_r",
                "blur_ww",
                "blur_fw"
            ]
        );
    }

    #[test]
    fn params_from_a_view() {
        let mut p = transforms::view_params(1, 0, 5, 2, 500, 375);
        p.blur = Some(1.0);
        p.jitter = None;
        let a = AugParams::new(&p);
        assert_eq!(a.order, [-1; 4]);
        assert_eq!(a.blur, 1);
        let (r, ww, fw) = pil::box_weights(pil::box_radius(1.0, 3));
        assert_eq!((a.blur_r, a.blur_ww, a.blur_fw), (r as i32, ww, fw));
    }
}
