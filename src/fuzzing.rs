//! The bodies of the fuzz targets (`fuzz/fuzz_targets/*.rs`, run by `scripts/fuzz.sh`), kept here so
//! that `cargo test` runs every committed seed (`fuzz/seeds/<target>/`) through the same code. Each
//! takes arbitrary bytes and must return normally: a malformed input is an `Error` (one line, a
//! user's mistake: exit code 2) or a bad sample, never a panic, a hang or an allocation that the
//! input's size does not bound. A broken invariant panics, which the fuzzer reports as a crash.
//! Each returns whether the input was accepted (opened, decoded, loaded, valid), which the seed test
//! checks against the seed's name (`bad-*` must be refused, every other seed accepted).

use crate::checkpoint;
use crate::data::decode::{self, Format};
use crate::data::pack::Packed;
use crate::data::{pil, transforms};
use crate::memory::ParamStore;
use crate::model::lewel::{EncoderObj, LewelConfig};
use crate::model::resnet::{Arch, ResNet};
use crate::rng::Rng;
use crate::run::{self, PretrainConfig};
use crate::Error;
use std::path::Path;

/// A fuzz target's body: one input, whether it was accepted.
pub type Target = fn(&[u8]) -> bool;

/// The fuzz targets by name (the names of `fuzz/fuzz_targets/*.rs` and `fuzz/seeds/*`), with their
/// bodies.
pub const TARGETS: [(&str, Target); 5] = [
    ("packed", packed),
    ("checkpoint", checkpoint),
    ("manifest", manifest),
    ("image", image),
    ("config", config),
];

/// An error for a malformed input: one non-empty line, a user's mistake, naming `name` (the file)
/// when given. Returns false (the input was refused).
fn one_line(e: &Error, name: Option<&str>) -> bool {
    let m = e.to_string();
    assert!(
        !m.trim().is_empty() && !m.contains('\n'),
        "not one line: {m:?}"
    );
    assert_eq!(e.exit_code(), 2, "not a user error: {m}");
    if let Some(name) = name {
        assert!(m.contains(name), "does not name {name}: {m}");
    }
    false
}

// ----------------------------------------------------------------------------
// Packed files

/// The first byte chooses what to repair before the rest is opened as a packed file, so the fuzzer
/// gets past the CRCs to the checks behind them: bit 0 recomputes the header CRC and the CRC of
/// class names and index (where the header's offsets lie inside the file), bit 1 sets the header's
/// file length to the real one first, bit 2 recomputes every entry's sample CRC.
pub fn packed(data: &[u8]) -> bool {
    let Some((&mode, rest)) = data.split_first() else {
        return false;
    };
    let mut b = rest.to_vec();
    repair_packed(&mut b, mode);
    let name = "fuzz.lwpk";
    let p = match Packed::from_bytes(b, Path::new(name)) {
        Ok(p) => p,
        Err(e) => return one_line(&e, Some(name)),
    };
    let k = p.classes().len();
    let (mut decoded, mut all_ok) = (0, true);
    for i in 0..p.len() {
        let e = p.entry(i);
        assert!(p.label(i) < k, "sample {i}: label {} of {k}", p.label(i));
        assert_eq!(p.bytes(i).len(), e.len as usize, "sample {i}");
        match p.checked_bytes(i) {
            Ok(s) => {
                assert_eq!(crc32fast::hash(s), e.crc, "sample {i}");
                // decoding is the image target's; a couple here follow the loader's path
                if decoded < 2 {
                    decoded += 1;
                    let _ = decode::decode(s);
                }
            }
            Err(why) => {
                assert!(!why.contains('\n') && why.contains("CRC"), "{why}");
                all_ok = false;
            }
        }
    }
    all_ok
}

fn repair_packed(b: &mut [u8], mode: u8) {
    const HEADER: usize = 56;
    if b.len() < HEADER {
        return;
    }
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap());
    if mode & 2 != 0 {
        let len = b.len() as u64;
        b[40..48].copy_from_slice(&len.to_le_bytes());
    }
    let (n, index_offset) = (u64_at(b, 16), u64_at(b, 24));
    let index_end = n
        .checked_mul(24)
        .and_then(|x| x.checked_add(index_offset))
        .filter(|&e| index_offset >= HEADER as u64 && e <= b.len() as u64)
        .map(|e| e as usize);
    if let Some(end) = index_end {
        if mode & 4 != 0 {
            for i in 0..n as usize {
                let at = index_offset as usize + 24 * i;
                let (off, len) = (
                    u64_at(b, at),
                    u32::from_le_bytes(b[at + 8..at + 12].try_into().unwrap()),
                );
                let sample = off
                    .checked_add(len as u64)
                    .filter(|&e| e <= b.len() as u64)
                    .map(|e| crc32fast::hash(&b[off as usize..e as usize]));
                if let Some(crc) = sample {
                    b[at + 16..at + 20].copy_from_slice(&crc.to_le_bytes());
                }
            }
        }
        if mode & 1 != 0 {
            let crc = crc32fast::hash(&b[HEADER..end]);
            b[48..52].copy_from_slice(&crc.to_le_bytes());
        }
    }
    if mode & 1 != 0 {
        let crc = crc32fast::hash(&b[0..52]);
        b[52..56].copy_from_slice(&crc.to_le_bytes());
    }
}

// ----------------------------------------------------------------------------
// Checkpoints, manifests, configs

/// A safetensors state: read as `lewel` reads every state file, then, where it names a backbone
/// (bare or under `online_net.backbone.`) or a LEWEL encoder of a small width, loaded into that
/// model's store as `lewel linear` / `lewel align` load one. Wider models are not built (the time
/// would go into initialising them, not into the reader).
pub fn checkpoint(data: &[u8]) -> bool {
    let name = "fuzz.safetensors";
    let t = match checkpoint::read_bytes(data, Path::new(name)) {
        Ok(t) => t,
        Err(e) => return one_line(&e, Some(name)),
    };
    // accepted: every model the state names was loaded (a state naming none is accepted as read)
    let small = |a: Arch| a.div >= 16;
    let mut ok = true;
    for prefix in ["", "online_net.backbone."] {
        match Arch::infer(&t, prefix, name) {
            Ok(arch) if small(arch) => {
                let mut s = ParamStore::new();
                ResNet::build(&mut s, prefix, arch, &mut Rng::new(0));
                ok &= load(&mut s, &t, name);
            }
            Ok(_) => {}
            Err(e) => {
                one_line(&e, Some(name));
            }
        }
    }
    match LewelConfig::infer(&t, 1, 1.0, 0.5, name) {
        Ok(c) if small(c.arch) => {
            let mut s = ParamStore::new();
            EncoderObj::build(&mut s, "online_net.", &c, &mut Rng::new(0));
            ok &= load(&mut s, &t, name);
        }
        Ok(_) => {}
        Err(e) => {
            one_line(&e, Some(name));
        }
    }
    ok
}

/// `load_store`, and on success every tensor of the store back in the file's layout equals the file's.
fn load(s: &mut ParamStore<f32>, t: &checkpoint::Tensors, name: &str) -> bool {
    match checkpoint::load_store(s, t, name) {
        Ok(()) => {
            for (n, o) in checkpoint::store_tensors(s) {
                assert_eq!(Some(&o), t.get(&n), "{n} does not round trip");
            }
            true
        }
        Err(e) => one_line(&e, Some(name)),
    }
}

/// A run's checkpoint.json (the files it names are not read) and the config it carries.
pub fn manifest(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false; // read_manifest reads text: an I/O error before the parser
    };
    let name = "checkpoint.json";
    match run::parse_manifest(text, Path::new(name)) {
        Ok(m) => settings(&m.config),
        Err(e) => one_line(&e, Some(name)),
    }
}

/// A TOML config: its settings, the config they make over the defaults, and its checks.
pub fn config(data: &[u8]) -> bool {
    let Ok(text) = std::str::from_utf8(data) else {
        return false; // a file that is not UTF-8 is an I/O error before the parser
    };
    let name = "fuzz.toml";
    let given = match PretrainConfig::given_from_toml_str(text, Path::new(name)) {
        Ok(g) => g,
        Err(e) => return one_line(&e, Some(name)),
    };
    match PretrainConfig::from_given(&given) {
        Ok(c) => {
            assert_eq!(
                PretrainConfig::from_given(&c.to_given()).ok().as_ref(),
                Some(&c),
                "the config does not round trip"
            );
            settings(&c)
        }
        Err(e) => one_line(&e, None),
    }
}

/// A config's checks, and on success the schedule of a run on the built-in set.
fn settings(c: &PretrainConfig) -> bool {
    let _ = c.resolved();
    match c.validate() {
        Ok((_, mut sc)) => {
            if c.data.is_none() {
                let plan = run::Plan::new(c, run::synthetic_iters(c));
                for k in [0, plan.total() / 2, plan.total() - 1] {
                    plan.set_step(c, &mut sc, k);
                    assert!(sc.lars.lr.is_finite() && sc.ema_m.is_finite(), "step {k}");
                }
            }
            true
        }
        Err(e) => one_line(&e, None),
    }
}

// ----------------------------------------------------------------------------
// Images

/// Image bytes through the decode path (format sniffing, the JPEG header and completeness checks,
/// decoding), then what the loader does with a decoded image: both training views (crop, resize,
/// flip, photometric ops, normalize) and the eval transform, at a small size.
pub fn image(data: &[u8]) -> bool {
    let format = decode::sniff(data);
    let complete = decode::jpeg_check_complete(data);
    let info = decode::jpeg_info(data);
    match decode::decode(data) {
        Ok(img) => {
            assert!(img.w > 0 && img.h > 0, "{}x{} image", img.w, img.h);
            assert_eq!(img.data.len(), img.w * img.h * 3);
            if format == Format::Jpeg {
                let info = info.expect("a decoded JPEG has headers");
                assert_eq!((info.w, info.h), (img.w, img.h));
                assert!(complete.is_ok());
            }
            augment(&img);
            true
        }
        Err(e) => {
            assert!(
                !e.0.trim().is_empty() && !e.0.contains('\n'),
                "not one line: {e:?}"
            );
            false
        }
    }
}

fn augment(img: &pil::Rgb8) {
    let size = 32;
    for view in [1, 2] {
        let p = transforms::view_params(0, 0, 0, view, img.w, img.h);
        let c = p.crop;
        assert!(
            c.h > 0 && c.w > 0 && c.top + c.h <= img.h && c.left + c.w <= img.w,
            "{c:?} of {}x{}",
            img.w,
            img.h
        );
        let mut v = transforms::geometric(img, &p, size);
        transforms::photometric(&mut v, &p);
        let mut out = vec![0f32; size * size * 3];
        pil::normalize(&v, &mut out);
    }
    // the eval transform resizes the shorter side to 36: skipped for a sliver whose longer side
    // would then be huge (the time would go into resizing, as it would in PIL)
    if img.w.max(img.h) <= 64 * img.w.min(img.h) {
        let e = transforms::eval_view(img, 36, size);
        assert_eq!((e.w, e.h), (size, size));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{Owned, Tensors};
    use crate::data::decode::tests::{fixtures, picture};
    use crate::data::folder::tests::TempDir;
    use std::path::PathBuf;

    fn seeds() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds")
    }

    /// Every committed seed through its target's body, as the fuzzer runs it: none panics, `bad-*`
    /// seeds are refused and every other seed is accepted (so the valid seeds keep reaching the
    /// code behind the parsers: a packed file's samples, a model's store, a config's checks, the
    /// augmentation of a decoded image).
    #[test]
    fn fuzz_seeds_run_through_the_targets() {
        for (target, body) in TARGETS {
            let dir = seeds().join(target);
            let mut files: Vec<_> = std::fs::read_dir(&dir)
                .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
                .map(|e| e.unwrap().path())
                .collect();
            files.sort();
            let bad = files
                .iter()
                .filter(|f| f.file_name().unwrap().to_string_lossy().starts_with("bad-"))
                .count();
            assert!(
                bad >= 1 && files.len() - bad >= 2,
                "{target}: {} seeds, {bad} bad",
                files.len()
            );
            for f in &files {
                let data = std::fs::read(f).unwrap();
                let refused = f.file_name().unwrap().to_string_lossy().starts_with("bad-");
                assert_eq!(
                    body(&data),
                    !refused,
                    "{}: accepted should be {}",
                    f.display(),
                    !refused
                );
            }
        }
    }

    /// A PNG with stored (uncompressed) deflate blocks: `color` 0 (gray), 2 (RGB), 4 (gray + alpha)
    /// or 6 (RGBA) at `depth` bits; `rows` are the raw scanlines without their filter byte.
    fn png(w: u32, h: u32, depth: u8, color: u8, rows: &[Vec<u8>]) -> Vec<u8> {
        fn chunk(out: &mut Vec<u8>, kind: &[u8], body: &[u8]) {
            out.extend((body.len() as u32).to_be_bytes());
            let mut c = crc32fast::Hasher::new();
            c.update(kind);
            c.update(body);
            out.extend(kind);
            out.extend(body);
            out.extend(c.finalize().to_be_bytes());
        }
        let mut raw = Vec::new();
        for r in rows {
            raw.push(0);
            raw.extend(r);
        }
        let (mut a, mut b) = (1u32, 0u32);
        for &x in &raw {
            a = (a + x as u32) % 65521;
            b = (b + a) % 65521;
        }
        let mut z = vec![0x78, 0x01, 1];
        z.extend((raw.len() as u16).to_le_bytes());
        z.extend((!(raw.len() as u16)).to_le_bytes());
        z.extend(&raw);
        z.extend(((b << 16) | a).to_be_bytes());
        let mut ihdr = Vec::new();
        ihdr.extend(w.to_be_bytes());
        ihdr.extend(h.to_be_bytes());
        ihdr.extend([depth, color, 0, 0, 0]);
        let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
        chunk(&mut out, b"IHDR", &ihdr);
        chunk(&mut out, b"IDAT", &z);
        chunk(&mut out, b"IEND", &[]);
        out
    }

    /// A 24-bit BMP (rows bottom-up, BGR, padded to 4 bytes).
    fn bmp(w: usize, h: usize) -> Vec<u8> {
        let stride = (w * 3).div_ceil(4) * 4;
        let mut px = Vec::new();
        for y in 0..h {
            let mut row: Vec<u8> = (0..w * 3).map(|i| (i * 40 + y * 70) as u8).collect();
            row.resize(stride, 0);
            px.extend(row);
        }
        let mut b = b"BM".to_vec();
        b.extend((54 + px.len() as u32).to_le_bytes());
        b.extend([0; 4]);
        b.extend(54u32.to_le_bytes());
        b.extend(40u32.to_le_bytes());
        b.extend((w as i32).to_le_bytes());
        b.extend((h as i32).to_le_bytes());
        b.extend(1u16.to_le_bytes());
        b.extend(24u16.to_le_bytes());
        b.extend([0; 4]);
        b.extend((px.len() as u32).to_le_bytes());
        b.extend([0; 16]);
        b.extend(px);
        b
    }

    fn jpeg(w: usize, h: usize, seed: u64, quality: u8, progressive: bool) -> Vec<u8> {
        let img = picture(w, h, seed);
        let mut out = Vec::new();
        let mut e = jpeg_encoder::Encoder::new(&mut out, quality);
        e.set_progressive(progressive);
        e.encode(&img.data, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    fn safetensors(t: &Tensors, dir: &TempDir, crc: bool) -> Vec<u8> {
        let p = dir.0.join("s.safetensors");
        if crc {
            checkpoint::write_file_atomic(&p, t, None).unwrap();
            return std::fs::read(p).unwrap();
        }
        let views: Vec<_> = t
            .iter()
            .map(|(n, o)| {
                let v = safetensors::tensor::TensorView::new(o.dtype, o.shape.clone(), &o.bytes);
                (n.clone(), v.unwrap())
            })
            .collect();
        safetensors::tensor::serialize(views, None).unwrap()
    }

    /// Writes the generated seeds of fuzz/seeds/ (small valid files of each kind, and a few refused
    /// ones named `bad-*`; the other `bad-*` seeds are inputs the fuzzer found).
    #[test]
    #[ignore = "rewrites fuzz/seeds/: cargo test --release --lib write_fuzz_seeds -- --ignored"]
    fn write_fuzz_seeds() {
        let root = seeds(); // files are overwritten; the crash inputs added by hand stay
        let put = |target: &str, name: &str, bytes: &[u8]| {
            let d = root.join(target);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join(name), bytes).unwrap();
        };
        let t = TempDir::new("fuzz-seeds");

        // images: the committed odd files, and one of each other format
        for f in ["baseline", "cmyk", "gray", "png", "progressive"] {
            let b = std::fs::read(fixtures().join(format!("odd/a/{f}.JPEG"))).unwrap();
            put("image", &format!("{f}.jpg"), &b);
        }
        let b = std::fs::read(fixtures().join("odd/b/truncated.JPEG")).unwrap();
        put("image", "bad-truncated.jpg", &b);
        put("image", "tiny-q30.jpg", &jpeg(9, 7, 3, 30, false));
        let rgb: Vec<Vec<u8>> = (0..3)
            .map(|y| (0..15).map(|i| (i * 17 + y * 50) as u8).collect())
            .collect();
        put("image", "rgb8.png", &png(5, 3, 8, 2, &rgb));
        let gray16: Vec<Vec<u8>> = (0..2).map(|y| vec![0x12, y, 0xff, 0, 0x80, 1]).collect();
        put("image", "gray16.png", &png(3, 2, 16, 0, &gray16));
        let ga: Vec<Vec<u8>> = (0..4).map(|y| vec![y * 60, 255, 200, 128]).collect();
        put("image", "gray-alpha.png", &png(2, 4, 8, 4, &ga));
        put("image", "rgb24.bmp", &bmp(5, 3));
        let mut ppm = b"P6\n4 3\n255\n".to_vec();
        ppm.extend((0..36).map(|i| (i * 7) as u8));
        put("image", "rgb.ppm", &ppm);
        let mut pgm = b"P5 3 2 255 ".to_vec();
        pgm.extend([0, 100, 200, 50, 150, 250]);
        put("image", "gray.pgm", &pgm);
        put(
            "image",
            "bad-gif.gif",
            b"GIF89a\x01\x00\x01\x00\x00\x00\x00;",
        );
        put("image", "bad-empty", b"");

        // packed: `lewel pack` of 4 small images in 2 classes (one PNG, converted), whole (mode 0)
        // and with the repairs on (mode 7); a damaged sample is refused
        t.file("src/cat/a.jpg", &jpeg(16, 12, 1, 40, false));
        t.file("src/cat/b.jpg", &jpeg(12, 16, 2, 40, true));
        t.file("src/dog/c.jpg", &jpeg(10, 10, 3, 40, false));
        t.file("src/dog/d.png", &png(5, 3, 8, 2, &rgb));
        let out = t.0.join("seed.lwpk");
        crate::data::pack::pack(
            &t.0.join("src"),
            &out,
            &crate::data::pack::PackOptions::default(),
        )
        .unwrap();
        let file = std::fs::read(&out).unwrap();
        for (name, mode) in [("plain", 0u8), ("repaired", 7)] {
            put(
                "packed",
                &format!("{name}.lwpk"),
                &[&[mode][..], &file].concat(),
            );
        }
        let p = Packed::from_bytes(file.clone(), &out).unwrap();
        let e = p.entry(2);
        let mut b = [&[0u8][..], &file].concat();
        b[1 + e.offset as usize + e.len as usize / 2] ^= 0x20;
        put("packed", "bad-sample.lwpk", &b);
        let mut b = [&[0u8][..], &file].concat();
        b[1 + 17] ^= 1; // the sample count, under the header CRC
        put("packed", "bad-header.lwpk", &b);

        // checkpoints: a ResNet-18/64 backbone, a LEWEL online encoder of that width (neck hidden
        // width 8), a small state with i64 tensors, with and without the CRC; a damaged one
        let arch = Arch { depth: 18, div: 64 };
        let mut s = ParamStore::new();
        ResNet::build(&mut s, "", arch, &mut Rng::new(1));
        put(
            "checkpoint",
            "resnet18-64.safetensors",
            &safetensors(&checkpoint::store_tensors(&s), &t, true),
        );
        let mut s = ParamStore::new();
        let c = LewelConfig {
            hid: 8,
            ..LewelConfig::new(arch, 1, 1.0, 0.5)
        };
        EncoderObj::build(&mut s, "online_net.", &c, &mut Rng::new(2));
        put(
            "checkpoint",
            "lewel-online-18-64.safetensors",
            &safetensors(&checkpoint::store_tensors(&s), &t, true),
        );
        let mut small = Tensors::new();
        small.insert(
            "w".into(),
            Owned::f32(vec![2, 3], &[1.0, -2.0, 3.5, 0.0, 1e-3, 7.0]),
        );
        small.insert("n".into(), Owned::i64_scalar(5));
        small.insert("v".into(), Owned::i64(vec![2], &[1, -1]));
        put(
            "checkpoint",
            "small.safetensors",
            &safetensors(&small, &t, true),
        );
        put(
            "checkpoint",
            "small-no-crc.safetensors",
            &safetensors(&small, &t, false),
        );
        let mut b = safetensors(&small, &t, true);
        let n = b.len();
        b[n - 3] ^= 1;
        put("checkpoint", "bad-crc.safetensors", &b);

        // manifests: a built-in run's, a real-data run's on 2 ranks stopped mid-epoch, one without
        // the fields added later; a truncated one
        let man = |epoch: usize, config: &PretrainConfig, world: usize| {
            serde_json::json!({
                "epoch": epoch,
                "step": epoch * 62,
                "weights": format!("checkpoint_{epoch:04}.safetensors"),
                "weights_crc32": 0x1234_5678u32,
                "optimizer": format!("optimizer_{epoch:04}.safetensors"),
                "optimizer_crc32": 0x9abc_def0u32,
                "knn_init": 0.31,
                "knn_last": if epoch > 1 { Some(0.52) } else { None },
                "first_loss": 3.9,
                "rng": "keyed by (seed, epoch, sample, view): nothing to restore",
                "world": world,
                "config": config,
            })
        };
        let builtin = PretrainConfig::default().resolved();
        let real = PretrainConfig {
            data: Some("/data/imagenet/train".into()),
            batch_size: 256,
            arch: "resnet50".into(),
            lr: 1.2,
            sync_bn: true,
            ..PretrainConfig::default()
        }
        .resolved();
        let pretty = |v: &serde_json::Value| serde_json::to_string_pretty(v).unwrap();
        put(
            "manifest",
            "builtin.json",
            pretty(&man(1, &builtin, 1)).as_bytes(),
        );
        let mut m = man(3, &real, 2);
        let o = m.as_object_mut().unwrap();
        o.insert("in_epoch".into(), 17.into());
        o.insert("epoch_loss_sum".into(), 50.25.into());
        o.insert("last_loss".into(), 2.5.into());
        o.insert("skipped".into(), 1.into());
        put("manifest", "real-2-ranks.json", pretty(&m).as_bytes());
        let mut m = man(2, &builtin, 1);
        m.as_object_mut().unwrap().remove("world");
        put("manifest", "no-world.json", m.to_string().as_bytes());
        let j = pretty(&man(1, &PretrainConfig::default(), 1));
        put(
            "manifest",
            "bad-truncated.json",
            &j.as_bytes()[..j.len() / 2],
        );

        // configs
        put("config", "empty.toml", b"");
        put(
            "config",
            "default.toml",
            toml::to_string(&PretrainConfig::default())
                .unwrap()
                .as_bytes(),
        );
        put(
            "config",
            "real.toml",
            b"# a real-data run\narch = \"resnet50\"\ndata = \"/data/imagenet\"\nbatch_size = 256\nlr = 1.2\nwd = 1.5e-6\nepochs = 100\nwarmup_epochs = 10\nimage_size = 224\nsync_bn = true\nknn_protocol = \"official\"\njpeg_decoder = \"libjpeg-turbo\"\n",
        );
        put(
            "config",
            "small.toml",
            b"epochs = 3\nbatch_size = 32\ntrain_len = 256\nval_len = 64\nbn_group = 8\nlewel_num_heads = 2\nlars_exclude = \"released-log\"\n",
        );
        put("config", "bad-key.toml", b"batch_sise = 64\n");
        put("config", "bad-type.toml", b"epochs = \"ten\"\n");
        put("config", "bad-value.toml", b"lr = -1.0\n");
        put("config", "bad-syntax.toml", b"[out\nlr = 1\n");
    }
}
