// The decode kernel's body, included once per (element type, ISA) by paged_decode.c.
//
// Included after paged_common_impl.h, for the same ELEM, WIDE, LANES, SUFFIX and DPBF16,
// whose helpers it uses. Arithmetic is fp32 throughout; with DPBF16 the scores are bf16
// pair products (`vdpbf16ps`) summed in fp32.
//
// A task is one KV head of one sequence. The query heads of its group go through together,
// up to `heads_per_pass` at a time: each key and value row is loaded (and widened) once for
// all of them. A key's dot product with a head is a vector of partial sums; the vectors of
// LANES keys are reduced together by a shuffle tree into one vector of LANES scores, where a
// horizontal sum per key cost several times as many instructions.

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

// Sum of the lanes of d[i] into lane i, for LANES vectors: each level folds pairs of vectors
// into one, halving the lanes each key's partial sums take (FOLD_LO / FOLD_HI pick them, see
// paged_common_impl.h); the last level leaves key i in lane bit-reversed(i).
static inline VF NAME(reduce_)(const VF *d) {
    VF w[LANES / 2], z[LANES / 4];
    for (int i = 0; i < LANES / 2; ++i) w[i] = FOLD(d[2 * i], d[2 * i + 1], LANES / 2);
    for (int i = 0; i < LANES / 4; ++i) z[i] = FOLD(w[2 * i], w[2 * i + 1], LANES / 4);
#if LANES == 16
    const VF u0 = FOLD(z[0], z[1], 2), u1 = FOLD(z[2], z[3], 2);
    const VF s = FOLD(u0, u1, 1);
#else
    const VF s = FOLD(z[0], z[1], 1);
#endif
    return __builtin_shuffle(s, (VI){LANE_LIST(BIT_REVERSED, 0)});
}

// The blocks whose rows the current block's rows ask for: the block table sends reads to
// scattered blocks, which the hardware prefetcher only picks up a few lines in. Each row of
// the current block asks for the same row of a block PREFETCH_BLOCKS ahead (`prefetch_row_`),
// spread over the work instead of a burst per block, which filled the line-fill buffers and
// stalled the core on the prefetches themselves; the first block asks for all of the blocks
// up to that one. One block ahead left the KV reads at a third of a Zen 5's memory speed;
// three took a batch-16 or -64 step's attention to 0.86x of the time (docs/benchmarks.md).
// Fills `ahead` with those blocks' starts for this KV head; returns how many.
#define PREFETCH_BLOCKS 3
static inline int NAME(blocks_ahead_)(const ELEM *cache, const int32_t *table, int start, int len,
                                      int block_size, long token_stride, const ELEM **ahead) {
    int count = 0;
    for (int d = start == 0 ? 1 : PREFETCH_BLOCKS; d <= PREFETCH_BLOCKS; ++d) {
        const int at = start + d * block_size;
        if (at >= len) break;
        ahead[count++] = cache + (long)table[at / block_size] * block_size * token_stride;
    }
    return count;
}

static inline void NAME(prefetch_row_)(const ELEM *row, int dim) {
    const char *at = (const char *)row;
    for (long b = 0; b < (long)dim * (long)sizeof(ELEM); b += 64) __builtin_prefetch(at + b);
}

// Scores of `heads` query heads (q: [heads][D]) against the `len` keys, scaled, into
// scores[h * stride + j] (padded: a run's last vector may spill past len). `pairs` =
// D / (2 * LANES) pairs of vectors, `tail` the D % (2 * LANES) elements after them.
static inline __attribute__((always_inline)) void NAME(scores_)(
    const ELEM *q, const ELEM *k_cache, const int32_t *table, int len, const int pairs,
    const int tail, const int heads, int block_size, long token_stride, float scale,
    float *restrict scores, long stride) {
    const int body = 2 * LANES * pairs, dim = body + tail;
#if DPBF16
    // bf16 pairs straight from the rows; the scale goes on the scores
    const float pre = 1.0f, post = scale;
    VU qv[GMAX][MAX_BODY / (2 * LANES)];
    for (int h = 0; h < heads; ++h)
        for (int c = 0; c < pairs; ++c) qv[h][c] = *(const VU *)(q + h * dim + 2 * LANES * c);
#else
    const float pre = scale, post = 1.0f;
    VF qv[GMAX][MAX_BODY / LANES];
    for (int h = 0; h < heads; ++h)
        for (int c = 0; c < pairs; ++c) {
            NAME(load_pair_)(q + h * dim + 2 * LANES * c, &qv[h][2 * c], &qv[h][2 * c + 1]);
            qv[h][2 * c] *= scale;
            qv[h][2 * c + 1] *= scale;
        }
#endif
    VF dots[GMAX][LANES];  // partial sums of a run of keys per head (a key's own lanes)
    for (int h = 0; h < heads; ++h)
        for (int r = 0; r < LANES; ++r) dots[h][r] = (VF){0};
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const ELEM *k = k_cache + (long)table[start / block_size] * block_size * token_stride;
        const ELEM *ahead[PREFETCH_BLOCKS];
        const int count = NAME(blocks_ahead_)(k_cache, table, start, len, block_size,
                                              token_stride, ahead);
        for (int r0 = 0; r0 < rows; r0 += LANES) {
            const int n = rows - r0 < LANES ? rows - r0 : LANES;
            for (int r = 0; r < n; ++r) {
                const ELEM *kr = k + (long)(r0 + r) * token_stride;
                for (int a = 0; a < count; ++a)
                    NAME(prefetch_row_)(ahead[a] + (long)(r0 + r) * token_stride, dim);
#if DPBF16
                VU kv[MAX_BODY / (2 * LANES)];
                for (int c = 0; c < pairs; ++c) kv[c] = *(const VU *)(kr + 2 * LANES * c);
                for (int h = 0; h < heads; ++h) {
                    VF dot = {0};
                    for (int c = 0; c < pairs; ++c) dot = DOT(dot, qv[h][c], kv[c]);
                    dots[h][r] = dot;
                }
#else
                VF kv[MAX_BODY / LANES];
                for (int c = 0; c < pairs; ++c)
                    NAME(load_pair_)(kr + 2 * LANES * c, &kv[2 * c], &kv[2 * c + 1]);
                for (int h = 0; h < heads; ++h) {
                    VF dot = {0};
                    for (int c = 0; c < 2 * pairs; ++c) dot += qv[h][c] * kv[c];
                    dots[h][r] = dot;
                }
#endif
                for (int h = 0; h < heads && tail; ++h) {
                    float s = 0.0f;
                    for (int i = 0; i < tail; ++i)
                        s += NAME(to_f32_)(q[h * dim + body + i]) * NAME(to_f32_)(kr[body + i]);
                    dots[h][r][0] += s * pre;
                }
            }
            for (int h = 0; h < heads; ++h)
                *(VF *)(scores + h * stride + start + r0) = NAME(reduce_)(dots[h]) * post;
        }
    }
}

// Softmax of each head's `len` scores in place; returns nothing, writes 1 / sum to inv[h]
static inline void NAME(softmax_)(float *restrict scores, long stride, int len, int heads,
                                  float *inv) {
    for (int h = 0; h < heads; ++h) {
        float *s = scores + h * stride, m = -INFINITY, sum = 0.0f;
#pragma omp simd reduction(max : m)
        for (int t = 0; t < len; ++t) m = s[t] > m ? s[t] : m;
#pragma omp simd reduction(+ : sum)
        for (int t = 0; t < len; ++t) {
            s[t] = NAME(exp_nonpos_)(s[t] - m);
            sum += s[t];
        }
        inv[h] = 1.0f / sum;
    }
}

// out[h] = sum_j p[h][j] v_j / sum_j p[h][j] for `heads` heads (out: [heads][D]); value rows
// loaded once for all heads, each head's accumulators in registers
static inline __attribute__((always_inline)) void NAME(values_)(
    const ELEM *v_cache, const int32_t *table, int len, const int pairs, const int tail,
    const int heads, int block_size, long token_stride, const float *restrict scores,
    long stride, const float *inv, ELEM *out) {
    const int body = 2 * LANES * pairs, dim = body + tail;
    VF acc[GMAX][MAX_BODY / LANES];
    float acc_tail[GMAX][2 * LANES];
    for (int h = 0; h < heads; ++h) {
        for (int c = 0; c < 2 * pairs; ++c) acc[h][c] = (VF){0};
        for (int i = 0; i < tail; ++i) acc_tail[h][i] = 0.0f;
    }
    for (int start = 0; start < len; start += block_size) {
        const int rows = len - start < block_size ? len - start : block_size;
        const ELEM *v = v_cache + (long)table[start / block_size] * block_size * token_stride;
        const ELEM *ahead[PREFETCH_BLOCKS];
        const int count = NAME(blocks_ahead_)(v_cache, table, start, len, block_size,
                                              token_stride, ahead);
        for (int r = 0; r < rows; ++r, v += token_stride) {
            for (int a = 0; a < count; ++a)
                NAME(prefetch_row_)(ahead[a] + (long)r * token_stride, dim);
            VF vv[MAX_BODY / LANES];
            for (int c = 0; c < pairs; ++c) NAME(load_pair_)(v + 2 * LANES * c, &vv[2 * c], &vv[2 * c + 1]);
            for (int h = 0; h < heads; ++h) {
                const float p = scores[h * stride + start + r];
                for (int c = 0; c < 2 * pairs; ++c) acc[h][c] += p * vv[c];
                for (int i = 0; i < tail; ++i) acc_tail[h][i] += p * NAME(to_f32_)(v[body + i]);
            }
        }
    }
    for (int h = 0; h < heads; ++h) {
        for (int c = 0; c < pairs; ++c) {
            ELEM *o = out + h * dim + 2 * LANES * c;
            for (int i = 0; i < LANES; ++i) {
#if WIDE
                o[2 * i] = NAME(from_f32_)(acc[h][2 * c][i] * inv[h]);
                o[2 * i + 1] = NAME(from_f32_)(acc[h][2 * c + 1][i] * inv[h]);
#else
                o[i] = acc[h][2 * c][i] * inv[h];
                o[LANES + i] = acc[h][2 * c + 1][i] * inv[h];
#endif
            }
        }
        for (int i = 0; i < tail; ++i) out[h * dim + body + i] = NAME(from_f32_)(acc_tail[h][i] * inv[h]);
    }
}

// `heads` query heads (q, out: [heads][D]) over the `len` tokens of their KV head
static inline __attribute__((always_inline)) void NAME(attend_)(
    const ELEM *q, const ELEM *k_cache, const ELEM *v_cache, const int32_t *table, int len,
    const int pairs, const int tail, const int heads, int block_size, long token_stride,
    float scale, ELEM *out, float *restrict scores, long stride) {
    float inv[GMAX];
    NAME(scores_)(q, k_cache, table, len, pairs, tail, heads, block_size, token_stride, scale,
                  scores, stride);
    NAME(softmax_)(scores, stride, len, heads, inv);
    NAME(values_)(v_cache, table, len, pairs, tail, heads, block_size, token_stride, scores,
                  stride, inv, out);
}

// `attend_` with the head size and the heads per pass constants where they are common ones
// (64 and 128; 1 to GMAX), so that its loops unroll and its accumulators live in registers
#define ATTEND_CASE(D, H)                                                                     \
    case (D) * 8 + (H):                                                                       \
        NAME(attend_)(q, k_cache, v_cache, table, len, (D) / (2 * LANES), 0, H, block_size,  \
                      token_stride, scale, out, scores, stride);                              \
        return;
static void NAME(attend_any_)(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache,
                              const int32_t *table, int len, int head_dim, int heads,
                              int block_size, long token_stride, float scale, ELEM *out,
                              float *scores, long stride) {
    switch (head_dim * 8 + heads) {
        ATTEND_CASE(64, 1) ATTEND_CASE(64, 2) ATTEND_CASE(64, 3) ATTEND_CASE(64, 4)
        ATTEND_CASE(128, 1) ATTEND_CASE(128, 2)
        default: break;
    }
    const int pair = 2 * LANES;
    for (int h = 0; h < heads; ++h)  // any other size: one head at a time
        NAME(attend_)(q + h * head_dim, k_cache, v_cache, table, len, head_dim / pair,
                      head_dim % pair, 1, block_size, token_stride, scale, out + h * head_dim,
                      scores, stride);
}
#undef ATTEND_CASE

// q, out: [B, Hq, D]; k_cache, v_cache: [num_blocks, block_size, Hkv, D] (contiguous);
// block_tables: [B, max_blocks]; seq_lens: [B] (context length including the new token).
// D at most MAX_BODY. Parallel over sequences, or over (sequence, KV head) at small batches.
void NAME(paged_decode_)(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache,
                         const int32_t *block_tables, const int32_t *seq_lens, ELEM *out,
                         int batch, int num_heads, int num_kv_heads, int head_dim,
                         int block_size, int max_blocks, float scale, int num_threads) {
    const int group = num_heads / num_kv_heads;
    // heads per pass: as many as keep their query and accumulators in registers
    const int per_pass = head_dim <= 64 ? GMAX : head_dim <= 128 ? 2 : 1;
    const long token_stride = (long)num_kv_heads * head_dim;
    int longest = 0;
    for (int b = 0; b < batch; ++b) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    const long stride = longest + LANES;  // room for a run's last vector past len
    // A task: one sequence's KV heads one after the other where there are sequences enough to
    // keep the threads busy (0.93x of the time of a task per KV head at batch 16 and 64: a
    // sequence's blocks are read close together in time), else one KV head of a sequence
    const int heads_per_task = batch >= 4 * num_threads ? num_kv_heads : 1;
#pragma omp parallel num_threads(num_threads)
    {
        float *scores = malloc(sizeof(float) * (size_t)(GMAX * stride));
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < batch * num_kv_heads / heads_per_task; ++task) {
            for (int unit = task * heads_per_task; unit < (task + 1) * heads_per_task; ++unit) {
                const int b = unit / num_kv_heads;
                const long kv_offset = (long)(unit % num_kv_heads) * head_dim;
                for (int g = 0; g < group; g += per_pass) {
                    const long row = ((long)unit * group + g) * head_dim;
                    const int heads = group - g < per_pass ? group - g : per_pass;
                    NAME(attend_any_)(q + row, k_cache + kv_offset, v_cache + kv_offset,
                                      block_tables + (long)b * max_blocks, seq_lens[b],
                                      head_dim, heads, block_size, token_stride, scale,
                                      out + row, scores, stride);
                }
            }
        }
        free(scores);
    }
}
