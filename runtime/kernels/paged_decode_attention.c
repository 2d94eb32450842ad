/* Decode attention straight from the paged KV cache, bfloat16, x86-64 with AVX-512.
 *
 * One query token per request. The torch backend first gathers every request's context
 * into a padded [B, Hkv, L, D] copy, then runs two small batched matmuls, a mask and a
 * softmax: at batch 32 the copy alone was 13 % of a decode step. Here each (request, kv
 * head) task reads its blocks where they lie, once for K and once for V, for all the
 * query heads of its group, with scores and softmax in float32.
 *
 * Cache layout (runtime/layers/attention/torch_backend.py): a layer's K (and V) is rows of
 * bs * D values, row (block * Hkv + h) holding head h of a block's bs tokens.
 * A query at position seq_len - 1 sees keys [max(0, seq_len - window), seq_len).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

#define MAX_GROUP 16  /* query heads per kv head handled by one task */

static inline __m512 load_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, NaN stays NaN */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* exp(x) for x <= 0 (softmax inputs minus their max): 2^n * p(r), |rel err| < 2e-7. */
static inline __m512 exp_ps(__m512 x) {
    x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.0f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
    return _mm512_scalef_ps(p, n);
}

/* Returns 0, -1 on bad arguments, -2 when scratch memory could not be allocated. */
int pinnace_paged_decode_bf16(const uint16_t* q, const uint16_t* k_cache,
                              const uint16_t* v_cache, const int64_t* block_tables,
                              int64_t max_blocks, const int64_t* seq_lens, int64_t B,
                              int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale,
                              int64_t window, uint16_t* out, int threads) {
    if (Hkv <= 0 || H % Hkv || H / Hkv > MAX_GROUP || D % 16 || D > 256 || bs <= 0) return -1;
    const int64_t G = H / Hkv, chunks = D / 16;
    int64_t longest = 1;
    for (int64_t b = 0; b < B; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    const int64_t stride = (longest + 15) & ~(int64_t)15;
    int failed = 0;

    #pragma omp parallel num_threads(threads)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)(G * stride));
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (scores == NULL) continue;
            const int64_t b = task / Hkv, h = task % Hkv, len = seq_lens[b];
            const int64_t first = window > 0 && len > window ? len - window : 0;
            const int64_t* table = block_tables + b * max_blocks;
            __m512 qv[MAX_GROUP][16];
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < chunks; c++)
                    qv[g][c] = load_bf16(q + (b * H + h * G + g) * D + 16 * c);
            float best[MAX_GROUP];
            for (int64_t g = 0; g < G; g++) best[g] = -INFINITY;
            for (int64_t t = first; t < len; t++) {
                const uint16_t* k = k_cache + ((table[t / bs] * Hkv + h) * bs + t % bs) * D;
                __m512 kv[16];
                for (int64_t c = 0; c < chunks; c++) kv[c] = load_bf16(k + 16 * c);
                for (int64_t g = 0; g < G; g++) {
                    __m512 acc = _mm512_mul_ps(qv[g][0], kv[0]);
                    for (int64_t c = 1; c < chunks; c++) acc = _mm512_fmadd_ps(qv[g][c], kv[c], acc);
                    const float s = _mm512_reduce_add_ps(acc) * scale;
                    scores[g * stride + t] = s;
                    best[g] = s > best[g] ? s : best[g];
                }
            }
            float total[MAX_GROUP];
            for (int64_t g = 0; g < G; g++) {  /* exp in place, 16 at a time */
                float* row = scores + g * stride;
                __m512 sum = _mm512_setzero_ps();
                const __m512 mx = _mm512_set1_ps(best[g]);
                for (int64_t t = first; t < len; t += 16) {
                    const __mmask16 m = len - t >= 16 ? (__mmask16)0xffff
                                                      : (__mmask16)((1u << (len - t)) - 1);
                    const __m512 e = exp_ps(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, row + t), mx));
                    _mm512_mask_storeu_ps(row + t, m, e);
                    sum = _mm512_add_ps(sum, _mm512_maskz_mov_ps(m, e));
                }
                total[g] = _mm512_reduce_add_ps(sum);
            }
            __m512 acc[MAX_GROUP][16];
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
            for (int64_t t = first; t < len; t++) {
                const uint16_t* v = v_cache + ((table[t / bs] * Hkv + h) * bs + t % bs) * D;
                __m512 vv[16];
                for (int64_t c = 0; c < chunks; c++) vv[c] = load_bf16(v + 16 * c);
                for (int64_t g = 0; g < G; g++) {
                    const __m512 p = _mm512_set1_ps(scores[g * stride + t]);
                    for (int64_t c = 0; c < chunks; c++) acc[g][c] = _mm512_fmadd_ps(p, vv[c], acc[g][c]);
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float lanes[16];
                const float inv = 1.0f / total[g];
                uint16_t* o = out + (b * H + h * G + g) * D;
                for (int64_t c = 0; c < chunks; c++) {
                    _mm512_storeu_ps(lanes, _mm512_mul_ps(acc[g][c], _mm512_set1_ps(inv)));
                    for (int i = 0; i < 16; i++) o[16 * c + i] = to_bf16(lanes[i]);
                }
            }
        }
        free(scores);
    }
    return failed ? -2 : 0;
}
