//! xent: fused softmax / cross-entropy with entropy, argmax, gradient and the
//! softmax convergence radius rho = pi / Delta, in one pass over the logits.

pub use losskern_reference::xent::{Gap, RadiusOptions, Reduction, RhoReduce, XentOptions};

use super::{check_finite, check_same_device, float_dtype, BackendKind, Bound};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::support::Op;

/// The targets of a cross-entropy call.
#[derive(Clone, Copy, Debug)]
pub enum Targets<'a> {
    /// Class indices y [B] (i64); `ignore_index` marks ignored rows.
    Classes(&'a Tensor),
    /// Soft targets q [B, V] in the logits' dtype or f32.
    Soft(&'a Tensor),
}

/// The dtype the gradient is written in.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GradDType {
    /// The logits' dtype (f32, f16 or bf16).
    #[default]
    Logits,
    F32,
}

/// A cross-entropy call: logits z [B, S] with S >= V (rows padded to a stride S).
#[derive(Clone, Copy, Debug)]
pub struct Xent<'a> {
    pub logits: &'a Tensor,
    pub targets: Targets<'a>,
    /// Class weights w [V], f32.
    pub class_weights: Option<&'a Tensor>,
    /// V when the rows are padded: the classes are the first V of each row of S.
    pub classes: Option<usize>,
    pub options: XentOptions,
    pub grad_dtype: GradDType,
}

impl<'a> Xent<'a> {
    /// A call with class targets and default options.
    pub fn new(logits: &'a Tensor, targets: Targets<'a>) -> Self {
        Xent {
            logits,
            targets,
            class_weights: None,
            classes: None,
            options: XentOptions::default(),
            grad_dtype: GradDType::Logits,
        }
    }
}

/// The kind of targets after validation.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TargetKind {
    Classes,
    /// Soft targets in this dtype, dense [B, V].
    Soft(DType),
}

/// A validated cross-entropy problem. Built only by validation ([`validate`] from
/// tensors, [`XentSpec::new`] from a shape for the zero-copy entries), so a backend can
/// trust every field.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct XentSpec {
    pub(crate) batch: usize,
    pub(crate) classes: usize,
    pub(crate) row_stride: usize,
    pub(crate) dtype: DType,
    pub(crate) targets: TargetKind,
    pub(crate) weighted: bool,
    pub(crate) options: XentOptions,
    pub(crate) grad_dtype: DType,
}

/// The sizes and dtypes of a cross-entropy problem, for [`XentSpec::new`] when the
/// inputs are a caller's own device memory rather than [`Tensor`]s.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct XentShape {
    /// B: rows.
    pub batch: usize,
    /// V: classes, the first V of each row.
    pub classes: usize,
    /// S >= V: elements from one row's start to the next.
    pub row_stride: usize,
    /// The logits' dtype (f32, f16 or bf16).
    pub dtype: DType,
    pub targets: TargetKind,
    /// Whether class weights [V] f32 are given.
    pub weighted: bool,
    pub grad_dtype: GradDType,
}

impl XentSpec {
    /// Validates a problem given by its shape: sizes, dtypes and every option.
    pub fn new(shape: XentShape, options: XentOptions) -> Result<XentSpec> {
        let XentShape {
            batch,
            classes,
            row_stride,
            dtype,
            targets,
            weighted,
            grad_dtype,
        } = shape;
        if !dtype.is_kernel_float() {
            return Err(Error::DType(format!(
                "logits must be f32, f16 or bf16, got {dtype}"
            )));
        }
        if batch == 0 || classes == 0 {
            return Err(Error::Empty(format!(
                "logits [B = {batch}, V = {classes}] need B >= 1 and V >= 1"
            )));
        }
        if classes > row_stride {
            return Err(Error::Shape(format!(
                "V = {classes} exceeds the row stride {row_stride}"
            )));
        }
        if let TargetKind::Soft(q_dtype) = targets {
            if q_dtype != dtype && q_dtype != DType::F32 {
                return Err(Error::DType(format!(
                    "soft targets must be {dtype} or f32, got {q_dtype}"
                )));
            }
        }
        validate_options(&options)?;
        Ok(XentSpec {
            batch,
            classes,
            row_stride,
            dtype,
            targets,
            weighted,
            options,
            grad_dtype: match grad_dtype {
                GradDType::Logits => dtype,
                GradDType::F32 => DType::F32,
            },
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn row_stride(&self) -> usize {
        self.row_stride
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn targets(&self) -> TargetKind {
        self.targets
    }

    pub fn weighted(&self) -> bool {
        self.weighted
    }

    pub fn options(&self) -> &XentOptions {
        &self.options
    }

    /// The dtype the gradient is written in (the logits' or f32).
    pub fn grad_dtype(&self) -> DType {
        self.grad_dtype
    }
}

/// Every output of the op, on the logits' device. Per-row tensors are [B] f32
/// (argmax is [B] i64); `loss` is [1] f32; `rho` is [B] for per-sample, else [1].
#[derive(Debug)]
pub struct XentOutput {
    pub loss: Tensor,
    pub loss_per_row: Tensor,
    pub lse: Tensor,
    pub entropy: Tensor,
    pub argmax: Tensor,
    pub max: Tensor,
    pub min: Tensor,
    pub top2_gap: Tensor,
    pub delta: Tensor,
    pub rho: Tensor,
    /// [B, V] dense in `grad_dtype`, when `options.grad`.
    pub grad: Option<Tensor>,
}

impl XentOutput {
    /// Every output but the gradient, by field name, in one fixed order.
    pub fn forward(&self) -> [(&'static str, &Tensor); 10] {
        [
            ("loss_per_row", &self.loss_per_row),
            ("loss", &self.loss),
            ("lse", &self.lse),
            ("entropy", &self.entropy),
            ("argmax", &self.argmax),
            ("max", &self.max),
            ("min", &self.min),
            ("top2_gap", &self.top2_gap),
            ("delta", &self.delta),
            ("rho", &self.rho),
        ]
    }

    /// Every output by field name: [`XentOutput::forward`], then the gradient when asked.
    pub fn named(&self) -> Vec<(&'static str, &Tensor)> {
        let mut named = self.forward().to_vec();
        named.extend(self.grad.as_ref().map(|g| ("grad", g)));
        named
    }
}

fn validate_options(o: &XentOptions) -> Result<()> {
    check_finite("temperature", o.temperature)?;
    if o.temperature <= 0.0 {
        return Err(Error::Option(format!(
            "temperature must be > 0, got {}",
            o.temperature
        )));
    }
    // The kernels scale by 1 / T and log2(e) / T in f32 and clamp exponent arguments
    // at -128 T: each must be a normal f32 (about 3e-39 <= T <= 2.6e36).
    let scales = [
        1.0 / o.temperature,
        std::f64::consts::LOG2_E / o.temperature,
        128.0 * o.temperature,
    ];
    if scales.iter().any(|&x| !(x as f32).is_normal()) {
        return Err(Error::Option(format!(
            "temperature {} is outside what f32 kernels can scale by (1 / T, log2(e) / T \
             and 128 T must be normal f32 numbers)",
            o.temperature
        )));
    }
    check_finite("label_smoothing", o.label_smoothing)?;
    if !(0.0..1.0).contains(&o.label_smoothing) {
        return Err(Error::Option(format!(
            "label_smoothing must be in [0, 1), got {}",
            o.label_smoothing
        )));
    }
    check_finite("z_loss", o.z_loss)?;
    if o.z_loss < 0.0 {
        return Err(Error::Option(format!(
            "z_loss must be >= 0, got {}",
            o.z_loss
        )));
    }
    let r = &o.radius;
    check_finite("radius eps", r.eps)?;
    if r.eps < 0.0 {
        return Err(Error::Option(format!(
            "radius eps must be >= 0, got {}",
            r.eps
        )));
    }
    for (name, bound) in [("radius cap", r.cap), ("radius floor", r.floor)] {
        if let Some(value) = bound {
            if value.is_nan() || value < 0.0 {
                return Err(Error::Option(format!("{name} must be >= 0, got {value}")));
            }
        }
    }
    Ok(())
}

/// Checks that `input` lives with `anchor` and has `dtype` (else `Error::DType`) and
/// `shape` (else `Error::Shape`).
fn check_input(
    anchor: &Tensor,
    input: &Tensor,
    what: &str,
    dtype: DType,
    shape: &[usize],
) -> Result<()> {
    check_same_device(anchor, input, what)?;
    if input.dtype() != dtype {
        return Err(Error::DType(format!(
            "{what} must be {dtype}, got {}",
            input.dtype()
        )));
    }
    if input.shape() != shape {
        return Err(Error::Shape(format!(
            "{what} must be {shape:?}, got {:?}",
            input.shape()
        )));
    }
    Ok(())
}

/// Validates a call into a spec: shapes, dtypes, devices and options. The values of
/// class targets are not read here (that would stall the caller on a GPU): a target
/// outside [0, V) that is not `ignore_index` leaves its row's outputs NaN and surfaces
/// as [`Error::Target`] at the next readback or synchronize (at once on the CPU).
pub fn validate(call: &Xent<'_>) -> Result<XentSpec> {
    let logits = call.logits;
    let dtype = float_dtype("logits", logits)?;
    let [batch, row_stride] = *logits.shape() else {
        return Err(Error::Shape(format!(
            "logits must be [B, V], got {:?}",
            logits.shape()
        )));
    };
    let classes = call.classes.unwrap_or(row_stride);
    let targets = match call.targets {
        Targets::Classes(y) => {
            check_input(logits, y, "class targets", DType::I64, &[batch])?;
            TargetKind::Classes
        }
        Targets::Soft(q) => {
            check_same_device(logits, q, "soft targets")?;
            let q_dtype = float_dtype("soft targets", q)?;
            if q.shape() != [batch, classes] {
                return Err(Error::Shape(format!(
                    "soft targets must be [{batch}, {classes}], got {:?}",
                    q.shape()
                )));
            }
            TargetKind::Soft(q_dtype)
        }
    };
    if let Some(w) = call.class_weights {
        check_input(logits, w, "class weights", DType::F32, &[classes])?;
    }
    XentSpec::new(
        XentShape {
            batch,
            classes,
            row_stride,
            dtype,
            targets,
            weighted: call.class_weights.is_some(),
            grad_dtype: call.grad_dtype,
        },
        call.options,
    )
}

/// A validated cross-entropy call, as the backends receive it.
pub(crate) type XentCall<'a> = Bound<Xent<'a>, XentSpec>;

pub(crate) fn bind<'a>(call: &Xent<'a>) -> Result<XentCall<'a>> {
    Ok(Bound::new(*call, validate(call)?))
}

/// A directional-radius call: logits z [B, V] and derivatives a = J v [B, V], same dtype.
#[derive(Clone, Copy, Debug)]
pub struct Directional<'a> {
    pub logits: &'a Tensor,
    pub derivatives: &'a Tensor,
    /// Step length tau of the normalised step r = tau / rho_a.
    pub step: f64,
}

/// Outputs on the logits' device: `delta_a` [B] f32, `rho_a` and `normalized_step` [1] f32,
/// `binary_radius` [B] f32 when V = 2.
#[derive(Debug)]
pub struct DirectionalOutput {
    pub delta_a: Tensor,
    pub rho_a: Tensor,
    pub binary_radius: Option<Tensor>,
    pub normalized_step: Tensor,
}

/// A validated directional problem (built only by validation).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DirectionalSpec {
    pub(crate) batch: usize,
    pub(crate) classes: usize,
    pub(crate) dtype: DType,
    pub(crate) step: f64,
}

impl DirectionalSpec {
    /// Validates a problem of B rows of V classes in `dtype` and a step length tau,
    /// for the zero-copy entries.
    pub fn new(batch: usize, classes: usize, dtype: DType, step: f64) -> Result<DirectionalSpec> {
        if !dtype.is_kernel_float() {
            return Err(Error::DType(format!(
                "logits must be f32, f16 or bf16, got {dtype}"
            )));
        }
        if batch == 0 || classes == 0 {
            return Err(Error::Empty(format!(
                "logits [B = {batch}, V = {classes}] need B >= 1 and V >= 1"
            )));
        }
        check_finite("step", step)?;
        Ok(DirectionalSpec {
            batch,
            classes,
            dtype,
            step,
        })
    }

    pub fn batch(&self) -> usize {
        self.batch
    }

    pub fn classes(&self) -> usize {
        self.classes
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    pub fn step(&self) -> f64 {
        self.step
    }
}

pub fn validate_directional(call: &Directional<'_>) -> Result<DirectionalSpec> {
    let dtype = float_dtype("logits", call.logits)?;
    check_same_device(call.logits, call.derivatives, "derivatives")?;
    let [batch, classes] = *call.logits.shape() else {
        return Err(Error::Shape(format!(
            "logits must be [B, V], got {:?}",
            call.logits.shape()
        )));
    };
    if call.derivatives.shape() != call.logits.shape() || call.derivatives.dtype() != dtype {
        return Err(Error::Shape(format!(
            "derivatives must match the logits ({:?} {dtype}), got {:?} {}",
            call.logits.shape(),
            call.derivatives.shape(),
            call.derivatives.dtype()
        )));
    }
    DirectionalSpec::new(batch, classes, dtype, call.step)
}

/// A validated directional-radius call, as the backends receive it.
pub(crate) type DirectionalCall<'a> = Bound<Directional<'a>, DirectionalSpec>;

pub(crate) fn bind_directional<'a>(call: &Directional<'a>) -> Result<DirectionalCall<'a>> {
    Ok(Bound::new(*call, validate_directional(call)?))
}

/// The xent family's kernels on one backend; an op without a kernel there is refused.
pub(crate) trait XentKernels: BackendKind {
    fn xent(&self, _call: &XentCall<'_>) -> Result<XentOutput> {
        Err(self.unsupported(Op::Xent))
    }

    fn directional(&self, _call: &DirectionalCall<'_>) -> Result<DirectionalOutput> {
        Err(self.unsupported(Op::XentDirectional))
    }
}
