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
//                                weights go through a ring of EN_STAGES
//                                shared-memory stages of 128 bytes a row
//                                (cp.async on sm_80+ where the rows are 16-byte
//                                aligned, else through registers), and each
//                                thread keeps an 8 rows x 4 units tile; each
//                                output is one fmaf chain in input order. Then
//                                the tile's rows' cross-entropies (f32), summed
//                                in f64 in row order with the count of right
//                                argmaxes into the (model, tile) slot.
//   ensemble_mlp_tc_{f32,f16,bf16}  TensorCore (sm_80+): the same blocks and
//                                staging, but each warp computes a 32 x 32 tile
//                                with mma.sync (m16n8k8 tf32 for f32, every
//                                operand rounded with cvt.rna.tf32.f32 as it is
//                                read from the stage;
//                                m16n8k16 bf16/f16 for 16-bit inputs, the hidden
//                                activations rounded to the input dtype) with
//                                f32 accumulation.
//   ensemble_split_{,tc_}{dtype} the same for a Split scan: kernels of their own,
//                                since they hold twice the accumulators.
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
// Each stage: EN_STAGE_BYTES of every staged row (32 f32 or 64 16-bit inputs,
// or 32 when an f32 operand meets a 16-bit one), EN_STRIDE words apart.
#define EN_STAGE_BYTES 128
#define EN_STRIDE (EN_STAGE_BYTES / 4 + 4)
#define EN_STAGES 2
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

// The multiply: f32 fmaf (Exact), tf32 MMA on f32 inputs (each operand rounded
// with cvt.rna.tf32.f32 as it is read), or 16-bit MMA on words of two
// neighbouring inputs, the lower in the low half (mma's .f16x2 / .bf16x2).
#define EN_ARITH_FMA 0
#define EN_ARITH_TF32 1
#define EN_ARITH_PAIR 2

static_assert(EN_WARPS == 8 && EN_ROWS == 64 && EN_COLS == 128,
              "8 warps of 32 x 32 outputs tile 64 rows x 128 units");
// The shared memory of a block: the activations, the stage ring, the rows' losses.
#define EN_SHARED_BYTES \
    (4 * (EN_ROWS * EN_HIDDEN + EN_STAGES * (EN_ROWS + EN_COLS) * EN_STRIDE) + 12 * EN_ROWS)

// cp.async (sm_80+); below it every stage is copied through registers.
#if __CUDA_ARCH__ >= 800
#define EN_CP_ASYNC 1
#else
#define EN_CP_ASYNC 0
#endif

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


// A stage holds, per input row and per weight row (unit), EN_STAGE_BYTES of
// consecutive inputs in the row's own order (as in global memory, so cp.async
// copies them unchanged and the MMA operands read whole words), each staged row
// padded by 4 words so that the MMA fragments' reads (lane / 4 along the rows,
// lane % 4 along the words) and the Exact tile's 16-byte reads fall on
// different banks. In dynamic shared memory: EN_SHARED_BYTES, as in Rust.
struct alignas(16) EnShared {
    float act[EN_ROWS * EN_HIDDEN];                        // the tile's activations
    unsigned int x[EN_STAGES][EN_ROWS][EN_STRIDE];         // staged input rows
    unsigned int w[EN_STAGES][EN_COLS][EN_STRIDE];         // staged weight rows
    double row_loss[EN_ROWS];
    float row_hit[EN_ROWS];
};
static_assert(sizeof(EnShared) == EN_SHARED_BYTES, "EN_SHARED_BYTES is sizeof(EnShared)");

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

// The element type a layer's input rows are staged in: the input's own (the
// Exact kernels widen at the multiply), or for the TensorCore kernels the
// parameters' dtype (the hidden activations rounded to it as they are staged).
template <typename T, typename TIn, int Arith>
struct EnStaged {
    typedef TIn type;
};
template <typename T, typename TIn>
struct EnStaged<T, TIn, EN_ARITH_TF32> {
    typedef T type;
};
template <typename T, typename TIn>
struct EnStaged<T, TIn, EN_ARITH_PAIR> {
    typedef T type;
};

// Whether A and B are one type (NVRTC has no <type_traits>).
template <typename A, typename B>
struct EnSame {
    static constexpr bool value = false;
};
template <typename A>
struct EnSame<A, A> {
    static constexpr bool value = true;
};

// Inputs per stage: what fills a staged row of the wider of the two operands.
template <typename TA, typename TW>
__device__ __forceinline__ constexpr int en_stage_depth() {
    return EN_STAGE_BYTES / (sizeof(TA) > sizeof(TW) ? (int)sizeof(TA) : (int)sizeof(TW));
}

// Whether p points into global memory: cp.async reads only there, and a hidden
// layer's input rows may be the on-chip activations.
__device__ __forceinline__ bool en_is_global(const void* p) {
    unsigned int r;
    asm("{\n .reg .pred g;\n isspacep.global g, %1;\n selp.u32 %0, 1, 0, g;\n}"
        : "=r"(r)
        : "l"(p));
    return r != 0;
}

// 16 bytes from global memory to shared address `to` without passing through
// registers, the bytes past `bytes` zero-filled (none of them are read).
__device__ __forceinline__ void en_copy_async(unsigned int to, const void* from, int bytes) {
#if EN_CP_ASYNC
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;" ::"r"(to), "l"(from), "r"(bytes)
                 : "memory");
#endif
}

__device__ __forceinline__ void en_copy_commit() {
#if EN_CP_ASYNC
    asm volatile("cp.async.commit_group;" ::: "memory");
#endif
}

// Waits until at most `Pending` of this thread's committed copy groups are in flight.
template <int Pending>
__device__ __forceinline__ void en_copy_wait() {
#if EN_CP_ASYNC
    asm volatile("cp.async.wait_group %0;" ::"n"(Pending) : "memory");
#endif
}

// Two f32 as a word of two 16-bit TS, lo in the low half, rounded to nearest
// even: one cvt on sm_80+ (whose NaN is the canonical one), else lk_from_f32's.
template <typename TS>
__device__ __forceinline__ unsigned int en_pack2(float lo, float hi) {
#if EN_CP_ASYNC
    unsigned int r;
    if constexpr (EnSame<TS, lk_bf16>::value) {
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    } else {
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
        return r;
    }
#else
    return (unsigned int)lk_from_f32<TS>(lo).bits | ((unsigned int)lk_from_f32<TS>(hi).bits << 16);
#endif
}

// The 16 bytes of `left` (at most 16 / sizeof(TS)) elements at `from` as TS,
// zero past them, to shared address `to`; with `dir` (a Rounded scan's
// direction) each element formed as fl(w + fl(t d)) first.
template <typename TS, typename TSrc>
__device__ __forceinline__ void en_copy_sync(unsigned int to, const TSrc* from, int left,
                                             const TSrc* dir, float t) {
    constexpr int per = 16 / sizeof(TS);
    float v[per];
#pragma unroll
    for (int i = 0; i < per; ++i) {
        v[i] = i < left ? lk_to_f32(from[i]) : 0.0f;
        if (dir != nullptr && i < left) v[i] = en_perturbed<TS>(v[i], t, lk_to_f32(dir[i]));
    }
    uint4 q;
    unsigned int* word = &q.x;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        if constexpr (per == 4) {
            word[i] = __float_as_uint(v[i]);
        } else {
            word[i] = en_pack2<TS>(v[2 * i], v[2 * i + 1]);
        }
    }
    asm volatile("st.shared.v4.u32 [%0], {%1, %2, %3, %4};" ::"r"(to), "r"(q.x), "r"(q.y),
                 "r"(q.z), "r"(q.w)
                 : "memory");
}

// Operand rows for one stage: Rows staged rows (EN_STRIDE words each) from the
// rows of d_in inputs at `src`, of which the first `valid` exist, inputs k0 ..
// k0 + Depth as TS, zero past the rows' ends. `async` (a global source already
// in TS, 16-byte aligned rows, no direction): cp.async; else through registers.
struct EnOperand {
    const void* src;
    const void* dir;
    float t;
    lk_i64 d_in;
    int valid;
    bool async;
};

// A thread stages the same 16-byte part of every `step`-th row in every stage,
// so its chunks' shared and global addresses are fixed strides apart and one
// column bound serves them all. Its plan holds what that takes, worked out once
// per en_accumulate call: a stage only offsets it (staging is most of what the
// TensorCore kernels issue). An offset from src rather than pointers (both
// operands share it when their rows have one width and dtype) and 32-bit fields
// where they suffice, to keep down the registers it holds across the stage loop.
struct EnStagePlan {
    unsigned int to;   // shared address of the thread's first chunk in stage 0
    lk_i64 at;         // elements from src to that chunk's first input
    int col;           // that input's place in a stage's Depth inputs
    int rows;          // valid - its first row: its j-th row exists if j * step < rows
};

template <typename TS, int Depth, int Rows>
__device__ __forceinline__ EnStagePlan en_stage_plan(unsigned int (*ring)[Rows][EN_STRIDE],
                                                     const EnOperand& o) {
    constexpr int per = 16 / sizeof(TS);
    constexpr int chunks = Depth / per;
    constexpr int step = EN_THREADS / chunks;
    static_assert(EN_THREADS % chunks == 0 && Rows % step == 0, "whole chunks per thread");
    const int r0 = threadIdx.x / chunks;
    const int part = threadIdx.x % chunks;
    EnStagePlan p;
    p.to = lk_smem(&ring[0][r0][part * 4]);
    p.at = (lk_i64)r0 * o.d_in + part * per;
    p.col = part * per;
    p.rows = o.valid - r0;
    return p;
}

// Stage s of the ring (of Rows staged rows each): inputs k0 .. k0 + Depth.
template <typename TS, typename TSrc, int Depth, int Rows>
__device__ __forceinline__ void en_stage(const EnStagePlan& p, const EnOperand& o, int s,
                                         lk_i64 k0) {
    constexpr int per = 16 / sizeof(TS);
    constexpr int step = EN_THREADS / (Depth / per);
    constexpr unsigned int row_bytes = step * EN_STRIDE * 4;
    constexpr unsigned int stage_bytes = Rows * EN_STRIDE * 4;
    // k0 < d_in, so rest > 0 and, below Depth, exact as an int.
    const lk_i64 rest = o.d_in - k0;
    const int in_stage = rest < Depth ? (int)rest : Depth;
    const int in_row = in_stage < p.col ? 0 : (in_stage - p.col > per ? per : in_stage - p.col);
    const unsigned int to = p.to + s * stage_bytes;
    const TSrc* from = (const TSrc*)o.src + (p.at + k0);
    const lk_i64 row_step = (lk_i64)step * o.d_in;
    if (o.async) {
#pragma unroll
        for (int j = 0; j < Rows / step; ++j) {
            const int left = j * step < p.rows ? in_row : 0;
            en_copy_async(to + j * row_bytes, left > 0 ? (const void*)from : o.src,
                          left * (int)sizeof(TS));
            from += row_step;
        }
        return;
    }
    // j * row_step rather than stepping `from` and `dir`: fewer registers in the
    // Split kernels (which spill), at a cost small next to the conversions.
    const TSrc* dir = o.dir == nullptr ? nullptr : (const TSrc*)o.dir + (p.at + k0);
#pragma unroll 1
    for (int j = 0; j < Rows / step; ++j) {
        en_copy_sync<TS>(to + j * row_bytes, from + j * row_step, j * step < p.rows ? in_row : 0,
                         dir == nullptr ? nullptr : dir + j * row_step, o.t);
    }
}

// Warp w computes rows 32 (w / 4).. and units 32 (w % 4).. of the block's tile.
__device__ __forceinline__ int en_warp_row() { return (threadIdx.x >> 7) * 32; }
__device__ __forceinline__ int en_warp_col() { return ((threadIdx.x >> 5) & 3) * 32; }

// Exact: each thread holds rows r0 + 4 i (i < 8) and units c0 + 8 j (j < 4) of
// its warp's tile, accumulator 4 i + j; the strides put one 16-byte read of the
// warp on 4 (rows) or 8 (units) different staged rows, all on different banks.
__device__ __forceinline__ int en_fma_row0() { return en_warp_row() + ((threadIdx.x & 31) >> 3); }
__device__ __forceinline__ int en_fma_col0() { return en_warp_col() + (threadIdx.x & 7); }

// Inputs k .. k + 4 (k a multiple of 4) of a staged row, as f32: one 16-byte
// (f32) or 8-byte (16-bit) read.
template <typename TS>
__device__ __forceinline__ void en_load4(const unsigned int* row, int k, float v[4]) {
    if constexpr (sizeof(TS) == 4) {
        const float4 q = *reinterpret_cast<const float4*>(row + k);
        v[0] = q.x;
        v[1] = q.y;
        v[2] = q.z;
        v[3] = q.w;
    } else {
        const uint2 q = *reinterpret_cast<const uint2*>(row + k / 2);
        v[0] = en_half_to_f32<TS>(q.x & 0xffffu);
        v[1] = en_half_to_f32<TS>(q.x >> 16);
        v[2] = en_half_to_f32<TS>(q.y & 0xffffu);
        v[3] = en_half_to_f32<TS>(q.y >> 16);
    }
}

// One stage of Depth inputs, 4 at a time: a row's 4 inputs against the 4 units'
// (kept in registers across the rows), so each accumulator's fmaf chain takes
// the inputs in order.
template <typename TA, typename TW, int Depth>
__device__ __forceinline__ void en_fma_stage(const EnShared& sh, int s, float acc[EN_TILE]) {
    const int r0 = en_fma_row0();
    const int c0 = en_fma_col0();
#pragma unroll
    for (int k = 0; k < Depth; k += 4) {
        float w[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) en_load4<TW>(sh.w[s][c0 + 8 * j], k, w[j]);
#pragma unroll
        for (int i = 0; i < 8; ++i) {
            float h[4];
            en_load4<TA>(sh.x[s][r0 + 4 * i], k, h);
#pragma unroll
            for (int kk = 0; kk < 4; ++kk) {
#pragma unroll
                for (int j = 0; j < 4; ++j) {
                    acc[4 * i + j] = fmaf(w[j][kk], h[kk], acc[4 * i + j]);
                }
            }
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

// A staged word as an MMA operand: an f32 rounded to tf32, or two 16-bit inputs.
template <int Arith>
__device__ __forceinline__ unsigned int en_operand(unsigned int word) {
    if constexpr (Arith == EN_ARITH_TF32) {
        unsigned int r;
        asm("cvt.rna.tf32.f32 %0, %1;" : "=r"(r) : "f"(__uint_as_float(word)));
        return r;
    } else {
        return word;
    }
}

// Four 8 x 4-word matrices of staged rows, one per ldmatrix.x4 result: lane l
// gives the address of row l % 8 of matrix l / 8, and receives word (l / 4,
// l % 4) of each matrix, the MMA fragment layout above (a 32-bit word is two
// b16 as ldmatrix sees it, so the same serves tf32).
__device__ __forceinline__ void en_ldmatrix4(const unsigned int* row, unsigned int r[4]) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(lk_smem(row)));
}

// One stage (32 words of every staged row) in 4 MMA steps of 8 words. Per
// step: A tile mi is matrices (rows +0 / +8) x (words +0 / +4) in the order
// a0..a3; B tiles ni, ni + 1 are (units +0 / +8) x (words +0 / +4) in the
// order b0, b1 of ni, then of ni + 1.
template <typename T, int Arith>
__device__ __forceinline__ void en_mma_stage(const EnShared& sh, int s, float acc[EN_TILE]) {
    const int lane = threadIdx.x & 31;
    const int quad = lane >> 3;
    const int a_row = en_warp_row() + (lane & 7) + (quad & 1) * 8;
    const int a_word = (quad >> 1) * 4;
    const int b_unit = en_warp_col() + (lane & 7) + (quad >> 1) * 8;
    const int b_word = (quad & 1) * 4;
#pragma unroll
    for (int w0 = 0; w0 < EN_STAGE_BYTES / 4; w0 += 8) {
        unsigned int a[2][4];
        unsigned int b[4][2];
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
            en_ldmatrix4(&sh.x[s][a_row + 16 * mi][w0 + a_word], a[mi]);
#pragma unroll
            for (int q = 0; q < 4; ++q) a[mi][q] = en_operand<Arith>(a[mi][q]);
        }
#pragma unroll
        for (int pair = 0; pair < 2; ++pair) {
            unsigned int r[4];
            en_ldmatrix4(&sh.w[s][b_unit + 16 * pair][w0 + b_word], r);
#pragma unroll
            for (int q = 0; q < 4; ++q) b[2 * pair + q / 2][q % 2] = en_operand<Arith>(r[q]);
        }
#pragma unroll
        for (int mi = 0; mi < 2; ++mi) {
#pragma unroll
            for (int ni = 0; ni < 4; ++ni) en_mma<T, Arith>(acc + 4 * (4 * mi + ni), a[mi], b[ni]);
        }
    }
}

// The row and unit (within the block's 64 x 128 tile) of accumulator q.
template <int Arith>
__device__ __forceinline__ void en_out_at(int q, int& r, int& c) {
    if constexpr (Arith == EN_ARITH_FMA) {
        r = en_fma_row0() + 4 * (q >> 2);
        c = en_fma_col0() + 8 * (q & 3);
    } else {
        en_mma_out_at(q, r, c);
    }
}

// acc = in W^T over units wt.j0.. (no bias): the inputs in stages of Depth
// through an EN_STAGES-deep ring of shared-memory buffers, the copies for stage
// i + EN_STAGES - 1 in flight while stage i is multiplied. Ends with a barrier,
// after which `in` is no longer read (so the caller may overwrite it).
template <typename T, typename TIn, int Arith>
__device__ void en_accumulate(const EnOperand& in, const EnOperand& wt, float acc[EN_TILE],
                              EnShared& sh) {
    typedef typename EnStaged<T, TIn, Arith>::type TA;
    constexpr int depth = en_stage_depth<TA, T>();
#pragma unroll
    for (int q = 0; q < EN_TILE; ++q) acc[q] = 0.0f;
    const lk_i64 stages = (in.d_in + depth - 1) / depth;
    // A warp whose 32 x 32 outputs are all past the units or rows (a narrow
    // last layer, the batch's last tile) only stages.
    const bool busy = en_warp_col() < wt.valid && en_warp_row() < in.valid;
    const EnStagePlan x_plan = en_stage_plan<TA, depth>(sh.x, in);
    const EnStagePlan w_plan = en_stage_plan<T, depth>(sh.w, wt);
    const auto issue = [&](lk_i64 i) {
        const int s = (int)(i % EN_STAGES);
        en_stage<TA, TIn, depth, EN_ROWS>(x_plan, in, s, i * depth);
        en_stage<T, T, depth, EN_COLS>(w_plan, wt, s, i * depth);
    };
#pragma unroll
    for (int i = 0; i < EN_STAGES - 1; ++i) {
        if (i < stages) issue(i);
        en_copy_commit();
    }
    for (lk_i64 i = 0; i < stages; ++i) {
        en_copy_wait<EN_STAGES - 2>();
        // Stage i has landed for every thread, and every thread is done with
        // stage i - 1, whose buffer the next copies overwrite.
        __syncthreads();
        if (i + EN_STAGES - 1 < stages) issue(i + EN_STAGES - 1);
        en_copy_commit();
        if (!busy) continue;
        if constexpr (Arith == EN_ARITH_FMA) {
            en_fma_stage<TA, T, depth>(sh, (int)(i % EN_STAGES), acc);
        } else {
            en_mma_stage<T, Arith>(sh, (int)(i % EN_STAGES), acc);
        }
    }
    en_copy_wait<0>();
    __syncthreads();
}

// The distinct units among a thread's accumulators: 4 (Exact: q % 4) or 8 (MMA:
// n-tile (q / 4) % 4, column q % 2), and accumulator first_of(u) of unit u.
template <int Arith>
__device__ __forceinline__ constexpr int en_units() {
    return Arith == EN_ARITH_FMA ? 4 : 8;
}
template <int Arith>
__device__ __forceinline__ constexpr int en_unit_of(int q) {
    return Arith == EN_ARITH_FMA ? (q & 3) : ((q >> 2) & 3) * 2 + (q & 1);
}
template <int Arith>
__device__ __forceinline__ constexpr int en_first_of(int u) {
    return Arith == EN_ARITH_FMA ? u : 4 * (u >> 1) + (u & 1);
}

// Bias, Split combination and ReLU of one column pass's accumulators into out
// (and out_d: a scan's shared first layer). acc_d (the D h part) only for SPLIT.
// Each unit's bias (a Rounded scan's formed once) is read once per pass.
template <typename T, int Arith, bool Split>
__device__ __forceinline__ void en_epilogue(const EnLayer<T>& p, int mode, bool relu, int rows,
                                            lk_i64 j0, const float acc[EN_TILE],
                                            const float* acc_d, float* out, float* out_d) {
    constexpr int units = en_units<Arith>();
    float bias[units];
    float bias_d[units];
#pragma unroll
    for (int u = 0; u < units; ++u) {
        int r;
        int c;
        en_out_at<Arith>(en_first_of<Arith>(u), r, c);
        const lk_i64 j = j0 + c;
        bias[u] = 0.0f;
        bias_d[u] = 0.0f;
        if (j >= p.d_out) continue;
        bias[u] = lk_to_f32(p.b[j]);
        if (mode == EN_ROUNDED) bias[u] = en_perturbed<T>(bias[u], p.t, lk_to_f32(p.db[j]));
        if (Split) bias_d[u] = lk_to_f32(p.db[j]);
    }
#pragma unroll
    for (int q = 0; q < EN_TILE; ++q) {
        int r;
        int c;
        en_out_at<Arith>(q, r, c);
        const lk_i64 j = j0 + c;
        if (r >= rows || j >= p.d_out) continue;
        const lk_i64 at = (lk_i64)r * p.d_out + j;
        const float b = bias[en_unit_of<Arith>(q)];
        float v = b + acc[q];
        if constexpr (Split) {
            const float part_d = bias_d[en_unit_of<Arith>(q)] + acc_d[q];
            if (out_d != nullptr) {
                out[at] = v;
                out_d[at] = part_d;
                continue;
            }
            v = v + p.t * part_d;
        }
        out[at] = en_relu(v, relu);
    }
}

// The layer on the tile's `rows` rows of `in` ([rows, d_in], row-major):
// out[r, j] = b_j + sum_i w_ji in[r, i] (ReLU when `relu`). SPLIT with `out_d`
// (a scan's shared first layer) writes b0 + W0 in to out and db + D in to out_d.
// `out` may be `in` (the on-chip activations, d_out <= EN_COLS): every read of
// `in` ends before the first write. Ends with a barrier: `out` is complete for
// the next layer. SPLIT (the Split kernels, with their 64 accumulators live)
// has kernels of its own, so that the other modes keep only 32 live.
template <typename T, typename TIn, int Arith, bool Split>
__device__ void en_layer(const TIn* in, int rows, const EnLayer<T>& p, int mode, bool relu,
                         float* out, float* out_d, EnShared& sh) {
    typedef typename EnStaged<T, TIn, Arith>::type TA;
    const EnOperand src = {in, nullptr, 0.0f, p.d_in, rows,
                           EN_CP_ASYNC && EnSame<TA, TIn>::value && en_is_global(in) &&
                               en_aligned(in, 16) && p.d_in * sizeof(TIn) % 16 == 0};
    const bool weights_async = EN_CP_ASYNC && p.d_in * sizeof(T) % 16 == 0 &&
                               en_aligned(p.w, 16) && (p.dw == nullptr || en_aligned(p.dw, 16));
    for (lk_i64 j0 = 0; j0 < p.d_out; j0 += EN_COLS) {
        float acc[EN_TILE];
        const int units = (int)(p.d_out - j0 < EN_COLS ? p.d_out - j0 : EN_COLS);
        const T* dw = p.dw == nullptr ? nullptr : p.dw + j0 * p.d_in;
        const bool rounded = mode == EN_ROUNDED;
        const EnOperand w = {p.w + j0 * p.d_in, rounded ? dw : nullptr, p.t, p.d_in, units,
                             weights_async && !rounded};
        if constexpr (Split) {
            float acc_d[EN_TILE];
            const EnOperand d = {dw, nullptr, 0.0f, p.d_in, units, weights_async};
            en_accumulate<T, TIn, Arith>(src, d, acc_d, sh);
            en_accumulate<T, TIn, Arith>(src, w, acc, sh);
            en_epilogue<T, Arith, true>(p, mode, relu, rows, j0, acc, acc_d, out, out_d);
        } else {
            en_accumulate<T, TIn, Arith>(src, w, acc, sh);
            en_epilogue<T, Arith, false>(p, mode, relu, rows, j0, acc, nullptr, out, out_d);
        }
    }
    __syncthreads();
}

// Up to this many classes a row's loss is one thread's loop (64 threads busy),
// past it a warp's (the classes strided over the lanes).
#define EN_THREAD_CLASSES 32

// The cross-entropies and right argmaxes of the tile's rows from their logits
// z [rows, C] into sh.row_loss / sh.row_hit, G lanes per row (1 or a warp);
// writes the logits when asked.
template <int G>
__device__ void en_rows_loss(const EnsembleArgs& a, const float* z, int rows, lk_i64 row0,
                             lk_i64 e, EnShared& sh) {
    const lk_i64 classes = a.widths[a.layers];
    const int lane = threadIdx.x % G;
    for (int r = threadIdx.x / G; r < EN_ROWS; r += EN_THREADS / G) {
        double loss = 0.0;
        float hit = 0.0f;
        if (r < rows) {
            const float* zr = z + (lk_i64)r * classes;
            // The first max: within a lane the classes ascend; across lanes the
            // lower index wins a tie. NaN never wins (as in the reference after z_0).
            float m = -LK_INF_F;
            lk_i64 arg = classes;
            for (lk_i64 c = lane; c < classes; c += G) {
                if (zr[c] > m) {
                    m = zr[c];
                    arg = c;
                }
            }
            if constexpr (G > 1) {
#pragma unroll
                for (int offset = G / 2; offset > 0; offset >>= 1) {
                    const float other_m = __shfl_down_sync(0xffffffffu, m, offset);
                    const lk_i64 other_arg = __shfl_down_sync(0xffffffffu, arg, offset);
                    if (other_m > m || (other_m == m && other_arg < arg)) {
                        m = other_m;
                        arg = other_arg;
                    }
                }
                m = __shfl_sync(0xffffffffu, m, 0);
                arg = __shfl_sync(0xffffffffu, arg, 0);
            }
            float s = 0.0f;
            for (lk_i64 c = lane; c < classes; c += G) s += expf(zr[c] - m);
            if constexpr (G > 1) s = __shfl_sync(0xffffffffu, lk_warp_reduce(s, lk_sum_op()), 0);
            const lk_i64 y = a.labels[row0 + r];
            const bool valid = y >= 0 && y < classes;
            loss = valid ? (double)((m + logf(s)) - zr[y]) : (double)LK_NAN_F;
            hit = valid && arg == y ? 1.0f : 0.0f;
            if (a.logits != nullptr) {
                float* out = a.logits + (e * a.batch + row0 + r) * classes;
                for (lk_i64 c = lane; c < classes; c += G) out[c] = zr[c];
            }
        }
        if (lane == 0) {
            sh.row_loss[r] = loss;
            sh.row_hit[r] = hit;
        }
    }
}

// The tile's rows' losses and right argmaxes, summed in row order into model
// e's slot.
__device__ void en_loss(const EnsembleArgs& a, const float* z, int rows, lk_i64 row0, lk_i64 e,
                        lk_i64 tile, EnShared& sh) {
    static_assert(EN_THREADS >= EN_ROWS, "a thread per row");
    if (a.widths[a.layers] <= EN_THREAD_CLASSES) {
        en_rows_loss<1>(a, z, rows, row0, e, sh);
    } else {
        en_rows_loss<32>(a, z, rows, row0, e, sh);
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
template <typename T, int Arith, bool Split>
__device__ void en_run_layers(const EnsembleArgs& a, int from, lk_i64 e, lk_i64 k, float t,
                              int rows, lk_i64 row0, lk_i64 tile, float* const act[2],
                              EnShared& sh) {
    for (int l = from; l < a.layers; ++l) {
        const EnLayer<T> p = en_params<T>(a, l, e, k, t);
        const bool relu = l + 1 < a.layers;
        if (l == 0) {
            en_layer<T, T, Arith, Split>(en_input<T>(a, e, row0), rows, p, a.mode, relu, act[0],
                                         nullptr, sh);
        } else {
            en_layer<T, float, Arith, Split>(act[(l - 1) & 1], rows, p, a.mode, relu,
                                             act[l & 1], nullptr, sh);
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
    en_layer<T, T, Arith, true>(en_input<T>(a, 0, row0), rows, en_params<T>(a, 0, 0, k, 0.0f),
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
        en_run_layers<T, Arith, true>(a, 1, e, k, t, rows, row0, tile, act, sh);
    }
}

// Split: the kernels for a Split scan (a.mode == EN_SPLIT), the others for a
// forward or a Rounded scan; the host launches the one that matches.
template <typename T, int Arith, bool Split>
__device__ void ensemble_mlp(const EnsembleArgs& a) {
    extern __shared__ __align__(16) unsigned char en_shared[];
    EnShared& sh = *reinterpret_cast<EnShared*>(en_shared);
    float* scratch = a.scratch != nullptr ? a.scratch + (lk_i64)blockIdx.x * a.scratch_stride
                                          : nullptr;
    float* const act[2] = {
        a.act_floats == 0 ? sh.act : scratch,
        a.act_floats == 0 ? sh.act : scratch + a.act_floats,
    };
    float* parts = scratch == nullptr ? nullptr : scratch + 2 * a.act_floats;
    const lk_i64 groups = Split ? a.directions : a.models;
    const lk_i64 work = a.tiles * groups;
    for (lk_i64 item = blockIdx.x; item < work; item += gridDim.x) {
        // Tile-major: the groups of one tile run side by side and share its X in L2.
        const lk_i64 tile = item / groups;
        const lk_i64 group = item % groups;
        const lk_i64 row0 = tile * EN_ROWS;
        const int rows = (int)(a.batch - row0 < EN_ROWS ? a.batch - row0 : EN_ROWS);
        if constexpr (Split) {
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
        en_run_layers<T, Arith, false>(a, 0, group, k, t, rows, row0, tile, act, sh);
    }
}

// Two blocks per multiprocessor: 2 x 87 KB of shared memory and at most 128
// registers a thread.
#define EN_BOUNDS __launch_bounds__(EN_THREADS, 2)

#define EN_KERNELS(suffix, T, arith)                                                   \
    extern "C" __global__ void EN_BOUNDS ensemble_mlp_##suffix(EnsembleArgs a) {        \
        ensemble_mlp<T, arith, false>(a);                                               \
    }                                                                                   \
    extern "C" __global__ void EN_BOUNDS ensemble_split_##suffix(EnsembleArgs a) {      \
        ensemble_mlp<T, arith, true>(a);                                                \
    }

EN_KERNELS(f32, float, EN_ARITH_FMA)
EN_KERNELS(f16, lk_f16, EN_ARITH_FMA)
EN_KERNELS(bf16, lk_bf16, EN_ARITH_FMA)

// mma.sync and cvt.rna.tf32 need sm_80; the host launches these only there, and
// below it they compile to the Exact kernels (which the TensorCore bound covers).
#if __CUDA_ARCH__ >= 800
#define EN_TC_TF32 EN_ARITH_TF32
#define EN_TC_PAIR EN_ARITH_PAIR
#else
#define EN_TC_TF32 EN_ARITH_FMA
#define EN_TC_PAIR EN_ARITH_FMA
#endif

EN_KERNELS(tc_f32, float, EN_TC_TF32)
EN_KERNELS(tc_f16, lk_f16, EN_TC_PAIR)
EN_KERNELS(tc_bf16, lk_bf16, EN_TC_PAIR)

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
