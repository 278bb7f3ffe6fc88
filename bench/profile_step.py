"""Where the time of one training step goes, kernel by kernel.

WHAT'S GOING ON HERE
  We wrap every function of gptcore.compiled, the one adapter over the compiled kernels, in a timer:
  the model's layers, the clipping's sum_of_squares and the optimizer's adamw_update all go through
  it (gptcore.backends.get returns that module, and they look its functions up at each call). Then we
  run a few training steps of a model (forward + backward + clipping + AdamW) and print the time per
  step spent in each kernel, plus what is left over: Python between the kernels and buffer zeroing.
  Timers add ~1 us per call, so the total runs slightly above a real step.

Run it:  python bench/profile_step.py            (the baby GPT: 4 layers, 4 heads, C 128, T 64, B 12)
         python bench/profile_step.py --tiny     (2 layers, 2 heads, C 64, T 64, B 4, V 100)
"""
import argparse
import collections
import functools
import sys
import time

import numpy as np

from gptcore import GPT, AdamW, GPTConfig, clip_grad_norm, compiled

CONFIGS = {
    "baby": (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12),
    "tiny": (GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=64), 4),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="the 2-layer, 64-channel model instead of the baby GPT")
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    config, B = CONFIGS["tiny" if args.tiny else "baby"]
    T = config.block_size

    spent = collections.defaultdict(float)          # kernel name -> seconds, summed over the steps
    calls = collections.Counter()

    def timed(name, function):
        @functools.wraps(function)
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return function(*a, **kw)
            finally:
                spent[name] += time.perf_counter() - start
                calls[name] += 1
        return wrapper

    labels = {"sum_of_squares": "sum_of_squares (clipping)", "adamw_update": "adamw_update (optimizer)"}
    for name in compiled.__all__:
        if name not in compiled.SETTINGS:
            setattr(compiled, name, timed(labels.get(name, name), getattr(compiled, name)))

    model = GPT(config, seed=0)
    opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, config.vocab_size, (B, T))
    targets = rng.integers(0, config.vocab_size, (B, T))
    step_times = []
    for step in range(args.steps + 5):
        if step == 5:                                     # the first steps warm up caches and threads
            spent.clear()
            calls.clear()
        start = time.perf_counter()
        model.forward(idx, targets)
        grads = model.backward()
        clip_grad_norm(grads, 1.0)
        opt.step(grads)
        if step >= 5:
            step_times.append(time.perf_counter() - start)

    if "adamw_update (optimizer)" not in calls or "matmul_forward" not in calls:
        raise SystemExit("the model or the optimizer did not call gptcore.compiled, so this profile would "
                         f"be incomplete (timed: {sorted(calls)})")
    steps = args.steps
    total = sum(step_times) / steps
    print(f"{'tiny' if args.tiny else 'baby'} GPT, B={B} T={T}, {compiled.get_num_threads()} threads: "
          f"median step {np.median(step_times) * 1e3:.2f} ms (mean {total * 1e3:.2f} ms)")
    print(f"{'kernel':<28}{'calls/step':>11}{'ms/step':>10}{'share':>8}")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"{name:<28}{calls[name] / steps:>11.0f}{seconds / steps * 1e3:>10.3f}{seconds / steps / total:>8.1%}")
    rest = total - sum(spent.values()) / steps
    print(f"{'(outside the kernels)':<28}{'':>11}{rest * 1e3:>10.3f}{rest / total:>8.1%}")


if __name__ == "__main__":
    sys.exit(main())
