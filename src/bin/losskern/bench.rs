//! `losskern bench`: a quick benchmark of one op at one shape (not the criterion benches):
//! xent at an LLM-like shape, bnstats at an activation's shape, or an ensemble forward or
//! landscape scan at the Loss-Cartography notebook's shapes.

use std::time::{Duration, Instant};

use clap::{Args, ValueEnum};
use losskern::check;
use losskern::ops::bnstats::{self, Affine, BnStats, Layout};
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::ops::xent::{self, Targets, Xent, XentOptions};
use losskern::{Backend, DType, Device, Tensor};

use crate::bnstats::LayoutArg;
use crate::ensemble::{bench_ensemble, PerturbationArg, PrecisionArg};
use crate::json::Json;
use crate::{DTypeArg, DeviceChoice, Failure};

#[derive(Args)]
pub struct BenchArgs {
    /// The op to time
    #[arg(long, value_enum, default_value_t = BenchOp::Xent)]
    op: BenchOp,
    #[arg(long, value_enum, default_value_t = DeviceChoice::Best)]
    device: DeviceChoice,
    /// The input's dtype [default: bf16 on a GPU, f32 on the CPU]
    #[arg(long, value_enum)]
    dtype: Option<DTypeArg>,
    /// xent: B x V [default: 4096x32000];
    /// bnstats: N x C x H x W or N x C, whatever the layout [default: 32x64x28x28];
    /// energy-score: n x m x d [default: 1024x16x100]; energy-distance: N x M x d
    /// [default: 4096x4096x64];
    /// ensemble: E x B x d0 x .. x dL [default: 81x60000x784x128x128x10, B = 600 on the CPU];
    /// landscape: K x distances x B x d0 x .. x dL [default: 7x11x60000x784x128x128x10]
    #[arg(long, value_name = "AxBx...", value_parser = parse_shape)]
    shape: Option<Dims>,
    /// xent, energy-score, energy-distance: also compute the gradient
    #[arg(long)]
    grad: bool,
    /// bnstats: the memory layout of x
    #[arg(long, value_enum, default_value_t = LayoutArg::Nchw)]
    layout: LayoutArg,
    /// bnstats: also write the normalised y
    #[arg(long)]
    normalize: bool,
    /// ensemble, landscape: the layers' arithmetic
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    precision: PrecisionArg,
    /// landscape: how centre + t * direction is formed
    #[arg(long, value_enum, default_value_t = PerturbationArg::Split)]
    perturbation: PerturbationArg,
    /// Print one JSON line (benches/peers reads it)
    #[arg(long)]
    json: bool,
}

#[derive(Clone, Copy, PartialEq, Eq, ValueEnum)]
enum BenchOp {
    Xent,
    Bnstats,
    Ensemble,
    Landscape,
    /// The energy score (engression loss) of preds n x m x d (`--grad` adds its gradient)
    EnergyScore,
    /// The two-sample energy distance of X [N, d] and Y [M, d], shape N x M x d
    EnergyDistance,
}

/// A shape given as `AxBx...`: one value for clap (a bare Vec would be read as a list).
#[derive(Clone, Debug)]
struct Dims(Vec<usize>);

fn parse_shape(text: &str) -> Result<Dims, String> {
    let dims: Option<Vec<usize>> = text.split('x').map(|d| d.parse().ok()).collect();
    match dims {
        Some(dims) if !dims.is_empty() && dims.iter().all(|&d| d > 0) => Ok(Dims(dims)),
        _ => Err(format!(
            "'{text}' is not a shape of positive sizes like 8x128"
        )),
    }
}

pub fn bench_command(args: &BenchArgs) -> Result<(), Failure> {
    let device = args.device.open()?;
    let dtype = args.dtype.map(DType::from);
    match args.op {
        BenchOp::Xent => {
            let shape = match args.shape.as_ref().map(|d| d.0.as_slice()) {
                None => None,
                Some(&[batch, classes]) => Some((batch, classes)),
                Some(other) => {
                    return Err(Failure::Usage(format!(
                        "xent takes a B x V shape, not {other:?}"
                    )))
                }
            };
            bench(&device, dtype, shape, args.grad, args.json)
        }
        BenchOp::Bnstats => bench_bnstats(&device, dtype, args),
        BenchOp::Ensemble | BenchOp::Landscape => bench_ensemble(
            &device,
            dtype.unwrap_or(DType::F32),
            args.shape.as_ref().map(|d| d.0.as_slice()),
            args.precision.into(),
            (args.op == BenchOp::Landscape).then(|| args.perturbation.into()),
            args.json,
        ),
        BenchOp::EnergyScore | BenchOp::EnergyDistance => bench_energy(&device, dtype, args),
    }
}

/// The input dtype when none is given: bf16 on a GPU, f32 on the CPU.
fn default_dtype(device: &Device) -> DType {
    match device.backend() {
        Backend::Cpu => DType::F32,
        Backend::Cuda | Backend::Wgpu => DType::BF16,
    }
}

/// Milliseconds per call of `op`: the median over batches of back-to-back calls, each
/// batch ended by `sync`, so a GPU's launch latency is amortised as in a training loop.
/// Runs for about two seconds after one untimed call (compilation, pipelines).
pub(crate) fn time_calls(
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
    shape: Option<(usize, usize)>,
    grad: bool,
    json: bool,
) -> Result<(), Failure> {
    let (batch, classes) = shape.unwrap_or((4096, 32000));
    let dtype = dtype.unwrap_or_else(|| default_dtype(device));
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

    /// One JSON line of `fields` with the bytes and the Tensor call's times, or `title`
    /// and the table of [`Timing::print`].
    fn report(&self, json: bool, mut fields: Vec<(&'static str, Json)>, title: &str) {
        if json {
            let median_ms = median(&self.tensor);
            fields.extend([
                ("bytes", Json::Num(self.bytes)),
                ("median_ms", Json::Num(median_ms)),
                ("best_ms", Json::Num(self.tensor[0])),
                ("gb_per_s", Json::Num(self.gbps(median_ms))),
            ]);
            println!("{}", Json::object(fields));
            return;
        }
        println!("\nbench: {title} ({:.1} MB counted)", self.bytes / 1e6);
        self.print();
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

pub(crate) fn median(times: &[f64]) -> f64 {
    times[times.len() / 2]
}

/// Benchmarks bnstats on `device`: x of the given N x C x H x W (or N x C) in the layout;
/// bytes counted: x read once, plus x read and y written with `normalize`.
fn bench_bnstats(device: &Device, dtype: Option<DType>, args: &BenchArgs) -> Result<(), Failure> {
    let layout = Layout::from(args.layout);
    let dims = args
        .shape
        .as_ref()
        .map_or_else(|| vec![32, 64, 28, 28], |d| d.0.clone());
    let shape = match (layout, dims.as_slice()) {
        (Layout::Nchw, &[n, c, h, w]) => vec![n, c, h, w],
        (Layout::Nhwc, &[n, c, h, w]) => vec![n, h, w, c],
        (Layout::Nc, &[n, c]) => vec![n, c],
        _ => {
            return Err(Failure::Usage(format!(
                "bnstats in {layout:?} takes {} dims, got {dims:?}",
                if layout == Layout::Nc { 2 } else { 4 }
            )))
        }
    };
    let dtype = dtype.unwrap_or_else(|| default_dtype(device));
    eprintln!(
        "bench: timing bnstats {dims:?} {layout:?} {dtype} on {} (a few seconds) ...",
        device.name()
    );
    // A random block repeated with a prime period: random data, made quickly at any size.
    let block = check::Rng::new(8).normals(65_521, 1.0);
    let len: usize = shape.iter().product();
    let values: Vec<f64> = (0..len).map(|i| block[i % block.len()] + 0.5).collect();
    let x = Tensor::from_f64(device, &values, &shape, dtype)?;
    drop(values);
    let call = BnStats {
        x: &x,
        layout,
        eps: 1e-5,
        normalize: args.normalize.then(Affine::default),
    };
    let times = time_calls(
        || bnstats::bn_stats(&call).map(drop),
        || device.synchronize(),
    )?;
    let passes = if args.normalize { 3.0 } else { 1.0 };
    let timing = Timing {
        bytes: passes * x.byte_len() as f64,
        tensor: times,
        raw: None,
    };
    let what = if args.normalize {
        "stats + normalise"
    } else {
        "stats"
    };
    timing.report(
        args.json,
        vec![
            ("op", Json::Str("bnstats".into())),
            ("device", Json::Str(device.name())),
            ("shape", Json::shape(&shape)),
            ("layout", Json::Str(format!("{layout:?}"))),
            ("dtype", Json::Str(dtype.name().into())),
            ("normalize", Json::Bool(args.normalize)),
        ],
        &format!(
            "bnstats {what}, {shape:?} {layout:?} {dtype}, on {}",
            device.name()
        ),
    );
    Ok(())
}

/// Benchmarks the energy score (preds n x m x d) or the energy distance (N x M x d) with
/// beta = 1; bytes counted: the inputs read once, and the gradient written once.
fn bench_energy(device: &Device, dtype: Option<DType>, args: &BenchArgs) -> Result<(), Failure> {
    let score = args.op == BenchOp::EnergyScore;
    let default = if score {
        [1024, 16, 100]
    } else {
        [4096, 4096, 64]
    };
    let [a, b, d] = match args.shape.as_ref().map(|s| s.0.as_slice()) {
        None => default,
        Some(&[a, b, d]) => [a, b, d],
        Some(other) => {
            return Err(Failure::Usage(format!(
                "energy takes a 3-dim shape, got {other:?}"
            )))
        }
    };
    let dtype = dtype.unwrap_or_else(|| default_dtype(device));
    let name = if score {
        "energy-score"
    } else {
        "energy-distance"
    };
    eprintln!(
        "bench: timing {name} {a}x{b}x{d} {dtype} on {} ...",
        device.name()
    );
    let mut rng = check::Rng::new(9);
    let mut upload = |shape: &[usize]| {
        let len = shape.iter().product();
        Tensor::from_f64(device, &rng.normals(len, 1.0), shape, dtype)
    };
    let (first, second) = if score {
        (upload(&[a, d])?, upload(&[a, b, d])?)
    } else {
        (upload(&[a, d])?, upload(&[b, d])?)
    };
    let mut bytes = (first.byte_len() + second.byte_len()) as f64;
    let times = if score {
        if args.grad {
            bytes += (a * b * d * 4) as f64;
        }
        let call = EnergyScore {
            y: &first,
            preds: &second,
            beta: 1.0,
            grad: args.grad,
        };
        time_calls(
            || energy::energy_score(&call).map(drop),
            || device.synchronize(),
        )?
    } else {
        let call = EnergyDistance {
            x: &first,
            y: &second,
            weights_x: None,
            weights_y: None,
            beta: 1.0,
            statistic: Statistic::V,
            grad: args.grad,
        };
        time_calls(
            || energy::energy_distance(&call).map(drop),
            || device.synchronize(),
        )?
    };
    let timing = Timing {
        bytes,
        tensor: times,
        raw: None,
    };
    timing.report(
        args.json,
        vec![
            ("op", Json::Str(name.into())),
            ("device", Json::Str(device.name())),
            ("shape", Json::shape(&[a, b, d])),
            ("dtype", Json::Str(dtype.name().into())),
            ("grad", Json::Bool(score && args.grad)),
        ],
        &format!("{name}, {a}x{b}x{d} {dtype}, on {}", device.name()),
    );
    Ok(())
}
