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
//                             writes the four f32 outputs, the status word and
//                             the gradient's four term coefficients.
//   energy_grad_{f32,f16,bf16}   with the gradient, four launches (X against Y,
//                             X against X, Y against X, Y against Y): a block owns
//                             64 rows x 64 dims of one set's gradient and walks
//                             every column tile of the other set in order, the
//                             pair slopes in shared memory, f32 per tile, f64
//                             across tiles; the second launch of a set adds to
//                             the first's rows.
//
// Energy score, in order on one stream:
//   energy_score_{f32,f16,bf16}  a block per 64 prediction rows (several samples
//                             when m < 64, part of one when m > 64) and, with
//                             the gradient, 64 of their dims: the 64 x 64
//                             pair tiles of the rows' samples staged through
//                             shared memory (pairs of different samples
//                             masked), sum_{k > j} ||p_ij - p_ik||^beta per
//                             row; with the gradient the pair slopes wait in
//                             shared memory while the lanes, over the dims,
//                             sum h_jk (p_ij - p_ik) in k order (as
//                             energy_grad); warps over the dims take
//                             ||p_ij - y_i||. The tile's two sums (fixed
//                             block tree) go to f64 scratch.
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

// The squared distances of one thread's 4 x 4 pairs of a 64 x 64 tile (rows
// ty + 16 r of A from r0, columns tx + 16 c of B from c0), over all d dims.
template <typename T>
__device__ __forceinline__ void energy_tile_squares(const void* a_rows, lk_i64 na, const void* b_rows,
                                                    lk_i64 nb, lk_i64 d, float (*as)[EP_TILE + 1],
                                                    float (*bs)[EP_TILE + 1], lk_i64 r0, lk_i64 c0,
                                                    float (&s)[4][4]) {
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;
#pragma unroll
    for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 4; ++c) s[r][c] = 0.0f;
    }
    for (lk_i64 d0 = 0; d0 < d; d0 += EP_DIMS) {
        const int dims = (int)(d - d0 < EP_DIMS ? d - d0 : EP_DIMS);
        __syncthreads();  // the previous stage's reads are done
        energy_stage(as, (const T*)a_rows, na, d, r0, d0, dims);
        energy_stage(bs, (const T*)b_rows, nb, d, c0, d0, dims);
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
}

// The weighted powered distances of one 64 x 64 tile, summed in f32 by each
// thread over its 4 x 4 pairs.
template <typename T>
__device__ __forceinline__ float energy_tile(const EnergyPairArgs& a, float (*as)[EP_TILE + 1],
                                             float (*bs)[EP_TILE + 1], lk_i64 r0, lk_i64 c0,
                                             const float (&wr)[4]) {
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;
    float s[4][4];
    energy_tile_squares<T>(a.a, a.na, a.b, a.nb, a.d, as, bs, r0, c0, s);
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
    double* coef;           // [4]: the gradient's term coefficients (EnergyGradArgs::coef)
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
LK_FIELD_AT(EnergyMergeArgs, coef, 80);
LK_FIELD_AT(EnergyMergeArgs, tiles_xy, 88);
LK_FIELD_AT(EnergyMergeArgs, tiles_xx, 96);
LK_FIELD_AT(EnergyMergeArgs, tiles_yy, 104);
LK_FIELD_AT(EnergyMergeArgs, n, 112);
LK_FIELD_AT(EnergyMergeArgs, m, 120);
LK_FIELD_AT(EnergyMergeArgs, u_statistic, 128);
LK_FIELD_AT(EnergyMergeArgs, pad_, 132);
static_assert(sizeof(EnergyMergeArgs) == 136, "EnergyMergeArgs is 136 bytes in Rust");

// Slots of the merge's gradient coefficients, in raw (unnormalised) weights: the
// cross term 2 / (W_x W_y) and the within terms -2 / P (P = W^2 for V, W^2 - sum w^2
// for U), as EnergyGradArgs::coef_index picks them.
#define ENERGY_COEF_X_CROSS 0
#define ENERGY_COEF_X_WITHIN 1
#define ENERGY_COEF_Y_CROSS 2
#define ENERGY_COEF_Y_WITHIN 3

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

// The factor of sum_k w_i w_k g(x_i - x_k) in d distance / dx_i: -2 over the weight the
// within-set sum was divided by (0 for a U statistic without pairs).
__device__ double energy_within_coef(const EnergyWeights& w, int u_statistic) {
    const double divisor = u_statistic ? w.total * w.total - w.squares : w.total * w.total;
    return divisor == 0.0 ? 0.0 : -2.0 / divisor;
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
        for (int t = 0; t < 4; ++t) a.coef[t] = (double)LK_NAN_F;
        *a.distance = LK_NAN_F;
        *a.cross = LK_NAN_F;
        *a.within_x = LK_NAN_F;
        *a.within_y = LK_NAN_F;
        return;
    }
    a.coef[ENERGY_COEF_X_CROSS] = 2.0 / (wx.total * wy.total);
    a.coef[ENERGY_COEF_X_WITHIN] = energy_within_coef(wx, a.u_statistic);
    a.coef[ENERGY_COEF_Y_CROSS] = 2.0 / (wx.total * wy.total);
    a.coef[ENERGY_COEF_Y_WITHIN] = energy_within_coef(wy, a.u_statistic);
    const double cross = xy / (wx.total * wy.total);
    const double within_x = energy_within(xx, wx, a.u_statistic);
    const double within_y = energy_within(yy, wy, a.u_statistic);
    *a.distance = (float)(2.0 * cross - within_x - within_y);
    *a.cross = (float)cross;
    *a.within_x = (float)within_x;
    *a.within_y = (float)within_y;
}

// ---------------------------------------------------------------------------
// The distance's gradient, one term (a set's rows against one set) per launch.

// Must match EnergyGradArgs in src/cuda/energy.rs field for field.
struct EnergyGradArgs {
    const void* a;       // [na, d] of T: the rows whose gradient this is
    const void* b;       // [nb, d] of T
    const float* wa;     // [na] or null (uniform)
    const float* wb;     // [nb] or null
    const double* coef;  // [4] from energy_distance_merge
    float* grad;         // [na, d]
    lk_i64 na;
    lk_i64 nb;
    lk_i64 d;
    lk_i64 dim_chunks;   // EG_DIMS-dimension chunks of d
    lk_i64 tiles;        // row tiles * dim_chunks
    double beta;
    int coef_index;      // ENERGY_COEF_*
    int power;
    int accumulate;      // 1: add to grad (the set's second term), 0: write it
    int pad_;
};
LK_FIELD_AT(EnergyGradArgs, a, 0);
LK_FIELD_AT(EnergyGradArgs, b, 8);
LK_FIELD_AT(EnergyGradArgs, wa, 16);
LK_FIELD_AT(EnergyGradArgs, wb, 24);
LK_FIELD_AT(EnergyGradArgs, coef, 32);
LK_FIELD_AT(EnergyGradArgs, grad, 40);
LK_FIELD_AT(EnergyGradArgs, na, 48);
LK_FIELD_AT(EnergyGradArgs, nb, 56);
LK_FIELD_AT(EnergyGradArgs, d, 64);
LK_FIELD_AT(EnergyGradArgs, dim_chunks, 72);
LK_FIELD_AT(EnergyGradArgs, tiles, 80);
LK_FIELD_AT(EnergyGradArgs, beta, 88);
LK_FIELD_AT(EnergyGradArgs, coef_index, 96);
LK_FIELD_AT(EnergyGradArgs, power, 100);
LK_FIELD_AT(EnergyGradArgs, accumulate, 104);
LK_FIELD_AT(EnergyGradArgs, pad_, 108);
static_assert(sizeof(EnergyGradArgs) == 112, "EnergyGradArgs is 112 bytes in Rust");

#define EG_DIMS 64
#define EG_HALVES (EG_DIMS / EP_DIMS)
#define EG_ROWS_PER_WARP (EP_TILE / (EP_THREADS / 32))

// acc[h][q] += sum_j slopes[row][j] (a_row - b_j) over the 64 staged columns from c0, for
// warp w's rows row = w + 8 q and dims g0 + 32 h + lane, summed in f32 in j order per
// call. The caller has written `slopes` (read after the first barrier here).
template <typename T>
__device__ __forceinline__ void energy_slope_sums(const void* a_rows, lk_i64 na, const void* b_rows,
                                                  lk_i64 nb, lk_i64 d, lk_i64 r0, lk_i64 c0, lk_i64 g0,
                                                  float (*as)[EP_TILE + 1], float (*bs)[EP_TILE + 1],
                                                  float (*slopes)[EP_TILE + 1],
                                                  double (&acc)[EG_HALVES][EG_ROWS_PER_WARP]) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
#pragma unroll
    for (int h = 0; h < EG_HALVES; ++h) {
        const lk_i64 d0 = g0 + h * EP_DIMS;
        if (d0 >= d) break;
        const int dims = (int)(d - d0 < EP_DIMS ? d - d0 : EP_DIMS);
        __syncthreads();  // slopes written, the last stage's reads done
        energy_stage(as, (const T*)a_rows, na, d, r0, d0, dims);
        energy_stage(bs, (const T*)b_rows, nb, d, c0, d0, dims);
        __syncthreads();
        if (lane >= dims) continue;
#pragma unroll
        for (int q = 0; q < EG_ROWS_PER_WARP; ++q) {
            const int row = warp + 8 * q;
            const float av = as[lane][row];
            float g = 0.0f;
#pragma unroll 8
            for (int j = 0; j < EP_TILE; ++j) g = fmaf(slopes[row][j], av - bs[lane][j], g);
            acc[h][q] += (double)g;
        }
    }
}

// sum_j w_j g(a_i - b_j) for a 64-row tile of A and EG_DIMS of its dims, over every
// column tile of B in order: per tile, the pair slopes (from the full-d distances)
// wait in shared memory while warp w's lanes, over 32 dims at a time, sum
// slope_ij (a_i - b_j) for rows w + 8 q in j order; each tile's f32 sum is added to an
// f64 accumulator. Differences, never a_i sum_j c_ij - sum_j c_ij b_j, which would
// cancel for offset data. A block owns its (rows, dims) of grad: no atomics.
template <typename T>
__device__ void energy_grad(const EnergyGradArgs& a) {
    __shared__ float as[EP_DIMS][EP_TILE + 1];
    __shared__ float bs[EP_DIMS][EP_TILE + 1];
    __shared__ float slopes[EP_TILE][EP_TILE + 1];
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const lk_i64 col_tiles = (a.nb + EP_TILE - 1) / EP_TILE;
    const double coef = a.coef[a.coef_index];
    for (lk_i64 t = blockIdx.x; t < a.tiles; t += gridDim.x) {
        const lk_i64 row_tile = t / a.dim_chunks;
        const lk_i64 g0 = (t - row_tile * a.dim_chunks) * EG_DIMS;
        const lk_i64 r0 = row_tile * EP_TILE;
        double acc[EG_HALVES][EG_ROWS_PER_WARP];
#pragma unroll
        for (int h = 0; h < EG_HALVES; ++h) {
#pragma unroll
            for (int q = 0; q < EG_ROWS_PER_WARP; ++q) acc[h][q] = 0.0;
        }
        for (lk_i64 tile = 0; tile < col_tiles; ++tile) {
            const lk_i64 c0 = tile * EP_TILE;
            float s[4][4];
            energy_tile_squares<T>(a.a, a.na, a.b, a.nb, a.d, as, bs, r0, c0, s);
            // The distance loop's barriers order the previous tile's slope reads first.
#pragma unroll
            for (int c = 0; c < 4; ++c) {
                const lk_i64 j = c0 + tx + 16 * c;
                const float wc = j < a.nb ? (a.wb ? a.wb[j] : 1.0f) : 0.0f;
#pragma unroll
                for (int r = 0; r < 4; ++r) {
                    const bool pair = r0 + ty + 16 * r < a.na && j < a.nb;
                    slopes[ty + 16 * r][tx + 16 * c] =
                        pair ? wc * energy_slope(s[r][c], a.power, a.beta) : 0.0f;
                }
            }
            energy_slope_sums<T>(a.a, a.na, a.b, a.nb, a.d, r0, c0, g0, as, bs, slopes, acc);
        }
#pragma unroll
        for (int h = 0; h < EG_HALVES; ++h) {
            const lk_i64 dim = g0 + h * EP_DIMS + lane;
            if (dim >= a.d) break;
#pragma unroll
            for (int q = 0; q < EG_ROWS_PER_WARP; ++q) {
                const lk_i64 i = r0 + warp + 8 * q;
                if (i >= a.na) break;
                const double wi = a.wa ? (double)a.wa[i] : 1.0;
                const float v = (float)(coef * wi * acc[h][q]);
                float* out = a.grad + i * a.d + dim;
                *out = a.accumulate ? *out + v : v;
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_grad_f32(const EnergyGradArgs a) {
    energy_grad<float>(a);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_grad_f16(const EnergyGradArgs a) {
    energy_grad<lk_f16>(a);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_grad_bf16(const EnergyGradArgs a) {
    energy_grad<lk_bf16>(a);
}

// ---------------------------------------------------------------------------
// Energy score.

// Must match EnergyScoreArgs in src/cuda/energy.rs field for field.
struct EnergyScoreArgs {
    const void* y;      // [n, d] of T
    const void* preds;  // [n, m, d] of T
    double* tile_sums;  // [row tiles, 2]: sum toward term1, sum over k > j toward term2
    float* grad;        // [n, m, d] or null
    lk_i64 n;
    lk_i64 m;
    lk_i64 d;
    double beta;
    float c1;           // d loss / d ||p_ij - y_i||^beta
    float c2;           // d loss / d ||p_ij - p_ik||^beta, both orders counted
    int power;
    int pad_;
    lk_i64 dim_chunks;  // EG_DIMS-dimension chunks of the gradient (1 without it)
    lk_i64 tiles;       // 64-row tiles of the n m prediction rows * dim_chunks
};
LK_FIELD_AT(EnergyScoreArgs, y, 0);
LK_FIELD_AT(EnergyScoreArgs, preds, 8);
LK_FIELD_AT(EnergyScoreArgs, tile_sums, 16);
LK_FIELD_AT(EnergyScoreArgs, grad, 24);
LK_FIELD_AT(EnergyScoreArgs, n, 32);
LK_FIELD_AT(EnergyScoreArgs, m, 40);
LK_FIELD_AT(EnergyScoreArgs, d, 48);
LK_FIELD_AT(EnergyScoreArgs, beta, 56);
LK_FIELD_AT(EnergyScoreArgs, c1, 64);
LK_FIELD_AT(EnergyScoreArgs, c2, 68);
LK_FIELD_AT(EnergyScoreArgs, power, 72);
LK_FIELD_AT(EnergyScoreArgs, pad_, 76);
LK_FIELD_AT(EnergyScoreArgs, dim_chunks, 80);
LK_FIELD_AT(EnergyScoreArgs, tiles, 88);
static_assert(sizeof(EnergyScoreArgs) == 96, "EnergyScoreArgs is 96 bytes in Rust");

// ||p_r - y_i||^2 of warp w's rows r0 + w + 8 q (lanes over the dims, every lane holds
// the sum), 0 past the rows.
template <typename T>
__device__ __forceinline__ void energy_target_squares(const EnergyScoreArgs& a, lk_i64 r0,
                                                      float (&s1)[EG_ROWS_PER_WARP]) {
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const lk_i64 rows = a.n * a.m;
    const T* preds = (const T*)a.preds;
    const T* ys = (const T*)a.y;
#pragma unroll
    for (int q = 0; q < EG_ROWS_PER_WARP; ++q) {
        const lk_i64 row = r0 + warp + 8 * q;
        float sum = 0.0f;
        if (row < rows) {
            const T* p = preds + row * a.d;
            const T* y = ys + (row / a.m) * a.d;
            for (lk_i64 dim = lane; dim < a.d; dim += 32) {
                const float u = lk_to_f32(p[dim]) - lk_to_f32(y[dim]);
                sum = fmaf(u, u, sum);
            }
        }
        s1[q] = __shfl_sync(0xffffffffu, lk_warp_reduce(sum, lk_sum_op()), 0);
    }
}

// The sample of prediction row `row` counted from `base` (a sample's first row at or
// below it): a 32-bit division where the numbers fit, as they do for every realistic
// m, since 64-bit division is a long instruction sequence.
__device__ __forceinline__ lk_i64 energy_sample_from(lk_i64 row, lk_i64 base, lk_i64 m) {
    const lk_i64 offset = row - base;
    if (m <= 0xffffffffll && offset <= 0xffffffffll) {
        return (lk_i64)((unsigned int)offset / (unsigned int)m);
    }
    return offset / m;
}

// The pairs of one 64 x 64 tile of prediction rows (rows from r0, columns from c0, both
// within [c0, c_end)): a pair counts when both rows are of the same sample. Adds each
// thread's share of sum_{c > r} ||p_r - p_c||^beta to t2 (f32 per tile) and, with the
// gradient, writes the pair slopes.
template <typename T>
__device__ __forceinline__ void energy_score_tile(const EnergyScoreArgs& a, lk_i64 r0, lk_i64 c0,
                                                  lk_i64 c_end, float (*as)[EP_TILE + 1],
                                                  float (*bs)[EP_TILE + 1],
                                                  float (*slopes)[EP_TILE + 1], double (&t2)[4]) {
    const int tx = threadIdx.x & 15;
    const int ty = threadIdx.x >> 4;
    const lk_i64 rows = a.n * a.m;
    float s[4][4];
    energy_tile_squares<T>(a.preds, rows, a.preds, c_end, a.d, as, bs, r0, c0, s);
    const lk_i64 base = (r0 / a.m) * a.m;
    lk_i64 column_sample[4];
#pragma unroll
    for (int c = 0; c < 4; ++c) column_sample[c] = energy_sample_from(c0 + tx + 16 * c, base, a.m);
#pragma unroll
    for (int r = 0; r < 4; ++r) {
        const lk_i64 i = r0 + ty + 16 * r;
        const lk_i64 sample = energy_sample_from(i, base, a.m);
        float part = 0.0f;
#pragma unroll
        for (int c = 0; c < 4; ++c) {
            const lk_i64 j = c0 + tx + 16 * c;
            const bool pair = i < rows && j < c_end && column_sample[c] == sample;
            if (pair && j > i) part += energy_power(s[r][c], a.power, a.beta);
            if (a.grad) slopes[ty + 16 * r][tx + 16 * c] = pair ? energy_slope(s[r][c], a.power, a.beta) : 0.0f;
        }
        t2[r] += (double)part;
    }
}

// A block owns 64 prediction rows (several samples when m < 64, part of one when m > 64)
// and, with the gradient, 64 dims of their gradient rows; it walks the column tiles of
// the samples those rows belong to, in order.
template <typename T>
__device__ void energy_score_tiles(const EnergyScoreArgs& a) {
    __shared__ float as[EP_DIMS][EP_TILE + 1];
    __shared__ float bs[EP_DIMS][EP_TILE + 1];
    __shared__ float slopes[EP_TILE][EP_TILE + 1];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    const lk_i64 rows = a.n * a.m;
    for (lk_i64 t = blockIdx.x; t < a.tiles; t += gridDim.x) {
        const lk_i64 row_tile = t / a.dim_chunks;
        const lk_i64 chunk = t - row_tile * a.dim_chunks;
        const lk_i64 g0 = chunk * EG_DIMS;
        const lk_i64 r0 = row_tile * EP_TILE;
        const lk_i64 last = (r0 + EP_TILE < rows ? r0 + EP_TILE : rows) - 1;
        const lk_i64 c_end = (last / a.m + 1) * a.m;
        double t2[4] = {0.0, 0.0, 0.0, 0.0};
        double acc[EG_HALVES][EG_ROWS_PER_WARP];
#pragma unroll
        for (int h = 0; h < EG_HALVES; ++h) {
#pragma unroll
            for (int q = 0; q < EG_ROWS_PER_WARP; ++q) acc[h][q] = 0.0;
        }
        for (lk_i64 c0 = (r0 / a.m) * a.m; c0 < c_end; c0 += EP_TILE) {
            // Without the gradient only pairs c > r count: a tile wholly left of r0 adds
            // nothing (and adding +0 keeps t2's bits), so it is skipped.
            if (!a.grad && c0 + EP_TILE <= r0 + 1) continue;
            energy_score_tile<T>(a, r0, c0, c_end, as, bs, slopes, t2);
            if (a.grad) energy_slope_sums<T>(a.preds, rows, a.preds, c_end, a.d, r0, c0, g0, as, bs, slopes, acc);
        }
        // The tile's sum toward term2: each thread's rows (t2 is 0 past the rows), then
        // the block's fixed tree.
        const double tile_t2 = lk_block_reduce(t2[0] + t2[1] + t2[2] + t2[3], 0.0, lk_sum_op());
        float s1[EG_ROWS_PER_WARP];
        energy_target_squares<T>(a, r0, s1);
        double t1 = 0.0;
#pragma unroll
        for (int q = 0; q < EG_ROWS_PER_WARP; ++q) {
            if (r0 + warp + 8 * q < rows && lane == 0) t1 += (double)energy_power(s1[q], a.power, a.beta);
        }
        const double tile_t1 = lk_block_reduce(t1, 0.0, lk_sum_op());
        if (chunk == 0 && threadIdx.x == 0) {
            a.tile_sums[2 * row_tile] = tile_t1;
            a.tile_sums[2 * row_tile + 1] = tile_t2;
        }
#pragma unroll
        for (int q = 0; q < EG_ROWS_PER_WARP; ++q) {
            const lk_i64 i = r0 + warp + 8 * q;
            if (i >= rows || !a.grad) break;
            const float h1 = a.c1 * energy_slope(s1[q], a.power, a.beta);
            const T* p = (const T*)a.preds + i * a.d;
            const T* y = (const T*)a.y + (i / a.m) * a.d;
#pragma unroll
            for (int h = 0; h < EG_HALVES; ++h) {
                const lk_i64 dim = g0 + h * EP_DIMS + lane;
                if (dim >= a.d) break;
                const float v = lk_to_f32(p[dim]);
                a.grad[i * a.d + dim] = fmaf(a.c2, (float)acc[h][q], h1 * (v - lk_to_f32(y[dim])));
            }
        }
    }
}

extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_score_f32(const EnergyScoreArgs a) {
    energy_score_tiles<float>(a);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_score_f16(const EnergyScoreArgs a) {
    energy_score_tiles<lk_f16>(a);
}
extern "C" __global__ void __launch_bounds__(EP_THREADS) energy_score_bf16(const EnergyScoreArgs a) {
    energy_score_tiles<lk_bf16>(a);
}

// Must match EnergyScoreMergeArgs in src/cuda/energy.rs field for field.
struct EnergyScoreMergeArgs {
    const double* tile_sums;  // [row tiles, 2]
    float* term1;            // [1] each
    float* term2;
    float* loss;
    lk_i64 n;
    lk_i64 m;
};
LK_FIELD_AT(EnergyScoreMergeArgs, tile_sums, 0);
LK_FIELD_AT(EnergyScoreMergeArgs, term1, 8);
LK_FIELD_AT(EnergyScoreMergeArgs, term2, 16);
LK_FIELD_AT(EnergyScoreMergeArgs, loss, 24);
LK_FIELD_AT(EnergyScoreMergeArgs, n, 32);
LK_FIELD_AT(EnergyScoreMergeArgs, m, 40);
static_assert(sizeof(EnergyScoreMergeArgs) == 48, "EnergyScoreMergeArgs is 48 bytes in Rust");

// term2 = -0.5 m / (m - 1) (sum over ordered pairs) / (n m^2), and the
// ordered sum is twice the k > j one the tiles hold.
extern "C" __global__ void __launch_bounds__(1024) energy_score_merge(const EnergyScoreMergeArgs a) {
    const lk_i64 tiles = (a.n * a.m + EP_TILE - 1) / EP_TILE;
    double s1 = 0.0, s2 = 0.0;
    for (lk_i64 t = threadIdx.x; t < tiles; t += blockDim.x) {
        s1 += a.tile_sums[2 * t];
        s2 += a.tile_sums[2 * t + 1];
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
