// xent: fused softmax / cross-entropy with entropy, argmax, gradient and the
// softmax convergence radius rho = pi / Delta (semantics: reference/src/xent.rs).
//
// Four entry points, run in this order on one queue:
//   xent_scale    one workgroup, only with the gradient: the reduction's grad scale
//                 (1 / sum of row weights for mean) from the targets alone -> `red`.
//   xent_forward  `row_threads` invocations per row (a whole workgroup for long rows):
//                 a single pass over the row (online softmax, 16-byte loads) writes
//                 every per-row output to `rows`; with the gradient, the same
//                 invocations then re-read the row (from cache) and write its gradient.
//   xent_reduce   one workgroup: loss and Delta reduced over rows, rho -> `red`; and the
//                 status word: ~(the first row whose class target is out of range), 0 if
//                 none. Found by a fixed-order min over the rows' ROW_STATUS rather than
//                 by an atomic in xent_forward: no extra binding (the 8 storage buffers
//                 are WebGPU's default limit), deterministic, and written by every call,
//                 so the host needs no clear.
//   xent_grad     only for a 16-bit gradient with odd V: the gradient words shared by
//                 two rows (one invocation per row), so no two invocations write the
//                 same word.
//
// Portability rules this file keeps:
// - WGSL has no 64-bit integers: element indices are u32 within one binding; the host
//   binds large tensors in chunks of rows (at most 2 GiB each) and passes base offsets.
// - Implementations may assume floats are finite (WGSL, Vulkan), so NaN and inf are
//   never tested with float comparisons or produced by float arithmetic: inputs are
//   classified by their bits, special outputs are made by bitcast of bit patterns read
//   from the uniform buffer (so no compiler can fold them), and max / min / top-2 are
//   tracked on order-preserving integer keys of the f32 bits.
// - f16 and bf16 are decoded and encoded with integer operations (exact, round to
//   nearest even, subnormals and specials kept), so `shader-f16` is not needed and no
//   adapter flushes or saturates differently.
// - Reductions are fixed-order trees in workgroup memory: bitwise deterministic.
//
// Units (as kernels/xent.cu). The forward pass works on the raw logits z, not on
// x = z / T: for a small T, z / T overflows f32 where the outputs do not (a loss or
// entropy of a row with |z| ~ 1e4 at T = 1e-35). The order statistics are taken on z
// (T > 0 keeps the order); every exponent argument is (z - m) / T, the difference
// first, clamped below at P.exp_floor (about -128 T, where e^((z - m) / T) is 0 in f32)
// so the product cannot overflow either; t = sum e^dx dx is kept in units of x (its
// terms are bounded by the clamp); the loss part D = sum c_k (m - z_k) in units of z.
// Each per-row output is divided by T once at the end (`over_t`), overflowing to +-inf
// by bits only when the output itself is beyond f32.

// Element types of the bindings, set per pipeline: 0 = f32, 1 = f16, 2 = bf16.
override LOGITS_DT: u32 = 0u;
override SOFT_DT: u32 = 0u;
override GRAD_DT: u32 = 0u;


const WG: u32 = 256u;
const NONE: u32 = 0xffffffffu;
const PI: f32 = 3.14159265358979;
// Smallest normal f32: a Delta + eps below it gives rho = +inf (pi / it overflows or
// the driver flushes it to 0).
const MIN_NORMAL: f32 = 1.17549435e-38;

const NEG_INF_BITS: u32 = 0xff800000u;
// Order-preserving key of -inf (see `key`).
const KEY_NEG_INF: u32 = 0x007fffffu;

// Params.flags
const F_SOFT: u32 = 1u;
const F_WEIGHTED: u32 = 2u;
const F_GAP_TOP2: u32 = 4u;
const F_RHO_MAX: u32 = 8u;
const F_RED_MEAN: u32 = 16u;
const F_INF_IF_SMALL: u32 = 32u;
const F_HAS_CAP: u32 = 64u;
const F_HAS_FLOOR: u32 = 128u;
const F_FLOOR_INF: u32 = 256u;
const F_GRAD: u32 = 512u;

// Fields of `rows`: field f of row i is word f * batch + i; argmax takes two words per row.
const ROW_LOSS: u32 = 0u;
const ROW_LSE: u32 = 1u;
const ROW_ENTROPY: u32 = 2u;
const ROW_MAX: u32 = 3u;
const ROW_MIN: u32 = 4u;
const ROW_GAP: u32 = 5u;
const ROW_DELTA: u32 = 6u;
const ROW_RHO: u32 = 7u;
const ROW_WEIGHT: u32 = 8u;
const ROW_CSUM: u32 = 9u;
const ROW_STATUS: u32 = 10u;
const ROW_ARGMAX: u32 = 11u;

// ROW_STATUS values: the gradient row is 0, computed, or NaN; a row whose class target is
// outside [0, V) and not ignore_index (never used as an index) has a NaN gradient row too.
const STATUS_IGNORED: u32 = 0u;
const STATUS_VALID: u32 = 1u;
const STATUS_NAN: u32 = 2u;
const STATUS_BAD_TARGET: u32 = 3u;

// Fields of `rows` the gradient of xent_grad reads besides ROW_LSE and ROW_CSUM: the row
// max m of z and 1 / s.
const ROW_SHIFT: u32 = 13u;
const ROW_INV_S: u32 = 14u;

// Slots of `red`.
const RED_LOSS: u32 = 0u;
const RED_RHO: u32 = 1u;
const RED_SCALE: u32 = 2u;
const RED_STATUS: u32 = 3u;

struct Params {
    batch: u32,
    classes: u32,
    stride: u32,
    // First row of this chunk and its number of rows.
    row0: u32,
    rows: u32,
    // Element offsets of the chunk's first row inside the logits and soft-target
    // bindings, and word offset of its first gradient word inside the grad binding.
    logits_base: u32,
    soft_base: u32,
    grad_base: u32,
    grad_words: u32,
    flags: u32,
    // ignore_index as the two little-endian words of an i64.
    ignore_lo: u32,
    ignore_hi: u32,
    inv_t: f32,
    // 1 - label_smoothing and label_smoothing / V.
    on_target: f32,
    eps_over_v: f32,
    z_loss: f32,
    rho_eps: f32,
    cap: f32,
    floor: f32,
    // 0x7fc00000 and 0x7f800000, read at run time so that no compiler folds them.
    nan_bits: u32,
    inf_bits: u32,
    // Invocations per row in xent_forward (a power of two <= 256); a workgroup takes
    // 256 / row_threads rows, so short rows do not leave most invocations idle.
    row_threads: u32,
    // 16-byte units of `logits4` (the logits binding's whole 16-byte units; 0 when the
    // binding is under 16 bytes and `logits4` is a placeholder).
    vec_count: u32,
    // The least z - m an exponent argument takes: -128 T (e^-128 is 0 in f32).
    exp_floor: f32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> logits: array<u32>;
// Class targets as i64 words (lo, hi) per row.
@group(0) @binding(2) var<storage, read> labels: array<u32>;
@group(0) @binding(3) var<storage, read> soft: array<u32>;
// Class weights, f32 bits.
@group(0) @binding(4) var<storage, read> weights: array<u32>;
@group(0) @binding(5) var<storage, read_write> rows: array<u32>;
@group(0) @binding(6) var<storage, read_write> red: array<u32>;
@group(0) @binding(7) var<storage, read_write> grad: array<u32>;
// The logits binding's range again, as 16-byte units (rounded down to a whole unit).
@group(0) @binding(8) var<storage, read> logits4: array<vec4<u32>>;

// ---------------------------------------------------------------- bits and specials

fn nan() -> f32 {
    return bitcast<f32>(P.nan_bits);
}

fn pos_inf() -> f32 {
    return bitcast<f32>(P.inf_bits);
}

fn neg_inf() -> f32 {
    return bitcast<f32>(P.inf_bits | 0x80000000u);
}

fn is_finite_bits(b: u32) -> bool {
    return (b & 0x7fffffffu) < POS_INF_BITS;
}

fn is_negative_bits(b: u32) -> bool {
    return (b >> 31u) == 1u;
}

// A u32 that orders like the f32 of `b` (for every non-NaN value, -inf and +inf included).
fn key(b: u32) -> u32 {
    return b ^ select(0x80000000u, 0xffffffffu, is_negative_bits(b));
}

fn unkey(k: u32) -> f32 {
    return bitcast<f32>(k ^ select(0xffffffffu, 0x80000000u, (k >> 31u) == 1u));
}

// a - b for keys a >= b, with the reference's specials: -inf - -inf = NaN, x - -inf = +inf.
fn key_gap(a: u32, b: u32) -> f32 {
    if a == KEY_NEG_INF {
        return nan();
    }
    if b == KEY_NEG_INF {
        return pos_inf();
    }
    return unkey(a) - unkey(b);
}

// -------------------------------------------------------------------- input loads

fn load_logit_bits(idx: u32) -> u32 {
    if LOGITS_DT == DT_F32 {
        return logits[idx];
    }
    return decode16(logits[idx >> 1u], idx & 1u, LOGITS_DT);
}

fn load_soft_bits(idx: u32) -> u32 {
    if SOFT_DT == DT_F32 {
        return soft[idx];
    }
    return decode16(soft[idx >> 1u], idx & 1u, SOFT_DT);
}

// (z - m) / T for finite z <= m, as an exponent argument (see Units): never below
// exp_floor / T (about -128), so it cannot overflow however small T is.
fn dx_of(z: f32, m: f32) -> f32 {
    return max(z - m, P.exp_floor) * P.inv_t;
}

// Bits of v / T (as v * inv_t) for the f32 bits `b`; non-finite values keep their bits.
// A product beyond f32 is made +-inf from bits, not by overflowing arithmetic: below an
// exponent sum of 126 the product is under 2^127; above 127 it is at least 2^128; in
// between it is formed as 4 ((v / 4) * inv_t), exact scalings of a normal number.
fn over_t_bits(b: u32) -> u32 {
    if !is_finite_bits(b) {
        return b;
    }
    let v = bitcast<f32>(b);
    let e = i32((b >> 23u) & 0xffu) + i32((bitcast<u32>(P.inv_t) >> 23u) & 0xffu) - 254;
    if e <= 125 {
        return bitcast<u32>(v * P.inv_t);
    }
    let sign = b & 0x80000000u;
    if e >= 128 {
        return sign | POS_INF_BITS;
    }
    let h = (0.25 * v) * P.inv_t;
    if (bitcast<u32>(h) & 0x7fffffffu) >= 0x7e800000u {
        return sign | POS_INF_BITS;
    }
    return bitcast<u32>(4.0 * h);
}

fn over_t(v: f32) -> f32 {
    return bitcast<f32>(over_t_bits(bitcast<u32>(v)));
}

// Bits of the coefficient c_k of -log p_k in the row's loss (row not ignored):
// class targets c_k = eps/V w_k + [k == y] (1 - eps) w_y; soft c_k = w_k ((1 - eps) q_k + eps/V).
// A non-finite weight or soft target gives NaN bits. The forward pass takes class
// targets' c_k without the (1 - eps) w_y part (`with_target` false) and adds it once per
// row, from z_y against the row's final max (as kernels/xent.cu does): accumulated per
// element it would carry a term the size of the loss through every shift of a running
// max, each shift rounding it again.
fn coef_bits(k: u32, y: u32, soft_idx: u32, with_target: bool) -> u32 {
    var wb = 0x3f800000u;
    if (P.flags & F_WEIGHTED) != 0u {
        wb = weights[k];
    }
    if !is_finite_bits(wb) {
        return P.nan_bits;
    }
    let w = bitcast<f32>(wb);
    if (P.flags & F_SOFT) != 0u {
        let qb = load_soft_bits(soft_idx);
        if !is_finite_bits(qb) {
            return P.nan_bits;
        }
        return bitcast<u32>(w * (P.on_target * bitcast<f32>(qb) + P.eps_over_v));
    }
    var c = P.eps_over_v * w;
    if with_target && k == y {
        c = c + P.on_target * w;
    }
    return bitcast<u32>(c);
}

// rho = pi / (Delta + eps) with inf_if_small, cap and floor applied in that order.
fn rho_from_delta(db: u32) -> f32 {
    if is_nan_bits(db) {
        return nan();
    }
    var infinite = false;
    var rho = 0.0;
    let finite = is_finite_bits(db);
    let small = db == NEG_INF_BITS || (finite && bitcast<f32>(db) < P.rho_eps);
    if (P.flags & F_INF_IF_SMALL) != 0u && small {
        infinite = true;
    } else if finite {
        let denominator = bitcast<f32>(db) + P.rho_eps;
        if denominator < MIN_NORMAL {
            infinite = true;
        } else {
            rho = PI / denominator;
        }
    }
    // Otherwise Delta is +-inf and rho = pi / inf = 0.
    if (P.flags & F_HAS_CAP) != 0u && (infinite || rho > P.cap) {
        rho = P.cap;
        infinite = false;
    }
    if (P.flags & F_FLOOR_INF) != 0u {
        infinite = true;
    } else if (P.flags & F_HAS_FLOOR) != 0u && !infinite && rho < P.floor {
        rho = P.floor;
    }
    if infinite {
        return pos_inf();
    }
    return rho;
}

// a / b with IEEE specials made explicitly (a and b may be NaN or +-inf).
fn div_special(ab: u32, bb: u32) -> f32 {
    if is_nan_bits(ab) || is_nan_bits(bb) {
        return nan();
    }
    let negative = is_negative_bits(ab) != is_negative_bits(bb);
    let a_finite = is_finite_bits(ab);
    if !is_finite_bits(bb) {
        if !a_finite {
            return nan();
        }
        return 0.0;
    }
    let b = bitcast<f32>(bb);
    if b == 0.0 {
        if a_finite && bitcast<f32>(ab) == 0.0 {
            return nan();
        }
        return select(pos_inf(), neg_inf(), is_negative_bits(ab));
    }
    if !a_finite {
        return select(pos_inf(), neg_inf(), negative);
    }
    return bitcast<f32>(ab) / b;
}

// g * s where s may be NaN or +-inf (g is finite).
fn mul_special(g: f32, sb: u32) -> f32 {
    if is_finite_bits(sb) {
        return g * bitcast<f32>(sb);
    }
    if is_nan_bits(sb) || g == 0.0 {
        return nan();
    }
    return select(pos_inf(), neg_inf(), (g < 0.0) != is_negative_bits(sb));
}

// ------------------------------------------------------------------------ forward

// Per-invocation state of the online pass, tree-reduced in workgroup memory.
// Softmax part, over finite z only: m = max of z, s = sum e^(x-m/T), t = sum e^(x-m/T)(x-m/T)
// (units of x), a = sum c_k (m - z_k) (units of z), cf = sum c_k (both over finite z),
// valid when FL_FINITE is set.
var<workgroup> w_m: array<f32, WG>;
var<workgroup> w_s: array<f32, WG>;
var<workgroup> w_t: array<f32, WG>;
var<workgroup> w_a: array<f32, WG>;
var<workgroup> w_cf: array<f32, WG>;
// Sum of c_k over every class (the gradient's sum_j c_j).
var<workgroup> w_call: array<f32, WG>;
// Keys of the top two values and of the min (over finite and -inf x), first argmax.
var<workgroup> w_top1: array<u32, WG>;
var<workgroup> w_top2: array<u32, WG>;
var<workgroup> w_arg: array<u32, WG>;
var<workgroup> w_min: array<u32, WG>;
// First index of a NaN, and of a NaN or +inf.
var<workgroup> w_nan: array<u32, WG>;
var<workgroup> w_bad: array<u32, WG>;
var<workgroup> w_flags: array<u32, WG>;

// w_flags bits.
const FL_FINITE: u32 = 1u;
// A -inf logit with a positive / negative coefficient (its loss term is +inf / -inf).
const FL_COEF_POS_INF: u32 = 2u;
const FL_COEF_NEG_INF: u32 = 4u;
// A non-finite coefficient.
const FL_COEF_NAN: u32 = 8u;

// Merges slot j into slot i.
fn merge_forward(i: u32, j: u32) {
    if (w_flags[j] & FL_FINITE) != 0u {
        if (w_flags[i] & FL_FINITE) == 0u {
            w_m[i] = w_m[j];
            w_s[i] = w_s[j];
            w_t[i] = w_t[j];
            w_a[i] = w_a[j];
            w_cf[i] = w_cf[j];
        } else {
            let mi = w_m[i];
            let mj = w_m[j];
            let m = max(mi, mj);
            let di = dx_of(mi, m);
            let dj = dx_of(mj, m);
            let ei = exp(di);
            let ej = exp(dj);
            // Rescale each part to the common max: e^(x-m) = e^(x-m_i) e^(m_i-m), and
            // (x - m) = (x - m_i) + (m_i - m), in units of x.
            w_t[i] = ei * (w_t[i] + di * w_s[i]) + ej * (w_t[j] + dj * w_s[j]);
            w_s[i] = w_s[i] * ei + w_s[j] * ej;
            w_a[i] = w_a[i] + (m - mi) * w_cf[i] + w_a[j] + (m - mj) * w_cf[j];
            w_cf[i] = w_cf[i] + w_cf[j];
            w_m[i] = m;
        }
    }
    w_call[i] = w_call[i] + w_call[j];
    let ti = w_top1[i];
    let tj = w_top1[j];
    if tj > ti || (tj == ti && w_arg[j] < w_arg[i]) {
        w_arg[i] = w_arg[j];
    }
    w_top2[i] = max(min(ti, tj), max(w_top2[i], w_top2[j]));
    w_top1[i] = max(ti, tj);
    w_min[i] = min(w_min[i], w_min[j]);
    w_nan[i] = min(w_nan[i], w_nan[j]);
    w_bad[i] = min(w_bad[i], w_bad[j]);
    w_flags[i] = w_flags[i] | w_flags[j];
}

fn row_field(field: u32, row: u32) -> u32 {
    return field * P.batch + row;
}

// The running state of one invocation's part of a row (see the w_* arrays).
var<private> st_m: f32;
var<private> st_s: f32;
var<private> st_t: f32;
var<private> st_a: f32;
var<private> st_cf: f32;
var<private> st_call: f32;
var<private> st_top1: u32;
var<private> st_top2: u32;
var<private> st_arg: u32;
var<private> st_low: u32;
var<private> st_nan: u32;
var<private> st_bad: u32;
var<private> st_flags: u32;
// The row being walked: its class target, the soft-target offset of its class 0, and
// whether the per-class coefficients are accumulated element by element. Without
// soft targets, class weights or label smoothing, the only nonzero coefficient is
// c_y = 1 - eps, which is added once per row after the reduction instead.
var<private> row_y: u32;
var<private> row_soft: u32;
var<private> row_coef: bool;

// Elements of 16 bytes of logits.
fn elements_per_vec() -> u32 {
    return select(8u, 4u, LOGITS_DT == DT_F32);
}

// Bits of the (finite) coefficient of class k, or 0 with FL_COEF_NAN set for a non-finite one.
fn step_coef(k: u32) -> f32 {
    let cb = coef_bits(k, row_y, row_soft + k, false);
    if is_finite_bits(cb) {
        return bitcast<f32>(cb);
    }
    st_flags = st_flags | FL_COEF_NAN;
    return 0.0;
}

// One element of the online pass, any value: class k, bits xb of z.
fn step_any(k: u32, xb: u32) {
    var c = 0.0;
    if row_coef {
        c = step_coef(k);
    }
    if is_nan_bits(xb) || xb == POS_INF_BITS {
        st_bad = min(st_bad, k);
        if is_nan_bits(xb) {
            st_nan = min(st_nan, k);
        }
        return;
    }
    let xk = key(xb);
    if st_arg == NONE || xk > st_top1 {
        st_top2 = st_top1;
        st_top1 = xk;
        st_arg = k;
    } else if xk > st_top2 {
        st_top2 = xk;
    }
    st_low = min(st_low, xk);
    st_call = st_call + c;
    if xb == NEG_INF_BITS {
        // p_k = 0: no softmax term; a nonzero coefficient makes the loss infinite.
        if c > 0.0 {
            st_flags = st_flags | FL_COEF_POS_INF;
        } else if c < 0.0 {
            st_flags = st_flags | FL_COEF_NEG_INF;
        }
        return;
    }
    let x = bitcast<f32>(xb);
    if (st_flags & FL_FINITE) == 0u {
        st_m = x;
        st_s = 1.0;
        st_t = 0.0;
        st_flags = st_flags | FL_FINITE;
    } else if x > st_m {
        // The max moves: rescale s and t to the new max, shift a by (x - m) cf.
        let d = dx_of(st_m, x);
        let e = exp(d);
        st_t = (st_t + d * st_s) * e;
        st_s = st_s * e + 1.0;
        st_a = st_a + (x - st_m) * st_cf;
        st_m = x;
    } else {
        let d = dx_of(x, st_m);
        let e = exp(d);
        st_s = st_s + e;
        st_t = st_t + e * d;
    }
    st_a = st_a + c * (st_m - x);
    st_cf = st_cf + c;
}

fn key4(b: vec4<u32>) -> vec4<u32> {
    let negative = (b >> vec4<u32>(31u)) == vec4<u32>(1u);
    return b ^ select(vec4<u32>(0x80000000u), vec4<u32>(0xffffffffu), negative);
}

fn f16x4(h: vec4<u32>) -> vec4<u32> {
    return vec4<u32>(
        f16_to_f32_bits(h.x),
        f16_to_f32_bits(h.y),
        f16_to_f32_bits(h.z),
        f16_to_f32_bits(h.w),
    );
}

// One element of a finite group entering the top-2 (any order within the group: ties
// on the value go to the smaller class).
fn top_one(xk: u32, k: u32) {
    if xk > st_top1 {
        st_top2 = st_top1;
        st_top1 = xk;
        st_arg = k;
    } else {
        if xk == st_top1 && k < st_arg {
            st_arg = k;
        }
        if xk > st_top2 {
            st_top2 = xk;
        }
    }
}

fn coef_one(k: u32, xb: u32, m: f32) {
    let c = step_coef(k);
    st_a = st_a + c * (m - bitcast<f32>(xb));
    st_cf = st_cf + c;
    st_call = st_call + c;
}

// Four finite elements `a` (classes k0 + i * ks) against the running max m (see `dx_of`).
fn sums4(a: vec4<u32>, m: f32) -> vec2<f32> {
    let d = max(bitcast<vec4<f32>>(a) - vec4<f32>(m), vec4<f32>(P.exp_floor)) * P.inv_t;
    let e = exp(d);
    return vec2<f32>((e.x + e.y) + (e.z + e.w), dot(e, d));
}

// The 4 (f32) or 8 (16-bit) logits of one 16-byte load, classes k0, k0 + 1, ...
// When all are finite, the running max moves at most once for the group and the
// top-2 is only walked when the group's max can enter it; otherwise each element
// takes `step_any`, in class order. Written on vectors, with no per-element loop.
fn step_vec(q: vec4<u32>, k0: u32) {
    let wide = LOGITS_DT == DT_F32;
    // 16-bit: a holds classes k0 + 2i, b classes k0 + 2i + 1; f32: a holds k0 + i.
    var a: vec4<u32>;
    var b: vec4<u32>;
    if wide {
        a = q;
        b = a;
    } else if LOGITS_DT == DT_BF16 {
        a = q << vec4<u32>(16u);
        b = q & vec4<u32>(0xffff0000u);
    } else {
        a = f16x4(q & vec4<u32>(0xffffu));
        b = f16x4(q >> vec4<u32>(16u));
    }
    let ab = max(a & vec4<u32>(0x7fffffffu), b & vec4<u32>(0x7fffffffu));
    if max(max(ab.x, ab.y), max(ab.z, ab.w)) >= POS_INF_BITS {
        if wide {
            step_any(k0, a.x);
            step_any(k0 + 1u, a.y);
            step_any(k0 + 2u, a.z);
            step_any(k0 + 3u, a.w);
        } else {
            step_any(k0, a.x);
            step_any(k0 + 1u, b.x);
            step_any(k0 + 2u, a.y);
            step_any(k0 + 3u, b.y);
            step_any(k0 + 4u, a.z);
            step_any(k0 + 5u, b.z);
            step_any(k0 + 6u, a.w);
            step_any(k0 + 7u, b.w);
        }
        return;
    }
    let ka = key4(a);
    let kb = key4(b);
    let hi4 = max(ka, kb);
    let lo4 = min(ka, kb);
    let kmax = max(max(hi4.x, hi4.y), max(hi4.z, hi4.w));
    let kmin = min(min(lo4.x, lo4.y), min(lo4.z, lo4.w));
    if kmax > st_top2 {
        if wide {
            top_one(ka.x, k0);
            top_one(ka.y, k0 + 1u);
            top_one(ka.z, k0 + 2u);
            top_one(ka.w, k0 + 3u);
        } else {
            top_one(ka.x, k0);
            top_one(kb.x, k0 + 1u);
            top_one(ka.y, k0 + 2u);
            top_one(kb.y, k0 + 3u);
            top_one(ka.z, k0 + 4u);
            top_one(kb.z, k0 + 5u);
            top_one(ka.w, k0 + 6u);
            top_one(kb.w, k0 + 7u);
        }
    }
    st_low = min(st_low, kmin);
    let gm = unkey(kmax);
    if (st_flags & FL_FINITE) == 0u {
        st_m = gm;
        st_s = 0.0;
        st_t = 0.0;
        st_flags = st_flags | FL_FINITE;
    } else if gm > st_m {
        let d = dx_of(st_m, gm);
        let e = exp(d);
        st_t = (st_t + d * st_s) * e;
        st_s = st_s * e;
        st_a = st_a + (gm - st_m) * st_cf;
        st_m = gm;
    }
    let m = st_m;
    var st = sums4(a, m);
    if !wide {
        st = st + sums4(b, m);
    }
    st_s = st_s + st.x;
    st_t = st_t + st.y;
    if row_coef {
        if wide {
            coef_one(k0, a.x, m);
            coef_one(k0 + 1u, a.y, m);
            coef_one(k0 + 2u, a.z, m);
            coef_one(k0 + 3u, a.w, m);
        } else {
            coef_one(k0, a.x, m);
            coef_one(k0 + 1u, b.x, m);
            coef_one(k0 + 2u, a.y, m);
            coef_one(k0 + 3u, b.y, m);
            coef_one(k0 + 4u, a.z, m);
            coef_one(k0 + 5u, b.z, m);
            coef_one(k0 + 6u, a.w, m);
            coef_one(k0 + 7u, b.w, m);
        }
    }
}

// Loads of the logits (element index e of the binding) for the gradient, kept apart
// from the decode so that several loads are in flight before the arithmetic.
// Two raw words holding elements e and e + 1.
fn raw_pair(e: u32) -> vec2<u32> {
    if LOGITS_DT == DT_F32 {
        return vec2<u32>(logits[e], logits[e + 1u]);
    }
    if (e & 1u) == 0u {
        let w = logits[e >> 1u];
        return vec2<u32>(w, w);
    }
    return vec2<u32>(logits[e >> 1u], logits[(e >> 1u) + 1u]);
}

// f32 bits of z for elements e and e + 1 from `raw_pair(e)`.
fn z_pair(r: vec2<u32>, e: u32) -> vec2<u32> {
    if LOGITS_DT == DT_F32 {
        return r;
    }
    let h = e & 1u;
    return vec2<u32>(decode16(r.x, h, LOGITS_DT), decode16(r.y, 1u - h, LOGITS_DT));
}

fn raw_one(e: u32) -> u32 {
    if LOGITS_DT == DT_F32 {
        return logits[e];
    }
    return logits[e >> 1u];
}

fn z_one(r: u32, e: u32) -> u32 {
    if LOGITS_DT == DT_F32 {
        return r;
    }
    return decode16(r, e & 1u, LOGITS_DT);
}

// What the gradient of a valid row needs.
struct GradRow {
    // The row max of z and 1 / s: p_k = e^((z_k - m) / T) / s, never overflowing.
    shift: f32,
    inv_s: f32,
    call: f32,
    // 2 z_loss lse.
    zz: f32,
    scale_bits: u32,
}

// d(z_loss lse^2) / d lse = 2 z_loss lse; 0 without a z-loss even where lse is +inf (m / T
// beyond f32 in a valid row), which 0 * inf would make NaN.
fn z_loss_slope(lse: f32) -> f32 {
    if P.z_loss == 0.0 {
        return 0.0;
    }
    return 2.0 * P.z_loss * lse;
}

// p_k for the f32 bits zb of z_k (finite or -inf) of a valid row.
fn grad_p(g: GradRow, zb: u32) -> f32 {
    if zb == NEG_INF_BITS {
        return 0.0;
    }
    return exp(dx_of(bitcast<f32>(zb), g.shift)) * g.inv_s;
}

// f32 bits of d(reduced loss)/dz_k for a valid row, from the bits xb of z_k.
fn grad_bits(g: GradRow, k: u32, xb: u32) -> u32 {
    let p = grad_p(g, xb);
    var c = 0.0;
    if row_coef {
        // A valid row has only finite coefficients.
        c = bitcast<f32>(coef_bits(k, row_y, row_soft + k, true));
    } else if k == row_y {
        c = P.on_target;
    }
    // d loss_i / d x_k = (sum_j c_j) p_k - c_k + 2 c_z lse p_k, and dx/dz = 1/T.
    let v = (g.call * p - c + g.zz * p) * P.inv_t;
    return bitcast<u32>(mul_special(v, g.scale_bits));
}

// Writes the gradient of a row: chunk-relative gradient elements [g0, g0 + V), logits
// elements [e0, e0 + V). `fill` (when not NONE) are the f32 bits of every element (an
// ignored or NaN row). With a 16-bit gradient, only words holding two elements of this
// row are written here; the words shared with a neighbour row (odd V) are xent_grad's.
fn write_grad_row(g: GradRow, fill: u32, g0: u32, e0: u32, lane: u32, rt: u32) {
    let classes = P.classes;
    if GRAD_DT == DT_F32 {
        var k = lane;
        for (; k + 3u * rt < classes; k = k + 4u * rt) {
            let r0 = raw_one(e0 + k);
            let r1 = raw_one(e0 + k + rt);
            let r2 = raw_one(e0 + k + 2u * rt);
            let r3 = raw_one(e0 + k + 3u * rt);
            var o = vec4<u32>(fill, fill, fill, fill);
            if fill == NONE {
                o = vec4<u32>(
                    grad_bits(g, k, z_one(r0, e0 + k)),
                    grad_bits(g, k + rt, z_one(r1, e0 + k + rt)),
                    grad_bits(g, k + 2u * rt, z_one(r2, e0 + k + 2u * rt)),
                    grad_bits(g, k + 3u * rt, z_one(r3, e0 + k + 3u * rt)),
                );
            }
            let w = P.grad_base + g0 + k;
            grad[w] = o.x;
            grad[w + rt] = o.y;
            grad[w + 2u * rt] = o.z;
            grad[w + 3u * rt] = o.w;
        }
        for (; k < classes; k = k + rt) {
            var o = fill;
            if fill == NONE {
                o = grad_bits(g, k, z_one(raw_one(e0 + k), e0 + k));
            }
            grad[P.grad_base + g0 + k] = o;
        }
        return;
    }
    // Words [wa, wb) of the chunk's gradient hold two elements of this row each.
    let wa = (g0 + 1u) / 2u;
    let wb = (g0 + classes) / 2u;
    // Class of the low element of word w: 2 w - g0; its logit: e0 + 2 w - g0.
    let eoff = e0 - g0;
    var fill16 = 0u;
    if fill != NONE {
        let h = encode16(fill, GRAD_DT);
        fill16 = h | (h << 16u);
    }
    var w = wa + lane;
    for (; w + 3u * rt < wb; w = w + 4u * rt) {
        let r0 = raw_pair(eoff + 2u * w);
        let r1 = raw_pair(eoff + 2u * (w + rt));
        let r2 = raw_pair(eoff + 2u * (w + 2u * rt));
        let r3 = raw_pair(eoff + 2u * (w + 3u * rt));
        var o = vec4<u32>(fill16, fill16, fill16, fill16);
        if fill == NONE {
            o = vec4<u32>(
                grad_word(g, 2u * w - g0, z_pair(r0, eoff + 2u * w)),
                grad_word(g, 2u * (w + rt) - g0, z_pair(r1, eoff + 2u * (w + rt))),
                grad_word(g, 2u * (w + 2u * rt) - g0, z_pair(r2, eoff + 2u * (w + 2u * rt))),
                grad_word(g, 2u * (w + 3u * rt) - g0, z_pair(r3, eoff + 2u * (w + 3u * rt))),
            );
        }
        grad[P.grad_base + w] = o.x;
        grad[P.grad_base + w + rt] = o.y;
        grad[P.grad_base + w + 2u * rt] = o.z;
        grad[P.grad_base + w + 3u * rt] = o.w;
    }
    for (; w < wb; w = w + rt) {
        var o = fill16;
        if fill == NONE {
            o = grad_word(g, 2u * w - g0, z_pair(raw_pair(eoff + 2u * w), eoff + 2u * w));
        }
        grad[P.grad_base + w] = o;
    }
}

// Two 16-bit gradient elements, classes k and k + 1, packed in a word.
fn grad_word(g: GradRow, k: u32, xb: vec2<u32>) -> u32 {
    let lo = encode16(grad_bits(g, k, xb.x), GRAD_DT);
    let hi = encode16(grad_bits(g, k + 1u, xb.y), GRAD_DT);
    return lo | (hi << 16u);
}

// Where an invocation of the row kernels works, in the workgroup whose first row in the
// chunk is `first_row`: P.row_threads invocations per row, WG / row_threads rows each.
struct RowSlot {
    lane: u32,       // index among the row's invocations
    local_row: u32,  // the row in the chunk
    in_chunk: bool,  // rows past the chunk's end take part in the barriers only
    row: u32,        // the row in the whole problem (clamped for those past the end)
}

fn row_slot(first_row: u32, lid: u32) -> RowSlot {
    let local_row = first_row + lid / P.row_threads;
    return RowSlot(
        lid & (P.row_threads - 1u),
        local_row,
        local_row < P.rows,
        P.row0 + min(local_row, P.rows - 1u),
    );
}

@compute @workgroup_size(256)
fn xent_forward(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // From workgroup-uniform values only, so the early return keeps the barriers uniform.
    let row_threads = P.row_threads;
    let first_row = (wg.y * nwg.x + wg.x) * (WG / row_threads);
    if first_row >= P.rows {
        return;
    }
    let slot = row_slot(first_row, lid);
    let lane = slot.lane;
    let local_row = slot.local_row;
    let in_chunk = slot.in_chunk;
    let row = slot.row;
    let classes = P.classes;
    let is_soft = (P.flags & F_SOFT) != 0u;

    var ignored = false;
    var label_bad = false;
    var y = 0u;
    if !is_soft && in_chunk {
        let lo = labels[2u * row];
        let hi = labels[2u * row + 1u];
        ignored = lo == P.ignore_lo && hi == P.ignore_hi;
        y = lo;
        // Targets are not checked on the host: an out-of-range one is never an index.
        label_bad = !ignored && (hi != 0u || lo >= classes);
    }
    let use_coef = !ignored && !label_bad;
    row_y = y;
    row_soft = P.soft_base + local_row * classes;
    row_coef = use_coef
        && ((P.flags & (F_SOFT | F_WEIGHTED)) != 0u || P.eps_over_v != 0.0);

    st_m = 0.0;
    st_s = 0.0;
    st_t = 0.0;
    st_a = 0.0;
    st_cf = 0.0;
    st_call = 0.0;
    st_top1 = KEY_NEG_INF;
    st_top2 = KEY_NEG_INF;
    st_arg = NONE;
    st_low = NONE;
    st_nan = NONE;
    st_bad = NONE;
    st_flags = 0u;

    // The row's logits are elements [e0, e1) of the binding: an unaligned head and tail
    // element by element, the 16-byte-aligned middle through `logits4`.
    let e0 = P.logits_base + local_row * P.stride;
    var e1 = e0;
    if in_chunk {
        e1 = e0 + classes;
    }
    let epv = elements_per_vec();
    var va = (e0 + epv - 1u) / epv;
    var vb = min(e1 / epv, P.vec_count);
    var head_end = e1;
    var tail_start = e1;
    if vb > va {
        head_end = va * epv;
        tail_start = vb * epv;
    } else {
        va = 0u;
        vb = 0u;
    }
    for (var e = e0 + lane; e < head_end; e = e + row_threads) {
        step_any(e - e0, load_logit_bits(e));
    }
    var j = va + lane;
    for (; j + row_threads < vb; j = j + 2u * row_threads) {
        let q0 = logits4[j];
        let q1 = logits4[j + row_threads];
        step_vec(q0, j * epv - e0);
        step_vec(q1, (j + row_threads) * epv - e0);
    }
    if j < vb {
        step_vec(logits4[j], j * epv - e0);
    }
    for (var e = tail_start + lane; e < e1; e = e + row_threads) {
        step_any(e - e0, load_logit_bits(e));
    }

    w_m[lid] = st_m;
    w_s[lid] = st_s;
    w_t[lid] = st_t;
    w_a[lid] = st_a;
    w_cf[lid] = st_cf;
    w_call[lid] = st_call;
    w_top1[lid] = st_top1;
    w_top2[lid] = st_top2;
    w_arg[lid] = st_arg;
    w_min[lid] = st_low;
    w_nan[lid] = st_nan;
    w_bad[lid] = st_bad;
    w_flags[lid] = st_flags;
    workgroupBarrier();
    for (var stride = row_threads / 2u; stride > 0u; stride = stride >> 1u) {
        if lane < stride {
            merge_forward(lid, lid + stride);
        }
        workgroupBarrier();
    }
    if !in_chunk {
        return;
    }

    // Slot `base` holds the whole row now; every invocation of the row reads it (the
    // same values, so the same results) and the first one writes the per-row outputs.
    let base = lid - lane;
    var fl = w_flags[base];
    var sum_a = w_a[base];
    var sum_cf = w_cf[base];
    var sum_c = w_call[base];
    var wyb = 0x3f800000u;
    if (P.flags & F_WEIGHTED) != 0u && use_coef && !is_soft {
        wyb = weights[y];
    }
    // The (1 - eps) w_y part of c_y (see coef_bits); a non-finite w_y has flagged the
    // row already, at class y.
    if use_coef && !is_soft && is_finite_bits(wyb) {
        let c = P.on_target * bitcast<f32>(wyb);
        let xb = load_logit_bits(e0 + y);
        if is_finite_bits(xb) {
            sum_a = sum_a + c * (w_m[base] - bitcast<f32>(xb));
            sum_cf = sum_cf + c;
            sum_c = sum_c + c;
        } else if xb == NEG_INF_BITS {
            sum_c = sum_c + c;
            if c > 0.0 {
                fl = fl | FL_COEF_POS_INF;
            } else if c < 0.0 {
                fl = fl | FL_COEF_NEG_INF;
            }
        }
    }
    var argmax = w_arg[base];
    var row_max = nan();
    var row_min = nan();
    var gap = nan();
    var lse = nan();
    var entropy = nan();
    var delta = nan();
    var log_s = 0.0;
    var valid = false;
    if w_bad[base] != NONE {
        // A NaN or +inf logit: every statistic is NaN; argmax is the first NaN, else the first +inf.
        argmax = select(w_bad[base], w_nan[base], w_nan[base] != NONE);
    } else {
        let t1 = w_top1[base];
        row_max = over_t(unkey(t1));
        row_min = over_t(unkey(w_min[base]));
        gap = select(over_t(key_gap(t1, w_top2[base])), 0.0, classes == 1u);
        if (fl & FL_FINITE) != 0u {
            log_s = log(w_s[base]);
            // m / T + log s: beyond f32 only when m / T is (log s <= log V is small).
            lse = over_t(w_m[base]);
            if is_finite_bits(bitcast<u32>(lse)) {
                lse = lse + log_s;
            }
            entropy = log_s - w_t[base] / w_s[base];
            valid = true;
        } else {
            // Only -inf: lse = -inf, entropy NaN.
            lse = neg_inf();
        }
        if (P.flags & F_GAP_TOP2) != 0u {
            delta = gap;
        } else {
            delta = over_t(key_gap(t1, w_min[base]));
        }
    }

    if label_bad {
        // A bad target: every per-row output NaN (rho too, from Delta), argmax -1.
        row_max = nan();
        row_min = nan();
        gap = nan();
        lse = nan();
        entropy = nan();
        delta = nan();
        argmax = NONE;
    }

    var loss = 0.0;
    var weight = 0.0;
    var status = STATUS_IGNORED;
    if !ignored {
        if is_soft {
            weight = 1.0;
        } else if label_bad {
            // The mean's denominator, so the reduced loss, becomes NaN.
            weight = nan();
        } else if (P.flags & F_WEIGHTED) != 0u {
            weight = bitcast<f32>(weights[y]);
        } else {
            weight = 1.0;
        }
        if label_bad {
            loss = nan();
            status = STATUS_BAD_TARGET;
        } else if !valid || (fl & FL_COEF_NAN) != 0u {
            loss = nan();
            status = STATUS_NAN;
        } else {
            // sum_k c_k (lse - x_k) = sum c_k (m - z_k) / T + (sum c_k) log s.
            loss = over_t(sum_a) + sum_cf * log_s;
            if P.z_loss != 0.0 {
                loss = loss + P.z_loss * lse * lse;
            }
            let pos = (fl & FL_COEF_POS_INF) != 0u;
            let neg = (fl & FL_COEF_NEG_INF) != 0u;
            if pos && neg {
                loss = nan();
            } else if pos {
                loss = pos_inf();
            } else if neg {
                loss = neg_inf();
            }
            status = STATUS_VALID;
        }
    }

    if lane == 0u {
        rows[row_field(ROW_LOSS, row)] = bitcast<u32>(loss);
        rows[row_field(ROW_LSE, row)] = bitcast<u32>(lse);
        rows[row_field(ROW_ENTROPY, row)] = bitcast<u32>(entropy);
        rows[row_field(ROW_MAX, row)] = bitcast<u32>(row_max);
        rows[row_field(ROW_MIN, row)] = bitcast<u32>(row_min);
        rows[row_field(ROW_GAP, row)] = bitcast<u32>(gap);
        rows[row_field(ROW_DELTA, row)] = bitcast<u32>(delta);
        rows[row_field(ROW_RHO, row)] = bitcast<u32>(rho_from_delta(bitcast<u32>(delta)));
        rows[row_field(ROW_WEIGHT, row)] = bitcast<u32>(weight);
        rows[row_field(ROW_CSUM, row)] = bitcast<u32>(sum_c);
        rows[row_field(ROW_STATUS, row)] = status;
        rows[row_field(ROW_SHIFT, row)] = bitcast<u32>(w_m[base]);
        rows[row_field(ROW_INV_S, row)] = bitcast<u32>(1.0 / w_s[base]);
        // argmax as a little-endian i64: indices are below 2^32, NONE stands for -1.
        rows[ROW_ARGMAX * P.batch + 2u * row] = argmax;
        rows[ROW_ARGMAX * P.batch + 2u * row + 1u] = select(0u, NONE, argmax == NONE);
    }

    if (P.flags & F_GRAD) == 0u {
        return;
    }
    // The gradient, from the row just read (so mostly from cache), with the reduction's
    // scale that xent_scale computed from the targets alone.
    var fill = NONE;
    if status == STATUS_IGNORED {
        fill = 0u;
    } else if status == STATUS_NAN || status == STATUS_BAD_TARGET {
        fill = P.nan_bits;
    }
    let g = GradRow(w_m[base], 1.0 / w_s[base], sum_c, z_loss_slope(lse), red[RED_SCALE]);
    write_grad_row(g, fill, local_row * classes, e0, lane, row_threads);
}

// ------------------------------------------------------------------------- reduce

var<workgroup> r_loss: array<f32, WG>;
var<workgroup> r_weight: array<f32, WG>;
var<workgroup> r_dsum: array<f32, WG>;
var<workgroup> r_dmax: array<f32, WG>;
var<workgroup> r_flags: array<u32, WG>;
// The first row with a bad class target (NONE: none).
var<workgroup> r_bad: array<u32, WG>;

const RF_LOSS_NAN: u32 = 1u;
const RF_LOSS_POS_INF: u32 = 2u;
const RF_LOSS_NEG_INF: u32 = 4u;
const RF_WEIGHT_NAN: u32 = 8u;
const RF_DELTA_NAN: u32 = 16u;
const RF_DELTA_INF: u32 = 32u;

@compute @workgroup_size(256)
fn xent_reduce(@builtin(local_invocation_index) lid: u32) {
    var loss = 0.0;
    var weight = 0.0;
    var dsum = 0.0;
    // Delta >= 0 on every row where it is finite.
    var dmax = 0.0;
    var flags = 0u;
    var bad = NONE;
    for (var i = lid; i < P.batch; i = i + WG) {
        if bad == NONE && rows[row_field(ROW_STATUS, i)] == STATUS_BAD_TARGET {
            bad = i;
        }
        let lb = rows[row_field(ROW_LOSS, i)];
        if is_nan_bits(lb) {
            flags = flags | RF_LOSS_NAN;
        } else if lb == POS_INF_BITS {
            flags = flags | RF_LOSS_POS_INF;
        } else if lb == NEG_INF_BITS {
            flags = flags | RF_LOSS_NEG_INF;
        } else {
            loss = loss + bitcast<f32>(lb);
        }
        let wb = rows[row_field(ROW_WEIGHT, i)];
        if is_finite_bits(wb) {
            weight = weight + bitcast<f32>(wb);
        } else {
            flags = flags | RF_WEIGHT_NAN;
        }
        let db = rows[row_field(ROW_DELTA, i)];
        if is_nan_bits(db) {
            flags = flags | RF_DELTA_NAN;
        } else if !is_finite_bits(db) {
            flags = flags | RF_DELTA_INF;
        } else {
            let d = bitcast<f32>(db);
            dsum = dsum + d;
            dmax = max(dmax, d);
        }
    }
    r_loss[lid] = loss;
    r_weight[lid] = weight;
    r_dsum[lid] = dsum;
    r_dmax[lid] = dmax;
    r_flags[lid] = flags;
    r_bad[lid] = bad;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride >> 1u) {
        if lid < stride {
            r_bad[lid] = min(r_bad[lid], r_bad[lid + stride]);
            r_loss[lid] = r_loss[lid] + r_loss[lid + stride];
            r_weight[lid] = r_weight[lid] + r_weight[lid + stride];
            r_dsum[lid] = r_dsum[lid] + r_dsum[lid + stride];
            r_dmax[lid] = max(r_dmax[lid], r_dmax[lid + stride]);
            r_flags[lid] = r_flags[lid] | r_flags[lid + stride];
        }
        workgroupBarrier();
    }
    if lid != 0u {
        return;
    }
    let fl = r_flags[0];
    var total = r_loss[0];
    let pos = (fl & RF_LOSS_POS_INF) != 0u;
    let neg = (fl & RF_LOSS_NEG_INF) != 0u;
    if (fl & RF_LOSS_NAN) != 0u || (pos && neg) {
        total = nan();
    } else if pos {
        total = pos_inf();
    } else if neg {
        total = neg_inf();
    }
    var reduced = total;
    if (P.flags & F_RED_MEAN) != 0u {
        var denominator = r_weight[0];
        if (fl & RF_WEIGHT_NAN) != 0u {
            denominator = nan();
        }
        reduced = div_special(bitcast<u32>(total), bitcast<u32>(denominator));
    }
    var delta = nan();
    if (fl & RF_DELTA_NAN) == 0u {
        if (fl & RF_DELTA_INF) != 0u {
            delta = pos_inf();
        } else if (P.flags & F_RHO_MAX) != 0u {
            delta = r_dmax[0];
        } else {
            delta = r_dsum[0] / f32(P.batch);
        }
    }
    red[RED_LOSS] = bitcast<u32>(reduced);
    red[RED_RHO] = bitcast<u32>(rho_from_delta(bitcast<u32>(delta)));
    // ~NONE = 0: no bad target.
    red[RED_STATUS] = ~r_bad[0];
}

// The grad scale before the forward pass: the row weights as xent_forward gives them
// (ROW_WEIGHT), summed in xent_reduce's order, so 1 / (their sum) is the same number
// (but for a bad target, NaN there and 0 here, so that only its own row's gradient is NaN).
@compute @workgroup_size(256)
fn xent_scale(@builtin(local_invocation_index) lid: u32) {
    var weight = 0.0;
    var flags = 0u;
    let is_soft = (P.flags & F_SOFT) != 0u;
    for (var i = lid; i < P.batch; i = i + WG) {
        var wb = 0x3f800000u;
        if !is_soft {
            let lo = labels[2u * i];
            let hi = labels[2u * i + 1u];
            // A bad target adds 0, as an ignored row would (and is never an index): its
            // own gradient row is NaN, the others keep theirs with that row ignored.
            if (lo == P.ignore_lo && hi == P.ignore_hi) || hi != 0u || lo >= P.classes {
                wb = 0u;
            } else if (P.flags & F_WEIGHTED) != 0u {
                wb = weights[lo];
            }
        }
        if is_finite_bits(wb) {
            weight = weight + bitcast<f32>(wb);
        } else {
            flags = flags | RF_WEIGHT_NAN;
        }
    }
    r_weight[lid] = weight;
    r_flags[lid] = flags;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride >> 1u) {
        if lid < stride {
            r_weight[lid] = r_weight[lid] + r_weight[lid + stride];
            r_flags[lid] = r_flags[lid] | r_flags[lid + stride];
        }
        workgroupBarrier();
    }
    if lid != 0u {
        return;
    }
    var scale = 1.0;
    if (P.flags & F_RED_MEAN) != 0u {
        var denominator = r_weight[0];
        if (r_flags[0] & RF_WEIGHT_NAN) != 0u {
            denominator = nan();
        }
        scale = div_special(0x3f800000u, bitcast<u32>(denominator));
    }
    red[RED_SCALE] = bitcast<u32>(scale);
}

// --------------------------------------------------------------------------- grad

// d(reduced loss)/dz for element `e` of the chunk's dense [rows, V] block (0 past its end).
fn grad_element(e: u32, scale_bits: u32) -> f32 {
    let classes = P.classes;
    if e >= P.rows * classes {
        return 0.0;
    }
    let local_row = e / classes;
    let k = e - local_row * classes;
    let row = P.row0 + local_row;
    let status = rows[row_field(ROW_STATUS, row)];
    if status == STATUS_IGNORED {
        return 0.0;
    }
    if status == STATUS_NAN || status == STATUS_BAD_TARGET {
        return nan();
    }
    let lse = bitcast<f32>(rows[row_field(ROW_LSE, row)]);
    let call = bitcast<f32>(rows[row_field(ROW_CSUM, row)]);
    let g = GradRow(
        bitcast<f32>(rows[row_field(ROW_SHIFT, row)]),
        bitcast<f32>(rows[row_field(ROW_INV_S, row)]),
        call,
        z_loss_slope(lse),
        scale_bits,
    );
    let p = grad_p(g, load_logit_bits(P.logits_base + local_row * P.stride + k));
    var y = 0u;
    if (P.flags & F_SOFT) == 0u {
        y = labels[2u * row];
    }
    // A valid row has only finite coefficients.
    let c = bitcast<f32>(coef_bits(k, y, P.soft_base + local_row * classes + k, true));
    // d loss_i / d x_k = (sum_j c_j) p_k - c_k + 2 c_z lse p_k, and dx/dz = 1/T.
    let v = (call * p - c + g.zz * p) * P.inv_t;
    return mul_special(v, scale_bits);
}

// The words of a 16-bit gradient that hold elements of two rows (odd V), or the last
// element and the padding: one invocation per row of the chunk takes the word holding
// its first element when that is a high half, and the last row also its last word.
fn grad_fix_word(word: u32, scale_bits: u32) {
    let lo = encode16(bitcast<u32>(grad_element(2u * word, scale_bits)), GRAD_DT);
    let hi = encode16(bitcast<u32>(grad_element(2u * word + 1u, scale_bits)), GRAD_DT);
    grad[P.grad_base + word] = lo | (hi << 16u);
}

@compute @workgroup_size(256)
fn xent_grad(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let local_row = (wg.y * nwg.x + wg.x) * WG + lid;
    if GRAD_DT == DT_F32 || local_row >= P.rows {
        return;
    }
    let scale_bits = red[RED_SCALE];
    let g0 = local_row * P.classes;
    if (g0 & 1u) == 1u {
        grad_fix_word(g0 / 2u, scale_bits);
    }
    let g1 = g0 + P.classes;
    if local_row == P.rows - 1u && (g1 & 1u) == 1u {
        grad_fix_word(g1 / 2u, scale_bits);
    }
}

// -------------------------------------------------------------------- directional
//
// The directional radius along an update direction (reference `directional`), its own
// call, two entry points in this order on one queue:
//   xent_directional         `row_threads` invocations per row, as xent_forward: the
//                            derivatives a are bound as `logits` / `logits4` (LOGITS_DT),
//                            the logits z as `soft` (SOFT_DT, read only for V = 2).
//                            Per row: Delta_a = max_k a - min_k a, and for V = 2 the binary
//                            radius sqrt(delta^2 + pi^2) / |a_1 - a_0|, delta = z_1 - z_0.
//   xent_directional_reduce  one workgroup: rho_a = pi / max_i Delta_a,i and the
//                            normalised step tau / rho_a -> `red`.
// max and min are exact (keys of the f32 bits); Delta_a is the exact difference rounded
// once. Differences that pass the f32 range (|a| near 2^128) are taken on halves, and
// every Delta_a is kept in an extended-exponent code (`ext`), so the max over rows and
// rho_a are the reference's even where an f32 Delta_a would overflow. Products and
// quotients that could overflow or underflow f32 are scaled by exponent arithmetic on
// the bits (`ldexp_bits`), never by float arithmetic producing inf.
//
// Params as used here: batch, classes, row0, rows, logits_base (element offset of the
// chunk's first row of a), soft_base (same for z), row_threads, vec_count, nan_bits,
// inf_bits, and the step tau / pi = cap * 2^grad_base (cap in [1, 2), grad_base an i32)
// with flags DF_STEP_NEG (tau < 0 or -0) and DF_STEP_ZERO (tau = 0).

// Fields of `rows` for the directional radius (field f of row i is word f * batch + i).
const DIR_EXT: u32 = 0u;
const DIR_DELTA: u32 = 1u;
const DIR_RADIUS: u32 = 2u;

// Slots of `red` for the directional radius.
const DIR_RED_RHO: u32 = 0u;
const DIR_RED_STEP: u32 = 1u;

const DF_STEP_NEG: u32 = 1u;
const DF_STEP_ZERO: u32 = 2u;

const PI_SQUARED: f32 = 9.86960440108936;

// Extended code of a non-negative value v = m 2^e (m in [1, 2)): ((e + 159) << 23) | the
// 23 fraction bits of m, 0 for zero, EXT_INF for +inf and EXT_NAN for NaN. e runs from
// -149 (the smallest f32 subnormal) to 128 (a difference of halves beyond f32), so the
// code orders like the value with NaN above everything: a u32 max over rows is the max
// of the reference with NaN winning.
const EXT_BIAS: i32 = 159;
const EXT_INF: u32 = 0xfffffffeu;
const EXT_NAN: u32 = 0xffffffffu;

// The code of the non-negative finite f32 bits `b` times 2^`scale`.
fn ext_of(b: u32, scale: i32) -> u32 {
    if b == 0u {
        return 0u;
    }
    var biased = i32(b >> 23u);
    var fraction = b & 0x7fffffu;
    if biased == 0 {
        // Subnormal: the fraction as an integer is exact and normal in f32; b = it * 2^-149.
        let nb = bitcast<u32>(f32(fraction));
        biased = i32(nb >> 23u) - 149;
        fraction = nb & 0x7fffffu;
    }
    return (u32(biased - 127 + EXT_BIAS + scale) << 23u) | fraction;
}

// m in [1, 2) of a finite, nonzero code.
fn ext_mantissa(x: u32) -> f32 {
    return bitcast<f32>((x & 0x7fffffu) | 0x3f800000u);
}

// e of a finite, nonzero code.
fn ext_exponent(x: u32) -> i32 {
    return i32(x >> 23u) - EXT_BIAS;
}

// f32 bits of x 2^n for a positive normal x, rounded to nearest even: +inf past the f32
// range, subnormal or 0 below it.
fn ldexp_bits(x: f32, n: i32) -> u32 {
    let b = bitcast<u32>(x);
    let biased = i32(b >> 23u) + n;
    if biased >= 255 {
        return POS_INF_BITS;
    }
    if biased >= 1 {
        return (u32(biased) << 23u) | (b & 0x7fffffu);
    }
    let shift = u32(1 - biased);
    if shift > 24u {
        return 0u;
    }
    let mantissa = (b & 0x7fffffu) | 0x800000u;
    var q = mantissa >> shift;
    let rest = mantissa & ((1u << shift) - 1u);
    let half = 1u << (shift - 1u);
    if rest > half || (rest == half && (q & 1u) == 1u) {
        q = q + 1u;
    }
    return q;
}

// f32 bits of a code (rounded once: codes of f32 results are exact).
fn ext_to_bits(x: u32) -> u32 {
    if x == EXT_NAN {
        return P.nan_bits;
    }
    if x == EXT_INF {
        return P.inf_bits;
    }
    if x == 0u {
        return 0u;
    }
    return ldexp_bits(ext_mantissa(x), ext_exponent(x));
}

// The code of |x - y| for f32 bits x and y, with the reference's specials: NaN in, or
// inf - inf of one sign, gives NaN; any other infinity +inf.
fn abs_diff_ext(xb: u32, yb: u32) -> u32 {
    if is_nan_bits(xb) || is_nan_bits(yb) {
        return EXT_NAN;
    }
    let x_finite = is_finite_bits(xb);
    let y_finite = is_finite_bits(yb);
    if !x_finite || !y_finite {
        if !x_finite && !y_finite && xb == yb {
            return EXT_NAN;
        }
        return EXT_INF;
    }
    let x = bitcast<f32>(xb);
    let y = bitcast<f32>(yb);
    // Below 2^126 in magnitude the difference stays below 2^127: no overflow.
    if max(xb & 0x7fffffffu, yb & 0x7fffffffu) < 0x7e800000u {
        return ext_of(bitcast<u32>(abs(x - y)), 0);
    }
    // Halves of values this large are exact, and their difference below 2^128.
    return ext_of(bitcast<u32>(abs(0.5 * x - 0.5 * y)), 1);
}

// f32 bits of sqrt(delta^2 + pi^2) / Delta_a from the codes of |delta| and Delta_a.
fn binary_radius_bits(dz: u32, da: u32) -> u32 {
    if dz == EXT_NAN || da == EXT_NAN {
        return P.nan_bits;
    }
    if dz == EXT_INF {
        if da == EXT_INF {
            return P.nan_bits;
        }
        return P.inf_bits;
    }
    if da == EXT_INF {
        return 0u;
    }
    if da == 0u {
        return P.inf_bits;
    }
    // The numerator as n_m 2^n_e, n_m normal.
    var n_m = PI;
    var n_e = 0;
    if dz != 0u {
        let e = ext_exponent(dz);
        if e >= 32 {
            // pi^2 / delta^2 < 2^-60: the numerator is |delta| to far below f32 rounding.
            n_m = ext_mantissa(dz);
            n_e = e;
        } else if e > -40 {
            // Otherwise delta^2 / pi^2 < 2^-80 and the numerator is pi. Here |delta| is
            // normal and its square cannot overflow.
            let d = bitcast<f32>(ldexp_bits(ext_mantissa(dz), e));
            n_m = sqrt(d * d + PI_SQUARED);
        }
    }
    return ldexp_bits(n_m / ext_mantissa(da), n_e - ext_exponent(da));
}

// Running max / min keys of a row's derivatives and whether it holds a NaN.
var<private> dir_hi: u32;
var<private> dir_lo: u32;
var<private> dir_nan: u32;

fn dir_one(b: u32) {
    if is_nan_bits(b) {
        dir_nan = 1u;
        return;
    }
    let k = key(b);
    dir_hi = max(dir_hi, k);
    dir_lo = min(dir_lo, k);
}

// The 4 (f32) or 8 (16-bit) derivatives of one 16-byte load.
fn dir_vec(q: vec4<u32>) {
    var a: vec4<u32>;
    var b: vec4<u32>;
    if LOGITS_DT == DT_F32 {
        a = q;
        b = q;
    } else if LOGITS_DT == DT_BF16 {
        a = q << vec4<u32>(16u);
        b = q & vec4<u32>(0xffff0000u);
    } else {
        a = f16x4(q & vec4<u32>(0xffffu));
        b = f16x4(q >> vec4<u32>(16u));
    }
    let magnitude = max(a & vec4<u32>(0x7fffffffu), b & vec4<u32>(0x7fffffffu));
    if any(magnitude > vec4<u32>(POS_INF_BITS)) {
        dir_nan = 1u;
    }
    // A NaN's key is taken too; the flag overrides the row's result.
    let ka = key4(a);
    let kb = key4(b);
    let hi4 = max(ka, kb);
    let lo4 = min(ka, kb);
    dir_hi = max(dir_hi, max(max(hi4.x, hi4.y), max(hi4.z, hi4.w)));
    dir_lo = min(dir_lo, min(min(lo4.x, lo4.y), min(lo4.z, lo4.w)));
}

@compute @workgroup_size(256)
fn xent_directional(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    // From workgroup-uniform values only, so the early return keeps the barriers uniform.
    let row_threads = P.row_threads;
    let first_row = (wg.y * nwg.x + wg.x) * (WG / row_threads);
    if first_row >= P.rows {
        return;
    }
    let slot = row_slot(first_row, lid);
    let lane = slot.lane;
    let local_row = slot.local_row;
    let in_chunk = slot.in_chunk;
    let row = slot.row;
    let classes = P.classes;

    dir_hi = 0u;
    dir_lo = 0xffffffffu;
    dir_nan = 0u;

    // The row's derivatives are elements [e0, e1) of the binding: an unaligned head and
    // tail element by element, the 16-byte-aligned middle through `logits4`.
    let e0 = P.logits_base + local_row * classes;
    var e1 = e0;
    if in_chunk {
        e1 = e0 + classes;
    }
    let epv = elements_per_vec();
    var va = (e0 + epv - 1u) / epv;
    var vb = min(e1 / epv, P.vec_count);
    var head_end = e1;
    var tail_start = e1;
    if vb > va {
        head_end = va * epv;
        tail_start = vb * epv;
    } else {
        va = 0u;
        vb = 0u;
    }
    for (var e = e0 + lane; e < head_end; e = e + row_threads) {
        dir_one(load_logit_bits(e));
    }
    var j = va + lane;
    for (; j + row_threads < vb; j = j + 2u * row_threads) {
        let q0 = logits4[j];
        let q1 = logits4[j + row_threads];
        dir_vec(q0);
        dir_vec(q1);
    }
    if j < vb {
        dir_vec(logits4[j]);
    }
    for (var e = tail_start + lane; e < e1; e = e + row_threads) {
        dir_one(load_logit_bits(e));
    }

    w_top1[lid] = dir_hi;
    w_min[lid] = dir_lo;
    w_flags[lid] = dir_nan;
    workgroupBarrier();
    for (var stride = row_threads / 2u; stride > 0u; stride = stride >> 1u) {
        if lane < stride {
            w_top1[lid] = max(w_top1[lid], w_top1[lid + stride]);
            w_min[lid] = min(w_min[lid], w_min[lid + stride]);
            w_flags[lid] = w_flags[lid] | w_flags[lid + stride];
        }
        workgroupBarrier();
    }
    if !in_chunk || lane != 0u {
        return;
    }

    var delta = EXT_NAN;
    if w_flags[lid] == 0u {
        delta = abs_diff_ext(bitcast<u32>(unkey(w_top1[lid])), bitcast<u32>(unkey(w_min[lid])));
    }
    rows[row_field(DIR_EXT, row)] = delta;
    rows[row_field(DIR_DELTA, row)] = ext_to_bits(delta);
    if classes == 2u {
        // For V = 2, Delta_a is |a_1 - a_0| with the same specials.
        let z = P.soft_base + 2u * local_row;
        let dz = abs_diff_ext(load_soft_bits(z + 1u), load_soft_bits(z));
        rows[row_field(DIR_RADIUS, row)] = binary_radius_bits(dz, delta);
    }
}

@compute @workgroup_size(256)
fn xent_directional_reduce(@builtin(local_invocation_index) lid: u32) {
    var m = 0u;
    for (var i = lid; i < P.batch; i = i + WG) {
        m = max(m, rows[row_field(DIR_EXT, i)]);
    }
    r_flags[lid] = m;
    workgroupBarrier();
    for (var stride = WG / 2u; stride > 0u; stride = stride >> 1u) {
        if lid < stride {
            r_flags[lid] = max(r_flags[lid], r_flags[lid + stride]);
        }
        workgroupBarrier();
    }
    if lid != 0u {
        return;
    }
    let delta = r_flags[0];
    let sign = select(0u, 0x80000000u, (P.flags & DF_STEP_NEG) != 0u);
    let zero_step = (P.flags & DF_STEP_ZERO) != 0u;
    var rho = P.nan_bits;
    var step = P.nan_bits;
    if delta == EXT_INF {
        // rho = pi / inf = 0 and tau / 0 = +-inf (NaN for tau = 0).
        rho = 0u;
        if !zero_step {
            step = P.inf_bits | sign;
        }
    } else if delta == 0u {
        // rho = +inf and tau / inf = +-0.
        rho = P.inf_bits;
        step = sign;
    } else if delta != EXT_NAN {
        let m_a = ext_mantissa(delta);
        let e_a = ext_exponent(delta);
        // pi / Delta and (tau / pi) Delta, each rounded once before exact scaling.
        rho = ldexp_bits(PI / m_a, -e_a);
        if zero_step {
            step = sign;
        } else {
            step = ldexp_bits(P.cap * m_a, bitcast<i32>(P.grad_base) + e_a) | sign;
        }
    }
    red[DIR_RED_RHO] = rho;
    red[DIR_RED_STEP] = step;
}
