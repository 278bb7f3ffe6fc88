"""gptcore.sample: generating text, one token at a time, with a KV cache.

WHAT'S GOING ON HERE
====================

WHAT
  A language model gives, for every position, a distribution over the next token. To generate, we run
  the prompt through the model, take the distribution after its last token, draw a token from it,
  append it, and repeat. Three knobs shape the draw (applied in this order, as Hugging Face does):
    temperature  divide the logits by T before the softmax: T < 1 sharpens, T > 1 flattens, and
                 T = 0 means always take the most likely token (greedy), and so does a T so small
                 that logits / T overflows (1e-320): that is the limit T -> 0, where every token
                 but the most likely gets probability 0, and dividing by it would give inf - inf =
                 NaN probabilities instead
    top_k        keep only the k most likely tokens
    top_p        keep the smallest set of most likely tokens whose probabilities add up to p
  The draw uses numpy's Generator seeded by `seed`, so the same seed gives the same text (`seed` may
  also be a Generator, which generation then draws from and advances: several samples in a row).

THE KV CACHE
  Without a cache, every new token reruns the model over the whole context: O(T) positions per token.
  But the keys and values of earlier positions never change (the causal mask means no position looks
  at a later one), so GPT.forward_cached(idx, kv_cache) keeps them, and each new token costs one
  position's work. use_kv_cache=False runs the plain way, for comparison: both see exactly the same
  contexts and compute the same logits up to the last bits of rounding (the cached path takes its
  dot products in another order), so with the same seed they produce the same tokens unless a draw
  lands within that rounding of a boundary between two tokens (tests/test_cli.py checks they agree).

THE WINDOW
  The model has block_size positions (wpe has that many rows). A prompt longer than that keeps its
  last block_size tokens. When generation fills the window, we slide it: keep the last block_size / 2
  tokens and continue from there (with the cache, by recomputing those positions once). Sliding by
  one token at a time, as nanoGPT's sampler does, would change every cached position's embedding
  and force a full recomputation per token, which is exactly what the cache exists to avoid.
"""
import numpy as np

from gptcore.errors import GptcoreError


def check_sampling(temperature, top_k, top_p, max_new_tokens):
    """Raise GptcoreError for settings that mean nothing."""
    if not (temperature >= 0 and np.isfinite(temperature)):
        raise GptcoreError(f"temperature must be a finite number >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise GptcoreError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise GptcoreError(f"top_p must be in (0, 1], got {top_p}")
    if max_new_tokens < 0:
        raise GptcoreError(f"max_new_tokens must be >= 0, got {max_new_tokens}")


def next_token(logits, rng, temperature=1.0, top_k=None, top_p=None):
    """Draw one token id from the logits (V,) of the next position."""
    if temperature == 0:
        return int(np.argmax(logits))
    with np.errstate(over="ignore"):
        z = logits.astype(np.float64) / temperature
    if not np.isfinite(z).all():          # T too small to divide by: the T -> 0 limit, greedy
        return int(np.argmax(logits))
    if top_k is not None and top_k < z.size:
        kth_largest = np.partition(z, -top_k)[-top_k]
        z = np.where(z < kth_largest, -np.inf, z)
    probs = np.exp(z - z.max())
    probs /= probs.sum()
    if top_p is not None and top_p < 1:
        order = np.argsort(-probs, kind="stable")
        cumulative = np.cumsum(probs[order])
        # keep a token if the tokens more likely than it add up to less than top_p
        keep = order[cumulative - probs[order] < top_p]
        kept = np.zeros_like(probs)
        kept[keep] = probs[keep]
        probs = kept / kept.sum()
    # one uniform draw, inverted through the cumulative distribution: the same seed, the same token
    return int(min(np.searchsorted(np.cumsum(probs), rng.random() * probs.sum(), side="right"),
                   probs.size - 1))


def _window_start(n_tokens, start, block_size):
    """Where the window tokens[start:] of n_tokens tokens starts for the next forward: the same start
    while it holds at most block_size tokens; once full, its second half (THE WINDOW, above)."""
    return start if n_tokens - start <= block_size else n_tokens - block_size // 2


def context_lengths(prompt_length, max_new_tokens, block_size):
    """The positions the model sees when generate() draws each of max_new_tokens tokens after a
    prompt of prompt_length: the window's length, the token drawn from its last position.
    context_lengths(3, 4, 4) -> [3, 4, 2, 3] (the full window of 4 slides to its last 2 tokens)."""
    n_tokens, start, lengths = prompt_length, max(0, prompt_length - block_size), []
    for _ in range(max_new_tokens):
        start = _window_start(n_tokens, start, block_size)
        lengths.append(n_tokens - start)
        n_tokens += 1
    return lengths


def generate(model, prompt_ids, max_new_tokens, temperature=1.0, top_k=None, top_p=None, seed=None,
             use_kv_cache=True):
    """Yield max_new_tokens new token ids, one at a time, continuing prompt_ids (a non-empty list)."""
    check_sampling(temperature, top_k, top_p, max_new_tokens)
    if len(prompt_ids) == 0:
        raise GptcoreError("the prompt must hold at least one token")
    block_size = model.config.block_size
    rng = np.random.default_rng(seed)
    tokens = list(prompt_ids)
    start = max(0, len(tokens) - block_size)      # the window is tokens[start:]
    cache, cached_until = None, None              # cached_until: tokens[start:cached_until] are in the cache
    for _ in range(max_new_tokens):
        if _window_start(len(tokens), start, block_size) != start:     # the window slid
            start = _window_start(len(tokens), start, block_size)
            cache = None
        if use_kv_cache:
            if cache is None:
                cache, cached_until = model.new_kv_cache(1), start
            new = np.asarray([tokens[cached_until:]], dtype=np.int64)
            logits = model.forward_cached(new, cache)
            cached_until = len(tokens)
        else:
            logits, _ = model.forward(np.asarray([tokens[start:]], dtype=np.int64))
        token = next_token(logits[0, -1], rng, temperature, top_k, top_p)
        tokens.append(token)
        yield token
