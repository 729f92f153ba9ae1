// The decode kernel's body, included once per (element type, ISA) by paged_decode.c.
//
// The includer defines ELEM (the cache and query element type), LOAD(x) (ELEM -> float),
// STORE(x) (float -> ELEM), WIDE (1 when ELEM is bf16: each cache row is widened to fp32
// in a scratch row first, a loop GCC vectorizes where a per-element LOAD would not) and
// SUFFIX (appended to every name), and wraps the include in a `#pragma GCC target` so the
// same loops compile to that ISA's vectors. Arithmetic is fp32 throughout.
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define NAME(base) CAT(base, SUFFIX)

// the cache row as fp32: itself, or widened into scratch (bf16 is fp32's top 16 bits)
static inline const float *NAME(row_f32_)(const ELEM *restrict row, uint32_t *restrict scratch,
                                          long n) {
#if WIDE
    for (long i = 0; i < n; ++i) scratch[i] = (uint32_t)row[i] << 16;
    return (const float *)scratch;  // the build has -fno-strict-aliasing
#else
    (void)scratch;
    (void)n;
    return row;
#endif
}

// scores[hq * len + t] = scale * <q_hq, k_t(kv head of hq)> for every token t < len
static void NAME(all_scores_)(const float *restrict q, const ELEM *k_cache, const int32_t *table,
                              int len, int num_heads, int group, int head_dim, int block_size,
                              long token_stride, float scale, float *restrict scores,
                              uint32_t *restrict scratch) {
    const long block_elems = block_size * token_stride;
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const ELEM *block = k_cache + (long)table[start / block_size] * block_elems;
        if (start + block_size < len)
            prefetch_block(k_cache + (long)table[start / block_size + 1] * block_elems,
                           block_elems * (long)sizeof(ELEM));
        for (int r = 0; r < rows; ++r) {
            const float *restrict row = NAME(row_f32_)(block + r * token_stride, scratch, token_stride);
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

static void NAME(softmax_rows_)(float *scores, int rows, int len) {
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

// out[hq] = sum_t scores[hq, t] * v_t(kv head of hq), accumulated in fp32
static void NAME(weighted_values_)(const float *restrict scores, const ELEM *v_cache,
                                   const int32_t *table, int len, int num_heads, int group,
                                   int head_dim, int block_size, long token_stride,
                                   float *restrict out, uint32_t *restrict scratch) {
    const long block_elems = block_size * token_stride;
    memset(out, 0, sizeof(float) * (size_t)num_heads * (size_t)head_dim);
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const ELEM *block = v_cache + (long)table[start / block_size] * block_elems;
        if (start + block_size < len)
            prefetch_block(v_cache + (long)table[start / block_size + 1] * block_elems,
                           block_elems * (long)sizeof(ELEM));
        for (int r = 0; r < rows; ++r) {
            const float *restrict row = NAME(row_f32_)(block + r * token_stride, scratch, token_stride);
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
void NAME(paged_decode_)(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache,
                         const int32_t *block_tables, const int32_t *seq_lens, ELEM *out,
                         int batch, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, int max_blocks, float scale, int num_threads) {
    const int group = num_heads / num_kv_heads;
    const long token_stride = (long)num_kv_heads * head_dim;
    const long q_numel = (long)num_heads * head_dim;
#pragma omp parallel for schedule(dynamic, 1) num_threads(num_threads)
    for (int b = 0; b < batch; ++b) {
        const int len = seq_lens[b];
        const int32_t *table = block_tables + (long)b * max_blocks;
        // one buffer: the fp32 query, the fp32 output, a widened row, then the scores
        float *qf = malloc(sizeof(float) * (size_t)(2 * q_numel + token_stride + (long)num_heads * len));
        float *of = qf + q_numel, *scores = of + q_numel + token_stride;
        uint32_t *scratch = (uint32_t *)(of + q_numel);
        for (long i = 0; i < q_numel; ++i) qf[i] = LOAD(q[b * q_numel + i]);
        NAME(all_scores_)(qf, k_cache, table, len, num_heads, group, head_dim, block_size,
                          token_stride, scale, scores, scratch);
        NAME(softmax_rows_)(scores, num_heads, len);
        NAME(weighted_values_)(scores, v_cache, table, len, num_heads, group, head_dim,
                               block_size, token_stride, of, scratch);
        for (long i = 0; i < q_numel; ++i) out[b * q_numel + i] = STORE(of[i]);
        free(qf);
    }
}

#undef NAME
#undef CAT
#undef CAT_
