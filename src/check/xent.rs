//! Random xent problems and the family's tolerances.
//!
//! Derivation. Inputs of every dtype are exact in f32, so a kernel's error is its own
//! f32 rounding (unit roundoff u = 2^-24):
//! - x = z / T rounds once: |dx| <= u |x|, so max, min and gaps of a row whose largest
//!   finite |x| is M are off by at most a = 4 u M (two roundings each side, doubled).
//! - A row sum of V positive terms (s = sum e^(x-m)) accumulated per thread and then in a
//!   fixed tree has relative error k = 8 u (sqrt(V) + log2 V + 1): the square root is the
//!   expected growth of independent roundings along per-thread chains, which is what the
//!   kernels' chains of V / threads terms give; the factor 8 covers exp and log.
//! - lse = m + log s, loss = lse - x_y (weighted, smoothed), entropy = log s - t / s: each
//!   within a + k (1 + |value| + M) times the largest class weight W.
//! - rho = pi / (Delta + eps): relative error (allowed Delta error) / (Delta + eps) + 4u.
//! - grad = (C p - c) / T * scale: p = exp(x - lse) has relative error 2a + 2k, so each
//!   element is within (scale / T) W (4a + 4k) (1 + 2 z_loss |lse|), plus the rounding to the
//!   output dtype, 2 u_out |grad| plus its smallest subnormal where the gradient underflows.
//! - Batch reductions add k over B terms.

use losskern_reference::xent as reference;

use crate::check::{report_error, sum_error, CaseInfo, Report, Rng, Verdict, U};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::xent::{
    self, Directional, GradDType, Reduction, RhoReduce, Targets, Xent, XentOptions,
};

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

    fn info(&self) -> CaseInfo {
        let targets = if self.soft_targets { "soft" } else { "class" };
        CaseInfo {
            op: "xent",
            dtype: self.dtype.name().to_string(),
            shape: format!(
                "{}x{} {targets} {:?}",
                self.batch, self.classes, self.special
            ),
        }
    }
}

/// The inputs of a case, rounded to their dtypes, on the host and on the device.
pub struct XentInputs {
    pub logits: Tensor,
    pub targets: Tensor,
    pub class_weights: Option<Tensor>,
    logits_f64: Vec<f64>,
    classes_f64: Vec<i64>,
    soft_f64: Vec<f64>,
    weights_f64: Option<Vec<f64>>,
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
            logits_f64,
            classes_f64,
            soft_f64,
            weights_f64,
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
            logits: &self.logits_f64,
            batch: case.batch,
            classes: case.classes,
            row_stride: case.row_stride,
            targets: if case.soft_targets {
                reference::Targets::Soft(&self.soft_f64)
            } else {
                reference::Targets::Classes(&self.classes_f64)
            },
            class_weights: self.weights_f64.as_deref(),
            options: case.options,
        })
    }
}

/// The tolerances of one case, per row.
struct Tolerances {
    /// a = 4 u M per row.
    rounding: Vec<f64>,
    /// k for a row of V terms.
    row_sum: f64,
    /// Largest class weight (1 without weights).
    weight: f64,
}

impl Tolerances {
    fn new(case: &XentCase, logits: &[f64]) -> Self {
        let t = case.options.temperature;
        let rounding = (0..case.batch)
            .map(|row| {
                let r = &logits[row * case.row_stride..row * case.row_stride + case.classes];
                4.0 * U
                    * r.iter()
                        .filter(|x| x.is_finite())
                        .fold(0.0f64, |m, x| m.max((x / t).abs()))
            })
            .collect();
        Tolerances {
            rounding,
            row_sum: sum_error(case.classes),
            weight: if case.class_weights { 2.0 } else { 1.0 },
        }
    }

    fn row_value(&self, row: usize, want: f64) -> f64 {
        let a = self.rounding[row];
        self.weight * (a + self.row_sum * (1.0 + want.abs() + a / (4.0 * U)))
    }
}

/// Runs `case` on `device` against the reference.
pub fn run(case: &XentCase, device: &Device) -> Report {
    let tolerance = "4uM + 8u(sqrt V + log2 V + 1)(1 + |v| + M)".to_string();
    match compare(case, device) {
        Ok(verdict) => verdict.finish(case.info(), device, tolerance),
        Err(e) => report_error(case.info(), device, e),
    }
}

fn compare(case: &XentCase, device: &Device) -> Result<Verdict> {
    let inputs = XentInputs::draw(case, device)?;
    let out = xent::xent(&inputs.call(case))?;
    let want = inputs.reference(case);
    let tol = Tolerances::new(case, &inputs.logits_f64);
    let mut v = Verdict::new();
    let row_value =
        |i: usize, w: f64| tol.row_value(i, w) * (1.0 + 2.0 * case.options.z_loss * w.abs());
    v.add(
        "loss_per_row",
        &out.loss_per_row.to_f64_vec()?,
        &want.loss_per_row,
        row_value,
    );
    v.add("lse", &out.lse.to_f64_vec()?, &want.lse, |i, w| {
        tol.row_value(i, w)
    });
    v.add(
        "entropy",
        &out.entropy.to_f64_vec()?,
        &want.entropy,
        |i, w| tol.row_value(i, w),
    );
    let argmax: Vec<f64> = want.argmax.iter().map(|&i| i as f64).collect();
    v.add_exact("argmax", &out.argmax.to_f64_vec()?, &argmax);
    let gap = |i: usize, _: f64| 2.0 * tol.rounding[i];
    v.add("max", &out.max.to_f64_vec()?, &want.max, gap);
    v.add("min", &out.min.to_f64_vec()?, &want.min, gap);
    v.add("top2_gap", &out.top2_gap.to_f64_vec()?, &want.top2_gap, gap);
    v.add("delta", &out.delta.to_f64_vec()?, &want.delta, gap);
    let radius = &case.options.radius;
    let rho_error = |delta: f64, delta_error: f64, rho: f64| {
        // An infinite Delta gives rho = 0 exactly; there is no error to propagate.
        let relative = if delta.is_finite() {
            delta_error / (delta + radius.eps)
        } else {
            0.0
        };
        rho * (relative + 4.0 * U)
    };
    let batch_sum = sum_error(case.batch);
    let largest_row = (0..case.batch)
        .map(|i| row_value(i, 0.0))
        .fold(0.0, f64::max);
    match radius.reduce {
        RhoReduce::PerSample => {
            v.add("rho", &out.rho.to_f64_vec()?, &want.rho, |i, w| {
                rho_error(want.delta[i], gap(i, 0.0), w)
            });
        }
        RhoReduce::Mean | RhoReduce::Max => {
            let reduced = if radius.reduce == RhoReduce::Mean {
                want.delta.iter().sum::<f64>() / case.batch as f64
            } else {
                want.delta.iter().copied().fold(f64::NEG_INFINITY, f64::max)
            };
            let delta_error = tol.rounding.iter().fold(0.0, |m: f64, a| m.max(2.0 * a))
                + batch_sum * reduced.abs();
            v.add("rho", &out.rho.to_f64_vec()?, &want.rho, |_, w| {
                rho_error(reduced, delta_error, w)
            });
        }
    }
    let loss_error = |w: f64| {
        largest_row
            * if case.options.reduction == Reduction::Mean {
                1.0
            } else {
                case.batch as f64
            }
            + batch_sum * w.abs()
    };
    v.add("loss", &out.loss.to_f64_vec()?, &[want.loss], |_, w| {
        loss_error(w)
    });
    if let (Some(got), Some(want_grad)) = (&out.grad, &want.grad) {
        let (u_out, tiny) = (
            got.dtype().unit_roundoff(),
            got.dtype().smallest_subnormal(),
        );
        let scale = grad_scale(case, &inputs);
        let t = case.options.temperature;
        v.add("grad", &got.to_f64_vec()?, want_grad, |i, w| {
            let row = i / case.classes;
            let lse = want.lse[row].abs();
            let a = tol.rounding[row];
            2.0 * u_out * w.abs()
                + tiny
                + scale / t
                    * tol.weight
                    * (4.0 * a + 4.0 * tol.row_sum)
                    * (1.0 + 2.0 * case.options.z_loss * (lse + 1.0))
        });
    } else if out.grad.is_some() != want.grad.is_some() {
        v.add_exact(
            "grad presence",
            &[f64::from(u8::from(out.grad.is_some()))],
            &[f64::from(u8::from(want.grad.is_some()))],
        );
    }
    Ok(v)
}

/// The reduction's scale of the gradient: 1 / (sum of row weights) for a mean, else 1.
fn grad_scale(case: &XentCase, inputs: &XentInputs) -> f64 {
    if case.options.reduction != Reduction::Mean {
        return 1.0;
    }
    if case.soft_targets {
        return 1.0 / case.batch as f64;
    }
    let total: f64 = inputs
        .classes_f64
        .iter()
        .filter(|&&y| y != case.options.ignore_index)
        .map(|&y| inputs.weights_f64.as_ref().map_or(1.0, |w| w[y as usize]))
        .sum();
    if total > 0.0 {
        1.0 / total
    } else {
        0.0
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
    fn info(&self) -> CaseInfo {
        CaseInfo {
            op: "xent::directional",
            dtype: self.dtype.name().to_string(),
            shape: format!("{}x{}", self.batch, self.classes),
        }
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

/// Runs the directional radius on `device` against the reference. Every output is a
/// difference of two inputs or pi over one, so it is within 4u of the reference relative.
pub fn run_directional(case: &DirectionalCase, device: &Device) -> Report {
    let tolerance = "4u |v|".to_string();
    match compare_directional(case, device) {
        Ok(verdict) => verdict.finish(case.info(), device, tolerance),
        Err(e) => report_error(case.info(), device, e),
    }
}

fn compare_directional(case: &DirectionalCase, device: &Device) -> Result<Verdict> {
    let mut rng = Rng::new(case.seed);
    let shape = [case.batch, case.classes];
    let len = case.batch * case.classes;
    let z = Tensor::from_f64(&Device::Cpu, &rng.normals(len, 3.0), &shape, case.dtype)?;
    let a = Tensor::from_f64(&Device::Cpu, &rng.normals(len, 1.0), &shape, case.dtype)?;
    let (z64, a64) = (z.to_f64_vec()?, a.to_f64_vec()?);
    let (z, a) = (z.to_device(device)?, a.to_device(device)?);
    let out = xent::directional(&Directional {
        logits: &z,
        derivatives: &a,
        step: case.step,
    })?;
    let want = reference::directional(&reference::DirectionalProblem {
        logits: &z64,
        derivatives: &a64,
        batch: case.batch,
        classes: case.classes,
        step: case.step,
    });
    let relative = |_: usize, w: f64| 4.0 * U * w.abs();
    let mut v = Verdict::new();
    v.add(
        "delta_a",
        &out.delta_a.to_f64_vec()?,
        &want.delta_a,
        relative,
    );
    v.add("rho_a", &out.rho_a.to_f64_vec()?, &[want.rho_a], relative);
    v.add(
        "normalized_step",
        &out.normalized_step.to_f64_vec()?,
        &[want.normalized_step],
        relative,
    );
    if let (Some(got), Some(want)) = (&out.binary_radius, &want.binary_radius) {
        v.add("binary_radius", &got.to_f64_vec()?, want, |_, w| {
            8.0 * U * w.abs()
        });
    }
    Ok(v)
}

/// A problem too large for the f64 reference in full, for 64-bit indexing (B V beyond
/// 2^31): row r is one of 64 random rows, rotated by r * 7919 columns and shifted by
/// (r mod 97) / 4, so no two nearby rows agree. The per-row outputs of a few rows (the
/// first, the last, and those around element 2^31) are compared with the reference run on
/// those rows alone, and the reduced loss with the f64 mean of the device's per-row losses.
pub fn run_large(batch: usize, classes: usize, dtype: DType, device: &Device) -> Report {
    let info = CaseInfo {
        op: "xent (sampled rows)",
        dtype: dtype.name().to_string(),
        shape: format!("{batch}x{classes} class"),
    };
    let tolerance = "as xent, on the sampled rows".to_string();
    match compare_large(batch, classes, dtype, device) {
        Ok(verdict) => verdict.finish(info, device, tolerance),
        Err(e) => report_error(info, device, e),
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

fn compare_large(batch: usize, classes: usize, dtype: DType, device: &Device) -> Result<Verdict> {
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
    let tol = Tolerances::new(&case, &sampled);
    let pick = |t: &Tensor| -> Result<Vec<f64>> {
        let all = t.to_f64_vec()?;
        Ok(rows.iter().map(|&r| all[r]).collect())
    };
    let mut v = Verdict::new();
    v.add(
        "loss_per_row",
        &pick(&out.loss_per_row)?,
        &want.loss_per_row,
        |i, w| tol.row_value(i, w),
    );
    v.add("lse", &pick(&out.lse)?, &want.lse, |i, w| {
        tol.row_value(i, w)
    });
    v.add("entropy", &pick(&out.entropy)?, &want.entropy, |i, w| {
        tol.row_value(i, w)
    });
    let argmax: Vec<f64> = want.argmax.iter().map(|&i| i as f64).collect();
    v.add_exact("argmax", &pick(&out.argmax)?, &argmax);
    let gap = |i: usize, _: f64| 2.0 * tol.rounding[i];
    v.add("max", &pick(&out.max)?, &want.max, gap);
    v.add("min", &pick(&out.min)?, &want.min, gap);
    v.add("delta", &pick(&out.delta)?, &want.delta, gap);
    let per_row = out.loss_per_row.to_f64_vec()?;
    let mean = per_row.iter().sum::<f64>() / batch as f64;
    v.add(
        "loss (mean of the device's rows)",
        &out.loss.to_f64_vec()?,
        &[mean],
        |_, w| sum_error(batch) * w.abs(),
    );
    Ok(v)
}
