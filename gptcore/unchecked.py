"""gptcore.unchecked: the compiled kernels with gptcore.kernels' signatures and none of its checks.

WHAT'S GOING ON HERE
====================

WHAT
  The same functions as gptcore.kernels (a subset: the ones gptcore.model calls), taking the same
  arguments, with the same overwrite / accumulate rules, but going straight to gptcore._kernels:
  no dtype, shape, contiguity, range or aliasing checks, and no allocation (every output buffer must
  be passed).

WHY
  A checked call costs 5-15 microseconds of Python before the compiled code starts. A training step
  makes ~80 kernel calls and a generated token ~40, and generating one token is only ~100 microseconds
  of arithmetic, so the checks would cost more than the work. gptcore.model does not need them: it
  allocates every buffer itself (with shapes that follow from its config), and checks what comes from
  outside (token ids, targets, T <= block_size) once per forward, in GPT.forward.

CONTRACT
  For code that built every array itself, the way gptcore.model does. Anything else should call
  gptcore.kernels: a wrong shape here reads or writes past the end of an array. The tests run the
  model on this module, on gptcore.kernels' numbers (gptcore.reference backend) and against PyTorch.
"""
import numpy as np

from gptcore import _kernels

_scratch = {}       # (purpose, shape) -> a float32 work array, reused from call to call


def _scratch_array(purpose, shape):
    key = (purpose, shape)
    if key not in _scratch:
        _scratch[key] = np.empty(shape, np.float32)
    return _scratch[key]


def matmul_forward(inp, weight, bias=None, *, out, weight_transposed=False):
    _kernels.matmul_forward(out, inp, weight, bias, weight_transposed)
    return out


def matmul_backward(d_out, inp, weight, *, d_inp, d_weight, d_bias, weight_transposed=False):
    _kernels.matmul_backward(d_inp, d_weight, d_bias, d_out, inp, weight, weight_transposed)
    return d_inp, d_weight, d_bias


def layernorm_forward(x, weight, bias, *, out, mean, rstd):
    _kernels.layernorm_forward(out, mean, rstd, x, weight, bias)
    return out, mean, rstd


def layernorm_backward(d_out, x, weight, mean, rstd, *, d_x, d_weight, d_bias, scratch=None):
    N, C = x.shape
    if scratch is None:
        scratch = _scratch_array("layernorm", (N, 2 * C))
    _kernels.layernorm_backward(d_x, d_weight, d_bias, scratch, d_out, x,
                                weight, mean, rstd)
    return d_x, d_weight, d_bias


def gelu_forward(x, *, out):
    _kernels.gelu_forward(out.reshape(-1), x.reshape(-1))
    return out


def gelu_backward(d_out, x, *, d_x):
    _kernels.gelu_backward(d_x.reshape(-1), d_out.reshape(-1), x.reshape(-1))
    return d_x


def residual_forward(a, b, *, out):
    _kernels.residual_forward(out.reshape(-1), a.reshape(-1), b.reshape(-1))
    return out


def attention_forward(qkv, n_head, *, out, att):
    _kernels.attention_forward(out, att, qkv, n_head)
    return out, att


def attention_backward(d_out, qkv, att, n_head, *, d_qkv):
    _kernels.attention_backward(d_qkv, d_out, qkv, att, n_head)
    return d_qkv


def attention_forward_cached(qkv, start, end, n_head, *, out):
    _kernels.attention_forward_cached(out, qkv, start, end, n_head)
    return out


def cross_entropy_forward(logits, targets, *, probs, losses=None):
    B, T, V = logits.shape
    if losses is None:
        losses = _scratch_array("losses", (B * T,))
    loss = _kernels.cross_entropy_forward(probs.reshape(B * T, V), losses,
                                          logits.reshape(B * T, V), targets.reshape(-1))
    return loss, probs


def cross_entropy_backward(probs, targets, *, d_logits, d_loss=1.0):
    B, T, V = probs.shape
    _kernels.cross_entropy_backward(d_logits.reshape(B * T, V), probs.reshape(B * T, V), targets.reshape(-1),
                                    d_loss)
    return d_logits


def embedding_forward(idx, wte, wpe, *, out):
    B, T = idx.shape
    _kernels.embedding_forward(out.reshape(B * T, -1), idx.reshape(-1), wte, wpe, T)
    return out


def embedding_backward(d_out, idx, vocab_size, block_size, *, d_wte, d_wpe):
    B, T, C = d_out.shape
    _kernels.embedding_backward(d_wte, d_wpe, d_out.reshape(B * T, C), idx.reshape(-1), T)
    return d_wte, d_wpe
