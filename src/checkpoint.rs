//! State files: safetensors with the official module names in PyTorch layouts (conv OIHW, the MLP
//! heads' Conv1d [out, in, 1], `num_batches_tracked` as an i64 scalar), so official checkpoints
//! convert in and our runs convert out. Writes are atomic: a temp file beside the target, fsync,
//! rename, fsync of the folder; a crash leaves either the old file or the new one, never half of one.

use crate::error::{Error, Result};
use crate::memory::ParamStore;
use crate::tensor::Shape;
use safetensors::{Dtype, SafeTensors};
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// One tensor held in memory, in its file layout.
#[derive(Clone, Debug, PartialEq)]
pub struct Owned {
    pub dtype: Dtype,
    pub shape: Vec<usize>,
    pub bytes: Vec<u8>,
}

impl Owned {
    pub fn f32(shape: Vec<usize>, v: &[f32]) -> Owned {
        assert_eq!(
            shape.iter().product::<usize>(),
            v.len(),
            "Owned::f32: shape {shape:?} vs {} values",
            v.len()
        );
        Owned {
            dtype: Dtype::F32,
            shape,
            bytes: bytemuck::cast_slice(v).to_vec(),
        }
    }
    pub fn i64_scalar(v: i64) -> Owned {
        Owned {
            dtype: Dtype::I64,
            shape: vec![],
            bytes: v.to_le_bytes().to_vec(),
        }
    }
    pub fn i64(shape: Vec<usize>, v: &[i64]) -> Owned {
        assert_eq!(
            shape.iter().product::<usize>(),
            v.len(),
            "Owned::i64: shape {shape:?} vs {} values",
            v.len()
        );
        Owned {
            dtype: Dtype::I64,
            shape,
            bytes: v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        }
    }
    pub fn to_f32(&self) -> Option<Vec<f32>> {
        (self.dtype == Dtype::F32).then(|| {
            self.bytes
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect()
        })
    }
    pub fn to_i64(&self) -> Option<i64> {
        (self.dtype == Dtype::I64 && self.bytes.len() == 8)
            .then(|| i64::from_le_bytes(self.bytes[..8].try_into().unwrap()))
    }
}

/// Named tensors in name order.
pub type Tensors = BTreeMap<String, Owned>;

/// The metadata key of the CRC32 that every file we write carries over its tensors, so a damaged
/// file is caught however it is named or wherever it was copied.
pub const CRC_KEY: &str = "lewel_crc32";

/// CRC32 over the tensors in name order: each name, dtype, shape and bytes.
fn tensors_crc(t: &Tensors) -> u32 {
    let mut h = crc32fast::Hasher::new();
    for (name, o) in t {
        h.update(name.as_bytes());
        h.update(format!("{:?}{:?}", o.dtype, o.shape).as_bytes());
        h.update(&o.bytes);
    }
    h.finalize()
}

/// Reads a whole safetensors file, checking its CRC when it carries one. Errors name the file.
pub fn read_file(path: &Path) -> Result<Tensors> {
    let bytes = std::fs::read(path).map_err(|e| Error::io(path, e))?;
    read_bytes(&bytes, path)
}

/// A safetensors file's tensors from its bytes (`path` names it in errors).
pub fn read_bytes(bytes: &[u8], path: &Path) -> Result<Tensors> {
    let (_, meta) = SafeTensors::read_metadata(bytes)
        .map_err(|e| Error::user(format!("{}: not a safetensors file ({e})", path.display())))?;
    let st = SafeTensors::deserialize(bytes)
        .map_err(|e| Error::user(format!("{}: not a safetensors file ({e})", path.display())))?;
    let mut out = Tensors::new();
    for (name, view) in st.tensors() {
        out.insert(
            name,
            Owned {
                dtype: view.dtype(),
                shape: view.shape().to_vec(),
                bytes: view.data().to_vec(),
            },
        );
    }
    if let Some(want) = meta.metadata().as_ref().and_then(|m| m.get(CRC_KEY)) {
        let got = format!("{:08x}", tensors_crc(&out));
        if &got != want {
            return Err(Error::user(format!(
                "{}: CRC32 {got}, the file says {want}: the file is damaged",
                path.display()
            )));
        }
    }
    Ok(out)
}

/// Writes `tensors` to `path` atomically.
pub fn write_file_atomic(
    path: &Path,
    tensors: &Tensors,
    metadata: Option<HashMap<String, String>>,
) -> Result<()> {
    let mut metadata = metadata.unwrap_or_default();
    metadata.insert(CRC_KEY.to_string(), format!("{:08x}", tensors_crc(tensors)));
    let views = tensors
        .iter()
        .map(|(n, t)| {
            Ok((
                n.clone(),
                safetensors::tensor::TensorView::new(t.dtype, t.shape.clone(), &t.bytes)
                    .map_err(|e| Error::Other(format!("{n}: {e}")))?,
            ))
        })
        .collect::<Result<Vec<_>>>()?;
    let bytes = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| Error::Other(format!("serializing {}: {e}", path.display())))?;
    write_bytes_atomic(path, &bytes)
}

/// temp file, fsync, rename, fsync the folder.
pub fn write_bytes_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let name = path
        .file_name()
        .ok_or_else(|| Error::user(format!("{}: not a file path", path.display())))?;
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let res = (|| {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(dir)?.sync_all()
    })();
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        return Err(Error::io(path, e));
    }
    Ok(())
}

// ----------------------------------------------------------------------------
// Layouts

/// Our shape and data of a parameter -> PyTorch's: conv [O, kh, kw, I] -> OIHW; linear [O, I] ->
/// the Conv1d [O, I, 1]; vectors unchanged.
pub fn to_torch(shape: Shape, v: &[f32]) -> (Vec<usize>, Vec<f32>) {
    match *shape.dims() {
        [o, kh, kw, i] => {
            let mut out = vec![0.0; v.len()];
            for a in 0..o {
                for y in 0..kh {
                    for x in 0..kw {
                        for c in 0..i {
                            out[((a * i + c) * kh + y) * kw + x] =
                                v[((a * kh + y) * kw + x) * i + c];
                        }
                    }
                }
            }
            (vec![o, i, kh, kw], out)
        }
        [o, i] => (vec![o, i, 1], v.to_vec()),
        _ => (shape.dims().to_vec(), v.to_vec()),
    }
}

/// PyTorch's layout -> ours, for a tensor whose shape in our layout is `ours`.
pub fn from_torch(ours: Shape, v: &[f32]) -> Vec<f32> {
    match *ours.dims() {
        [o, kh, kw, i] => {
            let mut out = vec![0.0; v.len()];
            for a in 0..o {
                for c in 0..i {
                    for y in 0..kh {
                        for x in 0..kw {
                            out[((a * kh + y) * kw + x) * i + c] =
                                v[((a * i + c) * kh + y) * kw + x];
                        }
                    }
                }
            }
            out
        }
        _ => v.to_vec(),
    }
}

/// PyTorch's shape of one of our tensors.
pub fn torch_shape(ours: Shape) -> Vec<usize> {
    match *ours.dims() {
        [o, kh, kw, i] => vec![o, i, kh, kw],
        [o, i] => vec![o, i, 1],
        _ => ours.dims().to_vec(),
    }
}

// ----------------------------------------------------------------------------
// Stores <-> files

/// Every tensor of a store (parameters, buffers, counters) in PyTorch layout, under the store's names.
pub fn store_tensors(s: &ParamStore<f32>) -> Tensors {
    let mut out = Tensors::new();
    for e in &s.table.entries {
        let (sh, v) = to_torch(e.shape, &s.params[e.range()]);
        out.insert(e.name.clone(), Owned::f32(sh, &v));
    }
    for e in &s.buffer_table.entries {
        out.insert(
            e.name.clone(),
            Owned::f32(e.shape.dims().to_vec(), &s.buffers[e.range()]),
        );
    }
    for (n, c) in &s.counters {
        out.insert(n.clone(), Owned::i64_scalar(*c));
    }
    out
}

/// Loads every tensor of a store from `t` (names as in the store). All mismatches are collected and
/// the first few are reported in one line, naming `what` (the file).
pub fn load_store(s: &mut ParamStore<f32>, t: &Tensors, what: &str) -> Result<()> {
    let mut bad = Vec::new();
    let mut check = |name: &str, dtype: Dtype, shape: &[usize]| -> Option<Owned> {
        match t.get(name) {
            None => {
                bad.push(format!("{name} missing"));
                None
            }
            Some(o) if o.dtype != dtype || o.shape != shape => {
                bad.push(format!(
                    "{name} is {:?} {:?}, expected {dtype:?} {shape:?}",
                    o.dtype, o.shape
                ));
                None
            }
            Some(o) => Some(o.clone()),
        }
    };
    let mut loads: Vec<(usize, Vec<f32>)> = Vec::new();
    for (i, e) in s.table.entries.iter().enumerate() {
        if let Some(o) = check(&e.name, Dtype::F32, &torch_shape(e.shape)) {
            loads.push((i, from_torch(e.shape, &o.to_f32().unwrap())));
        }
    }
    let mut buf_loads = Vec::new();
    for (i, e) in s.buffer_table.entries.iter().enumerate() {
        if let Some(o) = check(&e.name, Dtype::F32, e.shape.dims()) {
            buf_loads.push((i, o.to_f32().unwrap()));
        }
    }
    let mut counts = Vec::new();
    for (i, (n, _)) in s.counters.iter().enumerate() {
        if let Some(o) = check(n, Dtype::I64, &[]) {
            counts.push((i, o.to_i64().unwrap()));
        }
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(4);
        return Err(Error::user(format!(
            "{what}: does not match the architecture ({n} mismatched tensors): {}{}",
            bad.join("; "),
            if n > 4 { "; ..." } else { "" }
        )));
    }
    for (i, v) in loads {
        let r = s.table.range(i);
        s.params[r].copy_from_slice(&v);
    }
    for (i, v) in buf_loads {
        let r = s.buffer_table.range(i);
        s.buffers[r].copy_from_slice(&v);
    }
    for (i, c) in counts {
        s.counters[i].1 = c;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layouts_round_trip() {
        let sh = Shape::new(&[2, 3, 1, 4]);
        let v: Vec<f32> = (0..24).map(|i| i as f32).collect();
        let (ts, tv) = to_torch(sh, &v);
        assert_eq!(ts, vec![2, 4, 3, 1]);
        // OIHW [o=0, i=1, h=2, w=0] = ours [o=0, h=2, w=0, i=1]
        assert_eq!(tv[5], v[9]); // OIHW index (0*4 + 1)*3 + 2 = ours (0*3 + 2)*4 + 1
        assert_eq!(from_torch(sh, &tv), v);
        assert_eq!(torch_shape(Shape::new(&[5, 7])), vec![5, 7, 1]);
    }

    #[test]
    fn store_round_trip_and_mismatch_report() {
        let mut s = ParamStore::<f32>::new();
        s.add_param("a.weight", Shape::new(&[2, 3, 3, 1]), |i| i as f32);
        s.add_param("a.mlp.0.weight", Shape::new(&[4, 2]), |i| -(i as f32));
        s.add_buffer("a.running_var", Shape::new(&[2]), 1.5);
        s.add_counter("a.num_batches_tracked");
        s.counters[0].1 = 7;
        let t = store_tensors(&s);
        let dir = std::env::temp_dir().join(format!("lewel-ckpt-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("s.safetensors");
        write_file_atomic(&p, &t, None).unwrap();
        let back = read_file(&p).unwrap();
        assert_eq!(back, t);
        let mut s2 = ParamStore::<f32>::new();
        s2.add_param("a.weight", Shape::new(&[2, 3, 3, 1]), |_| 0.0);
        s2.add_param("a.mlp.0.weight", Shape::new(&[4, 2]), |_| 0.0);
        s2.add_buffer("a.running_var", Shape::new(&[2]), 0.0);
        s2.add_counter("a.num_batches_tracked");
        load_store(&mut s2, &back, "s.safetensors").unwrap();
        assert_eq!(
            (s2.params.clone(), s2.buffers.clone(), s2.counters[0].1),
            (s.params.clone(), s.buffers.clone(), 7)
        );
        let mut s3 = ParamStore::<f32>::new();
        s3.add_param("a.weight", Shape::new(&[2, 3, 3, 2]), |_| 0.0);
        s3.add_param("b.weight", Shape::new(&[1]), |_| 0.0);
        let e = load_store(&mut s3, &back, "s.safetensors").unwrap_err();
        let m = e.to_string();
        assert!(
            m.contains("a.weight is F32 [2, 1, 3, 3], expected F32 [2, 2, 3, 3]")
                && m.contains("b.weight missing"),
            "{m}"
        );
        assert_eq!(e.exit_code(), 2);
        assert!(std::fs::read_dir(&dir).unwrap().all(|f| !f
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp-")));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
