//! The packed dataset file written by `lewel pack` and read through memmap2: one file instead of a
//! million, every sample an RGB JPEG, each with its label and a CRC.
//!
//! Layout (all integers little-endian; offsets are absolute byte positions in the file):
//!
//! ```text
//! 0    magic         8 bytes  "LEWELPAK"
//! 8    version       u32      1
//! 12   num_classes   u32      K
//! 16   num_samples   u64      N
//! 24   index_offset  u64      start of the index (= 56 + length of the class names)
//! 32   data_offset   u64      start of the image bytes (>= index_offset + 24 N)
//! 40   file_len      u64      length of the whole file (a shorter file is truncated)
//! 48   meta_crc      u32      CRC32 of bytes [56, index_offset + 24 N): class names and index
//! 52   header_crc    u32      CRC32 of bytes [0, 52)
//! 56   class names   K times: u32 byte length, UTF-8 bytes (label k = k-th name, sorted as the
//!                    ImageFolder classes)
//! index_offset       N entries of 24 bytes, in sample order (torchvision's ImageFolder order):
//!                      offset u64, length u32, label u32, crc u32 (CRC32 of the sample's bytes),
//!                      flags u32 (bit 0: converted to RGB JPEG, bit 1: resized)
//!                    zero padding up to data_offset (room reserved for files that were skipped)
//! data_offset        the JPEG bytes of every sample, back to back in index order
//! ```
//!
//! Packing copies a JPEG that decodes to RGB (3 components, baseline or progressive) byte for byte;
//! grayscale, CMYK/YCCK JPEGs and PNG/BMP/PPM files (whatever their names say) are decoded and
//! re-encoded as RGB JPEG at `--quality`; with `--max-side N` any image whose longer side exceeds N is
//! resized (Lanczos-3) to N on that side and re-encoded. Files that do not decode are skipped and
//! listed. Files are prepared in parallel (rayon) and written in sample order; the output appears
//! atomically (temp file beside it, fsync, rename, fsync of the folder), as checkpoints do.

use crate::data::decode::{self, Format, RgbImage};
use crate::data::folder::ImageFolder;
use crate::{Error, Result};
use std::collections::BTreeMap;
use std::io::{IsTerminal, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::time::Instant;

pub const MAGIC: [u8; 8] = *b"LEWELPAK";
pub const VERSION: u32 = 1;
const HEADER_LEN: usize = 56;
const ENTRY_LEN: usize = 24;
/// Entry flag: the sample was decoded and re-encoded to RGB JPEG (odd colorspace or format).
pub const FLAG_CONVERTED: u32 = 1;
/// Entry flag: the sample was resized to --max-side.
pub const FLAG_RESIZED: u32 = 2;

/// One index entry.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    pub offset: u64,
    pub len: u32,
    pub label: u32,
    pub crc: u32,
    pub flags: u32,
}

impl Entry {
    fn to_bytes(self) -> [u8; ENTRY_LEN] {
        let mut b = [0u8; ENTRY_LEN];
        b[0..8].copy_from_slice(&self.offset.to_le_bytes());
        b[8..12].copy_from_slice(&self.len.to_le_bytes());
        b[12..16].copy_from_slice(&self.label.to_le_bytes());
        b[16..20].copy_from_slice(&self.crc.to_le_bytes());
        b[20..24].copy_from_slice(&self.flags.to_le_bytes());
        b
    }
    fn from_bytes(b: &[u8]) -> Entry {
        Entry {
            offset: u64_at(b, 0),
            len: u32_at(b, 8),
            label: u32_at(b, 12),
            crc: u32_at(b, 16),
            flags: u32_at(b, 20),
        }
    }
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"))
}

fn u64_at(b: &[u8], i: usize) -> u64 {
    u64::from_le_bytes(b[i..i + 8].try_into().expect("8 bytes"))
}

fn header_bytes(
    k: u32,
    n: u64,
    index_offset: u64,
    data_offset: u64,
    file_len: u64,
    meta_crc: u32,
) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[0..8].copy_from_slice(&MAGIC);
    h[8..12].copy_from_slice(&VERSION.to_le_bytes());
    h[12..16].copy_from_slice(&k.to_le_bytes());
    h[16..24].copy_from_slice(&n.to_le_bytes());
    h[24..32].copy_from_slice(&index_offset.to_le_bytes());
    h[32..40].copy_from_slice(&data_offset.to_le_bytes());
    h[40..48].copy_from_slice(&file_len.to_le_bytes());
    h[48..52].copy_from_slice(&meta_crc.to_le_bytes());
    let crc = crc32fast::hash(&h[0..52]);
    h[52..56].copy_from_slice(&crc.to_le_bytes());
    h
}

fn names_bytes(classes: &[String]) -> Vec<u8> {
    let mut b = Vec::new();
    for c in classes {
        b.extend((c.len() as u32).to_le_bytes());
        b.extend(c.as_bytes());
    }
    b
}

// ----------------------------------------------------------------------------
// Reader

/// A packed file, mapped. Sample bytes are slices of the map; nothing is read until touched.
pub struct Packed {
    path: PathBuf,
    map: Bytes,
    classes: Vec<String>,
    n: usize,
    index_offset: usize,
}

/// A packed file's bytes: the map of the file, or bytes held in memory (`Packed::from_bytes`).
enum Bytes {
    Map(memmap2::Mmap),
    Owned(Vec<u8>),
}

impl std::ops::Deref for Bytes {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match self {
            Bytes::Map(m) => m,
            Bytes::Owned(v) => v,
        }
    }
}

impl std::fmt::Debug for Packed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Packed")
            .field("path", &self.path)
            .field("classes", &self.classes.len())
            .field("samples", &self.n)
            .finish()
    }
}

/// Whether the file starts with the packed-file magic (false when it cannot be read).
pub fn has_magic(path: &Path) -> bool {
    use std::io::Read;
    let mut m = [0u8; 8];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut m))
        .is_ok()
        && m == MAGIC
}

impl Packed {
    /// Opens and validates a packed file: magic, version, header CRC, length (truncation), the CRC
    /// of class names and index, and every entry's bounds and label. Failures are one line naming
    /// the file and what was expected.
    pub fn open(path: &Path) -> Result<Packed> {
        let f = std::fs::File::open(path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                Error::user(format!("{}: no such file", path.display()))
            } else {
                Error::io(path, e)
            }
        })?;
        // SAFETY: the map is read-only and packed files are never modified in place (lewel pack
        // writes a temp file and renames it); a file truncated by someone else while mapped would
        // fault on access, the caveat of every mmap reader.
        let map = unsafe { memmap2::Mmap::map(&f) }.map_err(|e| Error::io(path, e))?;
        Self::check(path, Bytes::Map(map))
    }

    /// A packed file from its bytes, checked as `open` checks a file (`path` names it in errors).
    pub fn from_bytes(bytes: Vec<u8>, path: &Path) -> Result<Packed> {
        Self::check(path, Bytes::Owned(bytes))
    }

    /// `open`'s checks, on the file's bytes.
    fn check(path: &Path, map: Bytes) -> Result<Packed> {
        let bad = |what: String| Error::user(format!("{}: {what}", path.display()));
        let b: &[u8] = &map;
        let actual = b.len() as u64;
        if b.len() < 8 || b[..8] != MAGIC {
            if MAGIC.starts_with(b) {
                return Err(bad(format!(
                    "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                    b.len()
                )));
            }
            return Err(bad(format!(
                "not a lewel packed file (it starts with {:02x?}, expected the magic \"LEWELPAK\"; make one with `lewel pack`)",
                &b[..b.len().min(8)]
            )));
        }
        if b.len() < HEADER_LEN {
            return Err(bad(format!(
                "truncated: {} bytes, shorter than the {HEADER_LEN}-byte header",
                b.len()
            )));
        }
        let version = u32_at(b, 8);
        if version != VERSION {
            return Err(bad(format!(
                "packed file version {version}, this build reads version {VERSION} (re-run `lewel pack`)"
            )));
        }
        if crc32fast::hash(&b[0..52]) != u32_at(b, 52) {
            return Err(bad("corrupt header (CRC mismatch)".into()));
        }
        let k = u32_at(b, 12) as usize;
        let n = u64_at(b, 16);
        let (index_offset, data_offset, file_len) = (u64_at(b, 24), u64_at(b, 32), u64_at(b, 40));
        if actual < file_len {
            return Err(bad(format!(
                "truncated: {actual} bytes, the header says {file_len}"
            )));
        }
        if actual > file_len {
            return Err(bad(format!(
                "{actual} bytes, the header says {file_len}: bytes were appended"
            )));
        }
        let index_end = n
            .checked_mul(ENTRY_LEN as u64)
            .and_then(|x| x.checked_add(index_offset));
        let index_end = match index_end {
            Some(e)
                if index_offset >= HEADER_LEN as u64
                    && e <= data_offset
                    && data_offset <= file_len =>
            {
                e as usize
            }
            _ => {
                return Err(bad(
                    "corrupt header (index and data offsets out of bounds)".into()
                ))
            }
        };
        let index_offset = index_offset as usize;
        if crc32fast::hash(&b[HEADER_LEN..index_end]) != u32_at(b, 48) {
            return Err(bad("corrupt class names or index (CRC mismatch)".into()));
        }
        let mut classes = Vec::new(); // not with_capacity(k): k is read from the file
        let mut p = HEADER_LEN;
        for c in 0..k {
            let name = (p + 4 <= index_offset)
                .then(|| u32_at(b, p) as usize)
                .and_then(|l| {
                    b.get(p + 4..p + 4 + l)
                        .filter(|_| p + 4 + l <= index_offset)
                })
                .and_then(|s| std::str::from_utf8(s).ok());
            let Some(name) = name else {
                return Err(bad(format!("corrupt class name {c}")));
            };
            p += 4 + name.len();
            classes.push(name.to_string());
        }
        if p != index_offset {
            return Err(bad("corrupt class names (length mismatch)".into()));
        }
        let packed = Packed {
            path: path.to_path_buf(),
            map,
            classes,
            n: n as usize,
            index_offset,
        };
        for i in 0..packed.n {
            let e = packed.entry(i);
            let end = e.offset.saturating_add(e.len as u64);
            if e.offset < data_offset || end > file_len || e.label as usize >= k {
                return Err(bad(format!(
                    "corrupt index entry {i} (offset {}, length {}, label {})",
                    e.offset, e.len, e.label
                )));
            }
        }
        Ok(packed)
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn len(&self) -> usize {
        self.n
    }

    pub fn is_empty(&self) -> bool {
        self.n == 0
    }

    pub fn classes(&self) -> &[String] {
        &self.classes
    }

    pub fn entry(&self, i: usize) -> Entry {
        assert!(i < self.n, "Packed::entry: index {i} of {}", self.n);
        Entry::from_bytes(&self.map[self.index_offset + i * ENTRY_LEN..][..ENTRY_LEN])
    }

    pub fn label(&self, i: usize) -> usize {
        self.entry(i).label as usize
    }

    /// The stored bytes of sample i, unchecked.
    pub fn bytes(&self, i: usize) -> &[u8] {
        let e = self.entry(i);
        &self.map[e.offset as usize..][..e.len as usize]
    }

    /// The bytes of sample i after checking their CRC; a mismatch is a corrupt sample.
    pub fn checked_bytes(&self, i: usize) -> std::result::Result<&[u8], String> {
        let e = self.entry(i);
        let b = self.bytes(i);
        let crc = crc32fast::hash(b);
        if crc != e.crc {
            return Err(format!(
                "corrupt sample (CRC {crc:08x}, the index says {:08x})",
                e.crc
            ));
        }
        Ok(b)
    }
}

// ----------------------------------------------------------------------------
// Writer

/// Settings of `lewel pack`.
#[derive(Clone, Debug)]
pub struct PackOptions {
    /// Re-encode images whose longer side exceeds this, resized to it.
    pub max_side: Option<usize>,
    /// JPEG quality of re-encoded images, 1..=100.
    pub quality: u8,
    /// A progress bar on a terminal, plain lines every 10 s otherwise; nothing when false.
    pub progress: bool,
}

impl Default for PackOptions {
    fn default() -> Self {
        PackOptions {
            max_side: None,
            quality: 90,
            progress: false,
        }
    }
}

/// What packing did. `converted` and `resized` may overlap (an odd file over --max-side counts in
/// both); copied + re-encoded + skipped = files.
#[derive(Clone, Debug, Default)]
pub struct PackSummary {
    /// The folder the classes were taken from (the source or its train/).
    pub root: PathBuf,
    pub classes: usize,
    pub files: usize,
    pub copied: usize,
    /// Converted files by kind ("CMYK JPEG", "grayscale JPEG", "PNG", ...).
    pub converted: BTreeMap<String, usize>,
    pub resized: usize,
    pub skipped: Vec<(PathBuf, String)>,
    pub bytes: u64,
    pub seconds: f64,
}

impl PackSummary {
    pub fn converted_total(&self) -> usize {
        self.converted.values().sum()
    }

    /// The closing line, then one line per skipped file (the first 20 and a count).
    pub fn report(&self, out: &Path) -> String {
        let kinds: Vec<String> = self
            .converted
            .iter()
            .map(|(k, n)| format!("{n} {k}"))
            .collect();
        let kinds = if kinds.is_empty() {
            String::new()
        } else {
            format!(" ({})", kinds.join(", "))
        };
        let mut s = format!(
            "pack | {} files, {} classes from {} -> {} ({:.1} MB) | {} copied, {} converted{kinds}, {} resized, {} skipped | {:.1} s, {:.0} files/s",
            self.files,
            self.classes,
            self.root.display(),
            out.display(),
            self.bytes as f64 / 1e6,
            self.copied,
            self.converted_total(),
            self.resized,
            self.skipped.len(),
            self.seconds,
            self.files as f64 / self.seconds.max(1e-9)
        );
        for (p, why) in self.skipped.iter().take(20) {
            s += &format!("\nskipped {}: {why}", p.display());
        }
        if self.skipped.len() > 20 {
            s += &format!("\n... and {} more skipped", self.skipped.len() - 20);
        }
        s
    }
}

/// One source file made ready for the pack.
struct Prepared {
    bytes: Vec<u8>,
    /// Some(kind) when the file was converted (odd colorspace or format).
    converted: Option<String>,
    resized: bool,
}

/// Decides what to store for one file's bytes: the bytes themselves, a re-encoded RGB JPEG, or why not.
fn prepare(raw: Vec<u8>, o: &PackOptions) -> std::result::Result<Prepared, String> {
    if raw.is_empty() {
        return Err("empty file".into());
    }
    let fmt = decode::sniff(&raw);
    let (img, converted) = match fmt {
        Format::Jpeg => {
            let (img, info) = decode::decode_jpeg_info(&raw).map_err(|e| e.0)?;
            let odd = (!info.is_rgb()).then(|| info.kind());
            (img, odd)
        }
        Format::Png | Format::Bmp | Format::Pnm => (
            decode::decode(&raw).map_err(|e| e.0)?,
            Some(fmt.name().to_string()),
        ),
        Format::Gif | Format::Tiff | Format::Webp => {
            return Err(format!("unsupported image format ({})", fmt.name()))
        }
        Format::Unknown => return Err("not an image (unknown format)".into()),
    };
    let resized = o.max_side.is_some_and(|m| img.w.max(img.h) > m);
    if converted.is_none() && !resized {
        return Ok(Prepared {
            bytes: raw,
            converted,
            resized,
        });
    }
    let img: RgbImage = match o.max_side {
        Some(m) if resized => {
            let (w, h) = decode::fit_longer_side(img.w, img.h, m);
            decode::resize(&img, w, h)
        }
        _ => img,
    };
    let bytes = decode::encode_jpeg(&img, o.quality).map_err(|e| e.0)?;
    if bytes.len() > u32::MAX as usize {
        return Err("larger than 4 GiB once encoded".into());
    }
    Ok(Prepared {
        bytes,
        converted,
        resized,
    })
}

fn prepare_file(path: &Path, o: &PackOptions) -> std::result::Result<Prepared, String> {
    let raw = std::fs::read(path).map_err(|e| format!("cannot read: {e}"))?;
    if raw.len() > u32::MAX as usize {
        return Err("larger than 4 GiB".into());
    }
    prepare(raw, o)
}

/// Files per parallel batch: 32 per thread keeps every core busy past the slowest file of a batch;
/// memory stays near 4 batches of raw files (ImageNet averages 110 KB a file: 14 MB per thread).
fn chunk_len() -> usize {
    (32 * rayon::current_num_threads()).max(256)
}

/// Packs the ImageFolder at `src` (its train/ when it has one) into `out`.
pub fn pack(src: &Path, out: &Path, o: &PackOptions) -> Result<PackSummary> {
    if !(1..=100).contains(&o.quality) {
        return Err(Error::user(format!(
            "--quality: must lie in 1..=100, got {}",
            o.quality
        )));
    }
    if o.max_side == Some(0) {
        return Err(Error::user("--max-side: must be at least 1"));
    }
    let folder = ImageFolder::open(src)?;
    if out.is_dir() {
        return Err(Error::user(format!(
            "{}: is a folder; expected the path of the packed file to write",
            out.display()
        )));
    }
    let dir = out
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    if !dir.is_dir() {
        return Err(Error::user(format!(
            "{}: no such folder to write {} in",
            dir.display(),
            out.display()
        )));
    }
    let name = out
        .file_name()
        .ok_or_else(|| Error::user(format!("{}: not a file path", out.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = write_pack(&folder, &tmp, o);
    let res = res.and_then(|s| {
        std::fs::rename(&tmp, out).map_err(|e| Error::io(out, e))?;
        std::fs::File::open(dir)
            .and_then(|d| d.sync_all())
            .map_err(|e| Error::io(dir, e))?;
        Ok(s)
    });
    if res.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    res
}

/// Progress: a bar on a terminal, a plain line every 10 s otherwise.
struct Progress {
    bar: Option<indicatif::ProgressBar>,
    plain: bool,
    total: usize,
    t0: Instant,
    last: Instant,
}

impl Progress {
    fn new(total: usize, on: bool) -> Progress {
        let tty = std::io::stderr().is_terminal();
        let bar = (on && tty).then(|| {
            let b = indicatif::ProgressBar::new(total as u64);
            b.set_style(
                indicatif::ProgressStyle::with_template(
                    "{bar:30} {pos}/{len} files [{elapsed_precise}<{eta_precise}] {per_sec}",
                )
                .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar()),
            );
            b
        });
        let now = Instant::now();
        Progress {
            bar,
            plain: on && !tty,
            total,
            t0: now,
            last: now,
        }
    }
    fn done(&mut self, n: usize, bytes: u64) {
        if self.plain && (self.last.elapsed().as_secs_f64() >= 10.0 || n == self.total) {
            self.last = Instant::now();
            let s = self.t0.elapsed().as_secs_f64();
            eprintln!(
                "pack | {n}/{} files | {:.1} MB | {:.0} files/s",
                self.total,
                bytes as f64 / 1e6,
                n as f64 / s.max(1e-9)
            );
        }
    }
    fn finish(&self) {
        if let Some(b) = &self.bar {
            b.finish_and_clear();
        }
    }
}

fn write_pack(folder: &ImageFolder, tmp: &Path, o: &PackOptions) -> Result<PackSummary> {
    let t0 = Instant::now();
    let n_all = folder.len();
    let names = names_bytes(&folder.classes);
    let index_offset = (HEADER_LEN + names.len()) as u64;
    // room for every file; entries of skipped files stay zero padding before the data
    let data_offset = index_offset + (n_all * ENTRY_LEN) as u64;
    let io = |e| Error::io(tmp, e);
    let file = std::fs::File::create(tmp).map_err(io)?;
    let mut w = std::io::BufWriter::with_capacity(1 << 22, file);
    w.write_all(&[0u8; HEADER_LEN]).map_err(io)?;
    w.write_all(&names).map_err(io)?;
    let mut zeros = std::io::Read::take(std::io::repeat(0), (n_all * ENTRY_LEN) as u64);
    std::io::copy(&mut zeros, &mut w).map_err(io)?;

    let mut s = PackSummary {
        root: folder.root.clone(),
        classes: folder.classes.len(),
        files: n_all,
        ..Default::default()
    };
    let mut entries: Vec<Entry> = Vec::with_capacity(n_all);
    let mut offset = data_offset;
    let mut prog = Progress::new(n_all, o.progress);
    let bar = prog.bar.clone();
    let (tx, rx) = std::sync::mpsc::sync_channel(2);
    let written: Result<()> = std::thread::scope(|sc| {
        // the producer prepares batch k+1 on rayon's pool while this thread writes batch k
        sc.spawn(move || {
            use rayon::prelude::*;
            for chunk in folder.samples.chunks(chunk_len()) {
                let done: Vec<_> = chunk
                    .par_iter()
                    .map(|(p, _)| {
                        let r = prepare_file(p, o).map(|pr| {
                            let crc = crc32fast::hash(&pr.bytes);
                            (pr, crc)
                        });
                        if let Some(b) = &bar {
                            b.inc(1);
                        }
                        r
                    })
                    .collect();
                if tx.send(done).is_err() {
                    return; // the writer stopped on an error
                }
            }
        });
        let mut i = 0;
        for done in rx {
            for r in done {
                let (path, label) = &folder.samples[i];
                i += 1;
                let (pr, crc) = match r {
                    Ok(x) => x,
                    Err(why) => {
                        s.skipped.push((path.clone(), why));
                        continue;
                    }
                };
                w.write_all(&pr.bytes).map_err(io)?;
                let mut flags = 0;
                match pr.converted {
                    Some(kind) => {
                        *s.converted.entry(kind).or_default() += 1;
                        flags |= FLAG_CONVERTED;
                    }
                    None if !pr.resized => s.copied += 1,
                    None => {}
                }
                if pr.resized {
                    s.resized += 1;
                    flags |= FLAG_RESIZED;
                }
                entries.push(Entry {
                    offset,
                    len: pr.bytes.len() as u32,
                    label: *label as u32,
                    crc,
                    flags,
                });
                offset += pr.bytes.len() as u64;
            }
            prog.done(i, offset - data_offset);
        }
        Ok(())
    });
    prog.finish();
    written?;
    if entries.is_empty() {
        return Err(Error::user(format!(
            "{}: none of the {n_all} image files could be read (first: {}: {})",
            folder.root.display(),
            s.skipped[0].0.display(),
            s.skipped[0].1
        )));
    }
    let mut index = Vec::with_capacity(entries.len() * ENTRY_LEN);
    for e in &entries {
        index.extend(e.to_bytes());
    }
    let mut crc = crc32fast::Hasher::new();
    crc.update(&names);
    crc.update(&index);
    let header = header_bytes(
        folder.classes.len() as u32,
        entries.len() as u64,
        index_offset,
        data_offset,
        offset,
        crc.finalize(),
    );
    let mut f = w.into_inner().map_err(|e| io(e.into_error()))?;
    (|| {
        f.seek(SeekFrom::Start(index_offset))?;
        f.write_all(&index)?;
        f.seek(SeekFrom::Start(0))?;
        f.write_all(&header)?;
        f.sync_all()
    })()
    .map_err(io)?;
    s.bytes = offset;
    s.seconds = t0.elapsed().as_secs_f64();
    Ok(s)
}

// ----------------------------------------------------------------------------
// Tests

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::decode::tests::{fixtures, max_abs_diff, mean_abs_diff, picture};
    use crate::data::folder::tests::TempDir;
    use crate::data::source::{SampleId, Source};

    fn jpeg(w: usize, h: usize, seed: u64, quality: u8, progressive: bool) -> Vec<u8> {
        let img = picture(w, h, seed);
        let mut out = Vec::new();
        let mut e = jpeg_encoder::Encoder::new(&mut out, quality);
        e.set_progressive(progressive);
        e.encode(&img.data, w as u16, h as u16, jpeg_encoder::ColorType::Rgb)
            .unwrap();
        out
    }

    /// A small ImageFolder of JPEGs: dog/ (3 files, one progressive), cat/ (2 files).
    fn jpeg_folder(t: &TempDir) -> PathBuf {
        let src = t.0.join("src");
        for (i, f) in [
            "dog/1.JPEG",
            "dog/2.jpg",
            "dog/sub/3.jpeg",
            "cat/b.JPEG",
            "cat/a.JPEG",
        ]
        .iter()
        .enumerate()
        {
            let b = jpeg(24 + 8 * i, 20 + 4 * i, i as u64, 80 + 4 * i as u8, i == 2);
            t.file(&format!("src/{f}"), &b);
        }
        src
    }

    fn pack_quiet(src: &Path, out: &Path) -> PackSummary {
        pack(src, out, &PackOptions::default()).unwrap()
    }

    #[test]
    fn round_trip_copies_jpegs_byte_for_byte() {
        let t = TempDir::new("pack-rt");
        let src = jpeg_folder(&t);
        let out = t.0.join("out.lwpk");
        let s = pack_quiet(&src, &out);
        assert_eq!(
            (
                s.files,
                s.copied,
                s.converted_total(),
                s.resized,
                s.skipped.len()
            ),
            (5, 5, 0, 0, 0)
        );
        assert_eq!(s.bytes, std::fs::metadata(&out).unwrap().len());
        // only the packed file is left beside it: the temp file was renamed
        let names: Vec<_> = std::fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names.len(), 2, "{names:?}");

        let folder = Source::open(&src).unwrap();
        let packed = Source::open(&out).unwrap();
        assert!(matches!(packed, Source::Packed(_)) && matches!(folder, Source::Folder(_)));
        assert_eq!(packed.class_names(), ["cat", "dog"]);
        assert_eq!(packed.class_names(), folder.class_names());
        assert_eq!(packed.len(), 5);
        let Source::Packed(p) = &packed else {
            unreachable!()
        };
        for i in 0..5 {
            assert_eq!(packed.label(i), folder.label(i), "label {i}");
            assert_eq!(
                packed.read(i).unwrap(),
                folder.read(i).unwrap(),
                "bytes {i}"
            );
            assert_eq!(
                packed.decode(i).unwrap(),
                folder.decode(i).unwrap(),
                "decode {i}"
            );
            assert_eq!(p.entry(i).flags, 0);
        }
        assert_eq!(
            (0..5).map(|i| packed.label(i)).collect::<Vec<_>>(),
            [0, 0, 1, 1, 1]
        );
        // sample order is torchvision's: cat/a before cat/b
        assert_eq!(folder.id(0), SampleId::File(src.join("cat/a.JPEG")));
        // packing again over an existing file replaces it
        let s2 = pack_quiet(&src, &out);
        assert_eq!(s2.bytes, s.bytes);
        assert!(
            packed.describe().contains("2 classes, 5 images"),
            "{}",
            packed.describe()
        );
    }

    /// The committed odd files: the valid ones are packed (CMYK, grayscale and the PNG converted,
    /// baseline and progressive copied), the three corrupt ones skipped and listed.
    #[test]
    fn odd_files_are_converted_or_skipped() {
        let t = TempDir::new("pack-odd");
        let src = fixtures().join("odd");
        let out = t.0.join("odd.lwpk");
        let s = pack_quiet(&src, &out);
        assert_eq!((s.files, s.copied, s.resized), (8, 2, 0));
        let conv: Vec<(&str, usize)> = s.converted.iter().map(|(k, n)| (k.as_str(), *n)).collect();
        assert_eq!(conv, [("CMYK JPEG", 1), ("PNG", 1), ("grayscale JPEG", 1)]);
        let skipped: Vec<(String, &str)> = s
            .skipped
            .iter()
            .map(|(p, why)| {
                (
                    p.file_name().unwrap().to_string_lossy().into_owned(),
                    why.as_str(),
                )
            })
            .collect();
        assert_eq!(skipped.len(), 3);
        assert_eq!(skipped[0], ("empty.JPEG".into(), "empty file"));
        assert_eq!(
            skipped[1],
            ("random.JPEG".into(), "not an image (unknown format)")
        );
        assert_eq!(skipped[2].0, "truncated.JPEG");
        assert!(
            skipped[2].1.starts_with("truncated JPEG"),
            "{}",
            skipped[2].1
        );
        let r = s.report(&out);
        assert!(
            r.contains("8 files, 2 classes")
                && r.contains("2 copied, 3 converted (1 CMYK JPEG, 1 PNG, 1 grayscale JPEG), 0 resized, 3 skipped")
                && r.contains("skipped ")
                && r.contains("truncated.JPEG: truncated JPEG"),
            "{r}"
        );

        let p = Packed::open(&out).unwrap();
        assert_eq!(
            (p.len(), p.classes()),
            (5, &["a".to_string(), "b".to_string()][..])
        );
        // a/: baseline, cmyk, gray, png, progressive
        for (i, stem) in ["baseline", "cmyk", "gray", "png", "progressive"]
            .iter()
            .enumerate()
        {
            let e = p.entry(i);
            assert_eq!(e.label, 0);
            let (img, info) = decode::decode_jpeg_info(p.checked_bytes(i).unwrap()).unwrap();
            assert!(info.is_rgb(), "{stem} is stored as RGB JPEG");
            let orig = std::fs::read(src.join(format!("a/{stem}.JPEG"))).unwrap();
            let pil =
                std::fs::read(fixtures().join("pil_rgb").join(format!("{stem}.rgb"))).unwrap();
            let d = max_abs_diff(&img.data, &pil);
            let mean = mean_abs_diff(&img.data, &pil);
            if e.flags & FLAG_CONVERTED == 0 {
                assert_eq!(p.bytes(i), &orig[..], "{stem} copied byte for byte");
            } else {
                // re-encoded at quality 90 (4:4:4): measured |packed - PIL| max 41 / 35 / 6, mean
                // 6.2 / 6.2 / 0.24 (CMYK / PNG / gray) on these noisy pictures; PIL's own q90 4:4:4
                // round trip of the same pixels: max 36 / 35, mean 6.2 / 6.2
                assert!(
                    d <= 48 && mean <= 7.0,
                    "{stem}: |packed - PIL| max {d} mean {mean:.2}"
                );
            }
            assert_eq!(
                e.flags == 0,
                ["baseline", "progressive"].contains(stem),
                "{stem} flags {}",
                e.flags
            );
        }
    }

    #[test]
    fn max_side_resizes_large_images_only() {
        let t = TempDir::new("pack-max");
        t.file("src/c/big.jpg", &jpeg(64, 48, 1, 85, false));
        t.file("src/c/small.jpg", &jpeg(20, 10, 2, 85, false));
        t.file("src/c/tall.jpg", &jpeg(30, 90, 3, 85, true));
        let out = t.0.join("m.lwpk");
        let o = PackOptions {
            max_side: Some(32),
            quality: 95,
            progress: false,
        };
        let s = pack(&t.0.join("src"), &out, &o).unwrap();
        assert_eq!((s.copied, s.resized, s.converted_total()), (1, 2, 0));
        let src = Source::open(&out).unwrap();
        let dims: Vec<_> = (0..3)
            .map(|i| src.decode(i).map(|m| (m.w, m.h)).unwrap())
            .collect();
        assert_eq!(dims, [(32, 24), (20, 10), (11, 32)]);
        let Source::Packed(p) = &src else {
            unreachable!()
        };
        assert_eq!(
            [p.entry(0).flags, p.entry(1).flags, p.entry(2).flags],
            [FLAG_RESIZED, 0, FLAG_RESIZED]
        );
        // bad options are user errors before anything is read
        for (q, m) in [(0u8, None), (101, None), (90, Some(0))] {
            let o = PackOptions {
                max_side: m,
                quality: q,
                progress: false,
            };
            assert_eq!(pack(&t.0.join("src"), &out, &o).unwrap_err().exit_code(), 2);
        }
    }

    /// Damaged packed files: wrong magic, version, truncation, appended bytes, a corrupt index or
    /// header give one-line user errors naming the file; a corrupt sample is a SampleError for that
    /// sample only.
    #[test]
    fn damaged_files_are_refused_and_corrupt_samples_reported() {
        let t = TempDir::new("pack-bad");
        let src = jpeg_folder(&t);
        let good = t.0.join("good.lwpk");
        pack_quiet(&src, &good);
        let bytes = std::fs::read(&good).unwrap();
        let bad = t.0.join("bad.lwpk");
        let open_err = |b: &[u8]| {
            std::fs::write(&bad, b).unwrap();
            let e = Packed::open(&bad).unwrap_err();
            let m = e.to_string();
            assert_eq!(e.exit_code(), 2, "{m}");
            assert!(
                !m.contains('\n') && m.starts_with(&*bad.display().to_string()),
                "{m}"
            );
            m
        };
        let mut b = bytes.clone();
        b[0] = b'X';
        assert!(open_err(&b).contains("not a lewel packed file"));
        std::fs::write(&bad, &b).unwrap();
        let e = Source::open(&bad).unwrap_err().to_string();
        assert!(
            e.contains("neither a folder nor a lewel packed file"),
            "{e}"
        );
        let mut b = bytes.clone();
        b[8] = 2;
        assert!(open_err(&b).contains("version 2, this build reads version 1"));
        assert!(open_err(&bytes[..bytes.len() - 10]).contains("truncated"));
        assert!(open_err(&bytes[..20]).contains("truncated: 20 bytes"));
        assert!(open_err(&bytes[..5]).contains("truncated: 5 bytes"));
        assert!(open_err(&[]).contains("truncated: 0 bytes"));
        let mut b = bytes.clone();
        b.extend([0; 3]);
        assert!(open_err(&b).contains("bytes were appended"));
        let mut b = bytes.clone();
        b[16] ^= 1; // sample count, under the header CRC
        assert!(open_err(&b).contains("corrupt header"));
        let index_offset = u64_at(&bytes, 24) as usize;
        let mut b = bytes.clone();
        b[index_offset + ENTRY_LEN + 12] ^= 1; // label of entry 1
        assert!(open_err(&b).contains("corrupt class names or index (CRC mismatch)"));
        let mut b = bytes.clone();
        b[HEADER_LEN + 5] ^= 1; // a class name
        assert!(open_err(&b).contains("CRC mismatch"));

        // a flipped bit in sample 1: the file opens, sample 1 is a SampleError, the others read
        let p = Packed::open(&good).unwrap();
        let e1 = p.entry(1);
        let mut b = bytes.clone();
        b[e1.offset as usize + e1.len as usize / 2] ^= 0x10;
        std::fs::write(&bad, &b).unwrap();
        let s = Source::open(&bad).unwrap();
        let err = s.read(1).unwrap_err();
        assert_eq!(
            err.sample,
            SampleId::Packed {
                file: bad.clone(),
                index: 1
            }
        );
        assert!(err.reason.starts_with("corrupt sample (CRC"), "{err}");
        assert!(
            err.to_string()
                .contains("bad.lwpk sample 1: corrupt sample"),
            "{err}"
        );
        assert!(s.decode(1).is_err());
        for i in [0, 2, 3, 4] {
            assert_eq!(s.read(i).unwrap(), p.bytes(i), "sample {i}");
        }
    }

    #[test]
    fn bad_paths_are_user_errors_and_leave_no_temp_file() {
        let t = TempDir::new("pack-paths");
        let src = jpeg_folder(&t);
        let o = PackOptions::default();
        let e = pack(&src, &t.0.join("nope/out.lwpk"), &o).unwrap_err();
        assert!(e.to_string().contains("no such folder to write"), "{e}");
        let e = pack(&src, &t.0, &o).unwrap_err();
        assert!(e.to_string().contains("is a folder"), "{e}");
        let e = pack(&t.0.join("missing"), &t.0.join("x.lwpk"), &o).unwrap_err();
        assert!(e.to_string().contains("no such folder"), "{e}");
        // every file unreadable: an error, and the temp file is gone
        t.file("junk/c/1.jpg", b"not a jpeg");
        let e = pack(&t.0.join("junk"), &t.0.join("j.lwpk"), &o).unwrap_err();
        assert!(
            e.to_string()
                .contains("none of the 1 image files could be read"),
            "{e}"
        );
        let left: Vec<_> = std::fs::read_dir(&t.0)
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(left.len(), 2, "{left:?}"); // src, junk
        let e = Source::open(&t.0.join("missing")).unwrap_err();
        assert!(e.to_string().contains("no such file or folder"), "{e}");
        // a folder sample that does not decode is a SampleError naming the file
        let s = Source::open(&t.0.join("junk")).unwrap();
        let err = s.decode(0).unwrap_err();
        assert_eq!(err.sample, SampleId::File(t.0.join("junk/c/1.jpg")));
        assert_eq!(err.reason, "not an image (unknown format)");
    }
}
