use losskern_reference::ensemble as reference;

use crate::cpu::tensor;
use crate::cpu::CpuBackend;
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::ensemble::{
    check_label_values, check_scan_values, EnsembleCall, EnsembleKernels, EnsembleOutput,
    EnsembleSpec, LandscapeCall,
};

fn widen_all(tensors: &[&Tensor]) -> Result<Vec<Vec<f64>>> {
    tensors.iter().map(|t| t.to_f64_vec()).collect()
}

/// C, the last width (validation made sure there is one).
fn classes(spec: &EnsembleSpec) -> usize {
    spec.widths.last().copied().unwrap_or(0)
}

fn output(spec: &EnsembleSpec, out: reference::EnsembleOutput) -> Result<EnsembleOutput> {
    let classes = classes(spec);
    let models = [spec.models];
    Ok(EnsembleOutput {
        loss: tensor(&out.loss, &models, DType::F64)?,
        accuracy: tensor(&out.accuracy, &models, DType::F64)?,
        logits: if spec.logits {
            Some(tensor(
                &out.logits,
                &[spec.models, spec.batch, classes],
                DType::F32,
            )?)
        } else {
            None
        },
    })
}

impl EnsembleKernels for CpuBackend {
    fn forward(&self, bound: &EnsembleCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let weights = widen_all(call.weights)?;
        let biases = widen_all(call.biases)?;
        let x = call.input.to_f64_vec()?;
        let labels = call.labels.to_vec::<i64>()?;
        check_label_values(&labels, classes(spec))?;
        let params = reference::EnsembleParams {
            widths: &spec.widths,
            models: spec.models,
            weights: weights.iter().map(Vec::as_slice).collect(),
            biases: biases.iter().map(Vec::as_slice).collect(),
        };
        let input = if spec.shared_input {
            reference::EnsembleInput::Shared(&x)
        } else {
            reference::EnsembleInput::PerModel(&x)
        };
        output(
            spec,
            reference::forward(&params, input, spec.batch, &labels),
        )
    }

    fn landscape(&self, bound: &LandscapeCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let center_weights = widen_all(call.center_weights)?;
        let center_biases = widen_all(call.center_biases)?;
        let direction_weights = widen_all(call.direction_weights)?;
        let direction_biases = widen_all(call.direction_biases)?;
        let direction_of = call.direction_of.to_vec::<i64>()?;
        let distance = call.distance.to_f64_vec()?;
        let directions = spec.directions.unwrap_or(0);
        check_scan_values(&distance, &direction_of, directions)?;
        // In [0, K): checked just above.
        let direction_of: Vec<usize> = direction_of.into_iter().map(|k| k as usize).collect();
        let x = call.input.to_f64_vec()?;
        let labels = call.labels.to_vec::<i64>()?;
        check_label_values(&labels, classes(spec))?;
        let scan = reference::Landscape {
            widths: &spec.widths,
            center_weights: center_weights.iter().map(Vec::as_slice).collect(),
            center_biases: center_biases.iter().map(Vec::as_slice).collect(),
            directions,
            direction_weights: direction_weights.iter().map(Vec::as_slice).collect(),
            direction_biases: direction_biases.iter().map(Vec::as_slice).collect(),
            direction_of: &direction_of,
            distance: &distance,
        };
        output(spec, reference::landscape(&scan, &x, spec.batch, &labels))
    }
}
