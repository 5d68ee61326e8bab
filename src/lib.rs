//! losskern: hand-written CUDA and WGSL kernels for training diagnostics.

pub mod check;
pub mod cpu;
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
pub mod ops;
pub mod wgpu;

pub use device::{Backend, Device, Tensor};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
