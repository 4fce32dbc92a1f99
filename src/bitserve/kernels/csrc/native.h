/* bitserve native kernels: shared declarations.
 *
 * One extension module (bitserve.kernels._native) built from the .c files in this folder:
 *   pool.c       the thread pool every kernel runs on, and its scratch buffers
 *   ternary.c    int8 activation quantization + ternary (I2_S) GEMV/GEMM, scalar and AVX2
 *   ternary_avx512.c  the ternary register tile on AVX-512 VNNI (vpdpbusd)
 *   ternary_blocked.c the block-scaled ternary matmul (TQ1_0, TQ2_0, Q2_0), every path
 *   repack.c     load-time repacking of ternary tensors into the kernels' layouts
 *   head.c       the tied LM head (F16/F32 and int8 embeddings) and the memory-read probe
 *   attention.c  causal GQA attention over the KV cache
 *   elementwise.c  RMSNorm and the squared-ReLU gate, row by row
 *   decode.c     one token of one sequence through every block (the kernels above, in order)
 *   module.c     the Python bindings: buffer checks, GIL release, dispatch (bindings.h;
 *                module_matmul.c the matmuls, module_repack.c the load-time repacking,
 *                module_decode.c the decode step)
 *
 * Every kernel has a portable scalar path and an AVX2/FMA/F16C path compiled with target
 * attributes (never -march=native), so one build runs on any x86-64 (and non-x86) machine;
 * the caller picks the path per call (KernelImpl).
 */
#ifndef BITSERVE_NATIVE_H
#define BITSERVE_NATIVE_H

#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__x86_64__) || defined(__i386__)
#define BITSERVE_X86 1
#define TARGET_AVX2 __attribute__((target("avx2,fma,f16c")))
#define TARGET_AVX512 \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni")))
/* ...plus GFNI (Ice Lake, Zen 4 and later; not Cascade Lake): one-instruction bit extraction */
#define TARGET_AVX512_GFNI \
    __attribute__((target("avx2,fma,f16c,avx512f,avx512bw,avx512vl,avx512vnni,gfni")))
#else
#define BITSERVE_X86 0
#endif

/* Ordered: every path >= IMPL_AVX2 may use the AVX2 code (AVX512 implies it); kernels
 * without an AVX-512 variant run their AVX2 code on IMPL_AVX512. */
typedef enum { IMPL_SCALAR = 0, IMPL_AVX2 = 1, IMPL_AVX512 = 2 } KernelImpl;

/* ---------------------------------------------------------------- thread pool ---- */

/* A task is split into n_chunks independent chunks; fn(ctx, chunk, thread) runs one. */
#define POOL_MAX_CHUNKS ((1 << 20) - 1)
typedef void (*TaskFn)(void *ctx, int chunk, int thread);

typedef struct {
    int n_threads; /* including the calling thread */
    int gfni;      /* the AVX-512 kernels may use GFNI (cpu_has_gfni(), unless turned off) */
    pthread_t *workers;
    pthread_mutex_t mutex; /* guards the sleep/wake handshake */
    pthread_cond_t wake;
    pthread_mutex_t dispatch_lock; /* one task (and one user of the scratch) at a time */
    /* the current task: generation (24 bits) | chunk count (20) | next chunk (20), one word
     * so a worker claims a chunk with one CAS that fails once the task is over */
    atomic_ullong cursor;
    atomic_int done; /* chunks of the current task finished */
    atomic_int stop;
    TaskFn fn;      /* fn, ctx, chunk_base: written before the cursor is published */
    void *ctx;
    int chunk_base; /* tasks above POOL_MAX_CHUNKS run in rounds */
    int stripe;     /* claim c runs chunk (c % n_threads)·stripe + c / n_threads (run_round) */
    int n_real;     /* the round's chunks; claims past them (the stripes' padding) run none */
    /* scratch, grown on demand and reused across calls (guarded by dispatch_lock) */
    int8_t *q;        /* quantized activations [T, K] */
    size_t q_cap;
    int8_t *qp; /* the same in pair order (permute_pairs), [T, 256·⌈K/256⌉] */
    size_t qp_cap;
    float *act_scale; /* [T] */
    int32_t *act_sum; /* [T]: sum of q over the row, for the code-1 offset */
    size_t tok_cap;
    float *scores; /* attention scores, [n_threads, ATTENTION_GROUP · S] */
    size_t scores_cap;
    uint8_t *blocked_act; /* block-scaled matmul: prepared tokens, blocked_act_stride apart */
    size_t blocked_act_cap;
} Pool;

int pool_init(Pool *pool, int n_threads);
void pool_free(Pool *pool);
/* Run fn over chunks 0..n_chunks-1 on all threads; returns when every chunk is done.
 * The caller must hold dispatch_lock (pool_lock) and must not hold the GIL. */
void pool_run(Pool *pool, TaskFn fn, void *ctx, int n_chunks);
/* Several tasks as one (one wake-up, one barrier): task i has chunks first[i]..first[i+1]−1
 * of the fused task, first[0] = 0, first[n] the total. */
#define POOL_MAX_FUSED 8
typedef struct {
    int n;
    TaskFn fn[POOL_MAX_FUSED];
    void *ctx[POOL_MAX_FUSED];
    int first[POOL_MAX_FUSED + 1];
} FusedTask;
void pool_run_fused(Pool *pool, FusedTask *f);
void pool_lock(Pool *pool);
void pool_unlock(Pool *pool);
/* Make sure scratch holds T tokens of K bytes / S scores per thread; 0 on success. */
int pool_reserve_act(Pool *pool, size_t n_tokens, size_t k);
int pool_reserve_scores(Pool *pool, size_t s);
/* ...and T tokens of n_super super-blocks for ternary_blocked_matmul (q and its records) */
int pool_reserve_blocked(Pool *pool, size_t n_tokens, size_t n_super);
int cpu_has_avx2(void);
int cpu_has_avx512(void); /* AVX512 F/BW/VL/VNNI, plus everything cpu_has_avx2 needs */
int cpu_has_gfni(void);   /* GFNI on top of cpu_has_avx512 (its EVEX forms) */

/* ---------------------------------------------------------------- kernels ---- */

/* x [T, K] f32 → q [T, K] int8, scale [T], sum [T] (per-token absmax, round-half-even). */
void quantize_rows(Pool *pool, KernelImpl impl, const float *x, size_t n_tokens, size_t k,
                   int8_t *q, float *scale, int32_t *sum);

/* one row of quantize_rows, on the calling thread */
void quantize_one(KernelImpl impl, const float *x, size_t k, int8_t *q, float *scale,
                  int32_t *sum);

/* I2_S codes are read in one of two layouts (`tiled` below): plain, as in the file (row r
 * at codes + r·K/4), or tiled, where each whole TILE_ROWS rows hold their 64-byte lines
 * in turn (line l of the tile's row i at tile + 64·(TILE_ROWS·l + i)), the order the
 * AVX-512 tile reads them, so that it reads one linear stream; rows past the last whole
 * tile stay plain (tile_rows below). Tiled needs K % 256 == 0. A float head's tiled layout
 * (lm_head) is the same. */
#define TILE_ROWS 4

/* y [T, N] = (q [T, K] · ternary [N, K]ᵀ) / scale * w_scale; codes in I2_S layout. */
void ternary_matmul(Pool *pool, KernelImpl impl, const uint8_t *codes, int tiled, size_t n_out,
                    size_t n_in, float w_scale, const int8_t *q, const float *scale,
                    const int32_t *sum, size_t n_tokens, float *y);

/* Several I2_S weights of the same input width against the same quantized tokens, as one
 * task (q/k/v, gate/up): y[i] [T, n_out[i]], each the bits of ternary_matmul alone. */
void ternary_matmul_many(Pool *pool, KernelImpl impl, int n, const uint8_t *const codes[],
                         const int tiled[], const size_t n_out[], size_t n_in, const float w_scale[],
                         const int8_t *q, const float *scale, const int32_t *sum, size_t n_tokens,
                         float *const y[]);

/* Integer dot products only: acc [T, N] int32 (tests check them against the oracle). */
void ternary_matmul_int(Pool *pool, KernelImpl impl, const uint8_t *codes, int tiled, size_t n_out,
                        size_t n_in, const int8_t *q, const int32_t *sum, size_t n_tokens,
                        int32_t *acc);

/* AVX-512 pair tiles (ternary_avx512.c): q [T, K] → qp [T, 256·⌈K/256⌉] in pair order, then
 * dots[t][r] = Σ_k code[rows[r], k] · q[t, k] for PAIR_TILE_ROWS rows (each row's 64-byte
 * lines `ls` bytes apart: 64 plain, 64·TILE_ROWS tiled) and tt <= PAIR_TILE_TOKENS
 * tokens; only called when cpu_has_avx512(), gfni only when cpu_has_gfni() (the same bits
 * either way). */
#define PAIR_TILE_ROWS 4
#define PAIR_TILE_TOKENS 4
void permute_pairs(const int8_t *q, size_t n_blocks, int8_t *qp);
void pair_dots_avx512(const uint8_t *const rows[PAIR_TILE_ROWS], size_t ls, const int8_t *qp,
                      size_t qp_stride, size_t n_blocks, int tt, int gfni,
                      int32_t dots[PAIR_TILE_TOKENS][PAIR_TILE_ROWS]);
/* ...and its n <= PAIR_TILE_ROWS rows stored for tt tokens: y[t·stride + i] =
 * (float)(dots[t][i] − sum[t]) / scale[t] · w_scale, or with scale NULL the int32
 * difference into acc[t·stride + i]; the same float32 operations as the scalar store. */
void store_tile_avx512(const int32_t dots[PAIR_TILE_TOKENS][PAIR_TILE_ROWS], int tt, size_t n,
                       const int32_t *sum, const float *scale, float w_scale, float *y,
                       int32_t *acc, size_t stride);

/* Block-scaled ternary weights (ternary_blocked.c) in the super-block layout of
 * bitserve/kernels/tensors.py: codes [n_out, 64·n_super], f16 scales [n_out, gps·n_super]
 * (gps = 256 / group: 1, 2 or 4); block32: BLOCK32 activations, else per token. */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales;
    size_t n_out, n_in, n_super;
    int gps, block32;
    float out_scale; /* every output times this (a file's separate per-tensor scale; else 1) */
} BlockedWeightArgs;
/* bytes of one prepared token: its q in lane order, lane inits, lane act scales */
size_t blocked_act_stride(size_t n_super);
/* y [T, n_out] = bitlinear of x [T, n_in]; needs pool_reserve_blocked(pool, T, n_super) */
void ternary_blocked_matmul(Pool *pool, KernelImpl impl, const BlockedWeightArgs *w, const float *x,
                            size_t n_tokens, float *y);
/* n weights of the same n_in, gps and activation mode on one input, as one task (the tokens
 * prepared once); each y[i] the bits of ternary_blocked_matmul alone */
void ternary_blocked_matmul_many(Pool *pool, KernelImpl impl, int n, const BlockedWeightArgs *w,
                                 const float *x, size_t n_tokens, float *const y[]);

/* Load-time repacking (repack.c); types by their ggml ids. */
enum { REPACK_Q8_0 = 8, REPACK_Q6_K = 14, REPACK_TQ1_0 = 34, REPACK_TQ2_0 = 35, REPACK_Q2_0 = 42 };
/* Q8_0 / Q6_K [rows, cols] → the int8-block head rows: cols int8 values, then cols/32 (Q8_0)
 * or cols/16 (Q6_K) f32 scales, per row (EMB_I8B32 / EMB_I8B16) */
void repack_int8_rows(int type, const uint8_t *src, size_t rows, size_t cols, uint8_t *out);
/* rows of src (row order[r], or r) → blocked codes [rows, 64·n_super] + f16 scales
 * [rows, gps·n_super]; q2_block: 64 or 128 (Q2_0 only) */
void repack_blocked(int type, const uint8_t *src, size_t q2_block, size_t rows, size_t cols,
                    const int64_t *order, uint8_t *codes, uint16_t *scales);
/* TQ1_0/TQ2_0: 1 when every block holding a nonzero weight has the same f16 scale (*scale)
 * and no code is 3, else 0 */
int ternary_scan(int type, const uint8_t *src, size_t rows, size_t cols, uint16_t *scale);
/* rows [n_rows, row_bytes] (row_bytes a multiple of 64) → dst in the tiled layout (TILE_ROWS);
 * dst is src or does not overlap it; scratch holds TILE_ROWS·row_bytes */
void tile_rows(const uint8_t *src, size_t n_rows, size_t row_bytes, uint8_t *dst, uint8_t *scratch);
/* TQ1_0/TQ2_0 → I2_S codes [rows · cols / 4] (zero-scale blocks as zero weights) */
void repack_tq_i2s(int type, const uint8_t *src, size_t rows, size_t cols, const int64_t *order,
                   uint8_t *out);

/* EMB_I8: int8 rows divided by a per-row scale at the end (the int8 head); EMB_I8B16/32:
 * Q6_K/Q8_0 as int8 rows each followed by its f32 scales, one per 16/32 values (value =
 * q · scale); EMB_BF16: raw bf16 bits. */
typedef enum { EMB_F32 = 0, EMB_F16 = 1, EMB_I8 = 2, EMB_BF16 = 3, EMB_I8B16 = 4, EMB_I8B32 = 5 } EmbKind;

/* out [T, V] = x [T, D] · emb [V, D]ᵀ (EMB_I8 rows are divided by row_scale). With `tiled`
 * (AVX2 and up; rows of whole 64-byte lines, kinds without block scales) emb is in the
 * head's tiled layout: each HEAD_TILE_ROWS rows as one run of their lines in turn (line l
 * of row r of a tile at l·HEAD_TILE_ROWS + r), the last V mod HEAD_TILE_ROWS rows plain. */
#define HEAD_TILE_ROWS TILE_ROWS /* one tiled layout: tile_rows writes both */
void lm_head(Pool *pool, KernelImpl impl, const float *x, size_t n_tokens, size_t dim,
             const void *emb, EmbKind kind, const float *row_scale, size_t vocab, int tiled, float *out);

/* F16 rows [V, D] → int8 rows + per-row scale (the activation quantizer, row by row). */
void quantize_f16_rows(Pool *pool, KernelImpl impl, const uint16_t *emb, size_t vocab,
                       size_t dim, int8_t *q, float *row_scale);

/* Read n bytes with all threads; returns a checksum so the reads cannot be elided. */
uint64_t read_memory(Pool *pool, KernelImpl impl, const uint8_t *buf, size_t n);

typedef struct {
    const float *q;   /* [T, H, D] */
    const void *k;    /* [S, KVH, D] f32 or f16, each head's D values contiguous */
    const void *v;    /* the same layout as k */
    int kv_f16;
    size_t n_tokens, n_heads, n_kv_heads, head_dim, start_pos;
    float *out; /* [T, H, D] */
    /* elements from one position to the next and from one KV head to the next, in k and v:
     * KVH·D and D for a position-major cache, D and S_max·D for a head-major one */
    size_t pos_stride, head_stride;
} AttentionArgs;

/* Needs pool_reserve_scores(pool, ATTENTION_GROUP · (start_pos + T)) first. */
#define ATTENTION_GROUP 32
void attention(Pool *pool, KernelImpl impl, const AttentionArgs *args);
/* One new token (n_tokens = 1) for each of n_items sequences of the same head layout, in
 * one task: each item's result is that of attention() on it alone, bit for bit. Needs
 * pool_reserve_scores(pool, ATTENTION_GROUP · max(start_pos + 1)) first. */
void attention_decode(Pool *pool, KernelImpl impl, const AttentionArgs *items, size_t n_items);
/* src [n, KVH, D] f32 → positions start..start+n-1 of the cache dst (a's k or v), laid out
 * as a says (store_kv_rows per head row) */
void store_new_rows(KernelImpl impl, void *dst, const AttentionArgs *a, const float *src, size_t start,
                    size_t n);

/* out [T, n] = x / sqrt(mean(x²) + eps) · weight per row (mean in float64) */
void rmsnorm_rows(Pool *pool, KernelImpl impl, const float *x, size_t n_rows, size_t n,
                  const float *weight, double eps, float *out);
/* out [T, n] = max(gate, 0)² · up, float32, bit-exact with numpy */
void relu2_mul(Pool *pool, KernelImpl impl, const float *gate, const float *up, size_t n_rows,
               size_t n, float *out);
/* out [T, n] = silu(gate) · up (SwiGLU), within a few ulp of numpy; scalar = AVX2 bits */
void silu_mul(Pool *pool, KernelImpl impl, const float *gate, const float *up, size_t n_rows,
              size_t n, float *out);

/* out [T, H, D] = NEOX RoPE of x [T, H, D] by cos/sin [T, D/2], bit-exact with numpy; on the
 * calling thread (a few µs at decode) */
void rope_rows(const float *x, size_t n_tokens, size_t n_heads, size_t head_dim, const float *cos_t,
               const float *sin_t, float *out);

/* Store n floats at dst, a KV cache's f32 or (f16) IEEE binary16 rows, the latter rounded to
 * nearest even exactly as numpy's astype(float16) (signalling NaNs aside: made quiet) */
void store_kv_rows(KernelImpl impl, void *dst, int f16, const float *src, size_t n);

/* ---------------------------------------------------------------- decode step (decode.c) ---- */

/* A projection: I2_S (scales NULL; scale = the tensor scale) or block-scaled (scale = the
 * output scale, gps groups per super-block, block32 the activation mode) */
typedef struct {
    const uint8_t *codes;
    const uint16_t *scales;
    size_t n_out;
    float scale;
    int gps, block32;
    int tiled; /* I2_S: the tiled layout (TILE_ROWS) */
} DecodeWeight;

/* One block: norm weights (f32; NULL where the family has none) and the projections in the
 * order q, k, v, o, gate, up, down */
typedef struct {
    const float *attn_norm, *attn_sub_norm, *ffn_norm, *ffn_sub_norm, *q_norm, *k_norm;
    DecodeWeight w[7];
} DecodeLayer;

typedef struct {
    size_t n_layers, dim, q_dim, kv_dim, n_heads, n_kv_heads, head_dim, ffn_dim;
    double eps;
    float residual_scale;
    int silu; /* SwiGLU, else squared ReLU */
} DecodeShape;

/* A KV cache [n_layers, max_seq, KVH, D] (f32, or f16), strides in elements */
typedef struct {
    void *k, *v;
    int f16;
    size_t layer_stride, pos_stride, head_stride;
} DecodeCache;

/* x [dim] (the token's embedding) → the residual stream after the last block; its keys and
 * values stored at position pos of every layer (cos/sin [D/2]: pos's RoPE angles). 0 or
 * ENOMEM. The caller holds pool_lock. */
int decode_token(Pool *pool, KernelImpl impl, const DecodeShape *s, const DecodeLayer *layers, float *x,
                 const DecodeCache *c, size_t pos, const float *cos_t, const float *sin_t);

/* portable half → float (IEEE binary16), used by the scalar paths */
float half_to_float(uint16_t h);

#endif
