/* Python binding of decode_token (decode.c): the Pool method decode_token, listed in
 * module.c. The checks and GIL handling of module.c's header comment apply to the arrays
 * passed in; the plan's table holds addresses, which bitserve.kernels.decode.DecodePlan
 * takes from arrays it keeps alive and checked when it built the table (this method trusts
 * the table: it is private to NativeBackend.decode_token). */
#include "bindings.h"

#define PLAN_NORMS 6
/* codes, scales (0: I2_S), n_out, gps | block32 << 8 (I2_S: tiled), scale bits */
#define PLAN_WEIGHT_SLOTS 5
#define PLAN_SLOTS (PLAN_NORMS + 7 * PLAN_WEIGHT_SLOTS)
#define SHAPE_FIELDS 9 /* n_layers, dim, q_dim, kv_dim, n_heads, n_kv_heads, head_dim, ffn_dim, silu */

static void plan_layer(const int64_t *row, DecodeLayer *L) {
    const float **norms[PLAN_NORMS] = {&L->attn_norm, &L->attn_sub_norm, &L->ffn_norm,
                                       &L->ffn_sub_norm, &L->q_norm, &L->k_norm};
    for (int i = 0; i < PLAN_NORMS; i++) *norms[i] = (const float *)(uintptr_t)row[i];
    for (int j = 0; j < 7; j++) {
        const int64_t *w = row + PLAN_NORMS + PLAN_WEIGHT_SLOTS * j;
        uint32_t bits = (uint32_t)w[4];
        float scale;
        memcpy(&scale, &bits, 4);
        int i2s = !w[1];
        L->w[j] = (DecodeWeight){(const uint8_t *)(uintptr_t)w[0], (const uint16_t *)(uintptr_t)w[1],
                                 (size_t)w[2], scale, i2s ? 0 : (int)(w[3] & 0xff), i2s ? 0 : (int)(w[3] >> 8),
                                 i2s && w[3]};
    }
}

/* k_cache/v_cache: [n_layers, max_seq, KVH, D] float32 or float16, D contiguous; fills c's
 * dtype and strides (the caller checks that k and v agree and sets the pointers) */
static Py_buffer *take_kv(Views *v, PyObject *obj, const char *name, const int64_t *shape, DecodeCache *c) {
    Py_buffer *b = &v->views[v->n];
    if (PyObject_GetBuffer(obj, b, PyBUF_STRIDES | PyBUF_FORMAT | PyBUF_WRITABLE) < 0) return NULL;
    v->n++;
    size_t strides[3];
    if (cache_strides(b, name, 4, strides) || check_dim(name, 0, b->shape[0], shape[0]) ||
        check_dim(name, 2, b->shape[2], shape[5]) || check_dim(name, 3, b->shape[3], shape[6]))
        return NULL;
    *c = (DecodeCache){.f16 = format_code(b) == 'e', .layer_stride = strides[0], .pos_stride = strides[1],
                       .head_stride = strides[2]};
    return b;
}

/* decode_token(table, shape, eps, residual_scale, x, k_cache, v_cache, pos, cos, sin, impl) */
PyObject *py_decode_token(PoolObject *self, PyObject *args) {
    PyObject *otable, *oshape, *ox, *ok, *ov, *ocos, *osin;
    double eps;
    float residual_scale;
    Py_ssize_t pos;
    int impl, err = 0;
    if (!PyArg_ParseTuple(args, "OOdfOOOnOOi", &otable, &oshape, &eps, &residual_scale, &ox, &ok, &ov, &pos, &ocos,
                          &osin, &impl) ||
        ready(self) || check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *shape = take(&v, oshape, "shape", "lq", 1, 0);
    const int64_t *sh = shape ? shape->buf : NULL;
    Py_buffer *table = shape && !check_dim("shape", 0, shape->shape[0], SHAPE_FIELDS)
                           ? take(&v, otable, "table", "lq", 2, 0) : NULL;
    if (table && (check_dim("table", 0, table->shape[0], sh[0]) || check_dim("table", 1, table->shape[1], PLAN_SLOTS)))
        table = NULL;
    Py_buffer *x = table ? take(&v, ox, "x", "f", 2, 1) : NULL;
    if (x && (check_dim("x", 0, x->shape[0], 1) || check_dim("x", 1, x->shape[1], sh[1]))) x = NULL;
    DecodeCache kc, vc;
    Py_buffer *k = x ? take_kv(&v, ok, "k_cache", sh, &kc) : NULL, *vv = k ? take_kv(&v, ov, "v_cache", sh, &vc) : NULL;
    if (vv && (kc.f16 != vc.f16 || kc.layer_stride != vc.layer_stride || kc.pos_stride != vc.pos_stride ||
               kc.head_stride != vc.head_stride || check_dim("v_cache", 1, vv->shape[1], k->shape[1]))) {
        if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "k_cache and v_cache must be laid out alike");
        vv = NULL;
    }
    if (vv && (pos < 0 || pos >= k->shape[1])) {
        PyErr_Format(PyExc_ValueError, "pos %zd is outside the cache (%zd positions)", pos, k->shape[1]);
        vv = NULL;
    }
    Py_buffer *cos = vv ? take(&v, ocos, "cos", "f", -1, 0) : NULL, *sin = cos ? take(&v, osin, "sin", "f", -1, 0) : NULL;
    if (sin && (cos->len < (Py_ssize_t)(sh[6] / 2 * 4) || sin->len < (Py_ssize_t)(sh[6] / 2 * 4))) {
        PyErr_Format(PyExc_ValueError, "cos/sin: %lld angles needed", (long long)(sh[6] / 2));
        sin = NULL;
    }
    if (!sin) {
        release_views(&v);
        return NULL;
    }
    DecodeShape s = {(size_t)sh[0], (size_t)sh[1], (size_t)sh[2], (size_t)sh[3], (size_t)sh[4], (size_t)sh[5],
                     (size_t)sh[6], (size_t)sh[7], eps, residual_scale, (int)sh[8]};
    kc.k = k->buf, kc.v = vv->buf;
    DecodeLayer *layers = PyMem_RawMalloc(s.n_layers * sizeof(DecodeLayer));
    if (!layers) return no_memory(&v);
    for (size_t l = 0; l < s.n_layers; l++) plan_layer((const int64_t *)table->buf + l * PLAN_SLOTS, &layers[l]);
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    err = decode_token(&self->pool, (KernelImpl)impl, &s, layers, x->buf, &kc, (size_t)pos, cos->buf, sin->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS
    PyMem_RawFree(layers);
    if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}
