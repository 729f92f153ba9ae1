// Batched multi-LoRA delta for CPUs (Punica's BGMV/SGMV idea): one call per wrapped linear
// adds, for every adapter row t of the flat batch, (x[t] @ A[s].T) * scale[s] @ B[s].T
// into y[t]'s shard columns, s being the row's own adapter slot only (base rows are never
// listed). Rows arrive grouped by slot (`rows` sorted by slot, slot s owning
// rows[seg[s] .. seg[s + 1])), and each tile of up to MR rows of one slot shares every
// weight load, so an adapter's weights are read once per tile, not once per row.
//
// Layouts (models/lora.py stacks them; R = shards * rank, the rank padded to the slots'
// largest, zeros where an adapter lacks a shard):
//   a [in, slots * R]      slot s's columns [s * R, (s + 1) * R), shard-major then rank
//   b [slots * rank, cols] slot s's rows [s * rank, (s + 1) * rank); shard j's columns
//                          [b_col[j], b_col[j] + size[j]) land in y's [y_col[j], + size[j])
// bf16 weights are stored in k-pairs, [k / 2][n][2] (in rounded up to even with a zero
// row; rank is even), so one 32-bit lane carries two inputs' weights for one output:
// `vdpbf16ps` takes them as they are, and the other twins widen them with a shift and a
// mask. Both weights are read row by row along their contiguous last axis (vectors over
// outputs, one broadcast input each), so the inner loops never reduce across lanes. The
// weights carry a vector of slack at their end: a tile's last vector may read past a row
// (its extra lanes are dropped).
//
// Every kernel exists for AVX-512 with AVX512_BF16, AVX-512 (x86-64-v4) and AVX2
// (haswell), whatever the build machine; Python picks one at run time (kernels/lora.py).
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 4      // rows of one slot per tile
#define NV_MAX 4  // output vectors per register tile

// how a tile reads its input and weights (lora_bgmv_impl.h)
enum {
    LB_F32 = 0,    // fp32 input, fp32 weights [k][n]
    LB_PAIRS = 1,  // fp32 input, bf16 weights in k-pairs [k / 2][n][2]
    LB_DOT = 2,    // bf16 input and weights, both in k-pairs (vdpbf16ps)
};

#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4,avx512bf16")
#define VLANES 16
#define SUFFIX avx512bf16
#define DPBF16 1
#include "lora_bgmv_impl.h"
#undef DPBF16
#undef SUFFIX
#undef VLANES
#pragma GCC pop_options

#define DPBF16 0
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define VLANES 16
#define SUFFIX avx512
#include "lora_bgmv_impl.h"
#undef SUFFIX
#undef VLANES
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define VLANES 8
#define SUFFIX avx2
#include "lora_bgmv_impl.h"
#undef SUFFIX
#undef VLANES
#pragma GCC pop_options
#undef DPBF16
