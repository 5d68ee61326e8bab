//! `losskern bench`: a quick benchmark of xent at one LLM-like shape (not the criterion
//! benches).

use std::time::{Duration, Instant};

use clap::Args;
use losskern::check;
use losskern::ops::xent::{self, Targets, Xent, XentOptions};
use losskern::{Backend, DType, Device, Tensor};

use crate::json::Json;
use crate::{DTypeArg, DeviceChoice, Failure};

#[derive(Args)]
pub struct BenchArgs {
    #[arg(long, value_enum, default_value_t = DeviceChoice::Best)]
    device: DeviceChoice,
    /// The logits' dtype [default: bf16 on a GPU, f32 on the CPU]
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// B x V [default: 4096x32000 on a GPU, 256x32000 on the CPU]
    #[arg(long, value_name = "BxV", value_parser = parse_shape)]
    shape: Option<Shape>,
    /// Also compute the gradient
    #[arg(long)]
    grad: bool,
    /// Print one JSON line (benches/peers reads it)
    #[arg(long)]
    json: bool,
}

/// The benchmarked logits' shape.
#[derive(Clone, Copy)]
pub struct Shape {
    batch: usize,
    classes: usize,
}

fn parse_shape(text: &str) -> Result<Shape, String> {
    let (batch, classes) = text
        .split_once('x')
        .and_then(|(b, v)| Some((b.parse().ok()?, v.parse().ok()?)))
        .ok_or_else(|| format!("'{text}' is not BxV"))?;
    if batch == 0 || classes == 0 {
        return Err(format!("'{text}': needs B >= 1 and V >= 1"));
    }
    Ok(Shape { batch, classes })
}

pub fn bench_command(args: &BenchArgs) -> Result<(), Failure> {
    bench(
        &args.device.open()?,
        args.dtype.map(DType::from),
        args.shape,
        args.grad,
        args.json,
    )
}

/// Milliseconds per call of `op`: the median over batches of back-to-back calls, each
/// batch ended by `sync`, so a GPU's launch latency is amortised as in a training loop.
/// Runs for about two seconds after one untimed call (compilation, pipelines).
fn time_calls(
    mut op: impl FnMut() -> losskern::Result<()>,
    sync: impl Fn() -> losskern::Result<()>,
) -> losskern::Result<Vec<f64>> {
    op()?;
    sync()?;
    let probe = Instant::now();
    op()?;
    sync()?;
    let once = probe.elapsed().as_secs_f64();
    let per_batch = ((0.02 / once.max(1e-6)) as usize).clamp(1, 100);
    let start = Instant::now();
    let mut times = Vec::new();
    while times.len() < 200 && (times.len() < 3 || start.elapsed() < Duration::from_secs(2)) {
        let t = Instant::now();
        for _ in 0..per_batch {
            op()?;
        }
        sync()?;
        times.push(t.elapsed().as_secs_f64() * 1e3 / per_batch as f64);
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// Times `call` through the zero-copy CUDA entry with reused output buffers.
#[cfg(feature = "cuda")]
fn time_cuda_raw(device: &Device, call: &Xent<'_>) -> Result<Option<Vec<f64>>, Failure> {
    use losskern::cuda::xent::{xent_raw, XentBuffers, XentInputs, XentTargets};
    let (Device::Cuda(backend), Targets::Classes(targets)) = (device, call.targets) else {
        return Ok(None);
    };
    let (Some(logits), Some(targets)) = (call.logits.cuda_slice(), targets.cuda_slice()) else {
        return Ok(None);
    };
    let spec = xent::validate(call)?;
    let stream = backend.stream();
    let mut buffers = XentBuffers::new(stream, &spec)?;
    let inputs = XentInputs {
        logits: logits.as_view(),
        targets: XentTargets::Classes(targets.as_view()),
        class_weights: None,
    };
    let times = time_calls(
        || xent_raw(stream, &spec, &inputs, &mut buffers),
        || device.synchronize(),
    )?;
    Ok(Some(times))
}

/// Benchmarks xent on `device`; the shape and dtype default by backend.
pub fn bench(
    device: &Device,
    dtype: Option<DType>,
    shape: Option<Shape>,
    grad: bool,
    json: bool,
) -> Result<(), Failure> {
    let (default_shape, default_dtype) = match device.backend() {
        Backend::Cpu => ((256, 32000), DType::F32),
        Backend::Cuda | Backend::Wgpu => ((4096, 32000), DType::BF16),
    };
    let (batch, classes) = shape.map_or(default_shape, |s| (s.batch, s.classes));
    let dtype = dtype.unwrap_or(default_dtype);
    eprintln!(
        "bench: timing xent {batch} x {classes} {dtype} on {} (a few seconds) ...",
        device.name()
    );
    // Rotated copies of 64 random rows: random data, made quickly at any size.
    let logits = check::xent::rotated_logits(device, batch, classes, dtype)?;
    let mut rng = check::Rng::new(7);
    let targets: Vec<i64> = (0..batch).map(|_| rng.below(classes) as i64).collect();
    let targets = Tensor::from_slice(device, &targets, &[batch])?;
    let options = XentOptions {
        grad,
        ..XentOptions::default()
    };
    let call = Xent {
        options,
        ..Xent::new(&logits, Targets::Classes(&targets))
    };
    let tensor = time_calls(|| xent::xent(&call).map(drop), || device.synchronize())?;
    #[cfg(feature = "cuda")]
    let raw = time_cuda_raw(device, &call)?;
    #[cfg(not(feature = "cuda"))]
    let raw: Option<Vec<f64>> = None;
    let logits_bytes = (batch * classes * dtype.size()) as f64;
    let timing = Timing {
        bytes: if grad {
            2.0 * logits_bytes
        } else {
            logits_bytes
        },
        tensor,
        raw,
    };
    if json {
        let kernels = timing.kernels();
        println!(
            "{}",
            Json::object([
                ("op", Json::Str("xent".into())),
                ("device", Json::Str(device.name())),
                ("shape", Json::shape(&[batch, classes])),
                ("dtype", Json::Str(dtype.name().into())),
                ("grad", Json::Bool(grad)),
                ("bytes", Json::Num(timing.bytes)),
                ("median_ms", Json::Num(median(kernels))),
                ("best_ms", Json::Num(kernels[0])),
                ("gb_per_s", Json::Num(timing.gbps(median(kernels)))),
                ("zero_copy", Json::Bool(timing.raw.is_some())),
                ("tensor_median_ms", Json::Num(median(&timing.tensor))),
            ])
        );
        return Ok(());
    }
    let what = if grad { "forward + grad" } else { "forward" };
    println!(
        "\nbench: xent {what}, {batch} x {classes} {dtype}, on {} ({:.1} MB counted)",
        device.name(),
        timing.bytes / 1e6
    );
    timing.print();
    Ok(())
}

/// The sorted times of one benchmark, in ms per call.
struct Timing {
    /// The bytes one call moves, as GB/s counts them.
    bytes: f64,
    /// The Tensor call.
    tensor: Vec<f64>,
    /// The zero-copy CUDA entry, where there is one.
    raw: Option<Vec<f64>>,
}

impl Timing {
    /// The kernels alone: the zero-copy entry where there is one.
    fn kernels(&self) -> &[f64] {
        self.raw.as_deref().unwrap_or(&self.tensor)
    }

    fn gbps(&self, ms: f64) -> f64 {
        self.bytes / (ms * 1e-3) / 1e9
    }

    fn print(&self) {
        let mut rows = vec![("Tensor call", &self.tensor)];
        if let Some(raw) = &self.raw {
            rows.push(("zero-copy entry", raw));
        }
        for (label, times) in rows {
            println!(
                "  {label:<16} {} batches: median {:.3} ms, best {:.3} ms, {:.1} GB/s at the median",
                times.len(),
                median(times),
                times[0],
                self.gbps(median(times))
            );
        }
    }
}

fn median(times: &[f64]) -> f64 {
    times[times.len() / 2]
}
