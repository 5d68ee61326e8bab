//! xent: forward (one read of the logits) and forward + gradient (one read, one write).

mod harness;

use criterion::{criterion_group, criterion_main, Criterion};
use losskern::check::xent::{XentCase, XentInputs};
use losskern::ops::xent;
use losskern::{DType, Device};

fn bench(c: &mut Criterion) {
    let mut group = c.benchmark_group("xent");
    group.sample_size(10);
    for device in harness::devices() {
        let shapes: &[(usize, usize)] = if device == Device::Cpu {
            &[(64, 32000)]
        } else {
            &[(4096, 32000), (8192, 128_256), (32768, 50257)]
        };
        for &(b, v) in shapes {
            for dtype in [DType::BF16, DType::F32] {
                for grad in [false, true] {
                    let mut case = XentCase::new(b, v, dtype, 7);
                    case.options.grad = grad;
                    let inputs = match XentInputs::draw(&case, &device) {
                        Ok(inputs) => inputs,
                        Err(e) => {
                            eprintln!("bench xent {b}x{v} {dtype} on {}: {e}", device.name());
                            continue;
                        }
                    };
                    let logits = (b * v * dtype.size()) as u64;
                    let bytes = if grad { 2 * logits } else { logits };
                    let name = format!("{}/{dtype}/{b}x{v}", if grad { "fwd+grad" } else { "fwd" });
                    harness::bench_op(&mut group, &device, &name, bytes, || {
                        xent::xent(&inputs.call(&case)).map(drop)
                    });
                }
            }
        }
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
