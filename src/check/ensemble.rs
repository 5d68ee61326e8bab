//! Random ensemble problems and the family's tolerances.
//!
//! Derivation: a logit of layer l is a dot product of d_l terms, within sum_error(d_l)
//! times the sum of |w||x| of that product; through L layers with ReLU (1-Lipschitz) the
//! errors add, so each logit is within sum_error(max d) L (|logit| + P) where P bounds the
//! products' magnitude. The loss is a mean of B log-softmaxes of such logits (accumulated in
//! f64), within twice the logits' allowance. Accuracy is compared exactly.

use losskern_reference::ensemble as reference;

use crate::check::{report_error, sum_error, CaseInfo, Report, Rng, Verdict};
use crate::device::{Device, Tensor};
use crate::dtype::DType;
use crate::error::Result;
use crate::ops::ensemble::{self, Ensemble, Landscape};

/// A random ensemble (or landscape) problem.
#[derive(Clone, Debug)]
pub struct EnsembleCase {
    pub widths: Vec<usize>,
    pub models: usize,
    pub batch: usize,
    pub dtype: DType,
    pub shared_input: bool,
    /// Run as a landscape scan with this many directions.
    pub directions: Option<usize>,
    pub seed: u64,
}

pub fn cases() -> Vec<EnsembleCase> {
    vec![
        EnsembleCase {
            widths: vec![5, 8, 3],
            models: 4,
            batch: 9,
            dtype: DType::F32,
            shared_input: true,
            directions: None,
            seed: 51,
        },
        EnsembleCase {
            widths: vec![33, 17, 16, 10],
            models: 3,
            batch: 31,
            dtype: DType::BF16,
            shared_input: false,
            directions: None,
            seed: 52,
        },
        EnsembleCase {
            widths: vec![12, 6, 4],
            models: 6,
            batch: 16,
            dtype: DType::F16,
            shared_input: true,
            directions: Some(2),
            seed: 53,
        },
    ]
}

/// Rounded random parameters: layer l is [lead.., d_{l+1}, d_l] and [lead.., d_{l+1}], scaled by 1/sqrt(d_l).
fn draw_layers(
    rng: &mut Rng,
    widths: &[usize],
    lead: &[usize],
    dtype: DType,
) -> Result<(Vec<Tensor>, Vec<Tensor>)> {
    let mut weights = Vec::new();
    let mut biases = Vec::new();
    for pair in widths.windows(2) {
        let (inp, out) = (pair[0], pair[1]);
        let count: usize = lead.iter().product();
        let w_shape: Vec<usize> = lead.iter().copied().chain([out, inp]).collect();
        let b_shape: Vec<usize> = lead.iter().copied().chain([out]).collect();
        weights.push(Tensor::from_f64(
            &Device::Cpu,
            &rng.normals(count * out * inp, 1.0 / (inp as f64).sqrt()),
            &w_shape,
            dtype,
        )?);
        biases.push(Tensor::from_f64(
            &Device::Cpu,
            &rng.normals(count * out, 0.1),
            &b_shape,
            dtype,
        )?);
    }
    Ok((weights, biases))
}

fn widen(tensors: &[Tensor]) -> Result<Vec<Vec<f64>>> {
    tensors.iter().map(Tensor::to_f64_vec).collect()
}

fn slices(values: &[Vec<f64>]) -> Vec<&[f64]> {
    values.iter().map(Vec::as_slice).collect()
}

fn to_device(tensors: &[Tensor], device: &Device) -> Result<Vec<Tensor>> {
    tensors.iter().map(|t| t.to_device(device)).collect()
}

pub fn run(case: &EnsembleCase, device: &Device) -> Report {
    let op = if case.directions.is_some() {
        "ensemble::landscape"
    } else {
        "ensemble::forward"
    };
    let info = CaseInfo {
        op,
        dtype: case.dtype.name().into(),
        shape: format!("E{} B{} {:?}", case.models, case.batch, case.widths),
    };
    let tolerance = "k(max d) L (|v| + P)".to_string();
    match compare(case, device) {
        Ok(verdict) => verdict.finish(info, device, tolerance),
        Err(e) => report_error(info, device, e),
    }
}

fn compare(case: &EnsembleCase, device: &Device) -> Result<Verdict> {
    let mut rng = Rng::new(case.seed);
    let (e, b, widths) = (case.models, case.batch, &case.widths);
    let classes = widths[widths.len() - 1];
    let x_shape = if case.shared_input {
        vec![b, widths[0]]
    } else {
        vec![e, b, widths[0]]
    };
    let x_len: usize = x_shape.iter().product();
    let x = Tensor::from_f64(&Device::Cpu, &rng.normals(x_len, 1.0), &x_shape, case.dtype)?;
    let labels: Vec<i64> = (0..b).map(|_| rng.below(classes) as i64).collect();
    let x64 = x.to_f64_vec()?;
    let x = x.to_device(device)?;
    let y = Tensor::from_slice(device, &labels, &[b])?;
    let (out, want) = match case.directions {
        None => {
            let (weights, biases) = draw_layers(&mut rng, widths, &[e], case.dtype)?;
            let (w64, b64) = (widen(&weights)?, widen(&biases)?);
            let (wd, bd) = (to_device(&weights, device)?, to_device(&biases, device)?);
            let (wr, br): (Vec<&Tensor>, Vec<&Tensor>) = (wd.iter().collect(), bd.iter().collect());
            let out = ensemble::forward(&Ensemble {
                weights: &wr,
                biases: &br,
                input: &x,
                labels: &y,
                logits: true,
            })?;
            let params = reference::EnsembleParams {
                widths,
                models: e,
                weights: slices(&w64),
                biases: slices(&b64),
            };
            let input = if case.shared_input {
                reference::EnsembleInput::Shared(&x64)
            } else {
                reference::EnsembleInput::PerModel(&x64)
            };
            (out, reference::forward(&params, input, b, &labels))
        }
        Some(k) => {
            let (cw, cb) = draw_layers(&mut rng, widths, &[], case.dtype)?;
            let (dw, db) = draw_layers(&mut rng, widths, &[k], case.dtype)?;
            let direction_of: Vec<i64> = (0..e).map(|i| (i % k) as i64).collect();
            let distance: Vec<f64> = (0..e)
                .map(|i| f64::from((0.25 * (1u32 << (i / k)) as f64) as f32))
                .collect();
            let host = [widen(&cw)?, widen(&cb)?, widen(&dw)?, widen(&db)?];
            let dev = [
                to_device(&cw, device)?,
                to_device(&cb, device)?,
                to_device(&dw, device)?,
                to_device(&db, device)?,
            ];
            let refs: Vec<Vec<&Tensor>> = dev.iter().map(|v| v.iter().collect()).collect();
            let k_tensor = Tensor::from_slice(device, &direction_of, &[e])?;
            let t_tensor = Tensor::from_f64(device, &distance, &[e], DType::F32)?;
            let out = ensemble::landscape(&Landscape {
                center_weights: &refs[0],
                center_biases: &refs[1],
                direction_weights: &refs[2],
                direction_biases: &refs[3],
                direction_of: &k_tensor,
                distance: &t_tensor,
                input: &x,
                labels: &y,
                logits: true,
            })?;

            let ks: Vec<usize> = direction_of.iter().map(|&k| k as usize).collect();
            let scan = reference::Landscape {
                widths,
                center_weights: slices(&host[0]),
                center_biases: slices(&host[1]),
                directions: k,
                direction_weights: slices(&host[2]),
                direction_biases: slices(&host[3]),
                direction_of: &ks,
                distance: &distance,
            };
            (out, reference::landscape(&scan, &x64, b, &labels))
        }
    };
    let k = sum_error(*widths.iter().max().unwrap_or(&1)) * (widths.len() - 1) as f64;
    let p = want.logits.iter().fold(1.0f64, |m, v| m.max(v.abs()));
    let mut v = Verdict::new();
    if let Some(logits) = &out.logits {
        v.add("logits", &logits.to_f64_vec()?, &want.logits, |_, w| {
            k * (w.abs() + p)
        });
    }
    v.add("loss", &out.loss.to_f64_vec()?, &want.loss, |_, w| {
        2.0 * k * (w.abs() + p)
    });
    v.add_exact("accuracy", &out.accuracy.to_f64_vec()?, &want.accuracy);
    Ok(v)
}
