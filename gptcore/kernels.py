"""gptcore.kernels: the checked, public face of the compiled kernels.

WHAT'S GOING ON HERE
====================

WHAT
  One Python function per compiled kernel in gptcore._kernels, with the same name. Each checks its
  arguments, allocates any output the caller did not pass, and then calls the compiled code, which
  runs without the GIL and without bounds checks.

      from gptcore import kernels
      out = kernels.matmul_forward(inp, weight, bias)              # (N, IC) @ (IC, OC) + (OC,)
      d_inp, d_weight, d_bias = kernels.matmul_backward(d_out, inp, weight)

WHY A SEPARATE LAYER
  The compiled loops trust their inputs completely: a wrong shape there is a read or write past the
  end of an array, which at best crashes the interpreter and at worst silently corrupts memory. So
  every check lives here, in plain Python, before any compiled code runs:
    - arrays are numpy arrays (TypeError otherwise), float32 for values and an integer dtype for token
      ids (TypeError), C-contiguous (ValueError), of the right rank and non-empty (ValueError);
    - shapes agree with each other, and the message names the argument and the shape it expected;
    - token ids and targets lie in [0, V), T <= block_size, n_head divides C;
    - an output buffer is float32, C-contiguous, writeable, of exactly the expected shape, and does not
      share memory with an input (a kernel that overwrote its own input halfway would be wrong).

CONTRACT (the llm.c convention, the same in gptcore.reference)
  Forward functions take optional `out=` style buffers: if given they are overwritten and returned,
  otherwise new arrays are allocated. Backward functions take optional gradient buffers: if given,
  the gradient is *accumulated* into them (+=) and they are returned; otherwise they start at zero.
  Accumulation is what a model needs: a tensor used in two places (the residual stream, the tied
  wte/lm_head weight) receives the sum of both gradients.

TWIN
  gptcore.reference has every function here under the same name and signature, in plain Python.
"""
import numpy as np

from gptcore import _kernels

__all__ = [
    "matmul_forward", "matmul_backward",
    "softmax_forward", "softmax_backward",
    "gelu_forward", "gelu_backward",
    "layernorm_forward", "layernorm_backward",
    "attention_forward", "attention_backward", "attention_forward_cached",
    "cross_entropy_forward", "cross_entropy_backward",
    "embedding_forward", "embedding_backward",
    "residual_forward", "residual_backward",
    "adamw_update", "sum_of_squares",
    "set_num_threads", "get_num_threads",
]


# ----------------------------------------------------------------------------------------------------
# Argument checks
# ----------------------------------------------------------------------------------------------------

def _floats(name, array, ndim=None):
    """A float32, C-contiguous, non-empty numpy array of rank ndim (any rank if None)."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype != np.float32:
        raise TypeError(f"{name} must have dtype float32, got {array.dtype}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if not array.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (np.ascontiguousarray makes a copy that is)")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    return array


def _shape(name, array, expected):
    if array.shape != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)}, got {array.shape}")


def _indices(name, array, ndim, upper, upper_name):
    """An integer array of rank ndim with every value in [0, upper), as a C-contiguous int64 array."""
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array of integers, got {type(array).__name__}")
    if not np.issubdtype(array.dtype, np.integer):
        raise TypeError(f"{name} must have an integer dtype, got {array.dtype}")
    if array.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {array.shape}")
    if array.size == 0:
        raise ValueError(f"{name} must not be empty, got shape {array.shape}")
    low, high = array.min(), array.max()
    if low < 0 or high >= upper:
        bad = low if low < 0 else high
        raise ValueError(f"{name} holds {bad}, outside [0, {upper_name}={upper})")
    return np.ascontiguousarray(array, dtype=np.int64)


def _output(name, buffer, shape, inputs, zero):
    """The caller's buffer, checked, or a new one (zeros if zero, else uninitialised)."""
    if buffer is None:
        return np.zeros(shape, np.float32) if zero else np.empty(shape, np.float32)
    _floats(name, buffer)
    _shape(name, buffer, shape)
    if not buffer.flags.writeable:
        raise ValueError(f"{name} must be writeable")
    for input_name, array in inputs.items():
        if array is not None and np.may_share_memory(buffer, array):
            raise ValueError(f"{name} must not share memory with {input_name}")
    return buffer


def _no_overlap(arrays):
    """No two of the named arrays share memory (two outputs in one place would overwrite each other)."""
    items = list(arrays.items())
    for i, (name_a, a) in enumerate(items):
        for name_b, b in items[i + 1:]:
            if np.may_share_memory(a, b):
                raise ValueError(f"{name_a} must not share memory with {name_b}")


def _positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < 1:
        raise ValueError(f"{name} must be >= 1, got {value}")
    return int(value)


def _head_count(n_head, C):
    n_head = _positive_int("n_head", n_head)
    if C % n_head != 0:
        raise ValueError(f"n_head={n_head} must divide the channel count C={C}")
    return n_head


# ----------------------------------------------------------------------------------------------------
# Threads
# ----------------------------------------------------------------------------------------------------

def set_num_threads(n):
    """Run every kernel on n >= 1 threads (the default honours OMP_NUM_THREADS)."""
    _kernels.set_num_threads(_positive_int("n", n))


def get_num_threads():
    """The number of threads the kernels run on."""
    return _kernels.get_num_threads()


# ----------------------------------------------------------------------------------------------------
# Matmul
# ----------------------------------------------------------------------------------------------------

def _matmul_sizes(inp, weight, weight_transposed, inp_name="inp"):
    """(N, IC, OC) of inp (N, IC) @ weight, where weight is (IC, OC), or (OC, IC) if transposed."""
    _floats(inp_name, inp, 2)
    _floats("weight", weight, 2)
    N, IC = inp.shape
    weight_IC = weight.shape[1] if weight_transposed else weight.shape[0]
    if weight_IC != IC:
        expected = f"(OC, {IC})" if weight_transposed else f"({IC}, OC)"
        raise ValueError(f"weight must have shape {expected} to match {inp_name} {inp.shape}, got {weight.shape}")
    return N, IC, (weight.shape[0] if weight_transposed else weight.shape[1])


def _check_matmul(inp, weight, bias, out, weight_transposed):
    N, IC, OC = _matmul_sizes(inp, weight, weight_transposed)
    if bias is not None:
        _floats("bias", bias, 1)
        _shape("bias", bias, (OC,))
    return _output("out", out, (N, OC), {"inp": inp, "weight": weight, "bias": bias}, zero=False)


def matmul_forward(inp, weight, bias=None, *, out=None, weight_transposed=False):
    """out (N, OC) = inp (N, IC) @ weight (IC, OC) + bias (OC,). The fast, multi-threaded kernel.
    weight_transposed=True takes weight as (OC, IC) and multiplies by its transpose, without a copy
    (the tied LM head: logits = x @ wte^T with wte (V, C))."""
    out = _check_matmul(inp, weight, bias, out, weight_transposed)
    _kernels.matmul_forward(out, inp, weight, bias, bool(weight_transposed))
    return out


def matmul_backward(d_out, inp, weight, *, d_inp=None, d_weight=None, d_bias=None, weight_transposed=False):
    """Accumulate d_inp += d_out @ weight.T, d_weight += inp.T @ d_out, d_bias += d_out.sum(0).
    With weight_transposed, weight and d_weight are (OC, IC) and d_weight += d_out.T @ inp."""
    N, IC, OC = _matmul_sizes(inp, weight, weight_transposed)
    _floats("d_out", d_out, 2)
    _shape("d_out", d_out, (N, OC))
    inputs = {"d_out": d_out, "inp": inp, "weight": weight}
    d_inp = _output("d_inp", d_inp, (N, IC), inputs, zero=True)
    d_weight = _output("d_weight", d_weight, weight.shape, inputs, zero=True)
    if d_bias is not None:
        d_bias = _output("d_bias", d_bias, (OC,), inputs, zero=True)
    _no_overlap({"d_inp": d_inp, "d_weight": d_weight, "d_bias": d_bias})
    _kernels.matmul_backward(d_inp, d_weight, d_bias, d_out, inp, weight, bool(weight_transposed))
    return d_inp, d_weight, d_bias


# ----------------------------------------------------------------------------------------------------
# Softmax, GELU, residual
# ----------------------------------------------------------------------------------------------------

def softmax_forward(x, *, out=None):
    """probs (N, V) = softmax over the last axis of x (N, V)."""
    _floats("x", x, 2)
    out = _output("out", out, x.shape, {"x": x}, zero=False)
    _kernels.softmax_forward(out, x)
    return out


def softmax_backward(d_probs, probs, *, d_x=None):
    """d_x (N, V) += probs * (d_probs - sum(probs * d_probs, last axis))."""
    _floats("probs", probs, 2)
    _floats("d_probs", d_probs, 2)
    _shape("d_probs", d_probs, probs.shape)
    d_x = _output("d_x", d_x, probs.shape, {"probs": probs, "d_probs": d_probs}, zero=True)
    _kernels.softmax_backward(d_x, d_probs, probs)
    return d_x


def gelu_forward(x, *, out=None):
    """out = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))), elementwise, any shape."""
    _floats("x", x)
    out = _output("out", out, x.shape, {"x": x}, zero=False)
    _kernels.gelu_forward(out.reshape(-1), x.reshape(-1))
    return out


def gelu_backward(d_out, x, *, d_x=None):
    """d_x += d_out * gelu'(x), elementwise, any shape."""
    _floats("x", x)
    _floats("d_out", d_out)
    _shape("d_out", d_out, x.shape)
    d_x = _output("d_x", d_x, x.shape, {"x": x, "d_out": d_out}, zero=True)
    _kernels.gelu_backward(d_x.reshape(-1), d_out.reshape(-1), x.reshape(-1))
    return d_x


def residual_forward(a, b, *, out=None):
    """out = a + b, any shape (the same for both)."""
    _floats("a", a)
    _floats("b", b)
    _shape("b", b, a.shape)
    out = _output("out", out, a.shape, {"a": a, "b": b}, zero=False)
    _kernels.residual_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))
    return out


def residual_backward(d_out, *, d_a=None, d_b=None):
    """d_a += d_out and d_b += d_out: an add hands its gradient to both inputs."""
    _floats("d_out", d_out)
    d_a = _output("d_a", d_a, d_out.shape, {"d_out": d_out}, zero=True)
    d_b = _output("d_b", d_b, d_out.shape, {"d_out": d_out, "d_a": d_a}, zero=True)
    _kernels.residual_backward(d_a.reshape(-1), d_b.reshape(-1), d_out.reshape(-1))
    return d_a, d_b


# ----------------------------------------------------------------------------------------------------
# LayerNorm
# ----------------------------------------------------------------------------------------------------

def layernorm_forward(x, weight, bias, *, out=None, mean=None, rstd=None):
    """Normalise each row of x (N, C) to mean 0, variance 1 (eps 1e-5), then scale by weight (C,) and
    shift by bias (C,). Returns (out (N, C), mean (N,), rstd (N,)); mean and rstd feed the backward."""
    _floats("x", x, 2)
    N, C = x.shape
    _floats("weight", weight, 1)
    _shape("weight", weight, (C,))
    _floats("bias", bias, 1)
    _shape("bias", bias, (C,))
    inputs = {"x": x, "weight": weight, "bias": bias}
    out = _output("out", out, (N, C), inputs, zero=False)
    mean = _output("mean", mean, (N,), inputs, zero=False)
    rstd = _output("rstd", rstd, (N,), inputs, zero=False)
    _no_overlap({"out": out, "mean": mean, "rstd": rstd})
    _kernels.layernorm_forward(out, mean, rstd, x, weight, bias)
    return out, mean, rstd


def layernorm_backward(d_out, x, weight, mean, rstd, *, d_x=None, d_weight=None, d_bias=None, scratch=None):
    """Accumulate the gradients of layernorm_forward into d_x (N, C), d_weight (C,), d_bias (C,)."""
    _floats("x", x, 2)
    N, C = x.shape
    _floats("d_out", d_out, 2)
    _shape("d_out", d_out, (N, C))
    _floats("weight", weight, 1)
    _shape("weight", weight, (C,))
    _floats("mean", mean, 1)
    _shape("mean", mean, (N,))
    _floats("rstd", rstd, 1)
    _shape("rstd", rstd, (N,))
    inputs = {"d_out": d_out, "x": x, "weight": weight, "mean": mean, "rstd": rstd}
    d_x = _output("d_x", d_x, (N, C), inputs, zero=True)
    d_weight = _output("d_weight", d_weight, (C,), inputs, zero=True)
    d_bias = _output("d_bias", d_bias, (C,), inputs, zero=True)
    _no_overlap({"d_x": d_x, "d_weight": d_weight, "d_bias": d_bias})
    scratch = np.empty((N, 2 * C), np.float32)
    _kernels.layernorm_backward(d_x, d_weight, d_bias, scratch, d_out, x, weight, mean, rstd)
    return d_x, d_weight, d_bias


# ----------------------------------------------------------------------------------------------------
# Attention
# ----------------------------------------------------------------------------------------------------

def _check_qkv(qkv, n_head):
    _floats("qkv", qkv, 3)
    B, T, C3 = qkv.shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv must have shape (B, T, 3C), got last axis {C3}, not a multiple of 3")
    C = C3 // 3
    return B, T, C, _head_count(n_head, C)


def attention_forward(qkv, n_head, *, out=None, att=None):
    """Causal multi-head self-attention from the packed qkv (B, T, 3C).
    Returns (out (B, T, C), att (B, NH, T, T)); att[b, h, t, s] = 0 for every s > t."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    out = _output("out", out, (B, T, C), {"qkv": qkv}, zero=False)
    att = _output("att", att, (B, NH, T, T), {"qkv": qkv, "out": out}, zero=False)
    _kernels.attention_forward(out, att, qkv, NH)
    return out, att


def attention_backward(d_out, qkv, att, n_head, *, d_qkv=None):
    """Accumulate into d_qkv (B, T, 3C) the gradient of attention_forward's out, given d_out (B, T, C)."""
    B, T, C, NH = _check_qkv(qkv, n_head)
    _floats("d_out", d_out, 3)
    _shape("d_out", d_out, (B, T, C))
    _floats("att", att, 4)
    _shape("att", att, (B, NH, T, T))
    d_qkv = _output("d_qkv", d_qkv, (B, T, 3 * C), {"d_out": d_out, "qkv": qkv, "att": att}, zero=True)
    _kernels.attention_backward(d_qkv, d_out, qkv, att, NH)
    return d_qkv


def attention_forward_cached(qkv, start, end, n_head, *, out=None):
    """Causal attention for the query positions [start, end) only, each against positions 0..t of
    qkv (B, T_max, 3C): the generation step with a KV cache, where rows [0, start) of qkv are cached
    from earlier steps. Returns out (B, end - start, C); no att is kept (there is no backward)."""
    B, T_max, C, NH = _check_qkv(qkv, n_head)
    for name, value in (("start", start), ("end", end)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= start < end <= T_max:
        raise ValueError(f"need 0 <= start < end <= T_max={T_max}, got start={start}, end={end}")
    out = _output("out", out, (B, end - start, C), {"qkv": qkv}, zero=False)
    _kernels.attention_forward_cached(out, qkv, int(start), int(end), NH)
    return out


# ----------------------------------------------------------------------------------------------------
# Cross-entropy
# ----------------------------------------------------------------------------------------------------

def _check_logits(logits, targets):
    _floats("logits", logits, 3)
    B, T, V = logits.shape
    targets = _indices("targets", targets, 2, V, "V")
    _shape("targets", targets, (B, T))
    return B, T, V, targets


def cross_entropy_forward(logits, targets, *, probs=None, losses=None):
    """Mean over the B*T positions of -log softmax(logits)[target].
    logits (B, T, V), targets (B, T) integers in [0, V). Returns (loss: float, probs (B, T, V))."""
    B, T, V, targets = _check_logits(logits, targets)
    probs = _output("probs", probs, (B, T, V), {"logits": logits}, zero=False)
    losses = np.empty(B * T, np.float32)
    loss = _kernels.cross_entropy_forward(probs.reshape(B * T, V), losses, logits.reshape(B * T, V),
                                          targets.reshape(-1))
    return loss, probs


def cross_entropy_backward(probs, targets, *, d_logits=None, d_loss=1.0):
    """d_logits (B, T, V) += d_loss * (probs - onehot(targets)) / (B*T)."""
    B, T, V, targets = _check_logits(_floats("probs", probs, 3), targets)
    d_loss = float(d_loss)
    if not np.isfinite(d_loss):
        raise ValueError(f"d_loss must be finite, got {d_loss}")
    d_logits = _output("d_logits", d_logits, (B, T, V), {"probs": probs}, zero=True)
    _kernels.cross_entropy_backward(d_logits.reshape(B * T, V), probs.reshape(B * T, V),
                                    targets.reshape(-1), d_loss)
    return d_logits


# ----------------------------------------------------------------------------------------------------
# Embedding
# ----------------------------------------------------------------------------------------------------

def embedding_forward(idx, wte, wpe, *, out=None):
    """out[b, t] = wte[idx[b, t]] + wpe[t]. idx (B, T) ints in [0, V), wte (V, C), wpe (block_size, C),
    T <= block_size. Returns out (B, T, C)."""
    _floats("wte", wte, 2)
    _floats("wpe", wpe, 2)
    V, C = wte.shape
    if wpe.shape[1] != C:
        raise ValueError(f"wpe must have shape (block_size, {C}) to match wte {wte.shape}, got {wpe.shape}")
    idx = _indices("idx", idx, 2, V, "V")
    B, T = idx.shape
    if T > wpe.shape[0]:
        raise ValueError(f"idx has T={T} positions, more than block_size={wpe.shape[0]}")
    out = _output("out", out, (B, T, C), {"wte": wte, "wpe": wpe}, zero=False)
    _kernels.embedding_forward(out.reshape(B * T, C), idx.reshape(-1), wte, wpe, T)
    return out


def embedding_backward(d_out, idx, vocab_size, block_size, *, d_wte=None, d_wpe=None):
    """d_wte (V, C)[idx[b, t]] += d_out[b, t] and d_wpe (block_size, C)[t] += d_out[b, t]."""
    V = _positive_int("vocab_size", vocab_size)
    block_size = _positive_int("block_size", block_size)
    _floats("d_out", d_out, 3)
    B, T, C = d_out.shape
    idx = _indices("idx", idx, 2, V, "vocab_size")
    _shape("idx", idx, (B, T))
    if T > block_size:
        raise ValueError(f"d_out has T={T} positions, more than block_size={block_size}")
    d_wte = _output("d_wte", d_wte, (V, C), {"d_out": d_out}, zero=True)
    d_wpe = _output("d_wpe", d_wpe, (block_size, C), {"d_out": d_out, "d_wte": d_wte}, zero=True)
    _kernels.embedding_backward(d_wte, d_wpe, d_out.reshape(B * T, C), idx.reshape(-1), T)
    return d_wte, d_wpe


# ----------------------------------------------------------------------------------------------------
# AdamW
# ----------------------------------------------------------------------------------------------------

def adamw_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step):
    """One AdamW step (torch.optim.AdamW's formula), in place on param, m and v; any shape.
    step is the 1-based step count used for bias correction."""
    _floats("param", param)
    for name, array in (("grad", grad), ("m", m), ("v", v)):
        _floats(name, array)
        _shape(name, array, param.shape)
    for name, array in (("param", param), ("m", m), ("v", v)):
        if not array.flags.writeable:
            raise ValueError(f"{name} must be writeable")
    _no_overlap({"param": param, "grad": grad, "m": m, "v": v})
    step = _positive_int("step", step)
    for name, value in (("lr", lr), ("eps", eps), ("weight_decay", weight_decay)):
        if not (np.isfinite(value) and value >= 0):
            raise ValueError(f"{name} must be finite and >= 0, got {value}")
    for name, value in (("beta1", beta1), ("beta2", beta2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    _kernels.adamw_update(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                          float(lr), float(beta1), float(beta2), float(eps), float(weight_decay), step)


def sum_of_squares(x, partials=None):
    """sum(x**2) over every element, as a Python float: the squared norm gradient clipping needs.
    Deterministic: the same result for any thread count."""
    _floats("x", x)
    partials = np.empty(-(-x.size // 4096), np.float64)
    return _kernels.sum_of_squares(partials, x.reshape(-1))
