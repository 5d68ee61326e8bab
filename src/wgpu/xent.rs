//! xent on wgpu: the host side of `shaders/xent.wgsl`.
//!
//! One submission runs `xent_scale` (one workgroup, with the gradient), `xent_forward`
//! (one workgroup per row or per few rows, per chunk of rows; it writes the gradient
//! too), `xent_reduce` (one workgroup), `xent_grad` (only a 16-bit gradient with odd V:
//! the words two rows share, per chunk) and copies the per-row results from a scratch
//! buffer into the outputs.
//! A class target outside [0, V) that is not `ignore_index` is not checked on the host and
//! never used as an index: its row's outputs and gradient row are NaN (argmax -1), the
//! reduced loss is NaN, and `xent_reduce` writes the first such row to the status word that
//! [`XentBuffers::first_bad_target_row`] reads back.
//! Tensors larger than one binding (2 GiB, or the device's limit) are processed in
//! chunks of rows, each bound at its own offset; every index inside a shader is u32.
//!
//! The directional radius ([`directional`], [`directional_raw`]) is one submission too:
//! `xent_directional` (per chunk of rows: Delta_a per row and, for V = 2, the binary
//! radius), `xent_directional_reduce` (one workgroup: rho_a and the normalised step), then
//! copies from the scratch buffers into the outputs.

use std::sync::Arc;

use bytemuck::{Pod, Zeroable};

use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::xent::{
    DirectionalCall, DirectionalOutput, DirectionalSpec, Gap, Reduction, RhoReduce, TargetKind,
    Targets, XentCall, XentKernels, XentOutput, XentSpec,
};
use crate::wgpu::{
    dtype_code, index, or_unused, prefix, require, wgpu_buffer, whole, window, BindingKind,
    PipelineKey, ShaderSource, TargetWatch, WgpuBackend, WORKGROUP_SIZE,
};

/// Group 0 of `xent.wgsl`: params, logits, labels, soft targets, weights, rows, red, grad,
/// and the logits again as 16-byte units.
pub(crate) const BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::Read,
];

const SCALE: &str = "xent_scale";
const FORWARD: &str = "xent_forward";
const REDUCE: &str = "xent_reduce";
const GRAD: &str = "xent_grad";
const DIRECTIONAL: &str = "xent_directional";
const DIRECTIONAL_REDUCE: &str = "xent_directional_reduce";

// Params.flags, as in the shader.
const F_SOFT: u32 = 1;
const F_WEIGHTED: u32 = 2;
const F_GAP_TOP2: u32 = 4;
const F_RHO_MAX: u32 = 8;
const F_RED_MEAN: u32 = 16;
const F_INF_IF_SMALL: u32 = 32;
const F_HAS_CAP: u32 = 64;
const F_HAS_FLOOR: u32 = 128;
const F_FLOOR_INF: u32 = 256;
const F_GRAD: u32 = 512;

// Fields of the scratch `rows` buffer (field f of row i is word f * B + i), as in the shader.
const ROW_LOSS: u64 = 0;
const ROW_LSE: u64 = 1;
const ROW_ENTROPY: u64 = 2;
const ROW_MAX: u64 = 3;
const ROW_MIN: u64 = 4;
const ROW_GAP: u64 = 5;
const ROW_DELTA: u64 = 6;
const ROW_RHO: u64 = 7;
const ROW_ARGMAX: u64 = 11;
/// Words per row of `rows` (argmax takes two; then the row max and 1 / s for xent_grad).
const ROW_WORDS: u64 = 15;
/// Bytes of the scratch `red` buffer: loss, rho, grad scale, padding.
const RED_BYTES: u64 = 16;
const RED_LOSS_OFFSET: u64 = 0;
const RED_RHO_OFFSET: u64 = 4;
const RED_STATUS_OFFSET: u64 = 12;

/// The shader's `Params` uniform (std140-compatible: 24 words). WGSL cannot assert a
/// layout, so it is pinned here: in a uniform struct of 4-byte scalars WGSL places field
/// i at byte 4 i (each aligned to 4, none padded) and rounds the size up to 16, and
/// every field below is 4 bytes in the shader's order, so field i must be at 4 i and the
/// size 96 (asserted after the struct).
#[repr(C)]
#[derive(Clone, Copy, Debug, Pod, Zeroable)]
struct Params {
    batch: u32,
    classes: u32,
    stride: u32,
    row0: u32,
    rows: u32,
    logits_base: u32,
    soft_base: u32,
    grad_base: u32,
    grad_words: u32,
    flags: u32,
    ignore_lo: u32,
    ignore_hi: u32,
    inv_t: f32,
    on_target: f32,
    eps_over_v: f32,
    z_loss: f32,
    rho_eps: f32,
    cap: f32,
    floor: f32,
    nan_bits: u32,
    inf_bits: u32,
    row_threads: u32,
    vec_count: u32,
    exp_floor: f32,
}
const _: () = {
    use std::mem::offset_of;
    let offsets = [
        offset_of!(Params, batch),
        offset_of!(Params, classes),
        offset_of!(Params, stride),
        offset_of!(Params, row0),
        offset_of!(Params, rows),
        offset_of!(Params, logits_base),
        offset_of!(Params, soft_base),
        offset_of!(Params, grad_base),
        offset_of!(Params, grad_words),
        offset_of!(Params, flags),
        offset_of!(Params, ignore_lo),
        offset_of!(Params, ignore_hi),
        offset_of!(Params, inv_t),
        offset_of!(Params, on_target),
        offset_of!(Params, eps_over_v),
        offset_of!(Params, z_loss),
        offset_of!(Params, rho_eps),
        offset_of!(Params, cap),
        offset_of!(Params, floor),
        offset_of!(Params, nan_bits),
        offset_of!(Params, inf_bits),
        offset_of!(Params, row_threads),
        offset_of!(Params, vec_count),
        offset_of!(Params, exp_floor),
    ];
    let mut i = 0;
    while i < offsets.len() {
        assert!(offsets[i] == 4 * i);
        i += 1;
    }
    assert!(offsets.len() == 24 && std::mem::size_of::<Params>() == 96);
};

/// The targets of a raw call, on the backend's device.
#[derive(Clone, Copy, Debug)]
pub enum XentTargets<'a> {
    /// y [B] i64 (8 bytes per row, little endian).
    Classes(&'a wgpu::Buffer),
    /// q [B, V] dense, in the dtype `spec.targets` names.
    Soft(&'a wgpu::Buffer),
}

/// Output buffers of a raw call (each needs COPY_DST; `grad` needs STORAGE). Sizes in
/// bytes, each rounded up to a multiple of 4: `loss` 4; `loss_per_row`, `lse`,
/// `entropy`, `max`, `min`, `top2_gap`, `delta` 4 B; `argmax` 8 B (i64); `rho` 4 B
/// for `RhoReduce::PerSample`, else 4; `grad` B V times the size of `spec.grad_dtype`;
/// `status` 4 (COPY_SRC too, to be read back).
#[derive(Clone, Copy, Debug)]
pub struct XentBuffers<'a> {
    pub loss: &'a wgpu::Buffer,
    pub loss_per_row: &'a wgpu::Buffer,
    pub lse: &'a wgpu::Buffer,
    pub entropy: &'a wgpu::Buffer,
    pub argmax: &'a wgpu::Buffer,
    pub max: &'a wgpu::Buffer,
    pub min: &'a wgpu::Buffer,
    pub top2_gap: &'a wgpu::Buffer,
    pub delta: &'a wgpu::Buffer,
    pub rho: &'a wgpu::Buffer,
    /// Present exactly when `spec.options.grad`.
    pub grad: Option<&'a wgpu::Buffer>,
    /// One u32, written by every call: 0, or !(the first row whose class target is out
    /// of range). Public like the other fields, since a raw caller provides the buffers.
    pub status: &'a wgpu::Buffer,
}

impl XentBuffers<'_> {
    /// The first row of the last call on these buffers whose class target was outside
    /// [0, V) and not `ignore_index` (its outputs are NaN), or None. Waits for the queue:
    /// it downloads.
    pub fn first_bad_target_row(&self, backend: &WgpuBackend) -> Result<Option<usize>> {
        let bytes = backend.download(self.status, 4)?;
        let word = bytes
            .get(..4)
            .and_then(|b| <[u8; 4]>::try_from(b).ok())
            .map(u32::from_le_bytes)
            .ok_or_else(|| Error::Wgpu("the xent status word holds under 4 bytes".into()))?;
        Ok((word != 0).then_some(!word as usize))
    }
}

fn key(entry: &'static str, constants: Vec<(&'static str, u32)>) -> PipelineKey {
    PipelineKey {
        shader: ShaderSource::Xent,
        entry,
        constants,
    }
}

fn forward_key(logits: DType, soft: DType, grad: DType) -> Result<PipelineKey> {
    Ok(key(
        FORWARD,
        vec![
            ("LOGITS_DT", dtype_code(logits)?),
            ("SOFT_DT", dtype_code(soft)?),
            ("GRAD_DT", dtype_code(grad)?),
        ],
    ))
}

fn reduce_key() -> PipelineKey {
    key(REDUCE, Vec::new())
}

fn scale_key() -> PipelineKey {
    key(SCALE, Vec::new())
}

fn grad_key(logits: DType, soft: DType, grad: DType) -> Result<PipelineKey> {
    Ok(key(
        GRAD,
        vec![
            ("LOGITS_DT", dtype_code(logits)?),
            ("SOFT_DT", dtype_code(soft)?),
            ("GRAD_DT", dtype_code(grad)?),
        ],
    ))
}

/// The directional row kernel: derivatives (as `logits`) and logits (as `soft`) in `dtype`.
fn directional_key(dtype: DType) -> Result<PipelineKey> {
    let code = dtype_code(dtype)?;
    Ok(key(
        DIRECTIONAL,
        vec![("LOGITS_DT", code), ("SOFT_DT", code)],
    ))
}

fn directional_reduce_key() -> PipelineKey {
    key(DIRECTIONAL_REDUCE, Vec::new())
}

/// Every pipeline xent can use: per logits dtype, soft targets in that dtype or f32 and
/// a gradient in that dtype or f32; and the directional radius's, per dtype.
pub(crate) fn all_pipelines() -> Vec<PipelineKey> {
    let mut keys = vec![reduce_key(), scale_key(), directional_reduce_key()];
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        keys.extend(directional_key(dtype));
    }
    for logits in [DType::F32, DType::F16, DType::BF16] {
        let others = if logits == DType::F32 {
            vec![DType::F32]
        } else {
            vec![logits, DType::F32]
        };
        for &soft in &others {
            for &grad in &others {
                keys.extend(forward_key(logits, soft, grad));
                keys.extend(grad_key(logits, soft, grad));
            }
        }
    }
    keys
}

/// The dtype the shader reads soft targets in (irrelevant for class targets).
fn soft_dtype(spec: &XentSpec) -> DType {
    match spec.targets {
        TargetKind::Soft(dtype) => dtype,
        TargetKind::Classes => spec.dtype,
    }
}

/// Runs xent on wgpu tensors: allocates the outputs and calls [`xent_raw`].
fn xent_tensors(backend: &WgpuBackend, bound: &XentCall<'_>) -> Result<XentOutput> {
    let (spec, call) = (bound.spec(), bound.call());
    let device = call.logits.device();
    let logits = wgpu_buffer(call.logits, "logits")?;
    let targets = match call.targets {
        Targets::Classes(y) => XentTargets::Classes(wgpu_buffer(y, "class targets")?),
        Targets::Soft(q) => XentTargets::Soft(wgpu_buffer(q, "soft targets")?),
    };
    let weights = call
        .class_weights
        .map(|w| wgpu_buffer(w, "class weights"))
        .transpose()?;

    let b = spec.batch;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let output = |label: &str, elements: usize, dtype: DType| -> Result<wgpu::Buffer> {
        let bytes = (elements as u64).saturating_mul(dtype.size() as u64);
        backend.create_buffer(label, bytes, usage)
    };
    let rho_len = if spec.options.radius.reduce == RhoReduce::PerSample {
        b
    } else {
        1
    };
    let grad_len = b
        .checked_mul(spec.classes)
        .ok_or_else(|| Error::Shape(format!("grad [{b}, {}] overflows usize", spec.classes)))?;
    let loss = output("xent loss", 1, DType::F32)?;
    let loss_per_row = output("xent loss_per_row", b, DType::F32)?;
    let lse = output("xent lse", b, DType::F32)?;
    let entropy = output("xent entropy", b, DType::F32)?;
    let argmax = output("xent argmax", b, DType::I64)?;
    let max = output("xent max", b, DType::F32)?;
    let min = output("xent min", b, DType::F32)?;
    let top2_gap = output("xent top2_gap", b, DType::F32)?;
    let delta = output("xent delta", b, DType::F32)?;
    let rho = output("xent rho", rho_len, DType::F32)?;
    let grad = if spec.options.grad {
        Some(output("xent grad", grad_len, spec.grad_dtype)?)
    } else {
        None
    };
    let status = output("xent status", 1, DType::F32)?;
    xent_raw(
        backend,
        spec,
        logits,
        targets,
        weights,
        &XentBuffers {
            loss: &loss,
            loss_per_row: &loss_per_row,
            lse: &lse,
            entropy: &entropy,
            argmax: &argmax,
            max: &max,
            min: &min,
            top2_gap: &top2_gap,
            delta: &delta,
            rho: &rho,
            grad: grad.as_ref(),
            status: &status,
        },
    )?;
    if spec.targets == TargetKind::Classes {
        backend.watch_targets(TargetWatch {
            status,
            classes: spec.classes,
            ignore_index: spec.options.ignore_index,
        });
    }
    let tensor = |buffer: wgpu::Buffer, shape: Vec<usize>, dtype: DType| {
        Tensor::from_storage(device, Storage::Wgpu(buffer), shape, dtype)
    };
    Ok(XentOutput {
        loss: tensor(loss, vec![1], DType::F32),
        loss_per_row: tensor(loss_per_row, vec![b], DType::F32),
        lse: tensor(lse, vec![b], DType::F32),
        entropy: tensor(entropy, vec![b], DType::F32),
        argmax: tensor(argmax, vec![b], DType::I64),
        max: tensor(max, vec![b], DType::F32),
        min: tensor(min, vec![b], DType::F32),
        top2_gap: tensor(top2_gap, vec![b], DType::F32),
        delta: tensor(delta, vec![b], DType::F32),
        rho: tensor(rho, vec![rho_len], DType::F32),
        grad: grad.map(|g| tensor(g, vec![b, spec.classes], spec.grad_dtype)),
    })
}

/// The per-row scratch and reduction buffers of one call, and the placeholders for the
/// bindings a problem does not use (a read-only one, which may fill several slots, and a
/// separate writable one for an absent gradient).
struct Scratch {
    rows: wgpu::Buffer,
    red: wgpu::Buffer,
    unused: wgpu::Buffer,
    unused_grad: wgpu::Buffer,
}

impl Scratch {
    fn new(backend: &WgpuBackend, label: &str, rows_bytes: u64, red_bytes: u64) -> Result<Scratch> {
        let storage = wgpu::BufferUsages::STORAGE;
        let copy = storage | wgpu::BufferUsages::COPY_SRC;
        Ok(Scratch {
            rows: backend.create_buffer(&format!("{label} rows"), rows_bytes, copy)?,
            red: backend.create_buffer(&format!("{label} reduced"), red_bytes, copy)?,
            unused: backend.create_buffer("xent unused input", 16, storage)?,
            unused_grad: backend.create_buffer("xent unused grad", 16, storage)?,
        })
    }
}

/// Invocations per row and rows per workgroup: about sixteen elements or more per
/// invocation, a whole workgroup for rows of 4096 classes and up, down to one invocation
/// per row (256 rows per workgroup) for V <= 16.
fn row_layout(v: u64) -> (u64, u64) {
    let row_threads = v
        .div_ceil(16)
        .next_power_of_two()
        .min(u64::from(WORKGROUP_SIZE));
    (row_threads, u64::from(WORKGROUP_SIZE) / row_threads)
}

/// The buffers of one raw call, checked against its spec: `targets` holds the class
/// labels, or the soft targets when `soft`.
struct Bound<'a> {
    logits: &'a wgpu::Buffer,
    targets: &'a wgpu::Buffer,
    soft: bool,
    weights: Option<&'a wgpu::Buffer>,
    grad: Option<&'a wgpu::Buffer>,
}

/// Checks every buffer of a raw call against `spec` (sizes in u64, against overflow),
/// before any arithmetic in u32.
fn check_buffers<'a>(
    spec: &XentSpec,
    logits: &'a wgpu::Buffer,
    targets: XentTargets<'a>,
    weights: Option<&'a wgpu::Buffer>,
    out: &XentBuffers<'a>,
) -> Result<Bound<'a>> {
    let storage = wgpu::BufferUsages::STORAGE;
    let copy_dst = wgpu::BufferUsages::COPY_DST;
    let b = spec.batch as u64;
    let v = spec.classes as u64;
    let stride = spec.row_stride as u64;
    if b == 0 || v == 0 || v > stride {
        return Err(Error::Shape(format!(
            "xent: B = {b}, V = {v}, row stride = {stride} (need B, V >= 1 and V <= stride)"
        )));
    }
    let elements = b
        .checked_mul(stride)
        .ok_or_else(|| Error::Shape(format!("xent: [{b}, {stride}] overflows u64")))?;
    let logits_size = spec.dtype.size() as u64;
    require(
        logits,
        "logits",
        elements.saturating_mul(logits_size),
        storage,
    )?;
    let (soft, targets) = match (targets, spec.targets) {
        (XentTargets::Classes(y), TargetKind::Classes) => {
            require(y, "class targets", b * 8, storage)?;
            (false, y)
        }
        (XentTargets::Soft(q), TargetKind::Soft(_)) => {
            let soft_size = soft_dtype(spec).size() as u64;
            require(
                q,
                "soft targets",
                (b * v).saturating_mul(soft_size),
                storage,
            )?;
            (true, q)
        }
        _ => {
            return Err(Error::Shape(
                "xent: the target buffer's kind differs from spec.targets".into(),
            ))
        }
    };
    if weights.is_some() != spec.weighted {
        return Err(Error::Shape(
            "xent: class weights given iff spec.weighted".into(),
        ));
    }
    if let Some(w) = weights {
        require(w, "class weights", v * 4, storage)?;
    }
    let per_sample = spec.options.radius.reduce == RhoReduce::PerSample;
    for (buffer, what, bytes) in [
        (out.loss, "loss", 4),
        (out.loss_per_row, "loss_per_row", 4 * b),
        (out.lse, "lse", 4 * b),
        (out.entropy, "entropy", 4 * b),
        (out.argmax, "argmax", 8 * b),
        (out.max, "max", 4 * b),
        (out.min, "min", 4 * b),
        (out.top2_gap, "top2_gap", 4 * b),
        (out.delta, "delta", 4 * b),
        (out.rho, "rho", if per_sample { 4 * b } else { 4 }),
        (out.status, "status", 4),
    ] {
        require(buffer, what, bytes, copy_dst)?;
    }
    if out.grad.is_some() != spec.options.grad {
        return Err(Error::Shape(
            "xent: a grad buffer is given iff spec.options.grad".into(),
        ));
    }
    if let Some(g) = out.grad {
        let grad_size = spec.grad_dtype.size() as u64;
        require(g, "grad", (b * v).saturating_mul(grad_size), storage)?;
    }
    Ok(Bound {
        logits,
        targets,
        soft,
        weights,
        grad: out.grad,
    })
}

/// Rows per chunk: as many as keep a chunk's logits, soft targets and gradient each in
/// one binding.
fn chunk_rows(backend: &WgpuBackend, spec: &XentSpec, soft: bool) -> Result<u64> {
    let b = spec.batch as u64;
    let v = spec.classes as u64;
    let grad_size = spec.grad_dtype.size() as u64;
    let limit = backend.binding_limit();
    let mut row_bytes = spec.row_stride as u64 * spec.dtype.size() as u64;
    if soft {
        row_bytes = row_bytes.max(v * soft_dtype(spec).size() as u64);
    }
    if spec.options.grad {
        row_bytes = row_bytes.max(v * grad_size);
    }
    let slack = backend.storage_alignment() + 4;
    if row_bytes + slack > limit {
        return Err(Error::Launch {
            kernel: FORWARD.into(),
            reason: format!("one row takes {row_bytes} bytes; a binding holds at most {limit}"),
        });
    }
    let mut rows = ((limit - slack) / row_bytes).min(b);
    // A 16-bit gradient packs two elements per word: chunks must start on an even
    // element, so with odd V they hold an even number of rows.
    if shares_grad_words(spec) && rows < b {
        rows -= rows % 2;
    }
    if rows == 0 {
        return Err(Error::Launch {
            kernel: GRAD.into(),
            reason: format!("two rows of {row_bytes} bytes do not fit one binding of {limit}"),
        });
    }
    Ok(rows)
}

/// Whether two rows share words of the gradient: only a 16-bit one with odd V.
fn shares_grad_words(spec: &XentSpec) -> bool {
    spec.options.grad && spec.grad_dtype.size() == 2 && spec.classes % 2 == 1
}

/// The pipelines of one call: `scale` runs with a gradient, `grad` where rows share words.
struct Pipelines {
    forward: Arc<wgpu::ComputePipeline>,
    reduce: Arc<wgpu::ComputePipeline>,
    scale: Option<Arc<wgpu::ComputePipeline>>,
    grad: Option<Arc<wgpu::ComputePipeline>>,
}

impl Pipelines {
    fn new(backend: &WgpuBackend, spec: &XentSpec) -> Result<Pipelines> {
        let soft = soft_dtype(spec);
        Ok(Pipelines {
            forward: backend.pipeline(&forward_key(spec.dtype, soft, spec.grad_dtype)?)?,
            reduce: backend.pipeline(&reduce_key())?,
            scale: if spec.options.grad {
                Some(backend.pipeline(&scale_key())?)
            } else {
                None
            },
            grad: if shares_grad_words(spec) {
                Some(backend.pipeline(&grad_key(spec.dtype, soft, spec.grad_dtype)?)?)
            } else {
                None
            },
        })
    }
}

/// The shader's flags for `spec`.
fn flags(spec: &XentSpec, soft: bool) -> u32 {
    let o = &spec.options;
    let r = &o.radius;
    [
        (soft, F_SOFT),
        (spec.weighted, F_WEIGHTED),
        (r.gap == Gap::Top2, F_GAP_TOP2),
        (r.reduce == RhoReduce::Max, F_RHO_MAX),
        (o.reduction == Reduction::Mean, F_RED_MEAN),
        (o.grad, F_GRAD),
        (r.inf_if_small, F_INF_IF_SMALL),
    ]
    .into_iter()
    .filter(|&(set, _)| set)
    .fold(0, |flags, (_, flag)| flags | flag)
}

/// The uniform's fields that every chunk shares (the chunk's own are left 0).
fn base_params(spec: &XentSpec, soft: bool, row_threads: u32) -> Result<Params> {
    let o = &spec.options;
    let r = &o.radius;
    let mut flags = flags(spec, soft);
    // A cap of +inf (or beyond f32) caps nothing; a floor of +inf makes every rho +inf.
    let cap = r.cap.map_or(f32::INFINITY, |c| c as f32);
    if cap.is_finite() {
        flags |= F_HAS_CAP;
    }
    let floor = r.floor.map_or(0.0, |f| f as f32);
    if r.floor.is_some() {
        flags |= if floor.is_finite() {
            F_HAS_FLOOR
        } else {
            F_FLOOR_INF
        };
    }
    // The shader divides by T as a product with 1 / T and clamps exponent arguments at
    // -128 T (see its Units): validation keeps both normal f32 numbers.
    let inv_t = (1.0 / o.temperature) as f32;
    let exp_floor = (-128.0 * o.temperature).max(-f64::from(f32::MAX)) as f32;
    let ignore = o.ignore_index as u64;
    Ok(Params {
        batch: index(spec.batch as u64, "B")?,
        classes: index(spec.classes as u64, "V")?,
        stride: index(spec.row_stride as u64, "row stride")?,
        row0: 0,
        rows: 0,
        logits_base: 0,
        soft_base: 0,
        grad_base: 0,
        grad_words: 0,
        flags,
        ignore_lo: ignore as u32,
        ignore_hi: (ignore >> 32) as u32,
        inv_t,
        on_target: (1.0 - o.label_smoothing) as f32,
        eps_over_v: (o.label_smoothing / spec.classes as f64) as f32,
        z_loss: o.z_loss as f32,
        rho_eps: r.eps as f32,
        cap: if cap.is_finite() { cap } else { 0.0 },
        floor: if floor.is_finite() { floor } else { 0.0 },
        nan_bits: 0x7fc0_0000,
        inf_bits: 0x7f80_0000,
        row_threads,
        vec_count: 0,
        exp_floor,
    })
}

/// One chunk of rows: its bind group, and the grids of xent_forward and xent_grad.
struct Chunk {
    bind_group: wgpu::BindGroup,
    forward_grid: (u32, u32),
    grad_grid: (u32, u32),
}

/// Rows [row0, row1) as a chunk: its uniform, every binding at the chunk's offsets, and
/// its grids (xent_forward: `rows_per_workgroup` rows a workgroup; xent_grad: a row an
/// invocation).
fn chunk(
    backend: &WgpuBackend,
    spec: &XentSpec,
    bound: &Bound<'_>,
    scratch: &Scratch,
    (base, rows_per_workgroup): (&Params, u64),
    (row0, row1): (u64, u64),
) -> Result<Chunk> {
    let (b, v) = (spec.batch as u64, spec.classes as u64);
    let stride = spec.row_stride as u64;
    let logits_size = spec.dtype.size() as u64;
    let soft_size = soft_dtype(spec).size() as u64;
    let grad_size = spec.grad_dtype.size() as u64;
    let align = backend.storage_alignment();
    let logits_window = window(
        row0 * stride * logits_size,
        row1 * stride * logits_size,
        align,
    );
    let soft_window = window(row0 * v * soft_size, row1 * v * soft_size, align);
    let grad_window = window(row0 * v * grad_size, row1 * v * grad_size, align);
    let grad_words = if spec.options.grad {
        ((row1 - row0) * v * grad_size).div_ceil(4)
    } else {
        0
    };
    // The logits window again as whole 16-byte units (offsets are 16-byte aligned).
    let vec_bytes = logits_window.size / 16 * 16;
    let params = Params {
        vec_count: index(vec_bytes / 16, "16-byte units")?,
        row0: index(row0, "first row")?,
        rows: index(row1 - row0, "rows")?,
        logits_base: index(logits_window.skip / logits_size, "logits offset")?,
        soft_base: index(soft_window.skip / soft_size, "soft target offset")?,
        grad_base: index(grad_window.skip / 4, "grad offset")?,
        grad_words: index(grad_words, "grad words")?,
        ..*base
    };
    let uniform = backend.buffer_with(
        "xent params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    )?;
    let unused = &scratch.unused;
    let (labels_binding, soft_binding) = if bound.soft {
        (
            prefix(unused, 16),
            (bound.targets, soft_window.offset, soft_window.size),
        )
    } else {
        (prefix(bound.targets, 8 * b), prefix(unused, 16))
    };
    let weights_binding = or_unused(bound.weights.map(|w| prefix(w, 4 * v)), unused);
    let grad_binding = or_unused(
        bound
            .grad
            .map(|g| (g, grad_window.offset, grad_window.size)),
        &scratch.unused_grad,
    );
    let logits4_binding = or_unused(
        (vec_bytes > 0).then_some((bound.logits, logits_window.offset, vec_bytes)),
        unused,
    );
    let bind_group = backend.bind_group(
        ShaderSource::Xent,
        &[
            prefix(&uniform, std::mem::size_of::<Params>() as u64),
            (bound.logits, logits_window.offset, logits_window.size),
            labels_binding,
            soft_binding,
            weights_binding,
            whole(&scratch.rows),
            whole(&scratch.red),
            grad_binding,
            logits4_binding,
        ],
    )?;
    let rows = row1 - row0;
    Ok(Chunk {
        bind_group,
        forward_grid: backend.grid(FORWARD, rows.div_ceil(rows_per_workgroup))?,
        grad_grid: backend.grid(GRAD, rows.div_ceil(u64::from(WORKGROUP_SIZE)))?,
    })
}

/// Runs xent on buffers of `backend`'s device with no copy of the inputs (for
/// frameworks linking the kernel; see [`WgpuBackend::from_device`]). `spec` describes
/// the buffers and is trusted as validated, except for the class targets, which are not
/// checked on the host: one outside [0, V) that is not `ignore_index` gives a NaN row and
/// is reported in `out.status`. Work is queued, not waited for.
pub fn xent_raw(
    backend: &WgpuBackend,
    spec: &XentSpec,
    logits: &wgpu::Buffer,
    targets: XentTargets<'_>,
    weights: Option<&wgpu::Buffer>,
    out: &XentBuffers<'_>,
) -> Result<()> {
    backend.check_kernel_limits(ShaderSource::Xent)?;
    let bound = check_buffers(spec, logits, targets, weights, out)?;
    let (b, v) = (spec.batch as u64, spec.classes as u64);

    // Whole-buffer bindings: the per-row scratch, labels and weights.
    let rows_bytes = ROW_WORDS * 4 * b;
    backend.check_binding(
        FORWARD,
        "the per-row scratch (60 bytes per row)",
        rows_bytes,
    )?;
    backend.check_binding(FORWARD, "the class targets", 8 * b)?;
    backend.check_binding(FORWARD, "the class weights", 4 * v)?;
    let chunk_rows = chunk_rows(backend, spec, bound.soft)?;
    let pipelines = Pipelines::new(backend, spec)?;
    let scratch = Scratch::new(backend, "xent", rows_bytes, RED_BYTES)?;
    let (row_threads, rows_per_workgroup) = row_layout(v);
    let base = base_params(spec, bound.soft, index(row_threads, "row threads")?)?;

    let mut chunks = Vec::new();
    let mut row0 = 0;
    while row0 < b {
        let row1 = (row0 + chunk_rows).min(b);
        let layout = (&base, rows_per_workgroup);
        chunks.push(chunk(
            backend,
            spec,
            &bound,
            &scratch,
            layout,
            (row0, row1),
        )?);
        row0 = row1;
    }
    backend.scoped("xent", || {
        let mut encoder =
            backend
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("xent"),
                });
        encode_passes(&mut encoder, &pipelines, &chunks);
        encode_copies(&mut encoder, spec, &scratch, out);
        backend.queue().submit([encoder.finish()]);
        Ok(())
    })
}

/// The compute pass: scale, forward per chunk, reduce, then grad per chunk.
fn encode_passes(encoder: &mut wgpu::CommandEncoder, pipelines: &Pipelines, chunks: &[Chunk]) {
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
        label: Some("xent"),
        timestamp_writes: None,
    });
    if let Some(scale) = &pipelines.scale {
        // Reads only the whole-buffer bindings, which every chunk's group holds.
        pass.set_pipeline(scale);
        pass.set_bind_group(0, &chunks[0].bind_group, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    pass.set_pipeline(&pipelines.forward);
    for chunk in chunks {
        let (x, y) = chunk.forward_grid;
        pass.set_bind_group(0, &chunk.bind_group, &[]);
        pass.dispatch_workgroups(x, y, 1);
    }
    // Reads only the whole-buffer bindings, which every chunk's group holds.
    pass.set_pipeline(&pipelines.reduce);
    pass.set_bind_group(0, &chunks[0].bind_group, &[]);
    pass.dispatch_workgroups(1, 1, 1);
    if let Some(grad) = &pipelines.grad {
        pass.set_pipeline(grad);
        for chunk in chunks {
            let (x, y) = chunk.grad_grid;
            pass.set_bind_group(0, &chunk.bind_group, &[]);
            pass.dispatch_workgroups(x, y, 1);
        }
    }
}

/// Copies the per-row fields of the scratch and the reduced values into the outputs.
fn encode_copies(
    encoder: &mut wgpu::CommandEncoder,
    spec: &XentSpec,
    scratch: &Scratch,
    out: &XentBuffers<'_>,
) {
    let b = spec.batch as u64;
    let (rows, red) = (&scratch.rows, &scratch.red);
    let field = |f: u64| f * 4 * b;
    for (dst, f) in [
        (out.loss_per_row, ROW_LOSS),
        (out.lse, ROW_LSE),
        (out.entropy, ROW_ENTROPY),
        (out.max, ROW_MAX),
        (out.min, ROW_MIN),
        (out.top2_gap, ROW_GAP),
        (out.delta, ROW_DELTA),
    ] {
        encoder.copy_buffer_to_buffer(rows, field(f), dst, 0, 4 * b);
    }
    encoder.copy_buffer_to_buffer(rows, field(ROW_ARGMAX), out.argmax, 0, 8 * b);
    encoder.copy_buffer_to_buffer(red, RED_LOSS_OFFSET, out.loss, 0, 4);
    encoder.copy_buffer_to_buffer(red, RED_STATUS_OFFSET, out.status, 0, 4);
    if spec.options.radius.reduce == RhoReduce::PerSample {
        encoder.copy_buffer_to_buffer(rows, field(ROW_RHO), out.rho, 0, 4 * b);
    } else {
        encoder.copy_buffer_to_buffer(red, RED_RHO_OFFSET, out.rho, 0, 4);
    }
}

// Fields of the directional scratch `rows` buffer (field f of row i is word f * B + i;
// field 0 is the shader's extended code of Delta_a) and slots of its `red`, as in the
// shader.
const DIR_DELTA: u64 = 1;
const DIR_RADIUS: u64 = 2;
const DIR_ROW_WORDS: u64 = 3;
const DIR_RED_RHO_OFFSET: u64 = 0;
const DIR_RED_STEP_OFFSET: u64 = 4;
const DIR_RED_BYTES: u64 = 16;
// Params.flags of the directional reduce, as in the shader.
const DF_STEP_NEG: u32 = 1;
const DF_STEP_ZERO: u32 = 2;

/// Output buffers of a raw directional call, f32, each needing COPY_DST (sizes in bytes,
/// rounded up to a multiple of 4): `delta_a` 4 B, `rho_a` and `normalized_step` 4,
/// `binary_radius` 4 B, present exactly when V = 2.
#[derive(Clone, Copy, Debug)]
pub struct DirectionalBuffers<'a> {
    pub delta_a: &'a wgpu::Buffer,
    pub rho_a: &'a wgpu::Buffer,
    pub normalized_step: &'a wgpu::Buffer,
    pub binary_radius: Option<&'a wgpu::Buffer>,
}

/// tau / pi as m 2^e with m in [1, 2) rounded once to f32 (from f64), and the shader's
/// step flags. The reduce multiplies m by the mantissa of max Delta_a (one rounding) and
/// scales by the exponents exactly, so tau / rho_a is rounded twice, not four times.
fn step_factor(step: f64) -> (f32, i32, u32) {
    let mut flags = 0;
    if step.is_sign_negative() {
        flags |= DF_STEP_NEG;
    }
    let c = step.abs() / std::f64::consts::PI;
    if c == 0.0 {
        return (1.0, 0, flags | DF_STEP_ZERO);
    }
    // Subnormal f64 values are normalised first (their exact scale is irrelevant to f32).
    let (c, shift) = if c < f64::MIN_POSITIVE {
        (c * 2f64.powi(64), -64)
    } else {
        (c, 0)
    };
    let bits = c.to_bits();
    let exponent = ((bits >> 52) & 0x7ff) as i32 - 1023 + shift;
    let mantissa = f64::from_bits((bits & ((1 << 52) - 1)) | (1023 << 52)) as f32;
    if mantissa == 2.0 {
        (1.0, exponent + 1, flags)
    } else {
        (mantissa, exponent, flags)
    }
}

/// Runs the directional radius on wgpu tensors: allocates the outputs and calls
/// [`directional_raw`].
fn directional_tensors(
    backend: &WgpuBackend,
    bound: &DirectionalCall<'_>,
) -> Result<DirectionalOutput> {
    let (spec, call) = (bound.spec(), bound.call());
    let device = call.logits.device();
    let logits = wgpu_buffer(call.logits, "logits")?;
    let derivatives = wgpu_buffer(call.derivatives, "derivatives")?;
    let b = spec.batch;
    let usage =
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST;
    let output = |label: &str, elements: usize| -> Result<wgpu::Buffer> {
        backend.create_buffer(label, (elements as u64).saturating_mul(4), usage)
    };
    let delta_a = output("xent delta_a", b)?;
    let rho_a = output("xent rho_a", 1)?;
    let normalized_step = output("xent normalized_step", 1)?;
    let binary_radius = if spec.classes == 2 {
        Some(output("xent binary_radius", b)?)
    } else {
        None
    };
    directional_raw(
        backend,
        spec,
        logits,
        derivatives,
        &DirectionalBuffers {
            delta_a: &delta_a,
            rho_a: &rho_a,
            normalized_step: &normalized_step,
            binary_radius: binary_radius.as_ref(),
        },
    )?;
    let tensor = |buffer: wgpu::Buffer, len: usize| {
        Tensor::from_storage(device, Storage::Wgpu(buffer), vec![len], DType::F32)
    };
    Ok(DirectionalOutput {
        delta_a: tensor(delta_a, b),
        rho_a: tensor(rho_a, 1),
        binary_radius: binary_radius.map(|r| tensor(r, b)),
        normalized_step: tensor(normalized_step, 1),
    })
}

/// Runs the directional radius on buffers of `backend`'s device with no copy of the
/// inputs: logits z and derivatives a, both [B, V] dense in `spec.dtype` (STORAGE); writes
/// `out` (see [`DirectionalBuffers`]). `spec` is trusted for semantics (build it with
/// `ops::xent::validate_directional`), but every buffer's size and usage is checked
/// against it. Work is queued, not waited for. Inputs beyond one binding are processed
/// in chunks of rows; one row must fit one binding (2 GiB or the device's
/// max_storage_buffer_binding_size), and the 12 B bytes of per-row scratch too.
pub fn directional_raw(
    backend: &WgpuBackend,
    spec: &DirectionalSpec,
    logits: &wgpu::Buffer,
    derivatives: &wgpu::Buffer,
    out: &DirectionalBuffers<'_>,
) -> Result<()> {
    backend.check_kernel_limits(ShaderSource::Xent)?;
    check_directional_buffers(spec, logits, derivatives, out)?;
    let b = spec.batch as u64;
    let v = spec.classes as u64;
    let elem = spec.dtype.size() as u64;
    let rows_pipeline = backend.pipeline(&directional_key(spec.dtype)?)?;
    let reduce = backend.pipeline(&directional_reduce_key())?;
    let rows_bytes = DIR_ROW_WORDS * 4 * b;
    backend.check_binding(
        DIRECTIONAL,
        "the per-row scratch (12 bytes per row)",
        rows_bytes,
    )?;
    let chunk_rows = directional_chunk_rows(backend, v * elem)?.min(b);
    let scratch = Scratch::new(backend, "xent directional", rows_bytes, DIR_RED_BYTES)?;
    let (row_threads, rows_per_workgroup) = row_layout(v);
    let base = directional_params(spec, row_threads)?;
    let inputs = DirectionalInputs {
        logits,
        derivatives,
        scratch: &scratch,
        rows_bytes,
        elem,
        rows_per_workgroup,
    };
    let mut chunks = Vec::new();
    let mut row0 = 0;
    while row0 < b {
        let row1 = (row0 + chunk_rows).min(b);
        chunks.push(directional_chunk(
            backend, spec, &inputs, &base, row0, row1,
        )?);
        row0 = row1;
    }
    backend.scoped("xent::directional", || {
        encode_directional(
            backend,
            spec,
            &rows_pipeline,
            &reduce,
            &chunks,
            &scratch,
            out,
        );
        Ok(())
    })
}

/// Checks B, V and that every buffer is large enough and usable as the kernels use it.
fn check_directional_buffers(
    spec: &DirectionalSpec,
    logits: &wgpu::Buffer,
    derivatives: &wgpu::Buffer,
    out: &DirectionalBuffers<'_>,
) -> Result<()> {
    let storage = wgpu::BufferUsages::STORAGE;
    let copy_dst = wgpu::BufferUsages::COPY_DST;
    let b = spec.batch as u64;
    let v = spec.classes as u64;
    if b == 0 || v == 0 {
        return Err(Error::Shape(format!(
            "xent::directional: B = {b}, V = {v} (need B, V >= 1)"
        )));
    }
    let elements = b
        .checked_mul(v)
        .ok_or_else(|| Error::Shape(format!("xent::directional: [{b}, {v}] overflows u64")))?;
    let input_bytes = elements.saturating_mul(spec.dtype.size() as u64);
    require(logits, "logits", input_bytes, storage)?;
    require(derivatives, "derivatives", input_bytes, storage)?;
    require(out.delta_a, "delta_a", 4 * b, copy_dst)?;
    require(out.rho_a, "rho_a", 4, copy_dst)?;
    require(out.normalized_step, "normalized_step", 4, copy_dst)?;
    match (out.binary_radius, v == 2) {
        (Some(r), true) => require(r, "binary_radius", 4 * b, copy_dst),
        (None, false) => Ok(()),
        _ => Err(Error::Shape(format!(
            "xent::directional: the binary radius buffer must be given exactly when \
             V = 2, got V = {v}"
        ))),
    }
}

/// Rows per chunk: the rows whose derivatives (and logits) fit one binding.
fn directional_chunk_rows(backend: &WgpuBackend, row_bytes: u64) -> Result<u64> {
    let limit = backend.binding_limit();
    let slack = backend.storage_alignment() + 4;
    if row_bytes + slack > limit {
        return Err(Error::Launch {
            kernel: DIRECTIONAL.into(),
            reason: format!("one row takes {row_bytes} bytes; a binding holds at most {limit}"),
        });
    }
    Ok((limit - slack) / row_bytes)
}

/// The uniform block every chunk starts from: the step's factor travels in the fields
/// the directional entry reads for it (cap, grad_base, flags).
fn directional_params(spec: &DirectionalSpec, row_threads: u64) -> Result<Params> {
    let (step_mantissa, step_exponent, flags) = step_factor(spec.step);
    Ok(Params {
        batch: index(spec.batch as u64, "B")?,
        classes: index(spec.classes as u64, "V")?,
        stride: index(spec.classes as u64, "V")?,
        row0: 0,
        rows: 0,
        logits_base: 0,
        soft_base: 0,
        grad_base: step_exponent as u32,
        grad_words: 0,
        flags,
        ignore_lo: 0,
        ignore_hi: 0,
        inv_t: 1.0,
        on_target: 0.0,
        eps_over_v: 0.0,
        z_loss: 0.0,
        rho_eps: 0.0,
        cap: step_mantissa,
        floor: 0.0,
        nan_bits: 0x7fc0_0000,
        inf_bits: 0x7f80_0000,
        row_threads: index(row_threads, "row threads")?,
        vec_count: 0,
        exp_floor: 0.0,
    })
}

/// What every chunk of a directional call binds.
struct DirectionalInputs<'a> {
    logits: &'a wgpu::Buffer,
    derivatives: &'a wgpu::Buffer,
    scratch: &'a Scratch,
    rows_bytes: u64,
    elem: u64,
    rows_per_workgroup: u64,
}

/// The bind group and grid of rows row0 .. row1.
fn directional_chunk(
    backend: &WgpuBackend,
    spec: &DirectionalSpec,
    inputs: &DirectionalInputs<'_>,
    base: &Params,
    row0: u64,
    row1: u64,
) -> Result<(wgpu::BindGroup, (u32, u32))> {
    let (v, elem) = (spec.classes as u64, inputs.elem);
    let align = backend.storage_alignment();
    let Scratch {
        rows,
        red,
        unused,
        unused_grad,
    } = inputs.scratch;
    let span = window(row0 * v * elem, row1 * v * elem, align);
    // The derivatives window again as whole 16-byte units (offsets are 16-byte aligned).
    let vec_bytes = span.size / 16 * 16;
    let params = Params {
        vec_count: index(vec_bytes / 16, "16-byte units")?,
        row0: index(row0, "first row")?,
        rows: index(row1 - row0, "rows")?,
        logits_base: index(span.skip / elem, "derivatives offset")?,
        soft_base: index(span.skip / elem, "logits offset")?,
        ..*base
    };
    let uniform = backend.buffer_with(
        "xent directional params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    )?;
    // The logits are read only for the binary radius.
    let z_binding = or_unused(
        (v == 2).then_some((inputs.logits, span.offset, span.size)),
        unused,
    );
    let a4_binding = or_unused(
        (vec_bytes > 0).then_some((inputs.derivatives, span.offset, vec_bytes)),
        unused,
    );
    let bind_group = backend.bind_group(
        ShaderSource::Xent,
        &[
            prefix(&uniform, std::mem::size_of::<Params>() as u64),
            (inputs.derivatives, span.offset, span.size),
            prefix(unused, 16),
            z_binding,
            prefix(unused, 16),
            prefix(rows, inputs.rows_bytes),
            prefix(red, DIR_RED_BYTES),
            prefix(unused_grad, 16),
            a4_binding,
        ],
    )?;
    let grid = backend.grid(
        DIRECTIONAL,
        (row1 - row0).div_ceil(inputs.rows_per_workgroup),
    )?;
    Ok((bind_group, grid))
}

/// The row passes of every chunk, the reduce pass, the copies out; one submission.
fn encode_directional(
    backend: &WgpuBackend,
    spec: &DirectionalSpec,
    rows_pipeline: &wgpu::ComputePipeline,
    reduce: &wgpu::ComputePipeline,
    chunks: &[(wgpu::BindGroup, (u32, u32))],
    scratch: &Scratch,
    out: &DirectionalBuffers<'_>,
) {
    let b = spec.batch as u64;
    let device = backend.device();
    let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
        label: Some("xent::directional"),
    });
    {
        let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
            label: Some("xent::directional"),
            timestamp_writes: None,
        });
        pass.set_pipeline(rows_pipeline);
        for (bind_group, (x, y)) in chunks {
            pass.set_bind_group(0, bind_group, &[]);
            pass.dispatch_workgroups(*x, *y, 1);
        }
        // Reads only the whole-buffer bindings, which every chunk's group holds.
        pass.set_pipeline(reduce);
        pass.set_bind_group(0, &chunks[0].0, &[]);
        pass.dispatch_workgroups(1, 1, 1);
    }
    let field = |f: u64| f * 4 * b;
    encoder.copy_buffer_to_buffer(&scratch.rows, field(DIR_DELTA), out.delta_a, 0, 4 * b);
    if let Some(radius) = out.binary_radius {
        encoder.copy_buffer_to_buffer(&scratch.rows, field(DIR_RADIUS), radius, 0, 4 * b);
    }
    encoder.copy_buffer_to_buffer(&scratch.red, DIR_RED_RHO_OFFSET, out.rho_a, 0, 4);
    encoder.copy_buffer_to_buffer(&scratch.red, DIR_RED_STEP_OFFSET, out.normalized_step, 0, 4);
    backend.queue().submit([encoder.finish()]);
}

impl XentKernels for WgpuBackend {
    fn xent(&self, call: &XentCall<'_>) -> Result<XentOutput> {
        xent_tensors(self, call)
    }

    fn directional(&self, call: &DirectionalCall<'_>) -> Result<DirectionalOutput> {
        directional_tensors(self, call)
    }
}
