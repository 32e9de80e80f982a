//! The two file formats of `torch.save`, read without running anything:
//!
//! - zip (PyTorch >= 1.6): `<prefix>/data.pkl` (the pickle), `<prefix>/data/<key>` (each storage's
//!   raw bytes, little-endian unless `<prefix>/byteorder` says otherwise), `<prefix>/version`. The
//!   entries are stored uncompressed; their CRC32s are checked. Zip64 records are read.
//! - legacy (`_use_new_zipfile_serialization=False`, what the official `extract_backbone.py`
//!   writes): five pickles back to back (the magic number 0x1950a86a20f9469cfc6c, the protocol
//!   version 1001, sys_info, the object, the sorted list of storage keys), then for each key in that
//!   order its element count (i64 little-endian) and its raw bytes.
//!
//! A tensor is materialized from its storage, offset, sizes and strides (any strides, bounds-checked)
//! into contiguous row-major bytes.

use super::pickle::{self, Elem, Obj, TensorRef};
use std::collections::HashMap;

/// Which of the two formats a file is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Format {
    Zip,
    Legacy,
}

impl Format {
    pub fn name(self) -> &'static str {
        match self {
            Format::Zip => "zip format",
            Format::Legacy => "legacy format",
        }
    }
}

/// A record's bytes in the file, and its CRC32 where the format keeps one.
#[derive(Clone, Copy, Debug)]
struct Span {
    start: usize,
    len: usize,
    crc: Option<u32>,
}

/// A parsed checkpoint: its object and where each storage record lies.
pub struct TorchFile {
    bytes: Vec<u8>,
    pub format: Format,
    pub root: Obj,
    records: HashMap<String, Span>,
}

/// Errors here are one line without the file's name (the caller adds it).
type Res<T> = std::result::Result<T, String>;

const LEGACY_MAGIC: [u8; 10] = [0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19];

impl TorchFile {
    pub fn parse(bytes: Vec<u8>) -> Res<TorchFile> {
        if bytes.starts_with(b"PK\x03\x04") || bytes.starts_with(b"PK\x05\x06") {
            return parse_zip(bytes);
        }
        if bytes.len() > 262 && &bytes[257..262] == b"ustar" {
            return Err("a tar archive: the tar format of PyTorch < 0.4 is not read".into());
        }
        if bytes.first() == Some(&0x80) {
            return parse_legacy(bytes);
        }
        Err(
            "not a PyTorch checkpoint (neither a torch.save zip archive nor a legacy pickle)"
                .into(),
        )
    }

    /// The tensor's values as contiguous row-major bytes in its element type.
    pub fn tensor_bytes(&self, t: &TensorRef) -> Res<Vec<u8>> {
        let s = &t.storage;
        let es = s.elem.size();
        let span = self
            .records
            .get(&s.key)
            .ok_or_else(|| format!("storage '{}' is not in the file", s.key))?;
        let rec = &self.bytes[span.start..span.start + span.len];
        if let Some(crc) = span.crc {
            // miniz writes 0 when PyTorch was told not to compute CRCs.
            if crc != 0 && crc32fast::hash(rec) != crc {
                return Err(format!(
                    "storage '{}' fails its CRC32 check: the file is damaged",
                    s.key
                ));
            }
        }
        let rec_numel = rec.len() / es;
        let end = s.offset.checked_add(s.numel);
        if end.is_none_or(|e| e > rec_numel) {
            return Err(format!(
                "storage '{}' holds {} {} values, the pickle says {} from {}: the file is truncated or damaged",
                s.key,
                rec_numel,
                s.elem.name(),
                s.numel,
                s.offset
            ));
        }
        let storage = &rec[s.offset * es..(s.offset + s.numel) * es];
        let numel = t
            .size
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or("a tensor whose size overflows")?;
        if numel == 0 {
            return Ok(Vec::new());
        }
        // The largest element the view reaches must lie inside the storage.
        let mut last = t.offset;
        for (&d, &st) in t.size.iter().zip(&t.stride) {
            last = (d - 1)
                .checked_mul(st)
                .and_then(|x| x.checked_add(last))
                .ok_or("a tensor whose strides overflow")?;
        }
        if last >= s.numel {
            return Err(format!(
                "a tensor of size {:?}, stride {:?}, offset {} reaches past its storage of {} values",
                t.size, t.stride, t.offset, s.numel
            ));
        }
        let mut expect = 1;
        let contiguous = t.size.iter().zip(&t.stride).rev().all(|(&d, &st)| {
            let ok = d == 1 || st == expect;
            expect *= d;
            ok
        });
        if contiguous {
            return Ok(storage[t.offset * es..(t.offset + numel) * es].to_vec());
        }
        // Any other strides: gather element by element in row-major order.
        let mut out = Vec::with_capacity(numel * es);
        let mut idx = vec![0usize; t.size.len()];
        for _ in 0..numel {
            let at = t.offset + idx.iter().zip(&t.stride).map(|(i, s)| i * s).sum::<usize>();
            out.extend_from_slice(&storage[at * es..(at + 1) * es]);
            for k in (0..idx.len()).rev() {
                idx[k] += 1;
                if idx[k] < t.size[k] {
                    break;
                }
                idx[k] = 0;
            }
        }
        Ok(out)
    }
}

// ----------------------------------------------------------------------------
// zip

fn u16_at(b: &[u8], at: usize) -> Res<u16> {
    b.get(at..at + 2)
        .map(|s| u16::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| "the zip archive is truncated".to_string())
}
fn u32_at(b: &[u8], at: usize) -> Res<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| "the zip archive is truncated".to_string())
}
fn u64_at(b: &[u8], at: usize) -> Res<u64> {
    b.get(at..at + 8)
        .map(|s| u64::from_le_bytes(s.try_into().unwrap()))
        .ok_or_else(|| "the zip archive is truncated".to_string())
}
fn to_usize(v: u64) -> Res<usize> {
    usize::try_from(v).map_err(|_| "a zip offset too large for this machine".to_string())
}

/// Every entry of a stored (uncompressed) zip archive: name -> where its bytes lie.
fn zip_entries(b: &[u8]) -> Res<HashMap<String, Span>> {
    const EOCD: u32 = 0x0605_4b50;
    let truncated = || "the zip archive is truncated (no end-of-directory record)".to_string();
    if b.len() < 22 {
        return Err(truncated());
    }
    let lo = b.len().saturating_sub(22 + 65535);
    let eocd = (lo..=b.len() - 22)
        .rev()
        .find(|&i| u32_at(b, i).ok() == Some(EOCD))
        .ok_or_else(truncated)?;
    let mut count = u16_at(b, eocd + 10)? as u64;
    let mut cd_size = u32_at(b, eocd + 12)? as u64;
    let mut cd_off = u32_at(b, eocd + 16)? as u64;
    if count == 0xffff || cd_size == 0xffff_ffff || cd_off == 0xffff_ffff {
        // Zip64: the locator sits just before the end record and points at the zip64 record.
        let loc = eocd.checked_sub(20).ok_or_else(truncated)?;
        if u32_at(b, loc)? != 0x0706_4b50 {
            return Err("the zip64 locator is missing".into());
        }
        let rec = to_usize(u64_at(b, loc + 8)?)?;
        if u32_at(b, rec)? != 0x0606_4b50 {
            return Err("the zip64 end-of-directory record is missing".into());
        }
        count = u64_at(b, rec + 32)?;
        cd_size = u64_at(b, rec + 40)?;
        cd_off = u64_at(b, rec + 48)?;
    }
    let cd_off = to_usize(cd_off)?;
    if cd_off
        .checked_add(to_usize(cd_size)?)
        .is_none_or(|e| e > b.len())
    {
        return Err("the zip directory lies past the end of the file (truncated?)".into());
    }
    let mut out = HashMap::new();
    let mut at = cd_off;
    for _ in 0..count {
        if u32_at(b, at)? != 0x0201_4b50 {
            return Err("a zip directory entry is damaged".into());
        }
        let method = u16_at(b, at + 10)?;
        let crc = u32_at(b, at + 16)?;
        let mut csize = u32_at(b, at + 20)? as u64;
        let mut usize_ = u32_at(b, at + 24)? as u64;
        let n = u16_at(b, at + 28)? as usize;
        let e = u16_at(b, at + 30)? as usize;
        let c = u16_at(b, at + 32)? as usize;
        let mut local = u32_at(b, at + 42)? as u64;
        let name = b
            .get(at + 46..at + 46 + n)
            .ok_or("the zip archive is truncated")?;
        let name = String::from_utf8_lossy(name).into_owned();
        // Zip64 extra field (id 1): the 8-byte values of the fields that read 0xffffffff, in order.
        let extra = b
            .get(at + 46 + n..at + 46 + n + e)
            .ok_or("the zip archive is truncated")?;
        let mut x = 0;
        while x + 4 <= extra.len() {
            let id = u16_at(extra, x)?;
            let len = u16_at(extra, x + 2)? as usize;
            if id == 1 {
                let mut f = x + 4;
                for v in [&mut usize_, &mut csize, &mut local] {
                    if *v == 0xffff_ffff {
                        *v = u64_at(extra, f)?;
                        f += 8;
                    }
                }
            }
            x += 4 + len;
        }
        if method != 0 || csize != usize_ {
            return Err(format!(
                "zip entry {name} is compressed (method {method}); torch.save stores entries uncompressed"
            ));
        }
        let local = to_usize(local)?;
        if u32_at(b, local)? != 0x0403_4b50 {
            return Err(format!("the zip header of {name} is damaged"));
        }
        let start = local + 30 + u16_at(b, local + 26)? as usize + u16_at(b, local + 28)? as usize;
        let len = to_usize(csize)?;
        if start.checked_add(len).is_none_or(|e| e > b.len()) {
            return Err(format!(
                "zip entry {name} lies past the end of the file (truncated?)"
            ));
        }
        out.insert(
            name,
            Span {
                start,
                len,
                crc: Some(crc),
            },
        );
        at += 46 + n + e + c;
    }
    Ok(out)
}

fn parse_zip(bytes: Vec<u8>) -> Res<TorchFile> {
    let entries = zip_entries(&bytes)?;
    // The pickle is <prefix>/data.pkl; the prefix is "archive" or the saved file's stem.
    let pkl = entries
        .keys()
        .filter(|k| k.ends_with("data.pkl") && k.matches('/').count() <= 1)
        .min_by_key(|k| k.len())
        .cloned()
        .ok_or("a zip archive without data.pkl: not a torch.save checkpoint")?;
    let prefix = pkl[..pkl.len() - "data.pkl".len()].to_string();
    if entries.contains_key(&format!("{prefix}constants.pkl")) {
        return Err(
            "a TorchScript archive (torch.jit.save); save the model's state_dict() with torch.save"
                .into(),
        );
    }
    let read = |name: &str| -> Res<&[u8]> {
        let s = entries[name];
        let b = &bytes[s.start..s.start + s.len];
        match s.crc {
            Some(c) if c != 0 && crc32fast::hash(b) != c => {
                Err(format!("{name} fails its CRC32 check: the file is damaged"))
            }
            _ => Ok(b),
        }
    };
    let order = format!("{prefix}byteorder");
    if entries.contains_key(&order) {
        let o = read(&order)?;
        if o != b"little" {
            return Err(format!(
                "the storages are {}-endian; only little-endian files are read",
                String::from_utf8_lossy(o)
            ));
        }
    }
    let loaded = pickle::load(read(&pkl)?)?;
    let mut records = HashMap::new();
    for s in &loaded.storages {
        let name = format!("{prefix}data/{}", s.key);
        let span = entries
            .get(&name)
            .ok_or_else(|| format!("storage '{}' ({name}) is not in the archive", s.key))?;
        records.insert(s.key.clone(), *span);
    }
    Ok(TorchFile {
        bytes,
        format: Format::Zip,
        root: loaded.obj,
        records,
    })
}

// ----------------------------------------------------------------------------
// legacy

fn parse_legacy(bytes: Vec<u8>) -> Res<TorchFile> {
    let mut at = 0;
    let mut next = |what: &str| -> Res<pickle::Loaded> {
        let l = pickle::load(&bytes[at..]).map_err(|e| {
            if e.starts_with("refuses") {
                e
            } else {
                format!("in the legacy file's {what}: {e}")
            }
        })?;
        at += l.end;
        Ok(l)
    };
    let magic = next("magic number")?;
    let is_magic = match &magic.obj {
        Obj::BigInt(b) => b.as_slice() == LEGACY_MAGIC,
        _ => false,
    };
    if !is_magic {
        return Err("a pickle, but not a PyTorch checkpoint (no torch.save magic number)".into());
    }
    let version = next("protocol version")?;
    if version.obj != Obj::Int(1001) {
        return Err(format!(
            "legacy protocol version {:?}, expected 1001",
            version.obj
        ));
    }
    let info = next("sys_info")?;
    if info.obj.get("little_endian") == Some(&Obj::Bool(false)) {
        return Err("a big-endian file; only little-endian files are read".into());
    }
    let object = next("object")?;
    let keys = next("storage key list")?;
    let keys: Vec<String> = match &keys.obj {
        Obj::List(k) => k
            .iter()
            .map(|k| match k {
                Obj::Str(s) => Ok(s.clone()),
                _ => Err("a storage key that is not a string".to_string()),
            })
            .collect::<Res<_>>()?,
        o => return Err(format!("the storage key list is a {}", o.kind())),
    };
    let elem: HashMap<&str, Elem> = object
        .storages
        .iter()
        .map(|s| (s.key.as_str(), s.elem))
        .collect();
    let mut records = HashMap::new();
    for k in &keys {
        let es = elem
            .get(k.as_str())
            .ok_or_else(|| format!("storage '{k}' is listed but no tensor uses it"))?
            .size();
        let n = bytes
            .get(at..at + 8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .ok_or_else(|| format!("the file ends before storage '{k}' (truncated)"))?;
        let len = usize::try_from(n)
            .ok()
            .and_then(|n| n.checked_mul(es))
            .ok_or_else(|| format!("storage '{k}' has a bad element count {n}"))?;
        let start = at + 8;
        if start.checked_add(len).is_none_or(|e| e > bytes.len()) {
            return Err(format!(
                "the file ends inside storage '{k}' ({len} bytes from byte {start} of {}): truncated",
                bytes.len()
            ));
        }
        records.insert(
            k.clone(),
            Span {
                start,
                len,
                crc: None,
            },
        );
        at = start + len;
    }
    for s in &object.storages {
        if !records.contains_key(&s.key) {
            return Err(format!("storage '{}' is not in the file's key list", s.key));
        }
    }
    Ok(TorchFile {
        bytes,
        format: Format::Legacy,
        root: object.obj,
        records,
    })
}

/// A storage reference with its key, for tests.
#[cfg(test)]
pub(crate) fn storage(elem: Elem, key: &str, numel: usize) -> pickle::StorageRef {
    pickle::StorageRef {
        elem,
        key: key.into(),
        location: "cpu".into(),
        offset: 0,
        numel,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(key: &str, data: Vec<u8>) -> TorchFile {
        let mut records = HashMap::new();
        records.insert(
            key.to_string(),
            Span {
                start: 0,
                len: data.len(),
                crc: None,
            },
        );
        TorchFile {
            bytes: data,
            format: Format::Zip,
            root: Obj::None,
            records,
        }
    }

    fn f32s(b: &[u8]) -> Vec<f32> {
        b.chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
            .collect()
    }

    #[test]
    fn strided_views_are_materialized_row_major() {
        let v: Vec<f32> = (0..12).map(|i| i as f32).collect();
        let f = file_with("0", bytemuck::cast_slice(&v).to_vec());
        let t = |offset, size: &[usize], stride: &[usize]| TensorRef {
            storage: storage(Elem::F32, "0", 12),
            offset,
            size: size.to_vec(),
            stride: stride.to_vec(),
        };
        // contiguous (2, 3) from offset 1
        let b = f.tensor_bytes(&t(1, &[2, 3], &[3, 1])).unwrap();
        assert_eq!(f32s(&b), [1., 2., 3., 4., 5., 6.]);
        // the transpose of a (3, 4) matrix: (4, 3) with strides (1, 4)
        let b = f.tensor_bytes(&t(0, &[4, 3], &[1, 4])).unwrap();
        assert_eq!(f32s(&b), [0., 4., 8., 1., 5., 9., 2., 6., 10., 3., 7., 11.]);
        // a broadcast (stride 0) and a scalar
        let b = f.tensor_bytes(&t(5, &[3], &[0])).unwrap();
        assert_eq!(f32s(&b), [5., 5., 5.]);
        let b = f.tensor_bytes(&t(7, &[], &[])).unwrap();
        assert_eq!(f32s(&b), [7.]);
        // past the end of the storage: one line, no panic
        for (o, s, st) in [(1, vec![3, 4], vec![4, 1]), (0, vec![2], vec![usize::MAX])] {
            let e = f.tensor_bytes(&t(o, &s, &st)).unwrap_err();
            assert!(!e.contains('\n'), "{e}");
        }
        // a storage that starts inside its record (a legacy view): element 8 on
        let mut view = t(1, &[2], &[2]);
        view.storage.offset = 8;
        view.storage.numel = 4;
        assert_eq!(f32s(&f.tensor_bytes(&view).unwrap()), [9., 11.]);
        // a storage claiming more values than its record holds
        let mut big = t(0, &[2], &[1]);
        big.storage.numel = 13;
        assert!(f.tensor_bytes(&big).unwrap_err().contains("truncated"));
    }

    #[test]
    fn not_a_checkpoint_is_one_line() {
        for b in [
            b"hello".to_vec(),
            vec![],
            b"PK\x03\x04 not really".to_vec(),
            vec![0x80, 2, b'K', 1, b'.'],
        ] {
            let e = TorchFile::parse(b).err().unwrap();
            assert!(!e.contains('\n'), "{e}");
        }
    }
}
