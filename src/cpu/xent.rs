use losskern_reference::xent as reference;

use crate::cpu::{scalar, tensor};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::xent::{
    Directional, DirectionalOutput, DirectionalSpec, Targets, Xent, XentOutput, XentSpec,
};

pub fn xent(spec: &XentSpec, call: &Xent<'_>) -> Result<XentOutput> {
    let logits = call.logits.to_f64_vec()?;
    let (classes_y, soft_q);
    let targets = match call.targets {
        Targets::Classes(y) => {
            classes_y = y.to_vec::<i64>()?;
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

pub fn directional(spec: &DirectionalSpec, call: &Directional<'_>) -> Result<DirectionalOutput> {
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
