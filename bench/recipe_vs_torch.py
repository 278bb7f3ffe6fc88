"""A whole training recipe, gptcore side by side with PyTorch: wall time and the loss each reaches.

WHAT'S GOING ON HERE
  The README's "baby GPT on Shakespeare" numbers come from this script. It runs nanoGPT's CPU recipe
  (4 layers, 4 heads, n_embd 128, block 64, batch 12, lr 1e-3 -> 1e-4 with 100 warmup steps, AdamW
  betas (0.9, 0.99), weight decay 0.1, clipping at 1.0, an evaluation of 20 batches every 250 steps)
  twice, one after the other in the same process and on the same threads:
    gptcore   gptcore.train.train, the function behind `gptcore train` (checkpoints included);
    PyTorch   the same model in idiomatic PyTorch (bench/torch_gpt.py), the same loop, the same
              batches (drawn by gptcore.data.BatchSampler from the same seed) and the same schedule.
  It prints each side's wall time, their ratio, and each side's last validation estimate. Absolute
  times depend on the machine (they vary by 2x between machines and by up to 20% from run to run); the
  ratio measured side by side is the number to compare.

Run it:  python3 bench/recipe_vs_torch.py --data ../shared/data/tinyshakespeare.txt
         python3 bench/recipe_vs_torch.py --data FILE --max-iters 200      (a quick look)
"""
import argparse
import math
import tempfile
import time

import numpy as np
import torch

from gptcore import get_num_threads
from gptcore.data import BatchSampler, read_corpus, split_tokens
from gptcore.optim import cosine_lr
from gptcore.tokenizer import CharTokenizer
from gptcore.train import TrainConfig, train
from torch_gpt import TorchGPT, torch_optimizer


def torch_recipe(config, train_ids, val_ids, vocab_size):
    """nanoGPT's loop in PyTorch; returns (seconds, last validation estimate)."""
    from gptcore.model import GPTConfig
    torch.manual_seed(config.seed)
    model = TorchGPT(GPTConfig(vocab_size=vocab_size, block_size=config.block_size, n_layer=config.n_layer,
                               n_head=config.n_head, n_embd=config.n_embd))
    opt = torch_optimizer(model, lr=config.lr, betas=(config.beta1, config.beta2),
                          weight_decay=config.weight_decay)
    sampler = BatchSampler(train_ids, config.batch_size, config.block_size, seed=config.seed)

    def estimate(tokens, step):
        batches = BatchSampler(tokens, config.batch_size, config.block_size, seed=[config.seed, step])
        with torch.no_grad():
            return float(np.mean([model(*(torch.from_numpy(a) for a in batches.next_batch()))[1].item()
                                  for _ in range(config.eval_iters)]))

    started, val_loss = time.perf_counter(), math.nan
    for step in range(config.max_iters + 1):
        lr = cosine_lr(step, config.lr, config.min_lr, config.warmup_iters, config.max_iters)
        for group in opt.param_groups:
            group["lr"] = lr
        if step % config.eval_interval == 0 or step == config.max_iters:
            estimate(train_ids, step)
            val_loss = estimate(val_ids, step)
        if step == config.max_iters:
            break
        _, loss = model(*(torch.from_numpy(a) for a in sampler.next_batch()))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return time.perf_counter() - started, val_loss


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--data", required=True, help="a text file (the recipe's corpus)")
    parser.add_argument("--max-iters", type=int, default=2000, help="steps (default %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(get_num_threads())
    with tempfile.TemporaryDirectory() as out:
        config = TrainConfig(data=args.data, out=out, max_iters=args.max_iters, eval_interval=250,
                             eval_iters=20, sample_tokens=0, progress=False)
        text, _ = read_corpus(config.data, config.glob)
        tokenizer = CharTokenizer.from_text(text)
        train_ids, val_ids = split_tokens(tokenizer.encode(text), config.val_fraction)
        started = time.perf_counter()
        result = train(config, log=lambda line: None)
        ours = time.perf_counter() - started
    theirs, their_val = torch_recipe(config, train_ids, val_ids, tokenizer.vocab_size)
    print(f"{config.max_iters} steps of {config.batch_size} x {config.block_size} tokens, "
          f"{get_num_threads()} threads")
    print(f"gptcore  {ours:7.1f} s   val loss {result.val_loss:.4f}")
    print(f"PyTorch  {theirs:7.1f} s   val loss {their_val:.4f}")
    print(f"gptcore / PyTorch wall time: {ours / theirs:.2f}")


if __name__ == "__main__":
    main()
