//! The one error type of the crate.

use thiserror::Error;

/// Every public function returns `Result<_, Error>`; nothing in the library panics on bad input.
#[derive(Debug, Error)]
pub enum Error {
    /// An input's shape disagrees with another's or with the op.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A dimension that must be at least 1 is 0.
    #[error("empty input: {0}")]
    Empty(String),
    /// An option is out of its range or not finite.
    #[error("invalid option: {0}")]
    Option(String),
    /// A class target is outside [0, V) and is not the ignore index. On a GPU the
    /// kernel finds it (that row's outputs are NaN) and the error comes at the next
    /// readback or synchronize of the device; `row` is the first such row.
    #[error("the class target of row {row} is outside [0, {classes}) and is not ignore_index {ignore_index}")]
    Target {
        row: usize,
        classes: usize,
        ignore_index: i64,
    },
    /// A label is outside [0, C).
    #[error("label {label} at row {row} is outside [0, {classes})")]
    LabelOutOfRange {
        row: usize,
        label: i64,
        classes: usize,
    },
    /// A tensor has a dtype the op does not take there.
    #[error("dtype: {0}")]
    DType(String),
    /// Tensors passed to one op live on different devices.
    #[error("device mismatch: {0}")]
    DeviceMismatch(String),
    /// The op has no kernel on this backend yet.
    #[error("{op} is not supported on the {backend} backend")]
    Unsupported {
        op: &'static str,
        backend: &'static str,
    },
    /// libcuda or libnvrtc cannot be loaded, or no CUDA device is present.
    #[error("CUDA unavailable: {0}")]
    CudaUnavailable(String),
    /// A CUDA driver call failed.
    #[error("CUDA: {0}")]
    Cuda(String),
    /// NVRTC rejected a kernel source; carries the compiler log.
    #[error("NVRTC failed to compile {source_name} for {arch}:\n{log}")]
    Compile {
        source_name: String,
        arch: String,
        log: String,
    },
    /// A launch configuration exceeds the device's limits.
    #[error("launch of {kernel}: {reason}")]
    Launch { kernel: String, reason: String },
    /// libnccl cannot be loaded (or lacks a symbol), so no communicator can be made.
    #[error("NCCL unavailable: {0}")]
    NcclUnavailable(String),
    /// An NCCL call failed.
    #[error("NCCL: {0}")]
    Nccl(String),
    /// Another rank of a collective op refused its own input (its call returned that
    /// error), so no rank ran the op.
    #[error("rank {rank} refused its input, so no rank ran the collective op")]
    PeerRefused { rank: usize },
    /// No WebGPU adapter or device could be had.
    #[error("wgpu unavailable: {0}")]
    WgpuUnavailable(String),
    /// A wgpu call failed (validation, out of memory, device lost, map failure).
    #[error("wgpu: {0}")]
    Wgpu(String),
}

/// Shorthand for `Result<T, losskern::Error>`.
pub type Result<T> = std::result::Result<T, Error>;
