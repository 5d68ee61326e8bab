use crate::error::{Error, Result};
use crate::ops::xent::{Xent, XentOutput, XentSpec};
use crate::wgpu::WgpuBackend;

pub fn xent(_backend: &WgpuBackend, _spec: &XentSpec, _call: &Xent<'_>) -> Result<XentOutput> {
    Err(Error::Unsupported {
        op: "xent",
        backend: "wgpu",
    })
}
