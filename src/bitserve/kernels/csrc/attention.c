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
 *
 * A long decode on 2 threads splits 2B-4T's 5 KV heads 3:2 and reads the cache at ~28 GB/s
 * (a 50 GB/s probe). Measured and dropped, both with the same bits as this code (30 layers
 * of 2B-4T's shape at 3,900 positions, f16 head-major caches, best of 7): three tasks
 * split evenly (scores by position block, softmax by head, values by output slice) took
 * 12.8-16.1 ms from DRAM against 10.6-10.9 (5.0 against 7.0 with the cache in L3); zmm
 * scores (two positions per vector) and values took 10.7-10.9 from DRAM and were slower at
 * 128 positions (0.58 against 0.45); K prefetches 8-96 rows ahead and 2 MB cache pages
 * changed nothing, and 2-head chunks (10, a K/V row read by both threads at once) took
 * 12.8-13.5. From DRAM it is the cores' memory stalls, not the FMAs or the 3:2 split, that
 * set the speed.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

typedef struct {
    KernelImpl impl;
    const AttentionArgs *a;
    float *scores;        /* [n_threads][scores_stride] */
    size_t scores_stride; /* ATTENTION_GROUP · S floats */
    size_t heads_per_chunk;
    const AttentionArgs *items; /* attention_decode: its items (one token each) */
    size_t chunks_per_item;
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

/* Lane r = hsum8(v[r]) for 8 vectors, with hsum8's exact pairing: for each
 * ((a0+a4)+(a2+a6)) + ((a1+a5)+(a3+a7)), 14 shuffles and 7 adds for all 8 instead of 48
 * operations. Halves first (vectors r, r+4 share one), then pairs, then neighbours. */
TARGET_AVX2 static inline __attribute__((always_inline)) __m256 hsum8_x8(const __m256 v[8]) {
    __m256 half[4], pair[2];
    for (int r = 0; r < 4; r++) /* [v_r: a0+a4 .. a3+a7 | v_r+4: the same] */
        half[r] = _mm256_add_ps(_mm256_permute2f128_ps(v[r], v[r + 4], 0x20),
                                _mm256_permute2f128_ps(v[r], v[r + 4], 0x31));
    for (int i = 0; i < 2; i++) /* [s0+s2, s1+s3 of 2i, 2i+1 | of 2i+4, 2i+5] */
        pair[i] = _mm256_add_ps(_mm256_shuffle_ps(half[2 * i], half[2 * i + 1], 0x44),
                                _mm256_shuffle_ps(half[2 * i], half[2 * i + 1], 0xEE));
    return _mm256_add_ps(_mm256_shuffle_ps(pair[0], pair[1], 0x88), _mm256_shuffle_ps(pair[0], pair[1], 0xDD));
}

/* Decode finds this layer's cache in DRAM (a token's weights evicted it). The K rows are
 * read in order, one stream the hardware prefetchers follow (a software prefetch 32 rows
 * ahead made 30 layers at 1,600 positions 13-15% slower); the V row of position p, read
 * only after the softmax, is requested into L2 while p is scored. */
TARGET_AVX2 static inline __attribute__((always_inline)) void prefetch_v_row(
    const void *v, size_t elt, size_t off0, size_t stride, size_t p, size_t row_bytes) {
    const char *v_row = (const char *)v + (off0 + p * stride) * elt;
    for (size_t b = 0; b < row_bytes; b += 64) _mm_prefetch(v_row + b, _MM_HINT_T1);
}

/* group_scores for 4 heads, two positions at a time: the 8 sums (head g at p in lane g,
 * at p+1 in lane 4+g) come out of one hsum8_x8, with each score's bits unchanged (the same
 * FMA chain, pairing and × scale) and fmaxf's max (max_ps keeps the running max when a
 * score is NaN; the max of the rest is exact in any order). Returns the first position
 * not done (n_pos rounded down to even). Per position and 4 heads, 4 separate hsum8 were
 * ~24 shuffles and adds next to 64 FMAs: 30 layers at 1,600 positions, hot, went from
 * 5.0-5.6 to 3.9-4.4 ms, from DRAM 5.9-7.0 to 5.8-6.6 ms. */
TARGET_AVX2 static inline __attribute__((always_inline)) size_t quad_scores_paired(
    const float *q, const void *k, const void *v, const int f16, size_t off0, size_t stride,
    size_t n_pos, size_t d, float *scores, float *max_score) {
    const __m256 scale = _mm256_set1_ps(1.0f / sqrtf((float)d));
    size_t elt = f16 ? 2 : 4, row_bytes = d * elt, p = 0;
    __m256 vmax = _mm256_set1_ps(-INFINITY);
    for (; p + 2 <= n_pos; p += 2) {
        prefetch_v_row(v, elt, off0, stride, p, row_bytes);
        prefetch_v_row(v, elt, off0, stride, p + 1, row_bytes);
        __m256 acc[8];
        for (int r = 0; r < 8; r++) acc[r] = _mm256_setzero_ps();
        size_t off = off0 + p * stride;
        for (size_t i = 0; i < d; i += 8) {
            __m256 k0 = kv8(k, f16, off + i), k1 = kv8(k, f16, off + stride + i);
            for (int g = 0; g < 4; g++) {
                __m256 qv = _mm256_loadu_ps(q + (size_t)g * d + i);
                acc[g] = _mm256_fmadd_ps(qv, k0, acc[g]);
                acc[4 + g] = _mm256_fmadd_ps(qv, k1, acc[4 + g]);
            }
        }
        __m256 s = _mm256_mul_ps(hsum8_x8(acc), scale);
        vmax = _mm256_max_ps(s, vmax);
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        for (int g = 0; g < 4; g++) {
            scores[(size_t)g * n_pos + p] = lanes[g];
            scores[(size_t)g * n_pos + p + 1] = lanes[4 + g];
        }
    }
    float m[8];
    _mm256_storeu_ps(m, vmax);
    for (int g = 0; g < 4; g++) max_score[g] = fmaxf(m[g], m[4 + g]);
    return p;
}

/* Scores of G heads (q rows d apart) against every position, one FMA chain per head over
 * 8-lane slices, each K slice loaded once for all G; returns each head's max in max_score. */
TARGET_AVX2 static inline __attribute__((always_inline)) void group_scores(
    const float *q, const void *k, const void *v, const int f16, const int G, size_t off0,
    size_t stride, size_t n_pos, size_t d, float *scores, float *max_score) {
    float scale = 1.0f / sqrtf((float)d);
    size_t elt = f16 ? 2 : 4, row_bytes = d * elt, p = 0;
    for (int g = 0; g < G; g++) max_score[g] = -INFINITY;
    if (G == 4) p = quad_scores_paired(q, k, v, f16, off0, stride, n_pos, d, scores, max_score);
    for (; p < n_pos; p++) {
        prefetch_v_row(v, elt, off0, stride, p, row_bytes);
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

/* ------------------------------------ blocked path: T > 1 new tokens (prefill) ---- */

/* A block is one KV head's query heads × a run of consecutive new tokens: up to
 * ATTENTION_GROUP query rows that share every K/V row they read. Register tiles of W rows
 * (4 on AVX2, 8 on AVX-512VL's 32 ymm registers) load each K/V slice once (converting f16
 * once) for all W rows, over ATT_TILE positions at a time so the K/V tile stays in L1.
 * Per row the arithmetic is group_avx2's, operation for operation: each score is one
 * 8-lane FMA chain over d, hsum8, × scale; the same max and softmax_numerators; each
 * output float sums w·v over positions in order (the running sum parks in `out` between
 * tiles, an exact f32 store) and is multiplied by 1/total last. So a token's output is
 * the same bits as T = 1 decode's, whatever the block, tile or thread count. */
#define ATT_TILE 64 /* positions per pass: 64 K or V rows of 128 f16 are 16 KB */
#define QK_POS 3    /* positions per QK register tile */
#define ROWS_WIDE 8 /* W on AVX-512VL; AVX2 uses 4 */
#define PV_SLICES 3 /* 16-float zmm slices of an output row per pv_wide pass */

typedef struct {
    const float *q[ATTENTION_GROUP]; /* row r's query [D] */
    float *out[ATTENTION_GROUP];     /* row r's output [D] */
    size_t n_pos[ATTENTION_GROUP];   /* positions row r sees; nondecreasing in r */
    float inv_total[ATTENTION_GROUP];
    size_t n_rows;
    float *scores;   /* [stride, rs], position-major: row r's score at p is scores[p·rs + r] */
    size_t stride;   /* n_pos of the last row */
    size_t rs;       /* n_rows rounded up to 8: a position's 8-row groups are one vector */
    size_t kv_off;   /* the KV head's first element in K/V: kvh · head_stride */
} RowBlock;

/* Lane r = hsum8(acc[r][j]) for the 8 rows (hsum8_x8's pairing) */
TARGET_AVX2 static inline __attribute__((always_inline)) __m256 hsum8_rows(__m256 acc[ROWS_WIDE][QK_POS],
                                                                          int j) {
    __m256 v[8];
    for (int r = 0; r < 8; r++) v[r] = acc[r][j];
    return hsum8_x8(v);
}

/* scores[j·s_stride + r] = (q_r · k_{p+j}) · scale for R rows × PB positions; `off` is
 * position p's K row (element offset), the next position `stride` further. */
TARGET_AVX2 static inline __attribute__((always_inline)) void qk_tile(
    const float *const *q, const void *k, const int f16, const int R, const int PB, size_t off,
    size_t stride, size_t d, float *scores, size_t s_stride) {
    const float scale = 1.0f / sqrtf((float)d);
    __m256 acc[ROWS_WIDE][QK_POS];
    for (int r = 0; r < R; r++)
        for (int j = 0; j < PB; j++) acc[r][j] = _mm256_setzero_ps();
    for (size_t i = 0; i < d; i += 8) {
        __m256 kv[QK_POS];
        for (int j = 0; j < PB; j++) kv[j] = kv8(k, f16, off + (size_t)j * stride + i);
        for (int r = 0; r < R; r++) {
            __m256 qv = _mm256_loadu_ps(q[r] + i);
            for (int j = 0; j < PB; j++) acc[r][j] = _mm256_fmadd_ps(qv, kv[j], acc[r][j]);
        }
    }
    if (R == ROWS_WIDE) { /* 8 rows' sums in one vector per position: far fewer shuffles */
        for (int j = 0; j < PB; j++)
            _mm256_storeu_ps(scores + (size_t)j * s_stride, _mm256_mul_ps(hsum8_rows(acc, j), _mm256_set1_ps(scale)));
        return;
    }
    for (int r = 0; r < R; r++)
        for (int j = 0; j < PB; j++) scores[(size_t)j * s_stride + (size_t)r] = hsum8(acc[r][j]) * scale;
}

/* Scores of rows r0..r0+R-1 at positions [p0, p1). */
TARGET_AVX2 static inline __attribute__((always_inline)) void qk_rows(
    const RowBlock *b, size_t r0, const int R, const void *k, const int f16, size_t kv_stride,
    size_t d, size_t p0, size_t p1) {
    size_t off0 = b->kv_off;
    float *scores = b->scores + r0;
    size_t p = p0;
    for (; p + QK_POS <= p1; p += QK_POS)
        qk_tile(b->q + r0, k, f16, R, QK_POS, off0 + p * kv_stride, kv_stride, d, scores + p * b->rs, b->rs);
    for (; p < p1; p++) qk_tile(b->q + r0, k, f16, R, 1, off0 + p * kv_stride, kv_stride, d, scores + p * b->rs, b->rs);
}

/* acc[r] += w[p, r] · v_p (16 floats at off) for R rows; with `masked`, only rows whose
 * n_pos exceeds p (the last positions of a tile of rows from several tokens). */
TARGET_AVX2 static inline __attribute__((always_inline)) void pv_step(
    __m256 acc[ROWS_WIDE][2], const float *w, size_t w_stride, const size_t *n_pos, const int R,
    const void *v, const int f16, size_t off, size_t p, const int masked) {
    __m256 v0 = kv8(v, f16, off), v1 = kv8(v, f16, off + 8);
    for (int r = 0; r < R; r++) {
        if (masked && p >= n_pos[r]) continue;
        __m256 wr = _mm256_broadcast_ss(w + p * w_stride + (size_t)r);
        acc[r][0] = _mm256_fmadd_ps(wr, v0, acc[r][0]);
        acc[r][1] = _mm256_fmadd_ps(wr, v1, acc[r][1]);
    }
}

/* One output slice [d0, d0+16) of R rows over positions [p0, p1); the running sums come
 * from and go back to out. */
TARGET_AVX2 static inline __attribute__((always_inline)) void pv_tile(
    const RowBlock *b, size_t r0, const int R, const void *v, const int f16, size_t kv_stride,
    size_t p0, size_t p1, size_t d0) {
    const size_t *n_pos = b->n_pos + r0;
    const float *w = b->scores + r0;
    float *const *out = b->out + r0;
    __m256 acc[ROWS_WIDE][2];
    for (int r = 0; r < R; r++) {
        acc[r][0] = _mm256_loadu_ps(out[r] + d0);
        acc[r][1] = _mm256_loadu_ps(out[r] + d0 + 8);
    }
    size_t p = p0, p_all = p1 < n_pos[0] ? p1 : n_pos[0], off = b->kv_off + d0;
    for (; p < p_all; p++) pv_step(acc, w, b->rs, n_pos, R, v, f16, off + p * kv_stride, p, 0);
    for (; p < p1; p++) pv_step(acc, w, b->rs, n_pos, R, v, f16, off + p * kv_stride, p, 1);
    for (int r = 0; r < R; r++) {
        _mm256_storeu_ps(out[r] + d0, acc[r][0]);
        _mm256_storeu_ps(out[r] + d0 + 8, acc[r][1]);
    }
}

TARGET_AVX2 static inline __attribute__((always_inline)) void pv_rows(
    const RowBlock *b, size_t r0, const int R, const void *v, const int f16,
    size_t kv_stride, size_t d, size_t p0, size_t p1) {
    for (size_t d0 = 0; d0 < d; d0 += 16) pv_tile(b, r0, R, v, f16, kv_stride, p0, p1, d0);
}

/* pv_step on zmm: S 16-float slices of V row p at off, for 8 rows */
TARGET_AVX512 static inline __attribute__((always_inline)) void pv_wide_step(
    __m512 acc[ROWS_WIDE][PV_SLICES], const float *w, size_t w_stride, const size_t *n_pos, const void *v,
    const int f16, size_t off, size_t p, const int S, const int masked) {
    __m512 vs[PV_SLICES];
    for (int s = 0; s < S; s++)
        vs[s] = f16 ? _mm512_cvtph_ps(_mm256_loadu_si256((const __m256i *)((const uint16_t *)v + off + 16 * s)))
                    : _mm512_loadu_ps((const float *)v + off + 16 * s);
    for (int r = 0; r < ROWS_WIDE; r++) {
        if (masked && p >= n_pos[r]) continue;
        __m512 wr = _mm512_set1_ps(w[p * w_stride + (size_t)r]);
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_fmadd_ps(wr, vs[s], acc[r][s]);
    }
}

/* pv_tile for 8 rows on AVX-512: the same sums per output float (in position order, from
 * and back to out) on 16-float zmm slices, up to 48 floats (24 accumulators) per pass:
 * fewer instructions and passes over the V tile than the ymm tile, and one weight
 * broadcast per 3 FMAs (2 measured 4% slower on the 2B-4T follow-up shapes). */
TARGET_AVX512 static inline __attribute__((always_inline)) void pv_wide(
    const RowBlock *b, size_t r0, const void *v, const int f16, size_t kv_stride, size_t p0,
    size_t p1, size_t d0, const int S) {
    const size_t *n_pos = b->n_pos + r0;
    const float *w = b->scores + r0;
    float *const *out = b->out + r0;
    __m512 acc[ROWS_WIDE][PV_SLICES];
    for (int r = 0; r < ROWS_WIDE; r++)
        for (int s = 0; s < S; s++) acc[r][s] = _mm512_loadu_ps(out[r] + d0 + 16 * s);
    size_t p = p0, p_all = p1 < n_pos[0] ? p1 : n_pos[0];
    for (; p < p_all; p++) pv_wide_step(acc, w, b->rs, n_pos, v, f16, b->kv_off + p * kv_stride + d0, p, S, 0);
    for (; p < p1; p++) pv_wide_step(acc, w, b->rs, n_pos, v, f16, b->kv_off + p * kv_stride + d0, p, S, 1);
    for (int r = 0; r < ROWS_WIDE; r++)
        for (int s = 0; s < S; s++) _mm512_storeu_ps(out[r] + d0 + 16 * s, acc[r][s]);
}

#define PV_WIDE(name, F16)                                                                          \
    TARGET_AVX512 static void name(const RowBlock *b, size_t r0, const void *v, size_t kv_stride, \
                                   size_t d, size_t p0, size_t p1) {                              \
        size_t d0 = 0;                                                                            \
        for (; d0 + 48 <= d; d0 += 48) pv_wide(b, r0, v, F16, kv_stride, p0, p1, d0, 3);          \
        if (d0 + 32 <= d) pv_wide(b, r0, v, F16, kv_stride, p0, p1, d0, 2), d0 += 32;             \
        if (d0 < d) pv_wide(b, r0, v, F16, kv_stride, p0, p1, d0, 1);                             \
    }
PV_WIDE(pv_wide_f16, 1)
PV_WIDE(pv_wide_f32, 0)

/* Request rows [p0, p0 + ATT_TILE) (below n_pos) into L2 while the tile before them is
 * computed: the strided K/V rows come from L3 or DRAM, and the hardware prefetchers
 * alone leave most of that latency exposed. */
TARGET_AVX2 static inline void prefetch_tile(const void *kv, int f16, size_t kv_off, size_t kv_stride,
                                             size_t d, size_t p0, size_t n_pos) {
    size_t elt = f16 ? 2 : 4, end = p0 + ATT_TILE < n_pos ? p0 + ATT_TILE : n_pos;
    for (size_t p = p0; p < end; p++) {
        const char *row = (const char *)kv + (kv_off + p * kv_stride) * elt;
        for (size_t byte = 0; byte < d * elt; byte += 64) _mm_prefetch(row + byte, _MM_HINT_T1);
    }
}

/* Both passes over the rows in register tiles of W, then 4, 2, 1 for the last rows;
 * pass 0 computes scores, pass 1 accumulates values. */
TARGET_AVX2 static inline __attribute__((always_inline)) void block_pass(
    const RowBlock *b, const AttentionArgs *a, const int f16, const int W, const int values) {
    size_t d = a->head_dim, kv_stride = a->pos_stride;
    const void *kv = values ? a->v : a->k;
    for (size_t p0 = 0; p0 < b->stride; p0 += ATT_TILE) {
        prefetch_tile(kv, a->kv_f16, b->kv_off, kv_stride, d, p0 + ATT_TILE, b->stride);
        for (size_t r0 = 0; r0 < b->n_rows;) {
            size_t left = b->n_rows - r0;
            int R = left >= (size_t)W ? W : left >= 4 ? 4 : left >= 2 ? 2 : 1;
            size_t end = b->n_pos[r0 + (size_t)R - 1], p1 = p0 + ATT_TILE < end ? p0 + ATT_TILE : end;
            if (p1 > p0) {
#define ROWS_CASE(N)                                                                 \
    case N:                                                                          \
        if (values)                                                                  \
            pv_rows(b, r0, N, kv, f16, kv_stride, d, p0, p1);                  \
        else                                                                         \
            qk_rows(b, r0, N, kv, f16, kv_stride, d, p0, p1);                  \
        break;
                switch (R) {
                    ROWS_CASE(1)
                    ROWS_CASE(2)
                    ROWS_CASE(4)
                default:
                    if (W == ROWS_WIDE) {
                        if (values && f16)
                            pv_wide_f16(b, r0, kv, kv_stride, d, p0, p1);
                        else if (values)
                            pv_wide_f32(b, r0, kv, kv_stride, d, p0, p1);
                        else
                            qk_rows(b, r0, ROWS_WIDE, kv, f16, kv_stride, d, p0, p1);
                    }
                    break;
                }
#undef ROWS_CASE
            }
            r0 += (size_t)R;
        }
    }
}

/* Lane mask of the rows (lane i: n[i] positions) that see position p. */
TARGET_AVX2 static inline __m256 rows8_seen(__m256i n, size_t p) {
    return _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_set1_epi32((int)p)));
}

/* Each lane's largest score over the positions it sees (all 8 see [0, n_lo); lane i sees
 * n[i] <= n_hi), as group_scores' fmaxf chain finds it: max_ps(x, m) keeps m when x is
 * NaN, as fmaxf does, and m never is NaN; the max of the rest is exact in any order (a
 * ±0 tie changes no score - max). */
TARGET_AVX2 static inline __m256 rows8_max(const float *s, size_t rs, __m256i n, size_t n_lo, size_t n_hi) {
    __m256 m[4], ninf = _mm256_set1_ps(-INFINITY);
    for (int i = 0; i < 4; i++) m[i] = ninf;
    size_t p = 0;
    for (; p + 4 <= n_lo; p += 4)
        for (int i = 0; i < 4; i++) m[i] = _mm256_max_ps(_mm256_loadu_ps(s + (p + (size_t)i) * rs), m[i]);
    for (; p < n_hi; p++)
        m[0] = _mm256_max_ps(_mm256_blendv_ps(ninf, _mm256_loadu_ps(s + p * rs), rows8_seen(n, p)), m[0]);
    return _mm256_max_ps(_mm256_max_ps(m[0], m[1]), _mm256_max_ps(m[2], m[3]));
}

/* s[p] = exp(s[p] - m) in place (0 in the lanes past their n), added to sum */
TARGET_AVX2 static inline __attribute__((always_inline)) void rows8_exp(float *s, __m256 m, __m256i n,
                                                                        size_t p, int masked, __m256 *sum) {
    __m256 e = exp8_nonpositive(_mm256_sub_ps(_mm256_loadu_ps(s), m));
    if (masked) e = _mm256_and_ps(rows8_seen(n, p), e);
    _mm256_storeu_ps(s, e);
    *sum = _mm256_add_ps(*sum, e);
}

/* softmax_numerators of 8 rows at once on position-major scores (row r0 + i in lane i),
 * in place, and their 1/total into inv_total. Per row the same bits as row by row: the
 * same exp8 per score, and lane l of softmax_numerators' total (the positions p ≡ l mod
 * 8, in order) is sums[l] here, hsum8's pairing done vertically; a row's positions past
 * its n_pos add +0, as the padded tail lanes do there. Rows past n_rows see nothing. */
TARGET_AVX2 static void softmax_rows8(RowBlock *b, size_t r0) {
    int32_t n_lane[8];
    size_t n_lo = SIZE_MAX, n_hi = 0, rs = b->rs;
    for (size_t i = 0; i < 8; i++) {
        size_t n = r0 + i < b->n_rows ? b->n_pos[r0 + i] : 0;
        n_lane[i] = (int32_t)n;
        n_lo = n < n_lo ? n : n_lo;
        n_hi = n > n_hi ? n : n_hi;
    }
    __m256i n = _mm256_loadu_si256((const __m256i *)n_lane);
    float *s = b->scores + r0;
    __m256 m = rows8_max(s, rs, n, n_lo, n_hi), sums[8];
    for (int l = 0; l < 8; l++) sums[l] = _mm256_setzero_ps();
    size_t p0 = 0;
    for (; p0 + 8 <= n_lo; p0 += 8)
        for (int l = 0; l < 8; l++) rows8_exp(s + (p0 + (size_t)l) * rs, m, n, p0 + (size_t)l, 0, &sums[l]);
    for (; p0 < n_hi; p0 += 8)
        for (int l = 0; l < 8 && p0 + (size_t)l < n_hi; l++)
            rows8_exp(s + (p0 + (size_t)l) * rs, m, n, p0 + (size_t)l, 1, &sums[l]);
    __m256 total = _mm256_add_ps(_mm256_add_ps(_mm256_add_ps(sums[0], sums[4]), _mm256_add_ps(sums[2], sums[6])),
                                 _mm256_add_ps(_mm256_add_ps(sums[1], sums[5]), _mm256_add_ps(sums[3], sums[7])));
    _mm256_storeu_ps(b->inv_total + r0, _mm256_div_ps(_mm256_set1_ps(1.0f), total));
}

/* The whole block: scores, per-row softmax, weighted values, then out · 1/total. */
TARGET_AVX2 static inline __attribute__((always_inline)) void block_run(RowBlock *b, const AttentionArgs *a,
                                                                        const int f16, const int W) {
    size_t d = a->head_dim;
    block_pass(b, a, f16, W, 0);
    for (size_t r0 = 0; r0 < b->n_rows; r0 += 8) softmax_rows8(b, r0);
    for (size_t r = 0; r < b->n_rows; r++) memset(b->out[r], 0, d * sizeof(float));
    block_pass(b, a, f16, W, 1);
    for (size_t r = 0; r < b->n_rows; r++)
        for (size_t i = 0; i < d; i++) b->out[r][i] *= b->inv_total[r];
}

typedef void (*BlockFn)(RowBlock *b, const AttentionArgs *a);
#define BLOCK_FN(name, TARGET, F16, W) \
    TARGET static void name(RowBlock *b, const AttentionArgs *a) { block_run(b, a, F16, W); }
BLOCK_FN(block_f16_avx2, TARGET_AVX2, 1, 4)
BLOCK_FN(block_f32_avx2, TARGET_AVX2, 0, 4)
/* EVEX-encoded ymm FMAs round exactly as VEX ones: the same bits as the AVX2 blocks */
BLOCK_FN(block_f16_avx512, TARGET_AVX512, 1, ROWS_WIDE)
BLOCK_FN(block_f32_avx512, TARGET_AVX512, 0, ROWS_WIDE)

#endif

/* Chunk = (token t, KV head, run of heads_per_chunk query heads of that KV group) of a. */
static void attend_chunk(const AttentionTask *task, const AttentionArgs *a, int chunk, int thread) {
    size_t group = a->n_heads / a->n_kv_heads, runs = (group + task->heads_per_chunk - 1) / task->heads_per_chunk;
    size_t t = (size_t)chunk / (a->n_kv_heads * runs), rest = (size_t)chunk % (a->n_kv_heads * runs);
    size_t kvh = rest / runs, h0 = kvh * group + rest % runs * task->heads_per_chunk;
    size_t n_heads = group - (h0 - kvh * group) < task->heads_per_chunk ? group - (h0 - kvh * group) : task->heads_per_chunk;
    size_t d = a->head_dim, n_pos = a->start_pos + t + 1, stride = a->pos_stride, off0 = kvh * a->head_stride;
    const float *q = a->q + (t * a->n_heads + h0) * d;
    float *out = a->out + (t * a->n_heads + h0) * d;
    float *scores = task->scores + (size_t)thread * task->scores_stride;
#if BITSERVE_X86
    if (task->impl >= IMPL_AVX2 && d % 16 == 0) {
        group_avx2_any(q, a->k, a->v, a->kv_f16, (int)n_heads, off0, stride, n_pos, d, scores, out);
        return;
    }
#endif
    for (size_t g = 0; g < n_heads; g++)
        head_scalar(q + g * d, a->k, a->v, a->kv_f16, off0, stride, n_pos, d, scores, out + g * d);
}

static void attention_chunk(void *ctx, int chunk, int thread) {
    const AttentionTask *task = ctx;
    attend_chunk(task, task->a, chunk, thread);
}

/* attention_decode's chunks: item chunk / per_item, then its own chunk (its task->a unused) */
static void decode_batch_chunk(void *ctx, int chunk, int thread) {
    const AttentionTask *task = ctx;
    size_t item = (size_t)chunk / task->chunks_per_item;
    attend_chunk(task, &task->items[item], (int)((size_t)chunk % task->chunks_per_item), thread);
}

typedef struct {
    const AttentionArgs *a;
    BlockFn fn;
    float *scores;        /* [n_threads][scores_stride] */
    size_t scores_stride; /* ATTENTION_GROUP · S floats */
    size_t n_blocks;      /* token blocks: block b is tokens [b·T/n_blocks, (b+1)·T/n_blocks) */
} BlockTask;

/* Chunk = (token block, KV head): rows (token t, query head g of the group), t-major. */
static void block_chunk(void *ctx, int chunk, int thread) {
    const BlockTask *task = ctx;
    const AttentionArgs *a = task->a;
    size_t kvh = (size_t)chunk / task->n_blocks, blk = (size_t)chunk % task->n_blocks;
    size_t t0 = blk * a->n_tokens / task->n_blocks, t1 = (blk + 1) * a->n_tokens / task->n_blocks;
    size_t group = a->n_heads / a->n_kv_heads, d = a->head_dim;
    RowBlock b = {.n_rows = (t1 - t0) * group, .kv_off = kvh * a->head_stride, .stride = a->start_pos + t1};
    b.rs = (b.n_rows + 7) / 8 * 8;
    b.scores = task->scores + (size_t)thread * task->scores_stride;
    for (size_t r = 0; r < b.n_rows; r++) {
        size_t t = t0 + r / group, row = t * a->n_heads + kvh * group + r % group;
        b.q[r] = a->q + row * d;
        b.out[r] = a->out + row * d;
        b.n_pos[r] = a->start_pos + t + 1;
    }
    task->fn(&b, a);
}

/* The blocked path if it applies (T > 1, AVX2, D a multiple of 16, a group's heads fit a
 * block); 0 if not. Blocks of up to ATTENTION_GROUP / group tokens, at least two chunks
 * per thread while there are tokens to split, and a chunk count the threads divide. */
static int attention_blocked(Pool *pool, KernelImpl impl, const AttentionArgs *a) {
#if BITSERVE_X86
    size_t group = a->n_heads / a->n_kv_heads, max_tokens = ATTENTION_GROUP / group;
    if (a->n_tokens < 2 || impl < IMPL_AVX2 || a->head_dim % 16 || max_tokens == 0) return 0;
    size_t n_blocks = (a->n_tokens + max_tokens - 1) / max_tokens;
    size_t want = (2 * (size_t)pool->n_threads + a->n_kv_heads - 1) / a->n_kv_heads;
    if (n_blocks < want) n_blocks = want < a->n_tokens ? want : a->n_tokens;
    /* the chunks cost about the same and are claimed as threads free up: a count the
     * threads divide keeps all of them busy to the end (a 24-token follow-up, 5 KV heads,
     * 2 threads: 15 chunks left one thread idle for the last; 20 do not) */
    while (n_blocks < a->n_tokens && n_blocks * a->n_kv_heads % (size_t)pool->n_threads) n_blocks++;
    BlockFn fn = impl >= IMPL_AVX512 ? (a->kv_f16 ? block_f16_avx512 : block_f32_avx512)
                                     : (a->kv_f16 ? block_f16_avx2 : block_f32_avx2);
    BlockTask task = {a, fn, pool->scores, (a->start_pos + a->n_tokens) * ATTENTION_GROUP, n_blocks};
    pool_run(pool, block_chunk, &task, (int)(n_blocks * a->n_kv_heads));
    return 1;
#else
    (void)pool, (void)impl, (void)a;
    return 0;
#endif
}

void attention(Pool *pool, KernelImpl impl, const AttentionArgs *args) {
    if (attention_blocked(pool, impl, args)) return;
    size_t group = args->n_heads / args->n_kv_heads, per_chunk = group < 4 ? group : 4;
    /* fewer heads per chunk only when there would be fewer than 2 chunks per thread: reading
     * K/V twice costs more than a 3:2 split of 5 chunks (2B-4T decode on 2 threads) */
    while (per_chunk > 1 &&
           args->n_tokens * args->n_kv_heads * ((group + per_chunk - 1) / per_chunk) < 2 * (size_t)pool->n_threads)
        per_chunk = (per_chunk + 1) / 2;
    size_t runs = (group + per_chunk - 1) / per_chunk;
    AttentionTask task = {impl, args, pool->scores, (args->start_pos + args->n_tokens) * ATTENTION_GROUP,
                          per_chunk, NULL, 0};
    pool_run(pool, attention_chunk, &task, (int)(args->n_tokens * args->n_kv_heads * runs));
}

void attention_decode(Pool *pool, KernelImpl impl, const AttentionArgs *items, size_t n_items) {
    if (n_items == 0) return;
    size_t group = items[0].n_heads / items[0].n_kv_heads, per_chunk = group < 4 ? group : 4;
    size_t max_s = 0, runs = (group + per_chunk - 1) / per_chunk;
    for (size_t i = 0; i < n_items; i++)
        max_s = items[i].start_pos + 1 > max_s ? items[i].start_pos + 1 : max_s;
    size_t per_item = items[0].n_kv_heads * runs;
    AttentionTask task = {impl, NULL, pool->scores, max_s * ATTENTION_GROUP, per_chunk, items, per_item};
    pool_run(pool, decode_batch_chunk, &task, (int)(n_items * per_item));
}

/* src [n, KVH, D] f32 → positions start..start+n-1 of the cache `dst` laid out as in a */
void store_new_rows(KernelImpl impl, void *dst, const AttentionArgs *a, const float *src, size_t start,
                    size_t n) {
    size_t elt = a->kv_f16 ? 2 : 4, d = a->head_dim;
    for (size_t t = 0; t < n; t++)
        for (size_t h = 0; h < a->n_kv_heads; h++)
            store_kv_rows(impl, (char *)dst + ((start + t) * a->pos_stride + h * a->head_stride) * elt,
                          a->kv_f16, src + (t * a->n_kv_heads + h) * d, d);
}
