"""gptcore.backends: which kernel module does the arithmetic, the compiled one or the reference.

WHAT'S GOING ON HERE
====================

WHAT
  get(name) returns a module with the kernel API (matmul_forward, layernorm_backward, adamw_update,
  sum_of_squares, ...):
      "compiled"   gptcore.compiled, the Cython/OpenMP kernels, unchecked
      "reference"  gptcore.reference, the same functions in plain Python loops (slow; tiny models only)
  get(None) reads the environment variable GPTCORE_BACKEND, and falls back to "compiled"; name()
  resolves a backend's name the same way.

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


def name(backend=None):
    """The backend's name: backend itself ("compiled" or "reference"), or for None $GPTCORE_BACKEND,
    or "compiled"."""
    if backend is None:
        backend = os.environ.get("GPTCORE_BACKEND") or "compiled"
    if backend not in CHOICES:
        raise ValueError(f"backend must be one of {sorted(CHOICES)}, got {backend!r}")
    return backend


def get(backend=None):
    """The kernel module of the backend called backend (see name())."""
    return importlib.import_module(CHOICES[name(backend)])
