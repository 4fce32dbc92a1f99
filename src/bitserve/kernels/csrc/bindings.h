/* What the binding files share (module.c, module_matmul.c, module_repack.c): the Pool object,
 * the buffer checks every method makes before a kernel runs, and the methods defined
 * outside module.c. */
#ifndef BITSERVE_BINDINGS_H
#define BITSERVE_BINDINGS_H

#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include "native.h"

#define MAX_VIEWS (3 * POOL_MAX_FUSED + 2)

typedef struct {
    PyObject_HEAD Pool pool;
    int ready;
} PoolObject;

/* ---------------------------------------------------------------- buffer checks ---- */

/* The views a call holds, released together whatever happens. */
typedef struct {
    Py_buffer views[MAX_VIEWS];
    int n;
} Views;

static inline void release_views(Views *v) {
    for (int i = 0; i < v->n; i++) PyBuffer_Release(&v->views[i]);
    v->n = 0;
}

static inline char format_code(const Py_buffer *b) {
    const char *f = b->format ? b->format : "B";
    while (*f == '<' || *f == '=' || *f == '@') f++;
    return f[0] && !f[1] ? f[0] : '?';
}

/* -1 with ValueError set unless b's data starts on a whole item: numpy makes arrays that do
 * not (a view of bytes at an odd offset), and the kernels read items through typed pointers */
static inline int check_aligned(const Py_buffer *b, const char *name, Py_ssize_t itemsize) {
    if ((uintptr_t)b->buf % (uintptr_t)itemsize == 0) return 0;
    PyErr_Format(PyExc_ValueError, "%s: the data is not aligned to its %zd-byte items", name, itemsize);
    return -1;
}

/* A C-contiguous array with one of `codes` as its dtype and `ndim` dimensions (-1: any),
 * aligned to its items. */
static inline Py_buffer *take(Views *v, PyObject *obj, const char *name, const char *codes, int ndim,
                       int writable) {
    Py_buffer *b = &v->views[v->n];
    int flags = PyBUF_C_CONTIGUOUS | PyBUF_FORMAT | (writable ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, b, flags) < 0) return NULL;
    v->n++;
    char code = format_code(b);
    static const struct { char code; Py_ssize_t size; } sizes[] = {
        {'f', 4}, {'e', 2}, {'b', 1}, {'B', 1}, {'i', 4}, {'l', 8}, {'q', 8}};
    Py_ssize_t want = 0;
    for (size_t i = 0; i < sizeof(sizes) / sizeof(sizes[0]); i++)
        if (sizes[i].code == code) want = sizes[i].size;
    if (!strchr(codes, code) || b->itemsize != want) {
        PyErr_Format(PyExc_TypeError, "%s: dtype code '%c' is not one of '%s'", name, code, codes);
        return NULL;
    }
    if (check_aligned(b, name, want)) return NULL;
    if (ndim >= 0 && b->ndim != ndim) {
        PyErr_Format(PyExc_ValueError, "%s: expected %d dimensions, got %d", name, ndim, b->ndim);
        return NULL;
    }
    return b;
}

/* A K or V cache of ndim axes, float32 or float16, aligned, the last (a head's D values) contiguous
 * and the others at any nonnegative strides (a KVCache is head-major in memory): [S, KVH, D]
 * for attention, [n_layers, S, KVH, D] for the decode step. strides[0..ndim-2] in elements,
 * 0 for an axis 1 long (never stepped along). 0, or -1 with an error. */
static inline int cache_strides(const Py_buffer *b, const char *name, int ndim, size_t *strides) {
    char code = format_code(b);
    if ((code != 'f' && code != 'e') || b->itemsize != (code == 'e' ? 2 : 4) || b->ndim != ndim) {
        PyErr_Format(PyExc_TypeError, "%s: a %d-D float32 or float16 array is needed", name, ndim);
        return -1;
    }
    Py_ssize_t elt = b->itemsize;
    if (check_aligned(b, name, elt)) return -1;
    for (int axis = 0; axis < ndim - 1; axis++) {
        Py_ssize_t step = b->shape[axis] > 1 ? b->strides[axis] : 0; /* unused when 1 long */
        if (step < 0 || step % elt) {
            PyErr_Format(PyExc_ValueError, "%s: axis %d has stride %zd bytes", name, axis, step);
            return -1;
        }
        strides[axis] = (size_t)(step / elt);
    }
    if (b->shape[ndim - 1] > 1 && b->strides[ndim - 1] != elt) {
        PyErr_Format(PyExc_ValueError, "%s: each head's values must be contiguous", name);
        return -1;
    }
    return 0;
}

/* a · b · c for sizes a caller gave (nonnegative), or -1 where the product does not fit a
 * Py_ssize_t: a size check must not wrap around to a small number and pass */
static inline Py_ssize_t size_product(Py_ssize_t a, Py_ssize_t b, Py_ssize_t c) {
    Py_ssize_t ab, abc;
    if (__builtin_mul_overflow(a, b, &ab) || __builtin_mul_overflow(ab, c, &abc)) return -1;
    return abc;
}

static inline int check_dim(const char *name, int axis, Py_ssize_t got, Py_ssize_t want) {
    if (got == want) return 0;
    PyErr_Format(PyExc_ValueError, "%s: axis %d is %zd, expected %zd", name, axis, got, want);
    return -1;
}

static inline int check_impl(int impl) {
    if (impl == IMPL_SCALAR || (impl == IMPL_AVX2 && cpu_has_avx2()) ||
        (impl == IMPL_AVX512 && cpu_has_avx512()))
        return 0;
    PyErr_Format(PyExc_ValueError, "kernel impl %d is not available on this CPU", impl);
    return -1;
}

static inline int ready(PoolObject *self) {
    if (self->ready) return 0;
    PyErr_SetString(PyExc_RuntimeError, "Pool is not initialised");
    return -1;
}

static inline PyObject *no_memory(Views *v) {
    release_views(v);
    return PyErr_NoMemory();
}

/* module_matmul.c: activation quantization and the ternary matmuls (Pool methods) */
PyObject *py_quantize(PoolObject *self, PyObject *args);
PyObject *py_ternary_int(PoolObject *self, PyObject *args);
PyObject *py_bitlinear(PoolObject *self, PyObject *args);
PyObject *py_bitlinear_blocked(PoolObject *self, PyObject *args);
PyObject *py_bitlinear_many(PoolObject *self, PyObject *args);
PyObject *py_bitlinear_blocked_many(PoolObject *self, PyObject *args);

/* module_decode.c: one token of one sequence through every block (Pool method) */
PyObject *py_decode_token(PoolObject *self, PyObject *args);

/* module_repack.c: load-time repacking (module functions) */
PyObject *py_repack_blocked(PyObject *mod, PyObject *args);
PyObject *py_ternary_scan(PyObject *mod, PyObject *args);
PyObject *py_tile_rows(PyObject *mod, PyObject *args);
PyObject *py_repack_tq_i2s(PyObject *mod, PyObject *args);
PyObject *py_repack_int8_rows(PyObject *mod, PyObject *args);

#endif
