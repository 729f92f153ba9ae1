// A bf16 step's decoder layers in one call, for CPUs with AVX512_BF16 whose linears are on
// duet's bf16 kernels (AMX-BF16 tiles, or their `vdpbf16ps` twin) or int8 kernels.
//
// It strings together the very kernels the Python forward (models/llama.py) calls for such a
// model, in the same order, on the same kinds of buffers: RMSNorm (+ residual), the qkv
// linear, RoPE with the KV write, attention (the decode kernel for one-token sequences, a
// prefill kernel for chunks), o_proj, RMSNorm (+ residual), gate_up and SiLU x up (one kernel
// on bf16 tiles), down_proj, and the final norm. So its output has the same bits. Each linear
// is either on bf16 tiles or one of the int8 kernels (the one the linear's route picks for
// this many rows, models/quant_int8.py).
// What it saves is the Python around them: ~8 calls per layer, each some 15-20 us of
// interpreter, ctypes and tensor allocation, about a third of a batch-1 decode step.
// models/layer_stack.py decides when it runs and falls back to the Python forward otherwise.
#include <stdint.h>
#include <stdlib.h>

// the kernels it calls, defined in the library's other files
void rms_norm_bf16_avx512bf16(const uint16_t *x, uint16_t *residual, const uint16_t *weight,
                              uint16_t *out, int rows, int hidden, float eps, int num_threads);
void rope_kv_bf16_avx512(const uint16_t *qkv, const int64_t *positions,
                         const uint16_t *cos_table, const uint16_t *sin_table,
                         const int64_t *slots, void *q_out, void *k_cache, void *v_cache,
                         int cache_bf16, int tokens, int num_heads, int num_kv_heads,
                         int head_dim, int num_threads);
void paged_decode_bf16_avx512bf16(const uint16_t *q, const uint16_t *k_cache,
                                  const uint16_t *v_cache, const int32_t *block_tables,
                                  const int32_t *seq_lens, uint16_t *out, int batch,
                                  int num_heads, int num_kv_heads, int head_dim,
                                  int block_size, int max_blocks, float scale,
                                  int num_threads);
// paged_prefill_bf16_{amx,avx512bf16} (paged_prefill_amx.c, paged_decode.c): one signature
typedef void (*PrefillKernel)(const uint16_t *q, const uint16_t *k_cache, const uint16_t *v_cache,
                              const int32_t *block_tables, const int32_t *seq_lens,
                              const int32_t *query_start, uint16_t *out, int first_seq,
                              int num_seqs, int num_heads, int num_kv_heads, int head_dim,
                              int block_size, int max_blocks, float scale, int num_threads);
void bf16_linear_amx(const uint16_t *x, int m, int k, const uint16_t *packed,
                     const float *bias, int n, uint16_t *out, int threads);
void bf16_silu_mul_amx(const uint16_t *x, int m, int k, const uint16_t *packed, int inter,
                       uint16_t *out, int threads);
void bf16_linear_avx512bf16(const uint16_t *x, int m, int k, const uint16_t *packed,
                            const float *bias, int n, uint16_t *out, int threads);
void bf16_silu_mul_avx512bf16(const uint16_t *x, int m, int k, const uint16_t *packed,
                              int inter, uint16_t *out, int threads);
void silu_mul_bf16_avx512bf16(const uint16_t *gate_up, uint16_t *out, int rows, int inter,
                              int num_threads);

// int8_gemm.c's kernels, all of one signature (kernels/int8.py: native_linear)
typedef void (*Int8Kernel)(const void *x, int x_bf16, int m, int k, const int8_t *packed,
                           const int32_t *wsum, const float *w_scale, const float *bias, int n,
                           void *out, int out_bf16, int threads);

// One linear (models/layer_stack.py: StackLinear): packed for bf16 tiles (kernels/bf16_gemm.py)
// when `int8` is NULL, else int8 blocks (kernels/int8.py) for that kernel
typedef struct {
    const void *weight;
    const float *bias;  // or NULL
    Int8Kernel int8;
    const int32_t *wsum;
    const float *scale;
} StackLinear;

// One layer (models/layer_stack.py: StackLayer): norms as bf16 [hidden], and with
// `silu_in_gate_up` a gate_up whose call gives SiLU(gate) * up: packed with gate and up blocks
// paired for bf16_silu_mul_amx, or int8 for int8_silu_mul_amx
typedef struct {
    const uint16_t *input_norm, *post_norm;
    StackLinear qkv, o_proj, gate_up, down_proj;
    int silu_in_gate_up;
} StackLayer;

// The model's shapes (models/layer_stack.py: StackShape), and which twin of the bf16 kernels
// its tiles take: `amx` 1 for AMX-BF16, 0 for `vdpbf16ps`
typedef struct {
    int layers, hidden, num_heads, num_kv_heads, head_dim, intermediate, block_size;
    float eps, scale;
    int amx;
} StackShape;

// The fused ops run on one thread below this many elements: 16x fewer than in the Python
// forward (kernels/fused.py: _PARALLEL_MIN), since here the parallel regions follow each other
// with the team still spinning, so a fork/join costs about a microsecond. From batch 8 on, the
// norms, RoPE and int8's SiLU x up then split over the threads: 0.97x of an int8 step's time at
// batch 16 and 64 (docs/benchmarks.md), while the other thread used to wait.
static int small_op_threads(long numel, int threads) { return numel >= (1 << 12) ? threads : 1; }

// x [m, k] bf16 -> out [m, n] bf16 through `w`
static void linear(const StackLinear *w, int amx, const uint16_t *x, int m, int k, int n,
                   uint16_t *out, int threads) {
    if (w->int8)
        w->int8(x, 1, m, k, w->weight, w->wsum, w->scale, w->bias, n, out, 1, threads);
    else if (amx)
        bf16_linear_amx(x, m, k, w->weight, w->bias, n, out, threads);
    else
        bf16_linear_avx512bf16(x, m, k, w->weight, w->bias, n, out, threads);
}

static uint16_t *scratch(long elements) {
    return aligned_alloc(64, (size_t)((elements * 2 + 63) / 64 * 64));
}

// x: the embeddings of the step's T tokens [T, hidden], used as the residual stream (so
// overwritten); kv_cache: [layers, 2, blocks, block_size, Hkv, D] bf16 with `blocks` blocks;
// cos, sin: [positions, D / 2] bf16; positions, slots: [T] int64; the sequences' block_tables
// [S, max_blocks], seq_lens [S] and query_start [S + 1] int32, the first `num_decodes` of
// them one new token each, the rest chunks for `prefill` (NULL when there are none);
// final_norm: [hidden]. out: [T, hidden], the final norm's output. Returns 0, or -1 when out
// of memory (nothing written then).
int layer_stack_bf16(const StackLayer *layers, const StackShape *shape, const uint16_t *final_norm,
                     uint16_t *x, uint16_t *kv_cache, long blocks, const uint16_t *cos,
                     const uint16_t *sin, const int64_t *positions, const int64_t *slots,
                     const int32_t *block_tables, const int32_t *seq_lens,
                     const int32_t *query_start, int tokens, int num_decodes, int num_seqs,
                     int max_blocks, PrefillKernel prefill, uint16_t *out, int threads) {
    const int hidden = shape->hidden, heads = shape->num_heads, kv_heads = shape->num_kv_heads;
    const int dim = shape->head_dim, q_size = heads * dim, qkv_size = q_size + 2 * kv_heads * dim;
    const long cache_part = blocks * shape->block_size * kv_heads * dim;  // K or V of a layer
    uint16_t *h = scratch((long)tokens * hidden), *qkv = scratch((long)tokens * qkv_size);
    uint16_t *q = scratch((long)tokens * q_size), *attn = scratch((long)tokens * q_size);
    const int inter = shape->intermediate, amx = shape->amx;
    int unfused = 0;  // a layer whose gate_up leaves SiLU x up to silu_mul needs its output
    for (int l = 0; l < shape->layers; ++l) unfused |= !layers[l].silu_in_gate_up;
    uint16_t *act = scratch((long)tokens * inter);
    uint16_t *gate_up = unfused ? scratch(2L * tokens * inter) : NULL;
    uint16_t *mlp = scratch((long)tokens * hidden);
    int status = -1;
    if (!h || !qkv || !q || !attn || !act || (unfused && !gate_up) || !mlp) goto done;
    const int norm_threads = small_op_threads((long)tokens * hidden, threads);
    const int rope_threads = small_op_threads((long)tokens * qkv_size, threads);
    const int silu_threads = small_op_threads(2L * tokens * inter, threads);
    for (int l = 0; l < shape->layers; ++l) {
        const StackLayer *w = layers + l;
        uint16_t *k_cache = kv_cache + 2L * l * cache_part, *v_cache = k_cache + cache_part;
        // the first layer normalizes the embeddings; each later one adds the MLP's output
        // to the residual stream first, as models/llama.py's DecoderLayer
        rms_norm_bf16_avx512bf16(l == 0 ? x : mlp, l == 0 ? NULL : x, w->input_norm, h, tokens,
                                 hidden, shape->eps, norm_threads);
        linear(&w->qkv, amx, h, tokens, hidden, qkv_size, qkv, threads);
        rope_kv_bf16_avx512(qkv, positions, cos, sin, slots, q, k_cache, v_cache, 1, tokens, heads,
                            kv_heads, dim, rope_threads);
        // decodes then chunks, as kernels/cpu_attention.py: paged_attention
        if (num_decodes > 0)
            paged_decode_bf16_avx512bf16(q, k_cache, v_cache, block_tables, seq_lens, attn,
                                         num_decodes, heads, kv_heads, dim, shape->block_size,
                                         max_blocks, shape->scale, threads);
        if (num_seqs > num_decodes)
            prefill(q, k_cache, v_cache, block_tables, seq_lens, query_start, attn, num_decodes,
                    num_seqs, heads, kv_heads, dim, shape->block_size, max_blocks, shape->scale,
                    threads);
        linear(&w->o_proj, amx, attn, tokens, q_size, hidden, h, threads);
        rms_norm_bf16_avx512bf16(h, x, w->post_norm, mlp, tokens, hidden, shape->eps, norm_threads);
        if (w->silu_in_gate_up && w->gate_up.int8) {  // int8_silu_mul_amx: inter outputs
            linear(&w->gate_up, amx, mlp, tokens, hidden, inter, act, threads);
        } else if (w->silu_in_gate_up) {
            (amx ? bf16_silu_mul_amx : bf16_silu_mul_avx512bf16)(mlp, tokens, hidden,
                                                                  w->gate_up.weight, inter, act,
                                                                  threads);
        } else {
            linear(&w->gate_up, amx, mlp, tokens, hidden, 2 * inter, gate_up, threads);
            silu_mul_bf16_avx512bf16(gate_up, act, tokens, inter, silu_threads);
        }
        linear(&w->down_proj, amx, act, tokens, inter, hidden, mlp, threads);
    }
    rms_norm_bf16_avx512bf16(mlp, x, final_norm, out, tokens, hidden, shape->eps, norm_threads);
    status = 0;
done:
    free(h);
    free(qkv);
    free(q);
    free(attn);
    free(act);
    free(gate_up);
    free(mlp);
    return status;
}
