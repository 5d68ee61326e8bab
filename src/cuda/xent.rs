use crate::cuda::CudaBackend;
use crate::error::{Error, Result};
use crate::ops::xent::{Xent, XentOutput, XentSpec};

pub fn xent(_backend: &CudaBackend, _spec: &XentSpec, _call: &Xent<'_>) -> Result<XentOutput> {
    Err(Error::Unsupported {
        op: "xent",
        backend: "cuda",
    })
}
