// Attention over a paged KV cache (fp32 or bf16 cache), for CPUs: batched decode
// (paged_decode_impl.h) and causal prefill chunks (paged_prefill_impl.h).
//
// Both read K/V in place through the block table (no gather copy). A decode task is one KV
// head of one sequence; the query heads of its group together: a pass over the keys
// (scores), a vectorized softmax, a pass over the values, with the heads' accumulators in
// registers. A prefill task is a tile of a chunk's tokens against one KV head.
//
// Every kernel exists twice, for AVX-512 (x86-64-v4) and for AVX2 (haswell), whatever the
// build machine, and bf16 a third time for AVX512_BF16: Python picks one at run time
// (kernels/cpu_attention.py), so a test can run the AVX2 twin on an AVX-512 machine.
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#include "bf16.h"

#define MAX_BODY 256  // the largest head size (kernels/cpu_attention.py: MAX_HEAD_DIM)
#define GMAX 4        // query heads per decode pass over a KV head's rows, at most

// Constant shuffle masks, one entry per lane: LANE_LIST(F, q) is F(0, q), ..., F(LANES - 1, q)
#define LANE_LIST8(F, q) F(0, q), F(1, q), F(2, q), F(3, q), F(4, q), F(5, q), F(6, q), F(7, q)
#define LANE_LIST16(F, q) \
    LANE_LIST8(F, q), F(8, q), F(9, q), F(10, q), F(11, q), F(12, q), F(13, q), F(14, q), F(15, q)
#define LANE_LIST_(n, F, q) LANE_LIST##n(F, q)
#define LANE_LIST__(n, F, q) LANE_LIST_(n, F, q)
#define LANE_LIST(F, q) LANE_LIST__(LANES, F, q)
// Folding two vectors x, y whose lanes hold runs of 2q partial sums (one key per run) into
// one whose runs are q long: lane p of run b takes x's run b folded if p is in its first
// half, y's run b folded otherwise (shuffle indices >= LANES pick from y)
#define FOLD_LO(p, q)                                                                      \
    ((p) % (2 * (q)) < (q) ? (p) / (2 * (q)) * 2 * (q) + (p) % (2 * (q))                  \
                           : LANES + (p) / (2 * (q)) * 2 * (q) + (p) % (2 * (q)) - (q))
#define FOLD_HI(p, q) (FOLD_LO(p, q) + (q))
#define FOLD(x, y, q)                                                  \
    (__builtin_shuffle((x), (y), (VI){LANE_LIST(FOLD_LO, (q))}) + \
     __builtin_shuffle((x), (y), (VI){LANE_LIST(FOLD_HI, (q))}))
#define BIT_REVERSED(p, unused)                                                  \
    (LANES == 16 ? ((p) & 1) << 3 | ((p) & 2) << 1 | ((p) & 4) >> 1 | ((p) & 8) >> 3 \
                 : ((p) & 1) << 2 | ((p) & 2) | ((p) & 4) >> 2)

// bf16 on CPUs with AVX512_BF16: products of bf16 pairs in hardware
#define LANES 16
#define DPBF16 1
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define ELEM uint16_t
#define WIDE 1
#define SUFFIX bf16_avx512bf16
#include "paged_common_impl.h"
#include "paged_decode_impl.h"
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
