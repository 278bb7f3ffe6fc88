"""The math of each kernel as plain numpy expressions: the yardstick the benchmarks hold gptcore to.

WHAT'S GOING ON HERE
  Each function is what a numpy user would write for the same forward or backward, vectorized, with
  the temporaries numpy makes along the way. They return new arrays (no accumulation); the benchmarks
  only time them. Shapes follow gptcore's letters: B T C NH hs V N.
"""
import numpy as np

GELU_SCALE = np.float32(np.sqrt(2.0 / np.pi))


def matmul_forward(inp, weight, bias, out):
    np.matmul(inp, weight, out=out)
    out += bias
    return out


def matmul_backward(d_out, inp, weight):
    return d_out @ weight.T, inp.T @ d_out, d_out.sum(0)


def softmax_forward(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def softmax_backward(d_probs, probs):
    return probs * (d_probs - (probs * d_probs).sum(-1, keepdims=True))


def gelu_forward(x):
    return 0.5 * x * (1 + np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3)))


def gelu_backward(d_out, x):
    th = np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3))
    return d_out * (0.5 * (1 + th) + 0.5 * x * (1 - th * th) * GELU_SCALE * (1 + 3 * 0.044715 * x * x))


def layernorm_forward(x, weight, bias):
    mean = x.mean(-1, keepdims=True)
    rstd = 1 / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    return (x - mean) * rstd * weight + bias, mean, rstd


def layernorm_backward(d_out, x, weight, mean, rstd):
    xhat = (x - mean) * rstd
    g = d_out * weight
    d_x = rstd * (g - g.mean(-1, keepdims=True) - xhat * (g * xhat).mean(-1, keepdims=True))
    return d_x, (d_out * xhat).sum(0), d_out.sum(0)


def _heads(qkv, n_head):
    B, T, C3 = qkv.shape
    C = C3 // 3
    q, k, v = np.split(qkv, 3, axis=2)                                 # 3 x (B, T, C)
    split = lambda a: a.reshape(B, T, n_head, C // n_head).transpose(0, 2, 1, 3)   # (B, NH, T, hs)
    return split(q), split(k), split(v)


def attention_forward(qkv, n_head):
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, n_head)
    scores = q @ k.transpose(0, 1, 3, 2) / np.sqrt(q.shape[-1])        # (B, NH, T, T)
    scores = np.where(np.tril(np.ones((T, T), bool)), scores, -np.inf)
    att = softmax_forward(scores)
    out = (att @ v).transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)       # (B, T, C)
    return out, att


def attention_backward(d_out, qkv, att, n_head):
    B, T, C3 = qkv.shape
    q, k, v = _heads(qkv, n_head)
    hs = q.shape[-1]
    d_o = d_out.reshape(B, T, n_head, hs).transpose(0, 2, 1, 3)        # (B, NH, T, hs)
    d_v = att.transpose(0, 1, 3, 2) @ d_o
    d_att = d_o @ v.transpose(0, 1, 3, 2)
    d_scores = softmax_backward(d_att, att) / np.sqrt(hs)
    d_q = d_scores @ k
    d_k = d_scores.transpose(0, 1, 3, 2) @ q
    merge = lambda a: a.transpose(0, 2, 1, 3).reshape(B, T, C3 // 3)
    return np.concatenate([merge(d_q), merge(d_k), merge(d_v)], axis=2)


def cross_entropy_forward(logits, targets):
    probs = softmax_forward(logits)
    picked = np.take_along_axis(probs, targets[..., None], axis=-1)
    return -np.log(picked).mean(), probs


def cross_entropy_backward(probs, targets):
    d_logits = probs.copy()
    np.put_along_axis(d_logits, targets[..., None], np.take_along_axis(probs, targets[..., None], -1) - 1, -1)
    return d_logits / targets.size


def embedding_forward(idx, wte, wpe):
    return wte[idx] + wpe[: idx.shape[1]]


def embedding_backward(d_out, idx, vocab_size, block_size):
    d_wte = np.zeros((vocab_size, d_out.shape[2]), np.float32)
    np.add.at(d_wte, idx, d_out)
    d_wpe = np.zeros((block_size, d_out.shape[2]), np.float32)
    d_wpe[: idx.shape[1]] = d_out.sum(0)
    return d_wte, d_wpe


def residual_forward(a, b):
    return a + b


def adamw_update(param, grad, m, v, lr, beta1, beta2, eps, weight_decay, step):
    param *= 1 - lr * weight_decay
    m *= beta1
    m += (1 - beta1) * grad
    v *= beta2
    v += (1 - beta2) * grad * grad
    param -= lr / (1 - beta1 ** step) * m / (np.sqrt(v) / np.sqrt(1 - beta2 ** step) + eps)
