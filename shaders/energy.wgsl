// energy: two-sample energy distance and the engression / energy-score loss with its
// gradient (semantics: reference/src/energy.rs), never materialising a distance matrix.
//
// Entry points, in this order on one queue:
//   energy_pairs           one workgroup per (row tile, column chunk): 64 rows of A
//                          against 64-row tiles of B staged through workgroup memory 32
//                          dimensions at a time, up to 16 column tiles per workgroup; the
//                          sum of w_i w_j ||a_i - b_j||^beta over its pairs (i < j only
//                          when B is A) goes to its own slot as a two-float (hi, lo).
//                          Dispatched three times: X-Y, X-X, Y-Y.
//   energy_distance_merge  one workgroup: each term's slots summed in slot order with
//                          two-float (compensated) arithmetic, the weight totals, the
//                          weight check, the four outputs, the status word and the
//                          gradient's four term coefficients -> `red`.
//   energy_grad            with the gradient, four dispatches (X against Y and X, Y
//                          against X and Y): a workgroup owns 64 rows x 64 dims of one
//                          set's gradient and walks every column tile of the other set,
//                          the pair slopes in workgroup memory 32 columns at a time, f32
//                          per tile and two-float across tiles; a set's second dispatch
//                          adds to the rows its first wrote.
//   energy_score           one invocation per prediction row (i, j): ||p_ij - y_i||^beta
//                          and sum_{k > j} ||p_ij - p_ik||^beta -> `slots`; with the
//                          gradient, the row of d loss / d preds, accumulated over k in
//                          blocks of 8 slopes, in k order.
//   energy_score_merge     one workgroup: term1, term2 and the loss -> `red`.
//
// Portability (as xent.wgsl): no 64-bit integers, so element indices are u32 and the host
// refuses tensors past one binding; f16 and bf16 are decoded with integer operations;
// floats may be assumed finite by the implementation, so the weight check works on bits
// and NaN outputs are made from bits read from the uniform. WGSL has no f64: the merges
// use two-float sums (Knuth's two-sum, Dekker's product), which carry about 48 bits, so
// the merged sums are as exact as the f64 merges of the CUDA kernels. Every reduction is
// a fixed-order tree: bitwise deterministic; the forward sums take the same path with and
// without the gradient.

// Element type of the point data: 0 = f32, 1 = f16, 2 = bf16.
override DT: u32 = 0u;

const WG: u32 = 256u;
const TILE: u32 = 64u;
const DIMS: u32 = 32u;
const CHUNK: u32 = 16u;
// Row stride of a staged tile (dims x rows), padded against bank conflicts.
const STRIDE: u32 = 65u;
// Slopes of the score's gradient held at a time.
const KB: u32 = 8u;

// Slots of `red` (u32 words).
const RED_DISTANCE: u32 = 0u;
const RED_CROSS: u32 = 1u;
const RED_WITHIN_X: u32 = 2u;
const RED_WITHIN_Y: u32 = 3u;
const RED_STATUS: u32 = 4u;
// The gradient's coefficients (f32 bits): each set's cross term 2 / (W_x W_y) and within
// term -2 / P (P = W^2 for V, W^2 - sum w^2 for U, the term 0 without pairs).
const RED_COEF_X_CROSS: u32 = 8u;
const RED_COEF_X_WITHIN: u32 = 9u;
const RED_COEF_Y_CROSS: u32 = 10u;
const RED_COEF_Y_WITHIN: u32 = 11u;
const RED_TERM1: u32 = 0u;
const RED_TERM2: u32 = 1u;
const RED_LOSS: u32 = 2u;

// Status bits, as spec::energy::WEIGHTS_* reads them.
const BAD_X: u32 = 1u;
const ZERO_X: u32 = 2u;
const BAD_Y: u32 = 4u;
const ZERO_Y: u32 = 8u;

// Params.flags
const F_WA: u32 = 1u;
const F_WB: u32 = 2u;
const F_WITHIN: u32 = 4u;
const F_U: u32 = 8u;
const F_GRAD: u32 = 16u;
// Gradient: add to the rows (a set's within term) rather than write them.
const F_ADD: u32 = 32u;

struct Params {
    // Pairs: rows of A and B; merge: N and M; score: n and m.
    na: u32,
    nb: u32,
    d: u32,
    // Pairs: column chunks per row tile, slots of this dispatch, first slot. Gradient:
    // 64-dim chunks of d, (row tile, dim chunk) tiles, the coefficient's word of `red`.
    chunks: u32,
    tiles: u32,
    slot_base: u32,
    // Merge: the slots of X-Y, X-X and Y-Y, in that order from slot 0.
    tiles_xy: u32,
    tiles_xx: u32,
    tiles_yy: u32,
    flags: u32,
    // 1: beta = 1, 2: beta = 2, 0: any other (powers through pow).
    power: u32,
    half_beta: f32,
    beta: f32,
    // Score: d loss / d ||p_ij - y_i||^beta and d loss / d ||p_ij - p_ik||^beta.
    c1: f32,
    c2: f32,
    // 0x7fc00000, read at run time so that no compiler folds it.
    nan_bits: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
// Pairs: A; score: preds. Elements of DT.
@group(0) @binding(1) var<storage, read> a: array<u32>;
// Pairs: B; score: y.
@group(0) @binding(2) var<storage, read> b: array<u32>;
// Weights (f32 bits) of A and B; merge: of X and Y. Placeholders when uniform.
@group(0) @binding(3) var<storage, read> wa: array<u32>;
@group(0) @binding(4) var<storage, read> wb: array<u32>;
// Pairs: (hi, lo) per slot; score: (term1 part, term2 part) per row.
@group(0) @binding(5) var<storage, read_write> slots: array<f32>;
@group(0) @binding(6) var<storage, read_write> red: array<u32>;
@group(0) @binding(7) var<storage, read_write> grad: array<f32>;

// --------------------------------------------------------------- loads

// Element `half` of a word of two 16-bit values (common.wgsl's codec).
fn decode(word: u32, half: u32) -> f32 {
    return bitcast<f32>(decode16(word, half, DT));
}

fn load_a(i: u32) -> f32 {
    if DT == DT_F32 {
        return bitcast<f32>(a[i]);
    }
    return decode(a[i >> 1u], i & 1u);
}

fn load_b(i: u32) -> f32 {
    if DT == DT_F32 {
        return bitcast<f32>(b[i]);
    }
    return decode(b[i >> 1u], i & 1u);
}

fn weight_a(i: u32) -> f32 {
    if (P.flags & F_WA) == 0u {
        return 1.0;
    }
    return bitcast<f32>(wa[i]);
}

fn weight_b(i: u32) -> f32 {
    if (P.flags & F_WB) == 0u {
        return 1.0;
    }
    return bitcast<f32>(wb[i]);
}

// ||u||^beta from s = ||u||^2 (pow is undefined at 0 in WGSL, so 0 is taken apart).
fn power(s: f32) -> f32 {
    if P.power == 1u {
        return sqrt(s);
    }
    if P.power == 2u {
        return s;
    }
    if s <= 0.0 {
        return 0.0;
    }
    return pow(s, P.half_beta);
}

// beta ||u||^(beta - 2): the factor of u in d||u||^beta / du, 0 at u = 0.
fn slope(s: f32) -> f32 {
    if s <= 0.0 {
        return 0.0;
    }
    if P.power == 1u {
        return 1.0 / sqrt(s);
    }
    if P.power == 2u {
        return 2.0;
    }
    return P.beta * pow(s, P.half_beta - 1.0);
}

// --------------------------------------------------------------- workgroup sums

// (The two-float helpers two_sum, df_add, df_mul, df_div are in common.wgsl.)

var<workgroup> w_hi: array<f32, WG>;
var<workgroup> w_lo: array<f32, WG>;

// The workgroup's two-float sum of `v` by a fixed tree; valid in every invocation.
fn workgroup_sum(v: vec2<f32>, lid: u32) -> vec2<f32> {
    w_hi[lid] = v.x;
    w_lo[lid] = v.y;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            let s = df_add(vec2<f32>(w_hi[lid], w_lo[lid]), vec2<f32>(w_hi[lid + half], w_lo[lid + half]));
            w_hi[lid] = s.x;
            w_lo[lid] = s.y;
        }
        workgroupBarrier();
    }
    let total = vec2<f32>(w_hi[0], w_lo[0]);
    workgroupBarrier();
    return total;
}

// --------------------------------------------------------------- pair sums

var<workgroup> tile_a: array<f32, 2080>;
var<workgroup> tile_b: array<f32, 2080>;

// Stages dims [d0, d0 + dims) of the 64 rows from r0 of A (or B) as tile[dim * STRIDE + row].
fn stage(lid: u32, r0: u32, c0: u32, d0: u32, dims: u32) {
    for (var e = lid; e < TILE * dims; e = e + WG) {
        let row = e / dims;
        let dim = e - row * dims;
        let ra = r0 + row;
        let rb = c0 + row;
        var va = 0.0;
        if ra < P.na {
            va = load_a(ra * P.d + d0 + dim);
        }
        var vb = 0.0;
        if rb < P.nb {
            vb = load_b(rb * P.d + d0 + dim);
        }
        tile_a[dim * STRIDE + row] = va;
        tile_b[dim * STRIDE + row] = vb;
    }
}

// The squared distances of the invocation's 4 x 4 pairs of one tile (rows ty + 16 r,
// columns tx + 16 c, at r * 4 + c), over all d dims.
fn tile_squares(lid: u32, r0: u32, c0: u32) -> array<f32, 16> {
    let tx = lid & 15u;
    let ty = lid >> 4u;
    var s: array<f32, 16>;
    for (var q = 0u; q < 16u; q = q + 1u) {
        s[q] = 0.0;
    }
    for (var d0 = 0u; d0 < P.d; d0 = d0 + DIMS) {
        let dims = min(DIMS, P.d - d0);
        workgroupBarrier();
        stage(lid, r0, c0, d0, dims);
        workgroupBarrier();
        for (var k = 0u; k < dims; k = k + 1u) {
            var av: array<f32, 4>;
            var bv: array<f32, 4>;
            for (var r = 0u; r < 4u; r = r + 1u) {
                av[r] = tile_a[k * STRIDE + ty + 16u * r];
                bv[r] = tile_b[k * STRIDE + tx + 16u * r];
            }
            for (var r = 0u; r < 4u; r = r + 1u) {
                for (var c = 0u; c < 4u; c = c + 1u) {
                    let u = av[r] - bv[c];
                    s[r * 4u + c] = s[r * 4u + c] + u * u;
                }
            }
        }
    }
    return s;
}

// The invocation's f32 sum over its 4 x 4 pairs of one tile, weighted; masked, not
// weighted by 0, outside the pairs.
fn tile_sum(lid: u32, r0: u32, c0: u32, wr: array<f32, 4>) -> f32 {
    let tx = lid & 15u;
    let ty = lid >> 4u;
    let s = tile_squares(lid, r0, c0);
    var sum = 0.0;
    let within = (P.flags & F_WITHIN) != 0u;
    for (var c = 0u; c < 4u; c = c + 1u) {
        let j = c0 + tx + 16u * c;
        if j >= P.nb {
            continue;
        }
        let wc = weight_b(j);
        for (var r = 0u; r < 4u; r = r + 1u) {
            let i = r0 + ty + 16u * r;
            if i >= P.na || (within && i >= j) {
                continue;
            }
            sum = sum + wr[r] * wc * power(s[r * 4u + c]);
        }
    }
    return sum;
}

@compute @workgroup_size(256)
fn energy_pairs(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = wg.y * groups.x + wg.x;
    if t >= P.tiles {
        return;
    }
    let row_tile = t / P.chunks;
    let chunk = t - row_tile * P.chunks;
    let r0 = row_tile * TILE;
    let col_tiles = (P.nb + TILE - 1u) / TILE;
    var first = chunk * CHUNK;
    let end = min(first + CHUNK, col_tiles);
    // Within a set, tiles left of the diagonal hold only pairs j < i.
    if (P.flags & F_WITHIN) != 0u && first < row_tile {
        first = row_tile;
    }
    let ty = lid >> 4u;
    var wr: array<f32, 4>;
    for (var r = 0u; r < 4u; r = r + 1u) {
        let i = r0 + ty + 16u * r;
        wr[r] = 0.0;
        if i < P.na {
            wr[r] = weight_a(i);
        }
    }
    var acc = vec2<f32>(0.0, 0.0);
    for (var tile = first; tile < end; tile = tile + 1u) {
        acc = df_add(acc, vec2<f32>(tile_sum(lid, r0, tile * TILE, wr), 0.0));
    }
    let total = workgroup_sum(acc, lid);
    if lid == 0u {
        slots[2u * (P.slot_base + t)] = total.x;
        slots[2u * (P.slot_base + t) + 1u] = total.y;
    }
}

// --------------------------------------------------------------- distance merge

fn slot_sum(lid: u32, first: u32, count: u32) -> vec2<f32> {
    var acc = vec2<f32>(0.0, 0.0);
    for (var i = lid; i < count; i = i + WG) {
        acc = df_add(acc, vec2<f32>(slots[2u * (first + i)], slots[2u * (first + i) + 1u]));
    }
    return workgroup_sum(acc, lid);
}

struct WeightSums {
    total: vec2<f32>,
    squares: vec2<f32>,
    bad: bool,
}

var<workgroup> w_bad: array<u32, WG>;

// Sum and sum of squares of one set's weights (`x`: wa, else wb), and whether one is
// negative or not finite, judged by its bits.
fn weight_sums(lid: u32, len: u32, x: bool) -> WeightSums {
    var out: WeightSums;
    let flag = select(F_WB, F_WA, x);
    if (P.flags & flag) == 0u {
        out.total = vec2<f32>(f32(len), 0.0);
        out.squares = out.total;
        out.bad = false;
        return out;
    }
    var total = vec2<f32>(0.0, 0.0);
    var squares = vec2<f32>(0.0, 0.0);
    var bad = 0u;
    for (var i = lid; i < len; i = i + WG) {
        var bits = 0u;
        if x {
            bits = wa[i];
        } else {
            bits = wb[i];
        }
        let magnitude = bits & 0x7fffffffu;
        if magnitude >= POS_INF_BITS || ((bits >> 31u) == 1u && magnitude != 0u) {
            bad = 1u;
        }
        let v = bitcast<f32>(bits);
        total = df_add(total, vec2<f32>(v, 0.0));
        squares = df_add(squares, two_prod(v, v));
    }
    w_bad[lid] = bad;
    out.total = workgroup_sum(total, lid);
    out.squares = workgroup_sum(squares, lid);
    // workgroup_sum's barriers order the w_bad writes before these reads.
    var any_bad = 0u;
    for (var i = 0u; i < WG; i = i + 1u) {
        any_bad = any_bad | w_bad[i];
    }
    out.bad = any_bad != 0u;
    return out;
}

// The within-set mean from the sum over pairs i < j (ordered pairs count twice): V divides
// by the weight of all pairs, U by that of the pairs i != j (none: 0, as the reference).
fn within(half_sum: vec2<f32>, w: WeightSums) -> vec2<f32> {
    let all = df_mul(w.total, w.total);
    var den = all;
    if (P.flags & F_U) != 0u {
        den = df_add(all, -w.squares);
        if den.x == 0.0 {
            return vec2<f32>(0.0, 0.0);
        }
    }
    return df_div(2.0 * half_sum, den);
}

// The factor of sum_k w_i w_k g(x_i - x_k) in d distance / dx_i: -2 over the weight the
// within-set sum was divided by (0 for a U statistic without pairs).
fn within_coef(w: WeightSums) -> f32 {
    var den = df_mul(w.total, w.total);
    if (P.flags & F_U) != 0u {
        den = df_add(den, -w.squares);
    }
    if den.x == 0.0 {
        return 0.0;
    }
    let c = df_div(vec2<f32>(-2.0, 0.0), den);
    return c.x + c.y;
}

@compute @workgroup_size(256)
fn energy_distance_merge(@builtin(local_invocation_index) lid: u32) {
    let xy = slot_sum(lid, 0u, P.tiles_xy);
    let xx = slot_sum(lid, P.tiles_xy, P.tiles_xx);
    let yy = slot_sum(lid, P.tiles_xy + P.tiles_xx, P.tiles_yy);
    let wx = weight_sums(lid, P.na, true);
    let wy = weight_sums(lid, P.nb, false);
    if lid != 0u {
        return;
    }
    var status = 0u;
    if wx.bad {
        status = status | BAD_X;
    } else if wx.total.x == 0.0 {
        status = status | ZERO_X;
    }
    if wy.bad {
        status = status | BAD_Y;
    } else if wy.total.x == 0.0 {
        status = status | ZERO_Y;
    }
    red[RED_STATUS] = status;
    if status != 0u {
        for (var t = RED_COEF_X_CROSS; t <= RED_COEF_Y_WITHIN; t = t + 1u) {
            red[t] = P.nan_bits;
        }
        red[RED_DISTANCE] = P.nan_bits;
        red[RED_CROSS] = P.nan_bits;
        red[RED_WITHIN_X] = P.nan_bits;
        red[RED_WITHIN_Y] = P.nan_bits;
        return;
    }
    let cross_coef = df_div(vec2<f32>(2.0, 0.0), df_mul(wx.total, wy.total));
    red[RED_COEF_X_CROSS] = bitcast<u32>(cross_coef.x + cross_coef.y);
    red[RED_COEF_Y_CROSS] = bitcast<u32>(cross_coef.x + cross_coef.y);
    red[RED_COEF_X_WITHIN] = bitcast<u32>(within_coef(wx));
    red[RED_COEF_Y_WITHIN] = bitcast<u32>(within_coef(wy));
    let cross = df_div(xy, df_mul(wx.total, wy.total));
    let within_x = within(xx, wx);
    let within_y = within(yy, wy);
    let distance = df_add(df_add(2.0 * cross, -within_x), -within_y);
    red[RED_DISTANCE] = bitcast<u32>(distance.x + distance.y);
    red[RED_CROSS] = bitcast<u32>(cross.x + cross.y);
    red[RED_WITHIN_X] = bitcast<u32>(within_x.x + within_x.y);
    red[RED_WITHIN_Y] = bitcast<u32>(within_y.x + within_y.y);
}

// --------------------------------------------------------------- distance gradient

const GRAD_DIMS: u32 = 64u;
const HALF_TILE: u32 = 32u;

// One half (32 columns) of a tile's pair slopes, w_j g'(s_ij), at row * HALF_TILE + column.
var<workgroup> slopes: array<f32, 2048>;

// sum_j w_j g(a_i - b_j) for a 64-row tile of A and 64 of its dims, over every column
// tile of B in order: per tile, the pair slopes (from the full-d distances) wait in
// workgroup memory 32 columns at a time while invocation (dim = lid % 32, rows
// lid / 32 + 8 q) sums slope_ij (a_i - b_j) in j order over 32 staged dims; each tile's
// f32 sum is added to a two-float accumulator. Differences, never a_i sum c - sum c b,
// which would cancel for offset data. A workgroup owns its (rows, dims) of grad.
@compute @workgroup_size(256)
fn energy_grad(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let t = wg.y * groups.x + wg.x;
    if t >= P.tiles {
        return;
    }
    let row_tile = t / P.chunks;
    let g0 = (t - row_tile * P.chunks) * GRAD_DIMS;
    let r0 = row_tile * TILE;
    let tx = lid & 15u;
    let ty = lid >> 4u;
    let lane = lid & 31u;
    let group = lid >> 5u;
    let col_tiles = (P.nb + TILE - 1u) / TILE;
    var acc: array<vec2<f32>, 16>;
    for (var q = 0u; q < 16u; q = q + 1u) {
        acc[q] = vec2<f32>(0.0, 0.0);
    }
    for (var tile = 0u; tile < col_tiles; tile = tile + 1u) {
        let c0 = tile * TILE;
        let s = tile_squares(lid, r0, c0);
        var part: array<f32, 16>;
        for (var q = 0u; q < 16u; q = q + 1u) {
            part[q] = 0.0;
        }
        // Each half of the dims is staged once per column tile; the slopes of the two
        // column halves take turns in workgroup memory over it.
        for (var h = 0u; h < 2u; h = h + 1u) {
            let d0 = g0 + h * DIMS;
            if d0 >= P.d {
                break;
            }
            let dims = min(DIMS, P.d - d0);
            workgroupBarrier();  // the last stage's and slopes' reads are done
            stage(lid, r0, c0, d0, dims);
            for (var half = 0u; half < 2u; half = half + 1u) {
                workgroupBarrier();  // the previous half's slope reads are done
                for (var c = 2u * half; c < 2u * half + 2u; c = c + 1u) {
                    let j = c0 + tx + 16u * c;
                    for (var r = 0u; r < 4u; r = r + 1u) {
                        var v = 0.0;
                        if r0 + ty + 16u * r < P.na && j < P.nb {
                            v = weight_b(j) * slope(s[r * 4u + c]);
                        }
                        slopes[(ty + 16u * r) * HALF_TILE + tx + 16u * (c - 2u * half)] = v;
                    }
                }
                workgroupBarrier();  // slopes and the stage written
                if lane < dims {
                    for (var q = 0u; q < 8u; q = q + 1u) {
                        let row = group + 8u * q;
                        let av = tile_a[lane * STRIDE + row];
                        var g = part[h * 8u + q];
                        for (var j = 0u; j < HALF_TILE; j = j + 1u) {
                            let b_value = tile_b[lane * STRIDE + HALF_TILE * half + j];
                            g = g + slopes[row * HALF_TILE + j] * (av - b_value);
                        }
                        part[h * 8u + q] = g;
                    }
                }
            }
        }
        for (var q = 0u; q < 16u; q = q + 1u) {
            acc[q] = df_add(acc[q], vec2<f32>(part[q], 0.0));
        }
    }
    let coef = bitcast<f32>(red[P.slot_base]);
    for (var h = 0u; h < 2u; h = h + 1u) {
        let dim = g0 + h * DIMS + lane;
        if dim >= P.d {
            break;
        }
        for (var q = 0u; q < 8u; q = q + 1u) {
            let i = r0 + group + 8u * q;
            if i >= P.na {
                break;
            }
            let total = acc[h * 8u + q];
            let v = coef * weight_a(i) * (total.x + total.y);
            let at = i * P.d + dim;
            if (P.flags & F_ADD) != 0u {
                grad[at] = grad[at] + v;
            } else {
                grad[at] = v;
            }
        }
    }
}

// --------------------------------------------------------------- energy score

@compute @workgroup_size(256)
fn energy_score(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) groups: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let row = (wg.y * groups.x + wg.x) * WG + lid;
    let m = P.nb;
    let d = P.d;
    if row >= P.na * m {
        return;
    }
    let i = row / m;
    let j = row - i * m;
    let pj = row * d;
    let yi = i * d;
    let sample = i * m * d;
    let with_grad = (P.flags & F_GRAD) != 0u;

    var s1 = 0.0;
    for (var k = 0u; k < d; k = k + 1u) {
        let u = load_a(pj + k) - load_b(yi + k);
        s1 = s1 + u * u;
    }
    let h1 = P.c1 * slope(s1);
    if with_grad {
        for (var k = 0u; k < d; k = k + 1u) {
            grad[pj + k] = h1 * (load_a(pj + k) - load_b(yi + k));
        }
    }
    var t2 = 0.0;
    // Without the gradient only k > j count; with it every k, in blocks of KB slopes.
    var k0 = select(j + 1u, 0u, with_grad);
    for (; k0 < m; k0 = k0 + KB) {
        let count = min(KB, m - k0);
        var h: array<f32, KB>;
        for (var q = 0u; q < count; q = q + 1u) {
            let pk = sample + (k0 + q) * d;
            var s = 0.0;
            for (var k = 0u; k < d; k = k + 1u) {
                let u = load_a(pj + k) - load_a(pk + k);
                s = s + u * u;
            }
            if k0 + q > j {
                t2 = t2 + power(s);
            }
            h[q] = P.c2 * slope(s);
        }
        if with_grad {
            for (var k = 0u; k < d; k = k + 1u) {
                let v = load_a(pj + k);
                var g = grad[pj + k];
                for (var q = 0u; q < count; q = q + 1u) {
                    g = g + h[q] * (v - load_a(sample + (k0 + q) * d + k));
                }
                grad[pj + k] = g;
            }
        }
    }
    slots[2u * row] = power(s1);
    slots[2u * row + 1u] = t2;
}

// term2 = -0.5 m / (m - 1) (sum over ordered pairs) / (n m^2), and the ordered sum is
// twice the k > j one the rows hold.
@compute @workgroup_size(256)
fn energy_score_merge(@builtin(local_invocation_index) lid: u32) {
    let rows = P.na * P.nb;
    var s1 = vec2<f32>(0.0, 0.0);
    var s2 = vec2<f32>(0.0, 0.0);
    for (var r = lid; r < rows; r = r + WG) {
        s1 = df_add(s1, vec2<f32>(slots[2u * r], 0.0));
        s2 = df_add(s2, vec2<f32>(slots[2u * r + 1u], 0.0));
    }
    s1 = workgroup_sum(s1, lid);
    s2 = workgroup_sum(s2, lid);
    if lid != 0u {
        return;
    }
    let n = f32(P.na);
    let m = f32(P.nb);
    let nm = two_prod(n, m);
    let term1 = df_div(s1, nm);
    var term2 = vec2<f32>(0.0, 0.0);
    if P.nb >= 2u {
        // m / (m - 1) / (n m^2) = 1 / (n m (m - 1)), with m - 1 exact.
        term2 = -df_div(s2, df_mul(nm, vec2<f32>(m - 1.0, 0.0)));
    }
    let loss = df_add(term1, term2);
    red[RED_TERM1] = bitcast<u32>(term1.x + term1.y);
    red[RED_TERM2] = bitcast<u32>(term2.x + term2.y);
    red[RED_LOSS] = bitcast<u32>(loss.x + loss.y);
}
