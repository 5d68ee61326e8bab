//! energy: engression loss with gradient, and the two-sample energy distance.

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::Rng;
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::{DType, Tensor};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("energy");
    harness::configure(&mut group);
    let mut rng = Rng::new(5);
    for device in harness::devices() {
        let (n, m, d) = (256usize, 16usize, 32usize);
        let y = Tensor::from_f64(&device, &rng.normals(n * d, 1.0), &[n, d], DType::F32)
            .expect("upload");
        let preds = Tensor::from_f64(
            &device,
            &rng.normals(n * m * d, 1.0),
            &[n, m, d],
            DType::F32,
        )
        .expect("upload");
        let bytes = (y.byte_len() + 2 * preds.byte_len()) as u64;
        harness::bench_op(
            &mut group,
            &device,
            "score+grad/f32/n256-m16-d32",
            bytes,
            || {
                energy::energy_score(&EnergyScore {
                    y: &y,
                    preds: &preds,
                    beta: 1.0,
                    grad: true,
                })
                .map(drop)
            },
        );
        let (nx, ny) = (1024usize, 1024usize);
        let x = Tensor::from_f64(&device, &rng.normals(nx * d, 1.0), &[nx, d], DType::F32)
            .expect("upload");
        let y2 = Tensor::from_f64(&device, &rng.normals(ny * d, 1.0), &[ny, d], DType::F32)
            .expect("upload");
        let bytes = (x.byte_len() + y2.byte_len()) as u64;
        harness::bench_op(
            &mut group,
            &device,
            "distance/f32/1024x1024-d32",
            bytes,
            || {
                energy::energy_distance(&EnergyDistance {
                    x: &x,
                    y: &y2,
                    weights_x: None,
                    weights_y: None,
                    beta: 1.0,
                    statistic: Statistic::V,
                })
                .map(drop)
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
