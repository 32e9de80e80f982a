//! Link 3 (DESIGN "Tests"): every GPU op against the CPU reference, as `lewel check` runs it.
//! Skips with a printed reason where there is no usable GPU, and runs in full where there is.

#[test]
fn gpu_ops_match_the_cpu_reference() {
    let probe = lewel::device::probe();
    if !probe.usable(0) {
        eprintln!(
            "SKIPPED gpu_ops_match_the_cpu_reference: no usable GPU ({})",
            probe
                .driver
                .as_ref()
                .err()
                .map_or("no CUDA device of compute capability >= 7.5", |e| e
                    .as_str())
        );
        return;
    }
    let g = lewel::gpu::Gpu::new(0, true).expect("opening GPU 0");
    let rows = lewel::gpu::check::run_ops(&g, 1).expect("running the checks");
    println!("{}", lewel::gpu::check::table(&rows));
    let failed: Vec<_> = rows.iter().filter(|r| !r.pass()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} checks failed",
        failed.len(),
        rows.len()
    );
}
