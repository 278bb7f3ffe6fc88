"""gptcore.kernels: the checked, public face of the compiled kernels.

WHAT'S GOING ON HERE
====================

WHAT
  One Python function per kernel, under the names and signatures of gptcore.reference. Each one
  validates its arguments (with gptcore.validate), allocates any output the caller did not pass, and
  calls the function of the same name in gptcore.compiled, the one adapter over the compiled loops,
  which run without the GIL and without bounds checks.

      from gptcore import kernels
      out = kernels.matmul_forward(inp, weight, bias)              # (..., IC) @ (IC, OC) + (OC,)
      d_inp, d_weight, d_bias = kernels.matmul_backward(d_out, inp, weight, d_bias=np.zeros(OC, np.float32))

WHO CHECKS WHAT
  This module checks everything, for users: any code that did not build its arrays itself calls
  kernels, never gptcore.compiled. gptcore.compiled checks nothing. gptcore.model builds its own
  buffers, calls gptcore.compiled (or gptcore.reference) directly, and checks the token ids and
  targets it is given once per forward. The checks here:
    - arrays are numpy arrays (TypeError otherwise), float32 for values and an integer dtype for token
      ids (TypeError), C-contiguous (ValueError), of the right rank and non-empty (ValueError);
    - shapes agree with each other, and the message names the argument and the shape it expected;
    - token ids and targets lie in [0, V), T <= block_size, n_head divides C;
    - an output buffer (or a scratch array) has the right dtype, is C-contiguous, writeable, of
      exactly the expected shape, and does not share memory with an input (a kernel that overwrote
      its own input halfway would be wrong).

CONTRACT (the llm.c convention, the same in gptcore.reference)
  Forward functions take optional `out=` style buffers: if given they are overwritten and returned,
  otherwise new arrays are allocated. Backward functions take optional gradient buffers: if given,
  the gradient is *accumulated* into them (+=) and they are returned; otherwise they start at zero.
  The one exception is matmul_backward's d_bias: None means "no bias", and no bias gradient is
  computed. Accumulation is what a model needs: a tensor used in two places (the residual stream,
  the tied wte/lm_head weight) receives the sum of both gradients. matmul and layernorm take any
  number of leading dimensions ((B, T, C) as well as (N, C)).

TWIN
  gptcore.reference has every function here under the same name and signature, in plain Python.
"""
import numpy as np

from gptcore import compiled, dropout
from gptcore.validate import (expect_shape, float_array, head_count, int_in_range, integer, matmul_sizes,
                              no_overlap, output_buffer, positive_int, token_ids)

__all__ = [
    "matmul_forward", "matmul_backward",
    "softmax_forward", "softmax_backward",
    "gelu_forward", "gelu_backward",
    "layernorm_forward", "layernorm_backward",
    "attention_forward", "attention_backward", "attention_weights", "attention_forward_cached",
    "cross_entropy_forward", "cross_entropy_backward",
    "embedding_forward", "embedding_backward",
    "residual_forward", "residual_backward",
    "dropout_forward", "dropout_backward",
    "adamw_update", "sum_of_squares",
    "set_num_threads", "get_num_threads", "matmul_blocking", "set_matmul_blocking",
]


# ----------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------

# More threads than this is a typo, not a machine: OpenMP would try to start them all.
MAX_THREADS = 1024


def set_num_threads(n):
    """Run every kernel on n threads, 1 <= n <= MAX_THREADS (the default honours OMP_NUM_THREADS)."""
    compiled.set_num_threads(int_in_range("n", n, 1, MAX_THREADS))


def get_num_threads():
    """The number of threads the kernels run on."""
    return compiled.get_num_threads()


def matmul_blocking():
    """The matmul's cache blocking: {"k_block", "row_chunk", "tile", "l1_bytes", "l2_bytes"}, chosen
    from the cache sizes the machine reports. Results never depend on it."""
    return compiled.matmul_blocking()


def set_matmul_blocking(k_block, row_chunk_blocks):
    """Sum over k in blocks of k_block floats and walk A in chunks of row_chunk_blocks blocks of 6
    rows (both >= 1). Results do not change; the tests use it to show that, and tuning to try sizes."""
    compiled.set_matmul_blocking(positive_int("k_block", k_block), positive_int("row_chunk_blocks", row_chunk_blocks))


# ----------------------------------------------------------------------------------------------------
# Matmul
# ----------------------------------------------------------------------------------------------------

def matmul_forward(inp, weight, bias=None, *, out=None, weight_transposed=False):
    """out (..., OC) = inp (..., IC) @ weight (IC, OC) + bias (OC,). The fast, multi-threaded kernel;
    leading dimensions of inp are rows ((B, T, IC) -> (B, T, OC)).
    weight_transposed=True takes weight as (OC, IC) and multiplies by its transpose, without a copy
    (the tied LM head: logits = x @ wte^T with wte (V, C))."""
    lead, IC, OC = matmul_sizes(inp, weight, weight_transposed)
    if bias is not None:
        float_array("bias", bias, 1)
        expect_shape("bias", bias, (OC,))
    out = output_buffer("out", out, (*lead, OC), {"inp": inp, "weight": weight, "bias": bias}, zero=False)
    return compiled.matmul_forward(inp, weight, bias, out=out, weight_transposed=bool(weight_transposed))


def matmul_backward(d_out, inp, weight, *, d_inp=None, d_weight=None, d_bias=None, weight_transposed=False):
    """Accumulate d_inp (..., IC) += d_out @ weight.T, d_weight += inp.T @ d_out and, if a d_bias
    buffer is given, d_bias (OC,) += d_out summed over rows; d_bias=None skips the bias gradient (a
    layer without a bias) and returns None in its place. With weight_transposed, weight and d_weight
    are (OC, IC) and d_weight += d_out.T @ inp."""
    lead, IC, OC = matmul_sizes(inp, weight, weight_transposed)
    float_array("d_out", d_out)
    expect_shape("d_out", d_out, (*lead, OC))
    inputs = {"d_out": d_out, "inp": inp, "weight": weight}
    d_inp = output_buffer("d_inp", d_inp, inp.shape, inputs, zero=True)
    d_weight = output_buffer("d_weight", d_weight, weight.shape, inputs, zero=True)
    if d_bias is not None:
        d_bias = output_buffer("d_bias", d_bias, (OC,), inputs, zero=True)
    no_overlap({"d_inp": d_inp, "d_weight": d_weight, "d_bias": d_bias})
    return compiled.matmul_backward(d_out, inp, weight, d_inp=d_inp, d_weight=d_weight, d_bias=d_bias,
                                    weight_transposed=bool(weight_transposed))


# ----------------------------------------------------------------------------------------------------
# Softmax, GELU, residual
# ----------------------------------------------------------------------------------------------------

def _same_shape(first_name, first, other_name, other, ndim=None):
    """Two float32 arrays of one shape (of rank ndim if given); the message names `other`."""
    float_array(first_name, first, ndim)
    float_array(other_name, other, ndim)
    expect_shape(other_name, other, first.shape)


def softmax_forward(x, *, out=None):
    """probs (N, V) = softmax over the last axis of x (N, V)."""
    float_array("x", x, 2)
    out = output_buffer("out", out, x.shape, {"x": x}, zero=False)
    return compiled.softmax_forward(x, out=out)


def softmax_backward(d_probs, probs, *, d_x=None):
    """d_x (N, V) += probs * (d_probs - sum(probs * d_probs, last axis))."""
    _same_shape("probs", probs, "d_probs", d_probs, 2)
    d_x = output_buffer("d_x", d_x, probs.shape, {"probs": probs, "d_probs": d_probs}, zero=True)
    return compiled.softmax_backward(d_probs, probs, d_x=d_x)


def gelu_forward(x, *, out=None):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise, any shape."""
    float_array("x", x)
    out = output_buffer("out", out, x.shape, {"x": x}, zero=False)
    return compiled.gelu_forward(x, out=out)


def gelu_backward(d_out, x, *, d_x=None):
    """d_x += d_out * gelu'(x), elementwise, any shape."""
    _same_shape("x", x, "d_out", d_out)
    d_x = output_buffer("d_x", d_x, x.shape, {"x": x, "d_out": d_out}, zero=True)
    return compiled.gelu_backward(d_out, x, d_x=d_x)


def residual_forward(a, b, *, out=None):
    """out = a + b, any shape (the same for both)."""
    _same_shape("a", a, "b", b)
    out = output_buffer("out", out, a.shape, {"a": a, "b": b}, zero=False)
    return compiled.residual_forward(a, b, out=out)


def residual_backward(d_out, *, d_a=None, d_b=None):
    """d_a += d_out and d_b += d_out: an add hands its gradient to both inputs."""
    float_array("d_out", d_out)
    d_a = output_buffer("d_a", d_a, d_out.shape, {"d_out": d_out}, zero=True)
    d_b = output_buffer("d_b", d_b, d_out.shape, {"d_out": d_out, "d_a": d_a}, zero=True)
    return compiled.residual_backward(d_out, d_a=d_a, d_b=d_b)


def _dropout_arguments(p, key):
    """A checked dropout probability and 64-bit mask key (gptcore.dropout)."""
    p = dropout.check_probability(p)
    key = integer("dropout key", key)
    if not 0 <= key < 2 ** 64:
        raise ValueError(f"a dropout key must be an integer in [0, 2^64), got {key}")
    return p, key


def dropout_forward(x, p, key, *, out=None):
    """out = x * keep / (1 - p), any shape, keep drawn from the 64-bit key (gptcore.dropout).
    out may be x itself (in place)."""
    float_array("x", x)
    p, key = _dropout_arguments(p, key)
    if out is not x:
        out = output_buffer("out", out, x.shape, {"x": x}, zero=False)
    return compiled.dropout_forward(x, p, key, out=out)


def dropout_backward(d_out, p, key, *, d_x=None):
    """d_x += d_out * keep / (1 - p), with dropout_forward's p and key."""
    float_array("d_out", d_out)
    p, key = _dropout_arguments(p, key)
    d_x = output_buffer("d_x", d_x, d_out.shape, {"d_out": d_out}, zero=True)
    return compiled.dropout_backward(d_out, p, key, d_x=d_x)


# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------

def _layernorm_rows(x, weight):
    """(leading dims, C) of x (..., C), with weight (C,) checked against it."""
    float_array("x", x)
    if x.ndim < 2:
        raise ValueError(f"x must be at least 2-D (rows, C), got shape {x.shape}")
    C = x.shape[-1]
    float_array("weight", weight, 1)
    expect_shape("weight", weight, (C,))
    return x.shape[:-1], C


def layernorm_forward(x, weight, bias, *, out=None, mean=None, rstd=None):
    """Normalise each row of x (..., C) to mean 0, variance 1 (eps 1e-5), then scale by weight (C,)
    and shift by bias (C,). Returns (out (..., C), mean (...), rstd (...)); mean and rstd feed the
    backward."""
    lead, C = _layernorm_rows(x, weight)
    float_array("bias", bias, 1)
    expect_shape("bias", bias, (C,))
    inputs = {"x": x, "weight": weight, "bias": bias}
    out = output_buffer("out", out, x.shape, inputs, zero=False)
    mean = output_buffer("mean", mean, lead, inputs, zero=False)
    rstd = output_buffer("rstd", rstd, lead, inputs, zero=False)
    no_overlap({"out": out, "mean": mean, "rstd": rstd})
    return compiled.layernorm_forward(x, weight, bias, out=out, mean=mean, rstd=rstd)


def layernorm_backward(d_out, x, weight, mean, rstd, *, d_x=None, d_weight=None, d_bias=None, scratch=None):
    """Accumulate the gradients of layernorm_forward into d_x (..., C), d_weight (C,), d_bias (C,).
    scratch: optional (N, 2C) float32 work space, N the number of rows (allocated if None)."""
    lead, C = _layernorm_rows(x, weight)
    float_array("d_out", d_out)
    expect_shape("d_out", d_out, x.shape)
    for name, array in (("mean", mean), ("rstd", rstd)):
        float_array(name, array)
        expect_shape(name, array, lead)
    inputs = {"d_out": d_out, "x": x, "weight": weight, "mean": mean, "rstd": rstd}
    d_x = output_buffer("d_x", d_x, x.shape, inputs, zero=True)
    d_weight = output_buffer("d_weight", d_weight, (C,), inputs, zero=True)
    d_bias = output_buffer("d_bias", d_bias, (C,), inputs, zero=True)
    if scratch is not None:
        scratch = output_buffer("scratch", scratch, (x.size // C, 2 * C), inputs, zero=False)
    no_overlap({"d_x": d_x, "d_weight": d_weight, "d_bias": d_bias, "scratch": scratch})
    return compiled.layernorm_backward(d_out, x, weight, mean, rstd, d_x=d_x, d_weight=d_weight,
                                       d_bias=d_bias, scratch=scratch)


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------

def _check_qkv(qkv, n_head):
    float_array("qkv", qkv, 3)
    B, T, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv must have shape (B, T, 3C), got last axis {C3}, not a multiple of 3")
    C = C3 // 3
    return B, T, C, head_count(n_head, C)


def _row_stats(row_max, row_sum, B, NH, T):
    for name, array in (("row_max", row_max), ("row_sum", row_sum)):
        float_array(name, array, 3)
        expect_shape(name, array, (B, NH, T))


def attention_forward(qkv, n_head, *, out=None, row_max=None, row_sum=None, dropout_p=0.0, dropout_key=0):
    """Causal multi-head self-attention from the packed qkv (B, T, 3C), with dropout of probability
    dropout_p on the attention weights, its mask drawn from dropout_key (gptcore.dropout).
    Returns (out (B, T, C), row_max (B, NH, T), row_sum (B, NH, T)): each query row's softmax max and
    normaliser, all attention_backward and attention_weights need to recompute the weights."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    dropout_p, dropout_key = _dropout_arguments(dropout_p, dropout_key)
    out = output_buffer("out", out, (B, T, C), {"qkv": qkv}, zero=False)
    row_max = output_buffer("row_max", row_max, (B, NH, T), {"qkv": qkv, "out": out}, zero=False)
    row_sum = output_buffer("row_sum", row_sum, (B, NH, T), {"qkv": qkv, "out": out, "row_max": row_max},
                            zero=False)
    return compiled.attention_forward(qkv, NH, out=out, row_max=row_max, row_sum=row_sum,
                                      dropout_p=dropout_p, dropout_key=dropout_key)


def attention_backward(d_out, qkv, row_max, row_sum, n_head, *, d_qkv=None, dropout_p=0.0, dropout_key=0):
    """Accumulate into d_qkv (B, T, 3C) the gradient of attention_forward's out, given d_out (B, T, C),
    the forward's row_max and row_sum (B, NH, T) and its dropout_p and dropout_key."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    float_array("d_out", d_out, 3)
    expect_shape("d_out", d_out, (B, T, C))
    _row_stats(row_max, row_sum, B, NH, T)
    dropout_p, dropout_key = _dropout_arguments(dropout_p, dropout_key)
    d_qkv = output_buffer("d_qkv", d_qkv, (B, T, 3 * C),
                          {"d_out": d_out, "qkv": qkv, "row_max": row_max, "row_sum": row_sum}, zero=True)
    return compiled.attention_backward(d_out, qkv, row_max, row_sum, NH, d_qkv=d_qkv, dropout_p=dropout_p,
                                       dropout_key=dropout_key)


def attention_weights(qkv, row_max, row_sum, n_head, *, out=None):
    """The attention weights (B, NH, T, T) of attention_forward (before dropout), recomputed from qkv
    (B, T, 3C) and the forward's row_max, row_sum (B, NH, T): att[b, h, t, s] = 0 for every s > t."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    _row_stats(row_max, row_sum, B, NH, T)
    out = output_buffer("out", out, (B, NH, T, T), {"qkv": qkv, "row_max": row_max, "row_sum": row_sum},
                        zero=False)
    return compiled.attention_weights(qkv, row_max, row_sum, NH, out=out)


def attention_forward_cached(qkv, start, end, n_head, *, out=None):
    """Causal attention for the query positions [start, end) only, each against positions 0..t of
    qkv (B, T_max, 3C): the generation step with a KV cache, where rows [0, start) of qkv are cached
    from earlier steps. Returns out (B, end - start, C); no att is kept (there is no backward)."""
    B, T_max, C, NH = _check_qkv(qkv, n_head)
    start, end = integer("start", start), integer("end", end)
    if not 0 <= start < end <= T_max:
        raise ValueError(f"need 0 <= start < end <= T_max={T_max}, got start={start}, end={end}")
    out = output_buffer("out", out, (B, end - start, C), {"qkv": qkv}, zero=False)
    return compiled.attention_forward_cached(qkv, start, end, NH, out=out)


# ----------------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------------

def _check_logits(name, logits, targets):
    float_array(name, logits, 3)
    B, T, V = logits.shape
    targets = token_ids("targets", targets, 2, V, "V")
    expect_shape("targets", targets, (B, T))
    return B, T, V, targets


def cross_entropy_forward(logits, targets, *, probs=None, losses=None):
    """Mean over the B*T positions of -log softmax(logits)[target].
    logits (B, T, V), targets (B, T) integers in [0, V). Returns (loss: float, probs (B, T, V)).
    losses: optional (B*T,) float32 work space for the per-position losses (allocated if None)."""
    B, T, V, targets = _check_logits("logits", logits, targets)
    probs = output_buffer("probs", probs, (B, T, V), {"logits": logits}, zero=False)
    losses = output_buffer("losses", losses, (B * T,), {"logits": logits, "probs": probs}, zero=False)
    return compiled.cross_entropy_forward(logits, targets, probs=probs, losses=losses)


def cross_entropy_backward(probs, targets, *, d_logits=None, d_loss=1.0):
    """d_logits (B, T, V) += d_loss * (probs - onehot(targets)) / (B*T)."""
    B, T, V, targets = _check_logits("probs", probs, targets)
    d_loss = float(d_loss)
    if not np.isfinite(d_loss):
        raise ValueError(f"d_loss must be finite, got {d_loss}")
    d_logits = output_buffer("d_logits", d_logits, (B, T, V), {"probs": probs}, zero=True)
    return compiled.cross_entropy_backward(probs, targets, d_logits=d_logits, d_loss=d_loss)


# ----------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------

def embedding_forward(idx, wte, wpe, *, out=None):
    """out[b, t] = wte[idx[b, t]] + wpe[t]. idx (B, T) ints in [0, V), wte (V, C), wpe (block_size, C),
    T <= block_size. Returns out (B, T, C)."""
    float_array("wte", wte, 2)
    float_array("wpe", wpe, 2)
    V, C = wte.shape
    if wpe.shape[1] != C:
        raise ValueError(f"wpe must have shape (block_size, {C}) to match wte {wte.shape}, got {wpe.shape}")
    idx = token_ids("idx", idx, 2, V, "V")
    B, T = idx.shape
    if T > wpe.shape[0]:
        raise ValueError(f"idx has T={T} positions, more than block_size={wpe.shape[0]}")
    out = output_buffer("out", out, (B, T, C), {"wte": wte, "wpe": wpe}, zero=False)
    return compiled.embedding_forward(idx, wte, wpe, out=out)


def embedding_backward(d_out, idx, vocab_size, block_size, *, d_wte=None, d_wpe=None):
    """d_wte (V, C)[idx[b, t]] += d_out[b, t] and d_wpe (block_size, C)[t] += d_out[b, t]."""
    V = positive_int("vocab_size", vocab_size)
    block_size = positive_int("block_size", block_size)
    float_array("d_out", d_out, 3)
    B, T, C = d_out.shape
    idx = token_ids("idx", idx, 2, V, "vocab_size")
    expect_shape("idx", idx, (B, T))
    if T > block_size:
        raise ValueError(f"d_out has T={T} positions, more than block_size={block_size}")
    d_wte = output_buffer("d_wte", d_wte, (V, C), {"d_out": d_out}, zero=True)
    d_wpe = output_buffer("d_wpe", d_wpe, (block_size, C), {"d_out": d_out, "d_wte": d_wte}, zero=True)
    return compiled.embedding_backward(d_out, idx, V, block_size, d_wte=d_wte, d_wpe=d_wpe)


# ----------------------------------------------------------------------------------------------------
# AdamW, sum of squares
# ----------------------------------------------------------------------------------------------------

def adamw_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step (torch.optim.AdamW's formula), in place on param, m and v; any shape.
    step is the 1-based step count used for bias correction. The gradient used is grad * grad_scale
    rounded to float32 (gradient clipping's scale, folded into the update; grad is only read)."""
    float_array("param", param)
    for name, array in (("grad", grad), ("m", m), ("v", v)):
        float_array(name, array)
        expect_shape(name, array, param.shape)
    for name, array in (("param", param), ("m", m), ("v", v)):
        if not array.flags.writeable:
            raise ValueError(f"{name} must be writeable")
    no_overlap({"param": param, "grad": grad, "m": m, "v": v})
    step = int_in_range("step", step, 1, 2 ** 63 - 1)      # a C long long
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay), ("grad_scale", grad_scale)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    compiled.adamw_update(param, grad, m, v, lr=float(lr), beta1=float(beta1), beta2=float(beta2),
                          eps=float(eps), weight_decay=float(weight_decay), step=step,
                          grad_scale=float(grad_scale))


def sum_of_squares(x, partials=None):
    """sum(x**2) over every element, as a Python float: the squared norm gradient clipping needs.
    Deterministic: the same result for any thread count. partials: optional float64 work space of
    ceil(x.size / compiled.CHUNK_SIZE) elements, one per chunk (allocated if None)."""
    float_array("x", x)
    if partials is not None:
        shape = (-(-x.size // compiled.CHUNK_SIZE),)
        partials = output_buffer("partials", partials, shape, {"x": x}, zero=False, dtype=np.float64)
    return compiled.sum_of_squares(x, partials)
