//! API robustness: arbitrary shapes, dtypes, options and values (NaN and inf included) into
//! every op on every device present (the CPU always; CUDA and wgpu where they open), with
//! some inputs on the CPU while the others are on a GPU. Each call must return Ok or a typed
//! input error; a panic, or a backend failure (`Error::Cuda`, `Wgpu`, `Launch`, ...) on these
//! tiny problems, is a crash. Errors a GPU raises after the call (a bad class target is
//! found on the device) surface at `Device::synchronize`, so every call is followed by one.
//!
//! A new op: call it from a function like `xent_ops`, with tensors made by `tensor` from the
//! input's dims and values and options straight from arbitrary f64s, pass its result through
//! `settle`, and call that function in the target; add the op to differential.rs as well.
//!
//! RUSTC_BOOTSTRAP=1 cargo fuzz run ops

#![no_main]

mod devices;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use losskern::ops::bnstats::{self, Affine, BnMerge, BnPartial, BnStats, Layout, RunningStats};
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::ops::ensemble::{self, Ensemble, Landscape, Perturbation, Precision};
use losskern::ops::xent::{
    self, Directional, Gap, GradDType, RadiusOptions, Reduction, RhoReduce, Targets, Xent,
    XentOptions,
};
use losskern::{DType, Device, Error, Tensor};

#[derive(Arbitrary, Debug)]
struct Input {
    /// Dimensions, each taken modulo 9 so tensors stay small (0 included: empty inputs).
    dims: [u8; 5],
    dtype: u8,
    values: Vec<f32>,
    targets: Vec<i64>,
    classes: Option<u8>,
    ignore_index: i64,
    temperature: f64,
    label_smoothing: f64,
    z_loss: f64,
    rho_eps: f64,
    cap: Option<f64>,
    floor: Option<f64>,
    beta: f64,
    eps: f64,
    momentum: Option<f64>,
    flags: u16,
}

impl Input {
    fn flag(&self, bit: u8) -> bool {
        self.flags & (1 << bit) != 0
    }

    fn dtype(&self) -> DType {
        [DType::F32, DType::F16, DType::BF16, DType::F64, DType::I64][usize::from(self.dtype % 5)]
    }

    fn dims(&self) -> [usize; 5] {
        self.dims.map(|d| usize::from(d % 9))
    }

    /// Where the secondary inputs live: usually `device`, on the CPU when flag 15 is set
    /// (a device mismatch whenever `device` is a GPU).
    fn other<'a>(&self, device: &'a Device) -> &'a Device {
        const CPU: &Device = &Device::Cpu;
        if self.flag(15) {
            CPU
        } else {
            device
        }
    }
}

/// A tensor of `shape` from the input's values (0.5 where they run out).
fn tensor(device: &Device, values: &[f32], shape: &[usize], dtype: DType) -> Option<Tensor> {
    let len: usize = shape.iter().product();
    let data: Vec<f64> = (0..len)
        .map(|i| values.get(i).copied().map_or(0.5, f64::from))
        .collect();
    Tensor::from_f64(device, &data, shape, dtype).ok()
}

/// An i64 tensor of the first `len` targets (shorter when they run out: a shape error).
fn indices(device: &Device, targets: &[i64], len: usize) -> Option<Tensor> {
    let taken: Vec<i64> = targets.iter().copied().take(len).collect();
    Tensor::from_slice(device, &taken, &[taken.len()]).ok()
}

/// Whether an error is the backend failing rather than the input being rejected.
fn backend_failure(e: &Error) -> bool {
    matches!(
        e,
        Error::Cuda(_)
            | Error::Compile { .. }
            | Error::Launch { .. }
            | Error::Wgpu(_)
            | Error::CudaUnavailable(_)
            | Error::WgpuUnavailable(_)
    )
}

/// Waits for the op's work and checks that whatever went wrong was the input's fault.
fn settle<T>(device: &Device, result: losskern::Result<T>) -> Option<T> {
    let result = result.and_then(|out| device.synchronize().map(|()| out));
    match result {
        Ok(out) => Some(out),
        Err(e) => {
            assert!(!backend_failure(&e), "backend failure on {device:?}: {e}");
            None
        }
    }
}

fn xent_ops(device: &Device, input: &Input) {
    let [a, b, ..] = input.dims();
    let dtype = input.dtype();
    let other = input.other(device);
    let Some(z) = tensor(device, &input.values, &[a, b], dtype) else {
        return;
    };
    let y = indices(other, &input.targets, a);
    let soft_dtype = if input.flag(8) { DType::F32 } else { dtype };
    let soft = tensor(other, &input.values, &[a, b], soft_dtype);
    let weights = tensor(other, &input.values, &[b], DType::F32);
    let options = XentOptions {
        temperature: input.temperature,
        label_smoothing: input.label_smoothing,
        ignore_index: input.ignore_index,
        reduction: [Reduction::Mean, Reduction::Sum, Reduction::None][usize::from(input.flags % 3)],
        z_loss: input.z_loss,
        grad: input.flag(2),
        radius: RadiusOptions {
            gap: if input.flag(3) {
                Gap::Top2
            } else {
                Gap::MaxMin
            },
            reduce: [RhoReduce::Mean, RhoReduce::Max, RhoReduce::PerSample]
                [usize::from((input.flags >> 4) % 3)],
            eps: input.rho_eps,
            cap: input.cap,
            floor: input.floor,
            inf_if_small: input.flag(6),
        },
    };
    let targets = match (&y, &soft) {
        (Some(y), _) if !input.flag(7) => Some(Targets::Classes(y)),
        (_, Some(q)) => Some(Targets::Soft(q)),
        _ => None,
    };
    if let Some(targets) = targets {
        let call = Xent {
            logits: &z,
            targets,
            class_weights: weights.as_ref().filter(|_| input.flag(1)),
            classes: input.classes.map(usize::from),
            options,
            grad_dtype: if input.flag(9) {
                GradDType::F32
            } else {
                GradDType::Logits
            },
        };
        settle(device, xent::xent(&call));
    }
    let derivative_dtype = if input.flag(10) { DType::F32 } else { dtype };
    if let Some(a_dir) = tensor(other, &input.values, &[a, b], derivative_dtype) {
        settle(
            device,
            xent::directional(&Directional {
                logits: &z,
                derivatives: &a_dir,
                step: input.beta,
            }),
        );
    }
}

fn energy_ops(device: &Device, input: &Input) {
    let [a, b, c, ..] = input.dims();
    let dtype = input.dtype();
    let other = input.other(device);
    if let (Some(y), Some(preds)) = (
        tensor(other, &input.values, &[a, c], dtype),
        tensor(device, &input.values, &[a, b, c], dtype),
    ) {
        settle(
            device,
            energy::energy_score(&EnergyScore {
                y: &y,
                preds: &preds,
                beta: input.beta,
                grad: input.flag(0),
            }),
        );
    }
    if let (Some(x), Some(y)) = (
        tensor(device, &input.values, &[a, c], dtype),
        tensor(other, &input.values, &[b, c], dtype),
    ) {
        let wx = tensor(other, &input.values, &[a], DType::F32);
        let wy = tensor(device, &input.values, &[b], DType::F32);
        settle(
            device,
            energy::energy_distance(&EnergyDistance {
                x: &x,
                y: &y,
                weights_x: wx.as_ref().filter(|_| input.flag(2)),
                weights_y: wy.as_ref().filter(|_| input.flag(3)),
                beta: input.beta,
                statistic: if input.flag(1) {
                    Statistic::U
                } else {
                    Statistic::V
                },
                grad: input.flag(4),
            }),
        );
    }
}

fn bn_ops(device: &Device, input: &Input) {
    let [a, b, c, d, e] = input.dims();
    let other = input.other(device);
    let layout = [Layout::Nchw, Layout::Nhwc, Layout::Nc][usize::from(input.dtype % 3)];
    let shape: &[usize] = if layout == Layout::Nc {
        &[a, b]
    } else {
        &[a, b, c, d]
    };
    let Some(x) = tensor(device, &input.values, shape, input.dtype()) else {
        return;
    };
    let gamma = tensor(other, &input.values, &[b], DType::F32);
    let beta = tensor(device, &input.values, &[e], DType::F32);
    let normalize = input.flag(11).then_some(Affine {
        gamma: gamma.as_ref().filter(|_| input.flag(12)),
        beta: beta.as_ref().filter(|_| input.flag(13)),
    });
    let stats = settle(
        device,
        bnstats::bn_stats(&BnStats {
            x: &x,
            layout,
            eps: input.eps,
            normalize,
        }),
    );
    if let Some(stats) = stats {
        let channels = if input.flag(14) { e } else { stats.mean.len() };
        if let Some(mut running) = settle(device, RunningStats::new(device, channels)) {
            settle(device, running.update(&stats, input.momentum));
        }
        // A second partial that may have another length, dtype or device, or count 0.
        let other_mean = tensor(other, &input.values, &[e], input.dtype());
        let parts = [
            stats.partial(),
            BnPartial {
                count: if input.flag(12) { 0 } else { stats.count },
                mean: other_mean.as_ref().unwrap_or(&stats.mean),
                m2: &stats.m2,
            },
        ];
        let used = if input.flag(13) {
            2
        } else {
            usize::from(input.flag(14))
        };
        settle(
            device,
            bnstats::merge(&BnMerge {
                parts: &parts[..used],
                eps: input.eps,
            }),
        );
    }
}

type Layers = Vec<(Option<Tensor>, Option<Tensor>)>;

/// The weights and biases of the layers that could be made (fewer than asked: a shape error).
fn refs(layers: &Layers) -> (Vec<&Tensor>, Vec<&Tensor>) {
    (
        layers.iter().filter_map(|l| l.0.as_ref()).collect(),
        layers.iter().filter_map(|l| l.1.as_ref()).collect(),
    )
}

fn ensemble_ops(device: &Device, input: &Input) {
    let [a, b, c, d, e] = input.dims();
    let dtype = input.dtype();
    let other = input.other(device);
    let widths = [a.max(1), b, c.max(1)];
    let layers = |lead: &[usize]| -> Layers {
        widths
            .windows(2)
            .map(|w| {
                let shape = |tail: &[usize]| [lead, tail].concat();
                (
                    tensor(device, &input.values, &shape(&[w[1], w[0]]), dtype),
                    tensor(device, &input.values, &shape(&[w[1]]), dtype),
                )
            })
            .collect()
    };
    let (Some(x), Some(labels)) = (
        tensor(device, &input.values, &[b, widths[0]], dtype),
        indices(other, &input.targets, input.targets.len()),
    ) else {
        return;
    };
    let models = layers(&[d]);
    let (weights, biases) = refs(&models);
    settle(
        device,
        ensemble::forward(&Ensemble {
            weights: &weights,
            biases: &biases,
            input: &x,
            labels: &labels,
            logits: input.flag(5),
            precision: if input.flag(3) {
                Precision::TensorCore
            } else {
                Precision::Exact
            },
        }),
    );
    let center = layers(&[]);
    let directions = layers(&[e]);
    let ((cw, cb), (dw, db)) = (refs(&center), refs(&directions));
    let direction_of: Vec<i64> = (0..d)
        .map(|i| input.targets.get(i).map_or(0, |&k| k % e.max(1) as i64))
        .collect();
    if let (Ok(direction_of), Some(distance)) = (
        Tensor::from_slice(other, &direction_of, &[d]),
        tensor(device, &input.values, &[d], DType::F32),
    ) {
        settle(
            device,
            ensemble::landscape(&Landscape {
                center_weights: &cw,
                center_biases: &cb,
                direction_weights: &dw,
                direction_biases: &db,
                direction_of: &direction_of,
                distance: &distance,
                input: &x,
                labels: &labels,
                logits: input.flag(4),
                precision: Precision::Exact,
                perturbation: if input.flag(2) {
                    Perturbation::Rounded
                } else {
                    Perturbation::Split
                },
            }),
        );
    }
}

fuzz_target!(|input: Input| {
    for device in devices::all() {
        xent_ops(device, &input);
        energy_ops(device, &input);
        bn_ops(device, &input);
        ensemble_ops(device, &input);
    }
});
