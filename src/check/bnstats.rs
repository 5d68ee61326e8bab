//! Random batch-norm problems and the family's tolerances.
//!
//! Derivation, per channel from the data (count = N H W, k = sum_error(count)):
//! - mean: a sum of count values, E_mean = k mean|x| + u |mean|.
//! - var = sum (x - m')^2 / count with m' = mean + e: (x - mean - e)^2 sums to
//!   count (var + e^2) exactly, but a blocked or merged (Chan) accumulation meets each e
//!   once per partial, bounded without that cancellation by 2 |e| mean|x - mean| + e^2; the
//!   squares' sum adds k var: E_var = (k + 2u) var + 2 E_mean S1 + E_mean^2, S1 = mean|x - mean|.
//!   m2 = count var and var_unbiased = m2 / (count - 1) scale it (plus u).
//! - invstd = (var + eps)^(-1/2): relative E_var / (2 (var + eps)) + 5u (the add, the root).
//! - y = gamma (x - mean) invstd + beta per element:
//!   |gamma| (E_mean invstd + |x - mean| invstd (rel_invstd + 3u)) + u (|y| + |beta|)
//!   + 2 u_out |y| for the output dtype.

use losskern_reference::bnstats as reference;

use crate::check::{sum_error, widen, CaseInfo, Expected, Output, Rng, U};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::bnstats::{self, Affine, BnStats, Layout};
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
    pub seed: u64,
}

pub fn cases() -> Vec<BnStatsCase> {
    vec![
        BnStatsCase {
            n: 4,
            c: 3,
            h: 5,
            w: 7,
            layout: Layout::Nchw,
            dtype: DType::F32,
            offset: 100.0,
            normalize: true,
            seed: 41,
        },
        BnStatsCase {
            n: 2,
            c: 33,
            h: 3,
            w: 3,
            layout: Layout::Nhwc,
            dtype: DType::BF16,
            offset: 0.5,
            normalize: true,
            seed: 42,
        },
        BnStatsCase {
            n: 1,
            c: 7,
            h: 1,
            w: 1,
            layout: Layout::Nc,
            dtype: DType::F16,
            offset: 0.0,
            normalize: false,
            seed: 43,
        },
        BnStatsCase {
            n: 257,
            c: 5,
            h: 1,
            w: 1,
            layout: Layout::Nc,
            dtype: DType::F32,
            offset: -3.0,
            normalize: false,
            seed: 44,
        },
    ]
}

impl BnStatsCase {
    fn shape(&self) -> Vec<usize> {
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
            op: Op::BnStats,
            dtype: self.dtype.name().into(),
            shape: format!("{:?} {:?}", self.shape(), self.layout),
            tolerance: "per channel: k mean|x|, (k + 2u) var + 2 E_mean S1 + E_mean^2",
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
    fn draw(&self) -> Result<(Tensor, Vec<f64>, Vec<f64>)> {
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
    let x = x.to_device(device)?;
    let gamma = Tensor::from_f64(device, &gamma64, &[case.c], DType::F32)?;
    let beta = Tensor::from_f64(device, &beta64, &[case.c], DType::F32)?;
    let affine = Affine {
        gamma: Some(&gamma),
        beta: Some(&beta),
    };
    let out = bnstats::bn_stats(&BnStats {
        x: &x,
        layout: case.layout,
        eps: EPS,
        normalize: case.normalize.then_some(affine),
    })?;
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

pub fn expected(case: &BnStatsCase) -> Result<Vec<Expected>> {
    let (x, gamma, beta) = case.draw()?;
    let x64 = x.to_f64_vec()?;
    let want = reference::stats(&x64, case.bn_shape(), EPS);
    let count = case.n * case.h * case.w;
    let k = sum_error(count);
    let (mut abs, mut dev) = (vec![0.0; case.c], vec![0.0; case.c]);
    for (i, &v) in x64.iter().enumerate() {
        let c = case.channel(i);
        abs[c] += v.abs() / count as f64;
        dev[c] += (v - want.mean[c]).abs() / count as f64;
    }
    let e_mean: Vec<f64> = (0..case.c)
        .map(|c| k * abs[c] + U * want.mean[c].abs())
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
    if case.normalize {
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
