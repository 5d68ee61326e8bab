//! The zero-copy CUDA entry refuses what the Tensor API cannot produce: buffers too short
//! or misaligned for the spec, and a stream or buffer of another context.

use losskern::check::Rng;
use losskern::ops::xent::{GradDType, TargetKind, XentOptions, XentShape, XentSpec};
use losskern::{DType, Error};

/// B = 3 rows of V = 5 f32 logits with class targets and the gradient.
fn spec() -> XentSpec {
    let shape = XentShape {
        batch: 3,
        classes: 5,
        row_stride: 5,
        dtype: DType::F32,
        targets: TargetKind::Classes,
        weighted: false,
        grad_dtype: GradDType::Logits,
    };
    let options = XentOptions {
        grad: true,
        ..XentOptions::default()
    };
    XentSpec::new(shape, options).unwrap()
}

fn logits_bytes(seed: u64, elements: usize) -> Vec<u8> {
    let values: Vec<f32> = Rng::new(seed)
        .normals(elements, 3.0)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    bytemuck::cast_slice(&values).to_vec()
}

fn targets_bytes() -> Vec<u8> {
    bytemuck::cast_slice(&[4i64, 0, 2]).to_vec()
}

#[cfg(feature = "cuda")]
mod cuda {
    use std::sync::Arc;

    use cudarc::driver::{CudaContext, CudaSlice, CudaStream};
    use losskern::cuda::xent::{xent_raw, XentBuffers, XentInputs, XentTargets};
    use losskern::Device;

    use super::*;

    fn upload(stream: &Arc<CudaStream>, bytes: &[u8]) -> CudaSlice<u8> {
        stream.clone_htod(bytes).unwrap()
    }

    fn run(
        stream: &Arc<CudaStream>,
        logits: &CudaSlice<u8>,
        logits_offset: usize,
        targets: &CudaSlice<u8>,
        out: &mut XentBuffers,
    ) -> losskern::Result<()> {
        let inputs = XentInputs {
            logits: logits.slice(logits_offset..),
            targets: XentTargets::Classes(targets.as_view()),
            class_weights: None,
        };
        xent_raw(stream, &spec(), &inputs, out)
    }

    fn ours() -> Option<Arc<CudaStream>> {
        match crate::backends::gpus().into_iter().find_map(|d| match d {
            Device::Cuda(b) => Some(b),
            _ => None,
        }) {
            Some(backend) => Some(backend.stream().clone()),
            None => {
                eprintln!("skipping the raw CUDA entry tests: no CUDA device");
                None
            }
        }
    }

    #[test]
    fn raw_cuda_xent_refuses_short_misaligned_and_foreign_buffers() {
        let Some(stream) = ours() else { return };
        let spec = spec();
        let targets = upload(&stream, &targets_bytes());
        let mut out = XentBuffers::new(&stream, &spec).unwrap();

        let logits = upload(&stream, &logits_bytes(1, 15));
        run(&stream, &logits, 0, &targets, &mut out).expect("a well-formed call runs");

        let short = upload(&stream, &logits_bytes(2, 14));
        let e = run(&stream, &short, 0, &targets, &mut out).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "too short: {e}");

        let padded = upload(&stream, &logits_bytes(3, 16));
        let e = run(&stream, &padded, 1, &targets, &mut out).unwrap_err();
        assert!(matches!(e, Error::Shape(_)), "misaligned by one byte: {e}");

        let other = CudaContext::new_non_primary(stream.context().ordinal(), 0).unwrap();
        let other_stream = other.default_stream();
        let foreign = upload(&other_stream, &logits_bytes(4, 15));
        let e = run(&stream, &foreign, 0, &targets, &mut out).unwrap_err();
        assert!(
            matches!(e, Error::DeviceMismatch(_)),
            "logits of another context: {e}"
        );
        let e = run(&other_stream, &logits, 0, &targets, &mut out).unwrap_err();
        assert!(
            matches!(e, Error::DeviceMismatch(_)),
            "a stream of another context: {e}"
        );
        let mut foreign_out = XentBuffers::new(&other_stream, &spec).unwrap();
        let e = run(&stream, &logits, 0, &targets, &mut foreign_out).unwrap_err();
        assert!(
            matches!(e, Error::DeviceMismatch(_)),
            "outputs of another context: {e}"
        );
    }
}
