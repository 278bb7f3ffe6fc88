"""gptcore.ladder: the matmul optimisation ladder, checked and in order.

WHAT'S GOING ON HERE
====================

WHAT
  Seven ways to compute one product, out (N, OC) = inp (N, IC) @ weight (IC, OC), from the textbook
  triple loop to the kernel the model trains with. Each rung adds one idea to the rung before it:

      from gptcore import ladder
      for name, matmul, idea in ladder.RUNGS:
          out = matmul(inp, weight)                  # every rung: the same call, the same answer

  RUNGS is the ordered list of (name, function, one-line idea). The first six are compiled in
  gptcore._ladder, whose comments explain each idea, why it helps and what it costs; the last is the
  production kernel itself, gptcore.kernels.matmul_forward. The first rung is also the project's one
  naive matmul: the benchmarks and tests that want "the plain triple loop, compiled" call it.

WHERE
  Nothing in the model uses rungs 1-6. `make ladder` (bench/ladder.py) times every rung at the baby
  GPT's matmul shapes next to numpy/OpenBLAS and prints a table of GFLOP/s; read it next to the
  comments in gptcore/_ladder.pyx to see which idea buys what on your machine.

HOW
  Each function checks its arguments with gptcore.validate, the checks gptcore.kernels uses (the same
  messages, the same exceptions), allocates out if the caller passed none, and calls the compiled rung.
  The threaded rungs use the thread count set by gptcore.kernels.set_num_threads (OpenMP's default,
  which honours OMP_NUM_THREADS).

CONTRACT
  inp (N, IC) and weight (IC, OC): float32 numpy arrays (else TypeError), 2-D, C-contiguous, non-empty,
  with matching IC (else ValueError naming the argument). out, if given: float32, C-contiguous,
  writeable, shape (N, OC), sharing no memory with inp or weight; it is overwritten and returned.

TWIN
  inp @ weight in float64: tests/test_ladder.py holds every rung to it within float32 rounding.
"""
from gptcore import _ladder, kernels
from gptcore.validate import float_array, matmul_sizes, output_buffer

__all__ = ["matmul_naive", "matmul_loop_order", "matmul_threads", "matmul_tiled", "matmul_packed",
           "matmul_microkernel", "RUNGS"]


def _run(rung, inp, weight, out):
    float_array("inp", inp, 2)                 # the rungs take exactly (N, IC), no leading dimensions
    (N,), _, OC = matmul_sizes(inp, weight)
    out = output_buffer("out", out, (N, OC), {"inp": inp, "weight": weight}, zero=False)
    rung(out, inp, weight)
    return out


# One wrapper per rung, the same line in each: a named function per rung is what help(), a traceback
# and the benchmark table show, so we write them out rather than build them in a loop.

def matmul_naive(inp, weight, *, out=None):
    """Rung 1: out (N, OC) = inp (N, IC) @ weight (IC, OC) by the i, j, k triple loop, one thread."""
    return _run(_ladder.matmul_naive, inp, weight, out)


def matmul_loop_order(inp, weight, *, out=None):
    """Rung 2: the i, k, j order; each row of out is a sum of rows of weight (unit stride), one thread."""
    return _run(_ladder.matmul_loop_order, inp, weight, out)


def matmul_threads(inp, weight, *, out=None):
    """Rung 3: rung 2 with the rows of out split over threads."""
    return _run(_ladder.matmul_threads, inp, weight, out)


def matmul_tiled(inp, weight, *, out=None):
    """Rung 4: rung 3 in cache blocks of rows x k x columns."""
    return _run(_ladder.matmul_tiled, inp, weight, out)


def matmul_packed(inp, weight, *, out=None):
    """Rung 5: weight packed into contiguous 32-column panels, a plain axpy kernel per 6 x 32 tile."""
    return _run(_ladder.matmul_packed, inp, weight, out)


def matmul_microkernel(inp, weight, *, out=None):
    """Rung 6: packed panels and a 6 x 32 register-blocked micro-kernel; ragged widths padded to 32."""
    return _run(_ladder.matmul_microkernel, inp, weight, out)


# (name, function, idea), in ladder order. Every function is called as function(inp, weight, out=out).
RUNGS = [
    ("naive", matmul_naive, "i, j, k triple loop: a strided column walk of weight, one thread"),
    ("loop_order", matmul_loop_order, "i, k, j order: unit-stride rows, the inner loop vectorizes"),
    ("threads", matmul_threads, "rows of out split over threads"),
    ("tiled", matmul_tiled, "cache blocks of rows x k x columns"),
    ("packed", matmul_packed, "weight packed into K x 32 panels, plain kernel per tile"),
    ("microkernel", matmul_microkernel, "6 x 32 register-blocked micro-kernel, ragged widths padded"),
    ("production", kernels.matmul_forward, "gptcore.kernels.matmul_forward: + 6 x 16 edge kernel"),
]
