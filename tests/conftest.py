"""The fixtures the test files share.

WHAT'S GOING ON HERE
  `torch` is a fixture, so a test that needs PyTorch (an oracle only, never imported by gptcore) is
  skipped, not failed, where it is not installed.

  Every `gptcore train` and `gptcore generate` reads this machine's matmul peak or read bandwidth
  from gptcore.machine's cache, measuring it when it is not there. The tests must never write into
  the user's real cache folder, nor spend seconds measuring: before any test module is imported
  (pytest_configure), XDG_CACHE_HOME points at a folder of this session's own, deleted at the end,
  and GPTCORE_MACHINE_QUICK=1 shrinks the measurements to milliseconds. Subprocesses inherit both
  through os.environ.
"""
import os
import shutil
import tempfile

import pytest

_CACHE_HOME = None


def pytest_configure(config):
    global _CACHE_HOME
    _CACHE_HOME = tempfile.mkdtemp(prefix="gptcore-test-cache-")
    os.environ["XDG_CACHE_HOME"] = _CACHE_HOME
    os.environ["GPTCORE_MACHINE_QUICK"] = "1"


def pytest_unconfigure(config):
    if _CACHE_HOME is not None:
        shutil.rmtree(_CACHE_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")
