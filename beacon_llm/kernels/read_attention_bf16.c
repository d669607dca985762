/* The read's attention: a window of T query tokens over K keys with a visibility mask, bf16, for CPUs with
 * AVX512-BF16.
 *
 * out[t, h * G + i] = softmax(scale * q[h * G + i, t] . K[h]^T, over the keys t sees) V[h] for every key/value head h
 * and each of its G query heads (grouped-query attention). The keys and values are first laid out for vdpbf16ps
 * (the keys in blocks of 16 with the two elements of each dimension pair side by side, the values with the same
 * dimension of two consecutive keys side by side), then each work item (one key/value head, 32 query rows) runs
 * over the keys in blocks of 64 with an online softmax (flash attention): scores, maxima, exponentials and their
 * sums in float32; the exponentials are rounded to bf16 for the product with the values (as torch's CPU attention
 * does for bf16), whose sums are float32; each output is rounded once to bf16. A block of keys that none of a tile's
 * rows sees is skipped, so a causal or beacon mask costs only the visible blocks. Built with the decode kernels by
 * beacon_llm/native_kernels.py.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "bf16.h"
#include "exp_avx512.h"

#define KEY_BLOCK 64 /* keys per block: four vectors of 16 scores */
#define ROW_TILE 4   /* query rows per register tile */
#define ROW_BLOCK 32 /* query rows per work item */
#define MAX_HEAD_DIM 256

static inline uint32_t word_at(const uint16_t *p) {
    uint32_t w;
    __builtin_memcpy(&w, p, 4);
    return w;
}

/* Keys b * 16 .. b * 16 + 15 of head h: kp[((h * n16 + b) * pairs + p) * 16 + i] = k[16 b + i, 2p .. 2p + 1] as one
 * 32-bit word; values: vp[((h * n2 + jp) * d + e) * 2 + s] = v[2 jp + s, e]. Keys past nk are zero. */
static void pack_block(const uint16_t *k, const uint16_t *v, const long strides[4], long nk, long d, long n16, long h,
                       long b, uint32_t *kp, uint16_t *vp) {
    const long pairs = d / 2, n2 = n16 * 8;
    uint32_t *kd = kp + (h * n16 + b) * pairs * 16;
    for (long i = 0; i < 16; i++) {
        const long j = 16 * b + i;
        const uint16_t *row = k + h * strides[0] + j * strides[1];
        for (long p = 0; p < pairs; p++) kd[p * 16 + i] = j < nk ? word_at(row + 2 * p) : 0u;
    }
    for (long s = 0; s < 16; s += 2) {
        const long j = 16 * b + s, jp = h * n2 + 8 * b + s / 2;
        const uint16_t *r0 = v + h * strides[2] + j * strides[3], *r1 = r0 + strides[3];
        uint16_t *vd = vp + jp * d * 2;
        for (long e = 0; e < d; e++) {
            vd[2 * e] = j < nk ? r0[e] : 0;
            vd[2 * e + 1] = j + 1 < nk ? r1[e] : 0;
        }
    }
}

/* Scores of ROW_TILE query rows against one block of 64 packed keys (four groups of 16), before the scale. */
static inline void tile_scores(const uint16_t *const q[ROW_TILE], const uint32_t *kb, long pairs,
                               __m512 s[ROW_TILE][4]) {
    for (int r = 0; r < ROW_TILE; r++)
        for (int c = 0; c < 4; c++) s[r][c] = _mm512_setzero_ps();
    for (long p = 0; p < pairs; p++) {
        __m512bh kv[4];
        for (int c = 0; c < 4; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kb + (c * pairs + p) * 16);
        for (int r = 0; r < ROW_TILE; r++) {
            const __m512bh qb = (__m512bh)_mm512_set1_epi32((int)word_at(q[r] + 2 * p));
            for (int c = 0; c < 4; c++) s[r][c] = _mm512_dpbf16_ps(s[r][c], kv[c], qb);
        }
    }
}

/* o[r][dc .. dc + 16 DV) = alpha[r] o[r][..] + sum over the block's 32 key pairs of p[r] v, for the ROW_TILE rows:
 * each value pair is loaded once for the tile's rows; DV (2 or 4) vectors of 16 dimensions per row. */
#define TILE_VALUES(DV)                                                                                          \
    static inline void tile_values_##DV(float *o, long d, long dc, const float alpha[ROW_TILE],                  \
                                        const uint32_t *pw, const uint16_t *vb) {                                \
        __m512 acc[ROW_TILE][DV];                                                                                \
        for (int r = 0; r < ROW_TILE; r++)                                                                       \
            for (int c = 0; c < DV; c++)                                                                         \
                acc[r][c] = _mm512_mul_ps(_mm512_loadu_ps(o + r * d + dc + 16 * c), _mm512_set1_ps(alpha[r]));   \
        for (long jp = 0; jp < KEY_BLOCK / 2; jp++) {                                                            \
            __m512bh vv[DV];                                                                                     \
            for (int c = 0; c < DV; c++) vv[c] = (__m512bh)_mm512_loadu_si512(vb + (jp * d + dc + 16 * c) * 2);  \
            for (int r = 0; r < ROW_TILE; r++) {                                                                 \
                const __m512bh pb = (__m512bh)_mm512_set1_epi32((int)pw[r * (KEY_BLOCK / 2) + jp]);              \
                for (int c = 0; c < DV; c++) acc[r][c] = _mm512_dpbf16_ps(acc[r][c], vv[c], pb);                 \
            }                                                                                                    \
        }                                                                                                        \
        for (int r = 0; r < ROW_TILE; r++)                                                                       \
            for (int c = 0; c < DV; c++) _mm512_storeu_ps(o + r * d + dc + 16 * c, acc[r][c]);                   \
    }
TILE_VALUES(2)
TILE_VALUES(4)

/* Which of the 64 keys from j0 row t sees (bit i: key j0 + i): those below nk whose mask byte is nonzero (without a
 * mask: all) and, with causal >= 0, at most t + causal. */
static inline uint64_t block_bits(const uint8_t *mask, long mask_stride, long causal, long t, long j0, long nk) {
    uint64_t seen = nk - j0 >= 64 ? ~0ull : (1ull << (nk - j0)) - 1ull;
    if (causal >= 0) {
        const long last = t + causal - j0; /* the last key seen, relative to the block */
        seen &= last < 0 ? 0ull : last >= 63 ? ~0ull : (2ull << last) - 1ull;
    }
    if (mask != NULL && seen) {
        const uint8_t *row = mask + t * mask_stride + j0;
        const __m512i bytes = nk - j0 >= 64 ? _mm512_loadu_si512(row) : _mm512_maskz_loadu_epi8((__mmask64)seen, row);
        seen &= (uint64_t)_mm512_test_epi8_mask(bytes, bytes);
    }
    return seen;
}

/* One work item: rows [r0, r1) of head h's G * T query rows (row r: token r / G, query head h * G + r % G). bits: the
 * mask's visibility words, (T, blocks), or NULL without a mask (then computed from causal and nk here). */
static void attend_rows(const uint16_t *q, long q_head_stride, long q_row_stride, const uint32_t *kp,
                        const uint16_t *vp, const uint64_t *bits, long causal, long g, long n_kv, long nk, long d,
                        long n16, long h, long r0, long r1, float scale, uint16_t *out, float *o) {
    const long pairs = d / 2, n2 = n16 * 8, rows = r1 - r0, n_blocks = n16 / 4;
    float m[ROW_BLOCK], l[ROW_BLOCK];
    const uint16_t *qr[ROW_BLOCK];
    long tr[ROW_BLOCK];
    uint32_t pw[ROW_TILE * KEY_BLOCK / 2];
    for (long r = 0; r < ROW_BLOCK; r++) {
        const long rr = r0 + (r < rows ? r : rows - 1); /* rows past the item repeat its last row, never written */
        tr[r] = rr / g;
        qr[r] = q + (h * g + rr % g) * q_head_stride + tr[r] * q_row_stride;
        m[r] = -INFINITY;
        l[r] = 0.0f;
    }
    memset(o, 0, sizeof(float) * ROW_BLOCK * d);
    for (long j0 = 0; j0 < nk; j0 += KEY_BLOCK) {
        const uint32_t *kb = kp + (h * n16 + j0 / 16) * pairs * 16;
        const uint16_t *vb = vp + (h * n2 + j0 / 2) * d * 2;
        for (long t0 = 0; t0 < rows; t0 += ROW_TILE) {
            uint64_t vis[ROW_TILE], any = 0;
            for (int r = 0; r < ROW_TILE; r++) {
                const long tt = tr[t0 + r];
                vis[r] = t0 + r >= rows ? 0
                         : bits != NULL ? bits[tt * n_blocks + j0 / KEY_BLOCK]
                                        : block_bits(NULL, 0, causal, tt, j0, nk);
                any |= vis[r];
            }
            if (!any) continue;
            __m512 s[ROW_TILE][4];
            tile_scores(qr + t0, kb, pairs, s);
            /* the softmax in phases over the tile's rows, so that the rows' reductions and exponentials are
             * independent chains the core can overlap */
            float block_max[ROW_TILE], alpha[ROW_TILE];
            for (int r = 0; r < ROW_TILE; r++) { /* each row's largest visible score */
                __m512 mx = _mm512_set1_ps(-INFINITY);
                for (int c = 0; c < 4; c++) {
                    const __mmask16 seen = (__mmask16)(vis[r] >> (16 * c));
                    s[r][c] = _mm512_mask_mul_ps(_mm512_set1_ps(-INFINITY), seen, s[r][c], _mm512_set1_ps(scale));
                    mx = _mm512_max_ps(mx, s[r][c]);
                }
                block_max[r] = _mm512_reduce_max_ps(mx);
            }
            float step[16] = {0};
            for (int r = 0; r < ROW_TILE; r++) { /* the running maxima; their change as one vector of exponentials */
                const float old = m[t0 + r], now = block_max[r] > old ? block_max[r] : old;
                step[r] = now == -INFINITY ? 0.0f : old - now; /* a row that has seen nothing yet keeps its zeros */
                m[t0 + r] = now;
            }
            _mm_storeu_ps(alpha, _mm512_castps512_ps128(exp_nonpositive(_mm512_loadu_ps(step))));
            __m512 sum[ROW_TILE];
            for (int r = 0; r < ROW_TILE; r++) { /* exponentials: bf16 for the value sums, float32 for their sum */
                const __m512 shift = _mm512_set1_ps(m[t0 + r]);
                sum[r] = _mm512_setzero_ps();
                for (int c = 0; c < 4; c++) {
                    const __mmask16 seen = (__mmask16)(vis[r] >> (16 * c));
                    const __m512 e = _mm512_maskz_mov_ps(seen, exp_nonpositive(_mm512_sub_ps(s[r][c], shift)));
                    sum[r] = _mm512_add_ps(sum[r], e);
                    _mm256_storeu_si256((__m256i *)(pw + r * (KEY_BLOCK / 2) + 8 * c),
                                        (__m256i)_mm512_cvtneps_pbh(e));
                }
            }
            for (int r = 0; r < ROW_TILE; r++) l[t0 + r] = l[t0 + r] * alpha[r] + _mm512_reduce_add_ps(sum[r]);
            float *ot = o + t0 * d;
            long dc = 0;
            for (; dc + 64 <= d; dc += 64) tile_values_4(ot, d, dc, alpha, pw, vb);
            if (dc < d) tile_values_2(ot, d, dc, alpha, pw, vb);
        }
    }
    const long heads = n_kv * g;
    for (long r = 0; r < rows; r++) {
        const long rr = r0 + r;
        uint16_t *dst = out + ((rr / g) * heads + h * g + rr % g) * d;
        const float inv = l[r] == 0.0f ? 0.0f : 1.0f / l[r]; /* a row that sees no key reads zeros; NaN stays NaN */
        for (long e = 0; e < d; e++) dst[e] = round_to_bf16(o[r * d + e] * inv);
    }
}

/* q: query head a, token t at q + a * q_head_stride + t * q_row_stride (d contiguous elements); k: key j of head h
 * at k + h * strides[0] + j * strides[1], v: its value at v + h * strides[2] + j * strides[3] (d contiguous
 * elements each); mask: NULL (every key visible) or (t, nk) bytes with row stride mask_stride, nonzero = visible;
 * causal: -1, or token t sees only keys up to t + causal (with the mask, both must allow a key); out: (t, n_kv * g,
 * d) contiguous. d a multiple of 32 up to 256, nk >= 1. Returns 0, or -1 when
 * the packed copy of the keys and values cannot be allocated (nothing written). */
int beacon_read_attention_bf16(const uint16_t *q, long q_head_stride, long q_row_stride, const uint16_t *k,
                               const uint16_t *v, const long *strides, const uint8_t *mask, long mask_stride,
                               long causal,
                               long n_kv, long g, long t, long nk, long d, float scale, uint16_t *out, int threads) {
    const long n16 = (nk + KEY_BLOCK - 1) / KEY_BLOCK * (KEY_BLOCK / 16);
    const size_t kv_words = (size_t)n_kv * n16 * 16 * d / 2;
    const long n_blocks = n16 / 4;
    uint32_t *kp = aligned_alloc(64, (kv_words * 4 + 63) / 64 * 64);
    uint16_t *vp = aligned_alloc(64, (kv_words * 4 + 63) / 64 * 64);
    uint64_t *bits = mask == NULL ? NULL : malloc(sizeof(uint64_t) * (t * n_blocks > 0 ? t * n_blocks : 1));
    if (kp == NULL || vp == NULL || (mask != NULL && bits == NULL)) {
        free(kp);
        free(vp);
        free(bits);
        return -1;
    }
    const long row_blocks = (g * t + ROW_BLOCK - 1) / ROW_BLOCK;
    int failed = 0;
#pragma omp parallel num_threads(threads)
    {
        float *o = aligned_alloc(64, sizeof(float) * ROW_BLOCK * MAX_HEAD_DIM);
#pragma omp for schedule(static)
        for (long it = 0; it < n_kv * n16; it++) pack_block(k, v, strides, nk, d, n16, it / n16, it % n16, kp, vp);
        if (bits != NULL) { /* the mask read once for all heads */
#pragma omp for schedule(static)
            for (long row = 0; row < t; row++)
                for (long b = 0; b < n_blocks; b++)
                    bits[row * n_blocks + b] = block_bits(mask, mask_stride, causal, row, b * KEY_BLOCK, nk);
        }
        if (o == NULL) {
#pragma omp atomic write
            failed = 1;
        }
#pragma omp barrier
        if (!failed) {
#pragma omp for schedule(dynamic, 1)
            for (long it = 0; it < n_kv * row_blocks; it++) {
                const long h = it / row_blocks, r0 = (it % row_blocks) * ROW_BLOCK;
                const long r1 = r0 + ROW_BLOCK < g * t ? r0 + ROW_BLOCK : g * t;
                attend_rows(q, q_head_stride, q_row_stride, kp, vp, bits, causal, g, n_kv, nk, d, n16, h, r0, r1, scale,
                            out, o);
            }
        }
        free(o);
    }
    free(kp);
    free(vp);
    free(bits);
    return failed ? -1 : 0;
}
