/* The decode step's attention for one token, bf16 keys and values, for CPUs with AVX512-BF16.
 *
 * out[h, g] = softmax(scale * q[h, g] . K[h]^T) V[h] for every key/value head h and each of the G query heads that
 * read it (grouped-query attention: each key and value row is loaded once for all G). The M keys of a head are split
 * into parts that the threads take in turn (split-K, as flash-decoding does); each part keeps its maximum score, its
 * sum of exponentials and its weighted sum of values in float32, and the parts are merged at the end. Scores,
 * exponentials and sums are float32 throughout; each output is rounded once to bf16. Built with matvec_bf16.c by
 * beacon_llm/native_kernels.py.
 */
#include <immintrin.h>
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define TILE 64 /* keys per pass of the value sum: a tile of values stays in the first-level cache */

/* e^x for x <= 0 (scores minus their maximum): n = round(x / ln 2), r = x - n ln 2 in [-ln2/2, ln2/2], e^r by its
 * Taylor polynomial of degree 7 (truncation below 6e-9, under float32's rounding), times 2^n. */
static inline __m512 exp_nonpositive(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-88.0f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 5040.0f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 720.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

static inline uint16_t round_to_bf16(float f) {
    uint32_t u;
    __builtin_memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

static inline __m512 bf16x16_to_float(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* One part: keys [j0, j1) of head h. scores: (G, j1 - j0) scratch; part: G x (max, sum, acc[D]). */
static void attend_part(const uint16_t *q, const uint16_t *k, const uint16_t *v, long g, long d, long j0, long j1,
                        float scale, float *scores, float *part) {
    const long n = j1 - j0, vecs = d / 32;
    __m512bh qv[16 * 8]; /* G <= 16 query heads, D <= 256 */
    for (long gi = 0; gi < g; gi++)
        for (long c = 0; c < vecs; c++) qv[gi * vecs + c] = (__m512bh)_mm512_loadu_si512(q + gi * d + 32 * c);
    for (long gi = 0; gi < g; gi++) part[gi * (d + 2)] = -INFINITY;
    for (long j = 0; j < n; j++) { /* scores: each key row loaded once for the G query heads */
        const uint16_t *kr = k + (j0 + j) * d;
        __m512bh kv[8];
        for (long c = 0; c < vecs; c++) kv[c] = (__m512bh)_mm512_loadu_si512(kr + 32 * c);
        for (long gi = 0; gi < g; gi++) {
            __m512 a = _mm512_setzero_ps();
            for (long c = 0; c < vecs; c++) a = _mm512_dpbf16_ps(a, kv[c], qv[gi * vecs + c]);
            const float s = _mm512_reduce_add_ps(a) * scale;
            scores[gi * n + j] = s;
            if (s > part[gi * (d + 2)]) part[gi * (d + 2)] = s;
        }
    }
    for (long gi = 0; gi < g; gi++) { /* exponentials and their sum */
        float *row = scores + gi * n;
        const __m512 mx = _mm512_set1_ps(part[gi * (d + 2)]);
        __m512 sum = _mm512_setzero_ps();
        long j = 0;
        for (; j + 16 <= n; j += 16) {
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx));
            _mm512_storeu_ps(row + j, e);
            sum = _mm512_add_ps(sum, e);
        }
        if (j < n) {
            const __mmask16 m = (__mmask16)((1u << (n - j)) - 1u);
            const __m512 e = exp_nonpositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + j), mx));
            _mm512_mask_storeu_ps(row + j, m, e);
            sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
        }
        part[gi * (d + 2) + 1] = _mm512_reduce_add_ps(sum);
        for (long i = 0; i < d; i++) part[gi * (d + 2) + 2 + i] = 0.0f;
    }
    for (long t0 = 0; t0 < n; t0 += TILE) { /* weighted sum of values, tile by tile */
        const long t1 = t0 + TILE < n ? t0 + TILE : n;
        for (long gi = 0; gi < g; gi++) {
            const float *p = scores + gi * n;
            float *acc = part + gi * (d + 2) + 2;
            for (long c = 0; c < d; c += 16) {
                __m512 a = _mm512_loadu_ps(acc + c);
                for (long j = t0; j < t1; j++)
                    a = _mm512_fmadd_ps(_mm512_set1_ps(p[j]), bf16x16_to_float(v + (j0 + j) * d + c), a);
                _mm512_storeu_ps(acc + c, a);
            }
        }
    }
}

/* q, out: (n_kv, g, d) contiguous. Key j of head h: k + h * head_stride + j * d (likewise v). m >= 1 keys.
 * d: a multiple of 32, at most 256; g at most 16. work: float scratch of (g * m + n_kv * parts * g * (d + 2)). */
void beacon_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, long head_stride,
                                  long n_kv, long g, long d, long m, long parts, float scale, uint16_t *out,
                                  float *work, int threads) {
    float *partials = work + n_kv * g * m;
    const long items = n_kv * parts, per = (m + parts - 1) / parts;
#pragma omp parallel num_threads(threads)
    {
#pragma omp for schedule(static)
        for (long it = 0; it < items; it++) {
            const long h = it / parts, p = it % parts;
            const long j0 = p * per < m ? p * per : m, j1 = j0 + per < m ? j0 + per : m;
            float *part = partials + it * g * (d + 2);
            if (j0 >= j1) {
                for (long gi = 0; gi < g; gi++) part[gi * (d + 2)] = -INFINITY, part[gi * (d + 2) + 1] = 0.0f;
                continue;
            }
            attend_part(q + h * g * d, k + h * head_stride, v + h * head_stride, g, d, j0, j1, scale,
                        work + h * g * m + g * j0, part);
        }
#pragma omp for schedule(static)
        for (long hg = 0; hg < n_kv * g; hg++) { /* merge the parts of head h, query gi */
            const long h = hg / g, gi = hg % g;
            float mx = -INFINITY, total = 0.0f;
            for (long p = 0; p < parts; p++) {
                const float pm = partials[((h * parts + p) * g + gi) * (d + 2)];
                if (pm > mx) mx = pm;
            }
            float w[64];
            for (long p = 0; p < parts; p++) {
                const float *part = partials + ((h * parts + p) * g + gi) * (d + 2);
                w[p] = part[1] > 0.0f ? expf(part[0] - mx) : 0.0f;
                total += w[p] * part[1];
            }
            for (long i = 0; i < d; i++) {
                float acc = 0.0f;
                for (long p = 0; p < parts; p++) acc += w[p] * partials[((h * parts + p) * g + gi) * (d + 2) + 2 + i];
                out[(h * g + gi) * d + i] = round_to_bf16(acc / total);
            }
        }
    }
}
