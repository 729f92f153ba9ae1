// The batched LoRA kernel's body, included once per ISA by lora_bgmv.c inside a
// `#pragma GCC target`. The includer defines VLANES (fp32 lanes per vector: 16 for
// AVX-512, 8 for AVX2), SUFFIX and DPBF16 (1 where `vdpbf16ps` multiplies bf16 pairs in
// hardware). x, y and the weights are all fp32 or all bf16; sums are fp32.
#define LB_CAT_(a, b) a##b
#define LB_CAT(a, b) LB_CAT_(a, b)
#define LB_NAME(base) LB_CAT(base, SUFFIX)
// output vectors per tile: MR x NV accumulators plus NV weights fit the register file
// (32 zmm, 16 ymm)
#define LB_NV (VLANES == 16 ? NV_MAX : NV_MAX / 2)

typedef float LB_NAME(vf_) __attribute__((vector_size(VLANES * 4)));
typedef uint32_t LB_NAME(vu_) __attribute__((vector_size(VLANES * 4)));
typedef uint16_t LB_NAME(vh_) __attribute__((vector_size(VLANES * 2)));
// bf16 pairs as gcc's vdpbf16ps builtin takes them
typedef short LB_NAME(vs_) __attribute__((vector_size(VLANES * 4)));

// bf16 <-> fp32 a vector at a time (bf16.h's scalar helpers are compiled for the build
// machine and would not inline here); rounding to nearest even as torch, NaN kept quiet
static inline __attribute__((always_inline)) LB_NAME(vf_) LB_NAME(widen_)(LB_NAME(vh_) h) {
    return (LB_NAME(vf_))(__builtin_convertvector(h, LB_NAME(vu_)) << 16);
}

static inline __attribute__((always_inline)) LB_NAME(vh_) LB_NAME(narrow_)(LB_NAME(vf_) f) {
#if DPBF16
    // the same rounding in one instruction (it reads no MXCSR: subnormals become zero)
    return (LB_NAME(vh_))__builtin_ia32_cvtneps2bf16_v16sf(f);
#endif
    const LB_NAME(vu_) bits = (LB_NAME(vu_))f;
    const LB_NAME(vu_) nan = (LB_NAME(vu_))((bits & 0x7fffffffu) > 0x7f800000u);
    const LB_NAME(vu_) rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return __builtin_convertvector((rounded & ~nan) | (((bits >> 16) | 0x40u) & nan),
                                   LB_NAME(vh_));
}

// dst[0 .. n) += a[0 .. n), n <= VLANES, on fp32 or bf16 (one rounding per element); a
// whole vector moves with constant-size copies (single loads and stores), a tail by bytes
static inline __attribute__((always_inline)) void LB_NAME(add_to_)(void *dst, LB_NAME(vf_) a,
                                                                   int n, int bf16) {
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

// s[r][0 .. nv * VLANES) = sum over k of in[r][k] * w[k][n] for rows <= MR, the layouts
// as `mode` says (ldi and ldw in the input's and the weights' own units: floats, or
// 32-bit pairs; k counts those units too). One broadcast input and nv weight vectors per
// step; the constant arguments unroll into registers. With `dst`, s[r][0 .. n) is added
// into dst[r] (fp32 or bf16 as `mode` says) straight from the registers, and `chunks`
// such column chunks follow each other (weights and dst moving on by nv vectors); else it
// is stored to acc[r * NV_MAX * VLANES ..] (one chunk).
static inline __attribute__((always_inline)) void LB_NAME(tile_)(const void *in, long ldi,
                                                                 const void *w0, long ldw, int k,
                                                                 int rows, int nv, int mode,
                                                                 float *acc, void *const *dst,
                                                                 int n, int chunks) {
    for (int ch = 0; ch < chunks; ++ch) {
        // chunk ch: the next nv vectors of outputs (weights and dst move on together)
        const long off = (long)ch * nv * VLANES;
        const void *w = mode == LB_F32 ? (const void *)((const float *)w0 + off)
                                       : (const void *)((const uint32_t *)w0 + off);
        LB_NAME(vf_) c[MR][NV_MAX];
        for (int r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) c[r][v] = (LB_NAME(vf_)){0};
        for (int i = 0; i < k; ++i) {
            if (mode == LB_F32) {
                const float *x = in, *wf = (const float *)w + i * ldw;
                LB_NAME(vf_) wv[NV_MAX];
                for (int v = 0; v < nv; ++v) memcpy(&wv[v], wf + v * VLANES, VLANES * 4);
                for (int r = 0; r < rows; ++r) {
                    const LB_NAME(vf_) xb = (LB_NAME(vf_)){0} + x[r * ldi + i];
                    for (int v = 0; v < nv; ++v) c[r][v] += xb * wv[v];
                }
                continue;
            }
            // a pair lane holds w[2i][n] in its low half and w[2i + 1][n] in its high half
            const uint32_t *wp = (const uint32_t *)w + i * ldw;
            LB_NAME(vu_) wv[NV_MAX];
            for (int v = 0; v < nv; ++v) memcpy(&wv[v], wp + v * VLANES, VLANES * 4);
#if DPBF16
            if (mode == LB_DOT) {
                const uint32_t *x = in;
                for (int r = 0; r < rows; ++r) {
                    const LB_NAME(vu_) xb = (LB_NAME(vu_)){0} + x[r * ldi + i];
                    for (int v = 0; v < nv; ++v)
                        c[r][v] = __builtin_ia32_dpbf16ps_v16sf(c[r][v], (LB_NAME(vs_))xb,
                                                               (LB_NAME(vs_))wv[v]);
                }
                continue;
            }
#endif
            const float *x = in;
            LB_NAME(vf_) lo[NV_MAX], hi[NV_MAX];
            for (int v = 0; v < nv; ++v) {
                lo[v] = (LB_NAME(vf_))(wv[v] << 16);
                hi[v] = (LB_NAME(vf_))(wv[v] & 0xffff0000u);
            }
            for (int r = 0; r < rows; ++r) {
                const LB_NAME(vf_) x0 = (LB_NAME(vf_)){0} + x[r * ldi + 2 * i];
                const LB_NAME(vf_) x1 = (LB_NAME(vf_)){0} + x[r * ldi + 2 * i + 1];
                for (int v = 0; v < nv; ++v) c[r][v] += x0 * lo[v] + x1 * hi[v];
            }
        }
        if (!dst) {
            for (int r = 0; r < rows; ++r)
                for (int v = 0; v < nv; ++v)
                    memcpy(acc + (r * NV_MAX + v) * VLANES, &c[r][v], VLANES * 4);
            return;
        }
        for (int r = 0; r < rows; ++r)
            for (int v = 0; v < nv; ++v) {
                const int m = n - v * VLANES < VLANES ? n - v * VLANES : VLANES;
                if (m <= 0) break;  // nv covers n, so never: it tells the compiler m > 0
                if (mode == LB_F32)
                    LB_NAME(add_to_)((float *)dst[r] + off + v * VLANES, c[r][v], m, 0);
                else LB_NAME(add_to_)((uint16_t *)dst[r] + off + v * VLANES, c[r][v], m, 1);
            }
    }
}

static void LB_NAME(tile_any_)(const void *in, long ldi, const void *w, long ldw, int k,
                               int rows, int nv, int mode, float *acc, void *const *dst, int n,
                               int chunks) {
#define LB_MODE(R, V, M) \
    if (mode == (M)) { \
        if (dst) LB_NAME(tile_)(in, ldi, w, ldw, k, R, V, M, NULL, dst, n, chunks); \
        else LB_NAME(tile_)(in, ldi, w, ldw, k, R, V, M, acc, NULL, 0, 1); \
        break; \
    }
#if DPBF16
#define LB_DOT_CASE(R, V) LB_MODE(R, V, LB_DOT)
#else
#define LB_DOT_CASE(R, V)
#endif
#define LB_CASE(R, V) \
    case (R) * 8 + (V): \
        LB_MODE(R, V, LB_F32) LB_MODE(R, V, LB_PAIRS) LB_DOT_CASE(R, V) break;
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
#undef LB_DOT_CASE
#undef LB_MODE
}

// One tile: `rows` rows of slot `slot` (their indices in `idx`), x -> xa -> y += xa @ B.
// in_pad is in_features rounded up to even; bf16 weights are in k-pairs (lora_bgmv.c).
static void LB_NAME(lora_tile_)(const void *x, void *y, int bf16, int in_features, int in_pad,
                                int y_stride, const int32_t *idx, int rows, int slot, int slots,
                                const void *a, const void *b, float scale, int rank, int shards,
                                const int32_t *y_col, const int32_t *b_col,
                                const int32_t *size, int cols, float *xf, uint16_t *xh,
                                float *xa) {
    const int R = shards * rank, chunk = LB_NV * VLANES;
    const int dot = DPBF16 && bf16;
    const int mode = dot ? LB_DOT : bf16 ? LB_PAIRS : LB_F32;
    float acc[MR * NV_MAX * VLANES];
    // this tile's x rows, zero-padded to in_pad: fp32, or bf16 as they are for the dot
    for (int r = 0; r < rows; ++r) {
        if (dot) {
            uint16_t *dst = xh + (long)r * in_pad;
            memcpy(dst, (const uint16_t *)x + (long)idx[r] * in_features, 2 * (size_t)in_features);
            if (in_pad > in_features) dst[in_features] = 0;
            continue;
        }
        float *dst = xf + (long)r * in_pad;
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
        if (in_pad > in_features) dst[in_features] = 0.0f;
    }
    // xa[r][0 .. R) = scale * x[r] @ A[slot].T
    const long lda = (long)slots * R;
    const int a_steps = bf16 ? in_pad / 2 : in_features;
    const void *a_in = dot ? (const void *)xh : (const void *)xf;
    const long a_ldi = dot ? in_pad / 2 : in_pad;
    for (int n0 = 0; n0 < R; n0 += chunk) {
        const int n = R - n0 < chunk ? R - n0 : chunk;
        const long at = (long)slot * R + n0;
        const void *w = bf16 ? (const void *)((const uint32_t *)a + at)
                             : (const void *)((const float *)a + at);
        LB_NAME(tile_any_)(a_in, a_ldi, w, lda, a_steps, rows, (n + VLANES - 1) / VLANES, mode,
                           acc, NULL, 0, 1);
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < n; ++c) xa[r * R + n0 + c] = scale * acc[r * NV_MAX * VLANES + c];
    }
    // the dot takes xa as bf16 (rounded as a bf16 x @ A would be); R is even
    if (dot)
        for (int r = 0; r < rows; ++r)
            for (int c = 0; c < R; c += VLANES) {
                LB_NAME(vf_) f = {0};
                const int m = R - c < VLANES ? R - c : VLANES;
                memcpy(&f, xa + r * R + c, (size_t)m * 4);
                const LB_NAME(vh_) h = LB_NAME(narrow_)(f);
                memcpy(xh + r * R + c, &h, (size_t)m * 2);
            }
    // y[r][y_col[j] ..] += xa[r][j * rank .. (j + 1) * rank) @ B_j[slot].T, per shard j
    const int b_steps = bf16 ? rank / 2 : rank;
    for (int j = 0; j < shards; ++j) {
        const void *b_in = dot ? (const void *)((const uint32_t *)xh + j * rank / 2)
                               : (const void *)(xa + j * rank);
        const long b_ldi = dot ? R / 2 : R;
        // the whole chunks in one call, then the part one: at rank 16 a chunk is only 8
        // k-steps, and a call per chunk cost as much again in set-up
        for (int c0 = 0, chunks, n; c0 < size[j]; c0 += chunks * n) {
            const int left = size[j] - c0;
            chunks = left >= chunk ? left / chunk : 1;
            n = left >= chunk ? chunk : left;
            const long at = (long)slot * b_steps * cols + b_col[j] + c0;
            const void *w = bf16 ? (const void *)((const uint32_t *)b + at)
                                 : (const void *)((const float *)b + at);
            void *dst[MR];
            for (int r = 0; r < rows; ++r) {
                const long at_y = (long)idx[r] * y_stride + y_col[j] + c0;
                dst[r] = bf16 ? (void *)((uint16_t *)y + at_y) : (void *)((float *)y + at_y);
            }
            LB_NAME(tile_any_)(b_in, b_ldi, w, cols, b_steps, rows, (n + VLANES - 1) / VLANES,
                               mode, NULL, dst, n, chunks);
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
    const int R = shards * rank, in_pad = in_features + (in_features & 1);
    const int cols = b_col[shards - 1] + size[shards - 1];
    int tiles = 0;
    for (int s = 0; s < slots; ++s) tiles += (seg[s + 1] - seg[s] + MR - 1) / MR;
    if (tiles == 0) return;
    int tile_slot[tiles], tile_at[tiles];
    for (int s = 0, t = 0; s < slots; ++s)
        for (int p = seg[s]; p < seg[s + 1]; p += MR, ++t) tile_slot[t] = s, tile_at[t] = p;
    const long work = (long)(seg[slots] - seg[0]) * ((long)in_features * R + (long)rank * cols);
    const int xh_len = MR * (in_pad > R ? in_pad : R);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads) \
    if (threads > 1 && tiles > 1 && work >= (1L << 18))
    for (int t = 0; t < tiles; ++t) {
        float xf[MR * in_pad], xa[MR * R];
        uint16_t xh[xh_len];
        const int s = tile_slot[t], end = seg[s + 1];
        const int n = end - tile_at[t] < MR ? end - tile_at[t] : MR;
        LB_NAME(lora_tile_)(x, y, bf16, in_features, in_pad, y_stride, rows + tile_at[t], n, s,
                            slots, a, b, scale[s], rank, shards, y_col, b_col, size, cols, xf,
                            xh, xa);
    }
}

#undef LB_NV
#undef LB_NAME
#undef LB_CAT
#undef LB_CAT_
