//! energy: energy-score / engression loss and two-sample energy distance, with
//! gradient, never materialising the n x m distance matrix.

pub use crate::spec::energy::{
    validate_distance, validate_score, EnergyDistance, EnergyDistanceOutput, EnergyDistanceSpec,
    EnergyScore, EnergyScoreOutput, EnergyScoreSpec, Statistic,
};

use super::kernels;
use crate::error::Result;
use crate::spec::energy::{bind_distance, bind_score};

/// Runs the energy score on the inputs' device.
pub fn energy_score(call: &EnergyScore<'_>) -> Result<EnergyScoreOutput> {
    kernels(call.preds.device()).energy_score(&bind_score(call)?)
}

/// Runs the two-sample energy distance on the inputs' device.
pub fn energy_distance(call: &EnergyDistance<'_>) -> Result<EnergyDistanceOutput> {
    kernels(call.x.device()).energy_distance(&bind_distance(call)?)
}
