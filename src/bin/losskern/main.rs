//! `losskern`: the command line of the crate.
//!
//! With no arguments it runs `check` on every backend present and then `bench` on the
//! best device, so `cargo run --release` on a fresh machine shows the project working.
//! `info` lists the backends; one command per op reads `.npy` inputs and writes every
//! output as `.npy` plus a JSON summary, so a PyTorch user can run the kernels on
//! their own arrays. Exit codes: 0 success, 1 an error or a failed check, 2 a bad
//! command line (clap's usage errors).

mod bench;
mod bnstats;
mod checks;
mod energy;
mod ensemble;
mod info;
mod json;
mod npy;
mod op;
mod xent;

use std::process::ExitCode;

use clap::{Parser, Subcommand, ValueEnum};
use losskern::{Backend, DType, Device, Error};

const AFTER_HELP: &str = "\
With no command: check on every backend present, then bench on the best device.

Op commands read C-order little-endian .npy files ('<f4', '<f2', '<f8' rounded to
f32; class indices '<i8' or '<i4'), write every output as OUT/NAME.npy ('<f4', '<f2',
'<f8', '<i8'; bf16 outputs as '<f4', which holds them exactly) and print a JSON
summary (op, device, inputs, outputs with the value of one-element outputs, notes,
elapsed_ms: from the op call to device synchronize, which in a fresh process includes
compiling the kernels; `bench` times warm calls); non-finite numbers are written as
NaN / Infinity, as Python's json module does. Progress goes to stderr.

Exit codes: 0 success, 1 an error or a failed check, 2 a bad command line.";

/// losskern: fused cross-entropy + softmax radius, MLP ensembles, energy distances and
/// batch-norm statistics on CUDA, WebGPU and the CPU.
#[derive(Parser)]
#[command(name = "losskern", bin_name = "losskern", version, after_help = AFTER_HELP)]
struct Cli {
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// The backends found: CPU, CUDA device and NVRTC, wgpu adapters.
    Info,
    /// Every correctness case on every backend, against the f64 reference.
    ///
    /// Runs every case of the correctness harness on each backend (all: the CPU and
    /// every GPU backend present) and prints op x backend with the worst error as a
    /// fraction of the allowed error; exits 1 on any failure.
    Check(checks::CheckArgs),
    /// A few seconds of xent forward, in ms and GB/s.
    ///
    /// xent (all outputs; the gradient too with --grad) for a few seconds: by default
    /// 4096 x 32000 bf16 on a GPU, 256 x 32000 f32 on the CPU. GB/s counts the logits
    /// read once and, with --grad, the gradient written once. On CUDA it also times
    /// the zero-copy entry (cuda::xent::xent_raw) with reused output buffers, the
    /// kernels alone; the Tensor call adds the host check of the targets and the
    /// output allocations.
    Bench(bench::BenchArgs),
    /// Fused cross-entropy, softmax statistics and the convergence radius of .npy logits.
    ///
    /// z [B, V]; y [B] class indices; q [B, V]; w [V] class weights.
    /// Writes loss, loss_per_row, lse, entropy, argmax, max, min, top2_gap, delta,
    /// rho (and grad with --grad).
    Xent(xent::XentArgs),
    /// The radius along an update direction.
    ///
    /// z, a [B, V] (a = J v, the logits' derivatives along an update direction).
    /// Writes delta_a, rho_a, normalized_step (and binary_radius when V = 2).
    XentDirectional(xent::DirectionalArgs),
    /// Loss and accuracy of an ensemble of MLPs.
    ///
    /// Layer l: w_l [E, out, in], b_l [E, out]; x [B, d0] or [E, B, d0]; y [B].
    /// Writes loss and accuracy [E] (f64), and logits [E, B, C] with --logits.
    Ensemble(ensemble::EnsembleArgs),
    /// A loss-landscape scan: models centre + t * direction.
    ///
    /// Model e = centre + t[e] * direction k[e]: w_l [out, in], dw_l [K, out, in],
    /// k [E] integers, t [E]. Writes loss, accuracy (and logits). When a model has
    /// t = 0, the summary gives roughness and grit per direction whose positive
    /// distances double (h, 2h, 4h, ...).
    Landscape(ensemble::LandscapeArgs),
    /// The energy score of an ensemble forecast.
    ///
    /// y [n, d], preds [n, m, d], beta in (0, 2].
    /// Writes term1, term2, loss (and grad [n, m, d] with --grad).
    EnergyScore(energy::ScoreArgs),
    /// The two-sample energy distance.
    ///
    /// x [N, d], y [M, d], sample weights [N] and [M]. Writes distance, cross,
    /// within_x, within_y.
    EnergyDistance(energy::DistanceArgs),
    /// Batch-norm statistics, the normalised output and PyTorch's running stats.
    ///
    /// Writes mean, var_biased, var_unbiased, invstd, m2 [C] (the Welford partial is
    /// (count, mean, m2)), y with --normalize, and with --momentum the running_mean /
    /// running_var PyTorch holds after one training step from its initial state.
    Bnstats(bnstats::BnstatsArgs),
}

/// Why the program stops early; a bad command line never gets here (clap exits 2).
#[derive(Debug)]
enum Failure {
    /// The library refused the inputs or failed.
    Lib(Error),
    /// A file could not be read or written, or a .npy file is malformed or unsupported;
    /// the message names the file.
    File(String),
    /// `check` found this many failing cases.
    Checks(usize),
    /// Options that parse but do not fit together (a shape of the wrong rank for the op);
    /// exits 2, as clap does for a bad command line.
    Usage(String),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Lib(e)
    }
}

fn main() -> ExitCode {
    // Exits 2 on a bad command line and 0 after --help, --version and `help`.
    let cli = Cli::parse();
    let result = match cli.command {
        None => default_run(),
        Some(Command::Info) => {
            info::info();
            Ok(())
        }
        Some(Command::Check(args)) => checks::check_command(&args),
        Some(Command::Bench(args)) => bench::bench_command(&args),
        Some(Command::Xent(args)) => xent::xent_command(&args),
        Some(Command::XentDirectional(args)) => xent::directional_command(&args),
        Some(Command::Ensemble(args)) => ensemble::ensemble_command(&args),
        Some(Command::Landscape(args)) => ensemble::landscape_command(&args),
        Some(Command::EnergyScore(args)) => energy::score_command(&args),
        Some(Command::EnergyDistance(args)) => energy::distance_command(&args),
        Some(Command::Bnstats(args)) => bnstats::bnstats_command(&args),
    };
    let (message, code) = match result {
        Ok(()) => return ExitCode::SUCCESS,
        Err(Failure::Lib(e)) => (e.to_string(), 1),
        Err(Failure::File(message)) => (message, 1),
        Err(Failure::Checks(count)) => (format!("{count} check(s) failed"), 1),
        Err(Failure::Usage(message)) => (message, 2),
    };
    eprintln!("losskern: {message}");
    ExitCode::from(code)
}

/// No arguments: the checks on every backend present, then the benchmark on the best
/// device (run even when a check failed, so the numbers are still shown).
fn default_run() -> Result<(), Failure> {
    losskern::device::poison_outputs(true);
    let checks = checks::run_checks(&devices_present());
    losskern::device::poison_outputs(false);
    bench::bench(&Device::best(), None, None, false, false)?;
    checks
}

/// `--device`: a backend, or the best device present.
#[derive(Clone, Copy, ValueEnum)]
enum DeviceChoice {
    Cpu,
    Cuda,
    Wgpu,
    /// CUDA device 0, else a wgpu adapter, else the CPU.
    Best,
}

impl DeviceChoice {
    /// The backend named; None for `best`.
    fn backend(self) -> Option<Backend> {
        match self {
            DeviceChoice::Cpu => Some(Backend::Cpu),
            DeviceChoice::Cuda => Some(Backend::Cuda),
            DeviceChoice::Wgpu => Some(Backend::Wgpu),
            DeviceChoice::Best => None,
        }
    }

    /// The device; `best` never fails (the CPU is always there).
    fn open(self) -> losskern::Result<Device> {
        self.backend().map_or_else(|| Ok(Device::best()), open)
    }
}

/// `--dtype`: the float dtypes the kernels take.
#[derive(Clone, Copy, ValueEnum)]
enum DTypeArg {
    F32,
    F16,
    Bf16,
}

impl From<DTypeArg> for DType {
    fn from(d: DTypeArg) -> DType {
        match d {
            DTypeArg::F32 => DType::F32,
            DTypeArg::F16 => DType::F16,
            DTypeArg::Bf16 => DType::BF16,
        }
    }
}

/// The device of a backend: CUDA device 0, the first wgpu adapter, or the CPU.
fn open(backend: Backend) -> losskern::Result<Device> {
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        #[cfg(feature = "cuda")]
        Backend::Cuda => Device::cuda(0),
        #[cfg(not(feature = "cuda"))]
        Backend::Cuda => Err(Error::CudaUnavailable(
            "losskern was built without the `cuda` feature".into(),
        )),
        #[cfg(feature = "wgpu")]
        Backend::Wgpu => Device::wgpu(),
        #[cfg(not(feature = "wgpu"))]
        Backend::Wgpu => Err(Error::WgpuUnavailable(
            "losskern was built without the `wgpu` feature".into(),
        )),
    }
}

/// The CPU and every GPU backend that opens; the others are reported and skipped.
fn devices_present() -> Vec<Device> {
    let mut devices = vec![Device::Cpu];
    for backend in [Backend::Cuda, Backend::Wgpu] {
        match open(backend) {
            Ok(device) => devices.push(device),
            Err(e) => eprintln!("skipping {backend}: {e}"),
        }
    }
    devices
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    #[test]
    fn the_command_line_is_consistent() {
        Cli::command().debug_assert();
    }

    /// The exit code clap gives each command line: 0 for help and version, 2 for usage errors.
    #[test]
    fn usage_errors_exit_2_and_help_exits_0() {
        let code = |argv: &[&str]| match Cli::try_parse_from(argv) {
            Ok(_) => None,
            Err(e) => Some(e.exit_code()),
        };
        assert_eq!(code(&["losskern", "help"]), Some(0));
        assert_eq!(code(&["losskern", "--help"]), Some(0));
        assert_eq!(code(&["losskern", "--version"]), Some(0));
        assert_eq!(code(&["losskern", "xent", "--help"]), Some(0));
        assert_eq!(code(&["losskern", "frobnicate"]), Some(2));
        assert_eq!(code(&["losskern", "check", "--no-such-flag"]), Some(2));
        assert_eq!(code(&["losskern", "check", "--backend", "tpu"]), Some(2));
        assert_eq!(code(&["losskern", "xent", "--logits", "z.npy"]), Some(2));
        let both = [
            "losskern",
            "xent",
            "--logits",
            "z",
            "--targets",
            "y",
            "--soft-targets",
            "q",
            "--out",
            "o",
        ];
        assert_eq!(code(&both), Some(2));
        assert_eq!(code(&["losskern", "bench", "--shape", "0x5"]), Some(2));
        assert_eq!(code(&["losskern", "bench", "--grad", "--grad"]), Some(2));
        let gamma = [
            "losskern", "bnstats", "--x", "x", "--layout", "nc", "--gamma", "g",
        ];
        assert_eq!(code(&[&gamma[..], &["--out", "o"]].concat()), Some(2));
        assert_eq!(code(&["losskern"]), None);
        assert_eq!(code(&["losskern", "check", "--backend", "cpu"]), None);
    }
}
