/* Python bindings of the native kernels: bitserve.kernels._native.
 *
 * One type, Pool(threads): it owns the worker threads and the scratch buffers, and every
 * kernel is a method of it. Each method takes arrays through the buffer protocol, checks
 * dtypes, shapes, contiguity and sizes BEFORE any kernel runs (a bad call raises, it never
 * reads out of bounds), writes into caller-allocated outputs, and releases the GIL while
 * the kernel runs. The last argument `impl` picks the path: 0 scalar, 1 AVX2, 2 AVX-512.
 * This file holds the Pool type, the head/attention/row-wise methods and the module; the
 * matmul methods live in module_matmul.c, the load-time repacking in module_repack.c.
 */
#include "bindings.h"

#ifdef __GLIBC__
#include <malloc.h>
#include <stdlib.h>
#endif

/* ---------------------------------------------------------------- Pool type ---- */

static int pool_object_init(PoolObject *self, PyObject *args, PyObject *kwds) {
    static char *kwlist[] = {"threads", "gfni", NULL};
    int threads = 1, gfni = 1; /* gfni=False: the shift-and-mask code planes (tests compare) */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "|ip", kwlist, &threads, &gfni)) return -1;
    if (self->ready) {
        PyErr_SetString(PyExc_RuntimeError, "Pool is already initialised");
        return -1;
    }
    if (threads < 1 || threads > 256) {
        PyErr_Format(PyExc_ValueError, "threads must be 1..256, got %d", threads);
        return -1;
    }
    if (pool_init(&self->pool, threads)) {
        pool_free(&self->pool);
        PyErr_SetString(PyExc_OSError, "cannot start the kernel threads");
        return -1;
    }
    self->pool.gfni &= gfni;
    self->ready = 1;
    return 0;
}

static void pool_object_dealloc(PoolObject *self) {
    if (self->ready) {
        Py_BEGIN_ALLOW_THREADS pool_free(&self->pool);
        Py_END_ALLOW_THREADS
    }
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---------------------------------------------------------------- methods ---- */

/* -1 with ValueError set unless a tiled head (if `tiled`) can run: AVX2 and rows of whole
 * 64-byte lines (see lm_head) */
static int check_tiled(int tiled, int impl, size_t row_bytes) {
    if (!tiled) return 0;
    if (impl < IMPL_AVX2) {
        PyErr_SetString(PyExc_ValueError, "a tiled head needs the AVX2 or AVX-512 kernels");
        return -1;
    }
    if (row_bytes % 64) {
        PyErr_Format(PyExc_ValueError, "a tiled head needs rows of whole 64-byte lines, not %zu bytes", row_bytes);
        return -1;
    }
    return 0;
}

static PyObject *py_head(PoolObject *self, PyObject *args) {
    PyObject *ox, *oemb, *oscale, *oout;
    int impl, tiled = 0;
    if (!PyArg_ParseTuple(args, "OOOOi|p", &ox, &oemb, &oscale, &oout, &impl, &tiled) || ready(self) ||
        check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0), *emb = x ? take(&v, oemb, "embedding", "feb", 2, 0) : NULL;
    Py_buffer *scale = NULL, *out = NULL;
    int is_i8 = emb && format_code(emb) == 'b';
    if (emb && (oscale != Py_None || is_i8)) scale = take(&v, oscale, "row_scale", "f", 1, 0);
    if (emb && (scale || !is_i8)) out = take(&v, oout, "out", "f", 2, 1);
    if (!out || check_dim("embedding", 1, emb->shape[1], x->shape[1]) ||
        (scale && check_dim("row_scale", 0, scale->shape[0], emb->shape[0])) ||
        check_dim("out", 0, out->shape[0], x->shape[0]) || check_dim("out", 1, out->shape[1], emb->shape[0])) {
        release_views(&v);
        return NULL;
    }
    EmbKind kind = is_i8 ? EMB_I8 : format_code(emb) == 'e' ? EMB_F16 : EMB_F32;
    if (check_tiled(tiled, impl, (size_t)emb->shape[1] * (size_t)emb->itemsize)) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    lm_head(&self->pool, (KernelImpl)impl, x->buf, (size_t)x->shape[0], (size_t)x->shape[1], emb->buf,
            kind, scale ? scale->buf : NULL, (size_t)emb->shape[0], tiled, out->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

/* head_packed(x, rows, kind, out, impl): a head whose rows are raw bytes [V, row_bytes] of
 * kind EMB_BF16 (2·dim) or EMB_I8B16/32 (dim int8 values, then dim/16 or dim/32 f32 scales) */
static PyObject *py_head_packed(PoolObject *self, PyObject *args) {
    PyObject *ox, *oemb, *oout;
    int kind, impl, tiled = 0;
    if (!PyArg_ParseTuple(args, "OOiOi|p", &ox, &oemb, &kind, &oout, &impl, &tiled) || ready(self) ||
        check_impl(impl))
        return NULL;
    if (tiled && kind != EMB_BF16)
        return PyErr_Format(PyExc_ValueError, "head_packed: only a BF16 head can be tiled, not kind %d", kind);
    if (kind != EMB_BF16 && kind != EMB_I8B16 && kind != EMB_I8B32)
        return PyErr_Format(PyExc_ValueError, "head_packed: kind %d is not BF16, I8B16 or I8B32", kind);
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0), *emb = x ? take(&v, oemb, "rows", "B", 2, 0) : NULL;
    Py_buffer *out = emb ? take(&v, oout, "out", "f", 2, 1) : NULL;
    if (!out) {
        release_views(&v);
        return NULL;
    }
    Py_ssize_t dim = x->shape[1], block = kind == EMB_I8B16 ? 16 : kind == EMB_I8B32 ? 32 : 1;
    Py_ssize_t row_bytes = kind == EMB_BF16 ? 2 * dim : dim + dim / block * 4;
    if (dim % block || check_dim("rows", 1, emb->shape[1], row_bytes) || check_dim("out", 0, out->shape[0], x->shape[0]) ||
        check_dim("out", 1, out->shape[1], emb->shape[0])) {
        if (!PyErr_Occurred()) PyErr_Format(PyExc_ValueError, "x: width %zd is not whole blocks of %zd", dim, block);
        release_views(&v);
        return NULL;
    }
    if (check_tiled(tiled, impl, (size_t)row_bytes)) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    lm_head(&self->pool, (KernelImpl)impl, x->buf, (size_t)x->shape[0], (size_t)dim, emb->buf, (EmbKind)kind, NULL,
            (size_t)emb->shape[0], tiled, out->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

static PyObject *py_quantize_f16_rows(PoolObject *self, PyObject *args) {
    PyObject *oemb, *oq, *oscale;
    int impl;
    if (!PyArg_ParseTuple(args, "OOOi", &oemb, &oq, &oscale, &impl) || ready(self) || check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *emb = take(&v, oemb, "embedding", "e", 2, 0), *q = emb ? take(&v, oq, "q", "b", 2, 1) : NULL;
    Py_buffer *scale = q ? take(&v, oscale, "row_scale", "f", 1, 1) : NULL;
    if (!scale || check_dim("q", 0, q->shape[0], emb->shape[0]) || check_dim("q", 1, q->shape[1], emb->shape[1]) ||
        check_dim("row_scale", 0, scale->shape[0], emb->shape[0])) {
        release_views(&v);
        return NULL;
    }
    if (emb->shape[1] < 1 || emb->shape[1] > 65536) { /* a row is widened on the stack */
        release_views(&v);
        return PyErr_Format(PyExc_ValueError, "embedding width %zd is not 1..65536", emb->shape[1]);
    }
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    quantize_f16_rows(&self->pool, (KernelImpl)impl, emb->buf, (size_t)emb->shape[0], (size_t)emb->shape[1],
                      q->buf, scale->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

/* n_heads query heads share n_kv_heads KV heads evenly (both at least 1) */
static int check_groups(Py_ssize_t n_heads, Py_ssize_t n_kv_heads) {
    if (n_kv_heads >= 1 && n_heads >= 1 && n_heads % n_kv_heads == 0) return 0;
    PyErr_Format(PyExc_ValueError, "%zd query heads do not group over %zd KV heads", n_heads, n_kv_heads);
    return -1;
}

static int check_attention(const Py_buffer *q, const Py_buffer *k, const Py_buffer *vv, const Py_buffer *out,
                           Py_ssize_t start_pos) {
    if (start_pos > k->shape[0]) { /* and start_pos + T cannot overflow below */
        PyErr_Format(PyExc_ValueError, "start_pos %zd is past the cache's %zd positions", start_pos, k->shape[0]);
        return -1;
    }
    if (check_dim("k_cache", 0, k->shape[0], start_pos + q->shape[0]) ||
        check_dim("k_cache", 2, k->shape[2], q->shape[2]) || check_dim("v_cache", 0, vv->shape[0], k->shape[0]) ||
        check_dim("v_cache", 1, vv->shape[1], k->shape[1]) || check_dim("v_cache", 2, vv->shape[2], k->shape[2]) ||
        check_dim("out", 0, out->shape[0], q->shape[0]) || check_dim("out", 1, out->shape[1], q->shape[1]) ||
        check_dim("out", 2, out->shape[2], q->shape[2]))
        return -1;
    if (format_code(k) != format_code(vv)) {
        PyErr_SetString(PyExc_TypeError, "k_cache and v_cache must have the same dtype");
        return -1;
    }
    return check_groups(q->shape[1], k->shape[1]);
}

/* 1 when the new rows k_new/v_new are given, 0 when neither is, -1 (an error) for one alone */
static int storing(PyObject *k_new, PyObject *v_new) {
    int store = k_new != Py_None;
    if (store == (v_new != Py_None)) return store;
    PyErr_SetString(PyExc_ValueError, "k_new and v_new go together");
    return -1;
}

/* k and v of one attention: both laid out alike (the kernels take one pair of strides) */
static int same_strides(const size_t k[2], const size_t v[2]) {
    if (k[0] == v[0] && k[1] == v[1]) return 0;
    PyErr_SetString(PyExc_ValueError, "k_cache and v_cache must have the same strides");
    return -1;
}

/* A cache's buffer as cache_strides (bindings.h) checks it: strided, typed, writable when stored into */
static int get_cache_buffer(PyObject *obj, Py_buffer *b, int writable) {
    return PyObject_GetBuffer(obj, b, PyBUF_STRIDES | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0));
}

static Py_buffer *take_cache(Views *v, PyObject *obj, const char *name, int writable, size_t strides[2]) {
    Py_buffer *b = &v->views[v->n];
    if (get_cache_buffer(obj, b, writable) < 0) return NULL;
    v->n++;
    return cache_strides(b, name, 3, strides) ? NULL : b;
}

/* k_new/v_new: f32 [n, KVH, D] with the cache's KVH and D, the rows to store; the buffer, or
 * NULL with an error. */
static Py_buffer *take_new_rows(Views *v, PyObject *obj, const char *name, const Py_buffer *cache, Py_ssize_t n) {
    Py_buffer *b = take(v, obj, name, "f", 3, 0);
    if (b && (check_dim(name, 0, b->shape[0], n) || check_dim(name, 1, b->shape[1], cache->shape[1]) ||
              check_dim(name, 2, b->shape[2], cache->shape[2])))
        return NULL;
    return b;
}

static PyObject *py_attention(PoolObject *self, PyObject *args) {
    PyObject *oq, *ok, *ov, *oout, *okn = Py_None, *ovn = Py_None;
    Py_ssize_t start_pos;
    int impl, err = 0;
    if (!PyArg_ParseTuple(args, "OOOnOi|OO", &oq, &ok, &ov, &start_pos, &oout, &impl, &okn, &ovn) || ready(self) ||
        check_impl(impl))
        return NULL;
    int store = storing(okn, ovn);
    if (store < 0) return NULL;
    Views v = {.n = 0};
    size_t ks[2], vs[2];
    Py_buffer *q = take(&v, oq, "q", "f", 3, 0), *k = q ? take_cache(&v, ok, "k_cache", store, ks) : NULL;
    Py_buffer *vv = k ? take_cache(&v, ov, "v_cache", store, vs) : NULL;
    Py_buffer *out = vv ? take(&v, oout, "out", "f", 3, 1) : NULL;
    if (!out || start_pos < 0 || check_attention(q, k, vv, out, start_pos) || same_strides(ks, vs)) {
        if (out && start_pos < 0) PyErr_SetString(PyExc_ValueError, "start_pos must be >= 0");
        release_views(&v);
        return NULL;
    }
    Py_buffer *kn = NULL, *vn = NULL;
    if (store && (!(kn = take_new_rows(&v, okn, "k_new", k, q->shape[0])) ||
                  !(vn = take_new_rows(&v, ovn, "v_new", k, q->shape[0])))) {
        release_views(&v);
        return NULL;
    }
    AttentionArgs a = {.q = q->buf, .k = k->buf, .v = vv->buf, .kv_f16 = format_code(k) == 'e',
                       .n_tokens = (size_t)q->shape[0], .n_heads = (size_t)q->shape[1],
                       .n_kv_heads = (size_t)k->shape[1], .head_dim = (size_t)q->shape[2],
                       .start_pos = (size_t)start_pos, .out = out->buf, .pos_stride = ks[0], .head_stride = ks[1]};
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    if (store) { /* the new tokens' keys and values first: they attend to themselves */
        store_new_rows((KernelImpl)impl, k->buf, &a, kn->buf, a.start_pos, a.n_tokens);
        store_new_rows((KernelImpl)impl, vv->buf, &a, vn->buf, a.start_pos, a.n_tokens);
    }
    err = pool_reserve_scores(&self->pool, ATTENTION_GROUP * (a.start_pos + a.n_tokens));
    if (!err) attention(&self->pool, (KernelImpl)impl, &a);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS if (err) return no_memory(&v);
    release_views(&v);
    Py_RETURN_NONE;
}

/* The K/V caches of attention_decode: buffers[2i], buffers[2i+1] = ks[i], vs[i] ([S_i, KVH, D],
 * one dtype), checked against q [B, H, D]; fills items (but q/out). 0, or -1 with an error. */
static int take_decode_caches(PyObject *ks, PyObject *vs, const Py_buffer *q, Py_buffer *buffers,
                              Py_ssize_t *n_taken, AttentionArgs *items, int writable) {
    Py_ssize_t b = q->shape[0];
    for (Py_ssize_t i = 0; i < b; i++) {
        Py_buffer *k = &buffers[2 * i], *v = &buffers[2 * i + 1];
        if (get_cache_buffer(PyTuple_GET_ITEM(ks, i), k, writable) < 0) return -1;
        (*n_taken)++;
        if (get_cache_buffer(PyTuple_GET_ITEM(vs, i), v, writable) < 0) return -1;
        (*n_taken)++;
        char code = format_code(k);
        size_t ks[2], vs[2];
        if (cache_strides(k, "k_cache", 3, ks) || cache_strides(v, "v_cache", 3, vs)) return -1;
        if (format_code(v) != code) {
            PyErr_SetString(PyExc_TypeError, "k/v caches: 3-D float32 or float16 arrays, one dtype");
            return -1;
        }
        if (same_strides(ks, vs)) return -1;
        if (k->shape[0] < 1 || check_dim("v_cache", 0, v->shape[0], k->shape[0]) ||
            check_dim("k_cache", 1, k->shape[1], buffers[0].shape[1]) ||
            check_dim("v_cache", 1, v->shape[1], k->shape[1]) || check_dim("k_cache", 2, k->shape[2], q->shape[2]) ||
            check_dim("v_cache", 2, v->shape[2], q->shape[2])) {
            if (!PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "k_cache: no positions");
            return -1;
        }
        if (check_groups(q->shape[1], k->shape[1])) return -1;
        items[i] = (AttentionArgs){.k = k->buf, .v = v->buf, .kv_f16 = code == 'e', .n_tokens = 1,
                                   .n_heads = (size_t)q->shape[1], .n_kv_heads = (size_t)k->shape[1],
                                   .head_dim = (size_t)q->shape[2], .start_pos = (size_t)(k->shape[0] - 1),
                                   .pos_stride = ks[0], .head_stride = ks[1]};
    }
    return 0;
}

static PyObject *py_attention_decode(PoolObject *self, PyObject *args) {
    PyObject *oq, *ks, *vs, *oout, *okn = Py_None, *ovn = Py_None;
    int impl, err = 0;
    if (!PyArg_ParseTuple(args, "OO!O!Oi|OO", &oq, &PyTuple_Type, &ks, &PyTuple_Type, &vs, &oout, &impl, &okn,
                          &ovn) ||
        ready(self) || check_impl(impl))
        return NULL;
    int store = storing(okn, ovn);
    if (store < 0) return NULL;
    Views v = {.n = 0};
    Py_buffer *q = take(&v, oq, "q", "f", 3, 0), *out = q ? take(&v, oout, "out", "f", 3, 1) : NULL;
    if (!out || check_dim("out", 0, out->shape[0], q->shape[0]) || check_dim("out", 1, out->shape[1], q->shape[1]) ||
        check_dim("out", 2, out->shape[2], q->shape[2])) {
        release_views(&v);
        return NULL;
    }
    Py_ssize_t b = q->shape[0], taken = 0;
    if (PyTuple_GET_SIZE(ks) != b || PyTuple_GET_SIZE(vs) != b) {
        release_views(&v);
        return PyErr_Format(PyExc_ValueError, "need one k and one v cache per row of q (%zd)", b);
    }
    Py_buffer *buffers = PyMem_Calloc((size_t)(2 * b + 2), sizeof(Py_buffer));
    AttentionArgs *items = PyMem_Calloc((size_t)b + 1, sizeof(AttentionArgs));
    int ok = buffers && items && !take_decode_caches(ks, vs, q, buffers, &taken, items, store);
    Py_buffer *kn = NULL, *vn = NULL;
    if (ok && store && b > 0)
        ok = (kn = take_new_rows(&v, okn, "k_new", &buffers[0], b)) && (vn = take_new_rows(&v, ovn, "v_new", &buffers[0], b));
    size_t max_s = 0;
    for (Py_ssize_t i = 0; ok && i < b; i++) {
        size_t d = (size_t)q->shape[2], h = (size_t)q->shape[1];
        items[i].q = (const float *)q->buf + (size_t)i * h * d;
        items[i].out = (float *)out->buf + (size_t)i * h * d;
        max_s = items[i].start_pos + 1 > max_s ? items[i].start_pos + 1 : max_s;
    }
    if (ok) {
        Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
        for (Py_ssize_t i = 0; kn && i < b; i++) { /* each new token's key and value at its position */
            const AttentionArgs *it = &items[i];
            size_t row = it->n_kv_heads * it->head_dim;
            store_new_rows((KernelImpl)impl, buffers[2 * i].buf, it, (const float *)kn->buf + i * row, it->start_pos, 1);
            store_new_rows((KernelImpl)impl, buffers[2 * i + 1].buf, it, (const float *)vn->buf + i * row, it->start_pos, 1);
        }
        err = pool_reserve_scores(&self->pool, ATTENTION_GROUP * max_s);
        if (!err) attention_decode(&self->pool, (KernelImpl)impl, items, (size_t)b);
        pool_unlock(&self->pool);
        Py_END_ALLOW_THREADS
    }
    for (Py_ssize_t i = 0; i < taken; i++) PyBuffer_Release(&buffers[i]);
    PyMem_Free(buffers);
    PyMem_Free(items);
    if (ok && err) return no_memory(&v);
    if (!ok && !PyErr_Occurred()) PyErr_NoMemory();
    release_views(&v);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

static PyObject *py_read_memory(PoolObject *self, PyObject *args) {
    PyObject *obuf;
    int impl;
    if (!PyArg_ParseTuple(args, "Oi", &obuf, &impl) || ready(self) || check_impl(impl)) return NULL;
    Views v = {.n = 0};
    Py_buffer *b = take(&v, obuf, "buffer", "Bb", -1, 0);
    if (!b) {
        release_views(&v);
        return NULL;
    }
    uint64_t checksum;
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    checksum = read_memory(&self->pool, (KernelImpl)impl, b->buf, (size_t)b->len);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    return PyLong_FromUnsignedLongLong(checksum);
}

static PyObject *py_rmsnorm(PoolObject *self, PyObject *args) {
    PyObject *ox, *ow, *oout;
    double eps;
    int impl;
    if (!PyArg_ParseTuple(args, "OOdOi", &ox, &ow, &eps, &oout, &impl) || ready(self) || check_impl(impl))
        return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 2, 0), *w = x ? take(&v, ow, "weight", "f", 1, 0) : NULL;
    Py_buffer *out = w ? take(&v, oout, "out", "f", 2, 1) : NULL;
    if (!out || check_dim("weight", 0, w->shape[0], x->shape[1]) || check_dim("out", 0, out->shape[0], x->shape[0]) ||
        check_dim("out", 1, out->shape[1], x->shape[1])) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    rmsnorm_rows(&self->pool, (KernelImpl)impl, x->buf, (size_t)x->shape[0], (size_t)x->shape[1], w->buf, eps, out->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

typedef void (*GateFn)(Pool *, KernelImpl, const float *, const float *, size_t, size_t, float *);

/* gate(gate, up, out, impl): an elementwise gate of two [T, n] float32 arrays */
static PyObject *gate_op(PoolObject *self, PyObject *args, GateFn fn) {
    PyObject *og, *ou, *oout;
    int impl;
    if (!PyArg_ParseTuple(args, "OOOi", &og, &ou, &oout, &impl) || ready(self) || check_impl(impl)) return NULL;
    Views v = {.n = 0};
    Py_buffer *g = take(&v, og, "gate", "f", 2, 0), *u = g ? take(&v, ou, "up", "f", 2, 0) : NULL;
    Py_buffer *out = u ? take(&v, oout, "out", "f", 2, 1) : NULL;
    if (!out || check_dim("up", 0, u->shape[0], g->shape[0]) || check_dim("up", 1, u->shape[1], g->shape[1]) ||
        check_dim("out", 0, out->shape[0], g->shape[0]) || check_dim("out", 1, out->shape[1], g->shape[1])) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS pool_lock(&self->pool);
    fn(&self->pool, (KernelImpl)impl, g->buf, u->buf, (size_t)g->shape[0], (size_t)g->shape[1], out->buf);
    pool_unlock(&self->pool);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

static PyObject *py_relu2_mul(PoolObject *self, PyObject *args) { return gate_op(self, args, relu2_mul); }

static PyObject *py_silu_mul(PoolObject *self, PyObject *args) { return gate_op(self, args, silu_mul); }

static PyObject *py_rope(PoolObject *self, PyObject *args) {
    PyObject *ox, *oc, *os, *oout;
    if (!PyArg_ParseTuple(args, "OOOO", &ox, &oc, &os, &oout) || ready(self)) return NULL;
    Views v = {.n = 0};
    Py_buffer *x = take(&v, ox, "x", "f", 3, 0), *c = x ? take(&v, oc, "cos", "f", 2, 0) : NULL;
    Py_buffer *s = c ? take(&v, os, "sin", "f", 2, 0) : NULL;
    Py_buffer *out = s ? take(&v, oout, "out", "f", 3, 1) : NULL;
    if (!out || x->shape[2] % 2 || check_dim("cos", 0, c->shape[0], x->shape[0]) ||
        check_dim("cos", 1, c->shape[1], x->shape[2] / 2) || check_dim("sin", 0, s->shape[0], x->shape[0]) ||
        check_dim("sin", 1, s->shape[1], x->shape[2] / 2) || check_dim("out", 0, out->shape[0], x->shape[0]) ||
        check_dim("out", 1, out->shape[1], x->shape[1]) || check_dim("out", 2, out->shape[2], x->shape[2])) {
        if (out && !PyErr_Occurred()) PyErr_SetString(PyExc_ValueError, "x: head_dim must be even");
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS rope_rows(x->buf, (size_t)x->shape[0], (size_t)x->shape[1], (size_t)x->shape[2], c->buf,
                                     s->buf, out->buf);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

static PyObject *py_threads(PoolObject *self, void *closure) {
    (void)closure;
    return PyLong_FromLong(self->ready ? self->pool.n_threads : 0);
}

static PyMethodDef pool_methods[] = {
    {"quantize", (PyCFunction)py_quantize, METH_VARARGS, "quantize(x, q, scale, sum, impl)"},
    {"ternary_int", (PyCFunction)py_ternary_int, METH_VARARGS, "ternary_int(q, sum, raw, tiled, n_out, acc, impl)"},
    {"bitlinear", (PyCFunction)py_bitlinear, METH_VARARGS, "bitlinear(x, raw, tiled, n_out, w_scale, out, impl)"},
    {"bitlinear_blocked", (PyCFunction)py_bitlinear_blocked, METH_VARARGS,
     "bitlinear_blocked(x, codes, scales, n_out, gps, block32, out_scale, out, impl)"},
    {"bitlinear_many", (PyCFunction)py_bitlinear_many, METH_VARARGS,
     "bitlinear_many(x, raws, tiled, n_outs, w_scales, outs, impl): I2_S weights of one input in one task"},
    {"bitlinear_blocked_many", (PyCFunction)py_bitlinear_blocked_many, METH_VARARGS,
     "bitlinear_blocked_many(x, codes, scales, n_outs, gps, block32, out_scales, outs, impl)"},
    {"head", (PyCFunction)py_head, METH_VARARGS,
     "head(x, embedding, row_scale|None, out, impl, tiled=False): tiled, see lm_head"},
    {"head_packed", (PyCFunction)py_head_packed, METH_VARARGS,
     "head_packed(x, rows, kind, out, impl, tiled=False): BF16 (3, may be tiled) or int8 rows with f32 "
     "block scales (4: 16, 5: 32)"},
    {"quantize_f16_rows", (PyCFunction)py_quantize_f16_rows, METH_VARARGS,
     "quantize_f16_rows(embedding, q, row_scale, impl)"},
    {"attention", (PyCFunction)py_attention, METH_VARARGS, "attention(q, k_cache, v_cache, start_pos, out, impl[, k_new, v_new]): k_new/v_new stored first"},
    {"attention_decode", (PyCFunction)py_attention_decode, METH_VARARGS,
     "attention_decode(q, k_caches, v_caches, out, impl[, k_new, v_new]): one new token per sequence"},
    {"read_memory", (PyCFunction)py_read_memory, METH_VARARGS, "read_memory(buffer, impl) -> checksum"},
    {"decode_token", (PyCFunction)py_decode_token, METH_VARARGS,
     "decode_token(table, shape, eps, residual_scale, x, k_cache, v_cache, pos, cos, sin, impl): every block"},
    {"rmsnorm", (PyCFunction)py_rmsnorm, METH_VARARGS, "rmsnorm(x, weight, eps, out, impl)"},
    {"relu2_mul", (PyCFunction)py_relu2_mul, METH_VARARGS, "relu2_mul(gate, up, out, impl)"},
    {"silu_mul", (PyCFunction)py_silu_mul, METH_VARARGS, "silu_mul(gate, up, out, impl): SwiGLU"},
    {"rope", (PyCFunction)py_rope, METH_VARARGS, "rope(x, cos, sin, out): NEOX RoPE"},
    {NULL, NULL, 0, NULL}};

static PyGetSetDef pool_getset[] = {{"threads", (getter)py_threads, NULL, "threads (caller included)", NULL},
                                    {NULL, NULL, NULL, NULL, NULL}};

static PyTypeObject PoolType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "bitserve.kernels._native.Pool",
    .tp_basicsize = sizeof(PoolObject),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "Pool(threads): the kernel thread pool; every kernel is a method.",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)pool_object_init,
    .tp_dealloc = (destructor)pool_object_dealloc,
    .tp_methods = pool_methods,
    .tp_getset = pool_getset,
};

/* ---------------------------------------------------------------- module ---- */

static PyObject *py_cpu_has_avx2(PyObject *mod, PyObject *unused) {
    (void)mod;
    (void)unused;
    return PyBool_FromLong(cpu_has_avx2());
}

static PyObject *py_cpu_has_avx512(PyObject *mod, PyObject *unused) {
    (void)mod;
    (void)unused;
    return PyBool_FromLong(cpu_has_avx512());
}

static PyMethodDef module_methods[] = {
    {"repack_blocked", py_repack_blocked, METH_VARARGS,
     "repack_blocked(src, type, q2_block, rows, cols, row_order|None, codes, scales): into the blocked layout"},
    {"ternary_scan", py_ternary_scan, METH_VARARGS,
     "ternary_scan(src, type, rows, cols) -> (one_scale, f16 bits): TQ1_0/TQ2_0 with one scale?"},
    {"repack_int8_rows", py_repack_int8_rows, METH_VARARGS,
     "repack_int8_rows(src, type, rows, cols, out): Q8_0/Q6_K as int8 rows with f32 block scales"},
    {"tile_rows", py_tile_rows, METH_VARARGS, "tile_rows(src, out): uint8 rows into the tiled layout (native.h)"},
    {"repack_tq_i2s", py_repack_tq_i2s, METH_VARARGS,
     "repack_tq_i2s(src, type, rows, cols, row_order|None, out): one-scale TQ1_0/TQ2_0 as I2_S codes"},
    {"cpu_has_avx2", py_cpu_has_avx2, METH_NOARGS, "True when the AVX2/FMA/F16C path can run here."},
    {"cpu_has_avx512", py_cpu_has_avx512, METH_NOARGS, "True when the AVX-512 VNNI path can run here."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef native_module = {PyModuleDef_HEAD_INIT, "_native",
                                           "bitserve native kernels (see csrc/native.h).", -1,
                                           module_methods, NULL, NULL, NULL, NULL};

/* The arrays numpy allocates around the kernels for a prompt (0.1-15 MB: activations,
 * outputs) come from the heap and are reused, instead of each being a fresh mmap whose pages
 * fault in on every call. glibc's own threshold only rises after a large block is freed,
 * which a load may or may not happen to do: a 2B-4T 128-token prompt ran 17-25% slower
 * (RMSNorm 3x, ReLU² 4x) in processes where it had not. Unless the user set these. */
static void keep_arrays_on_the_heap(void) {
#ifdef __GLIBC__
    if (!getenv("MALLOC_MMAP_THRESHOLD_")) mallopt(M_MMAP_THRESHOLD, 32 << 20); /* glibc's maximum */
    if (!getenv("MALLOC_TRIM_THRESHOLD_")) mallopt(M_TRIM_THRESHOLD, 64 << 20);
#endif
}

PyMODINIT_FUNC PyInit__native(void) {
    keep_arrays_on_the_heap();
    if (PyType_Ready(&PoolType) < 0) return NULL;
    PyObject *m = PyModule_Create(&native_module);
    if (!m) return NULL;
    Py_INCREF(&PoolType);
    if (PyModule_AddObject(m, "Pool", (PyObject *)&PoolType) < 0) {
        Py_DECREF(&PoolType);
        Py_DECREF(m);
        return NULL;
    }
    PyModule_AddIntConstant(m, "IMPL_SCALAR", IMPL_SCALAR);
    PyModule_AddIntConstant(m, "IMPL_AVX2", IMPL_AVX2);
    PyModule_AddIntConstant(m, "IMPL_AVX512", IMPL_AVX512);
    return m;
}
