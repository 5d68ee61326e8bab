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
//   ensemble_mlp_{f32,f16,bf16}  a block per (batch tile of 32 rows, model), or
//                                for a Split scan per (tile, direction k): the
//                                tile goes through every layer, its activations
//                                in shared memory when every width after the
//                                input is at most 128 (else in the block's
//                                global scratch, which stays in L2), weights
//                                staged through shared memory 64 units x 16
//                                inputs at a time; each output is one fmaf
//                                chain in input order. Then the tile's rows'
//                                cross-entropies (f32), summed in f64 in row
//                                order with the count of right argmaxes into
//                                the (model, tile) slot.
//   ensemble_finalize            a block per model: its slots in f64, in tile
//                                order then the fixed tree: loss and accuracy.
//
// Modes: FORWARD reads model e's own parameters. ROUNDED forms each weight as
// it is staged: fl(w0 + fl(t d)) in the parameters' dtype, each operation in f32
// (__fmul_rn / __fadd_rn: no contraction), exactly as the reference rounds it.
// SPLIT computes b0 + W0 h and db + D h side by side and adds them as
// (b0 + W0 h) + t (db + D h); its first layer is computed once per (tile, k) and
// shared by every distance on direction k.
//
// Labels out of range give that row a NaN loss (never an out-of-bounds read); a
// model whose k is out of range gets NaN logits and loss. No float atomics: the
// same input gives the same bits. Offsets are 64-bit.

#define EN_ROWS 32
#define EN_COLS 64
#define EN_K 16
#define EN_THREADS 256
#define EN_WARPS (EN_THREADS / 32)
#define EN_HIDDEN 128
#define EN_MAX_LAYERS 8

#define EN_FORWARD 0
#define EN_ROUNDED 1
#define EN_SPLIT 2

static_assert(EN_WARPS * 4 == EN_ROWS, "each warp computes 4 rows of the tile");
static_assert(EN_COLS == 64, "each lane computes units lane and lane + 32");

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

struct EnShared {
    float act[2][EN_ROWS * EN_HIDDEN];   // activations of the tile, ping-pong
    float h[EN_ROWS][EN_K + 1];          // the staged input chunk
    // The staged weights (W or W0, and D); the pad spreads the staging stores
    // (16 inputs of 2 units per warp) over the banks.
    float w[2][EN_K][EN_COLS + 1];
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

// The layer on the tile's `rows` rows of `in` ([rows, d_in], row-major):
// out[r, j] = b_j + sum_i w_ji in[r, i] (ReLU when `relu`). SPLIT with `out_d`
// (a scan's shared first layer) writes b0 + W0 in to out and db + D in to out_d.
// Ends with a barrier: `out` is complete for the next layer.
template <typename T, typename TIn>
__device__ void en_layer(const TIn* in, int rows, const EnLayer<T>& p, int mode, bool relu,
                         float* out, float* out_d, EnShared& sh) {
    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int row_base = (tid >> 5) * 4;
    const bool both = mode == EN_SPLIT;
    for (lk_i64 j0 = 0; j0 < p.d_out; j0 += EN_COLS) {
        float acc[4][2];
        float acc_d[4][2];
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            acc[i][0] = acc[i][1] = 0.0f;
            acc_d[i][0] = acc_d[i][1] = 0.0f;
        }
        for (lk_i64 k0 = 0; k0 < p.d_in; k0 += EN_K) {
            for (int q = tid; q < EN_ROWS * EN_K; q += EN_THREADS) {
                const int r = q / EN_K;
                const lk_i64 k = k0 + q % EN_K;
                sh.h[r][q % EN_K] =
                    (r < rows && k < p.d_in) ? lk_to_f32(in[(lk_i64)r * p.d_in + k]) : 0.0f;
            }
            for (int q = tid; q < EN_COLS * EN_K; q += EN_THREADS) {
                const int c = q / EN_K;
                const int kk = q % EN_K;
                const lk_i64 j = j0 + c;
                const lk_i64 k = k0 + kk;
                float v = 0.0f;
                float vd = 0.0f;
                if (j < p.d_out && k < p.d_in) {
                    const lk_i64 at = j * p.d_in + k;
                    v = lk_to_f32(p.w[at]);
                    if (mode != EN_FORWARD) vd = lk_to_f32(p.dw[at]);
                    if (mode == EN_ROUNDED) v = en_perturbed<T>(v, p.t, vd);
                }
                sh.w[0][kk][c] = v;
                sh.w[1][kk][c] = vd;
            }
            __syncthreads();
#pragma unroll
            for (int kk = 0; kk < EN_K; ++kk) {
                const float w_lo = sh.w[0][kk][lane];
                const float w_hi = sh.w[0][kk][lane + 32];
                const float d_lo = sh.w[1][kk][lane];
                const float d_hi = sh.w[1][kk][lane + 32];
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const float h = sh.h[row_base + i][kk];
                    acc[i][0] = fmaf(w_lo, h, acc[i][0]);
                    acc[i][1] = fmaf(w_hi, h, acc[i][1]);
                    if (both) {
                        acc_d[i][0] = fmaf(d_lo, h, acc_d[i][0]);
                        acc_d[i][1] = fmaf(d_hi, h, acc_d[i][1]);
                    }
                }
            }
            __syncthreads();
        }
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
            for (int c = 0; c < 2; ++c) {
                const int r = row_base + i;
                const lk_i64 j = j0 + lane + 32 * c;
                if (r >= rows || j >= p.d_out) continue;
                const lk_i64 at = (lk_i64)r * p.d_out + j;
                const float b = lk_to_f32(p.b[j]);
                float v;
                if (mode == EN_FORWARD) {
                    v = b + acc[i][c];
                } else if (mode == EN_ROUNDED) {
                    v = en_perturbed<T>(b, p.t, lk_to_f32(p.db[j])) + acc[i][c];
                } else {
                    const float part_d = lk_to_f32(p.db[j]) + acc_d[i][c];
                    if (out_d != nullptr) {
                        out[at] = b + acc[i][c];
                        out_d[at] = part_d;
                        continue;
                    }
                    v = (b + acc[i][c]) + p.t * part_d;
                }
                out[at] = en_relu(v, relu);
            }
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
// act[l & 1]), then the loss of the last layer's logits.
template <typename T>
__device__ void en_run_layers(const EnsembleArgs& a, int from, lk_i64 e, lk_i64 k, float t,
                              int rows, lk_i64 row0, lk_i64 tile, float* const act[2],
                              EnShared& sh) {
    for (int l = from; l < a.layers; ++l) {
        const EnLayer<T> p = en_params<T>(a, l, e, k, t);
        const bool relu = l + 1 < a.layers;
        if (l == 0) {
            en_layer<T, T>(en_input<T>(a, e, row0), rows, p, a.mode, relu, act[0], nullptr, sh);
        } else {
            en_layer<T, float>(act[(l - 1) & 1], rows, p, a.mode, relu, act[l & 1], nullptr, sh);
        }
    }
    en_loss(a, act[(a.layers - 1) & 1], rows, row0, e, tile, sh);
}

// Split scan, direction k: the first layer's parts once, then every model on k.
template <typename T>
__device__ void en_split_direction(const EnsembleArgs& a, lk_i64 k, int rows, lk_i64 row0,
                                   lk_i64 tile, float* const act[2], float* parts,
                                   EnShared& sh) {
    const lk_i64 d1 = a.widths[1];
    float* base = parts;
    float* slope = parts + (lk_i64)EN_ROWS * d1;
    en_layer<T, T>(en_input<T>(a, 0, row0), rows, en_params<T>(a, 0, 0, k, 0.0f), EN_SPLIT, false,
                   base, slope, sh);
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
        en_run_layers<T>(a, 1, e, k, t, rows, row0, tile, act, sh);
    }
}

template <typename T>
__device__ void ensemble_mlp(const EnsembleArgs& a) {
    __shared__ EnShared sh;
    float* scratch = a.scratch != nullptr ? a.scratch + (lk_i64)blockIdx.x * a.scratch_stride
                                          : nullptr;
    float* const act[2] = {
        a.act_floats == 0 ? sh.act[0] : scratch,
        a.act_floats == 0 ? sh.act[1] : scratch + a.act_floats,
    };
    float* parts = scratch == nullptr ? nullptr : scratch + 2 * a.act_floats;
    const lk_i64 groups = a.mode == EN_SPLIT ? a.directions : a.models;
    const lk_i64 work = a.tiles * groups;
    for (lk_i64 item = blockIdx.x; item < work; item += gridDim.x) {
        const lk_i64 group = item / a.tiles;
        const lk_i64 tile = item % a.tiles;
        const lk_i64 row0 = tile * EN_ROWS;
        const int rows = (int)(a.batch - row0 < EN_ROWS ? a.batch - row0 : EN_ROWS);
        if (a.mode == EN_SPLIT) {
            en_split_direction<T>(a, group, rows, row0, tile, act, parts, sh);
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
        en_run_layers<T>(a, 0, group, k, t, rows, row0, tile, act, sh);
    }
}

extern "C" __global__ void __launch_bounds__(EN_THREADS) ensemble_mlp_f32(EnsembleArgs a) {
    ensemble_mlp<float>(a);
}
extern "C" __global__ void __launch_bounds__(EN_THREADS) ensemble_mlp_f16(EnsembleArgs a) {
    ensemble_mlp<lk_f16>(a);
}
extern "C" __global__ void __launch_bounds__(EN_THREADS) ensemble_mlp_bf16(EnsembleArgs a) {
    ensemble_mlp<lk_bf16>(a);
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
