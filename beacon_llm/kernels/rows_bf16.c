/* The read's elementwise steps on a window of rows, bf16, for CPUs with AVX512-BF16.
 *
 * Between the read's products, a stock Llama layer runs a dozen eager operators per window (the residual sum, the
 * RMSNorm as seven passes through float32, RoPE as four products and a concatenation, SiLU and its product with up),
 * each a pass over the whole window. Here each is one pass, row by row over the threads, with the stock operations'
 * bf16 rounding points: the residual sum rounded; the norm in float32, rounded before its weight multiplies it;
 * RoPE's two products and their sum each rounded; SiLU rounded, then its product with up. The norm's sum of squares
 * is added in another order than torch's and SiLU's exponential is exp_avx512.h's polynomial, so those two are
 * within one bf16 step of torch's. Built with the other kernels by beacon_llm/native_kernels.py.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "exp_avx512.h"

/* sixteen bf16 (or fewer, under ``keep``) widened to float32 */
static inline __m512 load_bf16(const uint16_t *p, __mmask16 keep) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(keep, p)), 16));
}

/* float32 rounded to bf16 (nearest even; a NaN stays NaN, as round_to_bf16 in bf16.h) and stored under ``keep`` */
static inline void store_bf16(uint16_t *p, __m512 f, __mmask16 keep) {
    _mm256_mask_storeu_epi16(p, keep, (__m256i)_mm512_cvtneps_pbh(f));
}

/* float32 rounded to bf16 and widened back, in registers: what a bf16 operator's result holds */
static inline __m512 rounded(__m512 f) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)_mm512_cvtneps_pbh(f)), 16));
}

static inline __mmask16 lanes(long n, long i) { return n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1u); }

/* Per row r of ``rows`` (n features; a, b, sum and out all (rows, n) contiguous): h = a, or with ``b``, h = a + b
 * rounded and written to ``sum``; then out = weight * round(h * rsqrt(mean(h^2) + eps)), as the stock RMSNorm on a
 * bf16 input. */
void beacon_add_rms_norm_bf16(const uint16_t *a, const uint16_t *b, const uint16_t *weight, float eps, long rows,
                              long n, uint16_t *sum, uint16_t *out, int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint16_t *h = a + r * n;
        __m512 sq = _mm512_setzero_ps();
        for (long i = 0; i < n; i += 16) {
            const __mmask16 keep = lanes(n, i);
            __m512 x = load_bf16(h + i, keep);
            if (b != NULL) {
                x = rounded(_mm512_add_ps(x, load_bf16(b + r * n + i, keep))); /* the rounded sum is what it reads */
                store_bf16(sum + r * n + i, x, keep);
            }
            sq = _mm512_fmadd_ps(x, x, sq);
        }
        if (b != NULL) h = sum + r * n;
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)n + eps);
        const __m512 scale = _mm512_set1_ps(inv);
        uint16_t *o = out + r * n;
        for (long i = 0; i < n; i += 16) {
            const __mmask16 keep = lanes(n, i);
            const __m512 normed = rounded(_mm512_mul_ps(load_bf16(h + i, keep), scale));
            store_bf16(o + i, _mm512_mul_ps(normed, load_bf16(weight + i, keep)), keep);
        }
    }
}

/* out[r, i] = round(round(silu(gate[r, i])) * up[r, i]); gate, up and out: (rows, inter) contiguous. */
void beacon_silu_mul_bf16(const uint16_t *gate, const uint16_t *up, long rows, long inter, uint16_t *out,
                          int threads) {
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint16_t *g = gate + r * inter, *u = up + r * inter;
        uint16_t *o = out + r * inter;
        for (long i = 0; i < inter; i += 16) {
            const __mmask16 keep = lanes(inter, i);
            const __m512 x = load_bf16(g + i, keep);
            /* sigmoid(x) = 1 / (1 + e^-x) for x >= 0, e^x / (1 + e^x) below: e^-|x| never overflows */
            const __m512 t = exp_nonpositive(_mm512_sub_ps(_mm512_setzero_ps(), _mm512_abs_ps(x)));
            const __m512 num = _mm512_mask_blend_ps(_mm512_cmp_ps_mask(x, _mm512_setzero_ps(), _CMP_LT_OQ),
                                                    _mm512_set1_ps(1.0f), t);
            const __m512 silu = _mm512_div_ps(_mm512_mul_ps(x, num), _mm512_add_ps(_mm512_set1_ps(1.0f), t));
            store_bf16(o + i, _mm512_mul_ps(rounded(silu), load_bf16(u + i, keep)), keep);
        }
    }
}

/* Rotated copies of ``heads`` heads of d features per row: out[r, h] = x[r, h] * cos[r] + rotate_half(x[r, h]) *
 * sin[r], each product and the sum rounded (Llama's rotate-half RoPE in bf16). x: row r, head h at x + r *
 * row_stride + h * head_stride (d contiguous elements); cos / sin: (rows, d); out: (rows, heads, d) contiguous. */
void beacon_rope_bf16(const uint16_t *x, long row_stride, long head_stride, long heads, long d, const uint16_t *cos,
                      const uint16_t *sin, long rows, uint16_t *out, int threads) {
    const long half = d / 2;
#pragma omp parallel for num_threads(threads) schedule(static)
    for (long r = 0; r < rows; r++) {
        const uint16_t *c = cos + r * d, *s = sin + r * d;
        for (long h = 0; h < heads; h++) {
            const uint16_t *row = x + r * row_stride + h * head_stride;
            uint16_t *o = out + (r * heads + h) * d;
            for (long i = 0; i < half; i += 16) {
                const __mmask16 keep = lanes(half, i);
                const __m512 lo = load_bf16(row + i, keep), hi = load_bf16(row + half + i, keep);
                /* first half: x * cos - x_hi * sin; second half: x_hi * cos + x * sin (rotate_half = [-hi, lo]) */
                const __m512 a0 = rounded(_mm512_mul_ps(lo, load_bf16(c + i, keep)));
                const __m512 b0 = rounded(_mm512_mul_ps(_mm512_sub_ps(_mm512_setzero_ps(), hi), load_bf16(s + i, keep)));
                store_bf16(o + i, _mm512_add_ps(a0, b0), keep);
                const __m512 a1 = rounded(_mm512_mul_ps(hi, load_bf16(c + half + i, keep)));
                const __m512 b1 = rounded(_mm512_mul_ps(lo, load_bf16(s + half + i, keep)));
                store_bf16(o + half + i, _mm512_add_ps(a1, b1), keep);
            }
        }
    }
}
