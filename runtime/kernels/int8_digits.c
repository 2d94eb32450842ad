/* Activations for an int8 x int8 GEMM at prefill / large-batch row counts (W8A8 with two
 * activation digits), x86-64 with AVX-512.
 *
 * One int8 digit per activation (plain per-token W8A8) costs SmolLM2-135M +3 % perplexity:
 * the RMSNorm outputs feeding q/k/v, gate/up and the head carry outlier channels that leave
 * the other channels a few levels of a per-row scale. Two digits keep ~15 bits per row:
 *
 *   x[m, k] / s[m] ~= hi[m, k] + lo[m, k] / 254       s[m] = max_k |x[m, k]| / 127
 *   hi = round(x / s) in [-127, 127],   lo = round((x / s - hi) * 254) in [-127, 127]
 *
 * and both digit rows go through ONE oneDNN int8 GEMM as 2M rows (the weights are read
 * once for both); `combine` folds the two halves of its float32 output back:
 *
 *   y[m, n] = bf16( s[m] * (acc[m, n] + acc[M + m, n] / 254) )
 *
 * where acc = digits @ codes^T * w_scale[n] (oneDNN applies the weight scale). A row holding
 * an inf/NaN gets scale NaN and zero digits, so its outputs are NaN.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m512 load_bf16(const uint16_t* p, __mmask16 mask) {
    __m256i h = _mm256_maskz_loadu_epi16(mask, p);
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

static inline __mmask16 tail16(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

/* x bf16 [M, K] -> digits int8 [2M, K] (hi rows, then lo rows) and scale float32 [M]. */
void pinnace_int8_digits_bf16(const uint16_t* x, int64_t M, int64_t K, int8_t* digits,
                              float* scale, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (M * K >= 65536)
    for (int64_t m = 0; m < M; m++) {
        const uint16_t* row = x + m * K;
        int8_t* hi = digits + m * K;
        int8_t* lo = digits + (M + m) * K;
        __m512 vmax = _mm512_setzero_ps();
        __mmask16 nan = 0;  /* max_ps drops NaNs, so they are tracked on their own */
        for (int64_t k = 0; k < K; k += 16) {
            const __m512 v = load_bf16(row + k, tail16(K - k));
            nan |= _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
            vmax = _mm512_max_ps(vmax, _mm512_abs_ps(v));
        }
        const float mx = _mm512_reduce_max_ps(vmax);
        if (nan || !isfinite(mx)) {
            scale[m] = NAN;
            for (int64_t k = 0; k < K; k++) hi[k] = lo[k] = 0;
            continue;
        }
        const float s = mx > 0.f ? mx / 127.f : 1.f;
        scale[m] = s;
        const __m512 inv = _mm512_set1_ps(1.f / s), lo_mul = _mm512_set1_ps(254.f);
        const __m512 lim = _mm512_set1_ps(127.f), nlim = _mm512_set1_ps(-127.f);
        for (int64_t k = 0; k < K; k += 16) {
            const __mmask16 mask = tail16(K - k);
            const __m512 v = _mm512_mul_ps(load_bf16(row + k, mask), inv);
            /* round to nearest even, as torch.round; |v| <= 127 up to float rounding */
            __m512 h = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            h = _mm512_max_ps(_mm512_min_ps(h, lim), nlim);
            __m512 l = _mm512_roundscale_ps(_mm512_mul_ps(_mm512_sub_ps(v, h), lo_mul),
                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            l = _mm512_max_ps(_mm512_min_ps(l, lim), nlim);
            _mm_mask_storeu_epi8(hi + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(h)));
            _mm_mask_storeu_epi8(lo + k, mask, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(l)));
        }
    }
}

/* acc float32 [2M, N] (hi rows, then lo rows), scale [M] -> y bf16 [M, N]. */
void pinnace_int8_digits_combine(const float* acc, int64_t M, int64_t N, const float* scale,
                                 uint16_t* y, int threads) {
    const int64_t chunk = 1024, chunks = (N + chunk - 1) / chunk;
    #pragma omp parallel for num_threads(threads) schedule(static) collapse(2) if (M * N >= 65536)
    for (int64_t m = 0; m < M; m++) {
        for (int64_t c = 0; c < chunks; c++) {
            const float* a = acc + m * N;
            const float* b = acc + (M + m) * N;
            uint16_t* out = y + m * N;
            const __m512 s = _mm512_set1_ps(scale[m]), inv = _mm512_set1_ps(1.f / 254.f);
            const int64_t end = (c + 1) * chunk < N ? (c + 1) * chunk : N;
            for (int64_t n = c * chunk; n < end; n += 16) {
                const __mmask16 mask = tail16(end - n);
                const __m512 hi = _mm512_maskz_loadu_ps(mask, a + n);
                const __m512 lo = _mm512_maskz_loadu_ps(mask, b + n);
                const __m512 v = _mm512_mul_ps(_mm512_fmadd_ps(lo, inv, hi), s);
                /* float -> bf16, round to nearest even; NaN stays NaN (quiet bit set) */
                const __m512i u = _mm512_castps_si512(v);
                const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
                __m512i r = _mm512_srli_epi32(
                    _mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), odd), 16);
                const __mmask16 isnan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
                r = _mm512_mask_mov_epi32(
                    r, isnan, _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40)));
                _mm256_mask_storeu_epi16(out + n, mask, _mm512_cvtepi32_epi16(r));
            }
        }
    }
}
