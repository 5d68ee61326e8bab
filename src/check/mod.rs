//! The correctness harness: random problems run on a device and compared with the
//! f64 reference, element by element, under tolerances derived once per family.
//! The integration tests, the fuzz target and `losskern check` all go through here.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use crate::device::{Backend, Device, Tensor};
use crate::error::Error;
use crate::support::Op;

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
    /// The backend has no kernel for the op yet (and `Backend::supports` says so).
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

/// One output of a case as a backend wrote it, widened to f64.
#[derive(Clone, Debug)]
pub struct Output {
    pub name: &'static str,
    pub values: Vec<f64>,
}

/// What one output must hold: the reference's values and the absolute error each element
/// may have. Both come from the inputs and the reference alone, never from a backend's
/// outputs, so a wrong output cannot widen its own allowance. `allowed` is 0 where the
/// output is exact (indices, counts) and NaN where no error is allowed (non-finite want).
#[derive(Clone, Debug)]
pub struct Expected {
    pub name: &'static str,
    pub want: Vec<f64>,
    pub allowed: Vec<f64>,
}

impl Expected {
    /// An output compared exactly.
    pub(crate) fn exact(name: &'static str, want: Vec<f64>) -> Self {
        let allowed = vec![0.0; want.len()];
        Expected {
            name,
            want,
            allowed,
        }
    }

    /// An output whose element i may be off by `allowed(i, want_i)`.
    pub(crate) fn within(
        name: &'static str,
        want: Vec<f64>,
        allowed: impl Fn(usize, f64) -> f64,
    ) -> Self {
        let allowed = want
            .iter()
            .enumerate()
            .map(|(i, &w)| allowed(i, w))
            .collect();
        Expected {
            name,
            want,
            allowed,
        }
    }
}

/// Widens each named tensor to an `Output`.
pub(crate) fn widen(named: &[(&'static str, &Tensor)]) -> Result<Vec<Output>, Error> {
    named
        .iter()
        .map(|&(name, t)| {
            Ok(Output {
                name,
                values: t.to_f64_vec()?,
            })
        })
        .collect()
}

/// Compares `outputs` with `expected`, output by output; a missing or unexpected output fails.
fn judge(info: &CaseInfo, expected: &[Expected], outputs: &[Output]) -> (f64, Vec<String>) {
    let mut worst = 0.0f64;
    let mut failures = Vec::new();
    for e in expected {
        let Some(got) = outputs.iter().find(|o| o.name == e.name) else {
            failures.push(format!("{}: missing from the outputs", e.name));
            continue;
        };
        let c = compare(&got.values, &e.want, |i, _| e.allowed[i]);
        worst = worst.max(c.worst_ratio);
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
            failures.push(format!(
                "{}: {} of {} differ (len {} vs {}): {}",
                e.name,
                c.mismatches,
                e.want.len(),
                got.values.len(),
                e.want.len(),
                shown.join(", ")
            ));
        }
    }
    for o in outputs {
        if !expected.iter().any(|e| e.name == o.name) {
            failures.push(format!("{}: not an output of {}", o.name, info.op));
        }
    }
    (worst, failures)
}

/// What a report says about the case it came from.
#[derive(Clone, Debug)]
pub struct CaseInfo {
    pub op: Op,
    pub dtype: String,
    pub shape: String,
    /// How the tolerance is formed, for the table.
    pub tolerance: &'static str,
}

/// The report of `outputs` judged against `expected` (or of the error that kept either from
/// being computed).
pub(crate) fn report(
    info: CaseInfo,
    backend: Backend,
    expected: Result<Vec<Expected>, Error>,
    outputs: &[Output],
) -> Report {
    let expected = match expected {
        Ok(e) => e,
        Err(e) => return report_error(info, backend, e),
    };
    let (worst, failures) = judge(&info, &expected, outputs);
    let outcome = if failures.is_empty() {
        Outcome::Pass
    } else {
        Outcome::Fail(failures.join("\n"))
    };
    Report {
        op: info.op.name().to_string(),
        backend: backend.name().to_string(),
        dtype: info.dtype,
        shape: info.shape,
        max_error: worst,
        tolerance: info.tolerance.to_string(),
        outcome,
    }
}

/// Turns a run's error into a report. `Unsupported` is a row of its own only where the
/// support table says the backend has no kernel for the op; anything else fails.
pub(crate) fn report_error(info: CaseInfo, backend: Backend, error: Error) -> Report {
    let outcome = match error {
        Error::Unsupported { .. } if !backend.supports(info.op) => Outcome::Unsupported,
        Error::Unsupported { .. } => Outcome::Fail(format!(
            "{error} (losskern::support lists {} as supported on {})",
            info.op,
            backend.name()
        )),
        other => Outcome::Fail(other.to_string()),
    };
    Report {
        op: info.op.name().to_string(),
        backend: backend.name().to_string(),
        dtype: info.dtype,
        shape: info.shape,
        max_error: f64::NAN,
        tolerance: info.tolerance.to_string(),
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
    BnRunning(bnstats::BnRunningCase),
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
    cases.extend(bnstats::running_cases().into_iter().map(Case::BnRunning));
    cases
}

impl Case {
    /// The op, dtype, shape and tolerance a report of this case shows.
    pub fn info(&self) -> CaseInfo {
        match self {
            Case::Xent(c) => c.info(),
            Case::Directional(c) => c.info(),
            Case::Ensemble(c) => c.info(),
            Case::EnergyScore(c) => c.info(),
            Case::EnergyDistance(c) => c.info(),
            Case::BnStats(c) => c.info(),
            Case::BnRunning(c) => c.info(),
        }
    }
}

/// Draws the case's inputs, runs its op on `device` and returns every output on the host.
pub fn outputs(case: &Case, device: &Device) -> Result<Vec<Output>, Error> {
    match case {
        Case::Xent(c) => xent::outputs(c, device),
        Case::Directional(c) => xent::directional_outputs(c, device),
        Case::Ensemble(c) => ensemble::outputs(c, device),
        Case::EnergyScore(c) => energy::score_outputs(c, device),
        Case::EnergyDistance(c) => energy::distance_outputs(c, device),
        Case::BnStats(c) => bnstats::outputs(c, device),
        Case::BnRunning(c) => bnstats::running_outputs(c, device),
    }
}

/// The reference's outputs of the case with the allowed error of every element.
pub fn expected(case: &Case) -> Result<Vec<Expected>, Error> {
    match case {
        Case::Xent(c) => xent::expected(c),
        Case::Directional(c) => xent::directional_expected(c),
        Case::Ensemble(c) => ensemble::expected(c),
        Case::EnergyScore(c) => energy::score_expected(c),
        Case::EnergyDistance(c) => energy::distance_expected(c),
        Case::BnStats(c) => bnstats::expected(c),
        Case::BnRunning(c) => bnstats::running_expected(c),
    }
}

/// Judges `outputs` (as `backend` wrote them) against the reference: the comparison `run`
/// makes, open to outputs from elsewhere (the mutation tests feed it altered ones).
pub fn verdict(case: &Case, backend: Backend, outputs: &[Output]) -> Report {
    report(case.info(), backend, expected(case), outputs)
}

/// Runs one case on `device` and compares every output with the reference.
pub fn run(case: &Case, device: &Device) -> Report {
    match outputs(case, device) {
        Ok(outputs) => verdict(case, device.backend(), &outputs),
        Err(e) => report_error(case.info(), device.backend(), e),
    }
}
