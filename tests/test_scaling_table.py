"""tools/scaling_table.py: its cost model, and the table in LEARNING_PATH.md being its output.

The table in LEARNING_PATH.md is printed by `python3 tools/scaling_table.py` from a measured step time,
and its first line names that measurement (--step-seconds, --threads). We reprint the table from the
numbers the guide states and require the same text: a table edited by hand, or a changed cost model
whose table was not regenerated, fails here.
"""
import pathlib
import re
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tools"))
import scaling_table  # noqa: E402

from gptcore.model import GPT, GPTConfig  # noqa: E402

GUIDE = (REPO / "LEARNING_PATH.md").read_text(encoding="utf-8")
BLOCK = re.compile(r"<!-- scaling-table:[^\n]*-->\n(.*?)<!-- end scaling-table -->", re.DOTALL)


def test_learning_path_shows_exactly_what_the_tool_prints_for_the_stated_measurement():
    match = BLOCK.search(GUIDE)
    assert match, "LEARNING_PATH.md has no scaling-table block"
    shown = match.group(1)
    measured = re.search(r"--step-seconds (\S+) --threads (\d+)", shown)
    assert measured, "the table does not say which measurement it comes from"
    assert shown == scaling_table.scaling_table(float(measured.group(1)), int(measured.group(2)))


@pytest.mark.parametrize("config", [scaling_table.BABY, dict(vocab_size=7, block_size=5, n_layer=3, n_head=2,
                                                              n_embd=6)])
def test_parameter_count_is_the_models(config):
    assert scaling_table.parameters(**config) == GPT(GPTConfig(**config)).num_parameters


def test_gpt2_124m_has_its_published_parameter_count():
    assert scaling_table.parameters(**scaling_table.GPT2) == 124_439_808


def test_ring_allreduce_sends_2_n_minus_1_over_n_of_the_buffer():
    # 1e9 parameters x 4 bytes x 8 bits = 32 Gbit; 2 machines send 2 x 1/2 of it: 32 s at 1 Gbit/s
    assert scaling_table.allreduce_seconds(10**9, 2, 1) == pytest.approx(32.0)
    assert scaling_table.allreduce_seconds(10**9, 1, 1) == 0
    assert scaling_table.allreduce_seconds(10**9, 16, 10) == pytest.approx(2 * 15 / 16 * 3.2)


def test_speedup_is_linear_without_communication_and_halved_when_it_equals_the_step():
    assert scaling_table.speedup(1.0, 0, 8, 1) == pytest.approx(8)
    # 2 machines, a step of exactly the all-reduce's time: 2 x 1 / (1 + 1)
    step = scaling_table.allreduce_seconds(10**6, 2, 1)
    assert scaling_table.speedup(step, 10**6, 2, 1) == pytest.approx(1.0)
