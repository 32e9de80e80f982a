//! `lewel pretrain --gpus N`: one worker process per GPU on this machine, started as torchrun
//! starts them (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR=127.0.0.1, MASTER_PORT: a free port, or
//! --master-port). The launcher forwards SIGINT, SIGTERM and SIGUSR1 to its workers (they run in
//! a process group of their own, so a terminal's Ctrl-C reaches them once, through it), and its
//! workers die with it (PR_SET_PDEATHSIG): no orphans. When a worker fails, the others are ended
//! (SIGTERM, then SIGKILL after 10 s) and the launcher exits with the first failure's code.

use crate::error::{Error, Result};
use std::ffi::OsString;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

/// The last signal the launcher received, to forward.
static PENDING: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    PENDING.store(sig, Ordering::SeqCst);
}

/// A free TCP port on this host (the OS picks; released at once for rank 0 to take).
fn free_port() -> Result<u16> {
    let l = std::net::TcpListener::bind(("127.0.0.1", 0))
        .map_err(|e| Error::Other(format!("--gpus: finding a free port: {e}")))?;
    l.local_addr()
        .map(|a| a.port())
        .map_err(|e| Error::Other(format!("--gpus: finding a free port: {e}")))
}

/// How a worker ended, as a shell reports it.
fn code_of(s: std::process::ExitStatus) -> (i32, String) {
    match (s.code(), s.signal()) {
        (Some(c), _) => (c, format!("exited with code {c}")),
        (None, Some(sig)) => (128 + sig, format!("was killed by signal {sig}")),
        _ => (1, "ended".into()),
    }
}

/// Runs `args` (the pretrain command line without --gpus) as `n` workers; returns the exit code.
pub fn launch(n: usize, args: &[OsString], port: Option<u16>) -> Result<i32> {
    let exe = std::env::current_exe()
        .map_err(|e| Error::Other(format!("--gpus: cannot find this program: {e}")))?;
    let port = match port {
        Some(p) => p,
        None => free_port()?,
    };
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only stores to an atomic.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
    let mut workers: Vec<Option<Child>> = Vec::with_capacity(n);
    for r in 0..n {
        let mut c = Command::new(&exe);
        c.arg("pretrain")
            .args(args)
            .env("RANK", r.to_string())
            .env("WORLD_SIZE", n.to_string())
            .env("LOCAL_RANK", r.to_string())
            .env("LOCAL_WORLD_SIZE", n.to_string())
            .env("MASTER_ADDR", "127.0.0.1")
            .env("MASTER_PORT", port.to_string())
            .env("LEWEL_LAUNCHER", "1");
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            c.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                libc::setpgid(0, 0);
                Ok(())
            });
        }
        match c.spawn() {
            Ok(ch) => workers.push(Some(ch)),
            Err(e) => {
                end_all(&mut workers);
                return Err(Error::Other(format!("--gpus: starting worker {r}: {e}")));
            }
        }
    }
    let mut first: Option<(usize, i32, String)> = None;
    let mut forwarded = 0;
    loop {
        let sig = PENDING.swap(0, Ordering::SeqCst);
        if sig != 0 {
            forwarded = sig;
            signal_all(&workers, sig);
        }
        let mut running = 0;
        for (r, w) in workers.iter_mut().enumerate() {
            let Some(ch) = w else { continue };
            match ch.try_wait() {
                Ok(Some(s)) => {
                    *w = None;
                    let (code, how) = code_of(s);
                    if code != 0 && first.is_none() {
                        first = Some((r, code, how));
                    }
                }
                Ok(None) => running += 1,
                Err(_) => *w = None,
            }
        }
        if running == 0 {
            break;
        }
        if first.is_some() {
            end_all(&mut workers);
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(match first {
        None => 0,
        Some((r, code, how)) => {
            if forwarded == 0 && code != 2 {
                // A usage error (2) was already said by the rank itself.
                eprintln!("lewel: error: rank {r} {how}; the other ranks were ended");
            }
            code
        }
    })
}

fn signal_all(workers: &[Option<Child>], sig: i32) {
    for ch in workers.iter().flatten() {
        // SAFETY: plain kill(2) on our own child.
        unsafe { libc::kill(ch.id() as i32, sig) };
    }
}

/// SIGTERM to every worker still running, SIGKILL to those left after 10 s; all reaped.
fn end_all(workers: &mut [Option<Child>]) {
    signal_all(workers, libc::SIGTERM);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut left = 0;
        for w in workers.iter_mut() {
            if let Some(ch) = w {
                match ch.try_wait() {
                    Ok(Some(_)) | Err(_) => *w = None,
                    Ok(None) => left += 1,
                }
            }
        }
        if left == 0 {
            return;
        }
        if Instant::now() >= deadline {
            for ch in workers.iter_mut().flatten() {
                let _ = ch.kill();
                let _ = ch.wait();
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}
