/* int8 activation quantization and the ternary matmul over I2_S weights (spec §2, §4).
 *
 * I2_S is read in its on-disk layout, straight from the memory map: blocks of 128 weights
 * in 32 bytes, byte j holding weights j, 32+j, 64+j, 96+j in bits 7-6, 5-4, 3-2, 1-0.
 * So one 32-byte load, four shift+mask steps, gives four vectors of 32 codes that line up
 * with four consecutive 32-byte runs of the activations: no repacking is ever needed.
 *
 * Codes c are 0/1/2 for ternary -1/0/+1, so  Σ (c-1)·q = Σ c·q − Σ q : the unsigned codes
 * feed vpmaddubsw (u8 × i8) directly and Σ q is computed once per token by the quantizer.
 * Everything stays integer until the end, so the result equals the numpy oracle exactly;
 * y = (float)acc / s * w_scale is then evaluated in float32 in the oracle's order.
 */
#include <math.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

#define BLOCK 128
#define BLOCK_BYTES 32
/* Tokens sharing one unpacked weight block (GEMM). AVX2 has 16 ymm registers: 8 tokens'
 * int16 and int32 accumulators spilled (18 stack moves per 32 maddubs in the loop), 4
 * tokens' hardly (4 per 16), and the ternary pass ran ~9% faster at T = 8, 24 and 32
 * (2B-4T shapes, Zen 4) though each block is unpacked twice as often. AVX-512 tiles tokens
 * by 4 anyway (PAIR_TILE_TOKENS). */
#define TOKEN_TILE 4
/* Blocks summed in int16 before widening (AVX2). Bound: a maddubs lane is c0·q0 + c1·q1 with
 * c in {0,1,2}, q in [-128,127], so it lies in [-512, 508] and never saturates; one block
 * adds 4 such lanes: [-2048, 2032]; 16 blocks: [-32768, 32512], inside int16. add_epi16
 * wraps mod 2^16, so the result is exact whenever the true total is in range, whatever the
 * order of the partial sums. madd(acc16, 1) then widens pairs into int32 once per group. */
#define INT16_BLOCKS 16
#define MIN_ROWS_PER_CHUNK 32
#define CHUNKS_PER_THREAD 4 /* long sequential runs for the prefetchers, some balancing */
/* bytes ahead of the current block to prefetch: the matmul does ~16 µops per 32 bytes, so
 * the out-of-order window alone keeps too few cache misses in flight to fill the memory
 * bus; an explicit prefetch this far ahead does (measured on the 2B-4T shapes) */
#define PREFETCH_BYTES 2048

/* ---------------------------------------------------------------- quantization ---- */

static void quantize_row_scalar(const float *x, size_t k, int8_t *q, float *scale,
                                int32_t *sum) {
    float absmax = 0.0f;
    for (size_t i = 0; i < k; i++) absmax = fmaxf(absmax, fabsf(x[i]));
    float s = 127.0f / fmaxf(absmax, 1e-5f);
    int32_t total = 0;
    for (size_t i = 0; i < k; i++) {
        float r = nearbyintf(x[i] * s); /* default rounding mode: half to even */
        r = fminf(fmaxf(r, -128.0f), 127.0f);
        q[i] = (int8_t)r;
        total += q[i];
    }
    *scale = s;
    *sum = total;
}

#if BITSERVE_X86
TARGET_AVX2 static float hmax_ps(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

TARGET_AVX2 static int32_t hsum_epi32(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

TARGET_AVX2 static void quantize_row_avx2(const float *x, size_t k, int8_t *q, float *scale,
                                          int32_t *sum) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 vmax = _mm256_setzero_ps();
    size_t i = 0;
    for (; i + 8 <= k; i += 8) vmax = _mm256_max_ps(vmax, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    float absmax = hmax_ps(vmax);
    for (; i < k; i++) absmax = fmaxf(absmax, fabsf(x[i]));
    float s = 127.0f / fmaxf(absmax, 1e-5f);
    const __m256 vs = _mm256_set1_ps(s), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i vsum = _mm256_setzero_si256();
    for (i = 0; i + 32 <= k; i += 32) {
        __m256i w[4];
        for (int j = 0; j < 4; j++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(_mm256_loadu_ps(x + i + 8 * j), vs),
                                       _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            w[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
            vsum = _mm256_add_epi32(vsum, w[j]);
        }
        /* packs work per 128-bit lane: the permute restores element order */
        __m256i a = _mm256_packs_epi32(w[0], w[1]), b = _mm256_packs_epi32(w[2], w[3]);
        __m256i bytes = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, b), order);
        _mm256_storeu_si256((__m256i *)(q + i), bytes);
    }
    int32_t total = hsum_epi32(vsum);
    for (; i < k; i++) {
        float r = fminf(fmaxf(nearbyintf(x[i] * s), -128.0f), 127.0f);
        q[i] = (int8_t)r;
        total += q[i];
    }
    *scale = s;
    *sum = total;
}
#endif

typedef struct {
    KernelImpl impl;
    const float *x;
    size_t n_tokens, k;
    int8_t *q;
    float *scale;
    int32_t *sum;
} QuantTask;

void quantize_one(KernelImpl impl, const float *x, size_t k, int8_t *q, float *scale,
                  int32_t *sum) {
#if BITSERVE_X86
    if (impl >= IMPL_AVX2) {
        quantize_row_avx2(x, k, q, scale, sum);
        return;
    }
#endif
    quantize_row_scalar(x, k, q, scale, sum);
}

static void quantize_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    QuantTask *t = ctx;
    size_t row = (size_t)chunk;
    quantize_one(t->impl, t->x + row * t->k, t->k, t->q + row * t->k, t->scale + row, t->sum + row);
}

void quantize_rows(Pool *pool, KernelImpl impl, const float *x, size_t n_tokens, size_t k,
                   int8_t *q, float *scale, int32_t *sum) {
    QuantTask task = {impl, x, n_tokens, k, q, scale, sum};
    if (n_tokens == 1) { /* one row: not worth waking the workers */
        quantize_chunk(&task, 0, 0);
        return;
    }
    pool_run(pool, quantize_chunk, &task, (int)n_tokens);
}

/* ---------------------------------------------------------------- ternary dot products ---- */

/* Block b of a row whose 64-byte lines (two blocks each) are `ls` bytes apart: 64 in the
 * plain layout (so b·32), 64·TILE_ROWS in the tiled one (native.h) */
static inline const uint8_t *block_at(const uint8_t *row, size_t ls, size_t b) {
    return row + (b >> 1) * ls + (b & 1) * BLOCK_BYTES;
}

/* Σ_k c[r,k]·q[t,k] for one row and one token, scalar: the portable reference path. */
static int32_t row_dot_scalar(const uint8_t *codes, size_t ls, const int8_t *q, size_t n_blocks) {
    int32_t acc = 0;
    for (size_t b = 0; b < n_blocks; b++) {
        const uint8_t *c = block_at(codes, ls, b);
        const int8_t *qb = q + b * BLOCK;
        for (int j = 0; j < BLOCK_BYTES; j++) {
            acc += ((c[j] >> 6) & 3) * qb[j] + ((c[j] >> 4) & 3) * qb[32 + j] +
                   ((c[j] >> 2) & 3) * qb[64 + j] + (c[j] & 3) * qb[96 + j];
        }
    }
    return acc;
}

#if BITSERVE_X86
/* Rows in one call: 2 in decode (ROW_PAIR), else 1 */
#define ROW_PAIR 2
/* Decode reads rows longer than this many blocks in K segments (pairs_avx2), this many
 * rows at a time */
#define K_CHUNK_BLOCKS 64
#define K_GROUP_ROWS 32

/* NR rows against TT tokens: each block of each row is unpacked once and used TT times, and
 * the NR rows share one loop, their chains interleaving. maddubs sums pairs of u8×i8
 * products into int16 (|pair| <= 512); sums of up to INT16_BLOCKS blocks stay in int16 and
 * are widened with madd(·, 1) into int32. always_inline + constant NR and TT let the
 * compiler keep the accumulators in registers. Every sum is the same exact integer whatever
 * NR and TT are. Decode (TT = 1) takes rows in pairs: on a Zen 1, 2 threads, 2B-4T shapes,
 * the ternary projections of a decode step went 52.4 -> 49.1 ms (best of 8, three
 * alternating runs each). Prefill tiles take one row: two rows' int16 and int32
 * accumulators for TOKEN_TILE tokens alone fill AVX2's 16 ymm registers. dots is [NR][TT]. */
TARGET_AVX2 static inline __attribute__((always_inline)) void rows_dots_avx2(
    const uint8_t *const *rows, size_t ls, const int8_t *q, size_t q_stride, size_t n_blocks,
    const int nr, const int tt, size_t pf, int32_t *dots) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    __m256i acc32[ROW_PAIR][TOKEN_TILE], acc16[ROW_PAIR][TOKEN_TILE];
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < tt; t++) acc32[r][t] = _mm256_setzero_si256();
    for (size_t b0 = 0; b0 < n_blocks; b0 += INT16_BLOCKS) {
        size_t b1 = b0 + INT16_BLOCKS < n_blocks ? b0 + INT16_BLOCKS : n_blocks;
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < tt; t++) acc16[r][t] = _mm256_setzero_si256();
        for (size_t b = b0; b < b1; b++) {
            /* every row's code planes first, then the products: with each row unpacked just
             * before its own products, 2B-4T-shaped decode ran 2-5% slower on a Zen 1 */
            __m256i c[ROW_PAIR][4];
            for (int r = 0; r < nr; r++) {
                const uint8_t *block = block_at(rows[r], ls, b);
                _mm_prefetch((const char *)(block + pf), _MM_HINT_T0);
                __m256i raw = _mm256_loadu_si256((const __m256i *)block);
                c[r][0] = _mm256_and_si256(_mm256_srli_epi16(raw, 6), mask);
                c[r][1] = _mm256_and_si256(_mm256_srli_epi16(raw, 4), mask);
                c[r][2] = _mm256_and_si256(_mm256_srli_epi16(raw, 2), mask);
                c[r][3] = _mm256_and_si256(raw, mask);
            }
            for (int r = 0; r < nr; r++)
                for (int t = 0; t < tt; t++) {
                    const __m256i *qb = (const __m256i *)(q + (size_t)t * q_stride + b * BLOCK);
                    __m256i p0 = _mm256_maddubs_epi16(c[r][0], _mm256_loadu_si256(qb));
                    __m256i p1 = _mm256_maddubs_epi16(c[r][1], _mm256_loadu_si256(qb + 1));
                    __m256i p2 = _mm256_maddubs_epi16(c[r][2], _mm256_loadu_si256(qb + 2));
                    __m256i p3 = _mm256_maddubs_epi16(c[r][3], _mm256_loadu_si256(qb + 3));
                    acc16[r][t] = _mm256_add_epi16(
                        acc16[r][t], _mm256_add_epi16(_mm256_add_epi16(p0, p1), _mm256_add_epi16(p2, p3)));
                }
        }
        for (int r = 0; r < nr; r++)
            for (int t = 0; t < tt; t++)
                acc32[r][t] = _mm256_add_epi32(acc32[r][t], _mm256_madd_epi16(acc16[r][t], ones));
    }
    for (int r = 0; r < nr; r++)
        for (int t = 0; t < tt; t++) dots[r * tt + t] = hsum_epi32(acc32[r][t]);
}

/* One row against a token tile: one specialization per tile width */
TARGET_AVX2 static void row_dots_avx2(const uint8_t *codes, size_t ls, const int8_t *q,
                                      size_t q_stride, size_t n_blocks, int tt, int32_t *dots) {
    const uint8_t *const rows[1] = {codes};
    switch (tt) {
    case 4: rows_dots_avx2(rows, ls, q, q_stride, n_blocks, 1, 4, PREFETCH_BYTES, dots); break;
    case 3: rows_dots_avx2(rows, ls, q, q_stride, n_blocks, 1, 3, PREFETCH_BYTES, dots); break;
    case 2: rows_dots_avx2(rows, ls, q, q_stride, n_blocks, 1, 2, PREFETCH_BYTES, dots); break;
    default: rows_dots_avx2(rows, ls, q, q_stride, n_blocks, 1, 1, PREFETCH_BYTES, dots); break;
    }
}

/* A pair of rows against one token (decode), each row prefetching its own line
 * PREFETCH_BYTES ahead; and a pair of plain rows' segments prefetching `pf` bytes ahead
 * (pairs_avx2). Small functions of their own, with a constant distance where it can be. */
TARGET_AVX2 static void pair_dots_avx2(const uint8_t *const rows[ROW_PAIR], size_t ls,
                                       const int8_t *q, size_t n_blocks, int32_t dots[ROW_PAIR]) {
    rows_dots_avx2(rows, ls, q, 0, n_blocks, ROW_PAIR, 1, PREFETCH_BYTES, dots);
}

TARGET_AVX2 static void pair_segments_avx2(const uint8_t *const rows[ROW_PAIR], size_t ls,
                                           const int8_t *q, size_t n_blocks, size_t pf,
                                           int32_t dots[ROW_PAIR]) {
    rows_dots_avx2(rows, ls, q, 0, n_blocks, ROW_PAIR, 1, pf, dots);
}
#endif

/* ---------------------------------------------------------------- matmul task ---- */

typedef struct {
    KernelImpl impl;
    const uint8_t *codes;
    int tiled; /* the tiled layout (native.h) */
    size_t n_out, n_in;
    float w_scale;
    const int8_t *q;
    const float *scale; /* NULL: store the int32 dot products in acc instead of y */
    const int32_t *sum;
    size_t n_tokens;
    float *y;
    int32_t *acc;
    size_t rows_per_chunk; /* set by run_matmul from the thread count */
    const int8_t *qp;      /* AVX-512: q in pair order (permute_pairs) */
    size_t qp_stride;
    int gfni; /* AVX-512 with GFNI: one-instruction code planes */
} MatmulTask;

/* Row r's codes and the distance between its 64-byte lines (`ls`), in either layout */
static const uint8_t *row_codes(const MatmulTask *m, size_t r, size_t *ls) {
    size_t row_bytes = m->n_in / 4, n_tiled = m->tiled ? m->n_out / TILE_ROWS * TILE_ROWS : 0;
    if (r >= n_tiled) {
        *ls = 64;
        return m->codes + r * row_bytes;
    }
    *ls = 64 * TILE_ROWS;
    return m->codes + (r - r % TILE_ROWS) * row_bytes + 64 * (r % TILE_ROWS);
}

/* One row's dot products (Σ c·q) with tokens [t0, t0+tt) → y (or acc): Σ (c-1)·q scaled.
 * The AVX-512 tiles store theirs with store_tile_avx512, the same float32 operations. */
static void store_dots(const MatmulTask *m, size_t row, size_t t0, int tt, const int32_t *dots) {
    for (int t = 0; t < tt; t++) {
        size_t tok = t0 + (size_t)t;
        int32_t dot = dots[t] - m->sum[tok];
        if (m->scale)
            m->y[tok * m->n_out + row] = (float)dot / m->scale[tok] * m->w_scale;
        else
            m->acc[tok * m->n_out + row] = dot;
    }
}

#if BITSERVE_X86
/* Rows [r0, r1) against tokens [t0, t0+tt) on AVX-512: tiles of 4 rows, each against all
 * tt <= TOKEN_TILE tokens at once. */
_Static_assert(TOKEN_TILE <= PAIR_TILE_TOKENS, "a token tile must fit one AVX-512 register tile");
_Static_assert(TILE_ROWS == PAIR_TILE_ROWS, "a tiled run of rows is one AVX-512 register tile");
static void rows_avx512(const MatmulTask *m, size_t r0, size_t r1, size_t t0, int tt) {
    size_t n_blocks = m->n_in / BLOCK, nr = PAIR_TILE_ROWS, ls = 64;
    int32_t dots[PAIR_TILE_TOKENS][PAIR_TILE_ROWS];
    for (size_t r = r0; r < r1; r += nr) { /* r % nr == 0: a tile's rows share one layout */
        const uint8_t *rows[PAIR_TILE_ROWS];
        size_t n = r1 - r < nr ? r1 - r : nr;
        for (size_t i = 0; i < nr; i++) rows[i] = row_codes(m, r + (i < n ? i : 0), &ls);
        pair_dots_avx512(rows, ls, m->qp + t0 * m->qp_stride, m->qp_stride, n_blocks, tt, m->gfni, dots);
        size_t at = t0 * m->n_out + r;
        store_tile_avx512(dots, tt, n, m->sum + t0, m->scale ? m->scale + t0 : NULL, m->w_scale,
                          m->y ? m->y + at : NULL, m->acc ? m->acc + at : NULL, m->n_out);
    }
}
#endif

#if BITSERVE_X86
/* Decode (one token, q): rows [r, r1) in pairs, stored; returns the first row left (the last
 * of an odd count, or where the tiled rows meet the plain ones). Rows longer than
 * K_CHUNK_BLOCKS blocks go K_GROUP_ROWS rows at a time, a K segment of each per pass (a
 * token's q segment then stays in L1 while the rows stream past it), each pair prefetching
 * the next pair's segment rather than its own row's next lines. Zen 1, Falcon3-7B's down
 * projection (3072 x 23040): 38-40 -> 48-49 G MAC/s, a decode step 188 -> 180 ms; the
 * segments with the rows' own prefetch were no faster. The integer sums are the same. */
static size_t pairs_avx2(const MatmulTask *m, size_t r, size_t r1, size_t t0, const int8_t *q) {
    size_t n_blocks = m->n_in / BLOCK, row_bytes = m->n_in / 4, ls, lb;
    int32_t dots[ROW_PAIR];
    if (n_blocks > K_CHUNK_BLOCKS && !m->tiled) { /* plain rows: a pair is 2 rows apart */
        size_t n_segments = (n_blocks + K_CHUNK_BLOCKS - 1) / K_CHUNK_BLOCKS;
        size_t seg = (n_blocks + n_segments - 1) / n_segments; /* even segments */
        for (; r + K_GROUP_ROWS <= r1; r += K_GROUP_ROWS) {
            int32_t total[K_GROUP_ROWS] = {0};
            for (size_t kb = 0; kb < n_blocks; kb += seg) {
                size_t nb = n_blocks - kb < seg ? n_blocks - kb : seg;
                for (size_t i = 0; i < K_GROUP_ROWS; i += ROW_PAIR) {
                    const uint8_t *rows[ROW_PAIR];
                    for (size_t j = 0; j < ROW_PAIR; j++) {
                        const uint8_t *row = row_codes(m, r + i + j, &ls);
                        rows[j] = block_at(row, ls, kb);
                    }
                    pair_segments_avx2(rows, ls, q + kb * BLOCK, nb, ROW_PAIR * row_bytes, dots);
                    total[i] += dots[0];
                    total[i + 1] += dots[1];
                }
            }
            for (size_t i = 0; i < K_GROUP_ROWS; i++) store_dots(m, r + i, t0, 1, total + i);
        }
    }
    for (; r + ROW_PAIR <= r1; r += ROW_PAIR) {
        const uint8_t *rows[ROW_PAIR] = {row_codes(m, r, &ls), row_codes(m, r + 1, &lb)};
        if (lb != ls) break; /* the pair straddles the tiled and plain rows */
        pair_dots_avx2(rows, ls, q, n_blocks, dots);
        store_dots(m, r, t0, 1, dots);
        store_dots(m, r + 1, t0, 1, dots + 1);
    }
    return r;
}
#endif

/* Rows [r0, r1) against tokens [t0, t0+tt): AVX2 in pairs when decoding (tt = 1), else one
 * row at a time against the tile; the scalar path one row at a time. */
static void rows_avx2_or_scalar(const MatmulTask *m, size_t r0, size_t r1, size_t t0, int tt) {
    size_t n_blocks = m->n_in / BLOCK, ls;
    const int8_t *q = m->q + t0 * m->n_in;
    int32_t dots[TOKEN_TILE];
    size_t r = r0;
#if BITSERVE_X86
    if (m->impl == IMPL_AVX2 && tt == 1) r = pairs_avx2(m, r, r1, t0, q);
#endif
    for (; r < r1; r++) {
        const uint8_t *codes = row_codes(m, r, &ls);
#if BITSERVE_X86
        if (m->impl == IMPL_AVX2) {
            row_dots_avx2(codes, ls, q, m->n_in, n_blocks, tt, dots);
            store_dots(m, r, t0, tt, dots);
            continue;
        }
#endif
        for (int t = 0; t < tt; t++) dots[t] = row_dot_scalar(codes, ls, q + (size_t)t * m->n_in, n_blocks);
        store_dots(m, r, t0, tt, dots);
    }
}

/* Rows [chunk·rows_per_chunk, +rows_per_chunk) against every token, in token tiles. Every
 * dot product is an exact integer, so the result does not depend on the tiling, on T or on
 * the thread count (batch invariance holds bit for bit). */
static void matmul_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const MatmulTask *m = ctx;
    size_t r0 = (size_t)chunk * m->rows_per_chunk;
    size_t r1 = r0 + m->rows_per_chunk < m->n_out ? r0 + m->rows_per_chunk : m->n_out;
    for (size_t t0 = 0; t0 < m->n_tokens; t0 += TOKEN_TILE) {
        int tt = (int)(m->n_tokens - t0 < TOKEN_TILE ? m->n_tokens - t0 : TOKEN_TILE);
#if BITSERVE_X86
        if (m->impl == IMPL_AVX512) {
            rows_avx512(m, r0, r1, t0, tt);
            continue;
        }
#endif
        rows_avx2_or_scalar(m, r0, r1, t0, tt);
    }
}

/* The AVX-512 pair order of q (pool_reserve_act sized qp), once per call. */
static void permute_tokens(Pool *pool, MatmulTask *task) {
    if (task->impl != IMPL_AVX512) return;
    size_t n_blocks = task->n_in / BLOCK;
    task->qp_stride = (n_blocks + 1) / 2 * 256;
    for (size_t t = 0; t < task->n_tokens; t++)
        permute_pairs(task->q + t * task->n_in, n_blocks, pool->qp + t * task->qp_stride);
    task->qp = pool->qp;
    task->gfni = pool->gfni;
}

/* rows_per_chunk for the thread count, whole tiles of rows (each AVX-512 tile of a tiled
 * weight is one run of its lines); returns the chunk count */
static int split_rows(const Pool *pool, MatmulTask *task) {
    size_t parts = (size_t)pool->n_threads * CHUNKS_PER_THREAD;
    size_t rows = (task->n_out + parts - 1) / parts;
    rows = (rows + TILE_ROWS - 1) / TILE_ROWS * TILE_ROWS;
    task->rows_per_chunk = rows < MIN_ROWS_PER_CHUNK ? MIN_ROWS_PER_CHUNK : rows;
    return (int)((task->n_out + task->rows_per_chunk - 1) / task->rows_per_chunk);
}

static void run_matmul(Pool *pool, MatmulTask *task) {
    permute_tokens(pool, task);
    pool_run(pool, matmul_chunk, task, split_rows(pool, task));
}

void ternary_matmul_many(Pool *pool, KernelImpl impl, int n, const uint8_t *const codes[],
                         const int tiled[], const size_t n_out[], size_t n_in, const float w_scale[],
                         const int8_t *q, const float *scale, const int32_t *sum, size_t n_tokens,
                         float *const y[]) {
    MatmulTask tasks[POOL_MAX_FUSED];
    FusedTask fused = {.n = n};
    for (int i = 0; i < n; i++) {
        tasks[i] = (MatmulTask){impl, codes[i], tiled[i], n_out[i], n_in, w_scale[i], q, scale, sum, n_tokens, y[i], NULL, 0, NULL, 0, 0};
        if (i == 0)
            permute_tokens(pool, &tasks[0]);
        else /* the same tokens: share their permuted copy */
            tasks[i].qp = tasks[0].qp, tasks[i].qp_stride = tasks[0].qp_stride, tasks[i].gfni = tasks[0].gfni;
        fused.fn[i] = matmul_chunk;
        fused.ctx[i] = &tasks[i];
        fused.first[i + 1] = fused.first[i] + split_rows(pool, &tasks[i]);
    }
    pool_run_fused(pool, &fused);
}

void ternary_matmul(Pool *pool, KernelImpl impl, const uint8_t *codes, int tiled, size_t n_out,
                    size_t n_in, float w_scale, const int8_t *q, const float *scale,
                    const int32_t *sum, size_t n_tokens, float *y) {
    MatmulTask task = {impl, codes, tiled, n_out, n_in, w_scale, q, scale, sum, n_tokens, y, NULL, 0, NULL, 0, 0};
    run_matmul(pool, &task);
}

void ternary_matmul_int(Pool *pool, KernelImpl impl, const uint8_t *codes, int tiled, size_t n_out,
                        size_t n_in, const int8_t *q, const int32_t *sum, size_t n_tokens,
                        int32_t *acc) {
    MatmulTask task = {impl, codes, tiled, n_out, n_in, 0.0f, q, NULL, sum, n_tokens, NULL, acc, 0, NULL, 0, 0};
    run_matmul(pool, &task);
}
