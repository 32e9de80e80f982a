//! Embeds every kernel source (kernels/*.cu and the shared kernels/common.cuh) into the binary, so
//! NVRTC compiles them at start-up with no files beside the executable.

use std::fmt::Write;
use std::path::Path;

fn main() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("kernels");
    println!("cargo:rerun-if-changed={}", dir.display());
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .expect("kernels/ folder")
        .map(|e| e.expect("kernels/ entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    files.sort();
    let mut out = String::new();
    let common = dir.join("common.cuh");
    println!("cargo:rerun-if-changed={}", common.display());
    writeln!(
        out,
        "/// kernels/common.cuh, included by every kernel.\npub const COMMON_CUH: &str = include_str!({:?});",
        common.display().to_string()
    )
    .unwrap();
    writeln!(
        out,
        "/// (file name, source) of every kernels/*.cu, sorted by name."
    )
    .unwrap();
    writeln!(out, "pub const SOURCES: &[(&str, &str)] = &[").unwrap();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
        let name = f.file_name().unwrap().to_string_lossy();
        writeln!(
            out,
            "    ({name:?}, include_str!({:?})),",
            f.display().to_string()
        )
        .unwrap();
    }
    writeln!(out, "];").unwrap();
    let dest = Path::new(&std::env::var("OUT_DIR").unwrap()).join("kernel_sources.rs");
    std::fs::write(dest, out).expect("write kernel_sources.rs");
}
