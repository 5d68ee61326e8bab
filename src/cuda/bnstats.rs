//! bnstats on CUDA: `kernels/bnstats.cu`, on the backend's stream, nothing waits:
//!
//! 1. `bn_stats_{rows|cols}_{dtype}`: one block per tile of the shape's [`Tiling`]; each
//!    writes one Welford partial per channel to scratch [tiles][C] (f32).
//! 2. `bn_finalize`: one warp per channel merges its partials in f64 in a fixed tree and
//!    writes mean, both variances, invstd and M2.
//! 3. With `normalize`, `bn_apply_{rows|cols}_{dtype}` over the same tiles: reads x once,
//!    writes y once.
//!
//! `merge` stacks the parts' means and M2s into [parts][C] with device copies and runs
//! `bn_finalize` on them with the parts' counts; the running statistics are one
//! elementwise kernel, `bn_running`.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DevicePtrMut, DeviceRepr, PushKernelArg};

use super::compile::KernelSource;
use super::launch::{
    alloc_output, cuda_slice, driver_error, kernels, offsets, Fill, Kernels, Pointers,
};
use super::CudaBackend;
use crate::device::{Device, Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::bnstats::{
    BnMergeCall, BnMergeSpec, BnRunningCall, BnRunningOutput, BnSpec, BnStatsCall, BnStatsKernels,
    BnStatsOutput, Tiling, TILE_THREADS,
};

// The kernel argument blocks, field for field as in kernels/bnstats.cu (sizes and
// offsets asserted on both sides). Pointers are CUdeviceptr values, 0 for null.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BnTileArgs {
    x: u64,
    y: u64,
    tile_mean: u64,
    tile_m2: u64,
    mean: u64,
    invstd: u64,
    gamma: u64,
    beta: u64,
    units: i64,
    per_tile: i64,
    tiles: i64,
    channels: i32,
    inner: i32,
    col_threads: i32,
    wide: i32,
    shift: u64,
}
const _: () = assert!(std::mem::size_of::<BnTileArgs>() == 112);
offsets!(BnTileArgs {
    x: 0,
    y: 8,
    tile_mean: 16,
    tile_m2: 24,
    mean: 32,
    invstd: 40,
    gamma: 48,
    beta: 56,
    units: 64,
    per_tile: 72,
    tiles: 80,
    channels: 88,
    inner: 92,
    col_threads: 96,
    wide: 100,
    shift: 104,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BnFinalizeArgs {
    part_mean: u64,
    part_m2: u64,
    part_count: u64,
    mean: u64,
    var_biased: u64,
    var_unbiased: u64,
    invstd: u64,
    m2: u64,
    parts: i64,
    units: i64,
    per_tile: i64,
    unit_elems: i64,
    eps: f64,
    channels: i32,
    pad: i32,
    shift: u64,
}
const _: () = assert!(std::mem::size_of::<BnFinalizeArgs>() == 120);
offsets!(BnFinalizeArgs {
    part_mean: 0,
    part_m2: 8,
    part_count: 16,
    mean: 24,
    var_biased: 32,
    var_unbiased: 40,
    invstd: 48,
    m2: 56,
    parts: 64,
    units: 72,
    per_tile: 80,
    unit_elems: 88,
    eps: 96,
    channels: 104,
    pad: 108,
    shift: 112,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct BnRunningArgs {
    running_mean: u64,
    running_var: u64,
    mean: u64,
    var_unbiased: u64,
    new_mean: u64,
    new_var: u64,
    factor: f64,
    channels: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<BnRunningArgs>() == 64);
offsets!(BnRunningArgs {
    running_mean: 0,
    running_var: 8,
    mean: 16,
    var_unbiased: 24,
    new_mean: 32,
    new_var: 40,
    factor: 48,
    channels: 56,
    pad: 60,
});

// SAFETY: the three argument structs are #[repr(C)], made only of integers and floats
// (pointers travel as u64 CUdeviceptr values), with the field order, sizes and
// alignments of their twins in kernels/bnstats.cu (asserted on both sides).
unsafe impl DeviceRepr for BnTileArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for BnFinalizeArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for BnRunningArgs {}

/// The entry point of a tile kernel (`stats` or `apply`) for the tiling's mode and dtype.
fn tile_kernel(stats: bool, tiling: &Tiling, dtype: DType) -> Result<&'static str> {
    let names = match (stats, tiling.rows) {
        (true, true) => [
            "bn_stats_rows_f32",
            "bn_stats_rows_f16",
            "bn_stats_rows_bf16",
        ],
        (true, false) => [
            "bn_stats_cols_f32",
            "bn_stats_cols_f16",
            "bn_stats_cols_bf16",
        ],
        (false, true) => [
            "bn_apply_rows_f32",
            "bn_apply_rows_f16",
            "bn_apply_rows_bf16",
        ],
        (false, false) => [
            "bn_apply_cols_f32",
            "bn_apply_cols_f16",
            "bn_apply_cols_bf16",
        ],
    };
    match dtype {
        DType::F32 => Ok(names[0]),
        DType::F16 => Ok(names[1]),
        DType::BF16 => Ok(names[2]),
        other => Err(Error::DType(format!(
            "the CUDA bnstats kernels take f32, f16 or bf16 x, not {other}"
        ))),
    }
}

fn as_i32(value: u64, what: &str) -> Result<i32> {
    i32::try_from(value).map_err(|_| Error::Shape(format!("{what} = {value} exceeds i32")))
}

fn as_i64(value: u64, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Shape(format!("{what} = {value} exceeds i64")))
}

/// The device memory of a tensor on a CUDA device, as a view.
fn view<'t>(tensor: &'t Tensor, what: &str) -> Result<CudaView<'t, u8>> {
    cuda_slice(tensor, what).map(CudaSlice::as_view)
}

/// The five per-channel f32 outputs of the statistics.
struct StatsBuffers {
    mean: CudaSlice<u8>,
    var_biased: CudaSlice<u8>,
    var_unbiased: CudaSlice<u8>,
    invstd: CudaSlice<u8>,
    m2: CudaSlice<u8>,
}

impl StatsBuffers {
    fn new(stream: &Arc<CudaStream>, channels: usize) -> Result<StatsBuffers> {
        let alloc = || alloc_output(stream, channels * 4, Fill::Unwritten);
        Ok(StatsBuffers {
            mean: alloc()?,
            var_biased: alloc()?,
            var_unbiased: alloc()?,
            invstd: alloc()?,
            m2: alloc()?,
        })
    }

    /// Fills the output fields of `args`, checking that each holds C f32.
    fn point<'a>(
        &'a mut self,
        p: &mut Pointers<'a>,
        args: &mut BnFinalizeArgs,
        channels: usize,
    ) -> Result<()> {
        let need = channels * 4;
        args.mean = p.write(&mut self.mean, need, 4, "mean")?;
        args.var_biased = p.write(&mut self.var_biased, need, 4, "var_biased")?;
        args.var_unbiased = p.write(&mut self.var_unbiased, need, 4, "var_unbiased")?;
        args.invstd = p.write(&mut self.invstd, need, 4, "invstd")?;
        args.m2 = p.write(&mut self.m2, need, 4, "m2")?;
        Ok(())
    }

    fn into_output(self, device: &Device, count: u64, y: Option<Tensor>) -> BnStatsOutput {
        let channels = self.mean.len() / 4;
        let tensor = |slice: CudaSlice<u8>| {
            Tensor::from_storage(device, Storage::Cuda(slice), vec![channels], DType::F32)
        };
        BnStatsOutput {
            count,
            mean: tensor(self.mean),
            var_biased: tensor(self.var_biased),
            var_unbiased: tensor(self.var_unbiased),
            invstd: tensor(self.invstd),
            m2: tensor(self.m2),
            y,
        }
    }
}

/// The tile kernels' arguments for `spec` (the tiling and its sizes; no buffers).
fn tile_args(spec: &BnSpec, tiling: &Tiling) -> Result<BnTileArgs> {
    Ok(BnTileArgs {
        units: as_i64(tiling.units, "units per channel")?,
        per_tile: as_i64(tiling.per_tile, "units per tile")?,
        tiles: as_i64(tiling.tiles, "tiles")?,
        channels: as_i32(spec.c as u64, "C")?,
        inner: as_i32(tiling.inner, "units per segment")?,
        col_threads: as_i32(tiling.col_threads, "column threads")?,
        wide: i32::from(tiling.vec > 1),
        ..BnTileArgs::default()
    })
}

/// Launches the statistics (`stats`) or the apply tile kernel over the tiling.
fn launch_tiles(
    kernels: &Kernels,
    stream: &CudaStream,
    stats: bool,
    tiling: &Tiling,
    dtype: DType,
    args: &BnTileArgs,
) -> Result<()> {
    let name = tile_kernel(stats, tiling, dtype)?;
    let f = kernels.function(KernelSource::BnStats, name)?;
    let cfg = kernels.grid_config(name, &f, tiling.work(), TILE_THREADS as u32)?;
    // SAFETY: the callers point x (and y) at buffers of N C H W elements of `dtype`
    // (checked by Pointers against the validated spec), and the tiling's units, tiles
    // and inner describe exactly that shape, so every access is inside them; a wide unit
    // is 16 bytes at a multiple of 16 bytes (vec divides H W or C, and the buffers are
    // checked 16-aligned when wide). Statistics write tiles x C f32 to each scratch
    // buffer and C f32 to the shifts (tile 0 of each channel); apply reads C f32 of mean and invstd, and of gamma and beta unless null,
    // all checked by Pointers. The launch was checked against the device and function
    // limits.
    unsafe { stream.launch_builder(&f).arg(args).launch(cfg) }
        .map(drop)
        .map_err(driver_error(name))
}

/// Runs `bn_finalize`: eight channels (warps) per block.
fn finalize(
    kernels: &Kernels,
    stream: &CudaStream,
    args: &BnFinalizeArgs,
    channels: usize,
) -> Result<()> {
    let name = "bn_finalize";
    let f = kernels.function(KernelSource::BnStats, name)?;
    let blocks = (channels as u64).div_ceil(TILE_THREADS / 32);
    let cfg = kernels.grid_config(name, &f, blocks, TILE_THREADS as u32)?;
    // SAFETY: the callers point the parts at parts x C f32 (and the counts, when given,
    // at parts f64) and the five outputs at C f32 each, checked by Pointers; the kernel
    // reads parts 0..parts and writes channels 0..C. The launch was checked.
    unsafe { stream.launch_builder(&f).arg(args).launch(cfg) }
        .map(drop)
        .map_err(driver_error(name))
}

/// The address of the merge's f64 counts, checked to hold `parts` of them.
fn counts_pointer<'a>(
    p: &mut Pointers<'a>,
    counts: &'a mut CudaSlice<f64>,
    parts: usize,
) -> Result<u64> {
    if counts.len() < parts {
        return Err(Error::Shape(format!(
            "the merge counts hold {} of {parts} parts",
            counts.len()
        )));
    }
    let (ptr, guard) = counts.device_ptr_mut(p.stream);
    p.guards.push(guard);
    Ok(ptr)
}

/// Runs `bn_finalize` over stacked partials, `means` and `m2s` [parts][C] f32 with the
/// parts' `counts` (one per part), into the statistics of their union on `device`:
/// the merge's second half, after `bn_merge` stacked its parts' tensors or SyncBN
/// gathered the ranks' partials in rank order.
pub(crate) fn merge_stacked(
    stream: &Arc<CudaStream>,
    device: &Device,
    means: &mut CudaSlice<u8>,
    m2s: &mut CudaSlice<u8>,
    counts: &[u64],
    spec: &BnMergeSpec,
) -> Result<BnStatsOutput> {
    let kernels = kernels(stream.context())?;
    let counts: Vec<f64> = counts.iter().map(|&count| count as f64).collect();
    let mut counts = stream
        .clone_htod(&counts)
        .map_err(driver_error("cuMemcpyHtoD"))?;
    let mut out = StatsBuffers::new(stream, spec.c)?;

    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let part_bytes = spec.parts * spec.c * 4;
    let mut fin = BnFinalizeArgs {
        part_mean: p.write(means, part_bytes, 4, "stacked means")?,
        part_m2: p.write(m2s, part_bytes, 4, "stacked M2s")?,
        part_count: counts_pointer(&mut p, &mut counts, spec.parts)?,
        parts: as_i64(spec.parts as u64, "parts")?,
        eps: spec.eps,
        channels: as_i32(spec.c as u64, "C")?,
        ..BnFinalizeArgs::default()
    };
    out.point(&mut p, &mut fin, spec.c)?;
    finalize(&kernels, stream, &fin, spec.c)?;
    drop(p);
    Ok(out.into_output(device, spec.count, None))
}

impl BnStatsKernels for CudaBackend {
    fn bn_stats(&self, bound: &BnStatsCall<'_>) -> Result<BnStatsOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let stream = self.stream();
        let kernels = kernels(stream.context())?;
        let tiling = Tiling::new(spec, 16);
        let parts = usize::try_from(tiling.tiles * spec.c as u64)
            .map_err(|_| Error::Shape("the tile partials do not fit in memory".into()))?;
        let x = view(call.x, "x")?;
        let affine = call.normalize.unwrap_or_default();
        let gamma = affine.gamma.map(|g| view(g, "gamma")).transpose()?;
        let beta = affine.beta.map(|b| view(b, "beta")).transpose()?;
        let mut tile_mean = alloc_output(stream, parts * 4, Fill::Unwritten)?;
        let mut tile_m2 = alloc_output(stream, parts * 4, Fill::Unwritten)?;
        let mut shift = alloc_output(stream, spec.c * 4, Fill::Unwritten)?;
        let mut out = StatsBuffers::new(stream, spec.c)?;
        let mut y = match call.normalize {
            Some(_) => Some(alloc_output(stream, call.x.byte_len(), Fill::Unwritten)?),
            None => None,
        };

        let mut p = Pointers {
            stream,
            guards: Vec::new(),
        };
        let align = if tiling.vec > 1 {
            16
        } else {
            spec.dtype.size()
        };
        let mut args = tile_args(spec, &tiling)?;
        args.x = p.read(&x, call.x.byte_len(), align, "x")?;
        args.tile_mean = p.write(&mut tile_mean, parts * 4, 4, "tile means")?;
        args.tile_m2 = p.write(&mut tile_m2, parts * 4, 4, "tile M2s")?;
        args.shift = p.write(&mut shift, spec.c * 4, 4, "channel shifts")?;
        launch_tiles(&kernels, stream, true, &tiling, spec.dtype, &args)?;

        let mut fin = BnFinalizeArgs {
            part_mean: args.tile_mean,
            part_m2: args.tile_m2,
            parts: args.tiles,
            units: args.units,
            per_tile: args.per_tile,
            unit_elems: as_i64(tiling.unit_elements(), "unit elements")?,
            eps: spec.eps,
            channels: args.channels,
            shift: args.shift,
            ..BnFinalizeArgs::default()
        };
        out.point(&mut p, &mut fin, spec.c)?;
        finalize(&kernels, stream, &fin, spec.c)?;

        if let Some(y) = y.as_mut() {
            args.y = p.write(y, call.x.byte_len(), align, "y")?;
            args.mean = fin.mean;
            args.invstd = fin.invstd;
            let c4 = spec.c * 4;
            args.gamma = gamma
                .as_ref()
                .map_or(Ok(0), |g| p.read(g, c4, 4, "gamma"))?;
            args.beta = beta.as_ref().map_or(Ok(0), |b| p.read(b, c4, 4, "beta"))?;
            launch_tiles(&kernels, stream, false, &tiling, spec.dtype, &args)?;
        }
        drop(p);

        let device = call.x.device();
        let y = y.map(|y| {
            Tensor::from_storage(
                device,
                Storage::Cuda(y),
                call.x.shape().to_vec(),
                spec.dtype,
            )
        });
        Ok(out.into_output(device, (spec.n * spec.spatial) as u64, y))
    }

    fn bn_merge(&self, bound: &BnMergeCall<'_>) -> Result<BnStatsOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let stream = self.stream();
        let row = spec.c * 4;
        let mut means = alloc_output(stream, spec.parts * row, Fill::Unwritten)?;
        let mut m2s = alloc_output(stream, spec.parts * row, Fill::Unwritten)?;
        for (k, part) in call.parts.iter().enumerate() {
            for (src, dst) in [(part.mean, &mut means), (part.m2, &mut m2s)] {
                let src = cuda_slice(src, "a partial")?;
                let src = src
                    .try_slice(..row)
                    .ok_or_else(|| Error::Shape("a partial holds fewer than C f32".into()))?;
                let mut dst = dst
                    .try_slice_mut(k * row..(k + 1) * row)
                    .ok_or_else(|| Error::Shape("the merge scratch is too short".into()))?;
                stream
                    .memcpy_dtod(&src, &mut dst)
                    .map_err(driver_error("cuMemcpyDtoDAsync"))?;
            }
        }
        let counts: Vec<u64> = call.parts.iter().map(|p| p.count).collect();
        let device = call.parts[0].mean.device();
        merge_stacked(stream, device, &mut means, &mut m2s, &counts, spec)
    }

    fn bn_running(&self, bound: &BnRunningCall<'_>) -> Result<BnRunningOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let stream = self.stream();
        let kernels = kernels(stream.context())?;
        let running_mean = view(call.running_mean, "running_mean")?;
        let running_var = view(call.running_var, "running_var")?;
        let mean = view(call.batch_mean, "the batch mean")?;
        let var_unbiased = view(call.batch_var_unbiased, "the batch var_unbiased")?;
        let mut new_mean = alloc_output(stream, spec.c * 4, Fill::Unwritten)?;
        let mut new_var = alloc_output(stream, spec.c * 4, Fill::Unwritten)?;

        let mut p = Pointers {
            stream,
            guards: Vec::new(),
        };
        let c4 = spec.c * 4;
        let args = BnRunningArgs {
            running_mean: p.read(&running_mean, c4, 4, "running_mean")?,
            running_var: p.read(&running_var, c4, 4, "running_var")?,
            mean: p.read(&mean, c4, 4, "the batch mean")?,
            var_unbiased: p.read(&var_unbiased, c4, 4, "the batch var_unbiased")?,
            new_mean: p.write(&mut new_mean, c4, 4, "the new running mean")?,
            new_var: p.write(&mut new_var, c4, 4, "the new running var")?,
            factor: spec.factor,
            channels: as_i32(spec.c as u64, "C")?,
            pad: 0,
        };
        let name = "bn_running";
        let f = kernels.function(KernelSource::BnStats, name)?;
        let blocks = (spec.c as u64).div_ceil(TILE_THREADS);
        let cfg = kernels.grid_config(name, &f, blocks, TILE_THREADS as u32)?;
        // SAFETY: the four inputs and two outputs hold C f32 each (checked by Pointers);
        // the kernel touches channels 0..C only. The launch was checked against the limits.
        unsafe { stream.launch_builder(&f).arg(&args).launch(cfg) }.map_err(driver_error(name))?;
        drop(p);

        let device = call.running_mean.device();
        let tensor = |slice: CudaSlice<u8>| {
            Tensor::from_storage(device, Storage::Cuda(slice), vec![spec.c], DType::F32)
        };
        Ok(BnRunningOutput {
            mean: tensor(new_mean),
            var: tensor(new_var),
        })
    }
}
