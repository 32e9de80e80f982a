//! `lewel show-align` as a user meets it: a run folder drawn on the built-in set and on an
//! ImageFolder (the PNG decodes, one row per image, one column per head), and bad input as one line
//! with exit code 2 and no PNG.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn lewel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lewel"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lewel-show-align-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let o = cmd.output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

/// A one-epoch run of the tiny model on a few built-in images (32 px), in `d/run`.
fn tiny_run(d: &Path) {
    let (code, _, err) = run(lewel().current_dir(d).args([
        "pretrain",
        "--epochs",
        "1",
        "--train-len",
        "32",
        "--val-len",
        "10",
        "--batch-size",
        "16",
        "--knn-memory",
        "10",
        "--knn-k",
        "5",
        "--image-size",
        "32",
        "--device",
        "cpu",
        "--out",
        "run",
    ]));
    assert_eq!(code, 0, "{err}");
}

/// The PNG's size, decoded.
fn png_size(p: &Path) -> (usize, usize) {
    let bytes = std::fs::read(p).unwrap();
    let mut dec = zune_png::PngDecoder::new(zune_core::bytestream::ZCursor::new(&bytes[..]));
    dec.decode_headers().unwrap();
    let (w, h) = dec.dimensions().unwrap();
    let px = dec.decode_raw().unwrap();
    assert_eq!(px.len(), w * h * 3, "RGB, 8 bits");
    (w, h)
}

/// The grid of `rows` images at a 32 px input: cells 160 px (x5), five columns (the image, four
/// heads), a 16 px header, each row 160 + 22 caption + 4 gap, a legend of whole 10 px lines.
fn assert_grid(size: (usize, usize), rows: usize) {
    let (w, h) = size;
    assert_eq!(w, 4 + 5 * (160 + 4), "five columns");
    let legend = h as i64 - 16 - rows as i64 * (160 + 22 + 4) - 4;
    assert!(
        (10..=30).contains(&legend) && legend % 10 == 0,
        "{rows} rows: height {h}"
    );
}

#[test]
fn show_align_draws_each_head_over_synthetic_and_folder_images() {
    let d = tmp("ok");
    tiny_run(&d);
    let (code, out, err) = run(lewel().current_dir(&d).args([
        "show-align",
        "--checkpoint",
        "run",
        "--data",
        "synthetic",
        "--count",
        "3",
        "--out",
        "a.png",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(lines[0].starts_with("show-align | "), "{out}");
    assert!(
        lines[0].contains("4 heads x 8 maps, scale 1") && lines[0].contains("config.toml"),
        "heads and scale come from the run: {}",
        lines[0]
    );
    let per_map = lines
        .iter()
        .filter(|l| l.starts_with("align | image "))
        .count();
    let per_head = lines
        .iter()
        .filter(|l| l.contains(" over 3 images "))
        .count();
    assert_eq!((per_map, per_head), (3 * 4, 4), "{out}");
    assert!(
        lines[1].contains("H/Hmax ") && lines[1].contains("peak (") && lines[1].contains("object "),
        "{}",
        lines[1]
    );
    assert!(lines
        .last()
        .unwrap()
        .starts_with("a.png: 3 images x 4 heads"));
    assert_grid(png_size(&d.join("a.png")), 3);

    // An ImageFolder: the same grid, captions from the class folders; the run's input size (32).
    common::images(&d.join("set"), &["cats", "dogs"], 2);
    let (code, out, err) = run(lewel().current_dir(&d).args([
        "show-align",
        "--checkpoint",
        "run",
        "--data",
        "set",
        "--count",
        "2",
        "--out",
        "b.png",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("32 px input"), "{out}");
    assert!(out.contains(" cats |") || out.contains(" dogs |"), "{out}");
    assert!(!out.contains(" object "), "no masks for real images: {out}");
    assert_grid(png_size(&d.join("b.png")), 2);
    std::fs::remove_dir_all(&d).unwrap();
}

/// A bad-input exit: code 2, one line on stderr naming `names`, nothing on stdout, no PNG.
fn assert_bad(d: &Path, args: &[&str], names: &str) {
    let (code, out, err) = run(lewel()
        .current_dir(d)
        .args(["show-align", "--out", "bad.png"])
        .args(args));
    assert_eq!(code, 2, "{args:?}: exit code; stderr: {err}");
    assert_eq!(err.lines().count(), 1, "{args:?}: one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
    assert!(out.is_empty(), "{args:?}: stdout: {out}");
    assert!(
        err.contains(names),
        "{args:?}: stderr should name {names}: {err}"
    );
    assert!(!d.join("bad.png").exists(), "{args:?} wrote a PNG");
}

#[test]
fn show_align_bad_input_is_one_line() {
    let d = tmp("bad");
    tiny_run(&d);
    let (code, _, err) = run(lewel().current_dir(&d).args([
        "export",
        "--checkpoint",
        "run",
        "--out",
        "backbone.safetensors",
    ]));
    assert_eq!(code, 0, "{err}");
    let syn = ["--data", "synthetic"];
    assert_bad(
        &d,
        &[&["--checkpoint", "backbone.safetensors"][..], &syn].concat(),
        "backbone.safetensors: has no LEWEL neck (online_net.neck.proj.*): show-align needs a full LEWEL checkpoint, not an exported backbone",
    );
    assert_bad(
        &d,
        &[&["--checkpoint", "missing.safetensors"][..], &syn].concat(),
        "missing.safetensors",
    );
    assert_bad(
        &d,
        &[&["--checkpoint", "run", "--count", "0"][..], &syn].concat(),
        "--count",
    );
    assert_bad(
        &d,
        &[&["--checkpoint", "run", "--size", "8"][..], &syn].concat(),
        "--size",
    );
    assert_bad(
        &d,
        &[&["--checkpoint", "run", "--lewel-num-heads", "8"][..], &syn].concat(),
        "--lewel-num-heads 8: the run was trained with 4",
    );
    assert_bad(
        &d,
        &["--checkpoint", "run", "--data", "no-such-folder"],
        "no-such-folder",
    );
    std::fs::remove_dir_all(&d).unwrap();
}
