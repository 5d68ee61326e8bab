//! Differential fuzzing: every input becomes one small random case of the correctness
//! harness (`losskern::check`), run on every backend present (the CPU always, CUDA and wgpu
//! where they open) and compared with the f64 reference under the family's tolerances.
//! A crash is a `Fail` report, or an `Unsupported` one for an op that `Backend::supports`
//! lists for that backend.
//!
//! A new op: add a variant to `Input` that builds its `check` case (sizes bounded so one
//! run takes milliseconds, every option and special value reachable), map it in `case`
//! (its `Op` comes from the case's info); add it to `ops.rs` as well.
//!
//! RUSTC_BOOTSTRAP=1 cargo fuzz run differential

#![no_main]

mod devices;

use arbitrary::Arbitrary;
use libfuzzer_sys::fuzz_target;
use losskern::check::bnstats::{BnRunningCase, BnStatsCase};
use losskern::check::energy::{EnergyDistanceCase, EnergyScoreCase};
use losskern::check::ensemble::EnsembleCase;
use losskern::check::xent::{DirectionalCase, Special, XentCase};
use losskern::check::{self, Case, Outcome};
use losskern::ops::bnstats::Layout;
use losskern::ops::energy::Statistic;
use losskern::ops::ensemble::{Perturbation, Precision};
use losskern::ops::xent::{Gap, GradDType, RadiusOptions, Reduction, RhoReduce, XentOptions};
use losskern::DType;

#[derive(Arbitrary, Debug)]
struct XentInput {
    batch: u8,
    classes: u16,
    padding: u8,
    dtype: u8,
    soft_targets: bool,
    class_weights: bool,
    ignored: u8,
    ignore_index: u8,
    temperature: u8,
    label_smoothing: u8,
    z_loss: u8,
    reduction: u8,
    grad: bool,
    grad_f32: bool,
    gap_top2: bool,
    rho_reduce: u8,
    rho_eps: u8,
    cap: u8,
    floor: u8,
    inf_if_small: bool,
    magnitude: u8,
    special: u8,
    seed: u64,
}

#[derive(Arbitrary, Debug)]
enum Input {
    Xent(XentInput),
    Directional {
        batch: u8,
        classes: u16,
        dtype: u8,
        step: u8,
        seed: u64,
    },
    Ensemble {
        widths: Vec<u8>,
        models: u8,
        batch: u8,
        dtype: u8,
        shared_input: bool,
        directions: Option<u8>,
        rounded: bool,
        seed: u64,
    },
    EnergyScore {
        n: u8,
        m: u8,
        d: u8,
        dtype: u8,
        beta: u8,
        grad: bool,
        coincide: bool,
        magnitude: u8,
        seed: u64,
    },
    EnergyDistance {
        n: u8,
        m: u8,
        d: u8,
        dtype: u8,
        weighted: bool,
        beta: u8,
        u_statistic: bool,
        grad: bool,
        magnitude: u8,
        seed: u64,
    },
    BnStats {
        n: u8,
        c: u8,
        h: u8,
        w: u8,
        layout: u8,
        dtype: u8,
        offset: u8,
        normalize: bool,
        /// Merged from this many batches (1 to 4, at most N).
        parts: u8,
        /// Then two running-statistics steps: None, or a momentum from MOMENTA (255: None).
        running: Option<u8>,
        seed: u64,
    },
}

/// One of `choices`, picked by an arbitrary byte.
fn pick<T: Copy>(choices: &[T], i: u8) -> T {
    choices[usize::from(i) % choices.len()]
}

/// A size in [1, max], from an arbitrary number.
fn size(n: impl Into<u64>, max: u64) -> usize {
    (n.into() % max + 1) as usize
}

fn dtype(i: u8) -> DType {
    pick(&[DType::F32, DType::F16, DType::BF16], i)
}

/// (offset, scale) of an energy case's values: unit, an offset where distances from norms
/// would cancel, and a wide range.
fn energy_magnitude(i: u8) -> (f64, f64) {
    pick(&[(0.0, 1.0), (1e3, 0.01), (0.0, 100.0)], i)
}

/// beta in (0, 2], the range the energy ops take.
fn beta(i: u8) -> f64 {
    f64::from(i % 128 + 1) / 64.0
}

fn xent_case(x: &XentInput) -> XentCase {
    let classes = size(x.classes, 1100);
    let options = XentOptions {
        // 2^[-2, 2): sharp and flat softmaxes.
        temperature: (f64::from(x.temperature) / 64.0 - 2.0).exp2(),
        label_smoothing: f64::from(x.label_smoothing) / 256.0 * 0.9,
        ignore_index: pick(&[-100, -1, 0], x.ignore_index),
        reduction: pick(
            &[Reduction::Mean, Reduction::Sum, Reduction::None],
            x.reduction,
        ),
        z_loss: pick(&[0.0, 1e-4, 1e-2, 0.1], x.z_loss),
        grad: x.grad,
        radius: RadiusOptions {
            gap: if x.gap_top2 { Gap::Top2 } else { Gap::MaxMin },
            reduce: pick(
                &[RhoReduce::Mean, RhoReduce::Max, RhoReduce::PerSample],
                x.rho_reduce,
            ),
            eps: pick(&[0.0, 1e-6, 1e-3, 1.0], x.rho_eps),
            cap: pick(&[None, Some(0.0), Some(2.0), Some(1e6)], x.cap),
            floor: pick(&[None, Some(0.0), Some(0.05)], x.floor),
            inf_if_small: x.inf_if_small,
        },
    };
    XentCase {
        row_stride: classes + usize::from(x.padding % 41),
        soft_targets: x.soft_targets,
        class_weights: x.class_weights,
        ignored_fraction: f64::from(x.ignored) / 255.0,
        options,
        grad_dtype: if x.grad_f32 {
            GradDType::F32
        } else {
            GradDType::Logits
        },
        magnitude: pick(&[1e-3, 1.0, 3.0, 30.0, 1e3, 1e4], x.magnitude),
        special: pick(
            &[
                Special::None,
                Special::Ties,
                Special::NegInf,
                Special::NanRow,
            ],
            x.special,
        ),
        ..XentCase::new(size(x.batch, 32), classes, dtype(x.dtype), x.seed)
    }
}

fn case(input: &Input) -> Case {
    match *input {
        Input::Xent(ref x) => Case::Xent(xent_case(x)),
        Input::Directional {
            batch,
            classes,
            dtype: t,
            step,
            seed,
        } => Case::Directional(DirectionalCase {
            batch: size(batch, 32),
            // V = 2 (the binary radius) one time in four.
            classes: if classes % 4 == 0 {
                2
            } else {
                size(classes, 1100)
            },
            dtype: dtype(t),
            step: f64::from(step) / 32.0,
            seed,
        }),
        Input::Ensemble {
            ref widths,
            models,
            batch,
            dtype: t,
            shared_input,
            directions,
            rounded,
            seed,
        } => {
            let mut widths: Vec<usize> = widths.iter().take(4).map(|&w| size(w, 40)).collect();
            while widths.len() < 2 {
                widths.push(size(seed, 10));
            }
            let directions = directions.map(|k| size(k, 3));
            Case::Ensemble(EnsembleCase {
                widths,
                models: size(models, 6),
                batch: size(batch, 32),
                dtype: dtype(t),
                // A landscape scan shares one input across its models.
                shared_input: shared_input || directions.is_some(),
                directions,
                perturbation: if rounded {
                    Perturbation::Rounded
                } else {
                    Perturbation::Split
                },
                precision: Precision::Exact,
                seed,
            })
        }
        Input::EnergyScore {
            n,
            m,
            d,
            dtype: t,
            beta: b,
            grad,
            coincide,
            magnitude,
            seed,
        } => Case::EnergyScore(EnergyScoreCase {
            n: size(n, 16),
            m: size(m, 40),
            d: size(d, 40),
            dtype: dtype(t),
            beta: beta(b),
            grad,
            coincide,
            offset: energy_magnitude(magnitude).0,
            scale: energy_magnitude(magnitude).1,
            seed,
        }),
        Input::EnergyDistance {
            n,
            m,
            d,
            dtype: t,
            weighted,
            beta: b,
            u_statistic,
            grad,
            magnitude,
            seed,
        } => Case::EnergyDistance(EnergyDistanceCase {
            n: size(n, 150),
            m: size(m, 150),
            d: size(d, 40),
            dtype: dtype(t),
            weighted,
            beta: beta(b),
            statistic: if u_statistic {
                Statistic::U
            } else {
                Statistic::V
            },
            grad,
            offset: energy_magnitude(magnitude).0,
            scale: energy_magnitude(magnitude).1,
            seed,
        }),
        Input::BnStats {
            n,
            c,
            h,
            w,
            layout,
            dtype: t,
            offset,
            normalize,
            parts,
            running,
            seed,
        } => {
            let layout = pick(&[Layout::Nchw, Layout::Nhwc, Layout::Nc], layout);
            // [N, C] has no spatial dimensions: the case counts N H W values per channel.
            let (h, w) = if layout == Layout::Nc {
                (1, 1)
            } else {
                (size(h, 6), size(w, 6))
            };
            let n = size(n, 16);
            let batch = BnStatsCase {
                n,
                c: size(c, 40),
                h,
                w,
                layout,
                dtype: dtype(t),
                offset: pick(&[0.0, 0.5, -3.0, 100.0, 1e4], offset),
                normalize,
                parts: size(parts, 4).min(n),
                seed,
            };
            match running {
                Some(m) => Case::BnRunning(BnRunningCase {
                    batch,
                    momentum: (m != 255).then(|| pick(&[0.0, 0.1, 0.5, 1.0], m)),
                }),
                None => Case::BnStats(batch),
            }
        }
    }
}

fuzz_target!(|input: Input| {
    let case = case(&input);
    let op = case.info().op;
    for device in devices::all() {
        let report = check::run(&case, device);
        let supported = device.backend().supports(op);
        match &report.outcome {
            Outcome::Pass => {}
            Outcome::Unsupported if !supported => {}
            outcome => panic!(
                "{op} on {}: {outcome:?} (supported: {supported})\nreport: {report:?}\ncase: {case:?}",
                device.name()
            ),
        }
    }
});
