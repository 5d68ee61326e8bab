use losskern_reference::bnstats as reference;

use crate::cpu::tensor;
use crate::cpu::CpuBackend;
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::bnstats::{
    BnMergeCall, BnRunningCall, BnRunningOutput, BnStatsCall, BnStatsKernels, BnStatsOutput,
};

impl BnStatsKernels for CpuBackend {
    fn bn_stats(&self, bound: &BnStatsCall<'_>) -> Result<BnStatsOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let x = call.x.to_f64_vec()?;
        let stats = reference::stats(&x, spec.shape(), spec.eps);
        let y = match call.normalize {
            Some(affine) => {
                let gamma = affine.gamma.map(Tensor::to_f64_vec).transpose()?;
                let beta = affine.beta.map(Tensor::to_f64_vec).transpose()?;
                let y = reference::normalize(
                    &x,
                    spec.shape(),
                    &stats,
                    gamma.as_deref(),
                    beta.as_deref(),
                );
                Some(tensor(&y, call.x.shape(), spec.dtype)?)
            }
            None => None,
        };
        output(&stats, (spec.n * spec.spatial) as u64, y)
    }

    /// Folds the parts left to right with the reference's Chan merge.
    fn bn_merge(&self, bound: &BnMergeCall<'_>) -> Result<BnStatsOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let mut merged = vec![
            reference::Welford {
                count: 0.0,
                mean: 0.0,
                m2: 0.0
            };
            spec.c
        ];
        for part in call.parts {
            let (mean, m2) = (part.mean.to_f64_vec()?, part.m2.to_f64_vec()?);
            for (c, acc) in merged.iter_mut().enumerate() {
                let welford = reference::Welford {
                    count: part.count as f64,
                    mean: mean[c],
                    m2: m2[c],
                };
                *acc = reference::merge(*acc, welford);
            }
        }
        output(&reference::finalize(&merged, spec.eps), spec.count, None)
    }

    fn bn_running(&self, bound: &BnRunningCall<'_>) -> Result<BnRunningOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let mut mean = call.running_mean.to_f64_vec()?;
        let mut var = call.running_var.to_f64_vec()?;
        reference::update_running(
            &mut mean,
            &mut var,
            &call.batch_mean.to_f64_vec()?,
            &call.batch_var_unbiased.to_f64_vec()?,
            spec.factor,
        );
        let channels = [spec.c];
        Ok(BnRunningOutput {
            mean: tensor(&mean, &channels, DType::F32)?,
            var: tensor(&var, &channels, DType::F32)?,
        })
    }
}

/// The f32 outputs of the reference's statistics.
fn output(stats: &reference::BnStats, count: u64, y: Option<Tensor>) -> Result<BnStatsOutput> {
    let channels = [stats.mean.len()];
    let m2: Vec<f64> = stats.partial.iter().map(|p| p.m2).collect();
    Ok(BnStatsOutput {
        count,
        mean: tensor(&stats.mean, &channels, DType::F32)?,
        var_biased: tensor(&stats.var_biased, &channels, DType::F32)?,
        var_unbiased: tensor(&stats.var_unbiased, &channels, DType::F32)?,
        invstd: tensor(&stats.invstd, &channels, DType::F32)?,
        m2: tensor(&m2, &channels, DType::F32)?,
        y,
    })
}
