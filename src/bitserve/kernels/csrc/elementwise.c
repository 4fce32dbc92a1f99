/* Row-wise glue of the forward pass in C: RMSNorm, the squared-ReLU gate and SwiGLU.
 *
 * In numpy these cost more than the kernels around them for a 128-token prompt (temporaries
 * of [T, 6912] floats, one pass each) and ~15 µs of call overhead per row at decode. Here
 * each row is one pass on one thread, and the arithmetic follows the numpy oracle
 * (bitserve.kernels.reference.rmsnorm / relu2_mul) operation by operation:
 *   rmsnorm: mean of squares accumulated in float64, x / sqrt(mean + eps) in float64,
 *            rounded to float32, times the weight in float32 (only the summation order of
 *            the mean differs from numpy's, so a rare last-bit difference);
 *   relu2_mul: m = max(g, 0); (m · m) · up in float32 — bit-exact (separate multiplies,
 *            never an FMA; -std=c11 compiles with -ffp-contract=off).
 * A row's result never depends on T or the thread count: batch invariant.
 */
#include <math.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

#define ELEMENTWISE_ROWS_PER_CHUNK 4

typedef struct {
    KernelImpl impl;
    const float *x;
    const float *other; /* rmsnorm: weight [n]; relu2_mul: up [T, n] */
    float *out;
    size_t n_rows, n;
    double eps;
    size_t rows_per_chunk; /* set by run_rows */
} RowTask;

/* sqrt(mean + eps) from the 4 lane sums, in one fixed order */
static double rmsnorm_root(const double acc[4], size_t n, double eps) {
    return sqrt(((acc[0] + acc[1]) + (acc[2] + acc[3])) / (double)n + eps);
}

#if BITSERVE_X86
/* rmsnorm_row on 4 double lanes: lane j sums x[i+j]² over i = 0, 4, 8, ... exactly as the
 * scalar acc[j] (separate multiply and add), the tail goes to lane 0, and each output is
 * the same IEEE double division rounded to float, times the weight in float. */
TARGET_AVX2 static void rmsnorm_row_avx2(const float *x, const float *weight, size_t n,
                                         double eps, float *out) {
    __m256d acc4 = _mm256_setzero_pd();
    size_t i = 0;
    for (; i + 4 <= n; i += 4) {
        __m256d xd = _mm256_cvtps_pd(_mm_loadu_ps(x + i));
        acc4 = _mm256_add_pd(acc4, _mm256_mul_pd(xd, xd));
    }
    double acc[4];
    _mm256_storeu_pd(acc, acc4);
    for (; i < n; i++) acc[0] += (double)x[i] * (double)x[i];
    double root = rmsnorm_root(acc, n, eps);
    const __m256d vroot = _mm256_set1_pd(root);
    for (i = 0; i + 4 <= n; i += 4) {
        __m128 q = _mm256_cvtpd_ps(_mm256_div_pd(_mm256_cvtps_pd(_mm_loadu_ps(x + i)), vroot));
        _mm_storeu_ps(out + i, _mm_mul_ps(q, _mm_loadu_ps(weight + i)));
    }
    for (; i < n; i++) out[i] = (float)((double)x[i] / root) * weight[i];
}
#endif

/* One row: Σ x² in lanes acc[j] (elements i ≡ j mod 4), then x / root · weight; the AVX2
 * path above is the same arithmetic on 4 double lanes, bit for bit. */
static void rmsnorm_row(KernelImpl impl, const float *x, const float *weight, size_t n, double eps,
                        float *out) {
#if BITSERVE_X86
    if (impl >= IMPL_AVX2) {
        rmsnorm_row_avx2(x, weight, n, eps, out);
        return;
    }
#endif
    (void)impl;
    double acc[4] = {0.0, 0.0, 0.0, 0.0}; /* fixed order: lane i sums elements i mod 4 */
    size_t i = 0;
    for (; i + 4 <= n; i += 4)
        for (int j = 0; j < 4; j++) acc[j] += (double)x[i + (size_t)j] * (double)x[i + (size_t)j];
    for (; i < n; i++) acc[0] += (double)x[i] * (double)x[i];
    double root = rmsnorm_root(acc, n, eps);
    for (i = 0; i < n; i++) out[i] = (float)((double)x[i] / root) * weight[i];
}

static void rmsnorm_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const RowTask *t = ctx;
    size_t r0 = (size_t)chunk * t->rows_per_chunk;
    size_t r1 = r0 + t->rows_per_chunk < t->n_rows ? r0 + t->rows_per_chunk : t->n_rows;
    for (size_t r = r0; r < r1; r++) rmsnorm_row(t->impl, t->x + r * t->n, t->other, t->n, t->eps, t->out + r * t->n);
}

#if BITSERVE_X86
/* max_ps(0, g) returns g when g is NaN (its second operand), as np.maximum does */
TARGET_AVX2 static size_t relu2_mul_avx2(const float *gate, const float *up, size_t n, float *out) {
    const __m256 zero = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 m = _mm256_max_ps(zero, _mm256_loadu_ps(gate + i));
        _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(m, m), _mm256_loadu_ps(up + i)));
    }
    return i;
}
#endif

static void relu2_mul_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const RowTask *t = ctx;
    size_t r0 = (size_t)chunk * t->rows_per_chunk;
    size_t r1 = r0 + t->rows_per_chunk < t->n_rows ? r0 + t->rows_per_chunk : t->n_rows;
    const float *gate = t->x + r0 * t->n, *up = t->other + r0 * t->n;
    float *out = t->out + r0 * t->n;
    size_t i = 0, n = (r1 - r0) * t->n;
#if BITSERVE_X86
    if (t->impl >= IMPL_AVX2) i = relu2_mul_avx2(gate, up, n, out);
#endif
    for (; i < n; i++) {
        float m = gate[i] < 0.0f ? 0.0f : gate[i]; /* NaN stays NaN, as np.maximum */
        float sq = m * m;
        out[i] = sq * up[i];
    }
}

/* ---------------------------------------------------------------- SwiGLU ---- */

/* silu(g) · up = g / (1 + exp(−g)) · up. exp is Cephes' expf (range reduction by ln 2 in two
 * parts, degree-6 polynomial, 2ⁿ by exponent bits; within 2 ulp of the true value), with the
 * same float operations on both paths (separate multiplies and adds, no FMA), so scalar and
 * AVX2 give the same bits; the numpy oracle (tanh form) agrees to a few ulp. Every element of
 * a row goes through the same code whatever the row count: the tail of a row is padded to a
 * full vector rather than computed by other code, so results are batch invariant. */
#define EXP_HI 88.3762626647949f
#define EXP_LO -88.3762626647949f
#define LOG2E 1.44269504088896341f
#define LN2_HI 0.693359375f
#define LN2_LO -2.12194440e-4f
static const float EXP_POLY[6] = {1.9875691500E-4f, 1.3981999507E-3f, 8.3334519073E-3f,
                                  4.1665795894E-2f, 1.6666665459E-1f, 5.0000001201E-1f};

static float silu_mul_one(float g, float up) {
    float x = fminf(fmaxf(-g, EXP_LO), EXP_HI);
    float n = floorf(x * LOG2E + 0.5f);
    float r = x - n * LN2_HI;
    r = r - n * LN2_LO;
    float p = EXP_POLY[0];
    for (int i = 1; i < 6; i++) p = p * r + EXP_POLY[i];
    float z = r * r;
    float e = p * z + r + 1.0f;
    int32_t bits = ((int32_t)n + 127) << 23;
    float scale;
    memcpy(&scale, &bits, 4);
    e = e * scale;
    return g / (1.0f + e) * up;
}

#if BITSERVE_X86
TARGET_AVX2 static __m256 silu_mul8(__m256 g, __m256 up) {
    __m256 x = _mm256_min_ps(_mm256_max_ps(_mm256_sub_ps(_mm256_setzero_ps(), g), _mm256_set1_ps(EXP_LO)),
                             _mm256_set1_ps(EXP_HI));
    __m256 n = _mm256_floor_ps(_mm256_add_ps(_mm256_mul_ps(x, _mm256_set1_ps(LOG2E)), _mm256_set1_ps(0.5f)));
    __m256 r = _mm256_sub_ps(x, _mm256_mul_ps(n, _mm256_set1_ps(LN2_HI)));
    r = _mm256_sub_ps(r, _mm256_mul_ps(n, _mm256_set1_ps(LN2_LO)));
    __m256 p = _mm256_set1_ps(EXP_POLY[0]);
    for (int i = 1; i < 6; i++) p = _mm256_add_ps(_mm256_mul_ps(p, r), _mm256_set1_ps(EXP_POLY[i]));
    __m256 z = _mm256_mul_ps(r, r);
    __m256 e = _mm256_add_ps(_mm256_add_ps(_mm256_mul_ps(p, z), r), _mm256_set1_ps(1.0f));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    e = _mm256_mul_ps(e, _mm256_castsi256_ps(bits));
    return _mm256_mul_ps(_mm256_div_ps(g, _mm256_add_ps(_mm256_set1_ps(1.0f), e)), up);
}

TARGET_AVX2 static void silu_mul_row_avx2(const float *gate, const float *up, size_t n, float *out) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(out + i, silu_mul8(_mm256_loadu_ps(gate + i), _mm256_loadu_ps(up + i)));
    if (i == n) return;
    float g8[8] = {0}, u8[8] = {0}, o8[8];
    memcpy(g8, gate + i, (n - i) * sizeof(float));
    memcpy(u8, up + i, (n - i) * sizeof(float));
    _mm256_storeu_ps(o8, silu_mul8(_mm256_loadu_ps(g8), _mm256_loadu_ps(u8)));
    memcpy(out + i, o8, (n - i) * sizeof(float));
}
#endif

static void silu_mul_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const RowTask *t = ctx;
    size_t r0 = (size_t)chunk * t->rows_per_chunk;
    size_t r1 = r0 + t->rows_per_chunk < t->n_rows ? r0 + t->rows_per_chunk : t->n_rows;
    for (size_t r = r0; r < r1; r++) {
        const float *gate = t->x + r * t->n, *up = t->other + r * t->n;
        float *out = t->out + r * t->n;
#if BITSERVE_X86
        if (t->impl >= IMPL_AVX2) {
            silu_mul_row_avx2(gate, up, t->n, out);
            continue;
        }
#endif
        for (size_t i = 0; i < t->n; i++) out[i] = silu_mul_one(gate[i], up[i]);
    }
}

/* Rows per chunk. Small calls (decode: a few rows) are one chunk, run on the calling
 * thread without waking the pool (pool_run inlines a single chunk): below
 * ELEMENTWISE_INLINE_ELEMS a dispatch costs more than it saves. Larger calls are split row
 * by row when there are few rows (4 decode rows of 6912: 2 per thread), 4 rows per chunk
 * when there are many (prompts). Each row is computed alone either way: batch invariant. */
#define ELEMENTWISE_INLINE_ELEMS 4096
static size_t rows_per_chunk(const Pool *pool, size_t n_rows, size_t n) {
    if (n_rows * n <= ELEMENTWISE_INLINE_ELEMS) return n_rows ? n_rows : 1;
    return n_rows >= (size_t)pool->n_threads * 16 ? ELEMENTWISE_ROWS_PER_CHUNK : 1;
}

static void run_rows(Pool *pool, TaskFn fn, RowTask *task) {
    task->rows_per_chunk = rows_per_chunk(pool, task->n_rows, task->n);
    pool_run(pool, fn, task, (int)((task->n_rows + task->rows_per_chunk - 1) / task->rows_per_chunk));
}

void rmsnorm_rows(Pool *pool, KernelImpl impl, const float *x, size_t n_rows, size_t n,
                  const float *weight, double eps, float *out) {
    RowTask task = {impl, x, weight, out, n_rows, n, eps, 0};
    run_rows(pool, rmsnorm_chunk, &task);
}

void relu2_mul(Pool *pool, KernelImpl impl, const float *gate, const float *up, size_t n_rows,
               size_t n, float *out) {
    RowTask task = {impl, gate, up, out, n_rows, n, 0.0, 0};
    run_rows(pool, relu2_mul_chunk, &task);
}

void silu_mul(Pool *pool, KernelImpl impl, const float *gate, const float *up, size_t n_rows,
              size_t n, float *out) {
    RowTask task = {impl, gate, up, out, n_rows, n, 0.0, 0};
    run_rows(pool, silu_mul_chunk, &task);
}

/* NEOX RoPE: for each token t and head, out[i] = x[i]·c − x[i+h]·s and
 * out[i+h] = x[i+h]·c + x[i]·s (h = D/2; c, s of t's angle i): each product rounded, then
 * the sum (no FMA: -std=c11 is -ffp-contract=off), as numpy's x1 * c - x2 * s. */
void rope_rows(const float *x, size_t n_tokens, size_t n_heads, size_t head_dim, const float *cos_t,
               const float *sin_t, float *out) {
    size_t half = head_dim / 2;
    for (size_t t = 0; t < n_tokens; t++) {
        const float *c = cos_t + t * half, *s = sin_t + t * half;
        for (size_t h = 0; h < n_heads; h++) {
            const float *x1 = x + (t * n_heads + h) * head_dim, *x2 = x1 + half;
            float *o1 = out + (t * n_heads + h) * head_dim, *o2 = o1 + half;
            for (size_t i = 0; i < half; i++) {
                float a = x1[i] * c[i], b = x2[i] * s[i], d = x2[i] * c[i], e = x1[i] * s[i];
                o1[i] = a - b;
                o2[i] = d + e;
            }
        }
    }
}

/* ------------------------------------------------------------ KV rows into the cache ---- */

/* IEEE binary16 of f, rounded to nearest even, as numpy's astype(float16): overflow to ±inf,
 * subnormals kept, NaN stays NaN (made quiet, as F16C does: a signalling NaN's payload
 * differs from numpy's, which arithmetic never produces). */
static uint16_t float_to_half(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000u, abs = x & 0x7fffffffu;
    if (abs >= 0x7f800000u) /* inf or nan */
        return (uint16_t)(sign | 0x7c00u | (abs > 0x7f800000u ? 0x200u | ((abs >> 13) & 0x3ffu) : 0));
    if (abs >= 0x477ff000u) return (uint16_t)(sign | 0x7c00u); /* rounds past 65504 */
    if (abs < 0x38800000u) { /* below 2^-14: a subnormal half (or zero), m · 2^-24 */
        if (abs < 0x33000000u) return (uint16_t)sign; /* at most 2^-25: rounds to zero */
        uint32_t e = abs >> 23, m = (abs & 0x7fffffu) | 0x800000u, shift = 126 - e; /* 14..24 */
        uint32_t h = m >> shift, rest = m & ((1u << shift) - 1), half = 1u << (shift - 1);
        h += rest > half || (rest == half && (h & 1));
        return (uint16_t)(sign | h);
    }
    uint32_t h = ((abs - 0x38000000u) >> 13), rest = abs & 0x1fffu; /* rebias 127 -> 15 */
    h += rest > 0x1000u || (rest == 0x1000u && (h & 1));
    return (uint16_t)(sign | h); /* a mantissa carry rolls into the exponent, as it should */
}

#if BITSERVE_X86
/* 8 floats at a time with F16C (the same rounding); returns how many were stored */
TARGET_AVX2 static size_t store_half_avx2(uint16_t *out, const float *src, size_t n) {
    size_t i = 0;
    for (; i + 8 <= n; i += 8)
        _mm_storeu_si128((__m128i *)(out + i),
                         _mm256_cvtps_ph(_mm256_loadu_ps(src + i), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    return i;
}
#endif

void store_kv_rows(KernelImpl impl, void *dst, int f16, const float *src, size_t n) {
    if (!f16) {
        memcpy(dst, src, n * sizeof(float));
        return;
    }
    uint16_t *out = dst;
    size_t i = 0;
#if BITSERVE_X86
    if (impl >= IMPL_AVX2) i = store_half_avx2(out, src, n);
#else
    (void)impl;
#endif
    for (; i < n; i++) out[i] = float_to_half(src[i]);
}
