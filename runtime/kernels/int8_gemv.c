/* INT8 weight-only matmul for decode (a few activation rows), x86-64 with AVX-512 VNNI.
 *
 *   y[m, n] = bf16( scale[n] * sum_k x[m, k] * w[n, k] )     x: bf16 [M, K]   w: int8 [N, K]
 *
 * Why not aten::_weight_int8pack_mm: it converts every weight byte to float and reaches
 * about half of the memory bandwidth a bf16 GEMV gets, so int8 decoded no faster than bf16.
 * Here the weights are never converted. Each activation row becomes a 24-bit fixed-point
 * integer (per-row scale sx = max|x| / (2^23 - 1)), stored as three unsigned byte digits of
 * q + 2^23, and VPDPBUSD multiplies those digits with the raw int8 weights, 64 per
 * instruction. bf16 carries 8 significant bits, so the 24-bit rounding only touches
 * elements 2^16 times smaller than the row's largest; the integer sums are exact, which
 * makes the result as accurate as an fp32-accumulated reference:
 *
 *   sum_k x w ~= sx * (D0 + 2^8 D1 + 2^16 D2 - 2^23 rowsum[n]),  Dj = sum_k digit_j[k] w[n, k]
 *
 * Rows are processed in blocks of 4 (their bytes are contiguous); while one block is
 * computed, the next-but-one is prefetched, which is what turns this from latency-bound
 * into bandwidth-bound on one core. Threads: OpenMP over row blocks (the process shares
 * torch's libgomp, so this uses torch's thread pool).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512vnni")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define ROWS 4          /* weight rows per block */
#define PREFETCH_BLOCKS 2

static inline uint16_t to_bf16(float f) {  /* round to nearest even, NaN stays NaN */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

/* One activation row -> digits d[0..3*Kp) (three planes of Kp bytes, zero-padded past K).
 * Returns the row scale sx, or NAN when the row holds an inf/NaN. */
static float to_digits(const uint16_t* x, int64_t K, int64_t Kp, uint8_t* d) {
    memset(d, 0, (size_t)(3 * Kp));
    __m512 vmax = _mm512_setzero_ps();
    __mmask16 nan = 0;  /* max_ps drops NaNs, so they are tracked on their own */
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        const __m512 v = load_bf16(x + k, m);
        nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
        vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
    }
    const float mx = _mm512_reduce_max_ps(vmax);
    if (nan || !isfinite(mx)) return NAN;
    const float sx = mx > 0.f ? mx / 8388607.f : 1.f;
    const __m512 inv = _mm512_set1_ps(1.f / sx);
    const __m512i lim = _mm512_set1_epi32(8388607), off = _mm512_set1_epi32(8388608);
    const __m512i byte = _mm512_set1_epi32(255);
    for (int64_t k = 0; k < K; k += 16) {
        __mmask16 m = K - k >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (K - k)) - 1);
        __m512i q = _mm512_cvtps_epi32(_mm512_mul_ps(load_bf16(x + k, m), inv));
        q = _mm512_max_epi32(_mm512_min_epi32(q, lim), _mm512_sub_epi32(_mm512_setzero_si512(), lim));
        const __m512i u = _mm512_add_epi32(q, off);
        _mm_mask_storeu_epi8(d + k, m, _mm512_cvtepi32_epi8(_mm512_and_si512(u, byte)));
        _mm_mask_storeu_epi8(d + Kp + k, m,
                             _mm512_cvtepi32_epi8(_mm512_and_si512(_mm512_srli_epi32(u, 8), byte)));
        _mm_mask_storeu_epi8(d + 2 * Kp + k, m, _mm512_cvtepi32_epi8(_mm512_srli_epi32(u, 16)));
    }
    return sx;
}

/* The 12 sums of a block's accumulators at once: lane 4 r + j of the result = the sum of
 * acc[r][j]'s 16 lanes (lanes 4 r + 3 are 0). One transposing tree of unpacks and shuffles
 * costs about 45 instructions where 12 separate horizontal sums cost about 100, a third of
 * the block's work at K = 576 (the kernel runs compute-bound from the L2/L3 caches).
 * Integer sums wrap mod 2^32 in any order, so the result equals the separate sums. */
static inline __m512i pair_sum(__m512i a, __m512i b) {  /* per 128-bit lane: a02 b02 a13 b13 */
    return _mm512_add_epi32(_mm512_unpacklo_epi32(a, b), _mm512_unpackhi_epi32(a, b));
}

static inline __m512i lane_sums(__m512i a, __m512i b) {  /* 128-bit lanes: a0+a1 a2+a3 b0+b1 b2+b3 */
    return _mm512_add_epi32(_mm512_shuffle_i32x4(a, b, 0x88), _mm512_shuffle_i32x4(a, b, 0xdd));
}

static inline __m512i reduce_block(__m512i acc[ROWS][3]) {
    const __m512i zero = _mm512_setzero_si512();
    __m512i u[ROWS];  /* per 128-bit lane: the partial D_0, D_1, D_2, 0 of row r */
    for (int r = 0; r < ROWS; r++) {
        const __m512i p = pair_sum(acc[r][0], acc[r][1]), q = pair_sum(acc[r][2], zero);
        u[r] = _mm512_add_epi32(_mm512_unpacklo_epi64(p, q), _mm512_unpackhi_epi64(p, q));
    }
    return lane_sums(lane_sums(u[0], u[1]), lane_sums(u[2], u[3]));
}

/* Returns 0, or -1 when scratch memory could not be allocated (y untouched). */
int pinnace_int8_gemv_bf16(const uint16_t* x, int64_t M, int64_t K, const int8_t* w,
                           const float* scale, const int32_t* rowsum, int64_t N,
                           uint16_t* y, int threads) {
    const int64_t Kp = (K + 63) & ~(int64_t)63;
    uint8_t* digits = (uint8_t*)aligned_alloc(64, (size_t)(3 * M * Kp));
    float* sx = (float*)malloc(sizeof(float) * (size_t)M);
    if (digits == NULL || sx == NULL) { free(digits); free(sx); return -1; }
    for (int64_t m = 0; m < M; m++) sx[m] = to_digits(x + m * K, K, Kp, digits + 3 * m * Kp);
    const __mmask64 tail = (K & 63) ? (((__mmask64)1 << (K & 63)) - 1) : ~(__mmask64)0;
    const int64_t blocks = (N + ROWS - 1) / ROWS;

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const int64_t ahead = n0 + ROWS * PREFETCH_BLOCKS;
        for (int64_t m = 0; m < M; m++) {
            const uint8_t* d = digits + 3 * m * Kp;
            __m512i acc[ROWS][3];
            for (int r = 0; r < ROWS; r++)
                for (int j = 0; j < 3; j++) acc[r][j] = _mm512_setzero_si512();
            for (int64_t k = 0; k < K; k += 64) {
                if (m == 0 && ahead < N) {  /* the block's 4 rows are 4 * K contiguous bytes */
                    const char* p = (const char*)(w + ahead * K) + ROWS * k;
                    for (int i = 0; i < ROWS; i++) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
                }
                const __mmask64 mask = k + 64 <= K ? ~(__mmask64)0 : tail;
                const __m512i d0 = _mm512_load_si512(d + k);
                const __m512i d1 = _mm512_load_si512(d + Kp + k);
                const __m512i d2 = _mm512_load_si512(d + 2 * Kp + k);
                for (int r = 0; r < ROWS; r++) {
                    if (r >= rows) break;
                    const __m512i wv = _mm512_maskz_loadu_epi8(mask, w + (n0 + r) * K + k);
                    acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], d0, wv);
                    acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], d1, wv);
                    acc[r][2] = _mm512_dpbusd_epi32(acc[r][2], d2, wv);
                }
            }
            int32_t tot[16];  /* tot[4 r + j] = D_j of row n0 + r */
            _mm512_storeu_si512(tot, reduce_block(acc));
            for (int r = 0; r < rows; r++) {
                const int64_t n = n0 + r;
                const int64_t t = (int64_t)tot[4 * r] + ((int64_t)tot[4 * r + 1] << 8)
                                + ((int64_t)tot[4 * r + 2] << 16) - ((int64_t)rowsum[n] << 23);
                y[m * N + n] = to_bf16((float)((double)t * sx[m]) * scale[n]);
            }
        }
    }
    free(sx);
    free(digits);
    return 0;
}
