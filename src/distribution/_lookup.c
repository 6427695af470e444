/* distribution._lookup: the Engine's searches over its routing table, in C.
 *
 * The table is the pair (tops, chunks) described in distribution/engine.py: tops is a list of
 * bytes, chunks a list of (bounds, slots) tuples, bounds a list of bytes and slots a list of
 * routes (or None) one longer than bounds. Both functions only read it, and its lists must not
 * change during a call: the Engine's never change once a table holds them (a writer builds the
 * next table and swaps it in). The keys may change: group works on its own copy of the list,
 * since allocating the groups can run the garbage collector, and with it any finalizer.
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

#if defined(__GNUC__) || defined(__clang__)
#define PREFETCH(address) __builtin_prefetch(address)
#else
#define PREFETCH(address) ((void)(address))
#endif

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

/* The two lists of pair, checked: a 2-tuple of lists, the second one longer than the first
 * (the table's tops and chunks, a chunk's bounds and slots). 0 on success. */
static int
unpack_lists(PyObject *pair, const char *what, PyObject **first, PyObject **second)
{
    if (!PyTuple_CheckExact(pair) || PyTuple_GET_SIZE(pair) != 2) {
        PyErr_Format(PyExc_SystemError, "routing table is malformed: %s is not a pair", what);
        return -1;
    }
    *first = PyTuple_GET_ITEM(pair, 0);
    *second = PyTuple_GET_ITEM(pair, 1);
    if (!PyList_CheckExact(*first) || !PyList_CheckExact(*second) ||
        PyList_GET_SIZE(*second) != PyList_GET_SIZE(*first) + 1) {
        PyErr_Format(PyExc_SystemError, "routing table is malformed: the lists of %s", what);
        return -1;
    }
    return 0;
}

static int
unpack_table(PyObject *table, PyObject **tops, PyObject **chunks)
{
    return unpack_lists(table, "the table", tops, chunks);
}

static int
unpack_chunk(PyObject *chunks, Py_ssize_t c, PyObject **bounds, PyObject **slots)
{
    return unpack_lists(PyList_GET_ITEM(chunks, c), "a chunk", bounds, slots);
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

/* Whether the entry's key is below end, whose prefix is end_prefix. */
static inline int
entry_below(const Entry *entry, uint64_t end_prefix, PyObject *end)
{
    if (entry->prefix != end_prefix) {
        return entry->prefix < end_prefix;
    }
    return compare_bytes(entry->key, end) < 0;
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

/* Append (route, [the n keys of entries]) to groups. 0 on success. */
static int
add_group(PyObject *groups, PyObject *route, const Entry *entries, Py_ssize_t n)
{
    PyObject *keys = PyList_New(n);
    if (keys == NULL) {
        return -1;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyList_SET_ITEM(keys, i, Py_NewRef(entries[i].key));
    }
    PyObject *pair = PyTuple_New(2);
    if (pair == NULL) {
        Py_DECREF(keys);
        return -1;
    }
    PyTuple_SET_ITEM(pair, 0, Py_NewRef(route));
    PyTuple_SET_ITEM(pair, 1, keys);
    int failed = PyList_Append(groups, pair);
    Py_DECREF(pair);
    return failed;
}

/* Searches run side by side, so that their cache misses overlap: a search over a large table
 * waits on memory at most of its steps, and one search's steps depend on each other. */
#define LANES 8

/* Where a key lies: its chunk's lists and end (NULL: unbounded) with the end's prefix, and its
 * slot in the chunk. */
typedef struct {
    PyObject *bounds;
    PyObject *slots;
    PyObject *chunk_end;
    uint64_t chunk_end_prefix;
    Py_ssize_t slot;
} Place;

/* The chunk that holds each of m sorted keys, into places; *chunk carries the current chunk from
 * one call to the next (its bounds are NULL before the first). 0 on success. */
static int
find_chunks(PyObject *tops, PyObject *chunks, const Entry *entries, Py_ssize_t m, Place *chunk,
            Place *places)
{
    Py_ssize_t n_tops = PyList_GET_SIZE(tops);
    for (Py_ssize_t j = 0; j < m; j++) {
        PyObject *key = entries[j].key;
        if (chunk->bounds == NULL ||
            (chunk->chunk_end != NULL &&
             !entry_below(&entries[j], chunk->chunk_end_prefix, chunk->chunk_end))) {
            Py_ssize_t c = n_tops ? bisect_right(tops, key) : 0;
            if (c < 0 || unpack_chunk(chunks, c, &chunk->bounds, &chunk->slots) < 0) {
                return -1;
            }
            chunk->chunk_end = c < n_tops ? PyList_GET_ITEM(tops, c) : NULL;
            if (chunk->chunk_end != NULL) {
                if (!PyBytes_CheckExact(chunk->chunk_end)) {
                    return not_bytes(chunk->chunk_end);
                }
                chunk->chunk_end_prefix = prefix_of(chunk->chunk_end);
            }
        }
        places[j] = *chunk;
    }
    return 0;
}

/* bisect_right of each of m keys in its place's bounds, m searches in lockstep. Each step
 * halves every search's range without a branch on the comparison, and touches each lane's
 * next midpoint before comparing any, so the memory loads of all lanes are in flight at once.
 * 0 on success. */
static int
find_slots(const Entry *entries, Py_ssize_t m, Place *places)
{
    if (m == 1) {
        /* Alone, a search with branches runs faster: the processor starts the next step's load
         * on the branch it predicts, where a branchless step must wait for the comparison. */
        places[0].slot = bisect_right(places[0].bounds, entries[0].key);
        return places[0].slot < 0 ? -1 : 0;
    }
    PyObject **items[LANES];
    Py_ssize_t base[LANES], size[LANES];
    Py_ssize_t longest = 0;
    for (Py_ssize_t j = 0; j < m; j++) {
        items[j] = ((PyListObject *)places[j].bounds)->ob_item;
        base[j] = 0;
        size[j] = PyList_GET_SIZE(places[j].bounds);
        longest = size[j] > longest ? size[j] : longest;
    }
    for (; longest > 1; longest -= longest / 2) {
        for (Py_ssize_t j = 0; j < m; j++) {
            if (size[j] > 1) {
                /* The object's header and its bytes, which may begin on the next cache line. */
                PyObject *item = items[j][base[j] + size[j] / 2];
                PREFETCH(item);
                PREFETCH(((PyBytesObject *)item)->ob_sval);
            }
        }
        for (Py_ssize_t j = 0; j < m; j++) {
            if (size[j] > 1) {
                Py_ssize_t half = size[j] / 2;
                PyObject *item = items[j][base[j] + half];
                if (!PyBytes_CheckExact(item)) {
                    return not_bytes(item);
                }
                base[j] += compare_bytes(item, entries[j].key) <= 0 ? half : 0;
                size[j] -= half;
            }
        }
    }
    for (Py_ssize_t j = 0; j < m; j++) {
        Py_ssize_t slot = 0;
        if (size[j] > 0) {
            PyObject *item = items[j][base[j]];
            if (!PyBytes_CheckExact(item)) {
                return not_bytes(item);
            }
            slot = base[j] + (compare_bytes(item, entries[j].key) <= 0);
        }
        places[j].slot = slot;
    }
    return 0;
}

/* The groups of n sorted entries over the table's lists; a new list, or NULL.
 *
 * Keys below the end of the previous key's slot join its group without a search. The others
 * are searched a window at a time. While the keys are spread (two or fewer a slot), a window is
 * LANES keys, searched together as if each began a new slot; while they are clustered, a window
 * is the one key that begins the next slot, and the keys after it mostly join its group. */
static PyObject *
group_sorted(PyObject *tops, PyObject *chunks, const Entry *entries, Py_ssize_t n)
{
    PyObject *groups = PyList_New(0);
    if (groups == NULL) {
        return NULL;
    }
    Place chunk = {NULL, NULL, NULL, 0, 0};
    Place places[LANES];
    Py_ssize_t window = LANES;
    Py_ssize_t i = 0;
    while (i < n) {
        Py_ssize_t m = n - i < window ? n - i : window;
        if (find_chunks(tops, chunks, entries + i, m, &chunk, places) < 0 ||
            find_slots(entries + i, m, places) < 0) {
            goto error;
        }
        Py_ssize_t used = 0, j = 0, k = i;
        while (j < m) {
            /* Key i + j begins a slot: its place is known. */
            const Place *place = &places[j];
            PyObject *slot_end = place->slot < PyList_GET_SIZE(place->bounds)
                                     ? PyList_GET_ITEM(place->bounds, place->slot)
                                     : place->chunk_end;
            if (slot_end != NULL && !PyBytes_CheckExact(slot_end)) {
                not_bytes(slot_end);
                goto error;
            }
            PyObject *route = PyList_GET_ITEM(place->slots, place->slot);
            Py_ssize_t first = i + j;
            k = first + 1;
            if (slot_end == NULL) {
                k = n;
            }
            else {
                uint64_t end_prefix = prefix_of(slot_end);
                while (k < n && entry_below(&entries[k], end_prefix, slot_end)) {
                    k++;
                }
            }
            used++;
            if (route != Py_None && add_group(groups, route, entries + first, k - first) < 0) {
                goto error;
            }
            j = k - i;
        }
        /* Two keys or fewer a slot: the keys are spread, search the next ones together. */
        window = 2 * used >= k - i ? LANES : 1;
        i = k;
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
    /* A list of our own: allocating the groups can run a garbage collection, and with it
     * finalizers that might change the caller's list and drop the keys being grouped. */
    PyObject *held = PyList_GetSlice(keys, 0, PyList_GET_SIZE(keys));
    if (held == NULL) {
        return NULL;
    }
    Py_ssize_t n = PyList_GET_SIZE(held);
    PyObject *groups = NULL;
    int sorted = 1;
    Entry *entries = PyMem_Malloc((size_t)(n ? n : 1) * 2 * sizeof(Entry));
    if (entries == NULL) {
        PyErr_NoMemory();
        goto done;
    }
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *key = PyList_GET_ITEM(held, i);
        if (!PyBytes_CheckExact(key)) {
            not_bytes(key);
            goto done;
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
    groups = group_sorted(tops, chunks, entries, n);
done:
    PyMem_Free(entries);
    Py_DECREF(held);
    return groups;
}

static PyMethodDef lookup_methods[] = {
    {"find", (PyCFunction)(void (*)(void))find, METH_FASTCALL, find_doc},
    {"group", (PyCFunction)(void (*)(void))group, METH_FASTCALL, group_doc},
    {NULL, NULL, 0, NULL},
};

static int
lookup_exec(PyObject *module)
{
    /* What distribution.Engine.implementation reports while these searches are in use. */
    return PyModule_AddStringConstant(module, "IMPLEMENTATION", "c");
}

static PyModuleDef_Slot lookup_slots[] = {
    {Py_mod_exec, lookup_exec},
    {0, NULL},
};

static struct PyModuleDef lookup_module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "distribution._lookup",
    .m_doc = "The Engine's searches over its routing table, in C (see distribution.engine).",
    .m_size = 0,
    .m_methods = lookup_methods,
    .m_slots = lookup_slots,
};

PyMODINIT_FUNC
PyInit__lookup(void)
{
    return PyModuleDef_Init(&lookup_module);
}
