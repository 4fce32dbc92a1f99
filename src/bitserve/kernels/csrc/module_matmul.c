/* Python bindings of the activation quantizer and the ternary matmuls (Pool methods, listed
 * in module.c): I2_S and block-scaled weights, one weight or several of one input (fused).
 * The checks and GIL handling of module.c's header comment apply. */
#include "bindings.h"

PyObject *py_quantize(PoolObject *self, PyObject *args) {
    PyObject *ox, *oq, *os, *osum;
    int impl;
    if (!PyArg_ParseTuple(args, "OOOOi", &ox, &oq, &os, &osum, &impl) || ready(self) ||
        check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0), *q = x ? take(&v, oq, "q", "b", 2, 1) : NULL;
    Py_buffer *s = q ? take(&v, os, "scale", "f", 1, 1) : NULL;
    Py_buffer *sum = s ? take(&v, osum, "sum", "i", 1, 1) : NULL;
    if (!sum || check_dim("q", 0, q->shape[0], x->shape[0]) ||
        check_dim("q", 1, q->shape[1], x->shape[1]) || check_dim("scale", 0, s->shape[0], x->shape[0]) ||
        check_dim("sum", 0, sum->shape[0], x->shape[0])) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    quantize_rows(&self->pool, (KernelImpl)impl, x->buf, (size_t)x->shape[0], (size_t)x->shape[1],
                  q->buf, s->buf, sum->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

/* The I2_S codes of an [n_out, n_in] weight: n_in a multiple of 128 (tiled: of 256, whole
 * 64-byte lines a row), enough bytes. */
static Py_buffer *take_codes(Views *v, PyObject *obj, Py_ssize_t n_out, Py_ssize_t n_in, int tiled) {
    Py_buffer *raw = take(v, obj, "raw", "Bb", -1, 0);
    if (!raw) return NULL;
    if (n_out < 1 || n_in < 128 || n_in % 128) {
        PyErr_Format(PyExc_ValueError, "I2_S weight [%zd, %zd]: n_in must be a positive multiple of 128", n_out, n_in);
        return NULL;
    }
    if (tiled && n_in % 256) {
        PyErr_Format(PyExc_ValueError, "a tiled I2_S weight needs rows of whole 64-byte lines (n_in a multiple of 256), not %zd", n_in);
        return NULL;
    }
    Py_ssize_t need = size_product(n_out, n_in / 4, 1);
    if (need < 0) {
        PyErr_Format(PyExc_ValueError, "I2_S weight [%zd, %zd]: more bytes than an array can hold", n_out, n_in);
        return NULL;
    }
    if (raw->len < need) {
        PyErr_Format(PyExc_ValueError, "raw: %zd bytes, an I2_S [%zd, %zd] weight needs %zd", raw->len,
                     n_out, n_in, need);
        return NULL;
    }
    return raw;
}

PyObject *py_ternary_int(PoolObject *self, PyObject *args) {
    PyObject *oq, *osum, *oraw, *oacc;
    Py_ssize_t n_out;
    int impl, tiled;
    if (!PyArg_ParseTuple(args, "OOOpnOi", &oq, &osum, &oraw, &tiled, &n_out, &oacc, &impl) || ready(self) ||
        check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *q = take(&v, oq, "q", "b", 2, 0), *sum = q ? take(&v, osum, "sum", "i", 1, 0) : NULL;
    Py_buffer *raw = sum ? take_codes(&v, oraw, n_out, q->shape[1], tiled) : NULL;
    Py_buffer *acc = raw ? take(&v, oacc, "acc", "i", 2, 1) : NULL;
    if (!acc || check_dim("sum", 0, sum->shape[0], q->shape[0]) ||
        check_dim("acc", 0, acc->shape[0], q->shape[0]) || check_dim("acc", 1, acc->shape[1], n_out)) {
        release_views(&v);
        return NULL;
    }
    int err = 0;
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    err = pool_reserve_act(&self->pool, (size_t)q->shape[0], (size_t)q->shape[1]);
    if (!err)
        ternary_matmul_int(&self->pool, (KernelImpl)impl, raw->buf, tiled, (size_t)n_out, (size_t)q->shape[1],
                           q->buf, sum->buf, (size_t)q->shape[0], acc->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}

PyObject *py_bitlinear(PoolObject *self, PyObject *args) {
    PyObject *ox, *oraw, *oy;
    Py_ssize_t n_out;
    float w_scale;
    int impl, tiled, err = 0;
    if (!PyArg_ParseTuple(args, "OOpnfOi", &ox, &oraw, &tiled, &n_out, &w_scale, &oy, &impl) || ready(self) ||
        check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0), *raw = x ? take_codes(&v, oraw, n_out, x->shape[1], tiled) : NULL;
    Py_buffer *y = raw ? take(&v, oy, "out", "f", 2, 1) : NULL;
    if (!y || check_dim("out", 0, y->shape[0], x->shape[0]) || check_dim("out", 1, y->shape[1], n_out)) {
        release_views(&v);
        return NULL;
    }
    size_t t = (size_t)x->shape[0], k = (size_t)x->shape[1];
    Py_BEGIN_ALLOW_THREADS Pool *pool = &self->pool;
    pool_lock(pool);
    err = pool_reserve_act(pool, t, k);
    if (!err) {
        quantize_rows(pool, (KernelImpl)impl, x->buf, t, k, pool->q, pool->act_scale, pool->act_sum);
        ternary_matmul(pool, (KernelImpl)impl, raw->buf, tiled, (size_t)n_out, k, w_scale, pool->q,
                       pool->act_scale, pool->act_sum, t, y->buf);
    }
    pool_unlock(pool);
    Py_END_ALLOW_THREADS if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}

/* bitlinear_blocked(x, codes, scales, n_out, gps, block32, out_scale, out, impl): a
 * block-scaled weight (codes uint8 [n_out, 64·n_super], scales f16 [n_out, gps·n_super],
 * n_super = ⌈K/256⌉), every output times out_scale */
PyObject *py_bitlinear_blocked(PoolObject *self, PyObject *args) {
    PyObject *ox, *ocodes, *oscales, *oy;
    Py_ssize_t n_out;
    int gps, block32, impl, err = 0;
    float out_scale;
    if (!PyArg_ParseTuple(args, "OOOnipfOi", &ox, &ocodes, &oscales, &n_out, &gps, &block32, &out_scale, &oy, &impl) ||
        ready(self) || check_impl(impl))
        return NULL;
    if (gps != 1 && gps != 2 && gps != 4)
        return PyErr_Format(PyExc_ValueError, "gps (groups per super-block) must be 1, 2 or 4, got %d", gps);
    if (n_out < 1) return PyErr_Format(PyExc_ValueError, "n_out must be positive, got %zd", n_out);
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0), *codes = x ? take(&v, ocodes, "codes", "B", 2, 0) : NULL;
    Py_buffer *scales = codes ? take(&v, oscales, "scales", "e", 2, 0) : NULL;
    Py_buffer *y = scales ? take(&v, oy, "out", "f", 2, 1) : NULL;
    if (!y) {
        release_views(&v);
        return NULL;
    }
    Py_ssize_t k = x->shape[1], n_super = (k + 255) / 256;
    if (k < 1 || (block32 && k % 32)) {
        release_views(&v);
        return PyErr_Format(PyExc_ValueError, "x: row length %zd (BLOCK32 needs a multiple of 32)", k);
    }
    if (check_dim("codes", 0, codes->shape[0], n_out) || check_dim("codes", 1, codes->shape[1], 64 * n_super) ||
        check_dim("scales", 0, scales->shape[0], n_out) || check_dim("scales", 1, scales->shape[1], gps * n_super) ||
        check_dim("out", 0, y->shape[0], x->shape[0]) || check_dim("out", 1, y->shape[1], n_out)) {
        release_views(&v);
        return NULL;
    }
    BlockedWeightArgs w = {codes->buf, scales->buf, (size_t)n_out, (size_t)k, (size_t)n_super, gps, block32, out_scale};
    size_t t = (size_t)x->shape[0];
    Py_BEGIN_ALLOW_THREADS Pool *pool = &self->pool;
    pool_lock(pool);
    err = t ? pool_reserve_blocked(pool, t, (size_t)n_super) : 0;
    if (!err && t) ternary_blocked_matmul(pool, (KernelImpl)impl, &w, x->buf, t, y->buf);
    pool_unlock(pool);
    Py_END_ALLOW_THREADS if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}

/* The n weights of a fused call: tuples of one length 1..POOL_MAX_FUSED */
static int fused_count(PyObject *const tuples[], int n_tuples) {
    Py_ssize_t n = PyTuple_GET_SIZE(tuples[0]);
    for (int i = 1; i < n_tuples; i++)
        if (PyTuple_GET_SIZE(tuples[i]) != n) {
            PyErr_SetString(PyExc_ValueError, "the per-weight tuples differ in length");
            return -1;
        }
    if (n < 1 || n > POOL_MAX_FUSED) {
        PyErr_Format(PyExc_ValueError, "1 to %d weights per call, got %zd", POOL_MAX_FUSED, n);
        return -1;
    }
    return (int)n;
}

/* out[i]: a float32 [T, n_out] output */
static Py_buffer *take_out(Views *v, PyObject *obj, Py_ssize_t n_tokens, Py_ssize_t n_out) {
    Py_buffer *y = take(v, obj, "out", "f", 2, 1);
    if (!y || check_dim("out", 0, y->shape[0], n_tokens) || check_dim("out", 1, y->shape[1], n_out)) return NULL;
    return y;
}

/* bitlinear_many(x, raws, tiled, n_outs, w_scales, outs, impl): I2_S weights of one input
 * (tiled: one layout for all), fused */
PyObject *py_bitlinear_many(PoolObject *self, PyObject *args) {
    PyObject *ox, *t[4];
    int impl, tiled, err = 0;
    if (!PyArg_ParseTuple(args, "OO!pO!O!O!i", &ox, &PyTuple_Type, &t[0], &tiled, &PyTuple_Type, &t[1], &PyTuple_Type,
                          &t[2], &PyTuple_Type, &t[3], &impl) ||
        ready(self) || check_impl(impl))
        return NULL;
    int n = fused_count(t, 4);
    if (n < 0) return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0);
    const uint8_t *codes[POOL_MAX_FUSED];
    size_t n_out[POOL_MAX_FUSED];
    float w_scale[POOL_MAX_FUSED], *y[POOL_MAX_FUSED];
    int layout[POOL_MAX_FUSED];
    for (int i = 0; x && i < n; i++) {
        Py_ssize_t rows = PyLong_AsSsize_t(PyTuple_GET_ITEM(t[1], i));
        double scale = PyFloat_AsDouble(PyTuple_GET_ITEM(t[2], i));
        Py_buffer *raw = PyErr_Occurred() ? NULL : take_codes(&v, PyTuple_GET_ITEM(t[0], i), rows, x->shape[1], tiled);
        Py_buffer *out = raw ? take_out(&v, PyTuple_GET_ITEM(t[3], i), x->shape[0], rows) : NULL;
        if (!out) x = NULL; /* stop; the error is set */
        else codes[i] = raw->buf, layout[i] = tiled, n_out[i] = (size_t)rows, w_scale[i] = (float)scale, y[i] = out->buf;
    }
    if (!x) {
        release_views(&v);
        return NULL;
    }
    size_t tok = (size_t)x->shape[0], k = (size_t)x->shape[1];
    Py_BEGIN_ALLOW_THREADS Pool *pool = &self->pool;
    pool_lock(pool);
    err = pool_reserve_act(pool, tok, k);
    if (!err) {
        quantize_rows(pool, (KernelImpl)impl, x->buf, tok, k, pool->q, pool->act_scale, pool->act_sum);
        ternary_matmul_many(pool, (KernelImpl)impl, n, codes, layout, n_out, k, w_scale, pool->q, pool->act_scale,
                            pool->act_sum, tok, y);
    }
    pool_unlock(pool);
    Py_END_ALLOW_THREADS if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}

/* bitlinear_blocked_many(x, codes, scales, n_outs, gps, block32, out_scales, outs, impl):
 * block-scaled weights of one input, group size and activation mode, fused */
PyObject *py_bitlinear_blocked_many(PoolObject *self, PyObject *args) {
    PyObject *ox, *t[5];
    int gps, block32, impl, err = 0;
    if (!PyArg_ParseTuple(args, "OO!O!O!ipO!O!i", &ox, &PyTuple_Type, &t[0], &PyTuple_Type, &t[1], &PyTuple_Type,
                          &t[2], &gps, &block32, &PyTuple_Type, &t[3], &PyTuple_Type, &t[4], &impl) ||
        ready(self) || check_impl(impl))
        return NULL;
    if (gps != 1 && gps != 2 && gps != 4)
        return PyErr_Format(PyExc_ValueError, "gps (groups per super-block) must be 1, 2 or 4, got %d", gps);
    int n = fused_count(t, 5);
    if (n < 0) return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0);
    Py_ssize_t k = x ? x->shape[1] : 0, n_super = (k + 255) / 256;
    if (x && (k < 1 || (block32 && k % 32))) {
        PyErr_Format(PyExc_ValueError, "x: row length %zd (BLOCK32 needs a multiple of 32)", k);
        x = NULL;
    }
    BlockedWeightArgs w[POOL_MAX_FUSED];
    float *y[POOL_MAX_FUSED];
    for (int i = 0; x && i < n; i++) {
        Py_ssize_t rows = PyLong_AsSsize_t(PyTuple_GET_ITEM(t[2], i));
        double out_scale = PyFloat_AsDouble(PyTuple_GET_ITEM(t[3], i));
        if (PyErr_Occurred() || rows < 1) {
            if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "n_out must be positive, got %zd", rows);
            x = NULL;
            break;
        }
        Py_buffer *codes = take(&v, PyTuple_GET_ITEM(t[0], i), "codes", "B", 2, 0);
        Py_buffer *scales = codes ? take(&v, PyTuple_GET_ITEM(t[1], i), "scales", "e", 2, 0) : NULL;
        Py_buffer *out = scales ? take_out(&v, PyTuple_GET_ITEM(t[4], i), x->shape[0], rows) : NULL;
        if (!out || check_dim("codes", 0, codes->shape[0], rows) || check_dim("codes", 1, codes->shape[1], 64 * n_super) ||
            check_dim("scales", 0, scales->shape[0], rows) || check_dim("scales", 1, scales->shape[1], gps * n_super)) {
            x = NULL;
            break;
        }
        w[i] = (BlockedWeightArgs){codes->buf, scales->buf, (size_t)rows, (size_t)k, (size_t)n_super, gps, block32, (float)out_scale};
        y[i] = out->buf;
    }
    if (!x) {
        release_views(&v);
        return NULL;
    }
    size_t tok = (size_t)x->shape[0];
    Py_BEGIN_ALLOW_THREADS Pool *pool = &self->pool;
    pool_lock(pool);
    err = pool_reserve_blocked(pool, tok, (size_t)n_super);
    if (!err) ternary_blocked_matmul_many(pool, (KernelImpl)impl, n, w, x->buf, tok, y);
    pool_unlock(pool);
    Py_END_ALLOW_THREADS if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}
