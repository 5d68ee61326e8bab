// energy.cu: two-sample energy distance and the engression / energy-score loss
// with its gradient, never materialising a distance matrix.
// Semantics: reference/src/energy.rs (the f64 definition) and DESIGN.md.
//
// Two-sample energy distance, in order on one stream:
//   energy_pairs_{f32,f16,bf16}  launched three times (X-Y, X-X, Y-Y): blocks
//                             of 64 rows of A against shared-memory tiles of
//                             64 rows of B, the d dimensions staged 32 at a
//                             time; each block owns one row tile and a chunk
//                             of up to 16 column tiles and writes the f64 sum
//                             of w_i w_j ||a_i - b_j||^beta over its pairs to
//                             its own scratch slot. For A = B only pairs
//                             i < j are summed (the diagonal is 0, the rest
//                             symmetric), so within-set terms cost half.
//                             A launch covers tiles [first, first + tiles):
//                             all of them on one device, a contiguous share
//                             on each rank of a sharded distance (src/nccl),
//                             whose gathered slots are the single-device ones.
//   energy_distance_merge     ONE block: sums the slots of each term in f64 in
//                             slot order (thread-strided, then the fixed
//                             tree), the weight totals, checks the weights and
//                             writes the four f32 outputs and the status word.
//
// Energy score, in order on one stream:
//   energy_score_{f32,f16,bf16}  one warp per prediction row (i, j) (8 rows per
//                             block, so a block holds several samples when m
//                             is small): lanes over k accumulate
//                             ||p_ij - p_ik||^2 for up to 512 k at a time in
//                             registers (p_ij is a broadcast load), lanes over
//                             the dimensions take ||p_ij - y_i||; the row's
//                             two sums go to f64 scratch. With the gradient,
//                             the pair coefficients of the 512 k wait in
//                             shared memory while the lanes, now over the
//                             dimensions, sum c h_k (p_ij - p_ik) in k order.
//   energy_score_merge        ONE block: term1, term2 and the loss from the
//                             per-row sums, in f64 in row order.
//
// Every sum has a fixed shape for a given problem (the grids are grid-strided
// and each tile or row writes its own slot), and no float atomics: the same
// input gives the same bits. The forward sums take the same path with and
// without the gradient. Distances are always taken from differences in f32.
// Offsets are 64-bit; d, m and the tile indices are 64-bit too.

#define EP_TILE 64
#define EP_DIMS 32
#define EP_CHUNK 16
#define EP_THREADS 256

#define ES_WARPS 8
#define ES_PER_LANE 16
#define ES_BATCH (32 * ES_PER_LANE)

// ||u||^beta from s = ||u||^2: exact shapes for beta = 1 and 2, else in f64
// so that the power adds one f32 rounding only.
__device__ __forceinline__ float energy_power(float s, int power, double beta) {
    if (power == 1) return sqrtf(s);
    if (power == 2) return s;
    return (float)pow((double)s, 0.5 * beta);
}

// beta ||u||^(beta - 2), the factor of u in d||u||^beta / du, with the
// sub-gradient 0 at u = 0 (NaN stays NaN).
__device__ __forceinline__ float energy_slope(float s, int power, double beta) {
    if (s == 0.0f) return 0.0f;
    if (power == 1) return 1.0f / sqrtf(s);
    if (power == 2) return 2.0f;
    return (float)(beta * pow((double)s, 0.5 * beta - 1.0));
}

// ---------------------------------------------------------------------------
// Pair sums of one term.

// Must match EnergyPairArgs in src/cuda/energy.rs field for field.
struct EnergyPairArgs {
    const void* a;     // [na, d] of T
    const void* b;     // [nb, d] of T
    const float* wa;   // [na] or null (uniform)
    const float* wb;   // [nb] or null
    double* partial;   // [tiles]: one slot per (row tile, column chunk)
    lk_i64 na;
    lk_i64 nb;
    lk_i64 d;
    lk_i64 chunks;     // column chunks per row tile
    lk_i64 tiles;      // tiles of this launch: [first, first + tiles) of row tiles * chunks
    double beta;
    int within;        // 1: b is a, only pairs i < j
    int power;         // 1: beta = 1, 2: beta = 2, 0: any other
    lk_i64 first;      // the first tile (0 but on one rank of a sharded distance)
};
LK_FIELD_AT(EnergyPairArgs, a, 0);
LK_FIELD_AT(EnergyPairArgs, b, 8);
LK_FIELD_AT(EnergyPairArgs, wa, 16);
LK_FIELD_AT(EnergyPairArgs, wb, 24);
LK_FIELD_AT(EnergyPairArgs, partial, 32);
LK_FIELD_AT(EnergyPairArgs, na, 40);
LK_FIELD_AT(EnergyPairArgs, nb, 48);
LK_FIELD_AT(EnergyPairArgs, d, 56);
LK_FIELD_AT(EnergyPairArgs, chunks, 64);
LK_FIELD_AT(EnergyPairArgs, tiles, 72);
LK_FIELD_AT(EnergyPairArgs, beta, 80);
LK_FIELD_AT(EnergyPairArgs, within, 88);
LK_FIELD_AT(EnergyPairArgs, power, 92);
LK_FIELD_AT(EnergyPairArgs, first, 96);
static_assert(sizeof(EnergyPairArgs) == 104, "EnergyPairArgs is 104 bytes in Rust");

// Stages dims [d0, d0 + dims) of rows [r0, r0 + 64) of `src` as tile[dim][row];
// rows past `rows` and dims past `dims` are 0. The index runs over the dims
// first, so a warp reads consecutive addresses of a row.
template <typename T>
__device__ __forceinline__ void energy_stage(float (*tile)[EP_TILE + 1], const T* src, lk_i64 rows,
                                             lk_i64 d, lk_i64 r0, lk_i64 d0, int dims) {
    for (int e = threadIdx.x; e < EP_TILE * dims; e += EP_THREADS) {
        const int row = e / dims;
        const int dim = e - row * dims;
        const lk_i64 r = r0 + row;
        tile[dim][row] = r < rows ? lk_to_f32(src[r * d + d0 + dim]) : 0.0f;
    }
}

// The weighted powered distances of one 64 x 64 tile, summed in f32 by each
// thread over its 4 x 4 pairs (rows ty + 16 r, columns tx + 16 c).
template <typename T>
__device__ __forceinline__ float energy_tile(const EnergyPairArgs& a, float (*as)[EP_TILE + 1],
                                             float (*bs)[EP_TILE + 1], lk_i64 r0, lk_i64 c0,
                                             const float (&wr)[4]) {
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;
    float s[4][4];
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
    }
    for (lk_i64 d0 = 0; d0 < a.d; d0 += EP_DIMS) {
        const int dims = (int)(a.d - d0 < EP_DIMS ? a.d - d0 : EP_DIMS);
        __syncthreads();  // the previous stage's reads are done
        energy_stage(as, (const T*)a.a, a.na, a.d, r0, d0, dims);
        energy_stage(bs, (const T*)a.b, a.nb, a.d, c0, d0, dims);
        __syncthreads();
#pragma unroll 4
        for (int k = 0; k < dims; ++k) {
            float av[4], bv[4];
#pragma unroll
            for (int r = 0; r < 4; ++r) av[r] = as[k][ty + 16 * r];
#pragma unroll
            for (int c = 0; c < 4; ++c) bv[c] = bs[k][tx + 16 * c];
#pragma unroll
            for (int r = 0; r < 4; ++r) {
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const float u = av[r] - bv[c];
                    s[r][c] = fmaf(u, u, s[r][c]);
                }
            }
        }
    }
    float sum = 0.0f;
#pragma unroll
    for (int c = 0; c < 4; ++c) {
        const lk_i64 j = c0 + tx + 16 * c;
        if (j >= a.nb) continue;
        const float wc = a.wb ? a.wb[j] : 1.0f;
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const lk_i64 i = r0 + ty + 16 * r;
            // Masked, not weighted by 0: a NaN distance outside the pairs must not leak in.
            if (i >= a.na || (a.within && i >= j)) continue;
            sum = fmaf(wr[r] * wc, energy_power(s[r][c], a.power, a.beta), sum);
        }
    }
    return sum;
}

template <typename T>
__device__ void energy_pairs(const EnergyPairArgs& a) {
    __shared__ float as[EP_DIMS][EP_TILE + 1];
    __shared__ float bs[EP_DIMS][EP_TILE + 1];
    const lk_i64 col_tiles = (a.nb + EP_TILE - 1) / EP_TILE;
    const int ty = threadIdx.x >> 4;
    for (lk_i64 slot = blockIdx.x; slot < a.tiles; slot += gridDim.x) {
        const lk_i64 t = a.first + slot;
        const lk_i64 row_tile = t / a.chunks;
        const lk_i64 chunk = t - row_tile * a.chunks;
        const lk_i64 r0 = row_tile * EP_TILE;
        lk_i64 first = chunk * EP_CHUNK;
        const lk_i64 end = first + EP_CHUNK < col_tiles ? first + EP_CHUNK : col_tiles;
        // Within a set, tiles left of the diagonal hold only pairs j < i.
        if (a.within && first < row_tile) first = row_tile;
        float wr[4];
#pragma unroll
        for (int r = 0; r < 4; ++r) {
            const lk_i64 i = r0 + ty + 16 * r;
            wr[r] = i < a.na ? (a.wa ? a.wa[i] : 1.0f) : 0.0f;
        }
        double acc = 0.0;
        for (lk_i64 tile = first; tile < end; ++tile) {
            acc += (double)energy_tile<T>(a, as, bs, r0, tile * EP_TILE, wr);
        }
        acc = lk_block_reduce(acc, 0.0, lk_sum_op());
        if (threadIdx.x == 0) a.partial[slot] = acc;
    }
}

extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_pairs_f32(const EnergyPairArgs a) {
    energy_pairs<float>(a);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_pairs_f16(const EnergyPairArgs a) {
    energy_pairs<lk_f16>(a);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_pairs_bf16(const EnergyPairArgs a) {
    energy_pairs<lk_bf16>(a);
}

// ---------------------------------------------------------------------------
// The distance from the three terms' slots.

// Must match EnergyMergeArgs in src/cuda/energy.rs field for field.
struct EnergyMergeArgs {
    const double* partial_xy;  // [tiles_xy] slots of each term
    const double* partial_xx;  // [tiles_xx]
    const double* partial_yy;  // [tiles_yy]
    const float* wx;        // [n] or null
    const float* wy;        // [m] or null
    float* distance;        // [1] each
    float* cross;
    float* within_x;
    float* within_y;
    unsigned long long* status;  // [1]: ENERGY_BAD_* bits, 0 when the weights are fine
    lk_i64 tiles_xy;
    lk_i64 tiles_xx;
    lk_i64 tiles_yy;
    lk_i64 n;
    lk_i64 m;
    int u_statistic;
    int pad_;
};
LK_FIELD_AT(EnergyMergeArgs, partial_xy, 0);
LK_FIELD_AT(EnergyMergeArgs, partial_xx, 8);
LK_FIELD_AT(EnergyMergeArgs, partial_yy, 16);
LK_FIELD_AT(EnergyMergeArgs, wx, 24);
LK_FIELD_AT(EnergyMergeArgs, wy, 32);
LK_FIELD_AT(EnergyMergeArgs, distance, 40);
LK_FIELD_AT(EnergyMergeArgs, cross, 48);
LK_FIELD_AT(EnergyMergeArgs, within_x, 56);
LK_FIELD_AT(EnergyMergeArgs, within_y, 64);
LK_FIELD_AT(EnergyMergeArgs, status, 72);
LK_FIELD_AT(EnergyMergeArgs, tiles_xy, 80);
LK_FIELD_AT(EnergyMergeArgs, tiles_xx, 88);
LK_FIELD_AT(EnergyMergeArgs, tiles_yy, 96);
LK_FIELD_AT(EnergyMergeArgs, n, 104);
LK_FIELD_AT(EnergyMergeArgs, m, 112);
LK_FIELD_AT(EnergyMergeArgs, u_statistic, 120);
LK_FIELD_AT(EnergyMergeArgs, pad_, 124);
static_assert(sizeof(EnergyMergeArgs) == 128, "EnergyMergeArgs is 128 bytes in Rust");

// Status bits, as spec::energy::weight_status_error reads them.
#define ENERGY_BAD_X 1ull   // weights_x holds a negative or non-finite value
#define ENERGY_ZERO_X 2ull  // weights_x is all 0
#define ENERGY_BAD_Y 4ull
#define ENERGY_ZERO_Y 8ull

// Sum and sum of squares of one set's weights, and whether one is bad.
struct EnergyWeights {
    double total, squares;
    bool bad;
};

__device__ EnergyWeights energy_weights(const float* w, lk_i64 len) {
    EnergyWeights r;
    if (!w) {
        r.total = (double)len;
        r.squares = (double)len;
        r.bad = false;
        return r;
    }
    double total = 0.0, squares = 0.0;
    int bad = 0;
    for (lk_i64 i = threadIdx.x; i < len; i += blockDim.x) {
        const float v = w[i];
        // Catches NaN too: every comparison with it is false.
        if (!(v >= 0.0f && v < LK_INF_F)) bad = 1;
        total += (double)v;
        squares += (double)v * (double)v;
    }
    r.total = lk_block_reduce(total, 0.0, lk_sum_op());
    r.squares = lk_block_reduce(squares, 0.0, lk_sum_op());
    r.bad = lk_block_reduce(bad, 0, lk_sum_op()) != 0;
    return r;
}

__device__ double energy_slot_sum(const double* slot, lk_i64 len) {
    double sum = 0.0;
    for (lk_i64 i = threadIdx.x; i < len; i += blockDim.x) sum += slot[i];
    return lk_block_reduce(sum, 0.0, lk_sum_op());
}

// The within-set mean from the sum over pairs i < j: ordered pairs count each
// twice. V divides by the weight of all pairs, U by that of the pairs i != j
// (no pair at all: 0, as the reference).
__device__ double energy_within(double half_sum, const EnergyWeights& w, int u_statistic) {
    const double all = w.total * w.total;
    if (!u_statistic) return 2.0 * half_sum / all;
    const double off_diagonal = all - w.squares;
    return off_diagonal == 0.0 ? 0.0 : 2.0 * half_sum / off_diagonal;
}

extern "C" __global__ void __launch_bounds__(1024) energy_distance_merge(const EnergyMergeArgs a) {
    const double xy = energy_slot_sum(a.partial_xy, a.tiles_xy);
    const double xx = energy_slot_sum(a.partial_xx, a.tiles_xx);
    const double yy = energy_slot_sum(a.partial_yy, a.tiles_yy);
    const EnergyWeights wx = energy_weights(a.wx, a.n);
    const EnergyWeights wy = energy_weights(a.wy, a.m);
    if (threadIdx.x != 0) return;
    unsigned long long status = 0;
    if (wx.bad) status |= ENERGY_BAD_X;
    else if (wx.total == 0.0) status |= ENERGY_ZERO_X;
    if (wy.bad) status |= ENERGY_BAD_Y;
    else if (wy.total == 0.0) status |= ENERGY_ZERO_Y;
    *a.status = status;
    if (status != 0) {
        *a.distance = LK_NAN_F;
        *a.cross = LK_NAN_F;
        *a.within_x = LK_NAN_F;
        *a.within_y = LK_NAN_F;
        return;
    }
    const double cross = xy / (wx.total * wy.total);
    const double within_x = energy_within(xx, wx, a.u_statistic);
    const double within_y = energy_within(yy, wy, a.u_statistic);
    *a.distance = (float)(2.0 * cross - within_x - within_y);
    *a.cross = (float)cross;
    *a.within_x = (float)within_x;
    *a.within_y = (float)within_y;
}

// ---------------------------------------------------------------------------
// Energy score.

// Must match EnergyScoreArgs in src/cuda/energy.rs field for field.
struct EnergyScoreArgs {
    const void* y;      // [n, d] of T
    const void* preds;  // [n, m, d] of T
    double* row_sums;   // [n * m, 2]: sum toward term1, sum over k > j toward term2
    float* grad;        // [n, m, d] or null
    lk_i64 n;
    lk_i64 m;
    lk_i64 d;
    double beta;
    float c1;           // d loss / d ||p_ij - y_i||^beta
    float c2;           // d loss / d ||p_ij - p_ik||^beta, both orders counted
    int power;
    int pad_;
};
LK_FIELD_AT(EnergyScoreArgs, y, 0);
LK_FIELD_AT(EnergyScoreArgs, preds, 8);
LK_FIELD_AT(EnergyScoreArgs, row_sums, 16);
LK_FIELD_AT(EnergyScoreArgs, grad, 24);
LK_FIELD_AT(EnergyScoreArgs, n, 32);
LK_FIELD_AT(EnergyScoreArgs, m, 40);
LK_FIELD_AT(EnergyScoreArgs, d, 48);
LK_FIELD_AT(EnergyScoreArgs, beta, 56);
LK_FIELD_AT(EnergyScoreArgs, c1, 64);
LK_FIELD_AT(EnergyScoreArgs, c2, 68);
LK_FIELD_AT(EnergyScoreArgs, power, 72);
LK_FIELD_AT(EnergyScoreArgs, pad_, 76);
static_assert(sizeof(EnergyScoreArgs) == 80, "EnergyScoreArgs is 80 bytes in Rust");

// ||p_ij - p_ik||^2 for the lane's k = k0 + lane + 32 q, q < count.
template <typename T>
__device__ __forceinline__ void energy_score_distances(const T* pj, const T* sample, lk_i64 d, lk_i64 k0,
                                                       int count, float (&acc)[ES_PER_LANE]) {
    const int lane = threadIdx.x & 31;
#pragma unroll
    for (int q = 0; q < ES_PER_LANE; ++q) acc[q] = 0.0f;
    for (lk_i64 dim = 0; dim < d; ++dim) {
        const float v = lk_to_f32(pj[dim]);
#pragma unroll
        for (int q = 0; q < ES_PER_LANE; ++q) {
            if (q >= count) break;
            const lk_i64 k = k0 + lane + 32 * q;
            const float u = v - lk_to_f32(sample[k * d + dim]);
            acc[q] = fmaf(u, u, acc[q]);
        }
    }
}

// The lanes' share of `slots` k this lane holds: ceil((span - lane) / 32).
__device__ __forceinline__ int energy_lane_count(lk_i64 span) {
    const lk_i64 lane = threadIdx.x & 31;
    return span > lane ? (int)((span - lane + 31) / 32) : 0;
}

template <typename T>
__device__ void energy_score_rows(const EnergyScoreArgs& a) {
    __shared__ float slope[ES_WARPS][ES_BATCH];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const lk_i64 rows = a.n * a.m;
    const lk_i64 d = a.d;
    const T* preds = (const T*)a.preds;
    const T* ys = (const T*)a.y;
    for (lk_i64 row = (lk_i64)blockIdx.x * ES_WARPS + warp; row < rows;
         row += (lk_i64)gridDim.x * ES_WARPS) {
        const lk_i64 i = row / a.m;
        const lk_i64 j = row - i * a.m;
        const T* pj = preds + row * d;
        const T* y = ys + i * d;
        const T* sample = preds + i * a.m * d;

        float s1 = 0.0f;
        for (lk_i64 dim = lane; dim < d; dim += 32) {
            const float u = lk_to_f32(pj[dim]) - lk_to_f32(y[dim]);
            s1 = fmaf(u, u, s1);
        }
        s1 = __shfl_sync(0xffffffffu, lk_warp_reduce(s1, lk_sum_op()), 0);
        const float h1 = a.c1 * energy_slope(s1, a.power, a.beta);

        float t2 = 0.0f;
        for (lk_i64 k0 = 0; k0 < a.m; k0 += ES_BATCH) {
            const lk_i64 span = a.m - k0 < ES_BATCH ? a.m - k0 : ES_BATCH;
            // Without the gradient only k > j count: a batch wholly at or below j is skipped
            // (it would add nothing to t2 either way, so t2 keeps its bits).
            if (!a.grad && k0 + span <= j + 1) continue;
            float acc[ES_PER_LANE];
            const int count = energy_lane_count(span);
            energy_score_distances(pj, sample, d, k0, count, acc);
#pragma unroll
            for (int q = 0; q < ES_PER_LANE; ++q) {
                if (q >= count) break;
                const int slot = lane + 32 * q;
                if (k0 + slot > j) t2 += energy_power(acc[q], a.power, a.beta);
                if (a.grad) slope[warp][slot] = energy_slope(acc[q], a.power, a.beta);
            }
            if (!a.grad) continue;
            __syncwarp();
            for (lk_i64 dim = lane; dim < d; dim += 32) {
                const float v = lk_to_f32(pj[dim]);
                float g = 0.0f;
                for (int slot = 0; slot < (int)span; ++slot) {
                    const float u = v - lk_to_f32(sample[(k0 + slot) * d + dim]);
                    g = fmaf(slope[warp][slot], u, g);
                }
                float* out = a.grad + row * d + dim;
                const float first = k0 == 0 ? h1 * (v - lk_to_f32(y[dim])) : *out;
                *out = fmaf(a.c2, g, first);
            }
            __syncwarp();  // the slopes are read before the next batch writes them
        }
        const double t2_sum = lk_warp_reduce((double)t2, lk_sum_op());
        if (lane == 0) {
            a.row_sums[2 * row] = (double)energy_power(s1, a.power, a.beta);
            a.row_sums[2 * row + 1] = t2_sum;
        }
    }
}

extern "C" __global__ void __launch_bounds__(ES_WARPS * 32) energy_score_f32(const EnergyScoreArgs a) {
    energy_score_rows<float>(a);
}
extern "C" __global__ void __launch_bounds__(ES_WARPS * 32) energy_score_f16(const EnergyScoreArgs a) {
    energy_score_rows<lk_f16>(a);
}
extern "C" __global__ void __launch_bounds__(ES_WARPS * 32) energy_score_bf16(const EnergyScoreArgs a) {
    energy_score_rows<lk_bf16>(a);
}

// Must match EnergyScoreMergeArgs in src/cuda/energy.rs field for field.
struct EnergyScoreMergeArgs {
    const double* row_sums;  // [rows, 2]
    float* term1;            // [1] each
    float* term2;
    float* loss;
    lk_i64 n;
    lk_i64 m;
};
LK_FIELD_AT(EnergyScoreMergeArgs, row_sums, 0);
LK_FIELD_AT(EnergyScoreMergeArgs, term1, 8);
LK_FIELD_AT(EnergyScoreMergeArgs, term2, 16);
LK_FIELD_AT(EnergyScoreMergeArgs, loss, 24);
LK_FIELD_AT(EnergyScoreMergeArgs, n, 32);
LK_FIELD_AT(EnergyScoreMergeArgs, m, 40);
static_assert(sizeof(EnergyScoreMergeArgs) == 48, "EnergyScoreMergeArgs is 48 bytes in Rust");

// term2 = -0.5 m / (m - 1) (sum over ordered pairs) / (n m^2), and the
// ordered sum is twice the k > j one the rows hold.
extern "C" __global__ void __launch_bounds__(1024) energy_score_merge(const EnergyScoreMergeArgs a) {
    const lk_i64 rows = a.n * a.m;
    double s1 = 0.0, s2 = 0.0;
    for (lk_i64 r = threadIdx.x; r < rows; r += blockDim.x) {
        s1 += a.row_sums[2 * r];
        s2 += a.row_sums[2 * r + 1];
    }
    s1 = lk_block_reduce(s1, 0.0, lk_sum_op());
    s2 = lk_block_reduce(s2, 0.0, lk_sum_op());
    if (threadIdx.x != 0) return;
    const double n = (double)a.n, m = (double)a.m;
    const double term1 = s1 / (n * m);
    const double term2 = a.m < 2 ? 0.0 : -(m / (m - 1.0)) * s2 / (n * m * m);
    *a.term1 = (float)term1;
    *a.term2 = (float)term2;
    *a.loss = (float)(term1 + term2);
}
