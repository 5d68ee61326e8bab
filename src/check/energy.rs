//! Random energy problems and the family's tolerances.
//!
//! Derivation: each distance ||u|| sums d squares (relative error sum_error(d)), and each
//! term is a mean of up to n m m distances (relative error sum_error(count)); every
//! distance is at most the data's spread S, so a term is within
//! (sum_error(d) + sum_error(count)) (|term| + S) and the loss within the sum of both terms'
//! allowances. The gradient is a mean of unit vectors scaled by ||u||^(beta-1): each element
//! is within (sum_error(d) + sum_error(m)) (|g| + 1 / (n m)).

use losskern_reference::energy as reference;

use crate::check::{report_error, sum_error, CaseInfo, Report, Rng, Verdict};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};

/// A random engression / energy-score problem.
#[derive(Clone, Debug)]
pub struct EnergyScoreCase {
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub dtype: DType,
    pub beta: f64,
    pub grad: bool,
    /// Make two predictions of a sample coincide (the sub-gradient case).
    pub coincide: bool,
    pub seed: u64,
}

pub fn score_cases() -> Vec<EnergyScoreCase> {
    vec![
        EnergyScoreCase {
            n: 8,
            m: 5,
            d: 3,
            dtype: DType::F32,
            beta: 1.0,
            grad: true,
            coincide: true,
            seed: 21,
        },
        EnergyScoreCase {
            n: 33,
            m: 1,
            d: 7,
            dtype: DType::BF16,
            beta: 1.5,
            grad: true,
            coincide: false,
            seed: 22,
        },
        EnergyScoreCase {
            n: 4,
            m: 16,
            d: 65,
            dtype: DType::F16,
            beta: 0.5,
            grad: false,
            coincide: false,
            seed: 23,
        },
    ]
}

/// Spread of the data: the largest distance any term can hold, raised to beta.
fn spread(values: &[f64], beta: f64, d: usize) -> f64 {
    let largest = values.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    (2.0 * largest * (d as f64).sqrt()).powf(beta)
}

pub fn run_score(case: &EnergyScoreCase, device: &Device) -> Report {
    let info = CaseInfo {
        op: "energy::energy_score",
        dtype: case.dtype.name().into(),
        shape: format!("n{} m{} d{}", case.n, case.m, case.d),
    };
    let tolerance = "(k(d) + k(n m m)) (|v| + S)".to_string();
    match compare_score(case, device) {
        Ok(verdict) => verdict.finish(info, device, tolerance),
        Err(e) => report_error(info, device, e),
    }
}

fn compare_score(case: &EnergyScoreCase, device: &Device) -> Result<Verdict> {
    let (n, m, d) = (case.n, case.m, case.d);
    let mut rng = Rng::new(case.seed);
    let y = Tensor::from_f64(&Device::Cpu, &rng.normals(n * d, 1.0), &[n, d], case.dtype)?;
    let mut p = rng.normals(n * m * d, 1.0);
    if case.coincide && m > 1 {
        let (first, rest) = p.split_at_mut(d);
        rest[..d].copy_from_slice(first);
    }
    let preds = Tensor::from_f64(&Device::Cpu, &p, &[n, m, d], case.dtype)?;
    let (y64, p64) = (y.to_f64_vec()?, preds.to_f64_vec()?);
    let (y, preds) = (y.to_device(device)?, preds.to_device(device)?);
    let out = energy::energy_score(&EnergyScore {
        y: &y,
        preds: &preds,
        beta: case.beta,
        grad: case.grad,
    })?;
    let want = reference::energy_score(&reference::EnergyScoreProblem {
        y: &y64,
        preds: &p64,
        n,
        m,
        d,
        beta: case.beta,
        grad: case.grad,
    });
    let k = sum_error(d) + sum_error(n * m * m);
    let s = spread(&p64, case.beta, d).max(spread(&y64, case.beta, d));
    let term = |_: usize, w: f64| k * (w.abs() + s);
    let mut v = Verdict::new();
    v.add("term1", &out.term1.to_f64_vec()?, &[want.term1], term);
    v.add("term2", &out.term2.to_f64_vec()?, &[want.term2], term);
    v.add("loss", &out.loss.to_f64_vec()?, &[want.loss], |_, w| {
        2.0 * k * (w.abs() + s)
    });
    if let (Some(got), Some(want)) = (&out.grad, &want.grad) {
        let kg = sum_error(d) + sum_error(m);
        v.add("grad", &got.to_f64_vec()?, want, |_, w| {
            kg * (w.abs() + 1.0 / (n * m) as f64)
        });
    }
    Ok(v)
}

/// A random two-sample energy-distance problem.
#[derive(Clone, Debug)]
pub struct EnergyDistanceCase {
    pub n: usize,
    pub m: usize,
    pub d: usize,
    pub dtype: DType,
    pub weighted: bool,
    pub beta: f64,
    pub statistic: Statistic,
    pub seed: u64,
}

pub fn distance_cases() -> Vec<EnergyDistanceCase> {
    vec![
        EnergyDistanceCase {
            n: 31,
            m: 17,
            d: 4,
            dtype: DType::F32,
            weighted: false,
            beta: 1.0,
            statistic: Statistic::V,
            seed: 31,
        },
        EnergyDistanceCase {
            n: 9,
            m: 40,
            d: 33,
            dtype: DType::BF16,
            weighted: true,
            beta: 1.0,
            statistic: Statistic::U,
            seed: 32,
        },
        EnergyDistanceCase {
            n: 1,
            m: 5,
            d: 2,
            dtype: DType::F16,
            weighted: false,
            beta: 2.0,
            statistic: Statistic::U,
            seed: 33,
        },
    ]
}

pub fn run_distance(case: &EnergyDistanceCase, device: &Device) -> Report {
    let info = CaseInfo {
        op: "energy::energy_distance",
        dtype: case.dtype.name().into(),
        shape: format!("N{} M{} d{}", case.n, case.m, case.d),
    };
    let tolerance = "(k(d) + k(N M)) (|v| + S)".to_string();
    match compare_distance(case, device) {
        Ok(verdict) => verdict.finish(info, device, tolerance),
        Err(e) => report_error(info, device, e),
    }
}

fn compare_distance(case: &EnergyDistanceCase, device: &Device) -> Result<Verdict> {
    let (n, m, d) = (case.n, case.m, case.d);
    let mut rng = Rng::new(case.seed);
    let x = Tensor::from_f64(&Device::Cpu, &rng.normals(n * d, 1.0), &[n, d], case.dtype)?;
    let mut shifted = rng.normals(m * d, 1.5);
    shifted.iter_mut().for_each(|v| *v += 0.5);
    let y = Tensor::from_f64(&Device::Cpu, &shifted, &[m, d], case.dtype)?;
    let weight = |rng: &mut Rng, len: usize| -> Vec<f64> {
        (0..len)
            .map(|_| f64::from((0.1 + rng.uniform()) as f32))
            .collect()
    };
    let (wx, wy) = if case.weighted {
        (Some(weight(&mut rng, n)), Some(weight(&mut rng, m)))
    } else {
        (None, None)
    };
    let (x64, y64) = (x.to_f64_vec()?, y.to_f64_vec()?);
    let (x, y) = (x.to_device(device)?, y.to_device(device)?);
    let wxt = wx
        .as_ref()
        .map(|w| Tensor::from_f64(device, w, &[n], DType::F32))
        .transpose()?;
    let wyt = wy
        .as_ref()
        .map(|w| Tensor::from_f64(device, w, &[m], DType::F32))
        .transpose()?;
    let out = energy::energy_distance(&EnergyDistance {
        x: &x,
        y: &y,
        weights_x: wxt.as_ref(),
        weights_y: wyt.as_ref(),
        beta: case.beta,
        statistic: case.statistic,
    })?;
    let want = reference::energy_distance(&reference::EnergyDistanceProblem {
        x: &x64,
        y: &y64,
        n,
        m,
        d,
        weights_x: wx.as_deref(),
        weights_y: wy.as_deref(),
        beta: case.beta,
        statistic: case.statistic,
    });
    let k = sum_error(d) + sum_error(n.max(m) * n.max(m));
    let s = spread(&x64, case.beta, d).max(spread(&y64, case.beta, d));
    let term = |_: usize, w: f64| k * (w.abs() + s);
    let mut v = Verdict::new();
    v.add("cross", &out.cross.to_f64_vec()?, &[want.cross], term);
    v.add(
        "within_x",
        &out.within_x.to_f64_vec()?,
        &[want.within_x],
        term,
    );
    v.add(
        "within_y",
        &out.within_y.to_f64_vec()?,
        &[want.within_y],
        term,
    );
    v.add(
        "distance",
        &out.distance.to_f64_vec()?,
        &[want.distance],
        |_, w| 4.0 * k * (w.abs() + s),
    );
    Ok(v)
}
