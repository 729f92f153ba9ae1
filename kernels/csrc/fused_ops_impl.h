// The fused ops' bodies, included once per (activation type, ISA) by fused_ops.c.
//
// The includer defines ELEM (the activation element type), LOAD(x) (ELEM -> float),
// STORE(x) (float -> ELEM), ROUND(x) (float -> the nearest ELEM value, as float: where HF's
// model rounds an intermediate to its dtype) and SUFFIX (appended to every name), and
// wraps the include in a `#pragma GCC target`. Every helper is defined here, once per twin,
// so that it inlines (see bf16.h). Rows run in parallel only when the caller
// passes num_threads > 1 (it does so for large batches: a fork/join costs microseconds).
#define CAT_(a, b) a##b
#define CAT(a, b) CAT_(a, b)
#define NAME(base) CAT(base, SUFFIX)

BF16_CONVERSIONS(SUFFIX)  // bf16_load<SUFFIX>, bf16_store<SUFFIX>

// e^x to ~1 ulp (Cephes' expf: e^x = 2^n e^r, |r| <= ln 2 / 2, a degree-7 polynomial).
// NOTE: ours, not libm's: glibc's vector expf is only declared with -ffinite-math-only,
// which the build leaves off, and a scalar call per element keeps the loop scalar.
static inline float NAME(exp_)(float x) {
    x = x < -87.3f ? -87.3f : x > 88.7f ? 88.7f : x;  // 2^n stays a normal float
    const float n = floorf(x * 1.44269504088896341f + 0.5f);
    const float r = (x - n * 0.693359375f) + n * 2.12194440e-4f;  // ln 2 in two parts
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f;
    return p * (f32_bits){.u = (uint32_t)((int32_t)n + 127) << 23}.f;
}

// n fp32 values into a row of the KV cache (or a query) held as fp32 or bf16
static inline void NAME(store_row_)(const float *restrict src, void *dst, long at, int bf16,
                                    int n) {
    if (bf16) {
        uint16_t *restrict d = (uint16_t *)dst + at;
        for (int i = 0; i < n; ++i) d[i] = NAME(bf16_store)(src[i]);
    } else {
        memcpy((float *)dst + at, src, sizeof(float) * (size_t)n);
    }
}

// out = weight * rmsnorm(residual + x), residual updated in place to residual + x; with
// residual NULL, out = weight * rmsnorm(x). x, residual, out: [rows, hidden]; weight: [hidden]
void NAME(rms_norm_)(const ELEM *x, ELEM *residual, const ELEM *weight, ELEM *out, int rows,
                     int hidden, float eps, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int r = 0; r < rows; ++r) {
        const ELEM *restrict xr = x + (long)r * hidden;
        ELEM *restrict res = residual ? residual + (long)r * hidden : NULL;
        ELEM *restrict o = out + (long)r * hidden;
        float v[CHUNK], sum = 0.0f;
        for (int c0 = 0; c0 < hidden; c0 += CHUNK) {
            const int n = hidden - c0 < CHUNK ? hidden - c0 : CHUNK;
            if (res) {
                for (int i = 0; i < n; ++i) v[i] = ROUND(LOAD(res[c0 + i]) + LOAD(xr[c0 + i]));
                for (int i = 0; i < n; ++i) res[c0 + i] = STORE(v[i]);
            } else {
                for (int i = 0; i < n; ++i) v[i] = LOAD(xr[c0 + i]);
            }
#pragma omp simd reduction(+ : sum)
            for (int i = 0; i < n; ++i) sum += v[i] * v[i];
        }
        // HF: x * rsqrt(mean(x^2) + eps), rounded to the dtype, then weight * that
        const float inv = 1.0f / sqrtf(sum / (float)hidden + eps);
        const ELEM *restrict src = res ? res : xr;
        for (int i = 0; i < hidden; ++i) o[i] = STORE(LOAD(weight[i]) * ROUND(LOAD(src[i]) * inv));
    }
}

// neox (rotate-half) RoPE of one head into fp32: out = [x1 c - x2 s, x2 c + x1 s], each
// product and sum rounded to ELEM as HF's model (whose cos/sin are in its dtype) rounds them
static inline void NAME(rotate_)(const ELEM *restrict x, const ELEM *restrict c,
                                 const ELEM *restrict s, int half, float *restrict out) {
    for (int i = 0; i < half; ++i) {
        const float x1 = LOAD(x[i]), x2 = LOAD(x[i + half]), ci = LOAD(c[i]), si = LOAD(s[i]);
        out[i] = ROUND(ROUND(x1 * ci) - ROUND(x2 * si));
        out[i + half] = ROUND(ROUND(x2 * ci) + ROUND(x1 * si));
    }
}

// qkv: [T, (Hq + 2 Hkv) * D], a fused projection's output. Writes RoPE(q) to q_out
// [T, Hq, D] and RoPE(k), v to the caches' slots ([num_slots, Hkv, D] each); q_out and the
// caches are fp32 or bf16 (cache_bf16). cos, sin: [max_positions, D / 2]. A slot < 0 is
// padding and is not written.
void NAME(rope_kv_)(const ELEM *qkv, const int64_t *positions, const ELEM *cos_table,
                    const ELEM *sin_table, const int64_t *slots, void *q_out, void *k_cache,
                    void *v_cache, int cache_bf16, int tokens, int num_heads, int num_kv_heads,
                    int head_dim, int num_threads) {
    const int half = head_dim / 2;
    const long kv_size = (long)num_kv_heads * head_dim, q_size = (long)num_heads * head_dim;
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int t = 0; t < tokens; ++t) {
        const ELEM *row = qkv + (long)t * (q_size + 2 * kv_size);
        const ELEM *c = cos_table + positions[t] * half, *s = sin_table + positions[t] * half;
        const int64_t slot = slots[t];
        float buf[CHUNK];
        for (int h = 0; h < num_heads; ++h) {
            NAME(rotate_)(row + (long)h * head_dim, c, s, half, buf);
            NAME(store_row_)(buf, q_out, ((long)t * num_heads + h) * head_dim, cache_bf16,
                              head_dim);
        }
        for (int h = 0; h < num_kv_heads && slot >= 0; ++h) {
            NAME(rotate_)(row + q_size + (long)h * head_dim, c, s, half, buf);
            NAME(store_row_)(buf, k_cache, slot * kv_size + (long)h * head_dim, cache_bf16,
                              head_dim);
            const ELEM *restrict v = row + q_size + kv_size + (long)h * head_dim;
            for (int i = 0; i < head_dim; ++i) buf[i] = LOAD(v[i]);
            NAME(store_row_)(buf, v_cache, slot * kv_size + (long)h * head_dim, cache_bf16,
                              head_dim);
        }
    }
}

// out [rows, inter] = silu(gate) * up, gate_up: [rows, 2 * inter] (gate first). HF rounds
// silu's result to the dtype before the product.
void NAME(silu_mul_)(const ELEM *gate_up, ELEM *out, int rows, int inter, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads) if (num_threads > 1)
    for (int r = 0; r < rows; ++r) {
        const ELEM *restrict g = gate_up + (long)r * 2 * inter, *restrict u = g + inter;
        ELEM *restrict o = out + (long)r * inter;
#pragma omp simd
        for (int i = 0; i < inter; ++i) {
            const float x = LOAD(g[i]);
            o[i] = STORE(ROUND(x / (1.0f + NAME(exp_)(-x))) * LOAD(u[i]));
        }
    }
}

#undef NAME
#undef CAT
#undef CAT_
