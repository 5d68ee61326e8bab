//! `losskern energy-score` and `losskern energy-distance`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::Op;

use crate::op::{timed, OpArgs, OpRun, Want};
use crate::Failure;

#[derive(Args)]
pub struct ScoreArgs {
    /// y [n, d]: the observations
    #[arg(long, value_name = "y.npy")]
    y: PathBuf,
    /// preds [n, m, d]: m ensemble members per observation
    #[arg(long, value_name = "p.npy")]
    preds: PathBuf,
    /// beta in (0, 2]: distances enter as ||.||^beta
    #[arg(
        long,
        value_name = "B",
        allow_negative_numbers = true,
        default_value_t = 1.0
    )]
    beta: f64,
    /// Also write d loss / d preds [n, m, d]
    #[arg(long)]
    grad: bool,
    #[command(flatten)]
    op: OpArgs,
}

pub fn score_command(args: &ScoreArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("energy-score", Op::EnergyScore, &args.op)?;
    let preds = run.input("preds", &args.preds, Want::Compute)?;
    let y = run.input("y", &args.y, Want::Compute)?;
    let out = run.execute(|device| {
        let (p, y) = (preds.upload(device)?, y.upload(device)?);
        let call = EnergyScore {
            y: &y,
            preds: &p,
            beta: args.beta,
            grad: args.grad,
        };
        timed(device, || energy::energy_score(&call))
    })?;
    run.outputs(&[
        ("term1", Some(&out.term1)),
        ("term2", Some(&out.term2)),
        ("loss", Some(&out.loss)),
        ("grad", out.grad.as_ref()),
    ])?;
    run.finish()
}

#[derive(Args)]
pub struct DistanceArgs {
    /// x [N, d]: the first sample
    #[arg(long, value_name = "x.npy")]
    x: PathBuf,
    /// y [M, d]: the second sample
    #[arg(long, value_name = "y.npy")]
    y: PathBuf,
    /// [N]: non-negative weights of the first sample
    #[arg(long, value_name = "wx.npy")]
    weights_x: Option<PathBuf>,
    /// [M]: non-negative weights of the second sample
    #[arg(long, value_name = "wy.npy")]
    weights_y: Option<PathBuf>,
    /// beta in (0, 2]: distances enter as ||.||^beta
    #[arg(
        long,
        value_name = "B",
        allow_negative_numbers = true,
        default_value_t = 1.0
    )]
    beta: f64,
    /// The within-sample means: V-statistic (diagonal included) or U-statistic
    /// (diagonal excluded) [default: v]
    #[arg(long, value_enum)]
    statistic: Option<StatisticArg>,
    /// Also write d distance / dx (grad_x) and d distance / dy (grad_y)
    #[arg(long)]
    grad: bool,
    #[command(flatten)]
    op: OpArgs,
}

#[derive(Clone, Copy, ValueEnum)]
enum StatisticArg {
    V,
    U,
}

impl From<StatisticArg> for Statistic {
    fn from(s: StatisticArg) -> Statistic {
        match s {
            StatisticArg::V => Statistic::V,
            StatisticArg::U => Statistic::U,
        }
    }
}

pub fn distance_command(args: &DistanceArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("energy-distance", Op::EnergyDistance, &args.op)?;
    let statistic = args.statistic.map(Statistic::from).unwrap_or_default();
    let x = run.input("x", &args.x, Want::Compute)?;
    let y = run.input("y", &args.y, Want::Compute)?;
    let weights_x = run.optional_input("weights-x", args.weights_x.as_deref(), Want::F32)?;
    let weights_y = run.optional_input("weights-y", args.weights_y.as_deref(), Want::F32)?;
    let out = run.execute(|device| {
        let (x, y) = (x.upload(device)?, y.upload(device)?);
        let wx = weights_x.as_ref().map(|w| w.upload(device)).transpose()?;
        let wy = weights_y.as_ref().map(|w| w.upload(device)).transpose()?;
        let call = EnergyDistance {
            x: &x,
            y: &y,
            weights_x: wx.as_ref(),
            weights_y: wy.as_ref(),
            beta: args.beta,
            statistic,
            grad: args.grad,
        };
        timed(device, || energy::energy_distance(&call))
    })?;
    run.outputs(&[
        ("distance", Some(&out.distance)),
        ("cross", Some(&out.cross)),
        ("within_x", Some(&out.within_x)),
        ("within_y", Some(&out.within_y)),
        ("grad_x", out.grad_x.as_ref()),
        ("grad_y", out.grad_y.as_ref()),
    ])?;
    run.finish()
}
