"""The kernel API under a property-based fuzz (tests/kernel_fuzz.py), in a subprocess.

WHAT'S GOING ON HERE
  WHAT   Every call of gptcore.kernels with drawn arguments -- consistent or spoiled shapes, dtypes,
         strides, ints past any C type, ids out of range -- raises TypeError/ValueError or returns
         what gptcore.reference returns. A segfault, an OverflowError, a MemoryError or a wrong
         result fails the test, with hypothesis's falsifying example in the message.
  HOW    A separate process, so that a crash in compiled code is a failed test and not a lost test
         run. GPTCORE_FUZZ_EXAMPLES sets the number of examples (1,000 by default, about 10 s);
         derandomized, so a failure reproduces with `python tests/kernel_fuzz.py N`.
"""
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fuzzed_kernel_calls_raise_type_or_value_error_or_match_the_reference():
    examples = os.environ.get("GPTCORE_FUZZ_EXAMPLES", "1000")
    result = subprocess.run([sys.executable, os.path.join(REPO, "tests", "kernel_fuzz.py"), examples],
                            env={**os.environ, "PYTHONPATH": REPO, "OMP_NUM_THREADS": "2"},
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"exit {result.returncode}\n{result.stdout}\n{result.stderr[-5000:]}"
    assert "matched the reference" in result.stdout
