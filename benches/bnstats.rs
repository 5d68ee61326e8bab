//! bnstats: per-channel statistics of NCHW and NHWC activations (f32 and bf16), and the
//! statistics with the fused normalisation (bytes: x read twice, y written once).

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::Rng;
use losskern::ops::bnstats::{self, Affine, BnStats, Layout};
use losskern::{DType, Tensor};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("bnstats");
    harness::configure(&mut group);
    let mut rng = Rng::new(9);
    for device in harness::devices() {
        for (layout, shape, dtype, normalize, name) in [
            (
                Layout::Nchw,
                [32usize, 64, 28, 28],
                DType::F32,
                false,
                "stats/f32/nchw-32x64x28x28",
            ),
            (
                Layout::Nhwc,
                [32usize, 28, 28, 64],
                DType::F32,
                false,
                "stats/f32/nhwc-32x28x28x64",
            ),
            (
                Layout::Nhwc,
                [32usize, 7, 7, 2048],
                DType::BF16,
                false,
                "stats/bf16/nhwc-32x7x7x2048",
            ),
            (
                Layout::Nchw,
                [32usize, 64, 28, 28],
                DType::BF16,
                true,
                "normalize/bf16/nchw-32x64x28x28",
            ),
        ] {
            let x = Tensor::from_f64(
                &device,
                &rng.normals(shape.iter().product(), 1.0),
                &shape,
                dtype,
            )
            .expect("upload");
            let passes = if normalize { 3 } else { 1 };
            let bytes = passes * x.byte_len() as u64;
            harness::bench_op(&mut group, &device, name, bytes, || {
                bnstats::bn_stats(&BnStats {
                    x: &x,
                    layout,
                    eps: 1e-5,
                    normalize: normalize.then(Affine::default),
                })
                .map(drop)
            });
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
