"""How gptcore's OpenMP threads wait: the GOMP_SPINCOUNT default of gptcore.compiled, set before libgomp
reads its environment, and a user's own wait policy left alone.

libgomp reads its environment once, when it is loaded, so every check runs in a fresh Python
(subprocess) with the environment it needs.
"""
import json
import os
import subprocess
import sys

import pytest

from gptcore.compiled import SPIN_COUNT

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_python(code, **env_changes):
    """Run `code` in a fresh Python with OMP_WAIT_POLICY and GOMP_SPINCOUNT removed from the
    environment, then `env_changes` applied; returns the JSON its last line of stdout prints."""
    env = {name: value for name, value in os.environ.items() if name not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(PYTHONPATH=REPO, **env_changes)
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.strip().splitlines()[-1])


# Is libgomp mapped into this process, and what does the environment say, before and after a module
# of gptcore is imported?
BEFORE_AND_AFTER_IMPORT = """
import json, os, sys
def libgomp_loaded():
    return "libgomp" in open("/proc/self/maps").read()
before = libgomp_loaded()
import importlib
importlib.import_module(sys.argv[-1] if len(sys.argv) > 1 else "{module}")
print(json.dumps({{"libgomp_before": before, "libgomp_after": libgomp_loaded(),
                  "GOMP_SPINCOUNT": os.environ.get("GOMP_SPINCOUNT")}}))
"""


@pytest.mark.parametrize("module", ["gptcore", "gptcore.ladder", "gptcore.compiled"])
def test_spin_count_is_set_before_libgomp_is_loaded(module):
    seen = run_python(BEFORE_AND_AFTER_IMPORT.format(module=module))
    assert seen == {"libgomp_before": False, "libgomp_after": True, "GOMP_SPINCOUNT": str(SPIN_COUNT)}


@pytest.mark.parametrize("user_setting, expected_spin_count", [
    ({"OMP_WAIT_POLICY": "active"}, None),       # ours would override theirs: we set nothing
    ({"OMP_WAIT_POLICY": "passive"}, None),
    ({"GOMP_SPINCOUNT": "5"}, "5"),
])
def test_a_users_own_wait_policy_is_left_alone(user_setting, expected_spin_count):
    seen = run_python(BEFORE_AND_AFTER_IMPORT.format(module="gptcore"), **user_setting)
    assert seen["GOMP_SPINCOUNT"] == expected_spin_count


# After one parallel region the main thread sleeps; the CPU time the process spends meanwhile is the
# idle worker's spinning (the main thread uses none while it sleeps).
CPU_WHILE_IDLE = """
import json, resource, time
import numpy as np
from gptcore import kernels
kernels.set_num_threads(2)
a = np.ones((384, 384), np.float32)
for _ in range(3):
    kernels.matmul_forward(a, a)           # big enough to run on both threads
def cpu():
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime
before = cpu()
time.sleep(0.3)
print(json.dumps({"cpu_seconds_while_idle": cpu() - before}))
"""


@pytest.mark.skipif((os.cpu_count() or 1) < 2, reason="needs 2 cores for a second OpenMP thread")
def test_an_idle_worker_thread_stops_spinning_soon_after_a_parallel_region():
    # ours: SPIN_COUNT spins, ~100 us; libgomp's own default would spin ~10 ms, OMP_WAIT_POLICY=active
    # for the whole sleep (the second case shows the measurement sees spinning at all). Other processes
    # can only add CPU time to a measurement (a preempted spin is spread over a longer wall time), so
    # we take the least of three: spinning that really lasts shows in every one.
    ours = min(run_python(CPU_WHILE_IDLE)["cpu_seconds_while_idle"] for _ in range(3))
    active = run_python(CPU_WHILE_IDLE, OMP_WAIT_POLICY="active")["cpu_seconds_while_idle"]
    assert ours < 0.005, ours
    assert active > 0.03, active
