//! The `lewel` binary as a user meets it: exit codes, what goes to stdout and stderr, bad input,
//! run folders, resume, embed. Each test runs the built binary in its own temporary folder.

mod common;

use common::images;
use std::path::PathBuf;
use std::process::{Command, Output};

fn lewel() -> Command {
    Command::new(env!("CARGO_BIN_EXE_lewel"))
}

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lewel-cli-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn run(cmd: &mut Command) -> (i32, String, String) {
    let Output {
        status,
        stdout,
        stderr,
    } = cmd.output().unwrap();
    (
        status.code().unwrap_or(-1),
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
    )
}

/// A bad-input exit: code 2, one line on stderr, no panic, nothing on stdout.
fn assert_bad(r: &(i32, String, String), names: &str) {
    let (code, out, err) = r;
    assert_eq!(*code, 2, "exit code; stderr: {err}");
    assert!(
        !err.contains("panicked") && !err.contains("backtrace"),
        "{err}"
    );
    assert!(out.is_empty(), "stdout: {out}");
    assert!(err.contains(names), "stderr should name {names}: {err}");
}

#[test]
fn bare_lewel_prints_usage_and_trains_nothing() {
    let d = tmp("bare");
    let r = run(lewel().current_dir(&d));
    assert_bad(&r, "lewel pretrain");
    assert!(!d.join("runs").exists(), "bare lewel started a run");
}

/// Every flag of `pretrain --help` shows its default.
#[test]
fn every_pretrain_flag_shows_its_default() {
    let (code, out, _) = run(lewel().args(["pretrain", "--help"]));
    assert_eq!(code, 0);
    // Options are blocks: a line starting with "  -" or "      --", then help lines.
    let mut blocks: Vec<String> = Vec::new();
    for line in out.lines() {
        let t = line.trim_start();
        if t.starts_with("--") || t.starts_with("-h") {
            blocks.push(line.to_string());
        } else if let Some(b) = blocks.last_mut() {
            b.push_str(line);
        }
    }
    assert!(blocks.len() > 35, "{} options found", blocks.len());
    for b in blocks.iter().filter(|b| !b.contains("--help")) {
        assert!(b.contains("[default: "), "no default shown: {b}");
    }
}

/// Every value flag of pretrain, given odd values: exit 0 (a dry run) or 2 (one clear line), never
/// a panic, and nothing written.
#[test]
fn no_flag_value_panics() {
    let d = tmp("fuzz");
    let out = d.join("run");
    let flags = [
        "--epochs",
        "--warmup-epochs",
        "--batch-size",
        "--lr",
        "--wd",
        "--enc-m",
        "--lewel-num-heads",
        "--lewel-loss-weight",
        "--lewel-scale",
        "--lars-exclude",
        "--bn-group",
        "--seed",
        "--device",
        "--precision",
        "--image-size",
        "--train-len",
        "--val-len",
        "--knn-k",
        "--knn-memory",
        "--log-every",
        "--keep",
        "--knn-memory-per-class",
        "--knn-query-per-class",
        "--knn-protocol",
        "--loader-threads",
        "--max-bad",
        "--jpeg-decoder",
        "--arch",
        "--method",
        "--stop-after",
        "--data",
        "--val-data",
        "--config",
        "--resume",
    ];
    let values = [
        "0",
        "1",
        "-1",
        "abc",
        "",
        "1e400",
        "nan",
        "99999999999999999999",
        "4294967297",
        "3",
    ];
    for f in flags {
        for v in values {
            let arg = format!("{f}={v}");
            let (code, stdout, err) = run(lewel().args([
                "pretrain",
                "--dry-run",
                "--train-len",
                "64",
                "--val-len",
                "16",
                "--batch-size",
                "16",
                "--out",
                out.to_str().unwrap(),
                &arg,
            ]));
            assert!(
                code == 0 || code == 2,
                "{arg}: exit {code}\n{stdout}\n{err}"
            );
            assert!(!err.contains("panicked"), "{arg}: {err}");
            if code == 2 {
                assert_eq!(err.trim().lines().count(), 1, "{arg}: one line: {err}");
            } else {
                assert!(stdout.contains("dry run"), "{arg}: {stdout}");
            }
            assert!(!out.exists(), "{arg}: the dry run wrote {}", out.display());
        }
    }
}

#[test]
fn bad_flags_name_themselves_and_write_nothing() {
    let d = tmp("bad");
    let out = d.join("run");
    let o = out.to_str().unwrap();
    for (args, names) in [
        (vec!["--log-every", "0"], "--log-every"),
        (vec!["--image-size", "0"], "--image-size"),
        (vec!["--val-len", "0"], "--val-len"),
        (vec!["--device", "cuda:7"], "cuda:7"),
        (
            vec!["--precision", "bf16", "--device", "cpu"],
            "--precision",
        ),
        (vec!["--knn-protocol", "leaky"], "--knn-protocol"),
        (vec!["--sync-bn", "--bn-group", "8"], "--sync-bn"),
        (vec!["--data", "/nonexistent/imgs"], "/nonexistent/imgs"),
        (vec!["--resume", "/nonexistent/run"], "/nonexistent/run"),
    ] {
        let mut a = vec!["pretrain", "--train-len", "64", "--out", o];
        a.extend(args.iter().copied());
        let r = run(lewel().args(&a));
        // A machine with a GPU 7 (or the software GPU) may accept cuda:7: skip that case there.
        if names == "cuda:7" && r.0 == 0 {
            continue;
        }
        assert_bad(&r, names);
        assert!(!out.exists(), "{args:?} wrote {}", out.display());
    }
    let r = run(lewel().args(["data", "show", ".", "--size", "0", "--out", o]));
    assert_bad(&r, "--size");
    let r = run(lewel().args(["data", "show", ".", "--count", "0", "--out", o]));
    assert_bad(&r, "--count");
}

/// `lewel check` with no GPU says why it cannot run and where to go: the software GPU and `lewel
/// info`. (On a machine with a GPU, or under the software GPU, it runs instead: skipped.)
#[test]
fn check_without_a_gpu_says_what_to_do() {
    let r = run(lewel().arg("check").env("LD_LIBRARY_PATH", "/nonexistent"));
    if r.0 == 0 {
        eprintln!("a GPU is here: skipped");
        return;
    }
    assert_bad(&r, "emu-env.sh");
    assert!(r.2.contains("lewel info"), "{}", r.2);
}

/// A short real-data run from the CLI: step lines on stdout, warnings on stderr, absent values
/// as "-", paths saved absolute (resume works from another directory), a run folder refused
/// while it holds a run, then extended by --resume --epochs.
#[test]
fn a_real_data_run_from_the_cli() {
    let d = tmp("real");
    images(&d.join("imgs"), &["cat", "dog"], 12);
    let common = [
        "--batch-size",
        "8",
        "--image-size",
        "32",
        "--log-every",
        "1",
        "--loader-threads",
        "1",
        "--device",
        "cpu",
    ];
    let (code, out, err) = run(lewel()
        .current_dir(&d)
        .args([
            "pretrain", "--data", "imgs", "--epochs", "1", "--out", "run",
        ])
        .args(common));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("step 1/3 |") && out.contains("step 3/3 |"),
        "{out}"
    );
    assert!(
        out.contains("warmup 0 (the default 2 clamped below --epochs 1)"),
        "{out}"
    );
    // No val/: the monitor is off, its values print as "-".
    assert!(out.contains("kNN monitor off"), "{out}");
    let summary = out.lines().last().unwrap();
    assert!(summary.contains(" -"), "absent values as -: {summary}");
    assert!(!out.contains("NaN") && !out.contains("None"), "{out}");
    assert!(!err.contains("step "), "step lines go to stdout: {err}");
    let config = std::fs::read_to_string(d.join("run/config.toml")).unwrap();
    let abs = std::fs::canonicalize(d.join("imgs")).unwrap();
    assert!(
        config.contains(&format!("data = \"{}\"", abs.display())),
        "{config}"
    );

    // The folder holds a run: refused, naming --resume.
    let r = run(lewel()
        .current_dir(&d)
        .args([
            "pretrain", "--data", "imgs", "--epochs", "1", "--out", "run",
        ])
        .args(common));
    assert_bad(&r, "--resume");

    // Extended from another directory: the saved paths are absolute.
    let run_dir = d.join("run");
    let (code, out, err) = run(lewel().current_dir("/").args([
        "pretrain",
        "--resume",
        run_dir.to_str().unwrap(),
        "--epochs",
        "2",
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("re-planned from 1 to 2 epochs") && out.contains("step 6/6 |"),
        "{out}"
    );
    // A flag that defines what is trained is refused on resume.
    let r = run(lewel().args([
        "pretrain",
        "--resume",
        run_dir.to_str().unwrap(),
        "--epochs",
        "3",
        "--batch-size",
        "16",
    ]));
    assert_bad(&r, "--batch-size 8 -> 16");
    // k above the kNN memory: a warning, on stderr.
    images(&d.join("val"), &["cat", "dog"], 3);
    let (code, out, err) = run(lewel()
        .current_dir(&d)
        .args([
            "pretrain",
            "--data",
            "imgs",
            "--val-data",
            "val",
            "--knn-memory-per-class",
            "2",
            "--epochs",
            "1",
            "--out",
            "run2",
        ])
        .args(common));
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains("warning: --knn-k 20 exceeds the 4 kNN memory images"),
        "{err}"
    );
    assert!(out.contains("knn | epoch 1 |"), "{out}");
    std::fs::remove_dir_all(&d).unwrap();
}

/// A second run on a folder in use fails at once, naming the holder's pid.
#[test]
fn a_second_run_on_a_busy_folder_names_the_first() {
    let d = tmp("busy");
    let out = d.join("run");
    let mut first = lewel()
        .args(["pretrain", "--device", "cpu", "--epochs", "50", "--out"])
        .arg(&out)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let lock = out.join("lewel.lock");
    let t0 = std::time::Instant::now();
    while std::fs::read_to_string(&lock).map_or(true, |s| s.trim().is_empty()) {
        assert!(
            t0.elapsed().as_secs() < 60,
            "the first run never took its lock"
        );
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    let r = run(lewel()
        .args(["pretrain", "--device", "cpu", "--force", "--out"])
        .arg(&out));
    let _ = first.kill();
    let _ = first.wait();
    assert_bad(&r, &format!("pid {}", first.id()));
    std::fs::remove_dir_all(&d).unwrap();
}

/// `lewel embed` takes an image file, a folder of images or an ImageFolder (with labels): the
/// same images give the same features. A checkpoint with a flipped bit is refused as damaged.
#[test]
fn embed_takes_images_and_checkpoints_are_verified() {
    let d = tmp("embed");
    images(&d.join("set"), &["a", "b"], 2);
    let (code, _, err) = run(lewel().current_dir(&d).args([
        "pretrain",
        "--data",
        "set",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--epochs",
        "1",
        "--device",
        "cpu",
        "--out",
        "run",
    ]));
    assert_eq!(code, 0, "{err}");
    // The same four images, flat.
    std::fs::create_dir_all(d.join("flat")).unwrap();
    for (c, i) in [("a", 0), ("a", 1), ("b", 0), ("b", 1)] {
        std::fs::copy(
            d.join(format!("set/{c}/img{i:03}.jpg")),
            d.join(format!("flat/{c}{i}.jpg")),
        )
        .unwrap();
    }
    let embed = |input: &str, out: &str| {
        let (code, stdout, err) = run(lewel().current_dir(&d).args([
            "embed",
            "--checkpoint",
            "run",
            "--images",
            input,
            "--out",
            out,
            "--image-size",
            "32",
        ]));
        assert_eq!(code, 0, "{input}: {err}");
        let bytes = std::fs::read(d.join(out)).unwrap();
        let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let f = st.tensor("features").unwrap();
        let feats: Vec<f32> = f
            .data()
            .chunks(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect();
        let labels = st.tensor("labels").ok().map(|t| {
            t.data()
                .chunks(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
                .collect::<Vec<_>>()
        });
        (f.shape().to_vec(), feats, labels, stdout)
    };
    let (shape, set, labels, _) = embed("set", "set.safetensors");
    assert_eq!(shape[0], 4);
    assert_eq!(labels, Some(vec![0, 0, 1, 1]));
    let (_, flat, no_labels, _) = embed("flat", "flat.safetensors");
    assert_eq!(no_labels, None);
    assert_eq!(
        set, flat,
        "an ImageFolder and a flat folder of the same images"
    );
    let (one_shape, one, _, _) = embed("flat/b0.jpg", "one.safetensors");
    assert_eq!(one_shape[0], 1);
    assert_eq!(one[..], flat[2 * shape[1]..3 * shape[1]]);

    // One flipped bit in the data of a checkpoint: refused however it is named.
    let ck = std::fs::read_dir(d.join("run"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("checkpoint_")
        })
        .unwrap();
    let mut bytes = std::fs::read(&ck).unwrap();
    let n = bytes.len();
    bytes[n - 100] ^= 1;
    let bad = d.join("renamed.safetensors");
    std::fs::write(&bad, bytes).unwrap();
    let r = run(lewel()
        .args(["export", "--checkpoint"])
        .arg(&bad)
        .arg("--out")
        .arg(d.join("out.safetensors")));
    assert_bad(&r, "damaged");
    assert!(!d.join("out.safetensors").exists());
    std::fs::remove_dir_all(&d).unwrap();
}

/// `lewel info` says how it reads the launcher's variables: one process by default, torchrun's
/// and Slurm's ranks, and a misread environment as its one-line reason.
#[test]
fn info_reports_the_ranks() {
    let clean = |c: &mut Command| {
        for k in [
            "RANK",
            "WORLD_SIZE",
            "LOCAL_RANK",
            "MASTER_ADDR",
            "MASTER_PORT",
            "SLURM_PROCID",
            "SLURM_NTASKS",
            "SLURM_LOCALID",
            "SLURM_JOB_NODELIST",
            "SLURM_NODELIST",
            "SLURM_JOB_ID",
        ] {
            c.env_remove(k);
        }
    };
    let info = |vars: &[(&str, &str)]| {
        let mut c = lewel();
        c.arg("info");
        clean(&mut c);
        c.envs(vars.iter().copied());
        let (code, out, err) = run(&mut c);
        assert_eq!(code, 0, "{err}");
        out.lines()
            .find(|l| l.starts_with("ranks "))
            .unwrap_or_default()
            .to_string()
    };
    assert!(info(&[]).contains("one process"), "{}", info(&[]));
    let t = info(&[
        ("RANK", "1"),
        ("WORLD_SIZE", "2"),
        ("LOCAL_RANK", "1"),
        ("MASTER_ADDR", "n0"),
        ("MASTER_PORT", "29400"),
    ]);
    assert_eq!(
        t,
        "ranks      torchrun: rank 1 of 2, local rank 1, rendezvous n0:29400"
    );
    let s = info(&[
        ("SLURM_PROCID", "3"),
        ("SLURM_NTASKS", "4"),
        ("SLURM_LOCALID", "1"),
        ("SLURM_JOB_NODELIST", "gpu[05-06]"),
        ("MASTER_PORT", "4000"),
    ]);
    assert_eq!(
        s,
        "ranks      Slurm: rank 3 of 4, local rank 1, rendezvous gpu05:4000"
    );
    let bad = info(&[("RANK", "0")]);
    assert!(bad.contains("WORLD_SIZE is not set, but RANK is"), "{bad}");
}

/// Evaluation commands' bad input: a bad learning-rate list, a checkpoint of no ResNet, a split
/// list that is not there, zero epochs: one line naming the flag or file, exit 2, nothing written.
#[test]
fn linear_and_finetune_bad_input_is_one_line() {
    let d = tmp("eval-bad");
    let out = d.join("out");
    let fx = "tests/fixtures/linear/builtin_run_backbone.safetensors";
    let not_resnet = "tests/fixtures/ops/ops_reference.safetensors";
    let o = out.to_str().unwrap();
    let base = ["--data", "builtin", "--device", "cpu", "--out", o];
    let cases: [(Vec<&str>, &str); 5] = [
        (
            vec!["linear", "--checkpoint", fx, "--lr", "0.1,abc"],
            "--lr",
        ),
        (
            vec!["linear", "--checkpoint", fx, "--epochs", "0"],
            "--epochs",
        ),
        (vec!["linear", "--checkpoint", not_resnet], not_resnet),
        (
            vec![
                "finetune",
                "--checkpoint",
                fx,
                "--split",
                "/nonexistent/list.txt",
            ],
            "--split /nonexistent/list.txt",
        ),
        (
            vec![
                "finetune",
                "--checkpoint",
                fx,
                "--split",
                "all",
                "--lr",
                "-1",
            ],
            "--lr",
        ),
    ];
    for (args, names) in cases {
        let r = run(lewel()
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args(&args)
            .args(base));
        assert_bad(&r, names);
        assert!(!out.join("linear.json").exists() && !out.join("finetune.json").exists());
    }
}

/// `lewel profile`: bad values are one line naming the flag (exit 2); a small run prints the
/// table with its sum-against-step line and writes the trace.
#[test]
fn profile_bad_input_is_one_line_and_a_small_run_works() {
    for (args, names) in [
        (vec!["--steps", "0"], "--steps"),
        (vec!["--batch-size", "1"], "--batch-size"),
        (vec!["--image-size", "8"], "--image-size"),
        (vec!["--arch", "vgg"], "--arch"),
        (vec!["--method", "byol"], "--method"),
        (vec!["--device", "gpu"], "--device"),
    ] {
        let mut a = vec!["profile", "--device", "cpu", "--arch", "tiny"];
        a.extend(args.iter().copied());
        assert_bad(&run(lewel().args(&a)), names);
    }
    let d = tmp("profile");
    let trace = d.join("trace.json");
    let (code, out, err) = run(lewel().args([
        "profile",
        "--device",
        "cpu",
        "--arch",
        "tiny",
        "--batch-size",
        "4",
        "--image-size",
        "32",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--trace",
        trace.to_str().unwrap(),
    ]));
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("% of the measured step") && out.contains("conv backward"),
        "{out}"
    );
    // The device's peaks in the header; work, bound and roofline columns; layer names.
    assert!(
        out.contains("peak: ") && out.contains("GFLOP/s (sgemm ") && out.contains("GB/s (copy "),
        "{out}"
    );
    assert!(
        out.contains("GFLOP/step") && out.contains("bound") && out.contains("roof%"),
        "{out}"
    );
    assert!(out.contains("online_net.backbone."), "{out}");
    let v: serde_json::Value = serde_json::from_slice(&std::fs::read(&trace).unwrap()).unwrap();
    assert!(v["traceEvents"].as_array().unwrap().len() > 50);
}

/// `lewel bench --json`: one JSON object on one line whose figures agree with each other, with
/// random views (data excluded) and with the built-in set's views drawn in each step; bad values
/// are one line naming the flag (exit 2).
#[test]
fn bench_json_is_consistent_and_bad_input_is_one_line() {
    for (args, names) in [
        (vec!["--steps", "0"], "--steps"),
        (vec!["--batch-size", "1"], "--batch-size"),
        (vec!["--image-size", "8"], "--image-size"),
        (vec!["--data", "imagenet"], "--data"),
        (
            vec!["--data", "builtin", "--image-size", "96"],
            "--image-size",
        ),
    ] {
        let mut a = vec!["bench", "--device", "cpu", "--arch", "tiny"];
        a.extend(args.iter().copied());
        let r = run(lewel().args(&a));
        assert_bad(&r, names);
        assert_eq!(r.2.trim_end().lines().count(), 1, "{}", r.2);
    }
    for data in ["none", "builtin"] {
        let (code, out, err) = run(lewel().args([
            "bench",
            "--device",
            "cpu",
            "--arch",
            "tiny",
            "--batch-size",
            "4",
            "--image-size",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--json",
            "--data",
            data,
        ]));
        assert_eq!(code, 0, "{err}");
        assert_eq!(out.trim_end().lines().count(), 1, "{out}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        let f = |k: &str| v[k].as_f64().unwrap_or_else(|| panic!("{k}: {v}"));
        let steps: Vec<f64> = v["step_s"]
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s.as_f64().unwrap())
            .collect();
        assert_eq!(steps.len(), 2, "{v}");
        assert!(steps.iter().all(|&s| s > 0.0), "{v}");
        let (med, min, max) = (f("median_s"), f("min_s"), f("max_s"));
        assert!(min <= med && med <= max, "{v}");
        let want = 4.0 / med;
        assert!((f("images_per_s") - want).abs() <= 1e-9 * want, "{v}");
        assert!(f("peak_bytes") > 0.0, "{v}");
        assert!(f("loss").is_finite(), "{v}");
        assert_eq!(v["data"], data);
        assert_eq!(v["device"], "cpu");
        assert_eq!(
            (v["batch"].as_u64(), v["size"].as_u64()),
            (Some(4), Some(32))
        );
        assert!(v["engine"].as_str().unwrap().starts_with("lewel "), "{v}");
        assert!(v["threads"].as_u64().unwrap() >= 1, "{v}");
        assert_eq!(v.get("data_s").is_some(), data == "builtin", "{v}");
    }
}

/// A run folder holding `epochs` epochs of `iters` made-up steps (as metrics.jsonl records them).
fn fake_run(dir: &std::path::Path, epochs: usize, iters: usize, scale: f64) {
    std::fs::create_dir_all(dir).unwrap();
    let mut text = format!("{{\"epoch\":0,\"knn_acc\":{}}}\n", 10.0 * scale);
    let total = (epochs * iters) as f64;
    for e in 1..=epochs {
        let mut sum = 0.0;
        for i in 0..iters {
            let k = (e - 1) * iters + i + 1;
            let t = k as f64 / total;
            let loss = scale * (4.0 - 2.5 * t) + 0.2 * ((k * 7919) % 13) as f64 / 13.0;
            sum += loss;
            let lr = if t < 0.2 {
                t / 0.2
            } else {
                0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            };
            let m = 1.0 - 0.1 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos());
            text.push_str(&format!(
                "{{\"step\":{k},\"epoch\":{e},\"loss\":{loss},\"lr\":{lr},\"ema_m\":{m},\"ms\":50.0,\"img_per_s\":300.0,\"data_ms\":2.0,\"skipped\":0,\"device_mib\":null}}\n"
            ));
        }
        text.push_str(&format!(
            "{{\"epoch\":{e},\"knn_acc\":{},\"mean_loss\":{}}}\n",
            scale * (10.0 + 5.0 * e as f64),
            sum / iters as f64
        ));
    }
    std::fs::write(dir.join("metrics.jsonl"), text).unwrap();
}

/// `lewel plot` draws two runs into one PNG of the stated size: each run's colour is there, and
/// so is text (dark pixels where the first panel's tick labels stand).
#[test]
fn plot_draws_runs_as_a_png() {
    let d = tmp("plot");
    fake_run(&d.join("a"), 3, 20, 1.0);
    fake_run(&d.join("b"), 2, 20, 1.3);
    let png = d.join("curves.png");
    let (code, out, err) =
        run(lewel()
            .current_dir(&d)
            .args(["plot", "a", "b/", "--out", "curves.png"]));
    assert_eq!(code, 0, "{err}");
    assert!(err.is_empty(), "{err}");
    assert_eq!(
        out.trim_end(),
        "curves.png: a: 60 steps, 3 epochs; b: 40 steps, 2 epochs (1600x1000 px; loss, learning rate, EMA momentum, kNN accuracy)"
    );
    let bytes = std::fs::read(&png).unwrap();
    let mut dec = zune_png::PngDecoder::new(zune_core::bytestream::ZCursor::new(&bytes[..]));
    dec.decode_headers().unwrap();
    let (w, h) = dec.dimensions().unwrap();
    assert_eq!((w, h), (1600, 1000));
    let px = dec.decode_raw().unwrap();
    assert_eq!(px.len(), w * h * 3, "RGB, 8 bits");
    let at = |x: usize, y: usize| {
        let i = (y * w + x) * 3;
        (px[i], px[i + 1], px[i + 2])
    };
    let mut colours = std::collections::HashSet::new();
    for y in 0..h {
        for x in 0..w {
            colours.insert(at(x, y));
        }
    }
    assert!(colours.len() > 50, "{} distinct colours", colours.len());
    assert!(colours.contains(&(31, 119, 180)), "run a's blue");
    assert!(colours.contains(&(255, 127, 14)), "run b's orange");
    let dark = (0..90)
        .flat_map(|x| (80..450).map(move |y| (x, y)))
        .filter(|&(x, y)| {
            let (r, g, b) = at(x, y);
            r < 100 && g < 100 && b < 100
        })
        .count();
    assert!(
        dark > 200,
        "tick labels and the axis name: {dark} dark pixels"
    );
    assert!(
        !std::fs::read_dir(&d).unwrap().any(|e| e
            .unwrap()
            .file_name()
            .to_string_lossy()
            .contains(".tmp")),
        "written atomically"
    );
}

/// A run with no steps yet is left out with a warning while another has some; alone, it is one
/// line and exit 2.
#[test]
fn plot_leaves_out_a_run_with_no_steps_yet() {
    let d = tmp("plot-empty");
    fake_run(&d.join("a"), 1, 5, 1.0);
    std::fs::create_dir_all(d.join("new")).unwrap();
    std::fs::write(
        d.join("new/metrics.jsonl"),
        "{\"epoch\":0,\"knn_acc\":9.5}\n",
    )
    .unwrap();
    let (code, out, err) = run(lewel()
        .current_dir(&d)
        .args(["plot", "a", "new", "--out", "c.png"]));
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        err.trim_end(),
        "warning: new: no steps logged yet; left out of the plot"
    );
    assert!(out.starts_with("c.png: a: 5 steps, 1 epochs ("), "{out}");
    let r = run(lewel()
        .current_dir(&d)
        .args(["plot", "new", "--out", "d.png"]));
    assert_bad(&r, "new: no steps logged yet");
    assert_eq!(r.2.lines().count(), 1, "{}", r.2);
    assert!(!d.join("d.png").exists());
}

/// Every bad input of `lewel plot`: one line naming the run, file or flag, exit 2, no PNG.
#[test]
fn plot_bad_input_is_one_line() {
    let d = tmp("plot-bad");
    fake_run(&d.join("good"), 1, 3, 1.0);
    std::fs::create_dir_all(d.join("bare")).unwrap();
    std::fs::write(d.join("file.txt"), "x").unwrap();
    std::fs::create_dir_all(d.join("dir.png")).unwrap();
    fake_run(&d.join("torn"), 1, 3, 1.0);
    let m = d.join("torn/metrics.jsonl");
    let text = std::fs::read_to_string(&m)
        .unwrap()
        .replacen("\"loss\"", "\"loss\":,", 1);
    std::fs::write(&m, text).unwrap();
    let cases: Vec<(Vec<&str>, &str)> = vec![
        (
            vec!["missing"],
            "missing: does not exist; expected a run folder",
        ),
        (vec!["file.txt"], "file.txt: is not a folder"),
        (vec!["bare"], "bare: no metrics.jsonl"),
        (
            vec!["good", "torn"],
            "torn/metrics.jsonl: line 2: expected a JSON record",
        ),
        (
            vec!["good", "--out", "nowhere/c.png"],
            "--out nowhere/c.png: the folder nowhere does not exist",
        ),
        (
            vec!["good", "--out", "c.jpg"],
            "--out c.jpg: expected a file name ending in .png",
        ),
        (
            vec!["good", "--out", "good"],
            "--out good: expected a file name ending in .png",
        ),
        (
            vec!["good", "--out", "dir.png"],
            "--out dir.png: is a folder; expected a .png file name",
        ),
        (vec![], "RUN"),
    ];
    for (args, says) in cases {
        let mut all = vec!["plot"];
        all.extend(&args);
        if !args.contains(&"--out") {
            all.extend(["--out", "c.png"]);
        }
        let r = run(lewel().current_dir(&d).args(&all));
        assert_bad(&r, says);
        assert_eq!(r.2.lines().count(), 1, "{args:?}: {}", r.2);
    }
    let pngs = std::fs::read_dir(&d)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "png"))
        .count();
    assert_eq!(pngs, 0, "no PNG written");
}
