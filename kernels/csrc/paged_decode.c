// Batched decode attention over a paged KV cache (fp32 or bf16 cache), for CPUs.
//
// Reads K/V in place through the block table (no gather copy) and is bound by memory, so
// it is written around the reads: each sequence streams its blocks once for K and once for
// V, touching every token's full [Hkv, D] row (contiguous) for all query heads at once,
// and prefetches the next block while working on the current one. Parallel over sequences.
//
// Every kernel exists twice, for AVX-512 (x86-64-v4) and for AVX2 (haswell), whatever the
// build machine: Python picks one at run time (kernels/cpu_attention.py), so a test can run
// the AVX2 twin on an AVX-512 machine.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"

static void prefetch_block(const void *block, long bytes) {
    for (long off = 0; off < bytes; off += 64) __builtin_prefetch((const char *)block + off, 0, 1);
}

#define F32_IDENTITY(x) (x)

#define ELEM float
#define WIDE 0
#define LOAD F32_IDENTITY
#define STORE F32_IDENTITY
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SUFFIX f32_avx512
#include "paged_decode_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define SUFFIX f32_avx2
#include "paged_decode_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#undef ELEM
#undef WIDE
#undef LOAD
#undef STORE

#define ELEM uint16_t
#define WIDE 1
#define LOAD bf16_load
#define STORE bf16_store
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SUFFIX bf16_avx512
#include "paged_decode_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define SUFFIX bf16_avx2
#include "paged_decode_impl.h"
#undef SUFFIX
#pragma GCC pop_options
