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
// Online softmax: m = running max, s = sum e^(x - m), t = sum e^(x - m)(x - m).
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
// rescaled by r = e^(m_i - m): s' = r s, t' = r (t + s (m_i - m)).
__device__ __forceinline__ lk_softmax lk_softmax_merge(lk_softmax a, lk_softmax b) {
    lk_softmax r;
    r.m = fmaxf(a.m, b.m);
    r.s = 0.0f;
    r.t = 0.0f;
    if (a.m != -LK_INF_F) {
        const float d = a.m - r.m;
        const float e = expf(d);
        r.s = e * a.s;
        r.t = e * fmaf(a.s, d, a.t);
    }
    if (b.m != -LK_INF_F) {
        const float d = b.m - r.m;
        const float e = expf(d);
        r.s = fmaf(e, b.s, r.s);
        r.t = fmaf(e, fmaf(b.s, d, b.t), r.t);
    }
    return r;
}

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

template <typename S>
__device__ __forceinline__ S lk_warp_reduce(S v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        v = lk_combine(v, lk_shfl_down(v, offset));
    }
    return v;
}

// Ends with a barrier so the block may call it again at once (grid-stride
// loops over rows reuse the shared partials).
template <typename S>
__device__ __forceinline__ S lk_block_reduce(S v, S identity) {
    __shared__ S partials[32];
    const int lane = threadIdx.x & 31;
    const int warp = threadIdx.x >> 5;
    v = lk_warp_reduce(v);
    if (lane == 0) partials[warp] = v;
    __syncthreads();
    if (warp == 0) {
        const int warps = (int)(blockDim.x >> 5);
        v = lane < warps ? partials[lane] : identity;
        v = lk_warp_reduce(v);
    }
    __syncthreads();
    return v;
}
