// bf16 linear on AMX-BF16 tiles: out [m, n] = x [m, k] @ W^T + bias, fp32 sums rounded once
// to bf16, for CPUs with AMX-BF16; and its twin on AVX512_BF16's pair dot products
// (`vdpbf16ps`) for CPUs without AMX (a Zen 4's or 5's), on the same packed weights.
//
// The weight is packed once at load (kernels/bf16_gemm.py) into `tdpbf16ps`'s B-tile layout:
// blocks of 16 output channels, and in each block k in pairs,
//   packed[nb][k / 2][lane][k % 2] = w[nb * 16 + lane][k]   (zero-padded to whole blocks)
// so the tile for k0 .. k0 + 32 of a block is 1 KB of contiguous memory. At decode sizes a
// linear reads its weight from memory once and does little math per byte, so what counts is
// how close the reads come to the memory's speed: the tiles are asked for ahead of their
// loads (amx_tiles.h), and a decode step's linears take 0.54-0.60x of oneDNN's time.
//
// bf16_silu_mul_amx is the MLP's gate_up projection with SiLU(gate) * up in its epilogue:
// its weight's blocks alternate gate and up channels, so a pair of blocks holds both halves
// of 16 outputs, and the activation is applied to the sums in registers, with the roundings
// of the unfused path (the projection's output to bf16, then fused_ops_avx512bf16.c's
// silu_mul): the same bits, without writing and reading back the 2 x intermediate values.
// Every CPU with AMX-BF16 has AVX512_BF16 (its rounding instruction) too.
//
// The B-tile layout is also what `vdpbf16ps` takes: a k pair of a block is one 64-byte
// vector (16 channels x 2 k), multiplied by the row's two x values broadcast to every lane.
// So the twin (dp_gemm) packs nothing else and shares the epilogues.
#pragma GCC optimize("fp-contract=off")  // silu_mul's roundings, as fused_ops_avx512bf16.c
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "exp16_avx512.h"

#define LANES 16       // output channels per packed block
#define K_STEP 32      // k per tile
#define CHUNK_BYTES (512 * 1024)  // rows of x per pass over the weight: about half an L2

#include "dp_tile.h"  // after LANES

// acc: rows x cols fp32 sums (a row every 2 * LANES floats) + bias -> bf16 rows of out, 16
// columns a vector (a scalar loop here kept the tiles waiting even under the next tile)
static void store_rows(const float *acc, int rows, int r0, int n0, int cols, const float *bias,
                       int n, uint16_t *out) {
    for (int c = 0; c < cols; c += LANES) {
        const __mmask16 mask = cols - c >= LANES ? 0xffff : (__mmask16)((1u << (cols - c)) - 1);
        // no bias: no + 0, which would turn a -0 sum into +0
        const __m512 b = bias ? _mm512_maskz_loadu_ps(mask, bias + n0 + c) : _mm512_setzero_ps();
        for (int r = 0; r < rows; ++r) {
            __m512 v = _mm512_load_ps(acc + r * 2 * LANES + c);
            if (bias) v = _mm512_add_ps(v, b);
            _mm256_mask_storeu_epi16(out + (long)(r0 + r) * n + n0 + c, mask,
                                     (__m256i)_mm512_cvtneps_pbh(v));
        }
    }
}

static inline __m512 round_bf16(__m512 v) {  // to the nearest bf16, as fp32
    const __m256i h = (__m256i)_mm512_cvtneps_pbh(v);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// acc: rows of 16 gate sums then 16 up sums -> SiLU(gate) * up, bf16, in columns n0 .. n0 + 16
static void store_silu_rows(const float *acc, int rows, int r0, int n0, int n, uint16_t *out) {
    for (int r = 0; r < rows; ++r) {
        const __m512 g = round_bf16(_mm512_load_ps(acc + r * 2 * LANES));
        const __m512 u = round_bf16(_mm512_load_ps(acc + r * 2 * LANES + LANES));
        const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), g));
        const __m512 den = _mm512_add_ps(_mm512_set1_ps(1.0f), e);
        const __m512 silu = round_bf16(_mm512_div_ps(g, den));
        _mm256_storeu_si256((__m256i *)(out + (long)(r0 + r) * n + n0),
                            (__m256i)_mm512_cvtneps_pbh(_mm512_mul_ps(silu, u)));
    }
}

// A pair of packed blocks and the columns of out its sums go to
typedef struct {
    const uint16_t *w0, *w1;  // w1 is w0 again for a lone last block
    int n0, cols;
} block_pair;

// Pair `pair` of `blocks` packed blocks of k * LANES words each: with `silu` a gate and an
// up block, whose outputs are LANES columns from pair * LANES; else up to 2 * LANES columns
static inline block_pair pair_at(const uint16_t *packed, int k, int blocks, int pair, int silu,
                                 int n) {
    const int b0 = 2 * pair, nb = blocks - b0 < 2 ? 1 : 2;
    const uint16_t *w0 = packed + (long)b0 * k * LANES;
    const int n0 = (silu ? pair : b0) * LANES;
    return (block_pair){w0, nb == 2 ? w0 + (long)k * LANES : w0, n0,
                        n - n0 < nb * LANES ? n - n0 : nb * LANES};
}

// A 32-row x 2-block tile's fp32 sums whose epilogue (bias or SiLU, rounding, the store to
// out) is still to run, `done` of its `rows` so far
typedef struct {
    const float *acc;
    int rows, r0, n0, cols, done;
} pending_tile;

// The epilogue of a pending tile's rows up to `upto`
static void finish_rows(pending_tile *t, int upto, const float *bias, int silu, int n,
                        uint16_t *out) {
    if (upto > t->rows) upto = t->rows;
    if (t->done >= upto) return;
    const float *acc = t->acc + t->done * 2 * LANES;
    if (silu)
        store_silu_rows(acc, upto - t->done, t->r0 + t->done, t->n0, n, out);
    else
        store_rows(acc, upto - t->done, t->r0 + t->done, t->n0, t->cols, bias, n, out);
    t->done = upto;
}

// x [m, k] bf16 (k a multiple of 32) against `blocks` packed blocks -> out [m, n] bf16: the
// linear (bias fp32 or NULL), or with `silu` SiLU(gate) * up of block pairs (gate, up). Rows
// pass in chunks that stay in L2; within a chunk, threads split the pairs of blocks, and each
// pair meets every row in tiles of 32 (two of 16 rows; a tile past the last row is skipped).
// A tile's epilogue runs a few rows per k step of the next tile's loop: the vector units
// work while the tiles multiply, instead of the tiles waiting for the epilogue (at prefill
// sizes it took as long as the multiplications).
static void tile_gemm(const uint16_t *x, int m, int k, const uint16_t *packed, int blocks,
                      const float *bias, int silu, int n, uint16_t *out, int threads) {
    const int pairs = (blocks + 1) / 2;
    const long row_bytes = 2L * k;
    const int steps = k / K_STEP, rows_per_step = (32 + steps - 1) / steps;
    const uint16_t *xs = x;
    uint16_t *padded = NULL;
    if (m % 16) {  // a tile load reads 16 rows: give the last one zero rows to read
        const int mp = (m + 15) / 16 * 16;
        padded = aligned_alloc(64, (size_t)mp * (size_t)row_bytes);
        memcpy(padded, x, (size_t)m * (size_t)row_bytes);
        memset(padded + (long)m * k, 0, (size_t)(mp - m) * (size_t)row_bytes);
        xs = padded;
    }
    int chunk = (int)(CHUNK_BYTES / row_bytes) / 32 * 32;
    if (chunk < 32) chunk = 32;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        amx_configure();
        float acc[2][32 * 2 * LANES] __attribute__((aligned(64)));
        pending_tile last = {.rows = 0};
        int slot = 0;
        for (int c0 = 0; c0 < m; c0 += chunk) {
            const int c1 = m - c0 < chunk ? m : c0 + chunk;
#pragma omp for schedule(static) nowait
            for (int pair = 0; pair < pairs; ++pair) {
                const block_pair p = pair_at(packed, k, blocks, pair, silu, n);
                const uint16_t *w0 = p.w0, *w1 = p.w1;
                for (int r0 = c0; r0 < c1; r0 += 32) {
                    const uint16_t *a0 = xs + (long)r0 * k, *a1 = a0 + 16L * k;
                    const int two = c1 - r0 > 16;  // the second row tile holds rows
                    amx_zero_c();
                    for (int kk = 0, step = 1; kk < k; kk += K_STEP, ++step) {
                        if (r0 == c0) {  // the first pass brings the weight in
                            prefetch_ahead(w0 + (long)kk * LANES, 1024);
                            prefetch_ahead(w1 + (long)kk * LANES, 1024);
                        }
                        AMX_GEMM_STEP(TILE_DPBF16PS, a0 + kk, a1 + kk, row_bytes,
                                      w0 + (long)kk * LANES, w1 + (long)kk * LANES, two);
                        finish_rows(&last, step * rows_per_step, bias, silu, n, out);
                    }
                    amx_store_c(acc[slot], 2 * LANES * 4);  // a row: 2 blocks of fp32 sums
                    last = (pending_tile){acc[slot], c1 - r0 < 32 ? c1 - r0 : 32, r0, p.n0, p.cols,
                                          0};
                    slot ^= 1;
                }
            }
        }
        finish_rows(&last, 32, bias, silu, n, out);
        __asm__ volatile("tilerelease" ::);
    }
    free(padded);
}

// tile_gemm's twin on `vdpbf16ps` for CPUs with AVX512_BF16 and no AMX: the same packed
// blocks, chunks of rows and pairs of blocks per thread, DP_MR rows at a time in registers
static void dp_gemm(const uint16_t *x, int m, int k, const uint16_t *packed, int blocks,
                    const float *bias, int silu, int n, uint16_t *out, int threads) {
    const int pairs = (blocks + 1) / 2;
    const int chunk = dp_chunk_rows(k);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        float acc[DP_MR * 2 * LANES] __attribute__((aligned(64)));
        for (int c0 = 0; c0 < m; c0 += chunk) {
            const int c1 = m - c0 < chunk ? m : c0 + chunk;
#pragma omp for schedule(static) nowait
            for (int pair = 0; pair < pairs; ++pair) {
                const block_pair p = pair_at(packed, k, blocks, pair, silu, n);
                for (int r0 = c0; r0 < c1;) {
                    const int rows = dp_pass_rows(c1 - r0);
                    dp_tile_any(x + (long)r0 * k, k, p.w0, p.w1, rows, acc);
                    if (silu)
                        store_silu_rows(acc, rows, r0, p.n0, n, out);
                    else
                        store_rows(acc, rows, r0, p.n0, p.cols, bias, n, out);
                    r0 += rows;
                }
            }
        }
    }
}

// x [m, k] bf16 (k a multiple of 32) -> out [m, n] bf16 = x @ W^T + bias (fp32 or NULL). Only
// CPUs with AMX-BF16 may call it (Python checks), after amx_ready().
void bf16_linear_amx(const uint16_t *x, int m, int k, const uint16_t *packed,
                     const float *bias, int n, uint16_t *out, int threads) {
    tile_gemm(x, m, k, packed, (n + LANES - 1) / LANES, bias, 0, n, out, threads);
}

// x [m, k] -> out [m, inter] = SiLU(x @ gate^T) * (x @ up^T), the weight packed with gate and
// up blocks alternating (inter a multiple of 16); as bf16_linear_amx otherwise.
void bf16_silu_mul_amx(const uint16_t *x, int m, int k, const uint16_t *packed, int inter,
                       uint16_t *out, int threads) {
    tile_gemm(x, m, k, packed, 2 * (inter / LANES), NULL, 1, inter, out, threads);
}

// bf16_linear_amx's twin for CPUs with AVX512_BF16 and no AMX (Python checks)
void bf16_linear_avx512bf16(const uint16_t *x, int m, int k, const uint16_t *packed,
                            const float *bias, int n, uint16_t *out, int threads) {
    dp_gemm(x, m, k, packed, (n + LANES - 1) / LANES, bias, 0, n, out, threads);
}

// bf16_silu_mul_amx's twin for CPUs with AVX512_BF16 and no AMX (Python checks)
void bf16_silu_mul_avx512bf16(const uint16_t *x, int m, int k, const uint16_t *packed,
                              int inter, uint16_t *out, int threads) {
    dp_gemm(x, m, k, packed, 2 * (inter / LANES), NULL, 1, inter, out, threads);
}
