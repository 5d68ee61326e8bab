//! `losskern xent` and `losskern xent-directional`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use losskern::ops::xent::{
    self, Directional, Gap, GradDType, RadiusOptions, Reduction, RhoReduce, Targets, Xent,
    XentOptions,
};
use losskern::Op;

use crate::op::{timed, OpArgs, OpRun, Want};
use crate::Failure;

#[derive(Args)]
pub struct XentArgs {
    /// z [B, V]: the logits
    #[arg(long, value_name = "z.npy")]
    logits: PathBuf,
    #[command(flatten)]
    targets: TargetArgs,
    /// w [V]: class weights
    #[arg(long, value_name = "w.npy")]
    weights: Option<PathBuf>,
    /// T > 0: the op works on z / T
    #[arg(long, value_name = "T", allow_negative_numbers = true,
          default_value_t = XentOptions::default().temperature)]
    temperature: f64,
    /// E in [0, 1): the target is (1 - E) onehot + E / V (PyTorch)
    #[arg(long, value_name = "E", allow_negative_numbers = true,
          default_value_t = XentOptions::default().label_smoothing)]
    label_smoothing: f64,
    /// The class target that marks a row as ignored
    #[arg(long, value_name = "I", allow_negative_numbers = true,
          default_value_t = XentOptions::default().ignore_index)]
    ignore_index: i64,
    /// How the per-row loss is reduced over the batch [default: mean]
    #[arg(long, value_enum)]
    reduction: Option<ReductionArg>,
    /// C: adds C * lse^2 per row to the loss
    #[arg(long, value_name = "C", allow_negative_numbers = true,
          default_value_t = XentOptions::default().z_loss)]
    z_loss: f64,
    /// Also write the gradient of the reduced loss w.r.t. the logits
    #[arg(long)]
    grad: bool,
    /// The logit gap Delta that defines the radius [default: maxmin]
    #[arg(long, value_enum)]
    gap: Option<GapArg>,
    /// How Delta is reduced over rows before rho = pi / (Delta + eps) [default: mean]
    #[arg(long, value_enum)]
    rho_reduce: Option<RhoReduceArg>,
    /// The eps of rho = pi / (Delta + eps)
    #[arg(long, value_name = "E", allow_negative_numbers = true,
          default_value_t = XentOptions::default().radius.eps)]
    rho_eps: f64,
    /// rho = min(rho, C)
    #[arg(long, value_name = "C", allow_negative_numbers = true)]
    rho_cap: Option<f64>,
    /// rho = max(rho, F)
    #[arg(long, value_name = "F", allow_negative_numbers = true)]
    rho_floor: Option<f64>,
    /// rho is infinite where Delta is below eps
    #[arg(long)]
    inf_if_small: bool,
    #[command(flatten)]
    op: OpArgs,
}

/// Exactly one of the two kinds of targets.
#[derive(Args)]
#[group(required = true, multiple = false)]
struct TargetArgs {
    /// y [B]: class indices
    #[arg(long, value_name = "y.npy")]
    targets: Option<PathBuf>,
    /// q [B, V]: soft targets
    #[arg(long, value_name = "q.npy")]
    soft_targets: Option<PathBuf>,
}

#[derive(Clone, Copy, ValueEnum)]
enum ReductionArg {
    Mean,
    Sum,
    None,
}

impl From<ReductionArg> for Reduction {
    fn from(r: ReductionArg) -> Reduction {
        match r {
            ReductionArg::Mean => Reduction::Mean,
            ReductionArg::Sum => Reduction::Sum,
            ReductionArg::None => Reduction::None,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum GapArg {
    /// Delta = max - min over the row
    #[value(name = "maxmin")]
    MaxMin,
    /// Delta = top1 - top2 over the row
    Top2,
}

impl From<GapArg> for Gap {
    fn from(g: GapArg) -> Gap {
        match g {
            GapArg::MaxMin => Gap::MaxMin,
            GapArg::Top2 => Gap::Top2,
        }
    }
}

#[derive(Clone, Copy, ValueEnum)]
enum RhoReduceArg {
    Mean,
    Max,
    /// One rho per row
    PerSample,
}

impl From<RhoReduceArg> for RhoReduce {
    fn from(r: RhoReduceArg) -> RhoReduce {
        match r {
            RhoReduceArg::Mean => RhoReduce::Mean,
            RhoReduceArg::Max => RhoReduce::Max,
            RhoReduceArg::PerSample => RhoReduce::PerSample,
        }
    }
}

impl XentArgs {
    /// The options; those not given are the library's defaults.
    fn options(&self) -> XentOptions {
        let d = XentOptions::default();
        XentOptions {
            temperature: self.temperature,
            label_smoothing: self.label_smoothing,
            ignore_index: self.ignore_index,
            reduction: self.reduction.map_or(d.reduction, Reduction::from),
            z_loss: self.z_loss,
            grad: self.grad,
            radius: RadiusOptions {
                gap: self.gap.map_or(d.radius.gap, Gap::from),
                reduce: self.rho_reduce.map_or(d.radius.reduce, RhoReduce::from),
                eps: self.rho_eps,
                cap: self.rho_cap,
                floor: self.rho_floor,
                inf_if_small: self.inf_if_small,
            },
        }
    }
}

pub fn xent_command(args: &XentArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("xent", Op::Xent, &args.op)?;
    let options = args.options();
    let logits = run.input("logits", &args.logits, Want::Compute)?;
    let (targets, soft) = match (&args.targets.targets, &args.targets.soft_targets) {
        (Some(y), _) => (run.input("targets", y, Want::Index)?, false),
        (None, Some(q)) => (run.input("soft-targets", q, Want::Compute)?, true),
        (None, None) => unreachable!("the clap group requires --targets or --soft-targets"),
    };
    let weights = run.optional_input("weights", args.weights.as_deref(), Want::F32)?;
    let out = run.execute(|device| {
        let z = logits.upload(device)?;
        let t = targets.upload(device)?;
        let w = weights.as_ref().map(|w| w.upload(device)).transpose()?;
        let call = Xent {
            logits: &z,
            targets: if soft {
                Targets::Soft(&t)
            } else {
                Targets::Classes(&t)
            },
            class_weights: w.as_ref(),
            classes: None,
            options,
            grad_dtype: GradDType::Logits,
        };
        timed(device, || xent::xent(&call))
    })?;
    let named: Vec<_> = out.named().into_iter().map(|(n, t)| (n, Some(t))).collect();
    run.outputs(&named)?;
    run.finish()
}

#[derive(Args)]
pub struct DirectionalArgs {
    /// z [B, V]: the logits
    #[arg(long, value_name = "z.npy")]
    logits: PathBuf,
    /// a [B, V]: the logits' derivatives along the update direction
    #[arg(long, value_name = "a.npy")]
    derivatives: PathBuf,
    /// The step length tau along the direction
    #[arg(long, value_name = "TAU", allow_negative_numbers = true)]
    step: f64,
    #[command(flatten)]
    op: OpArgs,
}

pub fn directional_command(args: &DirectionalArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("xent-directional", Op::XentDirectional, &args.op)?;
    let logits = run.input("logits", &args.logits, Want::Compute)?;
    let derivatives = run.input("derivatives", &args.derivatives, Want::Compute)?;
    let out = run.execute(|device| {
        let z = logits.upload(device)?;
        let a = derivatives.upload(device)?;
        let call = Directional {
            logits: &z,
            derivatives: &a,
            step: args.step,
        };
        timed(device, || xent::directional(&call))
    })?;
    run.outputs(&[
        ("delta_a", Some(&out.delta_a)),
        ("rho_a", Some(&out.rho_a)),
        ("normalized_step", Some(&out.normalized_step)),
        ("binary_radius", out.binary_radius.as_ref()),
    ])?;
    run.finish()
}
