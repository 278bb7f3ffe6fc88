"""How the model and optimizer tests compare whole tensors.

WHAT'S GOING ON HERE
  rel_err is the largest difference measured against the largest entry of the expected tensor:
  elementwise relative error would be dominated by entries near zero, where float32 rounding leaves no
  correct digits. tests/test_model.py and tests/test_optim.py import these with
  `from tolerances import rel_err, worst`.
"""
import numpy as np


def rel_err(got, want):
    """Relative error of a whole tensor: max|got - want| / max|want|."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, f"shape {got.shape}, expected {want.shape}"
    scale = np.abs(want).max()
    return np.abs(got - want).max() / scale if scale > 0 else np.abs(got).max()


def worst(errors):
    """(error, name) of the worst entry of a {name: error} dict: what a failure message should show."""
    name = max(errors, key=errors.get)
    return errors[name], name
