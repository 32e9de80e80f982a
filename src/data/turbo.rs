//! JPEG decoding through libjpeg-turbo's TurboJPEG API, loaded at run time (`libturbojpeg.so.0`,
//! Debian/Ubuntu package `libturbojpeg0`), for `--jpeg-decoder libjpeg-turbo`.
//!
//! Why: PIL decodes with libjpeg-turbo (accurate integer IDCT, fancy upsampling), so this decoder
//! gives PIL's pixels exactly, where zune-jpeg differs by a few levels (IDCT rounding, chroma
//! upsampling); and it decodes faster (benches/README.md). Nothing is linked at build time: a machine
//! without the library builds and runs with zune-jpeg, and asking for this decoder there is one clear
//! error.
//!
//! What it computes: TurboJPEG's `tjDecompress2` with no flags (the library's defaults, which are
//! PIL's), to RGB for 1- and 3-component files (gray replicated, as PIL's `convert('RGB')`), and to
//! CMYK for 4-component files (CMYK, or YCCK converted by libjpeg), then PIL's `convert('RGB')` of
//! its "CMYK;I" raw mode (PIL assumes Adobe's inverted CMYK): with c, m, y, k the inverted stored
//! values, R = clip(255 - k - muldiv255(c, 255 - k)), and so on. libjpeg's warnings (a few ImageNet
//! files have corrupt-data warnings) are not errors, as under PIL; truncated files are refused before
//! decoding (decode.rs).

use super::decode::{DecodeError, RgbImage};
use std::ffi::{c_char, c_int, c_ulong, c_void, CStr};
use std::sync::OnceLock;

type Handle = *mut c_void;

/// TurboJPEG constants (turbojpeg.h, stable since libjpeg-turbo 1.4).
const TJPF_RGB: c_int = 0;
const TJPF_CMYK: c_int = 11;
const TJERR_WARNING: c_int = 0;

/// The library file names tried, in order.
const NAMES: [&str; 2] = ["libturbojpeg.so.0", "libturbojpeg.so"];

struct Api {
    init: unsafe extern "C" fn() -> Handle,
    decompress: unsafe extern "C" fn(
        Handle,
        *const u8,
        c_ulong,
        *mut u8,
        c_int,
        c_int,
        c_int,
        c_int,
        c_int,
    ) -> c_int,
    destroy: unsafe extern "C" fn(Handle) -> c_int,
    error_str: unsafe extern "C" fn(Handle) -> *mut c_char,
    error_code: unsafe extern "C" fn(Handle) -> c_int,
    /// Keeps the functions above loaded.
    _lib: libloading::Library,
}

/// Loads the first of `names` that opens and has every function.
fn load(names: &[&str]) -> Result<Api, String> {
    let mut why = Vec::new();
    for &name in names {
        // SAFETY: loading libturbojpeg runs no initialisers with preconditions of ours.
        let lib = match unsafe { libloading::Library::new(name) } {
            Ok(l) => l,
            Err(e) => {
                why.push(format!("{name}: {e}"));
                continue;
            }
        };
        // SAFETY: each symbol is looked up under its TurboJPEG name and given that function's C
        // signature (turbojpeg.h); the Library is kept in the Api beside them.
        let api = unsafe {
            macro_rules! sym {
                ($n:literal) => {
                    match lib.get($n) {
                        Ok(s) => *s,
                        Err(e) => {
                            why.push(format!("{name}: {e}"));
                            continue;
                        }
                    }
                };
            }
            Api {
                init: sym!(b"tjInitDecompress\0"),
                decompress: sym!(b"tjDecompress2\0"),
                destroy: sym!(b"tjDestroy\0"),
                error_str: sym!(b"tjGetErrorStr2\0"),
                error_code: sym!(b"tjGetErrorCode\0"),
                _lib: lib,
            }
        };
        return Ok(api);
    }
    Err(why.join("; "))
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

fn api() -> Result<&'static Api, String> {
    API.get_or_init(|| load(&NAMES)).as_ref().map_err(|e| {
        format!("libjpeg-turbo's TurboJPEG library not found ({e}); install it (Debian/Ubuntu: apt install libturbojpeg0) or use --jpeg-decoder zune")
    })
}

/// Ok when the library loads; else why not, in one line.
pub fn available() -> Result<(), String> {
    api().map(|_| ())
}

/// One decompressor per thread, destroyed with the thread.
struct ThreadHandle(Handle);

impl Drop for ThreadHandle {
    fn drop(&mut self) {
        if let Ok(a) = api() {
            // SAFETY: the handle came from tjInitDecompress and is destroyed once.
            unsafe { (a.destroy)(self.0) };
        }
    }
}

thread_local! {
    static HANDLE: std::cell::RefCell<Option<ThreadHandle>> = const { std::cell::RefCell::new(None) };
}

/// PIL's MULDIV255: (a * b + 128) / 255, rounded as PIL does.
fn muldiv255(a: i32, b: i32) -> i32 {
    let t = a * b + 128;
    ((t >> 8) + t) >> 8
}

/// PIL's `convert('RGB')` of one pixel of its "CMYK;I" raw mode: `p` holds libjpeg's stored
/// (inverted) C, M, Y, K.
fn cmyk_to_rgb(p: &[u8]) -> [u8; 3] {
    let inv = |v: u8| 255 - v as i32;
    let nk = 255 - inv(p[3]);
    [0, 1, 2].map(|c| (nk - muldiv255(inv(p[c]), nk)).clamp(0, 255) as u8)
}

/// Decodes a complete JPEG of `w` x `h` pixels and `components` components to RGB. decode.rs has
/// read its headers and checked its end-of-image marker; `tjDecompress2` reads the headers itself.
pub fn decode(b: &[u8], w: usize, ht: usize, components: usize) -> Result<RgbImage, DecodeError> {
    let a = api().map_err(DecodeError)?;
    HANDLE.with(|cell| {
        let mut slot = cell.borrow_mut();
        let h = match &*slot {
            Some(t) => t.0,
            None => {
                // SAFETY: no preconditions; a null handle is checked here.
                let h = unsafe { (a.init)() };
                if h.is_null() {
                    return Err(DecodeError(
                        "libjpeg-turbo: could not create a decompressor".into(),
                    ));
                }
                *slot = Some(ThreadHandle(h));
                h
            }
        };
        let fail = || {
            // SAFETY: the handle is live; the string is owned by the library, copied at once.
            let msg = unsafe { CStr::from_ptr((a.error_str)(h)) };
            DecodeError(format!("bad JPEG data: {}", msg.to_string_lossy()))
        };
        let (pf, px) = if components == 4 {
            (TJPF_CMYK, 4)
        } else {
            (TJPF_RGB, 3)
        };
        let mut out = vec![0u8; w * ht * px];
        // SAFETY: out holds w * ht pixels of px bytes, the size asked for (pitch 0 = w * px).
        let rc = unsafe {
            (a.decompress)(
                h,
                b.as_ptr(),
                b.len() as c_ulong,
                out.as_mut_ptr(),
                w as c_int,
                0,
                ht as c_int,
                pf,
                0,
            )
        };
        // A warning leaves a complete image (libjpeg's "Corrupt JPEG data" notices).
        // SAFETY: the handle is live.
        if rc != 0 && unsafe { (a.error_code)(h) } != TJERR_WARNING {
            return Err(fail());
        }
        if px == 3 {
            return Ok(RgbImage::new(w, ht, out));
        }
        let rgb = out.chunks_exact(4).flat_map(cmyk_to_rgb).collect();
        Ok(RgbImage::new(w, ht, rgb))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_missing_library_is_one_line_naming_each_file_tried() {
        let e = load(&["libno-such-turbojpeg.so.9", "libalso-missing.so"])
            .err()
            .expect("no library of that name");
        assert!(
            e.contains("libno-such-turbojpeg.so.9") && e.contains("libalso-missing.so"),
            "{e}"
        );
        assert!(!e.contains('\n'), "{e}");
    }

    #[test]
    fn pil_cmyk_conversion_at_the_corners() {
        // Stored (inverted) values: 255 is no ink, 0 is full ink.
        assert_eq!(cmyk_to_rgb(&[255, 255, 255, 255]), [255, 255, 255]); // white
        assert_eq!(cmyk_to_rgb(&[0, 255, 255, 255]), [0, 255, 255]); // full cyan: no red
        assert_eq!(cmyk_to_rgb(&[128, 128, 128, 0]), [0, 0, 0]); // full black
        assert_eq!(cmyk_to_rgb(&[128, 64, 255, 255]), [128, 64, 255]);
    }
}
