//! energy: energy-score / engression loss and two-sample energy distance, with
//! gradient, never materialising the n x m distance matrix.

pub use losskern_reference::energy::Statistic;

use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::{check_finite, check_same_device, float_dtype, unsupported};

fn check_beta(beta: f64) -> Result<()> {
    check_finite("beta", beta)?;
    if beta > 0.0 && beta <= 2.0 {
        Ok(())
    } else {
        Err(Error::Option(format!("beta must be in (0, 2], got {beta}")))
    }
}

/// Engression / energy-score loss of predictions preds [n, m, d] for targets y [n, d].
#[derive(Clone, Copy, Debug)]
pub struct EnergyScore<'a> {
    pub y: &'a Tensor,
    pub preds: &'a Tensor,
    /// Distances enter as ||.||^beta, beta in (0, 2]; 1 is the energy score.
    pub beta: f64,
    /// Also compute d loss / d preds.
    pub grad: bool,
}

/// A validated energy-score problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnergyScoreSpec {
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub dtype: DType,
    pub beta: f64,
    pub grad: bool,
}

/// Outputs on the inputs' device: the scalars are [1] f32, `grad` is [n, m, d] f32.
#[derive(Debug)]
pub struct EnergyScoreOutput {
    pub term1: Tensor,
    pub term2: Tensor,
    pub loss: Tensor,
    pub grad: Option<Tensor>,
}

pub fn validate_score(call: &EnergyScore<'_>) -> Result<EnergyScoreSpec> {
    let dtype = float_dtype("preds", call.preds)?;
    check_same_device(call.preds, call.y, "y")?;
    let [n, m, d] = *call.preds.shape() else {
        return Err(Error::Shape(format!(
            "preds must be [n, m, d], got {:?}",
            call.preds.shape()
        )));
    };
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::Empty(format!(
            "preds [n = {n}, m = {m}, d = {d}] need every size >= 1"
        )));
    }
    if call.y.shape() != [n, d] || call.y.dtype() != dtype {
        return Err(Error::Shape(format!(
            "y must be [{n}, {d}] {dtype}, got {:?} {}",
            call.y.shape(),
            call.y.dtype()
        )));
    }
    check_beta(call.beta)?;
    Ok(EnergyScoreSpec {
        n,
        m,
        d,
        dtype,
        beta: call.beta,
        grad: call.grad,
    })
}

/// Runs the energy score on the inputs' device.
pub fn energy_score(call: &EnergyScore<'_>) -> Result<EnergyScoreOutput> {
    let spec = validate_score(call)?;
    match call.preds.device() {
        Device::Cpu => crate::cpu::energy::energy_score(&spec, call),
        device => Err(unsupported("energy::energy_score", device)),
    }
}

/// Two-sample energy distance between X [N, d] and Y [M, d].
#[derive(Clone, Copy, Debug)]
pub struct EnergyDistance<'a> {
    pub x: &'a Tensor,
    pub y: &'a Tensor,
    /// Non-negative sample weights [N] f32 (normalised to sum 1); uniform when absent.
    pub weights_x: Option<&'a Tensor>,
    /// Non-negative sample weights [M] f32; uniform when absent.
    pub weights_y: Option<&'a Tensor>,
    pub beta: f64,
    pub statistic: Statistic,
}

/// A validated energy-distance problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnergyDistanceSpec {
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub dtype: DType,
    pub beta: f64,
    pub statistic: Statistic,
}

/// Outputs on the inputs' device, each [1] f32.
#[derive(Debug)]
pub struct EnergyDistanceOutput {
    pub distance: Tensor,
    pub cross: Tensor,
    pub within_x: Tensor,
    pub within_y: Tensor,
}

pub fn validate_distance(call: &EnergyDistance<'_>) -> Result<EnergyDistanceSpec> {
    let dtype = float_dtype("x", call.x)?;
    check_same_device(call.x, call.y, "y")?;
    let (&[n, d], &[m, dy]) = (call.x.shape(), call.y.shape()) else {
        return Err(Error::Shape(format!(
            "x and y must be [N, d] and [M, d], got {:?} and {:?}",
            call.x.shape(),
            call.y.shape()
        )));
    };
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::Empty(format!(
            "x [{n}, {d}] and y [{m}, {dy}] need every size >= 1"
        )));
    }
    if dy != d || call.y.dtype() != dtype {
        return Err(Error::Shape(format!(
            "y must be [M, {d}] {dtype}, got {:?} {}",
            call.y.shape(),
            call.y.dtype()
        )));
    }
    for (name, weights, len) in [
        ("weights_x", call.weights_x, n),
        ("weights_y", call.weights_y, m),
    ] {
        let Some(w) = weights else { continue };
        check_same_device(call.x, w, name)?;
        if w.dtype() != DType::F32 || w.shape() != [len] {
            return Err(Error::Shape(format!(
                "{name} must be [{len}] f32, got {:?} {}",
                w.shape(),
                w.dtype()
            )));
        }
        let values = w.to_vec::<f32>()?;
        if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
            return Err(Error::Option(format!("{name} must be finite and >= 0")));
        }
        if values.iter().all(|v| *v == 0.0) {
            return Err(Error::Option(format!("{name} must not all be 0")));
        }
    }
    check_beta(call.beta)?;
    Ok(EnergyDistanceSpec {
        n,
        m,
        d,
        dtype,
        beta: call.beta,
        statistic: call.statistic,
    })
}

/// Runs the two-sample energy distance on the inputs' device.
pub fn energy_distance(call: &EnergyDistance<'_>) -> Result<EnergyDistanceOutput> {
    let spec = validate_distance(call)?;
    match call.x.device() {
        Device::Cpu => crate::cpu::energy::energy_distance(&spec, call),
        device => Err(unsupported("energy::energy_distance", device)),
    }
}
