"""gptcore.model: the GPT-2 transformer, its forward pass, and its backward pass written out by hand.

WHAT'S GOING ON HERE
====================

WHAT
  GPT-2, exactly: token embedding + learned position embedding, n_layer pre-norm blocks, a final
  LayerNorm, and an LM head that reuses the token embedding (tied weights):

      x = wte[idx] + wpe[t]                                   (B, T, C)   the residual stream
      for each block:
          x = x + attn(ln_1(x))                               CausalSelfAttention
          x = x + mlp(ln_2(x))                                MLP: C -> 4C, GELU, 4C -> C
      logits = ln_f(x) @ wte^T                                (B, T, V)
      loss = mean cross-entropy of logits against targets     (computed HEAD_CHUNK_ROWS rows at a time)

  A training forward may also drop out (gptcore.dropout) the embeddings, the attention weights and
  each block's two residual branches, as GPT-2 was trained; evaluation and generation never do.

  The classes are the ones nanoGPT's model.py has (LayerNorm, CausalSelfAttention, MLP, Block, GPT,
  plus Linear), and each has its `backward` right next to its `forward`: there is no autograd. A
  backward reads what its forward saved in a cache, and the derivation of every gradient sits in the
  comment above it (the kernels' own math is in gptcore/_kernels.pyx and gptcore/reference.py).
  Letters: B batch, T time, C = n_embd, NH = n_head, hs = C / NH head size, V vocab, N = B * T rows.

WHERE
  gptcore.train calls forward, backward and the optimizer (gptcore.optim) once per step; generation
  (gptcore.sample) calls forward_cached, the same layers with a KV cache. Every number is computed by
  the kernel module of the model's backend (gptcore.backends): gptcore.compiled, the compiled kernels
  with no per-call checks, or, with backend="reference" (or GPTCORE_BACKEND=reference), gptcore.reference,
  the pure-Python twins: slow, but it lets the tests check this file's gradient plumbing independently
  of the compiled code. The model builds every array it hands a kernel itself, with shapes that follow
  from its config, so the only checks it needs are on what comes from outside: the token ids and
  targets, once per forward (checked kernels would cost more than the work when generating a token).
  The one arithmetic outside the kernels is backward's loss_scale applied to the LM head's gradient
  (two float32 multiplies and an add, in numpy, the same on either backend).

HOW (memory)
  Parameters live in one flat float32 array and gradients in another of the same layout;
  `model.params` and `model.grads` are named views into them, with GPT-2's checkpoint names and shapes
  (weights stored (in, out) as GPT-2's Conv1D does). Writing into a view (in place) changes what the
  next forward uses. Activations are allocated once for each (B, T) and reused on every step, all in
  one shape convention, (B, T, ...); the kernels flatten the leading (B, T) themselves. The residual
  stream between blocks is one array per boundary: block i's `out` *is* block i+1's `x`, so the stream
  is never copied; the MLP writes straight into the block's output, which then gets the residual
  added in place. What a block's backward can recompute in one elementwise pass, the blocks share
  instead of keeping: one array for every LayerNorm output of the blocks and one for every gelu
  (BlockCache says which).

  The LM head never holds a (B, T, V) array (823 MB per array for GPT-2 at B 4, T 1024): with targets,
  forward takes HEAD_CHUNK_ROWS positions at a time through logits, softmax, loss and, when a
  backward is to follow, the gradient: d_logits of the chunk, then its rows of d_ln_f and its share
  of d_wte, as llm.c fuses its classifier. So the head's backward is done by the time backward()
  starts, which applies loss_scale to it and goes on down the blocks. Training never needs the
  logits; a forward without targets returns those of every position.
  Attention keeps two numbers per query row (its softmax's max and sum), not its (B, NH, T, T)
  weights, and the backward recomputes the weights from them (CausalSelfAttention).

  Gradients are accumulated (+=), as in llm.c: backward() zeroes the parameter gradients first unless
  asked to accumulate (gradient accumulation over micro-batches), but for wte's, which it sets to the
  LM head's share instead of zeroing it and adding that; the activation gradient buffers are zeroed
  right before the backward of the layer that adds into them. Nothing a kernel overwrites is zeroed.

COST
  A forward is ~2 * (parameters) flops per token in the matmuls, plus attention (~2 * T * C per
  token per layer, twice); the backward is twice that, because every matmul has two gradient
  products (d_inp and d_weight) for its one forward product. GPT.flops_per_token counts it exactly
  as MFU does; GPT.generation_bytes_per_token counts what a generated token reads.
"""
import math
from dataclasses import dataclass

import numpy as np

from gptcore import backends, dropout as dropout_sites, validate


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
            validate.positive_int(f"GPTConfig.{name}", getattr(self, name))
        if self.n_embd % self.n_head != 0:
            raise ValueError(f"n_embd={self.n_embd} must be divisible by n_head={self.n_head} "
                             f"(each head gets n_embd / n_head channels)")


def parameter_shapes(config):
    """The one ordered list of (name, shape) every parameter table in gptcore is built from. wte.weight
    comes first: GPT.backward zeroes the gradients after it as one slice of the flat array."""
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
# Caches: what each forward saves for its backward (allocated once per (B, T), all (B, T, ...))
# ----------------------------------------------------------------------------------------------------

def _empty(*shape):
    return np.empty(shape, np.float32)


@dataclass
class LayerNormCache:
    out: np.ndarray     # (B, T, C) the normalised, scaled, shifted rows
    mean: np.ndarray    # (B, T)
    rstd: np.ndarray    # (B, T) 1 / sqrt(var + eps)

    @staticmethod
    def allocate(B, T, C, out=None):
        """out: an array (B, T, C) to write into (shared by the blocks' LayerNorms, see BlockCache)."""
        return LayerNormCache(out=_empty(B, T, C) if out is None else out, mean=_empty(B, T), rstd=_empty(B, T))


@dataclass
class AttentionCache:
    qkv: np.ndarray      # (B, T, 3C) x @ c_attn + bias: queries, keys, values side by side
    row_max: np.ndarray  # (B, NH, T) each query row's largest score (the softmax's m)
    row_sum: np.ndarray  # (B, NH, T) each query row's sum of exp(score - m) (the softmax's Z); with
                         # row_max, all the backward needs to recompute the (B, NH, T, T) weights
    y: np.ndarray        # (B, T, C) att @ v, the heads side by side again
    out: np.ndarray      # (B, T, C) y @ c_proj + bias (dropped out, in a training forward with dropout)

    @staticmethod
    def allocate(B, T, C, NH):
        return AttentionCache(qkv=_empty(B, T, 3 * C), row_max=_empty(B, NH, T), row_sum=_empty(B, NH, T),
                              y=_empty(B, T, C), out=_empty(B, T, C))


@dataclass
class MLPCache:
    fc: np.ndarray      # (B, T, 4C) x @ c_fc + bias
    gelu: np.ndarray    # (B, T, 4C) gelu(fc): one array shared by every block, rewritten by the backward

    @staticmethod
    def allocate(B, T, C, gelu):
        return MLPCache(fc=_empty(B, T, 4 * C), gelu=gelu)


@dataclass
class BlockCache:
    """What a block keeps for its backward. Three of its arrays are not its own: the LayerNorms'
    outputs (ln_1.out, ln_2.out) and the MLP's gelu are one array each shared by every block, written
    by each block's forward and used right away, and written again by its backward from what the block
    does keep (x, x_mid and the LayerNorms' mean and rstd; fc), an elementwise pass each, the same
    bits the forward had. Keeping them would cost 6C floats per position per layer, more than
    everything else a block keeps but attention."""
    x: np.ndarray          # (B, T, C) the block's input: the residual stream (the previous block's out)
    ln_1: LayerNormCache   # ln_1(x); out shared
    attn: AttentionCache   # attn(ln_1(x))
    x_mid: np.ndarray      # (B, T, C) x + attn.out, the stream between the two halves
    ln_2: LayerNormCache   # ln_2(x_mid); out shared
    mlp: MLPCache          # mlp(ln_2(x_mid)); gelu shared
    out: np.ndarray        # (B, T, C) x_mid + mlp(...): the block's output (the next block's x)

    @staticmethod
    def allocate(x, out, NH, ln_out, gelu):
        """x, out: the stream arrays on either side of the block; ln_out (B, T, C) and gelu (B, T, 4C):
        the arrays shared by every block."""
        B, T, C = x.shape
        return BlockCache(x=x, ln_1=LayerNormCache.allocate(B, T, C, out=ln_out),
                          attn=AttentionCache.allocate(B, T, C, NH), x_mid=_empty(B, T, C),
                          ln_2=LayerNormCache.allocate(B, T, C, out=ln_out), mlp=MLPCache.allocate(B, T, C, gelu),
                          out=out)


@dataclass
class BlockGrads:
    """Gradient buffers for one block's activations. Blocks run backward one at a time, so all
    blocks share one set; it is zeroed (one memset of `flat`) before each block's backward adds into
    it. The LayerNorm scratch is the kernel's work space, overwritten on every call, never zeroed;
    d_dropped is used only with dropout, and zeroed right before each use."""
    flat: np.ndarray       # every gradient buffer below is a view into this one array
    d_mlp_gelu: np.ndarray  # (B, T, 4C) dL/d mlp.gelu
    d_mlp_fc: np.ndarray   # (B, T, 4C) dL/d mlp.fc
    d_ln_2: np.ndarray     # (B, T, C)  dL/d ln_2.out
    d_attn_y: np.ndarray   # (B, T, C)  dL/d attn.y
    d_qkv: np.ndarray      # (B, T, 3C) dL/d attn.qkv
    d_ln_1: np.ndarray     # (B, T, C)  dL/d ln_1.out
    layernorm_scratch: np.ndarray  # (N, 2C)
    d_dropped: np.ndarray  # (B, T, C) dL/d the input of a dropout (a c_proj's output, the embeddings)

    @staticmethod
    def allocate(B, T, C):
        shapes = [("d_mlp_gelu", (B, T, 4 * C)), ("d_mlp_fc", (B, T, 4 * C)), ("d_ln_2", (B, T, C)),
                  ("d_attn_y", (B, T, C)), ("d_qkv", (B, T, 3 * C)), ("d_ln_1", (B, T, C))]
        flat = np.zeros(sum(math.prod(shape) for _, shape in shapes), np.float32)
        return BlockGrads(flat=flat, **views_of(flat, shapes), layernorm_scratch=_empty(B * T, 2 * C),
                          d_dropped=_empty(B, T, C))


@dataclass
class KVCache:
    """Generation state: every layer's q, k, v rows for the positions seen so far. Keys and values of
    earlier positions never change (no position looks forward), so a new token needs only its own
    row computed. Make one with GPT.new_kv_cache()."""
    qkv: list           # n_layer arrays (B, block_size, 3C); rows [0, length) are filled
    length: int = 0     # positions cached so far


# The LM head turns this many positions (rows) at a time into logits, their softmax, their loss and,
# for training, their gradient, so that its (rows, V) arrays exist for one chunk only, never for the
# whole (B, T, V) batch (at GPT-2's V = 50257 a (B 4, T 1024, V) array is 823 MB; a chunk of 1024
# rows is a quarter of it). Each chunk's two matmuls pack wte again, which is what bigger chunks
# save. The chunks follow from this number and N alone, never from the thread count, so results are
# the same bits on any number of threads; a batch of N <= HEAD_CHUNK_ROWS rows is one chunk and
# computes exactly what one unchunked head would.
HEAD_CHUNK_ROWS = 1024


@dataclass
class HeadBuffers:
    """The LM head's work space for one chunk of rows = min(HEAD_CHUNK_ROWS, N) positions, allocated
    by the first forward with targets (generation never needs it)."""
    logits: np.ndarray     # (rows, V) one chunk's logits; then, for the backward, its d_logits
    probs: np.ndarray      # (rows, V) softmax(logits) of the chunk
    losses: np.ndarray     # (rows,) the cross-entropy of each of its positions (the kernel's work space)

    @staticmethod
    def allocate(rows, V):
        return HeadBuffers(logits=_empty(rows, V), probs=_empty(rows, V), losses=_empty(rows))


@dataclass
class ModelCache:
    B: int
    T: int
    idx: np.ndarray            # (B, T) int64 token ids
    targets: np.ndarray        # (B, T) int64, or None
    blocks: list               # n_layer BlockCaches; blocks[0].x holds the embeddings
    ln_f: LayerNormCache       # ln_f(blocks[-1].out)
    head: HeadBuffers          # the LM head's chunk buffers, None until a forward with targets
    d_ln_f: np.ndarray         # (B, T, C) dL/d ln_f.out for loss_scale 1, from the forward with targets
    d_stream: np.ndarray       # (B, T, C) gradient of the residual stream, updated in place
    block_grads: BlockGrads
    dropout: object = None     # the gptcore.dropout.Dropout of the last forward, None if it dropped nothing

    @staticmethod
    def allocate(config, B, T):
        C, NH, L = config.n_embd, config.n_head, config.n_layer
        stream = [_empty(B, T, C) for _ in range(L + 1)]     # stream[i] is block i's input
        ln_out, gelu = _empty(B, T, C), _empty(B, T, 4 * C)  # shared by every block (see BlockCache)
        return ModelCache(
            B=B, T=T, idx=None, targets=None,
            blocks=[BlockCache.allocate(stream[i], stream[i + 1], NH, ln_out, gelu) for i in range(L)],
            ln_f=LayerNormCache.allocate(B, T, C), head=None, d_ln_f=_empty(B, T, C),
            d_stream=_empty(B, T, C), block_grads=BlockGrads.allocate(B, T, C))


# ----------------------------------------------------------------------------------------------------
# The layers: each forward next to its backward
# ----------------------------------------------------------------------------------------------------

def dropout_forward(kernels, x, dropout, layer, site):     # x (B, T, C) -> x, dropped out in place
    """Inverted dropout of x in place at one site (gptcore.dropout), if this forward drops (dropout is
    a Dropout, not None): x = x * keep / (1 - p)."""
    if dropout is not None:
        kernels.dropout_forward(x, dropout.p, dropout.key(layer, site), out=x)
    return x


def dropout_backward(kernels, d_out, dropout, layer, site, d_x):   # (B, T, C) -> the gradient of x
    """The gradient of dropout_forward's x given d_out: d_out itself if nothing was dropped, else
    d_x = d_out * keep / (1 - p), the forward's mask regenerated from the same key (d_x overwritten)."""
    if dropout is None:
        return d_out
    d_x.fill(0.0)
    kernels.dropout_backward(d_out, dropout.p, dropout.key(layer, site), d_x=d_x)
    return d_x


class LayerNorm:
    """out = (x - mean) / sqrt(var + 1e-5) * weight + bias over the C channels of each position."""

    def __init__(self, kernels, params, grads, prefix):
        self.kernels = kernels
        self.weight, self.bias = params[prefix + ".weight"], params[prefix + ".bias"]
        self.d_weight, self.d_bias = grads[prefix + ".weight"], grads[prefix + ".bias"]

    def forward(self, x, cache):                          # (B, T, C) -> cache.out (B, T, C)
        self.kernels.layernorm_forward(x, self.weight, self.bias, out=cache.out, mean=cache.mean,
                                       rstd=cache.rstd)
        return cache.out

    def backward(self, d_out, x, cache, d_x, scratch):    # (B, T, C) -> d_x (B, T, C) +=, param grads +=
        # With xhat = (x - mean) * rstd: d_bias += sum over positions of d_out, d_weight += sum of
        # d_out * xhat, and d_x += rstd * (g - mean(g) - xhat * mean(g * xhat)), g = d_out * weight.
        # The last term is there because x moves its own mean and variance (_kernels.pyx derives it).
        self.kernels.layernorm_backward(d_out, x, self.weight, cache.mean, cache.rstd, d_x=d_x,
                                        d_weight=self.d_weight, d_bias=self.d_bias, scratch=scratch)


class Linear:
    """out = inp @ weight + bias, weight stored (in, out) as in GPT-2's checkpoints."""

    def __init__(self, kernels, params, grads, prefix):
        self.kernels = kernels
        self.weight, self.bias = params[prefix + ".weight"], params[prefix + ".bias"]
        self.d_weight, self.d_bias = grads[prefix + ".weight"], grads[prefix + ".bias"]

    def forward(self, inp, out):                          # (B, T, in) -> out (B, T, out)
        return self.kernels.matmul_forward(inp, self.weight, self.bias, out=out)

    def backward(self, d_out, inp, d_inp):                # (B, T, out) -> d_inp (B, T, in) +=
        # out = inp @ W + b, so d_inp += d_out @ W^T, d_W += inp^T @ d_out, d_b += sum of d_out rows
        self.kernels.matmul_backward(d_out, inp, self.weight, d_inp=d_inp, d_weight=self.d_weight,
                                     d_bias=self.d_bias)


class CausalSelfAttention:
    """Multi-head causal self-attention. With x (B, T, C):

        q, k, v = split(x @ c_attn + bias)              3 x (B, T, C)   one matmul, then a split
        q, k, v -> (B, NH, T, hs)                        each head sees hs = C / NH channels
        att = softmax(mask(q @ k^T / sqrt(hs)))          (B, NH, T, T)   mask: -inf where s > t
        y = dropout(att) @ v                             (B, NH, T, hs)
        y -> (B, T, C)                                   the heads side by side again
        out = dropout(y @ c_proj + bias)                 (B, T, C)

    The middle four lines are one kernel (attention_forward), which reads q, k and v straight out of
    the packed qkv array: the split and the head reshapes are index arithmetic, not copies. The mask
    is what makes the model causal: position t only ever sees positions 0..t, so a prediction for
    t + 1 cannot peek at its answer. The dropouts (nanoGPT's attn_dropout and resid_dropout) act only
    in a training forward that asks for them (GPT.forward's dropout=).

    The (B, NH, T, T) weights are never kept: the kernel keeps each query row's softmax max and sum
    (cache.row_max, cache.row_sum), and the backward recomputes the weights from those and q, k, bit
    for bit, one head at a time, as flash attention does. That costs one more q @ k^T in the backward
    and saves B * NH * T * T floats per layer."""

    def __init__(self, kernels, params, grads, prefix, n_head, layer):
        self.kernels, self.n_head, self.layer = kernels, n_head, layer
        self.c_attn = Linear(kernels, params, grads, prefix + ".c_attn")
        self.c_proj = Linear(kernels, params, grads, prefix + ".c_proj")

    def _weights_dropout(self, dropout):
        """(dropout_p, dropout_key) of the attention weights for the kernels; (0, 0) drops nothing."""
        if dropout is None:
            return 0.0, 0
        return dropout.p, dropout.key(self.layer, dropout_sites.ATTENTION_WEIGHTS)

    def forward(self, x, cache, dropout=None):            # (B, T, C) -> cache.out (B, T, C)
        self.c_attn.forward(x, cache.qkv)                                          # (B, T, 3C)
        p, key = self._weights_dropout(dropout)
        self.kernels.attention_forward(cache.qkv, self.n_head, out=cache.y, row_max=cache.row_max,
                                       row_sum=cache.row_sum, dropout_p=p, dropout_key=key)  # (B, T, C)
        out = self.c_proj.forward(cache.y, cache.out)                              # (B, T, C)
        return dropout_forward(self.kernels, out, dropout, self.layer, dropout_sites.ATTENTION_OUTPUT)

    def forward_cached(self, x, cache, kv_qkv, start):    # x (B, T, C) new positions -> cache.out
        """Generation: x holds positions [start, start + T). Their q, k, v rows are appended to this
        layer's KV cache kv_qkv (B, block_size, 3C), and each new position attends to every cached
        position up to itself. No att is kept: there is no backward."""
        T = x.shape[1]
        self.c_attn.forward(x, cache.qkv)                                          # (B, T, 3C)
        kv_qkv[:, start:start + T] = cache.qkv
        self.kernels.attention_forward_cached(kv_qkv, start, start + T, self.n_head, out=cache.y)
        return self.c_proj.forward(cache.y, cache.out)

    def backward(self, d_out, x, cache, d_x, grads, dropout=None):   # (B, T, C) -> d_x (B, T, C) +=
        # in the forward: out = dropout(c_proj(y)), y = attention(qkv), qkv = c_attn(x); so, bottom to top:
        d_proj = dropout_backward(self.kernels, d_out, dropout, self.layer, dropout_sites.ATTENTION_OUTPUT,
                                  grads.d_dropped)                                 # (B, T, C)
        self.c_proj.backward(d_proj, cache.y, grads.d_attn_y)                      # d_y  (B, T, C)
        # att recomputed from q, k, row_max, row_sum; a = dropout(att); d_a = d_y v^T, d_att = dropout
        # of d_a; d_scores = softmax's backward; d_q = d_scores k / sqrt(hs), d_k = d_scores^T q
        # / sqrt(hs), d_v = a^T d_y: all inside one kernel, written into d_qkv's three slices
        p, key = self._weights_dropout(dropout)
        self.kernels.attention_backward(grads.d_attn_y, cache.qkv, cache.row_max, cache.row_sum, self.n_head,
                                        d_qkv=grads.d_qkv, dropout_p=p, dropout_key=key)  # (B, T, 3C)
        self.c_attn.backward(grads.d_qkv, x, d_x)                                 # d_x  (B, T, C)


class MLP:
    """The feed-forward half of a block, applied to each position on its own:

        h = gelu(x @ c_fc + bias)                        (B, T, 4C)
        out = dropout(h @ c_proj + bias)                 (B, T, C)

    with GPT-2's GELU, gelu(u) = 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))), and the dropout
    only in a training forward that asks for it."""

    def __init__(self, kernels, params, grads, prefix, layer):
        self.kernels, self.layer = kernels, layer
        self.c_fc = Linear(kernels, params, grads, prefix + ".c_fc")
        self.c_proj = Linear(kernels, params, grads, prefix + ".c_proj")

    def forward(self, x, cache, out, dropout=None):       # (B, T, C) -> out (B, T, C)
        self.c_fc.forward(x, cache.fc)                                             # (B, T, 4C)
        self.kernels.gelu_forward(cache.fc, out=cache.gelu)                        # (B, T, 4C)
        self.c_proj.forward(cache.gelu, out)                                       # (B, T, C)
        return dropout_forward(self.kernels, out, dropout, self.layer, dropout_sites.MLP_OUTPUT)

    def backward(self, d_out, x, cache, d_x, grads, dropout=None):   # (B, T, C) -> d_x (B, T, C) +=
        # in the forward: out = dropout(c_proj(gelu(fc))), fc = c_fc(x); so, bottom to top. cache.gelu
        # holds another block's by now (BlockCache): we compute ours again from fc.
        self.kernels.gelu_forward(cache.fc, out=cache.gelu)                        # (B, T, 4C)
        d_proj = dropout_backward(self.kernels, d_out, dropout, self.layer, dropout_sites.MLP_OUTPUT,
                                  grads.d_dropped)                                 # (B, T, C)
        self.c_proj.backward(d_proj, cache.gelu, grads.d_mlp_gelu)                 # (B, T, 4C)
        self.kernels.gelu_backward(grads.d_mlp_gelu, cache.fc, d_x=grads.d_mlp_fc)  # d_fc = d_h gelu'(fc)
        self.c_fc.backward(grads.d_mlp_fc, x, d_x)                                 # d_x  (B, T, C)


class Block:
    """Pre-norm transformer block: x_mid = x + attn(ln_1(x)); out = x_mid + mlp(ln_2(x_mid))."""

    def __init__(self, kernels, params, grads, i, n_head):
        self.kernels = kernels
        self.ln_1 = LayerNorm(kernels, params, grads, f"h.{i}.ln_1")
        self.attn = CausalSelfAttention(kernels, params, grads, f"h.{i}.attn", n_head, layer=i)
        self.ln_2 = LayerNorm(kernels, params, grads, f"h.{i}.ln_2")
        self.mlp = MLP(kernels, params, grads, f"h.{i}.mlp", layer=i)

    def forward(self, cache, dropout=None):               # cache.x (B, T, C) -> cache.out (B, T, C)
        attn_out = self.attn.forward(self.ln_1.forward(cache.x, cache.ln_1), cache.attn, dropout)
        self.kernels.residual_forward(cache.x, attn_out, out=cache.x_mid)          # x_mid = x + attn
        # the MLP writes straight into the block's output, and the residual is added in place
        mlp_out = self.mlp.forward(self.ln_2.forward(cache.x_mid, cache.ln_2), cache.mlp, cache.out, dropout)
        return self.kernels.residual_forward(cache.x_mid, mlp_out, out=cache.out)  # out = x_mid + mlp

    def forward_cached(self, cache, kv_qkv, start):       # the same, for positions [start, start + T)
        attn_out = self.attn.forward_cached(self.ln_1.forward(cache.x, cache.ln_1), cache.attn, kv_qkv, start)
        self.kernels.residual_forward(cache.x, attn_out, out=cache.x_mid)
        mlp_out = self.mlp.forward(self.ln_2.forward(cache.x_mid, cache.ln_2), cache.mlp, cache.out)
        return self.kernels.residual_forward(cache.x_mid, mlp_out, out=cache.out)

    def backward(self, d_stream, cache, grads, dropout=None):   # d_stream (B, T, C): dL/d out -> dL/d x, in place
        # A residual y = x + f(x) sends d_y down both paths: unchanged to x, and through f. We keep
        # the stream's gradient in one buffer and let f's backward *add* into it, so it becomes dL/dx
        # without any copy: that is the whole backward of residual_forward.
        grads.flat.fill(0.0)
        # MLP half, in the forward: out = x_mid + mlp(ln_2(x_mid)). ln_2's output is shared with the
        # other blocks (BlockCache): we compute ours again, from x_mid, before its consumer needs it.
        ln_2_out = self.ln_2.forward(cache.x_mid, cache.ln_2)
        self.mlp.backward(d_stream, ln_2_out, cache.mlp, grads.d_ln_2, grads, dropout)
        self.ln_2.backward(grads.d_ln_2, cache.x_mid, cache.ln_2, d_stream, grads.layernorm_scratch)
        # d_stream is now dL/d x_mid. Attention half, in the forward: x_mid = x + attn(ln_1(x))
        ln_1_out = self.ln_1.forward(cache.x, cache.ln_1)
        self.attn.backward(d_stream, ln_1_out, cache.attn, grads.d_ln_1, grads, dropout)
        self.ln_1.backward(grads.d_ln_1, cache.x, cache.ln_1, d_stream, grads.layernorm_scratch)


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
        self.config = config
        self.backend = backends.name(backend)
        self.kernels = backends.get(self.backend)
        shapes = parameter_shapes(config)
        size = sum(math.prod(shape) for _, shape in shapes)
        self.flat_params = np.zeros(size, np.float32)
        self.flat_grads = np.zeros(size, np.float32)
        self.params = views_of(self.flat_params, shapes)      # name -> view, GPT-2's names and shapes
        self.grads = views_of(self.flat_grads, shapes)
        init_parameters(self.params, config, seed)
        self.blocks = [Block(self.kernels, self.params, self.grads, i, config.n_head)
                       for i in range(config.n_layer)]
        self.ln_f = LayerNorm(self.kernels, self.params, self.grads, "ln_f")
        self._caches = {}           # (B, T) -> ModelCache, for the last few shapes seen
        self._cache = None          # the ModelCache of the last forward
        self._d_wte_head = None     # (V, C) the LM head's d_wte from the last forward with targets
        self._ready_for_backward = False
        self._has_attention_statistics = False     # the last forward was forward(), not forward_cached()

    @property
    def activations(self):
        """The ModelCache of the last forward: every intermediate array, for inspection (see
        python/follow_the_data_flow.py). Overwritten by the next forward of the same shape."""
        return self._cache

    def attention_weights(self, layer):
        """Block `layer`'s attention weights in the last forward, a new array (B, NH, T, T):
        att[b, h, t, s] = softmax_s(q_t . k_s / sqrt(hs)) over s <= t, 0 above the diagonal (before
        any dropout). This is what the pictures of attention (gptcore.visualize) and
        python/follow_the_data_flow.py show. The forward does not keep them: we recompute them from
        the layer's cached q, k and softmax row statistics, the same values the forward used."""
        if self._cache is None or not self._has_attention_statistics:
            raise RuntimeError("attention_weights() needs a forward() first (forward_cached keeps no "
                               "attention statistics)")
        if not 0 <= layer < self.config.n_layer:
            raise ValueError(f"layer must be in [0, {self.config.n_layer}), got {layer}")
        cache = self._cache.blocks[layer].attn
        return self.kernels.attention_weights(cache.qkv, cache.row_max, cache.row_sum, self.config.n_head,
                                              out=np.empty((self._cache.B, self.config.n_head, self._cache.T,
                                                            self._cache.T), np.float32))

    @property
    def num_parameters(self):
        return self.flat_params.size

    def flops_per_token(self):
        """Model FLOPs of training on one token, forward and backward: 6 N + 12 L C T, the count of
        PaLM's appendix B that nanoGPT's estimate_mfu uses (MFU: gptcore.machine, gptcore.train).

        6 N: a weight of a matmul meets each token in one multiply-add of the forward (2 flops) and in
        two of the backward (d_inp and d_weight, 4 flops). N is every parameter but wpe's, which a
        lookup reads and no product multiplies: wte counts once, as the LM head's matrix (its lookup
        in the embedding is free too). The biases and LayerNorm gains in N do less than 6 flops a
        token; they are 1% of N for the baby GPT and 0.1% for GPT-2 124M.
        12 L C T: in each of the L layers a query row meets T key rows (q . k, 2 C flops each over the
        NH heads of hs channels, C = NH hs) and T value rows (att @ v, 2 C each): 4 C T forward, twice
        that backward. T is block_size, the training window. The causal mask leaves half of that
        square unused and our attention skips it, and its backward recomputes the scores; model FLOPs
        count neither: MFU measures the model's arithmetic, not the kernels'."""
        C, L, T = self.config.n_embd, self.config.n_layer, self.config.block_size
        N = self.num_parameters - self.params["wpe.weight"].size
        return 6 * N + 12 * L * C * T

    def generation_bytes_per_token(self, context):
        """Bytes one generated token must read from memory, with the KV cache, when the model sees
        `context` positions (the new one included): the roofline of generation is the read bandwidth
        over this (gptcore.machine).

        Weights: every matrix, bias and gain once (the blocks', ln_f's, and all of wte for the LM
        head, V C floats), and one row each of wte and wpe for the embedding; float32, 4 bytes each. The KV cache: in each layer the new query reads the key
        and the value row of every position it sees, 2 C floats each. Not counted: the activations
        (a few rows, in the caches) and the (V,) logits written."""
        C, L = self.config.n_embd, self.config.n_layer
        weights = self.num_parameters - self.params["wpe.weight"].size + 2 * C
        return 4 * (weights + 2 * L * C * context)

    def _cache_for(self, B, T):
        """The activation buffers for a batch of (B, T), allocated on first use of that shape. We keep
        the last few shapes (training batches, a generation prompt, single generated tokens)."""
        if (B, T) not in self._caches:
            if len(self._caches) >= 4:
                del self._caches[next(iter(self._caches))]       # the oldest shape
            self._caches[(B, T)] = ModelCache.allocate(self.config, B, T)
        return self._caches[(B, T)]

    def new_kv_cache(self, batch_size=1):
        """An empty KV cache for generating batch_size sequences with forward_cached(idx, kv_cache)."""
        validate.positive_int("batch_size", batch_size)
        shape = (batch_size, self.config.block_size, 3 * self.config.n_embd)
        return KVCache(qkv=[np.zeros(shape, np.float32) for _ in range(self.config.n_layer)])

    def _tokens(self, name, tokens):
        """Token ids from outside, checked once: (B, T) integers in [0, V) with T <= block_size."""
        tokens = validate.token_ids(name, tokens, 2, self.config.vocab_size, "vocab_size")
        if tokens.shape[1] > self.config.block_size:
            raise ValueError(f"{name} has T={tokens.shape[1]} positions, more than "
                             f"block_size={self.config.block_size}")
        return tokens

    def _embed(self, idx, start):
        """The activation buffers for idx (B, T), with the embeddings of positions [start, start + T)
        written into the first block's input: x[b, t] = wte[idx[b, t]] + wpe[start + t]."""
        B, T = idx.shape
        cache = self._cache = self._cache_for(B, T)
        cache.idx, cache.targets = idx, None
        self.kernels.embedding_forward(idx, self.params["wte.weight"], self.params["wpe.weight"][start:],
                                       out=cache.blocks[0].x)
        return cache

    def _logits(self, cache):
        """Final LayerNorm, then the LM head with the tied embedding, every position at once:
        logits = ln_f(x) @ wte^T, a new array (B, T, V), for the callers that want the logits."""
        x = self.ln_f.forward(cache.blocks[-1].out, cache.ln_f)                     # (B, T, C)
        logits = _empty(cache.B, cache.T, self.config.vocab_size)
        return self.kernels.matmul_forward(x, self.params["wte.weight"], out=logits,
                                           weight_transposed=True)                  # (B, T, V)

    def _loss(self, cache, targets, need_backward):
        """Final LayerNorm, then the LM head and the mean cross-entropy against targets (B, T), chunk by
        chunk of HEAD_CHUNK_ROWS positions. With need_backward, each chunk's gradient is taken while
        its logits exist: cache.d_ln_f and self._d_wte_head receive the gradient of the loss (for
        loss_scale 1, which backward() applies). Returns the loss."""
        B, T, C, V = cache.B, cache.T, self.config.n_embd, self.config.vocab_size
        N = B * T
        x = self.ln_f.forward(cache.blocks[-1].out, cache.ln_f).reshape(1, N, C)    # (1, N, C)
        targets = targets.reshape(1, N)
        wte = self.params["wte.weight"]                                             # (V, C)
        if cache.head is None:
            cache.head = HeadBuffers.allocate(min(HEAD_CHUNK_ROWS, N), V)
        if need_backward:
            if self._d_wte_head is None:
                self._d_wte_head = _empty(V, C)
            self._d_wte_head.fill(0.0)                      # both gradients are accumulated chunk by chunk
            cache.d_ln_f.fill(0.0)
        d_ln_f = cache.d_ln_f.reshape(1, N, C)
        loss = 0.0
        for start in range(0, N, HEAD_CHUNK_ROWS):
            rows = min(HEAD_CHUNK_ROWS, N - start)
            chunk = slice(start, start + rows)
            logits = cache.head.logits[None, :rows]                                 # (1, rows, V)
            probs = cache.head.probs[None, :rows]
            # logits = ln_f.out @ wte^T, for these rows only
            self.kernels.matmul_forward(x[:, chunk], wte, out=logits, weight_transposed=True)
            # loss = (1/N) sum_n loss_n = sum over chunks of (rows/N) * (the chunk's mean loss); with one
            # chunk the weight is exactly 1
            chunk_loss, _ = self.kernels.cross_entropy_forward(logits, targets[:, chunk], probs=probs,
                                                               losses=cache.head.losses[:rows])
            loss += chunk_loss * (rows / N)
            if not need_backward:
                continue
            # loss_n = -log softmax(logits_n)[target_n]  ->  d_logits_n = (probs_n - onehot_n) / N. The
            # kernel divides by the chunk's own rows, so it gets d_loss = rows / N. The logits are spent:
            # their buffer takes d_logits.
            d_logits = logits
            d_logits.fill(0.0)
            self.kernels.cross_entropy_backward(probs, targets[:, chunk], d_logits=d_logits, d_loss=rows / N)
            # logits = ln_f.out @ wte^T  ->  d_ln_f = d_logits @ wte, d_wte += d_logits^T @ ln_f.out (no bias)
            self.kernels.matmul_backward(d_logits, x[:, chunk], wte, d_inp=d_ln_f[:, chunk],
                                         d_weight=self._d_wte_head, weight_transposed=True)
        return loss

    def forward(self, idx, targets=None, *, need_backward=True, dropout=None):
        """idx (B, T) token ids -> (logits, loss).

        Without targets: (logits (B, T, V) of every position, a new array; None).
        With targets (B, T): (None, the mean cross-entropy loss). The LM head then runs chunk by chunk
        (HEAD_CHUNK_ROWS positions at a time), so no (B, T, V) array is ever made, and each chunk's
        share of the gradient is taken right away, while its logits exist; backward() does the rest.
        need_backward=False (evaluation) skips that gradient work, two thirds of the head's, and then
        backward() refuses. The activations stay cached for backward() either way.

        dropout: None (the default) drops nothing, as evaluation and generation want; a training
        forward passes a gptcore.dropout.Dropout(p, seed, counter), and then the embeddings, each
        block's attention weights and both residual branches are dropped out with probability p
        (GPT-2's sites), with masks drawn from (seed, counter). backward() uses the same masks."""
        if dropout is not None and not isinstance(dropout, dropout_sites.Dropout):
            raise TypeError(f"dropout must be a gptcore.dropout.Dropout or None, got {type(dropout).__name__}")
        if dropout is not None and dropout.p == 0:
            dropout = None                    # p = 0 drops nothing: skip the dropout calls altogether
        idx = self._tokens("idx", idx)
        if targets is not None:
            targets = self._tokens("targets", targets)
            if targets.shape != idx.shape:
                raise ValueError(f"targets must have the same shape as idx {idx.shape}, got {targets.shape}")
        self._ready_for_backward = False
        cache = self._embed(idx, start=0)
        cache.dropout = dropout
        dropout_forward(self.kernels, cache.blocks[0].x, dropout, 0, dropout_sites.EMBEDDINGS)
        for block, block_cache in zip(self.blocks, cache.blocks):
            block.forward(block_cache, dropout)
        self._has_attention_statistics = True
        if targets is None:
            return self._logits(cache), None
        cache.targets = targets
        loss = self._loss(cache, targets, need_backward)
        self._ready_for_backward = need_backward
        return None, loss

    def forward_cached(self, idx, kv_cache):
        """Generation with a KV cache (from new_kv_cache): idx (B, T) holds the *next* T tokens of each
        sequence, at positions kv_cache.length onwards. Their keys and values are appended to the
        cache and only they are computed, through the same layers as forward. Returns logits
        (B, T, V), a new array; there is no loss and no backward."""
        self._ready_for_backward = False
        idx = self._tokens("idx", idx)
        B, T = idx.shape
        start = kv_cache.length
        if kv_cache.qkv[0].shape[0] != B:
            raise ValueError(f"idx has batch size {B} but the KV cache holds {kv_cache.qkv[0].shape[0]}")
        if start + T > self.config.block_size:
            raise ValueError(f"the KV cache holds {start} positions; {T} more would pass "
                             f"block_size={self.config.block_size}")
        cache = self._embed(idx, start)
        cache.dropout = None
        for block, block_cache, kv_qkv in zip(self.blocks, cache.blocks, kv_cache.qkv):
            block.forward_cached(block_cache, kv_qkv, start)
        kv_cache.length += T
        self._has_attention_statistics = False
        return self._logits(cache)

    def backward(self, accumulate=False, loss_scale=1.0):
        """Gradients of the last forward's loss, by parameter name (views into self.flat_grads).

        accumulate=False starts the gradients from zero; accumulate=True adds to them, for gradient
        accumulation over micro-batches. The gradient computed is that of loss_scale * loss (use
        1 / number_of_micro_batches so that the sum is the gradient of the mean)."""
        if not self._ready_for_backward:
            raise RuntimeError("backward() needs a forward(idx, targets) with targets first")
        self._ready_for_backward = False      # the caches will be overwritten by the next forward
        cache, kernels = self._cache, self.kernels
        d_wte = self.grads["wte.weight"]
        # The LM head's gradient was taken in the forward, for loss_scale 1 (see _loss): d_ln_f and
        # the head's share of d_wte. The gradient of loss_scale * loss is loss_scale times it.
        # (wte also gets the embedding's gradient below: the tied weight collects both.)
        if loss_scale != 1.0:
            np.multiply(cache.d_ln_f, np.float32(loss_scale), out=cache.d_ln_f)
            np.multiply(self._d_wte_head, np.float32(loss_scale), out=self._d_wte_head)
        if accumulate:
            np.add(d_wte, self._d_wte_head, out=d_wte)
        else:
            # Every gradient starts at zero, but wte's starts as the head's share, copied over instead
            # of zeroed and added to (the same values: 0 + x = x): at GPT-2's V = 50257 that saves a
            # write and a read of a (V, C) array. wte.weight comes first in the flat layout
            # (parameter_shapes), so the rest is one slice.
            np.copyto(d_wte, self._d_wte_head)
            self.flat_grads[d_wte.size:].fill(0.0)
        cache.d_stream.fill(0.0)
        self.ln_f.backward(cache.d_ln_f, cache.blocks[-1].out, cache.ln_f, cache.d_stream,
                           cache.block_grads.layernorm_scratch)
        for block, block_cache in zip(reversed(self.blocks), reversed(cache.blocks)):
            block.backward(cache.d_stream, block_cache, cache.block_grads, cache.dropout)
        # x = dropout(wte[idx] + wpe[t])  ->  d_wte[idx[b, t]] += d_x[b, t], d_wpe[t] += d_x[b, t], with
        # d_x the stream's gradient through the dropout
        d_embeddings = dropout_backward(kernels, cache.d_stream, cache.dropout, 0, dropout_sites.EMBEDDINGS,
                                        cache.block_grads.d_dropped)
        kernels.embedding_backward(d_embeddings, cache.idx, self.config.vocab_size, self.config.block_size,
                                   d_wte=self.grads["wte.weight"], d_wpe=self.grads["wpe.weight"])
        return self.grads
