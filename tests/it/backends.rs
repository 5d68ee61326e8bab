//! The devices a test runs on. An absent GPU backend is skipped with a printed reason,
//! unless LOSSKERN_REQUIRE_CUDA=1 / LOSSKERN_REQUIRE_WGPU=1 turns the skip into a failure.

use losskern::{Device, Error};

fn required(var: &str) -> bool {
    std::env::var(var).is_ok_and(|v| v == "1")
}

fn optional(name: &str, var: &str, device: Result<Device, Error>) -> Option<Device> {
    match device {
        Ok(device) => Some(device),
        Err(e) if required(var) => panic!("{var}=1 but the {name} backend is unavailable: {e}"),
        Err(e) => {
            eprintln!("skipping the {name} backend: {e}");
            None
        }
    }
}

/// The CPU, then CUDA device 0 and the first wgpu adapter where present, with output
/// poisoning on, so no test passes on a value left in reused memory.
pub fn all() -> Vec<Device> {
    losskern::device::poison_outputs(true);
    let mut devices = vec![Device::Cpu];
    devices.extend(optional("CUDA", "LOSSKERN_REQUIRE_CUDA", Device::cuda(0)));
    devices.extend(optional("wgpu", "LOSSKERN_REQUIRE_WGPU", Device::wgpu()));
    devices
}

/// The GPU devices present (none on a machine without a GPU or Vulkan).
pub fn gpus() -> Vec<Device> {
    all().into_iter().filter(|d| *d != Device::Cpu).collect()
}

/// PROPTEST_CASES when set (the GPU host runs 10000), else 24.
pub fn proptest_cases() -> u32 {
    std::env::var("PROPTEST_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(24)
}

/// Passes, or reports Unsupported where the support table lists no kernel for the op.
pub fn assert_matches_reference(case: &losskern::check::Case, device: &Device) {
    let report = losskern::check::run(case, device);
    match report.outcome {
        losskern::check::Outcome::Pass => {}
        losskern::check::Outcome::Unsupported if !device.backend().supports(case.info().op) => {}
        outcome => panic!("{case:?} on {}: {outcome:?}", device.name()),
    }
}
