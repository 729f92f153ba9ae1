// The prefill kernel's body, included by paged_decode.c after paged_common_impl.h and
// paged_decode_impl.h for the same ELEM / WIDE / LANES / SUFFIX / DPBF16, whose helpers it
// uses; it is the last include and undefines them.
//
// A task is a tile of a sequence's new tokens against one KV head: its rows are the tile's
// tokens times the G query heads sharing that KV head, ROWS of them at most. The rows are
// what the vectors run along (one register holds LANES rows' values at one key or one
// dimension), so keys and values are read as cache rows, never transposed, and each key
// row read once serves every row of the tile:
//   scores  st[j][r] = q_r . k_j              (a key's scalars broadcast against q columns)
//   softmax over j <= the row's position      (a row's max and sum are lane-wise)
//   output  ot[d][r] = sum_j st[j][r] v_j[d]  (a value's scalars broadcast against st rows)
// The scores of a tile are kept whole (two-pass softmax, no rescaling), in fp32. With
// DPBF16 both products take bf16 pairs (`vdpbf16ps`, fp32 sums): q columns and key rows
// paired along d as they lie in memory, and the probabilities rounded to bf16 and paired
// along j with two value rows interleaved, as torch's bf16 flash attention rounds them.
#define ROWS 48  // rows per task: 3 AVX-512 or 6 AVX2 registers of them
#define RV (ROWS / LANES)
#define KB (LANES == 16 ? 8 : 2)  // keys per step of the score loop (KB * RV accumulators)
#define DB (LANES == 16 ? 8 : 2)  // dimensions per step of the output loop (DB * RV)
#define JB 16                     // value rows per step of the output loop

// Key or value row `pos` of one KV head (`head` points at the head's first element)
static inline const ELEM *NAME(cache_row_)(const ELEM *head, const int32_t *table, int pos,
                                           int block_size, long token_stride) {
    return head + ((long)table[pos / block_size] * block_size + pos % block_size) * token_stride;
}

// `count` cache rows from position `pos` as fp32 rows of `head_dim` in `buf` (bf16), or
// pointers straight into the cache (fp32)
static inline void NAME(rows_f32_)(const ELEM *head, const int32_t *table, int pos, int count,
                                   int head_dim, int block_size, long token_stride, float *buf,
                                   const float **rows) {
    for (int i = 0; i < count; ++i) {
        const ELEM *src = NAME(cache_row_)(head, table, pos + i, block_size, token_stride);
#if WIDE
        float *dst = buf + (long)i * head_dim;
        for (int d = 0; d < head_dim; ++d) dst[d] = NAME(to_f32_)(src[d]);
        rows[i] = dst;
#else
        (void)buf;
        rows[i] = src;
#endif
    }
}

#if DPBF16
typedef uint32_t NAME(u32_) __attribute__((aligned(2)));  // a bf16 pair in a cache row

// The tile's scores st[j][r] (scaled): q columns paired along d, qp[d / 2][ROWS], against
// key rows read as pairs in place
static inline void NAME(scores_dpbf16_)(const ELEM *q, const ELEM *k_head, const int32_t *table,
                                        int rows, int len, int group, int head_dim,
                                        int block_size, long token_stride, long q_stride,
                                        float scale, uint32_t *restrict qp,
                                        float *restrict st) {
    const int dpairs = head_dim / 2;
    for (int dp = 0; dp < dpairs; ++dp)
        for (int r = 0; r < ROWS; ++r)
            qp[dp * ROWS + r] =
                r < rows ? *(const NAME(u32_) *)(q + (r / group) * q_stride +
                                                 (r % group) * head_dim + 2 * dp)
                         : 0u;
    for (int j0 = 0; j0 < len; j0 += KB) {
        const NAME(u32_) *krow[KB];
        for (int i = 0; i < KB; ++i)  // scores past len are never read
            krow[i] = (const NAME(u32_) *)NAME(cache_row_)(
                k_head, table, j0 + i < len ? j0 + i : j0, block_size, token_stride);
        VF acc[KB][RV];
        for (int i = 0; i < KB; ++i)
            for (int v = 0; v < RV; ++v) acc[i][v] = (VF){0};
        for (int dp = 0; dp < dpairs; ++dp) {
            const VU *col = (const VU *)(qp + dp * ROWS);
            for (int i = 0; i < KB; ++i) {
                const VU k = (VU){0} + krow[i][dp];
                for (int v = 0; v < RV; ++v) acc[i][v] = DOT(acc[i][v], col[v], k);
            }
        }
        for (int i = 0; i < KB; ++i)
            for (int v = 0; v < RV; ++v)
                *(VF *)(st + (long)(j0 + i) * ROWS + v * LANES) = acc[i][v] * scale;
    }
}

// ot[d][r] += sum_j p[j][r] v_j[d] for the tile's probabilities st[j][r]: they are rounded
// to bf16 in pairs of keys, in place (pair jp in st's row jp), and each block of JB value
// rows is interleaved two by two into vp [JB / 2][D]; rows past len are zeros there, as a
// stale slot could hold a NaN that a zero probability would not cancel
static inline void NAME(output_dpbf16_)(const ELEM *v_head, const int32_t *table, int len,
                                        int head_dim, int block_size, long token_stride,
                                        float *restrict st, uint32_t *restrict vp,
                                        float *restrict ot) {
    uint32_t *pp = (uint32_t *)st;
    for (int jp = 0; jp < (len + 1) / 2; ++jp) {
        const float *p0 = st + (long)2 * jp * ROWS, *p1 = p0 + ROWS;
        uint32_t pair[ROWS];
        for (int r = 0; r < ROWS; ++r)
            pair[r] = NAME(bf16_store)(p0[r]) |
                      (2 * jp + 1 < len ? (uint32_t)NAME(bf16_store)(p1[r]) << 16 : 0u);
        for (int r = 0; r < ROWS; ++r) pp[(long)jp * ROWS + r] = pair[r];
    }
    for (int j0 = 0; j0 < len; j0 += JB) {
        const int pairs = (len - j0 < JB ? len - j0 + 1 : JB) / 2;
        for (int jp = 0; jp < pairs; ++jp) {
            const int j = j0 + 2 * jp;
            const ELEM *r0 = NAME(cache_row_)(v_head, table, j, block_size, token_stride);
            const ELEM *r1 =
                j + 1 < len ? NAME(cache_row_)(v_head, table, j + 1, block_size, token_stride)
                            : NULL;
            for (int d = 0; d < head_dim; ++d)
                vp[jp * head_dim + d] = r0[d] | (r1 ? (uint32_t)r1[d] << 16 : 0u);
        }
        for (int d0 = 0; d0 < head_dim; d0 += DB) {
            VF acc[DB][RV];
            for (int i = 0; i < DB; ++i)
                for (int v = 0; v < RV; ++v)
                    acc[i][v] = *(const VF *)(ot + (d0 + i) * ROWS + v * LANES);
            for (int jp = 0; jp < pairs; ++jp) {
                const VU *p = (const VU *)(pp + (long)(j0 / 2 + jp) * ROWS);
                for (int i = 0; i < DB; ++i) {
                    const VU x = (VU){0} + vp[jp * head_dim + d0 + i];
                    for (int v = 0; v < RV; ++v) acc[i][v] = DOT(acc[i][v], p[v], x);
                }
            }
            for (int i = 0; i < DB; ++i)
                for (int v = 0; v < RV; ++v)
                    *(VF *)(ot + (d0 + i) * ROWS + v * LANES) = acc[i][v];
        }
    }
}
#undef DOT
#endif

// One tile: `tokens` query tokens at positions pos0.. (q: the first token's first query
// head of the group, rows `q_stride` apart; out likewise). Scratch: qt [D][ROWS],
// ot [D][ROWS], st [pos0 + tokens rounded up to KB][ROWS], kv [JB][D].
static void NAME(prefill_tile_)(const ELEM *q, const ELEM *k_head, const ELEM *v_head,
                                const int32_t *table, int tokens, int pos0, int group,
                                int head_dim, int block_size, long token_stride, long q_stride,
                                float scale, ELEM *out, float *restrict qt, float *restrict ot,
                                float *restrict st, float *restrict kv) {
    const int rows = tokens * group, len = pos0 + tokens;
#if DPBF16
    NAME(scores_dpbf16_)(q, k_head, table, rows, len, group, head_dim, block_size,
                         token_stride, q_stride, scale, (uint32_t *)qt, st);
#else
    for (int d = 0; d < head_dim; ++d)
        for (int r = 0; r < ROWS; ++r)
            qt[d * ROWS + r] =
                r < rows ? NAME(to_f32_)(q[(r / group) * q_stride + (r % group) * head_dim + d]) *
                               scale
                         : 0.0f;
    const float *krow[JB];
    for (int j0 = 0; j0 < len; j0 += KB) {
        const int count = len - j0 < KB ? len - j0 : KB;
        NAME(rows_f32_)(k_head, table, j0, count, head_dim, block_size, token_stride, kv, krow);
        for (int i = count; i < KB; ++i) krow[i] = krow[0];  // scores past len are never read
        VF acc[KB][RV];
        for (int i = 0; i < KB; ++i)
            for (int v = 0; v < RV; ++v) acc[i][v] = (VF){0};
        for (int d = 0; d < head_dim; ++d) {
            const VF *col = (const VF *)(qt + d * ROWS);
            for (int i = 0; i < KB; ++i) {
                const float k = krow[i][d];
                for (int v = 0; v < RV; ++v) acc[i][v] += k * col[v];
            }
        }
        for (int i = 0; i < KB; ++i)
            for (int v = 0; v < RV; ++v) *(VF *)(st + (long)(j0 + i) * ROWS + v * LANES) = acc[i][v];
    }
#endif
    // row r is token r / G, at position pos0 + r / G: it sees keys 0 ..= that position
    int last[ROWS];
    float m[ROWS], sum[ROWS];
    for (int r = 0; r < ROWS; ++r) {
        last[r] = pos0 + (r < rows ? r / group : 0);
        m[r] = -INFINITY;
        sum[r] = 0.0f;
    }
    for (int j = 0; j < len; ++j) {
        const float *s = st + (long)j * ROWS;
#pragma omp simd
        for (int r = 0; r < ROWS; ++r) m[r] = j <= last[r] && s[r] > m[r] ? s[r] : m[r];
    }
    for (int j = 0; j < len; ++j) {
        float *s = st + (long)j * ROWS;
#pragma omp simd
        for (int r = 0; r < ROWS; ++r) {
            const float p = j <= last[r] ? NAME(exp_nonpos_)(s[r] - m[r]) : 0.0f;
            s[r] = p;
            sum[r] += p;
        }
    }
    for (long i = 0; i < (long)head_dim * ROWS; ++i) ot[i] = 0.0f;
#if DPBF16
    NAME(output_dpbf16_)(v_head, table, len, head_dim, block_size, token_stride, st,
                         (uint32_t *)kv, ot);
#else
    const float *vrow[JB];
    for (int j0 = 0; j0 < len; j0 += JB) {
        const int count = len - j0 < JB ? len - j0 : JB;
        NAME(rows_f32_)(v_head, table, j0, count, head_dim, block_size, token_stride, kv, vrow);
        for (int d0 = 0; d0 < head_dim; d0 += DB) {
            VF acc[DB][RV];
            for (int i = 0; i < DB; ++i)
                for (int v = 0; v < RV; ++v) acc[i][v] = *(const VF *)(ot + (d0 + i) * ROWS + v * LANES);
            for (int jj = 0; jj < count; ++jj) {
                const VF *p = (const VF *)(st + (long)(j0 + jj) * ROWS);
                for (int i = 0; i < DB; ++i) {
                    const float x = vrow[jj][d0 + i];
                    for (int v = 0; v < RV; ++v) acc[i][v] += x * p[v];
                }
            }
            for (int i = 0; i < DB; ++i)
                for (int v = 0; v < RV; ++v) *(VF *)(ot + (d0 + i) * ROWS + v * LANES) = acc[i][v];
        }
    }
#endif
    for (int r = 0; r < rows; ++r) {
        const float inv = 1.0f / sum[r];
        ELEM *o = out + (r / group) * q_stride + (r % group) * head_dim;
        for (int d = 0; d < head_dim; ++d) o[d] = NAME(from_f32_)(ot[d * ROWS + r] * inv);
    }
}

// The prefill chunks of a step: sequences [first_seq, num_seqs), sequence s owning query
// rows [query_start[s], query_start[s + 1]) of q and out ([T, Hq, D]) and attending causally
// to its seq_lens[s] tokens in the cache ([num_blocks, block_size, Hkv, D], contiguous, the
// chunk's own K/V already written). head_dim a multiple of DB; Hq / Hkv at most ROWS.
// Parallel over (tile, KV head), the tiles with the most keys handed out first.
void NAME(paged_prefill_)(const ELEM *q, const ELEM *k_cache, const ELEM *v_cache,
                          const int32_t *block_tables, const int32_t *seq_lens,
                          const int32_t *query_start, ELEM *out, int first_seq, int num_seqs,
                          int num_heads, int num_kv_heads, int head_dim, int block_size,
                          int max_blocks, float scale, int num_threads) {
    const int group = num_heads / num_kv_heads, tile = ROWS / group;
    const long token_stride = (long)num_kv_heads * head_dim, q_stride = (long)num_heads * head_dim;
    int num_tiles = 0, longest = 0;
    for (int s = first_seq; s < num_seqs; ++s) {
        num_tiles += (query_start[s + 1] - query_start[s] + tile - 1) / tile;
        longest = seq_lens[s] > longest ? seq_lens[s] : longest;
    }
    int *tile_seq = malloc(sizeof(int) * (size_t)num_tiles * 2), *tile_start = tile_seq + num_tiles;
    int n = 0;
    for (int s = first_seq; s < num_seqs; ++s)
        for (int t = query_start[s]; t < query_start[s + 1]; t += tile, ++n) {
            tile_seq[n] = s;
            tile_start[n] = t;
        }
#pragma omp parallel num_threads(num_threads)
    {
        const long span = (long)head_dim * ROWS;
        float *qt = malloc(sizeof(float) * (2 * span + (long)(longest + KB) * ROWS + JB * head_dim));
        float *ot = qt + span, *st = ot + span, *kv = st + (long)(longest + KB) * ROWS;
#pragma omp for schedule(dynamic, 1)
        for (int task = 0; task < num_tiles * num_kv_heads; ++task) {
            // tiles in reverse: each sequence's last tiles (the most keys) go first
            const int which = num_tiles - 1 - task / num_kv_heads, head = task % num_kv_heads;
            const int s = tile_seq[which], t0 = tile_start[which];
            const int tokens = query_start[s + 1] - t0 < tile ? query_start[s + 1] - t0 : tile;
            const int pos0 = seq_lens[s] - (query_start[s + 1] - t0);
            const long offset = t0 * q_stride + (long)head * group * head_dim;
            NAME(prefill_tile_)(q + offset, k_cache + (long)head * head_dim,
                                v_cache + (long)head * head_dim,
                                block_tables + (long)s * max_blocks, tokens, pos0, group,
                                head_dim, block_size, token_stride, q_stride, scale, out + offset,
                                qt, ot, st, kv);
        }
        free(qt);
    }
    free(tile_seq);
}

#undef ROWS
#undef RV
#undef KB
#undef DB
#undef JB
#undef VF
#undef VU
#undef VI
#undef NAME
#undef CAT
#undef CAT_
