"""gptcore._kernels: the compiled core. Every hot loop of GPT-2 training, in Cython with OpenMP.

WHAT'S GOING ON HERE
====================

WHAT
  The forward and backward passes of every layer a GPT-2 is made of: matmul (+bias), softmax, GELU,
  layernorm, causal multi-head attention, fused softmax + cross-entropy, token + position embedding,
  the residual add, dropout, and the AdamW update. The math of each sits in the comment above it.

  Dimension letters, used everywhere in gptcore:
      B  batch size                 T  sequence length (time)       C  channels (n_embd)
      NH number of heads            hs head size = C // NH          V  vocabulary size
      N  rows, N = B*T when a (B, T, C) activation is seen as a matrix (N, C)
      IC, OC  input and output channels of a matmul

WHERE
  One module imports this one: gptcore.compiled, the adapter that gives every function here the name
  and signature of its twin in gptcore.reference (inputs first, outputs as keyword arguments, leading
  dimensions flattened). Through it, gptcore.model (and the optimizers, via gptcore.backends) call
  these once per layer per step, and gptcore.kernels, the checked API for users, calls them after its
  checks.

HOW (threads)
  Every parallel loop is split by *who owns the output*: a row of the output (layernorm, softmax,
  cross-entropy, a position's row of d_wpe), a (batch, head) pair (attention), a tile of the output
  matrix (matmul), a block of 16 output channels (the reductions over rows: d_bias, d_weight of
  layernorm, d_wte).
  One thread writes each output element, and it sums its terms in an order fixed by the loop, not by
  the thread count. So there are no float atomics and no races, and 1 thread and 8 threads give
  bit-identical results (tests/test_kernels.py checks 1 vs 2).

  Opening an OpenMP parallel region is not free on a 2-core machine (microseconds when the threads are
  warm, far more when they slept), so every prange carries `use_threads_if=` a work estimate (the
  *_FLOPS_* constants below): small work runs serially on the calling thread.

  So every public def has the same few lines: read the sizes, return on empty input, release the
  GIL, prange over the units of ownership calling one `noexcept nogil` helper per unit. We write
  those lines out in each def rather than share them: each def's prange takes different typed
  memoryviews and a different helper signature, and Cython has no templates to write one driver for
  all of them; a driver over function pointers would need one pointer type per signature and would
  hide, in each kernel, which loop is parallel, which is the thing a reader of this file looks for.

CONTRACT
  float32, C-contiguous, shapes already checked. These functions trust their caller: bounds checks are
  compiled out (see setup.py), so a wrong shape here reads or writes stray memory. Who checks: for
  users, gptcore.kernels (every dtype, shape, range and alias, with gptcore.validate); for the model,
  gptcore.model itself, which builds every buffer it passes from its config and checks the token ids
  and targets once per forward (GPT.forward). Typed memoryviews still refuse a wrong dtype, rank or
  a non-contiguous array, and `not None` refuses None. Outputs come first in every signature (as in
  llm.c); forward outputs are
  overwritten, backward outputs are accumulated (+=), so a gradient flowing into a tensor from two
  places (the residual stream, tied weights) simply adds up.

TWIN
  gptcore.reference implements every function again in plain Python loops, in double precision; the
  tests hold each kernel here to its twin.
"""
from cython.parallel cimport prange
from libc.math cimport copysignf, fabsf, log, sqrt, sqrtf
from libc.stdlib cimport free, malloc
from libc.string cimport memset

cimport openmp


cdef extern from "stdlib.h" nogil:
    # C11; 64-byte alignment lets the packed panels be loaded with aligned full-width vector loads.
    void* aligned_alloc(size_t alignment, size_t size)


# ----------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------

# The thread count every prange uses. It starts at OpenMP's default, which honours OMP_NUM_THREADS.
cdef int _num_threads = openmp.omp_get_max_threads()

# Below this many floating-point operations a loop stays on one thread. Waking a second thread costs
# about a microsecond when it is spinning and tens of microseconds when it has gone to sleep, while a
# microsecond is some 20k flops of work on one core; we want the parallel win to be clear, not marginal.
cdef Py_ssize_t PARALLEL_MIN_WORK = 1 << 15

# The work estimates every prange hands to _worth_threads: floating-point operations per element (or
# per multiply-add) of each kernel, counted roughly from its inner loop. They only decide whether a
# loop is big enough to be worth a second thread, so a factor of two either way changes little.
cdef enum:
    # a multiply and an add: matmul's N*IC*OC terms, sum_of_squares' x*x + total
    FLOPS_PER_MULTIPLY_ADD = 2
    # one add per element: the residual add and its backward, column sums, embedding rows
    ADD_FLOPS_PER_ELEMENT = 1
    # the max, the subtraction, _exp's polynomial (~15 operations), the sum and the scaling
    SOFTMAX_FLOPS_PER_ELEMENT = 20
    # softmax_backward: the dot product p . dp, then p * (dp - dot) accumulated
    SOFTMAX_BACKWARD_FLOPS_PER_ELEMENT = 4
    # cross_entropy_backward: d_logits += scale * probs
    CROSS_ENTROPY_BACKWARD_FLOPS_PER_ELEMENT = 2
    # _gelu: the cubic, _tanh's rational function (~14 operations) and the final products
    GELU_FLOPS_PER_ELEMENT = 20
    # _gelu_grad: the same tanh plus the derivative's polynomial, and the multiply-add into d_x
    GELU_BACKWARD_FLOPS_PER_ELEMENT = 30
    # layernorm_forward: the mean, the centred squares, then normalise, scale and shift
    LAYERNORM_FLOPS_PER_ELEMENT = 8
    # the d_x rows of layernorm_backward: g, xhat, two row sums and the final combination
    LAYERNORM_BACKWARD_FLOPS_PER_ELEMENT = 10
    # the d_weight and d_bias columns of layernorm_backward: xhat again and two accumulations
    LAYERNORM_PARAMS_FLOPS_PER_ELEMENT = 4
    # the AdamW update: two moments, a square root, a divide and the step
    ADAMW_FLOPS_PER_ELEMENT = 10
    # dropout: the hash (two xor-shifts, two multiplies), a compare and the scaling
    DROPOUT_FLOPS_PER_ELEMENT = 10
    # attention_forward per (b, t, s, channel): q . k and att @ v, a multiply-add each
    ATTENTION_FORWARD_FLOPS = 4
    # attention_backward per (b, t, s, channel): five products of the forward's size (the scores
    # recomputed, d_att, d_v, d_q, d_k)
    ATTENTION_BACKWARD_FLOPS = 10


def set_num_threads(int n):
    """Use n threads (n >= 1) in every kernel from now on."""
    global _num_threads
    if n < 1:
        raise ValueError(f"number of threads must be >= 1, got {n}")
    _num_threads = n
    openmp.omp_set_num_threads(n)


def get_num_threads():
    """The number of threads the kernels use."""
    return _num_threads


cdef inline bint _worth_threads(Py_ssize_t work) noexcept nogil:
    return _num_threads > 1 and work >= PARALLEL_MIN_WORK


# ----------------------------------------------------------------------------------------------------
# Small vector helpers
# ----------------------------------------------------------------------------------------------------
# gcc may not reorder a float sum without -ffast-math (which we refuse: it breaks NaN handling), so a
# plain `s += a[i] * b[i]` loop runs one add at a time. We sum into 16 independent lanes instead: each
# lane is its own sequence, so the vectorizer can keep all 16 in one register, and the final
# lane-by-lane sum has a fixed order, so the result does not depend on anything but the inputs.

cdef enum:
    LANES = 16


cdef inline float _dot(const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    """sum_i a[i] * b[i], in 16 fixed lanes."""
    cdef float lane[LANES]
    cdef Py_ssize_t i, j
    cdef float total = 0.0
    for j in range(LANES):
        lane[j] = 0.0
    i = 0
    while i + LANES <= n:
        for j in range(LANES):
            lane[j] += a[i + j] * b[i + j]
        i += LANES
    for j in range(LANES):
        total += lane[j]
    while i < n:
        total += a[i] * b[i]
        i += 1
    return total


cdef inline float _sum(const float* a, Py_ssize_t n) noexcept nogil:
    """sum_i a[i], in 16 fixed lanes."""
    cdef float lane[LANES]
    cdef Py_ssize_t i, j
    cdef float total = 0.0
    for j in range(LANES):
        lane[j] = 0.0
    i = 0
    while i + LANES <= n:
        for j in range(LANES):
            lane[j] += a[i + j]
        i += LANES
    for j in range(LANES):
        total += lane[j]
    while i < n:
        total += a[i]
        i += 1
    return total


cdef inline float _max(const float* a, Py_ssize_t n) noexcept nogil:
    """max_i a[i] (n >= 1), in 16 lanes. A NaN anywhere may or may not win; callers tolerate both,
    because a NaN input makes its row NaN through exp(a[i] - max) either way."""
    cdef float lane[LANES]
    cdef Py_ssize_t i, j
    cdef float best = a[0]
    for j in range(LANES):
        lane[j] = a[0]
    i = 0
    while i + LANES <= n:
        for j in range(LANES):
            lane[j] = a[i + j] if a[i + j] > lane[j] else lane[j]
        i += LANES
    for j in range(LANES):
        best = lane[j] if lane[j] > best else best
    while i < n:
        best = a[i] if a[i] > best else best
        i += 1
    return best


cdef inline void _axpy(float* y, float alpha, const float* x, Py_ssize_t n) noexcept nogil:
    """y += alpha * x."""
    cdef Py_ssize_t i
    for i in range(n):
        y[i] += alpha * x[i]


# ----------------------------------------------------------------------------------------------------
# exp and tanh the compiler can vectorize
# ----------------------------------------------------------------------------------------------------
# libm's expf and tanhf are function calls, one element at a time: gcc only swaps in glibc's vector
# versions under -ffast-math, which we refuse. Softmax, cross-entropy and attention spend their time in
# exp, and GELU in tanh, so we write both from multiplies, adds and one divide, which gcc turns into
# vector code as wide as the machine's registers (16 floats with AVX-512). Both are accurate to ~2 float32
# ulp and keep NaN a NaN; tests/test_kernels.py checks them against numpy in double precision.

cdef union FloatBits:
    float f
    int i


# A note on constants: we declare them as float locals inside each function, never as module globals
# or bare literals. A module-level `cdef float` could, for all gcc knows, be overwritten by any store
# through a float pointer (so it is reloaded every iteration and the loop is not vectorized), and a bare
# literal like 0.5 is a C double, which silently turns float arithmetic into double arithmetic.

cdef inline float _exp(float x) noexcept nogil:
    """exp(x) = 2^n * exp(r), with n = round(x / ln 2) and |r| <= ln(2)/2 = 0.347.
    exp(r) by its Taylor series to r^7 (truncation error 0.347^8 / 8! < 6e-9, below float32 rounding);
    2^n by writing n + 127 straight into the exponent bits of a float."""
    cdef float log2e = 1.4426950408889634
    cdef float ln2_hi = 0.693145751953125        # ln 2 in two parts: n * ln2_hi is exact for |n| < 2^11,
    cdef float ln2_lo = 1.428606765330187e-06    # so x - n ln 2 loses nothing to rounding
    cdef float round_magic = 12582912.0          # 1.5 * 2^23: (y + magic) - magic rounds y to an integer
    cdef float exp_min = -88.0                   # from about -87.7 down, n = -127 and we return 0
    cdef float exp_max = 88.3                    # we saturate here, at 2.2e38, just under FLT_MAX
    cdef float one = 1.0, c2 = 1.0 / 2, c3 = 1.0 / 6, c4 = 1.0 / 24, c5 = 1.0 / 120, c6 = 1.0 / 720
    cdef float c7 = 1.0 / 5040
    cdef float n, r, p
    cdef FloatBits two_to_n
    x = exp_max if x > exp_max else x          # written as compares, not min/max, so NaN stays NaN
    x = exp_min if x < exp_min else x
    n = (x * log2e + round_magic) - round_magic
    r = (x - n * ln2_hi) - n * ln2_lo
    p = one + r * (one + r * (c2 + r * (c3 + r * (c4 + r * (c5 + r * (c6 + r * c7))))))
    two_to_n.i = (<int> n + 127) << 23             # n = -127 gives the bit pattern of 0.0
    return p * two_to_n.f


cdef inline float _tanh(float x) noexcept nogil:
    """tanh(x) for float32 as a rational function fitted by tools/fit_tanh.py (which explains the
    method and prints the error table: max abs error 1.3e-7, max rel error 2.2e-7 over all float32
    |x| <= 9). With r = N/Q ~ tanh(x/2), tanh(x) = 2r / (1 + r^2) = 2NQ / (Q^2 + N^2); evaluated in
    this factored form the rounding errors of N and Q are damped by sech(x), and |tanh| <= 1 holds
    by construction."""
    cdef float p1 = 0.031694289296865463, p2 = 0.00016511383000761271, p3 = 9.4924637039639492e-08
    cdef float q1 = 0.11502762138843536, q2 = 0.0014174168463796377, q3 = 2.9030134101049043e-06
    cdef float clamp = 9.0                       # float32 tanh(x) rounds to +-1 beyond |x| = 9
    cdef float one = 1.0, half = 0.5
    cdef float ax = fabsf(x), t, p, q, a, b, u
    ax = clamp if ax > clamp else ax
    t = ax * ax
    p = t * (p1 + t * (p2 + t * p3))             # P(x^2) - 1
    q = t * (q1 + t * (q2 + t * q3))             # Q(x^2) - 1
    a = ax + ax * p                              # 2N
    b = a + a * q                                # 2NQ
    u = q - half * a                             # Q - N - 1
    return copysignf(b / (one + ((u + u + u * u) + b)), x)    # Q^2 + N^2 = 1 + (2u + u^2 + b)


# ----------------------------------------------------------------------------------------------------
# Matmul:  out (N, OC) = inp (N, IC) @ weight (IC, OC) + bias (OC)
# ----------------------------------------------------------------------------------------------------
# Backward, for a loss L and d_out = dL/d_out (N, OC). Each out[n, o] = sum_i inp[n, i] * weight[i, o]
# + bias[o], so
#     dL/d inp[n, i]    = sum_o d_out[n, o] * weight[i, o]     ->  d_inp    = d_out @ weight^T   (N, IC)
#     dL/d weight[i, o] = sum_n inp[n, i] * d_out[n, o]       ->  d_weight = inp^T @ d_out      (IC, OC)
#     dL/d bias[o]      = sum_n d_out[n, o]                    ->  d_bias   = column sums of d_out (OC,)
# Forward costs 2*N*IC*OC flops and backward twice that: two products of the same size.
#
# All three products are one routine, _gemm: C (M, N) (+)= A (M, K) @ B (K, N), where A and B are read
# through (row stride, column stride) pairs. A transposed operand is then just swapped strides, and we
# never materialize inp^T or weight^T.
#
# How _gemm gets close to OpenBLAS speed, in order of effect:
#   1. A register-blocked micro-kernel. C is cut into 6 x NR tiles, where NR is two vector registers
#      wide: 32 floats on a CPU with AVX-512, 16 with AVX2 (see NR below). For one tile we keep the 6*NR
#      running sums in 12 vector registers for the whole k loop; each k step loads NR floats of B (2
#      vector loads), broadcasts 6 floats of A, and does 12 fused multiply-adds. That is 12 FMAs per 8
#      memory reads: the arithmetic, not memory, is the limit. The kernel is written in C with gcc's
#      vector extensions, 12 named vector variables (see gptcore_tile_full below; `make asm` shows the
#      inner loop: vbroadcastss + vfmadd231ps on zmm or ymm registers, nothing stored to the stack).
#   2. Packing B. Before the tiles run, every NR-column panel of B is copied into a contiguous K x NR
#      block (zero-padded past the last column), so the micro-kernel reads B with unit stride and
#      aligned loads whatever B's real strides are. B is packed once per call and reused by every row.
#   3. Threads over tiles. Each tile is computed start to finish by one thread, so the split is race-free
#      and the result is bit-identical for any thread count. With a static schedule each thread gets a
#      contiguous run of tiles: whole row blocks when packed B fits in L2 (A's rows then stay in L1),
#      whole panels when it does not (a panel then stays in L2). See _gemm.
#   4. An edge kernel. When the last panel has 16 or fewer real columns (OC = 65 leaves 1), a 6 x 16
#      kernel does half the work a zero-padded 6 x 32 one would (with AVX2 a tile is 16 wide anyway).
#   A is read in place through its strides; rows past M in the last row block are pointed at row 0 and
#   their results discarded, so no branch sits in the k loop.


# The micro-kernel is a few lines of C: a 6 x NR tile of running sums held in 12 named vector
# variables for the whole k loop. We write it with gcc's vector extensions (a `gptcore_vec` is one
# vector register of floats; `acc += x * b` with a float x and a vector b is a broadcast and one fused
# multiply-add), not as loops over a float array: in the loop form gcc chose its own vectorization,
# unrolled k and spilled the tile to the stack on every step when registers ran short, which halved
# the speed. Named vector variables leave the register allocator nothing to guess.
#
# The tile's width follows the machine's vector registers, chosen when gcc compiles this file for the
# machine (-march=native, or whatever GPTCORE_CFLAGS asks for): 32 columns (two 16-float zmm vectors)
# where AVX-512 gives 32 registers, 16 (two 8-float ymm vectors) otherwise. A 6 x 32 tile of ymm vectors
# would need 24 accumulator registers, which AVX2 does not have. Without AVX, gcc lowers each vector to
# SSE halves and the same code still runs. Results do not depend on the width: every output element sums
# its k terms in order, one fused multiply-add per term (gcc contracts `acc + x * b` into an FMA where
# the CPU has one, in the vector code as in the scalar reference loops), whichever tile holds it.
#
# The edge kernel is 16 columns wide: one zmm vector per row with AVX-512, where it does half the work of
# a zero-padded full tile; with narrower vectors 16 columns is the full tile, so the edge kernel is the
# full kernel.
cdef extern from *:
    """
    #include <stddef.h>
    #if defined(__AVX512F__)
    #define GPTCORE_VECTOR_FLOATS 16
    #else
    #define GPTCORE_VECTOR_FLOATS 8
    #endif
    #define GPTCORE_TILE_COLUMNS (2 * GPTCORE_VECTOR_FLOATS)
    /* aligned(4): loads and stores through these types may be unaligned (vmovups) */
    typedef float gptcore_vec __attribute__((vector_size(4 * GPTCORE_VECTOR_FLOATS), aligned(4)));
    typedef float gptcore_vec16 __attribute__((vector_size(64), aligned(4)));

    /* acc (6 x 2V, rows ld floats apart) = sum over k < K of A[r, k] * panel[k, :], for the 6 rows of
       A at a with strides (rsa, csa); rows past `rows` repeat row 0 and their sums are ignored by the
       caller. With `load` the sums start from acc's values instead of 0. acc is C itself for a whole
       tile (ld = C's row stride), or a 6 x 2V scratch for a tile cut by C's edge. */
    static inline void gptcore_tile_full(const float* a, ptrdiff_t rsa, ptrdiff_t csa, int rows,
                                         const float* panel, ptrdiff_t K, float* acc, ptrdiff_t ld, int load) {
        enum { V = GPTCORE_VECTOR_FLOATS, W = 2 * GPTCORE_VECTOR_FLOATS };
        const ptrdiff_t L = ld;
        const float *a0 = a, *a1 = a + (rows > 1 ? rsa : 0), *a2 = a + (rows > 2 ? 2 * rsa : 0),
                    *a3 = a + (rows > 3 ? 3 * rsa : 0), *a4 = a + (rows > 4 ? 4 * rsa : 0),
                    *a5 = a + (rows > 5 ? 5 * rsa : 0);
        gptcore_vec c00 = {0}, c01 = {0}, c10 = {0}, c11 = {0}, c20 = {0}, c21 = {0},
                    c30 = {0}, c31 = {0}, c40 = {0}, c41 = {0}, c50 = {0}, c51 = {0};
        if (load) {
            c00 = *(gptcore_vec*)(acc + 0 * L); c01 = *(gptcore_vec*)(acc + 0 * L + V);
            c10 = *(gptcore_vec*)(acc + 1 * L); c11 = *(gptcore_vec*)(acc + 1 * L + V);
            c20 = *(gptcore_vec*)(acc + 2 * L); c21 = *(gptcore_vec*)(acc + 2 * L + V);
            c30 = *(gptcore_vec*)(acc + 3 * L); c31 = *(gptcore_vec*)(acc + 3 * L + V);
            c40 = *(gptcore_vec*)(acc + 4 * L); c41 = *(gptcore_vec*)(acc + 4 * L + V);
            c50 = *(gptcore_vec*)(acc + 5 * L); c51 = *(gptcore_vec*)(acc + 5 * L + V);
        }
        for (ptrdiff_t k = 0; k < K; k++) {
            const gptcore_vec b0 = *(const gptcore_vec*)(panel + k * W);
            const gptcore_vec b1 = *(const gptcore_vec*)(panel + k * W + V);
            const ptrdiff_t ka = k * csa;
            float x;
            x = a0[ka]; c00 += x * b0; c01 += x * b1;
            x = a1[ka]; c10 += x * b0; c11 += x * b1;
            x = a2[ka]; c20 += x * b0; c21 += x * b1;
            x = a3[ka]; c30 += x * b0; c31 += x * b1;
            x = a4[ka]; c40 += x * b0; c41 += x * b1;
            x = a5[ka]; c50 += x * b0; c51 += x * b1;
        }
        *(gptcore_vec*)(acc + 0 * L) = c00; *(gptcore_vec*)(acc + 0 * L + V) = c01;
        *(gptcore_vec*)(acc + 1 * L) = c10; *(gptcore_vec*)(acc + 1 * L + V) = c11;
        *(gptcore_vec*)(acc + 2 * L) = c20; *(gptcore_vec*)(acc + 2 * L + V) = c21;
        *(gptcore_vec*)(acc + 3 * L) = c30; *(gptcore_vec*)(acc + 3 * L + V) = c31;
        *(gptcore_vec*)(acc + 4 * L) = c40; *(gptcore_vec*)(acc + 4 * L + V) = c41;
        *(gptcore_vec*)(acc + 5 * L) = c50; *(gptcore_vec*)(acc + 5 * L + V) = c51;
    }

    /* The same for a panel 16 columns wide: acc is 6 x 16. */
    static inline void gptcore_tile_edge(const float* a, ptrdiff_t rsa, ptrdiff_t csa, int rows,
                                         const float* panel, ptrdiff_t K, float* acc, ptrdiff_t ld, int load) {
    #if GPTCORE_VECTOR_FLOATS == 16
        const float *a0 = a, *a1 = a + (rows > 1 ? rsa : 0), *a2 = a + (rows > 2 ? 2 * rsa : 0),
                    *a3 = a + (rows > 3 ? 3 * rsa : 0), *a4 = a + (rows > 4 ? 4 * rsa : 0),
                    *a5 = a + (rows > 5 ? 5 * rsa : 0);
        gptcore_vec16 c0 = {0}, c1 = {0}, c2 = {0}, c3 = {0}, c4 = {0}, c5 = {0};
        if (load) {
            c0 = *(gptcore_vec16*)(acc + 0 * ld); c1 = *(gptcore_vec16*)(acc + 1 * ld);
            c2 = *(gptcore_vec16*)(acc + 2 * ld); c3 = *(gptcore_vec16*)(acc + 3 * ld);
            c4 = *(gptcore_vec16*)(acc + 4 * ld); c5 = *(gptcore_vec16*)(acc + 5 * ld);
        }
        for (ptrdiff_t k = 0; k < K; k++) {
            const gptcore_vec16 b = *(const gptcore_vec16*)(panel + k * 16);
            const ptrdiff_t ka = k * csa;
            c0 += a0[ka] * b; c1 += a1[ka] * b; c2 += a2[ka] * b;
            c3 += a3[ka] * b; c4 += a4[ka] * b; c5 += a5[ka] * b;
        }
        *(gptcore_vec16*)(acc + 0 * ld) = c0; *(gptcore_vec16*)(acc + 1 * ld) = c1;
        *(gptcore_vec16*)(acc + 2 * ld) = c2; *(gptcore_vec16*)(acc + 3 * ld) = c3;
        *(gptcore_vec16*)(acc + 4 * ld) = c4; *(gptcore_vec16*)(acc + 5 * ld) = c5;
    #else
        gptcore_tile_full(a, rsa, csa, rows, panel, K, acc, ld, load);
    #endif
    }
    """
    enum: GPTCORE_TILE_COLUMNS
    void gptcore_tile_full(const float* a, Py_ssize_t rsa, Py_ssize_t csa, int rows,
                           const float* panel, Py_ssize_t K, float* acc, Py_ssize_t ld, bint load) noexcept nogil
    void gptcore_tile_edge(const float* a, Py_ssize_t rsa, Py_ssize_t csa, int rows,
                           const float* panel, Py_ssize_t K, float* acc, Py_ssize_t ld, bint load) noexcept nogil

cdef enum:
    MR = 6                              # rows of C per micro-kernel tile
    NR = GPTCORE_TILE_COLUMNS           # columns of C per tile: two vectors
    NR_EDGE = 16                        # the edge kernel's width

# Cache blocking (see _gemm), sized from the cache sizes the machine reports when this module loads
# (sysconf; 32 KB of L1 and 512 KB of L2 per core if it reports none):
#   _k_block:   a K block's B panel, _k_block x NR floats, takes half of L1; the other half holds the
#               6 values of A per k and whatever else the loop touches.
#   _row_chunk: a chunk of packed A, _row_chunk row blocks of MR x _k_block floats, takes half of L2;
#               the rest holds the panels streaming through it.
# Results never depend on them (each output is one running sum over k in order, whatever the
# blocks), so they may follow the machine; set_matmul_blocking() changes them, for tests and tuning.
cdef extern from *:
    """
    #include <unistd.h>
    static long gptcore_cache_bytes(int level) {
    #if defined(_SC_LEVEL1_DCACHE_SIZE) && defined(_SC_LEVEL2_CACHE_SIZE)
        long n = sysconf(level == 1 ? _SC_LEVEL1_DCACHE_SIZE : _SC_LEVEL2_CACHE_SIZE);
        return n > 0 ? n : 0;
    #else
        return 0;
    #endif
    }
    """
    long gptcore_cache_bytes(int level) nogil

cdef long _l1_bytes = gptcore_cache_bytes(1) or 32 * 1024
cdef long _l2_bytes = gptcore_cache_bytes(2) or 512 * 1024
cdef Py_ssize_t _k_block = max(16, _l1_bytes // 2 // (NR * sizeof(float)))
cdef Py_ssize_t _row_chunk = max(1, _l2_bytes // 2 // (MR * _k_block * sizeof(float)))


def matmul_blocking():
    """The matmul's cache blocking: {"k_block": floats of k per block, "row_chunk": rows of A per
    chunk, "tile": (MR, NR), "l1_bytes", "l2_bytes": the cache sizes they were chosen from}."""
    return {"k_block": _k_block, "row_chunk": _row_chunk * MR, "tile": (MR, NR),
            "l1_bytes": _l1_bytes, "l2_bytes": _l2_bytes}


def set_matmul_blocking(Py_ssize_t k_block, Py_ssize_t row_chunk_blocks):
    """Set the K block (floats, >= 1) and the row chunk (row blocks of MR rows, >= 1). Results do not
    change; tests use this to show it, and it lets a user try other sizes."""
    global _k_block, _row_chunk
    if k_block < 1 or row_chunk_blocks < 1:
        raise ValueError(f"set_matmul_blocking: both sizes must be >= 1, got {k_block} and {row_chunk_blocks}")
    _k_block = k_block
    _row_chunk = row_chunk_blocks


cdef inline void _pack_panel(float* packed, const float* b, Py_ssize_t rsb, Py_ssize_t csb,
                             Py_ssize_t K, Py_ssize_t n_cols, Py_ssize_t width) noexcept nogil:
    """Copy columns [0, n_cols) of B (K rows) into packed (K, width), zero-filling columns n_cols..width."""
    cdef Py_ssize_t k, j
    for k in range(K):
        for j in range(n_cols):
            packed[k * width + j] = b[k * rsb + j * csb]
        for j in range(n_cols, width):
            packed[k * width + j] = 0.0


cdef inline void _load_tile(const float* c, Py_ssize_t ldc, Py_ssize_t row0, Py_ssize_t col0, float* acc,
                            Py_ssize_t acc_width, int rows, int cols) noexcept nogil:
    """acc (MR x acc_width) = the valid rows x cols of C at [row0, col0], 0 elsewhere: the running
    sums a tile continues from (C's old value when accumulating, a partial sum after the first K block)."""
    cdef int r, j
    c += row0 * ldc + col0
    for r in range(MR):
        for j in range(acc_width):
            acc[r * acc_width + j] = c[r * ldc + j] if (r < rows and j < cols) else 0.0


cdef inline void _store_tile(const float* bias, float* c, Py_ssize_t ldc, Py_ssize_t row0, Py_ssize_t col0,
                             const float* acc, Py_ssize_t acc_width, int rows, int cols) noexcept nogil:
    """C = the valid rows x cols of a tile's sums, at [row0, col0], + bias (bias NULL: no bias; only the
    last K block adds it)."""
    cdef float* c_row
    cdef const float* acc_row
    cdef int r, j
    c += row0 * ldc + col0
    for r in range(rows):
        c_row = c + r * ldc
        acc_row = acc + r * acc_width
        if bias != NULL:
            for j in range(cols):
                c_row[j] = acc_row[j] + bias[col0 + j]
        else:
            for j in range(cols):
                c_row[j] = acc_row[j]


cdef inline void _add_bias(const float* bias, float* c, Py_ssize_t ldc, Py_ssize_t row0, Py_ssize_t col0,
                           int rows, int cols) noexcept nogil:
    """C[row0 + r, col0 + j] += bias[col0 + j] over a tile: the sums are final, one rounding for the add."""
    cdef int r, j
    c += row0 * ldc + col0
    for r in range(rows):
        for j in range(cols):
            c[r * ldc + j] = c[r * ldc + j] + bias[col0 + j]


cdef void _tile_full(const float* a, Py_ssize_t rsa, Py_ssize_t csa, int rows, const float* panel,
                     Py_ssize_t K, const float* bias, bint load, float* c, Py_ssize_t ldc,
                     Py_ssize_t row0, Py_ssize_t col0, int cols) noexcept nogil:
    """One 6 x NR tile of C (top-left corner C[row0, col0]) from 6 rows of A and one packed K x NR
    panel of B: C = (C if load else 0) + A @ B (+ bias). A whole tile runs its sums in C itself; one
    cut by C's edge runs them in a scratch tile and copies the valid part."""
    cdef float acc[MR * NR]
    if rows == MR and cols == NR:
        gptcore_tile_full(a, rsa, csa, rows, panel, K, c + row0 * ldc + col0, ldc, load)
        if bias != NULL:
            _add_bias(bias, c, ldc, row0, col0, rows, cols)
        return
    if load:
        _load_tile(c, ldc, row0, col0, acc, NR, rows, cols)
    gptcore_tile_full(a, rsa, csa, rows, panel, K, acc, NR, load)
    _store_tile(bias, c, ldc, row0, col0, acc, NR, rows, cols)


cdef void _tile_edge(const float* a, Py_ssize_t rsa, Py_ssize_t csa, int rows, const float* panel,
                     Py_ssize_t K, const float* bias, bint load, float* c, Py_ssize_t ldc,
                     Py_ssize_t row0, Py_ssize_t col0, int cols) noexcept nogil:
    """The edge kernel: a 6 x 16 tile, for a last panel of 16 or fewer columns (packed K x 16)."""
    cdef float acc[MR * NR_EDGE]
    if rows == MR and cols == NR_EDGE:
        gptcore_tile_edge(a, rsa, csa, rows, panel, K, c + row0 * ldc + col0, ldc, load)
        if bias != NULL:
            _add_bias(bias, c, ldc, row0, col0, rows, cols)
        return
    if load:
        _load_tile(c, ldc, row0, col0, acc, NR_EDGE, rows, cols)
    gptcore_tile_edge(a, rsa, csa, rows, panel, K, acc, NR_EDGE, load)
    _store_tile(bias, c, ldc, row0, col0, acc, NR_EDGE, rows, cols)


cdef inline Py_ssize_t _packed_size(Py_ssize_t N, Py_ssize_t K) noexcept nogil:
    """Floats needed to pack a K x N matrix B into NR-column panels."""
    return (N + NR - 1) // NR * K * NR


cdef inline void _pack_b(float* packed, const float* b, Py_ssize_t rsb, Py_ssize_t csb,
                         Py_ssize_t N, Py_ssize_t K, Py_ssize_t p) noexcept nogil:
    """Pack panel p of B: columns [NR p, NR p + NR) as a K x NR block (K x 16 if it is a last panel
    with 16 or fewer real columns), zero-padded past column N."""
    cdef Py_ssize_t n_panels = (N + NR - 1) // NR
    cdef Py_ssize_t cols = NR if p < n_panels - 1 else N - (n_panels - 1) * NR
    _pack_panel(packed + p * K * NR, b + p * NR * csb, rsb, csb, K, cols,
                NR_EDGE if (p == n_panels - 1 and cols <= NR_EDGE) else NR)


cdef inline void _pack_a(float* packed, const float* a, Py_ssize_t rsa, Py_ssize_t csa,
                         Py_ssize_t M, Py_ssize_t K, Py_ssize_t rb) noexcept nogil:
    """Pack row block rb of A: rows [MR rb, MR rb + MR) as a K x MR block (the MR values of one k side
    by side, the order the micro-kernel reads them in), zero-padded past row M."""
    cdef Py_ssize_t row0 = rb * MR, k, r
    cdef Py_ssize_t rows = min(MR, M - row0)
    cdef float* out = packed + rb * K * MR
    cdef const float* a_rows = a + row0 * rsa
    for k in range(K):
        for r in range(rows):
            out[k * MR + r] = a_rows[r * rsa + k * csa]
        for r in range(rows, MR):
            out[k * MR + r] = 0.0


cdef inline void _gemm_tile(const float* bias, bint load, float* c, Py_ssize_t ldc,
                            const float* a_rows, Py_ssize_t rsa, Py_ssize_t csa, const float* packed,
                            Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, Py_ssize_t p, Py_ssize_t rb,
                            Py_ssize_t k0, Py_ssize_t k1) noexcept nogil:
    """Tile (row block rb, panel p) of C = (C if load else 0) + A @ B (+ bias), from B packed by _pack_b
    (K rows), summing over k in [k0, k1) only (0 and K for the whole product). a_rows points at
    A[MR rb, 0]: the block's rows in A itself, or its K x MR block packed by _pack_a (rsa 1, csa MR)."""
    cdef Py_ssize_t n_panels = (N + NR - 1) // NR
    cdef Py_ssize_t row0 = rb * MR
    cdef Py_ssize_t cols = NR if p < n_panels - 1 else N - (n_panels - 1) * NR
    cdef int rows = <int> min(MR, M - row0)
    cdef const float* panel = packed + p * K * NR          # panels are K x NR floats apart
    a_rows += k0 * csa
    if p == n_panels - 1 and cols <= NR_EDGE:               # a K x 16 edge panel
        _tile_edge(a_rows, rsa, csa, rows, panel + k0 * NR_EDGE, k1 - k0, bias, load, c, ldc, row0,
                   p * NR, <int> cols)
    else:
        _tile_full(a_rows, rsa, csa, rows, panel + k0 * NR, k1 - k0, bias, load, c, ldc, row0,
                   p * NR, <int> cols)


# Triangular shortcuts for _gemm_serial, used by causal attention (T x T matrices that are zero on one
# side of the diagonal). Row block rb covers rows [r0, r0 + 6).
cdef enum:
    FULL = 0             # the whole product
    LOWER_OUTPUT = 1     # only C[t, s] with s <= t is wanted: skip tiles entirely above the diagonal
    A_LOWER = 2          # A[t, k] = 0 for k > t: the sum for row t runs over k <= t only
    A_UPPER = 3          # A[s, k] = 0 for k < s: the sum for row s runs over k >= s only
# For A_LOWER and A_UPPER the masked entries must be *excluded* from the sums, not multiplied by
# their zero: a tile that straddles the diagonal computes A[t, k] * B[k, :] for masked k too, and if
# B holds an inf there (a value at a later position, in attention) 0 * inf = NaN leaks into rows that
# must never see it; a masked A entry that is not 0 (an att passed in by hand) would leak as well.
# When neither can happen -- every masked A entry in the diagonal band is exactly 0 and every row of
# B is finite, which _band_is_inert checks in one pass over packed B -- each of those terms is an exact 0
# and the tiles run over the band as they are (the fast path, every training step). Otherwise every
# tile of the product is _tile_masked, a plain loop that skips each row's masked k and otherwise adds
# in the tiles' order, so the rows the poison must not reach get the fast path's bits exactly
# (tests/test_kernels.py compares them bit for bit).


cdef bint _band_is_inert(const float* a, Py_ssize_t rsa, Py_ssize_t csa, const float* packed,
                         Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, int shape) noexcept nogil:
    """True if a tile may add the masked (r, k) of the diagonal band: A is exactly 0 there and B
    (read in `packed`, _pack_b's copy: contiguous, so one vectorized pass) is finite. Squares that
    overflow count as not finite too: they only send us down the exact path."""
    cdef Py_ssize_t r, k, r0, rb, p
    cdef Py_ssize_t n_panels = (N + NR - 1) // NR
    cdef Py_ssize_t last = N - (n_panels - 1) * NR        # columns of the last panel
    cdef float squares = 0.0
    for p in range(n_panels):          # an edge panel fills only K x NR_EDGE of its slot (_pack_b)
        squares += _dot(packed + p * K * NR, packed + p * K * NR,
                        K * (NR_EDGE if (p == n_panels - 1 and last <= NR_EDGE) else NR))
    if not (squares - squares == 0.0):              # inf - inf and NaN - NaN are NaN
        return False
    for rb in range((M + MR - 1) // MR):
        r0 = rb * MR
        for r in range(r0, min(r0 + MR, M)):
            if shape == A_LOWER:
                for k in range(r + 1, min(r0 + MR, K)):
                    if a[r * rsa + k * csa] != 0.0:
                        return False
            else:
                for k in range(r0, min(r, K)):
                    if a[r * rsa + k * csa] != 0.0:
                        return False
    return True


cdef void _tile_masked(const float* a, Py_ssize_t rsa, Py_ssize_t csa, int rows, const float* panel,
                       Py_ssize_t width, Py_ssize_t k0, Py_ssize_t k1, bint accumulate, float* c,
                       Py_ssize_t ldc, Py_ssize_t row0, Py_ssize_t col0, int cols, int shape) noexcept nogil:
    """The tile of _gemm_tile (rows [row0, row0 + rows), a packed panel `width` wide, k in [k0, k1)),
    but each row's sum leaves out its masked k: k > t for A_LOWER, k < s for A_UPPER. The additions
    come in the tiles' order (k ascending, one accumulator per entry), and a tile adds an exact 0 for
    a masked k when the band is inert: both paths then give the same bits."""
    cdef float acc[MR][NR]
    cdef const float* b
    cdef float x
    cdef Py_ssize_t k, t
    cdef int r, j
    if accumulate:
        _load_tile(c, ldc, row0, col0, &acc[0][0], NR, rows, cols)
    else:
        for r in range(MR):
            for j in range(NR):
                acc[r][j] = 0.0
    for k in range(k0, k1):
        b = panel + k * width
        for r in range(rows):
            t = row0 + r
            if (shape == A_LOWER and k > t) or (shape == A_UPPER and k < t):
                continue
            x = a[t * rsa + k * csa]
            for j in range(width):
                acc[r][j] += x * b[j]
    _store_tile(NULL, c, ldc, row0, col0, &acc[0][0], NR, rows, cols)


cdef void _gemm_serial(float* c, Py_ssize_t ldc, const float* a, Py_ssize_t rsa, Py_ssize_t csa,
                       const float* b, Py_ssize_t rsb, Py_ssize_t csb, Py_ssize_t M, Py_ssize_t N,
                       Py_ssize_t K, bint accumulate, float* packed, int shape) noexcept nogil:
    """_gemm on the calling thread alone, packing into the caller's buffer of _packed_size(N, K)
    floats. For small products inside work that is already split over threads (attention heads).
    `shape` skips work known to be zero (see the enum above)."""
    cdef Py_ssize_t n_panels = (N + NR - 1) // NR, n_row_blocks = (M + MR - 1) // MR, p, rb
    cdef Py_ssize_t r0, k0, k1, cols, width
    cdef bint exact
    for p in range(n_panels):
        _pack_b(packed, b, rsb, csb, N, K, p)
    exact = (shape == A_LOWER or shape == A_UPPER) and not _band_is_inert(a, rsa, csa, packed, M, N, K, shape)
    for p in range(n_panels):
        for rb in range(n_row_blocks):
            r0 = rb * MR
            k0, k1 = 0, K
            if shape == LOWER_OUTPUT and p * NR > r0 + MR - 1:
                continue                          # every column of this tile is after every row
            if shape == A_LOWER:
                k1 = min(K, r0 + MR)
            elif shape == A_UPPER:
                k0 = r0
            if exact:
                cols = NR if p < n_panels - 1 else N - (n_panels - 1) * NR
                width = NR_EDGE if (p == n_panels - 1 and cols <= NR_EDGE) else NR
                _tile_masked(a, rsa, csa, <int> min(MR, M - r0), packed + p * K * NR, width, k0, k1,
                             accumulate, c, ldc, r0, p * NR, <int> cols, shape)
            else:
                _gemm_tile(NULL, accumulate, c, ldc, a + r0 * rsa, rsa, csa, packed, M, N, K, p, rb, k0, k1)


cdef int _gemm(float* c, Py_ssize_t ldc,
               const float* a, Py_ssize_t rsa, Py_ssize_t csa,
               const float* b, Py_ssize_t rsb, Py_ssize_t csb,
               Py_ssize_t M, Py_ssize_t N, Py_ssize_t K, const float* bias,
               bint accumulate) noexcept nogil:
    """C (M, N) = A @ B + bias (bias (N,) or NULL), or C += A @ B if accumulate. Returns -1 if out of
    memory.

    The sum over k runs in blocks of _k_block floats, and the products over one block go in this order
    (the order of a BLIS/GotoBLAS macro-kernel):
        for each K block:      pack that block's rows of B into K_block x NR panels and its columns
                               of A into K_block x MR row blocks
          for each chunk of _row_chunk row blocks:   (its packed A, _row_chunk*MR x K_block, stays in L2)
            for each panel p:                        (the panel, K_block x NR, stays in L1)
              for each row block rb of the chunk:    one micro-kernel tile
    A tile after the first K block starts from the partial sums the previous block left in C (and an
    accumulating product starts from C's old value): every output is still one running sum over k in
    order, so the blocking sizes, chosen from the machine's cache sizes, never change a result."""
    cdef Py_ssize_t n_panels = (N + NR - 1) // NR
    cdef Py_ssize_t n_row_blocks = (M + MR - 1) // MR
    cdef Py_ssize_t kc_max = min(K, _k_block)
    # row blocks per chunk: at most _row_chunk, and as even as that allows (no thin last chunk that
    # would stream all of B again for a few rows)
    cdef Py_ssize_t n_chunks = (n_row_blocks + _row_chunk - 1) // _row_chunk
    cdef Py_ssize_t chunk = (n_row_blocks + n_chunks - 1) // n_chunks
    cdef Py_ssize_t p, rb, tile, k0, kc, first, rows_here, within
    cdef Py_ssize_t b_floats = _packed_size(N, kc_max)
    cdef float* packed
    cdef float* packed_a
    cdef bint threads = _worth_threads(FLOPS_PER_MULTIPLY_ADD * M * N * K)
    cdef bint last
    if M == 0 or N == 0:
        return 0
    # One allocation for packed B and packed A (b_floats is a multiple of 16, so A starts 64-byte
    # aligned too), rounded up to 64 bytes, as aligned_alloc requires a multiple of the alignment.
    packed = <float*> aligned_alloc(64, ((b_floats + n_row_blocks * MR * kc_max) * sizeof(float) + 63) // 64 * 64)
    if packed == NULL:
        return -1
    packed_a = packed + b_floats
    k0 = 0
    while k0 < K:
        kc = min(kc_max, K - k0)
        last = k0 + kc == K
        for p in prange(n_panels, schedule='static', num_threads=_num_threads,
                        use_threads_if=threads and n_panels > 1):
            _pack_b(packed, b + k0 * rsb, rsb, csb, N, kc, p)
        for rb in prange(n_row_blocks, schedule='static', num_threads=_num_threads,
                         use_threads_if=threads and n_row_blocks > 1):
            _pack_a(packed_a, a + k0 * csa, rsa, csa, M, kc, rb)
        # Tiles are numbered in the loop order above; a static schedule hands each thread one run of
        # consecutive tiles. Chunk i holds row blocks [i*chunk, i*chunk + rows_here) and comes after i
        # full chunks.
        for tile in prange(n_panels * n_row_blocks, schedule='static', num_threads=_num_threads,
                           use_threads_if=threads):
            first = tile // (chunk * n_panels) * chunk            # the chunk's first row block
            rows_here = min(chunk, n_row_blocks - first)
            within = tile - first * n_panels
            p = within // rows_here
            rb = first + within % rows_here
            _gemm_tile(bias if last else NULL, accumulate or k0 > 0, c, ldc, packed_a + rb * kc * MR, 1, MR,
                       packed, M, N, kc, p, rb, 0, kc)
        k0 += kc
    free(packed)
    return 0


# Generation feeds one token at a time, so its matmuls have a single row. Packing B would then cost as
# much as the product (every weight copied once, used once), and a 6-row tile would compute 5 rows of
# nothing. Such a product is bound by memory, not arithmetic: each weight is read once and used for
# N <= SMALL_M multiply-adds. So for a few rows we stream the weight once, in its own layout, with
# vectorized loops:
#   weight (IC, OC):  out[n, :] = bias + sum_i inp[n, i] * weight[i, :]   (axpy over weight's rows)
#   weight (OC, IC):  out[n, o] = bias[o] + inp[n, :] . weight[o, :]      (one dot product per output)
# Threads split the output columns: the columns are cut into one contiguous part per thread (whole
# 64-byte lines of out), and a part is computed start to finish by one thread. In the (OC, IC) layout
# (the LM head's wte, the largest read of a token) a part is a contiguous block of whole rows, one long
# unit-stride read. In the (IC, OC) layout a part reads its run of every weight row, OC / threads floats
# (at most FEW_ROWS_TILE at a time), then skips to the next row: shorter runs, which
# bench/profile_generate.py shows streaming well below the (OC, IC) layout's rate. Each output element
# sums its terms in the same order whoever computes it (bias first, then i = 0, 1, ... in the axpy;
# the dot product's fixed lanes), so the result is the same bits for any thread count.
cdef enum:
    SMALL_M = 4
    # columns of out a part of the (IC, OC) layout accumulates at a time: SMALL_M rows of 1024
    # floats are 16 KB, which stay in L1 while the weight streams past them
    FEW_ROWS_TILE = 1024


cdef void _few_rows_columns(float* out, const float* inp, const float* weight, const float* bias,
                            Py_ssize_t N, Py_ssize_t IC, Py_ssize_t OC, Py_ssize_t o0,
                            Py_ssize_t o1) noexcept nogil:
    """out[:, o0:o1] = bias[o0:o1] + inp (N, IC) @ weight[:, o0:o1], weight stored (IC, OC)."""
    cdef Py_ssize_t n, i, o, width
    cdef Py_ssize_t c0 = o0
    while c0 < o1:
        width = min(FEW_ROWS_TILE, o1 - c0)
        for n in range(N):
            for o in range(c0, c0 + width):
                out[n * OC + o] = bias[o] if bias != NULL else 0.0
        for i in range(IC):
            for n in range(N):
                _axpy(out + n * OC + c0, inp[n * IC + i], weight + i * OC + c0, width)
        c0 += width


cdef void _few_rows_dots(float* out, const float* inp, const float* weight, const float* bias,
                         Py_ssize_t N, Py_ssize_t IC, Py_ssize_t OC, Py_ssize_t o0,
                         Py_ssize_t o1) noexcept nogil:
    """out[:, o0:o1] = bias[o0:o1] + inp (N, IC) @ weight[o0:o1, :]^T, weight stored (OC, IC)."""
    cdef Py_ssize_t n, o
    for o in range(o0, o1):
        for n in range(N):
            out[n * OC + o] = (bias[o] if bias != NULL else 0.0) + _dot(inp + n * IC, weight + o * IC, IC)


cdef void _matmul_few_rows(float* out, const float* inp, const float* weight, const float* bias,
                           Py_ssize_t N, Py_ssize_t IC, Py_ssize_t OC,
                           bint weight_transposed) noexcept nogil:
    cdef bint threads = _worth_threads(FLOPS_PER_MULTIPLY_ADD * N * IC * OC)
    cdef Py_ssize_t n_parts = _num_threads if threads else 1
    # each part's width, rounded up to whole 64-byte lines of out (LANES floats)
    cdef Py_ssize_t span = (OC + n_parts * LANES - 1) // (n_parts * LANES) * LANES
    cdef Py_ssize_t part, o0
    for part in prange(n_parts, schedule='static', num_threads=_num_threads, use_threads_if=threads):
        o0 = part * span
        if o0 < OC:
            if weight_transposed:
                _few_rows_dots(out, inp, weight, bias, N, IC, OC, o0, min(OC, o0 + span))
            else:
                _few_rows_columns(out, inp, weight, bias, N, IC, OC, o0, min(OC, o0 + span))


def matmul_forward(float[:, ::1] out not None, const float[:, ::1] inp not None,
                   const float[:, ::1] weight not None, const float[::1] bias,
                   bint weight_transposed=False):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC) + bias (OC,); bias may be None. Overwrites out.
    With weight_transposed, weight is stored (OC, IC) and we multiply by its transpose (the tied LM
    head reads wte (V, C) this way)."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1]
    cdef Py_ssize_t OC = weight.shape[0] if weight_transposed else weight.shape[1]
    # B[k=i, j=o] is weight[i, o] (strides OC, 1) or, transposed, weight[o, i] (strides 1, IC)
    cdef Py_ssize_t rsb = 1 if weight_transposed else OC
    cdef Py_ssize_t csb = IC if weight_transposed else 1
    cdef const float* bias_ptr = NULL
    cdef Py_ssize_t n, o
    cdef int status
    if N == 0 or OC == 0:
        return
    if bias is not None:
        bias_ptr = &bias[0]
    if IC == 0:
        # an empty sum: out is the bias (or zero); _gemm needs K >= 1 to have anything to pack
        for n in range(N):
            for o in range(OC):
                out[n, o] = bias_ptr[o] if bias_ptr != NULL else 0.0
        return
    if N <= SMALL_M:
        with nogil:
            _matmul_few_rows(&out[0, 0], &inp[0, 0], &weight[0, 0], bias_ptr, N, IC, OC, weight_transposed)
        return
    with nogil:
        status = _gemm(&out[0, 0], OC, &inp[0, 0], IC, 1, &weight[0, 0], rsb, csb, N, OC, IC, bias_ptr, False)
    if status != 0:
        raise MemoryError("matmul_forward: could not allocate the packed panels")


cdef void _column_sums_block(float* d_bias, const float* d_out, Py_ssize_t N, Py_ssize_t OC,
                             Py_ssize_t col0, Py_ssize_t n_cols) noexcept nogil:
    """d_bias[col0 : col0 + n_cols] += sum over the N rows of d_out, rows in order."""
    cdef float acc[LANES]
    cdef Py_ssize_t n, j
    for j in range(n_cols):
        acc[j] = 0.0
    for n in range(N):
        for j in range(n_cols):
            acc[j] += d_out[n * OC + col0 + j]
    for j in range(n_cols):
        d_bias[col0 + j] += acc[j]


def matmul_backward(float[:, ::1] d_inp not None, float[:, ::1] d_weight not None,
                    float[::1] d_bias, const float[:, ::1] d_out not None,
                    const float[:, ::1] inp not None, const float[:, ::1] weight not None,
                    bint weight_transposed=False):
    """Accumulates d_inp (N, IC) += d_out @ weight^T, d_weight (IC, OC) += inp^T @ d_out and
    d_bias (OC,) += column sums of d_out; d_bias=None skips the column sums (a layer without a bias,
    such as the tied LM head). With weight_transposed, weight and d_weight are (OC, IC)."""
    cdef Py_ssize_t N = inp.shape[0], IC = inp.shape[1], OC = d_out.shape[1]
    cdef Py_ssize_t n_blocks = (OC + LANES - 1) // LANES, blk
    cdef int status = 0
    cdef bint has_bias = d_bias is not None
    if N == 0 or IC == 0 or OC == 0:
        # one of the products is empty; the column sums still run when only IC is 0
        if has_bias and N > 0 and OC > 0:
            for blk in range(n_blocks):
                _column_sums_block(&d_bias[0], &d_out[0, 0], N, OC, blk * LANES,
                                   min(LANES, OC - blk * LANES))
        return
    with nogil:
        if not weight_transposed:
            # d_inp (N, IC) += d_out (N, OC) @ weight^T: B[k=o, j=i] = weight[i, o], strides (1, OC)
            status = _gemm(&d_inp[0, 0], IC, &d_out[0, 0], OC, 1, &weight[0, 0], 1, OC, N, IC, OC, NULL, True)
            # d_weight (IC, OC) += inp^T (IC, N) @ d_out (N, OC): A[m=i, k=n] = inp[n, i], strides (1, IC)
            if status == 0:
                status = _gemm(&d_weight[0, 0], OC, &inp[0, 0], 1, IC, &d_out[0, 0], OC, 1, IC, OC, N,
                               NULL, True)
        else:
            # weight (OC, IC): d_inp (N, IC) += d_out (N, OC) @ weight, B read in place, strides (IC, 1)
            status = _gemm(&d_inp[0, 0], IC, &d_out[0, 0], OC, 1, &weight[0, 0], IC, 1, N, IC, OC, NULL, True)
            # d_weight (OC, IC) += d_out^T (OC, N) @ inp (N, IC): A[m=o, k=n] = d_out[n, o], strides (1, OC)
            if status == 0:
                status = _gemm(&d_weight[0, 0], IC, &d_out[0, 0], 1, OC, &inp[0, 0], IC, 1, OC, IC, N,
                               NULL, True)
        # d_bias: each thread owns whole 16-column blocks and sums all N rows of them in order.
        if has_bias:
            for blk in prange(n_blocks, schedule='static', num_threads=_num_threads,
                              use_threads_if=_worth_threads(ADD_FLOPS_PER_ELEMENT * N * OC)):
                _column_sums_block(&d_bias[0], &d_out[0, 0], N, OC, blk * LANES,
                                   min(LANES, OC - blk * LANES))
    if status != 0:
        raise MemoryError("matmul_backward: could not allocate the packed panels")


# ----------------------------------------------------------------------------------------------------
# Elementwise work split into chunks
# ----------------------------------------------------------------------------------------------------
# GELU, the residual add and AdamW touch each element once, independently. We cut the flat array into
# CHUNK-sized pieces; each prange iteration hands one piece to a helper whose plain `for` loop gcc can
# vectorize (a prange body itself is outlined by OpenMP in a way gcc's vectorizer often gives up on).

cdef enum:
    CHUNK = 4096

# The same number for Python: gptcore.compiled sizes sum_of_squares' partials from it.
CHUNK_SIZE = CHUNK


cdef inline Py_ssize_t _n_chunks(Py_ssize_t n) noexcept nogil:
    return (n + CHUNK - 1) // CHUNK


cdef inline Py_ssize_t _chunk_len(Py_ssize_t chunk, Py_ssize_t n) noexcept nogil:
    return min(<Py_ssize_t> CHUNK, n - chunk * CHUNK)


# ----------------------------------------------------------------------------------------------------
# GELU (GPT-2's tanh approximation)
# ----------------------------------------------------------------------------------------------------
#     gelu(x) = 0.5 * x * (1 + tanh(u)),   u = sqrt(2/pi) * (x + 0.044715 * x^3)
# Backward, with th = tanh(u) and tanh' = 1 - th^2:
#     d gelu / dx = 0.5 * (1 + th) + 0.5 * x * (1 - th^2) * sqrt(2/pi) * (1 + 3 * 0.044715 * x^2)
#     d_inp += d_out * d gelu / dx
# tanh itself is the cost here: libm's tanhf is a scalar call the compiler cannot vectorize (glibc
# offers vector versions only under -ffast-math), so we use _tanh from the top of this file.

cdef inline float _gelu(float x) noexcept nogil:
    cdef float scale = 0.7978845608028654        # sqrt(2 / pi)
    cdef float cube = 0.044715, half = 0.5, one = 1.0
    return half * x * (one + _tanh(scale * (x + cube * x * x * x)))


cdef inline float _gelu_grad(float x) noexcept nogil:
    """d gelu / dx at x."""
    cdef float scale = 0.7978845608028654
    cdef float cube = 0.044715, three_cube = 3 * 0.044715, half = 0.5, one = 1.0
    cdef float th = _tanh(scale * (x + cube * x * x * x))
    return half * (one + th) + half * x * (one - th * th) * scale * (one + three_cube * x * x)


cdef void _gelu_forward_chunk(float* out, const float* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = _gelu(x[i])


cdef void _gelu_backward_chunk(float* d_x, const float* d_out, const float* x,
                               Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        d_x[i] += d_out[i] * _gelu_grad(x[i])


def gelu_forward(float[::1] out not None, const float[::1] x not None):
    """out = gelu(x), elementwise over flat arrays of the same length. Overwrites out."""
    cdef Py_ssize_t n = x.shape[0], chunk
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(GELU_FLOPS_PER_ELEMENT * n)):
            _gelu_forward_chunk(&out[chunk * CHUNK], &x[chunk * CHUNK], _chunk_len(chunk, n))


def gelu_backward(float[::1] d_x not None, const float[::1] d_out not None,
                  const float[::1] x not None):
    """d_x += d_out * gelu'(x), elementwise over flat arrays of the same length."""
    cdef Py_ssize_t n = x.shape[0], chunk
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(GELU_BACKWARD_FLOPS_PER_ELEMENT * n)):
            _gelu_backward_chunk(&d_x[chunk * CHUNK], &d_out[chunk * CHUNK], &x[chunk * CHUNK],
                                 _chunk_len(chunk, n))


# ----------------------------------------------------------------------------------------------------
# Residual add
# ----------------------------------------------------------------------------------------------------
#     out = a + b;   backward: d_a += d_out, d_b += d_out (an add passes its gradient to both inputs)

cdef void _add_chunk(float* out, const float* a, const float* b, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = a[i] + b[i]


cdef void _accumulate_chunk(float* y, const float* x, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        y[i] += x[i]


def residual_forward(float[::1] out not None, const float[::1] a not None,
                     const float[::1] b not None):
    """out = a + b over flat arrays of the same length. Overwrites out."""
    cdef Py_ssize_t n = a.shape[0], chunk
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(ADD_FLOPS_PER_ELEMENT * n)):
            _add_chunk(&out[chunk * CHUNK], &a[chunk * CHUNK], &b[chunk * CHUNK], _chunk_len(chunk, n))


def residual_backward(float[::1] d_a not None, float[::1] d_b not None,
                      const float[::1] d_out not None):
    """d_a += d_out and d_b += d_out over flat arrays of the same length."""
    cdef Py_ssize_t n = d_out.shape[0], chunk
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(2 * ADD_FLOPS_PER_ELEMENT * n)):
            _accumulate_chunk(&d_a[chunk * CHUNK], &d_out[chunk * CHUNK], _chunk_len(chunk, n))
            _accumulate_chunk(&d_b[chunk * CHUNK], &d_out[chunk * CHUNK], _chunk_len(chunk, n))


# ----------------------------------------------------------------------------------------------------
# Dropout (inverted), with masks that are recomputed instead of stored
# ----------------------------------------------------------------------------------------------------
#     out[i] = x[i] * keep[i] / (1 - p)          keep[i] = 1 with probability 1 - p, else 0
# Backward: d_x[i] += d_out[i] * keep[i] / (1 - p). Dividing the kept values by 1 - p keeps every
# activation's expected value, so evaluation (no dropout) sees the same scale as training.
#
# keep[i] is a pure function of (key, i): with z = key + (i + 1) * GOLDEN (mod 2^64) and splitmix64's
# finaliser mix(z), element i is dropped iff mix(z) < threshold = floor(p * 2^64). So the backward
# regenerates the forward's mask from the same key instead of storing it, every thread computes any
# element's decision on its own (bitwise the same for any thread count), and gptcore.reference
# computes the very same bits with numpy's uint64 arithmetic (tests/test_kernels.py compares them).
# gptcore.dropout derives the key of each (step, layer, site) and the threshold from p.

ctypedef unsigned long long uint64

cdef uint64 DROPOUT_GOLDEN = 0x9E3779B97F4A7C15ULL   # 2^64 / golden ratio: splitmix64's increment


cdef inline uint64 _mix64(uint64 z) noexcept nogil:
    """splitmix64's finaliser: a bijection of 64-bit words in which every input bit flips about half
    of the output bits."""
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL
    return z ^ (z >> 31)


cdef inline bint _kept(uint64 key, uint64 index, uint64 threshold) noexcept nogil:
    return _mix64(key + (index + 1) * DROPOUT_GOLDEN) >= threshold


cdef struct DropoutMask:
    uint64 key              # which mask: one per (forward, layer, site), from gptcore.dropout
    uint64 threshold        # floor(p * 2^64): an element is dropped iff its hash is below this
    float scale             # 1 / (1 - p), applied to the kept elements


cdef void _dropout_chunk(float* out, const float* x, DropoutMask mask, Py_ssize_t first,
                         Py_ssize_t n) noexcept nogil:
    """out[i] = x[i] * scale if element first + i is kept, else 0, for i < n. out may be x."""
    cdef Py_ssize_t i
    for i in range(n):
        out[i] = x[i] * mask.scale if _kept(mask.key, first + i, mask.threshold) else 0.0


cdef void _dropout_backward_chunk(float* d_x, const float* d_out, DropoutMask mask, Py_ssize_t first,
                                  Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if _kept(mask.key, first + i, mask.threshold):
            d_x[i] += d_out[i] * mask.scale


cdef inline DropoutMask _dropout_mask(uint64 key, uint64 threshold, float scale) noexcept nogil:
    cdef DropoutMask mask
    mask.key, mask.threshold, mask.scale = key, threshold, scale
    return mask


def dropout_forward(float[::1] out not None, const float[::1] x not None, uint64 key, uint64 threshold,
                    float scale):
    """out = dropout(x) over flat arrays of the same length, element i kept iff its hash under key is
    >= threshold, kept elements times scale. Overwrites out; out may be x itself."""
    cdef Py_ssize_t n = x.shape[0], chunk
    cdef DropoutMask mask = _dropout_mask(key, threshold, scale)
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(DROPOUT_FLOPS_PER_ELEMENT * n)):
            _dropout_chunk(&out[chunk * CHUNK], &x[chunk * CHUNK], mask, chunk * CHUNK,
                           _chunk_len(chunk, n))


def dropout_backward(float[::1] d_x not None, const float[::1] d_out not None, uint64 key,
                     uint64 threshold, float scale):
    """d_x += the gradient of dropout_forward with the same key, threshold and scale."""
    cdef Py_ssize_t n = d_out.shape[0], chunk
    cdef DropoutMask mask = _dropout_mask(key, threshold, scale)
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(DROPOUT_FLOPS_PER_ELEMENT * n)):
            _dropout_backward_chunk(&d_x[chunk * CHUNK], &d_out[chunk * CHUNK], mask, chunk * CHUNK,
                                    _chunk_len(chunk, n))


# ----------------------------------------------------------------------------------------------------
# Softmax over the last axis
# ----------------------------------------------------------------------------------------------------
#     probs[i, j] = exp(x[i, j] - m_i) / sum_k exp(x[i, k] - m_i),   m_i = max_k x[i, k]
# Subtracting the row max changes nothing mathematically (it cancels between top and bottom) and keeps
# every exp() <= 1, so nothing overflows. Backward, per row, with p = probs and dp = d_probs:
#     d p_j / d x_k = p_j * (delta_jk - p_k)
#     d_x_k = sum_j dp_j * p_j * (delta_jk - p_k) = p_k * (dp_k - sum_j p_j * dp_j)
#
# _softmax_row is the one softmax of this file: softmax_forward, the fused cross-entropy and both
# attentions (over a row of scores) call it.

cdef struct SoftmaxRow:
    float row_max           # m = max_j x_j
    float total             # sum_j exp(x_j - m), the normaliser (>= 1: its largest term is exp(0))


cdef inline SoftmaxRow _softmax_row(float* probs, const float* x, Py_ssize_t n) noexcept nogil:
    """probs[0:n] = softmax(x[0:n]), n >= 1. probs may be x itself (attention normalises its scores in
    place): element j is read before it is written. Returns m and the normaliser, which
    cross-entropy needs for its loss."""
    cdef SoftmaxRow row
    row.row_max = _max(x, n)
    _exp_shifted(probs, x, row.row_max, n)
    row.total = _sum(probs, n)
    _scale_row(probs, 1.0 / row.total, n)
    return row


# The two halves of _softmax_row around its sum. Attention's backward recomputes a row of weights
# from the row's saved m and total with these same two calls, so it gets the forward's bits exactly.
cdef inline void _exp_shifted(float* probs, const float* x, float row_max, Py_ssize_t n) noexcept nogil:
    """probs[j] = exp(x[j] - row_max) for j < n; probs may be x itself."""
    cdef Py_ssize_t j
    for j in range(n):
        probs[j] = _exp(x[j] - row_max)


cdef inline void _scale_row(float* probs, float inv_total, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(n):
        probs[j] *= inv_total


cdef void _softmax_backward_row(float* d_x, const float* d_probs, const float* probs,
                                Py_ssize_t V) noexcept nogil:
    cdef Py_ssize_t j
    cdef float weighted = _dot(probs, d_probs, V)     # sum_j p_j * dp_j
    for j in range(V):
        d_x[j] += probs[j] * (d_probs[j] - weighted)


def softmax_forward(float[:, ::1] probs not None, const float[:, ::1] x not None):
    """probs (N, V) = softmax of each row of x (N, V). Overwrites probs."""
    cdef Py_ssize_t N = x.shape[0], V = x.shape[1], i
    if N == 0 or V == 0:
        return
    with nogil:
        for i in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(SOFTMAX_FLOPS_PER_ELEMENT * N * V)):
            _softmax_row(&probs[i, 0], &x[i, 0], V)


def softmax_backward(float[:, ::1] d_x not None, const float[:, ::1] d_probs not None,
                     const float[:, ::1] probs not None):
    """d_x (N, V) += the gradient through softmax, row by row."""
    cdef Py_ssize_t N = probs.shape[0], V = probs.shape[1], i
    if N == 0 or V == 0:
        return
    with nogil:
        for i in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(SOFTMAX_BACKWARD_FLOPS_PER_ELEMENT * N * V)):
            _softmax_backward_row(&d_x[i, 0], &d_probs[i, 0], &probs[i, 0], V)


# ----------------------------------------------------------------------------------------------------
# Fused softmax + cross-entropy
# ----------------------------------------------------------------------------------------------------
# For position n with logits z (V,) and target y:
#     loss_n = -log softmax(z)_y = log sum_k exp(z_k - m) - (z_y - m),   m = max_k z_k
# (written this way, not as -log(probs[y]), so a tiny probability does not lose its digits to rounding
# before the log). The loss is the mean over the N = B*T positions. Backward, for d_loss = dL/d loss:
#     d loss_n / d z_k = softmax(z)_k - [k == y]      ->   d_logits += d_loss * (probs - onehot) / N

cdef float _cross_entropy_row(float* probs, const float* logits, long long target,
                              Py_ssize_t V) noexcept nogil:
    """Fills probs with softmax(logits) and returns -log probs[target]."""
    cdef SoftmaxRow row = _softmax_row(probs, logits, V)
    return <float> (log(row.total) - (logits[target] - row.row_max))


def cross_entropy_forward(float[:, ::1] probs not None, float[::1] losses not None,
                          const float[:, ::1] logits not None, const long long[::1] targets not None):
    """Row n of logits (N, V) against targets[n]: fills probs (N, V) and losses (N,) with the
    per-position loss. Returns the mean loss, summed in double in row order (so it is deterministic)."""
    cdef Py_ssize_t N = logits.shape[0], V = logits.shape[1], n
    cdef double total = 0.0
    if N == 0:
        return float("nan")
    with nogil:
        for n in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(SOFTMAX_FLOPS_PER_ELEMENT * N * V)):
            losses[n] = _cross_entropy_row(&probs[n, 0], &logits[n, 0], targets[n], V)
        for n in range(N):
            total += losses[n]
    return total / N


cdef void _cross_entropy_backward_row(float* d_logits, const float* probs, long long target,
                                      float scale, Py_ssize_t V) noexcept nogil:
    cdef Py_ssize_t j
    for j in range(V):
        d_logits[j] += scale * probs[j]
    d_logits[target] -= scale


def cross_entropy_backward(float[:, ::1] d_logits not None, const float[:, ::1] probs not None,
                           const long long[::1] targets not None, float d_loss):
    """d_logits (N, V) += d_loss * (probs - onehot(targets)) / N."""
    cdef Py_ssize_t N = probs.shape[0], V = probs.shape[1], n
    cdef float scale
    if N == 0:
        return
    scale = d_loss / N
    with nogil:
        for n in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(CROSS_ENTROPY_BACKWARD_FLOPS_PER_ELEMENT * N * V)):
            _cross_entropy_backward_row(&d_logits[n, 0], &probs[n, 0], targets[n], scale, V)


# ----------------------------------------------------------------------------------------------------
# LayerNorm over the channels of each row
# ----------------------------------------------------------------------------------------------------
#     mean = (1/C) sum_c x_c,   var = (1/C) sum_c (x_c - mean)^2,   rstd = 1 / sqrt(var + eps)
#     xhat_c = (x_c - mean) * rstd,   out_c = xhat_c * weight_c + bias_c
# We keep mean and rstd per row for the backward. Backward, per row, with g_c = d_out_c * weight_c
# (the gradient arriving at xhat):
#     d_bias_c   += sum over rows of d_out_c
#     d_weight_c += sum over rows of d_out_c * xhat_c
#     xhat depends on x through x itself, through mean and through rstd. Differentiating
#     xhat_c = (x_c - mean) * rstd, with d mean / d x_k = 1/C and d rstd / d x_k = -rstd^3 (x_k - mean)/C
#     = -rstd^2 xhat_k / C, gives
#     d_x_k = rstd * (g_k - (1/C) sum_c g_c - xhat_k * (1/C) sum_c g_c * xhat_c)

cdef void _layernorm_row(float* out, float* mean_out, float* rstd_out, const float* x,
                         const float* weight, const float* bias, Py_ssize_t C) noexcept nogil:
    cdef float eps = 1e-5
    cdef float lane[LANES]
    cdef Py_ssize_t c, j
    cdef float mean, rstd, diff, sq = 0.0
    # two passes: the one-pass E[x^2] - E[x]^2 form cancels badly when |mean| >> std
    mean = _sum(x, C) / C
    for j in range(LANES):
        lane[j] = 0.0
    c = 0
    while c + LANES <= C:
        for j in range(LANES):
            diff = x[c + j] - mean
            lane[j] += diff * diff
        c += LANES
    for j in range(LANES):
        sq += lane[j]
    while c < C:
        diff = x[c] - mean
        sq += diff * diff
        c += 1
    rstd = 1.0 / sqrtf(sq / C + eps)
    for c in range(C):
        out[c] = (x[c] - mean) * rstd * weight[c] + bias[c]
    mean_out[0] = mean
    rstd_out[0] = rstd


def layernorm_forward(float[:, ::1] out not None, float[::1] mean not None, float[::1] rstd not None,
                      const float[:, ::1] x not None, const float[::1] weight not None,
                      const float[::1] bias not None):
    """out (N, C) = layernorm of each row of x (N, C); saves mean (N,) and rstd (N,). Overwrites all three."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], n
    if N == 0 or C == 0:
        return
    with nogil:
        for n in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(LAYERNORM_FLOPS_PER_ELEMENT * N * C)):
            _layernorm_row(&out[n, 0], &mean[n], &rstd[n], &x[n, 0], &weight[0], &bias[0], C)


cdef void _layernorm_backward_row(float* d_x, float* scratch, const float* d_out, const float* x,
                                  const float* weight, float mean, float rstd,
                                  Py_ssize_t C) noexcept nogil:
    """scratch holds 2C floats owned by the calling thread's row."""
    cdef Py_ssize_t c
    cdef float* g = scratch               # g_c = d_out_c * weight_c, the gradient arriving at xhat
    cdef float* xhat = scratch + C
    cdef float g_mean, g_xhat_mean
    for c in range(C):
        g[c] = d_out[c] * weight[c]
        xhat[c] = (x[c] - mean) * rstd
    g_mean = _sum(g, C) / C
    g_xhat_mean = _dot(g, xhat, C) / C
    for c in range(C):
        d_x[c] += rstd * (g[c] - g_mean - xhat[c] * g_xhat_mean)


cdef void _layernorm_params_block(float* d_weight, float* d_bias, const float* d_out, const float* x,
                                  const float* mean, const float* rstd, Py_ssize_t N, Py_ssize_t C,
                                  Py_ssize_t col0, Py_ssize_t n_cols) noexcept nogil:
    """d_weight, d_bias over columns [col0, col0 + n_cols): sums over all N rows, rows in order."""
    cdef float acc_w[LANES]
    cdef float acc_b[LANES]
    cdef Py_ssize_t n, j
    cdef const float* row
    cdef const float* x_row
    for j in range(n_cols):
        acc_w[j] = 0.0
        acc_b[j] = 0.0
    for n in range(N):
        row = d_out + n * C + col0
        x_row = x + n * C + col0
        for j in range(n_cols):
            acc_b[j] += row[j]
            acc_w[j] += row[j] * ((x_row[j] - mean[n]) * rstd[n])
    for j in range(n_cols):
        d_weight[col0 + j] += acc_w[j]
        d_bias[col0 + j] += acc_b[j]


def layernorm_backward(float[:, ::1] d_x not None, float[::1] d_weight not None,
                       float[::1] d_bias not None, float[:, ::1] scratch not None,
                       const float[:, ::1] d_out not None, const float[:, ::1] x not None,
                       const float[::1] weight not None, const float[::1] mean not None,
                       const float[::1] rstd not None):
    """Accumulates d_x (N, C), d_weight (C,) and d_bias (C,) from d_out (N, C). scratch is (N, 2C)."""
    cdef Py_ssize_t N = x.shape[0], C = x.shape[1], n, blk
    cdef Py_ssize_t n_blocks = (C + LANES - 1) // LANES
    if N == 0 or C == 0:
        return
    with nogil:
        # d_x: each row is owned by one thread
        for n in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(LAYERNORM_BACKWARD_FLOPS_PER_ELEMENT * N * C)):
            _layernorm_backward_row(&d_x[n, 0], &scratch[n, 0], &d_out[n, 0], &x[n, 0], &weight[0],
                                    mean[n], rstd[n], C)
        # d_weight, d_bias: a sum over rows, so each thread owns whole blocks of 16 columns instead
        for blk in prange(n_blocks, schedule='static', num_threads=_num_threads,
                          use_threads_if=_worth_threads(LAYERNORM_PARAMS_FLOPS_PER_ELEMENT * N * C)):
            _layernorm_params_block(&d_weight[0], &d_bias[0], &d_out[0, 0], &x[0, 0], &mean[0],
                                    &rstd[0], N, C, blk * LANES, min(LANES, C - blk * LANES))


# ----------------------------------------------------------------------------------------------------
# Causal multi-head self-attention
# ----------------------------------------------------------------------------------------------------
# Input: qkv (B, T, 3C), the output of the c_attn matmul: q = qkv[..., 0:C], k = qkv[..., C:2C],
# v = qkv[..., 2C:3C]; head h owns channels [h*hs, (h+1)*hs) of each. For one (b, h):
#     score[t, s] = q_t . k_s / sqrt(hs)                   for s <= t
#     m_t         = max_{s <= t} score[t, s]                row_max[b, h, t]
#     Z_t         = sum_{s <= t} exp(score[t, s] - m_t)     row_sum[b, h, t]
#     att[t, s]   = exp(score[t, s] - m_t) / Z_t            (att[t, s] = 0 for s > t: the causal mask)
#     out_t       = sum_{s <= t} drop(att)[t, s] * v_s      (hs,) written to out[b, t, h*hs : (h+1)*hs]
# drop is dropout on the attention weights (the identity when p = 0), with the mask of element
# (b, h, t, s) of the (B, NH, T, T) weights taken from the hash above. The mask is explicit and
# always on: position t never sees a later position, in training as well as in generation. (Skipping
# s > t is the mask: those scores are never computed, and att is 0 there.)
#
# What the forward keeps for the backward is m and Z, two floats per query row: (B, NH, T) each, not
# the (B, NH, T, T) weights (at GPT-2 124M's B4 T1024 that is 393 KB per layer instead of 201 MB). The
# backward recomputes each head's weights from q, k, m and Z, as flash attention does, with the
# forward's own arithmetic (the same score product, the same scaling, _exp_shifted and _scale_row with
# the same m and 1/Z), so they are the forward's weights bit for bit. The price is one more
# q @ k^T per head in the backward: five products of the forward's size instead of four.
#
# Backward, for one (b, h), with a = drop(att) the weights the forward multiplied v by:
#     out_t = sum_s a[t,s] v_s        ->  d_a[t, s] = d_out_t . v_s,     d_v_s += a[t, s] * d_out_t
#     a = drop(att)                   ->  d_att[t, s] = drop(d_a)[t, s]  (the same mask and scale)
#     att[t, :] = softmax(score[t,:]) ->  d_score[t, s] = att[t, s] * (d_att[t, s] - sum_r att[t, r] d_att[t, r])
#     score = q_t . k_s / sqrt(hs)    ->  d_q_t += d_score[t, s] / sqrt(hs) * k_s
#                                         d_k_s += d_score[t, s] / sqrt(hs) * q_t
# Threads own (b, h) pairs: everything one pair reads and writes lies in its own columns of its own
# batch row, so the pairs never touch each other's memory. Each thread has its own scratch (the
# T x T weights and their gradient, and the packing buffer), reused for every pair it owns.
#
# For one (b, h) these are small matrix products (T x hs by hs x T and back), so we run them on
# the matmul's micro-kernel (_gemm_serial), reading q, k, v and their gradients in place through their
# row stride 3C. Tiles that lie wholly above the diagonal are skipped (the `shape` argument of
# _gemm_serial: LOWER_OUTPUT, A_LOWER, A_UPPER). The score tiles that straddle the diagonal still
# compute some entries above it, which the mask then overwrites. The products *through* att or
# d_scores (att @ v, att^T @ d_out, d_scores @ k, d_scores^T @ q) never touch a masked pair: their
# tiles stop short of the diagonal and _triangle_rows adds the entries next to it, so a NaN or inf at
# a later position cannot reach an earlier one as 0 * inf (tests/test_kernels.py poisons them).

cdef inline Py_ssize_t _attention_packed(Py_ssize_t T, Py_ssize_t hs) noexcept nogil:
    """Floats of packing buffer one (b, h) needs: room to pack the largest B operand."""
    return max(_packed_size(T, hs), _packed_size(hs, T))


cdef float* _thread_scratch(Py_ssize_t per_thread) noexcept nogil:
    """One block of per_thread floats for each thread, 64-byte aligned, or NULL if out of memory."""
    return <float*> aligned_alloc(64, (_num_threads * per_thread * sizeof(float) + 63) // 64 * 64)


cdef void _attention_scores(float* att, const float* q, const float* k, float* packed, Py_ssize_t T,
                            Py_ssize_t hs, Py_ssize_t C3) noexcept nogil:
    """att[t, s] = q_t . k_s / sqrt(hs) for s <= t (entries above the diagonal are left undefined)."""
    cdef float scale = 1.0 / sqrtf(<float> hs)
    cdef Py_ssize_t t, s
    cdef float* row
    # scores (T, T) = q (T, hs) @ k^T (hs, T): B[i, s] = k[s, i], strides (1, 3C); only s <= t is used
    _gemm_serial(att, T, q, C3, 1, k, 1, C3, T, T, hs, False, packed, LOWER_OUTPUT)
    for t in range(T):
        row = att + t * T
        for s in range(t + 1):
            row[s] = row[s] * scale


cdef void _attention_weights_head(float* att, const float* q, const float* k, const float* row_max,
                                  const float* row_sum, float* packed, Py_ssize_t T, Py_ssize_t hs,
                                  Py_ssize_t C3) noexcept nogil:
    """att (T, T) of one head recomputed from q, k and the forward's row_max, row_sum (T,): the
    second half of _softmax_row with the m and Z it found, so the bits are the forward's."""
    cdef Py_ssize_t t, s
    cdef float* row
    _attention_scores(att, q, k, packed, T, hs, C3)
    for t in range(T):
        row = att + t * T
        _exp_shifted(row, row, row_max[t], t + 1)
        _scale_row(row, 1.0 / row_sum[t], t + 1)
        for s in range(t + 1, T):          # the causal mask: a later position gets exactly 0
            row[s] = 0.0


cdef void _attention_forward_head(float* out, float* row_max, float* row_sum, const float* qkv,
                                  float* scratch, bint dropout, DropoutMask mask, Py_ssize_t b,
                                  Py_ssize_t h, Py_ssize_t T, Py_ssize_t C, Py_ssize_t NH) noexcept nogil:
    cdef Py_ssize_t hs = C // NH, C3 = 3 * C, t, s
    cdef Py_ssize_t pair = (b * NH + h) * T                # this head's first row of (B, NH, T)
    cdef const float* q = qkv + b * T * C3 + h * hs        # (T, hs), row stride 3C; k, v follow
    cdef const float* k = q + C
    cdef const float* v = q + 2 * C
    cdef float* att = scratch                              # (T, T)
    cdef float* packed = scratch + T * T
    cdef float* row
    cdef SoftmaxRow stats
    _attention_scores(att, q, k, packed, T, hs, C3)
    for t in range(T):
        row = att + t * T
        stats = _softmax_row(row, row, t + 1)
        row_max[pair + t] = stats.row_max
        row_sum[pair + t] = stats.total
        if dropout:                        # element (b, h, t, s) of the weights is (pair + t) * T + s
            _dropout_chunk(row, row, mask, (pair + t) * T, t + 1)
        for s in range(t + 1, T):         # the causal mask: a later position gets exactly 0
            row[s] = 0.0
    # out (T, hs), row stride C = att (T, T) @ v (T, hs); att[t, s] = 0 for s > t
    _gemm_serial(out + b * T * C + h * hs, C, att, T, 1, v, C3, 1, T, hs, T, False, packed, A_LOWER)


cdef void _attention_backward_head(float* d_qkv, float* scratch, const float* d_out, const float* qkv,
                                   const float* row_max, const float* row_sum, bint dropout,
                                   DropoutMask mask, Py_ssize_t b, Py_ssize_t h, Py_ssize_t T,
                                   Py_ssize_t C, Py_ssize_t NH) noexcept nogil:
    cdef Py_ssize_t hs = C // NH, C3 = 3 * C, t, s
    cdef float scale = 1.0 / sqrtf(<float> hs)
    cdef float weighted
    cdef Py_ssize_t head = b * T * C3 + h * hs
    cdef Py_ssize_t pair = (b * NH + h) * T
    cdef const float* q = qkv + head
    cdef const float* k = q + C
    cdef const float* v = q + 2 * C
    cdef float* d_q = d_qkv + head
    cdef float* d_k = d_q + C
    cdef float* d_v = d_q + 2 * C
    cdef const float* d_out_h = d_out + b * T * C + h * hs   # (T, hs), row stride C
    cdef float* att = scratch                                # (T, T) recomputed
    cdef float* d_att = scratch + T * T                      # (T, T)
    cdef float* packed = scratch + 2 * T * T
    cdef float* d_row
    cdef const float* att_row
    _attention_weights_head(att, q, k, row_max + pair, row_sum + pair, packed, T, hs, C3)
    # out = a @ v:  d_v (T, hs) += a^T @ d_out (a^T[s, t] = 0 for t < s), where a = drop(att) is
    # built in d_att's scratch first (d_att is not needed yet), zero above the diagonal
    if dropout:
        for t in range(T):
            _dropout_chunk(d_att + t * T, att + t * T, mask, (pair + t) * T, t + 1)
            for s in range(t + 1, T):
                d_att[t * T + s] = 0.0
        _gemm_serial(d_v, C3, d_att, 1, T, d_out_h, C, 1, T, hs, T, True, packed, A_UPPER)
    else:
        _gemm_serial(d_v, C3, att, 1, T, d_out_h, C, 1, T, hs, T, True, packed, A_UPPER)
    # d_a (T, T) = d_out @ v^T (only s <= t is used)
    _gemm_serial(d_att, T, d_out_h, C, 1, v, 1, C3, T, T, hs, False, packed, LOWER_OUTPUT)
    # a = drop(att): d_att = drop(d_a). att = softmax(scores): d_scores[t, s] = att[t, s] * (d_att[t, s]
    # - sum_r att[t, r] d_att[t, r]); we fold in the 1/sqrt(hs) of scores = q . k * scale. Above the
    # diagonal att = 0, so d_scores = 0 (written explicitly: the skipped tiles of d_att hold whatever the
    # scratch held).
    for t in range(T):
        att_row = att + t * T
        d_row = d_att + t * T
        if dropout:
            _dropout_chunk(d_row, d_row, mask, (pair + t) * T, t + 1)
        weighted = _dot(att_row, d_row, t + 1)
        for s in range(t + 1):
            d_row[s] = att_row[s] * (d_row[s] - weighted) * scale
        for s in range(t + 1, T):
            d_row[s] = 0.0
    # scores = q @ k^T:  d_q (T, hs) += d_scores @ k,  d_k (T, hs) += d_scores^T @ q
    _gemm_serial(d_q, C3, d_att, T, 1, k, C3, 1, T, hs, T, True, packed, A_LOWER)
    _gemm_serial(d_k, C3, d_att, 1, T, q, C3, 1, T, hs, T, True, packed, A_UPPER)


def attention_forward(float[:, :, ::1] out not None, float[:, :, ::1] row_max not None,
                      float[:, :, ::1] row_sum not None, const float[:, :, ::1] qkv not None, int n_head,
                      uint64 dropout_key, uint64 dropout_threshold, float dropout_scale):
    """out (B, T, C), row_max and row_sum (B, NH, T) from qkv (B, T, 3C); dropout on the weights with
    the given key, threshold and scale (threshold 0: none). Overwrites out, row_max and row_sum."""
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3, NH = n_head
    cdef Py_ssize_t unit, per_thread
    cdef int thread
    cdef float* scratch
    cdef DropoutMask mask = _dropout_mask(dropout_key, dropout_threshold, dropout_scale)
    if B == 0 or T == 0 or C == 0:
        return
    per_thread = T * T + _attention_packed(T, C // NH)
    scratch = _thread_scratch(per_thread)
    if scratch == NULL:
        raise MemoryError("attention_forward: could not allocate scratch space")
    with nogil:
        for unit in prange(B * NH, schedule='static', num_threads=_num_threads,
                           use_threads_if=_worth_threads(ATTENTION_FORWARD_FLOPS * B * T * T * C)):
            thread = openmp.omp_get_thread_num()
            _attention_forward_head(&out[0, 0, 0], &row_max[0, 0, 0], &row_sum[0, 0, 0], &qkv[0, 0, 0],
                                    scratch + thread * per_thread, dropout_threshold != 0, mask,
                                    unit // NH, unit % NH, T, C, NH)
    free(scratch)


def attention_backward(float[:, :, ::1] d_qkv not None, const float[:, :, ::1] d_out not None,
                       const float[:, :, ::1] qkv not None, const float[:, :, ::1] row_max not None,
                       const float[:, :, ::1] row_sum not None, int n_head, uint64 dropout_key,
                       uint64 dropout_threshold, float dropout_scale):
    """d_qkv (B, T, 3C) += the gradient of attention_forward's out, given d_out (B, T, C), the
    forward's row_max and row_sum (B, NH, T) and its dropout key, threshold and scale."""
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3, NH = n_head
    cdef Py_ssize_t unit, per_thread
    cdef int thread
    cdef float* scratch
    cdef DropoutMask mask = _dropout_mask(dropout_key, dropout_threshold, dropout_scale)
    if B == 0 or T == 0 or C == 0:
        return
    per_thread = 2 * T * T + _attention_packed(T, C // NH)
    scratch = _thread_scratch(per_thread)
    if scratch == NULL:
        raise MemoryError("attention_backward: could not allocate scratch space")
    with nogil:
        for unit in prange(B * NH, schedule='static', num_threads=_num_threads,
                           use_threads_if=_worth_threads(ATTENTION_BACKWARD_FLOPS * B * T * T * C)):
            thread = openmp.omp_get_thread_num()
            _attention_backward_head(&d_qkv[0, 0, 0], scratch + thread * per_thread, &d_out[0, 0, 0],
                                     &qkv[0, 0, 0], &row_max[0, 0, 0], &row_sum[0, 0, 0],
                                     dropout_threshold != 0, mask, unit // NH, unit % NH, T, C, NH)
    free(scratch)


def attention_weights(float[:, :, :, ::1] att not None, const float[:, :, ::1] qkv not None,
                      const float[:, :, ::1] row_max not None, const float[:, :, ::1] row_sum not None,
                      int n_head):
    """att (B, NH, T, T): the attention weights (before dropout) of attention_forward, recomputed from
    qkv (B, T, 3C) and its row_max, row_sum (B, NH, T), bit for bit. Overwrites att."""
    cdef Py_ssize_t B = qkv.shape[0], T = qkv.shape[1], C = qkv.shape[2] // 3, NH = n_head
    cdef Py_ssize_t unit, per_thread, hs = C // NH
    cdef int thread
    cdef float* packed
    if B == 0 or T == 0 or C == 0:
        return
    per_thread = _attention_packed(T, hs)
    packed = _thread_scratch(per_thread)
    if packed == NULL:
        raise MemoryError("attention_weights: could not allocate scratch space")
    with nogil:
        for unit in prange(B * NH, schedule='static', num_threads=_num_threads,
                           use_threads_if=_worth_threads(ATTENTION_FORWARD_FLOPS * B * T * T * C)):
            thread = openmp.omp_get_thread_num()
            _attention_weights_head(&att[unit // NH, unit % NH, 0, 0],
                                    &qkv[unit // NH, 0, (unit % NH) * hs], &qkv[unit // NH, 0, C + (unit % NH) * hs],
                                    &row_max[unit // NH, unit % NH, 0], &row_sum[unit // NH, unit % NH, 0],
                                    packed + thread * per_thread, T, hs, 3 * C)
    free(packed)


# Generation with a KV cache: the keys and values of earlier positions do not change when a new token
# arrives (the mask means no position looks forward), so we keep every layer's qkv rows in a cache and
# compute attention only for the new query positions [start, end), each against keys 0..t:
#     out_t = sum_{s <= t} softmax_s(q_t . k_s / sqrt(hs)) v_s        for t in [start, end)
# For one new token that is one row of scores and one weighted sum: O(T * C) instead of O(T^2 * C).
# Same math as attention_forward; the loops are per query row (dot products and axpys) because one row
# is too little work for the matmul tiles.

cdef void _attention_cached_head(float* out, const float* qkv, float* scores, Py_ssize_t b,
                                 Py_ssize_t h, Py_ssize_t T_max, Py_ssize_t start, Py_ssize_t end,
                                 Py_ssize_t C, Py_ssize_t NH) noexcept nogil:
    cdef Py_ssize_t hs = C // NH, C3 = 3 * C, t, s, j
    cdef float scale = 1.0 / sqrtf(<float> hs)
    cdef const float* q
    cdef float* out_t
    for t in range(start, end):
        q = qkv + (b * T_max + t) * C3 + h * hs
        for s in range(t + 1):
            scores[s] = _dot(q, qkv + (b * T_max + s) * C3 + C + h * hs, hs) * scale
        _softmax_row(scores, scores, t + 1)
        out_t = out + (b * (end - start) + t - start) * C + h * hs
        for j in range(hs):
            out_t[j] = 0.0
        for s in range(t + 1):
            _axpy(out_t, scores[s], qkv + (b * T_max + s) * C3 + 2 * C + h * hs, hs)


def attention_forward_cached(float[:, :, ::1] out not None, const float[:, :, ::1] qkv not None,
                             Py_ssize_t start, Py_ssize_t end, int n_head):
    """out (B, end - start, C): attention of query positions [start, end) of qkv (B, T_max, 3C), each
    against positions 0..t. Overwrites out."""
    cdef Py_ssize_t B = qkv.shape[0], T_max = qkv.shape[1], C = qkv.shape[2] // 3, NH = n_head
    cdef Py_ssize_t unit
    cdef float* scores
    if B == 0 or end <= start or C == 0:
        return
    scores = <float*> malloc(B * NH * end * sizeof(float))
    if scores == NULL:
        raise MemoryError("attention_forward_cached: could not allocate scratch space")
    with nogil:
        # one new token is a few microseconds of work: waking a sleeping thread for it would cost
        # 10-100 times more, so only a long prompt (many query rows) goes parallel
        for unit in prange(B * NH, schedule='static', num_threads=_num_threads,
                           use_threads_if=(end - start) > 1 and
                           _worth_threads(ATTENTION_FORWARD_FLOPS * B * (end - start) * end * C)):
            _attention_cached_head(&out[0, 0, 0], &qkv[0, 0, 0], scores + unit * end, unit // NH,
                                   unit % NH, T_max, start, end, C, NH)
    free(scores)


# ----------------------------------------------------------------------------------------------------
# Token + position embedding
# ----------------------------------------------------------------------------------------------------
#     out[b, t, :] = wte[idx[b, t], :] + wpe[t, :]
# Backward: each output row is a sum of one row of each table, so its gradient goes back to those rows:
#     d_wte[idx[b, t], :] += d_out[b, t, :]      d_wpe[t, :] += d_out[b, t, :]
# The same token can appear at many positions, so rows of d_wte receive many additions. Threads split
# the *columns* of d_wte (blocks of 16) and each walks every position in order: no two threads touch
# the same element, and the order of additions is fixed.

cdef void _embedding_row(float* out, const float* wte_row, const float* wpe_row,
                         Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t c
    for c in range(C):
        out[c] = wte_row[c] + wpe_row[c]


cdef void _embedding_backward_block(float* d_wte, const float* d_out, const long long* idx,
                                    Py_ssize_t N, Py_ssize_t C, Py_ssize_t col0,
                                    Py_ssize_t n_cols) noexcept nogil:
    cdef Py_ssize_t n
    for n in range(N):
        _accumulate_chunk(d_wte + idx[n] * C + col0, d_out + n * C + col0, n_cols)


cdef void _position_backward_row(float* d_wpe_row, const float* d_out, Py_ssize_t t, Py_ssize_t B,
                                 Py_ssize_t T, Py_ssize_t C) noexcept nogil:
    cdef Py_ssize_t b
    for b in range(B):
        _accumulate_chunk(d_wpe_row, d_out + (b * T + t) * C, C)


def embedding_forward(float[:, ::1] out not None, const long long[::1] idx not None,
                      const float[:, ::1] wte not None, const float[:, ::1] wpe not None, Py_ssize_t T):
    """out (N, C), N = B*T, row n = wte[idx[n]] + wpe[n % T]. Overwrites out."""
    cdef Py_ssize_t N = idx.shape[0], C = wte.shape[1], n
    if N == 0 or C == 0:
        return
    with nogil:
        for n in prange(N, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(ADD_FLOPS_PER_ELEMENT * N * C)):
            _embedding_row(&out[n, 0], &wte[idx[n], 0], &wpe[n % T, 0], C)


def embedding_backward(float[:, ::1] d_wte not None, float[:, ::1] d_wpe not None,
                       const float[:, ::1] d_out not None, const long long[::1] idx not None,
                       Py_ssize_t T):
    """d_wte (V, C) and d_wpe (block_size, C) += the scattered rows of d_out (N, C), N = B*T."""
    cdef Py_ssize_t N = idx.shape[0], C = d_out.shape[1], B, t, blk
    cdef Py_ssize_t n_blocks = (C + LANES - 1) // LANES
    if N == 0 or C == 0:
        return
    B = N // T
    with nogil:
        for blk in prange(n_blocks, schedule='static', num_threads=_num_threads,
                          use_threads_if=_worth_threads(ADD_FLOPS_PER_ELEMENT * N * C)):
            _embedding_backward_block(&d_wte[0, 0], &d_out[0, 0], &idx[0], N, C, blk * LANES,
                                      min(LANES, C - blk * LANES))
        for t in prange(T, schedule='static', num_threads=_num_threads,
                        use_threads_if=_worth_threads(ADD_FLOPS_PER_ELEMENT * N * C)):
            _position_backward_row(&d_wpe[t, 0], &d_out[0, 0], t, B, T, C)


# ----------------------------------------------------------------------------------------------------
# AdamW, fused and in place
# ----------------------------------------------------------------------------------------------------
# For each element, with gradient g at step t (t = 1, 2, ...), exactly as torch.optim.AdamW does it:
#     g  = grad * grad_scale                            the clipping's scale (1: no clipping), float32
#     p  = p * (1 - lr * weight_decay)                  decoupled weight decay (not added to g)
#     m  = beta1 * m + (1 - beta1) * g                  running mean of g
#     v  = beta2 * v + (1 - beta2) * g^2                running mean of g^2
#     p -= lr / (1 - beta1^t) * m / (sqrt(v) / sqrt(1 - beta2^t) + eps)
# The two (1 - beta^t) factors undo the bias of m and v toward their zero start in early steps.
# One pass reads p, g, m, v once and writes p, m, v once: the optimizer is pure memory traffic.
# grad_scale folds gradient clipping into that pass: g is the float32 product grad * grad_scale, the
# very bits a separate pass `grad *= grad_scale` would have stored, without writing grad back (that
# pass would read and write every gradient once more).

cdef void _adamw_chunk(float* p, const float* g, float* m, float* v, Py_ssize_t n, float grad_scale,
                       float beta1, float one_minus_beta1, float beta2, float one_minus_beta2, float eps,
                       float decay, float step_size, float inv_sqrt_correction2) noexcept nogil:
    cdef Py_ssize_t i
    cdef float gi
    for i in range(n):
        gi = g[i] * grad_scale          # rounded to float32 here, as a stored g would be
        m[i] = beta1 * m[i] + one_minus_beta1 * gi
        v[i] = beta2 * v[i] + one_minus_beta2 * gi * gi
        p[i] = p[i] * decay - step_size * m[i] / (sqrtf(v[i]) * inv_sqrt_correction2 + eps)


def adamw_update(float[::1] param not None, const float[::1] grad not None, float[::1] m not None,
                 float[::1] v not None, double lr, double beta1, double beta2, double eps,
                 double weight_decay, long long step, float grad_scale=1.0):
    """One AdamW step on flat arrays of the same length, in place (param, m, v), with the gradient
    grad * grad_scale (grad itself is only read)."""
    cdef Py_ssize_t n = param.shape[0], chunk
    cdef float decay = <float> (1.0 - lr * weight_decay)
    cdef float step_size = <float> (lr / (1.0 - beta1 ** step))
    cdef float inv_sqrt_correction2 = <float> (1.0 / sqrt(1.0 - beta2 ** step))
    # 1 - beta in double, then rounded once: rounding beta first would put an error of up to
    # 2^-24 * beta / (1 - beta) into the coefficient (1.3e-5 relative for beta2 = 0.999)
    cdef float f_beta1 = <float> beta1, f_one_minus_beta1 = <float> (1.0 - beta1)
    cdef float f_beta2 = <float> beta2, f_one_minus_beta2 = <float> (1.0 - beta2)
    cdef float f_eps = <float> eps
    if n == 0:
        return
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(ADAMW_FLOPS_PER_ELEMENT * n)):
            _adamw_chunk(&param[chunk * CHUNK], &grad[chunk * CHUNK], &m[chunk * CHUNK],
                         &v[chunk * CHUNK], _chunk_len(chunk, n), grad_scale, f_beta1,
                         f_one_minus_beta1, f_beta2, f_one_minus_beta2, f_eps, decay, step_size,
                         inv_sqrt_correction2)


# ----------------------------------------------------------------------------------------------------
# Sum of squares (for the global gradient norm)
# ----------------------------------------------------------------------------------------------------
#     sum_i x_i^2, for clipping: ||g|| = sqrt(sum over every parameter's gradient of g^2).
# Each CHUNK of x is summed in 16 float lanes into its own slot of `partials`; the partials are then
# added in chunk order, in double. The split is by chunk, not by thread, so the result is the same for
# any thread count.

cdef void _sum_of_squares_chunk(double* partial, const float* x, Py_ssize_t n) noexcept nogil:
    partial[0] = _dot(x, x, n)


def sum_of_squares(double[::1] partials not None, const float[::1] x not None):
    """sum_i x[i]^2 as a Python float. partials is scratch space of at least
    ceil(len(x) / CHUNK_SIZE) doubles, one per chunk."""
    cdef Py_ssize_t n = x.shape[0], chunk
    cdef double total = 0.0
    if n == 0:
        return 0.0
    # One compare, and a partials array sized from a different chunk length can never be overrun.
    if partials.shape[0] < _n_chunks(n):
        raise ValueError(f"partials must hold ceil({n} / CHUNK_SIZE) = {_n_chunks(n)} doubles, "
                         f"got {partials.shape[0]}")
    with nogil:
        for chunk in prange(_n_chunks(n), schedule='static', num_threads=_num_threads,
                            use_threads_if=_worth_threads(FLOPS_PER_MULTIPLY_ADD * n)):
            _sum_of_squares_chunk(&partials[chunk], &x[chunk * CHUNK], _chunk_len(chunk, n))
        for chunk in range(_n_chunks(n)):
            total += partials[chunk]
    return total
