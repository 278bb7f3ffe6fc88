"""Benchmark plumbing: the shared sizes, and a summary table of speed ratios printed at the end.

WHAT'S GOING ON HERE
  Every benchmark belongs to a group (one kernel at one size) and is one of these implementations:
  "gptcore" (the compiled kernel), "numpy" (the same math as numpy expressions), "torch" (PyTorch, for
  whole training steps), "reference" (the pure-Python twin, run on a smaller input because it is
  slow) and, for the matmul forward only, "naive" (gptcore.ladder.matmul_naive, the compiled triple
  loop); the tokenizer benchmarks add "tiktoken" and "hf" (Hugging Face `tokenizers`), and the GPT-2 124M
  step at T 1024 "hf" (Hugging Face `transformers`). Each records in extra_info how much
  work its input holds ("work", in the group's unit: flops for matmul, elements or rows otherwise), so
  the summary can compare time per unit of work: that keeps the ratio against the smaller reference
  input fair. The summary prints, per group, the median time per unit for each implementation and the
  ratios gptcore is faster by, and GFLOP/s for matmul. A benchmark that records the machine's read
  bandwidth and the bytes one unit of its work reads ("read_bandwidth", "bytes_per_token": generation)
  also gets a line of units per second against that roofline, and against transformers beside it.

  Benchmarks marked `slow` (the GPT-2 124M ones, minutes) run with the rest; `-m "not slow"` skips them.
"""
import time

import numpy as np
import pytest

from gptcore import kernels

# GPT training sizes: nanoGPT's CPU "baby GPT" (batch 12, block 64, n_embd 128, 4 heads, vocab 65).
B, T, C, NH, V = 12, 64, 128, 4, 65
N = B * T                      # 768 rows
REFERENCE_ROWS = 8             # the pure-Python reference runs on this many rows instead of N


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: takes minutes (GPT-2 124M); deselect with -m \"not slow\"")


@pytest.fixture(autouse=True)
def quiet_cores():
    """Let the other libraries' idle threads fall asleep before each benchmark. After a call, OpenBLAS's
    threads spin for ~0.1 s waiting for more work (and OpenMP's for a shorter while); on a 2-core
    machine, a benchmark that starts while they spin shares its cores with them and runs at half speed,
    whichever library it measures."""
    time.sleep(0.25)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


def record(benchmark, group, implementation, work, unit):
    benchmark.group = group
    benchmark.extra_info.update(implementation=implementation, work=work, unit=unit,
                                threads=kernels.get_num_threads())


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or not session.benchmarks:
        return
    groups = {}
    for bench in session.benchmarks:
        info = bench.extra_info
        if "implementation" in info and bench.stats:
            groups.setdefault(bench.group, {})[info["implementation"]] = (
                bench.stats.median / info["work"], info["unit"])
    write = terminalreporter.write_line
    write("")
    write("gptcore speed ratios: the other implementation's median time per unit of work over gptcore's")
    write("(> 1 means gptcore is faster; GFLOP/s for matmul)")
    write(f"{'group':<44}{'unit':>8}{'gptcore ns':>14}{'vs numpy':>10}{'vs torch':>10}{'vs reference':>14}"
          f"{'GFLOP/s':>10}{'vs tiktoken':>13}{'vs HF':>8}")
    for group in sorted(groups):
        impls = groups[group]
        if "gptcore" not in impls:
            continue
        ours, unit = impls["gptcore"]
        ratio = lambda other, fmt: fmt.format(impls[other][0] / ours) if other in impls else "-"
        gflops = f"{1e-9 / ours:.1f}" if unit == "flop" else "-"
        write(f"{group:<44}{unit:>8}{ours * 1e9:>14.4g}{ratio('numpy', '{:.2f}x'):>10}"
              f"{ratio('torch', '{:.2f}x'):>10}{ratio('reference', '{:.0f}x'):>14}{gflops:>10}"
              f"{ratio('tiktoken', '{:.2f}x'):>13}{ratio('hf', '{:.2f}x'):>8}")
    for group in sorted(groups):
        for line in roofline_lines(group, [b for b in session.benchmarks if b.group == group]):
            write(line)


def roofline_lines(group, benchmarks):
    """For a group whose gptcore benchmark recorded read_bandwidth and bytes_per_token: its tokens/s,
    their fraction of the roofline bandwidth / bytes_per_token, and the ratio to transformers' tokens/s."""
    runs = {b.extra_info.get("implementation"): b for b in benchmarks if b.stats}
    ours = runs.get("gptcore")
    if ours is None or "bytes_per_token" not in ours.extra_info:
        return []
    tokens_per_s = ours.extra_info["work"] / ours.stats.median
    bandwidth, per_token = ours.extra_info["read_bandwidth"], ours.extra_info["bytes_per_token"]
    roofline = bandwidth / per_token
    lines = ["", f"{group}, {ours.extra_info['threads']} threads, medians:",
             f"  gptcore       {tokens_per_s:7.1f} tokens/s = {tokens_per_s / roofline:.0%} of the read-bandwidth "
             f"roofline ({bandwidth / 1e9:.1f} GB/s / {per_token / 1e6:.0f} MB per token = {roofline:.1f} tokens/s)"]
    theirs = runs.get("transformers")
    if theirs is not None:
        their_rate = theirs.extra_info["work"] / theirs.stats.median
        lines += [f"  transformers  {their_rate:7.1f} tokens/s",
                  f"  gptcore / transformers tokens/s: {tokens_per_s / their_rate:.2f}x"]
    return lines
