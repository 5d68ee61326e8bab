//! Bad input to every op gives a typed error and leaves the caller's buffers as they were.

use losskern::ops::bnstats::{self, BnMerge, BnPartial, BnStats, Layout, RunningStats};
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::ops::ensemble::{self, Ensemble, Landscape, Perturbation, Precision};
use losskern::ops::xent::{self, Directional, Targets, Xent, XentOptions};
use losskern::{DType, Device, Error, Op, Tensor};

use crate::backends;

fn floats(device: &Device, shape: &[usize], seed: u64) -> Tensor {
    let len = shape.iter().product();
    let values = losskern::check::Rng::new(seed).normals(len, 1.0);
    Tensor::from_f64(device, &values, shape, DType::F32).unwrap()
}

fn labels(device: &Device, values: &[i64]) -> Tensor {
    Tensor::from_slice(device, values, &[values.len()]).unwrap()
}

/// Asserts that `result` is an error matching `expected`, and that `inputs` still hold what they held.
fn assert_rejected<T: std::fmt::Debug>(
    what: &str,
    inputs: &[&Tensor],
    run: impl FnOnce() -> losskern::Result<T>,
    expected: fn(&Error) -> bool,
) {
    let before: Vec<Vec<f64>> = inputs.iter().map(|t| t.to_f64_vec().unwrap()).collect();
    match run() {
        Err(e) => assert!(expected(&e), "{what}: unexpected error kind: {e}"),
        Ok(out) => panic!("{what}: bad input accepted: {out:?}"),
    }
    for (t, old) in inputs.iter().zip(&before) {
        let now = t.to_f64_vec().unwrap();
        let same = now.iter().zip(old).all(|(a, b)| a.to_bits() == b.to_bits());
        assert!(same, "{what}: an input buffer changed");
    }
}

#[test]
fn xent_rejects_bad_input() {
    for device in backends::all() {
        let z = floats(&device, &[4, 5], 1);
        let y = labels(&device, &[0, 4, -100, 2]);
        let call = |options: XentOptions| Xent {
            options,
            ..Xent::new(&z, Targets::Classes(&y))
        };
        let option_error = |e: &Error| matches!(e, Error::Option(_));
        let with = |change: fn(&mut XentOptions)| {
            let mut options = XentOptions::default();
            change(&mut options);
            options
        };
        for (name, options) in [
            ("T = 0", with(|o| o.temperature = 0.0)),
            ("T < 0", with(|o| o.temperature = -1.0)),
            ("T NaN", with(|o| o.temperature = f64::NAN)),
            ("smoothing 1", with(|o| o.label_smoothing = 1.0)),
            ("smoothing < 0", with(|o| o.label_smoothing = -0.1)),
            ("z-loss NaN", with(|o| o.z_loss = f64::NAN)),
            ("z-loss < 0", with(|o| o.z_loss = -1.0)),
            ("rho eps < 0", with(|o| o.radius.eps = -1.0)),
            ("rho cap NaN", with(|o| o.radius.cap = Some(f64::NAN))),
            ("rho floor < 0", with(|o| o.radius.floor = Some(-1.0))),
        ] {
            assert_rejected(name, &[&z, &y], || xent::xent(&call(options)), option_error);
        }

        // The CPU refuses a bad target at the call; a GPU kernel flags it on the device
        // and the error comes at the next synchronize (or readback), with no host round
        // trip inside the op.
        let run_and_wait = |targets: &Tensor| {
            xent::xent(&Xent::new(&z, Targets::Classes(targets))).and_then(|out| {
                device.synchronize()?;
                Ok(out)
            })
        };
        let out_of_range = labels(&device, &[0, 5, 1, 1]);
        assert_rejected(
            "target = V",
            &[&z, &out_of_range],
            || run_and_wait(&out_of_range),
            |e| {
                matches!(
                    e,
                    Error::Target {
                        row: 1,
                        classes: 5,
                        ignore_index: -100,
                    }
                )
            },
        );
        let negative = labels(&device, &[0, 1, -1, 1]);
        assert_rejected(
            "target -1",
            &[&z, &negative],
            || run_and_wait(&negative),
            |e| matches!(e, Error::Target { row: 2, .. }),
        );
        let short = labels(&device, &[0, 1, 2]);
        let shape_error = |e: &Error| matches!(e, Error::Shape(_));
        assert_rejected(
            "3 targets for 4 rows",
            &[&z, &short],
            || xent::xent(&Xent::new(&z, Targets::Classes(&short))),
            shape_error,
        );
        let soft = floats(&device, &[4, 6], 2);
        assert_rejected(
            "soft targets [4, 6] for V = 5",
            &[&z, &soft],
            || xent::xent(&Xent::new(&z, Targets::Soft(&soft))),
            shape_error,
        );
        let weights = floats(&device, &[4], 3);
        let weighted = Xent {
            class_weights: Some(&weights),
            ..Xent::new(&z, Targets::Classes(&y))
        };
        assert_rejected(
            "weights [4] for V = 5",
            &[&z, &y, &weights],
            || xent::xent(&weighted),
            shape_error,
        );
        let padded = Xent {
            classes: Some(6),
            ..Xent::new(&z, Targets::Classes(&y))
        };
        assert_rejected(
            "V > row stride",
            &[&z, &y],
            || xent::xent(&padded),
            shape_error,
        );
        let flat = floats(&device, &[20], 4);
        assert_rejected(
            "1-D logits",
            &[&flat, &y],
            || xent::xent(&Xent::new(&flat, Targets::Classes(&y))),
            shape_error,
        );
        let empty_rows = Tensor::from_slice::<f32>(&device, &[], &[0, 5]).unwrap();
        let no_targets = labels(&device, &[]);
        assert_rejected(
            "B = 0",
            &[],
            || xent::xent(&Xent::new(&empty_rows, Targets::Classes(&no_targets))),
            |e| matches!(e, Error::Empty(_)),
        );
        let no_classes = Tensor::from_slice::<f32>(&device, &[], &[4, 0]).unwrap();
        assert_rejected(
            "V = 0",
            &[&y],
            || xent::xent(&Xent::new(&no_classes, Targets::Classes(&y))),
            |e| matches!(e, Error::Empty(_)),
        );
        let float_targets = floats(&device, &[4], 5);
        assert_rejected(
            "f32 class targets",
            &[&z],
            || xent::xent(&Xent::new(&z, Targets::Classes(&float_targets))),
            |e| matches!(e, Error::DType(_)),
        );

        let a = floats(&device, &[4, 4], 6);
        assert_rejected(
            "derivatives shape",
            &[&z, &a],
            || {
                xent::directional(&Directional {
                    logits: &z,
                    derivatives: &a,
                    step: 1.0,
                })
            },
            shape_error,
        );
        let a = floats(&device, &[4, 5], 7);
        assert_rejected(
            "step NaN",
            &[&z, &a],
            || {
                xent::directional(&Directional {
                    logits: &z,
                    derivatives: &a,
                    step: f64::NAN,
                })
            },
            option_error,
        );
    }
}

#[test]
fn ops_reject_inputs_from_two_devices() {
    let Some(gpu) = backends::gpus().into_iter().next() else {
        eprintln!("skipping the device-mismatch test: no GPU backend");
        return;
    };
    let z = floats(&gpu, &[2, 3], 8);
    let y = labels(&Device::Cpu, &[0, 1]);
    assert_rejected(
        "targets on another device",
        &[&z, &y],
        || xent::xent(&Xent::new(&z, Targets::Classes(&y))),
        |e| matches!(e, Error::DeviceMismatch(_)),
    );
}

#[test]
fn energy_rejects_bad_input() {
    for device in backends::all() {
        let y = floats(&device, &[3, 2], 9);
        let preds = floats(&device, &[3, 4, 2], 10);
        let score = |beta: f64| EnergyScore {
            y: &y,
            preds: &preds,
            beta,
            grad: true,
        };
        let option_error = |e: &Error| matches!(e, Error::Option(_));
        for beta in [0.0, -1.0, 2.5, f64::NAN, f64::INFINITY] {
            assert_rejected(
                &format!("beta {beta}"),
                &[&y, &preds],
                || energy::energy_score(&score(beta)),
                option_error,
            );
        }
        let wrong_y = floats(&device, &[3, 3], 11);
        let shape_error = |e: &Error| matches!(e, Error::Shape(_));
        assert_rejected(
            "y [3, 3] for d = 2",
            &[&wrong_y, &preds],
            || {
                energy::energy_score(&EnergyScore {
                    y: &wrong_y,
                    preds: &preds,
                    beta: 1.0,
                    grad: false,
                })
            },
            shape_error,
        );
        let no_samples = Tensor::from_slice::<f32>(&device, &[], &[3, 0, 2]).unwrap();
        assert_rejected(
            "m = 0",
            &[&y],
            || {
                energy::energy_score(&EnergyScore {
                    y: &y,
                    preds: &no_samples,
                    beta: 1.0,
                    grad: false,
                })
            },
            |e| matches!(e, Error::Empty(_)),
        );

        let x = floats(&device, &[5, 2], 12);
        let distance = |weights_x, beta| EnergyDistance {
            x: &x,
            y: &y,
            weights_x,
            weights_y: None,
            beta,
            statistic: Statistic::V,
            grad: false,
        };
        assert_rejected(
            "beta 3",
            &[&x, &y],
            || energy::energy_distance(&distance(None, 3.0)),
            option_error,
        );
        let negative = Tensor::from_slice(&device, &[1.0f32, -1.0, 1.0, 1.0, 1.0], &[5]).unwrap();
        let zeros = Tensor::from_slice(&device, &[0.0f32; 5], &[5]).unwrap();
        let not_finite =
            Tensor::from_slice(&device, &[1.0f32, 1.0, f32::NAN, 1.0, 1.0], &[5]).unwrap();
        let fine = Tensor::from_slice(&device, &[1.0f32; 5], &[5]).unwrap();
        // A value check needs the data: it is made wherever the op runs (a backend without
        // the kernel refuses the call first). The CPU refuses bad weights at the call; a
        // GPU kernel flags them on the device (the outputs are NaN) and the error comes at
        // the next synchronize, as for targets.
        let runs = !matches!(
            energy::energy_distance(&distance(Some(&fine), 1.0)),
            Err(Error::Unsupported { .. }) if !device.backend().supports(Op::EnergyDistance)
        );
        if runs {
            let run_and_wait = |weights| {
                energy::energy_distance(&distance(Some(weights), 1.0)).and_then(|out| {
                    device.synchronize()?;
                    Ok(out)
                })
            };
            for (name, weights) in [
                ("negative weight", &negative),
                ("NaN weight", &not_finite),
                ("all-zero weights", &zeros),
            ] {
                assert_rejected(
                    name,
                    &[&x, &y, weights],
                    || run_and_wait(weights),
                    option_error,
                );
            }
            // The weight check of one call does not leak into the next.
            run_and_wait(&fine).unwrap();
        }
        let short = Tensor::from_slice(&device, &[1.0f32; 4], &[4]).unwrap();
        assert_rejected(
            "weights [4] for N = 5",
            &[&x, &y, &short],
            || energy::energy_distance(&distance(Some(&short), 1.0)),
            shape_error,
        );
        let other_d = floats(&device, &[5, 3], 13);
        assert_rejected(
            "d mismatch",
            &[&other_d, &y],
            || {
                energy::energy_distance(&EnergyDistance {
                    x: &other_d,
                    y: &y,
                    weights_x: None,
                    weights_y: None,
                    beta: 1.0,
                    statistic: Statistic::U,
                    grad: true,
                })
            },
            shape_error,
        );
    }
}

#[test]
fn bnstats_rejects_bad_input() {
    for device in backends::all() {
        let x = floats(&device, &[2, 3, 4, 4], 14);
        let stats = |layout: Layout, eps: f64| BnStats {
            x: &x,
            layout,
            eps,
            normalize: None,
        };
        assert_rejected(
            "NCHW tensor as NC",
            &[&x],
            || bnstats::bn_stats(&stats(Layout::Nc, 1e-5)),
            |e| matches!(e, Error::Shape(_)),
        );
        for eps in [-1.0, f64::NAN] {
            assert_rejected(
                &format!("eps {eps}"),
                &[&x],
                || bnstats::bn_stats(&stats(Layout::Nchw, eps)),
                |e| matches!(e, Error::Option(_)),
            );
        }
        let empty = Tensor::from_slice::<f32>(&device, &[], &[0, 3]).unwrap();
        assert_rejected(
            "count 0",
            &[],
            || {
                bnstats::bn_stats(&BnStats {
                    x: &empty,
                    layout: Layout::Nc,
                    eps: 1e-5,
                    normalize: None,
                })
            },
            |e| matches!(e, Error::Empty(_)),
        );
        let gamma = floats(&device, &[4], 15);
        let affine = bnstats::Affine {
            gamma: Some(&gamma),
            beta: None,
        };
        assert_rejected(
            "gamma [4] for C = 3",
            &[&x, &gamma],
            || {
                bnstats::bn_stats(&BnStats {
                    x: &x,
                    layout: Layout::Nchw,
                    eps: 1e-5,
                    normalize: Some(affine),
                })
            },
            |e| matches!(e, Error::Shape(_)),
        );
        bnstats_merge_and_running_reject_bad_input(&device, &x);
    }
}

/// Merges of no, empty or mismatched partials, and running-statistics steps with a bad
/// momentum or mismatched channels, are refused, and the running stats stay as they were.
fn bnstats_merge_and_running_reject_bad_input(device: &Device, x: &Tensor) {
    let stats = bnstats::bn_stats(&BnStats {
        x,
        layout: Layout::Nchw,
        eps: 1e-5,
        normalize: None,
    })
    .unwrap();
    let merge = |parts: &[BnPartial<'_>], eps: f64| {
        bnstats::merge(&BnMerge { parts, eps }).map(|o| o.count)
    };
    let is_empty = |e: &Error| matches!(e, Error::Empty(_));
    assert_rejected("merge of no partial", &[], || merge(&[], 1e-5), is_empty);
    let mut nothing = stats.partial();
    nothing.count = 0;
    assert_rejected(
        "merge of count 0",
        &[],
        || merge(&[nothing, nothing], 1e-5),
        is_empty,
    );
    let short = floats(device, &[2], 21);
    let mut mismatched = stats.partial();
    mismatched.mean = &short;
    assert_rejected(
        "merge of 3 and 2 channels",
        &[&stats.mean, &short],
        || merge(&[stats.partial(), mismatched], 1e-5),
        |e| matches!(e, Error::Shape(_)),
    );
    assert_rejected(
        "merge with eps -1",
        &[&stats.mean],
        || merge(&[stats.partial()], -1.0),
        |e| matches!(e, Error::Option(_)),
    );

    let mut running = RunningStats::new(device, 3).unwrap();
    for momentum in [-0.1, 1.5, f64::NAN, f64::INFINITY] {
        let before = (
            running.mean.to_f64_vec().unwrap(),
            running.num_batches_tracked,
        );
        let err = running.update(&stats, Some(momentum)).unwrap_err();
        assert!(
            matches!(err, Error::Option(_)),
            "momentum {momentum}: {err}"
        );
        assert_eq!(
            before,
            (
                running.mean.to_f64_vec().unwrap(),
                running.num_batches_tracked
            )
        );
    }
    let mut four = RunningStats::new(device, 4).unwrap();
    let err = four.update(&stats, None).unwrap_err();
    assert!(
        matches!(err, Error::Shape(_)),
        "4 running channels, 3 batch channels: {err}"
    );
    assert_eq!(four.num_batches_tracked, 0);
}

#[test]
fn ensemble_rejects_bad_input() {
    for device in backends::all() {
        let w0 = floats(&device, &[2, 4, 3], 16);
        let b0 = floats(&device, &[2, 4], 17);
        let w1 = floats(&device, &[2, 5, 4], 18);
        let b1 = floats(&device, &[2, 5], 19);
        let x = floats(&device, &[6, 3], 20);
        let y = labels(&device, &[0, 1, 2, 3, 4, 0]);
        let (weights, biases) = ([&w0, &w1], [&b0, &b1]);
        let call = |input: &Tensor, labels: &Tensor| {
            ensemble::forward(&Ensemble {
                weights: &weights,
                biases: &biases,
                input,
                labels,
                logits: true,
                precision: Precision::Exact,
            })
            .and_then(|o| {
                // A GPU kernel finds a bad label and reports it at the next synchronize.
                device.synchronize()?;
                Ok(o.loss.shape().to_vec())
            })
        };
        // A value check needs the data: a backend without the op refuses it first.
        if device.backend().supports(Op::EnsembleForward) {
            let bad_label = labels(&device, &[0, 1, 2, 3, 5, 0]);
            assert_rejected(
                "label = C",
                &[&x, &bad_label],
                || call(&x, &bad_label),
                |e| matches!(e, Error::LabelOutOfRange { row: 4, .. }),
            );
        }
        let no_rows = floats(&device, &[0, 3], 28);
        let no_labels = labels(&device, &[]);
        assert_rejected(
            "B = 0",
            &[&no_rows],
            || call(&no_rows, &no_labels),
            |e| matches!(e, Error::Empty(_)),
        );
        let (no_w0, no_b0) = (
            floats(&device, &[0, 4, 3], 29),
            floats(&device, &[0, 4], 30),
        );
        let (no_w1, no_b1) = (
            floats(&device, &[0, 5, 4], 31),
            floats(&device, &[0, 5], 32),
        );
        assert_rejected(
            "E = 0",
            &[&x],
            || {
                ensemble::forward(&Ensemble {
                    weights: &[&no_w0, &no_w1],
                    biases: &[&no_b0, &no_b1],
                    input: &x,
                    labels: &y,
                    logits: false,
                    precision: Precision::Exact,
                })
                .map(|o| o.loss.len())
            },
            |e| matches!(e, Error::Empty(_)),
        );
        let wrong_width = floats(&device, &[6, 4], 21);
        assert_rejected(
            "input width 4 for d0 = 3",
            &[&wrong_width],
            || call(&wrong_width, &y),
            |e| matches!(e, Error::Shape(_)),
        );
        let b_wrong = floats(&device, &[2, 3], 22);
        let bad_biases = [&b_wrong, &b1];
        assert_rejected(
            "bias [2, 3] for out = 4",
            &[&x],
            || {
                ensemble::forward(&Ensemble {
                    weights: &weights,
                    biases: &bad_biases,
                    input: &x,
                    labels: &y,
                    logits: false,
                    precision: Precision::Exact,
                })
                .map(|o| o.loss.len())
            },
            |e| matches!(e, Error::Shape(_)),
        );
        let w_gap = floats(&device, &[2, 5, 3], 23);
        let gapped = [&w0, &w_gap];
        assert_rejected(
            "layer widths do not chain",
            &[&x],
            || {
                ensemble::forward(&Ensemble {
                    weights: &gapped,
                    biases: &biases,
                    input: &x,
                    labels: &y,
                    logits: false,
                    precision: Precision::Exact,
                })
                .map(|o| o.loss.len())
            },
            |e| matches!(e, Error::Shape(_)),
        );

        let cw = [&floats(&device, &[4, 3], 24), &floats(&device, &[5, 4], 25)];
        let cb = [&floats(&device, &[4], 26), &floats(&device, &[5], 27)];
        let k_of = labels(&device, &[0, 1]);
        let t = Tensor::from_slice(&device, &[0.5f32, f32::NAN], &[2]).unwrap();
        // A value check needs the data: a backend without the op refuses it first.
        if device.backend().supports(Op::EnsembleLandscape) {
            assert_rejected(
                "NaN distance",
                &[&x, &t],
                || {
                    ensemble::landscape(&Landscape {
                        center_weights: &cw,
                        center_biases: &cb,
                        direction_weights: &weights,
                        direction_biases: &biases,
                        direction_of: &k_of,
                        distance: &t,
                        input: &x,
                        labels: &y,
                        logits: false,
                        precision: Precision::Exact,
                        perturbation: Perturbation::Split,
                    })
                    .and_then(|o| {
                        device.synchronize()?;
                        Ok(o.loss.len())
                    })
                },
                |e| matches!(e, Error::Option(_)),
            );
        }
        let k_bad = labels(&device, &[0, 2]);
        let t_ok = Tensor::from_slice(&device, &[0.5f32, 1.0], &[2]).unwrap();
        // A value check needs the data: a backend without the op refuses it first.
        if device.backend().supports(Op::EnsembleLandscape) {
            assert_rejected(
                "direction index = K",
                &[&x, &k_bad],
                || {
                    ensemble::landscape(&Landscape {
                        center_weights: &cw,
                        center_biases: &cb,
                        direction_weights: &weights,
                        direction_biases: &biases,
                        direction_of: &k_bad,
                        distance: &t_ok,
                        input: &x,
                        labels: &y,
                        logits: false,
                        precision: Precision::Exact,
                        perturbation: Perturbation::Split,
                    })
                    .and_then(|o| {
                        device.synchronize()?;
                        Ok(o.loss.len())
                    })
                },
                |e| matches!(e, Error::Option(_)),
            );
        }
    }
}
