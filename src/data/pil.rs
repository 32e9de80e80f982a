//! The image operations of LEWEL's augmentation with PIL's arithmetic, bit for bit (LEWEL_SPEC 5.2):
//! torchvision ~0.9 runs them on PIL uint8 images, and every op rounds back to uint8, so matching
//! PIL's integer and float steps exactly is what makes our views the official ones. Images are RGB,
//! u8, (H, W, 3) row-major. What each op reproduces:
//!
//! - **resize** (PIL `Image.resize(..., BILINEAR)`): separable, horizontal pass first, each pass
//!   rounding to u8. Per output pixel the triangle filter is widened by the downscale factor
//!   (antialiasing); the weights are normalized in f64, then fixed-point with 22 fraction bits, and
//!   the sum starts at half a unit (round half up) before the shift and clamp.
//! - **blend** (`Image.blend`, behind brightness, contrast and saturation): `in1 + alpha*(in2-in1)`
//!   in f32, truncated toward zero, clamped to [0, 255] when extrapolating.
//! - **luma** (`convert("L")`): (19595 R + 38470 G + 7471 B + 32768) >> 16.
//! - **contrast**: the degenerate image is the luma mean of the whole image, `int(mean + 0.5)`.
//! - **hue** (torchvision's `adjust_hue` for PIL): PIL's 8-bit HSV (with its f32/f64 steps), the
//!   hue channel shifted by `trunc(h*255)` with u8 wrap-around, back to RGB.
//! - **gaussian blur** (`ImageFilter.GaussianBlur(radius)`): PIL's extended box blur, three
//!   horizontal then three vertical passes of a box of fractional radius, fixed point with 24
//!   fraction bits, edges replicated, u8 after each pass.
//! - **solarize** (`ImageOps.solarize(img, 128)`), **grayscale**, **flip**, **crop**.

/// An RGB u8 image, (H, W, 3).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rgb8 {
    pub w: usize,
    pub h: usize,
    pub data: Vec<u8>,
}

impl Rgb8 {
    pub fn new(w: usize, h: usize, px: Vec<u8>) -> Rgb8 {
        assert_eq!(
            px.len(),
            w * h * 3,
            "Rgb8: {w}x{h} needs {} bytes",
            w * h * 3
        );
        Rgb8 { w, h, data: px }
    }
}

/// PIL's ITU-R 601-2 luma.
#[inline]
pub fn luma(r: u8, g: u8, b: u8) -> u8 {
    ((r as u32 * 19595 + g as u32 * 38470 + b as u32 * 7471 + 0x8000) >> 16) as u8
}

/// `Image.blend(a, b, alpha)` for one value.
#[inline]
fn blend1(a: u8, b: u8, alpha: f32) -> u8 {
    let v = a as i32 as f32 + alpha * (b as i32 - a as i32) as f32;
    if (0.0..=1.0).contains(&alpha) {
        v as u8
    } else if v <= 0.0 {
        0
    } else if v >= 255.0 {
        255
    } else {
        v as u8
    }
}

/// `ImageEnhance.Brightness(img).enhance(f)`: a blend with black.
pub fn brightness(img: &mut Rgb8, f: f32) {
    if f == 1.0 {
        return;
    }
    for v in img.data.iter_mut() {
        *v = blend1(0, *v, f);
    }
}

/// `ImageEnhance.Contrast(img).enhance(f)`: a blend with the image's mean luma, rounded.
pub fn contrast(img: &mut Rgb8, f: f32) {
    let n = (img.w * img.h) as f64;
    let sum: u64 = img
        .data
        .chunks_exact(3)
        .map(|p| luma(p[0], p[1], p[2]) as u64)
        .sum();
    let mean = (sum as f64 / n + 0.5) as i64 as u8;
    if f == 1.0 {
        return;
    }
    for v in img.data.iter_mut() {
        *v = blend1(mean, *v, f);
    }
}

/// `ImageEnhance.Color(img).enhance(f)`: a blend with the per-pixel luma.
pub fn saturation(img: &mut Rgb8, f: f32) {
    if f == 1.0 {
        return;
    }
    for p in img.data.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        for v in p.iter_mut() {
            *v = blend1(l, *v, f);
        }
    }
}

/// torchvision's RandomGrayscale / rgb_to_grayscale(3 channels) on PIL: the luma, three times.
pub fn grayscale(img: &mut Rgb8) {
    for p in img.data.chunks_exact_mut(3) {
        let l = luma(p[0], p[1], p[2]);
        p.fill(l);
    }
}

/// `ImageOps.solarize(img, 128)`.
pub fn solarize(img: &mut Rgb8) {
    for v in img.data.iter_mut() {
        if *v >= 128 {
            *v = 255 - *v;
        }
    }
}

/// Left-right flip.
pub fn hflip(img: &mut Rgb8) {
    for row in img.data.chunks_exact_mut(img.w * 3) {
        flip_row(row);
    }
}

/// One row of RGB pixels mirrored in place.
fn flip_row(row: &mut [u8]) {
    let w = row.len() / 3;
    for x in 0..w / 2 {
        for c in 0..3 {
            row.swap(x * 3 + c, (w - 1 - x) * 3 + c);
        }
    }
}

/// `img.crop((left, top, left + w, top + h))`, inside the image.
pub fn crop(img: &Rgb8, top: usize, left: usize, h: usize, w: usize) -> Rgb8 {
    assert!(
        top + h <= img.h && left + w <= img.w,
        "crop outside the image"
    );
    let mut px = Vec::with_capacity(w * h * 3);
    for y in top..top + h {
        let r = (y * img.w + left) * 3;
        px.extend_from_slice(&img.data[r..r + w * 3]);
    }
    Rgb8::new(w, h, px)
}

/// PIL's 8-bit RGB -> HSV of one pixel.
fn rgb_to_hsv(r: u8, g: u8, b: u8) -> [u8; 3] {
    let maxc = r.max(g).max(b);
    let minc = r.min(g).min(b);
    if maxc == minc {
        return [0, 0, maxc];
    }
    let cr = (maxc - minc) as f32;
    let s = cr / maxc as f32;
    let rc = (maxc - r) as f32 / cr;
    let gc = (maxc - g) as f32 / cr;
    let bc = (maxc - b) as f32 / cr;
    // The C code mixes float variables with double constants: these casts follow it.
    let h: f32 = if r == maxc {
        bc - gc
    } else if g == maxc {
        (2.0 + rc as f64 - bc as f64) as f32
    } else {
        (4.0 + gc as f64 - rc as f64) as f32
    };
    let h = ((h as f64 / 6.0 + 1.0) % 1.0) as f32;
    let clip = |v: i32| v.clamp(0, 255) as u8;
    [
        clip((h as f64 * 255.0) as i32),
        clip((s as f64 * 255.0) as i32),
        maxc,
    ]
}

/// Python's `round`: half to even.
pub fn round_half_even(v: f64) -> f64 {
    let r = v.round();
    if (v - v.trunc()).abs() == 0.5 {
        2.0 * (v / 2.0).round()
    } else {
        r
    }
}

/// C's `round`: half away from zero (Rust's f64::round does the same).
fn c_round(v: f64) -> i32 {
    v.round() as i32
}

/// PIL's 8-bit HSV -> RGB of one pixel.
fn hsv_to_rgb(h: u8, s: u8, v: u8) -> [u8; 3] {
    if s == 0 {
        return [v, v, v];
    }
    let hf = h as f32 as f64 * 6.0 / 255.0;
    let i = hf.floor() as i32;
    let f = (hf - i as f32 as f64) as f32;
    let fs = (s as f32 as f64 / 255.0) as f32;
    let vf = v as f32 as f64;
    let clip = |x: i32| x.clamp(0, 255) as u8;
    let p = clip(c_round(vf * (1.0 - fs as f64)));
    let q = clip(c_round(vf * (1.0 - (fs * f) as f64)));
    let t = clip(c_round(vf * (1.0 - fs as f64 * (1.0 - f as f64))));
    match i % 6 {
        0 => [v, t, p],
        1 => [q, v, p],
        2 => [p, v, t],
        3 => [p, q, v],
        4 => [t, p, v],
        _ => [v, p, q],
    }
}

/// The shift `adjust_hue(img, h)` adds to PIL's 8-bit hue: numpy's uint8 cast of trunc(h * 255),
/// so negative shifts wrap around.
pub fn hue_shift(h: f64) -> u8 {
    ((h * 255.0) as i64).rem_euclid(256) as u8
}

/// torchvision's `adjust_hue(img, h)` for PIL images, h in [-0.5, 0.5].
pub fn hue(img: &mut Rgb8, h: f64) {
    let shift = hue_shift(h);
    for p in img.data.chunks_exact_mut(3) {
        let [hh, s, v] = rgb_to_hsv(p[0], p[1], p[2]);
        let rgb = hsv_to_rgb(hh.wrapping_add(shift), s, v);
        p.copy_from_slice(&rgb);
    }
}

// ---- Resize

const PRECISION_BITS: u32 = 32 - 8 - 2;

/// Per output index: the first input index, the number of taps, and fixed-point weights
/// (`ksize` slots per output, the unused ones zero).
struct Coeffs {
    start: Vec<usize>,
    len: Vec<usize>,
    k: Vec<i32>,
    ksize: usize,
}

/// PIL's bilinear coefficients for resizing `in_size` to `out_size` (box 0..in_size).
fn coeffs(in_size: usize, out_size: usize) -> Coeffs {
    let scale = (in_size as f32 as f64) / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = filterscale; // the triangle's support is 1, widened when downscaling
    let ss = 1.0 / filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut c = Coeffs {
        start: Vec::with_capacity(out_size),
        len: Vec::with_capacity(out_size),
        k: vec![0; out_size * ksize],
        ksize,
    };
    let mut w = Vec::with_capacity(ksize);
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        w.clear();
        w.extend((xmin..xmax).map(|x| {
            let d = ((x as f64 - center + 0.5) * ss).abs();
            if d < 1.0 {
                1.0 - d
            } else {
                0.0
            }
        }));
        let total: f64 = w.iter().sum();
        for (slot, &k) in c.k[xx * ksize..].iter_mut().zip(&w) {
            let k = if total != 0.0 { k / total } else { k };
            let v = k * (1u32 << PRECISION_BITS) as f64;
            *slot = if k < 0.0 {
                (v - 0.5) as i32
            } else {
                (v + 0.5) as i32
            };
        }
        c.start.push(xmin);
        c.len.push(xmax - xmin);
    }
    c
}

#[inline]
fn clip8(ss: i32) -> u8 {
    (ss >> PRECISION_BITS).clamp(0, 255) as u8
}

const HALF: i32 = 1 << (PRECISION_BITS - 1);

/// Rows `top..top + h`, columns `left..left + w` of an image: where a resize reads its input.
#[derive(Clone, Copy)]
struct Window<'a> {
    data: &'a [u8],
    /// Bytes per image row.
    stride: usize,
    top: usize,
    left: usize,
    w: usize,
    h: usize,
}

impl Window<'_> {
    fn row(&self, y: usize) -> &[u8] {
        let r = (self.top + y) * self.stride + self.left * 3;
        &self.data[r..r + self.w * 3]
    }
}

/// Whether the resize may use the CPU's vector units (AVX2 on x86-64); on by default. Both paths
/// give the same bytes; turning it off is for benchmarks that time the scalar code beside it.
static VECTOR: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(true);

/// Allows (the default) or forbids the vector resize; returns the previous setting.
pub fn set_vector_resize(on: bool) -> bool {
    VECTOR.swap(on, std::sync::atomic::Ordering::Relaxed)
}

#[cfg(target_arch = "x86_64")]
fn avx2() -> bool {
    VECTOR.load(std::sync::atomic::Ordering::Relaxed) && std::arch::is_x86_feature_detected!("avx2")
}

/// The horizontal pass: every row of `src` to `w` wide, the output mirrored if `flip` (flipping
/// commutes with the vertical pass, so this is `hflip` after the resize). AVX2 when the CPU has it;
/// the integer sums are exact, so both paths give the same bytes.
fn resize_rows(src: Window, w: usize, c: &Coeffs, flip: bool, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { x86::resize_rows_avx2(src, w, c, flip, out) };
        return;
    }
    resize_rows_scalar(src, w, c, flip, out)
}

fn resize_rows_scalar(src: Window, w: usize, c: &Coeffs, flip: bool, out: &mut [u8]) {
    for (y, orow) in out.chunks_exact_mut(w * 3).enumerate().take(src.h) {
        let row = src.row(y);
        for xx in 0..w {
            let (s, n) = (c.start[xx], c.len[xx]);
            let k = &c.k[xx * c.ksize..xx * c.ksize + n];
            let taps = &row[s * 3..(s + n) * 3];
            let (mut a0, mut a1, mut a2) = (HALF, HALF, HALF);
            for (p, &wt) in taps.chunks_exact(3).zip(k) {
                a0 += p[0] as i32 * wt;
                a1 += p[1] as i32 * wt;
                a2 += p[2] as i32 * wt;
            }
            let ox = if flip { w - 1 - xx } else { xx };
            orow[ox * 3..ox * 3 + 3].copy_from_slice(&[clip8(a0), clip8(a1), clip8(a2)]);
        }
    }
}

/// The vertical pass: `src` (rows of `row` bytes) to h rows, whole rows at a time.
fn resize_cols_body(src: &[u8], row: usize, h: usize, c: &Coeffs, out: &mut [u8]) {
    let mut acc = vec![0i32; row];
    for yy in 0..h {
        acc.fill(HALF);
        let (s, n) = (c.start[yy], c.len[yy]);
        for (t, &wt) in c.k[yy * c.ksize..yy * c.ksize + n].iter().enumerate() {
            let r = &src[(s + t) * row..(s + t + 1) * row];
            for (a, &p) in acc.iter_mut().zip(r) {
                *a += p as i32 * wt;
            }
        }
        for (o, &a) in out[yy * row..(yy + 1) * row].iter_mut().zip(&acc) {
            *o = clip8(a);
        }
    }
}

/// The vertical pass, with AVX2 when the CPU has it (the same integer arithmetic).
fn resize_cols(src: &[u8], row: usize, h: usize, c: &Coeffs, out: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if avx2() {
        // SAFETY: the CPU supports AVX2, checked just above.
        unsafe { x86::resize_cols_avx2(src, row, h, c, out) };
        return;
    }
    resize_cols_body(src, row, h, c, out)
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Coeffs, Window, HALF, PRECISION_BITS};
    use std::arch::x86_64::*;

    /// The vertical pass: per output row, 32 bytes at a time, the taps' rows widened to i32,
    /// multiplied by their weights and summed in registers (the scalar pass's sums), then rounded,
    /// clamped by the saturating packs and stored; the row's last bytes as the scalar pass.
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn resize_cols_avx2(
        src: &[u8],
        row: usize,
        h: usize,
        c: &Coeffs,
        out: &mut [u8],
    ) {
        assert!(out.len() >= h * row);
        let half = _mm256_set1_epi32(HALF);
        let widen = |p: *const u8| _mm256_cvtepu8_epi32(_mm_loadl_epi64(p as *const __m128i));
        for yy in 0..h {
            let (s, n) = (c.start[yy], c.len[yy]);
            let k = &c.k[yy * c.ksize..yy * c.ksize + n];
            assert!((s + n) * row <= src.len());
            let base = src.as_ptr().add(s * row);
            let o = out.as_mut_ptr().add(yy * row);
            let mut x = 0;
            while x + 32 <= row {
                let mut a = [half; 4];
                for (t, &wt) in k.iter().enumerate() {
                    // SAFETY: x + 32 <= row and s + n rows lie in src (asserted).
                    let p = base.add(t * row + x);
                    let w = _mm256_set1_epi32(wt);
                    for (j, a) in a.iter_mut().enumerate() {
                        *a = _mm256_add_epi32(*a, _mm256_mullo_epi32(widen(p.add(8 * j)), w));
                    }
                }
                let a = a.map(|v| _mm256_srai_epi32::<{ PRECISION_BITS as i32 }>(v));
                // packs work within 128-bit lanes: restore the order with one permute each.
                let lo = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a[0], a[1]));
                let hi = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packs_epi32(a[2], a[3]));
                let b = _mm256_permute4x64_epi64::<0b11_01_10_00>(_mm256_packus_epi16(lo, hi));
                // SAFETY: x + 32 <= row, and the output holds h rows (asserted).
                _mm256_storeu_si256(o.add(x) as *mut __m256i, b);
                x += 32;
            }
            for x in x..row {
                let mut a = HALF;
                for (t, &wt) in k.iter().enumerate() {
                    a += src[(s + t) * row + x] as i32 * wt;
                }
                out[yy * row + x] = super::clip8(a);
            }
        }
    }

    /// Rows the horizontal pass computes together.
    const ROWS: usize = 4;

    /// The horizontal pass, `ROWS` rows at a time. Per output pixel, four taps at a time: the 16
    /// bytes at the group's first tap are loaded into both 128-bit lanes, and two in-lane byte
    /// shuffles spread them to four (R, G, B, 0) pixels of i32 (taps 0 and 1, taps 2 and 3), each
    /// multiplied by its tap's weight (zero past the last tap); the two 128-bit halves of the sum
    /// are the pixel's (R, G, B, 0) sums, exactly the scalar pass's. Four output pixels are
    /// rounded, clamped and packed together into one 12-byte store (reversed when flipping); the
    /// rest one at a time. The rows share each weight load and index lookup, and their
    /// independent sums overlap the multiplies' latency: the two crops of an image took 0.57 ms
    /// against 0.82 one row at a time (medians of 8 alternating runs, benches/README.md).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn resize_rows_avx2(
        src: Window,
        w: usize,
        c: &Coeffs,
        flip: bool,
        out: &mut [u8],
    ) {
        // Per output pixel, per group of four taps: [k0; 4] [k1; 4] [k2; 4] [k3; 4].
        let mut first = Vec::with_capacity(w + 1);
        let mut wk: Vec<i32> = Vec::new();
        for xx in 0..w {
            first.push(wk.len());
            let k = &c.k[xx * c.ksize..xx * c.ksize + c.len[xx]];
            for g in 0..k.len().div_ceil(4) {
                for t in 0..4 {
                    wk.extend([k.get(g * 4 + t).copied().unwrap_or(0); 4]);
                }
            }
        }
        first.push(wk.len());
        // Bytes to i32 lanes: (R, G, B, 0) of taps 0 and 1 in the low and high lanes, then of
        // taps 2 and 3.
        let z = -1i8;
        let taps01 = _mm256_setr_epi8(
            0, z, z, z, 1, z, z, z, 2, z, z, z, z, z, z, z, 3, z, z, z, 4, z, z, z, 5, z, z, z, z,
            z, z, z,
        );
        let taps23 = _mm256_setr_epi8(
            6, z, z, z, 7, z, z, z, 8, z, z, z, z, z, z, z, 9, z, z, z, 10, z, z, z, 11, z, z, z,
            z, z, z, z,
        );
        let compact = _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1);
        let reverse = _mm_setr_epi8(12, 13, 14, 8, 9, 10, 4, 5, 6, 0, 1, 2, -1, -1, -1, -1);
        let half = _mm_set1_epi32(HALF);
        // (sum + half) >> 22 of output pixel xx as i32 (R, G, B, 0), of the ROWS rows at `rows`
        // (the last real row repeated past the image's end): the weights are loaded once for all.
        let pixel = |rows: [*const u8; ROWS], xx: usize| -> [__m128i; ROWS] {
            let mut acc = [_mm256_setzero_si256(); ROWS];
            for g in 0..(first[xx + 1] - first[xx]) / 16 {
                let at = (c.start[xx] + 4 * g) * 3;
                // SAFETY: each row pointer has the row's bytes plus 16 readable after it (the
                // caller's check), and at <= the row's bytes - 3, so the load ends within; the
                // weights hold 16 values per group.
                let wp = wk.as_ptr().add(first[xx] + 16 * g);
                let (w01, w23) = (
                    _mm256_loadu_si256(wp as *const __m256i),
                    _mm256_loadu_si256(wp.add(8) as *const __m256i),
                );
                for (a, &r) in acc.iter_mut().zip(&rows) {
                    let v =
                        _mm256_broadcastsi128_si256(_mm_loadu_si128(r.add(at) as *const __m128i));
                    let lo = _mm256_mullo_epi32(_mm256_shuffle_epi8(v, taps01), w01);
                    let hi = _mm256_mullo_epi32(_mm256_shuffle_epi8(v, taps23), w23);
                    *a = _mm256_add_epi32(*a, _mm256_add_epi32(lo, hi));
                }
            }
            acc.map(|acc| {
                let a = _mm_add_epi32(
                    _mm256_castsi256_si128(acc),
                    _mm256_extracti128_si256::<1>(acc),
                );
                _mm_srai_epi32::<{ PRECISION_BITS as i32 }>(_mm_add_epi32(a, half))
            })
        };
        let row_bytes = src.w * 3;
        // The last group's load may reach 13 bytes past a row. A row is read in place when 16
        // bytes past its end are still in the image (bytes 12-15 of a load are never used, and
        // taps past a pixel's last one have weight 0); else from a copy with 16 bytes of slack.
        let in_place =
            |y: usize| (src.top + y) * src.stride + src.left * 3 + row_bytes + 16 <= src.data.len();
        let mut lines: [Vec<u8>; ROWS] = std::array::from_fn(|_| vec![0u8; row_bytes + 16]);
        let (wb, hb) = (w * 3, src.h);
        let mut y = 0;
        while y < hb {
            // Rows y..y + n of the output; the pointers past n repeat row y + n - 1.
            let n = (hb - y).min(ROWS);
            let mut rows = [std::ptr::null(); ROWS];
            for (k, line) in lines.iter_mut().enumerate() {
                let yy = y + k.min(n - 1);
                rows[k] = if in_place(yy) {
                    src.row(yy).as_ptr()
                } else {
                    line[..row_bytes].copy_from_slice(src.row(yy));
                    line.as_ptr()
                };
            }
            let mut xx = 0;
            // The saturating packs clamp to [0, 255], as clip8.
            while xx + 4 <= w {
                let (a0, a1) = (pixel(rows, xx), pixel(rows, xx + 1));
                let (a2, a3) = (pixel(rows, xx + 2), pixel(rows, xx + 3));
                for k in 0..n {
                    let orow = &mut out[(y + k) * wb..][..wb];
                    let b = _mm_packus_epi16(
                        _mm_packs_epi32(a0[k], a1[k]),
                        _mm_packs_epi32(a2[k], a3[k]),
                    );
                    let (v, at) = if flip {
                        (_mm_shuffle_epi8(b, reverse), w - 4 - xx)
                    } else {
                        (_mm_shuffle_epi8(b, compact), xx)
                    };
                    let mut bytes = [0u8; 16];
                    _mm_storeu_si128(bytes.as_mut_ptr() as *mut __m128i, v);
                    orow[at * 3..at * 3 + 12].copy_from_slice(&bytes[..12]);
                }
                xx += 4;
            }
            for xx in xx..w {
                let a = pixel(rows, xx);
                let ox = if flip { w - 1 - xx } else { xx };
                for k in 0..n {
                    let orow = &mut out[(y + k) * wb..][..wb];
                    let p = _mm_packus_epi16(_mm_packs_epi32(a[k], a[k]), a[k]);
                    let px = (_mm_cvtsi128_si32(p) as u32).to_le_bytes();
                    orow[ox * 3..ox * 3 + 3].copy_from_slice(&px[..3]);
                }
            }
            y += n;
        }
    }
}

/// `img.crop((left, top, left + w, top + h)).resize((w_out, h_out), Image.BILINEAR)`, then
/// mirrored if `flip`, without copying the crop first.
pub fn resized_crop(
    img: &Rgb8,
    rect: (usize, usize, usize, usize),
    (w_out, h_out): (usize, usize),
    flip: bool,
) -> Rgb8 {
    let mut px = vec![0u8; w_out * h_out * 3];
    resized_crop_into(img, rect, (w_out, h_out), flip, &mut px);
    Rgb8::new(w_out, h_out, px)
}

/// `resized_crop` into `out` (h_out rows of w_out RGB pixels), e.g. straight into a batch.
pub fn resized_crop_into(
    img: &Rgb8,
    (top, left, h, w): (usize, usize, usize, usize),
    (w_out, h_out): (usize, usize),
    flip: bool,
    out: &mut [u8],
) {
    assert!(
        top + h <= img.h && left + w <= img.w,
        "crop outside the image"
    );
    assert_eq!(
        out.len(),
        w_out * h_out * 3,
        "resized_crop_into: output size"
    );
    let src = Window {
        data: &img.data,
        stride: img.w * 3,
        top,
        left,
        w,
        h,
    };
    // The horizontal pass (or the crop's rows, when the width stays) goes straight to `out` when
    // the height stays; else to a buffer the vertical pass reads.
    let horizontal = |dst: &mut [u8]| {
        if w_out != w {
            resize_rows(src, w_out, &coeffs(w, w_out), flip, dst);
            return;
        }
        for (y, row) in dst.chunks_exact_mut(w * 3).enumerate() {
            row.copy_from_slice(src.row(y));
            if flip {
                flip_row(row);
            }
        }
    };
    if h_out == h {
        horizontal(out);
    } else {
        let mut cur = vec![0u8; w_out * h * 3];
        horizontal(&mut cur);
        resize_cols(&cur, w_out * 3, h_out, &coeffs(h, h_out), out);
    }
}

/// `img.resize((w, h), Image.BILINEAR)`.
pub fn resize(img: &Rgb8, w: usize, h: usize) -> Rgb8 {
    resized_crop(img, (0, 0, img.h, img.w), (w, h), false)
}

// ---- Gaussian blur

/// The fractional box radius of one of `passes` passes that together approximate a Gaussian of
/// standard deviation `sigma` (Gwosdek et al. 2011), in PIL's f32 steps.
pub fn box_radius(sigma: f32, passes: u32) -> f32 {
    let sigma2 = sigma * sigma / passes as f32;
    let l_len = (12.0 * sigma2 as f64 + 1.0).sqrt() as f32;
    let l = ((l_len as f64 - 1.0) / 2.0).floor() as f32;
    let mut a = (2.0 * l + 1.0) * (l * (l + 1.0) - 3.0 * sigma2);
    a /= 6.0 * (sigma2 - (l + 1.0) * (l + 1.0));
    l + a
}

/// A box of fractional radius as PIL weighs it: the integer radius r, the 24-bit weight of each
/// of the 2r+1 inner taps and that of each of the two outer taps.
pub fn box_weights(radius: f32) -> (u32, u32, u32) {
    let r = radius as u32;
    let ww = ((1u32 << 24) as f32 / (radius * 2.0 + 1.0)) as u32;
    let fw = ((1u32 << 24) - (r * 2 + 1) * ww) / 2;
    (r, ww, fw)
}

/// The blur's passes per direction (PIL's default).
pub const BLUR_PASSES: u32 = 3;

/// One box pass of fractional radius over a line of `n` values `stride` apart, in place. The
/// integer part covers 2r+1 taps at weight ww, the fraction weighs the two next taps at fw; all in
/// 24-bit fixed point, rounded to u8; indices outside the line take the edge value.
fn box_line(line: &mut [u8], tmp: &mut Vec<u8>, n: usize, stride: usize, radius: f32) {
    let (r, ww, fw) = box_weights(radius);
    let r = r as i64;
    tmp.clear();
    tmp.extend((0..n).map(|i| line[i * stride]));
    let last = n as i64 - 1;
    let at = |i: i64| tmp[i.clamp(0, last) as usize] as u32;
    // A running sum of the 2r+1 taps around x.
    let mut acc: u32 = (-r - 1..r).map(at).sum();
    for x in 0..n as i64 {
        acc = acc.wrapping_add(at(x + r)).wrapping_sub(at(x - r - 1));
        let bulk = acc
            .wrapping_mul(ww)
            .wrapping_add((at(x - r - 1) + at(x + r + 1)).wrapping_mul(fw));
        line[x as usize * stride] = ((bulk.wrapping_add(1 << 23)) >> 24) as u8;
    }
}

/// `img.filter(ImageFilter.GaussianBlur(radius=sigma))`: three horizontal box passes, then three
/// vertical ones.
pub fn gaussian_blur(img: &mut Rgb8, sigma: f32) {
    const PASSES: u32 = BLUR_PASSES;
    let radius = box_radius(sigma, PASSES);
    if radius == 0.0 {
        return;
    }
    let (w, h) = (img.w, img.h);
    let mut tmp = Vec::new();
    for y in 0..h {
        for ch in 0..3 {
            let line = &mut img.data[y * w * 3 + ch..];
            for _ in 0..PASSES {
                box_line(line, &mut tmp, w, 3, radius);
            }
        }
    }
    for x in 0..w {
        for ch in 0..3 {
            let line = &mut img.data[x * 3 + ch..];
            for _ in 0..PASSES {
                box_line(line, &mut tmp, h, w * 3, radius);
            }
        }
    }
}

/// ToTensor then Normalize, kept (H, W, 3): ((v / 255) - mean) / std in f32, as torchvision.
pub fn normalize(img: &Rgb8, out: &mut [f32]) {
    assert_eq!(out.len(), img.data.len());
    for (o, p) in out.chunks_exact_mut(3).zip(img.data.chunks_exact(3)) {
        for c in 0..3 {
            o[c] = (p[c] as f32 / 255.0 - super::MEAN[c]) / super::STD[c];
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use safetensors::SafeTensors;

    /// tests/fixtures/pil/ops.safetensors (made by tests/parity/make_pil_fixtures.py).
    pub(crate) struct Fx {
        bytes: Vec<u8>,
    }

    impl Fx {
        pub(crate) fn load() -> Fx {
            let p = concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/pil/ops.safetensors"
            );
            Fx {
                bytes: std::fs::read(p).expect("tests/fixtures/pil/ops.safetensors"),
            }
        }
        pub(crate) fn st(&self) -> SafeTensors<'_> {
            SafeTensors::deserialize(&self.bytes).unwrap()
        }
        pub(crate) fn img(&self, name: &str) -> Rgb8 {
            let st = self.st();
            let t = st.tensor(name).unwrap_or_else(|_| panic!("fixture {name}"));
            let s = t.shape();
            Rgb8::new(s[1], s[0], t.data().to_vec())
        }
        pub(crate) fn f32(&self, name: &str) -> Vec<f32> {
            let st = self.st();
            let d = st.tensor(name).unwrap().data().to_vec();
            d.chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
        pub(crate) fn f64s(&self, name: &str) -> Vec<f64> {
            let st = self.st();
            st.tensor(name)
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect()
        }
        pub(crate) fn f64(&self, name: &str) -> f64 {
            let st = self.st();
            f64::from_le_bytes(st.tensor(name).unwrap().data()[..8].try_into().unwrap())
        }
        pub(crate) fn i64s(&self, name: &str) -> Vec<usize> {
            let st = self.st();
            st.tensor(name)
                .unwrap()
                .data()
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as usize)
                .collect()
        }
        pub(crate) fn count(&self, prefix: &str) -> usize {
            self.st()
                .names()
                .iter()
                .filter(|n| n.starts_with(prefix) && !n.ends_with(".f") && !n.ends_with(".p"))
                .count()
        }
    }

    /// Bit-exact, or a message with the first differing pixel and how many differ.
    fn same(name: &str, got: &Rgb8, want: &Rgb8) {
        assert_eq!((got.w, got.h), (want.w, want.h), "{name}: size");
        let diff: Vec<usize> = (0..got.data.len())
            .filter(|&i| got.data[i] != want.data[i])
            .collect();
        if let Some(&i) = diff.first() {
            panic!(
                "{name}: {} of {} values differ; first at pixel ({}, {}) channel {}: {} vs PIL {}",
                diff.len(),
                got.data.len(),
                (i / 3) % got.w,
                i / 3 / got.w,
                i % 3,
                got.data[i],
                want.data[i]
            );
        }
    }

    #[test]
    fn luma_matches_the_fixed_point_formula_at_the_corners() {
        assert_eq!(luma(255, 255, 255), 255);
        assert_eq!(luma(0, 0, 0), 0);
        assert_eq!(luma(255, 0, 0), 76);
        assert_eq!(luma(0, 255, 0), 150);
        assert_eq!(luma(0, 0, 255), 29);
    }

    #[test]
    fn color_ops_match_pil_bit_for_bit() {
        let fx = Fx::load();
        let small = fx.img("small");
        type Op = fn(&mut Rgb8, f32);
        let ops: [(&str, Op); 3] = [
            ("brightness", brightness),
            ("contrast", contrast),
            ("saturation", saturation),
        ];
        for (name, op) in ops {
            let n = fx.count(&format!("{name}."));
            assert!(n >= 3, "{name}: fixtures missing");
            for k in 0..n {
                let f = fx.f32(&format!("{name}.{k}.f"))[0];
                let mut got = small.clone();
                op(&mut got, f);
                same(
                    &format!("{name}({f})"),
                    &got,
                    &fx.img(&format!("{name}.{k}")),
                );
            }
        }
        for k in 0..fx.count("hue.") {
            let h = fx.f64(&format!("hue.{k}.f"));
            let mut got = small.clone();
            hue(&mut got, h);
            same(&format!("hue({h})"), &got, &fx.img(&format!("hue.{k}")));
        }
        let mut g = small.clone();
        grayscale(&mut g);
        same("grayscale", &g, &fx.img("grayscale"));
        let mut s = small.clone();
        solarize(&mut s);
        same("solarize", &s, &fx.img("solarize"));
        let mut f = small.clone();
        hflip(&mut f);
        same("hflip", &f, &fx.img("hflip"));
    }

    #[test]
    fn gaussian_blur_matches_pil_bit_for_bit() {
        let fx = Fx::load();
        let n = fx.count("blur.");
        assert!(n >= 5);
        for k in 0..n {
            let s = fx.f32(&format!("blur.{k}.f"))[0];
            for img in ["small", "big"] {
                let name = if img == "small" {
                    format!("blur.{k}")
                } else {
                    format!("blur_big.{k}")
                };
                if fx.st().tensor(&name).is_err() {
                    continue;
                }
                let mut got = fx.img(img);
                gaussian_blur(&mut got, s);
                same(&format!("{img} blur({s})"), &got, &fx.img(&name));
            }
        }
    }

    #[test]
    fn resized_crop_and_eval_transform_match_pil_bit_for_bit() {
        let fx = Fx::load();
        let big = fx.img("big");
        let n = fx.count("resized_crop.");
        assert!(n >= 6);
        for k in 0..n {
            let p = fx.i64s(&format!("resized_crop.{k}.p"));
            let want = fx.img(&format!("resized_crop.{k}"));
            let got = resize(&crop(&big, p[0], p[1], p[2], p[3]), p[5], p[4]);
            same(&format!("resize of crop {p:?}"), &got, &want);
            // The fused crop + resize (+ flip) gives the same bytes.
            let rect = (p[0], p[1], p[2], p[3]);
            let got = resized_crop(&big, rect, (p[5], p[4]), false);
            same(&format!("resized_crop {p:?}"), &got, &want);
            let mut flipped = want.clone();
            hflip(&mut flipped);
            let got = resized_crop(&big, rect, (p[5], p[4]), true);
            same(&format!("resized_crop flipped {p:?}"), &got, &flipped);
        }
        // Shorter side to 40 (long side truncated), then the centre 32x32.
        let (w, h) = (big.w * 40 / big.h, 40);
        let r = resize(&big, w, h);
        let top = round_half_even((h - 32) as f64 / 2.0) as usize;
        let left = round_half_even((w - 32) as f64 / 2.0) as usize;
        same("eval", &crop(&r, top, left, 32, 32), &fx.img("eval"));
    }

    #[test]
    fn a_crop_kept_at_its_size_is_the_crop_itself() {
        // resized_crop's path without a horizontal resize: the window's rows, mirrored if flip.
        let mut r = crate::rng::Rng::new(4);
        let img = Rgb8::new(
            23,
            17,
            (0..23 * 17 * 3).map(|_| r.below(256) as u8).collect(),
        );
        for flip in [false, true] {
            let mut want = crop(&img, 3, 5, 11, 9);
            if flip {
                hflip(&mut want);
            }
            assert_eq!(resized_crop(&img, (3, 5, 11, 9), (9, 11), flip), want);
            let mut into = vec![7u8; 9 * 11 * 3];
            resized_crop_into(&img, (3, 5, 11, 9), (9, 11), flip, &mut into);
            assert_eq!(into, want.data);
        }
    }

    #[test]
    fn vector_and_scalar_resize_passes_agree() {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            let mut r = crate::rng::Rng::new(9);
            let (iw, ih) = (97, 61);
            let data: Vec<u8> = (0..iw * ih * 3).map(|_| r.below(256) as u8).collect();
            // Up- and downscales, 1 to 23 taps, crops touching every edge, every width modulo 4
            // (the vector pass stores four pixels at a time), every height modulo 4 (it computes
            // four rows at a time), rows read in place and from a copy (the image's last rows),
            // both flips.
            for &(top, left, h, w, wo) in &[
                (0, 0, 61, 97, 224),
                (2, 4, 59, 90, 37),
                (0, 0, 61, 97, 9),
                (5, 3, 40, 94, 31),
                (60, 96, 1, 1, 5),
                (0, 50, 61, 47, 47),
                (10, 0, 20, 33, 32),
                (7, 11, 50, 80, 30),
            ] {
                for flip in [false, true] {
                    let src = Window {
                        data: &data,
                        stride: iw * 3,
                        top,
                        left,
                        w,
                        h,
                    };
                    let c = coeffs(w, wo);
                    let (mut a, mut b) = (vec![0u8; wo * h * 3], vec![0u8; wo * h * 3]);
                    resize_rows_scalar(src, wo, &c, flip, &mut a);
                    // SAFETY: AVX2 was detected above.
                    unsafe { x86::resize_rows_avx2(src, wo, &c, flip, &mut b) };
                    assert_eq!(a, b, "rows {top} {left} {h} {w} -> {wo} flip {flip}");
                    let c = coeffs(h, 17);
                    let (mut a2, mut b2) = (vec![0u8; wo * 17 * 3], vec![0u8; wo * 17 * 3]);
                    resize_cols_body(&a, wo * 3, 17, &c, &mut a2);
                    // SAFETY: as above.
                    unsafe { x86::resize_cols_avx2(&a, wo * 3, 17, &c, &mut b2) };
                    assert_eq!(a2, b2, "cols {h} -> 17");
                }
            }
            return;
        }
        println!("skipped: no AVX2 on this CPU, only the scalar resize runs");
    }

    #[test]
    fn round_half_even_is_pythons_round() {
        for (v, r) in [
            (0.5, 0.0),
            (1.5, 2.0),
            (2.5, 2.0),
            (10.5, 10.0),
            (-0.5, -0.0),
            (2.4, 2.0),
        ] {
            assert_eq!(round_half_even(v), r, "{v}");
        }
    }

    #[test]
    fn normalize_matches_torchvision() {
        let fx = Fx::load();
        let small = fx.img("small");
        let mut got = vec![0.0; small.data.len()];
        normalize(&small, &mut got);
        assert_eq!(got, fx.f32("normalized"));
    }
}
