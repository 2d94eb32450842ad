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

/* off[t] = row_of(t) * D for t in [first, len), walking the blocks: no division per token
 * (a 64-bit divide per row lookup, four per token, was most of the kernel's time). */
static inline void fill_offsets(const int64_t* table, int64_t Hkv, int64_t h, int64_t bs,
                                int64_t D, int64_t first, int64_t len, int64_t* off) {
    int64_t blk = first / bs, pos = first % bs;
    int64_t base = (table[blk] * Hkv + h) * bs * D;
    for (int64_t t = first; t < len; t++) {
        off[t] = base + pos * D;
        if (++pos == bs && t + 1 < len) {
            pos = 0;
            base = (table[++blk] * Hkv + h) * bs * D;
        }
    }
}

/* Each of the G score rows (stride apart) over [first, len): exp(score - best[g]) in place,
 * 16 at a time, and total[g] their sum (the softmax's numerators and denominator). */
static inline void exp_scores(float* scores, int64_t stride, int64_t G, int64_t first,
                              int64_t len, const float* best, float* total) {
    for (int64_t g = 0; g < G; g++) {
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
}

/* out[j] = sum of v[j]'s 16 lanes, for 16 vectors at once: pairs of vectors are added
 * lane-interleaved (unpack), then 128-bit chunks are gathered and added (shuffle_f32x4). */
static inline __m512 sum16(const __m512 v[16]) {
    __m512 quad[4];
    for (int i = 0; i < 4; i++) {
        const __m512* w = v + 4 * i;
        const __m512 a = _mm512_add_ps(_mm512_unpacklo_ps(w[0], w[1]), _mm512_unpackhi_ps(w[0], w[1]));
        const __m512 b = _mm512_add_ps(_mm512_unpacklo_ps(w[2], w[3]), _mm512_unpackhi_ps(w[2], w[3]));
        /* per 128-bit chunk: [w0, w1, w2, w3] partial sums over that chunk's 4 lanes */
        const __m512d ad = _mm512_castps_pd(a), bd = _mm512_castps_pd(b);
        quad[i] = _mm512_add_ps(_mm512_castpd_ps(_mm512_unpacklo_pd(ad, bd)),
                                _mm512_castpd_ps(_mm512_unpackhi_pd(ad, bd)));
    }
    /* quad[i] chunk c: tokens 4i..4i+3 summed over lanes 4c..4c+3 */
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(quad[0], quad[1], 0x88),
                                    _mm512_shuffle_f32x4(quad[0], quad[1], 0xDD));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(quad[2], quad[3], 0x88),
                                    _mm512_shuffle_f32x4(quad[2], quad[3], 0xDD));
    return _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
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
        float* scores = (float*)malloc(sizeof(float) * (size_t)(G * stride) +
                                       sizeof(int64_t) * (size_t)stride);
        int64_t* off = (int64_t*)(scores + G * stride);  /* G * stride is even */
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (scores == NULL) continue;
            const int64_t b = task / Hkv, h = task % Hkv, len = seq_lens[b];
            const int64_t first = window > 0 && len > window ? len - window : 0;
            fill_offsets(block_tables + b * max_blocks, Hkv, h, bs, D, first, len, off);
            __m512 qv[MAX_GROUP][16];
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < chunks; c++)
                    qv[g][c] = load_bf16(q + (b * H + h * G + g) * D + 16 * c);
            float best[MAX_GROUP];
            for (int64_t g = 0; g < G; g++) best[g] = -INFINITY;
            /* Scores 16 tokens at a time: each token's 16-lane partial dot products are
             * summed across lanes for all 16 at once (sum16), not one horizontal reduction
             * per token; the next 16 tokens' rows are prefetched meanwhile. */
            for (int64_t t0 = first; t0 < len; t0 += 16) {
                const int64_t n = len - t0 < 16 ? len - t0 : 16;
                for (int64_t j = t0 + 16; j < t0 + 32 && j < len; j++) {
                    const char* next = (const char*)(k_cache + off[j]);
                    for (int64_t line = 0; line < 2 * D; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
                }
                const uint16_t* rows[16];
                for (int64_t j = 0; j < n; j++) rows[j] = k_cache + off[t0 + j];
                const __mmask16 valid = n == 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
                for (int64_t g = 0; g < G; g++) {
                    __m512 acc[16];
                    for (int64_t j = 0; j < 16; j++) {
                        acc[j] = _mm512_setzero_ps();
                        if (j >= n) continue;
                        for (int64_t c = 0; c < chunks; c++)
                            acc[j] = _mm512_fmadd_ps(qv[g][c], load_bf16(rows[j] + 16 * c), acc[j]);
                    }
                    const __m512 s = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
                    _mm512_mask_storeu_ps(scores + g * stride + t0, valid, s);
                    const float m = _mm512_mask_reduce_max_ps(valid, s);
                    best[g] = m > best[g] ? m : best[g];
                }
            }
            float total[MAX_GROUP];
            exp_scores(scores, stride, G, first, len, best, total);
            __m512 acc[MAX_GROUP][16];
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < chunks; c++) acc[g][c] = _mm512_setzero_ps();
            for (int64_t t = first; t < len; t++) {
                if (t + 16 < len) {
                    const char* next = (const char*)(v_cache + off[t + 16]);
                    for (int64_t line = 0; line < 2 * D; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
                }
                const uint16_t* v = v_cache + off[t];
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

/* The same with AVX-512 BF16 (Cooper Lake, Sapphire Rapids and later): a query-key dot
 * product is vdpbf16ps over 32 bf16 pairs per instruction (bf16 products are exact in
 * float32, so only the float32 summation order differs from the kernel above), and a V
 * row is widened to float32 two lanes at a time (even elements by a shift, odd ones by a
 * mask: dimensions are kept as even/odd halves and put back in order at the end) before
 * float32 FMAs with the probabilities. About 2.5x fewer instructions per context token;
 * same arguments, same results up to float32 rounding order. */
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")

static inline __mmask32 chunk_mask(int64_t D, int64_t c) {  /* bf16 lanes of 32-chunk c */
    const int64_t left = D - 32 * c;
    return left >= 32 ? (__mmask32)0xffffffffu : (__mmask32)((1u << left) - 1);
}

/* acc = sum over t in [first, len) of p[t] * V row t, dimensions as even/odd halves
 * (acc[2c] lane i: dimension 32c + 2i, acc[2c + 1]: 32c + 2i + 1). One query head at a
 * time with two tokens in flight (two accumulator sets, added at the end): inlined with a
 * constant `CH` (D / 32 rounded up) the accumulators stay in registers. */
static inline __attribute__((always_inline)) void weigh_values(
    const uint16_t* v_cache, const int64_t* off, const float* p, int64_t first, int64_t len,
    int64_t D, const int64_t CH, __m512* acc) {
    const __m512i high = _mm512_set1_epi32((int)0xffff0000u);
    __m512 a0[16], a1[16];
    for (int64_t c = 0; c < 2 * CH; c++) a0[c] = a1[c] = _mm512_setzero_ps();
    int64_t t = first;
    for (; t + 1 < len; t += 2) {
        const uint16_t* v0 = v_cache + off[t];
        const uint16_t* v1 = v_cache + off[t + 1];
        const __m512 p0 = _mm512_set1_ps(p[t]), p1 = _mm512_set1_ps(p[t + 1]);
        for (int64_t c = 0; c < CH; c++) {
            const __m512i x0 = _mm512_maskz_loadu_epi16(chunk_mask(D, c), v0 + 32 * c);
            const __m512i x1 = _mm512_maskz_loadu_epi16(chunk_mask(D, c), v1 + 32 * c);
            a0[2 * c] = _mm512_fmadd_ps(p0, _mm512_castsi512_ps(_mm512_slli_epi32(x0, 16)), a0[2 * c]);
            a0[2 * c + 1] = _mm512_fmadd_ps(p0, _mm512_castsi512_ps(_mm512_and_si512(x0, high)), a0[2 * c + 1]);
            a1[2 * c] = _mm512_fmadd_ps(p1, _mm512_castsi512_ps(_mm512_slli_epi32(x1, 16)), a1[2 * c]);
            a1[2 * c + 1] = _mm512_fmadd_ps(p1, _mm512_castsi512_ps(_mm512_and_si512(x1, high)), a1[2 * c + 1]);
        }
    }
    if (t < len) {
        const uint16_t* v0 = v_cache + off[t];
        const __m512 p0 = _mm512_set1_ps(p[t]);
        for (int64_t c = 0; c < CH; c++) {
            const __m512i x0 = _mm512_maskz_loadu_epi16(chunk_mask(D, c), v0 + 32 * c);
            a0[2 * c] = _mm512_fmadd_ps(p0, _mm512_castsi512_ps(_mm512_slli_epi32(x0, 16)), a0[2 * c]);
            a0[2 * c + 1] = _mm512_fmadd_ps(p0, _mm512_castsi512_ps(_mm512_and_si512(x0, high)), a0[2 * c + 1]);
        }
    }
    for (int64_t c = 0; c < 2 * CH; c++) acc[c] = _mm512_add_ps(a0[c], a1[c]);
}

/* float32 -> the nearest bfloat16, kept as a float32 (low 16 bits zero); NaN stays NaN. */
static inline __m512 round_bf16(__m512 x) {
    const __m512i u = _mm512_castps_si512(x);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb);
    r = _mm512_mask_or_epi32(r, _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q), u,
                             _mm512_set1_epi32(0x400000));
    return _mm512_castsi512_ps(_mm512_and_si512(r, _mm512_set1_epi32((int)0xffff0000u)));
}

static inline __m512 widen16(const uint16_t* p) { return load_bf16(p); }

static inline void store16_bf16(uint16_t* p, __m512 rounded) {  /* round_bf16's output */
    _mm256_storeu_si256((__m256i*)p,
                        _mm512_cvtepi32_epi16(_mm512_srli_epi32(_mm512_castps_si512(rounded), 16)));
}

/* The rotary embedding and the K/V write of one decode token, before attention reads:
 * the same bf16 roundings as RotaryEmbedding.rotate (cos and sin rounded to bf16, then
 * x * cos and roll(x, D / 2) * signed_sin each rounded, then their sum), so its q and k
 * are bit-identical to the PyTorch path's. */
typedef struct {
    const uint16_t* qkv;       /* [T, >= (H + 2 Hkv) D] q | k | v of each token, pre-rotary */
    int64_t qkv_stride;        /* elements between tokens */
    const int64_t* positions;  /* [T] rows of the tables */
    const float* cos;          /* [positions, D] float32 */
    const float* sin;          /* [positions, D] float32, unsigned (HF's) */
    const int64_t* write_rows; /* [T * Hkv] row of the [slots * Hkv, D] cache view */
    uint16_t* q_out;           /* [T, H, D] rotated queries */
} rope_args;

static void rope_write_token(const rope_args* a, int64_t t, int64_t H, int64_t Hkv, int64_t D,
                             uint16_t* k_cache, uint16_t* v_cache) {
    const int64_t half = D / 2, pos = a->positions[t];
    __m512 cs[16], sn[16];  /* D <= 256 */
    for (int64_t c = 0; c < D / 16; c++) {
        cs[c] = round_bf16(_mm512_loadu_ps(a->cos + pos * D + 16 * c));
        __m512 s = round_bf16(_mm512_loadu_ps(a->sin + pos * D + 16 * c));
        /* rotate_half's sign folded into sin: the first half negated (exact) */
        if (16 * c < half) s = _mm512_castsi512_ps(_mm512_xor_si512(
            _mm512_castps_si512(s), _mm512_set1_epi32((int)0x80000000u)));
        sn[c] = s;
    }
    const uint16_t* row = a->qkv + t * a->qkv_stride;
    for (int64_t j = 0; j < H + Hkv; j++) {
        const uint16_t* x = row + j * D;
        uint16_t rolled[256];  /* roll(x, D / 2): the second half, then the first */
        for (int64_t d = 0; d < half; d++) { rolled[d] = x[d + half]; rolled[d + half] = x[d]; }
        uint16_t* dst = j < H ? a->q_out + (t * H + j) * D
                              : k_cache + a->write_rows[t * Hkv + j - H] * D;
        for (int64_t c = 0; c < D / 16; c++) {
            const __m512 p = round_bf16(_mm512_mul_ps(widen16(x + 16 * c), cs[c]));
            const __m512 r = round_bf16(_mm512_mul_ps(widen16(rolled + 16 * c), sn[c]));
            store16_bf16(dst + 16 * c, round_bf16(_mm512_add_ps(p, r)));
        }
    }
    for (int64_t h = 0; h < Hkv; h++) {
        const uint16_t* v = row + (H + Hkv + h) * D;
        uint16_t* dst = v_cache + a->write_rows[t * Hkv + h] * D;
        for (int64_t d = 0; d < D; d++) dst[d] = v[d];
    }
}

static int decode_dp(const rope_args* rope, const uint16_t* q, uint16_t* k_cache,
                     uint16_t* v_cache, const int64_t* block_tables, int64_t max_blocks,
                     const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv, int64_t D,
                     int64_t bs, float scale, int64_t window, uint16_t* out, int threads) {
    if (Hkv <= 0 || H % Hkv || H / Hkv > MAX_GROUP || D % 16 || D > 256 || bs <= 0) return -1;
    const int64_t G = H / Hkv, chunks = (D + 31) / 32;
    int64_t longest = 1;
    for (int64_t b = 0; b < B; b++) longest = seq_lens[b] > longest ? seq_lens[b] : longest;
    const int64_t stride = (longest + 15) & ~(int64_t)15;
    int failed = 0;

    #pragma omp parallel num_threads(threads)
    {
        float* scores = (float*)malloc(sizeof(float) * (size_t)(G * stride) +
                                       sizeof(int64_t) * (size_t)stride);
        int64_t* off = (int64_t*)(scores + G * stride);  /* G * stride is even */
        if (scores == NULL) {
            #pragma omp atomic write
            failed = 1;
        }
        if (rope != NULL) {  /* every token's K/V written before any task reads */
            #pragma omp for schedule(static)
            for (int64_t t = 0; t < B; t++) rope_write_token(rope, t, H, Hkv, D, k_cache, v_cache);
        }
        #pragma omp for schedule(static)
        for (int64_t task = 0; task < B * Hkv; task++) {
            if (scores == NULL) continue;
            const int64_t b = task / Hkv, h = task % Hkv, len = seq_lens[b];
            const int64_t first = window > 0 && len > window ? len - window : 0;
            fill_offsets(block_tables + b * max_blocks, Hkv, h, bs, D, first, len, off);
            __m512bh qv[MAX_GROUP][8];
            for (int64_t g = 0; g < G; g++)
                for (int64_t c = 0; c < chunks; c++)
                    qv[g][c] = (__m512bh)_mm512_maskz_loadu_epi16(
                        chunk_mask(D, c), q + (b * H + h * G + g) * D + 32 * c);
            float best[MAX_GROUP];
            for (int64_t g = 0; g < G; g++) best[g] = -INFINITY;
            for (int64_t t0 = first; t0 < len; t0 += 16) {
                const int64_t n = len - t0 < 16 ? len - t0 : 16;
                /* K rows 32 tokens ahead; and these tokens' V rows into L2 now, read after
                 * the softmax: the context comes from memory (a layer's KV was last read a
                 * step ago), and two streams in flight read it faster than one. */
                for (int64_t j = t0 + 32; j < t0 + 48 && j < len; j++) {
                    const char* next = (const char*)(k_cache + off[j]);
                    for (int64_t line = 0; line < 2 * D; line += 64) _mm_prefetch(next + line, _MM_HINT_T0);
                }
                for (int64_t j = t0; j < t0 + 16 && j < len; j++) {
                    const char* vrow = (const char*)(v_cache + off[j]);
                    for (int64_t line = 0; line < 2 * D; line += 64) _mm_prefetch(vrow + line, _MM_HINT_T1);
                }
                const uint16_t* rows[16];
                for (int64_t j = 0; j < n; j++) rows[j] = k_cache + off[t0 + j];
                const __mmask16 valid = n == 16 ? (__mmask16)0xffff : (__mmask16)((1u << n) - 1);
                for (int64_t g = 0; g < G; g++) {
                    __m512 acc[16];
                    for (int64_t j = 0; j < 16; j++) {
                        acc[j] = _mm512_setzero_ps();
                        if (j >= n) continue;
                        for (int64_t c = 0; c < chunks; c++)
                            acc[j] = _mm512_dpbf16_ps(
                                acc[j], qv[g][c],
                                (__m512bh)_mm512_maskz_loadu_epi16(chunk_mask(D, c), rows[j] + 32 * c));
                    }
                    const __m512 s = _mm512_mul_ps(sum16(acc), _mm512_set1_ps(scale));
                    _mm512_mask_storeu_ps(scores + g * stride + t0, valid, s);
                    const float m = _mm512_mask_reduce_max_ps(valid, s);
                    best[g] = m > best[g] ? m : best[g];
                }
            }
            float total[MAX_GROUP];
            exp_scores(scores, stride, G, first, len, best, total);
            /* acc[g][2c] lane i: dimension 32c + 2i; acc[g][2c + 1] lane i: 32c + 2i + 1 */
            __m512 acc[MAX_GROUP][16];
            for (int64_t g = 0; g < G; g++) {
                const float* p = scores + g * stride;
                switch (chunks) {  /* constant chunk counts: accumulators in registers */
                    case 2: weigh_values(v_cache, off, p, first, len, D, 2, acc[g]); break;
                    case 4: weigh_values(v_cache, off, p, first, len, D, 4, acc[g]); break;
                    default: weigh_values(v_cache, off, p, first, len, D, chunks, acc[g]); break;
                }
            }
            for (int64_t g = 0; g < G; g++) {
                float even[16], odd[16];
                const __m512 inv = _mm512_set1_ps(1.0f / total[g]);
                uint16_t* o = out + (b * H + h * G + g) * D;
                for (int64_t c = 0; c < chunks; c++) {
                    _mm512_storeu_ps(even, _mm512_mul_ps(acc[g][2 * c], inv));
                    _mm512_storeu_ps(odd, _mm512_mul_ps(acc[g][2 * c + 1], inv));
                    for (int i = 0; i < 16 && 32 * c + 2 * i < D; i++) {
                        o[32 * c + 2 * i] = to_bf16(even[i]);
                        o[32 * c + 2 * i + 1] = to_bf16(odd[i]);
                    }
                }
            }
        }
        free(scores);
    }
    return failed ? -2 : 0;
}

int pinnace_paged_decode_bf16dp(const uint16_t* q, const uint16_t* k_cache,
                                const uint16_t* v_cache, const int64_t* block_tables,
                                int64_t max_blocks, const int64_t* seq_lens, int64_t B,
                                int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale,
                                int64_t window, uint16_t* out, int threads) {
    return decode_dp(NULL, q, (uint16_t*)k_cache, (uint16_t*)v_cache, block_tables, max_blocks,
                     seq_lens, B, H, Hkv, D, bs, scale, window, out, threads);
}

/* One decode layer's attention from the qkv projection on: rotary on q and k, k and v
 * written to the cache rows, then the kernel above, in one parallel region (the PyTorch
 * path is some ten ops, each its own dispatch and parallel region). q_out: [B, H, D]
 * scratch for the rotated queries. D must be a multiple of 32 (rotary halves of whole
 * 16-lane vectors); -1 otherwise. */
int pinnace_rope_decode_bf16dp(const uint16_t* qkv, int64_t qkv_stride, const int64_t* positions,
                               const float* cos, const float* sin, const int64_t* write_rows,
                               uint16_t* q_out, uint16_t* k_cache, uint16_t* v_cache,
                               const int64_t* block_tables, int64_t max_blocks,
                               const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv,
                               int64_t D, int64_t bs, float scale, int64_t window,
                               uint16_t* out, int threads) {
    if (D % 32) return -1;
    const rope_args rope = {qkv, qkv_stride, positions, cos, sin, write_rows, q_out};
    return decode_dp(&rope, q_out, k_cache, v_cache, block_tables, max_blocks, seq_lens, B, H,
                     Hkv, D, bs, scale, window, out, threads);
}

/* Rotary on q and k and the K/V write of every token of a step, without attention: a
 * prefill step's attention runs after (SDPA, or the kernel above with one row per token).
 * The same roundings as pinnace_rope_decode_bf16dp, in one parallel pass over the tokens
 * instead of PyTorch's roll, products, sum and two index copies, each over the whole step.
 * q_out: [T, H, D]. D must be a multiple of 32; -1 otherwise. */
int pinnace_rope_write_bf16(const uint16_t* qkv, int64_t qkv_stride, const int64_t* positions,
                            const float* cos, const float* sin, const int64_t* write_rows,
                            uint16_t* q_out, uint16_t* k_cache, uint16_t* v_cache, int64_t T,
                            int64_t H, int64_t Hkv, int64_t D, int threads) {
    if (D % 32 || D > 256) return -1;
    const rope_args rope = {qkv, qkv_stride, positions, cos, sin, write_rows, q_out};
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t t = 0; t < T; t++) rope_write_token(&rope, t, H, Hkv, D, k_cache, v_cache);
    return 0;
}
#pragma GCC pop_options
