"""gptcore.validate: placeholder until the kern branch lands (WHAT'S GOING ON HERE)."""
import numpy as np


def positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def token_ids(name, array, ndim, upper, upper_name):
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
