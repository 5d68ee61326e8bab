//! CUDA backend: cudarc 0.19 with dynamic loading, so the crate builds and
//! runs without a CUDA toolkit; libcuda (the driver) and libnvrtc are
//! dlopen()ed by name at first use, through LD_LIBRARY_PATH and the system
//! library paths (libnvrtc.so.13 from the PyPI wheel `nvidia-cuda-nvrtc` works,
//! with its libnvrtc-builtins.so.13.0 next to it on LD_LIBRARY_PATH).
//!
//! - [`backend`]: one context per device ordinal per process (its primary
//!   context) with one stream, the context's default stream. cudarc's event
//!   tracking stays on: while only that stream exists it costs nothing (cudarc
//!   records events only in multi-stream mode), and once a framework creates a
//!   stream of its own, a tensor's memory used there is ordered after our kernels.
//! - Memory: freed buffers stay in the device's default memory pool up to
//!   [`POOL_KEEP_FRACTION`] of the device's memory (the pool's release threshold);
//!   more is handed back at the next synchronisation, and [`CudaBackend::trim`] hands
//!   back all of it.
//! - Data errors: a kernel that finds a class target out of range records the row in
//!   a device-side status word (an energy distance's merge kernel, a bad sample
//!   weight); [`CudaBackend::download`] and [`CudaBackend::synchronize`] read the words
//!   of every op since the last check and return `Error::Target` (or the weights'
//!   `Error::Option`) for the first bad one, so no op waits for the device.
//! - [`compile`] / [`KernelSource`]: NVRTC compilation, usable with no GPU.
//! - Each family's file (`xent.rs`, `energy.rs`, `ensemble.rs`) has a Tensor entry and a zero-copy entry
//!   on the caller's own cudarc stream and device memory.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaSlice, CudaStream};

use crate::device::Backend;
use crate::error::{Error, Result};
use crate::spec::energy::weight_status_error;
use crate::spec::ensemble::status_error as ensemble_status_error;
use crate::spec::BackendKind;
use crate::watch::Watches;

pub(crate) mod bnstats;
mod compile;
pub mod energy;
pub mod ensemble;
pub(crate) mod launch;
pub mod xent;

use compile::require_nvrtc;
pub use compile::{
    cache_dir, compile_cached_in, compile_records, CacheOutcome, CachedImage, CompileRecord,
};
pub use compile::{compile, compile_with_log, nvrtc_version, KernelSource};
pub(crate) use compile::{lib_candidates, no_panic};
use launch::{arch_of, driver_error, kernels};

/// What the backend knows about its device and compiler.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CudaInfo {
    /// The device name, e.g. "NVIDIA H200".
    pub name: String,
    /// The arch kernels are compiled for, e.g. "sm_90".
    pub arch: String,
    /// The (major, minor) version of the loaded libnvrtc.
    pub nvrtc_version: (i32, i32),
}

/// One CUDA device: its primary context, the stream all work goes to, and its info.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    info: CudaInfo,
    /// Status words of ops queued since each thread's last readback.
    watched: Watches<Watch>,
}

/// A status word some op's kernels write, and how to read it.
pub(crate) enum Watch {
    Targets(TargetWatch),
    /// An energy distance's weight check (`spec::energy::weight_status_error`).
    Weights(CudaSlice<u8>),
    /// An ensemble's data check (`spec::ensemble::status_error`).
    Ensemble(EnsembleWatch),
}

/// The status words of an ensemble call and what the error needs to name.
pub(crate) struct EnsembleWatch {
    pub status: CudaSlice<u8>,
    pub classes: usize,
    pub directions: usize,
}

/// A device-side status word an op's kernels write: 0, or !row for the first row whose
/// class target is out of range.
pub(crate) struct TargetWatch {
    pub status: CudaSlice<u8>,
    pub classes: usize,
    pub ignore_index: i64,
}

/// The share of the device's memory that freed buffers may keep in the memory pool.
pub const POOL_KEEP_FRACTION: f64 = 0.25;

/// The backend of device `ordinal`, created once per process and shared.
/// `Error::CudaUnavailable` when libcuda or libnvrtc cannot be loaded, the
/// driver reports no device, or `ordinal` is out of range.
pub fn backend(ordinal: usize) -> Result<Arc<CudaBackend>> {
    static BACKENDS: OnceLock<Mutex<HashMap<usize, Arc<CudaBackend>>>> = OnceLock::new();
    let mut backends = BACKENDS
        .get_or_init(Default::default)
        .lock()
        // Entries are inserted whole, so a poisoned map is still consistent.
        .unwrap_or_else(|e| e.into_inner());
    if let Some(backend) = backends.get(&ordinal) {
        return Ok(backend.clone());
    }
    // Failures are not cached: a device that was busy or absent may be had later.
    let backend = Arc::new(CudaBackend::new(ordinal)?);
    backends.insert(ordinal, backend.clone());
    Ok(backend)
}

/// The default memory pool of the context's device.
fn default_pool(ctx: &CudaContext) -> Result<cudarc::driver::sys::CUmemoryPool> {
    // SAFETY: the device handle is the context's own, so it names a valid device.
    unsafe { cudarc::driver::result::device::get_default_mem_pool(ctx.cu_device()) }
        .map_err(driver_error("cuDeviceGetDefaultMemPool"))
}

/// Keeps up to [`POOL_KEEP_FRACTION`] of the device's memory in its default pool when
/// buffers are freed, instead of returning it to the driver at every synchronisation
/// (the default release threshold is 0), as PyTorch's caching allocator does: otherwise
/// each call maps its outputs afresh, which cost 1.4 ms for a 2 GB gradient on the H200
/// against 1.7 ms for the kernels.
fn keep_freed_memory(ctx: &CudaContext) -> Result<()> {
    use cudarc::driver::{result, sys};
    let total = ctx.total_mem().map_err(driver_error("cuDeviceTotalMem"))?;
    let mut threshold = (total as f64 * POOL_KEEP_FRACTION) as u64;
    let pool = default_pool(ctx)?;
    // SAFETY: `pool` is the device's default pool (valid for the process), and the
    // release threshold attribute takes a u64, which `threshold` is.
    unsafe {
        result::mem_pool::set_attribute(
            pool,
            sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
            (&mut threshold as *mut u64).cast(),
        )
    }
    .map_err(driver_error("cuMemPoolSetAttribute"))
}

/// Fails with `CudaUnavailable` unless libcuda can be loaded; cudarc panics
/// on the first driver call otherwise.
fn require_driver() -> Result<()> {
    // SAFETY: this only dlopen()s the libcuda candidates cudarc would load
    // anyway; loading the driver library runs no initialiser with preconditions.
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        Ok(())
    } else {
        Err(Error::CudaUnavailable(format!(
            "libcuda (the NVIDIA driver) cannot be loaded (looked for {:?})",
            lib_candidates("cuda")
        )))
    }
}

impl CudaBackend {
    fn new(ordinal: usize) -> Result<CudaBackend> {
        require_driver()?;
        require_nvrtc()?;
        let nvrtc_version = nvrtc_version()?;
        no_panic("CUDA driver", || {
            let unavailable = |what: &str| {
                let what = what.to_string();
                move |e: cudarc::driver::DriverError| Error::CudaUnavailable(format!("{what}: {e}"))
            };
            let count =
                CudaContext::device_count().map_err(unavailable("cuInit / cuDeviceGetCount"))?;
            let count = usize::try_from(count).unwrap_or(0);
            if ordinal >= count {
                return Err(Error::CudaUnavailable(format!(
                    "CUDA device {ordinal} requested but the driver reports {count} device(s)"
                )));
            }
            let ctx = CudaContext::new(ordinal).map_err(unavailable("cuDevicePrimaryCtxRetain"))?;
            if ctx.has_async_alloc() {
                keep_freed_memory(&ctx)?;
            }
            let name = ctx.name().map_err(driver_error("cuDeviceGetName"))?;
            let arch = arch_of(&ctx)?;
            // Queries the launch limits now, so a broken device fails here.
            kernels(&ctx)?;
            Ok(CudaBackend {
                stream: ctx.default_stream(),
                info: CudaInfo {
                    name,
                    arch,
                    nvrtc_version,
                },
                watched: Watches::default(),
            })
        })
    }

    /// Checks `watch` at the calling thread's next readback or synchronisation.
    pub(crate) fn watch_targets(&self, watch: TargetWatch) {
        self.watched.push(Watch::Targets(watch));
    }

    /// Checks the weight status word of an energy distance at the calling thread's next
    /// readback or synchronisation.
    pub(crate) fn watch_weights(&self, status: CudaSlice<u8>) {
        self.watched.push(Watch::Weights(status));
    }

    /// Checks an ensemble's status words at the calling thread's next readback or
    /// synchronisation.
    pub(crate) fn watch_ensemble(&self, watch: EnsembleWatch) {
        self.watched.push(Watch::Ensemble(watch));
    }

    /// Reads the status word of every op queued since the last check (the stream has
    /// passed them: the caller synchronised or read back) and reports the first op's
    /// first bad row or weight.
    fn check_targets(&self) -> Result<()> {
        let watched = self.watched.take();
        for watch in watched {
            let slice = match &watch {
                Watch::Targets(t) => &t.status,
                Watch::Weights(status) => status,
                Watch::Ensemble(e) => &e.status,
            };
            let bytes = self
                .stream
                .clone_dtoh(slice)
                .map_err(driver_error("cuMemcpyDtoH"))?;
            let words: Vec<u64> = bytes
                .chunks_exact(8)
                .map(bytemuck::pod_read_unaligned)
                .collect();
            let status = *words
                .first()
                .ok_or_else(|| Error::Cuda("a status word is shorter than 8 bytes".into()))?;
            match watch {
                Watch::Ensemble(e) => ensemble_status_error(&words, e.classes, e.directions)?,
                _ if status == 0 => {}
                Watch::Targets(t) => {
                    return Err(Error::Target {
                        row: usize::try_from(!status).unwrap_or(usize::MAX),
                        classes: t.classes,
                        ignore_index: t.ignore_index,
                    })
                }
                Watch::Weights(_) => return Err(weight_status_error(status)),
            }
        }
        Ok(())
    }

    /// Compiles (through the process and disk caches) and loads every kernel now
    /// rather than at each family's first op; [`compile_records`] then says how long
    /// each took and whether the disk cache had it.
    pub fn load_kernels(&self) -> Result<()> {
        kernels(self.stream.context())?.load_all()
    }

    /// Waits, then hands every byte the memory pool keeps back to the driver.
    pub fn trim(&self) -> Result<()> {
        self.synchronize()?;
        let pool = default_pool(self.stream.context())?;
        // SAFETY: `pool` is the device's default pool, valid for the process.
        unsafe { cudarc::driver::result::mem_pool::trim_to(pool, 0) }
            .map_err(driver_error("cuMemPoolTrimTo"))
    }

    /// "NAME (sm_XX)".
    pub fn describe(&self) -> String {
        format!("{} ({})", self.info.name, self.info.arch)
    }

    pub fn info(&self) -> &CudaInfo {
        &self.info
    }

    /// The stream every op of this backend runs on (for interop with the
    /// zero-copy entries, which take a stream).
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// Waits for all work queued on the backend's stream; `Error::Target` when a
    /// kernel since the last check found a class target out of range.
    pub fn synchronize(&self) -> Result<()> {
        self.stream
            .synchronize()
            .map_err(driver_error("cuStreamSynchronize"))?;
        self.check_targets()
    }

    /// Copies `bytes` to a new device buffer. An empty slice gets a 1-byte
    /// buffer, since the driver refuses 0-byte allocations; a tensor always
    /// knows its own byte length, so the extra byte is never read.
    pub(crate) fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        if bytes.is_empty() {
            return self
                .stream
                .alloc_zeros::<u8>(1)
                .map_err(driver_error("cuMemAlloc"));
        }
        self.stream
            .clone_htod(bytes)
            .map_err(driver_error("cuMemcpyHtoD"))
    }

    /// Copies the first `len` bytes of `slice` to the host (waiting for the
    /// stream's earlier work); `Error::Target` as [`CudaBackend::synchronize`].
    pub(crate) fn download(&self, slice: &CudaSlice<u8>, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let view = slice.try_slice(..len).ok_or_else(|| {
            Error::Shape(format!(
                "download of {len} bytes from a {}-byte device buffer",
                slice.len()
            ))
        })?;
        let bytes = self
            .stream
            .clone_dtoh(&view)
            .map_err(driver_error("cuMemcpyDtoH"))?;
        self.check_targets()?;
        Ok(bytes)
    }
}

impl BackendKind for CudaBackend {
    fn kind(&self) -> Backend {
        Backend::Cuda
    }
}
