//! bnstats: per-channel statistics of an NCHW and an NHWC activation.

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::Rng;
use losskern::ops::bnstats::{self, BnStats, Layout};
use losskern::{DType, Tensor};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("bnstats");
    harness::configure(&mut group);
    let mut rng = Rng::new(9);
    for device in harness::devices() {
        for (layout, shape, name) in [
            (
                Layout::Nchw,
                [32usize, 64, 28, 28],
                "stats/f32/nchw-32x64x28x28",
            ),
            (
                Layout::Nhwc,
                [32usize, 28, 28, 64],
                "stats/f32/nhwc-32x28x28x64",
            ),
        ] {
            let x = Tensor::from_f64(
                &device,
                &rng.normals(shape.iter().product(), 1.0),
                &shape,
                DType::F32,
            )
            .expect("upload");
            harness::bench_op(&mut group, &device, name, x.byte_len() as u64, || {
                bnstats::bn_stats(&BnStats {
                    x: &x,
                    layout,
                    eps: 1e-5,
                    normalize: None,
                })
                .map(drop)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
