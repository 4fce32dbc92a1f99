/* The tied LM head and the memory-read probe.
 *
 * For one generated token the head reads the whole embedding (0.66 GB as F16 for
 * 2B-4T), more than all ternary weights together, so it is memory bound: each row is
 * streamed once and converted in registers (F16C), accumulating in f32 with FMA. A batch
 * of T tokens still reads each row from memory once and converts it once per token pair
 * (register blocks of 4 rows × 2 tokens), so small batches stay near memory bound. The
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

/* Every (row, token) dot product has one summation order on every path, whatever T, the
 * row/token blocking and the thread count (batch invariance): 8 lanes, lane j summing
 * x[k+j]·e[k+j] sequentially over k = 0, 8, 16, ... (one FMA chain per lane on AVX2), then
 * the fixed pairwise lane sum of lane_sum() / hsum_ps(), then the tail k >= dim & ~7 added
 * in order. The scalar path rounds each product separately (no FMA): it agrees with AVX2 to
 * float tolerance, not bit for bit. */

#define LANES 8
/* A register block is 4 rows × 2 tokens (8 FMA chains, each row slice converted once for
 * both tokens), or 4 rows × 1 token (T = 1, 4 chains: enough to stay memory bound; 8 rows
 * were measured slower, more streams than the prefetchers keep up with). With AVX-512VL
 * (32 ymm registers) blocks of 4 rows × 4 (or 3) tokens fit too: 16 chains + 4 token slices
 * + the converted row slice, each slice converted once for 4 tokens (F16 2B-4T, 2 threads:
 * T = 4 ~25 -> ~20 ms). Only the blocking changes, never a dot's summation order. */
#define HEAD_ROWS HEAD_TILE_ROWS
#define HEAD_TOKENS 2
#define HEAD_TOKENS_WIDE 4

/* bytes per value; the int8-block kinds keep their f32 block scales after a row's values */
static size_t emb_size(EmbKind kind) {
    return kind == EMB_F16 || kind == EMB_BF16 ? 2 : kind == EMB_F32 ? 4 : 1;
}

static size_t emb_row_bytes(EmbKind kind, size_t dim) {
    size_t block = kind == EMB_I8B16 ? 16 : kind == EMB_I8B32 ? 32 : 0;
    return dim * emb_size(kind) + (block ? dim / block * sizeof(float) : 0);
}

/* the block scale of value k of an int8-block row (dim values, then dim / block scales);
 * copied out, not read through a float pointer: the rows are bytes, at any address */
static inline float block_scale_of(const void *row, size_t k, EmbKind kind, size_t dim) {
    float scale;
    memcpy(&scale, (const char *)row + dim + (kind == EMB_I8B16 ? k >> 4 : k >> 5) * sizeof(float), sizeof(float));
    return scale;
}

static float emb_value(const void *row, size_t k, EmbKind kind, size_t dim) {
    if (kind == EMB_F16) return half_to_float(((const uint16_t *)row)[k]);
    if (kind == EMB_I8) return (float)((const int8_t *)row)[k];
    if (kind == EMB_BF16) { /* bytes too (head_packed): copied out, as block_scale_of */
        uint16_t half;
        memcpy(&half, (const char *)row + 2 * k, 2);
        uint32_t bits = (uint32_t)half << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    if (kind == EMB_I8B16 || kind == EMB_I8B32)
        return (float)((const int8_t *)row)[k] * block_scale_of(row, k, kind, dim);
    return ((const float *)row)[k];
}

/* lanes 0..7 → ((l0+l4) + (l2+l6)) + ((l1+l5) + (l3+l7)), the order of hsum_ps */
static float lane_sum(const float *l) {
    float a0 = l[0] + l[4], a1 = l[1] + l[5], a2 = l[2] + l[6], a3 = l[3] + l[7];
    return (a0 + a2) + (a1 + a3);
}

/* acc + the tail k in [k0, dim), in order (every path, so the tails agree bit for bit) */
static float dot_tail(float acc, const float *x, const void *row, EmbKind kind, size_t k0,
                      size_t dim) {
    for (size_t k = k0; k < dim; k++) acc += x[k] * emb_value(row, k, kind, dim);
    return acc;
}

static float dot_scalar(const float *x, const void *row, EmbKind kind, size_t dim) {
    float lane[LANES] = {0};
    size_t k = 0;
    for (; k + LANES <= dim; k += LANES)
        for (size_t j = 0; j < LANES; j++) lane[j] += x[k + j] * emb_value(row, k + j, kind, dim);
    return dot_tail(lane_sum(lane), x, row, kind, k, dim);
}

#if BITSERVE_X86
TARGET_AVX2 static inline float hsum_ps(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
}

/* 8 embedding values at index k as f32 */
TARGET_AVX2 static inline __attribute__((always_inline)) __m256 load8(const void *row, size_t k,
                                                                      EmbKind kind, size_t dim) {
    if (kind == EMB_BF16) /* bf16 → f32: the 16 bits on top of a zero mantissa tail */
        return _mm256_castsi256_ps(_mm256_slli_epi32(
            _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k))), 16));
    if (kind == EMB_I8B16 || kind == EMB_I8B32) /* 8 values share one block scale (B >= 16) */
        return _mm256_mul_ps(
            _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + k)))),
            _mm256_set1_ps(block_scale_of(row, k, kind, dim)));
    if (kind == EMB_F16)
        return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)row + k)));
    if (kind == EMB_I8)
        return _mm256_cvtepi32_ps(
            _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i *)((const int8_t *)row + k))));
    return _mm256_loadu_ps((const float *)row + k);
}

/* acc[r][t] += row_r[k, k+8) · x_t[k, k+8): each row slice converted once for all tokens;
 * row r's value k is at rows + r·rs + k·size (block_avx2 moves `rows` so this holds in the
 * tiled layout too) */
TARGET_AVX2 static inline __attribute__((always_inline)) void block_step(
    __m256 acc[HEAD_ROWS][HEAD_TOKENS_WIDE], const float *x, size_t dim, const char *rows,
    size_t rs, EmbKind kind, int R, int TB, size_t k) {
    __m256 xv[HEAD_TOKENS_WIDE];
    for (int t = 0; t < TB; t++) xv[t] = _mm256_loadu_ps(x + (size_t)t * dim + k);
    for (int r = 0; r < R; r++) {
        __m256 e = load8(rows + (size_t)r * rs, k, kind, dim);
        for (int t = 0; t < TB; t++) acc[r][t] = _mm256_fmadd_ps(e, xv[t], acc[r][t]);
    }
}

/* One register block: R rows (`rows`, row_bytes apart) × TB tokens (x, dim apart) →
 * out[t·out_stride + r]. R, TB and kind are compile-time constants at each call site, so
 * acc[][] lives in R·TB ymm registers. Per 64-byte line of each row it prefetches one line
 * of the `next` block (if not NULL), keeping one block ahead: R rows are R streams, which
 * the hardware prefetchers alone follow well below memory speed (T = 1 ~2x slower without
 * it). The prefetch is non-temporal: the head is read once per step and never again soon,
 * so its lines need not displace anything from L2 and L3. Measured on Zen 5 (2 threads,
 * interleaved A/B) against a T1 prefetch plus a second one 1 KB ahead into L1: 2B-4T's
 * F16 head 5-8% faster (66 -> 69-72 GB/s when the VM read 80, 45 -> 49 when it read 49),
 * F16 rows of 2048-8192 values 6-11%, T = 4 and 8 4%, the int8 head 2%; a whole 2B-4T
 * decode step 4.4%, Falcon3-7B's 1.6%. Not measured on Intel, whose NTA prefetch skips
 * L2: a block that left L1 before its use would come from memory twice. Prefetches never
 * fault, so running past the embedding's end is harmless.
 * The prefetch walks the next block's lines in the order of the tiled layout (lm_head), so
 * a tiled head is read as the one linear stream it prefetches, not R interleaved ones:
 * 2B-4T's F16 head 8% faster at 75 GB/s (Falcon3-7B's 2.3%), 0.5% at 46 GB/s (the
 * project's VM, 2 threads, interleaved A/B split by bandwidth phase, the same bits). */
TARGET_AVX2 static inline __attribute__((always_inline)) void block_avx2(
    const float *x, size_t dim, const char *rows, size_t row_bytes, int tiled, const char *next,
    EmbKind kind, int R, int TB, float *out, size_t out_stride) {
    const size_t size = emb_size(kind), line = 64 / size;
    /* row r's line l: plain at rows + r·row_bytes + 64·l, tiled at rows + 64·(R·l + r) */
    const size_t rs = tiled ? 64 : row_bytes, skip = tiled ? 64 * (size_t)(R - 1) : 0;
    __m256 acc[HEAD_ROWS][HEAD_TOKENS_WIDE];
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TB; t++) acc[r][t] = _mm256_setzero_ps();
    size_t k = 0;
    for (; k + line <= dim; k += line) {
        for (int r = 0; next && r < R; r++)
            _mm_prefetch(next + (k * (size_t)R + (size_t)r * line) * size, _MM_HINT_NTA);
        const char *at = rows + k / line * skip; /* + r·rs + (k + j)·size: line k/line */
        for (size_t j = 0; j < line; j += LANES)
            block_step(acc, x, dim, at, rs, kind, R, TB, k + j);
    }
    /* a partial last line: plain rows only (a tiled head has whole lines) */
    for (; k + LANES <= dim; k += LANES) block_step(acc, x, dim, rows, row_bytes, kind, R, TB, k);
    for (int r = 0; r < R; r++)
        for (int t = 0; t < TB; t++)
            out[(size_t)t * out_stride + (size_t)r] =
                dot_tail(hsum_ps(acc[r][t]), x + (size_t)t * dim, rows + (size_t)r * row_bytes,
                         kind, k, dim);
}

typedef void (*BlockFn)(const float *x, size_t dim, const char *rows, size_t row_bytes, int tiled,
                        const char *next, float *out, size_t out_stride);

/* The block shapes, one compiled copy per (kind, R, TB). */
#define HEAD_BLOCK(name, KIND, R, TB)                                                        \
    TARGET_AVX2 static void name(const float *x, size_t dim, const char *rows,              \
                                 size_t row_bytes, int tiled, const char *next, float *out, \
                                 size_t out_stride) {                                       \
        block_avx2(x, dim, rows, row_bytes, tiled, next, KIND, R, TB, out, out_stride);     \
    }
/* The same block on AVX-512VL: 32 ymm registers hold up to 4 rows × 4 tokens. The code is
 * block_avx2's (EVEX-encoded ymm FMAs round exactly as VEX ones), so results are the same
 * bits as the AVX2 blocks. */
#define HEAD_BLOCK_WIDE(name, KIND, R, TB)                                                   \
    TARGET_AVX512 static void name(const float *x, size_t dim, const char *rows,            \
                                   size_t row_bytes, int tiled, const char *next,           \
                                   float *out, size_t out_stride) {                         \
        block_avx2(x, dim, rows, row_bytes, tiled, next, KIND, R, TB, out, out_stride);     \
    }
#define HEAD_BLOCKS(kind_name, KIND)                                                         \
    HEAD_BLOCK_WIDE(kind_name##_quad, KIND, HEAD_ROWS, HEAD_TOKENS_WIDE)                     \
    HEAD_BLOCK_WIDE(kind_name##_triple, KIND, HEAD_ROWS, 3)                                  \
    HEAD_BLOCK(kind_name##_pair, KIND, HEAD_ROWS, HEAD_TOKENS)                               \
    HEAD_BLOCK(kind_name##_single, KIND, HEAD_ROWS, 1)                                       \
    HEAD_BLOCK(kind_name##_row, KIND, 1, 1)
HEAD_BLOCKS(f16, EMB_F16)
HEAD_BLOCKS(i8, EMB_I8)
HEAD_BLOCKS(f32, EMB_F32)
HEAD_BLOCKS(bf16, EMB_BF16)
HEAD_BLOCKS(i8b16, EMB_I8B16)
HEAD_BLOCKS(i8b32, EMB_I8B32)

typedef struct {
    BlockFn quad;   /* HEAD_ROWS rows × 4 tokens (AVX-512VL only, else NULL) */
    BlockFn triple; /* HEAD_ROWS rows × 3 tokens: the last 3 of T (AVX-512VL only) */
    BlockFn pair;   /* HEAD_ROWS rows × HEAD_TOKENS tokens */
    BlockFn single; /* HEAD_ROWS rows × 1 token: T = 1, or the last token of an odd T */
    BlockFn row;    /* 1 row × 1 token: the last rows of the vocabulary */
} BlockSet;

/* impl == IMPL_AVX512 implies AVX-512VL (cpu_has_avx512), so the wide blocks can run */
static BlockSet block_set(EmbKind kind, KernelImpl impl) {
    BlockSet b = kind == EMB_F16     ? (BlockSet){f16_quad, f16_triple, f16_pair, f16_single, f16_row}
                 : kind == EMB_I8    ? (BlockSet){i8_quad, i8_triple, i8_pair, i8_single, i8_row}
                 : kind == EMB_BF16  ? (BlockSet){bf16_quad, bf16_triple, bf16_pair, bf16_single, bf16_row}
                 : kind == EMB_I8B16 ? (BlockSet){i8b16_quad, i8b16_triple, i8b16_pair, i8b16_single, i8b16_row}
                 : kind == EMB_I8B32 ? (BlockSet){i8b32_quad, i8b32_triple, i8b32_pair, i8b32_single, i8b32_row}
                                     : (BlockSet){f32_quad, f32_triple, f32_pair, f32_single, f32_row};
    if (impl < IMPL_AVX512) b.quad = b.triple = NULL;
    return b;
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
    int tiled;
    float *out;
} HeadTask;

#if BITSERVE_X86
/* Rows [v, end) against every token, a row block at a time. The token groups (4s, then a
 * 3 with AVX-512VL; else pairs, then a single) walk over the same block, so its rows come
 * from DRAM once (the first group, which also prefetches the next block) and from cache for
 * the rest: one read, ceil(T/4) (AVX-512VL) or ceil(T/2) conversions per row. */
static void rows_avx2(const HeadTask *h, size_t v, size_t end) {
    BlockSet b = block_set(h->kind, h->impl);
    size_t T = h->n_tokens, dim = h->dim, rb = h->row_bytes, vocab = h->vocab;
    const size_t R = HEAD_ROWS;
    for (; v + R <= end; v += R) {
        const char *rows = h->emb + v * rb, *next = v + 2 * R <= end ? rows + R * rb : NULL;
        float *out = h->out + v;
        size_t t = 0;
        for (; b.quad && t + HEAD_TOKENS_WIDE <= T; t += HEAD_TOKENS_WIDE, next = NULL)
            b.quad(h->x + t * dim, dim, rows, rb, h->tiled, next, out + t * vocab, vocab);
        for (; b.triple && t + 3 <= T; t += 3, next = NULL)
            b.triple(h->x + t * dim, dim, rows, rb, h->tiled, next, out + t * vocab, vocab);
        for (; t + HEAD_TOKENS <= T; t += HEAD_TOKENS, next = NULL)
            b.pair(h->x + t * dim, dim, rows, rb, h->tiled, next, out + t * vocab, vocab);
        for (; t < T; t++, next = NULL)
            b.single(h->x + t * dim, dim, rows, rb, h->tiled, next, out + t * vocab, vocab);
    }
    for (; v < end; v++) /* fewer than R rows left: the end of the vocabulary */
        for (size_t t = 0; t < T; t++)
            b.row(h->x + t * dim, dim, h->emb + v * rb, rb, 0, NULL, h->out + t * vocab + v, vocab);
}
#endif

static void rows_scalar(const HeadTask *h, size_t v0, size_t v1) {
    for (size_t v = v0; v < v1; v++) {
        const void *row = h->emb + v * h->row_bytes;
        for (size_t t = 0; t < h->n_tokens; t++)
            h->out[t * h->vocab + v] = dot_scalar(h->x + t * h->dim, row, h->kind, h->dim);
    }
}

/* Rows [256·chunk, +256) against every token, then divided by the int8 row scales. */
static void head_chunk(void *ctx, int chunk, int thread) {
    (void)thread;
    const HeadTask *h = ctx;
    size_t v0 = (size_t)chunk * HEAD_ROWS_PER_CHUNK;
    size_t v1 = v0 + HEAD_ROWS_PER_CHUNK < h->vocab ? v0 + HEAD_ROWS_PER_CHUNK : h->vocab;
#if BITSERVE_X86
    if (h->impl >= IMPL_AVX2)
        rows_avx2(h, v0, v1);
    else
#endif
        rows_scalar(h, v0, v1);
    if (h->row_scale)
        for (size_t t = 0; t < h->n_tokens; t++)
            for (size_t v = v0; v < v1; v++) h->out[t * h->vocab + v] /= h->row_scale[v];
}

void lm_head(Pool *pool, KernelImpl impl, const float *x, size_t n_tokens, size_t dim,
             const void *emb, EmbKind kind, const float *row_scale, size_t vocab, int tiled, float *out) {
    HeadTask task = {impl, x, n_tokens, dim, emb, kind, emb_row_bytes(kind, dim), row_scale, vocab, tiled, out};
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
