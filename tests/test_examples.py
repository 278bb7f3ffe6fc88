"""Every program in python/ runs to completion, so the examples never rot; and the ones that check
their numbers (kernels_tour.py compares every kernel result with numpy) stop when a number is wrong."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

from gptcore import kernels

ROOT = pathlib.Path(__file__).parent.parent
EXAMPLES = sorted((ROOT / "python").glob("*.py"))
KERNELS_TOUR = ROOT / "python" / "kernels_tour.py"


@pytest.mark.parametrize("example", EXAMPLES, ids=lambda path: path.name)
def test_example_runs_without_error(example):
    # python puts the example's own folder first on sys.path, not this checkout: without PYTHONPATH
    # the example would import whichever gptcore is installed, which may be another checkout's
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}
    result = subprocess.run([sys.executable, str(example)], capture_output=True, text=True, timeout=300,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip(), f"{example.name} printed nothing"


def load_kernels_tour():
    spec = importlib.util.spec_from_file_location("kernels_tour", KERNELS_TOUR)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def softmax_off_by_1e_4(real):
    # 1e-4 relative: ten times the tour's bar, and rows that sum to 1.0001
    return lambda x, **outputs: real(x, **outputs) * np.float32(1 + 1e-4)


def layernorm_d_x_without_its_mean_term(real):
    # a plausible slip in the backward: forgetting that every x in a row moved the row's mean
    def wrong(d_out, x, weight, mean, rstd, **outputs):
        d_x, d_weight, d_bias = real(d_out, x, weight, mean, rstd, **outputs)
        g = d_out * weight
        d_x += g.mean(-1, keepdims=True) * rstd[:, None]
        return d_x, d_weight, d_bias
    return wrong


@pytest.mark.parametrize("kernel, wrong, message", [
    ("softmax_forward", softmax_off_by_1e_4, "softmax probs is off by"),
    ("layernorm_backward", layernorm_d_x_without_its_mean_term, "layernorm d_x is off by"),
])
def test_kernels_tour_stops_with_an_assertion_error_naming_a_wrong_result(monkeypatch, kernel, wrong,
                                                                          message):
    tour = load_kernels_tour()
    monkeypatch.setattr(kernels, kernel, wrong(getattr(kernels, kernel)))
    with pytest.raises(AssertionError, match=message):
        tour.main()
