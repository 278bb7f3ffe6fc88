"""GPT-2 124M: the training step side by side with PyTorch and transformers, and the optimizer's passes.

WHAT'S GOING ON HERE
  GPT-2 124M (12 layers, 12 heads, n_embd 768, V 50257, block_size 1024), timed in the same run as
  the other implementation, with the same thread count, a few rounds each (a step takes seconds):
    train_step 124M (B=4, T=64)     gptcore vs the nanoGPT model in PyTorch (bench/torch_gpt.py), at
                                    llm.c's CPU demo size; issue 12's bar: gptcore <= 0.35x PyTorch's
                                    time, a "vs torch" ratio >= 2.86 in the summary table
    train_step 124M (B=4, T=1024)   gptcore vs transformers' GPT2LMHeadModel ("hf" in the summary),
                                    both sides as bench/memory_124m.py runs them (~10 GB each, one
                                    after the other); the bar: <= 0.5x, a "vs HF" ratio >= 2
    optimizer 124M (AdamW + clip)   one clipped AdamW update of 124M parameters: gptcore's
                                    AdamW.step(grads, max_norm) (the clip scale folded into the
                                    update: grads read twice, never written) vs torch's
                                    clip_grad_norm_ + AdamW (its default foreach implementation), and
                                    "unfused" (gptcore's clip_grad_norm in place, then AdamW.step: one
                                    more read and write of the gradients) in pytest-benchmark's table
  A step is forward + backward + clipping the global gradient norm at 1.0 + AdamW, as
  gptcore.train.train_step runs it. extra_info carries the bytes the optimizer moves.

  Every test here is marked `slow` (minutes, and ~10 GB at T 1024): `pytest bench/` runs them,
  `pytest bench/ -m "not slow"` skips them. Time them alone, under the benchmark lock:
      flock /tmp/bench.lock python3 -m pytest bench/test_step124_bench.py -k "t64 or optimizer"
      flock /tmp/bench.lock python3 -m pytest bench/test_step124_bench.py -k t1024
"""
import gc

import numpy as np
import pytest

from conftest import record
from gptcore import GPT, AdamW, GPTConfig, clip_grad_norm, get_num_threads
from gptcore.model import parameter_shapes
from memory_124m import SHAPES, gptcore_step, transformers_step

torch = pytest.importorskip("torch")
from torch_gpt import TorchGPT, torch_optimizer, torch_training_step  # noqa: E402  (needs torch)

pytestmark = pytest.mark.slow

GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def run_rounds(benchmark, function, rounds):
    benchmark.pedantic(function, rounds=rounds, iterations=1, warmup_rounds=1)


@pytest.fixture(autouse=True)
def free_the_last_model():
    """A 124M model with its optimizer and activations holds GBs: let the previous test's go first."""
    gc.collect()
    yield
    gc.collect()


@pytest.mark.parametrize("implementation", ["gptcore", "torch"])
def test_step_124m_t64(benchmark, implementation):
    B, T = 4, 64
    torch.set_num_threads(get_num_threads())
    rng = np.random.default_rng(0)
    idx, targets = (rng.integers(0, GPT2_124M.vocab_size, (B, T)) for _ in range(2))
    if implementation == "gptcore":
        model = GPT(GPT2_124M, seed=0)
        opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)

        def step():
            model.forward(idx, targets)
            opt.step(model.backward(), max_norm=1.0)
    else:
        torch.manual_seed(0)
        model = TorchGPT(GPT2_124M)
        opt = torch_optimizer(model)
        step = torch_training_step(model, opt, torch.from_numpy(idx), torch.from_numpy(targets))
    record(benchmark, f"train_step 124M (B={B}, T={T})", implementation, 1, "step")
    run_rounds(benchmark, step, rounds=5)


@pytest.mark.parametrize("implementation", ["gptcore", "hf"])
def test_step_124m_t1024(benchmark, implementation):
    pytest.importorskip("transformers")
    shape = SHAPES["124m"]
    threads = get_num_threads()
    if implementation == "gptcore":
        step = gptcore_step(shape, threads)
    else:
        step, attention = transformers_step(shape, threads)
        benchmark.extra_info["attention"] = attention
    record(benchmark, f"train_step 124M (B={shape[5]}, T={shape[4]})", implementation, 1, "step")
    run_rounds(benchmark, step, rounds=2)


@pytest.mark.parametrize("implementation", ["gptcore", "unfused", "torch"])
def test_optimizer_passes(benchmark, implementation):
    """One AdamW update with the gradient norm clipped at 1.0, over GPT-2 124M's parameter tensors.
    The gradients are random with a norm far above 1, so every step really scales them."""
    rng = np.random.default_rng(0)
    shapes = parameter_shapes(GPT2_124M)
    params = {name: rng.standard_normal(shape, np.float32) * np.float32(0.02) for name, shape in shapes}
    grads = {name: rng.standard_normal(shape, np.float32) for name, shape in shapes}
    n = sum(p.size for p in params.values())
    # bytes over memory per update: the norm reads g; the update reads p, g, m, v and writes p, m, v;
    # unfused, the in-place clip reads and writes g once more
    passes = {"gptcore": 1 + 7, "unfused": 1 + 2 + 7, "torch": None}[implementation]
    if implementation == "torch":
        torch.set_num_threads(get_num_threads())
        tensors = [torch.nn.Parameter(torch.from_numpy(p)) for p in params.values()]
        for t, g in zip(tensors, grads.values()):
            t.grad = torch.from_numpy(g)
        opt = torch.optim.AdamW([{"params": [t for t in tensors if t.dim() >= 2], "weight_decay": 0.1},
                                 {"params": [t for t in tensors if t.dim() < 2], "weight_decay": 0.0}],
                                lr=1e-3, betas=(0.9, 0.99), eps=1e-8)

        def update():
            torch.nn.utils.clip_grad_norm_(tensors, 1.0)
            opt.step()
    else:
        opt = AdamW(params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        if implementation == "gptcore":
            def update():
                opt.step(grads, max_norm=1.0)
        else:
            # clip_grad_norm scales grads in place: each round scales them again, which costs the same
            def update():
                clip_grad_norm(grads, 1.0)
                opt.step(grads)
    record(benchmark, "optimizer 124M (AdamW + clip at 1.0)", implementation, 1, "update")
    benchmark.extra_info.update(parameters=n, bytes_moved=None if passes is None else passes * 4 * n)
    run_rounds(benchmark, update, rounds=7)
