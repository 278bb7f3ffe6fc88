"""gptcore.model: the GPT-2 transformer, its forward pass, and its backward pass written out by hand.

WHAT'S GOING ON HERE
====================

WHAT
  GPT-2, exactly: token embedding + learned position embedding, n_layer pre-norm blocks, a final
  LayerNorm, and an LM head that reuses the token embedding (tied weights):

      x = wte[idx] + wpe[t]                                   (B, T, C)   the residual stream
      for each block:
          x = x + attn(ln_1(x))                               causal multi-head self-attention
          x = x + mlp(ln_2(x))                                C -> 4C, GELU, 4C -> C
      logits = ln_f(x) @ wte^T                                (B, T, V)
      loss = mean cross-entropy of logits against targets

  The backward pass runs the same pieces in reverse. There is no autograd: each piece has a
  `backward` right next to its `forward`, reading what that forward saved in its cache, and the
  derivation of every gradient sits in the comment above it (the kernels' own math is in
  gptcore/_kernels.pyx). Letters: B batch, T time, C = n_embd, NH = n_head, hs = C / NH, V vocab,
  N = B * T rows.

WHERE
  gptcore.train calls forward, backward and the optimizer (gptcore.optim) once per step; generation
  calls the same forward with a KV cache. Every number is computed by the compiled kernels (called
  through gptcore.unchecked) or, with backend="reference" (or GPTCORE_BACKEND=reference), by
  gptcore.reference, the pure-Python twins: slow, but it lets the tests check this file's gradient
  plumbing independently of the compiled code.

HOW (memory)
  Parameters live in one flat float32 array and gradients in another of the same layout;
  `model.params` and the dict `backward()` returns are named views into them, with GPT-2's checkpoint
  names and shapes (weights stored (in, out) as GPT-2's Conv1D does). Writing into a view (in place)
  changes what the next forward uses. Activations are allocated once for each (B, T) and reused on
  every step, so a training step allocates no activation buffers; what the model still allocates is
  the kernels' scratch (such as the matmul's packed panels) and the copy of the logits forward returns.

  Gradients are accumulated (+=), as in llm.c: backward() zeroes the parameter gradients first unless
  asked to accumulate (gradient accumulation over micro-batches), and each activation gradient buffer
  is zeroed right before the backward of its layer adds into it.

COST
  A forward is ~2 * (parameters) flops per token in the matmuls, plus attention (~2 * T * C per
  token per layer, twice); the backward is twice that, because every matmul has two gradient
  products (d_inp and d_weight) for its one forward product.
"""
import math
import os
from dataclasses import dataclass

import numpy as np

from gptcore import reference, unchecked

# The model builds every array it passes to a kernel, so it calls the compiled kernels through
# gptcore.unchecked (gptcore.kernels' signatures without its per-call checks, which would cost more
# than the work when generating one token); what comes from outside is checked in GPT.forward.
BACKENDS = {"compiled": unchecked, "reference": reference}


# ----------------------------------------------------------------------------------------------------
# Configuration and parameters
# ----------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int     # V: how many distinct tokens
    block_size: int     # the longest sequence (context) the model sees; wpe has this many rows
    n_layer: int        # transformer blocks
    n_head: int         # NH: attention heads per block
    n_embd: int         # C: channels of the residual stream

    def __post_init__(self):
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "n_embd"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
                raise ValueError(f"GPTConfig.{name} must be a positive integer, got {value!r}")
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             f"(each head gets n_embd / n_head channels)")


def parameter_shapes(config):
    """The one ordered list of (name, shape) every parameter table in gptcore is built from."""
    V, C, L = config.vocab_size, config.n_embd, config.n_layer
    shapes = [("wte.weight", (V, C)), ("wpe.weight", (config.block_size, C))]
    for i in range(L):
        shapes += [
            (f"h.{i}.ln_1.weight", (C,)), (f"h.{i}.ln_1.bias", (C,)),
            (f"h.{i}.attn.c_attn.weight", (C, 3 * C)), (f"h.{i}.attn.c_attn.bias", (3 * C,)),
            (f"h.{i}.attn.c_proj.weight", (C, C)), (f"h.{i}.attn.c_proj.bias", (C,)),
            (f"h.{i}.ln_2.weight", (C,)), (f"h.{i}.ln_2.bias", (C,)),
            (f"h.{i}.mlp.c_fc.weight", (C, 4 * C)), (f"h.{i}.mlp.c_fc.bias", (4 * C,)),
            (f"h.{i}.mlp.c_proj.weight", (4 * C, C)), (f"h.{i}.mlp.c_proj.bias", (C,)),
        ]
    shapes += [("ln_f.weight", (C,)), ("ln_f.bias", (C,))]
    return shapes


def views_of(flat, shapes):
    """Named views, in order, into one flat array: {name: flat[offset:offset + size].reshape(shape)}."""
    views, offset = {}, 0
    for name, shape in shapes:
        size = math.prod(shape)
        views[name] = flat[offset:offset + size].reshape(shape)
        offset += size
    return views


def init_parameters(params, config, seed):
    """GPT-2's initialisation, in place: weights ~ normal(0, 0.02), biases 0, LayerNorm weight 1, and
    the two projections that write into the residual stream (attn.c_proj, mlp.c_proj) scaled down by
    1/sqrt(2 * n_layer), so the stream's variance does not grow with depth (2 adds per block)."""
    rng = np.random.default_rng(seed)
    for name, value in params.items():
        if name.endswith("bias"):
            value[...] = 0.0
        elif ".ln_" in name or name.startswith("ln_f"):
            value[...] = 1.0
        else:
            std = 0.02
            if name.endswith("c_proj.weight"):
                std = 0.02 / math.sqrt(2 * config.n_layer)
            value[...] = rng.normal(0.0, std, value.shape).astype(np.float32)


# ----------------------------------------------------------------------------------------------------
# Caches: what each forward saves for its backward (allocated once per (B, T))
# ----------------------------------------------------------------------------------------------------

@dataclass
class LayerNormCache:
    out: np.ndarray     # (N, C) the normalised, scaled, shifted rows
    mean: np.ndarray    # (N,)
    rstd: np.ndarray    # (N,) 1 / sqrt(var + eps)

    @staticmethod
    def allocate(N, C):
        return LayerNormCache(np.empty((N, C), np.float32), np.empty(N, np.float32),
                              np.empty(N, np.float32))


@dataclass
class BlockCache:
    x: np.ndarray          # (B, T, C)  the block's input (the residual stream)
    ln_1: LayerNormCache   # ln_1(x), (N, C)
    qkv: np.ndarray        # (B, T, 3C) ln_1(x) @ c_attn + bias: queries, keys, values side by side
    att: np.ndarray        # (B, NH, T, T) attention weights, 0 above the diagonal
    atty: np.ndarray       # (B, T, C)  attention output, heads side by side, before c_proj
    attproj: np.ndarray    # (B, T, C)  atty @ attn.c_proj + bias
    x_mid: np.ndarray      # (B, T, C)  x + attproj, the stream between the two halves
    ln_2: LayerNormCache   # ln_2(x_mid), (N, C)
    fc: np.ndarray         # (B, T, 4C) ln_2 @ c_fc + bias
    fc_gelu: np.ndarray    # (B, T, 4C) gelu(fc)
    fcproj: np.ndarray     # (B, T, C)  fc_gelu @ mlp.c_proj + bias

    @staticmethod
    def allocate(B, T, C, NH):
        empty = lambda *shape: np.empty(shape, np.float32)
        N = B * T
        return BlockCache(x=empty(B, T, C), ln_1=LayerNormCache.allocate(N, C), qkv=empty(B, T, 3 * C),
                          att=empty(B, NH, T, T), atty=empty(B, T, C), attproj=empty(B, T, C),
                          x_mid=empty(B, T, C), ln_2=LayerNormCache.allocate(N, C),
                          fc=empty(B, T, 4 * C), fc_gelu=empty(B, T, 4 * C), fcproj=empty(B, T, C))


@dataclass
class BlockGrads:
    """Gradient buffers for one block's activations. Blocks run backward one at a time, so all
    blocks share one set; it is zeroed (one memset) before each block's backward adds into it."""
    flat: np.ndarray       # every buffer below is a view into this one array
    d_fc_gelu: np.ndarray  # (N, 4C)
    d_fc: np.ndarray       # (N, 4C)
    d_ln_2: np.ndarray     # (N, C)
    d_atty: np.ndarray     # (B, T, C)
    d_qkv: np.ndarray      # (B, T, 3C)
    d_ln_1: np.ndarray     # (N, C)

    @staticmethod
    def allocate(B, T, C):
        N = B * T
        shapes = [("d_fc_gelu", (N, 4 * C)), ("d_fc", (N, 4 * C)), ("d_ln_2", (N, C)),
                  ("d_atty", (B, T, C)), ("d_qkv", (B, T, 3 * C)), ("d_ln_1", (N, C))]
        flat = np.zeros(sum(math.prod(shape) for _, shape in shapes), np.float32)
        return BlockGrads(flat=flat, **views_of(flat, shapes))


@dataclass
class KVCache:
    """Generation state: every layer's q, k, v rows for the positions seen so far. Keys and values of
    earlier positions never change (no position looks forward), so a new token needs only its own
    row computed. Make one with GPT.new_kv_cache()."""
    qkv: list           # n_layer arrays (B, block_size, 3C); rows [0, length) are filled
    length: int = 0     # positions cached so far


@dataclass
class ModelCache:
    B: int
    T: int
    idx: np.ndarray            # (B, T) int64 token ids
    targets: np.ndarray        # (B, T) int64, or None
    blocks: list               # n_layer BlockCaches
    x_final: np.ndarray        # (B, T, C) the residual stream after the last block
    ln_f: LayerNormCache       # (N, C)
    logits: np.ndarray         # (B, T, V)
    probs: np.ndarray          # (B, T, V) softmax(logits), kept for the loss's backward
    d_stream: np.ndarray       # (B, T, C) gradient of the residual stream, updated in place
    d_logits: np.ndarray       # (B, T, V)
    d_ln_f: np.ndarray         # (N, C)
    d_head_bias: np.ndarray    # (V,) the LM head has no bias; the kernel computes one and we drop it
    block_grads: BlockGrads


# ----------------------------------------------------------------------------------------------------
# The pieces: each forward next to its backward
# ----------------------------------------------------------------------------------------------------

class LayerNorm:
    """out = (x - mean) / sqrt(var + 1e-5) * weight + bias over the C channels of each row."""

    def __init__(self, k, params, grads, prefix):
        self.k = k
        self.weight, self.bias = params[prefix + ".weight"], params[prefix + ".bias"]
        self.d_weight, self.d_bias = grads[prefix + ".weight"], grads[prefix + ".bias"]

    def forward(self, x, cache):                          # (N, C) -> (N, C), cache filled
        self.k.layernorm_forward(x, self.weight, self.bias, out=cache.out, mean=cache.mean, rstd=cache.rstd)
        return cache.out

    def backward(self, d_out, x, cache, d_x):             # (N, C) -> d_x (N, C) +=, param grads +=
        # With xhat = (x - mean) * rstd: d_bias += sum over rows of d_out, d_weight += sum of
        # d_out * xhat, and d_x += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = d_out * weight.
        # The last term is there because x moves its own mean and variance (_kernels.pyx derives it).
        self.k.layernorm_backward(d_out, x, self.weight, cache.mean, cache.rstd,
                                  d_x=d_x, d_weight=self.d_weight, d_bias=self.d_bias)


class Linear:
    """out = inp @ weight + bias, weight stored (in, out) as in GPT-2's checkpoints."""

    def __init__(self, k, params, grads, prefix):
        self.k = k
        self.weight, self.bias = params[prefix + ".weight"], params[prefix + ".bias"]
        self.d_weight, self.d_bias = grads[prefix + ".weight"], grads[prefix + ".bias"]

    def forward(self, inp, out):                          # (N, in) -> (N, out)
        return self.k.matmul_forward(inp, self.weight, self.bias, out=out)

    def backward(self, d_out, inp, d_inp):                # (N, out) -> d_inp (N, in) +=
        # out = inp @ W + b, so d_inp += d_out @ W^T, d_W += inp^T @ d_out, d_b += sum of d_out rows
        self.k.matmul_backward(d_out, inp, self.weight, d_inp=d_inp, d_weight=self.d_weight,
                               d_bias=self.d_bias)


class Block:
    """Pre-norm transformer block: x_mid = x + attn(ln_1(x)); out = x_mid + mlp(ln_2(x_mid))."""

    def __init__(self, k, params, grads, i, n_head):
        self.k, self.n_head = k, n_head
        self.ln_1 = LayerNorm(k, params, grads, f"h.{i}.ln_1")
        self.c_attn = Linear(k, params, grads, f"h.{i}.attn.c_attn")
        self.attn_proj = Linear(k, params, grads, f"h.{i}.attn.c_proj")
        self.ln_2 = LayerNorm(k, params, grads, f"h.{i}.ln_2")
        self.c_fc = Linear(k, params, grads, f"h.{i}.mlp.c_fc")
        self.mlp_proj = Linear(k, params, grads, f"h.{i}.mlp.c_proj")

    def forward(self, c, out, kv_qkv=None, start=0):      # c.x (B, T, C) -> out (B, T, C); fills c
        """kv_qkv: with a KV cache, this layer's cached qkv rows (B, block_size, 3C); c.x then holds the
        new positions [start, start + T) only."""
        B, T, C = c.x.shape
        N = B * T
        # attention half: x_mid = x + c_proj(attention(c_attn(ln_1(x))))
        h = self.ln_1.forward(c.x.reshape(N, C), c.ln_1)                          # (N, C)
        self.c_attn.forward(h, c.qkv.reshape(N, 3 * C))                           # (N, 3C)
        if kv_qkv is None:
            self.k.attention_forward(c.qkv, self.n_head, out=c.atty, att=c.att)  # (B, T, C)
        else:
            # generation: append the new rows to the cache, attend from them to every cached position
            kv_qkv[:, start:start + T] = c.qkv
            self.k.attention_forward_cached(kv_qkv, start, start + T, self.n_head, out=c.atty)
        self.attn_proj.forward(c.atty.reshape(N, C), c.attproj.reshape(N, C))    # (N, C)
        self.k.residual_forward(c.x, c.attproj, out=c.x_mid)                     # (B, T, C)
        # MLP half: out = x_mid + c_proj(gelu(c_fc(ln_2(x_mid))))
        h = self.ln_2.forward(c.x_mid.reshape(N, C), c.ln_2)                      # (N, C)
        self.c_fc.forward(h, c.fc.reshape(N, 4 * C))                              # (N, 4C)
        self.k.gelu_forward(c.fc, out=c.fc_gelu)                                  # (N, 4C)
        self.mlp_proj.forward(c.fc_gelu.reshape(N, 4 * C), c.fcproj.reshape(N, C))  # (N, C)
        return self.k.residual_forward(c.x_mid, c.fcproj, out=out)

    def backward(self, d_stream, c, g):                   # d_stream (B, T, C) updated in place
        # The forward read top to bottom; we go bottom to top. On entry d_stream holds dL/d out.
        # A residual y = x + f(x) sends d_y down both paths: unchanged to x, and through f. We keep
        # the stream's gradient in one buffer, let f's backward *add* into it, and so it becomes dL/dx
        # without any copy: that is the whole backward of residual_forward.
        B, T, C = d_stream.shape
        N = B * T
        d_out = d_stream.reshape(N, C)
        g.flat.fill(0.0)
        # MLP half, in the forward: out = x_mid + fcproj, fcproj = mlp_proj(gelu(fc)), fc = c_fc(ln_2(x_mid))
        self.mlp_proj.backward(d_out, c.fc_gelu.reshape(N, 4 * C), g.d_fc_gelu)         # (N, 4C)
        self.k.gelu_backward(g.d_fc_gelu, c.fc.reshape(N, 4 * C), d_x=g.d_fc)           # (N, 4C)
        self.c_fc.backward(g.d_fc, c.ln_2.out, g.d_ln_2)                                # (N, C)
        self.ln_2.backward(g.d_ln_2, c.x_mid.reshape(N, C), c.ln_2, d_out)  # d_stream = dL/d x_mid
        # attention half, in the forward: x_mid = x + attproj, attproj = attn_proj(attention(c_attn(ln_1(x))))
        self.attn_proj.backward(d_out, c.atty.reshape(N, C), g.d_atty.reshape(N, C))   # (B, T, C)
        self.k.attention_backward(g.d_atty, c.qkv, c.att, self.n_head, d_qkv=g.d_qkv)  # (B, T, 3C)
        self.c_attn.backward(g.d_qkv.reshape(N, 3 * C), c.ln_1.out, g.d_ln_1)           # (N, C)
        self.ln_1.backward(g.d_ln_1, c.x.reshape(N, C), c.ln_1, d_out)      # d_stream = dL/d x


# ----------------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------------

class GPT:
    """GPT-2. `forward(idx, targets)` -> (logits, loss); `backward()` -> gradients by parameter name.

        model = GPT(GPTConfig(vocab_size=65, block_size=64, n_layer=4, n_head=4, n_embd=128), seed=0)
        logits, loss = model.forward(idx, targets)     # idx, targets: int arrays (B, T), T <= block_size
        grads = model.backward()                       # same keys and shapes as model.params
    """

    def __init__(self, config, seed=0, backend=None):
        if not isinstance(config, GPTConfig):
            raise TypeError(f"config must be a GPTConfig, got {type(config).__name__}")
        backend = backend or os.environ.get("GPTCORE_BACKEND", "compiled")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.config, self.backend, self.k = config, backend, BACKENDS[backend]
        shapes = parameter_shapes(config)
        size = sum(math.prod(shape) for _, shape in shapes)
        self.flat_params = np.zeros(size, np.float32)
        self.flat_grads = np.zeros(size, np.float32)
        self.params = views_of(self.flat_params, shapes)      # name -> view, GPT-2's names and shapes
        self.grads = views_of(self.flat_grads, shapes)
        init_parameters(self.params, config, seed)
        self.blocks = [Block(self.k, self.params, self.grads, i, config.n_head) for i in range(config.n_layer)]
        self.ln_f = LayerNorm(self.k, self.params, self.grads, "ln_f")
        self._caches = {}           # (B, T) -> ModelCache, for the last few shapes seen
        self._cache = None          # the ModelCache of the last forward
        self._ready_for_backward = False

    @property
    def activations(self):
        """The ModelCache of the last forward: every intermediate array, for inspection (see
        python/follow_the_data_flow.py). Overwritten by the next forward of the same shape."""
        return self._cache

    @property
    def num_parameters(self):
        return self.flat_params.size

    def _cache_for(self, B, T):
        """The activation buffers for a batch of (B, T), allocated on first use of that shape. We keep
        the last few shapes (training batches, a generation prompt, single generated tokens)."""
        if (B, T) in self._caches:
            return self._caches[(B, T)]
        if len(self._caches) >= 4:
            del self._caches[next(iter(self._caches))]       # the oldest shape
        cfg = self.config
        C, V, NH, N = cfg.n_embd, cfg.vocab_size, cfg.n_head, B * T
        empty = lambda *shape: np.empty(shape, np.float32)
        self._caches[(B, T)] = ModelCache(
            B=B, T=T, idx=None, targets=None,
            blocks=[BlockCache.allocate(B, T, C, NH) for _ in range(cfg.n_layer)],
            x_final=empty(B, T, C), ln_f=LayerNormCache.allocate(N, C), logits=empty(B, T, V),
            probs=empty(B, T, V), d_stream=empty(B, T, C), d_logits=empty(B, T, V), d_ln_f=empty(N, C),
            d_head_bias=empty(V), block_grads=BlockGrads.allocate(B, T, C))
        return self._caches[(B, T)]

    def new_kv_cache(self, batch_size=1):
        """An empty KV cache for generating batch_size sequences with forward(idx, kv_cache=...)."""
        shape = (batch_size, self.config.block_size, 3 * self.config.n_embd)
        return KVCache(qkv=[np.zeros(shape, np.float32) for _ in range(self.config.n_layer)])

    def _check_tokens(self, name, tokens):
        if not isinstance(tokens, np.ndarray):
            raise TypeError(f"{name} must be a numpy array of token ids, got {type(tokens).__name__}")
        if not np.issubdtype(tokens.dtype, np.integer):
            raise TypeError(f"{name} must have an integer dtype, got {tokens.dtype}")
        if tokens.ndim != 2 or tokens.size == 0:
            raise ValueError(f"{name} must have shape (B, T) with B, T >= 1, got {tokens.shape}")
        if tokens.shape[1] > self.config.block_size:
            raise ValueError(f"{name} has T={tokens.shape[1]} positions, more than "
                             f"block_size={self.config.block_size}")
        low, high = int(tokens.min()), int(tokens.max())
        if low < 0 or high >= self.config.vocab_size:
            raise ValueError(f"{name} holds token id {low if low < 0 else high}, outside "
                             f"[0, vocab_size={self.config.vocab_size})")
        return np.ascontiguousarray(tokens, dtype=np.int64)

    def forward(self, idx, targets=None, kv_cache=None):
        """idx (B, T) token ids -> (logits (B, T, V), mean cross-entropy loss or None without targets).
        logits is a new array; the activations behind it stay cached for backward().

        With kv_cache (from new_kv_cache), idx holds the *next* T tokens of each sequence, at
        positions kv_cache.length onwards; their keys and values are appended to the cache. This is
        the same forward, computing only the new positions (generation; there is no backward)."""
        idx = self._check_tokens("idx", idx)
        if targets is not None:
            targets = self._check_tokens("targets", targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the same shape as idx {idx.shape}, got {targets.shape}")
        B, T = idx.shape
        C, k = self.config.n_embd, self.k
        start = 0
        if kv_cache is not None:
            start = kv_cache.length
            if kv_cache.qkv[0].shape[0] != B:
                raise ValueError(f"idx has batch size {B} but the KV cache holds {kv_cache.qkv[0].shape[0]}")
            if start + T > self.config.block_size:
                raise ValueError(f"the KV cache holds {start} positions; {T} more would pass "
                                 f"block_size={self.config.block_size}")
        cache = self._cache = self._cache_for(B, T)
        cache.idx, cache.targets = idx, targets
        # token + position embedding: x[b, t] = wte[idx[b, t]] + wpe[start + t]        (B, T, C)
        # Each block reads its input from its cache's x and writes its output straight into the
        # next block's x (the last one into x_final), so the residual stream is never copied.
        k.embedding_forward(idx, self.params["wte.weight"], self.params["wpe.weight"][start:],
                            out=cache.blocks[0].x)
        for i, block in enumerate(self.blocks):
            block.forward(cache.blocks[i], cache.blocks[i + 1].x if i + 1 < len(self.blocks) else cache.x_final,
                          kv_qkv=None if kv_cache is None else kv_cache.qkv[i], start=start)
        if kv_cache is not None:
            kv_cache.length += T
        # final LayerNorm, then the LM head with the tied embedding: logits = ln_f(x) @ wte^T (N, V)
        h = self.ln_f.forward(cache.x_final.reshape(B * T, C), cache.ln_f)
        k.matmul_forward(h, self.params["wte.weight"], out=cache.logits.reshape(B * T, -1),
                         weight_transposed=True)
        loss = None
        if targets is not None:
            loss, _ = k.cross_entropy_forward(cache.logits, targets, probs=cache.probs)
        self._ready_for_backward = targets is not None and kv_cache is None
        return cache.logits.copy(), loss

    def backward(self, accumulate=False, loss_scale=1.0):
        """Gradients of the last forward's loss, by parameter name (views into self.flat_grads).

        accumulate=False zeroes the gradients first; accumulate=True adds to them, for gradient
        accumulation over micro-batches. The gradient computed is that of loss_scale * loss (use
        1 / number_of_micro_batches so that the sum is the gradient of the mean)."""
        if not self._ready_for_backward:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        self._ready_for_backward = False      # the caches will be overwritten by the next forward
        cache, k, C = self._cache, self.k, self.config.n_embd
        B, T, N = cache.B, cache.T, cache.B * cache.T
        if not accumulate:
            self.flat_grads.fill(0.0)
        # loss = mean_n -log softmax(logits_n)[target_n]  ->  d_logits = (probs - onehot) / N
        cache.d_logits.fill(0.0)
        k.cross_entropy_backward(cache.probs, cache.targets, d_logits=cache.d_logits, d_loss=loss_scale)
        # logits = ln_f_out @ wte^T  ->  d_ln_f = d_logits @ wte, d_wte += d_logits^T @ ln_f_out
        # (wte also gets the embedding's gradient below: the tied weight collects both)
        cache.d_ln_f.fill(0.0)
        k.matmul_backward(cache.d_logits.reshape(N, -1), cache.ln_f.out, self.params["wte.weight"],
                          d_inp=cache.d_ln_f, d_weight=self.grads["wte.weight"], d_bias=cache.d_head_bias,
                          weight_transposed=True)
        cache.d_stream.fill(0.0)
        self.ln_f.backward(cache.d_ln_f, cache.x_final.reshape(N, C), cache.ln_f, cache.d_stream.reshape(N, C))
        for block, block_cache in zip(reversed(self.blocks), reversed(cache.blocks)):
            block.backward(cache.d_stream, block_cache, cache.block_grads)
        # x = wte[idx] + wpe[t]  ->  d_wte[idx[b, t]] += d_x[b, t], d_wpe[t] += d_x[b, t]
        k.embedding_backward(cache.d_stream, cache.idx, self.config.vocab_size, self.config.block_size,
                             d_wte=self.grads["wte.weight"], d_wpe=self.grads["wpe.weight"])
        return self.grads
