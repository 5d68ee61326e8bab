//! xent on every GPU backend, at its raw entries: class targets out of range (no host check),
//! forward outputs that do not change by a bit with the gradient, and small temperatures.
//!
//! The bad-target tests build the spec with `ops::xent::validate` on in-range targets, then
//! hand the raw entry a device buffer of the same shape holding the bad ones: the kernels
//! are what must keep such a row from reading out of bounds or touching its neighbours.

use losskern::check::xent::{run, XentCase, XentInputs};
use losskern::check::{agrees, Outcome, Rng};
use losskern::ops::xent::{self, RhoReduce, Targets, Xent, XentOptions, XentOutput, XentSpec};
use losskern::{DType, Device, Tensor};
use losskern_reference::xent as reference;

use crate::backends;

/// f32 unit roundoff.
const U: f64 = 1.0 / 16_777_216.0;

/// What a raw call wrote, on the host.
struct RawOut {
    /// (name, [B] values) of every per-row f32 output, rho per sample included.
    per_row: Vec<(&'static str, Vec<f64>)>,
    argmax: Vec<i64>,
    loss: f64,
    grad: Vec<f64>,
    first_bad: Option<usize>,
}

fn f32s(bytes: &[u8]) -> Vec<f64> {
    bytemuck::pod_collect_to_vec::<u8, f32>(bytes)
        .into_iter()
        .map(f64::from)
        .collect()
}

/// Runs the raw entry of `device` on `call`'s logits and weights with the class targets
/// `labels` (any values), under `spec` (f32 logits, grad in f32, rho per sample).
fn run_raw(device: &Device, spec: &XentSpec, call: &Xent<'_>, labels: &Tensor) -> RawOut {
    let (b, v) = (spec.batch(), spec.classes());
    match device {
        Device::Cuda(backend) => {
            use losskern::cuda::xent::{xent_raw, XentBuffers, XentInputs, XentTargets};
            let stream = backend.stream();
            let inputs = XentInputs {
                logits: call.logits.cuda_slice().unwrap().as_view(),
                targets: XentTargets::Classes(labels.cuda_slice().unwrap().as_view()),
                class_weights: call
                    .class_weights
                    .map(|w| w.cuda_slice().unwrap().as_view()),
            };
            let mut out = XentBuffers::new(stream, spec).unwrap();
            xent_raw(stream, spec, &inputs, &mut out).unwrap();
            let read = |s: &cudarc::driver::CudaSlice<u8>| stream.clone_dtoh(s).unwrap();
            let per_row = vec![
                ("loss_per_row", f32s(&read(&out.loss_per_row))),
                ("lse", f32s(&read(&out.lse))),
                ("entropy", f32s(&read(&out.entropy))),
                ("max", f32s(&read(&out.max))),
                ("min", f32s(&read(&out.min))),
                ("top2_gap", f32s(&read(&out.top2_gap))),
                ("delta", f32s(&read(&out.delta))),
                ("rho", f32s(&read(&out.rho))),
            ];
            RawOut {
                per_row,
                argmax: bytemuck::pod_collect_to_vec(&read(&out.argmax)),
                loss: f32s(&read(&out.loss))[0],
                grad: f32s(&read(out.grad.as_ref().unwrap())),
                first_bad: out.first_bad_target_row(stream).unwrap(),
            }
        }
        Device::Wgpu(backend) => {
            use losskern::wgpu::xent::{xent_raw, XentBuffers, XentTargets};
            let zeros = |n: usize| Tensor::from_slice(device, &vec![0f32; n], &[n]).unwrap();
            let per_row: Vec<Tensor> = (0..8).map(|_| zeros(b)).collect();
            let (loss, grad, status) = (zeros(1), zeros(b * v), zeros(1));
            let argmax = Tensor::from_slice(device, &vec![0i64; b], &[b]).unwrap();
            fn buffer(t: &Tensor) -> &wgpu::Buffer {
                t.wgpu_buffer().unwrap()
            }
            let out = XentBuffers {
                loss: buffer(&loss),
                loss_per_row: buffer(&per_row[0]),
                lse: buffer(&per_row[1]),
                entropy: buffer(&per_row[2]),
                max: buffer(&per_row[3]),
                min: buffer(&per_row[4]),
                top2_gap: buffer(&per_row[5]),
                delta: buffer(&per_row[6]),
                rho: buffer(&per_row[7]),
                argmax: buffer(&argmax),
                grad: Some(buffer(&grad)),
                status: buffer(&status),
            };
            xent_raw(
                backend,
                spec,
                buffer(call.logits),
                XentTargets::Classes(buffer(labels)),
                call.class_weights.map(buffer),
                &out,
            )
            .unwrap();
            let first_bad = out.first_bad_target_row(backend).unwrap();
            let names = [
                "loss_per_row",
                "lse",
                "entropy",
                "max",
                "min",
                "top2_gap",
                "delta",
                "rho",
            ];
            RawOut {
                per_row: names
                    .iter()
                    .zip(&per_row)
                    .map(|(&n, t)| (n, t.to_f64_vec().unwrap()))
                    .collect(),
                argmax: argmax.to_vec::<i64>().unwrap(),
                loss: loss.to_f64_vec().unwrap()[0],
                grad: grad.to_f64_vec().unwrap(),
                first_bad,
            }
        }
        Device::Cpu => unreachable!("the raw entries are GPU-only"),
    }
}

/// One bad-target problem: f32 logits [B, V] ~ N(0, 3^2), random in-range targets, and the
/// rows `bad` given `bad_value` instead.
struct BadTargets {
    b: usize,
    v: usize,
    z: Vec<f32>,
    y: Vec<i64>,
    weights: Option<Vec<f32>>,
    options: XentOptions,
}

impl BadTargets {
    fn new(b: usize, v: usize, seed: u64, smoothed: bool) -> Self {
        let mut rng = Rng::new(seed);
        let z = rng.normals(b * v, 3.0).iter().map(|&x| x as f32).collect();
        let y = (0..b).map(|_| rng.below(v) as i64).collect();
        let weights =
            smoothed.then(|| (0..v).map(|_| (0.5 + 1.5 * rng.uniform()) as f32).collect());
        let mut options = XentOptions {
            grad: true,
            label_smoothing: if smoothed { 0.1 } else { 0.0 },
            ..XentOptions::default()
        };
        options.radius.reduce = RhoReduce::PerSample;
        BadTargets {
            b,
            v,
            z,
            y,
            weights,
            options,
        }
    }

    /// The reference with the bad rows ignored: what every other row must give.
    fn reference(&self, bad: &[usize]) -> reference::XentOutput {
        let mut y = self.y.clone();
        for &r in bad {
            y[r] = self.options.ignore_index;
        }
        let z: Vec<f64> = self.z.iter().map(|&x| f64::from(x)).collect();
        let w: Option<Vec<f64>> = self
            .weights
            .as_ref()
            .map(|w| w.iter().map(|&x| f64::from(x)).collect());
        reference::xent(&reference::XentProblem {
            logits: &z,
            batch: self.b,
            classes: self.v,
            row_stride: self.v,
            targets: reference::Targets::Classes(&y),
            class_weights: w.as_deref(),
            options: self.options,
        })
    }

    /// Runs with `bad_value` as the target of every row in `bad` and checks the contract.
    fn check(&self, device: &Device, bad: &[usize], bad_value: i64) {
        let what = format!(
            "B = {} V = {} bad rows {bad:?} = {bad_value} on {}",
            self.b,
            self.v,
            device.name()
        );
        let logits = Tensor::from_slice(device, &self.z, &[self.b, self.v]).unwrap();
        let good = Tensor::from_slice(device, &self.y, &[self.b]).unwrap();
        let mut y_bad = self.y.clone();
        for &r in bad {
            y_bad[r] = bad_value;
        }
        let labels = Tensor::from_slice(device, &y_bad, &[self.b]).unwrap();
        let weights = self
            .weights
            .as_ref()
            .map(|w| Tensor::from_slice(device, w, &[self.v]).unwrap());
        let call = Xent {
            class_weights: weights.as_ref(),
            options: self.options,
            grad_dtype: xent::GradDType::F32,
            ..Xent::new(&logits, Targets::Classes(&good))
        };
        let spec = xent::validate(&call).unwrap();
        let got = run_raw(device, &spec, &call, &labels);
        let want = self.reference(bad);
        let want_rows: [&[f64]; 8] = [
            &want.loss_per_row,
            &want.lse,
            &want.entropy,
            &want.max,
            &want.min,
            &want.top2_gap,
            &want.delta,
            &want.rho,
        ];

        assert_eq!(got.first_bad, bad.iter().copied().min(), "status, {what}");
        assert!(got.loss.is_nan(), "reduced loss {} for {what}", got.loss);
        // The check harness's tolerances: a = 4 u M for the rounding of values of about M,
        // the largest |z| (T = 1), and k = 8 u (sqrt V + log2 V + 1) for f32 sums of V terms
        // on values of about 1 + |v| + M; times the largest class weight (2).
        let m = self
            .z
            .iter()
            .fold(0.0f64, |m, &x| m.max(f64::from(x).abs()));
        let a = 4.0 * U * m;
        let k = 8.0 * U * ((self.v as f64).sqrt() + (self.v as f64).log2() + 1.0);
        let weight = if self.weights.is_some() { 2.0 } else { 1.0 };
        let row_tol = |w: f64| weight * (a + k * (1.0 + w.abs() + m));
        let grad_want = want.grad.as_ref().unwrap();
        // The mean's scale: 1 / (sum of w_y over the rows that are not bad).
        let scale = 1.0
            / (0..self.b)
                .filter(|r| !bad.contains(r))
                .map(|r| {
                    let y = self.y[r] as usize;
                    self.weights.as_ref().map_or(1.0, |w| f64::from(w[y]))
                })
                .sum::<f64>();
        for row in 0..self.b {
            let grad_row = &got.grad[row * self.v..(row + 1) * self.v];
            if bad.contains(&row) {
                for (name, values) in &got.per_row {
                    assert!(
                        values[row].is_nan(),
                        "{name}[{row}] = {} for {what}",
                        values[row]
                    );
                }
                assert_eq!(got.argmax[row], -1, "argmax[{row}] for {what}");
                assert!(
                    grad_row.iter().all(|g| g.is_nan()),
                    "grad row {row} not all NaN for {what}"
                );
                continue;
            }
            for ((name, values), w) in got.per_row.iter().zip(want_rows) {
                let tol = match *name {
                    // rho = pi / (Delta + eps): relative error of Delta (8 u M) plus 4 u.
                    "rho" => w[row] * (2.0 * a / (want.delta[row] + 1e-6) + 4.0 * U),
                    "max" | "min" | "top2_gap" | "delta" => 2.0 * a,
                    _ => row_tol(w[row]),
                };
                assert!(
                    agrees(values[row], w[row], tol),
                    "{name}[{row}]: {} vs {} (allowed {tol:e}) for {what}",
                    values[row],
                    w[row]
                );
            }
            assert_eq!(
                got.argmax[row], want.argmax[row],
                "argmax[{row}] for {what}"
            );
            for (k_col, (&g, &w)) in grad_row
                .iter()
                .zip(&grad_want[row * self.v..(row + 1) * self.v])
                .enumerate()
            {
                let tol = scale * weight * (4.0 * a + 4.0 * k) + 2.0 * U * w.abs();
                assert!(
                    agrees(g, w, tol),
                    "grad[{row}, {k_col}]: {g} vs {w} (allowed {tol:e}) for {what}"
                );
            }
        }
    }
}

#[test]
fn an_out_of_range_target_makes_only_its_row_nan_and_is_reported() {
    for device in backends::gpus() {
        for (b, v, smoothed) in [(9, 300, false), (6, 4097, true), (5, 31, false)] {
            let problem = BadTargets::new(b, v, 7000 + v as u64, smoothed);
            problem.check(&device, &[b / 2], v as i64);
            problem.check(&device, &[0], -5);
            problem.check(&device, &[b - 1], i64::MAX);
            // Two bad rows: the status names the smaller, whatever order rows run in.
            problem.check(&device, &[b - 2, 1], v as i64 + 3);
        }
    }
}

/// Every forward output of a Tensor-path run, as raw bits (the gradient left out).
fn forward_bits(out: &XentOutput) -> Vec<(&'static str, Vec<u64>)> {
    out.forward()
        .into_iter()
        .map(|(name, t)| {
            let bits = t
                .to_f64_vec()
                .unwrap()
                .iter()
                .map(|x| x.to_bits())
                .collect();
            (name, bits)
        })
        .collect()
}

#[test]
fn forward_outputs_do_not_change_by_a_bit_with_the_gradient() {
    for device in backends::gpus() {
        for (b, v) in [
            (7, 1),
            (7, 31),
            (5, 4097),
            (3, (1 << 17) + 3),
            (900, 16_411),
        ] {
            for (dtype, smoothed) in [(DType::F32, false), (DType::BF16, true)] {
                let mut case = XentCase::new(b, v, dtype, 8000 + v as u64);
                case.class_weights = smoothed;
                case.options.label_smoothing = if smoothed { 0.1 } else { 0.0 };
                case.options.z_loss = 1e-4;
                case.options.radius.reduce = RhoReduce::PerSample;
                let inputs = XentInputs::draw(&case, &device).unwrap();
                let mut without = inputs.call(&case);
                without.options.grad = false;
                let mut with = without;
                with.options.grad = true;
                let (a, g) = (xent::xent(&without).unwrap(), xent::xent(&with).unwrap());
                assert!(g.grad.is_some() && a.grad.is_none());
                assert_eq!(
                    forward_bits(&a),
                    forward_bits(&g),
                    "{b}x{v} {dtype:?} on {}",
                    device.name()
                );
            }
        }
    }
}

/// Small temperatures where z / T is representable: the harness's comparison with the
/// reference, on every output including the gradient.
#[test]
fn small_temperatures_match_the_reference() {
    for device in backends::gpus() {
        for (temperature, magnitude, dtype) in [
            (1e-3, 1e4, DType::F32),
            (1e-30, 1.0, DType::F32),
            (1e-30, 1.0, DType::BF16),
        ] {
            let mut case = XentCase::new(6, 257, dtype, 8100);
            case.options.temperature = temperature;
            case.options.grad = true;
            case.options.label_smoothing = 0.05;
            case.magnitude = magnitude;
            let report = run(&case, &device);
            assert_eq!(
                report.outcome,
                Outcome::Pass,
                "T = {temperature:e}, |z| ~ {magnitude:e} on {}",
                device.name()
            );
        }
    }
}

/// z ~ 1e4 + N(0, 1) at T = 1e-35: z / T is beyond f32 for every class, but the loss,
/// entropy, gaps and rho are not, and lse, max and min are +inf only because they are too.
/// Compared with the f64 reference rounded to f32.
#[test]
fn a_temperature_that_overflows_z_over_t_leaves_representable_outputs_right() {
    let (b, v, t) = (4, 300, 1e-35);
    let mut rng = Rng::new(8200);
    let z: Vec<f32> = rng
        .normals(b * v, 1.0)
        .iter()
        .map(|x| (1e4 + x) as f32)
        .collect();
    let y: Vec<i64> = (0..b).map(|_| rng.below(v) as i64).collect();
    let mut options = XentOptions {
        temperature: t,
        ..XentOptions::default()
    };
    options.radius.reduce = RhoReduce::PerSample;
    let z64: Vec<f64> = z.iter().map(|&x| f64::from(x)).collect();
    let want = reference::xent(&reference::XentProblem {
        logits: &z64,
        batch: b,
        classes: v,
        row_stride: v,
        targets: reference::Targets::Classes(&y),
        class_weights: None,
        options,
    });
    for device in backends::gpus() {
        let logits = Tensor::from_slice(&device, &z, &[b, v]).unwrap();
        let targets = Tensor::from_slice(&device, &y, &[b]).unwrap();
        let out = xent::xent(&Xent {
            options,
            ..Xent::new(&logits, Targets::Classes(&targets))
        })
        .unwrap();
        for (name, got, want) in [
            ("loss_per_row", &out.loss_per_row, &want.loss_per_row),
            ("lse", &out.lse, &want.lse),
            ("entropy", &out.entropy, &want.entropy),
            ("max", &out.max, &want.max),
            ("min", &out.min, &want.min),
            ("top2_gap", &out.top2_gap, &want.top2_gap),
            ("delta", &out.delta, &want.delta),
            ("rho", &out.rho, &want.rho),
        ] {
            for (row, (g, w)) in got.to_f64_vec().unwrap().iter().zip(want).enumerate() {
                // The differences of z are exact; dividing by T rounds 1 / T and the
                // product (2 u), and the f32 sums of the loss and entropy add the V-term k
                // of the harness on values of about 1.
                let rounded = f64::from(*w as f32);
                let k = 8.0 * U * ((v as f64).sqrt() + (v as f64).log2() + 1.0);
                let tol = 4.0 * U * rounded.abs() + 4.0 * k;
                assert!(
                    agrees(*g, rounded, tol),
                    "{name}[{row}]: {g:e} vs {rounded:e} (allowed {tol:e}) on {}",
                    device.name()
                );
            }
        }
        assert_eq!(
            out.argmax.to_vec::<i64>().unwrap(),
            want.argmax,
            "argmax on {}",
            device.name()
        );
    }
}
