"""gptcore.machine: what this machine gives gptcore, measured once and cached: the matmul peak and the
memory read bandwidth, the yardsticks of MFU (gptcore train) and of the generation roofline (gptcore
generate).

WHAT'S GOING ON HERE
====================

WHAT
  matmul_peak()       FLOP/s: the best rate of gptcore's compiled matmul_forward over a few large
                      products (PEAK_SHAPES), each timed REPEATS times, on the thread count in use
  read_bandwidth()    bytes/s: the best rate of one compiled pass (sum_of_squares) reading a buffer of
                      BANDWIDTH_BYTES, far larger than any last-level cache, on the thread count in use
  Both return the cached number when there is one for this machine, and measure (and cache) it
  otherwise; remeasure=True measures again. `gptcore machine` prints both; `gptcore train
  --remeasure-machine` measures the peak again before its run.

  MFU (model FLOPs utilisation, PaLM's appendix B) is model FLOPs per second over a peak. We take the
  peak gptcore's own matmul reaches on this machine, not a datasheet's FMA count nor an A100's: MFU
  then says how much of what gptcore's best product does a training step keeps up, so a step that
  spends its time in small products, layernorms or Python shows as a low fraction. The model FLOPs
  of a token are gptcore.model.GPT.flops_per_token.

  A generated token of a big model is memory-bound: it reads every weight once and does two flops
  with each. The fastest it can go is the read bandwidth over the bytes a token must read
  (gptcore.model.GPT.generation_bytes_per_token): the roofline `gptcore generate` reports against.

HOW (measuring)
  Both measurements use the compiled kernels through gptcore.compiled, the same calls the model
  makes, on whatever gptcore.kernels.set_num_threads set. Each input is written once before timing
  (so its pages exist), one untimed call warms up (the matmul's packing buffers, the threads), and
  we keep the best of the timed calls: the best is what the machine can do, the others are that plus
  whatever else ran at the same time. On a busy machine even the best is low, and MFU against it
  comes out high (above 1, even, for a run on a quieter machine than the measurement's);
  --remeasure-machine (or `gptcore machine --remeasure`) on a quiet one fixes the cache. The peak's products are four
  calls of each of PEAK_SHAPES, 48 GFLOP in all, a second or two; the bandwidth's passes take a
  fraction of a second, plus writing the 256 MB buffer once.

  GPTCORE_MACHINE_QUICK=1 in the environment shrinks both to a few milliseconds (QUICK_SHAPES,
  QUICK_BANDWIDTH_BYTES), for tests: the numbers are then meaningless, and are cached under their
  own key (the sizes measured are part of it), so they never pass for a real measurement.

HOW (the cache)
  One JSON file, CACHE_NAME under the user's cache folder ($XDG_CACHE_HOME, or ~/.cache, then
  gptcore/). It holds a list of measurements, each under the key that makes it stale when it
  changes: the CPU's model name, the thread count, the compiled kernels' file (its path, size and
  modification time, so a rebuild measures again) and the sizes measured (another version's
  PEAK_SHAPES measures again too). A file that cannot be read
  or is not what we write (a crash of another program, a hand edit) is measured again with a
  one-line note, and replaced; nothing in it is ever evaluated (JSON, no pickle). A cache folder we
  cannot write to costs a note, and the number is measured again next time. Writes are atomic
  (gptcore.files.atomic_write): a reader sees the old file or the new one. Two processes measuring
  at once each write their own result, and the later file wins; what it lacks is measured again.
  The file keeps the newest MAX_ENTRIES measurements.
"""
import json
import math
import os
import platform
import time

import numpy as np

from gptcore import compiled
from gptcore.files import atomic_write

# (N, IC, OC) products out (N, OC) = inp (N, IC) @ weight (IC, OC) + bias: GPT-2 124M's MLP at 1024
# positions, both ways, a square one, and the baby GPT's MLP at 12 x 64 positions, both ways. The
# peak is the best of them: a product whose operands fit in the caches can beat the big ones, and a
# peak below what a step's own products reach would put MFU above 1.
PEAK_SHAPES = ((1024, 768, 3072), (1024, 3072, 768), (1024, 1024, 1024), (768, 128, 512), (768, 512, 128))
BANDWIDTH_BYTES = 256 * 2**20
REPEATS = 3                    # timed calls of each product, and timed passes over the buffer
QUICK_SHAPES = ((64, 64, 64), (96, 128, 64))
QUICK_BANDWIDTH_BYTES = 2**20
QUICK_ENV = "GPTCORE_MACHINE_QUICK"

CACHE_NAME = os.path.join("gptcore", "machine.json")
FORMAT = "gptcore machine measurements 1"
MAX_ENTRIES = 16
# the measured quantities, as the cache names them
MATMUL = "matmul_flops_per_s"
BANDWIDTH = "read_bytes_per_s"


def _quick():
    return os.environ.get(QUICK_ENV, "") not in ("", "0")


def peak_shapes():
    """The products measure_matmul_peak times: PEAK_SHAPES, or QUICK_SHAPES under GPTCORE_MACHINE_QUICK."""
    return QUICK_SHAPES if _quick() else PEAK_SHAPES


def bandwidth_bytes():
    """The buffer measure_read_bandwidth reads: BANDWIDTH_BYTES, or QUICK_BANDWIDTH_BYTES under
    GPTCORE_MACHINE_QUICK."""
    return QUICK_BANDWIDTH_BYTES if _quick() else BANDWIDTH_BYTES


def measure_matmul_peak(shapes=None, repeats=REPEATS):
    """The best FLOP/s of compiled matmul_forward over `shapes` ((N, IC, OC) each; PEAK_SHAPES by
    default), each product timed `repeats` times after one untimed call. A product is 2 N IC OC
    flops: a multiply and an add per term (the bias add's N OC are left out)."""
    if shapes is None:
        shapes = peak_shapes()
    rng = np.random.default_rng(0)
    best = 0.0
    for N, IC, OC in shapes:
        inp = rng.standard_normal((N, IC), dtype=np.float32)
        weight = rng.standard_normal((IC, OC), dtype=np.float32)
        bias = np.zeros(OC, np.float32)
        out = np.empty((N, OC), np.float32)
        compiled.matmul_forward(inp, weight, bias, out=out)                 # warm-up, untimed
        for _ in range(repeats):
            started = time.perf_counter()
            compiled.matmul_forward(inp, weight, bias, out=out)
            best = max(best, 2.0 * N * IC * OC / (time.perf_counter() - started))
    return best


def measure_read_bandwidth(n_bytes=None, repeats=REPEATS):
    """The best bytes/s of compiled sum_of_squares reading a float32 buffer of n_bytes
    (BANDWIDTH_BYTES by default), timed `repeats` times after one untimed pass. sum_of_squares does
    two flops per float it reads (4 bytes), far below what the cores can do, so memory sets its
    pace."""
    if n_bytes is None:
        n_bytes = bandwidth_bytes()
    x = np.ones(n_bytes // 4, np.float32)          # every page written once: they all exist before timing
    partials = np.empty(-(-x.size // compiled.CHUNK_SIZE), np.float64)
    compiled.sum_of_squares(x, partials)           # warm-up, untimed
    best = math.inf
    for _ in range(repeats):
        started = time.perf_counter()
        compiled.sum_of_squares(x, partials)
        best = min(best, time.perf_counter() - started)
    return x.nbytes / best


# ----------------------------------------------------------------------------------------------------
# The cache
# ----------------------------------------------------------------------------------------------------

def cache_path():
    """$XDG_CACHE_HOME/gptcore/machine.json, or ~/.cache/gptcore/machine.json."""
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(root, CACHE_NAME)


def cpu_name():
    """The CPU's model name as Linux reports it (/proc/cpuinfo), else what platform knows."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("model name") and ":" in line:
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def staleness_key():
    """What a cached measurement is only good for: this CPU, this thread count, these compiled
    kernels (path, size, modification time) and the sizes measured (PEAK_SHAPES and BANDWIDTH_BYTES, or
    their quick twins), all JSON values that compare equal after a round trip."""
    kernels = os.stat(compiled.KERNELS_FILE)
    return {"cpu": cpu_name(), "threads": compiled.get_num_threads(),
            "kernels": os.path.abspath(compiled.KERNELS_FILE), "kernels_size": kernels.st_size,
            "kernels_mtime_ns": kernels.st_mtime_ns,
            "sizes": {"peak_shapes": [list(shape) for shape in peak_shapes()], "bandwidth_bytes": bandwidth_bytes()}}


def _positive_number(value):
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def _read_cache(path, log):
    """-> the list of cached measurements; [] (after a one-line note) for a file that is not ours."""
    try:
        with open(path, "rb") as f:
            data = json.loads(f.read().decode("utf-8"))
    except (FileNotFoundError, NotADirectoryError):      # nothing cached yet (a write would say why not)
        return []
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        log(f"note: {path} could not be read ({getattr(e, 'strerror', None) or type(e).__name__}): "
            f"measuring again")
        return []
    entries = data.get("measurements") if isinstance(data, dict) and data.get("format") == FORMAT else None
    keys = staleness_key().keys()
    if not isinstance(entries, list) or not all(
            isinstance(entry, dict) and keys <= entry.keys()
            and all(_positive_number(entry[name]) for name in (MATMUL, BANDWIDTH) if name in entry)
            for entry in entries):
        log(f"note: {path} is not a gptcore machine cache: measuring again")
        return []
    return entries


def _write_cache(path, entries, log):
    try:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        atomic_write(path, (json.dumps({"format": FORMAT, "measurements": entries[-MAX_ENTRIES:]}, indent=1)
                            + "\n").encode("utf-8"))
    except OSError as e:
        log(f"note: cannot write {path} ({e.strerror or e}): the measurement is not cached")


def _cached(quantity, measure, remeasure, log):
    """The cached value of `quantity` for this machine's staleness_key, or measure() it and cache it."""
    path, key = cache_path(), staleness_key()
    entries = _read_cache(path, log)
    entry = next((e for e in entries if all(e[name] == value for name, value in key.items())), None)
    if entry is not None and quantity in entry and not remeasure:
        return entry[quantity]
    value = measure()
    entry = {**(entry or key), quantity: value, f"{quantity}_measured": time.strftime("%Y-%m-%d %H:%M:%S")}
    # this entry goes last: the newest MAX_ENTRIES are kept
    entries = [e for e in entries if not all(e[name] == v for name, v in key.items())] + [entry]
    _write_cache(path, entries, log)
    return value


def is_cached(quantity):
    """Whether `quantity` (MATMUL or BANDWIDTH) has a cached measurement for this machine (no note,
    no measurement)."""
    key = staleness_key()
    entries = _read_cache(cache_path(), lambda line: None)
    return any(all(e[name] == v for name, v in key.items()) and quantity in e for e in entries)


def matmul_peak(remeasure=False, log=print):
    """FLOP/s: the best rate of gptcore's matmul_forward on this machine and thread count, from the
    cache, or measured (measure_matmul_peak) and cached. `log` gets the notes about the cache."""
    return _cached(MATMUL, measure_matmul_peak, remeasure, log)


def read_bandwidth(remeasure=False, log=print):
    """bytes/s: the best rate of one compiled pass reading far more than the caches hold, on this
    machine and thread count, from the cache, or measured (measure_read_bandwidth) and cached."""
    return _cached(BANDWIDTH, measure_read_bandwidth, remeasure, log)
