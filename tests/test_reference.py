"""The first link in the chain of oracles: gptcore.reference against finite differences and numpy.

Every backward is checked against central differences of its own forward, every forward against a
direct numpy expression in float64, and the buffer conventions (forward overwrites, backward
accumulates) are checked for every function. Tensors are tiny so the whole file runs in seconds.

How the gradient checks work. For a forward f and a fixed random R of f's output shape we define
the scalar L(x) = sum(f(x) * R), so dL/dx is exactly what f's backward returns when handed
d_out = R. We get dL/dx numerically by central differences, (L(x + h e_i) - L(x - h e_i)) / 2h, with
x held in float64 and L summed in float64. The reference computes in double but hands back float32
arrays, so each L carries a rounding error of at most 2^-24 * sum|f(x) * R| (float32's unit roundoff
times the size of the terms), and dividing by 2h amplifies it. We compute that bound per element and
allow twice it, plus a small allowance for the O(h^2) truncation of central differences
(h^2/6 * |f'''| <= 2e-5 for |f'''| <= 12 at h = 1e-2) and for the float32 rounding of the analytic
gradient and of the caches it reads (relative ~1e-7; we allow 1e-5). With the tiny tensors here
the whole tolerance comes to between 5e-5 and 5e-4 per element, while the gradients are of order 1,
so a wrong sign, a missing term or a wrong scale fails by orders of magnitude
(test_gradient_check_rejects_a_slightly_wrong_gradient keeps the check honest).
"""

import math

import numpy as np
import pytest

from gptcore import dropout
from gptcore import reference as ref

H = 1e-2                   # finite-difference step
FLOAT32_ROUNDOFF = 2.0 ** -24
TRUNCATION_ATOL = 2e-5     # h^2/6 * |f'''|, for |f'''| up to 12
ANALYTIC_RTOL = 1e-5       # the analytic gradient and the caches it uses went through float32

B, T, C, NH, V, N = 2, 3, 4, 2, 5, 3
BLOCK_SIZE = 4


def randn(rng, *shape, scale=1.0):
    """Random float32 values, so that float32 and float64 callers see exactly the same numbers."""
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def numerical_gradient(loss_of, inputs, wrt):
    """Central differences of loss_of(inputs) w.r.t. inputs[wrt], in float64.

    loss_of returns (L, S): the scalar loss and sum|terms| that bounds its float32 rounding.
    Returns (gradient, per-element rounding bound on the gradient).
    """
    x = inputs[wrt] = inputs[wrt].astype(np.float64)
    grad = np.zeros_like(x)
    bound = np.zeros_like(x)
    for i in np.ndindex(x.shape):
        old = x[i]
        x[i] = old + H
        l_plus, s_plus = loss_of(inputs)
        x[i] = old - H
        l_minus, s_minus = loss_of(inputs)
        x[i] = old
        grad[i] = (l_plus - l_minus) / (2 * H)
        bound[i] = FLOAT32_ROUNDOFF * (s_plus + s_minus) / (2 * H)
    return grad, bound


def weighted_sum(forward, R):
    """L(inputs) = sum(forward(**inputs) * R), and sum|forward * R| for its rounding bound."""
    def loss_of(inputs):
        terms = np.asarray(forward(**inputs), dtype=np.float64) * R
        return terms.sum(), np.abs(terms).sum()
    return loss_of


def gradient_mismatch(analytic, numeric, bound):
    """Boolean mask of the elements where analytic and numeric gradients disagree beyond tolerance."""
    analytic = np.asarray(analytic, dtype=np.float64)
    tol = 2 * bound + TRUNCATION_ATOL + ANALYTIC_RTOL * np.abs(numeric)
    return np.abs(analytic - numeric) > tol


def assert_gradient_matches(analytic, forward, inputs, wrt, R):
    numeric, bound = numerical_gradient(weighted_sum(forward, R), dict(inputs), wrt)
    assert analytic.shape == numeric.shape
    bad = gradient_mismatch(analytic, numeric, bound)
    assert not bad.any(), (
        f"d{wrt}: {bad.sum()} of {bad.size} elements off; max |diff| = "
        f"{np.max(np.abs(analytic - numeric)):.3g}\nanalytic:\n{analytic}\nnumeric:\n{numeric}")
    # guard against a vacuous pass: the gradient must be clearly nonzero
    assert np.max(np.abs(numeric)) > 1e-2


# ----------------------------------------------------------------------------------------------------
# Finite-difference checks, one per backward and per input it differentiates.


@pytest.mark.parametrize("wrt", ["inp", "weight", "bias"])
def test_matmul_backward_matches_finite_differences(wrt):
    rng = np.random.default_rng(0)
    inputs = {"inp": randn(rng, N, C), "weight": randn(rng, C, 5), "bias": randn(rng, 5)}
    R = randn(rng, N, 5)
    d_inp, d_weight, d_bias = ref.matmul_backward(R, inputs["inp"], inputs["weight"],
                                                  d_bias=np.zeros(5, np.float32))
    analytic = {"inp": d_inp, "weight": d_weight, "bias": d_bias}[wrt]
    assert_gradient_matches(analytic, ref.matmul_forward, inputs, wrt, R)


def test_matmul_backward_without_bias_matches_finite_differences():
    rng = np.random.default_rng(1)
    inputs = {"inp": randn(rng, N, C), "weight": randn(rng, C, 2)}
    R = randn(rng, N, 2)
    d_inp, d_weight, _ = ref.matmul_backward(R, inputs["inp"], inputs["weight"])
    assert_gradient_matches(d_inp, ref.matmul_forward, inputs, "inp", R)
    assert_gradient_matches(d_weight, ref.matmul_forward, inputs, "weight", R)


def test_softmax_backward_matches_finite_differences():
    rng = np.random.default_rng(2)
    x = randn(rng, N, V, scale=2.0)
    R = randn(rng, N, V)
    d_x = ref.softmax_backward(R, ref.softmax_forward(x))
    assert_gradient_matches(d_x, ref.softmax_forward, {"x": x}, "x", R)


def test_gelu_backward_matches_finite_differences():
    rng = np.random.default_rng(3)
    x = randn(rng, B, T, C, scale=1.5)   # any shape: a 3-D one here
    R = randn(rng, B, T, C)
    d_x = ref.gelu_backward(R, x)
    assert_gradient_matches(d_x, ref.gelu_forward, {"x": x}, "x", R)


@pytest.mark.parametrize("wrt", ["x", "weight", "bias"])
def test_layernorm_backward_matches_finite_differences(wrt):
    rng = np.random.default_rng(4)
    inputs = {"x": randn(rng, N, C), "weight": randn(rng, C), "bias": randn(rng, C)}
    R = randn(rng, N, C)
    _, mean, rstd = ref.layernorm_forward(inputs["x"], inputs["weight"], inputs["bias"])
    d_x, d_weight, d_bias = ref.layernorm_backward(R, inputs["x"], inputs["weight"], mean, rstd)
    analytic = {"x": d_x, "weight": d_weight, "bias": d_bias}[wrt]

    def forward(x, weight, bias):
        return ref.layernorm_forward(x, weight, bias)[0]

    assert_gradient_matches(analytic, forward, inputs, wrt, R)


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_attention_backward_matches_finite_differences(n_head):
    rng = np.random.default_rng(5)
    qkv = randn(rng, B, T, 3 * C)
    R = randn(rng, B, T, C)
    _, row_max, row_sum = ref.attention_forward(qkv, n_head)
    d_qkv = ref.attention_backward(R, qkv, row_max, row_sum, n_head)

    def forward(qkv):
        return ref.attention_forward(qkv, n_head)[0]

    assert_gradient_matches(d_qkv, forward, {"qkv": qkv}, "qkv", R)
    # position 0's query sees only its own key, so its softmax is constant (att = 1): no gradient
    assert np.all(d_qkv[:, 0, :C] == 0.0)


# One fixed mask (a fixed key) per test: with the mask held still, dropout is linear in its input,
# and the finite differences see the same mask the backward regenerates.
DROPOUT_KEY = dropout.Dropout(p=0.5, seed=1337, counter=3).key(1, dropout.ATTENTION_WEIGHTS)


@pytest.mark.parametrize("n_head", [1, 2])
def test_attention_backward_with_dropout_matches_finite_differences(n_head):
    rng = np.random.default_rng(5)
    Tl = 5                              # 2 * 15 weights per head: some kept, some dropped
    qkv = randn(rng, B, Tl, 3 * C)
    R = randn(rng, B, Tl, C)
    drop = dict(dropout_p=0.5, dropout_key=DROPOUT_KEY)
    _, row_max, row_sum = ref.attention_forward(qkv, n_head, **drop)
    d_qkv = ref.attention_backward(R, qkv, row_max, row_sum, n_head, **drop)

    def forward(qkv):
        return ref.attention_forward(qkv, n_head, **drop)[0]

    assert_gradient_matches(d_qkv, forward, {"qkv": qkv}, "qkv", R)
    # the mask matters: without dropout the gradient is another one
    assert not np.allclose(d_qkv, ref.attention_backward(R, qkv, row_max, row_sum, n_head), atol=1e-3)


def test_dropout_backward_matches_finite_differences():
    rng = np.random.default_rng(18)
    x = randn(rng, B, T, C)
    R = randn(rng, B, T, C)
    d_x = ref.dropout_backward(R, 0.3, DROPOUT_KEY)

    def forward(x):
        return ref.dropout_forward(x, 0.3, DROPOUT_KEY)

    assert_gradient_matches(d_x, forward, {"x": x}, "x", R)
    assert np.any(d_x == 0) and np.any(d_x != 0)    # some dropped, some kept


def test_cross_entropy_backward_matches_finite_differences():
    rng = np.random.default_rng(6)
    logits = randn(rng, B, T, V, scale=2.0)
    targets = rng.integers(0, V, size=(B, T))
    d_loss = 0.7   # a scalar R: L = loss * d_loss
    _, probs = ref.cross_entropy_forward(logits, targets)
    d_logits = ref.cross_entropy_backward(probs, targets, d_loss=d_loss)

    def forward(logits):
        # the loss is a Python float computed in double: no float32 rounding in it at all
        return ref.cross_entropy_forward(logits, targets)[0]

    assert_gradient_matches(d_logits, forward, {"logits": logits}, "logits", d_loss)


@pytest.mark.parametrize("wrt", ["wte", "wpe"])
def test_embedding_backward_matches_finite_differences(wrt):
    rng = np.random.default_rng(7)
    idx = np.array([[1, 3, 1], [0, 1, 4]])   # token 1 three times, token 2 never
    inputs = {"wte": randn(rng, V, C), "wpe": randn(rng, BLOCK_SIZE, C)}
    R = randn(rng, B, T, C)
    d_wte, d_wpe = ref.embedding_backward(R, idx, V, BLOCK_SIZE)
    analytic = {"wte": d_wte, "wpe": d_wpe}[wrt]

    def forward(wte, wpe):
        return ref.embedding_forward(idx, wte, wpe)

    numeric, bound = numerical_gradient(weighted_sum(forward, R), dict(inputs), wrt)
    assert not gradient_mismatch(analytic, numeric, bound).any(), (analytic, numeric)
    if wrt == "wte":
        assert np.all(d_wte[2] == 0)   # an unused token gets no gradient
        np.testing.assert_allclose(d_wte[1], R[0, 0] + R[0, 2] + R[1, 1], rtol=1e-6)
    else:
        assert np.all(d_wpe[T:] == 0)  # positions beyond T get no gradient


@pytest.mark.parametrize("wrt", ["a", "b"])
def test_residual_backward_matches_finite_differences(wrt):
    rng = np.random.default_rng(8)
    inputs = {"a": randn(rng, B, T, C), "b": randn(rng, B, T, C)}
    R = randn(rng, B, T, C)
    d_a, d_b = ref.residual_backward(R)
    analytic = {"a": d_a, "b": d_b}[wrt]
    assert_gradient_matches(analytic, ref.residual_forward, inputs, wrt, R)


def test_gradient_check_rejects_a_slightly_wrong_gradient():
    # The checker itself must be able to fail: a layernorm d_x off by 1% is caught.
    rng = np.random.default_rng(4)
    x, w, b = randn(rng, N, C), randn(rng, C), randn(rng, C)
    R = randn(rng, N, C)
    _, mean, rstd = ref.layernorm_forward(x, w, b)
    d_x, _, _ = ref.layernorm_backward(R, x, w, mean, rstd)

    def forward(x):
        return ref.layernorm_forward(x, w, b)[0]

    numeric, bound = numerical_gradient(weighted_sum(forward, R), {"x": x}, "x")
    assert not gradient_mismatch(d_x, numeric, bound).any()
    assert gradient_mismatch(d_x * 1.01, numeric, bound).any()


# ----------------------------------------------------------------------------------------------------
# Buffer conventions: backward accumulates, forward overwrites.


def _backward_cases():
    """name -> (call(buffers or None) -> tuple of gradients, tuple of buffer keyword names)."""
    rng = np.random.default_rng(9)
    x, w = randn(rng, N, C), randn(rng, C, 5)
    d5 = randn(rng, N, 5)
    sx = randn(rng, N, V)
    probs = ref.softmax_forward(sx)
    dsx = randn(rng, N, V)
    g = randn(rng, B, T, C)
    lw, lb = randn(rng, C), randn(rng, C)
    _, mean, rstd = ref.layernorm_forward(x, lw, lb)
    dln = randn(rng, N, C)
    qkv = randn(rng, B, T, 3 * C)
    _, row_max, row_sum = ref.attention_forward(qkv, NH)
    dat = randn(rng, B, T, C)
    logits = randn(rng, B, T, V)
    targets = rng.integers(0, V, size=(B, T))
    _, ce_probs = ref.cross_entropy_forward(logits, targets)
    idx = rng.integers(0, V, size=(B, T))
    return {
        # d_bias=None skips the bias gradient, so the call without buffers passes a zeroed one
        "matmul": (lambda **k: ref.matmul_backward(d5, x, w, **{"d_bias": np.zeros(5, np.float32), **k}),
                   ("d_inp", "d_weight", "d_bias")),
        "softmax": (lambda **k: (ref.softmax_backward(dsx, probs, **k),), ("d_x",)),
        "gelu": (lambda **k: (ref.gelu_backward(g, g * 0.5, **k),), ("d_x",)),
        "layernorm": (lambda **k: ref.layernorm_backward(dln, x, lw, mean, rstd, **k),
                      ("d_x", "d_weight", "d_bias")),
        "attention": (lambda **k: (ref.attention_backward(dat, qkv, row_max, row_sum, NH, dropout_p=0.5,
                                                          dropout_key=DROPOUT_KEY, **k),), ("d_qkv",)),
        "dropout": (lambda **k: (ref.dropout_backward(g, 0.5, DROPOUT_KEY, **k),), ("d_x",)),
        "cross_entropy": (lambda **k: (ref.cross_entropy_backward(ce_probs, targets, d_loss=0.3, **k),),
                          ("d_logits",)),
        "embedding": (lambda **k: ref.embedding_backward(g, idx, V, BLOCK_SIZE, **k), ("d_wte", "d_wpe")),
        "residual": (lambda **k: ref.residual_backward(g, **k), ("d_a", "d_b")),
    }


BACKWARDS = list(_backward_cases())


@pytest.mark.parametrize("name", BACKWARDS)
def test_backward_twice_into_the_same_buffers_gives_exactly_twice(name):
    call, names = _backward_cases()[name]
    fresh = call()
    assert all(f.dtype == np.float32 for f in fresh)
    buffers = {n: np.zeros_like(f) for n, f in zip(names, fresh)}
    returned = call(**buffers)
    assert all(r is buffers[n] for r, n in zip(returned, names))   # returns the buffers themselves
    call(**buffers)
    for n, f in zip(names, fresh):
        assert np.array_equal(buffers[n], 2 * f), n   # doubling is exact in float32
        assert np.abs(f).max() > 0, n


@pytest.mark.parametrize("name", BACKWARDS)
def test_backward_adds_to_what_the_buffers_already_hold(name):
    call, names = _backward_cases()[name]
    fresh = call()
    start = {n: np.full_like(f, 0.25) for n, f in zip(names, fresh)}
    buffers = {n: s.copy() for n, s in start.items()}
    call(**buffers)
    for n, f in zip(names, fresh):
        assert np.array_equal(buffers[n], start[n] + f), n


def _forward_cases():
    """name -> (call(buffers or None) -> tuple of outputs, tuple of buffer keyword names)."""
    rng = np.random.default_rng(10)
    x, w, bias = randn(rng, N, C), randn(rng, C, 5), randn(rng, 5)
    lw, lb = randn(rng, C), randn(rng, C)
    qkv = randn(rng, B, T, 3 * C)
    logits = randn(rng, B, T, V)
    targets = rng.integers(0, V, size=(B, T))
    idx = rng.integers(0, V, size=(B, T))
    wte, wpe = randn(rng, V, C), randn(rng, BLOCK_SIZE, C)
    a, b = randn(rng, B, T, C), randn(rng, B, T, C)
    return {
        "matmul": (lambda **k: (ref.matmul_forward(x, w, bias, **k),), ("out",)),
        "softmax": (lambda **k: (ref.softmax_forward(x, **k),), ("out",)),
        "gelu": (lambda **k: (ref.gelu_forward(a, **k),), ("out",)),
        "layernorm": (lambda **k: ref.layernorm_forward(x, lw, lb, **k), ("out", "mean", "rstd")),
        "attention": (lambda **k: ref.attention_forward(qkv, NH, dropout_p=0.5, dropout_key=DROPOUT_KEY, **k),
                      ("out", "row_max", "row_sum")),
        "attention_weights": (lambda **k: (ref.attention_weights(qkv, *ref.attention_forward(qkv, NH)[1:], NH,
                                                                 **k),), ("out",)),
        "dropout": (lambda **k: (ref.dropout_forward(a, 0.5, DROPOUT_KEY, **k),), ("out",)),
        "cross_entropy": (lambda **k: ref.cross_entropy_forward(logits, targets, **k)[1:], ("probs",)),
        "embedding": (lambda **k: (ref.embedding_forward(idx, wte, wpe, **k),), ("out",)),
        "residual": (lambda **k: (ref.residual_forward(a, b, **k),), ("out",)),
    }


@pytest.mark.parametrize("name", list(_forward_cases()))
def test_forward_overwrites_the_buffers_it_is_given(name):
    call, names = _forward_cases()[name]
    fresh = call()
    buffers = {n: np.full_like(f, np.nan) for n, f in zip(names, fresh)}
    returned = call(**buffers)
    for r, n, f in zip(returned, names, fresh):
        assert r is buffers[n]
        assert r.dtype == np.float32
        assert np.array_equal(r, f), n


# ----------------------------------------------------------------------------------------------------
# Forwards against direct numpy expressions in float64. Outputs are float32, so rtol ~ 2^-24 plus
# the float64-vs-double summation-order difference: 1e-6.

def f64(a):
    return np.asarray(a, dtype=np.float64)


def test_matmul_forward_matches_numpy():
    rng = np.random.default_rng(11)
    x, w, b = randn(rng, 7, 3), randn(rng, 3, 5), randn(rng, 5)
    np.testing.assert_allclose(ref.matmul_forward(x, w, b), f64(x) @ f64(w) + f64(b), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(ref.matmul_forward(x, w), f64(x) @ f64(w), rtol=1e-6, atol=1e-7)


def test_matmul_backward_matches_numpy():
    rng = np.random.default_rng(12)
    x, w, d = randn(rng, 7, 3), randn(rng, 3, 5), randn(rng, 7, 5)
    d_inp, d_weight, d_bias = ref.matmul_backward(d, x, w, d_bias=np.zeros(5, np.float32))
    np.testing.assert_allclose(d_inp, f64(d) @ f64(w).T, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d_weight, f64(x).T @ f64(d), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(d_bias, f64(d).sum(0), rtol=1e-6, atol=1e-7)


def np_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_softmax_forward_matches_numpy():
    rng = np.random.default_rng(13)
    x = randn(rng, N, V, scale=3.0)
    x[0, 0] = 80.0   # exp(80) overflows float32: the max subtraction must be there
    probs = ref.softmax_forward(x)
    np.testing.assert_allclose(probs, np_softmax(f64(x)), rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-6)


def np_gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))


def test_gelu_forward_matches_numpy():
    rng = np.random.default_rng(14)
    x = randn(rng, 2, 3, 5, scale=3.0)
    np.testing.assert_allclose(ref.gelu_forward(x), np_gelu(f64(x)), rtol=1e-6, atol=1e-7)
    assert ref.gelu_forward(np.zeros((1,), np.float32))[0] == 0.0


def test_gelu_backward_matches_float64_numpy_central_differences():
    x = np.linspace(-4, 4, 17).astype(np.float32)
    d_x = ref.gelu_backward(np.ones_like(x), x)
    # central difference of numpy's gelu in pure float64: no float32 in the way, so tight
    h = 1e-5
    numeric = (np_gelu(f64(x) + h) - np_gelu(f64(x) - h)) / (2 * h)
    np.testing.assert_allclose(d_x, numeric, rtol=1e-6, atol=1e-7)


def test_layernorm_forward_matches_numpy():
    rng = np.random.default_rng(15)
    x, w, b = randn(rng, 5, 6), randn(rng, 6), randn(rng, 6)
    x[1] += 100.0   # a large mean: the centred variance must not lose the spread
    out, mean, rstd = ref.layernorm_forward(x, w, b)
    xd = f64(x)
    mu = xd.mean(-1)
    var = xd.var(-1)   # numpy's default ddof=0: the biased variance, as the spec says
    rs = 1 / np.sqrt(var + 1e-5)
    np.testing.assert_allclose(mean, mu, rtol=1e-6)
    np.testing.assert_allclose(rstd, rs, rtol=1e-6)
    np.testing.assert_allclose(out, (xd - mu[:, None]) * rs[:, None] * f64(w) + f64(b), rtol=1e-6, atol=1e-6)


def np_attention(qkv, n_head):
    Bq, Tq, C3 = qkv.shape
    Cq = C3 // 3
    hs = Cq // n_head
    q, k, v = qkv[..., :Cq], qkv[..., Cq:2 * Cq], qkv[..., 2 * Cq:]

    def heads(a):                                   # (B, T, C) -> (B, NH, T, hs)
        return a.reshape(Bq, Tq, n_head, hs).transpose(0, 2, 1, 3)

    scores = heads(q) @ heads(k).transpose(0, 1, 3, 2) / np.sqrt(hs)   # (B, NH, T, T)
    future = np.triu(np.ones((Tq, Tq), bool), k=1)
    scores = np.where(future, -np.inf, scores)
    att = np_softmax(scores)
    out = (att @ heads(v)).transpose(0, 2, 1, 3).reshape(Bq, Tq, Cq)   # (B, T, C)
    return out, att


@pytest.mark.parametrize("n_head", [1, 2, 4])
def test_attention_forward_matches_numpy(n_head):
    rng = np.random.default_rng(16)
    qkv = randn(rng, B, 5, 3 * C)
    out, row_max, row_sum = ref.attention_forward(qkv, n_head)
    att = ref.attention_weights(qkv, row_max, row_sum, n_head)
    out_np, att_np = np_attention(f64(qkv), n_head)
    np.testing.assert_allclose(out, out_np, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(att, att_np, rtol=1e-6, atol=1e-7)
    # the row statistics the backward recomputes att from: m = the row's largest score, and
    # Z = sum_s exp(score_s - m), so that att = exp(score - m) / Z
    hs = C // n_head
    q, k = (f64(qkv[..., i * C:(i + 1) * C]).reshape(B, 5, n_head, hs).transpose(0, 2, 1, 3) for i in range(2))
    scores = np.where(np.tril(np.ones((5, 5), bool)), q @ k.transpose(0, 1, 3, 2) / np.sqrt(hs), -np.inf)
    np.testing.assert_allclose(row_max, scores.max(-1), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(row_sum, np.exp(scores - scores.max(-1, keepdims=True)).sum(-1), rtol=1e-6)


def test_attention_is_causal_with_zero_future_weights_and_rows_summing_to_one():
    rng = np.random.default_rng(17)
    Tl = 5
    qkv = randn(rng, B, Tl, 3 * C)
    out, row_max, row_sum = ref.attention_forward(qkv, NH)
    att = ref.attention_weights(qkv, row_max, row_sum, NH)
    future = np.triu(np.ones((Tl, Tl), bool), k=1)
    assert np.all(att[..., future] == 0.0)            # exactly zero, not merely tiny
    assert np.all(att[..., ~future] > 0.0)
    np.testing.assert_allclose(att.sum(-1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(att[:, :, 0, 0], 1.0)   # the first position can only see itself
    # changing the future does not change the past: perturb position 3 onwards
    changed = qkv.copy()
    changed[:, 3:] += randn(rng, B, Tl - 3, 3 * C)
    out2 = ref.attention_forward(changed, NH)[0]
    np.testing.assert_array_equal(out2[:, :3], out[:, :3])
    assert not np.array_equal(out2[:, 3:], out[:, 3:])


def test_cross_entropy_forward_matches_numpy():
    rng = np.random.default_rng(18)
    logits = randn(rng, B, T, V, scale=3.0)
    targets = rng.integers(0, V, size=(B, T)).astype(np.int32)   # any integer dtype
    loss, probs = ref.cross_entropy_forward(logits, targets)
    p = np_softmax(f64(logits))
    picked = np.take_along_axis(p, targets[..., None].astype(np.int64), -1)[..., 0]
    assert isinstance(loss, float)
    assert loss == pytest.approx(-np.log(picked).mean(), rel=1e-12)   # both in double
    np.testing.assert_allclose(probs, p, rtol=1e-6, atol=1e-12)


def test_cross_entropy_of_uniform_logits_is_log_vocab_size():
    loss, _ = ref.cross_entropy_forward(np.zeros((B, T, V), np.float32), np.zeros((B, T), np.int64))
    assert loss == pytest.approx(math.log(V), rel=1e-12)


def test_cross_entropy_backward_matches_numpy():
    rng = np.random.default_rng(19)
    logits = randn(rng, B, T, V)
    targets = rng.integers(0, V, size=(B, T))
    _, probs = ref.cross_entropy_forward(logits, targets)
    d = ref.cross_entropy_backward(probs, targets, d_loss=2.0)
    onehot = np.eye(V)[targets]
    np.testing.assert_allclose(d, 2.0 * (f64(probs) - onehot) / (B * T), rtol=1e-6, atol=1e-8)
    np.testing.assert_allclose(d.sum(-1), 0.0, atol=1e-7)   # each row of (probs - onehot) sums to 0


def test_embedding_forward_matches_numpy():
    rng = np.random.default_rng(20)
    idx = rng.integers(0, V, size=(B, T)).astype(np.uint8)
    wte, wpe = randn(rng, V, C), randn(rng, BLOCK_SIZE, C)
    out = ref.embedding_forward(idx, wte, wpe)
    np.testing.assert_array_equal(out, (f64(wte)[idx] + f64(wpe)[:T]).astype(np.float32))


def test_residual_forward_matches_numpy():
    rng = np.random.default_rng(21)
    a, b = randn(rng, 2, 3, 4), randn(rng, 2, 3, 4)
    np.testing.assert_array_equal(ref.residual_forward(a, b), (f64(a) + f64(b)).astype(np.float32))


# ----------------------------------------------------------------------------------------------------
# AdamW against a hand-written numpy version, two steps (the second one exercises bias correction
# with t = 2 and moments that are no longer zero).


def np_adamw_step(p, g, m, v, lr, b1, b2, eps, wd, t):
    """One step in float64 from float32 state, rounded back to float32, in torch's order."""
    p, g, m, v = f64(p), f64(g), f64(m), f64(v)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    m_hat = m / (1 - b1 ** t)
    v_hat = v / (1 - b2 ** t)
    p = p * (1 - lr * wd)
    p = p - lr * m_hat / (np.sqrt(v_hat) + eps)
    return p.astype(np.float32), m.astype(np.float32), v.astype(np.float32)


def test_adamw_update_matches_two_numpy_steps():
    rng = np.random.default_rng(22)
    hp = dict(lr=1e-2, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1)
    param = randn(rng, 3, 4)
    initial = param.copy()
    m, v = np.zeros_like(param), np.zeros_like(param)
    p_np, m_np, v_np = param.copy(), m.copy(), v.copy()
    for step in (1, 2):
        grad = randn(rng, 3, 4)
        ref.adamw_update(param, grad, m, v, step=step, **hp)
        p_np, m_np, v_np = np_adamw_step(p_np, grad, m_np, v_np, hp["lr"], hp["beta1"], hp["beta2"],
                                         hp["eps"], hp["weight_decay"], step)
        np.testing.assert_allclose(m, m_np, rtol=1e-6)
        np.testing.assert_allclose(v, v_np, rtol=1e-6)
        np.testing.assert_allclose(param, p_np, rtol=1e-6, atol=1e-8)
    # two steps of size ~lr each: the parameters really moved
    assert np.abs(param - initial).max() > hp["lr"]


def test_adamw_first_step_moves_each_weight_by_about_lr_against_its_gradient():
    param = np.array([1.0, -1.0, 0.5], np.float32)
    grad = np.array([3.0, -0.2, 1e-3], np.float32)
    m, v = np.zeros_like(param), np.zeros_like(param)
    ref.adamw_update(param, grad, m, v, lr=0.1, beta1=0.9, beta2=0.999, eps=1e-8,
                     weight_decay=0.0, step=1)
    # step 1: m_hat = g and v_hat = g^2, so the update is lr * g/|g| = lr * sign(g)
    np.testing.assert_allclose(param, [0.9, -0.9, 0.4], rtol=1e-5)


def test_adamw_update_rejects_step_zero():
    p = np.zeros(3, np.float32)
    with pytest.raises(ValueError):
        ref.adamw_update(p, p.copy(), p.copy(), p.copy(), lr=1e-3, beta1=0.9, beta2=0.999,
                         eps=1e-8, weight_decay=0.0, step=0)


# ----------------------------------------------------------------------------------------------------
# The few argument checks the reference does make.


def test_inconsistent_shapes_raise_value_error():
    f = np.zeros
    with pytest.raises(ValueError):
        ref.matmul_forward(f((2, 3), np.float32), f((4, 5), np.float32))
    with pytest.raises(ValueError):
        ref.matmul_forward(f((2, 3), np.float32), f((3, 5), np.float32), f((4,), np.float32))
    with pytest.raises(ValueError):
        ref.layernorm_forward(f((2, 3), np.float32), f((4,), np.float32), f((3,), np.float32))
    with pytest.raises(ValueError):
        ref.residual_forward(f((2, 3), np.float32), f((3, 2), np.float32))
    with pytest.raises(ValueError):
        ref.softmax_forward(f((2, 3, 4), np.float32))
    with pytest.raises(ValueError):
        ref.matmul_forward(f((2, 3), np.float32), f((3, 5), np.float32), out=f((2, 4), np.float32))
    with pytest.raises(ValueError):
        ref.gelu_backward(f((2, 3), np.float32), f((3,), np.float32))


@pytest.mark.parametrize("n_head", [0, -1, 3])
def test_attention_rejects_a_head_count_that_does_not_divide_c(n_head):
    with pytest.raises(ValueError):
        ref.attention_forward(np.zeros((1, 2, 3 * C), np.float32), n_head)


def test_out_of_range_ids_and_too_long_sequences_raise_value_error():
    wte, wpe = np.zeros((V, C), np.float32), np.zeros((BLOCK_SIZE, C), np.float32)
    with pytest.raises(ValueError):
        ref.embedding_forward(np.array([[0, V]]), wte, wpe)
    with pytest.raises(ValueError):
        ref.embedding_forward(np.array([[-1, 0]]), wte, wpe)
    with pytest.raises(ValueError):
        ref.embedding_forward(np.zeros((1, BLOCK_SIZE + 1), np.int64), wte, wpe)
    with pytest.raises(ValueError):
        ref.cross_entropy_forward(np.zeros((1, 2, V), np.float32), np.array([[0, V]]))
    with pytest.raises(TypeError):
        ref.cross_entropy_forward(np.zeros((1, 2, V), np.float32), np.array([[0.0, 1.0]]))


def test_output_buffers_of_the_wrong_dtype_raise_type_error():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(TypeError):
        ref.gelu_forward(x, out=np.zeros((2, 3), np.float64))
    with pytest.raises(TypeError):
        ref.gelu_backward(x, x, d_x=np.zeros((2, 3), np.float64))
