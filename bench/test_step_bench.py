"""A whole training step (forward + backward + clipping + AdamW), gptcore side by side with PyTorch.

WHAT'S GOING ON HERE
  Two configurations, each timed for gptcore and for the same model in PyTorch (bench/torch_gpt.py),
  with the same thread count, in the same run:
    tiny: a small model             (2 layers, 2 heads, n_embd 64, T 64, batch 4, V 100)
    baby: nanoGPT's CPU "baby GPT"  (4 layers, 4 heads, n_embd 128, T 64, batch 12, V 65)
  Also the forward pass alone. The summary table (bench/conftest.py) prints PyTorch's time over
  gptcore's: above 1 means gptcore is faster. `python bench/profile_step.py` breaks a step down by
  kernel.
"""
import numpy as np
import pytest

from conftest import record
from gptcore import GPT, AdamW, GPTConfig, get_num_threads

torch = pytest.importorskip("torch")
from torch_gpt import TorchGPT, torch_optimizer, torch_training_step  # noqa: E402  (needs torch)

CONFIGS = {
    "tiny": (GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=64), 4),
    "baby": (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
}


def batch(config, B):
    rng = np.random.default_rng(0)
    return (rng.integers(0, config.vocab_size, (B, config.block_size)),
            rng.integers(0, config.vocab_size, (B, config.block_size)))


def gptcore_step(config, B):
    model = GPT(config, seed=0)
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    idx, targets = batch(config, B)

    def step():
        model.forward(idx, targets)
        grads = model.backward()
        opt.step(grads, max_norm=1.0)    # the norm clipped at 1.0 inside the update
    return step, lambda: model.forward(idx, targets, need_backward=False)


def torch_step(config, B):
    torch.manual_seed(0)
    model = TorchGPT(config)
    opt = torch_optimizer(model)
    idx, targets = (torch.from_numpy(a) for a in batch(config, B))
    step = torch_training_step(model, opt, idx, targets)

    def forward():
        with torch.no_grad():
            model(idx, targets)
    return step, forward


@pytest.mark.parametrize("implementation", ["gptcore", "torch"])
@pytest.mark.parametrize("what", ["train_step", "forward"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_step(benchmark, name, what, implementation):
    config, B = CONFIGS[name]
    torch.set_num_threads(get_num_threads())
    step, forward = (gptcore_step if implementation == "gptcore" else torch_step)(config, B)
    function = step if what == "train_step" else forward
    record(benchmark, f"{what} {name} (B={B}, T={config.block_size})", implementation, 1, "step")
    benchmark.pedantic(function, rounds=60, iterations=1, warmup_rounds=10)
