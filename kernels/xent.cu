// xent.cu: fused softmax / cross-entropy with entropy, argmax, the logit gaps
// and the softmax convergence radius, plus the batch reduction and the grad.
// Semantics: reference/src/xent.rs (the f64 definition) and DESIGN.md.
//
// Kernels, in order on one stream:
//   xent_scale                ONE block, only when the grad is asked: the
//                             grad's reduction scale (1 / sum of row weights
//                             for mean) from the targets alone (B labels), so
//                             the row kernel can write the grad directly.
//   xent_fwd_{f32,f16,bf16}   one block per row (grid-stride over rows): reads
//                             the row from HBM once with 16-byte loads, writes
//                             every per-row output; with the grad, re-reads
//                             the row (just read: from L1/L2 as far as it
//                             still is there) and writes d(reduced loss)/dz
//                             in f32 or the logits' dtype.
//   xent_reduce               ONE block: reduced loss and reduced rho.
//
// The directional radius (its own call), in order on one stream:
//   xent_directional_{f32,f16,bf16}  one block per row (grid-stride over rows):
//                             Delta_a = max - min of the row of a, and for
//                             V = 2 the binary radius.
//   xent_directional_reduce   ONE block: rho_a = pi / max Delta_a and the
//                             normalised step.
//
// Every thread walks its columns in ascending order, then the block reduces
// with common.cuh's fixed tree: deterministic. Row offsets are 64-bit (B * V
// may pass 2^31); column indices within a row are 32-bit (the host refuses
// V >= 2^31), and every loop over columns is written so that it cannot wrap
// near 2^31: strided loops count in unsigned (k < V < 2^31, so k + blockDim
// stays below 2^32), vector indices stay below V / 4, and a tail test is
// tid < V - tail0 rather than tail0 + tid < V. A NaN or +inf is not tested per column: it makes s NaN, and only
// such a row is read a second time, for the index of its first NaN (its
// argmax).
//
// Units. The kernels work on the raw logits z and apply the temperature
// through lt = log2(e) / T: e^((z - m) / T) = 2^((z - m) lt), with m the row
// max of z. The order statistics (max, min, top2, argmax) are taken on z,
// where they are exact and, T being positive, the same as on z / T; each is
// divided by T once per row (correctly rounded). So no per-element division,
// and z - m is exact for 16-bit inputs.
//
// With x = z / T and p = softmax(x), a row's loss is sum_k c_k (lse - x_k)
// (+ z_loss lse^2), where c_k is the coefficient of -log p_k. Expanding
// lse = m / T + log s (s = sum e^((z - m) / T)):
//   loss = C_f log s + D / T,   C_f = sum c_k over finite z_k,
//                               D   = sum c_k (m - z_k) over finite z_k
//                                     (+ c_k * inf for z_k = -inf, c_k != 0),
// two non-negative terms for non-negative c, so no cancellation; D is kept
// against the running max and shifted by C_f (m' - m) when the max moves.
// For class targets, the (1 - eps) w_y part of c_y is added by thread 0 from
// z_y directly, so the common unsmoothed case accumulates no c at all.

// Must match XentFwdArgs in src/cuda/xent.rs field for field (size and
// every offset asserted on both sides).
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
    float* rho;                   // [B] when rho_per_sample, else null
    const double* scale;          // [1] from xent_scale, or null without grad
    void* grad;                   // [B, V] of T (f32 when grad_f32), or null
    unsigned long long* status;   // [1], zeroed before the launch: ~(first bad-target row)
    lk_i64 batch;
    lk_i64 classes;
    lk_i64 row_stride;
    lk_i64 ignore_index;
    double rho_eps;
    double rho_cap;
    double rho_floor;
    double temperature_f64;
    float temperature;
    float lt;                     // log2(e) / T, rounded once on the host
    float one_minus_eps;          // 1 - label_smoothing, rounded once on the host
    float eps_per_class;          // label_smoothing / V, rounded once on the host
    float z_loss;
    int soft_f32;
    int gap_top2;
    int rho_per_sample;
    int rho_inf_if_small;
    int has_cap;
    int has_floor;
    int grad_f32;
};
static_assert(sizeof(XentFwdArgs) == 248, "XentFwdArgs layout drifted from src/cuda/xent.rs");
LK_FIELD_AT(XentFwdArgs, logits, 0);
LK_FIELD_AT(XentFwdArgs, labels, 8);
LK_FIELD_AT(XentFwdArgs, soft, 16);
LK_FIELD_AT(XentFwdArgs, weights, 24);
LK_FIELD_AT(XentFwdArgs, loss_row, 32);
LK_FIELD_AT(XentFwdArgs, lse, 40);
LK_FIELD_AT(XentFwdArgs, entropy, 48);
LK_FIELD_AT(XentFwdArgs, max, 56);
LK_FIELD_AT(XentFwdArgs, min, 64);
LK_FIELD_AT(XentFwdArgs, top2_gap, 72);
LK_FIELD_AT(XentFwdArgs, delta, 80);
LK_FIELD_AT(XentFwdArgs, argmax, 88);
LK_FIELD_AT(XentFwdArgs, row_weight, 96);
LK_FIELD_AT(XentFwdArgs, rho, 104);
LK_FIELD_AT(XentFwdArgs, scale, 112);
LK_FIELD_AT(XentFwdArgs, grad, 120);
LK_FIELD_AT(XentFwdArgs, status, 128);
LK_FIELD_AT(XentFwdArgs, batch, 136);
LK_FIELD_AT(XentFwdArgs, classes, 144);
LK_FIELD_AT(XentFwdArgs, row_stride, 152);
LK_FIELD_AT(XentFwdArgs, ignore_index, 160);
LK_FIELD_AT(XentFwdArgs, rho_eps, 168);
LK_FIELD_AT(XentFwdArgs, rho_cap, 176);
LK_FIELD_AT(XentFwdArgs, rho_floor, 184);
LK_FIELD_AT(XentFwdArgs, temperature_f64, 192);
LK_FIELD_AT(XentFwdArgs, temperature, 200);
LK_FIELD_AT(XentFwdArgs, lt, 204);
LK_FIELD_AT(XentFwdArgs, one_minus_eps, 208);
LK_FIELD_AT(XentFwdArgs, eps_per_class, 212);
LK_FIELD_AT(XentFwdArgs, z_loss, 216);
LK_FIELD_AT(XentFwdArgs, soft_f32, 220);
LK_FIELD_AT(XentFwdArgs, gap_top2, 224);
LK_FIELD_AT(XentFwdArgs, rho_per_sample, 228);
LK_FIELD_AT(XentFwdArgs, rho_inf_if_small, 232);
LK_FIELD_AT(XentFwdArgs, has_cap, 236);
LK_FIELD_AT(XentFwdArgs, has_floor, 240);
LK_FIELD_AT(XentFwdArgs, grad_f32, 244);

// Must match XentScaleArgs in src/cuda/xent.rs.
struct XentScaleArgs {
    const lk_i64* labels;         // [B] or null (soft targets)
    const float* weights;         // [V] or null
    double* scale;                // [1]
    lk_i64 batch;
    lk_i64 classes;
    lk_i64 ignore_index;
    int reduction;                // 0 none, 1 mean, 2 sum
    int pad_;
};
static_assert(sizeof(XentScaleArgs) == 56, "XentScaleArgs layout drifted from src/cuda/xent.rs");
LK_FIELD_AT(XentScaleArgs, labels, 0);
LK_FIELD_AT(XentScaleArgs, weights, 8);
LK_FIELD_AT(XentScaleArgs, scale, 16);
LK_FIELD_AT(XentScaleArgs, batch, 24);
LK_FIELD_AT(XentScaleArgs, classes, 32);
LK_FIELD_AT(XentScaleArgs, ignore_index, 40);
LK_FIELD_AT(XentScaleArgs, reduction, 48);
LK_FIELD_AT(XentScaleArgs, pad_, 52);

// Must match XentReduceArgs in src/cuda/xent.rs.
struct XentReduceArgs {
    const float* loss_row;        // [B]
    const float* row_weight;      // [B]
    const float* delta;           // [B]
    float* loss;                  // [1]
    float* rho;                   // [1], or null for per-sample rho
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
static_assert(sizeof(XentReduceArgs) == 96, "XentReduceArgs layout drifted from src/cuda/xent.rs");
LK_FIELD_AT(XentReduceArgs, loss_row, 0);
LK_FIELD_AT(XentReduceArgs, row_weight, 8);
LK_FIELD_AT(XentReduceArgs, delta, 16);
LK_FIELD_AT(XentReduceArgs, loss, 24);
LK_FIELD_AT(XentReduceArgs, rho, 32);
LK_FIELD_AT(XentReduceArgs, batch, 40);
LK_FIELD_AT(XentReduceArgs, rho_eps, 48);
LK_FIELD_AT(XentReduceArgs, rho_cap, 56);
LK_FIELD_AT(XentReduceArgs, rho_floor, 64);
LK_FIELD_AT(XentReduceArgs, reduction, 72);
LK_FIELD_AT(XentReduceArgs, rho_max, 76);
LK_FIELD_AT(XentReduceArgs, rho_inf_if_small, 80);
LK_FIELD_AT(XentReduceArgs, has_cap, 84);
LK_FIELD_AT(XentReduceArgs, has_floor, 88);
LK_FIELD_AT(XentReduceArgs, pad_, 92);

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
// 32-bit words of logits: one f32 or two 16-bit values (lane 0 the lower
// column). The order statistics of 16-bit inputs are taken two at a time
// with packed min/max (exact, and like fminf/fmaxf they return the non-NaN
// operand), which halves their instruction count: at 4 TB/s of bf16 an SM
// has about 15 instruction slots per element in all.

template <typename T>
struct XentWord;

template <>
struct XentWord<float> {
    enum { kLanes = 1 };
    static constexpr unsigned int kNegInf = 0xff800000u;
    __device__ __forceinline__ static float lane(unsigned int w, int) { return __uint_as_float(w); }
    __device__ __forceinline__ static unsigned int max(unsigned int a, unsigned int b) {
        return __float_as_uint(fmaxf(__uint_as_float(a), __uint_as_float(b)));
    }
    __device__ __forceinline__ static unsigned int min(unsigned int a, unsigned int b) {
        return __float_as_uint(fminf(__uint_as_float(a), __uint_as_float(b)));
    }
};

template <>
struct XentWord<lk_bf16> {
    enum { kLanes = 2 };
    static constexpr unsigned int kNegInf = 0xff80ff80u;
    __device__ __forceinline__ static float lane(unsigned int w, int i) {
        return __uint_as_float(i == 0 ? w << 16 : w & 0xffff0000u);
    }
    __device__ __forceinline__ static unsigned int max(unsigned int a, unsigned int b) {
        unsigned int r;
#if __CUDA_ARCH__ >= 800
        asm("max.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
        r = (__float_as_uint(fmaxf(lane(a, 0), lane(b, 0))) >> 16) |
            (__float_as_uint(fmaxf(lane(a, 1), lane(b, 1))) & 0xffff0000u);
#endif
        return r;
    }
    __device__ __forceinline__ static unsigned int min(unsigned int a, unsigned int b) {
        unsigned int r;
#if __CUDA_ARCH__ >= 800
        asm("min.bf16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
        r = (__float_as_uint(fminf(lane(a, 0), lane(b, 0))) >> 16) |
            (__float_as_uint(fminf(lane(a, 1), lane(b, 1))) & 0xffff0000u);
#endif
        return r;
    }
};

template <>
struct XentWord<lk_f16> {
    enum { kLanes = 2 };
    static constexpr unsigned int kNegInf = 0xfc00fc00u;
    __device__ __forceinline__ static float lane(unsigned int w, int i) {
        lk_f16 h;
        h.bits = (unsigned short)(i == 0 ? w : w >> 16);
        return lk_to_f32(h);
    }
    __device__ __forceinline__ static unsigned int max(unsigned int a, unsigned int b) {
        unsigned int r;
#if __CUDA_ARCH__ >= 800
        asm("max.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
        r = (unsigned int)lk_from_f32<lk_f16>(fmaxf(lane(a, 0), lane(b, 0))).bits |
            ((unsigned int)lk_from_f32<lk_f16>(fmaxf(lane(a, 1), lane(b, 1))).bits << 16);
#endif
        return r;
    }
    __device__ __forceinline__ static unsigned int min(unsigned int a, unsigned int b) {
        unsigned int r;
#if __CUDA_ARCH__ >= 800
        asm("min.f16x2 %0, %1, %2;" : "=r"(r) : "r"(a), "r"(b));
#else
        r = (unsigned int)lk_from_f32<lk_f16>(fminf(lane(a, 0), lane(b, 0))).bits |
            ((unsigned int)lk_from_f32<lk_f16>(fminf(lane(a, 1), lane(b, 1))).bits << 16);
#endif
        return r;
    }
};

template <typename TG>
__device__ __forceinline__ unsigned int xent_pack2(float lo, float hi) {
    return (unsigned int)lk_from_f32<TG>(lo).bits | ((unsigned int)lk_from_f32<TG>(hi).bits << 16);
}

// Packs 16 / sizeof(TG) grad values (4 f32 or 8 16-bit) into one 16-byte store.
template <typename TG>
__device__ __forceinline__ lk_u32x4 xent_pack(const float* g) {
    lk_u32x4 r;
    if constexpr (sizeof(TG) == 4) {
        r.x = __float_as_uint(g[0]);
        r.y = __float_as_uint(g[1]);
        r.z = __float_as_uint(g[2]);
        r.w = __float_as_uint(g[3]);
    } else {
        r.x = xent_pack2<TG>(g[0], g[1]);
        r.y = xent_pack2<TG>(g[2], g[3]);
        r.z = xent_pack2<TG>(g[4], g[5]);
        r.w = xent_pack2<TG>(g[6], g[7]);
    }
    return r;
}

// 16-byte vectors per thread per step: 4 loads (64 bytes) in flight per
// thread before the first is used.
constexpr int kXentUnroll = 4;

// ---------------------------------------------------------------------------
// Forward accumulator, in units of z (see the header).

struct XentAcc {
    lk_softmax sm;   // m is top1, the max ignoring NaN
    float top2;      // second largest of the multiset (ties give top2 = top1)
    float mn;
    float cf;        // sum c_k over z_k > -inf
    float d;         // sum c_k (m - z_k) over z_k > -inf, plus c_k * inf at -inf
    float call;      // sum c_k over all k
};

__device__ __forceinline__ XentAcc xent_acc_identity() {
    XentAcc a;
    a.sm = lk_softmax_identity();
    a.top2 = -LK_INF_F;
    a.mn = LK_INF_F;
    a.cf = 0.0f;
    a.d = 0.0f;
    a.call = 0.0f;
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
    return r;
}

// The block combiner; carries lt for the softmax rescaling.
struct XentCombine {
    float lt;
    __device__ __forceinline__ XentAcc operator()(const XentAcc& a, const XentAcc& b) const {
        XentAcc r;
        r.sm = lk_softmax_merge(a.sm, b.sm, lt);
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
        return r;
    }
};

// Raises the running max to m_new > m, rescaling s, t and D once.
template <int kCoef>
__device__ __forceinline__ void xent_raise(XentAcc& a, float m_new, float lt) {
    if (a.sm.m != -LK_INF_F) {
        // Nothing above -inf yet means s = t = C_f = 0: nothing to rescale.
        const float dm = a.sm.m - m_new;  // < 0
        const float r = lk_ex2(dm * lt);
        a.sm.t = r * fmaf(a.sm.s, dm, a.sm.t);
        a.sm.s = r * a.sm.s;
        if (kCoef) a.d = fmaf(a.cf, -dm, a.d);
    }
    a.sm.m = m_new;
}

// Adds column k's coefficient c (z_k = z, dz = z - m).
__device__ __forceinline__ void xent_add_coef(XentAcc& a, float c, float z, float dz) {
    if (z != -LK_INF_F) {
        a.cf += c;
        a.d = fmaf(c, -dz, a.d);
    } else if (c != 0.0f) {
        // p_k = 0: -log p_k = +inf where c_k != 0 (0 * inf is taken as 0).
        a.d += c * LK_INF_F;
    }
    a.call += c;
}

// The shift the exponentials use: the running max, or 0 while it is -inf
// (every column so far is -inf or NaN; -inf - -inf would make s NaN).
__device__ __forceinline__ float xent_shift(const XentAcc& a) {
    return a.sm.m == -LK_INF_F ? 0.0f : a.sm.m;
}

// One column read on its own (the unaligned head and the tail of a row).
// Returns whether it raised the thread's max.
template <typename P>
__device__ __forceinline__ bool xent_scalar(XentAcc& a, float z, int k, const P& pol, float lt) {
    const bool raised = z > a.sm.m;
    a.top2 = fmaxf(a.top2, fminf(a.sm.m, z));
    a.mn = fminf(a.mn, z);
    if (raised) xent_raise<P::kCoef>(a, z, lt);
    const float m = xent_shift(a);
    const float dz = z - m;
    const float e = lk_ex2(dz * lt);
    a.sm.s += e;
    // -FLT_MAX keeps 0 * -inf out of t at a -inf column (e = 0 there); a NaN
    // still reaches s through e.
    a.sm.t = fmaf(e, fmaxf(dz, -3.402823466e38f), a.sm.t);
    if (P::kCoef) xent_add_coef(a, pol.coef(k), z, dz);
    return raised;
}

// One step of a thread over NV 16-byte vectors (vector u holds columns
// col[u] ..): the step's order statistics first, in packed words, so the
// running max moves (and s, t, D are rescaled) at most once per step and the
// exponentials are independent of each other. A NaN or +inf is not tested:
// it makes s NaN. Returns whether the step raised the thread's max.
template <typename T, int NV, typename P>
__device__ __forceinline__ bool xent_step(XentAcc& a, const lk_u32x4 (&v)[NV], const int (&col)[NV],
                                          const P& pol, float lt) {
    typedef XentWord<T> W;
    const int N = 4 * NV;
    unsigned int w[N];
#pragma unroll
    for (int u = 0; u < NV; ++u) {
        w[4 * u] = v[u].x;
        w[4 * u + 1] = v[u].y;
        w[4 * u + 2] = v[u].z;
        w[4 * u + 3] = v[u].w;
    }
    unsigned int h1 = w[0], h2 = W::kNegInf, lo = w[0];
#pragma unroll
    for (int i = 1; i < N; ++i) {
        h2 = W::max(h2, W::min(h1, w[i]));
        h1 = W::max(h1, w[i]);
        lo = W::min(lo, w[i]);
    }
    float c1 = W::lane(h1, 0);
    float c2 = W::lane(h2, 0);
    float cmin = W::lane(lo, 0);
    if (W::kLanes == 2) {
        const float b1 = W::lane(h1, 1);
        c2 = fmaxf(fminf(c1, b1), fmaxf(c2, W::lane(h2, 1)));
        c1 = fmaxf(c1, b1);
        cmin = fminf(cmin, W::lane(lo, 1));
    }
    const bool raised = c1 > a.sm.m;
    a.top2 = fmaxf(fminf(a.sm.m, c1), fmaxf(a.top2, c2));
    a.mn = fminf(a.mn, cmin);
    if (raised) xent_raise<P::kCoef>(a, c1, lt);
    const float m = xent_shift(a);
    // Two partial sums per step for instruction-level parallelism.
    float s0 = 0.0f, s1 = 0.0f, t0 = 0.0f, t1 = 0.0f;
#pragma unroll
    for (int i = 0; i < N; ++i) {
#pragma unroll
        for (int l = 0; l < W::kLanes; ++l) {
            const float z = W::lane(w[i], l);
            const float dz = z - m;
            const float e = lk_ex2(dz * lt);
            const float dzt = fmaxf(dz, -3.402823466e38f);  // as in xent_scalar
            if ((i * W::kLanes + l) & 1) {
                s1 += e;
                t1 = fmaf(e, dzt, t1);
            } else {
                s0 += e;
                t0 = fmaf(e, dzt, t0);
            }
            if (P::kCoef) {
                const int k = col[i / 4] + (i % 4) * W::kLanes + l;
                xent_add_coef(a, pol.coef(k), z, dz);
            }
        }
    }
    a.sm.s += s0 + s1;
    a.sm.t += t0 + t1;
    return raised;
}

// The U vectors of the step at vector j (vectors j, j + NT, ..).
template <int U>
__device__ __forceinline__ void xent_ld_step(lk_u32x4 (&v)[U], const lk_u32x4* zv, int j, int NT) {
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = lk_ld_nc_v4(zv + j + u * NT);
}

// xent_step over the vectors loaded by xent_ld_step(v, zv, j, NT).
template <typename T, int U, typename P>
__device__ __forceinline__ bool xent_step_at(XentAcc& a, const lk_u32x4 (&v)[U], int j, int NT, int head,
                                             const P& pol, float lt) {
    const int kVec = 4 * XentWord<T>::kLanes;
    int col[U];
#pragma unroll
    for (int u = 0; u < U; ++u) col[u] = head + (j + u * NT) * kVec;
    return xent_step<T, U>(a, v, col, pol, lt);
}

// The first column of a row holding a NaN (LK_I32_MAX: none), or the first
// holding the max, by the whole block.
__device__ __forceinline__ int xent_block_first(int i) {
    return lk_block_reduce(i, LK_I32_MAX, lk_min_op());
}

// Over columns lo .. lo + n - 1, z pointing at column lo.
template <typename T>
__device__ __forceinline__ int xent_first_nan(const T* z, int lo, int n) {
    int first = LK_I32_MAX;
    for (unsigned int k = threadIdx.x; k < (unsigned int)n; k += blockDim.x) {
        const float v = lk_to_f32(z[k]);
        if (v != v) {
            first = lo + (int)k;
            break;
        }
    }
    return xent_block_first(first);
}

// ---------------------------------------------------------------------------
// Gradient of one row: g_k = ((sum_j c_j + 2 z_loss lse) p_k - c_k) * (scale / T),
// with p_k = e^((z_k - m) / T) / s from the row's own max and sum (more
// accurate than e^(x_k - lse), whose rounding of lse grows with |lse|). A
// NaN/+inf row has m = NaN and an all -inf row has z - m = NaN, so both give
// a NaN grad row as the reference; an ignored row (zero) gets exact zeros.
// The row was just read by this block, so its logits come from L1 or L2 as
// far as they are still there; both the re-read and the grad are streamed
// (evict-first) so they do not push out the rows other blocks are still to
// re-read.

struct XentGradRow {
    float m, inv_s, coef, factor, lt, y_coef;
    int y;
    bool zero;
};

// Loads N logits as f32: one 16- or 8-byte load when `vec` (aligned), else
// one by one; from global memory (streamed: its last read), or from shared
// memory when kShared.
template <typename T, int N, bool kShared>
__device__ __forceinline__ void xent_load(const T* p, bool vec, float (&x)[N]) {
    typedef XentWord<T> W;
    if (vec) {
        unsigned int w[4];
        if constexpr (N * sizeof(T) == 16) {
            const lk_u32x4 v = kShared ? *reinterpret_cast<const lk_u32x4*>(p) : lk_ld_cs_v4(p);
            w[0] = v.x;
            w[1] = v.y;
            w[2] = v.z;
            w[3] = v.w;
        } else {
            static_assert(N * sizeof(T) == 8, "a grad vector covers 8 or 16 bytes of logits");
            if constexpr (kShared) {
                w[0] = reinterpret_cast<const unsigned int*>(p)[0];
                w[1] = reinterpret_cast<const unsigned int*>(p)[1];
            } else {
                lk_ld_cs_v2(p, w[0], w[1]);
            }
        }
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = W::lane(w[i / W::kLanes], i % W::kLanes);
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) x[i] = lk_to_f32(p[i]);
    }
}

template <typename P>
__device__ __forceinline__ float xent_grad_value(const XentGradRow& r, const P& pol, float z, int k) {
    const float p = lk_ex2((z - r.m) * r.lt) * r.inv_s;
    const float ck = k == r.y ? pol.coef(k) + r.y_coef : pol.coef(k);
    return fmaf(r.coef, p, -ck) * r.factor;
}

// The grad of one 16-byte vector of grad columns col .. col + N - 1.
template <typename TG, int N, typename P>
__device__ __forceinline__ lk_u32x4 xent_grad_vec(const XentGradRow& r, const P& pol, const float (&x)[N],
                                                  int col) {
    float g[N];
    float ck[N];
#pragma unroll
    for (int i = 0; i < N; ++i) ck[i] = pol.coef(col + i);
    // The target column: tested once per vector rather than per column.
    if ((unsigned int)(r.y - col) < (unsigned int)N) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            if (col + i == r.y) ck[i] += r.y_coef;
        }
    }
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const float p = lk_ex2((x[i] - r.m) * r.lt) * r.inv_s;
        g[i] = r.zero ? 0.0f : fmaf(r.coef, p, -ck[i]) * r.factor;
    }
    return xent_pack<TG>(g);
}

// The grad of columns lo .. lo + n - 1 of a row: z and g point at column lo
// of the logits (global, or shared when kShared) and of the grad row.
template <typename T, typename TG, bool kShared, typename P>
__device__ __forceinline__ void xent_grad_cols(const XentGradRow& r, const P& pol, const T* z, TG* g, int lo,
                                               int n) {
    const int N = 16 / (int)sizeof(TG);  // grad columns per 16-byte store
    // A re-read from L2 or shared memory (shorter latency than HBM): 2
    // vectors in flight per thread are enough, and leave registers for the rest.
    const int U = 2;
    const int NT = blockDim.x;
    const int tid = threadIdx.x;
    // The grad row (stride V) and the logits row (stride row_stride) need not
    // start on 16-byte boundaries; the vectors follow the grad's alignment,
    // and the logits under a vector are one load when they are aligned too.
    const int mis = (int)(reinterpret_cast<unsigned long long>(g) & 15);
    const int head = min(n, mis ? (16 - mis) / (int)sizeof(TG) : 0);
    const int nvec = (n - head) / N;
    const int tail0 = head + nvec * N;
    const bool zvec = reinterpret_cast<unsigned long long>(z + head) % (N * sizeof(T)) == 0;
    lk_u32x4* gv = reinterpret_cast<lk_u32x4*>(g + head);
    if (tid < head) {
        g[tid] = lk_from_f32<TG>(r.zero ? 0.0f : xent_grad_value(r, pol, lk_to_f32(z[tid]), lo + tid));
    }
    // Vector nvec - 1 - j for j = tid, tid + NT, ..: from the row's end back,
    // so the re-read starts with the columns the forward pass read last, the
    // likeliest to be still in L1 or L2 (ascending, each miss would evict the
    // next column the pass needs). Each grad value depends on its column only.
    int j = tid;
    for (; j + (U - 1) * NT < nvec; j += U * NT) {
        float x[U][N];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            xent_load<T, N, kShared>(z + head + (nvec - 1 - (j + u * NT)) * N, zvec, x[u]);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int jj = nvec - 1 - (j + u * NT);
            lk_st_cs_v4(gv + jj, xent_grad_vec<TG, N>(r, pol, x[u], lo + head + jj * N));
        }
    }
    for (; j < nvec; j += NT) {
        const int jj = nvec - 1 - j;
        float x[N];
        xent_load<T, N, kShared>(z + head + jj * N, zvec, x);
        lk_st_cs_v4(gv + jj, xent_grad_vec<TG, N>(r, pol, x, lo + head + jj * N));
    }
    if (tid < n - tail0) {
        const int k = tail0 + tid;
        g[k] = lk_from_f32<TG>(r.zero ? 0.0f : xent_grad_value(r, pol, lk_to_f32(z[k]), lo + k));
    }
}

// ---------------------------------------------------------------------------
// What a row's threads share after its reduction, and its per-row outputs.

// The row's statistics every thread needs: thread 0 holds the reduced
// accumulator and shares them through shared memory.
struct XentRowState {
    XentGradRow gr;
    float top1;      // the row max of z (skipping NaN)
    bool maybe_nan;  // s is NaN: the row holds a NaN or +inf
};

template <typename P>
__device__ __forceinline__ XentRowState xent_row_state(const XentFwdArgs& a, const XentAcc& acc, bool ignored,
                                                       int y, float y_coef, float factor) {
    __shared__ float sh_top1, sh_m, sh_inv_s, sh_coef;
    __shared__ int sh_nan;
    if (threadIdx.x == 0) {
        const float m = acc.sm.m;
        const float s = acc.sm.s;
        const bool bad = s != s || m == LK_INF_F;
        const float lse = m / a.temperature + logf(s);
        float coef = ignored ? 0.0f : (P::kCoef ? acc.call : 0.0f) + y_coef;
        if (a.z_loss != 0.0f) coef = fmaf(2.0f * a.z_loss, bad ? LK_NAN_F : lse, coef);
        sh_top1 = m;
        sh_m = bad ? LK_NAN_F : m;
        sh_inv_s = 1.0f / s;
        sh_coef = coef;
        // Only such a row is read again, for its first NaN (the argmax, as
        // torch.argmax).
        sh_nan = s != s;
    }
    __syncthreads();
    XentRowState st;
    st.gr.m = sh_m;
    st.gr.inv_s = sh_inv_s;
    st.gr.coef = sh_coef;
    st.gr.factor = factor;
    st.gr.lt = a.lt;
    st.gr.y = ignored ? -1 : y;
    st.gr.y_coef = y_coef;
    st.gr.zero = ignored;
    st.top1 = sh_top1;
    st.maybe_nan = sh_nan;
    return st;
}

// The first column of one 16-byte vector (its first column col) holding
// top1, or `first` when none does.
template <typename T>
__device__ __forceinline__ int xent_first_in_vec(const lk_u32x4& v, float top1, int col, int first) {
    typedef XentWord<T> W;
    const unsigned int w[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4 * W::kLanes; ++i) {
        if (first == LK_I32_MAX && W::lane(w[i / W::kLanes], i % W::kLanes) == top1) first = col + i;
    }
    return first;
}

// Thread 0, with the row's reduced accumulator and argmax: every per-row
// output. z is the row in global memory (for z_y).
template <typename T, typename P>
__device__ __forceinline__ void xent_row_write(const XentFwdArgs& a, lk_i64 row, const T* z, const XentAcc& acc,
                                               int arg, bool ignored, bool bad_target, int y, float y_coef,
                                               float weight) {
    const int V = (int)a.classes;
    const float T_ = a.temperature;
    const float m = acc.sm.m;
    const float s = acc.sm.s;
    const bool bad = s != s || m == LK_INF_F;
    const float log_s = logf(s);
    float lse = m / T_ + log_s;
    float entropy = log_s - (acc.sm.t / T_) / s;
    float mx = m / T_;
    float mn = acc.mn / T_;
    float gap = V == 1 ? 0.0f : (m - acc.top2) / T_;
    float spread = (m - acc.mn) / T_;
    if (bad || bad_target) {
        lse = entropy = mx = mn = gap = spread = LK_NAN_F;
    }
    const float delta = a.gap_top2 ? gap : spread;

    float loss = 0.0f;
    if (!ignored) {
        // A bad target has a NaN y_coef (and never indexes z).
        if (bad || m == -LK_INF_F || y_coef != y_coef) {
            loss = LK_NAN_F;
        } else {
            loss = P::kCoef ? fmaf(acc.cf, log_s, acc.d / T_) : 0.0f;
            if (y_coef != 0.0f) {
                const float z_y = lk_to_f32(z[y]);
                loss = fmaf(y_coef, log_s + (m - z_y) / T_, loss);
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
    a.argmax[row] = bad_target ? -1 : arg;
    // NaN for a bad target: the mean's denominator, so the reduced loss, is NaN.
    a.row_weight[row] = ignored ? 0.0f : weight;
    // The largest ~row is the smallest bad row, whatever the order the
    // blocks run in: the status names the first one, deterministically.
    if (bad_target) atomicMax(a.status, ~(unsigned long long)row);
    if (a.rho_per_sample) {
        a.rho[row] = xent_rho((double)delta, a.rho_eps, a.rho_inf_if_small, a.has_cap, a.rho_cap, a.has_floor,
                              a.rho_floor);
    }
}

// The argmax is not tracked per column: each thread remembers where its max
// last rose (a column, best_n = 0, or the step of best_n vectors starting at
// vector best), and after the block knows the row max, only threads holding
// it look there for its first column.
struct XentBest {
    int best;
    int best_n;
};

// The first column holding top1 among a thread's remembered place, zv the
// vectors (global or shared) whose vector 0 starts at column col0.
template <typename T, bool kShared>
__device__ __forceinline__ int xent_first_max(const XentBest& b, float my_top1, float top1, const lk_u32x4* zv,
                                              int col0) {
    const int kVec = 4 * XentWord<T>::kLanes;
    int first = LK_I32_MAX;
    if (my_top1 != top1) return first;
    if (b.best_n == 0) return b.best;
    for (int u = 0; u < b.best_n && first == LK_I32_MAX; ++u) {
        const int jj = b.best + u * (int)blockDim.x;
        const lk_u32x4 v = kShared ? zv[jj] : lk_ld_nc_v4(zv + jj);
        first = xent_first_in_vec<T>(v, top1, col0 + jj * kVec, first);
    }
    return first;
}

// ---------------------------------------------------------------------------
// One row per block: the forward pass over HBM, the block reduction, the
// per-row outputs by thread 0, then (with a grad) the gradient pass.

// A bad target (a class label outside [0, V) that is not ignore_index; see
// XentClassRow) gives the row NaN in every per-row output, argmax -1 (no
// class: the row's argmax is not computed from a row whose target is
// unusable) and a NaN grad row, and records the row in a.status. The
// forward pass still runs: its block shape and reductions are those of
// every row, so no neighbour row changes.
template <typename T, typename TG, typename P>
__device__ __forceinline__ void xent_row(const XentFwdArgs& a, lk_i64 row, const T* z, const P& pol,
                                         bool ignored, bool bad_target, int y, float y_coef, float weight,
                                         float factor) {
    typedef XentWord<T> W;
    const int kVec = 4 * W::kLanes;  // columns per 16-byte vector
    // Per-column coefficients (label smoothing, soft targets) need more
    // registers per column: half the step keeps them from spilling.
    const int U = P::kCoef ? kXentUnroll / 2 : kXentUnroll;
    const int V = (int)a.classes;
    const int NT = blockDim.x;
    const int tid = threadIdx.x;
    const float lt = a.lt;
    // Columns before the row's first 16-byte boundary (a row starts on one
    // only when row_stride * sizeof(T) allows) and after its last whole
    // vector are read one by one: at most one of each per thread.
    const int mis = (int)(reinterpret_cast<unsigned long long>(z) & 15);
    const int head = min(V, mis ? (16 - mis) / (int)sizeof(T) : 0);
    const int nvec = (V - head) / kVec;
    const int tail0 = head + nvec * kVec;
    const lk_u32x4* zv = reinterpret_cast<const lk_u32x4*>(z + head);

    // Until the max rises, best is the thread's first column, which names
    // the row's first column when the row is all -inf (argmax 0, like the
    // reference).
    XentBest b;
    b.best = tid < head ? tid : (tid < nvec ? head + tid * kVec : (tid < V - tail0 ? tail0 + tid : LK_I32_MAX));
    b.best_n = 0;
    XentAcc acc = xent_acc_identity();
    if (tid < head && xent_scalar(acc, lk_to_f32(z[tid]), tid, pol, lt)) b.best = tid;
    // Whole steps. Without per-column coefficients (the common case), software-
    // pipelined: the loads of the next step go out before the current step is
    // computed (two register sets, va and vb, used in turn), so each thread
    // always has a step's loads in flight. The steps and their order are those
    // of a plain loop either way: the result is unchanged.
    int j = tid;
    if constexpr (P::kCoef) {
        // The per-column coefficient paths have no registers to spare for a
        // second set: a plain loop.
        for (; j + (U - 1) * NT < nvec; j += U * NT) {
            lk_u32x4 v[U];
            xent_ld_step(v, zv, j, NT);
            if (xent_step_at<T, U>(acc, v, j, NT, head, pol, lt)) {
                b.best = j;
                b.best_n = U;
            }
        }
    } else if (j + (U - 1) * NT < nvec) {
        lk_u32x4 va[U], vb[U];
        xent_ld_step(va, zv, j, NT);
        for (;;) {
            int jn = j + U * NT;
            bool more = jn + (U - 1) * NT < nvec;
            if (more) xent_ld_step(vb, zv, jn, NT);
            if (xent_step_at<T, U>(acc, va, j, NT, head, pol, lt)) {
                b.best = j;
                b.best_n = U;
            }
            j = jn;
            if (!more) break;
            jn = j + U * NT;
            more = jn + (U - 1) * NT < nvec;
            if (more) xent_ld_step(va, zv, jn, NT);
            if (xent_step_at<T, U>(acc, vb, j, NT, head, pol, lt)) {
                b.best = j;
                b.best_n = U;
            }
            j = jn;
            if (!more) break;
        }
    }
    for (; j < nvec; j += NT) {
        lk_u32x4 v[1] = {lk_ld_nc_v4(zv + j)};
        const int col[1] = {head + j * kVec};
        if (xent_step<T, 1>(acc, v, col, pol, lt)) {
            b.best = j;
            b.best_n = 1;
        }
    }
    if (tid < V - tail0 && xent_scalar(acc, lk_to_f32(z[tail0 + tid]), tail0 + tid, pol, lt)) {
        b.best = tail0 + tid;
        b.best_n = 0;
    }
    const float my_top1 = acc.sm.m;
    XentCombine combine;
    combine.lt = lt;
    acc = lk_block_reduce(acc, xent_acc_identity(), combine);
    const XentRowState st = xent_row_state<P>(a, acc, ignored, y, y_coef, factor);

    int arg = xent_block_first(xent_first_max<T, false>(b, my_top1, st.top1, zv, head));
    if (st.maybe_nan) {
        const int nan_i = xent_first_nan(z, 0, V);
        // NaN counts as the largest value (torch.argmax).
        if (nan_i != LK_I32_MAX) arg = nan_i;
    }
    if (threadIdx.x == 0) xent_row_write<T, P>(a, row, z, acc, arg, ignored, bad_target, y, y_coef, weight);
    if (a.grad) {
        TG* g = static_cast<TG*>(a.grad) + row * a.classes;
        xent_grad_cols<T, TG, false>(st.gr, pol, z, g, 0, V);
    }
}

// ---------------------------------------------------------------------------
// The cluster kernel (sm_90): the C CTAs of a thread-block cluster (C from
// the row length, set at launch) share a row, each holding its slice in
// shared memory. A slice is loaded by one bulk copy (cp.async.bulk: the bytes
// in flight do not depend on registers) into one of two buffers: the next
// row's copy is issued when a row starts, so its latency hides behind this
// row's work. Each CTA reduces its slice and pushes the partial into every
// peer's shared memory (stores, no round trips); after a cluster barrier
// every CTA merges the C partials in rank order (so all hold the same row
// statistics) and computes the gradient of its slice from shared memory:
// HBM is read once and written once. Rank 0 writes the per-row outputs. A
// row's reductions have one shape for a given C, with or without the grad.

constexpr int kXentClusterThreads = 256;
constexpr int kXentClusterMax = 16;  // the largest cluster (non-portable above 8)

// The columns of a row one CTA of the cluster owns: its vectors, plus the
// row's unaligned head (rank 0) and tail (last rank), which it reads one by
// one from global memory and keeps in the 16-byte pads around its vectors.
struct XentSlice {
    int head;   // columns before the row's first 16-byte boundary
    int tail0;  // the first column after the row's last whole vector
    int c0;     // the column of the CTA's first vector
    int nv;     // its vectors
    int lo;     // it owns columns lo .. hi - 1
    int hi;
};

template <typename T>
__device__ __forceinline__ XentSlice xent_slice(const T* z, int V, int rank, int C) {
    const int kVec = 4 * XentWord<T>::kLanes;
    const int mis = (int)(reinterpret_cast<unsigned long long>(z) & 15);
    XentSlice s;
    s.head = min(V, mis ? (16 - mis) / (int)sizeof(T) : 0);
    const int nvec = (V - s.head) / kVec;
    s.tail0 = s.head + nvec * kVec;
    const int per = (nvec + C - 1) / C;
    const int v0 = min(rank * per, nvec);
    const int v1 = min(v0 + per, nvec);
    s.c0 = s.head + v0 * kVec;
    s.nv = v1 - v0;
    s.lo = rank == 0 ? 0 : s.c0;
    s.hi = rank == C - 1 ? V : s.head + v1 * kVec;
    return s;
}

// Bytes of one slice buffer: the most vectors any row's slice holds, and a
// 16-byte pad on either side. The host sizes the two buffers the same way.
template <typename T>
__device__ __forceinline__ int xent_slice_buffer_bytes(int V, int C) {
    const int kVec = 4 * XentWord<T>::kLanes;
    return 32 + 16 * ((V / kVec + C - 1) / C);
}

// What the CTAs of a cluster write into each other, in two sets used by
// alternate rows: between a row's writes of one set and the next writes of
// it lie two cluster barriers, which every reader of it has passed.
struct XentClusterSlots {
    XentAcc acc[2][kXentClusterMax];        // every CTA's partial, in each CTA
    int first[2][kXentClusterMax][2];       // first max and first NaN column, in rank 0
    XentAcc mine;                           // this CTA's partial, for the pushes
    unsigned long long bar[2];              // completes when a buffer's slice has landed
};

#ifdef LK_HAS_CLUSTERS
// The CTA's slice of the row at z: its vectors by a bulk copy into `buf`,
// completing `bar`. One thread.
template <typename T>
__device__ __forceinline__ void xent_fetch_slice(unsigned long long* bar, T* buf, const T* z, int V, int rank,
                                                 int C) {
    const XentSlice s = xent_slice(z, V, rank, C);
    lk_bulk_load(buf, z + s.c0, 16u * (unsigned int)s.nv, bar);
}

// The forward pass of a CTA over its slice: its head or tail columns from
// global memory (kept in the buffer's pads for the gradient), its vectors
// from the buffer once the copy has landed.
template <typename T, typename P>
__device__ __forceinline__ XentAcc xent_slice_forward(const XentSlice& sc, T* base, const T* z, int V, int rank,
                                                      int C, unsigned long long* bar, unsigned int parity,
                                                      const P& pol, float lt, XentBest& b) {
    const int kVec = 4 * XentWord<T>::kLanes;
    const int U = P::kCoef ? kXentUnroll / 2 : kXentUnroll;
    const int NT = kXentClusterThreads;
    const int tid = threadIdx.x;
    const int head_n = rank == 0 ? sc.head : 0;
    const int tail_n = rank == C - 1 ? V - sc.tail0 : 0;
    const lk_u32x4* sv = reinterpret_cast<const lk_u32x4*>(base);
    // As in xent_row: until the max rises, best is the thread's first column.
    b.best = tid < head_n ? tid : (tid < sc.nv ? sc.c0 + tid * kVec : (tid < tail_n ? sc.tail0 + tid : LK_I32_MAX));
    b.best_n = 0;
    XentAcc acc = xent_acc_identity();
    if (tid < head_n) {
        const T zt = z[tid];
        base[tid - sc.c0] = zt;
        if (xent_scalar(acc, lk_to_f32(zt), tid, pol, lt)) b.best = tid;
    }
    lk_mbarrier_wait(bar, parity);
    int j = tid;
    for (; j + (U - 1) * NT < sc.nv; j += U * NT) {
        lk_u32x4 v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) v[u] = sv[j + u * NT];
        if (xent_step_at<T, U>(acc, v, j, NT, sc.c0, pol, lt)) {
            b.best = j;
            b.best_n = U;
        }
    }
    for (; j < sc.nv; j += NT) {
        lk_u32x4 v[1] = {sv[j]};
        const int col[1] = {sc.c0 + j * kVec};
        if (xent_step<T, 1>(acc, v, col, pol, lt)) {
            b.best = j;
            b.best_n = 1;
        }
    }
    if (tid < tail_n) {
        const int k = sc.tail0 + tid;
        const T zt = z[k];
        base[k - sc.c0] = zt;
        if (xent_scalar(acc, lk_to_f32(zt), k, pol, lt)) {
            b.best = k;
            b.best_n = 0;
        }
    }
    return acc;
}

// The row's accumulator on every CTA's thread 0: each CTA pushes its partial
// (held by its thread 0) into slot `rank` of every CTA, one word per thread,
// then after the barrier merges the C slots in rank order.
__device__ __forceinline__ XentAcc xent_cluster_merge(XentClusterSlots& sl, XentAcc acc, unsigned int set, int rank,
                                                      int C, const XentCombine& combine) {
    const int kWords = (int)(sizeof(XentAcc) / 4);
    if (threadIdx.x == 0) sl.mine = acc;
    __syncthreads();
    if ((int)threadIdx.x < C * kWords) {
        const int peer = threadIdx.x / kWords;
        const int word = threadIdx.x % kWords;
        const unsigned int* mine = reinterpret_cast<const unsigned int*>(&sl.mine);
        lk_cluster_store(reinterpret_cast<const unsigned int*>(&sl.acc[set][rank]) + word, (unsigned int)peer,
                         mine[word]);
    }
    lk_cluster_sync();
    if (threadIdx.x == 0) {
        acc = sl.acc[set][0];
        for (int r = 1; r < C; ++r) acc = combine(acc, sl.acc[set][r]);
    }
    return acc;
}

// One row over the cluster; n counts the rows this CTA has done (its buffer,
// barrier phase and slot set), z_next is the row after (null at the end),
// whose slice is fetched into the other buffer as this row starts.
template <typename T, typename TG, typename P>
__device__ __forceinline__ void xent_cluster_row(const XentFwdArgs& a, XentClusterSlots& sl, unsigned char* slab,
                                                 unsigned int n, lk_i64 row, const T* z, const T* z_next,
                                                 const P& pol, bool ignored, bool bad_target, int y,
                                                 float y_coef, float weight, float factor) {
    const int V = (int)a.classes;
    const int tid = threadIdx.x;
    const int rank = (int)lk_cluster_rank();
    const int C = (int)lk_cluster_size();
    const unsigned int set = n & 1;
    const int buffer_bytes = xent_slice_buffer_bytes<T>(V, C);
    T* base = reinterpret_cast<T*>(slab + set * buffer_bytes + 16);
    if (tid == 0 && z_next) {
        // The other buffer was last read by the row before, which ended in a
        // __syncthreads.
        T* next = reinterpret_cast<T*>(slab + (set ^ 1) * buffer_bytes + 16);
        xent_fetch_slice(&sl.bar[set ^ 1], next, z_next, V, rank, C);
    }
    const XentSlice sc = xent_slice(z, V, rank, C);
    XentBest b;
    XentAcc acc = xent_slice_forward(sc, base, z, V, rank, C, &sl.bar[set], (n >> 1) & 1, pol, a.lt, b);
    const float my_top1 = acc.sm.m;
    XentCombine combine;
    combine.lt = a.lt;
    acc = lk_block_reduce(acc, xent_acc_identity(), combine);
    acc = xent_cluster_merge(sl, acc, set, rank, C, combine);
    const XentRowState st = xent_row_state<P>(a, acc, ignored, y, y_coef, factor);

    const lk_u32x4* sv = reinterpret_cast<const lk_u32x4*>(base);
    const int first = xent_block_first(xent_first_max<T, true>(b, my_top1, st.top1, sv, sc.c0));
    const T* own = base + (sc.lo - sc.c0);  // column lo in shared memory
    const int nan_i = st.maybe_nan ? xent_first_nan(own, sc.lo, sc.hi - sc.lo) : LK_I32_MAX;
    if (tid == 0) {
        lk_cluster_store(&sl.first[set][rank][0], 0, (unsigned int)first);
        lk_cluster_store(&sl.first[set][rank][1], 0, (unsigned int)nan_i);
    }
    if (a.grad) {
        TG* g = static_cast<TG*>(a.grad) + row * a.classes;
        xent_grad_cols<T, TG, true>(st.gr, pol, own, g + sc.lo, sc.lo, sc.hi - sc.lo);
    }
    __syncthreads();  // every read of this row's buffer is done
    lk_cluster_sync();
    if (rank == 0 && tid == 0) {
        int arg = LK_I32_MAX;
        int nan_first = LK_I32_MAX;
        for (int r = 0; r < C; ++r) {
            arg = min(arg, sl.first[set][r][0]);
            nan_first = min(nan_first, sl.first[set][r][1]);
        }
        // NaN counts as the largest value (torch.argmax).
        if (nan_first != LK_I32_MAX) arg = nan_first;
        xent_row_write<T, P>(a, row, z, acc, arg, ignored, bad_target, y, y_coef, weight);
    }
}
#endif

// The class-target bookkeeping of one row: whether it is ignored, its label,
// the (1 - eps) w_y coefficient and its denominator weight w_y. Targets are
// not checked on the host: a label outside [0, V) that is not ignore_index
// is `bad`, never used as an index (y = 0), and gets a NaN coefficient and
// weight, so its loss, grad row and the reduced loss are NaN.
struct XentClassRow {
    bool ignored;
    bool bad;
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
    r.bad = false;
    r.y = 0;
    r.y_coef = 0.0f;
    r.weight = 0.0f;
    if (!r.ignored) {
        if (label < 0 || label >= V) {
            r.bad = true;
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

// The rows of a block (one block per row, grid-strided).
template <typename T, typename TG>
struct XentBlockRows {
    const XentFwdArgs& a;
    __device__ __forceinline__ lk_i64 first() const { return blockIdx.x; }
    __device__ __forceinline__ lk_i64 stride() const { return gridDim.x; }
    template <typename P>
    __device__ __forceinline__ void run(lk_i64 row, const T* z, const P& pol, bool ignored, bool bad_target, int y,
                                        float y_coef, float weight, float factor) {
        xent_row<T, TG>(a, row, z, pol, ignored, bad_target, y, y_coef, weight, factor);
    }
};

#ifdef LK_HAS_CLUSTERS
// The rows of a cluster (one cluster per row, grid-strided by cluster).
template <typename T, typename TG>
struct XentClusterRows {
    const XentFwdArgs& a;
    XentClusterSlots& sl;
    unsigned char* slab;
    unsigned int done;
    __device__ __forceinline__ lk_i64 first() const { return lk_cluster_id(); }
    __device__ __forceinline__ lk_i64 stride() const { return lk_cluster_count(); }
    template <typename P>
    __device__ __forceinline__ void run(lk_i64 row, const T* z, const P& pol, bool ignored, bool bad_target, int y,
                                        float y_coef, float weight, float factor) {
        const lk_i64 next = row + stride();
        const T* z_next = next < a.batch ? static_cast<const T*>(a.logits) + next * a.row_stride : nullptr;
        xent_cluster_row<T, TG>(a, sl, slab, done++, row, z, z_next, pol, ignored, bad_target, y, y_coef, weight,
                                factor);
    }
};
#endif

// One row loop per kind of target, each with its policy fixed: a single
// loop dispatching per row would keep every policy's values live at once,
// which costs registers (spills under the 64 of 1024 threads) on the hot path.
template <typename T, typename TG, typename Rows>
__device__ __forceinline__ void xent_rows(const XentFwdArgs& a, Rows& rows) {
    const T* logits = static_cast<const T*>(a.logits);
    // d(reduced loss)/dz carries the reduction's scale and the 1/T of x = z / T.
    const float factor = a.grad ? (float)(a.scale[0] / a.temperature_f64) : 0.0f;
    if (a.labels && a.eps_per_class == 0.0f) {
        for (lk_i64 row = rows.first(); row < a.batch; row += rows.stride()) {
            const T* z = logits + row * a.row_stride;
            const XentClassRow cr =
                xent_class_row(a.labels, a.weights, row, a.classes, a.ignore_index, a.one_minus_eps);
            rows.run(row, z, XentClassPlain(), cr.ignored, cr.bad, cr.y, cr.y_coef, cr.weight, factor);
        }
    } else if (a.labels) {
        for (lk_i64 row = rows.first(); row < a.batch; row += rows.stride()) {
            const T* z = logits + row * a.row_stride;
            const XentClassRow cr =
                xent_class_row(a.labels, a.weights, row, a.classes, a.ignore_index, a.one_minus_eps);
            if (cr.ignored) {
                rows.run(row, z, XentClassPlain(), true, false, cr.y, cr.y_coef, cr.weight, factor);
            } else {
                XentClassSmooth pol;
                pol.weights = a.weights;
                pol.eps_per_class = a.eps_per_class;
                rows.run(row, z, pol, false, cr.bad, cr.y, cr.y_coef, cr.weight, factor);
            }
        }
    } else if (a.soft_f32) {
        for (lk_i64 row = rows.first(); row < a.batch; row += rows.stride()) {
            const T* z = logits + row * a.row_stride;
            XentSoft<float> pol;
            pol.q = static_cast<const float*>(a.soft) + row * a.classes;
            pol.weights = a.weights;
            pol.one_minus_eps = a.one_minus_eps;
            pol.eps_per_class = a.eps_per_class;
            rows.run(row, z, pol, false, false, -1, 0.0f, 1.0f, factor);
        }
    } else {
        for (lk_i64 row = rows.first(); row < a.batch; row += rows.stride()) {
            const T* z = logits + row * a.row_stride;
            XentSoft<T> pol;
            pol.q = static_cast<const T*>(a.soft) + row * a.classes;
            pol.weights = a.weights;
            pol.one_minus_eps = a.one_minus_eps;
            pol.eps_per_class = a.eps_per_class;
            rows.run(row, z, pol, false, false, -1, 0.0f, 1.0f, factor);
        }
    }
}

template <typename T, typename TG>
__device__ __forceinline__ void xent_block_kernel(const XentFwdArgs& a) {
    XentBlockRows<T, TG> rows{a};
    xent_rows<T, TG>(a, rows);
}

// Dynamic shared memory: two slice buffers (xent_slice_buffer_bytes each,
// sized the same way by the host from V and the cluster size).
template <typename T, typename TG>
__device__ __forceinline__ void xent_cluster_kernel(const XentFwdArgs& a) {
#ifdef LK_HAS_CLUSTERS
    extern __shared__ __align__(16) unsigned char xent_slab[];
    __shared__ XentClusterSlots slots;
    const lk_i64 row0 = lk_cluster_id();
    if (threadIdx.x == 0) {
        lk_mbarrier_init(&slots.bar[0]);
        lk_mbarrier_init(&slots.bar[1]);
        if (row0 < a.batch) {
            xent_fetch_slice(&slots.bar[0], reinterpret_cast<T*>(xent_slab + 16),
                             static_cast<const T*>(a.logits) + row0 * a.row_stride, (int)a.classes,
                             (int)lk_cluster_rank(), (int)lk_cluster_size());
        }
    }
    // A cluster barrier, not a block one: the first row's partials are pushed
    // into every peer's shared memory, which is only safe once every CTA of
    // the cluster has started (racecheck flagged the block barrier).
    lk_cluster_sync();
    XentClusterRows<T, TG> rows{a, slots, xent_slab, 0u};
    xent_rows<T, TG>(a, rows);
    // No CTA leaves while a peer may still read its slots.
    lk_cluster_sync();
#else
    // Launched only where clusters exist (Kernels::has_clusters).
    asm volatile("trap;");
#endif
}

// The grad's dtype is a template parameter (f32 or the logits'); without a
// grad, grad_f32 is 0 and the grad pass is skipped.
#define XENT_FWD_ENTRIES(NAME, KERNEL, ...)                                                   \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME##_f32(const XentFwdArgs a) {      \
        KERNEL<float, float>(a);                                                                \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME##_f16(const XentFwdArgs a) {      \
        if (a.grad_f32) {                                                                       \
            KERNEL<lk_f16, float>(a);                                                           \
        } else {                                                                                \
            KERNEL<lk_f16, lk_f16>(a);                                                          \
        }                                                                                       \
    }                                                                                           \
    extern "C" __global__ void __launch_bounds__(__VA_ARGS__) NAME##_bf16(const XentFwdArgs a) {     \
        if (a.grad_f32) {                                                                       \
            KERNEL<lk_bf16, float>(a);                                                          \
        } else {                                                                                \
            KERNEL<lk_bf16, lk_bf16>(a);                                                        \
        }                                                                                       \
    }

XENT_FWD_ENTRIES(xent_fwd, xent_block_kernel, 1024)
// Four CTAs per multiprocessor (64 registers a thread, as the block kernel's
// 1024 threads have), so that their phases overlap.
XENT_FWD_ENTRIES(xent_cluster, xent_cluster_kernel, kXentClusterThreads, 4)

// ---------------------------------------------------------------------------
// The grad's reduction scale before the row kernel: 1 / sum of the row
// weights of non-ignored rows for mean (B for soft targets), else 1. In f64,
// one block, a fixed tree. All rows ignored: 1 / 0 = inf, and every grad row
// is an exact zero anyway (the reference). A bad target adds 0, as an ignored
// row would: its own grad row is NaN, and the other rows keep the grad they
// have with that row ignored (xent_class_row never indexes with it).

extern "C" __global__ void __launch_bounds__(1024) xent_scale(const XentScaleArgs a) {
    double sum = 0.0;
    for (lk_i64 i = threadIdx.x; i < a.batch; i += blockDim.x) {
        if (a.labels) {
            const XentClassRow cr = xent_class_row(a.labels, a.weights, i, a.classes, a.ignore_index, 1.0f);
            sum += cr.bad ? 0.0 : (double)cr.weight;
        } else {
            sum += 1.0;
        }
    }
    sum = lk_block_reduce(sum, 0.0, lk_sum_op());
    if (threadIdx.x == 0) a.scale[0] = a.reduction == 1 ? 1.0 / sum : 1.0;
}

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

    // All rows ignored: the mean is 0 / 0 = NaN, as the reference.
    const double loss = a.reduction == 1 ? acc.loss / acc.weight : acc.loss;
    a.loss[0] = (float)loss;
    if (a.rho) {
        const double d = a.rho_max ? acc.delta_max : acc.delta_sum / (double)a.batch;
        a.rho[0] = xent_rho(d, a.rho_eps, a.rho_inf_if_small, a.has_cap, a.rho_cap, a.has_floor, a.rho_floor);
    }
}

// ---------------------------------------------------------------------------
// The directional radius along an update direction (reference `directional`):
// a = J v [B, V] are the logit derivatives, Delta_a = max_k a_k - min_k a_k
// per row (NaN when the row holds a NaN), rho_a = pi / max_i Delta_a (a NaN
// Delta_a wins), normalised step = step / rho_a, and for V = 2 the binary
// radius sqrt(delta^2 + pi^2) / |a_1 - a_0| with delta = z_1 - z_0.
// max and min are exact in f32 (every input is an f32 value); the
// differences and everything after them are taken in f64 and rounded once,
// as the reference's f64 values are when they are written as f32.

// Must match XentDirArgs in src/cuda/xent.rs.
struct XentDirArgs {
    const void* logits;           // [B, V] of T; read only when binary_radius is set
    const void* derivatives;      // [B, V] of T
    float* delta_a;               // [B]
    double* delta_a_f64;          // [B] scratch for xent_directional_reduce
    float* binary_radius;         // [B] when V = 2, else null
    lk_i64 batch;
    lk_i64 classes;
};
static_assert(sizeof(XentDirArgs) == 56, "XentDirArgs layout drifted from src/cuda/xent.rs");
LK_FIELD_AT(XentDirArgs, logits, 0);
LK_FIELD_AT(XentDirArgs, derivatives, 8);
LK_FIELD_AT(XentDirArgs, delta_a, 16);
LK_FIELD_AT(XentDirArgs, delta_a_f64, 24);
LK_FIELD_AT(XentDirArgs, binary_radius, 32);
LK_FIELD_AT(XentDirArgs, batch, 40);
LK_FIELD_AT(XentDirArgs, classes, 48);

// Must match XentDirReduceArgs in src/cuda/xent.rs.
struct XentDirReduceArgs {
    const double* delta_a_f64;    // [B]
    float* rho_a;                 // [1]
    float* normalized_step;       // [1]
    lk_i64 batch;
    double step;
};
static_assert(sizeof(XentDirReduceArgs) == 40, "XentDirReduceArgs layout drifted from src/cuda/xent.rs");
LK_FIELD_AT(XentDirReduceArgs, delta_a_f64, 0);
LK_FIELD_AT(XentDirReduceArgs, rho_a, 8);
LK_FIELD_AT(XentDirReduceArgs, normalized_step, 16);
LK_FIELD_AT(XentDirReduceArgs, batch, 24);
LK_FIELD_AT(XentDirReduceArgs, step, 32);

// A thread's (then the block's) span of a row: fmaxf / fminf skip NaN, so a
// NaN is recorded in its own flag (the reference's row test).
struct XentSpan {
    float mx;
    float mn;
    int nan;
};

__device__ __forceinline__ XentSpan lk_shfl_down(const XentSpan& a, int offset) {
    XentSpan r;
    r.mx = lk_shfl_down(a.mx, offset);
    r.mn = lk_shfl_down(a.mn, offset);
    r.nan = lk_shfl_down(a.nan, offset);
    return r;
}

__device__ __forceinline__ XentSpan lk_combine(const XentSpan& a, const XentSpan& b) {
    XentSpan r;
    r.mx = fmaxf(a.mx, b.mx);
    r.mn = fminf(a.mn, b.mn);
    r.nan = a.nan | b.nan;
    return r;
}

// One read of a: consecutive threads take consecutive columns (coalesced),
// and the unrolled loop keeps several loads in flight per thread. Column
// indices are unsigned 32-bit (the host refuses V >= 2^31, so k + blockDim
// cannot wrap), row offsets 64-bit.
template <typename T>
__device__ __forceinline__ void xent_directional_rows(const XentDirArgs& a) {
    const int V = (int)a.classes;
    XentSpan identity;
    identity.mx = -LK_INF_F;
    identity.mn = LK_INF_F;
    identity.nan = 0;
    for (lk_i64 row = blockIdx.x; row < a.batch; row += gridDim.x) {
        const T* d = static_cast<const T*>(a.derivatives) + row * a.classes;
        XentSpan s = identity;
#pragma unroll 4
        for (unsigned int k = threadIdx.x; k < (unsigned int)V; k += blockDim.x) {
            const float x = lk_to_f32(d[k]);
            s.nan |= x != x;
            s.mx = fmaxf(s.mx, x);
            s.mn = fminf(s.mn, x);
        }
        s = lk_block_reduce(s, identity);
        if (threadIdx.x != 0) continue;
        // +inf - +inf (a row all +inf) is NaN here as in the reference.
        const double delta_a = s.nan ? (double)LK_NAN_F : (double)s.mx - (double)s.mn;
        a.delta_a[row] = (float)delta_a;
        a.delta_a_f64[row] = delta_a;
        if (a.binary_radius && V == 2) {
            // From a_1 - a_0 itself, as the reference: NaN for a NaN a_k.
            const T* z = static_cast<const T*>(a.logits) + row * 2;
            const double dz = (double)lk_to_f32(z[1]) - (double)lk_to_f32(z[0]);
            const double da = (double)lk_to_f32(d[1]) - (double)lk_to_f32(d[0]);
            a.binary_radius[row] = (float)(sqrt(dz * dz + LK_PI * LK_PI) / fabs(da));
        }
    }
}

extern "C" __global__ void __launch_bounds__(1024) xent_directional_f32(const XentDirArgs a) {
    xent_directional_rows<float>(a);
}
extern "C" __global__ void __launch_bounds__(1024) xent_directional_f16(const XentDirArgs a) {
    xent_directional_rows<lk_f16>(a);
}
extern "C" __global__ void __launch_bounds__(1024) xent_directional_bf16(const XentDirArgs a) {
    xent_directional_rows<lk_bf16>(a);
}

// The NaN-propagating max over rows as a block-reduce combiner.
struct XentNanMaxOp {
    __device__ __forceinline__ double operator()(double a, double b) const { return xent_nan_max(a, b); }
};

// One block: max over the f64 Delta_a (the f32 outputs could overflow to inf
// where the f64 difference does not), then rho_a and the step in f64, each
// rounded once. Max is order-free, so the result is exact and deterministic.
extern "C" __global__ void __launch_bounds__(1024) xent_directional_reduce(const XentDirReduceArgs a) {
    double mx = -LK_INF_D;
    for (lk_i64 i = threadIdx.x; i < a.batch; i += blockDim.x) mx = xent_nan_max(mx, a.delta_a_f64[i]);
    mx = lk_block_reduce(mx, -LK_INF_D, XentNanMaxOp());
    if (threadIdx.x != 0) return;
    // Every Delta_a = 0 gives rho_a = +inf and a step of 0, as the reference.
    const double rho = LK_PI / mx;
    a.rho_a[0] = (float)rho;
    a.normalized_step[0] = (float)(a.step / rho);
}
