/* Load-time repacking of ternary tensors, from the file's layout to the kernels' (the numpy
 * definitions, bitserve.gguf.quants and bitserve.kernels.tensors, are the oracle):
 *   - TQ1_0 / TQ2_0 / Q2_0 → the blocked layout: codes in super-blocks of 256 weights (byte
 *     4L+i, bits 2j = weight 16L+4j+i), f16 scales [rows, gps·n_super], zero-padded;
 *   - TQ1_0 / TQ2_0 whose active blocks share one scale → I2_S codes (ternary_scan says so).
 * Source rows may be taken in any order (row_order). Single-threaded and GIL-free: an 8B
 * model's 7·10⁹ weights take a few seconds, where numpy took over a minute.
 */
#include <string.h>

#include "native.h"

#define SB 256
#define SB_BYTES 64

/* ---------------------------------------------------------------- block decoding ---- */

/* The five base-3 digits of every TQ1_0 byte (digit 0 the most significant): ggml stores
 * ceil(v·256/243), so digit n is the top trit of byte·3ⁿ (mod 256). Built per call. */
typedef uint8_t Trits[256][5];

static void init_trits(Trits trits) {
    static const uint8_t pow3[5] = {1, 3, 9, 27, 81};
    for (int b = 0; b < 256; b++)
        for (int n = 0; n < 5; n++) trits[b][n] = (uint8_t)(((uint16_t)(uint8_t)(b * pow3[n]) * 3) >> 8);
}

/* the 256 codes (weight + 1) of one TQ block (trits: TQ1_0's table) */
static void decode_tq(int type, const Trits trits, const uint8_t *blk, uint8_t codes[SB]) {
    if (type == REPACK_TQ2_0) {
        for (int w = 0; w < SB; w++) codes[w] = (blk[32 * (w / 128) + w % 32] >> (2 * ((w % 128) / 32))) & 3;
        return;
    }
    for (int n = 0; n < 5; n++) {
        for (int j = 0; j < 32; j++) codes[32 * n + j] = trits[blk[j]][n];
        for (int j = 0; j < 16; j++) codes[160 + 16 * n + j] = trits[blk[32 + j]][n];
    }
    for (int n = 0; n < 4; n++)
        for (int j = 0; j < 4; j++) codes[240 + 4 * n + j] = trits[blk[48 + j]][n];
}

static size_t block_bytes(int type, size_t q2_block) {
    return type == REPACK_TQ2_0 ? 66 : type == REPACK_TQ1_0 ? 54 : 2 + q2_block / 4;
}

static size_t block_weights(int type, size_t q2_block) { return type == REPACK_Q2_0 ? q2_block : SB; }

static uint16_t block_scale(int type, const uint8_t *blk) {
    size_t at = type == REPACK_TQ2_0 ? 64 : type == REPACK_TQ1_0 ? 52 : 0;
    return (uint16_t)(blk[at] | (blk[at + 1] << 8));
}

/* ---------------------------------------------------------------- blocked layout ---- */

/* byte → its four 2-bit fields spread to bits 2s of four bytes (s the byte's place in a
 * 16-weight lane): the 4×4 transpose of 2-bit fields that turns 4 Q2_0 bytes (weights
 * 4s+i at bits 2i of byte s) into a lane (weight 4j+i at bits 2j of byte i). Built per call
 * (4 KB, microseconds), so no shared state. */
typedef uint32_t Spread[4][256];

static void init_spread(Spread spread) {
    for (int s = 0; s < 4; s++)
        for (int b = 0; b < 256; b++) {
            uint32_t v = 0;
            for (int i = 0; i < 4; i++) v |= (uint32_t)((b >> (2 * i)) & 3) << (8 * i + 2 * s);
            spread[s][b] = v;
        }
}

/* codes of one super-block (256, natural order) → its 64 bytes */
static void encode_super(const uint8_t codes[SB], uint8_t *out) {
    for (int l = 0; l < 16; l++)
        for (int i = 0; i < 4; i++) {
            const uint8_t *c = codes + 16 * l + i;
            out[4 * l + i] = (uint8_t)(c[0] | (c[4] << 2) | (c[8] << 4) | (c[12] << 6));
        }
}

/* Q2_0 super-block u of one source row: 256/q2_block blocks, each lane one 4-byte word */
static void q2_0_super(Spread spread, const uint8_t *row, size_t u, size_t q2_block, uint8_t *out,
                       uint16_t *scales) {
    size_t bb = 2 + q2_block / 4, per = SB / q2_block; /* blocks per super-block */
    for (size_t b = 0; b < per; b++) {
        const uint8_t *blk = row + (u * per + b) * bb;
        scales[b] = (uint16_t)(blk[0] | (blk[1] << 8));
        for (size_t w = 0; w < q2_block / 16; w++) { /* 16-weight lanes of this block */
            const uint8_t *src = blk + 2 + 4 * w;
            uint32_t lane = spread[0][src[0]] | spread[1][src[1]] | spread[2][src[2]] | spread[3][src[3]];
            memcpy(out + 4 * (b * q2_block / 16 + w), &lane, 4);
        }
    }
}

/* TQ2_0 block → its super-block, a 32-bit word at a time: lane L (weights 16L..16L+15) reads,
 * for each j, the 4 bytes at 32·(L/8) + 16·(L%2) + 4j, whose fields at bits 2·((L%8)/2) are
 * its weights 16L+4j+i (i the byte) */
static void tq2_0_super(const uint8_t *blk, uint8_t *out) {
    for (int l = 0; l < 16; l++) {
        const uint8_t *src = blk + 32 * (l / 8) + 16 * (l % 2);
        int shift = 2 * ((l % 8) / 2);
        uint32_t lane = 0;
        for (int j = 0; j < 4; j++) {
            uint32_t word;
            memcpy(&word, src + 4 * j, 4);
            lane |= ((word >> shift) & 0x03030303u) << (2 * j);
        }
        memcpy(out + 4 * l, &lane, 4);
    }
}

void repack_blocked(int type, const uint8_t *src, size_t q2_block, size_t rows, size_t cols,
                    const int64_t *order, uint8_t *codes, uint16_t *scales) {
    Spread spread;
    Trits trits;
    init_spread(spread);
    init_trits(trits);
    size_t n_super = (cols + SB - 1) / SB, per_row = cols / block_weights(type, q2_block);
    size_t gps = SB / block_weights(type, q2_block), row_bytes = per_row * block_bytes(type, q2_block);
    uint8_t buf[SB];
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *row = src + (size_t)(order ? order[r] : (int64_t)r) * row_bytes;
        uint8_t *out = codes + r * n_super * SB_BYTES;
        uint16_t *sc = scales + r * n_super * gps;
        memset(out, 0, n_super * SB_BYTES);
        memset(sc, 0, n_super * gps * sizeof(uint16_t));
        for (size_t u = 0; u < n_super; u++) {
            size_t valid = cols - u * SB < SB ? cols - u * SB : SB;
            if (type == REPACK_Q2_0 && valid == SB) {
                q2_0_super(spread, row, u, q2_block, out + u * SB_BYTES, sc + u * gps);
                continue;
            }
            memset(buf, 0, SB); /* padding: code 0 against zero activations */
            if (type == REPACK_Q2_0) { /* a ragged last super-block, block by block */
                size_t bb = 2 + q2_block / 4;
                for (size_t b = 0; b < valid / q2_block; b++) {
                    const uint8_t *blk = row + (u * gps + b) * bb;
                    sc[u * gps + b] = block_scale(type, blk);
                    for (size_t w = 0; w < q2_block; w++) buf[b * q2_block + w] = (blk[2 + w / 4] >> (2 * (w % 4))) & 3;
                }
            } else {
                const uint8_t *blk = row + u * block_bytes(type, q2_block);
                sc[u] = block_scale(type, blk);
                if (type == REPACK_TQ2_0) { /* TQ rows are whole super-blocks */
                    tq2_0_super(blk, out + u * SB_BYTES);
                    continue;
                }
                decode_tq(type, (const uint8_t(*)[5])trits, blk, buf);
            }
            encode_super(buf, out + u * SB_BYTES);
        }
    }
}

/* ---------------------------------------------------------------- one-scale tensors ---- */

int ternary_scan(int type, const uint8_t *src, size_t rows, size_t cols, uint16_t *scale) {
    size_t n_blocks = rows * cols / SB, bb = block_bytes(type, 0);
    uint8_t codes[SB];
    Trits trits;
    init_trits(trits);
    int found = 0;
    *scale = 0;
    for (size_t b = 0; b < n_blocks; b++) {
        const uint8_t *blk = src + b * bb;
        uint16_t d = block_scale(type, blk);
        if ((d & 0x7fff) == 0) continue; /* ±0: every weight of the block is zero */
        if ((d & 0x7c00) == 0x7c00) return 0; /* inf or NaN: never one scale */
        int active = 0;
        if (type == REPACK_TQ2_0) { /* 8 bytes at a time: 0x55.. is all zero weights */
            for (int i = 0; i < 64; i += 8) {
                uint64_t word;
                memcpy(&word, blk + i, 8);
                if (word & (word >> 1) & 0x5555555555555555ull) return 0; /* code 3 */
                active |= word != 0x5555555555555555ull;
            }
        } else {
            decode_tq(type, (const uint8_t(*)[5])trits, blk, codes);
            int plus_two = 0; /* trits are 0..2: never, but the check costs nothing */
            for (int w = 0; w < SB; w++) {
                plus_two |= codes[w] == 3;
                active |= codes[w] != 1;
            }
            if (plus_two) return 0;
        }
        if (!active) continue;
        if (found && d != *scale) return 0;
        *scale = d;
        found = 1;
    }
    return 1;
}

void repack_tq_i2s(int type, const uint8_t *src, size_t rows, size_t cols, const int64_t *order,
                   uint8_t *out) {
    size_t per_row = cols / SB, bb = block_bytes(type, 0);
    uint8_t codes[SB], reversed[256];
    Trits trits;
    init_trits(trits);
    for (int b = 0; b < 256; b++)
        reversed[b] = (uint8_t)(((b & 3) << 6) | (((b >> 2) & 3) << 4) | (((b >> 4) & 3) << 2) | (b >> 6));
    for (size_t r = 0; r < rows; r++) {
        const uint8_t *row = src + (size_t)(order ? order[r] : (int64_t)r) * per_row * bb;
        for (size_t b = 0; b < per_row; b++) {
            const uint8_t *blk = row + b * bb;
            uint8_t *dst = out + (r * per_row + b) * 64;
            if ((block_scale(type, blk) & 0x7fff) == 0) { /* a zero scale: zero weights */
                memset(dst, 0x55, 64);
                continue;
            }
            if (type == REPACK_TQ2_0) { /* the same grouping, the 4 fields in reverse order */
                for (int j = 0; j < 64; j++) dst[j] = reversed[blk[j]];
                continue;
            }
            decode_tq(type, (const uint8_t(*)[5])trits, blk, codes);
            /* I2_S: 128-weight blocks, byte j = weights j, 32+j, 64+j, 96+j in bits 7-6 .. 1-0 */
            for (int h = 0; h < 2; h++)
                for (int j = 0; j < 32; j++) {
                    const uint8_t *c = codes + 128 * h + j;
                    dst[32 * h + j] = (uint8_t)((c[0] << 6) | (c[32] << 4) | (c[64] << 2) | c[96]);
                }
        }
    }
}

/* ---------------------------------------------------------------- int8-block heads ---- */

/* f16 bits → f32 (exact) */
static float f16_value(const uint8_t *p) { return half_to_float((uint16_t)(p[0] | (p[1] << 8))); }

/* scale b of a row's f32 scales at `scales`: copied in, as the rows are bytes at any address */
static void put_scale(uint8_t *scales, size_t b, float value) { memcpy(scales + b * sizeof(float), &value, sizeof(float)); }

void repack_int8_rows(int type, const uint8_t *src, size_t rows, size_t cols, uint8_t *out) {
    size_t block = type == REPACK_Q6_K ? 16 : 32, row_bytes = cols + cols / block * sizeof(float);
    for (size_t r = 0; r < rows; r++) {
        int8_t *values = (int8_t *)(out + r * row_bytes);
        uint8_t *scales = out + r * row_bytes + cols;
        if (type == REPACK_Q8_0) { /* {f16 d, int8 qs[32]} */
            const uint8_t *row = src + r * (cols / 32) * 34;
            for (size_t b = 0; b < cols / 32; b++) {
                put_scale(scales, b, f16_value(row + 34 * b));
                memcpy(values + 32 * b, row + 34 * b + 2, 32);
            }
            continue;
        }
        /* Q6_K super-block {ql[128], qh[64], int8 sc[16], f16 d}: per half (128 weights),
         * weight l + 32i has its low nibble in ql[l + 32·(i % 2)] (>> 4 for i >= 2) and its top
         * bits at 2i of qh[l]; value = that 6-bit number − 32, scale = d · sc[weight / 16] */
        const uint8_t *row = src + r * (cols / 256) * 210;
        for (size_t b = 0; b < cols / 256; b++) {
            const uint8_t *blk = row + 210 * b, *sc = blk + 192;
            float d = f16_value(blk + 208);
            for (int s = 0; s < 16; s++) put_scale(scales, 16 * b + (size_t)s, d * (float)(int8_t)sc[s]);
            for (int h = 0; h < 2; h++) {
                const uint8_t *ql = blk + 64 * h, *qh = blk + 128 + 32 * h;
                int8_t *v = values + 256 * b + 128 * (size_t)h;
                for (int l = 0; l < 32; l++)
                    for (int i = 0; i < 4; i++) {
                        int low = (ql[l + 32 * (i % 2)] >> (i >= 2 ? 4 : 0)) & 0xF;
                        v[l + 32 * i] = (int8_t)((low | (((qh[l] >> (2 * i)) & 3) << 4)) - 32);
                    }
            }
        }
    }
}

/* Each whole TILE_ROWS rows' 64-byte lines in turn, the rest as they are; dst may be src.
 * Tile by tile through `scratch` (TILE_ROWS·row_bytes), so in place it stays in cache and
 * touches no new memory: fresh pages fault in at 0.5-3 GB/s on the project's VM, which made
 * tiling into a new array ~4 s of a Falcon3-7B TQ2_0 load. The numpy definition is
 * bitserve/kernels/tensors.py's _tile_rows_numpy. */
void tile_rows(const uint8_t *src, size_t n_rows, size_t row_bytes, uint8_t *dst, uint8_t *scratch) {
    size_t whole = n_rows / TILE_ROWS * TILE_ROWS, lines = row_bytes / 64;
    for (size_t t = 0; t < whole; t += TILE_ROWS) {
        uint8_t *out = dst + t * row_bytes;
        memcpy(scratch, src + t * row_bytes, TILE_ROWS * row_bytes);
        for (size_t l = 0; l < lines; l++)
            for (size_t r = 0; r < TILE_ROWS; r++)
                memcpy(out + 64 * (TILE_ROWS * l + r), scratch + r * row_bytes + 64 * l, 64);
    }
    if (dst != src) memcpy(dst + whole * row_bytes, src + whole * row_bytes, (n_rows - whole) * row_bytes);
}
