//! Random batch-norm problems and the family's tolerances.
//!
//! Derivation: the mean sums count = N H W values (relative error k = sum_error(count)),
//! so it is within k (|mean| + R) where R is the largest |x|; the variances sum squared
//! deviations, within k (|var| + R^2 u-scaled cancellation) <= k (|var| + R |mean| + R^2 / count);
//! invstd = (var + eps)^(-1/2) is within half the variance's relative error plus 4u.
//! The normalised y is within (k + 4u)(|y| + |gamma| R invstd).

use losskern_reference::bnstats as reference;

use crate::check::{report_error, sum_error, CaseInfo, Report, Rng, Verdict, U};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::bnstats::{self, Affine, BnStats, Layout};

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

pub fn run(case: &BnStatsCase, device: &Device) -> Report {
    let info = CaseInfo {
        op: "bnstats::bn_stats",
        dtype: case.dtype.name().into(),
        shape: format!("{:?} {:?}", case.shape(), case.layout),
    };
    let tolerance = "k(count) (|v| + R |mean| + R^2 / count)".to_string();
    match compare(case, device) {
        Ok(verdict) => verdict.finish(info, device, tolerance),
        Err(e) => report_error(info, device, e),
    }
}

fn compare(case: &BnStatsCase, device: &Device) -> Result<Verdict> {
    let shape = case.shape();
    let len: usize = shape.iter().product();
    let mut rng = Rng::new(case.seed);
    let values: Vec<f64> = rng
        .normals(len, 2.0)
        .into_iter()
        .map(|v| v + case.offset)
        .collect();
    let x = Tensor::from_f64(&Device::Cpu, &values, &shape, case.dtype)?;
    let x64 = x.to_f64_vec()?;
    let x = x.to_device(device)?;
    let gamma64: Vec<f64> = (0..case.c)
        .map(|_| f64::from((0.5 + rng.uniform()) as f32))
        .collect();
    let beta64: Vec<f64> = rng
        .normals(case.c, 1.0)
        .into_iter()
        .map(|v| f64::from(v as f32))
        .collect();
    let gamma = Tensor::from_f64(device, &gamma64, &[case.c], DType::F32)?;
    let beta = Tensor::from_f64(device, &beta64, &[case.c], DType::F32)?;
    let eps = 1e-5;
    let affine = Affine {
        gamma: Some(&gamma),
        beta: Some(&beta),
    };
    let out = bnstats::bn_stats(&BnStats {
        x: &x,
        layout: case.layout,
        eps,
        normalize: case.normalize.then_some(affine),
    })?;
    let bn_shape = reference::BnShape {
        n: case.n,
        c: case.c,
        spatial: case.h * case.w,
        layout: case.layout,
    };
    let want = reference::stats(&x64, bn_shape, eps);
    let count = case.n * case.h * case.w;
    let k = sum_error(count);
    let r = x64.iter().fold(0.0f64, |m, v| m.max(v.abs()));
    let mut v = Verdict::new();
    v.add("mean", &out.mean.to_f64_vec()?, &want.mean, |_, w| {
        k * (w.abs() + r)
    });
    let var = |c: usize, w: f64| k * (w.abs() + r * want.mean[c].abs() + r * r / count as f64);
    v.add(
        "var_biased",
        &out.var_biased.to_f64_vec()?,
        &want.var_biased,
        var,
    );
    v.add(
        "var_unbiased",
        &out.var_unbiased.to_f64_vec()?,
        &want.var_unbiased,
        var,
    );
    let m2: Vec<f64> = want.partial.iter().map(|p| p.m2).collect();
    v.add("m2", &out.m2.to_f64_vec()?, &m2, |c, w| {
        var(c, w / count as f64) * count as f64
    });
    v.add("invstd", &out.invstd.to_f64_vec()?, &want.invstd, |c, w| {
        w.abs() * (var(c, want.var_biased[c]) / (want.var_biased[c] + eps) + 4.0 * U)
    });
    v.add_exact("count", &[out.count as f64], &[count as f64]);
    if let Some(y) = &out.y {
        let want_y = reference::normalize(&x64, bn_shape, &want, Some(&gamma64), Some(&beta64));
        let u_out = case.dtype.unit_roundoff();
        let invstd_max = want.invstd.iter().fold(0.0f64, |m, v| m.max(*v));
        v.add("y", &y.to_f64_vec()?, &want_y, |_, w| {
            (k + 4.0 * U) * (w.abs() + 2.0 * r * invstd_max) + 2.0 * u_out * w.abs()
        });
    }
    Ok(v)
}
