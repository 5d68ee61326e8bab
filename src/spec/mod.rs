//! The spec layer: per family, the options, the call (what a user passes), the
//! validated spec (private to the crate: built only by validation), the output types
//! and the family's backend trait. It names no backend; the backends implement its
//! traits and `ops` dispatches to them, so data flows one way:
//! call -> [`Bound`] (validated once, here) -> a backend's trait method -> outputs.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use crate::device::{Backend, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::support::Op;

/// A call that passed validation, with its spec. Only this module's families can build
/// one, so a backend that takes a `Bound` never sees an unvalidated call or a spec that
/// disagrees with its tensors.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Bound<C, S> {
    call: C,
    spec: S,
}

impl<C, S> Bound<C, S> {
    fn new(call: C, spec: S) -> Self {
        Bound { call, spec }
    }

    /// The validated call: its tensors and options.
    pub(crate) fn call(&self) -> &C {
        &self.call
    }

    /// What validation derived from the call: sizes, dtypes, options.
    pub(crate) fn spec(&self) -> &S {
        &self.spec
    }
}

/// What every backend says of itself, so the families' traits can refuse an op by name.
pub(crate) trait BackendKind {
    fn kind(&self) -> Backend;

    /// The error of an op this backend has no kernel for.
    fn unsupported(&self, op: Op) -> Error {
        Error::Unsupported {
            op: op.name(),
            backend: self.kind().name(),
        }
    }
}

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
