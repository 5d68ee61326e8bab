//! wgpu backend: adapter and device, shader modules and a pipeline cache, buffer
//! upload / download, and a dispatch helper that checks launches against the device's
//! limits. One file per family holds its kernels' host side (`xent.rs`, `energy.rs`).
//!
//! Errors: wgpu reports validation, out-of-memory and internal errors through error
//! scopes (or panics, when none is open and no handler is installed). Every call here
//! that can fail runs inside [`WgpuBackend::scoped`], which turns what the scopes
//! caught into [`Error::Wgpu`]; a device this module creates also gets an
//! uncaptured-error handler that records instead of panicking, as a backstop.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use crate::device::{Backend, Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::energy::weight_status_error;
use crate::spec::ensemble::{status_error, STATUS_WORDS};
use crate::spec::BackendKind;
use crate::watch::Watches;

mod bnstats;
pub mod energy;
mod ensemble;
pub mod xent;

pub use xent::{xent_raw, XentBuffers, XentTargets};

/// Invocations per workgroup of every kernel (`@workgroup_size` in the shaders).
pub(crate) const WORKGROUP_SIZE: u32 = 256;

/// Largest byte range bound to one binding. Shaders index bindings with u32 element
/// indices; 2 GiB keeps every 16-bit element index below 2^30, so index arithmetic
/// (`base + row * stride + k`) cannot wrap. Larger tensors are processed in chunks
/// of rows, each bound at its own offset.
pub(crate) const MAX_BINDING_BYTES: u64 = 1 << 31;

/// The WGSL source files, one per op family.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ShaderSource {
    Xent,
    BnStats,
    Energy,
    Ensemble,
}

impl ShaderSource {
    /// Every shader, so that tests can compile them all.
    pub const ALL: [ShaderSource; 4] = [
        ShaderSource::Xent,
        ShaderSource::BnStats,
        ShaderSource::Energy,
        ShaderSource::Ensemble,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ShaderSource::Xent => "xent.wgsl",
            ShaderSource::BnStats => "bnstats.wgsl",
            ShaderSource::Energy => "energy.wgsl",
            ShaderSource::Ensemble => "ensemble.wgsl",
        }
    }

    /// The family's own source text (without common.wgsl).
    fn family_code(self) -> &'static str {
        match self {
            ShaderSource::Xent => include_str!("../../shaders/xent.wgsl"),
            ShaderSource::BnStats => include_str!("../../shaders/bnstats.wgsl"),
            ShaderSource::Energy => include_str!("../../shaders/energy.wgsl"),
            ShaderSource::Ensemble => include_str!("../../shaders/ensemble.wgsl"),
        }
    }

    /// The module handed to wgpu: common.wgsl, then the family's .wgsl.
    fn code(self) -> String {
        format!(
            "{}\n{}",
            include_str!("../../shaders/common.wgsl"),
            self.family_code()
        )
    }

    /// The bindings of group 0 that every entry point of the shader shares.
    fn bindings(self) -> &'static [BindingKind] {
        match self {
            ShaderSource::Xent => xent::BINDINGS,
            ShaderSource::BnStats => bnstats::BINDINGS,
            ShaderSource::Energy => energy::BINDINGS,
            ShaderSource::Ensemble => ensemble::BINDINGS,
        }
    }

    /// Every pipeline the family uses (entry point x specialisation).
    fn pipelines(self) -> Vec<PipelineKey> {
        match self {
            ShaderSource::Xent => xent::all_pipelines(),
            ShaderSource::BnStats => bnstats::all_pipelines(),
            ShaderSource::Energy => energy::all_pipelines(),
            ShaderSource::Ensemble => ensemble::all_pipelines(),
        }
    }
}

/// How a shader declares one binding of group 0.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum BindingKind {
    Uniform,
    /// `var<storage, read>`.
    Read,
    /// `var<storage, read_write>`.
    ReadWrite,
}

/// One compiled pipeline: shader, entry point and the values of its `override` constants.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub(crate) struct PipelineKey {
    pub shader: ShaderSource,
    pub entry: &'static str,
    pub constants: Vec<(&'static str, u32)>,
}

/// A shader module with the bind-group layout and pipeline layout all its entry points use.
struct Module {
    module: wgpu::ShaderModule,
    bind_group_layout: wgpu::BindGroupLayout,
    pipeline_layout: wgpu::PipelineLayout,
}

/// What `info` reports about the adapter behind a backend.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WgpuInfo {
    pub name: String,
    /// "Vulkan", "Metal", "Dx12", "Gl".
    pub backend: String,
    pub driver: String,
    pub driver_info: String,
    pub device_type: String,
    /// Whether the adapter has `shader-f16` (the device requests it when present; the
    /// kernels decode and encode f16 with integer operations and do not need it).
    pub shader_f16: bool,
    pub max_storage_buffer_binding_size: u64,
    pub max_buffer_size: u64,
    pub max_compute_workgroups_per_dimension: u32,
}

/// A wgpu device and queue with the pipelines compiled on it.
pub struct WgpuBackend {
    device: wgpu::Device,
    queue: wgpu::Queue,
    adapter: wgpu::AdapterInfo,
    shader_f16: bool,
    limits: wgpu::Limits,
    modules: Mutex<HashMap<ShaderSource, Arc<Module>>>,
    pipelines: Mutex<HashMap<PipelineKey, Arc<wgpu::ComputePipeline>>>,
    /// Errors no scope caught (only possible for work submitted outside this module on
    /// a device it created); reported by the next call that checks.
    uncaptured: Arc<Mutex<Vec<String>>>,
    /// Buffers of dropped tensors, by (size, usage), for the next buffer of that kind.
    free: Mutex<BufferPool>,
    /// Status words of ops queued since each thread's last readback.
    watched: Watches<Watch>,
}

/// A status word (u32) some op's kernels write, and how to read it.
pub(crate) enum Watch {
    Targets(TargetWatch),
    /// An energy distance's weight check (`spec::energy::weight_status_error`).
    Weights(wgpu::Buffer),
    /// An ensemble call's data check (`spec::ensemble::status_error`).
    Ensemble(EnsembleWatch),
}

/// The status words ([`STATUS_WORDS`] u64) of an ensemble call and what its error names.
pub(crate) struct EnsembleWatch {
    pub status: wgpu::Buffer,
    pub classes: usize,
    pub directions: usize,
}

/// A status word (u32) an op's kernels write: 0, or !row for the first row whose class
/// target is out of range.
pub(crate) struct TargetWatch {
    pub status: wgpu::Buffer,
    pub classes: usize,
    pub ignore_index: i64,
}

/// Buffers kept for reuse. Creating a buffer makes wgpu zero it (about 40 GB/s on the
/// H200's Vulkan driver: 100 ms for a 4 GB gradient, against 8 ms for the kernels), so
/// tensors' buffers are kept, as PyTorch's caching allocator keeps CUDA memory. Reuse is
/// ordered by the queue like any other use of a buffer. Bounded ([`POOL_BYTES`] in all,
/// [`POOL_PER_KIND`] of one size and usage), so a long run of different shapes cannot
/// hold the device's memory; [`WgpuBackend::trim`] empties it.
#[derive(Default)]
struct BufferPool {
    buffers: HashMap<(u64, u32), Vec<wgpu::Buffer>>,
    bytes: u64,
}

/// At most this many bytes wait in the pool; a buffer that would pass it is freed.
pub const POOL_BYTES: u64 = 16 << 30;
/// At most this many buffers of one size and usage wait in the pool.
pub const POOL_PER_KIND: usize = 4;

static BACKEND: OnceLock<std::result::Result<Arc<WgpuBackend>, String>> = OnceLock::new();

/// The process-wide wgpu backend on the first adapter (high performance preferred),
/// created on first use. A failure is remembered: adapters do not appear later in a process.
pub fn backend() -> Result<Arc<WgpuBackend>> {
    BACKEND
        .get_or_init(|| create().map_err(|e| e.to_string()))
        .clone()
        .map_err(Error::WgpuUnavailable)
}

/// Every adapter wgpu can see, as "name (backend, device type)", for the `info` command.
pub fn adapters() -> Vec<String> {
    let Some(instance) = instance() else {
        return Vec::new();
    };
    pollster::block_on(instance.enumerate_adapters(wgpu::Backends::all()))
        .iter()
        .map(|adapter| {
            let info = adapter.get_info();
            format!("{} ({:?}, {:?})", info.name, info.backend, info.device_type)
        })
        .collect()
}

/// An instance on the primary backends (Vulkan, Metal, DX12; `WGPU_BACKEND` overrides),
/// or None when wgpu was built with no backend for this platform (`Instance::new` would
/// panic). GL is left out by default: its compute support is partial and probing it
/// without a display prints errors.
fn instance() -> Option<wgpu::Instance> {
    if wgpu::Instance::enabled_backend_features().is_empty() {
        return None;
    }
    Some(wgpu::Instance::new(
        wgpu::InstanceDescriptor {
            backends: wgpu::Backends::PRIMARY,
            ..wgpu::InstanceDescriptor::new_without_display_handle()
        }
        .with_env(),
    ))
}

fn create() -> Result<Arc<WgpuBackend>> {
    let instance = instance().ok_or_else(|| {
        Error::WgpuUnavailable("wgpu was built without a backend for this platform".into())
    })?;
    let adapter = pollster::block_on(instance.request_adapter(&wgpu::RequestAdapterOptions {
        power_preference: wgpu::PowerPreference::HighPerformance,
        ..Default::default()
    }))
    .map_err(|e| {
        Error::WgpuUnavailable(format!(
            "no adapter ({e}); install a Vulkan driver, e.g. mesa-vulkan-drivers for lavapipe"
        ))
    })?;
    let info = adapter.get_info();
    let shader_f16 = adapter.features().contains(wgpu::Features::SHADER_F16);
    let required_features = if shader_f16 {
        wgpu::Features::SHADER_F16
    } else {
        wgpu::Features::empty()
    };
    let required_limits = requested_limits(&adapter.limits());
    let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
        label: Some("losskern"),
        required_features,
        required_limits,
        ..Default::default()
    }))
    .map_err(|e| {
        Error::WgpuUnavailable(format!(
            "adapter {} ({:?}) gave no device: {e}",
            info.name, info.backend
        ))
    })?;
    let uncaptured = Arc::new(Mutex::new(Vec::new()));
    let sink = Arc::clone(&uncaptured);
    device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
        // A poisoned lock only means another thread panicked while pushing; keep recording.
        let mut errors = sink.lock().unwrap_or_else(|p| p.into_inner());
        errors.push(error_text(&error));
    }));
    Ok(Arc::new(WgpuBackend::new(
        device, queue, info, shader_f16, uncaptured,
    )))
}

/// The limits requested from an adapter: the WebGPU defaults where the adapter meets
/// them (else the downlevel defaults), raised to the adapter's own values for what
/// large problems need (buffer and binding sizes, workgroups per dimension, storage
/// buffers per stage).
fn requested_limits(adapter: &wgpu::Limits) -> wgpu::Limits {
    let base = if wgpu::Limits::default().check_limits(adapter) {
        wgpu::Limits::default()
    } else {
        wgpu::Limits::downlevel_defaults()
    };
    wgpu::Limits {
        max_storage_buffer_binding_size: adapter.max_storage_buffer_binding_size,
        max_buffer_size: adapter.max_buffer_size,
        max_compute_workgroups_per_dimension: adapter.max_compute_workgroups_per_dimension,
        max_storage_buffers_per_shader_stage: adapter.max_storage_buffers_per_shader_stage,
        max_compute_workgroup_storage_size: adapter.max_compute_workgroup_storage_size,
        max_compute_invocations_per_workgroup: adapter.max_compute_invocations_per_workgroup,
        max_compute_workgroup_size_x: adapter.max_compute_workgroup_size_x,
        ..base
    }
}

/// The message of a wgpu error with its chain of sources (shader errors keep the
/// naga diagnostic there).
fn error_text(error: &wgpu::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

/// `bytes` rounded up to a multiple of 4 (wgpu's copy and binding granularity), at least 4.
pub(crate) fn padded_size(bytes: u64) -> u64 {
    bytes.div_ceil(4).max(1) * 4
}

/// The first `bytes` of `buffer` (rounded up to 4) as a binding: (buffer, offset, size).
pub(crate) fn prefix(buffer: &wgpu::Buffer, bytes: u64) -> (&wgpu::Buffer, u64, u64) {
    (buffer, 0, padded_size(bytes))
}

/// `binding`, or the first 16 bytes of `unused` where the kernel reads nothing there (a
/// bind group fills every slot).
pub(crate) fn or_unused<'a>(
    binding: Option<(&'a wgpu::Buffer, u64, u64)>,
    unused: &'a wgpu::Buffer,
) -> (&'a wgpu::Buffer, u64, u64) {
    binding.unwrap_or_else(|| prefix(unused, 16))
}

/// All of `buffer` as a binding: (buffer, offset, size).
pub(crate) fn whole(buffer: &wgpu::Buffer) -> (&wgpu::Buffer, u64, u64) {
    (buffer, 0, buffer.size())
}

impl WgpuBackend {
    fn new(
        device: wgpu::Device,
        queue: wgpu::Queue,
        adapter: wgpu::AdapterInfo,
        shader_f16: bool,
        uncaptured: Arc<Mutex<Vec<String>>>,
    ) -> Self {
        let limits = device.limits();
        WgpuBackend {
            device,
            queue,
            adapter,
            shader_f16,
            limits,
            modules: Mutex::new(HashMap::new()),
            pipelines: Mutex::new(HashMap::new()),
            uncaptured,
            free: Mutex::new(BufferPool::default()),
            watched: Watches::default(),
        }
    }

    /// Whether the adapter is a software rasteriser (lavapipe, llvmpipe, WARP).
    pub fn is_software(&self) -> bool {
        self.adapter.device_type == wgpu::DeviceType::Cpu
    }

    /// Frees every buffer the pool keeps for reuse.
    pub fn trim(&self) -> Result<()> {
        let mut pool = self.pool();
        pool.buffers.clear();
        pool.bytes = 0;
        Ok(())
    }

    /// Checks `watch` at the calling thread's next readback or synchronisation.
    pub(crate) fn watch_targets(&self, watch: TargetWatch) {
        self.watched.push(Watch::Targets(watch));
    }

    /// Checks the weight status word of an energy distance at the calling thread's next
    /// readback or synchronisation.
    pub(crate) fn watch_weights(&self, status: wgpu::Buffer) {
        self.watched.push(Watch::Weights(status));
    }

    /// Checks the status words of an ensemble call at the calling thread's next readback
    /// or synchronisation.
    pub(crate) fn watch_ensemble(&self, watch: EnsembleWatch) {
        self.watched.push(Watch::Ensemble(watch));
    }

    /// Reads the status word of every op queued since the last check and reports the
    /// first op's first bad row, weight or ensemble value.
    fn check_targets(&self) -> Result<()> {
        let watched = self.watched.take();
        for watch in watched {
            match watch {
                Watch::Targets(t) => {
                    let status = self.status_word(&t.status)?;
                    if status != 0 {
                        return Err(Error::Target {
                            row: (!status) as usize,
                            classes: t.classes,
                            ignore_index: t.ignore_index,
                        });
                    }
                }
                Watch::Weights(buffer) => {
                    let status = self.status_word(&buffer)?;
                    if status != 0 {
                        return Err(weight_status_error(u64::from(status)));
                    }
                }
                Watch::Ensemble(e) => {
                    let bytes = self.read_back(&e.status, 8 * STATUS_WORDS)?;
                    let words: Vec<u64> = bytes
                        .chunks_exact(8)
                        .map(bytemuck::pod_read_unaligned)
                        .collect();
                    status_error(&words, e.classes, e.directions)?;
                }
            }
        }
        Ok(())
    }

    /// The u32 status word at the start of `buffer`.
    fn status_word(&self, buffer: &wgpu::Buffer) -> Result<u32> {
        let word = self.read_back(buffer, 4)?;
        Ok(u32::from_le_bytes([word[0], word[1], word[2], word[3]]))
    }

    /// A backend on a device the caller created (e.g. a framework's own), so that its
    /// buffers can be passed to the `*_raw` entry points without a copy. No
    /// uncaptured-error handler is installed (the device's owner may have its own);
    /// every call here captures its errors in error scopes.
    pub fn from_device(device: wgpu::Device, queue: wgpu::Queue) -> Arc<WgpuBackend> {
        let adapter = device.adapter_info();
        let shader_f16 = device.features().contains(wgpu::Features::SHADER_F16);
        Arc::new(WgpuBackend::new(
            device,
            queue,
            adapter,
            shader_f16,
            Arc::new(Mutex::new(Vec::new())),
        ))
    }

    /// "adapter name (backend)", e.g. "llvmpipe (LLVM 15.0.6, 256 bits) (Vulkan)".
    pub fn describe(&self) -> String {
        format!("{} ({:?})", self.adapter.name, self.adapter.backend)
    }

    pub fn info(&self) -> WgpuInfo {
        WgpuInfo {
            name: self.adapter.name.clone(),
            backend: format!("{:?}", self.adapter.backend),
            driver: self.adapter.driver.clone(),
            driver_info: self.adapter.driver_info.clone(),
            device_type: format!("{:?}", self.adapter.device_type),
            shader_f16: self.shader_f16,
            max_storage_buffer_binding_size: self.limits.max_storage_buffer_binding_size,
            max_buffer_size: self.limits.max_buffer_size,
            max_compute_workgroups_per_dimension: self.limits.max_compute_workgroups_per_dimension,
        }
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }

    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }

    pub fn limits(&self) -> &wgpu::Limits {
        &self.limits
    }

    /// Runs `f` inside out-of-memory, validation and internal error scopes and returns
    /// the first error they caught as `Error::Wgpu("{what}: ...")`.
    pub(crate) fn scoped<T>(&self, what: &str, f: impl FnOnce() -> Result<T>) -> Result<T> {
        let out_of_memory = self.device.push_error_scope(wgpu::ErrorFilter::OutOfMemory);
        let validation = self.device.push_error_scope(wgpu::ErrorFilter::Validation);
        let internal = self.device.push_error_scope(wgpu::ErrorFilter::Internal);
        let value = f();
        // Scopes pop in reverse order of their pushes; every one is popped even after an error.
        let caught = [
            pollster::block_on(internal.pop()),
            pollster::block_on(validation.pop()),
            pollster::block_on(out_of_memory.pop()),
        ];
        if let Some(error) = caught.iter().flatten().next() {
            return Err(Error::Wgpu(format!("{what}: {}", error_text(error))));
        }
        self.check_uncaptured()?;
        value
    }

    fn check_uncaptured(&self) -> Result<()> {
        let mut errors = self.uncaptured.lock().unwrap_or_else(|p| p.into_inner());
        if errors.is_empty() {
            Ok(())
        } else {
            let text = errors.join("; ");
            errors.clear();
            Err(Error::Wgpu(text))
        }
    }

    /// Waits until all submitted work has finished; `Error::Target` when a kernel since
    /// the last check found a class target out of range.
    pub fn synchronize(&self) -> Result<()> {
        self.scoped("synchronize", || {
            // Flushes pending `write_buffer`s, which are only scheduled with the next submit.
            self.queue.submit([]);
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Wgpu(format!("waiting for the queue: {e}")))?;
            Ok(())
        })?;
        self.check_targets()
    }

    /// A new buffer of `size` bytes (rounded up to 4, at least 4).
    pub(crate) fn create_buffer(
        &self,
        label: &str,
        size: u64,
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let size = padded_size(size);
        // A kernel's buffer (outputs and scratch alike) is poisoned while poisoning is
        // on, which needs COPY_DST.
        let poisoned = usage.contains(wgpu::BufferUsages::STORAGE) && crate::device::poisoning();
        let usage = if poisoned {
            usage | wgpu::BufferUsages::COPY_DST
        } else {
            usage
        };
        if size > self.limits.max_buffer_size {
            return Err(Error::Wgpu(format!(
                "{label}: a buffer of {size} bytes exceeds the device's max_buffer_size {}",
                self.limits.max_buffer_size
            )));
        }
        let pooled = {
            let mut pool = self.pool();
            let buffer = pool
                .buffers
                .get_mut(&(size, usage.bits()))
                .and_then(Vec::pop);
            if buffer.is_some() {
                pool.bytes -= size;
            }
            buffer
        };
        let buffer = match pooled {
            Some(buffer) => buffer,
            None => self.scoped(label, || {
                Ok(self.device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some(label),
                    size,
                    usage,
                    mapped_at_creation: false,
                }))
            })?,
        };
        if poisoned {
            self.scoped(label, || {
                // 0xFF bytes: NaN in every float dtype, -1 as i64 (device::poison_outputs).
                let poison = usize::try_from(size).map_err(|_| {
                    Error::Wgpu(format!("{label}: {size} bytes do not fit in usize"))
                })?;
                self.queue.write_buffer(&buffer, 0, &vec![0xFF; poison]);
                Ok(())
            })?;
        }
        Ok(buffer)
    }

    fn pool(&self) -> std::sync::MutexGuard<'_, BufferPool> {
        // The pool is only a cache: a poisoned one is still a valid set of buffers.
        self.free.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Keeps a dropped tensor's buffer for the next buffer of its size and usage. Its
    /// contents are stale: every user overwrites what it reads (uploads write the whole
    /// buffer, kernels every output element).
    pub(crate) fn recycle(&self, buffer: wgpu::Buffer) {
        let size = buffer.size();
        let mut pool = self.pool();
        if pool.bytes + size > POOL_BYTES {
            return;
        }
        let kind = pool
            .buffers
            .entry((size, buffer.usage().bits()))
            .or_default();
        if kind.len() < POOL_PER_KIND {
            kind.push(buffer);
            pool.bytes += size;
        }
    }

    /// A buffer holding `bytes`, zero-padded to a multiple of 4.
    pub(crate) fn buffer_with(
        &self,
        label: &str,
        bytes: &[u8],
        usage: wgpu::BufferUsages,
    ) -> Result<wgpu::Buffer> {
        let buffer = self.create_buffer(
            label,
            bytes.len() as u64,
            usage | wgpu::BufferUsages::COPY_DST,
        )?;
        self.scoped(label, || {
            let aligned = bytes.len() - bytes.len() % 4;
            self.queue.write_buffer(&buffer, 0, &bytes[..aligned]);
            if aligned < bytes.len() {
                let mut tail = [0u8; 4];
                tail[..bytes.len() - aligned].copy_from_slice(&bytes[aligned..]);
                self.queue.write_buffer(&buffer, aligned as u64, &tail);
            }
            Ok(())
        })?;
        Ok(buffer)
    }

    /// Copies `bytes` into a new storage buffer (STORAGE | COPY_SRC | COPY_DST) whose size
    /// is `bytes.len()` rounded up to 4 (4 for an empty slice); the padding is zero.
    pub fn upload(&self, bytes: &[u8]) -> Result<wgpu::Buffer> {
        self.buffer_with(
            "upload",
            bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
        )
    }

    /// Reads the first `len` bytes of `buffer` (which needs COPY_SRC) back to the host;
    /// `Error::Target` as [`WgpuBackend::synchronize`].
    pub fn download(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
        let bytes = self.read_back(buffer, len)?;
        self.check_targets()?;
        Ok(bytes)
    }

    fn read_back(&self, buffer: &wgpu::Buffer, len: usize) -> Result<Vec<u8>> {
        if len == 0 {
            return Ok(Vec::new());
        }
        let size = padded_size(len as u64);
        if size > buffer.size() {
            return Err(Error::Wgpu(format!(
                "download of {len} bytes from a buffer of {} bytes",
                buffer.size()
            )));
        }
        if !buffer.usage().contains(wgpu::BufferUsages::COPY_SRC) {
            return Err(Error::Wgpu(
                "download from a buffer without COPY_SRC usage".into(),
            ));
        }
        let staging = self.create_buffer(
            "download staging",
            size,
            wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST,
        )?;
        let (sender, receiver) = std::sync::mpsc::channel();
        self.scoped("download", || {
            let mut encoder = self
                .device
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("download"),
                });
            encoder.copy_buffer_to_buffer(buffer, 0, &staging, 0, size);
            self.queue.submit([encoder.finish()]);
            staging.map_async(wgpu::MapMode::Read, .., move |result| {
                // A failed send only means the receiver is gone (an error on the way),
                // and then nobody waits for the result.
                let _ = sender.send(result);
            });
            self.device
                .poll(wgpu::PollType::wait_indefinitely())
                .map_err(|e| Error::Wgpu(format!("waiting for a download: {e}")))?;
            Ok(())
        })?;
        // Another thread's poll may have taken this callback and not yet run it when our
        // poll returns, so wait for it rather than try once; wgpu runs or drops every
        // callback, and a dropped one ends the wait with an error.
        match receiver.recv() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Error::Wgpu(format!("mapping a download buffer: {e}"))),
            Err(_) => {
                return Err(Error::Wgpu(
                    "a download buffer's mapping was dropped unanswered".into(),
                ))
            }
        }
        let bytes = {
            let view = staging
                .get_mapped_range(..)
                .map_err(|e| Error::Wgpu(format!("reading a mapped download buffer: {e}")))?;
            view[..len].to_vec()
        };
        staging.unmap();
        Ok(bytes)
    }

    /// The shader module of `shader` (compiled once per device) with its layouts.
    fn module(&self, shader: ShaderSource) -> Result<Arc<Module>> {
        let mut modules = self.modules.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(module) = modules.get(&shader) {
            return Ok(Arc::clone(module));
        }
        let module = self.scoped(&format!("compiling {}", shader.name()), || {
            let module = self
                .device
                .create_shader_module(wgpu::ShaderModuleDescriptor {
                    label: Some(shader.name()),
                    source: wgpu::ShaderSource::Wgsl(shader.code().into()),
                });
            let entries: Vec<wgpu::BindGroupLayoutEntry> = shader
                .bindings()
                .iter()
                .enumerate()
                .map(|(binding, kind)| wgpu::BindGroupLayoutEntry {
                    binding: binding as u32,
                    visibility: wgpu::ShaderStages::COMPUTE,
                    ty: wgpu::BindingType::Buffer {
                        ty: match kind {
                            BindingKind::Uniform => wgpu::BufferBindingType::Uniform,
                            BindingKind::Read => {
                                wgpu::BufferBindingType::Storage { read_only: true }
                            }
                            BindingKind::ReadWrite => {
                                wgpu::BufferBindingType::Storage { read_only: false }
                            }
                        },
                        has_dynamic_offset: false,
                        min_binding_size: None,
                    },
                    count: None,
                })
                .collect();
            let bind_group_layout =
                self.device
                    .create_bind_group_layout(&wgpu::BindGroupLayoutDescriptor {
                        label: Some(shader.name()),
                        entries: &entries,
                    });
            let pipeline_layout =
                self.device
                    .create_pipeline_layout(&wgpu::PipelineLayoutDescriptor {
                        label: Some(shader.name()),
                        bind_group_layouts: &[Some(&bind_group_layout)],
                        immediate_size: 0,
                    });
            Ok(Module {
                module,
                bind_group_layout,
                pipeline_layout,
            })
        })?;
        let module = Arc::new(module);
        modules.insert(shader, Arc::clone(&module));
        Ok(module)
    }

    /// The pipeline of `key`, compiled on first use and cached for the device's lifetime.
    pub(crate) fn pipeline(&self, key: &PipelineKey) -> Result<Arc<wgpu::ComputePipeline>> {
        if let Some(pipeline) = self
            .pipelines
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .get(key)
        {
            return Ok(Arc::clone(pipeline));
        }
        let module = self.module(key.shader)?;
        let constants: Vec<(&str, f64)> = key
            .constants
            .iter()
            .map(|&(name, value)| (name, f64::from(value)))
            .collect();
        let label = format!("{}:{} {:?}", key.shader.name(), key.entry, key.constants);
        let pipeline = self.scoped(&format!("compiling {label}"), || {
            Ok(self
                .device
                .create_compute_pipeline(&wgpu::ComputePipelineDescriptor {
                    label: Some(&label),
                    layout: Some(&module.pipeline_layout),
                    module: &module.module,
                    entry_point: Some(key.entry),
                    compilation_options: wgpu::PipelineCompilationOptions {
                        constants: &constants,
                        // Every kernel writes its workgroup memory before reading it.
                        zero_initialize_workgroup_memory: false,
                    },
                    cache: None,
                }))
        })?;
        let pipeline = Arc::new(pipeline);
        // Two threads may compile the same key at once; both results are equivalent and
        // the first one stored wins, so that every caller uses the same object afterwards.
        let mut pipelines = self.pipelines.lock().unwrap_or_else(|p| p.into_inner());
        Ok(Arc::clone(pipelines.entry(key.clone()).or_insert(pipeline)))
    }

    /// Compiles every pipeline of every shader; returns how many. CI calls this so that
    /// every WGSL shader is proven to compile on lavapipe.
    pub fn compile_all(&self) -> Result<usize> {
        let mut count = 0;
        for shader in ShaderSource::ALL {
            for key in shader.pipelines() {
                self.pipeline(&key)?;
                count += 1;
            }
        }
        Ok(count)
    }

    /// A bind group of `shader`'s layout from `(buffer, offset, size)` per binding, in order.
    pub(crate) fn bind_group(
        &self,
        shader: ShaderSource,
        buffers: &[(&wgpu::Buffer, u64, u64)],
    ) -> Result<wgpu::BindGroup> {
        let module = self.module(shader)?;
        let mut entries = Vec::with_capacity(buffers.len());
        for (binding, &(buffer, offset, size)) in buffers.iter().enumerate() {
            let size = wgpu::BufferSize::new(size).ok_or_else(|| {
                Error::Wgpu(format!(
                    "{}: binding {binding} would be empty",
                    shader.name()
                ))
            })?;
            entries.push(wgpu::BindGroupEntry {
                binding: binding as u32,
                resource: wgpu::BindingResource::Buffer(wgpu::BufferBinding {
                    buffer,
                    offset,
                    size: Some(size),
                }),
            });
        }
        self.scoped(&format!("binding {}", shader.name()), || {
            Ok(self.device.create_bind_group(&wgpu::BindGroupDescriptor {
                label: Some(shader.name()),
                layout: &module.bind_group_layout,
                entries: &entries,
            }))
        })
    }

    /// Checks that a binding of `bytes` fits the device and the shaders' u32 indexing.
    pub(crate) fn check_binding(&self, kernel: &str, what: &str, bytes: u64) -> Result<()> {
        let limit = self.binding_limit();
        if bytes > limit {
            return Err(Error::Launch {
                kernel: kernel.to_string(),
                reason: format!(
                    "{what} needs a binding of {bytes} bytes; the device allows {limit} \
                     (max_storage_buffer_binding_size, capped at 2 GiB for u32 indexing)"
                ),
            });
        }
        Ok(())
    }

    /// The largest binding the kernels use: the device's limit, capped for u32 indexing,
    /// rounded down to a multiple of 4.
    pub(crate) fn binding_limit(&self) -> u64 {
        self.limits
            .max_storage_buffer_binding_size
            .min(MAX_BINDING_BYTES)
            / 4
            * 4
    }

    /// The offset alignment of storage bindings.
    pub(crate) fn storage_alignment(&self) -> u64 {
        u64::from(self.limits.min_storage_buffer_offset_alignment)
    }

    /// A grid of `workgroups` workgroups as (x, y), split over two dimensions when it
    /// exceeds the per-dimension limit. Kernels recover the linear index as
    /// `wg.y * num_workgroups.x + wg.x` and return when it is past their count.
    pub(crate) fn grid(&self, kernel: &str, workgroups: u64) -> Result<(u32, u32)> {
        let max = u64::from(self.limits.max_compute_workgroups_per_dimension);
        if workgroups == 0 || max == 0 {
            return Ok((0, 0));
        }
        let x = workgroups.min(max);
        let y = workgroups.div_ceil(x);
        if y > max {
            return Err(Error::Launch {
                kernel: kernel.to_string(),
                reason: format!(
                    "{workgroups} workgroups exceed {max} x {max} \
                     (max_compute_workgroups_per_dimension)"
                ),
            });
        }
        // Both fit in u32: x <= max and y <= max, and max came from a u32.
        Ok((x as u32, y as u32))
    }

    /// Checks that the device offers what the kernels of `shader` need.
    pub(crate) fn check_kernel_limits(&self, shader: ShaderSource) -> Result<()> {
        let storage = shader
            .bindings()
            .iter()
            .filter(|kind| **kind != BindingKind::Uniform)
            .count() as u32;
        let l = &self.limits;
        let problems: Vec<String> = [
            (
                l.max_storage_buffers_per_shader_stage < storage,
                format!(
                    "{storage} storage buffers per stage (device: {})",
                    l.max_storage_buffers_per_shader_stage
                ),
            ),
            (
                l.max_compute_invocations_per_workgroup < WORKGROUP_SIZE
                    || l.max_compute_workgroup_size_x < WORKGROUP_SIZE,
                format!(
                    "{WORKGROUP_SIZE} invocations per workgroup (device: {})",
                    l.max_compute_invocations_per_workgroup
                ),
            ),
        ]
        .into_iter()
        .filter_map(|(bad, text)| bad.then_some(text))
        .collect();
        if problems.is_empty() {
            Ok(())
        } else {
            Err(Error::Launch {
                kernel: shader.name().to_string(),
                reason: format!("the device lacks {}", problems.join(" and ")),
            })
        }
    }
}

/// The shader's code for a float dtype.
pub(crate) fn dtype_code(dtype: DType) -> Result<u32> {
    match dtype {
        DType::F32 => Ok(0),
        DType::F16 => Ok(1),
        DType::BF16 => Ok(2),
        DType::F64 | DType::I64 => Err(Error::DType(format!(
            "the WGSL kernels take f32, f16 or bf16 data, not {dtype}"
        ))),
    }
}

/// The buffer of a tensor on a wgpu device.
pub(crate) fn wgpu_buffer<'t>(tensor: &'t Tensor, what: &str) -> Result<&'t wgpu::Buffer> {
    match &tensor.storage {
        Storage::Wgpu(buffer) => Ok(buffer),
        _ => Err(Error::DeviceMismatch(format!(
            "{what} does not live on a wgpu device"
        ))),
    }
}

/// Checks that a caller's buffer holds `bytes` and has `usage`.
pub(crate) fn require(
    buffer: &wgpu::Buffer,
    what: &str,
    bytes: u64,
    usage: wgpu::BufferUsages,
) -> Result<()> {
    if buffer.size() < bytes {
        return Err(Error::Shape(format!(
            "{what} needs {bytes} bytes but its buffer has {}",
            buffer.size()
        )));
    }
    if !buffer.usage().contains(usage) {
        return Err(Error::Wgpu(format!(
            "the {what} buffer lacks usage {usage:?}"
        )));
    }
    Ok(())
}

/// A byte range of a buffer bound at an aligned offset.
pub(crate) struct Window {
    pub(crate) offset: u64,
    pub(crate) size: u64,
    /// Bytes from `offset` to the range's start.
    pub(crate) skip: u64,
}

/// Binds `[start, end)` of a buffer: the offset is `start` aligned down, the size the rest
/// rounded up to 4 (buffers are padded to 4, so the rounded end stays inside).
pub(crate) fn window(start: u64, end: u64, align: u64) -> Window {
    let offset = start / align * align;
    Window {
        offset,
        size: padded_size(end - offset),
        skip: start - offset,
    }
}

/// Converts a host-computed index to the shader's u32; the chunk plan keeps them small.
pub(crate) fn index(value: u64, what: &str) -> Result<u32> {
    u32::try_from(value).map_err(|_| Error::Launch {
        kernel: "wgpu".into(),
        reason: format!("{what} = {value} does not fit the shader's u32 indices"),
    })
}

impl BackendKind for WgpuBackend {
    fn kind(&self) -> Backend {
        Backend::Wgpu
    }
}
