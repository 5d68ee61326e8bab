//! ensemble: forward passes of many small MLPs on one shared batch with a fused
//! per-model loss, and loss-landscape scans theta_0 + t * d.

pub use losskern_reference::ensemble::{roughness, Perturbation, Roughness};

use super::{check_same_device, float_dtype, BackendKind, Bound};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::support::Op;

/// The arithmetic of the layers' dot products.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Precision {
    /// f32 FMA on the inputs as given: within `check::ensemble`'s f32 bound of the f64
    /// reference (about L sqrt(d) u of the absolute network's logits).
    #[default]
    Exact,
    /// Tensor-core products (bf16/f16 or tf32 inputs, f32 accumulation) where a backend
    /// has them; its bound adds the rounding of the inputs to the MMA type. A backend
    /// without tensor-core kernels runs `Exact`, which lies within that bound too.
    TensorCore,
}

/// E MLPs with widths [d0, ..., dL]: layer l has `weights[l]` [E, d_{l+1}, d_l]
/// (PyTorch Linear layout) and `biases[l]` [E, d_{l+1}]; ReLU between layers.
#[derive(Clone, Copy, Debug)]
pub struct Ensemble<'a> {
    pub weights: &'a [&'a Tensor],
    pub biases: &'a [&'a Tensor],
    /// X [B, d0] shared by all models, or [E, B, d0] one batch per model.
    pub input: &'a Tensor,
    /// Labels y [B] i64 in [0, C).
    pub labels: &'a Tensor,
    /// Also return the logits [E, B, C].
    pub logits: bool,
    pub precision: Precision,
}

/// A loss-landscape scan: model e is theta_0 + t_e * D_{k_e}, never materialised.
#[derive(Clone, Copy, Debug)]
pub struct Landscape<'a> {
    /// Centre theta_0: `center_weights[l]` [d_{l+1}, d_l], `center_biases[l]` [d_{l+1}].
    pub center_weights: &'a [&'a Tensor],
    pub center_biases: &'a [&'a Tensor],
    /// K directions: `direction_weights[l]` [K, d_{l+1}, d_l], `direction_biases[l]` [K, d_{l+1}].
    pub direction_weights: &'a [&'a Tensor],
    pub direction_biases: &'a [&'a Tensor],
    /// k_e [E] i64 in [0, K).
    pub direction_of: &'a Tensor,
    /// t_e [E] f32.
    pub distance: &'a Tensor,
    /// X [B, d0].
    pub input: &'a Tensor,
    /// Labels y [B] i64 in [0, C).
    pub labels: &'a Tensor,
    pub logits: bool,
    pub precision: Precision,
    /// How theta_0 + t D is formed: rounded to the dtype as the notebook does, or split.
    pub perturbation: Perturbation,
}

/// A validated ensemble problem.
#[derive(Clone, Debug, PartialEq)]
pub struct EnsembleSpec {
    pub(crate) widths: Vec<usize>,
    pub(crate) models: usize,
    pub(crate) batch: usize,
    pub(crate) shared_input: bool,
    pub(crate) dtype: DType,
    pub(crate) logits: bool,
    pub(crate) precision: Precision,
    /// K and the perturbation mode of a landscape scan.
    pub(crate) scan: Option<(usize, Perturbation)>,
}

impl EnsembleSpec {
    /// [d0, ..., dL]: the input width, the hidden widths and C.
    pub fn widths(&self) -> &[usize] {
        &self.widths
    }

    /// E.
    pub fn models(&self) -> usize {
        self.models
    }

    /// B.
    pub fn batch(&self) -> usize {
        self.batch
    }

    /// Whether every model reads the same input [B, d0] (else [E, B, d0]).
    pub fn shared_input(&self) -> bool {
        self.shared_input
    }

    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Whether the logits [E, B, C] are returned.
    pub fn logits(&self) -> bool {
        self.logits
    }

    pub fn precision(&self) -> Precision {
        self.precision
    }

    /// K for a landscape scan.
    pub fn directions(&self) -> Option<usize> {
        self.scan.map(|(k, _)| k)
    }

    /// The perturbation mode of a landscape scan.
    pub fn perturbation(&self) -> Option<Perturbation> {
        self.scan.map(|(_, p)| p)
    }

    /// C, the last width.
    pub fn classes(&self) -> usize {
        self.widths.last().copied().unwrap_or(0)
    }
}

/// Outputs on the inputs' device: `loss` [E] f64 (mean cross-entropy over the batch,
/// accumulated in f64 as the Loss-Cartography notebook does), `accuracy` [E] f64,
/// `logits` [E, B, C] f32 when asked.
#[derive(Debug)]
pub struct EnsembleOutput {
    pub loss: Tensor,
    pub accuracy: Tensor,
    pub logits: Option<Tensor>,
}

/// Checks the layers' shapes against a leading dimension `lead` (E or K; None for a single
/// centre model) and returns the widths [d0, ..., dL].
fn layer_widths(
    weights: &[&Tensor],
    biases: &[&Tensor],
    lead: Option<usize>,
    dtype: DType,
    anchor: &Tensor,
) -> Result<Vec<usize>> {
    if weights.is_empty() || weights.len() != biases.len() {
        return Err(Error::Shape(format!(
            "{} weight and {} bias tensors: need L >= 1 of each",
            weights.len(),
            biases.len()
        )));
    }
    let lead_dims: Vec<usize> = lead.into_iter().collect();
    let mut widths = Vec::with_capacity(weights.len() + 1);
    for (l, (w, b)) in weights.iter().zip(biases).enumerate() {
        check_same_device(anchor, w, "weights")?;
        check_same_device(anchor, b, "biases")?;
        let shape = w.shape();
        if shape.len() != lead_dims.len() + 2
            || shape[..lead_dims.len()] != lead_dims[..]
            || w.dtype() != dtype
        {
            return Err(Error::Shape(format!(
                "weights[{l}] must be {lead_dims:?} + [out, in] {dtype}, got {shape:?} {}",
                w.dtype()
            )));
        }
        let (out, inp) = (shape[lead_dims.len()], shape[lead_dims.len() + 1]);
        if out == 0 || inp == 0 {
            return Err(Error::Empty(format!(
                "weights[{l}] {shape:?} has a zero width"
            )));
        }
        match widths.last() {
            None => widths.push(inp),
            Some(&prev) if prev != inp => {
                return Err(Error::Shape(format!(
                    "weights[{l}] takes {inp} inputs but layer {l} gets {prev}"
                )));
            }
            Some(_) => {}
        }
        widths.push(out);
        let expect: Vec<usize> = lead_dims.iter().copied().chain([out]).collect();
        if b.shape() != expect || b.dtype() != dtype {
            return Err(Error::Shape(format!(
                "biases[{l}] must be {expect:?} {dtype}, got {:?} {}",
                b.shape(),
                b.dtype()
            )));
        }
    }
    Ok(widths)
}

fn check_labels(labels: &Tensor, batch: usize, anchor: &Tensor) -> Result<()> {
    check_same_device(anchor, labels, "labels")?;
    if labels.dtype() != DType::I64 || labels.shape() != [batch] {
        return Err(Error::Shape(format!(
            "labels must be [{batch}] i64, got {:?} {}",
            labels.shape(),
            labels.dtype()
        )));
    }
    Ok(())
}

/// The checks of an ensemble call that need the data's values, for a backend that has
/// them on the host (the CPU); a GPU kernel must find them itself and flag them on the
/// device, since validation never waits for a device. Labels must lie in [0, C).
pub(crate) fn check_label_values(labels: &[i64], classes: usize) -> Result<()> {
    for (row, &label) in labels.iter().enumerate() {
        if !usize::try_from(label).is_ok_and(|t| t < classes) {
            return Err(Error::LabelOutOfRange {
                row,
                label,
                classes,
            });
        }
    }
    Ok(())
}

fn non_finite_distance() -> Error {
    Error::Option("distances must be finite".into())
}

fn direction_out_of_range(directions: usize) -> Error {
    Error::Option(format!("direction_of must be in [0, {directions})"))
}

/// As [`check_label_values`], for a landscape scan's distances (finite) and direction
/// indices (in [0, K)).
pub(crate) fn check_scan_values(
    distance: &[f64],
    direction_of: &[i64],
    directions: usize,
) -> Result<()> {
    if distance.iter().any(|t| !t.is_finite()) {
        return Err(non_finite_distance());
    }
    if direction_of
        .iter()
        .any(|&k| !usize::try_from(k).is_ok_and(|k| k < directions))
    {
        return Err(direction_out_of_range(directions));
    }
    Ok(())
}

/// u64 words of the status a GPU backend's data check writes: !(first row whose label is
/// outside [0, C)) and that label, !(first model whose t is not finite), !(first model
/// whose k is outside [0, K)); 0 where there is none.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) const STATUS_WORDS: usize = 4;

/// The error the status words say, in the order the CPU checks (a scan's values, then
/// the labels), with the CPU's errors.
#[cfg(any(feature = "cuda", feature = "wgpu"))]
pub(crate) fn status_error(words: &[u64], classes: usize, directions: usize) -> Result<()> {
    match *words {
        [_, _, t, _] if t != 0 => Err(non_finite_distance()),
        [_, _, _, k] if k != 0 => Err(direction_out_of_range(directions)),
        [row, label, ..] if row != 0 => Err(Error::LabelOutOfRange {
            row: usize::try_from(!row).unwrap_or(usize::MAX),
            label: label as i64,
            classes,
        }),
        [_, _, _, _] => Ok(()),
        _ => Err(Error::Shape(format!(
            "an ensemble status holds {} words, not {STATUS_WORDS}",
            words.len()
        ))),
    }
}

pub fn validate(call: &Ensemble<'_>) -> Result<EnsembleSpec> {
    let dtype = float_dtype("input", call.input)?;
    let models = call
        .weights
        .first()
        .and_then(|w| w.shape().first().copied())
        .unwrap_or(0);
    if models == 0 {
        return Err(Error::Empty(
            "an ensemble needs E >= 1 models and L >= 1 layers".into(),
        ));
    }
    let widths = layer_widths(call.weights, call.biases, Some(models), dtype, call.input)?;
    let d0 = widths[0];
    let (batch, shared_input) = match *call.input.shape() {
        [b, d] if d == d0 => (b, true),
        [e, b, d] if e == models && d == d0 => (b, false),
        ref shape => {
            return Err(Error::Shape(format!(
                "input must be [B, {d0}] or [{models}, B, {d0}], got {shape:?}"
            )))
        }
    };
    if call.input.dtype() != dtype {
        return Err(Error::DType(format!(
            "input is {} but the weights are {dtype}",
            call.input.dtype()
        )));
    }
    if batch == 0 {
        return Err(Error::Empty("the batch has B = 0 rows".into()));
    }
    check_labels(call.labels, batch, call.input)?;
    Ok(EnsembleSpec {
        widths,
        models,
        batch,
        shared_input,
        dtype,
        logits: call.logits,
        precision: call.precision,
        scan: None,
    })
}

/// A validated ensemble call, as the backends receive it.
pub(crate) type EnsembleCall<'a> = Bound<Ensemble<'a>, EnsembleSpec>;

pub(crate) fn bind<'a>(call: &Ensemble<'a>) -> Result<EnsembleCall<'a>> {
    Ok(Bound::new(*call, validate(call)?))
}

pub fn validate_landscape(call: &Landscape<'_>) -> Result<EnsembleSpec> {
    let dtype = float_dtype("input", call.input)?;
    let widths = layer_widths(
        call.center_weights,
        call.center_biases,
        None,
        dtype,
        call.input,
    )?;
    let directions = call
        .direction_weights
        .first()
        .and_then(|w| w.shape().first().copied())
        .unwrap_or(0);
    if directions == 0 {
        return Err(Error::Empty(
            "a landscape scan needs K >= 1 directions".into(),
        ));
    }
    let direction_widths = layer_widths(
        call.direction_weights,
        call.direction_biases,
        Some(directions),
        dtype,
        call.input,
    )?;
    if direction_widths != widths {
        return Err(Error::Shape(format!(
            "directions have widths {direction_widths:?}, the centre {widths:?}"
        )));
    }
    let models = call.distance.shape().first().copied().unwrap_or(0);
    check_same_device(call.input, call.distance, "distance")?;
    check_same_device(call.input, call.direction_of, "direction_of")?;
    if call.distance.dtype() != DType::F32 || call.distance.shape() != [models] || models == 0 {
        return Err(Error::Shape(format!(
            "distance must be [E >= 1] f32, got {:?} {}",
            call.distance.shape(),
            call.distance.dtype()
        )));
    }
    if call.direction_of.dtype() != DType::I64 || call.direction_of.shape() != [models] {
        return Err(Error::Shape(format!(
            "direction_of must be [{models}] i64, got {:?} {}",
            call.direction_of.shape(),
            call.direction_of.dtype()
        )));
    }
    let batch = match *call.input.shape() {
        [b, d] if d == widths[0] => b,
        ref shape => {
            return Err(Error::Shape(format!(
                "input must be [B, {}], got {shape:?}",
                widths[0]
            )))
        }
    };
    if batch == 0 {
        return Err(Error::Empty("the batch has B = 0 rows".into()));
    }
    check_labels(call.labels, batch, call.input)?;
    Ok(EnsembleSpec {
        widths,
        models,
        batch,
        shared_input: true,
        dtype,
        logits: call.logits,
        precision: call.precision,
        scan: Some((directions, call.perturbation)),
    })
}

/// A validated landscape call, as the backends receive it.
pub(crate) type LandscapeCall<'a> = Bound<Landscape<'a>, EnsembleSpec>;

pub(crate) fn bind_landscape<'a>(call: &Landscape<'a>) -> Result<LandscapeCall<'a>> {
    Ok(Bound::new(*call, validate_landscape(call)?))
}

/// The ensemble family's kernels on one backend; an op without a kernel there is refused.
pub(crate) trait EnsembleKernels: BackendKind {
    fn forward(&self, _call: &EnsembleCall<'_>) -> Result<EnsembleOutput> {
        Err(self.unsupported(Op::EnsembleForward))
    }

    fn landscape(&self, _call: &LandscapeCall<'_>) -> Result<EnsembleOutput> {
        Err(self.unsupported(Op::EnsembleLandscape))
    }
}

#[cfg(all(test, feature = "cuda"))]
mod tests {
    use super::*;

    #[test]
    fn status_words_give_the_cpus_errors_in_its_order() {
        assert!(status_error(&[0; 4], 10, 3).is_ok());
        let label = status_error(&[!4, 12, 0, 0], 10, 3).unwrap_err();
        assert!(matches!(
            label,
            Error::LabelOutOfRange {
                row: 4,
                label: 12,
                classes: 10
            }
        ));
        let negative = status_error(&[!0, u64::MAX, 0, 0], 10, 3).unwrap_err();
        assert!(matches!(
            negative,
            Error::LabelOutOfRange {
                row: 0,
                label: -1,
                ..
            }
        ));
        // A scan's values come before the labels, distances before directions, as on the CPU.
        let both = status_error(&[!1, 12, !2, !0], 10, 3).unwrap_err();
        assert_eq!(both.to_string(), non_finite_distance().to_string());
        let direction = status_error(&[!1, 12, 0, !0], 10, 3).unwrap_err();
        assert_eq!(direction.to_string(), direction_out_of_range(3).to_string());
        assert!(matches!(status_error(&[0; 3], 10, 3), Err(Error::Shape(_))));
    }
}
