/* distribution._lookup: the Engine's routing table chunks, packed, and its searches, in C.
 *
 * The table is a distribution.table.RouteTable, a tuple (tops, index, chunks, ...): tops is a
 * list of bytes (the keys between chunks), index a gap-only Chunk over the same keys (searched
 * instead of the list), chunks a list of Chunk objects, one more than tops.
 *
 * A Chunk packs a sorted run of boundary keys and the slots between them:
 *
 *   prefix[i]   big-endian value of bound i's first 8 bytes, zero padded: a search compares
 *               these, and only on a tie the whole keys, so it reads one contiguous array;
 *   offset[i]   bound i is arena[offset[i]:offset[i + 1]] (the key arena);
 *   ids, groups, states   slot i's route (group 0 marks a gap), slot i covering
 *               [bound i - 1, bound i), the chunk's lower and upper edges standing in at the ends.
 *
 * A Route object exists only when a lookup returns one. A Chunk never changes once built: a
 * writer builds new chunks and swaps a new table in, so readers take no lock.
 *
 * IdIndex maps route ids to the prefix of their start (open addressing, linear probing): the
 * Engine finds a catalog route by id without keeping a Route per id. Only writers use it, under
 * the Engine's lock.
 *
 * Bad input (a table that is not of that shape, a key that is not bytes) raises TypeError,
 * ValueError or SystemError; it never reads outside an object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include "structmember.h"
#include <stdint.h>
#include <string.h>
#ifdef _WIN32
#include <windows.h>
#else
#include <time.h>
#endif

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch(address)
#else
#define PREFETCH(address) ((void)(address))
#endif

/* distribution.types.Route and RouteDescriptor, RouteState members by value, the int 0. */
static PyTypeObject *route_type;
static PyTypeObject *descriptor_type;
static PyObject *state_members[256];
static PyTypeObject *state_type;
/* distribution.types.MAX_ROUTE_KEY_BYTES. */
static Py_ssize_t max_key_bytes;

static int
not_bytes(PyObject *value)
{
    PyErr_Format(PyExc_TypeError, "routing table key must be bytes, got %.200s",
                 Py_TYPE(value)->tp_name);
    return -1;
}

/* Compare two bytes objects as Python does: memcmp of the common prefix, then length. */
static inline int
compare_raw(const char *a, Py_ssize_t la, const char *b, Py_ssize_t lb)
{
    int r = memcmp(a, b, (size_t)(la < lb ? la : lb));
    if (r != 0) {
        return r;
    }
    return (la > lb) - (la < lb);
}

static inline int
compare_bytes(PyObject *a, PyObject *b)
{
    return compare_raw(PyBytes_AS_STRING(a), PyBytes_GET_SIZE(a), PyBytes_AS_STRING(b),
                       PyBytes_GET_SIZE(b));
}

static inline uint64_t
prefix_raw(const char *key, Py_ssize_t n)
{
    const unsigned char *s = (const unsigned char *)key;
#if defined(__GNUC__) || defined(__clang__)
    if (n >= 8) {
        uint64_t value;
        memcpy(&value, s, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        value = __builtin_bswap64(value);
#endif
        return value;
    }
    if (n >= 4) {
        /* Bytes 0-3, and the last four shifted into place (overlapping bytes agree). */
        uint32_t head, tail;
        memcpy(&head, s, 4);
        memcpy(&tail, s + n - 4, 4);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
        head = __builtin_bswap32(head);
        tail = __builtin_bswap32(tail);
#endif
        return (uint64_t)head << 32 | (uint64_t)tail << (8 * (8 - n));
    }
#endif
    uint64_t value = 0;
    for (Py_ssize_t i = 0; i < 8; i++) {
        value = (value << 8) | (i < n ? s[i] : 0);
    }
    return value;
}

static inline uint64_t
prefix_of(PyObject *key)
{
    return prefix_raw(PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key));
}

/* -- Chunk ------------------------------------------------------------------------------- */

/* Bounds per block of the prefix summary: 32 prefixes are four cache lines. */
#define BLOCK 32

typedef struct {
    PyObject_HEAD
    Py_ssize_t n;          /* bounds; the chunk has n + 1 slots */
    uint64_t *summary;     /* (n + BLOCK - 1) / BLOCK: the first prefix of each block */
    PyObject *lower;       /* bytes, or NULL: the start of the key space */
    PyObject *upper;       /* bytes, or NULL: unbounded */
    uint64_t *prefix;      /* n */
    uint64_t *ids;         /* n + 1 */
    uint64_t *groups;      /* n + 1; 0 marks a gap */
    Py_ssize_t *offset;    /* n + 1 */
    unsigned char *states; /* n + 1 */
    char *arena;           /* offset[n] bytes */
    void *memory;          /* the one allocation holding every array */
    size_t size;           /* its bytes */
} Chunk;

static PyTypeObject ChunkType;

static inline Py_ssize_t
summary_size(Py_ssize_t n)
{
    return (n + BLOCK - 1) / BLOCK;
}

/* A chunk of n bounds with arena bytes of keys, its arrays allocated, not filled (fill the
 * prefixes, then call chunk_summarize). */
/* Freeing a large block gives its pages back to the system, which takes about as long as
 * touching them: a million routes' arrays take 15-25 ms to free. Blocks of at least
 * LARGE_BLOCK bytes come from the raw allocator (usable without the GIL) and are freed with
 * the GIL let go, so that dropping a large table does not stall the lookups of other threads
 * (while the GIL is let go, a thread that asked for it takes it). */
#define LARGE_BLOCK ((size_t)1 << 15)

static void *
block_alloc(size_t size, int zeroed)
{
    if (size < LARGE_BLOCK) {
        return zeroed ? PyMem_Calloc(size, 1) : PyMem_Malloc(size);
    }
    return zeroed ? PyMem_RawCalloc(size, 1) : PyMem_RawMalloc(size);
}

/* Free a block of size bytes from block_alloc; called holding the GIL. */
static void
block_free(void *block, size_t size)
{
    if (size < LARGE_BLOCK) {
        PyMem_Free(block);
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    PyMem_RawFree(block);
    Py_END_ALLOW_THREADS
}

static Chunk *
chunk_alloc(Py_ssize_t n, Py_ssize_t arena)
{
    size_t words = (size_t)summary_size(n) + (size_t)n + 3 * ((size_t)n + 1);
    Chunk *chunk = PyObject_New(Chunk, &ChunkType);
    if (chunk == NULL) {
        return NULL;
    }
    chunk->size = words * 8 + ((size_t)n + 1) + (size_t)arena + 1;
    chunk->memory = block_alloc(chunk->size, 0);
    chunk->lower = NULL;
    chunk->upper = NULL;
    chunk->n = n;
    if (chunk->memory == NULL) {
        Py_DECREF(chunk);
        PyErr_NoMemory();
        return NULL;
    }
    uint64_t *words_at = chunk->memory;
    chunk->summary = words_at;
    words_at += summary_size(n);
    chunk->prefix = words_at;
    chunk->ids = words_at + n;
    chunk->groups = chunk->ids + n + 1;
    chunk->offset = (Py_ssize_t *)(chunk->groups + n + 1);
    chunk->states = (unsigned char *)(chunk->offset + n + 1);
    chunk->arena = (char *)(chunk->states + n + 1);
    return chunk;
}

static void
chunk_dealloc(Chunk *chunk)
{
    Py_XDECREF(chunk->lower);
    Py_XDECREF(chunk->upper);
    if (chunk->memory != NULL) {
        block_free(chunk->memory, chunk->size);
    }
    PyObject_Free(chunk);
}

static void
chunk_summarize(Chunk *chunk)
{
    for (Py_ssize_t j = 0; j < summary_size(chunk->n); j++) {
        chunk->summary[j] = chunk->prefix[j * BLOCK];
    }
}

static inline const char *
bound_at(const Chunk *chunk, Py_ssize_t i, Py_ssize_t *length)
{
    *length = chunk->offset[i + 1] - chunk->offset[i];
    return chunk->arena + chunk->offset[i];
}

/* <0, 0 or >0 as the key (prefix kp) compares with bound i. */
static inline int
key_vs_bound(const Chunk *chunk, Py_ssize_t i, uint64_t kp, const char *key, Py_ssize_t length)
{
    uint64_t bp = chunk->prefix[i];
    if (kp != bp) {
        return kp < bp ? -1 : 1;
    }
    Py_ssize_t bl;
    const char *bound = bound_at(chunk, i, &bl);
    return compare_raw(key, length, bound, bl);
}

/* bisect_right (right) or bisect_left of the key in the chunk's bounds.
 *
 * The prefixes are searched as a two-level B-tree: the summary (the first prefix of each block of
 * BLOCK, a few cache lines requested at once) bounds the blocks the key's prefix can fall in,
 * then a bisect runs over those (usually one block: four more lines, requested at once). So a
 * search waits on memory about twice, where a bisect over the whole array would wait at each of
 * its first steps. Whole keys are compared only where prefixes tie. */
static void
chunk_prefetch_summary(const Chunk *chunk)
{
    for (Py_ssize_t j = 0; j < summary_size(chunk->n); j += 8) {
        PREFETCH(chunk->summary + j);
    }
}

/* The first level: [*lo, *hi), the bounds the key (prefix kp) can fall between, from the
 * summary; their first cache lines are requested. Bounds before *lo are all below the key,
 * bounds from *hi on all above it. */
static void
chunk_narrow(const Chunk *chunk, uint64_t kp, Py_ssize_t *lo_out, Py_ssize_t *hi_out)
{
    Py_ssize_t n = chunk->n, blocks = summary_size(n);
    const uint64_t *summary = chunk->summary;
    /* below: blocks whose first prefix is < kp; through: those whose first prefix is <= kp. */
    Py_ssize_t lo = 0, hi = blocks;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (summary[mid] < kp) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    Py_ssize_t below = lo;
    hi = blocks;
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        if (summary[mid] <= kp) {
            lo = mid + 1;
        }
        else {
            hi = mid;
        }
    }
    Py_ssize_t through = lo;
    /* Block below - 1 may end with the key's prefix; blocks before it lie below the key. */
    *lo_out = below ? (below - 1) * BLOCK : 0;
    *hi_out = through * BLOCK < n ? through * BLOCK : n;
    for (Py_ssize_t i = *lo_out; i < *hi_out && i < *lo_out + BLOCK; i += 8) {
        PREFETCH(chunk->prefix + i);
    }
}

/* The second level: bisect_right (right) or bisect_left of the key within [lo, hi). */
static Py_ssize_t
chunk_finish(const Chunk *chunk, uint64_t kp, const char *key, Py_ssize_t length, int right,
             Py_ssize_t lo, Py_ssize_t hi)
{
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        int c = key_vs_bound(chunk, mid, kp, key, length);
        if (c < 0 || (!right && c == 0)) {
            hi = mid;
        }
        else {
            lo = mid + 1;
        }
    }
    return lo;
}

/* bisect_right (right) or bisect_left of the key in the chunk's bounds.
 *
 * The prefixes are searched as a two-level B-tree: the summary (the first prefix of each block of
 * BLOCK, a few cache lines requested at once) bounds the blocks the key's prefix can fall in,
 * then a bisect runs over those (usually one block: four more lines, requested at once). So a
 * search waits on memory about twice, where a bisect over the whole array would wait at each of
 * its first steps. Whole keys are compared only where prefixes tie. */
static Py_ssize_t
chunk_bisect(const Chunk *chunk, uint64_t kp, const char *key, Py_ssize_t length, int right)
{
    Py_ssize_t lo, hi;
    chunk_prefetch_summary(chunk);
    chunk_narrow(chunk, kp, &lo, &hi);
    return chunk_finish(chunk, kp, key, length, right, lo, hi);
}

/* The number of a[0 .. len) at most x (a sorted, len >= 1): a bisect whose steps are
 * conditional moves, with no branch to mispredict. */
static inline Py_ssize_t
count_at_most(const uint64_t *a, Py_ssize_t len, uint64_t x)
{
    const uint64_t *base = a;
    while (len > 1) {
        Py_ssize_t half = len / 2;
        base = base[half] <= x ? base + half : base;
        len -= half;
    }
    return (base - a) + (*base <= x);
}

/* The fast search, its first level: [*lo, *hi), the block holding the last prefix <= kp (found
 * in the summary), its cache lines requested; *lo == *hi == 0 if every prefix is above kp. */
static inline void
chunk_block(const Chunk *chunk, uint64_t kp, Py_ssize_t *lo, Py_ssize_t *hi)
{
    Py_ssize_t n = chunk->n;
    Py_ssize_t j = n ? count_at_most(chunk->summary, summary_size(n), kp) : 0;
    if (j == 0) {
        *lo = *hi = 0;
        return;
    }
    *lo = (j - 1) * BLOCK;
    *hi = *lo + BLOCK < n ? *lo + BLOCK : n;
    for (Py_ssize_t i = *lo; i < *hi; i += 8) {
        PREFETCH(chunk->prefix + i);
    }
}

/* The fast search, its second level: bisect_right of the key, its block [lo, hi) known. The
 * prefixes at most kp are counted; only if the last of them equals kp (a bound the key ties
 * with on 8 bytes) are whole keys compared, by chunk_bisect. */
static inline Py_ssize_t
chunk_place(const Chunk *chunk, uint64_t kp, const char *key, Py_ssize_t length, Py_ssize_t lo,
            Py_ssize_t hi)
{
    if (lo == hi) {
        return 0;
    }
    /* The block's first prefix is at most kp: r > lo. */
    const uint64_t *prefix = chunk->prefix;
    Py_ssize_t r = lo + count_at_most(prefix + lo, hi - lo, kp);
    if (prefix[r - 1] != kp) {
        return r;
    }
    if (prefix[lo] == kp) {
        /* The bounds of prefix kp may begin in an earlier block. */
        return chunk_bisect(chunk, kp, key, length, 1);
    }
    /* They begin after lo: found by counting the prefixes below kp, then searched on the whole
     * keys (a key that extends a bound, as keys of a route often extend its start). */
    Py_ssize_t l = lo + 1;
    while (l < r - 1 && prefix[l] < kp) {
        l++;
    }
    return chunk_finish(chunk, kp, key, length, 1, l, r);
}

/* bisect_right of the key in the chunk: chunk_bisect's answer, on the fast path. */
static inline Py_ssize_t
chunk_find(const Chunk *chunk, uint64_t kp, const char *key, Py_ssize_t length)
{
    Py_ssize_t lo, hi;
    chunk_prefetch_summary(chunk);
    chunk_block(chunk, kp, &lo, &hi);
    return chunk_place(chunk, kp, key, length, lo, hi);
}

static PyObject *
bound_object(const Chunk *chunk, Py_ssize_t i)
{
    Py_ssize_t length;
    const char *bound = bound_at(chunk, i, &length);
    return PyBytes_FromStringAndSize(bound, length);
}

/* The Route in slot i (load 0), or None for a gap: a new reference, or NULL. */
static PyObject *
chunk_route(const Chunk *chunk, Py_ssize_t i)
{
    if (chunk->groups[i] == 0) {
        Py_RETURN_NONE;
    }
    PyObject *route = route_type->tp_alloc(route_type, 6);
    if (route == NULL) {
        return NULL;
    }
    PyObject *start = i ? bound_object(chunk, i - 1) : Py_NewRef(chunk->lower);
    PyObject *end = i < chunk->n ? bound_object(chunk, i)
                                 : Py_NewRef(chunk->upper ? chunk->upper : Py_None);
    PyObject *id = PyLong_FromUnsignedLongLong(chunk->ids[i]);
    PyObject *group = PyLong_FromUnsignedLongLong(chunk->groups[i]);
    PyTuple_SET_ITEM(route, 0, id);
    PyTuple_SET_ITEM(route, 1, start);
    PyTuple_SET_ITEM(route, 2, end);
    PyTuple_SET_ITEM(route, 3, group);
    PyTuple_SET_ITEM(route, 4, Py_NewRef(state_members[chunk->states[i]]));
    PyTuple_SET_ITEM(route, 5, PyLong_FromLong(0));
    if (id == NULL || start == NULL || end == NULL || group == NULL) {
        Py_DECREF(route);
        return NULL;
    }
    return route;
}

/* Read a u64 from an exact int; -1 with no exception set if it is not one or out of range. */
static int
u64_of(PyObject *value, uint64_t *out)
{
    if (!PyLong_CheckExact(value)) {
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    *out = (uint64_t)v;
    return 0;
}

/* A state's value if value is a RouteState member or an int naming one, else -1. */
static int
state_of(PyObject *value)
{
    if (Py_TYPE(value) != state_type && !PyLong_CheckExact(value)) {
        return -1;
    }
    long v = PyLong_AsLong(value);
    if (v == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return -1;
    }
    return v >= 0 && v < 256 && state_members[v] != NULL ? (int)v : -1;
}

/* Fill a new chunk from n bound objects and n + 1 slots given as arrays. */
static Chunk *
chunk_from_arrays(Py_ssize_t n, PyObject *const *bounds, const uint64_t *ids,
                  const uint64_t *groups, const unsigned char *states, PyObject *lower,
                  PyObject *upper)
{
    Py_ssize_t arena = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        arena += PyBytes_GET_SIZE(bounds[i]);
    }
    Chunk *chunk = chunk_alloc(n, arena);
    if (chunk == NULL) {
        return NULL;
    }
    Py_ssize_t at = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        Py_ssize_t length = PyBytes_GET_SIZE(bounds[i]);
        chunk->offset[i] = at;
        chunk->prefix[i] = prefix_of(bounds[i]);
        memcpy(chunk->arena + at, PyBytes_AS_STRING(bounds[i]), (size_t)length);
        at += length;
    }
    chunk->offset[n] = at;
    chunk_summarize(chunk);
    memcpy(chunk->ids, ids, ((size_t)n + 1) * sizeof(uint64_t));
    memcpy(chunk->groups, groups, ((size_t)n + 1) * sizeof(uint64_t));
    memcpy(chunk->states, states, (size_t)n + 1);
    chunk->lower = lower == Py_None ? NULL : Py_XNewRef(lower);
    chunk->upper = upper == Py_None ? NULL : Py_XNewRef(upper);
    return chunk;
}

/* Read slot (None or a Route-like tuple) into ids/groups/states[i]; 0, or -1 with ValueError. */
static int
read_slot(PyObject *slot, Py_ssize_t i, uint64_t *ids, uint64_t *groups, unsigned char *states)
{
    if (slot == Py_None) {
        ids[i] = groups[i] = 0;
        states[i] = 0;
        return 0;
    }
    int state = -1;
    if (PyTuple_Check(slot) && PyTuple_GET_SIZE(slot) >= 5 &&
        u64_of(PyTuple_GET_ITEM(slot, 0), &ids[i]) == 0 &&
        u64_of(PyTuple_GET_ITEM(slot, 3), &groups[i]) == 0) {
        state = state_of(PyTuple_GET_ITEM(slot, 4));
    }
    if (state < 0 || groups[i] == 0) {
        PyErr_SetString(PyExc_ValueError, "a chunk's slot must be None or a valid route");
        return -1;
    }
    states[i] = (unsigned char)state;
    return 0;
}

static PyObject *
chunk_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    PyObject *bounds, *slots, *lower, *upper;
    static char *names[] = {"bounds", "slots", "lower", "upper", NULL};
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "O!O!OO:Chunk", names, &PyList_Type, &bounds,
                                     &PyList_Type, &slots, &lower, &upper)) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(bounds);
    if (PyList_GET_SIZE(slots) != n + 1) {
        PyErr_SetString(PyExc_ValueError, "a chunk has one slot more than bounds");
        return NULL;
    }
    if ((lower != Py_None && !PyBytes_CheckExact(lower)) ||
        (upper != Py_None && !PyBytes_CheckExact(upper))) {
        PyErr_SetString(PyExc_TypeError, "a chunk's edges must be bytes or None");
        return NULL;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *bound = PyList_GET_ITEM(bounds, i);
        if (!PyBytes_CheckExact(bound)) {
            not_bytes(bound);
            return NULL;
        }
        PyObject *before = i ? PyList_GET_ITEM(bounds, i - 1) : lower;
        if (before != Py_None && compare_bytes(before, bound) >= 0) {
            PyErr_SetString(PyExc_ValueError, "a chunk's bounds must strictly increase");
            return NULL;
        }
    }
    if (upper != Py_None && (n ? PyList_GET_ITEM(bounds, n - 1) : lower) != Py_None &&
        compare_bytes(n ? PyList_GET_ITEM(bounds, n - 1) : lower, upper) >= 0) {
        PyErr_SetString(PyExc_ValueError, "a chunk's bounds must strictly increase");
        return NULL;
    }
    uint64_t *fields = PyMem_Malloc(2 * ((size_t)n + 1) * sizeof(uint64_t) + (size_t)n + 1);
    if (fields == NULL) {
        return PyErr_NoMemory();
    }
    uint64_t *ids = fields, *groups = fields + n + 1;
    unsigned char *states = (unsigned char *)(groups + n + 1);
    Chunk *chunk = NULL;
    for (Py_ssize_t i = 0; i <= n; i++) {
        if (read_slot(PyList_GET_ITEM(slots, i), i, ids, groups, states) < 0) {
            goto done;
        }
        if (i == 0 && lower == Py_None && groups[0] != 0) {
            PyErr_SetString(PyExc_ValueError, "nothing lies before the start of the key space");
            goto done;
        }
    }
    chunk = chunk_from_arrays(n, ((PyListObject *)bounds)->ob_item, ids, groups, states, lower,
                              upper);
done:
    PyMem_Free(fields);
    return (PyObject *)chunk;
}

static int
key_arg(PyObject *key)
{
    return PyBytes_CheckExact(key) ? 0 : not_bytes(key);
}

static PyObject *
chunk_bisect_right_method(Chunk *chunk, PyObject *key)
{
    if (key_arg(key) < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(
        chunk_find(chunk, prefix_of(key), PyBytes_AS_STRING(key), PyBytes_GET_SIZE(key)));
}

static PyObject *
chunk_bisect_left_method(Chunk *chunk, PyObject *key)
{
    if (key_arg(key) < 0) {
        return NULL;
    }
    return PyLong_FromSsize_t(chunk_bisect(chunk, prefix_of(key), PyBytes_AS_STRING(key),
                                           PyBytes_GET_SIZE(key), 0));
}

static int
slot_arg(Chunk *chunk, PyObject *value, Py_ssize_t *slot)
{
    Py_ssize_t i = PyLong_AsSsize_t(value);
    if (i == -1 && PyErr_Occurred()) {
        return -1;
    }
    if (i < 0 || i > chunk->n) {
        PyErr_SetString(PyExc_IndexError, "chunk slot out of range");
        return -1;
    }
    *slot = i;
    return 0;
}

static PyObject *
chunk_route_method(Chunk *chunk, PyObject *value)
{
    Py_ssize_t i;
    if (slot_arg(chunk, value, &i) < 0) {
        return NULL;
    }
    return chunk_route(chunk, i);
}

static PyObject *
chunk_bound_method(Chunk *chunk, PyObject *value)
{
    Py_ssize_t i = PyLong_AsSsize_t(value);
    if (i == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (i < 0 || i >= chunk->n) {
        PyErr_SetString(PyExc_IndexError, "chunk bound out of range");
        return NULL;
    }
    return bound_object(chunk, i);
}

/* splice(lo, hi, bounds, slots): a new chunk where slots [lo, hi) and the bounds between them
 * (lo .. hi - 2) are replaced by slots and bounds; 0 < lo < hi <= n. */
static PyObject *
chunk_splice_method(Chunk *chunk, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 4) {
        PyErr_SetString(PyExc_TypeError, "splice() takes exactly 4 arguments");
        return NULL;
    }
    Py_ssize_t lo = PyLong_AsSsize_t(args[0]), hi = PyLong_AsSsize_t(args[1]);
    if (PyErr_Occurred()) {
        return NULL;
    }
    PyObject *bounds = args[2], *slots = args[3];
    if (!PyList_CheckExact(bounds) || !PyList_CheckExact(slots)) {
        PyErr_SetString(PyExc_TypeError, "splice() takes lists of bounds and slots");
        return NULL;
    }
    Py_ssize_t k = PyList_GET_SIZE(bounds), n = chunk->n;
    if (!(0 < lo && lo < hi && hi <= n) || PyList_GET_SIZE(slots) != k + 1) {
        PyErr_SetString(PyExc_ValueError, "splice() out of range");
        return NULL;
    }
    /* Kept: bounds [0, lo) and [hi - 1, n), slots [0, lo) and [hi, n + 1). */
    Py_ssize_t arena = chunk->offset[lo] + (chunk->offset[n] - chunk->offset[hi - 1]);
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *bound = PyList_GET_ITEM(bounds, i);
        if (!PyBytes_CheckExact(bound)) {
            not_bytes(bound);
            return NULL;
        }
        Py_ssize_t bl;
        const char *before = i ? PyBytes_AS_STRING(PyList_GET_ITEM(bounds, i - 1))
                               : bound_at(chunk, lo - 1, &bl);
        if (i) {
            bl = PyBytes_GET_SIZE(PyList_GET_ITEM(bounds, i - 1));
        }
        Py_ssize_t al;
        const char *after = bound_at(chunk, hi - 1, &al);
        if (compare_raw(before, bl, PyBytes_AS_STRING(bound), PyBytes_GET_SIZE(bound)) >= 0 ||
            compare_raw(PyBytes_AS_STRING(bound), PyBytes_GET_SIZE(bound), after, al) >= 0) {
            PyErr_SetString(PyExc_ValueError, "a chunk's bounds must strictly increase");
            return NULL;
        }
        arena += PyBytes_GET_SIZE(bound);
    }
    Py_ssize_t m = lo + k + (n - hi + 1);
    Chunk *out = chunk_alloc(m, arena);
    if (out == NULL) {
        return NULL;
    }
    out->lower = Py_XNewRef(chunk->lower);
    out->upper = Py_XNewRef(chunk->upper);
    for (Py_ssize_t i = 0; i <= k; i++) {
        if (read_slot(PyList_GET_ITEM(slots, i), lo + i, out->ids, out->groups, out->states) < 0) {
            Py_DECREF(out);
            return NULL;
        }
    }
    /* The bounds before the splice, then the new ones, then the rest, shifted. */
    memcpy(out->prefix, chunk->prefix, (size_t)lo * 8);
    memcpy(out->offset, chunk->offset, (size_t)lo * sizeof(Py_ssize_t));
    memcpy(out->arena, chunk->arena, (size_t)chunk->offset[lo]);
    Py_ssize_t at = chunk->offset[lo];
    for (Py_ssize_t i = 0; i < k; i++) {
        PyObject *bound = PyList_GET_ITEM(bounds, i);
        out->prefix[lo + i] = prefix_of(bound);
        out->offset[lo + i] = at;
        memcpy(out->arena + at, PyBytes_AS_STRING(bound), (size_t)PyBytes_GET_SIZE(bound));
        at += PyBytes_GET_SIZE(bound);
    }
    Py_ssize_t shift = at - chunk->offset[hi - 1];
    for (Py_ssize_t i = hi - 1; i < n; i++) {
        out->prefix[lo + k + i - (hi - 1)] = chunk->prefix[i];
        out->offset[lo + k + i - (hi - 1)] = chunk->offset[i] + shift;
    }
    out->offset[m] = chunk->offset[n] + shift;
    chunk_summarize(out);
    memcpy(out->arena + at, chunk->arena + chunk->offset[hi - 1],
           (size_t)(chunk->offset[n] - chunk->offset[hi - 1]));
    memcpy(out->ids, chunk->ids, (size_t)lo * 8);
    memcpy(out->groups, chunk->groups, (size_t)lo * 8);
    memcpy(out->states, chunk->states, (size_t)lo);
    memcpy(out->ids + lo + k + 1, chunk->ids + hi, (size_t)(n + 1 - hi) * 8);
    memcpy(out->groups + lo + k + 1, chunk->groups + hi, (size_t)(n + 1 - hi) * 8);
    memcpy(out->states + lo + k + 1, chunk->states + hi, (size_t)(n + 1 - hi));
    return (PyObject *)out;
}

static PyObject *
chunk_find_id_method(Chunk *chunk, PyObject *value)
{
    uint64_t id;
    if (u64_of(value, &id) < 0) {
        PyErr_SetString(PyExc_TypeError, "find_id() takes a route id, an int in [0, 2**64)");
        return NULL;
    }
    for (Py_ssize_t i = 0; i <= chunk->n; i++) {
        if (chunk->ids[i] == id && chunk->groups[i] != 0) {
            return PyLong_FromSsize_t(i);
        }
    }
    return PyLong_FromLong(-1);
}

static PyObject *
chunk_bounds_method(Chunk *chunk, PyObject *Py_UNUSED(ignored))
{
    PyObject *bounds = PyList_New(chunk->n);
    if (bounds == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < chunk->n; i++) {
        PyObject *bound = bound_object(chunk, i);
        if (bound == NULL) {
            Py_DECREF(bounds);
            return NULL;
        }
        PyList_SET_ITEM(bounds, i, bound);
    }
    return bounds;
}

static PyObject *
chunk_slots_method(Chunk *chunk, PyObject *Py_UNUSED(ignored))
{
    PyObject *slots = PyList_New(chunk->n + 1);
    if (slots == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i <= chunk->n; i++) {
        PyObject *route = chunk_route(chunk, i);
        if (route == NULL) {
            Py_DECREF(slots);
            return NULL;
        }
        PyList_SET_ITEM(slots, i, route);
    }
    return slots;
}

static PyObject *
chunk_get_lower(Chunk *chunk, void *Py_UNUSED(closure))
{
    return Py_NewRef(chunk->lower ? chunk->lower : Py_None);
}

static PyObject *
chunk_get_upper(Chunk *chunk, void *Py_UNUSED(closure))
{
    return Py_NewRef(chunk->upper ? chunk->upper : Py_None);
}

static Py_ssize_t
chunk_length(Chunk *chunk)
{
    return chunk->n + 1;
}

static PyObject *
chunk_sizeof(Chunk *chunk, PyObject *Py_UNUSED(ignored))
{
    size_t words = (size_t)summary_size(chunk->n) + (size_t)chunk->n + 3 * ((size_t)chunk->n + 1);
    return PyLong_FromSize_t(sizeof(Chunk) + words * 8 + (size_t)chunk->n + 1 +
                             (size_t)chunk->offset[chunk->n] + 1);
}

static PyMethodDef chunk_methods[] = {
    {"bisect_right", (PyCFunction)chunk_bisect_right_method, METH_O,
     "bisect_right(key): the slot holding key. O(log n)."},
    {"bisect_left", (PyCFunction)chunk_bisect_left_method, METH_O,
     "bisect_left(key): the number of bounds below key. O(log n)."},
    {"route", (PyCFunction)chunk_route_method, METH_O,
     "route(i): slot i's Route (load 0), or None for a gap. O(1)."},
    {"find_id", (PyCFunction)chunk_find_id_method, METH_O,
     "find_id(route_id): the slot of the route with that id, or -1. O(n)."},
    {"bound", (PyCFunction)chunk_bound_method, METH_O, "bound(i): bound i, new bytes. O(1)."},
    {"splice", (PyCFunction)(void (*)(void))chunk_splice_method, METH_FASTCALL,
     "splice(lo, hi, bounds, slots): a new chunk whose slots lo..hi - 1 and the bounds between\n"
     "them are replaced by slots and bounds (one fewer); 0 < lo < hi <= number of bounds.\n"
     "O(n), in memory copies."},
    {"bounds", (PyCFunction)chunk_bounds_method, METH_NOARGS,
     "bounds(): the bounds, a new list of bytes. O(n)."},
    {"slots", (PyCFunction)chunk_slots_method, METH_NOARGS,
     "slots(): every slot's Route or None, a new list. O(n)."},
    {"__sizeof__", (PyCFunction)chunk_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef chunk_getset[] = {
    {"lower", (getter)chunk_get_lower, NULL, "Where slot 0 starts: bytes, or None.", NULL},
    {"upper", (getter)chunk_get_upper, NULL, "Where the last slot ends: bytes, or None.", NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PySequenceMethods chunk_as_sequence = {
    .sq_length = (lenfunc)chunk_length,
};

static PyTypeObject ChunkType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "distribution._lookup.Chunk",
    .tp_doc = PyDoc_STR("Chunk(bounds, slots, lower, upper): a packed, immutable run of the "
                        "routing table; len() is its number of slots."),
    .tp_basicsize = sizeof(Chunk),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = chunk_new,
    .tp_dealloc = (destructor)chunk_dealloc,
    .tp_methods = chunk_methods,
    .tp_getset = chunk_getset,
    .tp_as_sequence = &chunk_as_sequence,
};

/* -- IdIndex ----------------------------------------------------------------------------- */

/* Words per cell: the route id, its start's prefix, its parent route id. */
#define CELL 3

typedef struct {
    PyObject_HEAD
    Py_ssize_t used;
    size_t mask;     /* capacity - 1, a power of two minus one */
    uint64_t *cells; /* CELL words a cell; id 0 marks an empty cell: route ids are positive */
} IdIndex;

static PyTypeObject IdIndexType;

static inline size_t
id_hash(uint64_t id)
{
    id ^= id >> 33;
    id *= 0xff51afd7ed558ccdULL;
    id ^= id >> 33;
    return (size_t)id;
}

static IdIndex *
index_alloc(Py_ssize_t expected)
{
    size_t capacity = 8;
    while (capacity < 2 * (size_t)expected + 2) {
        capacity *= 2;
    }
    IdIndex *index = PyObject_New(IdIndex, &IdIndexType);
    if (index == NULL) {
        return NULL;
    }
    index->used = 0;
    index->mask = capacity - 1;
    index->cells = block_alloc(capacity * CELL * sizeof(uint64_t), 1);
    if (index->cells == NULL) {
        Py_DECREF(index);
        PyErr_NoMemory();
        return NULL;
    }
    return index;
}

static void
index_dealloc(IdIndex *index)
{
    if (index->cells != NULL) {
        block_free(index->cells, (index->mask + 1) * CELL * sizeof(uint64_t));
    }
    PyObject_Free(index);
}

/* The cell of id (its first word), or of the empty cell where it would go. */
static inline uint64_t *
index_cell(const IdIndex *index, uint64_t id)
{
    size_t cell = id_hash(id) & index->mask;
    while (index->cells[CELL * cell] != 0 && index->cells[CELL * cell] != id) {
        cell = (cell + 1) & index->mask;
    }
    return index->cells + CELL * cell;
}

static int index_grow(IdIndex *index);

/* Set id -> (prefix, parent); 1 if id was new, 0 if replaced, -1 on memory error. */
static int
index_set(IdIndex *index, uint64_t id, uint64_t prefix, uint64_t parent)
{
    uint64_t *cell = index_cell(index, id);
    int added = cell[0] != id;
    if (added && 2 * ((size_t)index->used + 1) > index->mask + 1) {
        if (index_grow(index) < 0) {
            return -1;
        }
        cell = index_cell(index, id);
    }
    cell[0] = id;
    cell[1] = prefix;
    cell[2] = parent;
    index->used += added;
    return added;
}

static int
index_grow(IdIndex *index)
{
    size_t old_capacity = index->mask + 1;
    uint64_t *old_cells = index->cells;
    uint64_t *cells = block_alloc(2 * old_capacity * CELL * sizeof(uint64_t), 1);
    if (cells == NULL) {
        PyErr_NoMemory();
        return -1;
    }
    index->cells = cells;
    index->mask = 2 * old_capacity - 1;
    for (size_t i = 0; i < old_capacity; i++) {
        const uint64_t *old = old_cells + CELL * i;
        if (old[0] != 0) {
            memcpy(index_cell(index, old[0]), old, CELL * sizeof(uint64_t));
        }
    }
    block_free(old_cells, old_capacity * CELL * sizeof(uint64_t));
    return 0;
}

/* Remove id (linear probing: the cells after it that could use its place move back); 1 if it
 * was there, else 0. */
static int
index_remove(IdIndex *index, uint64_t id)
{
    uint64_t *found = index_cell(index, id);
    if (found[0] != id) {
        return 0;
    }
    size_t hole = (size_t)(found - index->cells) / CELL;
    size_t next = (hole + 1) & index->mask;
    while (index->cells[CELL * next] != 0) {
        size_t home = id_hash(index->cells[CELL * next]) & index->mask;
        /* Move next into the hole unless its home lies in (hole, next]. */
        if (((next - home) & index->mask) >= ((next - hole) & index->mask)) {
            memcpy(index->cells + CELL * hole, index->cells + CELL * next,
                   CELL * sizeof(uint64_t));
            hole = next;
        }
        next = (next + 1) & index->mask;
    }
    index->cells[CELL * hole] = 0;
    index->used--;
    return 1;
}

/* The cell of id, or NULL if id is not in the index. */
static inline const uint64_t *
index_find(const IdIndex *index, uint64_t id)
{
    if (id == 0) {
        return NULL;
    }
    const uint64_t *cell = index_cell(index, id);
    return cell[0] == id ? cell : NULL;
}

static int
id_arg(PyObject *value, uint64_t *id)
{
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "route id must be int, got %.200s", Py_TYPE(value)->tp_name);
        return -1;
    }
    unsigned long long v = PyLong_AsUnsignedLongLong(value);
    if (v == (unsigned long long)-1 && PyErr_Occurred()) {
        return -1;
    }
    *id = (uint64_t)v;
    return 0;
}

static PyObject *
index_new(PyTypeObject *type, PyObject *args, PyObject *kwargs)
{
    if (!_PyArg_NoKeywords("IdIndex", kwargs) || !_PyArg_NoPositional("IdIndex", args)) {
        return NULL;
    }
    return (PyObject *)index_alloc(0);
}

static Py_ssize_t
index_length(IdIndex *index)
{
    return index->used;
}

static PyObject *
index_subscript(IdIndex *index, PyObject *key)
{
    uint64_t id;
    if (id_arg(key, &id) < 0) {
        return NULL;
    }
    const uint64_t *cell = index_find(index, id);
    if (cell == NULL) {
        PyErr_SetObject(PyExc_KeyError, key);
        return NULL;
    }
    PyObject *prefix = PyLong_FromUnsignedLongLong(cell[1]);
    PyObject *parent = PyLong_FromUnsignedLongLong(cell[2]);
    PyObject *value = prefix && parent ? PyTuple_Pack(2, prefix, parent) : NULL;
    Py_XDECREF(prefix);
    Py_XDECREF(parent);
    return value;
}

static int
index_ass_subscript(IdIndex *index, PyObject *key, PyObject *value)
{
    uint64_t id, prefix, parent;
    if (id_arg(key, &id) < 0) {
        return -1;
    }
    if (id == 0) {
        PyErr_SetString(PyExc_ValueError, "route id 0 has no place in the index");
        return -1;
    }
    if (value == NULL) {
        if (!index_remove(index, id)) {
            PyErr_SetObject(PyExc_KeyError, key);
            return -1;
        }
        return 0;
    }
    if (!PyTuple_Check(value) || PyTuple_GET_SIZE(value) != 2) {
        PyErr_SetString(PyExc_TypeError, "an IdIndex value is a (prefix, parent) pair");
        return -1;
    }
    if (id_arg(PyTuple_GET_ITEM(value, 0), &prefix) < 0 ||
        id_arg(PyTuple_GET_ITEM(value, 1), &parent) < 0) {
        return -1;
    }
    return index_set(index, id, prefix, parent) < 0 ? -1 : 0;
}

static int
index_contains(IdIndex *index, PyObject *key)
{
    uint64_t id;
    if (!PyLong_Check(key)) {
        return 0;
    }
    if (id_arg(key, &id) < 0) {
        PyErr_Clear();
        return 0;
    }
    return index_find(index, id) != NULL;
}

static PyObject *
index_items(IdIndex *index, PyObject *Py_UNUSED(ignored))
{
    PyObject *items = PyList_New(0);
    if (items == NULL) {
        return NULL;
    }
    for (size_t i = 0; i <= index->mask; i++) {
        const uint64_t *cell = index->cells + CELL * i;
        if (cell[0] == 0) {
            continue;
        }
        PyObject *item = Py_BuildValue("(K(KK))", (unsigned long long)cell[0],
                                       (unsigned long long)cell[1], (unsigned long long)cell[2]);
        if (item == NULL || PyList_Append(items, item) < 0) {
            Py_XDECREF(item);
            Py_DECREF(items);
            return NULL;
        }
        Py_DECREF(item);
    }
    return items;
}

static PyObject *
index_sizeof(IdIndex *index, PyObject *Py_UNUSED(ignored))
{
    return PyLong_FromSize_t(sizeof(IdIndex) + (index->mask + 1) * CELL * sizeof(uint64_t));
}

static PyMethodDef index_methods[] = {
    {"items", (PyCFunction)index_items, METH_NOARGS,
     "items(): a new list of (route id, (start prefix, parent id)) pairs, in no order. "
     "O(capacity)."},
    {"__sizeof__", (PyCFunction)index_sizeof, METH_NOARGS, NULL},
    {NULL, NULL, 0, NULL},
};

static PyMappingMethods index_as_mapping = {
    .mp_length = (lenfunc)index_length,
    .mp_subscript = (binaryfunc)index_subscript,
    .mp_ass_subscript = (objobjargproc)index_ass_subscript,
};

static PySequenceMethods index_as_sequence = {
    .sq_contains = (objobjproc)index_contains,
};

static PyTypeObject IdIndexType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "distribution._lookup.IdIndex",
    .tp_doc = PyDoc_STR("IdIndex(): route id -> (start prefix, parent route id), u64s in 24 "
                        "bytes a cell, at most half full."),
    .tp_basicsize = sizeof(IdIndex),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = index_new,
    .tp_dealloc = (destructor)index_dealloc,
    .tp_methods = index_methods,
    .tp_as_mapping = &index_as_mapping,
    .tp_as_sequence = &index_as_sequence,
};

/* -- the table: find, group, build, make_index --------------------------------------------- */

/* The table's parts, checked: a tuple (tops list, index Chunk, chunks list, ...) whose chunks
 * are one more than the index's keys (a distribution.table.RouteTable). 0 on success. */
static int
unpack_table(PyObject *table, Chunk **index, PyObject **chunks)
{
    if (!PyTuple_Check(table) || PyTuple_GET_SIZE(table) < 3 ||
        !PyList_CheckExact(PyTuple_GET_ITEM(table, 0)) ||
        !Py_IS_TYPE(PyTuple_GET_ITEM(table, 1), &ChunkType) ||
        !PyList_CheckExact(PyTuple_GET_ITEM(table, 2))) {
        PyErr_SetString(PyExc_SystemError,
                        "routing table is malformed: not a (tops, index, chunks) triple");
        return -1;
    }
    *index = (Chunk *)PyTuple_GET_ITEM(table, 1);
    *chunks = PyTuple_GET_ITEM(table, 2);
    if (PyList_GET_SIZE(*chunks) != (*index)->n + 1) {
        PyErr_SetString(PyExc_SystemError, "routing table is malformed: chunks and index differ");
        return -1;
    }
    return 0;
}

static Chunk *
chunk_at(PyObject *chunks, Py_ssize_t c)
{
    PyObject *chunk = PyList_GET_ITEM(chunks, c);
    if (!Py_IS_TYPE(chunk, &ChunkType)) {
        PyErr_SetString(PyExc_SystemError, "routing table is malformed: a chunk is not a Chunk");
        return NULL;
    }
    return (Chunk *)chunk;
}

/* The chunk number, the chunk and the slot holding key (bytes) of a checked table; -1 on error. */
static Py_ssize_t
locate_in(Chunk *index, PyObject *chunks, PyObject *key, Chunk **chunk, Py_ssize_t *slot)
{
    const char *k = PyBytes_AS_STRING(key);
    Py_ssize_t length = PyBytes_GET_SIZE(key);
    uint64_t kp = prefix_raw(k, length);
    Py_ssize_t c = index->n ? chunk_find(index, kp, k, length) : 0;
    *chunk = chunk_at(chunks, c);
    if (*chunk == NULL) {
        return -1;
    }
    *slot = chunk_find(*chunk, kp, k, length);
    return c;
}

/* The route (or None) in the slot holding key (bytes) of a checked table. */
static PyObject *
find_in(Chunk *index, PyObject *chunks, PyObject *key)
{
    Chunk *chunk;
    Py_ssize_t slot;
    if (locate_in(index, chunks, key, &chunk, &slot) < 0) {
        return NULL;
    }
    return chunk_route(chunk, slot);
}

PyDoc_STRVAR(find_doc,
"find(table, key, /)\n--\n\n"
"The route (or None) in the slot of ``table`` holding the bytes ``key``: two searches over\n"
"packed prefixes, then a Route built for the answer.");

static PyObject *
find(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Chunk *index;
    PyObject *chunks;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "find() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *key = args[1];
    if (!PyBytes_CheckExact(key)) {
        not_bytes(key);
        return NULL;
    }
    if (unpack_table(args[0], &index, &chunks) < 0) {
        return NULL;
    }
    return find_in(index, chunks, key);
}

/* -- Reader: the Engine's lookup without a Python frame ---------------------------------- */

/* The base of distribution.Engine: its table, in _table, and get_route in C, so that a lookup
 * costs one C call. Writers assign _table (one reference swap, under the GIL).
 *
 * Routes looked up in a small table (CACHE_CHUNKS chunks or fewer) are kept in a small cache, so
 * that a lookup of a route met lately returns the same Route instead of building one (a Route,
 * its two bounds and its id are most of a lookup's cost when the table fits in the cache). Direct-mapped, CACHE entries keyed by (chunk, slot);
 * each entry carries the generation of the table it was filled from, and assigning _table starts
 * a new generation: entries of an older one are misses (their chunk may be gone, and its address
 * reused). So a swap costs O(1), and the cache holds at most CACHE Routes, of any generation.
 * Routes carry load 0 (loads live in the Engine), so sharing one between callers is safe: a
 * Route is immutable. Every step runs holding the GIL; the only call that may run other Python
 * code meanwhile (building a Route: a collection) comes before the entry is read or written. */
#define CACHE 2048
/* Tables of more chunks are not cached: measured, on a table of a million routes a lookup that
 * misses (nearly every one, keys spread evenly) costs more than building the Route alone, since
 * it frees the Route it evicts, long out of the processor's caches. */
#define CACHE_CHUNKS 4

typedef struct {
    const Chunk *chunk;  /* compared, never followed */
    Py_ssize_t slot;
    uint64_t generation;
    PyObject *route;     /* a reference, or NULL */
} CacheEntry;

typedef struct {
    PyObject_HEAD
    PyObject *table;
    uint64_t generation; /* assignments of _table so far */
    CacheEntry *cache;   /* CACHE entries, allocated by the first lookup, or NULL */
} Reader;

static void
reader_drop_cache(Reader *reader)
{
    CacheEntry *cache = reader->cache;
    reader->cache = NULL;
    if (cache != NULL) {
        for (Py_ssize_t i = 0; i < CACHE; i++) {
            Py_XDECREF(cache[i].route);
        }
        PyMem_Free(cache);
    }
}

static int
reader_traverse(Reader *reader, visitproc visit, void *arg)
{
    /* Cached Routes hold bytes, ints and RouteState members: no cycle runs through them. */
    Py_VISIT(reader->table);
    return 0;
}

static int
reader_clear(Reader *reader)
{
    Py_CLEAR(reader->table);
    reader->generation++;
    reader_drop_cache(reader);
    return 0;
}

static void
reader_dealloc(Reader *reader)
{
    PyObject_GC_UnTrack(reader);
    reader_clear(reader);
    Py_TYPE(reader)->tp_free((PyObject *)reader);
}

/* Whether the Routes of a table of these chunks are cached. */
static inline int
caches(PyObject *chunks)
{
    return PyList_GET_SIZE(chunks) <= CACHE_CHUNKS;
}

/* The Route of slot of chunk (chunk number c) of the table of the current generation: from the
 * cache, or built and cached. A new reference, or NULL; None for a gap. */
static PyObject *
reader_route(Reader *reader, Py_ssize_t c, Chunk *chunk, Py_ssize_t slot)
{
    if (chunk->groups[slot] == 0) {
        Py_RETURN_NONE;
    }
    uint64_t generation = reader->generation;
    size_t at = ((size_t)c * 40503u + (size_t)slot) & (CACHE - 1);
    if (reader->cache != NULL) {
        CacheEntry *entry = &reader->cache[at];
        if (entry->route != NULL && entry->chunk == chunk && entry->slot == slot &&
            entry->generation == generation) {
            return Py_NewRef(entry->route);
        }
    }
    PyObject *route = chunk_route(chunk, slot);
    if (route == NULL) {
        return NULL;
    }
    /* Building the Route may have run a collection, and with it code that swapped the table:
     * then the Route is not cached. */
    if (reader->generation != generation) {
        return route;
    }
    if (reader->cache == NULL) {
        reader->cache = PyMem_Calloc(CACHE, sizeof(CacheEntry));
        if (reader->cache == NULL) {
            return route; /* no cache: every lookup builds its Route */
        }
    }
    CacheEntry *entry = &reader->cache[at];
    PyObject *old = entry->route;
    entry->chunk = chunk;
    entry->slot = slot;
    entry->generation = generation;
    entry->route = Py_NewRef(route);
    /* Last: freeing a Route runs no Python code, but the entry is whole already. */
    Py_XDECREF(old);
    return route;
}

PyDoc_STRVAR(get_route_doc,
"get_route(key, /)\n--\n\n"
"The route whose ``[start, end)`` holds ``key``, or None. O(log routes), no lock.\n\n"
"The route's ``load`` is not kept up to date (see :meth:`stats`): it is 0, and a lookup in a\n"
"small table may return the Route object an earlier one returned. A key that is not ``bytes``\n"
"raises TypeError.");

/* The table, a new reference, if it is a C table (*chunks, *index set), else NULL with no
 * exception (*other set to it, a new reference: another implementation's table), or NULL with
 * an exception. */
static PyObject *
reader_table(Reader *reader, Chunk **index, PyObject **chunks, PyObject **other)
{
    PyObject *table = reader->table;
    *other = NULL;
    if (table == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_table");
        return NULL;
    }
    if (PyTuple_Check(table) && PyTuple_GET_SIZE(table) >= 4 &&
        !Py_IS_TYPE(PyTuple_GET_ITEM(table, 1), &ChunkType)) {
        /* Another implementation's table (distribution._pylookup): its own searches. */
        *other = Py_NewRef(table);
        return NULL;
    }
    if (unpack_table(table, index, chunks) < 0) {
        return NULL;
    }
    return Py_NewRef(table);
}

static int
key_type_error(PyObject *key)
{
    PyObject *name = PyType_GetName(Py_TYPE(key));
    if (name != NULL) {
        PyErr_Format(PyExc_TypeError, "key must be bytes, got %U%s", name,
                     PyUnicode_Check(key) ? " (encode text keys explicitly)" : "");
        Py_DECREF(name);
    }
    return -1;
}

static PyObject *
reader_get_route(Reader *reader, PyObject *key)
{
    if (!PyBytes_CheckExact(key)) {
        key_type_error(key);
        return NULL;
    }
    Chunk *index, *chunk;
    PyObject *chunks, *other;
    /* Held: building the Route may run a collection, and with it code that swaps the table. */
    PyObject *table = reader_table(reader, &index, &chunks, &other);
    if (table == NULL) {
        if (other == NULL) {
            return NULL;
        }
        PyObject *found = PyObject_CallMethod(PyTuple_GET_ITEM(other, 3), "find", "OO", other, key);
        Py_DECREF(other);
        return found;
    }
    Py_ssize_t slot;
    Py_ssize_t c = locate_in(index, chunks, key, &chunk, &slot);
    PyObject *route = c < 0                 ? NULL
                      : caches(chunks)      ? reader_route(reader, c, chunk, slot)
                                            : chunk_route(chunk, slot);
    Py_DECREF(table);
    return route;
}

static PyObject *group_table(Reader *reader, Chunk *index, PyObject *chunks, PyObject *keys);

PyDoc_STRVAR(reader_group_doc,
"_group(keys, /)\n--\n\n"
"``group(_table, keys)``: the groups of a list of bytes ``keys``, their Routes from the cache.");

static PyObject *
reader_group(Reader *reader, PyObject *keys)
{
    Chunk *index;
    PyObject *chunks, *other;
    PyObject *table = reader_table(reader, &index, &chunks, &other);
    if (table == NULL) {
        if (other == NULL) {
            return NULL;
        }
        PyObject *found =
            PyObject_CallMethod(PyTuple_GET_ITEM(other, 3), "group", "OO", other, keys);
        Py_DECREF(other);
        return found;
    }
    PyObject *groups = group_table(caches(chunks) ? reader : NULL, index, chunks, keys);
    Py_DECREF(table);
    return groups;
}

static PyObject *
reader_get_table(Reader *reader, void *Py_UNUSED(closure))
{
    if (reader->table == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_table");
        return NULL;
    }
    return Py_NewRef(reader->table);
}

static int
reader_set_table(Reader *reader, PyObject *table, void *Py_UNUSED(closure))
{
    if (table == NULL && reader->table == NULL) {
        PyErr_SetString(PyExc_AttributeError, "_table");
        return -1;
    }
    /* A new generation first: no lookup may take a cached Route of the old table for the new. */
    reader->generation++;
    Py_XSETREF(reader->table, Py_XNewRef(table));
    return 0;
}

static PyMethodDef reader_methods[] = {
    {"get_route", (PyCFunction)reader_get_route, METH_O, get_route_doc},
    {"_group", (PyCFunction)reader_group, METH_O, reader_group_doc},
    {NULL, NULL, 0, NULL},
};

static PyGetSetDef reader_getset[] = {
    {"_table", (getter)reader_get_table, (setter)reader_set_table,
     "The routing table lookups search (a distribution.table.RouteTable); assigning it empties "
     "the cache of Routes.",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "distribution._lookup.Reader",
    .tp_doc = PyDoc_STR("Reader(): the base of distribution.Engine, its lookup in C."),
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_new = PyType_GenericNew,
    .tp_dealloc = (destructor)reader_dealloc,
    .tp_traverse = (traverseproc)reader_traverse,
    .tp_clear = (inquiry)reader_clear,
    .tp_methods = reader_methods,
    .tp_getset = reader_getset,
};

/* -- group -------------------------------------------------------------------------------- */

/* A key and the big-endian values of its first 8 bytes and of the next 8 (zero-padded).
 * They order keys as their bytes do wherever they differ, so keys are compared whole only where
 * both tie and one key is longer than 16 bytes: the keys of a batch that share a route usually
 * share their first 8 bytes too, and sorting them would otherwise compare them whole. */
typedef struct {
    uint64_t prefix;
    uint64_t second;
    PyObject *key;
} Entry;

/* The big-endian value of the 8 bytes at p. */
static inline uint64_t
load_be(const char *p)
{
#if defined(__GNUC__) || defined(__clang__)
    uint64_t value;
    memcpy(&value, p, 8);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    value = __builtin_bswap64(value);
#endif
    return value;
#else
    const unsigned char *s = (const unsigned char *)p;
    uint64_t value = 0;
    for (int i = 0; i < 8; i++) {
        value = (value << 8) | s[i];
    }
    return value;
#endif
}

/* The entry of key (exact bytes). Its 8 bytes ending at byte min(n, 8), and those ending at
 * byte min(n, 16), shifted into place: no branch on the length, which a batch of keys of random
 * lengths would mispredict about once a key (prefix_raw branches on it). The loads stay inside
 * the object: a bytes object's data follows its header (its hash), at least 8 bytes. */
static inline void
entry_set(Entry *entry, PyObject *key)
{
    const char *s = PyBytes_AS_STRING(key);
    Py_ssize_t n = PyBytes_GET_SIZE(key);
    Py_ssize_t a = n < 8 ? n : 8, b = n < 16 ? n : 16;
    uint64_t first = load_be(s + a - 8), second = load_be(s + b - 8);
    entry->key = key;
    /* Masks rather than conditionals, which compilers may turn into branches. */
    entry->prefix = (first << ((8 * (8 - a)) & 63)) & -(uint64_t)(a > 0);
    entry->second = (second << ((8 * (16 - b)) & 63)) & -(uint64_t)(b > 8);
}

static inline int
entry_less(const Entry *a, const Entry *b)
{
    if (a->prefix != b->prefix) {
        return a->prefix < b->prefix;
    }
    if (a->second != b->second) {
        return a->second < b->second;
    }
    Py_ssize_t la = PyBytes_GET_SIZE(a->key), lb = PyBytes_GET_SIZE(b->key);
    if (la <= 16 && lb <= 16) {
        /* Equal up to the shorter, and zeros after it in the longer: the shorter is less. */
        return la < lb;
    }
    return compare_bytes(a->key, b->key) < 0;
}

/* Whether the entry's key is below bound i of chunk. */
static inline int
entry_below_bound(const Entry *entry, const Chunk *chunk, Py_ssize_t i)
{
    return key_vs_bound(chunk, i, entry->prefix, PyBytes_AS_STRING(entry->key),
                        PyBytes_GET_SIZE(entry->key)) < 0;
}

static inline int
entry_below_key(const Entry *entry, PyObject *end)
{
    uint64_t end_prefix = prefix_of(end);
    if (entry->prefix != end_prefix) {
        return entry->prefix < end_prefix;
    }
    return compare_bytes(entry->key, end) < 0;
}
/* Stable bottom-up merge sort of n entries, insertion-sorting runs of 16 first; tmp holds n. */
static void
merge_sort(Entry *entries, Entry *tmp, Py_ssize_t n)
{
    const Py_ssize_t run = 16;
    for (Py_ssize_t lo = 0; lo < n; lo += run) {
        Py_ssize_t hi = lo + run < n ? lo + run : n;
        for (Py_ssize_t i = lo + 1; i < hi; i++) {
            Entry e = entries[i];
            Py_ssize_t j = i;
            while (j > lo && entry_less(&e, &entries[j - 1])) {
                entries[j] = entries[j - 1];
                j--;
            }
            entries[j] = e;
        }
    }
    Entry *from = entries, *to = tmp;
    for (Py_ssize_t width = run; width < n; width *= 2) {
        for (Py_ssize_t lo = 0; lo < n; lo += 2 * width) {
            Py_ssize_t mid = lo + width < n ? lo + width : n;
            Py_ssize_t hi = lo + 2 * width < n ? lo + 2 * width : n;
            Py_ssize_t i = lo, j = mid, k = lo;
            while (i < mid && j < hi) {
                to[k++] = entry_less(&from[j], &from[i]) ? from[j++] : from[i++];
            }
            while (i < mid) {
                to[k++] = from[i++];
            }
            while (j < hi) {
                to[k++] = from[j++];
            }
        }
        Entry *swap = from;
        from = to;
        to = swap;
    }
    if (from != entries) {
        memcpy(entries, from, (size_t)n * sizeof(Entry));
    }
}

/* Insertion sort of n entries (stable): for the few entries of a bucket. */
static void
insertion_sort(Entry *entries, Py_ssize_t n)
{
    for (Py_ssize_t i = 1; i < n; i++) {
        Entry e = entries[i];
        Py_ssize_t j = i;
        while (j > 0 && entry_less(&e, &entries[j - 1])) {
            entries[j] = entries[j - 1];
            j--;
        }
        entries[j] = e;
    }
}

/* Buckets of sort_entries are at most 2 ** MAX_BUCKET_BITS; up to SMALL_BUCKETS, their counts
 * are on the stack. */
#define MAX_BUCKET_BITS 16
#define SMALL_BUCKETS 2048

/* Sort n entries by key (stably: equal keys keep their order); tmp holds n. Returns entries
 * or tmp, whichever holds the sorted entries. A bucket sort on the
 * prefixes: the bits every prefix shares are skipped (as with keys sharing a text prefix), the
 * next ones, about log2(n) of them, name a bucket, so that a bucket holds a key or two of
 * uniform keys; then each bucket is sorted on whole keys (an insertion sort, a merge sort if it
 * is large). Two passes over the keys: for a thousand keys several times faster than a radix
 * sort on all 8 bytes, or than comparing keys. */
static Entry *
sort_entries(Entry *entries, Entry *tmp, Py_ssize_t n)
{
    if (n <= 64) {
        merge_sort(entries, tmp, n);
        return entries;
    }
    uint64_t first = entries[0].prefix, differ = 0;
    for (Py_ssize_t i = 1; i < n; i++) {
        differ |= entries[i].prefix ^ first;
    }
    if (differ == 0) {
        merge_sort(entries, tmp, n);
        return entries;
    }
    int lead = 0;
    while (!(differ >> (63 - lead) & 1)) {
        lead++;
    }
    int bits = 1;
    while (bits < MAX_BUCKET_BITS && ((Py_ssize_t)1 << bits) < n) {
        bits++;
    }
    if (bits > 64 - lead) {
        bits = 64 - lead;
    }
    Py_ssize_t buckets = (Py_ssize_t)1 << bits;
    Py_ssize_t small[SMALL_BUCKETS + 1];
    Py_ssize_t *start = buckets <= SMALL_BUCKETS
                            ? small
                            : PyMem_Malloc(((size_t)buckets + 1) * sizeof(Py_ssize_t));
    if (start == NULL) {
        merge_sort(entries, tmp, n);
        return entries;
    }
    memset(start, 0, ((size_t)buckets + 1) * sizeof(Py_ssize_t));
#define BUCKET(prefix) ((Py_ssize_t)(((prefix) << lead) >> (64 - bits)))
    for (Py_ssize_t i = 0; i < n; i++) {
        start[BUCKET(entries[i].prefix) + 1]++;
    }
    for (Py_ssize_t d = 0; d < buckets; d++) {
        start[d + 1] += start[d];
    }
    /* start[d] now is where bucket d begins; it moves on as the bucket fills. */
    for (Py_ssize_t i = 0; i < n; i++) {
        tmp[start[BUCKET(entries[i].prefix)]++] = entries[i];
    }
#undef BUCKET
    /* Bucket d now ends at start[d], and begins where bucket d - 1 ends. */
    Py_ssize_t lo = 0;
    for (Py_ssize_t d = 0; d < buckets; d++) {
        Py_ssize_t hi = start[d], size = hi - lo;
        if (size > 32) {
            merge_sort(tmp + lo, entries + lo, size);
        }
        else if (size > 1) {
            insertion_sort(tmp + lo, size);
        }
        lo = hi;
    }
    if (start != small) {
        PyMem_Free(start);
    }
    return tmp;
}

/* Searches run side by side, so that their cache misses overlap: a search over a large table
 * waits on memory at each level, and one search's levels depend on each other. */
#define LANES 8

/* The chunk, its number and the slot of each of m sorted keys, the m searches run level by
 * level in lockstep; *chunk and *c carry the current chunk and its number from one call to the
 * next (*chunk NULL before the first). */
static int
find_places(Chunk *index, PyObject *chunks, const Entry *entries, Py_ssize_t m, Chunk **chunk,
            Py_ssize_t *c, Chunk **in, Py_ssize_t *numbers, Py_ssize_t *slots)
{
    Py_ssize_t lo[LANES], hi[LANES];
    for (Py_ssize_t j = 0; j < m; j++) {
        const Entry *entry = &entries[j];
        if (*chunk == NULL || ((*chunk)->upper != NULL && !entry_below_key(entry, (*chunk)->upper))) {
            *c = index->n ? chunk_find(index, entry->prefix, PyBytes_AS_STRING(entry->key),
                                       PyBytes_GET_SIZE(entry->key))
                          : 0;
            *chunk = chunk_at(chunks, *c);
            if (*chunk == NULL) {
                return -1;
            }
        }
        in[j] = *chunk;
        numbers[j] = *c;
        chunk_prefetch_summary(in[j]);
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        chunk_block(in[j], entries[j].prefix, &lo[j], &hi[j]);
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        slots[j] = chunk_place(in[j], entries[j].prefix, PyBytes_AS_STRING(entries[j].key),
                               PyBytes_GET_SIZE(entries[j].key), lo[j], hi[j]);
    }
    return 0;
}

/* A group found: keys [first, end) of the sorted entries lie in slot of chunk (number). */
typedef struct {
    Chunk *chunk;
    Py_ssize_t number;
    Py_ssize_t slot;
    Py_ssize_t first;
    Py_ssize_t end;
} Found;

/* The groups of n sorted entries over the table, into found (room for n); their count, or -1.
 * No Python code runs (nothing is allocated), so the entries' keys need no references here.
 *
 * Keys below the end of the previous key's slot join its group without a search. The others
 * are searched a window at a time. While the keys are spread (two or fewer a slot), a window is
 * LANES keys, searched together as if each began a new slot; while they are clustered, a window
 * is the one key that begins the next slot, and the keys after it mostly join its group. */
static Py_ssize_t
find_groups(Chunk *index, PyObject *chunks, const Entry *entries, Py_ssize_t n, Found *found)
{
    Chunk *current = NULL;
    Py_ssize_t current_number = 0, groups = 0;
    Chunk *in[LANES];
    Py_ssize_t numbers[LANES], slots[LANES];
    Py_ssize_t window = LANES;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t m = n - i < window ? n - i : window;
        if (find_places(index, chunks, entries + i, m, &current, &current_number, in, numbers,
                        slots) < 0) {
            return -1;
        }
        Py_ssize_t used = 0, j = 0, k = i;
        while (j < m) {
            /* Key i + j begins a slot: its place is known. */
            Chunk *chunk = in[j];
            Py_ssize_t slot = slots[j];
            Py_ssize_t first = i + j;
            k = first + 1;
            if (slot < chunk->n) {
                while (k < n && entry_below_bound(&entries[k], chunk, slot)) {
                    k++;
                }
            }
            else if (chunk->upper != NULL) {
                while (k < n && entry_below_key(&entries[k], chunk->upper)) {
                    k++;
                }
            }
            else {
                k = n;
            }
            used++;
            if (chunk->groups[slot] != 0) {
                found[groups++] = (Found){chunk, numbers[j], slot, first, k};
            }
            j = k - i;
        }
        /* Two keys or fewer a slot: the keys are spread, search the next ones together. */
        window = 2 * used >= k - i ? LANES : 1;
        i = k;
    }
    return groups;
}

/* The result of the g groups found over n sorted entries, each of which holds a reference to
 * its key: [(route, [keys...]), ...], a new list, or NULL. The references move into the groups'
 * lists (a key no group takes is let go), so no key is counted twice. Routes come from the
 * reader's cache when reader is not NULL (the table is the reader's). */
static PyObject *
build_groups(Reader *reader, const Entry *entries, Py_ssize_t n, const Found *found,
             Py_ssize_t g)
{
    Py_ssize_t next = 0; /* entries[next:] still hold their references */
    PyObject *groups = PyList_New(g);
    if (groups == NULL) {
        goto error;
    }
    for (Py_ssize_t t = 0; t < g; t++) {
        const Found *f = &found[t];
        PyObject *route = reader != NULL ? reader_route(reader, f->number, f->chunk, f->slot)
                                         : chunk_route(f->chunk, f->slot);
        if (route == NULL) {
            goto error;
        }
        PyObject *keys = PyList_New(f->end - f->first);
        if (keys == NULL) {
            Py_DECREF(route);
            goto error;
        }
        for (; next < f->first; next++) {
            Py_DECREF(entries[next].key);
        }
        PyObject **items = ((PyListObject *)keys)->ob_item;
        for (Py_ssize_t i = f->first; i < f->end; i++) {
            items[i - f->first] = entries[i].key;
        }
        next = f->end;
        PyObject *pair = PyTuple_New(2);
        if (pair == NULL) {
            Py_DECREF(route);
            Py_DECREF(keys);
            goto error;
        }
        PyTuple_SET_ITEM(pair, 0, route);
        PyTuple_SET_ITEM(pair, 1, keys);
        PyList_SET_ITEM(groups, t, pair);
    }
    for (; next < n; next++) {
        Py_DECREF(entries[next].key);
    }
    return groups;
error:
    for (; next < n; next++) {
        Py_DECREF(entries[next].key);
    }
    Py_XDECREF(groups);
    return NULL;
}

/* The keys of a batch are read KEYS_AHEAD keys after their objects are requested (header and
 * data, often two cache lines). A batch's keys are scattered objects, and by the time a service
 * groups them, seldom in the processor's caches: measured on 1,000-key batches after a sweep of
 * lookups, requesting them ahead took a third off the whole call (the loop alone keeps about eight
 * requests under way). */
#define KEYS_AHEAD 32

/* The groups of keys (a list of bytes) over a checked table; reader as for build_groups. */
static PyObject *
group_table(Reader *reader, Chunk *index, PyObject *chunks, PyObject *keys)
{
    if (!PyList_CheckExact(keys)) {
        PyErr_SetString(PyExc_TypeError, "group() keys must be a list");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    /* The entries, room for the sort, and the groups found (n at most), in one block. */
    char *memory = PyMem_Malloc((size_t)(n ? n : 1) * (2 * sizeof(Entry) + sizeof(Found)));
    if (memory == NULL) {
        return PyErr_NoMemory();
    }
    Entry *entries = (Entry *)memory;
    Found *found = (Found *)(entries + 2 * n);
    int sorted = 1;
    /* Each entry holds a reference to its key: allocating the groups can run a garbage
     * collection, and with it finalizers that might change the caller's list and drop its keys.
     * Nothing runs Python code while the list is read. */
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) {
            not_bytes(key);
            for (Py_ssize_t j = 0; j < i; j++) {
                Py_DECREF(entries[j].key);
            }
            PyMem_Free(memory);
            return NULL;
        }
        if (i + KEYS_AHEAD < n) {
            const char *ahead = (const char *)PyList_GET_ITEM(keys, i + KEYS_AHEAD);
            PREFETCH(ahead);
            PREFETCH(ahead + sizeof(PyBytesObject) + 15);
        }
        entry_set(&entries[i], Py_NewRef(key));
        if (i && sorted && entry_less(&entries[i], &entries[i - 1])) {
            sorted = 0;
        }
    }
    Entry *in_order = sorted ? entries : sort_entries(entries, entries + n, n);
    PyObject *groups = NULL;
    Py_ssize_t g = find_groups(index, chunks, in_order, n, found);
    if (g < 0) {
        for (Py_ssize_t i = 0; i < n; i++) {
            Py_DECREF(in_order[i].key);
        }
    }
    else {
        groups = build_groups(reader, in_order, n, found, g);
    }
    PyMem_Free(memory);
    return groups;
}

PyDoc_STRVAR(group_doc,
"group(table, keys, /)\n--\n\n"
"``[(route, [keys...]), ...]`` in key order for a list of bytes ``keys``: the keys sorted, each\n"
"slot searched once, keys in gaps left out.");

static PyObject *
group(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Chunk *index;
    PyObject *chunks;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "group() takes exactly 2 arguments");
        return NULL;
    }
    if (!PyList_CheckExact(args[1])) {
        PyErr_SetString(PyExc_TypeError, "group() keys must be a list");
        return NULL;
    }
    if (unpack_table(args[0], &index, &chunks) < 0) {
        return NULL;
    }
    return group_table(NULL, index, chunks, args[1]);
}

/* -- building tables ----------------------------------------------------------------------- */

/* A gap-only chunk over the n keys (already checked: bytes, strictly increasing). */
static Chunk *
index_of_keys(Py_ssize_t n, PyObject *const *keys)
{
    uint64_t *zeros = PyMem_Calloc((size_t)n + 1, 2 * sizeof(uint64_t) + 1);
    if (zeros == NULL) {
        PyErr_NoMemory();
        return NULL;
    }
    Chunk *index = chunk_from_arrays(n, keys, zeros, zeros + n + 1,
                                     (unsigned char *)(zeros + 2 * ((size_t)n + 1)), Py_None,
                                     Py_None);
    PyMem_Free(zeros);
    return index;
}

PyDoc_STRVAR(make_index_doc,
"make_index(tops, /)\n--\n\n"
"The packed search index over ``tops`` (a list of strictly increasing bytes): a gap-only Chunk.");

static PyObject *
make_index(PyObject *module, PyObject *tops)
{
    if (!PyList_CheckExact(tops)) {
        PyErr_SetString(PyExc_TypeError, "make_index() takes a list of bytes");
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(tops);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *top = PyList_GET_ITEM(tops, i);
        if (!PyBytes_CheckExact(top)) {
            not_bytes(top);
            return NULL;
        }
        if (i && compare_bytes(PyList_GET_ITEM(tops, i - 1), top) >= 0) {
            PyErr_SetString(PyExc_ValueError, "tops must strictly increase");
            return NULL;
        }
    }
    return (PyObject *)index_of_keys(n, ((PyListObject *)tops)->ob_item);
}

/* The laid-out snapshot: its bounds copied, in order, into one arena (each key is read once,
 * while its object is in the cache), and the slots after them. */
typedef struct {
    Py_ssize_t m;       /* bounds so far; slot m is the last */
    uint64_t *prefix;   /* 2n */
    Py_ssize_t *offset; /* 2n + 1: bound i is arena[offset[i]:offset[i + 1]] */
    char *arena;
    Py_ssize_t arena_size;
    uint64_t *ids;      /* 2n + 1 */
    uint64_t *groups;   /* 2n + 1 */
    unsigned char *states;
} Layout;

/* Descriptors ahead of the one being read whose memory is requested early: a snapshot's
 * descriptors and keys lie scattered, and each read would otherwise wait on memory. */
#define AHEAD 16

static int
push_raw(Layout *layout, const char *key, Py_ssize_t length)
{
    Py_ssize_t m = layout->m;
    Py_ssize_t at = layout->offset[m];
    if (at + length > layout->arena_size) {
        Py_ssize_t size = 2 * layout->arena_size + length;
        char *arena = PyMem_Realloc(layout->arena, (size_t)size);
        if (arena == NULL) {
            PyErr_NoMemory();
            return -1;
        }
        layout->arena = arena;
        layout->arena_size = size;
    }
    memcpy(layout->arena + at, key, (size_t)length);
    layout->prefix[m] = prefix_raw(key, length);
    layout->offset[m + 1] = at + length;
    layout->m = m + 1;
    return 0;
}

/* A route to lay out, its fields read; end NULL if unbounded. */
typedef struct {
    uint64_t id, group, parent;
    int state;
    const char *start, *end;
    Py_ssize_t start_length, end_length;
} Laid;

/* Whether a layout has a route yet, and the last one's bounds (which outlive the layout). */
typedef struct {
    int has;
    const char *start, *end;
    Py_ssize_t start_length, end_length;
} Last;

/* An empty layout for routes routes, or -1 with MemoryError. */
static int
layout_alloc(Layout *layout, Py_ssize_t routes)
{
    size_t cells = 2 * (size_t)routes + 1;
    layout->ids = PyMem_Malloc(cells * (4 * sizeof(uint64_t) + 1));
    layout->arena_size = 16 * routes + 64;
    layout->arena = PyMem_Malloc((size_t)layout->arena_size);
    if (layout->ids == NULL || layout->arena == NULL) {
        PyMem_Free(layout->ids);
        PyMem_Free(layout->arena);
        PyErr_NoMemory();
        return -1;
    }
    layout->groups = layout->ids + cells;
    layout->prefix = layout->groups + cells;
    layout->offset = (Py_ssize_t *)(layout->prefix + cells);
    layout->states = (unsigned char *)(layout->offset + cells);
    layout->m = 0;
    layout->offset[0] = 0;
    layout->ids[0] = layout->groups[0] = 0;
    layout->states[0] = 0;
    return 0;
}

static void
layout_free(Layout *layout)
{
    PyMem_Free(layout->ids);
    PyMem_Free(layout->arena);
}

/* Read a descriptor; 1 if it is usual (see build), else 0. */
static int
read_descriptor(PyObject *d, Laid *r)
{
    if (Py_TYPE(d) != descriptor_type || PyTuple_GET_SIZE(d) != 6 ||
        u64_of(PyTuple_GET_ITEM(d, 0), &r->id) < 0 || r->id == 0 ||
        u64_of(PyTuple_GET_ITEM(d, 3), &r->group) < 0 || r->group == 0 ||
        u64_of(PyTuple_GET_ITEM(d, 5), &r->parent) < 0) {
        return 0;
    }
    PyObject *start = PyTuple_GET_ITEM(d, 1), *end = PyTuple_GET_ITEM(d, 2);
    r->state = state_of(PyTuple_GET_ITEM(d, 4));
    if (r->state < 0 || !PyBytes_CheckExact(start) ||
        (end != Py_None && (!PyBytes_CheckExact(end) || compare_bytes(start, end) >= 0))) {
        return 0;
    }
    r->start = PyBytes_AS_STRING(start);
    r->start_length = PyBytes_GET_SIZE(start);
    r->end = end == Py_None ? NULL : PyBytes_AS_STRING(end);
    r->end_length = end == Py_None ? 0 : PyBytes_GET_SIZE(end);
    return 1;
}

/* Lay out route r after the last one; 1 if laid, 0 if unusual (not after the last one, or
 * overlapping it, or its id repeated), -1 on error. */
static int
lay_route(Layout *layout, IdIndex *ids, const Laid *r, Last *last)
{
    int joined = 0;
    if (last->has) {
        if (last->end == NULL ||
            compare_raw(last->start, last->start_length, r->start, r->start_length) >= 0) {
            return 0;
        }
        int c = compare_raw(last->end, last->end_length, r->start, r->start_length);
        if (c > 0) {
            return 0;
        }
        joined = c == 0;
    }
    int added = index_set(ids, r->id, prefix_raw(r->start, r->start_length), r->parent);
    if (added <= 0) {
        return added;
    }
    if (!joined && push_raw(layout, r->start, r->start_length) < 0) {
        return -1;
    }
    Py_ssize_t m = layout->m;
    layout->ids[m] = r->id;
    layout->groups[m] = r->group;
    layout->states[m] = (unsigned char)r->state;
    if (r->end != NULL) {
        if (push_raw(layout, r->end, r->end_length) < 0) {
            return -1;
        }
        m = layout->m;
        layout->ids[m] = layout->groups[m] = 0;
        layout->states[m] = 0;
    }
    last->has = 1;
    last->start = r->start;
    last->start_length = r->start_length;
    last->end = r->end;
    last->end_length = r->end_length;
    return 1;
}

/* Request the memory of descriptor items[i + AHEAD]'s tuple, of the fields of a nearer one, and
 * of the index cell of a nearer one still. */
static inline void
prefetch_ahead(PyObject *const *items, Py_ssize_t i, Py_ssize_t n, const IdIndex *ids)
{
    if (i + AHEAD / 4 < n) {
        PyObject *d = items[i + AHEAD / 4];
        uint64_t id;
        if (PyTuple_Check(d) && PyTuple_GET_SIZE(d) == 6 &&
            PyLong_CheckExact(PyTuple_GET_ITEM(d, 0)) &&
            u64_of(PyTuple_GET_ITEM(d, 0), &id) == 0) {
            PREFETCH(&ids->cells[CELL * (id_hash(id) & ids->mask)]);
        }
    }
    if (i + AHEAD < n) {
        PREFETCH(items[i + AHEAD]);
        PREFETCH((char *)items[i + AHEAD] + 64);
    }
    if (i + AHEAD / 2 < n) {
        PyObject *d = items[i + AHEAD / 2];
        if (PyTuple_Check(d) && PyTuple_GET_SIZE(d) == 6) {
            PREFETCH(PyTuple_GET_ITEM(d, 0));
            PREFETCH(PyTuple_GET_ITEM(d, 1));
            PREFETCH(PyTuple_GET_ITEM(d, 2));
        }
    }
}

/* Letting lookups in other threads run while a build holds the GIL.
 *
 * A thread waiting for the GIL asks the holder to let go only when a whole switch interval
 * (sys.getswitchinterval()) ends without a release waking it; a release that wakes it but is
 * taken back before it runs restarts that wait. So a bare release-and-retake does not hand the
 * GIL over: the woken thread has not run yet when the build takes it back. A Pacer releases it
 * every half interval and stays out a moment (PAUSE_US), long enough for a woken thread to take
 * it. A lookup then waits half an interval or so, less than behind Python code (which lets go
 * only once a waiting thread has asked, a whole interval on); a build alone loses a pause per
 * half interval (about 2%). */
typedef struct {
    uint64_t spacing; /* microseconds between two releases */
    uint64_t next;    /* when the next release is due */
    unsigned stride;  /* calls to pacer_tick between two readings of the clock */
    unsigned count;   /* calls since the clock was last read */
} Pacer;

#define PAUSE_US 20

static uint64_t
monotonic_us(void)
{
#ifdef _WIN32
    return (uint64_t)GetTickCount64() * 1000u;
#else
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (uint64_t)now.tv_sec * 1000000u + (uint64_t)now.tv_nsec / 1000u;
#endif
}

/* Stay out of the GIL for about PAUSE_US microseconds (called without it). */
static void
pause_briefly(void)
{
#ifdef _WIN32
    Sleep(0);
#else
    struct timespec pause = {0, PAUSE_US * 1000L};
    nanosleep(&pause, NULL);
#endif
}

/* Start pacing a loop whose steps take about a microsecond times stride / 16 or less. */
static void
pacer_start(Pacer *pacer, unsigned stride)
{
    double interval = 0.005;
    PyObject *get = PySys_GetObject("getswitchinterval");
    PyObject *value = get == NULL ? NULL : PyObject_CallNoArgs(get);
    if (value != NULL) {
        interval = PyFloat_AsDouble(value);
        Py_DECREF(value);
    }
    PyErr_Clear();
    if (!(interval > 0.0 && interval < 1.0)) {
        interval = 0.005;
    }
    pacer->spacing = (uint64_t)(interval * 0.5e6) + 1;
    pacer->next = monotonic_us() + pacer->spacing;
    pacer->stride = stride;
    pacer->count = 0;
}

/* Let other threads run a moment if one release is due. Only called while no Python object is
 * in use but those the caller holds a reference to and never changes (the tuple of
 * descriptors, their fields, the chunks built so far). */
static inline void
pacer_tick(Pacer *pacer)
{
    if (++pacer->count < pacer->stride) {
        return;
    }
    pacer->count = 0;
    if (monotonic_us() < pacer->next) {
        return;
    }
    Py_BEGIN_ALLOW_THREADS
    pause_briefly();
    Py_END_ALLOW_THREADS
    pacer->next = monotonic_us() + pacer->spacing;
}

/* Validate and lay out the descriptors; 1 if every one is usual (see build), 0 if not, -1 on
 * error. Each descriptor is read once, in order. */
static int
lay_out(PyObject *const *items, Py_ssize_t n, Layout *layout, IdIndex *ids, Pacer *pacer)
{
    Last last = {0};
    for (Py_ssize_t i = 0; i < n; i++) {
        pacer_tick(pacer);
        prefetch_ahead(items, i, n, ids);
        Laid r;
        if (!read_descriptor(items[i], &r)) {
            return 0;
        }
        int laid = lay_route(layout, ids, &r, &last);
        if (laid <= 0) {
            return laid;
        }
    }
    return 1;
}

/* A chunk of the layout's bounds [first, first + n) and slots [first, first + n + 1). */
static Chunk *
chunk_of_layout(const Layout *layout, Py_ssize_t first, Py_ssize_t n, PyObject *lower,
                PyObject *upper)
{
    Py_ssize_t base = layout->offset[first];
    Chunk *chunk = chunk_alloc(n, layout->offset[first + n] - base);
    if (chunk == NULL) {
        return NULL;
    }
    memcpy(chunk->prefix, layout->prefix + first, (size_t)n * 8);
    chunk_summarize(chunk);
    for (Py_ssize_t i = 0; i <= n; i++) {
        chunk->offset[i] = layout->offset[first + i] - base;
    }
    memcpy(chunk->arena, layout->arena + base, (size_t)chunk->offset[n]);
    memcpy(chunk->ids, layout->ids + first, ((size_t)n + 1) * 8);
    memcpy(chunk->groups, layout->groups + first, ((size_t)n + 1) * 8);
    memcpy(chunk->states, layout->states + first, (size_t)n + 1);
    chunk->lower = lower == Py_None ? NULL : Py_NewRef(lower);
    chunk->upper = upper == Py_None ? NULL : Py_NewRef(upper);
    return chunk;
}

/* (tops, index, chunks) of a laid-out table cut into chunks of about chunk_size bounds. */
static PyObject *
cut_into_chunks(const Layout *layout, Py_ssize_t chunk_size, Pacer *pacer)
{
    Py_ssize_t m = layout->m;
    Py_ssize_t k = (m + chunk_size / 2) / chunk_size;
    k = k < 1 ? 1 : k;
    PyObject *tops = PyList_New(k - 1);
    PyObject *chunks = PyList_New(k);
    PyObject *index = NULL;
    if (tops == NULL || chunks == NULL) {
        goto error;
    }
    /* Tops are new bytes objects: the chunks' edges and the list share them. */
    for (Py_ssize_t j = 1; j < k; j++) {
        Py_ssize_t cut = j * (m + 1) / k - 1;
        PyObject *top = PyBytes_FromStringAndSize(layout->arena + layout->offset[cut],
                                                  layout->offset[cut + 1] - layout->offset[cut]);
        if (top == NULL) {
            goto error;
        }
        PyList_SET_ITEM(tops, j - 1, top);
    }
    Py_ssize_t a = -1;
    for (Py_ssize_t j = 0; j < k; j++) {
        Py_ssize_t b = j + 1 < k ? (j + 1) * (m + 1) / k - 1 : m;
        PyObject *lower = j ? PyList_GET_ITEM(tops, j - 1) : Py_None;
        PyObject *upper = j + 1 < k ? PyList_GET_ITEM(tops, j) : Py_None;
        pacer_tick(pacer);
        Chunk *chunk = chunk_of_layout(layout, a + 1, b - a - 1, lower, upper);
        if (chunk == NULL) {
            goto error;
        }
        PyList_SET_ITEM(chunks, j, (PyObject *)chunk);
        a = b;
    }
    index = (PyObject *)index_of_keys(k - 1, ((PyListObject *)tops)->ob_item);
    if (index == NULL) {
        goto error;
    }
    PyObject *table = PyTuple_Pack(3, tops, index, chunks);
    Py_DECREF(tops);
    Py_DECREF(index);
    Py_DECREF(chunks);
    return table;
error:
    Py_XDECREF(tops);
    Py_XDECREF(chunks);
    return NULL;
}

PyDoc_STRVAR(build_doc,
"build(routes, chunk_size, /)\n--\n\n"
"``(table, ids)`` for a list or tuple of RouteDescriptor, in one pass over them, or None if any\n"
"is unusual: not exactly a RouteDescriptor, a field of another type or out of range (a state\n"
"may be a RouteState or an int naming one), routes not sorted by start, overlapping or\n"
"following an unbounded one, a repeated id. The caller then runs the exact checks.\n"
"``ids`` maps each route id to its start's prefix.");

static PyObject *
build(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "build() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *routes = args[0];
    Py_ssize_t chunk_size = PyLong_AsSsize_t(args[1]);
    if (chunk_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (chunk_size < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
        return NULL;
    }
    if (!PyList_CheckExact(routes) && !PyTuple_CheckExact(routes)) {
        Py_RETURN_NONE;
    }
    /* A tuple of our own: the build lets other threads run now and then, and one could change
     * a list. */
    routes = PyList_CheckExact(routes) ? PyList_AsTuple(routes) : Py_NewRef(routes);
    if (routes == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyTuple_GET_SIZE(routes);
    PyObject *const *items = &PyTuple_GET_ITEM(routes, 0);
    PyObject *result = NULL;
    Layout layout;
    IdIndex *ids = NULL;
    if (layout_alloc(&layout, n) < 0) {
        Py_DECREF(routes);
        return NULL;
    }
    ids = index_alloc(n);
    if (ids == NULL) {
        goto done;
    }
    Pacer pacer;
    pacer_start(&pacer, 64);
    int usual = lay_out(items, n, &layout, ids, &pacer);
    if (usual > 0) {
        pacer.stride = 1;
        PyObject *table = cut_into_chunks(&layout, chunk_size, &pacer);
        if (table != NULL) {
            result = PyTuple_Pack(2, table, (PyObject *)ids);
            Py_DECREF(table);
        }
    }
    else if (usual == 0) {
        result = Py_NewRef(Py_None);
    }
done:
    Py_DECREF(routes);
    layout_free(&layout);
    Py_XDECREF(ids);
    return result;
}

/* -- the catalog digest --------------------------------------------------------------------- */

/* A route's hash in the catalog digest (distribution.codec.route_hash): the first 8 bytes of the
 * MD5 of its route record, big-endian, as a signed 64-bit value. MD5 (RFC 1321) here, because
 * a change hashes the routes it touches while writers wait, and building the record and calling
 * hashlib costs several times a change's own work. */

typedef struct {
    uint32_t state[4];
    uint64_t length;            /* bytes hashed */
    unsigned char buffer[64];   /* length % 64 of them waiting */
} Md5;

/* One 64-byte block, the four rounds unrolled (RFC 1321, section 3.4). */
#define MD5_F(x, y, z) ((z) ^ ((x) & ((y) ^ (z))))
#define MD5_G(x, y, z) ((y) ^ ((z) & ((x) ^ (y))))
#define MD5_H(x, y, z) ((x) ^ (y) ^ (z))
#define MD5_I(x, y, z) ((y) ^ ((x) | ~(z)))
#define MD5_STEP(f, a, b, c, d, x, t, s)                                                        \
    do {                                                                                        \
        (a) += f((b), (c), (d)) + (x) + (uint32_t)(t);                                          \
        (a) = ((a) << (s)) | ((a) >> (32 - (s)));                                               \
        (a) += (b);                                                                             \
    } while (0)

static void
md5_block(uint32_t state[4], const unsigned char *block)
{
    uint32_t x[16];
    for (int i = 0; i < 16; i++) {
        x[i] = (uint32_t)block[4 * i] | (uint32_t)block[4 * i + 1] << 8 |
               (uint32_t)block[4 * i + 2] << 16 | (uint32_t)block[4 * i + 3] << 24;
    }
    uint32_t a = state[0], b = state[1], c = state[2], d = state[3];
    MD5_STEP(MD5_F, a, b, c, d, x[0], 0xd76aa478, 7);
    MD5_STEP(MD5_F, d, a, b, c, x[1], 0xe8c7b756, 12);
    MD5_STEP(MD5_F, c, d, a, b, x[2], 0x242070db, 17);
    MD5_STEP(MD5_F, b, c, d, a, x[3], 0xc1bdceee, 22);
    MD5_STEP(MD5_F, a, b, c, d, x[4], 0xf57c0faf, 7);
    MD5_STEP(MD5_F, d, a, b, c, x[5], 0x4787c62a, 12);
    MD5_STEP(MD5_F, c, d, a, b, x[6], 0xa8304613, 17);
    MD5_STEP(MD5_F, b, c, d, a, x[7], 0xfd469501, 22);
    MD5_STEP(MD5_F, a, b, c, d, x[8], 0x698098d8, 7);
    MD5_STEP(MD5_F, d, a, b, c, x[9], 0x8b44f7af, 12);
    MD5_STEP(MD5_F, c, d, a, b, x[10], 0xffff5bb1, 17);
    MD5_STEP(MD5_F, b, c, d, a, x[11], 0x895cd7be, 22);
    MD5_STEP(MD5_F, a, b, c, d, x[12], 0x6b901122, 7);
    MD5_STEP(MD5_F, d, a, b, c, x[13], 0xfd987193, 12);
    MD5_STEP(MD5_F, c, d, a, b, x[14], 0xa679438e, 17);
    MD5_STEP(MD5_F, b, c, d, a, x[15], 0x49b40821, 22);
    MD5_STEP(MD5_G, a, b, c, d, x[1], 0xf61e2562, 5);
    MD5_STEP(MD5_G, d, a, b, c, x[6], 0xc040b340, 9);
    MD5_STEP(MD5_G, c, d, a, b, x[11], 0x265e5a51, 14);
    MD5_STEP(MD5_G, b, c, d, a, x[0], 0xe9b6c7aa, 20);
    MD5_STEP(MD5_G, a, b, c, d, x[5], 0xd62f105d, 5);
    MD5_STEP(MD5_G, d, a, b, c, x[10], 0x02441453, 9);
    MD5_STEP(MD5_G, c, d, a, b, x[15], 0xd8a1e681, 14);
    MD5_STEP(MD5_G, b, c, d, a, x[4], 0xe7d3fbc8, 20);
    MD5_STEP(MD5_G, a, b, c, d, x[9], 0x21e1cde6, 5);
    MD5_STEP(MD5_G, d, a, b, c, x[14], 0xc33707d6, 9);
    MD5_STEP(MD5_G, c, d, a, b, x[3], 0xf4d50d87, 14);
    MD5_STEP(MD5_G, b, c, d, a, x[8], 0x455a14ed, 20);
    MD5_STEP(MD5_G, a, b, c, d, x[13], 0xa9e3e905, 5);
    MD5_STEP(MD5_G, d, a, b, c, x[2], 0xfcefa3f8, 9);
    MD5_STEP(MD5_G, c, d, a, b, x[7], 0x676f02d9, 14);
    MD5_STEP(MD5_G, b, c, d, a, x[12], 0x8d2a4c8a, 20);
    MD5_STEP(MD5_H, a, b, c, d, x[5], 0xfffa3942, 4);
    MD5_STEP(MD5_H, d, a, b, c, x[8], 0x8771f681, 11);
    MD5_STEP(MD5_H, c, d, a, b, x[11], 0x6d9d6122, 16);
    MD5_STEP(MD5_H, b, c, d, a, x[14], 0xfde5380c, 23);
    MD5_STEP(MD5_H, a, b, c, d, x[1], 0xa4beea44, 4);
    MD5_STEP(MD5_H, d, a, b, c, x[4], 0x4bdecfa9, 11);
    MD5_STEP(MD5_H, c, d, a, b, x[7], 0xf6bb4b60, 16);
    MD5_STEP(MD5_H, b, c, d, a, x[10], 0xbebfbc70, 23);
    MD5_STEP(MD5_H, a, b, c, d, x[13], 0x289b7ec6, 4);
    MD5_STEP(MD5_H, d, a, b, c, x[0], 0xeaa127fa, 11);
    MD5_STEP(MD5_H, c, d, a, b, x[3], 0xd4ef3085, 16);
    MD5_STEP(MD5_H, b, c, d, a, x[6], 0x04881d05, 23);
    MD5_STEP(MD5_H, a, b, c, d, x[9], 0xd9d4d039, 4);
    MD5_STEP(MD5_H, d, a, b, c, x[12], 0xe6db99e5, 11);
    MD5_STEP(MD5_H, c, d, a, b, x[15], 0x1fa27cf8, 16);
    MD5_STEP(MD5_H, b, c, d, a, x[2], 0xc4ac5665, 23);
    MD5_STEP(MD5_I, a, b, c, d, x[0], 0xf4292244, 6);
    MD5_STEP(MD5_I, d, a, b, c, x[7], 0x432aff97, 10);
    MD5_STEP(MD5_I, c, d, a, b, x[14], 0xab9423a7, 15);
    MD5_STEP(MD5_I, b, c, d, a, x[5], 0xfc93a039, 21);
    MD5_STEP(MD5_I, a, b, c, d, x[12], 0x655b59c3, 6);
    MD5_STEP(MD5_I, d, a, b, c, x[3], 0x8f0ccc92, 10);
    MD5_STEP(MD5_I, c, d, a, b, x[10], 0xffeff47d, 15);
    MD5_STEP(MD5_I, b, c, d, a, x[1], 0x85845dd1, 21);
    MD5_STEP(MD5_I, a, b, c, d, x[8], 0x6fa87e4f, 6);
    MD5_STEP(MD5_I, d, a, b, c, x[15], 0xfe2ce6e0, 10);
    MD5_STEP(MD5_I, c, d, a, b, x[6], 0xa3014314, 15);
    MD5_STEP(MD5_I, b, c, d, a, x[13], 0x4e0811a1, 21);
    MD5_STEP(MD5_I, a, b, c, d, x[4], 0xf7537e82, 6);
    MD5_STEP(MD5_I, d, a, b, c, x[11], 0xbd3af235, 10);
    MD5_STEP(MD5_I, c, d, a, b, x[2], 0x2ad7d2bb, 15);
    MD5_STEP(MD5_I, b, c, d, a, x[9], 0xeb86d391, 21);
    state[0] += a;
    state[1] += b;
    state[2] += c;
    state[3] += d;
}

static void
md5_init(Md5 *md5)
{
    md5->state[0] = 0x67452301;
    md5->state[1] = 0xefcdab89;
    md5->state[2] = 0x98badcfe;
    md5->state[3] = 0x10325476;
    md5->length = 0;
}

static void
md5_update(Md5 *md5, const void *data, size_t size)
{
    const unsigned char *bytes = data;
    size_t have = (size_t)(md5->length % 64);
    md5->length += size;
    if (have) {
        size_t take = 64 - have < size ? 64 - have : size;
        memcpy(md5->buffer + have, bytes, take);
        bytes += take;
        size -= take;
        if (have + take < 64) {
            return;
        }
        md5_block(md5->state, md5->buffer);
    }
    for (; size >= 64; size -= 64, bytes += 64) {
        md5_block(md5->state, bytes);
    }
    memcpy(md5->buffer, bytes, size);
}

/* The first 8 bytes of the digest, big-endian. */
static uint64_t
md5_head(Md5 *md5)
{
    uint64_t bits = md5->length * 8;
    unsigned char pad[72] = {0x80};
    size_t have = (size_t)(md5->length % 64);
    size_t fill = (have < 56 ? 56 : 120) - have;
    for (int i = 0; i < 8; i++) {
        pad[fill + (size_t)i] = (unsigned char)(bits >> (8 * i));
    }
    md5_update(md5, pad, fill + 8);
    uint64_t head = 0;
    for (int i = 0; i < 2; i++) {
        for (int j = 0; j < 4; j++) {
            head = head << 8 | ((md5->state[i] >> (8 * j)) & 0xff);
        }
    }
    return head;
}

static inline void
put_u64(unsigned char *out, uint64_t value)
{
    for (int i = 7; i >= 0; i--) {
        out[i] = (unsigned char)value;
        value >>= 8;
    }
}

/* The route record's hash (see distribution.codec.encode_route_descriptor); end NULL if
 * unbounded. */
static uint64_t
record_hash(uint64_t id, const char *start, Py_ssize_t start_length, const char *end,
            Py_ssize_t end_length, uint64_t group, unsigned char state, uint64_t parent)
{
    unsigned char header[34];
    header[0] = 1;
    put_u64(header + 1, id);
    put_u64(header + 9, group);
    header[17] = state;
    put_u64(header + 18, parent);
    put_u64(header + 26, (uint64_t)start_length);
    Md5 md5;
    md5_init(&md5);
    md5_update(&md5, header, sizeof header);
    md5_update(&md5, start, (size_t)start_length);
    if (end == NULL) {
        md5_update(&md5, "\0", 1);
    }
    else {
        unsigned char tail[9] = {1};
        put_u64(tail + 1, (uint64_t)end_length);
        md5_update(&md5, tail, sizeof tail);
        md5_update(&md5, end, (size_t)end_length);
    }
    return md5_head(&md5);
}

static PyObject *
signed_of(uint64_t value)
{
    return PyLong_FromLongLong((long long)value);
}

PyDoc_STRVAR(route_hash_doc,
"route_hash(route_id, start, end, group_id, state, parent_route_id, /)\n--\n\n"
"The route's hash in the catalog digest, as distribution.codec.route_hash computes it, for\n"
"fields already validated. O(len(start) + len(end)).");

static PyObject *
route_hash(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    uint64_t id, group, parent;
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "route_hash() takes exactly 6 arguments");
        return NULL;
    }
    PyObject *start = args[1], *end = args[2];
    int state = state_of(args[4]);
    if (u64_of(args[0], &id) < 0 || u64_of(args[3], &group) < 0 || u64_of(args[5], &parent) < 0 ||
        state < 0 || !PyBytes_CheckExact(start) || (end != Py_None && !PyBytes_CheckExact(end))) {
        PyErr_SetString(PyExc_ValueError, "route_hash() takes a valid route's fields");
        return NULL;
    }
    return signed_of(record_hash(id, PyBytes_AS_STRING(start), PyBytes_GET_SIZE(start),
                                 end == Py_None ? NULL : PyBytes_AS_STRING(end),
                                 end == Py_None ? 0 : PyBytes_GET_SIZE(end), group,
                                 (unsigned char)state, parent));
}

/* The XOR of the hashes of chunk's catalog routes (id != 0), their parents from ids; 0 with
 * *missing set if a route's id is not in ids. Touches no Python object's reference counts:
 * runs without the GIL. */
static uint64_t
chunk_digest(const Chunk *chunk, const IdIndex *ids, int *missing)
{
    uint64_t digest = 0;
    for (Py_ssize_t i = 0; i <= chunk->n; i++) {
        uint64_t id = chunk->ids[i];
        if (id == 0 || chunk->groups[i] == 0) {
            continue;
        }
        const uint64_t *cell = index_find(ids, id);
        if (cell == NULL) {
            *missing = 1;
            return 0;
        }
        const char *start, *end = NULL;
        Py_ssize_t start_length, end_length = 0;
        if (i) {
            start = bound_at(chunk, i - 1, &start_length);
        }
        else {
            start = PyBytes_AS_STRING(chunk->lower);
            start_length = PyBytes_GET_SIZE(chunk->lower);
        }
        if (i < chunk->n) {
            end = bound_at(chunk, i, &end_length);
        }
        else if (chunk->upper != NULL) {
            end = PyBytes_AS_STRING(chunk->upper);
            end_length = PyBytes_GET_SIZE(chunk->upper);
        }
        digest ^= record_hash(id, start, start_length, end, end_length, chunk->groups[i],
                              chunk->states[i], cell[2]);
    }
    return digest;
}

PyDoc_STRVAR(digest_doc,
"digest(table, ids, /)\n--\n\n"
"The catalog digest of the table's catalog routes (route id not 0), each with the parent its id\n"
"has in the IdIndex ``ids``. O(routes), without holding the GIL: lookups go on meanwhile. The\n"
"caller keeps ``ids`` from changing (the Engine's lock).");

static PyObject *
digest(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Chunk *index;
    PyObject *chunks;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "digest() takes exactly 2 arguments");
        return NULL;
    }
    if (unpack_table(args[0], &index, &chunks) < 0) {
        return NULL;
    }
    if (!Py_IS_TYPE(args[1], &IdIndexType)) {
        PyErr_SetString(PyExc_TypeError, "digest() takes an IdIndex");
        return NULL;
    }
    const IdIndex *ids = (const IdIndex *)args[1];
    /* A tuple of our own: the chunks stay alive while the GIL is let go. */
    PyObject *held = PyList_AsTuple(chunks);
    if (held == NULL) {
        return NULL;
    }
    Py_ssize_t k = PyTuple_GET_SIZE(held);
    for (Py_ssize_t c = 0; c < k; c++) {
        if (!Py_IS_TYPE(PyTuple_GET_ITEM(held, c), &ChunkType)) {
            Py_DECREF(held);
            PyErr_SetString(PyExc_SystemError,
                            "routing table is malformed: a chunk is not a Chunk");
            return NULL;
        }
    }
    uint64_t value = 0;
    int missing = 0;
    Py_BEGIN_ALLOW_THREADS
    for (Py_ssize_t c = 0; c < k && !missing; c++) {
        value ^= chunk_digest((const Chunk *)PyTuple_GET_ITEM(held, c), ids, &missing);
    }
    Py_END_ALLOW_THREADS
    Py_DECREF(held);
    if (missing) {
        PyErr_SetString(PyExc_SystemError, "a catalog route of the table is not in the IdIndex");
        return NULL;
    }
    return signed_of(value);
}

/* Old route i of chunk as a Laid, its parent from ids; 0, or -1 with SystemError if its id is
 * not in ids. */
static int
read_slot_route(const Chunk *chunk, Py_ssize_t i, const IdIndex *ids, Laid *r)
{
    const uint64_t *cell = index_find(ids, chunk->ids[i]);
    if (cell == NULL) {
        PyErr_SetString(PyExc_SystemError, "a catalog route of the table is not in the IdIndex");
        return -1;
    }
    r->id = chunk->ids[i];
    r->group = chunk->groups[i];
    r->state = chunk->states[i];
    r->parent = cell[2];
    if (i) {
        r->start = bound_at(chunk, i - 1, &r->start_length);
    }
    else {
        r->start = PyBytes_AS_STRING(chunk->lower);
        r->start_length = PyBytes_GET_SIZE(chunk->lower);
    }
    r->end_length = 0;
    if (i < chunk->n) {
        r->end = bound_at(chunk, i, &r->end_length);
    }
    else if (chunk->upper != NULL) {
        r->end = PyBytes_AS_STRING(chunk->upper);
        r->end_length = PyBytes_GET_SIZE(chunk->upper);
    }
    else {
        r->end = NULL;
    }
    return 0;
}

static uint64_t
laid_hash(const Laid *r)
{
    return record_hash(r->id, r->start, r->start_length, r->end, r->end_length, r->group,
                       (unsigned char)r->state, r->parent);
}

PyDoc_STRVAR(merge_doc,
"merge(table, ids, dropped, upserts, chunk_size, /)\n--\n\n"
"``(table, ids, hashes)``: the table whose routes are those of ``table`` whose id is not in the\n"
"list ``dropped``, and the RouteDescriptors ``upserts`` (sorted by start), built as build()\n"
"builds a table from them all (``ids`` gives the kept routes' parents); ``hashes`` maps the id\n"
"of each route dropped to its hash in the catalog digest. None if ``table`` holds an ephemeral\n"
"route, or if build() would return None. O(routes + upserts), one pass over both.");

static PyObject *
merge(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    Chunk *index;
    PyObject *chunks;
    if (nargs != 5) {
        PyErr_SetString(PyExc_TypeError, "merge() takes exactly 5 arguments");
        return NULL;
    }
    if (unpack_table(args[0], &index, &chunks) < 0) {
        return NULL;
    }
    if (!Py_IS_TYPE(args[1], &IdIndexType) || !PyList_CheckExact(args[2]) ||
        !PyList_CheckExact(args[3])) {
        PyErr_SetString(PyExc_TypeError, "merge() takes a table, an IdIndex and two lists");
        return NULL;
    }
    const IdIndex *old_ids = (const IdIndex *)args[1];
    Py_ssize_t chunk_size = PyLong_AsSsize_t(args[4]);
    if (chunk_size == -1 && PyErr_Occurred()) {
        return NULL;
    }
    if (chunk_size < 1) {
        PyErr_SetString(PyExc_ValueError, "chunk_size must be positive");
        return NULL;
    }
    PyObject *dropped = args[2];
    IdIndex *drop = index_alloc(PyList_GET_SIZE(dropped));
    if (drop == NULL) {
        return NULL;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(dropped); i++) {
        uint64_t id;
        if (id_arg(PyList_GET_ITEM(dropped, i), &id) < 0 || (id && index_set(drop, id, 0, 0) < 0)) {
            Py_DECREF(drop);
            return NULL;
        }
    }
    /* Tuples of our own: the merge lets other threads run now and then. */
    PyObject *upserts = PyList_AsTuple(args[3]);
    PyObject *held = PyList_AsTuple(chunks);
    PyObject *hashes = PyDict_New();
    PyObject *result = NULL;
    IdIndex *ids = NULL;
    Layout layout = {0};
    int laid_out = 0;
    if (upserts == NULL || held == NULL || hashes == NULL) {
        goto done;
    }
    Py_ssize_t routes = PyTuple_GET_SIZE(upserts), k = PyTuple_GET_SIZE(held);
    for (Py_ssize_t c = 0; c < k; c++) {
        PyObject *chunk = PyTuple_GET_ITEM(held, c);
        if (!Py_IS_TYPE(chunk, &ChunkType)) {
            PyErr_SetString(PyExc_SystemError,
                            "routing table is malformed: a chunk is not a Chunk");
            goto done;
        }
        routes += ((Chunk *)chunk)->n + 1;
    }
    if (layout_alloc(&layout, routes) < 0) {
        goto done;
    }
    laid_out = 1;
    ids = index_alloc(routes);
    if (ids == NULL) {
        goto done;
    }
    Pacer pacer;
    pacer_start(&pacer, 64);
    Last last = {0};
    Py_ssize_t u = 0, n_upserts = PyTuple_GET_SIZE(upserts);
    Laid next;
    int usual = 1;
    if (n_upserts && !read_descriptor(PyTuple_GET_ITEM(upserts, 0), &next)) {
        usual = 0;
    }
    for (Py_ssize_t c = 0; c < k && usual > 0; c++) {
        const Chunk *chunk = (const Chunk *)PyTuple_GET_ITEM(held, c);
        for (Py_ssize_t i = 0; i <= chunk->n && usual > 0; i++) {
            pacer_tick(&pacer);
            if (chunk->groups[i] == 0) {
                continue;
            }
            if (chunk->ids[i] == 0) {
                usual = 0;
                break;
            }
            Laid old;
            if (read_slot_route(chunk, i, old_ids, &old) < 0) {
                goto done;
            }
            if (index_find(drop, old.id) != NULL) {
                PyObject *id = PyLong_FromUnsignedLongLong(old.id);
                PyObject *hash = signed_of(laid_hash(&old));
                int failed = id == NULL || hash == NULL || PyDict_SetItem(hashes, id, hash) < 0;
                Py_XDECREF(id);
                Py_XDECREF(hash);
                if (failed) {
                    goto done;
                }
                continue;
            }
            while (usual > 0 && u < n_upserts &&
                   compare_raw(next.start, next.start_length, old.start, old.start_length) < 0) {
                usual = lay_route(&layout, ids, &next, &last);
                if (usual > 0 && ++u < n_upserts &&
                    !read_descriptor(PyTuple_GET_ITEM(upserts, u), &next)) {
                    usual = 0;
                }
            }
            if (usual > 0) {
                usual = lay_route(&layout, ids, &old, &last);
            }
        }
    }
    while (usual > 0 && u < n_upserts) {
        pacer_tick(&pacer);
        usual = lay_route(&layout, ids, &next, &last);
        if (usual > 0 && ++u < n_upserts &&
            !read_descriptor(PyTuple_GET_ITEM(upserts, u), &next)) {
            usual = 0;
        }
    }
    if (usual < 0) {
        goto done;
    }
    if (usual == 0) {
        result = Py_NewRef(Py_None);
        goto done;
    }
    pacer.stride = 1;
    PyObject *table = cut_into_chunks(&layout, chunk_size, &pacer);
    if (table != NULL) {
        result = PyTuple_Pack(3, table, (PyObject *)ids, hashes);
        Py_DECREF(table);
    }
done:
    if (laid_out) {
        layout_free(&layout);
    }
    Py_XDECREF(ids);
    Py_XDECREF(hashes);
    Py_XDECREF(held);
    Py_XDECREF(upserts);
    Py_DECREF(drop);
    return result;
}

PyDoc_STRVAR(usual_route_doc,
"usual_route(route, /)\n--\n\n"
"True if ``route`` is exactly a RouteDescriptor whose fields have their exact types and valid\n"
"values (a RouteState member as state, bounds within MAX_ROUTE_KEY_BYTES): what\n"
"validate_route_descriptor returns unchanged. False means: validate it. O(1) but the bounds'\n"
"comparison.");

static PyObject *
usual_route(PyObject *module, PyObject *d)
{
    uint64_t id, group, parent;
    if (Py_TYPE(d) != descriptor_type || PyTuple_GET_SIZE(d) != 6 ||
        u64_of(PyTuple_GET_ITEM(d, 0), &id) < 0 || id == 0 ||
        u64_of(PyTuple_GET_ITEM(d, 3), &group) < 0 || group == 0 ||
        u64_of(PyTuple_GET_ITEM(d, 5), &parent) < 0 ||
        Py_TYPE(PyTuple_GET_ITEM(d, 4)) != state_type) {
        Py_RETURN_FALSE;
    }
    PyObject *start = PyTuple_GET_ITEM(d, 1), *end = PyTuple_GET_ITEM(d, 2);
    if (!PyBytes_CheckExact(start) || PyBytes_GET_SIZE(start) > max_key_bytes ||
        (end != Py_None &&
         (!PyBytes_CheckExact(end) || PyBytes_GET_SIZE(end) > max_key_bytes ||
          compare_bytes(start, end) >= 0))) {
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyMethodDef lookup_methods[] = {
    {"usual_route", (PyCFunction)usual_route, METH_O, usual_route_doc},
    {"find", (PyCFunction)(void (*)(void))find, METH_FASTCALL, find_doc},
    {"group", (PyCFunction)(void (*)(void))group, METH_FASTCALL, group_doc},
    {"build", (PyCFunction)(void (*)(void))build, METH_FASTCALL, build_doc},
    {"make_index", (PyCFunction)make_index, METH_O, make_index_doc},
    {"route_hash", (PyCFunction)(void (*)(void))route_hash, METH_FASTCALL, route_hash_doc},
    {"digest", (PyCFunction)(void (*)(void))digest, METH_FASTCALL, digest_doc},
    {"merge", (PyCFunction)(void (*)(void))merge, METH_FASTCALL, merge_doc},
    {NULL, NULL, 0, NULL},
};

static int
lookup_exec(PyObject *module)
{
    PyObject *types = PyImport_ImportModule("distribution.types");
    if (types == NULL) {
        return -1;
    }
    int failed = -1;
    PyObject *members = NULL;
    route_type = (PyTypeObject *)PyObject_GetAttrString(types, "Route");
    descriptor_type = (PyTypeObject *)PyObject_GetAttrString(types, "RouteDescriptor");
    state_type = (PyTypeObject *)PyObject_GetAttrString(types, "RouteState");
    if (route_type == NULL || descriptor_type == NULL || state_type == NULL) {
        goto done;
    }
    PyObject *max_key = PyObject_GetAttrString(types, "MAX_ROUTE_KEY_BYTES");
    if (max_key == NULL) {
        goto done;
    }
    max_key_bytes = PyLong_AsSsize_t(max_key);
    Py_DECREF(max_key);
    if (max_key_bytes < 0) {
        goto done;
    }
    members = PySequence_List((PyObject *)state_type);
    if (members == NULL) {
        goto done;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(members); i++) {
        PyObject *member = PyList_GET_ITEM(members, i);
        long value = PyLong_AsLong(member);
        if (value < 0 || value > 255) {
            PyErr_SetString(PyExc_SystemError, "a RouteState value does not fit a byte");
            goto done;
        }
        Py_XSETREF(state_members[value], Py_NewRef(member));
    }
    if (PyType_Ready(&ChunkType) < 0 || PyType_Ready(&IdIndexType) < 0 ||
        PyModule_AddType(module, &ChunkType) < 0 || PyModule_AddType(module, &IdIndexType) < 0 ||
        PyModule_AddType(module, &ReaderType) < 0 ||
        /* What distribution.Engine.implementation reports while this module is in use. */
        PyModule_AddStringConstant(module, "IMPLEMENTATION", "c") < 0) {
        goto done;
    }
    failed = 0;
done:
    Py_XDECREF(members);
    Py_DECREF(types);
    return failed;
}

static PyModuleDef_Slot lookup_slots[] = {
    {Py_mod_exec, lookup_exec},
    {0, NULL},
};

static struct PyModuleDef lookup_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "distribution._lookup",
    .m_doc = "The Engine's routing table chunks, packed, and its searches, in C "
             "(see distribution.engine).",
    .m_size = 0,
    .m_methods = lookup_methods,
    .m_slots = lookup_slots,
};

PyMODINIT_FUNC
PyInit__lookup(void)
{
    return PyModuleDef_Init(&lookup_module);
}
