//! Random batch-norm problems and the family's tolerances.
//!
//! Derivation, per channel from the data (count = N H W, k = sum_error(count), x0 = the
//! channel's first element, by which every kernel shifts the channel's values before it
//! accumulates, so that the error of a sum does not grow with an offset of the data):
//! - mean: a sum of count shifted values, plus the shift added back once:
//!   E_mean = k mean|x - x0| + u |mean|.
//! - var = sum (x - m')^2 / count with m' = mean + e: (x - mean - e)^2 sums to
//!   count (var + e^2) exactly, but a blocked or merged (Chan) accumulation meets each e
//!   once per partial, bounded without that cancellation by 2 |e| mean|x - mean| + e^2; the
//!   squares' sum adds k var: E_var = (k + 2u) var + 2 E_mean S1 + E_mean^2, S1 = mean|x - mean|.
//!   m2 = count var and var_unbiased = m2 / (count - 1) scale it (plus u).
//! - invstd = (var + eps)^(-1/2): relative E_var / (2 (var + eps)) + 5u (the add, the root).
//! - y = gamma (x - mean) invstd + beta per element:
//!   |gamma| (E_mean invstd + |x - mean| invstd (rel_invstd + 3u)) + u (|y| + |beta|)
//!   + 2 u_out |y| for the output dtype.
//!
//! A merge of batches meets each batch's f32 mean, rounded by u |mean|, before it rounds
//! the merged mean: E_mean takes 2 u |mean| there.

use losskern_reference::bnstats as reference;

use crate::check::{sum_error, widen, CaseInfo, Expected, Output, Rng, U};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::bnstats::{self, Affine, BnMerge, BnStats, BnStatsOutput, Layout, RunningStats};
use crate::support::Op;

/// A random batch-norm statistics problem.
#[derive(Clone, Debug)]
pub struct BnStatsCase {
    pub n: usize,
    pub c: usize,
    pub h: usize,
    pub w: usize,
    pub layout: Layout,
    pub dtype: DType,
    /// Offset added to every value (large offsets expose one-pass variance cancellation).
    pub offset: f64,
    pub normalize: bool,
    /// 1: one batch. More: x is cut along N into this many batches (N >= parts), each
    /// one's statistics computed on its own and merged with `bnstats::merge`, which must
    /// give the whole batch's statistics (`normalize` is then ignored).
    pub parts: usize,
    pub seed: u64,
}

pub fn cases() -> Vec<BnStatsCase> {
    let case = |n, c, h, w, layout, dtype, offset, normalize, parts, seed| BnStatsCase {
        n,
        c,
        h,
        w,
        layout,
        dtype,
        offset,
        normalize,
        parts,
        seed,
    };
    use Layout::{Nc, Nchw, Nhwc};
    vec![
        case(4, 3, 5, 7, Nchw, DType::F32, 100.0, true, 1, 41),
        case(2, 33, 3, 3, Nhwc, DType::BF16, 0.5, true, 1, 42),
        case(1, 7, 1, 1, Nc, DType::F16, 0.0, false, 1, 43),
        case(257, 5, 1, 1, Nc, DType::F32, -3.0, false, 1, 44),
        // 16-byte units in both modes (H W and C multiples of 8), a 1e4 offset in f32
        // (in bf16 it would round every value of a channel to a few numbers).
        case(3, 16, 4, 8, Nchw, DType::BF16, 0.25, true, 1, 45),
        case(2, 12, 8, 4, Nchw, DType::F32, 1e4, true, 1, 51),
        case(5, 64, 2, 3, Nhwc, DType::F16, -20.0, true, 1, 46),
        case(33, 8, 1, 1, Nchw, DType::F32, 1e4, true, 1, 47),
        // Merges of uneven splits of N.
        case(7, 5, 3, 3, Nchw, DType::F32, 10.0, false, 3, 48),
        case(9, 40, 2, 2, Nhwc, DType::BF16, -1.0, false, 4, 49),
        case(64, 3, 1, 1, Nc, DType::F16, 2.0, false, 2, 50),
    ]
}

impl BnStatsCase {
    /// x's shape in its layout.
    pub fn shape(&self) -> Vec<usize> {
        match self.layout {
            Layout::Nchw => vec![self.n, self.c, self.h, self.w],
            Layout::Nhwc => vec![self.n, self.h, self.w, self.c],
            Layout::Nc => vec![self.n, self.c],
        }
    }
}

impl BnStatsCase {
    pub(crate) fn info(&self) -> CaseInfo {
        CaseInfo {
            op: if self.parts > 1 {
                Op::BnMerge
            } else {
                Op::BnStats
            },
            dtype: self.dtype.name().into(),
            shape: if self.parts > 1 {
                format!(
                    "{:?} {:?} in {} parts",
                    self.shape(),
                    self.layout,
                    self.parts
                )
            } else {
                format!("{:?} {:?}", self.shape(), self.layout)
            },
            tolerance:
                "per channel: k mean|x - x0| + u|mean|, (k + 2u) var + 2 E_mean S1 + E_mean^2",
        }
    }

    fn bn_shape(&self) -> reference::BnShape {
        reference::BnShape {
            n: self.n,
            c: self.c,
            spatial: self.h * self.w,
            layout: self.layout,
        }
    }

    /// The channel of flat element `i`.
    fn channel(&self, i: usize) -> usize {
        match self.layout {
            Layout::Nchw => (i / (self.h * self.w)) % self.c,
            Layout::Nhwc | Layout::Nc => i % self.c,
        }
    }

    /// x (rounded to the dtype, on the CPU), gamma and beta.
    pub fn draw(&self) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
        let shape = self.shape();
        let len: usize = shape.iter().product();
        let mut rng = Rng::new(self.seed);
        let values: Vec<f64> = rng
            .normals(len, 2.0)
            .into_iter()
            .map(|v| v + self.offset)
            .collect();
        let x = Tensor::from_f64(&Device::Cpu, &values, &shape, self.dtype)?;
        let gamma: Vec<f64> = (0..self.c)
            .map(|_| f64::from((0.5 + rng.uniform()) as f32))
            .collect();
        let beta: Vec<f64> = rng
            .normals(self.c, 1.0)
            .into_iter()
            .map(|v| f64::from(v as f32))
            .collect();
        Ok((x, gamma, beta))
    }
}

const EPS: f64 = 1e-5;

pub fn outputs(case: &BnStatsCase, device: &Device) -> Result<Vec<Output>> {
    let (x, gamma64, beta64) = case.draw()?;
    let out = if case.parts > 1 {
        merged(case, &x, device)?
    } else {
        let x = x.to_device(device)?;
        let gamma = Tensor::from_f64(device, &gamma64, &[case.c], DType::F32)?;
        let beta = Tensor::from_f64(device, &beta64, &[case.c], DType::F32)?;
        let affine = Affine {
            gamma: Some(&gamma),
            beta: Some(&beta),
        };
        bnstats::bn_stats(&BnStats {
            x: &x,
            layout: case.layout,
            eps: EPS,
            normalize: case.normalize.then_some(affine),
        })?
    };
    let mut named = vec![
        ("mean", &out.mean),
        ("var_biased", &out.var_biased),
        ("var_unbiased", &out.var_unbiased),
        ("m2", &out.m2),
        ("invstd", &out.invstd),
    ];
    named.extend(out.y.as_ref().map(|y| ("y", y)));
    let mut outputs = widen(&named)?;
    outputs.push(Output {
        name: "count",
        values: vec![out.count as f64],
    });
    Ok(outputs)
}

/// The batches of a split case: x cut along N (the outermost axis in every layout) at
/// uneven points, each batch's statistics computed on `device`, then merged there.
fn merged(case: &BnStatsCase, x: &Tensor, device: &Device) -> Result<BnStatsOutput> {
    let values = x.to_f64_vec()?;
    let per_n = values.len() / case.n;
    let mut cuts: Vec<usize> = (0..case.parts).map(|k| k * case.n / case.parts).collect();
    cuts.push(case.n);
    let mut batches = Vec::with_capacity(case.parts);
    for pair in cuts.windows(2) {
        let mut shape = case.shape();
        shape[0] = pair[1] - pair[0];
        let part = &values[pair[0] * per_n..pair[1] * per_n];
        let part = Tensor::from_f64(device, part, &shape, case.dtype)?;
        batches.push(bnstats::bn_stats(&BnStats {
            x: &part,
            layout: case.layout,
            eps: EPS,
            normalize: None,
        })?);
    }
    let parts: Vec<_> = batches.iter().map(BnStatsOutput::partial).collect();
    bnstats::merge(&BnMerge {
        parts: &parts,
        eps: EPS,
    })
}

pub fn expected(case: &BnStatsCase) -> Result<Vec<Expected>> {
    let (x, gamma, beta) = case.draw()?;
    let x64 = x.to_f64_vec()?;
    let want = reference::stats(&x64, case.bn_shape(), EPS);
    let count = case.n * case.h * case.w;
    let k = sum_error(count);
    let mut first: Vec<Option<f64>> = vec![None; case.c];
    let (mut shifted, mut dev) = (vec![0.0; case.c], vec![0.0; case.c]);
    for (i, &v) in x64.iter().enumerate() {
        let c = case.channel(i);
        // Memory order meets each channel's first element (n = 0, h = w = 0) first.
        let x0 = *first[c].get_or_insert(v);
        shifted[c] += (v - x0).abs() / count as f64;
        dev[c] += (v - want.mean[c]).abs() / count as f64;
    }
    // A merge rounds the mean twice: each batch's f32 partial, then the merged output.
    let roundings = if case.parts > 1 { 2.0 } else { 1.0 };
    let e_mean: Vec<f64> = (0..case.c)
        .map(|c| k * shifted[c] + roundings * U * want.mean[c].abs())
        .collect();
    let e_var: Vec<f64> = (0..case.c)
        .map(|c| {
            (k + 2.0 * U) * want.var_biased[c] + 2.0 * e_mean[c] * dev[c] + e_mean[c] * e_mean[c]
        })
        .collect();
    let rel_invstd: Vec<f64> = (0..case.c)
        .map(|c| e_var[c] / (2.0 * (want.var_biased[c] + EPS)) + 5.0 * U)
        .collect();
    let scale = (count as f64 / (count as f64 - 1.0)).abs();
    let m2: Vec<f64> = want.partial.iter().map(|p| p.m2).collect();
    let mut e = vec![
        Expected::within("mean", want.mean.clone(), |c, _| e_mean[c]),
        Expected::within("var_biased", want.var_biased.clone(), |c, w| {
            e_var[c] + U * w.abs()
        }),
        Expected::within("var_unbiased", want.var_unbiased.clone(), |c, w| {
            e_var[c] * scale + 2.0 * U * w.abs()
        }),
        Expected::within("m2", m2, |c, w| e_var[c] * count as f64 + U * w.abs()),
        Expected::within("invstd", want.invstd.clone(), |c, w| {
            w.abs() * rel_invstd[c]
        }),
        Expected::exact("count", vec![count as f64]),
    ];
    if case.normalize && case.parts == 1 {
        let want_y = reference::normalize(&x64, case.bn_shape(), &want, Some(&gamma), Some(&beta));
        let u_out = case.dtype.unit_roundoff();
        e.push(Expected::within("y", want_y, |i, w| {
            let c = case.channel(i);
            let centred = (x64[i] - want.mean[c]).abs();
            gamma[c].abs() * want.invstd[c] * (e_mean[c] + centred * (rel_invstd[c] + 3.0 * U))
                + U * (w.abs() + beta[c].abs())
                + 2.0 * u_out * w.abs()
        }));
    }
    Ok(e)
}

/// Two running-statistics steps from PyTorch's initial state (mean 0, var 1), taken on the
/// statistics of two random batches of `batch`'s shape (seeds `batch.seed` and the next).
#[derive(Clone, Debug)]
pub struct BnRunningCase {
    pub batch: BnStatsCase,
    /// None: the cumulative average.
    pub momentum: Option<f64>,
}

pub fn running_cases() -> Vec<BnRunningCase> {
    let batch = |n, c, layout, dtype, offset, seed| BnStatsCase {
        n,
        c,
        h: 3,
        w: 2,
        layout,
        dtype,
        offset,
        normalize: false,
        parts: 1,
        seed,
    };
    vec![
        BnRunningCase {
            batch: batch(4, 6, Layout::Nchw, DType::F32, 3.0, 61),
            momentum: Some(0.1),
        },
        BnRunningCase {
            batch: batch(3, 17, Layout::Nhwc, DType::BF16, -50.0, 62),
            momentum: None,
        },
    ]
}

impl BnRunningCase {
    /// The two batches, one whole batch each.
    fn batches(&self) -> [BnStatsCase; 2] {
        let first = BnStatsCase {
            normalize: false,
            parts: 1,
            ..self.batch.clone()
        };
        let second = BnStatsCase {
            seed: first.seed.wrapping_add(1),
            ..first.clone()
        };
        [first, second]
    }

    pub(crate) fn info(&self) -> CaseInfo {
        CaseInfo {
            op: Op::BnRunning,
            dtype: self.batch.dtype.name().into(),
            shape: format!(
                "{:?} {:?}, 2 steps, momentum {:?}",
                self.batch.shape(),
                self.batch.layout,
                self.momentum
            ),
            tolerance: "the steps' mix of the batch tolerances + 4u (|running| + |batch|) per step",
        }
    }
}

pub fn running_outputs(case: &BnRunningCase, device: &Device) -> Result<Vec<Output>> {
    let mut running = RunningStats::new(device, case.batch.c)?;
    for batch in case.batches() {
        let x = batch.draw()?.0.to_device(device)?;
        let stats = bnstats::bn_stats(&BnStats {
            x: &x,
            layout: batch.layout,
            eps: EPS,
            normalize: None,
        })?;
        running.update(&stats, case.momentum)?;
    }
    widen(&[
        ("running_mean", &running.mean),
        ("running_var", &running.var),
    ])
}

/// The reference's running statistics from the reference's batch statistics; each step
/// carries the previous error by (1 - f), adds f times the batch statistic's allowance
/// and 4u (|running| + |batch|) for the f32 arithmetic of the step.
pub fn running_expected(case: &BnRunningCase) -> Result<Vec<Expected>> {
    let c = case.batch.c;
    let (mut mean, mut var) = (vec![0.0f64; c], vec![1.0f64; c]);
    let (mut e_mean, mut e_var) = (vec![0.0; c], vec![0.0; c]);
    for (step, batch) in case.batches().iter().enumerate() {
        let want = expected(batch)?;
        let field = |name: &str| {
            want.iter()
                .find(|e| e.name == name)
                .cloned()
                .ok_or_else(|| crate::error::Error::Shape(format!("no {name} expected")))
        };
        let (batch_mean, batch_var) = (field("mean")?, field("var_unbiased")?);
        let f = reference::running_factor(case.momentum, step as u64 + 1);
        for ch in 0..c {
            e_mean[ch] = (1.0 - f) * e_mean[ch]
                + f * batch_mean.allowed[ch]
                + 4.0 * U * (mean[ch].abs() + batch_mean.want[ch].abs());
            e_var[ch] = (1.0 - f) * e_var[ch]
                + f * batch_var.allowed[ch]
                + 4.0 * U * (var[ch].abs() + batch_var.want[ch].abs());
        }
        reference::update_running(&mut mean, &mut var, &batch_mean.want, &batch_var.want, f);
    }
    Ok(vec![
        Expected::within("running_mean", mean, |ch, _| e_mean[ch]),
        Expected::within("running_var", var, |ch, _| e_var[ch]),
    ])
}
