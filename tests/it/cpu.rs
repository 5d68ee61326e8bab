//! The native CPU backend cuts its work into chunks fixed by the shape: every op gives
//! bitwise the same outputs on 1 and on 4 threads, on cases big enough to make many
//! chunks (and on every check case), and those outputs still match the reference.

use losskern::check::bnstats::BnStatsCase;
use losskern::check::energy::{EnergyDistanceCase, EnergyScoreCase};
use losskern::check::xent::XentCase;
use losskern::check::{self, Case, Outcome, Output};
use losskern::ops::bnstats::Layout;
use losskern::ops::energy::Statistic;
use losskern::ops::xent::{Reduction, RhoReduce};
use losskern::{DType, Device};

/// Every output of `case` on the CPU, run in a pool of `threads` threads, as bits.
fn bits_on(case: &Case, threads: usize) -> Vec<(&'static str, Vec<u64>)> {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .build()
        .expect("a rayon pool");
    let outputs: Vec<Output> = pool
        .install(|| check::outputs(case, &Device::Cpu))
        .unwrap_or_else(|e| panic!("{:?} on {threads} threads: {e}", case.info()));
    outputs
        .into_iter()
        .map(|o| (o.name, o.values.iter().map(|v| v.to_bits()).collect()))
        .collect()
}

/// Problems of every CPU op past one chunk of parallel work (2^16 elements), so that the
/// threads split them differently.
fn multi_chunk_cases() -> Vec<Case> {
    let mut xent = XentCase::new(41, 5003, DType::F32, 101);
    xent.class_weights = true;
    xent.ignored_fraction = 0.2;
    xent.options.label_smoothing = 0.05;
    xent.options.grad = true;
    xent.options.radius.reduce = RhoReduce::Mean;
    let mut soft = XentCase::new(37, 4099, DType::BF16, 102);
    soft.soft_targets = true;
    soft.options.grad = true;
    soft.options.reduction = Reduction::Sum;
    let bn = |n, c, h, w, layout, dtype, parts, seed| BnStatsCase {
        n,
        c,
        h,
        w,
        layout,
        dtype,
        offset: 100.0,
        normalize: parts == 1,
        parts,
        seed,
    };
    let score = |n, m, d, dtype, beta, seed| EnergyScoreCase {
        n,
        m,
        d,
        dtype,
        beta,
        grad: true,
        coincide: true,
        offset: 0.0,
        scale: 1.0,
        seed,
    };
    let distance = |n, m, d, weighted, statistic, seed| EnergyDistanceCase {
        n,
        m,
        d,
        dtype: DType::F32,
        weighted,
        beta: 1.0,
        statistic,
        grad: true,
        offset: 0.0,
        scale: 1.0,
        seed,
    };
    vec![
        Case::Xent(xent),
        Case::Xent(soft),
        Case::BnStats(bn(7, 3, 120, 130, Layout::Nchw, DType::F32, 1, 103)),
        Case::BnStats(bn(5, 24, 60, 61, Layout::Nhwc, DType::F16, 1, 104)),
        Case::BnStats(bn(70_000, 3, 1, 1, Layout::Nc, DType::F32, 1, 105)),
        Case::BnStats(bn(8, 16, 40, 40, Layout::Nchw, DType::BF16, 4, 106)),
        Case::EnergyScore(score(70, 16, 20, DType::F32, 1.0, 107)),
        Case::EnergyScore(score(30, 40, 9, DType::BF16, 1.5, 108)),
        Case::EnergyDistance(distance(300, 250, 5, false, Statistic::V, 109)),
        Case::EnergyDistance(distance(260, 130, 7, true, Statistic::U, 110)),
    ]
}

#[test]
fn every_cpu_op_gives_the_same_bits_on_1_and_4_threads() {
    losskern::device::poison_outputs(true);
    let cases: Vec<Case> = multi_chunk_cases()
        .into_iter()
        .chain(check::cases())
        .collect();
    for case in &cases {
        let one = bits_on(case, 1);
        let four = bits_on(case, 4);
        assert_eq!(one.len(), four.len(), "{:?}", case.info());
        for ((name, a), (_, b)) in one.iter().zip(&four) {
            let differ = a.iter().zip(b).filter(|(x, y)| x != y).count();
            assert!(
                differ == 0 && a.len() == b.len(),
                "{:?}: {name} differs in {differ} of {} elements between 1 and 4 threads",
                case.info(),
                a.len()
            );
        }
    }
}

#[test]
fn the_multi_chunk_cases_match_the_reference_on_the_cpu() {
    losskern::device::poison_outputs(true);
    for case in multi_chunk_cases() {
        let report = check::run(&case, &Device::Cpu);
        assert_eq!(
            report.outcome,
            Outcome::Pass,
            "{} {} {}",
            report.op,
            report.dtype,
            report.shape
        );
    }
}
