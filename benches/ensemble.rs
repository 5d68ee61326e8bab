//! ensemble: E MLPs on one shared batch with the fused per-model loss.

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::Rng;
use losskern::ops::ensemble::{self, Ensemble, Precision};
use losskern::{DType, Tensor};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ensemble");
    harness::configure(&mut group);
    // The Loss-Cartography MLP (784-128-128-10), 16 models on a batch of 64: the CPU
    // reference takes seconds at the notebook's 81 models.
    let (models, batch, widths) = (16usize, 64usize, [784usize, 128, 128, 10]);
    let mut rng = Rng::new(3);
    for device in harness::devices() {
        let layer = |rng: &mut Rng, shape: &[usize]| {
            Tensor::from_f64(
                &device,
                &rng.normals(shape.iter().product(), 0.05),
                shape,
                DType::F32,
            )
        };
        let mut weights = Vec::new();
        let mut biases = Vec::new();
        for pair in widths.windows(2) {
            weights.push(layer(&mut rng, &[models, pair[1], pair[0]]).expect("upload"));
            biases.push(layer(&mut rng, &[models, pair[1]]).expect("upload"));
        }
        let x = layer(&mut rng, &[batch, widths[0]]).expect("upload");
        let labels: Vec<i64> = (0..batch).map(|_| rng.below(10) as i64).collect();
        let y = Tensor::from_slice(&device, &labels, &[batch]).expect("upload");
        let (w, b): (Vec<&Tensor>, Vec<&Tensor>) =
            (weights.iter().collect(), biases.iter().collect());
        let bytes = (weights
            .iter()
            .chain(&biases)
            .map(Tensor::byte_len)
            .sum::<usize>()
            + x.byte_len()) as u64;
        harness::bench_op(
            &mut group,
            &device,
            "forward/f32/16x784-128-128-10/B64",
            bytes,
            || {
                ensemble::forward(&Ensemble {
                    weights: &w,
                    biases: &b,
                    input: &x,
                    labels: &y,
                    logits: false,
                    precision: Precision::Exact,
                })
                .map(drop)
            },
        );
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
