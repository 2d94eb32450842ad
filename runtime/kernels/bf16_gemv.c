/* bfloat16 matmul for decode (1-8 activation rows; 2-64 with AMX), x86-64 with AVX-512 BF16.
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
 * Weight rows are processed in blocks (BR * K contiguous elements); while one block is
 * computed, the rows PREFETCH_ROWS ahead are prefetched, which keeps the loads streaming
 * on one core. Each weight vector loaded is multiplied with every activation row of the
 * pass before the next is loaded, so a row costs one VDPBF16PS per 64 weight bytes, not
 * another pass over memory: up to 4 rows, blocks of 4 weight rows (16 accumulators);
 * 5-8 rows, blocks of 2 weight rows with all rows in one pass (up to 16 accumulators,
 * 8 activation vectors, 2 weight vectors: 26 of the 32 registers); more than 8 rows go 4
 * at a time over blocks of 4, rereading each block from L1. Threads: OpenMP over row
 * blocks, statically (each thread one contiguous range of the weights); the process
 * shares torch's libgomp and thread pool.
 *
 * With AMX (pinnace_bf16_gemv_use_amx(1) returned 1), 2-16 rows and K a multiple of 32
 * take TDPBF16PS instead, whose cost per weight byte does not grow with the rows: the
 * weights are tile A as stored (16 rows of 32 elements, stride K), the activations tile B
 * in the pair-interleaved layout TDPBF16PS wants (copied once per call, M * K elements),
 * and the 16 x M float32 sums tile C, so y^T = W x^T needs no packed copy of the weights.
 * 17-32 rows: two B tiles (rows 0-15 and the rest) and two C tiles per weight tile, so
 * each weight tile is still loaded once for every row; with 2 A tiles that is all 8 tiles,
 * and a block is 2 weight tiles (4 with 16 rows or fewer, one B tile). 33-64 rows: the
 * 17-32 arrangement twice over each block (see "Past 32 activation rows" below).
 * Sums are float32 in the unit's own order (denormal inputs read as zero), like above.
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16,amx-tile,amx-bf16")
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <unistd.h>

#define ROWS 4          /* weight rows per block up to 4 and past 8 activation rows */
#define WIDE_ROWS 2     /* weight rows per block for 5-8 activation rows */
#define MGROUP 4        /* activation rows per pass over a block past 8 rows */
#define WIDE_MAX 8      /* the most activation rows one pass takes */
#define PREFETCH_ROWS 8
#ifndef AMX_MIN
#define AMX_MIN 2       /* the fewest activation rows that take AMX where enabled */
#endif

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

/* R (<= BR) weight rows from n0 against activation rows m0 .. m0 + MG - 1, where the
 * block's BR rows are BR * K contiguous elements (prefetch: the same span PREFETCH_ROWS
 * rows ahead, or NULL). R, BR and MG are compile-time constants at every call, so the
 * loops unroll into registers. */
static inline __attribute__((always_inline)) void block(
    const uint16_t* x, int64_t m0, int MG, int64_t K, const uint16_t* w, int64_t n0, int R,
    int BR, const uint16_t* bias, int64_t N, uint16_t* y, const char* prefetch,
    __mmask32 tail) {
    __m512 acc[ROWS][WIDE_MAX];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < MG; j++) acc[r][j] = _mm512_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
        if (prefetch != NULL) {  /* BR rows' next 32 elements: BR cache lines of the span */
            const char* p = prefetch + 2 * BR * k;
            for (int i = 0; i < BR; i++) _mm_prefetch(p + 64 * i, _MM_HINT_T0);
        }
        const __mmask32 mask = k + 32 <= K ? ~(__mmask32)0 : tail;
        __m512bh xv[WIDE_MAX];
        for (int j = 0; j < MG; j++)
            xv[j] = (__m512bh)_mm512_maskz_loadu_epi16(mask, x + (m0 + j) * K + k);
        for (int r = 0; r < R; r++) {
            const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, w + (n0 + r) * K + k);
            for (int j = 0; j < MG; j++) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], wv, xv[j]);
        }
    }
    if (R == 4) {  /* 4 outputs per activation row at once, stored as one 8-byte run */
        const __m128 b = bias != NULL ? load4_bf16(bias + n0) : _mm_setzero_ps();
        for (int j = 0; j < MG; j++) {
            const __m128 v = _mm_add_ps(reduce4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]), b);
            _mm_storel_epi64((__m128i*)(y + (m0 + j) * N + n0), (__m128i)_mm_cvtneps_pbh(v));
        }
        return;
    }
    if (R == 2) {  /* two activation rows' 2 outputs at once, each stored as a 4-byte run */
        __m128 b = _mm_setzero_ps();
        if (bias != NULL) {
            const float b0 = from_bf16(bias[n0]), b1 = from_bf16(bias[n0 + 1]);
            b = _mm_setr_ps(b0, b1, b0, b1);
        }
        for (int j = 0; j < MG; j += 2) {
            const int j1 = j + 1 < MG ? j + 1 : j;  /* an odd last row pairs with itself */
            const __m128 v =
                _mm_add_ps(reduce4(acc[0][j], acc[1][j], acc[0][j1], acc[1][j1]), b);
            const __m128i h = (__m128i)_mm_cvtneps_pbh(v);
            _mm_storeu_si32(y + (m0 + j) * N + n0, h);
            if (j + 1 < MG) _mm_storeu_si32(y + (m0 + j1) * N + n0, _mm_srli_si128(h, 4));
        }
        return;
    }
    for (int r = 0; r < R; r++) {
        const float b = bias != NULL ? from_bf16(bias[n0 + r]) : 0.f;
        for (int j = 0; j < MG; j++)
            y[(m0 + j) * N + n0 + r] = to_bf16(_mm512_reduce_add_ps(acc[r][j]) + b);
    }
}

/* ---- AMX ---------------------------------------------------------------------------- */

#define AMX_ROWS 16     /* weight rows per tile */
#define AMX_TILES 4     /* C tiles per block: 64 weight rows */
#define AMX_COLS 16     /* activation rows per B and C tile (16 x 4-byte columns) */
#define AMX_MAX 64      /* the most activation rows: two passes of 32 (below) */
#define AMX_PASS 32     /* activation rows per pass past 16: two B tiles, two C tiles */
#define AMX_TILES_2 2   /* weight tiles per block past AMX_COLS rows: 4 C tiles, 2 A, 2 B */
#define AMX_STACK_X 16384  /* activation elements copied on the stack; more: the heap */
#define ARCH_REQ_XCOMP_PERM 0x1023
#define XFEATURE_XTILEDATA 18

static int amx_enabled = 0;

/* on != 0: asks Linux for the AMX tile state (a process needs it before its first tile
 * instruction) and uses the AMX path when granted; 0: the AVX-512 path only. Returns
 * whether the AMX path is now used. */
int pinnace_bf16_gemv_use_amx(int on) {
    amx_enabled = on && syscall(SYS_arch_prctl, ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA) == 0;
    return amx_enabled;
}

typedef struct {
    uint8_t palette, start_row, reserved[14];
    uint16_t colsb[16];
    uint8_t rows[16];
} __attribute__((aligned(64))) TileConfig;

/* Up to 16 rows: tiles 0-3 C (16 weight rows x M float32 sums), 4-5 A (16 weight rows x
 * 32 elements), 6 B (16 element pairs x M rows). 17-32 rows: B 6 takes rows 0-15 and B 7
 * rows 16 .. M - 1; weight tile 4 sums into C 0 (rows 0-15) and 1 (the rest), 5 into 2, 3.
 * Past 32 rows the same, every B and C tile 16 rows wide (the activations padded). */
static void amx_configure(int64_t M) {
    TileConfig c = {0};
    c.palette = 1;
    const int64_t cols = M <= AMX_PASS ? M : AMX_PASS;
    const int64_t lo = cols <= AMX_COLS ? cols : AMX_COLS, hi = cols - lo;
    for (int t = 0; t < 8; t++) {
        c.rows[t] = 16;
        c.colsb[t] = (uint16_t)(t == 4 || t == 5 ? 64 : 4 * ((t & 1) && t != 6 && hi ? hi : lo));
    }
    if (!hi) c.rows[7] = 0, c.colsb[7] = 0;
    _tile_loadconfig(&c);
}

/* Sums (tile C stored as [16][ld] float32, ld >= M) + bias -> y[m, n0 .. n0 + 15], bf16:
 * per activation row one gather of its column, one rounding (nearest even), a 32-byte store. */
static inline void amx_write(const float* c, int64_t ld, int64_t M, const uint16_t* bias,
                             int64_t N, int64_t n0, uint16_t* y) {
    const __m512 b = bias != NULL ? _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)(bias + n0))), 16))
                                  : _mm512_setzero_ps();
    const __m512i rows = _mm512_mullo_epi32(
        _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15),
        _mm512_set1_epi32((int)ld));
    for (int64_t m = 0; m < M; m++) {
        const __m512 v = _mm512_add_ps(_mm512_i32gather_ps(rows, c + m, 4), b);
        _mm256_storeu_si256((__m256i*)(y + m * N + n0), (__m256i)_mm512_cvtneps_pbh(v));
    }
}

/* T (1 or AMX_TILES) tiles of 16 weight rows from n0; xp: the pair-interleaved
 * activations [K / 2][M][2]; prefetch: the next block's span or NULL. */
static inline __attribute__((always_inline)) void amx_block(
    const uint16_t* xp, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int T,
    const uint16_t* bias, int64_t N, uint16_t* y, const char* prefetch) {
    const int64_t stride = 2 * K;
    const uint16_t* a = w + n0 * K;
    _tile_zero(0);
    if (T > 1) { _tile_zero(1); _tile_zero(2); _tile_zero(3); }
    for (int64_t k = 0; k < K; k += 32) {
        if (prefetch != NULL) {  /* the next block's T * 16 lines per step of 32 elements */
            const char* p = prefetch + 2 * AMX_ROWS * T * k;
            for (int i = 0; i < AMX_ROWS * T; i++) _mm_prefetch(p + 64 * i, _MM_HINT_T1);
        }
        _tile_loadd(6, xp + k * M, 4 * M);
        _tile_loadd(4, a + k, stride);
        _tile_dpbf16ps(0, 4, 6);
        if (T > 1) {
            _tile_loadd(5, a + AMX_ROWS * K + k, stride);
            _tile_dpbf16ps(1, 5, 6);
            _tile_loadd(4, a + 2 * AMX_ROWS * K + k, stride);
            _tile_dpbf16ps(2, 4, 6);
            _tile_loadd(5, a + 3 * AMX_ROWS * K + k, stride);
            _tile_dpbf16ps(3, 5, 6);
        }
    }
    float c[AMX_TILES][AMX_ROWS * AMX_COLS];
    _tile_stored(0, c[0], 4 * M);
    if (T > 1) {
        _tile_stored(1, c[1], 4 * M);
        _tile_stored(2, c[2], 4 * M);
        _tile_stored(3, c[3], 4 * M);
    }
    for (int t = 0; t < T; t++) amx_write(c[t], M, M, bias, N, n0 + t * AMX_ROWS, y);
}

/* Past 32 activation rows, four C tiles hold 16 weight rows x 64 activation rows, which
 * leaves one A tile: each step would load 4 B tiles per weight tile (5 loads per 4
 * products; the loads, not the products or memory, then set the pace). Instead a block of
 * 2 weight tiles takes two passes of the 17-32 row arrangement (one load per product):
 * rows 0-31 with the weights from memory, then the rest with the same 32 weight rows again
 * from L1/L2 (2 * 16 * K * 2 bytes), so memory still sees each weight byte once per call.
 * There the activations are padded with zero rows to 48 or 64, so every tile is 16 x 64
 * bytes. The kernel alone, 1 thread, 49152 x 576, best of 9 alternating runs, GB/s at
 * 33/48/64 rows: 5 loads per 4 products 12.2/11.7/9.2, two passes 14.1/14.0/12.0. */

/* One pass: T (1 or AMX_TILES_2) weight tiles from a against H (1 or 2) B tiles of
 * activation rows from g0, each loaded once per step and multiplied with each other (C
 * 2t + h); the sums go to c[t] ([16][ld] float32) from column g0. xp: [K / 2][ld][2]. */
static inline __attribute__((always_inline)) void amx_pass(
    const uint16_t* xp, int64_t ld, int64_t g0, int H, int64_t K, const uint16_t* a, int T,
    float (*c)[AMX_ROWS * AMX_MAX], const char* prefetch) {
    const int64_t stride = 2 * K;
    _tile_zero(0); _tile_zero(1); _tile_zero(2); _tile_zero(3);
    for (int64_t k = 0; k < K; k += 32) {
        if (prefetch != NULL) {
            const char* p = prefetch + 2 * AMX_ROWS * T * k;
            for (int i = 0; i < AMX_ROWS * T; i++) _mm_prefetch(p + 64 * i, _MM_HINT_T1);
        }
        _tile_loadd(6, xp + k * ld + 2 * g0, 4 * ld);
        if (H > 1) _tile_loadd(7, xp + k * ld + 2 * (g0 + AMX_COLS), 4 * ld);
        _tile_loadd(4, a + k, stride);
        _tile_dpbf16ps(0, 4, 6);
        if (H > 1) _tile_dpbf16ps(1, 4, 7);
        if (T > 1) {
            _tile_loadd(5, a + AMX_ROWS * K + k, stride);
            _tile_dpbf16ps(2, 5, 6);
            if (H > 1) _tile_dpbf16ps(3, 5, 7);
        }
    }
    _tile_stored(0, c[0] + g0, 4 * ld);
    if (H > 1) _tile_stored(1, c[0] + g0 + AMX_COLS, 4 * ld);
    if (T > 1) {
        _tile_stored(2, c[1] + g0, 4 * ld);
        if (H > 1) _tile_stored(3, c[1] + g0 + AMX_COLS, 4 * ld);
    }
}

/* 17-64 activation rows: T tiles of 16 weight rows from n0 against G (2, 3 or 4) groups of
 * 16 activation rows (the last of 2 may be narrower), xp: [K / 2][ld][2]. */
static inline __attribute__((always_inline)) void amx_block_2(
    const uint16_t* xp, int64_t M, int64_t ld, int G, int64_t K, const uint16_t* w,
    int64_t n0, int T, const uint16_t* bias, int64_t N, uint16_t* y, const char* prefetch) {
    const uint16_t* a = w + n0 * K;
    float c[AMX_TILES_2][AMX_ROWS * AMX_MAX];
    amx_pass(xp, ld, 0, 2, K, a, T, c, prefetch);
    if (G > 2) amx_pass(xp, ld, AMX_PASS, G - 2, K, a, T, c, NULL);
    for (int t = 0; t < T; t++) amx_write(c[t], ld, M, bias, N, n0 + t * AMX_ROWS, y);
}

/* x [M][K] -> xp [K / 2][ld][2] (element pairs), ld = M up to 32 rows; past that one
 * gather per pair index and 16 rows, and zero rows up to ld (a multiple of 16). */
static void amx_pack(const uint16_t* x, int64_t M, int64_t K, int64_t ld, uint16_t* xp) {
    if (M <= AMX_PASS) {
        for (int64_t m = 0; m < M; m++)
            for (int64_t j = 0; j < K / 2; j++) {
                uint32_t pair;
                memcpy(&pair, x + m * K + 2 * j, 4);
                memcpy(xp + 2 * (j * M + m), &pair, 4);
            }
        return;
    }
    const __m512i lanes = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    for (int64_t g = 0; g < ld; g += AMX_COLS) {
        const __mmask16 live = M - g >= 16 ? 0xffff : (__mmask16)((1u << (M - g)) - 1);
        const __m512i rows = _mm512_mullo_epi32(
            _mm512_add_epi32(lanes, _mm512_set1_epi32((int)g)), _mm512_set1_epi32((int)(K / 2)));
        for (int64_t j = 0; j < K / 2; j++)
            _mm512_storeu_si512(xp + 2 * (j * ld + g), _mm512_mask_i32gather_epi32(
                                    _mm512_setzero_si512(), live, rows, x + 2 * j, 4));
    }
}

/* Returns 0, or -1 when the activations' copy could not be allocated (y untouched). */
static int gemv_amx(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                     const uint16_t* bias, int64_t N, uint16_t* y, int threads,
                     __mmask32 tail) {
    const int G = (int)((M + AMX_COLS - 1) / AMX_COLS);
    const int64_t ld = M <= AMX_PASS ? M : G * AMX_COLS;
    /* 64-byte aligned: past 32 rows (B tile rows 4 * ld bytes apart, a multiple of 64)
     * no B tile row straddles two cache lines, which cost 10-20% there (1 thread). The
     * size, 2 * ld * K bytes, is a multiple of 64 as aligned_alloc requires. */
    uint16_t on_stack[AMX_STACK_X] __attribute__((aligned(64)));
    uint16_t* xp = ld * K <= AMX_STACK_X
                       ? on_stack
                       : (uint16_t*)aligned_alloc(64, sizeof(uint16_t) * (size_t)(ld * K));
    if (xp == NULL) return -1;
    amx_pack(x, M, K, ld, xp);
    const int wide = M > AMX_COLS, per_block = wide ? AMX_TILES_2 : AMX_TILES;
    const int64_t tiles = N / AMX_ROWS, blocks = (tiles + per_block - 1) / per_block;
    const int64_t block_elems = (int64_t)per_block * AMX_ROWS * K;
    #pragma omp parallel num_threads(threads)
    {
        amx_configure(M);  /* per thread: the tile configuration is thread state */
        #pragma omp for schedule(static) nowait
        for (int64_t b = 0; b < blocks; b++) {
            const int64_t n0 = b * per_block * AMX_ROWS;
            const char* p = b + 1 < blocks ? (const char*)(w + (b + 1) * block_elems) : NULL;
            const int T = n0 + per_block * AMX_ROWS <= tiles * AMX_ROWS ? per_block : 1;
            for (int64_t n = n0; n < n0 + per_block * AMX_ROWS && n < tiles * AMX_ROWS;
                 n += T * AMX_ROWS) {  /* one block of per_block tiles, or the last few */
                const char* q = T > 1 ? p : NULL;
                if (!wide && T > 1) amx_block(xp, M, K, w, n, AMX_TILES, bias, N, y, q);
                else if (!wide) amx_block(xp, M, K, w, n, 1, bias, N, y, NULL);
                else if (T > 1 && G == 2) amx_block_2(xp, M, ld, 2, K, w, n, 2, bias, N, y, q);
                else if (T > 1 && G == 3) amx_block_2(xp, M, ld, 3, K, w, n, 2, bias, N, y, q);
                else if (T > 1) amx_block_2(xp, M, ld, 4, K, w, n, 2, bias, N, y, q);
                else amx_block_2(xp, M, ld, G, K, w, n, 1, bias, N, y, NULL);
            }
        }
        _tile_release();  /* back to the initial state: oneDNN configures its own */
        #pragma omp for schedule(static)
        for (int64_t n = tiles * AMX_ROWS; n < N; n++)  /* the last N % 16 rows */
            for (int64_t m = 0; m < M; m++)
                block(x, m, 1, K, w, n, 1, 1, bias, N, y, NULL, tail);
    }
    if (xp != on_stack) free(xp);
    return 0;
}

/* A block of BR weight rows (fewer at the end of N) against MG activation rows. */
#define BLOCK(BR, MG)                                                               \
    do {                                                                            \
        if (rows == BR) {                                                           \
            block(x, m0, MG, K, w, n0, BR, BR, bias, N, y, p, tail);                \
        } else {                                                                    \
            for (int64_t r = 0; r < rows; r++)                                      \
                block(x, m0, MG, K, w, n0 + r, 1, 1, bias, N, y, NULL, tail);       \
        }                                                                           \
    } while (0)

/* 5-8 activation rows: blocks of WIDE_ROWS weight rows, every activation row in one pass. */
static void gemv_wide(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                      const uint16_t* bias, int64_t N, uint16_t* y, int threads,
                      __mmask32 tail) {
    const int64_t blocks = (N + WIDE_ROWS - 1) / WIDE_ROWS, m0 = 0;
    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * WIDE_ROWS, rows = N - n0 < WIDE_ROWS ? N - n0 : WIDE_ROWS;
        const int64_t ahead = n0 + PREFETCH_ROWS;
        const char* p = ahead + WIDE_ROWS <= N ? (const char*)(w + ahead * K) : NULL;
        switch (M) {
            case 5: BLOCK(WIDE_ROWS, 5); break;
            case 6: BLOCK(WIDE_ROWS, 6); break;
            case 7: BLOCK(WIDE_ROWS, 7); break;
            default: BLOCK(WIDE_ROWS, 8); break;
        }
    }
}

/* bias may be NULL. */
void pinnace_bf16_gemv(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                       const uint16_t* bias, int64_t N, uint16_t* y, int threads) {
    const __mmask32 tail = (K & 31) ? (((__mmask32)1 << (K & 31)) - 1) : ~(__mmask32)0;
    if (amx_enabled && M >= AMX_MIN && M <= AMX_MAX && K % 32 == 0 && N >= AMX_ROWS &&
        gemv_amx(x, M, K, w, bias, N, y, threads, tail) == 0)
        return;
    if (M > MGROUP && M <= WIDE_MAX) {
        gemv_wide(x, M, K, w, bias, N, y, threads, tail);
        return;
    }
    const int64_t blocks = (N + ROWS - 1) / ROWS;

    #pragma omp parallel for num_threads(threads) schedule(static)
    for (int64_t b = 0; b < blocks; b++) {
        const int64_t n0 = b * ROWS, rows = N - n0 < ROWS ? N - n0 : ROWS;
        const int64_t ahead = n0 + PREFETCH_ROWS;
        const char* prefetch = ahead + ROWS <= N ? (const char*)(w + ahead * K) : NULL;
        for (int64_t m0 = 0; m0 < M; m0 += MGROUP) {
            const char* p = m0 == 0 ? prefetch : NULL;
            switch (M - m0 < MGROUP ? M - m0 : MGROUP) {
                case 1: BLOCK(ROWS, 1); break;
                case 2: BLOCK(ROWS, 2); break;
                case 3: BLOCK(ROWS, 3); break;
                default: BLOCK(ROWS, 4); break;
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
