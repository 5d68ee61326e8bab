//! CPU backend: widens the inputs to f64, runs the reference, and rounds the outputs
//! to the dtypes the GPU backends write. It is the embedded default with no GPU.
//! Its data is on the host already, so it checks data (class targets) at the call.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use crate::device::{Backend, Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::BackendKind;

/// The CPU's kernels (every family's trait is implemented in its file here).
pub(crate) struct CpuBackend;

impl BackendKind for CpuBackend {
    fn kind(&self) -> Backend {
        Backend::Cpu
    }
}

/// A CPU tensor of `dtype` holding `values` rounded to nearest.
fn tensor(values: &[f64], shape: &[usize], dtype: DType) -> Result<Tensor> {
    Tensor::from_f64(&Device::Cpu, values, shape, dtype)
}

/// A [1] f32 CPU tensor.
fn scalar(value: f64) -> Result<Tensor> {
    tensor(&[value], &[1], DType::F32)
}
