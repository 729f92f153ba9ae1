// The decode kernel's body, included once per (element type, ISA) by paged_decode.c.
//
// Included after paged_common_impl.h, for the same ELEM, WIDE, LANES and SUFFIX, whose
// helpers it uses. Arithmetic is fp32 throughout.

// 2 * LANES elements as two vectors of floats: for bf16 `lo` holds the even-indexed and
// `hi` the odd ones (two bf16 share a 32-bit lane, so one shift or one mask widens LANES of
// them), for fp32 the first and second halves. Query, keys and values are all split the
// same way, so dot products come out the same and outputs are put back in order at the end.
// NOTE: loads through a pointer of the vector type (the build has -fno-strict-aliasing):
// GCC splits a memcpy into 16-byte pieces under AVX2, 3x slower.
static inline void NAME(load_pair_)(const ELEM *p, VF *lo, VF *hi) {
#if WIDE
    const VU pair = *(const VU *)p;
    *lo = (VF)(pair << 16);
    *hi = (VF)(pair & 0xffff0000u);
#else
    *lo = *(const VF *)p;
    *hi = *(const VF *)(p + LANES);
#endif
}

static inline float NAME(hsum_)(VF v) {
    float s = 0.0f;
    for (int i = 0; i < LANES; ++i) s += v[i];
    return s;
}

// One query head over the `len` tokens of its sequence's KV head: q, out [D], its
// accumulators in registers. `pairs` = D / (2 * LANES) pairs of vectors, `tail` the
// D % (2 * LANES) elements after them; scores: [len] scratch.
static inline __attribute__((always_inline)) void NAME(attend_)(
    const ELEM *q, const ELEM *k_cache, const ELEM *v_cache, const int32_t *table, int len,
    const int pairs, const int tail, int block_size, long token_stride, float scale,
    ELEM *out, float *restrict scores) {
    const int body = 2 * LANES * pairs;
    VF qv[MAX_BODY / LANES], acc[MAX_BODY / LANES];
    float q_tail[2 * LANES], acc_tail[2 * LANES];
    for (int c = 0; c < pairs; ++c) {
        NAME(load_pair_)(q + 2 * LANES * c, &qv[2 * c], &qv[2 * c + 1]);
        qv[2 * c] *= scale;
        qv[2 * c + 1] *= scale;
    }
    for (int i = 0; i < tail; ++i) q_tail[i] = NAME(to_f32_)(q[body + i]) * scale;
    float m = -INFINITY;
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const ELEM *k = k_cache + (long)table[start / block_size] * block_size * token_stride;
        for (int r = 0; r < rows; ++r, k += token_stride) {
            VF dot = {0}, lo, hi;
            for (int c = 0; c < pairs; ++c) {
                NAME(load_pair_)(k + 2 * LANES * c, &lo, &hi);
                dot += qv[2 * c] * lo + qv[2 * c + 1] * hi;
            }
            float s = NAME(hsum_)(dot);
            for (int i = 0; i < tail; ++i) s += q_tail[i] * NAME(to_f32_)(k[body + i]);
            scores[start + r] = s;
            m = s > m ? s : m;
        }
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int t = 0; t < len; ++t) {
        scores[t] = NAME(exp_nonpos_)(scores[t] - m);
        sum += scores[t];
    }
    for (int c = 0; c < 2 * pairs; ++c) acc[c] = (VF){0};
    for (int i = 0; i < tail; ++i) acc_tail[i] = 0.0f;
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const ELEM *v = v_cache + (long)table[start / block_size] * block_size * token_stride;
        for (int r = 0; r < rows; ++r, v += token_stride) {
            const float p = scores[start + r];
            VF lo, hi;
            for (int c = 0; c < pairs; ++c) {
                NAME(load_pair_)(v + 2 * LANES * c, &lo, &hi);
                acc[2 * c] += p * lo;
                acc[2 * c + 1] += p * hi;
            }
            for (int i = 0; i < tail; ++i) acc_tail[i] += p * NAME(to_f32_)(v[body + i]);
        }
    }
    const float inv = 1.0f / sum;
    for (int c = 0; c < pairs; ++c) {
        ELEM *o = out + 2 * LANES * c;
        for (int i = 0; i < LANES; ++i) {
#if WIDE
            o[2 * i] = NAME(from_f32_)(acc[2 * c][i] * inv);
            o[2 * i + 1] = NAME(from_f32_)(acc[2 * c + 1][i] * inv);
#else
            o[i] = acc[2 * c][i] * inv;
            o[LANES + i] = acc[2 * c + 1][i] * inv;
#endif
        }
    }
    for (int i = 0; i < tail; ++i) out[body + i] = NAME(from_f32_)(acc_tail[i] * inv);
}

// `attend_` with the head size a constant where it is a common one (64, 128), so that its
// loops unroll and its accumulators live in registers
static void NAME(attend_any_)(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache,
                              const int32_t *table, int len, int head_dim, int block_size,
                              long token_stride, float scale, ELEM *out, float *scores) {
    const int pair = 2 * LANES;
    if (head_dim == 64)
        NAME(attend_)(q, k_cache, v_cache, table, len, 64 / pair, 0, block_size, token_stride,
                      scale, out, scores);
    else if (head_dim == 128)
        NAME(attend_)(q, k_cache, v_cache, table, len, 128 / pair, 0, block_size, token_stride,
                      scale, out, scores);
    else
        NAME(attend_)(q, k_cache, v_cache, table, len, head_dim / pair, head_dim % pair,
                      block_size, token_stride, scale, out, scores);
}

// q, out: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (contiguous);
// block_tables: [B, max_blocks]; seq_lens: [B] (context length including the new token).
// D at most MAX_BODY. Parallel over (sequence, KV head).
void NAME(paged_decode_)(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache,
                         const int32_t *block_tables, const int32_t *seq_lens, ELEM *out,
                         int batch, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, int max_blocks, float scale, int num_threads) {
    const int group = num_heads / num_kv_heads;
    const long token_stride = (long)num_kv_heads * head_dim;
    int longest = 0;
    for (int b = 0; b < batch; ++b) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)longest);
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < batch * num_kv_heads; ++task) {
            const int b = task / num_kv_heads;
            const long kv_offset = (long)(task % num_kv_heads) * head_dim;
            // the group's query heads in turn, on one thread: the KV head's rows that the
            // first pulls from DRAM are in L2 for the others
            for (int g = 0; g < group; ++g) {
                const long row = ((long)task * group + g) * head_dim;
                NAME(attend_any_)(q + row, k_cache + kv_offset, v_cache + kv_offset,
                                  block_tables + (long)b * max_blocks, seq_lens[b], head_dim,
                                  block_size, token_stride, scale, out + row, scores);
            }
        }
        free(scores);
    }
}

