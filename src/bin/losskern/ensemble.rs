//! `losskern ensemble` and `losskern landscape`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use losskern::check::Rng;
use losskern::ops::ensemble::{self, Ensemble, Landscape, Perturbation, Precision};
use losskern::{DType, Device, Op, Tensor};

use crate::bench::{median, time_calls};
use crate::json::Json;
use crate::op::{refs, timed, upload_all, OpArgs, OpRun, Want};
use crate::Failure;

#[derive(Args)]
pub struct EnsembleArgs {
    /// w_l [E, out, in] per layer, comma-separated
    #[arg(
        long,
        value_name = "w0.npy,w1.npy",
        value_delimiter = ',',
        required = true
    )]
    weights: Vec<PathBuf>,
    /// b_l [E, out] per layer, comma-separated
    #[arg(
        long,
        value_name = "b0.npy,b1.npy",
        value_delimiter = ',',
        required = true
    )]
    biases: Vec<PathBuf>,
    /// x [B, d0] (shared) or [E, B, d0]
    #[arg(long, value_name = "x.npy")]
    input: PathBuf,
    /// y [B]: class labels
    #[arg(long, value_name = "y.npy")]
    labels: PathBuf,
    /// Also write the logits [E, B, C]
    #[arg(long)]
    logits: bool,
    /// The layers' arithmetic
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    precision: PrecisionArg,
    #[command(flatten)]
    op: OpArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PrecisionArg {
    /// f32 FMA
    Exact,
    /// Tensor-core products with f32 accumulation where the backend has them
    TensorCore,
}

impl From<PrecisionArg> for Precision {
    fn from(p: PrecisionArg) -> Precision {
        match p {
            PrecisionArg::Exact => Precision::Exact,
            PrecisionArg::TensorCore => Precision::TensorCore,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
pub enum PerturbationArg {
    /// fl(w0 + fl(t d)) in the parameters' dtype, as the notebook forms it
    Rounded,
    /// W0 h + t (D h) layer by layer: never rounded away
    Split,
}

impl From<PerturbationArg> for Perturbation {
    fn from(p: PerturbationArg) -> Perturbation {
        match p {
            PerturbationArg::Rounded => Perturbation::Rounded,
            PerturbationArg::Split => Perturbation::Split,
        }
    }
}

pub fn ensemble_command(args: &EnsembleArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("ensemble", Op::EnsembleForward, &args.op)?;
    // The input first: it sets the dtype the layers are converted to.
    let input = run.input("input", &args.input, Want::Compute)?;
    let weights = run.inputs("weights", &args.weights, Want::Compute)?;
    let biases = run.inputs("biases", &args.biases, Want::Compute)?;
    let labels = run.input("labels", &args.labels, Want::Index)?;
    let out = run.execute(|device| {
        let w = upload_all(&weights, device)?;
        let b = upload_all(&biases, device)?;
        let (x, y) = (input.upload(device)?, labels.upload(device)?);
        let (w, b) = (refs(&w), refs(&b));
        let call = Ensemble {
            weights: &w,
            biases: &b,
            input: &x,
            labels: &y,
            logits: args.logits,
            precision: args.precision.into(),
        };
        timed(device, || ensemble::forward(&call))
    })?;
    run.outputs(&[
        ("loss", Some(&out.loss)),
        ("accuracy", Some(&out.accuracy)),
        ("logits", out.logits.as_ref()),
    ])?;
    run.finish()
}

#[derive(Args)]
pub struct LandscapeArgs {
    /// The centre's w_l [out, in] per layer, comma-separated
    #[arg(long, value_name = "w0.npy,..", value_delimiter = ',', required = true)]
    center_weights: Vec<PathBuf>,
    /// The centre's b_l [out] per layer, comma-separated
    #[arg(long, value_name = "b0.npy,..", value_delimiter = ',', required = true)]
    center_biases: Vec<PathBuf>,
    /// The directions' dw_l [K, out, in] per layer, comma-separated
    #[arg(
        long,
        value_name = "dw0.npy,..",
        value_delimiter = ',',
        required = true
    )]
    direction_weights: Vec<PathBuf>,
    /// The directions' db_l [K, out] per layer, comma-separated
    #[arg(
        long,
        value_name = "db0.npy,..",
        value_delimiter = ',',
        required = true
    )]
    direction_biases: Vec<PathBuf>,
    /// k [E] integers: the direction of model e
    #[arg(long, value_name = "k.npy")]
    direction_of: PathBuf,
    /// t [E]: the distance of model e along its direction
    #[arg(long, value_name = "t.npy")]
    distance: PathBuf,
    /// x [B, d0]
    #[arg(long, value_name = "x.npy")]
    input: PathBuf,
    /// y [B]: class labels
    #[arg(long, value_name = "y.npy")]
    labels: PathBuf,
    /// Also write the logits [E, B, C]
    #[arg(long)]
    logits: bool,
    /// The layers' arithmetic
    #[arg(long, value_enum, default_value_t = PrecisionArg::Exact)]
    precision: PrecisionArg,
    /// How centre + t * direction is formed
    #[arg(long, value_enum, default_value_t = PerturbationArg::Split)]
    perturbation: PerturbationArg,
    #[command(flatten)]
    op: OpArgs,
}

pub fn landscape_command(args: &LandscapeArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("landscape", Op::EnsembleLandscape, &args.op)?;
    let input = run.input("input", &args.input, Want::Compute)?;
    let center_weights = run.inputs("center-weights", &args.center_weights, Want::Compute)?;
    let center_biases = run.inputs("center-biases", &args.center_biases, Want::Compute)?;
    let direction_weights =
        run.inputs("direction-weights", &args.direction_weights, Want::Compute)?;
    let direction_biases = run.inputs("direction-biases", &args.direction_biases, Want::Compute)?;
    let direction_of = run.input("direction-of", &args.direction_of, Want::Index)?;
    let distance = run.input("distance", &args.distance, Want::F32)?;
    let labels = run.input("labels", &args.labels, Want::Index)?;
    let out = run.execute(|device| {
        let cw = upload_all(&center_weights, device)?;
        let cb = upload_all(&center_biases, device)?;
        let dw = upload_all(&direction_weights, device)?;
        let db = upload_all(&direction_biases, device)?;
        let (cw, cb, dw, db) = (refs(&cw), refs(&cb), refs(&dw), refs(&db));
        let (k, t) = (direction_of.upload(device)?, distance.upload(device)?);
        let (x, y) = (input.upload(device)?, labels.upload(device)?);
        let call = Landscape {
            center_weights: &cw,
            center_biases: &cb,
            direction_weights: &dw,
            direction_biases: &db,
            direction_of: &k,
            distance: &t,
            input: &x,
            labels: &y,
            logits: args.logits,
            precision: args.precision.into(),
            perturbation: args.perturbation.into(),
        };
        timed(device, || ensemble::landscape(&call))
    })?;
    run.outputs(&[
        ("loss", Some(&out.loss)),
        ("accuracy", Some(&out.accuracy)),
        ("logits", out.logits.as_ref()),
    ])?;
    // The library validated k and t; the uploads here give them back as the op saw them.
    let k = direction_of.upload(&Device::Cpu)?.to_vec::<i64>()?;
    let t = distance.upload(&Device::Cpu)?.to_f64_vec()?;
    let roughness = roughness_summary(&k, &t, &out.loss.to_f64_vec()?, &mut run);
    run.extra.push(("roughness".into(), roughness));
    run.finish()
}

/// Roughness and grit per direction (the Loss-Cartography formulas) from the scan's
/// losses, where the scan has the centre (a model with t = 0) and distances that double.
fn roughness_summary(k: &[i64], t: &[f64], losses: &[f64], run: &mut OpRun) -> Json {
    let Some(center) = t.iter().position(|&t| t == 0.0).map(|e| losses[e]) else {
        run.note("no model has t = 0 (the centre): no roughness".into());
        return Json::Arr(Vec::new());
    };
    let directions = k.iter().copied().max().unwrap_or(-1) + 1;
    let mut per_direction = Vec::new();
    for direction in 0..directions {
        let mut points: Vec<(f64, f64)> = (0..k.len())
            .filter(|&e| k[e] == direction && t[e] > 0.0)
            .map(|e| (t[e], losses[e]))
            .collect();
        points.sort_by(|a, b| a.0.total_cmp(&b.0));
        // Relative tolerance: distances are f32 and may come from np.geomspace.
        let doubling = points
            .windows(2)
            .all(|w| (w[1].0 - 2.0 * w[0].0).abs() <= 1e-5 * w[1].0);
        if points.len() < 2 || !doubling {
            run.note(format!(
                "direction {direction}: positive distances do not double (h, 2h, 4h, ...): no roughness"
            ));
            continue;
        }
        let (h, l): (Vec<f64>, Vec<f64>) = points.into_iter().unzip();
        let r = ensemble::roughness(center, &h, &l);
        let numbers = |v: &[f64]| Json::Arr(v.iter().map(|&x| Json::Num(x)).collect());
        per_direction.push(Json::object([
            ("direction", Json::Int(direction as u64)),
            ("h", numbers(&h[..h.len() - 1])),
            ("roughness", numbers(&r.roughness)),
            ("grit", numbers(&r.grit)),
        ]));
    }
    Json::Arr(per_direction)
}

/// Random layers [lead.., out, in] and [lead.., out] (scaled by 1/sqrt(in)) on `device`.
fn random_layers(
    device: &Device,
    rng: &mut Rng,
    widths: &[usize],
    lead: &[usize],
    dtype: DType,
) -> losskern::Result<(Vec<Tensor>, Vec<Tensor>)> {
    let mut weights = Vec::new();
    let mut biases = Vec::new();
    for w in widths.windows(2) {
        let (w_shape, b_shape) = ([lead, &[w[1], w[0]]].concat(), [lead, &[w[1]]].concat());
        let scale = 1.0 / (w[0] as f64).sqrt();
        let len: usize = w_shape.iter().product();
        weights.push(Tensor::from_f64(
            device,
            &rng.normals(len, scale),
            &w_shape,
            dtype,
        )?);
        let len: usize = b_shape.iter().product();
        biases.push(Tensor::from_f64(
            device,
            &rng.normals(len, 0.1),
            &b_shape,
            dtype,
        )?);
    }
    Ok((weights, biases))
}

/// `losskern bench --op ensemble | landscape`: `dims` is E x B x widths for a forward and
/// K x distances x B x widths for a scan (a centre and `distances` doubling distances from
/// 1e-3 on each direction). FLOPs counted: 2 E B sum d_l d_{l+1}, the cost of evaluating
/// the models (a Split scan does more arithmetic than that, a forward exactly that).
pub fn bench_ensemble(
    device: &Device,
    dtype: DType,
    dims: Option<&[usize]>,
    precision: Precision,
    scan: Option<Perturbation>,
    json: bool,
) -> Result<(), Failure> {
    let batch = if *device == Device::Cpu { 600 } else { 60000 };
    let default = match scan {
        None => vec![81, batch, 784, 128, 128, 10],
        Some(_) => vec![7, 11, batch, 784, 128, 128, 10],
    };
    let dims = dims.map_or(default, <[usize]>::to_vec);
    let lead = if scan.is_some() { 3 } else { 2 };
    if dims.len() < lead + 2 {
        return Err(Failure::Usage(format!(
            "the shape needs {} leading sizes and at least two widths, got {dims:?}",
            lead
        )));
    }
    let (b, widths) = (dims[lead - 1], &dims[lead..]);
    let mut rng = Rng::new(9);
    let x = Tensor::from_f64(
        device,
        &rng.normals(b * widths[0], 1.0),
        &[b, widths[0]],
        dtype,
    )?;
    let classes = widths[widths.len() - 1];
    let labels: Vec<i64> = (0..b).map(|_| rng.below(classes) as i64).collect();
    let y = Tensor::from_slice(device, &labels, &[b])?;
    eprintln!(
        "bench: timing {} {dims:?} {dtype} {precision:?} on {} (a few seconds) ...",
        scan.map_or("ensemble".to_string(), |p| format!("landscape {p:?}")),
        device.name()
    );
    let (models, times) = match scan {
        None => {
            let (w, b) = random_layers(device, &mut rng, widths, &[dims[0]], dtype)?;
            let call = Ensemble {
                weights: &refs(&w),
                biases: &refs(&b),
                input: &x,
                labels: &y,
                logits: false,
                precision,
            };
            let times = time_calls(
                || ensemble::forward(&call).map(drop),
                || device.synchronize(),
            )?;
            (dims[0], times)
        }
        Some(perturbation) => {
            let (directions, distances) = (dims[0], dims[1]);
            let (cw, cb) = random_layers(device, &mut rng, widths, &[], dtype)?;
            let (dw, db) = random_layers(device, &mut rng, widths, &[directions], dtype)?;
            let mut k = vec![0i64];
            let mut t = vec![0.0];
            for direction in 0..directions {
                for i in 0..distances {
                    k.push(direction as i64);
                    t.push(1e-3 * 2f64.powi(i as i32));
                }
            }
            let models = k.len();
            let k = Tensor::from_slice(device, &k, &[models])?;
            let t = Tensor::from_f64(device, &t, &[models], DType::F32)?;
            let call = Landscape {
                center_weights: &refs(&cw),
                center_biases: &refs(&cb),
                direction_weights: &refs(&dw),
                direction_biases: &refs(&db),
                direction_of: &k,
                distance: &t,
                input: &x,
                labels: &y,
                logits: false,
                precision,
                perturbation,
            };
            let times = time_calls(
                || ensemble::landscape(&call).map(drop),
                || device.synchronize(),
            )?;
            (models, times)
        }
    };
    let macs: usize = widths.windows(2).map(|w| w[0] * w[1]).sum();
    let flops = 2.0 * (models * b) as f64 * macs as f64;
    let ms = median(&times);
    let tflops = flops / (ms * 1e-3) / 1e12;
    if json {
        println!(
            "{}",
            Json::object([
                (
                    "op",
                    Json::Str(
                        if scan.is_some() {
                            "landscape"
                        } else {
                            "ensemble"
                        }
                        .into()
                    )
                ),
                ("device", Json::Str(device.name())),
                ("shape", Json::shape(&dims)),
                ("models", Json::Int(models as u64)),
                ("dtype", Json::Str(dtype.name().into())),
                ("precision", Json::Str(format!("{precision:?}"))),
                (
                    "perturbation",
                    Json::Str(scan.map_or("none".into(), |p| format!("{p:?}")))
                ),
                ("flops", Json::Num(flops)),
                ("median_ms", Json::Num(ms)),
                ("best_ms", Json::Num(times[0])),
                ("tflops", Json::Num(tflops)),
            ])
        );
    } else {
        println!(
            "\nbench: {models} models, B {b}, widths {widths:?}, {dtype} {precision:?}, on {}: median {ms:.3} ms, best {:.3} ms, {tflops:.2} TFLOP/s",
            device.name(),
            times[0]
        );
    }
    Ok(())
}
