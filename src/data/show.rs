//! `lewel data show`: a PNG grid of samples as the model sees them. One row per sample: the
//! decoded image (fitted into the cell, gray margins), then its view 1 and view 2 of epoch 0, each
//! exactly as the loader makes them (u8, before normalization).

use super::loader::{shard, Samples};
use super::pil::{self, Rgb8};
use super::transforms;
use crate::error::{Error, Result};
use std::path::Path;

pub(crate) const GAP: usize = 4;
pub(crate) const BACKGROUND: u8 = 40;

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

/// Draws `text` (ASCII; other characters as '?') at (x, y) with 8x8 glyphs scaled by `scale`.
pub(crate) fn draw_text(
    img: &mut Rgb8,
    x: usize,
    y: usize,
    text: &str,
    scale: usize,
    color: [u8; 3],
) {
    for (k, ch) in text.chars().enumerate() {
        let c = if ch.is_ascii() {
            ch as usize
        } else {
            b'?' as usize
        };
        let glyph = font8x8::legacy::BASIC_LEGACY[c];
        for (gy, bits) in glyph.iter().enumerate() {
            for gx in 0..8 {
                if bits >> gx & 1 == 0 {
                    continue;
                }
                for dy in 0..scale {
                    for dx in 0..scale {
                        let (px, py) = (x + (k * 8 + gx) * scale + dx, y + gy * scale + dy);
                        if px < img.w && py < img.h {
                            let o = (py * img.w + px) * 3;
                            img.data[o..o + 3].copy_from_slice(&color);
                        }
                    }
                }
            }
        }
    }
}

/// The grid `lewel data show` draws, and how many samples it holds.
pub struct Grid {
    pub image: Rgb8,
    pub rows: usize,
}

/// Column headers of the grid.
pub const HEADERS: [&str; 3] = ["original", "view 1", "view 2"];

/// The grid of `count` samples (the first of epoch 0's order for `seed`), `size`-pixel cells under
/// a header row (original, view 1, view 2); each original is captioned with its index and class.
pub fn grid(samples: &dyn Samples, count: usize, size: usize, seed: u64) -> Grid {
    let order = shard(samples.len(), seed, 0, 1, 0);
    let names = samples.class_names();
    let mut rows: Vec<([Rgb8; 3], String)> = Vec::new();
    for &i in &order {
        if rows.len() == count {
            break;
        }
        let Ok(img) = samples.decode(i) else { continue };
        let v1 = transforms::view_params(seed, 0, i as u64, 1, img.w, img.h);
        let v2 = transforms::view_params(seed, 0, i as u64, 2, img.w, img.h);
        let label = samples.label(i);
        let class = names
            .as_ref()
            .and_then(|n| n.get(label).cloned())
            .unwrap_or_else(|| format!("class {label}"));
        rows.push((
            [
                fit(&img, size),
                transforms::view(&img, &v1, size),
                transforms::view(&img, &v2, size),
            ],
            format!("#{i} {class}"),
        ));
    }
    let scale = (size / 112).max(1);
    let header = header_height(size);
    let w = 3 * size + 4 * GAP;
    let h = header + rows.len() * (size + GAP) + GAP;
    let mut out = Rgb8::new(w, h, vec![BACKGROUND; w * h * 3]);
    for (c, name) in HEADERS.iter().enumerate() {
        let x0 = GAP + c * (size + GAP);
        draw_text(&mut out, x0, GAP, name, scale, [235, 235, 235]);
    }
    for (r, (cells, caption)) in rows.iter().enumerate() {
        for (c, cell) in cells.iter().enumerate() {
            let (x0, y0) = (GAP + c * (size + GAP), header + r * (size + GAP));
            for y in 0..size {
                let dst = ((y0 + y) * w + x0) * 3;
                out.data[dst..dst + size * 3]
                    .copy_from_slice(&cell.data[y * size * 3..(y + 1) * size * 3]);
            }
        }
        // The caption on the original's bottom margin band (gray where the image is fitted).
        // "#index class" where it fits, else the class alone (the more telling half), cut.
        let chars = size / (8 * scale);
        let caption = match caption.split_once(' ') {
            Some((_, class)) if caption.chars().count() > chars => class,
            _ => caption.as_str(),
        };
        let text: String = caption.chars().take(chars).collect();
        let y0 = header + r * (size + GAP) + size - 8 * scale - 1;
        draw_text(&mut out, GAP + 1, y0, &text, scale, [255, 230, 120]);
    }
    Grid {
        image: out,
        rows: rows.len(),
    }
}

/// Height of the header band above the first row.
pub(crate) fn header_height(size: usize) -> usize {
    8 * (size / 112).max(1) + 2 * GAP
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
        let grid = grid(&Few, 3, 32, 0);
        assert_eq!(grid.rows, 3);
        let g = grid.image;
        let top = header_height(32);
        assert_eq!((g.w, g.h), (3 * 32 + 4 * GAP, top + 3 * (32 + GAP) + GAP));
        // Cells are filled (not all background) at their middle row, the margins are background.
        assert!(g.data[((top + 16) * g.w + GAP) * 3..][..32 * 3]
            .iter()
            .any(|&v| v != BACKGROUND));
        assert!(g.data[..g.w * 3].iter().all(|&v| v == BACKGROUND));
        // Each column's header is drawn above it (text pixels in the band, over each column).
        for (c, header) in HEADERS.iter().enumerate() {
            let x0 = GAP + c * (32 + GAP);
            let lit = (GAP..GAP + 8)
                .flat_map(|y| (x0..x0 + 32).map(move |x| (y, x)))
                .filter(|&(y, x)| g.data[(y * g.w + x) * 3] == 235)
                .count();
            assert!(lit > 10, "column {c}: header '{header}' not drawn");
        }
        let p = std::env::temp_dir().join(format!("lewel-grid-{}.png", std::process::id()));
        write_png(&g, &p).unwrap();
        let back = crate::data::decode::decode(&std::fs::read(&p).unwrap()).unwrap();
        std::fs::remove_file(&p).ok();
        assert_eq!((back.w, back.h), (g.w, g.h));
        assert_eq!(back.data, g.data);
    }
}
