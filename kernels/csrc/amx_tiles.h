// AMX tile instructions for the C kernels, written as the instructions themselves (inline
// asm), so no target option is needed; only CPUs with AMX may run them, after the process
// has Linux's permission to use tile data (amx_ready, kernels/native.py).
#pragma once

#define TILE_LOADD(t, base, stride)                                                        \
    __asm__ volatile("tileloadd (%0,%1,1), %%tmm" #t ::"r"((const void *)(base)),           \
                     "r"((long)(stride))                                                   \
                     : "memory")
#define TILE_STORED(t, base, stride)                                                       \
    __asm__ volatile("tilestored %%tmm" #t ", (%0,%1,1)" ::"r"((void *)(base)),             \
                     "r"((long)(stride))                                                   \
                     : "memory")
#define TILE_ZERO(t) __asm__ volatile("tilezero %%tmm" #t ::)
#define TILE_DPBUSD(c, a, b) __asm__ volatile("tdpbusd %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)
#define TILE_DPBF16PS(c, a, b) __asm__ volatile("tdpbf16ps %%tmm" #b ", %%tmm" #a ", %%tmm" #c ::)

// Eight 16-row tiles of 64 bytes, palette 1's most; each kernel gives them their roles (the
// GEMMs: C in tmm0-3, 2 row tiles x 2 channel blocks, A in tmm4-5, B in tmm6-7)
static inline void amx_configure(void) {
    unsigned char config[64] = {1};  // palette 1
    for (int t = 0; t < 8; ++t) {
        config[16 + 2 * t] = 64;  // bytes per row
        config[48 + t] = 16;      // rows
    }
    __asm__ volatile("ldtilecfg %0" ::"m"(*(const unsigned char(*)[64])config));
}

// The GEMM kernels' step over k: C, a 32-row x 2-block tile in tmm0-3, gains A (its row
// tiles in tmm4, tmm5; lda bytes a row) times B (its blocks in tmm6, tmm7: 64-byte rows);
// the second row tile only when it holds rows. DP: TILE_DPBUSD or TILE_DPBF16PS.
#define AMX_GEMM_STEP(DP, a0, a1, lda, b0, b1, two) \
    do {                                            \
        TILE_LOADD(4, a0, lda);                     \
        TILE_LOADD(6, b0, 64);                      \
        TILE_LOADD(7, b1, 64);                      \
        DP(0, 4, 6);                                \
        DP(1, 4, 7);                                \
        if (two) {                                  \
            TILE_LOADD(5, a1, lda);                 \
            DP(2, 5, 6);                            \
            DP(3, 5, 7);                            \
        }                                           \
    } while (0)

// tmm0-3, where the kernels keep their sums (C), to zero
static inline void amx_zero_c(void) {
    TILE_ZERO(0);
    TILE_ZERO(1);
    TILE_ZERO(2);
    TILE_ZERO(3);
}

// The C tiles of AMX_GEMM_STEP into acc (4-byte sums), rows `row_bytes` apart: the first
// block's 16 columns, then the second's; the second row tile 16 rows down
static inline void amx_store_c(void *acc, long row_bytes) {
    char *at = acc;
    TILE_STORED(0, at, row_bytes);
    TILE_STORED(1, at + 64, row_bytes);
    TILE_STORED(2, at + 16 * row_bytes, row_bytes);
    TILE_STORED(3, at + 16 * row_bytes + 64, row_bytes);
}

// A B tile (1 KB) comes from memory at decode sizes, where the tiles' math is quick: the
// hardware prefetcher does not run far enough ahead of tileloadd, so the kernels ask for
// the weight AMX_PREFETCH_BYTES (four tiles) ahead of what they load (past a block's end:
// the next block's, read next).
#define AMX_PREFETCH_BYTES 4096
static inline void prefetch_ahead(const void *at, int bytes) {
    const char *ahead = (const char *)at + AMX_PREFETCH_BYTES;
    for (int line = 0; line < bytes; line += 64) __builtin_prefetch(ahead + line, 0, 3);
}
