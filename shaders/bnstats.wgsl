// bnstats: batch-norm statistics, Welford partials, merge, running stats and the fused
// normalisation (semantics: reference/src/bnstats.rs). Host side: src/wgpu/bnstats.rs.
//
// Entry points, run in this order on one queue:
//   bn_stats_rows / bn_stats_cols  one workgroup per tile (the work split of
//                 kernels/bnstats.cu with one element per unit): a Welford partial per
//                 channel of the tile -> `tiles` ([tiles][C] means relative to the
//                 channel's shift, [tiles][C] M2s, then the [C] shifts).
//   bn_finalize   one invocation per channel: merges its partials in a fixed order (Chan's
//                 formula; the counts come from the tiling, or from `aux` for a merge of
//                 batches) and writes mean, var_biased, var_unbiased, invstd, M2 ->
//                 `stats` ([5][C]).
//   bn_apply      one invocation per 32-bit word of x: y = (x - mean) * invstd * gamma + beta
//                 in x's dtype; a word of two 16-bit elements is written whole, by one
//                 invocation, whatever channels its halves belong to.
//   bn_running    one invocation per channel: the running statistics from `aux`
//                 ([running mean, running var, batch mean, batch var_unbiased]) -> `stats`.
//
// No E[x^2] - E[x]^2. Every value is first shifted by its channel's first element (exact
// for data far from 0 with a small spread, by Sterbenz's lemma), so the means the merges
// update are small and their f32 roundings do not grow with the offset; bn_finalize adds
// the shift back once (a merge of batches shifts by its first batch's mean the same way).
// Each invocation takes UNROLL elements at a time, forms their mean
// and the sum of squared deviations from it, and merges that batch into its partial by
// Chan's formula; workgroups merge in a fixed tree. Every index is u32: the host binds x
// whole and refuses one over a binding (2 GiB). WGSL has no f64: the finalize merge runs
// in f32, which the family's tolerances (src/check/bnstats.rs) are derived for.

override X_DT: u32 = 0u;

const WG: u32 = 256u;
const UNROLL: u32 = 8u;

// Params.flags, as in src/wgpu/bnstats.rs.
const F_ROWS: u32 = 1u;
const F_GAMMA: u32 = 2u;
const F_BETA: u32 = 4u;
const F_COUNTS: u32 = 8u;

struct Params {
    units: u32,        // rows: elements per channel; cols: rows R
    per_tile: u32,     // units per tile
    tiles: u32,        // tiles per channel (rows) or per column group (cols)
    channels: u32,     // C
    inner: u32,        // rows: H W; cols: C
    col_threads: u32,  // cols: invocations across the channels (a power of 2, <= 32)
    parts: u32,        // finalize: partials per channel
    flags: u32,
    words: u32,        // apply: 32-bit words of x
    spatial: u32,      // apply: H W
    eps: f32,
    factor: f32,       // running: the momentum or 1 / num_batches_tracked
    nan_bits: u32,     // a quiet NaN, read from the uniform so no compiler folds it
    pad0: u32,
    pad1: u32,
    pad2: u32,
}

@group(0) @binding(0) var<uniform> P: Params;
@group(0) @binding(1) var<storage, read> x: array<u32>;
// gamma [C] then beta [C] (apply), the parts' counts (merge) or the running inputs.
@group(0) @binding(2) var<storage, read> aux: array<f32>;
@group(0) @binding(3) var<storage, read_write> tiles: array<f32>;
@group(0) @binding(4) var<storage, read_write> stats: array<f32>;
@group(0) @binding(5) var<storage, read_write> y: array<u32>;

struct Welford {
    n: f32,
    mean: f32,
    m2: f32,
}

// Chan's formula; an empty side would divide 0 by 0, so it is skipped.
fn merge(a: Welford, b: Welford) -> Welford {
    if b.n == 0.0 {
        return a;
    }
    if a.n == 0.0 {
        return b;
    }
    let n = a.n + b.n;
    let d = b.mean - a.mean;
    let f = b.n / n;
    return Welford(n, a.mean + d * f, a.m2 + b.m2 + d * d * a.n * f);
}

fn load(e: u32) -> f32 {
    if X_DT == DT_F32 {
        return bitcast<f32>(x[e]);
    }
    return bitcast<f32>(decode16(x[e >> 1u], e & 1u, X_DT));
}

// The statistics of up to UNROLL values (the first `valid`).
fn batch_of(v: array<f32, 8>, valid: u32) -> Welford {
    var sum = 0.0;
    for (var u = 0u; u < valid; u++) {
        sum += v[u];
    }
    let n = f32(valid);
    let mean = sum / n;
    var m2 = 0.0;
    for (var u = 0u; u < valid; u++) {
        let d = v[u] - mean;
        m2 = fma(d, d, m2);
    }
    return Welford(n, mean, m2);
}

var<workgroup> shared_n: array<f32, 256>;
var<workgroup> shared_mean: array<f32, 256>;
var<workgroup> shared_m2: array<f32, 256>;

fn share(lid: u32, w: Welford) {
    shared_n[lid] = w.n;
    shared_mean[lid] = w.mean;
    shared_m2[lid] = w.m2;
}

fn shared_at(i: u32) -> Welford {
    return Welford(shared_n[i], shared_mean[i], shared_m2[i]);
}

fn write_tile(t: u32, c: u32, w: Welford, shift: f32) {
    let at = t * P.channels + c;
    tiles[at] = w.mean;
    tiles[P.tiles * P.channels + at] = w.m2;
    if t == 0u {
        tiles[2u * P.tiles * P.channels + c] = shift;
    }
}

// Rows mode: tile t of channel c = its elements [t per_tile, (t + 1) per_tile), element j
// at (n C + c) H W + s for n = j / (H W), s = j % (H W).
@compute @workgroup_size(256)
fn bn_stats_rows(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = wg.y * nwg.x + wg.x;
    if w >= P.channels * P.tiles {
        return;
    }
    let c = w % P.channels;
    let t = w / P.channels;
    let end = min(t * P.per_tile + P.per_tile, P.units);
    let step_q = WG / P.inner;
    let step_r = WG % P.inner;
    let shift = load(c * P.inner);
    var j = t * P.per_tile + lid;
    var n = j / P.inner;
    var s = j % P.inner;
    var acc = Welford(0.0, 0.0, 0.0);
    while j < end {
        var v: array<f32, 8>;
        var valid = 0u;
        for (var u = 0u; u < UNROLL; u++) {
            if j + u * WG < end {
                v[u] = load((n * P.channels + c) * P.inner + s) - shift;
                valid = u + 1u;
            }
            s += step_r;
            n += step_q;
            if s >= P.inner {
                s -= P.inner;
                n += 1u;
            }
        }
        acc = merge(acc, batch_of(v, valid));
        j += UNROLL * WG;
    }
    share(lid, acc);
    workgroupBarrier();
    for (var half = WG / 2u; half > 0u; half /= 2u) {
        if lid < half {
            share(lid, merge(shared_at(lid), shared_at(lid + half)));
        }
        workgroupBarrier();
    }
    if lid == 0u {
        write_tile(t, c, shared_at(0u), shift);
    }
}

// Cols mode: x is [R, C]; invocation (tr, tc) of a workgroup takes rows tr, tr + TR, ...
// of the tile's rows for channel (group g) col_threads + tc.
@compute @workgroup_size(256)
fn bn_stats_cols(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let groups = (P.inner + P.col_threads - 1u) / P.col_threads;
    let w = wg.y * nwg.x + wg.x;
    if w >= groups * P.tiles {
        return;
    }
    let tc = lid % P.col_threads;
    let tr = lid / P.col_threads;
    let row_threads = WG / P.col_threads;
    let c = (w % groups) * P.col_threads + tc;
    let t = w / groups;
    let end = min(t * P.per_tile + P.per_tile, P.units);
    var acc = Welford(0.0, 0.0, 0.0);
    var shift = 0.0;
    if c < P.inner {
        shift = load(c);
        for (var r = t * P.per_tile + tr; r < end; r += UNROLL * row_threads) {
            var v: array<f32, 8>;
            var valid = 0u;
            for (var u = 0u; u < UNROLL; u++) {
                let row = r + u * row_threads;
                if row < end {
                    v[u] = load(row * P.channels + c) - shift;
                    valid = u + 1u;
                }
            }
            acc = merge(acc, batch_of(v, valid));
        }
    }
    share(lid, acc);
    workgroupBarrier();
    for (var half = row_threads / 2u; half > 0u; half /= 2u) {
        if tr < half {
            share(lid, merge(shared_at(lid), shared_at(lid + half * P.col_threads)));
        }
        workgroupBarrier();
    }
    if tr == 0u && c < P.inner {
        write_tile(t, c, shared_at(lid), shift);
    }
}

fn global_index(wg: vec3<u32>, nwg: vec3<u32>, lid: u32) -> u32 {
    return (wg.y * nwg.x + wg.x) * WG + lid;
}

@compute @workgroup_size(256)
fn bn_finalize(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = global_index(wg, nwg, lid);
    let channels = P.channels;
    if c >= channels {
        return;
    }
    let merging = (P.flags & F_COUNTS) != 0u;
    // The tiles' means are relative to the channel's shift; a merge's are absolute and
    // are taken relative to the first part that has elements.
    var shift = 0.0;
    if merging {
        for (var p = 0u; p < P.parts; p++) {
            if aux[p] > 0.0 {
                shift = tiles[p * channels + c];
                break;
            }
        }
    } else {
        shift = tiles[2u * P.parts * channels + c];
    }
    var acc = Welford(0.0, 0.0, 0.0);
    for (var p = 0u; p < P.parts; p++) {
        var n = f32(min(P.per_tile, P.units - p * P.per_tile));
        var mean = tiles[p * channels + c];
        if merging {
            n = aux[p];
            mean -= shift;
        }
        acc = merge(acc, Welford(n, mean, tiles[P.parts * channels + p * channels + c]));
    }
    let var_biased = acc.m2 / acc.n;
    stats[c] = shift + acc.mean;
    stats[channels + c] = var_biased;
    stats[2u * channels + c] = select(bitcast<f32>(P.nan_bits), acc.m2 / (acc.n - 1.0), acc.n > 1.0);
    stats[3u * channels + c] = inverseSqrt(var_biased + P.eps);
    stats[4u * channels + c] = acc.m2;
}

fn channel_of(e: u32) -> u32 {
    if (P.flags & F_ROWS) != 0u {
        return (e / P.spatial) % P.channels;
    }
    return e % P.channels;
}

fn normalized(e: u32) -> f32 {
    let c = channel_of(e);
    let channels = P.channels;
    var scale = stats[3u * channels + c];
    if (P.flags & F_GAMMA) != 0u {
        scale *= aux[c];
    }
    var shift = 0.0;
    if (P.flags & F_BETA) != 0u {
        shift = aux[channels + c];
    }
    return fma(load(e) - stats[c], scale, shift);
}

@compute @workgroup_size(256)
fn bn_apply(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let w = global_index(wg, nwg, lid);
    if w >= P.words {
        return;
    }
    if X_DT == DT_F32 {
        y[w] = bitcast<u32>(normalized(w));
        return;
    }
    // The high half of the last word is padding when x has an odd number of elements.
    let elements = P.units * P.channels;
    let lo = encode16(bitcast<u32>(normalized(2u * w)), X_DT);
    var hi = 0u;
    if 2u * w + 1u < elements {
        hi = encode16(bitcast<u32>(normalized(2u * w + 1u)), X_DT);
    }
    y[w] = lo | (hi << 16u);
}

@compute @workgroup_size(256)
fn bn_running(
    @builtin(workgroup_id) wg: vec3<u32>,
    @builtin(num_workgroups) nwg: vec3<u32>,
    @builtin(local_invocation_index) lid: u32,
) {
    let c = global_index(wg, nwg, lid);
    let channels = P.channels;
    if c >= channels {
        return;
    }
    let keep = 1.0 - P.factor;
    stats[c] = keep * aux[c] + P.factor * aux[2u * channels + c];
    stats[channels + c] = keep * aux[channels + c] + P.factor * aux[3u * channels + c];
}
