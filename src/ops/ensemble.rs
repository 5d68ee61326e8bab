//! ensemble: forward passes of many small MLPs on one shared batch with a fused
//! per-model loss, and loss-landscape scans theta_0 + t d.

pub use crate::spec::ensemble::{
    roughness, validate, validate_landscape, Ensemble, EnsembleOutput, EnsembleSpec, Landscape,
    Perturbation, Precision, Roughness,
};

use super::kernels;
use crate::error::Result;
use crate::spec::ensemble::{bind, bind_landscape};

/// Runs the ensemble on the inputs' device.
pub fn forward(call: &Ensemble<'_>) -> Result<EnsembleOutput> {
    kernels(call.input.device()).forward(&bind(call)?)
}

/// Runs the landscape scan on the inputs' device.
pub fn landscape(call: &Landscape<'_>) -> Result<EnsembleOutput> {
    kernels(call.input.device()).landscape(&bind_landscape(call)?)
}
