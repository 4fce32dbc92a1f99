/* The ternary matmul on AVX-512 VNNI: vpdpbusd multiplies u8 codes by s8 activations and
 * adds groups of four products straight into int32 lanes, i.e. exactly Σ c·q of the
 * Σ (c-1)·q = Σ c·q − Σ q trick in ternary.c, in one instruction per 64 products and with
 * no intermediate int16 (no saturation, no overflow: |Σ c·q| <= 2·128·K < 2^31).
 *
 * Register tile: ROW_PAIRS pairs of rows × TT tokens. A pair of rows shares one zmm: the
 * 32 code bytes of row r go to the low 256 bits and those of row r+1 to the high 256, so
 * one unpack (3 shifts, 4 ands) serves two rows, and the 32 activations of a token are
 * broadcast into both halves by a single load. Each unpacked block is then reused by TT
 * tokens and each broadcast activation vector by 2·ROW_PAIRS rows, from registers:
 * per block and token a pair of rows costs 4 loads-with-broadcast and 4 vpdpbusd.
 *
 * Layout facts used (see ternary.c): block b of a row is bytes 32b..32b+31 of the row, and
 * its code vector j (bits 7-6, 5-4, 3-2, 1-0) lines up with activations 128b+32j..+31.
 */
#include "native.h"

#if BITSERVE_X86
#include <immintrin.h>

#define ROW_PAIRS 2 /* 4 rows per tile: 2·TT accumulators + 8 code vectors fit 32 zmm */
/* The 4 rows of a tile are contiguous (4·K/4 bytes) and are read as 4 interleaved streams,
 * which the hardware prefetchers follow poorly: prefetch the tile's bytes as ONE linear
 * stream instead, 2 cache lines per block (4 rows × 32 bytes), this far ahead. */
#define AVX512_PREFETCH_BYTES 8192

TARGET_AVX512 static inline int32_t hsum256(__m256i v) {
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
    return _mm_cvtsi128_si32(s);
}

/* Codes of block b for rows lo (low half) and hi (high half), unpacked into c[0..3]. */
TARGET_AVX512 static inline __attribute__((always_inline)) void unpack_pair(
    const uint8_t *lo, const uint8_t *hi, __m512i c[4]) {
    const __m512i mask = _mm512_set1_epi8(3);
    __m512i raw = _mm512_inserti64x4(
        _mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
        _mm256_loadu_si256((const __m256i *)hi), 1);
    c[0] = _mm512_and_si512(_mm512_srli_epi16(raw, 6), mask);
    c[1] = _mm512_and_si512(_mm512_srli_epi16(raw, 4), mask);
    c[2] = _mm512_and_si512(_mm512_srli_epi16(raw, 2), mask);
    c[3] = _mm512_and_si512(raw, mask);
}

/* rows[0..3] (row pointers; duplicates allowed for a short tile) against tt tokens of q
 * (row stride q_stride): dots[r][t] = Σ_k code[r,k]·q[t,k]. tt is a compile-time constant
 * in every caller (see tile_dots_avx512), so acc[][] stays in registers. */
TARGET_AVX512 static inline __attribute__((always_inline)) void tile_dots(
    const uint8_t *const rows[4], const int8_t *q, size_t q_stride, size_t n_blocks, const int tt,
    int32_t dots[4][AVX512_TOKEN_TILE]) {
    const char *ahead = (const char *)rows[0] + AVX512_PREFETCH_BYTES;
    /* GEMV (tt of 1-2) would chain 4 dependent vpdpbusd per block into one accumulator and
     * stall on their latency: split the 4 code vectors over `ns` accumulators instead
     * (integers: any split sums to the same bits) */
    const int ns = tt == 1 ? 4 : tt == 2 ? 2 : 1;
    __m512i acc[ROW_PAIRS][AVX512_TOKEN_TILE][4];
    for (int p = 0; p < ROW_PAIRS; p++)
        for (int t = 0; t < tt; t++)
            for (int i = 0; i < ns; i++) acc[p][t][i] = _mm512_setzero_si512();
    for (size_t b = 0; b < n_blocks; b++) {
        size_t off = b * 32;
        _mm_prefetch(ahead + 4 * off, _MM_HINT_T0);
        _mm_prefetch(ahead + 4 * off + 64, _MM_HINT_T0);
        __m512i c[ROW_PAIRS][4];
        for (int p = 0; p < ROW_PAIRS; p++) unpack_pair(rows[2 * p] + off, rows[2 * p + 1] + off, c[p]);
        for (int t = 0; t < tt; t++) {
            const int8_t *qb = q + (size_t)t * q_stride + b * 128;
            for (int j = 0; j < 4; j++) {
                __m512i qv = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)(qb + 32 * j)));
                for (int p = 0; p < ROW_PAIRS; p++)
                    acc[p][t][j % ns] = _mm512_dpbusd_epi32(acc[p][t][j % ns], c[p][j], qv);
            }
        }
    }
    for (int p = 0; p < ROW_PAIRS; p++)
        for (int t = 0; t < tt; t++) {
            __m512i sum = acc[p][t][0];
            for (int i = 1; i < ns; i++) sum = _mm512_add_epi32(sum, acc[p][t][i]);
            dots[2 * p][t] = hsum256(_mm512_castsi512_si256(sum));
            dots[2 * p + 1][t] = hsum256(_mm512_extracti64x4_epi64(sum, 1));
        }
}

TARGET_AVX512 void tile_dots_avx512(const uint8_t *const rows[4], const int8_t *q, size_t q_stride,
                                    size_t n_blocks, int tt, int32_t dots[4][AVX512_TOKEN_TILE]) {
    switch (tt) { /* one specialization per tile width */
    case 8: tile_dots(rows, q, q_stride, n_blocks, 8, dots); break;
    case 7: tile_dots(rows, q, q_stride, n_blocks, 7, dots); break;
    case 6: tile_dots(rows, q, q_stride, n_blocks, 6, dots); break;
    case 5: tile_dots(rows, q, q_stride, n_blocks, 5, dots); break;
    case 4: tile_dots(rows, q, q_stride, n_blocks, 4, dots); break;
    case 3: tile_dots(rows, q, q_stride, n_blocks, 3, dots); break;
    case 2: tile_dots(rows, q, q_stride, n_blocks, 2, dots); break;
    default: tile_dots(rows, q, q_stride, n_blocks, 1, dots); break;
    }
}

#else
typedef int bitserve_no_avx512; /* ISO C forbids an empty translation unit */
#endif
