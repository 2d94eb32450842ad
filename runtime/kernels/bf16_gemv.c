/* bfloat16 matmul for decode (1-8 activation rows), x86-64 with AVX-512 BF16.
 *
 *   y[m, n] = bf16( sum_k x[m, k] * w[n, k] + bias[n] )   x: bf16 [M, K]   w: bf16 [N, K]
 *
 * Why not oneDNN: at a handful of rows a linear layer only streams its weights once, and
 * the time is the memory read; oneDNN's bf16 GEMM reaches about 0.5 of the read bandwidth
 * there. Here VDPBF16PS multiplies 32 weights with 32 activations per instruction straight
 * from the weight rows as nn.Linear stores them (no packed copy), with float32 sums.
 *
 * Rounding: each VDPBF16PS adds two exact bf16 products to a float32 lane (denormal inputs
 * read as zero), 16 lanes per row, summed at the end; oneDNN sums in another order, so
 * results differ from F.linear by float32 rounding (not bf16's), then both round to bf16.
 *
 * Weight rows are processed in blocks of 4 (4 * K contiguous elements); while one block is
 * computed, the one PREFETCH_BLOCKS ahead is prefetched, which keeps the loads streaming
 * on one core. Activation rows go 4 at a time over a block, so more than 4 rows reread
 * the block from L1. Threads: OpenMP over row blocks, statically (each thread one
 * contiguous range of the weights); the process shares torch's libgomp and thread pool.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>
#include <stdint.h>

#define ROWS 4          /* weight rows per block */
#define MGROUP 4        /* activation rows per pass over a block */
#define PREFETCH_BLOCKS 2

static inline uint16_t to_bf16(float f) {  /* round to nearest even, NaN stays NaN */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

static inline float from_bf16(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

/* The sums of a, b, c and d's 16 lanes, as lanes 0-3. */
static inline __m128 reduce4(__m512 a, __m512 b, __m512 c, __m512 d) {
    /* 128-bit quarters: ab = [a0+a2, a1+a3, b0+b2, b1+b3], likewise cd */
    const __m512 ab = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
    const __m512 cd = _mm512_add_ps(_mm512_shuffle_f32x4(c, d, 0x44), _mm512_shuffle_f32x4(c, d, 0xEE));
    /* quarters [a, b, c, d], each 4 partial sums */
    __m512 t = _mm512_add_ps(_mm512_shuffle_f32x4(ab, cd, 0x88), _mm512_shuffle_f32x4(ab, cd, 0xDD));
    t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0x4E));
    t = _mm512_add_ps(t, _mm512_shuffle_ps(t, t, 0xB1));  /* every lane of a quarter: its sum */
    return _mm512_castps512_ps128(
        _mm512_permutexvar_ps(_mm512_set_epi32(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 12, 8, 4, 0), t));
}

static inline __m128 load4_bf16(const uint16_t* p) {
    return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64((const __m128i*)p)), 16));
}

/* R (<= ROWS) weight rows from n0 against activation rows m0 .. m0 + MG - 1. R and MG are
 * compile-time constants at every call, so the loops unroll into registers. */
static inline __attribute__((always_inline)) void block(
    const uint16_t* x, int64_t m0, int MG, int64_t K, const uint16_t* w, int64_t n0, int R,
    const uint16_t* bias, int64_t N, uint16_t* y, const char* prefetch, __mmask32 tail) {
    __m512 acc[ROWS][MGROUP];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < MG; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        if (prefetch != NULL) {  /* a block's rows are ROWS * K contiguous elements */
            const char* p = prefetch + 2 * ROWS * k;
            for (int i = 0; i < ROWS; i++) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
        }
        const __mmask32 mask = k + 32 <= K ? ~(__mmask32)0 : tail;
        __m512bh xv[MGROUP];
        for (int j = 0; j < MG; j++)
            xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m0 + j) * K + k);
        for (int r = 0; r < R; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n0 + r) * K + k);
            for (int j = 0; j < MG; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
        }
    }
    if (R == ROWS) {  /* 4 outputs per activation row at once, stored as one 8-byte run */
        const __m128 b = bias != NULL ? load4_bf16(bias + n0) : _mm_setzero_ps();
        for (int j = 0; j < MG; j++) {
            const __m128 v = _mm_add_ps(reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]), b);
            _mm_storel_epi64((__m128i*)(y + (m0 + j) * N + n0), (__m128i)_mm_cvtneps_pbh(v));
        }
        return;
    }
    for (int r = 0; r < R; r++) {
        const float b = bias != NULL ? from_bf16(bias[n0 + r]) : 0.f;
        for (int j = 0; j < MG; j++)
            y[(m0 + j) * N + n0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r][j]) + b);
    }
}

#define BLOCK(MG)                                                                   \
    do {                                                                            \
        if (rows == ROWS) {                                                         \
            block(x, m0, MG, K, w, n0, ROWS, bias, N, y, p, tail);                  \
        } else {                                                                    \
            for (int64_t r = 0; r < rows; r++)                                      \
                block(x, m0, MG, K, w, n0 + r, 1, bias, N, y, NULL, tail);          \
        }                                                                           \
    } while (0)

/* bias may be NULL. */
void pinnace_bf16_gemv(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                       const uint16_t* bias, int64_t N, uint16_t* y, int threads) {
    const __mmask32 tail = (K & 31) ? (((__mmask32)1 << (K & 31)) - 1) : ~(__mmask32)0;
    const int64_t blocks = (N + ROWS - 1) / ROWS;

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const int64_t ahead = n0 + ROWS * PREFETCH_BLOCKS;
        const char* prefetch = ahead < N ? (const char*)(w + ahead * K) : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MGROUP) {
            const char* p = m0 == 0 ? prefetch : NULL;
            switch (M - m0 < MGROUP ? M - m0 : MGROUP) {
                case 1: BLOCK(1); break;
                case 2: BLOCK(2); break;
                case 3: BLOCK(3); break;
                default: BLOCK(4); break;
            }
        }
    }
}

/* Sum of n float32 values (n a multiple of 64, 64-byte aligned), read once: a memory
 * bandwidth probe with the kernel's load pattern (streaming vector loads prefetched
 * ahead, one contiguous range per OpenMP thread). */
float pinnace_read_sum(const float* a, int64_t n, int threads) {
    float total = 0.f;
    #pragma omp parallel num_threads(threads) reduction(+ : total)
    {
        __m512 s0 = _mm512_setzero_ps(), s1 = s0, s2 = s0, s3 = s0;
        #pragma omp for schedule(static)
        for (int64_t i = 0; i < n; i += 64) {
            const float* p = a + i;
            _mm_prefetch((const char*)p + 64 * 64, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 64 * 65, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 64 * 66, _MM_HINT_T0);
            _mm_prefetch((const char*)p + 64 * 67, _MM_HINT_T0);
            s0 = _mm512_add_ps(s0, _mm512_load_ps(p));
            s1 = _mm512_add_ps(s1, _mm512_load_ps(p + 16));
            s2 = _mm512_add_ps(s2, _mm512_load_ps(p + 32));
            s3 = _mm512_add_ps(s3, _mm512_load_ps(p + 48));
        }
        total += _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(s0, s1), _mm512_add_ps(s2, s3)));
    }
    return total;
}
