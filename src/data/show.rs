//! `lewel data show`: a PNG grid of samples as the model sees them. One row per sample: the
//! decoded image (fitted into the cell, gray margins), then its view 1 and view 2 of epoch 0, each
//! exactly as the loader makes them (u8, before normalization).

use super::loader::{shard, Samples};
use super::pil::{self, Rgb8};
use super::transforms;
use crate::error::{Error, Result};
use std::path::Path;

const GAP: usize = 4;
const BACKGROUND: u8 = 40;

/// The image fitted into a `size` x `size` cell, centred on gray.
fn fit(img: &Rgb8, size: usize) -> Rgb8 {
    let s = size as f64 / img.w.max(img.h) as f64;
    let (w, h) = (
        ((img.w as f64 * s).round() as usize).clamp(1, size),
        ((img.h as f64 * s).round() as usize).clamp(1, size),
    );
    let small = pil::resize(img, w, h);
    let mut cell = Rgb8::new(size, size, vec![BACKGROUND; size * size * 3]);
    let (x0, y0) = ((size - w) / 2, (size - h) / 2);
    for y in 0..h {
        let dst = ((y0 + y) * size + x0) * 3;
        cell.data[dst..dst + w * 3].copy_from_slice(&small.data[y * w * 3..(y + 1) * w * 3]);
    }
    cell
}

/// The grid of `count` samples (the first of epoch 0's order for `seed`), `size`-pixel cells.
pub fn grid(samples: &dyn Samples, count: usize, size: usize, seed: u64) -> Rgb8 {
    let order = shard(samples.len(), seed, 0, 1, 0);
    let mut rows: Vec<[Rgb8; 3]> = Vec::new();
    for &i in &order {
        if rows.len() == count {
            break;
        }
        let Ok(img) = samples.decode(i) else { continue };
        let v1 = transforms::view_params(seed, 0, i as u64, 1, img.w, img.h);
        let v2 = transforms::view_params(seed, 0, i as u64, 2, img.w, img.h);
        rows.push([
            fit(&img, size),
            transforms::view(&img, &v1, size),
            transforms::view(&img, &v2, size),
        ]);
    }
    let w = 3 * size + 4 * GAP;
    let h = rows.len() * (size + GAP) + GAP;
    let mut out = Rgb8::new(w, h, vec![BACKGROUND; w * h * 3]);
    for (r, cells) in rows.iter().enumerate() {
        for (c, cell) in cells.iter().enumerate() {
            let (x0, y0) = (GAP + c * (size + GAP), GAP + r * (size + GAP));
            for y in 0..size {
                let dst = ((y0 + y) * w + x0) * 3;
                out.data[dst..dst + size * 3]
                    .copy_from_slice(&cell.data[y * size * 3..(y + 1) * size * 3]);
            }
        }
    }
    out
}

/// Writes an RGB image as PNG.
pub fn write_png(img: &Rgb8, path: &Path) -> Result<()> {
    use zune_core::bit_depth::BitDepth;
    use zune_core::colorspace::ColorSpace;
    use zune_core::options::EncoderOptions;
    let opts = EncoderOptions::new(img.w, img.h, ColorSpace::RGB, BitDepth::Eight);
    let mut bytes = Vec::new();
    zune_png::PngEncoder::new(&img.data, opts)
        .encode(&mut bytes)
        .map_err(|e| Error::Other(format!("{}: PNG encoding failed: {e:?}", path.display())))?;
    crate::checkpoint::write_bytes_atomic(path, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::rng::Rng;

    struct Few;
    impl Samples for Few {
        fn len(&self) -> usize {
            5
        }
        fn label(&self, i: usize) -> usize {
            i
        }
        fn classes(&self) -> usize {
            5
        }
        fn decode(&self, i: usize) -> std::result::Result<Rgb8, String> {
            if i == 2 {
                return Err("bad".into());
            }
            let (w, h) = (60 + 10 * i, 40);
            let mut r = Rng::new(i as u64);
            Ok(Rgb8::new(
                w,
                h,
                (0..w * h * 3).map(|_| r.below(256) as u8).collect(),
            ))
        }
    }

    #[test]
    fn grid_has_one_row_per_readable_sample_and_round_trips_through_png() {
        let g = grid(&Few, 3, 32, 0);
        assert_eq!((g.w, g.h), (3 * 32 + 4 * GAP, 3 * (32 + GAP) + GAP));
        // Cells are filled (not all background) at their middle row, the margins are background.
        assert!(g.data[((GAP + 16) * g.w + GAP) * 3..][..32 * 3]
            .iter()
            .any(|&v| v != BACKGROUND));
        assert!(g.data[..g.w * 3].iter().all(|&v| v == BACKGROUND));
        let p = std::env::temp_dir().join(format!("lewel-grid-{}.png", std::process::id()));
        write_png(&g, &p).unwrap();
        let back = crate::data::decode::decode(&std::fs::read(&p).unwrap()).unwrap();
        std::fs::remove_file(&p).ok();
        assert_eq!((back.w, back.h), (g.w, g.h));
        assert_eq!(back.data, g.data);
    }
}
