"""gptcore._bpe: the compiled byte-pair encoder: GPT-2's pre-split as a scanner, and the merge loop.

WHAT'S GOING ON HERE
====================

WHAT
  The same encoding as gptcore.bpe's reference (split_text, then encode_chunk_reference per chunk),
  without a regex engine and without Python lists per chunk:
    - chunk_end: where the chunk that starts at code point i ends, for GPT2_PATTERN
          's|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+
      read as the regex engine reads it: the first alternative that matches at i wins, each `+` as
      long as it can go, and `\\s+(?!\\S)` backs off one character when a run of whitespace is
      followed by a non-space (so "   word" is "  " then " word": the last space joins the word).
      The classes (\\p{L}, \\p{N}, \\s) come from a table of one byte per code point that gptcore.bpe
      builds by asking `regex` itself (bits LETTER, NUMBER, SPACE, defined here once).
    - MergeTable.merge_chunk: a chunk's byte ids -> its tokens: find the adjacent pair of lowest rank
      (an open-addressing hash table of (left << 32 | right) -> rank), replace its occurrences left
      to right, repeat until no adjacent pair has a rank.
    - encode_gpt2 / encode_chunks: the whole text; a dict of chunk -> ids for the call means each
      distinct word is merged once (English text repeats its words: most chunks are cache hits).
    - train_merges: gptcore.bpe.train_incremental over C arrays: the words (each distinct chunk
      once, with its frequency) in one flat int32 array, merged in place; a hash table of pair ->
      (count, the words it was seen in); a binary heap whose order is the tie rule.

WHERE
  gptcore.bpe.BPETokenizer.encode_ordinary calls encode_gpt2 for GPT-2's pattern and encode_chunks
  (after `regex`) for any other; BPETokenizer.train calls train_merges. gptcore.bpe is the only
  module that imports this one.

HOW
  One thread. Encoding is a loop over chunks of a few code points; the only Python objects made per
  chunk are its substring (the cache key) and, on a miss, its UTF-8 bytes and its ids tuple.
  Training touches, per merge, only the words that hold the merged pair; each such word has its old
  pairs' counts taken away and its new pairs' counts added back, and every pair whose count changed
  gets one fresh heap entry (the entries it had are stale: popped later, they no longer match the
  pair's count, and are skipped).

CONTRACT
  The caller checks: the class table has 0x110000 entries; byte_ids has 256; lefts, rights and
  merged_ids have one entry per merge, with ids >= 0. Text holding a lone surrogate raises
  UnicodeEncodeError (its substring cannot be UTF-8 encoded), which gptcore.bpe catches.

TWIN
  gptcore.bpe.split_text (split_gpt2), gptcore.bpe.encode_chunk_reference (the merge loop) and
  gptcore.bpe.train_reference / train_incremental (train_merges); tests/test_bpe.py checks each,
  chunk for chunk, id for id and merge for merge.
"""
from cpython.unicode cimport PyUnicode_KIND, PyUnicode_DATA, PyUnicode_GET_LENGTH
from libc.stdint cimport uint64_t, uint32_t, int32_t, uint8_t, int64_t
from libc.stdlib cimport malloc, realloc, free
from libc.string cimport memset

cdef extern from "Python.h":
    # a macro that reads one code point of a str in its own storage (1, 2 or 4 bytes per code point);
    # it touches no Python object, so it is safe without the GIL
    Py_UCS4 PyUnicode_READ(int kind, const void* data, Py_ssize_t index) noexcept nogil

cdef enum:
    _LETTER = 1
    _NUMBER = 2
    _SPACE = 4

LETTER, NUMBER, SPACE = _LETTER, _NUMBER, _SPACE
N_CODE_POINTS = 0x110000

cdef enum:
    NO_RANK = 0x7fffffff


# ----------------------------------------------------------------------------------------------------
# The scanner for GPT-2's pattern
# ----------------------------------------------------------------------------------------------------

cdef inline Py_ssize_t _run(int kind, const void* data, Py_ssize_t n, Py_ssize_t j, const uint8_t* classes,
                            uint8_t cls) noexcept nogil:
    """The end of the run of characters of class `cls` (0 = other: not a letter, number or space)."""
    while j < n and classes[PyUnicode_READ(kind, data, j)] == cls:
        j += 1
    return j


cdef Py_ssize_t chunk_end(int kind, const void* data, Py_ssize_t n, Py_ssize_t i,
                          const uint8_t* classes) noexcept nogil:
    cdef Py_UCS4 c = PyUnicode_READ(kind, data, i), d, e
    cdef Py_ssize_t j = i, run_end
    cdef uint8_t cls
    # 's 't 're 've 'm 'll 'd (lower case only, as in GPT-2)
    if c == 39 and i + 1 < n:
        d = PyUnicode_READ(kind, data, i + 1)
        if d == 115 or d == 116 or d == 109 or d == 100:            # s t m d
            return i + 2
        if i + 2 < n:
            e = PyUnicode_READ(kind, data, i + 2)
            if (d == 114 and e == 101) or (d == 118 and e == 101) or (d == 108 and e == 108):   # re ve ll
                return i + 3
    # ' ?\p{L}+', ' ?\p{N}+', ' ?[^\s\p{L}\p{N}]+': one optional space (U+0020 only), then a run
    if c == 32 and i + 1 < n and not (classes[PyUnicode_READ(kind, data, i + 1)] & _SPACE):
        j = i + 1
        c = PyUnicode_READ(kind, data, j)
    cls = classes[c]
    if not (cls & _SPACE):
        return _run(kind, data, n, j + 1, classes, cls)
    # '\s+(?!\S)': the whole run if it ends the text, else the run but its last character, if that
    # leaves at least one; otherwise '\s+' takes the single whitespace character
    run_end = i + 1
    while run_end < n and classes[PyUnicode_READ(kind, data, run_end)] & _SPACE:
        run_end += 1
    if run_end == n:
        return n
    if run_end - i >= 2:
        return run_end - 1
    return run_end


def split_gpt2(str text, const uint8_t[::1] classes not None):
    """GPT-2's pre-split, compiled: text -> its chunks (gptcore.bpe.split_text's twin)."""
    cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text), i = 0, end
    cdef int kind = PyUnicode_KIND(text)
    cdef const void* data = PyUnicode_DATA(text)
    chunks = []
    while i < n:
        end = chunk_end(kind, data, n, i, &classes[0])
        chunks.append(text[i:end])
        i = end
    return chunks


# ----------------------------------------------------------------------------------------------------
# The merge loop
# ----------------------------------------------------------------------------------------------------

cdef inline uint64_t _pair_key(int32_t left, int32_t right) noexcept nogil:
    # + 1 so that no real key is 0, the empty slot
    return ((<uint64_t><uint32_t>left) << 32 | <uint32_t>right) + 1


cdef inline uint64_t _slot(uint64_t key, uint64_t mask) noexcept nogil:
    return ((key * <uint64_t>0x9E3779B97F4A7C15) >> 20) & mask


cdef inline Py_ssize_t _replace_pair(int32_t* ids, Py_ssize_t n, int32_t left, int32_t right,
                                     int32_t new) noexcept nogil:
    """Replace every (left, right) in ids[:n] by new, left to right, never overlapping, in place;
    return the new length: ids=[1, 2, 3, 1, 2], pair=(1, 2), new=256 -> [256, 3, 256], 3.
    Encoding (MergeTable.merge_chunk) and training (train_merges) both merge through this."""
    cdef Py_ssize_t i = 0, out = 0
    while i < n:
        if i + 1 < n and ids[i] == left and ids[i + 1] == right:
            ids[out] = new
            i += 2
        else:
            ids[out] = ids[i]
            i += 1
        out += 1
    return out


cdef class MergeTable:
    """The merges of one tokenizer, for fast lookup: pair -> rank -> merged id."""
    cdef uint64_t* keys
    cdef int32_t* ranks
    cdef int32_t* merged
    cdef uint64_t mask
    cdef int32_t byte_ids[256]
    cdef int32_t* scratch              # one chunk's ids while it is merged
    cdef Py_ssize_t scratch_size

    def __cinit__(self, byte_ids, lefts, rights, merged_ids):
        cdef Py_ssize_t n = len(lefts), size = 16, r, b
        cdef uint64_t key, h
        while size < 2 * n + 16:
            size *= 2
        self.mask = size - 1
        self.keys = <uint64_t*>malloc(size * sizeof(uint64_t))
        self.ranks = <int32_t*>malloc(size * sizeof(int32_t))
        self.merged = <int32_t*>malloc((n + 1) * sizeof(int32_t))
        self.scratch_size = 256
        self.scratch = <int32_t*>malloc(self.scratch_size * sizeof(int32_t))
        if not self.keys or not self.ranks or not self.merged or not self.scratch:
            raise MemoryError()
        memset(self.keys, 0, size * sizeof(uint64_t))
        for b in range(256):
            self.byte_ids[b] = byte_ids[b]
        for r in range(n):
            key = _pair_key(lefts[r], rights[r])
            h = _slot(key, self.mask)
            while self.keys[h] != 0 and self.keys[h] != key:
                h = (h + 1) & self.mask
            if self.keys[h] == 0:                  # a pair listed twice keeps its first (lowest) rank
                self.keys[h] = key
                self.ranks[h] = r
            self.merged[r] = merged_ids[r]

    def __dealloc__(self):
        free(self.keys)
        free(self.ranks)
        free(self.merged)
        free(self.scratch)

    cdef inline int32_t rank(self, int32_t left, int32_t right) noexcept nogil:
        cdef uint64_t key = _pair_key(left, right)
        cdef uint64_t h = _slot(key, self.mask)
        while self.keys[h] != 0:
            if self.keys[h] == key:
                return self.ranks[h]
            h = (h + 1) & self.mask
        return NO_RANK

    cdef Py_ssize_t merge_chunk(self, int32_t* ids, Py_ssize_t n) noexcept nogil:
        """ids[:n] (byte ids) -> the chunk's tokens, in place; returns how many there are."""
        cdef Py_ssize_t i
        cdef int32_t best, r, left, right
        while n >= 2:
            best = NO_RANK
            for i in range(n - 1):
                r = self.rank(ids[i], ids[i + 1])
                if r < best:
                    best = r
                    left, right = ids[i], ids[i + 1]
            if best == NO_RANK:
                break
            n = _replace_pair(ids, n, left, right, self.merged[best])
        return n

    cdef tuple _encode_piece(self, str piece):
        cdef bytes raw = piece.encode("utf-8")
        cdef const unsigned char* p = raw
        cdef Py_ssize_t n = len(raw), i
        if n > self.scratch_size:
            self.scratch = <int32_t*>realloc(self.scratch, n * sizeof(int32_t))
            if not self.scratch:
                raise MemoryError()
            self.scratch_size = n
        for i in range(n):
            self.scratch[i] = self.byte_ids[p[i]]
        n = self.merge_chunk(self.scratch, n)
        return tuple([self.scratch[i] for i in range(n)])

    def encode_piece(self, str piece not None):
        """One chunk -> its ids, as a tuple (gptcore.bpe.encode_chunk_reference's twin)."""
        return self._encode_piece(piece)

    def encode_gpt2(self, str text not None, const uint8_t[::1] classes not None):
        """text -> ids: GPT-2's pre-split (chunk_end), then the merge loop per distinct chunk."""
        cdef Py_ssize_t n = PyUnicode_GET_LENGTH(text), i = 0, end
        cdef int kind = PyUnicode_KIND(text)
        cdef const void* data = PyUnicode_DATA(text)
        cdef dict cache = {}
        cdef list out = []
        cdef object ids
        while i < n:
            end = chunk_end(kind, data, n, i, &classes[0])
            piece = text[i:end]
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
                cache[piece] = ids
            out.extend(<tuple>ids)
            i = end
        return out

    def encode_chunks(self, list pieces not None):
        """Chunks already split (by `regex`, for a pattern other than GPT-2's) -> ids."""
        cdef dict cache = {}
        cdef list out = []
        cdef object ids
        for piece in pieces:
            ids = cache.get(piece)
            if ids is None:
                ids = self._encode_piece(piece)
                cache[piece] = ids
            out.extend(<tuple>ids)
        return out


# ----------------------------------------------------------------------------------------------------
# The incremental trainer (gptcore.bpe.train_incremental over C arrays)
# ----------------------------------------------------------------------------------------------------

cdef struct IdList:                 # a growable array of word indices
    int32_t* data
    Py_ssize_t size
    Py_ssize_t capacity

cdef struct HeapEntry:
    int64_t count
    int32_t left
    int32_t right


cdef inline bint _pops_first(HeapEntry x, HeapEntry y) noexcept nogil:
    """The heap's order is the tie rule: the larger count, then the smaller left id, then the smaller right."""
    if x.count != y.count:
        return x.count > y.count
    if x.left != y.left:
        return x.left < y.left
    return x.right < y.right


cdef int _append(IdList* ids, int32_t value) except -1 nogil:
    cdef int32_t* grown
    if ids.size == ids.capacity:
        ids.capacity = 4 if ids.capacity == 0 else 2 * ids.capacity
        grown = <int32_t*>realloc(ids.data, ids.capacity * sizeof(int32_t))
        if grown == NULL:
            with gil:
                raise MemoryError()
        ids.data = grown
    ids.data[ids.size] = value
    ids.size += 1
    return 0


cdef class _PairTable:
    """pair -> (count over all words, times their frequency; the words it was seen in), open addressing."""
    cdef uint64_t* keys
    cdef int64_t* counts
    cdef IdList* words
    cdef int32_t* stamps           # the merge at which the pair was last queued for a heap push
    cdef Py_ssize_t capacity, used

    def __cinit__(self):
        self.capacity, self.used = 0, 0
        self._allocate(1 << 16)

    cdef int _allocate(self, Py_ssize_t capacity) except -1:
        self.keys = <uint64_t*>malloc(capacity * sizeof(uint64_t))
        self.counts = <int64_t*>malloc(capacity * sizeof(int64_t))
        self.words = <IdList*>malloc(capacity * sizeof(IdList))
        self.stamps = <int32_t*>malloc(capacity * sizeof(int32_t))
        if not self.keys or not self.counts or not self.words or not self.stamps:
            raise MemoryError()
        memset(self.keys, 0, capacity * sizeof(uint64_t))
        self.capacity = capacity
        return 0

    def __dealloc__(self):
        cdef Py_ssize_t s
        if self.keys != NULL:
            for s in range(self.capacity):
                if self.keys[s] != 0:
                    free(self.words[s].data)
        free(self.keys)
        free(self.counts)
        free(self.words)
        free(self.stamps)

    cdef Py_ssize_t find(self, int32_t left, int32_t right) noexcept:
        """The pair's slot, or -1."""
        cdef uint64_t key = _pair_key(left, right)
        cdef uint64_t mask = self.capacity - 1
        cdef uint64_t h = _slot(key, mask)
        while self.keys[h] != 0:
            if self.keys[h] == key:
                return h
            h = (h + 1) & mask
        return -1

    cdef Py_ssize_t slot(self, int32_t left, int32_t right) except -1:
        """The pair's slot, made (count 0, no words) if the pair is new. May move every slot."""
        cdef uint64_t key = _pair_key(left, right)
        cdef uint64_t mask, h
        if 2 * (self.used + 1) > self.capacity:
            self._grow()
        mask = self.capacity - 1
        h = _slot(key, mask)
        while self.keys[h] != 0:
            if self.keys[h] == key:
                return h
            h = (h + 1) & mask
        self.keys[h] = key
        self.counts[h] = 0
        self.words[h].data, self.words[h].size, self.words[h].capacity = NULL, 0, 0
        self.stamps[h] = -1
        self.used += 1
        return h

    cdef int _grow(self) except -1:
        cdef uint64_t* keys = self.keys
        cdef int64_t* counts = self.counts
        cdef IdList* words = self.words
        cdef int32_t* stamps = self.stamps
        cdef Py_ssize_t old, s
        cdef uint64_t mask, h
        old = self.capacity
        self._allocate(2 * old)
        mask = self.capacity - 1
        for s in range(old):
            if keys[s] != 0:
                h = _slot(keys[s], mask)
                while self.keys[h] != 0:
                    h = (h + 1) & mask
                self.keys[h], self.counts[h], self.words[h], self.stamps[h] = keys[s], counts[s], words[s], stamps[s]
        free(keys)
        free(counts)
        free(words)
        free(stamps)
        return 0


cdef class _Heap:
    cdef HeapEntry* entries
    cdef Py_ssize_t size, capacity

    def __cinit__(self):
        self.size, self.capacity = 0, 1024
        self.entries = <HeapEntry*>malloc(self.capacity * sizeof(HeapEntry))
        if self.entries == NULL:
            raise MemoryError()

    def __dealloc__(self):
        free(self.entries)

    cdef int push(self, int64_t count, int32_t left, int32_t right) except -1:
        cdef HeapEntry* grown
        cdef HeapEntry entry
        cdef Py_ssize_t i, parent
        if self.size == self.capacity:
            grown = <HeapEntry*>realloc(self.entries, 2 * self.capacity * sizeof(HeapEntry))
            if grown == NULL:
                raise MemoryError()
            self.entries, self.capacity = grown, 2 * self.capacity
        entry.count, entry.left, entry.right = count, left, right
        i = self.size
        self.size += 1
        while i > 0:                                   # sift up
            parent = (i - 1) // 2
            if not _pops_first(entry, self.entries[parent]):
                break
            self.entries[i] = self.entries[parent]
            i = parent
        self.entries[i] = entry
        return 0

    cdef HeapEntry pop(self) noexcept:
        cdef HeapEntry top = self.entries[0], last
        cdef Py_ssize_t i = 0, child
        self.size -= 1
        last = self.entries[self.size]
        while True:                                    # sift the last entry down from the root
            child = 2 * i + 1
            if child >= self.size:
                break
            if child + 1 < self.size and _pops_first(self.entries[child + 1], self.entries[child]):
                child += 1
            if not _pops_first(self.entries[child], last):
                break
            self.entries[i] = self.entries[child]
            i = child
        if self.size > 0:
            self.entries[i] = last
        return top


def train_merges(dict chunk_counts not None, Py_ssize_t n_merges):
    """{chunk bytes: frequency} -> up to n_merges merges [(left, right)], the i-th making id 256 + i:
    gptcore.bpe.train_incremental, the same algorithm and the same heap order, over C arrays."""
    cdef Py_ssize_t n_words = len(chunk_counts), total = 0, w, i, j, out, s, k
    cdef const unsigned char* raw
    for chunk in chunk_counts:
        total += len(<bytes>chunk)
    cdef int32_t* symbols = <int32_t*>malloc((total + 1) * sizeof(int32_t))
    cdef int64_t* starts = <int64_t*>malloc((n_words + 1) * sizeof(int64_t))
    cdef int32_t* lengths = <int32_t*>malloc((n_words + 1) * sizeof(int32_t))
    cdef int64_t* freqs = <int64_t*>malloc((n_words + 1) * sizeof(int64_t))
    cdef int32_t* seen = <int32_t*>malloc((n_words + 1) * sizeof(int32_t))   # the merge that last rewrote the word
    cdef IdList changed, holders
    changed.data, changed.size, changed.capacity = NULL, 0, 0
    cdef _PairTable pairs = _PairTable()
    cdef _Heap heap = _Heap()
    cdef HeapEntry top
    cdef int32_t left, right, new, a, b
    cdef int64_t freq
    cdef int32_t* word
    merges = []
    try:
        if not symbols or not starts or not lengths or not freqs or not seen:
            raise MemoryError()
        # every distinct chunk once, with its frequency; its bytes are its first ids
        w, i = 0, 0
        for chunk, count in chunk_counts.items():
            raw = <bytes>chunk
            starts[w], lengths[w], freqs[w], seen[w] = i, len(<bytes>chunk), count, -1
            for j in range(lengths[w]):
                symbols[i + j] = raw[j]
            i += lengths[w]
            w += 1
        for w in range(n_words):
            word = symbols + starts[w]
            for j in range(lengths[w] - 1):
                s = pairs.slot(word[j], word[j + 1])
                pairs.counts[s] += freqs[w]
                if pairs.words[s].size == 0 or pairs.words[s].data[pairs.words[s].size - 1] != w:
                    _append(&pairs.words[s], w)
        for s in range(pairs.capacity):
            if pairs.keys[s] != 0:
                heap.push(pairs.counts[s], <int32_t>((pairs.keys[s] - 1) >> 32), <int32_t>((pairs.keys[s] - 1) & 0xffffffff))

        while len(merges) < n_merges and heap.size > 0:
            top = heap.pop()
            s = pairs.find(top.left, top.right)
            if top.count <= 0 or pairs.counts[s] != top.count:
                continue                               # stale: the count changed after this push
            left, right, new = top.left, top.right, 256 + len(merges)
            merges.append((left, right))
            holders = pairs.words[s]                   # ours now: slots move when the table grows
            pairs.words[s].data, pairs.words[s].size, pairs.words[s].capacity = NULL, 0, 0
            pairs.counts[s] = 0
            changed.size = 0
            for k in range(holders.size):
                w = holders.data[k]
                if seen[w] == new:
                    continue                           # listed twice: done already
                word, freq = symbols + starts[w], freqs[w]
                for j in range(lengths[w] - 1):
                    if word[j] == left and word[j + 1] == right:
                        break
                else:
                    continue                           # the pair left this word in an earlier merge
                seen[w] = new
                for j in range(lengths[w] - 1):        # take the old word's pairs away ...
                    s = pairs.find(word[j], word[j + 1])
                    pairs.counts[s] -= freq
                    _append(&changed, word[j])
                    _append(&changed, word[j + 1])
                out = _replace_pair(word, lengths[w], left, right, new)   # ... merge ...
                lengths[w] = out
                for j in range(out - 1):               # ... and add the new word's pairs back
                    s = pairs.slot(word[j], word[j + 1])
                    pairs.counts[s] += freq
                    if pairs.words[s].size == 0 or pairs.words[s].data[pairs.words[s].size - 1] != w:
                        _append(&pairs.words[s], w)
                    _append(&changed, word[j])
                    _append(&changed, word[j + 1])
            free(holders.data)
            pairs.counts[pairs.find(left, right)] = 0  # gone from every word, and it never comes back
            for k in range(0, changed.size, 2):        # one fresh heap entry per changed pair
                a, b = changed.data[k], changed.data[k + 1]
                s = pairs.find(a, b)
                if (a != left or b != right) and pairs.stamps[s] != new and pairs.counts[s] > 0:
                    pairs.stamps[s] = new
                    heap.push(pairs.counts[s], a, b)
    finally:
        free(symbols)
        free(starts)
        free(lengths)
        free(freqs)
        free(seen)
        free(changed.data)
    return merges
