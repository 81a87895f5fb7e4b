/* shm._client: the client's per-record path, compiled. Serves shm.producer, shm.ring,
 * shm.futures, shm.topic, shm.completions, and daemon.ingest (the packed Produce).
 *
 *   murmur2(key)      Kafka's murmur2 (the Java client's Utils.murmur2), signed 32-bit.
 *   RingWriter        the writer half of an SpscRing (shm/ring.py): claim, publish, rollback.
 *                     shm.ring.SpscRing delegates to it, so Python writers (send_many, the
 *                     worker's completions) and the compiled send() share one state.
 *   FutureBase        the slots of shm.futures.DeliveryFuture (topic, partition, timestamp,
 *                     _outcome, _waiters); the Python subclass adds the methods. send() makes
 *                     one without running Python code.
 *   TopicBase         the per-record slots of shm.topic.TopicState (id, partitions, owners,
 *                     sticky partition, largest body, pending FIFOs).
 *   SendCore          send() and produce(): serializers and their output check, body encode,
 *                     partition (explicit, sticky, murmur2), timestamp, future, ring claim,
 *                     copy, pending bookkeeping, publish, doorbell; send_records() and
 *                     send_packed() for socket ingest (daemon/ingest.py).
 *   scan_produce      whether a Produce frame's msgpack has the plain shape send_packed()
 *                     reads (else msgspec decodes it), in one bounded pass.
 *   settle            one COMPLETION's outcome to a partition's pending FIFO (shm.futures).
 *   read_completions  the completion thread's walk of a completion ring region: every frame
 *                     checked, each COMPLETION settled, the last CHUNK_DONE reported
 *                     (shm.completions).
 *
 * Thread safety: send() runs with the GIL held from the moment it claims ring space until it
 * has published the frame, and runs no Python code in between (no allocation of GC-tracked
 * objects, no callbacks), so it is atomic against every other Python thread of the process;
 * no lock is taken on this path. The only Python writers (send_many's runs, and a record that
 * found its ring full and waits for room, shm/backpressure.py) claim and publish in several
 * bytecodes and hold the producer's send lock meanwhile; send() sees such a claim in progress
 * (pending != published) and hands its record, encoded, to the Python writer's path
 * (Backpressure.enqueue), which takes the lock first. So each ring has one writer at a time.
 *
 * There is no other send path: serializers are called from here and their output checked
 * here, str is encoded here, and errors (too large, a partition out of range, bad types) are
 * raised from here. Python is called only for what is not per record: a topic's first lookup
 * (I/O to the daemon), the sticky partitioner's move (once per batch_size bytes), the
 * exception to raise, and the full-ring policy.
 *
 * Ordering (shm/layout.py, "Ordering"): the frame is written, then the head is published with
 * one aligned 8-byte release store; x86-64 TSO makes the frame visible first.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>

#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <unistd.h>

#include "_layout.h"
#include "_record.h"

/* ------------------------------------------------------------------------------------------
 * murmur2
 */

static int32_t kafka_murmur2(const unsigned char *data, Py_ssize_t length) {
    const uint32_t seed = 0x9747b28cu, m = 0x5bd1e995u;
    const int r = 24;
    uint32_t h = seed ^ (uint32_t)length;
    Py_ssize_t n4 = length / 4;
    for (Py_ssize_t i = 0; i < n4; i++) {
        uint32_t k;
        memcpy(&k, data + 4 * i, 4); /* little-endian, as Java's byte assembly */
        k *= m;
        k ^= k >> r;
        k *= m;
        h *= m;
        h ^= k;
    }
    const unsigned char *tail = data + 4 * n4;
    switch (length & 3) {
    case 3:
        h ^= (uint32_t)tail[2] << 16;
        /* fall through */
    case 2:
        h ^= (uint32_t)tail[1] << 8;
        /* fall through */
    case 1:
        h ^= (uint32_t)tail[0];
        h *= m;
    }
    h ^= h >> 13;
    h *= m;
    h ^= h >> 15;
    return (int32_t)h;
}

static inline int partition_of_key(const unsigned char *key, Py_ssize_t len, int partitions) {
    return (int)(((uint32_t)kafka_murmur2(key, len) & 0x7fffffffu) % (uint32_t)partitions);
}

PyDoc_STRVAR(murmur2_doc, "murmur2(key) -> int\n\nKafka's murmur2 of a bytes-like key (signed 32-bit).");

static PyObject *py_murmur2(PyObject *self, PyObject *arg) {
    (void)self;
    Py_buffer b;
    if (PyObject_GetBuffer(arg, &b, PyBUF_SIMPLE) < 0)
        return NULL;
    int32_t h = kafka_murmur2(b.buf, b.len);
    PyBuffer_Release(&b);
    return PyLong_FromLong(h);
}

PyDoc_STRVAR(partitions_doc,
"partitions(keys, num_partitions) -> list[int]\n\n"
"Kafka's default partition of each key (a sequence of bytes-like keys), in one call.");

static PyObject *py_partitions(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *keys;
    int n;
    if (!PyArg_ParseTuple(args, "Oi:partitions", &keys, &n))
        return NULL;
    if (n <= 0) {
        PyErr_SetString(PyExc_ValueError, "partitions: num_partitions must be positive");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(keys, "partitions: keys must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t count = PySequence_Fast_GET_SIZE(seq);
    PyObject **items = PySequence_Fast_ITEMS(seq);
    PyObject *out = PyList_New(count);
    if (out == NULL) {
        Py_DECREF(seq);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *k = items[i];
        int p;
        if (PyBytes_CheckExact(k)) {
            p = partition_of_key((const unsigned char *)PyBytes_AS_STRING(k), PyBytes_GET_SIZE(k), n);
        } else {
            Py_buffer b;
            if (PyObject_GetBuffer(k, &b, PyBUF_SIMPLE) < 0) {
                Py_DECREF(out);
                Py_DECREF(seq);
                return NULL;
            }
            p = partition_of_key(b.buf, b.len, n);
            PyBuffer_Release(&b);
        }
        PyObject *v = PyLong_FromLong(p);
        if (v == NULL) {
            Py_DECREF(out);
            Py_DECREF(seq);
            return NULL;
        }
        PyList_SET_ITEM(out, i, v);
    }
    Py_DECREF(seq);
    return out;
}

/* ------------------------------------------------------------------------------------------
 * RingWriter
 */

typedef struct {
    PyObject_HEAD
    Py_buffer view;      /* the whole mapping (SpscRing.view), pinned while held */
    int held;
    unsigned char *base; /* view.buf */
    Py_ssize_t data_start;
    uint64_t capacity, mask, max_frame;
    uint64_t *head_word, *tail_word, *full_word;
    volatile unsigned char *flag;
    uint64_t pending, published, tail_cache, limit, full;
    int bell_fd; /* eventfd rung when the reader sleeps; -1: the Python side rings */
} RingWriter;

enum { CLAIM_FULL = -1, CLAIM_CORRUPT = -2, CLAIM_TOO_BIG = -3 };

/* Reload the reader's tail; 1 if the writer may advance to new_head, 0 if full, -1 corrupt. */
static int rw_room_for(RingWriter *w, uint64_t new_head) {
    uint64_t tail = __atomic_load_n(w->tail_word, __ATOMIC_ACQUIRE);
    if (tail < w->tail_cache || tail > w->published || (tail & 7u))
        return -1;
    w->tail_cache = tail;
    w->limit = tail + w->capacity;
    if (new_head - tail <= w->capacity)
        return 1;
    w->full++;
    __atomic_store_n(w->full_word, w->full, __ATOMIC_RELAXED);
    return 0;
}

/* Claim a frame of payload plen; returns the payload's offset in the mapping or CLAIM_*. */
static Py_ssize_t rw_claim(RingWriter *w, uint32_t ftype, uint64_t plen) {
    if (!w->held)
        return CLAIM_CORRUPT;
    uint64_t size = (plen + 15u) & ~(uint64_t)7u;
    if (size > w->max_frame)
        return CLAIM_TOO_BIG;
    uint64_t head = w->pending;
    uint64_t off = head & w->mask;
    uint64_t room = w->capacity - off;
    unsigned char *data = w->base + w->data_start;
    Py_ssize_t pos;
    if (size <= room) {
        if (head + size > w->limit) {
            int ok = rw_room_for(w, head + size);
            if (ok <= 0)
                return ok < 0 ? CLAIM_CORRUPT : CLAIM_FULL;
        }
        pos = w->data_start + (Py_ssize_t)off;
    } else {
        if (head + room + size > w->limit) {
            int ok = rw_room_for(w, head + room + size);
            if (ok <= 0)
                return ok < 0 ? CLAIM_CORRUPT : CLAIM_FULL;
        }
        uint32_t pad[2] = {(uint32_t)(room - 8u), SL_FRAME_PADDING};
        memcpy(data + off, pad, 8);
        head += room;
        pos = w->data_start;
    }
    uint32_t hdr[2] = {(uint32_t)plen, ftype};
    memcpy(w->base + pos, hdr, 8);
    w->pending = head + size;
    return pos + 8;
}

/* Publish every claimed frame; 1 when the reader was asleep (its flag cleared: ring it). */
static int rw_publish(RingWriter *w) {
    uint64_t head = w->pending;
    if (head == w->published || !w->held)
        return 0;
    __atomic_store_n(w->head_word, head, __ATOMIC_RELEASE); /* the commit: one aligned store */
    w->published = head;
    if (*w->flag) {
        *w->flag = 0;
        return 1;
    }
    return 0;
}

static void rw_ring(RingWriter *w) {
    if (w->bell_fd >= 0) {
        uint64_t one = 1;
        ssize_t n;
        do {
            n = write(w->bell_fd, &one, sizeof one);
        } while (n < 0 && errno == EINTR);
        /* EAGAIN: the counter is saturated, so the reader is woken anyway. */
    }
}

static void rw_release(RingWriter *w) {
    if (w->held) {
        PyBuffer_Release(&w->view);
        w->held = 0;
        w->base = NULL;
    }
    w->bell_fd = -1; /* the doorbell may close after the ring: never write to a stale fd */
}

static int RingWriter_init(RingWriter *w, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"view", "offset", "data_start", "capacity", "head", "tail", "full", "bell_fd", NULL};
    PyObject *view;
    Py_ssize_t offset, data_start;
    unsigned long long capacity, head, tail, full;
    int bell_fd = -1;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OnnKKKK|i:RingWriter", kw, &view, &offset, &data_start, &capacity,
                                     &head, &tail, &full, &bell_fd))
        return -1;
    rw_release(w);
    if (PyObject_GetBuffer(view, &w->view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    w->held = 1;
    if (capacity < 64 || (capacity & (capacity - 1)) || offset < 0 || (offset & 7) ||
        data_start < offset + SL_RING_HEADER_BYTES || (uint64_t)data_start + capacity > (uint64_t)w->view.len) {
        rw_release(w);
        PyErr_SetString(PyExc_ValueError, "RingWriter: ring outside the buffer or bad capacity");
        return -1;
    }
    w->base = w->view.buf;
    w->data_start = data_start;
    w->capacity = capacity;
    w->mask = capacity - 1;
    w->max_frame = capacity / 2;
    /* shm/_layout.h's ring header offsets (test_native_layout holds them to shm.layout). */
    w->head_word = (uint64_t *)(w->base + offset + SL_RING_HEAD_OFFSET);
    w->full_word = (uint64_t *)(w->base + offset + SL_RING_FULL_COUNT_OFFSET);
    w->tail_word = (uint64_t *)(w->base + offset + SL_RING_TAIL_OFFSET);
    w->flag = w->base + offset + SL_RING_READER_SLEEPING_OFFSET;
    w->pending = w->published = head;
    w->tail_cache = tail;
    w->limit = tail + capacity;
    w->full = full;
    w->bell_fd = bell_fd;
    return 0;
}

static void RingWriter_dealloc(RingWriter *w) {
    rw_release(w);
    Py_TYPE(w)->tp_free((PyObject *)w);
}

static PyObject *RingWriter_claim(RingWriter *w, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "claim(frame_type, payload_length)");
        return NULL;
    }
    long ftype = PyLong_AsLong(args[0]);
    long long plen = PyLong_AsLongLong(args[1]);
    if ((ftype == -1 || plen == -1) && PyErr_Occurred())
        return NULL;
    if (plen < 0 || plen > UINT32_MAX || ftype < 0 || ftype > UINT32_MAX) {
        PyErr_SetString(PyExc_ValueError, "claim: frame type or payload length out of range");
        return NULL;
    }
    return PyLong_FromSsize_t(rw_claim(w, (uint32_t)ftype, (uint64_t)plen));
}

static PyObject *RingWriter_publish(RingWriter *w, PyObject *unused) {
    (void)unused;
    int asleep = rw_publish(w);
    if (asleep && w->bell_fd >= 0) {
        rw_ring(w);
        asleep = 0;
    }
    return PyBool_FromLong(asleep);
}

static PyObject *RingWriter_rollback(RingWriter *w, PyObject *unused) {
    (void)unused;
    w->pending = w->published;
    Py_RETURN_NONE;
}

static PyObject *RingWriter_release_m(RingWriter *w, PyObject *unused) {
    (void)unused;
    rw_release(w);
    Py_RETURN_NONE;
}

static PyObject *RingWriter_set_bell(RingWriter *w, PyObject *arg) {
    int fd = (int)PyLong_AsLong(arg);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    w->bell_fd = fd;
    Py_RETURN_NONE;
}

static PyMethodDef RingWriter_methods[] = {
    {"claim", (PyCFunction)(void (*)(void))RingWriter_claim, METH_FASTCALL,
     "claim(frame_type, payload_length) -> payload offset, or -1 full, -2 corrupt tail, -3 too big"},
    {"publish", (PyCFunction)RingWriter_publish, METH_NOARGS,
     "Publish the claimed frames; True when the reader sleeps and must be rung by the caller."},
    {"rollback", (PyCFunction)RingWriter_rollback, METH_NOARGS, "Forget frames claimed since the last publish."},
    {"release", (PyCFunction)RingWriter_release_m, METH_NOARGS, "Let go of the mapping."},
    {"set_bell", (PyCFunction)RingWriter_set_bell, METH_O, "The eventfd to ring (-1: the caller rings)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef RingWriter_members[] = {
    {"pending", T_ULONGLONG, offsetof(RingWriter, pending), READONLY, "head position after the claimed frames"},
    {"published", T_ULONGLONG, offsetof(RingWriter, published), READONLY, "the last published head"},
    {"tail_cache", T_ULONGLONG, offsetof(RingWriter, tail_cache), READONLY, "the reader's tail as last loaded"},
    {"full", T_ULONGLONG, offsetof(RingWriter, full), READONLY, "times a claim found the ring full"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RingWriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shm._client.RingWriter",
    .tp_basicsize = sizeof(RingWriter),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The writer half of a shared-memory SPSC ring (see shm.ring.SpscRing).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)RingWriter_init,
    .tp_dealloc = (destructor)RingWriter_dealloc,
    .tp_methods = RingWriter_methods,
    .tp_members = RingWriter_members,
};

/* ------------------------------------------------------------------------------------------
 * FutureBase: the slots of a DeliveryFuture
 */

typedef struct {
    PyObject_HEAD
    PyObject *topic;
    PyObject *partition;
    PyObject *timestamp;
    PyObject *outcome; /* None while pending; the offset (int) or the exception */
    PyObject *waiters; /* None or a list of callables */
} FutureBase;

static int FutureBase_clear(FutureBase *f) {
    Py_CLEAR(f->topic);
    Py_CLEAR(f->partition);
    Py_CLEAR(f->timestamp);
    Py_CLEAR(f->outcome);
    Py_CLEAR(f->waiters);
    return 0;
}

static void FutureBase_dealloc(FutureBase *f) {
    FutureBase_clear(f);
    Py_TYPE(f)->tp_free((PyObject *)f);
}

static PyObject *FutureBase_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    (void)args;
    (void)kwds;
    FutureBase *f = (FutureBase *)type->tp_alloc(type, 0);
    if (f == NULL)
        return NULL;
    f->topic = Py_NewRef(Py_None);
    f->partition = Py_NewRef(Py_None);
    f->timestamp = Py_NewRef(Py_None);
    f->outcome = Py_NewRef(Py_None);
    f->waiters = Py_NewRef(Py_None);
    return (PyObject *)f;
}

static PyMemberDef FutureBase_members[] = {
    {"topic", T_OBJECT, offsetof(FutureBase, topic), 0, NULL},
    {"partition", T_OBJECT, offsetof(FutureBase, partition), 0, NULL},
    {"timestamp", T_OBJECT, offsetof(FutureBase, timestamp), 0, NULL},
    {"_outcome", T_OBJECT, offsetof(FutureBase, outcome), 0, NULL},
    {"_waiters", T_OBJECT, offsetof(FutureBase, waiters), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

/* Not tracked by the garbage collector (as msgspec's gc=False Structs): one future per record
 * made and dropped at a million a second would drive collections that cost more than the
 * future. A cycle through a waiter (an on_delivery callback that holds its future) is broken
 * when the outcome comes: the waiters are dropped then (DeliveryFuture._wake). */
static PyTypeObject FutureBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shm._client.FutureBase",
    .tp_basicsize = sizeof(FutureBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE,
    .tp_doc = "The slots of shm.futures.DeliveryFuture, so that send() can make one in C.",
    .tp_new = FutureBase_new,
    .tp_dealloc = (destructor)FutureBase_dealloc,
    .tp_members = FutureBase_members,
};

/* ------------------------------------------------------------------------------------------
 * TopicBase: the per-record slots of a TopicState
 */

typedef struct {
    PyObject_HEAD
    PyObject *name;
    int id;
    int partitions;
    Py_ssize_t max_body;
    int sticky_p;
    Py_ssize_t sticky_left;
    int *owners;        /* worker per partition */
    PyObject *appends;  /* tuple: the bound append of each partition's pending FIFO */
    PyObject *tally;    /* the FIFO entry of produce() records (shm.futures.DeliveryTally) */
    int bound;          /* owners and appends are set for `partitions` */
} TopicBase;

static int TopicBase_traverse(TopicBase *t, visitproc visit, void *arg) {
    Py_VISIT(t->name);
    Py_VISIT(t->appends);
    Py_VISIT(t->tally);
    return 0;
}

static int TopicBase_clear(TopicBase *t) {
    Py_CLEAR(t->name);
    Py_CLEAR(t->appends);
    Py_CLEAR(t->tally);
    return 0;
}

static void TopicBase_dealloc(TopicBase *t) {
    PyObject_GC_UnTrack(t);
    TopicBase_clear(t);
    PyMem_Free(t->owners);
    Py_TYPE(t)->tp_free((PyObject *)t);
}

static PyObject *TopicBase_bind(TopicBase *t, PyObject *args) {
    PyObject *owners, *pending;
    if (!PyArg_ParseTuple(args, "OO:bind", &owners, &pending))
        return NULL;
    Py_ssize_t n = PySequence_Size(owners);
    if (n < 0)
        return NULL;
    if (n < t->partitions || n > INT_MAX || PySequence_Size(pending) != n) {
        PyErr_SetString(PyExc_ValueError, "bind: one owner and one FIFO per partition, never fewer partitions");
        return NULL;
    }
    int *own = PyMem_Malloc(sizeof(int) * (size_t)(n ? n : 1));
    PyObject *appends = PyTuple_New(n);
    if (own == NULL || appends == NULL) {
        PyMem_Free(own);
        Py_XDECREF(appends);
        return PyErr_NoMemory();
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *o = PySequence_GetItem(owners, i);
        PyObject *q = o ? PySequence_GetItem(pending, i) : NULL;
        PyObject *app = q ? PyObject_GetAttrString(q, "append") : NULL;
        long w = o ? PyLong_AsLong(o) : -1;
        Py_XDECREF(o);
        Py_XDECREF(q);
        if (app == NULL || (w == -1 && PyErr_Occurred())) {
            Py_XDECREF(app);
            PyMem_Free(own);
            Py_DECREF(appends);
            return NULL;
        }
        own[i] = (int)w;
        PyTuple_SET_ITEM(appends, i, app);
    }
    /* The swap: no Python code runs from here to the return (the old tuple's bound methods
     * only drop references to FIFOs the new tuple holds too), so the compiled send() of
     * another thread sees either the old count with the old tables or the new count with the
     * new ones. A send() that chose its partition under the old count and runs Python before
     * it indexes the tables (the sticky partitioner, a timestamp's __index__, the collector)
     * finds the new ones: counts only grow, so its partition is still in range there. */
    PyMem_Free(t->owners);
    t->owners = own;
    Py_XSETREF(t->appends, appends);
    t->partitions = (int)n;
    t->bound = 1;
    Py_RETURN_NONE;
}

static PyMethodDef TopicBase_methods[] = {
    {"_bind", (PyCFunction)TopicBase_bind, METH_VARARGS,
     "_bind(owners, pending): each partition's worker and pending FIFO, for send(); the\n"
     "partition count becomes len(owners) in the same step (it may grow, never shrink)."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef TopicBase_members[] = {
    {"name", T_OBJECT, offsetof(TopicBase, name), 0, NULL},
    {"tally", T_OBJECT, offsetof(TopicBase, tally), 0, NULL},
    {"id", T_INT, offsetof(TopicBase, id), 0, NULL},
    {"partitions", T_INT, offsetof(TopicBase, partitions), 0, NULL},
    {"max_body", T_PYSSIZET, offsetof(TopicBase, max_body), 0, NULL},
    {"sticky_p", T_INT, offsetof(TopicBase, sticky_p), 0, NULL},
    {"sticky_left", T_PYSSIZET, offsetof(TopicBase, sticky_left), 0, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject TopicBaseType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shm._client.TopicBase",
    .tp_basicsize = sizeof(TopicBase),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The per-record slots of shm.topic.TopicState, read by the compiled send().",
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)TopicBase_dealloc,
    .tp_traverse = (traverseproc)TopicBase_traverse,
    .tp_clear = (inquiry)TopicBase_clear,
    .tp_methods = TopicBase_methods,
    .tp_members = TopicBase_members,
};

/* ------------------------------------------------------------------------------------------
 * SendCore
 */

typedef struct {
    PyObject_HEAD
    PyObject *topics;      /* dict: name -> TopicState (a TopicBase) */
    PyObject *writers;     /* tuple of RingWriter, one per worker */
    PyTypeObject *future;  /* the DeliveryFuture class (a FutureBase subclass) */
    PyObject *lookup;      /* lookup(topic): asks the daemon about a topic not in `topics` (may raise) */
    PyObject *check_open;  /* check_open(): raises ProducerClosedError; called when not enabled */
    PyObject *refusal;     /* refusal(code, topic_state, n) -> the KafkaError to raise */
    PyObject *full;        /* enqueue(topic_state, partition, ts, body, future): ring full or busy */
    PyObject *stick;       /* stick(topic_state): the sticky partition moves on */
    PyObject *vser;        /* the value serializer, or None */
    PyObject *kser;        /* the key serializer, or None */
    PyTypeObject *rec_type; /* send_records(): the record type whose slot offsets are known */
    Py_ssize_t rec_off[5];  /* ...of value, key, partition, headers, timestamp; 0: use getattr */
    int enabled;           /* 0: the producer is closed, or the daemon gone for good */
    long long pending;     /* records sent whose outcome has not come back */
    /* The last timestamp given to a future, as an int: the records of one millisecond share it
     * (one allocation fewer per record, and one object fewer for the completion thread to
     * touch when it frees the future). */
    PyObject *ts_obj;
    long long ts_val;
} SendCore;

static int SendCore_traverse(SendCore *c, visitproc visit, void *arg) {
    Py_VISIT(c->topics);
    Py_VISIT(c->writers);
    Py_VISIT(c->future);
    Py_VISIT(c->lookup);
    Py_VISIT(c->check_open);
    Py_VISIT(c->refusal);
    Py_VISIT(c->full);
    Py_VISIT(c->stick);
    Py_VISIT(c->vser);
    Py_VISIT(c->kser);
    Py_VISIT(c->rec_type);
    return 0;
}

static int SendCore_clear(SendCore *c) {
    Py_CLEAR(c->topics);
    Py_CLEAR(c->writers);
    Py_CLEAR(c->future);
    Py_CLEAR(c->lookup);
    Py_CLEAR(c->check_open);
    Py_CLEAR(c->refusal);
    Py_CLEAR(c->full);
    Py_CLEAR(c->stick);
    Py_CLEAR(c->vser);
    Py_CLEAR(c->kser);
    Py_CLEAR(c->rec_type);
    Py_CLEAR(c->ts_obj);
    return 0;
}

static void SendCore_dealloc(SendCore *c) {
    PyObject_GC_UnTrack(c);
    SendCore_clear(c);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int SendCore_init(SendCore *c, PyObject *args, PyObject *kwds) {
    static char *kw[] = {"topics", "future", "lookup", "check_open", "refusal", "full", "stick",
                         "value_serializer", "key_serializer", NULL};
    PyObject *topics, *future, *lookup, *check_open, *refusal, *full, *stick, *vser = Py_None, *kser = Py_None;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O!O!OOOOO|OO:SendCore", kw, &PyDict_Type, &topics, &PyType_Type,
                                     &future, &lookup, &check_open, &refusal, &full, &stick, &vser, &kser))
        return -1;
    if (!PyType_IsSubtype((PyTypeObject *)future, &FutureBaseType)) {
        PyErr_SetString(PyExc_TypeError, "SendCore: future must subclass FutureBase");
        return -1;
    }
    if ((vser != Py_None && !PyCallable_Check(vser)) || (kser != Py_None && !PyCallable_Check(kser))) {
        PyErr_SetString(PyExc_TypeError, "SendCore: a serializer must be callable or None");
        return -1;
    }
    Py_XSETREF(c->topics, Py_NewRef(topics));
    Py_XSETREF(c->future, (PyTypeObject *)Py_NewRef(future));
    Py_XSETREF(c->lookup, Py_NewRef(lookup));
    Py_XSETREF(c->check_open, Py_NewRef(check_open));
    Py_XSETREF(c->refusal, Py_NewRef(refusal));
    Py_XSETREF(c->full, Py_NewRef(full));
    Py_XSETREF(c->stick, Py_NewRef(stick));
    Py_XSETREF(c->vser, Py_NewRef(vser));
    Py_XSETREF(c->kser, Py_NewRef(kser));
    Py_XSETREF(c->writers, PyTuple_New(0));
    c->enabled = 0;
    c->pending = 0;
    return c->writers ? 0 : -1;
}

/* One header, borrowed from a header snapshot: key bytes (UTF-8 of a str key) and value bytes. */
typedef struct {
    const char *k;
    Py_ssize_t klen;
    const char *v;
    Py_ssize_t vlen; /* -1: null */
} hdr_t;

#define STACK_HEADERS 16 /* headers parsed without an allocation */

/* `v` as the bytes a record carries (a new reference; None stays None): the serializer's output
 * when there is one, which must be bytes-like; else bytes as they are, str as UTF-8, other
 * buffers copied. TypeError for anything else, saying how to send it. */
static PyObject *record_bytes(PyObject *v, PyObject *ser, const char *what) {
    if (v == Py_None)
        return Py_NewRef(Py_None);
    if (ser != Py_None) {
        PyObject *out = PyObject_CallOneArg(ser, v);
        if (out == NULL || out == Py_None || PyBytes_Check(out))
            return out;
        if (PyByteArray_Check(out) || PyMemoryView_Check(out)) {
            Py_SETREF(out, PyBytes_FromObject(out));
            return out;
        }
        PyErr_Format(PyExc_TypeError, "the %s serializer returned %.100s, not bytes", what, Py_TYPE(out)->tp_name);
        Py_DECREF(out);
        return NULL;
    }
    if (PyBytes_Check(v))
        return Py_NewRef(v);
    if (PyUnicode_Check(v))
        return PyUnicode_AsUTF8String(v);
    if (PyByteArray_Check(v) || PyMemoryView_Check(v))
        return PyBytes_FromObject(v);
    PyErr_Format(PyExc_TypeError,
                 "cannot send %.100s as the %s: pass bytes or str, or give the Producer a serializer "
                 "('json', 'msgpack' or a callable)", Py_TYPE(v)->tp_name, what);
    return NULL;
}

/* The headers as a tuple of (key, value) pairs, key str or bytes, value bytes or None (a new
 * reference; None for no headers), or NULL with TypeError. A snapshot: the bytes are read in
 * place after Python code may have run (the sticky partitioner, the collector), and the
 * caller's list may change meanwhile. */
static PyObject *header_snapshot(PyObject *headers) {
    if (headers == Py_None)
        return Py_NewRef(Py_None);
    if (PyUnicode_Check(headers) || PyBytes_Check(headers) || PyDict_Check(headers)) {
        PyErr_Format(PyExc_TypeError, "headers must be a sequence of (key, value) pairs, not %.100s",
                     Py_TYPE(headers)->tp_name);
        return NULL;
    }
    PyObject *seq = PySequence_Tuple(headers);
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyTuple_GET_ITEM(seq, i);
        if (PyTuple_CheckExact(h) && PyTuple_GET_SIZE(h) == 2) {
            PyObject *k = PyTuple_GET_ITEM(h, 0), *v = PyTuple_GET_ITEM(h, 1);
            if ((PyUnicode_CheckExact(k) || PyBytes_CheckExact(k)) && (v == Py_None || PyBytes_CheckExact(v)))
                continue; /* the usual shape, kept as it is */
        }
        if (seq == headers) {
            /* The caller's own tuple: fix a copy, never theirs. */
            PyObject *copy = PyTuple_New(n); /* not a slice: a full slice is the same tuple */
            if (copy == NULL) {
                Py_DECREF(seq);
                return NULL;
            }
            for (Py_ssize_t j = 0; j < n; j++)
                PyTuple_SET_ITEM(copy, j, Py_NewRef(PyTuple_GET_ITEM(seq, j)));
            Py_DECREF(seq);
            seq = copy;
            h = PyTuple_GET_ITEM(seq, i);
        }
        PyObject *pair = PySequence_Tuple(h);
        if (pair == NULL || PyTuple_GET_SIZE(pair) != 2) {
            Py_XDECREF(pair);
            PyErr_Clear();
            PyErr_Format(PyExc_TypeError, "a header must be a (key, value) pair, not %.100s", Py_TYPE(h)->tp_name);
            Py_DECREF(seq);
            return NULL;
        }
        PyObject *k = PyTuple_GET_ITEM(pair, 0), *v = PyTuple_GET_ITEM(pair, 1);
        PyObject *k2 = PyUnicode_Check(k) ? PyUnicode_AsUTF8String(k)
                       : PyObject_CheckBuffer(k) ? PyBytes_FromObject(k) : NULL;
        PyObject *v2 = v == Py_None ? Py_NewRef(Py_None) : PyObject_CheckBuffer(v) ? PyBytes_FromObject(v) : NULL;
        Py_DECREF(pair);
        PyObject *fixed = (k2 != NULL && v2 != NULL) ? PyTuple_Pack(2, k2, v2) : NULL;
        Py_XDECREF(k2);
        Py_XDECREF(v2);
        if (fixed == NULL) {
            if (!PyErr_Occurred() || PyErr_ExceptionMatches(PyExc_TypeError)) {
                PyErr_Clear();
                PyErr_SetString(PyExc_TypeError, "a header's key must be str or bytes, its value bytes or None");
            }
            Py_DECREF(seq);
            return NULL;
        }
        PyTuple_SET_ITEM(seq, i, fixed); /* seq is a new tuple of ours: replacing an item is safe */
        Py_DECREF(h);
    }
    return seq;
}

/* Read a header snapshot into `out` (n entries); returns the encoded size of the headers part
 * (count varint and every header), or -1 with an exception (a str key that is not UTF-8). */
static int64_t parse_headers(PyObject *snap, hdr_t *out) {
    Py_ssize_t n = snap == Py_None ? 0 : PyTuple_GET_SIZE(snap);
    int64_t total = sl_varint_len(n);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *h = PyTuple_GET_ITEM(snap, i);
        PyObject *k = PyTuple_GET_ITEM(h, 0), *v = PyTuple_GET_ITEM(h, 1);
        if (PyUnicode_Check(k)) {
            out[i].k = PyUnicode_AsUTF8AndSize(k, &out[i].klen);
            if (out[i].k == NULL)
                return -1;
        } else {
            out[i].k = PyBytes_AS_STRING(k);
            out[i].klen = PyBytes_GET_SIZE(k);
        }
        if (v == Py_None) {
            out[i].v = NULL;
            out[i].vlen = -1;
        } else {
            out[i].v = PyBytes_AS_STRING(v);
            out[i].vlen = PyBytes_GET_SIZE(v);
        }
        total += sl_varint_len(out[i].klen) + out[i].klen + sl_varint_len(out[i].vlen) + (out[i].vlen > 0 ? out[i].vlen : 0);
    }
    return total;
}

static inline unsigned char *put_field(unsigned char *out, const char *p, Py_ssize_t n) {
    out += sl_put_varint(out, n);
    if (n > 0) {
        memcpy(out, p, (size_t)n);
        out += n;
    }
    return out;
}

static void encode_body(unsigned char *out, const char *key, Py_ssize_t klen, const char *val, Py_ssize_t vlen,
                        const hdr_t *h, Py_ssize_t nh) {
    out = put_field(out, key, klen);
    out = put_field(out, val, vlen);
    out += sl_put_varint(out, nh);
    for (Py_ssize_t i = 0; i < nh; i++) {
        out = put_field(out, h[i].k, h[i].klen);
        out = put_field(out, h[i].v, h[i].vlen);
    }
}

static int64_t now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (int64_t)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

/* Kafka error codes send() raises itself, through `refusal` (shm.topic.refusal). */
#define SL_ERR_UNKNOWN_TOPIC_OR_PARTITION 3
#define SL_ERR_MESSAGE_TOO_LARGE 10

/* The sentinel send_one() returns, under no_full, for "the ring is full or another writer is
 * between its claim and its publish" (nothing was written, no exception set). */
static PyObject busy_sentinel_obj;
#define BUSY (&busy_sentinel_obj)

/* Raise refusal(code, t, n): the KafkaError the Python side makes for a record the topic
 * cannot take. Returns NULL. */
static PyObject *refuse(SendCore *c, int code, TopicBase *t, long long n) {
    PyObject *exc = PyObject_CallFunction(c->refusal, "iOL", code, (PyObject *)t, n);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
    return NULL;
}

/* The topic's state (a new reference), asking the daemon about a topic not seen before. */
static TopicBase *topic_state(SendCore *c, PyObject *topic, int fire) {
    if (!PyUnicode_Check(topic)) {
        PyErr_Format(PyExc_TypeError, "topic must be str, not %.100s", Py_TYPE(topic)->tp_name);
        return NULL;
    }
    PyObject *tobj = PyDict_GetItemWithError(c->topics, topic); /* borrowed */
    if (tobj == NULL) {
        if (PyErr_Occurred())
            return NULL;
        PyObject *r = PyObject_CallOneArg(c->lookup, topic); /* I/O: the daemon's TopicInfo */
        if (r == NULL)
            return NULL;
        Py_DECREF(r);
        tobj = PyDict_GetItemWithError(c->topics, topic);
        if (tobj == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(PyExc_RuntimeError, "sluice: topic %R was looked up but is not in the table", topic);
            return NULL;
        }
    }
    if (!PyObject_TypeCheck(tobj, &TopicBaseType) || !((TopicBase *)tobj)->bound ||
        (fire && ((TopicBase *)tobj)->tally == NULL)) {
        PyErr_Format(PyExc_RuntimeError, "sluice: the state of topic %R is incomplete", topic);
        return NULL;
    }
    return (TopicBase *)Py_NewRef(tobj);
}

static PyObject *write_record(SendCore *c, TopicBase *t, PyObject *value, PyObject *key, PyObject *partition,
                              PyObject *headers, PyObject *timestamp, PyObject *on_delivery, PyObject *entry,
                              int no_full, hdr_t *hdrs);
static int choose_partition(SendCore *c, TopicBase *t, Py_ssize_t pv, const char *kp, Py_ssize_t klen, int64_t blen);
static PyObject *write_at(SendCore *c, TopicBase *t, int p, int64_t ts, const char *kp, Py_ssize_t klen,
                          const char *val, Py_ssize_t vlen, const hdr_t *hdrs, Py_ssize_t nh, int64_t blen,
                          PyObject *on_delivery, PyObject *entry, int no_full);

/* One record of send()/produce() (fire), arguments as given (borrowed). `entry`: the pending
 * FIFO's entry for the record when it gets no future (fire: the topic's tally unless given).
 * Returns the future (a new reference; None with fire), NULL with an exception set, or BUSY
 * under no_full. */
static PyObject *send_one(SendCore *c, PyObject *topic, PyObject *value, PyObject *key, PyObject *partition,
                          PyObject *headers, PyObject *timestamp, PyObject *on_delivery, int fire, PyObject *entry,
                          int no_full) {
    if (!c->enabled) {
        PyObject *r = PyObject_CallNoArgs(c->check_open);
        if (r != NULL) {
            Py_DECREF(r);
            PyErr_SetString(PyExc_RuntimeError, "sluice: the producer cannot send (no request rings)");
        }
        return NULL;
    }
    TopicBase *t = topic_state(c, topic, fire && entry == NULL);
    if (t == NULL)
        return NULL;
    if (fire && entry == NULL)
        entry = t->tally;
    PyObject *v = record_bytes(value, c->vser, "value");
    PyObject *k = v ? record_bytes(key, c->kser, "key") : NULL;
    PyObject *h = k ? header_snapshot(headers) : NULL;
    PyObject *r = NULL;
    if (h != NULL) {
        Py_ssize_t nh = h == Py_None ? 0 : PyTuple_GET_SIZE(h);
        hdr_t stack[STACK_HEADERS];
        hdr_t *hdrs = nh <= STACK_HEADERS ? stack : PyMem_Malloc(sizeof(hdr_t) * (size_t)nh);
        if (hdrs == NULL)
            PyErr_NoMemory();
        else
            r = write_record(c, t, v, k, partition, h, timestamp, on_delivery, fire ? entry : NULL, no_full, hdrs);
        if (hdrs != stack)
            PyMem_Free(hdrs);
    }
    Py_XDECREF(h);
    Py_XDECREF(k);
    Py_XDECREF(v);
    Py_DECREF(t);
    return r;
}

/* write_record: value and key are bytes or None, headers a snapshot; `hdrs` has room for them.
 * entry NULL: a future for the record, returned; else the FIFO entry, and None is returned. */
static PyObject *write_record(SendCore *c, TopicBase *t, PyObject *value, PyObject *key, PyObject *partition,
                              PyObject *headers, PyObject *timestamp, PyObject *on_delivery, PyObject *entry,
                              int no_full, hdr_t *hdrs) {
    const char *val = NULL, *kp = NULL;
    Py_ssize_t vlen = -1, klen = -1;
    if (value != Py_None) {
        val = PyBytes_AS_STRING(value);
        vlen = PyBytes_GET_SIZE(value);
    }
    if (key != Py_None) {
        kp = PyBytes_AS_STRING(key);
        klen = PyBytes_GET_SIZE(key);
    }
    Py_ssize_t nh = headers == Py_None ? 0 : PyTuple_GET_SIZE(headers);
    int64_t hbytes = parse_headers(headers, hdrs);
    if (hbytes < 0)
        return NULL;
    int64_t blen = sl_varint_len(klen) + (klen > 0 ? klen : 0) + sl_varint_len(vlen) + (vlen > 0 ? vlen : 0) + hbytes;
    if (blen > t->max_body)
        return refuse(c, SL_ERR_MESSAGE_TOO_LARGE, t, blen);
    Py_ssize_t pv = -1; /* the partition asked for; -1: none */
    if (partition != Py_None) {
        if (!PyIndex_Check(partition)) {
            PyErr_Format(PyExc_TypeError, "partition must be an int or None, not %.100s", Py_TYPE(partition)->tp_name);
            return NULL;
        }
        pv = PyNumber_AsSsize_t(partition, NULL); /* clamped: out of range either way */
        if (pv == -1 && PyErr_Occurred())
            return NULL;
        if (pv < 0)
            return refuse(c, SL_ERR_UNKNOWN_TOPIC_OR_PARTITION, t, pv);
    }
    int p = choose_partition(c, t, pv, kp, klen, blen);
    if (p < 0)
        return NULL;
    int64_t ts;
    if (timestamp == Py_None) {
        ts = now_ms();
    } else {
        if (!PyIndex_Check(timestamp)) {
            PyErr_Format(PyExc_TypeError, "timestamp must be an int (ms) or None, not %.100s", Py_TYPE(timestamp)->tp_name);
            return NULL;
        }
        PyObject *tsi = PyNumber_Index(timestamp);
        if (tsi == NULL)
            return NULL;
        int overflow = 0;
        ts = PyLong_AsLongLongAndOverflow(tsi, &overflow);
        Py_DECREF(tsi);
        if (overflow) {
            PyErr_SetString(PyExc_OverflowError, "timestamp does not fit in 64 bits");
            return NULL;
        }
        if (ts == -1 && PyErr_Occurred())
            return NULL;
    }
    return write_at(c, t, p, ts, kp, klen, val, vlen, hdrs, nh, blen, on_delivery, entry, no_full);
}

/* The partition of a record whose body is `blen` bytes: `pv` when it asked for one (>= 0;
 * UNKNOWN_TOPIC_OR_PARTITION raised when the topic has no such partition), else murmur2 of its
 * key, else the sticky partition (moved on through Python once per batch_size bytes). Returns
 * it, or -1 with an exception set. */
static int choose_partition(SendCore *c, TopicBase *t, Py_ssize_t pv, const char *kp, Py_ssize_t klen, int64_t blen) {
    if (pv >= 0) {
        if (pv >= t->partitions) {
            refuse(c, SL_ERR_UNKNOWN_TOPIC_OR_PARTITION, t, pv);
            return -1;
        }
        return (int)pv;
    }
    if (kp != NULL)
        return partition_of_key((const unsigned char *)kp, klen, t->partitions);
    if (t->sticky_left <= 0) {
        PyObject *r = PyObject_CallOneArg(c->stick, (PyObject *)t); /* per batch_size bytes, not per record */
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        if (t->sticky_p < 0 || t->sticky_p >= t->partitions) {
            PyErr_SetString(PyExc_RuntimeError, "sluice: the sticky partitioner chose no partition of the topic");
            return -1;
        }
    }
    t->sticky_left -= (Py_ssize_t)blen;
    return t->sticky_p;
}

/* The rest of write_record once the partition and timestamp are known: the future (or the
 * FIFO entry), the claim, the frame, the pending FIFO, the publish. */
static PyObject *write_at(SendCore *c, TopicBase *t, int p, int64_t ts, const char *kp, Py_ssize_t klen,
                          const char *val, Py_ssize_t vlen, const hdr_t *hdrs, Py_ssize_t nh, int64_t blen,
                          PyObject *on_delivery, PyObject *entry, int no_full) {
    int fire = entry != NULL;
    int owner = t->owners[p];
    if (owner < 0 || owner >= PyTuple_GET_SIZE(c->writers)) {
        PyErr_Format(PyExc_RuntimeError, "sluice: partition %d's worker %d has no request ring", p, owner);
        return NULL;
    }
    RingWriter *w = (RingWriter *)PyTuple_GET_ITEM(c->writers, owner);
    /* The future first: making it may run Python code (the GC), which must not happen between
     * the claim and the publish. */
    FutureBase *f;
    if (fire) {
        f = (FutureBase *)Py_NewRef(entry); /* the FIFO entry; not returned */
    } else {
        f = (FutureBase *)c->future->tp_alloc(c->future, 0);
        if (f == NULL)
            return NULL;
        /* The Python subclass is a heap type, so the collector tracks it; untracked, a
         * collection skips it (see FutureBaseType: its references are not traversed anyway). */
        if (PyObject_IS_GC((PyObject *)f))
            PyObject_GC_UnTrack(f);
        f->topic = Py_NewRef(t->name);
        f->partition = PyLong_FromLong(p);
        if (c->ts_obj == NULL || c->ts_val != ts) {
            Py_XSETREF(c->ts_obj, PyLong_FromLongLong(ts));
            c->ts_val = ts;
        }
        f->timestamp = Py_XNewRef(c->ts_obj);
        f->outcome = Py_NewRef(Py_None);
        if (on_delivery == Py_None) {
            f->waiters = Py_NewRef(Py_None);
        } else {
            f->waiters = PyList_New(1);
            if (f->waiters != NULL)
                PyList_SET_ITEM(f->waiters, 0, Py_NewRef(on_delivery));
        }
        if (f->partition == NULL || f->timestamp == NULL || f->waiters == NULL) {
            Py_DECREF(f);
            return NULL;
        }
    }
    /* A Python writer (send_many's runs, a record that waited for room) between its claim and
     * its publish in another thread: this record waits for it behind the send lock. */
    Py_ssize_t pos = w->pending != w->published ? CLAIM_FULL : rw_claim(w, SL_FRAME_RECORD, (uint64_t)(SL_RECORD_PREFIX_BYTES + blen));
    if (pos < 0) {
        if (no_full) {
            Py_DECREF(f);
            return BUSY;
        }
        /* The Python writer (shm.backpressure) takes the body we made: it waits for room
         * (on_full=block), drops (on_full=drop), or raises what the ring's claim reports. */
        PyObject *body = PyBytes_FromStringAndSize(NULL, (Py_ssize_t)blen);
        if (body == NULL) {
            Py_DECREF(f);
            return NULL;
        }
        encode_body((unsigned char *)PyBytes_AS_STRING(body), kp, klen, val, vlen, hdrs, nh);
        PyObject *pp = PyLong_FromLong(p), *pts = PyLong_FromLongLong(ts);
        PyObject *r = NULL;
        if (pp != NULL && pts != NULL) {
            PyObject *cargs[5] = {(PyObject *)t, pp, pts, body, (PyObject *)f};
            r = PyObject_Vectorcall(c->full, cargs, 5, NULL);
        }
        Py_XDECREF(pp);
        Py_XDECREF(pts);
        Py_DECREF(body);
        if (r == NULL) {
            Py_DECREF(f);
            return NULL;
        }
        Py_DECREF(r);
        if (fire) {
            Py_DECREF(f);
            Py_RETURN_NONE;
        }
        return (PyObject *)f;
    }
    unsigned char *rec = w->base + pos;
    uint16_t tid = (uint16_t)t->id, flags = 0;
    int32_t part = p;
    memcpy(rec, &tid, 2);
    memcpy(rec + 2, &flags, 2);
    memcpy(rec + 4, &part, 4);
    memcpy(rec + 8, &ts, 8);
    encode_body(rec + SL_RECORD_PREFIX_BYTES, kp, klen, val, vlen, hdrs, nh);
    /* Pending before publish: the outcome may come back right after it. deque.append runs no
     * Python code. */
    PyObject *app = PyTuple_GET_ITEM(t->appends, p);
    PyObject *r = PyObject_CallOneArg(app, (PyObject *)f);
    if (r == NULL) {
        w->pending = w->published; /* roll the claim back */
        Py_DECREF(f);
        return NULL;
    }
    Py_DECREF(r);
    c->pending++;
    if (rw_publish(w))
        rw_ring(w);
    if (fire) {
        Py_DECREF(f);
        Py_RETURN_NONE;
    }
    return (PyObject *)f;
}

static const char *const send_kw[] = {"partition", "headers", "timestamp", "on_delivery", "key"};

/* send(topic, value, key=None, *, partition=None, headers=None, timestamp=None, on_delivery=None)
 * -> DeliveryFuture; with `fire` (produce()), no future and no on_delivery: the topic's tally
 * counts the outcome, and None is returned. */
static PyObject *do_send(SendCore *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames, int fire) {
    const char *fn = fire ? "produce" : "send";
    if (nargs < 2 || nargs > 3) {
        PyErr_Format(PyExc_TypeError, "%s() takes topic, value and an optional key as positional arguments (%zd given)",
                     fn, nargs);
        return NULL;
    }
    PyObject *topic = args[0], *value = args[1], *key = nargs > 2 ? args[2] : Py_None;
    PyObject *opt[5] = {Py_None, Py_None, Py_None, Py_None, NULL}; /* in send_kw's order */
    if (kwnames != NULL) {
        Py_ssize_t nk = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t i = 0; i < nk; i++) {
            PyObject *name = PyTuple_GET_ITEM(kwnames, i);
            int j = 0;
            while (j < 5 && PyUnicode_CompareWithASCIIString(name, send_kw[j]) != 0)
                j++;
            if (j == 5 || (fire && j == 3) || (j == 4 && nargs == 3)) {
                PyErr_Format(PyExc_TypeError, "%s() got an unexpected keyword argument %R", fn, name);
                return NULL;
            }
            opt[j] = args[nargs + i];
        }
    }
    if (opt[4] != NULL)
        key = opt[4];
    PyObject *r = send_one(c, topic, value, key, opt[0], opt[1], opt[2], opt[3], fire, NULL, 0);
    return r == BUSY ? NULL : r; /* never BUSY without no_full */
}

static PyObject *s_value, *s_key, *s_partition, *s_headers, *s_timestamp; /* interned at init */

PyDoc_STRVAR(send_records_doc,
"send_records(topic, records, start, entry=None) -> (next, futures)\n\n"
"send() each of records[start:] (with an entry: produce(), with `entry`, a DeliveryTally, as\n"
"every record's pending entry, so it counts their outcomes), objects with the attributes value,\n"
"key, partition, headers and timestamp (shm.control.Rec, as socket ingest decodes them), until\n"
"the end or the first record it cannot write now: a full ring (or another writer's claim in\n"
"progress), or an error to raise. Nothing of that record is written, and no exception is set:\n"
"the caller sends it through send(), which raises or waits, and goes on after it. Returns that\n"
"record's index (len(records) when all went) and the futures of records[start:next] (none\n"
"with an entry).");

/* Learn where `tp` keeps the five attributes send_records() reads: a slot (a member descriptor
 * of an object field, as msgspec's Struct fields are) is read at its offset, without the
 * attribute machinery. Anything else (a property, a plain class) keeps offset 0: getattr. */
static void learn_record_type(SendCore *c, PyTypeObject *tp, PyObject *const *names) {
    Py_XSETREF(c->rec_type, (PyTypeObject *)Py_NewRef(tp));
    for (int k = 0; k < 5; k++) {
        c->rec_off[k] = 0;
        PyObject *d = PyObject_GetAttr((PyObject *)tp, names[k]); /* a slot's descriptor itself */
        if (d == NULL) {
            PyErr_Clear();
            continue;
        }
        if (Py_IS_TYPE(d, &PyMemberDescr_Type) && ((PyMemberDescrObject *)d)->d_common.d_type == tp) {
            PyMemberDef *m = ((PyMemberDescrObject *)d)->d_member;
            if ((m->type == T_OBJECT_EX || m->type == T_OBJECT) && m->offset > 0)
                c->rec_off[k] = m->offset;
        }
        Py_DECREF(d);
    }
}

/* Attribute k of a record (a new reference), from its slot when the offset is known. */
static inline PyObject *record_attr(SendCore *c, PyObject *rec, int k, PyObject *name) {
    if (c->rec_off[k] > 0) {
        PyObject *v = *(PyObject **)((char *)rec + c->rec_off[k]);
        if (v != NULL)
            return Py_NewRef(v);
    }
    return PyObject_GetAttr(rec, name); /* an unset slot raises AttributeError here */
}

static PyObject *SendCore_send_records(SendCore *c, PyObject *args) {
    PyObject *topic, *records;
    Py_ssize_t start;
    PyObject *entry = Py_None;
    if (!PyArg_ParseTuple(args, "UO!n|O:send_records", &topic, &PyList_Type, &records, &start, &entry))
        return NULL;
    int fire = entry != Py_None;
    Py_ssize_t n = PyList_GET_SIZE(records);
    if (start < 0 || start > n) {
        PyErr_SetString(PyExc_IndexError, "send_records: start outside the records");
        return NULL;
    }
    PyObject *futs = PyList_New(0);
    if (futs == NULL)
        return NULL;
    Py_ssize_t i = start;
    for (; i < PyList_GET_SIZE(records) && c->enabled; i++) {
        PyObject *rec = PyList_GET_ITEM(records, i);
        Py_INCREF(rec); /* the list may change under Python code the GC runs */
        PyObject *a[5] = {NULL, NULL, NULL, NULL, NULL};
        PyObject *names[5] = {s_value, s_key, s_partition, s_headers, s_timestamp};
        if (Py_TYPE(rec) != c->rec_type)
            learn_record_type(c, Py_TYPE(rec), names);
        int ok = 1;
        for (int k = 0; k < 5 && ok; k++) {
            a[k] = record_attr(c, rec, k, names[k]);
            ok = a[k] != NULL;
        }
        PyObject *r = ok ? send_one(c, topic, a[0], a[1], a[2], a[3], a[4], Py_None, fire, fire ? entry : NULL, 1) : NULL;
        for (int k = 0; k < 5; k++)
            Py_XDECREF(a[k]);
        Py_DECREF(rec);
        if (r == BUSY)
            break;
        if (r == NULL) {
            /* An error to raise: the caller's send() of this record raises it again, where it
             * is reported for this record alone. */
            if (!PyErr_ExceptionMatches(PyExc_Exception)) {
                Py_DECREF(futs);
                return NULL;
            }
            PyErr_Clear();
            break;
        }
        if (!fire && PyList_Append(futs, r) < 0) {
            Py_DECREF(r);
            Py_DECREF(futs);
            return NULL;
        }
        Py_DECREF(r);
    }
    PyObject *out = Py_BuildValue("nN", i, futs);
    return out;
}

/* ------------------------------------------------------------------------------------------
 * Socket ingest's packed Produce: the records read straight from the frame's msgpack.
 *
 * scan_produce() accepts only the plain shape of a Produce (shm/control.py, docs/PROTOCOL.md):
 * a map whose first key is "type" = "Produce", then only "topic" (str), "records" (array of at
 * most max_records), "ack" (bool) and "seq" (unsigned), each at most once; every record a map of
 * only "key" and "value" (bin or nil), "partition" (unsigned, at most 2^31-1, or nil),
 * "timestamp" (unsigned, at most 2^63-1, or nil) and "headers" (nil), each at most once; and
 * nothing after the map. Anything else (headers, an unknown key, another integer encoding, a
 * string that is not UTF-8) is left to msgspec, which accepts or refuses it as it always did:
 * the fast path takes a subset of what msgspec takes and reads it the same way
 * (tests/unit/shm/test_packed_produce.py holds it to msgspec). Every read is bounded by the
 * body's length; no length read from the body is trusted.
 */

typedef struct {
    const unsigned char *p;
    size_t len, pos;
} mp_rd;

/* Read `n` big-endian bytes as an unsigned; -1 when the body ends first. */
static int mp_be(mp_rd *r, int n, uint64_t *out) {
    if (r->len - r->pos < (size_t)n)
        return -1;
    uint64_t v = 0;
    for (int i = 0; i < n; i++)
        v = (v << 8) | r->p[r->pos + (size_t)i];
    r->pos += (size_t)n;
    *out = v;
    return 0;
}

/* A container or string header of the kind `kind` ('m' map, 'a' array, 's' str, 'b' bin):
 * its count or length, or -1 when the next object is something else (or truncated). */
static int64_t mp_head(mp_rd *r, char kind) {
    if (r->pos >= r->len)
        return -1;
    unsigned char b = r->p[r->pos++];
    uint64_t n;
    int w;
    switch (kind) {
    case 'm':
        if ((b & 0xf0) == 0x80)
            return b & 0x0f;
        w = b == 0xde ? 2 : b == 0xdf ? 4 : 0;
        break;
    case 'a':
        if ((b & 0xf0) == 0x90)
            return b & 0x0f;
        w = b == 0xdc ? 2 : b == 0xdd ? 4 : 0;
        break;
    case 's':
        if ((b & 0xe0) == 0xa0)
            n = b & 0x1f;
        else {
            w = b == 0xd9 ? 1 : b == 0xda ? 2 : b == 0xdb ? 4 : 0;
            if (w == 0 || mp_be(r, w, &n) < 0)
                return -1;
        }
        return r->len - r->pos < n ? -1 : (int64_t)n;
    default: /* 'b' */
        w = b == 0xc4 ? 1 : b == 0xc5 ? 2 : b == 0xc6 ? 4 : 0;
        if (w == 0 || mp_be(r, w, &n) < 0)
            return -1;
        return r->len - r->pos < n ? -1 : (int64_t)n;
    }
    if (w == 0 || mp_be(r, w, &n) < 0)
        return -1;
    return (int64_t)n;
}

/* An unsigned integer (positive fixint, uint8..uint64) of at most `max`; -1 otherwise. */
static int mp_uint(mp_rd *r, uint64_t max, uint64_t *out) {
    if (r->pos >= r->len)
        return -1;
    unsigned char b = r->p[r->pos++];
    uint64_t v;
    if (b < 0x80)
        v = b;
    else if (b >= 0xcc && b <= 0xcf) {
        if (mp_be(r, 1 << (b - 0xcc), &v) < 0)
            return -1;
    } else
        return -1;
    if (v > max)
        return -1;
    *out = v;
    return 0;
}

static inline int mp_nil(mp_rd *r) {
    if (r->pos < r->len && r->p[r->pos] == 0xc0) {
        r->pos++;
        return 1;
    }
    return 0;
}

/* The next str equals `lit` (the key just read is p[at..at+n)). */
#define MP_KEY_IS(r, at, n, lit) ((n) == (int64_t)(sizeof(lit) - 1) && memcmp((r)->p + (at), lit, sizeof(lit) - 1) == 0)

/* One record of a packed Produce, read as the plain shape allows: 0, or -1 when it is not. */
typedef struct {
    const char *key, *value; /* NULL: null */
    Py_ssize_t klen, vlen;   /* -1: null */
    Py_ssize_t partition;    /* -1: none asked */
    int64_t timestamp;       /* -1: none given */
} packed_rec;

enum { MAX_PARTITION = 0x7fffffff };

static int mp_record(mp_rd *r, packed_rec *out) {
    int64_t n = mp_head(r, 'm');
    if (n < 0)
        return -1;
    out->key = out->value = NULL;
    out->klen = out->vlen = -1;
    out->partition = -1;
    out->timestamp = -1;
    unsigned seen = 0;
    for (int64_t i = 0; i < n; i++) {
        int64_t kn = mp_head(r, 's');
        if (kn < 0)
            return -1;
        size_t at = r->pos;
        r->pos += (size_t)kn;
        unsigned bit;
        if (MP_KEY_IS(r, at, kn, "value") || MP_KEY_IS(r, at, kn, "key")) {
            int is_value = kn == 5;
            bit = is_value ? 1u : 2u;
            if (!mp_nil(r)) {
                int64_t bn = mp_head(r, 'b');
                if (bn < 0)
                    return -1;
                if (is_value) {
                    out->value = (const char *)r->p + r->pos;
                    out->vlen = (Py_ssize_t)bn;
                } else {
                    out->key = (const char *)r->p + r->pos;
                    out->klen = (Py_ssize_t)bn;
                }
                r->pos += (size_t)bn;
            }
        } else if (MP_KEY_IS(r, at, kn, "partition")) {
            bit = 4u;
            uint64_t v;
            if (!mp_nil(r)) {
                if (mp_uint(r, MAX_PARTITION, &v) < 0)
                    return -1;
                out->partition = (Py_ssize_t)v;
            }
        } else if (MP_KEY_IS(r, at, kn, "timestamp")) {
            bit = 8u;
            uint64_t v;
            if (!mp_nil(r)) {
                if (mp_uint(r, (uint64_t)INT64_MAX, &v) < 0)
                    return -1;
                out->timestamp = (int64_t)v;
            }
        } else if (MP_KEY_IS(r, at, kn, "headers")) {
            bit = 16u;
            if (!mp_nil(r))
                return -1; /* headers: msgspec's path */
        } else {
            return -1;
        }
        if (seen & bit)
            return -1;
        seen |= bit;
    }
    return 0;
}

PyDoc_STRVAR(scan_produce_doc,
"scan_produce(body, max_records) -> (topic, ack, seq, count, records_at) or None\n\n"
"A Produce frame's msgpack body (no length prefix) in the plain shape send_packed() reads (see\n"
"the comment above this function in shm/_client.c): its topic, ack, seq, how many records, and\n"
"the offset of the first record in `body`. None for anything else, which msgspec decodes (or\n"
"refuses) instead.");

static PyObject *scan_produce(PyObject *self, PyObject *args) {
    (void)self;
    Py_buffer buf;
    Py_ssize_t max_records;
    if (!PyArg_ParseTuple(args, "y*n:scan_produce", &buf, &max_records))
        return NULL;
    mp_rd r = {(const unsigned char *)buf.buf, (size_t)buf.len, 0};
    PyObject *out = NULL;
    int64_t n = mp_head(&r, 'm');
    int64_t tn = n > 0 ? mp_head(&r, 's') : -1;
    size_t tat = r.pos;
    int64_t vn = tn == 4 && memcmp(r.p + tat, "type", 4) == 0 ? (r.pos += 4, mp_head(&r, 's')) : -1;
    if (vn != 7 || memcmp(r.p + r.pos, "Produce", 7) != 0)
        goto done;
    r.pos += 7;
    unsigned seen = 0;
    const char *topic = NULL;
    Py_ssize_t topic_len = 0;
    int ack = 0;
    uint64_t seq = 0;
    int64_t count = 0;
    size_t records_at = 0;
    for (int64_t i = 1; i < n; i++) {
        int64_t kn = mp_head(&r, 's');
        if (kn < 0)
            goto done;
        size_t at = r.pos;
        r.pos += (size_t)kn;
        unsigned bit;
        if (MP_KEY_IS(&r, at, kn, "topic")) {
            bit = 1u;
            int64_t sn = mp_head(&r, 's');
            if (sn < 0)
                goto done;
            topic = (const char *)r.p + r.pos;
            topic_len = (Py_ssize_t)sn;
            r.pos += (size_t)sn;
        } else if (MP_KEY_IS(&r, at, kn, "records")) {
            bit = 2u;
            count = mp_head(&r, 'a');
            if (count < 0 || count > max_records)
                goto done;
            records_at = r.pos;
            packed_rec rec;
            for (int64_t j = 0; j < count; j++)
                if (mp_record(&r, &rec) < 0)
                    goto done;
        } else if (MP_KEY_IS(&r, at, kn, "ack")) {
            bit = 4u;
            if (r.pos >= r.len || (r.p[r.pos] != 0xc2 && r.p[r.pos] != 0xc3))
                goto done;
            ack = r.p[r.pos++] == 0xc3;
        } else if (MP_KEY_IS(&r, at, kn, "seq")) {
            bit = 8u;
            if (mp_uint(&r, UINT64_MAX, &seq) < 0)
                goto done;
        } else {
            goto done;
        }
        if (seen & bit)
            goto done;
        seen |= bit;
    }
    if ((seen & 3u) != 3u || r.pos != r.len)
        goto done;
    PyObject *name = PyUnicode_DecodeUTF8(topic, topic_len, NULL);
    if (name == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_UnicodeDecodeError))
            goto done;
        PyErr_Clear(); /* not UTF-8: msgspec refuses it, with its own words */
        goto done;
    }
    out = Py_BuildValue("NOKLn", name, ack ? Py_True : Py_False, (unsigned long long)seq, (long long)count,
                        (Py_ssize_t)records_at);
done:
    PyBuffer_Release(&buf);
    if (out == NULL && !PyErr_Occurred())
        out = Py_NewRef(Py_None);
    return out;
}

PyDoc_STRVAR(send_packed_doc,
"send_packed(topic, body, at, start, count, entry=None) -> (next, next_at, futures)\n\n"
"send_records() for a packed Produce (scan_produce() accepted `body`): records[start:count]\n"
"of the frame, the first of them at offset `at` of `body`, read from the msgpack as they are\n"
"written (no Python object per record; records without a timestamp share one clock reading,\n"
"taken at the call). It stops as send_records() does, at the end or before the first record\n"
"it cannot write now; returns that record's index and offset, and the futures of the records\n"
"written (none with an entry). ValueError: `body` is not what scan_produce() accepted.");

static PyObject *SendCore_send_packed(SendCore *c, PyObject *args) {
    PyObject *topic;
    Py_buffer buf;
    Py_ssize_t at, start, count;
    PyObject *entry = Py_None;
    if (!PyArg_ParseTuple(args, "Uy*nnn|O:send_packed", &topic, &buf, &at, &start, &count, &entry))
        return NULL;
    int fire = entry != Py_None;
    PyObject *futs = NULL, *out = NULL;
    /* Looked up once: a producer's topic states are never replaced (their tables grow in
     * place, TopicBase._bind), so the one of the first record is every record's. */
    TopicBase *t = NULL;
    if (at < 0 || at > buf.len || start < 0 || start > count) {
        PyErr_SetString(PyExc_ValueError, "send_packed: offset or index outside the frame");
        goto done;
    }
    futs = PyList_New(0);
    if (futs == NULL)
        goto done;
    mp_rd r = {(const unsigned char *)buf.buf, (size_t)buf.len, (size_t)at};
    int64_t now = -1; /* one clock reading for the call: the records arrived together */
    Py_ssize_t i = start;
    size_t rec_at = r.pos;
    for (; i < count && c->enabled; i++) {
        rec_at = r.pos;
        packed_rec rec;
        if (mp_record(&r, &rec) < 0) {
            PyErr_SetString(PyExc_ValueError, "send_packed: the body is not a packed Produce");
            goto done;
        }
        if (t == NULL && (t = topic_state(c, topic, 0)) == NULL) /* with fire, the entry is given */
            goto stop;
        /* No headers: their part of the body is the count 0, one byte. */
        int64_t blen = sl_varint_len(rec.klen) + (rec.klen > 0 ? rec.klen : 0) + sl_varint_len(rec.vlen) +
                       (rec.vlen > 0 ? rec.vlen : 0) + 1;
        PyObject *res = NULL;
        if (blen > t->max_body) {
            refuse(c, SL_ERR_MESSAGE_TOO_LARGE, t, blen);
        } else {
            int p = choose_partition(c, t, rec.partition, rec.key, rec.klen, blen);
            if (p >= 0) {
                int64_t ts = rec.timestamp;
                if (ts < 0)
                    ts = now >= 0 ? now : (now = now_ms());
                res = write_at(c, t, p, ts, rec.key, rec.klen, rec.value, rec.vlen, NULL, 0, blen, Py_None,
                               fire ? entry : NULL, 1);
            }
        }
        if (res == BUSY)
            break;
        if (res == NULL)
            goto stop;
        if (!fire && PyList_Append(futs, res) < 0) {
            Py_DECREF(res);
            goto done;
        }
        Py_DECREF(res);
        rec_at = r.pos;
    }
    out = Py_BuildValue("nnO", i, (Py_ssize_t)rec_at, futs);
    goto done;
stop:
    /* An error to raise: the caller sends this record through send(), which raises it again
     * where it is reported for this record alone. */
    if (PyErr_ExceptionMatches(PyExc_Exception)) {
        PyErr_Clear();
        out = Py_BuildValue("nnO", i, (Py_ssize_t)rec_at, futs);
    }
done:
    Py_XDECREF(t);
    Py_XDECREF(futs);
    PyBuffer_Release(&buf);
    return out;
}

static PyObject *SendCore_send(SendCore *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return do_send(c, args, nargs, kwnames, 0);
}

static PyObject *SendCore_produce(SendCore *c, PyObject *const *args, Py_ssize_t nargs, PyObject *kwnames) {
    return do_send(c, args, nargs, kwnames, 1);
}

static PyObject *SendCore_set_writers(SendCore *c, PyObject *arg) {
    if (!PyTuple_CheckExact(arg)) {
        PyErr_SetString(PyExc_TypeError, "set_writers(tuple of RingWriter)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(arg); i++) {
        if (!PyObject_TypeCheck(PyTuple_GET_ITEM(arg, i), &RingWriterType)) {
            PyErr_SetString(PyExc_TypeError, "set_writers(tuple of RingWriter)");
            return NULL;
        }
    }
    Py_XSETREF(c->writers, Py_NewRef(arg));
    Py_RETURN_NONE;
}

static PyObject *SendCore_add_pending(SendCore *c, PyObject *arg) {
    long long n = PyLong_AsLongLong(arg);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    c->pending += n;
    return PyLong_FromLongLong(c->pending);
}

static PyMethodDef SendCore_methods[] = {
    {"send", (PyCFunction)(void (*)(void))SendCore_send, METH_FASTCALL | METH_KEYWORDS,
     "send(topic, value, key=None, *, partition=None, headers=None, timestamp=None, on_delivery=None)"},
    {"produce", (PyCFunction)(void (*)(void))SendCore_produce, METH_FASTCALL | METH_KEYWORDS,
     "produce(topic, value, key=None, *, partition=None, headers=None, timestamp=None): send() without a future"},
    {"send_records", (PyCFunction)SendCore_send_records, METH_VARARGS, send_records_doc},
    {"send_packed", (PyCFunction)SendCore_send_packed, METH_VARARGS, send_packed_doc},
    {"set_writers", (PyCFunction)SendCore_set_writers, METH_O, "The request rings' writers, one per worker."},
    {"add_pending", (PyCFunction)SendCore_add_pending, METH_O,
     "Add n (negative: records completed) to the pending count; returns it."},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef SendCore_members[] = {
    {"enabled", T_INT, offsetof(SendCore, enabled), 0, "0: send() raises what check_open() raises"},
    {"pending", T_LONGLONG, offsetof(SendCore, pending), 0, "records sent and not yet completed"},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject SendCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shm._client.SendCore",
    .tp_basicsize = sizeof(SendCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The compiled send() of one Producer (see the module docstring).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)SendCore_init,
    .tp_dealloc = (destructor)SendCore_dealloc,
    .tp_traverse = (traverseproc)SendCore_traverse,
    .tp_clear = (inquiry)SendCore_clear,
    .tp_methods = SendCore_methods,
    .tp_members = SendCore_members,
};

/* ------------------------------------------------------------------------------------------
 * settle(): the completion thread's per-record work
 */

PyDoc_STRVAR(settle_doc,
"settle(fifo, partition, exc, base, timestamp, count, run_type, tally_type) -> None\n\n"
"One COMPLETION frame: the next `count` entries' records of a partition's pending FIFO (a\n"
"deque) have their outcome: the offsets from `base` (-1 under acks=0), or the exception `exc`.\n"
"A DeliveryFuture (a FutureBase) is resolved in place and its waiters run; a PendingRun (a\n"
"DeliveryGroup's run, `run_type`) and the produce() tally (`tally_type`) are settled through\n"
"their Python methods, once per run of them. IndexError: fewer records pending than `count`.");

/* Pending entries popped ahead of their turn, so that the loads of the futures they point to
 * overlap: by the time a keyed producer's completion comes, its futures were made on another
 * core long before, and the first load of each (its type) was most of settle's time (perf).
 * At most as many entries as records are left to settle are popped (each is at least one
 * record), and those a PendingRun's records leave over go back to the FIFO's front, in order. */
enum { SETTLE_AHEAD = 16 };

typedef struct {
    PyObject *dq, *popleft;
    PyObject *e[SETTLE_AHEAD]; /* e[at..n): popped, owned here, not yet handed out */
    int at, n;
} lookahead;

/* A future spans its GC header (16 bytes before it) to its last slot (56 after): two lines. */
static inline void prefetch_entry(const PyObject *x) {
    __builtin_prefetch((const char *)x - 16);
    __builtin_prefetch((const char *)x + 48);
}

/* The next entry (a new reference), or NULL with popleft's exception (IndexError: the FIFO is
 * empty). `records_left` bounds how many entries may be popped. */
static PyObject *la_next(lookahead *la, long long records_left) {
    if (la->at < la->n)
        return la->e[la->at++];
    la->at = la->n = 0;
    if (records_left <= 1) { /* nothing to overlap with: no length asked */
        PyObject *x = PyObject_CallNoArgs(la->popleft);
        if (x == NULL)
            return NULL;
        la->e[0] = x; /* handed out at once, its slot kept for la_unget */
        la->n = la->at = 1;
        return x;
    }
    Py_ssize_t len = PyObject_Length(la->dq);
    if (len < 0)
        return NULL;
    long long k = records_left < SETTLE_AHEAD ? records_left : SETTLE_AHEAD;
    if (k > len)
        k = len;
    if (k < 1)
        k = 1; /* an empty FIFO: popleft raises */
    for (long long j = 0; j < k; j++) {
        PyObject *x = PyObject_CallNoArgs(la->popleft);
        if (x == NULL)
            return NULL;
        prefetch_entry(x);
        la->e[la->n++] = x;
    }
    return la->e[la->at++];
}

/* Give back the last entry la_next handed out (and its reference); only right after a
 * la_next that returned it, which leaves its slot at e[at - 1]. */
static inline void la_unget(lookahead *la, PyObject *x) { la->e[--la->at] = x; }

/* Put the entries not handed out back at the FIFO's front, in their order; 0, or -1 with an
 * exception (then they are dropped). Callable with an exception set: it is kept. */
static int la_restore(lookahead *la) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    int r = 0;
    while (la->n > la->at) {
        PyObject *x = la->e[--la->n];
        if (r == 0) {
            PyObject *res = PyObject_CallMethod(la->dq, "appendleft", "O", x);
            if (res == NULL)
                r = -1;
            Py_XDECREF(res);
        }
        Py_DECREF(x);
    }
    la->at = la->n = 0;
    if (type != NULL)
        PyErr_Restore(type, value, tb); /* the first error wins */
    return r;
}

/* settle()'s work, shared with read_completions(): 0, or -1 with an exception set. */
static int settle_fifo(PyObject *dq, PyObject *part, PyObject *exc, long long base, long long ts, long long count,
                       PyObject *run_type, PyObject *tally_type) {
    int ok = exc == Py_None;
    long long step = (base >= 0 && ok) ? 1 : 0;
    long long off = step ? base : -1;
    lookahead la = {dq, PyObject_GetAttrString(dq, "popleft"), {NULL}, 0, 0};
    PyObject *tsobj = (ok && ts >= 0) ? PyLong_FromLongLong(ts) : NULL;
    if (la.popleft == NULL || (ok && ts >= 0 && tsobj == NULL))
        goto fail;
    long long i = 0;
    while (i < count) {
        PyObject *e = la_next(&la, count - i);
        if (e == NULL)
            goto fail;
        if (PyObject_TypeCheck(e, &FutureBaseType)) {
            FutureBase *f = (FutureBase *)e;
            if (Py_REFCNT(e) == 1 && (f->waiters == Py_None || f->waiters == NULL)) {
                /* Only the FIFO held it (send()'s caller dropped it) and no one waits: its
                 * outcome could never be seen (no weak references to it either), so no offset
                 * object is made just to be freed with it. */
                Py_DECREF(e);
                off += step;
                i++;
                continue;
            }
            if (ok) {
                if (tsobj != NULL)
                    Py_XSETREF(f->timestamp, Py_NewRef(tsobj)); /* LogAppendTime: the broker's */
                PyObject *o = PyLong_FromLongLong(off);
                if (o == NULL) {
                    Py_DECREF(e);
                    goto fail;
                }
                Py_XSETREF(f->outcome, o);
                off += step;
            } else {
                Py_XSETREF(f->outcome, Py_NewRef(exc));
            }
            if (f->waiters != Py_None && f->waiters != NULL) {
                PyObject *r = PyObject_CallMethod(e, "_wake", NULL);
                if (r == NULL) {
                    Py_DECREF(e);
                    goto fail;
                }
                Py_DECREF(r);
            }
            Py_DECREF(e);
            i++;
            continue;
        }
        if ((PyObject *)Py_TYPE(e) == tally_type) {
            /* Consecutive produce() records of the topic: one settle() for the run. */
            long long m = 1;
            while (i + m < count) {
                PyObject *nx = la_next(&la, count - i - m);
                if (nx == NULL) {
                    Py_DECREF(e);
                    goto fail;
                }
                if (nx != e) {
                    la_unget(&la, nx);
                    break;
                }
                Py_DECREF(nx);
                m++;
            }
            PyObject *r = PyObject_CallMethod(e, "settle", "LO", m, exc);
            Py_DECREF(e);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
            off += m * step;
            i += m;
            continue;
        }
        if ((PyObject *)Py_TYPE(e) == run_type) {
            PyObject *left_o = PyObject_GetAttrString(e, "left");
            long long left = left_o ? PyLong_AsLongLong(left_o) : -1;
            Py_XDECREF(left_o);
            if (left < 0) {
                Py_DECREF(e);
                if (!PyErr_Occurred())
                    PyErr_SetString(PyExc_ValueError, "a PendingRun with a negative count");
                goto fail;
            }
            long long m = count - i;
            PyObject *r;
            if (left > m) {
                /* The rest of the run waits for the next completion, in front of the entries
                 * popped after it. */
                PyObject *rest = PyLong_FromLongLong(left - m);
                int bad = rest == NULL || PyObject_SetAttrString(e, "left", rest) < 0 || la_restore(&la) < 0;
                Py_XDECREF(rest);
                r = bad ? NULL : PyObject_CallMethod(dq, "appendleft", "O", e);
                if (r == NULL) {
                    Py_DECREF(e);
                    goto fail;
                }
                Py_DECREF(r);
            } else {
                m = left;
            }
            PyObject *group = PyObject_GetAttrString(e, "group");
            Py_DECREF(e);
            if (group == NULL)
                goto fail;
            r = PyObject_CallMethod(group, "settle", "OLLLO", part, step ? off : -1LL, m, ts, exc);
            Py_DECREF(group);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
            off += m * step;
            i += m;
            continue;
        }
        Py_DECREF(e);
        PyErr_SetString(PyExc_TypeError, "settle(): an entry of unknown type in a pending FIFO");
        goto fail;
    }
    Py_DECREF(la.popleft);
    Py_XDECREF(tsobj);
    return la_restore(&la); /* a PendingRun's records took the place of entries popped ahead */
fail:
    la_restore(&la);
    Py_XDECREF(la.popleft);
    Py_XDECREF(tsobj);
    return -1;
}

static PyObject *settle(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 8) {
        PyErr_SetString(PyExc_TypeError, "settle() takes 8 arguments");
        return NULL;
    }
    long long base = PyLong_AsLongLong(args[3]);
    long long ts = PyLong_AsLongLong(args[4]);
    long long count = PyLong_AsLongLong(args[5]);
    if (PyErr_Occurred())
        return NULL;
    if (settle_fifo(args[0], args[1], args[2], base, ts, count, args[6], args[7]) < 0)
        return NULL;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------------------------------
 * read_completions(): the completion thread's walk of a completion ring
 *
 * The ring is shared with the worker, which may be broken or hostile, so nothing in it is
 * trusted: each frame's header and payload are copied out (memcpy into locals) after checking
 * that they lie inside [start, end) and inside the buffer, and only the copies are looked at,
 * so a frame rewritten meanwhile cannot change a value between its check and its use. Lengths
 * are u32 and positions u64: no sum overflows. The checks and their order are
 * shm.frames.iter_completions' (tests/unit/shm/test_read_completions.py holds one to the other).
 *
 * The mapping is held (a buffer export) only while frames are copied out, READ_BATCH at a time,
 * never while Python code runs: settling runs done-callbacks, and those must not find the
 * ring's view pinned.
 */

enum { READ_BATCH = 64 };

typedef struct {
    uint16_t topic_id;
    int16_t error_code;
    int32_t partition;
    int64_t base_offset, timestamp_ms;
    uint32_t count;
} completion_t;

/* What was wrong with the first corrupt frame: the message is made after the mapping is let go. */
enum {
    BAD_NONE, BAD_HEADER_CUT, BAD_LENGTH_PAST_END, BAD_COMPLETION_SIZE, BAD_TOPIC, BAD_PARTITION,
    BAD_COUNT_ZERO, BAD_CHUNK_DONE_SIZE, BAD_PADDING, BAD_TYPE,
};

typedef struct {
    int kind;
    uint64_t at; /* the frame's offset in the mapping */
    long long a, b, c;
} bad_frame;

/* Copy out and check the frames of map[*pos, end) until `out` holds READ_BATCH completions, the
 * region ends or a frame is corrupt (*bad filled, *pos left at it). A CHUNK_DONE sets *free_to
 * (and *freed).
 * Returns the completions copied, or -1 with an exception (a limit that is not an int). */
static int read_batch(const unsigned char *map, uint64_t data_end, uint64_t *pos, uint64_t end, PyObject *limits,
                      completion_t *out, uint64_t *free_to, int *freed, bad_frame *bad) {
    int n = 0;
    uint64_t p = *pos;
    Py_ssize_t ntopics = PyList_GET_SIZE(limits);
    while (p < end && n < READ_BATCH) {
        unsigned char hdr[SL_FRAME_HEADER_BYTES];
        bad->at = p;
        if (end - p < SL_FRAME_HEADER_BYTES) {
            bad->kind = BAD_HEADER_CUT;
            bad->a = (long long)(end - p);
            break;
        }
        memcpy(hdr, map + p, sizeof hdr);
        uint32_t plen = sl_u32(hdr), ftype = sl_u32(hdr + 4);
        uint64_t fend = p + sl_frame_size(plen);
        if (fend > end) {
            bad->kind = BAD_LENGTH_PAST_END;
            bad->a = plen;
            break;
        }
        if (ftype == SL_FRAME_COMPLETION) {
            if (plen != SL_COMPLETION_BYTES) {
                bad->kind = BAD_COMPLETION_SIZE;
                bad->a = plen;
                break;
            }
            unsigned char c[SL_COMPLETION_BYTES];
            memcpy(c, map + p + SL_FRAME_HEADER_BYTES, sizeof c);
            completion_t *f = &out[n];
            f->topic_id = sl_u16(c);
            memcpy(&f->error_code, c + 2, 2);
            f->partition = sl_i32(c + 4);
            f->base_offset = sl_i64(c + 8);
            f->timestamp_ms = sl_i64(c + 16);
            f->count = sl_u32(c + 24);
            if (f->topic_id >= ntopics) {
                bad->kind = BAD_TOPIC;
                bad->a = f->topic_id;
                bad->b = ntopics;
                break;
            }
            PyObject *lim = PyList_GET_ITEM(limits, f->topic_id);
            if (!PyLong_Check(lim)) {
                PyErr_SetString(PyExc_TypeError, "read_completions(): partition limits must be ints");
                return -1;
            }
            long long limit = PyLong_AsLongLong(lim); /* an int: runs no Python code */
            if (limit == -1 && PyErr_Occurred())
                return -1;
            if (f->partition < 0 || f->partition >= limit) {
                bad->kind = BAD_PARTITION;
                bad->a = f->partition;
                bad->b = f->topic_id;
                bad->c = limit;
                break;
            }
            if (f->count == 0) {
                bad->kind = BAD_COUNT_ZERO;
                break;
            }
            n++;
        } else if (ftype == SL_FRAME_CHUNK_DONE) {
            if (plen != SL_CHUNK_DONE_BYTES) {
                bad->kind = BAD_CHUNK_DONE_SIZE;
                bad->a = plen;
                break;
            }
            memcpy(free_to, map + p + SL_FRAME_HEADER_BYTES, sizeof *free_to);
            *freed = 1;
        } else if (ftype == SL_FRAME_PADDING) {
            if (fend != data_end) {
                bad->kind = BAD_PADDING;
                break;
            }
        } else {
            bad->kind = BAD_TYPE;
            bad->a = ftype;
            break;
        }
        p = fend;
    }
    *pos = p;
    return n;
}

static PyObject *bad_frame_text(const bad_frame *bad, uint64_t data_start) {
    unsigned long long off = (unsigned long long)(bad->at - data_start);
    switch (bad->kind) {
    case BAD_HEADER_CUT:
        return PyUnicode_FromFormat("frame at data offset %llu: frame header past the end (%lld bytes left)", off,
                                    bad->a);
    case BAD_LENGTH_PAST_END:
        return PyUnicode_FromFormat("frame at data offset %llu: payload length %lld runs past the committed end", off,
                                    bad->a);
    case BAD_COMPLETION_SIZE:
        return PyUnicode_FromFormat("frame at data offset %llu: COMPLETION payload of %lld bytes, expected %d", off,
                                    bad->a, SL_COMPLETION_BYTES);
    case BAD_TOPIC:
        return PyUnicode_FromFormat("frame at data offset %llu: topic id %lld unknown (%lld topics)", off, bad->a,
                                    bad->b);
    case BAD_PARTITION:
        return PyUnicode_FromFormat("frame at data offset %llu: partition %lld of topic id %lld outside [0, %lld)", off,
                                    bad->a, bad->b, bad->c);
    case BAD_COUNT_ZERO:
        return PyUnicode_FromFormat("frame at data offset %llu: COMPLETION with count 0", off);
    case BAD_CHUNK_DONE_SIZE:
        return PyUnicode_FromFormat("frame at data offset %llu: CHUNK_DONE payload of %lld bytes, expected %d", off,
                                    bad->a, SL_CHUNK_DONE_BYTES);
    case BAD_PADDING:
        return PyUnicode_FromFormat("frame at data offset %llu: padding frame does not end at the wrap", off);
    default:
        return PyUnicode_FromFormat("frame at data offset %llu: frame type %lld in a completion ring", off, bad->a);
    }
}

/* One completion's outcome to its partition's pending FIFO: pending[topic_id][partition]. */
static int settle_completion(const completion_t *f, PyObject *pending, PyObject *for_code, PyObject *run_type,
                             PyObject *tally_type) {
    PyObject *tid = PyLong_FromLong(f->topic_id);
    if (tid == NULL)
        return -1;
    PyObject *fifos = PyDict_GetItemWithError(pending, tid); /* borrowed: taken at once */
    if (fifos == NULL) {
        if (!PyErr_Occurred())
            PyErr_SetObject(PyExc_KeyError, tid);
        Py_DECREF(tid);
        return -1;
    }
    Py_DECREF(tid);
    PyObject *dq = PySequence_GetItem(fifos, f->partition);
    if (dq == NULL)
        return -1;
    PyObject *part = PyLong_FromLong(f->partition);
    PyObject *exc = f->error_code ? PyObject_CallFunction(for_code, "i", (int)f->error_code) : Py_NewRef(Py_None);
    int r = -1;
    if (part != NULL && exc != NULL)
        r = settle_fifo(dq, part, exc, f->base_offset, f->timestamp_ms, f->count, run_type, tally_type);
    Py_XDECREF(exc);
    Py_XDECREF(part);
    Py_DECREF(dq);
    return r;
}

PyDoc_STRVAR(read_completions_doc,
"read_completions(view, data_start, data_end, start, end, limits, pending, for_code, run_type,\n"
"                 tally_type) -> (free_to, records, error)\n\n"
"Walk the frames of a completion ring's region view[start:end) (SpscRing.region(); data_start\n"
"and data_end bound the ring's data area) and settle each COMPLETION: the next `count` records\n"
"of pending[topic_id][partition] (a deque, as settle() takes it) get their outcome; an error code\n"
"becomes the exception for_code(code) (KafkaError.for_code). limits[topic_id] is the topic's\n"
"partition count (a list of ints).\n\n"
"Every frame is checked as shm.frames.iter_completions checks it. At the first corrupt one the\n"
"walk stops, having settled the frames before it, and `error` says what was wrong and where\n"
"(\"frame at data offset N: ...\"); otherwise `error` is None. `free_to` is the position named\n"
"by the last CHUNK_DONE frame walked (a worker's are increasing, so freeing to the last is\n"
"freeing to each in turn), -1 if none; `records` is how many records were settled.\n"
"An error raised while settling (IndexError: fewer records pending than a completion names)\n"
"propagates.");

static PyObject *read_completions(PyObject *self, PyObject *const *args, Py_ssize_t nargs) {
    (void)self;
    if (nargs != 10) {
        PyErr_SetString(PyExc_TypeError, "read_completions() takes 10 arguments");
        return NULL;
    }
    PyObject *view = args[0], *limits = args[5], *pending = args[6], *for_code = args[7], *run_type = args[8],
             *tally_type = args[9];
    long long data_start = PyLong_AsLongLong(args[1]), data_end = PyLong_AsLongLong(args[2]);
    long long start = PyLong_AsLongLong(args[3]), end = PyLong_AsLongLong(args[4]);
    if (PyErr_Occurred())
        return NULL;
    if (!PyList_Check(limits) || !PyDict_Check(pending)) {
        PyErr_SetString(PyExc_TypeError, "read_completions(): limits must be a list and pending a dict");
        return NULL;
    }
    if (data_start < 0 || data_start > start || start > end || end > data_end) {
        PyErr_Format(PyExc_ValueError, "read_completions(): region [%lld, %lld) outside the data area [%lld, %lld)",
                     start, end, data_start, data_end);
        return NULL;
    }
    uint64_t pos = (uint64_t)start;
    uint64_t free_to = 0;
    int freed = 0;
    long long records = 0;
    bad_frame bad = {BAD_NONE, 0, 0, 0, 0};
    completion_t batch[READ_BATCH];
    for (;;) {
        Py_buffer b;
        if (PyObject_GetBuffer(view, &b, PyBUF_SIMPLE) < 0)
            return NULL;
        if (data_end > b.len) {
            PyBuffer_Release(&b);
            PyErr_Format(PyExc_ValueError, "read_completions(): data area ends at %lld, past the buffer's %zd bytes",
                         data_end, b.len);
            return NULL;
        }
        int n = read_batch(b.buf, (uint64_t)data_end, &pos, (uint64_t)end, limits, batch, &free_to, &freed, &bad);
        PyBuffer_Release(&b);
        if (n < 0)
            return NULL;
        for (int i = 0; i < n; i++) {
            if (settle_completion(&batch[i], pending, for_code, run_type, tally_type) < 0)
                return NULL;
            records += batch[i].count;
        }
        if (bad.kind != BAD_NONE || pos >= (uint64_t)end)
            break;
    }
    PyObject *error = bad.kind == BAD_NONE ? Py_NewRef(Py_None) : bad_frame_text(&bad, (uint64_t)data_start);
    PyObject *to = freed ? PyLong_FromUnsignedLongLong(free_to) : PyLong_FromLong(-1);
    if (error == NULL || to == NULL) {
        Py_XDECREF(error);
        Py_XDECREF(to);
        return NULL;
    }
    return Py_BuildValue("NLN", to, records, error);
}

/* ------------------------------------------------------------------------------------------
 * Socket ingest's acknowledgements: the results of a Produce, encoded here, not per record in
 * Python
 */

typedef struct {
    unsigned char *p;
    size_t len, cap;
} obuf;

static int ob_room(obuf *b, size_t n) {
    if (b->len + n <= b->cap)
        return 0;
    size_t cap = b->cap ? b->cap : 256;
    while (cap < b->len + n)
        cap *= 2;
    unsigned char *p = PyMem_Realloc(b->p, cap);
    if (p == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    b->p = p;
    b->cap = cap;
    return 0;
}

static void ob_be(obuf *b, unsigned char tag, uint64_t v, int bytes) {
    b->p[b->len++] = tag;
    for (int i = bytes - 1; i >= 0; i--)
        b->p[b->len++] = (unsigned char)(v >> (8 * i));
}

/* msgpack integers in their shortest form, as msgspec writes them. */
static int mp_int(obuf *b, long long v) {
    if (ob_room(b, 9) < 0)
        return -1;
    if (v >= 0) {
        uint64_t u = (uint64_t)v;
        if (u < 128)
            b->p[b->len++] = (unsigned char)u;
        else if (u <= 0xff)
            ob_be(b, 0xcc, u, 1);
        else if (u <= 0xffff)
            ob_be(b, 0xcd, u, 2);
        else if (u <= 0xffffffffu)
            ob_be(b, 0xce, u, 4);
        else
            ob_be(b, 0xcf, u, 8);
    } else if (v >= -32) {
        b->p[b->len++] = (unsigned char)(int8_t)v;
    } else if (v >= INT8_MIN) {
        ob_be(b, 0xd0, (uint64_t)v, 1);
    } else if (v >= INT16_MIN) {
        ob_be(b, 0xd1, (uint64_t)v, 2);
    } else if (v >= INT32_MIN) {
        ob_be(b, 0xd2, (uint64_t)v, 4);
    } else {
        ob_be(b, 0xd3, (uint64_t)v, 8);
    }
    return 0;
}

static int mp_str(obuf *b, const char *s, Py_ssize_t n) {
    if (ob_room(b, (size_t)n + 5) < 0)
        return -1;
    if (n < 32)
        b->p[b->len++] = (unsigned char)(0xa0 | n);
    else if (n <= 0xff)
        ob_be(b, 0xd9, (uint64_t)n, 1);
    else if (n <= 0xffff)
        ob_be(b, 0xda, (uint64_t)n, 2);
    else
        ob_be(b, 0xdb, (uint64_t)n, 4);
    memcpy(b->p + b->len, s, (size_t)n);
    b->len += (size_t)n;
    return 0;
}

#define MP_KEY(b, lit) mp_str((b), (lit), (Py_ssize_t)(sizeof(lit) - 1))

/* One RecordResult map, its fields in shm.control.RecordResult's order. */
static int mp_result(obuf *b, long long partition, long long offset, long long ts, long long code, PyObject *name) {
    Py_ssize_t nlen;
    const char *n = PyUnicode_AsUTF8AndSize(name, &nlen);
    if (n == NULL || ob_room(b, 1) < 0)
        return -1;
    b->p[b->len++] = 0x85; /* fixmap of 5 */
    if (MP_KEY(b, "partition") < 0 || mp_int(b, partition) < 0 || MP_KEY(b, "offset") < 0 || mp_int(b, offset) < 0 ||
        MP_KEY(b, "timestamp") < 0 || mp_int(b, ts) < 0 || MP_KEY(b, "error_code") < 0 || mp_int(b, code) < 0 ||
        MP_KEY(b, "error_name") < 0 || mp_str(b, n, nlen) < 0)
        return -1;
    return 0;
}

static PyObject *s_none_name; /* "NONE", interned at init */

/* One slot of ack_results: a settled future, or (partition, error_code, error_name). Returns 0
 * for a success, 1 for a failure, -1 with an exception. */
static int mp_slot(obuf *b, PyObject *s, PyObject *describe) {
    if (PyObject_TypeCheck(s, &FutureBaseType)) {
        FutureBase *f = (FutureBase *)s;
        long long part = PyLong_AsLongLong(f->partition);
        if (part == -1 && PyErr_Occurred())
            return -1;
        if (PyLong_Check(f->outcome)) {
            long long off = PyLong_AsLongLong(f->outcome), ts = PyLong_AsLongLong(f->timestamp);
            if ((off == -1 || ts == -1) && PyErr_Occurred())
                return -1;
            return mp_result(b, part, off, ts, 0, s_none_name);
        }
        /* A failure (rare), or no outcome yet (a deadline came first): describe(exc or None)
         * says its code and name. */
        PyObject *d = PyObject_CallOneArg(describe, f->outcome);
        if (d == NULL)
            return -1;
        long long code = -1;
        int ok = PyTuple_Check(d) && PyTuple_GET_SIZE(d) == 2 && PyUnicode_Check(PyTuple_GET_ITEM(d, 1));
        if (ok) {
            code = PyLong_AsLongLong(PyTuple_GET_ITEM(d, 0));
            ok = !(code == -1 && PyErr_Occurred());
        }
        int r = ok ? mp_result(b, part, -1, -1, code, PyTuple_GET_ITEM(d, 1)) : -1;
        if (!ok && !PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError, "ack_results: describe() must return (code, name)");
        Py_DECREF(d);
        return r < 0 ? -1 : 1;
    }
    if (PyTuple_Check(s) && PyTuple_GET_SIZE(s) == 3 && PyUnicode_Check(PyTuple_GET_ITEM(s, 2))) {
        long long part = PyLong_AsLongLong(PyTuple_GET_ITEM(s, 0)), code = PyLong_AsLongLong(PyTuple_GET_ITEM(s, 1));
        if ((part == -1 || code == -1) && PyErr_Occurred())
            return -1;
        return mp_result(b, part, -1, -1, code, PyTuple_GET_ITEM(s, 2)) < 0 ? -1 : 1;
    }
    PyErr_SetString(PyExc_TypeError, "ack_results: a slot must be a future or (partition, error_code, error_name)");
    return -1;
}

PyDoc_STRVAR(ack_results_doc,
"ack_results(slots, describe) -> (bytes, failed)\n\n"
"The msgpack array of a ProduceAck's results (shm.control.RecordResult maps, encoded as msgspec\n"
"encodes them), one per slot: a DeliveryFuture (success: its partition, offset and timestamp;\n"
"failure: describe(exception) -> (error_code, error_name); no outcome yet: describe(None)), or\n"
"a tuple (partition, error_code, error_name) for a record refused before it reached a ring;\n"
"and how many of them failed. Wrap the bytes in msgspec.Raw as ProduceAck.results.");

static PyObject *ack_results(PyObject *self, PyObject *args) {
    (void)self;
    PyObject *slots, *describe;
    if (!PyArg_ParseTuple(args, "O!O:ack_results", &PyList_Type, &slots, &describe))
        return NULL;
    Py_ssize_t n = PyList_GET_SIZE(slots);
    obuf b = {NULL, 0, 0};
    if (ob_room(&b, 5 + (size_t)n * 72) < 0)
        return NULL;
    if (n < 16)
        b.p[b.len++] = (unsigned char)(0x90 | n);
    else if (n <= 0xffff)
        ob_be(&b, 0xdc, (uint64_t)n, 2);
    else
        ob_be(&b, 0xdd, (uint64_t)n, 4);
    Py_ssize_t failed = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *s = PyList_GET_ITEM(slots, i);
        Py_INCREF(s); /* describe() is Python: the list may change under it */
        int r = mp_slot(&b, s, describe);
        Py_DECREF(s);
        if (r < 0 || PyList_GET_SIZE(slots) != n) {
            if (r >= 0)
                PyErr_SetString(PyExc_RuntimeError, "ack_results: the slots changed while they were encoded");
            PyMem_Free(b.p);
            return NULL;
        }
        failed += r;
    }
    PyObject *out = Py_BuildValue("y#n", (const char *)b.p, (Py_ssize_t)b.len, failed);
    PyMem_Free(b.p);
    return out;
}

PyDoc_STRVAR(tails_doc,
"tails(futures) -> list\n\n"
"The last DeliveryFuture of each partition among `futures` (in order of first appearance). A\n"
"partition's futures are settled in the order they were sent, so its last is settled last:\n"
"watching these is watching them all.");

static PyObject *tails(PyObject *self, PyObject *arg) {
    (void)self;
    if (!PyList_Check(arg)) {
        PyErr_SetString(PyExc_TypeError, "tails(list of futures)");
        return NULL;
    }
    PyObject *last = PyDict_New(); /* partition -> future; dicts keep insertion order */
    if (last == NULL)
        return NULL;
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(arg); i++) {
        PyObject *f = PyList_GET_ITEM(arg, i);
        if (!PyObject_TypeCheck(f, &FutureBaseType)) {
            PyErr_SetString(PyExc_TypeError, "tails(list of futures)");
            Py_DECREF(last);
            return NULL;
        }
        if (PyDict_SetItem(last, ((FutureBase *)f)->partition, f) < 0) {
            Py_DECREF(last);
            return NULL;
        }
    }
    PyObject *out = PyDict_Values(last);
    Py_DECREF(last);
    return out;
}

/* ------------------------------------------------------------------------------------------ */

static PyMethodDef methods[] = {
    {"ack_results", ack_results, METH_VARARGS, ack_results_doc},
    {"tails", tails, METH_O, tails_doc},
    {"scan_produce", scan_produce, METH_VARARGS, scan_produce_doc},
    {"murmur2", py_murmur2, METH_O, murmur2_doc},
    {"partitions", py_partitions, METH_VARARGS, partitions_doc},
    {"settle", (PyCFunction)(void (*)(void))settle, METH_FASTCALL, settle_doc},
    {"read_completions", (PyCFunction)(void (*)(void))read_completions, METH_FASTCALL, read_completions_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "shm._client",
    "The client's per-record path, compiled: murmur2, the ring writer, the future's slots, "
    "send(), socket ingest's packed Produce, and the completion thread's walk and settling. "
    "Serves shm.producer, shm.ring, shm.futures, shm.topic, shm.completions and daemon.ingest.",
    -1, methods, NULL, NULL, NULL, NULL,
};

PyMODINIT_FUNC PyInit__client(void) {
    if (PyType_Ready(&RingWriterType) < 0 || PyType_Ready(&FutureBaseType) < 0 || PyType_Ready(&TopicBaseType) < 0 ||
        PyType_Ready(&SendCoreType) < 0)
        return NULL;
    s_value = PyUnicode_InternFromString("value");
    s_key = PyUnicode_InternFromString("key");
    s_partition = PyUnicode_InternFromString("partition");
    s_headers = PyUnicode_InternFromString("headers");
    s_timestamp = PyUnicode_InternFromString("timestamp");
    s_none_name = PyUnicode_InternFromString("NONE");
    if (!s_none_name || !s_value || !s_key || !s_partition || !s_headers || !s_timestamp)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObjectRef(m, "RingWriter", (PyObject *)&RingWriterType) < 0 ||
        PyModule_AddObjectRef(m, "FutureBase", (PyObject *)&FutureBaseType) < 0 ||
        PyModule_AddObjectRef(m, "TopicBase", (PyObject *)&TopicBaseType) < 0 ||
        PyModule_AddObjectRef(m, "SendCore", (PyObject *)&SendCoreType) < 0) {
        Py_DECREF(m);
        return NULL;
    }
    struct {
        const char *name;
        long value;
    } consts[] = {
        {"CLAIM_FULL", CLAIM_FULL}, {"CLAIM_CORRUPT", CLAIM_CORRUPT}, {"CLAIM_TOO_BIG", CLAIM_TOO_BIG},
        {"RING_HEADER_BYTES", SL_RING_HEADER_BYTES}, {"RING_HEAD_OFFSET", SL_RING_HEAD_OFFSET},
        {"RING_FULL_COUNT_OFFSET", SL_RING_FULL_COUNT_OFFSET}, {"RING_TAIL_OFFSET", SL_RING_TAIL_OFFSET},
        {"RING_READER_SLEEPING_OFFSET", SL_RING_READER_SLEEPING_OFFSET},
        {"RECORD_PREFIX_BYTES", SL_RECORD_PREFIX_BYTES},
        {"FRAME_RECORD", SL_FRAME_RECORD}, {"FRAME_PADDING", SL_FRAME_PADDING},
    };
    for (size_t i = 0; i < sizeof consts / sizeof consts[0]; i++) {
        if (PyModule_AddIntConstant(m, consts[i].name, consts[i].value) < 0) {
            Py_DECREF(m);
            return NULL;
        }
    }
    return m;
}
