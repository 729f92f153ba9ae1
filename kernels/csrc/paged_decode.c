// Attention over a paged KV cache (fp32 or bf16 cache), for CPUs: batched decode
// (paged_decode_impl.h) and causal prefill chunks (paged_prefill_impl.h).
//
// Both read K/V in place through the block table (no gather copy). A decode task is one KV
// head of one sequence; for each query head of its group in turn: a pass over the keys
// (scores), a vectorized softmax, a pass over the values, with the head's accumulators in
// registers. A prefill task is a tile of a chunk's tokens against one KV head.
//
// Every kernel exists twice, for AVX-512 (x86-64-v4) and for AVX2 (haswell), whatever the
// build machine, and bf16 prefill a third time for AVX512_BF16: Python picks one at run time
// (kernels/cpu_attention.py), so a test can run the AVX2 twin on an AVX-512 machine.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define MAX_BODY 256  // the largest head size (kernels/cpu_attention.py: MAX_HEAD_DIM)

// bf16 prefill on CPUs with AVX512_BF16: the prefill kernel alone (decode reads each key
// once per query head, so it stays on the plain AVX-512 twin)
#define LANES 16
#define DPBF16 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define ELEM uint16_t
#define WIDE 1
#define SUFFIX bf16_avx512bf16
#include "paged_common_impl.h"
#include "paged_prefill_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#pragma GCC pop_options
#undef DPBF16
#undef LANES

#define DPBF16 0

#define LANES 16
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define ELEM float
#define WIDE 0
#define SUFFIX f32_avx512
#include "paged_common_impl.h"
#include "paged_decode_impl.h"
#include "paged_prefill_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#define ELEM uint16_t
#define WIDE 1
#define SUFFIX bf16_avx512
#include "paged_common_impl.h"
#include "paged_decode_impl.h"
#include "paged_prefill_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#pragma GCC pop_options
#undef LANES

#define LANES 8
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define ELEM float
#define WIDE 0
#define SUFFIX f32_avx2
#include "paged_common_impl.h"
#include "paged_decode_impl.h"
#include "paged_prefill_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#define ELEM uint16_t
#define WIDE 1
#define SUFFIX bf16_avx2
#include "paged_common_impl.h"
#include "paged_decode_impl.h"
#include "paged_prefill_impl.h"
#undef SUFFIX
#undef ELEM
#undef WIDE
#pragma GCC pop_options
#undef LANES
#undef DPBF16
