//! xent on CUDA: `kernels/xent.cu`, on one stream:
//!
//! 1. `xent_scale` (only with `options.grad`): one block; the grad's
//!    reduction scale (1 / sum of row weights for mean) from the targets alone,
//!    in f64, so the row kernel can write the grad in the same pass.
//! 2. `xent_fwd_{dtype}`: one block per row (grid-stride over rows). Reads
//!    the row once with 16-byte loads; writes every per-row output, the row
//!    weight scratch the reduction needs and rho per row for
//!    `RhoReduce::PerSample`; with the grad, re-reads the row (from L1 or L2
//!    where it still is, else from HBM) and writes the dense [B, V] grad in f32
//!    or the logits' dtype (from the row's end back, the columns read last
//!    first). With the grad, one wave of resident blocks grid-strides over
//!    the rows. A class target outside [0, V) that is not `ignore_index` is
//!    never used as an index: that row's outputs and grad row are NaN
//!    (argmax -1), the reduced loss is NaN, and the first such row is
//!    recorded in the status word of
//!    [`XentBuffers`] (zeroed on the stream first), read back by
//!    [`XentBuffers::first_bad_target_row`].
//!    Where B rows would keep under a quarter of the multiprocessors busy and
//!    rows are 32 KiB or more (sm_90), `xent_cluster_{dtype}` runs instead: a
//!    thread-block cluster per row, each CTA holding its slice in shared
//!    memory, so the row is read from HBM once (see `cluster_shape`).
//! 3. `xent_reduce`: one block of 1024 threads; sums in f64 in a fixed order:
//!    the reduced loss and the reduced rho.
//!
//! [`xent`] is the Tensor entry; [`xent_raw`] the zero-copy one on a caller's
//! stream and device memory. The first calls the second: one code path.
//!
//! The directional radius, on one stream:
//!
//! 1. `xent_directional_{dtype}`: one block per row (grid-stride over rows);
//!    Delta_a per row (f32 output and an f64 scratch copy) and, for V = 2,
//!    the binary radius.
//! 2. `xent_directional_reduce`: one block; rho_a and the normalised step
//!    from the f64 max of Delta_a.
//!
//! [`directional`] is its Tensor entry and calls [`directional_raw`].

use std::sync::Arc;

use cudarc::driver::{
    CudaFunction, CudaSlice, CudaStream, CudaView, DeviceRepr, LaunchConfig, PushKernelArg,
};

use super::compile::KernelSource;
use super::launch::{
    alloc_output, as_i64, bytes, check_context, cuda_slice, driver_error, kernels, offsets,
    ClusterShape, Fill, Kernels, Pointers,
};
use super::{CudaBackend, TargetWatch};
use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::xent::{
    DirectionalCall, DirectionalOutput, DirectionalSpec, Gap, Reduction, RhoReduce, TargetKind,
    Targets, XentCall, XentKernels, XentOutput, XentSpec,
};

/// Device inputs of one call, as byte views of the caller's memory. Each view
/// must be aligned to its element size (any cudarc allocation is).
#[derive(Debug)]
pub struct XentInputs<'a> {
    /// Logits [B, row_stride] in `spec.dtype`.
    pub logits: CudaView<'a, u8>,
    pub targets: XentTargets<'a>,
    /// Class weights [V] f32, when `spec.weighted`.
    pub class_weights: Option<CudaView<'a, u8>>,
}

/// The targets of a call, matching `spec.targets`.
#[derive(Debug)]
pub enum XentTargets<'a> {
    /// Class indices [B] i64, not checked on the host. The kernels do not
    /// index with a target outside [0, V) that is not `ignore_index`: such a
    /// row gets NaN outputs and grad row, and the status word records it.
    Classes(CudaView<'a, u8>),
    /// Soft targets [B, V] (dense) in the dtype of `TargetKind::Soft`.
    Soft(CudaView<'a, u8>),
}

/// Device outputs (and the scratch the kernels pass along) of one
/// problem shape; reusable across calls with the same B, V, rho reduction and
/// grad dtype. Outputs are f32 unless noted, laid out as `XentOutput` says.
#[derive(Debug)]
pub struct XentBuffers {
    /// [1]
    pub loss: CudaSlice<u8>,
    /// [B] each.
    pub loss_per_row: CudaSlice<u8>,
    pub lse: CudaSlice<u8>,
    pub entropy: CudaSlice<u8>,
    /// [B] i64.
    pub argmax: CudaSlice<u8>,
    pub max: CudaSlice<u8>,
    pub min: CudaSlice<u8>,
    pub top2_gap: CudaSlice<u8>,
    pub delta: CudaSlice<u8>,
    /// [B] for `RhoReduce::PerSample`, else [1].
    pub rho: CudaSlice<u8>,
    /// [B, V] in `spec.grad_dtype`, when `spec.options.grad`.
    pub grad: Option<CudaSlice<u8>>,
    /// [B] f32: each row's share of the mean's denominator.
    row_weight: CudaSlice<u8>,
    /// [1] f64: the grad's reduction scale.
    scale: CudaSlice<u8>,
    /// [1] u64: 0, or !(the first row whose class target is out of range).
    /// Zeroed by [`xent_raw`] on its stream before its kernels, so it is
    /// this call's alone.
    pub(crate) status: CudaSlice<u8>,
}

fn rho_len(spec: &XentSpec) -> usize {
    match spec.options.radius.reduce {
        RhoReduce::PerSample => spec.batch,
        RhoReduce::Mean | RhoReduce::Max => 1,
    }
}

impl XentBuffers {
    /// Allocates the buffers for `spec` on `stream`, zeroed.
    pub fn new(stream: &Arc<CudaStream>, spec: &XentSpec) -> Result<XentBuffers> {
        XentBuffers::allocate(stream, spec, Fill::Zero)
    }

    fn allocate(stream: &Arc<CudaStream>, spec: &XentSpec, fill: Fill) -> Result<XentBuffers> {
        let alloc = |len: usize| alloc_output(stream, len, fill);
        let b = spec.batch;
        let per_row = bytes(b, 4, "per-row outputs")?;
        let grad = if spec.options.grad {
            let elements = b
                .checked_mul(spec.classes)
                .ok_or_else(|| Error::Shape("B * V overflows usize".into()))?;
            Some(alloc(bytes(elements, spec.grad_dtype.size(), "grad")?)?)
        } else {
            None
        };
        Ok(XentBuffers {
            loss: alloc(4)?,
            loss_per_row: alloc(per_row)?,
            lse: alloc(per_row)?,
            entropy: alloc(per_row)?,
            argmax: alloc(bytes(b, 8, "argmax")?)?,
            max: alloc(per_row)?,
            min: alloc(per_row)?,
            top2_gap: alloc(per_row)?,
            delta: alloc(per_row)?,
            rho: alloc(bytes(rho_len(spec), 4, "rho")?)?,
            grad,
            row_weight: alloc(per_row)?,
            scale: alloc(8)?,
            status: alloc(8)?,
        })
    }

    /// The first row of the last call on these buffers whose class target
    /// was outside [0, V) and not `ignore_index` (its outputs are NaN), or
    /// None. Waits for `stream` (the one the call ran on): it downloads.
    pub fn first_bad_target_row(&self, stream: &Arc<CudaStream>) -> Result<Option<usize>> {
        let bytes = stream
            .clone_dtoh(&self.status)
            .map_err(driver_error("reading the xent status word"))?;
        let word = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| Error::Cuda("the xent status word holds under 8 bytes".into()))?;
        if word == 0 {
            return Ok(None);
        }
        usize::try_from(!word)
            .map(Some)
            .map_err(|_| Error::Cuda(format!("xent status word {word:#x} names no row")))
    }
}

// The kernel argument blocks. Each must match its struct in kernels/xent.cu
// field for field: the size and every field's offset are asserted here and,
// with the same numbers, in the .cu (LK_FIELD_AT). Pointers are CUdeviceptr
// values, 0 for null.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentFwdArgs {
    logits: u64,
    labels: u64,
    soft: u64,
    weights: u64,
    loss_row: u64,
    lse: u64,
    entropy: u64,
    max: u64,
    min: u64,
    top2_gap: u64,
    delta: u64,
    argmax: u64,
    row_weight: u64,
    rho: u64,
    scale: u64,
    grad: u64,
    status: u64,
    batch: i64,
    classes: i64,
    row_stride: i64,
    ignore_index: i64,
    rho_eps: f64,
    rho_cap: f64,
    rho_floor: f64,
    temperature_f64: f64,
    temperature: f32,
    lt: f32,
    one_minus_eps: f32,
    eps_per_class: f32,
    z_loss: f32,
    soft_f32: i32,
    gap_top2: i32,
    rho_per_sample: i32,
    rho_inf_if_small: i32,
    has_cap: i32,
    has_floor: i32,
    grad_f32: i32,
}
const _: () = assert!(std::mem::size_of::<XentFwdArgs>() == 248);
offsets!(XentFwdArgs {
    logits: 0,
    labels: 8,
    soft: 16,
    weights: 24,
    loss_row: 32,
    lse: 40,
    entropy: 48,
    max: 56,
    min: 64,
    top2_gap: 72,
    delta: 80,
    argmax: 88,
    row_weight: 96,
    rho: 104,
    scale: 112,
    grad: 120,
    status: 128,
    batch: 136,
    classes: 144,
    row_stride: 152,
    ignore_index: 160,
    rho_eps: 168,
    rho_cap: 176,
    rho_floor: 184,
    temperature_f64: 192,
    temperature: 200,
    lt: 204,
    one_minus_eps: 208,
    eps_per_class: 212,
    z_loss: 216,
    soft_f32: 220,
    gap_top2: 224,
    rho_per_sample: 228,
    rho_inf_if_small: 232,
    has_cap: 236,
    has_floor: 240,
    grad_f32: 244,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentScaleArgs {
    labels: u64,
    weights: u64,
    scale: u64,
    batch: i64,
    classes: i64,
    ignore_index: i64,
    reduction: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<XentScaleArgs>() == 56);
offsets!(XentScaleArgs {
    labels: 0,
    weights: 8,
    scale: 16,
    batch: 24,
    classes: 32,
    ignore_index: 40,
    reduction: 48,
    pad: 52,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentReduceArgs {
    loss_row: u64,
    row_weight: u64,
    delta: u64,
    loss: u64,
    rho: u64,
    batch: i64,
    rho_eps: f64,
    rho_cap: f64,
    rho_floor: f64,
    reduction: i32,
    rho_max: i32,
    rho_inf_if_small: i32,
    has_cap: i32,
    has_floor: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<XentReduceArgs>() == 96);
offsets!(XentReduceArgs {
    loss_row: 0,
    row_weight: 8,
    delta: 16,
    loss: 24,
    rho: 32,
    batch: 40,
    rho_eps: 48,
    rho_cap: 56,
    rho_floor: 64,
    reduction: 72,
    rho_max: 76,
    rho_inf_if_small: 80,
    has_cap: 84,
    has_floor: 88,
    pad: 92,
});

// SAFETY: the three argument structs are #[repr(C)], made only of integers and
// floats (pointers travel as u64 CUdeviceptr values), with the field order,
// sizes and alignments of their C++ twins in kernels/xent.cu (sizes and
// offsets asserted on both sides), so the kernel reads exactly the bytes
// written here.
unsafe impl DeviceRepr for XentFwdArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for XentScaleArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for XentReduceArgs {}

/// The row kernels for `dtype`: one block per row, and a cluster per row.
fn fwd_kernels(dtype: DType) -> Result<(&'static str, &'static str)> {
    match dtype {
        DType::F32 => Ok(("xent_fwd_f32", "xent_cluster_f32")),
        DType::F16 => Ok(("xent_fwd_f16", "xent_cluster_f16")),
        DType::BF16 => Ok(("xent_fwd_bf16", "xent_cluster_bf16")),
        other => Err(Error::DType(format!(
            "the CUDA xent kernels take f32, f16 or bf16 logits, not {other}"
        ))),
    }
}

/// Threads per CTA of the cluster kernel (kXentClusterThreads in kernels/xent.cu).
const CLUSTER_THREADS: u32 = 256;
/// The slice of a row one CTA of the cluster kernel aims to hold: it keeps
/// two (this row's and the next one's, in flight), and four CTAs share a
/// multiprocessor, so one CTA's work overlaps another's waiting.
const CLUSTER_SLICE_BYTES: usize = 24 << 10;
/// Rows shorter than this stay with the block kernel: a block's own loads
/// (16 KiB in flight per 1024 threads) already cover them.
const CLUSTER_MIN_ROW_BYTES: usize = 32 << 10;
/// The cluster kernel runs only when B * this is at most the multiprocessor
/// count: the block kernel then keeps under a quarter of them busy, while
/// the cluster kernel spreads each row over up to 16. With more rows the
/// block kernel is faster (BENCHMARKS.md: on the H200 the cluster kernel
/// took 3.33 ms against 1.68 at bf16 8192x128256 and 0.038 against 0.034 at
/// 64x131072, but 0.022 against 0.053 at 8x262144).
const CLUSTER_MAX_BATCH_SHARE: usize = 4;
/// The largest cluster (kXentClusterMax; beyond the portable 8, sm_90 allows 16).
const CLUSTER_MAX_SIZE: usize = 16;
/// The most shared memory the two slice buffers of a CTA may take.
const CLUSTER_MAX_SHARED: usize = 200 << 10;

/// The cluster kernel's shape for `spec`, or None where the block kernel
/// runs (no clusters on the device, rows under 32 KiB, more rows than
/// CLUSTER_MAX_BATCH_SHARE allows, or rows whose 16 slices would not fit in
/// shared memory). It depends on V, the dtype and B, never on the grad, so
/// the forward outputs do not change when the grad is asked for; a row's
/// bits may change with B across that threshold.
fn cluster_shape(kernels: &Kernels, spec: &XentSpec) -> Option<ClusterShape> {
    let elem = spec.dtype.size();
    let row_bytes = spec.classes.checked_mul(elem)?;
    let many_rows =
        spec.batch.saturating_mul(CLUSTER_MAX_BATCH_SHARE) > kernels.multiprocessors() as usize;
    if !kernels.has_clusters() || row_bytes < CLUSTER_MIN_ROW_BYTES || many_rows {
        return None;
    }
    let size = row_bytes
        .div_ceil(CLUSTER_SLICE_BYTES)
        .min(CLUSTER_MAX_SIZE);
    // Two buffers, each holding up to ceil(whole vectors / size) 16-byte
    // vectors with 16 bytes of pad on either side for the row's unaligned
    // head and tail (xent_slice_buffer_bytes).
    let buffer = 32 + 16 * (spec.classes / (16 / elem)).div_ceil(size);
    let shared = 2 * buffer;
    if shared > CLUSTER_MAX_SHARED {
        return None;
    }
    Some(ClusterShape {
        size: u32::try_from(size).ok()?,
        threads: CLUSTER_THREADS,
        shared: u32::try_from(shared).ok()?,
    })
}

fn reduction_code(reduction: Reduction) -> i32 {
    match reduction {
        Reduction::None => 0,
        Reduction::Mean => 1,
        Reduction::Sum => 2,
    }
}

/// Checks the shape and dtypes of `spec` against what the kernels take; the
/// logits' span in elements ((B - 1) * stride + V).
fn check_spec(spec: &XentSpec) -> Result<usize> {
    let (b, v) = (spec.batch, spec.classes);
    if b == 0 || v == 0 || v > spec.row_stride {
        return Err(Error::Shape(format!(
            "xent needs B >= 1 and 1 <= V <= row stride, got B = {b}, V = {v}, stride {}",
            spec.row_stride
        )));
    }
    if i32::try_from(v).is_err() {
        // Column indices within a row are 32-bit in the kernels (offsets of
        // rows are 64-bit, so B * V may exceed 2^31).
        return Err(Error::Shape(format!(
            "the CUDA xent kernels take up to 2^31 - 1 classes, got V = {v}"
        )));
    }
    fwd_kernels(spec.dtype)?;
    if spec.grad_dtype != spec.dtype && spec.grad_dtype != DType::F32 {
        return Err(Error::DType(format!(
            "grad dtype must be {} or f32, got {}",
            spec.dtype, spec.grad_dtype
        )));
    }
    if let TargetKind::Soft(q_dtype) = spec.targets {
        if q_dtype != spec.dtype && q_dtype != DType::F32 {
            return Err(Error::DType(format!(
                "soft targets must be {} or f32, got {q_dtype}",
                spec.dtype
            )));
        }
    }
    (b - 1)
        .checked_mul(spec.row_stride)
        .and_then(|n| n.checked_add(v))
        .ok_or_else(|| Error::Shape("logits span overflows usize".into()))
}

/// B * V, the elements of a dense soft-target or grad matrix.
fn dense_elements(spec: &XentSpec) -> Result<usize> {
    spec.batch
        .checked_mul(spec.classes)
        .ok_or_else(|| Error::Shape("B * V overflows usize".into()))
}

/// Device addresses of the inputs, each checked to cover what the kernels
/// read (0 for an absent one).
struct InputPtrs {
    logits: u64,
    labels: u64,
    soft: u64,
    soft_f32: bool,
    weights: u64,
}

fn read_inputs<'a>(
    p: &mut Pointers<'a>,
    spec: &XentSpec,
    inputs: &'a XentInputs<'_>,
) -> Result<InputPtrs> {
    let (b, v) = (spec.batch, spec.classes);
    let elem = spec.dtype.size();
    let span = check_spec(spec)?;
    let logits = p.read(&inputs.logits, bytes(span, elem, "logits")?, elem, "logits")?;
    let (labels, soft, soft_f32) = match (&inputs.targets, spec.targets) {
        (XentTargets::Classes(y), TargetKind::Classes) => (
            p.read(y, bytes(b, 8, "targets")?, 8, "class targets")?,
            0,
            false,
        ),
        (XentTargets::Soft(q), TargetKind::Soft(q_dtype)) => {
            let size = q_dtype.size();
            let need = bytes(dense_elements(spec)?, size, "soft targets")?;
            let ptr = p.read(q, need, size, "soft targets")?;
            (0, ptr, q_dtype == DType::F32)
        }
        _ => {
            return Err(Error::Shape(
                "the targets given do not match spec.targets".into(),
            ))
        }
    };
    let weights = match (&inputs.class_weights, spec.weighted) {
        (Some(w), true) => p.read(w, bytes(v, 4, "class weights")?, 4, "class weights")?,
        (None, false) => 0,
        _ => {
            return Err(Error::Shape(
                "class weights given and spec.weighted disagree".into(),
            ))
        }
    };
    Ok(InputPtrs {
        logits,
        labels,
        soft,
        soft_f32,
        weights,
    })
}

/// Device addresses of the outputs and scratch, each checked to hold what
/// the kernels write (grad 0 without `options.grad`).
struct OutputPtrs {
    loss: u64,
    loss_row: u64,
    lse: u64,
    entropy: u64,
    argmax: u64,
    max: u64,
    min: u64,
    top2_gap: u64,
    delta: u64,
    rho: u64,
    row_weight: u64,
    scale: u64,
    status: u64,
    grad: u64,
}

/// Zeroes the status word on `stream` (`p`'s), then takes every output's address.
fn write_outputs<'a>(
    stream: &Arc<CudaStream>,
    p: &mut Pointers<'a>,
    spec: &XentSpec,
    out: &'a mut XentBuffers,
) -> Result<OutputPtrs> {
    let b = spec.batch;
    let per_row = bytes(b, 4, "per-row outputs")?;
    let XentBuffers {
        loss,
        loss_per_row,
        lse,
        entropy,
        argmax,
        max,
        min,
        top2_gap,
        delta,
        rho,
        grad,
        row_weight,
        scale,
        status,
    } = out;
    // Before any pointer is taken: this call's status starts at "no bad target".
    check_context(stream, status.stream(), "status word")?;
    stream
        .memset_zeros(status)
        .map_err(driver_error("cuMemsetD8Async (xent status)"))?;
    let grad = match (spec.options.grad, grad.as_mut()) {
        (false, _) => 0,
        (true, Some(grad)) => {
            let size = spec.grad_dtype.size();
            let need = bytes(dense_elements(spec)?, size, "grad")?;
            p.write(grad, need, size, "grad")?
        }
        (true, None) => {
            return Err(Error::Shape(
                "options.grad is set but the buffers hold no grad".into(),
            ))
        }
    };
    Ok(OutputPtrs {
        loss: p.write(loss, 4, 4, "loss")?,
        loss_row: p.write(loss_per_row, per_row, 4, "loss_per_row")?,
        lse: p.write(lse, per_row, 4, "lse")?,
        entropy: p.write(entropy, per_row, 4, "entropy")?,
        argmax: p.write(argmax, bytes(b, 8, "argmax")?, 8, "argmax")?,
        max: p.write(max, per_row, 4, "max")?,
        min: p.write(min, per_row, 4, "min")?,
        top2_gap: p.write(top2_gap, per_row, 4, "top2_gap")?,
        delta: p.write(delta, per_row, 4, "delta")?,
        rho: p.write(rho, bytes(rho_len(spec), 4, "rho")?, 4, "rho")?,
        row_weight: p.write(row_weight, per_row, 4, "row weight scratch")?,
        scale: p.write(scale, 8, 8, "scale scratch")?,
        status: p.write(status, 8, 8, "status word")?,
        grad,
    })
}

/// Launches `xent_scale`: the grad's reduction scale, from the targets alone.
fn launch_scale(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    spec: &XentSpec,
    inputs: &InputPtrs,
    outputs: &OutputPtrs,
) -> Result<()> {
    let o = &spec.options;
    let scale_fn = kernels.function(KernelSource::Xent, "xent_scale")?;
    let scale_args = XentScaleArgs {
        labels: inputs.labels,
        weights: inputs.weights,
        scale: outputs.scale,
        batch: as_i64(spec.batch, "B")?,
        classes: as_i64(spec.classes, "V")?,
        ignore_index: o.ignore_index,
        reduction: reduction_code(o.reduction),
        pad: 0,
    };
    let cfg = kernels.single_block_config("xent_scale", &scale_fn)?;
    // SAFETY: the argument block matches xent_scale's parameter. It reads
    // B labels (checked by read_inputs; null for soft targets) and, for
    // labels in [0, V) only (out-of-range labels are never used as an
    // index), the V class weights (checked; null when unweighted), and
    // writes the one f64 of scale (checked by write_outputs). One block,
    // checked against the limits.
    unsafe {
        stream
            .launch_builder(&scale_fn)
            .arg(&scale_args)
            .launch(cfg)
    }
    .map_err(driver_error("xent_scale"))?;
    Ok(())
}

/// The row kernels' argument block for `spec` over checked addresses.
fn fwd_args(spec: &XentSpec, inputs: &InputPtrs, outputs: &OutputPtrs) -> Result<XentFwdArgs> {
    let o = &spec.options;
    let r = &o.radius;
    let per_sample = r.reduce == RhoReduce::PerSample;
    Ok(XentFwdArgs {
        logits: inputs.logits,
        labels: inputs.labels,
        soft: inputs.soft,
        weights: inputs.weights,
        loss_row: outputs.loss_row,
        lse: outputs.lse,
        entropy: outputs.entropy,
        max: outputs.max,
        min: outputs.min,
        top2_gap: outputs.top2_gap,
        delta: outputs.delta,
        argmax: outputs.argmax,
        row_weight: outputs.row_weight,
        rho: if per_sample { outputs.rho } else { 0 },
        scale: if o.grad { outputs.scale } else { 0 },
        grad: outputs.grad,
        status: outputs.status,
        batch: as_i64(spec.batch, "B")?,
        classes: as_i64(spec.classes, "V")?,
        row_stride: as_i64(spec.row_stride, "row stride")?,
        ignore_index: o.ignore_index,
        rho_eps: r.eps,
        rho_cap: r.cap.unwrap_or(0.0),
        rho_floor: r.floor.unwrap_or(0.0),
        temperature_f64: o.temperature,
        temperature: o.temperature as f32,
        // Exponent arguments are (z - m) * lt: validation keeps lt a normal
        // f32, so no 0 * inf appears. lt, 1 - eps and eps / V are rounded once
        // here in f64, so the kernels see the f32 nearest to the reference's.
        lt: (std::f64::consts::LOG2_E / o.temperature) as f32,
        one_minus_eps: (1.0 - o.label_smoothing) as f32,
        eps_per_class: (o.label_smoothing / spec.classes as f64) as f32,
        z_loss: o.z_loss as f32,
        soft_f32: i32::from(inputs.soft_f32),
        gap_top2: i32::from(r.gap == Gap::Top2),
        rho_per_sample: i32::from(per_sample),
        rho_inf_if_small: i32::from(r.inf_if_small),
        has_cap: i32::from(r.cap.is_some()),
        has_floor: i32::from(r.floor.is_some()),
        grad_f32: i32::from(o.grad && spec.grad_dtype == DType::F32),
    })
}

/// Launches the row kernel: the cluster one where `cluster_shape` gives a
/// shape and the device can run it, else the block one.
fn launch_rows(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    spec: &XentSpec,
    args: &XentFwdArgs,
) -> Result<()> {
    let (fwd_name, cluster_name) = fwd_kernels(spec.dtype)?;
    let cluster = match cluster_shape(kernels, spec) {
        Some(shape) => {
            let f = kernels.function(KernelSource::Xent, cluster_name)?;
            kernels
                .cluster_config(cluster_name, &f, stream, spec.batch, shape)?
                .map(|cfg| (f, cfg))
        }
        None => None,
    };
    // Both launches: the argument block matches the row kernels'
    // parameter (see the DeviceRepr impl), and fwd_args filled it from
    // read_inputs and write_outputs, which checked every pointer to be
    // aligned and to cover what the kernel touches for this spec: logits
    // (B-1)*stride + V elements, targets B labels or B*V soft values, weights
    // V, every per-row output B elements, rho B (per-sample; else null and
    // unused), scale one f64 and grad B*V elements of grad_dtype written
    // densely with row stride V (both null without options.grad), status one
    // u64 (atomicMax). Labels are bounds-checked in the kernel before
    // indexing. The block kernel's grid and block were checked against the
    // device and function limits by row_config (through fwd_config); the cluster kernel's by
    // cluster_config, which also opted the function into the dynamic shared
    // memory cluster_shape sized for V (the kernel's slice never exceeds it).
    if let Some((f, cfg)) = cluster {
        // SAFETY: see above.
        unsafe { cfg.launch(stream, &f, args) }.map_err(driver_error(cluster_name))
    } else {
        let fwd = kernels.function(KernelSource::Xent, fwd_name)?;
        let cfg = fwd_config(kernels, fwd_name, &fwd, spec)?;
        // SAFETY: see above.
        unsafe { stream.launch_builder(&fwd).arg(args).launch(cfg) }
            .map_err(driver_error(fwd_name))
            .map(drop)
    }
}

/// Launches `xent_reduce`: the reduced loss and, unless per-sample, rho.
fn launch_reduce(
    stream: &Arc<CudaStream>,
    kernels: &Kernels,
    spec: &XentSpec,
    outputs: &OutputPtrs,
) -> Result<()> {
    let o = &spec.options;
    let r = &o.radius;
    let reduce = kernels.function(KernelSource::Xent, "xent_reduce")?;
    let reduce_args = XentReduceArgs {
        loss_row: outputs.loss_row,
        row_weight: outputs.row_weight,
        delta: outputs.delta,
        loss: outputs.loss,
        rho: if r.reduce == RhoReduce::PerSample {
            0
        } else {
            outputs.rho
        },
        batch: as_i64(spec.batch, "B")?,
        rho_eps: r.eps,
        rho_cap: r.cap.unwrap_or(0.0),
        rho_floor: r.floor.unwrap_or(0.0),
        reduction: reduction_code(o.reduction),
        rho_max: i32::from(r.reduce == RhoReduce::Max),
        rho_inf_if_small: i32::from(r.inf_if_small),
        has_cap: i32::from(r.cap.is_some()),
        has_floor: i32::from(r.floor.is_some()),
        pad: 0,
    };
    let cfg = kernels.single_block_config("xent_reduce", &reduce)?;
    // SAFETY: the argument block matches xent_reduce's parameter. It reads B
    // elements of the per-row buffers (checked by write_outputs to hold B
    // f32) and writes one f32 loss and one f32 rho (when not per-sample; else
    // null), both checked there. One block, checked against the limits.
    unsafe { stream.launch_builder(&reduce).arg(&reduce_args).launch(cfg) }
        .map_err(driver_error("xent_reduce"))?;
    Ok(())
}

/// Runs xent on `stream` over the caller's device memory, writing `out`; no
/// copy, no allocation, no synchronisation (the results are ready when the
/// stream reaches this point). `spec` is trusted for semantics (build it with
/// `ops::xent::validate` or equivalently), but every buffer's size and
/// alignment is checked against it, so a wrong spec gives an error, never an
/// out-of-bounds access.
pub fn xent_raw(
    stream: &Arc<CudaStream>,
    spec: &XentSpec,
    inputs: &XentInputs<'_>,
    out: &mut XentBuffers,
) -> Result<()> {
    let kernels = kernels(stream.context())?;
    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let input_ptrs = read_inputs(&mut p, spec, inputs)?;
    let output_ptrs = write_outputs(stream, &mut p, spec, out)?;
    if spec.options.grad {
        launch_scale(stream, &kernels, spec, &input_ptrs, &output_ptrs)?;
    }
    let args = fwd_args(spec, &input_ptrs, &output_ptrs)?;
    launch_rows(stream, &kernels, spec, &args)?;
    launch_reduce(stream, &kernels, spec, &output_ptrs)?;
    drop(p);
    Ok(())
}

/// The row kernel's shape. Each thread reads 16-byte vectors, 4 per step,
/// at least 4 steps per thread (16 vectors), with or without the grad: the
/// block size fixes the shape of every per-row reduction, so it must not
/// depend on the grad, or lse, loss and entropy would change bits when the
/// grad is asked for. 4 steps because, measured on the H200 with both rules
/// for both paths, the 2-step blocks the grad pass used to have made the
/// forward-only pass 30-50% slower (4096x32000 and 32768x50257, bf16 and f32).
///
/// 16-bit rows get at most 256 threads, so that four blocks share a
/// multiprocessor and one block's row reduction (when no loads of its own are
/// in flight) hides behind the other blocks' loads; f32 rows at most 1024.
/// Measured on the H200 (BENCHMARKS.md, 2026-12-04), against the former 1024
/// for every dtype: bf16 8192x128256 forward 0.727 -> 0.569 ms, forward +
/// grad 1.674 -> 1.619 ms, bf16 32768x50257 forward + grad 3.02 -> 2.61 ms;
/// but f32 8192x128256 forward + grad 2.75 -> 3.20 ms (its rows, twice as
/// long, no longer stay in L1 and L2 until the grad pass re-reads them).
///
/// Without the grad, one block per row; with it, one wave of resident blocks,
/// grid-striding over the rows. (A grid capped so that the rows in flight fit
/// in half the L2 was slower wherever it bound: 2.58 against 1.62 ms at bf16
/// 8192x128256, 3.33 against 2.61 ms at bf16 32768x50257.) Rows are
/// grid-strided, so the grid changes no row's result.
fn fwd_config(
    kernels: &Kernels,
    name: &str,
    f: &CudaFunction,
    spec: &XentSpec,
) -> Result<LaunchConfig> {
    let elem = spec.dtype.size();
    let (b, v) = (spec.batch, spec.classes);
    let max_threads = if elem == 4 { 1024 } else { 256 };
    let per_thread = (16 * (16 / elem)).max(v.div_ceil(max_threads));
    let rows = kernels.row_config(name, f, b, v, per_thread, u32::MAX)?;
    if !spec.options.grad {
        return Ok(rows);
    }
    let block = rows.block_dim.0;
    let resident = u64::from(kernels.multiprocessors())
        * u64::from(kernels.blocks_per_multiprocessor(f, block, 0)?);
    let grid = u32::try_from(resident).unwrap_or(u32::MAX);
    kernels.row_config(name, f, b, v, per_thread, grid)
}

/// Device outputs (and scratch) of one directional problem shape; reusable
/// across calls with the same B and V. Outputs are f32, laid out as
/// `DirectionalOutput` says.
#[derive(Debug)]
pub struct DirectionalBuffers {
    /// [B]
    pub delta_a: CudaSlice<u8>,
    /// [1]
    pub rho_a: CudaSlice<u8>,
    /// [1]
    pub normalized_step: CudaSlice<u8>,
    /// [B], present exactly when V = 2.
    pub binary_radius: Option<CudaSlice<u8>>,
    /// [B] f64: Delta_a before rounding, so the max over rows (and rho_a)
    /// is the reference's even where an f32 Delta_a would overflow.
    delta_a_f64: CudaSlice<u8>,
}

impl DirectionalBuffers {
    /// Allocates the buffers for `spec` on `stream`, zeroed.
    pub fn new(stream: &Arc<CudaStream>, spec: &DirectionalSpec) -> Result<DirectionalBuffers> {
        DirectionalBuffers::allocate(stream, spec, Fill::Zero)
    }

    fn allocate(
        stream: &Arc<CudaStream>,
        spec: &DirectionalSpec,
        fill: Fill,
    ) -> Result<DirectionalBuffers> {
        let alloc = |len: usize| alloc_output(stream, len, fill);
        let per_row = bytes(spec.batch, 4, "delta_a")?;
        Ok(DirectionalBuffers {
            delta_a: alloc(per_row)?,
            rho_a: alloc(4)?,
            normalized_step: alloc(4)?,
            binary_radius: if spec.classes == 2 {
                Some(alloc(per_row)?)
            } else {
                None
            },
            delta_a_f64: alloc(bytes(spec.batch, 8, "delta_a scratch")?)?,
        })
    }
}

// Must match XentDirArgs and XentDirReduceArgs in kernels/xent.cu (sizes and
// offsets asserted on both sides).

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentDirArgs {
    logits: u64,
    derivatives: u64,
    delta_a: u64,
    delta_a_f64: u64,
    binary_radius: u64,
    batch: i64,
    classes: i64,
}
const _: () = assert!(std::mem::size_of::<XentDirArgs>() == 56);
offsets!(XentDirArgs {
    logits: 0,
    derivatives: 8,
    delta_a: 16,
    delta_a_f64: 24,
    binary_radius: 32,
    batch: 40,
    classes: 48,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentDirReduceArgs {
    delta_a_f64: u64,
    rho_a: u64,
    normalized_step: u64,
    batch: i64,
    step: f64,
}
const _: () = assert!(std::mem::size_of::<XentDirReduceArgs>() == 40);
offsets!(XentDirReduceArgs {
    delta_a_f64: 0,
    rho_a: 8,
    normalized_step: 16,
    batch: 24,
    step: 32,
});

// SAFETY: both are #[repr(C)], made only of integers and floats (pointers as
// u64 CUdeviceptr values), with the field order, sizes and alignments of
// their C++ twins in kernels/xent.cu (sizes and offsets asserted on both
// sides).
unsafe impl DeviceRepr for XentDirArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for XentDirReduceArgs {}

fn directional_kernel(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("xent_directional_f32"),
        DType::F16 => Ok("xent_directional_f16"),
        DType::BF16 => Ok("xent_directional_bf16"),
        other => Err(Error::DType(format!(
            "the CUDA directional kernels take f32, f16 or bf16, not {other}"
        ))),
    }
}

/// Runs the directional radius on `stream` over the caller's device memory:
/// logits z and derivatives a, both [B, V] dense in `spec.dtype` and aligned
/// to its element size; writes `out`. No copy, no allocation, no
/// synchronisation. `spec` is trusted for semantics (build it with
/// `ops::xent::validate_directional`), but every buffer's size and alignment
/// is checked against it, so a wrong spec gives an error, never an
/// out-of-bounds access.
pub fn directional_raw(
    stream: &Arc<CudaStream>,
    spec: &DirectionalSpec,
    logits: &CudaView<'_, u8>,
    derivatives: &CudaView<'_, u8>,
    out: &mut DirectionalBuffers,
) -> Result<()> {
    let (b, v) = (spec.batch, spec.classes);
    if b == 0 || v == 0 {
        return Err(Error::Shape(format!(
            "the directional radius needs B >= 1 and V >= 1, got B = {b}, V = {v}"
        )));
    }
    if i32::try_from(v).is_err() {
        // Column indices within a row are 32-bit in the kernel.
        return Err(Error::Shape(format!(
            "the CUDA directional kernel takes up to 2^31 - 1 classes, got V = {v}"
        )));
    }
    let name = directional_kernel(spec.dtype)?;
    let elem = spec.dtype.size();
    let elements = b
        .checked_mul(v)
        .ok_or_else(|| Error::Shape("B * V overflows usize".into()))?;
    let input_bytes = bytes(elements, elem, "directional inputs")?;
    let per_row = bytes(b, 4, "delta_a")?;

    let kernels = kernels(stream.context())?;
    let rows = kernels.function(KernelSource::Xent, name)?;
    let reduce = kernels.function(KernelSource::Xent, "xent_directional_reduce")?;

    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let logits_ptr = p.read(logits, input_bytes, elem, "logits")?;
    let derivatives_ptr = p.read(derivatives, input_bytes, elem, "derivatives")?;
    let DirectionalBuffers {
        delta_a,
        rho_a,
        normalized_step,
        binary_radius,
        delta_a_f64,
    } = out;
    let delta_a_ptr = p.write(delta_a, per_row, 4, "delta_a")?;
    let delta_a_f64_ptr = p.write(
        delta_a_f64,
        bytes(b, 8, "delta_a scratch")?,
        8,
        "delta_a scratch",
    )?;
    let rho_a_ptr = p.write(rho_a, 4, 4, "rho_a")?;
    let step_ptr = p.write(normalized_step, 4, 4, "normalized_step")?;
    let radius_ptr = match (binary_radius.as_mut(), v == 2) {
        (Some(radius), true) => p.write(radius, per_row, 4, "binary_radius")?,
        (None, false) => 0,
        _ => {
            return Err(Error::Shape(format!(
                "the binary radius buffer must be present exactly when V = 2, got V = {v}"
            )))
        }
    };
    let batch = as_i64(b, "B")?;

    let rows_args = XentDirArgs {
        logits: logits_ptr,
        derivatives: derivatives_ptr,
        delta_a: delta_a_ptr,
        delta_a_f64: delta_a_f64_ptr,
        binary_radius: radius_ptr,
        batch,
        classes: as_i64(v, "V")?,
    };
    // About 16 columns per thread: several loads in flight each, and the
    // block's reduction a small share of its time; every row gets a block.
    let cfg = kernels.row_config(name, &rows, b, v, 16, u32::MAX)?;
    // SAFETY: the argument block matches the kernel's parameter (see the
    // DeviceRepr impl). The derivatives (and, when V = 2, the logits) are read
    // over B * V elements of the dtype, the per-row outputs written over B
    // f32 (the scratch B f64), all checked above for size and alignment; the
    // radius pointer is null unless V = 2. The grid and block were checked
    // against the device and function limits by row_config.
    unsafe { stream.launch_builder(&rows).arg(&rows_args).launch(cfg) }
        .map_err(driver_error(name))?;

    let reduce_args = XentDirReduceArgs {
        delta_a_f64: delta_a_f64_ptr,
        rho_a: rho_a_ptr,
        normalized_step: step_ptr,
        batch,
        step: spec.step,
    };
    let cfg = kernels.single_block_config("xent_directional_reduce", &reduce)?;
    // SAFETY: the argument block matches xent_directional_reduce's parameter.
    // It reads the B f64 of scratch the row kernel wrote before it on this
    // stream and writes one f32 each of rho_a and normalized_step, all checked
    // above. One block, checked against the limits.
    unsafe { stream.launch_builder(&reduce).arg(&reduce_args).launch(cfg) }
        .map_err(driver_error("xent_directional_reduce"))?;
    drop(p);
    Ok(())
}

impl XentKernels for CudaBackend {
    /// The Tensor entry: allocates the outputs and runs [`xent_raw`] on the backend's
    /// stream; nothing waits for the device.
    fn xent(&self, bound: &XentCall<'_>) -> Result<XentOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let targets = match call.targets {
            Targets::Classes(y) => XentTargets::Classes(cuda_slice(y, "class targets")?.as_view()),
            Targets::Soft(q) => XentTargets::Soft(cuda_slice(q, "soft targets")?.as_view()),
        };
        let inputs = XentInputs {
            logits: cuda_slice(call.logits, "logits")?.as_view(),
            targets,
            class_weights: call
                .class_weights
                .map(|w| cuda_slice(w, "class weights").map(CudaSlice::as_view))
                .transpose()?,
        };
        let stream = self.stream();
        let mut out = XentBuffers::allocate(stream, spec, Fill::Unwritten)?;
        xent_raw(stream, spec, &inputs, &mut out)?;
        if spec.targets == TargetKind::Classes {
            self.watch_targets(TargetWatch {
                status: out.status,
                classes: spec.classes,
                ignore_index: spec.options.ignore_index,
            });
        }

        let device = call.logits.device();
        let b = spec.batch;
        let tensor = |slice: CudaSlice<u8>, shape: Vec<usize>, dtype: DType| {
            Tensor::from_storage(device, Storage::Cuda(slice), shape, dtype)
        };
        let rho_shape = vec![rho_len(spec)];
        Ok(XentOutput {
            loss: tensor(out.loss, vec![1], DType::F32),
            loss_per_row: tensor(out.loss_per_row, vec![b], DType::F32),
            lse: tensor(out.lse, vec![b], DType::F32),
            entropy: tensor(out.entropy, vec![b], DType::F32),
            argmax: tensor(out.argmax, vec![b], DType::I64),
            max: tensor(out.max, vec![b], DType::F32),
            min: tensor(out.min, vec![b], DType::F32),
            top2_gap: tensor(out.top2_gap, vec![b], DType::F32),
            delta: tensor(out.delta, vec![b], DType::F32),
            rho: tensor(out.rho, rho_shape, DType::F32),
            grad: out
                .grad
                .map(|g| tensor(g, vec![b, spec.classes], spec.grad_dtype)),
        })
    }

    fn directional(&self, bound: &DirectionalCall<'_>) -> Result<DirectionalOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let logits = cuda_slice(call.logits, "logits")?.as_view();
        let derivatives = cuda_slice(call.derivatives, "derivatives")?.as_view();
        let stream = self.stream();
        let mut out = DirectionalBuffers::allocate(stream, spec, Fill::Unwritten)?;
        directional_raw(stream, spec, &logits, &derivatives, &mut out)?;

        let device = call.logits.device();
        let tensor = |slice: CudaSlice<u8>, len: usize| {
            Tensor::from_storage(device, Storage::Cuda(slice), vec![len], DType::F32)
        };
        Ok(DirectionalOutput {
            delta_a: tensor(out.delta_a, spec.batch),
            rho_a: tensor(out.rho_a, 1),
            binary_radius: out.binary_radius.map(|r| tensor(r, spec.batch)),
            normalized_step: tensor(out.normalized_step, 1),
        })
    }
}
