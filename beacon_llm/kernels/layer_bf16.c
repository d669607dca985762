/* One decoder layer of the decode step for one token, bf16, in a single call and one OpenMP team.
 *
 * The stock Llama / Mistral / Qwen-2 layer: x = norm1(h); q, k, v = Wqkv x (+ b); RoPE on q and k; k, v written into
 * the memory at the token's row; a = attention(q, memory); h += Wo a; x = norm2(h); h += Wdown(silu(Wgate x) * Wup x).
 * Between the products and the attention only a few thousand elements change, so eager operators spend more time
 * being called than computing; here the elementwise steps run on one thread of the team (``omp single``) between the
 * team's products and attention, with the stock operations' bf16 rounding points: the norm in float32, rounded
 * before its weight multiplies it; RoPE's two products and their sum each rounded; the residual sums, SiLU and its
 * product with up each rounded. Built with matvec_bf16.c and attention_bf16.c by beacon_llm/native_kernels.py.
 */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#include "bf16.h"

void beacon_matvec_team(const uint16_t *const *blocks, const uint16_t *const *biases, const long *rows, int n_blocks,
                        const uint16_t *x, uint16_t *y, long k);
void beacon_attention_team(const uint16_t *q, const uint16_t *k, const uint16_t *v, long head_stride, long n_kv,
                           long g, long d, long m, long parts, float scale, uint16_t *out, float *work);

/* One layer's constant operands (mirrored by a ctypes Structure in native_kernels.py; keep the order). */
typedef struct {
    const uint16_t *norm1, *norm2;                  /* (hidden) RMSNorm weights */
    const uint16_t *qkv[3], *qkv_bias[3];          /* q (n_heads d x hidden), k, v (n_kv d x hidden) */
    long qkv_rows[3];
    const uint16_t *o[1], *o_bias[1];              /* (hidden x n_heads d) */
    long o_rows[1];
    const uint16_t *gate_up[2], *gate_up_bias[2];  /* gate, up (inter x hidden) */
    long gate_up_rows[2];
    const uint16_t *down[1], *down_bias[1];        /* (hidden x inter) */
    long down_rows[1];
    double eps1, eps2, scale;
    long hidden, n_heads, n_kv, head_dim, inter;
} beacon_layer;

/* weight * round_to_bf16(x * rsqrt(mean(x^2) + eps)), as the stock RMSNorm on a bf16 input */
static void rms_norm(const uint16_t *x, const uint16_t *weight, double eps, long n, uint16_t *out) {
    float sum = 0.0f;
    for (long i = 0; i < n; i++) sum += bf16_to_float(x[i]) * bf16_to_float(x[i]);
    const float inv = 1.0f / sqrtf(sum / (float)n + (float)eps);
    for (long i = 0; i < n; i++) out[i] = bf16_mul(weight[i], round_to_bf16(bf16_to_float(x[i]) * inv));
}

/* x * cos + rotate_half(x) * sin for each of the heads' d features, in place, each product and the sum rounded */
static void rope(uint16_t *x, long heads, long d, const uint16_t *cos, const uint16_t *sin) {
    const long half = d / 2;
    uint16_t rotated[256];
    for (long h = 0; h < heads; h++) {
        uint16_t *row = x + h * d;
        for (long i = 0; i < half; i++) rotated[i] = row[i + half] ^ 0x8000u, rotated[i + half] = row[i];
        for (long i = 0; i < d; i++) row[i] = bf16_add(bf16_mul(row[i], cos[i]), bf16_mul(rotated[i], sin[i]));
    }
}

/* hidden (in place), one token through one layer. cos / sin: (d) the token's RoPE factors. k_mem / v_mem: the
 * layer's memory, row j of head h at + h * head_stride + j * d; the token's key and value go to row ``row``; the
 * attention reads rows 0 .. m - 1 (m = row + 1 here) in ``parts`` parts. scratch: bf16, at least
 * 2 hidden + (n_heads + 2 n_kv) d + n_heads d + 3 inter elements; work: float, the attention's scratch. */
void beacon_decode_layer_bf16(const beacon_layer *L, uint16_t *hidden, const uint16_t *cos, const uint16_t *sin,
                              uint16_t *k_mem, uint16_t *v_mem, long head_stride, long row, long m, long parts,
                              uint16_t *scratch, float *work, int threads) {
    const long dm = L->hidden, d = L->head_dim, nq = L->n_heads * d, nk = L->n_kv * d, inter = L->inter;
    uint16_t *x = scratch, *qkv = x + dm, *attn = qkv + nq + 2 * nk, *proj = attn + nq, *gate_up = proj + dm,
             *act = gate_up + 2 * inter;
#pragma omp parallel num_threads(threads)
    {
#pragma omp single
        rms_norm(hidden, L->norm1, L->eps1, dm, x);
        beacon_matvec_team(L->qkv, L->qkv_bias, L->qkv_rows, 3, x, qkv, dm);
#pragma omp barrier
#pragma omp single
        {
            rope(qkv, L->n_heads + L->n_kv, d, cos, sin); /* q heads, then k heads */
            for (long h = 0; h < L->n_kv; h++)
                for (long i = 0; i < d; i++) {
                    k_mem[h * head_stride + row * d + i] = qkv[nq + h * d + i];
                    v_mem[h * head_stride + row * d + i] = qkv[nq + nk + h * d + i];
                }
        }
        beacon_attention_team(qkv, k_mem, v_mem, head_stride, L->n_kv, L->n_heads / L->n_kv, d, m, parts,
                              (float)L->scale, attn, work);
        beacon_matvec_team(L->o, L->o_bias, L->o_rows, 1, attn, proj, nq);
#pragma omp barrier
#pragma omp single
        {
            for (long i = 0; i < dm; i++) hidden[i] = bf16_add(hidden[i], proj[i]);
            rms_norm(hidden, L->norm2, L->eps2, dm, x);
        }
        beacon_matvec_team(L->gate_up, L->gate_up_bias, L->gate_up_rows, 2, x, gate_up, dm);
#pragma omp barrier
#pragma omp single
        for (long i = 0; i < inter; i++) {
            const float g = bf16_to_float(gate_up[i]);
            act[i] = bf16_mul(round_to_bf16(g / (1.0f + expf(-g))), gate_up[inter + i]);
        }
        beacon_matvec_team(L->down, L->down_bias, L->down_rows, 1, act, proj, inter);
#pragma omp barrier
#pragma omp single
        for (long i = 0; i < dm; i++) hidden[i] = bf16_add(hidden[i], proj[i]);
    }
}
