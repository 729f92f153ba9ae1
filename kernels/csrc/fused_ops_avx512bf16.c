// Two of the bf16 fused ops (fused_ops.c) again, for CPUs with AVX512_BF16: residual add +
// RMSNorm and SiLU(gate) * up, with the same arithmetic and the same roundings to bf16.
//
// In the generic bf16 twin every rounding to bf16 is emulated in integer steps (bias, carry,
// NaN test, shift), twice per element, and those steps, not the math, bound a prefill's
// small ops. Here `vcvtneps2bf16` rounds 16 floats to nearest even in one instruction (the
// same result: SiLU's outputs equal the generic twin's bit for bit, tests/test_fused_ops.py).
// Written with intrinsics, 16 lanes at a time, tails through masks. Python picks these where
// `cpu_features.has_avx512_bf16()` (kernels/fused.py); RoPE keeps the AVX-512 twin.
#pragma GCC optimize("fp-contract=off")  // products and sums rounded as fused_ops.c's
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

#include "exp16_avx512.h"

static inline __mmask16 tail_mask(int n) { return n >= 16 ? 0xffff : (__mmask16)((1u << n) - 1); }

// n <= 16 bf16 at p, widened to fp32 (lanes past n are zero)
static inline __m512 load_bf16(const uint16_t *p, int n) {
    const __m256i h = _mm256_maskz_loadu_epi16(tail_mask(n), p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __m256i to_bf16(__m512 x) { return (__m256i)_mm512_cvtneps_pbh(x); }

static inline void store_bf16(uint16_t *p, __m512 x, int n) {
    _mm256_mask_storeu_epi16(p, tail_mask(n), to_bf16(x));
}

// x rounded to the nearest bf16, as fp32
static inline __m512 round_bf16(__m512 x) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16(x)), 16));
}

// fused_ops_impl.h's rms_norm_ for bf16 (same arguments)
void rms_norm_bf16_avx512bf16(const uint16_t *x, uint16_t *residual, const uint16_t *weight,
                              uint16_t *out, int rows, int hidden, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int r = 0; r < rows; ++r) {
        const uint16_t *xr = x + (long)r * hidden;
        uint16_t *res = residual ? residual + (long)r * hidden : NULL;
        uint16_t *o = out + (long)r * hidden;
        __m512 sum = _mm512_setzero_ps();
        for (int i = 0; i < hidden; i += 16) {
            const int n = hidden - i;
            __m512 v = load_bf16(xr + i, n);
            if (res) {
                v = round_bf16(_mm512_add_ps(load_bf16(res + i, n), v));
                store_bf16(res + i, v, n);
            }
            sum = _mm512_add_ps(sum, _mm512_mul_ps(v, v));
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(sum) / (float)hidden + eps);
        const uint16_t *src = res ? res : xr;
        for (int i = 0; i < hidden; i += 16) {
            const int n = hidden - i;
            const __m512 normed = round_bf16(_mm512_mul_ps(load_bf16(src + i, n), _mm512_set1_ps(inv)));
            store_bf16(o + i, _mm512_mul_ps(load_bf16(weight + i, n), normed), n);
        }
    }
}

// out[i] = silu(g[i]) * u[i] for i < n, bf16
static inline void silu_mul_row(const uint16_t *g, const uint16_t *u, uint16_t *out, int n) {
    for (int i = 0; i < n; i += 16) {
        const int left = n - i;
        const __m512 x = load_bf16(g + i, left);
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), x)));
        const __m512 silu = round_bf16(_mm512_div_ps(x, den));
        store_bf16(out + i, _mm512_mul_ps(silu, load_bf16(u + i, left)), left);
    }
}

// fused_ops_impl.h's silu_mul_ for bf16 (same arguments)
void silu_mul_bf16_avx512bf16(const uint16_t *gate_up, uint16_t *out, int rows, int inter,
                              int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int r = 0; r < rows; ++r)
        silu_mul_row(gate_up + (long)r * 2 * inter, gate_up + (long)r * 2 * inter + inter,
                     out + (long)r * inter, inter);
}

// The same on one thread, for a kernel's epilogue (int8_gemm.c): rows of gate and up `stride`
// elements apart, n of each; out's rows `out_stride` apart
void silu_mul_rows_bf16_avx512bf16(const uint16_t *gate, const uint16_t *up, long stride,
                                   uint16_t *out, long out_stride, int rows, int n) {
    for (int r = 0; r < rows; ++r)
        silu_mul_row(gate + r * stride, up + r * stride, out + r * out_stride, n);
}
