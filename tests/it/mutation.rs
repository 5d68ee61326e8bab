//! Mutation tests of the harness: for every check case of every family, on every backend,
//! the backend's own outputs pass `check::verdict`, and moving any one of a few elements of
//! any output by 4 times its allowed error makes the same comparison fail at that element.
//!
//! Why 4x: the unmutated element is within its allowance a, so moving it 4a further from the
//! reference leaves it at least 3a off, outside whatever error the backend itself had, while
//! staying the size of a rounding-level bug. An exact output (a = 0) moves by one f32 ulp.
//! The allowance itself must be finite and less than a sixteenth of the output's magnitude
//! (at least 1): a bound that lets through changes of that size cannot catch a wrong kernel.

use std::collections::BTreeSet;

use losskern::check::{self, Expected, Outcome, Output};
use losskern::{Device, Error};

use crate::backends;

/// Up to three finite elements of `want`: the first, the middle and the last.
fn probes(want: &[f64]) -> Vec<usize> {
    let finite: Vec<usize> = (0..want.len()).filter(|&i| want[i].is_finite()).collect();
    let mut picked: Vec<usize> = [0, finite.len() / 2, finite.len().saturating_sub(1)]
        .iter()
        .filter_map(|&j| finite.get(j).copied())
        .collect();
    picked.dedup();
    picked
}

/// The change applied to element i of `e`, after checking that its allowance is a real bound.
fn mutation(case: &str, e: &Expected, i: usize) -> f64 {
    let allowed = e.allowed[i];
    let magnitude = e
        .want
        .iter()
        .filter(|w| w.is_finite())
        .fold(1.0f64, |m, w| m.max(w.abs()));
    assert!(
        allowed.is_finite() && allowed >= 0.0 && 4.0 * allowed < magnitude / 16.0,
        "{case}: {}[{i}] allows {allowed:e} around {:e} (output magnitude {magnitude:e})",
        e.name,
        e.want[i]
    );
    if allowed > 0.0 {
        4.0 * allowed
    } else {
        e.want[i].abs().max(f64::from(f32::MIN_POSITIVE)) * f64::from(f32::EPSILON)
    }
}

/// Mutates every output of `case` on `device`; records (op, output) for each output mutated.
fn mutate_every_output(
    case: &check::Case,
    device: &Device,
    covered: &mut BTreeSet<(String, &'static str)>,
) {
    let name = format!("{case:?} on {}", device.name());
    let outputs = match check::outputs(case, device) {
        Ok(outputs) => outputs,
        Err(Error::Unsupported { .. }) if !device.backend().supports(case.info().op) => return,
        Err(e) => panic!("{name}: {e}"),
    };
    let backend = device.backend();
    let clean = check::verdict(case, backend, &outputs);
    assert_eq!(clean.outcome, Outcome::Pass, "{name}: unmutated outputs");
    let expected = check::expected(case).unwrap();
    assert!(!expected.is_empty(), "{name}: no outputs to compare");
    for e in &expected {
        let slot = outputs
            .iter()
            .position(|o| o.name == e.name)
            .unwrap_or_else(|| panic!("{name}: no output {}", e.name));
        let indices = probes(&e.want);
        if !indices.is_empty() {
            covered.insert((case.info().op.to_string(), e.name));
        }
        for i in indices {
            let delta = mutation(&name, e, i);
            let mut mutated: Vec<Output> = outputs.clone();
            let got = mutated[slot].values[i];
            let away = if got >= e.want[i] { delta } else { -delta };
            mutated[slot].values[i] = got + away;
            let report = check::verdict(case, backend, &mutated);
            let Outcome::Fail(why) = &report.outcome else {
                panic!(
                    "{name}: {}[{i}] moved from {got:e} by {away:e} (want {:e}, allowed {:e}) passed",
                    e.name, e.want[i], e.allowed[i]
                );
            };
            let line = why
                .lines()
                .find(|l| l.starts_with(&format!("{}: ", e.name)))
                .unwrap_or_else(|| panic!("{name}: {}[{i}] mutated, but: {why}", e.name));
            assert!(
                line.contains(&format!("[{i}]")) && why.lines().count() == 1,
                "{name}: {}[{i}] mutated, but: {why}",
                e.name
            );
        }
    }
}

#[test]
fn one_changed_element_of_any_output_fails_the_comparison() {
    for device in backends::all() {
        let mut covered = BTreeSet::new();
        let mut outputs = BTreeSet::new();
        for case in check::cases() {
            mutate_every_output(&case, &device, &mut covered);
            if device == Device::Cpu {
                for e in check::expected(&case).unwrap() {
                    outputs.insert((case.info().op.to_string(), e.name));
                }
            }
        }
        // Every output of every op is mutated somewhere (an output can be all NaN in one case).
        let missed: Vec<_> = outputs.difference(&covered).collect();
        assert!(
            missed.is_empty(),
            "never mutated on {}: {missed:?}",
            device.name()
        );
    }
}

#[test]
fn a_missing_or_unexpected_output_fails_the_comparison() {
    let device = Device::Cpu;
    for case in check::cases() {
        let outputs = check::outputs(&case, &device).unwrap();
        let fewer = &outputs[1..];
        assert!(
            matches!(
                check::verdict(&case, device.backend(), fewer).outcome,
                Outcome::Fail(_)
            ),
            "{case:?}: dropping {} passed",
            outputs[0].name
        );
        let mut more = outputs.clone();
        more.push(Output {
            name: "unexpected",
            values: vec![0.0],
        });
        assert!(
            matches!(
                check::verdict(&case, device.backend(), &more).outcome,
                Outcome::Fail(_)
            ),
            "{case:?}: an extra output passed"
        );
    }
}
