/* Causal GQA attention over the KV cache, f32 arithmetic (the cache may be f32 or f16).
 *
 * One chunk is one (token, query head) pair: scores against every visible cache position,
 * a max-subtracted softmax, then the weighted sum of values. Query head h reads KV head
 * h / (H / KVH). The scores live in a per-thread row of the pool's scratch, allocated once.
 */
#include <math.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

typedef struct {
    KernelImpl impl;
    const AttentionArgs *a;
    float *scores;
    size_t scores_stride;
} AttentionTask;

static inline float kv_at(const void *cache, int f16, size_t i) {
    return f16 ? half_to_float(((const uint16_t *)cache)[i]) : ((const float *)cache)[i];
}

static float qk_scalar(const float *q, const void *k, int f16, size_t off, size_t d) {
    float acc = 0.0f;
    for (size_t i = 0; i < d; i++) acc += q[i] * kv_at(k, f16, off + i);
    return acc;
}

static void pv_scalar(float *out, float p, const void *v, int f16, size_t off, size_t d) {
    for (size_t i = 0; i < d; i++) out[i] += p * kv_at(v, f16, off + i);
}

#if BITSERVE_X86
TARGET_AVX2 static inline __m256 kv8(const void *cache, int f16, size_t i) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    return _mm256_loadu_ps((const float *)cache + i);
}

TARGET_AVX2 static float qk_avx2(const float *q, const void *k, int f16, size_t off, size_t d) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0;
    size_t i = 0;
    for (; i + 16 <= d; i += 16) {
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv8(k, f16, off + i), a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i + 8), kv8(k, f16, off + i + 8), a1);
    }
    for (; i + 8 <= d; i += 8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kv8(k, f16, off + i), a0);
    a0 = _mm256_add_ps(a0, a1);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    float acc = _mm_cvtss_f32(s);
    return acc + (i < d ? qk_scalar(q + i, k, f16, off + i, d - i) : 0.0f);
}

TARGET_AVX2 static void pv_avx2(float *out, float p, const void *v, int f16, size_t off, size_t d) {
    __m256 vp = _mm256_set1_ps(p);
    size_t i = 0;
    for (; i + 8 <= d; i += 8)
        _mm256_storeu_ps(out + i, _mm256_fmadd_ps(vp, kv8(v, f16, off + i), _mm256_loadu_ps(out + i)));
    if (i < d) pv_scalar(out + i, p, v, f16, off + i, d - i);
}
#endif

static void attention_chunk(void *ctx, int chunk, int thread) {
    const AttentionTask *task = ctx;
    const AttentionArgs *a = task->a;
    size_t t = (size_t)chunk / a->n_heads, h = (size_t)chunk % a->n_heads;
    size_t d = a->head_dim, kvh = h / (a->n_heads / a->n_kv_heads);
    size_t n_pos = a->start_pos + t + 1, pos_stride = a->n_kv_heads * d;
    const float *q = a->q + (t * a->n_heads + h) * d;
    float *out = a->out + (t * a->n_heads + h) * d, *scores = task->scores + (size_t)thread * task->scores_stride;
    int avx2 = BITSERVE_X86 && task->impl >= IMPL_AVX2;
    float inv_sqrt_d = 1.0f / sqrtf((float)d), max_score = -INFINITY, total = 0.0f;
    for (size_t p = 0; p < n_pos; p++) {
        size_t off = p * pos_stride + kvh * d;
#if BITSERVE_X86
        float dot = avx2 ? qk_avx2(q, a->k, a->kv_f16, off, d) : qk_scalar(q, a->k, a->kv_f16, off, d);
#else
        float dot = qk_scalar(q, a->k, a->kv_f16, off, d);
#endif
        scores[p] = dot * inv_sqrt_d;
        max_score = fmaxf(max_score, scores[p]);
    }
    for (size_t p = 0; p < n_pos; p++) {
        scores[p] = expf(scores[p] - max_score);
        total += scores[p];
    }
    memset(out, 0, d * sizeof(float));
    for (size_t p = 0; p < n_pos; p++) {
        size_t off = p * pos_stride + kvh * d;
        float w = scores[p] / total;
#if BITSERVE_X86
        if (avx2) {
            pv_avx2(out, w, a->v, a->kv_f16, off, d);
            continue;
        }
#endif
        pv_scalar(out, w, a->v, a->kv_f16, off, d);
    }
}

void attention(Pool *pool, KernelImpl impl, const AttentionArgs *args) {
    size_t n_pos = args->start_pos + args->n_tokens;
    AttentionTask task = {impl, args, pool->scores, n_pos};
    pool_run(pool, attention_chunk, &task, (int)(args->n_tokens * args->n_heads));
}
