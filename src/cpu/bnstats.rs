use losskern_reference::bnstats as reference;

use crate::cpu::tensor;
use crate::cpu::CpuBackend;
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::bnstats::{BnStatsCall, BnStatsKernels, BnStatsOutput};

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
        let channels = [spec.c];
        let m2: Vec<f64> = stats.partial.iter().map(|p| p.m2).collect();
        Ok(BnStatsOutput {
            count: (spec.n * spec.spatial) as u64,
            mean: tensor(&stats.mean, &channels, DType::F32)?,
            var_biased: tensor(&stats.var_biased, &channels, DType::F32)?,
            var_unbiased: tensor(&stats.var_unbiased, &channels, DType::F32)?,
            invstd: tensor(&stats.invstd, &channels, DType::F32)?,
            m2: tensor(&m2, &channels, DType::F32)?,
            y,
        })
    }
}
