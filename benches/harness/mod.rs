//! Shared by every bench: the devices to time, and one timing loop that synchronises the
//! device, so a GPU's queued work is inside the measurement.

use std::time::{Duration, Instant};

use criterion::{BenchmarkGroup, Throughput};
use losskern::Device;

/// The CPU (unless LOSSKERN_BENCH_GPU_ONLY=1) and every present GPU backend.
pub fn devices() -> Vec<Device> {
    let gpu_only = std::env::var("LOSSKERN_BENCH_GPU_ONLY").is_ok_and(|v| v == "1");
    let mut devices = Vec::new();
    if !gpu_only {
        devices.push(Device::Cpu);
    }
    for (name, device) in [("CUDA", Device::cuda(0)), ("wgpu", Device::wgpu())] {
        match device {
            Ok(d) => devices.push(d),
            Err(e) => eprintln!("bench: no {name} backend: {e}"),
        }
    }
    devices
}

/// Short runs: the GPU lease is minutes long and every shape is timed on every backend.
pub fn configure<M: criterion::measurement::Measurement>(group: &mut BenchmarkGroup<'_, M>) {
    group.sample_size(10);
    group.warm_up_time(Duration::from_secs(1));
    group.measurement_time(Duration::from_secs(2));
}

/// Times `op` as `{backend}/{name}` with `bytes` of memory traffic per call. The op is run
/// once untimed first (compilation, pipeline creation); an op the backend does not support
/// is skipped with a note rather than timed.
pub fn bench_op<M: criterion::measurement::Measurement<Value = Duration>>(
    group: &mut BenchmarkGroup<'_, M>,
    device: &Device,
    name: &str,
    bytes: u64,
    mut op: impl FnMut() -> losskern::Result<()>,
) {
    if let Err(e) = op().and_then(|()| device.synchronize()) {
        eprintln!("bench {}/{name}: skipped: {e}", device.backend());
        return;
    }
    group.throughput(Throughput::Bytes(bytes));
    group.bench_function(format!("{}/{name}", device.backend()), |b| {
        b.iter_custom(|iters| {
            let start = Instant::now();
            for _ in 0..iters {
                op().expect("op failed after a successful warm-up");
            }
            device.synchronize().expect("device synchronize failed");
            start.elapsed()
        })
    });
}
