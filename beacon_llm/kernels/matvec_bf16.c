/* The decode step's bf16 matrix-vector product, y = W x (+ b), for CPUs with AVX512-BF16.
 *
 * One token's projections read every weight once, so the product runs at the speed the weights stream from memory.
 * This kernel keeps that stream full: each thread walks a contiguous range of weight rows, four rows at a time,
 * multiplies 32 bf16 pairs per instruction into float32 accumulators (vdpbf16ps) and prefetches the rows it reads
 * next; every output is rounded once to bf16 (round to nearest even) after its bias is added in float32.
 *
 * W may be given as several row blocks (q, k and v; gate and up) read as one matrix without concatenating them.
 * Threads come from the OpenMP runtime already loaded in the process (torch's), so no second thread pool competes
 * for the cores. Built and loaded by beacon_llm/native_kernels.py.
 */
#include <immintrin.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"

#define BLOCK 4          /* weight rows per inner loop: four independent accumulators share each load of x */
#define PREFETCH_ROWS 8  /* the block read after next is prefetched while this one is multiplied */

/* rows [r0, r1) of one block w (rows x k) into y[r0 .. r1) */
static void block_rows(const uint16_t *w, const uint16_t *bias, const uint16_t *x, uint16_t *y, long k, long r0,
                       long r1) {
    const long full = k / 32, rem = k % 32;
    const __mmask32 tail = rem ? (__mmask32)((1u << rem) - 1u) : 0;
    const long row_bytes = k * 2;
    long o = r0;
    for (; o + BLOCK <= r1; o += BLOCK) {
        const char *ahead = (const char *)(w + (o + PREFETCH_ROWS) * k);
        for (long b = 0; b < BLOCK * row_bytes; b += 64) _mm_prefetch(ahead + b, _MM_HINT_T0);
        const uint16_t *w0 = w + o * k, *w1 = w0 + k, *w2 = w1 + k, *w3 = w2 + k;
        __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long c = 0; c < full; c++) {
            const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + 32 * c);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + 32 * c), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_loadu_si512(w1 + 32 * c), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_loadu_si512(w2 + 32 * c), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_loadu_si512(w3 + 32 * c), xv);
        }
        if (rem) {
            const __m512bh xv = (__m512bh)_mm512_maskz_loadu_epi16(tail, x + 32 * full);
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + 32 * full), xv);
            a1 = _mm512_dpbf16_ps(a1, (__m512bh)_mm512_maskz_loadu_epi16(tail, w1 + 32 * full), xv);
            a2 = _mm512_dpbf16_ps(a2, (__m512bh)_mm512_maskz_loadu_epi16(tail, w2 + 32 * full), xv);
            a3 = _mm512_dpbf16_ps(a3, (__m512bh)_mm512_maskz_loadu_epi16(tail, w3 + 32 * full), xv);
        }
        const float s[BLOCK] = {_mm512_reduce_add_ps(a0), _mm512_reduce_add_ps(a1), _mm512_reduce_add_ps(a2),
                                _mm512_reduce_add_ps(a3)};
        for (int j = 0; j < BLOCK; j++) y[o + j] = round_to_bf16(s[j] + (bias ? bf16_to_float(bias[o + j]) : 0.0f));
    }
    for (; o < r1; o++) {
        const uint16_t *w0 = w + o * k;
        __m512 a0 = _mm512_setzero_ps();
        for (long c = 0; c < full; c++)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_loadu_si512(w0 + 32 * c),
                                  (__m512bh)_mm512_loadu_si512(x + 32 * c));
        if (rem)
            a0 = _mm512_dpbf16_ps(a0, (__m512bh)_mm512_maskz_loadu_epi16(tail, w0 + 32 * full),
                                  (__m512bh)_mm512_maskz_loadu_epi16(tail, x + 32 * full));
        y[o] = round_to_bf16(_mm512_reduce_add_ps(a0) + (bias ? bf16_to_float(bias[o]) : 0.0f));
    }
}

/* y (sum of rows) = [W_0; W_1; ...] x (+ [b_0; b_1; ...]): blocks[i] is rows[i] x k, biases[i] may be NULL.
 * Called by every thread of an OpenMP team (each takes its share of whole row blocks); no barrier at the end. */
void beacon_matvec_team(const uint16_t *const *blocks, const uint16_t *const *biases, const long *rows, int n_blocks,
                        const uint16_t *x, uint16_t *y, long k) {
    long total = 0;
    for (int i = 0; i < n_blocks; i++) total += rows[i];
    const long team = omp_get_num_threads(), t = omp_get_thread_num();
    const long share = ((total + team - 1) / team + BLOCK - 1) / BLOCK * BLOCK; /* whole blocks per thread */
    const long lo = t * share, hi = lo + share < total ? lo + share : total;
    long start = 0; /* first global row of block i */
    for (int i = 0; i < n_blocks && lo < hi; start += rows[i], i++) {
        const long a = lo > start ? lo - start : 0, b = hi - start < rows[i] ? hi - start : rows[i];
        if (a < b) block_rows(blocks[i], biases[i], x, y + start, k, a, b);
    }
}

/* The same product on its own team of ``threads``. */
void beacon_matvec_bf16(const uint16_t *const *blocks, const uint16_t *const *biases, const long *rows, int n_blocks,
                        const uint16_t *x, uint16_t *y, long k, int threads) {
#pragma omp parallel num_threads(threads)
    beacon_matvec_team(blocks, biases, rows, n_blocks, x, y, k);
}
