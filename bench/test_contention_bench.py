"""Training on a busy machine: the default thread count against --threads 1 and --threads 2, under a
competing 2-thread load, and the default against libgomp's own spinning on a quiet machine.

WHAT'S GOING ON HERE
  Each measurement is a whole `gptcore train` process (nanoGPT's baby GPT on tinyshakespeare.txt,
  no evaluation but the first and last, no report), and its speed is the median of the tokens/s that
  metrics.jsonl records every LOG_INTERVAL steps (the first window, which pays for warming up, left
  out). The configurations alternate within each round (default, --threads 1, --threads 2, default,
  ...), so all of them see the same machine, and each gets the median of its rounds.

  test_default_threads_under_a_competing_load: the fixture `competing_load` starts a second Python
  process whose two threads keep numpy busy (np.exp and np.sqrt over 4 M floats release the GIL, so
  both threads run at once) and stops it when the test ends, passed or failed. The bar (issue 12):
  the default reaches at least 0.9x the tokens/s of the better of --threads 1 and --threads 2. One
  more row, libgomp's default wait (GOMP_SPINCOUNT=300000, what gptcore ran with before
  gptcore.compiled chose SPIN_COUNT), runs fewer steps, because it is that much slower.

  test_default_threads_on_a_quiet_machine: no load; the default against libgomp's default wait,
  side by side. The bar: the default at least 0.95x as fast (the runs vary by more than that
  between rounds, which is why the medians of alternating rounds are compared).

  Both print their table as they run (even without -s) and record the tokens/s and ratios in
  extra_info. Run them alone (the tests time whole processes, so nothing else should be measuring):

    python3 -m pytest bench/test_contention_bench.py
"""
import json
import os
import statistics
import subprocess
import sys

import pytest

BENCH = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(BENCH)
DATA = os.path.join(REPO, "..", "shared", "data", "tinyshakespeare.txt")
STEPS, LOG_INTERVAL, ROUNDS = 40, 10, 3
LIBGOMP_DEFAULT_WAIT = {"GOMP_SPINCOUNT": "300000"}      # libgomp's spin count with no wait policy set
OLD = "default, libgomp's default wait"

# The competing load: two threads of numpy, busy until killed.
BUSY_THREADS = """
import threading
import numpy as np
def busy():
    x = np.random.default_rng(0).random(1 << 22, dtype=np.float32)
    out = np.empty_like(x)
    while True:
        np.exp(x, out=out)
        np.sqrt(out, out=out)
for _ in range(2):
    threading.Thread(target=busy, daemon=True).start()
threading.Event().wait()
"""

pytestmark = pytest.mark.skipif(not os.path.exists(DATA), reason=f"needs {DATA}")


@pytest.fixture
def competing_load():
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    load = subprocess.Popen([sys.executable, "-c", BUSY_THREADS], env=env)
    try:
        yield load
    finally:
        load.kill()
        load.wait()


def tokens_per_sec(tmp_path, flags=(), env_changes=None, steps=STEPS):
    """One `gptcore train` of the baby GPT -> the median tokens/s of its metrics.jsonl windows."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": REPO, **(env_changes or {})}
    command = [sys.executable, "-m", "gptcore", "train", "--data", DATA, "--out", str(out), "--overwrite",
               "--max-iters", str(steps), "--eval-interval", str(steps), "--eval-iters", "1",
               "--log-interval", str(LOG_INTERVAL), "--no-report", "--no-progress", *flags]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr
    with open(out / "metrics.jsonl") as f:
        records = [json.loads(line) for line in f]
    windows = [r["tokens_per_sec"] for r in records if not r["eval"]]
    return statistics.median(windows[1:])


def measure(tmp_path, configurations):
    """{name: (flags, env changes, steps)} -> {name: [tokens/s of each round]}, alternating within rounds."""
    speeds = {name: [] for name in configurations}
    for _ in range(ROUNDS):
        for name, (flags, env_changes, steps) in configurations.items():
            speeds[name].append(tokens_per_sec(tmp_path, flags, env_changes, steps))
    return speeds


def report(capsys, title, speeds):
    medians = {name: statistics.median(rounds) for name, rounds in speeds.items()}
    with capsys.disabled():
        print(f"\n{title}; baby GPT, {ROUNDS} alternating rounds, median tokens/s; load average "
              f"{os.getloadavg()[0]:.2f}")
        for name, rounds in speeds.items():
            each = ", ".join(f"{r:,.0f}" for r in rounds)
            print(f"  {name:40s} {medians[name]:9,.0f} tokens/s   (rounds: {each})")
    return medians


def test_default_threads_under_a_competing_load(benchmark, tmp_path, competing_load, capsys):
    configurations = {
        "default": ((), None, STEPS),
        "--threads 1": (("--threads", "1"), None, STEPS),
        "--threads 2": (("--threads", "2"), None, STEPS),
        OLD: ((), LIBGOMP_DEFAULT_WAIT, 2 * LOG_INTERVAL),
    }
    speeds = benchmark.pedantic(measure, args=(tmp_path, configurations), rounds=1, iterations=1)
    medians = report(capsys, "under a competing 2-thread load", speeds)
    best_fixed = max(medians["--threads 1"], medians["--threads 2"])
    ratio = medians["default"] / best_fixed
    with capsys.disabled():
        print(f"  default / best of --threads 1 and 2: {ratio:.2f}x; default / libgomp's default wait: "
              f"{medians['default'] / medians[OLD]:.2f}x")
    benchmark.extra_info.update(tokens_per_sec=medians, default_over_best_fixed=ratio)
    assert ratio >= 0.9


def test_default_threads_on_a_quiet_machine(benchmark, tmp_path, capsys):
    configurations = {
        "default": ((), None, STEPS),
        OLD: ((), LIBGOMP_DEFAULT_WAIT, STEPS),
    }
    speeds = benchmark.pedantic(measure, args=(tmp_path, configurations), rounds=1, iterations=1)
    medians = report(capsys, "quiet machine", speeds)
    ratio = medians["default"] / medians[OLD]
    with capsys.disabled():
        print(f"  default / libgomp's default wait: {ratio:.2f}x")
    benchmark.extra_info.update(tokens_per_sec=medians, default_over_libgomp_default=ratio)
    assert ratio >= 0.95
