// bf16 <-> fp32 for the C kernels: bf16 is the top 16 bits of an fp32.
#pragma once
#include <stdint.h>

// a union, not memcpy: GCC vectorizes loops over it
typedef union {
    uint32_t u;
    float f;
} f32_bits;

#define BF16_CAT_(a, b) a##b
#define BF16_CAT(a, b) BF16_CAT_(a, b)

// The two conversions, bf16_load<suffix> (bf16 -> fp32) and bf16_store<suffix> (fp32 ->
// bf16, round to nearest even as torch does). NOTE: a file compiling twins under
// `#pragma GCC target` defines a copy inside each twin: GCC inlines no function compiled for
// another target, and one call in a loop keeps the loop scalar.
#define BF16_CONVERSIONS(suffix)                                                         \
    static inline float BF16_CAT(bf16_load, suffix)(uint16_t h) {                          \
        return (f32_bits){.u = (uint32_t)h << 16}.f;                                  \
    }                                                                                 \
    static inline uint16_t BF16_CAT(bf16_store, suffix)(float f) {                         \
        const uint32_t bits = (f32_bits){.f = f}.u;                                   \
        if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40); \
        return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);              \
    }

BF16_CONVERSIONS()  // bf16_load, bf16_store
