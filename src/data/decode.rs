//! Image decoding to RGB u8, (H, W, 3) row-major, and the few image operations `lewel pack` needs.
//!
//! JPEG goes through zune-jpeg: baseline, progressive, 1-component (replicated to RGB, as PIL's
//! `convert('RGB')`), CMYK and YCCK (Adobe APP14; converted as R = C' * K' / 255 on the stored,
//! inverted values, as PIL does). PNG, BMP and PPM/PGM go through the zune decoders of the same family;
//! alpha is dropped (PIL's `convert('RGB')` of RGBA), 16-bit samples keep their high byte. GIF, TIFF
//! and WebP are recognised by their magic bytes and refused with that name.
//!
//! Truncated or garbage data is an error, never a panic: a JPEG must reach its end-of-image marker
//! (zune, like libjpeg, would fill a short stream with gray; PIL without LOAD_TRUNCATED_IMAGES refuses
//! it, and so do we), and every decoder call runs under `catch_unwind` so that a decoder bug on hostile
//! input is one bad sample, not a crash. Otherwise zune stays in its lenient mode, as libjpeg under PIL
//! is: a few ImageNet files have stray bytes before a marker or a short entropy segment, which libjpeg
//! only warns about ("Corrupt JPEG data: ...") and zune's strict mode would refuse.
//! The format is told by magic bytes, never by the file name (ImageNet has a PNG named .JPEG).

use std::fmt;
use zune_core::bytestream::ZCursor;
use zune_core::colorspace::ColorSpace;
use zune_core::options::DecoderOptions;
use zune_core::result::DecodingResult;

/// A decoded image: `data` is (h, w, 3) row-major RGB (the image type of the whole data path).
pub type RgbImage = super::pil::Rgb8;

/// Why bytes did not decode: one line, no path (the caller knows the path).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DecodeError(pub String);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

/// The error, on one line whatever a decoder's message holds (zune's end with a newline).
fn err<T>(msg: impl Into<String>) -> Result<T, DecodeError> {
    Err(DecodeError(crate::error::one_line(&msg.into())))
}

// ----------------------------------------------------------------------------
// Formats

/// Image container, told by the first bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Jpeg,
    Png,
    Bmp,
    /// PPM / PGM (binary P5, P6; P7).
    Pnm,
    Gif,
    Tiff,
    Webp,
    Unknown,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Jpeg => "JPEG",
            Format::Png => "PNG",
            Format::Bmp => "BMP",
            Format::Pnm => "PPM/PGM",
            Format::Gif => "GIF",
            Format::Tiff => "TIFF",
            Format::Webp => "WebP",
            Format::Unknown => "unknown",
        }
    }
}

pub fn sniff(b: &[u8]) -> Format {
    if b.starts_with(&[0xFF, 0xD8, 0xFF]) {
        Format::Jpeg
    } else if b.starts_with(b"\x89PNG\r\n\x1a\n") {
        Format::Png
    } else if b.starts_with(b"BM") && b.len() >= 26 {
        Format::Bmp
    } else if b.len() >= 3 && b[0] == b'P' && (b'1'..=b'7').contains(&b[1]) {
        Format::Pnm
    } else if b.starts_with(b"GIF87a") || b.starts_with(b"GIF89a") {
        Format::Gif
    } else if b.starts_with(b"II*\0") || b.starts_with(b"MM\0*") {
        Format::Tiff
    } else if b.len() >= 12 && &b[..4] == b"RIFF" && &b[8..12] == b"WEBP" {
        Format::Webp
    } else {
        Format::Unknown
    }
}

/// Runs a decoder call, turning a panic inside it into an error.
fn guarded<T>(what: &str, f: impl FnOnce() -> Result<T, DecodeError>) -> Result<T, DecodeError> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(_) => err(format!("{what} decoder panicked on this input")),
    }
}

// ----------------------------------------------------------------------------
// JPEG

/// What a JPEG's headers say.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct JpegInfo {
    pub w: usize,
    pub h: usize,
    /// 1 (grayscale), 3 (YCbCr or RGB) or 4 (CMYK or YCCK).
    pub components: usize,
    pub colorspace: ColorSpace,
    pub progressive: bool,
}

impl JpegInfo {
    /// Three components that decode straight to RGB (YCbCr, or Adobe's untransformed RGB).
    pub fn is_rgb(&self) -> bool {
        self.components == 3 && matches!(self.colorspace, ColorSpace::YCbCr | ColorSpace::RGB)
    }
    /// "grayscale JPEG", "CMYK JPEG", ... for reports.
    pub fn kind(&self) -> String {
        match (self.components, self.colorspace) {
            (1, _) => "grayscale JPEG".into(),
            (4, ColorSpace::YCCK) => "YCCK JPEG".into(),
            (4, _) => "CMYK JPEG".into(),
            (3, _) => "RGB JPEG".into(),
            (n, _) => format!("{n}-component JPEG"),
        }
    }
}

/// Which library decodes JPEGs (`--jpeg-decoder`): zune-jpeg (pure Rust, always there; within a few
/// levels of PIL) or libjpeg-turbo (loaded at run time; PIL's pixels exactly, faster; turbo.rs).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JpegDecoder {
    Zune,
    LibjpegTurbo,
}

impl std::str::FromStr for JpegDecoder {
    type Err = crate::Error;
    fn from_str(s: &str) -> crate::Result<JpegDecoder> {
        match s {
            "zune" => Ok(JpegDecoder::Zune),
            "libjpeg-turbo" => Ok(JpegDecoder::LibjpegTurbo),
            _ => Err(crate::Error::user(format!(
                "--jpeg-decoder: expected zune or libjpeg-turbo, got '{s}'"
            ))),
        }
    }
}

static DECODER: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Chooses the JPEG decoder of every later decode, on every thread. libjpeg-turbo must load: when
/// it does not, this is one clear error and the choice stays as it was.
pub fn set_jpeg_decoder(d: JpegDecoder) -> crate::Result<()> {
    if d == JpegDecoder::LibjpegTurbo {
        super::turbo::available()
            .map_err(|e| crate::Error::user(format!("--jpeg-decoder: {e}")))?;
    }
    DECODER.store(
        d == JpegDecoder::LibjpegTurbo,
        std::sync::atomic::Ordering::Relaxed,
    );
    Ok(())
}

/// The JPEG decoder in use (zune-jpeg unless `set_jpeg_decoder` chose otherwise).
pub fn jpeg_decoder() -> JpegDecoder {
    if DECODER.load(std::sync::atomic::Ordering::Relaxed) {
        JpegDecoder::LibjpegTurbo
    } else {
        JpegDecoder::Zune
    }
}

fn jpeg_options() -> DecoderOptions {
    DecoderOptions::new_fast().jpeg_set_out_colorspace(ColorSpace::RGB)
}

fn jpeg_headers(b: &[u8]) -> Result<JpegInfo, DecodeError> {
    let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(b), jpeg_options());
    d.decode_headers()
        .or_else(|e| err(format!("bad JPEG headers: {e}")))?;
    let info = d
        .info()
        .ok_or_else(|| DecodeError("JPEG headers missing".into()))?;
    Ok(JpegInfo {
        w: info.width as usize,
        h: info.height as usize,
        components: info.components as usize,
        colorspace: d.input_colorspace().unwrap_or(ColorSpace::Unknown),
        progressive: info.sof.is_progressive(),
    })
}

/// Checks that the marker structure reaches an end-of-image marker: zune (like libjpeg) would fill a
/// stream that stops early with gray, where PIL refuses it ("image file is truncated"). Segments are
/// skipped by their lengths (an EXIF thumbnail's own EOI does not count), entropy-coded data up to the
/// next marker (FF followed by neither 00 nor RSTn); stray bytes between segments are skipped as
/// libjpeg does.
pub fn jpeg_check_complete(b: &[u8]) -> Result<(), DecodeError> {
    let truncated = || err("truncated JPEG (the data ends before the end-of-image marker)");
    let mut p = 2; // after SOI
    loop {
        // next marker: skip stray bytes and FF fill bytes
        while p < b.len() && b[p] != 0xFF {
            p += 1;
        }
        while p < b.len() && b[p] == 0xFF {
            p += 1;
        }
        let Some(&m) = b.get(p) else {
            return truncated();
        };
        p += 1;
        match m {
            0xD9 => return Ok(()),
            0x00 | 0x01 | 0xD0..=0xD8 => continue,
            _ => {}
        }
        let Some(len) = b
            .get(p..p + 2)
            .map(|l| u16::from_be_bytes([l[0], l[1]]) as usize)
        else {
            return truncated();
        };
        p += len;
        if p > b.len() {
            return truncated();
        }
        if m == 0xDA {
            // entropy-coded data: runs to the next FF that is not stuffing (FF 00) or a restart marker
            loop {
                while p < b.len() && b[p] != 0xFF {
                    p += 1;
                }
                match b.get(p + 1) {
                    None => return truncated(),
                    Some(0x00 | 0xD0..=0xD7) => p += 2,
                    Some(_) => break,
                }
            }
        }
    }
}

/// The headers of a JPEG (size, components, colorspace), without decoding the pixels.
pub fn jpeg_info(b: &[u8]) -> Result<JpegInfo, DecodeError> {
    guarded("JPEG", || jpeg_headers(b))
}

/// Decodes a JPEG to RGB.
pub fn decode_jpeg(b: &[u8]) -> Result<RgbImage, DecodeError> {
    decode_jpeg_info(b).map(|(img, _)| img)
}

/// Decodes a JPEG to RGB and returns what its headers said.
pub fn decode_jpeg_info(b: &[u8]) -> Result<(RgbImage, JpegInfo), DecodeError> {
    decode_jpeg_with(b, jpeg_decoder())
}

/// `decode_jpeg_info` with the given decoder.
pub fn decode_jpeg_with(
    b: &[u8],
    decoder: JpegDecoder,
) -> Result<(RgbImage, JpegInfo), DecodeError> {
    if b.is_empty() {
        return err("empty file");
    }
    guarded("JPEG", || {
        let info = jpeg_headers(b)?;
        jpeg_check_complete(b)?;
        // Every 8x8 block of the image takes at least one bit of the file (the DC code of its first
        // scan). Decoders fill a scan that runs short with gray, so a few hundred corrupt bytes
        // claiming 16384x16384 pixels would take a minute and 800 MB to "decode": refused here.
        if info.w.div_ceil(8) * info.h.div_ceil(8) > 8 * b.len() {
            return err(format!(
                "corrupt JPEG ({}x{} pixels claimed by {} bytes, too few to hold them)",
                info.w,
                info.h,
                b.len()
            ));
        }
        if !matches!(info.components, 1 | 3 | 4) {
            return err(format!(
                "unsupported JPEG with {} components",
                info.components
            ));
        }
        if decoder == JpegDecoder::LibjpegTurbo {
            let img = super::turbo::decode(b, info.w, info.h, info.components)?;
            return Ok((img, info));
        }
        let mut d = zune_jpeg::JpegDecoder::new_with_options(ZCursor::new(b), jpeg_options());
        let data = d.decode().or_else(|e| err(format!("bad JPEG data: {e}")))?;
        if data.len() != info.w * info.h * 3 {
            return err(format!(
                "JPEG decoded to {} bytes, expected {}x{}x3",
                data.len(),
                info.h,
                info.w
            ));
        }
        Ok((
            RgbImage {
                w: info.w,
                h: info.h,
                data,
            },
            info,
        ))
    })
}

// ----------------------------------------------------------------------------
// PNG, BMP, PPM

/// Interleaved 8-bit samples in `cs` to RGB: alpha dropped, gray replicated.
fn to_rgb(w: usize, h: usize, cs: ColorSpace, px: Vec<u8>) -> Result<RgbImage, DecodeError> {
    let n = cs.num_components();
    if px.len() != w * h * n {
        return err(format!("decoded {} bytes, expected {h}x{w}x{n}", px.len()));
    }
    let data = match cs {
        ColorSpace::RGB => px,
        ColorSpace::RGBA => px
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        ColorSpace::BGR => px
            .chunks_exact(3)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
        ColorSpace::BGRA => px
            .chunks_exact(4)
            .flat_map(|p| [p[2], p[1], p[0]])
            .collect(),
        ColorSpace::Luma => px.iter().flat_map(|&v| [v, v, v]).collect(),
        ColorSpace::LumaA => px.chunks_exact(2).flat_map(|p| [p[0]; 3]).collect(),
        other => return err(format!("unsupported colorspace {other:?}")),
    };
    Ok(RgbImage { w, h, data })
}

/// 16-bit samples to 8 bits by their high byte (zune returns them native-endian).
fn samples_u8(r: DecodingResult) -> Result<Vec<u8>, DecodeError> {
    match r {
        DecodingResult::U8(v) => Ok(v),
        DecodingResult::U16(v) => Ok(v.iter().map(|&s| (s >> 8) as u8).collect()),
        _ => err("unsupported sample type (floating point)"),
    }
}

fn decode_png(b: &[u8]) -> Result<RgbImage, DecodeError> {
    let opts = DecoderOptions::new_fast()
        .png_set_strip_to_8bit(true)
        .set_strict_mode(true);
    let mut d = zune_png::PngDecoder::new_with_options(ZCursor::new(b), opts);
    d.decode_headers()
        .or_else(|e| err(format!("bad PNG: {e:?}")))?;
    let (w, h) = d
        .dimensions()
        .ok_or_else(|| DecodeError("bad PNG".into()))?;
    let cs = d
        .colorspace()
        .ok_or_else(|| DecodeError("bad PNG".into()))?;
    let px = samples_u8(d.decode().or_else(|e| err(format!("bad PNG: {e:?}")))?)?;
    to_rgb(w, h, cs, px)
}

fn decode_bmp(b: &[u8]) -> Result<RgbImage, DecodeError> {
    let mut d = zune_bmp::BmpDecoder::new_with_options(ZCursor::new(b), DecoderOptions::new_fast());
    d.decode_headers()
        .or_else(|e| err(format!("bad BMP: {e:?}")))?;
    let (w, h) = d
        .dimensions()
        .ok_or_else(|| DecodeError("bad BMP".into()))?;
    let cs = d
        .colorspace()
        .ok_or_else(|| DecodeError("bad BMP".into()))?;
    let px = d.decode().or_else(|e| err(format!("bad BMP: {e:?}")))?;
    to_rgb(w, h, cs, px)
}

fn decode_pnm(b: &[u8]) -> Result<RgbImage, DecodeError> {
    let mut d = zune_ppm::PPMDecoder::new_with_options(ZCursor::new(b), DecoderOptions::new_fast());
    d.decode_headers()
        .or_else(|e| err(format!("bad PPM/PGM: {e:?}")))?;
    let (w, h) = d
        .dimensions()
        .ok_or_else(|| DecodeError("bad PPM/PGM".into()))?;
    let cs = d
        .colorspace()
        .ok_or_else(|| DecodeError("bad PPM/PGM".into()))?;
    let px = samples_u8(d.decode().or_else(|e| err(format!("bad PPM/PGM: {e:?}")))?)?;
    to_rgb(w, h, cs, px)
}

/// Decodes any supported image (told by its magic bytes) to RGB.
pub fn decode(b: &[u8]) -> Result<RgbImage, DecodeError> {
    if b.is_empty() {
        return err("empty file");
    }
    match sniff(b) {
        Format::Jpeg => decode_jpeg(b),
        Format::Png => guarded("PNG", || decode_png(b)),
        Format::Bmp => guarded("BMP", || decode_bmp(b)),
        Format::Pnm => guarded("PPM/PGM", || decode_pnm(b)),
        f @ (Format::Gif | Format::Tiff | Format::Webp) => {
            err(format!("unsupported image format ({})", f.name()))
        }
        Format::Unknown => err("not an image (unknown format)"),
    }
}

// ----------------------------------------------------------------------------
// Encode, resize

/// Encodes RGB as a baseline JPEG (4:4:4 at quality >= 90, 4:2:0 below, jpeg-encoder's default).
pub fn encode_jpeg(img: &RgbImage, quality: u8) -> Result<Vec<u8>, DecodeError> {
    let (w, h) = match (u16::try_from(img.w), u16::try_from(img.h)) {
        (Ok(w), Ok(h)) if w > 0 && h > 0 => (w, h),
        _ => return err(format!("cannot encode a {}x{} JPEG", img.w, img.h)),
    };
    let mut out = Vec::with_capacity(img.data.len() / 8);
    jpeg_encoder::Encoder::new(&mut out, quality)
        .encode(&img.data, w, h, jpeg_encoder::ColorType::Rgb)
        .or_else(|e| err(format!("JPEG encoding failed: {e}")))?;
    Ok(out)
}

/// Size with the longer side `max_side` and the aspect ratio kept (rounded, at least 1).
pub fn fit_longer_side(w: usize, h: usize, max_side: usize) -> (usize, usize) {
    let long = w.max(h) as f64;
    let s = max_side as f64 / long;
    let f = |v: usize| ((v as f64 * s).round() as usize).clamp(1, max_side);
    if w >= h {
        (max_side, f(h))
    } else {
        (f(w), max_side)
    }
}

fn lanczos3(x: f64) -> f64 {
    let sinc = |x: f64| {
        if x == 0.0 {
            1.0
        } else {
            let p = std::f64::consts::PI * x;
            p.sin() / p
        }
    };
    if x.abs() < 3.0 {
        sinc(x) * sinc(x / 3.0)
    } else {
        0.0
    }
}

/// Per output index: first input index and normalized weights (PIL's antialiased resampling: the
/// filter is stretched by the scale when shrinking).
fn resample_weights(n_in: usize, n_out: usize) -> Vec<(usize, Vec<f32>)> {
    let scale = n_in as f64 / n_out as f64;
    let fscale = scale.max(1.0);
    let support = 3.0 * fscale;
    (0..n_out)
        .map(|i| {
            let center = (i as f64 + 0.5) * scale;
            let lo = ((center - support + 0.5).floor().max(0.0)) as usize;
            let hi = ((center + support + 0.5).floor() as usize).min(n_in);
            let mut w: Vec<f64> = (lo..hi)
                .map(|j| lanczos3((j as f64 + 0.5 - center) / fscale))
                .collect();
            let sum: f64 = w.iter().sum();
            if sum != 0.0 {
                w.iter_mut().for_each(|v| *v /= sum);
            }
            (lo, w.into_iter().map(|v| v as f32).collect())
        })
        .collect()
}

/// Lanczos-3 resize (antialiased, separable: rows then columns, u8 in between as PIL).
pub fn resize(img: &RgbImage, w_out: usize, h_out: usize) -> RgbImage {
    assert!(
        w_out > 0 && h_out > 0 && img.w > 0 && img.h > 0,
        "resize: empty size"
    );
    let px = |v: f32| v.round().clamp(0.0, 255.0) as u8;
    // rows: (h, w, 3) -> (h, w_out, 3)
    let wx = resample_weights(img.w, w_out);
    let mut tmp = vec![0u8; img.h * w_out * 3];
    for y in 0..img.h {
        let row = &img.data[y * img.w * 3..][..img.w * 3];
        for (x, (lo, ws)) in wx.iter().enumerate() {
            let mut acc = [0f32; 3];
            for (k, &wk) in ws.iter().enumerate() {
                let p = &row[(lo + k) * 3..][..3];
                for c in 0..3 {
                    acc[c] += wk * p[c] as f32;
                }
            }
            for c in 0..3 {
                tmp[(y * w_out + x) * 3 + c] = px(acc[c]);
            }
        }
    }
    // columns: (h, w_out, 3) -> (h_out, w_out, 3)
    let wy = resample_weights(img.h, h_out);
    let stride = w_out * 3;
    let mut data = vec![0u8; h_out * stride];
    for (y, (lo, ws)) in wy.iter().enumerate() {
        let mut acc = vec![0f32; stride];
        for (k, &wk) in ws.iter().enumerate() {
            let src = &tmp[(lo + k) * stride..][..stride];
            for (a, &s) in acc.iter_mut().zip(src) {
                *a += wk * s as f32;
            }
        }
        for (d, a) in data[y * stride..][..stride].iter_mut().zip(&acc) {
            *d = px(*a);
        }
    }
    RgbImage {
        w: w_out,
        h: h_out,
        data,
    }
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::path::PathBuf;

    pub(crate) fn fixtures() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/data")
    }

    /// A smooth color picture with texture, w x h.
    pub(crate) fn picture(w: usize, h: usize, seed: u64) -> RgbImage {
        let mut data = Vec::with_capacity(w * h * 3);
        let mut s = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        for y in 0..h {
            for x in 0..w {
                s ^= s << 13;
                s ^= s >> 7;
                s ^= s << 17;
                let n = (s % 24) as f64 - 12.0;
                let (xf, yf) = (x as f64, y as f64);
                let r = 128.0 + 100.0 * (xf / 6.0 + seed as f64).sin() + n;
                let g = 128.0 + 100.0 * (yf / 5.0 - seed as f64).cos() + n;
                let b = 128.0 + 80.0 * ((xf + yf) / 9.0).sin() - n;
                data.extend([r, g, b].map(|v| v.clamp(0.0, 255.0) as u8));
            }
        }
        RgbImage { w, h, data }
    }

    /// Mean absolute difference of two equally long byte images.
    pub(crate) fn mean_abs_diff(a: &[u8], b: &[u8]) -> f64 {
        assert_eq!(a.len(), b.len(), "mean_abs_diff: lengths");
        a.iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y) as f64)
            .sum::<f64>()
            / a.len() as f64
    }

    pub(crate) fn max_abs_diff(a: &[u8], b: &[u8]) -> u8 {
        assert_eq!(a.len(), b.len(), "max_abs_diff: lengths");
        a.iter()
            .zip(b)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap_or(0)
    }

    fn odd(name: &str) -> Vec<u8> {
        std::fs::read(fixtures().join("odd").join(name)).unwrap()
    }

    /// Decoding the fixtures gives RGB of the right size, close to PIL's `convert('RGB')` (Pillow 13,
    /// libjpeg-turbo). Measured |zune - PIL|: max 4, mean 0.37 / 0.41 for the 4:2:0 baseline /
    /// progressive files (the chroma upsampling filters differ at the last bit); max 1, mean 0.01 for
    /// CMYK and grayscale (no subsampling: IDCT rounding only); 0 for the PNG. The bounds are those
    /// numbers with a little room, so a change of IDCT, upsampling or CMYK formula shows.
    #[test]
    fn odd_fixtures_decode_close_to_pil() {
        // (file, kind, max abs diff, mean abs diff)
        let cases = [
            ("a/baseline.JPEG", "RGB JPEG", 5u8, 0.6),
            ("a/progressive.JPEG", "RGB JPEG", 5, 0.6),
            ("a/cmyk.JPEG", "CMYK JPEG", 1, 0.05),
            ("a/gray.JPEG", "grayscale JPEG", 1, 0.05),
            ("a/png.JPEG", "PNG", 0, 0.0),
        ];
        for (file, kind, tol, tol_mean) in cases {
            let b = odd(file);
            let img = decode(&b).unwrap_or_else(|e| panic!("{file}: {e}"));
            assert_eq!(
                (img.w, img.h, img.data.len()),
                (40, 30, 40 * 30 * 3),
                "{file}"
            );
            let stem = file[2..].trim_end_matches(".JPEG");
            let pil =
                std::fs::read(fixtures().join("pil_rgb").join(format!("{stem}.rgb"))).unwrap();
            let d = max_abs_diff(&img.data, &pil);
            let mean = mean_abs_diff(&img.data, &pil);
            assert!(
                d <= tol && mean <= tol_mean,
                "{file}: |zune - PIL| max {d} mean {mean:.3}, bounds {tol} {tol_mean}"
            );
            if sniff(&b) == Format::Jpeg {
                assert_eq!(jpeg_info(&b).unwrap().kind(), kind, "{file}");
            } else {
                assert_eq!(sniff(&b).name(), kind, "{file}");
            }
        }
        assert!(jpeg_info(&odd("a/progressive.JPEG")).unwrap().progressive);
        assert!(!jpeg_info(&odd("a/baseline.JPEG")).unwrap().progressive);
    }

    /// libjpeg-turbo gives PIL's decoded pixels exactly (PIL decodes with it), for every kind of
    /// JPEG in the fixtures; it refuses what zune refuses.
    #[test]
    fn libjpeg_turbo_decodes_pil_pixels_exactly() {
        if let Err(why) = super::super::turbo::available() {
            println!("skipped: {why}");
            return;
        }
        for stem in ["baseline", "progressive", "cmyk", "gray"] {
            let (img, _) =
                decode_jpeg_with(&odd(&format!("a/{stem}.JPEG")), JpegDecoder::LibjpegTurbo)
                    .unwrap_or_else(|e| panic!("{stem}: {e}"));
            let pil =
                std::fs::read(fixtures().join("pil_rgb").join(format!("{stem}.rgb"))).unwrap();
            assert_eq!((img.w, img.h), (40, 30), "{stem}");
            assert_eq!(
                max_abs_diff(&img.data, &pil),
                0,
                "{stem}: libjpeg-turbo vs PIL"
            );
        }
        for file in ["b/truncated.JPEG", "b/random.JPEG", "b/empty.JPEG"] {
            decode_jpeg_with(&odd(file), JpegDecoder::LibjpegTurbo).expect_err(file);
        }
    }

    /// Truncated, random and empty data are errors, not panics and not half-gray images.
    #[test]
    fn corrupt_data_is_an_error() {
        for file in ["b/truncated.JPEG", "b/random.JPEG", "b/empty.JPEG"] {
            let e = decode(&odd(file)).expect_err(file);
            eprintln!("{file}: {e}");
        }
        // every prefix of a valid JPEG that cuts into the scan fails cleanly
        let b = odd("a/baseline.JPEG");
        for n in (0..b.len() - 2).step_by(7) {
            assert!(decode(&b[..n]).is_err(), "prefix of {n} bytes decoded");
        }
        // what libjpeg only warns about, PIL decodes and so do we: stray bytes before the EOI
        // marker, an entropy segment cut short but closed by EOI
        let mut stray = b[..b.len() - 2].to_vec();
        stray.extend([0u8; 40].iter().chain(&[0xFF, 0xD9]));
        assert_eq!(decode(&stray).unwrap().data.len(), 40 * 30 * 3);
        let mut short = b[..b.len() * 6 / 10].to_vec();
        short.extend([0xFF, 0xD9]);
        assert_eq!(decode(&short).unwrap().data.len(), 40 * 30 * 3);
        assert_eq!(
            decode(b"GIF89a......").unwrap_err().0,
            "unsupported image format (GIF)"
        );
        // garbage behind a JPEG signature, and a valid file with bytes flipped: errors or images,
        // never a panic (the decoders run under catch_unwind; this holds the guard to its promise)
        let mut junk = vec![0xFF, 0xD8, 0xFF];
        junk.extend((0..3000u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8));
        assert!(decode(&junk).is_err());
        for i in (2..b.len()).step_by(11) {
            let mut c = b.clone();
            c[i] ^= 0x5A;
            if let Err(e) = decode(&c) {
                assert!(!e.0.contains("panicked"), "byte {i}: {e}");
            }
        }
    }

    /// Found by fuzzing (fuzz/seeds/image/bad-png-crc.png, bad-jpeg-3-bytes.jpg): zune's error
    /// messages end with a newline, which made a skipped file's line in `lewel pack`'s report (and a
    /// bad sample's) two lines. A decode error is one line.
    #[test]
    fn decode_errors_are_one_line() {
        let png =
            b"\x89PNG\x0d\x0a\x1a\x0a\x00\x00\x00\x0dIHDR\x00\x00\x00\x02\x00\x00\x00\x04\x08\
              \x04\x00\x00\x00\x0e\xe6&\xb2\x00\x00\x00\x1fIDATx\x01\x01\x14\x00\xeb\xff\x00\
              \x00\xff\xc8\x80\x00<\xff\xc8\x80\x00x\xff\xc8\x80\x00\xb4\xff\xc8\x80b\xea\x0a \
              3 2 255 \x00d\xc8\x85^\x8b\xbf\x89\x00\x00\x00\x00IEND\xaeB`\x82";
        let e = decode(png).unwrap_err().0;
        assert!(
            e.starts_with("bad PNG: CRC does not match") && !e.contains('\n'),
            "{e:?}"
        );
        let e = decode(&[0xFF, 0xD8, 0xFF]).unwrap_err().0;
        assert!(
            e.starts_with("bad JPEG headers: ") && !e.contains('\n'),
            "{e:?}"
        );
    }

    /// Found by probing the image fuzz target with large sizes (fuzz/seeds/image/bad-jpeg-16k.jpg):
    /// a 1 KB JPEG whose header claims 16384x16384 pixels decoded to 800 MB of gray in about 20 s
    /// (90 s in the fuzzer's build). A file that cannot hold one bit per 8x8 block is refused at
    /// once; the same file at its real size, and any real JPEG, decode.
    #[test]
    fn a_jpeg_claiming_more_pixels_than_its_bytes_hold_is_refused() {
        let b = odd("a/baseline.JPEG");
        let sof = (0..b.len() - 1)
            .find(|&i| b[i] == 0xFF && b[i + 1] == 0xC0)
            .unwrap();
        assert_eq!(decode(&b).unwrap().data.len(), 40 * 30 * 3);
        let t0 = std::time::Instant::now();
        for (w, h) in [(16384u16, 16384u16), (1000, 1000), (16384, 40)] {
            let mut c = b.clone();
            c[sof + 5..sof + 7].copy_from_slice(&h.to_be_bytes());
            c[sof + 7..sof + 9].copy_from_slice(&w.to_be_bytes());
            // (an image is not printed on failure: 800 MB of Debug)
            let e = decode(&c).err().map(|e| e.0);
            assert_eq!(
                e.as_deref(),
                Some(&*format!(
                    "corrupt JPEG ({w}x{h} pixels claimed by {} bytes, too few to hold them)",
                    b.len()
                ))
            );
        }
        assert!(t0.elapsed().as_secs_f64() < 1.0, "{:?}", t0.elapsed());
        // at the bound: 1098 bytes hold 8784 blocks, 752x744 has 94 x 93 = 8742
        let mut c = b.clone();
        c[sof + 5..sof + 7].copy_from_slice(&744u16.to_be_bytes());
        c[sof + 7..sof + 9].copy_from_slice(&752u16.to_be_bytes());
        assert_eq!(b.len(), 1098);
        assert!(!decode(&c).is_err_and(|e| e.0.contains("too few")));
    }

    #[test]
    fn encode_decode_round_trip_and_resize() {
        let img = picture(64, 48, 3);
        let j = encode_jpeg(&img, 95).unwrap();
        let (back, info) = decode_jpeg_info(&j).unwrap();
        assert!(info.is_rgb() && !info.progressive);
        assert_eq!((back.w, back.h), (64, 48));
        let mean: f64 = img
            .data
            .iter()
            .zip(&back.data)
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / img.data.len() as f64;
        assert!(mean < 6.0, "q95 mean abs error {mean}");

        assert_eq!(fit_longer_side(500, 375, 256), (256, 192));
        assert_eq!(fit_longer_side(375, 500, 256), (192, 256));
        assert_eq!(fit_longer_side(1000, 1, 10), (10, 1));
        // a constant image stays constant; a 2x shrink of a smooth image stays close to a box filter
        let flat = RgbImage {
            w: 30,
            h: 20,
            data: [10u8, 200, 99].repeat(600),
        };
        let r = resize(&flat, 7, 5);
        assert!(
            r.data.chunks(3).all(|p| p == [10, 200, 99]),
            "{:?}",
            &r.data[..9]
        );
        let r = resize(&img, 32, 24);
        let bx: Vec<u8> = (0..24 * 32 * 3)
            .map(|i| {
                let (y, x, c) = (i / 96, i / 3 % 32, i % 3);
                let s: u32 = [(0, 0), (0, 1), (1, 0), (1, 1)]
                    .iter()
                    .map(|(dy, dx)| img.data[((2 * y + dy) * 64 + 2 * x + dx) * 3 + c] as u32)
                    .sum();
                ((s + 2) / 4) as u8
            })
            .collect();
        let mean: f64 = r
            .data
            .iter()
            .zip(&bx)
            .map(|(a, b)| a.abs_diff(*b) as f64)
            .sum::<f64>()
            / bx.len() as f64;
        assert!(mean < 8.0, "lanczos vs box mean abs diff {mean}");
    }
}
