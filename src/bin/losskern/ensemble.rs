//! `losskern ensemble` and `losskern landscape`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use losskern::ops::ensemble::{self, Ensemble, Landscape, Perturbation, Precision};
use losskern::{Device, Op};

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
enum PrecisionArg {
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
enum PerturbationArg {
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
