"""Where the time of one generated token goes, kernel by kernel, at GPT-2 124M.

WHAT'S GOING ON HERE
  We wrap every function of gptcore.compiled (the one adapter over the compiled kernels) in a timer,
  as bench/profile_step.py does, and split matmul_forward by the weight it multiplies by (c_attn,
  attn.c_proj, c_fc, mlp.c_proj, the LM head), since a token's time is mostly those five reads. Then
  we feed a prompt to a GPT-2 124M with gptcore's own random initialisation and generate tokens
  greedily one at a time through GPT.forward_cached, as gptcore.sample.generate does, and print per
  token: each kernel's time and share, what is left in Python between the kernels, and each matmul's
  weight bytes over its time (its read bandwidth) next to the machine's (gptcore.machine.measure_read_bandwidth).
  Each kernel's time is its median call times its calls per token, and the total is the median
  token, so another process that slows a few calls down moves the table little. Timers add ~1 us
  per call, so the total runs slightly above an untimed token.

Run it:  flock /tmp/bench.lock python3 bench/profile_generate.py
"""
import argparse
import collections
import functools
import sys
import time

import numpy as np

from gptcore import GPT, GPTConfig, compiled, get_num_threads, machine

GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args(argv)
    config = GPT2_124M
    model = GPT(config, seed=0)
    C = config.n_embd
    weight_names = {(C, 3 * C, False): "matmul c_attn", (C, C, False): "matmul attn.c_proj",
                    (C, 4 * C, False): "matmul c_fc", (4 * C, C, False): "matmul mlp.c_proj",
                    (config.vocab_size, C, True): "matmul lm_head (wte^T)"}

    spent = collections.defaultdict(list)           # kernel name -> the seconds of each call
    weight_bytes = {}

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*a, **kw):
            label = name
            if name == "matmul_forward":
                weight = a[1]
                label = weight_names.get(weight.shape + (kw.get("weight_transposed", False),), name)
                weight_bytes[label] = weight.nbytes
            start = time.perf_counter()
            try:
                return function(*a, **kw)
            finally:
                spent[label].append(time.perf_counter() - start)
        return wrapper

    bandwidth = machine.measure_read_bandwidth()             # before the timers go in: it runs a kernel too
    for name in compiled.__all__:
        if name not in compiled.SETTINGS:
            setattr(compiled, name, timed(name, getattr(compiled, name)))

    rng = np.random.default_rng(0)
    prompt = rng.integers(0, config.vocab_size, (1, args.prompt_tokens))
    kv_cache = model.new_kv_cache(1)
    logits = model.forward_cached(prompt, kv_cache)
    token_times = []
    for step in range(args.new_tokens + 4):
        if step == 4:                                     # the first tokens warm up caches and threads
            spent.clear()
        token = int(np.argmax(logits[0, -1]))
        start = time.perf_counter()
        logits = model.forward_cached(np.array([[token]]), kv_cache)
        if step >= 4:
            token_times.append(time.perf_counter() - start)

    tokens = args.new_tokens
    total = np.median(token_times)
    context = args.prompt_tokens + 4 + tokens / 2
    roofline = bandwidth / model.generation_bytes_per_token(int(context))
    print(f"GPT-2 124M, {get_num_threads()} threads, {tokens} tokens after {args.prompt_tokens + 4}: "
          f"median token {total * 1e3:.2f} ms (mean {np.mean(token_times) * 1e3:.2f} ms), "
          f"{1 / total:.1f} tokens/s")
    print(f"read bandwidth {bandwidth / 1e9:.1f} GB/s: roofline {roofline:.1f} tokens/s, "
          f"so the median token runs at {1 / total / roofline:.0%} of it")
    # medians per call, times the calls per token: a call another process slowed down moves a mean
    # far more than it moves a median
    per_token = {name: np.median(times) * len(times) / tokens for name, times in spent.items()}
    print(f"{'kernel':<28}{'calls/token':>12}{'ms/token':>10}{'share':>8}{'GB/s':>8}")
    for name, seconds in sorted(per_token.items(), key=lambda item: -item[1]):
        rate = f"{weight_bytes[name] / np.median(spent[name]) / 1e9:.1f}" if name in weight_bytes else ""
        print(f"{name:<28}{len(spent[name]) / tokens:>12.0f}{seconds * 1e3:>10.3f}{seconds / total:>8.1%}"
              f"{rate:>8}")
    rest = total - sum(per_token.values())
    print(f"{'(outside the kernels)':<28}{'':>12}{rest * 1e3:>10.3f}{rest / total:>8.1%}")


if __name__ == "__main__":
    sys.exit(main())
