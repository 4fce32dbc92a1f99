/* Causal GQA attention over the KV cache, f32 arithmetic (the cache may be f32 or f16).
 *
 * Per (token, query head): scores against every visible cache position, a max-subtracted
 * softmax, then the weighted sum of values. Query head h reads KV head h / (H / KVH).
 *
 * A chunk is one token and up to 4 query heads of one KV group: decode reads the KV cache
 * from L2/L3, and reading each K/V row once for the whole group instead of once per query
 * head is what makes it fast (2B-4T: 4 query heads per KV head). Every head keeps its own
 * accumulators, so its result is the same bits however heads are grouped, whatever T and
 * the thread count: batch invariant. Scores live in per-thread scratch rows [4, S].
 */
#include <math.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

#define KV_PREFETCH 8 /* positions ahead to prefetch K rows (decode reads them from DRAM) */

typedef struct {
    KernelImpl impl;
    const AttentionArgs *a;
    float *scores;        /* [n_threads][scores_stride] */
    size_t scores_stride; /* ATTENTION_GROUP · S floats */
    size_t heads_per_chunk;
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

/* One (token, head) on the portable path: scores, max-subtracted softmax, weighted values. */
static void head_scalar(const float *q, const void *k, const void *v, int f16, size_t off0,
                        size_t stride, size_t n_pos, size_t d, float *scores, float *out) {
    float inv_sqrt_d = 1.0f / sqrtf((float)d), max_score = -INFINITY, total = 0.0f;
    for (size_t p = 0; p < n_pos; p++) {
        scores[p] = qk_scalar(q, k, f16, off0 + p * stride, d) * inv_sqrt_d;
        max_score = fmaxf(max_score, scores[p]);
    }
    for (size_t p = 0; p < n_pos; p++) {
        scores[p] = expf(scores[p] - max_score);
        total += scores[p];
    }
    memset(out, 0, d * sizeof(float));
    for (size_t p = 0; p < n_pos; p++) pv_scalar(out, scores[p] / total, v, f16, off0 + p * stride, d);
}

#if BITSERVE_X86
/* 8 cache values at element i, as f32; f16 is a compile-time constant at every call site */
TARGET_AVX2 static inline __attribute__((always_inline)) __m256 kv8(const void *cache, const int f16,
                                                                    size_t i) {
    if (f16) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)cache + i)));
    return _mm256_loadu_ps((const float *)cache + i);
}

TARGET_AVX2 static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* exp(x) for x <= 0, 8 lanes: Cephes' expf (range reduction by ln 2, degree-5 polynomial),
 * relative error ~2e-7; inputs below -87 give ~1e-38 instead of a denormal. */
TARGET_AVX2 static inline __m256 exp8_nonpositive(__m256 x) {
    x = _mm256_max_ps(x, _mm256_set1_ps(-87.0f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 y = _mm256_set1_ps(1.9875691500e-4f);
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
    y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
    y = _mm256_fmadd_ps(_mm256_mul_ps(y, r), r, _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(y, _mm256_castsi256_ps(e));
}

/* scores[p] = exp(scores[p] - max) in place; returns their sum (fixed order for a given n). */
TARGET_AVX2 static float softmax_numerators(float *scores, size_t n, float max_score) {
    const __m256 vmax = _mm256_set1_ps(max_score);
    __m256 total = _mm256_setzero_ps();
    size_t p = 0;
    for (; p + 8 <= n; p += 8) {
        __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(scores + p), vmax));
        _mm256_storeu_ps(scores + p, e);
        total = _mm256_add_ps(total, e);
    }
    if (p < n) { /* tail through a padded copy: the padding lanes are zeroed, never stored */
        float tail[8] = {0};
        memcpy(tail, scores + p, (n - p) * sizeof(float));
        __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
        __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - p)), lane));
        __m256 e = _mm256_and_ps(keep, exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(tail), vmax)));
        _mm256_storeu_ps(tail, e);
        memcpy(scores + p, tail, (n - p) * sizeof(float));
        total = _mm256_add_ps(total, e);
    }
    return hsum8(total);
}

/* Scores of G heads (q rows d apart) against every position, one FMA chain per head over
 * 8-lane slices, each K slice loaded once for all G; returns each head's max in max_score. */
TARGET_AVX2 static inline __attribute__((always_inline)) void group_scores(
    const float *q, const void *k, const void *v, const int f16, const int G, size_t off0,
    size_t stride, size_t n_pos, size_t d, float *scores, float *max_score) {
    float scale = 1.0f / sqrtf((float)d);
    size_t elt = f16 ? 2 : 4, row_bytes = d * elt;
    for (int g = 0; g < G; g++) max_score[g] = -INFINITY;
    for (size_t p = 0; p < n_pos; p++) {
        /* decode finds this layer's cache in DRAM (a token's weights evicted it): a K row
         * KV_PREFETCH positions ahead and this position's V row are requested now, so the
         * strided rows arrive in parallel instead of one latency at a time */
        const char *k_ahead = (const char *)k + (off0 + (p + KV_PREFETCH) * stride) * elt;
        const char *v_row = (const char *)v + (off0 + p * stride) * elt;
        for (size_t b = 0; b < row_bytes; b += 64) {
            if (p + KV_PREFETCH < n_pos) _mm_prefetch(k_ahead + b, _MM_HINT_T0);
            _mm_prefetch(v_row + b, _MM_HINT_T1);
        }
        __m256 acc[4];
        for (int g = 0; g < G; g++) acc[g] = _mm256_setzero_ps();
        size_t off = off0 + p * stride;
        for (size_t i = 0; i < d; i += 8) {
            __m256 kv = kv8(k, f16, off + i);
            for (int g = 0; g < G; g++) acc[g] = _mm256_fmadd_ps(_mm256_loadu_ps(q + (size_t)g * d + i), kv, acc[g]);
        }
        for (int g = 0; g < G; g++) {
            float score = hsum8(acc[g]) * scale;
            scores[(size_t)g * n_pos + p] = score;
            max_score[g] = fmaxf(max_score[g], score);
        }
    }
}

/* out[g] = Σ_p w[g, p] · v_p / total[g], 16 output floats of every head at a time in
 * registers over all positions; each V slice loaded once for all G heads. */
TARGET_AVX2 static inline __attribute__((always_inline)) void group_values(
    const void *v, const int f16, const int G, size_t off0, size_t stride, size_t n_pos, size_t d,
    const float *w, const float *inv_total, float *out) {
    for (size_t d0 = 0; d0 < d; d0 += 16) {
        __m256 acc[4][2];
        for (int g = 0; g < G; g++) acc[g][0] = acc[g][1] = _mm256_setzero_ps();
        for (size_t p = 0; p < n_pos; p++) {
            size_t off = off0 + p * stride + d0;
            __m256 v0 = kv8(v, f16, off), v1 = kv8(v, f16, off + 8);
            for (int g = 0; g < G; g++) {
                __m256 wg = _mm256_broadcast_ss(w + (size_t)g * n_pos + p);
                acc[g][0] = _mm256_fmadd_ps(wg, v0, acc[g][0]);
                acc[g][1] = _mm256_fmadd_ps(wg, v1, acc[g][1]);
            }
        }
        for (int g = 0; g < G; g++) {
            __m256 inv = _mm256_set1_ps(inv_total[g]);
            _mm256_storeu_ps(out + (size_t)g * d + d0, _mm256_mul_ps(acc[g][0], inv));
            _mm256_storeu_ps(out + (size_t)g * d + d0 + 8, _mm256_mul_ps(acc[g][1], inv));
        }
    }
}

/* G (1..4) consecutive query heads sharing one KV head, head_dim d a multiple of 16. */
TARGET_AVX2 static inline __attribute__((always_inline)) void group_avx2(
    const float *q, const void *k, const void *v, const int f16, const int G, size_t off0,
    size_t stride, size_t n_pos, size_t d, float *scores, float *out) {
    float max_score[4], inv_total[4];
    group_scores(q, k, v, f16, G, off0, stride, n_pos, d, scores, max_score);
    for (int g = 0; g < G; g++)
        inv_total[g] = 1.0f / softmax_numerators(scores + (size_t)g * n_pos, n_pos, max_score[g]);
    group_values(v, f16, G, off0, stride, n_pos, d, scores, inv_total, out);
}

#define GROUP_CASE(G)                                                                       \
    case G:                                                                                 \
        if (f16)                                                                            \
            group_avx2(q, k, v, 1, G, off0, stride, n_pos, d, scores, out);                 \
        else                                                                                \
            group_avx2(q, k, v, 0, G, off0, stride, n_pos, d, scores, out);                 \
        break;

TARGET_AVX2 static void group_avx2_any(const float *q, const void *k, const void *v, int f16,
                                       int n_heads, size_t off0, size_t stride, size_t n_pos,
                                       size_t d, float *scores, float *out) {
    switch (n_heads) { /* constant G: the accumulators stay in registers */
        GROUP_CASE(4)
        GROUP_CASE(3)
        GROUP_CASE(2)
    default: group_avx2(q, k, v, f16, 1, off0, stride, n_pos, d, scores, out); break;
    }
}
#endif

/* Chunk = (token t, KV head, run of heads_per_chunk query heads of that KV group). */
static void attention_chunk(void *ctx, int chunk, int thread) {
    const AttentionTask *task = ctx;
    const AttentionArgs *a = task->a;
    size_t group = a->n_heads / a->n_kv_heads, runs = (group + task->heads_per_chunk - 1) / task->heads_per_chunk;
    size_t t = (size_t)chunk / (a->n_kv_heads * runs), rest = (size_t)chunk % (a->n_kv_heads * runs);
    size_t kvh = rest / runs, h0 = kvh * group + rest % runs * task->heads_per_chunk;
    size_t n_heads = group - (h0 - kvh * group) < task->heads_per_chunk ? group - (h0 - kvh * group) : task->heads_per_chunk;
    size_t d = a->head_dim, n_pos = a->start_pos + t + 1, stride = a->n_kv_heads * d;
    const float *q = a->q + (t * a->n_heads + h0) * d;
    float *out = a->out + (t * a->n_heads + h0) * d;
    float *scores = task->scores + (size_t)thread * task->scores_stride;
#if BITSERVE_X86
    if (task->impl >= IMPL_AVX2 && d % 16 == 0) {
        group_avx2_any(q, a->k, a->v, a->kv_f16, (int)n_heads, kvh * d, stride, n_pos, d, scores, out);
        return;
    }
#endif
    for (size_t g = 0; g < n_heads; g++)
        head_scalar(q + g * d, a->k, a->v, a->kv_f16, kvh * d, stride, n_pos, d, scores, out + g * d);
}

void attention(Pool *pool, KernelImpl impl, const AttentionArgs *args) {
    size_t group = args->n_heads / args->n_kv_heads, per_chunk = group < 4 ? group : 4;
    /* fewer heads per chunk only when there would be fewer than 2 chunks per thread: reading
     * K/V twice costs more than a 3:2 split of 5 chunks (2B-4T decode on 2 threads) */
    while (per_chunk > 1 &&
           args->n_tokens * args->n_kv_heads * ((group + per_chunk - 1) / per_chunk) < 2 * (size_t)pool->n_threads)
        per_chunk = (per_chunk + 1) / 2;
    size_t runs = (group + per_chunk - 1) / per_chunk;
    AttentionTask task = {impl, args, pool->scores, (args->start_pos + args->n_tokens) * ATTENTION_GROUP, per_chunk};
    pool_run(pool, attention_chunk, &task, (int)(args->n_tokens * args->n_kv_heads * runs));
}
