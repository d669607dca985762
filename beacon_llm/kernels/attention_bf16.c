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

#include "bf16.h"
#include "exp_avx512.h"

static inline __m512 bf16x16_to_float(const uint16_t *p) {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i *)p)), 16));
}

/* The sums of four vectors' elements: (sum a, sum b, sum c, sum d), in fewer shuffles than four full reductions. */
static inline __m128 sum4(__m512 a, __m512 b, __m512 c, __m512 d) {
    const __m512 ab = _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b)); /* a0+a2 b0+b2 a1+a3 b1+b3 */
    const __m512 cd = _mm512_add_ps(_mm512_unpacklo_ps(c, d), _mm512_unpackhi_ps(c, d));
    const __m512 abcd = _mm512_add_ps(_mm512_shuffle_ps(ab, cd, 0x44), _mm512_shuffle_ps(ab, cd, 0xEE)); /* a b c d */
    const __m256 half = _mm256_add_ps(_mm512_castps512_ps256(abcd), _mm512_extractf32x8_ps(abcd, 1));
    return _mm_add_ps(_mm256_castps256_ps128(half), _mm256_extractf128_ps(half, 1));
}

/* acc[gi][c] += p[gi][j] * v[j][16c .. 16c + 16) over the n value rows, for GB queries of DV vectors each: every
 * value row is loaded and widened once for the GB queries, and the GB x DV accumulators are independent registers
 * (compile-time sizes), so the multiply-adds do not wait on each other. */
#define VALUES_BLOCK(DV, GB)                                                                                  \
    static void values_##DV##_##GB(const float *p, long n, const uint16_t *v, float *const *acc) {           \
        __m512 a[GB][DV];                                                                                     \
        for (int gi = 0; gi < GB; gi++)                                                                       \
            for (int c = 0; c < DV; c++) a[gi][c] = _mm512_setzero_ps();                                      \
        for (long j = 0; j < n; j++) {                                                                        \
            __m512 vv[DV];                                                                                    \
            for (int c = 0; c < DV; c++) vv[c] = bf16x16_to_float(v + j * 16 * DV + 16 * c);                  \
            for (int gi = 0; gi < GB; gi++) {                                                                 \
                const __m512 w = _mm512_set1_ps(p[gi * n + j]);                                               \
                for (int c = 0; c < DV; c++) a[gi][c] = _mm512_fmadd_ps(w, vv[c], a[gi][c]);                  \
            }                                                                                                 \
        }                                                                                                     \
        for (int gi = 0; gi < GB; gi++)                                                                       \
            for (int c = 0; c < DV; c++) _mm512_storeu_ps(acc[gi] + 16 * c, a[gi][c]);                       \
    }
VALUES_BLOCK(2, 1)
VALUES_BLOCK(2, 2)
VALUES_BLOCK(2, 4)
VALUES_BLOCK(4, 1)
VALUES_BLOCK(4, 2)
VALUES_BLOCK(4, 3)
VALUES_BLOCK(4, 4)
VALUES_BLOCK(8, 1)
VALUES_BLOCK(8, 2)
VALUES_BLOCK(16, 1)

/* The weighted value sums of one part for its G queries: scores holds the G rows of n exponentials; each query's
 * sums go to part + gi * (d + 2) + 2. Queries are taken in blocks that fit the compiled sizes above. */
static void values_sum(const float *scores, long n, const uint16_t *v, long g, long d, float *part) {
    const long dv = d / 16;
    const long block = dv == 2 ? 4 : dv == 4 ? 4 : dv == 8 ? 2 : 1;
    for (long g0 = 0; g0 < g; g0 += block) {
        const long gb = g - g0 < block ? g - g0 : block;
        float *acc[4];
        for (long i = 0; i < gb; i++) acc[i] = part + (g0 + i) * (d + 2) + 2;
        const float *p = scores + g0 * n;
        if (dv == 2 && gb == 4) values_2_4(p, n, v, acc);
        else if (dv == 2 && gb == 3) { values_2_2(p, n, v, acc); values_2_1(p + 2 * n, n, v, acc + 2); }
        else if (dv == 2 && gb == 2) values_2_2(p, n, v, acc);
        else if (dv == 2) values_2_1(p, n, v, acc);
        else if (dv == 4 && gb == 4) values_4_4(p, n, v, acc);
        else if (dv == 4 && gb == 3) values_4_3(p, n, v, acc);
        else if (dv == 4 && gb == 2) values_4_2(p, n, v, acc);
        else if (dv == 4) values_4_1(p, n, v, acc);
        else if (dv == 8 && gb == 2) values_8_2(p, n, v, acc);
        else if (dv == 8) values_8_1(p, n, v, acc);
        else if (dv == 16) values_16_1(p, n, v, acc);
        else { /* other head sizes (multiples of 32 up to 256): one query and 16 floats at a time */
            for (long gi = 0; gi < gb; gi++)
                for (long c = 0; c < d; c += 16) {
                    __m512 a = _mm512_setzero_ps();
                    for (long j = 0; j < n; j++)
                        a = _mm512_fmadd_ps(_mm512_set1_ps(p[gi * n + j]), bf16x16_to_float(v + j * d + c), a);
                    _mm512_storeu_ps(acc[gi] + c, a);
                }
        }
    }
}

/* One part: keys [j0, j1) of head h. scores: (G, j1 - j0) scratch; part: G x (max, sum, acc[D]). */
static void attend_part(const uint16_t *q, const uint16_t *k, const uint16_t *v, long g, long d, long j0, long j1,
                        float scale, float *scores, float *part) {
    const long n = j1 - j0, vecs = d / 32;
    __m512bh qv[16 * 8]; /* G <= 16 query heads, D <= 256 */
    for (long gi = 0; gi < g; gi++)
        for (long c = 0; c < vecs; c++) qv[gi * vecs + c] = (__m512bh)_mm512_loadu_si512(q + gi * d + 32 * c);
    long j = 0;
    for (; j + 4 <= n; j += 4) { /* scores, four keys at a time: each key row loaded once for the G query heads */
        const uint16_t *kr = k + (j0 + j) * d;
        __m512bh kv[4][8];
        for (int r = 0; r < 4; r++)
            for (long c = 0; c < vecs; c++) kv[r][c] = (__m512bh)_mm512_loadu_si512(kr + r * d + 32 * c);
        for (long gi = 0; gi < g; gi++) {
            __m512 a[4];
            for (int r = 0; r < 4; r++) {
                a[r] = _mm512_setzero_ps();
                for (long c = 0; c < vecs; c++) a[r] = _mm512_dpbf16_ps(a[r], kv[r][c], qv[gi * vecs + c]);
            }
            _mm_storeu_ps(scores + gi * n + j, _mm_mul_ps(sum4(a[0], a[1], a[2], a[3]), _mm_set1_ps(scale)));
        }
    }
    for (; j < n; j++) { /* the last keys one at a time */
        const uint16_t *kr = k + (j0 + j) * d;
        for (long gi = 0; gi < g; gi++) {
            __m512 a = _mm512_setzero_ps();
            for (long c = 0; c < vecs; c++)
                a = _mm512_dpbf16_ps(a, (__m512bh)_mm512_loadu_si512(kr + 32 * c), qv[gi * vecs + c]);
            scores[gi * n + j] = _mm512_reduce_add_ps(a) * scale;
        }
    }
    for (long gi = 0; gi < g; gi++) { /* each query's largest score */
        const float *row = scores + gi * n;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        long i = 0;
        for (; i + 16 <= n; i += 16) mx = _mm512_max_ps(mx, _mm512_loadu_ps(row + i));
        float best = _mm512_reduce_max_ps(mx);
        for (; i < n; i++) best = row[i] > best ? row[i] : best;
        part[gi * (d + 2)] = best;
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
    }
    values_sum(scores, n, v + j0 * d, g, d, part);
}
/* q, out: (n_kv, g, d) contiguous. Key j of head h: k + h * head_stride + j * d (likewise v). m >= 1 keys.
 * d: a multiple of 32, at most 256; g at most 16; parts at most 64. work: float scratch of
 * (n_kv * g * m + n_kv * parts * g * (d + 2)). Called by every thread of an OpenMP team; ends with a barrier. */
void beacon_attention_team(const uint16_t *q, const uint16_t *k, const uint16_t *v, long head_stride, long n_kv,
                           long g, long d, long m, long parts, float scale, uint16_t *out, float *work) {
    float *partials = work + n_kv * g * m;
    const long items = n_kv * parts, per = (m + parts - 1) / parts;
#pragma omp for schedule(static)
    for (long it = 0; it < items; it++) {
        const long h = it / parts, p = it % parts;
        const long j0 = p * per < m ? p * per : m, j1 = j0 + per < m ? j0 + per : m;
        float *part = partials + it * g * (d + 2);
        if (j0 >= j1) {
            for (long gi = 0; gi < g; gi++) /* an empty part: weight 0 and zero sums, never read as garbage */
                for (long i = 0; i < d + 2; i++) part[gi * (d + 2) + i] = i == 0 ? -INFINITY : 0.0f;
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
            w[p] = part[1] == 0.0f ? 0.0f : expf(part[0] - mx); /* an empty part weighs nothing; NaN stays NaN */
            total += w[p] * part[1];
        }
        for (long i = 0; i < d; i++) {
            float acc = 0.0f;
            for (long p = 0; p < parts; p++)
                if (w[p] != 0.0f) acc += w[p] * partials[((h * parts + p) * g + gi) * (d + 2) + 2 + i];
            out[(h * g + gi) * d + i] = round_to_bf16(acc / total);
        }
    }
}

/* The same attention on its own team of ``threads``. */
void beacon_decode_attention_bf16(const uint16_t *q, const uint16_t *k, const uint16_t *v, long head_stride,
                                  long n_kv, long g, long d, long m, long parts, float scale, uint16_t *out,
                                  float *work, int threads) {
#pragma omp parallel num_threads(threads)
    beacon_attention_team(q, k, v, head_stride, n_kv, g, d, m, parts, scale, out, work);
}
