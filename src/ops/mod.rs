//! One module per family: options, validation (done once, here), output types and
//! dispatch to the backend of the inputs' device. Backends never re-validate.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};

/// The tensor's dtype when it is a float dtype (f32, f16, bf16).
fn float_dtype(what: &str, tensor: &Tensor) -> Result<DType> {
    if tensor.dtype().is_kernel_float() {
        Ok(tensor.dtype())
    } else {
        Err(Error::DType(format!(
            "{what} must be f32, f16 or bf16, got {}",
            tensor.dtype()
        )))
    }
}

fn check_finite(name: &str, value: f64) -> Result<()> {
    if value.is_finite() {
        Ok(())
    } else {
        Err(Error::Option(format!("{name} must be finite, got {value}")))
    }
}

fn check_same_device(anchor: &Tensor, other: &Tensor, what: &str) -> Result<()> {
    if anchor.device() == other.device() {
        Ok(())
    } else {
        Err(Error::DeviceMismatch(format!(
            "{what} live on {} but the first input lives on {}",
            other.device().name(),
            anchor.device().name()
        )))
    }
}

/// The error for an op that has no kernel on this device's backend yet.
fn unsupported(op: &'static str, device: &crate::device::Device) -> Error {
    Error::Unsupported {
        op,
        backend: device.backend().name(),
    }
}
