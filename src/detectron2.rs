//! `lewel export --format detectron2`: the online backbone as a weights file that detectron2 loads
//! as `MODEL.WEIGHTS` (configs in `configs/detectron2/`), written by this binary, no Python.
//!
//! Names: torchvision's ResNet -> detectron2's ResNet (detectron2/modeling/backbone/resnet.py, the
//! rules of its tools/convert-torchvision-to-d2.py):
//!   conv1.weight                    -> stem.conv1.weight
//!   bn1.{p}                         -> stem.conv1.norm.{p}
//!   layer{L}.{b}.conv{j}.weight     -> res{L+1}.{b}.conv{j}.weight
//!   layer{L}.{b}.bn{j}.{p}          -> res{L+1}.{b}.conv{j}.norm.{p}
//!   layer{L}.{b}.downsample.0.weight -> res{L+1}.{b}.shortcut.weight
//!   layer{L}.{b}.downsample.1.{p}   -> res{L+1}.{b}.shortcut.norm.{p}
//! with p in weight, bias, running_mean, running_var. `num_batches_tracked` is not carried (the
//! loader gives a BN without it a fresh counter) and neither is an `fc` (detection has none).
//! Values are unchanged: both sides are OIHW float32, and detectron2's ResNet with STRIDE_IN_1X1
//! False is torchvision's v1.5 topology.
//!
//! File: a pickle (protocol 2) of {'model': {name: numpy float32 array}, '__author__': 'lewel',
//! 'matching_heuristics': True}, as detectron2's DetectionCheckpointer wants a `.pkl`
//! (detectron2/checkpoint/detection_checkpoint.py): with both 'model' and '__author__' the dict is
//! taken as it is (without '__author__' it would be read as Caffe2 blobs and renamed); an author
//! other than "Caffe2" keeps our names; `matching_heuristics` lets
//! detectron2/checkpoint/c2_model_loading.py::align_and_update_state_dicts match each name as a
//! suffix of the model's (`backbone.bottom_up.res2.0.conv1.weight` in FPN, `roi_heads.res5.*` in
//! C4). Each array is pickled as numpy does: `numpy.core.multiarray._reconstruct(numpy.ndarray,
//! (0,), 'b')` then BUILD with (1, shape, dtype('<f4'), False, data); the data are bytes made at
//! load time by `_codecs.encode(str, 'latin1')` from a unicode string whose code points are the
//! bytes, which is how Python 3 writes bytes at protocol 2. That costs about 1.5x the raw size
//! (a code point above 127 is two bytes of UTF-8) and reads with plain `pickle.load` as well as
//! with `pickle.load(f, encoding="latin1")` (detectron2), with numpy 1.x and 2.x (where
//! `numpy.core` still resolves for unpickling).

use crate::checkpoint::{self, Tensors};
use crate::error::{Error, Result};
use crate::memory::ParamStore;
use crate::model::resnet::{Arch, ResNet};
use crate::rng::Rng;
use safetensors::Dtype;
use std::path::Path;

/// `lewel export --format`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ExportFormat {
    /// A safetensors of the online backbone in torchvision names (`run::export`).
    Torchvision,
    /// A detectron2 `.pkl` (this module).
    Detectron2,
}

impl std::str::FromStr for ExportFormat {
    type Err = Error;
    fn from_str(s: &str) -> Result<ExportFormat> {
        match s {
            "torchvision" => Ok(ExportFormat::Torchvision),
            "detectron2" => Ok(ExportFormat::Detectron2),
            _ => Err(Error::user(format!(
                "--format: expected torchvision or detectron2, got '{s}'"
            ))),
        }
    }
}

// ----------------------------------------------------------------------------
// Names

/// What becomes of one torchvision backbone tensor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Rename {
    /// Carried under this detectron2 name.
    To(String),
    /// A known tensor detectron2 does not take (`num_batches_tracked`, `fc.*`).
    Drop,
    /// Not a torchvision ResNet name.
    Unknown,
}

const BN_PARAMS: [&str; 4] = ["weight", "bias", "running_mean", "running_var"];

/// `layer{L}` with L in 1..=4 -> detectron2's stage name `res{L+1}`.
fn stage(s: &str) -> Option<&'static str> {
    match s.strip_prefix("layer")? {
        "1" => Some("res2"),
        "2" => Some("res3"),
        "3" => Some("res4"),
        "4" => Some("res5"),
        _ => None,
    }
}

/// `{prefix}{j}` with j one digit in 1..=3 (so `conv01` and `conv+1` are not names).
fn index_of(s: &str, prefix: &str) -> Option<usize> {
    match s.strip_prefix(prefix)? {
        "1" => Some(1),
        "2" => Some(2),
        "3" => Some(3),
        _ => None,
    }
}

/// A block index as PyTorch's Sequential writes it: decimal, no leading zero.
fn is_index(s: &str) -> bool {
    !s.is_empty() && s.bytes().all(|c| c.is_ascii_digit()) && (s == "0" || !s.starts_with('0'))
}

/// The detectron2 name of a torchvision ResNet backbone tensor (no prefix: `conv1.weight`,
/// `layer1.0.bn1.running_mean`, ...).
pub fn rename(tv: &str) -> Rename {
    let parts: Vec<&str> = tv.split('.').collect();
    if let Some((&"num_batches_tracked", module)) = parts.split_last() {
        // Dropped, but only where a BN's running_mean would be carried.
        return match rename(&format!("{}.running_mean", module.join("."))) {
            Rename::To(_) => Rename::Drop,
            _ => Rename::Unknown,
        };
    }
    let is_bn = |p: &str| BN_PARAMS.contains(&p);
    match parts.as_slice() {
        ["fc", "weight" | "bias"] => Rename::Drop,
        ["conv1", "weight"] => Rename::To("stem.conv1.weight".into()),
        ["bn1", p] if is_bn(p) => Rename::To(format!("stem.conv1.norm.{p}")),
        [layer, block, rest @ ..] => {
            let (Some(res), true) = (stage(layer), is_index(block)) else {
                return Rename::Unknown;
            };
            let to = match rest {
                [m, "weight"] if index_of(m, "conv").is_some() => format!("{m}.weight"),
                [m, p] if is_bn(p) && index_of(m, "bn").is_some() => {
                    format!("conv{}.norm.{p}", &m[2..])
                }
                ["downsample", "0", "weight"] => "shortcut.weight".into(),
                ["downsample", "1", p] if is_bn(p) => format!("shortcut.norm.{p}"),
                _ => return Rename::Unknown,
            };
            Rename::To(format!("{res}.{block}.{to}"))
        }
        _ => Rename::Unknown,
    }
}

/// A torchvision ResNet backbone (names without prefix, PyTorch layouts) -> detectron2's names,
/// float32 only. The backbone must be a whole ResNet-18/50 (any width) with nothing else but
/// `num_batches_tracked` counters and an `fc`; `what` names the file in errors.
pub fn to_detectron2(bb: &Tensors, what: &str) -> Result<(Arch, Tensors)> {
    let arch = Arch::infer(bb, "", what)?;
    // The tensors the architecture has: names, dtypes and shapes come from the model itself.
    let mut s = ParamStore::<f32>::new();
    ResNet::build(&mut s, "", arch, &mut Rng::new(0));
    let mut want: Vec<(String, Vec<usize>)> = s
        .table
        .entries
        .iter()
        .map(|e| (e.name.clone(), checkpoint::torch_shape(e.shape)))
        .collect();
    want.extend(
        s.buffer_table
            .entries
            .iter()
            .map(|e| (e.name.clone(), e.shape.dims().to_vec())),
    );
    let counters: std::collections::HashSet<&str> =
        s.counters.iter().map(|(n, _)| n.as_str()).collect();
    let mut bad = Vec::new();
    let mut out = Tensors::new();
    for (name, shape) in &want {
        match bb.get(name) {
            None => bad.push(format!("{name} missing")),
            Some(o) if o.dtype != Dtype::F32 || &o.shape != shape => bad.push(format!(
                "{name} is {:?} {:?}, expected F32 {shape:?}",
                o.dtype, o.shape
            )),
            Some(o) => match rename(name) {
                Rename::To(d2) => {
                    out.insert(d2, o.clone());
                }
                r => {
                    return Err(Error::Other(format!(
                        "detectron2::rename: {name} of a {} gives {r:?}",
                        arch.name()
                    )))
                }
            },
        }
    }
    let known: std::collections::HashSet<&str> = want.iter().map(|(n, _)| n.as_str()).collect();
    for name in bb.keys() {
        let extra = !known.contains(name.as_str()) && !counters.contains(name.as_str());
        if extra && !matches!(name.as_str(), "fc.weight" | "fc.bias") {
            bad.push(format!("{name} unexpected"));
        }
    }
    if !bad.is_empty() {
        let n = bad.len();
        bad.truncate(4);
        return Err(Error::user(format!(
            "{what}: not a torchvision {} backbone ({n} mismatched tensors): {}{}",
            arch.name(),
            bad.join("; "),
            if n > 4 { "; ..." } else { "" }
        )));
    }
    Ok((arch, out))
}

// ----------------------------------------------------------------------------
// Pickle (protocol 2)

/// The opcodes written (all in protocol 2; names as Python's pickletools).
mod op {
    pub const PROTO: u8 = 0x80;
    pub const STOP: u8 = b'.';
    pub const EMPTY_DICT: u8 = b'}';
    pub const SETITEM: u8 = b's';
    pub const BINUNICODE: u8 = b'X';
    pub const GLOBAL: u8 = b'c';
    pub const BININT: u8 = b'J';
    pub const BININT1: u8 = b'K';
    pub const BININT2: u8 = b'M';
    pub const NONE: u8 = b'N';
    pub const NEWTRUE: u8 = 0x88;
    pub const NEWFALSE: u8 = 0x89;
    pub const MARK: u8 = b'(';
    pub const TUPLE: u8 = b't';
    pub const EMPTY_TUPLE: u8 = b')';
    pub const TUPLE1: u8 = 0x85;
    pub const TUPLE2: u8 = 0x86;
    pub const TUPLE3: u8 = 0x87;
    pub const REDUCE: u8 = b'R';
    pub const BUILD: u8 = b'b';
}

/// An opcode stream, without memo (every object is written where it is used).
struct Pickler {
    out: Vec<u8>,
}

impl Pickler {
    fn op(&mut self, o: u8) {
        self.out.push(o);
    }
    fn str(&mut self, s: &str) {
        self.utf8(s.as_bytes());
    }
    /// BINUNICODE: a u32 little-endian length, then UTF-8.
    fn utf8(&mut self, b: &[u8]) {
        let n = u32::try_from(b.len()).expect("pickle: a string over 4 GiB");
        self.op(op::BINUNICODE);
        self.out.extend_from_slice(&n.to_le_bytes());
        self.out.extend_from_slice(b);
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(op::GLOBAL);
        for s in [module, name] {
            self.out.extend_from_slice(s.as_bytes());
            self.out.push(b'\n');
        }
    }
    fn int(&mut self, v: i64) {
        if let Ok(b) = u8::try_from(v) {
            self.out.extend_from_slice(&[op::BININT1, b]);
        } else if let Ok(h) = u16::try_from(v) {
            self.op(op::BININT2);
            self.out.extend_from_slice(&h.to_le_bytes());
        } else {
            let w = i32::try_from(v).expect("pickle: an int outside i32");
            self.op(op::BININT);
            self.out.extend_from_slice(&w.to_le_bytes());
        }
    }
    fn bool(&mut self, b: bool) {
        self.op(if b { op::NEWTRUE } else { op::NEWFALSE });
    }
    /// A tuple of the `n` objects `items` writes.
    fn tuple(&mut self, n: usize, items: impl FnOnce(&mut Self)) {
        if n > 3 {
            self.op(op::MARK);
        }
        items(self);
        self.op(match n {
            0 => op::EMPTY_TUPLE,
            1 => op::TUPLE1,
            2 => op::TUPLE2,
            3 => op::TUPLE3,
            _ => op::TUPLE,
        });
    }
    /// `bytes` as Python 3 writes them at protocol 2: _codecs.encode(<latin-1 str>, 'latin1').
    fn bytes(&mut self, b: &[u8]) {
        self.global("_codecs", "encode");
        self.tuple(2, |p| {
            // Each byte is the code point of one character; UTF-8 takes two bytes above 127.
            let mut u = Vec::with_capacity(b.len() + b.len() / 2);
            for &c in b {
                if c < 0x80 {
                    u.push(c);
                } else {
                    u.extend_from_slice(&[0xC0 | (c >> 6), 0x80 | (c & 0x3F)]);
                }
            }
            p.utf8(&u);
            p.str("latin1");
        });
        self.op(op::REDUCE);
    }
    /// numpy.dtype('<f4') as numpy pickles it: dtype('f4', False, True) then BUILD with
    /// (3, '<', None, None, None, -1, -1, 0).
    fn dtype_f32(&mut self) {
        self.global("numpy", "dtype");
        self.tuple(3, |p| {
            p.str("f4");
            p.bool(false);
            p.bool(true);
        });
        self.op(op::REDUCE);
        self.tuple(8, |p| {
            p.int(3);
            p.str("<");
            for _ in 0..3 {
                p.op(op::NONE);
            }
            p.int(-1);
            p.int(-1);
            p.int(0);
        });
        self.op(op::BUILD);
    }
    /// A C-order float32 numpy array of `shape`; `data` little-endian f32 bytes.
    fn ndarray_f32(&mut self, shape: &[usize], data: &[u8]) {
        assert_eq!(
            shape.iter().product::<usize>() * 4,
            data.len(),
            "pickle ndarray: shape {shape:?} vs {} bytes",
            data.len()
        );
        self.global("numpy.core.multiarray", "_reconstruct");
        self.tuple(3, |p| {
            p.global("numpy", "ndarray");
            p.tuple(1, |p| p.int(0));
            p.str("b");
        });
        self.op(op::REDUCE);
        self.tuple(5, |p| {
            p.int(1);
            p.tuple(shape.len(), |p| {
                for &d in shape {
                    p.int(d as i64);
                }
            });
            p.dtype_f32();
            p.bool(false);
            p.bytes(data);
        });
        self.op(op::BUILD);
    }
}

/// The pickle of {'model': {name: float32 array}, '__author__': author, 'matching_heuristics':
/// True}; `model` holds float32 tensors (little-endian bytes, C order), written in name order.
pub fn pickle_weights(model: &Tensors, author: &str) -> Vec<u8> {
    let raw: usize = model.values().map(|o| o.bytes.len()).sum();
    let mut p = Pickler {
        out: Vec::with_capacity(raw + raw / 2 + 256 * model.len() + 64),
    };
    p.out.extend_from_slice(&[op::PROTO, 2]);
    p.op(op::EMPTY_DICT);
    p.str("model");
    p.op(op::EMPTY_DICT);
    for (name, o) in model {
        assert_eq!(
            o.dtype,
            Dtype::F32,
            "pickle_weights: {name} is {:?}",
            o.dtype
        );
        p.str(name);
        p.ndarray_f32(&o.shape, &o.bytes);
        p.op(op::SETITEM);
    }
    p.op(op::SETITEM);
    p.str("__author__");
    p.str(author);
    p.op(op::SETITEM);
    p.str("matching_heuristics");
    p.bool(true);
    p.op(op::SETITEM);
    p.op(op::STOP);
    p.out
}

// ----------------------------------------------------------------------------
// Export

/// What `lewel export --format detectron2` wrote.
pub struct Exported {
    /// Tensors in the file.
    pub tensors: usize,
    pub arch: Arch,
    /// Bytes of the file.
    pub bytes: usize,
}

/// `lewel export --format detectron2`: the online backbone of a LEWEL state (a run folder, its
/// manifest or a state file), or an exported torchvision backbone, as a detectron2 `.pkl`.
pub fn export(checkpoint_path: &Path, out: &Path) -> Result<Exported> {
    // detectron2 unpickles only a name ending in .pkl; anything else goes to torch.load and fails.
    if out.extension().is_none_or(|e| e != "pkl") {
        return Err(Error::user(format!(
            "--out {}: detectron2 reads a pickle only from a file named *.pkl",
            out.display()
        )));
    }
    let weights = crate::run::weights_file(checkpoint_path)?;
    let what = weights.display().to_string();
    let t = checkpoint::read_file(&weights)?;
    let prefix = "online_net.backbone.";
    let bb: Tensors = if t.contains_key(&format!("{prefix}conv1.weight")) {
        t.into_iter()
            .filter_map(|(n, o)| n.strip_prefix(prefix).map(|s| (s.to_string(), o)))
            .collect()
    } else if t.contains_key("conv1.weight") {
        t
    } else {
        return Err(Error::user(format!(
            "{what}: no {prefix}conv1.weight nor conv1.weight: neither a LEWEL state nor an exported backbone"
        )));
    };
    let (arch, d2) = to_detectron2(&bb, &what)?;
    let bytes = pickle_weights(&d2, "lewel");
    checkpoint::write_bytes_atomic(out, &bytes)?;
    Ok(Exported {
        tensors: d2.len(),
        arch,
        bytes: bytes.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to(s: &str) -> Rename {
        Rename::To(s.into())
    }

    #[test]
    fn names_follow_detectron2s_converter() {
        // (torchvision, detectron2), each as tools/convert-torchvision-to-d2.py renames it.
        let cases = [
            ("conv1.weight", "stem.conv1.weight"),
            ("bn1.weight", "stem.conv1.norm.weight"),
            ("bn1.running_var", "stem.conv1.norm.running_var"),
            ("layer1.0.conv1.weight", "res2.0.conv1.weight"),
            ("layer1.0.bn3.bias", "res2.0.conv3.norm.bias"),
            ("layer1.0.downsample.0.weight", "res2.0.shortcut.weight"),
            (
                "layer1.0.downsample.1.running_mean",
                "res2.0.shortcut.norm.running_mean",
            ),
            ("layer3.5.conv2.weight", "res4.5.conv2.weight"),
            (
                "layer4.2.bn2.running_mean",
                "res5.2.conv2.norm.running_mean",
            ),
            ("layer4.12.conv3.weight", "res5.12.conv3.weight"),
        ];
        for (tv, d2) in cases {
            assert_eq!(rename(tv), to(d2), "{tv}");
        }
        for dropped in [
            "fc.weight",
            "fc.bias",
            "bn1.num_batches_tracked",
            "layer2.0.bn1.num_batches_tracked",
            "layer2.0.downsample.1.num_batches_tracked",
        ] {
            assert_eq!(rename(dropped), Rename::Drop, "{dropped}");
        }
        for unknown in [
            "conv1.bias",
            "conv2.weight",
            "bn2.weight",
            "layer0.0.conv1.weight",
            "layer5.0.conv1.weight",
            "layer1.x.conv1.weight",
            "layer1..conv1.weight",
            "layer01.0.conv1.weight",
            "layer1.01.conv1.weight",
            "layer1.0.conv+1.weight",
            "layer1.0.bn01.weight",
            "layer1.0.bn1.num_batches",
            "layer1.0.conv4.weight",
            "layer1.0.bn0.weight",
            "layer1.0.downsample.2.weight",
            "layer1.0.downsample.0.num_batches_tracked",
            "layer1.0.conv1.num_batches_tracked",
            "num_batches_tracked",
            "online_net.backbone.conv1.weight",
            "fc.running_mean",
            "",
        ] {
            assert_eq!(rename(unknown), Rename::Unknown, "{unknown:?}");
        }
    }

    #[test]
    fn format_flag_parses() {
        assert_eq!(
            "torchvision".parse::<ExportFormat>().unwrap(),
            ExportFormat::Torchvision
        );
        assert_eq!(
            "detectron2".parse::<ExportFormat>().unwrap(),
            ExportFormat::Detectron2
        );
        let e = "onnx".parse::<ExportFormat>().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().starts_with("--format: "), "{e}");
    }

    #[test]
    fn small_ints_take_the_shortest_opcode() {
        let mut p = Pickler { out: Vec::new() };
        for v in [0, 255, 256, 65535, 65536, -1] {
            p.int(v);
        }
        assert_eq!(
            p.out,
            [
                &[op::BININT1, 0][..],
                &[op::BININT1, 255],
                &[op::BININT2, 0, 1],
                &[op::BININT2, 255, 255],
                &[op::BININT, 0, 0, 1, 0],
                &[op::BININT, 255, 255, 255, 255],
            ]
            .concat()
        );
    }
}
