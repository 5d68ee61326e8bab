use losskern_reference::xent as reference;

use crate::cpu::CpuBackend;
use crate::cpu::{scalar, tensor};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::xent::{
    DirectionalCall, DirectionalOutput, Targets, XentCall, XentKernels, XentOutput, XentSpec,
};

/// The first class target outside [0, V) that is not `ignore_index`, as an error.
fn check_targets(targets: &[i64], spec: &XentSpec) -> Result<()> {
    let ignore_index = spec.options.ignore_index;
    let bad = targets.iter().position(|&target| {
        let in_range = usize::try_from(target).is_ok_and(|t| t < spec.classes);
        !in_range && target != ignore_index
    });
    match bad {
        Some(row) => Err(Error::Target {
            row,
            classes: spec.classes,
            ignore_index,
        }),
        None => Ok(()),
    }
}

impl XentKernels for CpuBackend {
    fn xent(&self, bound: &XentCall<'_>) -> Result<XentOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let logits = call.logits.to_f64_vec()?;
        let (classes_y, soft_q);
        let targets = match call.targets {
            Targets::Classes(y) => {
                classes_y = y.to_vec::<i64>()?;
                check_targets(&classes_y, spec)?;
                reference::Targets::Classes(&classes_y)
            }
            Targets::Soft(q) => {
                soft_q = q.to_f64_vec()?;
                reference::Targets::Soft(&soft_q)
            }
        };
        let weights = call.class_weights.map(Tensor::to_f64_vec).transpose()?;
        let out = reference::xent(&reference::XentProblem {
            logits: &logits,
            batch: spec.batch,
            classes: spec.classes,
            row_stride: spec.row_stride,
            targets,
            class_weights: weights.as_deref(),
            options: spec.options,
        });
        let rows = [spec.batch];
        let per_row = |values: &[f64]| tensor(values, &rows, DType::F32);
        let argmax: Vec<f64> = out.argmax.iter().map(|&i| i as f64).collect();
        Ok(XentOutput {
            loss: scalar(out.loss)?,
            loss_per_row: per_row(&out.loss_per_row)?,
            lse: per_row(&out.lse)?,
            entropy: per_row(&out.entropy)?,
            argmax: tensor(&argmax, &rows, DType::I64)?,
            max: per_row(&out.max)?,
            min: per_row(&out.min)?,
            top2_gap: per_row(&out.top2_gap)?,
            delta: per_row(&out.delta)?,
            rho: tensor(&out.rho, &[out.rho.len()], DType::F32)?,
            grad: out
                .grad
                .map(|g| tensor(&g, &[spec.batch, spec.classes], spec.grad_dtype))
                .transpose()?,
        })
    }

    fn directional(&self, bound: &DirectionalCall<'_>) -> Result<DirectionalOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let logits = call.logits.to_f64_vec()?;
        let derivatives = call.derivatives.to_f64_vec()?;
        let out = reference::directional(&reference::DirectionalProblem {
            logits: &logits,
            derivatives: &derivatives,
            batch: spec.batch,
            classes: spec.classes,
            step: spec.step,
        });
        Ok(DirectionalOutput {
            delta_a: tensor(&out.delta_a, &[spec.batch], DType::F32)?,
            rho_a: scalar(out.rho_a)?,
            binary_radius: out
                .binary_radius
                .map(|r| tensor(&r, &[spec.batch], DType::F32))
                .transpose()?,
            normalized_step: scalar(out.normalized_step)?,
        })
    }
}
