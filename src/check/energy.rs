//! Random energy problems and the family's tolerances.
//!
//! Derivation, per output from the data: every term is a same-signed sum of powers of
//! distances, so its error is relative. A distance ||a - b|| rounds each difference once
//! (u relative to the norm), sums d squares (k_d) and takes a root (half of that, plus 2u);
//! its power beta scales the relative error by beta and adds 4u:
//! r_D = beta (2u + k_d / 2 + 2u) + 4u. A mean of `count` such terms with constant or
//! normalised weights adds k_count, and each weight normalisation k_len + u. The loss and
//! the distance combine their terms: the terms' allowances add, plus u |value| for the
//! combination. The score's gradient element is a signed sum of m + 1 terms
//! c beta ||u||^(beta - 2) (a - b): each within r_g = |beta - 2| (2u + k_d / 2) + 8u relative,
//! the sum k_{m+1} of the sum of their magnitudes G (computed here from the inputs).
//! The distance's gradient element is the same kind of sum over the N + M points of both
//! sets, each term also carrying the weight normalisations: k_{N+M} and k_N + k_M of G.

use losskern_reference::energy as reference;

use crate::check::{sum_error, widen, CaseInfo, Expected, Output, Rng, U};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use crate::support::Op;

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
    /// Values are offset + scale * N(0, 1): a large offset with a small scale is where a
    /// distance taken from norms and dot products would cancel.
    pub offset: f64,
    pub scale: f64,
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
            offset: 0.0,
            scale: 1.0,
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
            offset: 0.0,
            scale: 1.0,
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
            offset: 0.0,
            scale: 1.0,
            seed: 23,
        },
        // More than one 512-wide batch of k per row, at an offset where norms would cancel.
        EnergyScoreCase {
            n: 2,
            m: 600,
            d: 5,
            dtype: DType::F32,
            beta: 1.0,
            grad: true,
            coincide: true,
            offset: 1e3,
            scale: 0.01,
            seed: 24,
        },
        EnergyScoreCase {
            n: 3,
            m: 3,
            d: 4100,
            dtype: DType::F32,
            beta: 1.25,
            grad: true,
            coincide: false,
            offset: 0.0,
            scale: 1.0,
            seed: 25,
        },
    ]
}

/// The relative error of one distance raised to beta, in d dimensions.
fn distance_error(d: usize, beta: f64) -> f64 {
    beta * (4.0 * U + sum_error(d) / 2.0) + 4.0 * U
}

impl EnergyScoreCase {
    pub(crate) fn info(&self) -> CaseInfo {
        CaseInfo {
            op: Op::EnergyScore,
            dtype: self.dtype.name().into(),
            shape: format!("n{} m{} d{}", self.n, self.m, self.d),
            tolerance: "(r_D + k(n m m)) |term|; grad (r_g + k(m+1)) G",
        }
    }

    /// y [n, d] and the predictions [n, m, d], rounded to the dtype, on the CPU.
    fn draw(&self) -> Result<(Tensor, Tensor)> {
        let (n, m, d) = (self.n, self.m, self.d);
        let mut rng = Rng::new(self.seed);
        let mut draw = |len: usize| -> Vec<f64> {
            let mut v = rng.normals(len, self.scale);
            v.iter_mut().for_each(|x| *x += self.offset);
            v
        };
        let y = Tensor::from_f64(&Device::Cpu, &draw(n * d), &[n, d], self.dtype)?;
        let mut p = draw(n * m * d);
        if self.coincide && m > 1 {
            let (first, rest) = p.split_at_mut(d);
            rest[..d].copy_from_slice(first);
        }
        let preds = Tensor::from_f64(&Device::Cpu, &p, &[n, m, d], self.dtype)?;
        Ok((y, preds))
    }
}

pub fn score_outputs(case: &EnergyScoreCase, device: &Device) -> Result<Vec<Output>> {
    let (y, preds) = case.draw()?;
    let (y, preds) = (y.to_device(device)?, preds.to_device(device)?);
    let out = energy::energy_score(&EnergyScore {
        y: &y,
        preds: &preds,
        beta: case.beta,
        grad: case.grad,
    })?;
    let mut named = vec![
        ("term1", &out.term1),
        ("term2", &out.term2),
        ("loss", &out.loss),
    ];
    named.extend(out.grad.as_ref().map(|g| ("grad", g)));
    widen(&named)
}

/// out += |c d||a - b||^beta / da| per element (0 where a = b).
fn add_magnitude(out: &mut [f64], c: f64, a: &[f64], b: &[f64], beta: f64) {
    let norm = a
        .iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt();
    if norm > 0.0 {
        let factor = c * beta * norm.powf(beta - 2.0);
        for (o, (x, y)) in out.iter_mut().zip(a.iter().zip(b)) {
            *o += factor * (x - y).abs();
        }
    }
}

/// G per gradient element: the sum of the magnitudes of the terms the element sums.
fn gradient_magnitudes(case: &EnergyScoreCase, y: &[f64], p: &[f64]) -> Vec<f64> {
    let (n, m, d, beta) = (case.n, case.m, case.d, case.beta);
    let c1 = 1.0 / (n * m) as f64;
    let c2 = if m < 2 {
        0.0
    } else {
        (m as f64 / (m - 1) as f64) / (n * m * m) as f64
    };
    let mut g = vec![0.0; n * m * d];
    let add = |out: &mut [f64], c: f64, a: &[f64], b: &[f64]| add_magnitude(out, c, a, b, beta);
    for i in 0..n {
        for j in 0..m {
            let at = (i * m + j) * d;
            let a = &p[at..at + d];
            let out = &mut g[at..at + d];
            add(out, c1, a, &y[i * d..(i + 1) * d]);
            for k in 0..m {
                add(out, c2, a, &p[(i * m + k) * d..(i * m + k + 1) * d]);
            }
        }
    }
    g
}

pub fn score_expected(case: &EnergyScoreCase) -> Result<Vec<Expected>> {
    let (n, m, d) = (case.n, case.m, case.d);
    let (y, preds) = case.draw()?;
    let (y64, p64) = (y.to_f64_vec()?, preds.to_f64_vec()?);
    let want = reference::energy_score(&reference::EnergyScoreProblem {
        y: &y64,
        preds: &p64,
        n,
        m,
        d,
        beta: case.beta,
        grad: case.grad,
    });
    let r = distance_error(d, case.beta) + sum_error(n * m * m) + 2.0 * U;
    let (t1, t2) = (want.term1.abs(), want.term2.abs());
    let mut e = vec![
        Expected::within("term1", vec![want.term1], |_, w| r * w.abs()),
        Expected::within("term2", vec![want.term2], |_, w| r * w.abs()),
        Expected::within("loss", vec![want.loss], |_, w| r * (t1 + t2) + U * w.abs()),
    ];
    if let Some(grad) = want.grad {
        let magnitude = gradient_magnitudes(case, &y64, &p64);
        let r_g =
            (case.beta - 2.0).abs() * (2.0 * U + sum_error(d) / 2.0) + 8.0 * U + sum_error(m + 1);
        e.push(Expected::within("grad", grad, |i, w| {
            r_g * magnitude[i] + U * w.abs()
        }));
    }
    Ok(e)
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
    pub grad: bool,
    /// X is offset + scale * N(0, 1), Y offset + scale * (0.5 + 1.5 N(0, 1)).
    pub offset: f64,
    pub scale: f64,
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
            grad: true,
            offset: 0.0,
            scale: 1.0,
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
            grad: true,
            offset: 0.0,
            scale: 1.0,
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
            grad: true,
            offset: 0.0,
            scale: 1.0,
            seed: 33,
        },
        // Several 16-tile column chunks within X, and d past a 32-wide stage.
        EnergyDistanceCase {
            n: 1100,
            m: 70,
            d: 3,
            dtype: DType::F32,
            weighted: true,
            beta: 1.0,
            statistic: Statistic::V,
            grad: true,
            offset: 1e3,
            scale: 0.01,
            seed: 34,
        },
        EnergyDistanceCase {
            n: 70,
            m: 3,
            d: 4096,
            dtype: DType::BF16,
            weighted: false,
            beta: 0.75,
            statistic: Statistic::U,
            grad: true,
            offset: 0.0,
            scale: 1.0,
            seed: 35,
        },
    ]
}

impl EnergyDistanceCase {
    pub(crate) fn info(&self) -> CaseInfo {
        CaseInfo {
            op: Op::EnergyDistance,
            dtype: self.dtype.name().into(),
            shape: format!("N{} M{} d{}", self.n, self.m, self.d),
            tolerance: "(r_D + k(pairs) + k(N) + k(M)) |term|; grad (r_g + k(N+M)) G",
        }
    }

    /// x [N, d], y [M, d] (rounded to the dtype, on the CPU) and the optional weights.
    #[allow(clippy::type_complexity)]
    fn draw(&self) -> Result<(Tensor, Tensor, Option<Vec<f64>>, Option<Vec<f64>>)> {
        let (n, m, d) = (self.n, self.m, self.d);
        let mut rng = Rng::new(self.seed);
        let (offset, scale) = (self.offset, self.scale);
        let mut x = rng.normals(n * d, scale);
        x.iter_mut().for_each(|v| *v += offset);
        let x = Tensor::from_f64(&Device::Cpu, &x, &[n, d], self.dtype)?;
        let mut shifted = rng.normals(m * d, 1.5 * scale);
        shifted.iter_mut().for_each(|v| *v += offset + 0.5 * scale);
        let y = Tensor::from_f64(&Device::Cpu, &shifted, &[m, d], self.dtype)?;
        let weight = |rng: &mut Rng, len: usize| -> Vec<f64> {
            (0..len)
                .map(|_| f64::from((0.1 + rng.uniform()) as f32))
                .collect()
        };
        let (wx, wy) = if self.weighted {
            (Some(weight(&mut rng, n)), Some(weight(&mut rng, m)))
        } else {
            (None, None)
        };
        Ok((x, y, wx, wy))
    }
}

pub fn distance_outputs(case: &EnergyDistanceCase, device: &Device) -> Result<Vec<Output>> {
    let (n, m) = (case.n, case.m);
    let (x, y, wx, wy) = case.draw()?;
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
        grad: case.grad,
    })?;
    let mut named = vec![
        ("cross", &out.cross),
        ("within_x", &out.within_x),
        ("within_y", &out.within_y),
        ("distance", &out.distance),
    ];
    named.extend(out.grad_x.as_ref().map(|g| ("grad_x", g)));
    named.extend(out.grad_y.as_ref().map(|g| ("grad_y", g)));
    widen(&named)
}

/// A set of the distance's gradient magnitudes: its points and normalised weights.
struct MagnitudeSet<'a> {
    points: &'a [f64],
    weights: Vec<f64>,
    /// The within-set divisor: 1 (V), the off-diagonal pair weight (U), 0: no term.
    pair_weight: f64,
}

impl<'a> MagnitudeSet<'a> {
    fn new(points: &'a [f64], raw: Option<&[f64]>, len: usize, statistic: Statistic) -> Self {
        let weights: Vec<f64> = match raw {
            Some(w) => {
                let total: f64 = w.iter().sum();
                w.iter().map(|v| v / total).collect()
            }
            None => vec![1.0 / len as f64; len],
        };
        let pair_weight = match statistic {
            Statistic::V => 1.0,
            Statistic::U => 1.0 - weights.iter().map(|w| w * w).sum::<f64>(),
        };
        MagnitudeSet {
            points,
            weights,
            pair_weight,
        }
    }
}

/// G per element of d distance / d(own points): the magnitudes of the cross terms
/// against `other` and of the within terms.
fn distance_gradient_magnitudes(
    own: &MagnitudeSet<'_>,
    other: &MagnitudeSet<'_>,
    d: usize,
    beta: f64,
) -> Vec<f64> {
    let mut g = vec![0.0; own.weights.len() * d];
    fn point<'p>(set: &MagnitudeSet<'p>, i: usize, d: usize) -> &'p [f64] {
        &set.points[i * d..(i + 1) * d]
    }
    let add = |out: &mut [f64], c: f64, a: &[f64], b: &[f64]| add_magnitude(out, c, a, b, beta);
    for i in 0..own.weights.len() {
        let out = &mut g[i * d..(i + 1) * d];
        for j in 0..other.weights.len() {
            let c = 2.0 * own.weights[i] * other.weights[j];
            add(out, c, point(own, i, d), point(other, j, d));
        }
        if own.pair_weight > 0.0 {
            for k in 0..own.weights.len() {
                let c = 2.0 * own.weights[i] * own.weights[k] / own.pair_weight;
                add(out, c, point(own, i, d), point(own, k, d));
            }
        }
    }
    g
}

pub fn distance_expected(case: &EnergyDistanceCase) -> Result<Vec<Expected>> {
    let (n, m, d) = (case.n, case.m, case.d);
    let (x, y, wx, wy) = case.draw()?;
    let (x64, y64) = (x.to_f64_vec()?, y.to_f64_vec()?);
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
        grad: case.grad,
    });
    // Weights: each normalised (k_len + u) and multiplied in pairs (3u); a U statistic
    // divides by a pair-weight sum (k_{len^2} + u).
    let normalise = |len: usize| sum_error(len) + U;
    let r_d = distance_error(d, case.beta) + 3.0 * U;
    let cross_error = r_d + sum_error(n * m) + normalise(n) + normalise(m);
    let within_error = |len: usize| r_d + 2.0 * (sum_error(len * len) + normalise(len));
    let (c, wxa, wya) = (want.cross.abs(), want.within_x.abs(), want.within_y.abs());
    let mut e = vec![
        Expected::within("cross", vec![want.cross], |_, w| cross_error * w.abs()),
        Expected::within("within_x", vec![want.within_x], |_, w| {
            within_error(n) * w.abs()
        }),
        Expected::within("within_y", vec![want.within_y], |_, w| {
            within_error(m) * w.abs()
        }),
        Expected::within("distance", vec![want.distance], |_, w| {
            2.0 * cross_error * c
                + within_error(n) * wxa
                + within_error(m) * wya
                + 2.0 * U * w.abs()
        }),
    ];
    if let (Some(grad_x), Some(grad_y)) = (want.grad_x, want.grad_y) {
        let set_x = MagnitudeSet::new(&x64, wx.as_deref(), n, case.statistic);
        let set_y = MagnitudeSet::new(&y64, wy.as_deref(), m, case.statistic);
        let r_g = (case.beta - 2.0).abs() * (2.0 * U + sum_error(d) / 2.0)
            + 8.0 * U
            + sum_error(n + m)
            + normalise(n)
            + normalise(m);
        for (name, grad, own, other) in [
            ("grad_x", grad_x, &set_x, &set_y),
            ("grad_y", grad_y, &set_y, &set_x),
        ] {
            let magnitude = distance_gradient_magnitudes(own, other, d, case.beta);
            e.push(Expected::within(name, grad, move |i, w| {
                r_g * magnitude[i] + U * w.abs()
            }));
        }
    }
    Ok(e)
}
