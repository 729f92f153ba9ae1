// Weight-only int8 linear (fp32 math on int8 weights), included once per ISA by
// int8_gemm.c inside a `#pragma GCC target`. The includer defines VLANES (int32/fp32 lanes
// per vector: 16 for AVX-512, 8 for AVX2) and SUFFIX. Reads the W8A8 packed layout: each
// 32-bit lane holds 4 consecutive k of one channel, sign-extended out by shifts.
#define WO_CAT_(a, b) a##b
#define WO_CAT(a, b) WO_CAT_(a, b)
#define WO_NAME(base) WO_CAT(base, SUFFIX)

typedef int WO_NAME(vi_) __attribute__((vector_size(VLANES * 4)));
typedef float WO_NAME(vf_) __attribute__((vector_size(VLANES * 4)));

// acc[r][0..16) = sum_k x[r][k] * w[k] for one packed block of 16 channels, rows <= WO_MR
static inline __attribute__((always_inline)) void WO_NAME(wo_tile_)(
    const float *x, long ldx, const int8_t *w, int k4, int rows, float *acc) {
    for (int h = 0; h < LANES / VLANES; ++h) {
        WO_NAME(vf_) c[WO_MR];
        for (int r = 0; r < rows; ++r) c[r] = (WO_NAME(vf_)){0};
        for (int g = 0; g < k4; ++g) {
            WO_NAME(vi_) quad;
            memcpy(&quad, w + (long)g * 64 + h * VLANES * 4, VLANES * 4);
            for (int j = 0; j < 4; ++j) {
                const WO_NAME(vf_) wf =
                    __builtin_convertvector((quad << (24 - 8 * j)) >> 24, WO_NAME(vf_));
                for (int r = 0; r < rows; ++r) c[r] += wf * x[r * ldx + g * 4 + j];
            }
        }
        for (int r = 0; r < rows; ++r) memcpy(acc + r * LANES + h * VLANES, &c[r], VLANES * 4);
    }
}

static void WO_NAME(wo_tile_any_)(const float *x, long ldx, const int8_t *w, int k4, int rows,
                                  float *acc) {
    switch (rows) {
        case 1: WO_NAME(wo_tile_)(x, ldx, w, k4, 1, acc); break;
        case 2: WO_NAME(wo_tile_)(x, ldx, w, k4, 2, acc); break;
        case 3: WO_NAME(wo_tile_)(x, ldx, w, k4, 3, acc); break;
        case 4: WO_NAME(wo_tile_)(x, ldx, w, k4, 4, acc); break;
        case 5: WO_NAME(wo_tile_)(x, ldx, w, k4, 5, acc); break;
        case 6: WO_NAME(wo_tile_)(x, ldx, w, k4, 6, acc); break;
        case 7: WO_NAME(wo_tile_)(x, ldx, w, k4, 7, acc); break;
        default: WO_NAME(wo_tile_)(x, ldx, w, k4, 8, acc); break;
    }
}

#undef WO_NAME
#undef WO_CAT
#undef WO_CAT_
