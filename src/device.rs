//! Where data lives: `Device` (CPU, CUDA or wgpu) and `Tensor` (a shaped, typed buffer on a device).

#[cfg(any(feature = "cuda", feature = "wgpu"))]
use std::sync::Arc;

#[cfg(feature = "cuda")]
use crate::cuda::CudaBackend;
use crate::dtype::{DType, Element};
use crate::error::{Error, Result};
#[cfg(feature = "wgpu")]
use crate::wgpu::WgpuBackend;

static POISON_OUTPUTS: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// While on, the GPU backends fill every buffer they hand to a kernel with 0xFF bytes
/// (NaN in every float dtype, -1 as i64) before the kernel runs, so a comparison with the
/// reference sees any element a kernel did not write, even in memory reused from an
/// earlier call that held the right value. It costs a write of every output: the
/// correctness harness (`check`) and the tests turn it on, benchmarks leave it off.
pub fn poison_outputs(on: bool) {
    POISON_OUTPUTS.store(on, std::sync::atomic::Ordering::Relaxed);
}

pub(crate) fn poisoning() -> bool {
    POISON_OUTPUTS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The kind of backend a device belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Backend {
    Cpu,
    Cuda,
    Wgpu,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Cpu => "cpu",
            Backend::Cuda => "cuda",
            Backend::Wgpu => "wgpu",
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A device that tensors live on and ops run on. Cheap to clone; GPU devices are
/// shared process-wide, so two `Device::cuda(0)` calls give the same context.
#[derive(Clone)]
pub enum Device {
    Cpu,
    #[cfg(feature = "cuda")]
    Cuda(Arc<CudaBackend>),
    #[cfg(feature = "wgpu")]
    Wgpu(Arc<WgpuBackend>),
}

impl std::fmt::Debug for Device {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Device({})", self.name())
    }
}

impl PartialEq for Device {
    fn eq(&self, other: &Self) -> bool {
        match (self, other) {
            (Device::Cpu, Device::Cpu) => true,
            #[cfg(feature = "cuda")]
            (Device::Cuda(a), Device::Cuda(b)) => Arc::ptr_eq(a, b),
            #[cfg(feature = "wgpu")]
            (Device::Wgpu(a), Device::Wgpu(b)) => Arc::ptr_eq(a, b),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => false,
        }
    }
}

impl Device {
    /// The CUDA device with this ordinal; `Error::CudaUnavailable` when libcuda,
    /// libnvrtc or the device cannot be had, or the crate was built without `cuda`.
    pub fn cuda(ordinal: usize) -> Result<Device> {
        #[cfg(feature = "cuda")]
        return Ok(Device::Cuda(crate::cuda::backend(ordinal)?));
        #[cfg(not(feature = "cuda"))]
        return Err(Error::CudaUnavailable(format!(
            "device {ordinal}: losskern was built without the `cuda` feature"
        )));
    }

    /// The first WebGPU adapter (high performance preferred); `Error::WgpuUnavailable`
    /// when none, or the crate was built without `wgpu`.
    pub fn wgpu() -> Result<Device> {
        #[cfg(feature = "wgpu")]
        return Ok(Device::Wgpu(crate::wgpu::backend()?));
        #[cfg(not(feature = "wgpu"))]
        return Err(Error::WgpuUnavailable(
            "losskern was built without the `wgpu` feature".into(),
        ));
    }

    /// CUDA device 0 if present, else a hardware wgpu adapter, else the CPU. A software
    /// adapter (lavapipe, llvmpipe) runs the shaders for testing, never as the best
    /// device: the native CPU path is faster there.
    pub fn best() -> Device {
        if let Ok(device) = Device::cuda(0) {
            return device;
        }
        #[cfg(feature = "wgpu")]
        if let Ok(backend) = crate::wgpu::backend() {
            if !backend.is_software() {
                return Device::Wgpu(backend);
            }
        }
        Device::Cpu
    }

    pub fn backend(&self) -> Backend {
        match self {
            Device::Cpu => Backend::Cpu,
            #[cfg(feature = "cuda")]
            Device::Cuda(_) => Backend::Cuda,
            #[cfg(feature = "wgpu")]
            Device::Wgpu(_) => Backend::Wgpu,
        }
    }

    /// A human-readable name: "cpu", "cuda:NVIDIA H200 (sm_90)", "wgpu:llvmpipe (Vulkan)".
    pub fn name(&self) -> String {
        match self {
            Device::Cpu => "cpu".to_string(),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => format!("cuda:{}", b.describe()),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => format!("wgpu:{}", b.describe()),
        }
    }

    /// Waits until all work queued on the device has finished; reports what the kernels
    /// found in the data since the last readback (`Error::Target`).
    pub fn synchronize(&self) -> Result<()> {
        match self {
            Device::Cpu => Ok(()),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.synchronize(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.synchronize(),
        }
    }

    /// Hands memory that the device keeps for reuse (freed tensors' buffers) back to
    /// the driver (the allocator on the CPU). Each backend keeps a bounded amount (see
    /// [`HOST_POOL_BYTES`], `CudaBackend::trim` and `WgpuBackend::trim`); this is for a
    /// caller that needs the memory elsewhere now.
    pub fn trim(&self) -> Result<()> {
        match self {
            Device::Cpu => {
                if let Ok(mut pool) = HOST_POOL.lock() {
                    pool.clear();
                }
                Ok(())
            }
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => b.trim(),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => b.trim(),
        }
    }

    pub(crate) fn upload_bytes(&self, bytes: &[u8]) -> Result<Storage> {
        Ok(match self {
            Device::Cpu => Storage::Cpu(HostBuffer::from_bytes(bytes)),
            #[cfg(feature = "cuda")]
            Device::Cuda(b) => Storage::Cuda(b.upload(bytes)?),
            #[cfg(feature = "wgpu")]
            Device::Wgpu(b) => Storage::Wgpu(b.upload(bytes)?),
        })
    }
}

/// One 64-byte line of host memory: a CPU tensor is held in these, so a view of its
/// bytes as any element type (at most 8 bytes wide) is aligned, and the CPU kernels
/// read and write typed slices without copies or unaligned casts.
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
#[repr(C, align(64))]
struct Line([u8; 64]);

/// The bytes of a CPU tensor, 64-byte aligned.
#[derive(Clone)]
pub(crate) struct HostBuffer {
    lines: Vec<Line>,
    len: usize,
}

/// Host buffers of dropped CPU tensors, kept for reuse, as the GPU backends keep theirs:
/// a fresh allocation of an output's size is zeroed and faulted in page by page (in a
/// profile of xent with its gradient at 1024 x 32000 on 2 cores, about a third of the
/// time went to page faults and zeroing). Bounded by [`HOST_POOL_BYTES`];
/// `Device::Cpu.trim()` empties it.
static HOST_POOL: std::sync::Mutex<Vec<Vec<Line>>> = std::sync::Mutex::new(Vec::new());

/// At most this many bytes of freed host buffers wait in the pool; a buffer that would
/// pass it is freed.
pub const HOST_POOL_BYTES: usize = 2 << 30;

/// A buffer of `lines` lines from the pool, holding a dropped tensor's bytes, if one
/// of that size waits there.
fn pooled_lines(lines: usize) -> Option<Vec<Line>> {
    let mut pool = HOST_POOL.lock().ok()?;
    let at = pool.iter().position(|buffer| buffer.len() == lines)?;
    Some(pool.swap_remove(at))
}

impl Drop for HostBuffer {
    fn drop(&mut self) {
        let lines = std::mem::take(&mut self.lines);
        if lines.is_empty() {
            return;
        }
        // A poisoned lock (a panic elsewhere while it was held) just frees the buffer.
        if let Ok(mut pool) = HOST_POOL.lock() {
            let held: usize = pool.iter().map(Vec::len).sum();
            if (held + lines.len()) * std::mem::size_of::<Line>() <= HOST_POOL_BYTES {
                pool.push(lines);
            }
        }
    }
}

impl HostBuffer {
    /// `len` bytes for a kernel to write in place: each 0xFF while output poisoning is on
    /// (NaN in every float dtype, -1 as i64, so an element a CPU kernel forgot to write
    /// shows), else zeros or a dropped tensor's stale bytes.
    fn output(len: usize) -> HostBuffer {
        let count = len.div_ceil(std::mem::size_of::<Line>());
        let mut lines = pooled_lines(count).unwrap_or_else(|| bytemuck::zeroed_vec(count));
        if poisoning() {
            lines.fill(Line([0xFF; 64]));
        }
        HostBuffer { lines, len }
    }

    fn from_bytes(bytes: &[u8]) -> HostBuffer {
        let count = bytes.len().div_ceil(std::mem::size_of::<Line>());
        let lines = pooled_lines(count).unwrap_or_else(|| bytemuck::zeroed_vec(count));
        let mut buffer = HostBuffer {
            lines,
            len: bytes.len(),
        };
        buffer.bytes_mut().copy_from_slice(bytes);
        buffer
    }

    fn bytes(&self) -> &[u8] {
        &bytemuck::cast_slice(&self.lines)[..self.len]
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        &mut bytemuck::cast_slice_mut(&mut self.lines)[..self.len]
    }
}

/// The bytes of a tensor, on its device.
pub(crate) enum Storage {
    Cpu(HostBuffer),
    #[cfg(feature = "cuda")]
    Cuda(cudarc::driver::CudaSlice<u8>),
    /// A storage buffer whose size is the tensor's byte length rounded up to 4.
    #[cfg(feature = "wgpu")]
    Wgpu(::wgpu::Buffer),
}

/// A dense, row-major, shaped buffer of one dtype on one device.
pub struct Tensor {
    shape: Vec<usize>,
    dtype: DType,
    device: Device,
    pub(crate) storage: Storage,
}

#[cfg(feature = "wgpu")]
impl Drop for Tensor {
    fn drop(&mut self) {
        if let (Storage::Wgpu(buffer), Device::Wgpu(backend)) = (&self.storage, &self.device) {
            backend.recycle(buffer.clone());
        }
    }
}

impl std::fmt::Debug for Tensor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Tensor({:?}, {}, {})",
            self.shape,
            self.dtype,
            self.device.name()
        )
    }
}

/// A host buffer's typed view: its lines align it for every element type and the byte
/// length is the element count times the size, so the cast cannot fail; if it did, the
/// error says so rather than a panic.
fn host_cast<T>(view: std::result::Result<T, bytemuck::PodCastError>) -> Result<T> {
    view.map_err(|e| Error::DType(format!("host buffer view: {e}")))
}

#[cfg(any(feature = "cuda", feature = "wgpu"))]
fn not_on_host() -> Error {
    Error::DeviceMismatch("the CPU backend was handed a tensor that is not on the host".into())
}

fn element_count(shape: &[usize]) -> Result<usize> {
    shape
        .iter()
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .ok_or_else(|| Error::Shape(format!("{shape:?} has more elements than fit in usize")))
}

impl Tensor {
    /// Copies `data` to `device` as a tensor of `shape`.
    pub fn from_slice<T: Element>(device: &Device, data: &[T], shape: &[usize]) -> Result<Tensor> {
        let count = element_count(shape)?;
        if count != data.len() {
            return Err(Error::Shape(format!(
                "shape {shape:?} holds {count} elements but the slice has {}",
                data.len()
            )));
        }
        let storage = device.upload_bytes(bytemuck::cast_slice(data))?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype: T::DTYPE,
            device: device.clone(),
            storage,
        })
    }

    /// Builds a tensor of `dtype` from f64 values rounded to nearest (test and CLI helper).
    pub fn from_f64(
        device: &Device,
        data: &[f64],
        shape: &[usize],
        dtype: DType,
    ) -> Result<Tensor> {
        fn convert<T: Element>(device: &Device, data: &[f64], shape: &[usize]) -> Result<Tensor> {
            let values: Vec<T> = data.iter().map(|&v| T::from_f64(v)).collect();
            Tensor::from_slice(device, &values, shape)
        }
        match dtype {
            DType::F32 => convert::<f32>(device, data, shape),
            DType::F16 => convert::<half::f16>(device, data, shape),
            DType::BF16 => convert::<half::bf16>(device, data, shape),
            DType::F64 => convert::<f64>(device, data, shape),
            DType::I64 => convert::<i64>(device, data, shape),
        }
    }

    /// Copies the tensor back to the host as `T`, which must be the tensor's dtype.
    pub fn to_vec<T: Element>(&self) -> Result<Vec<T>> {
        if T::DTYPE != self.dtype {
            return Err(Error::DType(format!(
                "tensor holds {} but {} was asked for",
                self.dtype,
                T::DTYPE
            )));
        }
        let bytes = self.to_bytes()?;
        Ok(bytemuck::pod_collect_to_vec(&bytes))
    }

    /// Copies the tensor back to the host widened to f64, whatever its dtype.
    pub fn to_f64_vec(&self) -> Result<Vec<f64>> {
        fn widen<T: Element>(bytes: &[u8]) -> Vec<f64> {
            bytemuck::pod_collect_to_vec::<u8, T>(bytes)
                .into_iter()
                .map(Element::to_f64)
                .collect()
        }
        let bytes = self.to_bytes()?;
        Ok(match self.dtype {
            DType::F32 => widen::<f32>(&bytes),
            DType::F16 => widen::<half::f16>(&bytes),
            DType::BF16 => widen::<half::bf16>(&bytes),
            DType::F64 => widen::<f64>(&bytes),
            DType::I64 => widen::<i64>(&bytes),
        })
    }

    /// Copies the tensor to `device` (through the host when it crosses devices).
    pub fn to_device(&self, device: &Device) -> Result<Tensor> {
        let storage = device.upload_bytes(&self.to_bytes()?)?;
        Ok(Tensor {
            shape: self.shape.clone(),
            dtype: self.dtype,
            device: device.clone(),
            storage,
        })
    }

    fn to_bytes(&self) -> Result<Vec<u8>> {
        match (&self.storage, &self.device) {
            (Storage::Cpu(buffer), _) => Ok(buffer.bytes().to_vec()),
            #[cfg(feature = "cuda")]
            (Storage::Cuda(slice), Device::Cuda(b)) => b.download(slice, self.byte_len()),
            #[cfg(feature = "wgpu")]
            (Storage::Wgpu(buffer), Device::Wgpu(b)) => b.download(buffer, self.byte_len()),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => Err(Error::DeviceMismatch(
                "tensor storage does not match its device".into(),
            )),
        }
    }

    pub fn shape(&self) -> &[usize] {
        &self.shape
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Number of elements.
    pub fn len(&self) -> usize {
        self.shape.iter().product()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of data (without the padding a backend may add).
    pub fn byte_len(&self) -> usize {
        self.len() * self.dtype.size()
    }

    /// A CPU tensor of `shape` and `dtype` for a CPU kernel to write in place (poisoned
    /// first while output poisoning is on).
    pub(crate) fn host_output(shape: &[usize], dtype: DType) -> Result<Tensor> {
        let bytes = element_count(shape)?
            .checked_mul(dtype.size())
            .ok_or_else(|| Error::Shape(format!("{shape:?} of {dtype} does not fit in memory")))?;
        Ok(Tensor {
            shape: shape.to_vec(),
            dtype,
            device: Device::Cpu,
            storage: Storage::Cpu(HostBuffer::output(bytes)),
        })
    }

    /// The elements of a CPU tensor of dtype `T`, in place.
    pub(crate) fn host_slice<T: Element>(&self) -> Result<&[T]> {
        self.check_host::<T>()?;
        match &self.storage {
            Storage::Cpu(buffer) => host_cast(bytemuck::try_cast_slice(buffer.bytes())),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => Err(not_on_host()),
        }
    }

    /// The elements of a CPU tensor of dtype `T`, writable in place.
    pub(crate) fn host_slice_mut<T: Element>(&mut self) -> Result<&mut [T]> {
        self.check_host::<T>()?;
        match &mut self.storage {
            Storage::Cpu(buffer) => host_cast(bytemuck::try_cast_slice_mut(buffer.bytes_mut())),
            #[cfg(any(feature = "cuda", feature = "wgpu"))]
            _ => Err(not_on_host()),
        }
    }

    fn check_host<T: Element>(&self) -> Result<()> {
        if T::DTYPE == self.dtype {
            Ok(())
        } else {
            Err(Error::DType(format!(
                "tensor holds {} but a view of {} was asked for",
                self.dtype,
                T::DTYPE
            )))
        }
    }

    /// The tensor's CUDA memory, for the zero-copy entries (`cuda::xent::xent_raw`) and
    /// for frameworks; None on another device. cudarc's stream tracking stays on for it,
    /// so using it on another stream of the context is ordered after our kernels.
    #[cfg(feature = "cuda")]
    pub fn cuda_slice(&self) -> Option<&cudarc::driver::CudaSlice<u8>> {
        match &self.storage {
            Storage::Cuda(slice) => Some(slice),
            _ => None,
        }
    }

    /// The tensor's wgpu buffer (its size rounded up to 4 bytes), for the zero-copy
    /// entries (`wgpu::xent::xent_raw`); None on another device.
    #[cfg(feature = "wgpu")]
    pub fn wgpu_buffer(&self) -> Option<&::wgpu::Buffer> {
        match &self.storage {
            Storage::Wgpu(buffer) => Some(buffer),
            _ => None,
        }
    }

    #[cfg(any(feature = "cuda", feature = "wgpu"))]
    pub(crate) fn from_storage(
        device: &Device,
        storage: Storage,
        shape: Vec<usize>,
        dtype: DType,
    ) -> Tensor {
        Tensor {
            shape,
            dtype,
            device: device.clone(),
            storage,
        }
    }
}
