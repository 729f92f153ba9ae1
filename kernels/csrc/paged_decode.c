// Batched decode attention over a paged KV cache (fp32 or bf16 cache), for CPUs.
//
// Reads K/V in place through the block table (no gather copy). One task is one query head
// of one sequence: a pass over its KV head's keys (scores), a vectorized softmax, a pass
// over the values, with the head's accumulators in registers throughout.
//
// Every kernel exists twice, for AVX-512 (x86-64-v4) and for AVX2 (haswell), whatever the
// build machine: Python picks one at run time (kernels/cpu_attention.py), so a test can run
// the AVX2 twin on an AVX-512 machine.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

// GCC vector types, one register each: 16 floats (AVX-512) or 8 (AVX2), and as many
// pairs of bf16 in 32-bit lanes; unaligned, as cache rows are
typedef float vf16 __attribute__((vector_size(64), aligned(4)));
typedef uint32_t vu16 __attribute__((vector_size(64), aligned(2)));
typedef float vf8 __attribute__((vector_size(32), aligned(4)));
typedef uint32_t vu8 __attribute__((vector_size(32), aligned(2)));

#define MAX_BODY 256  // the largest head size (kernels/cpu_attention.py: MAX_HEAD_DIM)

#define VF vf16
#define VU vu16
#define LANES 16
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define ELEM float
#define WIDE 0
#define SUFFIX f32_avx512
#include "paged_decode_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#define ELEM uint16_t
#define WIDE 1
#define SUFFIX bf16_avx512
#include "paged_decode_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#pragma GCC pop_options
#undef VF
#undef VU
#undef LANES

#define VF vf8
#define VU vu8
#define LANES 8
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define ELEM float
#define WIDE 0
#define SUFFIX f32_avx2
#include "paged_decode_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#define ELEM uint16_t
#define WIDE 1
#define SUFFIX bf16_avx2
#include "paged_decode_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#pragma GCC pop_options
#undef VF
#undef VU
#undef LANES
