//! Kernel sources and their run-time compilation by NVRTC.
//!
//! Each family's `kernels/FAMILY.cu` is compiled with `kernels/common.cuh`
//! prepended as text (no `#include`), so NVRTC needs neither include paths nor
//! the CUDA toolkit headers: the bare `nvidia-cuda-nvrtc` wheel is enough.
//!
//! Flags: `--gpu-architecture=ARCH -std=c++17` and nothing else. In particular
//! no `--use_fast_math`: it would turn on flush-to-zero, approximate division
//! and the `__expf`/`__logf` intrinsics (2+ ulp, worse near 0), and the kernels
//! are judged against an f64 reference. NVRTC's defaults are IEEE division and
//! square root, denormals kept, and FMA contraction on (which only ever removes
//! a rounding).
//!
//! An `sm_XX` arch yields a CUBIN for exactly that GPU (no JIT in the driver,
//! so no dependence on the driver understanding NVRTC's PTX version); a
//! `compute_XX` arch yields PTX, which the driver JIT-compiles at load.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::sync::{Arc, OnceLock, RwLock};

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};

use crate::error::{Error, Result};

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// One CUDA source file under `kernels/` (one per op family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSource {
    Xent,
}

impl KernelSource {
    /// Every kernel source, for `check`-style commands that compile them all.
    pub const ALL: [KernelSource; 1] = [KernelSource::Xent];

    /// The file name under `kernels/`.
    pub fn name(self) -> &'static str {
        match self {
            KernelSource::Xent => "xent.cu",
        }
    }

    /// The family's own source text (without common.cuh).
    fn family_source(self) -> &'static str {
        match self {
            KernelSource::Xent => include_str!("../../kernels/xent.cu"),
        }
    }

    /// The full translation unit handed to NVRTC: common.cuh, then the family's .cu.
    pub fn source(self) -> String {
        format!(
            "// ---- common.cuh ----\n{COMMON}\n// ---- {} ----\n{}",
            self.name(),
            self.family_source()
        )
    }
}

/// Fails with `CudaUnavailable` unless libnvrtc can be loaded; cudarc panics
/// on the first NVRTC call otherwise.
pub(crate) fn require_nvrtc() -> Result<()> {
    // SAFETY: this only dlopen()s the libnvrtc candidates cudarc would load
    // anyway (from LD_LIBRARY_PATH and the system paths); loading NVRTC runs no
    // initialiser with preconditions.
    if unsafe { nvrtc_sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(format!(
            "libnvrtc cannot be loaded (looked for {:?}); install the PyPI wheel \
             nvidia-cuda-nvrtc==13.0.* or a CUDA 13 toolkit and put its lib directory \
             on LD_LIBRARY_PATH",
            lib_candidates("nvrtc")
        )))
    }
}

/// The file names cudarc tries for a library (dlopen()ed by name, so found
/// through LD_LIBRARY_PATH, the ld.so cache and the system directories),
/// without the Windows-style "64_XY" spellings it also tries.
pub(crate) fn lib_candidates(name: &str) -> Vec<String> {
    let mut names = cudarc::get_lib_name_candidates(name);
    names.retain(|candidate| !candidate.contains("64"));
    names
}

/// Runs `f`, turning a panic inside cudarc (a symbol missing from an old
/// library, say) into `CudaUnavailable`.
pub(crate) fn no_panic<T>(what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).unwrap_or_else(|payload| {
        let message = payload
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| payload.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Err(Error::CudaUnavailable(format!("{what}: {message}")))
    })
}

/// The (major, minor) version of the loaded libnvrtc. Needs no GPU.
pub fn nvrtc_version() -> Result<(i32, i32)> {
    require_nvrtc()?;
    no_panic("nvrtcVersion", || {
        let (mut major, mut minor) = (0, 0);
        // SAFETY: libnvrtc is present (checked above); both pointers are valid
        // for one c_int write each.
        unsafe { nvrtc_sys::nvrtcVersion(&mut major, &mut minor) }
            .result()
            .map_err(|e| Error::CudaUnavailable(format!("nvrtcVersion: {e:?}")))?;
        Ok((major, minor))
    })
}

/// Compiles a kernel source for `arch` ("sm_90" gives a CUBIN, "compute_90"
/// PTX). Needs libnvrtc but no GPU. A rejected source gives `Error::Compile`
/// with the NVRTC log. Not cached: the backends go through a process-wide
/// cache (compiled once per source and arch).
pub fn compile(source: KernelSource, arch: &str) -> Result<Ptx> {
    compile_with_log(source, arch).map(|(image, _)| image)
}

/// As [`compile`], also returning NVRTC's log of a successful compile, which
/// is empty unless NVRTC warned (for `check` commands: a warning is a bug).
pub fn compile_with_log(source: KernelSource, arch: &str) -> Result<(Ptx, String)> {
    require_nvrtc()?;
    no_panic("NVRTC", || compile_unchecked(source, arch))
}

fn compile_error(source: KernelSource, arch: &str, log: String) -> Error {
    Error::Compile {
        source_name: source.name().to_string(),
        arch: arch.to_string(),
        log,
    }
}

fn compile_unchecked(source: KernelSource, arch: &str) -> Result<(Ptx, String)> {
    let cubin = arch.starts_with("sm_");
    if !cubin && !arch.starts_with("compute_") {
        return Err(compile_error(
            source,
            arch,
            "the architecture must be sm_XX or compute_XX".into(),
        ));
    }
    let text = CString::new(source.source())
        .map_err(|_| compile_error(source, arch, "the source holds a NUL byte".into()))?;
    let name = CString::new(source.name())
        .map_err(|_| compile_error(source, arch, "the source name holds a NUL byte".into()))?;
    let options = [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
    ];
    if options.iter().any(|o| o.contains('\0')) {
        // compile_program would panic on it.
        return Err(compile_error(
            source,
            arch,
            "the arch holds a NUL byte".into(),
        ));
    }

    let program = Program(
        nvrtc_result::create_program(&text, Some(&name))
            .map_err(|e| compile_error(source, arch, format!("nvrtcCreateProgram: {e:?}")))?,
    );
    // SAFETY: `program` is a live program created above (destroyed only by
    // Program's Drop); the options are NUL-free (checked above).
    let compiled = unsafe { nvrtc_result::compile_program(program.0, &options) };
    let log = program.log();
    if let Err(e) = compiled {
        return Err(compile_error(source, arch, format!("{e:?}\n{log}")));
    }
    let image = if cubin {
        program.cubin()
    } else {
        program.ptx()
    }
    .map_err(|e| compile_error(source, arch, e))?;
    let image = if cubin {
        Ptx::from_binary(image)
    } else {
        // PTX text ends in a NUL; from_src wants the text without it.
        let text = String::from_utf8_lossy(&image);
        Ptx::from_src(text.trim_end_matches('\0'))
    };
    Ok((image, log))
}

/// Owns an nvrtcProgram and destroys it on drop.
struct Program(nvrtc_sys::nvrtcProgram);

impl Program {
    fn log(&self) -> String {
        // SAFETY: self.0 is a live program (created, not yet destroyed).
        match unsafe { nvrtc_result::get_program_log(self.0) } {
            Ok(raw) => c_chars_to_string(&raw),
            Err(e) => format!("(no log: {e:?})"),
        }
    }

    fn ptx(&self) -> std::result::Result<Vec<u8>, String> {
        // SAFETY: self.0 is a live, successfully compiled program.
        let raw =
            unsafe { nvrtc_result::get_ptx(self.0) }.map_err(|e| format!("nvrtcGetPTX: {e:?}"))?;
        Ok(raw.iter().map(|&c| c as u8).collect())
    }

    fn cubin(&self) -> std::result::Result<Vec<u8>, String> {
        let mut size = 0usize;
        // SAFETY: self.0 is a live, successfully compiled program; `size` is
        // valid for one usize write.
        unsafe { nvrtc_sys::nvrtcGetCUBINSize(self.0, &mut size) }
            .result()
            .map_err(|e| format!("nvrtcGetCUBINSize: {e:?}"))?;
        let mut image = vec![0u8; size];
        // SAFETY: `image` holds exactly the `size` bytes NVRTC reported for
        // this program's CUBIN.
        unsafe { nvrtc_sys::nvrtcGetCUBIN(self.0, image.as_mut_ptr().cast::<c_char>()) }
            .result()
            .map_err(|e| format!("nvrtcGetCUBIN: {e:?}"))?;
        Ok(image)
    }
}

impl Drop for Program {
    fn drop(&mut self) {
        // SAFETY: self.0 was created by nvrtcCreateProgram and is destroyed
        // only here. A failure leaks the program, which is all we could do.
        let _ = unsafe { nvrtc_result::destroy_program(self.0) };
    }
}

fn c_chars_to_string(raw: &[c_char]) -> String {
    let bytes: Vec<u8> = raw
        .iter()
        .map(|&c| c as u8)
        .take_while(|&b| b != 0)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

type ImageCache = RwLock<HashMap<(KernelSource, String), Arc<Ptx>>>;

/// The compiled image of `source` for `arch`, compiled once per process:
/// looked up under the read lock, and on a miss compiled under the write lock
/// after checking again (another thread may have compiled it meanwhile).
pub(crate) fn compiled(source: KernelSource, arch: &str) -> Result<Arc<Ptx>> {
    static CACHE: OnceLock<ImageCache> = OnceLock::new();
    let cache = CACHE.get_or_init(Default::default);
    let key = (source, arch.to_string());
    // A poisoned lock still holds only complete entries (inserted after a
    // successful compile), so its contents are safe to use.
    if let Some(image) = cache.read().unwrap_or_else(|e| e.into_inner()).get(&key) {
        return Ok(image.clone());
    }
    let mut images = cache.write().unwrap_or_else(|e| e.into_inner());
    if let Some(image) = images.get(&key) {
        return Ok(image.clone());
    }
    let image = Arc::new(compile(source, arch)?);
    images.insert(key, image.clone());
    Ok(image)
}
