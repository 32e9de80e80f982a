//! `lewel export --format detectron2` and configs/detectron2/, checked without Python or
//! detectron2:
//! - the names and shapes of the export are exactly those detectron2's ResNet has, listed here from
//!   detectron2's own rules (detectron2/modeling/backbone/resnet.py::build_resnet_backbone and its
//!   BottleneckBlock/BasicBlock/BasicStem), for ResNet-50, ResNet-18 and the tiny model, and each
//!   value is the torchvision tensor's, bit for bit;
//! - the pickle is read back by a small unpickler below (protocol-2 opcodes only) into exactly the
//!   objects numpy's own pickles build;
//! - the binary's bad input is one line and exit 2;
//! - every config parses, its `_BASE_` chain exists, and every key it sets is a detectron2 key of
//!   the right type (a misspelt key or an int where a float is due fails detectron2's merge).
//!
//! tests/parity/check_detectron2.py loads the same files with numpy (and detectron2 if installed).

use lewel::checkpoint::{self, Owned, Tensors};
use lewel::detectron2::{pickle_weights, to_detectron2};
use lewel::memory::ParamStore;
use lewel::model::resnet::{Arch, ResNet};
use lewel::rng::Rng;
use safetensors::Dtype;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

// ----------------------------------------------------------------------------
// What detectron2's ResNet holds

/// (torchvision name, detectron2 name, shape) of every tensor detectron2's ResNet loads, in the
/// terms of detectron2's build_resnet_backbone: STEM_OUT_CHANNELS, RES2_OUT_CHANNELS and
/// NUM_GROUPS * WIDTH_PER_GROUP (the bottleneck width) at 1/div of the standard 64, 256 (64 for
/// R18) and 64; stages res2..res5 with [3,4,6,3] (R50) or [2,2,2,2] (R18) blocks, each doubling
/// the channels; block 0 of res2 has stride 1, of res3-res5 stride 2 (on the 3x3 conv,
/// STRIDE_IN_1X1 False); a block has a `shortcut` (1x1 conv + norm) iff its in and out channels
/// differ; every conv has no bias and a `norm` (weight, bias, running_mean, running_var).
/// Bottleneck: conv1 1x1 in->b, conv2 3x3 b->b, conv3 1x1 b->out. Basic: conv1 3x3 in->out, conv2
/// 3x3 out->out. The torchvision names beside them: layer{1..4}, bn{j}, downsample.{0,1}.
fn expected(depth: usize, div: usize) -> Vec<(String, String, Vec<usize>)> {
    let (blocks, bottleneck) = match depth {
        50 => ([3, 4, 6, 3], true),
        18 => ([2, 2, 2, 2], false),
        d => panic!("depth {d}"),
    };
    let mut v = Vec::new();
    let mut conv = |tv: &str, d2: &str, tv_bn: &str, shape: [usize; 4]| {
        v.push((
            format!("{tv}.weight"),
            format!("{d2}.weight"),
            shape.to_vec(),
        ));
        for p in ["weight", "bias", "running_mean", "running_var"] {
            v.push((
                format!("{tv_bn}.{p}"),
                format!("{d2}.norm.{p}"),
                vec![shape[0]],
            ));
        }
    };
    let stem = 64 / div;
    conv("conv1", "stem.conv1", "bn1", [stem, 3, 7, 7]);
    let mut in_c = stem;
    let mut out_c = if bottleneck { 256 } else { 64 } / div;
    let mut b_c = 64 / div;
    for (i, &n) in blocks.iter().enumerate() {
        for b in 0..n {
            let tv = format!("layer{}.{b}", i + 1);
            let d2 = format!("res{}.{b}", i + 2);
            let c_in = if b == 0 { in_c } else { out_c };
            let shapes: Vec<[usize; 4]> = if bottleneck {
                vec![[b_c, c_in, 1, 1], [b_c, b_c, 3, 3], [out_c, b_c, 1, 1]]
            } else {
                vec![[out_c, c_in, 3, 3], [out_c, out_c, 3, 3]]
            };
            for (j, sh) in shapes.into_iter().enumerate() {
                let j = j + 1;
                conv(
                    &format!("{tv}.conv{j}"),
                    &format!("{d2}.conv{j}"),
                    &format!("{tv}.bn{j}"),
                    sh,
                );
            }
            if c_in != out_c {
                conv(
                    &format!("{tv}.downsample.0"),
                    &format!("{d2}.shortcut"),
                    &format!("{tv}.downsample.1"),
                    [out_c, c_in, 1, 1],
                );
            }
        }
        in_c = out_c;
        out_c *= 2;
        b_c *= 2;
    }
    v
}

/// Every tensor of a torchvision ResNet backbone (names under `prefix`), each filled with values of
/// its own (a different seed per name), so a tensor copied under the wrong name shows.
fn backbone(arch: Arch, prefix: &str, seed: u64) -> Tensors {
    let mut s = ParamStore::<f32>::new();
    ResNet::build(&mut s, prefix, arch, &mut Rng::new(0));
    let mut t = checkpoint::store_tensors(&s);
    for (i, (name, o)) in t.iter_mut().enumerate() {
        if o.dtype == Dtype::F32 {
            let mut r = Rng::new(seed * 1_000_003 + i as u64);
            let v: Vec<f32> = (0..o.bytes.len() / 4).map(|_| r.normal() as f32).collect();
            *o = Owned::f32(o.shape.clone(), &v);
        } else {
            assert!(name.ends_with("num_batches_tracked"), "{name}");
            *o = Owned::i64_scalar(i as i64);
        }
    }
    t
}

#[test]
fn the_export_has_exactly_detectron2s_names_shapes_and_our_values() {
    for arch in [Arch::RESNET50, Arch::RESNET18, Arch::TINY] {
        let src = backbone(arch, "", 7);
        let (got_arch, d2) = to_detectron2(&src, "test").unwrap();
        assert_eq!(got_arch, arch);
        let want = expected(arch.depth, arch.div);
        let want_names: Vec<&str> = {
            let mut n: Vec<&str> = want.iter().map(|(_, d, _)| d.as_str()).collect();
            n.sort();
            n
        };
        let got_names: Vec<&str> = d2.keys().map(|k| k.as_str()).collect();
        if let Some(i) = (0..want_names.len().max(got_names.len()))
            .find(|&i| want_names.get(i) != got_names.get(i))
        {
            panic!(
                "{}: names differ at {i}: detectron2 has {:?}, the export {:?} ({} vs {} names)",
                arch.name(),
                want_names.get(i),
                got_names.get(i),
                want_names.len(),
                got_names.len()
            );
        }
        for (tv, name, shape) in &want {
            let o = &d2[name];
            assert_eq!(&o.shape, shape, "{}: {name}", arch.name());
            assert_eq!(o.dtype, Dtype::F32, "{name}");
            assert!(o.bytes == src[tv].bytes, "{name}: not the values of {tv}");
        }
    }
}

#[test]
fn resnet50_by_the_numbers() {
    let (_, d2) = to_detectron2(&backbone(Arch::RESNET50, "", 1), "test").unwrap();
    // A few tensors written out by hand from detectron2's BottleneckBlock and BasicStem.
    for (name, shape) in [
        ("stem.conv1.weight", &[64, 3, 7, 7][..]),
        ("stem.conv1.norm.running_var", &[64]),
        ("res2.0.conv1.weight", &[64, 64, 1, 1]),
        ("res2.0.shortcut.weight", &[256, 64, 1, 1]),
        ("res2.0.shortcut.norm.bias", &[256]),
        ("res2.1.conv1.weight", &[64, 256, 1, 1]),
        ("res3.0.conv1.weight", &[128, 256, 1, 1]),
        ("res3.0.conv2.weight", &[128, 128, 3, 3]),
        ("res3.0.shortcut.norm.running_mean", &[512]),
        ("res4.5.conv3.weight", &[1024, 256, 1, 1]),
        ("res5.0.shortcut.weight", &[2048, 1024, 1, 1]),
        ("res5.2.conv2.norm.weight", &[512]),
        ("res5.2.conv3.norm.running_var", &[2048]),
    ] {
        assert_eq!(d2.get(name).map(|o| &o.shape[..]), Some(shape), "{name}");
    }
    for absent in [
        "res2.1.shortcut.weight",
        "res3.4.conv1.weight",
        "res5.3.conv1.weight",
        "stem.conv1.norm.num_batches_tracked",
        "fc.weight",
        "conv1.weight",
    ] {
        assert!(!d2.contains_key(absent), "{absent}");
    }
    // LEWEL_SPEC 1: 53 convs and 53 norms (265 tensors), 23,508,032 parameters, 26,560 channels of
    // running statistics.
    assert_eq!(d2.len(), 53 * 5);
    let count = |f: &dyn Fn(&str) -> bool| -> usize {
        d2.iter()
            .filter(|(n, _)| f(n))
            .map(|(_, o)| o.shape.iter().product::<usize>())
            .sum()
    };
    assert_eq!(count(&|n| !n.contains("running_")), 23_508_032);
    assert_eq!(count(&|n| n.ends_with("running_mean")), 26_560);
}

// ----------------------------------------------------------------------------
// A small unpickler: protocol-2 opcodes only, no memo

#[derive(Clone, Debug, PartialEq)]
enum Py {
    None,
    Bool(bool),
    Int(i64),
    Str(String),
    Tuple(Vec<Py>),
    Dict(Vec<(Py, Py)>),
    Global(String, String),
    /// REDUCE: callable(*args).
    Call(Box<Py>, Vec<Py>),
    /// BUILD: obj.__setstate__(state).
    Build(Box<Py>, Box<Py>),
    Mark,
}

fn unpickle(b: &[u8]) -> Py {
    let mut st: Vec<Py> = Vec::new();
    let mut i = 0;
    let take = |i: &mut usize, n: usize| -> &[u8] {
        let s = &b[*i..*i + n];
        *i += n;
        s
    };
    let line = |i: &mut usize| -> String {
        let end = b[*i..]
            .iter()
            .position(|&c| c == b'\n')
            .expect("GLOBAL: no newline");
        let s = std::str::from_utf8(&b[*i..*i + end]).unwrap().to_string();
        *i += end + 1;
        s
    };
    let pop_mark = |st: &mut Vec<Py>| -> Vec<Py> {
        let m = st.iter().rposition(|p| *p == Py::Mark).expect("no MARK");
        let items = st.split_off(m + 1);
        st.pop();
        items
    };
    assert_eq!(&b[..2], &[0x80, 2], "PROTO 2 first");
    i += 2;
    loop {
        let op = b[i];
        i += 1;
        match op {
            b'}' => st.push(Py::Dict(Vec::new())),
            b's' => {
                let v = st.pop().unwrap();
                let k = st.pop().unwrap();
                match st.last_mut() {
                    Some(Py::Dict(d)) => d.push((k, v)),
                    o => panic!("SETITEM on {o:?}"),
                }
            }
            b'X' => {
                let n = u32::from_le_bytes(take(&mut i, 4).try_into().unwrap()) as usize;
                let s = String::from_utf8(take(&mut i, n).to_vec()).expect("BINUNICODE: UTF-8");
                st.push(Py::Str(s));
            }
            b'c' => {
                let m = line(&mut i);
                let n = line(&mut i);
                st.push(Py::Global(m, n));
            }
            b'K' => st.push(Py::Int(take(&mut i, 1)[0] as i64)),
            b'M' => st.push(Py::Int(
                u16::from_le_bytes(take(&mut i, 2).try_into().unwrap()) as i64,
            )),
            b'J' => st.push(Py::Int(
                i32::from_le_bytes(take(&mut i, 4).try_into().unwrap()) as i64,
            )),
            b'N' => st.push(Py::None),
            0x88 => st.push(Py::Bool(true)),
            0x89 => st.push(Py::Bool(false)),
            b'(' => st.push(Py::Mark),
            b't' => {
                let items = pop_mark(&mut st);
                st.push(Py::Tuple(items));
            }
            b')' => st.push(Py::Tuple(vec![])),
            0x85..=0x87 => {
                let n = (op - 0x84) as usize;
                let items = st.split_off(st.len() - n);
                st.push(Py::Tuple(items));
            }
            b'R' => {
                let Some(Py::Tuple(args)) = st.pop() else {
                    panic!("REDUCE: args not a tuple")
                };
                let f = st.pop().unwrap();
                st.push(Py::Call(Box::new(f), args));
            }
            b'b' => {
                let state = st.pop().unwrap();
                let obj = st.pop().unwrap();
                st.push(Py::Build(Box::new(obj), Box::new(state)));
            }
            b'.' => {
                assert_eq!(i, b.len(), "bytes after STOP");
                assert_eq!(st.len(), 1, "stack at STOP: {} items", st.len());
                assert!(!st.contains(&Py::Mark), "a MARK left");
                return st.pop().unwrap();
            }
            o => panic!(
                "opcode {o:#04x} at {}: not one of the protocol-2 set",
                i - 1
            ),
        }
    }
}

fn global(m: &str, n: &str) -> Box<Py> {
    Box::new(Py::Global(m.into(), n.into()))
}
fn s(v: &str) -> Py {
    Py::Str(v.into())
}

/// The shape and bytes of an array pickled as numpy pickles a C-order float32 array.
fn ndarray_f32(p: &Py) -> (Vec<usize>, Vec<u8>) {
    let Py::Build(obj, state) = p else {
        panic!("array: not BUILD: {p:?}")
    };
    assert_eq!(
        **obj,
        Py::Call(
            global("numpy.core.multiarray", "_reconstruct"),
            vec![
                *global("numpy", "ndarray"),
                Py::Tuple(vec![Py::Int(0)]),
                s("b")
            ]
        )
    );
    let Py::Tuple(st) = &**state else {
        panic!("array state: {state:?}")
    };
    let [Py::Int(1), Py::Tuple(shape), dtype, Py::Bool(false), data] = &st[..] else {
        panic!("array state: {st:?}")
    };
    let f4 = Py::Build(
        Box::new(Py::Call(
            global("numpy", "dtype"),
            vec![s("f4"), Py::Bool(false), Py::Bool(true)],
        )),
        Box::new(Py::Tuple(vec![
            Py::Int(3),
            s("<"),
            Py::None,
            Py::None,
            Py::None,
            Py::Int(-1),
            Py::Int(-1),
            Py::Int(0),
        ])),
    );
    assert_eq!(*dtype, f4);
    let Py::Call(f, args) = data else {
        panic!("array data: {data:?}")
    };
    assert_eq!(*f, global("_codecs", "encode"));
    let [Py::Str(text), Py::Str(enc)] = &args[..] else {
        panic!("array data args")
    };
    assert_eq!(enc, "latin1");
    let bytes = text
        .chars()
        .map(|c| u8::try_from(c as u32).expect("a code point above 255 in latin-1 data"))
        .collect();
    let shape = shape
        .iter()
        .map(|d| match d {
            Py::Int(v) => *v as usize,
            o => panic!("dim {o:?}"),
        })
        .collect();
    (shape, bytes)
}

/// The weights dict of a detectron2 pickle: checks the keys around it, returns name -> array.
fn read_weights(b: &[u8]) -> BTreeMap<String, (Vec<usize>, Vec<u8>)> {
    let Py::Dict(top) = unpickle(b) else {
        panic!("top: not a dict")
    };
    let keys: Vec<&Py> = top.iter().map(|(k, _)| k).collect();
    assert_eq!(
        keys,
        [&s("model"), &s("__author__"), &s("matching_heuristics")]
    );
    assert_eq!(top[1].1, s("lewel"));
    assert_eq!(top[2].1, Py::Bool(true));
    let Py::Dict(model) = &top[0].1 else {
        panic!("model: not a dict")
    };
    let mut out = BTreeMap::new();
    for (k, v) in model {
        let Py::Str(name) = k else {
            panic!("key {k:?}")
        };
        assert!(
            out.insert(name.clone(), ndarray_f32(v)).is_none(),
            "{name} twice"
        );
    }
    out
}

#[test]
fn the_pickle_holds_numpy_float32_arrays_of_the_exact_bytes() {
    // Edge cases first: every byte value (the latin-1 path, newline and NUL included), a 0-d
    // array, 1 to 5 dimensions (TUPLE1..3 and MARK/TUPLE), dims past 255 and 65535 (BININT2,
    // BININT).
    let all: Vec<u8> = (0..=255u8).collect();
    let mut t = Tensors::new();
    let raw = |shape: Vec<usize>, bytes: Vec<u8>| Owned {
        dtype: Dtype::F32,
        shape,
        bytes,
    };
    t.insert("every_byte".into(), raw(vec![64], all.clone()));
    t.insert("scalar".into(), Owned::f32(vec![], &[1.5]));
    t.insert("d2".into(), raw(vec![2, 32], all.clone()));
    t.insert("d3".into(), raw(vec![2, 2, 16], all.clone()));
    t.insert("d5".into(), raw(vec![2, 2, 2, 2, 4], all.clone()));
    t.insert("wide".into(), Owned::f32(vec![1, 300], &[0.25; 300]));
    t.insert("wider".into(), Owned::f32(vec![70_000], &[-2.0; 70_000]));
    t.insert("empty".into(), Owned::f32(vec![0, 3], &[]));
    let got = read_weights(&pickle_weights(&t, "lewel"));
    assert_eq!(got.len(), t.len());
    for (name, o) in &t {
        assert_eq!(got[name].0, o.shape, "{name}");
        assert!(got[name].1 == o.bytes, "{name}: bytes differ");
    }

    // A whole ResNet-50 export.
    let (_, d2) = to_detectron2(&backbone(Arch::RESNET50, "", 3), "test").unwrap();
    let b = pickle_weights(&d2, "lewel");
    let raw_bytes: usize = d2.values().map(|o| o.bytes.len()).sum();
    assert!(b.len() < raw_bytes * 2, "{} bytes for {raw_bytes}", b.len());
    let got = read_weights(&b);
    assert_eq!(got.len(), d2.len());
    for (name, o) in &d2 {
        assert_eq!(got[name].0, o.shape, "{name}");
        assert!(got[name].1 == o.bytes, "{name}: bytes differ");
    }
}

#[test]
fn backbones_that_are_not_whole_resnets_are_refused() {
    let good = backbone(Arch::TINY, "", 2);
    let refuse = |t: &Tensors, says: &str| {
        let e = to_detectron2(t, "f.safetensors").unwrap_err();
        assert_eq!(e.exit_code(), 2, "{e}");
        let m = e.to_string();
        assert!(m.starts_with("f.safetensors: ") && m.contains(says), "{m}");
    };
    let mut t = good.clone();
    t.remove("layer2.0.conv1.weight");
    refuse(&t, "layer2.0.conv1.weight missing");
    let mut t = good.clone();
    t.insert("layer1.0.se.weight".into(), Owned::f32(vec![1], &[0.0]));
    refuse(&t, "layer1.0.se.weight unexpected");
    let mut t = good.clone();
    t.insert("layer4.3.conv1.weight".into(), Owned::f32(vec![1], &[0.0]));
    refuse(&t, "layer4.3.conv1.weight unexpected");
    let mut t = good.clone();
    let w = t["layer3.1.bn2.running_var"].clone();
    t.insert(
        "layer3.1.bn2.running_var".into(),
        Owned::f32(vec![w.shape[0] + 1], &vec![1.0; w.shape[0] + 1]),
    );
    refuse(&t, "layer3.1.bn2.running_var is F32");
    let mut t = good.clone();
    t.insert(
        "conv1.weight".into(),
        Owned::i64(vec![8, 3, 7, 7], &[0; 8 * 3 * 49]),
    );
    refuse(&t, "conv1.weight is I64");
    let mut t = Tensors::new();
    t.insert("foo".into(), Owned::f32(vec![1], &[0.0]));
    refuse(&t, "conv1.weight");
    // An fc and the counters are no reason to refuse; neither is a missing counter.
    let mut t = good.clone();
    t.insert("fc.weight".into(), Owned::f32(vec![10, 256], &[0.0; 2560]));
    t.insert("fc.bias".into(), Owned::f32(vec![10], &[0.0; 10]));
    t.remove("bn1.num_batches_tracked");
    let (_, d2) = to_detectron2(&t, "f").unwrap();
    assert_eq!(d2.len(), 265);
}

// ----------------------------------------------------------------------------
// The binary

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lewel-d2-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lewel(args: &[&str], dir: &Path) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = Command::new(env!("CARGO_BIN_EXE_lewel"))
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// Exit 2, one line on stderr naming `names`, nothing on stdout, no panic.
fn assert_bad(r: &(i32, String, String), names: &str) {
    let (code, out, err) = r;
    assert_eq!(*code, 2, "exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with("lewel: error: ") && err.contains(names),
        "{err}"
    );
    assert!(out.is_empty(), "stdout: {out}");
}

#[test]
fn lewel_export_format_detectron2_from_the_cli() {
    let d = tmp("cli");
    // A LEWEL state: the online backbone, a target backbone with other values, something else.
    let mut state = backbone(Arch::TINY, "online_net.backbone.", 11);
    state.extend(backbone(Arch::TINY, "target_net.backbone.", 12));
    state.insert(
        "predictor.mlp.0.weight".into(),
        Owned::f32(vec![2, 2, 1], &[0.0; 4]),
    );
    checkpoint::write_file_atomic(&d.join("state.safetensors"), &state, None).unwrap();

    let (code, out, err) = lewel(
        &[
            "export",
            "--checkpoint",
            "state.safetensors",
            "--format",
            "detectron2",
            "--out",
            "m.pkl",
        ],
        &d,
    );
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with("wrote m.pkl (265 tensors, detectron2 names, tiny, "),
        "{out}"
    );
    assert!(err.contains("warning: the backbone is tiny"), "{err}");
    let pkl = std::fs::read(d.join("m.pkl")).unwrap();
    let got = read_weights(&pkl);
    let want = expected(50, 8);
    assert_eq!(got.len(), want.len());
    for (tv, name, shape) in &want {
        let o = &state[&format!("online_net.backbone.{tv}")];
        assert_eq!(&got[name].0, shape, "{name}");
        assert!(got[name].1 == o.bytes, "{name}: not the online {tv}");
    }
    // No temp file is left beside it.
    let names: Vec<_> = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(names.len(), 2, "{names:?}");

    // The default format is still torchvision's safetensors; its export gives the same pickle.
    let (code, _, err) = lewel(
        &[
            "export",
            "--checkpoint",
            "state.safetensors",
            "--out",
            "bb.safetensors",
        ],
        &d,
    );
    assert_eq!(code, 0, "{err}");
    let bb = checkpoint::read_file(&d.join("bb.safetensors")).unwrap();
    assert!(bb.contains_key("conv1.weight") && bb.contains_key("layer1.0.downsample.1.weight"));
    let (code, _, err) = lewel(
        &[
            "export",
            "--checkpoint",
            "bb.safetensors",
            "--format",
            "detectron2",
            "--out",
            "bb.pkl",
        ],
        &d,
    );
    assert_eq!(code, 0, "{err}");
    assert!(std::fs::read(d.join("bb.pkl")).unwrap() == pkl);

    // Bad input: one line, exit 2, nothing written.
    let r = lewel(
        &[
            "export",
            "--checkpoint",
            "state.safetensors",
            "--format",
            "onnx",
            "--out",
            "x.pkl",
        ],
        &d,
    );
    assert_bad(
        &r,
        "--format: expected torchvision or detectron2, got 'onnx'",
    );
    let r = lewel(
        &[
            "export",
            "--checkpoint",
            "state.safetensors",
            "--format",
            "detectron2",
            "--out",
            "x.pth",
        ],
        &d,
    );
    assert_bad(&r, "*.pkl");
    let mut junk = Tensors::new();
    junk.insert("foo".into(), Owned::f32(vec![1], &[0.0]));
    checkpoint::write_file_atomic(&d.join("junk.safetensors"), &junk, None).unwrap();
    let r = lewel(
        &[
            "export",
            "--checkpoint",
            "junk.safetensors",
            "--format",
            "detectron2",
            "--out",
            "x.pkl",
        ],
        &d,
    );
    assert_bad(
        &r,
        "junk.safetensors: no online_net.backbone.conv1.weight nor conv1.weight",
    );
    let mut cut = bb.clone();
    cut.remove("layer3.0.downsample.0.weight");
    checkpoint::write_file_atomic(&d.join("cut.safetensors"), &cut, None).unwrap();
    let r = lewel(
        &[
            "export",
            "--checkpoint",
            "cut.safetensors",
            "--format",
            "detectron2",
            "--out",
            "x.pkl",
        ],
        &d,
    );
    assert_bad(&r, "layer3.0.downsample.0.weight missing");
    assert!(!d.join("x.pkl").exists() && !d.join("x.pth").exists());
    let _ = std::fs::remove_dir_all(&d);
}

// ----------------------------------------------------------------------------
// configs/detectron2

use yaml_rust2::{yaml::Hash, Yaml, YamlLoader};

#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Str,
    Int,
    Float,
    Bool,
    StrList,
    IntList,
    FloatList,
    IntListList,
    FloatListList,
}

/// Every key the configs may set, with the type of its default in detectron2/config/defaults.py
/// (the line there). detectron2 merges a config into these defaults and refuses a key they lack
/// ("Non-existent config key") or a value of another type (int for float included; a list for a
/// tuple is allowed: yacs casts it).
const DETECTRON2_KEYS: &[(&str, Kind)] = &[
    ("VERSION", Kind::Int),                                        // 26
    ("MODEL.MASK_ON", Kind::Bool),                                 // 30
    ("MODEL.META_ARCHITECTURE", Kind::Str),                        // 33
    ("MODEL.WEIGHTS", Kind::Str),                                  // 37
    ("MODEL.PIXEL_MEAN", Kind::FloatList),                         // 42
    ("MODEL.PIXEL_STD", Kind::FloatList),                          // 46
    ("INPUT.MIN_SIZE_TRAIN", Kind::IntList),                       // 56, a tuple
    ("INPUT.MIN_SIZE_TEST", Kind::Int),                            // 63
    ("INPUT.FORMAT", Kind::Str),                                   // 84
    ("DATASETS.TRAIN", Kind::StrList),                             // 96, a tuple
    ("DATASETS.TEST", Kind::StrList),                              // 103, a tuple
    ("MODEL.BACKBONE.NAME", Kind::Str),                            // 135
    ("MODEL.BACKBONE.FREEZE_AT", Kind::Int),                       // 139
    ("MODEL.FPN.IN_FEATURES", Kind::StrList),                      // 149
    ("MODEL.FPN.NORM", Kind::Str),                                 // 153
    ("MODEL.ANCHOR_GENERATOR.SIZES", Kind::IntListList),           // 180
    ("MODEL.ANCHOR_GENERATOR.ASPECT_RATIOS", Kind::FloatListList), // 187
    ("MODEL.RPN.IN_FEATURES", Kind::StrList),                      // 205
    ("MODEL.RPN.PRE_NMS_TOPK_TRAIN", Kind::Int),                   // 234
    ("MODEL.RPN.PRE_NMS_TOPK_TEST", Kind::Int),                    // 235
    ("MODEL.RPN.POST_NMS_TOPK_TRAIN", Kind::Int),                  // 242
    ("MODEL.RPN.POST_NMS_TOPK_TEST", Kind::Int),                   // 243
    ("MODEL.ROI_HEADS.NAME", Kind::Str),                           // 253
    ("MODEL.ROI_HEADS.IN_FEATURES", Kind::StrList),                // 259
    ("MODEL.ROI_BOX_HEAD.NAME", Kind::Str),                        // 294
    ("MODEL.ROI_BOX_HEAD.POOLER_RESOLUTION", Kind::Int),           // 305
    ("MODEL.ROI_BOX_HEAD.NUM_FC", Kind::Int),                      // 310
    ("MODEL.ROI_BOX_HEAD.NUM_CONV", Kind::Int),                    // 313
    ("MODEL.ROI_BOX_HEAD.NORM", Kind::Str),                        // 318
    ("MODEL.ROI_MASK_HEAD.NAME", Kind::Str),                       // 350
    ("MODEL.ROI_MASK_HEAD.POOLER_RESOLUTION", Kind::Int),          // 351
    ("MODEL.ROI_MASK_HEAD.NUM_CONV", Kind::Int),                   // 353
    ("MODEL.ROI_MASK_HEAD.NORM", Kind::Str),                       // 357
    ("MODEL.RESNETS.DEPTH", Kind::Int),                            // 484
    ("MODEL.RESNETS.OUT_FEATURES", Kind::StrList),                 // 485
    ("MODEL.RESNETS.NORM", Kind::Str),                             // 491
    ("MODEL.RESNETS.STRIDE_IN_1X1", Kind::Bool),                   // 499
    ("SOLVER.MAX_ITER", Kind::Int),                                // 528
    ("SOLVER.BASE_LR", Kind::Float),                               // 530
    ("SOLVER.WEIGHT_DECAY", Kind::Float),                          // 538
    ("SOLVER.STEPS", Kind::IntList),                               // 545, a tuple
    ("SOLVER.IMS_PER_BATCH", Kind::Int),                           // 562
    ("TEST.PRECISE_BN.ENABLED", Kind::Bool),                       // 621
];

/// Whether `y` is a value of kind `k` as PyYAML (YAML 1.1) reads it too: a float needs its dot
/// there (`1e-4` is a string to PyYAML).
fn is_kind(y: &Yaml, k: Kind) -> bool {
    let float = |y: &Yaml| matches!(y, Yaml::Real(t) if t.contains('.'));
    let list = |y: &Yaml, f: &dyn Fn(&Yaml) -> bool| matches!(y, Yaml::Array(a) if a.iter().all(f));
    let int = |y: &Yaml| matches!(y, Yaml::Integer(_));
    let str = |y: &Yaml| matches!(y, Yaml::String(_));
    match k {
        Kind::Str => str(y),
        Kind::Int => int(y),
        Kind::Float => float(y),
        Kind::Bool => matches!(y, Yaml::Boolean(_)),
        Kind::StrList => list(y, &str),
        Kind::IntList => list(y, &int),
        Kind::FloatList => list(y, &float),
        Kind::IntListList => list(y, &|y| list(y, &int)),
        Kind::FloatListList => list(y, &|y| list(y, &float)),
    }
}

fn configs_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("configs/detectron2")
}

/// A config with its `_BASE_` chain merged in, as fvcore's CfgNode.load_yaml_with_base does: the
/// base path relative to the file's folder, the file's keys over the base's, dicts merged key by key.
fn load_with_base(path: &Path, seen: &mut Vec<PathBuf>) -> Hash {
    assert!(
        !seen.contains(&path.to_path_buf()),
        "a _BASE_ cycle at {}",
        path.display()
    );
    seen.push(path.to_path_buf());
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let docs =
        YamlLoader::load_from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(docs.len(), 1, "{}: one YAML document", path.display());
    let Yaml::Hash(mut h) = docs.into_iter().next().unwrap() else {
        panic!("{}: not a mapping", path.display())
    };
    let Some(base) = h.remove(&Yaml::String("_BASE_".into())) else {
        return h;
    };
    let base = base.as_str().expect("_BASE_: a string");
    let base_path = path.parent().unwrap().join(base);
    assert!(
        base_path.is_file(),
        "{}: _BASE_ {base} does not exist",
        path.display()
    );
    let mut merged = load_with_base(&base_path, seen);
    merge(&h, &mut merged);
    merged
}

fn merge(a: &Hash, b: &mut Hash) {
    for (k, v) in a {
        match (v, b.get_mut(k)) {
            (Yaml::Hash(va), Some(Yaml::Hash(vb))) => merge(va, vb),
            _ => {
                b.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Dotted key -> value of every leaf.
fn flatten(h: &Hash, prefix: &str, out: &mut BTreeMap<String, Yaml>) {
    for (k, v) in h {
        let k = format!("{prefix}{}", k.as_str().expect("keys are strings"));
        match v {
            Yaml::Hash(inner) => flatten(inner, &format!("{k}."), out),
            _ => {
                out.insert(k, v.clone());
            }
        }
    }
}

fn floats(y: &Yaml) -> Vec<f64> {
    y.as_vec()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap())
        .collect()
}

#[test]
fn detectron2_configs_parse_and_set_the_protocol() {
    let dir = configs_dir();
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n.ends_with(".yaml") || n.ends_with(".yml"))
        .collect();
    files.sort();
    let leaves = [
        ("mask_rcnn_R_50_C4_1x.yaml", "C4", 90_000, [60_000, 80_000]),
        (
            "mask_rcnn_R_50_C4_2x.yaml",
            "C4",
            180_000,
            [120_000, 160_000],
        ),
        (
            "mask_rcnn_R_50_FPN_1x.yaml",
            "FPN",
            90_000,
            [60_000, 80_000],
        ),
        (
            "mask_rcnn_R_50_FPN_2x.yaml",
            "FPN",
            180_000,
            [120_000, 160_000],
        ),
    ];
    for (leaf, ..) in leaves {
        assert!(files.iter().any(|f| f == leaf), "{leaf} missing");
    }
    let keys: BTreeMap<&str, Kind> = DETECTRON2_KEYS.iter().copied().collect();
    for f in &files {
        let cfg = load_with_base(&dir.join(f), &mut Vec::new());
        let mut flat = BTreeMap::new();
        flatten(&cfg, "", &mut flat);
        for (k, v) in &flat {
            let kind = keys
                .get(k.as_str())
                .unwrap_or_else(|| panic!("{f}: {k} is not a key these tests know detectron2 has"));
            assert!(is_kind(v, *kind), "{f}: {k} = {v:?}, expected {kind:?}");
            if k.ends_with(".NORM") {
                assert_eq!(v.as_str(), Some("SyncBN"), "{f}: {k}");
            }
        }
    }
    for (leaf, arch, max_iter, steps) in leaves {
        let cfg = load_with_base(&dir.join(leaf), &mut Vec::new());
        let mut c = BTreeMap::new();
        flatten(&cfg, "", &mut c);
        let get = |k: &str| c.get(k).unwrap_or_else(|| panic!("{leaf}: no {k}"));
        let str_of = |k: &str| get(k).as_str().unwrap_or_else(|| panic!("{leaf}: {k}"));
        let int_of = |k: &str| get(k).as_i64().unwrap_or_else(|| panic!("{leaf}: {k}"));
        let bool_of = |k: &str| get(k).as_bool().unwrap_or_else(|| panic!("{leaf}: {k}"));
        assert_eq!(int_of("VERSION"), 2, "{leaf}");
        assert_eq!(str_of("MODEL.META_ARCHITECTURE"), "GeneralizedRCNN");
        assert!(bool_of("MODEL.MASK_ON"), "{leaf}: Mask R-CNN");
        assert!(str_of("MODEL.WEIGHTS").ends_with(".pkl"), "{leaf}: WEIGHTS");
        // The input our backbone expects: RGB, torchvision's mean/std in 0-255 units.
        assert_eq!(str_of("INPUT.FORMAT"), "RGB");
        assert_eq!(floats(get("MODEL.PIXEL_MEAN")), [123.675, 116.280, 103.530]);
        assert_eq!(floats(get("MODEL.PIXEL_STD")), [58.395, 57.120, 57.375]);
        assert_eq!(int_of("MODEL.RESNETS.DEPTH"), 50);
        assert!(!bool_of("MODEL.RESNETS.STRIDE_IN_1X1"), "{leaf}: v1.5");
        assert_eq!(int_of("MODEL.BACKBONE.FREEZE_AT"), 0);
        assert_eq!(str_of("MODEL.RESNETS.NORM"), "SyncBN");
        assert!(bool_of("TEST.PRECISE_BN.ENABLED"));
        // The schedule and the rate: 16 images a step at detectron2's 0.02 (README.md there).
        assert_eq!(int_of("SOLVER.IMS_PER_BATCH"), 16);
        assert_eq!(get("SOLVER.BASE_LR").as_f64(), Some(0.02));
        assert_eq!(get("SOLVER.WEIGHT_DECAY").as_f64(), Some(0.0001));
        assert_eq!(int_of("SOLVER.MAX_ITER"), max_iter, "{leaf}");
        let got_steps: Vec<i64> = get("SOLVER.STEPS")
            .as_vec()
            .unwrap()
            .iter()
            .map(|v| v.as_i64().unwrap())
            .collect();
        assert_eq!(got_steps, steps, "{leaf}");
        for (k, set) in [
            ("DATASETS.TRAIN", "coco_2017_train"),
            ("DATASETS.TEST", "coco_2017_val"),
        ] {
            assert_eq!(
                get(k).as_vec().map(|v| v[0].as_str()),
                Some(Some(set)),
                "{leaf}: {k}"
            );
        }
        match arch {
            "C4" => {
                assert_eq!(str_of("MODEL.BACKBONE.NAME"), "build_resnet_backbone");
                assert_eq!(str_of("MODEL.ROI_HEADS.NAME"), "Res5ROIHeads");
            }
            _ => {
                assert_eq!(str_of("MODEL.BACKBONE.NAME"), "build_resnet_fpn_backbone");
                assert_eq!(str_of("MODEL.ROI_HEADS.NAME"), "StandardROIHeads");
                for k in [
                    "MODEL.FPN.NORM",
                    "MODEL.ROI_BOX_HEAD.NORM",
                    "MODEL.ROI_MASK_HEAD.NORM",
                ] {
                    assert_eq!(str_of(k), "SyncBN", "{leaf}: {k}");
                }
                assert_eq!(int_of("MODEL.ROI_BOX_HEAD.NUM_CONV"), 4);
                assert_eq!(int_of("MODEL.ROI_MASK_HEAD.NUM_CONV"), 4);
            }
        }
    }
}
