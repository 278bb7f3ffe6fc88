"""K training steps (gptcore.train.train_step) on a fixed sequence of batches, alone or as one rank of
`mpiexec -n N`; tests/test_distributed.py runs it both ways and compares the parameters.

WHAT'S GOING ON HERE
  The batches come from a generator seeded with 0, the same in every process: step s, micro-batch m
  is GLOBAL_BATCH rows. Run alone, the process trains on all GLOBAL_BATCH rows of each micro-batch;
  as rank r of N, it trains on rows [r * GLOBAL_BATCH / N, (r + 1) * GLOBAL_BATCH / N) of each, so
  the N ranks together see exactly the rows the lone process sees. Each process writes its final
  parameters, the losses of its steps (the mean over the ranks) and one last averaged
  gradient to OUT/rank<r>.npz.

    python tests/mpi_train_steps.py OUT                     # one process, batch GLOBAL_BATCH
    mpiexec -n 2 python tests/mpi_train_steps.py OUT        # two ranks, batch GLOBAL_BATCH / 2 each
"""
import os
import sys

import numpy as np

from gptcore import distributed
from gptcore.model import GPT, GPTConfig
from gptcore.optim import AdamW
from gptcore.train import Run, TrainConfig, train_step

CONFIG = GPTConfig(vocab_size=50, block_size=16, n_layer=2, n_head=2, n_embd=32)
GLOBAL_BATCH = 8
GRAD_ACCUM = 2
STEPS = 8
# small enough that every step clips: the clipping must use the norm of the averaged gradient
GRAD_CLIP = 0.05


class FixedBatches:
    """next_batch() -> this process's rows of the next micro-batch of the fixed sequence."""

    def __init__(self, rank, size):
        self.rng = np.random.default_rng(0)
        rows = GLOBAL_BATCH // size
        self.mine = slice(rank * rows, (rank + 1) * rows)

    def next_batch(self):
        windows = self.rng.integers(0, CONFIG.vocab_size, (GLOBAL_BATCH, CONFIG.block_size + 1))
        return windows[self.mine, :-1].copy(), windows[self.mine, 1:].copy()


def main(out):
    group = distributed.connect()
    model = GPT(CONFIG, seed=0)
    optimizer = AdamW(model.params, lr=3e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
    config = TrainConfig(batch_size=GLOBAL_BATCH // group.size, grad_accum=GRAD_ACCUM, grad_clip=GRAD_CLIP,
                         block_size=CONFIG.block_size)
    run = Run(config=config, corpus=None, tokenizer=None, model=model, optimizer=optimizer,
              sampler=FixedBatches(group.rank, group.size), train_ids=None, val_ids=None, metrics_path=None,
              group=group)
    with group.stop_everyone_on_failure("mpi_train_steps"):
        losses = [train_step(run) for _ in range(STEPS)]
        # AdamW and clipping hide the gradient's scale (m / sqrt(v) is the same for g and 2 g), so the
        # averaged gradient itself is compared too: one more micro-batch, forward, backward, average
        _, loss = model.forward(*run.sampler.next_batch())
        model.backward()
        losses.append(group.average(model.flat_grads, loss))
    np.savez(os.path.join(out, f"rank{group.rank}.npz"), params=model.flat_params, grads=model.flat_grads,
             losses=np.array(losses))


if __name__ == "__main__":
    main(sys.argv[1])
