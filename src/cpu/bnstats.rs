//! bnstats on the CPU, with the GPU kernels' accumulation rules (kernels/bnstats.cu):
//! every value is shifted by its channel's first element, blocks of values form their
//! mean and the sum of squared deviations from it in f32 (two passes over the block,
//! which is in cache), and blocks merge by Chan's formula in f64, in a fixed order.
//! Work is cut from the shape alone: NCHW with H W > 1 in (channel, run of images)
//! tasks over contiguous segments; NHWC, NC (and NCHW with H W = 1) as a matrix
//! [N H W, C] in tasks of whole rows, vectorised across the channels.

use rayon::prelude::*;

use crate::cpu::{
    map_chunks, run_best, CpuBackend, Floats, FloatsMut, Work, CHUNK_ELEMENTS, LANES,
};
use crate::device::Tensor;
use crate::error::Result;
use crate::ops::bnstats::Layout;
use crate::spec::bnstats::{
    BnMergeCall, BnRunningCall, BnRunningOutput, BnSpec, BnStatsCall, BnStatsKernels, BnStatsOutput,
};

/// Values per block of a contiguous segment (rows mode).
const BLOCK: usize = 16 * LANES;
/// Elements of one block of rows (cols mode): read twice, so it stays in cache.
const BLOCK_ELEMENTS: usize = 1 << 14;
/// Rows per task at least (cols mode), so that a task's C partials cost little to merge.
const MIN_TASK_ROWS: usize = 256;

/// A Welford partial of one channel in f64.
#[derive(Clone, Copy, Debug, Default)]
struct Partial {
    count: f64,
    mean: f64,
    m2: f64,
}

/// Chan's merge of two partials of one channel; an empty side adds nothing.
#[inline(always)]
fn merge(a: Partial, b: Partial) -> Partial {
    if a.count == 0.0 {
        return b;
    }
    if b.count == 0.0 {
        return a;
    }
    let count = a.count + b.count;
    let delta = b.mean - a.mean;
    Partial {
        count,
        mean: a.mean + delta * (b.count / count),
        m2: a.m2 + b.m2 + delta * delta * (a.count * b.count / count),
    }
}

/// The partial of one block of values less `shift`: its mean, then the squared
/// deviations from that mean, each summed in f32 lanes.
#[inline(always)]
fn block_partial(values: &[f32], shift: f32) -> Partial {
    let mut sums = [0.0f32; LANES];
    let (groups, tail) = values.split_at(values.len() - values.len() % LANES);
    for group in groups.chunks_exact(LANES) {
        for l in 0..LANES {
            sums[l] += group[l] - shift;
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        sums[l] += v - shift;
    }
    let mean = crate::cpu::lane_sum(&sums) / values.len() as f32;
    let mut squares = [0.0f32; LANES];
    for group in groups.chunks_exact(LANES) {
        for l in 0..LANES {
            let d = group[l] - shift - mean;
            squares[l] = d.mul_add(d, squares[l]);
        }
    }
    for (l, &v) in tail.iter().enumerate() {
        let d = v - shift - mean;
        squares[l] = d.mul_add(d, squares[l]);
    }
    Partial {
        count: values.len() as f64,
        mean: f64::from(mean),
        m2: f64::from(crate::cpu::lane_sum(&squares)),
    }
}

/// The partial of one channel over a run of images (rows mode).
struct SegmentsTask<'a> {
    x: Floats<'a>,
    spec: &'a BnSpec,
    shift: f32,
    channel: usize,
    images: std::ops::Range<usize>,
}

impl Work for SegmentsTask<'_> {
    type Output = Partial;

    #[inline(always)]
    fn run(self) -> Partial {
        let (c, s) = (self.spec.c, self.spec.spatial);
        let mut buf = [0.0f32; BLOCK];
        let mut acc = Partial::default();
        for image in self.images {
            let start = (image * c + self.channel) * s;
            for col in (0..s).step_by(BLOCK) {
                let len = BLOCK.min(s - col);
                let values = self.x.read(start + col, &mut buf[..len]);
                acc = merge(acc, block_partial(values, self.shift));
            }
        }
        acc
    }
}

/// Rows mode: channel c is N contiguous segments of S = H W values.
fn rows_partials(x: Floats<'_>, spec: &BnSpec, shift: &[f32]) -> Vec<Partial> {
    let (n, c, s) = (spec.n, spec.c, spec.spatial);
    let images = (CHUNK_ELEMENTS / s).max(1);
    let runs = n.div_ceil(images);
    // Task t covers channel t / runs and images of run t % runs.
    let tasks = map_chunks(c * runs, 1, |task| {
        let (channel, run) = (task.start / runs, task.start % runs);
        run_best(SegmentsTask {
            x,
            spec,
            shift: shift[channel],
            channel,
            images: run * images..((run + 1) * images).min(n),
        })
    });
    tasks
        .chunks(runs)
        .map(|runs| runs.iter().copied().fold(Partial::default(), merge))
        .collect()
}

/// The partials of every channel over a range of rows (cols mode), in blocks of rows.
struct RowsTask<'a> {
    x: Floats<'a>,
    shift: &'a [f32],
    block_rows: usize,
    rows: std::ops::Range<usize>,
}

impl Work for RowsTask<'_> {
    type Output = Vec<Partial>;

    #[inline(always)]
    fn run(self) -> Vec<Partial> {
        let c = self.shift.len();
        let mut acc = vec![Partial::default(); c];
        let (mut row, mut sums, mut squares) = (vec![0.0f32; c], vec![0.0f32; c], vec![0.0f32; c]);
        for first in self.rows.clone().step_by(self.block_rows) {
            let block = first..(first + self.block_rows).min(self.rows.end);
            sums.fill(0.0);
            squares.fill(0.0);
            for r in block.clone() {
                let values = self.x.read(r * c, &mut row);
                for ((sum, &v), &s) in sums.iter_mut().zip(values).zip(self.shift) {
                    *sum += v - s;
                }
            }
            let count = block.len() as f32;
            for sum in sums.iter_mut() {
                *sum /= count;
            }
            for r in block.clone() {
                let values = self.x.read(r * c, &mut row);
                for (((square, &v), &s), &mean) in
                    squares.iter_mut().zip(values).zip(self.shift).zip(&sums)
                {
                    let d = v - s - mean;
                    *square = d.mul_add(d, *square);
                }
            }
            for ((a, &mean), &m2) in acc.iter_mut().zip(&sums).zip(&squares) {
                let part = Partial {
                    count: block.len() as f64,
                    mean: f64::from(mean),
                    m2: f64::from(m2),
                };
                *a = merge(*a, part);
            }
        }
        acc
    }
}

/// Cols mode: x is a matrix [R, C] with the channels contiguous in a row.
fn cols_partials(x: Floats<'_>, spec: &BnSpec, shift: &[f32]) -> Vec<Partial> {
    let c = spec.c;
    let rows = spec.n * spec.spatial;
    let block_rows = (BLOCK_ELEMENTS / c).max(1);
    let task_rows = (CHUNK_ELEMENTS / c).max(MIN_TASK_ROWS);
    let tasks = map_chunks(rows, task_rows, |rows| {
        run_best(RowsTask {
            x,
            shift,
            block_rows,
            rows,
        })
    });
    let mut total = vec![Partial::default(); c];
    for task in &tasks {
        for (t, &p) in total.iter_mut().zip(task) {
            *t = merge(*t, p);
        }
    }
    total
}

/// Whether channel values are contiguous segments (NCHW with H W > 1).
fn rows_mode(spec: &BnSpec) -> bool {
    spec.layout == Layout::Nchw && spec.spatial > 1
}

/// The per-channel affine of the normalisation: y = (x - mean) * scale + beta.
struct Affine<'a> {
    mean: &'a [f32],
    scale: &'a [f32],
    beta: &'a [f32],
}

/// Lines `first ..` of x normalised into `out` (a line: one segment of S values of one
/// channel in rows mode, one row of C in cols mode).
struct NormalizeChunk<'a, 'o> {
    x: Floats<'a>,
    spec: &'a BnSpec,
    affine: &'a Affine<'a>,
    line: usize,
    first: usize,
    lines: usize,
    out: FloatsMut<'o>,
}

impl Work for NormalizeChunk<'_, '_> {
    type Output = ();

    #[inline(always)]
    fn run(mut self) {
        let Affine { mean, scale, beta } = *self.affine;
        let line = self.line;
        let (mut buf, mut values) = (vec![0.0f32; line], vec![0.0f32; line]);
        for i in 0..self.lines {
            let l = self.first + i;
            let v = self.x.read(l * line, &mut buf);
            if rows_mode(self.spec) {
                let ch = l % self.spec.c;
                for (o, &v) in values.iter_mut().zip(v) {
                    *o = (v - mean[ch]) * scale[ch] + beta[ch];
                }
            } else {
                let params = mean.iter().zip(scale).zip(beta);
                for ((o, &v), ((&m, &s), &b)) in values.iter_mut().zip(v).zip(params) {
                    *o = (v - m) * s + b;
                }
            }
            self.out.write(i * line, &values);
        }
    }
}

/// y = (x - mean) * (invstd * gamma) + beta, in x's dtype and layout, written in place.
fn normalize(x: Floats<'_>, spec: &BnSpec, y: &mut Tensor, affine: &Affine<'_>) -> Result<()> {
    let line = if rows_mode(spec) {
        spec.spatial
    } else {
        spec.c
    };
    let lines = crate::cpu::chunk_rows(line);
    let total_lines = spec.n * spec.c * spec.spatial / line;
    let chunks = FloatsMut::of(y)?.chunks(lines * line);
    chunks.into_par_iter().enumerate().for_each(|(chunk, out)| {
        run_best(NormalizeChunk {
            x,
            spec,
            affine,
            line,
            first: chunk * lines,
            lines: lines.min(total_lines - chunk * lines),
            out,
        })
    });
    Ok(())
}

/// The outputs from each channel's partial (its mean relative to `shift`).
fn output(
    partials: &[Partial],
    shift: Option<&[f32]>,
    eps: f64,
    count: u64,
    y: Option<Tensor>,
) -> Result<BnStatsOutput> {
    let channels = [partials.len()];
    let tensor = |value: &dyn Fn(usize, &Partial) -> f64| {
        crate::cpu::f32_tensor(&channels, |c| value(c, &partials[c]) as f32)
    };
    Ok(BnStatsOutput {
        count,
        mean: tensor(&|c, p| p.mean + shift.map_or(0.0, |s| f64::from(s[c])))?,
        var_biased: tensor(&|_, p| p.m2 / p.count)?,
        var_unbiased: tensor(&|_, p| {
            if p.count > 1.0 {
                p.m2 / (p.count - 1.0)
            } else {
                f64::NAN
            }
        })?,
        invstd: tensor(&|_, p| 1.0 / (p.m2 / p.count + eps).sqrt())?,
        m2: tensor(&|_, p| p.m2)?,
        y,
    })
}

/// A [C] f32 parameter, or `default` in every channel.
fn channel_values(param: Option<&Tensor>, c: usize, default: f32) -> Result<Vec<f32>> {
    match param {
        Some(t) => Ok(t.host_slice::<f32>()?.to_vec()),
        None => Ok(vec![default; c]),
    }
}

impl BnStatsKernels for CpuBackend {
    fn bn_stats(&self, bound: &BnStatsCall<'_>) -> Result<BnStatsOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let x = Floats::of(call.x)?;
        let mut first = [0.0f32];
        let shift: Vec<f32> = (0..spec.c)
            .map(|c| {
                let at = if rows_mode(spec) { c * spec.spatial } else { c };
                x.read(at, &mut first)[0]
            })
            .collect();
        let partials = if rows_mode(spec) {
            rows_partials(x, spec, &shift)
        } else {
            cols_partials(x, spec, &shift)
        };
        let stats = output(
            &partials,
            Some(&shift),
            spec.eps,
            (spec.n * spec.spatial) as u64,
            None,
        )?;
        let Some(affine) = call.normalize else {
            return Ok(stats);
        };
        let mean = stats.mean.host_slice::<f32>()?;
        let gamma = channel_values(affine.gamma, spec.c, 1.0)?;
        let beta = channel_values(affine.beta, spec.c, 0.0)?;
        let scale: Vec<f32> = stats
            .invstd
            .host_slice::<f32>()?
            .iter()
            .zip(&gamma)
            .map(|(&s, &g)| s * g)
            .collect();
        let mut y = Tensor::host_output(call.x.shape(), spec.dtype)?;
        normalize(
            x,
            spec,
            &mut y,
            &Affine {
                mean,
                scale: &scale,
                beta: &beta,
            },
        )?;
        Ok(BnStatsOutput {
            y: Some(y),
            ..stats
        })
    }

    /// Folds the parts left to right with Chan's merge, in f64.
    fn bn_merge(&self, bound: &BnMergeCall<'_>) -> Result<BnStatsOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let mut merged = vec![Partial::default(); spec.c];
        for part in call.parts {
            let (mean, m2) = (part.mean.host_slice::<f32>()?, part.m2.host_slice::<f32>()?);
            for ((acc, &mean), &m2) in merged.iter_mut().zip(mean).zip(m2) {
                let p = Partial {
                    count: part.count as f64,
                    mean: f64::from(mean),
                    m2: f64::from(m2),
                };
                *acc = merge(*acc, p);
            }
        }
        output(&merged, None, spec.eps, spec.count, None)
    }

    /// rm' = (1 - f) rm + f mean, rv' = (1 - f) rv + f var_unbiased, in f64.
    fn bn_running(&self, bound: &BnRunningCall<'_>) -> Result<BnRunningOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let (f, keep) = (spec.factor, 1.0 - spec.factor);
        let step = |running: &Tensor, batch: &Tensor| -> Result<Tensor> {
            let (running, batch) = (running.host_slice::<f32>()?, batch.host_slice::<f32>()?);
            crate::cpu::f32_tensor(&[spec.c], |c| {
                (keep * f64::from(running[c]) + f * f64::from(batch[c])) as f32
            })
        };
        Ok(BnRunningOutput {
            mean: step(call.running_mean, call.batch_mean)?,
            var: step(call.running_var, call.batch_var_unbiased)?,
        })
    }
}
