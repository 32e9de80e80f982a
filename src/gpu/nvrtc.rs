//! NVRTC: kernel sources to CUBIN for one GPU architecture, with the ptxas resource report, and an
//! on-disk cache keyed by (source hash, arch, NVRTC version).
//!
//! CUBIN, not PTX: PTX from an NVRTC newer than the driver fails to load, CUBIN does not
//! (CUDA_NOTES.md). cudarc's safe API only returns PTX, so this goes through `nvrtc::sys`.

use crate::error::{Error, Result};
use cudarc::nvrtc::sys;
use std::ffi::{c_char, CStr, CString};
use std::path::PathBuf;

include!(concat!(env!("OUT_DIR"), "/kernel_sources.rs"));

/// Resources of one compiled kernel, from ptxas's verbose report.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KernelReport {
    pub name: String,
    pub registers: u32,
    /// Static shared memory, bytes.
    pub shared: u32,
    pub stack: u32,
    pub spill_stores: u32,
    pub spill_loads: u32,
}

/// One compiled source file.
#[derive(Clone, Debug)]
pub struct Compiled {
    pub file: String,
    pub cubin: Vec<u8>,
    /// Compiler and ptxas messages.
    pub log: String,
    /// Empty when the CUBIN came from the cache.
    pub kernels: Vec<KernelReport>,
    /// Read from the on-disk cache rather than compiled.
    pub cached: bool,
}

/// NVRTC's version, or a sentence saying it cannot be loaded.
pub fn version() -> Result<(i32, i32)> {
    // SAFETY: only checks whether the library can be loaded.
    if !unsafe { sys::is_culib_present() } {
        return Err(Error::Cuda(
            "libnvrtc.so.13 not found: run through scripts/cuda-env.sh or put the folder holding it \
             (site-packages/nvidia/cu13/lib of the nvidia-cuda-nvrtc wheel) on LD_LIBRARY_PATH"
                .into(),
        ));
    }
    let (mut a, mut b) = (0, 0);
    // SAFETY: the library is loadable; the call writes two ints.
    check(unsafe { sys::nvrtcVersion(&mut a, &mut b) }, "nvrtcVersion")?;
    Ok((a, b))
}

fn check(r: sys::nvrtcResult, what: &str) -> Result<()> {
    if r == sys::nvrtcResult::NVRTC_SUCCESS {
        Ok(())
    } else {
        Err(Error::Cuda(format!("{what}: {r:?}")))
    }
}

/// Creates the program of one source (with common.cuh as its header) and compiles it with
/// `opts`: the program (to be destroyed by the caller) and the compile's result.
fn program(
    file: &str,
    src: &str,
    opts: &[String],
) -> Result<(sys::nvrtcProgram, sys::nvrtcResult)> {
    version()?;
    let c = |s: &str| CString::new(s).expect("no NUL in kernel sources");
    let (src_c, name_c) = (c(src), c(file));
    let (hdr_c, hdr_name_c) = (c(COMMON_CUH), c("common.cuh"));
    let headers = [hdr_c.as_ptr()];
    let header_names = [hdr_name_c.as_ptr()];
    let mut prog: sys::nvrtcProgram = std::ptr::null_mut();
    // SAFETY: all pointers outlive the call; NVRTC copies the strings.
    check(
        unsafe {
            sys::nvrtcCreateProgram(
                &mut prog,
                src_c.as_ptr(),
                name_c.as_ptr(),
                1,
                headers.as_ptr(),
                header_names.as_ptr(),
            )
        },
        "nvrtcCreateProgram",
    )?;
    let opts: Vec<CString> = opts.iter().map(|s| c(s)).collect();
    let opt_ptrs: Vec<*const c_char> = opts.iter().map(|o| o.as_ptr()).collect();
    // SAFETY: prog is valid; the option strings outlive the call.
    let r = unsafe { sys::nvrtcCompileProgram(prog, opt_ptrs.len() as i32, opt_ptrs.as_ptr()) };
    Ok((prog, r))
}

/// Compiles one source (which may `#include "common.cuh"`) to CUBIN for `sm_<major><minor>`, with
/// ptxas's resource report parsed. Errors carry NVRTC's log, citing the file name.
pub fn compile(file: &str, src: &str, arch: (i32, i32)) -> Result<Compiled> {
    let (mut prog, r) = program(file, src, &options(arch))?;
    let log = program_log(prog);
    let out = if r != sys::nvrtcResult::NVRTC_SUCCESS {
        Err(Error::Cuda(format!(
            "NVRTC could not compile kernels/{file} for sm_{}{} ({r:?}):\n{log}",
            arch.0, arch.1
        )))
    } else {
        let mut size = 0usize;
        // SAFETY: prog compiled; the buffer is sized by NVRTC's own answer.
        check(
            unsafe { sys::nvrtcGetCUBINSize(prog, &mut size) },
            "nvrtcGetCUBINSize",
        )
        .and_then(|_| {
            let mut cubin = vec![0u8; size];
            check(
                unsafe { sys::nvrtcGetCUBIN(prog, cubin.as_mut_ptr() as *mut c_char) },
                "nvrtcGetCUBIN",
            )?;
            Ok(Compiled {
                file: file.into(),
                cubin,
                kernels: parse_ptxas(&log),
                log,
                cached: false,
            })
        })
    };
    // SAFETY: prog was created above and is not used after this.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    out
}

/// NVRTC's options for `sm_<major><minor>`: part of the cache key, since they change the code.
pub fn options(arch: (i32, i32)) -> Vec<String> {
    vec![
        format!("--gpu-architecture=sm_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
        "--ptxas-options=-v".into(),
        "--ptxas-options=--warn-on-spills".into(),
        "-lineinfo".into(),
    ]
}

/// The PTX of one source for `compute_<major><minor>`, with the same language options as
/// `compile`: for tests that read the generated instructions (no FMA where the CPU rounds twice).
pub fn ptx(file: &str, src: &str, arch: (i32, i32)) -> Result<String> {
    let opts = [
        format!("--gpu-architecture=compute_{}{}", arch.0, arch.1),
        "--std=c++17".into(),
    ];
    let (mut prog, r) = program(file, src, &opts)?;
    let out = if r != sys::nvrtcResult::NVRTC_SUCCESS {
        Err(Error::Cuda(format!(
            "NVRTC could not compile kernels/{file} ({r:?}):\n{}",
            program_log(prog)
        )))
    } else {
        let mut size = 0usize;
        // SAFETY: prog compiled; the buffer is sized by NVRTC's own answer.
        check(
            unsafe { sys::nvrtcGetPTXSize(prog, &mut size) },
            "nvrtcGetPTXSize",
        )
        .and_then(|_| {
            let mut buf = vec![0 as c_char; size.max(1)];
            check(
                unsafe { sys::nvrtcGetPTX(prog, buf.as_mut_ptr()) },
                "nvrtcGetPTX",
            )?;
            // SAFETY: NVRTC wrote a NUL-terminated string into the buffer.
            Ok(unsafe { CStr::from_ptr(buf.as_ptr()) }
                .to_string_lossy()
                .into_owned())
        })
    };
    // SAFETY: prog was created above and is not used after this.
    unsafe { sys::nvrtcDestroyProgram(&mut prog) };
    out
}

fn program_log(prog: sys::nvrtcProgram) -> String {
    let mut size = 0usize;
    // SAFETY: prog is valid; the buffer is sized by NVRTC's own answer.
    unsafe {
        if sys::nvrtcGetProgramLogSize(prog, &mut size) != sys::nvrtcResult::NVRTC_SUCCESS
            || size == 0
        {
            return String::new();
        }
        let mut buf = vec![0 as c_char; size];
        if sys::nvrtcGetProgramLog(prog, buf.as_mut_ptr()) != sys::nvrtcResult::NVRTC_SUCCESS {
            return String::new();
        }
        CStr::from_ptr(buf.as_ptr()).to_string_lossy().into_owned()
    }
}

/// The per-kernel numbers of ptxas's `-v` report:
/// `Compiling entry function 'k' for 'sm_90'`, `Function properties for k`,
/// `N bytes stack frame, N bytes spill stores, N bytes spill loads`, `Used N registers, ... N bytes smem`.
pub fn parse_ptxas(log: &str) -> Vec<KernelReport> {
    let num_before = |line: &str, unit: &str| -> Option<u32> {
        let i = line.find(unit)?;
        line[..i].split_whitespace().last()?.parse().ok()
    };
    let mut out: Vec<KernelReport> = Vec::new();
    for line in log.lines() {
        if let Some(rest) = line.split("Compiling entry function '").nth(1) {
            let name = rest.split('\'').next().unwrap_or("").to_string();
            out.push(KernelReport {
                name,
                ..Default::default()
            });
            continue;
        }
        let Some(k) = out.last_mut() else { continue };
        if line.contains("stack frame") {
            k.stack = num_before(line, "bytes stack frame").unwrap_or(0);
            k.spill_stores = num_before(line, "bytes spill stores").unwrap_or(0);
            k.spill_loads = num_before(line, "bytes spill loads").unwrap_or(0);
        } else if line.contains("Used") && line.contains("registers") {
            k.registers = num_before(line, "registers").unwrap_or(0);
            k.shared = num_before(line, "bytes smem").unwrap_or(0);
        }
    }
    out
}

/// The kernel cache folder: $LEWEL_CACHE_DIR, else $XDG_CACHE_HOME/lewel, else ~/.cache/lewel; then
/// kernels/.
pub fn cache_dir() -> Option<PathBuf> {
    let base = std::env::var_os("LEWEL_CACHE_DIR")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("XDG_CACHE_HOME").map(|d| PathBuf::from(d).join("lewel")))
        .or_else(|| std::env::var_os("HOME").map(|d| PathBuf::from(d).join(".cache/lewel")))?;
    Some(base.join("kernels"))
}

/// 64-bit FNV-1a of the shared header, the source and the compile options for `arch`: the cache
/// key's source part (a changed option compiles anew).
pub fn source_hash(src: &str, arch: (i32, i32)) -> u64 {
    let opts = options(arch).join("\n");
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in COMMON_CUH
        .bytes()
        .chain([0u8])
        .chain(src.bytes())
        .chain([0u8])
        .chain(opts.bytes())
    {
        h ^= b as u64;
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The cache file of one source for `arch` (none: no cache folder).
pub fn cache_path(file: &str, src: &str, arch: (i32, i32)) -> Result<Option<PathBuf>> {
    let (va, vb) = version()?;
    let stem = file.trim_end_matches(".cu");
    Ok(cache_dir().map(|d| {
        d.join(format!(
            "{stem}-{:016x}-sm{}{}-nvrtc{va}.{vb}.cubin",
            source_hash(src, arch),
            arch.0,
            arch.1
        ))
    }))
}

/// CUBIN of one source for `arch`, from the cache when an entry for (source and options hash,
/// arch, NVRTC version) exists, else compiled and stored. A cache that cannot be written is skipped
/// silently: it only costs compile time. `Compiled::kernels` is empty for a cached CUBIN; a caller
/// whose load of it fails calls `forget` and compiles again.
pub fn cubin_cached(file: &str, src: &str, arch: (i32, i32)) -> Result<Compiled> {
    let path = cache_path(file, src, arch)?;
    if let Some(p) = &path {
        if let Ok(cubin) = std::fs::read(p) {
            if !cubin.is_empty() {
                return Ok(Compiled {
                    file: file.into(),
                    cubin,
                    log: String::new(),
                    kernels: Vec::new(),
                    cached: true,
                });
            }
        }
    }
    let c = compile(file, src, arch)?;
    if let Some(p) = &path {
        if let Some(d) = p.parent() {
            let _ = std::fs::create_dir_all(d)
                .map_err(|e| e.to_string())
                .and_then(|_| {
                    crate::checkpoint::write_bytes_atomic(p, &c.cubin).map_err(|e| e.to_string())
                });
        }
    }
    Ok(c)
}

/// Deletes the cache entry of one source (a CUBIN the driver refused: damaged, or from a
/// different toolchain).
pub fn forget(file: &str, src: &str, arch: (i32, i32)) {
    if let Ok(Some(p)) = cache_path(file, src, arch) {
        let _ = std::fs::remove_file(p);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ptxas_report_is_parsed() {
        let log = "ptxas info    : 0 bytes gmem\n\
ptxas info    : Compiling entry function 'relu_fwd_f32' for 'sm_90'\n\
ptxas info    : Function properties for relu_fwd_f32\n\
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n\
ptxas info    : Used 10 registers, used 0 barriers, 264 bytes smem, 376 bytes cmem[0]\n";
        let k = parse_ptxas(log);
        assert_eq!(k.len(), 1);
        assert_eq!(
            k[0],
            KernelReport {
                name: "relu_fwd_f32".into(),
                registers: 10,
                shared: 264,
                stack: 8,
                spill_stores: 4,
                spill_loads: 12
            }
        );
    }

    #[test]
    fn every_kernel_source_is_embedded() {
        let on_disk = std::fs::read_dir(concat!(env!("CARGO_MANIFEST_DIR"), "/kernels"))
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .path()
                    .extension()
                    .is_some_and(|x| x == "cu")
            })
            .count();
        assert_eq!(SOURCES.len(), on_disk);
        assert!(SOURCES
            .iter()
            .all(|(_, s)| s.contains("#include \"common.cuh\"")));
    }
}
