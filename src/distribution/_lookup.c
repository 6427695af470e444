/* distribution._lookup: the Engine's searches over its routing table, in C.
 *
 * The table is the pair (tops, chunks) described in distribution/engine.py: tops is a list of
 * bytes, chunks a list of (bounds, slots) tuples, bounds a list of bytes and slots a list of
 * routes (or None) one longer than bounds. Both functions only read it. They run no Python code
 * and hold the GIL from start to end, so they see the table the caller passed, whole, while a
 * writer builds the next one.
 *
 * Why C: a Python bisect spends most of its time in rich comparisons (about 18 ns each here),
 * and a batch sort as much again; comparing bytes with memcmp costs a few nanoseconds.
 *
 * Bad input (a table that is not of that shape, a key that is not bytes) raises TypeError or
 * SystemError; it never reads outside an object.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Compare two bytes objects as Python does: memcmp of the common prefix, then length. */
static inline int
compare_bytes(PyObject *a, PyObject *b)
{
    Py_ssize_t la = PyBytes_GET_SIZE(a), lb = PyBytes_GET_SIZE(b);
    int r = memcmp(PyBytes_AS_STRING(a), PyBytes_AS_STRING(b), (size_t)(la < lb ? la : lb));
    if (r != 0) {
        return r;
    }
    return (la > lb) - (la < lb);
}

static int
not_bytes(PyObject *value)
{
    PyErr_Format(PyExc_TypeError, "routing table key must be bytes, got %.200s",
                 Py_TYPE(value)->tp_name);
    return -1;
}

/* bisect_right(list, key) over a list of bytes; -1 with an exception set on a non-bytes item. */
static Py_ssize_t
bisect_right(PyObject *list, PyObject *key)
{
    Py_ssize_t lo = 0, hi = PyList_GET_SIZE(list);
    while (lo < hi) {
        Py_ssize_t mid = lo + (hi - lo) / 2;
        PyObject *item = PyList_GET_ITEM(list, mid);
        if (!PyBytes_CheckExact(item)) {
            return not_bytes(item);
        }
        if (compare_bytes(key, item) < 0) {
            hi = mid;
        }
        else {
            lo = mid + 1;
        }
    }
    return lo;
}

/* The table's two lists, checked; 0 on success. */
static int
unpack_table(PyObject *table, PyObject **tops, PyObject **chunks)
{
    if (!PyTuple_CheckExact(table) || PyTuple_GET_SIZE(table) != 2) {
        PyErr_SetString(PyExc_TypeError, "routing table must be a (tops, chunks) tuple");
        return -1;
    }
    *tops = PyTuple_GET_ITEM(table, 0);
    *chunks = PyTuple_GET_ITEM(table, 1);
    if (!PyList_CheckExact(*tops) || !PyList_CheckExact(*chunks) ||
        PyList_GET_SIZE(*chunks) != PyList_GET_SIZE(*tops) + 1) {
        PyErr_SetString(PyExc_SystemError, "routing table is malformed: tops and chunks");
        return -1;
    }
    return 0;
}

/* Chunk c's two lists, checked; 0 on success. */
static int
unpack_chunk(PyObject *chunks, Py_ssize_t c, PyObject **bounds, PyObject **slots)
{
    PyObject *chunk = PyList_GET_ITEM(chunks, c);
    if (!PyTuple_CheckExact(chunk) || PyTuple_GET_SIZE(chunk) != 2) {
        PyErr_SetString(PyExc_SystemError, "routing table is malformed: a chunk");
        return -1;
    }
    *bounds = PyTuple_GET_ITEM(chunk, 0);
    *slots = PyTuple_GET_ITEM(chunk, 1);
    if (!PyList_CheckExact(*bounds) || !PyList_CheckExact(*slots) ||
        PyList_GET_SIZE(*slots) != PyList_GET_SIZE(*bounds) + 1) {
        PyErr_SetString(PyExc_SystemError, "routing table is malformed: bounds and slots");
        return -1;
    }
    return 0;
}

PyDoc_STRVAR(find_doc,
"find(table, key, /)\n--\n\n"
"The route (or None) in the slot of ``table`` holding the bytes ``key``: two bisects.");

static PyObject *
find(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *tops, *chunks, *bounds, *slots;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "find() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *key = args[1];
    if (!PyBytes_CheckExact(key)) {
        not_bytes(key);
        return NULL;
    }
    if (unpack_table(args[0], &tops, &chunks) < 0) {
        return NULL;
    }
    Py_ssize_t c = PyList_GET_SIZE(tops) ? bisect_right(tops, key) : 0;
    if (c < 0 || unpack_chunk(chunks, c, &bounds, &slots) < 0) {
        return NULL;
    }
    Py_ssize_t p = bisect_right(bounds, key);
    if (p < 0) {
        return NULL;
    }
    return Py_NewRef(PyList_GET_ITEM(slots, p));
}

/* -- group -------------------------------------------------------------------------------- */

/* A key and the big-endian value of its first 8 bytes (zero-padded). Prefixes order keys as
 * their bytes do wherever they differ: only equal prefixes need the full comparison. */
typedef struct {
    uint64_t prefix;
    PyObject *key;
} Entry;

static inline uint64_t
prefix_of(PyObject *key)
{
    const unsigned char *s = (const unsigned char *)PyBytes_AS_STRING(key);
    Py_ssize_t n = PyBytes_GET_SIZE(key);
    uint64_t value = 0;
    for (Py_ssize_t i = 0; i < 8; i++) {
        value = (value << 8) | (i < n ? s[i] : 0);
    }
    return value;
}

static inline int
entry_less(const Entry *a, const Entry *b)
{
    if (a->prefix != b->prefix) {
        return a->prefix < b->prefix;
    }
    return compare_bytes(a->key, b->key) < 0;
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

/* Sort n entries by key; tmp holds n. A radix sort on the prefixes, a byte a pass (passes
 * where every prefix has the same byte are skipped, as with keys sharing a text prefix), then
 * a merge sort of each run of equal prefixes on the whole keys. For a thousand keys it is a
 * few times faster than comparing keys. */
static void
sort_entries(Entry *entries, Entry *tmp, Py_ssize_t n)
{
    if (n <= 64) {
        merge_sort(entries, tmp, n);
        return;
    }
    Py_ssize_t counts[8][256];
    memset(counts, 0, sizeof(counts));
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t prefix = entries[i].prefix;
        for (int b = 0; b < 8; b++) {
            counts[b][(prefix >> (8 * b)) & 0xff]++;
        }
    }
    Entry *from = entries, *to = tmp;
    for (int b = 0; b < 8; b++) {
        Py_ssize_t *count = counts[b];
        int shift = 8 * b;
        if (count[(from[0].prefix >> shift) & 0xff] == n) {
            continue;
        }
        Py_ssize_t sum = 0;
        for (int d = 0; d < 256; d++) {
            Py_ssize_t here = count[d];
            count[d] = sum;
            sum += here;
        }
        for (Py_ssize_t i = 0; i < n; i++) {
            to[count[(from[i].prefix >> shift) & 0xff]++] = from[i];
        }
        Entry *swap = from;
        from = to;
        to = swap;
    }
    if (from != entries) {
        memcpy(entries, from, (size_t)n * sizeof(Entry));
    }
    for (Py_ssize_t lo = 0; lo < n;) {
        Py_ssize_t hi = lo + 1;
        while (hi < n && entries[hi].prefix == entries[lo].prefix) {
            hi++;
        }
        if (hi - lo > 1) {
            merge_sort(entries + lo, tmp, hi - lo);
        }
        lo = hi;
    }
}

/* Append (route, [key]) to groups; the new key list in *current. 0 on success. */
static int
open_group(PyObject *groups, PyObject *route, PyObject *key, PyObject **current)
{
    PyObject *keys = PyList_New(1);
    if (keys == NULL) {
        return -1;
    }
    PyList_SET_ITEM(keys, 0, Py_NewRef(key));
    PyObject *pair = PyTuple_Pack(2, route, keys);
    Py_DECREF(keys);  /* the pair holds it, and the caller borrows it through *current */
    if (pair == NULL) {
        return -1;
    }
    int failed = PyList_Append(groups, pair);
    Py_DECREF(pair);
    *current = keys;
    return failed;
}

/* The groups of n sorted entries over the table's lists; a new list, or NULL. */
static PyObject *
group_sorted(PyObject *tops, PyObject *chunks, const Entry *entries, Py_ssize_t n)
{
    PyObject *groups = PyList_New(0);
    if (groups == NULL) {
        return NULL;
    }
    Py_ssize_t n_tops = PyList_GET_SIZE(tops);
    PyObject *bounds = NULL, *slots = NULL;
    /* The current slot holds the keys below slot_end, its chunk those below chunk_end; NULL
     * ends are unbounded. current is the key list of the slot's group (NULL for a gap). */
    PyObject *slot_end = NULL, *chunk_end = NULL, *current = NULL;
    int in_slot = 0, in_chunk = 0;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = entries[i].key;
        if (in_slot && (slot_end == NULL || compare_bytes(key, slot_end) < 0)) {
            if (current != NULL && PyList_Append(current, key) < 0) {
                goto error;
            }
            continue;
        }
        if (!in_chunk || (chunk_end != NULL && compare_bytes(key, chunk_end) >= 0)) {
            /* Searched in full, not from the previous chunk: every search then walks the same
             * midpoints, which stay cached. */
            Py_ssize_t c = n_tops ? bisect_right(tops, key) : 0;
            if (c < 0 || unpack_chunk(chunks, c, &bounds, &slots) < 0) {
                goto error;
            }
            chunk_end = c < n_tops ? PyList_GET_ITEM(tops, c) : NULL;
            if (chunk_end != NULL && !PyBytes_CheckExact(chunk_end)) {
                not_bytes(chunk_end);
                goto error;
            }
            in_chunk = 1;
        }
        Py_ssize_t p = bisect_right(bounds, key);
        if (p < 0) {
            goto error;
        }
        slot_end = p < PyList_GET_SIZE(bounds) ? PyList_GET_ITEM(bounds, p) : chunk_end;
        if (slot_end != NULL && !PyBytes_CheckExact(slot_end)) {
            not_bytes(slot_end);
            goto error;
        }
        in_slot = 1;
        PyObject *route = PyList_GET_ITEM(slots, p);
        current = NULL;
        if (route != Py_None && open_group(groups, route, key, &current) < 0) {
            goto error;
        }
    }
    return groups;
error:
    Py_DECREF(groups);
    return NULL;
}

PyDoc_STRVAR(group_doc,
"group(table, keys, /)\n--\n\n"
"``[(route, [keys...]), ...]`` in key order for a list of bytes ``keys``: the keys sorted, each\n"
"slot searched once, keys in gaps left out.");

static PyObject *
group(PyObject *module, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *tops, *chunks;
    if (nargs != 2) {
        PyErr_SetString(PyExc_TypeError, "group() takes exactly 2 arguments");
        return NULL;
    }
    PyObject *keys = args[1];
    if (!PyList_CheckExact(keys)) {
        PyErr_SetString(PyExc_TypeError, "group() keys must be a list");
        return NULL;
    }
    if (unpack_table(args[0], &tops, &chunks) < 0) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(keys);
    if (n == 0) {
        return PyList_New(0);
    }
    Entry *entries = PyMem_Malloc((size_t)n * 2 * sizeof(Entry));
    if (entries == NULL) {
        return PyErr_NoMemory();
    }
    int sorted = 1;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(keys, i);
        if (!PyBytes_CheckExact(key)) {
            PyMem_Free(entries);
            not_bytes(key);
            return NULL;
        }
        entries[i].key = key;
        entries[i].prefix = prefix_of(key);
        if (i && sorted && entry_less(&entries[i], &entries[i - 1])) {
            sorted = 0;
        }
    }
    if (!sorted) {
        sort_entries(entries, entries + n, n);
    }
    /* The list is not resized meanwhile: no Python code runs before group_sorted returns. */
    PyObject *groups = group_sorted(tops, chunks, entries, n);
    PyMem_Free(entries);
    return groups;
}

static PyMethodDef lookup_methods[] = {
    {"find", (PyCFunction)(void (*)(void))find, METH_FASTCALL, find_doc},
    {"group", (PyCFunction)(void (*)(void))group, METH_FASTCALL, group_doc},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef lookup_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "distribution._lookup",
    .m_doc = "The Engine's searches over its routing table, in C (see distribution.engine).",
    .m_size = 0,
    .m_methods = lookup_methods,
};

PyMODINIT_FUNC
PyInit__lookup(void)
{
    return PyModuleDef_Init(&lookup_module);
}
