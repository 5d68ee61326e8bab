//! Random xent problems and the family's tolerances.
//!
//! Every allowance is per element, from the inputs and the reference's outputs in f64
//! (`RowData`, `Bounds`), never from a backend's outputs. u = 2^-24 is the unit roundoff of
//! f32, k_n = `sum_error(n)` the relative error of an n-term f32 sum (the constant part of
//! each term's exp rounding included). Per row, with x = z / T, m = max x, p = softmax(x),
//! log s = lse - m, and the data moments A = sum p_k |x_k - m|, B = sum p_k (x_k - m)^2:
//! - x = z * fl(1/T) is within (2u + u^2) |x| (the reciprocal and the product round once
//!   each); the max of such values is within that of |m|, so max, min and the top-2 gap
//!   (a difference of two of them, rounded once more) are within
//!   (2u + u^2)(|a| + |b|) + u |gap|; a zero gap is two equal values, which round alike.
//! - lse = log sum exp(x_k) moves by sum p_k dx_k <= 2u (|m| + A) under the rounding of x;
//!   each shifted argument x_k - m rounds (u |x_k - m|) and its exp is off by
//!   (6 + 4 |x_k - m|) u (Vulkan's bound for exp, looser than CUDA's), weighted by p_k;
//!   the sum adds k_V, log adds 2^-21 + 6u log s, the final add u |lse|:
//!   E_lse = 2u |m| + 12u A + 6u log s + 8u + k_V + u |lse|.
//! - entropy = log s + A. log s has E_lse's terms without the cancelling shift of m;
//!   A = -sum p_k d_k moves by the perturbations dd_k of d_k = x_k - m, which are at most
//!   2u |m| + k_V + 12u |d_k| per term, through p as well: |dA| <= sum p (|d| + A) |dd|:
//!   E_H = (2u |m| + k_V)(1 + 4A) + 13u A + 24u B + 6u log s + 8u + u |H|.
//! - loss_i = sum_k c_k (lse - x_k) + z_loss lse^2 with c the target coefficients (weights,
//!   smoothing), C = sum c, L1 = sum c_k |x_k|, ce = sum c_k (lse - x_k):
//!   E_loss = C E_lse + (2u + k_V) L1 + 3u ce + 2 z_loss (|lse| E_lse + u lse^2) + u |loss|.
//!   An ignored row's loss is exactly 0.
//! - grad_k = (scale / T)((C + 2 z_loss lse) p_k - c_k): p_k = exp(x_k - lse) has relative
//!   error r_k = 2u |x_k| + E_lse + (6 + 5 |x_k - lse|) u:
//!   E_g = (scale / T)(|C + 2 z lse| (p_k r_k + 3u p_k) + 2 z p_k E_lse + 3u c_k)
//!   + (k_B + 4u) |g| (the scale's batch sum and the multiplies)
//!   + 2 u_out |g| + max(F, the output dtype's smallest subnormal). Ignored rows are 0.
//! - F = N (1 + scale)(1 + 1 / T)(1 + |C + 2 z lse|), N the smallest normal f32: WGSL lets
//!   an implementation flush f32 subnormals to 0 (the NVIDIA Vulkan driver does: on the
//!   H200, grads of 1e-38 to 5e-38 came out 0), so any product on the way (p_k, times its
//!   coefficient, times 1 / T, times the scale) may lose up to N, scaled by what follows.
//! - rho = pi / (Delta + eps): rho (E_Delta / (Delta + eps) + 5u); a mean of Delta adds
//!   k_B times the mean, a max takes the largest row allowance.
//! - The reduced loss: the rows' allowances summed, plus k_B times the sum of |loss_i|,
//!   divided by the mean's denominator (whose own sum adds k_B + 2u relative).

use losskern_reference::xent as reference;

use crate::check::{
    report, report_error, sum_error, widen, CaseInfo, Expected, Output, Report, Rng, U,
};
use crate::device::{Backend, Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::xent::{
    self, Directional, GradDType, Reduction, RhoReduce, Targets, Xent, XentOptions,
};
use crate::support::Op;

/// Special values planted in the logits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Special {
    /// Plain normals.
    None,
    /// The row maximum duplicated elsewhere in every row, and one row of equal logits.
    Ties,
    /// About a tenth of the entries of every other row set to -inf (masked classes).
    NegInf,
    /// One entry of one row set to NaN: only that row may become NaN.
    NanRow,
}

/// A random cross-entropy problem.
#[derive(Clone, Debug)]
pub struct XentCase {
    pub batch: usize,
    pub classes: usize,
    /// Row stride >= classes (padding filled with garbage the op must not read).
    pub row_stride: usize,
    pub dtype: DType,
    pub soft_targets: bool,
    pub class_weights: bool,
    /// Fraction of rows whose class target is ignore_index.
    pub ignored_fraction: f64,
    pub options: XentOptions,
    pub grad_dtype: GradDType,
    /// Standard deviation of the logits.
    pub magnitude: f64,
    pub special: Special,
    pub seed: u64,
}

impl XentCase {
    /// A plain case: class targets, default options.
    pub fn new(batch: usize, classes: usize, dtype: DType, seed: u64) -> Self {
        XentCase {
            batch,
            classes,
            row_stride: classes,
            dtype,
            soft_targets: false,
            class_weights: false,
            ignored_fraction: 0.0,
            options: XentOptions::default(),
            grad_dtype: GradDType::Logits,
            magnitude: 3.0,
            special: Special::None,
            seed,
        }
    }

    pub(crate) fn info(&self) -> CaseInfo {
        let targets = if self.soft_targets { "soft" } else { "class" };
        CaseInfo {
            op: Op::Xent,
            dtype: self.dtype.name().to_string(),
            shape: format!(
                "{}x{} {targets} {:?}",
                self.batch, self.classes, self.special
            ),
            tolerance: TOLERANCE,
        }
    }
}

/// The inputs of a case, rounded to their dtypes, on the host and on the device.
pub struct XentInputs {
    pub logits: Tensor,
    pub targets: Tensor,
    pub class_weights: Option<Tensor>,
    host: Host,
}

/// The inputs of a case on the host, widened to f64.
struct Host {
    logits: Vec<f64>,
    classes: Vec<i64>,
    soft: Vec<f64>,
    weights: Option<Vec<f64>>,
}

impl XentInputs {
    /// Draws the inputs of `case` and uploads them to `device`.
    pub fn draw(case: &XentCase, device: &Device) -> Result<XentInputs> {
        let mut rng = Rng::new(case.seed);
        let (b, v, s) = (case.batch, case.classes, case.row_stride);
        let mut z = rng.normals(b * s, case.magnitude);
        for row in 0..b {
            let r = &mut z[row * s..row * s + v];
            match case.special {
                Special::None => {}
                Special::Ties => {
                    if row == 0 {
                        r.fill(1.5);
                    } else if v > 1 {
                        let top = r.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                        r[rng.below(v)] = top;
                    }
                }
                Special::NegInf if row % 2 == 1 => {
                    for value in r.iter_mut() {
                        if rng.uniform() < 0.1 {
                            *value = f64::NEG_INFINITY;
                        }
                    }
                }
                Special::NegInf => {}
                Special::NanRow => {
                    if row == b / 2 {
                        r[rng.below(v)] = f64::NAN;
                    }
                }
            }
        }
        let logits = Tensor::from_f64(&Device::Cpu, &z, &[b, s], case.dtype)?;
        let logits_f64 = logits.to_f64_vec()?;
        let logits = logits.to_device(device)?;
        let mut classes_f64 = Vec::new();
        let mut soft_f64 = Vec::new();
        let targets = if case.soft_targets {
            for _ in 0..b {
                let raw = rng.normals(v, 1.0);
                let total: f64 = raw.iter().map(|x| x.exp()).sum();
                soft_f64.extend(raw.iter().map(|x| f64::from((x.exp() / total) as f32)));
            }
            Tensor::from_f64(device, &soft_f64, &[b, v], DType::F32)?
        } else {
            classes_f64 = (0..b)
                .map(|_| {
                    if rng.uniform() < case.ignored_fraction {
                        case.options.ignore_index
                    } else {
                        rng.below(v) as i64
                    }
                })
                .collect();
            Tensor::from_slice(device, &classes_f64, &[b])?
        };
        let weights_f64 = case.class_weights.then(|| {
            (0..v)
                .map(|_| f64::from((0.5 + 1.5 * rng.uniform()) as f32))
                .collect::<Vec<f64>>()
        });
        let class_weights = weights_f64
            .as_ref()
            .map(|w| Tensor::from_f64(device, w, &[v], DType::F32))
            .transpose()?;
        Ok(XentInputs {
            logits,
            targets,
            class_weights,
            host: Host {
                logits: logits_f64,
                classes: classes_f64,
                soft: soft_f64,
                weights: weights_f64,
            },
        })
    }

    /// The op call on these inputs.
    pub fn call<'a>(&'a self, case: &XentCase) -> Xent<'a> {
        Xent {
            logits: &self.logits,
            targets: if case.soft_targets {
                Targets::Soft(&self.targets)
            } else {
                Targets::Classes(&self.targets)
            },
            class_weights: self.class_weights.as_ref(),
            classes: Some(case.classes),
            options: case.options,
            grad_dtype: case.grad_dtype,
        }
    }

    /// The reference outputs on the same (rounded) inputs.
    pub fn reference(&self, case: &XentCase) -> reference::XentOutput {
        reference::xent(&reference::XentProblem {
            logits: &self.host.logits,
            batch: case.batch,
            classes: case.classes,
            row_stride: case.row_stride,
            targets: if case.soft_targets {
                reference::Targets::Soft(&self.host.soft)
            } else {
                reference::Targets::Classes(&self.host.classes)
            },
            class_weights: self.host.weights.as_deref(),
            options: case.options,
        })
    }
}

const TOLERANCE: &str =
    "per row: u(2|m| + 12A + 6 log s) + k_V (+ moments for H, c for loss, p for grad)";

/// The per-row data the allowances are formed from, in f64 from the inputs and reference.
struct RowData {
    /// m, lse and log s = lse - m (NaN on an invalid row).
    max: f64,
    lse: f64,
    log_s: f64,
    /// A = sum p_k |x_k - m| and B = sum p_k (x_k - m)^2.
    a: f64,
    b: f64,
    /// The target coefficients c_k of -log p_k (None for an ignored row) and their sum C.
    c: Option<Vec<f64>>,
    total: f64,
}

/// The allowances of one xent problem: one place for every output's bound (module doc).
struct Bounds<'a> {
    batch: usize,
    classes: usize,
    row_stride: usize,
    options: XentOptions,
    logits: &'a [f64],
    rows: Vec<RowData>,
    /// k_V and k_B.
    row_sum: f64,
    batch_sum: f64,
}

/// The coefficient of -log p_k in loss_i for every k, as the reference forms them.
fn coefficients(case: &XentCase, host: &Host, row: usize) -> Option<Vec<f64>> {
    let (v, eps) = (case.classes, case.options.label_smoothing);
    let weight = |k: usize| host.weights.as_ref().map_or(1.0, |w| w[k]);
    if case.soft_targets {
        let q = &host.soft[row * v..(row + 1) * v];
        return Some(
            (0..v)
                .map(|k| weight(k) * ((1.0 - eps) * q[k] + eps / v as f64))
                .collect(),
        );
    }
    let y = host.classes[row];
    if y == case.options.ignore_index {
        return None;
    }
    let mut c: Vec<f64> = (0..v).map(|k| eps / v as f64 * weight(k)).collect();
    c[y as usize] += (1.0 - eps) * weight(y as usize);
    Some(c)
}

impl<'a> Bounds<'a> {
    fn new(case: &XentCase, host: &'a Host, want: &reference::XentOutput) -> Self {
        let t = case.options.temperature;
        let rows = (0..case.batch)
            .map(|i| {
                let row = &host.logits[i * case.row_stride..i * case.row_stride + case.classes];
                let (max, lse) = (want.max[i], want.lse[i]);
                let (mut a, mut b) = (0.0, 0.0);
                for &z in row {
                    let x = z / t;
                    if x > f64::NEG_INFINITY {
                        let p = (x - lse).exp();
                        a += p * (max - x);
                        b += p * (max - x) * (max - x);
                    }
                }
                let c = coefficients(case, host, i);
                RowData {
                    total: c.as_ref().map_or(0.0, |c| c.iter().sum()),
                    c,
                    max,
                    lse,
                    log_s: lse - max,
                    a,
                    b,
                }
            })
            .collect();
        Bounds {
            batch: case.batch,
            classes: case.classes,
            row_stride: case.row_stride,
            options: case.options,
            logits: &host.logits,
            rows,
            row_sum: sum_error(case.classes),
            batch_sum: sum_error(case.batch),
        }
    }

    fn x(&self, row: usize, k: usize) -> f64 {
        self.logits[row * self.row_stride + k] / self.options.temperature
    }

    fn lse(&self, row: usize) -> f64 {
        let r = &self.rows[row];
        2.0 * U * r.max.abs()
            + 12.0 * U * r.a
            + 6.0 * U * r.log_s
            + 8.0 * U
            + self.row_sum
            + U * r.lse.abs()
    }

    fn entropy(&self, row: usize, want: f64) -> f64 {
        let r = &self.rows[row];
        (2.0 * U * r.max.abs() + self.row_sum) * (1.0 + 4.0 * r.a)
            + 13.0 * U * r.a
            + 24.0 * U * r.b
            + 6.0 * U * r.log_s
            + 8.0 * U
            + U * want.abs()
    }

    fn loss_row(&self, row: usize, want: f64) -> f64 {
        let Some(c) = &self.rows[row].c else {
            return 0.0;
        };
        let (lse, e_lse, z) = (self.rows[row].lse, self.lse(row), self.options.z_loss);
        let (mut total, mut l1, mut ce) = (0.0, 0.0, 0.0);
        for (k, &ck) in c.iter().enumerate() {
            // A zero coefficient on a masked class (x = -inf) adds nothing, as in the reference.
            if ck != 0.0 {
                let x = self.x(row, k);
                total += ck;
                l1 += ck * x.abs();
                ce += ck * (lse - x);
            }
        }
        total * e_lse
            + (2.0 * U + self.row_sum) * l1
            + 3.0 * U * ce
            + 2.0 * z * (lse.abs() * e_lse + U * lse * lse)
            + U * want.abs()
    }

    /// max, min, top-2 gap and Delta: x rounds once in the reciprocal and once in the product.
    fn rounded(value: f64) -> f64 {
        (2.0 * U + U * U) * value.abs()
    }

    fn top2_gap(&self, row: usize, gap: f64) -> f64 {
        if self.classes == 1 || gap == 0.0 {
            return 0.0;
        }
        let m = self.rows[row].max;
        Self::rounded(m) + Self::rounded(m - gap) + U * gap.abs()
    }

    fn delta(&self, row: usize, want: &reference::XentOutput) -> f64 {
        // A zero Delta is a difference of two equal values, which round alike: exactly 0.
        if want.delta[row] == 0.0 {
            return 0.0;
        }
        match self.options.radius.gap {
            reference::Gap::MaxMin => {
                Self::rounded(want.max[row])
                    + Self::rounded(want.min[row])
                    + U * want.delta[row].abs()
            }
            reference::Gap::Top2 => self.top2_gap(row, want.top2_gap[row]),
        }
    }

    fn rho(&self, delta: f64, delta_error: f64, rho: f64) -> f64 {
        // An infinite Delta gives rho = 0 exactly, and an exact one (a zero Delta, whose
        // delta + eps may be 0) leaves only the rounding of rho: no error to propagate.
        let relative = if delta.is_finite() && delta_error > 0.0 {
            delta_error / (delta + self.options.radius.eps)
        } else {
            0.0
        };
        rho * (relative + 5.0 * U)
    }

    /// The reduced loss from the rows' allowances; `denominator` is the mean's, else None.
    fn loss(&self, per_row: &[f64], denominator: Option<f64>, want: f64) -> f64 {
        let rows: f64 = (0..self.batch).map(|i| self.loss_row(i, per_row[i])).sum();
        let magnitude: f64 = per_row.iter().map(|l| l.abs()).sum();
        let summed = rows + self.batch_sum * magnitude;
        match denominator {
            Some(d) => summed / d + (self.batch_sum + 2.0 * U) * want.abs(),
            None => summed + U * want.abs(),
        }
    }

    /// Element i = row * V + k of the gradient.
    fn grad(&self, i: usize, want: f64, scale: f64, out: DType) -> f64 {
        let (row, k) = (i / self.classes, i % self.classes);
        let r = &self.rows[row];
        let Some(c) = &r.c else {
            return 0.0;
        };
        let z = self.options.z_loss;
        let x = self.x(row, k);
        let weight = (r.total + 2.0 * z * r.lse).abs();
        let e_lse = self.lse(row);
        let p = if x > f64::NEG_INFINITY {
            (x - r.lse).exp()
        } else {
            0.0
        };
        let relative = if p > 0.0 {
            2.0 * U * x.abs() + e_lse + (6.0 + 5.0 * (x - r.lse).abs()) * U
        } else {
            0.0
        };
        let inv_t = 1.0 / self.options.temperature;
        let kernel = scale
            * inv_t
            * (weight * (p * relative + 3.0 * U * p) + 2.0 * z * p * e_lse + 3.0 * U * c[k]);
        // Any product on the way (p, its coefficient, 1 / T, the scale) may flush to 0
        // below N, and the later factors scale what was lost.
        let flushed = f64::from(f32::MIN_POSITIVE) * (1.0 + scale) * (1.0 + inv_t) * (1.0 + weight);
        kernel
            + (self.batch_sum + 4.0 * U) * want.abs()
            + 2.0 * out.unit_roundoff() * want.abs()
            + out.smallest_subnormal().max(flushed)
    }
}

/// The mean's denominator: the sum of w_y over non-ignored rows (classes), B (soft targets);
/// None for a sum.
fn denominator(case: &XentCase, host: &Host) -> Option<f64> {
    if case.options.reduction != Reduction::Mean {
        return None;
    }
    if case.soft_targets {
        return Some(case.batch as f64);
    }
    Some(
        host.classes
            .iter()
            .filter(|&&y| y != case.options.ignore_index)
            .map(|&y| host.weights.as_ref().map_or(1.0, |w| w[y as usize]))
            .sum(),
    )
}

/// Runs `case` on `device`: every output on the host.
pub fn outputs(case: &XentCase, device: &Device) -> Result<Vec<Output>> {
    let inputs = XentInputs::draw(case, device)?;
    let out = xent::xent(&inputs.call(case))?;
    widen(&out.named())
}

/// The reference's outputs of `case` and every element's allowance.
pub fn expected(case: &XentCase) -> Result<Vec<Expected>> {
    let inputs = XentInputs::draw(case, &Device::Cpu)?;
    let want = inputs.reference(case);
    Ok(expected_of(case, &inputs.host, want))
}

fn expected_of(case: &XentCase, host: &Host, want: reference::XentOutput) -> Vec<Expected> {
    let bounds = Bounds::new(case, host, &want);
    let denominator = denominator(case, host);
    let scale = denominator.map_or(1.0, |d| if d > 0.0 { 1.0 / d } else { 0.0 });
    let per_sample = case.options.radius.reduce == RhoReduce::PerSample;
    let delta_error: Vec<f64> = (0..case.batch).map(|i| bounds.delta(i, &want)).collect();
    let reduced = match case.options.radius.reduce {
        RhoReduce::PerSample => (0.0, 0.0),
        RhoReduce::Mean => (
            want.delta.iter().sum::<f64>() / case.batch as f64,
            delta_error.iter().sum::<f64>() / case.batch as f64
                + bounds.batch_sum * want.delta.iter().map(|d| d.abs()).sum::<f64>()
                    / case.batch as f64,
        ),
        RhoReduce::Max => (
            want.delta.iter().copied().fold(f64::NEG_INFINITY, f64::max),
            delta_error.iter().copied().fold(0.0, f64::max),
        ),
    };
    let grad_dtype = match case.grad_dtype {
        GradDType::Logits => case.dtype,
        GradDType::F32 => DType::F32,
    };
    let mut e = vec![
        Expected::within("loss_per_row", want.loss_per_row.clone(), |i, w| {
            bounds.loss_row(i, w)
        }),
        Expected::within("loss", vec![want.loss], |_, w| {
            bounds.loss(&want.loss_per_row, denominator, w)
        }),
        Expected::within("lse", want.lse.clone(), |i, _| bounds.lse(i)),
        Expected::within("entropy", want.entropy.clone(), |i, w| bounds.entropy(i, w)),
        Expected::exact("argmax", want.argmax.iter().map(|&i| i as f64).collect()),
        Expected::within("max", want.max.clone(), |_, w| Bounds::rounded(w)),
        Expected::within("min", want.min.clone(), |_, w| Bounds::rounded(w)),
        Expected::within("top2_gap", want.top2_gap.clone(), |i, w| {
            bounds.top2_gap(i, w)
        }),
        Expected::within("delta", want.delta.clone(), |i, _| delta_error[i]),
        Expected::within("rho", want.rho.clone(), |i, w| {
            if per_sample {
                bounds.rho(want.delta[i], delta_error[i], w)
            } else {
                bounds.rho(reduced.0, reduced.1, w)
            }
        }),
    ];
    if let Some(grad) = &want.grad {
        e.push(Expected::within("grad", grad.clone(), |i, w| {
            bounds.grad(i, w, scale, grad_dtype)
        }));
    }
    e
}

/// Judges `outputs` of `case` (as `backend` wrote them) against the reference.
pub fn verdict(case: &XentCase, backend: Backend, outputs: &[Output]) -> Report {
    report(case.info(), backend, expected(case), outputs)
}

/// Runs `case` on `device` against the reference.
pub fn run(case: &XentCase, device: &Device) -> Report {
    match outputs(case, device) {
        Ok(outputs) => verdict(case, device.backend(), &outputs),
        Err(e) => report_error(case.info(), device.backend(), e),
    }
}

/// The xent cases `losskern check` runs: every option, each dtype, awkward sizes.
pub fn cases() -> Vec<XentCase> {
    let mut cases = vec![XentCase {
        options: XentOptions {
            grad: true,
            ..XentOptions::default()
        },
        ..XentCase::new(7, 33, DType::F32, 1)
    }];
    let mut smoothed = XentCase::new(64, 4097, DType::BF16, 2);
    smoothed.class_weights = true;
    smoothed.ignored_fraction = 0.2;
    smoothed.options = XentOptions {
        temperature: 0.7,
        label_smoothing: 0.1,
        z_loss: 1e-4,
        grad: true,
        radius: reference::RadiusOptions {
            gap: reference::Gap::Top2,
            reduce: RhoReduce::PerSample,
            ..Default::default()
        },
        ..XentOptions::default()
    };
    cases.push(smoothed);
    cases.push(XentCase {
        options: XentOptions {
            grad: true,
            ..XentOptions::default()
        },
        ..XentCase::new(5, 1, DType::F16, 3)
    });
    let mut soft = XentCase::new(9, 31, DType::F32, 4);
    soft.soft_targets = true;
    soft.options.reduction = Reduction::Sum;
    soft.options.grad = true;
    soft.options.radius = reference::RadiusOptions {
        reduce: RhoReduce::Max,
        cap: Some(2.0),
        floor: Some(0.05),
        ..Default::default()
    };
    cases.push(soft);
    let mut wide = XentCase::new(3, 131_075, DType::BF16, 5);
    wide.special = Special::Ties;
    wide.options.reduction = Reduction::None;
    wide.options.grad = true;
    wide.grad_dtype = GradDType::F32;
    cases.push(wide);
    let mut masked = XentCase::new(8, 1023, DType::F32, 6);
    masked.special = Special::NegInf;
    masked.magnitude = 1e4;
    masked.options.grad = true;
    cases.push(masked);
    let mut nan = XentCase::new(4, 1023, DType::F32, 7);
    nan.special = Special::NanRow;
    nan.ignored_fraction = 0.3;
    nan.options.radius = reference::RadiusOptions {
        reduce: RhoReduce::PerSample,
        inf_if_small: true,
        ..Default::default()
    };
    nan.options.grad = true;
    cases.push(nan);
    let mut padded = XentCase::new(6, 100, DType::F16, 8);
    padded.row_stride = 128;
    padded.options.grad = true;
    cases.push(padded);
    cases
}

/// A random directional-radius problem.
#[derive(Clone, Debug)]
pub struct DirectionalCase {
    pub batch: usize,
    pub classes: usize,
    pub dtype: DType,
    pub step: f64,
    pub seed: u64,
}

impl DirectionalCase {
    pub(crate) fn info(&self) -> CaseInfo {
        CaseInfo {
            op: Op::XentDirectional,
            dtype: self.dtype.name().to_string(),
            shape: format!("{}x{}", self.batch, self.classes),
            tolerance: "4u |v| (binary radius 8u |v|)",
        }
    }

    /// Logits and derivatives, rounded to the dtype, on the CPU.
    fn draw(&self) -> Result<(Tensor, Tensor)> {
        let mut rng = Rng::new(self.seed);
        let shape = [self.batch, self.classes];
        let len = self.batch * self.classes;
        let z = Tensor::from_f64(&Device::Cpu, &rng.normals(len, 3.0), &shape, self.dtype)?;
        let a = Tensor::from_f64(&Device::Cpu, &rng.normals(len, 1.0), &shape, self.dtype)?;
        Ok((z, a))
    }
}

pub fn directional_cases() -> Vec<DirectionalCase> {
    vec![
        DirectionalCase {
            batch: 16,
            classes: 2,
            dtype: DType::F32,
            step: 0.3,
            seed: 11,
        },
        DirectionalCase {
            batch: 5,
            classes: 4097,
            dtype: DType::BF16,
            step: 1.0,
            seed: 12,
        },
    ]
}

/// Runs the directional radius on `device`: every output on the host.
pub fn directional_outputs(case: &DirectionalCase, device: &Device) -> Result<Vec<Output>> {
    let (z, a) = case.draw()?;
    let (z, a) = (z.to_device(device)?, a.to_device(device)?);
    let out = xent::directional(&Directional {
        logits: &z,
        derivatives: &a,
        step: case.step,
    })?;
    let mut named = vec![
        ("delta_a", &out.delta_a),
        ("rho_a", &out.rho_a),
        ("normalized_step", &out.normalized_step),
    ];
    named.extend(out.binary_radius.as_ref().map(|r| ("binary_radius", r)));
    widen(&named)
}

/// The directional reference with its allowances. Every output is a difference of two
/// inputs (exact in f32, one rounding) or pi over one, a few roundings: within 4u of the
/// reference relative; the binary radius adds a square, a sum, a root and a division: 8u.
pub fn directional_expected(case: &DirectionalCase) -> Result<Vec<Expected>> {
    let (z, a) = case.draw()?;
    let (z64, a64) = (z.to_f64_vec()?, a.to_f64_vec()?);
    let want = reference::directional(&reference::DirectionalProblem {
        logits: &z64,
        derivatives: &a64,
        batch: case.batch,
        classes: case.classes,
        step: case.step,
    });
    let relative = |_: usize, w: f64| 4.0 * U * w.abs();
    let mut e = vec![
        Expected::within("delta_a", want.delta_a, relative),
        Expected::within("rho_a", vec![want.rho_a], relative),
        Expected::within("normalized_step", vec![want.normalized_step], relative),
    ];
    if let Some(radius) = want.binary_radius {
        e.push(Expected::within("binary_radius", radius, |_, w| {
            8.0 * U * w.abs()
        }));
    }
    Ok(e)
}

/// Judges directional `outputs` (as `backend` wrote them) against the reference.
pub fn directional_verdict(case: &DirectionalCase, backend: Backend, outputs: &[Output]) -> Report {
    report(case.info(), backend, directional_expected(case), outputs)
}

/// Runs the directional radius on `device` against the reference.
pub fn run_directional(case: &DirectionalCase, device: &Device) -> Report {
    match directional_outputs(case, device) {
        Ok(outputs) => directional_verdict(case, device.backend(), &outputs),
        Err(e) => report_error(case.info(), device.backend(), e),
    }
}

/// A problem too large for the f64 reference in full, for 64-bit indexing (B V beyond
/// 2^31): row r is one of 64 random rows, rotated by r * 7919 columns and shifted by
/// (r mod 97) / 4, so no two nearby rows agree. The per-row outputs of a few rows (the
/// first, the last, and those around element 2^31) are compared with the reference run on
/// those rows alone, and the reduced loss with the f64 mean of the device's per-row losses.
pub fn run_large(batch: usize, classes: usize, dtype: DType, device: &Device) -> Report {
    let info = CaseInfo {
        op: Op::Xent,
        dtype: dtype.name().to_string(),
        shape: format!("sampled rows of {batch}x{classes} class"),
        tolerance: "as xent, on the sampled rows",
    };
    match compare_large(batch, classes, dtype, device) {
        Ok((expected, outputs)) => report(info, device.backend(), Ok(expected), &outputs),
        Err(e) => report_error(info, device.backend(), e),
    }
}

/// Row r of the large problem, before rounding to the dtype.
fn large_row(tile: &[f64], classes: usize, r: usize, out: &mut [f64]) {
    let base = &tile[(r % 64) * classes..(r % 64 + 1) * classes];
    let rotate = (r * 7919) % classes;
    let shift = (r % 97) as f64 / 4.0;
    for (k, value) in out.iter_mut().enumerate() {
        *value = base[(k + rotate) % classes] + shift;
    }
}

fn rotated<T: crate::dtype::Element>(
    device: &Device,
    tile: &[f64],
    batch: usize,
    classes: usize,
) -> Result<Tensor> {
    let mut values: Vec<T> = Vec::new();
    values
        .try_reserve_exact(batch * classes)
        .map_err(|e| crate::error::Error::Shape(format!("{batch}x{classes} logits: {e}")))?;
    let mut row = vec![0.0; classes];
    for r in 0..batch {
        large_row(tile, classes, r, &mut row);
        values.extend(row.iter().map(|&v| T::from_f64(v)));
    }
    Tensor::from_slice(device, &values, &[batch, classes])
}

/// The random tile the rotated rows are made from.
fn rotation_tile(classes: usize) -> Vec<f64> {
    Rng::new(0x1a7e).normals(64 * classes, 3.0)
}

/// Logits [B, V] in `dtype` on `device` whose rows are rotated, shifted copies of 64 random
/// rows (see `run_large`): built without an f64 copy of the whole tensor, so benchmarks
/// and the 64-bit indexing check can make billions of logits quickly.
pub fn rotated_logits(
    device: &Device,
    batch: usize,
    classes: usize,
    dtype: DType,
) -> Result<Tensor> {
    let tile = rotation_tile(classes);
    match dtype {
        DType::F16 => rotated::<half::f16>(device, &tile, batch, classes),
        DType::BF16 => rotated::<half::bf16>(device, &tile, batch, classes),
        _ => rotated::<f32>(device, &tile, batch, classes),
    }
}

fn compare_large(
    batch: usize,
    classes: usize,
    dtype: DType,
    device: &Device,
) -> Result<(Vec<Expected>, Vec<Output>)> {
    let tile = rotation_tile(classes);
    let logits = rotated_logits(device, batch, classes, dtype)?;
    let target_of = |r: usize| ((r * 31337) % classes) as i64;
    let targets: Vec<i64> = (0..batch).map(target_of).collect();
    let targets = Tensor::from_slice(device, &targets, &[batch])?;
    let options = XentOptions {
        radius: reference::RadiusOptions {
            reduce: RhoReduce::PerSample,
            ..Default::default()
        },
        ..Default::default()
    };
    let out = xent::xent(&Xent {
        options,
        ..Xent::new(&logits, Targets::Classes(&targets))
    })?;
    drop(logits);

    let boundary = (1usize << 31) / classes;
    let mut rows: Vec<usize> = [
        0,
        1,
        batch / 2,
        boundary.saturating_sub(1),
        boundary,
        boundary + 1,
        batch - 2,
        batch - 1,
    ]
    .into_iter()
    .filter(|&r| r < batch)
    .collect();
    rows.sort_unstable();
    rows.dedup();
    let mut sampled = Vec::with_capacity(rows.len() * classes);
    let mut row = vec![0.0; classes];
    for &r in &rows {
        large_row(&tile, classes, r, &mut row);
        sampled.extend(row.iter().map(|&v| dtype.round(v)));
    }
    let sampled_targets: Vec<i64> = rows.iter().map(|&r| target_of(r)).collect();
    let case = XentCase {
        options,
        ..XentCase::new(rows.len(), classes, dtype, 0)
    };
    let want = reference::xent(&reference::XentProblem {
        logits: &sampled,
        batch: rows.len(),
        classes,
        row_stride: classes,
        targets: reference::Targets::Classes(&sampled_targets),
        class_weights: None,
        options,
    });
    let host = Host {
        logits: sampled,
        classes: sampled_targets,
        soft: Vec::new(),
        weights: None,
    };
    let mut expected = expected_of(&case, &host, want);
    // Only the per-row outputs of the sampled rows are judged, and grad is off.
    expected.retain(|e| !matches!(e.name, "loss" | "rho" | "top2_gap"));
    let mut outputs = Vec::new();
    for (name, t) in out.named() {
        if expected.iter().any(|e| e.name == name) {
            let all = t.to_f64_vec()?;
            outputs.push(Output {
                name,
                values: rows.iter().map(|&r| all[r]).collect(),
            });
        }
    }
    // The reference of 2^31 logits is not affordable: the reduced loss is judged against
    // the f64 mean of the device's own rows (all >= 0), one batch sum's error of it.
    let per_row = out.loss_per_row.to_f64_vec()?;
    let mean = per_row.iter().sum::<f64>() / batch as f64;
    expected.push(Expected::within("loss", vec![mean], |_, w| {
        sum_error(batch) * w.abs()
    }));
    outputs.push(Output {
        name: "loss",
        values: out.loss.to_f64_vec()?,
    });
    Ok((expected, outputs))
}
