/* One generated token of one sequence through every transformer block, in one call.
 *
 * Decoding a single sequence (a chat) runs ~17 kernels per block, 500 per token on 2B-4T,
 * each a Python call (~1.5-2 µs of wrapper, numpy allocation, GIL hand-off) while memory
 * sits idle: ~1 ms of a 20-27 ms token. Here the same kernels run back to back, in the same
 * order on the same values, so the result is the Python forward's (BitNetModel._hidden) bit
 * for bit, which tests/model/test_decode_step.py checks on every family's fixture.
 *
 * The model is a table the Python side builds once (bitserve.kernels.decode.DecodePlan):
 * per block the norm weights (NULL when the family has none) and the seven projections,
 * I2_S or block-scaled, each with its own layout, so a block that mixes them still runs.
 */
#include <errno.h>
#include <stdlib.h>
#include <string.h>

#include "native.h"

enum { W_Q, W_K, W_V, W_O, W_GATE, W_UP, W_DOWN };

/* y[i] = w[i]·x for n weights of one input x [k]: one task when their layouts agree (as
 * NativeBackend.bitlinear_many), else one after the other; the same bits either way */
static int run_group(Pool *pool, KernelImpl impl, const DecodeWeight *w, int n, const float *x, size_t k,
                     float *const y[]) {
    for (int i = 1; i < n; i++) {
        int same = !w[i].scales == !w[0].scales &&
                   (!w[0].scales || (w[i].gps == w[0].gps && w[i].block32 == w[0].block32));
        if (!same) {
            for (int j = 0; j < n; j++) {
                int err = run_group(pool, impl, &w[j], 1, x, k, &y[j]);
                if (err) return err;
            }
            return 0;
        }
    }
    if (!w[0].scales) { /* I2_S: one quantization, one fused task */
        if (pool_reserve_act(pool, 1, k)) return ENOMEM;
        const uint8_t *codes[POOL_MAX_FUSED];
        int tiled[POOL_MAX_FUSED];
        size_t n_out[POOL_MAX_FUSED];
        float scale[POOL_MAX_FUSED];
        for (int i = 0; i < n; i++)
            codes[i] = w[i].codes, tiled[i] = w[i].tiled, n_out[i] = w[i].n_out, scale[i] = w[i].scale;
        quantize_rows(pool, impl, x, 1, k, pool->q, pool->act_scale, pool->act_sum);
        ternary_matmul_many(pool, impl, n, codes, tiled, n_out, k, scale, pool->q, pool->act_scale, pool->act_sum,
                            1, y);
        return 0;
    }
    size_t n_super = (k + 255) / 256;
    if (pool_reserve_blocked(pool, 1, n_super)) return ENOMEM;
    BlockedWeightArgs b[POOL_MAX_FUSED];
    for (int i = 0; i < n; i++)
        b[i] = (BlockedWeightArgs){w[i].codes, w[i].scales, w[i].n_out, k, n_super, w[i].gps, w[i].block32,
                                   w[i].scale};
    ternary_blocked_matmul_many(pool, impl, n, b, x, 1, y);
    return 0;
}

/* x += branch, or x += branch · s (MiniCPM): two roundings, as numpy's x += b * s (never
 * one FMA: the build passes -ffp-contract=off, and the product is its own statement) */
static void residual(float *x, const float *branch, size_t n, float s) {
    if (s == 1.0f) {
        for (size_t i = 0; i < n; i++) x[i] = x[i] + branch[i];
        return;
    }
    for (size_t i = 0; i < n; i++) {
        float scaled = branch[i] * s;
        x[i] = x[i] + scaled;
    }
}

/* scratch of one token: h [dim], q/qn/qr and att/an [q_dim], k/kn/kr and v [kv_dim], o [dim],
 * gate/up/f/fn [ffn] */
typedef struct {
    float *h, *q, *qn, *qr, *k, *kn, *kr, *v, *att, *an, *o, *gate, *up, *f, *fn;
} Scratch;

/* the next n floats of *at (NULL: only count them in *at), 64-byte aligned pieces */
static float *carve(float *base, size_t *at, size_t n) {
    float *p = base ? base + *at : NULL;
    *at += (n + 15) / 16 * 16;
    return p;
}

/* lays the pieces out over base (NULL: only sizes them); returns the floats used */
static size_t lay_out(const DecodeShape *s, float *base, Scratch *b) {
    size_t at = 0;
    b->h = carve(base, &at, s->dim), b->o = carve(base, &at, s->dim);
    b->q = carve(base, &at, s->q_dim), b->qn = carve(base, &at, s->q_dim), b->qr = carve(base, &at, s->q_dim);
    b->att = carve(base, &at, s->q_dim), b->an = carve(base, &at, s->q_dim);
    b->k = carve(base, &at, s->kv_dim), b->kn = carve(base, &at, s->kv_dim), b->kr = carve(base, &at, s->kv_dim);
    b->v = carve(base, &at, s->kv_dim);
    b->gate = carve(base, &at, s->ffn_dim), b->up = carve(base, &at, s->ffn_dim);
    b->f = carve(base, &at, s->ffn_dim), b->fn = carve(base, &at, s->ffn_dim);
    return at;
}

static float *alloc_scratch(const DecodeShape *s, Scratch *b) {
    float *mem = aligned_alloc(64, lay_out(s, NULL, b) * sizeof(float));
    if (mem) lay_out(s, mem, b);
    return mem;
}

static int attention_branch(Pool *pool, KernelImpl impl, const DecodeShape *s, const DecodeLayer *L,
                            const DecodeCache *c, size_t layer, size_t pos, const float *cos_t,
                            const float *sin_t, const float *x, Scratch *b) {
    rmsnorm_rows(pool, impl, x, 1, s->dim, L->attn_norm, s->eps, b->h);
    float *qkv[3] = {b->q, b->k, b->v};
    int err = run_group(pool, impl, &L->w[W_Q], 3, b->h, s->dim, qkv);
    if (err) return err;
    const float *q = b->q, *k = b->k;
    if (L->q_norm && L->k_norm) { /* Qwen3: RMSNorm of each head, before RoPE */
        rmsnorm_rows(pool, impl, b->q, s->n_heads, s->head_dim, L->q_norm, s->eps, b->qn);
        rmsnorm_rows(pool, impl, b->k, s->n_kv_heads, s->head_dim, L->k_norm, s->eps, b->kn);
        q = b->qn, k = b->kn;
    }
    rope_rows(q, 1, s->n_heads, s->head_dim, cos_t, sin_t, b->qr);
    rope_rows(k, 1, s->n_kv_heads, s->head_dim, cos_t, sin_t, b->kr);
    size_t elt = c->f16 ? 2 : 4;
    void *kc = (char *)c->k + layer * c->layer_stride * elt, *vc = (char *)c->v + layer * c->layer_stride * elt;
    AttentionArgs a = {.q = b->qr, .k = kc, .v = vc, .kv_f16 = c->f16, .n_tokens = 1, .n_heads = s->n_heads,
                       .n_kv_heads = s->n_kv_heads, .head_dim = s->head_dim, .start_pos = pos, .out = b->att,
                       .pos_stride = c->pos_stride, .head_stride = c->head_stride};
    store_new_rows(impl, kc, &a, b->kr, pos, 1); /* the new token attends to itself */
    store_new_rows(impl, vc, &a, b->v, pos, 1);
    if (pool_reserve_scores(pool, ATTENTION_GROUP * (pos + 1))) return ENOMEM;
    attention(pool, impl, &a);
    const float *att = b->att;
    if (L->attn_sub_norm) { /* BitNet: sub-norm before o_proj */
        rmsnorm_rows(pool, impl, b->att, 1, s->q_dim, L->attn_sub_norm, s->eps, b->an);
        att = b->an;
    }
    float *o[1] = {b->o};
    return run_group(pool, impl, &L->w[W_O], 1, att, s->q_dim, o);
}

static int feed_forward_branch(Pool *pool, KernelImpl impl, const DecodeShape *s, const DecodeLayer *L,
                               const float *x, Scratch *b) {
    rmsnorm_rows(pool, impl, x, 1, s->dim, L->ffn_norm, s->eps, b->h);
    float *gate_up[2] = {b->gate, b->up};
    int err = run_group(pool, impl, &L->w[W_GATE], 2, b->h, s->dim, gate_up);
    if (err) return err;
    if (s->silu)
        silu_mul(pool, impl, b->gate, b->up, 1, s->ffn_dim, b->f);
    else
        relu2_mul(pool, impl, b->gate, b->up, 1, s->ffn_dim, b->f);
    const float *f = b->f;
    if (L->ffn_sub_norm) { /* BitNet: sub-norm before down_proj */
        rmsnorm_rows(pool, impl, b->f, 1, s->ffn_dim, L->ffn_sub_norm, s->eps, b->fn);
        f = b->fn;
    }
    float *o[1] = {b->o};
    return run_group(pool, impl, &L->w[W_DOWN], 1, f, s->ffn_dim, o);
}

int decode_token(Pool *pool, KernelImpl impl, const DecodeShape *s, const DecodeLayer *layers, float *x,
                 const DecodeCache *c, size_t pos, const float *cos_t, const float *sin_t) {
    Scratch b;
    float *mem = alloc_scratch(s, &b);
    if (!mem) return ENOMEM;
    int err = 0;
    for (size_t l = 0; !err && l < s->n_layers; l++) {
        err = attention_branch(pool, impl, s, &layers[l], c, l, pos, cos_t, sin_t, x, &b);
        if (err) break;
        residual(x, b.o, s->dim, s->residual_scale);
        err = feed_forward_branch(pool, impl, s, &layers[l], x, &b);
        if (!err) residual(x, b.o, s->dim, s->residual_scale);
    }
    free(mem);
    return err;
}
