//! Links 3 and 4 (DESIGN "Tests"), as `lewel check` runs them: every GPU op against the CPU
//! reference; then whole LEWEL steps GPU against CPU, a bitwise --deterministic rerun and the first
//! 20 steps of the built-in run's loss curve. Each skips with a printed reason where there is no
//! usable GPU, and runs in full where there is.

use lewel::check::{table, Row};
use std::rc::Rc;

/// GPU 0 opened deterministic, or None after printing why the test skips.
fn gpu(test: &str) -> Option<Rc<lewel::gpu::Gpu>> {
    let probe = lewel::device::probe();
    if !probe.usable(0) {
        eprintln!(
            "SKIPPED {test}: no usable GPU ({})",
            probe
                .driver
                .as_ref()
                .err()
                .map_or("no CUDA device of compute capability >= 7.5", |e| e
                    .as_str())
        );
        return None;
    }
    Some(Rc::new(
        lewel::gpu::Gpu::new(0, true).expect("opening GPU 0"),
    ))
}

fn assert_all_pass(rows: &[Row]) {
    println!("{}", table(rows));
    let failed = rows.iter().filter(|r| !r.pass()).count();
    assert!(failed == 0, "{failed} of {} checks failed", rows.len());
}

#[test]
fn gpu_ops_match_the_cpu_reference() {
    if let Some(g) = gpu("gpu_ops_match_the_cpu_reference") {
        assert_all_pass(&lewel::check::run_ops(&g, 1).expect("running the checks"));
    }
}

#[test]
fn gpu_steps_match_the_cpu_and_rerun_bitwise() {
    if let Some(g) = gpu("gpu_steps_match_the_cpu_and_rerun_bitwise") {
        assert_all_pass(&lewel::check::step::run_steps(&g, 1).expect("running the steps"));
    }
}
