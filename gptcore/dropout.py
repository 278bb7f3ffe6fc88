"""gptcore.dropout: which activations a training forward drops, decided by a hash instead of stored masks.

WHAT'S GOING ON HERE
====================

WHAT
  Inverted dropout, as GPT-2 and nanoGPT train with it: during training each activation at a dropout
  site is zeroed with probability p and the survivors are scaled by 1 / (1 - p), so an activation's
  expected value is what evaluation (which never drops) sees:

      out = x * keep / (1 - p),   keep ~ Bernoulli(1 - p), one draw per element

  GPT-2 has three sites, and gptcore has the same four masks per forward that nanoGPT's model has:
      EMBEDDINGS         after wte[idx] + wpe[t], before the first block
      ATTENTION_WEIGHTS  after the softmax, before att @ v (inside the attention kernel)
      ATTENTION_OUTPUT   the output of attn.c_proj, before it is added to the residual stream
      MLP_OUTPUT         the output of mlp.c_proj, before it is added to the residual stream

WHERE
  gptcore.train builds one Dropout per micro-batch (p from --dropout, seed from the run's seed, counter
  from the step and micro-batch) and hands it to GPT.forward; evaluation, estimate_loss and generation
  pass none, so they never drop. The kernels (dropout_forward/backward and the attention kernels'
  dropout arguments, in gptcore._kernels and their twins in gptcore.reference) apply the masks.

HOW
  No mask is stored. The decision for element i of a site is a pure function of a 64-bit key and i:

      z = key + (i + 1) * GOLDEN  (mod 2^64),    drop iff mix(z) < floor(p * 2^64)

  with mix splitmix64's finaliser (two xor-shift-multiply rounds), a bijection whose every output
  bit depends on every input bit; GOLDEN = 2^64 / golden ratio is splitmix64's increment. The key of
  each site comes from chaining the same mix over (seed, counter, layer, site) (Dropout.key). So the
  backward regenerates the forward's mask from the same key, any thread computes any element's
  decision without talking to the others (bitwise the same for any thread count), and a resumed run
  that knows its step draws the masks an uninterrupted run would have drawn. The attention weights'
  masks are never (B, NH, T, T) in memory: each head's are made, used and dropped inside the kernel.

CONTRACT
  Dropout(p, seed, counter): 0 <= p < 1 (p = 0 means no dropout at all: the model then skips every
  dropout call, so its results are bitwise those of a model without dropout), seed and counter
  integers in [0, 2^64). Dropout.key(layer, site) is the 64-bit key a kernel takes.

TWIN
  The compiled kernels compute mix in C with uint64 arithmetic; gptcore.reference computes it with
  numpy's uint64 arrays (mix64_array below); tests/test_kernels.py checks they drop the same elements.
"""
from dataclasses import dataclass

import numpy as np

MASK64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15          # splitmix64's increment, 2^64 / golden ratio
MIX_1 = 0xBF58476D1CE4E5B9           # splitmix64's two finaliser multipliers
MIX_2 = 0x94D049BB133111EB

# The dropout sites (the `site` in a key); EMBEDDINGS is keyed with layer 0.
EMBEDDINGS, ATTENTION_WEIGHTS, ATTENTION_OUTPUT, MLP_OUTPUT = range(4)


def mix64(z):
    """splitmix64's finaliser on one Python int in [0, 2^64)."""
    z = ((z ^ (z >> 30)) * MIX_1) & MASK64
    z = ((z ^ (z >> 27)) * MIX_2) & MASK64
    return z ^ (z >> 31)


def mix64_array(z):
    """mix64 elementwise on a numpy uint64 array (which wraps mod 2^64, as C's uint64 does)."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(MIX_1)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(MIX_2)
    return z ^ (z >> np.uint64(31))


def hashes(key, n):
    """mix(key + (i + 1) * GOLDEN) for the elements i = 0..n-1 of a mask, (n,) uint64: the numpy twin
    of the kernels' hash. Element i is kept iff hashes(key, n)[i] >= threshold(p)."""
    index = np.arange(1, n + 1, dtype=np.uint64)
    with np.errstate(over="ignore"):
        return mix64_array(np.uint64(key) + index * np.uint64(GOLDEN))


def threshold(p):
    """floor(p * 2^64): an element whose hash is below this is dropped (0 for p = 0: none is)."""
    return int(p * 2.0 ** 64)


def scale(p):
    """What a kept element is multiplied by: 1 / (1 - p)."""
    return 1.0 / (1.0 - p)


def check_probability(p):
    """p as a float, if it is a dropout probability in [0, 1); ValueError otherwise."""
    if isinstance(p, bool) or not isinstance(p, (int, float, np.floating, np.integer)) or not 0 <= p < 1:
        raise ValueError(f"dropout must be a probability in [0, 1), got {p!r}")
    return float(p)


@dataclass(frozen=True)
class Dropout:
    """The dropout of one training forward pass: GPT.forward(idx, targets, dropout=Dropout(...)).

        Dropout(p=0.1, seed=1337, counter=step * grad_accum + micro_batch)

    Two forwards with the same (seed, counter) drop the same elements; a new counter draws new masks."""
    p: float          # the probability of dropping each activation, in [0, 1)
    seed: int         # the run's seed
    counter: int      # which forward pass of the run this is

    def __post_init__(self):
        check_probability(self.p)
        for name in ("seed", "counter"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 0 <= value <= MASK64:
                raise ValueError(f"Dropout.{name} must be an integer in [0, 2^64), got {value!r}")

    def key(self, layer, site):
        """The 64-bit key of one site's mask: mix chained over (seed, counter, layer, site)."""
        key = 0
        for word in (int(self.seed), int(self.counter), layer, site):
            key = mix64(((key ^ word) + GOLDEN) & MASK64)
        return key
