"""Every program in python/ runs to completion, so the examples never rot; and the ones that check
their numbers (kernels_tour.py compares every kernel result with numpy) stop when a number is wrong."""
import importlib.util
import os
import pathlib
import re
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


def run_example(path, *args):
    path_env = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, str(path), *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": path_env})


FOLLOW = ROOT / "python" / "follow_the_data_flow.py"


def test_follow_the_data_flow_shows_where_the_last_position_of_each_block_attends_head_by_head():
    result = run_example(FOLLOW, "--prompt", "def main(x):")
    assert result.returncode == 0, result.stderr
    # the untrained model has 2 layers of 2 heads: four lines, each about the last position
    lines = [line for line in result.stdout.splitlines() if "the last position attends most to" in line]
    assert len(lines) == 4, result.stdout
    # an untrained model spreads the last position's attention almost evenly over the 12 positions;
    # row 0 (the first position) would put all of it, 1.00, on position 0
    weights = [float(re.search(r", (\d\.\d\d)\)", line).group(1)) for line in lines]
    assert all(weight < 0.5 for weight in weights), lines
    assert "block 1: output" in result.stdout


def test_follow_the_data_flow_says_when_it_cuts_the_prompt_to_the_context():
    result = run_example(FOLLOW, "--prompt", "x" * 40)              # the untrained model's block_size is 32
    assert result.returncode == 0, result.stderr
    assert "more than block_size = 32: we keep its last 32" in result.stdout


@pytest.mark.parametrize("args, message", [
    (["--model", "no/such/folder"], "no/such/folder"),
    (["--prompt", ""], "--prompt must hold at least one character"),
])
def test_follow_the_data_flow_answers_bad_input_with_one_line_and_exit_status_2(args, message):
    result = run_example(FOLLOW, *args)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_follow_the_data_flow_names_a_character_the_model_does_not_know(tmp_path):
    from gptcore import GPT, GPTConfig
    from gptcore.checkpoint import save_checkpoint
    from gptcore.tokenizer import CharTokenizer
    tokenizer = CharTokenizer.from_text("abc ")
    model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=8, n_layer=1, n_head=1, n_embd=8))
    save_checkpoint(str(tmp_path), model, tokenizer)
    result = run_example(FOLLOW, "--model", str(tmp_path), "--prompt", "abz")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert "'z'" in result.stderr


@pytest.mark.skipif(not os.access("/usr/bin/time", os.X_OK), reason="bench/memory_124m.py measures with /usr/bin/time")
def test_memory_benchmark_prints_the_peak_rss_and_step_time_of_a_training_step():
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    result = subprocess.run([sys.executable, str(ROOT / "bench" / "memory_124m.py"), "--quick", "--steps", "1",
                             "--only", "gptcore"], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": path})
    assert result.returncode == 0, result.stderr
    found = re.search(r"gptcore  peak RSS +([\d.]+) GB   step +([\d.]+) s wall", result.stdout)
    assert found, result.stdout
    # the quick model's parameters, gradients and AdamW moments alone are ~0.1 GB
    assert float(found.group(1)) > 0.1 and float(found.group(2)) > 0
