//! `losskern bnstats`.

use std::path::PathBuf;

use clap::{Args, ValueEnum};
use losskern::ops::bnstats::{self, Affine, BnStats, Layout, RunningStats};
use losskern::Op;

use crate::json::Json;
use crate::op::{timed, OpArgs, OpRun, Want};
use crate::Failure;

#[derive(Args)]
pub struct BnstatsArgs {
    /// x in --layout: NCHW [N, C, H, W], NHWC [N, H, W, C] or NC [N, C]
    #[arg(long, value_name = "x.npy")]
    x: PathBuf,
    /// The memory layout of x
    #[arg(long, value_enum)]
    layout: LayoutArg,
    /// invstd = 1 / sqrt(var_biased + eps); the default is PyTorch's
    #[arg(
        long,
        value_name = "E",
        allow_negative_numbers = true,
        default_value_t = 1e-5
    )]
    eps: f64,
    /// Also write y = (x - mean) * invstd * gamma + beta
    #[arg(long)]
    normalize: bool,
    /// gamma [C] (default 1), with --normalize
    #[arg(long, value_name = "g.npy", requires = "normalize")]
    gamma: Option<PathBuf>,
    /// beta [C] (default 0), with --normalize
    #[arg(long, value_name = "b.npy", requires = "normalize")]
    beta: Option<PathBuf>,
    /// Also write the running stats after one step: a momentum in [0, 1], or none for
    /// PyTorch's cumulative average (BatchNorm(momentum=None))
    #[arg(long, value_name = "M|none", allow_negative_numbers = true, value_parser = parse_momentum)]
    momentum: Option<Momentum>,
    #[command(flatten)]
    op: OpArgs,
}

#[derive(Clone, Copy, ValueEnum)]
pub enum LayoutArg {
    Nchw,
    Nhwc,
    Nc,
}

impl From<LayoutArg> for Layout {
    fn from(l: LayoutArg) -> Layout {
        match l {
            LayoutArg::Nchw => Layout::Nchw,
            LayoutArg::Nhwc => Layout::Nhwc,
            LayoutArg::Nc => Layout::Nc,
        }
    }
}

/// `--momentum`: as `RunningStats::update` takes it, None for the cumulative average.
#[derive(Clone, Copy)]
struct Momentum(Option<f64>);

/// A number (its range is the library's to check) or `none`.
fn parse_momentum(text: &str) -> Result<Momentum, String> {
    if text == "none" {
        return Ok(Momentum(None));
    }
    text.parse()
        .map(|m| Momentum(Some(m)))
        .map_err(|_| format!("'{text}' is neither a number nor none"))
}

pub fn bnstats_command(args: &BnstatsArgs) -> Result<(), Failure> {
    let mut run = OpRun::new("bnstats", Op::BnStats, &args.op)?;
    let x = run.input("x", &args.x, Want::Compute)?;
    let gamma = run.optional_input("gamma", args.gamma.as_deref(), Want::F32)?;
    let beta = run.optional_input("beta", args.beta.as_deref(), Want::F32)?;
    let out = run.execute(|device| {
        let x = x.upload(device)?;
        let gamma = gamma.as_ref().map(|g| g.upload(device)).transpose()?;
        let beta = beta.as_ref().map(|b| b.upload(device)).transpose()?;
        let call = BnStats {
            x: &x,
            layout: args.layout.into(),
            eps: args.eps,
            normalize: args.normalize.then_some(Affine {
                gamma: gamma.as_ref(),
                beta: beta.as_ref(),
            }),
        };
        timed(device, || bnstats::bn_stats(&call))
    })?;
    run.outputs(&[
        ("mean", Some(&out.mean)),
        ("var_biased", Some(&out.var_biased)),
        ("var_unbiased", Some(&out.var_unbiased)),
        ("invstd", Some(&out.invstd)),
        ("m2", Some(&out.m2)),
        ("y", out.y.as_ref()),
    ])?;
    run.extra.push(("count".into(), Json::Int(out.count)));
    if let Some(Momentum(momentum)) = args.momentum {
        // One step from PyTorch's initial state, on the device that computed the stats.
        let mut running = RunningStats::new(out.mean.device(), out.mean.len())?;
        running.update(&out, momentum)?;
        run.outputs(&[
            ("running_mean", Some(&running.mean)),
            ("running_var", Some(&running.var)),
        ])?;
    }
    run.finish()
}
