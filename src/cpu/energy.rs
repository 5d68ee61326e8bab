use losskern_reference::energy as reference;

use crate::cpu::CpuBackend;
use crate::cpu::{scalar, tensor};
use crate::device::Tensor;
use crate::dtype::DType;
use crate::error::Result;
use crate::spec::energy::{
    check_weight_values, EnergyDistanceCall, EnergyDistanceOutput, EnergyKernels, EnergyScoreCall,
    EnergyScoreOutput,
};

impl EnergyKernels for CpuBackend {
    fn energy_score(&self, bound: &EnergyScoreCall<'_>) -> Result<EnergyScoreOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let y = call.y.to_f64_vec()?;
        let preds = call.preds.to_f64_vec()?;
        let out = reference::energy_score(&reference::EnergyScoreProblem {
            y: &y,
            preds: &preds,
            n: spec.n,
            m: spec.m,
            d: spec.d,
            beta: spec.beta,
            grad: spec.grad,
        });
        Ok(EnergyScoreOutput {
            term1: scalar(out.term1)?,
            term2: scalar(out.term2)?,
            loss: scalar(out.loss)?,
            grad: out
                .grad
                .map(|g| tensor(&g, &[spec.n, spec.m, spec.d], DType::F32))
                .transpose()?,
        })
    }

    fn energy_distance(&self, bound: &EnergyDistanceCall<'_>) -> Result<EnergyDistanceOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let x = call.x.to_f64_vec()?;
        let y = call.y.to_f64_vec()?;
        let weights_x = call.weights_x.map(Tensor::to_f64_vec).transpose()?;
        let weights_y = call.weights_y.map(Tensor::to_f64_vec).transpose()?;
        for (name, weights) in [("weights_x", &weights_x), ("weights_y", &weights_y)] {
            if let Some(values) = weights {
                check_weight_values(name, values)?;
            }
        }
        let out = reference::energy_distance(&reference::EnergyDistanceProblem {
            x: &x,
            y: &y,
            n: spec.n,
            m: spec.m,
            d: spec.d,
            weights_x: weights_x.as_deref(),
            weights_y: weights_y.as_deref(),
            beta: spec.beta,
            statistic: spec.statistic,
            grad: spec.grad,
        });
        let grad = |values: Option<Vec<f64>>, rows: usize| {
            values
                .map(|g| tensor(&g, &[rows, spec.d], DType::F32))
                .transpose()
        };
        Ok(EnergyDistanceOutput {
            distance: scalar(out.distance)?,
            cross: scalar(out.cross)?,
            within_x: scalar(out.within_x)?,
            within_y: scalar(out.within_y)?,
            grad_x: grad(out.grad_x, spec.n)?,
            grad_y: grad(out.grad_y, spec.m)?,
        })
    }
}
