//! bnstats on every backend: proptest against the reference (whole batches, merged splits
//! and running statistics), then the metamorphic properties.

use losskern::check::bnstats::{self as cases, BnRunningCase, BnStatsCase};
use losskern::check::{self, Case, Outcome};
use losskern::ops::bnstats::{self, BnStats, BnStatsOutput, Layout};
use losskern::{DType, Device, Tensor};
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

/// Shapes from the awkward sets (C = 1, 3, 37, 4097; H W = 1, 7x7, 61x59; N = 1), at most
/// 2^20 elements so that a case stays quick on a software adapter.
fn case() -> impl Strategy<Value = BnStatsCase> {
    let layout = prop::sample::select(vec![Layout::Nchw, Layout::Nhwc, Layout::Nc]);
    let dtype = prop::sample::select(vec![DType::F32, DType::F16, DType::BF16]);
    let n = prop::sample::select(vec![1usize, 2, 5, 17, 64]);
    let c = prop::sample::select(vec![1usize, 3, 8, 16, 37, 64, 4097]);
    let hw = prop::sample::select(vec![(1usize, 1usize), (2, 4), (7, 7), (61, 59)]);
    let offset = prop::sample::select(vec![0.0, 0.5, -300.0, 1e4]);
    (
        layout,
        dtype,
        n,
        c,
        hw,
        offset,
        any::<bool>(),
        1usize..=3,
        any::<u64>(),
    )
        .prop_map(
            |(layout, dtype, n, c, (h, w), offset, normalize, parts, seed)| {
                let (h, w) = if layout == Layout::Nc { (1, 1) } else { (h, w) };
                BnStatsCase {
                    n,
                    c,
                    h,
                    w,
                    layout,
                    dtype,
                    offset,
                    normalize,
                    parts: parts.min(n),
                    seed,
                }
            },
        )
        .prop_filter("at most 2^20 elements", |c| {
            c.n * c.c * c.h * c.w <= 1 << 20
        })
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: backends::proptest_cases(),
        ..ProptestConfig::default()
    })]

    #[test]
    fn bnstats_matches_the_reference_on_every_backend(case in case()) {
        for device in backends::all() {
            assert_matches_reference(&Case::BnStats(case.clone()), &device);
        }
    }

    #[test]
    fn running_stats_match_the_reference_on_every_backend(
        batch in case(),
        momentum in prop::option::of(0.0..=1.0f64),
    ) {
        let case = Case::BnRunning(BnRunningCase { batch, momentum });
        for device in backends::all() {
            assert_matches_reference(&case, &device);
        }
    }
}

#[test]
fn bnstats_handles_the_extreme_shapes() {
    let shape = |n, c, h, w, layout, dtype| BnStatsCase {
        n,
        c,
        h,
        w,
        layout,
        dtype,
        offset: 1e4,
        normalize: true,
        parts: 1,
        seed: 71,
    };
    let extremes = [
        // count = 1 per channel: unbiased variance NaN.
        shape(1, 5, 1, 1, Layout::Nchw, DType::F32),
        shape(1, 4097, 1, 1, Layout::Nc, DType::BF16),
        shape(3, 1, 61, 59, Layout::Nchw, DType::F16),
        shape(2, 1, 61, 59, Layout::Nhwc, DType::F32),
        shape(40, 37, 7, 7, Layout::Nhwc, DType::BF16),
        // One channel of 2^20 values: many tiles, merged in f32 on wgpu.
        shape(1024, 1, 32, 32, Layout::Nchw, DType::F32),
    ];
    for device in backends::all() {
        for case in &extremes {
            assert_matches_reference(&Case::BnStats(case.clone()), &device);
        }
    }
}

fn stats_of(device: &Device, x: &[f64], case: &BnStatsCase) -> Option<BnStatsOutput> {
    let x = Tensor::from_f64(device, x, &case.shape(), case.dtype).unwrap();
    match bnstats::bn_stats(&BnStats {
        x: &x,
        layout: case.layout,
        eps: 1e-5,
        normalize: None,
    }) {
        Ok(out) => Some(out),
        Err(losskern::Error::Unsupported { .. })
            if !device.backend().supports(losskern::Op::BnStats) =>
        {
            None
        }
        Err(e) => panic!("bn_stats on {}: {e}", device.name()),
    }
}

fn values(out: &BnStatsOutput) -> Vec<(&'static str, Vec<f64>)> {
    [
        ("mean", &out.mean),
        ("var_biased", &out.var_biased),
        ("var_unbiased", &out.var_unbiased),
        ("invstd", &out.invstd),
        ("m2", &out.m2),
    ]
    .into_iter()
    .map(|(name, t)| (name, t.to_f64_vec().unwrap()))
    .collect()
}

#[test]
fn two_runs_are_bitwise_equal() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let case = BnStatsCase {
            n: 9,
            c: 24,
            h: 17,
            w: 16,
            layout,
            dtype: DType::BF16,
            offset: 3.0,
            normalize: false,
            parts: 1,
            seed: 72,
        };
        let x = case.draw().unwrap().0.to_f64_vec().unwrap();
        for device in backends::all() {
            let Some(first) = stats_of(&device, &x, &case) else {
                continue;
            };
            let second = stats_of(&device, &x, &case).unwrap();
            let bits = |out: &BnStatsOutput| -> Vec<Vec<u64>> {
                values(out)
                    .into_iter()
                    .map(|(_, v)| v.iter().map(|x| x.to_bits()).collect())
                    .collect()
            };
            assert_eq!(
                bits(&first),
                bits(&second),
                "{layout:?} on {}",
                device.name()
            );
        }
    }
}

/// Permuting the batch (N) changes no statistic beyond twice its allowance: both runs are
/// within the allowance of the same reference values.
#[test]
fn permuting_the_batch_keeps_the_statistics() {
    for layout in [Layout::Nchw, Layout::Nhwc, Layout::Nc] {
        let case = BnStatsCase {
            n: 23,
            c: 19,
            h: if layout == Layout::Nc { 1 } else { 5 },
            w: if layout == Layout::Nc { 1 } else { 6 },
            layout,
            dtype: DType::F32,
            offset: -1e3,
            normalize: false,
            parts: 1,
            seed: 73,
        };
        let x = case.draw().unwrap().0.to_f64_vec().unwrap();
        let per_n = x.len() / case.n;
        let permuted: Vec<f64> = (0..case.n)
            .rev()
            .map(|k| (k * 7) % case.n)
            .flat_map(|k| x[k * per_n..(k + 1) * per_n].to_vec())
            .collect();
        let expected = cases::expected(&case).unwrap();
        for device in backends::all() {
            let Some(plain) = stats_of(&device, &x, &case) else {
                continue;
            };
            let shuffled = stats_of(&device, &permuted, &case).unwrap();
            for ((name, a), (_, b)) in values(&plain).into_iter().zip(values(&shuffled)) {
                let allowed = &expected.iter().find(|e| e.name == name).unwrap().allowed;
                for (i, (a, b)) in a.iter().zip(&b).enumerate() {
                    assert!(
                        (a - b).abs() <= 2.0 * allowed[i],
                        "{layout:?} {name}[{i}] on {}: {a} vs {b} permuted (allowed {})",
                        device.name(),
                        allowed[i]
                    );
                }
            }
        }
    }
}

/// A 1e4 offset on unit-variance f32 data keeps the variance to f32 accuracy: within
/// 1e-5 relative (about 170 u) of the f64 reference over 2^20 values per channel, in
/// every layout. One-pass E[x^2] - E[x]^2 in f32 would be off by about u 1e8, i.e. by
/// more than the variance itself.
#[test]
fn a_large_offset_keeps_the_variance_accurate() {
    for layout in [Layout::Nchw, Layout::Nhwc] {
        let case = BnStatsCase {
            n: 256,
            c: 4,
            h: 64,
            w: 64,
            layout,
            dtype: DType::F32,
            offset: 1e4,
            normalize: false,
            parts: 1,
            seed: 74,
        };
        let x = case.draw().unwrap().0.to_f64_vec().unwrap();
        let want = cases::expected(&case).unwrap();
        let want_var = &want.iter().find(|e| e.name == "var_biased").unwrap().want;
        for device in backends::all() {
            let Some(out) = stats_of(&device, &x, &case) else {
                continue;
            };
            let got = out.var_biased.to_f64_vec().unwrap();
            for (c, (g, w)) in got.iter().zip(want_var).enumerate() {
                let relative = (g - w).abs() / w;
                eprintln!(
                    "{layout:?} channel {c} on {}: relative var error {relative:e}",
                    device.name()
                );
                assert!(
                    relative <= 1e-5,
                    "{layout:?} channel {c} on {}: {g} vs {w}",
                    device.name()
                );
            }
        }
    }
}
