//! `losskern info`: the backends this build has and what they found.

use losskern::Device;

pub fn info() {
    println!("losskern {}", env!("CARGO_PKG_VERSION"));
    println!(
        "cpu: available (native kernels, {} rayon threads)",
        rayon::current_num_threads()
    );
    #[cfg(feature = "cuda")]
    cuda();
    #[cfg(not(feature = "cuda"))]
    println!("cuda: not built (the `cuda` feature is off)");
    #[cfg(feature = "wgpu")]
    wgpu();
    #[cfg(not(feature = "wgpu"))]
    println!("wgpu: not built (the `wgpu` feature is off)");
    println!("best device: {}", Device::best().name());
}

#[cfg(feature = "cuda")]
fn cuda() {
    match losskern::cuda::backend(0) {
        Ok(cuda) => {
            let info = cuda.info();
            let (major, minor) = info.nvrtc_version;
            println!("cuda: {} ({}), NVRTC {major}.{minor}", info.name, info.arch);
            match cuda.load_kernels() {
                Ok(()) => {
                    for record in losskern::cuda::compile_records() {
                        println!(
                            "  {} for {}: {:.1} ms, disk cache {}",
                            record.source,
                            record.arch,
                            record.millis,
                            match record.cache {
                                losskern::cuda::CacheOutcome::Hit => "hit",
                                losskern::cuda::CacheOutcome::Miss => "miss (stored)",
                                losskern::cuda::CacheOutcome::Disabled => "off",
                            }
                        );
                    }
                    match losskern::cuda::cache_dir() {
                        Some(dir) => println!("  kernel cache: {}", dir.display()),
                        None => println!("  kernel cache: none (no cache directory)"),
                    }
                }
                Err(e) => println!("  kernels: {e}"),
            }
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
}

#[cfg(feature = "wgpu")]
fn wgpu() {
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
}
