//! The ensemble family on the CPU: f32 layers over fixed chunks of rows of one model at a
//! time (rayon over tasks of up to [`TASK_CHUNKS`] chunks of one model), each row's
//! cross-entropy in f64 and the chunks' sums merged in chunk order, so the result does not
//! depend on the thread count.
//! Both precision modes run the f32 path (the CPU has no tensor cores). Each dot product
//! is summed in input order by fused multiply-adds (as the CUDA Exact kernels); a layer's
//! weights are transposed once per task so that LANES output units of [`ROW_GROUP`] rows
//! are computed together, each its own chain, so a row's bits do not depend on its
//! group. Chunks run through `run_best` (AVX-512, or AVX2 with FMA, where the CPU has it).
//! The parameters and X are read in place from the call's tensors (no widened copies).

use half::{bf16, f16};
use rayon::prelude::*;

use crate::cpu::{run_best, CpuBackend, Floats, Work, LANES};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::ensemble::{
    check_label_values, check_scan_values, EnsembleCall, EnsembleKernels, EnsembleOutput,
    EnsembleSpec, LandscapeCall, Perturbation,
};

/// Rows of one model that one task runs through every layer.
const CHUNK_ROWS: usize = 64;
/// Chunks of one model that one task runs, its layers transposed once for all of them.
const TASK_CHUNKS: usize = 16;
/// Rows computed together against each block of LANES output units.
const ROW_GROUP: usize = 4;

/// One layer's parameters, read in place (16-bit values widened exactly as they are read).
struct Params<'a> {
    weights: Floats<'a>,
    biases: Floats<'a>,
}

fn layers<'a>(weights: &[&'a Tensor], biases: &[&'a Tensor]) -> Result<Vec<Params<'a>>> {
    weights
        .iter()
        .zip(biases)
        .map(|(w, b)| {
            Ok(Params {
                weights: Floats::of(w)?,
                biases: Floats::of(b)?,
            })
        })
        .collect()
}

/// Where model e's parameters come from.
enum Models<'a> {
    /// E parameter sets, one after the other in each layer's tensors.
    Stacked(Vec<Params<'a>>),
    /// theta_0 + t_e D_{k_e}: a centre, K directions per layer and (k_e, t_e) per model.
    Scan {
        center: Vec<Params<'a>>,
        directions: Vec<Params<'a>>,
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

/// One layer's weights transposed to [d_in, padded] (0 past d_out, padded a multiple of
/// LANES) with its biases, so that LANES output units are one lane array.
struct Transposed {
    weights: Vec<f32>,
    biases: Vec<f32>,
    padded: usize,
}

impl Transposed {
    /// From w(j, k) and b(j) for output units j < d_out and inputs k < d_in.
    fn new(
        d_in: usize,
        d_out: usize,
        w: impl Fn(usize, usize) -> f32,
        b: impl Fn(usize) -> f32,
    ) -> Transposed {
        let padded = d_out.div_ceil(LANES) * LANES;
        let mut weights = vec![0.0f32; d_in * padded];
        // LANES inputs at a time, so that the rows being written stay in L1 while the
        // units run through them.
        for k0 in (0..d_in).step_by(LANES) {
            for j in 0..d_out {
                for k in k0..d_in.min(k0 + LANES) {
                    weights[k * padded + j] = w(j, k);
                }
            }
        }
        Transposed {
            weights,
            biases: (0..d_out).map(b).collect(),
            padded,
        }
    }

    /// sum_k h_r,k w(j, k) for the R rows h_r = h[r d_in ..] and the U LANES-wide blocks of
    /// units from j0, each sum in k order from 0 (a chain of fused multiply-adds), each
    /// (row, unit) its own lane.
    #[inline(always)]
    fn tile<const R: usize, const U: usize>(
        &self,
        h: &[f32],
        d_in: usize,
        j0: usize,
    ) -> [[[f32; LANES]; U]; R] {
        let mut acc = [[[0.0f32; LANES]; U]; R];
        let rows: [&[f32]; R] = std::array::from_fn(|r| &h[r * d_in..(r + 1) * d_in]);
        for (k, weights) in self.weights.chunks_exact(self.padded).enumerate() {
            let mut w = [[0.0f32; LANES]; U];
            for (u, wu) in w.iter_mut().enumerate() {
                wu.copy_from_slice(&weights[j0 + u * LANES..j0 + (u + 1) * LANES]);
            }
            for r in 0..R {
                let x = rows[r][k];
                for u in 0..U {
                    for l in 0..LANES {
                        acc[r][u][l] = x.mul_add(w[u][l], acc[r][u][l]);
                    }
                }
            }
        }
        acc
    }

    /// `put(r, j, sums)` for every row r of h and the U blocks of units from j0: `sums`
    /// holds the sums of units j .. j + sums.len() (units past d_out dropped), ROW_GROUP
    /// rows at a time.
    #[inline(always)]
    fn blocks<const U: usize>(
        &self,
        h: &[f32],
        d_in: usize,
        j0: usize,
        put: &mut impl FnMut(usize, usize, &[f32]),
    ) {
        let rows = h.len() / d_in.max(1);
        let d_out = self.biases.len();
        let mut emit = |r0: usize, acc: &[[[f32; LANES]; U]]| {
            for (r, ar) in acc.iter().enumerate() {
                for (u, au) in ar.iter().enumerate() {
                    let j = j0 + u * LANES;
                    put(r0 + r, j, &au[..LANES.min(d_out.saturating_sub(j))]);
                }
            }
        };
        let mut r0 = 0;
        while r0 + ROW_GROUP <= rows {
            emit(r0, &self.tile::<ROW_GROUP, U>(&h[r0 * d_in..], d_in, j0));
            r0 += ROW_GROUP;
        }
        for r in r0..rows {
            emit(r, &self.tile::<1, U>(&h[r * d_in..], d_in, j0));
        }
    }

    /// `put(r, j, sums)` with sums[i] = sum_k h_r,k w(j + i, k), for every row r of h
    /// [rows, d_in] and every unit below d_out, two blocks of LANES units at a time where
    /// the padded width allows.
    #[inline(always)]
    fn each_sum(&self, h: &[f32], d_in: usize, mut put: impl FnMut(usize, usize, &[f32])) {
        let mut j0 = 0;
        while j0 < self.biases.len() {
            if j0 + 2 * LANES <= self.padded {
                self.blocks::<2>(h, d_in, j0, &mut put);
                j0 += 2 * LANES;
            } else {
                self.blocks::<1>(h, d_in, j0, &mut put);
                j0 += LANES;
            }
        }
    }
}

/// One layer of one model, its weights transposed (see [`Transposed`]): out = b + w . x, or
/// for a Split scan (b0 + w0 . x) + t (db + dw . x).
enum Layer {
    Plain(Transposed),
    Split {
        centre: Transposed,
        direction: Transposed,
        t: f32,
    },
}

impl Layer {
    /// The layer on the rows of `h` [rows, d_in] into `out` [rows, d_out], each dot product
    /// summed in input order.
    #[inline(always)]
    fn apply(&self, h: &[f32], d_in: usize, out: &mut [f32]) {
        let d_out = out.len() / (h.len() / d_in);
        match self {
            Layer::Plain(layer) => layer.each_sum(h, d_in, biased(out, d_out, &layer.biases)),
            Layer::Split {
                centre,
                direction,
                t,
            } => {
                // The centre's part first.
                centre.each_sum(h, d_in, biased(out, d_out, &centre.biases));
                let b = &direction.biases;
                direction.each_sum(h, d_in, |r, j, sums| {
                    let o = &mut out[r * d_out + j..][..sums.len()];
                    for ((o, &b), &sum) in o.iter_mut().zip(&b[j..]).zip(sums) {
                        *o += t * (b + sum);
                    }
                });
            }
        }
    }
}

/// The `put` of [`Transposed::each_sum`] that sets units j .. of row r of `out` [rows,
/// d_out] to their bias plus their sum.
#[inline(always)]
fn biased<'o>(
    out: &'o mut [f32],
    d_out: usize,
    biases: &'o [f32],
) -> impl FnMut(usize, usize, &[f32]) + 'o {
    move |r, j, sums| {
        let o = &mut out[r * d_out + j..][..sums.len()];
        for ((o, &b), &sum) in o.iter_mut().zip(&biases[j..]).zip(sums) {
            *o = b + sum;
        }
    }
}

impl Models<'_> {
    /// Layer l of model e, [d_out, d_in].
    fn layer(&self, e: usize, l: usize, d_in: usize, d_out: usize) -> Layer {
        match self {
            Models::Stacked(params) => {
                let p = &params[l];
                Layer::Plain(Transposed::new(
                    d_in,
                    d_out,
                    |j, k| p.weights.at((e * d_out + j) * d_in + k),
                    |j| p.biases.at(e * d_out + j),
                ))
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
                let w0 = |j: usize, i: usize| c.weights.at(j * d_in + i);
                let dw = |j: usize, i: usize| d.weights.at((k * d_out + j) * d_in + i);
                let (b0, db) = (
                    |j: usize| c.biases.at(j),
                    |j: usize| d.biases.at(k * d_out + j),
                );
                match perturbation {
                    Perturbation::Rounded => {
                        // The notebook's fl(w0 + fl(t d)), formed once per parameter.
                        let perturbed =
                            |w0: f32, d: f32| round_to(*dtype, w0 + round_to(*dtype, t * d));
                        Layer::Plain(Transposed::new(
                            d_in,
                            d_out,
                            |j, i| perturbed(w0(j, i), dw(j, i)),
                            |j| perturbed(b0(j), db(j)),
                        ))
                    }
                    Perturbation::Split => Layer::Split {
                        centre: Transposed::new(d_in, d_out, w0, b0),
                        direction: Transposed::new(d_in, d_out, dw, db),
                        t,
                    },
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

/// A validated call's data on the host, read in place: the models, X ([B, d0] shared or
/// [E, B, d0]) and the labels (copied, checked to lie in [0, C)).
struct Problem<'a> {
    spec: &'a EnsembleSpec,
    models: Models<'a>,
    x: Floats<'a>,
    labels: Vec<i64>,
}

/// One task of [`Problem::run`]: chunks `first..first + count` of one model, its layers
/// transposed once for all of them.
struct ModelTask<'p, 'a> {
    problem: &'p Problem<'a>,
    model: usize,
    first: usize,
    count: usize,
}

impl Work for ModelTask<'_, '_> {
    type Output = Vec<ChunkResult>;

    #[inline(always)]
    fn run(self) -> Vec<ChunkResult> {
        let widths = &self.problem.spec.widths;
        let layers: Vec<Layer> = (0..widths.len() - 1)
            .map(|l| {
                self.problem
                    .models
                    .layer(self.model, l, widths[l], widths[l + 1])
            })
            .collect();
        // A loop, not an iterator's closure: `chunk` must inline into this function to be
        // compiled with run_best's features.
        let mut results = Vec::with_capacity(self.count);
        // Where a chunk's 16-bit rows of X are decoded (f32 rows are read in place).
        let mut decoded = vec![0.0f32; CHUNK_ROWS * widths[0]];
        for chunk in self.first..self.first + self.count {
            results.push(self.problem.chunk(self.model, chunk, &layers, &mut decoded));
        }
        results
    }
}

impl Problem<'_> {
    #[inline(always)]
    fn chunk(&self, e: usize, chunk: usize, layers: &[Layer], decoded: &mut [f32]) -> ChunkResult {
        let (widths, batch) = (&self.spec.widths, self.spec.batch);
        let d0 = widths[0];
        let first = chunk * CHUNK_ROWS;
        let rows = CHUNK_ROWS.min(batch - first);
        let base = if self.spec.shared_input { 0 } else { e * batch };
        let mut h = Vec::new();
        for (l, layer) in layers.iter().enumerate() {
            let input = if l == 0 {
                self.x.read((base + first) * d0, &mut decoded[..rows * d0])
            } else {
                &h
            };
            let mut out = vec![0.0f32; rows * widths[l + 1]];
            layer.apply(input, widths[l], &mut out);
            // ReLU between layers only: the last layer gives the logits. `< 0` rather
            // than max, so a NaN stays NaN as in the reference.
            if l + 1 < layers.len() {
                out.iter_mut().filter(|v| **v < 0.0).for_each(|v| *v = 0.0);
            }
            h = out;
        }
        let classes = widths[layers.len()];
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
        let blocks = chunks.div_ceil(TASK_CHUNKS);
        let per_task: Vec<Vec<ChunkResult>> = (0..models * blocks)
            .into_par_iter()
            .map(|task| {
                let first = (task % blocks) * TASK_CHUNKS;
                run_best(ModelTask {
                    problem: self,
                    model: task / blocks,
                    first,
                    count: TASK_CHUNKS.min(chunks - first),
                })
            })
            .collect();
        let results: Vec<ChunkResult> = per_task.into_iter().flatten().collect();
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
            x: Floats::of(call.input)?,
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
            x: Floats::of(call.input)?,
            labels,
        }
        .run()
    }
}
