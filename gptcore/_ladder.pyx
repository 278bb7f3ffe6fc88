"""gptcore._ladder: the matmul optimisation ladder, one idea per rung, each rung a kernel you can call.

WHAT'S GOING ON HERE
====================

WHAT
  One product, computed six ways:
      out (N, OC) = inp (N, IC) @ weight (IC, OC),    out[n, o] = sum_i inp[n, i] * weight[i, o]
  (no bias: the bias add is cheap and the same on every rung). Each rung keeps what the rung before it
  did and adds one idea:
      matmul_naive        the textbook triple loop, one thread
      matmul_loop_order   the same arithmetic, loops swapped so the inner loop walks memory in order
      matmul_threads      + rows split over threads
      matmul_tiled        + cache blocking (which, at the model's sizes, buys almost nothing: see below)
      matmul_packed       + weight copied into contiguous 32-column panels
      matmul_microkernel  + a 6 x 32 register-blocked micro-kernel
  The seventh and last rung is the production kernel, gptcore._kernels.matmul_forward: the micro-kernel
  plus a 6 x 16 edge kernel for ragged widths, a one-row path for generation, and a cache-aware tile
  order. It is not copied here; gptcore.ladder.RUNGS calls it where it is.

WHERE
  Nothing in the model calls these: they are for reading and for measuring. gptcore.ladder is their
  checked public face, and `make ladder` (bench/ladder.py) times every rung at the baby GPT's matmul
  shapes next to numpy/OpenBLAS and prints GFLOP/s. The comment above each rung says what it changes,
  why that helps, and what it costs; the table says by how much, on your machine.

HOW (threads)
  From matmul_threads on, the work is split by who owns the output: a row of out, a block of rows, or a
  6 x 32 tile. One thread computes each output element from start to finish, summing its IC terms in
  ascending i, so 1 and N threads give bit-identical results (tests/test_ladder.py checks 1 vs 2). The
  thread count is OpenMP's default, which gptcore.kernels.set_num_threads sets (num_threads() below
  reports it). Small products stay on one thread, by the same rule as the production kernel.

CONTRACT
  float32, C-contiguous, shapes already checked and non-empty (gptcore.ladder does that; bounds checks
  are compiled out, see setup.py). out is overwritten, never read first.

TWIN
  numpy in float64: tests/test_ladder.py holds every rung to inp @ weight within the float32 rounding
  bound, on awkward sizes.
"""
from cython.parallel cimport prange
from libc.stdlib cimport free

cimport openmp


cdef extern from "stdlib.h" nogil:
    # C11; 64-byte alignment lets the packed panels be read with aligned full-width vector loads.
    void* aligned_alloc(size_t alignment, size_t size)


# Below this many flops a product stays on the calling thread: waking a second thread costs more than
# the work (the same threshold as PARALLEL_MIN_WORK in gptcore/_kernels.pyx, where it is explained).
cdef Py_ssize_t PARALLEL_MIN_WORK = 1 << 15


def num_threads():
    """The number of threads the threaded rungs use: OpenMP's default, set by kernels.set_num_threads."""
    return openmp.omp_get_max_threads()


cdef inline bint _worth_threads(Py_ssize_t N, Py_ssize_t IC, Py_ssize_t OC) noexcept nogil:
    return 2 * N * IC * OC >= PARALLEL_MIN_WORK


# ----------------------------------------------------------------------------------------------------
# Rung 1. Naive: the i, j, k triple loop
# ----------------------------------------------------------------------------------------------------
# IDEA   The definition, as written: for each output out[n, o], a dot product of row n of inp with
#        column o of weight.
# COST   Two things make it slow, and neither is the arithmetic.
#        - The column walk: weight[i, o] for i = 0, 1, 2, ... sits OC floats apart in memory, so every
#          term loads a fresh 64-byte cache line and uses 4 bytes of it. A line is reused only if it is
#          still in cache when the next column o + 1 comes round.
#        - One running sum: each `acc += ...` must wait for the previous one to finish (a few cycles of
#          FMA latency), and the compiler may not reorder a float sum to run several at once (that
#          would change the rounding; only -ffast-math allows it, and we refuse it). So not even one
#          vector lane's worth of the machine's parallelism is used.
#        One thread, too. This is the baseline every other rung is measured against.

def matmul_naive(float[:, ::1] out not None, const float[:, ::1] inp not None,
                 const float[:, ::1] weight not None):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC) by the triple loop, one output at a time."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n, o, i
    cdef float acc
    with nogil:
        for n in range(N):
            for o in range(OC):
                acc = 0.0
                for i in range(IC):
                    acc = acc + inp[n, i] * weight[i, o]      # weight[i, o]: stride OC floats
                out[n, o] = acc


# ----------------------------------------------------------------------------------------------------
# Rung 2. Loop order: i, k, j
# ----------------------------------------------------------------------------------------------------
# IDEA   Same products, same sums, the two inner loops swapped: row n of out is built as a sum of rows
#        of weight,  out[n, :] = sum_i inp[n, i] * weight[i, :].  For each i we take one number,
#        a = inp[n, i], and add a * (row i of weight) into the row of out (an "axpy").
# WHY    The inner loop now walks weight and out with unit stride: every byte of every cache line is
#        used, and the compiler vectorizes it, 16 floats per AVX-512 instruction. And the 16 lanes
#        are 16 *different* outputs, so their sums are independent: no float reordering is needed, and
#        each out[n, o] still sums its terms in ascending i, exactly as in rung 1.
# COST   Every step of the inner loop loads out[n, o], does one FMA, and stores out[n, o] back: two
#        loads and a store per FMA. The core can issue only a few memory operations per cycle, so this
#        loop is bound by load/store traffic to L1, not by the FMA units. That is the wall the later
#        rungs are about. (Still one thread.)

cdef void _row_loop_order(float* out_row, const float* inp_row, const float* weight,
                          Py_ssize_t IC, Py_ssize_t OC) noexcept nogil:
    """out_row (OC,) = inp_row (IC,) @ weight (IC, OC), one axpy per row of weight."""
    cdef Py_ssize_t i, o
    cdef float a
    cdef const float* w_row
    for o in range(OC):
        out_row[o] = 0.0
    for i in range(IC):
        a = inp_row[i]
        w_row = weight + i * OC
        for o in range(OC):                  # unit stride in out_row and w_row: vectorized
            out_row[o] += a * w_row[o]


def matmul_loop_order(float[:, ::1] out not None, const float[:, ::1] inp not None,
                      const float[:, ::1] weight not None):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC), row by row as sums of rows of weight; one thread."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n
    with nogil:
        for n in range(N):
            _row_loop_order(&out[n, 0], &inp[n, 0], &weight[0, 0], IC, OC)


# ----------------------------------------------------------------------------------------------------
# Rung 3. Threads: rows split over cores
# ----------------------------------------------------------------------------------------------------
# IDEA   Rung 2's rows are independent: row n of out depends on row n of inp and all of weight, and
#        nothing else writes it. So a prange over rows hands each thread a contiguous run of rows
#        (schedule='static'), with no locks and no races.
# WHY    Up to one core's worth of speed per thread, as long as the cores are not fighting over
#        memory bandwidth; here every thread reads the same weight, which each core keeps in its
#        own L2, so they are not.
# COST   Waking the threads (microseconds; why small products stay serial). Each core still hits rung
#        2's load/store wall, so the best this buys is a factor of the core count.

def matmul_threads(float[:, ::1] out not None, const float[:, ::1] inp not None,
                   const float[:, ::1] weight not None):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC): rung 2 with its rows split over threads."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n
    with nogil:
        for n in prange(N, schedule='static', use_threads_if=_worth_threads(N, IC, OC)):
            _row_loop_order(&out[n, 0], &inp[n, 0], &weight[0, 0], IC, OC)


# ----------------------------------------------------------------------------------------------------
# Rung 4. Cache tiling (blocking)
# ----------------------------------------------------------------------------------------------------
# IDEA   The classic fix for a matrix too big for cache: cut the loops into blocks so that a small
#        piece of weight (TILE_K rows x TILE_COLS columns = 16 KB, half a 32 KB L1) is reused by
#        TILE_ROWS rows of inp while it is still in L1, instead of being fetched again for every row.
#            for each block of rows (one thread owns it):
#                for each block of k:  for each block of columns:
#                    for n in the row block:  for i in the k block:
#                        out[n, cols] += inp[n, i] * weight[i, cols]      (rung 2's axpy, shortened)
#        Each out[n, o] still sums its terms in ascending i (k blocks in order, i in order inside), so
#        this rung gives exactly rung 3's bits.
# WHY    It pays when weight does not fit in a cache level that rung 3 then misses every row.
# COST   And here, honestly, it buys almost nothing: run `make ladder` and compare with rung 3. At the
#        model's shapes weight is at most 512 x 128 floats = 256 KB, which sits in each core's L2
#        already, and streaming it from L2 is not what holds rung 3 back: the load and store of out at
#        every FMA is, and blocking does not change that. (Its shorter inner loops cost some loop
#        overhead, too, so it can even come out slower.)
#        Blocking becomes essential for the big matrices of real GPT-2 sizes, and the production
#        kernel's tile order does a version of it; the big step at these sizes is rung 6.

cdef enum:
    TILE_ROWS = 16
    TILE_COLS = 128
    TILE_K = 32

TILED_BLOCKS = {"rows": TILE_ROWS, "cols": TILE_COLS, "k": TILE_K}   # for the tests


cdef void _row_block_tiled(float* out, const float* inp, const float* weight, Py_ssize_t row0,
                           Py_ssize_t row1, Py_ssize_t IC, Py_ssize_t OC) noexcept nogil:
    """Rows [row0, row1) of out (N, OC) = inp (N, IC) @ weight (IC, OC), in cache blocks."""
    cdef Py_ssize_t n, i, o, kb, cb, k0, k1, c0, c1
    cdef float a
    cdef float* out_row
    cdef const float* w_row
    for n in range(row0, row1):
        for o in range(OC):
            out[n * OC + o] = 0.0
    for kb in range((IC + TILE_K - 1) // TILE_K):
        k0 = kb * TILE_K
        k1 = min(k0 + TILE_K, IC)
        for cb in range((OC + TILE_COLS - 1) // TILE_COLS):
            c0 = cb * TILE_COLS
            c1 = min(c0 + TILE_COLS, OC)
            # the block weight[k0:k1, c0:c1] stays in L1 while every row of the block uses it
            for n in range(row0, row1):
                out_row = out + n * OC
                for i in range(k0, k1):
                    a = inp[n * IC + i]
                    w_row = weight + i * OC
                    for o in range(c0, c1):
                        out_row[o] += a * w_row[o]


def matmul_tiled(float[:, ::1] out not None, const float[:, ::1] inp not None,
                 const float[:, ::1] weight not None):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC): rung 3 in blocks of rows x k x columns."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n_blocks = (N + TILE_ROWS - 1) // TILE_ROWS, rb
    with nogil:
        for rb in prange(n_blocks, schedule='static', use_threads_if=_worth_threads(N, IC, OC)):
            _row_block_tiled(&out[0, 0], &inp[0, 0], &weight[0, 0], rb * TILE_ROWS,
                             min(rb * TILE_ROWS + TILE_ROWS, N), IC, OC)


# ----------------------------------------------------------------------------------------------------
# Packing weight into panels (rungs 5 and 6)
# ----------------------------------------------------------------------------------------------------
# The output is cut into tiles of MR = 6 rows x NR = 32 columns. Before any tile runs, weight is copied
# into panels: panel p holds columns [32p, 32p + 32) of weight as one contiguous IC x 32 block, the last
# panel zero-filled past column OC. A tile then reads its k-th 32 weights as one aligned 128-byte run
# (two AVX-512 registers), whatever OC is. Threads own tiles; we walk them row-major (a block of 6 rows
# through every panel), so the block's 6 rows of inp stay in L1 while the panels stream from L2.
# Packing costs one copy of weight per call (IC * OC floats, small next to the N * IC * OC FMAs) and
# IC * 32 * ceil(OC / 32) floats of memory.

cdef enum:
    MR = 6       # rows of out per tile
    NR = 32      # columns of out per tile = floats per packed panel row


cdef void _pack_panel(float* panel, const float* weight, Py_ssize_t IC, Py_ssize_t OC,
                      Py_ssize_t p) noexcept nogil:
    """panel (IC, 32) = weight[:, 32p : 32p + 32], zero-filled past column OC."""
    cdef Py_ssize_t col0 = p * NR, cols = min(NR, OC - p * NR), i, j
    for i in range(IC):
        for j in range(cols):
            panel[i * NR + j] = weight[i * OC + col0 + j]
        for j in range(cols, NR):
            panel[i * NR + j] = 0.0


cdef float* _pack(const float* weight, Py_ssize_t IC, Py_ssize_t OC, bint threads) noexcept nogil:
    """Every panel of weight, packed into one 64-byte-aligned buffer (NULL if out of memory). The
    caller frees it."""
    cdef Py_ssize_t n_panels = (OC + NR - 1) // NR, p
    # aligned_alloc wants a size that is a multiple of the alignment
    cdef float* packed = <float*> aligned_alloc(64, (n_panels * IC * NR * sizeof(float) + 63) // 64 * 64)
    if packed == NULL:
        return NULL
    for p in prange(n_panels, schedule='static', use_threads_if=threads and n_panels > 1):
        _pack_panel(packed + p * IC * NR, weight, IC, OC, p)
    return packed


# ----------------------------------------------------------------------------------------------------
# Rung 5. Packed panels, simple kernel
# ----------------------------------------------------------------------------------------------------
# IDEA   Pack weight (above), then compute each 6 x 32 tile with the same loops as rung 6 but without
#        its registers: at every k, each of the tile's 6 rows of out takes an axpy of the panel's row k,
#            for k:  for each of the tile's rows r:  out[r, 0:32] += inp[r, k] * panel[k, 0:32]
#        so the tile of out lives in memory (L1) and is loaded and stored at every k.
# WHY    Packing is the layout the micro-kernel of rung 6 needs: a fixed width of 32, aligned, with no
#        ragged end, so that the tile's loops have constant bounds. It also frees the kernel from
#        weight's layout (the production kernel packs a transposed weight the same way). On its own
#        it buys little here (compare rungs 3 and 5 in `make ladder`): weight's rows were already
#        contiguous and in L2, and this kernel still moves out through a load and a store per FMA,
#        rung 2's wall. It is the foundation, not the win.
#        The loop order matters even so. With r outside k, the same two vectors of out would be
#        updated at every k, each update waiting for the previous one to come back through memory
#        (store, reload, FMA): one dependency chain, and the core would mostly wait on it. With k
#        outside r, 6 rows x 2 vectors = 12 independent updates can be in flight at once.
# COST   The packing copy and buffer above; a short inner loop (32 floats) restarted 6 times per k.

cdef void _tile_simple(float* out, Py_ssize_t OC, const float* inp, Py_ssize_t IC, Py_ssize_t row0,
                       int rows, const float* panel, Py_ssize_t col0, int cols) noexcept nogil:
    """out[row0 : row0 + rows, col0 : col0 + cols] = inp[row0 : row0 + rows, :] @ panel[:, :cols]."""
    cdef Py_ssize_t k
    cdef int r, j
    cdef float a
    cdef float* c
    cdef const float* b
    for r in range(rows):
        c = out + (row0 + r) * OC + col0
        for j in range(cols):
            c[j] = 0.0
    for k in range(IC):
        b = panel + k * NR
        for r in range(rows):
            a = inp[(row0 + r) * IC + k]
            c = out + (row0 + r) * OC + col0
            for j in range(cols):               # out is loaded and stored at every k
                c[j] += a * b[j]


def matmul_packed(float[:, ::1] out not None, const float[:, ::1] inp not None,
                  const float[:, ::1] weight not None):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC): weight packed into 32-column panels, 6 x 32 tiles
    over threads, a plain axpy kernel per tile."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n_panels = (OC + NR - 1) // NR, n_row_blocks = (N + MR - 1) // MR, tile, p, rb
    cdef bint threads = _worth_threads(N, IC, OC)
    cdef float* packed
    with nogil:
        packed = _pack(&weight[0, 0], IC, OC, threads)
        if packed != NULL:
            for tile in prange(n_row_blocks * n_panels, schedule='static', use_threads_if=threads):
                rb = tile // n_panels
                p = tile % n_panels
                _tile_simple(&out[0, 0], OC, &inp[0, 0], IC, rb * MR, <int> min(MR, N - rb * MR),
                             packed + p * IC * NR, p * NR, <int> min(NR, OC - p * NR))
            free(packed)
    if packed == NULL:
        raise MemoryError("matmul_packed: could not allocate the packed panels")


# ----------------------------------------------------------------------------------------------------
# Rung 6. The register-blocked micro-kernel
# ----------------------------------------------------------------------------------------------------
# IDEA   Keep the whole 6 x 32 tile of out in registers for the entire k loop. Per k step:
#            load 32 floats of the panel        (2 vector loads, reused by all 6 rows)
#            broadcast 6 floats of inp          (one per row, each reused by 32 columns)
#            12 FMAs into 12 accumulator registers (6 rows x 2 vectors of 16)
#        and out is written once per tile, at the end. We write it as plain C loops over a local
#        `float acc[6][32]` with constant bounds; gcc unrolls them and keeps acc in 12 zmm registers
#        (check: `make asm`, then look for vbroadcastss + vfmadd231ps on zmm in build/_ladder.s).
# WHY    Rungs 2-5 did one FMA per two loads and a store. This does 12 FMAs per 8 loads and no stores:
#        the FMA units, not the memory ports, become the limit. The 12 independent accumulators also
#        hide the FMA latency that rung 1 waited on. This is the step that closes most of the gap
#        to OpenBLAS.
# COST   Every tile computes 6 x 32 outputs, real or not. Rows past N in the last row block read row 0
#        again (the results are thrown away), and a ragged last panel is zero-padded to 32 columns:
#        at OC = 65 (two full panels and one column) the third panel does 32 columns of work for 1
#        real one, so a third of all the FMAs are wasted. The production kernel's edge kernel
#        halves that waste; compare the last two rungs at 768 x 128 @ 128 x 65 in `make ladder`.

# This _tile_6x32 repeats the inner loop of gptcore/_kernels.pyx's _tile_full on purpose: the rung is
# the lesson's version (unit-stride inp, a plain store at the end), the production one reads A
# through strides and finishes through _store_tile. Sharing one would put the production kernel's
# stride and bias arguments into the lesson, and make this module depend on the kernels' internals.
cdef void _tile_6x32(float* out, Py_ssize_t OC, const float* inp, Py_ssize_t IC, Py_ssize_t N,
                     Py_ssize_t row0, const float* panel, Py_ssize_t col0, int cols) noexcept nogil:
    """out[row0 : row0 + 6, col0 : col0 + cols] = inp[row0 : row0 + 6, :] @ panel, in registers."""
    cdef float acc[MR][NR]
    # rows past N point at row 0: always valid memory, and their results are never stored
    cdef const float* a0 = inp + (row0 + 0 if row0 + 0 < N else 0) * IC
    cdef const float* a1 = inp + (row0 + 1 if row0 + 1 < N else 0) * IC
    cdef const float* a2 = inp + (row0 + 2 if row0 + 2 < N else 0) * IC
    cdef const float* a3 = inp + (row0 + 3 if row0 + 3 < N else 0) * IC
    cdef const float* a4 = inp + (row0 + 4 if row0 + 4 < N else 0) * IC
    cdef const float* a5 = inp + (row0 + 5 if row0 + 5 < N else 0) * IC
    cdef const float* b
    cdef float x0, x1, x2, x3, x4, x5
    cdef Py_ssize_t k
    cdef int r, j, rows = <int> min(MR, N - row0)
    for r in range(MR):
        for j in range(NR):
            acc[r][j] = 0.0
    for k in range(IC):
        b = panel + k * NR                         # 32 consecutive floats: two zmm loads
        x0 = a0[k]; x1 = a1[k]; x2 = a2[k]        # six broadcasts
        x3 = a3[k]; x4 = a4[k]; x5 = a5[k]
        for j in range(NR):                        # 6 x 2 = 12 vector FMAs
            acc[0][j] += x0 * b[j]
            acc[1][j] += x1 * b[j]
            acc[2][j] += x2 * b[j]
            acc[3][j] += x3 * b[j]
            acc[4][j] += x4 * b[j]
            acc[5][j] += x5 * b[j]
    for r in range(rows):                          # write back only the real rows and columns
        for j in range(cols):
            out[(row0 + r) * OC + col0 + j] = acc[r][j]


def matmul_microkernel(float[:, ::1] out not None, const float[:, ::1] inp not None,
                       const float[:, ::1] weight not None):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC): packed panels, 6 x 32 register-blocked tiles over
    threads, ragged widths zero-padded to 32."""
    # The driver is rung 5's, line for line, and stays written out: only the tile function changed,
    # which is this rung's whole point, and each rung should read on its own.
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = weight.shape[1]
    cdef Py_ssize_t n_panels = (OC + NR - 1) // NR, n_row_blocks = (N + MR - 1) // MR, tile, p, rb
    cdef bint threads = _worth_threads(N, IC, OC)
    cdef float* packed
    with nogil:
        packed = _pack(&weight[0, 0], IC, OC, threads)
        if packed != NULL:
            for tile in prange(n_row_blocks * n_panels, schedule='static', use_threads_if=threads):
                rb = tile // n_panels
                p = tile % n_panels
                _tile_6x32(&out[0, 0], OC, &inp[0, 0], IC, N, rb * MR, packed + p * IC * NR, p * NR,
                           <int> min(NR, OC - p * NR))
            free(packed)
    if packed == NULL:
        raise MemoryError("matmul_microkernel: could not allocate the packed panels")
