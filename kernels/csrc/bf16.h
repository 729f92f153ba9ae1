// bf16 <-> fp32 for the C kernels: bf16 is the top 16 bits of an fp32.
#pragma once
#include <stdint.h>

// a union, not memcpy: GCC vectorizes loops over it
typedef union {
    uint32_t u;
    float f;
} f32_bits;

static inline float bf16_load(uint16_t h) { return (f32_bits){.u = (uint32_t)h << 16}.f; }

static inline uint16_t bf16_store(float f) {  // round to nearest even, as torch does
    const uint32_t bits = (f32_bits){.f = f}.u;
    if ((bits & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((bits >> 16) | 0x40);  // NaN
    return (uint16_t)((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
}
