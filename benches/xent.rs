//! xent through the Tensor API: forward (every output but the gradient; one read of the
//! logits) and forward + gradient (one read, one write). `losskern bench --device cuda`
//! times the zero-copy CUDA entry, the kernels alone.

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::{xent::rotated_logits, Rng};
use losskern::ops::xent::{self, Targets, Xent, XentOptions};
use losskern::{DType, Device, Tensor};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("xent");
    harness::configure(&mut group);
    for device in harness::devices() {
        // The CPU: the 4096 x 32000 f32 headline only (a second per call on 2 cores).
        let (shapes, dtypes): (&[(usize, usize)], &[DType]) = if device == Device::Cpu {
            (&[(4096, 32000)], &[DType::F32])
        } else {
            (
                &[(4096, 32000), (8192, 128_256), (32768, 50257)],
                &[DType::BF16, DType::F32],
            )
        };
        for &(b, v) in shapes {
            for &dtype in dtypes {
                let made = rotated_logits(&device, b, v, dtype).and_then(|logits| {
                    let labels: Vec<i64> = {
                        let mut rng = Rng::new(11);
                        (0..b).map(|_| rng.below(v) as i64).collect()
                    };
                    Ok((logits, Tensor::from_slice(&device, &labels, &[b])?))
                });
                let (logits, targets) = match made {
                    Ok(inputs) => inputs,
                    Err(e) => {
                        eprintln!("bench xent {b}x{v} {dtype} on {}: {e}", device.name());
                        continue;
                    }
                };
                for grad in [false, true] {
                    let call = Xent {
                        options: XentOptions {
                            grad,
                            ..XentOptions::default()
                        },
                        ..Xent::new(&logits, Targets::Classes(&targets))
                    };
                    let logits_bytes = (b * v * dtype.size()) as u64;
                    let bytes = if grad { 2 * logits_bytes } else { logits_bytes };
                    let name = format!("{}/{dtype}/{b}x{v}", if grad { "fwd+grad" } else { "fwd" });
                    harness::bench_op(&mut group, &device, &name, bytes, || {
                        xent::xent(&call).map(drop)
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
