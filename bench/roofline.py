"""The memory roofline of generation: bytes a generated token reads, and the machine's read bandwidth.

WHAT'S GOING ON HERE
  One generated token multiplies a single row by every weight matrix of the model: each weight is read
  from memory once and used for one multiply-add, so the token's time is bounded below by
      (bytes the token reads) / (read bandwidth)
  and tokens/s by its inverse, the roofline. For GPT-2 124M the weights are ~124M float32 (~0.5 GB),
  far larger than any cache, so the weights really do come from memory every token.

  bytes_read_per_token counts every array a token's forward_cached reads in full: every parameter but
  wpe, of which it reads one row, plus the keys and values its attention reads from the KV cache
  (2C floats per cached position per layer). Activations are a few KB and stay in cache.

  measure_read_bandwidth times a compiled pass over a float32 buffer much larger than L3 on the
  kernels' threads: gptcore.compiled.sum_of_squares, which reads each element once and does one
  multiply-add per element in 16 independent lanes, split across threads in 4096-element chunks. That
  is the same access pattern as a matrix-vector product (a long unit-stride read, one multiply-add
  per float), with no writes. We take the best of a few passes: the roofline is what the memory can
  do, and a pass that another process slowed down says less about it than the fastest one.
  (gptcore.machine will cache a read-bandwidth measurement of its own; this one is to be unified
  with it.)

Run it:  flock /tmp/bench.lock python3 bench/roofline.py
"""
import math
import time

import numpy as np

from gptcore import compiled, get_num_threads

BANDWIDTH_BUFFER_BYTES = 1 << 30    # 1 GiB: 32 times the largest L3 gptcore has been run on


def measure_read_bandwidth(n_bytes=BANDWIDTH_BUFFER_BYTES, passes=5):
    """Bytes per second that one compiled read pass over n_bytes of float32 achieves on the kernels'
    threads (the best of `passes` timed passes, after one untimed pass that faults the pages in)."""
    x = np.ones(n_bytes // 4, np.float32)
    partials = np.empty(-(-x.size // compiled.CHUNK_SIZE), np.float64)
    compiled.sum_of_squares(x, partials)
    best = math.inf
    for _ in range(passes):
        started = time.perf_counter()
        compiled.sum_of_squares(x, partials)
        best = min(best, time.perf_counter() - started)
    return x.nbytes / best


def bytes_read_per_token(config, context):
    """Bytes one generated token reads from memory at a context of `context` cached positions: every
    parameter once (wpe: one row), and the keys and values of the cached positions in every layer."""
    C, L = config.n_embd, config.n_layer
    V = config.vocab_size
    layer = C * 3 * C + 3 * C + C * C + C + C * 4 * C + 4 * C + 4 * C * C + C + 4 * C   # + 2 LayerNorms
    floats = V * C + C + L * layer + 2 * C + L * context * 2 * C
    return 4 * floats


def main():
    bandwidth = measure_read_bandwidth()
    print(f"read bandwidth, {get_num_threads()} threads, best of 5 passes over "
          f"{BANDWIDTH_BUFFER_BYTES >> 20} MiB: {bandwidth / 1e9:.1f} GB/s")


if __name__ == "__main__":
    main()
