"""Follow one prompt through the model, stage by stage, printing what each stage holds and its shape.

WHAT'S GOING ON HERE
  "def main" goes in; one new character comes out. In between:
    characters -> token ids (T,) -> embeddings (T, C) -> for each block: attention weights (NH, T, T)
    and the block's output (T, C) -> final LayerNorm -> logits (T, V) -> probabilities of the next
    token -> the sampled token.
  Everything printed is read from the model's own arrays (GPT.activations), so this is exactly what
  gptcore.model.GPT.forward computes, not a retelling. For each block we show where the *last*
  position looks, head by head: that row of the attention matrix is the one that decides the next
  token (row 0 is always [1, 0, 0, ...]: the first position can only look at itself).

  The numbers are checked as they are printed: each attention row sums to 1 and puts no weight on
  later positions, the probabilities sum to 1, and the logits the model returns are the final
  LayerNorm's output times wte^T. A wrong number stops the program with an AssertionError.

Run it:  python python/follow_the_data_flow.py                 (a small untrained model: near-uniform)
         python python/follow_the_data_flow.py --model out     (a checkpoint from `gptcore train`)
"""
import argparse
import sys

import numpy as np

from gptcore import GPT, GPTConfig
from gptcore.checkpoint import load_model
from gptcore.errors import GptcoreError
from gptcore.sample import next_token
from gptcore.tokenizer import CharTokenizer


def show(label, array):
    print(f"{label:<44} shape {str(array.shape):<16} {np.array2string(np.asarray(array).ravel()[:6], precision=3)}")


def follow(model, tokenizer, prompt):
    cfg = model.config
    print(f"model: {cfg.n_layer} layers, {cfg.n_head} heads, C = n_embd = {cfg.n_embd}, "
          f"V = vocab_size = {cfg.vocab_size}, block_size = {cfg.block_size}\n")

    # 1. characters -> token ids: one id per character, its index in the sorted vocabulary
    ids = tokenizer.encode(prompt)
    if len(ids) > cfg.block_size:
        print(f"the prompt has {len(ids)} tokens, more than block_size = {cfg.block_size}: "
              f"we keep its last {cfg.block_size}")
        ids = ids[-cfg.block_size:]
    T = len(ids)
    print(f"characters {list(tokenizer.decode(ids.tolist()))}")
    show("token ids (T,)", ids)

    # 2. the forward pass; everything below is read from the arrays it filled
    logits, _ = model.forward(ids[None, :])                       # (1, T, V)
    acts = model.activations
    show("embeddings wte[id] + wpe[t]  (T, C)", acts.blocks[0].x[0])
    for i, block in enumerate(acts.blocks):
        att = model.attention_weights(i)[0]                       # (NH, T, T)
        show(f"block {i}: attention weights (NH, T, T)", att)
        assert np.allclose(att.sum(axis=-1), 1.0, atol=1e-5), "an attention row does not sum to 1"
        assert not np.triu(att, k=1).any(), "attention looked at a later position"
        for head in range(cfg.n_head):
            last_row = att[head, T - 1]
            strongest = int(np.argmax(last_row))
            print(f"{'':<44} head {head}: the last position attends most to position {strongest} "
                  f"({tokenizer.decode([int(ids[strongest])])!r}, {last_row[strongest]:.2f}): "
                  f"{np.array2string(last_row[-8:], precision=2)}{' (last 8)' if T > 8 else ''}")
        show(f"block {i}: output, the residual stream (T, C)", block.out[0])
    show("final LayerNorm (T, C)", acts.ln_f.out[0])
    show("logits = ln_f @ wte^T  (T, V)", logits[0])
    head = acts.ln_f.out[0].astype(np.float64) @ model.params["wte.weight"].T.astype(np.float64)
    assert np.allclose(logits[0], head, rtol=1e-4, atol=1e-4 * np.abs(head).max()), \
        "forward returned other logits than ln_f.out @ wte^T"

    # 3. the last position's logits -> probabilities of the next character
    last = logits[0, -1].astype(np.float64)
    probs = np.exp(last - last.max())
    probs /= probs.sum()
    assert abs(probs.sum() - 1.0) < 1e-9
    top = np.argsort(-probs)[:5]
    print("most likely next characters: " + ", ".join(f"{tokenizer.decode([t])!r} {probs[t]:.3f}" for t in top))
    token = next_token(logits[0, -1], np.random.default_rng(0), temperature=1.0)
    print(f"sampled (temperature 1, seed 0): {tokenizer.decode([token])!r} -> "
          f"{prompt + tokenizer.decode([token])!r}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], allow_abbrev=False)
    parser.add_argument("--model", help="a checkpoint folder (default: a small untrained model)")
    parser.add_argument("--prompt", default="def main", help="the text to follow (default %(default)r)")
    args = parser.parse_args(argv)
    try:
        if args.model:
            model, tokenizer = load_model(args.model)
        else:
            # an untrained model over the characters of a little Python: the shapes are what matter here
            tokenizer = CharTokenizer.from_text("def main():\n    return self.value  # (x, y)\n" + args.prompt)
            model = GPT(GPTConfig(vocab_size=tokenizer.vocab_size, block_size=32, n_layer=2, n_head=2,
                                  n_embd=16), seed=0)
        if not args.prompt:
            raise GptcoreError("--prompt must hold at least one character")
        follow(model, tokenizer, args.prompt)
    except GptcoreError as error:
        print(f"follow_the_data_flow: error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
