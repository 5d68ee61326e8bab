//! energy: energy-score / engression loss and two-sample energy distance, with
//! gradient, never materialising the n x m distance matrix.

pub use losskern_reference::energy::Statistic;

use super::{check_finite, check_same_device, float_dtype, BackendKind, Bound};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::support::Op;

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
    pub(crate) n: usize,
    pub(crate) m: usize,
    pub(crate) d: usize,
    pub(crate) dtype: DType,
    pub(crate) beta: f64,
    pub(crate) grad: bool,
}

impl EnergyScoreSpec {
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn beta(&self) -> f64 {
        self.beta
    }

    pub fn grad(&self) -> bool {
        self.grad
    }
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

/// A validated energy-score call, as the backends receive it.
pub(crate) type EnergyScoreCall<'a> = Bound<EnergyScore<'a>, EnergyScoreSpec>;

pub(crate) fn bind_score<'a>(call: &EnergyScore<'a>) -> Result<EnergyScoreCall<'a>> {
    Ok(Bound::new(*call, validate_score(call)?))
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
    /// Also return d distance / dX and d distance / dY.
    pub grad: bool,
}

/// A validated energy-distance problem.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct EnergyDistanceSpec {
    pub(crate) n: usize,
    pub(crate) m: usize,
    pub(crate) d: usize,
    pub(crate) dtype: DType,
    pub(crate) beta: f64,
    pub(crate) statistic: Statistic,
    pub(crate) grad: bool,
}

impl EnergyDistanceSpec {
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn m(&self) -> usize {
        self.m
    }

    pub fn d(&self) -> usize {
        self.d
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn beta(&self) -> f64 {
        self.beta
    }

    pub fn statistic(&self) -> Statistic {
        self.statistic
    }

    /// Whether d distance / dX and d distance / dY are returned.
    pub fn grad(&self) -> bool {
        self.grad
    }
}

/// Outputs on the inputs' device: the distance and its terms, each [1] f32, and with
/// `grad` d distance / dX [N, d] and d distance / dY [M, d] in f32 (sub-gradient 0
/// where two points coincide).
#[derive(Debug)]
pub struct EnergyDistanceOutput {
    pub distance: Tensor,
    pub cross: Tensor,
    pub within_x: Tensor,
    pub within_y: Tensor,
    pub grad_x: Option<Tensor>,
    pub grad_y: Option<Tensor>,
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
    }
    check_beta(call.beta)?;
    Ok(EnergyDistanceSpec {
        n,
        m,
        d,
        dtype,
        beta: call.beta,
        statistic: call.statistic,
        grad: call.grad,
    })
}

/// The check of an energy-distance call that needs the data's values, for a backend
/// that has them on the host (the CPU); a GPU kernel must find it itself and flag it on
/// the device, since validation never waits for a device. Sample weights must be finite,
/// >= 0 and not all 0.
pub(crate) fn check_weight_values(name: &str, values: &[f64]) -> Result<()> {
    if values.iter().any(|v| !v.is_finite() || *v < 0.0) {
        return Err(Error::Option(format!("{name} must be finite and >= 0")));
    }
    if values.iter().all(|v| *v == 0.0) {
        return Err(Error::Option(format!("{name} must not all be 0")));
    }
    Ok(())
}

/// Bits of the status word a GPU energy distance leaves for its weight check: weights_x
/// holds a negative or non-finite value, weights_x is all 0, and the same for weights_y
/// (kernels/energy.cu and shaders/energy.wgsl write the same numbers).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const WEIGHTS_X_BAD: u64 = 1;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const WEIGHTS_X_ZERO: u64 = 2;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const WEIGHTS_Y_BAD: u64 = 4;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const WEIGHTS_Y_ZERO: u64 = 8;

/// The error a non-zero weight status word stands for: the one [`check_weight_values`]
/// gives on the CPU for the first set at fault.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn weight_status_error(status: u64) -> Error {
    let (name, bad, zero) = if status & (WEIGHTS_X_BAD | WEIGHTS_X_ZERO) != 0 {
        ("weights_x", WEIGHTS_X_BAD, WEIGHTS_X_ZERO)
    } else {
        ("weights_y", WEIGHTS_Y_BAD, WEIGHTS_Y_ZERO)
    };
    if status & bad != 0 {
        Error::Option(format!("{name} must be finite and >= 0"))
    } else if status & zero != 0 {
        Error::Option(format!("{name} must not all be 0"))
    } else {
        Error::Option(format!("unknown energy weight status word {status:#x}"))
    }
}

/// How the GPU kernels raise a squared distance s to beta / 2: 1 for beta = 1 (sqrt),
/// 2 for beta = 2 (s itself), 0 for any other beta (a power).
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn power_code(beta: f64) -> u8 {
    if beta == 1.0 {
        1
    } else if beta == 2.0 {
        2
    } else {
        0
    }
}

/// Rows of a pair tile and column tiles per block (workgroup) of the GPU pair kernels,
/// as kernels/energy.cu and shaders/energy.wgsl lay them out.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const PAIR_TILE: usize = 64;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const PAIR_CHUNK: usize = 16;

/// The scratch slots of one pair term of `na` rows against `nb` (one per row tile and
/// column chunk), and its column chunks per row tile.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn pair_slots(na: usize, nb: usize) -> (usize, usize) {
    let chunks = nb.div_ceil(PAIR_TILE).div_ceil(PAIR_CHUNK);
    (na.div_ceil(PAIR_TILE) * chunks, chunks)
}

/// A validated energy-distance call, as the backends receive it.
pub(crate) type EnergyDistanceCall<'a> = Bound<EnergyDistance<'a>, EnergyDistanceSpec>;

pub(crate) fn bind_distance<'a>(call: &EnergyDistance<'a>) -> Result<EnergyDistanceCall<'a>> {
    Ok(Bound::new(*call, validate_distance(call)?))
}

/// The energy family's kernels on one backend; an op without a kernel there is refused.
pub(crate) trait EnergyKernels: BackendKind {
    fn energy_score(&self, _call: &EnergyScoreCall<'_>) -> Result<EnergyScoreOutput> {
        Err(self.unsupported(Op::EnergyScore))
    }

    fn energy_distance(&self, _call: &EnergyDistanceCall<'_>) -> Result<EnergyDistanceOutput> {
        Err(self.unsupported(Op::EnergyDistance))
    }
}
