/* A Llama decoder stack for decode rows (one token per request), bfloat16, in one call.
 *
 * At batch 1 a decode step streams ~270 MB of weights in ~40 ms, but the same step also
 * ran ~30 PyTorch ops and ~10 module calls per layer (norms, rotary, residual adds, SiLU,
 * views, the attention backend's dispatch), each some 10-30 us on a busy core: a third of
 * the step. Here one call runs every layer; per layer:
 *
 *   x = norm(h, in_norm)                      the RMSNorm kernel (rms_norm.c)
 *   qkv = x @ Wqkv^T (+ b)                    the GEMV (bf16_gemv.c or int8_gemv.c)
 *   q, k = rotate(q, k, pos); cache <- k, v   here: HF's rounding, see rotate()
 *   a = attend(q, cache)                      the paged decode kernel
 *   h = h + a @ Wo^T (+ b)                    GEMV, then the residual add here
 *   x = norm(h, post_norm)
 *   g, u = x @ Wgu^T (+ b)                    GEMV
 *   h = h + (silu(g) * u) @ Wd^T (+ b)        SiLU-and-mul here, GEMV, residual add here
 *
 * The GEMV, norm and attention are the same compiled kernels the PyTorch modules call,
 * reached through function pointers the Python side passes in (so each keeps one source
 * and one build). Every elementwise step rounds to bf16 exactly where the PyTorch ops do
 * (x * cos, roll(x) * sin and their sum; h + o; silu(g); silu(g) * u), so results match
 * the module path bit for bit except SiLU's exp (libm's expf here, SLEEF's in PyTorch,
 * both within 1 float32 ulp, which a bf16 rounding rarely exposes).
 */
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

typedef void (*gemv_fn)(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w,
                        const uint16_t* bias, int64_t N, uint16_t* y, int threads);
typedef void (*norm_fn)(const uint16_t* x, const uint16_t* w, int64_t rows, int64_t cols,
                        float eps, uint16_t* out, int threads);
typedef int (*int8_gemv_fn)(const uint16_t* x, int64_t M, int64_t K, const int8_t* w,
                            const float* scale, const int32_t* rowsum, int64_t N, uint16_t* y,
                            int threads);
typedef int (*attend_fn)(const uint16_t* q, const uint16_t* k_cache, const uint16_t* v_cache,
                         const int64_t* block_tables, int64_t max_blocks,
                         const int64_t* seq_lens, int64_t B, int64_t H, int64_t Hkv,
                         int64_t D, int64_t bs, float scale, int64_t window, uint16_t* out,
                         int threads);

/* A linear layer's weight [N, K] as nn.Linear stores it: bf16 (scale NULL), or int8 codes
 * with float32 row scales and row sums (int8_gemv.c); bias bf16 or NULL. */
typedef struct {
    const void* w;
    const uint16_t* bias;
    const float* scale;
    const int32_t* rowsum;
} Linear;

/* One layer's weights and cache. */
typedef struct {
    const uint16_t *in_norm, *post_norm;
    Linear qkv, o, gate_up, down;
    uint16_t *k_cache, *v_cache;  /* [num_blocks * Hkv * bs, D] rows, head-major blocks */
    float scale;
    int64_t window;  /* 0: none */
} Layer;

typedef struct {
    int64_t hidden, heads, kv_heads, head_dim, intermediate, block_size;
    float eps;
    const float *cos, *sin;  /* [max_positions, D] float32 rotary tables */
    gemv_fn gemv;
    int8_gemv_fn int8_gemv;  /* NULL when no layer is int8 */
    norm_fn norm;
    attend_fn attend;
} Model;

/* Multiply-adds below which attention runs on one thread (see pinnace_llama_decode_bf16). */
#define ATTENTION_SERIAL_WORK (1 << 20)

static inline float from_bf16(uint16_t h) {
    union { uint32_t u; float f; } v = {(uint32_t)h << 16};
    return v.f;
}

static inline uint16_t to_bf16(float f) {  /* round to nearest even, NaN stays NaN */
    union { float f; uint32_t u; } v = {f};
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);
}

/* The scratch one call needs for M rows, in bf16 elements (the Python side allocates it). */
int64_t pinnace_llama_decode_scratch(const Model* m, int64_t M) {
    const int64_t q = m->heads * m->head_dim, kv = m->kv_heads * m->head_dim;
    return M * (2 * m->hidden + (q + 2 * kv) + 2 * q + 3 * m->intermediate);
}

static inline __m512 load16_bf16(const uint16_t* p) {
    return _mm512_castsi512_ps(
        _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16));
}

static inline __m512 round16(__m512 v) {  /* float(bf16(v)) */
    return _mm512_cvtpbh_ps(_mm512_cvtneps_pbh(v));
}

static inline void store16_bf16(uint16_t* p, __m512 v) {  /* nearest even, as to_bf16 */
    _mm256_storeu_si256((__m256i*)p, (__m256i)_mm512_cvtneps_pbh(v));
}

/* HF's rotate-half rotation of one head in place, in bf16 PyTorch op order:
 * bf16( bf16(x * c) + bf16(roll(x) * s') ), c = bf16(cos), s' = bf16(sin) negated on the
 * first half (rotate_half(x) = cat(-x2, x1) = roll(x) with that sign). */
static void rotate(uint16_t* x, const float* cos, const float* sin, int64_t D) {
    uint16_t orig[512];
    const int64_t half = D / 2;
    memcpy(orig, x, sizeof(uint16_t) * (size_t)D);
    int64_t i = 0;
    if (half % 16 == 0) {  /* 16 lanes at a time, none straddling the halves */
        const __m512i sign = _mm512_set1_epi32((int)0x80000000u);
        for (; i < D; i += 16) {
            const __m512 c = round16(_mm512_loadu_ps(cos + i));
            __m512 sn = round16(_mm512_loadu_ps(sin + i));
            if (i < half) sn = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(sn), sign));
            const __m512 rolled = load16_bf16(orig + (i < half ? i + half : i - half));
            const __m512 a = round16(_mm512_mul_ps(load16_bf16(orig + i), c));
            const __m512 b = round16(_mm512_mul_ps(rolled, sn));
            store16_bf16(x + i, _mm512_add_ps(a, b));
        }
    }
    for (; i < D; i++) {
        const float c = from_bf16(to_bf16(cos[i]));
        const float s = from_bf16(to_bf16(sin[i]));
        const float rolled = from_bf16(orig[i < half ? i + half : i - half]);
        const float a = from_bf16(to_bf16(from_bf16(orig[i]) * c));
        const float b = from_bf16(to_bf16(rolled * (i < half ? -s : s)));
        x[i] = to_bf16(a + b);
    }
}

/* Profiling: seconds per part, accumulated into timings[] when the caller passes it. */
enum { T_NORM, T_MATMUL, T_ROPE_KV, T_ATTENTION, T_ELEMENTWISE, T_PARTS };

static inline double now(const double* timings) {
    if (timings == NULL) return 0.0;
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

#define TIMED(part, stmt)                                    \
    do {                                                     \
        const double t0_ = now(timings);                     \
        stmt;                                                \
        if (timings != NULL) timings[part] += now(timings) - t0_; \
    } while (0)

static void add_into(uint16_t* h, const uint16_t* o, int64_t n) {  /* h = bf16(h + o) */
    int64_t i = 0;
    for (; i + 16 <= n; i += 16)
        store16_bf16(h + i, _mm512_add_ps(load16_bf16(h + i), load16_bf16(o + i)));
    for (; i < n; i++) h[i] = to_bf16(from_bf16(h[i]) + from_bf16(o[i]));
}

/* y [M, N] = x [M, K] @ W^T (+ bias) by the layer's kernel; int8's bias added after its
 * rounding to bf16, as Int8Linear does. Returns 0, or -2 when the int8 kernel failed. */
static int linear(const Model* m, const Linear* L, const uint16_t* x, int64_t M, int64_t K,
                  int64_t N, uint16_t* y, int threads) {
    if (L->scale == NULL) {
        m->gemv(x, M, K, (const uint16_t*)L->w, L->bias, N, y, threads);
        return 0;
    }
    if (m->int8_gemv(x, M, K, (const int8_t*)L->w, L->scale, L->rowsum, N, y, threads) != 0)
        return -2;
    if (L->bias != NULL)
        for (int64_t r = 0; r < M; r++) add_into(y + r * N, L->bias, N);
    return 0;
}

/* Rotates each row's q and k heads by its position, copies q to [M, nq, D] for the
 * attention kernel and writes k and v to the cache rows. */
static void rope_and_write(const Model* m, const Layer* L, int64_t M, uint16_t* qkv,
                           uint16_t* q, const int64_t* positions, const int64_t* write_rows) {
    const int64_t D = m->head_dim, nq = m->heads, nkv = m->kv_heads;
    const int64_t q_size = nq * D, kv_size = nkv * D, qkv_size = q_size + 2 * kv_size;
    const size_t head_bytes = sizeof(uint16_t) * (size_t)D;
    for (int64_t r = 0; r < M; r++) {
        uint16_t* row = qkv + r * qkv_size;
        const float* c = m->cos + positions[r] * D;
        const float* s = m->sin + positions[r] * D;
        for (int64_t h = 0; h < nq + nkv; h++) rotate(row + h * D, c, s, D);
        memcpy(q + r * q_size, row, sizeof(uint16_t) * (size_t)q_size);
        for (int64_t h = 0; h < nkv; h++) {
            const int64_t dst = write_rows[r * nkv + h] * D;
            memcpy(L->k_cache + dst, row + q_size + h * D, head_bytes);
            memcpy(L->v_cache + dst, row + q_size + kv_size + h * D, head_bytes);
        }
    }
}

/* e^x for 16 lanes within 2 float32 ulp: x = n ln2 + r, |r| <= ln2 / 2, e^r by its
 * degree-7 Taylor polynomial, times 2^n by VSCALEFPS (inf / 0 past float's range; NaN
 * stays NaN). */
static inline __m512 exp16(__m512 x) {
    const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                          _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 5040.f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}

/* act = bf16( bf16(silu(g)) * u ) with g, u the halves of each [2I] row of gu. */
static void silu_and_mul(const uint16_t* gu, int64_t M, int64_t I, uint16_t* act) {
    const __m512 one = _mm512_set1_ps(1.f);
    for (int64_t r = 0; r < M; r++) {
        const uint16_t* g = gu + r * 2 * I;
        int64_t i = 0;
        for (; i + 16 <= I; i += 16) {
            const __m512 v = load16_bf16(g + i);
            const __m512 e = exp16(_mm512_sub_ps(_mm512_setzero_ps(), v));
            const __m512 silu = _mm512_div_ps(v, _mm512_add_ps(one, e));
            store16_bf16(act + r * I + i, _mm512_mul_ps(round16(silu), load16_bf16(g + I + i)));
        }
        for (; i < I; i++) {
            const float v = from_bf16(g[i]);
            const float silu = from_bf16(to_bf16(v / (1.0f + expf(-v))));
            act[r * I + i] = to_bf16(silu * from_bf16(g[I + i]));
        }
    }
}

/* Every layer over M decode rows. hidden: [M, hidden] bf16, updated in place (the
 * residual stream; the final norm is the caller's). positions, seq_lens: [M];
 * write_rows: [M * Hkv] the cache row of each (row, kv head)'s new K/V; block_tables:
 * [M, max_blocks]. timings: NULL, or T_PARTS seconds to add each part's time to.
 * Returns 0, -1 on a shape the kernels refuse, -2 when a kernel could not allocate. */
int pinnace_llama_decode_bf16(const Model* m, const Layer* layers, int64_t num_layers,
                              int64_t M, uint16_t* hidden, const int64_t* positions,
                              const int64_t* write_rows, const int64_t* block_tables,
                              int64_t max_blocks, const int64_t* seq_lens, uint16_t* scratch,
                              int threads, double* timings) {
    const int64_t H = m->hidden, D = m->head_dim, nq = m->heads, nkv = m->kv_heads;
    const int64_t I = m->intermediate, q_size = nq * D, kv_size = nkv * D;
    const int64_t qkv_size = q_size + 2 * kv_size;
    if (D > 512 || D % 2) return -1;
    uint16_t* x = scratch;                  /* [M, H] normed input */
    uint16_t* out = x + M * H;              /* [M, H] o_proj / down_proj output */
    uint16_t* qkv = out + M * H;            /* [M, qkv_size] */
    uint16_t* q = qkv + M * qkv_size;       /* [M, nq, D] contiguous queries */
    uint16_t* att = q + M * q_size;         /* [M, nq, D] attention output */
    uint16_t* gu = att + M * q_size;        /* [M, 2I] gate then up */
    uint16_t* act = gu + M * 2 * I;         /* [M, I] silu(gate) * up */
    /* Attention's work is small next to the weights at short contexts (batch 1, 300
     * tokens: ~0.35M multiply-adds, some 30 us): one thread then, as a parallel region
     * per layer costs more than it saves, and on an oversubscribed machine each one waits
     * for a descheduled thread (measured: 108 ms of a 488 ms step at 2 threads, load 6). */
    int64_t attention_work = 0;
    for (int64_t r = 0; r < M; r++) attention_work += seq_lens[r] * q_size * 2;
    const int attention_threads = attention_work < ATTENTION_SERIAL_WORK ? 1 : threads;
    for (int64_t l = 0; l < num_layers; l++) {
        const Layer* L = layers + l;
        int status = 0;
        TIMED(T_NORM, m->norm(hidden, L->in_norm, M, H, m->eps, x, threads));
        TIMED(T_MATMUL, status = linear(m, &L->qkv, x, M, H, qkv_size, qkv, threads));
        if (status != 0) return status;
        TIMED(T_ROPE_KV, rope_and_write(m, L, M, qkv, q, positions, write_rows));
        TIMED(T_ATTENTION,
              status = m->attend(q, L->k_cache, L->v_cache, block_tables, max_blocks, seq_lens,
                                 M, nq, nkv, D, m->block_size, L->scale, L->window, att,
                                 attention_threads));
        if (status != 0) return status;
        TIMED(T_MATMUL, status = linear(m, &L->o, att, M, q_size, H, out, threads));
        if (status != 0) return status;
        TIMED(T_ELEMENTWISE, add_into(hidden, out, M * H));
        TIMED(T_NORM, m->norm(hidden, L->post_norm, M, H, m->eps, x, threads));
        TIMED(T_MATMUL, status = linear(m, &L->gate_up, x, M, H, 2 * I, gu, threads));
        if (status != 0) return status;
        TIMED(T_ELEMENTWISE, silu_and_mul(gu, M, I, act));
        TIMED(T_MATMUL, status = linear(m, &L->down, act, M, I, H, out, threads));
        if (status != 0) return status;
        TIMED(T_ELEMENTWISE, add_into(hidden, out, M * H));
    }
    return 0;
}

/* silu_and_mul alone, for the module path's MLP (prefill rows, larger batches): one pass
 * over the [M, 2I] gate | up rows instead of PyTorch's silu and its product, each over
 * the whole step. act: [M, I]. */
void pinnace_silu_and_mul_bf16(const uint16_t* gu, int64_t M, int64_t I, uint16_t* act,
                               int threads) {
    #pragma omp parallel for num_threads(threads) schedule(static) if (M * I >= 32768)
    for (int64_t r = 0; r < M; r++) silu_and_mul(gu + r * 2 * I, 1, I, act + r * I);
}
