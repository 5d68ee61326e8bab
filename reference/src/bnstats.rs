//! Batch-norm statistics in every layout, running stats, mergeable Welford partials.

/// Memory layout of x.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Layout {
    /// [N, C, H, W]
    #[default]
    Nchw,
    /// [N, H, W, C]
    Nhwc,
    /// [N, C] (H = W = 1)
    Nc,
}

/// Shape of x: `spatial` = H * W (1 for NC).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub n: usize,
    pub c: usize,
    pub spatial: usize,
    pub layout: Layout,
}

/// Welford partial of one channel: merges across batches and devices by Chan's formula.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Welford {
    pub count: f64,
    pub mean: f64,
    /// Sum of squared deviations from the mean.
    pub m2: f64,
}

/// Per-channel statistics, each of length C.
#[derive(Clone, Debug, PartialEq)]
pub struct BnStats {
    pub mean: Vec<f64>,
    pub var_biased: Vec<f64>,
    /// NaN when count = 1 (as PyTorch).
    pub var_unbiased: Vec<f64>,
    /// 1 / sqrt(var_biased + eps)
    pub invstd: Vec<f64>,
    pub partial: Vec<Welford>,
}

/// Statistics of x over N, H, W for each channel.
pub fn stats(x: &[f64], shape: BnShape, eps: f64) -> BnStats {
    unimplemented!("{x:?}{shape:?}{eps}")
}

/// Chan's parallel merge of two partials of the same channel.
pub fn merge(a: Welford, b: Welford) -> Welford {
    unimplemented!("{a:?}{b:?}")
}

/// Statistics (biased var, unbiased var, invstd) from a merged partial.
pub fn finalize(partials: &[Welford], eps: f64) -> BnStats {
    unimplemented!("{partials:?}{eps}")
}

/// PyTorch BatchNorm running statistics, updated in place:
/// rm = (1 - mom) rm + mom mean; rv = (1 - mom) rv + mom var_unbiased.
/// `momentum = None` is the cumulative average with factor 1 / num_batches_tracked,
/// where `num_batches_tracked` is the count after this batch (>= 1).
pub fn update_running(
    running_mean: &mut [f64],
    running_var: &mut [f64],
    stats: &BnStats,
    momentum: Option<f64>,
    num_batches_tracked: u64,
) {
    unimplemented!("{running_mean:?}{running_var:?}{stats:?}{momentum:?}{num_batches_tracked}")
}

/// y = (x - mean) * invstd * gamma + beta, in the layout of x; gamma and beta default to 1 and 0.
pub fn normalize(
    x: &[f64],
    shape: BnShape,
    stats: &BnStats,
    gamma: Option<&[f64]>,
    beta: Option<&[f64]>,
) -> Vec<f64> {
    unimplemented!("{x:?}{shape:?}{stats:?}{gamma:?}{beta:?}")
}
