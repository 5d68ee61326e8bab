// ensemble.cu: E MLPs (PyTorch Linear layout, ReLU between layers) on one batch
// with a fused per-model cross-entropy and accuracy, and landscape scans
// theta_0 + t_e D_{k_e} that never materialise the E parameter sets.
// Semantics: reference/src/ensemble.rs (the f64 definition) and DESIGN.md.
//
// In order on one stream:
//   ensemble_check               ONE block: the first label outside [0, C) (and
//                                its value), for a scan the first non-finite t
//                                and the first k outside [0, K), into the
//                                status words; the host reads them at its next
//                                readback (no op waits for the device).
//   ensemble_mlp_{f32,f16,bf16}  Exact: a block per (batch tile of 64 rows,
//                                model), or for a Split scan per (tile,
//                                direction k), the models of one tile on
//                                neighbouring blocks, so a tile of X comes from
//                                memory once and from L2 for every other model.
//                                The tile goes through every layer, its
//                                activations in shared memory (updated in place)
//                                when every width after the input is at most
//                                128, else in the block's global scratch (which
//                                stays in L2). Each layer is a tiled GEMM over
//                                128 units at a time: the input rows and the
//                                weights are staged 8 inputs deep through
//                                double-buffered shared memory (16-byte loads
//                                where the rows allow), and each thread keeps an
//                                8 rows x 4 units register tile; each output is
//                                one fmaf chain in input order. Then the tile's
//                                rows' cross-entropies (f32), summed in f64 in
//                                row order with the count of right argmaxes into
//                                the (model, tile) slot.
//   ensemble_mlp_tc_{f32,f16,bf16}  TensorCore (sm_80+): the same blocks and
//                                staging, but each warp computes a 32 x 32 tile
//                                with mma.sync (m16n8k8 tf32 for f32, every
//                                operand rounded with cvt.rna.tf32.f32;
//                                m16n8k16 bf16/f16 for 16-bit inputs, the hidden
//                                activations rounded to the input dtype) with
//                                f32 accumulation.
//   ensemble_finalize            a block per model: its slots in f64, in tile
//                                order then the fixed tree: loss and accuracy.
//
// Cost at the headline shape (E = 81, B = 60000, 784-128-128-10, f32): the FLOP
// floor is 2 E B sum(d_l d_{l+1}) = 2 * 81 * 60000 * 118016 = 1.147 TFLOP (85%
// of it in the 784-wide first layer), 17 ms at the H200's 67 TFLOP/s of f32 FMA
// and 2.3 ms at its ~495 TFLOP/s of dense tf32. Memory: X is 188 MB, the
// weights 38 MB (L2-resident: every model's weights are live at once), the
// logits when asked 194 MB; ~0.1 ms at 4.3 TB/s, so both paths are bound by
// arithmetic and by shared-memory and L2 traffic, not by HBM. L2 traffic: each
// 64-row tile re-reads its model's weights (400 KB for 12.8 MFLOP), about
// 54 GB in all.
//
// Modes: FORWARD reads model e's own parameters. ROUNDED forms each weight as
// it is staged: fl(w0 + fl(t d)) in the parameters' dtype, each operation in f32
// (__fmul_rn / __fadd_rn: no contraction), exactly as the reference rounds it.
// SPLIT computes b0 + W0 h and db + D h (one pass over the inputs for each) and
// adds them as (b0 + W0 h) + t (db + D h); its first layer is computed once per
// (tile, k) and shared by every distance on direction k.
//
// Labels out of range give that row a NaN loss (never an out-of-bounds read); a
// model whose k is out of range gets NaN logits and loss. No float atomics: the
// same input gives the same bits. Offsets are 64-bit.

#define EN_ROWS 64
#define EN_COLS 128
#define EN_K 8
#define EN_THREADS 256
#define EN_WARPS (EN_THREADS / 32)
#define EN_HIDDEN 128
#define EN_MAX_LAYERS 8
// Each thread's register tile: 8 rows x 4 units (Exact) or, per warp, a 32 x 32
// tile of 2 x 4 MMA tiles of 16 x 8 (TensorCore): 32 accumulators either way.
#define EN_TILE 32

#define EN_FORWARD 0
#define EN_ROUNDED 1
#define EN_SPLIT 2

// What a staged 32-bit word holds: an f32 input (Exact), an f32 rounded to tf32
// (TensorCore on f32) or two neighbouring 16-bit inputs, the lower in the low
// half (TensorCore on f16 / bf16, as mma's .f16x2 / .bf16x2 operands pack them).
#define EN_ARITH_FMA 0
#define EN_ARITH_TF32 1
#define EN_ARITH_PAIR 2

static_assert(EN_WARPS == 8 && EN_ROWS == 64 && EN_COLS == 128,
              "8 warps of 32 x 32 outputs tile 64 rows x 128 units");
static_assert(EN_THREADS == 2 * EN_COLS && EN_THREADS == 4 * EN_ROWS,
              "staging: two threads per weight row, the first 128 two per input row");

// Must match EnsembleArgs in src/cuda/ensemble.rs field for field.
struct EnsembleArgs {
    const void* x;                                   // [B, d0] or [E, B, d0] of T
    const void* weights[EN_MAX_LAYERS];              // [E, out, in] (scan: centre [out, in])
    const void* biases[EN_MAX_LAYERS];               // [E, out] (scan: [out])
    const void* direction_weights[EN_MAX_LAYERS];    // [K, out, in] (scan only)
    const void* direction_biases[EN_MAX_LAYERS];     // [K, out]
    const lk_i64* labels;                            // [B]
    const lk_i64* direction_of;                      // [E] (scan only)
    const float* distance;                           // [E] (scan only)
    float* logits;                                   // [E, B, C] or null
    double* partial;                                 // [E, tiles, 2]: loss sum, right count
    float* scratch;                                  // [grid, scratch_stride] or null
    lk_i64 widths[EN_MAX_LAYERS + 1];
    lk_i64 layers;
    lk_i64 models;
    lk_i64 batch;
    lk_i64 directions;
    lk_i64 tiles;
    lk_i64 scratch_stride;                           // floats of scratch per block
    lk_i64 act_floats;                               // per activation buffer in scratch; 0: on chip
    int mode;
    int shared_input;
};
LK_FIELD_AT(EnsembleArgs, x, 0);
LK_FIELD_AT(EnsembleArgs, weights, 8);
LK_FIELD_AT(EnsembleArgs, biases, 72);
LK_FIELD_AT(EnsembleArgs, direction_weights, 136);
LK_FIELD_AT(EnsembleArgs, direction_biases, 200);
LK_FIELD_AT(EnsembleArgs, labels, 264);
LK_FIELD_AT(EnsembleArgs, direction_of, 272);
LK_FIELD_AT(EnsembleArgs, distance, 280);
LK_FIELD_AT(EnsembleArgs, logits, 288);
LK_FIELD_AT(EnsembleArgs, partial, 296);
LK_FIELD_AT(EnsembleArgs, scratch, 304);
LK_FIELD_AT(EnsembleArgs, widths, 312);
LK_FIELD_AT(EnsembleArgs, layers, 384);
LK_FIELD_AT(EnsembleArgs, models, 392);
LK_FIELD_AT(EnsembleArgs, batch, 400);
LK_FIELD_AT(EnsembleArgs, directions, 408);
LK_FIELD_AT(EnsembleArgs, tiles, 416);
LK_FIELD_AT(EnsembleArgs, scratch_stride, 424);
LK_FIELD_AT(EnsembleArgs, act_floats, 432);
LK_FIELD_AT(EnsembleArgs, mode, 440);
LK_FIELD_AT(EnsembleArgs, shared_input, 444);
static_assert(sizeof(EnsembleArgs) == 448, "EnsembleArgs is 448 bytes as in Rust");


// The staged words are k-major ([input][row] and [input][unit]) so that a thread
// reads 8 rows or 4 units of one input with 16-byte loads; the rows are padded by
// 8 words so that the MMA fragments' reads (lane / 4 along the rows, lane % 4
// along the inputs) fall on 32 different banks.
struct alignas(16) EnShared {
    float act[EN_ROWS * EN_HIDDEN];                   // the tile's activations
    unsigned int x[2][EN_K][EN_ROWS + 8];             // staged input words, 2 stages
    unsigned int w[2][EN_K][EN_COLS + 8];             // staged weight words
    double row_loss[EN_ROWS];
    float row_hit[EN_ROWS];
};

// One layer of one model: [out, in] weights and [out] biases (the centre's in a
// scan), the direction's in a scan, and the model's distance.
template <typename T>
struct EnLayer {
    const T* w;
    const T* b;
    const T* dw;
    const T* db;
    float t;
    lk_i64 d_in;
    lk_i64 d_out;
};

template <typename T>
__device__ __forceinline__ EnLayer<T> en_params(const EnsembleArgs& a, int l, lk_i64 e, lk_i64 k,
                                                float t) {
    EnLayer<T> p;
    p.d_in = a.widths[l];
    p.d_out = a.widths[l + 1];
    p.t = t;
    const lk_i64 model = a.mode == EN_FORWARD ? e : 0;
    p.w = (const T*)a.weights[l] + model * p.d_out * p.d_in;
    p.b = (const T*)a.biases[l] + model * p.d_out;
    p.dw = nullptr;
    p.db = nullptr;
    if (a.mode != EN_FORWARD) {
        p.dw = (const T*)a.direction_weights[l] + k * p.d_out * p.d_in;
        p.db = (const T*)a.direction_biases[l] + k * p.d_out;
    }
    return p;
}

// fl(w0 + fl(t d)) in T, each operation in f32, as PyTorch forms add(w0, scale(d, t)).
template <typename T>
__device__ __forceinline__ float en_perturbed(float w0, float t, float d) {
    const float step = lk_to_f32(lk_from_f32<T>(__fmul_rn(t, d)));
    return lk_to_f32(lk_from_f32<T>(__fadd_rn(w0, step)));
}

__device__ __forceinline__ float en_relu(float v, bool relu) {
    // v < 0 rather than fmaxf, so a NaN stays NaN as in the reference.
    return relu && v < 0.0f ? 0.0f : v;
}

__device__ __forceinline__ bool en_aligned(const void* p, unsigned long long bytes) {
    return ((unsigned long long)p & (bytes - 1)) == 0;
}

template <typename T>
__device__ __forceinline__ float en_half_to_f32(unsigned int bits) {
    T h;
    h.bits = (unsigned short)bits;
    return lk_to_f32(h);
}

// p[0..4) of a row as f32, zero from `left` on (the elements the row still has
// from p; none are read past it): one 16-byte (f32) or 8-byte (16-bit) load when
// `vec` says p is aligned for it.
__device__ __forceinline__ void en_load4(const float* p, lk_i64 left, bool vec, float v[4]) {
    if (vec && left >= 4) {
        const float4 q = *reinterpret_cast<const float4*>(p);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < left ? p[i] : 0.0f;
}

template <typename T>
__device__ __forceinline__ void en_load4(const T* p, lk_i64 left, bool vec, float v[4]) {
    if (vec && left >= 4) {
        const uint2 q = *reinterpret_cast<const uint2*>(p);
        v[0] = en_half_to_f32<T>(q.x & 0xffffu);
        v[1] = en_half_to_f32<T>(q.x >> 16);
        v[2] = en_half_to_f32<T>(q.y & 0xffffu);
        v[3] = en_half_to_f32<T>(q.y >> 16);
        return;
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) v[i] = i < left ? lk_to_f32(p[i]) : 0.0f;
}

// Inputs per staged word.
template <int Arith>
__device__ __forceinline__ constexpr int en_per_word() {
    return Arith == EN_ARITH_PAIR ? 2 : 1;
}

// The 4 words of 4 * en_per_word elements at p (see EN_ARITH_*).
template <typename T, int Arith, typename TSrc>
__device__ __forceinline__ void en_load_run(const TSrc* p, lk_i64 left, bool vec,
                                            float* v) {
#pragma unroll
    for (int h = 0; h < en_per_word<Arith>(); ++h) en_load4(p + 4 * h, left - 4 * h, vec, v + 4 * h);
}

template <typename T, int Arith>
__device__ __forceinline__ unsigned int en_word(const float* v) {
    if constexpr (Arith == EN_ARITH_PAIR) {
        return (unsigned int)lk_from_f32<T>(v[0]).bits |
               ((unsigned int)lk_from_f32<T>(v[1]).bits << 16);
    } else if constexpr (Arith == EN_ARITH_TF32) {
        unsigned int r;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(v[0]));
        return r;
    } else {
        return __float_as_uint(v[0]);
    }
}

// The A operand of a layer: `rows` rows of d_in inputs, row-major (X's rows, or
// the activations in shared memory or scratch).
template <typename TIn>
struct EnRowsIn {
    const TIn* p;
    lk_i64 d_in;
    int rows;
    bool vec;
};

// The B operand: units j0.. of w [d_out, d_in]; with d (a Rounded scan's
// direction) each weight is formed as fl(w + fl(t d)) as it is staged.
template <typename T>
struct EnWeightsIn {
    const T* w;
    const T* d;
    float t;
    lk_i64 d_in;
    lk_i64 d_out;
    lk_i64 j0;
    bool vec;
};

// One stage in registers: this thread's 4 words of the input rows (threads
// 0..127: row tid / 2, words 4 (tid % 2)..) and of the weights (unit tid / 2).
struct EnFetch {
    unsigned int x[4];
    unsigned int w[4];
};

template <typename T, typename TIn, int Arith>
__device__ __forceinline__ void en_fetch(const EnRowsIn<TIn>& in, const EnWeightsIn<T>& wt,
                                         lk_i64 k0, EnFetch& f) {
    constexpr int per = en_per_word<Arith>();
    const int tid = threadIdx.x;
    const lk_i64 k = k0 + (tid & 1) * 4 * per;
    float v[4 * per];
    if (tid < 2 * EN_ROWS) {
        const int r = tid >> 1;
        const lk_i64 left = r < in.rows ? in.d_in - k : 0;
        en_load_run<T, Arith>(in.p + (lk_i64)r * in.d_in + k, left, in.vec, v);
#pragma unroll
        for (int q = 0; q < 4; ++q) f.x[q] = en_word<T, Arith>(v + per * q);
    }
    const lk_i64 j = wt.j0 + (tid >> 1);
    const lk_i64 left = j < wt.d_out ? wt.d_in - k : 0;
    const lk_i64 at = j * wt.d_in + k;
    en_load_run<T, Arith>(wt.w + at, left, wt.vec, v);
    if (wt.d != nullptr) {
        float d[4 * per];
        en_load_run<T, Arith>(wt.d + at, left, wt.vec, d);
#pragma unroll
        for (int i = 0; i < 4 * per; ++i) {
            if (i < left) v[i] = en_perturbed<T>(v[i], wt.t, d[i]);
        }
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) f.w[q] = en_word<T, Arith>(v + per * q);
}

__device__ __forceinline__ void en_store(const EnFetch& f, int s, EnShared& sh) {
    const int tid = threadIdx.x;
    const int word = (tid & 1) * 4;
    if (tid < 2 * EN_ROWS) {
#pragma unroll
        for (int q = 0; q < 4; ++q) sh.x[s][word + q][tid >> 1] = f.x[q];
    }
#pragma unroll
    for (int q = 0; q < 4; ++q) sh.w[s][word + q][tid >> 1] = f.w[q];
}

// Warp w computes rows 32 (w / 4).. and units 32 (w % 4).. of the block's tile.
__device__ __forceinline__ int en_warp_row() { return (threadIdx.x >> 7) * 32; }
__device__ __forceinline__ int en_warp_col() { return ((threadIdx.x >> 5) & 3) * 32; }

// Exact: the thread's lanes are 4 x 8 over the warp's tile, 8 rows x 4 units
// each; accumulator 4 i + j is row r0 + i, unit c0 + j.
__device__ __forceinline__ int en_fma_row0() { return en_warp_row() + ((threadIdx.x & 31) >> 3) * 8; }
__device__ __forceinline__ int en_fma_col0() { return en_warp_col() + (threadIdx.x & 7) * 4; }

// One stage of 8 inputs: per input, 8 rows and 4 units by 16-byte loads, then
// 32 fmaf, so each accumulator's chain takes the inputs in order.
__device__ __forceinline__ void en_fma_stage(const EnShared& sh, int s, float acc[EN_TILE]) {
    const int r0 = en_fma_row0();
    const int c0 = en_fma_col0();
#pragma unroll
    for (int kk = 0; kk < EN_K; ++kk) {
        const float4 h_lo = *reinterpret_cast<const float4*>(&sh.x[s][kk][r0]);
        const float4 h_hi = *reinterpret_cast<const float4*>(&sh.x[s][kk][r0 + 4]);
        const float4 w4 = *reinterpret_cast<const float4*>(&sh.w[s][kk][c0]);
        const float h[8] = {h_lo.x, h_lo.y, h_lo.z, h_lo.w, h_hi.x, h_hi.y, h_hi.z, h_hi.w};
        const float w[4] = {w4.x, w4.y, w4.z, w4.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) {
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[4 * i + j] = fmaf(w[j], h[i], acc[4 * i + j]);
        }
    }
}

// D += A B on one 16 x 8 tile (PTX ISA, "Matrix Fragments for mma.m16n8k8" and
// "mma.m16n8k16"). With g = lane / 4 and c = lane % 4, in 32-bit words (one tf32,
// or two 16-bit inputs k = 2 c', 2 c' + 1 of word c'):
//   A (16 rows x 8 words, row-major): a0 (g, c), a1 (g + 8, c), a2 (g, c + 4),
//     a3 (g + 8, c + 4);
//   B (8 words x 8 units, "col": word-major per unit): b0 (c, g), b1 (c + 4, g);
//   C, D (16 x 8 f32): d0 (g, 2c), d1 (g, 2c + 1), d2 (g + 8, 2c), d3 (g + 8, 2c + 1).
// The same word coordinates hold for m16n8k8 tf32 and m16n8k16 f16/bf16.
__device__ __forceinline__ void en_mma16(const lk_bf16*, float d[4], const unsigned int a[4],
                                         const unsigned int b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

__device__ __forceinline__ void en_mma16(const lk_f16*, float d[4], const unsigned int a[4],
                                         const unsigned int b[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <typename T, int Arith>
__device__ __forceinline__ void en_mma(float d[4], const unsigned int a[4], const unsigned int b[2]) {
    if constexpr (Arith == EN_ARITH_TF32) {
        asm volatile(
            "mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
            "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
            : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
            : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
    } else {
        en_mma16((const T*)nullptr, d, a, b);
    }
}

// TensorCore: the warp's 32 x 32 tile is 2 x 4 MMA tiles; accumulator
// 4 (4 mi + ni) + i is element d_i of tile (mi, ni).
__device__ __forceinline__ void en_mma_out_at(int q, int& r, int& c) {
    const int lane = threadIdx.x & 31;
    const int tile = q >> 2;
    r = en_warp_row() + (tile >> 2) * 16 + (lane >> 2) + ((q >> 1) & 1) * 8;
    c = en_warp_col() + (tile & 3) * 8 + (lane & 3) * 2 + (q & 1);
}

template <typename T, int Arith>
__device__ __forceinline__ void en_mma_stage(const EnShared& sh, int s, float acc[EN_TILE]) {
    const int lane = threadIdx.x & 31;
    const int g = lane >> 2;
    const int c = lane & 3;
    unsigned int a[2][4];
    unsigned int b[4][2];
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
        const int m = en_warp_row() + mi * 16 + g;
        a[mi][0] = sh.x[s][c][m];
        a[mi][1] = sh.x[s][c][m + 8];
        a[mi][2] = sh.x[s][c + 4][m];
        a[mi][3] = sh.x[s][c + 4][m + 8];
    }
#pragma unroll
    for (int ni = 0; ni < 4; ++ni) {
        const int n = en_warp_col() + ni * 8 + g;
        b[ni][0] = sh.w[s][c][n];
        b[ni][1] = sh.w[s][c + 4][n];
    }
#pragma unroll
    for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
        for (int ni = 0; ni < 4; ++ni) en_mma<T, Arith>(acc + 4 * (4 * mi + ni), a[mi], b[ni]);
    }
}

// The row and unit (within the block's 64 x 128 tile) of accumulator q.
template <int Arith>
__device__ __forceinline__ void en_out_at(int q, int& r, int& c) {
    if constexpr (Arith == EN_ARITH_FMA) {
        r = en_fma_row0() + (q >> 2);
        c = en_fma_col0() + (q & 3);
    } else {
        en_mma_out_at(q, r, c);
    }
}

// acc = in W^T over units wt.j0.. (no bias): the inputs in stages of EN_K words,
// the next stage fetched into registers while this one is multiplied. Ends with a
// barrier, after which `in` is no longer read (so the caller may overwrite it).
template <typename T, typename TIn, int Arith>
__device__ void en_accumulate(const EnRowsIn<TIn>& in, const EnWeightsIn<T>& wt,
                              float acc[EN_TILE], EnShared& sh) {
    const lk_i64 step = EN_K * en_per_word<Arith>();
#pragma unroll
    for (int q = 0; q < EN_TILE; ++q) acc[q] = 0.0f;
    EnFetch f;
    en_fetch<T, TIn, Arith>(in, wt, 0, f);
    en_store(f, 0, sh);
    __syncthreads();
    int s = 0;
    for (lk_i64 k0 = 0; k0 < in.d_in; k0 += step) {
        const bool more = k0 + step < in.d_in;
        if (more) en_fetch<T, TIn, Arith>(in, wt, k0 + step, f);
        if constexpr (Arith == EN_ARITH_FMA) {
            en_fma_stage(sh, s, acc);
        } else {
            en_mma_stage<T, Arith>(sh, s, acc);
        }
        // Stage s ^ 1 was last read before the previous barrier.
        if (more) en_store(f, s ^ 1, sh);
        __syncthreads();
        s ^= 1;
    }
}

// Bias, Split combination and ReLU of one column pass's accumulators into out
// (and out_d: a scan's shared first layer). acc_d (the D h part) only for SPLIT.
template <typename T, int Arith>
__device__ __forceinline__ void en_epilogue(const EnLayer<T>& p, int mode, bool relu, int rows,
                                            lk_i64 j0, const float acc[EN_TILE],
                                            const float* acc_d, float* out, float* out_d) {
#pragma unroll
    for (int q = 0; q < EN_TILE; ++q) {
        int r;
        int c;
        en_out_at<Arith>(q, r, c);
        const lk_i64 j = j0 + c;
        if (r >= rows || j >= p.d_out) continue;
        const lk_i64 at = (lk_i64)r * p.d_out + j;
        const float b = lk_to_f32(p.b[j]);
        float v;
        if (mode == EN_FORWARD) {
            v = b + acc[q];
        } else if (mode == EN_ROUNDED) {
            v = en_perturbed<T>(b, p.t, lk_to_f32(p.db[j])) + acc[q];
        } else {
            const float part_d = lk_to_f32(p.db[j]) + acc_d[q];
            if (out_d != nullptr) {
                out[at] = b + acc[q];
                out_d[at] = part_d;
                continue;
            }
            v = (b + acc[q]) + p.t * part_d;
        }
        out[at] = en_relu(v, relu);
    }
}

// The layer on the tile's `rows` rows of `in` ([rows, d_in], row-major):
// out[r, j] = b_j + sum_i w_ji in[r, i] (ReLU when `relu`). SPLIT with `out_d`
// (a scan's shared first layer) writes b0 + W0 in to out and db + D in to out_d.
// `out` may be `in` (the on-chip activations, d_out <= EN_COLS): every read of
// `in` ends before the first write. Ends with a barrier: `out` is complete for
// the next layer. SPLIT has a code path of its own, so that the other modes'
// passes keep only 32 accumulators live.
template <typename T, typename TIn, int Arith>
__device__ void en_layer(const TIn* in, int rows, const EnLayer<T>& p, int mode, bool relu,
                         float* out, float* out_d, EnShared& sh) {
    const EnRowsIn<TIn> src = {in, p.d_in, rows,
                               p.d_in % 4 == 0 && en_aligned(in, 4 * sizeof(TIn))};
    const bool weights_vec = p.d_in % 4 == 0 && en_aligned(p.w, 4 * sizeof(T)) &&
                             (p.dw == nullptr || en_aligned(p.dw, 4 * sizeof(T)));
    for (lk_i64 j0 = 0; j0 < p.d_out; j0 += EN_COLS) {
        float acc[EN_TILE];
        const EnWeightsIn<T> w = {p.w, mode == EN_ROUNDED ? p.dw : nullptr, p.t, p.d_in,
                                  p.d_out, j0, weights_vec};
        if (mode == EN_SPLIT) {
            float acc_d[EN_TILE];
            const EnWeightsIn<T> d = {p.dw, nullptr, 0.0f, p.d_in, p.d_out, j0, weights_vec};
            en_accumulate<T, TIn, Arith>(src, d, acc_d, sh);
            en_accumulate<T, TIn, Arith>(src, w, acc, sh);
            en_epilogue<T, Arith>(p, mode, relu, rows, j0, acc, acc_d, out, out_d);
        } else {
            en_accumulate<T, TIn, Arith>(src, w, acc, sh);
            en_epilogue<T, Arith>(p, mode, relu, rows, j0, acc, nullptr, out, out_d);
        }
    }
    __syncthreads();
}

// The tile's cross-entropies and right argmaxes from its logits z [rows, C] into
// model e's slot; writes the logits when asked. A warp per row.
__device__ void en_loss(const EnsembleArgs& a, const float* z, int rows, lk_i64 row0, lk_i64 e,
                        lk_i64 tile, EnShared& sh) {
    const lk_i64 classes = a.widths[a.layers];
    const int lane = threadIdx.x & 31;
    for (int r = threadIdx.x >> 5; r < EN_ROWS; r += EN_WARPS) {
        double loss = 0.0;
        float hit = 0.0f;
        if (r < rows) {
            const float* zr = z + (lk_i64)r * classes;
            // The first max: within a lane the classes ascend; across lanes the
            // lower index wins a tie. NaN never wins (as in the reference after z_0).
            float m = -LK_INF_F;
            lk_i64 arg = classes;
            for (lk_i64 c = lane; c < classes; c += 32) {
                if (zr[c] > m) {
                    m = zr[c];
                    arg = c;
                }
            }
#pragma unroll
            for (int offset = 16; offset > 0; offset >>= 1) {
                const float other_m = __shfl_down_sync(0xffffffffu, m, offset);
                const lk_i64 other_arg = __shfl_down_sync(0xffffffffu, arg, offset);
                if (other_m > m || (other_m == m && other_arg < arg)) {
                    m = other_m;
                    arg = other_arg;
                }
            }
            m = __shfl_sync(0xffffffffu, m, 0);
            arg = __shfl_sync(0xffffffffu, arg, 0);
            float s = 0.0f;
            for (lk_i64 c = lane; c < classes; c += 32) s += expf(zr[c] - m);
            s = __shfl_sync(0xffffffffu, lk_warp_reduce(s, lk_sum_op()), 0);
            const lk_i64 y = a.labels[row0 + r];
            const bool valid = y >= 0 && y < classes;
            loss = valid ? (double)((m + logf(s)) - zr[y]) : (double)LK_NAN_F;
            hit = valid && arg == y ? 1.0f : 0.0f;
            if (a.logits != nullptr) {
                float* out = a.logits + (e * a.batch + row0 + r) * classes;
                for (lk_i64 c = lane; c < classes; c += 32) out[c] = zr[c];
            }
        }
        if (lane == 0) {
            sh.row_loss[r] = loss;
            sh.row_hit[r] = hit;
        }
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double sum = 0.0;
        double hits = 0.0;
        for (int r = 0; r < rows; ++r) {
            sum += sh.row_loss[r];
            hits += sh.row_hit[r];
        }
        a.partial[2 * (e * a.tiles + tile)] = sum;
        a.partial[2 * (e * a.tiles + tile) + 1] = hits;
    }
    __syncthreads();
}

// Model e's direction index is out of range: its logits and slot are NaN.
__device__ void en_bad_model(const EnsembleArgs& a, int rows, lk_i64 row0, lk_i64 e,
                             lk_i64 tile) {
    const lk_i64 classes = a.widths[a.layers];
    if (a.logits != nullptr) {
        float* out = a.logits + (e * a.batch + row0) * classes;
        for (lk_i64 q = threadIdx.x; q < rows * classes; q += blockDim.x) out[q] = LK_NAN_F;
    }
    if (threadIdx.x == 0) {
        a.partial[2 * (e * a.tiles + tile)] = (double)LK_NAN_F;
        a.partial[2 * (e * a.tiles + tile) + 1] = (double)LK_NAN_F;
    }
}

// The input rows of the tile for model e.
template <typename T>
__device__ __forceinline__ const T* en_input(const EnsembleArgs& a, lk_i64 e, lk_i64 row0) {
    const lk_i64 first = (a.shared_input ? 0 : e * a.batch) + row0;
    return (const T*)a.x + first * a.widths[0];
}

// Layers from.. of model e (layer 0 reads the tile's input rows, layer l writes
// act[l & 1]; both are the one on-chip buffer when the widths fit), then the
// loss of the last layer's logits.
template <typename T, int Arith>
__device__ void en_run_layers(const EnsembleArgs& a, int from, lk_i64 e, lk_i64 k, float t,
                              int rows, lk_i64 row0, lk_i64 tile, float* const act[2],
                              EnShared& sh) {
    for (int l = from; l < a.layers; ++l) {
        const EnLayer<T> p = en_params<T>(a, l, e, k, t);
        const bool relu = l + 1 < a.layers;
        if (l == 0) {
            en_layer<T, T, Arith>(en_input<T>(a, e, row0), rows, p, a.mode, relu, act[0], nullptr,
                                  sh);
        } else {
            en_layer<T, float, Arith>(act[(l - 1) & 1], rows, p, a.mode, relu, act[l & 1],
                                      nullptr, sh);
        }
    }
    en_loss(a, act[(a.layers - 1) & 1], rows, row0, e, tile, sh);
}

// Split scan, direction k: the first layer's parts once, then every model on k.
template <typename T, int Arith>
__device__ void en_split_direction(const EnsembleArgs& a, lk_i64 k, int rows, lk_i64 row0,
                                   lk_i64 tile, float* const act[2], float* parts,
                                   EnShared& sh) {
    const lk_i64 d1 = a.widths[1];
    float* base = parts;
    float* slope = parts + (lk_i64)EN_ROWS * d1;
    en_layer<T, T, Arith>(en_input<T>(a, 0, row0), rows, en_params<T>(a, 0, 0, k, 0.0f),
                          EN_SPLIT, false, base, slope, sh);
    const bool relu = a.layers > 1;
    for (lk_i64 e = 0; e < a.models; ++e) {
        const lk_i64 ke = a.direction_of[e];
        if (ke < 0 || ke >= a.directions) {
            // Direction 0's blocks answer for the models of no direction.
            if (k == 0) en_bad_model(a, rows, row0, e, tile);
            continue;
        }
        if (ke != k) continue;
        const float t = a.distance[e];
        for (lk_i64 q = threadIdx.x; q < rows * d1; q += EN_THREADS) {
            act[0][q] = en_relu(base[q] + t * slope[q], relu);
        }
        __syncthreads();
        en_run_layers<T, Arith>(a, 1, e, k, t, rows, row0, tile, act, sh);
    }
}

template <typename T, int Arith>
__device__ void ensemble_mlp(const EnsembleArgs& a) {
    __shared__ EnShared sh;
    float* scratch = a.scratch != nullptr ? a.scratch + (lk_i64)blockIdx.x * a.scratch_stride
                                          : nullptr;
    float* const act[2] = {
        a.act_floats == 0 ? sh.act : scratch,
        a.act_floats == 0 ? sh.act : scratch + a.act_floats,
    };
    float* parts = scratch == nullptr ? nullptr : scratch + 2 * a.act_floats;
    const lk_i64 groups = a.mode == EN_SPLIT ? a.directions : a.models;
    const lk_i64 work = a.tiles * groups;
    for (lk_i64 item = blockIdx.x; item < work; item += gridDim.x) {
        // Tile-major: the groups of one tile run side by side and share its X in L2.
        const lk_i64 tile = item / groups;
        const lk_i64 group = item % groups;
        const lk_i64 row0 = tile * EN_ROWS;
        const int rows = (int)(a.batch - row0 < EN_ROWS ? a.batch - row0 : EN_ROWS);
        if (a.mode == EN_SPLIT) {
            en_split_direction<T, Arith>(a, group, rows, row0, tile, act, parts, sh);
            continue;
        }
        lk_i64 k = 0;
        float t = 0.0f;
        if (a.mode == EN_ROUNDED) {
            k = a.direction_of[group];
            t = a.distance[group];
            if (k < 0 || k >= a.directions) {
                en_bad_model(a, rows, row0, group, tile);
                __syncthreads();
                continue;
            }
        }
        en_run_layers<T, Arith>(a, 0, group, k, t, rows, row0, tile, act, sh);
    }
}

// Two blocks per multiprocessor: 2 x 46 KB of shared memory and at most 128
// registers a thread.
#define EN_BOUNDS __launch_bounds__(EN_THREADS, 2)

extern "C" __global__ void EN_BOUNDS ensemble_mlp_f32(EnsembleArgs a) {
    ensemble_mlp<float, EN_ARITH_FMA>(a);
}
extern "C" __global__ void EN_BOUNDS ensemble_mlp_f16(EnsembleArgs a) {
    ensemble_mlp<lk_f16, EN_ARITH_FMA>(a);
}
extern "C" __global__ void EN_BOUNDS ensemble_mlp_bf16(EnsembleArgs a) {
    ensemble_mlp<lk_bf16, EN_ARITH_FMA>(a);
}

// mma.sync and cvt.rna.tf32 need sm_80; the host launches these only there, and
// below it they compile to the Exact kernels (which the TensorCore bound covers).
#if __CUDA_ARCH__ >= 800
#define EN_TC_TF32 EN_ARITH_TF32
#define EN_TC_PAIR EN_ARITH_PAIR
#else
#define EN_TC_TF32 EN_ARITH_FMA
#define EN_TC_PAIR EN_ARITH_FMA
#endif

extern "C" __global__ void EN_BOUNDS ensemble_mlp_tc_f32(EnsembleArgs a) {
    ensemble_mlp<float, EN_TC_TF32>(a);
}
extern "C" __global__ void EN_BOUNDS ensemble_mlp_tc_f16(EnsembleArgs a) {
    ensemble_mlp<lk_f16, EN_TC_PAIR>(a);
}
extern "C" __global__ void EN_BOUNDS ensemble_mlp_tc_bf16(EnsembleArgs a) {
    ensemble_mlp<lk_bf16, EN_TC_PAIR>(a);
}

// ---------------------------------------------------------------------------
// Per-model loss and accuracy from the tiles' slots.

// Must match EnsembleFinalizeArgs in src/cuda/ensemble.rs field for field.
struct EnsembleFinalizeArgs {
    const double* partial;   // [E, tiles, 2]
    double* loss;            // [E]
    double* accuracy;        // [E]
    lk_i64 models;
    lk_i64 tiles;
    lk_i64 batch;
};
LK_FIELD_AT(EnsembleFinalizeArgs, partial, 0);
LK_FIELD_AT(EnsembleFinalizeArgs, loss, 8);
LK_FIELD_AT(EnsembleFinalizeArgs, accuracy, 16);
LK_FIELD_AT(EnsembleFinalizeArgs, models, 24);
LK_FIELD_AT(EnsembleFinalizeArgs, tiles, 32);
LK_FIELD_AT(EnsembleFinalizeArgs, batch, 40);
static_assert(sizeof(EnsembleFinalizeArgs) == 48, "EnsembleFinalizeArgs is 48 bytes as in Rust");

extern "C" __global__ void __launch_bounds__(EN_THREADS)
    ensemble_finalize(EnsembleFinalizeArgs a) {
    for (lk_i64 e = blockIdx.x; e < a.models; e += gridDim.x) {
        double loss = 0.0;
        double hits = 0.0;
        for (lk_i64 t = threadIdx.x; t < a.tiles; t += blockDim.x) {
            loss += a.partial[2 * (e * a.tiles + t)];
            hits += a.partial[2 * (e * a.tiles + t) + 1];
        }
        loss = lk_block_reduce(loss, 0.0, lk_sum_op());
        hits = lk_block_reduce(hits, 0.0, lk_sum_op());
        if (threadIdx.x == 0) {
            a.loss[e] = loss / (double)a.batch;
            a.accuracy[e] = hits / (double)a.batch;
        }
    }
}

// ---------------------------------------------------------------------------
// The data checks.

// Must match EnsembleCheckArgs in src/cuda/ensemble.rs field for field.
struct EnsembleCheckArgs {
    const lk_i64* labels;         // [B]
    const lk_i64* direction_of;   // [E] or null (a forward)
    const float* distance;        // [E] or null
    unsigned long long* status;   // [4], as spec::ensemble::status_error reads it
    lk_i64 batch;
    lk_i64 classes;
    lk_i64 models;
    lk_i64 directions;
};
LK_FIELD_AT(EnsembleCheckArgs, labels, 0);
LK_FIELD_AT(EnsembleCheckArgs, direction_of, 8);
LK_FIELD_AT(EnsembleCheckArgs, distance, 16);
LK_FIELD_AT(EnsembleCheckArgs, status, 24);
LK_FIELD_AT(EnsembleCheckArgs, batch, 32);
LK_FIELD_AT(EnsembleCheckArgs, classes, 40);
LK_FIELD_AT(EnsembleCheckArgs, models, 48);
LK_FIELD_AT(EnsembleCheckArgs, directions, 56);
static_assert(sizeof(EnsembleCheckArgs) == 64, "EnsembleCheckArgs is 64 bytes as in Rust");

#define EN_NONE 0x7fffffffffffffffLL

__device__ __forceinline__ unsigned long long en_status_of(lk_i64 first) {
    return first == EN_NONE ? 0ull : ~(unsigned long long)first;
}

// Status words: !(first bad row) and its label; !(first model with a non-finite t);
// !(first model with k outside [0, K)); 0 where there is none.
extern "C" __global__ void ensemble_check(EnsembleCheckArgs a) {
    lk_i64 bad_row = EN_NONE;
    lk_i64 bad_t = EN_NONE;
    lk_i64 bad_k = EN_NONE;
    for (lk_i64 r = threadIdx.x; r < a.batch; r += blockDim.x) {
        const lk_i64 y = a.labels[r];
        if ((y < 0 || y >= a.classes) && r < bad_row) bad_row = r;
    }
    if (a.distance != nullptr) {
        for (lk_i64 e = threadIdx.x; e < a.models; e += blockDim.x) {
            if (!(fabsf(a.distance[e]) < LK_INF_F) && e < bad_t) bad_t = e;
            const lk_i64 k = a.direction_of[e];
            if ((k < 0 || k >= a.directions) && e < bad_k) bad_k = e;
        }
    }
    bad_row = lk_block_reduce(bad_row, (lk_i64)EN_NONE, lk_min_op());
    bad_t = lk_block_reduce(bad_t, (lk_i64)EN_NONE, lk_min_op());
    bad_k = lk_block_reduce(bad_k, (lk_i64)EN_NONE, lk_min_op());
    if (threadIdx.x == 0) {
        a.status[0] = en_status_of(bad_row);
        a.status[1] = bad_row == EN_NONE ? 0ull : (unsigned long long)a.labels[bad_row];
        a.status[2] = en_status_of(bad_t);
        a.status[3] = en_status_of(bad_k);
    }
}
