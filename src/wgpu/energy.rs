//! energy on wgpu: the host side of `shaders/energy.wgsl`.
//!
//! The two-sample distance is one submission: `energy_pairs` three times (X-Y, X-X, Y-Y;
//! one workgroup per row tile and chunk of 16 column tiles, each writing its own
//! two-float slot), `energy_distance_merge` (one workgroup: the outputs, the weight
//! status word and the gradient's coefficients), with the gradient `energy_grad` four
//! times (X against Y and X, Y against X and Y; a workgroup per 64 rows x 64 dims of one
//! set's gradient), then copies into the outputs. The energy score is one submission too:
//! `energy_score` (one invocation per prediction row; it writes the gradient rows),
//! `energy_score_merge` (one workgroup), then the copies.
//! Bad weight values are not checked on the host: the outputs are NaN and the status word
//! says why ([`EnergyDistanceBuffers::check_weights`]; the Tensor entry reports it at the
//! next readback). Every index in the shader is u32: a tensor past one binding (2 GiB, or
//! the device's limit) is refused.

use bytemuck::{Pod, Zeroable};

use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::energy::{
    pair_slots, power_code, weight_status_error, EnergyDistanceCall, EnergyDistanceOutput,
    EnergyDistanceSpec, EnergyKernels, EnergyScoreCall, EnergyScoreOutput, EnergyScoreSpec,
    Statistic, PAIR_TILE,
};
use crate::wgpu::{
    dtype_code, index, padded_size, prefix, require, wgpu_buffer, BindingKind, PipelineKey,
    ShaderSource, WgpuBackend, WORKGROUP_SIZE,
};

/// Group 0 of `energy.wgsl`: params, A (or preds), B (or y), the two weights, slots, red,
/// grad.
pub(crate) const BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
];

const PAIRS: &str = "energy_pairs";
const DISTANCE_MERGE: &str = "energy_distance_merge";
const SCORE: &str = "energy_score";
const SCORE_MERGE: &str = "energy_score_merge";
const GRAD: &str = "energy_grad";

// Params.flags, as in the shader.
const F_WA: u32 = 1;
const F_WB: u32 = 2;
const F_WITHIN: u32 = 4;
const F_U: u32 = 8;
const F_GRAD: u32 = 16;
const F_ADD: u32 = 32;

/// Words of `red` holding the gradient's coefficients: each set's cross term, which
/// writes its gradient rows, and its within term, which adds to them.
const RED_COEF_X_CROSS: u32 = 8;
const RED_COEF_X_WITHIN: u32 = 9;
const RED_COEF_Y_CROSS: u32 = 10;
const RED_COEF_Y_WITHIN: u32 = 11;
/// Dimensions of one set's gradient a workgroup of `energy_grad` owns.
const GRAD_DIMS: u64 = 64;

/// Words of the shader's `red`, and the byte offsets of its slots.
const RED_BYTES: u64 = 48;
const RED_STATUS_OFFSET: u64 = 16;

/// The shader's `Params` uniform: 16 four-byte scalars in the shader's order, so field i
/// is at byte 4 i and the size is 64, a multiple of 16 (asserted below; WGSL cannot
/// assert a layout).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Params {
    na: u32,
    nb: u32,
    d: u32,
    chunks: u32,
    tiles: u32,
    slot_base: u32,
    tiles_xy: u32,
    tiles_xx: u32,
    tiles_yy: u32,
    flags: u32,
    power: u32,
    half_beta: f32,
    beta: f32,
    c1: f32,
    c2: f32,
    nan_bits: u32,
}
const _: () = {
    use std::mem::offset_of;
    let offsets = [
        offset_of!(Params, na),
        offset_of!(Params, nb),
        offset_of!(Params, d),
        offset_of!(Params, chunks),
        offset_of!(Params, tiles),
        offset_of!(Params, slot_base),
        offset_of!(Params, tiles_xy),
        offset_of!(Params, tiles_xx),
        offset_of!(Params, tiles_yy),
        offset_of!(Params, flags),
        offset_of!(Params, power),
        offset_of!(Params, half_beta),
        offset_of!(Params, beta),
        offset_of!(Params, c1),
        offset_of!(Params, c2),
        offset_of!(Params, nan_bits),
    ];
    let mut i = 0;
    while i < offsets.len() {
        assert!(offsets[i] == 4 * i);
        i += 1;
    }
    assert!(offsets.len() == 16 && std::mem::size_of::<Params>() == 64);
};

fn key(entry: &'static str, dtype: Option<DType>) -> Result<PipelineKey> {
    let constants = match dtype {
        Some(dtype) => vec![("DT", dtype_code(dtype)?)],
        None => Vec::new(),
    };
    Ok(PipelineKey {
        shader: ShaderSource::Energy,
        entry,
        constants,
    })
}

/// Every pipeline the family uses: the pair and score kernels per dtype, the two merges.
pub(crate) fn all_pipelines() -> Vec<PipelineKey> {
    let mut keys: Vec<PipelineKey> = [DISTANCE_MERGE, SCORE_MERGE]
        .into_iter()
        .filter_map(|entry| key(entry, None).ok())
        .collect();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        keys.extend(key(PAIRS, Some(dtype)));
        keys.extend(key(SCORE, Some(dtype)));
        keys.extend(key(GRAD, Some(dtype)));
    }
    keys
}

/// Bytes of `elements` values of `dtype`, checked to fit one binding of `kernel`.
fn binding_bytes(
    backend: &WgpuBackend,
    kernel: &str,
    what: &str,
    elements: u64,
    size: u64,
) -> Result<u64> {
    let bytes = elements
        .checked_mul(size)
        .ok_or_else(|| Error::Shape(format!("{what}: {elements} elements overflow u64")))?;
    backend.check_binding(kernel, what, bytes)?;
    Ok(bytes)
}

fn uniform(backend: &WgpuBackend, params: &Params) -> Result<wgpu::Buffer> {
    backend.buffer_with(
        "energy params",
        bytemuck::bytes_of(params),
        wgpu::BufferUsages::UNIFORM,
    )
}

/// The binding of a set's weights, or of the placeholder when they are uniform.
fn weight_binding<'b>(
    weights: Option<&'b wgpu::Buffer>,
    len: u64,
    unused: &'b wgpu::Buffer,
) -> (&'b wgpu::Buffer, u64, u64) {
    match weights {
        Some(w) => (w, 0, padded_size(4 * len)),
        None => (unused, 0, 16),
    }
}

/// Output buffers of a raw energy-distance call: the distance and its terms, each [1]
/// f32 and needing COPY_DST; `status` is one u32 (COPY_SRC too, to be read back): 0, or
/// the bits of `spec::energy::WEIGHTS_*` for bad weights; `grad_x` [N, d] and `grad_y`
/// [M, d] f32 (STORAGE), present exactly when `spec.grad`.
#[derive(Clone, Copy, Debug)]
pub struct EnergyDistanceBuffers<'a> {
    pub distance: &'a wgpu::Buffer,
    pub cross: &'a wgpu::Buffer,
    pub within_x: &'a wgpu::Buffer,
    pub within_y: &'a wgpu::Buffer,
    pub status: &'a wgpu::Buffer,
    pub grad_x: Option<&'a wgpu::Buffer>,
    pub grad_y: Option<&'a wgpu::Buffer>,
}

impl EnergyDistanceBuffers<'_> {
    /// The weight check of the last call on these buffers: `Error::Option` as the CPU
    /// gives for bad weights (the outputs are then NaN). Waits for the queue.
    pub fn check_weights(&self, backend: &WgpuBackend) -> Result<()> {
        let bytes = backend.download(self.status, 4)?;
        let word = bytes
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| Error::Wgpu("the energy status word holds under 4 bytes".into()))?;
        if word == 0 {
            Ok(())
        } else {
            Err(weight_status_error(u64::from(word)))
        }
    }
}

/// The slots of one pair term and its column chunks, as u64.
fn term_tiles(na: u64, nb: u64) -> (u64, u64) {
    // The sizes came from usize; the slot count is at most the row count.
    let (slots, chunks) = pair_slots(na as usize, nb as usize);
    (slots as u64, chunks as u64)
}

/// The placeholders for bindings a dispatch does not use.
struct Unused {
    read: wgpu::Buffer,
    write: wgpu::Buffer,
}

impl Unused {
    fn new(backend: &WgpuBackend) -> Result<Unused> {
        let storage = wgpu::BufferUsages::STORAGE;
        Ok(Unused {
            read: backend.create_buffer("energy unused input", 16, storage)?,
            write: backend.create_buffer("energy unused output", 16, storage)?,
        })
    }
}

/// Checks the buffers of a raw energy distance against `spec` and the binding limits;
/// the bytes of x and y.
fn check_distance_buffers(
    backend: &WgpuBackend,
    spec: &EnergyDistanceSpec,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    weights: (Option<&wgpu::Buffer>, Option<&wgpu::Buffer>),
    out: &EnergyDistanceBuffers<'_>,
) -> Result<(u64, u64)> {
    backend.check_kernel_limits(ShaderSource::Energy)?;
    let (n, m, d) = (spec.n as u64, spec.m as u64, spec.d as u64);
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::Empty(format!(
            "the energy distance needs N, M, d >= 1, got {n}, {m}, {d}"
        )));
    }
    let storage = wgpu::BufferUsages::STORAGE;
    let elem = spec.dtype.size() as u64;
    let x_bytes = binding_bytes(backend, PAIRS, "x", n * d, elem)?;
    let y_bytes = binding_bytes(backend, PAIRS, "y", m * d, elem)?;
    require(x, "x", x_bytes, storage)?;
    require(y, "y", y_bytes, storage)?;
    let (wx, wy) = weights;
    if let Some(w) = wx {
        require(
            w,
            "weights_x",
            binding_bytes(backend, PAIRS, "weights_x", n, 4)?,
            storage,
        )?;
    }
    if let Some(w) = wy {
        require(
            w,
            "weights_y",
            binding_bytes(backend, PAIRS, "weights_y", m, 4)?,
            storage,
        )?;
    }
    let copy_dst = wgpu::BufferUsages::COPY_DST;
    for (buffer, what) in [
        (out.distance, "distance"),
        (out.cross, "cross"),
        (out.within_x, "within_x"),
        (out.within_y, "within_y"),
        (out.status, "status"),
    ] {
        require(buffer, what, 4, copy_dst)?;
    }
    for (buffer, what, rows) in [(out.grad_x, "grad_x", n), (out.grad_y, "grad_y", m)] {
        match (buffer, spec.grad) {
            (Some(buffer), true) => {
                let bytes = binding_bytes(backend, GRAD, what, rows * d, 4)?;
                require(buffer, what, bytes, storage)?;
            }
            (None, false) => {}
            (Some(_), false) => {
                return Err(Error::Shape(format!("{what} given but no gradient asked")))
            }
            (None, true) => return Err(Error::Shape(format!("the gradient needs {what}"))),
        }
    }
    Ok((x_bytes, y_bytes))
}

/// Runs the two-sample energy distance on buffers of `backend`'s device with no copy of
/// the inputs: x [N, d] and y [M, d] in `spec.dtype`, optional weights [N] and [M] f32,
/// not checked on the host (see the module docs). `spec` is trusted as validated; every
/// buffer's size is checked against it. Work is queued, not waited for.
pub fn energy_distance_raw(
    backend: &WgpuBackend,
    spec: &EnergyDistanceSpec,
    x: &wgpu::Buffer,
    y: &wgpu::Buffer,
    weights: (Option<&wgpu::Buffer>, Option<&wgpu::Buffer>),
    out: &EnergyDistanceBuffers<'_>,
) -> Result<()> {
    let (x_bytes, y_bytes) = check_distance_buffers(backend, spec, x, y, weights, out)?;
    let (n, m, d) = (spec.n as u64, spec.m as u64, spec.d as u64);
    let storage = wgpu::BufferUsages::STORAGE;
    let elem = spec.dtype.size() as u64;
    let (wx, wy) = weights;
    let terms = [
        (term_tiles(n, m), false),
        (term_tiles(n, n), true),
        (term_tiles(m, m), true),
    ];
    let slots: u64 = terms.iter().map(|((tiles, _), _)| tiles).sum();
    let slot_bytes = binding_bytes(backend, PAIRS, "the pair slots", 2 * slots, 4)?;
    let copy = storage | wgpu::BufferUsages::COPY_SRC;
    let slot_buffer = backend.create_buffer("energy pair slots", slot_bytes, storage)?;
    let red = backend.create_buffer("energy reduced", RED_BYTES, copy)?;
    let unused = Unused::new(backend)?;

    let flags_of = |wa: bool, wb: bool| -> u32 {
        let mut flags = 0;
        if wa {
            flags |= F_WA;
        }
        if wb {
            flags |= F_WB;
        }
        if spec.statistic == Statistic::U {
            flags |= F_U;
        }
        flags
    };
    let base = Params {
        d: index(d, "d")?,
        tiles_xy: index(terms[0].0 .0, "X-Y tiles")?,
        tiles_xx: index(terms[1].0 .0, "X-X tiles")?,
        tiles_yy: index(terms[2].0 .0, "Y-Y tiles")?,
        power: u32::from(power_code(spec.beta)),
        half_beta: (0.5 * spec.beta) as f32,
        beta: spec.beta as f32,
        nan_bits: 0x7fc0_0000,
        ..Params::default()
    };
    let pairs = backend.pipeline(&key(PAIRS, Some(spec.dtype))?)?;
    let merge = backend.pipeline(&key(DISTANCE_MERGE, None)?)?;

    // One bind group per pair term (its sets, weights and first slot), then the merge's.
    let sets = [
        (x, y, wx, wy, n, m),
        (x, x, wx, wx, n, n),
        (y, y, wy, wy, m, m),
    ];
    let mut dispatches = Vec::with_capacity(3);
    let mut slot_base = 0u64;
    for (((tiles, chunks), within), (a, b, wa, wb, na, nb)) in terms.iter().zip(sets) {
        let mut flags = flags_of(wa.is_some(), wb.is_some());
        if *within {
            flags |= F_WITHIN;
        }
        let params = Params {
            na: index(na, "rows")?,
            nb: index(nb, "rows")?,
            chunks: index(*chunks, "column chunks")?,
            tiles: index(*tiles, "tiles")?,
            slot_base: index(slot_base, "first slot")?,
            flags,
            ..base
        };
        let uniform = uniform(backend, &params)?;
        let group = backend.bind_group(
            ShaderSource::Energy,
            &[
                prefix(&uniform, 64),
                prefix(a, na * d * elem),
                prefix(b, nb * d * elem),
                weight_binding(wa, na, &unused.read),
                weight_binding(wb, nb, &unused.read),
                prefix(&slot_buffer, slot_bytes),
                prefix(&red, RED_BYTES),
                prefix(&unused.write, 16),
            ],
        )?;
        dispatches.push((group, backend.grid(PAIRS, *tiles)?));
        slot_base += tiles;
    }
    let merge_params = Params {
        na: index(n, "N")?,
        nb: index(m, "M")?,
        flags: flags_of(wx.is_some(), wy.is_some()),
        ..base
    };
    let merge_uniform = uniform(backend, &merge_params)?;
    let merge_group = backend.bind_group(
        ShaderSource::Energy,
        &[
            prefix(&merge_uniform, 64),
            prefix(x, x_bytes),
            prefix(y, y_bytes),
            weight_binding(wx, n, &unused.read),
            weight_binding(wy, m, &unused.read),
            prefix(&slot_buffer, slot_bytes),
            prefix(&red, RED_BYTES),
            prefix(&unused.write, 16),
        ],
    )?;

    let grads = match (out.grad_x, out.grad_y) {
        (Some(grad_x), Some(grad_y)) => GradDispatch {
            backend,
            base,
            d,
            elem,
            red: &red,
            unused: &unused,
        }
        .terms((grad_x, (x, wx, n)), (grad_y, (y, wy, m)))?,
        _ => Vec::new(),
    };
    let grad_pipeline = backend.pipeline(&key(GRAD, Some(spec.dtype))?)?;

    submit_distance(
        backend,
        [(&pairs, &dispatches[..]), (&grad_pipeline, &grads[..])],
        (&merge, &merge_group),
        &red,
        out,
    )
}

/// One sample set of a gradient dispatch: its buffer, weights and rows.
type GradSet<'b> = (&'b wgpu::Buffer, Option<&'b wgpu::Buffer>, u64);

/// What every gradient dispatch of one distance call shares.
struct GradDispatch<'b> {
    backend: &'b WgpuBackend,
    base: Params,
    d: u64,
    elem: u64,
    red: &'b wgpu::Buffer,
    unused: &'b Unused,
}

impl GradDispatch<'_> {
    /// The four terms' bind groups and grids: each set's cross term, which writes its
    /// gradient rows, then its within term, which adds to them.
    fn terms(
        &self,
        (grad_x, set_x): (&wgpu::Buffer, GradSet<'_>),
        (grad_y, set_y): (&wgpu::Buffer, GradSet<'_>),
    ) -> Result<Vec<(wgpu::BindGroup, (u32, u32))>> {
        let flags = |a: &GradSet<'_>, b: &GradSet<'_>| {
            (if a.1.is_some() { F_WA } else { 0 }) | (if b.1.is_some() { F_WB } else { 0 })
        };
        Ok(vec![
            self.group(
                grad_x,
                set_x,
                set_y,
                RED_COEF_X_CROSS,
                flags(&set_x, &set_y),
            )?,
            self.group(
                grad_x,
                set_x,
                set_x,
                RED_COEF_X_WITHIN,
                flags(&set_x, &set_x) | F_ADD,
            )?,
            self.group(
                grad_y,
                set_y,
                set_x,
                RED_COEF_Y_CROSS,
                flags(&set_y, &set_x),
            )?,
            self.group(
                grad_y,
                set_y,
                set_y,
                RED_COEF_Y_WITHIN,
                flags(&set_y, &set_y) | F_ADD,
            )?,
        ])
    }

    /// The bind group and grid of one term of d distance / dA into `grad` [na, d]: A's
    /// rows against B's, scaled by the coefficient in word `coef` of `red`.
    fn group(
        &self,
        grad: &wgpu::Buffer,
        (a, wa, na): GradSet<'_>,
        (b, wb, nb): GradSet<'_>,
        coef: u32,
        flags: u32,
    ) -> Result<(wgpu::BindGroup, (u32, u32))> {
        let chunks = self.d.div_ceil(GRAD_DIMS);
        let tiles = na.div_ceil(PAIR_TILE as u64) * chunks;
        let params = Params {
            na: index(na, "rows")?,
            nb: index(nb, "rows")?,
            chunks: index(chunks, "dimension chunks")?,
            tiles: index(tiles, "tiles")?,
            slot_base: coef,
            flags,
            ..self.base
        };
        let uniform = uniform(self.backend, &params)?;
        let group = self.backend.bind_group(
            ShaderSource::Energy,
            &[
                prefix(&uniform, 64),
                prefix(a, na * self.d * self.elem),
                prefix(b, nb * self.d * self.elem),
                weight_binding(wa, na, &self.unused.read),
                weight_binding(wb, nb, &self.unused.read),
                prefix(&self.unused.write, 16),
                prefix(self.red, RED_BYTES),
                prefix(grad, na * self.d * 4),
            ],
        )?;
        Ok((group, self.backend.grid(GRAD, tiles)?))
    }
}

/// A pipeline's dispatches, each with its bind group and grid.
type Dispatches<'b> = (
    &'b wgpu::ComputePipeline,
    &'b [(wgpu::BindGroup, (u32, u32))],
);

/// Queues the pair dispatches, the merge, the gradient dispatches (none without the
/// gradient) and the copies from `red` into the outputs, in one submission.
fn submit_distance(
    backend: &WgpuBackend,
    [(pairs, dispatches), (grad, grads)]: [Dispatches<'_>; 2],
    (merge, merge_group): (&wgpu::ComputePipeline, &wgpu::BindGroup),
    red: &wgpu::Buffer,
    out: &EnergyDistanceBuffers<'_>,
) -> Result<()> {
    backend.scoped("energy distance", || {
        let mut encoder =
            backend
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("energy distance"),
                });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("energy distance"),
                timestamp_writes: None,
            });
            pass.set_pipeline(pairs);
            for (group, (gx, gy)) in dispatches {
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
            pass.set_pipeline(merge);
            pass.set_bind_group(0, merge_group, &[]);
            pass.dispatch_workgroups(1, 1, 1);
            pass.set_pipeline(grad);
            for (group, (gx, gy)) in grads {
                pass.set_bind_group(0, group, &[]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
        }
        for (k, dst) in [out.distance, out.cross, out.within_x, out.within_y]
            .into_iter()
            .enumerate()
        {
            encoder.copy_buffer_to_buffer(red, 4 * k as u64, dst, 0, 4);
        }
        encoder.copy_buffer_to_buffer(red, RED_STATUS_OFFSET, out.status, 0, 4);
        backend.queue().submit([encoder.finish()]);
        Ok(())
    })
}

/// Output buffers of a raw energy-score call (each needing COPY_DST): `term1`, `term2`,
/// `loss` [1] f32; `grad` [n, m, d] f32 (STORAGE), present exactly when `spec.grad`.
#[derive(Clone, Copy, Debug)]
pub struct EnergyScoreBuffers<'a> {
    pub term1: &'a wgpu::Buffer,
    pub term2: &'a wgpu::Buffer,
    pub loss: &'a wgpu::Buffer,
    pub grad: Option<&'a wgpu::Buffer>,
}

/// Runs the energy score on buffers of `backend`'s device with no copy of the inputs:
/// y [n, d] and preds [n, m, d] in `spec.dtype`. `spec` is trusted as validated; every
/// buffer's size is checked against it. Work is queued, not waited for.
pub fn energy_score_raw(
    backend: &WgpuBackend,
    spec: &EnergyScoreSpec,
    y: &wgpu::Buffer,
    preds: &wgpu::Buffer,
    out: &EnergyScoreBuffers<'_>,
) -> Result<()> {
    backend.check_kernel_limits(ShaderSource::Energy)?;
    let (n, m, d) = (spec.n as u64, spec.m as u64, spec.d as u64);
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::Empty(format!(
            "the energy score needs n, m, d >= 1, got {n}, {m}, {d}"
        )));
    }
    let storage = wgpu::BufferUsages::STORAGE;
    let elem = spec.dtype.size() as u64;
    let rows = n
        .checked_mul(m)
        .ok_or_else(|| Error::Shape("n * m overflows u64".into()))?;
    let y_bytes = binding_bytes(backend, SCORE, "y", n * d, elem)?;
    let preds_bytes = binding_bytes(backend, SCORE, "preds", rows.saturating_mul(d), elem)?;
    // The gradient is f32 whatever the inputs; its size bounds every u32 index too.
    let grad_bytes = binding_bytes(backend, SCORE, "grad", rows * d, 4)?;
    require(y, "y", y_bytes, storage)?;
    require(preds, "preds", preds_bytes, storage)?;
    let copy_dst = wgpu::BufferUsages::COPY_DST;
    for (buffer, what) in [
        (out.term1, "term1"),
        (out.term2, "term2"),
        (out.loss, "loss"),
    ] {
        require(buffer, what, 4, copy_dst)?;
    }
    if out.grad.is_some() != spec.grad {
        return Err(Error::Shape(
            "energy score: a grad buffer is given iff spec.grad".into(),
        ));
    }
    if let Some(g) = out.grad {
        require(g, "grad", grad_bytes, storage)?;
    }

    let slot_bytes = binding_bytes(backend, SCORE, "the row sums", 2 * rows, 4)?;
    let slot_buffer = backend.create_buffer("energy score rows", slot_bytes, storage)?;
    let red = backend.create_buffer(
        "energy score reduced",
        RED_BYTES,
        storage | wgpu::BufferUsages::COPY_SRC,
    )?;
    let unused = Unused::new(backend)?;
    let (nf, mf) = (n as f64, m as f64);
    // Rounded once here from f64: the factors of d loss / d preds (term2's pairs count in
    // both orders, hence no 0.5).
    let c2 = if m < 2 {
        0.0
    } else {
        (-(mf / (mf - 1.0)) / (nf * mf * mf)) as f32
    };
    let params = Params {
        na: index(n, "n")?,
        nb: index(m, "m")?,
        d: index(d, "d")?,
        flags: if spec.grad { F_GRAD } else { 0 },
        power: u32::from(power_code(spec.beta)),
        half_beta: (0.5 * spec.beta) as f32,
        beta: spec.beta as f32,
        c1: (1.0 / (nf * mf)) as f32,
        c2,
        nan_bits: 0x7fc0_0000,
        ..Params::default()
    };
    let uniform = uniform(backend, &params)?;
    let grad_binding = match out.grad {
        Some(g) => prefix(g, grad_bytes),
        None => prefix(&unused.write, 16),
    };
    let group = backend.bind_group(
        ShaderSource::Energy,
        &[
            prefix(&uniform, 64),
            prefix(preds, preds_bytes),
            prefix(y, y_bytes),
            prefix(&unused.read, 16),
            prefix(&unused.read, 16),
            prefix(&slot_buffer, slot_bytes),
            prefix(&red, RED_BYTES),
            grad_binding,
        ],
    )?;
    let score = backend.pipeline(&key(SCORE, Some(spec.dtype))?)?;
    let merge = backend.pipeline(&key(SCORE_MERGE, None)?)?;
    let (gx, gy) = backend.grid(SCORE, rows.div_ceil(u64::from(WORKGROUP_SIZE)))?;

    backend.scoped("energy score", || {
        let mut encoder =
            backend
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("energy score"),
                });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("energy score"),
                timestamp_writes: None,
            });
            pass.set_bind_group(0, &group, &[]);
            pass.set_pipeline(&score);
            pass.dispatch_workgroups(gx, gy, 1);
            pass.set_pipeline(&merge);
            pass.dispatch_workgroups(1, 1, 1);
        }
        for (k, dst) in [out.term1, out.term2, out.loss].into_iter().enumerate() {
            encoder.copy_buffer_to_buffer(&red, 4 * k as u64, dst, 0, 4);
        }
        backend.queue().submit([encoder.finish()]);
        Ok(())
    })
}

/// A new [1] f32 output (or status word) buffer of the Tensor entries.
fn scalar_buffer(backend: &WgpuBackend, label: &str) -> Result<wgpu::Buffer> {
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    backend.create_buffer(label, 4, usage)
}

impl EnergyKernels for WgpuBackend {
    fn energy_score(&self, bound: &EnergyScoreCall<'_>) -> Result<EnergyScoreOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let y = wgpu_buffer(call.y, "y")?;
        let preds = wgpu_buffer(call.preds, "preds")?;
        let term1 = scalar_buffer(self, "energy term1")?;
        let term2 = scalar_buffer(self, "energy term2")?;
        let loss = scalar_buffer(self, "energy loss")?;
        let grad = if spec.grad {
            let elements = (spec.n as u64)
                .saturating_mul(spec.m as u64)
                .saturating_mul(spec.d as u64);
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            Some(self.create_buffer("energy grad", elements.saturating_mul(4), usage)?)
        } else {
            None
        };
        energy_score_raw(
            self,
            spec,
            y,
            preds,
            &EnergyScoreBuffers {
                term1: &term1,
                term2: &term2,
                loss: &loss,
                grad: grad.as_ref(),
            },
        )?;
        let device = call.preds.device();
        let tensor = |buffer: wgpu::Buffer, shape: Vec<usize>| {
            Tensor::from_storage(device, Storage::Wgpu(buffer), shape, DType::F32)
        };
        Ok(EnergyScoreOutput {
            term1: tensor(term1, vec![1]),
            term2: tensor(term2, vec![1]),
            loss: tensor(loss, vec![1]),
            grad: grad.map(|g| tensor(g, vec![spec.n, spec.m, spec.d])),
        })
    }

    fn energy_distance(&self, bound: &EnergyDistanceCall<'_>) -> Result<EnergyDistanceOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let x = wgpu_buffer(call.x, "x")?;
        let y = wgpu_buffer(call.y, "y")?;
        let wx = call
            .weights_x
            .map(|w| wgpu_buffer(w, "weights_x"))
            .transpose()?;
        let wy = call
            .weights_y
            .map(|w| wgpu_buffer(w, "weights_y"))
            .transpose()?;
        let distance = scalar_buffer(self, "energy distance")?;
        let cross = scalar_buffer(self, "energy cross")?;
        let within_x = scalar_buffer(self, "energy within_x")?;
        let within_y = scalar_buffer(self, "energy within_y")?;
        let status = scalar_buffer(self, "energy status")?;
        let grad_buffer = |rows: usize, label: &str| -> Result<Option<wgpu::Buffer>> {
            if !spec.grad {
                return Ok(None);
            }
            let bytes = (rows as u64)
                .saturating_mul(spec.d as u64)
                .saturating_mul(4);
            let usage = wgpu::BufferUsages::STORAGE
                | wgpu::BufferUsages::COPY_SRC
                | wgpu::BufferUsages::COPY_DST;
            self.create_buffer(label, bytes, usage).map(Some)
        };
        let grad_x = grad_buffer(spec.n, "energy grad_x")?;
        let grad_y = grad_buffer(spec.m, "energy grad_y")?;
        energy_distance_raw(
            self,
            spec,
            x,
            y,
            (wx, wy),
            &EnergyDistanceBuffers {
                distance: &distance,
                cross: &cross,
                within_x: &within_x,
                within_y: &within_y,
                status: &status,
                grad_x: grad_x.as_ref(),
                grad_y: grad_y.as_ref(),
            },
        )?;
        if wx.is_some() || wy.is_some() {
            self.watch_weights(status);
        }
        let device = call.x.device();
        let tensor = |buffer: wgpu::Buffer, shape: Vec<usize>| {
            Tensor::from_storage(device, Storage::Wgpu(buffer), shape, DType::F32)
        };
        Ok(EnergyDistanceOutput {
            distance: tensor(distance, vec![1]),
            cross: tensor(cross, vec![1]),
            within_x: tensor(within_x, vec![1]),
            within_y: tensor(within_y, vec![1]),
            grad_x: grad_x.map(|g| tensor(g, vec![spec.n, spec.d])),
            grad_y: grad_y.map(|g| tensor(g, vec![spec.m, spec.d])),
        })
    }
}
