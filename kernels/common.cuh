// common.cuh: helpers shared by every kernel family.
//
// The Rust side prepends this file to each family's .cu source before handing
// it to NVRTC (see src/cuda/compile.rs), so it must not #include anything: the
// NVRTC wheel on PyPI ships no CUDA toolkit headers (no cuda_fp16.h,
// cuda_bf16.h, math.h). Everything below uses only NVRTC built-ins (expf,
// logf, __shfl_down_sync, __float_as_uint, inline PTX).
//
// Determinism: every reduction here has a fixed shape for a given blockDim
// (thread-sequential, then a shfl_down tree, then the same tree over the warp
// partials), so one input gives bitwise one output on one device.

typedef long long lk_i64;

// f16 and bf16 are carried as their 16 bits; arithmetic is always in f32.
struct lk_f16 {
    unsigned short bits;
};
struct lk_bf16 {
    unsigned short bits;
};

#define LK_PI 3.14159265358979323846
#define LK_INF_F __int_as_float(0x7f800000)
#define LK_NAN_F __int_as_float(0x7fffffff)
#define LK_INF_D __longlong_as_double(0x7ff0000000000000LL)
#define LK_I32_MAX 0x7fffffff

// Pins a field of a kernel argument struct to the byte offset its #[repr(C)]
// Rust twin asserts with offset_of!, so a field moved on one side only fails
// the build of that side. NVRTC has neither <cstddef> nor __builtin_offsetof;
// its front end's __INTADDR__ makes the null-pointer member address a
// constant expression (checked: a wrong offset fails the static_assert).
#define LK_FIELD_AT(T, field, offset)                                     \
    static_assert(__INTADDR__(&(((T*)0)->field)) == (offset),             \
                  #T "." #field " is not at byte " #offset " as in its Rust twin")

// ---------------------------------------------------------------------------
// dtype conversions (exact widening; round-to-nearest-even narrowing)

__device__ __forceinline__ float lk_to_f32(float v) { return v; }

__device__ __forceinline__ float lk_to_f32(lk_f16 v) {
    // cvt.f32.f16 is exact (every f16 is an f32), subnormals included.
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(v.bits));
    return f;
}

__device__ __forceinline__ float lk_to_f32(lk_bf16 v) {
    // bf16 is the top half of an f32.
    return __uint_as_float(((unsigned int)v.bits) << 16);
}

template <typename T>
__device__ __forceinline__ T lk_from_f32(float v);

template <>
__device__ __forceinline__ float lk_from_f32<float>(float v) {
    return v;
}

template <>
__device__ __forceinline__ lk_f16 lk_from_f32<lk_f16>(float v) {
    lk_f16 r;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(r.bits) : "f"(v));
    return r;
}

template <>
__device__ __forceinline__ lk_bf16 lk_from_f32<lk_bf16>(float v) {
    // Round to nearest even by adding 0x7fff plus the lowest kept bit; a carry
    // into the exponent rounds up correctly, up to +-inf. NaN keeps its sign and
    // is made quiet, since truncating its payload could turn it into an inf.
    // (Bit arithmetic rather than cvt.rn.bf16.f32, which needs sm_80.)
    unsigned int u = __float_as_uint(v);
    lk_bf16 r;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        r.bits = (unsigned short)((u >> 16) | 0x0040u);
    } else {
        u += 0x7fffu + ((u >> 16) & 1u);
        r.bits = (unsigned short)(u >> 16);
    }
    return r;
}

// ---------------------------------------------------------------------------
// Fast 2^x: one MUFU.EX2 (about 2 ulp; subnormal results flush to 0, which
// is below the rounding of any sum it joins). The kernels use it for the
// per-element exponentials, where accurate expf would cost ~10 instructions
// and the memory-bound loops have a budget of about 8 per element; log stays
// accurate (once per row).
__device__ __forceinline__ float lk_ex2(float x) {
    float r;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(r) : "f"(x));
    return r;
}

// Online softmax over values z scaled by a positive factor: with
// lt = log2(e) / T, e^((z - m) / T) = 2^((z - m) lt). m = running max of z,
// s = sum e^((z - m) / T), t = sum e^((z - m) / T) (z - m) (in units of z).
// -inf entries contribute nothing (e^-inf = 0 and 0 * -inf is taken as 0);
// m = -inf means "nothing finite yet", with s = t = 0.

struct lk_softmax {
    float m, s, t;
};

__device__ __forceinline__ lk_softmax lk_softmax_identity() {
    lk_softmax r;
    r.m = -LK_INF_F;
    r.s = 0.0f;
    r.t = 0.0f;
    return r;
}

// Merges two partial states. When the max moves from m_i to m, each part is
// rescaled by r = e^((m_i - m) / T): s' = r s, t' = r (t + s (m_i - m)).
// A part whose max is still -inf has nothing to rescale: its s and t are 0,
// or NaN when it saw a NaN, which must reach the merged s (a NaN row's
// outputs are NaN), so such a part is added as it is.
__device__ __forceinline__ lk_softmax lk_softmax_merge(lk_softmax a, lk_softmax b, float lt) {
    lk_softmax r;
    r.m = fmaxf(a.m, b.m);
    r.s = 0.0f;
    r.t = 0.0f;
    if (a.m != -LK_INF_F) {
        const float d = a.m - r.m;
        const float e = lk_ex2(d * lt);
        r.s = e * a.s;
        r.t = e * fmaf(a.s, d, a.t);
    } else {
        r.s = a.s;
        r.t = a.t;
    }
    if (b.m != -LK_INF_F) {
        const float d = b.m - r.m;
        const float e = lk_ex2(d * lt);
        r.s = fmaf(e, b.s, r.s);
        r.t = fmaf(e, fmaf(b.s, d, b.t), r.t);
    } else {
        r.s += b.s;
        r.t += b.t;
    }
    return r;
}

// ---------------------------------------------------------------------------
// 16-byte global accesses. `nc`: read-only path for data read once by the
// kernel; `cs` (streaming, evict-first): data touched for the last time, so
// it leaves L2 before data that is still to be re-read.

struct lk_u32x4 {
    unsigned int x, y, z, w;
};

__device__ __forceinline__ lk_u32x4 lk_ld_nc_v4(const void* p) {
    lk_u32x4 r;
    asm volatile("ld.global.nc.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ lk_u32x4 lk_ld_cs_v4(const void* p) {
    lk_u32x4 r;
    asm volatile("ld.global.cs.v4.u32 {%0, %1, %2, %3}, [%4];"
                 : "=r"(r.x), "=r"(r.y), "=r"(r.z), "=r"(r.w)
                 : "l"(p));
    return r;
}

__device__ __forceinline__ void lk_ld_cs_v2(const void* p, unsigned int& x, unsigned int& y) {
    asm volatile("ld.global.cs.v2.u32 {%0, %1}, [%2];" : "=r"(x), "=r"(y) : "l"(p));
}

__device__ __forceinline__ void lk_st_cs_v4(void* p, lk_u32x4 v) {
    asm volatile("st.global.cs.v4.u32 [%0], {%1, %2, %3, %4};" ::"l"(p), "r"(v.x), "r"(v.y),
                 "r"(v.z), "r"(v.w)
                 : "memory");
}

// The 32-bit .shared::cta address of a generic pointer into shared memory (as
// cp.async, mbarrier and the bulk copies take it).
__device__ __forceinline__ unsigned int lk_smem(const void* p) {
    unsigned long long a;
    asm("cvta.to.shared.u64 %0, %1;" : "=l"(a) : "l"(p));
    return (unsigned int)a;
}

// ---------------------------------------------------------------------------
// Thread-block clusters, bulk copies and their barriers (sm_90 and later; the
// kernels that use them are launched only on such devices, see
// Kernels::has_clusters in src/cuda/launch.rs). A shared address below is a
// 32-bit .shared::cta address (lk_smem, above); for the local CTA it is also its
// .shared::cluster address.

#if __CUDA_ARCH__ >= 900
#define LK_HAS_CLUSTERS 1

__device__ __forceinline__ unsigned int lk_cluster_rank() {
    unsigned int r;
    asm("mov.u32 %0, %%cluster_ctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned int lk_cluster_id() {
    unsigned int r;
    asm("mov.u32 %0, %%clusterid.x;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned int lk_cluster_size() {
    unsigned int r;
    asm("mov.u32 %0, %%cluster_nctarank;" : "=r"(r));
    return r;
}
__device__ __forceinline__ unsigned int lk_cluster_count() {
    unsigned int r;
    asm("mov.u32 %0, %%nclusterid.x;" : "=r"(r));
    return r;
}

// Every thread of every CTA of the cluster: what each wrote to shared memory
// before it is visible to every other after it (release / acquire).
__device__ __forceinline__ void lk_cluster_sync() {
    asm volatile("barrier.cluster.arrive.release.aligned;\n\tbarrier.cluster.wait.acquire.aligned;" ::: "memory");
}

// Stores `value` at the address of `local` (a word of this CTA's shared
// memory) in CTA `rank` of the cluster: a store, not a round trip; the next
// lk_cluster_sync makes it visible there.
__device__ __forceinline__ void lk_cluster_store(const void* local, unsigned int rank, unsigned int value) {
    unsigned int remote;
    asm volatile("mapa.shared::cluster.u32 %0, %1, %2;" : "=r"(remote) : "r"(lk_smem(local)), "r"(rank));
    asm volatile("st.shared::cluster.u32 [%0], %1;" ::"r"(remote), "r"(value) : "memory");
}

// A one-arrival mbarrier for bulk copies; then every thread may wait on it.
__device__ __forceinline__ void lk_mbarrier_init(unsigned long long* bar) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;\n\tfence.mbarrier_init.release.cluster;" ::"r"(
                     lk_smem(bar))
                 : "memory");
}

// One thread: `bytes` (a multiple of 16, both addresses 16-byte aligned) from
// global `src` to shared `dst`, completing the barrier's current phase when
// they have landed. The fence orders this CTA's earlier generic accesses of
// `dst` (made visible to the issuing thread by a __syncthreads) before the
// asynchronous writes.
__device__ __forceinline__ void lk_bulk_load(void* dst, const void* src, unsigned int bytes,
                                             unsigned long long* bar) {
    asm volatile("fence.proxy.async.shared::cta;\n\t"
                 "mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(lk_smem(bar)),
                 "r"(bytes)
                 : "memory");
    if (bytes != 0) {
        asm volatile("cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], %2, [%3];" ::"r"(
                         lk_smem(dst)),
                     "l"(src), "r"(bytes), "r"(lk_smem(bar))
                     : "memory");
    }
}

// Waits until the barrier's phase of parity `parity` (0, 1, 0, .. for the
// 1st, 2nd, 3rd use) has completed.
__device__ __forceinline__ void lk_mbarrier_wait(unsigned long long* bar, unsigned int parity) {
    unsigned int done = 0;
    while (!done) {
        asm volatile(
            "{\n\t.reg .pred p;\n\tmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\n\tselp.u32 %0, 1, 0, p;\n\t}"
            : "=r"(done)
            : "r"(lk_smem(bar)), "r"(parity)
            : "memory");
    }
}
#endif

// ---------------------------------------------------------------------------
// Warp and block reductions. S is a plain struct with
//   S lk_shfl_down(const S&, int offset)   (shuffles every field) and
//   S lk_combine(const S& lower, const S& upper)
// found by overload resolution. blockDim.x must be a multiple of 32 (the
// launcher checks this); the result is valid in thread 0 only.

__device__ __forceinline__ float lk_shfl_down(float v, int offset) {
    return __shfl_down_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ double lk_shfl_down(double v, int offset) {
    return __shfl_down_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ lk_i64 lk_shfl_down(lk_i64 v, int offset) {
    return __shfl_down_sync(0xffffffffu, v, offset);
}
__device__ __forceinline__ int lk_shfl_down(int v, int offset) {
    return __shfl_down_sync(0xffffffffu, v, offset);
}

// The default combiner: lk_combine found by overload resolution. A kernel
// whose combine needs a parameter (a scale) passes its own functor.
struct lk_combine_op {
    template <typename S>
    __device__ __forceinline__ S operator()(const S& a, const S& b) const {
        return lk_combine(a, b);
    }
};

// Combiners of plain scalars (sum and min are exact or order-fixed by the tree).
struct lk_sum_op {
    template <typename S>
    __device__ __forceinline__ S operator()(S a, S b) const { return a + b; }
};
struct lk_min_op {
    template <typename S>
    __device__ __forceinline__ S operator()(S a, S b) const { return a < b ? a : b; }
};

template <typename S, typename Op>
__device__ __forceinline__ S lk_warp_reduce(S v, const Op& op) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = op(v, lk_shfl_down(v, offset));
    }
    return v;
}

// Ends with a barrier so the block may call it again at once (grid-stride
// loops over rows reuse the shared partials).
template <typename S, typename Op>
__device__ __forceinline__ S lk_block_reduce(S v, S identity, const Op& op) {
    __shared__ S partials[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = lk_warp_reduce(v, op);
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = (int)(blockDim.x >> 5);
        v = lane < warps ? partials[lane] : identity;
        v = lk_warp_reduce(v, op);
    }
    __syncthreads();
    return v;
}

template <typename S>
__device__ __forceinline__ S lk_block_reduce(S v, S identity) {
    return lk_block_reduce(v, identity, lk_combine_op());
}
