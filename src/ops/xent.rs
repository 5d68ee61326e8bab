//! xent: fused softmax / cross-entropy with entropy, argmax, gradient and the
//! softmax convergence radius rho = pi / Delta, in one pass over the logits.

pub use crate::spec::xent::{
    validate, validate_directional, Directional, DirectionalOutput, DirectionalSpec, Gap,
    GradDType, RadiusOptions, Reduction, RhoReduce, TargetKind, Targets, Xent, XentOptions,
    XentOutput, XentShape, XentSpec,
};

use super::kernels;
use crate::error::Result;
use crate::spec::xent::{bind, bind_directional};

/// Runs the op on the logits' device. Nothing waits for the device: the outputs are
/// tensors whose first readback (or `Device::synchronize`) on this thread waits, and reports a class
/// target out of range as `Error::Target`.
pub fn xent(call: &Xent<'_>) -> Result<XentOutput> {
    kernels(call.logits.device()).xent(&bind(call)?)
}

/// Runs the directional radius on the logits' device.
pub fn directional(call: &Directional<'_>) -> Result<DirectionalOutput> {
    kernels(call.logits.device()).directional(&bind_directional(call)?)
}
