//! Forward passes of many small MLPs on one shared batch with a fused per-model loss.

/// Parameters of E MLPs with widths [d0, ..., dL]. For layer l, `weights[l]` is
/// [E, d_{l+1}, d_l] (PyTorch Linear layout, out x in) and `biases[l]` is [E, d_{l+1}].
#[derive(Clone, Debug)]
pub struct EnsembleParams<'a> {
    pub widths: &'a [usize],
    pub models: usize,
    pub weights: Vec<&'a [f64]>,
    pub biases: Vec<&'a [f64]>,
}

/// The batch fed to every model.
#[derive(Clone, Copy, Debug)]
pub enum EnsembleInput<'a> {
    /// X [B, d0] shared by all models.
    Shared(&'a [f64]),
    /// X [E, B, d0], one batch per model.
    PerModel(&'a [f64]),
}

#[derive(Clone, Debug, PartialEq)]
pub struct EnsembleOutput {
    /// Logits [E, B, C] (C = dL).
    pub logits: Vec<f64>,
    /// Mean cross-entropy over the batch per model [E].
    pub loss: Vec<f64>,
    /// Fraction of rows whose argmax (first max) equals the label, per model [E].
    pub accuracy: Vec<f64>,
}

/// Runs E MLPs (ReLU between layers, none after the last) on a batch of B rows with labels y [B].
///
/// The loss of a row is log sum_c exp(z_c) - z_y, with the log-sum-exp shifted by the
/// row max; a NaN or +inf logit makes that model's loss NaN.
pub fn forward(
    params: &EnsembleParams<'_>,
    input: EnsembleInput<'_>,
    batch: usize,
    labels: &[i64],
) -> EnsembleOutput {
    let widths = params.widths;
    let layers = widths.len() - 1;
    let d0 = widths[0];
    let classes = widths[layers];
    let models = params.models;

    let mut logits = vec![0.0; models * batch * classes];
    let mut loss = vec![0.0; models];
    let mut accuracy = vec![0.0; models];
    for e in 0..models {
        let mut loss_sum = 0.0;
        let mut correct = 0usize;
        for r in 0..batch {
            let (x, start) = match input {
                EnsembleInput::Shared(x) => (x, r * d0),
                EnsembleInput::PerModel(x) => (x, (e * batch + r) * d0),
            };

            let mut h = x[start..start + d0].to_vec();
            for l in 0..layers {
                let (d_in, d_out) = (widths[l], widths[l + 1]);
                let w = &params.weights[l][e * d_out * d_in..(e + 1) * d_out * d_in];
                let b = &params.biases[l][e * d_out..(e + 1) * d_out];
                let mut next = vec![0.0; d_out];
                for (j, out) in next.iter_mut().enumerate() {
                    let mut acc = b[j];
                    for (i, &hi) in h.iter().enumerate() {
                        acc += w[j * d_in + i] * hi;
                    }
                    // ReLU between layers only: the last layer gives the logits.
                    *out = if l + 1 < layers && acc < 0.0 {
                        0.0
                    } else {
                        acc
                    };
                }
                h = next;
            }

            let y = labels[r] as usize;
            loss_sum += row_cross_entropy(&h, y);
            if first_argmax(&h) == y {
                correct += 1;
            }
            logits[(e * batch + r) * classes..(e * batch + r + 1) * classes].copy_from_slice(&h);
        }
        loss[e] = loss_sum / batch as f64;
        accuracy[e] = correct as f64 / batch as f64;
    }

    EnsembleOutput {
        logits,
        loss,
        accuracy,
    }
}

fn row_cross_entropy(z: &[f64], y: usize) -> f64 {
    let mut max = z[0];
    for &v in z {
        if v > max {
            max = v;
        }
    }
    let mut s = 0.0;
    for &v in z {
        s += (v - max).exp();
    }
    max + s.ln() - z[y]
}

fn first_argmax(z: &[f64]) -> usize {
    let mut best = 0;
    for (k, &v) in z.iter().enumerate() {
        if v > z[best] {
            best = k;
        }
    }
    best
}

/// How a landscape forms model e's parameters from the centre w0 and its direction d.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Perturbation {
    /// fl(w0 + fl(t d)) in the parameters' dtype, each operation in f32 and then rounded
    /// to the dtype, as PyTorch forms the notebook's `add(centre, scale(dir, t))`: what
    /// the notebook measures, its precision floor included (below t ~ u |w0| / |d| the
    /// perturbation rounds away). The rounded parameters then run in f64.
    Rounded,
    /// w0 + t d exactly (f64 here; W0 h + t (D h) layer by layer in the kernels), so the
    /// perturbation is never rounded away.
    #[default]
    Split,
}

/// The dtype the parameters of a [`Perturbation::Rounded`] scan are formed in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ParamDType {
    F32,
    F16,
    BF16,
}

impl ParamDType {
    /// `value` rounded to nearest in this dtype, widened back to f64.
    pub fn round(self, value: f64) -> f64 {
        match self {
            ParamDType::F32 => f64::from(value as f32),
            ParamDType::F16 => half::f16::from_f64(value).to_f64(),
            ParamDType::BF16 => half::bf16::from_f64(value).to_f64(),
        }
    }

    /// fl(w0 + fl(t d)): each operation in f32 (PyTorch's opmath for all three dtypes),
    /// then rounded to this dtype. `t`, `w0` and `d` are values of f32 and of this dtype,
    /// so the f64 product is exact and its rounding to f32 is the f32 product's.
    pub fn perturbed(self, w0: f64, t: f64, d: f64) -> f64 {
        let step = self.round(ParamDType::F32.round(t * d));
        self.round(ParamDType::F32.round(w0 + step))
    }
}

/// A loss-landscape scan: model e has parameters theta_0 + t_e * D_{k_e}.
/// `center_weights[l]` is [d_{l+1}, d_l] and `center_biases[l]` is [d_{l+1}];
/// `direction_weights[l]` is [K, d_{l+1}, d_l] and `direction_biases[l]` is [K, d_{l+1}].
#[derive(Clone, Debug)]
pub struct Landscape<'a> {
    pub widths: &'a [usize],
    pub center_weights: Vec<&'a [f64]>,
    pub center_biases: Vec<&'a [f64]>,
    pub directions: usize,
    pub direction_weights: Vec<&'a [f64]>,
    pub direction_biases: Vec<&'a [f64]>,
    /// k_e for each of the E models, in [0, K).
    pub direction_of: &'a [usize],
    /// t_e for each of the E models.
    pub distance: &'a [f64],
    pub perturbation: Perturbation,
    /// The parameters' dtype, in which [`Perturbation::Rounded`] forms them.
    pub dtype: ParamDType,
}

/// Runs the landscape scan on a shared batch X [B, d0] with labels y [B]; same outputs as `forward`.
///
/// Defined as `forward` on the E materialised parameter sets theta_0 + t_e * D_{k_e},
/// formed as `scan.perturbation` says.
pub fn landscape(scan: &Landscape<'_>, x: &[f64], batch: usize, labels: &[i64]) -> EnsembleOutput {
    let widths = scan.widths;
    let layers = widths.len() - 1;
    let models = scan.direction_of.len();
    let perturb = |w0: f64, t: f64, d: f64| match scan.perturbation {
        Perturbation::Rounded => scan.dtype.perturbed(w0, t, d),
        Perturbation::Split => w0 + t * d,
    };

    let mut weights: Vec<Vec<f64>> = Vec::with_capacity(layers);
    let mut biases: Vec<Vec<f64>> = Vec::with_capacity(layers);
    for l in 0..layers {
        let w_len = widths[l + 1] * widths[l];
        let b_len = widths[l + 1];
        let mut w = vec![0.0; models * w_len];
        let mut b = vec![0.0; models * b_len];
        for e in 0..models {
            let k = scan.direction_of[e];
            let t = scan.distance[e];
            for p in 0..w_len {
                w[e * w_len + p] = perturb(
                    scan.center_weights[l][p],
                    t,
                    scan.direction_weights[l][k * w_len + p],
                );
            }
            for p in 0..b_len {
                b[e * b_len + p] = perturb(
                    scan.center_biases[l][p],
                    t,
                    scan.direction_biases[l][k * b_len + p],
                );
            }
        }
        weights.push(w);
        biases.push(b);
    }

    let params = EnsembleParams {
        widths,
        models,
        weights: weights.iter().map(|w| w.as_slice()).collect(),
        biases: biases.iter().map(|b| b.as_slice()).collect(),
    };
    forward(&params, EnsembleInput::Shared(x), batch, labels)
}

/// Roughness and grit along one direction (Loss-Cartography notebook).
#[derive(Clone, Debug, PartialEq)]
pub struct Roughness {
    /// For each h with both l(h) and l(2h): (AB + BC) / AC - 1, where A = (0, l0),
    /// B = (h, l(h)), C = (2h, l(2h)) and lengths are Euclidean in (distance, loss).
    pub roughness: Vec<f64>,
    /// (l0 - 2 l(h) + l(2h)) / h for the same h.
    pub grit: Vec<f64>,
}

/// `center_loss` is l(0); `losses[i]` is l(h_i) on geometrically doubling distances
/// h_{i+1} = 2 h_i. Gives len - 1 values (none for fewer than 2 distances).
pub fn roughness(center_loss: f64, distances: &[f64], losses: &[f64]) -> Roughness {
    let mut out = Roughness {
        roughness: Vec::new(),
        grit: Vec::new(),
    };
    for i in 0..distances.len().saturating_sub(1) {
        let h = distances[i];
        let (l_a, l_b, l_c) = (center_loss, losses[i], losses[i + 1]);
        // C sits at 2h because the distances double (checked upstream).
        let ab = ((l_b - l_a) * (l_b - l_a) + h * h).sqrt();
        let bc = ((l_c - l_b) * (l_c - l_b) + h * h).sqrt();
        let ac = ((l_c - l_a) * (l_c - l_a) + 4.0 * h * h).sqrt();
        out.roughness.push((ab + bc) / ac - 1.0);
        out.grit.push((l_a - 2.0 * l_b + l_c) / h);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn close(a: f64, b: f64, tol: f64) -> bool {
        (a - b).abs() <= tol
    }

    const WIDTHS: [usize; 3] = [2, 2, 2];
    // Model 0: identity then identity with bias (0, 1).
    // Model 1: [[0, 1], [1, 1]] + (1, -1), then [[2, 0], [0, -1]].
    const W1: [f64; 8] = [1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0, 1.0];
    const B1: [f64; 4] = [0.0, 0.0, 1.0, -1.0];
    const W2: [f64; 8] = [1.0, 0.0, 0.0, 1.0, 2.0, 0.0, 0.0, -1.0];
    const B2: [f64; 4] = [0.0, 1.0, 0.0, 0.0];
    const X: [f64; 4] = [1.0, -1.0, 2.0, 3.0];
    const LABELS: [i64; 2] = [0, 1];

    fn params() -> EnsembleParams<'static> {
        EnsembleParams {
            widths: &WIDTHS,
            models: 2,
            weights: vec![&W1, &W2],
            biases: vec![&B1, &B2],
        }
    }

    #[test]
    fn two_layer_mlp_by_hand() {
        let out = forward(&params(), EnsembleInput::Shared(&X), 2, &LABELS);
        // Model 0: hidden relu(1, -1) = (1, 0), relu(2, 3) = (2, 3); logits (1, 1), (2, 4).
        // Model 1: hidden relu(0, -1) = (0, 0), relu(4, 4); logits (0, 0), (8, -4).
        assert_eq!(out.logits, vec![1.0, 1.0, 2.0, 4.0, 0.0, 0.0, 8.0, -4.0]);
        let ln2 = std::f64::consts::LN_2;
        let loss0 = (ln2 + (1.0 + (-2.0f64).exp()).ln()) / 2.0;
        let loss1 = (ln2 + 12.0 + (1.0 + (-12.0f64).exp()).ln()) / 2.0;
        assert!(close(out.loss[0], loss0, 1e-15));
        assert!(close(out.loss[1], loss1, 1e-14));
        // A tie (0, 0) picks class 0, the first max.
        assert_eq!(out.accuracy, vec![1.0, 0.5]);
    }

    #[test]
    fn per_model_input() {
        let x1 = [0.5, 0.5, -1.0, 2.0];
        let per_model: Vec<f64> = X.iter().chain(x1.iter()).copied().collect();
        let out = forward(&params(), EnsembleInput::PerModel(&per_model), 2, &LABELS);
        let shared0 = forward(&params(), EnsembleInput::Shared(&X), 2, &LABELS);
        let shared1 = forward(&params(), EnsembleInput::Shared(&x1), 2, &LABELS);
        assert_eq!(&out.logits[..4], &shared0.logits[..4]);
        assert_eq!(&out.logits[4..], &shared1.logits[4..]);
        assert_eq!(out.loss, vec![shared0.loss[0], shared1.loss[1]]);
        // Model 1 on x1: hidden relu(1.5, -0) = (1.5, 0), relu(3, 0) = (3, 0); logits (3, 0), (6, 0).
        assert_eq!(&out.logits[4..], &[3.0, 0.0, 6.0, 0.0]);
    }

    #[test]
    fn landscape_endpoints_are_plain_forwards() {
        // Centre = model 0; direction 0 = model 1 - model 0; direction 1 is arbitrary.
        let (cw1, cw2, cb1, cb2) = (&W1[..4], &W2[..4], &B1[..2], &B2[..2]);
        let diff = |a: &[f64], n: usize| -> Vec<f64> { (0..n).map(|p| a[n + p] - a[p]).collect() };
        let mut dw1 = diff(&W1, 4);
        let mut dw2 = diff(&W2, 4);
        let mut db1 = diff(&B1, 2);
        let mut db2 = diff(&B2, 2);
        dw1.extend([0.3, -0.2, 0.1, 0.4]);
        dw2.extend([1.0, 1.0, -1.0, 0.5]);
        db1.extend([0.1, 0.1]);
        db2.extend([-0.5, 0.0]);
        let scan = Landscape {
            widths: &WIDTHS,
            center_weights: vec![cw1, cw2],
            center_biases: vec![cb1, cb2],
            directions: 2,
            direction_weights: vec![&dw1, &dw2],
            direction_biases: vec![&db1, &db2],
            direction_of: &[1, 0, 0],
            distance: &[0.0, 1.0, 0.5],
            perturbation: Perturbation::Split,
            dtype: ParamDType::F32,
        };
        let out = landscape(&scan, &X, 2, &LABELS);
        let plain = forward(&params(), EnsembleInput::Shared(&X), 2, &LABELS);
        assert_eq!(&out.logits[..4], &plain.logits[..4]);
        assert_eq!(&out.logits[4..8], &plain.logits[4..]);
        assert_eq!(out.loss[..2], plain.loss[..]);
        assert_eq!(out.accuracy[..2], plain.accuracy[..]);
        // Halfway: W1 = [[0.5, 0.5], [0.5, 1]], b1 = (0.5, -0.5), W2 = [[1.5, 0], [0, 0]], b2 = (0, 0.5).
        // Row 0: hidden relu(0.5 - 0.5 + 0.5, 0.5 - 1 - 0.5) = (0.5, 0); logits (0.75, 0.5).
        assert_eq!(&out.logits[8..10], &[0.75, 0.5]);
    }

    /// One linear layer [1 -> 2] with w0 = (1, 1), b0 = (0, 0), direction d = (1, 0),
    /// db = (0, 0), on x = 1: the logits are (w0_0 + t, 1) for Split.
    fn one_layer_scan(t: &[f64], perturbation: Perturbation, dtype: ParamDType) -> Vec<f64> {
        let ks = vec![0; t.len()];
        let scan = Landscape {
            widths: &[1, 2],
            center_weights: vec![&[1.0, 1.0]],
            center_biases: vec![&[0.0, 0.0]],
            directions: 1,
            direction_weights: vec![&[1.0, 0.0]],
            direction_biases: vec![&[0.0, 0.0]],
            direction_of: &ks,
            distance: t,
            perturbation,
            dtype,
        };
        landscape(&scan, &[1.0], 1, &[1]).logits
    }

    #[test]
    fn rounded_perturbations_round_away_where_split_ones_stay() {
        // f32: 1 + 2^-25 rounds to 1 (half an ulp of 1 is 2^-24); 1 + 2^-22 is exact.
        let tiny = 2f64.powi(-25);
        let small = 2f64.powi(-22);
        let rounded = one_layer_scan(&[tiny, small], Perturbation::Rounded, ParamDType::F32);
        assert_eq!(rounded, vec![1.0, 1.0, 1.0 + small, 1.0]);
        let split = one_layer_scan(&[tiny, 1e-12], Perturbation::Split, ParamDType::F32);
        assert_eq!(split, vec![1.0 + tiny, 1.0, 1.0 + 1e-12, 1.0]);
        // bf16 (8 significant bits): t = 0.01 is fl_f32(0.01) * 1 = 0.00999999977648258,
        // rounded to bf16 0.010009765625 (0x3C24); 1 + that is 1.010009765625 in f32,
        // which rounds to 1.0078125 in bf16 (its neighbours are 1 and 1.015625).
        let t = f64::from(0.01f32);
        assert_eq!(ParamDType::BF16.round(t), 0.010009765625);
        let bf16 = one_layer_scan(&[t], Perturbation::Rounded, ParamDType::BF16);
        assert_eq!(bf16, vec![1.0078125, 1.0]);
        // f16 (11 bits): 1 + 0.01 rounds to 1.009765625 = 1 + 10 * 2^-10.
        let f16 = one_layer_scan(&[t], Perturbation::Rounded, ParamDType::F16);
        assert_eq!(f16, vec![1.009765625, 1.0]);
    }

    #[test]
    fn roughness_and_grit() {
        let h = [0.5, 1.0, 2.0, 4.0];
        let line: Vec<f64> = h.iter().map(|x| 1.0 + 2.0 * x).collect();
        let straight = roughness(1.0, &h, &line);
        assert_eq!(straight.roughness.len(), 3);
        assert!(straight.roughness.iter().all(|r| r.abs() < 1e-15));
        assert!(straight.grit.iter().all(|g| g.abs() < 1e-15));

        // l(h) = h^2: grit = (0 - 2 h^2 + 4 h^2) / h = 2h.
        let parabola: Vec<f64> = h.iter().map(|x| x * x).collect();
        let curved = roughness(0.0, &h, &parabola);
        assert_eq!(curved.grit, vec![1.0, 2.0, 4.0]);
        // h = 1: A = (0, 0), B = (1, 1), C = (2, 4).
        let expected = (2f64.sqrt() + 10f64.sqrt()) / 20f64.sqrt() - 1.0;
        assert!(close(curved.roughness[1], expected, 1e-15));
        assert!(curved.roughness.iter().all(|&r| r > 0.0));

        assert!(roughness(0.0, &[1.0], &[2.0]).roughness.is_empty());
    }
}
