/* Python bindings of the load-time repacking (repack.c), module functions of _native: each
 * checks its source against the tensor's shape and type and its outputs' shapes, then
 * repacks without the GIL. */
#include "bindings.h"

static int repack_type(int type, Py_ssize_t q2_block) {
    if (type == REPACK_TQ1_0 || type == REPACK_TQ2_0 || (type == REPACK_Q2_0 && (q2_block == 64 || q2_block == 128)))
        return 0;
    PyErr_Format(PyExc_ValueError, "cannot repack type %d (q2_block %zd)", type, q2_block);
    return -1;
}

/* -1 with ValueError set unless src holds rows × (cols / per) blocks of bb bytes */
static int check_source_size(const Py_buffer *src, Py_ssize_t rows, Py_ssize_t cols, Py_ssize_t per, Py_ssize_t bb) {
    Py_ssize_t need = size_product(rows, cols / per, bb);
    if (need < 0)
        PyErr_Format(PyExc_ValueError, "[%zd, %zd]: more bytes than an array can hold", rows, cols);
    else if (src->len < need)
        PyErr_Format(PyExc_ValueError, "src: %zd bytes, [%zd, %zd] needs %zd", src->len, rows, cols, need);
    return need < 0 || src->len < need ? -1 : 0;
}

/* the source of rows × cols weights of `type`, and the row order (None, or int64 [rows]
 * holding a permutation's entries, each checked to be a row) */
static Py_buffer *take_source(Views *v, PyObject *osrc, PyObject *oorder, int type, Py_ssize_t q2_block,
                              Py_ssize_t rows, Py_ssize_t cols, const int64_t **order) {
    Py_ssize_t per = type == REPACK_Q2_0 ? q2_block : 256, bb = type == REPACK_TQ2_0 ? 66 : type == REPACK_TQ1_0 ? 54 : 2 + q2_block / 4;
    if (rows < 1 || cols < per || cols % per) {
        PyErr_Format(PyExc_ValueError, "[%zd, %zd]: rows must be whole blocks of %zd", rows, cols, per);
        return NULL;
    }
    Py_buffer *src = take(v, osrc, "src", "Bb", -1, 0);
    if (!src) return NULL;
    if (check_source_size(src, rows, cols, per, bb)) return NULL;
    *order = NULL;
    if (oorder == Py_None) return src;
    Py_buffer *ob = take(v, oorder, "row_order", "lq", 1, 0);
    if (!ob || check_dim("row_order", 0, ob->shape[0], rows)) return NULL;
    const int64_t *o = ob->buf;
    for (Py_ssize_t r = 0; r < rows; r++)
        if (o[r] < 0 || o[r] >= rows) {
            PyErr_Format(PyExc_ValueError, "row_order[%zd] = %lld is not a row", r, (long long)o[r]);
            return NULL;
        }
    *order = o;
    return src;
}

PyObject *py_repack_blocked(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *osrc, *oorder, *ocodes, *oscales;
    int type;
    Py_ssize_t q2_block, rows, cols;
    if (!PyArg_ParseTuple(args, "OinnnOOO", &osrc, &type, &q2_block, &rows, &cols, &oorder, &ocodes, &oscales) ||
        repack_type(type, q2_block))
        return NULL;
    Views v = {.n = 0};
    const int64_t *order;
    Py_buffer *src = take_source(&v, osrc, oorder, type, q2_block, rows, cols, &order);
    Py_buffer *codes = src ? take(&v, ocodes, "codes", "B", 2, 1) : NULL;
    Py_buffer *scales = codes ? take(&v, oscales, "scales", "e", 2, 1) : NULL;
    Py_ssize_t n_super = (cols + 255) / 256, gps = type == REPACK_Q2_0 ? 256 / q2_block : 1;
    if (!scales || check_dim("codes", 0, codes->shape[0], rows) || check_dim("codes", 1, codes->shape[1], 64 * n_super) ||
        check_dim("scales", 0, scales->shape[0], rows) || check_dim("scales", 1, scales->shape[1], gps * n_super)) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS repack_blocked(type, src->buf, (size_t)q2_block, (size_t)rows, (size_t)cols, order,
                                          codes->buf, scales->buf);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

PyObject *py_ternary_scan(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *osrc;
    int type;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "Oinn", &osrc, &type, &rows, &cols)) return NULL;
    if (type != REPACK_TQ1_0 && type != REPACK_TQ2_0) return PyErr_Format(PyExc_ValueError, "ternary_scan takes TQ1_0/TQ2_0, not %d", type);
    Views v = {.n = 0};
    const int64_t *order;
    Py_buffer *src = take_source(&v, osrc, Py_None, type, 0, rows, cols, &order);
    if (!src) {
        release_views(&v);
        return NULL;
    }
    uint16_t scale = 0;
    int one = 0;
    Py_BEGIN_ALLOW_THREADS one = ternary_scan(type, src->buf, (size_t)rows, (size_t)cols, &scale);
    Py_END_ALLOW_THREADS release_views(&v);
    return Py_BuildValue("(Oi)", one ? Py_True : Py_False, (int)scale);
}

PyObject *py_repack_tq_i2s(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *osrc, *oorder, *oout;
    int type;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "OinnOO", &osrc, &type, &rows, &cols, &oorder, &oout)) return NULL;
    if (type != REPACK_TQ1_0 && type != REPACK_TQ2_0) return PyErr_Format(PyExc_ValueError, "repack_tq_i2s takes TQ1_0/TQ2_0, not %d", type);
    Views v = {.n = 0};
    const int64_t *order;
    Py_buffer *src = take_source(&v, osrc, oorder, type, 0, rows, cols, &order);
    Py_buffer *out = src ? take(&v, oout, "out", "B", 1, 1) : NULL;
    if (!out || check_dim("out", 0, out->shape[0], rows * (cols / 4))) { /* fits: src holds 54 or 66 bytes per 64 of it */
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS repack_tq_i2s(type, src->buf, (size_t)rows, (size_t)cols, order, out->buf);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

PyObject *py_repack_int8_rows(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *osrc, *oout;
    int type;
    Py_ssize_t rows, cols;
    if (!PyArg_ParseTuple(args, "OinnO", &osrc, &type, &rows, &cols, &oout)) return NULL;
    if (type != REPACK_Q8_0 && type != REPACK_Q6_K) return PyErr_Format(PyExc_ValueError, "repack_int8_rows takes Q8_0/Q6_K, not %d", type);
    Py_ssize_t per = type == REPACK_Q8_0 ? 32 : 256, bb = type == REPACK_Q8_0 ? 34 : 210, block = type == REPACK_Q8_0 ? 32 : 16;
    if (rows < 1 || cols < per || cols % per) return PyErr_Format(PyExc_ValueError, "[%zd, %zd]: rows must be whole blocks of %zd", rows, cols, per);
    Views v = {.n = 0};
    Py_buffer *src = take(&v, osrc, "src", "Bb", -1, 0), *out = src ? take(&v, oout, "out", "B", 2, 1) : NULL;
    if (!out || check_dim("out", 0, out->shape[0], rows) || check_dim("out", 1, out->shape[1], cols + cols / block * 4)) {
        release_views(&v);
        return NULL;
    }
    if (check_source_size(src, rows, cols, per, bb)) {
        release_views(&v);
        return NULL;
    }
    Py_BEGIN_ALLOW_THREADS repack_int8_rows(type, src->buf, (size_t)rows, (size_t)cols, out->buf);
    Py_END_ALLOW_THREADS release_views(&v);
    Py_RETURN_NONE;
}

/* tile_rows(src, out): uint8 [n, row_bytes] arrays, row_bytes whole 64-byte lines; out is
 * src (in place) or apart from it */
PyObject *py_tile_rows(PyObject *mod, PyObject *args) {
    (void)mod;
    PyObject *osrc, *oout;
    if (!PyArg_ParseTuple(args, "OO", &osrc, &oout)) return NULL;
    Views v = {.n = 0};
    Py_buffer *src = take(&v, osrc, "src", "B", 2, 0), *out = src ? take(&v, oout, "out", "B", 2, 1) : NULL;
    if (!out || check_dim("out", 0, out->shape[0], src->shape[0]) || check_dim("out", 1, out->shape[1], src->shape[1])) {
        release_views(&v);
        return NULL;
    }
    const char *a = src->buf, *b = out->buf;
    if (src->shape[1] % 64 || (a != b && a < b + out->len && b < a + src->len)) {
        release_views(&v);
        return PyErr_Format(PyExc_ValueError, "tile_rows: rows of whole 64-byte lines (not %zd bytes), in place "
                            "or into another array", src->shape[1]);
    }
    uint8_t *scratch = PyMem_RawMalloc(TILE_ROWS * (size_t)src->shape[1] + 1);
    if (!scratch) return no_memory(&v);
    Py_BEGIN_ALLOW_THREADS tile_rows(src->buf, (size_t)src->shape[0], (size_t)src->shape[1], out->buf, scratch);
    Py_END_ALLOW_THREADS PyMem_RawFree(scratch);
    release_views(&v);
    Py_RETURN_NONE;
}
