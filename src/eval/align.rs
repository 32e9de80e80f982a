//! `lewel show-align`: what "learning where to learn" learned. For a few images, each LEWEL head's
//! alignment maps (LEWEL_SPEC 2.2: W = softmax over positions, step 8, split into n_H heads of K
//! maps, step 9) drawn over the image as a PNG grid, and one line per image and head on stdout.
//!
//! W is read off the online encoder's own forward pass (`EncoderObj::forward`, eval-mode BN with
//! the running statistics): the output of the graph's `align` node, (B, L, D) with positions as rows,
//!   W[b, p, d] at (b * L + p) * D + d,   p = row * W' + col of the H' x W' backbone map,
//!   map d = h * K + k is map k of head h   (K = D / n_H).
//! A head's cell shows the mean of its K maps, again a distribution over the L positions:
//!   m_h[p] = (1 / K) * sum_k W[b, p, h * K + k]
//! scaled to its own min..max (the range is printed under the cell: at init the maps are nearly
//! uniform, and only the range tells a flat map from a peaked one), upsampled bilinearly to the
//! cell (pixel centres, edges clamped), viridis (dark = min, yellow = max), blended 50% over the
//! image. Under each cell: x = peak / mean = L * max_p m_h (1 for a flat map; one map at scale s
//! is at most e^(2/s) over its minimum) and H = entropy / ln L (1 for a flat map). Stdout adds the
//! peak's (row, col), the most peaked single map k of the head and, on the built-in set, where the
//! shape is known, the map's mass on the shape against the shape's share of the image.

use crate::backend::Cpu;
use crate::checkpoint;
use crate::data::augment;
use crate::data::pil::{self, Rgb8};
use crate::data::show::{draw_text, header_height, write_png, BACKGROUND, GAP};
use crate::data::synthetic::{Split, Synthetic, CLASSES};
use crate::error::{Error, Result};
use crate::graph::{BnMode, Graph, Node};
use crate::memory::ParamStore;
use crate::model::lewel::{EncoderObj, LewelConfig};
use crate::rng::Rng;
use crate::run::{self, EmbedInput, PretrainConfig};
use crate::tensor::Shape;
use std::path::{Path, PathBuf};

/// Cells are drawn at least this many pixels on their longer side (integer upscaling of the input).
const MIN_CELL: usize = 160;
/// Images per forward pass.
const BATCH: usize = 16;
/// Caption lines under each cell (8x8 font at scale 1, 10 px a line).
const LINE: usize = 10;
const CAPTION: usize = 2 * LINE + 2;

// ----------------------------------------------------------------------------
// Options and results

/// What `lewel show-align` was asked for.
#[derive(Clone, Debug)]
pub struct AlignOptions {
    /// A run folder, its checkpoint.json, or a LEWEL state (.safetensors).
    pub checkpoint: PathBuf,
    /// An ImageFolder, a packed file, a folder of images, one image, a safetensors of `images`, or
    /// `synthetic` (the built-in set's held-out split).
    pub data: PathBuf,
    pub count: usize,
    /// Side of the network input (eval transform); none: the run's, else 48 on the built-in set,
    /// 224 on images.
    pub size: Option<usize>,
    /// Which images (the built-in set's seed, or the order of a labeled set); none: the run's seed, else 0.
    pub seed: Option<u64>,
    /// LEWEL heads and logit scale of a bare checkpoint file; a run folder's come from its config.toml.
    pub heads: Option<usize>,
    pub scale: Option<f32>,
}

/// One head's map for one image.
#[derive(Clone, Debug)]
pub struct HeadMap {
    /// m_h over the L positions (sums to 1).
    pub mean: Vec<f32>,
    pub min: f32,
    pub max: f32,
    /// (row, col) of the largest m_h.
    pub peak: (usize, usize),
    /// L * max m_h: 1 for a flat map.
    pub peak_ratio: f64,
    /// Entropy of m_h over ln L: 1 for a flat map.
    pub rel_entropy: f64,
    /// The single map k of this head with the largest peak, its L * max and its peak's (row, col).
    pub sharpest_k: usize,
    pub sharpest_ratio: f64,
    pub sharpest_peak: (usize, usize),
    /// Mean over k of the single maps' entropy over ln L.
    pub k_rel_entropy: f64,
    /// On the built-in set: the map's mass on the shape (sum_p m_h[p] * object_p) and the shape's
    /// share of the image (mean_p object_p), object_p = the shape's share of position p's block.
    pub object: Option<(f64, f64)>,
}

/// What `show_align` drew.
pub struct Shown {
    pub image: Rgb8,
    /// Images (rows) and columns (the image, then one per head).
    pub rows: usize,
    pub cols: usize,
    /// Raw W of every image, (N, L, D).
    pub maps: Vec<f32>,
    /// Backbone map rows and columns (L = H' * W'), map channels D, heads.
    pub grid: (usize, usize),
    pub dim: usize,
    pub heads: usize,
    /// [image][head].
    pub stats: Vec<Vec<HeadMap>>,
    /// The first line (what was loaded), then one line per image and head.
    pub lines: Vec<String>,
}

/// One image: the network's input (normalized, (h, w, 3)) and what is drawn (the same crop, u8).
struct Item {
    x: Vec<f32>,
    rgb: Rgb8,
    name: String,
    /// The built-in set's shape mask (square, row-major, before the resize), where it is known.
    mask: Option<(Vec<bool>, usize)>,
}

// ----------------------------------------------------------------------------
// The model and its settings

/// Heads, scale, input side and seed of a run folder (its config.toml), when the checkpoint is one.
struct RunSettings {
    heads: usize,
    scale: f32,
    size: Option<usize>,
    seed: u64,
    config: PathBuf,
}

fn run_settings(weights: &Path) -> Result<Option<RunSettings>> {
    let dir = weights.parent().unwrap_or(Path::new("."));
    let config = dir.join("config.toml");
    // A run folder holds both; a config.toml beside a stray file may be anything.
    if !(config.is_file() && dir.join("checkpoint.json").is_file()) {
        return Ok(None);
    }
    let c = PretrainConfig::from_toml(&config)?;
    Ok(Some(RunSettings {
        heads: c.lewel_num_heads,
        scale: c.lewel_scale,
        size: c.image_size,
        seed: c.seed,
        config,
    }))
}

/// The online encoder of a LEWEL checkpoint on a CPU graph, its config, and the run's settings.
struct Loaded {
    enc: EncoderObj,
    g: Graph<Cpu<f32>>,
    cfg: LewelConfig,
    run: Option<RunSettings>,
    /// The weights file, for messages.
    what: String,
}

fn load(o: &AlignOptions) -> Result<Loaded> {
    let weights = run::weights_file(&o.checkpoint)?;
    let what = weights.display().to_string();
    let t = checkpoint::read_file(&weights)?;
    if !t.contains_key("online_net.neck.proj.mlp.0.weight") {
        return Err(Error::user(format!(
            "{what}: has no LEWEL neck (online_net.neck.proj.*): show-align needs a full LEWEL checkpoint, not an exported backbone"
        )));
    }
    let rs = run_settings(&weights)?;
    let (heads, scale) = match &rs {
        Some(r) => {
            let conflict = |flag: &str, given: String, saved: String| {
                Error::user(format!(
                    "{flag} {given}: the run was trained with {saved} ({}); leave the flag out",
                    r.config.display()
                ))
            };
            if let Some(h) = o.heads.filter(|&h| h != r.heads) {
                return Err(conflict(
                    "--lewel-num-heads",
                    h.to_string(),
                    r.heads.to_string(),
                ));
            }
            if let Some(s) = o.scale.filter(|&s| s != r.scale) {
                return Err(conflict(
                    "--lewel-scale",
                    s.to_string(),
                    r.scale.to_string(),
                ));
            }
            (r.heads, r.scale)
        }
        None => {
            let d = PretrainConfig::default();
            (
                o.heads.unwrap_or(d.lewel_num_heads),
                o.scale.unwrap_or(d.lewel_scale),
            )
        }
    };
    let cfg = LewelConfig::infer(&t, heads, scale, 0.5, &what)?;
    let mut s = ParamStore::new();
    let enc = EncoderObj::build(&mut s, "online_net.", &cfg, &mut Rng::new(0));
    checkpoint::load_store(&mut s, &t, &what)?;
    Ok(Loaded {
        enc,
        g: Graph::cpu(s),
        cfg,
        run: rs,
        what,
    })
}

// ----------------------------------------------------------------------------
// Images

/// u8 RGB of a normalized (h, w, 3) image (the inverse of ImageNet's mean/std, rounded).
fn denormalize(x: &[f32], w: usize, h: usize) -> Rgb8 {
    let px = x
        .chunks_exact(3)
        .flat_map(|p| {
            (0..3).map(move |c| {
                ((p[c] * crate::data::STD[c] + crate::data::MEAN[c]) * 255.0)
                    .round()
                    .clamp(0.0, 255.0) as u8
            })
        })
        .collect();
    Rgb8::new(w, h, px)
}

/// The first `count` images of `data` through the eval transform at `size`.
fn images(data: &Path, count: usize, size: usize, seed: u64) -> Result<(Vec<Item>, String)> {
    if data.as_os_str() == "synthetic" {
        // The built-in set's held-out split, as the kNN monitor's queries: the whole 80 px image
        // resized to the input side (classes in turn, so the first ten are ten classes).
        let d = Synthetic::new(seed, run::SOURCE_SIZE, 1, count);
        let items = (0..count)
            .map(|i| {
                let img = d.image_rgb(Split::Val, i);
                let x = augment::eval_view(&img, d.size, size);
                let rgb = denormalize(&x, size, size);
                let name = format!("#{i} {}", CLASSES[d.label(i)]);
                // The shape is lighter than 0.7 in every channel, the background darker than 0.3.
                let mask = img
                    .chunks_exact(3)
                    .map(|p| p[0] + p[1] + p[2] > 1.5)
                    .collect();
                Item {
                    x,
                    rgb,
                    name,
                    mask: Some((mask, d.size)),
                }
            })
            .collect();
        return Ok((
            items,
            format!("built-in set seed {seed}, held-out images 0..{count}"),
        ));
    }
    let input = EmbedInput::open(data)?;
    let n = input.len();
    if n == 0 {
        return Err(Error::user(format!("{}: no images", data.display())));
    }
    // A labeled set in the order `lewel data show` uses (mixed classes); files in name order.
    let (order, what) = match &input {
        EmbedInput::Set(_) => (
            crate::data::loader::shard(n, seed, 0, 1, 0),
            format!("{n} labeled images, order of seed {seed}"),
        ),
        EmbedInput::Files(_) => ((0..n).collect(), format!("{n} image files by name")),
        EmbedInput::Tensor { .. } => ((0..n).collect(), format!("{n} images (tensor)")),
    };
    let mut items = Vec::new();
    let mut first_error = None;
    let mut skipped = 0;
    for &i in &order {
        if items.len() == count {
            break;
        }
        let (x, h, w) = match input.item(i, size) {
            Ok(v) => v,
            Err(e) => {
                skipped += 1;
                first_error.get_or_insert(e);
                continue;
            }
        };
        let name = match &input {
            EmbedInput::Set(s) => {
                let label = s.label(i);
                let class = s.class_names().get(label).cloned();
                format!("#{i} {}", class.unwrap_or_else(|| format!("class {label}")))
            }
            EmbedInput::Files(f) => f[i]
                .file_name()
                .map_or(format!("#{i}"), |f| f.to_string_lossy().into_owned()),
            EmbedInput::Tensor { .. } => format!("#{i}"),
        };
        items.push(Item {
            rgb: denormalize(&x, w, h),
            x,
            name,
            mask: None,
        });
    }
    match (items.is_empty(), first_error) {
        (true, Some(e)) => Err(e),
        (_, Some(e)) => Ok((items, format!("{what}; {skipped} unreadable skipped ({e})"))),
        (_, None) => Ok((items, what)),
    }
}

// ----------------------------------------------------------------------------
// The maps

/// W of a batch from the encoder's own forward pass: (B, L, D) and the backbone map's (H', W').
fn forward_maps(
    enc: &EncoderObj,
    g: &mut Graph<Cpu<f32>>,
    items: &[Item],
) -> Result<(Vec<f32>, (usize, usize))> {
    let (h, w) = (items[0].rgb.h, items[0].rgb.w);
    let x: Vec<f32> = items.iter().flat_map(|it| it.x.iter().copied()).collect();
    g.reset();
    let x = g.input(Shape::new(&[items.len(), h, w, 3]), &x);
    enc.forward(g, x, BnMode::Eval);
    g.check()?;
    // The neck's global pool reads the backbone map (B, H', W', C); its align node makes W.
    let mut grid = None;
    let mut maps = None;
    for n in g.tape() {
        match n {
            Node::AvgPool { x, .. } => grid = Some((x.shape.dim(1), x.shape.dim(2))),
            Node::Align { y, .. } => maps = Some(*y),
            _ => {}
        }
    }
    let (Some(grid), Some(maps)) = (grid, maps) else {
        return Err(Error::Other(
            "show-align: the encoder's tape has no pool or align node".into(),
        ));
    };
    assert_eq!(
        maps.shape.dim(1),
        grid.0 * grid.1,
        "show-align: L vs H' x W'"
    );
    Ok((g.value(maps).to_vec(), grid))
}

/// Entropy of a distribution over ln of its length (1 when uniform; 1 for a single position).
fn rel_entropy(p: impl Iterator<Item = f64>, l: usize) -> f64 {
    if l < 2 {
        return 1.0;
    }
    let h: f64 = p.filter(|&v| v > 0.0).map(|v| -v * v.ln()).sum();
    h / (l as f64).ln()
}

/// Head `h`'s map of one image: `w` is that image's W, (L, D) with positions as rows.
pub fn head_map(w: &[f32], l: usize, d: usize, heads: usize, h: usize, cols: usize) -> HeadMap {
    assert_eq!(w.len(), l * d, "head_map: W is not (L, D)");
    let k = d / heads;
    let at = |p: usize| (p / cols, p % cols);
    // Map kk of this head over the positions.
    let map = |kk: usize| (0..l).map(move |p| w[p * d + h * k + kk] as f64);
    let argmax = |v: &[f64]| (0..v.len()).fold(0, |best, i| if v[i] > v[best] { i } else { best });
    let mean64: Vec<f64> = (0..l)
        .map(|p| {
            w[p * d + h * k..][..k]
                .iter()
                .map(|&v| v as f64)
                .sum::<f64>()
                / k as f64
        })
        .collect();
    let p = argmax(&mean64);
    let (mut sk, mut sbest, mut spos) = (0, f64::MIN, 0);
    let mut k_ent = 0.0;
    for kk in 0..k {
        let m: Vec<f64> = map(kk).collect();
        let pp = argmax(&m);
        if m[pp] > sbest {
            (sk, sbest, spos) = (kk, m[pp], pp);
        }
        k_ent += rel_entropy(m.into_iter(), l);
    }
    let mean: Vec<f32> = mean64.iter().map(|&v| v as f32).collect();
    HeadMap {
        rel_entropy: rel_entropy(mean64.iter().copied(), l),
        min: mean.iter().copied().fold(f32::INFINITY, f32::min),
        max: mean[p],
        mean,
        peak: at(p),
        peak_ratio: mean64[p] * l as f64,
        sharpest_k: sk,
        sharpest_ratio: sbest * l as f64,
        sharpest_peak: at(spos),
        k_rel_entropy: k_ent / k as f64,
        object: None,
    }
}

/// The shape's share of each position's block of a square mask, (rows, cols) positions.
pub fn object_share(mask: &[bool], side: usize, grid: (usize, usize)) -> Vec<f64> {
    assert_eq!(
        mask.len(),
        side * side,
        "object_share: mask is not {side} x {side}"
    );
    let mut hit = vec![0usize; grid.0 * grid.1];
    let mut all = vec![0usize; grid.0 * grid.1];
    for y in 0..side {
        for x in 0..side {
            let p = (y * grid.0 / side) * grid.1 + x * grid.1 / side;
            all[p] += 1;
            hit[p] += mask[y * side + x] as usize;
        }
    }
    hit.iter()
        .zip(&all)
        .map(|(&h, &a)| h as f64 / a.max(1) as f64)
        .collect()
}

// ----------------------------------------------------------------------------
// Rendering

/// matplotlib's viridis (CC0) at nine stops; its lightness rises monotonically.
const VIRIDIS: [[f32; 3]; 9] = [
    [68.0, 1.0, 84.0],
    [71.0, 44.0, 122.0],
    [59.0, 82.0, 139.0],
    [44.0, 113.0, 142.0],
    [33.0, 145.0, 140.0],
    [39.0, 173.0, 129.0],
    [92.0, 200.0, 99.0],
    [170.0, 220.0, 50.0],
    [253.0, 231.0, 37.0],
];

/// Viridis at t in [0, 1] (linear between the stops).
pub fn viridis(t: f32) -> [f32; 3] {
    let x = t.clamp(0.0, 1.0) * (VIRIDIS.len() - 1) as f32;
    let i = (x.floor() as usize).min(VIRIDIS.len() - 2);
    let f = x - i as f32;
    let (a, b) = (VIRIDIS[i], VIRIDIS[i + 1]);
    [0, 1, 2].map(|c| a[c] + f * (b[c] - a[c]))
}

/// A (mh, mw) map upsampled bilinearly to (h, w): pixel centres aligned, edges clamped
/// (PyTorch's `interpolate(..., 'bilinear', align_corners=False)`).
pub fn upsample(map: &[f32], mh: usize, mw: usize, w: usize, h: usize) -> Vec<f32> {
    assert_eq!(map.len(), mh * mw, "upsample: map is not {mh} x {mw}");
    let src = |o: usize, n_out: usize, n_in: usize| {
        let s = ((o as f32 + 0.5) * n_in as f32 / n_out as f32 - 0.5).clamp(0.0, (n_in - 1) as f32);
        let i = (s.floor() as usize).min(n_in.saturating_sub(2));
        (i, (i + 1).min(n_in - 1), s - i as f32)
    };
    let mut out = vec![0.0; w * h];
    for y in 0..h {
        let (y0, y1, fy) = src(y, h, mh);
        for x in 0..w {
            let (x0, x1, fx) = src(x, w, mw);
            let top = map[y0 * mw + x0] * (1.0 - fx) + map[y0 * mw + x1] * fx;
            let bot = map[y1 * mw + x0] * (1.0 - fx) + map[y1 * mw + x1] * fx;
            out[y * w + x] = top * (1.0 - fy) + bot * fy;
        }
    }
    out
}

/// The map (mh, mw), scaled to its own min..max, as a viridis heat blended 50% over `img`.
pub fn overlay(img: &Rgb8, map: &[f32], mh: usize, mw: usize) -> Rgb8 {
    let min = map.iter().copied().fold(f32::INFINITY, f32::min);
    let max = map.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    // A flat map is drawn at the bottom of the scale (its caption says its range is zero).
    let span = if max > min { max - min } else { 1.0 };
    let t: Vec<f32> = map.iter().map(|&v| (v - min) / span).collect();
    let up = upsample(&t, mh, mw, img.w, img.h);
    let mut out = img.clone();
    for (px, &t) in out.data.chunks_exact_mut(3).zip(&up) {
        let c = viridis(t);
        for ch in 0..3 {
            px[ch] = (0.5 * px[ch] as f32 + 0.5 * c[ch]).round() as u8;
        }
    }
    out
}

/// A value with four significant digits (0.2500, 0.02041).
fn sig4(v: f32) -> String {
    let decimals = if v > 0.0 {
        (3 - v.log10().floor() as i32).clamp(0, 8) as usize
    } else {
        4
    };
    format!("{v:.decimals$}")
}

/// Words of `text` in lines of at most `chars` characters.
fn wrap(text: &str, chars: usize) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for word in text.split(' ') {
        match lines.last_mut() {
            Some(l) if l.len() + 1 + word.len() <= chars => {
                l.push(' ');
                l.push_str(word);
            }
            _ => lines.push(word.to_string()),
        }
    }
    lines
}

const LEGEND: &str = "each head: the mean of its K maps W[:, hK+k] (LEWEL 2.2), 50% viridis over the image, scaled to its own min..max (printed under it); x = peak / mean (1: flat), H = entropy / ln L (1: flat)";

/// Cell side for an input side: integer upscaling to at least MIN_CELL.
fn cell_scale(w: usize, h: usize) -> usize {
    MIN_CELL.div_ceil(w.max(h)).max(1)
}

/// Pixel size of the grid: `rows` images, `cols` columns of (cw, ch) cells, a legend of `legend`
/// lines.
fn grid_size(rows: usize, cols: usize, cw: usize, ch: usize, legend: usize) -> (usize, usize) {
    (
        GAP + cols * (cw + GAP),
        header_height(cw) + rows * (ch + CAPTION + GAP) + legend * LINE + GAP,
    )
}

/// The grid: a header row ("image", "head 1", ...), then per image its crop and one overlay per
/// head, each with two caption lines beneath.
fn draw(items: &[Item], stats: &[Vec<HeadMap>], grid: (usize, usize)) -> Rgb8 {
    let f = cell_scale(items[0].rgb.w, items[0].rgb.h);
    let (cw, ch) = (items[0].rgb.w * f, items[0].rgb.h * f);
    let cols = 1 + stats[0].len();
    let width = GAP + cols * (cw + GAP);
    let legend = wrap(LEGEND, (width - GAP) / 8);
    let (w, h) = grid_size(items.len(), cols, cw, ch, legend.len());
    let mut out = Rgb8::new(w, h, vec![BACKGROUND; w * h * 3]);
    let hs = (cw / 112).max(1);
    let x0 = |c: usize| GAP + c * (cw + GAP);
    draw_text(&mut out, x0(0), GAP, "image", hs, [235, 235, 235]);
    for c in 1..cols {
        draw_text(
            &mut out,
            x0(c),
            GAP,
            &format!("head {c}"),
            hs,
            [235, 235, 235],
        );
    }
    let top = header_height(cw);
    let chars = cw / 8;
    let fit = |s: &str| s.chars().take(chars).collect::<String>();
    for (r, (it, heads)) in items.iter().zip(stats).enumerate() {
        let y0 = top + r * (ch + CAPTION + GAP);
        let img = pil::resize(&it.rgb, cw, ch);
        let mut cells = vec![(
            img.clone(),
            fit(&it.name),
            fit(&format!("{}x{} positions", grid.0, grid.1)),
        )];
        for m in heads {
            cells.push((
                overlay(&img, &m.mean, grid.0, grid.1),
                fit(&format!("x{:.3} H{:.4}", m.peak_ratio, m.rel_entropy)),
                fit(&format!("{}..{}", sig4(m.min), sig4(m.max))),
            ));
        }
        for (c, (cell, l1, l2)) in cells.iter().enumerate() {
            for y in 0..ch {
                let dst = ((y0 + y) * w + x0(c)) * 3;
                out.data[dst..dst + cw * 3].copy_from_slice(&cell.data[y * cw * 3..][..cw * 3]);
            }
            draw_text(&mut out, x0(c), y0 + ch + 2, l1, 1, [255, 230, 120]);
            draw_text(&mut out, x0(c), y0 + ch + 2 + LINE, l2, 1, [200, 200, 200]);
        }
    }
    let y_legend = top + items.len() * (ch + CAPTION + GAP);
    for (i, line) in legend.iter().enumerate() {
        draw_text(&mut out, GAP, y_legend + i * LINE, line, 1, [180, 180, 180]);
    }
    out
}

// ----------------------------------------------------------------------------
// The command

/// `lewel show-align`: loads the checkpoint, runs the images through the online encoder, draws
/// the grid, writes it to `out`.
pub fn show_align(o: &AlignOptions, out: &Path) -> Result<Shown> {
    let s = render(o)?;
    write_png(&s.image, out)?;
    Ok(s)
}

/// [`show_align`] without writing.
pub fn render(o: &AlignOptions) -> Result<Shown> {
    if !(1..=1000).contains(&o.count) {
        return Err(Error::user(format!(
            "--count: must lie in [1, 1000], got {}",
            o.count
        )));
    }
    if let Some(s) = o.size.filter(|s| !(32..=1024).contains(s)) {
        return Err(Error::user(format!(
            "--size: must lie in [32, 1024], got {s}"
        )));
    }
    let synthetic = o.data.as_os_str() == "synthetic";
    if !synthetic && !o.data.exists() {
        return Err(Error::user(format!(
            "--data {}: no such file or folder (or `synthetic` for the built-in set)",
            o.data.display()
        )));
    }
    let Loaded {
        enc,
        mut g,
        cfg,
        run: rs,
        what,
    } = load(o)?;
    let size = o
        .size
        .or(rs.as_ref().and_then(|r| r.size))
        .unwrap_or(if synthetic { 48 } else { 224 });
    let seed = o.seed.or(rs.as_ref().map(|r| r.seed)).unwrap_or(0);
    let (items, data_note) = images(&o.data, o.count, size, seed)?;
    let (d, heads) = (cfg.dim, cfg.heads);
    let mut maps = Vec::new();
    let mut grid = (0, 0);
    for chunk in items.chunks(BATCH) {
        let (m, gr) = forward_maps(&enc, &mut g, chunk)?;
        maps.extend_from_slice(&m);
        grid = gr;
    }
    let l = grid.0 * grid.1;
    let stats: Vec<Vec<HeadMap>> = maps
        .chunks_exact(l * d)
        .zip(&items)
        .map(|(w, it)| {
            let share = it
                .mask
                .as_ref()
                .map(|(m, side)| object_share(m, *side, grid));
            (0..heads)
                .map(|h| {
                    let mut m = head_map(w, l, d, heads, h, grid.1);
                    m.object = share.as_ref().map(|o| {
                        let mass = m.mean.iter().zip(o).map(|(&v, &f)| v as f64 * f).sum();
                        (mass, o.iter().sum::<f64>() / l as f64)
                    });
                    m
                })
                .collect()
        })
        .collect();
    let source = match &rs {
        Some(r) => format!("{}", r.config.display()),
        None => "flags".to_string(),
    };
    let mut lines = vec![format!(
        "show-align | {what} | {} | {heads} heads x {} maps, scale {} ({source}) | {size} px input -> {}x{} positions | {data_note}",
        cfg.arch.name(),
        d / heads,
        cfg.scale,
        grid.0,
        grid.1
    )];
    for (i, (it, hm)) in items.iter().zip(&stats).enumerate() {
        for (h, m) in hm.iter().enumerate() {
            lines.push(format!(
                "align | image {}/{} {} | head {} | H/Hmax {:.5} | peak ({}, {}) of {}x{}, peak/mean {:.4} | range {}..{} | sharpest map k={}: peak/mean {:.4} at ({}, {}); maps' mean H/Hmax {:.5}",
                i + 1,
                items.len(),
                it.name,
                h + 1,
                m.rel_entropy,
                m.peak.0,
                m.peak.1,
                grid.0,
                grid.1,
                m.peak_ratio,
                sig4(m.min),
                sig4(m.max),
                m.sharpest_k,
                m.sharpest_ratio,
                m.sharpest_peak.0,
                m.sharpest_peak.1,
                m.k_rel_entropy
            ) + &m.object.map_or(String::new(), |(mass, area)| {
                format!(
                    " | object {:.1}% of the map on {:.1}% of the image",
                    100.0 * mass,
                    100.0 * area
                )
            }));
        }
    }
    // Each head over all images.
    let n = items.len() as f64;
    for h in 0..heads {
        let col = || stats.iter().map(move |s| &s[h]);
        let mut line = format!(
            "align | head {} over {} images | mean H/Hmax {:.5} | mean peak/mean {:.4} | mean sharpest single map peak/mean {:.4}",
            h + 1,
            items.len(),
            col().map(|m| m.rel_entropy).sum::<f64>() / n,
            col().map(|m| m.peak_ratio).sum::<f64>() / n,
            col().map(|m| m.sharpest_ratio).sum::<f64>() / n,
        );
        let obj: Vec<(f64, f64)> = col().filter_map(|m| m.object).collect();
        if !obj.is_empty() {
            let more = obj.iter().filter(|(m, a)| m > a).count();
            let diff = obj.iter().map(|(m, a)| m - a).sum::<f64>() / obj.len() as f64;
            line += &format!(
                " | object: map minus area {:+.2} points on average, more than the area in {more}/{}",
                100.0 * diff,
                obj.len()
            );
        }
        lines.push(line);
    }
    let image = draw(&items, &stats, grid);
    Ok(Shown {
        image,
        rows: items.len(),
        cols: 1 + heads,
        maps,
        grid,
        dim: d,
        heads,
        stats,
        lines,
    })
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::lewel::LewelOnline;
    use crate::model::resnet::Arch;

    fn tmp(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("lewel-align-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    /// A random-init tiny LEWEL state (online net and predictors) written as a checkpoint file,
    /// its BN running statistics moved off (0, 1) so eval-mode BN does something.
    fn tiny_checkpoint(dir: &Path) -> PathBuf {
        let cfg = LewelConfig::new(Arch::TINY, 4, 1.0, 0.5);
        let mut s = ParamStore::<f32>::new();
        LewelOnline::build(&mut s, &cfg, &mut Rng::new(7));
        let mut r = Rng::new(8);
        for v in s.buffers.iter_mut() {
            *v = if *v == 0.0 {
                0.1 * r.normal() as f32
            } else {
                0.5 + r.uniform() as f32
            };
        }
        let p = dir.join("state.safetensors");
        checkpoint::write_file_atomic(&p, &checkpoint::store_tensors(&s), None).unwrap();
        p
    }

    fn opts(ck: &Path, count: usize) -> AlignOptions {
        AlignOptions {
            checkpoint: ck.to_path_buf(),
            data: "synthetic".into(),
            count,
            size: Some(64),
            seed: None,
            heads: None,
            scale: None,
        }
    }

    /// The maps drawn are the model's W: every map W[b, :, d] of the encoder's real forward pass
    /// sums to 1 over the positions, and so does each head's mean map before it is scaled for
    /// drawing; they are not uniform (the test could fail), and the stats match the maps.
    #[test]
    fn the_maps_drawn_sum_to_one_over_positions() {
        let d = tmp("sum");
        let ck = tiny_checkpoint(&d);
        let s = render(&opts(&ck, 3)).unwrap();
        let (l, dim) = (s.grid.0 * s.grid.1, s.dim);
        assert_eq!(
            (s.grid, dim, s.heads),
            ((2, 2), 32, 4),
            "64 px tiny: 2x2 positions"
        );
        assert_eq!(s.maps.len(), 3 * l * dim);
        for b in 0..3 {
            for c in 0..dim {
                let sum: f64 = (0..l).map(|p| s.maps[(b * l + p) * dim + c] as f64).sum();
                assert!((sum - 1.0).abs() < 1e-5, "W[{b}, :, {c}] sums to {sum}");
            }
        }
        let mut spread = 0.0f32;
        for (b, heads) in s.stats.iter().enumerate() {
            for (h, m) in heads.iter().enumerate() {
                let sum: f64 = m.mean.iter().map(|&v| v as f64).sum();
                assert!((sum - 1.0).abs() < 1e-5, "image {b} head {h}: {sum}");
                let k = dim / 4;
                let p = m.peak.0 * s.grid.1 + m.peak.1;
                let direct: f32 = (0..k)
                    .map(|kk| s.maps[(b * l + p) * dim + h * k + kk])
                    .sum::<f32>()
                    / k as f32;
                assert!((direct - m.max).abs() < 1e-6);
                assert!(m.rel_entropy <= 1.0 + 1e-9 && m.peak_ratio >= 1.0);
                spread = spread.max(m.max - m.min);
            }
        }
        assert!(spread > 1e-4, "the maps are exactly uniform: {spread}");
        // A line per image and head, then one per head over the images.
        assert_eq!(s.lines.len(), 1 + 3 * 4 + 4);
        for m in s.stats.iter().flatten() {
            let (mass, area) = m.object.expect("the built-in set has shape masks");
            assert!((0.0..=1.0).contains(&mass) && (0.0..=1.0).contains(&area));
        }
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// A map with one peak: the hottest pixel of its overlay (over black, viridis' lightness rises
    /// with the value) lies in the peak's block of the cell, wherever the peak is.
    #[test]
    fn the_hottest_pixel_is_where_the_peak_is() {
        let (mh, mw, w, h) = (3, 4, 80, 60);
        let black = Rgb8::new(w, h, vec![0; w * h * 3]);
        for peak in 0..mh * mw {
            let mut map = vec![0.08f32; mh * mw];
            map[peak] = 0.12;
            let o = overlay(&black, &map, mh, mw);
            let luma: Vec<u8> = o
                .data
                .chunks_exact(3)
                .map(|p| pil::luma(p[0], p[1], p[2]))
                .collect();
            let best = *luma.iter().max().unwrap();
            let (pr, pc) = (peak / mw, peak % mw);
            for (i, _) in luma.iter().enumerate().filter(|(_, &v)| v == best) {
                let (y, x) = (i / w, i % w);
                assert!(
                    y * mh / h == pr && x * mw / w == pc,
                    "peak ({pr}, {pc}): hottest pixel at ({y}, {x})"
                );
            }
            // The scale spans the map's own min..max: near the top of viridis at the peak
            // (0.5 * luma 215 = 107 at t = 1), its bottom (0.5 * 30) far from it.
            let worst = *luma.iter().min().unwrap();
            assert!(best >= 95 && worst <= 16, "luma {worst}..{best}");
        }
    }

    /// The shape's share of each position: the left half of a 6 px mask lit, 2 x 3 positions.
    #[test]
    fn object_share_is_the_shapes_share_of_each_block() {
        let mask: Vec<bool> = (0..36).map(|i| i % 6 < 3).collect();
        assert_eq!(
            object_share(&mask, 6, (2, 3)),
            vec![1.0, 0.5, 0.0, 1.0, 0.5, 0.0]
        );
    }

    /// The PNG decodes at the size the layout gives: a header band, `rows` rows of cells with two
    /// caption lines, a legend; columns = the image and one per head.
    #[test]
    fn the_png_has_one_row_per_image_and_one_column_per_head() {
        let d = tmp("png");
        let ck = tiny_checkpoint(&d);
        let out = d.join("maps.png");
        let s = show_align(&opts(&ck, 2), &out).unwrap();
        assert_eq!((s.rows, s.cols), (2, 5));
        let back = crate::data::decode::decode(&std::fs::read(&out).unwrap()).unwrap();
        // 64 px input, cells 192 px (x3); 4 + 5 * 196 wide; header 16, rows 192 + 22 + 4, legend.
        let legend = wrap(LEGEND, (4 + 5 * 196 - 4) / 8).len();
        assert_eq!(back.w, 4 + 5 * 196);
        assert_eq!(back.h, 8 + 2 * 4 + 2 * (192 + 22 + 4) + legend * 10 + 4);
        assert_eq!(back.data, s.image.data);
        std::fs::remove_dir_all(&d).unwrap();
    }

    /// Bad input is one line and a user error (exit 2): an exported backbone (no neck), a missing
    /// file, --count 0, heads that do not divide the channels, missing data.
    #[test]
    fn bad_input_is_one_line() {
        let d = tmp("bad");
        let ck = tiny_checkpoint(&d);
        let t = checkpoint::read_file(&ck).unwrap();
        let bb: checkpoint::Tensors = t
            .into_iter()
            .filter_map(|(n, o)| {
                n.strip_prefix("online_net.backbone.")
                    .map(|s| (s.to_string(), o))
            })
            .collect();
        let exported = d.join("backbone.safetensors");
        checkpoint::write_file_atomic(&exported, &bb, None).unwrap();
        let err = |o: AlignOptions| {
            let e = render(&o).err().expect("should fail");
            assert_eq!(e.exit_code(), 2, "{e}");
            assert!(!e.to_string().contains('\n'));
            e.to_string()
        };
        let e = err(opts(&exported, 2));
        assert!(e.ends_with("has no LEWEL neck (online_net.neck.proj.*): show-align needs a full LEWEL checkpoint, not an exported backbone"), "{e}");
        assert!(err(opts(&d.join("missing.safetensors"), 2)).contains("missing.safetensors"));
        assert!(err(opts(&ck, 0)).starts_with("--count"));
        let mut o = opts(&ck, 1);
        o.heads = Some(3);
        assert!(err(o).starts_with("--lewel-num-heads"));
        let mut o = opts(&ck, 1);
        o.data = d.join("nothing-here");
        assert!(err(o).contains("nothing-here"));
        std::fs::remove_dir_all(&d).unwrap();
    }
}
