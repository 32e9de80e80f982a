//! Stopping a run on request. SIGINT (Ctrl-C), SIGTERM and SIGUSR1 (what Slurm and other
//! schedulers send before pre-emption) ask the training loop to finish the step it is in, write a
//! checkpoint and exit with [`EXIT_STOPPED`]; a second SIGINT exits at once with [`EXIT_ABORTED`]
//! (every file a run writes appears by rename, so nothing is left half-written: at most a temp
//! file, which the next run in the folder removes).
//!
//! The handler only stores the signal's number in an atomic; the loop polls it between steps.

use std::sync::atomic::{AtomicI32, Ordering};

/// Exit code of a run stopped by a signal, its checkpoint written: resume it (EX_TEMPFAIL, "try
/// again later", so a job script can requeue on it).
pub const EXIT_STOPPED: i32 = 75;
/// Exit code of a run stopped by a second Ctrl-C, at once (the shell's code for SIGINT).
pub const EXIT_ABORTED: i32 = 130;
/// Exit code of a run stopped because a loss, gradient or weight became NaN or infinite.
pub const EXIT_NON_FINITE: i32 = 3;

/// The first stop signal received (0: none).
static STOP: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    let before = STOP.swap(sig, Ordering::SeqCst);
    if before != 0 && sig == libc::SIGINT {
        const MSG: &[u8] = b"\nlewel: second interrupt: stopping now, without a checkpoint of the steps since the last one\n";
        // Only async-signal-safe calls here: write(2) and _exit(2).
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
            libc::_exit(EXIT_ABORTED);
        }
    }
    if before != 0 {
        // Keep the first signal's name for the report.
        STOP.store(before, Ordering::SeqCst);
        return;
    }
    if sig == libc::SIGINT {
        // Someone at a terminal: say it was heard. (SIGTERM and SIGUSR1 come from schedulers and
        // launchers, which read the line the stop prints.)
        const MSG: &[u8] = b"\nlewel: SIGINT: finishing the step, then writing a checkpoint (Ctrl-C again stops at once)\n";
        unsafe {
            libc::write(2, MSG.as_ptr().cast(), MSG.len());
        }
    }
}

/// Routes SIGINT, SIGTERM and SIGUSR1 to the stop flag (for the life of the process).
pub fn install() {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1] {
        // SAFETY: the handler only touches an atomic, or writes and _exits.
        unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as *const () as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut());
        }
    }
}

/// The stop signal received so far, if any.
pub fn requested() -> Option<i32> {
    match STOP.load(Ordering::SeqCst) {
        0 => None,
        s => Some(s),
    }
}

/// Asks for a stop as a signal would (the test hook of an interruption at a chosen step).
pub fn request(sig: i32) {
    STOP.store(sig, Ordering::SeqCst);
}

/// Forgets a request (a test runs several runs in one process).
pub fn clear() {
    STOP.store(0, Ordering::SeqCst);
}

/// SIGINT, SIGTERM, SIGUSR1 or the number.
pub fn name(sig: i32) -> String {
    match sig {
        libc::SIGINT => "SIGINT".into(),
        libc::SIGTERM => "SIGTERM".into(),
        libc::SIGUSR1 => "SIGUSR1".into(),
        s => format!("signal {s}"),
    }
}
