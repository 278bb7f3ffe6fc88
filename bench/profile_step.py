"""Where the time of one training step goes, kernel by kernel.

WHAT'S GOING ON HERE
  We wrap every function of gptcore.compiled, the one adapter over the compiled kernels, in a timer:
  the model's layers, the clipping's sum_of_squares and the optimizer's adamw_update all go through
  it (gptcore.backends.get returns that module, and they look its functions up at each call). Then we
  run a few training steps of a model (forward + backward + clipping + AdamW) and print the time per
  step spent in each kernel, plus what is left over: Python between the kernels and the numpy work
  of a step (zeroing gradient buffers, the LM head's gradient added into wte's). Timers add ~1 us per
  call, so the total runs slightly above a real step.

Run it:  python bench/profile_step.py                    (the baby GPT: 4 layers, 4 heads, C 128, T 64, B 12)
         python bench/profile_step.py --config tiny      (2 layers, 2 heads, C 64, T 64, B 4, V 100)
         flock /tmp/bench.lock python bench/profile_step.py --config 124m --steps 5
                                                         (GPT-2 124M: 12 layers, 12 heads, C 768,
                                                          V 50257, at llm.c's CPU demo size B 4 x T 64)
         flock /tmp/bench.lock python bench/profile_step.py --config 124m-1024 --steps 2
                                                         (GPT-2 124M at B 4 x T 1024; ~10 GB)
"""
import argparse
import collections
import functools
import sys
import time

import numpy as np

from gptcore import GPT, AdamW, GPTConfig, compiled

GPT2_124M = GPTConfig(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
CONFIGS = {                     # name -> (model, B, T)
    "baby": (GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), 12, 64),
    "tiny": (GPTConfig(vocab_size=100, block_size=64, n_layer=2, n_head=2, n_embd=64), 4, 64),
    "124m": (GPT2_124M, 4, 64),
    "124m-1024": (GPT2_124M, 4, 1024),
}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", choices=CONFIGS, default="baby", help="the model and batch (default baby)")
    parser.add_argument("--steps", type=int, default=30, help="timed steps (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps before them (default 5)")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        parser.error("--steps must be at least 1 and --warmup at least 0")
    config, B, T = CONFIGS[args.config]

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
    for step in range(args.steps + args.warmup):
        if step == args.warmup:                           # the first steps warm up caches and threads
            spent.clear()
            calls.clear()
        start = time.perf_counter()
        model.forward(idx, targets)
        grads = model.backward()
        opt.step(grads, max_norm=1.0)    # the norm clipped at 1.0 inside the update
        if step >= args.warmup:
            step_times.append(time.perf_counter() - start)

    if "adamw_update (optimizer)" not in calls or "matmul_forward" not in calls:
        raise SystemExit("the model or the optimizer did not call gptcore.compiled, so this profile would "
                         f"be incomplete (timed: {sorted(calls)})")
    steps = args.steps
    total = sum(step_times) / steps
    print(f"{args.config} GPT, B={B} T={T}, {compiled.get_num_threads()} threads: "
          f"median step {np.median(step_times) * 1e3:.2f} ms (mean {total * 1e3:.2f} ms)")
    print(f"{'kernel':<28}{'calls/step':>11}{'ms/step':>10}{'share':>8}")
    for name, seconds in sorted(spent.items(), key=lambda item: -item[1]):
        print(f"{name:<28}{calls[name] / steps:>11.0f}{seconds / steps * 1e3:>10.3f}{seconds / steps / total:>8.1%}")
    rest = total - sum(spent.values()) / steps
    print(f"{'(outside the kernels)':<28}{'':>11}{rest * 1e3:>10.3f}{rest / total:>8.1%}")


if __name__ == "__main__":
    sys.exit(main())
