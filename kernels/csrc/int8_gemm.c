// W8A8 linear for CPUs: y = dequant(quant_per_token(x) @ W_int8^T) + bias.
//
// Weights are quantized per output channel at load and packed (kernels/int8.py) into
// blocks of 16 channels with K in groups of 4 bytes, the operand shape of AVX-512 VNNI's
// `vpdpbusd` (16 lanes, each a 4-byte dot product into int32):
//   packed[(nb * K4 + k4) * 64 + lane * 4 + j] = w[nb * 16 + lane][k4 * 4 + j]   (zero-padded)
// Activations are quantized per row (token) at call time, symmetric int8 in [-127, 127].
//
// Three kernels share that layout, chosen at run time by Python (models.quant_int8):
// - VNNI: `vpdpbusd` takes unsigned x signed bytes, so activations are stored as q + 128
//   and 128 * sum_k w[n][k] (wsum, computed at pack time) is subtracted afterwards;
// - AMX: `tdpbusd` on tiles, the same offset trick (see int8_linear_amx);
// - AVX2: `vpmaddubsw` + `vpmaddwd`. vpmaddubsw adds two u8 x s8 products into a
//   saturating int16, so the offset trick would overflow (2 * 255 * 127 > 32767); instead
//   |q| is the unsigned operand and the sign of q moves onto w (`vpsignb`), which bounds a
//   pair at 2 * 127 * 127 = 32258.
//
// The VNNI and AVX2 tiles also take activations quantized to 16 bits (int8_a16_linear_*,
// for the linears that keep float activations): a row's q = 255 * hi + lo, hi and lo both
// in [-127, 127], enters the tiles as two int8 rows, and the epilogue adds 255 times the hi
// row's sums to the lo row's. Twice the rows through the same weights, with no widening of
// the weights and ~15 bits of each activation (an error below max|x| / 65,000 a row).
#define _GNU_SOURCE  // syscall(), for the AMX permission
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include <sys/syscall.h>
#include <unistd.h>

#include "amx_tiles.h"
#include "bf16.h"

#define LANES 16   // output channels per packed block
#define MR 4       // activation rows per register tile (AVX2)
#define MR_VNNI 6  // the VNNI tile's: 24 sums of 32 registers
#define WO_MR 8    // the weight-only kernel's: each widened weight vector serves more rows
#define NB_MAX 4   // packed blocks per register tile (AVX-512); 64 channels
// The VNNI tile's first row tile over a group of blocks streams their weight from memory;
// it asks for each block's weight this far ahead, from this many (int8) rows on: all of a
// step's linears then took 0.90x of the time at 8 rows, 0.88x at 16, 0.96x at 64 on a
// Zen 5 (1 KiB ahead: 0.91x at 16; 4 KiB: 0.91x). At one row the hardware prefetcher keeps
// up alone: asking as well took 1.08x.
#define VNNI_PREFETCH_BYTES 2048
#define VNNI_PREFETCH_MIN_ROWS 2

// one row of x as fp32 (a view of fp32 input, or bf16 widened into scratch)
static const float *row_f32(const void *x, int x_bf16, long row, int k, float *scratch) {
    if (!x_bf16) return (const float *)x + row * k;
    const uint16_t *src = (const uint16_t *)x + row * k;
    for (int i = 0; i < k; ++i) scratch[i] = bf16_load(src[i]);
    return scratch;
}

// max |x| on the bits (non-negative floats order as their bits; NaNs are skipped): the float
// compare-and-select of NaN-aware code stays scalar, ~4 cycles an element
static inline float row_amax(const float *row, int k) {
    uint32_t amax_bits = 0;
#pragma omp simd reduction(max : amax_bits)
    for (int i = 0; i < k; ++i) {
        const uint32_t a = (f32_bits){.f = row[i]}.u & 0x7fffffffu;
        const uint32_t finite_or_inf = a > 0x7f800000u ? 0u : a;
        amax_bits = finite_or_inf > amax_bits ? finite_or_inf : amax_bits;
    }
    return (f32_bits){.u = amax_bits}.f;
}

#define A16_MAX 32512.0f  // 127 * 255 + 127: a 16-bit activation's hi and lo stay in [-127, 127]
#define A16_BASE 255.0f

// per-row symmetric int8: q = round(x / s), s = max|x| / 127; `offset` adds 128 (VNNI's u8).
// With `a16`, 16 bits a row as two int8 rows (see the top): row r's hi part into q row 2r and
// its lo part into 2r + 1, s = max|x| / A16_MAX.
static void quantize_rows(const void *x, int x_bf16, int m, int k, int kp, int offset, int a16,
                          int8_t *q, float *scales, int threads) {
    const float levels = a16 ? A16_MAX : 127.0f;
    const int8_t flip = offset ? (int8_t)0x80 : 0;  // + 128 as a byte
#pragma omp parallel for schedule(static) num_threads(threads) if (m >= 16 && threads > 1)
    for (int r = 0; r < m; ++r) {
        float scratch_buf[x_bf16 ? k : 1];
        const float *row = row_f32(x, x_bf16, r, k, scratch_buf);
        const float amax = row_amax(row, k);
        const float inv = amax > 0.0f ? levels / amax : 0.0f;
        scales[r] = amax / levels;
        int8_t *out = q + ((long)r << a16) * kp;
        if (!a16) {
            for (int i = 0; i < k; ++i) {
                const float v = nearbyintf(row[i] * inv);
                const int iv = (int)(v > 127.0f ? 127.0f : v < -127.0f ? -127.0f : v);
                out[i] = (int8_t)(iv ^ flip);
            }
            memset(out + k, flip, (size_t)(kp - k));  // pads meet zero weights
            continue;
        }
        int8_t *lo = out + kp;
#pragma omp simd
        for (int i = 0; i < k; ++i) {
            float v = nearbyintf(row[i] * inv);
            v = v > A16_MAX ? A16_MAX : v < -A16_MAX ? -A16_MAX : v;
            const float h = nearbyintf(v * (1.0f / A16_BASE));  // v / 255 is never a tie
            out[i] = (int8_t)((int8_t)(int)h ^ flip);
            lo[i] = (int8_t)((int8_t)(int)(v - A16_BASE * h) ^ flip);
        }
        memset(out + k, flip, (size_t)(kp - k));
        memset(lo + k, flip, (size_t)(kp - k));
    }
}

// v (+ bias) -> one output row (fp32 or bf16), columns n0 .. n0 + cols
static void store_row(float *v, int n0, int cols, const float *bias, void *out, long at,
                      int out_bf16) {
    if (bias)
        for (int c = 0; c < cols; ++c) v[c] += bias[n0 + c];
    if (out_bf16) {
        uint16_t *dst = (uint16_t *)out + at;
        for (int c = 0; c < cols; ++c) dst[c] = bf16_store(v[c]);
    } else {
        memcpy((float *)out + at, v, sizeof(float) * (size_t)cols);
    }
}

// rows r0 .. r0 + rows of out, columns n0 .. n0 + cols: acc (fp32 sums of x * int8 weights,
// rows `stride` apart) * w_scale + bias
static void store_scaled(const float *acc, int stride, int rows, int r0, int n0, int cols,
                         const float *w_scale, const float *bias, int n, void *out,
                         int out_bf16) {
    float v[NB_MAX * LANES];
    for (int r = 0; r < rows; ++r) {
#pragma omp simd
        for (int c = 0; c < cols; ++c) v[c] = acc[(long)r * stride + c] * w_scale[n0 + c];
        store_row(v, n0, cols, bias, out, (long)(r0 + r) * n + n0, out_bf16);
    }
}

// out[r][n] = acc[r][n] * a_scale[r] * w_scale[n] + bias[n], for the valid columns; one
// simple loop per case so that each vectorizes
static void epilogue(const int32_t *acc, int rows, int n0, int cols, const int32_t *wsum,
                     const float *a_scale, const float *w_scale, const float *bias, int n,
                     void *out, int out_bf16) {
    float v[NB_MAX * LANES];
    for (int r = 0; r < rows; ++r) {
        const int32_t *a = acc + r * NB_MAX * LANES;
        const float *ws = w_scale + n0, s = a_scale[r];
        if (wsum) {
#pragma omp simd
            for (int c = 0; c < cols; ++c) v[c] = (float)(a[c] - 128 * wsum[n0 + c]) * s * ws[c];
        } else {
#pragma omp simd
            for (int c = 0; c < cols; ++c) v[c] = (float)a[c] * s * ws[c];
        }
        store_row(v, n0, cols, bias, out, (long)r * n + n0, out_bf16);
    }
}

// epilogue() for 16-bit activations: acc holds `rows` pairs of rows (hi, lo) of sums, and
// out row r gets (255 * hi + lo) * a_scale[r] * w_scale[n] + bias[n]. In floats: 255 times a
// sum of K products of 127 * 127 can leave int32.
static void epilogue_a16(const int32_t *acc, int rows, int n0, int cols, const int32_t *wsum,
                         const float *a_scale, const float *w_scale, const float *bias, int n,
                         void *out, int out_bf16) {
    float v[NB_MAX * LANES];
    for (int r = 0; r < rows; ++r) {
        const int32_t *hi = acc + 2 * r * NB_MAX * LANES, *lo = hi + NB_MAX * LANES;
        const float *ws = w_scale + n0, s = a_scale[r];
        if (wsum) {
#pragma omp simd
            for (int c = 0; c < cols; ++c) {
                const int32_t off = 128 * wsum[n0 + c];
                v[c] = ((float)(hi[c] - off) * A16_BASE + (float)(lo[c] - off)) * s * ws[c];
            }
        } else {
#pragma omp simd
            for (int c = 0; c < cols; ++c)
                v[c] = ((float)hi[c] * A16_BASE + (float)lo[c]) * s * ws[c];
        }
        store_row(v, n0, cols, bias, out, (long)r * n + n0, out_bf16);
    }
}

// GCC's vector builtins rather than <immintrin.h>: with -march=native the header's
// intrinsics carry the build machine's ISA and refuse to inline into the AVX2 twin
typedef char v32qi __attribute__((vector_size(32)));
typedef short v16hi __attribute__((vector_size(32)));
typedef int v8si __attribute__((vector_size(32)));
typedef int v16si __attribute__((vector_size(64)));
typedef float v16sf __attribute__((vector_size(64)));
typedef unsigned v16su __attribute__((vector_size(64)));
typedef unsigned short v16hu __attribute__((vector_size(32)));

// 4 bytes of activations, as one int32 lane value (a macro: an outside function would not
// inline into the target-specific tiles)
#define LOAD_QUAD(dst, p) memcpy(&(dst), (p), 4)

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512vnni")
// rows x nb blocks of int32 dot products; the constant arguments unroll into registers
// (w: the nb packed blocks' starts)
static inline __attribute__((always_inline)) void tile_vnni(const int8_t *a, long lda,
                                                             const int8_t *const *w, int k4,
                                                             int rows, int nb, int fetch,
                                                             int32_t *acc) {
    v16si c[MR_VNNI][NB_MAX];
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < nb; ++b) c[r][b] = (v16si){0};
    for (int g = 0; g < k4; ++g) {
        v16si wv[NB_MAX];
        for (int b = 0; b < nb; ++b) memcpy(&wv[b], w[b] + (long)g * 64, 64);
        if (fetch)  // the first row tile streams the weight in: ask for it ahead
            for (int b = 0; b < nb; ++b)
                __builtin_prefetch(w[b] + (long)g * 64 + VNNI_PREFETCH_BYTES);
        for (int r = 0; r < rows; ++r) {
            int32_t quad;
            LOAD_QUAD(quad, a + r * lda + g * 4);
            const v16si av = (v16si){0} + quad;
            for (int b = 0; b < nb; ++b) c[r][b] = __builtin_ia32_vpdpbusd_v16si(c[r][b], av, wv[b]);
        }
    }
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < nb; ++b) memcpy(acc + r * NB_MAX * LANES + b * LANES, &c[r][b], 64);
}

static void tile_vnni_any(const int8_t *a, long lda, const int8_t *const *w, int k4, int rows,
                          int nb, int fetch, int32_t *acc) {
#define TILE_CASE(R, B) \
    case (R) * 8 + (B): \
        tile_vnni(a, lda, w, k4, R, B, fetch, acc); \
        break;
    switch (rows * 8 + nb) {
        TILE_CASE(1, 1) TILE_CASE(1, 2) TILE_CASE(1, 3) TILE_CASE(1, 4)
        TILE_CASE(2, 1) TILE_CASE(2, 2) TILE_CASE(2, 3) TILE_CASE(2, 4)
        TILE_CASE(3, 1) TILE_CASE(3, 2) TILE_CASE(3, 3) TILE_CASE(3, 4)
        TILE_CASE(4, 1) TILE_CASE(4, 2) TILE_CASE(4, 3) TILE_CASE(4, 4)
        TILE_CASE(5, 1) TILE_CASE(5, 2) TILE_CASE(5, 3) TILE_CASE(5, 4)
        TILE_CASE(6, 1) TILE_CASE(6, 2) TILE_CASE(6, 3) TILE_CASE(6, 4)
        default: break;
    }
#undef TILE_CASE
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=haswell")
// one packed block (16 channels, two ymm halves) for `rows` rows; sign trick as above
static inline __attribute__((always_inline)) void tile_avx2(const int8_t *a, long lda,
                                                             const int8_t *w, int k4, int rows,
                                                             int32_t *acc) {
    v8si c[MR][2];
    for (int r = 0; r < rows; ++r) c[r][0] = c[r][1] = (v8si){0};
    const v16hi ones = (v16hi){0} + 1;
    for (int g = 0; g < k4; ++g) {
        v32qi w0, w1;
        memcpy(&w0, w + (long)g * 64, 32);
        memcpy(&w1, w + (long)g * 64 + 32, 32);
        for (int r = 0; r < rows; ++r) {
            int32_t quad;
            LOAD_QUAD(quad, a + r * lda + g * 4);
            const v32qi av = (v32qi)((v8si){0} + quad);
            const v32qi ax = __builtin_ia32_psignb256(av, av);  // |q|
            const v16hi p0 = __builtin_ia32_pmaddubsw256(ax, __builtin_ia32_psignb256(w0, av));
            const v16hi p1 = __builtin_ia32_pmaddubsw256(ax, __builtin_ia32_psignb256(w1, av));
            c[r][0] += __builtin_ia32_pmaddwd256(p0, ones);
            c[r][1] += __builtin_ia32_pmaddwd256(p1, ones);
        }
    }
    for (int r = 0; r < rows; ++r) {
        memcpy(acc + r * NB_MAX * LANES, &c[r][0], 32);
        memcpy(acc + r * NB_MAX * LANES + 8, &c[r][1], 32);
    }
}

static void tile_avx2_any(const int8_t *a, long lda, const int8_t *const *w, int k4, int rows,
                          int nb, int fetch, int32_t *acc) {
    (void)fetch;
    for (int b = 0; b < nb; ++b) {
        const int8_t *wb = w[b];
        int32_t *ab = acc + b * LANES;
        switch (rows) {
            case 1: tile_avx2(a, lda, wb, k4, 1, ab); break;
            case 2: tile_avx2(a, lda, wb, k4, 2, ab); break;
            case 3: tile_avx2(a, lda, wb, k4, 3, ab); break;
            default: tile_avx2(a, lda, wb, k4, 4, ab); break;
        }
    }
}
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define VLANES 16
#define SUFFIX avx512
#include "int8_wo_impl.h"
#undef SUFFIX
#undef VLANES
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define VLANES 8
#define SUFFIX avx2
#include "int8_wo_impl.h"
#undef SUFFIX
#undef VLANES
#pragma GCC pop_options

typedef void (*tile_fn)(const int8_t *, long, const int8_t *const *, int, int, int, int,
                        int32_t *);
#define MR_MAX (MR > MR_VNNI ? MR : MR_VNNI)

static void epilogue_silu_blocks(const int32_t *acc, int rows, int gate0, int up0,
                                 const int32_t *wsum, const float *a_scale,
                                 const float *w_scale, long out_stride, uint16_t *out);

// Parallel over groups of NB_MAX blocks (the weights, the bigger operand at decode); each
// group's weights stay in cache while every row tile (`mr` rows: the tile's, even) passes
// over them. `a16`: 16-bit activations, two int8 rows a token (see the top). `silu`: the
// weight is a gate_up of 2 n channels (gate's first, n a multiple of 16, no bias) and out
// [m, n] bf16 = SiLU(gate) * up; a group is then gate's blocks i, i + 1 and up's, in turn.
static void int8_linear(tile_fn tile, int mr, int offset, int a16, int silu, const void *x,
                        int x_bf16, int m, int k, const int8_t *packed, const int32_t *wsum,
                        const float *w_scale, const float *bias, int n, void *out, int out_bf16,
                        int threads) {
    const int k4 = (k + 3) / 4, kp = k4 * 4;
    const int blocks = (n + LANES - 1) / LANES;
    const int per_group = silu ? NB_MAX / 2 : NB_MAX;  // output blocks a group
    const int groups = (blocks + per_group - 1) / per_group;
    const int q_rows = m << a16;
    int8_t *q = aligned_alloc(64, ((size_t)q_rows * kp + 63) / 64 * 64);
    float *a_scale = malloc(sizeof(float) * (size_t)m);
    quantize_rows(x, x_bf16, m, k, kp, offset, a16, q, a_scale, threads);
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int g = 0; g < groups; ++g) {
        int32_t acc[MR_MAX * NB_MAX * LANES];
        const int b0 = g * per_group;
        const int outs = blocks - b0 < per_group ? blocks - b0 : per_group;  // output blocks
        const int nb = silu ? 2 * outs : outs;
        const int8_t *w[NB_MAX];
        for (int b = 0; b < nb; ++b) {
            const int block = silu ? (b & 1) * blocks + b0 + b / 2 : b0 + b;
            w[b] = packed + (long)block * k4 * 64;
        }
        const int n0 = b0 * LANES;
        const int cols = n - n0 < outs * LANES ? n - n0 : outs * LANES;
        for (int r0 = 0; r0 < q_rows; r0 += mr) {
            const int rows = q_rows - r0 < mr ? q_rows - r0 : mr;
            tile(q + (long)r0 * kp, kp, w, k4, rows, nb,
                 r0 == 0 && q_rows >= VNNI_PREFETCH_MIN_ROWS, acc);
            const long first = r0 >> a16;  // the tile's first output row
            if (silu) {
                for (int o = 0; o < outs; ++o)
                    epilogue_silu_blocks(acc + 2 * o * LANES, rows, n0 + o * LANES,
                                         n + n0 + o * LANES, wsum, a_scale + first, w_scale, n,
                                         (uint16_t *)out + first * n + n0 + o * LANES);
                continue;
            }
            void *dst = out_bf16 ? (void *)((uint16_t *)out + first * n)
                                 : (void *)((float *)out + first * n);
            (a16 ? epilogue_a16 : epilogue)(acc, rows >> a16, n0, cols, wsum, a_scale + first,
                                            w_scale, bias, n, dst, out_bf16);
        }
    }
    free(q);
    free(a_scale);
}

// The entry points, all with the signature kernels/int8.py declares: x [m, k] fp32 or bf16 ->
// out [m, n] fp32 or bf16. wsum serves the VNNI twins only (their u8 offset). The a16 ones
// take 16-bit activations (see the top). The silu one: SiLU(gate) * up [m, n] bf16 from a
// gate_up's W8A8 weights (2 n channels, gate's first, n a multiple of 16, no bias), the bits of
// int8_linear_vnni followed by silu_mul, on CPUs with AVX512_BF16 (the SiLU's; Python checks).
#define INT8_ENTRY(NAME, TILE, TILE_ROWS, OFFSET, A16, SILU)                                   \
    void NAME(const void *x, int x_bf16, int m, int k, const int8_t *packed,                  \
              const int32_t *wsum, const float *w_scale, const float *bias, int n, void *out, \
              int out_bf16, int threads) {                                                    \
        int8_linear(TILE, TILE_ROWS, OFFSET, A16, SILU, x, x_bf16, m, k, packed,              \
                    OFFSET ? wsum : NULL, w_scale, SILU ? NULL : bias, n, out,                \
                    SILU ? 1 : out_bf16, threads);                                            \
    }
INT8_ENTRY(int8_linear_vnni, tile_vnni_any, MR_VNNI, 1, 0, 0)
INT8_ENTRY(int8_a16_linear_vnni, tile_vnni_any, MR_VNNI, 1, 1, 0)
INT8_ENTRY(int8_silu_mul_vnni, tile_vnni_any, MR_VNNI, 1, 0, 1)
INT8_ENTRY(int8_linear_avx2, tile_avx2_any, MR, 0, 0, 0)
INT8_ENTRY(int8_a16_linear_avx2, tile_avx2_any, MR, 0, 1, 0)
#undef INT8_ENTRY

// ---- W8A8 on AMX tiles (`tdpbusd`: a 16 x 64 u8 tile times a 64 x 16 s8 one, 16 K MACs a
// time). The packed layout above is already the B tile's: 16 rows of K4 groups, 64 bytes
// each (16 channels x 4 bytes). Activations are stored as q + 128 (u8), as for VNNI. Only
// CPUs with AMX-INT8 may call it (Python checks), after amx_ready().

// 0 when Linux lets this process use AMX tile data, else -1 (kernels/native.py asks once)
int amx_ready(void) {
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */)
               ? -1
               : 0;
}

// fused_ops_avx512bf16.c's SiLU(gate) * up over rows, on one thread
void silu_mul_rows_bf16_avx512bf16(const uint16_t *gate, const uint16_t *up, long stride,
                                   uint16_t *out, long out_stride, int rows, int n);

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
// `epilogue` for the AMX kernel's bf16 outputs, a whole block of 16 channels per vector: at
// prefill sizes the scalar-per-row epilogue took a quarter of the kernel's time. The same
// arithmetic in the same order ((sum - 128 wsum) * a_scale * w_scale + bias, then bf16_store's
// rounding to nearest even, NaNs kept quiet).
// `out` holds row 0's channel n0, its rows `out_stride` apart.
static void epilogue_bf16_blocks(const int32_t *acc, int rows, int n0, int nb,
                                 const int32_t *wsum, const float *a_scale,
                                 const float *w_scale, const float *bias, long out_stride,
                                 uint16_t *out) {
    v16si corr[2];
    v16sf ws[2], bs[2];
    for (int b = 0; b < nb; ++b) {
        memcpy(&corr[b], wsum + n0 + b * LANES, 64);
        corr[b] *= 128;
        memcpy(&ws[b], w_scale + n0 + b * LANES, 64);
        if (bias) memcpy(&bs[b], bias + n0 + b * LANES, 64);
    }
    for (int r = 0; r < rows; ++r)
        for (int b = 0; b < nb; ++b) {
            v16si a;
            memcpy(&a, acc + r * NB_MAX * LANES + b * LANES, 64);
            v16sf v = __builtin_convertvector(a - corr[b], v16sf) * a_scale[r] * ws[b];
            if (bias) v += bs[b];
            const v16su bits = (v16su)v, magnitude = bits & 0x7fffffffu;
            const v16su rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
            const v16su quiet = (bits >> 16) | 0x40u;
            const v16su nan = (v16su)(magnitude > 0x7f800000u);  // all ones where NaN
            const v16su h = (quiet & nan) | (rounded & ~nan);
            const v16hu half = __builtin_convertvector(h, v16hu);
            memcpy(out + r * out_stride + b * LANES, &half, 32);
        }
}

// SiLU(gate) * up of 16 channels from a tile's sums (gate's block, then up's), with the
// roundings of the unfused path: each projection to bf16 as epilogue_bf16_blocks rounds it,
// then fused_ops_avx512bf16.c's silu_mul. `out` holds row 0's output column, its rows
// `out_stride` apart. Only for a gate_up without bias (Python checks).
static void epilogue_silu_blocks(const int32_t *acc, int rows, int gate0, int up0,
                                 const int32_t *wsum, const float *a_scale,
                                 const float *w_scale, long out_stride, uint16_t *out) {
    uint16_t gate_up[32 * 2 * LANES] __attribute__((aligned(64)));  // a row: gate, then up
    epilogue_bf16_blocks(acc, rows, gate0, 1, wsum, a_scale, w_scale, NULL, 2 * LANES, gate_up);
    epilogue_bf16_blocks(acc + LANES, rows, up0, 1, wsum, a_scale, w_scale, NULL, 2 * LANES,
                         gate_up + LANES);
    silu_mul_rows_bf16_avx512bf16(gate_up, gate_up + LANES, 2 * LANES, out, out_stride, rows,
                                  LANES);
}
#pragma GCC pop_options

// A 32-row tile's int32 sums (rows NB_MAX * LANES apart) whose epilogue is still to run,
// `done` of its `rows` so far
typedef struct {
    const int32_t *acc;
    int rows, r0, n0, nb, cols, done;
} pending_sums;

// What every epilogue of one w8a8_amx call shares; with `silu` the outputs are SiLU(gate) *
// up, n of them a row, gate's channels 0 .. n and up's n .. 2 n
typedef struct {
    const int32_t *wsum;
    const float *a_scale, *w_scale, *bias;
    int n, out_bf16, silu;
    void *out;
} epilogue_args;

// The epilogue of a pending tile's rows up to `upto`
static void finish_sums(pending_sums *t, int upto, const epilogue_args *e) {
    if (upto > t->rows) upto = t->rows;
    if (t->done >= upto) return;
    const int row = t->r0 + t->done, rows = upto - t->done;
    const int32_t *sums = t->acc + t->done * NB_MAX * LANES;
    uint16_t *out_bf16 = (uint16_t *)e->out + (long)row * e->n + t->n0;
    if (e->silu)
        epilogue_silu_blocks(sums, rows, t->n0, e->n + t->n0, e->wsum, e->a_scale + row,
                             e->w_scale, e->n, out_bf16);
    else if (e->out_bf16 && t->cols == t->nb * LANES)
        epilogue_bf16_blocks(sums, rows, t->n0, t->nb, e->wsum, e->a_scale + row, e->w_scale,
                             e->bias, e->n, out_bf16);
    else
        epilogue(sums, rows, t->n0, t->cols, e->wsum, e->a_scale + row, e->w_scale, e->bias,
                 e->n,
                 e->out_bf16 ? (void *)((uint16_t *)e->out + (long)row * e->n)
                             : (void *)((float *)e->out + (long)row * e->n),
                 e->out_bf16);
    t->done = upto;
}

// x [m, k] fp32 or bf16 -> out [m, n], k a multiple of 64; wsum as for VNNI. Rows run in
// tiles of 32 (the last padded with zero rows), channels in pairs of packed blocks. As in
// bf16_gemm.c, a tile's epilogue runs a few rows per k step of the next tile's loop, while
// the tiles multiply. With `silu` the weight is a gate_up of 2 n channels (n a multiple of
// 16), each pair is gate's block i and up's block i, and out [m, n] bf16 = SiLU(gate) * up.
static void w8a8_amx(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                     const int32_t *wsum, const float *w_scale, const float *bias, int n,
                     void *out, int out_bf16, int threads, int silu) {
    const int mp = (m + 31) / 32 * 32, blocks = (n + LANES - 1) / LANES;
    const int pairs = silu ? blocks : (blocks + 1) / 2;
    const int steps = k / 64, rows_per_step = (32 + steps - 1) / steps;
    const long block_bytes = (long)k * LANES;
    int8_t *q = aligned_alloc(64, (size_t)mp * (size_t)k);
    float *a_scale = malloc(sizeof(float) * (size_t)mp);
    quantize_rows(x, x_bf16, m, k, k, 1, 0, q, a_scale, threads);
    memset(q + (size_t)m * (size_t)k, 0x80, (size_t)(mp - m) * (size_t)k);  // rows of zeros
    const epilogue_args e = {wsum, a_scale, w_scale, bias, n, out_bf16, silu, out};
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        amx_configure();
        int32_t acc[2][32 * NB_MAX * LANES] __attribute__((aligned(64)));
        pending_sums last = {.rows = 0};
        int slot = 0;
#pragma omp for schedule(static) nowait
        for (int pair = 0; pair < pairs; ++pair) {
            const int b0 = silu ? pair : 2 * pair, nb = silu || blocks - b0 >= 2 ? 2 : 1;
            const int8_t *w0 = packed + b0 * block_bytes;
            const int8_t *w1 = silu ? w0 + blocks * block_bytes : nb == 2 ? w0 + block_bytes : w0;
            const int n0 = b0 * LANES, cols = n - n0 < nb * LANES ? n - n0 : nb * LANES;
            for (int r0 = 0; r0 < m; r0 += 32) {
                const int8_t *a0 = q + (long)r0 * k, *a1 = a0 + 16L * k;
                const int two = m - r0 > 16;  // the second row tile holds rows
                amx_zero_c();
                for (int kk = 0, step = 1; kk < k; kk += 64, ++step) {
                    if (r0 == 0) {
                        prefetch_ahead(w0 + (long)kk * LANES, 1024);
                        prefetch_ahead(w1 + (long)kk * LANES, 1024);
                    }
                    AMX_GEMM_STEP(TILE_DPBUSD, a0 + kk, a1 + kk, k, w0 + (long)kk * LANES,
                                  w1 + (long)kk * LANES, two);
                    finish_sums(&last, step * rows_per_step, &e);
                }
                amx_store_c(acc[slot], NB_MAX * LANES * 4);  // the epilogue's row stride
                last = (pending_sums){acc[slot], m - r0 < 32 ? m - r0 : 32, r0, n0, nb, cols, 0};
                slot ^= 1;
            }
        }
        finish_sums(&last, 32, &e);
        __asm__ volatile("tilerelease" ::);
    }
    free(q);
    free(a_scale);
}

void int8_linear_amx(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                     const int32_t *wsum, const float *w_scale, const float *bias, int n,
                     void *out, int out_bf16, int threads) {
    w8a8_amx(x, x_bf16, m, k, packed, wsum, w_scale, bias, n, out, out_bf16, threads, 0);
}

// x [m, k] -> out [m, inter] bf16 = SiLU(x @ gate^T) * (x @ up^T) for an MLP's gate_up of 2 x
// inter channels (gate's first, inter a multiple of 16, no bias), the bits of int8_linear_amx
// then silu_mul_bf16_avx512bf16 without the 2 x inter values between them. int8_linear_amx's
// signature (`bias` unused, `n` = inter, bf16 out), for the layer stack's int8 calls.
void int8_silu_mul_amx(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                       const int32_t *wsum, const float *w_scale, const float *bias, int inter,
                       void *out, int out_bf16, int threads) {
    (void)bias, (void)out_bf16;
    w8a8_amx(x, x_bf16, m, k, packed, wsum, w_scale, NULL, inter, out, 1, threads, 1);
}

// ---- Weight-only on AMX-BF16 tiles (`tdpbf16ps`: a 16 x 32 bf16 tile times a 32 x 16 one
// into fp32 sums), for bf16 activations. An int8 weight is an integer of at most 8 bits, so
// it is exactly a bf16, and so is each product: only the fp32 sums round, as in the
// weight-only twins. Each pair of packed blocks is widened once into B tiles that every row
// tile then reads, so the widening costs the same at 1 row as at 1,000; the float
// activations stay as they are (no per-token rounding to int8).
#define AMX_BF16_K 32  // k per tile


#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
// One packed block (16 channels, k4 groups of 4) as B tiles: per 32 of k a 16 x 64-byte tile
// whose row i holds, per channel, the bf16 pair k = 2i (low half), 2i + 1. The k4 group g
// fills rows 2g and 2g + 1 of its tile, which sit at g * 32 words: the tiles are contiguous.
static void widen_block_bf16(const int8_t *w, int k4, uint32_t *tiles) {
    for (int g = 0; g < k4; ++g) {
        v16si quad, f[4];
        memcpy(&quad, w + (long)g * 64, 64);
        for (int j = 0; j < 4; ++j)  // byte j of each lane, sign-extended, as fp32 bits
            f[j] = (v16si)__builtin_convertvector((quad << (24 - 8 * j)) >> 24, v16sf);
        // an fp32 of <= 8 significant bits: its top half is exactly its bf16
        const v16si even0 = (v16si)((v16su)f[0] >> 16), even2 = (v16si)((v16su)f[2] >> 16);
        const v16si pair01 = (f[1] & (int)0xffff0000) | even0;
        const v16si pair23 = (f[3] & (int)0xffff0000) | even2;
        memcpy(tiles + (long)g * 32, &pair01, 64);
        memcpy(tiles + (long)g * 32 + 16, &pair23, 64);
    }
}
#pragma GCC pop_options

void int8_wo_linear_avx512(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                           const int32_t *wsum, const float *w_scale, const float *bias, int n,
                           void *out, int out_bf16, int threads);

// x [m, k] bf16 -> out [m, n]; fp32 activations, or k not a multiple of 32, take the AVX-512
// weight-only twin. Only CPUs with AMX-BF16 may call it (Python checks), after
// amx_ready(). Rows run in tiles of 32 (the last padded with zero rows), channels in
// pairs of packed blocks, parallel over the pairs.
void int8_wo_linear_amx(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                        const int32_t *wsum, const float *w_scale, const float *bias, int n,
                        void *out, int out_bf16, int threads) {
    if (!x_bf16 || k % AMX_BF16_K != 0) {
        int8_wo_linear_avx512(x, x_bf16, m, k, packed, wsum, w_scale, bias, n, out, out_bf16,
                              threads);
        return;
    }
    const int mp = (m + 31) / 32 * 32, blocks = (n + LANES - 1) / LANES, k4 = k / 4;
    const long block_bytes = (long)k * LANES, row_bytes = 2L * k;
    uint16_t *xs = aligned_alloc(64, (size_t)mp * (size_t)row_bytes);
    memcpy(xs, x, (size_t)m * (size_t)row_bytes);
    memset(xs + (long)m * k, 0, (size_t)(mp - m) * (size_t)row_bytes);  // rows of zeros
    // One pass of the rows per pair (m <= 32): each 32 of k is widened right before its
    // tiles load, into two slots of 2 KB that stay in L1 (0.72-0.80x of the time at 1-32 rows).
    // Else a pair's whole k is widened first, once for every pass of the rows.
    const int stream = m <= 32;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        amx_configure();
        uint32_t *tiles = aligned_alloc(64, stream ? 4096 : 2 * (size_t)block_bytes * 2);
        float acc[32 * NB_MAX * LANES] __attribute__((aligned(64)));
#pragma omp for schedule(static)
        for (int pair = 0; pair < (blocks + 1) / 2; ++pair) {
            const int b0 = 2 * pair, nb = blocks - b0 < 2 ? 1 : 2;
            const int8_t *w0 = packed + b0 * block_bytes, *w1 = w0 + block_bytes;
            uint32_t *t0 = tiles, *t1 = nb == 2 ? tiles + block_bytes / 2 : tiles;
            if (!stream) {
                widen_block_bf16(w0, k4, t0);
                if (nb == 2) widen_block_bf16(w1, k4, t1);
            }
            const int n0 = b0 * LANES, cols = n - n0 < nb * LANES ? n - n0 : nb * LANES;
            for (int r0 = 0; r0 < m; r0 += 32) {
                const uint16_t *a0 = xs + (long)r0 * k, *a1 = a0 + 16L * k;
                const int two = m - r0 > 16;  // the second row tile holds rows
                amx_zero_c();
                for (int kk = 0; kk < k; kk += AMX_BF16_K) {
                    // tile kk / 32 of each block: 256 words
                    const uint32_t *bt0 = t0 + (long)kk * 8, *bt1 = t1 + (long)kk * 8;
                    if (stream) {
                        const int8_t *q0 = w0 + (long)kk * LANES, *q1 = w1 + (long)kk * LANES;
                        uint32_t *slot = tiles + (kk / AMX_BF16_K % 2) * 512;
                        prefetch_ahead(q0, AMX_BF16_K * LANES);
                        widen_block_bf16(q0, AMX_BF16_K / 4, slot);
                        if (nb == 2) {
                            prefetch_ahead(q1, AMX_BF16_K * LANES);
                            widen_block_bf16(q1, AMX_BF16_K / 4, slot + 256);
                        }
                        bt0 = slot;
                        bt1 = nb == 2 ? slot + 256 : slot;
                    }
                    AMX_GEMM_STEP(TILE_DPBF16PS, a0 + kk, a1 + kk, row_bytes, bt0, bt1, two);
                }
                const int stride = NB_MAX * LANES;  // acc's row stride, in floats
                amx_store_c(acc, stride * 4);
                const int rows = m - r0 < 32 ? m - r0 : 32;
                store_scaled(acc, stride, rows, r0, n0, cols, w_scale, bias, n, out, out_bf16);
            }
        }
        free(tiles);
        __asm__ volatile("tilerelease" ::);
    }
    free(xs);
}

// ---- Weight-only on AVX512_BF16's pair dot products (`vdpbf16ps`), for bf16 activations
// on CPUs without AMX: the same numbers as int8_wo_linear_amx (exact bf16 products of the
// widened weight, fp32 sums). The widened B-tile layout is what `vdpbf16ps` takes as it is
// (bf16_gemm.c's twin reads it so), so each pair of blocks is widened once per chunk of
// rows into a buffer that stays in L2, and every pass of up to DP_MR rows reads it.
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#include "dp_tile.h"

// x [m, k] bf16 -> out [m, n]; fp32 activations, or k not a multiple of 4, take the AVX-512
// weight-only twin. Only CPUs with AVX512_BF16 may call it (Python checks).
void int8_wo_linear_avx512bf16(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                               const int32_t *wsum, const float *w_scale, const float *bias,
                               int n, void *out, int out_bf16, int threads) {
    if (!x_bf16 || k % 4 != 0) {
        int8_wo_linear_avx512(x, x_bf16, m, k, packed, wsum, w_scale, bias, n, out, out_bf16,
                              threads);
        return;
    }
    const int blocks = (n + LANES - 1) / LANES, k4 = k / 4;
    const long block_bytes = (long)k * LANES;
    const int chunk = dp_chunk_rows(k);
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        uint32_t *widened = aligned_alloc(64, 2 * (size_t)block_bytes * 2);
        float acc[DP_MR * 2 * LANES] __attribute__((aligned(64)));
        for (int c0 = 0; c0 < m; c0 += chunk) {
            const int c1 = m - c0 < chunk ? m : c0 + chunk;
#pragma omp for schedule(static) nowait
            for (int pair = 0; pair < (blocks + 1) / 2; ++pair) {
                const int b0 = 2 * pair, nb = blocks - b0 < 2 ? 1 : 2;
                const int8_t *w0 = packed + b0 * block_bytes;
                uint32_t *t1 = nb == 2 ? widened + block_bytes / 2 : widened;
                widen_block_bf16(w0, k4, widened);
                if (nb == 2) widen_block_bf16(w0 + block_bytes, k4, t1);
                const int n0 = b0 * LANES, cols = n - n0 < nb * LANES ? n - n0 : nb * LANES;
                for (int r0 = c0; r0 < c1;) {
                    const int rows = dp_pass_rows(c1 - r0);
                    dp_tile_any((const uint16_t *)x + (long)r0 * k, k,
                                (const uint16_t *)widened, (const uint16_t *)t1, rows, acc);
                    store_scaled(acc, 2 * LANES, rows, r0, n0, cols, w_scale, bias, n, out,
                                 out_bf16);
                    r0 += rows;
                }
            }
        }
        free(widened);
    }
}
#pragma GCC pop_options

typedef void (*wo_tile_fn)(const float *, long, const int8_t *, int, int, float *);

// Weight-only: x is widened to fp32 rows padded to whole groups of 4 (the pads meet zero
// weights; they must be finite), then one packed block at a time, parallel over blocks.
static void int8_wo_linear(wo_tile_fn tile, const void *x, int x_bf16, int m, int k,
                           const int8_t *packed, const float *w_scale, const float *bias, int n,
                           void *out, int out_bf16, int threads) {
    const int k4 = (k + 3) / 4, kp = k4 * 4;
    const int blocks = (n + LANES - 1) / LANES;
    float *xf = malloc(sizeof(float) * (size_t)m * (size_t)kp);
    for (int r = 0; r < m; ++r) {
        float *dst = xf + (long)r * kp;
        if (x_bf16)
            for (int i = 0; i < k; ++i) dst[i] = bf16_load(((const uint16_t *)x)[(long)r * k + i]);
        else
            memcpy(dst, (const float *)x + (long)r * k, sizeof(float) * (size_t)k);
        for (int i = k; i < kp; ++i) dst[i] = 0.0f;
    }
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int b = 0; b < blocks; ++b) {
        float acc[WO_MR * LANES];
        const int n0 = b * LANES, cols = n - n0 < LANES ? n - n0 : LANES;
        for (int r0 = 0; r0 < m; r0 += WO_MR) {
            const int rows = m - r0 < WO_MR ? m - r0 : WO_MR;
            tile(xf + (long)r0 * kp, kp, packed + (long)b * k4 * 64, k4, rows, acc);
            store_scaled(acc, LANES, rows, r0, n0, cols, w_scale, bias, n, out, out_bf16);
        }
    }
    free(xf);
}

// x [m, k] fp32 or bf16 -> out [m, n] in x's dtype, fp32 arithmetic on the int8 weights
void int8_wo_linear_avx512(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                           const int32_t *wsum, const float *w_scale, const float *bias, int n,
                           void *out, int out_bf16, int threads) {
    (void)wsum;
    int8_wo_linear(wo_tile_any_avx512, x, x_bf16, m, k, packed, w_scale, bias, n, out,
                   out_bf16, threads);
}

void int8_wo_linear_avx2(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                         const int32_t *wsum, const float *w_scale, const float *bias, int n,
                         void *out, int out_bf16, int threads) {
    (void)wsum;
    int8_wo_linear(wo_tile_any_avx2, x, x_bf16, m, k, packed, w_scale, bias, n, out, out_bf16,
                   threads);
}

// The float weight back from its packed form: out [n, k] (row-major, fp32 or bf16) =
// packed int8 * w_scale per channel; for large batches, where a float GEMM over it wins.
void int8_dequantize(const int8_t *packed, const float *w_scale, int n, int k, void *out,
                     int out_bf16, int threads) {
    const int k4 = (k + 3) / 4;
    const int blocks = (n + LANES - 1) / LANES;
#pragma omp parallel for schedule(static) num_threads(threads) if (threads > 1)
    for (int b = 0; b < blocks; ++b) {
        const int32_t *quads = (const int32_t *)(packed + (long)b * k4 * 64);
        int32_t row_quads[k4];  // one channel's k bytes, unpacked (then loops that vectorize)
        const int8_t *row_bytes = (const int8_t *)row_quads;
        for (int lane = 0; lane < LANES && b * LANES + lane < n; ++lane) {
            const int row = b * LANES + lane;
            const float s = w_scale[row];
            for (int g = 0; g < k4; ++g) row_quads[g] = quads[g * LANES + lane];
            if (out_bf16) {
                uint16_t *dst = (uint16_t *)out + (long)row * k;
                for (int i = 0; i < k; ++i) dst[i] = bf16_store((float)row_bytes[i] * s);
            } else {
                float *dst = (float *)out + (long)row * k;
                for (int i = 0; i < k; ++i) dst[i] = (float)row_bytes[i] * s;
            }
        }
    }
}
