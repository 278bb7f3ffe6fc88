"""The fixtures the test files share.

WHAT'S GOING ON HERE
  `torch` is a fixture, so a test that needs PyTorch (an oracle only, never imported by gptcore) is
  skipped, not failed, where it is not installed.
"""
import pytest


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch")
