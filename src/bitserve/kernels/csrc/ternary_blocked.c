/* The block-scaled ternary matmul: TQ1_0, TQ2_0 and Q2_0 (g64/g128) weights with their
 * per-block f16 scales, repacked at load into super-blocks of 256 weights (64 bytes; see
 * bitserve/kernels/tensors.py): byte 4L+i holds, in bits 2j..2j+1, the code (weight + 1, 0..3)
 * of weight 16L+4j+i. A 32-bit lane L of one 64-byte load then sums exactly the 16 weights
 * 16L..16L+15: one group scale (64/128/256 weights) and one 32-activation block per lane, so
 * scales are applied per lane, never per product, and no horizontal sum happens before the
 * end of the row.
 *
 * Activations are prepared once per call per token (prep_token): int8 q, per token (BitNet:
 * absmax over the row) or per 32 (BLOCK32: llama.cpp's Q8_0 rule with f32 scales), then
 * permuted into lane order (act vector j of a super-block, byte 4L+i = q[16L+4j+i]), with a
 * lane init vector (−Σq of each 32-block in its even lane: Σ(c−1)·q = Σc·q − Σq, exact) and,
 * for BLOCK32, the act scale of each lane. Per (row, token), over super-blocks u in order:
 *     P[L]  = init[L] + Σ c·q                          (int32, exact: vpdpbusd / maddubs)
 *     per token: acc[L] += d[L] · (float)P[L]          (float32, separate mul and add)
 *     BLOCK32:   acc[L] += d[L] · ((float)P[L] · a[L])
 *     y = tree16(acc)  (lanes i+8, i+4, i+2, i+1 folded onto i), per token: y / s; then
 *     y · out_scale (1 unless the file has a separate output scale: exact then)
 * Every path does exactly these float operations per lane (-std=c11 never contracts them
 * into FMAs), so scalar, AVX2 and AVX-512 agree bit for bit with each other and with the
 * numpy oracle (reference.bitlinear_blocked), whatever T, the tiling or the thread count.
 */
#include <math.h>
#include <string.h>

#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>
#endif

#define SB 256
#define SB_BYTES 64
#define SB_LANES 16
#define AVX2_TOKENS 4 /* tokens per pass over a row on AVX2 (rows_avx2) */
/* TILE_ROWS (native.h): rows of an AVX-512 tile, and the unit of a row block */
#define MIN_ROWS_PER_CHUNK 32
#define CHUNKS_PER_THREAD 4
/* rows whose codes one pass over a token group keeps in L2 (bytes), see blocked_chunk */
#define ROW_BLOCK_BYTES (128u << 10)
/* A tile's rows are contiguous, so the tiles of a chunk are one linear stream, prefetched
 * this far ahead of the tile being read, or one whole tile ahead when tiles are longer (wide
 * rows: at K = 12288 a tile is 12 KB, and 8 KB ahead left most of it to the hardware
 * prefetchers, which follow 4 interleaved streams poorly: Bonsai-8B's down projection, one
 * thread from DRAM, best of 12, went from 12.7-17.3 to 27-28 GB/s) */
#define BLOCKED_PREFETCH_BYTES 8192
#define PREFETCH_L1_BYTES (24u << 10) /* of Zen 4's 32 KB L1d */

/* ---------------------------------------------------------------- activation prep ---- */

size_t blocked_act_stride(size_t n_super) { return n_super * (SB + 2 * SB_LANES * 4); }

/* BLOCK32 quantization of one row (k a multiple of 32): per block d = absmax / 127,
 * q = clamp(rint(x · (127 / absmax)), −128, 127); an all-zero block gives d = 0, q = 0. */
static void quantize_block32_scalar(const float *x, size_t k, int8_t *q, float *d) {
    for (size_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        float amax = 0.0f;
        for (int i = 0; i < 32; i++) amax = fmaxf(amax, fabsf(xb[i]));
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        for (int i = 0; i < 32; i++) {
            float r = fminf(fmaxf(nearbyintf(xb[i] * inv), -128.0f), 127.0f);
            q[32 * b + (size_t)i] = (int8_t)r;
        }
    }
}

#if BITSERVE_X86
/* the same operations 8 at a time: max (exact in any order), IEEE mul, round to nearest even */
TARGET_AVX2 static void quantize_block32_avx2(const float *x, size_t k, int8_t *q, float *d) {
    const __m256 sign = _mm256_set1_ps(-0.0f), lo = _mm256_set1_ps(-128.0f), hi = _mm256_set1_ps(127.0f);
    const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    for (size_t b = 0; b < k / 32; b++) {
        const float *xb = x + 32 * b;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int j = 0; j < 4; j++) {
            v[j] = _mm256_loadu_ps(xb + 8 * j);
            m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
        }
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        h = _mm_max_ss(h, _mm_shuffle_ps(h, h, 1));
        float amax = _mm_cvtss_f32(h);
        float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
        d[b] = amax / 127.0f;
        const __m256 vinv = _mm256_set1_ps(inv);
        __m256i w[4];
        for (int j = 0; j < 4; j++) {
            __m256 r = _mm256_round_ps(_mm256_mul_ps(v[j], vinv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
            w[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(r, lo), hi));
        }
        __m256i a = _mm256_packs_epi32(w[0], w[1]), c = _mm256_packs_epi32(w[2], w[3]);
        _mm256_storeu_si256((__m256i *)(q + 32 * b), _mm256_permutevar8x32_epi32(_mm256_packs_epi16(a, c), order));
    }
}
#endif

static void quantize_block32(KernelImpl impl, const float *x, size_t k, int8_t *q, float *d) {
#if BITSERVE_X86
    if (impl >= IMPL_AVX2) {
        quantize_block32_avx2(x, k, q, d);
        return;
    }
#endif
    (void)impl;
    quantize_block32_scalar(x, k, q, d);
}

typedef struct {
    KernelImpl impl;
    const float *x;
    size_t k, n_super;
    int block32;
    int8_t *q;        /* scratch [T, 256·n_super] natural order */
    uint8_t *act;     /* [T, stride] prepared records */
    float *tok_scale; /* [T] per-token scale s (unused with BLOCK32) */
} PrepTask;

/* token t: quantize, pad with zeros to whole super-blocks, write its record */
static void prep_token(void *ctx, int chunk, int thread) {
    (void)thread;
    const PrepTask *p = ctx;
    size_t t = (size_t)chunk, kp = p->n_super * SB;
    int8_t *q = p->q + t * kp;
    uint8_t *rec = p->act + t * blocked_act_stride(p->n_super);
    int8_t *qp = (int8_t *)rec;
    int32_t *init = (int32_t *)(rec + kp);
    float *alane = (float *)(rec + kp + p->n_super * SB_LANES * 4);
    float d[SB / 32];
    memset(q + p->k, 0, kp - p->k);
    if (!p->block32) {
        int32_t unused_sum;
        quantize_one(p->impl, p->x + t * p->k, p->k, q, p->tok_scale + t, &unused_sum);
    }
    for (size_t u = 0; u < p->n_super; u++) {
        const int8_t *qu = q + u * SB;
        if (p->block32) {
            size_t valid = p->k > u * SB ? (p->k - u * SB < SB ? p->k - u * SB : SB) : 0;
            memset(d, 0, sizeof(d));
            quantize_block32(p->impl, p->x + t * p->k + u * SB, valid, q + u * SB, d);
        }
        for (int s = 0; s < SB / 32; s++) {
            int32_t sum = 0;
            for (int i = 0; i < 32; i++) sum += qu[32 * s + i];
            init[u * SB_LANES + 2 * (size_t)s] = -sum;
            init[u * SB_LANES + 2 * (size_t)s + 1] = 0;
            alane[u * SB_LANES + 2 * (size_t)s] = alane[u * SB_LANES + 2 * (size_t)s + 1] = d[s];
        }
        for (int l = 0; l < SB_LANES; l++) /* lane L of act vector j: q[16L + 4j .. +3] */
            for (int j = 0; j < 4; j++) memcpy(qp + u * SB + 64 * j + 4 * l, qu + 16 * l + 4 * j, 4);
    }
}

/* ---------------------------------------------------------------- per-lane scales ---- */

/* f32 scale of each of the 16 lanes of super-block u of one row (gps groups per super-block) */
static void lane_scales(const uint16_t *scales, size_t u, int gps, float out[SB_LANES]) {
    for (int l = 0; l < SB_LANES; l++) out[l] = half_to_float(scales[u * (size_t)gps + (size_t)(l * gps / SB_LANES)]);
}

static float tree16(const float v[SB_LANES]) {
    float a[8], b[4], c[2];
    for (int i = 0; i < 8; i++) a[i] = v[i] + v[i + 8];
    for (int i = 0; i < 4; i++) b[i] = a[i] + a[i + 4];
    for (int i = 0; i < 2; i++) c[i] = b[i] + b[i + 2];
    return c[0] + c[1];
}

/* ---------------------------------------------------------------- the matmul ---- */

typedef struct {
    KernelImpl impl;
    const uint8_t *codes;   /* [n_out, 64·n_super] */
    const uint16_t *scales; /* f16 [n_out, gps·n_super] */
    size_t n_out, n_super;
    int gps, block32, gfni;
    float out_scale;
    const uint8_t *act; /* prepared tokens, blocked_act_stride apart */
    const float *tok_scale;
    size_t n_tokens;
    float *y; /* [T, n_out] */
    size_t rows_per_chunk, rows_per_block;
} BlockedTask;

static const uint8_t *rec_of(const BlockedTask *m, size_t t) { return m->act + t * blocked_act_stride(m->n_super); }

static float finish(const BlockedTask *m, const float acc[SB_LANES], size_t t) {
    float y = tree16(acc);
    return (m->block32 ? y : y / m->tok_scale[t]) * m->out_scale;
}

static void row_scalar(const BlockedTask *m, size_t r, size_t t) {
    const uint8_t *codes = m->codes + r * m->n_super * SB_BYTES, *rec = rec_of(m, t);
    const uint16_t *scales = m->scales + r * m->n_super * (size_t)m->gps;
    size_t kp = m->n_super * SB;
    const int8_t *qp = (const int8_t *)rec;
    const int32_t *init = (const int32_t *)(rec + kp);
    const float *alane = (const float *)(rec + kp + m->n_super * SB_LANES * 4);
    float acc[SB_LANES] = {0}, d[SB_LANES];
    for (size_t u = 0; u < m->n_super; u++) {
        lane_scales(scales, u, m->gps, d);
        for (int l = 0; l < SB_LANES; l++) {
            int32_t p = init[u * SB_LANES + (size_t)l];
            for (int j = 0; j < 4; j++)
                for (int i = 0; i < 4; i++)
                    p += ((codes[u * SB_BYTES + 4 * (size_t)l + (size_t)i] >> (2 * j)) & 3) *
                         qp[u * SB + 64 * (size_t)j + 4 * (size_t)l + (size_t)i];
            float f = (float)p;
            if (m->block32) f = f * alane[u * SB_LANES + (size_t)l];
            acc[l] = acc[l] + d[l] * f;
        }
    }
    m->y[t * m->n_out + r] = finish(m, acc, t);
}

#if BITSERVE_X86
/* ---- AVX2: one row × up to AVX2_TOKENS tokens, or two rows × one token, each super-block
 * as two 128-weight halves (lanes 0-7, 8-15) with their own float accumulators, folded first
 * at the end as tree16 does. Measured on Zen 1 (AVX2 runs as 128-bit halves, maddubs has one
 * pipe, so unpacking the codes competes with the products), 2 threads:
 *   - each half's code planes are unpacked once for all the tokens: 4 tokens a pass instead
 *     of 2 prefilled Bonsai-8B-shaped Q2_0 8% faster (3 alternating bench pairs, 4.61 ->
 *     4.99 tok/s);
 *   - decoding one or two groups per super-block, rows go in pairs that share the token's
 *     loads: a 4608x3072 TQ2_0-grouped weight 7% faster (with Q2_0's four groups pairs were
 *     slower, see blocked_chunk). ---- */

/* the 8 f32 lane scales of half h of super-block u, converted by F16C (exact, as
 * half_to_float; the software conversion made T = 1 with one or two groups per super-block
 * 1.6x slower than with four, on Zen 1) */
TARGET_AVX2 static inline __attribute__((always_inline)) __m256 half_scales(const uint16_t *scales, size_t u, int gps, int h) {
    if (gps <= 2) {
        uint16_t one = scales[gps == 1 ? u : 2 * u + (size_t)h];
        return _mm256_broadcastss_ps(_mm_cvtph_ps(_mm_cvtsi32_si128(one)));
    }
    __m128 f = _mm_cvtph_ps(_mm_loadl_epi64((const __m128i *)(scales + 4 * u)));
    __m256i idx = h ? _mm256_setr_epi32(2, 2, 2, 2, 3, 3, 3, 3) : _mm256_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1);
    return _mm256_permutevar8x32_ps(_mm256_castps128_ps256(f), idx);
}

TARGET_AVX2 static inline float tree8_avx2(__m256 lo, __m256 hi) {
    __m256 a = _mm256_add_ps(lo, hi);
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

/* Rows r..r+nr-1 (nr <= 2) × tokens t0..t0+tt-1 (tt <= AVX2_TOKENS; nr·tt <= AVX2_TOKENS).
 * GPS and B32 (groups per super-block, BLOCK32) are compile-time constants at each call. */
TARGET_AVX2 static inline __attribute__((always_inline)) void rows_avx2(const BlockedTask *m, size_t r, size_t t0,
                                                                         const int tt, const int nr, const int gps,
                                                                         const int b32) {
    const __m256i mask = _mm256_set1_epi8(3), ones = _mm256_set1_epi16(1);
    size_t kp = m->n_super * SB;
    const uint8_t *codes[2];
    const uint16_t *scales[2];
    for (int i = 0; i < nr; i++) {
        codes[i] = m->codes + (r + (size_t)i) * m->n_super * SB_BYTES;
        scales[i] = m->scales + (r + (size_t)i) * m->n_super * (size_t)gps;
    }
    const uint8_t *rec[AVX2_TOKENS];
    __m256 acc[2][AVX2_TOKENS][2];
    for (int t = 0; t < tt; t++) {
        rec[t] = rec_of(m, t0 + (size_t)t);
        for (int i = 0; i < nr; i++) acc[i][t][0] = acc[i][t][1] = _mm256_setzero_ps();
    }
    for (size_t u = 0; u < m->n_super; u++) {
        for (int i = 0; i < nr; i++) _mm_prefetch((const char *)(codes[i] + u * SB_BYTES + 1024), _MM_HINT_T0);
        for (int h = 0; h < 2; h++) {
            __m256i raw[2];
            __m256 d[2];
            for (int i = 0; i < nr; i++) {
                raw[i] = _mm256_loadu_si256((const __m256i *)(codes[i] + u * SB_BYTES + 32 * (size_t)h));
                d[i] = half_scales(scales[i], u, gps, h);
            }
            for (int t = 0; t < tt; t++) {
                const int8_t *qp = (const int8_t *)rec[t] + u * SB + 32 * (size_t)h;
                const int32_t *init = (const int32_t *)(rec[t] + kp) + u * SB_LANES + 8 * (size_t)h;
                __m256i s16[2] = {_mm256_setzero_si256(), _mm256_setzero_si256()};
                for (int j = 0; j < 4; j++) {
                    __m256i x = _mm256_loadu_si256((const __m256i *)(qp + 64 * j));
                    for (int i = 0; i < nr; i++) {
                        __m256i c = _mm256_and_si256(_mm256_srli_epi16(raw[i], 2 * j), mask);
                        s16[i] = _mm256_add_epi16(s16[i], _mm256_maddubs_epi16(c, x));
                    }
                }
                __m256i in = _mm256_loadu_si256((const __m256i *)init);
                for (int i = 0; i < nr; i++) {
                    __m256 f = _mm256_cvtepi32_ps(_mm256_add_epi32(_mm256_madd_epi16(s16[i], ones), in));
                    if (b32) {
                        const float *alane = (const float *)(rec[t] + kp + m->n_super * SB_LANES * 4);
                        f = _mm256_mul_ps(f, _mm256_loadu_ps(alane + u * SB_LANES + 8 * (size_t)h));
                    }
                    acc[i][t][h] = _mm256_add_ps(acc[i][t][h], _mm256_mul_ps(d[i], f));
                }
            }
        }
    }
    for (int i = 0; i < nr; i++)
        for (int t = 0; t < tt; t++) {
            float y = tree8_avx2(acc[i][t][0], acc[i][t][1]);
            size_t tok = t0 + (size_t)t;
            m->y[tok * m->n_out + r + (size_t)i] = (b32 ? y : y / m->tok_scale[tok]) * m->out_scale;
        }
}

/* ---- AVX-512: a tile of 4 rows × up to 2 tokens, one zmm per (row, token) ---- */

TARGET_AVX512 static inline __attribute__((always_inline)) __m512 sb_scales(const uint16_t *scales, size_t u, const int gps) {
    if (gps == 1) return _mm512_cvtph_ps(_mm256_set1_epi16((short)scales[u]));
    __m128i h;
    if (gps == 2) {
        uint32_t two;
        memcpy(&two, scales + 2 * u, 4);
        h = _mm_cvtsi32_si128((int)two);
    } else {
        h = _mm_loadl_epi64((const __m128i *)(scales + 4 * u));
    }
    const __m512i idx = gps == 2 ? _mm512_setr_epi32(0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1)
                                 : _mm512_setr_epi32(0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3);
    return _mm512_permutexvar_ps(idx, _mm512_castps128_ps512(_mm_cvtph_ps(h)));
}

/* code plane j (bits 2j..2j+1 of every byte, as 0..3): GFNI's affine transform moves the two
 * bits down in one instruction (matrix rows: output bit 0 ← bit 2j, bit 1 ← bit 2j+1), where
 * a shift and a mask take two (Zen 4, codes in L2: 20% faster at T=1) */
TARGET_AVX512_GFNI static inline __attribute__((always_inline)) __m512i plane(__m512i w, const int j, const int gfni) {
    if (gfni) {
        const unsigned long long rows = ((1ull << (2 * j)) << 56) | ((1ull << (2 * j + 1)) << 48);
        return _mm512_gf2p8affine_epi64_epi8(w, _mm512_set1_epi64((long long)rows), 0);
    }
    return _mm512_and_si512(_mm512_srli_epi16(w, 2 * j), _mm512_set1_epi8(3));
}

TARGET_AVX512 static inline float tree16_avx512(__m512 v) {
    __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1)));
    __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));
    return _mm_cvtss_f32(_mm_add_ss(c, _mm_shuffle_ps(c, c, 1)));
}

/* rows[0..3] (duplicates allowed; only n stored) × tokens t0..t0+tt−1 */
TARGET_AVX512_GFNI static inline __attribute__((always_inline)) void tile_avx512(
    const BlockedTask *m, size_t r, size_t n, size_t t0, const int tt, const int gps, const int block32,
    const int gfni) {
    size_t row_bytes = m->n_super * SB_BYTES, row_scales = m->n_super * (size_t)gps, kp = m->n_super * SB;
    const uint8_t *c0 = m->codes + r * row_bytes, *c1 = c0 + (n > 1) * row_bytes;
    const uint8_t *c2 = c0 + (n > 2 ? 2 : 0) * row_bytes, *c3 = c0 + (n > 3 ? 3 : 0) * row_bytes;
    const uint16_t *s0 = m->scales + r * row_scales, *s1 = s0 + (n > 1) * row_scales;
    const uint16_t *s2 = s0 + (n > 2 ? 2 : 0) * row_scales, *s3 = s0 + (n > 3 ? 3 : 0) * row_scales;
    const uint8_t *ra = rec_of(m, t0), *rb = rec_of(m, t0 + (tt > 1));
    const int32_t *ia = (const int32_t *)(ra + kp), *ib = (const int32_t *)(rb + kp);
    const float *aa = (const float *)(ra + kp + m->n_super * SB_LANES * 4);
    const float *ab = (const float *)(rb + kp + m->n_super * SB_LANES * 4);
    const size_t tile_bytes = TILE_ROWS * row_bytes, tile_scales = TILE_ROWS * row_scales * 2;
    const char *ahead = (const char *)c0 + (tile_bytes > BLOCKED_PREFETCH_BYTES ? tile_bytes : BLOCKED_PREFETCH_BYTES);
    const char *scales_ahead = (const char *)s0 + tile_scales; /* the next tile's scales */
    /* into L1 while the tokens' records and two tiles fit beside each other, else into L2 */
    const int to_l1 = (size_t)tt * blocked_act_stride(m->n_super) + 2 * tile_bytes <= PREFETCH_L1_BYTES;
    __m512 f0a = _mm512_setzero_ps(), f1a = f0a, f2a = f0a, f3a = f0a;
    __m512 f0b = f0a, f1b = f0a, f2b = f0a, f3b = f0a;
    for (size_t u = 0; u < m->n_super; u++) {
        for (int i = 0; i < TILE_ROWS; i++) {
            const char *line = ahead + (TILE_ROWS * u + (size_t)i) * SB_BYTES;
            if (to_l1)
                _mm_prefetch(line, _MM_HINT_T0);
            else
                _mm_prefetch(line, _MM_HINT_T1);
        }
        _mm_prefetch(scales_ahead + u * tile_scales / m->n_super, _MM_HINT_T1);
        __m512i w0 = _mm512_loadu_si512(c0 + u * SB_BYTES), w1 = _mm512_loadu_si512(c1 + u * SB_BYTES);
        __m512i w2 = _mm512_loadu_si512(c2 + u * SB_BYTES), w3 = _mm512_loadu_si512(c3 + u * SB_BYTES);
        __m512i init_a = _mm512_load_si512(ia + u * SB_LANES);
        __m512i p0a = init_a, p1a = init_a, p2a = init_a, p3a = init_a;
        __m512i p0b = _mm512_setzero_si512(), p1b = p0b, p2b = p0b, p3b = p0b;
        if (tt > 1) {
            __m512i init_b = _mm512_load_si512(ib + u * SB_LANES);
            p0b = p1b = p2b = p3b = init_b;
        }
        const int8_t *qa = (const int8_t *)ra + u * SB, *qb = (const int8_t *)rb + u * SB;
        for (int j = 0; j < 4; j++) {
            __m512i xa = _mm512_load_si512(qa + 64 * j), xb = tt > 1 ? _mm512_load_si512(qb + 64 * j) : xa;
            __m512i k0 = plane(w0, j, gfni), k1 = plane(w1, j, gfni);
            __m512i k2 = plane(w2, j, gfni), k3 = plane(w3, j, gfni);
            p0a = _mm512_dpbusd_epi32(p0a, k0, xa);
            p1a = _mm512_dpbusd_epi32(p1a, k1, xa);
            p2a = _mm512_dpbusd_epi32(p2a, k2, xa);
            p3a = _mm512_dpbusd_epi32(p3a, k3, xa);
            if (tt > 1) {
                p0b = _mm512_dpbusd_epi32(p0b, k0, xb);
                p1b = _mm512_dpbusd_epi32(p1b, k1, xb);
                p2b = _mm512_dpbusd_epi32(p2b, k2, xb);
                p3b = _mm512_dpbusd_epi32(p3b, k3, xb);
            }
        }
        __m512 d0 = sb_scales(s0, u, gps), d1 = sb_scales(s1, u, gps);
        __m512 d2 = sb_scales(s2, u, gps), d3 = sb_scales(s3, u, gps);
        __m512 va = block32 ? _mm512_load_ps(aa + u * SB_LANES) : _mm512_setzero_ps();
#define BLOCKED_ACC(f, p, d, a)                                                        \
    do {                                                                              \
        __m512 v_ = _mm512_cvtepi32_ps(p);                                            \
        if (block32) v_ = _mm512_mul_ps(v_, a);                                       \
        f = _mm512_add_ps(f, _mm512_mul_ps(d, v_));                                   \
    } while (0)
        BLOCKED_ACC(f0a, p0a, d0, va);
        BLOCKED_ACC(f1a, p1a, d1, va);
        BLOCKED_ACC(f2a, p2a, d2, va);
        BLOCKED_ACC(f3a, p3a, d3, va);
        if (tt > 1) {
            __m512 vb = block32 ? _mm512_load_ps(ab + u * SB_LANES) : _mm512_setzero_ps();
            BLOCKED_ACC(f0b, p0b, d0, vb);
            BLOCKED_ACC(f1b, p1b, d1, vb);
            BLOCKED_ACC(f2b, p2b, d2, vb);
            BLOCKED_ACC(f3b, p3b, d3, vb);
        }
#undef BLOCKED_ACC
    }
    __m512 fa[TILE_ROWS] = {f0a, f1a, f2a, f3a}, fb[TILE_ROWS] = {f0b, f1b, f2b, f3b};
    for (size_t i = 0; i < n; i++) {
        float ya = tree16_avx512(fa[i]);
        m->y[t0 * m->n_out + r + i] = (block32 ? ya : ya / m->tok_scale[t0]) * m->out_scale;
        if (tt > 1) {
            float yb = tree16_avx512(fb[i]);
            m->y[(t0 + 1) * m->n_out + r + i] = (block32 ? yb : yb / m->tok_scale[t0 + 1]) * m->out_scale;
        }
    }
}

/* one specialization per (tokens, groups per super-block, activation mode, GFNI) */
#define TILE_CASE(TT, GPS, B32)                                                              \
    if (m->gfni)                                                                             \
        tile_avx512(m, r, n, t0, TT, GPS, B32, 1);                                           \
    else                                                                                     \
        tile_avx512(m, r, n, t0, TT, GPS, B32, 0);
#define TILE_MODE(TT, GPS)                      \
    if (m->block32) {                           \
        TILE_CASE(TT, GPS, 1)                   \
    } else {                                    \
        TILE_CASE(TT, GPS, 0)                   \
    }
#define TILE_GPS(TT)                            \
    switch (m->gps) {                           \
    case 1: TILE_MODE(TT, 1) break;             \
    case 2: TILE_MODE(TT, 2) break;             \
    default: TILE_MODE(TT, 4) break;            \
    }
TARGET_AVX512_GFNI static void tile_any_avx512(const BlockedTask *m, size_t r, size_t n, size_t t0, int tt) {
    if (tt > 1) {
        TILE_GPS(2)
    } else {
        TILE_GPS(1)
    }
}
#undef TILE_GPS
#undef TILE_MODE
#undef TILE_CASE

#define ROWS_CASE(TT, NR, GPS)                      \
    if (m->block32)                                 \
        rows_avx2(m, r, t0, TT, NR, GPS, 1);        \
    else                                            \
        rows_avx2(m, r, t0, TT, NR, GPS, 0);
#define ROWS_GPS(TT, NR)                            \
    switch (m->gps) {                               \
    case 1: ROWS_CASE(TT, NR, 1) break;             \
    case 2: ROWS_CASE(TT, NR, 2) break;             \
    default: ROWS_CASE(TT, NR, 4) break;            \
    }
/* rows r..r+nr-1 × tokens t0..t0+tt-1: one specialization per (tokens, rows, groups per
 * super-block, activation mode), so the accumulators stay in registers and no branch is
 * left in the loop */
TARGET_AVX2 static void rows_any_avx2(const BlockedTask *m, size_t r, int nr, size_t t0, int tt) {
    if (nr == 2) { /* one or two groups per super-block only (blocked_chunk) */
        if (m->gps == 1) {
            ROWS_CASE(1, 2, 1)
        } else {
            ROWS_CASE(1, 2, 2)
        }
        return;
    }
    switch (tt) {
    case 4: ROWS_GPS(4, 1) break;
    case 3: ROWS_GPS(3, 1) break;
    case 2: ROWS_GPS(2, 1) break;
    default: ROWS_GPS(1, 1) break;
    }
}
#undef ROWS_GPS
#undef ROWS_CASE
#endif

/* Rows of one chunk, in blocks of rows_per_block (whose codes stay in L2 while every token
 * group passes over them), each block as token groups (pairs on AVX-512, AVX2_TOKENS on
 * AVX2) over tiles of rows. */
static void blocked_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const BlockedTask *m = ctx;
    size_t r0 = (size_t)chunk * m->rows_per_chunk;
    size_t r1 = r0 + m->rows_per_chunk < m->n_out ? r0 + m->rows_per_chunk : m->n_out;
    for (size_t b0 = r0; b0 < r1; b0 += m->rows_per_block) {
        size_t b1 = b0 + m->rows_per_block < r1 ? b0 + m->rows_per_block : r1;
        size_t group = m->impl == IMPL_AVX2 ? AVX2_TOKENS : 2; /* tokens sharing one pass */
        for (size_t t0 = 0; t0 < m->n_tokens; t0 += group) {
            int tt = (int)(m->n_tokens - t0 < group ? m->n_tokens - t0 : group);
#if BITSERVE_X86
            if (m->impl == IMPL_AVX512) {
                for (size_t r = b0; r < b1; r += TILE_ROWS)
                    tile_any_avx512(m, r, b1 - r < TILE_ROWS ? b1 - r : TILE_ROWS, t0, tt);
                continue;
            }
            if (m->impl == IMPL_AVX2) {
                /* decode: rows in pairs, sharing the token's loads, where a super-block has one
                 * or two groups; with four (Q2_0 g64) pairs decoded Bonsai-8B 10% slower */
                size_t r = b0;
                for (; tt == 1 && m->gps <= 2 && r + 2 <= b1; r += 2) rows_any_avx2(m, r, 2, t0, 1);
                for (; r < b1; r++) rows_any_avx2(m, r, 1, t0, tt);
                continue;
            }
#endif
            for (size_t r = b0; r < b1; r++)
                for (size_t t = t0; t < t0 + (size_t)tt; t++) row_scalar(m, r, t);
        }
    }
}

static void prepare_tokens(Pool *pool, KernelImpl impl, const BlockedWeightArgs *w, const float *x,
                           size_t n_tokens) {
    PrepTask prep = {impl, x, w->n_in, w->n_super, w->block32, pool->q, pool->blocked_act, pool->act_scale};
    if (n_tokens == 1)
        prep_token(&prep, 0, 0);
    else
        pool_run(pool, prep_token, &prep, (int)n_tokens);
}

/* the task of one weight on the prepared tokens; returns its chunk count */
static int blocked_task(const Pool *pool, KernelImpl impl, const BlockedWeightArgs *w, size_t n_tokens,
                        float *y, BlockedTask *task) {
    *task = (BlockedTask){.impl = impl,
                          .codes = w->codes,
                          .scales = w->scales,
                          .n_out = w->n_out,
                          .n_super = w->n_super,
                          .gps = w->gps,
                          .block32 = w->block32,
                          .gfni = impl == IMPL_AVX512 && pool->gfni,
                          .out_scale = w->out_scale,
                          .act = pool->blocked_act,
                          .tok_scale = pool->act_scale,
                          .n_tokens = n_tokens,
                          .y = y};
    size_t parts = (size_t)pool->n_threads * CHUNKS_PER_THREAD;
    size_t rows = (w->n_out + parts - 1) / parts;
    task->rows_per_chunk = rows < MIN_ROWS_PER_CHUNK ? MIN_ROWS_PER_CHUNK : rows;
    size_t per_block = ROW_BLOCK_BYTES / (w->n_super * SB_BYTES) / TILE_ROWS * TILE_ROWS;
    task->rows_per_block = per_block < TILE_ROWS ? TILE_ROWS : per_block;
    return (int)((w->n_out + task->rows_per_chunk - 1) / task->rows_per_chunk);
}

void ternary_blocked_matmul(Pool *pool, KernelImpl impl, const BlockedWeightArgs *w, const float *x,
                            size_t n_tokens, float *y) {
    prepare_tokens(pool, impl, w, x, n_tokens);
    BlockedTask task;
    int n_chunks = blocked_task(pool, impl, w, n_tokens, y, &task);
    pool_run(pool, blocked_chunk, &task, n_chunks);
}

void ternary_blocked_matmul_many(Pool *pool, KernelImpl impl, int n, const BlockedWeightArgs *w,
                                 const float *x, size_t n_tokens, float *const y[]) {
    prepare_tokens(pool, impl, &w[0], x, n_tokens);
    BlockedTask tasks[POOL_MAX_FUSED];
    FusedTask fused = {.n = n};
    for (int i = 0; i < n; i++) {
        fused.fn[i] = blocked_chunk;
        fused.ctx[i] = &tasks[i];
        fused.first[i + 1] = fused.first[i] + blocked_task(pool, impl, &w[i], n_tokens, y[i], &tasks[i]);
    }
    pool_run_fused(pool, &fused);
}
