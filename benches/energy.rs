//! energy: engression loss with gradient, and the two-sample energy distance, at the
//! shapes of issue 8 (engression's n=1024 m=16 d=100 and n=16384 m=64 d=16, a large-m
//! sample, N=M=16384 d=64 with and without the gradient, and the d=3 N=M=10^5 pair-rate
//! case) and a CPU-sized N=M=2048 d=64. Throughput is the input bytes read once (and the
//! gradient written once); the pair counts are in the names, so pairs/s is pairs over the
//! time. The CPU is timed only where a call stays under about 10^9 distance coordinates (a
//! fraction of a second to a few seconds on 2 cores).

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::Rng;
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::{DType, Device, Tensor};

/// The CPU takes seconds past this many distance coordinates.
const CPU_WORK: usize = 1_000_000_000;

fn upload(device: &Device, rng: &mut Rng, shape: &[usize]) -> Tensor {
    let len = shape.iter().product();
    Tensor::from_f64(device, &rng.normals(len, 1.0), shape, DType::F32).expect("upload")
}

fn score_benches(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    device: &Device,
    rng: &mut Rng,
) {
    for (n, m, d, grad) in [
        (1024usize, 16usize, 100usize, true),
        (16384, 64, 16, true),
        (16384, 64, 16, false),
        (65536, 64, 16, true),
        (8, 512, 64, true),
    ] {
        if *device == Device::Cpu && n * m * m * d > CPU_WORK {
            continue;
        }
        let y = upload(device, rng, &[n, d]);
        let preds = upload(device, rng, &[n, m, d]);
        let grad_bytes = if grad { preds.byte_len() } else { 0 };
        let bytes = (y.byte_len() + preds.byte_len() + grad_bytes) as u64;
        let what = if grad { "score+grad" } else { "score" };
        harness::bench_op(
            group,
            device,
            &format!("{what}/f32/n{n}-m{m}-d{d}"),
            bytes,
            || {
                energy::energy_score(&EnergyScore {
                    y: &y,
                    preds: &preds,
                    beta: 1.0,
                    grad,
                })
                .map(drop)
            },
        );
    }
}

fn distance_benches(
    group: &mut criterion::BenchmarkGroup<'_, criterion::measurement::WallTime>,
    device: &Device,
    rng: &mut Rng,
) {
    for (n, m, d, grad) in [
        (2048usize, 2048usize, 64usize, false),
        (16384, 16384, 64, false),
        (16384, 16384, 64, true),
        (100_000, 100_000, 3, false),
    ] {
        if *device == Device::Cpu && n * m * d > CPU_WORK {
            continue;
        }
        let x = upload(device, rng, &[n, d]);
        let y = upload(device, rng, &[m, d]);
        // xy pairs plus the i < j pairs of each set.
        let pairs = n * m + n * (n - 1) / 2 + m * (m - 1) / 2;
        // The gradient is written once: as many bytes as the inputs in f32.
        let io = (x.byte_len() + y.byte_len()) as u64;
        let bytes = if grad { 2 * io } else { io };
        let what = if grad { "distance+grad" } else { "distance" };
        harness::bench_op(
            group,
            device,
            &format!("{what}/f32/N{n}-M{m}-d{d}-pairs{pairs}"),
            bytes,
            || {
                energy::energy_distance(&EnergyDistance {
                    x: &x,
                    y: &y,
                    weights_x: None,
                    weights_y: None,
                    beta: 1.0,
                    statistic: Statistic::V,
                    grad,
                })
                .map(drop)
            },
        );
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("energy");
    harness::configure(&mut group);
    let mut rng = Rng::new(5);
    for device in harness::devices() {
        score_benches(&mut group, &device, &mut rng);
        distance_benches(&mut group, &device, &mut rng);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
