/* bf16 <-> float32 for the native kernels: one rounding rule (round to nearest even, NaN kept NaN) for all. */
#ifndef BEACON_BF16_H
#define BEACON_BF16_H
#include <stdint.h>

static inline uint16_t round_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u); /* NaN stays NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline float bf16_to_float(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
}

/* a * b and a + b of two bf16 values, rounded to bf16 (what torch's bf16 elementwise operators return) */
static inline uint16_t bf16_mul(uint16_t a, uint16_t b) { return round_to_bf16(bf16_to_float(a) * bf16_to_float(b)); }
static inline uint16_t bf16_add(uint16_t a, uint16_t b) { return round_to_bf16(bf16_to_float(a) + bf16_to_float(b)); }

#endif
