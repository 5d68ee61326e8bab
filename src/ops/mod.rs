//! The public op calls, one module per family. Each validates its call once (the spec
//! layer) and hands the bound call to the kernels of the inputs' device through the
//! family's trait; [`kernels`] is the one place that picks the backend.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use crate::device::Device;
use crate::spec::bnstats::BnStatsKernels;
use crate::spec::energy::EnergyKernels;
use crate::spec::ensemble::EnsembleKernels;
use crate::spec::xent::XentKernels;

/// Every family's kernels: what a backend implements.
pub(crate) trait Kernels:
    XentKernels + EnsembleKernels + EnergyKernels + BnStatsKernels
{
}

impl<T: XentKernels + EnsembleKernels + EnergyKernels + BnStatsKernels> Kernels for T {}

/// The kernels of the backend that `device` belongs to.
fn kernels(device: &Device) -> &dyn Kernels {
    match device {
        Device::Cpu => &crate::cpu::CpuBackend,
        #[cfg(feature = "cuda")]
        Device::Cuda(backend) => backend.as_ref(),
        #[cfg(feature = "wgpu")]
        Device::Wgpu(backend) => backend.as_ref(),
    }
}
