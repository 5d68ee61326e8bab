//! The ensemble family on the CPU: f32 layers over fixed chunks of rows of one model at a
//! time (rayon over (model, chunk) pairs), each row's cross-entropy in f64 and the chunks'
//! sums merged in chunk order, so the result does not depend on the thread count.
//! Both precision modes run the f32 path (the CPU has no tensor cores). A dot product is
//! LANES partial sums in a fixed order, then its tail; [`ROW_GROUP`] rows share each
//! weight row's loads, each its own chain, so a row's bits do not depend on its group.
//! Chunks run through `run_best` (AVX-512 where the CPU has it).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{lane_sum, run_best, CpuBackend, Work, LANES};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::ensemble::{
    check_label_values, check_scan_values, EnsembleCall, EnsembleKernels, EnsembleOutput,
    EnsembleSpec, LandscapeCall, Perturbation,
};

/// Rows of one model that one task runs through every layer.
const CHUNK_ROWS: usize = 64;
/// Rows whose dot products with one weight row are taken together.
const ROW_GROUP: usize = 4;

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

/// w . h_r for the R rows h_r = h[r d .. (r + 1) d], d = w.len(): LANES partial sums over
/// the whole lane blocks, added in a fixed order, then the tail in order.
#[inline(always)]
fn dots<const R: usize>(w: &[f32], h: &[f32]) -> [f32; R] {
    let d = w.len();
    let whole = d / LANES * LANES;
    let mut acc = [[0.0f32; LANES]; R];
    for (c, wc) in w[..whole].chunks_exact(LANES).enumerate() {
        for (r, ar) in acc.iter_mut().enumerate() {
            let hc = &h[r * d + c * LANES..r * d + (c + 1) * LANES];
            for l in 0..LANES {
                ar[l] += wc[l] * hc[l];
            }
        }
    }
    std::array::from_fn(|r| {
        let tail = &h[r * d + whole..(r + 1) * d];
        w[whole..]
            .iter()
            .zip(tail)
            .fold(lane_sum(&acc[r]), |sum, (a, b)| sum + a * b)
    })
}

/// `put(r, w . h_r)` for every row r of h [rows, w.len()], in groups of ROW_GROUP rows.
#[inline(always)]
fn each_dot(w: &[f32], h: &[f32], mut put: impl FnMut(usize, f32)) {
    let d = w.len();
    let rows = h.len() / d.max(1);
    let mut r = 0;
    while r + ROW_GROUP <= rows {
        let sums = dots::<ROW_GROUP>(w, &h[r * d..(r + ROW_GROUP) * d]);
        for (k, sum) in sums.into_iter().enumerate() {
            put(r + k, sum);
        }
        r += ROW_GROUP;
    }
    for r in r..rows {
        let [sum] = dots::<1>(w, &h[r * d..(r + 1) * d]);
        put(r, sum);
    }
}

impl Models {
    /// Layer l of model e applied to `rows` rows of `h` [rows, d_in] into `out` [rows, d_out].
    #[inline(always)]
    fn apply(&self, e: usize, l: usize, h: &[f32], d_in: usize, out: &mut [f32]) {
        let rows = h.len() / d_in;
        let d_out = out.len() / rows;
        let mut row_weights = vec![0.0f32; d_in];
        for j in 0..d_out {
            match self {
                Models::Stacked(params) => {
                    let p = &params[l];
                    let at = (e * d_out + j) * d_in;
                    let bias = p.biases[e * d_out + j];
                    each_dot(&p.weights[at..at + d_in], h, |r, sum| {
                        out[r * d_out + j] = bias + sum;
                    });
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
                            each_dot(&row_weights, h, |r, sum| out[r * d_out + j] = b + sum);
                        }
                        Perturbation::Split => {
                            // (b0 + w0 . x) + t (db + dw . x), the centre's part first.
                            each_dot(w0, h, |r, sum| out[r * d_out + j] = b0 + sum);
                            each_dot(dw, h, |r, sum| out[r * d_out + j] += t * (db + sum));
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

/// One (model, chunk of rows) task of [`Problem::run`].
struct ChunkTask<'p, 'a> {
    problem: &'p Problem<'a>,
    model: usize,
    chunk: usize,
}

impl Work for ChunkTask<'_, '_> {
    type Output = ChunkResult;

    #[inline(always)]
    fn run(self) -> ChunkResult {
        self.problem.chunk(self.model, self.chunk)
    }
}

impl Problem<'_> {
    #[inline(always)]
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
            .map(|task| {
                run_best(ChunkTask {
                    problem: self,
                    model: task / chunks,
                    chunk: task % chunks,
                })
            })
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
