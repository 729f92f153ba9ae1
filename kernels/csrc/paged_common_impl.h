// What the attention kernels of one twin share, included first by paged_decode.c for each
// (element type, ISA): names, vector types, bf16 conversions and a vectorizable exp.
//
// The includer defines ELEM (the cache and query element type), WIDE (1 when ELEM is bf16),
// LANES (fp32 lanes in one register of the ISA the include is compiled for, under its
// `#pragma GCC target`: 16 for AVX-512, 8 for AVX2), SUFFIX (appended to every name) and
// DPBF16 (1 where `vdpbf16ps` multiplies bf16 pairs in hardware). paged_prefill_impl.h,
// always included last, undefines the names.
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define NAME(base) CAT(base, SUFFIX)
// one register of floats, and of as many 32-bit lanes (a bf16 pair each); unaligned, as
// cache rows are
#define VF NAME(vf_)
#define VU NAME(vu_)
#define VI NAME(vi_)
typedef float VF __attribute__((vector_size(LANES * 4), aligned(4)));
typedef uint32_t VU __attribute__((vector_size(LANES * 4), aligned(2)));
typedef int32_t VI __attribute__((vector_size(LANES * 4)));  // shuffle masks
#if DPBF16
// bf16 pairs as gcc's vdpbf16ps builtin takes them
typedef short NAME(vs_) __attribute__((vector_size(LANES * 4)));
#define DOT(acc, a, b) __builtin_ia32_dpbf16ps_v16sf(acc, (NAME(vs_))(a), (NAME(vs_))(b))
#endif

BF16_CONVERSIONS(SUFFIX)  // bf16_load<SUFFIX>, bf16_store<SUFFIX>

static inline float NAME(to_f32_)(ELEM x) {
#if WIDE
    return NAME(bf16_load)(x);
#else
    return x;
#endif
}

static inline ELEM NAME(from_f32_)(float x) {
#if WIDE
    return NAME(bf16_store)(x);
#else
    return x;
#endif
}

// e^x for x <= 0 (scores minus their max) in a form GCC vectorizes, where glibc's expf is
// one scalar call per score: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 and p the
// degree-6 Taylor polynomial (relative error below 2e-7)
static inline float NAME(exp_nonpos_)(float x) {
    x = x < -87.0f ? -87.0f : x;
    const float n = __builtin_roundf(x * 1.44269504f);
    const float r = x - n * 0.693145752f - n * 1.42860677e-6f;
    float p = 1.0f / 720.0f;
    p = p * r + 1.0f / 120.0f;
    p = p * r + 1.0f / 24.0f;
    p = p * r + 1.0f / 6.0f;
    p = p * r + 0.5f;
    p = p * r + 1.0f;
    p = p * r + 1.0f;
    const f32_bits scale = {.u = (uint32_t)((int32_t)n + 127) << 23};
    return p * scale.f;
}
