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
//!
//! # Disk cache
//!
//! The backends get their images through a process-wide cache (one compile per
//! source and arch per process) over a disk cache, so a new process skips NVRTC
//! (tens of CPU seconds for `xent.cu`) when nothing changed. [`compile`] and
//! [`compile_with_log`] use neither: they always run NVRTC.
//!
//! - Key: FNV-1a 128 over the length-prefixed source name, full translation
//!   unit ([`KernelSource::source`]), arch, loaded NVRTC version and every
//!   compile option; so an edited kernel, another arch, another NVRTC or new
//!   flags each get their own entry. FNV is written here because std's
//!   `DefaultHasher` may change between Rust releases.
//! - Location: `$LOSSKERN_CACHE_DIR` if set, else `$XDG_CACHE_HOME/losskern`
//!   (an absolute path only, as the XDG spec asks), else
//!   `$HOME/.cache/losskern`; one file `nvrtc-KEY.bin` per entry. With none of
//!   these, or when the directory cannot be created, every compile runs NVRTC
//!   and nothing is written ([`CacheOutcome::Disabled`]); that is never an error.
//! - Entry: a header (magic, format version, key, payload length, FNV-1a 128
//!   checksum of the payload), then the payload: the image NVRTC returned
//!   (CUBIN, or PTX text with its trailing NUL). An entry that is truncated, fails its checksum, has another format
//!   version or holds another key is never used: the source is compiled again
//!   and the entry rewritten. Entries are written to a temp file in the same
//!   directory and renamed over the old one, so a concurrent process sees the
//!   whole old entry or the whole new one; without an fsync a crash may leave a
//!   short file, which the length and checksum reject.
//! - Entries are never evicted (about 1 MiB per CUBIN of `xent.cu`, 2.5 MiB
//!   per PTX); deleting the directory is always safe.
//!
//! [`compile_records`] lists what each cached compile of the process did and
//! how long it took.

use std::collections::HashMap;
use std::ffi::{c_char, CString};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::time::Instant;

use cudarc::nvrtc::{result as nvrtc_result, sys as nvrtc_sys, Ptx};

use crate::error::{Error, Result};

const COMMON: &str = include_str!("../../kernels/common.cuh");

/// One CUDA source file under `kernels/` (one per op family).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelSource {
    Xent,
    BnStats,
    Energy,
    Ensemble,
}

impl KernelSource {
    /// Every kernel source, for `check`-style commands that compile them all.
    pub const ALL: [KernelSource; 4] = [
        KernelSource::Xent,
        KernelSource::BnStats,
        KernelSource::Energy,
        KernelSource::Ensemble,
    ];

    /// The file name under `kernels/`.
    pub fn name(self) -> &'static str {
        match self {
            KernelSource::Xent => "xent.cu",
            KernelSource::BnStats => "bnstats.cu",
            KernelSource::Energy => "energy.cu",
            KernelSource::Ensemble => "ensemble.cu",
        }
    }

    /// The family's own source text (without common.cuh).
    fn family_source(self) -> &'static str {
        match self {
            KernelSource::Xent => include_str!("../../kernels/xent.cu"),
            KernelSource::BnStats => include_str!("../../kernels/bnstats.cu"),
            KernelSource::Energy => include_str!("../../kernels/energy.cu"),
            KernelSource::Ensemble => include_str!("../../kernels/ensemble.cu"),
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
/// cache (compiled once per source and arch) over a disk cache (see the module doc).
pub fn compile(source: KernelSource, arch: &str) -> Result<Ptx> {
    compile_with_log(source, arch).map(|(image, _)| image)
}

/// As [`compile`], also returning NVRTC's log of a successful compile, which
/// is empty unless NVRTC warned (for `check` commands: a warning is a bug).
pub fn compile_with_log(source: KernelSource, arch: &str) -> Result<(Ptx, String)> {
    let (image, log) = compile_image(source, arch)?;
    Ok((image_to_ptx(image, arch), log))
}

/// NVRTC's raw output for `source` on `arch`: the CUBIN, or the PTX text with
/// its trailing NUL; and the log.
fn compile_image(source: KernelSource, arch: &str) -> Result<(Vec<u8>, String)> {
    require_nvrtc()?;
    no_panic("NVRTC", || compile_unchecked(source, arch))
}

fn image_to_ptx(image: Vec<u8>, arch: &str) -> Ptx {
    if arch.starts_with("sm_") {
        Ptx::from_binary(image)
    } else {
        // PTX text ends in a NUL; from_src wants the text without it.
        let text = String::from_utf8_lossy(&image);
        Ptx::from_src(text.trim_end_matches('\0'))
    }
}

/// The flags every kernel is compiled with (see the module doc).
fn options(arch: &str) -> [String; 2] {
    [
        format!("--gpu-architecture={arch}"),
        "-std=c++17".to_string(),
    ]
}

fn compile_error(source: KernelSource, arch: &str, log: String) -> Error {
    Error::Compile {
        source_name: source.name().to_string(),
        arch: arch.to_string(),
        log,
    }
}

fn compile_unchecked(source: KernelSource, arch: &str) -> Result<(Vec<u8>, String)> {
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
    let options = options(arch);
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

/// The compiled image of `source` for `arch`, compiled once per process
/// through the disk cache of [`cache_dir`]: looked up under the read lock, and
/// on a miss compiled under the write lock after checking again (another
/// thread may have compiled it meanwhile). Each compile is recorded for
/// [`compile_records`].
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
    let cached = compile_cached_in(cache_dir().as_deref(), source, arch)?;
    records()
        .lock()
        // Records are pushed whole, so a poisoned list is still consistent.
        .unwrap_or_else(|e| e.into_inner())
        .push(CompileRecord {
            source: source.name(),
            arch: arch.to_string(),
            millis: cached.millis,
            cache: cached.cache,
        });
    let image = Arc::new(image_to_ptx(cached.image, arch));
    images.insert(key, image.clone());
    Ok(image)
}

/// What the disk cache did for one compile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheOutcome {
    /// A valid entry was read; NVRTC did not run.
    Hit,
    /// NVRTC ran and its image was stored (there was no entry, or it was rejected).
    Miss,
    /// NVRTC ran and nothing was stored: no cache directory could be had or
    /// created, or the entry could not be written.
    Disabled,
}

/// One compile done by the backends in this process.
#[derive(Clone, Debug, PartialEq)]
pub struct CompileRecord {
    /// The kernel file name under `kernels/`, e.g. "xent.cu".
    pub source: &'static str,
    /// The arch compiled for, e.g. "sm_90".
    pub arch: String,
    /// Wall time of the disk lookup and, unless a hit, NVRTC and the store.
    pub millis: f64,
    pub cache: CacheOutcome,
}

/// Every compile the backends did so far in this process, oldest first (at
/// most one per source and arch). The uncached [`compile`] and
/// [`compile_with_log`] are not recorded.
pub fn compile_records() -> Vec<CompileRecord> {
    records().lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn records() -> &'static Mutex<Vec<CompileRecord>> {
    static RECORDS: OnceLock<Mutex<Vec<CompileRecord>>> = OnceLock::new();
    RECORDS.get_or_init(Default::default)
}

/// The disk cache directory the environment names (see the module doc),
/// whether or not it exists yet; `None` disables the disk cache.
pub fn cache_dir() -> Option<PathBuf> {
    let var = |name| {
        std::env::var_os(name)
            .filter(|value| !value.is_empty())
            .map(PathBuf::from)
    };
    var("LOSSKERN_CACHE_DIR")
        .or_else(|| {
            var("XDG_CACHE_HOME")
                .filter(|path| path.is_absolute())
                .map(|path| path.join("losskern"))
        })
        .or_else(|| var("HOME").map(|path| path.join(".cache").join("losskern")))
}

/// An image from [`compile_cached_in`].
#[doc(hidden)]
#[derive(Debug)]
pub struct CachedImage {
    /// NVRTC's output: the CUBIN, or the PTX text with its trailing NUL.
    pub image: Vec<u8>,
    pub cache: CacheOutcome,
    /// Wall time of the whole call.
    pub millis: f64,
}

/// Compiles `source` for `arch` through the disk cache in `dir` (created if
/// missing); `None`, or a directory that cannot be created, compiles without
/// it. Public (hidden) so tests can give each case a directory of its own.
#[doc(hidden)]
pub fn compile_cached_in(
    dir: Option<&Path>,
    source: KernelSource,
    arch: &str,
) -> Result<CachedImage> {
    let start = Instant::now();
    let key = cache_key(source, arch, nvrtc_version()?);
    let path = dir
        .filter(|dir| std::fs::create_dir_all(dir).is_ok())
        .map(|dir| dir.join(format!("nvrtc-{key:032x}.bin")));
    let millis = || start.elapsed().as_secs_f64() * 1e3;
    if let Some(image) = path.as_deref().and_then(|path| read_entry(path, key)) {
        return Ok(CachedImage {
            image,
            cache: CacheOutcome::Hit,
            millis: millis(),
        });
    }
    let (image, _) = compile_image(source, arch)?;
    let cache = match &path {
        Some(path) if write_entry(path, key, &image).is_ok() => CacheOutcome::Miss,
        _ => CacheOutcome::Disabled,
    };
    Ok(CachedImage {
        image,
        cache,
        millis: millis(),
    })
}

const MAGIC: [u8; 8] = *b"LKNVRTC\0";
/// Bumped whenever the entry layout or the key material changes.
const FORMAT: u32 = 1;

/// FNV-1a 128 over each field's length and bytes (the lengths keep fields
/// from running into each other).
fn cache_key(source: KernelSource, arch: &str, (major, minor): (i32, i32)) -> u128 {
    let text = source.source();
    let version = format!("{major}.{minor}");
    let options = options(arch);
    let fields = [source.name(), &text, arch, &version]
        .into_iter()
        .chain(options.iter().map(String::as_str));
    let mut material = FORMAT.to_le_bytes().to_vec();
    for field in fields {
        material.extend_from_slice(&(field.len() as u64).to_le_bytes());
        material.extend_from_slice(field.as_bytes());
    }
    fnv1a128(&material)
}

/// FNV-1a with 128-bit state: stable across Rust releases and platforms.
fn fnv1a128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62272e07bb014262b821756295c58d;
    const PRIME: u128 = 0x0000000001000000000000000000013b;
    bytes.iter().fold(OFFSET, |hash, &byte| {
        (hash ^ u128::from(byte)).wrapping_mul(PRIME)
    })
}

/// Magic, format, key, payload length, payload checksum, payload (little endian).
fn encode_entry(key: u128, image: &[u8]) -> Vec<u8> {
    let mut entry = Vec::with_capacity(52 + image.len());
    entry.extend_from_slice(&MAGIC);
    entry.extend_from_slice(&FORMAT.to_le_bytes());
    entry.extend_from_slice(&key.to_le_bytes());
    entry.extend_from_slice(&(image.len() as u64).to_le_bytes());
    entry.extend_from_slice(&fnv1a128(image).to_le_bytes());
    entry.extend_from_slice(image);
    entry
}

/// The image of an entry whose header is whole and matches `key` and whose
/// payload has the stated length and checksum; `None` otherwise.
fn decode_entry(entry: &[u8], key: u128) -> Option<&[u8]> {
    fn take<const N: usize>(bytes: &mut &[u8]) -> Option<[u8; N]> {
        let (head, rest) = bytes.split_first_chunk::<N>()?;
        *bytes = rest;
        Some(*head)
    }
    let mut rest = entry;
    let magic: [u8; 8] = take(&mut rest)?;
    let format = u32::from_le_bytes(take(&mut rest)?);
    let stored_key = u128::from_le_bytes(take(&mut rest)?);
    let len = u64::from_le_bytes(take(&mut rest)?);
    let checksum = u128::from_le_bytes(take(&mut rest)?);
    let whole = magic == MAGIC
        && format == FORMAT
        && stored_key == key
        && u64::try_from(rest.len()) == Ok(len)
        && fnv1a128(rest) == checksum;
    whole.then_some(rest)
}

fn read_entry(path: &Path, key: u128) -> Option<Vec<u8>> {
    let entry = std::fs::read(path).ok()?;
    decode_entry(&entry, key).map(<[u8]>::to_vec)
}

/// Writes a temp file beside `path` and renames it over `path`, so readers
/// see a whole entry or none.
fn write_entry(path: &Path, key: u128, image: &[u8]) -> std::io::Result<()> {
    // Unique among processes (the pid) and among this process's threads.
    static SERIAL: AtomicU64 = AtomicU64::new(0);
    let serial = SERIAL.fetch_add(1, Ordering::Relaxed);
    let temp = path.with_extension(format!("{}-{serial}.tmp", std::process::id()));
    std::fs::write(&temp, encode_entry(key, image))
        .and_then(|()| std::fs::rename(&temp, path))
        .inspect_err(|_| {
            // A leftover temp file would only waste space; nothing reads it.
            let _ = std::fs::remove_file(&temp);
        })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fnv1a128_matches_the_published_vectors() {
        assert_eq!(fnv1a128(b""), 0x6c62272e07bb014262b821756295c58d);
        assert_eq!(fnv1a128(b"a"), 0xd228cb696f1a8caf78912b704e4a8964);
    }

    #[test]
    fn an_entry_decodes_only_whole_and_under_its_own_key() {
        let image = b"\x7fELF not really a cubin".to_vec();
        let entry = encode_entry(7, &image);
        assert_eq!(decode_entry(&entry, 7), Some(&image[..]));
        assert_eq!(decode_entry(&entry, 8), None);
        for len in 0..entry.len() {
            assert_eq!(decode_entry(&entry[..len], 7), None, "truncated to {len}");
        }
        let mut longer = entry.clone();
        longer.push(0);
        assert_eq!(decode_entry(&longer, 7), None);
        for at in 0..entry.len() {
            let mut flipped = entry.clone();
            flipped[at] ^= 0x10;
            assert_eq!(decode_entry(&flipped, 7), None, "byte {at} flipped");
        }
    }
}
