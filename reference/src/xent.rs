//! Fused softmax / cross-entropy with entropy, argmax and the softmax
//! convergence radius rho = pi / Delta.

/// How the per-row loss is reduced over the batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Reduction {
    /// Keep one loss per row (ignored rows give 0, as PyTorch).
    None,
    /// Weighted mean over non-ignored rows (PyTorch semantics).
    #[default]
    Mean,
    /// Sum over non-ignored rows.
    Sum,
}

/// Which logit gap Delta defines the radius.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Gap {
    /// Delta = max - min over the row.
    #[default]
    MaxMin,
    /// Delta = top1 - top2 over the row (0 when V = 1).
    Top2,
}

/// How Delta is reduced over rows before rho = pi / (Delta + eps) (`compute_rho_out`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RhoReduce {
    /// Mean of Delta over all rows.
    #[default]
    Mean,
    /// Max of Delta over all rows.
    Max,
    /// One rho per row.
    PerSample,
}

/// Radius options, as ghosts-of-softmax `compute_rho_from_delta`.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RadiusOptions {
    pub gap: Gap,
    pub reduce: RhoReduce,
    /// eps_rho added to Delta (default 1e-6).
    pub eps: f64,
    /// rho = min(rho, cap) when given.
    pub cap: Option<f64>,
    /// rho = max(rho, floor) when given.
    pub floor: Option<f64>,
    /// rho = +inf where Delta < eps.
    pub inf_if_small: bool,
}

impl Default for RadiusOptions {
    fn default() -> Self {
        Self {
            gap: Gap::MaxMin,
            reduce: RhoReduce::Mean,
            eps: 1e-6,
            cap: None,
            floor: None,
            inf_if_small: false,
        }
    }
}

/// Options of the cross-entropy op.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct XentOptions {
    /// T > 0: the op works on z / T.
    pub temperature: f64,
    /// eps in [0, 1): target = (1 - eps) onehot + eps / V (PyTorch).
    pub label_smoothing: f64,
    /// Class target that marks a row as ignored (default -100).
    pub ignore_index: i64,
    pub reduction: Reduction,
    /// Coefficient c of the z-loss term c * lse^2 added to each row's loss.
    pub z_loss: f64,
    /// Compute the gradient of the reduced loss w.r.t. the logits.
    pub grad: bool,
    pub radius: RadiusOptions,
}

impl Default for XentOptions {
    fn default() -> Self {
        Self {
            temperature: 1.0,
            label_smoothing: 0.0,
            ignore_index: -100,
            reduction: Reduction::Mean,
            z_loss: 0.0,
            grad: false,
            radius: RadiusOptions::default(),
        }
    }
}

/// The targets of a cross-entropy problem.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices y [B]; `ignore_index` marks ignored rows.
    Classes(&'a [i64]),
    /// Soft targets q [B, V] (row stride V), used as given.
    Soft(&'a [f64]),
}

/// One cross-entropy problem: logits z [B, V] with row stride >= V.
#[derive(Clone, Copy, Debug)]
pub struct XentProblem<'a> {
    pub logits: &'a [f64],
    pub batch: usize,
    pub classes: usize,
    pub row_stride: usize,
    pub targets: Targets<'a>,
    /// Class weights w [V] (PyTorch weighted mean).
    pub class_weights: Option<&'a [f64]>,
    pub options: XentOptions,
}

/// Everything the op yields. Per-row vectors have length B.
#[derive(Clone, Debug, PartialEq)]
pub struct XentOutput {
    /// Per-row loss including the z-loss term; 0 for ignored rows.
    pub loss_per_row: Vec<f64>,
    /// The reduced loss (mean or sum); for `Reduction::None` the sum of rows.
    pub loss: f64,
    pub lse: Vec<f64>,
    pub entropy: Vec<f64>,
    /// First index of the row maximum (of z / T).
    pub argmax: Vec<i64>,
    /// Row max of z / T.
    pub max: Vec<f64>,
    /// Row min of z / T.
    pub min: Vec<f64>,
    /// top1 - top2 of z / T (0 when V = 1).
    pub top2_gap: Vec<f64>,
    /// Delta per row by the chosen gap.
    pub delta: Vec<f64>,
    /// rho per row (PerSample) or a single reduced value (Mean, Max).
    pub rho: Vec<f64>,
    /// d(reduced loss)/dz, [B, V] dense (row stride V), when asked.
    pub grad: Option<Vec<f64>>,
}

/// Runs the cross-entropy op.
///
/// Edge cases, fixed here because kernels are judged against them:
/// - A row holding a NaN or +inf (of z / T) gets NaN loss, lse, entropy, max, min,
///   top2 gap, Delta and grad row; its argmax is the first NaN (else the first
///   max, which is then the first +inf), as `torch.argmax` treats NaN as the
///   largest value. Other rows are unaffected.
/// - A row of only -inf has lse = -inf, max = min = -inf, and NaN loss, entropy,
///   Delta (max - min is -inf - -inf) and grad row.
/// - An ignored row (class targets only) has loss 0 and grad row 0 whatever its
///   logits hold, so it never poisons the reduced loss; its lse, entropy, max,
///   min, gap and Delta are still reported, and it still counts for rho (the
///   radius is about logits, not targets).
/// - Mean over class targets divides by the sum of w_{y_i} over non-ignored rows
///   (their count without weights); when every row is ignored that is 0 / 0 = NaN,
///   as PyTorch. Mean over soft targets divides by B, as PyTorch.
/// - A class with p = 0 (logit -inf) adds 0 where its target weight is 0 and
///   makes the loss +inf where it is positive, as PyTorch.
pub fn xent(problem: &XentProblem<'_>) -> XentOutput {
    let b = problem.batch;
    let v = problem.classes;
    let opts = &problem.options;
    let t = opts.temperature;
    let eps = opts.label_smoothing;

    let mut out = XentOutput {
        loss_per_row: vec![0.0; b],
        loss: 0.0,
        lse: vec![0.0; b],
        entropy: vec![0.0; b],
        argmax: vec![0; b],
        max: vec![0.0; b],
        min: vec![0.0; b],
        top2_gap: vec![0.0; b],
        delta: vec![0.0; b],
        rho: Vec::new(),
        grad: None,
    };
    // Per-row d(loss_i)/dz before the reduction scale; ignored rows stay 0.
    let mut row_grads = vec![0.0; b * v];
    // The mean's denominator: sum of w_{y_i} over non-ignored rows (classes), B (soft).
    let mut denominator = 0.0;

    for i in 0..b {
        let row = &problem.logits[i * problem.row_stride..i * problem.row_stride + v];
        let x: Vec<f64> = row.iter().map(|&z| z / t).collect();

        // Coefficient c_k of -log p_k in loss_i, or None for an ignored row.
        let coefficients: Option<Vec<f64>> = match problem.targets {
            Targets::Classes(labels) => {
                let y = labels[i];
                if y == opts.ignore_index {
                    None
                } else {
                    let y = y as usize;
                    let w_y = class_weight(problem.class_weights, y);
                    denominator += w_y;
                    let mut c = vec![0.0; v];
                    for (k, ck) in c.iter_mut().enumerate() {
                        *ck = eps / v as f64 * class_weight(problem.class_weights, k);
                    }
                    c[y] += (1.0 - eps) * w_y;
                    Some(c)
                }
            }
            Targets::Soft(q) => {
                denominator += 1.0;
                let mut c = vec![0.0; v];
                for (k, ck) in c.iter_mut().enumerate() {
                    let target = (1.0 - eps) * q[i * v + k] + eps / v as f64;
                    *ck = class_weight(problem.class_weights, k) * target;
                }
                Some(c)
            }
        };

        let stats = row_stats(&x);
        out.argmax[i] = stats.argmax as i64;
        out.max[i] = stats.max;
        out.min[i] = stats.min;
        out.top2_gap[i] = stats.top2_gap;
        out.delta[i] = match opts.radius.gap {
            Gap::MaxMin => stats.max - stats.min,
            Gap::Top2 => stats.top2_gap,
        };
        out.lse[i] = stats.lse;
        out.entropy[i] = stats.entropy;

        let Some(c) = coefficients else {
            continue;
        };
        if !stats.valid {
            out.loss_per_row[i] = f64::NAN;
            for k in 0..v {
                row_grads[i * v + k] = f64::NAN;
            }
            continue;
        }

        let lse = stats.lse;
        let mut loss = 0.0;
        let mut c_sum = 0.0;
        for k in 0..v {
            // -log p_k = lse - x_k is +inf for x_k = -inf; a zero weight on it adds nothing.
            if c[k] != 0.0 {
                loss += c[k] * (lse - x[k]);
            }
            c_sum += c[k];
        }
        loss += opts.z_loss * lse * lse;
        out.loss_per_row[i] = loss;

        for k in 0..v {
            let p = (x[k] - lse).exp();
            // d loss_i / d x_k = (sum_j c_j) p_k - c_k + 2 c_z lse p_k, and dx/dz = 1/T.
            row_grads[i * v + k] = (c_sum * p - c[k] + 2.0 * opts.z_loss * lse * p) / t;
        }
    }

    let mut total = 0.0;
    for loss in &out.loss_per_row {
        total += loss;
    }
    let scale = match opts.reduction {
        Reduction::Mean => {
            out.loss = total / denominator;
            1.0 / denominator
        }
        Reduction::Sum | Reduction::None => {
            out.loss = total;
            1.0
        }
    };

    if opts.grad {
        // Ignored rows are left at exactly 0, even when scale is inf (all rows ignored).
        let mut grad = vec![0.0; b * v];
        for i in 0..b {
            if is_ignored(problem, i) {
                continue;
            }
            for k in 0..v {
                grad[i * v + k] = row_grads[i * v + k] * scale;
            }
        }
        out.grad = Some(grad);
    }

    out.rho = match opts.radius.reduce {
        RhoReduce::PerSample => out
            .delta
            .iter()
            .map(|&d| rho_from_delta(d, &opts.radius))
            .collect(),
        RhoReduce::Mean => {
            let mut sum = 0.0;
            for d in &out.delta {
                sum += d;
            }
            vec![rho_from_delta(sum / b as f64, &opts.radius)]
        }
        RhoReduce::Max => {
            // Written out rather than f64::max, which would drop a NaN row.
            let mut max = f64::NEG_INFINITY;
            for &d in &out.delta {
                if d.is_nan() || d > max {
                    max = d;
                }
                if max.is_nan() {
                    break;
                }
            }
            vec![rho_from_delta(max, &opts.radius)]
        }
    };

    out
}

fn class_weight(weights: Option<&[f64]>, k: usize) -> f64 {
    match weights {
        Some(w) => w[k],
        None => 1.0,
    }
}

fn is_ignored(problem: &XentProblem<'_>, i: usize) -> bool {
    match problem.targets {
        Targets::Classes(labels) => labels[i] == problem.options.ignore_index,
        Targets::Soft(_) => false,
    }
}

/// Target-free statistics of one row x = z / T.
struct RowStats {
    /// False when the row holds a NaN or +inf, or only -inf: its loss and grad are NaN.
    valid: bool,
    argmax: usize,
    max: f64,
    min: f64,
    top2_gap: f64,
    lse: f64,
    entropy: f64,
}

fn row_stats(x: &[f64]) -> RowStats {
    let first_bad = x.iter().position(|&v| v.is_nan() || v == f64::INFINITY);
    if let Some(k) = first_bad {
        let first_nan = x.iter().position(|v| v.is_nan());
        return RowStats {
            valid: false,
            argmax: first_nan.unwrap_or(k),
            max: f64::NAN,
            min: f64::NAN,
            top2_gap: f64::NAN,
            lse: f64::NAN,
            entropy: f64::NAN,
        };
    }

    // Strict comparisons keep the first maximum; top2 takes duplicates, so ties give 0.
    let mut argmax = 0;
    let mut top1 = x[0];
    let mut top2 = f64::NEG_INFINITY;
    let mut min = x[0];
    for (k, &v) in x.iter().enumerate().skip(1) {
        if v > top1 {
            top2 = top1;
            top1 = v;
            argmax = k;
        } else if v > top2 {
            top2 = v;
        }
        if v < min {
            min = v;
        }
    }
    let top2_gap = if x.len() == 1 { 0.0 } else { top1 - top2 };

    if top1 == f64::NEG_INFINITY {
        return RowStats {
            valid: false,
            argmax,
            max: top1,
            min,
            top2_gap,
            lse: f64::NEG_INFINITY,
            entropy: f64::NAN,
        };
    }

    // Shifting by the max keeps every exponent <= 0; -inf entries give e^-inf = 0 and
    // are skipped in t, where 0 * -inf would otherwise be NaN.
    let mut s = 0.0;
    let mut t = 0.0;
    for &v in x {
        if v == f64::NEG_INFINITY {
            continue;
        }
        let e = (v - top1).exp();
        s += e;
        t += e * (v - top1);
    }
    RowStats {
        valid: true,
        argmax,
        max: top1,
        min,
        top2_gap,
        lse: top1 + s.ln(),
        entropy: s.ln() - t / s,
    }
}

/// rho = pi / (delta + eps) with inf_if_small, cap and floor applied in that order.
///
/// A NaN delta gives NaN: cap and floor are plain comparisons, which leave NaN alone
/// (f64::min / f64::max would replace it).
pub fn rho_from_delta(delta: f64, radius: &RadiusOptions) -> f64 {
    let mut rho = if radius.inf_if_small && delta < radius.eps {
        f64::INFINITY
    } else {
        std::f64::consts::PI / (delta + radius.eps)
    };
    if let Some(cap) = radius.cap {
        if rho > cap {
            rho = cap;
        }
    }
    if let Some(floor) = radius.floor {
        if rho < floor {
            rho = floor;
        }
    }
    rho
}

/// Directional radius inputs: logits z [B, V] and their derivatives a = J v [B, V]
/// along an update direction, both with row stride V.
#[derive(Clone, Copy, Debug)]
pub struct DirectionalProblem<'a> {
    pub logits: &'a [f64],
    pub derivatives: &'a [f64],
    pub batch: usize,
    pub classes: usize,
    /// Step length tau for the normalised step r = tau / rho_a.
    pub step: f64,
}

#[derive(Clone, Debug, PartialEq)]
pub struct DirectionalOutput {
    /// Delta_a per row = max_k a - min_k a.
    pub delta_a: Vec<f64>,
    /// rho_a = pi / max_i Delta_a,i.
    pub rho_a: f64,
    /// For V = 2: per row sqrt(delta^2 + pi^2) / |Delta_a| with delta = z_1 - z_0.
    pub binary_radius: Option<Vec<f64>>,
    /// r = tau / rho_a.
    pub normalized_step: f64,
}

/// Runs the directional radius.
///
/// No eps is added: Delta_a = 0 on every row gives rho_a = +inf and a step of 0, and a
/// row with Delta_a = 0 has binary radius +inf. NaN in a propagates to rho_a.
pub fn directional(problem: &DirectionalProblem<'_>) -> DirectionalOutput {
    let b = problem.batch;
    let v = problem.classes;
    let mut delta_a = vec![0.0; b];
    for (i, d) in delta_a.iter_mut().enumerate() {
        let row = &problem.derivatives[i * v..(i + 1) * v];
        let mut max = row[0];
        let mut min = row[0];
        let mut nan = false;
        for &a in row {
            nan |= a.is_nan();
            if a > max {
                max = a;
            }
            if a < min {
                min = a;
            }
        }
        *d = if nan { f64::NAN } else { max - min };
    }

    let mut max_delta = f64::NEG_INFINITY;
    for &d in &delta_a {
        if d.is_nan() || d > max_delta {
            max_delta = d;
        }
        if max_delta.is_nan() {
            break;
        }
    }
    let rho_a = std::f64::consts::PI / max_delta;

    let binary_radius = if v == 2 {
        let mut radius = vec![0.0; b];
        for (i, r) in radius.iter_mut().enumerate() {
            let delta = problem.logits[2 * i + 1] - problem.logits[2 * i];
            let delta_a = problem.derivatives[2 * i + 1] - problem.derivatives[2 * i];
            *r = (delta * delta + std::f64::consts::PI * std::f64::consts::PI).sqrt()
                / delta_a.abs();
        }
        Some(radius)
    } else {
        None
    };

    DirectionalOutput {
        delta_a,
        rho_a,
        binary_radius,
        normalized_step: problem.step / rho_a,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::f64::consts::{LN_2, PI};

    fn class_problem<'a>(
        logits: &'a [f64],
        batch: usize,
        classes: usize,
        labels: &'a [i64],
        options: XentOptions,
    ) -> XentProblem<'a> {
        XentProblem {
            logits,
            batch,
            classes,
            row_stride: classes,
            targets: Targets::Classes(labels),
            class_weights: None,
            options,
        }
    }

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    #[test]
    fn rho_of_equal_logits_is_pi_over_eps() {
        let out = xent(&class_problem(
            &[0.0, 0.0],
            1,
            2,
            &[0],
            XentOptions::default(),
        ));
        assert_eq!(out.rho.len(), 1);
        assert_eq!((out.rho[0] * 100.0).round() / 100.0, 3141592.65);
    }

    #[test]
    fn rho_of_gap_ten() {
        let out = xent(&class_problem(
            &[0.0, 10.0],
            1,
            2,
            &[0],
            XentOptions::default(),
        ));
        assert_eq!((out.rho[0] * 1e4).round() / 1e4, 0.3142);
    }

    #[test]
    #[allow(clippy::approx_constant)] // 3.1416 is the expected rounded value, not a stand-in for pi.
    fn rho_per_sample() {
        let mut options = XentOptions::default();
        options.radius.reduce = RhoReduce::PerSample;
        let logits = [0.0, 1.0, 0.0, 5.0, 0.0, 10.0];
        let out = xent(&class_problem(&logits, 3, 2, &[0, 0, 0], options));
        let rounded: Vec<f64> = out.rho.iter().map(|r| (r * 1e4).round() / 1e4).collect();
        assert_eq!(rounded, vec![3.1416, 0.6283, 0.3142]);
    }

    #[test]
    fn rho_mean_and_max_reduce_delta_first() {
        let logits = [0.0, 1.0, 0.0, 5.0];
        let mut options = XentOptions::default();
        options.radius.eps = 0.0;
        let mean = xent(&class_problem(&logits, 2, 2, &[0, 0], options));
        assert!(close(mean.rho[0], PI / 3.0, 1e-15));
        options.radius.reduce = RhoReduce::Max;
        let max = xent(&class_problem(&logits, 2, 2, &[0, 0], options));
        assert!(close(max.rho[0], PI / 5.0, 1e-15));
    }

    #[test]
    fn rho_cap_floor_and_inf_if_small() {
        let plain = RadiusOptions::default();
        assert!(close(rho_from_delta(1.0, &plain), PI / (1.0 + 1e-6), 1e-15));

        let capped = RadiusOptions {
            cap: Some(2.0),
            ..plain
        };
        assert_eq!(rho_from_delta(0.5, &capped), 2.0);
        assert!(close(
            rho_from_delta(4.0, &capped),
            PI / (4.0 + 1e-6),
            1e-15
        ));

        let floored = RadiusOptions {
            floor: Some(1.0),
            ..plain
        };
        assert_eq!(rho_from_delta(10.0, &floored), 1.0);

        let small = RadiusOptions {
            inf_if_small: true,
            ..plain
        };
        assert_eq!(rho_from_delta(1e-7, &small), f64::INFINITY);
        assert!(close(rho_from_delta(1e-6, &small), PI / 2e-6, 1e-6));
        // The cap applies after inf_if_small.
        let both = RadiusOptions {
            cap: Some(5.0),
            ..small
        };
        assert_eq!(rho_from_delta(0.0, &both), 5.0);

        assert!(rho_from_delta(f64::NAN, &both).is_nan());
        assert_eq!(rho_from_delta(f64::INFINITY, &plain), 0.0);
    }

    #[test]
    fn top2_gap_with_ties_is_zero() {
        let mut options = XentOptions::default();
        options.radius.gap = Gap::Top2;
        options.radius.reduce = RhoReduce::PerSample;
        let logits = [3.0, 1.0, 3.0, 2.0, 0.5, 1.5];
        let out = xent(&class_problem(&logits, 2, 3, &[0, 0], options));
        assert_eq!(out.argmax, vec![0, 0]);
        assert_eq!(out.top2_gap, vec![0.0, 0.5]);
        assert_eq!(out.delta, vec![0.0, 0.5]);
        assert_eq!(out.max, vec![3.0, 2.0]);
        assert_eq!(out.min, vec![1.0, 0.5]);
        assert!(close(out.rho[0], PI / 1e-6, 1e-6));

        let single = xent(&class_problem(&[7.0], 1, 1, &[0], options));
        assert_eq!(single.top2_gap, vec![0.0]);
        assert_eq!(single.loss, 0.0);
    }

    #[test]
    fn equal_logits_give_ln_v() {
        let out = xent(&class_problem(
            &[2.5; 4],
            1,
            4,
            &[3],
            XentOptions::default(),
        ));
        assert!(close(out.loss, 4f64.ln(), 1e-15));
        assert!(close(out.entropy[0], 4f64.ln(), 1e-15));
        assert!(close(out.lse[0], 2.5 + 4f64.ln(), 1e-15));
    }

    #[test]
    fn hand_two_class_loss_and_grad() {
        // p = softmax(0, ln 3) = (1/4, 3/4).
        let l3 = 3f64.ln();
        let logits = [0.0, l3, 0.0, l3];
        let options = XentOptions {
            grad: true,
            ..XentOptions::default()
        };
        let out = xent(&class_problem(&logits, 2, 2, &[1, 0], options));
        assert!(close(out.loss_per_row[0], (4.0f64 / 3.0).ln(), 1e-15));
        assert!(close(out.loss_per_row[1], 4f64.ln(), 1e-15));
        assert!(close(
            out.loss,
            ((4.0f64 / 3.0).ln() + 4f64.ln()) / 2.0,
            1e-15
        ));
        let expected = [0.125, -0.125, -0.375, 0.375];
        let grad = out.grad.unwrap();
        for k in 0..4 {
            assert!(close(grad[k], expected[k], 1e-15), "{grad:?}");
        }
        // entropy of (1/4, 3/4)
        let h = -(0.25 * 0.25f64.ln() + 0.75 * 0.75f64.ln());
        assert!(close(out.entropy[0], h, 1e-15));
    }

    /// The reduced loss for the finite-difference check.
    fn reduced(problem: &XentProblem<'_>, logits: &[f64]) -> f64 {
        let p = XentProblem { logits, ..*problem };
        xent(&p).loss
    }

    #[test]
    fn grad_matches_finite_differences() {
        let (b, v, stride) = (4, 3, 5);
        // Row stride 5 with NaN padding, which must never be read.
        let nan = f64::NAN;
        let logits = [
            0.3, -1.2, 2.0, nan, nan, //
            1.5, 0.1, -0.4, nan, nan, //
            -0.7, 0.9, 0.2, nan, nan, //
            9.0, 9.0, 9.0, nan, nan,
        ];
        let labels = [2, 0, -100, 1];
        let weights = [0.5, 2.0, 1.5];
        let problem = XentProblem {
            logits: &logits,
            batch: b,
            classes: v,
            row_stride: stride,
            targets: Targets::Classes(&labels),
            class_weights: Some(&weights),
            options: XentOptions {
                temperature: 1.7,
                label_smoothing: 0.2,
                z_loss: 0.05,
                grad: true,
                ..XentOptions::default()
            },
        };
        let out = xent(&problem);
        let grad = out.grad.unwrap();
        assert_eq!(grad.len(), b * v);
        // Ignored row (and its padding) gives a zero grad row.
        assert_eq!(&grad[2 * v..3 * v], &[0.0, 0.0, 0.0]);
        assert_eq!(out.loss_per_row[2], 0.0);

        let h = 1e-6;
        for i in 0..b {
            for k in 0..v {
                let mut plus = logits;
                let mut minus = logits;
                plus[i * stride + k] += h;
                minus[i * stride + k] -= h;
                let numeric = (reduced(&problem, &plus) - reduced(&problem, &minus)) / (2.0 * h);
                assert!(
                    close(grad[i * v + k], numeric, 1e-8),
                    "row {i} class {k}: {} vs {numeric}",
                    grad[i * v + k]
                );
            }
        }

        // The mean divides by w_{y_i} over the non-ignored rows: 1.5 + 0.5 + 2.0.
        let sum = XentOptions {
            reduction: Reduction::Sum,
            ..problem.options
        };
        let summed = xent(&XentProblem {
            options: sum,
            ..problem
        });
        assert!(close(out.loss, summed.loss / 4.0, 1e-14));
    }

    #[test]
    fn weighted_smoothed_loss_by_hand() {
        // PyTorch: (1 - eps) w_y (-log p_y) + eps / V sum_k w_k (-log p_k); p = (1/2, 1/2).
        let weights = [1.0, 3.0];
        let problem = XentProblem {
            class_weights: Some(&weights),
            ..class_problem(
                &[0.0, 0.0],
                1,
                2,
                &[1],
                XentOptions {
                    label_smoothing: 0.1,
                    ..XentOptions::default()
                },
            )
        };
        let out = xent(&problem);
        let per_row = 0.9 * 3.0 * LN_2 + 0.05 * (1.0 + 3.0) * LN_2;
        assert!(close(out.loss_per_row[0], per_row, 1e-15));
        assert!(close(out.loss, per_row / 3.0, 1e-15));
    }

    #[test]
    fn soft_one_hot_targets_equal_class_targets() {
        let logits = [0.3, -1.2, 2.0, 1.5, 0.1, -0.4];
        let options = XentOptions {
            label_smoothing: 0.1,
            z_loss: 0.01,
            temperature: 0.8,
            grad: true,
            ..XentOptions::default()
        };
        let classes = xent(&class_problem(&logits, 2, 3, &[2, 0], options));
        let q = [0.0, 0.0, 1.0, 1.0, 0.0, 0.0];
        let soft = xent(&XentProblem {
            targets: Targets::Soft(&q),
            ..class_problem(&logits, 2, 3, &[], options)
        });
        assert!(close(classes.loss, soft.loss, 1e-14));
        let (a, b) = (classes.grad.unwrap(), soft.grad.unwrap());
        for k in 0..6 {
            assert!(close(a[k], b[k], 1e-15));
        }
    }

    #[test]
    fn soft_weighted_mean_divides_by_batch() {
        let weights = [2.0, 1.0];
        let q = [0.25, 0.75];
        let out = xent(&XentProblem {
            targets: Targets::Soft(&q),
            class_weights: Some(&weights),
            ..class_problem(&[0.0, 0.0], 1, 2, &[], XentOptions::default())
        });
        assert!(close(out.loss, (2.0 * 0.25 + 0.75) * LN_2, 1e-15));
    }

    #[test]
    fn negative_infinity_logit_is_masked_class() {
        let logits = [0.0, 0.0, f64::NEG_INFINITY];
        let options = XentOptions {
            grad: true,
            ..XentOptions::default()
        };
        let out = xent(&class_problem(&logits, 1, 3, &[0], options));
        assert!(close(out.loss, LN_2, 1e-15));
        assert!(close(out.entropy[0], LN_2, 1e-15));
        assert_eq!(out.delta[0], f64::INFINITY);
        assert_eq!(out.rho[0], 0.0);
        assert_eq!(out.min[0], f64::NEG_INFINITY);
        assert_eq!(out.grad.unwrap(), vec![-0.5, 0.5, 0.0]);

        // Smoothing puts weight on the masked class, so the loss is +inf (as PyTorch).
        let smoothed = XentOptions {
            label_smoothing: 0.1,
            ..options
        };
        let out = xent(&class_problem(&logits, 1, 3, &[0], smoothed));
        assert_eq!(out.loss, f64::INFINITY);

        // A row of only -inf has lse -inf and NaN loss.
        let all = [f64::NEG_INFINITY; 2];
        let out = xent(&class_problem(&all, 1, 2, &[0], options));
        assert_eq!(out.lse[0], f64::NEG_INFINITY);
        assert!(out.loss.is_nan() && out.entropy[0].is_nan() && out.delta[0].is_nan());
        assert!(out.grad.unwrap().iter().all(|g| g.is_nan()));
    }

    #[test]
    fn nan_row_only_affects_itself() {
        let logits = [1.0, f64::NAN, 5.0, 0.0, 0.0, 0.0, 2.0, f64::INFINITY, 1.0];
        let options = XentOptions {
            grad: true,
            reduction: Reduction::None,
            radius: RadiusOptions {
                reduce: RhoReduce::PerSample,
                ..RadiusOptions::default()
            },
            ..XentOptions::default()
        };
        let out = xent(&class_problem(&logits, 3, 3, &[0, 1, 2], options));
        let grad = out.grad.unwrap();
        for i in [0, 2] {
            assert!(out.loss_per_row[i].is_nan());
            assert!(out.lse[i].is_nan() && out.entropy[i].is_nan());
            assert!(out.max[i].is_nan() && out.min[i].is_nan() && out.top2_gap[i].is_nan());
            assert!(out.delta[i].is_nan() && out.rho[i].is_nan());
            assert!(grad[i * 3..i * 3 + 3].iter().all(|g| g.is_nan()));
        }
        assert_eq!(out.argmax, vec![1, 0, 1]);
        assert!(close(out.loss_per_row[1], 3f64.ln(), 1e-15));
        assert!(close(out.entropy[1], 3f64.ln(), 1e-15));
        let third = 1.0 / 3.0;
        let expected = [third, third - 1.0, third];
        for k in 0..3 {
            assert!(close(grad[3 + k], expected[k], 1e-15));
        }
        assert!(out.loss.is_nan());

        // The mean radius sees the NaN Delta, the max one too.
        let mean = xent(&class_problem(
            &logits,
            3,
            3,
            &[0, 1, 2],
            XentOptions::default(),
        ));
        assert!(mean.rho[0].is_nan());
        let mut max_options = XentOptions::default();
        max_options.radius.reduce = RhoReduce::Max;
        let max = xent(&class_problem(&logits, 3, 3, &[0, 1, 2], max_options));
        assert!(max.rho[0].is_nan());
    }

    #[test]
    fn ignored_rows() {
        let logits = [f64::NAN, 1.0, 0.0, 0.0];
        let options = XentOptions {
            grad: true,
            ..XentOptions::default()
        };
        // An ignored NaN row contributes nothing; the mean is over the other row only.
        let out = xent(&class_problem(&logits, 2, 2, &[-100, 1], options));
        assert_eq!(out.loss_per_row[0], 0.0);
        assert!(close(out.loss, LN_2, 1e-15));
        assert_eq!(out.grad.unwrap(), vec![0.0, 0.0, 0.5, -0.5]);

        // Every row ignored: the mean is 0 / 0 = NaN (PyTorch), the grad stays 0.
        let out = xent(&class_problem(&logits, 2, 2, &[-100, -100], options));
        assert!(out.loss.is_nan());
        assert_eq!(out.grad.unwrap(), vec![0.0; 4]);
    }

    #[test]
    fn exact_binary_radius() {
        let logits = [1.0, 4.0, 2.0, 2.0];
        let derivatives = [0.5, -1.5, 1.0, 1.25];
        let out = directional(&DirectionalProblem {
            logits: &logits,
            derivatives: &derivatives,
            batch: 2,
            classes: 2,
            step: 0.5,
        });
        assert_eq!(out.delta_a, vec![2.0, 0.25]);
        assert!(close(out.rho_a, PI / 2.0, 1e-15));
        assert!(close(out.normalized_step, 1.0 / PI, 1e-15));
        let radius = out.binary_radius.unwrap();
        assert!(close(radius[0], (9.0 + PI * PI).sqrt() / 2.0, 1e-15));
        assert!(close(radius[1], PI / 0.25, 1e-14));

        let three = directional(&DirectionalProblem {
            logits: &[0.0; 3],
            derivatives: &[1.0, -2.0, 0.5],
            batch: 1,
            classes: 3,
            step: 1.0,
        });
        assert_eq!(three.delta_a, vec![3.0]);
        assert!(three.binary_radius.is_none());
    }
}
