"""gptcore.compiled: the one adapter over the compiled kernels (gptcore._kernels). No checks.

WHAT'S GOING ON HERE
====================

WHAT
  Every kernel of gptcore._kernels under the name and signature of its twin in gptcore.reference:
  inputs first, outputs as keyword arguments, each function returning what its twin returns. This
  module only translates: it orders the arguments as the compiled code wants them (outputs first, as
  in llm.c), flattens leading dimensions ((B, T, C) -> (N, C)), and allocates scratch space the
  caller did not pass. It is the only module in gptcore that imports gptcore._kernels.

WHO CHECKS WHAT
  This module: nothing. Every output buffer is required (keyword-only, no default) and is written in
  place; a wrong dtype, shape, contiguity, a token id out of range or an output that aliases an input
  reads or writes stray memory, because the compiled loops run with bounds checks off (setup.py).
  gptcore.kernels: everything, for users. Each of its functions validates its arguments
  (gptcore.validate), allocates the outputs the caller left out, and then calls the function of the
  same name here.
  gptcore.model: builds every buffer it passes here itself, with shapes that follow from its config,
  and checks what comes from outside (token ids, targets, T <= block_size) once per forward, in
  GPT.forward. A checked call costs microseconds of Python before any arithmetic starts; a generated
  token is a few dozen kernel calls of tens of microseconds each, so the model cannot afford them.

CONTRACT
  float32, C-contiguous arrays; token ids (idx, targets) C-contiguous int64. Forward outputs are
  overwritten; backward outputs are accumulated (+=), exactly as in gptcore.reference. Scratch
  arguments (layernorm_backward's scratch, cross_entropy_forward's losses, sum_of_squares' partials)
  may be None, in which case we allocate them for this call only: nothing is kept between calls, so
  two models, or two threads, never share a buffer behind the caller's back.

TWIN
  gptcore.reference: the same names and signatures in plain Python. gptcore.backends.get picks one of
  the two for the model and the optimizers.

WAITING THREADS (GOMP_SPINCOUNT)
  Between two parallel regions, and at the barrier that ends each one, an idle OpenMP thread first
  spins (checks a flag, executes a `pause`, again) and only then sleeps in the kernel. libgomp's
  default, when neither OMP_WAIT_POLICY nor GOMP_SPINCOUNT is set, is 300,000 spins; a `pause` takes
  about 30-40 ns on current x86 cores (AMD since Zen 2, Intel since Skylake), so that is about 10 ms
  of spinning, several of the kernel's scheduler time slices (a few ms each). On a quiet machine that
  costs nothing: the spinning thread owns an otherwise idle core. On a busy one it is the collapse
  users see: a waiting thread burns its share of a core while the thread it waits for (or our own
  Python thread, between kernels) queues for that core behind the other process's threads, so the
  step spends most of its time waiting (bench/test_contention_bench.py measures it: under a competing
  2-thread load, libgomp's default makes 2 threads train several times slower than 1).
  So before gptcore._kernels is first imported, which is when libgomp is loaded and reads its
  environment, once, we set GOMP_SPINCOUNT to SPIN_COUNT unless the user has chosen a wait policy of
  their own (OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment: theirs wins). SPIN_COUNT spins are
  about 100 us: longer than the gaps between the kernels of a training step (a Python call of a few
  to a few tens of us), so on a quiet machine a worker is still spinning when the next region opens,
  as before, and about 30x shorter than a time slice, so on a busy machine a waiting thread gives its
  core back after a small fraction of a slice. gptcore/__init__.py imports this module before any
  other module that links libgomp (gptcore._ladder), so the setting holds for them too; a program
  that loaded libgomp before importing gptcore keeps the settings libgomp read then
  (tests/test_threads.py checks the order, and that an idle worker stops spinning).
"""
import os

import numpy as np

# Spins of an idle OpenMP thread before it sleeps (see WAITING THREADS above): ~100 us at ~30 ns a spin.
# Set only when the user chose no wait policy: a GOMP_SPINCOUNT of ours would override theirs, since
# libgomp lets GOMP_SPINCOUNT decide the spinning even when OMP_WAIT_POLICY is set.
SPIN_COUNT = 3000
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["GOMP_SPINCOUNT"] = str(SPIN_COUNT)

from gptcore import _kernels, dropout   # loads libgomp, which reads the environment now, once

# sum_of_squares sums x in pieces of this many elements, one partial sum each (defined once, in
# gptcore/_kernels.pyx).
CHUNK_SIZE = _kernels.CHUNK_SIZE
# The compiled module's file: gptcore.machine's cached measurements are stale once it is rebuilt.
KERNELS_FILE = _kernels.__file__

__all__ = [
    "matmul_forward", "matmul_backward",
    "softmax_forward", "softmax_backward",
    "gelu_forward", "gelu_backward",
    "residual_forward", "residual_backward",
    "dropout_forward", "dropout_backward",
    "layernorm_forward", "layernorm_backward",
    "attention_forward", "attention_backward", "attention_weights", "attention_forward_cached",
    "cross_entropy_forward", "cross_entropy_backward",
    "embedding_forward", "embedding_backward",
    "adamw_update", "sum_of_squares",
    "set_num_threads", "get_num_threads", "matmul_blocking", "set_matmul_blocking",
]

# The functions above that are settings of the compiled code, not kernels: the reference twin has none.
SETTINGS = ("set_num_threads", "get_num_threads", "matmul_blocking", "set_matmul_blocking")


def set_num_threads(n):
    """Run every kernel on n >= 1 threads from now on."""
    _kernels.set_num_threads(n)


def get_num_threads():
    """The number of threads the kernels run on."""
    return _kernels.get_num_threads()


def matmul_blocking():
    """The matmul's cache blocking, chosen from the machine's cache sizes (see _kernels._gemm)."""
    return _kernels.matmul_blocking()


def set_matmul_blocking(k_block, row_chunk_blocks):
    """Set the matmul's K block (floats) and row chunk (row blocks of 6 rows); results do not change."""
    _kernels.set_matmul_blocking(k_block, row_chunk_blocks)


def matmul_forward(inp, weight, bias=None, *, out, weight_transposed=False):
    """out (..., OC) = inp (..., IC) @ weight (IC, OC) + bias (OC,) or None; weight is (OC, IC) if
    weight_transposed. Leading dimensions are flattened to N rows."""
    _kernels.matmul_forward(out.reshape(-1, out.shape[-1]), inp.reshape(-1, inp.shape[-1]), weight, bias,
                            weight_transposed)
    return out


def matmul_backward(d_out, inp, weight, *, d_inp, d_weight, d_bias=None, weight_transposed=False):
    """d_inp (..., IC) += d_out @ weight^T, d_weight += inp^T @ d_out, d_bias (OC,) += column sums of
    d_out; d_bias=None skips the bias gradient (a layer without a bias)."""
    _kernels.matmul_backward(d_inp.reshape(-1, d_inp.shape[-1]), d_weight, d_bias,
                             d_out.reshape(-1, d_out.shape[-1]), inp.reshape(-1, inp.shape[-1]), weight,
                             weight_transposed)
    return d_inp, d_weight, d_bias


def softmax_forward(x, *, out):
    """out (N, V) = softmax of each row of x (N, V)."""
    _kernels.softmax_forward(out, x)
    return out


def softmax_backward(d_probs, probs, *, d_x):
    """d_x (N, V) += probs * (d_probs - sum(probs * d_probs, last axis))."""
    _kernels.softmax_backward(d_x, d_probs, probs)
    return d_x


def gelu_forward(x, *, out):
    """out = gelu(x), elementwise, any shape."""
    _kernels.gelu_forward(out.reshape(-1), x.reshape(-1))
    return out


def gelu_backward(d_out, x, *, d_x):
    """d_x += d_out * gelu'(x), elementwise, any shape."""
    _kernels.gelu_backward(d_x.reshape(-1), d_out.reshape(-1), x.reshape(-1))
    return d_x


def residual_forward(a, b, *, out):
    """out = a + b, any shape."""
    _kernels.residual_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))
    return out


def residual_backward(d_out, *, d_a, d_b):
    """d_a += d_out and d_b += d_out, any shape."""
    _kernels.residual_backward(d_a.reshape(-1), d_b.reshape(-1), d_out.reshape(-1))
    return d_a, d_b


def dropout_forward(x, p, key, *, out):
    """out = x * keep / (1 - p), any shape, the mask drawn from key (gptcore.dropout). out may be x."""
    _kernels.dropout_forward(out.reshape(-1), x.reshape(-1), key, dropout.threshold(p), dropout.scale(p))
    return out


def dropout_backward(d_out, p, key, *, d_x):
    """d_x += d_out * keep / (1 - p), with the mask dropout_forward drew from the same key."""
    _kernels.dropout_backward(d_x.reshape(-1), d_out.reshape(-1), key, dropout.threshold(p), dropout.scale(p))
    return d_x


def layernorm_forward(x, weight, bias, *, out, mean, rstd):
    """out (..., C) = layernorm of x (..., C) over its last axis; mean and rstd (...) are overwritten."""
    C = x.shape[-1]
    _kernels.layernorm_forward(out.reshape(-1, C), mean.reshape(-1), rstd.reshape(-1), x.reshape(-1, C),
                               weight, bias)
    return out, mean, rstd


def layernorm_backward(d_out, x, weight, mean, rstd, *, d_x, d_weight, d_bias, scratch=None):
    """Accumulate layernorm_forward's gradients into d_x (..., C), d_weight (C,), d_bias (C,).
    scratch: (N, 2C) float32 work space, N the number of rows; allocated for this call if None."""
    C = x.shape[-1]
    x2 = x.reshape(-1, C)
    if scratch is None:
        scratch = np.empty((x2.shape[0], 2 * C), np.float32)
    _kernels.layernorm_backward(d_x.reshape(-1, C), d_weight, d_bias, scratch, d_out.reshape(-1, C), x2,
                                weight, mean.reshape(-1), rstd.reshape(-1))
    return d_x, d_weight, d_bias


def attention_forward(qkv, n_head, *, out, row_max, row_sum, dropout_p=0.0, dropout_key=0):
    """out (B, T, C) and each query row's softmax max and sum, row_max and row_sum (B, NH, T), from
    qkv (B, T, 3C); dropout with probability dropout_p on the weights, its mask drawn from dropout_key."""
    _kernels.attention_forward(out, row_max, row_sum, qkv, n_head, dropout_key, dropout.threshold(dropout_p),
                               dropout.scale(dropout_p))
    return out, row_max, row_sum


def attention_backward(d_out, qkv, row_max, row_sum, n_head, *, d_qkv, dropout_p=0.0, dropout_key=0):
    """d_qkv (B, T, 3C) += the gradient of attention_forward's out, given d_out (B, T, C) and the
    forward's row_max, row_sum and dropout."""
    _kernels.attention_backward(d_qkv, d_out, qkv, row_max, row_sum, n_head, dropout_key,
                                dropout.threshold(dropout_p), dropout.scale(dropout_p))
    return d_qkv


def attention_weights(qkv, row_max, row_sum, n_head, *, out):
    """out (B, NH, T, T): attention_forward's weights (before dropout), recomputed from qkv, row_max
    and row_sum."""
    _kernels.attention_weights(out, qkv, row_max, row_sum, n_head)
    return out


def attention_forward_cached(qkv, start, end, n_head, *, out):
    """out (B, end - start, C): attention of query positions [start, end) of qkv (B, T_max, 3C)."""
    _kernels.attention_forward_cached(out, qkv, start, end, n_head)
    return out


def cross_entropy_forward(logits, targets, *, probs, losses=None):
    """(mean loss: float, probs (B, T, V)) from logits (B, T, V) and int64 targets (B, T).
    losses: (B*T,) float32 work space for the per-position losses; allocated for this call if None."""
    V = logits.shape[-1]
    targets = targets.reshape(-1)
    if losses is None:
        losses = np.empty(targets.shape[0], np.float32)
    loss = _kernels.cross_entropy_forward(probs.reshape(-1, V), losses, logits.reshape(-1, V), targets)
    return loss, probs


def cross_entropy_backward(probs, targets, *, d_logits, d_loss=1.0):
    """d_logits (B, T, V) += d_loss * (probs - onehot(targets)) / (B*T)."""
    V = probs.shape[-1]
    _kernels.cross_entropy_backward(d_logits.reshape(-1, V), probs.reshape(-1, V), targets.reshape(-1),
                                    d_loss)
    return d_logits


def embedding_forward(idx, wte, wpe, *, out):
    """out (B, T, C)[b, t] = wte[idx[b, t]] + wpe[t], idx (B, T) int64."""
    _kernels.embedding_forward(out.reshape(-1, wte.shape[1]), idx.reshape(-1), wte, wpe, idx.shape[-1])
    return out


def embedding_backward(d_out, idx, vocab_size, block_size, *, d_wte, d_wpe):
    """d_wte (V, C)[idx[b, t]] += d_out[b, t] and d_wpe (block_size, C)[t] += d_out[b, t]."""
    _kernels.embedding_backward(d_wte, d_wpe, d_out.reshape(-1, d_out.shape[-1]), idx.reshape(-1),
                                idx.shape[-1])
    return d_wte, d_wpe


def adamw_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """One AdamW step with the gradient grad * grad_scale, in place on param, m and v (any shape, all
    the same); grad is only read."""
    _kernels.adamw_update(param.reshape(-1), grad.reshape(-1), m.reshape(-1), v.reshape(-1),
                          lr, beta1, beta2, eps, weight_decay, step, grad_scale)


def sum_of_squares(x, partials=None):
    """sum(x**2) over every element of x, as a Python float, the same for any thread count.
    partials: float64 work space of at least ceil(x.size / CHUNK_SIZE) elements (one per chunk the
    kernel sums separately); allocated for this call if None."""
    if partials is None:
        partials = np.empty(-(-x.size // CHUNK_SIZE), np.float64)
    return _kernels.sum_of_squares(partials, x.reshape(-1))
