//! `lewel import` on files PyTorch wrote (tests/fixtures/import/, made by
//! tests/parity/make_import_fixtures.py): the official checkpoint layout, the legacy
//! extract_backbone.py output, a torchvision-style state_dict; and what must be refused in one line.

use lewel::checkpoint::{self, Owned, Tensors};
use std::path::{Path, PathBuf};
use std::process::Command;

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/import")
        .join(name)
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lewel-import-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn lewel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lewel"))
}

/// (exit code, stdout, stderr)
fn run(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

fn expected() -> Tensors {
    checkpoint::read_file(&fixture("expected.safetensors")).unwrap()
}

fn f64s(o: &Owned) -> Vec<f64> {
    match o.dtype {
        safetensors::Dtype::F64 => o
            .bytes
            .chunks_exact(8)
            .map(|c| f64::from_le_bytes(c.try_into().unwrap()))
            .collect(),
        _ => o.to_f32().unwrap().iter().map(|&v| v as f64).collect(),
    }
}

/// ||a - b|| / ||b|| of `lewel embed`'s features of the fixture images under `checkpoint`
/// against PyTorch's float64 `reference` (an entry of expected.safetensors).
fn embed_rel_l2(checkpoint: &Path, dir: &Path, reference: &str) -> f64 {
    let out = dir.join(format!("{reference}.safetensors"));
    let e = lewel::run::embed(checkpoint, &fixture("images.safetensors"), &out, 224).unwrap();
    let got = checkpoint::read_file(&out).unwrap();
    let a = f64s(&got["features"]);
    let want = &expected()[reference];
    assert_eq!(got["features"].shape, want.shape, "{reference}");
    assert_eq!(e.n * e.dim, a.len());
    let b = f64s(want);
    let d: f64 = a.iter().zip(&b).map(|(x, y)| (x - y).powi(2)).sum();
    let n: f64 = b.iter().map(|y| y * y).sum();
    (d / n).sqrt()
}

/// The official checkpoint.pth.tar layout (module. prefixes, LARS optimizer state, epoch) imports
/// into a full state: the momentum buffers land under the right names bit for bit, the state
/// tensors too, and `lewel embed` on it gives PyTorch's pooled eval-mode features of the online
/// backbone.
#[test]
fn official_checkpoint_imports_with_its_momentum_and_embeds_like_pytorch() {
    let d = tmp("official");
    let out = d.join("state.safetensors");
    let i = lewel::import::import(&fixture("lewel_checkpoint.pth.tar"), &out).unwrap();
    assert_eq!(i.epoch, Some(3));
    // ResNet-50/16: 167 online parameters + 8 of the predictors, each with a buffer.
    assert_eq!(i.momentum, 175);
    assert!(
        i.summary
            .contains("LEWELB_EMAN (resnet50/16) at epoch 3 (best kNN 12.50%)")
            && i.summary
                .contains("678 state tensors + 175 LARS momentum buffers"),
        "{}",
        i.summary
    );
    let t = checkpoint::read_file(&out).unwrap();
    assert_eq!(t.len(), 678 + 175);
    assert!(t.keys().all(|k| !k.starts_with("module.")));
    let want = expected();
    let mut checked = 0;
    for (k, v) in &want {
        let ours = if let Some(n) = k.strip_prefix("lewel.") {
            n.to_string()
        } else if k.starts_with("momentum.") {
            k.clone()
        } else {
            continue;
        };
        if ours == "features" {
            continue;
        }
        assert_eq!(t.get(&ours), Some(v), "{ours} differs from PyTorch's");
        checked += 1;
    }
    assert_eq!(checked, 7 + 3);
    let rel = embed_rel_l2(&out, &d, "lewel.features");
    println!("official checkpoint: embed vs PyTorch float64, rel. L2 {rel:.3e}");
    assert!(rel <= 1e-5, "rel. L2 {rel}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// `lewel step --state` takes the imported state as it is (its names, shapes and LARS buffers).
#[test]
fn lewel_step_accepts_the_imported_state() {
    let d = tmp("step");
    let state = d.join("state.safetensors");
    let (code, out, err) = run(lewel()
        .arg("import")
        .arg(fixture("lewel_checkpoint.pth.tar"))
        .arg("--out")
        .arg(&state));
    assert_eq!(code, 0, "{err}");
    assert_eq!(out.lines().count(), 1, "{out}");
    assert!(out.contains("at epoch 3"), "{out}");
    // Two 48 px views of two images (float32 NCHW).
    let n = 2 * 3 * 48 * 48;
    let v1: Vec<f32> = (0..n)
        .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
        .collect();
    let v2: Vec<f32> = v1.iter().rev().copied().collect();
    let mut views = Tensors::new();
    views.insert("view1".into(), Owned::f32(vec![2, 3, 48, 48], &v1));
    views.insert("view2".into(), Owned::f32(vec![2, 3, 48, 48], &v2));
    checkpoint::write_file_atomic(&d.join("views.safetensors"), &views, None).unwrap();
    let step = |state: &Path, out: &Path| -> Tensors {
        let (code, stdout, err) = run(lewel()
            .args(["step", "--state"])
            .arg(state)
            .arg("--views")
            .arg(d.join("views.safetensors"))
            .arg("--out")
            .arg(out));
        assert_eq!(code, 0, "{err}");
        assert!(
            stdout.starts_with("step | lewel-b-eman | loss "),
            "{stdout}"
        );
        checkpoint::read_file(out).unwrap()
    };
    let with = step(&state, &d.join("out.safetensors"));
    let loss = with["loss"].to_f32().unwrap()[0];
    assert!(loss.is_finite() && loss > 0.0, "loss {loss}");
    // The same step from the same state without the buffers gives buf = u; with them the step
    // read each imported buffer under its name: buf' = 0.9 * buf + u.
    let mut bare = checkpoint::read_file(&state).unwrap();
    let bufs: Tensors = bare
        .iter()
        .filter(|(k, _)| k.starts_with("momentum."))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    assert_eq!(bufs.len(), 175);
    bare.retain(|k, _| !k.starts_with("momentum."));
    checkpoint::write_file_atomic(&d.join("bare.safetensors"), &bare, None).unwrap();
    let without = step(&d.join("bare.safetensors"), &d.join("out_bare.safetensors"));
    for (k, buf) in &bufs {
        let (b, u, got) = (
            buf.to_f32().unwrap(),
            without[&format!("state.{k}")].to_f32().unwrap(),
            with[&format!("state.{k}")].to_f32().unwrap(),
        );
        let scale = got.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-30);
        for ((b, u), g) in b.iter().zip(&u).zip(&got) {
            assert!(
                (0.9 * b + u - g).abs() <= 1e-6 * scale,
                "{k}: 0.9 * {b} + {u} != {g}"
            );
        }
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// extract_backbone.py's output (legacy serialization) becomes the same backbone file that `lewel
/// export` writes from the imported checkpoint, and embeds like PyTorch.
#[test]
fn legacy_extract_backbone_file_is_the_export_of_the_same_weights() {
    let d = tmp("legacy");
    let state = d.join("state.safetensors");
    lewel::import::import(&fixture("lewel_checkpoint.pth.tar"), &state).unwrap();
    let exported = d.join("exported.safetensors");
    lewel::run::export(&state, &exported).unwrap();
    let out = d.join("backbone.safetensors");
    let i = lewel::import::import(&fixture("backbone_legacy.pth"), &out).unwrap();
    assert!(
        i.summary
            .contains("(legacy format): resnet50/16 backbone, 318 tensors"),
        "{}",
        i.summary
    );
    assert_eq!(
        checkpoint::read_file(&out).unwrap(),
        checkpoint::read_file(&exported).unwrap()
    );
    let rel = embed_rel_l2(&out, &d, "lewel.features");
    println!("legacy backbone: embed vs PyTorch float64, rel. L2 {rel:.3e}");
    assert!(rel <= 1e-5, "rel. L2 {rel}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A torchvision-style ResNet-18 state_dict (protocol 4, fc present, no num_batches_tracked, a
/// permuted-stride conv weight, two tensors sharing one storage) imports with fc dropped, every
/// value in place, and embeds like PyTorch.
#[test]
fn torchvision_resnet18_state_dict_imports_with_fc_dropped() {
    let d = tmp("r18");
    let out = d.join("r18.safetensors");
    let i = lewel::import::import(&fixture("resnet18_torchvision.pth"), &out).unwrap();
    assert!(
        i.summary.contains("resnet18/16 backbone")
            && i.summary.contains("fc.weight, fc.bias dropped")
            && i.summary
                .contains("20 absent num_batches_tracked written as 0"),
        "{}",
        i.summary
    );
    let t = checkpoint::read_file(&out).unwrap();
    assert!(!t.keys().any(|k| k.starts_with("fc.")));
    assert_eq!(t["layer3.1.bn2.num_batches_tracked"], Owned::i64_scalar(0));
    let want = expected();
    for n in [
        "layer1.0.conv1.weight",
        "bn1.running_mean",
        "bn1.running_var",
    ] {
        assert_eq!(t[n], want[&format!("r18.{n}")], "{n}");
    }
    let rel = embed_rel_l2(&out, &d, "r18.features");
    println!("torchvision resnet18: embed vs PyTorch float64, rel. L2 {rel:.3e}");
    assert!(rel <= 1e-5, "rel. L2 {rel}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A pickle naming a global outside the allow-list is refused by name, in one line, exit 2, and
/// nothing is written: a torch.save file naming posix.system, and a bare pickle naming os.system.
#[test]
fn pickles_naming_other_globals_are_refused_in_one_line() {
    let d = tmp("evil");
    let bare = d.join("bare.pkl");
    std::fs::write(&bare, b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00ls\x85R.").unwrap();
    for (file, global) in [(fixture("evil.pth"), "posix.system"), (bare, "os.system")] {
        let out = d.join("out.safetensors");
        let (code, stdout, err) = run(lewel().arg("import").arg(&file).arg("--out").arg(&out));
        assert_eq!(code, 2, "{err}");
        assert!(stdout.is_empty(), "{stdout}");
        assert_eq!(err.lines().count(), 1, "{err}");
        assert!(
            err.contains(&format!(
                "refuses to load: the pickle names the global {global}, which is not a PyTorch tensor or container"
            )),
            "{err}"
        );
        assert!(!out.exists());
    }
    std::fs::remove_dir_all(&d).unwrap();
}

/// Every truncation of both formats, and a damaged storage, is one line (a user error), never a
/// panic and never a file.
#[test]
fn truncated_or_damaged_files_are_one_line() {
    let d = tmp("cut");
    let out = d.join("out.safetensors");
    for name in ["lewel_checkpoint.pth.tar", "backbone_legacy.pth"] {
        let full = std::fs::read(fixture(name)).unwrap();
        let cut = d.join(name);
        // 60 cut points spread over the file, and a few inside the first pickle.
        let mut at: Vec<usize> = (0..60).map(|k| k * full.len() / 60).collect();
        at.extend([1, 2, 7, 30, 100, full.len() - 1]);
        for n in at {
            std::fs::write(&cut, &full[..n]).unwrap();
            let e = lewel::import::import(&cut, &out).unwrap_err();
            let m = e.to_string();
            assert_eq!(e.exit_code(), 2, "{name} cut at {n}: {m}");
            assert!(
                !m.contains('\n') && m.contains(name),
                "{name} cut at {n}: {m}"
            );
            assert!(!out.exists());
        }
    }
    // One byte flipped inside a storage of the zip checkpoint (found by its values): its CRC32
    // catches it.
    let mut b = std::fs::read(fixture("lewel_checkpoint.pth.tar")).unwrap();
    let w = &expected()["lewel.predictor_obj.mlp.3.weight"].bytes;
    let at = b.windows(w.len()).position(|x| x == &w[..]).unwrap() + w.len() / 2;
    b[at] ^= 0x40;
    let bad = d.join("flipped.pth.tar");
    std::fs::write(&bad, &b).unwrap();
    let e = lewel::import::import(&bad, &out).unwrap_err().to_string();
    assert!(e.contains("CRC32") && !e.contains('\n'), "{e}");
    // The CLI: exit 2, one line.
    let full = std::fs::read(fixture("backbone_legacy.pth")).unwrap();
    std::fs::write(d.join("cut.pth"), &full[..full.len() / 3]).unwrap();
    let (code, _, err) = run(lewel()
        .arg("import")
        .arg(d.join("cut.pth"))
        .arg("--out")
        .arg(&out));
    assert_eq!(code, 2, "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(!err.contains("panicked"), "{err}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// Another architecture, a missing tensor, a wrong shape, a folder for --out: one line each.
#[test]
fn other_architectures_and_missing_tensors_are_one_line() {
    let d = tmp("arch");
    let out = d.join("out.safetensors");
    let msg = |f: &str| {
        let e = lewel::import::import(&fixture(f), &out).unwrap_err();
        assert_eq!(e.exit_code(), 2);
        let m = e.to_string();
        assert!(!m.contains('\n'), "{m}");
        m
    };
    let m = msg("resnet34_div64.pth");
    assert!(
        m.contains("does not match resnet18/64") && m.contains("96 unexpected (layer1.2."),
        "{m}"
    );
    let m = msg("resnet18_damaged_div64.pth");
    assert!(
        m.contains("1 missing (bn1.weight)")
            && m.contains(
                "1 of the wrong shape (layer2.0.conv1.weight is F32 [3, 1, 3, 3], expected F32 [2, 1, 3, 3])"
            ),
        "{m}"
    );
    assert!(!out.exists());
    let e = lewel::import::import(&fixture("backbone_legacy.pth"), &d)
        .unwrap_err()
        .to_string();
    assert!(e.contains("a folder") && e.contains("config"), "{e}");
    std::fs::remove_dir_all(&d).unwrap();
}
