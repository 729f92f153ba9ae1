// The small per-layer ops of a decoder step, each fused into one pass over its rows:
// residual add + RMSNorm, RoPE on q and k with the KV cache write, and SiLU(gate) * up.
//
// Each is a handful of torch ops per layer otherwise (an allocation and a trip through
// memory apiece, plus the dispatch), which at small batches costs more than the math.
// Arithmetic is fp32; bf16 results round where Hugging Face's bf16 model rounds, so the
// fused path changes no more than the order of a sum.
//
// Like paged_decode.c, every kernel exists for AVX-512 (x86-64-v4) and for AVX2 (haswell)
// and Python picks the twin at run time (kernels/fused.py).
// NOTE: no fused multiply-add: torch rounds each product of x1 * cos - x2 * sin, and fp32
// results should match its bits
#pragma GCC optimize("fp-contract=off")
// (set before the includes: a static inline function compiled with other options would
// not inline into the loops, which then would not vectorize)
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define F32_IDENTITY(x) (x)
#define CHUNK 256  // a row is worked on in pieces of this many fp32 values, on the stack

// e^x to ~1 ulp (Cephes' expf: e^x = 2^n e^r, |r| <= ln 2 / 2, a degree-7 polynomial).
// NOTE: ours, not libm's: glibc's vector expf is only declared with -ffinite-math-only,
// which the build leaves off, and a scalar call per element keeps the loop scalar.
static inline float exp_f32(float x) {
    x = x < -87.3f ? -87.3f : x > 88.7f ? 88.7f : x;  // 2^n stays a normal float
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (f32_bits){.u = (uint32_t)((int32_t)n + 127) << 23}.f;
}

// n fp32 values into a row of the KV cache (or a query) held as fp32 or bf16
static inline void store_f32_or_bf16(const float *restrict src, void *dst, long at, int bf16,
                                     int n) {
    if (bf16) {
        uint16_t *restrict d = (uint16_t *)dst + at;
        for (int i = 0; i < n; ++i) d[i] = bf16_store(src[i]);
    } else {
        memcpy((float *)dst + at, src, sizeof(float) * (size_t)n);
    }
}

#define ELEM float
#define LOAD F32_IDENTITY
#define STORE F32_IDENTITY
#define ROUND F32_IDENTITY
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SUFFIX f32_avx512
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define SUFFIX f32_avx2
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#undef ELEM
#undef LOAD
#undef STORE
#undef ROUND

// fp32 -> the nearest bf16 value, still as fp32 (where HF's bf16 model rounds an
// intermediate)
static inline float bf16_round(float f) { return bf16_load(bf16_store(f)); }

#define ELEM uint16_t
#define LOAD bf16_load
#define STORE bf16_store
#define ROUND bf16_round
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SUFFIX bf16_avx512
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define SUFFIX bf16_avx2
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
