//! bnstats: batch-norm statistics in every layout, running statistics, mergeable
//! Welford partials and an optional fused normalisation.

pub use losskern_reference::bnstats::{merge, Layout, Welford};

use super::{check_finite, check_same_device, float_dtype, BackendKind, Bound};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::support::Op;

/// Statistics of x over N, H, W per channel.
#[derive(Clone, Copy, Debug)]
pub struct BnStats<'a> {
    /// x in `layout`: NCHW [N, C, H, W], NHWC [N, H, W, C] or NC [N, C].
    pub x: &'a Tensor,
    pub layout: Layout,
    /// invstd = 1 / sqrt(var_biased + eps), eps >= 0.
    pub eps: f64,
    /// Also write y = (x - mean) * invstd * gamma + beta (gamma, beta [C] f32, default 1 and 0).
    pub normalize: Option<Affine<'a>>,
}

/// The affine part of the fused normalisation.
#[derive(Clone, Copy, Debug, Default)]
pub struct Affine<'a> {
    pub gamma: Option<&'a Tensor>,
    pub beta: Option<&'a Tensor>,
}

/// A validated batch-norm problem: `spatial` = H * W (1 for NC), count = N * spatial.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnSpec {
    pub(crate) n: usize,
    pub(crate) c: usize,
    pub(crate) spatial: usize,
    pub(crate) layout: Layout,
    pub(crate) dtype: DType,
    pub(crate) eps: f64,
    pub(crate) normalize: bool,
}

impl BnSpec {
    pub fn n(&self) -> usize {
        self.n
    }

    pub fn c(&self) -> usize {
        self.c
    }

    pub fn spatial(&self) -> usize {
        self.spatial
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }

    pub fn normalize(&self) -> bool {
        self.normalize
    }
}

impl BnSpec {
    pub fn shape(&self) -> losskern_reference::bnstats::BnShape {
        losskern_reference::bnstats::BnShape {
            n: self.n,
            c: self.c,
            spatial: self.spatial,
            layout: self.layout,
        }
    }
}

/// Per-channel outputs [C] f32 on x's device; `count` is N * H * W. The Welford
/// partial of channel c is (count, mean[c], m2[c]). `var_unbiased` is NaN when
/// count = 1, as in PyTorch. `y` has x's shape and dtype.
#[derive(Debug)]
pub struct BnStatsOutput {
    pub count: u64,
    pub mean: Tensor,
    pub var_biased: Tensor,
    pub var_unbiased: Tensor,
    pub invstd: Tensor,
    pub m2: Tensor,
    pub y: Option<Tensor>,
}

impl BnStatsOutput {
    /// The per-channel Welford partials, on the host, ready for `merge` across batches or devices.
    pub fn partials(&self) -> Result<Vec<Welford>> {
        let mean = self.mean.to_f64_vec()?;
        let m2 = self.m2.to_f64_vec()?;
        Ok(mean
            .iter()
            .zip(&m2)
            .map(|(&mean, &m2)| Welford {
                count: self.count as f64,
                mean,
                m2,
            })
            .collect())
    }
}

pub fn validate(call: &BnStats<'_>) -> Result<BnSpec> {
    let dtype = float_dtype("x", call.x)?;
    let (n, c, spatial) = match (call.layout, call.x.shape()) {
        (Layout::Nchw, &[n, c, h, w]) => (n, c, h * w),
        (Layout::Nhwc, &[n, h, w, c]) => (n, c, h * w),
        (Layout::Nc, &[n, c]) => (n, c, 1),
        (layout, shape) => {
            return Err(Error::Shape(format!(
                "x of shape {shape:?} does not fit layout {layout:?}"
            )))
        }
    };
    if n * spatial == 0 {
        return Err(Error::Empty(format!(
            "x {:?} has count N*H*W = 0",
            call.x.shape()
        )));
    }
    if c == 0 {
        return Err(Error::Empty(format!(
            "x {:?} has no channels",
            call.x.shape()
        )));
    }
    check_finite("eps", call.eps)?;
    if call.eps < 0.0 {
        return Err(Error::Option(format!("eps must be >= 0, got {}", call.eps)));
    }
    if let Some(affine) = call.normalize {
        for (name, param) in [("gamma", affine.gamma), ("beta", affine.beta)] {
            let Some(p) = param else { continue };
            check_same_device(call.x, p, name)?;
            if p.dtype() != DType::F32 || p.shape() != [c] {
                return Err(Error::Shape(format!(
                    "{name} must be [{c}] f32, got {:?} {}",
                    p.shape(),
                    p.dtype()
                )));
            }
        }
    }
    Ok(BnSpec {
        n,
        c,
        spatial,
        layout: call.layout,
        dtype,
        eps: call.eps,
        normalize: call.normalize.is_some(),
    })
}

/// A validated batch-norm statistics call, as the backends receive it.
pub(crate) type BnStatsCall<'a> = Bound<BnStats<'a>, BnSpec>;

pub(crate) fn bind<'a>(call: &BnStats<'a>) -> Result<BnStatsCall<'a>> {
    Ok(Bound::new(*call, validate(call)?))
}

/// The bnstats family's kernels on one backend; an op without a kernel there is refused.
pub(crate) trait BnStatsKernels: BackendKind {
    fn bn_stats(&self, _call: &BnStatsCall<'_>) -> Result<BnStatsOutput> {
        Err(self.unsupported(Op::BnStats))
    }
}

/// PyTorch BatchNorm running statistics, kept on the host in f64.
#[derive(Clone, Debug, PartialEq)]
pub struct RunningStats {
    pub mean: Vec<f64>,
    pub var: Vec<f64>,
    pub num_batches_tracked: u64,
}

impl RunningStats {
    /// PyTorch's initial state: mean 0, var 1, no batch tracked.
    pub fn new(channels: usize) -> Self {
        RunningStats {
            mean: vec![0.0; channels],
            var: vec![1.0; channels],
            num_batches_tracked: 0,
        }
    }

    /// rm = (1 - mom) rm + mom mean; rv = (1 - mom) rv + mom var_unbiased, with
    /// mom = 1 / num_batches_tracked when `momentum` is None (cumulative average).
    pub fn update(&mut self, stats: &BnStatsOutput, momentum: Option<f64>) -> Result<()> {
        let channels = self.mean.len();
        if stats.mean.shape() != [channels] {
            return Err(Error::Shape(format!(
                "running stats have {channels} channels, batch stats {:?}",
                stats.mean.shape()
            )));
        }
        if let Some(m) = momentum {
            check_finite("momentum", m)?;
            if !(0.0..=1.0).contains(&m) {
                return Err(Error::Option(format!(
                    "momentum must be in [0, 1], got {m}"
                )));
            }
        }
        let batch = losskern_reference::bnstats::BnStats {
            mean: stats.mean.to_f64_vec()?,
            var_biased: stats.var_biased.to_f64_vec()?,
            var_unbiased: stats.var_unbiased.to_f64_vec()?,
            invstd: stats.invstd.to_f64_vec()?,
            partial: stats.partials()?,
        };
        self.num_batches_tracked += 1;
        losskern_reference::bnstats::update_running(
            &mut self.mean,
            &mut self.var,
            &batch,
            momentum,
            self.num_batches_tracked,
        );
        Ok(())
    }
}
