"""gptcore: a GPT-2-style transformer written from scratch, to read and to train on a CPU.

WHAT'S GOING ON HERE
====================
The package is layered, bottom to top:
  gptcore._kernels   compiled Cython/OpenMP loops: every layer's forward and backward (no checks)
  gptcore.kernels    the same functions, checked: shapes, dtypes, contiguity, index ranges
  gptcore.reference  the same functions again in plain Python loops: the oracle in tests, the baseline
                     in benchmarks
Import the kernels from here: `from gptcore import kernels`.
"""
from gptcore import kernels, reference
from gptcore.kernels import get_num_threads, set_num_threads

__all__ = ["kernels", "reference", "set_num_threads", "get_num_threads"]
__version__ = "0.1.0"
