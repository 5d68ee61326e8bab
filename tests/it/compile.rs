//! Every kernel source compiles: CUDA with NVRTC for sm_80 and sm_90 (no GPU needed, only
//! libnvrtc), WGSL into every pipeline on each wgpu adapter present.

use losskern::cuda::{compile_with_log, KernelSource};

use crate::backends;

#[test]
fn every_cuda_kernel_compiles_with_nvrtc_for_sm_80_and_sm_90() {
    if let Err(e) = losskern::cuda::nvrtc_version() {
        assert!(
            !std::env::var("LOSSKERN_REQUIRE_NVRTC").is_ok_and(|v| v == "1"),
            "LOSSKERN_REQUIRE_NVRTC=1 but libnvrtc cannot be loaded: {e}"
        );
        eprintln!("skipping the NVRTC compile test: {e}");
        return;
    }
    for arch in ["sm_80", "sm_90"] {
        for source in KernelSource::ALL {
            let (_, log) = compile_with_log(source, arch).unwrap_or_else(|e| panic!("{e}"));
            assert!(
                log.trim().is_empty(),
                "{} compiles with warnings for {arch}:\n{log}",
                source.name()
            );
        }
    }
}

#[test]
fn every_wgsl_shader_builds_its_pipelines() {
    for device in backends::gpus() {
        if let losskern::Device::Wgpu(backend) = device {
            let pipelines = backend.compile_all().unwrap_or_else(|e| panic!("{e}"));
            assert!(pipelines > 0, "no pipeline was built");
        }
    }
}
