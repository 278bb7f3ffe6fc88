"""gptcore.backends: which kernel module does the arithmetic, the compiled one or the reference.

WHAT'S GOING ON HERE
====================

WHAT
  get(name) returns a module with the kernel API (matmul_forward, layernorm_backward, adamw_update,
  sum_of_squares, ...):
      "compiled"   gptcore.compiled, the Cython/OpenMP kernels, unchecked
      "reference"  gptcore.reference, the same functions in plain Python loops (slow; tiny models only)
  get(None) reads the environment variable GPTCORE_BACKEND, and falls back to "compiled".

WHERE
  The model and the optimizers (AdamW, gradient clipping) take a `backend` argument and pass it
  here, so one name decides where every number of a training step is computed.

HOW
  The modules are imported inside get(), so choosing "reference" never imports the compiled code.

CONTRACT
  An unknown name raises ValueError naming the choices. Neither module checks its arguments: callers
  that did not build their own buffers use gptcore.kernels.
"""
import importlib
import os

CHOICES = {"compiled": "gptcore.compiled", "reference": "gptcore.reference"}


def get(name=None):
    """The kernel module called name ("compiled" or "reference"); None means $GPTCORE_BACKEND or
    "compiled"."""
    if name is None:
        name = os.environ.get("GPTCORE_BACKEND") or "compiled"
    if name not in CHOICES:
        raise ValueError(f"backend must be one of {sorted(CHOICES)}, got {name!r}")
    return importlib.import_module(CHOICES[name])
