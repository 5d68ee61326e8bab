//! energy on CUDA: `kernels/energy.cu`, on one stream.
//!
//! Two-sample energy distance:
//!
//! 1. `energy_pairs_{dtype}`, three launches (X-Y, X-X, Y-Y): 64-row tiles of one set
//!    against 64-row tiles of the other staged through shared memory, each block a row
//!    tile and a chunk of up to 16 column tiles, writing the f64 sum of its pairs to its
//!    own scratch slot (within a set, pairs i < j only). A rank of a sharded distance
//!    (`crate::nccl`) launches a contiguous share of each term's tiles (`TileShare`).
//! 2. `energy_distance_merge`: one block; the slots of each term summed in f64 in slot
//!    order, the weight totals, the weight check (status word, outputs NaN on bad
//!    weights), the four outputs and the gradient's four term coefficients.
//! 3. With the gradient, `energy_grad_{dtype}`, four launches (X against Y and X, then Y
//!    against X and Y): a block owns 64 rows x 64 dims of one set's gradient and walks
//!    every column tile of the other set, so the second launch of a set adds to rows no
//!    other block touches.
//!
//! Energy score:
//!
//! 1. `energy_score_{dtype}`: a block per 64 prediction rows (and, with the gradient, 64
//!    of their dims), over the 64 x 64 pair tiles of their samples (pairs of different
//!    samples masked); the tile's sums toward term1 and term2 to f64 scratch and, with
//!    the gradient, the rows of d loss / d preds.
//! 2. `energy_score_merge`: one block; term1, term2 and the loss in f64.
//!
//! Scratch is O(N / 64 * M / 1024) slots for the distance and 2 n m / 64 f64 for the score:
//! never a distance matrix. [`energy_score`] / [`energy_distance`] are the Tensor entries
//! (in the `EnergyKernels` impl); [`energy_score_raw`] / [`energy_distance_raw`] the
//! zero-copy ones, which the Tensor entries call.

use std::sync::Arc;

use cudarc::driver::{CudaSlice, CudaStream, CudaView, DeviceRepr, PushKernelArg};

use super::compile::KernelSource;
use super::launch::{
    alloc_output, as_i64, bytes, cuda_slice, driver_error, kernels, offsets, Fill, Kernels,
    Pointers,
};
use super::CudaBackend;
use crate::device::{Storage, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::energy::{
    pair_slots, power_code, weight_status_error, EnergyDistance, EnergyDistanceCall,
    EnergyDistanceOutput, EnergyDistanceSpec, EnergyKernels, EnergyScoreCall, EnergyScoreOutput,
    EnergyScoreSpec, Statistic, PAIR_TILE,
};

/// Threads of a pair or score block (kernels/energy.cu lays its 64 x 64 tiles out for
/// 256).
const PAIR_THREADS: u32 = 256;

fn kernel_name(family: &str, dtype: DType) -> Result<&'static str> {
    Ok(match (family, dtype) {
        ("pairs", DType::F32) => "energy_pairs_f32",
        ("pairs", DType::F16) => "energy_pairs_f16",
        ("pairs", DType::BF16) => "energy_pairs_bf16",
        ("score", DType::F32) => "energy_score_f32",
        ("score", DType::F16) => "energy_score_f16",
        ("score", DType::BF16) => "energy_score_bf16",
        ("grad", DType::F32) => "energy_grad_f32",
        ("grad", DType::F16) => "energy_grad_f16",
        ("grad", DType::BF16) => "energy_grad_bf16",
        (_, other) => {
            return Err(Error::DType(format!(
                "the CUDA energy kernels take f32, f16 or bf16, not {other}"
            )))
        }
    })
}

// The kernel argument blocks. Each must match its struct in kernels/energy.cu field for
// field: the size and every field's offset are asserted here and, with the same
// numbers, in the .cu (LK_FIELD_AT). Pointers are CUdeviceptr values, 0 for null.

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnergyPairArgs {
    a: u64,
    b: u64,
    wa: u64,
    wb: u64,
    partial: u64,
    na: i64,
    nb: i64,
    d: i64,
    chunks: i64,
    tiles: i64,
    beta: f64,
    within: i32,
    power: i32,
    first: i64,
}
const _: () = assert!(std::mem::size_of::<EnergyPairArgs>() == 104);
offsets!(EnergyPairArgs {
    a: 0,
    b: 8,
    wa: 16,
    wb: 24,
    partial: 32,
    na: 40,
    nb: 48,
    d: 56,
    chunks: 64,
    tiles: 72,
    beta: 80,
    within: 88,
    power: 92,
    first: 96,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnergyMergeArgs {
    partial_xy: u64,
    partial_xx: u64,
    partial_yy: u64,
    wx: u64,
    wy: u64,
    distance: u64,
    cross: u64,
    within_x: u64,
    within_y: u64,
    status: u64,
    coef: u64,
    tiles_xy: i64,
    tiles_xx: i64,
    tiles_yy: i64,
    n: i64,
    m: i64,
    u_statistic: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<EnergyMergeArgs>() == 136);
offsets!(EnergyMergeArgs {
    partial_xy: 0,
    partial_xx: 8,
    partial_yy: 16,
    wx: 24,
    wy: 32,
    distance: 40,
    cross: 48,
    within_x: 56,
    within_y: 64,
    status: 72,
    coef: 80,
    tiles_xy: 88,
    tiles_xx: 96,
    tiles_yy: 104,
    n: 112,
    m: 120,
    u_statistic: 128,
    pad: 132,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnergyGradArgs {
    a: u64,
    b: u64,
    wa: u64,
    wb: u64,
    coef: u64,
    grad: u64,
    na: i64,
    nb: i64,
    d: i64,
    dim_chunks: i64,
    tiles: i64,
    beta: f64,
    coef_index: i32,
    power: i32,
    accumulate: i32,
    pad: i32,
}
const _: () = assert!(std::mem::size_of::<EnergyGradArgs>() == 112);
offsets!(EnergyGradArgs {
    a: 0,
    b: 8,
    wa: 16,
    wb: 24,
    coef: 32,
    grad: 40,
    na: 48,
    nb: 56,
    d: 64,
    dim_chunks: 72,
    tiles: 80,
    beta: 88,
    coef_index: 96,
    power: 100,
    accumulate: 104,
    pad: 108,
});

/// Dimensions of one set's gradient a block of `energy_grad` owns (EG_DIMS).
const GRAD_DIMS: usize = 64;

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnergyScoreArgs {
    y: u64,
    preds: u64,
    tile_sums: u64,
    grad: u64,
    n: i64,
    m: i64,
    d: i64,
    beta: f64,
    c1: f32,
    c2: f32,
    power: i32,
    pad: i32,
    dim_chunks: i64,
    tiles: i64,
}
const _: () = assert!(std::mem::size_of::<EnergyScoreArgs>() == 96);
offsets!(EnergyScoreArgs {
    y: 0,
    preds: 8,
    tile_sums: 16,
    grad: 24,
    n: 32,
    m: 40,
    d: 48,
    beta: 56,
    c1: 64,
    c2: 68,
    power: 72,
    pad: 76,
    dim_chunks: 80,
    tiles: 88,
});

#[repr(C)]
#[derive(Clone, Copy, Debug, Default)]
struct EnergyScoreMergeArgs {
    tile_sums: u64,
    term1: u64,
    term2: u64,
    loss: u64,
    n: i64,
    m: i64,
}
const _: () = assert!(std::mem::size_of::<EnergyScoreMergeArgs>() == 48);
offsets!(EnergyScoreMergeArgs {
    tile_sums: 0,
    term1: 8,
    term2: 16,
    loss: 24,
    n: 32,
    m: 40,
});

// SAFETY: the five argument structs are #[repr(C)], made only of integers and floats
// (pointers travel as u64 CUdeviceptr values), with the field order, sizes and
// alignments of their C++ twins in kernels/energy.cu (sizes and offsets asserted on both
// sides), so the kernel reads exactly the bytes written here.
unsafe impl DeviceRepr for EnergyPairArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for EnergyMergeArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for EnergyScoreArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for EnergyScoreMergeArgs {}
// SAFETY: as above.
unsafe impl DeviceRepr for EnergyGradArgs {}

/// Device outputs (and scratch) of one energy-score shape; reusable across calls with
/// the same n, m, d and grad. Outputs are f32, laid out as `EnergyScoreOutput` says.
#[derive(Debug)]
pub struct EnergyScoreBuffers {
    /// [1] each.
    pub term1: CudaSlice<u8>,
    pub term2: CudaSlice<u8>,
    pub loss: CudaSlice<u8>,
    /// [n, m, d], when `spec.grad`.
    pub grad: Option<CudaSlice<u8>>,
    /// [row tiles, 2] f64: each 64-row tile's sums toward term1 and term2.
    tile_sums: CudaSlice<u8>,
}

/// The 64-row tiles of the n m prediction rows: the score's scratch slots.
fn score_tiles(spec: &EnergyScoreSpec) -> Result<usize> {
    score_rows(spec).map(|rows| rows.div_ceil(PAIR_TILE))
}

fn score_rows(spec: &EnergyScoreSpec) -> Result<usize> {
    spec.n
        .checked_mul(spec.m)
        .ok_or_else(|| Error::Shape("n * m overflows usize".into()))
}

fn grad_bytes(spec: &EnergyScoreSpec) -> Result<usize> {
    rows_bytes(score_rows(spec)?, spec.d, 4, "grad")
}

impl EnergyScoreBuffers {
    /// Allocates the buffers for `spec` on `stream`, zeroed.
    pub fn new(stream: &Arc<CudaStream>, spec: &EnergyScoreSpec) -> Result<EnergyScoreBuffers> {
        EnergyScoreBuffers::allocate(stream, spec, Fill::Zero)
    }

    fn allocate(
        stream: &Arc<CudaStream>,
        spec: &EnergyScoreSpec,
        fill: Fill,
    ) -> Result<EnergyScoreBuffers> {
        let alloc = |len: usize| alloc_output(stream, len, fill);
        Ok(EnergyScoreBuffers {
            term1: alloc(4)?,
            term2: alloc(4)?,
            loss: alloc(4)?,
            grad: if spec.grad {
                Some(alloc(grad_bytes(spec)?)?)
            } else {
                None
            },
            tile_sums: alloc(bytes(score_tiles(spec)?, 16, "score tile sums")?)?,
        })
    }
}

/// Runs the energy score on `stream` over the caller's device memory: y [n, d] and
/// preds [n, m, d] dense in `spec.dtype`, aligned to its element size; writes `out`. No
/// copy, no allocation, no synchronisation. `spec` is trusted for semantics (build it
/// with `ops::energy::validate_score`), but every buffer's size and alignment is checked
/// against it, so a wrong spec gives an error, never an out-of-bounds access.
pub fn energy_score_raw(
    stream: &Arc<CudaStream>,
    spec: &EnergyScoreSpec,
    y: &CudaView<'_, u8>,
    preds: &CudaView<'_, u8>,
    out: &mut EnergyScoreBuffers,
) -> Result<()> {
    let (n, m, d) = (spec.n, spec.m, spec.d);
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::Empty(format!(
            "the energy score needs n, m, d >= 1, got {n}, {m}, {d}"
        )));
    }
    let name = kernel_name("score", spec.dtype)?;
    let elem = spec.dtype.size();
    let rows = score_rows(spec)?;

    let kernels = kernels(stream.context())?;
    let score = kernels.function(KernelSource::Energy, name)?;
    let merge = kernels.function(KernelSource::Energy, "energy_score_merge")?;

    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let y_ptr = p.read(y, rows_bytes(n, d, elem, "y")?, elem, "y")?;
    let preds_ptr = p.read(preds, rows_bytes(rows, d, elem, "preds")?, elem, "preds")?;
    let EnergyScoreBuffers {
        term1,
        term2,
        loss,
        grad,
        tile_sums,
    } = out;
    let tile_sums_ptr = p.write(
        tile_sums,
        bytes(score_tiles(spec)?, 16, "score tile sums")?,
        8,
        "score tile sums",
    )?;
    let grad_ptr = match (grad.as_mut(), spec.grad) {
        (Some(g), true) => p.write(g, grad_bytes(spec)?, 4, "grad")?,
        (None, false) => 0,
        _ => {
            return Err(Error::Shape(
                "the grad buffer must be present exactly when spec.grad is set".into(),
            ))
        }
    };
    let term1_ptr = p.write(term1, 4, 4, "term1")?;
    let term2_ptr = p.write(term2, 4, 4, "term2")?;
    let loss_ptr = p.write(loss, 4, 4, "loss")?;

    let (nf, mf) = (n as f64, m as f64);
    // Rounded once here from f64: the factors of d loss / d preds (term2's pairs count
    // in both orders, hence no 0.5).
    let c1 = (1.0 / (nf * mf)) as f32;
    let c2 = if m < 2 {
        0.0
    } else {
        (-(mf / (mf - 1.0)) / (nf * mf * mf)) as f32
    };
    let (n64, m64) = (as_i64(n, "n")?, as_i64(m, "m")?);
    // Without the gradient one block per row tile; with it, one per 64 of its dims too.
    let dim_chunks = if spec.grad { d.div_ceil(GRAD_DIMS) } else { 1 };
    let tiles = rows
        .div_ceil(PAIR_TILE)
        .checked_mul(dim_chunks)
        .ok_or_else(|| Error::Shape("score tiles overflow usize".into()))?;
    let args = EnergyScoreArgs {
        y: y_ptr,
        preds: preds_ptr,
        tile_sums: tile_sums_ptr,
        grad: grad_ptr,
        n: n64,
        m: m64,
        d: as_i64(d, "d")?,
        beta: spec.beta,
        c1,
        c2,
        power: i32::from(power_code(spec.beta)),
        pad: 0,
        dim_chunks: as_i64(dim_chunks, "dimension chunks")?,
        tiles: as_i64(tiles, "tiles")?,
    };
    let cfg = kernels.fixed_config(name, &score, tiles, PAIR_THREADS)?;
    // SAFETY: the argument block matches the kernel's parameter (see the DeviceRepr
    // impl). The kernel reads n d elements of y and n m d of preds, writes 2 f64 per
    // 64-row tile and, when the pointer is not null, n m d f32 of grad, all checked above
    // for size and alignment; rows are indexed below n m only (64-bit), each block
    // writing only its 64 rows (and 64 dims of their gradient). The block is the 256
    // threads the kernel's 64 x 64 tiles are laid out for, checked against the device
    // and function limits.
    unsafe { stream.launch_builder(&score).arg(&args).launch(cfg) }.map_err(driver_error(name))?;

    let merge_args = EnergyScoreMergeArgs {
        tile_sums: tile_sums_ptr,
        term1: term1_ptr,
        term2: term2_ptr,
        loss: loss_ptr,
        n: n64,
        m: m64,
    };
    let cfg = kernels.single_block_config("energy_score_merge", &merge)?;
    // SAFETY: the argument block matches energy_score_merge's parameter. It reads the
    // 2 f64 per 64-row tile the score kernel wrote before it on this stream and writes
    // one f32 each of term1, term2 and loss, all checked above. One block, checked
    // against the limits.
    unsafe { stream.launch_builder(&merge).arg(&merge_args).launch(cfg) }
        .map_err(driver_error("energy_score_merge"))?;
    drop(p);
    Ok(())
}

/// Device inputs of one energy distance, as byte views of the caller's memory, each
/// aligned to its element size.
#[derive(Debug)]
pub struct EnergyDistanceInputs<'a> {
    /// X [N, d] and Y [M, d] in `spec.dtype`.
    pub x: CudaView<'a, u8>,
    pub y: CudaView<'a, u8>,
    /// [N] and [M] f32, not checked on the host: the merge kernel checks them (finite,
    /// at least 0, not all 0), and on bad weights every output is NaN and the status word of
    /// [`EnergyDistanceBuffers`] says why.
    pub weights_x: Option<CudaView<'a, u8>>,
    pub weights_y: Option<CudaView<'a, u8>>,
}

/// Which pair tiles of the three terms (X-Y, X-X, Y-Y) one of `world` ranks computes: a
/// contiguous share of each term's tiles, `ceil(tiles / world)` slots per rank, so the
/// ranks' slots put side by side in rank order are the single-device slots (followed by
/// padding that the merge never reads).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct TileShare {
    pub(crate) rank: usize,
    pub(crate) world: usize,
}

impl TileShare {
    /// Every tile, on one device.
    pub(crate) const WHOLE: TileShare = TileShare { rank: 0, world: 1 };

    /// The slots each rank writes per term.
    pub(crate) fn slots(self, spec: &EnergyDistanceSpec) -> [usize; 3] {
        term_tiles(spec).map(|tiles| tiles.div_ceil(self.world))
    }

    /// The tiles [first, first + count) of a term of `tiles` that this rank computes.
    fn range(self, tiles: usize) -> (usize, usize) {
        let per_rank = tiles.div_ceil(self.world);
        let first = (self.rank * per_rank).min(tiles);
        (first, (first + per_rank).min(tiles) - first)
    }
}

/// Each term's tiles on one device, in the merge's order (X-Y, X-X, Y-Y).
fn term_tiles(spec: &EnergyDistanceSpec) -> [usize; 3] {
    [
        pair_slots(spec.n, spec.m).0,
        pair_slots(spec.n, spec.n).0,
        pair_slots(spec.m, spec.m).0,
    ]
}

/// Where each term's slots start in a buffer of the slots of `world` ranks, laid out
/// term by term, each term's in rank order.
pub(crate) fn term_offsets(slots: [usize; 3], world: usize) -> [usize; 3] {
    [0, world * slots[0], world * (slots[0] + slots[1])]
}

fn distance_slots(spec: &EnergyDistanceSpec) -> usize {
    TileShare::WHOLE.slots(spec).iter().sum()
}

/// Device outputs (and scratch) of one energy-distance shape; reusable across calls with
/// the same spec. The distance and its terms are [1] f32; with `spec.grad`, `grad_x`
/// [N, d] and `grad_y` [M, d] f32.
#[derive(Debug)]
pub struct EnergyDistanceBuffers {
    pub distance: CudaSlice<u8>,
    pub cross: CudaSlice<u8>,
    pub within_x: CudaSlice<u8>,
    pub within_y: CudaSlice<u8>,
    pub grad_x: Option<CudaSlice<u8>>,
    pub grad_y: Option<CudaSlice<u8>>,
    /// One f64 slot per pair tile chunk of the three terms.
    partial: CudaSlice<u8>,
    /// [4] f64: the gradient's term coefficients, from the merge.
    coef: CudaSlice<u8>,
    /// [1] u64: 0, or the bits of `spec::energy::WEIGHTS_*` for bad weights.
    pub(crate) status: CudaSlice<u8>,
}

impl EnergyDistanceBuffers {
    /// Allocates the buffers for `spec` on `stream`, zeroed.
    pub fn new(
        stream: &Arc<CudaStream>,
        spec: &EnergyDistanceSpec,
    ) -> Result<EnergyDistanceBuffers> {
        EnergyDistanceBuffers::allocate(stream, spec, Fill::Zero)
    }

    pub(crate) fn allocate(
        stream: &Arc<CudaStream>,
        spec: &EnergyDistanceSpec,
        fill: Fill,
    ) -> Result<EnergyDistanceBuffers> {
        let alloc = |len: usize| alloc_output(stream, len, fill);
        let grad = |rows: usize, what: &str| -> Result<Option<CudaSlice<u8>>> {
            if !spec.grad {
                return Ok(None);
            }
            alloc(rows_bytes(rows, spec.d, 4, what)?).map(Some)
        };
        Ok(EnergyDistanceBuffers {
            distance: alloc(4)?,
            cross: alloc(4)?,
            within_x: alloc(4)?,
            within_y: alloc(4)?,
            grad_x: grad(spec.n, "grad_x")?,
            grad_y: grad(spec.m, "grad_y")?,
            partial: alloc(bytes(distance_slots(spec), 8, "pair slots")?)?,
            coef: alloc(4 * 8)?,
            status: alloc(8)?,
        })
    }

    /// The outputs as tensors on the device of `call` (whose backend is `backend`); with
    /// weights, the status word is checked at the calling thread's next readback.
    pub(crate) fn into_output(
        self,
        backend: &CudaBackend,
        call: &EnergyDistance<'_>,
    ) -> EnergyDistanceOutput {
        if call.weights_x.is_some() || call.weights_y.is_some() {
            backend.watch_weights(self.status);
        }
        let device = call.x.device();
        let tensor = |slice: CudaSlice<u8>, shape: Vec<usize>| {
            Tensor::from_storage(device, Storage::Cuda(slice), shape, DType::F32)
        };
        EnergyDistanceOutput {
            distance: tensor(self.distance, vec![1]),
            cross: tensor(self.cross, vec![1]),
            within_x: tensor(self.within_x, vec![1]),
            within_y: tensor(self.within_y, vec![1]),
            grad_x: self.grad_x.map(|g| tensor(g, call.x.shape().to_vec())),
            grad_y: self.grad_y.map(|g| tensor(g, call.y.shape().to_vec())),
        }
    }

    /// The weight check of the last call on these buffers: `Error::Option` as the CPU
    /// gives for bad weights (the outputs are then NaN). Waits for `stream` (the one the
    /// call ran on): it downloads.
    pub fn check_weights(&self, stream: &Arc<CudaStream>) -> Result<()> {
        let bytes = stream
            .clone_dtoh(&self.status)
            .map_err(driver_error("reading the energy status word"))?;
        let word = bytes
            .get(..8)
            .and_then(|b| <[u8; 8]>::try_from(b).ok())
            .map(u64::from_le_bytes)
            .ok_or_else(|| Error::Cuda("the energy status word holds under 8 bytes".into()))?;
        if word == 0 {
            Ok(())
        } else {
            Err(weight_status_error(word))
        }
    }
}

/// One pair term's launch: rows of `a` against rows of `b` (`within`: b is a, i < j).
struct PairTerm {
    a: u64,
    b: u64,
    wa: u64,
    wb: u64,
    na: usize,
    nb: usize,
    within: bool,
}

/// Bytes of `rows` points of `d` values of `size` bytes, or a shape error naming `what`.
fn rows_bytes(rows: usize, d: usize, size: usize, what: &str) -> Result<usize> {
    rows.checked_mul(d)
        .ok_or_else(|| Error::Shape(format!("{what}: rows * d overflows usize")))
        .and_then(|e| bytes(e, size, what))
}

/// The checked device addresses of a distance's sets and weights (0: uniform).
struct SetPointers {
    x: u64,
    y: u64,
    wx: u64,
    wy: u64,
}

fn point_sets<'a>(
    p: &mut Pointers<'a>,
    spec: &EnergyDistanceSpec,
    inputs: &'a EnergyDistanceInputs<'_>,
) -> Result<SetPointers> {
    let (n, m, d) = (spec.n, spec.m, spec.d);
    if n == 0 || m == 0 || d == 0 {
        return Err(Error::Empty(format!(
            "the energy distance needs N, M, d >= 1, got {n}, {m}, {d}"
        )));
    }
    let elem = spec.dtype.size();
    let x = p.read(&inputs.x, rows_bytes(n, d, elem, "x")?, elem, "x")?;
    let y = p.read(&inputs.y, rows_bytes(m, d, elem, "y")?, elem, "y")?;
    let wx = match &inputs.weights_x {
        Some(w) => p.read(w, bytes(n, 4, "weights_x")?, 4, "weights_x")?,
        None => 0,
    };
    let wy = match &inputs.weights_y {
        Some(w) => p.read(w, bytes(m, 4, "weights_y")?, 4, "weights_y")?,
        None => 0,
    };
    Ok(SetPointers { x, y, wx, wy })
}

/// Launches the pair kernel over `share`'s tiles of the three terms, writing that rank's
/// slots to `partial`: X-Y, X-X, Y-Y, `share.slots(spec)` f64 each.
pub(crate) fn pair_sums(
    stream: &Arc<CudaStream>,
    spec: &EnergyDistanceSpec,
    inputs: &EnergyDistanceInputs<'_>,
    partial: &mut CudaSlice<u8>,
    share: TileShare,
) -> Result<()> {
    let name = kernel_name("pairs", spec.dtype)?;
    let kernels = kernels(stream.context())?;
    let pairs = kernels.function(KernelSource::Energy, name)?;
    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let sets = point_sets(&mut p, spec, inputs)?;
    let slots = share.slots(spec);
    let slot_bytes = bytes(slots.iter().sum(), 8, "pair slots")?;
    let base = p.write(partial, slot_bytes, 8, "pair slots")?;
    let (n, m) = (spec.n, spec.m);
    let terms = [
        PairTerm {
            a: sets.x,
            b: sets.y,
            wa: sets.wx,
            wb: sets.wy,
            na: n,
            nb: m,
            within: false,
        },
        PairTerm {
            a: sets.x,
            b: sets.x,
            wa: sets.wx,
            wb: sets.wx,
            na: n,
            nb: n,
            within: true,
        },
        PairTerm {
            a: sets.y,
            b: sets.y,
            wa: sets.wy,
            wb: sets.wy,
            na: m,
            nb: m,
            within: true,
        },
    ];
    for ((term, offset), all_tiles) in terms
        .iter()
        .zip(term_offsets(slots, 1))
        .zip(term_tiles(spec))
    {
        let (first, tiles) = share.range(all_tiles);
        if tiles == 0 {
            // A rank past the term's last tile: its slots are padding, never merged.
            continue;
        }
        let args = EnergyPairArgs {
            a: term.a,
            b: term.b,
            wa: term.wa,
            wb: term.wb,
            // In bounds: the three terms' slots add up to the checked `slot_bytes`, and
            // this launch writes `tiles` <= slots of its term from its offset.
            partial: base + 8 * offset as u64,
            na: as_i64(term.na, "rows")?,
            nb: as_i64(term.nb, "rows")?,
            d: as_i64(spec.d, "d")?,
            chunks: as_i64(pair_slots(term.na, term.nb).1, "column chunks")?,
            tiles: as_i64(tiles, "tiles")?,
            beta: spec.beta,
            within: i32::from(term.within),
            power: i32::from(power_code(spec.beta)),
            first: as_i64(first, "first tile")?,
        };
        let cfg = kernels.fixed_config(name, &pairs, tiles, PAIR_THREADS)?;
        // SAFETY: the argument block matches the kernel's parameter (see the DeviceRepr
        // impl). It reads na d and nb d elements of the two sets and na, nb f32 weights
        // (null: uniform), all checked above for size and alignment, and writes `tiles`
        // f64 slots from the term's offset in the scratch, which holds all three terms'
        // slots (checked). The tiles first .. first + tiles are tiles of the term (the
        // share's range), and rows past the sets' are masked in the kernel. The block is
        // the 256 threads the kernel's tiles are laid out for, checked against the
        // device and function limits.
        unsafe { stream.launch_builder(&pairs).arg(&args).launch(cfg) }
            .map_err(driver_error(name))?;
    }
    drop(p);
    Ok(())
}

/// Launches the merge of the three terms' slots into `out`'s outputs and status word.
/// The slots are `gathered`'s, of `world` ranks laid out term by term, each term's in
/// rank order (as all-gathers of each rank's term slots leave them), or, for None,
/// `out`'s own, written by [`pair_sums`] with [`TileShare::WHOLE`].
pub(crate) fn merge_sums(
    stream: &Arc<CudaStream>,
    spec: &EnergyDistanceSpec,
    inputs: &EnergyDistanceInputs<'_>,
    gathered: Option<(&CudaView<'_, u8>, usize)>,
    out: &mut EnergyDistanceBuffers,
) -> Result<()> {
    let kernels = kernels(stream.context())?;
    let merge = kernels.function(KernelSource::Energy, "energy_distance_merge")?;
    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let sets = point_sets(&mut p, spec, inputs)?;
    let EnergyDistanceBuffers {
        distance,
        cross,
        within_x,
        within_y,
        partial,
        coef,
        status,
        ..
    } = out;
    let (base, world) = match gathered {
        None => {
            let need = bytes(distance_slots(spec), 8, "pair slots")?;
            (p.write(partial, need, 8, "pair slots")?, 1)
        }
        Some((slots, world)) => {
            let per_rank: usize = TileShare { rank: 0, world }.slots(spec).iter().sum();
            let need = bytes(per_rank, 8, "gathered pair slots")
                .and_then(|b| bytes(b, world, "gathered pair slots"))?;
            (p.read(slots, need, 8, "gathered pair slots")?, world)
        }
    };
    // In bounds: each term's offset plus its tiles is within the slots checked above.
    let [xy, xx, yy] =
        term_offsets(TileShare { rank: 0, world }.slots(spec), world).map(|o| base + 8 * o as u64);
    let [tiles_xy, tiles_xx, tiles_yy] = term_tiles(spec);
    let args = EnergyMergeArgs {
        partial_xy: xy,
        partial_xx: xx,
        partial_yy: yy,
        wx: sets.wx,
        wy: sets.wy,
        distance: p.write(distance, 4, 4, "distance")?,
        cross: p.write(cross, 4, 4, "cross")?,
        within_x: p.write(within_x, 4, 4, "within_x")?,
        within_y: p.write(within_y, 4, 4, "within_y")?,
        status: p.write(status, 8, 8, "status word")?,
        coef: p.write(coef, 4 * 8, 8, "gradient coefficients")?,
        tiles_xy: as_i64(tiles_xy, "X-Y tiles")?,
        tiles_xx: as_i64(tiles_xx, "X-X tiles")?,
        tiles_yy: as_i64(tiles_yy, "Y-Y tiles")?,
        n: as_i64(spec.n, "N")?,
        m: as_i64(spec.m, "M")?,
        u_statistic: i32::from(spec.statistic == Statistic::U),
        pad: 0,
    };
    let cfg = kernels.single_block_config("energy_distance_merge", &merge)?;
    // SAFETY: the argument block matches energy_distance_merge's parameter. It reads
    // each term's tiles f64 from its offset, within the slots checked above (the pair
    // kernels wrote them before it on this stream, or the all-gathers of the ranks'
    // slots did), and the N and M weights (null: uniform), and writes one f32 of each
    // output, the u64 status word and the four f64 gradient coefficients, all checked
    // above. One block, checked against the limits.
    unsafe { stream.launch_builder(&merge).arg(&args).launch(cfg) }
        .map_err(driver_error("energy_distance_merge"))?;
    drop(p);
    Ok(())
}

/// Runs the two-sample energy distance on `stream` over the caller's device memory,
/// writing `out`; no copy, no allocation, no synchronisation. `spec` is trusted for
/// semantics (build it with `ops::energy::validate_distance`), but every buffer's size
/// and alignment is checked against it, so a wrong spec gives an error, never an
/// out-of-bounds access. Bad weight values are found on the device:
/// [`EnergyDistanceBuffers::check_weights`].
pub fn energy_distance_raw(
    stream: &Arc<CudaStream>,
    spec: &EnergyDistanceSpec,
    inputs: &EnergyDistanceInputs<'_>,
    out: &mut EnergyDistanceBuffers,
) -> Result<()> {
    pair_sums(stream, spec, inputs, &mut out.partial, TileShare::WHOLE)?;
    merge_sums(stream, spec, inputs, None, out)?;
    distance_gradient(stream, spec, inputs, out)
}

/// With `spec.grad`, launches the four terms of d distance / dX and d distance / dY into
/// `out`'s gradients, scaled by the coefficients the merge wrote before them on this
/// stream; nothing without it.
pub(crate) fn distance_gradient(
    stream: &Arc<CudaStream>,
    spec: &EnergyDistanceSpec,
    inputs: &EnergyDistanceInputs<'_>,
    out: &mut EnergyDistanceBuffers,
) -> Result<()> {
    if !spec.grad {
        return Ok(());
    }
    let kernels = kernels(stream.context())?;
    let mut p = Pointers {
        stream,
        guards: Vec::new(),
    };
    let sets = point_sets(&mut p, spec, inputs)?;
    let EnergyDistanceBuffers {
        grad_x,
        grad_y,
        coef,
        ..
    } = out;
    let (Some(grad_x), Some(grad_y)) = (grad_x.as_mut(), grad_y.as_mut()) else {
        return Err(Error::Shape(
            "the gradient was asked but the buffers hold no grad_x / grad_y".into(),
        ));
    };
    let gx = p.write(
        grad_x,
        rows_bytes(spec.n, spec.d, 4, "grad_x")?,
        4,
        "grad_x",
    )?;
    let gy = p.write(
        grad_y,
        rows_bytes(spec.m, spec.d, 4, "grad_y")?,
        4,
        "grad_y",
    )?;
    // Taken as a write only for its address: the kernels read the merge's coefficients.
    let coef = p.write(coef, 4 * 8, 8, "gradient coefficients")?;
    let launch = GradLaunch {
        stream,
        spec,
        kernels: &kernels,
        coef,
    };
    let (set_x, set_y) = ((sets.x, sets.wx, spec.n), (sets.y, sets.wy, spec.m));
    // A set's cross term writes its rows, its within term adds to them.
    launch.run(gx, set_x, set_y, COEF_X_CROSS)?;
    launch.run(gx, set_x, set_x, COEF_X_WITHIN)?;
    launch.run(gy, set_y, set_x, COEF_Y_CROSS)?;
    launch.run(gy, set_y, set_y, COEF_Y_WITHIN)?;
    drop(p);
    Ok(())
}

/// The merge's coefficient slots (ENERGY_COEF_* in kernels/energy.cu): each set's cross
/// term, which writes its gradient rows, and its within term, which adds to them.
const COEF_X_CROSS: i32 = 0;
const COEF_X_WITHIN: i32 = 1;
const COEF_Y_CROSS: i32 = 2;
const COEF_Y_WITHIN: i32 = 3;

/// What every gradient launch of one distance call shares.
struct GradLaunch<'s> {
    stream: &'s Arc<CudaStream>,
    spec: &'s EnergyDistanceSpec,
    kernels: &'s Kernels,
    /// The merge's four f64 coefficients.
    coef: u64,
}

impl GradLaunch<'_> {
    /// One term of d distance / dA into `grad` [na, d] f32 (written by a cross term,
    /// added to by a within term): A's rows (pointer, weights, rows) against B's.
    fn run(
        &self,
        grad: u64,
        (a, wa, na): (u64, u64, usize),
        (b, wb, nb): (u64, u64, usize),
        coef_index: i32,
    ) -> Result<()> {
        let name = kernel_name("grad", self.spec.dtype)?;
        let kernels = self.kernels;
        let f = kernels.function(KernelSource::Energy, name)?;
        let dim_chunks = self.spec.d.div_ceil(GRAD_DIMS);
        let tiles = na
            .div_ceil(PAIR_TILE)
            .checked_mul(dim_chunks)
            .ok_or_else(|| Error::Shape("gradient tiles overflow usize".into()))?;
        let args = EnergyGradArgs {
            a,
            b,
            wa,
            wb,
            coef: self.coef,
            grad,
            na: as_i64(na, "rows")?,
            nb: as_i64(nb, "rows")?,
            d: as_i64(self.spec.d, "d")?,
            dim_chunks: as_i64(dim_chunks, "dimension chunks")?,
            tiles: as_i64(tiles, "tiles")?,
            beta: self.spec.beta,
            coef_index,
            power: i32::from(power_code(self.spec.beta)),
            accumulate: i32::from(coef_index == COEF_X_WITHIN || coef_index == COEF_Y_WITHIN),
            pad: 0,
        };
        let cfg = kernels.fixed_config(name, &f, tiles, PAIR_THREADS)?;
        // SAFETY: the argument block matches the kernel's parameter. It reads na d and
        // nb d elements of the two sets and their f32 weights (null: uniform), checked
        // for size and alignment by energy_distance_raw, and the 4 f64 coefficients the
        // merge wrote before it on this stream; each block reads and writes only its own
        // 64 rows x 64 dims of `grad` [na, d] f32 (checked), rows and dims past the ends
        // masked in the kernel. 256 threads, checked against the limits.
        unsafe { self.stream.launch_builder(&f).arg(&args).launch(cfg) }
            .map_err(driver_error(name))?;
        Ok(())
    }
}

fn view<'t>(tensor: &'t Tensor, what: &str) -> Result<CudaView<'t, u8>> {
    cuda_slice(tensor, what).map(CudaSlice::as_view)
}

impl EnergyKernels for CudaBackend {
    /// The Tensor entry: allocates the outputs and runs [`energy_score_raw`] on the
    /// backend's stream; nothing waits for the device.
    fn energy_score(&self, bound: &EnergyScoreCall<'_>) -> Result<EnergyScoreOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let y = cuda_slice(call.y, "y")?.as_view();
        let preds = cuda_slice(call.preds, "preds")?.as_view();
        let stream = self.stream();
        let mut out = EnergyScoreBuffers::allocate(stream, spec, Fill::Unwritten)?;
        energy_score_raw(stream, spec, &y, &preds, &mut out)?;

        let device = call.preds.device();
        let tensor = |slice: CudaSlice<u8>, shape: Vec<usize>| {
            Tensor::from_storage(device, Storage::Cuda(slice), shape, DType::F32)
        };
        Ok(EnergyScoreOutput {
            term1: tensor(out.term1, vec![1]),
            term2: tensor(out.term2, vec![1]),
            loss: tensor(out.loss, vec![1]),
            grad: out.grad.map(|g| tensor(g, vec![spec.n, spec.m, spec.d])),
        })
    }

    /// The Tensor entry of [`energy_distance_raw`]; a bad weight is reported at the
    /// calling thread's next readback or synchronisation.
    fn energy_distance(&self, bound: &EnergyDistanceCall<'_>) -> Result<EnergyDistanceOutput> {
        let (spec, call) = (bound.spec(), bound.call());
        let inputs = EnergyDistanceInputs {
            x: view(call.x, "x")?,
            y: view(call.y, "y")?,
            weights_x: call.weights_x.map(|w| view(w, "weights_x")).transpose()?,
            weights_y: call.weights_y.map(|w| view(w, "weights_y")).transpose()?,
        };
        let stream = self.stream();
        let mut out = EnergyDistanceBuffers::allocate(stream, spec, Fill::Unwritten)?;
        energy_distance_raw(stream, spec, &inputs, &mut out)?;
        Ok(out.into_output(self, call))
    }
}

#[cfg(test)]
mod tests {
    use super::TileShare;

    /// The ranks' all-gather puts rank r's slots of a term at r ceil(tiles / world): the
    /// ranks' tile ranges must start there and cover the term's tiles once, in order, so
    /// that the gathered slots are the single-device ones followed by padding.
    #[test]
    fn tile_shares_in_rank_order_are_the_single_device_tiles() {
        for tiles in 1..300usize {
            for world in 1..=9 {
                let per_rank = tiles.div_ceil(world);
                let mut covered = 0;
                for rank in 0..world {
                    let (first, count) = TileShare { rank, world }.range(tiles);
                    assert!(count <= per_rank, "{tiles} tiles, rank {rank} of {world}");
                    if count > 0 {
                        assert_eq!(first, rank * per_rank, "{tiles} tiles, rank {rank}");
                        assert_eq!(first, covered, "{tiles} tiles, rank {rank}");
                    }
                    covered += count;
                }
                assert_eq!(covered, tiles, "{tiles} tiles over {world} ranks");
            }
        }
        assert_eq!(TileShare::WHOLE.range(17), (0, 17));
    }
}
