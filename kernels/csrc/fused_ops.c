// The small per-layer ops of a decoder step, each fused into one pass over its rows:
// residual add + RMSNorm, RoPE on q and k with the KV cache write, and SiLU(gate) * up.
//
// Each is a handful of torch ops per layer otherwise (an allocation and a trip through
// memory apiece, plus the dispatch), which at small batches costs more than the math.
// Arithmetic is fp32; bf16 results round where Hugging Face's bf16 model rounds, so the
// fused path changes no more than the order of a sum.
//
// Like paged_decode.c, every kernel exists for AVX-512 (x86-64-v4) and for AVX2 (haswell)
// and Python picks the twin at run time (kernels/fused.py).
// NOTE: no fused multiply-add (-ffast-math allows it): torch rounds each product of
// x1 * cos - x2 * sin, and fp32 RoPE should match its bits
#pragma GCC optimize("fp-contract=off")
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "bf16.h"

#define CHUNK 256  // a row is worked on in pieces of this many fp32 values, on the stack

#define ELEM float
#define LOAD(x) (x)
#define STORE(x) (x)
#define ROUND(x) (x)
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SUFFIX f32_avx512
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define SUFFIX f32_avx2
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#undef ELEM
#undef LOAD
#undef STORE
#undef ROUND

#define ELEM uint16_t
#define LOAD(x) NAME(bf16_load)(x)
#define STORE(x) NAME(bf16_store)(x)
#define ROUND(x) NAME(bf16_load)(NAME(bf16_store)(x))  // the nearest bf16 value, as fp32
#pragma GCC push_options
#pragma GCC target("arch=x86-64-v4")
#define SUFFIX bf16_avx512
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
#pragma GCC push_options
#pragma GCC target("arch=haswell")
#define SUFFIX bf16_avx2
#include "fused_ops_impl.h"
#undef SUFFIX
#pragma GCC pop_options
