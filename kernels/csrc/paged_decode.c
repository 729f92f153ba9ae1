// Batched decode attention over a paged KV cache, fp32, for CPUs.
//
// Reads K/V in place through the block table (no gather copy) and is bound by memory, so
// it is written around the reads: each sequence streams its blocks once for K and once for
// V, touching every token's full [Hkv, D] row (contiguous) for all query heads at once,
// and prefetches the next block while working on the current one. Parallel over sequences.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

static void prefetch_block(const float *block, long bytes) {
    for (long off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)block + off, 0, 1);
}

// scores[hq * len + t] = scale * <q_hq, k_t(kv head of hq)> for every token t < len
static void all_scores(const float *restrict q, const float *k_cache, const int32_t *table,
                       int len, int num_heads, int group, int head_dim, int block_size,
                       long token_stride, float scale, float *restrict scores) {
    const long block_floats = block_size * token_stride;
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const float *block = k_cache + (long)table[start / block_size] * block_floats;
        if (start + block_size < len)
            prefetch_block(k_cache + (long)table[start / block_size + 1] * block_floats, block_floats * 4);
        for (int r = 0; r < rows; ++r) {
            const float *restrict row = block + r * token_stride;
            for (int hq = 0; hq < num_heads; ++hq) {
                const float *restrict k = row + (long)(hq / group) * head_dim;
                const float *restrict qh = q + (long)hq * head_dim;
                float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
                for (int i = 0; i < head_dim; ++i) acc += qh[i] * k[i];
                scores[(long)hq * len + start + r] = acc * scale;
            }
        }
    }
}

static void softmax_rows(float *scores, int rows, int len) {
    for (int h = 0; h < rows; ++h) {
        float *row = scores + (long)h * len, m = -INFINITY, sum = 0.0f;
        for (int t = 0; t < len; ++t) m = row[t] > m ? row[t] : m;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < len; ++t) {
            row[t] = expf(row[t] - m);
            sum += row[t];
        }
        const float inv = 1.0f / sum;
        for (int t = 0; t < len; ++t) row[t] *= inv;
    }
}

// out[hq] = sum_t scores[hq, t] * v_t(kv head of hq)
static void weighted_values(const float *restrict scores, const float *v_cache, const int32_t *table,
                            int len, int num_heads, int group, int head_dim, int block_size,
                            long token_stride, float *restrict out) {
    const long block_floats = block_size * token_stride;
    memset(out, 0, sizeof(float) * (size_t)num_heads * (size_t)head_dim);
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const float *block = v_cache + (long)table[start / block_size] * block_floats;
        if (start + block_size < len)
            prefetch_block(v_cache + (long)table[start / block_size + 1] * block_floats, block_floats * 4);
        for (int r = 0; r < rows; ++r) {
            const float *restrict row = block + r * token_stride;
            for (int hq = 0; hq < num_heads; ++hq) {
                const float p = scores[(long)hq * len + start + r];
                const float *restrict v = row + (long)(hq / group) * head_dim;
                float *restrict o = out + (long)hq * head_dim;
#pragma omp simd
                for (int i = 0; i < head_dim; ++i) o[i] += p * v[i];
            }
        }
    }
}

// q, out: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (contiguous);
// block_tables: [B, max_blocks]; seq_lens: [B] (context length including the new token).
void paged_decode_f32(const float *q, const float *k_cache, const float *v_cache,
                      const int32_t *block_tables, const int32_t *seq_lens, float *out, int batch,
                      int num_heads, int num_kv_heads, int head_dim, int block_size, int max_blocks,
                      float scale, int num_threads) {
    const int group = num_heads / num_kv_heads;
    const long token_stride = (long)num_kv_heads * head_dim;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int b = 0; b < batch; ++b) {
        const int len = seq_lens[b];
        const int32_t *table = block_tables + (long)b * max_blocks;
        const long q_off = (long)b * num_heads * head_dim;
        float *scores = malloc(sizeof(float) * (size_t)num_heads * (size_t)len);
        all_scores(q + q_off, k_cache, table, len, num_heads, group, head_dim, block_size, token_stride,
                   scale, scores);
        softmax_rows(scores, num_heads, len);
        weighted_values(scores, v_cache, table, len, num_heads, group, head_dim, block_size, token_stride,
                        out + q_off);
        free(scores);
    }
}
