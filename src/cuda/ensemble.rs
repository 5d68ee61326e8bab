//! ensemble on CUDA: `kernels/ensemble.cu`, on one stream.
//!
//! 1. `ensemble_check`: one block; the first label outside [0, C) and, for a scan, the
//!    first non-finite t and k outside [0, K), into four status words that the backend
//!    reads at the calling thread's next readback (`spec::ensemble::status_error`).
//! 2. `ensemble_mlp_{dtype}` (Exact) or `ensemble_mlp_tc_{dtype}` (TensorCore on sm_80+),
//!    `ensemble_split_*` for a Split scan:
//!    a block per (64-row batch tile, model), or per (tile, direction) for a Split scan,
//!    the models of one tile side by side (X from memory once per tile), through every
//!    layer: activations in shared memory when every width after the input is at most
//!    128, else in the block's own scratch (the grid is then one resident wave, so the
//!    scratch stays small and in L2); each layer a register-tiled GEMM over inputs and
//!    weights staged through a ring of shared-memory stages (cp.async where the rows are
//!    16-byte aligned, [`SHARED_BYTES`] a block): f32 FMA chains in input order
//!    (Exact), or mma.sync tf32 / bf16 / f16 with f32 accumulation (TensorCore); the
//!    tile's cross-entropies summed in f64 in row order into its (model, tile) slot.
//! 3. `ensemble_finalize`: a block per model; loss and accuracy in f64 from the slots.
//!
//! `Precision::TensorCore` below sm_80 runs the Exact kernels, which lie within the
//! TensorCore bound. [`ensemble_raw`] is the zero-copy entry; the `EnsembleKernels` impl
//! (the Tensor entries) calls it.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr, PushKernelArg};

use super::compile::KernelSource;
use super::launch::{
    alloc_output, as_i64, bytes, cuda_slice, driver_error, kernels, offsets, Fill, Pointers,
};
use super::{CudaBackend, EnsembleWatch};
use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::ensemble::{
    EnsembleCall, EnsembleKernels, EnsembleOutput, EnsembleSpec, LandscapeCall, Perturbation,
    Precision, STATUS_WORDS,
};

/// Batch rows per tile, threads per block, the widest activation kept on chip and the
/// deepest network: kernels/ensemble.cu's EN_ROWS, EN_THREADS, EN_HIDDEN, EN_MAX_LAYERS.
const ROWS: usize = 64;
const THREADS: u32 = 256;
const HIDDEN: usize = 128;
const MAX_LAYERS: usize = 8;

/// The MLP kernels' dynamic shared memory per block, kernels/ensemble.cu's
/// EN_SHARED_BYTES from its EN_COLS, EN_STAGES and EN_STRIDE: the activations, a ring of
/// stages of the input and weight rows, and the rows' losses and hits.
const SHARED_BYTES: u32 = {
    const COLS: usize = 128;
    const STAGES: usize = 2;
    const STRIDE: usize = 36;
    (4 * (ROWS * HIDDEN + STAGES * (ROWS + COLS) * STRIDE) + 12 * ROWS) as u32
};

/// The kernels' mode codes (EN_FORWARD, EN_ROUNDED, EN_SPLIT).
fn mode(spec: &EnsembleSpec) -> i32 {
    match spec.perturbation() {
        None => 0,
        Some(Perturbation::Rounded) => 1,
        Some(Perturbation::Split) => 2,
    }
}

/// The MLP kernel for `spec` on `stream`'s device: the MMA kernels where TensorCore is
/// asked and the device has mma.sync for tf32 and bf16 (sm_80+), else the Exact ones;
/// a Split scan has kernels of its own (`ensemble_split_*`).
fn kernel_name(stream: &CudaStream, spec: &EnsembleSpec) -> Result<&'static str> {
    let (major, _) = stream
        .context()
        .compute_capability()
        .map_err(driver_error("compute capability"))?;
    let tensor_core = spec.precision == Precision::TensorCore && major >= 8;
    let split = spec.perturbation() == Some(Perturbation::Split);
    Ok(kernel_names(spec.dtype)?[kernel_index(tensor_core, split)])
}

/// A dtype's MLP kernels, in [`kernel_index`] order: Exact, TensorCore, then the Split
/// scan's Exact and TensorCore kernels.
fn kernel_names(dtype: DType) -> Result<[&'static str; 4]> {
    Ok(match dtype {
        DType::F32 => [
            "ensemble_mlp_f32",
            "ensemble_mlp_tc_f32",
            "ensemble_split_f32",
            "ensemble_split_tc_f32",
        ],
        DType::F16 => [
            "ensemble_mlp_f16",
            "ensemble_mlp_tc_f16",
            "ensemble_split_f16",
            "ensemble_split_tc_f16",
        ],
        DType::BF16 => [
            "ensemble_mlp_bf16",
            "ensemble_mlp_tc_bf16",
            "ensemble_split_bf16",
            "ensemble_split_tc_bf16",
        ],
        other => {
            return Err(Error::DType(format!(
                "the CUDA ensemble kernels take f32, f16 or bf16, not {other}"
            )))
        }
    })
}

fn kernel_index(tensor_core: bool, split: bool) -> usize {
    usize::from(tensor_core) + 2 * usize::from(split)
}

// The kernel argument blocks. Each must match its struct in kernels/ensemble.cu field for
// field: the size and every field's offset are asserted here and, with the same numbers,
// in the .cu (LK_FIELD_AT). Pointers are CUdeviceptr values, 0 for null.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnsembleArgs {
    x: u64,
    weights: [u64; MAX_LAYERS],
    biases: [u64; MAX_LAYERS],
    direction_weights: [u64; MAX_LAYERS],
    direction_biases: [u64; MAX_LAYERS],
    labels: u64,
    direction_of: u64,
    distance: u64,
    logits: u64,
    partial: u64,
    scratch: u64,
    widths: [i64; MAX_LAYERS + 1],
    layers: i64,
    models: i64,
    batch: i64,
    directions: i64,
    tiles: i64,
    scratch_stride: i64,
    act_floats: i64,
    mode: i32,
    shared_input: i32,
}
const _: () = assert!(std::mem::size_of::<EnsembleArgs>() == 448);
offsets!(EnsembleArgs {
    x: 0,
    weights: 8,
    biases: 72,
    direction_weights: 136,
    direction_biases: 200,
    labels: 264,
    direction_of: 272,
    distance: 280,
    logits: 288,
    partial: 296,
    scratch: 304,
    widths: 312,
    layers: 384,
    models: 392,
    batch: 400,
    directions: 408,
    tiles: 416,
    scratch_stride: 424,
    act_floats: 432,
    mode: 440,
    shared_input: 444,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnsembleFinalizeArgs {
    partial: u64,
    loss: u64,
    accuracy: u64,
    models: i64,
    tiles: i64,
    batch: i64,
}
const _: () = assert!(std::mem::size_of::<EnsembleFinalizeArgs>() == 48);
offsets!(EnsembleFinalizeArgs {
    partial: 0,
    loss: 8,
    accuracy: 16,
    models: 24,
    tiles: 32,
    batch: 40,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnsembleCheckArgs {
    labels: u64,
    direction_of: u64,
    distance: u64,
    status: u64,
    batch: i64,
    classes: i64,
    models: i64,
    directions: i64,
}
const _: () = assert!(std::mem::size_of::<EnsembleCheckArgs>() == 64);
offsets!(EnsembleCheckArgs {
    labels: 0,
    direction_of: 8,
    distance: 16,
    status: 24,
    batch: 32,
    classes: 40,
    models: 48,
    directions: 56,
});

// SAFETY: the three argument structs are #[repr(C)], made only of integers and arrays of
// them (pointers travel as u64 CUdeviceptr values), with the field order, sizes and
// alignments of their C++ twins in kernels/ensemble.cu (sizes and offsets asserted on
// both sides), so the kernel reads exactly the bytes written here.
unsafe impl DeviceRepr for EnsembleArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for EnsembleFinalizeArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for EnsembleCheckArgs {}

/// The product of `dims`, or a shape error naming `what` on overflow.
fn count(dims: &[usize], what: &str) -> Result<usize> {
    dims.iter().try_fold(1usize, |n, &d| {
        n.checked_mul(d)
            .ok_or_else(|| Error::Shape(format!("{what}: {dims:?} overflows usize")))
    })
}

/// The launch shape of one spec on one device, and the scratch it needs.
struct Plan {
    tiles: usize,
    grid: usize,
    /// Floats of each activation buffer in a block's scratch; 0 when they fit on chip.
    act_floats: usize,
    /// Floats of scratch per block.
    scratch_stride: usize,
}

impl Plan {
    fn new(stream: &Arc<CudaStream>, spec: &EnsembleSpec) -> Result<Plan> {
        let layers = spec.widths.len() - 1;
        if layers > MAX_LAYERS {
            return Err(Error::Shape(format!(
                "the CUDA ensemble kernels take up to {MAX_LAYERS} layers, not {layers}"
            )));
        }
        let tiles = spec.batch.div_ceil(ROWS);
        let widest = spec.widths[1..].iter().copied().max().unwrap_or(1);
        let act_floats = if widest <= HIDDEN {
            0
        } else {
            count(&[ROWS, widest], "activations")?
        };
        // A Split scan keeps its shared first layer (b0 + W0 x and db + D x) in scratch.
        let parts = match spec.perturbation() {
            Some(Perturbation::Split) => count(&[2, ROWS, spec.widths[1]], "first layer")?,
            _ => 0,
        };
        let scratch_stride = act_floats
            .checked_mul(2)
            .and_then(|a| a.checked_add(parts))
            .ok_or_else(|| Error::Shape("scratch per block overflows usize".into()))?;
        let groups = match spec.scan {
            Some((k, Perturbation::Split)) => k,
            _ => spec.models,
        };
        let work = count(&[tiles, groups], "tiles")?;
        let grid = if scratch_stride == 0 {
            work
        } else {
            // One resident wave grid-strides over the work, so the scratch is
            // a few blocks' worth, not one per tile.
            let kernels = kernels(stream.context())?;
            let f = kernels.function(KernelSource::Ensemble, kernel_name(stream, spec)?)?;
            let resident = kernels.blocks_per_multiprocessor(&f, THREADS, SHARED_BYTES)? as usize
                * kernels.multiprocessors() as usize;
            work.min(resident.max(1))
        };
        Ok(Plan {
            tiles,
            grid,
            act_floats,
            scratch_stride,
        })
    }

    fn scratch_bytes(&self) -> Result<usize> {
        bytes(
            count(&[self.grid, self.scratch_stride], "scratch")?,
            4,
            "scratch",
        )
    }
}

/// A scan's direction parameters and (k, t) per model, as byte views of device memory.
#[derive(Debug)]
pub struct ScanInputs<'a> {
    /// Per layer: [K, out, in] and [K, out] in `spec.dtype`.
    pub direction_weights: Vec<CudaView<'a, u8>>,
    pub direction_biases: Vec<CudaView<'a, u8>>,
    /// k [E] i64 and t [E] f32, checked on the device (status words).
    pub direction_of: CudaView<'a, u8>,
    pub distance: CudaView<'a, u8>,
}

/// Device inputs of one ensemble call, as byte views of the caller's memory, each aligned
/// to its element size.
#[derive(Debug)]
pub struct EnsembleInputs<'a> {
    /// X [B, d0] or [E, B, d0] in `spec.dtype`.
    pub x: CudaView<'a, u8>,
    /// Per layer: a forward's [E, out, in] and [E, out]; a scan's centre [out, in] and [out].
    pub weights: Vec<CudaView<'a, u8>>,
    pub biases: Vec<CudaView<'a, u8>>,
    /// y [B] i64, checked on the device (status words).
    pub labels: CudaView<'a, u8>,
    /// The directions and (k, t) pairs of a landscape scan; None for a forward.
    pub scan: Option<ScanInputs<'a>>,
}

/// Device outputs (and scratch) of one ensemble shape; reusable across calls with the
/// same spec on the same device. `loss` and `accuracy` are [E] f64, `logits` [E, B, C] f32.
#[derive(Debug)]
pub struct EnsembleBuffers {
    pub loss: CudaSlice<u8>,
    pub accuracy: CudaSlice<u8>,
    pub logits: Option<CudaSlice<u8>>,
    /// [E, tiles, 2] f64: each (model, tile) slot's loss sum and right count.
    partial: CudaSlice<u8>,
    /// The blocks' activations (widths over 128) and a Split scan's first layer.
    scratch: CudaSlice<u8>,
    /// [4] u64, as `spec::ensemble::status_error` reads them.
    pub(crate) status: CudaSlice<u8>,
}

fn logit_bytes(spec: &EnsembleSpec) -> Result<usize> {
    bytes(
        count(&[spec.models, spec.batch, spec.classes()], "logits")?,
        4,
        "logits",
    )
}

impl EnsembleBuffers {
    /// Allocates the buffers for `spec` on `stream`, zeroed.
    pub fn new(stream: &Arc<CudaStream>, spec: &EnsembleSpec) -> Result<EnsembleBuffers> {
        EnsembleBuffers::allocate(stream, spec, Fill::Zero)
    }

    fn allocate(
        stream: &Arc<CudaStream>,
        spec: &EnsembleSpec,
        fill: Fill,
    ) -> Result<EnsembleBuffers> {
        let plan = Plan::new(stream, spec)?;
        let alloc = |len: usize| alloc_output(stream, len, fill);
        Ok(EnsembleBuffers {
            loss: alloc(bytes(spec.models, 8, "loss")?)?,
            accuracy: alloc(bytes(spec.models, 8, "accuracy")?)?,
            logits: if spec.logits {
                Some(alloc(logit_bytes(spec)?)?)
            } else {
                None
            },
            partial: alloc(bytes(
                count(&[spec.models, plan.tiles, 2], "slots")?,
                8,
                "slots",
            )?)?,
            scratch: alloc(plan.scratch_bytes()?)?,
            status: alloc(8 * STATUS_WORDS)?,
        })
    }
}

/// Checks and records the pointers of every layer: `lead` models' [out, in] and [out].
fn layer_pointers<'a>(
    p: &mut Pointers<'a>,
    weights: &'a [CudaView<'_, u8>],
    biases: &'a [CudaView<'_, u8>],
    spec: &EnsembleSpec,
    lead: usize,
    what: &str,
) -> Result<([u64; MAX_LAYERS], [u64; MAX_LAYERS])> {
    let layers = spec.widths.len() - 1;
    if weights.len() != layers || biases.len() != layers {
        return Err(Error::Shape(format!(
            "{what}: {} weight and {} bias buffers for {layers} layers",
            weights.len(),
            biases.len()
        )));
    }
    let elem = spec.dtype.size();
    let mut w_ptrs = [0u64; MAX_LAYERS];
    let mut b_ptrs = [0u64; MAX_LAYERS];
    for l in 0..layers {
        let (d_in, d_out) = (spec.widths[l], spec.widths[l + 1]);
        let w_bytes = bytes(count(&[lead, d_out, d_in], what)?, elem, what)?;
        w_ptrs[l] = p.read(&weights[l], w_bytes, elem, what)?;
        let b_bytes = bytes(count(&[lead, d_out], what)?, elem, what)?;
        b_ptrs[l] = p.read(&biases[l], b_bytes, elem, what)?;
    }
    Ok((w_ptrs, b_ptrs))
}

/// Runs an ensemble forward (`inputs.scan` None) or a landscape scan on `stream` over the
/// caller's device memory, writing `out`; no copy, no allocation, no synchronisation.
/// `spec` is trusted for semantics (build it with `ops::ensemble::validate` or
/// `validate_landscape`), but every buffer's size and alignment is checked against it, so
/// a wrong spec gives an error, never an out-of-bounds access. Bad labels, distances and
/// direction indices are found on the device: read `out`'s status words
/// (`spec::ensemble::status_error`) after the stream has passed the call.
pub fn ensemble_raw(
    stream: &Arc<CudaStream>,
    spec: &EnsembleSpec,
    inputs: &EnsembleInputs<'_>,
    out: &mut EnsembleBuffers,
) -> Result<()> {
    if spec.scan.is_some() != inputs.scan.is_some() {
        return Err(Error::Shape(
            "the scan inputs must be present exactly for a landscape spec".into(),
        ));
    }
    let plan = Plan::new(stream, spec)?;
    let name = kernel_name(stream, spec)?;
    let kernels = kernels(stream.context())?;
    let mlp = kernels.function(KernelSource::Ensemble, name)?;
    let check = kernels.function(KernelSource::Ensemble, "ensemble_check")?;
    let finalize = kernels.function(KernelSource::Ensemble, "ensemble_finalize")?;
    let (e, b) = (spec.models, spec.batch);
    let elem = spec.dtype.size();

    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let x_models = if spec.shared_input { 1 } else { e };
    let x_bytes = bytes(count(&[x_models, b, spec.widths[0]], "x")?, elem, "x")?;
    let x = p.read(&inputs.x, x_bytes, elem, "x")?;
    let lead = if spec.scan.is_some() { 1 } else { e };
    let (weights, biases) = layer_pointers(
        &mut p,
        &inputs.weights,
        &inputs.biases,
        spec,
        lead,
        "layers",
    )?;
    let labels = p.read(&inputs.labels, bytes(b, 8, "labels")?, 8, "labels")?;
    let (mut direction_weights, mut direction_biases) = ([0; MAX_LAYERS], [0; MAX_LAYERS]);
    let (mut direction_of, mut distance, mut directions) = (0, 0, 0);
    if let (Some(scan), Some((k, _))) = (&inputs.scan, spec.scan) {
        (direction_weights, direction_biases) = layer_pointers(
            &mut p,
            &scan.direction_weights,
            &scan.direction_biases,
            spec,
            k,
            "directions",
        )?;
        direction_of = p.read(&scan.direction_of, bytes(e, 8, "direction_of")?, 8, "k")?;
        distance = p.read(&scan.distance, bytes(e, 4, "distance")?, 4, "distance")?;
        directions = k;
    }
    let EnsembleBuffers {
        loss,
        accuracy,
        logits,
        partial,
        scratch,
        status,
    } = out;
    let logits = match (logits.as_mut(), spec.logits) {
        (Some(l), true) => p.write(l, logit_bytes(spec)?, 4, "logits")?,
        (None, false) => 0,
        _ => {
            return Err(Error::Shape(
                "the logits buffer must be present exactly when spec.logits is set".into(),
            ))
        }
    };
    let slots = bytes(count(&[e, plan.tiles, 2], "slots")?, 8, "slots")?;
    let partial = p.write(partial, slots, 8, "slots")?;
    let scratch = if plan.scratch_stride == 0 {
        0
    } else {
        p.write(scratch, plan.scratch_bytes()?, 4, "scratch")?
    };
    let status = p.write(status, 8 * STATUS_WORDS, 8, "status words")?;
    let loss = p.write(loss, bytes(e, 8, "loss")?, 8, "loss")?;
    let accuracy = p.write(accuracy, bytes(e, 8, "accuracy")?, 8, "accuracy")?;

    let (e64, b64, k64) = (as_i64(e, "E")?, as_i64(b, "B")?, as_i64(directions, "K")?);
    let check_args = EnsembleCheckArgs {
        labels,
        direction_of,
        distance,
        status,
        batch: b64,
        classes: as_i64(spec.classes(), "C")?,
        models: e64,
        directions: k64,
    };
    let cfg = kernels.single_block_config("ensemble_check", &check)?;
    // SAFETY: the argument block matches ensemble_check's parameter (see the DeviceRepr
    // impl). It reads B i64 labels and, when the pointers are not null, E i64 direction
    // indices and E f32 distances, and writes the four u64 status words, all checked above
    // for size and alignment. One block, checked against the limits.
    unsafe { stream.launch_builder(&check).arg(&check_args).launch(cfg) }
        .map_err(driver_error("ensemble_check"))?;

    let mut widths = [0i64; MAX_LAYERS + 1];
    for (slot, &w) in widths.iter_mut().zip(&spec.widths) {
        *slot = as_i64(w, "width")?;
    }
    let args = EnsembleArgs {
        x,
        weights,
        biases,
        direction_weights,
        direction_biases,
        labels,
        direction_of,
        distance,
        logits,
        partial,
        scratch,
        widths,
        layers: as_i64(spec.widths.len() - 1, "layers")?,
        models: e64,
        batch: b64,
        directions: k64,
        tiles: as_i64(plan.tiles, "tiles")?,
        scratch_stride: as_i64(plan.scratch_stride, "scratch stride")?,
        act_floats: as_i64(plan.act_floats, "activation floats")?,
        mode: mode(spec),
        shared_input: i32::from(spec.shared_input),
    };
    let cfg = kernels.fixed_config_shared(name, &mlp, plan.grid, THREADS, SHARED_BYTES)?;
    // SAFETY: the argument block matches the kernel's parameter (see the DeviceRepr impl).
    // Every input is read within the sizes checked above: X's rows, each layer's
    // [lead, out, in] and [lead, out] (the centre's with lead 1 in a scan, a direction's
    // only at k in [0, K), the kernel's own check), labels only when in [0, C), E
    // distances and indices. It writes the E tiles slots, E B C logits when the pointer
    // is not null, and at most `grid` blocks of `scratch_stride` floats of scratch (the
    // grid is `plan.grid` or fewer, capped by the device), all checked. The block is the
    // 256 threads the kernel's tiles are laid out for, checked against the limits, with
    // the SHARED_BYTES of dynamic shared memory its EnShared takes (a static_assert there).
    unsafe { stream.launch_builder(&mlp).arg(&args).launch(cfg) }.map_err(driver_error(name))?;

    let finalize_args = EnsembleFinalizeArgs {
        partial,
        loss,
        accuracy,
        models: e64,
        tiles: args.tiles,
        batch: b64,
    };
    let cfg = kernels.fixed_config("ensemble_finalize", &finalize, e, THREADS)?;
    // SAFETY: the argument block matches ensemble_finalize's parameter. It reads the
    // E tiles slots the MLP kernel wrote before it on this stream and writes E f64 of loss
    // and of accuracy, all checked above; it grid-strides over the models.
    unsafe {
        stream
            .launch_builder(&finalize)
            .arg(&finalize_args)
            .launch(cfg)
    }
    .map_err(driver_error("ensemble_finalize"))?;
    drop(p);
    Ok(())
}

fn views<'t>(tensors: &[&'t Tensor], what: &str) -> Result<Vec<CudaView<'t, u8>>> {
    tensors
        .iter()
        .map(|t| cuda_slice(t, what).map(CudaSlice::as_view))
        .collect()
}

impl CudaBackend {
    /// The Tensor entries' shared tail: allocates, runs [`ensemble_raw`], watches the
    /// status words and wraps the outputs; nothing waits for the device.
    fn run_ensemble(
        &self,
        spec: &EnsembleSpec,
        inputs: &EnsembleInputs<'_>,
        anchor: &Tensor,
    ) -> Result<EnsembleOutput> {
        let stream = self.stream();
        let mut out = EnsembleBuffers::allocate(stream, spec, Fill::Unwritten)?;
        ensemble_raw(stream, spec, inputs, &mut out)?;
        self.watch_ensemble(EnsembleWatch {
            status: out.status,
            classes: spec.classes(),
            directions: spec.directions().unwrap_or(0),
        });
        let device = anchor.device();
        let tensor = |slice: CudaSlice<u8>, shape: Vec<usize>, dtype: DType| {
            Tensor::from_storage(device, Storage::Cuda(slice), shape, dtype)
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

impl EnsembleKernels for CudaBackend {
    fn forward(&self, bound: &EnsembleCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let inputs = EnsembleInputs {
            x: cuda_slice(call.input, "input")?.as_view(),
            weights: views(call.weights, "weights")?,
            biases: views(call.biases, "biases")?,
            labels: cuda_slice(call.labels, "labels")?.as_view(),
            scan: None,
        };
        self.run_ensemble(spec, &inputs, call.input)
    }

    fn landscape(&self, bound: &LandscapeCall<'_>) -> Result<EnsembleOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let inputs = EnsembleInputs {
            x: cuda_slice(call.input, "input")?.as_view(),
            weights: views(call.center_weights, "center weights")?,
            biases: views(call.center_biases, "center biases")?,
            labels: cuda_slice(call.labels, "labels")?.as_view(),
            scan: Some(ScanInputs {
                direction_weights: views(call.direction_weights, "direction weights")?,
                direction_biases: views(call.direction_biases, "direction biases")?,
                direction_of: cuda_slice(call.direction_of, "direction_of")?.as_view(),
                distance: cuda_slice(call.distance, "distance")?.as_view(),
            }),
        };
        self.run_ensemble(spec, &inputs, call.input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_kernel_name_is_the_dtype_precision_and_scan_asked_and_is_defined() {
        let source = include_str!("../../kernels/ensemble.cu");
        for (dtype, suffix) in [
            (DType::F32, "f32"),
            (DType::F16, "f16"),
            (DType::BF16, "bf16"),
        ] {
            let names = kernel_names(dtype).expect("a float dtype has kernels");
            for tensor_core in [false, true] {
                let variant = format!("{}{suffix}", if tensor_core { "tc_" } else { "" });
                // EN_KERNELS(variant, ...) defines ensemble_mlp_variant and ensemble_split_variant.
                assert!(source.contains(&format!("EN_KERNELS({variant}, ")));
                for split in [false, true] {
                    let family = if split { "split" } else { "mlp" };
                    assert_eq!(
                        names[kernel_index(tensor_core, split)],
                        format!("ensemble_{family}_{variant}")
                    );
                }
            }
        }
        assert!(kernel_names(DType::I64).is_err());
    }
}
