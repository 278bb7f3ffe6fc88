"""Follow one prompt through the model, stage by stage, printing what each stage holds and its shape.

WHAT'S GOING ON HERE
  "def main" goes in; one new character comes out. In between:
    characters -> token ids (T,) -> embeddings (T, C) -> for each block: attention weights (NH, T, T)
    and the block's output (T, C) -> final LayerNorm -> logits (T, V) -> probabilities of the next
    token -> the sampled token.
  Everything printed is read from the model's own arrays (GPT.activations), so this is exactly what
  gptcore.model.GPT.forward computes, not a retelling.

Run it:  python python/follow_the_data_flow.py                 (a small untrained model: near-uniform)
         python python/follow_the_data_flow.py --model out     (a checkpoint from `gptcore train`)
"""
import argparse

import numpy as np

from gptcore import GPT, GPTConfig
from gptcore.checkpoint import load_model
from gptcore.sample import next_token
from gptcore.tokenizer import CharTokenizer


def show(label, array):
    print(f"{label:<44} shape {str(array.shape):<16} {np.array2string(np.asarray(array).ravel()[:6], precision=3)}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", help="a checkpoint folder (default: a small untrained model)")
    parser.add_argument("--prompt", default="def main")
    args = parser.parse_args(argv)

    if args.model:
        model, tokenizer = load_model(args.model)
    else:
        # an untrained model over the characters of a little Python: the shapes are what matter here
        tokenizer = CharTokenizer.from_text("def main():\n    return self.value  # (x, y)\n" + args.prompt)
        model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2, n_embd=16),
                    seed=0)
    cfg = model.config
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, C = n_embd = {cfg.n_embd}, "
          f"V = vocab_size = {cfg.vocab_size}, block_size = {cfg.block_size}\n")

    # 1. characters -> token ids: one id per character, its index in the sorted vocabulary
    ids = tokenizer.encode(args.prompt)[-cfg.block_size:]
    T = len(ids)
    print(f"characters {list(args.prompt)}")
    show("token ids (T,)", ids)

    # 2. the forward pass; everything below is read from the arrays it filled
    logits, _ = model.forward(ids[None, :])                       # (1, T, V)
    acts = model.activations
    show("embeddings wte[id] + wpe[t]  (T, C)", acts.blocks[0].x[0])
    for i, block in enumerate(acts.blocks):
        show(f"block {i}: attention weights (NH, T, T)", block.att[0])
        last_row = block.att[0, 0, T - 1, :T]
        print(f"{'':<44} head 0, last position attends to: {np.array2string(last_row, precision=2)}")
        output = acts.blocks[i + 1].x[0] if i + 1 < len(acts.blocks) else acts.x_final[0]
        show(f"block {i}: output, the residual stream (T, C)", output)
    show("final LayerNorm (T, C)", acts.ln_f.out.reshape(1, T, -1)[0])
    show("logits = ln_f @ wte^T  (T, V)", logits[0])

    # 3. the last position's logits -> probabilities of the next character
    last = logits[0, -1].astype(np.float64)
    probs = np.exp(last - last.max())
    probs /= probs.sum()
    top = np.argsort(-probs)[:5]
    print("most likely next characters: " + ", ".join(f"{tokenizer.decode([t])!r} {probs[t]:.3f}" for t in top))
    token = next_token(logits[0, -1], np.random.default_rng(0), temperature=1.0)
    print(f"sampled (temperature 1, seed 0): {tokenizer.decode([token])!r} -> "
          f"{args.prompt + tokenizer.decode([token])!r}")


if __name__ == "__main__":
    main()
