//! The ensemble family on the CPU: f32 layers over fixed chunks of rows of one model at a
//! time (rayon over (model, chunk) pairs), each row's cross-entropy in f64 and the chunks'
//! sums merged in chunk order, so the result does not depend on the thread count.
//! Both precision modes run the f32 path (the CPU has no tensor cores).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::CpuBackend;
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::ensemble::{
    check_label_values, check_scan_values, EnsembleCall, EnsembleKernels, EnsembleOutput,
    EnsembleSpec, LandscapeCall, Perturbation,
};

/// Rows of one model that one task runs through every layer.
const CHUNK_ROWS: usize = 64;

/// One layer's parameters (f32, widened exactly from the inputs' dtype).
struct Params {
    weights: Vec<f32>,
    biases: Vec<f32>,
}

fn to_f32(tensor: &Tensor) -> Result<Vec<f32>> {
    Ok(tensor.to_f64_vec()?.into_iter().map(|v| v as f32).collect())
}

fn layers(weights: &[&Tensor], biases: &[&Tensor]) -> Result<Vec<Params>> {
    weights
        .iter()
        .zip(biases)
        .map(|(w, b)| {
            Ok(Params {
                weights: to_f32(w)?,
                biases: to_f32(b)?,
            })
        })
        .collect()
}

/// Where model e's parameters come from.
enum Models {
    /// E parameter sets, one after the other in each layer's tensors.
    Stacked(Vec<Params>),
    /// theta_0 + t_e D_{k_e}: a centre, K directions per layer and (k_e, t_e) per model.
    Scan {
        center: Vec<Params>,
        directions: Vec<Params>,
        direction_of: Vec<usize>,
        distance: Vec<f32>,
        perturbation: Perturbation,
        dtype: DType,
    },
}

/// `value` rounded to nearest in `dtype` (f32, f16 or bf16).
fn round_to(dtype: DType, value: f32) -> f32 {
    match dtype {
        DType::F16 => f16::from_f32(value).to_f32(),
        DType::BF16 => bf16::from_f32(value).to_f32(),
        _ => value,
    }
}

fn dot(w: &[f32], h: &[f32]) -> f32 {
    w.iter().zip(h).fold(0.0, |acc, (w, h)| acc + w * h)
}

impl Models {
    /// Layer l of model e applied to `rows` rows of `h` [rows, d_in] into `out` [rows, d_out].
    fn apply(&self, e: usize, l: usize, h: &[f32], d_in: usize, out: &mut [f32]) {
        let rows = h.len() / d_in;
        let d_out = out.len() / rows;
        let mut row_weights = vec![0.0f32; d_in];
        for j in 0..d_out {
            let cell = |r: usize| (&h[r * d_in..(r + 1) * d_in], r * d_out + j);
            match self {
                Models::Stacked(params) => {
                    let p = &params[l];
                    let at = (e * d_out + j) * d_in;
                    let w = &p.weights[at..at + d_in];
                    for r in 0..rows {
                        let (x, o) = cell(r);
                        out[o] = p.biases[e * d_out + j] + dot(w, x);
                    }
                }
                Models::Scan {
                    center,
                    directions,
                    direction_of,
                    distance,
                    perturbation,
                    dtype,
                } => {
                    let (c, d) = (&center[l], &directions[l]);
                    let (k, t) = (direction_of[e], distance[e]);
                    let w0 = &c.weights[j * d_in..(j + 1) * d_in];
                    let dw = &d.weights[(k * d_out + j) * d_in..(k * d_out + j + 1) * d_in];
                    let (b0, db) = (c.biases[j], d.biases[k * d_out + j]);
                    match perturbation {
                        Perturbation::Rounded => {
                            // The notebook's fl(w0 + fl(t d)), formed once per output unit.
                            let perturbed =
                                |w0: f32, d: f32| round_to(*dtype, w0 + round_to(*dtype, t * d));
                            for (w, (&w0, &d)) in row_weights.iter_mut().zip(w0.iter().zip(dw)) {
                                *w = perturbed(w0, d);
                            }
                            let b = perturbed(b0, db);
                            for r in 0..rows {
                                let (x, o) = cell(r);
                                out[o] = b + dot(&row_weights, x);
                            }
                        }
                        Perturbation::Split => {
                            for r in 0..rows {
                                let (x, o) = cell(r);
                                out[o] = (b0 + dot(w0, x)) + t * (db + dot(dw, x));
                            }
                        }
                    }
                }
            }
        }
    }
}

/// What one chunk of one model gives: its logits, the f64 sum of its rows' cross-entropies
/// and how many rows its argmax got right.
struct ChunkResult {
    logits: Vec<f32>,
    loss_sum: f64,
    correct: usize,
}

/// log sum exp(z) - z_y in f64 (shifted by the max; a NaN or +inf logit gives NaN).
fn cross_entropy(z: &[f32], y: usize) -> f64 {
    let max = z
        .iter()
        .fold(f64::NEG_INFINITY, |m, &v| m.max(f64::from(v)));
    let sum: f64 = z.iter().map(|&v| (f64::from(v) - max).exp()).sum();
    max + sum.ln() - f64::from(z[y])
}

/// The first index of the largest logit.
fn first_argmax(z: &[f32]) -> usize {
    (1..z.len()).fold(0, |best, k| if z[k] > z[best] { k } else { best })
}

/// A validated call's data on the host in f32: the models, X ([B, d0] shared or [E, B, d0])
/// and the labels (checked to lie in [0, C)).
struct Problem<'a> {
    spec: &'a EnsembleSpec,
    models: Models,
    x: Vec<f32>,
    labels: Vec<i64>,
}

impl Problem<'_> {
    fn chunk(&self, e: usize, chunk: usize) -> ChunkResult {
        let (widths, batch) = (&self.spec.widths, self.spec.batch);
        let d0 = widths[0];
        let first = chunk * CHUNK_ROWS;
        let rows = CHUNK_ROWS.min(batch - first);
        let base = if self.spec.shared_input { 0 } else { e * batch };
        let mut h = self.x[(base + first) * d0..(base + first + rows) * d0].to_vec();
        let layers = widths.len() - 1;
        for l in 0..layers {
            let mut out = vec![0.0f32; rows * widths[l + 1]];
            self.models.apply(e, l, &h, widths[l], &mut out);
            // ReLU between layers only: the last layer gives the logits. `< 0` rather
            // than max, so a NaN stays NaN as in the reference.
            if l + 1 < layers {
                out.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
            }
            h = out;
        }
        let classes = widths[layers];
        let (mut loss_sum, mut correct) = (0.0, 0);
        for (r, z) in h.chunks_exact(classes).enumerate() {
            // In [0, C): checked at the call.
            let y = self.labels[first + r] as usize;
            loss_sum += cross_entropy(z, y);
            correct += usize::from(first_argmax(z) == y);
        }
        ChunkResult {
            logits: h,
            loss_sum,
            correct,
        }
    }

    fn run(&self) -> Result<EnsembleOutput> {
        let (models, batch) = (self.spec.models, self.spec.batch);
        let chunks = batch.div_ceil(CHUNK_ROWS);
        let results: Vec<ChunkResult> = (0..models * chunks)
            .into_par_iter()
            .map(|task| self.chunk(task / chunks, task % chunks))
            .collect();
        let mut loss = Vec::with_capacity(models);
        let mut accuracy = Vec::with_capacity(models);
        for per_model in results.chunks(chunks) {
            let sum = per_model.iter().fold(0.0, |s, c| s + c.loss_sum);
            let correct: usize = per_model.iter().map(|c| c.correct).sum();
            loss.push(sum / batch as f64);
            accuracy.push(correct as f64 / batch as f64);
        }
        let logits = if self.spec.logits {
            let values: Vec<f32> = results.iter().flat_map(|c| c.logits.clone()).collect();
            Some(Tensor::from_slice(
                &Device::Cpu,
                &values,
                &[models, batch, self.spec.classes()],
            )?)
        } else {
            None
        };
        Ok(EnsembleOutput {
            loss: Tensor::from_slice(&Device::Cpu, &loss, &[models])?,
            accuracy: Tensor::from_slice(&Device::Cpu, &accuracy, &[models])?,
            logits,
        })
    }
}

impl EnsembleKernels for CpuBackend {
    fn forward(&self, bound: &EnsembleCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let labels = call.labels.to_vec::<i64>()?;
        check_label_values(&labels, spec.classes())?;
        Problem {
            spec,
            models: Models::Stacked(layers(call.weights, call.biases)?),
            x: to_f32(call.input)?,
            labels,
        }
        .run()
    }

    fn landscape(&self, bound: &LandscapeCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let direction_of = call.direction_of.to_vec::<i64>()?;
        let distance = call.distance.to_vec::<f32>()?;
        let widened: Vec<f64> = distance.iter().map(|&t| f64::from(t)).collect();
        check_scan_values(&widened, &direction_of, spec.directions().unwrap_or(0))?;
        let labels = call.labels.to_vec::<i64>()?;
        check_label_values(&labels, spec.classes())?;
        Problem {
            spec,
            models: Models::Scan {
                center: layers(call.center_weights, call.center_biases)?,
                directions: layers(call.direction_weights, call.direction_biases)?,
                // In [0, K): checked just above.
                direction_of: direction_of.into_iter().map(|k| k as usize).collect(),
                distance,
                perturbation: spec.perturbation().unwrap_or_default(),
                dtype: spec.dtype,
            },
            x: to_f32(call.input)?,
            labels,
        }
        .run()
    }
}
