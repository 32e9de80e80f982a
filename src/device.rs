//! Where a run executes. `--device auto|cpu|cuda[:N]`; `auto` takes a usable GPU when there is one.
//! The CUDA libraries are dlopen'ed by cudarc, and loading a missing one panics, so every probe checks
//! `is_culib_present` first and turns absence into a sentence.

use crate::error::{Error, Result};

/// What the user asked for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl std::str::FromStr for DeviceChoice {
    type Err = Error;
    fn from_str(s: &str) -> Result<DeviceChoice> {
        match s {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            "cuda" => Ok(DeviceChoice::Cuda(0)),
            _ => match s.strip_prefix("cuda:").map(str::parse::<usize>) {
                Some(Ok(n)) => Ok(DeviceChoice::Cuda(n)),
                _ => Err(Error::user(format!(
                    "--device: expected auto, cpu, cuda or cuda:N, got '{s}'"
                ))),
            },
        }
    }
}

/// Where ops run.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Device {
    Cpu,
    Cuda(usize),
}

/// What was found of the GPU stack.
#[derive(Clone, Debug)]
pub struct GpuProbe {
    /// (name, compute capability, total memory bytes) per device.
    pub gpus: Vec<(String, (i32, i32), usize)>,
    /// Driver version as CUDA encodes it (1000 * major + 10 * minor), or why not.
    pub driver: std::result::Result<i32, String>,
    /// (library, version or why not).
    pub libraries: Vec<(&'static str, std::result::Result<String, String>)>,
}

const HINT: &str = "run through scripts/cuda-env.sh or put the library's folder on LD_LIBRARY_PATH";

/// Looks for libcuda, the GPUs and the CUDA libraries. Never panics.
pub fn probe() -> GpuProbe {
    use cudarc::driver::{sys as drv, CudaContext};
    let mut p = GpuProbe {
        gpus: Vec::new(),
        driver: Err("libcuda.so not found (no NVIDIA driver)".into()),
        libraries: Vec::new(),
    };
    // SAFETY: only checks whether the library can be loaded.
    if unsafe { drv::is_culib_present() } {
        let mut v = 0;
        // SAFETY: libcuda is present; cuDriverGetVersion only writes the int it is given.
        let r = unsafe { drv::cuDriverGetVersion(&mut v) };
        p.driver = if r == drv::CUresult::CUDA_SUCCESS {
            Ok(v)
        } else {
            Err(format!("{r:?}"))
        };
        if let Ok(n) = CudaContext::device_count() {
            for i in 0..n.max(0) as usize {
                if let Ok(ctx) = CudaContext::new(i) {
                    let name = ctx.name().unwrap_or_else(|e| format!("? ({e:?})"));
                    let cc = ctx.compute_capability().unwrap_or((0, 0));
                    p.gpus.push((name, cc, ctx.total_mem().unwrap_or(0)));
                }
            }
        }
    }
    // SAFETY (each block): the symbol is only called after its library was found loadable.
    let nvrtc = if unsafe { cudarc::nvrtc::sys::is_culib_present() } {
        let (mut a, mut b) = (0, 0);
        unsafe { cudarc::nvrtc::sys::nvrtcVersion(&mut a, &mut b) };
        Ok(format!("{a}.{b}"))
    } else {
        Err(format!("libnvrtc.so not found: {HINT}"))
    };
    p.libraries.push(("NVRTC", nvrtc));
    let cublas = if unsafe { cudarc::cublas::sys::is_culib_present() } {
        use cudarc::cublas::sys::{cublasGetProperty, libraryPropertyType_t as P};
        let mut v = [0i32; 3];
        for (i, t) in [P::MAJOR_VERSION, P::MINOR_VERSION, P::PATCH_LEVEL]
            .into_iter()
            .enumerate()
        {
            unsafe { cublasGetProperty(t, &mut v[i]) };
        }
        Ok(format!("{}.{}.{}", v[0], v[1], v[2]))
    } else {
        Err(format!("libcublas.so not found: {HINT}"))
    };
    p.libraries.push(("cuBLAS", cublas));
    let cudnn = if unsafe { cudarc::cudnn::sys::is_culib_present() } {
        let v = cudarc::cudnn::result::get_version();
        Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
    } else {
        Err(format!("libcudnn.so not found: {HINT}"))
    };
    p.libraries.push(("cuDNN", cudnn));
    let nccl = if unsafe { cudarc::nccl::sys::is_culib_present() } {
        let mut v = 0;
        unsafe { cudarc::nccl::sys::ncclGetVersion(&mut v) };
        Ok(format!("{}.{}.{}", v / 10000, (v / 100) % 100, v % 100))
    } else {
        Err(format!(
            "libnccl.so not found (the wheel ships only libnccl.so.2): {HINT}"
        ))
    };
    p.libraries.push(("NCCL", nccl));
    p
}

impl GpuProbe {
    /// A usable GPU: present with compute capability 7.5 or newer.
    pub fn usable(&self, i: usize) -> bool {
        self.gpus.get(i).is_some_and(|g| g.1 >= (7, 5))
    }

    pub fn report(&self) -> String {
        let mut s = String::new();
        match &self.driver {
            Ok(v) => s += &format!("driver     CUDA {}.{}\n", v / 1000, (v % 1000) / 10),
            Err(e) => s += &format!("driver     {e}\n"),
        }
        if self.gpus.is_empty() {
            s += "gpu        none found\n";
        }
        for (i, (name, cc, mem)) in self.gpus.iter().enumerate() {
            s += &format!(
                "gpu {i}      {name}, compute capability {}.{}, {:.1} GiB\n",
                cc.0,
                cc.1,
                *mem as f64 / (1u64 << 30) as f64
            );
        }
        for (lib, v) in &self.libraries {
            match v {
                Ok(v) => s += &format!("{lib:<10} {v}\n"),
                Err(e) => s += &format!("{lib:<10} {e}\n"),
            }
        }
        s
    }
}

/// Resolves the user's choice to the device to open: `auto` takes GPU 0 when the driver reports
/// a usable one (compute capability 7.5 or newer), the CPU otherwise. Opening the GPU can still fail
/// (a missing library): the caller falls back to the CPU for `auto` and stops for `cuda`.
pub fn resolve(choice: DeviceChoice) -> Device {
    match choice {
        DeviceChoice::Cpu => Device::Cpu,
        DeviceChoice::Auto if probe().usable(0) => Device::Cuda(0),
        DeviceChoice::Auto => Device::Cpu,
        DeviceChoice::Cuda(n) => Device::Cuda(n),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_device_flags() {
        assert_eq!("auto".parse::<DeviceChoice>().unwrap(), DeviceChoice::Auto);
        assert_eq!(
            "cuda:3".parse::<DeviceChoice>().unwrap(),
            DeviceChoice::Cuda(3)
        );
        let e = "gpu".parse::<DeviceChoice>().unwrap_err();
        assert_eq!(e.exit_code(), 2);
        assert!(e.to_string().contains("--device"));
    }

    #[test]
    fn probe_never_panics() {
        let p = probe();
        let r = p.report();
        assert!(r.contains("NVRTC") && r.contains("cuDNN"), "{r}");
        // `auto` takes GPU 0 exactly when the probe finds it usable: the CPU on a machine without
        // a driver.
        let want = if p.usable(0) {
            Device::Cuda(0)
        } else {
            Device::Cpu
        };
        assert_eq!(resolve(DeviceChoice::Auto), want);
    }
}
