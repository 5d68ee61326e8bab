//! API robustness: arbitrary shapes, options and values into every op on the CPU device.
//! Each call must return Ok or a typed Error, never panic.
//!
//! RUSTC_BOOTSTRAP=1 cargo fuzz run ops

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use losskern::ops::bnstats::{self, BnStats, Layout};
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::ops::ensemble::{self, Ensemble};
use losskern::ops::xent::{
    self, Directional, Gap, RadiusOptions, Reduction, RhoReduce, Targets, Xent, XentOptions,
};
use losskern::{DType, Device, Tensor};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Dimensions, each taken modulo 9 so tensors stay small (0 included: empty inputs).
    dims: [u8; 4],
    dtype: u8,
    values: Vec<f32>,
    targets: Vec<i64>,
    temperature: f64,
    label_smoothing: f64,
    z_loss: f64,
    rho_eps: f64,
    cap: Option<f64>,
    floor: Option<f64>,
    beta: f64,
    eps: f64,
    flags: u8,
}

fn dim(d: u8) -> usize {
    usize::from(d % 9)
}

fn tensor(device: &Device, values: &[f32], shape: &[usize], dtype: DType) -> Option<Tensor> {
    let len: usize = shape.iter().product();
    let data: Vec<f64> = (0..len)
        .map(|i| values.get(i).copied().map_or(0.5, f64::from))
        .collect();
    Tensor::from_f64(device, &data, shape, dtype).ok()
}

fuzz_target!(|input: Input| {
    let device = Device::Cpu;
    let dtype = [DType::F32, DType::F16, DType::BF16][usize::from(input.dtype % 3)];
    let [a, b, c, d] = input.dims.map(dim);
    let flag = |bit: u8| input.flags & (1 << bit) != 0;

    if let Some(z) = tensor(&device, &input.values, &[a, b], dtype) {
        let y = Tensor::from_slice(
            &device,
            &input.targets.iter().copied().take(a).collect::<Vec<_>>(),
            &[input.targets.len().min(a)],
        );
        let soft = tensor(&device, &input.values, &[a, b], DType::F32);
        let weights = tensor(&device, &input.values, &[b], DType::F32);
        let options = XentOptions {
            temperature: input.temperature,
            label_smoothing: input.label_smoothing,
            ignore_index: -100,
            reduction: [Reduction::Mean, Reduction::Sum, Reduction::None]
                [usize::from(input.flags % 3)],
            z_loss: input.z_loss,
            grad: flag(2),
            radius: RadiusOptions {
                gap: if flag(3) { Gap::Top2 } else { Gap::MaxMin },
                reduce: [RhoReduce::Mean, RhoReduce::Max, RhoReduce::PerSample]
                    [usize::from((input.flags >> 4) % 3)],
                eps: input.rho_eps,
                cap: input.cap,
                floor: input.floor,
                inf_if_small: flag(6),
            },
        };
        let targets = match (&y, &soft) {
            (Ok(y), _) if !flag(7) => Some(Targets::Classes(y)),
            (_, Some(q)) => Some(Targets::Soft(q)),
            _ => None,
        };
        if let Some(targets) = targets {
            let call = Xent {
                logits: &z,
                targets,
                class_weights: weights.as_ref().filter(|_| flag(1)),
                classes: None,
                options,
                grad_dtype: Default::default(),
            };
            let _ = xent::xent(&call);
        }
        if let Some(a_dir) = tensor(&device, &input.values, &[a, b], dtype) {
            let _ = xent::directional(&Directional {
                logits: &z,
                derivatives: &a_dir,
                step: input.beta,
            });
        }
    }

    if let (Some(y), Some(preds)) = (
        tensor(&device, &input.values, &[a, c], dtype),
        tensor(&device, &input.values, &[a, b, c], dtype),
    ) {
        let _ = energy::energy_score(&EnergyScore {
            y: &y,
            preds: &preds,
            beta: input.beta,
            grad: flag(0),
        });
    }
    if let (Some(x), Some(y)) = (
        tensor(&device, &input.values, &[a, c], dtype),
        tensor(&device, &input.values, &[b, c], dtype),
    ) {
        let wx = tensor(&device, &input.values, &[a], DType::F32);
        let statistic = if flag(1) { Statistic::U } else { Statistic::V };
        let _ = energy::energy_distance(&EnergyDistance {
            x: &x,
            y: &y,
            weights_x: wx.as_ref().filter(|_| flag(2)),
            weights_y: None,
            beta: input.beta,
            statistic,
        });
    }

    let layout = [Layout::Nchw, Layout::Nhwc, Layout::Nc][usize::from(input.dtype % 3)];
    let shape: &[usize] = if layout == Layout::Nc {
        &[a, b]
    } else {
        &[a, b, c, d]
    };
    if let Some(x) = tensor(&device, &input.values, shape, dtype) {
        let _ = bnstats::bn_stats(&BnStats {
            x: &x,
            layout,
            eps: input.eps,
            normalize: None,
        });
    }

    let widths = [a.max(1), b, c.max(1)];
    let models = d;
    let layers: Vec<(Option<Tensor>, Option<Tensor>)> = widths
        .windows(2)
        .map(|w| {
            (
                tensor(&device, &input.values, &[models, w[1], w[0]], dtype),
                tensor(&device, &input.values, &[models, w[1]], dtype),
            )
        })
        .collect();
    if let (Some(x), Ok(labels)) = (
        tensor(&device, &input.values, &[b, widths[0]], dtype),
        Tensor::from_slice(&device, &input.targets, &[input.targets.len()]),
    ) {
        let weights: Vec<&Tensor> = layers.iter().filter_map(|l| l.0.as_ref()).collect();
        let biases: Vec<&Tensor> = layers.iter().filter_map(|l| l.1.as_ref()).collect();
        let _ = ensemble::forward(&Ensemble {
            weights: &weights,
            biases: &biases,
            input: &x,
            labels: &labels,
            logits: flag(5),
        });
    }
});
