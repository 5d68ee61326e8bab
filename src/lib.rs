//! losskern: hand-written CUDA and WGSL kernels for training diagnostics, each done in one
//! pass over the data, behind one safe API, with the same numbers on CUDA, on any WebGPU
//! adapter and on the native CPU backend, all judged against the f64 reference
//! (`losskern_reference`).
//!
//! Data flows one way: a host slice becomes a [`Tensor`] on a [`Device`]; an op in [`ops`]
//! validates its inputs once into a spec; the device's backend launches its kernels
//! (without waiting for them); the op returns an output struct of tensors on the same
//! device, which wait for the kernels when read.
//!
//! Cargo features: `cuda` (the CUDA backend), `wgpu` (the WebGPU backend), `cli` (the
//! `losskern` command line, with `check`), `check` (the correctness harness
//! [`check`] as public API), `nccl` (multi-GPU through NCCL: `nccl`, with `cuda`).
//! All but `check` and `nccl` are on by default; `--no-default-features` is the
//! CPU-only library.
//!
//! ```
//! use losskern::ops::xent::{self, RhoReduce, Targets, Xent, XentOptions};
//! use losskern::{Device, Tensor};
//!
//! # fn main() -> losskern::Result<()> {
//! let device = Device::Cpu; // or Device::best(): CUDA, then wgpu, then the CPU
//! let logits = Tensor::from_slice(&device, &[0.0f32, 1.0, 0.0, 5.0, 0.0, 10.0], &[3, 2])?;
//! let targets = Tensor::from_slice(&device, &[1i64, 1, 0], &[3])?;
//! let mut options = XentOptions { grad: true, ..XentOptions::default() };
//! options.radius.reduce = RhoReduce::PerSample;
//! let out = xent::xent(&Xent { options, ..Xent::new(&logits, Targets::Classes(&targets)) })?;
//! // rho = pi / (max - min + 1e-6) per row: the ghosts-of-softmax tutorial's values.
//! let rho = out.rho.to_vec::<f32>()?;
//! assert!((rho[0] - 3.1416).abs() < 1e-4 && (rho[1] - 0.6283).abs() < 1e-4 && (rho[2] - 0.3142).abs() < 1e-4);
//! assert_eq!(out.argmax.to_vec::<i64>()?, vec![1, 1, 1]);
//! assert_eq!(out.grad.expect("asked for").shape(), [3, 2]);
//! # Ok(())
//! # }
//! ```

#[cfg(feature = "check")]
pub mod check;
mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;
pub mod device;
pub mod dtype;
pub mod error;
#[cfg(feature = "nccl")]
pub mod nccl;
pub mod ops;
mod spec;
pub mod support;
#[cfg(any(feature = "cuda", feature = "wgpu"))]
mod watch;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use device::{Backend, Device, Tensor};
pub use dtype::{DType, Element};
pub use error::{Error, Result};
pub use support::Op;
