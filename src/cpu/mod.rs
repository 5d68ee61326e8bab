//! The native CPU backend: f32 kernels (f64 where the spec says so) over the tensors'
//! host memory, independent of the reference, which stays the oracle. It is the
//! embedded default with no GPU. Its data is on the host already, so it checks data
//! (class targets, weights) at the call.
//!
//! Determinism: work is cut into chunks whose size depends on the problem's shape only,
//! never on the number of threads; each chunk is computed on its own and partial results
//! are merged in chunk order, so the bits are the same on 1 or 64 threads. Inner loops
//! run over fixed-width lane arrays ([`LANES`]) that the compiler turns into vector
//! instructions; the lane structure, not the vector width, fixes the order of every sum.

pub mod bnstats;
pub mod energy;
pub mod ensemble;
pub mod xent;

use half::{bf16, f16, slice::HalfFloatSliceExt};
use rayon::prelude::*;

use crate::device::{Backend, Tensor};
use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::spec::BackendKind;

/// The CPU's kernels (every family's trait is implemented in its file here).
pub(crate) struct CpuBackend;

impl BackendKind for CpuBackend {
    fn kind(&self) -> Backend {
        Backend::Cpu
    }
}

/// Width of the lane arrays the inner loops accumulate in (one AVX-512 vector of f32,
/// two AVX2 or four SSE vectors).
pub(crate) const LANES: usize = 16;

/// Elements per chunk of parallel work: big enough that a chunk costs far more than
/// handing it to a thread, small enough that 2 to 64 cores all get work.
const CHUNK_ELEMENTS: usize = 1 << 16;

/// Rows of `row_len` elements per chunk of parallel work (at least 1): a function of
/// the shape alone.
fn chunk_rows(row_len: usize) -> usize {
    (CHUNK_ELEMENTS / row_len.max(1)).max(1)
}

/// Runs `work(items)` on the ranges of `chunk` consecutive items of `0..len` (the last
/// may be shorter), in parallel, and returns the results in chunk order for the caller
/// to merge in that order.
fn map_chunks<R: Send>(
    len: usize,
    chunk: usize,
    work: impl Fn(std::ops::Range<usize>) -> R + Sync + Send,
) -> Vec<R> {
    let chunk = chunk.max(1);
    (0..len.div_ceil(chunk))
        .into_par_iter()
        .map(|c| work(c * chunk..((c + 1) * chunk).min(len)))
        .collect()
}

/// A piece of kernel work (a chunk of rows, tiles or pairs) for [`run_best`].
trait Work {
    type Output;
    /// Marked `#[inline(always)]` in every impl, with the kernel functions it calls, so
    /// that it is compiled into each of `run_best`'s paths with that path's features.
    fn run(self) -> Self::Output;
}

/// Runs `work` compiled for AVX-512 where the CPU has it, else for AVX2 with FMA, else
/// as compiled for the baseline target. Every path runs the same IEEE operations in the
/// same order (Rust never contracts a * b + c into a fused multiply-add, an explicit
/// `mul_add` is one exactly rounded operation on every path, and the lane arrays fix the
/// order of every sum), so they give the same bits; AVX-512 holds a lane array in one
/// register where AVX2 needs two and SSE four, and a `mul_add` is one instruction on the
/// first two (a call to the C library's `fma` on the baseline path: slow, same bits).
fn run_best<W: Work>(work: W) -> W::Output {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx512f") {
            // SAFETY: avx512 needs AVX-512F, which the CPU running this has (checked above).
            return unsafe { avx512(work) };
        }
        if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
        {
            // SAFETY: avx2_fma needs AVX2 and FMA, which the CPU running this has (checked
            // above).
            return unsafe { avx2_fma(work) };
        }
    }
    work.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn avx512<W: Work>(work: W) -> W::Output {
    work.run()
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn avx2_fma<W: Work>(work: W) -> W::Output {
    work.run()
}

/// A float input (f32, f16 or bf16) read as f32.
#[derive(Clone, Copy)]
pub(crate) enum Floats<'a> {
    F32(&'a [f32]),
    F16(&'a [f16]),
    BF16(&'a [bf16]),
}

impl<'a> Floats<'a> {
    /// The tensor's elements in place; `Error::DType` for a non-float tensor.
    fn of(tensor: &'a Tensor) -> Result<Floats<'a>> {
        Ok(match tensor.dtype() {
            DType::F32 => Floats::F32(tensor.host_slice()?),
            DType::F16 => Floats::F16(tensor.host_slice()?),
            DType::BF16 => Floats::BF16(tensor.host_slice()?),
            other => {
                return Err(Error::DType(format!(
                    "the CPU kernels read f32, f16 or bf16, got {other}"
                )))
            }
        })
    }

    /// Element `i` as f32.
    #[inline(always)]
    fn at(&self, i: usize) -> f32 {
        match self {
            Floats::F32(values) => values[i],
            Floats::F16(values) => values[i].to_f32(),
            Floats::BF16(values) => values[i].to_f32(),
        }
    }

    /// Elements `start .. start + buf.len()` as f32: f32 in place, 16-bit values decoded
    /// into `buf` with `half`'s slice conversion.
    #[inline(always)]
    fn read<'b>(&self, start: usize, buf: &'b mut [f32]) -> &'b [f32]
    where
        'a: 'b,
    {
        let range = start..start + buf.len();
        match self {
            Floats::F32(values) => &values[range],
            Floats::F16(values) => {
                values[range].convert_to_f32_slice(buf);
                buf
            }
            Floats::BF16(values) => {
                values[range].convert_to_f32_slice(buf);
                buf
            }
        }
    }
}

/// A float output (f32, f16 or bf16) written from f32 values.
pub(crate) enum FloatsMut<'a> {
    F32(&'a mut [f32]),
    F16(&'a mut [f16]),
    BF16(&'a mut [bf16]),
}

impl<'a> FloatsMut<'a> {
    fn of(tensor: &'a mut Tensor) -> Result<FloatsMut<'a>> {
        Ok(match tensor.dtype() {
            DType::F32 => FloatsMut::F32(tensor.host_slice_mut()?),
            DType::F16 => FloatsMut::F16(tensor.host_slice_mut()?),
            DType::BF16 => FloatsMut::BF16(tensor.host_slice_mut()?),
            other => {
                return Err(Error::DType(format!(
                    "the CPU kernels write f32, f16 or bf16, got {other}"
                )))
            }
        })
    }

    /// Cut into chunks of `chunk` elements (the last may be shorter).
    fn chunks(self, chunk: usize) -> Vec<FloatsMut<'a>> {
        let chunk = chunk.max(1);
        match self {
            FloatsMut::F32(v) => v.chunks_mut(chunk).map(FloatsMut::F32).collect(),
            FloatsMut::F16(v) => v.chunks_mut(chunk).map(FloatsMut::F16).collect(),
            FloatsMut::BF16(v) => v.chunks_mut(chunk).map(FloatsMut::BF16).collect(),
        }
    }

    /// The `N` elements at `start` as one f32 array to write in place, when the output
    /// is f32 and `len` is `N` (a whole tile).
    #[inline(always)]
    fn f32_tile<const N: usize>(&mut self, start: usize, len: usize) -> Option<&mut [f32; N]> {
        match self {
            FloatsMut::F32(v) if len == N => {
                <&mut [f32; N]>::try_from(&mut v[start..start + N]).ok()
            }
            _ => None,
        }
    }

    /// Writes `values` at `start`, rounded to nearest in 16-bit dtypes.
    #[inline(always)]
    fn write(&mut self, start: usize, values: &[f32]) {
        let range = start..start + values.len();
        match self {
            FloatsMut::F32(v) => v[range].copy_from_slice(values),
            FloatsMut::F16(v) => v[range].convert_from_f32_slice(values),
            FloatsMut::BF16(v) => v[range].convert_from_f32_slice(values),
        }
    }
}

/// A new [n] f32 CPU tensor with element i = `value(i)`.
fn f32_tensor(shape: &[usize], value: impl Fn(usize) -> f32) -> Result<Tensor> {
    let mut out = Tensor::host_output(shape, DType::F32)?;
    for (i, o) in out.host_slice_mut::<f32>()?.iter_mut().enumerate() {
        *o = value(i);
    }
    Ok(out)
}

/// A [1] f32 CPU tensor holding `value` rounded once.
fn scalar(value: f64) -> Result<Tensor> {
    f32_tensor(&[1], |_| value as f32)
}

/// e^x in f32, within 2 ulp of the exact value for normal results, correctly scaled
/// (one rounding) into the subnormals, 0 below them, +inf above f32::MAX, NaN for NaN.
/// Cody-Waite reduction x = n ln 2 + r with ln 2 split in a short high part (n * high is
/// exact for |n| < 2^15) and a low part, then the Cephes minimax polynomial on
/// |r| <= ln 2 / 2 (both by fused multiply-adds: half the instructions of a multiply and an
/// add) and 2^n applied as two normal factors, so a subnormal result rounds once.
/// Branch-free (selects only), so loops over lanes of it vectorise.
#[inline(always)]
pub(crate) fn exp(x: f32) -> f32 {
    const LN2_HIGH: f32 = 0.693_359_4;
    const LN2_LOW: f32 = -2.121_944_4e-4;
    // 1.5 * 2^23: adding it rounds to an integer kept in the low mantissa bits.
    const ROUND: f32 = 12_582_912.0;
    // Past these e^x is +inf or below half the smallest subnormal; NaN passes both
    // comparisons unchanged and stays NaN through the polynomial.
    let x = if x > 89.0 { 89.0 } else { x };
    let x = if x < -104.0 { -104.0 } else { x };
    let shifted = x * std::f32::consts::LOG2_E + ROUND;
    let n = shifted - ROUND;
    let n_int = shifted.to_bits() as i32 - ROUND.to_bits() as i32;
    let r = n.mul_add(-LN2_HIGH, x);
    let r = n.mul_add(-LN2_LOW, r);
    let r2 = r * r;
    let p: f32 = 1.987_569_1e-4;
    let p = p.mul_add(r, 1.398_199_9e-3);
    let p = p.mul_add(r, 8.333_452e-3);
    let p = p.mul_add(r, 4.166_579_6e-2);
    let p = p.mul_add(r, 1.666_666_5e-1);
    let p = p.mul_add(r, 0.5);
    let p = p.mul_add(r2, r) + 1.0;
    // n in [-150, 129]: each half of it is a normal power of two.
    let low = n_int >> 1;
    let high = n_int - low;
    p * f32::from_bits(((low + 127) as u32) << 23) * f32::from_bits(((high + 127) as u32) << 23)
}

/// The sum of a lane array, in a fixed pairwise order.
#[inline(always)]
fn lane_sum(lanes: &[f32; LANES]) -> f32 {
    let mut width = LANES / 2;
    let mut v = *lanes;
    while width > 0 {
        for l in 0..width {
            v[l] += v[l + width];
        }
        width /= 2;
    }
    v[0]
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Distance in f32 ulps between `got` and the f32 nearest to `want`.
    fn ulps(got: f32, want: f64) -> u32 {
        let want = want as f32;
        (got.to_bits() as i64 - want.to_bits() as i64).unsigned_abs() as u32
    }

    #[test]
    fn exp_is_within_two_ulp_of_f64_over_the_whole_range() {
        // Every 97th f32 bit pattern in [-104, 89] (both signs), plus the edges.
        let mut worst = 0;
        for bits in (0..=u32::MAX).step_by(97) {
            let x = f32::from_bits(bits);
            if !(-104.0..=89.0).contains(&x) {
                continue;
            }
            let want = f64::from(x).exp();
            let got = exp(x);
            if want < f64::from(f32::MIN_POSITIVE) {
                // Subnormal results: one rounding of the exact value.
                let allowed = f64::from(f32::from_bits(1)) * 1.01;
                assert!(
                    (f64::from(got) - want).abs() <= allowed,
                    "exp({x}) = {got}, want {want}"
                );
            } else if want > f64::from(f32::MAX) {
                assert_eq!(got, f32::INFINITY, "exp({x})");
            } else {
                let u = ulps(got, want);
                assert!(u <= 2, "exp({x}) = {got}, want {want}: {u} ulp");
                worst = worst.max(u);
            }
        }
        assert!(worst >= 1, "the sweep compared no rounded values");
    }

    #[test]
    fn exp_handles_the_special_values() {
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
        assert_eq!(exp(-200.0), 0.0);
        assert_eq!(exp(f32::INFINITY), f32::INFINITY);
        assert_eq!(exp(89.0), f32::INFINITY);
        assert!(exp(f32::NAN).is_nan());
        assert!(ulps(exp(88.72), f64::from(88.72f32).exp()) <= 2);
        assert!(exp(-103.0) > 0.0 && exp(-103.0) < f32::MIN_POSITIVE);
    }

    #[test]
    fn lane_sum_adds_every_lane() {
        let lanes: [f32; LANES] = std::array::from_fn(|l| (l + 1) as f32);
        assert_eq!(lane_sum(&lanes), (LANES * (LANES + 1) / 2) as f32);
    }
}
