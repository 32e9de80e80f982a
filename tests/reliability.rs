//! Runs that are stopped, killed or starved, as on a shared cluster:
//! - a real SIGTERM (and SIGUSR1) mid-epoch finishes the step, writes a checkpoint and exits 75;
//!   `--resume` then ends with the uninterrupted run's weights and each step once in metrics.jsonl;
//! - a second Ctrl-C exits at once (130), leaving no file that fails to load;
//! - SIGKILL at random moments, and inside checkpoint writes: every checkpoint left loads, and the
//!   run resumed after each kill ends bitwise where an uninterrupted run ends (5 kills here;
//!   `LEWEL_SOAK_KILLS=20 cargo test --release --test reliability soak -- --nocapture` for the
//!   full soak);
//! - a disk that fills up while a checkpoint is written: one clear line, the checkpoint before it
//!   intact and loadable.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn tmp(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("lewel-sig-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

/// A small built-in run: 2 epochs of 12 steps (32 px unless `extra` says).
fn pretrain(out: &Path, extra: &[&str]) -> Command {
    let size = if extra.contains(&"--image-size") {
        &[][..]
    } else {
        &["--image-size", "32"][..]
    };
    let mut c = Command::new(env!("CARGO_BIN_EXE_lewel"));
    c.args([
        "pretrain",
        "--device",
        "cpu",
        "--epochs",
        "2",
        "--warmup-epochs",
        "1",
        "--train-len",
        "192",
        "--val-len",
        "32",
        "--batch-size",
        "16",
        "--out",
    ])
    .arg(out)
    .args(size)
    .args(extra)
    .env("RAYON_NUM_THREADS", "2");
    c
}

/// `lewel pretrain --resume dir`: the run's own settings.
fn resume(dir: &Path) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lewel"));
    c.args(["pretrain", "--resume"])
        .arg(dir)
        .env("RAYON_NUM_THREADS", "2");
    c
}

fn step_records(dir: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(dir.join("metrics.jsonl"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|v| v.get("step").is_some())
        .collect()
}

/// Waits until the run has logged `n` steps (or fails after two minutes).
fn wait_for_steps(child: &mut Child, dir: &Path, n: usize) {
    let t0 = Instant::now();
    while step_records(dir).len() < n {
        if let Some(s) = child.try_wait().unwrap() {
            panic!("the run ended ({s}) before step {n}");
        }
        assert!(t0.elapsed() < Duration::from_secs(120), "no step {n} yet");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn kill(child: &Child, sig: i32) {
    assert_eq!(unsafe { libc::kill(child.id() as i32, sig) }, 0);
}

/// The values of each step (without timings), in order.
fn values(dir: &Path) -> Vec<String> {
    step_records(dir)
        .iter()
        .map(|v| format!("{} {} {} {}", v["step"], v["loss"], v["lr"], v["ema_m"]))
        .collect()
}

#[test]
fn sigterm_and_sigusr1_mid_epoch_then_resume_equal_an_uninterrupted_run() {
    let d = tmp("term");
    let (full, cut) = (d.join("full"), d.join("cut"));
    let o = pretrain(&full, &[]).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );

    for (sig, name, after) in [
        (libc::SIGTERM, "SIGTERM", 3),
        (libc::SIGUSR1, "SIGUSR1", 15),
    ] {
        let mut c = if after == 3 {
            pretrain(&cut, &[])
        } else {
            resume(&cut)
        };
        let mut child = c
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        wait_for_steps(&mut child, &cut, after);
        kill(&child, sig);
        let o = child.wait_with_output().unwrap();
        let (out, err) = (
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr),
        );
        assert_eq!(o.status.code(), Some(75), "stdout: {out}\nstderr: {err}");
        let line = out.lines().last().unwrap();
        assert!(
            line.starts_with(&format!("stopped by {name} after step "))
                && line.contains("continue with: lewel pretrain --resume "),
            "{line}"
        );
        let manifest: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(cut.join("checkpoint.json")).unwrap())
                .unwrap();
        let step = manifest["step"].as_u64().unwrap() as usize;
        assert!(
            step >= after,
            "checkpoint at step {step}, signal after {after}"
        );
        assert!(line.contains(&format!("after step {step} of 24")), "{line}");
        assert_eq!(
            step_records(&cut).len(),
            step,
            "the metrics end at the checkpoint"
        );
    }
    let o = resume(&cut).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let w = |r: &Path| std::fs::read(r.join("checkpoint_0002.safetensors")).unwrap();
    assert!(
        w(&full) == w(&cut),
        "weights differ from the uninterrupted run"
    );
    assert_eq!(
        values(&full),
        values(&cut),
        "each step once, the same values"
    );
    std::fs::remove_dir_all(&d).unwrap();
}

#[test]
fn a_second_ctrl_c_exits_at_once_and_leaves_nothing_broken() {
    let d = tmp("int");
    let run = d.join("run");
    // 64 px: steps long enough that the second Ctrl-C lands before the first one's step ends.
    let mut child = pretrain(&run, &["--image-size", "64"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_for_steps(&mut child, &run, 2);
    kill(&child, libc::SIGINT);
    // The first is seen (a line on stderr) before the second is sent: signals of one kind
    // sent together arrive once.
    let mut err = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut first = String::new();
    while !first.contains("finishing the step") {
        first.clear();
        assert!(std::io::BufRead::read_line(&mut err, &mut first).unwrap() > 0);
    }
    kill(&child, libc::SIGINT);
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut err, &mut rest).unwrap();
    let code = child.wait().unwrap().code();
    assert_eq!(code, Some(130), "stderr: {first}{rest}");
    assert!(rest.contains("second interrupt: stopping now"), "{rest}");
    assert!(
        first.contains("Ctrl-C again stops at once"),
        "the first says how to stop at once: {first}"
    );
    // No checkpoint was written yet: resume says so in one line (exit 2); a fresh start works.
    let o = resume(&run).output().unwrap();
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("before its first checkpoint"));
    let o = pretrain(&run, &["--force", "--image-size", "64"])
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::remove_dir_all(&d).unwrap();
}

/// A small xorshift generator for the kill moments (the seed is printed).
struct Moments(u64);

impl Moments {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Whether a temp file of an atomic write is in the folder (a checkpoint being written).
fn writing(dir: &Path) -> bool {
    std::fs::read_dir(dir).is_ok_and(|rd| {
        rd.filter_map(|e| e.ok())
            .any(|e| e.file_name().to_string_lossy().contains(".tmp-"))
    })
}

/// `epochs` epochs of 4 steps: a checkpoint every 4 steps, so kills often land in or near one.
fn soak_run(out: &Path, resume: bool, epochs: usize) -> Command {
    if resume {
        return self::resume(out);
    }
    let mut c = Command::new(env!("CARGO_BIN_EXE_lewel"));
    c.args([
        "pretrain",
        "--device",
        "cpu",
        "--warmup-epochs",
        "1",
        "--train-len",
        "64",
        "--val-len",
        "32",
        "--batch-size",
        "16",
        "--image-size",
        "32",
        "--force",
        "--out",
    ])
    .arg(out)
    .arg(format!("--epochs={epochs}"))
    .env("RAYON_NUM_THREADS", "2");
    c
}

#[test]
fn soak_sigkill_at_random_moments_and_inside_checkpoint_writes() {
    let kills: usize = std::env::var("LEWEL_SOAK_KILLS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(5);
    let seed = std::env::var("LEWEL_SOAK_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(0x5eed_2026_u64);
    let d = tmp("soak");
    let (full, cut) = (d.join("full"), d.join("cut"));
    // Long enough that every kill lands before the end (a cycle moves it 1 s at most).
    let epochs = 3 * kills;
    let o = soak_run(&full, false, epochs).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let mut r = Moments(seed | 1);
    let (mut in_write, mut at_random) = (0, 0);
    for kill in 0..kills {
        let resume = cut.join("checkpoint.json").exists();
        let mut child = soak_run(&cut, resume, epochs)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let t0 = Instant::now();
        if kill % 2 == 1 {
            // Inside a checkpoint write: as soon as a temp file shows.
            while !writing(&cut) && child.try_wait().unwrap().is_none() {
                assert!(
                    t0.elapsed() < Duration::from_secs(120),
                    "no checkpoint write"
                );
                std::thread::yield_now();
            }
            in_write += writing(&cut) as usize;
        } else {
            // At a random moment in the first second (start-up, steps, kNN, writes).
            std::thread::sleep(Duration::from_micros(r.next() % 1_000_000));
            at_random += 1;
        }
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before kill {kill}: make it longer"
        );
        kill_child(&mut child);
        // Whatever the moment, the folder holds a checkpoint that loads, or none yet.
        if cut.join("checkpoint.json").exists() {
            let o = Command::new(env!("CARGO_BIN_EXE_lewel"))
                .args(["export", "--checkpoint"])
                .arg(&cut)
                .arg("--out")
                .arg(d.join("probe.safetensors"))
                .output()
                .unwrap();
            assert_eq!(
                o.status.code(),
                Some(0),
                "kill {kill} (seed {seed}) left a checkpoint that does not load: {}",
                String::from_utf8_lossy(&o.stderr)
            );
        }
    }
    eprintln!("soak: {kills} kills (seed {seed}): {in_write} inside checkpoint writes, {at_random} at random moments");
    let o = soak_run(&cut, cut.join("checkpoint.json").exists(), epochs)
        .output()
        .unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let last = format!("checkpoint_{epochs:04}.safetensors");
    let w = |r: &Path| std::fs::read(r.join(&last)).unwrap();
    assert!(
        w(&full) == w(&cut),
        "weights after {kills} kills differ from the uninterrupted run"
    );
    assert_eq!(
        values(&full),
        values(&cut),
        "each step once, the same values"
    );
    assert!(!writing(&cut), "a temp file is left in the finished run");
    std::fs::remove_dir_all(&d).unwrap();
}

fn kill_child(child: &mut Child) {
    let _ = unsafe { libc::kill(child.id() as i32, libc::SIGKILL) };
    child.wait().unwrap();
}

/// A disk that fills while the epoch 2 checkpoint is written (the file size limit RLIMIT_FSIZE
/// stands in for a full disk: the write fails the same way, EFBIG instead of ENOSPC): one line
/// naming the file and saying the checkpoint before is intact, which then loads and resumes.
#[test]
fn a_full_disk_while_writing_a_checkpoint_keeps_the_one_before() {
    let d = tmp("full");
    let run = d.join("run");
    let o = pretrain(&run, &["--stop-after", "1"]).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    let size = std::fs::metadata(run.join("checkpoint_0001.safetensors"))
        .unwrap()
        .len();
    let mut c = resume(&run);
    unsafe {
        c.pre_exec(move || {
            // Half a checkpoint fits; writes past it fail instead of killing the process.
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let lim = libc::rlimit {
                rlim_cur: size / 2,
                rlim_max: size / 2,
            };
            libc::setrlimit(libc::RLIMIT_FSIZE, &lim);
            Ok(())
        });
    }
    let o = c.output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(2), "{err}");
    assert_eq!(err.lines().count(), 1, "{err}");
    assert!(
        err.contains("writing the checkpoint failed (the checkpoint before (checkpoint_0001.safetensors) is intact)")
            && err.contains("File too large"),
        "{err}"
    );
    let names: Vec<String> = std::fs::read_dir(&run)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        !names
            .iter()
            .any(|n| n.contains(".tmp-") || n.contains("0002")),
        "a partial file is left: {names:?}"
    );
    // The checkpoint before loads, and the run finishes from it.
    let o = resume(&run).output().unwrap();
    assert_eq!(
        o.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(String::from_utf8_lossy(&o.stdout).contains("resumed from"));
    std::fs::remove_dir_all(&d).unwrap();
}
