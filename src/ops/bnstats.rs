//! bnstats: batch-norm statistics in every layout, running stats, mergeable Welford
//! partials, optional fused normalisation.

pub use crate::spec::bnstats::{
    validate, validate_merge, validate_running, Affine, BnMerge, BnMergeSpec, BnPartial, BnRunning,
    BnRunningOutput, BnRunningSpec, BnSpec, BnStats, BnStatsOutput, Layout, RunningStats, Welford,
};

use super::kernels;
use crate::device::{Device, Tensor};
use crate::error::Result;
use crate::spec::bnstats::{bind, bind_merge, bind_running, check_momentum};

/// Runs the batch-norm statistics on the input's device.
pub fn bn_stats(call: &BnStats<'_>) -> Result<BnStatsOutput> {
    kernels(call.x.device()).bn_stats(&bind(call)?)
}

/// The statistics of the union of the batches whose partials are given, on their device
/// (`y` is None): SyncBN across devices, or statistics accumulated over several batches.
pub fn merge(call: &BnMerge<'_>) -> Result<BnStatsOutput> {
    let bound = bind_merge(call)?;
    kernels(call.parts[0].mean.device()).bn_merge(&bound)
}

/// Runs one running-statistics step on the tensors' device.
pub fn running_step(call: &BnRunning<'_>) -> Result<BnRunningOutput> {
    kernels(call.running_mean.device()).bn_running(&bind_running(call)?)
}

impl RunningStats {
    /// PyTorch's initial state on `device`: mean 0, var 1, no batch tracked.
    pub fn new(device: &Device, channels: usize) -> Result<Self> {
        Ok(RunningStats {
            mean: Tensor::from_slice(device, &vec![0.0f32; channels], &[channels])?,
            var: Tensor::from_slice(device, &vec![1.0f32; channels], &[channels])?,
            num_batches_tracked: 0,
        })
    }

    /// One training step of PyTorch's BatchNorm, on the device: rm = (1 - mom) rm + mom
    /// mean; rv = (1 - mom) rv + mom var_unbiased, with mom = 1 / num_batches_tracked
    /// (counting this batch) when `momentum` is None (the cumulative average). Nothing
    /// changes when it fails.
    pub fn update(&mut self, stats: &BnStatsOutput, momentum: Option<f64>) -> Result<()> {
        if let Some(m) = momentum {
            check_momentum(m)?;
        }
        let tracked = self.num_batches_tracked + 1;
        let out = running_step(&BnRunning {
            running_mean: &self.mean,
            running_var: &self.var,
            batch_mean: &stats.mean,
            batch_var_unbiased: &stats.var_unbiased,
            factor: losskern_reference::bnstats::running_factor(momentum, tracked),
        })?;
        self.mean = out.mean;
        self.var = out.var;
        self.num_batches_tracked = tracked;
        Ok(())
    }
}
