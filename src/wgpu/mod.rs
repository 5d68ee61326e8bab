//! wgpu backend (placeholder interface; being written).

use std::sync::Arc;

use crate::error::{Error, Result};

pub mod xent;

pub struct WgpuBackend {}

pub fn backend() -> Result<Arc<WgpuBackend>> {
    Err(Error::WgpuUnavailable("not yet".into()))
}

impl WgpuBackend {
    pub fn describe(&self) -> String {
        String::new()
    }
    pub fn synchronize(&self) -> Result<()> {
        Ok(())
    }
    pub fn upload(&self, _bytes: &[u8]) -> Result<::wgpu::Buffer> {
        Err(Error::WgpuUnavailable("not yet".into()))
    }
    pub fn download(&self, _slice: &::wgpu::Buffer, _len: usize) -> Result<Vec<u8>> {
        Err(Error::WgpuUnavailable("not yet".into()))
    }
}
