//! energy on every backend: proptest against the reference over shapes, beta, weights,
//! dtypes and magnitudes, then the metamorphic properties, the closed forms and
//! determinism. Outputs are poisoned (`backends::all`), so a passing case also shows
//! that every output element was written.

use losskern::check::energy::{EnergyDistanceCase, EnergyScoreCase};
use losskern::check::{self, Case, Outcome, Rng};
use losskern::ops::energy::{self, EnergyDistance, EnergyDistanceOutput, EnergyScore, Statistic};
use losskern::support::Op;
use losskern::{DType, Device, Tensor};
use losskern_reference::energy as reference;
use proptest::prelude::*;

use crate::backends;

/// Passes, or reports Unsupported where the support table lists no kernel for the op.
fn assert_matches_reference(case: &Case, device: &Device) {
    let report = check::run(case, device);
    match report.outcome {
        Outcome::Pass => {}
        Outcome::Unsupported if !device.backend().supports(case.info().op) => {}
        outcome => panic!("{case:?} on {}: {outcome:?}", device.name()),
    }
}

fn dtype() -> impl Strategy<Value = DType> {
    prop_oneof![Just(DType::F32), Just(DType::F16), Just(DType::BF16)]
}

fn beta() -> impl Strategy<Value = f64> {
    prop_oneof![Just(1.0), Just(2.0), Just(0.5), 0.05..2.0f64]
}

/// Unit data, the offset 1e3 with scale 0.01 where norms would cancel, and a wide range.
fn magnitude() -> impl Strategy<Value = (f64, f64)> {
    prop_oneof![Just((0.0, 1.0)), Just((1e3, 0.01)), Just((0.0, 100.0))]
}

fn score_case() -> impl Strategy<Value = EnergyScoreCase> {
    (
        prop_oneof![Just(1usize), Just(3), Just(17)],
        prop_oneof![Just(1usize), Just(2), Just(5), Just(33), Just(513)],
        prop_oneof![Just(1usize), Just(3), Just(31), Just(100)],
        dtype(),
        beta(),
        any::<bool>(),
        any::<bool>(),
        magnitude(),
        any::<u64>(),
    )
        .prop_filter("reference cost", |(n, m, d, ..)| n * m * m * d <= 1 << 22)
        .prop_map(
            |(n, m, d, dtype, beta, grad, coincide, (offset, scale), seed)| EnergyScoreCase {
                n,
                m,
                d,
                dtype,
                beta,
                grad,
                coincide,
                offset,
                scale,
                seed,
            },
        )
}

fn distance_case() -> impl Strategy<Value = EnergyDistanceCase> {
    (
        prop_oneof![Just(1usize), Just(2), Just(63), Just(65), Just(300)],
        prop_oneof![Just(1usize), Just(7), Just(64), Just(129)],
        prop_oneof![Just(1usize), Just(3), Just(32), Just(33), Just(130)],
        dtype(),
        any::<bool>(),
        beta(),
        prop_oneof![Just(Statistic::V), Just(Statistic::U)],
        any::<bool>(),
        magnitude(),
        any::<u64>(),
    )
        .prop_map(
            |(n, m, d, dtype, weighted, beta, statistic, grad, (offset, scale), seed)| {
                EnergyDistanceCase {
                    n,
                    m,
                    d,
                    dtype,
                    weighted,
                    beta,
                    statistic,
                    grad,
                    offset,
                    scale,
                    seed,
                }
            },
        )
}

/// PROPTEST_CASES when set (the GPU host runs more), else 24.
fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: proptest_cases(), ..ProptestConfig::default() })]

    #[test]
    fn energy_score_matches_the_reference_on_every_backend(case in score_case()) {
        for device in backends::all() {
            assert_matches_reference(&Case::EnergyScore(case.clone()), &device);
        }
    }

    #[test]
    fn energy_distance_matches_the_reference_on_every_backend(case in distance_case()) {
        for device in backends::all() {
            assert_matches_reference(&Case::EnergyDistance(case.clone()), &device);
        }
    }
}

fn tensor(device: &Device, values: &[f64], shape: &[usize]) -> Tensor {
    Tensor::from_f64(device, values, shape, DType::F32).unwrap()
}

fn scalar(t: &Tensor) -> f64 {
    t.to_f64_vec().unwrap()[0]
}

/// Values on a 2^-10 grid within +-8: an f32 holds them, and a shift by a multiple of
/// 2^-10 below 2^9, exactly.
fn grid_values(rng: &mut Rng, len: usize) -> Vec<f64> {
    (0..len)
        .map(|_| (rng.normal() * 1024.0).round().clamp(-8192.0, 8192.0) / 1024.0)
        .collect()
}

/// The energy distance of x [n, d] and y [m, d] on `device`, or None where the backend
/// has no kernel for it (and the support table says so).
fn distance(
    device: &Device,
    x: (&[f64], usize),
    y: (&[f64], usize),
    d: usize,
    weights: (Option<&[f64]>, Option<&[f64]>),
    beta: f64,
    statistic: Statistic,
) -> Option<EnergyDistanceOutput> {
    let xt = tensor(device, x.0, &[x.1, d]);
    let yt = tensor(device, y.0, &[y.1, d]);
    let wx = weights.0.map(|w| tensor(device, w, &[x.1]));
    let wy = weights.1.map(|w| tensor(device, w, &[y.1]));
    distance_or_unsupported(
        device,
        &EnergyDistance {
            x: &xt,
            y: &yt,
            weights_x: wx.as_ref(),
            weights_y: wy.as_ref(),
            beta,
            statistic,
            grad: false,
        },
    )
}

/// The call's outputs, or None where the backend has no kernel for it (and the support
/// table says so).
fn distance_or_unsupported(
    device: &Device,
    call: &EnergyDistance<'_>,
) -> Option<EnergyDistanceOutput> {
    match energy::energy_distance(call) {
        Ok(out) => Some(out),
        Err(losskern::Error::Unsupported { .. })
            if !device.backend().supports(Op::EnergyDistance) =>
        {
            None
        }
        Err(e) => panic!("energy distance on {}: {e}", device.name()),
    }
}

fn terms(out: &EnergyDistanceOutput) -> [f64; 4] {
    [
        scalar(&out.distance),
        scalar(&out.cross),
        scalar(&out.within_x),
        scalar(&out.within_y),
    ]
}

/// A rounding-level bound on an f32 energy distance of sizes up to a few hundred: about
/// 100 f32 roundings of the terms' magnitudes (the harness derives the tight ones).
fn rounding_bound(t: &[f64; 4]) -> f64 {
    1e-5 * (2.0 * t[1].abs() + t[2].abs() + t[3].abs())
}

#[test]
fn energy_distance_of_a_set_with_itself_is_zero_and_symmetric() {
    let (n, m, d) = (150, 70, 5);
    let mut rng = Rng::new(41);
    let x = rng.normals(n * d, 1.0);
    let y = rng.normals(m * d, 2.0);
    let wx: Vec<f64> = (0..n).map(|_| 0.1 + rng.uniform()).collect();
    let wy: Vec<f64> = (0..m).map(|_| 0.1 + rng.uniform()).collect();
    for device in backends::all() {
        for statistic in [Statistic::V, Statistic::U] {
            let w = Some(wx.as_slice());
            let Some(same) = distance(&device, (&x, n), (&x, n), d, (w, w), 1.0, statistic) else {
                continue;
            };
            let t = terms(&same);
            if statistic == Statistic::V {
                assert!(t[0].abs() <= rounding_bound(&t), "E(X, X) = {t:?}");
            }
            assert_eq!(t[2], t[3], "both within-set terms of X are one sum");

            let Some(xy) = distance(
                &device,
                (&x, n),
                (&y, m),
                d,
                (Some(&wx), Some(&wy)),
                1.0,
                statistic,
            ) else {
                continue;
            };
            let yx = distance(
                &device,
                (&y, m),
                (&x, n),
                d,
                (Some(&wy), Some(&wx)),
                1.0,
                statistic,
            )
            .unwrap();
            let (a, b) = (terms(&xy), terms(&yx));
            assert!(a[0] > 0.0, "{a:?}");
            assert_eq!((a[2], a[3]), (b[3], b[2]), "within-set terms swap exactly");
            assert!((a[0] - b[0]).abs() <= rounding_bound(&a), "{a:?} vs {b:?}");
        }
    }
}

#[test]
fn energy_distance_is_translation_and_rotation_invariant() {
    let (n, m, d) = (90, 130, 3);
    let mut rng = Rng::new(42);
    let x = grid_values(&mut rng, n * d);
    let y = grid_values(&mut rng, m * d);
    // Every coordinate and difference stays exact in f32, so the distances are the same
    // numbers and the outputs the same bits.
    let shift = |v: &[f64]| -> Vec<f64> { v.iter().map(|a| a + 200.5).collect() };
    // A rotation by a quarter turn in the first two coordinates: exact values, but the
    // squares are summed in another order, so equal to rounding.
    let rotate = |v: &[f64]| -> Vec<f64> {
        v.chunks(d)
            .flat_map(|p| [-p[1], p[0], p[2]])
            .collect::<Vec<f64>>()
    };
    for device in backends::all() {
        for beta in [1.0, 1.5] {
            let run = |a: &[f64], b: &[f64]| {
                distance(&device, (a, n), (b, m), d, (None, None), beta, Statistic::U)
            };
            let Some(base) = run(&x, &y) else { continue };
            let base = terms(&base);
            let shifted = terms(&run(&shift(&x), &shift(&y)).unwrap());
            assert_eq!(base, shifted, "translation on {}", device.name());
            let rotated = terms(&run(&rotate(&x), &rotate(&y)).unwrap());
            for k in 0..4 {
                assert!(
                    (base[k] - rotated[k]).abs() <= rounding_bound(&base),
                    "rotation on {}: {base:?} vs {rotated:?}",
                    device.name()
                );
            }
        }
    }
}

#[test]
fn energy_distance_with_beta_2_is_twice_the_squared_mean_difference() {
    let (n, m, d) = (200, 77, 4);
    let mut rng = Rng::new(43);
    let x = rng.normals(n * d, 1.0);
    let y: Vec<f64> = rng.normals(m * d, 1.0).iter().map(|v| v + 0.7).collect();
    let mean = |v: &[f64], rows: usize, k: usize| {
        (0..rows)
            .map(|i| f64::from(v[i * d + k] as f32))
            .sum::<f64>()
            / rows as f64
    };
    let closed: f64 = (0..d)
        .map(|k| (mean(&x, n, k) - mean(&y, m, k)).powi(2))
        .sum::<f64>()
        * 2.0;
    for device in backends::all() {
        let Some(out) = distance(
            &device,
            (&x, n),
            (&y, m),
            d,
            (None, None),
            2.0,
            Statistic::V,
        ) else {
            continue;
        };
        let t = terms(&out);
        assert!(
            (t[0] - closed).abs() <= rounding_bound(&t),
            "{} gives {t:?}, 2 |mean x - mean y|^2 = {closed}",
            device.name()
        );
    }
}

fn score(
    device: &Device,
    y: &[f64],
    p: &[f64],
    (n, m, d): (usize, usize, usize),
    beta: f64,
    grad: bool,
) -> Option<energy::EnergyScoreOutput> {
    let yt = tensor(device, y, &[n, d]);
    let pt = tensor(device, p, &[n, m, d]);
    match energy::energy_score(&EnergyScore {
        y: &yt,
        preds: &pt,
        beta,
        grad,
    }) {
        Ok(out) => Some(out),
        Err(losskern::Error::Unsupported { .. }) if !device.backend().supports(Op::EnergyScore) => {
            None
        }
        Err(e) => panic!("energy score on {}: {e}", device.name()),
    }
}

#[test]
fn energy_score_with_one_sample_has_no_second_term() {
    let (n, m, d) = (40, 1, 6);
    let mut rng = Rng::new(44);
    let y = rng.normals(n * d, 1.0);
    let p = rng.normals(n * m * d, 1.0);
    for device in backends::all() {
        for beta in [0.5, 1.0, 2.0] {
            let Some(out) = score(&device, &y, &p, (n, m, d), beta, true) else {
                continue;
            };
            assert_eq!(scalar(&out.term2), 0.0, "{}", device.name());
            assert_eq!(scalar(&out.loss), scalar(&out.term1), "{}", device.name());
        }
    }
}

#[test]
fn energy_score_gradient_matches_finite_differences_of_the_reference() {
    let (n, m, d) = (3, 4, 3);
    let mut rng = Rng::new(45);
    let round = |v: Vec<f64>| -> Vec<f64> { v.iter().map(|a| f64::from(*a as f32)).collect() };
    let y = round(rng.normals(n * d, 1.0));
    let p = round(rng.normals(n * m * d, 1.0));
    let loss = |p: &[f64], beta: f64| {
        reference::energy_score(&reference::EnergyScoreProblem {
            y: &y,
            preds: p,
            n,
            m,
            d,
            beta,
            grad: false,
        })
        .loss
    };
    for device in backends::all() {
        for beta in [0.7, 1.0, 1.6] {
            let Some(out) = score(&device, &y, &p, (n, m, d), beta, true) else {
                continue;
            };
            let grad = out.grad.unwrap().to_f64_vec().unwrap();
            let h = 1e-6;
            for k in 0..p.len() {
                let (mut plus, mut minus) = (p.clone(), p.clone());
                plus[k] += h;
                minus[k] -= h;
                let numeric = (loss(&plus, beta) - loss(&minus, beta)) / (2.0 * h);
                assert!(
                    (grad[k] - numeric).abs() <= 1e-5 * (1.0 + numeric.abs()),
                    "{} beta {beta} at {k}: {} vs {numeric}",
                    device.name(),
                    grad[k]
                );
            }
        }
    }
}

/// Every output of an energy distance with its gradient on `device` (x [n, d], y [m, d],
/// x weighted), as f64: the four terms, then grad_x and grad_y; None where unsupported.
fn distance_with_grad(
    device: &Device,
    (x, n): (&[f64], usize),
    (y, m): (&[f64], usize),
    d: usize,
    beta: f64,
    statistic: Statistic,
) -> Option<Vec<f64>> {
    let (xt, yt) = (tensor(device, x, &[n, d]), tensor(device, y, &[m, d]));
    let weights: Vec<f64> = (0..n).map(|i| 0.5 + (i % 3) as f64).collect();
    let wx = tensor(device, &weights, &[n]);
    let out = distance_or_unsupported(
        device,
        &EnergyDistance {
            x: &xt,
            y: &yt,
            weights_x: Some(&wx),
            weights_y: None,
            beta,
            statistic,
            grad: true,
        },
    )?;
    let mut values = terms(&out).to_vec();
    for g in [out.grad_x, out.grad_y] {
        values.extend(g.unwrap().to_f64_vec().unwrap());
    }
    Some(values)
}

#[test]
fn energy_distance_gradient_matches_finite_differences_of_the_reference() {
    let (n, m, d) = (5, 4, 3);
    let mut rng = Rng::new(48);
    let round = |v: Vec<f64>| -> Vec<f64> { v.iter().map(|a| f64::from(*a as f32)).collect() };
    let x = round(rng.normals(n * d, 1.0));
    let y = round(rng.normals(m * d, 1.5));
    let weights: Vec<f64> = (0..n).map(|i| 0.5 + (i % 3) as f64).collect();
    let value = |x: &[f64], y: &[f64], beta: f64, statistic: Statistic| {
        reference::energy_distance(&reference::EnergyDistanceProblem {
            x,
            y,
            n,
            m,
            d,
            weights_x: Some(&weights),
            weights_y: None,
            beta,
            statistic,
            grad: false,
        })
        .distance
    };
    for device in backends::all() {
        for (beta, statistic) in [
            (0.7, Statistic::V),
            (1.0, Statistic::U),
            (1.6, Statistic::V),
        ] {
            let Some(out) = distance_with_grad(&device, (&x, n), (&y, m), d, beta, statistic)
            else {
                continue;
            };
            let grad = &out[4..];
            let h = 1e-6;
            for k in 0..x.len() + y.len() {
                let (mut xp, mut xm, mut yp, mut ym) = (x.clone(), x.clone(), y.clone(), y.clone());
                if k < x.len() {
                    xp[k] += h;
                    xm[k] -= h;
                } else {
                    yp[k - x.len()] += h;
                    ym[k - x.len()] -= h;
                }
                let numeric = (value(&xp, &yp, beta, statistic) - value(&xm, &ym, beta, statistic))
                    / (2.0 * h);
                assert!(
                    (grad[k] - numeric).abs() <= 1e-5 * (1.0 + numeric.abs()),
                    "{} beta {beta} {statistic:?} at {k}: {} vs {numeric}",
                    device.name(),
                    grad[k]
                );
            }
        }
    }
}

/// Every output of a score run, as raw bits.
fn score_bits(out: &energy::EnergyScoreOutput) -> Vec<u64> {
    [&out.term1, &out.term2, &out.loss]
        .into_iter()
        .chain(out.grad.as_ref())
        .flat_map(|t| t.to_f64_vec().unwrap())
        .map(f64::to_bits)
        .collect()
}

#[test]
fn energy_ops_are_deterministic_and_the_forward_ignores_the_gradient() {
    let (n, m, d) = (300, 24, 9);
    let mut rng = Rng::new(46);
    let y = rng.normals(n * d, 1.0);
    let p = rng.normals(n * m * d, 1.0);
    let x = rng.normals(700 * d, 1.0);
    let y_rows = &p[..250 * d];
    for device in backends::all() {
        for beta in [1.0, 1.3] {
            let Some(first) = score(&device, &y, &p, (n, m, d), beta, true) else {
                continue;
            };
            let again = score(&device, &y, &p, (n, m, d), beta, true).unwrap();
            assert_eq!(score_bits(&first), score_bits(&again), "{}", device.name());
            let forward = score(&device, &y, &p, (n, m, d), beta, false).unwrap();
            assert_eq!(
                score_bits(&forward),
                score_bits(&first)[..3],
                "{}: the forward changed with the gradient",
                device.name()
            );
        }
        let run = || {
            distance(
                &device,
                (&x, 700),
                (y_rows, 250),
                d,
                (None, None),
                1.0,
                Statistic::V,
            )
            .map(|o| terms(&o).map(f64::to_bits))
        };
        assert_eq!(run(), run(), "{}", device.name());
        let with_grad = || {
            distance_with_grad(&device, (&x, 700), (y_rows, 250), d, 1.3, Statistic::U)
                .map(|v| v.into_iter().map(f64::to_bits).collect::<Vec<_>>())
        };
        assert_eq!(with_grad(), with_grad(), "{}: gradient", device.name());
    }
}

/// x [40, 5], y [23, 5] and x's weights as f32 bytes, with the Tensor entry's outputs
/// (as bits) on `device` for the same data: what the zero-copy entries must reproduce.
struct RawCase {
    x: Vec<u8>,
    y: Vec<u8>,
    weights: Vec<u8>,
    spec: energy::EnergyDistanceSpec,
    want: [u64; 4],
}

fn raw_case(device: &Device) -> Option<RawCase> {
    let (n, m, d) = (40, 23, 5);
    let mut rng = Rng::new(47);
    let f32s = |v: Vec<f64>| -> Vec<f32> { v.into_iter().map(|a| a as f32).collect() };
    let x = f32s(rng.normals(n * d, 1.0));
    let y = f32s(rng.normals(m * d, 1.0));
    let w: Vec<f32> = (0..n).map(|_| (0.1 + rng.uniform()) as f32).collect();
    let xt = Tensor::from_slice(device, &x, &[n, d]).unwrap();
    let yt = Tensor::from_slice(device, &y, &[m, d]).unwrap();
    let wt = Tensor::from_slice(device, &w, &[n]).unwrap();
    let call = EnergyDistance {
        x: &xt,
        y: &yt,
        weights_x: Some(&wt),
        weights_y: None,
        beta: 1.0,
        statistic: Statistic::U,
        grad: false,
    };
    let spec = energy::validate_distance(&call).unwrap();
    let out = match energy::energy_distance(&call) {
        Ok(out) => out,
        Err(losskern::Error::Unsupported { .. }) => return None,
        Err(e) => panic!("{e}"),
    };
    Some(RawCase {
        x: bytemuck::cast_slice(&x).to_vec(),
        y: bytemuck::cast_slice(&y).to_vec(),
        weights: bytemuck::cast_slice(&w).to_vec(),
        spec,
        want: terms(&out).map(f64::to_bits),
    })
}

fn f32_bits(bytes: &[u8]) -> u64 {
    f64::from(f32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]])).to_bits()
}

#[cfg(feature = "wgpu")]
#[test]
fn energy_distance_raw_wgpu_entry_checks_buffers_and_matches_the_tensor_entry() {
    use losskern::wgpu::energy::{energy_distance_raw, EnergyDistanceBuffers};
    for device in backends::gpus() {
        let Device::Wgpu(backend) = &device else {
            continue;
        };
        let Some(case) = raw_case(&device) else {
            continue;
        };
        let upload = |bytes: &[u8]| backend.upload(bytes).unwrap();
        let (x, y, w) = (upload(&case.x), upload(&case.y), upload(&case.weights));
        let outs: Vec<_> = (0..5).map(|_| upload(&[0u8; 4])).collect();
        let buffers = EnergyDistanceBuffers {
            distance: &outs[0],
            cross: &outs[1],
            within_x: &outs[2],
            within_y: &outs[3],
            status: &outs[4],
            grad_x: None,
            grad_y: None,
        };
        energy_distance_raw(backend, &case.spec, &x, &y, (Some(&w), None), &buffers).unwrap();
        buffers.check_weights(backend).unwrap();
        let got: Vec<u64> = outs[..4]
            .iter()
            .map(|b| f32_bits(&backend.download(b, 4).unwrap()))
            .collect();
        assert_eq!(got, case.want, "raw and Tensor entries differ");

        let short = upload(&case.x[..case.x.len() - 4]);
        let refused = energy_distance_raw(backend, &case.spec, &short, &y, (None, None), &buffers);
        assert!(
            matches!(refused, Err(losskern::Error::Shape(_))),
            "{refused:?}"
        );
        let mut negative = case.weights.clone();
        negative[3] |= 0x80;
        let negative = upload(&negative);
        energy_distance_raw(
            backend,
            &case.spec,
            &x,
            &y,
            (Some(&negative), None),
            &buffers,
        )
        .unwrap();
        assert!(matches!(
            buffers.check_weights(backend),
            Err(losskern::Error::Option(_))
        ));
    }
}

#[cfg(feature = "cuda")]
#[test]
fn energy_distance_raw_cuda_entry_checks_buffers_and_matches_the_tensor_entry() {
    use losskern::cuda::energy::{
        energy_distance_raw, EnergyDistanceBuffers, EnergyDistanceInputs,
    };
    for device in backends::gpus() {
        let Device::Cuda(backend) = &device else {
            continue;
        };
        let Some(case) = raw_case(&device) else {
            continue;
        };
        let stream = backend.stream();
        let upload = |bytes: &[u8]| stream.clone_htod(bytes).unwrap();
        let (x, y, w) = (upload(&case.x), upload(&case.y), upload(&case.weights));
        let mut out = EnergyDistanceBuffers::new(stream, &case.spec).unwrap();
        let inputs = EnergyDistanceInputs {
            x: x.as_view(),
            y: y.as_view(),
            weights_x: Some(w.as_view()),
            weights_y: None,
        };
        energy_distance_raw(stream, &case.spec, &inputs, &mut out).unwrap();
        out.check_weights(stream).unwrap();
        let got: Vec<u64> = [&out.distance, &out.cross, &out.within_x, &out.within_y]
            .into_iter()
            .map(|b| f32_bits(&stream.clone_dtoh(b).unwrap()))
            .collect();
        assert_eq!(got, case.want, "raw and Tensor entries differ");

        let short = EnergyDistanceInputs {
            x: x.slice(4..),
            ..inputs
        };
        let refused = energy_distance_raw(stream, &case.spec, &short, &mut out);
        assert!(
            matches!(refused, Err(losskern::Error::Shape(_))),
            "{refused:?}"
        );
    }
}
