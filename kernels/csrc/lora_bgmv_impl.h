// The batched LoRA kernel's body, included once per ISA by lora_bgmv.c inside a
// `#pragma GCC target`. The includer defines VLANES (fp32 lanes per vector: 16 for
// AVX-512, 8 for AVX2) and SUFFIX. Arithmetic is fp32 throughout; x, y and the weights
// are all fp32 or all bf16.
#define LB_CAT_(a, b) a##b
#define LB_CAT(a, b) LB_CAT_(a, b)
#define LB_NAME(base) LB_CAT(base, SUFFIX)
// output vectors per tile: MR x NV accumulators plus NV weights fit the register file
// (32 zmm, 16 ymm)
#define LB_NV (VLANES == 16 ? NV_MAX : NV_MAX / 2)

typedef float LB_NAME(vf_) __attribute__((vector_size(VLANES * 4)));
typedef uint32_t LB_NAME(vu_) __attribute__((vector_size(VLANES * 4)));
typedef uint16_t LB_NAME(vh_) __attribute__((vector_size(VLANES * 2)));

// bf16 <-> fp32 a vector at a time (bf16.h's scalar helpers are compiled for the build
// machine and would not inline here); rounding to nearest even as torch, NaN kept quiet
static inline __attribute__((always_inline)) LB_NAME(vf_) LB_NAME(widen_)(LB_NAME(vh_) h) {
    return (LB_NAME(vf_))(__builtin_convertvector(h, LB_NAME(vu_)) << 16);
}

static inline __attribute__((always_inline)) LB_NAME(vh_) LB_NAME(narrow_)(LB_NAME(vf_) f) {
    const LB_NAME(vu_) bits = (LB_NAME(vu_))f;
    const LB_NAME(vu_) nan = (LB_NAME(vu_))((bits & 0x7fffffffu) > 0x7f800000u);
    const LB_NAME(vu_) rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan),
                                   LB_NAME(vh_));
}

// VLANES weights from `w + at` (fp32, or bf16 widened: bf16 is fp32's top 16 bits)
static inline __attribute__((always_inline)) LB_NAME(vf_)
    LB_NAME(load_w_)(const void *w, long at, int bf16) {
    if (bf16) {
        LB_NAME(vh_) h;
        memcpy(&h, (const uint16_t *)w + at, VLANES * 2);
        return LB_NAME(widen_)(h);
    }
    LB_NAME(vf_) f;
    memcpy(&f, (const float *)w + at, VLANES * 4);
    return f;
}

// dst[0 .. n) += add[0 .. n), n <= VLANES, on fp32 or bf16 (one rounding per element); a
// whole vector moves with constant-size copies (single loads and stores), a tail by bytes
static inline __attribute__((always_inline)) void LB_NAME(add_to_)(void *dst, const float *add,
                                                                   int n, int bf16) {
    LB_NAME(vf_) a;
    memcpy(&a, add, VLANES * 4);
    if (bf16) {
        LB_NAME(vh_) h = {0};
        if (n == VLANES) memcpy(&h, dst, VLANES * 2);
        else memcpy(&h, dst, (size_t)n * 2);
        h = LB_NAME(narrow_)(LB_NAME(widen_)(h) + a);
        if (n == VLANES) memcpy(dst, &h, VLANES * 2);
        else memcpy(dst, &h, (size_t)n * 2);
    } else {
        LB_NAME(vf_) d = {0};
        if (n == VLANES) memcpy(&d, dst, VLANES * 4);
        else memcpy(&d, dst, (size_t)n * 4);
        d += a;
        if (n == VLANES) memcpy(dst, &d, VLANES * 4);
        else memcpy(dst, &d, (size_t)n * 4);
    }
}

// acc[r][0 .. nv * VLANES) = sum_i in[r * ldi + i] * w[i * ldw + n] for rows <= MR: one
// broadcast input and nv weight vectors per i; the constant arguments unroll into registers
static inline __attribute__((always_inline)) void LB_NAME(tile_)(const float *in, long ldi,
                                                                 const void *w, long ldw, int k,
                                                                 int rows, int nv, int bf16,
                                                                 float *acc) {
    LB_NAME(vf_) c[MR][NV_MAX];
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) c[r][v] = (LB_NAME(vf_)){0};
    for (int i = 0; i < k; ++i) {
        LB_NAME(vf_) wv[NV_MAX];
        for (int v = 0; v < nv; ++v) wv[v] = LB_NAME(load_w_)(w, i * ldw + v * VLANES, bf16);
        for (int r = 0; r < rows; ++r) {
            const LB_NAME(vf_) xb = (LB_NAME(vf_)){0} + in[r * ldi + i];
            for (int v = 0; v < nv; ++v) c[r][v] += xb * wv[v];
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int v = 0; v < nv; ++v) memcpy(acc + (r * NV_MAX + v) * VLANES, &c[r][v], VLANES * 4);
}

static void LB_NAME(tile_any_)(const float *in, long ldi, const void *w, long ldw, int k,
                               int rows, int nv, int bf16, float *acc) {
#define LB_CASE(R, V) \
    case (R) * 8 + (V): \
        if (bf16) \
            LB_NAME(tile_)(in, ldi, w, ldw, k, R, V, 1, acc); \
        else \
            LB_NAME(tile_)(in, ldi, w, ldw, k, R, V, 0, acc); \
        break;
    switch (rows * 8 + nv) {
        LB_CASE(1, 1) LB_CASE(1, 2) LB_CASE(2, 1) LB_CASE(2, 2)
        LB_CASE(3, 1) LB_CASE(3, 2) LB_CASE(4, 1) LB_CASE(4, 2)
#if LB_NV > 2
        LB_CASE(1, 3) LB_CASE(1, 4) LB_CASE(2, 3) LB_CASE(2, 4)
        LB_CASE(3, 3) LB_CASE(3, 4) LB_CASE(4, 3) LB_CASE(4, 4)
#endif
        default: break;
    }
#undef LB_CASE
}

// One tile: `rows` rows of slot `slot` (their indices in `idx`), x -> xa -> y += xa @ B.
static void LB_NAME(lora_tile_)(const void *x, void *y, int bf16, int in_features, int y_stride,
                                const int32_t *idx, int rows, int slot, int slots,
                                const void *a, const void *b, float scale, int rank, int shards,
                                const int32_t *y_col, const int32_t *b_col,
                                const int32_t *size, int cols, float *xf, float *xa) {
    const int R = shards * rank, chunk = LB_NV * VLANES;
    float acc[MR * NV_MAX * VLANES];
    for (int r = 0; r < rows; ++r) {
        float *dst = xf + (long)r * in_features;
        if (bf16) {
            const uint16_t *src = (const uint16_t *)x + (long)idx[r] * in_features;
            for (int i = 0; i < in_features; i += VLANES) {
                const int n = in_features - i < VLANES ? in_features - i : VLANES;
                LB_NAME(vh_) h = {0};
                if (n == VLANES) memcpy(&h, src + i, VLANES * 2);
                else memcpy(&h, src + i, (size_t)n * 2);
                const LB_NAME(vf_) f = LB_NAME(widen_)(h);
                if (n == VLANES) memcpy(dst + i, &f, VLANES * 4);
                else memcpy(dst + i, &f, (size_t)n * 4);
            }
        } else {
            memcpy(dst, (const float *)x + (long)idx[r] * in_features,
                   sizeof(float) * (size_t)in_features);
        }
    }
    // xa[r][0 .. R) = scale * x[r] @ A[slot].T
    const long lda = (long)slots * R;
    for (int n0 = 0; n0 < R; n0 += chunk) {
        const int n = R - n0 < chunk ? R - n0 : chunk;
        const long at = (long)slot * R + n0;
        const void *w = bf16 ? (const void *)((const uint16_t *)a + at)
                             : (const void *)((const float *)a + at);
        LB_NAME(tile_any_)(xf, in_features, w, lda, in_features, rows, (n + VLANES - 1) / VLANES,
                           bf16, acc);
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < n; ++c) xa[r * R + n0 + c] = scale * acc[r * NV_MAX * VLANES + c];
    }
    // y[r][y_col[j] ..] += xa[r][j * rank .. (j + 1) * rank) @ B_j[slot].T, per shard j
    for (int j = 0; j < shards; ++j) {
        for (int c0 = 0; c0 < size[j]; c0 += chunk) {
            const int n = size[j] - c0 < chunk ? size[j] - c0 : chunk;
            const long at = (long)slot * rank * cols + b_col[j] + c0;
            const void *w = bf16 ? (const void *)((const uint16_t *)b + at)
                                 : (const void *)((const float *)b + at);
            LB_NAME(tile_any_)(xa + j * rank, R, w, cols, rank, rows, (n + VLANES - 1) / VLANES,
                               bf16, acc);
            for (int r = 0; r < rows; ++r) {
                const long at_y = (long)idx[r] * y_stride + y_col[j] + c0;
                void *dst = bf16 ? (void *)((uint16_t *)y + at_y) : (void *)((float *)y + at_y);
                for (int c = 0; c < n; c += VLANES) {
                    const int m = n - c < VLANES ? n - c : VLANES;
                    void *d = bf16 ? (void *)((uint16_t *)dst + c) : (void *)((float *)dst + c);
                    LB_NAME(add_to_)(d, acc + r * NV_MAX * VLANES + c, m, bf16);
                }
            }
        }
    }
}

// y[rows[p]] += scale[s] * (x[rows[p]] @ A[s].T) @ B[s].T for p in [seg[s], seg[s + 1]):
// x [T, in_features], y [T, y_stride] (fp32 or bf16, bf16 != 0); layouts in lora_bgmv.c.
// Parallel over tiles of one slot's rows when there is enough work for two threads.
void LB_NAME(lora_bgmv_)(const void *x, void *y, int bf16, int in_features, int y_stride,
                         const int32_t *rows, const int32_t *seg, int slots, const void *a,
                         const void *b, const float *scale, int rank, int shards,
                         const int32_t *y_col, const int32_t *b_col, const int32_t *size,
                         int threads) {
    const int R = shards * rank;
    const int cols = b_col[shards - 1] + size[shards - 1];
    int tiles = 0;
    for (int s = 0; s < slots; ++s) tiles += (seg[s + 1] - seg[s] + MR - 1) / MR;
    if (tiles == 0) return;
    int tile_slot[tiles], tile_at[tiles];
    for (int s = 0, t = 0; s < slots; ++s)
        for (int p = seg[s]; p < seg[s + 1]; p += MR, ++t) tile_slot[t] = s, tile_at[t] = p;
    const long work = (long)(seg[slots] - seg[0]) * ((long)in_features * R + (long)rank * cols);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) \
    if (threads > 1 && tiles > 1 && work >= (1L << 18))
    for (int t = 0; t < tiles; ++t) {
        float xf[MR * in_features], xa[MR * R];
        const int s = tile_slot[t], end = seg[s + 1];
        const int n = end - tile_at[t] < MR ? end - tile_at[t] : MR;
        LB_NAME(lora_tile_)(x, y, bf16, in_features, y_stride, rows + tile_at[t], n, s, slots,
                            a, b, scale[s], rank, shards, y_col, b_col, size, cols, xf, xa);
    }
}

#undef LB_NV
#undef LB_NAME
#undef LB_CAT
#undef LB_CAT_
