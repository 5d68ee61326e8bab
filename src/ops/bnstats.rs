//! bnstats: batch-norm statistics in every layout, running stats, mergeable Welford
//! partials, optional fused normalisation.

pub use crate::spec::bnstats::{
    merge, validate, Affine, BnSpec, BnStats, BnStatsOutput, Layout, RunningStats, Welford,
};

use super::kernels;
use crate::error::Result;
use crate::spec::bnstats::bind;

/// Runs the batch-norm statistics on the input's device.
pub fn bn_stats(call: &BnStats<'_>) -> Result<BnStatsOutput> {
    kernels(call.x.device()).bn_stats(&bind(call)?)
}
