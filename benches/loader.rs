//! Loader benchmark: what one CPU core delivers of LEWEL's two-view augmentation on realistic
//! JPEGs, next to the JPEG decode alone (the floor under every row).
//!
//! The images: photo-like 500x375 RGB (smooth gradients, shapes, fine noise), encoded at quality 90
//! with 4:2:0 chroma, like ImageNet's typical file (about 110 KB there). Rows, one thread:
//!   decode                 zune-jpeg to RGB
//!   geometric alone        both views' crop, resize and flip of images decoded beforehand, with
//!                          the vector (AVX2) resize and with the scalar one, in turn
//!   decode + geometric     + both views' RandomResizedCrop to 224, bilinear (PIL's), flip
//!   decode + full CPU      + both views' jitter, grayscale, blur, solarize, normalize to f32
//! then decode and decode + geometric with zune-jpeg and libjpeg-turbo in turn (when libturbojpeg
//! loads), then the full CPU row on every core (the loader's parallel rate), the training loader
//! itself on every core (whole batches: the u8 crops of the GPU path, the normalized views of the
//! CPU path) beside the same work as bare parallel loops, and `lewel pack` of the same files on
//! every core: copying (each file still decoded once to check it) and with --max-side 256 (decode,
//! resize, re-encode).
//!
//! Run: `cargo bench --bench loader`. Results: benches/README.md.

use jpeg_encoder::{ColorType, Encoder, SamplingFactor};
use lewel::data::decode::{self, decode, JpegDecoder};
use lewel::data::loader::{Loader, LoaderConfig, Samples};
use lewel::data::pil::{self, Rgb8};
use lewel::data::transforms;
use lewel::rng::Rng;
use rayon::prelude::*;
use std::hint::black_box;
use std::sync::Arc;
use std::time::Instant;

const N: usize = 48;
const SIZE: usize = 224;

fn photo(seed: u64, w: usize, h: usize) -> Vec<u8> {
    let mut r = Rng::new(seed);
    let shapes: Vec<[f64; 6]> = (0..6)
        .map(|_| {
            [
                r.range(0.0, w as f64),
                r.range(0.0, h as f64),
                r.range(20.0, 150.0),
                r.range(0.0, 255.0),
                r.range(0.0, 255.0),
                r.range(0.0, 255.0),
            ]
        })
        .collect();
    let (a, b) = (r.range(5.0, 40.0), r.range(5.0, 40.0));
    let mut px = Vec::with_capacity(w * h * 3);
    for y in 0..h {
        for x in 0..w {
            let (xf, yf) = (x as f64, y as f64);
            let mut c = [
                128.0 + 90.0 * (xf / a + yf / b).sin(),
                128.0 + 80.0 * (yf / a).cos() * (xf / b).sin(),
                60.0 + 150.0 * (xf + yf) / (w + h) as f64,
            ];
            for s in &shapes {
                if (xf - s[0]).powi(2) + (yf - s[1]).powi(2) < s[2] * s[2] {
                    c = [s[3], s[4], s[5]];
                }
            }
            for v in c {
                px.push((v + 10.0 * r.normal()).clamp(0.0, 255.0) as u8);
            }
        }
    }
    px
}

fn jpeg(px: &[u8], w: usize, h: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut e = Encoder::new(&mut out, 90);
    e.set_sampling_factor(SamplingFactor::R_4_2_0);
    e.encode(px, w as u16, h as u16, ColorType::Rgb)
        .expect("encoding");
    out
}

fn rgb(bytes: &[u8]) -> Rgb8 {
    decode(bytes).expect("decoding")
}

/// Both views of one file, to the given depth: 0 decode, 1 + geometric, 2 + photometric and
/// normalize.
fn work(bytes: &[u8], i: usize, depth: u32, out: &mut [f32]) {
    let img = rgb(bytes);
    if depth == 0 {
        black_box(&img);
        return;
    }
    for view in [1u8, 2] {
        let p = transforms::view_params(0, 0, i as u64, view, img.w, img.h);
        let mut v = transforms::geometric(&img, &p, SIZE);
        if depth >= 2 {
            transforms::photometric(&mut v, &p);
            pil::normalize(&v, out);
        }
        black_box(&v);
    }
}

/// Images per second over `rounds` passes of all files.
fn rate(files: &[Vec<u8>], depth: u32, parallel: bool) -> f64 {
    let rounds = 3;
    let t = Instant::now();
    for _ in 0..rounds {
        if parallel {
            files.par_iter().enumerate().for_each_init(
                || vec![0.0f32; SIZE * SIZE * 3],
                |out, (i, f)| work(f, i, depth, out),
            );
        } else {
            let mut out = vec![0.0f32; SIZE * SIZE * 3];
            for (i, f) in files.iter().enumerate() {
                work(f, i, depth, &mut out);
            }
        }
    }
    (rounds * files.len()) as f64 / t.elapsed().as_secs_f64()
}

/// Images per second of the two views' crop, resize and flip alone, from images decoded beforehand:
/// (vector resize, scalar resize), timed round by round in turn so that background load hits both.
fn crop_rates(files: &[Vec<u8>]) -> (f64, f64) {
    let imgs: Vec<Rgb8> = files.iter().map(|f| rgb(f)).collect();
    let mut secs = [0.0f64; 2];
    let rounds = 10;
    for _ in 0..rounds {
        for (k, vector) in [true, false].into_iter().enumerate() {
            pil::set_vector_resize(vector);
            let t = Instant::now();
            for (i, img) in imgs.iter().enumerate() {
                for view in [1u8, 2] {
                    let p = transforms::view_params(0, 0, i as u64, view, img.w, img.h);
                    black_box(transforms::geometric(img, &p, SIZE));
                }
            }
            secs[k] += t.elapsed().as_secs_f64();
        }
    }
    pil::set_vector_resize(true);
    let n = (rounds * imgs.len()) as f64;
    (n / secs[0], n / secs[1])
}

fn main() {
    let (w, h) = (500, 375);
    let files: Vec<Vec<u8>> = (0..N as u64)
        .into_par_iter()
        .map(|s| jpeg(&photo(s, w, h), w, h))
        .collect();
    let kb = files.iter().map(|f| f.len()).sum::<usize>() as f64 / N as f64 / 1024.0;
    println!("{N} JPEGs {w}x{h}, quality 90, 4:2:0, {kb:.0} KB on average; views {SIZE}x{SIZE}");
    // Warm-up.
    rate(&files[..4], 2, false);
    let dec = rate(&files, 0, false);
    let (crops, crops_scalar) = crop_rates(&files);
    let geo = rate(&files, 1, false);
    let full = rate(&files, 2, false);
    let cores = rayon::current_num_threads();
    let par = rate(&files, 2, true);
    // libjpeg-turbo (when its library loads) against zune-jpeg, alternating round by round.
    let turbo = decode::set_jpeg_decoder(JpegDecoder::LibjpegTurbo).map(|()| {
        let (mut z, mut t) = ([0.0; 2], [0.0; 2]);
        for _ in 0..3 {
            for (depth, (zr, tr)) in z.iter_mut().zip(t.iter_mut()).enumerate() {
                decode::set_jpeg_decoder(JpegDecoder::Zune).expect("zune");
                *zr += rate(&files, depth as u32, false) / 3.0;
                decode::set_jpeg_decoder(JpegDecoder::LibjpegTurbo).expect("loaded above");
                *tr += rate(&files, depth as u32, false) / 3.0;
            }
        }
        decode::set_jpeg_decoder(JpegDecoder::Zune).expect("zune");
        (z, t)
    });
    println!("| stage (two views per image)   | images/s | ms/image | vs decode |");
    println!("|---|---|---|---|");
    for (name, r) in [
        ("decode only, 1 core", dec),
        ("crop/resize/flip only (decoded beforehand), 1 core", crops),
        ("the same, scalar resize (no AVX2)", crops_scalar),
        ("decode + crop/resize/flip, 1 core", geo),
        ("decode + full CPU augmentation, 1 core", full),
    ] {
        println!("| {name} | {r:.0} | {:.2} | {:.2} |", 1e3 / r, r / dec);
    }
    println!(
        "| decode + full CPU augmentation, {cores} threads | {par:.0} | {:.2} | {:.2} |",
        1e3 / par,
        par / dec
    );
    match turbo {
        Ok((z, t)) => {
            println!("| decoder, 1 core, alternating | images/s | ms/image | vs zune |");
            println!("|---|---|---|---|");
            for (k, name) in ["decode only", "decode + crop/resize/flip"]
                .iter()
                .enumerate()
            {
                for (dec, r) in [("zune-jpeg", z[k]), ("libjpeg-turbo", t[k])] {
                    println!(
                        "| {name}, {dec} | {r:.0} | {:.2} | {:.2} |",
                        1e3 / r,
                        r / z[k]
                    );
                }
            }
        }
        Err(e) => println!("libjpeg-turbo rows skipped: {e}"),
    }
    loader_rates(&files, cores);
    pack_rate(&files, cores);
}

/// The files as a dataset of 4 classes, decoded on demand.
struct Files(Vec<Vec<u8>>);

impl Samples for Files {
    fn len(&self) -> usize {
        self.0.len()
    }
    fn label(&self, i: usize) -> usize {
        i % 4
    }
    fn classes(&self) -> usize {
        4
    }
    fn decode(&self, i: usize) -> Result<Rgb8, String> {
        decode(&self.0[i]).map_err(|e| e.to_string())
    }
}

/// The training loader on every core, whole batches of 16 from 4 copies of the files, against the
/// same per-image work as a bare parallel loop: what assembling batches costs.
fn loader_rates(files: &[Vec<u8>], cores: usize) {
    let many: Vec<Vec<u8>> = (0..4).flat_map(|_| files.iter().cloned()).collect();
    let n = many.len();
    let data: Arc<dyn Samples> = Arc::new(Files(many.clone()));
    println!("| {cores} threads, {n} images, batch 16 | images/s | bare loop | ratio |");
    println!("|---|---|---|---|");
    for (name, photometric, depth) in [
        ("loader, u8 crops (GPU path)", false, 1),
        ("loader, normalized views (CPU path)", true, 2),
    ] {
        let cfg = LoaderConfig {
            batch: 16,
            size: SIZE,
            seed: 0,
            threads: cores,
            prefetch: 2,
            world: 1,
            rank: 0,
            max_bad: 0.01,
            photometric,
        };
        let l = Loader::new(data.clone(), cfg).expect("loader");
        let (mut got, mut bare) = (0.0, 0.0);
        for round in 0..2u64 {
            let t = Instant::now();
            for b in l.epoch(round, 0) {
                l.recycle(black_box(b.expect("batch")));
            }
            got += (l.batches_per_epoch() * 16) as f64 / t.elapsed().as_secs_f64() / 2.0;
            bare += rate(&many, depth, true) / 2.0;
        }
        println!("| {name} | {got:.0} | {bare:.0} | {:.2} |", got / bare);
    }
}

/// `lewel pack` of the files (as an ImageFolder of 4 classes in a temp folder), files per second.
fn pack_rate(files: &[Vec<u8>], cores: usize) {
    use lewel::data::pack::{pack, PackOptions};
    let dir = std::env::temp_dir().join(format!("lewel-bench-pack-{}", std::process::id()));
    for (i, f) in files.iter().enumerate() {
        let class = dir.join("src").join(format!("c{}", i % 4));
        std::fs::create_dir_all(&class).expect("bench folder");
        std::fs::write(class.join(format!("{i:03}.JPEG")), f).expect("bench file");
    }
    println!("| lewel pack, {cores} threads | files/s | copied | resized |");
    println!("|---|---|---|---|");
    for (name, max_side) in [("copy", None), ("--max-side 256", Some(256))] {
        let o = PackOptions {
            max_side,
            quality: 90,
            progress: false,
        };
        let s = pack(&dir.join("src"), &dir.join("bench.pack"), &o).expect("pack");
        println!(
            "| {name} | {:.0} | {} | {} |",
            s.files as f64 / s.seconds,
            s.copied,
            s.resized
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
