//! Random ensemble problems and the family's tolerances.
//!
//! Derivation, per logit from the data: layer l's dot products of d_l terms plus a bias are
//! each within k_l = sum_error(d_l + 1) of |b| + |W| |h|, and ReLU is 1-Lipschitz, so the
//! errors of L layers add up to at most L k P, where P is the logit of the "absolute
//! network" (every weight, bias and input replaced by its magnitude, which the reference
//! itself computes) and k the largest k_l. A Split landscape computes W0 h + t (D h) in f32:
//! the product by t and the sum round, 2u of |W0| |h| + |t| |D| |h|, which the absolute
//! network of |c| + |t| |d| bounds: 2u L P more. A Rounded landscape forms exactly the
//! parameters the reference rounds (same operations, same roundings), so it adds nothing;
//! its absolute network is that of fl(|c| + |t| |d|), which bounds |fl(c + t d)| since
//! rounding is monotonic. The output rounds once: u |logit|.
//!
//! TensorCore (MMA on rounded operands, f32 accumulation), per layer l of d = d_l inputs:
//! each operand is rounded to the MMA type with relative error at most v_l: tf32 (f32
//! inputs, cvt.rna: 10 stored bits) v = 2^-11 for X, W and the activations alike; for f16
//! and bf16 inputs X and W are already exact (v_0 = 0, the perturbed weights of a Rounded
//! scan too, as the reference rounds them to the dtype) and the f32 activations of the
//! layers after the first are rounded to the dtype: v = 2^-11 (f16) or 2^-8 (bf16). A
//! product of two rounded operands is exact in f32 (at most 2 x 11 bits) and within
//! (1 + v)^2 - 1 of the true one. The MMA's f32 accumulation is not a chain of
//! round-to-nearest adds: each instruction aligns its k + 1 terms (k products and the
//! accumulator) to the largest and truncates, each term off by at most one ulp (2u) of
//! that largest, over ceil(d / k) instructions: at most 2u (d + ceil(d / k)) <= 4u (d + 1)
//! of |b| + sum |w'| |h'|, with the bias added in f32 (one more u, inside the same
//! allowance). So layer l's relative error is k_l = (1 + v_l)^2 (1 + 4u (d + 1)) - 1 of its
//! absolute network, never taken below the Exact k_l (backends without MMA run Exact), and
//! the logits' error is (sum_l k_l + L x the Split term) P + u |logit|. f16 activations are
//! assumed inside f16's normal range (|h| in [2^-14, 65504]; the check data are): below it
//! the rounding is absolute, not relative. The loss of a model is a mean of B cross-entropies
//! lse(z) - z_y: each within sum_k p_k E_k + E_y of the logits' errors E, plus its own
//! rounding (k_C + 8u)(|lse| + |z_y|); the mean adds k_B of the sum of |CE|.
//! Accuracy: a row's argmax can move only where another class k comes within the two
//! logits' errors of the reference's top class (z_top - z_k <= E_top + E_k); each such
//! ambiguous row may change the accuracy by 1/B, other rows not at all.

use losskern_reference::ensemble as reference;

use crate::check::{sum_error, CaseInfo, Expected, Output, Rng, U};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::ensemble::{self, Ensemble, Landscape, Perturbation, Precision};
use crate::support::Op;

/// A random ensemble (or landscape) problem.
#[derive(Clone, Debug)]
pub struct EnsembleCase {
    pub widths: Vec<usize>,
    pub models: usize,
    pub batch: usize,
    pub dtype: DType,
    pub shared_input: bool,
    /// Run as a landscape scan with this many directions.
    pub directions: Option<usize>,
    /// How a landscape scan forms its parameters.
    pub perturbation: Perturbation,
    pub precision: Precision,
    pub seed: u64,
}

pub fn cases() -> Vec<EnsembleCase> {
    let case = |widths: &[usize], models, batch, dtype, shared_input, seed| EnsembleCase {
        widths: widths.to_vec(),
        models,
        batch,
        dtype,
        shared_input,
        directions: None,
        perturbation: Perturbation::Split,
        precision: Precision::Exact,
        seed,
    };
    let scan = |case: EnsembleCase, k, perturbation| EnsembleCase {
        directions: Some(k),
        perturbation,
        ..case
    };
    let tensor_core = |case: EnsembleCase| EnsembleCase {
        precision: Precision::TensorCore,
        ..case
    };
    vec![
        case(&[5, 8, 3], 4, 9, DType::F32, true, 51),
        case(&[33, 17, 16, 10], 3, 31, DType::BF16, false, 57),
        case(&[9, 1, 3], 2, 65, DType::F32, true, 54),
        // Wider than the GPU kernels keep on chip, per-model input.
        case(&[6, 200, 7], 3, 40, DType::BF16, false, 58),
        scan(
            case(&[12, 6, 4], 6, 16, DType::F16, true, 53),
            2,
            Perturbation::Split,
        ),
        scan(
            case(&[20, 64, 10], 9, 70, DType::F32, true, 59),
            3,
            Perturbation::Split,
        ),
        scan(
            case(&[17, 129, 3], 5, 70, DType::F32, true, 55),
            2,
            Perturbation::Rounded,
        ),
        scan(
            case(&[3, 17, 17, 5], 4, 12, DType::BF16, true, 56),
            3,
            Perturbation::Rounded,
        ),
        // TensorCore: ragged inputs (not a multiple of the MMA's k) and rows, each dtype;
        // [5, 200] keeps its activations in scratch, two column passes. The bound is v P
        // with P the absolute network's logit, which grows ~0.6 sqrt(d) a layer, so these
        // stay narrow (and bf16, whose hidden activations round by 2^-8, and the scans,
        // whose P adds |t| |D|, single-layer) for it to still catch a mutation at 4x
        // (tests/it/mutation.rs); the property test draws deeper and wider ones.
        tensor_core(case(&[4, 6, 2], 5, 70, DType::F32, true, 61)),
        tensor_core(case(&[5, 200], 2, 40, DType::F32, false, 62)),
        tensor_core(case(&[40, 7], 3, 33, DType::BF16, false, 63)),
        tensor_core(case(&[6, 9, 2], 4, 65, DType::F16, true, 64)),
        tensor_core(scan(
            case(&[6, 3], 4, 70, DType::F32, true, 65),
            2,
            Perturbation::Split,
        )),
        tensor_core(scan(
            case(&[17, 3], 5, 70, DType::BF16, true, 66),
            2,
            Perturbation::Rounded,
        )),
    ]
}

/// Rounded random parameters: layer l is [lead.., d_{l+1}, d_l] and [lead.., d_{l+1}], scaled by 1/sqrt(d_l).
fn draw_layers(
    rng: &mut Rng,
    widths: &[usize],
    lead: &[usize],
    dtype: DType,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let mut weights = Vec::new();
    let mut biases = Vec::new();
    for pair in widths.windows(2) {
        let (inp, out) = (pair[0], pair[1]);
        let count: usize = lead.iter().product();
        let w_shape: Vec<usize> = lead.iter().copied().chain([out, inp]).collect();
        let b_shape: Vec<usize> = lead.iter().copied().chain([out]).collect();
        weights.push(Tensor::from_f64(
            &Device::Cpu,
            &rng.normals(count * out * inp, 1.0 / (inp as f64).sqrt()),
            &w_shape,
            dtype,
        )?);
        biases.push(Tensor::from_f64(
            &Device::Cpu,
            &rng.normals(count * out, 0.1),
            &b_shape,
            dtype,
        )?);
    }
    Ok((weights, biases))
}

fn slices(values: &[Vec<f64>]) -> Vec<&[f64]> {
    values.iter().map(Vec::as_slice).collect()
}

fn to_device(tensors: &[Tensor], device: &Device) -> Result<Vec<Tensor>> {
    tensors.iter().map(|t| t.to_device(device)).collect()
}

impl EnsembleCase {
    pub(crate) fn info(&self) -> CaseInfo {
        CaseInfo {
            op: if self.directions.is_some() {
                Op::EnsembleLandscape
            } else {
                Op::EnsembleForward
            },
            dtype: self.dtype.name().into(),
            shape: match self.directions {
                Some(k) => format!(
                    "E{} B{} {:?} K{k} {:?}",
                    self.models, self.batch, self.widths, self.perturbation
                ),
                None => format!("E{} B{} {:?}", self.models, self.batch, self.widths),
            },
            tolerance: match self.precision {
                Precision::Exact => {
                    "per logit L (k + 2u split) P(|net|) + u|v|; loss from the logits' E"
                }
                Precision::TensorCore => {
                    "per logit (sum_l (1+v_l)^2 (1+4u(d_l+1)) - 1 + 2u split) P(|net|) + u|v|, \
                     v = 2^-11 tf32/f16, 2^-8 bf16; loss from the logits' E"
                }
            },
        }
    }
}

/// The drawn problem on the CPU: input, labels and parameters (center and directions for a
/// landscape), in the order `draw` makes them so the device and the reference agree.
struct Drawn {
    x: Tensor,
    labels: Vec<i64>,
    layers: Vec<(Vec<Tensor>, Vec<Tensor>)>,
    direction_of: Vec<i64>,
    distance: Vec<f64>,
}

fn draw(case: &EnsembleCase) -> Result<Drawn> {
    let mut rng = Rng::new(case.seed);
    let (e, b, widths) = (case.models, case.batch, &case.widths);
    let classes = widths[widths.len() - 1];
    let x_shape = if case.shared_input {
        vec![b, widths[0]]
    } else {
        vec![e, b, widths[0]]
    };
    let x_len: usize = x_shape.iter().product();
    let x = Tensor::from_f64(&Device::Cpu, &rng.normals(x_len, 1.0), &x_shape, case.dtype)?;
    let labels: Vec<i64> = (0..b).map(|_| rng.below(classes) as i64).collect();
    let (layers, direction_of, distance) = match case.directions {
        None => (
            vec![draw_layers(&mut rng, widths, &[e], case.dtype)?],
            Vec::new(),
            Vec::new(),
        ),
        Some(k) => {
            let center = draw_layers(&mut rng, widths, &[], case.dtype)?;
            let directions = draw_layers(&mut rng, widths, &[k], case.dtype)?;
            let direction_of = (0..e).map(|i| (i % k) as i64).collect();
            let distance = (0..e)
                .map(|i| f64::from((0.25 * (1u32 << (i / k)) as f64) as f32))
                .collect();
            (vec![center, directions], direction_of, distance)
        }
    };
    Ok(Drawn {
        x,
        labels,
        layers,
        direction_of,
        distance,
    })
}

pub fn outputs(case: &EnsembleCase, device: &Device) -> Result<Vec<Output>> {
    let drawn = draw(case)?;
    let x = drawn.x.to_device(device)?;
    let y = Tensor::from_slice(device, &drawn.labels, &[case.batch])?;
    let dev: Vec<(Vec<Tensor>, Vec<Tensor>)> = drawn
        .layers
        .iter()
        .map(|(w, b)| Ok((to_device(w, device)?, to_device(b, device)?)))
        .collect::<Result<_>>()?;
    let refs: Vec<(Vec<&Tensor>, Vec<&Tensor>)> = dev
        .iter()
        .map(|(w, b)| (w.iter().collect(), b.iter().collect()))
        .collect();
    let out = match case.directions {
        None => ensemble::forward(&Ensemble {
            weights: &refs[0].0,
            biases: &refs[0].1,
            input: &x,
            labels: &y,
            logits: true,
            precision: case.precision,
        })?,
        Some(_) => {
            let k_tensor = Tensor::from_slice(device, &drawn.direction_of, &[case.models])?;
            let t_tensor = Tensor::from_f64(device, &drawn.distance, &[case.models], DType::F32)?;
            ensemble::landscape(&Landscape {
                center_weights: &refs[0].0,
                center_biases: &refs[0].1,
                direction_weights: &refs[1].0,
                direction_biases: &refs[1].1,
                direction_of: &k_tensor,
                distance: &t_tensor,
                input: &x,
                labels: &y,
                logits: true,
                precision: case.precision,
                perturbation: case.perturbation,
            })?
        }
    };
    let mut named = vec![("loss", &out.loss), ("accuracy", &out.accuracy)];
    named.extend(out.logits.as_ref().map(|l| ("logits", l)));
    crate::check::widen(&named)
}

/// The reference's name for a parameter dtype (validation admits only these three).
fn param_dtype(dtype: DType) -> reference::ParamDType {
    match dtype {
        DType::F16 => reference::ParamDType::F16,
        DType::BF16 => reference::ParamDType::BF16,
        _ => reference::ParamDType::F32,
    }
}

/// The reference on the drawn problem, with every value replaced by its magnitude when
/// `absolute` (the absolute network of the module doc).
fn reference_run(
    case: &EnsembleCase,
    drawn: &Drawn,
    absolute: bool,
) -> Result<reference::EnsembleOutput> {
    let magnitude = |v: Vec<f64>| -> Vec<f64> {
        if absolute {
            v.into_iter().map(f64::abs).collect()
        } else {
            v
        }
    };
    let host = |t: &[Tensor]| -> Result<Vec<Vec<f64>>> {
        t.iter().map(|t| Ok(magnitude(t.to_f64_vec()?))).collect()
    };
    let x64 = magnitude(drawn.x.to_f64_vec()?);
    let widths = &case.widths;
    Ok(match case.directions {
        None => {
            let (w64, b64) = (host(&drawn.layers[0].0)?, host(&drawn.layers[0].1)?);
            let params = reference::EnsembleParams {
                widths,
                models: case.models,
                weights: slices(&w64),
                biases: slices(&b64),
            };
            let input = if case.shared_input {
                reference::EnsembleInput::Shared(&x64)
            } else {
                reference::EnsembleInput::PerModel(&x64)
            };
            reference::forward(&params, input, case.batch, &drawn.labels)
        }
        Some(k) => {
            let (cw, cb) = (host(&drawn.layers[0].0)?, host(&drawn.layers[0].1)?);
            let (dw, db) = (host(&drawn.layers[1].0)?, host(&drawn.layers[1].1)?);
            let ks: Vec<usize> = drawn.direction_of.iter().map(|&k| k as usize).collect();
            let distance = magnitude(drawn.distance.clone());
            let scan = reference::Landscape {
                widths,
                center_weights: slices(&cw),
                center_biases: slices(&cb),
                directions: k,
                direction_weights: slices(&dw),
                direction_biases: slices(&db),
                direction_of: &ks,
                distance: &distance,
                perturbation: case.perturbation,
                dtype: param_dtype(case.dtype),
            };
            reference::landscape(&scan, &x64, case.batch, &drawn.labels)
        }
    })
}

pub fn expected(case: &EnsembleCase) -> Result<Vec<Expected>> {
    let drawn = draw(case)?;
    let want = reference_run(case, &drawn, false)?;
    let absolute = reference_run(case, &drawn, true)?;
    let layers = (case.widths.len() - 1) as f64;
    let per_parameter = if case.directions.is_some() && case.perturbation == Perturbation::Split {
        2.0 * U
    } else {
        0.0
    };
    let relative = layers * per_parameter + network_error(case);
    let logit_error: Vec<f64> = want
        .logits
        .iter()
        .zip(&absolute.logits)
        .map(|(w, p)| relative * p + U * w.abs())
        .collect();
    let (b, classes) = (case.batch, case.widths[case.widths.len() - 1]);
    let k_classes = sum_error(classes) + 8.0 * U;
    let loss_error: Vec<f64> = (0..case.models)
        .map(|e| {
            let (mut rows, mut magnitude) = (0.0, 0.0);
            for r in 0..b {
                let at = (e * b + r) * classes;
                let z = &want.logits[at..at + classes];
                let err = &logit_error[at..at + classes];
                let m = z.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                let lse = m + z.iter().map(|v| (v - m).exp()).sum::<f64>().ln();
                let y = drawn.labels[r] as usize;
                let spread: f64 = z.iter().zip(err).map(|(v, e)| (v - lse).exp() * e).sum();
                rows += spread + err[y] + k_classes * (lse.abs() + z[y].abs());
                magnitude += (lse - z[y]).abs();
            }
            (rows + sum_error(b) * magnitude) / b as f64
        })
        .collect();
    let accuracy_error: Vec<f64> = (0..case.models)
        .map(|e| ambiguous_rows(&want.logits, &logit_error, e, b, classes))
        .collect();
    Ok(vec![
        Expected::within("logits", want.logits, |i, _| logit_error[i]),
        Expected::within("loss", want.loss, |e, w| loss_error[e] + U * w.abs()),
        Expected::within("accuracy", want.accuracy, |e, _| accuracy_error[e]),
    ])
}

/// The layers' part of a logit's relative error against its absolute network (module
/// doc): Exact L max_l k_l, TensorCore sum_l k_l with the MMA operands' rounding.
fn network_error(case: &EnsembleCase) -> f64 {
    let inputs = &case.widths[..case.widths.len() - 1];
    let exact = |d: usize| sum_error(d + 1);
    match case.precision {
        Precision::Exact => {
            inputs.len() as f64 * inputs.iter().map(|&d| exact(d)).fold(0.0, f64::max)
        }
        Precision::TensorCore => inputs
            .iter()
            .enumerate()
            .map(|(l, &d)| {
                let v = operand_rounding(case.dtype, l);
                let mma = (1.0 + v) * (1.0 + v) * (1.0 + 4.0 * U * (d + 1) as f64) - 1.0;
                mma.max(exact(d))
            })
            .sum(),
    }
}

/// The relative rounding of layer l's MMA operands (module doc).
fn operand_rounding(dtype: DType, layer: usize) -> f64 {
    match (dtype, layer) {
        (DType::F32, _) => 2f64.powi(-11),
        (_, 0) => 0.0,
        (DType::BF16, _) => 2f64.powi(-8),
        _ => 2f64.powi(-11),
    }
}

/// The share of model e's B rows whose argmax the logits' errors could move: some class
/// k comes within E_top + E_k of the reference's first top class.
fn ambiguous_rows(logits: &[f64], error: &[f64], e: usize, batch: usize, classes: usize) -> f64 {
    let ambiguous = (0..batch)
        .filter(|r| {
            let at = (e * batch + r) * classes;
            let (z, err) = (&logits[at..at + classes], &error[at..at + classes]);
            let top = (1..classes).fold(0, |best, k| if z[k] > z[best] { k } else { best });
            (0..classes).any(|k| k != top && z[top] - z[k] <= err[top] + err[k])
        })
        .count();
    ambiguous as f64 / batch as f64
}
