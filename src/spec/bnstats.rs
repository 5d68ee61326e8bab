//! bnstats: batch-norm statistics in every layout, running statistics, mergeable
//! Welford partials and an optional fused normalisation.

pub use losskern_reference::bnstats::{Layout, Welford};

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
    /// The batch's Welford partials on its device, as `merge` takes them.
    pub fn partial(&self) -> BnPartial<'_> {
        BnPartial {
            count: self.count,
            mean: &self.mean,
            m2: &self.m2,
        }
    }

    /// The per-channel Welford partials on the host (f64), e.g. to send elsewhere.
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
    check_eps(call.eps)?;
    if let Some(affine) = call.normalize {
        for (name, param) in [("gamma", affine.gamma), ("beta", affine.beta)] {
            if let Some(p) = param {
                check_channels(call.x, p, c, name)?;
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

    /// The merged statistics (`y` is None).
    fn bn_merge(&self, _call: &BnMergeCall<'_>) -> Result<BnStatsOutput> {
        Err(self.unsupported(Op::BnMerge))
    }

    fn bn_running(&self, _call: &BnRunningCall<'_>) -> Result<BnRunningOutput> {
        Err(self.unsupported(Op::BnRunning))
    }
}

/// The Welford partials of one batch on a device: `count` elements per channel, their
/// per-channel mean and sum of squared deviations M2 ([C] f32 each).
#[derive(Clone, Copy, Debug)]
pub struct BnPartial<'a> {
    pub count: u64,
    pub mean: &'a Tensor,
    pub m2: &'a Tensor,
}

/// Merges the partials of several batches (or devices) into the statistics of their
/// union, by Chan's formula in a fixed order; parts with count 0 add nothing.
#[derive(Clone, Copy, Debug)]
pub struct BnMerge<'a> {
    pub parts: &'a [BnPartial<'a>],
    /// invstd = 1 / sqrt(var_biased + eps), eps >= 0.
    pub eps: f64,
}

/// A validated merge: `parts` partials of `c` channels, `count` elements in all.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnMergeSpec {
    pub(crate) parts: usize,
    pub(crate) c: usize,
    pub(crate) count: u64,
    pub(crate) eps: f64,
}

impl BnMergeSpec {
    pub fn parts(&self) -> usize {
        self.parts
    }

    pub fn c(&self) -> usize {
        self.c
    }

    pub fn count(&self) -> u64 {
        self.count
    }

    pub fn eps(&self) -> f64 {
        self.eps
    }
}

fn check_eps(eps: f64) -> Result<()> {
    check_finite("eps", eps)?;
    if eps < 0.0 {
        return Err(Error::Option(format!("eps must be >= 0, got {eps}")));
    }
    Ok(())
}

/// Checks that `t` is a [c] f32 tensor on `anchor`'s device.
fn check_channels(anchor: &Tensor, t: &Tensor, c: usize, what: &str) -> Result<()> {
    check_same_device(anchor, t, what)?;
    if t.dtype() != DType::F32 || t.shape() != [c] {
        return Err(Error::Shape(format!(
            "{what} must be [{c}] f32, got {:?} {}",
            t.shape(),
            t.dtype()
        )));
    }
    Ok(())
}

pub fn validate_merge(call: &BnMerge<'_>) -> Result<BnMergeSpec> {
    let first = call
        .parts
        .first()
        .ok_or_else(|| Error::Empty("merge needs at least one partial".into()))?;
    let c = first.mean.len();
    if c == 0 {
        return Err(Error::Empty("the partials have no channels".into()));
    }
    let mut count = 0u64;
    for (k, part) in call.parts.iter().enumerate() {
        check_channels(first.mean, part.mean, c, &format!("partial {k}'s mean"))?;
        check_channels(first.mean, part.m2, c, &format!("partial {k}'s m2"))?;
        count = count
            .checked_add(part.count)
            .ok_or_else(|| Error::Shape("the partials' counts overflow u64".into()))?;
    }
    if count == 0 {
        return Err(Error::Empty("every partial has count 0".into()));
    }
    check_eps(call.eps)?;
    Ok(BnMergeSpec {
        parts: call.parts.len(),
        c,
        count,
        eps: call.eps,
    })
}

/// A validated merge, as the backends receive it.
pub(crate) type BnMergeCall<'a> = Bound<BnMerge<'a>, BnMergeSpec>;

pub(crate) fn bind_merge<'a>(call: &BnMerge<'a>) -> Result<BnMergeCall<'a>> {
    Ok(Bound::new(*call, validate_merge(call)?))
}

/// One step of PyTorch's running statistics: new = (1 - factor) running + factor batch,
/// for the mean and for the unbiased variance.
#[derive(Clone, Copy, Debug)]
pub struct BnRunning<'a> {
    pub running_mean: &'a Tensor,
    pub running_var: &'a Tensor,
    pub batch_mean: &'a Tensor,
    pub batch_var_unbiased: &'a Tensor,
    /// The momentum, or 1 / num_batches_tracked for the cumulative average.
    pub factor: f64,
}

/// A validated running-statistics step over `c` channels.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BnRunningSpec {
    pub(crate) c: usize,
    pub(crate) factor: f64,
}

impl BnRunningSpec {
    pub fn c(&self) -> usize {
        self.c
    }

    pub fn factor(&self) -> f64 {
        self.factor
    }
}

/// The running mean and variance after one step ([C] f32 on the same device).
#[derive(Debug)]
pub struct BnRunningOutput {
    pub mean: Tensor,
    pub var: Tensor,
}

/// A momentum in [0, 1] (finite).
pub(crate) fn check_momentum(momentum: f64) -> Result<()> {
    check_finite("momentum", momentum)?;
    if !(0.0..=1.0).contains(&momentum) {
        return Err(Error::Option(format!(
            "momentum must be in [0, 1], got {momentum}"
        )));
    }
    Ok(())
}

pub fn validate_running(call: &BnRunning<'_>) -> Result<BnRunningSpec> {
    let c = call.running_mean.len();
    if c == 0 {
        return Err(Error::Empty("the running stats have no channels".into()));
    }
    let anchor = call.running_mean;
    check_channels(anchor, call.running_mean, c, "running_mean")?;
    check_channels(anchor, call.running_var, c, "running_var")?;
    check_channels(anchor, call.batch_mean, c, "the batch mean")?;
    check_channels(anchor, call.batch_var_unbiased, c, "the batch var_unbiased")?;
    check_momentum(call.factor)?;
    Ok(BnRunningSpec {
        c,
        factor: call.factor,
    })
}

/// A validated running-statistics step, as the backends receive it.
pub(crate) type BnRunningCall<'a> = Bound<BnRunning<'a>, BnRunningSpec>;

pub(crate) fn bind_running<'a>(call: &BnRunning<'a>) -> Result<BnRunningCall<'a>> {
    Ok(Bound::new(*call, validate_running(call)?))
}

/// PyTorch BatchNorm running statistics on a device ([C] f32 each), updated there by
/// `ops::bnstats::RunningStats::update`.
#[derive(Debug)]
pub struct RunningStats {
    pub mean: Tensor,
    pub var: Tensor,
    pub num_batches_tracked: u64,
}

/// Threads per block (workgroup) of the GPU statistics and apply kernels.
pub(crate) const TILE_THREADS: u64 = 256;
/// Units each thread loads before it merges them into its partial.
pub(crate) const TILE_UNROLL: u64 = 8;
/// About this many tiles per call, a few per multiprocessor of a large GPU, so that
/// small batches fill the device too.
const TARGET_TILES: u64 = 2048;
/// Elements of one channel in one tile at most, so that f32 counts stay exact.
const MAX_TILE_ELEMENTS: u64 = 1 << 24;

/// How the GPU kernels cut a bnstats problem into tiles (blocks or workgroups), from the
/// shape alone, so the result is bitwise the same on every run:
/// - rows mode (NCHW with H W > 1): a unit is `vec` contiguous elements of one channel
///   (`vec` divides H W); channel c's units run over its N segments of `inner` units;
///   one tile is `per_tile` consecutive units of one channel; `groups` = C.
/// - cols mode (NHWC, NC, NCHW with H W = 1): x is a matrix [R = `units`, C]; a thread
///   owns `vec` adjacent channels (`vec` divides C), `inner` = C / vec vector columns,
///   `col_threads` threads across them and the rest of the block across rows; one tile
///   is `per_tile` rows of one group of `col_threads` vector columns.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Tiling {
    pub rows: bool,
    pub vec: u64,
    pub units: u64,
    pub inner: u64,
    pub col_threads: u64,
    pub groups: u64,
    pub per_tile: u64,
    pub tiles: u64,
}

impl Tiling {
    /// `vec_bytes`: the width of a wide load (16 bytes).
    pub(crate) fn new(spec: &BnSpec, vec_bytes: u64) -> Tiling {
        let (n, c, spatial) = (spec.n as u64, spec.c as u64, spec.spatial as u64);
        let wide = vec_bytes / spec.dtype.size() as u64;
        let rows = spec.layout == Layout::Nchw && spatial > 1;
        let (vec, inner, units, col_threads, groups, min_units) = if rows {
            let vec = if spatial.is_multiple_of(wide) {
                wide
            } else {
                1
            };
            let inner = spatial / vec;
            (vec, inner, n * inner, 1, c, TILE_THREADS * TILE_UNROLL)
        } else {
            let vec = if c.is_multiple_of(wide) { wide } else { 1 };
            let inner = c / vec;
            let col_threads = inner.next_power_of_two().min(32);
            let row_threads = TILE_THREADS / col_threads;
            let groups = inner.div_ceil(col_threads);
            (
                vec,
                inner,
                n * spatial,
                col_threads,
                groups,
                row_threads * TILE_UNROLL,
            )
        };
        let unit_elements = if rows { vec } else { 1 };
        let wanted = TARGET_TILES.div_ceil(groups);
        let most = units.div_ceil(min_units).max(1);
        let fewest = (units * unit_elements).div_ceil(MAX_TILE_ELEMENTS);
        let tiles = wanted.min(most).max(fewest).max(1);
        let per_tile = units.div_ceil(tiles);
        Tiling {
            rows,
            vec,
            units,
            inner,
            col_threads,
            groups,
            per_tile,
            // No empty tile: each one holds at least one unit.
            tiles: units.div_ceil(per_tile),
        }
    }

    /// Elements of one channel in one unit.
    pub(crate) fn unit_elements(&self) -> u64 {
        if self.rows {
            self.vec
        } else {
            1
        }
    }

    /// Blocks (or workgroups) of work: groups x tiles.
    pub(crate) fn work(&self) -> u64 {
        self.groups * self.tiles
    }
}
