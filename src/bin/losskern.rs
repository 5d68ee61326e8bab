//! `losskern`: the command line of the crate.
//!
//! With no arguments it runs `check` on every backend present and then `bench` on the
//! best device, so `cargo run --release` on a fresh machine shows the project working.
//! `info` lists the backends; one command per op reads `.npy` inputs and writes every
//! output as `.npy` plus a JSON summary, so a PyTorch user can run the kernels on
//! their own arrays. Exit codes: 0 success, 1 an error or a failed check, 2 a bad
//! command line.

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::str::FromStr;
use std::time::{Duration, Instant};

use losskern::check::{self, Outcome, Report};
use losskern::npy::{self, Array};
use losskern::ops::bnstats::{self, Affine, BnStats, Layout, RunningStats};
use losskern::ops::energy::{self, EnergyDistance, EnergyScore, Statistic};
use losskern::ops::ensemble::{self, Ensemble, Landscape};
use losskern::ops::xent::{
    self, Directional, Gap, GradDType, RadiusOptions, Reduction, RhoReduce, Targets, Xent,
    XentOptions,
};
use losskern::{Backend, DType, Device, Error, Tensor};

const USAGE: &str = "\
losskern: fused cross-entropy + softmax radius, MLP ensembles, energy distances and
batch-norm statistics on CUDA, WebGPU and the CPU.

usage: losskern [COMMAND] [OPTIONS]

  (no command)      check on every backend present, then bench on the best device
  info              the backends found: CPU, CUDA device and NVRTC, wgpu adapters
  check             every correctness case on every backend, against the f64 reference
  bench             a few seconds of xent forward, in ms and GB/s
  xent, xent-directional, ensemble, landscape, energy-score, energy-distance, bnstats
                    run one op on .npy files
  help              this text; `losskern COMMAND --help` for one command

Op commands read C-order little-endian .npy files ('<f4', '<f2', '<f8' rounded to
f32; class indices '<i8' or '<i4'), write every output as OUT/NAME.npy ('<f4', '<f2',
'<f8', '<i8'; bf16 outputs as '<f4', which holds them exactly) and print a JSON
summary (op, device, inputs, outputs with the value of one-element outputs, notes,
elapsed_ms: from the op call to device synchronize, which in a fresh process includes
compiling the kernels; `bench` times warm calls); non-finite numbers are written as
NaN / Infinity, as Python's json module does. Exit codes: 0 success, 1 an error or a
failed check, 2 a bad command line. Every op command also takes:
  --device cpu|cuda|wgpu|best   default best; with best, an op that has no kernel on
                                the device yet runs on the CPU (said in the notes)
  --dtype f32|f16|bf16          dtype of the float inputs (default: the file's; f64
                                files become f32). NumPy has no bf16: --dtype bf16
                                rounds the inputs to bf16 on upload
  --out DIR                     where the .npy outputs go (created)
  --json FILE                   write the summary there instead of stdout
";

/// One subcommand: the options it takes, its help and its entry point.
struct Command {
    name: &'static str,
    /// Option names without `--`; a trailing `=` marks an option that takes a value.
    options: &'static [&'static str],
    /// Also takes `OP_OPTIONS` (the op commands).
    op: bool,
    usage: &'static str,
    run: fn(&Args) -> Result<(), Failure>,
}

const OP_OPTIONS: &[&str] = &["device=", "dtype=", "out=", "json="];

const COMMANDS: &[Command] = &[
    Command {
        name: "info",
        options: &[],
        op: false,
        usage: "losskern info",
        run: info,
    },
    Command {
        name: "check",
        options: &["backend=", "large"],
        op: false,
        usage: "losskern check [--backend cpu|cuda|wgpu|all]\n  \
                runs every case of the correctness harness on each backend (all: the CPU and\n  \
                every GPU backend present) and prints op x backend with the worst error as a\n  \
                fraction of the allowed error; exits 1 on any failure. --large runs instead\n  \
                one xent problem past 2^31 logits (16384 x 131072 bf16) on the CUDA device,\n  \
                comparing sampled rows with the reference (64-bit indexing; needs ~10 GB of\n  \
                host memory and 4 GB on the device)",
        run: check_command,
    },
    Command {
        name: "bench",
        options: &["device=", "dtype=", "shape=", "grad", "json"],
        op: false,
        usage: "losskern bench [--device cpu|cuda|wgpu|best] [--dtype f32|f16|bf16]\n  \
                [--shape BxV] [--grad] [--json]\n  \
                xent (all outputs; the gradient too with --grad) for a few seconds: by default\n  \
                4096 x 32000 bf16 on a GPU, 256 x 32000 f32 on the CPU. GB/s counts the logits\n  \
                read once and, with --grad, the gradient written once. On CUDA it also times\n  \
                the zero-copy entry (cuda::xent::xent_raw) with reused output buffers, the\n  \
                kernels alone; the Tensor call adds the host check of the targets and the\n  \
                output allocations. --json prints one JSON line (benches/peers reads it).",
        run: bench_command,
    },
    Command {
        name: "xent",
        options: &[
            "logits=",
            "targets=",
            "soft-targets=",
            "weights=",
            "temperature=",
            "label-smoothing=",
            "ignore-index=",
            "reduction=",
            "z-loss=",
            "grad",
            "gap=",
            "rho-reduce=",
            "rho-eps=",
            "rho-cap=",
            "rho-floor=",
            "inf-if-small",
        ],
        op: true,
        usage:
            "losskern xent --logits z.npy (--targets y.npy | --soft-targets q.npy) --out DIR\n  \
                [--weights w.npy] [--temperature T] [--label-smoothing E] [--ignore-index I]\n  \
                [--reduction mean|sum|none] [--z-loss C] [--grad] [--gap maxmin|top2]\n  \
                [--rho-reduce mean|max|per-sample] [--rho-eps E] [--rho-cap C] [--rho-floor F]\n  \
                [--inf-if-small]\n  \
                z [B, V]; y [B] class indices; q [B, V]; w [V] class weights.\n  \
                Writes loss, loss_per_row, lse, entropy, argmax, max, min, top2_gap, delta,\n  \
                rho (and grad with --grad).",
        run: xent_command,
    },
    Command {
        name: "xent-directional",
        options: &["logits=", "derivatives=", "step="],
        op: true,
        usage:
            "losskern xent-directional --logits z.npy --derivatives a.npy --step TAU --out DIR\n  \
                z, a [B, V] (a = J v, the logits' derivatives along an update direction).\n  \
                Writes delta_a, rho_a, normalized_step (and binary_radius when V = 2).",
        run: directional_command,
    },
    Command {
        name: "ensemble",
        options: &["weights=", "biases=", "input=", "labels=", "logits"],
        op: true,
        usage: "losskern ensemble --weights w0.npy,w1.npy --biases b0.npy,b1.npy --input x.npy\n  \
                --labels y.npy [--logits] --out DIR\n  \
                layer l: w_l [E, out, in], b_l [E, out]; x [B, d0] or [E, B, d0]; y [B].\n  \
                Writes loss and accuracy [E] (f64), and logits [E, B, C] with --logits.",
        run: ensemble_command,
    },
    Command {
        name: "landscape",
        options: &[
            "center-weights=",
            "center-biases=",
            "direction-weights=",
            "direction-biases=",
            "direction-of=",
            "distance=",
            "input=",
            "labels=",
            "logits",
        ],
        op: true,
        usage: "losskern landscape --center-weights w0.npy,.. --center-biases b0.npy,..\n  \
                --direction-weights dw0.npy,.. --direction-biases db0.npy,..\n  \
                --direction-of k.npy --distance t.npy --input x.npy --labels y.npy [--logits]\n  \
                --out DIR\n  \
                model e = centre + t[e] * direction k[e]: w_l [out, in], dw_l [K, out, in],\n  \
                k [E] integers, t [E]. Writes loss, accuracy (and logits). When a model has\n  \
                t = 0, the summary gives roughness and grit per direction whose positive\n  \
                distances double (h, 2h, 4h, ...).",
        run: landscape_command,
    },
    Command {
        name: "energy-score",
        options: &["y=", "preds=", "beta=", "grad"],
        op: true,
        usage: "losskern energy-score --y y.npy --preds p.npy [--beta B] [--grad] --out DIR\n  \
                y [n, d], preds [n, m, d], beta in (0, 2] (default 1).\n  \
                Writes term1, term2, loss (and grad [n, m, d] with --grad).",
        run: energy_score_command,
    },
    Command {
        name: "energy-distance",
        options: &[
            "x=",
            "y=",
            "weights-x=",
            "weights-y=",
            "beta=",
            "statistic=",
        ],
        op: true,
        usage: "losskern energy-distance --x x.npy --y y.npy [--weights-x wx.npy]\n  \
                [--weights-y wy.npy] [--beta B] [--statistic v|u] --out DIR\n  \
                x [N, d], y [M, d], sample weights [N] and [M]. Writes distance, cross,\n  \
                within_x, within_y.",
        run: energy_distance_command,
    },
    Command {
        name: "bnstats",
        options: &[
            "x=",
            "layout=",
            "eps=",
            "normalize",
            "gamma=",
            "beta=",
            "momentum=",
        ],
        op: true,
        usage: "losskern bnstats --x x.npy --layout nchw|nhwc|nc [--eps E] [--normalize\n  \
                [--gamma g.npy] [--beta b.npy]] [--momentum M] --out DIR\n  \
                eps defaults to 1e-5 (PyTorch). Writes mean, var_biased, var_unbiased, invstd,\n  \
                m2 [C] (the Welford partial is (count, mean, m2)), y with --normalize, and\n  \
                with --momentum the running_mean / running_var PyTorch holds after one\n  \
                training step from its initial state.",
        run: bnstats_command,
    },
];

/// Why the program stops early.
enum Failure {
    /// A bad command line: the message and the usage, exit code 2.
    Usage(String),
    /// The library refused the inputs or failed: exit code 1.
    Lib(Error),
    /// `check` found this many failing cases: exit code 1.
    Checks(usize),
}

impl From<Error> for Failure {
    fn from(e: Error) -> Self {
        Failure::Lib(e)
    }
}

fn usage_error(message: impl Into<String>) -> Failure {
    Failure::Usage(message.into())
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().skip(1).collect();
    match dispatch(&argv) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure::Usage(message)) => {
            eprintln!("losskern: {message}\nrun `losskern help` for usage");
            ExitCode::from(2)
        }
        Err(Failure::Lib(e)) => {
            eprintln!("losskern: {e}");
            ExitCode::FAILURE
        }
        Err(Failure::Checks(count)) => {
            eprintln!("losskern: {count} check(s) failed");
            ExitCode::FAILURE
        }
    }
}

fn dispatch(argv: &[String]) -> Result<(), Failure> {
    let Some((name, rest)) = argv.split_first() else {
        return default_run();
    };
    if matches!(name.as_str(), "help" | "--help" | "-h") {
        print!("{USAGE}");
        return Ok(());
    }
    let command = COMMANDS
        .iter()
        .find(|c| c.name == name)
        .ok_or_else(|| usage_error(format!("unknown command '{name}'")))?;
    if rest.iter().any(|a| a == "--help" || a == "-h") {
        println!("{}", command.usage);
        return Ok(());
    }
    (command.run)(&Args::parse(command, rest)?)
}

/// No arguments: the checks on every backend present, then the benchmark on the best
/// device (run even when a check failed, so the numbers are still shown).
fn default_run() -> Result<(), Failure> {
    losskern::device::poison_outputs(true);
    let checks = run_checks(&devices_present());
    losskern::device::poison_outputs(false);
    bench(&Device::best(), None, None, false, false)?;
    checks
}

/// The parsed options of one command.
struct Args {
    command: &'static str,
    given: Vec<(String, Option<String>)>,
}

impl Args {
    /// Accepts `--name value`, `--name=value` and `--flag`; anything the command does not
    /// take is a usage error.
    fn parse(command: &Command, argv: &[String]) -> Result<Args, Failure> {
        let takes = |option: &str| {
            command.options.contains(&option) || (command.op && OP_OPTIONS.contains(&option))
        };
        let mut given: Vec<(String, Option<String>)> = Vec::new();
        let mut rest = argv.iter();
        while let Some(arg) = rest.next() {
            let Some(body) = arg.strip_prefix("--") else {
                return Err(usage_error(format!(
                    "{}: unexpected argument '{arg}'",
                    command.name
                )));
            };
            let (name, inline) = match body.split_once('=') {
                Some((name, value)) => (name, Some(value.to_string())),
                None => (body, None),
            };
            let value = if takes(&format!("{name}=")) {
                Some(inline.or_else(|| rest.next().cloned()).ok_or_else(|| {
                    usage_error(format!("{}: --{name} needs a value", command.name))
                })?)
            } else if !takes(name) {
                return Err(usage_error(format!(
                    "{}: unknown option --{name}",
                    command.name
                )));
            } else if inline.is_some() {
                return Err(usage_error(format!(
                    "{}: --{name} takes no value",
                    command.name
                )));
            } else {
                None
            };
            if given.iter().any(|(n, _)| n == name) {
                return Err(usage_error(format!(
                    "{}: --{name} given twice",
                    command.name
                )));
            }
            given.push((name.to_string(), value));
        }
        Ok(Args {
            command: command.name,
            given,
        })
    }

    /// Whether `--name` was given (a flag, or an option with its value).
    fn has(&self, name: &str) -> bool {
        self.given.iter().any(|(n, _)| n == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.given
            .iter()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn required(&self, name: &str) -> Result<&str, Failure> {
        self.value(name)
            .ok_or_else(|| usage_error(format!("{}: --{name} is required", self.command)))
    }

    /// The option parsed as a number; ranges are the library's to check.
    fn parsed<T: FromStr>(&self, name: &str) -> Result<Option<T>, Failure> {
        self.value(name)
            .map(|v| {
                v.parse().map_err(|_| {
                    usage_error(format!("{}: --{name} '{v}' is not a number", self.command))
                })
            })
            .transpose()
    }

    /// The option as one of `choices`.
    fn choice<T: Copy>(&self, name: &str, choices: &[(&str, T)]) -> Result<Option<T>, Failure> {
        self.value(name)
            .map(|v| {
                choices
                    .iter()
                    .find(|(word, _)| *word == v)
                    .map(|&(_, t)| t)
                    .ok_or_else(|| {
                        let words: Vec<&str> = choices.iter().map(|(w, _)| *w).collect();
                        usage_error(format!(
                            "{}: --{name} must be one of {}, got '{v}'",
                            self.command,
                            words.join(", ")
                        ))
                    })
            })
            .transpose()
    }

    /// `--name cpu|cuda|wgpu|OTHER`: the backend named; None for OTHER ("best", "all")
    /// and when the option is not given.
    fn backend(&self, name: &str, other: &'static str) -> Result<Option<Backend>, Failure> {
        let choices = [
            ("cpu", Some(Backend::Cpu)),
            ("cuda", Some(Backend::Cuda)),
            ("wgpu", Some(Backend::Wgpu)),
            (other, None),
        ];
        Ok(self.choice(name, &choices)?.flatten())
    }

    /// `--device cpu|cuda|wgpu|best`: the device, and whether it was chosen by `best`
    /// (then an op the device lacks may fall back to the CPU).
    fn device(&self) -> Result<(Device, bool), Failure> {
        Ok(match self.backend("device", "best")? {
            Some(backend) => (open(backend)?, false),
            None => (Device::best(), true),
        })
    }

    fn dtype(&self) -> Result<Option<DType>, Failure> {
        self.choice(
            "dtype",
            &[
                ("f32", DType::F32),
                ("f16", DType::F16),
                ("bf16", DType::BF16),
            ],
        )
    }
}

/// The device of a backend: CUDA device 0, the first wgpu adapter, or the CPU.
fn open(backend: Backend) -> losskern::Result<Device> {
    match backend {
        Backend::Cpu => Ok(Device::Cpu),
        Backend::Cuda => Device::cuda(0),
        Backend::Wgpu => Device::wgpu(),
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

fn info(_: &Args) -> Result<(), Failure> {
    println!("losskern {}", env!("CARGO_PKG_VERSION"));
    println!("cpu: available (the f64 reference, outputs rounded to the GPU backends' dtypes)");
    match losskern::cuda::backend(0) {
        Ok(cuda) => {
            let info = cuda.info();
            let (major, minor) = info.nvrtc_version;
            println!("cuda: {} ({}), NVRTC {major}.{minor}", info.name, info.arch);
        }
        Err(e) => {
            println!("cuda: unavailable: {e}");
            // NVRTC alone is enough to compile the kernels (what CI checks without a GPU).
            match losskern::cuda::nvrtc_version() {
                Ok((major, minor)) => println!("  NVRTC {major}.{minor} loads: kernels compile"),
                Err(e) => println!("  {e}"),
            }
        }
    }
    let adapters = losskern::wgpu::adapters();
    println!("wgpu adapters: {}", adapters.len());
    for adapter in &adapters {
        println!("  {adapter}");
    }
    match losskern::wgpu::backend() {
        Ok(wgpu) => {
            let info = wgpu.info();
            println!(
                "wgpu: using {} ({}, {}; driver {} {}), shader-f16: {}, max storage binding {} MiB",
                info.name,
                info.backend,
                info.device_type,
                info.driver,
                info.driver_info,
                if info.shader_f16 { "yes" } else { "no" },
                info.max_storage_buffer_binding_size >> 20
            );
        }
        Err(e) => println!("wgpu: unavailable: {e}"),
    }
    println!("best device: {}", Device::best().name());
    Ok(())
}

fn check_command(args: &Args) -> Result<(), Failure> {
    losskern::device::poison_outputs(true);
    let devices = match args.backend("backend", "all")? {
        Some(backend) => vec![open(backend)?],
        None => devices_present(),
    };
    if args.has("large") {
        return run_large(&devices);
    }
    run_checks(&devices)
}

/// Runs every case on every device, with a progress line per run on stderr, then
/// prints one row per case with a column per backend.
fn run_checks(devices: &[Device]) -> Result<(), Failure> {
    let cases = check::cases();
    let total = cases.len() * devices.len();
    let mut rows: Vec<Vec<Report>> = Vec::with_capacity(cases.len());
    for (i, case) in cases.iter().enumerate() {
        let row: Vec<Report> = devices
            .iter()
            .enumerate()
            .map(|(j, device)| {
                let report = check::run(case, device);
                eprintln!(
                    "[{}/{total}] {} {} {} on {}: {}",
                    i * devices.len() + j + 1,
                    report.op,
                    report.dtype,
                    report.shape,
                    report.backend,
                    verdict(&report)
                );
                report
            })
            .collect();
        rows.push(row);
    }
    print_check_table(devices, &rows);
    let failures: Vec<&Report> = rows
        .iter()
        .flatten()
        .filter(|r| matches!(r.outcome, Outcome::Fail(_)))
        .collect();
    for r in &failures {
        if let Outcome::Fail(why) = &r.outcome {
            println!(
                "\nFAIL {} {} {} on {}:\n{why}",
                r.op, r.dtype, r.shape, r.backend
            );
        }
    }
    if failures.is_empty() {
        Ok(())
    } else {
        Err(Failure::Checks(failures.len()))
    }
}

/// The 64-bit indexing check on the CUDA device: wgpu tensors cannot hold 2^31 bf16 logits.
fn run_large(devices: &[Device]) -> Result<(), Failure> {
    for device in devices.iter().filter(|d| d.backend() == Backend::Wgpu) {
        println!(
            "check --large: skipped on {}: a wgpu tensor is one buffer of at most \
             max_buffer_size (4 GiB on the H200), which 2^31 bf16 logits exceed",
            device.name()
        );
    }
    let gpus: Vec<&Device> = devices
        .iter()
        .filter(|d| d.backend() == Backend::Cuda)
        .collect();
    if gpus.is_empty() {
        println!("check --large: no CUDA device present; nothing to run");
        return Ok(());
    }
    let mut failed = 0;
    for device in gpus {
        eprintln!(
            "check --large: xent 16384 x 131072 bf16 on {} ...",
            device.name()
        );
        let report = check::xent::run_large(16384, 131_072, DType::BF16, device);
        println!(
            "{} {} {} on {}: {}",
            report.op,
            report.dtype,
            report.shape,
            report.backend,
            verdict(&report)
        );
        if let Outcome::Fail(why) = &report.outcome {
            println!("{why}");
            failed += 1;
        }
    }
    if failed == 0 {
        Ok(())
    } else {
        Err(Failure::Checks(failed))
    }
}

/// "pass 0.031" (worst error / allowed error), "FAIL 3.2", "unsupported".
fn verdict(report: &Report) -> String {
    let ratio = if report.max_error.is_nan() {
        "error".to_string()
    } else if report.max_error < 1e3 {
        format!("{:.3}", report.max_error)
    } else {
        format!("{:.1e}", report.max_error)
    };
    match report.outcome {
        Outcome::Pass => format!("pass {ratio}"),
        Outcome::Fail(_) => format!("FAIL {ratio}"),
        Outcome::Unsupported => "unsupported".to_string(),
    }
}

fn print_check_table(devices: &[Device], rows: &[Vec<Report>]) {
    let mut header = vec!["op".to_string(), "dtype".into(), "shape".into()];
    header.extend(devices.iter().map(|d| d.backend().name().to_string()));
    header.push("tolerance (|err| <=)".into());
    let mut table = vec![header];
    for row in rows {
        let Some(first) = row.first() else { continue };
        let mut line = vec![first.op.clone(), first.dtype.clone(), first.shape.clone()];
        line.extend(row.iter().map(verdict));
        // The tolerance depends on the case, not the backend; an errored run has none.
        let tolerance = row
            .iter()
            .map(|r| r.tolerance.as_str())
            .find(|t| !t.is_empty());
        line.push(tolerance.unwrap_or("").to_string());
        table.push(line);
    }
    let columns = table[0].len();
    let widths: Vec<usize> = (0..columns)
        .map(|c| table.iter().map(|line| line[c].len()).max().unwrap_or(0))
        .collect();
    println!("\nworst |err| / allowed per case and backend (<= 1 passes):");
    for line in &table {
        let cells: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(cell, &w)| format!("{cell:<w$}"))
            .collect();
        println!("{}", cells.join("  ").trim_end());
    }
    let count = |f: fn(&Outcome) -> bool| rows.iter().flatten().filter(|r| f(&r.outcome)).count();
    println!(
        "{} passed, {} failed, {} unsupported",
        count(|o| *o == Outcome::Pass),
        count(|o| matches!(o, Outcome::Fail(_))),
        count(|o| *o == Outcome::Unsupported)
    );
}

fn bench_command(args: &Args) -> Result<(), Failure> {
    let (device, _) = args.device()?;
    let shape = args
        .value("shape")
        .map(|text| {
            text.split_once('x')
                .and_then(|(b, v)| Some((b.parse().ok()?, v.parse().ok()?)))
                .ok_or_else(|| usage_error(format!("bench: --shape '{text}' is not BxV")))
        })
        .transpose()?;
    bench(
        &device,
        args.dtype()?,
        shape,
        args.has("grad"),
        args.has("json"),
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

/// A quick benchmark, not the criterion benches: xent at one LLM-like shape.
fn bench(
    device: &Device,
    dtype: Option<DType>,
    shape: Option<(usize, usize)>,
    grad: bool,
    json: bool,
) -> Result<(), Failure> {
    let (default_shape, default_dtype) = match device.backend() {
        Backend::Cpu => ((256, 32000), DType::F32),
        Backend::Cuda | Backend::Wgpu => ((4096, 32000), DType::BF16),
    };
    let (batch, classes) = shape.unwrap_or(default_shape);
    if batch == 0 || classes == 0 {
        return Err(usage_error("bench: --shape needs B >= 1 and V >= 1"));
    }
    let dtype = dtype.unwrap_or(default_dtype);
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
    let raw = time_cuda_raw(device, &call)?;
    let logits_bytes = (batch * classes * dtype.size()) as f64;
    let bytes = if grad {
        2.0 * logits_bytes
    } else {
        logits_bytes
    };
    let median = |t: &[f64]| t[t.len() / 2];
    let gbps = |ms: f64| bytes / (ms * 1e-3) / 1e9;
    let kernels = raw.as_deref().unwrap_or(&tensor);
    if json {
        println!(
            "{}",
            Json::object([
                ("op", Json::Str("xent".into())),
                ("device", Json::Str(device.name())),
                ("shape", Json::shape(&[batch, classes])),
                ("dtype", Json::Str(dtype.name().into())),
                ("grad", Json::Bool(grad)),
                ("bytes", Json::Num(bytes)),
                ("median_ms", Json::Num(median(kernels))),
                ("best_ms", Json::Num(kernels[0])),
                ("gb_per_s", Json::Num(gbps(median(kernels)))),
                ("zero_copy", Json::Bool(raw.is_some())),
                ("tensor_median_ms", Json::Num(median(&tensor))),
            ])
        );
        return Ok(());
    }
    let what = if grad { "forward + grad" } else { "forward" };
    println!(
        "\nbench: xent {what}, {batch} x {classes} {dtype}, on {} ({:.1} MB counted)",
        device.name(),
        bytes / 1e6
    );
    let mut rows = vec![("Tensor call", &tensor)];
    if let Some(raw) = &raw {
        rows.push(("zero-copy entry", raw));
    }
    for (label, times) in rows {
        println!(
            "  {label:<16} {} batches: median {:.3} ms, best {:.3} ms, {:.1} GB/s at the median",
            times.len(),
            median(times),
            times[0],
            gbps(median(times))
        );
    }
    Ok(())
}

/// Runs `op` and waits for the device: the result and the milliseconds from the call
/// to the end of the synchronize.
fn timed<T>(
    device: &Device,
    op: impl FnOnce() -> losskern::Result<T>,
) -> losskern::Result<(T, f64)> {
    let start = Instant::now();
    let out = op()?;
    device.synchronize()?;
    Ok((out, start.elapsed().as_secs_f64() * 1e3))
}

/// What an input array is converted to on upload.
#[derive(Clone, Copy)]
enum Want {
    /// The op's float dtype: `--dtype`, else that of the first such input.
    Compute,
    /// f32 whatever the op's dtype (class weights, sample weights, gamma, beta, distances).
    F32,
    /// i64 class indices.
    Index,
}

/// An input read from a file, with the dtype it is uploaded as.
struct Input {
    array: Array,
    dtype: DType,
}

impl Input {
    fn upload(&self, device: &Device) -> losskern::Result<Tensor> {
        self.array.to_tensor(device, self.dtype)
    }
}

/// Uploads a list of inputs (the layers of an ensemble).
fn upload_all(inputs: &[Input], device: &Device) -> losskern::Result<Vec<Tensor>> {
    inputs.iter().map(|i| i.upload(device)).collect()
}

/// The slices of tensor references the ensemble calls take.
fn refs(tensors: &[Tensor]) -> Vec<&Tensor> {
    tensors.iter().collect()
}

/// One run of an op command: reads the inputs, runs the op, writes the outputs and
/// the JSON summary.
struct OpRun {
    op: &'static str,
    device: Device,
    /// Whether an op with no kernel on `device` may run on the CPU (`--device best`).
    fallback: bool,
    dtype: Option<DType>,
    out: PathBuf,
    json: Option<PathBuf>,
    inputs: Vec<(String, Json)>,
    outputs: Vec<(String, Json)>,
    extra: Vec<(String, Json)>,
    notes: Vec<String>,
    elapsed_ms: f64,
}

impl OpRun {
    fn new(args: &Args) -> Result<OpRun, Failure> {
        let out = PathBuf::from(args.required("out")?);
        let (device, fallback) = args.device()?;
        Ok(OpRun {
            op: args.command,
            device,
            fallback,
            dtype: args.dtype()?,
            out,
            json: args.value("json").map(PathBuf::from),
            inputs: Vec::new(),
            outputs: Vec::new(),
            extra: Vec::new(),
            notes: Vec::new(),
            elapsed_ms: f64::NAN,
        })
    }

    /// A note for the summary, also shown on stderr as it happens.
    fn note(&mut self, note: String) {
        eprintln!("note: {note}");
        self.notes.push(note);
    }

    /// Reads `--name FILE` (None when not given) and decides the dtype it uploads as.
    fn optional_input(
        &mut self,
        args: &Args,
        name: &str,
        want: Want,
    ) -> Result<Option<Input>, Failure> {
        let Some(path) = args.value(name) else {
            return Ok(None);
        };
        self.read(name, path, want).map(Some)
    }

    fn input(&mut self, args: &Args, name: &str, want: Want) -> Result<Input, Failure> {
        let path = args.required(name)?;
        self.read(name, path, want)
    }

    /// Reads a comma-separated list of files, recorded as `name[0]`, `name[1]`, ...
    fn inputs(&mut self, args: &Args, name: &str, want: Want) -> Result<Vec<Input>, Failure> {
        args.required(name)?
            .split(',')
            .enumerate()
            .map(|(i, path)| self.read(&format!("{name}[{i}]"), path, want))
            .collect()
    }

    fn read(&mut self, name: &str, path: &str, want: Want) -> Result<Input, Failure> {
        let array = npy::read(Path::new(path))?;
        let dtype = match (want, array.float_dtype()) {
            (Want::Index, None) => DType::I64,
            (Want::Compute, Some(natural)) => *self.dtype.get_or_insert(natural),
            (Want::F32, Some(_)) => DType::F32,
            (Want::Index, Some(_)) => {
                return Err(Error::DType(format!(
                    "--{name} {path}: class indices must be '<i8' or '<i4', got '{}'",
                    array.descr
                ))
                .into())
            }
            (Want::Compute | Want::F32, None) => {
                return Err(Error::DType(format!(
                    "--{name} {path}: must hold floats ('<f4', '<f2', '<f8'), got '{}'",
                    array.descr
                ))
                .into())
            }
        };
        let natural = array.float_dtype().unwrap_or(DType::I64);
        if array.descr == "<f8" || natural != dtype {
            self.note(format!(
                "--{name}: '{}' values rounded to {dtype}",
                array.descr
            ));
        }
        self.inputs.push((
            name.to_string(),
            Json::object([
                ("file", Json::Str(path.to_string())),
                ("descr", Json::Str(array.descr.clone())),
                ("shape", Json::shape(&array.shape)),
                ("as", Json::Str(dtype.name().to_string())),
            ]),
        ));
        Ok(Input { array, dtype })
    }

    /// Runs `op` on the device; with `--device best`, an op that has no kernel there yet
    /// runs on the CPU instead.
    fn execute<T>(
        &mut self,
        op: impl Fn(&Device) -> losskern::Result<(T, f64)>,
    ) -> Result<T, Failure> {
        let (out, ms) = match op(&self.device) {
            Err(Error::Unsupported { op: name, backend }) if self.fallback => {
                self.note(format!(
                    "{name} has no {backend} kernel yet: ran on the CPU"
                ));
                self.device = Device::Cpu;
                op(&self.device)?
            }
            result => result?,
        };
        self.elapsed_ms = ms;
        Ok(out)
    }

    /// Writes each given output as OUT/NAME.npy and records it in the summary, with its
    /// value when it has one element.
    fn outputs(&mut self, outputs: &[(&str, Option<&Tensor>)]) -> Result<(), Failure> {
        // Created only now, so that a run refused earlier leaves nothing behind.
        std::fs::create_dir_all(&self.out).map_err(|e| npy::io_error(&self.out, e))?;
        for &(name, tensor) in outputs {
            let Some(tensor) = tensor else { continue };
            let array = Array::from_tensor(tensor)?;
            let path = self.out.join(format!("{name}.npy"));
            npy::write(&path, &array)?;
            let mut entry = vec![
                ("file", Json::Str(path.display().to_string())),
                ("dtype", Json::Str(tensor.dtype().name().to_string())),
                ("descr", Json::Str(array.descr.clone())),
                ("shape", Json::shape(&array.shape)),
            ];
            if tensor.len() == 1 {
                entry.push(("value", Json::Num(tensor.to_f64_vec()?[0])));
            }
            self.outputs.push((name.to_string(), Json::object(entry)));
        }
        Ok(())
    }

    /// Prints the summary, or writes it to `--json FILE`.
    fn finish(self) -> Result<(), Failure> {
        let mut fields = vec![
            ("op".to_string(), Json::Str(self.op.to_string())),
            ("device".into(), Json::Str(self.device.name())),
            // Every op reads a float input first, which sets the dtype.
            (
                "dtype".into(),
                Json::Str(self.dtype.map_or("", DType::name).to_string()),
            ),
            ("inputs".into(), Json::Obj(self.inputs)),
            ("outputs".into(), Json::Obj(self.outputs)),
            ("elapsed_ms".into(), Json::Num(self.elapsed_ms)),
        ];
        fields.extend(self.extra);
        fields.push((
            "notes".into(),
            Json::Arr(self.notes.into_iter().map(Json::Str).collect()),
        ));
        let text = format!("{}\n", Json::Obj(fields).pretty(0, 2));
        match &self.json {
            Some(path) => std::fs::write(path, text).map_err(|e| npy::io_error(path, e))?,
            None => print!("{text}"),
        }
        Ok(())
    }
}

fn xent_options(args: &Args) -> Result<XentOptions, Failure> {
    let d = XentOptions::default();
    let r = d.radius;
    Ok(XentOptions {
        temperature: args.parsed("temperature")?.unwrap_or(d.temperature),
        label_smoothing: args.parsed("label-smoothing")?.unwrap_or(d.label_smoothing),
        ignore_index: args.parsed("ignore-index")?.unwrap_or(d.ignore_index),
        reduction: args
            .choice(
                "reduction",
                &[
                    ("mean", Reduction::Mean),
                    ("sum", Reduction::Sum),
                    ("none", Reduction::None),
                ],
            )?
            .unwrap_or(d.reduction),
        z_loss: args.parsed("z-loss")?.unwrap_or(d.z_loss),
        grad: args.has("grad"),
        radius: RadiusOptions {
            gap: args
                .choice("gap", &[("maxmin", Gap::MaxMin), ("top2", Gap::Top2)])?
                .unwrap_or(r.gap),
            reduce: args
                .choice(
                    "rho-reduce",
                    &[
                        ("mean", RhoReduce::Mean),
                        ("max", RhoReduce::Max),
                        ("per-sample", RhoReduce::PerSample),
                    ],
                )?
                .unwrap_or(r.reduce),
            eps: args.parsed("rho-eps")?.unwrap_or(r.eps),
            cap: args.parsed("rho-cap")?,
            floor: args.parsed("rho-floor")?,
            inf_if_small: args.has("inf-if-small"),
        },
    })
}

fn xent_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    let options = xent_options(args)?;
    let logits = run.input(args, "logits", Want::Compute)?;
    let (targets, soft) = match (
        run.optional_input(args, "targets", Want::Index)?,
        run.optional_input(args, "soft-targets", Want::Compute)?,
    ) {
        (Some(y), None) => (y, false),
        (None, Some(q)) => (q, true),
        _ => {
            return Err(usage_error(
                "xent: give exactly one of --targets and --soft-targets",
            ))
        }
    };
    let weights = run.optional_input(args, "weights", Want::F32)?;
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
    run.outputs(&[
        ("loss", Some(&out.loss)),
        ("loss_per_row", Some(&out.loss_per_row)),
        ("lse", Some(&out.lse)),
        ("entropy", Some(&out.entropy)),
        ("argmax", Some(&out.argmax)),
        ("max", Some(&out.max)),
        ("min", Some(&out.min)),
        ("top2_gap", Some(&out.top2_gap)),
        ("delta", Some(&out.delta)),
        ("rho", Some(&out.rho)),
        ("grad", out.grad.as_ref()),
    ])?;
    run.finish()
}

fn directional_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    let step = args
        .parsed("step")?
        .ok_or_else(|| usage_error("xent-directional: --step is required"))?;
    let logits = run.input(args, "logits", Want::Compute)?;
    let derivatives = run.input(args, "derivatives", Want::Compute)?;
    let out = run.execute(|device| {
        let z = logits.upload(device)?;
        let a = derivatives.upload(device)?;
        let call = Directional {
            logits: &z,
            derivatives: &a,
            step,
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

fn ensemble_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    // The input first: it sets the dtype the layers are converted to.
    let input = run.input(args, "input", Want::Compute)?;
    let weights = run.inputs(args, "weights", Want::Compute)?;
    let biases = run.inputs(args, "biases", Want::Compute)?;
    let labels = run.input(args, "labels", Want::Index)?;
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
            logits: args.has("logits"),
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

fn landscape_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    let input = run.input(args, "input", Want::Compute)?;
    let center_weights = run.inputs(args, "center-weights", Want::Compute)?;
    let center_biases = run.inputs(args, "center-biases", Want::Compute)?;
    let direction_weights = run.inputs(args, "direction-weights", Want::Compute)?;
    let direction_biases = run.inputs(args, "direction-biases", Want::Compute)?;
    let direction_of = run.input(args, "direction-of", Want::Index)?;
    let distance = run.input(args, "distance", Want::F32)?;
    let labels = run.input(args, "labels", Want::Index)?;
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
            logits: args.has("logits"),
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

fn energy_score_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    let beta = args.parsed("beta")?.unwrap_or(1.0);
    let preds = run.input(args, "preds", Want::Compute)?;
    let y = run.input(args, "y", Want::Compute)?;
    let out = run.execute(|device| {
        let (p, y) = (preds.upload(device)?, y.upload(device)?);
        let call = EnergyScore {
            y: &y,
            preds: &p,
            beta,
            grad: args.has("grad"),
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

fn energy_distance_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    let beta = args.parsed("beta")?.unwrap_or(1.0);
    let statistic = args
        .choice("statistic", &[("v", Statistic::V), ("u", Statistic::U)])?
        .unwrap_or_default();
    let x = run.input(args, "x", Want::Compute)?;
    let y = run.input(args, "y", Want::Compute)?;
    let weights_x = run.optional_input(args, "weights-x", Want::F32)?;
    let weights_y = run.optional_input(args, "weights-y", Want::F32)?;
    let out = run.execute(|device| {
        let (x, y) = (x.upload(device)?, y.upload(device)?);
        let wx = weights_x.as_ref().map(|w| w.upload(device)).transpose()?;
        let wy = weights_y.as_ref().map(|w| w.upload(device)).transpose()?;
        let call = EnergyDistance {
            x: &x,
            y: &y,
            weights_x: wx.as_ref(),
            weights_y: wy.as_ref(),
            beta,
            statistic,
        };
        timed(device, || energy::energy_distance(&call))
    })?;
    run.outputs(&[
        ("distance", Some(&out.distance)),
        ("cross", Some(&out.cross)),
        ("within_x", Some(&out.within_x)),
        ("within_y", Some(&out.within_y)),
    ])?;
    run.finish()
}

fn bnstats_command(args: &Args) -> Result<(), Failure> {
    let mut run = OpRun::new(args)?;
    let layout = args
        .choice(
            "layout",
            &[
                ("nchw", Layout::Nchw),
                ("nhwc", Layout::Nhwc),
                ("nc", Layout::Nc),
            ],
        )?
        .ok_or_else(|| usage_error("bnstats: --layout is required"))?;
    // PyTorch's BatchNorm default.
    let eps = args.parsed("eps")?.unwrap_or(1e-5);
    let momentum: Option<f64> = args.parsed("momentum")?;
    let normalize = args.has("normalize");
    if !normalize && (args.has("gamma") || args.has("beta")) {
        return Err(usage_error("bnstats: --gamma and --beta need --normalize"));
    }
    let x = run.input(args, "x", Want::Compute)?;
    let gamma = run.optional_input(args, "gamma", Want::F32)?;
    let beta = run.optional_input(args, "beta", Want::F32)?;
    let out = run.execute(|device| {
        let x = x.upload(device)?;
        let gamma = gamma.as_ref().map(|g| g.upload(device)).transpose()?;
        let beta = beta.as_ref().map(|b| b.upload(device)).transpose()?;
        let call = BnStats {
            x: &x,
            layout,
            eps,
            normalize: normalize.then_some(Affine {
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
    if let Some(momentum) = momentum {
        let mut running = RunningStats::new(out.mean.len());
        running.update(&out, Some(momentum))?;
        let channels = [running.mean.len()];
        let mean = Tensor::from_slice(&Device::Cpu, &running.mean, &channels)?;
        let var = Tensor::from_slice(&Device::Cpu, &running.var, &channels)?;
        run.outputs(&[("running_mean", Some(&mean)), ("running_var", Some(&var))])?;
    }
    run.finish()
}

/// The JSON summary, written by hand (no serde in the dependency tree).
enum Json {
    Bool(bool),
    Int(u64),
    /// Written as Python's json module does: NaN, Infinity and -Infinity when not finite.
    Num(f64),
    Str(String),
    Arr(Vec<Json>),
    Obj(Vec<(String, Json)>),
}

impl Json {
    fn object<'a>(fields: impl IntoIterator<Item = (&'a str, Json)>) -> Json {
        Json::Obj(
            fields
                .into_iter()
                .map(|(k, v)| (k.to_string(), v))
                .collect(),
        )
    }

    fn shape(shape: &[usize]) -> Json {
        Json::Arr(shape.iter().map(|&d| Json::Int(d as u64)).collect())
    }

    /// Objects nested up to `levels` deep get one field per line; deeper values stay on
    /// one line (an output's file, shape and value read best together).
    fn pretty(&self, indent: usize, levels: usize) -> String {
        match self {
            Json::Obj(fields) if levels > 0 && !fields.is_empty() => {
                let pad = "  ".repeat(indent + 1);
                let lines: Vec<String> = fields
                    .iter()
                    .map(|(key, value)| {
                        let key = Json::Str(key.clone());
                        format!("{pad}{key}: {}", value.pretty(indent + 1, levels - 1))
                    })
                    .collect();
                format!("{{\n{}\n{}}}", lines.join(",\n"), "  ".repeat(indent))
            }
            other => other.to_string(),
        }
    }
}

impl fmt::Display for Json {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fn string(f: &mut fmt::Formatter<'_>, s: &str) -> fmt::Result {
            f.write_str("\"")?;
            for c in s.chars() {
                match c {
                    '"' => f.write_str("\\\"")?,
                    '\\' => f.write_str("\\\\")?,
                    '\n' => f.write_str("\\n")?,
                    c if u32::from(c) < 0x20 => write!(f, "\\u{:04x}", u32::from(c))?,
                    c => write!(f, "{c}")?,
                }
            }
            f.write_str("\"")
        }
        match self {
            Json::Bool(b) => write!(f, "{b}"),
            Json::Int(n) => write!(f, "{n}"),
            Json::Num(x) if x.is_nan() => f.write_str("NaN"),
            Json::Num(x) if x.is_infinite() => {
                f.write_str(if *x > 0.0 { "Infinity" } else { "-Infinity" })
            }
            // Debug keeps every digit and uses an exponent for large and small values.
            Json::Num(x) => write!(f, "{x:?}"),
            Json::Str(s) => string(f, s),
            Json::Arr(items) => {
                f.write_str("[")?;
                for (i, item) in items.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    write!(f, "{item}")?;
                }
                f.write_str("]")
            }
            Json::Obj(fields) => {
                f.write_str("{")?;
                for (i, (key, value)) in fields.iter().enumerate() {
                    if i > 0 {
                        f.write_str(", ")?;
                    }
                    string(f, key)?;
                    write!(f, ": {value}")?;
                }
                f.write_str("}")
            }
        }
    }
}
