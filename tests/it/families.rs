//! Every check case of every family on every backend: a backend may answer Unsupported
//! only for an op that `losskern::support` says it has no kernel for, never a wrong number.

use losskern::check::{self, Outcome};

use crate::backends;

#[test]
fn every_check_case_matches_the_reference_on_every_backend() {
    let mut failures = Vec::new();
    for device in backends::all() {
        for case in check::cases() {
            let report = check::run(&case, &device);
            match &report.outcome {
                Outcome::Pass => {}
                Outcome::Unsupported if !device.backend().supports(case.info().op) => {}
                outcome => failures.push(format!(
                    "{} {} {} on {}: {outcome:?}",
                    report.op, report.dtype, report.shape, report.backend
                )),
            }
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
