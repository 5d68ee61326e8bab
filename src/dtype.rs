//! Element types a tensor can hold.

use half::{bf16, f16};

/// The dtype of a tensor's elements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    F16,
    BF16,
    /// Outputs that must keep f64 resolution (ensemble losses).
    F64,
    /// Class indices (targets, labels).
    I64,
}

impl DType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            DType::F32 => 4,
            DType::F16 | DType::BF16 => 2,
            DType::F64 | DType::I64 => 8,
        }
    }

    /// The name used in kernel entry points (`{op}_{name}`) and in the CLI.
    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
            DType::BF16 => "bf16",
            DType::F64 => "f64",
            DType::I64 => "i64",
        }
    }

    /// True for the float dtypes kernels take as input (f32, f16, bf16).
    pub fn is_kernel_float(self) -> bool {
        matches!(self, DType::F32 | DType::F16 | DType::BF16)
    }

    /// The smallest positive (subnormal) value: rounding to the dtype may lose up to this much
    /// absolutely where values underflow.
    pub fn smallest_subnormal(self) -> f64 {
        match self {
            DType::F32 => f64::from(f32::from_bits(1)),
            DType::F16 => f16::from_bits(1).to_f64(),
            DType::BF16 => bf16::from_bits(1).to_f64(),
            DType::F64 => f64::from_bits(1),
            DType::I64 => 0.0,
        }
    }

    /// `value` rounded to nearest in this dtype, widened back to f64.
    pub fn round(self, value: f64) -> f64 {
        match self {
            DType::F32 => f64::from(value as f32),
            DType::F16 => f16::from_f64(value).to_f64(),
            DType::BF16 => bf16::from_f64(value).to_f64(),
            DType::F64 => value,
            DType::I64 => value as i64 as f64,
        }
    }

    /// Unit roundoff of the dtype (half the distance from 1 to the next value); 0 for i64.
    pub fn unit_roundoff(self) -> f64 {
        match self {
            DType::F32 => f64::from(f32::EPSILON) / 2.0,
            DType::F16 => f64::from(f16::EPSILON) / 2.0,
            DType::BF16 => f64::from(bf16::EPSILON) / 2.0,
            DType::F64 => f64::EPSILON / 2.0,
            DType::I64 => 0.0,
        }
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A Rust type a tensor can be built from and read back into.
pub trait Element: bytemuck::Pod + Copy + Send + Sync + 'static {
    const DTYPE: DType;
    /// Exact widening to f64 (i64 beyond 2^53 rounds).
    fn to_f64(self) -> f64;
    /// Rounding to nearest from f64.
    fn from_f64(value: f64) -> Self;
}

impl Element for f32 {
    const DTYPE: DType = DType::F32;
    fn to_f64(self) -> f64 {
        f64::from(self)
    }
    fn from_f64(value: f64) -> Self {
        value as f32
    }
}

impl Element for f16 {
    const DTYPE: DType = DType::F16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(value: f64) -> Self {
        f16::from_f64(value)
    }
}

impl Element for bf16 {
    const DTYPE: DType = DType::BF16;
    fn to_f64(self) -> f64 {
        self.to_f64()
    }
    fn from_f64(value: f64) -> Self {
        bf16::from_f64(value)
    }
}

impl Element for f64 {
    const DTYPE: DType = DType::F64;
    fn to_f64(self) -> f64 {
        self
    }
    fn from_f64(value: f64) -> Self {
        value
    }
}

impl Element for i64 {
    const DTYPE: DType = DType::I64;
    fn to_f64(self) -> f64 {
        self as f64
    }
    fn from_f64(value: f64) -> Self {
        value as i64
    }
}
