"""Peak memory and time of one GPT-2 124M training step: gptcore side by side with Hugging Face.

WHAT'S GOING ON HERE
  One training step is what gptcore.train.train_step does: forward with targets, backward, clipping
  the global gradient norm at 1.0, one AdamW update. We run it on each side in its own process under
  `/usr/bin/time -v`, one process after the other (never both at once), and read the kernel's
  "Maximum resident set size" of each: the peak RSS of the whole process, Python, libraries and
  parameters included, which is what a user's machine must hold.
    gptcore        gptcore.GPT (compiled kernels) and gptcore.AdamW; weight decay on the matrices.
    transformers   GPT2LMHeadModel(GPT2Config(...)) from a random initialisation, the loss from
                   model(idx, labels=idx) (transformers shifts the labels itself: position t is scored
                   against idx[t + 1], and the last position of each row has no target), then
                   loss.backward(), torch.nn.utils.clip_grad_norm_ and torch.optim.AdamW with the same
                   weight-decay split. Dropout is 0 on both sides, and transformers runs its default
                   attention implementation (printed).
  Both sides see the same (B, T) batch of random token ids and run on the same number of threads
  (OMP_NUM_THREADS and each library's own setting). Each process runs one warm-up step (which
  allocates what a step needs), then --steps timed steps; we print the median step time (wall clock,
  and CPU seconds of all the process's threads, which moves less when other programs share the
  machine), the peak RSS of each side and their ratios. The peak includes the warm-up: it is the
  high-water mark of the process. --compare-with DIR adds a third process, the gptcore of another
  checkout (built in place), for a before/after comparison of a change.

Run it:  flock /tmp/bench.lock python3 bench/memory_124m.py             (GPT-2 124M, B 4 x T 1024:
                                                                          ~10 GB per side, minutes)
         python3 bench/memory_124m.py --quick                           (2 layers, C 128, T 256: seconds)
         python3 bench/memory_124m.py --compare-with ../main            (and the gptcore of ../main)
         make memory
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

import numpy as np

# name -> (n_layer, n_head, n_embd, vocab_size, block_size, batch_size)
SHAPES = {
    "124m": (12, 12, 768, 50257, 1024, 4),          # GPT-2 124M, as issue 11 measures it
    "quick": (2, 4, 128, 50257, 256, 4),            # GPT-2's vocabulary, a small body: a quick look
}
SIDES = ("gptcore", "transformers")


def batch(vocab_size, batch_size, block_size):
    """The same random (B, T + 1) token ids on both sides: inputs idx[:, :-1], targets idx[:, 1:]."""
    return np.random.default_rng(0).integers(0, vocab_size, (batch_size, block_size + 1), dtype=np.int64)


def gptcore_step(shape, threads):
    """A function that runs one gptcore training step, as gptcore.train.train_step runs it (also timed
    by bench/test_step124_bench.py)."""
    import gptcore
    from gptcore import GPT, AdamW, GPTConfig
    n_layer, n_head, n_embd, vocab_size, block_size, batch_size = shape
    gptcore.set_num_threads(threads)
    model = GPT(GPTConfig(vocab_size=vocab_size, block_size=block_size, n_layer=n_layer, n_head=n_head,
                          n_embd=n_embd), seed=0)
    optimizer = AdamW(model.params, lr=6e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.1)
    tokens = batch(vocab_size, batch_size, block_size)
    idx, targets = tokens[:, :-1].copy(), tokens[:, 1:].copy()

    def step():
        _, loss = model.forward(idx, targets)
        optimizer.step(model.backward(), max_norm=1.0)    # the norm clipped at 1.0 inside the update
        return loss
    return step


def transformers_step(shape, threads):
    """(a function that runs one training step of transformers' GPT2LMHeadModel, trained as a PyTorch
    user trains it; the attention implementation transformers chose)."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    n_layer, n_head, n_embd, vocab_size, block_size, batch_size = shape
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=block_size, n_embd=n_embd,
                                       n_layer=n_layer, n_head=n_head, resid_pdrop=0.0, embd_pdrop=0.0,
                                       attn_pdrop=0.0))
    model.train()
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                                   {"params": no_decay, "weight_decay": 0.0}],
                                  lr=6e-4, betas=(0.9, 0.95), eps=1e-8)
    idx = torch.from_numpy(batch(vocab_size, batch_size, block_size)[:, :-1].copy())

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = model(idx, labels=idx).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        return loss.item()
    return step, model.config._attn_implementation


def timed_steps(step, steps):
    """Seconds (wall, CPU) of each of 1 + steps calls of step, and the last one's loss."""
    seconds = []
    for _ in range(1 + steps):
        start = time.perf_counter(), time.process_time()
        loss = step()
        seconds.append((time.perf_counter() - start[0], time.process_time() - start[1]))
    return seconds, loss


def child(side, shape, steps, threads):
    """Runs inside /usr/bin/time: the steps of one side; prints one JSON line for the parent."""
    if side == "gptcore":
        seconds, loss = timed_steps(gptcore_step(shape, threads), steps)
        extra = {}
    else:
        step, attention = transformers_step(shape, threads)
        seconds, loss = timed_steps(step, steps)
        extra = {"attention": attention}
    print(json.dumps({"seconds": seconds, "loss": float(loss), **extra}))


def measure(side, tree, shape_name, steps, threads):
    """(peak RSS in bytes, the child's JSON) of one side, run in its own process under /usr/bin/time -v,
    with the gptcore of the checkout `tree` first on its path."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    command = ["/usr/bin/time", "-v", sys.executable, os.path.abspath(__file__), "--child", side,
               "--shape", shape_name, "--steps", str(steps), "--threads", str(threads)]
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    peak = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    if done.returncode != 0 or peak is None:
        sys.exit(f"the {side} step failed (exit {done.returncode}):\n{done.stderr[-3000:]}")
    return int(peak.group(1)) * 1024, json.loads(done.stdout.strip().splitlines()[-1])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shape", choices=SHAPES, default="124m", help="the model and batch (default 124m)")
    parser.add_argument("--quick", action="store_const", const="quick", dest="shape",
                        help="the same as --shape quick")
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the warm-up (default 3)")
    parser.add_argument("--threads", type=int, default=2, help="threads on both sides (default 2)")
    parser.add_argument("--only", choices=SIDES, help="measure one side only")
    parser.add_argument("--compare-with", metavar="DIR",
                        help="also measure the gptcore of this checkout (built in place), before this one")
    parser.add_argument("--child", choices=SIDES, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.steps < 1 or args.threads < 1:
        parser.error("--steps and --threads must be at least 1")
    shape = SHAPES[args.shape]
    if args.child:
        return child(args.child, shape, args.steps, args.threads)

    n_layer, n_head, n_embd, vocab_size, block_size, batch_size = shape
    print(f"one training step (forward, backward, clip, AdamW) of n_layer {n_layer}, n_head {n_head}, "
          f"n_embd {n_embd}, V {vocab_size}, B {batch_size} x T {block_size}; {args.threads} threads; "
          f"median of {args.steps} steps after 1 warm-up step")
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))      # this script's checkout
    runs = [(side, side, here) for side in ((args.only,) if args.only else SIDES)]
    if args.compare_with:
        runs.insert(0, (f"gptcore {args.compare_with}", "gptcore", os.path.abspath(args.compare_with)))
    results = {}
    for label, side, tree in runs:
        peak, report = measure(side, tree, args.shape, args.steps, args.threads)
        wall, cpu = (statistics.median(s[i] for s in report["seconds"][1:]) for i in (0, 1))
        results[label] = (peak, wall, cpu)
        note = f"  (attention: {report['attention']})" if "attention" in report else ""
        print(f"{label:>24}  peak RSS {peak / 1e9:6.2f} GB   step {wall:7.3f} s wall, {cpu:7.3f} s CPU   "
              f"loss {report['loss']:.4f}{note}", flush=True)
    if "transformers" in results:
        theirs = results["transformers"]
        for label, ours in results.items():
            if label != "transformers":
                print(f"{label + ' / transformers':>40}  peak RSS {ours[0] / theirs[0]:.3f}x   "
                      f"step {ours[1] / theirs[1]:.3f}x wall, {ours[2] / theirs[2]:.3f}x CPU")


if __name__ == "__main__":
    main()
