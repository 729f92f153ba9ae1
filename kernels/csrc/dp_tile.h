// The pair-dot-product kernel's inner loop (`vdpbf16ps`, AVX512_BF16), for the files that
// multiply bf16 rows by weights in the B-tile layout: bf16_gemm.c's twin for CPUs without
// AMX, and int8_gemm.c's weight-only kernel on widened int8 weights. The includer compiles
// it for AVX512_BF16 and defines LANES (16, the channels of a packed block).
#pragma once
#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define DP_MR 12  // rows per pass over a pair's k: 24 sums in registers, of 32
#define DP_CHUNK_BYTES (512 * 1024)  // rows of x per pass over the weight: about half an L2

// acc[r][0 .. 32) = x's row r times the block pair (w0, w1) over all k, for rows <= DP_MR; a
// row's sums come out the same whatever `rows` is (each is its own chain over k)
static inline __attribute__((always_inline)) void dp_tile(const uint16_t *x, int k,
                                                          const uint16_t *w0,
                                                          const uint16_t *w1, int rows,
                                                          float *acc) {
    __m512 c0[DP_MR], c1[DP_MR];
    for (int r = 0; r < rows; ++r) c0[r] = c1[r] = _mm512_setzero_ps();
    for (int kp = 0; kp < k / 2; ++kp) {
        const __m512bh b0 = (__m512bh)_mm512_loadu_si512(w0 + kp * 2 * LANES);
        const __m512bh b1 = (__m512bh)_mm512_loadu_si512(w1 + kp * 2 * LANES);
        for (int r = 0; r < rows; ++r) {
            int32_t pair;
            memcpy(&pair, x + (long)r * k + 2 * kp, sizeof pair);
            const __m512bh a = (__m512bh)_mm512_set1_epi32(pair);
            c0[r] = _mm512_dpbf16_ps(c0[r], a, b0);
            c1[r] = _mm512_dpbf16_ps(c1[r], a, b1);
        }
    }
    for (int r = 0; r < rows; ++r) {
        _mm512_store_ps(acc + r * 2 * LANES, c0[r]);
        _mm512_store_ps(acc + r * 2 * LANES + LANES, c1[r]);
    }
}

// dp_tile with `rows` a constant in each case, so that the sums stay in registers
static void dp_tile_any(const uint16_t *x, int k, const uint16_t *w0, const uint16_t *w1,
                        int rows, float *acc) {
    switch (rows) {
        case 1: dp_tile(x, k, w0, w1, 1, acc); break;
        case 2: dp_tile(x, k, w0, w1, 2, acc); break;
        case 3: dp_tile(x, k, w0, w1, 3, acc); break;
        case 4: dp_tile(x, k, w0, w1, 4, acc); break;
        case 5: dp_tile(x, k, w0, w1, 5, acc); break;
        case 6: dp_tile(x, k, w0, w1, 6, acc); break;
        case 7: dp_tile(x, k, w0, w1, 7, acc); break;
        case 8: dp_tile(x, k, w0, w1, 8, acc); break;
        case 9: dp_tile(x, k, w0, w1, 9, acc); break;
        case 10: dp_tile(x, k, w0, w1, 10, acc); break;
        case 11: dp_tile(x, k, w0, w1, 11, acc); break;
        default: dp_tile(x, k, w0, w1, DP_MR, acc); break;
    }
}

// The rows of the next pass when `left` rows remain: passes of as many rows each (16 rows: 8
// and 8, not 12 and 4, whose pass has too few sums to hide the dot products' latency)
static inline int dp_pass_rows(int left) {
    const int passes = (left + DP_MR - 1) / DP_MR;
    return (left + passes - 1) / passes;
}

// The rows of x (bf16, k a row) a pass over the weight takes: DP_CHUNK_BYTES of them, in
// whole passes of DP_MR
static inline int dp_chunk_rows(int k) {
    const int chunk = (int)(DP_CHUNK_BYTES / (2L * k)) / DP_MR * DP_MR;
    return chunk < DP_MR ? DP_MR : chunk;
}
