/* The ternary matmul on AVX-512 VNNI: vpdpbusd multiplies u8 codes by s8 activations and
 * adds groups of four products straight into int32 lanes, i.e. exactly Σ c·q of the
 * Σ (c-1)·q = Σ c·q − Σ q trick in ternary.c, in one instruction per 64 products and with
 * no intermediate int16 (no saturation, no overflow: |Σ c·q| <= 2·128·K < 2^31).
 *
 * Pair tiles. One plain 64-byte load takes two consecutive blocks (b, b+1) of a row; its
 * code vector j (bits 7-6, 5-4, 3-2, 1-0, one shift and one and) then lines up with
 * activations 128b+32j..+31 in its low half and 128(b+1)+32j..+31 in its high half. The
 * activations are permuted once per call into that pair order (permute_pairs), so each
 * multiply takes one plain 64-byte load of them: no broadcast, no lane insert, and the
 * unpack (one shift + one and per code vector) is small next to the 4·tt vpdpbusd it feeds.
 * A tile of 4 rows × 4 tokens then runs close to the vpdpbusd bound (measured on Zen 4: 20%
 * faster at T=4 than the earlier row-pair tile with broadcast activations).
 *
 * Register tile: 4 rows × up to 4 tokens, i.e. 16 accumulators + 4 raw, 4 code and 4 activation
 * vectors of the 32 zmm. More tokens run as groups of 4 over a chunk's rows (TOKEN_TILE),
 * whose codes then come from L2. Measured alternatives, both slower: 2 rows × 8
 * tokens (twice the activation bytes per product, from L2) and 8 rows for T=1 (generation
 * fell from ~22 to ~19.5 tok/s).
 */
#include <string.h>

#include "native.h"

/* q (one token, k = 128·n_blocks) → qp in pair order: for each pair of blocks (b, b+1) and
 * each code vector j, the 32 activations of block b then the 32 of block b+1. An odd last
 * block is paired with zeros (its codes are loaded as zeros too). */
void permute_pairs(const int8_t *q, size_t n_blocks, int8_t *qp) {
    for (size_t b = 0; b < n_blocks; b += 2) {
        int8_t *dst = qp + b * 128;
        for (int j = 0; j < 4; j++) {
            memcpy(dst + 64 * j, q + b * 128 + 32 * j, 32);
            if (b + 1 < n_blocks)
                memcpy(dst + 64 * j + 32, q + (b + 1) * 128 + 32 * j, 32);
            else
                memset(dst + 64 * j + 32, 0, 32);
        }
    }
}

#if BITSERVE_X86
#include <immintrin.h>

/* Tiles are read from the memory map directly: prefetch the tile's bytes (nr contiguous
 * rows, read as nr interleaved streams that the hardware prefetchers follow poorly) as ONE
 * linear stream instead, this far ahead, or one whole tile ahead when tiles are longer: with
 * wide rows 8 KB ahead left most of each tile to the hardware prefetchers (one thread, from
 * DRAM, best of 12: Falcon3-7B's K = 23040 19.5 -> 23.9 GB/s, Llama3-8B's K = 14336 24.6 ->
 * 31.0; 2B-4T's shapes, whose tiles are under 8 KB, read the same lines as before). */
#define AVX512_PREFETCH_BYTES 8192
/* ...into L1 while the activations of the tile (tt·K bytes) leave room for it, else into
 * L2: at T=4 on the 2B-4T shapes, L1 made K=2560 15% faster and K=6912 15% slower */
#define PREFETCH_L1_MAX_ACT_BYTES 16384

/* The 16 horizontal sums of a 4×4 tile at once, as one vector laid out like dots[t][r]
 * (t-major, 4 rows per 128-bit lane): a transposing add tree of 45 shuffles and adds in
 * place of 16 separate reductions (~8 dependent steps each). At K=2560, a tile is only 640
 * vpdpbusd, so those reductions were a fifth of its time. Integer adds: any order is exact.
 */
TARGET_AVX512 static inline __attribute__((always_inline)) __m512i reduce_tile(
    __m512i acc[PAIR_TILE_ROWS][PAIR_TILE_TOKENS]) {
    __m512i x[PAIR_TILE_TOKENS];
    for (int t = 0; t < PAIR_TILE_TOKENS; t++) {
        /* per 128-bit lane: (r0+r1 interleaved) and (r2+r3 interleaved) partial sums... */
        __m512i a = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[0][t], acc[1][t]),
                                     _mm512_unpackhi_epi32(acc[0][t], acc[1][t]));
        __m512i b = _mm512_add_epi32(_mm512_unpacklo_epi32(acc[2][t], acc[3][t]),
                                     _mm512_unpackhi_epi32(acc[2][t], acc[3][t]));
        /* ...then each lane holds [r0, r1, r2, r3] summed over its own 4 elements */
        x[t] = _mm512_add_epi32(_mm512_unpacklo_epi64(a, b), _mm512_unpackhi_epi64(a, b));
    }
    /* fold the four 128-bit lanes of x[t] into lane t */
    const int even = _MM_SHUFFLE(2, 0, 2, 0), odd = _MM_SHUFFLE(3, 1, 3, 1);
    __m512i s01 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[0], x[1], even),
                                   _mm512_shuffle_i32x4(x[0], x[1], odd));
    __m512i s23 = _mm512_add_epi32(_mm512_shuffle_i32x4(x[2], x[3], even),
                                   _mm512_shuffle_i32x4(x[2], x[3], odd));
    return _mm512_add_epi32(_mm512_shuffle_i32x4(s01, s23, even),
                            _mm512_shuffle_i32x4(s01, s23, odd));
}

/* The accumulators of row r for tokens 0..3, and the products of its code vector c##r with
 * the activation vectors q0..q{tt-1} added to them (tt a compile-time constant). Named
 * variables, not an array: GCC kept a __m512i acc[4][4] in memory (zeroed and reduced
 * through the stack, copied between registers in the loop), which made a K=2560 tile
 * ~13% slower (226 against ~200 ns, Zen 4, codes in L2; the vpdpbusd rate allows 190). */
#define TILE_ACC(r) __m512i acc##r##0 = _mm512_setzero_si512(), acc##r##1 = acc##r##0, \
                            acc##r##2 = acc##r##0, acc##r##3 = acc##r##0
#define TILE_DOT(r)                                                                         \
    do {                                                                                    \
        acc##r##0 = _mm512_dpbusd_epi32(acc##r##0, c##r, q0);                               \
        if (tt > 1) acc##r##1 = _mm512_dpbusd_epi32(acc##r##1, c##r, q1);                   \
        if (tt > 2) acc##r##2 = _mm512_dpbusd_epi32(acc##r##2, c##r, q2);                   \
        if (tt > 3) acc##r##3 = _mm512_dpbusd_epi32(acc##r##3, c##r, q3);                   \
    } while (0)

/* The 2-bit field at bit `shift` of every byte, as 0..3: GFNI's affine transform moves the
 * two bits down in one instruction (matrix rows: output bit 0 ← bit shift, bit 1 ← bit
 * shift+1), where a shift and a mask take two */
TARGET_AVX512_GFNI static inline __attribute__((always_inline)) __m512i code_plane(__m512i w, const int shift,
                                                                                 const int gfni) {
    if (gfni) {
        const unsigned long long rows = ((1ull << shift) << 56) | ((1ull << (shift + 1)) << 48);
        return _mm512_gf2p8affine_epi64_epi8(w, _mm512_set1_epi64((long long)rows), 0);
    }
    return _mm512_and_si512(_mm512_srli_epi16(w, shift), _mm512_set1_epi8(3));
}

/* A row's codes of one pair (its 64-byte line): 64 bytes, or the 32 of a lone last block
 * zero-extended (its activations are zeros too, see permute_pairs) */
TARGET_AVX512 static inline __attribute__((always_inline)) __m512i pair_codes(const uint8_t *line,
                                                                            int whole) {
    if (whole) return _mm512_loadu_si512((const void *)line);
    return _mm512_zextsi256_si512(_mm256_loadu_si256((const __m256i *)line));
}

/* Token t's activation vector j of a pair (qb: token 0's 256), zeros past tt */
TARGET_AVX512 static inline __attribute__((always_inline)) __m512i pair_acts(
    const int8_t *qb, size_t qp_stride, int t, int j, int tt) {
    if (t >= tt) return _mm512_setzero_si512();
    return _mm512_loadu_si512((const void *)(qb + (size_t)t * qp_stride + 64 * j));
}

/* dots[t][r] = Σ_k code[rows[r], k]·q[t, k] for 4 rows (pointers to their I2_S codes, whose
 * 64-byte lines are `ls` bytes apart: 64 plain, 256 tiled; duplicates allowed for a short
 * tile) and tt tokens of qp (row stride qp_stride). tt is a compile-time constant in every
 * caller (pair_dots_avx512), so the unused accumulators fold away. */
TARGET_AVX512_GFNI static inline __attribute__((always_inline)) void pair_tile(
    const uint8_t *const rows[PAIR_TILE_ROWS], size_t ls, const int8_t *qp, size_t qp_stride,
    size_t n_blocks, const int tt, const int gfni, int32_t dots[PAIR_TILE_TOKENS][PAIR_TILE_ROWS]) {
    const size_t tile_bytes = PAIR_TILE_ROWS * n_blocks * 32; /* the next tile starts here */
    const char *ahead = (const char *)rows[0] +
                        (tile_bytes > AVX512_PREFETCH_BYTES ? tile_bytes : AVX512_PREFETCH_BYTES);
    /* into L1 unless the tile's activations need it: prefetched codes would evict them */
    const int to_l1 = (size_t)tt * n_blocks * 128 <= PREFETCH_L1_MAX_ACT_BYTES;
    const uint8_t *row0 = rows[0], *row1 = rows[1], *row2 = rows[2], *row3 = rows[3];
    TILE_ACC(0);
    TILE_ACC(1);
    TILE_ACC(2);
    TILE_ACC(3);
    size_t n_pairs = (n_blocks + 1) / 2; /* an odd last block makes a half pair */
    for (size_t p = 0; p < n_pairs; p++) {
        int whole = 2 * p + 1 < n_blocks;
        if (whole) /* the tile's 4 lines of this pair, AVX512_PREFETCH_BYTES on */
            for (int i = 0; i < PAIR_TILE_ROWS; i++) {
                if (to_l1)
                    _mm_prefetch(ahead + (size_t)PAIR_TILE_ROWS * p * 64 + 64 * i, _MM_HINT_T0);
                else
                    _mm_prefetch(ahead + (size_t)PAIR_TILE_ROWS * p * 64 + 64 * i, _MM_HINT_T1);
            }
        __m512i w0 = pair_codes(row0 + p * ls, whole), w1 = pair_codes(row1 + p * ls, whole);
        __m512i w2 = pair_codes(row2 + p * ls, whole), w3 = pair_codes(row3 + p * ls, whole);
        const int8_t *qb = qp + p * 256;
        for (int j = 0; j < 4; j++) {
            const int shift = 6 - 2 * j; /* code vector j: bits 7-6, 5-4, 3-2, 1-0 */
            __m512i c0 = code_plane(w0, shift, gfni), c1 = code_plane(w1, shift, gfni);
            __m512i c2 = code_plane(w2, shift, gfni), c3 = code_plane(w3, shift, gfni);
            __m512i q0 = pair_acts(qb, qp_stride, 0, j, tt), q1 = pair_acts(qb, qp_stride, 1, j, tt);
            __m512i q2 = pair_acts(qb, qp_stride, 2, j, tt), q3 = pair_acts(qb, qp_stride, 3, j, tt);
            TILE_DOT(0);
            TILE_DOT(1);
            TILE_DOT(2);
            TILE_DOT(3);
        }
    }
    __m512i acc[PAIR_TILE_ROWS][PAIR_TILE_TOKENS] = {{acc00, acc01, acc02, acc03},
                                                     {acc10, acc11, acc12, acc13},
                                                     {acc20, acc21, acc22, acc23},
                                                     {acc30, acc31, acc32, acc33}};
    _mm512_storeu_si512((void *)dots, reduce_tile(acc));
}

/* one specialization per tile shape (see native.h) */
#define PAIR_TILES(G)                                                                        \
    switch (tt) { /* one specialization per tile width */                                   \
    case 1: pair_tile(rows, ls, qp, qp_stride, n_blocks, 1, G, dots); break;                     \
    case 2: pair_tile(rows, ls, qp, qp_stride, n_blocks, 2, G, dots); break;                     \
    case 3: pair_tile(rows, ls, qp, qp_stride, n_blocks, 3, G, dots); break;                     \
    default: pair_tile(rows, ls, qp, qp_stride, n_blocks, 4, G, dots); break;                    \
    }
TARGET_AVX512_GFNI void pair_dots_avx512(const uint8_t *const rows[PAIR_TILE_ROWS], size_t ls,
                                         const int8_t *qp, size_t qp_stride, size_t n_blocks, int tt, int gfni,
                                         int32_t dots[PAIR_TILE_TOKENS][PAIR_TILE_ROWS]) {
    if (gfni && tt == 1) { /* codes in L2, Zen 4: 4% faster at T=1, 0.7% slower at T=4 */
        PAIR_TILES(1)
    } else {
        PAIR_TILES(0)
    }
}
#undef PAIR_TILES

/* one 128-bit lane per token: at K=2560 a tile's 16 scalar conversions and divisions cost
 * ~9% of its time */
TARGET_AVX512 void store_tile_avx512(const int32_t dots[PAIR_TILE_TOKENS][PAIR_TILE_ROWS], int tt,
                                     size_t n, const int32_t *sum, const float *scale,
                                     float w_scale, float *y, int32_t *acc, size_t stride) {
    const __mmask8 rows = (__mmask8)((1u << n) - 1);
    for (int t = 0; t < tt; t++) {
        __m128i d = _mm_sub_epi32(_mm_loadu_si128((const __m128i *)dots[t]), _mm_set1_epi32(sum[t]));
        if (scale) {
            __m128 v = _mm_div_ps(_mm_cvtepi32_ps(d), _mm_set1_ps(scale[t]));
            _mm_mask_storeu_ps(y + (size_t)t * stride, rows, _mm_mul_ps(v, _mm_set1_ps(w_scale)));
        } else {
            _mm_mask_storeu_epi32(acc + (size_t)t * stride, rows, d);
        }
    }
}

#endif
