//! xent on CUDA: `kernels/xent.cu`, three launches on one stream:
//!
//! 1. `xent_fwd_{dtype}`: grid min(B, max grid x) (grid-stride over rows), one
//!    block per row, about V/8 threads rounded up to whole warps in 32..=1024.
//!    Reads the row once; writes every per-row output and three [B] f32
//!    scratch vectors (row weight, sum of target coefficients, sum e^(x - m)),
//!    and rho per row for `RhoReduce::PerSample`.
//! 2. `xent_reduce`: one block of 1024 threads; sums in f64 in a fixed order:
//!    the reduced loss, the reduced rho, and the grad scale (an f64 on the device).
//! 3. `xent_grad_{dtype}` (when `options.grad`): the fwd shape again; reads
//!    the row a second time and writes the dense [B, V] grad in f32 or the
//!    logits' dtype, after the reduction because the mean's scale needs every row.
//!
//! [`xent`] is the Tensor entry; [`xent_raw`] the zero-copy one on a caller's
//! stream and device memory. The first calls the second: one code path.

use std::sync::Arc;

use cudarc::driver::{
    CudaSlice, CudaStream, CudaView, DevicePtr, DevicePtrMut, DeviceRepr, PushKernelArg, SyncOnDrop,
};

use super::compile::KernelSource;
use super::launch::{driver_error, kernels};
use super::CudaBackend;
use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::ops::xent::{
    Gap, Reduction, RhoReduce, TargetKind, Targets, Xent, XentOutput, XentSpec,
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
    /// Class indices [B] i64. The kernels do not index with a target outside
    /// [0, V) that is not `ignore_index`: such a row gets a NaN loss and grad.
    Classes(CudaView<'a, u8>),
    /// Soft targets [B, V] (dense) in the dtype of `TargetKind::Soft`.
    Soft(CudaView<'a, u8>),
}

/// Device outputs (and the scratch the three kernels pass along) of one
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
    row_weight: CudaSlice<u8>,
    coef_sum: CudaSlice<u8>,
    sumexp: CudaSlice<u8>,
    /// [1] f64.
    scale: CudaSlice<u8>,
}

fn rho_len(spec: &XentSpec) -> usize {
    match spec.options.radius.reduce {
        RhoReduce::PerSample => spec.batch,
        RhoReduce::Mean | RhoReduce::Max => 1,
    }
}

fn bytes(count: usize, size: usize, what: &str) -> Result<usize> {
    count
        .checked_mul(size)
        .ok_or_else(|| Error::Shape(format!("{what}: {count} elements overflow usize bytes")))
}

impl XentBuffers {
    /// Allocates the buffers for `spec` on `stream`.
    pub fn new(stream: &Arc<CudaStream>, spec: &XentSpec) -> Result<XentBuffers> {
        let alloc = |len: usize| -> Result<CudaSlice<u8>> {
            // SAFETY: u8 has no invalid bit patterns, and the kernels write
            // every byte of every output before anything reads it; 1 byte at
            // least because the driver refuses empty allocations.
            unsafe { stream.alloc::<u8>(len.max(1)) }.map_err(driver_error("cuMemAlloc"))
        };
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
            coef_sum: alloc(per_row)?,
            sumexp: alloc(per_row)?,
            scale: alloc(8)?,
        })
    }
}

// The kernel argument blocks. Each must match its struct in kernels/xent.cu
// field for field (the .cu static_asserts the same sizes). Pointers are
// CUdeviceptr values, 0 for null.

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
    coef_sum: u64,
    sumexp: u64,
    rho: u64,
    batch: i64,
    classes: i64,
    row_stride: i64,
    ignore_index: i64,
    rho_eps: f64,
    rho_cap: f64,
    rho_floor: f64,
    temperature: f32,
    one_minus_eps: f32,
    eps_per_class: f32,
    z_loss: f32,
    soft_f32: i32,
    gap_top2: i32,
    rho_per_sample: i32,
    rho_inf_if_small: i32,
    has_cap: i32,
    has_floor: i32,
}
const _: () = assert!(std::mem::size_of::<XentFwdArgs>() == 224);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentReduceArgs {
    loss_row: u64,
    row_weight: u64,
    delta: u64,
    loss: u64,
    rho: u64,
    scale: u64,
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
const _: () = assert!(std::mem::size_of::<XentReduceArgs>() == 104);

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct XentGradArgs {
    logits: u64,
    labels: u64,
    soft: u64,
    weights: u64,
    max: u64,
    sumexp: u64,
    lse: u64,
    coef_sum: u64,
    scale: u64,
    grad: u64,
    batch: i64,
    classes: i64,
    row_stride: i64,
    ignore_index: i64,
    temperature_f64: f64,
    temperature: f32,
    one_minus_eps: f32,
    eps_per_class: f32,
    z_loss: f32,
    soft_f32: i32,
    grad_f32: i32,
}
const _: () = assert!(std::mem::size_of::<XentGradArgs>() == 144);

// SAFETY: the three argument structs are #[repr(C)], made only of integers and
// floats (pointers travel as u64 CUdeviceptr values), with the field order,
// sizes and alignments of their C++ twins in kernels/xent.cu (sizes asserted
// on both sides), so the kernel reads exactly the bytes written here.
unsafe impl DeviceRepr for XentFwdArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for XentReduceArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for XentGradArgs {}

fn fwd_kernel(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("xent_fwd_f32"),
        DType::F16 => Ok("xent_fwd_f16"),
        DType::BF16 => Ok("xent_fwd_bf16"),
        other => Err(Error::DType(format!(
            "the CUDA xent kernels take f32, f16 or bf16 logits, not {other}"
        ))),
    }
}

fn grad_kernel(dtype: DType) -> Result<&'static str> {
    match dtype {
        DType::F32 => Ok("xent_grad_f32"),
        DType::F16 => Ok("xent_grad_f16"),
        DType::BF16 => Ok("xent_grad_bf16"),
        other => Err(Error::DType(format!(
            "the CUDA xent kernels take f32, f16 or bf16 logits, not {other}"
        ))),
    }
}

/// Collects device pointers after checking each buffer's size and alignment,
/// keeping cudarc's stream-ordering guards alive until the launches are queued.
struct Pointers<'a> {
    stream: &'a CudaStream,
    guards: Vec<SyncOnDrop<'a>>,
}

fn check_buffer(ptr: u64, len: usize, need: usize, align: usize, what: &str) -> Result<u64> {
    if len < need {
        return Err(Error::Shape(format!(
            "{what}: the device buffer holds {len} bytes, {need} are needed"
        )));
    }
    if !ptr.is_multiple_of(align as u64) {
        return Err(Error::Shape(format!(
            "{what}: device address {ptr:#x} is not aligned to {align} bytes"
        )));
    }
    Ok(ptr)
}

impl<'a> Pointers<'a> {
    fn read(
        &mut self,
        view: &'a CudaView<'_, u8>,
        need: usize,
        align: usize,
        what: &str,
    ) -> Result<u64> {
        let (ptr, guard) = view.device_ptr(self.stream);
        self.guards.push(guard);
        check_buffer(ptr, view.len(), need, align, what)
    }

    fn write(
        &mut self,
        slice: &'a mut CudaSlice<u8>,
        need: usize,
        align: usize,
        what: &str,
    ) -> Result<u64> {
        let len = slice.len();
        let (ptr, guard) = slice.device_ptr_mut(self.stream);
        self.guards.push(guard);
        check_buffer(ptr, len, need, align, what)
    }
}

fn as_i64(value: usize, what: &str) -> Result<i64> {
    i64::try_from(value).map_err(|_| Error::Shape(format!("{what} = {value} does not fit in i64")))
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
    let elem = spec.dtype.size();
    let fwd_name = fwd_kernel(spec.dtype)?;
    let grad_name = grad_kernel(spec.dtype)?;
    if spec.grad_dtype != spec.dtype && spec.grad_dtype != DType::F32 {
        return Err(Error::DType(format!(
            "grad dtype must be {} or f32, got {}",
            spec.dtype, spec.grad_dtype
        )));
    }
    let row_span = (b - 1)
        .checked_mul(spec.row_stride)
        .and_then(|n| n.checked_add(v))
        .ok_or_else(|| Error::Shape("logits span overflows usize".into()))?;
    let per_row = bytes(b, 4, "per-row outputs")?;

    let kernels = kernels(stream.context())?;
    let fwd = kernels.function(KernelSource::Xent, fwd_name)?;
    let reduce = kernels.function(KernelSource::Xent, "xent_reduce")?;

    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let logits = p.read(
        &inputs.logits,
        bytes(row_span, elem, "logits")?,
        elem,
        "logits",
    )?;
    let (labels, soft, soft_f32) = match (&inputs.targets, spec.targets) {
        (XentTargets::Classes(y), TargetKind::Classes) => (
            p.read(y, bytes(b, 8, "targets")?, 8, "class targets")?,
            0,
            false,
        ),
        (XentTargets::Soft(q), TargetKind::Soft(q_dtype)) => {
            if q_dtype != spec.dtype && q_dtype != DType::F32 {
                return Err(Error::DType(format!(
                    "soft targets must be {} or f32, got {q_dtype}",
                    spec.dtype
                )));
            }
            let elements = b
                .checked_mul(v)
                .ok_or_else(|| Error::Shape("B * V overflows usize".into()))?;
            let size = q_dtype.size();
            let ptr = p.read(
                q,
                bytes(elements, size, "soft targets")?,
                size,
                "soft targets",
            )?;
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
        coef_sum,
        sumexp,
        scale,
    } = out;
    let rho_count = rho_len(spec);
    let loss_ptr = p.write(loss, 4, 4, "loss")?;
    let loss_row_ptr = p.write(loss_per_row, per_row, 4, "loss_per_row")?;
    let lse_ptr = p.write(lse, per_row, 4, "lse")?;
    let entropy_ptr = p.write(entropy, per_row, 4, "entropy")?;
    let argmax_ptr = p.write(argmax, bytes(b, 8, "argmax")?, 8, "argmax")?;
    let max_ptr = p.write(max, per_row, 4, "max")?;
    let min_ptr = p.write(min, per_row, 4, "min")?;
    let top2_ptr = p.write(top2_gap, per_row, 4, "top2_gap")?;
    let delta_ptr = p.write(delta, per_row, 4, "delta")?;
    let rho_ptr = p.write(rho, bytes(rho_count, 4, "rho")?, 4, "rho")?;
    let row_weight_ptr = p.write(row_weight, per_row, 4, "row weight scratch")?;
    let coef_sum_ptr = p.write(coef_sum, per_row, 4, "coefficient scratch")?;
    let sumexp_ptr = p.write(sumexp, per_row, 4, "sum-exp scratch")?;
    let scale_ptr = p.write(scale, 8, 8, "scale scratch")?;

    let o = &spec.options;
    let r = &o.radius;
    let per_sample = r.reduce == RhoReduce::PerSample;
    let batch = as_i64(b, "B")?;
    let classes = as_i64(v, "V")?;
    let row_stride = as_i64(spec.row_stride, "row stride")?;
    // Rounded once here in f64, so the kernels see the f32 nearest to the
    // reference's (1 - eps) and eps / V.
    let one_minus_eps = (1.0 - o.label_smoothing) as f32;
    let eps_per_class = (o.label_smoothing / v as f64) as f32;

    let fwd_args = XentFwdArgs {
        logits,
        labels,
        soft,
        weights,
        loss_row: loss_row_ptr,
        lse: lse_ptr,
        entropy: entropy_ptr,
        max: max_ptr,
        min: min_ptr,
        top2_gap: top2_ptr,
        delta: delta_ptr,
        argmax: argmax_ptr,
        row_weight: row_weight_ptr,
        coef_sum: coef_sum_ptr,
        sumexp: sumexp_ptr,
        rho: if per_sample { rho_ptr } else { 0 },
        batch,
        classes,
        row_stride,
        ignore_index: o.ignore_index,
        rho_eps: r.eps,
        rho_cap: r.cap.unwrap_or(0.0),
        rho_floor: r.floor.unwrap_or(0.0),
        temperature: o.temperature as f32,
        one_minus_eps,
        eps_per_class,
        z_loss: o.z_loss as f32,
        soft_f32: i32::from(soft_f32),
        gap_top2: i32::from(r.gap == Gap::Top2),
        rho_per_sample: i32::from(per_sample),
        rho_inf_if_small: i32::from(r.inf_if_small),
        has_cap: i32::from(r.cap.is_some()),
        has_floor: i32::from(r.floor.is_some()),
    };
    let cfg = kernels.row_config(fwd_name, &fwd, b, v)?;
    // SAFETY: the argument block matches xent_fwd's parameter (see the
    // DeviceRepr impl). Every pointer was checked above to be aligned and to
    // cover what the kernel touches for this spec: logits (B-1)*stride + V
    // elements, targets B labels or B*V soft values, weights V, every per-row
    // output B elements and rho B (per-sample; else null and unused). Labels
    // are bounds-checked in the kernel before indexing. The grid and block
    // were checked against the device and function limits by row_config.
    unsafe { stream.launch_builder(&fwd).arg(&fwd_args).launch(cfg) }
        .map_err(driver_error(fwd_name))?;

    let reduce_args = XentReduceArgs {
        loss_row: loss_row_ptr,
        row_weight: row_weight_ptr,
        delta: delta_ptr,
        loss: loss_ptr,
        rho: if per_sample { 0 } else { rho_ptr },
        scale: scale_ptr,
        batch,
        rho_eps: r.eps,
        rho_cap: r.cap.unwrap_or(0.0),
        rho_floor: r.floor.unwrap_or(0.0),
        reduction: match o.reduction {
            Reduction::None => 0,
            Reduction::Mean => 1,
            Reduction::Sum => 2,
        },
        rho_max: i32::from(r.reduce == RhoReduce::Max),
        rho_inf_if_small: i32::from(r.inf_if_small),
        has_cap: i32::from(r.cap.is_some()),
        has_floor: i32::from(r.floor.is_some()),
        pad: 0,
    };
    let cfg = kernels.single_block_config("xent_reduce", &reduce)?;
    // SAFETY: the argument block matches xent_reduce's parameter. It reads B
    // elements of the per-row buffers (checked to hold B f32) and writes one
    // f32 loss, one f32 rho (when not per-sample; else null) and one f64
    // scale, all checked above. One block, checked against the limits.
    unsafe { stream.launch_builder(&reduce).arg(&reduce_args).launch(cfg) }
        .map_err(driver_error("xent_reduce"))?;

    if o.grad {
        let Some(grad) = grad.as_mut() else {
            return Err(Error::Shape(
                "options.grad is set but the buffers hold no grad".into(),
            ));
        };
        let elements = b
            .checked_mul(v)
            .ok_or_else(|| Error::Shape("B * V overflows usize".into()))?;
        let grad_size = spec.grad_dtype.size();
        let grad_ptr = p.write(grad, bytes(elements, grad_size, "grad")?, grad_size, "grad")?;
        let grad_fn = kernels.function(KernelSource::Xent, grad_name)?;
        let grad_args = XentGradArgs {
            logits,
            labels,
            soft,
            weights,
            max: max_ptr,
            sumexp: sumexp_ptr,
            lse: lse_ptr,
            coef_sum: coef_sum_ptr,
            scale: scale_ptr,
            grad: grad_ptr,
            batch,
            classes,
            row_stride,
            ignore_index: o.ignore_index,
            temperature_f64: o.temperature,
            temperature: o.temperature as f32,
            one_minus_eps,
            eps_per_class,
            z_loss: o.z_loss as f32,
            soft_f32: i32::from(soft_f32),
            grad_f32: i32::from(spec.grad_dtype == DType::F32),
        };
        let cfg = kernels.row_config(grad_name, &grad_fn, b, v)?;
        // SAFETY: the argument block matches xent_grad's parameter. The inputs
        // are the ones checked for the forward launch, the per-row buffers hold
        // B f32 and scale one f64 (checked above), and grad holds B*V elements
        // of grad_dtype (checked just above), written densely with row stride V.
        unsafe { stream.launch_builder(&grad_fn).arg(&grad_args).launch(cfg) }
            .map_err(driver_error(grad_name))?;
    }
    drop(p);
    Ok(())
}

/// The device buffer of a tensor on a CUDA device.
fn cuda_slice<'t>(tensor: &'t Tensor, what: &str) -> Result<&'t CudaSlice<u8>> {
    match &tensor.storage {
        Storage::Cuda(slice) => Ok(slice),
        _ => Err(Error::DeviceMismatch(format!(
            "{what} does not live on a CUDA device"
        ))),
    }
}

/// Runs a validated xent call on `backend`.
pub fn xent(backend: &CudaBackend, spec: &XentSpec, call: &Xent<'_>) -> Result<XentOutput> {
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
    let stream = backend.stream();
    let mut out = XentBuffers::new(stream, spec)?;
    xent_raw(stream, spec, &inputs, &mut out)?;

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
