/* The tied LM head and the memory-read probe.
 *
 * For one generated token the head reads the whole embedding (0.66 GB as F16 for
 * 2B-4T), more than all ternary weights together, so it is purely memory bound: each row
 * is streamed once and converted in registers (F16C), accumulating in f32 with FMA. The
 * int8 variant halves the bytes: rows quantized once at load (per-row absmax, the
 * activation quantizer's rule), dot products in f32, divided by the row scale at the end.
 */
#include <math.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

#define HEAD_ROWS_PER_CHUNK 256
#define READ_CHUNK_BYTES (1u << 20)

float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 0x1f, man = h & 0x3ff;
    uint32_t bits;
    if (exp == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13); /* inf / nan */
    } else if (exp != 0) {
        bits = sign | ((exp + 112) << 23) | (man << 13);
    } else if (man == 0) {
        bits = sign;
    } else { /* subnormal: value = man · 2^-24, exact in f32 */
        float f = (float)man * 5.9604644775390625e-8f;
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float out;
    memcpy(&out, &bits, 4);
    return out;
}

/* ---------------------------------------------------------------- row dot products ---- */

static float dot_scalar(const float *x, const void *row, EmbKind kind, size_t dim) {
    float acc = 0.0f;
    if (kind == EMB_F16) {
        const uint16_t *e = row;
        for (size_t k = 0; k < dim; k++) acc += x[k] * half_to_float(e[k]);
    } else if (kind == EMB_I8) {
        const int8_t *e = row;
        for (size_t k = 0; k < dim; k++) acc += x[k] * (float)e[k];
    } else {
        const float *e = row;
        for (size_t k = 0; k < dim; k++) acc += x[k] * e[k];
    }
    return acc;
}

#if BITSERVE_X86
TARGET_AVX2 static float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 embedding values at index k as f32 */
TARGET_AVX2 static inline __attribute__((always_inline)) __m256 load8(const void *row, size_t k,
                                                                      EmbKind kind) {
    if (kind == EMB_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
    if (kind == EMB_I8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + k))));
    return _mm256_loadu_ps((const float *)row + k);
}

/* four independent accumulators hide the FMA latency */
TARGET_AVX2 static inline __attribute__((always_inline)) float dot_avx2(
    const float *x, const void *row, const EmbKind kind, size_t dim) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    size_t k = 0;
    for (; k + 32 <= dim; k += 32) {
        a0 = _mm256_fmadd_ps(load8(row, k, kind), _mm256_loadu_ps(x + k), a0);
        a1 = _mm256_fmadd_ps(load8(row, k + 8, kind), _mm256_loadu_ps(x + k + 8), a1);
        a2 = _mm256_fmadd_ps(load8(row, k + 16, kind), _mm256_loadu_ps(x + k + 16), a2);
        a3 = _mm256_fmadd_ps(load8(row, k + 24, kind), _mm256_loadu_ps(x + k + 24), a3);
    }
    for (; k + 8 <= dim; k += 8) a0 = _mm256_fmadd_ps(load8(row, k, kind), _mm256_loadu_ps(x + k), a0);
    float acc = hsum_ps(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
    size_t size = kind == EMB_F16 ? 2 : kind == EMB_I8 ? 1 : 4;
    if (k < dim) acc += dot_scalar(x + k, (const char *)row + k * size, kind, dim - k);
    return acc;
}

TARGET_AVX2 static float dot_avx2_any(const float *x, const void *row, EmbKind kind, size_t dim) {
    if (kind == EMB_F16) return dot_avx2(x, row, EMB_F16, dim);
    if (kind == EMB_I8) return dot_avx2(x, row, EMB_I8, dim);
    return dot_avx2(x, row, EMB_F32, dim);
}
#endif

/* ---------------------------------------------------------------- head task ---- */

typedef struct {
    KernelImpl impl;
    const float *x;
    size_t n_tokens, dim;
    const char *emb;
    EmbKind kind;
    size_t row_bytes;
    const float *row_scale;
    size_t vocab;
    float *out;
} HeadTask;

/* Rows [256·chunk, +256) against every token. Each (row, token) dot product is computed by
 * the same code in the same order whatever T and the thread count: batch invariant. (An
 * AVX-512 variant was measured slower: vcvtph2ps on zmm costs more than two on ymm.) */
static void head_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const HeadTask *h = ctx;
    size_t v0 = (size_t)chunk * HEAD_ROWS_PER_CHUNK;
    size_t v1 = v0 + HEAD_ROWS_PER_CHUNK < h->vocab ? v0 + HEAD_ROWS_PER_CHUNK : h->vocab;
    for (size_t v = v0; v < v1; v++) {
        const void *row = h->emb + v * h->row_bytes;
        for (size_t t = 0; t < h->n_tokens; t++) {
            const float *x = h->x + t * h->dim;
            float dot;
#if BITSERVE_X86
            if (h->impl >= IMPL_AVX2)
                dot = dot_avx2_any(x, row, h->kind, h->dim);
            else
#endif
                dot = dot_scalar(x, row, h->kind, h->dim);
            if (h->row_scale) dot /= h->row_scale[v];
            h->out[t * h->vocab + v] = dot;
        }
    }
}

void lm_head(Pool *pool, KernelImpl impl, const float *x, size_t n_tokens, size_t dim,
             const void *emb, EmbKind kind, const float *row_scale, size_t vocab, float *out) {
    size_t size = kind == EMB_F16 ? 2 : kind == EMB_I8 ? 1 : 4;
    HeadTask task = {impl, x, n_tokens, dim, emb, kind, dim * size, row_scale, vocab, out};
    pool_run(pool, head_chunk, &task, (int)((vocab + HEAD_ROWS_PER_CHUNK - 1) / HEAD_ROWS_PER_CHUNK));
}

/* ---------------------------------------------------------------- int8 embedding ---- */

typedef struct {
    KernelImpl impl;
    const uint16_t *emb;
    size_t vocab, dim;
    int8_t *q;
    float *row_scale;
} RowQuantTask;

static void row_quant_chunk(void *ctx, int chunk, int thread) {
    const RowQuantTask *r = ctx;
    size_t v0 = (size_t)chunk * HEAD_ROWS_PER_CHUNK;
    size_t v1 = v0 + HEAD_ROWS_PER_CHUNK < r->vocab ? v0 + HEAD_ROWS_PER_CHUNK : r->vocab;
    float row[r->dim]; /* one widened row; dim is a model width (a few thousand) */
    int32_t unused_sum;
    for (size_t v = v0; v < v1; v++) {
        const uint16_t *e = r->emb + v * r->dim;
        for (size_t k = 0; k < r->dim; k++) row[k] = half_to_float(e[k]);
        /* reuse the activation quantizer: same rule, same rounding, tested bit-exact */
        quantize_one(r->impl, row, r->dim, r->q + v * r->dim, r->row_scale + v, &unused_sum);
    }
    (void)thread;
}

void quantize_f16_rows(Pool *pool, KernelImpl impl, const uint16_t *emb, size_t vocab,
                       size_t dim, int8_t *q, float *row_scale) {
    RowQuantTask task = {impl, emb, vocab, dim, q, row_scale};
    pool_run(pool, row_quant_chunk, &task, (int)((vocab + HEAD_ROWS_PER_CHUNK - 1) / HEAD_ROWS_PER_CHUNK));
}

/* ---------------------------------------------------------------- memory-read probe ---- */

typedef struct {
    KernelImpl impl;
    const uint8_t *buf;
    size_t n;
    atomic_ullong checksum;
} ReadTask;

static uint64_t read_scalar(const uint8_t *p, size_t n) {
    uint64_t acc = 0, word;
    for (size_t i = 0; i + 8 <= n; i += 64) {
        memcpy(&word, p + i, 8); /* one word per cache line: the line is still fetched */
        acc ^= word;
    }
    return acc;
}

#if BITSERVE_X86
TARGET_AVX2 static uint64_t read_avx2(const uint8_t *p, size_t n) {
    __m256i a0 = _mm256_setzero_si256(), a1 = a0;
    size_t i = 0;
    for (; i + 64 <= n; i += 64) {
        a0 = _mm256_xor_si256(a0, _mm256_loadu_si256((const __m256i *)(p + i)));
        a1 = _mm256_xor_si256(a1, _mm256_loadu_si256((const __m256i *)(p + i + 32)));
    }
    a0 = _mm256_xor_si256(a0, a1);
    return (uint64_t)_mm256_extract_epi64(a0, 0) ^ (uint64_t)_mm256_extract_epi64(a0, 3);
}
#endif

static void read_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    ReadTask *r = ctx;
    size_t lo = (size_t)chunk * READ_CHUNK_BYTES;
    size_t n = r->n - lo < READ_CHUNK_BYTES ? r->n - lo : READ_CHUNK_BYTES;
    uint64_t sum;
#if BITSERVE_X86
    if (r->impl >= IMPL_AVX2)
        sum = read_avx2(r->buf + lo, n);
    else
#endif
        sum = read_scalar(r->buf + lo, n);
    atomic_fetch_xor(&r->checksum, sum);
}

uint64_t read_memory(Pool *pool, KernelImpl impl, const uint8_t *buf, size_t n) {
    ReadTask task = {.impl = impl, .buf = buf, .n = n};
    atomic_init(&task.checksum, 0);
    pool_run(pool, read_chunk, &task, (int)((n + READ_CHUNK_BYTES - 1) / READ_CHUNK_BYTES));
    return atomic_load(&task.checksum);
}
