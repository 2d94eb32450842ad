/* RMSNorm for bfloat16 rows, HF's arithmetic in one call (x86-64, AVX-512).
 *
 *   out = bf16( w * bf16( x * 1 / sqrt(mean(x^2) + eps) ) )     (the inner part in float32)
 *
 * In PyTorch this is eight small ops (cast, pow, mean, add, rsqrt, mul, cast, mul); at
 * batch 1 each layer's two norms cost more in dispatch than in arithmetic.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>

static inline __m512 load_bf16(const uint16_t* p, __mmask16 m) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}

/* Round to nearest even (NaN kept NaN), 16 lanes -> 16 bf16 stored under mask. */
static inline void store_bf16(uint16_t* p, __m512 v, __mmask16 m) {
    const __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
    r = _mm512_mask_or_epi32(r, nan, _mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
    _mm256_mask_storeu_epi16(p, m, _mm512_cvtepi32_epi16(r));
}

static inline __mmask16 tail(int64_t left) {
    return left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1);
}

void pinnace_rms_norm_bf16(const uint16_t* x, const uint16_t* w, int64_t rows, int64_t cols,
                           float eps, uint16_t* out, int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (rows >= 64)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t* xr = x + r * cols;
        uint16_t* o = out + r * cols;
        __m512 sq = _mm512_setzero_ps();
        for (int64_t c = 0; c < cols; c += 16) {
            const __m512 v = load_bf16(xr + c, tail(cols - c));
            sq = _mm512_fmadd_ps(v, v, sq);
        }
        const float inv = 1.0f / sqrtf(_mm512_reduce_add_ps(sq) / (float)cols + eps);
        const __m512 vinv = _mm512_set1_ps(inv);
        for (int64_t c = 0; c < cols; c += 16) {
            const __mmask16 m = tail(cols - c);
            /* bf16 rounding of the normalised value first, as HF casts before the weight */
            uint16_t tmp[16];
            store_bf16(tmp, _mm512_mul_ps(load_bf16(xr + c, m), vinv), 0xffff);
            store_bf16(o + c, _mm512_mul_ps(load_bf16(tmp, 0xffff), load_bf16(w + c, m)), m);
        }
    }
}
