// Causal prefill attention over a bf16 paged KV cache on AMX-BF16 tiles, for CPUs with AMX.
//
// Same arguments and result as the paged_prefill twins (paged_decode.c). Per sequence,
// each KV head's keys and values are first repacked from the cache into the B-tile layout
// of `tdpbf16ps` (bf16 pairs along the dimension that the product sums over):
//   kt[d / 2][j] = (k_j[d], k_j[d + 1])        for the scores, summed over d
//   vp[j / 2][d] = (v_j[d], v_{j + 1}[d])      for the output, summed over keys
// zero past the sequence's end. Then a task is 16 of the chunk's tokens for one query head:
//   scores S = Q K^T on tiles (fp32), a row-wise softmax in vector code over the keys up to
//   each token's position, the probabilities rounded to bf16 (as torch's bf16 flash
//   attention does), and the output P V on tiles, divided by the fp32 sum of the
//   probabilities before their rounding. The scores of a task are kept whole (no online
//   rescaling): 16 rows x the sequence's length.
// Only CPUs with AMX-BF16 may call it (Python checks), after amx_ready(); head_dim must be a
// multiple of 32.
#pragma GCC target("arch=x86-64-v4,avx512bf16")  // every CPU with AMX-BF16 has both
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "amx_tiles.h"
#include "bf16.h"
#include "exp16_avx512.h"

#define TR 16        // tokens (rows) per task
#define KSTEP 32     // keys (or dimensions) per tile step of the sums
#define DCHUNK 64    // output dimensions per pass over the keys: four C tiles of 16

static inline uint32_t pair(uint16_t lo, uint16_t hi) { return (uint32_t)lo | (uint32_t)hi << 16; }

// Row `pos` of KV head `h` in a cache [blocks][block_size][Hkv][D]
static inline const uint16_t *cache_row(const uint16_t *cache, const int32_t *table, int pos,
                                        int block_size, int h, int hkv, int d) {
    return cache + (((long)table[pos / block_size] * block_size + pos % block_size) * hkv + h) * d;
}

// Keys and values of KV head h, positions 0 .. len, into kt [d / 2][lp] and vp [lp / 2][d]
static void repack_head(const uint16_t *k_cache, const uint16_t *v_cache, const int32_t *table,
                        int len, int lp, int h, int hkv, int d, int block_size, uint32_t *kt,
                        uint32_t *vp) {
    memset(kt, 0, sizeof(uint32_t) * (size_t)lp * (size_t)(d / 2));
    memset(vp, 0, sizeof(uint32_t) * (size_t)lp * (size_t)(d / 2));
    for (int j = 0; j < len; ++j) {
        const uint16_t *k = cache_row(k_cache, table, j, block_size, h, hkv, d);
        for (int dp = 0; dp < d / 2; ++dp) kt[(long)dp * lp + j] = pair(k[2 * dp], k[2 * dp + 1]);
    }
    for (int j = 0; j < len; j += 2) {
        const uint16_t *v0 = cache_row(v_cache, table, j, block_size, h, hkv, d);
        const uint16_t *v1 =
            j + 1 < len ? cache_row(v_cache, table, j + 1, block_size, h, hkv, d) : NULL;
        uint32_t *dst = vp + (long)(j / 2) * d;
        for (int c = 0; c < d; ++c) dst[c] = pair(v0[c], v1 ? v1[c] : 0);
    }
}

// Row r's probabilities over keys 0 .. last (inclusive) from its scores, as bf16 in p, zero
// from last + 1 to kend (a multiple of 16); returns their fp32 sum. In intrinsics: GCC left
// the loop over a row scalar at run time.
static float softmax_row(const float *s, int last, int kend, float scale, uint16_t *p) {
    __m512 vmax = _mm512_set1_ps(-INFINITY);
    for (int j0 = 0; j0 <= last; j0 += 16) {
        const __mmask16 live = last - j0 >= 15 ? 0xffff : (__mmask16)((2u << (last - j0)) - 1);
        vmax = _mm512_mask_max_ps(vmax, live, vmax, _mm512_loadu_ps(s + j0));
    }
    const __m512 shift = _mm512_set1_ps(_mm512_reduce_max_ps(vmax) * scale);
    const __m512 vscale = _mm512_set1_ps(scale);
    __m512 sum = _mm512_setzero_ps();
    for (int j0 = 0; j0 < kend; j0 += 16) {
        const int left = last - j0;  // lanes 0 .. left live
        const __mmask16 live = left >= 15 ? 0xffff : left < 0 ? 0 : (__mmask16)((2u << left) - 1);
        const __m512 x = _mm512_fmsub_ps(_mm512_loadu_ps(s + j0), vscale, shift);
        const __m512 e = _mm512_maskz_mov_ps(live, exp16(x));
        sum = _mm512_add_ps(sum, e);
        _mm256_storeu_si256((__m256i *)(p + j0), (__m256i)_mm512_cvtneps_pbh(e));
    }
    return _mm512_reduce_add_ps(sum);
}

// One task: rows (tokens) t0 .. t0 + rows of the chunk for query head qh, against kt / vp
static void task(const uint16_t *q, long q_stride, int rows, int pos0, int t0, const uint32_t *kt,
                 const uint32_t *vp, int lp, int d, float scale, uint16_t *out, long out_stride,
                 uint16_t *qbuf, float *s, uint16_t *p, float *o) {
    memset(qbuf, 0, sizeof(uint16_t) * TR * (size_t)d);  // rows past the chunk's end: zero
    for (int r = 0; r < rows; ++r)
        memcpy(qbuf + r * d, q + (long)(t0 + r) * q_stride, 2 * (size_t)d);
    const int last_key = pos0 + t0 + rows - 1;
    const int kend = (last_key + KSTEP) / KSTEP * KSTEP;  // keys the tiles pass over
    // S in steps of 32 keys, two C tiles apart so that their sums overlap
    for (int jb = 0; jb < kend; jb += KSTEP) {
        TILE_ZERO(0);
        TILE_ZERO(1);
        for (int dd = 0; dd < d; dd += KSTEP) {
            const uint32_t *k = kt + (long)(dd / 2) * lp + jb;
            TILE_LOADD(4, qbuf + dd, 2 * d);
            TILE_LOADD(5, k, 4L * lp);
            TILE_LOADD(6, k + 16, 4L * lp);
            TILE_DPBF16PS(0, 4, 5);
            TILE_DPBF16PS(1, 4, 6);
        }
        TILE_STORED(0, s + jb, 4L * lp);
        TILE_STORED(1, s + jb + 16, 4L * lp);
    }
    float sums[TR];
    for (int r = 0; r < TR; ++r) {
        if (r < rows)
            sums[r] = softmax_row(s + (long)r * lp, pos0 + t0 + r, kend, scale, p + (long)r * lp);
        else
            memset(p + (long)r * lp, 0, 2 * (size_t)kend);
    }
    for (int d0 = 0; d0 < d; d0 += DCHUNK) {
        const int blocks = (d - d0 < DCHUNK ? d - d0 : DCHUNK) / 16;
        amx_zero_c();
        for (int jc = 0; jc < kend; jc += KSTEP) {
            const uint32_t *v = vp + (long)(jc / 2) * d + d0;
            TILE_LOADD(4, p + jc, 2L * lp);
            TILE_LOADD(5, v, 4L * d);
            TILE_DPBF16PS(0, 4, 5);
            if (blocks > 1) {
                TILE_LOADD(6, v + 16, 4L * d);
                TILE_DPBF16PS(1, 4, 6);
            }
            if (blocks > 2) {
                TILE_LOADD(5, v + 32, 4L * d);
                TILE_DPBF16PS(2, 4, 5);
            }
            if (blocks > 3) {
                TILE_LOADD(6, v + 48, 4L * d);
                TILE_DPBF16PS(3, 4, 6);
            }
        }
        TILE_STORED(0, o, 4 * DCHUNK);
        TILE_STORED(1, o + 16, 4 * DCHUNK);
        TILE_STORED(2, o + 32, 4 * DCHUNK);
        TILE_STORED(3, o + 48, 4 * DCHUNK);
        for (int r = 0; r < rows; ++r) {
            uint16_t *dst = out + (long)(t0 + r) * out_stride + d0;
            const float inv = 1.0f / sums[r];
            for (int c = 0; c < blocks * 16; ++c) dst[c] = bf16_store(o[r * DCHUNK + c] * inv);
        }
    }
}

void paged_prefill_bf16_amx(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                            const int32_t *tables, const int32_t *seq_lens,
                            const int32_t *query_start, uint16_t *out, int first_seq,
                            int num_seqs, int hq, int hkv, int d, int block_size, int max_blocks,
                            float scale, int threads) {
    const int group = hq / hkv;
    for (int seq = first_seq; seq < num_seqs; ++seq) {
        const int n = query_start[seq + 1] - query_start[seq], len = seq_lens[seq];
        const int lp = (len + KSTEP - 1) / KSTEP * KSTEP, tiles = (n + TR - 1) / TR;
        const int32_t *table = tables + (long)seq * max_blocks;
        const long head_words = (long)lp * (d / 2);  // kt's or vp's words per KV head
        uint32_t *packed = aligned_alloc(64, sizeof(uint32_t) * 2 * (size_t)head_words * hkv);
        const uint16_t *q0 = q + (long)query_start[seq] * hq * d;
        uint16_t *out0 = out + (long)query_start[seq] * hq * d;
#pragma omp parallel num_threads(threads) if (threads > 1)
        {
#pragma omp for schedule(static)
            for (int h = 0; h < hkv; ++h)
                repack_head(k_cache, v_cache, table, len, lp, h, hkv, d, block_size,
                            packed + 2 * h * head_words, packed + (2 * h + 1) * head_words);
            amx_configure();
            uint16_t *qbuf = aligned_alloc(64, sizeof(uint16_t) * TR * (size_t)d);
            float *s = aligned_alloc(64, sizeof(float) * TR * (size_t)lp);
            uint16_t *p = aligned_alloc(64, sizeof(uint16_t) * TR * (size_t)lp);
            float o[TR * DCHUNK] __attribute__((aligned(64)));
#pragma omp for schedule(dynamic)
            for (int t = 0; t < hq * tiles; ++t) {
                const int qh = t % hq, t0 = t / hq * TR, h = qh / group;
                const int rows = n - t0 < TR ? n - t0 : TR;
                task(q0 + (long)qh * d, (long)hq * d, rows, len - n, t0,
                     packed + 2 * h * head_words, packed + (2 * h + 1) * head_words, lp, d,
                     scale, out0 + (long)qh * d, (long)hq * d, qbuf, s, p, o);
            }
            free(qbuf);
            free(s);
            free(p);
            __asm__ volatile("tilerelease" ::);
        }
        free(packed);
    }
}
