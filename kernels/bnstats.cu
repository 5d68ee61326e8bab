// bnstats.cu: batch-norm statistics, Welford partials, merge, running stats and the
// fused normalisation. Host side: src/cuda/bnstats.rs.
//
// Work split. x is seen in one of two shapes, chosen on the host from the layout:
// - rows: NCHW with H W > 1. Channel c is the sequence of its N segments of S = H W
//   contiguous elements; in units of VEC elements (VEC divides S) unit j of channel c
//   is at ((n C + c) S/VEC + s) with n = j / (S/VEC), s = j % (S/VEC).
// - cols: NHWC and NC (and NCHW with H W = 1): a matrix [R = N H W, C]; each thread
//   owns VEC adjacent channels (VEC divides C) and walks the rows, so a warp reads whole
//   rows of memory.
// Each channel's units are cut into `tiles` ranges of `per_tile` units, a tile is one
// block, and each block writes one Welford partial (count, mean, M2) per channel to
// scratch [tiles][C]. bn_finalize merges a channel's partials in f64 in a fixed tree.
// The cut depends only on the shape, so a result is bitwise the same on every run.
//
// Accuracy: no E[x^2] - E[x]^2. Every value is first shifted by its channel's first
// element (exact for data far from 0 with a small spread, by Sterbenz's lemma), so the
// means that the merges update are small and their roundings do not grow with the
// offset. A thread takes UNROLL units at a time, forms their mean and the sum of squared
// deviations from it in registers (two passes over registers), and merges that batch
// into its running partial by Chan's formula; blocks merge thread partials by Chan's
// formula in a fixed tree. Tile means stay relative to the shift; bn_finalize adds it
// back once, in f64.

#define BN_BLOCK 256
#define BN_UNROLL 8

struct BnTileArgs {
    const void* x;          // x in its dtype
    void* y;                // apply: y in x's dtype and layout
    float* tile_mean;       // stats: [tiles][C]
    float* tile_m2;         // stats: [tiles][C]
    const float* mean;      // apply: [C]
    const float* invstd;    // apply: [C]
    const float* gamma;     // apply: [C], or null for 1
    const float* beta;      // apply: [C], or null for 0
    lk_i64 units;           // rows: units per channel; cols: rows R
    lk_i64 per_tile;        // units (rows) per tile
    lk_i64 tiles;           // tiles per channel (rows) or per column group (cols)
    int channels;           // C
    int inner;              // rows: units per segment S / VEC; cols: vector columns C / VEC
    int col_threads;        // cols: threads across the vector columns (a power of 2, <= 32)
    int wide;               // 1: VEC = 16 bytes of elements, 0: VEC = 1
    float* shift;           // stats: [C], the first element of each channel
};
static_assert(sizeof(BnTileArgs) == 112, "BnTileArgs layout drifted from src/cuda/bnstats.rs");
LK_FIELD_AT(BnTileArgs, x, 0);
LK_FIELD_AT(BnTileArgs, y, 8);
LK_FIELD_AT(BnTileArgs, tile_mean, 16);
LK_FIELD_AT(BnTileArgs, tile_m2, 24);
LK_FIELD_AT(BnTileArgs, mean, 32);
LK_FIELD_AT(BnTileArgs, invstd, 40);
LK_FIELD_AT(BnTileArgs, gamma, 48);
LK_FIELD_AT(BnTileArgs, beta, 56);
LK_FIELD_AT(BnTileArgs, units, 64);
LK_FIELD_AT(BnTileArgs, per_tile, 72);
LK_FIELD_AT(BnTileArgs, tiles, 80);
LK_FIELD_AT(BnTileArgs, channels, 88);
LK_FIELD_AT(BnTileArgs, inner, 92);
LK_FIELD_AT(BnTileArgs, col_threads, 96);
LK_FIELD_AT(BnTileArgs, wide, 100);
LK_FIELD_AT(BnTileArgs, shift, 104);

struct BnFinalizeArgs {
    const float* part_mean;    // [parts][C]: relative to `shift`, or (merge) absolute
    const float* part_m2;      // [parts][C]
    const double* part_count;  // [parts], or null: tile counts from units / per_tile
    float* mean;               // [C]
    float* var_biased;         // [C]
    float* var_unbiased;       // [C]
    float* invstd;             // [C]
    float* m2;                 // [C]
    lk_i64 parts;
    lk_i64 units;              // without part_count: units per channel
    lk_i64 per_tile;           // without part_count: units per tile
    lk_i64 unit_elems;         // without part_count: elements per unit
    double eps;
    int channels;
    int pad;
    const float* shift;        // [C] the tiles' shift, or null (merge: no shift)
};
static_assert(sizeof(BnFinalizeArgs) == 120, "BnFinalizeArgs layout drifted from src/cuda/bnstats.rs");
LK_FIELD_AT(BnFinalizeArgs, part_mean, 0);
LK_FIELD_AT(BnFinalizeArgs, part_m2, 8);
LK_FIELD_AT(BnFinalizeArgs, part_count, 16);
LK_FIELD_AT(BnFinalizeArgs, mean, 24);
LK_FIELD_AT(BnFinalizeArgs, var_biased, 32);
LK_FIELD_AT(BnFinalizeArgs, var_unbiased, 40);
LK_FIELD_AT(BnFinalizeArgs, invstd, 48);
LK_FIELD_AT(BnFinalizeArgs, m2, 56);
LK_FIELD_AT(BnFinalizeArgs, parts, 64);
LK_FIELD_AT(BnFinalizeArgs, units, 72);
LK_FIELD_AT(BnFinalizeArgs, per_tile, 80);
LK_FIELD_AT(BnFinalizeArgs, unit_elems, 88);
LK_FIELD_AT(BnFinalizeArgs, eps, 96);
LK_FIELD_AT(BnFinalizeArgs, channels, 104);
LK_FIELD_AT(BnFinalizeArgs, pad, 108);
LK_FIELD_AT(BnFinalizeArgs, shift, 112);

struct BnRunningArgs {
    const float* running_mean;  // [C]
    const float* running_var;   // [C]
    const float* mean;          // [C] the batch's
    const float* var_unbiased;  // [C] the batch's
    float* new_mean;            // [C]
    float* new_var;             // [C]
    double factor;              // momentum, or 1 / num_batches_tracked
    int channels;
    int pad;
};
static_assert(sizeof(BnRunningArgs) == 64, "BnRunningArgs layout drifted from src/cuda/bnstats.rs");
LK_FIELD_AT(BnRunningArgs, running_mean, 0);
LK_FIELD_AT(BnRunningArgs, running_var, 8);
LK_FIELD_AT(BnRunningArgs, mean, 16);
LK_FIELD_AT(BnRunningArgs, var_unbiased, 24);
LK_FIELD_AT(BnRunningArgs, new_mean, 32);
LK_FIELD_AT(BnRunningArgs, new_var, 40);
LK_FIELD_AT(BnRunningArgs, factor, 48);
LK_FIELD_AT(BnRunningArgs, channels, 56);
LK_FIELD_AT(BnRunningArgs, pad, 60);

// ---------------------------------------------------------------------------
// Welford partials and Chan's merge.

struct bn_welford {
    float n, mean, m2;
};

struct bn_welford64 {
    double n, mean, m2;
};

// Chan's formula; an empty side would divide 0 by 0, so it is skipped.
template <typename W>
__device__ __forceinline__ W bn_merge(W a, W b) {
    if (b.n == 0) return a;
    if (a.n == 0) return b;
    W r;
    r.n = a.n + b.n;
    const auto d = b.mean - a.mean;
    const auto f = b.n / r.n;
    r.mean = a.mean + d * f;
    r.m2 = a.m2 + b.m2 + d * d * a.n * f;
    return r;
}

__device__ __forceinline__ bn_welford lk_shfl_down(const bn_welford& w, int offset) {
    bn_welford r;
    r.n = lk_shfl_down(w.n, offset);
    r.mean = lk_shfl_down(w.mean, offset);
    r.m2 = lk_shfl_down(w.m2, offset);
    return r;
}
__device__ __forceinline__ bn_welford lk_combine(const bn_welford& a, const bn_welford& b) {
    return bn_merge(a, b);
}
__device__ __forceinline__ bn_welford64 lk_shfl_down(const bn_welford64& w, int offset) {
    bn_welford64 r;
    r.n = lk_shfl_down(w.n, offset);
    r.mean = lk_shfl_down(w.mean, offset);
    r.m2 = lk_shfl_down(w.m2, offset);
    return r;
}
__device__ __forceinline__ bn_welford64 lk_combine(const bn_welford64& a, const bn_welford64& b) {
    return bn_merge(a, b);
}

// ---------------------------------------------------------------------------
// Vector access: VEC elements of T from an address aligned to VEC * sizeof(T), as
// floats; VEC * sizeof(T) is 16 bytes, or VEC is 1.

template <typename T, int VEC>
union bn_pack {
    lk_u32x4 words;
    T e[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void bn_load(const T* p, float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        v[0] = lk_to_f32(*p);
    } else {
        static_assert(VEC * sizeof(T) == 16, "a wide unit is 16 bytes");
        bn_pack<T, VEC> pack;
        pack.words = lk_ld_nc_v4(p);
#pragma unroll
        for (int i = 0; i < VEC; ++i) v[i] = lk_to_f32(pack.e[i]);
    }
}

template <typename T, int VEC>
__device__ __forceinline__ void bn_store(T* p, const float (&v)[VEC]) {
    if constexpr (VEC == 1) {
        *p = lk_from_f32<T>(v[0]);
    } else {
        bn_pack<T, VEC> pack;
#pragma unroll
        for (int i = 0; i < VEC; ++i) pack.e[i] = lk_from_f32<T>(v[i]);
        lk_st_cs_v4(p, pack.words);
    }
}

// The position (segment n, unit s in it) of a rows-mode unit, advanced by a fixed step
// without dividing: step = q inner + r with r < inner.
struct bn_cursor {
    lk_i64 n;
    int s;
};

__device__ __forceinline__ void bn_advance(bn_cursor& at, lk_i64 q, int r, int inner) {
    at.s += r;
    at.n += q;
    if (at.s >= inner) {
        at.s -= inner;
        at.n += 1;
    }
}

// ---------------------------------------------------------------------------
// Statistics, rows mode: one tile = one channel's units [t per_tile, (t + 1) per_tile).

template <typename T, int VEC>
__device__ void bn_stats_rows(const BnTileArgs& a) {
    const int threads = blockDim.x;
    const int tid = threadIdx.x;
    const lk_i64 channels = a.channels;
    const lk_i64 work = channels * a.tiles;
    const T* x = static_cast<const T*>(a.x);
    const lk_i64 step_q = threads / a.inner;
    const int step_r = threads % a.inner;
    for (lk_i64 w = blockIdx.x; w < work; w += gridDim.x) {
        const lk_i64 c = w % channels;
        const lk_i64 t = w / channels;
        const lk_i64 end = min(t * a.per_tile + a.per_tile, a.units);
        const float shift = lk_to_f32(x[c * a.inner * VEC]);
        lk_i64 j = t * a.per_tile + tid;
        bn_cursor at{j / a.inner, (int)(j % a.inner)};
        bn_welford acc{0.0f, 0.0f, 0.0f};
        for (; j < end; j += (lk_i64)BN_UNROLL * threads) {
            float v[BN_UNROLL][VEC];
            int valid = 0;
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                if (j + (lk_i64)u * threads < end) {
                    bn_load<T, VEC>(x + ((at.n * channels + c) * a.inner + at.s) * VEC, v[u]);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) v[u][i] -= shift;
                    valid = u + 1;
                }
                bn_advance(at, step_q, step_r, a.inner);
            }
            float sum = 0.0f;
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u)
#pragma unroll
                for (int i = 0; i < VEC; ++i) sum += u < valid ? v[u][i] : 0.0f;
            bn_welford batch;
            batch.n = (float)(valid * VEC);
            batch.mean = sum / batch.n;
            batch.m2 = 0.0f;
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u)
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const float d = v[u][i] - batch.mean;
                    batch.m2 = u < valid ? fmaf(d, d, batch.m2) : batch.m2;
                }
            acc = bn_merge(acc, batch);
        }
        // Ends with a barrier, so the next tile may reuse the shared partials.
        const bn_welford total = lk_block_reduce(acc, bn_welford{0.0f, 0.0f, 0.0f});
        if (tid == 0) {
            a.tile_mean[t * channels + c] = total.mean;
            a.tile_m2[t * channels + c] = total.m2;
            if (t == 0) a.shift[c] = shift;
        }
    }
}

// ---------------------------------------------------------------------------
// Statistics, cols mode: one tile = rows [t per_tile, (t + 1) per_tile) of one group of
// col_threads vector columns; thread (tr, tc) takes rows tr, tr + TR, ... of column tc.

template <typename T, int VEC>
__device__ void bn_stats_cols(const BnTileArgs& a) {
    __shared__ float shared_n[BN_BLOCK];
    __shared__ float shared_mean[BN_BLOCK * 8];
    __shared__ float shared_m2[BN_BLOCK * 8];
    const int threads = blockDim.x;
    const int tc = threadIdx.x % a.col_threads;
    const int tr = threadIdx.x / a.col_threads;
    const int row_threads = threads / a.col_threads;
    const lk_i64 groups = (a.inner + a.col_threads - 1) / a.col_threads;
    const lk_i64 work = groups * a.tiles;
    const lk_i64 channels = a.channels;
    const T* x = static_cast<const T*>(a.x);
    for (lk_i64 w = blockIdx.x; w < work; w += gridDim.x) {
        const lk_i64 column = (w % groups) * a.col_threads + tc;
        const lk_i64 t = w / groups;
        const bool active = column < a.inner;
        const lk_i64 end = min(t * a.per_tile + a.per_tile, a.units);
        float n = 0.0f;
        float mean[VEC], m2[VEC], shift[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) mean[i] = m2[i] = shift[i] = 0.0f;
        if (active) bn_load<T, VEC>(x + column * VEC, shift);
        for (lk_i64 r = t * a.per_tile + tr; active && r < end; r += (lk_i64)BN_UNROLL * row_threads) {
            float v[BN_UNROLL][VEC];
            int valid = 0;
#pragma unroll
            for (int u = 0; u < BN_UNROLL; ++u) {
                const lk_i64 row = r + (lk_i64)u * row_threads;
                if (row < end) {
                    bn_load<T, VEC>(x + row * channels + column * VEC, v[u]);
#pragma unroll
                    for (int i = 0; i < VEC; ++i) v[u][i] -= shift[i];
                    valid = u + 1;
                }
            }
            const float batch_n = (float)valid;
            const float merged_n = n + batch_n;
            const float share = batch_n / merged_n;
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                float sum = 0.0f;
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u) sum += u < valid ? v[u][i] : 0.0f;
                const float batch_mean = sum / batch_n;
                float batch_m2 = 0.0f;
#pragma unroll
                for (int u = 0; u < BN_UNROLL; ++u) {
                    const float d = v[u][i] - batch_mean;
                    batch_m2 = u < valid ? fmaf(d, d, batch_m2) : batch_m2;
                }
                const float d = batch_mean - mean[i];
                m2[i] = m2[i] + batch_m2 + d * d * n * share;
                mean[i] = mean[i] + d * share;
            }
            n = merged_n;
        }
        // Merge over the row threads of each column in a fixed tree through shared memory.
        shared_n[threadIdx.x] = n;
#pragma unroll
        for (int i = 0; i < VEC; ++i) {
            shared_mean[threadIdx.x * VEC + i] = mean[i];
            shared_m2[threadIdx.x * VEC + i] = m2[i];
        }
        __syncthreads();
        for (int half = row_threads / 2; half > 0; half /= 2) {
            if (tr < half) {
                const int lo = threadIdx.x, hi = threadIdx.x + half * a.col_threads;
                const float lo_n = shared_n[lo];
#pragma unroll
                for (int i = 0; i < VEC; ++i) {
                    const bn_welford merged =
                        bn_merge(bn_welford{lo_n, shared_mean[lo * VEC + i], shared_m2[lo * VEC + i]},
                                 bn_welford{shared_n[hi], shared_mean[hi * VEC + i], shared_m2[hi * VEC + i]});
                    shared_mean[lo * VEC + i] = merged.mean;
                    shared_m2[lo * VEC + i] = merged.m2;
                }
                shared_n[lo] = lo_n + shared_n[hi];
            }
            __syncthreads();
        }
        if (tr == 0 && active) {
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                a.tile_mean[t * channels + column * VEC + i] = shared_mean[tc * VEC + i];
                a.tile_m2[t * channels + column * VEC + i] = shared_m2[tc * VEC + i];
                if (t == 0) a.shift[column * VEC + i] = shift[i];
            }
        }
        __syncthreads();
    }
}

// ---------------------------------------------------------------------------
// Normalisation y = (x - mean) * (invstd * gamma) + beta, over the same tiles.

__device__ __forceinline__ void bn_affine(const BnTileArgs& a, lk_i64 c, float& mean, float& scale,
                                          float& shift) {
    mean = a.mean[c];
    scale = a.invstd[c] * (a.gamma ? a.gamma[c] : 1.0f);
    shift = a.beta ? a.beta[c] : 0.0f;
}

template <typename T, int VEC>
__device__ void bn_apply_rows(const BnTileArgs& a) {
    const int threads = blockDim.x;
    const lk_i64 channels = a.channels;
    const lk_i64 work = channels * a.tiles;
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    const lk_i64 step_q = threads / a.inner;
    const int step_r = threads % a.inner;
    for (lk_i64 w = blockIdx.x; w < work; w += gridDim.x) {
        const lk_i64 c = w % channels;
        const lk_i64 t = w / channels;
        float mean, scale, shift;
        bn_affine(a, c, mean, scale, shift);
        const lk_i64 end = min(t * a.per_tile + a.per_tile, a.units);
        lk_i64 j = t * a.per_tile + threadIdx.x;
        bn_cursor at{j / a.inner, (int)(j % a.inner)};
        for (; j < end; j += threads) {
            const lk_i64 at_elem = ((at.n * channels + c) * a.inner + at.s) * VEC;
            float v[VEC];
            bn_load<T, VEC>(x + at_elem, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = fmaf(v[i] - mean, scale, shift);
            bn_store<T, VEC>(y + at_elem, v);
            bn_advance(at, step_q, step_r, a.inner);
        }
    }
}

template <typename T, int VEC>
__device__ void bn_apply_cols(const BnTileArgs& a) {
    const int tc = threadIdx.x % a.col_threads;
    const int tr = threadIdx.x / a.col_threads;
    const int row_threads = blockDim.x / a.col_threads;
    const lk_i64 groups = (a.inner + a.col_threads - 1) / a.col_threads;
    const lk_i64 work = groups * a.tiles;
    const lk_i64 channels = a.channels;
    const T* x = static_cast<const T*>(a.x);
    T* y = static_cast<T*>(a.y);
    for (lk_i64 w = blockIdx.x; w < work; w += gridDim.x) {
        const lk_i64 column = (w % groups) * a.col_threads + tc;
        const lk_i64 t = w / groups;
        if (column >= a.inner) continue;
        float mean[VEC], scale[VEC], shift[VEC];
#pragma unroll
        for (int i = 0; i < VEC; ++i) bn_affine(a, column * VEC + i, mean[i], scale[i], shift[i]);
        const lk_i64 end = min(t * a.per_tile + a.per_tile, a.units);
        for (lk_i64 r = t * a.per_tile + tr; r < end; r += row_threads) {
            const lk_i64 at_elem = r * channels + column * VEC;
            float v[VEC];
            bn_load<T, VEC>(x + at_elem, v);
#pragma unroll
            for (int i = 0; i < VEC; ++i) v[i] = fmaf(v[i] - mean[i], scale[i], shift[i]);
            bn_store<T, VEC>(y + at_elem, v);
        }
    }
}

// ---------------------------------------------------------------------------
// Entry points: one per kind and dtype; `wide` picks the 16-byte or the 1-element unit
// (uniform over the launch).

#define BN_TILE_ENTRY(KIND, NAME, T)                                                       \
    extern "C" __global__ void __launch_bounds__(BN_BLOCK) NAME(const BnTileArgs a) {      \
        if (a.wide) {                                                                      \
            KIND<T, 16 / sizeof(T)>(a);                                                    \
        } else {                                                                           \
            KIND<T, 1>(a);                                                                 \
        }                                                                                  \
    }

BN_TILE_ENTRY(bn_stats_rows, bn_stats_rows_f32, float)
BN_TILE_ENTRY(bn_stats_rows, bn_stats_rows_f16, lk_f16)
BN_TILE_ENTRY(bn_stats_rows, bn_stats_rows_bf16, lk_bf16)
BN_TILE_ENTRY(bn_stats_cols, bn_stats_cols_f32, float)
BN_TILE_ENTRY(bn_stats_cols, bn_stats_cols_f16, lk_f16)
BN_TILE_ENTRY(bn_stats_cols, bn_stats_cols_bf16, lk_bf16)
BN_TILE_ENTRY(bn_apply_rows, bn_apply_rows_f32, float)
BN_TILE_ENTRY(bn_apply_rows, bn_apply_rows_f16, lk_f16)
BN_TILE_ENTRY(bn_apply_rows, bn_apply_rows_bf16, lk_bf16)
BN_TILE_ENTRY(bn_apply_cols, bn_apply_cols_f32, float)
BN_TILE_ENTRY(bn_apply_cols, bn_apply_cols_f16, lk_f16)
BN_TILE_ENTRY(bn_apply_cols, bn_apply_cols_bf16, lk_bf16)

// One warp per channel: lane l merges parts l, l + 32, ... in order (f64), then the warp
// merges the lanes in a fixed tree; lane 0 adds the shift back and writes the channel's
// statistics.
extern "C" __global__ void __launch_bounds__(BN_BLOCK) bn_finalize(const BnFinalizeArgs a) {
    const int lane = threadIdx.x % 32;
    const lk_i64 warps = (lk_i64)gridDim.x * (blockDim.x / 32);
    for (lk_i64 c = (lk_i64)blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32; c < a.channels;
         c += warps) {
        bn_welford64 acc{0.0, 0.0, 0.0};
        for (lk_i64 p = lane; p < a.parts; p += 32) {
            bn_welford64 part;
            part.n = a.part_count
                         ? a.part_count[p]
                         : (double)(min(a.per_tile, a.units - p * a.per_tile) * a.unit_elems);
            part.mean = a.part_mean[p * a.channels + c];  // exact in f64: no shift needed
            part.m2 = a.part_m2[p * a.channels + c];
            acc = bn_merge(acc, part);
        }
        const bn_welford64 total = lk_warp_reduce(acc, lk_combine_op());
        if (lane == 0) {
            const double var_biased = total.m2 / total.n;
            a.mean[c] = (float)(total.mean + (a.shift ? (double)a.shift[c] : 0.0));
            a.m2[c] = (float)total.m2;
            a.var_biased[c] = (float)var_biased;
            a.var_unbiased[c] = total.n > 1.0 ? (float)(total.m2 / (total.n - 1.0)) : LK_NAN_F;
            a.invstd[c] = (float)(1.0 / sqrt(var_biased + a.eps));
        }
    }
}

// rm' = (1 - f) rm + f mean, rv' = (1 - f) rv + f var_unbiased, in f64, one thread per channel.
extern "C" __global__ void __launch_bounds__(BN_BLOCK) bn_running(const BnRunningArgs a) {
    for (lk_i64 c = (lk_i64)blockIdx.x * blockDim.x + threadIdx.x; c < a.channels;
         c += (lk_i64)gridDim.x * blockDim.x) {
        const double keep = 1.0 - a.factor;
        a.new_mean[c] = (float)(keep * a.running_mean[c] + a.factor * a.mean[c]);
        a.new_var[c] = (float)(keep * a.running_var[c] + a.factor * a.var_unbiased[c]);
    }
}
