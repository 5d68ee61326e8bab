//! ensemble: the Loss-Cartography notebook's shapes. 81 MLPs 784-128-128-10 on one shared
//! batch (forward, both precisions, f32 and bf16), and a landscape of K = 7 directions x 11
//! doubling distances + the centre (78 models) in both perturbation modes, on every
//! backend present (CPU, CUDA, wgpu; wgpu's TensorCore rows run its Exact kernels). The GPUs
//! run the notebook's B = 60000; the CPU B = 600, a hundredth. Throughput is the bytes of the
//! inputs read once; the names carry the FLOPs (2 E B sum d_l d_{l+1}), so TFLOP/s is
//! that over the time.

mod harness;

use criterion::{criterion_group, criterion_main, BenchmarkGroup, Criterion};
use losskern::check::Rng;
use losskern::ops::ensemble::{self, Ensemble, Landscape, Perturbation, Precision};
use losskern::{DType, Device, Tensor};

const WIDTHS: [usize; 4] = [784, 128, 128, 10];
const MODELS: usize = 81;
const DIRECTIONS: usize = 7;
const DISTANCES: usize = 11;

type Group<'a> = BenchmarkGroup<'a, criterion::measurement::WallTime>;

/// Layers [lead.., out, in] and [lead.., out] in `dtype`.
fn layers(device: &Device, rng: &mut Rng, lead: &[usize], dtype: DType) -> Vec<(Tensor, Tensor)> {
    WIDTHS
        .windows(2)
        .map(|w| {
            let shape = |tail: &[usize]| [lead, tail].concat();
            let upload = |shape: Vec<usize>, scale: f64, rng: &mut Rng| {
                let len = shape.iter().product();
                Tensor::from_f64(device, &rng.normals(len, scale), &shape, dtype).expect("upload")
            };
            let scale = 1.0 / (w[0] as f64).sqrt();
            let weights = upload(shape(&[w[1], w[0]]), scale, rng);
            (weights, upload(shape(&[w[1]]), 0.1, rng))
        })
        .collect()
}

fn bytes_of(tensors: &[&Tensor]) -> u64 {
    tensors.iter().map(|t| t.byte_len() as u64).sum()
}

fn gflop(models: usize, batch: usize) -> f64 {
    let macs: usize = WIDTHS.windows(2).map(|w| w[0] * w[1]).sum();
    2.0 * (models * batch * macs) as f64 / 1e9
}

fn forward_benches(group: &mut Group<'_>, device: &Device, batch: usize, rng: &mut Rng) {
    for (dtype, precision) in [
        (DType::F32, Precision::Exact),
        (DType::F32, Precision::TensorCore),
        (DType::BF16, Precision::TensorCore),
    ] {
        let params = layers(device, rng, &[MODELS], dtype);
        let (w, b): (Vec<&Tensor>, Vec<&Tensor>) = params.iter().map(|(w, b)| (w, b)).unzip();
        let x = Tensor::from_f64(
            device,
            &rng.normals(batch * WIDTHS[0], 1.0),
            &[batch, WIDTHS[0]],
            dtype,
        )
        .expect("upload");
        let labels: Vec<i64> = (0..batch).map(|_| rng.below(10) as i64).collect();
        let y = Tensor::from_slice(device, &labels, &[batch]).expect("upload");
        let bytes = bytes_of(&w) + bytes_of(&b) + bytes_of(&[&x, &y]);
        harness::bench_op(
            group,
            device,
            &format!(
                "forward/{dtype}/{precision:?}/{MODELS}x784-128-128-10/B{batch}/{:.0}GFLOP",
                gflop(MODELS, batch)
            ),
            bytes,
            || {
                ensemble::forward(&Ensemble {
                    weights: &w,
                    biases: &b,
                    input: &x,
                    labels: &y,
                    logits: false,
                    precision,
                })
                .map(drop)
            },
        );
    }
}

fn landscape_benches(group: &mut Group<'_>, device: &Device, batch: usize, rng: &mut Rng) {
    let center = layers(device, rng, &[], DType::F32);
    let directions = layers(device, rng, &[DIRECTIONS], DType::F32);
    let (cw, cb): (Vec<&Tensor>, Vec<&Tensor>) = center.iter().map(|(w, b)| (w, b)).unzip();
    let (dw, db): (Vec<&Tensor>, Vec<&Tensor>) = directions.iter().map(|(w, b)| (w, b)).unzip();
    // Model 0 is the centre (t = 0); then 11 distances 1e-3 * 2^i on each direction.
    let mut k = vec![0i64];
    let mut t = vec![0.0f64];
    for direction in 0..DIRECTIONS {
        for i in 0..DISTANCES {
            k.push(direction as i64);
            t.push(1e-3 * f64::from(1u32 << i));
        }
    }
    let models = k.len();
    let k = Tensor::from_slice(device, &k, &[models]).expect("upload");
    let t = Tensor::from_f64(device, &t, &[models], DType::F32).expect("upload");
    let x = Tensor::from_f64(
        device,
        &rng.normals(batch * WIDTHS[0], 1.0),
        &[batch, WIDTHS[0]],
        DType::F32,
    )
    .expect("upload");
    let labels: Vec<i64> = (0..batch).map(|_| rng.below(10) as i64).collect();
    let y = Tensor::from_slice(device, &labels, &[batch]).expect("upload");
    let bytes = bytes_of(&cw) + bytes_of(&cb) + bytes_of(&dw) + bytes_of(&db) + bytes_of(&[&x]);
    for perturbation in [Perturbation::Rounded, Perturbation::Split] {
        harness::bench_op(
            group,
            device,
            &format!(
                "landscape/f32/{perturbation:?}/K{DIRECTIONS}x{DISTANCES}+1/B{batch}/{:.0}GFLOP",
                gflop(models, batch)
            ),
            bytes,
            || {
                ensemble::landscape(&Landscape {
                    center_weights: &cw,
                    center_biases: &cb,
                    direction_weights: &dw,
                    direction_biases: &db,
                    direction_of: &k,
                    distance: &t,
                    input: &x,
                    labels: &y,
                    logits: false,
                    precision: Precision::Exact,
                    perturbation,
                })
                .map(drop)
            },
        );
    }
}

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("ensemble");
    harness::configure(&mut group);
    let mut rng = Rng::new(3);
    for device in harness::devices() {
        let batch = if device == Device::Cpu { 600 } else { 60000 };
        forward_benches(&mut group, &device, batch, &mut rng);
        landscape_benches(&mut group, &device, batch, &mut rng);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
