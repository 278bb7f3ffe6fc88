"""The speed-up to expect from data-parallel training on N machines: the table in LEARNING_PATH.md.

WHAT'S GOING ON HERE
  One measurement, a cost model, a markdown table.

  MEASURED  the step time of nanoGPT's baby GPT (4 layers, 4 heads, n_embd 128, block 64, vocabulary
            65, batch 12) in one process with every core of this machine: a whole training step,
            forward, backward, clipping and AdamW (gptcore.train.train_step), the median of
            TIMED_STEPS steps after WARMUP_STEPS. Its FLOP rate is the model's training FLOPs per
            step over that time, with nanoGPT's count per token: 6 N for the matmuls of forward and
            backward over N parameters, plus 12 L T C for attention's scores and weighted sums.
  COMPUTED  GPT-2 124M's step time (block 1024, vocabulary 50257, batch GPT2_BATCH per machine) is
            its FLOPs per step at the baby GPT's measured FLOP rate; it is not measured (it would take
            many GB and minutes a step). Bigger matmuls usually run at a higher FLOP rate than the
            baby GPT's, so this compute time is, if anything, too long, which makes the speed-ups
            below a little optimistic for GPT-2 124M.
  MODEL     Every machine trains on its own batch and the gradients are averaged once a step by a
            ring all-reduce, which sends and receives 2 (N - 1) / N x parameters x 4 bytes per
            machine (a reduce-scatter, then an all-gather, each passing (N - 1) / N of the buffer
            around the ring). With the all-reduce after the backward (as gptcore does it, no
            overlap) and a network of B bits/s:
                t_comm(N)  = 2 (N - 1) / N x 4 x parameters x 8 / B          (latency left out)
                speed-up   = N x t_step / (t_step + t_comm(N))                (tokens/s over 1 machine)
            since N machines train N times the tokens of one in each step. Latency (tens of
            microseconds per message on Ethernet) is left out: it matters only for models far
            smaller than these.

    python3 tools/scaling_table.py                       # measure the baby GPT's step, print the table
    python3 tools/scaling_table.py --step-seconds 0.05   # the table for a step time measured before
"""
import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

BABY = dict(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
BABY_BATCH = 12
GPT2 = dict(vocab_size=50257, block_size=1024, n_layer=12, n_head=12, n_embd=768)
GPT2_BATCH = 8
MACHINES = (1, 2, 4, 8, 16)
GBIT_PER_SEC = (1, 10)
WARMUP_STEPS, TIMED_STEPS = 5, 30
BYTES_PER_FLOAT32 = 4


def parameters(vocab_size, block_size, n_layer, n_head, n_embd):
    """GPT-2's parameter count (tied token embedding): embeddings, L blocks, the final layernorm."""
    C = n_embd
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    return vocab_size * C + block_size * C + n_layer * block + 2 * C


def training_flops_per_step(config, batch):
    """nanoGPT's estimate: (6 N + 12 L T C) FLOPs per token trained, times batch x T tokens."""
    T, L, C = config["block_size"], config["n_layer"], config["n_embd"]
    return (6 * parameters(**config) + 12 * L * T * C) * batch * T


def allreduce_seconds(n_parameters, machines, gbit_per_sec):
    """A ring all-reduce of a float32 buffer: 2 (N - 1) / N x its bytes through each machine's link."""
    sent_bytes = 2 * (machines - 1) / machines * n_parameters * BYTES_PER_FLOAT32
    return sent_bytes * 8 / (gbit_per_sec * 1e9)


def speedup(step_seconds, n_parameters, machines, gbit_per_sec):
    return machines * step_seconds / (step_seconds + allreduce_seconds(n_parameters, machines, gbit_per_sec))


def measure_baby_step_seconds():
    """The median wall time of one training step of the baby GPT, one process, every core."""
    import numpy as np
    from gptcore.data import BatchSampler
    from gptcore.model import GPT, GPTConfig
    from gptcore.optim import AdamW
    from gptcore.train import Run, TrainConfig, train_step
    model = GPT(GPTConfig(**BABY), seed=0)
    tokens = np.random.default_rng(0).integers(0, BABY["vocab_size"], 100_000)
    run = Run(config=TrainConfig(batch_size=BABY_BATCH, block_size=BABY["block_size"]), corpus=None,
              tokenizer=None, model=model,
              optimizer=AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
              sampler=BatchSampler(tokens, BABY_BATCH, BABY["block_size"], seed=0), train_ids=tokens,
              val_ids=None, metrics_path=None)
    seconds = []
    for _ in range(WARMUP_STEPS + TIMED_STEPS):
        started = time.perf_counter()
        train_step(run)
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds[WARMUP_STEPS:])


def scaling_table(baby_step_seconds, threads):
    """The markdown LEARNING_PATH.md shows, for a measured baby GPT step time."""
    flop_rate = training_flops_per_step(BABY, BABY_BATCH) / baby_step_seconds
    models = [("baby GPT", BABY, BABY_BATCH, baby_step_seconds, "measured"),
              ("GPT-2 124M", GPT2, GPT2_BATCH, training_flops_per_step(GPT2, GPT2_BATCH) / flop_rate,
               "computed at the baby GPT's FLOP rate")]
    lines = [f"Measured: one baby GPT step (batch {BABY_BATCH} x {BABY['block_size']}) takes "
             f"{baby_step_seconds * 1e3:.1f} ms on {threads} threads, {flop_rate / 1e9:.2f} GFLOP/s "
             f"(`python3 tools/scaling_table.py --step-seconds {baby_step_seconds:.4f} --threads {threads}` reprints this table).",
             ""]
    for name, config, batch, step_seconds, how in models:
        n = parameters(**config)
        lines.append(f"- {name}: {n:,} parameters, {n * BYTES_PER_FLOAT32 / 1e6:,.1f} MB of gradients; one "
                     f"step of batch {batch} x {config['block_size']} per machine takes {step_seconds:.3g} s "
                     f"({how})")
    lines.append("")
    header = ["machines"] + [f"{name}, {bandwidth} Gbit/s" for name, *_ in models for bandwidth in GBIT_PER_SEC]
    lines.append("| " + " | ".join(header) + " |")
    lines.append("|" + "|".join("---:" for _ in header) + "|")
    for machines in MACHINES:
        cells = [str(machines)]
        for _, config, _, step_seconds, _ in models:
            for bandwidth in GBIT_PER_SEC:
                cells.append(f"{speedup(step_seconds, parameters(**config), machines, bandwidth):.2f}x")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step-seconds", type=float, default=None,
                        help="a baby GPT step time measured before (default: measure it now)")
    parser.add_argument("--threads", type=int, default=None,
                        help="the threads that step ran on (default: this process's)")
    args = parser.parse_args(argv)
    from gptcore.kernels import get_num_threads, set_num_threads
    if args.threads is not None:
        set_num_threads(args.threads)
    step_seconds = args.step_seconds if args.step_seconds is not None else measure_baby_step_seconds()
    sys.stdout.write(scaling_table(step_seconds, get_num_threads()))


if __name__ == "__main__":
    main()
