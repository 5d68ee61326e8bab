// ensemble: E MLPs (PyTorch Linear layout, ReLU between layers) on one batch with a fused
// per-model cross-entropy and accuracy, and landscape scans theta_0 + t_e D_{k_e} that
// never materialise the E parameter sets. Semantics: reference/src/ensemble.rs; the
// structure is kernels/ensemble.cu's. Host side: src/wgpu/ensemble.rs.
//
// Entry points, in this order in one compute pass:
//   ensemble_check     ONE workgroup: the first label outside [0, C) (and its value), for
//                      a scan the first non-finite t and the first k outside [0, K), into
//                      the status words (work[0..8)); the host reads them at its next
//                      readback (no op waits for the device).
//   ensemble_mlp       a workgroup per (batch tile of 16 rows, model), or for a Split
//                      scan per (tile, direction k): the tile goes through every layer, its activations in workgroup memory when every
//                      width after the input is at most 64 (else in the workgroup's slice
//                      of `scratch`, and the grid is capped and strides over the work),
//                      weights staged through workgroup memory 64 units x 8 inputs at a
//                      time; each output is one fma chain in input order. Then the tile's
//                      rows' cross-entropies (f32), summed in two-float arithmetic in row
//                      order, with the count of right argmaxes, into the (model, tile) slot.
//   ensemble_finalize  a workgroup per model: its slots in two-float arithmetic, in a fixed
//                      order (strided, then a tree), the loss sum / B and hits / B written
//                      as f64 bit patterns: the loss from the two-float quotient (about
//                      2^-44 relative), the accuracy by an exact integer long division,
//                      correctly rounded as the f64 division of the reference.
//
// Modes: FORWARD reads model e's own parameters. ROUNDED forms each weight as it is
// staged: fl(w0 + fl(t d)) in the parameters' dtype, each operation in f32, as the
// reference rounds it. SPLIT computes b0 + W0 h and db + D h side by side and adds them as
// (b0 + W0 h) + t (db + D h); its first layer's two parts are computed once per (tile, k),
// into the workgroup's scratch, and shared by every distance on direction k.
//
// Labels out of range give that row a NaN loss (never an out-of-bounds read); a model whose
// k is out of range gets NaN logits, loss and accuracy. No float atomics and no subgroup
// operations: the same input gives the same bits on any device. Every index is u32: the
// host refuses a binding over 2 GiB. f16 and bf16 are decoded with integer operations
// (common.wgsl); NaN outputs are made from bits read from the uniform.

// Element type of x and of the parameters: 0 = f32, 1 = f16, 2 = bf16.
override DT: u32 = 0u;

const WG: u32 = 256u;
// Batch rows per tile, output units per pass, inputs staged at a time, the widest
// activation kept in workgroup memory, the deepest network. As in src/wgpu/ensemble.rs.
const ROWS: u32 = 16u;
const COLS: u32 = 64u;
const KC: u32 = 8u;
const HIDDEN: u32 = 64u;
const MAX_LAYERS: u32 = 8u;
// Each invocation computes 4 rows of one unit: ROWS / 4 row groups x COLS units = WG.
const ROWS_PER_INVOCATION: u32 = 4u;

const FORWARD: u32 = 0u;
const ROUNDED: u32 = 1u;
const SPLIT: u32 = 2u;

// Words of `work`: the status, then the results, then the slots.
const STATUS_WORDS: u32 = 8u;
// A slot: the loss sum's (hi, lo) as f32 bits and the count of right argmaxes.
const SLOT_WORDS: u32 = 3u;
// The count of a model whose direction is out of range: its accuracy is NaN.
const NO_COUNT: u32 = 0xffffffffu;
// No bad row or model.
const NONE: u32 = 0xffffffffu;

struct Params {
    // d0, ..., dL at [l / 4][l % 4].
    widths: array<vec4<u32>, 3>,
    // Element offsets into `params` of each layer's weights and biases: a forward's
    // [E, out, in] and [E, out], a scan's centre [out, in] and [out], then a scan's
    // directions [K, out, in] and [K, out].
    w_off: array<vec4<u32>, 2>,
    b_off: array<vec4<u32>, 2>,
    dw_off: array<vec4<u32>, 2>,
    db_off: array<vec4<u32>, 2>,
    layers: u32,
    models: u32,
    batch: u32,
    directions: u32,
    tiles: u32,
    // Work items: tiles x models, or tiles x directions for a Split scan.
    work: u32,
    // Workgroups the MLP dispatch has; the work items are strided over them.
    launched: u32,
    mode: u32,
    shared_input: u32,
    // Floats of each activation buffer in a workgroup's scratch; 0: workgroup memory.
    // A Split scan's first-layer parts follow them: ROWS d1 floats each.
    act_floats: u32,
    scratch_stride: u32,
    // Whether the logits are written.
    logits: u32,
    // Words of `data`: where k [E] (i64) and t [E] (f32) start.
    k_word: u32,
    t_word: u32,
    // 0x7fc00000, read at run time so that no compiler folds it.
    nan_bits: u32,
    classes: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
// X [B, d0] or [E, B, d0] of DT.
@group(0) @binding(1) var<storage, read> x: array<u32>;
// Every layer's parameters of DT, at the offsets of P.
@group(0) @binding(2) var<storage, read> params: array<u32>;
// labels [B] i64 as (lo, hi) words, then a scan's k [E] i64 and t [E] f32 bits.
@group(0) @binding(3) var<storage, read> data: array<u32>;
// [E, B, C] f32 when P.logits; a placeholder otherwise.
@group(0) @binding(4) var<storage, read_write> logits: array<f32>;
// Status [8], loss [E] and accuracy [E] as f64 (lo, hi) words, slots [E, tiles, 3].
@group(0) @binding(5) var<storage, read_write> work: array<u32>;
// Per workgroup: two activation buffers of P.act_floats, then a Split scan's first-layer
// parts b0 + W0 h and db + D h [ROWS, d1] each; a placeholder when none is needed.
@group(0) @binding(6) var<storage, read_write> scratch: array<f32>;

fn width(l: u32) -> u32 {
    return P.widths[l / 4u][l % 4u];
}

fn offset_of(table: array<vec4<u32>, 2>, l: u32) -> u32 {
    return table[l / 4u][l % 4u];
}

fn nan() -> f32 {
    return bitcast<f32>(P.nan_bits);
}

fn load_x(i: u32) -> f32 {
    if DT == DT_F32 {
        return bitcast<f32>(x[i]);
    }
    return bitcast<f32>(decode16(x[i >> 1u], i & 1u, DT));
}

fn load_param(i: u32) -> f32 {
    if DT == DT_F32 {
        return bitcast<f32>(params[i]);
    }
    return bitcast<f32>(decode16(params[i >> 1u], i & 1u, DT));
}

// `v` rounded to DT (nearest even), widened back to f32.
fn round_dt(v: f32) -> f32 {
    if DT == DT_F32 {
        return v;
    }
    return bitcast<f32>(decode16(encode16(bitcast<u32>(v), DT), 0u, DT));
}

// fl(w0 + fl(t d)) in DT, each operation in f32, as PyTorch forms add(w0, scale(d, t)).
fn perturbed(w0: f32, t: f32, d: f32) -> f32 {
    return round_dt(w0 + round_dt(t * d));
}

fn relu_of(v: f32, relu: bool) -> f32 {
    // v < 0 rather than max, so a NaN stays NaN as in the reference.
    return select(v, 0.0, relu && v < 0.0);
}

// Whether the i64 at words (lo, hi) of `data` lies in [0, n).
fn index_in_range(word: u32, n: u32) -> bool {
    return data[word + 1u] == 0u && data[word] < n;
}

// --------------------------------------------------------------- the data checks

var<workgroup> wg_min: array<u32, WG>;

// The smallest `v` over the workgroup, by a fixed tree; valid in every invocation.
fn workgroup_min(v: u32, lid: u32) -> u32 {
    wg_min[lid] = v;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            wg_min[lid] = min(wg_min[lid], wg_min[lid + half]);
        }
        workgroupBarrier();
    }
    let least = wg_min[0];
    workgroupBarrier();
    return least;
}

// !first as a u64 (lo, hi), or 0 where there is none.
fn write_not(word: u32, first: u32) {
    if first == NONE {
        work[word] = 0u;
        work[word + 1u] = 0u;
    } else {
        work[word] = ~first;
        work[word + 1u] = 0xffffffffu;
    }
}

// Status words (u64 as (lo, hi)): !(first bad row) and its label; !(first model with a
// non-finite t); !(first model with k outside [0, K)); 0 where there is none.
@compute @workgroup_size(256)
fn ensemble_check(@builtin(local_invocation_index) lid: u32) {
    var bad_row = NONE;
    for (var r = lid; r < P.batch; r = r + WG) {
        if !index_in_range(2u * r, P.classes) {
            bad_row = min(bad_row, r);
        }
    }
    var bad_t = NONE;
    var bad_k = NONE;
    if P.mode != FORWARD {
        for (var e = lid; e < P.models; e = e + WG) {
            if (data[P.t_word + e] & 0x7fffffffu) >= POS_INF_BITS {
                bad_t = min(bad_t, e);
            }
            if !index_in_range(P.k_word + 2u * e, P.directions) {
                bad_k = min(bad_k, e);
            }
        }
    }
    bad_row = workgroup_min(bad_row, lid);
    bad_t = workgroup_min(bad_t, lid);
    bad_k = workgroup_min(bad_k, lid);
    if lid != 0u {
        return;
    }
    write_not(0u, bad_row);
    work[2u] = 0u;
    work[3u] = 0u;
    if bad_row != NONE {
        work[2u] = data[2u * bad_row];
        work[3u] = data[2u * bad_row + 1u];
    }
    write_not(4u, bad_t);
    write_not(6u, bad_k);
}

// --------------------------------------------------------------- the MLP

// The activations of the tile, ping-pong, when they fit.
var<workgroup> act: array<f32, 2048>; // 2 * ROWS * HIDDEN
// The staged input chunk [ROWS][KC] and weights [KC][COLS] (W or W0, and D).
var<workgroup> sh_h: array<f32, 128>; // ROWS * KC
var<workgroup> sh_w: array<f32, 512>; // KC * COLS
var<workgroup> sh_d: array<f32, 512>;
var<workgroup> row_loss: array<f32, 16>; // ROWS
var<workgroup> row_hit: array<u32, 16>;

// The first float of this workgroup's scratch.
var<private> scratch_base: u32;

fn act_get(buffer: u32, i: u32) -> f32 {
    if P.act_floats == 0u {
        return act[buffer * ROWS * HIDDEN + i];
    }
    return scratch[scratch_base + buffer * P.act_floats + i];
}

// The first float of a Split scan's first-layer parts in this workgroup's scratch.
fn parts_base() -> u32 {
    return scratch_base + 2u * P.act_floats;
}

fn act_set(buffer: u32, i: u32, v: f32) {
    if P.act_floats == 0u {
        act[buffer * ROWS * HIDDEN + i] = v;
    } else {
        scratch[scratch_base + buffer * P.act_floats + i] = v;
    }
}

// One layer of one model: its parameters' element offsets (the centre's and the
// direction's in a scan) and the model's distance.
struct Layer {
    w: u32,
    b: u32,
    dw: u32,
    db: u32,
    t: f32,
    d_in: u32,
    d_out: u32,
}

fn layer_of(l: u32, e: u32, k: u32, t: f32) -> Layer {
    var p: Layer;
    p.d_in = width(l);
    p.d_out = width(l + 1u);
    p.t = t;
    var model = 0u;
    if P.mode == FORWARD {
        model = e;
    }
    p.w = offset_of(P.w_off, l) + model * p.d_out * p.d_in;
    p.b = offset_of(P.b_off, l) + model * p.d_out;
    p.dw = offset_of(P.dw_off, l) + k * p.d_out * p.d_in;
    p.db = offset_of(P.db_off, l) + k * p.d_out;
    return p;
}

// Input element i of layer l's rows: X's for layer 0 (from element x_base), else the
// previous layer's activations.
fn layer_input(l: u32, x_base: u32, i: u32) -> f32 {
    if l == 0u {
        return load_x(x_base + i);
    }
    return act_get((l - 1u) & 1u, i);
}

// Stages inputs [k0, k0 + KC) of the tile's rows and the weights of units
// [j0, j0 + COLS) for them (zeros outside), then waits for the workgroup.
fn stage(l: u32, p: Layer, rows: u32, x_base: u32, j0: u32, k0: u32, lid: u32) {
    if lid < ROWS * KC {
        let r = lid / KC;
        let k = k0 + lid % KC;
        var v = 0.0;
        if r < rows && k < p.d_in {
            v = layer_input(l, x_base, r * p.d_in + k);
        }
        sh_h[lid] = v;
    }
    for (var q = lid; q < KC * COLS; q = q + WG) {
        let c = q / KC;
        let kk = q % KC;
        let j = j0 + c;
        let k = k0 + kk;
        var v = 0.0;
        var vd = 0.0;
        if j < p.d_out && k < p.d_in {
            let at = j * p.d_in + k;
            v = load_param(p.w + at);
            if P.mode != FORWARD {
                vd = load_param(p.dw + at);
            }
            if P.mode == ROUNDED {
                v = perturbed(v, p.t, vd);
            }
        }
        sh_w[kk * COLS + c] = v;
        sh_d[kk * COLS + c] = vd;
    }
    workgroupBarrier();
}

// Unit j's output from its dot products: b_j + w_j . h (the mode's form of it).
fn unit_output(p: Layer, j: u32, acc: f32, acc_d: f32) -> f32 {
    let b = load_param(p.b + j);
    if P.mode == FORWARD {
        return b + acc;
    }
    let db = load_param(p.db + j);
    if P.mode == ROUNDED {
        return perturbed(b, p.t, db) + acc;
    }
    return (b + acc) + p.t * (db + acc_d);
}

// Layer l on the tile's `rows` rows: out[r, j] = b_j + sum_i w_ji in[r, i] (ReLU between
// layers) into activation buffer l & 1; with `parts` (a Split scan's shared first layer),
// b0 + W0 in and db + D in into the scratch's parts instead. Ends with a barrier: the
// output is complete.
fn run_layer(l: u32, p: Layer, rows: u32, x_base: u32, parts: bool, lid: u32) {
    let relu = l + 1u < P.layers;
    let split = P.mode == SPLIT;
    let unit = lid % COLS;
    let row0 = (lid / COLS) * ROWS_PER_INVOCATION;
    for (var j0 = 0u; j0 < p.d_out; j0 = j0 + COLS) {
        var acc = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        var acc_d = array<f32, 4>(0.0, 0.0, 0.0, 0.0);
        for (var k0 = 0u; k0 < p.d_in; k0 = k0 + KC) {
            stage(l, p, rows, x_base, j0, k0, lid);
            for (var kk = 0u; kk < KC; kk = kk + 1u) {
                let w = sh_w[kk * COLS + unit];
                let d = sh_d[kk * COLS + unit];
                for (var i = 0u; i < ROWS_PER_INVOCATION; i = i + 1u) {
                    let h = sh_h[(row0 + i) * KC + kk];
                    acc[i] = fma(w, h, acc[i]);
                    if split {
                        acc_d[i] = fma(d, h, acc_d[i]);
                    }
                }
            }
            workgroupBarrier();
        }
        let j = j0 + unit;
        for (var i = 0u; i < ROWS_PER_INVOCATION; i = i + 1u) {
            let r = row0 + i;
            if r < rows && j < p.d_out {
                let at = r * p.d_out + j;
                if parts {
                    scratch[parts_base() + at] = load_param(p.b + j) + acc[i];
                    scratch[parts_base() + ROWS * p.d_out + at] = load_param(p.db + j) + acc_d[i];
                } else {
                    act_set(l & 1u, at, relu_of(unit_output(p, j, acc[i], acc_d[i]), relu));
                }
            }
        }
    }
    // The scratch is storage memory: its writes need a storage barrier to be seen.
    storageBarrier();
    workgroupBarrier();
}

// The slot of (model e, tile) in `work`.
fn slot_word(e: u32, tile: u32) -> u32 {
    return STATUS_WORDS + 4u * P.models + SLOT_WORDS * (e * P.tiles + tile);
}

// Row r's cross-entropy (f32; NaN for a label out of range) and whether its first argmax
// is the label, from the logits in activation buffer `buffer`; writes the logits when
// asked.
fn row_loss_of(buffer: u32, e: u32, row: u32, r: u32) -> vec2<f32> {
    let classes = P.classes;
    // The first max; NaN never wins (as in the reference after z_0).
    var m = bitcast<f32>(0xff800000u);
    var arg = classes;
    for (var c = 0u; c < classes; c = c + 1u) {
        let z = act_get(buffer, r * classes + c);
        if z > m {
            m = z;
            arg = c;
        }
    }
    var s = 0.0;
    for (var c = 0u; c < classes; c = c + 1u) {
        s = s + exp(act_get(buffer, r * classes + c) - m);
    }
    if P.logits != 0u {
        let out = (e * P.batch + row) * classes;
        for (var c = 0u; c < classes; c = c + 1u) {
            logits[out + c] = act_get(buffer, r * classes + c);
        }
    }
    if !index_in_range(2u * row, classes) {
        return vec2<f32>(nan(), 0.0);
    }
    let y = data[2u * row];
    let loss = (m + log(s)) - act_get(buffer, r * classes + y);
    return vec2<f32>(loss, select(0.0, 1.0, arg == y));
}

// The tile's cross-entropies, summed in row order, and right argmaxes into model e's slot.
fn tile_loss(e: u32, tile: u32, rows: u32, row0: u32, lid: u32) {
    if lid < ROWS {
        var loss = vec2<f32>(0.0, 0.0);
        if lid < rows {
            loss = row_loss_of((P.layers - 1u) & 1u, e, row0 + lid, lid);
        }
        row_loss[lid] = loss.x;
        row_hit[lid] = u32(loss.y);
    }
    workgroupBarrier();
    if lid == 0u {
        var sum = vec2<f32>(0.0, 0.0);
        var hits = 0u;
        for (var r = 0u; r < rows; r = r + 1u) {
            sum = df_add(sum, vec2<f32>(row_loss[r], 0.0));
            hits = hits + row_hit[r];
        }
        let at = slot_word(e, tile);
        work[at] = bitcast<u32>(sum.x);
        work[at + 1u] = bitcast<u32>(sum.y);
        work[at + 2u] = hits;
    }
    workgroupBarrier();
}

// Model e's direction index is out of range: its logits and slot are NaN.
fn bad_model(e: u32, tile: u32, rows: u32, row0: u32, lid: u32) {
    let classes = P.classes;
    if P.logits != 0u {
        let out = (e * P.batch + row0) * classes;
        for (var q = lid; q < rows * classes; q = q + WG) {
            logits[out + q] = nan();
        }
    }
    if lid == 0u {
        let at = slot_word(e, tile);
        work[at] = P.nan_bits;
        work[at + 1u] = 0u;
        work[at + 2u] = NO_COUNT;
    }
}

// Model e's layers first..L on the tile (layer 0 reads its input rows, layer l writes
// activation buffer l & 1), then its loss.
fn run_model(first: u32, e: u32, k: u32, t: f32, tile: u32, rows: u32, row0: u32, lid: u32) {
    var x_base = row0 * width(0u);
    if P.shared_input == 0u {
        x_base = x_base + e * P.batch * width(0u);
    }
    for (var l = first; l < P.layers; l = l + 1u) {
        run_layer(l, layer_of(l, e, k, t), rows, x_base, false, lid);
    }
    tile_loss(e, tile, rows, row0, lid);
}

// Split scan, direction k: the first layer's parts once, then every model on k.
fn split_direction(k: u32, tile: u32, rows: u32, row0: u32, lid: u32) {
    let d1 = width(1u);
    run_layer(0u, layer_of(0u, 0u, k, 0.0), rows, row0 * width(0u), true, lid);
    let relu = P.layers > 1u;
    for (var e = 0u; e < P.models; e = e + 1u) {
        if !index_in_range(P.k_word + 2u * e, P.directions) {
            // Direction 0's workgroups answer for the models of no direction.
            if k == 0u {
                bad_model(e, tile, rows, row0, lid);
            }
            continue;
        }
        if data[P.k_word + 2u * e] != k {
            continue;
        }
        let t = bitcast<f32>(data[P.t_word + e]);
        let base = parts_base();
        for (var q = lid; q < rows * d1; q = q + WG) {
            act_set(0u, q, relu_of(scratch[base + q] + t * scratch[base + ROWS * d1 + q], relu));
        }
        storageBarrier();
        workgroupBarrier();
        run_model(1u, e, k, t, tile, rows, row0, lid);
    }
}

@compute @workgroup_size(256)
fn ensemble_mlp(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let group = wg.y * nwg.x + wg.x;
    if group >= P.launched {
        return;
    }
    scratch_base = group * P.scratch_stride;
    for (var item = group; item < P.work; item = item + P.launched) {
        let owner = item / P.tiles;
        let tile = item % P.tiles;
        let row0 = tile * ROWS;
        let rows = min(P.batch - row0, ROWS);
        if P.mode == SPLIT {
            split_direction(owner, tile, rows, row0, lid);
            continue;
        }
        var k = 0u;
        var t = 0.0;
        if P.mode == ROUNDED {
            if !index_in_range(P.k_word + 2u * owner, P.directions) {
                bad_model(owner, tile, rows, row0, lid);
                workgroupBarrier();
                continue;
            }
            k = data[P.k_word + 2u * owner];
            t = bitcast<f32>(data[P.t_word + owner]);
        }
        run_model(0u, owner, k, t, tile, rows, row0, lid);
    }
}

// --------------------------------------------------------------- per-model results

// f64 bits (lo, hi) of the two-float v = hi + lo, the low bits past 53 truncated.
fn f64_bits(v: vec2<f32>) -> vec2<u32> {
    // Normalised, |lo| <= ulp(hi) / 2, so hi + lo needs at most 53 bits from hi's top one.
    let n = two_sum(v.x, v.y);
    let hb = bitcast<u32>(n.x);
    let sign = hb & 0x80000000u;
    var eh = (hb >> 23u) & 0xffu;
    if eh == 0xffu {
        // Inf or NaN: the mantissa's top bit keeps a NaN a (quiet) NaN.
        return vec2<u32>(0u, sign | 0x7ff00000u | select(0u, 0x80000u, (hb & 0x7fffffu) != 0u));
    }
    if (hb & 0x7fffffffu) == 0u {
        return vec2<u32>(0u, sign);
    }
    var mh = hb & 0x7fffffu;
    if eh == 0u {
        eh = 1u;
    } else {
        mh = mh | 0x800000u;
    }
    // N = |hi| / 2^(eh - 179) = mh 2^29, as (high, low) words.
    var high = mh >> 3u;
    var low = (mh & 7u) << 29u;
    // lo's share in the same units, truncated; negative when lo's sign is not hi's.
    let lb = bitcast<u32>(n.y);
    let el = (lb >> 23u) & 0xffu;
    if (lb & 0x7fffffffu) != 0u && el != 0u {
        let ml = (lb & 0x7fffffu) | 0x800000u;
        let shift = i32(el) - i32(eh) + 29;
        var share = 0u;
        if shift >= 0 {
            share = ml << u32(shift);
        } else if shift > -32 {
            share = ml >> u32(-shift);
        }
        if (lb & 0x80000000u) == sign {
            let sum = low + share;
            high = high + select(0u, 1u, sum < low);
            low = sum;
        } else {
            high = high - select(0u, 1u, low < share);
            low = low - share;
        }
    }
    // Normalise N to 53 bits (its top one is at bit 52 or below).
    var top = firstLeadingBit(low);
    if high != 0u {
        top = 32u + firstLeadingBit(high);
    }
    let up = 52u - top;
    if up >= 32u {
        high = low << (up - 32u);
        low = 0u;
    } else if up > 0u {
        high = (high << up) | (low >> (32u - up));
        low = low << up;
    }
    // N 2^(eh - 179) = 1.f 2^(eh - 127 - up): biased exponent eh + 896 - up.
    let exponent = eh + 896u - up;
    return vec2<u32>(low, sign | (exponent << 20u) | (high & 0xfffffu));
}

// f64 bits (lo, hi) of n / d for 0 <= n <= d, d > 0, correctly rounded (to nearest even),
// by long division: the f64 division n as f64 / d as f64 of the reference.
fn ratio_bits(n: u32, d: u32) -> vec2<u32> {
    if n == 0u {
        return vec2<u32>(0u, 0u);
    }
    if n == d {
        return vec2<u32>(0u, 0x3ff00000u);
    }
    // n / d in (0, 1): its binary digits, the remainder r < d doubling each step (as
    // r >= d - r, so 2r never overflows).
    var r = n;
    var zeros = 0u;
    loop {
        let one = r >= d - r;
        r = select(r + r, r - (d - r), one);
        if one {
            break;
        }
        zeros = zeros + 1u;
    }
    // The leading one is 2^-(zeros + 1); 52 more digits, then the rounding digit.
    var high = 0u;
    var low = 0u;
    for (var i = 0u; i < 52u; i = i + 1u) {
        let one = r >= d - r;
        r = select(r + r, r - (d - r), one);
        high = (high << 1u) | (low >> 31u);
        low = (low << 1u) | select(0u, 1u, one);
    }
    let half = r >= d - r;
    let rest = select(r + r, r - (d - r), half);
    var exponent = 1022u - zeros;
    if half && (rest != 0u || (low & 1u) == 1u) {
        low = low + 1u;
        if low == 0u {
            high = high + 1u;
        }
        if high == 0x100000u {
            // 2^52 ulps: the next power of two.
            high = 0u;
            exponent = exponent + 1u;
        }
    }
    return vec2<u32>(low, (exponent << 20u) | high);
}

var<workgroup> fin_hi: array<f32, WG>;
var<workgroup> fin_lo: array<f32, WG>;
var<workgroup> fin_hits: array<u32, WG>;

fn add_counts(a: u32, b: u32) -> u32 {
    if a == NO_COUNT || b == NO_COUNT {
        return NO_COUNT;
    }
    return a + b;
}

// Model e's loss and accuracy from its slots: each invocation's tiles lid, lid + WG, ...,
// then a fixed tree.
@compute @workgroup_size(256)
fn ensemble_finalize(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let e = wg.y * nwg.x + wg.x;
    if e >= P.models {
        return;
    }
    var sum = vec2<f32>(0.0, 0.0);
    var hits = 0u;
    for (var t = lid; t < P.tiles; t = t + WG) {
        let at = slot_word(e, t);
        sum = df_add(sum, vec2<f32>(bitcast<f32>(work[at]), bitcast<f32>(work[at + 1u])));
        hits = add_counts(hits, work[at + 2u]);
    }
    fin_hi[lid] = sum.x;
    fin_lo[lid] = sum.y;
    fin_hits[lid] = hits;
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half = half / 2u) {
        if lid < half {
            let s = df_add(vec2<f32>(fin_hi[lid], fin_lo[lid]), vec2<f32>(fin_hi[lid + half], fin_lo[lid + half]));
            fin_hi[lid] = s.x;
            fin_lo[lid] = s.y;
            fin_hits[lid] = add_counts(fin_hits[lid], fin_hits[lid + half]);
        }
        workgroupBarrier();
    }
    if lid != 0u {
        return;
    }
    // B as an exact two-float: its top and bottom 16 bits are each exact in f32.
    let b = P.batch;
    let batch = fast_two_sum(f32(b & 0xffff0000u), f32(b & 0xffffu));
    let loss = f64_bits(df_div(vec2<f32>(fin_hi[0], fin_lo[0]), batch));
    var accuracy = vec2<u32>(0u, 0x7ff80000u);
    if fin_hits[0] != NO_COUNT {
        accuracy = ratio_bits(fin_hits[0], b);
    }
    let out = STATUS_WORDS + 2u * e;
    work[out] = loss.x;
    work[out + 1u] = loss.y;
    work[out + 2u * P.models] = accuracy.x;
    work[out + 2u * P.models + 1u] = accuracy.y;
}
