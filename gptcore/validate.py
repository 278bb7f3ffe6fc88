"""gptcore.validate: the argument checks, written once.

WHAT'S GOING ON HERE
====================

WHAT
  Small functions that either return their (possibly converted) argument or raise TypeError (wrong
  kind of thing: not an array, wrong dtype, not an int) or ValueError (right kind, wrong value: shape,
  rank, range, contiguity, aliasing). Every message starts with the name of the argument at fault, so
  a caller (and a test) can tell which one it was:

      from gptcore import validate
      x = validate.float_array("x", x, ndim=2)               # float32, C-contiguous, 2-D, non-empty
      idx = validate.token_ids("idx", idx, 2, V, "vocab_size")   # int64 copy if needed, all in [0, V)
      out = validate.output_buffer("out", out, x.shape, {"x": x}, zero=False)

WHERE
  gptcore.kernels runs them before every call into the compiled code; gptcore.ladder before every
  rung; gptcore.model for its config and for the token ids and targets of each forward; gptcore.optim
  for its arguments.

WHY
  The compiled loops run with bounds checks off, so a check that is missing is a read or write past
  the end of an array, not an exception. Written once, a check cannot be strict in one place and
  forgotten in another.
"""
import math
import os

import numpy as np


def integer(name, value):
    """value as a Python int; bools and floats are refused (TypeError), even 2.0."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    return int(value)


def positive_int(name, value):
    """value as a Python int >= 1."""
    value = integer(name, value)
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return value


def int_in_range(name, value, low, high):
    """value as a Python int in [low, high]; outside it a ValueError that gives the range (not the
    OverflowError a C int argument would raise)."""
    value = integer(name, value)
    if not low <= value <= high:
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _physical_memory():
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, AttributeError):
        return None


# An output we allocate may not be larger than the machine's memory: with Linux's overcommit a
# terabyte np.zeros can "succeed" and die later, so we refuse it before asking.
PHYSICAL_MEMORY = _physical_memory()


def allocation(name, shape, dtype):
    """Refuse (ValueError) an array of `shape` that could never fit in this machine's memory."""
    size = math.prod(int(n) for n in shape) * np.dtype(dtype).itemsize
    if PHYSICAL_MEMORY is not None and size > PHYSICAL_MEMORY:
        raise ValueError(f"{name} of shape {tuple(shape)} would need {size / 2**30:,.1f} GiB, more than "
                         f"this machine's {PHYSICAL_MEMORY / 2**30:,.1f} GiB of memory")


def float_array(name, array, ndim=None, dtype=np.float32):
    """array itself, checked: a numpy array of dtype (float32 unless told), C-contiguous, non-empty,
    of rank ndim (any rank if None)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != dtype:
        raise TypeError(f"{name} must have dtype {np.dtype(dtype).name}, got {array.dtype}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray makes a copy that is)")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    return array


def expect_shape(name, array, expected):
    """array.shape == expected, or a ValueError that shows both."""
    if array.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {array.shape}")


def token_ids(name, array, ndim, upper, upper_name):
    """An integer array of rank ndim with every value in [0, upper), returned as a C-contiguous int64
    array (the array itself when it already is one, else a copy). upper_name names the bound in the
    message: "idx holds 70, outside [0, vocab_size=65)"."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of integers, got {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    low, high = array.min(), array.max()
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds {bad}, outside [0, {upper_name}={upper})")
    return np.ascontiguousarray(array, dtype=np.int64)


def output_buffer(name, buffer, shape, inputs, zero, dtype=np.float32):
    """The caller's output buffer, checked (dtype, C-contiguous, exactly `shape`, writeable, sharing
    no memory with any of the named `inputs`), or, if buffer is None, a new array of that shape:
    zeros if `zero` (a gradient about to be accumulated into), else uninitialised."""
    if buffer is None:
        allocation(name, shape, dtype)
        return np.zeros(shape, dtype) if zero else np.empty(shape, dtype)
    float_array(name, buffer, dtype=dtype)
    expect_shape(name, buffer, shape)
    if not buffer.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    for input_name, array in inputs.items():
        if array is not None and np.may_share_memory(buffer, array):
            raise ValueError(f"{name} must not share memory with {input_name}")
    return buffer


def no_overlap(arrays):
    """No two of the named arrays (a dict; None entries are skipped) share memory: two outputs in one
    place would overwrite each other."""
    items = [(name, array) for name, array in arrays.items() if array is not None]
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_a} must not share memory with {name_b}")


def head_count(n_head, C):
    """n_head as an int >= 1 that divides the channel count C (each head owns C // n_head channels;
    the compiled code divides by it without a check)."""
    n_head = positive_int("n_head", n_head)
    if C % n_head != 0:
        raise ValueError(f"n_head={n_head} must divide the channel count C={C}")
    return n_head


def matmul_sizes(inp, weight, weight_transposed=False):
    """(leading dims, IC, OC) of inp (..., IC) @ weight, where weight is (IC, OC), or (OC, IC) when
    weight_transposed; both float32, C-contiguous, inp at least 2-D, weight 2-D."""
    float_array("inp", inp)
    if inp.ndim < 2:
        raise ValueError(f"inp must be at least 2-D (rows, IC), got shape {inp.shape}")
    float_array("weight", weight, 2)
    IC = inp.shape[-1]
    weight_IC, OC = (weight.shape[1], weight.shape[0]) if weight_transposed else weight.shape
    if weight_IC != IC:
        expected = f"(OC, {IC})" if weight_transposed else f"({IC}, OC)"
        raise ValueError(f"weight must have shape {expected} to match inp {inp.shape}, got {weight.shape}")
    return inp.shape[:-1], IC, OC
