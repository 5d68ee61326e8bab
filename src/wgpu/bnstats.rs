//! bnstats on wgpu: the host side of `shaders/bnstats.wgsl`.
//!
//! One submission per op. Statistics: `bn_stats_{rows|cols}` (one workgroup per tile of
//! the shape's [`Tiling`], one element per unit), `bn_finalize`, then with `normalize`
//! `bn_apply`; the five per-channel results are copied out of one scratch buffer. A merge
//! copies the parts' means and M2s into the tile scratch and their counts into `aux`, then
//! runs `bn_finalize`; the running statistics copy their four inputs into `aux` and run
//! `bn_running`. Every index in the shader is u32: x must fit one binding.

use bytemuck::{Pod, Zeroable};

use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::bnstats::{
    BnMergeCall, BnRunningCall, BnRunningOutput, BnStatsCall, BnStatsKernels, BnStatsOutput,
    Tiling, TILE_THREADS,
};
use crate::wgpu::{
    dtype_code, index, padded_size, wgpu_buffer, whole, BindingKind, PipelineKey, ShaderSource,
    WgpuBackend,
};

/// Group 0 of `bnstats.wgsl`: params, x, aux, tiles, stats, y.
pub(crate) const BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
];

const STATS_ROWS: &str = "bn_stats_rows";
const STATS_COLS: &str = "bn_stats_cols";
const FINALIZE: &str = "bn_finalize";
const APPLY: &str = "bn_apply";
const RUNNING: &str = "bn_running";

// Params.flags, as in the shader.
const F_ROWS: u32 = 1;
const F_GAMMA: u32 = 2;
const F_BETA: u32 = 4;
const F_COUNTS: u32 = 8;

/// The per-channel results in the stats scratch, in this order ([5][C] f32).
const STATS_FIELDS: usize = 5;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Params {
    units: u32,
    per_tile: u32,
    tiles: u32,
    channels: u32,
    inner: u32,
    col_threads: u32,
    parts: u32,
    flags: u32,
    words: u32,
    spatial: u32,
    eps: f32,
    factor: f32,
    nan_bits: u32,
    pad: [u32; 3],
}
const _: () = assert!(std::mem::size_of::<Params>() == 64);

fn key(entry: &'static str, dtype: DType) -> Result<PipelineKey> {
    Ok(PipelineKey {
        shader: ShaderSource::BnStats,
        entry,
        constants: vec![("X_DT", dtype_code(dtype)?)],
    })
}

/// Every pipeline bnstats can use: the x-reading entries per dtype, the others once.
pub(crate) fn all_pipelines() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        for entry in [STATS_ROWS, STATS_COLS, APPLY] {
            keys.extend(key(entry, dtype));
        }
    }
    for entry in [FINALIZE, RUNNING] {
        keys.extend(key(entry, DType::F32));
    }
    keys
}

/// The buffers of one submission; absent ones are bound to a small placeholder.
struct Bindings<'a> {
    x: Option<(&'a wgpu::Buffer, u64)>,
    aux: Option<(&'a wgpu::Buffer, u64)>,
    tiles: &'a wgpu::Buffer,
    stats: &'a wgpu::Buffer,
    y: Option<&'a wgpu::Buffer>,
}

/// One submission's dispatches (entry, workgroups) over one bind group, then its copies
/// (source offset into `stats`, destination, bytes).
fn submit(
    backend: &WgpuBackend,
    label: &str,
    params: &Params,
    bindings: &Bindings<'_>,
    dispatches: &[(PipelineKey, u64)],
    copies: &[(u64, &wgpu::Buffer, u64)],
) -> Result<()> {
    backend.check_kernel_limits(ShaderSource::BnStats)?;
    let uniform = backend.buffer_with(
        "bnstats params",
        bytemuck::bytes_of(params),
        wgpu::BufferUsages::UNIFORM,
    )?;
    let unused = backend.create_buffer("bnstats unused", 16, wgpu::BufferUsages::STORAGE)?;
    let unused_y = backend.create_buffer("bnstats unused y", 16, wgpu::BufferUsages::STORAGE)?;
    fn sized<'b>(
        b: Option<(&'b wgpu::Buffer, u64)>,
        unused: &'b wgpu::Buffer,
    ) -> (&'b wgpu::Buffer, u64, u64) {
        b.map_or((unused, 0, 16), |(buffer, bytes)| {
            (buffer, 0, padded_size(bytes))
        })
    }
    let group = backend.bind_group(
        ShaderSource::BnStats,
        &[
            whole(&uniform),
            sized(bindings.x, &unused),
            sized(bindings.aux, &unused),
            whole(bindings.tiles),
            whole(bindings.stats),
            bindings.y.map_or((&unused_y, 0, 16), whole),
        ],
    )?;
    let mut grids = Vec::with_capacity(dispatches.len());
    for (key, workgroups) in dispatches {
        grids.push((
            backend.pipeline(key)?,
            backend.grid(key.entry, *workgroups)?,
        ));
    }
    backend.scoped(label, || {
        let mut encoder = backend
            .device()
            .create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some(label) });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: None,
            });
            for (pipeline, (x, y)) in &grids {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(*x, *y, 1);
            }
        }
        for &(offset, destination, bytes) in copies {
            encoder.copy_buffer_to_buffer(bindings.stats, offset, destination, 0, bytes);
        }
        backend.queue().submit([encoder.finish()]);
        Ok(())
    })
}

/// A storage buffer for the kernels' results or for copies into it.
fn scratch(backend: &WgpuBackend, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    backend.create_buffer(label, bytes, usage)
}

/// The five [C] f32 outputs, filled by copies from the stats scratch.
fn stats_outputs(backend: &WgpuBackend, channels: usize) -> Result<Vec<wgpu::Buffer>> {
    (0..STATS_FIELDS)
        .map(|_| scratch(backend, "bnstats output", channels as u64 * 4))
        .collect()
}

fn stats_copies(outputs: &[wgpu::Buffer], channels: usize) -> Vec<(u64, &wgpu::Buffer, u64)> {
    let bytes = channels as u64 * 4;
    outputs
        .iter()
        .enumerate()
        .map(|(k, out)| (k as u64 * bytes, out, bytes))
        .collect()
}

fn into_output(
    device: &crate::device::Device,
    outputs: Vec<wgpu::Buffer>,
    channels: usize,
    count: u64,
    y: Option<Tensor>,
) -> Result<BnStatsOutput> {
    let mut tensors = outputs.into_iter().map(|buffer| {
        Tensor::from_storage(device, Storage::Wgpu(buffer), vec![channels], DType::F32)
    });
    let mut next = || {
        tensors
            .next()
            .ok_or_else(|| Error::Wgpu("bnstats lost an output buffer".into()))
    };
    Ok(BnStatsOutput {
        count,
        mean: next()?,
        var_biased: next()?,
        var_unbiased: next()?,
        invstd: next()?,
        m2: next()?,
        y,
    })
}

fn stats_tensors(backend: &WgpuBackend, bound: &BnStatsCall<'_>) -> Result<BnStatsOutput> {
    let (spec, call) = (bound.spec(), bound.call());
    let x = wgpu_buffer(call.x, "x")?;
    let x_bytes = call.x.byte_len() as u64;
    backend.check_binding(STATS_ROWS, "x", padded_size(x_bytes))?;
    // One element per unit: the shader indexes elements, not 16-byte vectors.
    let tiling = Tiling::new(spec, spec.dtype.size() as u64);
    let c = spec.c;
    // [tiles][C] means and M2s, then [C] shifts.
    let tile_bytes = 4 * (2 * tiling.tiles + 1) * c as u64;
    backend.check_binding(STATS_ROWS, "the tile partials", tile_bytes)?;
    let tiles = scratch(backend, "bnstats tiles", tile_bytes)?;
    let stats = scratch(backend, "bnstats stats", (STATS_FIELDS * c * 4) as u64)?;
    let outputs = stats_outputs(backend, c)?;

    let affine = call.normalize.unwrap_or_default();
    let mut flags = if tiling.rows { F_ROWS } else { 0 };
    let aux = match (affine.gamma, affine.beta) {
        (None, None) => None,
        (gamma, beta) => {
            let aux = scratch(backend, "bnstats gamma and beta", 2 * 4 * c as u64)?;
            let mut encoder = backend.device().create_command_encoder(&Default::default());
            for (k, param, flag) in [(0, gamma, F_GAMMA), (1, beta, F_BETA)] {
                if let Some(p) = param {
                    let bytes = 4 * c as u64;
                    encoder.copy_buffer_to_buffer(
                        wgpu_buffer(p, "gamma or beta")?,
                        0,
                        &aux,
                        k * bytes,
                        bytes,
                    );
                    flags |= flag;
                }
            }
            backend.queue().submit([encoder.finish()]);
            Some(aux)
        }
    };
    let words = x_bytes.div_ceil(4);
    let y = match call.normalize {
        Some(_) => Some(scratch(backend, "bnstats y", x_bytes)?),
        None => None,
    };
    let params = Params {
        units: index(tiling.units, "units per channel")?,
        per_tile: index(tiling.per_tile, "units per tile")?,
        tiles: index(tiling.tiles, "tiles")?,
        channels: index(c as u64, "C")?,
        inner: index(tiling.inner, "units per segment")?,
        col_threads: index(tiling.col_threads, "column threads")?,
        parts: index(tiling.tiles, "tiles")?,
        flags,
        words: index(words, "words of x")?,
        spatial: index(spec.spatial as u64, "H W")?,
        eps: spec.eps as f32,
        nan_bits: 0x7fc0_0000,
        ..Params::default()
    };
    let stats_entry = if tiling.rows { STATS_ROWS } else { STATS_COLS };
    let mut dispatches = vec![
        (key(stats_entry, spec.dtype)?, tiling.work()),
        (
            key(FINALIZE, DType::F32)?,
            (c as u64).div_ceil(TILE_THREADS),
        ),
    ];
    if y.is_some() {
        dispatches.push((key(APPLY, spec.dtype)?, words.div_ceil(TILE_THREADS)));
    }
    submit(
        backend,
        "bnstats::bn_stats",
        &params,
        &Bindings {
            x: Some((x, x_bytes)),
            aux: aux.as_ref().map(|a| (a, 2 * 4 * c as u64)),
            tiles: &tiles,
            stats: &stats,
            y: y.as_ref(),
        },
        &dispatches,
        &stats_copies(&outputs, c),
    )?;
    let device = call.x.device();
    let y = y.map(|y| {
        Tensor::from_storage(
            device,
            Storage::Wgpu(y),
            call.x.shape().to_vec(),
            spec.dtype,
        )
    });
    into_output(device, outputs, c, (spec.n * spec.spatial) as u64, y)
}

fn merge_tensors(backend: &WgpuBackend, bound: &BnMergeCall<'_>) -> Result<BnStatsOutput> {
    let (spec, call) = (bound.spec(), bound.call());
    let (c, parts) = (spec.c, spec.parts);
    let row = 4 * c as u64;
    let tile_bytes = 2 * row * parts as u64;
    backend.check_binding(FINALIZE, "the stacked partials", tile_bytes)?;
    let tiles = scratch(backend, "bnstats merged parts", tile_bytes)?;
    let counts: Vec<f32> = call.parts.iter().map(|p| p.count as f32).collect();
    let aux = backend.buffer_with(
        "bnstats part counts",
        bytemuck::cast_slice(&counts),
        wgpu::BufferUsages::STORAGE,
    )?;
    let mut encoder = backend.device().create_command_encoder(&Default::default());
    for (k, part) in call.parts.iter().enumerate() {
        let k = k as u64;
        let mean = wgpu_buffer(part.mean, "a partial's mean")?;
        let m2 = wgpu_buffer(part.m2, "a partial's m2")?;
        encoder.copy_buffer_to_buffer(mean, 0, &tiles, k * row, row);
        encoder.copy_buffer_to_buffer(m2, 0, &tiles, (parts as u64 + k) * row, row);
    }
    backend.queue().submit([encoder.finish()]);
    let stats = scratch(backend, "bnstats stats", STATS_FIELDS as u64 * row)?;
    let outputs = stats_outputs(backend, c)?;
    let params = Params {
        channels: index(c as u64, "C")?,
        parts: index(parts as u64, "parts")?,
        flags: F_COUNTS,
        eps: spec.eps as f32,
        nan_bits: 0x7fc0_0000,
        ..Params::default()
    };
    submit(
        backend,
        "bnstats::merge",
        &params,
        &Bindings {
            x: None,
            aux: Some((&aux, 4 * parts as u64)),
            tiles: &tiles,
            stats: &stats,
            y: None,
        },
        &[(
            key(FINALIZE, DType::F32)?,
            (c as u64).div_ceil(TILE_THREADS),
        )],
        &stats_copies(&outputs, c),
    )?;
    into_output(call.parts[0].mean.device(), outputs, c, spec.count, None)
}

fn running_tensors(backend: &WgpuBackend, bound: &BnRunningCall<'_>) -> Result<BnRunningOutput> {
    let (spec, call) = (bound.spec(), bound.call());
    let c = spec.c;
    let row = 4 * c as u64;
    let aux = scratch(backend, "bnstats running inputs", 4 * row)?;
    let mut encoder = backend.device().create_command_encoder(&Default::default());
    let inputs = [
        call.running_mean,
        call.running_var,
        call.batch_mean,
        call.batch_var_unbiased,
    ];
    for (k, input) in inputs.into_iter().enumerate() {
        let buffer = wgpu_buffer(input, "a running-statistics input")?;
        encoder.copy_buffer_to_buffer(buffer, 0, &aux, k as u64 * row, row);
    }
    backend.queue().submit([encoder.finish()]);
    let tiles = scratch(backend, "bnstats unused tiles", 16)?;
    let stats = scratch(backend, "bnstats running", 2 * row)?;
    let mean = scratch(backend, "bnstats running mean", row)?;
    let var = scratch(backend, "bnstats running var", row)?;
    let params = Params {
        channels: index(c as u64, "C")?,
        factor: spec.factor as f32,
        ..Params::default()
    };
    submit(
        backend,
        "bnstats::RunningStats::update",
        &params,
        &Bindings {
            x: None,
            aux: Some((&aux, 4 * row)),
            tiles: &tiles,
            stats: &stats,
            y: None,
        },
        &[(key(RUNNING, DType::F32)?, (c as u64).div_ceil(TILE_THREADS))],
        &[(0, &mean, row), (row, &var, row)],
    )?;
    let device = call.running_mean.device();
    let tensor = |buffer| Tensor::from_storage(device, Storage::Wgpu(buffer), vec![c], DType::F32);
    Ok(BnRunningOutput {
        mean: tensor(mean),
        var: tensor(var),
    })
}

impl BnStatsKernels for WgpuBackend {
    fn bn_stats(&self, call: &BnStatsCall<'_>) -> Result<BnStatsOutput> {
        stats_tensors(self, call)
    }

    fn bn_merge(&self, call: &BnMergeCall<'_>) -> Result<BnStatsOutput> {
        merge_tensors(self, call)
    }

    fn bn_running(&self, call: &BnRunningCall<'_>) -> Result<BnRunningOutput> {
        running_tensors(self, call)
    }
}
