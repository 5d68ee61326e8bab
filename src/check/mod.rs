//! The correctness harness: random problems run on a device and compared with the
//! f64 reference, element by element, under tolerances derived once per family.
//! The integration tests, the fuzz target and `losskern check` all go through here.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use crate::device::Device;
use crate::error::Error;

/// A small deterministic generator (SplitMix64), so a failing case is reproduced from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in [0, 1).
    pub fn uniform(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }

    /// Uniform in [0, n).
    pub fn below(&mut self, n: usize) -> usize {
        (self.uniform() * n as f64) as usize % n.max(1)
    }

    /// Standard normal (Box-Muller).
    pub fn normal(&mut self) -> f64 {
        let u = self.uniform().max(f64::MIN_POSITIVE);
        (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * self.uniform()).cos()
    }

    /// `len` normals times `scale`.
    pub fn normals(&mut self, len: usize, scale: f64) -> Vec<f64> {
        (0..len).map(|_| self.normal() * scale).collect()
    }
}

/// Unit roundoff of f32, the precision every kernel accumulates in.
pub(crate) const U: f64 = f32::EPSILON as f64 / 2.0;

/// Relative error of a sum of `n` terms accumulated in f32 per thread and then in a fixed
/// tree: 8 u (sqrt(n) + log2 n + 1). The square root is the expected growth of independent
/// roundings along per-thread chains; the factor 8 covers the exp, log or sqrt of each term.
pub(crate) fn sum_error(n: usize) -> f64 {
    let n = n.max(1) as f64;
    8.0 * U * (n.sqrt() + n.log2() + 1.0)
}

/// Which elements agree: |got - want| <= allowed, NaN equals NaN, same-signed infinities are equal.
pub fn agrees(got: f64, want: f64, allowed: f64) -> bool {
    if got == want {
        return true;
    }
    if want.is_nan() || got.is_nan() {
        return want.is_nan() && got.is_nan();
    }
    if want.is_infinite() || got.is_infinite() {
        return got == want;
    }
    (got - want).abs() <= allowed
}

/// One element that disagrees.
#[derive(Clone, Debug)]
pub struct Mismatch {
    pub index: usize,
    pub got: f64,
    pub want: f64,
    pub allowed: f64,
}

/// The comparison of one output.
#[derive(Clone, Debug, Default)]
pub struct Comparison {
    /// Largest |got - want| / allowed over the finite elements (<= 1 passes).
    pub worst_ratio: f64,
    /// Largest |got - want| over the finite elements.
    pub max_abs_error: f64,
    pub mismatches: usize,
    /// The first few mismatches, for the error message.
    pub first: Vec<Mismatch>,
}

/// Compares `got` with `want`; `allowed(i, want)` is the absolute error element i may have.
pub fn compare(got: &[f64], want: &[f64], allowed: impl Fn(usize, f64) -> f64) -> Comparison {
    let mut c = Comparison::default();
    for (index, (&g, &w)) in got.iter().zip(want).enumerate() {
        // An allowance derived from a non-finite neighbour (the lse of a NaN row) allows nothing.
        let tol = allowed(index, w);
        let tol = if tol.is_nan() { 0.0 } else { tol };
        if g.is_finite() && w.is_finite() {
            let err = (g - w).abs();
            c.max_abs_error = c.max_abs_error.max(err);
            c.worst_ratio = c.worst_ratio.max(if tol > 0.0 {
                err / tol
            } else if err > 0.0 {
                f64::INFINITY
            } else {
                0.0
            });
        }
        if !agrees(g, w, tol) {
            c.mismatches += 1;
            if c.first.len() < 4 {
                c.first.push(Mismatch {
                    index,
                    got: g,
                    want: w,
                    allowed: tol,
                });
            }
        }
    }
    if got.len() != want.len() {
        c.mismatches += 1;
    }
    c
}

/// The outcome of one case on one backend.
#[derive(Clone, Debug, PartialEq)]
pub enum Outcome {
    Pass,
    /// What disagreed, with the first mismatches.
    Fail(String),
    /// The backend has no kernel for the op yet.
    Unsupported,
}

/// One row of the check table.
#[derive(Clone, Debug)]
pub struct Report {
    pub op: String,
    pub backend: String,
    pub dtype: String,
    pub shape: String,
    /// Worst |err| / allowed over all outputs (<= 1 passes).
    pub max_error: f64,
    /// How the tolerance is formed, for the table.
    pub tolerance: String,
    pub outcome: Outcome,
}

/// Collects the comparisons of one case's outputs into a report.
#[derive(Debug)]
pub(crate) struct Verdict {
    worst: f64,
    failures: Vec<String>,
}

impl Verdict {
    pub(crate) fn new() -> Self {
        Verdict {
            worst: 0.0,
            failures: Vec::new(),
        }
    }

    /// Adds the comparison of output `name`.
    pub(crate) fn add(
        &mut self,
        name: &str,
        got: &[f64],
        want: &[f64],
        allowed: impl Fn(usize, f64) -> f64,
    ) {
        let c = compare(got, want, allowed);
        self.worst = self.worst.max(c.worst_ratio);
        if c.mismatches > 0 {
            let shown: Vec<String> = c
                .first
                .iter()
                .map(|m| {
                    format!(
                        "[{}] got {:e} want {:e} (allowed {:e})",
                        m.index, m.got, m.want, m.allowed
                    )
                })
                .collect();
            self.failures.push(format!(
                "{name}: {} of {} differ (len {} vs {}): {}",
                c.mismatches,
                want.len(),
                got.len(),
                want.len(),
                shown.join(", ")
            ));
        }
    }

    /// Adds an exact comparison (indices, counts).
    pub(crate) fn add_exact(&mut self, name: &str, got: &[f64], want: &[f64]) {
        self.add(name, got, want, |_, _| 0.0);
    }

    pub(crate) fn finish(self, case: CaseInfo, device: &Device, tolerance: String) -> Report {
        let outcome = if self.failures.is_empty() {
            Outcome::Pass
        } else {
            Outcome::Fail(self.failures.join("\n"))
        };
        Report {
            op: case.op.to_string(),
            backend: device.backend().name().to_string(),
            dtype: case.dtype,
            shape: case.shape,
            max_error: self.worst,
            tolerance,
            outcome,
        }
    }
}

/// What a report says about the case it came from.
pub(crate) struct CaseInfo {
    pub op: &'static str,
    pub dtype: String,
    pub shape: String,
}

/// Turns a run's error into a report: `Unsupported` is a row of its own, anything else fails.
pub(crate) fn report_error(case: CaseInfo, device: &Device, error: Error) -> Report {
    let outcome = match error {
        Error::Unsupported { .. } => Outcome::Unsupported,
        other => Outcome::Fail(other.to_string()),
    };
    Report {
        op: case.op.to_string(),
        backend: device.backend().name().to_string(),
        dtype: case.dtype,
        shape: case.shape,
        max_error: f64::NAN,
        tolerance: String::new(),
        outcome,
    }
}

/// A random problem of one family.
#[derive(Clone, Debug)]
pub enum Case {
    Xent(xent::XentCase),
    Directional(xent::DirectionalCase),
    Ensemble(ensemble::EnsembleCase),
    EnergyScore(energy::EnergyScoreCase),
    EnergyDistance(energy::EnergyDistanceCase),
    BnStats(bnstats::BnStatsCase),
}

/// The cases `losskern check` runs: every op of every family, each dtype, awkward sizes.
pub fn cases() -> Vec<Case> {
    let mut cases = Vec::new();
    cases.extend(xent::cases().into_iter().map(Case::Xent));
    cases.extend(xent::directional_cases().into_iter().map(Case::Directional));
    cases.extend(ensemble::cases().into_iter().map(Case::Ensemble));
    cases.extend(energy::score_cases().into_iter().map(Case::EnergyScore));
    cases.extend(
        energy::distance_cases()
            .into_iter()
            .map(Case::EnergyDistance),
    );
    cases.extend(bnstats::cases().into_iter().map(Case::BnStats));
    cases
}

/// Runs one case on `device` and compares every output with the reference.
pub fn run(case: &Case, device: &Device) -> Report {
    match case {
        Case::Xent(c) => xent::run(c, device),
        Case::Directional(c) => xent::run_directional(c, device),
        Case::Ensemble(c) => ensemble::run(c, device),
        Case::EnergyScore(c) => energy::run_score(c, device),
        Case::EnergyDistance(c) => energy::run_distance(c, device),
        Case::BnStats(c) => bnstats::run(c, device),
    }
}
