"""GPT-2 124M greedy generation: gptcore side by side with transformers, and against the memory roofline.

WHAT'S GOING ON HERE
  One GPT-2 124M with transformers' random initialisation (bench/generate_vs_transformers.py saves
  it as a Hugging Face folder), loaded by both sides: gptcore.checkpoint.load_model and
  GPT2LMHeadModel.from_pretrained. A fixture first checks that both decode the same greedy tokens
  from the same prompt (and warms both up); then each side is timed generating NEW_TOKENS tokens
  after a PROMPT_TOKENS-token prompt, with its KV cache, on the same threads:
    gptcore        gptcore.sample.generate(temperature=0), forward_cached one token at a time;
    transformers   generate(do_sample=False).
  A generated token reads every weight once (GPT.generation_bytes_per_token), so its speed is bounded by the read
  bandwidth: the summary (bench/conftest.py) prints tokens/s for both, their ratio, and gptcore's
  tokens/s as a fraction of bandwidth / bytes read per token, with the bandwidth measured in the same
  run.
  bench/profile_generate.py breaks a token down by kernel.

Run it:  flock /tmp/bench.lock python3 -m pytest bench/test_generate_bench.py
"""
import os

import numpy as np
import pytest

from conftest import record

os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from generate_vs_transformers import random_gpt2_124m  # noqa: E402  (needs torch and transformers)
from gptcore import get_num_threads, machine  # noqa: E402
from gptcore.checkpoint import load_model  # noqa: E402
from gptcore.sample import generate  # noqa: E402

PROMPT_TOKENS, NEW_TOKENS, ROUNDS = 32, 64, 3
GROUP = f"generate GPT-2 124M, {NEW_TOKENS} tokens after {PROMPT_TOKENS}"


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(gptcore model, transformers model, prompt ids), once both decoded the same greedy tokens."""
    folder = str(tmp_path_factory.mktemp("gpt2-124m-random"))
    random_gpt2_124m(folder)
    ours, _ = load_model(folder)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(folder).eval()
    torch.set_num_threads(get_num_threads())
    prompt = np.random.default_rng(0).integers(0, ours.config.vocab_size, PROMPT_TOKENS).tolist()
    assert gptcore_tokens(ours, prompt) == transformers_tokens(theirs, prompt), "the greedy tokens differ"
    return ours, theirs, prompt


def gptcore_tokens(model, prompt):
    return list(generate(model, prompt, NEW_TOKENS, temperature=0))


def transformers_tokens(model, prompt):
    with torch.no_grad():
        output = model.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, do_sample=False,
                                pad_token_id=0, eos_token_id=None)
    return output[0, len(prompt):].tolist()


def test_gptcore_generate_124m(benchmark, models):
    ours, _, prompt = models
    record(benchmark, GROUP, "gptcore", NEW_TOKENS, "token")
    # the roofline of this run: bytes a token reads at the mean context, over the bandwidth now
    context = PROMPT_TOKENS + NEW_TOKENS // 2
    benchmark.extra_info.update(read_bandwidth=machine.measure_read_bandwidth(),
                                bytes_per_token=ours.generation_bytes_per_token(context))
    benchmark.pedantic(gptcore_tokens, args=(ours, prompt), rounds=ROUNDS, iterations=1)


def test_transformers_generate_124m(benchmark, models):
    _, theirs, prompt = models
    record(benchmark, GROUP, "transformers", NEW_TOKENS, "token")
    benchmark.pedantic(transformers_tokens, args=(theirs, prompt), rounds=ROUNDS, iterations=1)
