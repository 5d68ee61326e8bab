// xent.cu: fused softmax / cross-entropy with entropy, argmax, the logit gaps
// and the softmax convergence radius, plus the batch reduction and the grad.
// Semantics: reference/src/xent.rs (the f64 definition) and DESIGN.md.
//
// Three kernels run in order on one stream:
//   xent_fwd_{f32,f16,bf16}   one block per row (grid-stride over rows): reads
//                             the row once, writes every per-row output and
//                             the scratch the other two need.
//   xent_reduce               ONE block: reduced loss, reduced rho, and the
//                             grad scale (1 / sum of row weights for mean).
//   xent_grad_{f32,f16,bf16}  one block per row: reads the row again and
//                             writes d(reduced loss)/dz in f32 or the logits'
//                             dtype (args.grad_f32).
//
// Every thread walks its columns k = tid, tid + blockDim, ... in ascending
// order, then the block reduces with common.cuh's fixed tree: deterministic.
// Row offsets are 64-bit (B * V may pass 2^31); column indices within a row
// are 32-bit (the host refuses V >= 2^31). A NaN or +inf is not tested per
// column: it makes s NaN, and only such a row is read a second time, for the
// index of its first NaN (its argmax).
//
// With x = z / T and p = softmax(x), a row's loss is sum_k c_k (lse - x_k)
// (+ z_loss lse^2), where c_k is the coefficient of -log p_k. Expanding
// lse = m + log s (m the row max, s = sum e^(x - m)):
//   loss = C_f log s + D,   C_f = sum c_k over finite x_k,
//                           D   = sum c_k (m - x_k) over finite x_k
//                                 (+ c_k * inf for x_k = -inf, c_k != 0),
// two non-negative terms for non-negative c, so no cancellation; D is kept
// against the running max and shifted by C_f (m' - m) when the max moves.
// For class targets, the (1 - eps) w_y part of c_y is added by thread 0 from
// x_y directly, so the common unsmoothed case accumulates no c at all.
//
// The temperature is applied as x = z / T with T rounded to f32 and a
// correctly rounded division (NVRTC's default -prec-div=true), skipped for
// T = 1: x is exact for T = 1 and any power of two, and otherwise within
// 1 ulp of z / T_f. Multiplying by a precomputed 1/T would add a second
// rounding (and make T = 3 inexact where z / 3 is correctly rounded).

// Must match XentFwdArgs in src/cuda/xent.rs field for field.
struct XentFwdArgs {
    const void* logits;           // [B, row_stride] of T
    const lk_i64* labels;         // [B] or null (soft targets)
    const void* soft;             // [B, V] of T (or f32 when soft_f32) or null
    const float* weights;         // [V] or null
    float* loss_row;              // [B]
    float* lse;                   // [B]
    float* entropy;               // [B]
    float* max;                   // [B]
    float* min;                   // [B]
    float* top2_gap;              // [B]
    float* delta;                 // [B]
    lk_i64* argmax;               // [B]
    float* row_weight;            // [B] scratch: denominator share of the row
    float* coef_sum;              // [B] scratch: sum_k c_k (0 for ignored rows)
    float* sumexp;                // [B] scratch: s = sum e^(x - m)
    float* rho;                   // [B] when rho_per_sample, else null
    lk_i64 batch;
    lk_i64 classes;
    lk_i64 row_stride;
    lk_i64 ignore_index;
    double rho_eps;
    double rho_cap;
    double rho_floor;
    float temperature;
    float one_minus_eps;          // 1 - label_smoothing, rounded once on the host
    float eps_per_class;          // label_smoothing / V, rounded once on the host
    float z_loss;
    int soft_f32;
    int gap_top2;
    int rho_per_sample;
    int rho_inf_if_small;
    int has_cap;
    int has_floor;
};
static_assert(sizeof(XentFwdArgs) == 224, "XentFwdArgs layout drifted from src/cuda/xent.rs");

// Must match XentReduceArgs in src/cuda/xent.rs.
struct XentReduceArgs {
    const float* loss_row;        // [B]
    const float* row_weight;      // [B]
    const float* delta;           // [B]
    float* loss;                  // [1]
    float* rho;                   // [1], or null for per-sample rho
    double* scale;                // [1] scratch: the grad's reduction scale
    lk_i64 batch;
    double rho_eps;
    double rho_cap;
    double rho_floor;
    int reduction;                // 0 none, 1 mean, 2 sum
    int rho_max;                  // 1: reduce Delta by max, 0: by mean
    int rho_inf_if_small;
    int has_cap;
    int has_floor;
    int pad_;
};
static_assert(sizeof(XentReduceArgs) == 104, "XentReduceArgs layout drifted from src/cuda/xent.rs");

// Must match XentGradArgs in src/cuda/xent.rs.
struct XentGradArgs {
    const void* logits;           // [B, row_stride] of T
    const lk_i64* labels;         // [B] or null
    const void* soft;             // [B, V] or null
    const float* weights;         // [V] or null
    const float* max;             // [B] from xent_fwd
    const float* sumexp;          // [B] from xent_fwd
    const float* lse;             // [B] from xent_fwd
    const float* coef_sum;        // [B] from xent_fwd
    const double* scale;          // [1] from xent_reduce
    void* grad;                   // [B, V] of T, or f32 when grad_f32
    lk_i64 batch;
    lk_i64 classes;
    lk_i64 row_stride;
    lk_i64 ignore_index;
    double temperature_f64;
    float temperature;
    float one_minus_eps;
    float eps_per_class;
    float z_loss;
    int soft_f32;
    int grad_f32;
};
static_assert(sizeof(XentGradArgs) == 144, "XentGradArgs layout drifted from src/cuda/xent.rs");

// rho = pi / (delta + eps), then inf_if_small, cap, floor (reference
// rho_from_delta); NaN stays NaN since every test is a plain comparison.
__device__ __forceinline__ float xent_rho(double delta, double eps, int inf_if_small, int has_cap,
                                          double cap, int has_floor, double floor_) {
    double rho = (inf_if_small && delta < eps) ? LK_INF_D : LK_PI / (delta + eps);
    if (has_cap && rho > cap) rho = cap;
    if (has_floor && rho < floor_) rho = floor_;
    return (float)rho;
}

// ---------------------------------------------------------------------------
// Target policies: the coefficient c_k each column adds to the accumulators.

// No per-column coefficient: unsmoothed class targets and ignored rows.
struct XentClassPlain {
    enum { kCoef = 0 };
    __device__ __forceinline__ float coef(int) const { return 0.0f; }
};

// Label smoothing over class targets: c_k = eps/V * w_k (the (1 - eps) w_y
// part of c_y is added separately).
struct XentClassSmooth {
    enum { kCoef = 1 };
    const float* weights;
    float eps_per_class;
    __device__ __forceinline__ float coef(int k) const {
        return weights ? eps_per_class * weights[k] : eps_per_class;
    }
};

// Soft targets: c_k = w_k ((1 - eps) q_k + eps/V).
template <typename TQ>
struct XentSoft {
    enum { kCoef = 1 };
    const TQ* q;  // this row's targets
    const float* weights;
    float one_minus_eps;
    float eps_per_class;
    __device__ __forceinline__ float coef(int k) const {
        const float target = fmaf(one_minus_eps, lk_to_f32(q[k]), eps_per_class);
        return weights ? weights[k] * target : target;
    }
};

// ---------------------------------------------------------------------------
// Forward accumulator.

struct XentAcc {
    lk_softmax sm;   // m is top1, the max ignoring NaN
    float top2;      // second largest of the multiset (ties give top2 = top1)
    float mn;
    float cf;        // sum c_k over x_k > -inf
    float d;         // sum c_k (m - x_k) over x_k > -inf, plus c_k * inf at -inf
    float call;      // sum c_k over all k
    int arg_i;       // first index holding top1 (LK_I32_MAX: no column)
};

__device__ __forceinline__ XentAcc xent_acc_identity() {
    XentAcc a;
    a.sm = lk_softmax_identity();
    a.top2 = -LK_INF_F;
    a.mn = LK_INF_F;
    a.cf = 0.0f;
    a.d = 0.0f;
    a.call = 0.0f;
    a.arg_i = LK_I32_MAX;
    return a;
}

__device__ __forceinline__ XentAcc lk_shfl_down(const XentAcc& a, int offset) {
    XentAcc r;
    r.sm.m = lk_shfl_down(a.sm.m, offset);
    r.sm.s = lk_shfl_down(a.sm.s, offset);
    r.sm.t = lk_shfl_down(a.sm.t, offset);
    r.top2 = lk_shfl_down(a.top2, offset);
    r.mn = lk_shfl_down(a.mn, offset);
    r.cf = lk_shfl_down(a.cf, offset);
    r.d = lk_shfl_down(a.d, offset);
    r.call = lk_shfl_down(a.call, offset);
    r.arg_i = lk_shfl_down(a.arg_i, offset);
    return r;
}

__device__ __forceinline__ XentAcc lk_combine(const XentAcc& a, const XentAcc& b) {
    XentAcc r;
    r.sm = lk_softmax_merge(a.sm, b.sm);
    // Second largest of the union: the smaller top1 or the larger top2.
    r.top2 = fmaxf(fminf(a.sm.m, b.sm.m), fmaxf(a.top2, b.top2));
    r.mn = fminf(a.mn, b.mn);
    // Shift each D to the common max; C_f = 0 means nothing to shift (and
    // avoids 0 * inf when that part's max is -inf).
    r.d = a.d + b.d;
    if (a.cf != 0.0f) r.d = fmaf(a.cf, r.sm.m - a.sm.m, r.d);
    if (b.cf != 0.0f) r.d = fmaf(b.cf, r.sm.m - b.sm.m, r.d);
    r.cf = a.cf + b.cf;
    r.call = a.call + b.call;
    // The first index of the larger top1; on a tie the lower index.
    if (a.sm.m > b.sm.m) {
        r.arg_i = a.arg_i;
    } else if (b.sm.m > a.sm.m) {
        r.arg_i = b.arg_i;
    } else {
        r.arg_i = a.arg_i < b.arg_i ? a.arg_i : b.arg_i;
    }
    return r;
}

// Columns per thread per step: the loads are issued together, then the
// step's max is found first so its exponentials are independent of each other
// (the accumulators are rescaled at most once per step rather than chained
// element by element). 4 measured faster than 8 for bf16 on an H200 (fewer
// registers); the 2-byte dtypes still want 16-byte vector loads.
#define XENT_UNROLL 4

// Accumulates one step of U columns k[u] (ascending), x[u] = z / T; columns
// past the row end come as x = -inf, c = 0 with valid[u] false.
template <int U, int kCoef>
__device__ __forceinline__ void xent_step(XentAcc& a, const float* x, const float* c, const int* k,
                                          const bool* valid) {
    float top1 = a.sm.m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (valid[u]) a.mn = fminf(a.mn, x[u]);
        // Branch-free second largest; a NaN (row reported NaN anyway) changes nothing that matters.
        a.top2 = fmaxf(a.top2, fminf(top1, x[u]));
        // Strictly greater keeps the first index of the max within the thread.
        if (x[u] > top1) {
            top1 = x[u];
            a.arg_i = k[u];
        }
    }
    if (top1 > a.sm.m) {
        if (a.sm.m != -LK_INF_F) {
            // Nothing above -inf yet means s = t = C_f = 0: nothing to rescale.
            const float dm = a.sm.m - top1;  // < 0
            const float r = expf(dm);
            a.sm.t = r * fmaf(a.sm.s, dm, a.sm.t);
            a.sm.s = r * a.sm.s;
            if (kCoef) a.d = fmaf(a.cf, -dm, a.d);
        }
        a.sm.m = top1;
    }
    const float m = a.sm.m;
#pragma unroll
    for (int u = 0; u < U; ++u) {
        if (x[u] != -LK_INF_F) {
            // Finite: p_k > 0. A NaN or +inf lands here too and makes s NaN,
            // which is how the row is found bad without a test per column.
            const float dx = x[u] - m;  // <= 0
            const float e = expf(dx);
            a.sm.s += e;
            a.sm.t = fmaf(e, dx, a.sm.t);
            if (kCoef) {
                a.cf += c[u];
                a.d = fmaf(c[u], -dx, a.d);
            }
        } else if (kCoef && c[u] != 0.0f) {
            // p_k = 0: -log p_k = +inf where c_k != 0 (0 * inf is taken as 0).
            a.d += c[u] * LK_INF_F;
        }
        if (kCoef) a.call += c[u];
    }
}

// The first column of a row holding a NaN (LK_I32_MAX: none), by the whole block.
struct XentFirst {
    int i;
};

__device__ __forceinline__ XentFirst lk_shfl_down(const XentFirst& a, int offset) {
    XentFirst r;
    r.i = lk_shfl_down(a.i, offset);
    return r;
}

__device__ __forceinline__ XentFirst lk_combine(const XentFirst& a, const XentFirst& b) {
    return a.i < b.i ? a : b;
}

template <typename T>
__device__ __forceinline__ int xent_first_nan(const T* z, int V) {
    XentFirst first;
    first.i = LK_I32_MAX;
    for (int k = threadIdx.x; k < V; k += blockDim.x) {
        const float v = lk_to_f32(z[k]);
        if (v != v) {
            first.i = k;
            break;
        }
    }
    XentFirst none;
    none.i = LK_I32_MAX;
    return lk_block_reduce(first, none).i;
}

template <typename T, typename P>
__device__ __forceinline__ void xent_fwd_row(const XentFwdArgs& a, lk_i64 row, const T* z, const P& pol,
                                             bool ignored, int y, float y_coef, float weight) {
    const int U = XENT_UNROLL;
    const int V = (int)a.classes;
    const int step = blockDim.x;
    const float temp = a.temperature;
    const bool scaled = temp != 1.0f;
    XentAcc acc = xent_acc_identity();
    // A thread's first column, so that a thread seeing only -inf still names
    // a column (an all -inf row has argmax 0, like the reference).
    if ((int)threadIdx.x < V) acc.arg_i = threadIdx.x;
    for (int k0 = threadIdx.x; k0 < V; k0 += U * step) {
        float x[U];
        float c[U];
        int k[U];
        bool valid[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            k[u] = k0 + u * step;
            valid[u] = k[u] < V;
            const float zk = valid[u] ? lk_to_f32(z[k[u]]) : -LK_INF_F;
            x[u] = scaled ? zk / temp : zk;
            c[u] = (P::kCoef && valid[u]) ? pol.coef(k[u]) : 0.0f;
        }
        xent_step<U, P::kCoef>(acc, x, c, k, valid);
    }
    acc = lk_block_reduce(acc, xent_acc_identity());

    // s is NaN exactly when the row holds a NaN or +inf; only then is the row
    // read again, for its first NaN (the argmax, as torch.argmax).
    __shared__ int maybe_nan;
    if (threadIdx.x == 0) maybe_nan = acc.sm.s != acc.sm.s;
    __syncthreads();
    const int nan_i = maybe_nan ? xent_first_nan(z, V) : LK_I32_MAX;
    if (threadIdx.x != 0) return;

    const float m = acc.sm.m;
    const bool bad = acc.sm.s != acc.sm.s || m == LK_INF_F;
    const float log_s = logf(acc.sm.s);
    float lse = m + log_s;
    float entropy = log_s - acc.sm.t / acc.sm.s;
    float mx = m;
    float mn = acc.mn;
    float gap = V == 1 ? 0.0f : m - acc.top2;
    if (bad) {
        lse = entropy = mx = mn = gap = LK_NAN_F;
    }
    const float delta = a.gap_top2 ? gap : mx - mn;

    float loss = 0.0f;
    if (!ignored) {
        // y < 0 (not ignored) marks a target the kernel could not index; see the raw API.
        if (bad || m == -LK_INF_F || y_coef != y_coef) {
            loss = LK_NAN_F;
        } else {
            loss = P::kCoef ? fmaf(acc.cf, log_s, acc.d) : 0.0f;
            if (y_coef != 0.0f) {
                const float x_y = lk_to_f32(z[y]) / temp;
                loss = fmaf(y_coef, log_s + (m - x_y), loss);
            }
            if (a.z_loss != 0.0f) loss = fmaf(a.z_loss * lse, lse, loss);
        }
    }

    a.loss_row[row] = loss;
    a.lse[row] = lse;
    a.entropy[row] = entropy;
    a.max[row] = mx;
    a.min[row] = mn;
    a.top2_gap[row] = gap;
    a.delta[row] = delta;
    // NaN counts as the largest value (torch.argmax); else the first max,
    // which is the first +inf when there is one.
    a.argmax[row] = nan_i != LK_I32_MAX ? nan_i : acc.arg_i;
    a.row_weight[row] = ignored ? 0.0f : weight;
    a.coef_sum[row] = ignored ? 0.0f : (P::kCoef ? acc.call : 0.0f) + y_coef;
    a.sumexp[row] = acc.sm.s;
    if (a.rho_per_sample) {
        a.rho[row] = xent_rho((double)delta, a.rho_eps, a.rho_inf_if_small, a.has_cap, a.rho_cap,
                              a.has_floor, a.rho_floor);
    }
}

// The class-target bookkeeping of one row: whether it is ignored, its label,
// the (1 - eps) w_y coefficient and its denominator weight w_y. A label
// outside [0, V) that is not ignore_index cannot happen after ops validation;
// should it reach the kernel through the raw API anyway, the row gets a NaN
// coefficient (NaN loss and grad) instead of an out-of-bounds read.
struct XentClassRow {
    bool ignored;
    int y;
    float y_coef;
    float weight;
};

__device__ __forceinline__ XentClassRow xent_class_row(const lk_i64* labels, const float* weights,
                                                       lk_i64 row, lk_i64 V, lk_i64 ignore_index,
                                                       float one_minus_eps) {
    XentClassRow r;
    const lk_i64 label = labels[row];
    r.ignored = label == ignore_index;
    r.y = 0;
    r.y_coef = 0.0f;
    r.weight = 0.0f;
    if (!r.ignored) {
        if (label < 0 || label >= V) {
            r.y_coef = LK_NAN_F;
            r.weight = LK_NAN_F;
        } else {
            r.y = (int)label;
            r.weight = weights ? weights[r.y] : 1.0f;
            r.y_coef = one_minus_eps * r.weight;
        }
    }
    return r;
}

template <typename T>
__device__ __forceinline__ void xent_fwd(const XentFwdArgs& a) {
    const T* logits = static_cast<const T*>(a.logits);
    for (lk_i64 row = blockIdx.x; row < a.batch; row += gridDim.x) {
        const T* z = logits + row * a.row_stride;
        if (a.labels) {
            const XentClassRow cr =
                xent_class_row(a.labels, a.weights, row, a.classes, a.ignore_index, a.one_minus_eps);
            if (cr.ignored || a.eps_per_class == 0.0f) {
                xent_fwd_row(a, row, z, XentClassPlain(), cr.ignored, cr.y, cr.y_coef, cr.weight);
            } else {
                XentClassSmooth pol;
                pol.weights = a.weights;
                pol.eps_per_class = a.eps_per_class;
                xent_fwd_row(a, row, z, pol, false, cr.y, cr.y_coef, cr.weight);
            }
        } else if (a.soft_f32) {
            XentSoft<float> pol;
            pol.q = static_cast<const float*>(a.soft) + row * a.classes;
            pol.weights = a.weights;
            pol.one_minus_eps = a.one_minus_eps;
            pol.eps_per_class = a.eps_per_class;
            xent_fwd_row(a, row, z, pol, false, 0, 0.0f, 1.0f);
        } else {
            XentSoft<T> pol;
            pol.q = static_cast<const T*>(a.soft) + row * a.classes;
            pol.weights = a.weights;
            pol.one_minus_eps = a.one_minus_eps;
            pol.eps_per_class = a.eps_per_class;
            xent_fwd_row(a, row, z, pol, false, 0, 0.0f, 1.0f);
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024) xent_fwd_f32(const XentFwdArgs a) { xent_fwd<float>(a); }
extern "C" __global__ void __launch_bounds__(1024) xent_fwd_f16(const XentFwdArgs a) { xent_fwd<lk_f16>(a); }
extern "C" __global__ void __launch_bounds__(1024) xent_fwd_bf16(const XentFwdArgs a) { xent_fwd<lk_bf16>(a); }

// ---------------------------------------------------------------------------
// Batch reduction, in f64 (B values only, so the cost is nil and the sums
// carry no f32 drift). One block; thread-sequential strides, then the tree.

struct XentSums {
    double loss;
    double weight;
    double delta_sum;
    double delta_max;  // NaN-propagating max (the reference: a NaN row gives NaN)
};

// NaN-propagating max: a NaN on either side wins (f64 max would drop it).
__device__ __forceinline__ double xent_nan_max(double a, double b) {
    if (a != a) return a;
    return (b != b || b > a) ? b : a;
}

__device__ __forceinline__ XentSums lk_shfl_down(const XentSums& a, int offset) {
    XentSums r;
    r.loss = lk_shfl_down(a.loss, offset);
    r.weight = lk_shfl_down(a.weight, offset);
    r.delta_sum = lk_shfl_down(a.delta_sum, offset);
    r.delta_max = lk_shfl_down(a.delta_max, offset);
    return r;
}

__device__ __forceinline__ XentSums lk_combine(const XentSums& a, const XentSums& b) {
    XentSums r;
    r.loss = a.loss + b.loss;
    r.weight = a.weight + b.weight;
    r.delta_sum = a.delta_sum + b.delta_sum;
    r.delta_max = xent_nan_max(a.delta_max, b.delta_max);
    return r;
}

extern "C" __global__ void __launch_bounds__(1024) xent_reduce(const XentReduceArgs a) {
    XentSums acc;
    acc.loss = 0.0;
    acc.weight = 0.0;
    acc.delta_sum = 0.0;
    acc.delta_max = -LK_INF_D;
    const XentSums identity = acc;
    for (lk_i64 i = threadIdx.x; i < a.batch; i += blockDim.x) {
        acc.loss += (double)a.loss_row[i];
        acc.weight += (double)a.row_weight[i];
        const double d = (double)a.delta[i];
        acc.delta_sum += d;
        acc.delta_max = xent_nan_max(acc.delta_max, d);
    }
    acc = lk_block_reduce(acc, identity);
    if (threadIdx.x != 0) return;

    double scale = 1.0;
    double loss = acc.loss;
    if (a.reduction == 1) {
        // All rows ignored: 0 / 0 = NaN loss and an inf scale, as the reference.
        loss = acc.loss / acc.weight;
        scale = 1.0 / acc.weight;
    }
    a.loss[0] = (float)loss;
    a.scale[0] = scale;
    if (a.rho) {
        const double d = a.rho_max ? acc.delta_max : acc.delta_sum / (double)a.batch;
        a.rho[0] = xent_rho(d, a.rho_eps, a.rho_inf_if_small, a.has_cap, a.rho_cap, a.has_floor, a.rho_floor);
    }
}

// ---------------------------------------------------------------------------
// Gradient: g_k = ((sum_j c_j + 2 z_loss lse) p_k - c_k) * (scale / T), with
// p_k = e^(x_k - m) / s from the forward's max and sum (more accurate than
// e^(x_k - lse), whose rounding of lse grows with |lse|). A NaN/+inf row has
// m = NaN and an all -inf row has x - m = NaN, so both give a NaN grad row as
// the reference; an ignored row gets exact zeros.

template <typename T, typename TG, typename P>
__device__ __forceinline__ void xent_grad_row(const XentGradArgs& a, lk_i64 row, const T* z, const P& pol,
                                              int y, float y_coef, TG* g) {
    const int V = (int)a.classes;
    const int step = blockDim.x;
    const float temp = a.temperature;
    const float m = a.max[row];
    const float inv_s = 1.0f / a.sumexp[row];
    const float lse = a.lse[row];
    const float coef = a.z_loss != 0.0f ? fmaf(2.0f * a.z_loss, lse, a.coef_sum[row]) : a.coef_sum[row];
    const float factor = (float)(a.scale[0] / a.temperature_f64);
    const int U = XENT_UNROLL;
    const bool scaled = temp != 1.0f;
    for (int k0 = threadIdx.x; k0 < V; k0 += U * step) {
        float x[U];
        float c[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = k0 + u * step;
            const float zk = k < V ? lk_to_f32(z[k]) : 0.0f;
            x[u] = scaled ? zk / temp : zk;
            c[u] = (P::kCoef && k < V) ? pol.coef(k) : 0.0f;
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = k0 + u * step;
            if (k < V) {
                const float p = expf(x[u] - m) * inv_s;
                const float ck = k == y ? c[u] + y_coef : c[u];
                g[k] = lk_from_f32<TG>(fmaf(coef, p, -ck) * factor);
            }
        }
    }
}

template <typename TG>
__device__ __forceinline__ void xent_grad_zero(int V, TG* g) {
    for (int k = threadIdx.x; k < V; k += blockDim.x) g[k] = lk_from_f32<TG>(0.0f);
}

template <typename T, typename TG>
__device__ __forceinline__ void xent_grad(const XentGradArgs& a) {
    const T* logits = static_cast<const T*>(a.logits);
    TG* grad = static_cast<TG*>(a.grad);
    for (lk_i64 row = blockIdx.x; row < a.batch; row += gridDim.x) {
        const T* z = logits + row * a.row_stride;
        TG* g = grad + row * a.classes;
        if (a.labels) {
            const XentClassRow cr =
                xent_class_row(a.labels, a.weights, row, a.classes, a.ignore_index, a.one_minus_eps);
            if (cr.ignored) {
                xent_grad_zero((int)a.classes, g);
            } else if (a.eps_per_class == 0.0f) {
                xent_grad_row(a, row, z, XentClassPlain(), cr.y, cr.y_coef, g);
            } else {
                XentClassSmooth pol;
                pol.weights = a.weights;
                pol.eps_per_class = a.eps_per_class;
                xent_grad_row(a, row, z, pol, cr.y, cr.y_coef, g);
            }
        } else if (a.soft_f32) {
            XentSoft<float> pol;
            pol.q = static_cast<const float*>(a.soft) + row * a.classes;
            pol.weights = a.weights;
            pol.one_minus_eps = a.one_minus_eps;
            pol.eps_per_class = a.eps_per_class;
            xent_grad_row(a, row, z, pol, -1, 0.0f, g);
        } else {
            XentSoft<T> pol;
            pol.q = static_cast<const T*>(a.soft) + row * a.classes;
            pol.weights = a.weights;
            pol.one_minus_eps = a.one_minus_eps;
            pol.eps_per_class = a.eps_per_class;
            xent_grad_row(a, row, z, pol, -1, 0.0f, g);
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024) xent_grad_f32(const XentGradArgs a) {
    xent_grad<float, float>(a);
}
extern "C" __global__ void __launch_bounds__(1024) xent_grad_f16(const XentGradArgs a) {
    if (a.grad_f32) {
        xent_grad<lk_f16, float>(a);
    } else {
        xent_grad<lk_f16, lk_f16>(a);
    }
}
extern "C" __global__ void __launch_bounds__(1024) xent_grad_bf16(const XentGradArgs a) {
    if (a.grad_f32) {
        xent_grad<lk_bf16, float>(a);
    } else {
        xent_grad<lk_bf16, lk_bf16>(a);
    }
}
