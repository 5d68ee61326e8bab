// common.wgsl: helpers shared by every shader family.
//
// The Rust side prepends this file to each family's .wgsl source (see src/wgpu/mod.rs,
// ShaderSource::code), as the CUDA side prepends common.cuh.

// Element types of the bindings, set per pipeline through override constants.
const DT_F32: u32 = 0u;
const DT_F16: u32 = 1u;
const DT_BF16: u32 = 2u;

const POS_INF_BITS: u32 = 0x7f800000u;

fn is_nan_bits(b: u32) -> bool {
    return (b & 0x7fffffffu) > POS_INF_BITS;
}

// --------------------------------------------------------------- f16 / bf16 codecs

// f32 bits of the f16 `h` (low 16 bits), exact.
fn f16_to_f32_bits(h: u32) -> u32 {
    let sign = (h & 0x8000u) << 16u;
    let exponent = (h >> 10u) & 0x1fu;
    let mantissa = h & 0x3ffu;
    if exponent == 0x1fu {
        return sign | POS_INF_BITS | (mantissa << 13u);
    }
    if exponent == 0u {
        // Subnormal (or zero): mantissa * 2^-24 is exact and normal in f32.
        return sign | bitcast<u32>(f32(mantissa) * 5.9604644775390625e-8);
    }
    return sign | ((exponent + 112u) << 23u) | (mantissa << 13u);
}

// f16 bits of the f32 bits `b`, rounded to nearest even.
fn f32_to_f16_bits(b: u32) -> u32 {
    let sign = (b >> 16u) & 0x8000u;
    let a = b & 0x7fffffffu;
    if a > POS_INF_BITS {
        return sign | 0x7e00u;
    }
    // 65520 and above round to infinity.
    if a >= 0x477ff000u {
        return sign | 0x7c00u;
    }
    // Normal f16 (>= 2^-14): rebias the exponent by 112 and round 13 mantissa bits away.
    if a >= 0x38800000u {
        let r = a - 0x38000000u;
        return sign | ((r + 0xfffu + ((r >> 13u) & 1u)) >> 13u);
    }
    // At or below 2^-25 (half the smallest subnormal, a tie to even 0): zero.
    if a <= 0x33000000u {
        return sign;
    }
    // Subnormal f16: the value in units of 2^-24, rounded to nearest even.
    let mantissa = (a & 0x7fffffu) | 0x800000u;
    let shift = 126u - (a >> 23u);
    var q = mantissa >> shift;
    let rest = mantissa & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if rest > half || (rest == half && (q & 1u) == 1u) {
        q = q + 1u;
    }
    return sign | q;
}

// bf16 bits of the f32 bits `b`, rounded to nearest even; NaN stays a quiet NaN.
fn f32_to_bf16_bits(b: u32) -> u32 {
    if is_nan_bits(b) {
        return ((b >> 16u) | 0x40u) & 0xffffu;
    }
    return (b + 0x7fffu + ((b >> 16u) & 1u)) >> 16u;
}

// f32 bits of element `half` (0 = low, 1 = high) of a word of two 16-bit values.
fn decode16(word: u32, half: u32, dt: u32) -> u32 {
    if dt == DT_BF16 {
        return select(word << 16u, word & 0xffff0000u, half == 1u);
    }
    return f16_to_f32_bits((word >> (half * 16u)) & 0xffffu);
}

fn encode16(b: u32, dt: u32) -> u32 {
    if dt == DT_BF16 {
        return f32_to_bf16_bits(b);
    }
    return f32_to_f16_bits(b);
}

// --------------------------------------------------------------- two-float arithmetic

// WGSL has no f64: sums that the CUDA kernels keep in f64 are kept as an unevaluated
// f32 pair (hi, lo) instead (Knuth's two-sum, Dekker's product), about 48 bits.

fn two_sum(x: f32, y: f32) -> vec2<f32> {
    let s = x + y;
    let v = s - x;
    return vec2<f32>(s, (x - (s - v)) + (y - v));
}

fn fast_two_sum(x: f32, y: f32) -> vec2<f32> {
    let s = x + y;
    return vec2<f32>(s, y - (s - x));
}

fn df_add(x: vec2<f32>, y: vec2<f32>) -> vec2<f32> {
    let s = two_sum(x.x, y.x);
    let t = two_sum(x.y, y.y);
    let u = fast_two_sum(s.x, s.y + t.x);
    return fast_two_sum(u.x, u.y + t.y);
}

// Dekker's split: hi holds the top 12 bits, so products of halves are exact.
fn split(x: f32) -> vec2<f32> {
    let c = 4097.0 * x;
    let hi = c - (c - x);
    return vec2<f32>(hi, x - hi);
}

fn two_prod(x: f32, y: f32) -> vec2<f32> {
    let p = x * y;
    let sx = split(x);
    let sy = split(y);
    let e = ((sx.x * sy.x - p) + sx.x * sy.y + sx.y * sy.x) + sx.y * sy.y;
    return vec2<f32>(p, e);
}

fn df_mul(x: vec2<f32>, y: vec2<f32>) -> vec2<f32> {
    let p = two_prod(x.x, y.x);
    return fast_two_sum(p.x, p.y + (x.x * y.y + x.y * y.x));
}

// x / y to about 2^-44 relative: one Newton step on the f32 quotient.
fn df_div(x: vec2<f32>, y: vec2<f32>) -> vec2<f32> {
    let q = x.x / y.x;
    let r = df_add(x, -df_mul(vec2<f32>(q, 0.0), y));
    return fast_two_sum(q, (r.x + r.y) / y.x);
}
