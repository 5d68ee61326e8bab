//! ensemble on wgpu: the host side of `shaders/ensemble.wgsl`.
//!
//! One submission per call. The layers' weights and biases (and a scan's directions) are
//! copied on the device into one `params` buffer, the labels and a scan's (k, t) into one
//! `data` buffer, so that the shader binds six storage buffers whatever the depth (the
//! WebGPU default allows eight per stage); then, in one compute pass:
//!
//! 1. `ensemble_check`: one workgroup; the first label outside [0, C) and, for a scan, the
//!    first non-finite t and k outside [0, K), into four u64 status words that the backend
//!    reads at the calling thread's next readback (`spec::ensemble::status_error`).
//! 2. `ensemble_mlp`: a workgroup per (16-row batch tile, model), or per (tile, direction)
//!    for a Split scan (its first layer's two parts computed once, in the workgroup's
//!    scratch, for every distance on the direction), through every layer: activations in
//!    workgroup memory when every width after the input is at most 64, else in the
//!    workgroup's own scratch (with any scratch the grid is capped at
//!    [`SCRATCH_WORKGROUPS`] and strides over the work, so the scratch stays small); weights staged 64 units x 8 inputs
//!    at a time; f32 FMA chains in input order; the tile's cross-entropies summed in
//!    two-float arithmetic in row order into its (model, tile) slot.
//! 3. `ensemble_finalize`: a workgroup per model; the f64 loss and accuracy from the slots
//!    (WGSL has no f64: the shader writes their bit patterns, see the shader's header).
//!
//! then copies of the status words, loss and accuracy out of the one work buffer.
//! `Precision::TensorCore` runs the same f32 FMA kernels (WGSL has no tensor-core path),
//! which lies within the TensorCore bound, as on CUDA. Every index in the shader is u32:
//! a binding past 2 GiB (or the device's limit) is refused.

use bytemuck::{Pod, Zeroable};

use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::ensemble::{
    EnsembleCall, EnsembleKernels, EnsembleOutput, EnsembleSpec, LandscapeCall, Perturbation,
    STATUS_WORDS,
};
use crate::wgpu::{
    dtype_code, index, padded_size, require, wgpu_buffer, whole, BindingKind, EnsembleWatch,
    PipelineKey, ShaderSource, WgpuBackend,
};

/// Group 0 of `ensemble.wgsl`: params (uniform), x, the parameters, the labels and (k, t),
/// logits, work, scratch.
pub(crate) const BINDINGS: &[BindingKind] = &[
    BindingKind::Uniform,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::Read,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
    BindingKind::ReadWrite,
];

const CHECK: &str = "ensemble_check";
const MLP: &str = "ensemble_mlp";
const FINALIZE: &str = "ensemble_finalize";

/// Batch rows per tile, the widest activation kept in workgroup memory and the deepest
/// network: the shader's ROWS, HIDDEN and MAX_LAYERS.
const ROWS: u64 = 16;
const HIDDEN: usize = 64;
const MAX_LAYERS: usize = 8;
/// Words of a (model, tile) slot in `work`: the loss sum's (hi, lo) and the right count.
const SLOT_WORDS: u64 = 3;
/// The most workgroups of an MLP dispatch whose activations live in scratch: enough to
/// fill a large GPU, few enough that their scratch stays small.
const SCRATCH_WORKGROUPS: u64 = 1024;

/// The shader's `Params` uniform: the four offset tables and the widths as arrays of
/// vec4<u32> (so 16-byte strides, as a uniform needs), then 16 four-byte scalars. The
/// offsets of the shader's layout are asserted below (WGSL cannot assert one).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, Pod, Zeroable)]
struct Params {
    widths: [u32; 12],
    w_off: [u32; MAX_LAYERS],
    b_off: [u32; MAX_LAYERS],
    dw_off: [u32; MAX_LAYERS],
    db_off: [u32; MAX_LAYERS],
    layers: u32,
    models: u32,
    batch: u32,
    directions: u32,
    tiles: u32,
    work: u32,
    launched: u32,
    mode: u32,
    shared_input: u32,
    act_floats: u32,
    scratch_stride: u32,
    logits: u32,
    k_word: u32,
    t_word: u32,
    nan_bits: u32,
    classes: u32,
}
const _: () = {
    use std::mem::offset_of;
    assert!(offset_of!(Params, w_off) == 48);
    assert!(offset_of!(Params, b_off) == 80);
    assert!(offset_of!(Params, dw_off) == 112);
    assert!(offset_of!(Params, db_off) == 144);
    assert!(offset_of!(Params, layers) == 176);
    assert!(offset_of!(Params, classes) == 236);
    assert!(std::mem::size_of::<Params>() == 240);
};

/// The shader's mode codes (FORWARD, ROUNDED, SPLIT).
fn mode(spec: &EnsembleSpec) -> u32 {
    match spec.perturbation() {
        None => 0,
        Some(Perturbation::Rounded) => 1,
        Some(Perturbation::Split) => 2,
    }
}

fn key(entry: &'static str, dtype: DType) -> Result<PipelineKey> {
    Ok(PipelineKey {
        shader: ShaderSource::Ensemble,
        entry,
        constants: vec![("DT", dtype_code(dtype)?)],
    })
}

/// Every pipeline the family uses: the MLP per dtype, the check and finalize once.
pub(crate) fn all_pipelines() -> Vec<PipelineKey> {
    let mut keys = Vec::new();
    for dtype in [DType::F32, DType::F16, DType::BF16] {
        keys.extend(key(MLP, dtype));
    }
    for entry in [CHECK, FINALIZE] {
        keys.extend(key(entry, DType::F32));
    }
    keys
}

/// The launch shape of one spec on one device, and the scratch it needs.
struct Plan {
    tiles: u64,
    /// (model or Split direction, tile) items of the MLP dispatch, and the workgroups that
    /// stride over them.
    work: u64,
    launched: u64,
    /// Floats of each activation buffer in a workgroup's scratch; 0 when they fit on chip.
    act_floats: u64,
    /// Floats of scratch per workgroup.
    scratch_stride: u64,
}

impl Plan {
    fn new(backend: &WgpuBackend, spec: &EnsembleSpec) -> Result<Plan> {
        let layers = spec.widths.len() - 1;
        if layers > MAX_LAYERS {
            return Err(Error::Shape(format!(
                "the wgpu ensemble kernels take up to {MAX_LAYERS} layers, not {layers}"
            )));
        }
        let tiles = (spec.batch as u64).div_ceil(ROWS);
        let groups = match spec.scan {
            Some((k, Perturbation::Split)) => k,
            _ => spec.models,
        };
        let work = tiles * groups as u64;
        let widest = spec.widths[1..].iter().copied().max().unwrap_or(1);
        let act_floats = if widest <= HIDDEN {
            0
        } else {
            ROWS * widest as u64
        };
        // A Split scan keeps its shared first layer (b0 + W0 x and db + D x) in scratch.
        let parts = match spec.perturbation() {
            Some(Perturbation::Split) => 2 * ROWS * spec.widths[1] as u64,
            _ => 0,
        };
        let scratch_stride = 2 * act_floats + parts;
        let launched = if scratch_stride == 0 {
            work
        } else {
            // Every workgroup's scratch within one binding.
            let fit = backend.binding_limit() / (4 * scratch_stride);
            work.min(SCRATCH_WORKGROUPS).min(fit.max(1))
        };
        backend.check_binding(MLP, "the scratch", 4 * launched * scratch_stride)?;
        Ok(Plan {
            tiles,
            work,
            launched,
            act_floats,
            scratch_stride,
        })
    }
}

/// A storage buffer the kernels write and copies read.
fn output_buffer(backend: &WgpuBackend, label: &str, bytes: u64) -> Result<wgpu::Buffer> {
    backend.create_buffer(
        label,
        bytes,
        wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
    )
}

/// Tensors gathered into one buffer by device copies, each at a 4-byte-aligned offset.
struct Gather<'t> {
    copies: Vec<(&'t wgpu::Buffer, u64, u64)>,
    bytes: u64,
}

impl<'t> Gather<'t> {
    fn new() -> Self {
        Gather {
            copies: Vec::new(),
            bytes: 0,
        }
    }

    /// Appends `tensor`'s bytes; returns their byte offset in the gathered buffer.
    fn push(&mut self, tensor: &'t Tensor, what: &str) -> Result<u64> {
        let buffer = wgpu_buffer(tensor, what)?;
        let bytes = padded_size(tensor.byte_len() as u64);
        require(buffer, what, bytes, wgpu::BufferUsages::COPY_SRC)?;
        let at = self.bytes;
        self.copies.push((buffer, at, bytes));
        self.bytes += bytes;
        Ok(at)
    }

    /// Appends every layer's weights and biases; their element offsets go to `w` and `b`.
    fn layers(
        &mut self,
        weights: &[&'t Tensor],
        biases: &[&'t Tensor],
        elem: u64,
        (w, b): (&mut [u32; MAX_LAYERS], &mut [u32; MAX_LAYERS]),
    ) -> Result<()> {
        for (l, (weight, bias)) in weights.iter().zip(biases).enumerate() {
            w[l] = index(self.push(weight, "weights")? / elem, "a weight offset")?;
            b[l] = index(self.push(bias, "biases")? / elem, "a bias offset")?;
        }
        Ok(())
    }

    /// The buffer the tensors are gathered into (by [`Gather::record`]).
    fn buffer(&self, backend: &WgpuBackend, label: &str) -> Result<wgpu::Buffer> {
        backend.check_binding(MLP, label, self.bytes)?;
        backend.create_buffer(
            label,
            self.bytes,
            wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_DST,
        )
    }

    /// Records the copies into `buffer` on `encoder`.
    fn record(&self, encoder: &mut wgpu::CommandEncoder, buffer: &wgpu::Buffer) {
        for &(source, at, bytes) in &self.copies {
            encoder.copy_buffer_to_buffer(source, 0, buffer, at, bytes);
        }
    }
}

/// The tensors of one call: a forward's own layers, or a scan's centre and directions.
struct Inputs<'t> {
    x: &'t Tensor,
    weights: &'t [&'t Tensor],
    biases: &'t [&'t Tensor],
    labels: &'t Tensor,
    scan: Option<ScanInputs<'t>>,
}

struct ScanInputs<'t> {
    direction_weights: &'t [&'t Tensor],
    direction_biases: &'t [&'t Tensor],
    direction_of: &'t Tensor,
    distance: &'t Tensor,
}

/// The results of one submission: [E] f64 loss and accuracy, the [4] u64 status words and
/// the [E, B, C] f32 logits when asked.
struct Buffers {
    loss: wgpu::Buffer,
    accuracy: wgpu::Buffer,
    status: wgpu::Buffer,
    logits: Option<wgpu::Buffer>,
}

/// The uniform's fields that come from the spec and the plan (the offsets are the
/// gather's).
fn params_of(spec: &EnsembleSpec, plan: &Plan) -> Result<Params> {
    let mut widths = [0u32; 12];
    for (slot, &w) in widths.iter_mut().zip(&spec.widths) {
        *slot = index(w as u64, "a width")?;
    }
    let (models, batch) = (spec.models as u64, spec.batch as u64);
    Ok(Params {
        widths,
        layers: index(spec.widths.len() as u64 - 1, "layers")?,
        models: index(models, "E")?,
        // B is below the shader's "no row" marker 2^32 - 1: its labels fit one binding.
        batch: index(batch, "B")?,
        directions: index(spec.directions().unwrap_or(0) as u64, "K")?,
        tiles: index(plan.tiles, "tiles")?,
        work: index(plan.work, "work items")?,
        launched: index(plan.launched, "workgroups")?,
        mode: mode(spec),
        shared_input: u32::from(spec.shared_input),
        act_floats: index(plan.act_floats, "activation floats")?,
        scratch_stride: index(plan.scratch_stride, "scratch per workgroup")?,
        logits: u32::from(spec.logits),
        k_word: index(2 * batch, "k's word")?,
        t_word: index(2 * batch + 2 * models, "t's word")?,
        nan_bits: 0x7fc0_0000,
        classes: index(spec.classes() as u64, "C")?,
        ..Params::default()
    })
}

/// Runs one ensemble call: gathers, dispatches, copies out; nothing waits for the device.
fn run(backend: &WgpuBackend, spec: &EnsembleSpec, inputs: &Inputs<'_>) -> Result<Buffers> {
    if spec.scan.is_some() != inputs.scan.is_some() {
        return Err(Error::Shape(
            "the scan inputs must be present exactly for a landscape spec".into(),
        ));
    }
    backend.check_kernel_limits(ShaderSource::Ensemble)?;
    let plan = Plan::new(backend, spec)?;
    let mut params = params_of(spec, &plan)?;
    let elem = spec.dtype.size() as u64;
    let (e, b) = (spec.models as u64, spec.batch as u64);

    let mut layers = Gather::new();
    layers.layers(
        inputs.weights,
        inputs.biases,
        elem,
        (&mut params.w_off, &mut params.b_off),
    )?;
    let mut data = Gather::new();
    data.push(inputs.labels, "labels")?;
    if let Some(scan) = &inputs.scan {
        layers.layers(
            scan.direction_weights,
            scan.direction_biases,
            elem,
            (&mut params.dw_off, &mut params.db_off),
        )?;
        data.push(scan.direction_of, "direction_of")?;
        data.push(scan.distance, "distance")?;
    }
    let x = wgpu_buffer(inputs.x, "input")?;
    let x_bytes = padded_size(inputs.x.byte_len() as u64);
    backend.check_binding(MLP, "x", x_bytes)?;

    let logits = if spec.logits {
        let bytes = 4 * e * b * spec.classes() as u64;
        backend.check_binding(MLP, "the logits", bytes)?;
        Some(output_buffer(backend, "ensemble logits", bytes)?)
    } else {
        None
    };
    let unused = backend.create_buffer("ensemble unused", 16, wgpu::BufferUsages::STORAGE)?;
    // work: the status words, then loss and accuracy [E] f64, then the slots.
    let status_bytes = 8 * STATUS_WORDS as u64;
    let work_bytes = status_bytes + 16 * e + 4 * SLOT_WORDS * e * plan.tiles;
    backend.check_binding(MLP, "the slots", work_bytes)?;
    let work = output_buffer(backend, "ensemble work", work_bytes)?;
    let scratch = if plan.scratch_stride == 0 {
        None
    } else {
        let bytes = 4 * plan.launched * plan.scratch_stride;
        Some(output_buffer(backend, "ensemble scratch", bytes)?)
    };
    let out = Buffers {
        loss: output_buffer(backend, "ensemble loss", 8 * e)?,
        accuracy: output_buffer(backend, "ensemble accuracy", 8 * e)?,
        status: output_buffer(backend, "ensemble status", status_bytes)?,
        logits,
    };
    let uniform = backend.buffer_with(
        "ensemble params",
        bytemuck::bytes_of(&params),
        wgpu::BufferUsages::UNIFORM,
    )?;
    let params_buffer = layers.buffer(backend, "ensemble parameters")?;
    let data_buffer = data.buffer(backend, "ensemble labels and scan")?;
    let group = backend.bind_group(
        ShaderSource::Ensemble,
        &[
            whole(&uniform),
            (x, 0, x_bytes),
            whole(&params_buffer),
            whole(&data_buffer),
            whole(out.logits.as_ref().unwrap_or(&unused)),
            whole(&work),
            whole(scratch.as_ref().unwrap_or(&unused)),
        ],
    )?;
    let dispatches = [
        (backend.pipeline(&key(CHECK, DType::F32)?)?, (1, 1)),
        (
            backend.pipeline(&key(MLP, spec.dtype)?)?,
            backend.grid(MLP, plan.launched)?,
        ),
        (
            backend.pipeline(&key(FINALIZE, DType::F32)?)?,
            backend.grid(FINALIZE, e)?,
        ),
    ];
    backend.scoped("ensemble", || {
        let mut encoder =
            backend
                .device()
                .create_command_encoder(&wgpu::CommandEncoderDescriptor {
                    label: Some("ensemble"),
                });
        layers.record(&mut encoder, &params_buffer);
        data.record(&mut encoder, &data_buffer);
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("ensemble"),
                timestamp_writes: None,
            });
            for (pipeline, (gx, gy)) in &dispatches {
                pass.set_pipeline(pipeline);
                pass.set_bind_group(0, &group, &[]);
                pass.dispatch_workgroups(*gx, *gy, 1);
            }
        }
        encoder.copy_buffer_to_buffer(&work, 0, &out.status, 0, status_bytes);
        encoder.copy_buffer_to_buffer(&work, status_bytes, &out.loss, 0, 8 * e);
        encoder.copy_buffer_to_buffer(&work, status_bytes + 8 * e, &out.accuracy, 0, 8 * e);
        backend.queue().submit([encoder.finish()]);
        Ok(())
    })?;
    Ok(out)
}

impl WgpuBackend {
    /// The Tensor entries' shared tail: runs the call, watches the status words and wraps
    /// the outputs; nothing waits for the device.
    fn run_ensemble(&self, spec: &EnsembleSpec, inputs: &Inputs<'_>) -> Result<EnsembleOutput> {
        let out = run(self, spec, inputs)?;
        self.watch_ensemble(EnsembleWatch {
            status: out.status,
            classes: spec.classes(),
            directions: spec.directions().unwrap_or(0),
        });
        let device = inputs.x.device();
        let tensor = |buffer: wgpu::Buffer, shape: Vec<usize>, dtype: DType| {
            Tensor::from_storage(device, Storage::Wgpu(buffer), shape, dtype)
        };
        Ok(EnsembleOutput {
            loss: tensor(out.loss, vec![spec.models], DType::F64),
            accuracy: tensor(out.accuracy, vec![spec.models], DType::F64),
            logits: out
                .logits
                .map(|l| tensor(l, vec![spec.models, spec.batch, spec.classes()], DType::F32)),
        })
    }
}

impl EnsembleKernels for WgpuBackend {
    fn forward(&self, bound: &EnsembleCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let inputs = Inputs {
            x: call.input,
            weights: call.weights,
            biases: call.biases,
            labels: call.labels,
            scan: None,
        };
        self.run_ensemble(spec, &inputs)
    }

    fn landscape(&self, bound: &LandscapeCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let inputs = Inputs {
            x: call.input,
            weights: call.center_weights,
            biases: call.center_biases,
            labels: call.labels,
            scan: Some(ScanInputs {
                direction_weights: call.direction_weights,
                direction_biases: call.direction_biases,
                direction_of: call.direction_of,
                distance: call.distance,
            }),
        };
        self.run_ensemble(spec, &inputs)
    }
}
