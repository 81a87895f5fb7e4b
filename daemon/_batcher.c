/* daemon._batcher: the worker's per-record path, compiled. Serves daemon.accumulator (and
 * daemon.drain, which checks a region's bodies with first_bad_body before appending it).
 *
 * A worker copies a region of a client's request ring into private memory (bytes) and hands it
 * here. append_region() walks its RECORD frames, validates each (frame header, topic id,
 * partition, flags, record body) and appends it as a Kafka RecordBatch v2 record (length,
 * attributes, timestamp delta, offset delta, body) to its partition's open batch in the arena.
 * Python keeps everything per batch: opening and closing batches, sealing, the runs tables.
 *
 * State shared with Python, all in buffers the caller owns:
 *
 *   topics  int32[2 * ntopics]: per topic id (base index, partition count); base -1 = topic id
 *           not registered. Partition p of topic t lives at row base + p of `state`.
 *   state   int64[STATE_WIDTH * rows]: per (topic, partition) row, the open batch:
 *             S_OPEN      1 while a batch is open for the row, else 0
 *             S_WRITE_AT  arena offset of the next record byte
 *             S_ROOM      record bytes the batch may still take (may go negative: Python
 *                         reserves runs-table space after a call; then the batch is full)
 *             S_COUNT     records in the batch (the next offset delta)
 *             S_BASE_TS   the batch's first timestamp
 *             S_DMAX      largest timestamp delta so far (>= 0)
 *             S_TOUCHED   1 once this call sequence appended to the row (see `touched`)
 *             S_N0, S_P0  S_COUNT and the frame's offset in `data` when first touched
 *   touched int32[rows]: rows first touched, in order; Python settles their runs tables.
 *
 * Safety: the region is the caller's private copy, so a client rewriting its ring cannot change
 * what was validated; every read is bounds-checked against the region's length, every write
 * against the arena's. A malformed frame is a return code, never a crash.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>

#include <stdint.h>
#include <string.h>

#include "../shm/_layout.h"
#include "../shm/_record.h"

enum {
    S_OPEN,
    S_WRITE_AT,
    S_ROOM,
    S_COUNT,
    S_BASE_TS,
    S_DMAX,
    S_TOUCHED,
    S_N0,
    S_P0,
    STATE_WIDTH
};

/* Return codes of append_region / append_record (Python decides what each means). */
enum {
    RC_OK = 0,         /* every frame up to end consumed (a padding frame consumes the rest) */
    RC_NEED_BATCH = 1, /* the record at pos needs Python: no open batch, or it does not fit */
    RC_INVALID = 2,    /* bad frame header: type, length, topic id, partition or flags */
    RC_BAD_BODY = 3,   /* a RECORD whose body is not exactly one well-formed record body */
    RC_BAD_PADDING = 4,/* a padding frame that does not end at the wrap */
    RC_PARTIAL = 5,    /* the frame at pos runs past end: corrupt if end was the committed end */
    RC_ARENA = 6       /* a write would leave the arena: the state table is wrong (a bug) */
};

typedef struct {
    Py_buffer b;
    int held;
} buf_t;

static void release(buf_t *x) {
    if (x->held) {
        PyBuffer_Release(&x->b);
        x->held = 0;
    }
}

static int get_buf(PyObject *obj, buf_t *x, int writable, Py_ssize_t itemsize, const char *what) {
    if (PyObject_GetBuffer(obj, &x->b, writable ? PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS : PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    x->held = 1;
    if (itemsize > 1 && (x->b.len % itemsize) != 0) {
        PyErr_Format(PyExc_ValueError, "%s: length %zd is not a multiple of %zd", what, x->b.len, itemsize);
        release(x);
        return -1;
    }
    return 0;
}

/* Append one record (body p[bpos..bend)) to row `row`. RC_OK or RC_NEED_BATCH or RC_ARENA. */
static inline int append_one(int64_t *st, unsigned char *arena, Py_ssize_t arena_len, int64_t ts,
                             const unsigned char *body, size_t blen) {
    int64_t d = ts - st[S_BASE_TS];
    int64_t n = st[S_COUNT];
    /* length covers attributes (1) + varint(delta) + varint(offset delta) + body */
    int64_t len = 1 + sl_varint_len(d) + sl_varint_len(n) + (int64_t)blen;
    int64_t total = sl_varint_len(len) + len;
    if (total > st[S_ROOM] || n >= INT32_MAX)
        return RC_NEED_BATCH;
    int64_t at = st[S_WRITE_AT];
    if (at < 0 || total > (int64_t)arena_len - at)
        return RC_ARENA;
    unsigned char *out = arena + at;
    out += sl_put_varint(out, len);
    *out++ = 0; /* attributes: none per record */
    out += sl_put_varint(out, d);
    out += sl_put_varint(out, n);
    memcpy(out, body, blen);
    st[S_WRITE_AT] = at + total;
    st[S_ROOM] -= total;
    st[S_COUNT] = n + 1;
    if (d > st[S_DMAX])
        st[S_DMAX] = d;
    return RC_OK;
}

PyDoc_STRVAR(append_region_doc,
"append_region(data, start, end, wraps, arena, topics, state, touched, ntouched)\n"
"-> (code, pos, records, ntouched)\n\n"
"Validate and append the RECORD frames of data[start:end] (data: the worker's private copy of\n"
"a ring region; start a frame start) to their partitions' open batches. Stops at the first\n"
"frame it cannot take and returns its code and position (see the module's RC_* constants);\n"
"`records` is how many records this call appended. `wraps`: end is the end of the ring's data\n"
"area, so a padding frame may end there.");

static PyObject *append_region(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_data, *o_arena, *o_topics, *o_state, *o_touched;
    Py_ssize_t start, end, ntouched;
    int wraps;
    if (!PyArg_ParseTuple(args, "OnnpOOOOn:append_region", &o_data, &start, &end, &wraps, &o_arena, &o_topics,
                          &o_state, &o_touched, &ntouched))
        return NULL;
    buf_t data = {0}, arena = {0}, topics = {0}, state = {0}, touched = {0};
    PyObject *result = NULL;
    if (get_buf(o_data, &data, 0, 1, "data") < 0 || get_buf(o_arena, &arena, 1, 1, "arena") < 0 ||
        get_buf(o_topics, &topics, 0, 8, "topics") < 0 || get_buf(o_state, &state, 1, 8 * STATE_WIDTH, "state") < 0 ||
        get_buf(o_touched, &touched, 1, 4, "touched") < 0)
        goto done;
    if (start < 0 || end < start || end > data.b.len || (start & 7) != 0) {
        PyErr_SetString(PyExc_ValueError, "region outside the buffer or not 8-byte aligned");
        goto done;
    }
    const unsigned char *p = data.b.buf;
    unsigned char *ar = arena.b.buf;
    const int32_t *tt = topics.b.buf;
    Py_ssize_t ntopics = topics.b.len / 8;
    int64_t *rows = state.b.buf;
    Py_ssize_t nrows = state.b.len / (8 * STATE_WIDTH);
    int32_t *tl = touched.b.buf;
    Py_ssize_t tcap = touched.b.len / 4;
    if (ntouched < 0 || ntouched > tcap) {
        PyErr_SetString(PyExc_ValueError, "ntouched outside the touched buffer");
        goto done;
    }
    int code = RC_OK;
    Py_ssize_t records = 0;
    size_t pos = (size_t)start, stop = (size_t)end;
    while (pos < stop) {
        size_t left = stop - pos;
        if (left < SL_FRAME_HEADER_BYTES) {
            code = RC_INVALID; /* positions are multiples of 8: cannot happen with an aligned end */
            break;
        }
        uint32_t plen = sl_u32(p + pos);
        uint32_t ftype = sl_u32(p + pos + 4);
        uint64_t fsize = sl_frame_size(plen);
        if (fsize > left) {
            code = RC_PARTIAL;
            break;
        }
        if (ftype == SL_FRAME_PADDING) {
            if (!wraps || fsize != left) {
                code = RC_BAD_PADDING;
                break;
            }
            pos = stop;
            break;
        }
        if (ftype != SL_FRAME_RECORD || plen < SL_RECORD_PREFIX_BYTES) {
            code = RC_INVALID;
            break;
        }
        uint16_t tid = sl_u16(p + pos + SL_OFF_TOPIC_ID);
        uint16_t flags = sl_u16(p + pos + SL_OFF_FLAGS);
        int32_t part = sl_i32(p + pos + SL_OFF_PARTITION);
        if (flags != 0 || tid >= ntopics || tt[2 * tid] < 0 || part < 0 || part >= tt[2 * tid + 1]) {
            code = RC_INVALID;
            break;
        }
        int64_t row = (int64_t)tt[2 * tid] + part;
        if (row >= nrows) {
            code = RC_INVALID;
            break;
        }
        size_t bstart = pos + SL_RECORD_FRAME_MIN, bend = pos + SL_FRAME_HEADER_BYTES + plen;
        if (!sl_body_valid(p, bstart, bend)) {
            code = RC_BAD_BODY;
            break;
        }
        int64_t *st = rows + row * STATE_WIDTH;
        if (!st[S_OPEN]) {
            code = RC_NEED_BATCH;
            break;
        }
        int touched_now = !st[S_TOUCHED];
        if (touched_now) {
            if (ntouched >= tcap) {
                code = RC_NEED_BATCH; /* Python settles and starts a fresh list */
                break;
            }
        }
        int64_t n0 = st[S_COUNT];
        int rc = append_one(st, ar, arena.b.len, sl_i64(p + pos + SL_OFF_TIMESTAMP), p + bstart, bend - bstart);
        if (rc != RC_OK) {
            code = rc;
            break;
        }
        if (touched_now) {
            st[S_TOUCHED] = 1;
            st[S_N0] = n0;
            st[S_P0] = (int64_t)pos;
            tl[ntouched++] = (int32_t)row;
        }
        records++;
        pos += (size_t)fsize;
    }
    result = Py_BuildValue("innn", code, (Py_ssize_t)pos, records, ntouched);
done:
    release(&data);
    release(&arena);
    release(&topics);
    release(&state);
    release(&touched);
    return result;
}

PyDoc_STRVAR(append_record_doc,
"append_record(body, timestamp_ms, arena, state, row) -> code\n\n"
"Append one record body (already validated, e.g. by body_valid) to the open batch of `row`:\n"
"RC_OK, RC_NEED_BATCH (no open batch, or it does not fit) or RC_ARENA.");

static PyObject *append_record(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_body, *o_arena, *o_state;
    long long ts;
    Py_ssize_t row;
    if (!PyArg_ParseTuple(args, "OLOOn:append_record", &o_body, &ts, &o_arena, &o_state, &row))
        return NULL;
    buf_t body = {0}, arena = {0}, state = {0};
    PyObject *result = NULL;
    if (get_buf(o_body, &body, 0, 1, "body") < 0 || get_buf(o_arena, &arena, 1, 1, "arena") < 0 ||
        get_buf(o_state, &state, 1, 8 * STATE_WIDTH, "state") < 0)
        goto done;
    if (row < 0 || row >= state.b.len / (8 * STATE_WIDTH)) {
        PyErr_SetString(PyExc_IndexError, "row outside the state table");
        goto done;
    }
    int64_t *st = (int64_t *)state.b.buf + row * STATE_WIDTH;
    int code = st[S_OPEN] ? append_one(st, arena.b.buf, arena.b.len, ts, body.b.buf, (size_t)body.b.len) : RC_NEED_BATCH;
    result = PyLong_FromLong(code);
done:
    release(&body);
    release(&arena);
    release(&state);
    return result;
}

PyDoc_STRVAR(record_size_doc,
"record_size(body_len, timestamp_delta, offset_delta) -> int\n\n"
"Bytes the Kafka record of a body of body_len bytes takes in a batch, length varint included.");

static PyObject *record_size(PyObject *self, PyObject *args) {
    (void)self;
    long long blen, d, n;
    if (!PyArg_ParseTuple(args, "LLL:record_size", &blen, &d, &n))
        return NULL;
    if (blen < 0 || blen > INT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "body_len out of range");
        return NULL;
    }
    int64_t len = 1 + sl_varint_len(d) + sl_varint_len(n) + blen;
    return PyLong_FromLongLong(sl_varint_len(len) + len);
}

PyDoc_STRVAR(body_valid_doc,
"body_valid(buf, start, end) -> bool\n\n"
"True when buf[start:end] is exactly one well-formed Kafka record body.");

static PyObject *body_valid(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_buf;
    Py_ssize_t start, end;
    if (!PyArg_ParseTuple(args, "Onn:body_valid", &o_buf, &start, &end))
        return NULL;
    buf_t b = {0};
    if (get_buf(o_buf, &b, 0, 1, "buf") < 0)
        return NULL;
    int ok = start >= 0 && end >= start && end <= b.b.len && sl_body_valid(b.b.buf, (size_t)start, (size_t)end);
    release(&b);
    return PyBool_FromLong(ok);
}

PyDoc_STRVAR(first_bad_body_doc,
"first_bad_body(data, end, wraps) -> int\n\n"
"Offset of the first RECORD frame in data[:end] whose body is malformed, or of a PADDING frame\n"
"that does not end exactly at end when wraps (or at all when not); -1 when there is none.\n"
"Stops (-1) at any other frame type or a frame running past end: the caller judges those\n"
"(corrupt when end is the committed end, whole next time when a budget cut the copy).");

static PyObject *first_bad_body(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *o_data;
    Py_ssize_t end;
    int wraps;
    if (!PyArg_ParseTuple(args, "Onp:first_bad_body", &o_data, &end, &wraps))
        return NULL;
    buf_t data = {0};
    if (get_buf(o_data, &data, 0, 1, "data") < 0)
        return NULL;
    if (end < 0 || end > data.b.len) {
        release(&data);
        PyErr_SetString(PyExc_ValueError, "end outside the buffer");
        return NULL;
    }
    const unsigned char *p = data.b.buf;
    Py_ssize_t found = -1;
    size_t pos = 0, stop = (size_t)end;
    while (pos + SL_RECORD_FRAME_MIN <= stop) {
        uint32_t plen = sl_u32(p + pos);
        uint32_t ftype = sl_u32(p + pos + 4);
        uint64_t be = (uint64_t)pos + SL_FRAME_HEADER_BYTES + plen;
        if (be > stop)
            break; /* past the copy: the caller judges it (corrupt, or cut by a budget) */
        if (ftype != SL_FRAME_RECORD) {
            if (ftype == SL_FRAME_PADDING && !(wraps && be == stop))
                found = (Py_ssize_t)pos;
            break;
        }
        if (!sl_body_valid(p, pos + SL_RECORD_FRAME_MIN, (size_t)be)) {
            found = (Py_ssize_t)pos;
            break;
        }
        pos = (size_t)((be + 7) & ~(uint64_t)7);
    }
    release(&data);
    return PyLong_FromSsize_t(found);
}

static PyMethodDef methods[] = {
    {"append_region", append_region, METH_VARARGS, append_region_doc},
    {"append_record", append_record, METH_VARARGS, append_record_doc},
    {"record_size", record_size, METH_VARARGS, record_size_doc},
    {"body_valid", body_valid, METH_VARARGS, body_valid_doc},
    {"first_bad_body", first_bad_body, METH_VARARGS, first_bad_body_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "daemon._batcher",
    "The worker's per-record path, compiled: validate ring frames and append them as Kafka records "
    "to their partitions' open batches in the arena. Serves daemon.accumulator.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__batcher(void) {
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    struct {
        const char *name;
        long value;
    } consts[] = {
        {"S_OPEN", S_OPEN}, {"S_WRITE_AT", S_WRITE_AT}, {"S_ROOM", S_ROOM}, {"S_COUNT", S_COUNT},
        {"S_BASE_TS", S_BASE_TS}, {"S_DMAX", S_DMAX}, {"S_TOUCHED", S_TOUCHED}, {"S_N0", S_N0},
        {"S_P0", S_P0}, {"STATE_WIDTH", STATE_WIDTH},
        {"RC_OK", RC_OK}, {"RC_NEED_BATCH", RC_NEED_BATCH}, {"RC_INVALID", RC_INVALID},
        {"RC_BAD_BODY", RC_BAD_BODY}, {"RC_BAD_PADDING", RC_BAD_PADDING}, {"RC_PARTIAL", RC_PARTIAL},
        {"RC_ARENA", RC_ARENA},
        /* the layout constants, checked against shm.layout by a test */
        {"FRAME_HEADER_BYTES", SL_FRAME_HEADER_BYTES}, {"FRAME_ALIGN", SL_FRAME_ALIGN},
        {"FRAME_PADDING", SL_FRAME_PADDING}, {"FRAME_RECORD", SL_FRAME_RECORD},
        {"FRAME_COMPLETION", SL_FRAME_COMPLETION}, {"FRAME_CHUNK_DONE", SL_FRAME_CHUNK_DONE},
        {"RECORD_PREFIX_BYTES", SL_RECORD_PREFIX_BYTES}, {"COMPLETION_BYTES", SL_COMPLETION_BYTES},
        {"CHUNK_DONE_BYTES", SL_CHUNK_DONE_BYTES},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
