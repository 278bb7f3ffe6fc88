"""The matmul ladder, measured: every rung of gptcore.ladder.RUNGS next to numpy, in GFLOP/s.

WHAT'S GOING ON HERE
  WHAT    `python bench/ladder.py` (or `make ladder`, which first unsets OPENBLAS_CORETYPE and
          OPENBLAS_L2_SIZE: some machines set them, and they make numpy's OpenBLAS pick a slower kernel)
          times every rung of the ladder, and np.matmul, on the baby GPT's matmul shapes, and prints a
          markdown table: a row per rung plus numpy, a column per shape, GFLOP/s in each cell
          (2 * N * IC * OC flops over the median time of one call). The comments in
          gptcore/_ladder.pyx say what each rung changes and why; this table says how much it buys.
  SHAPES  out (N, OC) = inp (N, IC) @ weight (IC, OC) with N = B*T = 12*64 = 768 rows and C = 128:
            768 x 128 @ 128 x 384   attn.c_attn, C -> 3C (the q, k, v projection)
            768 x 512 @ 512 x 128   mlp.c_proj, 4C -> C (the longest sum)
            768 x 128 @ 128 x 65    the LM head's shape, C -> V = 65 (a ragged width: 2 panels + 1)
  HOW     Per cell: check the rung's answer against float64 numpy once (a wrong kernel gets no speed);
          estimate one call's time from its first few rows, and skip the cell (saying so) if a call
          would take more than --budget seconds (only the naive rung could, at bigger shapes); a few
          warm-up calls; then timed calls until --seconds have passed (at least 5), and the median.
          Before each cell we sleep a moment so that OpenBLAS's threads, which spin for a while after
          each numpy call, have gone quiet and do not steal a core from the next measurement (see
          quiet_cores in bench/conftest.py).
  THREADS The threaded rungs and the production kernel use gptcore.kernels.get_num_threads() threads
          (OMP_NUM_THREADS, or --threads). numpy uses OpenBLAS's own threads (OPENBLAS_NUM_THREADS).
  --quick Tiny shapes, a few calls each: a smoke test that tests/test_ladder.py runs so this command
          never rots. Its numbers mean nothing.
"""
import argparse
import os
import pathlib
import platform
import statistics
import sys
import time

import numpy as np

# Import gptcore from this checkout (the in-place build), even when it is not installed.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))

from gptcore import kernels, ladder  # noqa: E402

SHAPES = [(768, 128, 384), (768, 512, 128), (768, 128, 65)]          # (N, IC, OC)
QUICK_SHAPES = [(13, 16, 40), (13, 40, 16), (13, 16, 5)]
U = 2.0 ** -24                                                       # float32 unit roundoff


def cpu_model():
    try:
        for line in pathlib.Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def blas_name():
    try:
        blas = np.__config__.CONFIG["Build Dependencies"]["blas"]
        return f"{blas['name']} {blas.get('version', '')}".strip()
    except (AttributeError, KeyError, TypeError):
        return "its BLAS"


def check(name, function, inp, weight):
    """The rung's answer is inp @ weight within float32 rounding (the bound tests/test_ladder.py
    derives: (IC + 1) u sum_i |inp[n, i] weight[i, o]|)."""
    got = function(inp, weight, out=np.empty((inp.shape[0], weight.shape[1]), np.float32))
    exact = inp.astype(np.float64) @ weight.astype(np.float64)
    bound = (inp.shape[1] + 1) * U * (np.abs(inp.astype(np.float64)) @ np.abs(weight.astype(np.float64)))
    if not np.all(np.abs(got - exact) <= bound):
        sys.exit(f"{name} gives a wrong answer at {inp.shape} @ {weight.shape}; not timing it")


def median_seconds(call, seconds, warmup):
    for _ in range(warmup):
        call()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < 5 or time.perf_counter() < deadline:
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(function, inp, weight, out, args):
    """GFLOP/s of function(inp, weight, out=out), or a string saying why the cell was skipped."""
    N, IC = inp.shape
    OC = weight.shape[1]
    # The time of a full call, estimated from the fastest of three calls on the first few rows (the
    # fastest, because one call that waited for a busy core would be scaled up N / probe_rows times).
    probe_rows = min(N, 16)
    probe, probe_out = inp[:probe_rows], out[:probe_rows]
    probe_times = []
    for _ in range(3):
        start = time.perf_counter()
        function(probe, weight, out=probe_out)
        probe_times.append(time.perf_counter() - start)
    estimate = min(probe_times) * N / probe_rows
    if estimate > args.budget:
        return f"skipped (~{estimate:.1f} s/call)"
    time.sleep(args.settle)
    seconds = median_seconds(lambda: function(inp, weight, out=out), args.seconds, args.warmup)
    return 2 * N * IC * OC / seconds / 1e9


def numpy_matmul(inp, weight, *, out):
    return np.matmul(inp, weight, out=out)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes, a few calls: a smoke test")
    parser.add_argument("--threads", type=int, default=None, help="threads for gptcore's kernels")
    parser.add_argument("--budget", type=float, default=2.0,
                        help="skip a cell whose single call would take longer than this (seconds)")
    args = parser.parse_args(argv)
    if args.threads is not None:
        kernels.set_num_threads(args.threads)
    shapes = QUICK_SHAPES if args.quick else SHAPES
    args.seconds, args.warmup, args.settle = (0.01, 1, 0.0) if args.quick else (0.3, 3, 0.25)

    rng = np.random.default_rng(0)
    rows = [(f"{i} {name}", function, idea) for i, (name, function, idea) in enumerate(ladder.RUNGS, 1)]
    rows.append(("numpy", numpy_matmul, f"np.matmul ({blas_name()})"))
    cells = {row[0]: [] for row in rows}
    for N, IC, OC in shapes:
        inp = rng.standard_normal((N, IC), dtype=np.float32)
        weight = rng.standard_normal((IC, OC), dtype=np.float32)
        out = np.empty((N, OC), np.float32)
        for name, function, _ in rows:
            check(name, function, inp, weight)
            cells[name].append(measure(function, inp, weight, out, args))

    print(f"\nmatmul ladder: GFLOP/s, median of repeated calls after warm-up "
          f"(out (N, OC) = inp (N, IC) @ weight (IC, OC); 2 N IC OC flops per call)")
    print(f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; gptcore threads: "
          f"{kernels.get_num_threads()}; numpy: {np.__version__}, {blas_name()} with its own threads")
    if hasattr(os, "getloadavg"):
        print(f"load average over the last minute when we finished: {os.getloadavg()[0]:.2f} "
              f"(anything else running shares the cores, and the numbers below are then unreliable)")
    for variable in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE"):
        if variable in os.environ:
            print(f"note: {variable}={os.environ[variable]} is set and may slow numpy down; "
                  f"`make ladder` unsets it")
    if args.quick:
        print("(--quick: tiny shapes, the numbers mean nothing)")
    print()
    header = [f"{N}x{IC} @ {IC}x{OC}" for N, IC, OC in shapes]
    print("| rung | idea | " + " | ".join(header) + " |")
    print("|---|---|" + "---:|" * len(shapes))
    for name, _, idea in rows:
        values = [f"{v:.1f}" if isinstance(v, float) else v for v in cells[name]]
        print(f"| {name} | {idea} | " + " | ".join(values) + " |")


if __name__ == "__main__":
    main()
