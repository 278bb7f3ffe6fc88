"""Data parallelism on one machine: 2 MPI ranks x 1 thread against 1 process x 2 threads.

WHAT'S GOING ON HERE
  Both train nanoGPT's baby GPT at the same global batch (12 x 64 tokens a step) through
  gptcore.train.train_step (bench/distributed_steps.py): one process splits each kernel over 2
  OpenMP threads; two ranks each run every kernel on one thread over half the batch and then average
  the gradients with one MPI all-reduce of the 0.8 M-parameter buffer (3.2 MB). The rounds alternate
  (1 process, 2 ranks, 1 process, ...), so both see the same machine load, and the test compares the
  medians of their tokens/s. The bar: 2 ranks reach at least 0.9x the tokens/s of 1 process. The
  test prints its table (tokens/s of every round, the medians, the ratio and the load average) as it
  runs, even without -s.
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

from gptcore.distributed import find_mpiexec

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
SCRIPT = os.path.join(BENCH, "distributed_steps.py")
ROUNDS = 3
MPIEXEC = find_mpiexec()     # None without mpiexec or mpi4py


def steps(ranks, threads):
    """One run of distributed_steps.py -> its JSON line (rank 0's)."""
    env = {**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, SCRIPT]
    if ranks > 1:
        command = [MPIEXEC, "-n", str(ranks), *command]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(MPIEXEC is None, reason="needs mpiexec and mpi4py")
def test_two_ranks_of_one_thread_train_at_least_0_9x_as_fast_as_one_process_of_two_threads(capsys):
    runs = {"1 process x 2 threads": [], "2 ranks x 1 thread": []}
    for _ in range(ROUNDS):
        runs["1 process x 2 threads"].append(steps(1, 2))
        runs["2 ranks x 1 thread"].append(steps(2, 1))
    tokens_per_sec = {name: statistics.median(r["tokens_per_sec"] for r in rounds) for name, rounds in runs.items()}
    ratio = tokens_per_sec["2 ranks x 1 thread"] / tokens_per_sec["1 process x 2 threads"]
    with capsys.disabled():
        print(f"\nbaby GPT, global batch 12 x 64 tokens, {ROUNDS} alternating rounds, median of each "
              f"round's median step; load average {os.getloadavg()[0]:.2f}")
        for name, rounds in runs.items():
            each = ", ".join(f"{r['tokens_per_sec']:,.0f}" for r in rounds)
            print(f"  {name:22s} {tokens_per_sec[name]:9,.0f} tokens/s   (rounds: {each})")
        print(f"  2 ranks / 1 process: {ratio:.2f}x")
    assert ratio >= 0.9
