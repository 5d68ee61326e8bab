//! The devices both targets run on, opened once per process: opening wgpu or CUDA takes
//! far longer than one fuzz input, and the backends are process-wide anyway.

use std::sync::OnceLock;

use losskern::{Device, Error};

/// An absent GPU backend is skipped, unless LOSSKERN_REQUIRE_CUDA=1 / LOSSKERN_REQUIRE_WGPU=1
/// (set by .ci/run) make it a crash, so CI cannot silently fuzz the CPU alone.
fn optional(name: &str, var: &str, device: Result<Device, Error>) -> Option<Device> {
    match device {
        Ok(device) => Some(device),
        Err(e) if std::env::var(var).is_ok_and(|v| v == "1") => {
            panic!("{var}=1 but the {name} backend is unavailable: {e}")
        }
        Err(e) => {
            eprintln!("skipping the {name} backend: {e}");
            None
        }
    }
}

/// The CPU, then CUDA device 0 and the first wgpu adapter where present, with output
/// poisoning on, so no input passes on a value left in reused memory.
pub fn all() -> &'static [Device] {
    static DEVICES: OnceLock<Vec<Device>> = OnceLock::new();
    DEVICES.get_or_init(|| {
        losskern::device::poison_outputs(true);
        let mut devices = vec![Device::Cpu];
        devices.extend(optional("CUDA", "LOSSKERN_REQUIRE_CUDA", Device::cuda(0)));
        devices.extend(optional("wgpu", "LOSSKERN_REQUIRE_WGPU", Device::wgpu()));
        let names: Vec<String> = devices.iter().map(Device::name).collect();
        eprintln!("fuzzing on: {}", names.join(", "));
        devices
    })
}
