"""Time training steps of the baby GPT, alone or as the ranks of `mpiexec -n N`, at one global batch.

WHAT'S GOING ON HERE
  bench/test_distributed_bench.py runs this script as 1 process x 2 threads and as 2 ranks x 1 thread
  (OMP_NUM_THREADS), side by side, and compares tokens/s. Each process trains nanoGPT's baby GPT
  (4 layers, 4 heads, n_embd 128, block 64, vocabulary 65) through gptcore.train.train_step on random
  windows of random tokens, with batch GLOBAL_BATCH / N per rank, so every configuration trains
  GLOBAL_BATCH x 64 tokens a step. Rank 0 prints one JSON line: the median step time (the all-reduce
  included) and tokens/s.

    OMP_NUM_THREADS=2 python bench/distributed_steps.py
    OMP_NUM_THREADS=1 mpiexec -n 2 python bench/distributed_steps.py
"""
import json
import statistics
import sys
import time

import numpy as np

from gptcore import distributed
from gptcore.data import BatchSampler
from gptcore.kernels import get_num_threads
from gptcore.model import GPT, GPTConfig
from gptcore.optim import AdamW
from gptcore.train import Run, TrainConfig, train_step

BABY = GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128)
GLOBAL_BATCH = 12
WARMUP_STEPS, TIMED_STEPS = 5, 40


def main():
    group = distributed.connect()
    if GLOBAL_BATCH % group.size:
        sys.exit(f"{group.size} ranks do not divide the global batch {GLOBAL_BATCH}")
    threads = group.default_threads()
    if threads is not None:
        from gptcore.kernels import set_num_threads
        set_num_threads(threads)
    tokens = np.random.default_rng(0).integers(0, BABY.vocab_size, 200_000)
    config = TrainConfig(batch_size=GLOBAL_BATCH // group.size, block_size=BABY.block_size)
    model = GPT(BABY, seed=0)
    run = Run(config=config, corpus=None, tokenizer=None, model=model,
              optimizer=AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1),
              sampler=BatchSampler(tokens, config.batch_size, BABY.block_size, group.sampler_seed(0)),
              train_ids=tokens, val_ids=None, metrics_path=None, group=group)
    seconds = []
    with group.stop_everyone_on_failure("distributed_steps"):
        for step in range(WARMUP_STEPS + TIMED_STEPS):
            started = time.perf_counter()
            train_step(run)          # ends with the all-reduce: every rank leaves it together
            seconds.append(time.perf_counter() - started)
    if group.is_root:
        median = statistics.median(seconds[WARMUP_STEPS:])
        print(json.dumps({"ranks": group.size, "threads_per_rank": get_num_threads(),
                          "step_seconds": median, "tokens_per_sec": GLOBAL_BATCH * BABY.block_size / median,
                          "parameters": model.num_parameters}))


if __name__ == "__main__":
    main()
