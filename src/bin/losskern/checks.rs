//! `losskern check`: the correctness harness on every backend, as a table.

use clap::{Args, ValueEnum};
use losskern::check::{self, Outcome, Report};
use losskern::{Backend, DType, Device};

use crate::{devices_present, open, Failure};

#[derive(Args)]
pub struct CheckArgs {
    /// The backend to check; all: the CPU and every GPU backend present
    #[arg(long, value_enum, default_value_t = BackendChoice::All)]
    backend: BackendChoice,
    /// Run instead one xent problem past 2^31 logits (16384 x 131072 bf16) on the CUDA
    /// device, comparing sampled rows with the reference (64-bit indexing; needs ~10 GB
    /// of host memory and 4 GB on the device)
    #[arg(long)]
    large: bool,
}

#[derive(Clone, Copy, ValueEnum)]
enum BackendChoice {
    Cpu,
    Cuda,
    Wgpu,
    All,
}

pub fn check_command(args: &CheckArgs) -> Result<(), Failure> {
    losskern::device::poison_outputs(true);
    let devices = match args.backend {
        BackendChoice::Cpu => vec![open(Backend::Cpu)?],
        BackendChoice::Cuda => vec![open(Backend::Cuda)?],
        BackendChoice::Wgpu => vec![open(Backend::Wgpu)?],
        BackendChoice::All => devices_present(),
    };
    if args.large {
        return run_large(&devices);
    }
    run_checks(&devices)
}

/// Runs every case on every device, with a progress line per run on stderr, then
/// prints one row per case with a column per backend.
pub fn run_checks(devices: &[Device]) -> Result<(), Failure> {
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
