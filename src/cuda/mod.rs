//! CUDA backend (placeholder interface; being written).

use std::sync::Arc;

use cudarc::driver::CudaSlice;

use crate::error::{Error, Result};

pub mod xent;

pub struct CudaBackend {}

pub fn backend(_ordinal: usize) -> Result<Arc<CudaBackend>> {
    Err(Error::CudaUnavailable("not yet".into()))
}

impl CudaBackend {
    pub fn describe(&self) -> String {
        String::new()
    }
    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    pub fn upload(&self, _bytes: &[u8]) -> Result<CudaSlice<u8>> {
        Err(Error::CudaUnavailable("not yet".into()))
    }
    pub fn download(&self, _slice: &CudaSlice<u8>, _len: usize) -> Result<Vec<u8>> {
        Err(Error::CudaUnavailable("not yet".into()))
    }
}
