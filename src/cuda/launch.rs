//! Per-context kernel cache (module loaded once per context, functions by
//! name) and launch configurations checked against the device's limits.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, RwLock};

use cudarc::driver::sys::{self, CUdevice_attribute as Attr, CUfunction_attribute as FuncAttr};
use cudarc::driver::{
    CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream, CudaView, DevicePtr,
    DevicePtrMut, DeviceRepr, DeviceSlice, DriverError, LaunchConfig, SyncOnDrop,
};

use super::compile::{compiled, KernelSource};
use crate::device::{Storage, Tensor};
use crate::error::{Error, Result};

/// Warp width; every kernel's block reduction needs whole warps.
const WARP: u32 = 32;

pub(crate) fn driver_error(what: &str) -> impl FnOnce(DriverError) -> Error + '_ {
    move |e| Error::Cuda(format!("{what}: {e}"))
}

/// The launch limits of one device.
#[derive(Clone, Copy, Debug)]
struct Limits {
    max_threads_per_block: u32,
    max_block: [u32; 3],
    max_grid: [u32; 3],
    max_shared_per_block: u32,
    multiprocessors: u32,
}

impl Limits {
    fn query(ctx: &CudaContext) -> Result<Limits> {
        let get = |attr: Attr| -> Result<u32> {
            let value = ctx
                .attribute(attr)
                .map_err(driver_error("cuDeviceGetAttribute"))?;
            u32::try_from(value)
                .map_err(|_| Error::Cuda(format!("device attribute {attr:?} is negative: {value}")))
        };
        Ok(Limits {
            max_threads_per_block: get(Attr::CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK)?,
            max_block: [
                get(Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_X)?,
                get(Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Y)?,
                get(Attr::CU_DEVICE_ATTRIBUTE_MAX_BLOCK_DIM_Z)?,
            ],
            max_grid: [
                get(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_X)?,
                get(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Y)?,
                get(Attr::CU_DEVICE_ATTRIBUTE_MAX_GRID_DIM_Z)?,
            ],
            // Without opting a function into more (cuFuncSetAttribute), a
            // launch gets the default per-block maximum, not the opt-in one.
            max_shared_per_block: get(Attr::CU_DEVICE_ATTRIBUTE_MAX_SHARED_MEMORY_PER_BLOCK)?,
            multiprocessors: get(Attr::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?,
        })
    }
}

#[derive(Default)]
struct Loaded {
    modules: HashMap<KernelSource, Arc<CudaModule>>,
    functions: HashMap<&'static str, CudaFunction>,
}

/// What a new output buffer holds before the kernels write it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Fill {
    /// Whatever the memory pool held: only for buffers that no one can read before the
    /// kernels of the call that allocated them have written every byte (the Tensor
    /// entries: a failed launch drops them unread).
    Unwritten,
    /// Zero bytes: for buffers handed to a caller, who may read them before any kernel
    /// ran (the zero-copy entries' `*Buffers::new`).
    Zero,
}

/// A device buffer of `len` bytes (1 at least: the driver refuses empty allocations)
/// for a kernel to write, filled as `fill` says; 0xFF bytes instead while output
/// poisoning is on (`device::poison_outputs`), so an element no kernel wrote shows.
pub(crate) fn alloc_output(
    stream: &Arc<CudaStream>,
    len: usize,
    fill: Fill,
) -> Result<CudaSlice<u8>> {
    // SAFETY: u8 has no invalid bit patterns, and the memory is either filled below or,
    // for Fill::Unwritten, written whole by the caller's kernels before anything reads it.
    let mut slice =
        unsafe { stream.alloc::<u8>(len.max(1)) }.map_err(driver_error("cuMemAlloc"))?;
    let byte = match (crate::device::poisoning(), fill) {
        (true, _) => 0xFF,
        (false, Fill::Zero) => 0,
        (false, Fill::Unwritten) => return Ok(slice),
    };
    let bytes = slice.len();
    {
        let (ptr, _guard) = slice.device_ptr_mut(stream);
        // SAFETY: `ptr` addresses the `bytes` bytes just allocated on this stream, and
        // the memset is ordered on the same stream before any kernel that uses them.
        unsafe { cudarc::driver::result::memset_d8_async(ptr, byte, bytes, stream.cu_stream()) }
            .map_err(driver_error("cuMemsetD8Async"))?;
    }
    Ok(slice)
}

/// The kernels of one CUDA context: modules compiled for its device's arch
/// and loaded once, functions looked up once, and its launch limits.
pub(crate) struct Kernels {
    ctx: Arc<CudaContext>,
    arch: String,
    limits: Limits,
    loaded: RwLock<Loaded>,
}

/// "sm_XY" for compute capability X.Y.
pub(crate) fn arch_of(ctx: &CudaContext) -> Result<String> {
    let (major, minor) = ctx
        .compute_capability()
        .map_err(driver_error("compute capability"))?;
    Ok(format!("sm_{major}{minor}"))
}

/// The process-wide kernel cache of `ctx`, keyed by its CUcontext handle, so a
/// framework's own `CudaContext` for the primary context of a device shares
/// the modules our backend loaded there. The entry keeps its context alive,
/// which also keeps the handle from being reused by another context.
pub(crate) fn kernels(ctx: &Arc<CudaContext>) -> Result<Arc<Kernels>> {
    static ALL: OnceLock<Mutex<HashMap<usize, Arc<Kernels>>>> = OnceLock::new();
    let mut all = ALL
        .get_or_init(Default::default)
        .lock()
        // Entries are inserted whole, so a poisoned map is still consistent.
        .unwrap_or_else(|e| e.into_inner());
    let key = ctx.cu_ctx() as usize;
    if let Some(kernels) = all.get(&key) {
        return Ok(kernels.clone());
    }
    let kernels = Arc::new(Kernels {
        ctx: ctx.clone(),
        arch: arch_of(ctx)?,
        limits: Limits::query(ctx)?,
        loaded: RwLock::default(),
    });
    all.insert(key, kernels.clone());
    Ok(kernels)
}

impl Kernels {
    /// The entry point `name` of `source`, compiling and loading the module on
    /// first use (under the write lock, re-checked after taking it).
    pub(crate) fn function(
        &self,
        source: KernelSource,
        name: &'static str,
    ) -> Result<CudaFunction> {
        // Entries are inserted whole, so a poisoned lock is still consistent.
        if let Some(f) = self
            .loaded
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .functions
            .get(name)
        {
            return Ok(f.clone());
        }
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        if let Some(f) = loaded.functions.get(name) {
            return Ok(f.clone());
        }
        let module = self.module(&mut loaded, source)?;
        let f = module.load_function(name).map_err(driver_error(name))?;
        loaded.functions.insert(name, f.clone());
        Ok(f)
    }

    /// Compiles (or finds in the caches) and loads every kernel source, so the first
    /// op pays nothing and `losskern info` can report the compile times.
    pub(crate) fn load_all(&self) -> Result<()> {
        let mut loaded = self.loaded.write().unwrap_or_else(|e| e.into_inner());
        for source in KernelSource::ALL {
            self.module(&mut loaded, source)?;
        }
        Ok(())
    }

    /// The loaded module of `source`, compiling and loading it on first use.
    fn module(&self, loaded: &mut Loaded, source: KernelSource) -> Result<Arc<CudaModule>> {
        if let Some(module) = loaded.modules.get(&source) {
            return Ok(module.clone());
        }
        let image = compiled(source, &self.arch)?;
        let module = self
            .ctx
            .load_module((*image).clone())
            .map_err(driver_error(source.name()))?;
        loaded.modules.insert(source, module.clone());
        Ok(module)
    }

    /// One block per row over `rows` rows of `row_len` elements, for kernels
    /// that loop over rows with a grid stride: about `per_thread` elements per
    /// thread, whole warps, 128..=1024 threads (fewer when the compiled
    /// function allows fewer), and a grid of `rows` blocks capped at
    /// `max_grid` (and the device maximum). The shape depends only on the
    /// arguments and the device, so results stay bitwise reproducible on one
    /// device.
    pub(crate) fn row_config(
        &self,
        name: &str,
        f: &CudaFunction,
        rows: usize,
        row_len: usize,
        per_thread: usize,
        max_grid: u32,
    ) -> Result<LaunchConfig> {
        let threads = u32::try_from(row_len.div_ceil(per_thread.max(1))).unwrap_or(u32::MAX);
        let block = threads
            .clamp(128, 1024)
            .next_multiple_of(WARP)
            .min(self.block_cap(name, f)?);
        let grid = u32::try_from(rows)
            .unwrap_or(u32::MAX)
            .min(max_grid)
            .min(self.limits.max_grid[0])
            .max(1);
        self.checked(name, f, (grid, 1, 1), (block, 1, 1))
    }

    /// `blocks` blocks (capped at the device's grid limit: the kernel must grid-stride)
    /// of exactly `threads` threads, for kernels whose tile shape is compiled in.
    pub(crate) fn fixed_config(
        &self,
        name: &str,
        f: &CudaFunction,
        blocks: usize,
        threads: u32,
    ) -> Result<LaunchConfig> {
        let grid = u32::try_from(blocks)
            .unwrap_or(u32::MAX)
            .min(self.limits.max_grid[0])
            .max(1);
        self.checked(name, f, (grid, 1, 1), (threads, 1, 1))
    }

    /// [`Kernels::fixed_config`] for a kernel that takes `shared` bytes of dynamic
    /// shared memory per block, `f` opted into that much first.
    pub(crate) fn fixed_config_shared(
        &self,
        name: &str,
        f: &CudaFunction,
        blocks: usize,
        threads: u32,
        shared: u32,
    ) -> Result<LaunchConfig> {
        opt_in_shared(f, shared)?;
        let mut config = self.fixed_config(name, f, blocks, threads)?;
        config.shared_mem_bytes = shared;
        Ok(config)
    }

    /// How many blocks of `block` threads of `f`, each with `shared` bytes of
    /// dynamic shared memory, one multiprocessor holds at once (registers,
    /// shared memory and thread limits), at least 1.
    pub(crate) fn blocks_per_multiprocessor(
        &self,
        f: &CudaFunction,
        block: u32,
        shared: u32,
    ) -> Result<u32> {
        opt_in_shared(f, shared)?;
        let shared = usize::try_from(shared).unwrap_or(usize::MAX);
        let blocks = f
            .occupancy_max_active_blocks_per_multiprocessor(block, shared, None)
            .map_err(driver_error("cuOccupancyMaxActiveBlocksPerMultiprocessor"))?;
        Ok(blocks.max(1))
    }

    pub(crate) fn multiprocessors(&self) -> u32 {
        self.limits.multiprocessors
    }

    /// `blocks` blocks of `threads` threads, the grid capped at the device's maximum (the
    /// kernels grid-stride over their work, so the cap changes no result).
    pub(crate) fn grid_config(
        &self,
        name: &str,
        f: &CudaFunction,
        blocks: u64,
        threads: u32,
    ) -> Result<LaunchConfig> {
        let grid = u32::try_from(blocks)
            .unwrap_or(u32::MAX)
            .min(self.limits.max_grid[0])
            .max(1);
        self.checked(name, f, (grid, 1, 1), (threads, 1, 1))
    }

    /// Whether the device runs thread-block clusters, bulk copies and
    /// distributed shared memory (compute capability 9.0 and later).
    pub(crate) fn has_clusters(&self) -> bool {
        self.arch
            .strip_prefix("sm_")
            .and_then(|cc| cc.get(..cc.len().saturating_sub(1)))
            .and_then(|major| major.parse::<u32>().ok())
            .is_some_and(|major| major >= 9)
    }

    /// A launch of `f` in clusters of `size` CTAs of `threads` threads with
    /// `shared` bytes of dynamic shared memory each, for `work` clusters'
    /// worth of work: opts `f` into that much shared memory (and, above 8,
    /// into non-portable cluster sizes), and caps the grid at the clusters the
    /// device holds at once (the kernel grid-strides by cluster, so the cap
    /// changes no result). None when not even one cluster fits.
    pub(crate) fn cluster_config(
        &self,
        name: &str,
        f: &CudaFunction,
        stream: &CudaStream,
        work: usize,
        shape: ClusterShape,
    ) -> Result<Option<ClusterConfig>> {
        opt_in_shared(f, shape.shared)?;
        if shape.size > 8 {
            set_attribute(
                f,
                FuncAttr::CU_FUNC_ATTRIBUTE_NON_PORTABLE_CLUSTER_SIZE_ALLOWED,
                1,
            )?;
        }
        let grid = u32::try_from(work)
            .unwrap_or(u32::MAX)
            .min(self.limits.max_grid[0] / shape.size.max(1))
            .max(1);
        let mut config = ClusterConfig {
            clusters: grid,
            shape,
        };
        let mut fit: std::ffi::c_int = 0;
        self.ctx
            .bind_to_thread()
            .map_err(driver_error("cuCtxSetCurrent"))?;
        config
            .with_raw(stream, |raw| {
                // SAFETY: `raw` and the attribute it points to live for this call;
                // the function handle is a loaded function of this context.
                unsafe { sys::cuOccupancyMaxActiveClusters(&mut fit, f.cu_function(), raw) }
                    .result()
            })
            .map_err(driver_error("cuOccupancyMaxActiveClusters"))?;
        let fit = u32::try_from(fit).unwrap_or(0);
        if fit == 0 {
            return Ok(None);
        }
        self.checked(name, f, (grid * shape.size, 1, 1), (shape.threads, 1, 1))?;
        config.clusters = grid.min(fit);
        Ok(Some(config))
    }

    /// A single block of up to 1024 threads (batch reductions).
    pub(crate) fn single_block_config(&self, name: &str, f: &CudaFunction) -> Result<LaunchConfig> {
        let block = 1024.min(self.block_cap(name, f)?);
        self.checked(name, f, (1, 1, 1), (block, 1, 1))
    }

    /// The largest whole-warp block the device and the function allow.
    fn block_cap(&self, name: &str, f: &CudaFunction) -> Result<u32> {
        let function_max = f
            .max_threads_per_block()
            .map_err(driver_error("cuFuncGetAttribute"))?;
        let function_max = u32::try_from(function_max).unwrap_or(0);
        let cap = function_max
            .min(self.limits.max_threads_per_block)
            .min(self.limits.max_block[0]);
        let cap = cap - cap % WARP;
        if cap == 0 {
            return Err(Error::Launch {
                kernel: name.to_string(),
                reason: format!(
                    "the function allows only {function_max} threads per block, less than a warp"
                ),
            });
        }
        Ok(cap)
    }

    /// Validates a launch against the device limits and the function's own
    /// (threads per block after register allocation, static shared memory).
    fn checked(
        &self,
        name: &str,
        f: &CudaFunction,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
    ) -> Result<LaunchConfig> {
        let refuse = |reason: String| Error::Launch {
            kernel: name.to_string(),
            reason,
        };
        let l = &self.limits;
        let grid_dims = [grid.0, grid.1, grid.2];
        let block_dims = [block.0, block.1, block.2];
        for axis in 0..3 {
            if grid_dims[axis] == 0 || grid_dims[axis] > l.max_grid[axis] {
                return Err(refuse(format!(
                    "grid {grid:?} is outside 1..={:?}",
                    l.max_grid
                )));
            }
            if block_dims[axis] == 0 || block_dims[axis] > l.max_block[axis] {
                return Err(refuse(format!(
                    "block {block:?} is outside 1..={:?}",
                    l.max_block
                )));
            }
        }
        let threads = u64::from(block.0) * u64::from(block.1) * u64::from(block.2);
        let function_max = f
            .max_threads_per_block()
            .map_err(driver_error("cuFuncGetAttribute"))?;
        let max_threads =
            u64::from(l.max_threads_per_block).min(u64::try_from(function_max).unwrap_or(0));
        if threads > max_threads {
            return Err(refuse(format!(
                "{threads} threads per block exceed the limit of {max_threads}"
            )));
        }
        if !threads.is_multiple_of(u64::from(WARP)) {
            return Err(refuse(format!(
                "{threads} threads per block is not a whole number of warps"
            )));
        }
        let static_shared = f
            .shared_size_bytes()
            .map_err(driver_error("cuFuncGetAttribute"))?;
        let shared = u64::try_from(static_shared).unwrap_or(u64::MAX);
        if shared > u64::from(l.max_shared_per_block) {
            return Err(refuse(format!(
                "{shared} bytes of shared memory exceed the {} bytes per block",
                l.max_shared_per_block
            )));
        }
        Ok(LaunchConfig {
            grid_dim: grid,
            block_dim: block,
            shared_mem_bytes: 0,
        })
    }
}

fn set_attribute(f: &CudaFunction, what: FuncAttr, value: u32) -> Result<()> {
    let value = i32::try_from(value).unwrap_or(i32::MAX);
    f.set_attribute(what, value)
        .map_err(driver_error("cuFuncSetAttribute"))
}

/// Opts `f` into `shared` bytes of dynamic shared memory per block (the driver
/// refuses more than the device's opt-in maximum).
fn opt_in_shared(f: &CudaFunction, shared: u32) -> Result<()> {
    set_attribute(
        f,
        FuncAttr::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
        shared,
    )
}

/// The shape of one cluster of a cluster launch.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct ClusterShape {
    /// CTAs per cluster.
    pub(crate) size: u32,
    /// Threads per CTA.
    pub(crate) threads: u32,
    /// Dynamic shared memory per CTA, in bytes.
    pub(crate) shared: u32,
}

/// A checked cluster launch (see [`Kernels::cluster_config`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct ClusterConfig {
    clusters: u32,
    shape: ClusterShape,
}

impl ClusterConfig {
    /// Calls `run` with the driver's launch configuration for `stream`.
    fn with_raw<R>(
        &self,
        stream: &CudaStream,
        run: impl FnOnce(*const sys::CUlaunchConfig) -> R,
    ) -> R {
        let mut cluster = sys::CUlaunchAttribute {
            id: sys::CUlaunchAttributeID::CU_LAUNCH_ATTRIBUTE_CLUSTER_DIMENSION,
            pad: [0; 4],
            value: sys::CUlaunchAttributeValue {
                clusterDim: sys::CUlaunchAttributeValue_union__bindgen_ty_1 {
                    x: self.shape.size,
                    y: 1,
                    z: 1,
                },
            },
        };
        let raw = sys::CUlaunchConfig {
            gridDimX: self.clusters * self.shape.size,
            gridDimY: 1,
            gridDimZ: 1,
            blockDimX: self.shape.threads,
            blockDimY: 1,
            blockDimZ: 1,
            sharedMemBytes: self.shape.shared,
            hStream: stream.cu_stream(),
            attrs: &mut cluster,
            numAttrs: 1,
        };
        run(&raw)
    }

    /// Launches `f`, whose one parameter is `args`, with this configuration
    /// on `stream`.
    ///
    /// # Safety
    ///
    /// `args` must be the kernel's parameter type, and every device pointer
    /// in it valid for all the kernel does with this configuration, on
    /// `stream`, until the stream has run it.
    pub(crate) unsafe fn launch<A: DeviceRepr>(
        &self,
        stream: &CudaStream,
        f: &CudaFunction,
        args: &A,
    ) -> std::result::Result<(), DriverError> {
        stream.context().bind_to_thread()?;
        let mut params = [(args as *const A).cast_mut().cast::<std::ffi::c_void>()];
        self.with_raw(stream, |raw| {
            // SAFETY: the caller vouches for the parameter and its pointers;
            // `raw`, its attribute and `params` live for this call, and the
            // driver copies the parameter before returning.
            unsafe {
                sys::cuLaunchKernelEx(
                    raw,
                    f.cu_function(),
                    params.as_mut_ptr(),
                    std::ptr::null_mut(),
                )
            }
            .result()
        })
    }
}

/// Asserts at compile time that each field sits at the given byte offset.
macro_rules! offsets {
    ($t:ty { $($field:ident: $offset:expr),* $(,)? }) => {
        $(const _: () = assert!(std::mem::offset_of!($t, $field) == $offset);)*
    };
}
pub(crate) use offsets;

/// Collects device pointers after checking each buffer's size and alignment,
/// keeping cudarc's stream-ordering guards alive until the launches are queued.
pub(crate) struct Pointers<'a> {
    pub(crate) stream: &'a CudaStream,
    pub(crate) guards: Vec<SyncOnDrop<'a>>,
}

pub(crate) fn check_buffer(
    ptr: u64,
    len: usize,
    need: usize,
    align: usize,
    what: &str,
) -> Result<u64> {
    if len < need {
        return Err(Error::Shape(format!(
            "{what}: the device buffer holds {len} bytes, {need} are needed"
        )));
    }
    if !ptr.is_multiple_of(align as u64) {
        return Err(Error::Shape(format!(
            "{what}: device address {ptr:#x} is not aligned to {align} bytes"
        )));
    }
    Ok(ptr)
}

/// Fails unless memory owned by `owner` may be used on `stream`: both belong to the same
/// CUDA context. A device pointer of another context means nothing in this one (or
/// another allocation), so a launch with it could read or write anything.
pub(crate) fn check_context(stream: &CudaStream, owner: &CudaStream, what: &str) -> Result<()> {
    let (ours, theirs) = (stream.context(), owner.context());
    if ours.cu_ctx() == theirs.cu_ctx() {
        Ok(())
    } else {
        Err(Error::DeviceMismatch(format!(
            "{what} belongs to another CUDA context (device {}) than the stream (device {})",
            theirs.ordinal(),
            ours.ordinal()
        )))
    }
}

impl<'a> Pointers<'a> {
    pub(crate) fn read(
        &mut self,
        view: &'a CudaView<'_, u8>,
        need: usize,
        align: usize,
        what: &str,
    ) -> Result<u64> {
        check_context(self.stream, view.stream(), what)?;
        let (ptr, guard) = view.device_ptr(self.stream);
        self.guards.push(guard);
        check_buffer(ptr, view.len(), need, align, what)
    }

    pub(crate) fn write(
        &mut self,
        slice: &'a mut CudaSlice<u8>,
        need: usize,
        align: usize,
        what: &str,
    ) -> Result<u64> {
        check_context(self.stream, slice.stream(), what)?;
        let len = slice.len();
        let (ptr, guard) = slice.device_ptr_mut(self.stream);
        self.guards.push(guard);
        check_buffer(ptr, len, need, align, what)
    }
}

/// `count` elements of `size` bytes, or a shape error naming `what` on overflow.
pub(crate) fn bytes(count: usize, size: usize, what: &str) -> Result<usize> {
    count
        .checked_mul(size)
        .ok_or_else(|| Error::Shape(format!("{what}: {count} elements overflow usize bytes")))
}

pub(crate) fn as_i64(value: usize, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Shape(format!("{what} = {value} does not fit in i64")))
}

/// The device buffer of a tensor on a CUDA device.
pub(crate) fn cuda_slice<'t>(tensor: &'t Tensor, what: &str) -> Result<&'t CudaSlice<u8>> {
    match &tensor.storage {
        Storage::Cuda(slice) => Ok(slice),
        _ => Err(Error::DeviceMismatch(format!(
            "{what} does not live on a CUDA device"
        ))),
    }
}
