"""Each compiled kernel at GPT training size, side by side with numpy and the pure-Python reference.

WHAT'S GOING ON HERE
  `pytest bench/` (or `make bench`, which also unsets OPENBLAS_NUM_THREADS and OPENBLAS_L2_SIZE, which
  some environments set and which make numpy's OpenBLAS slower) runs every kernel as the compiled
  kernel, as numpy expressions and as the pure-Python reference (the matmul forward also as the
  ladder's naive rung), and prints a ratio table at the end (bench/conftest.py).
  Sizes are the baby GPT's: N = B*T = 768 rows, C = 128, widths 3C = 384, 4C = 512, V = 65.
  Matmul also runs at 1024^3, and its "work" is flops, so the table shows GFLOP/s.
  The reference is timed on REFERENCE_ROWS rows (or one batch row for attention) with the same widths,
  so its time per unit of work is comparable.
"""
import numpy as np
import pytest

from conftest import B, C, N, NH, REFERENCE_ROWS, T, V, record
from gptcore import kernels, ladder, reference
import numpy_twins

IMPLEMENTATIONS = ["gptcore", "numpy", "reference"]
MATMUL_SHAPES = [(768, 128, 384), (768, 512, 128), (768, 128, 65), (768, 128, 512), (1024, 1024, 1024)]


def floats(rng, *shape):
    return rng.standard_normal(shape, dtype=np.float32)


def run(benchmark, implementation, function, *args):
    if implementation == "reference":
        benchmark.pedantic(function, args=args, rounds=3, iterations=1, warmup_rounds=0)
    else:
        benchmark(function, *args)


# ----------------------------------------------------------------------------------------------------
# matmul
# ----------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("implementation", ["gptcore", "numpy", "naive", "reference"])
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "{}x{}@{}x{}".format(s[0], s[1], s[1], s[2]))
def test_matmul_forward(benchmark, rng, shape, implementation):
    M, K, OC = shape
    if implementation in ("reference", "naive") and M * K * OC > 768 * 512 * 128:
        pytest.skip("too slow at this size")
    rows = 2 if implementation == "reference" else M
    inp, weight, bias = floats(rng, rows, K), floats(rng, K, OC), floats(rng, OC)
    out = np.empty((rows, OC), np.float32)
    record(benchmark, f"matmul_forward {M}x{K}@{K}x{OC}", implementation, 2 * rows * K * OC, "flop")
    function = {"gptcore": kernels.matmul_forward, "reference": reference.matmul_forward}.get(implementation)
    if implementation == "numpy":
        run(benchmark, implementation, numpy_twins.matmul_forward, inp, weight, bias, out)
    elif implementation == "naive":
        # the ladder's first rung, the compiled triple loop; it takes no bias (N*OC adds, noise here)
        run(benchmark, implementation, lambda: ladder.matmul_naive(inp, weight, out=out))
    else:
        run(benchmark, implementation, lambda: function(inp, weight, bias, out=out))


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("shape", MATMUL_SHAPES, ids=lambda s: "{}x{}@{}x{}".format(s[0], s[1], s[1], s[2]))
def test_matmul_backward(benchmark, rng, shape, implementation):
    M, K, OC = shape
    if implementation == "reference" and M * K * OC > 768 * 512 * 128:
        pytest.skip("too slow at this size")
    rows = 2 if implementation == "reference" else M
    inp, weight, d_out = floats(rng, rows, K), floats(rng, K, OC), floats(rng, rows, OC)
    # two products of 2*rows*K*OC flops each (the bias sum is noise next to them)
    record(benchmark, f"matmul_backward {M}x{K}@{K}x{OC}", implementation, 4 * rows * K * OC, "flop")
    if implementation == "numpy":
        run(benchmark, implementation, numpy_twins.matmul_backward, d_out, inp, weight)
    else:
        module = kernels if implementation == "gptcore" else reference
        d_inp, d_weight, d_bias = np.zeros_like(inp), np.zeros_like(weight), np.zeros(OC, np.float32)
        run(benchmark, implementation, lambda: module.matmul_backward(
            d_out, inp, weight, d_inp=d_inp, d_weight=d_weight, d_bias=d_bias))


# ----------------------------------------------------------------------------------------------------
# the other kernels: (group, work unit, setup) where setup(rng, rows) -> {implementation: callable}
# ----------------------------------------------------------------------------------------------------

def _softmax_forward(rng, rows):
    x = floats(rng, rows, V)
    out = np.empty_like(x)
    return {"gptcore": lambda: kernels.softmax_forward(x, out=out),
            "numpy": lambda: numpy_twins.softmax_forward(x),
            "reference": lambda: reference.softmax_forward(x, out=out)}, rows * V


def _softmax_backward(rng, rows):
    probs = kernels.softmax_forward(floats(rng, rows, V))
    d_probs = floats(rng, rows, V)
    d_x = np.zeros_like(probs)
    return {"gptcore": lambda: kernels.softmax_backward(d_probs, probs, d_x=d_x),
            "numpy": lambda: numpy_twins.softmax_backward(d_probs, probs),
            "reference": lambda: reference.softmax_backward(d_probs, probs, d_x=d_x)}, rows * V


def _gelu_forward(rng, rows):
    x = floats(rng, rows, 4 * C)
    out = np.empty_like(x)
    return {"gptcore": lambda: kernels.gelu_forward(x, out=out),
            "numpy": lambda: numpy_twins.gelu_forward(x),
            "reference": lambda: reference.gelu_forward(x, out=out)}, x.size


def _gelu_backward(rng, rows):
    x, d_out = floats(rng, rows, 4 * C), floats(rng, rows, 4 * C)
    d_x = np.zeros_like(x)
    return {"gptcore": lambda: kernels.gelu_backward(d_out, x, d_x=d_x),
            "numpy": lambda: numpy_twins.gelu_backward(d_out, x),
            "reference": lambda: reference.gelu_backward(d_out, x, d_x=d_x)}, x.size


def _layernorm_forward(rng, rows):
    x, w, b = floats(rng, rows, C), floats(rng, C), floats(rng, C)
    out, mean, rstd = np.empty_like(x), np.empty(rows, np.float32), np.empty(rows, np.float32)
    return {"gptcore": lambda: kernels.layernorm_forward(x, w, b, out=out, mean=mean, rstd=rstd),
            "numpy": lambda: numpy_twins.layernorm_forward(x, w, b),
            "reference": lambda: reference.layernorm_forward(x, w, b, out=out, mean=mean, rstd=rstd)}, x.size


def _layernorm_backward(rng, rows):
    x, w, b, d_out = floats(rng, rows, C), floats(rng, C), floats(rng, C), floats(rng, rows, C)
    _, mean, rstd = kernels.layernorm_forward(x, w, b)
    d_x, d_w, d_b = np.zeros_like(x), np.zeros(C, np.float32), np.zeros(C, np.float32)
    mean2, rstd2 = mean[:, None], rstd[:, None]
    return {"gptcore": lambda: kernels.layernorm_backward(d_out, x, w, mean, rstd, d_x=d_x, d_weight=d_w, d_bias=d_b),
            "numpy": lambda: numpy_twins.layernorm_backward(d_out, x, w, mean2, rstd2),
            "reference": lambda: reference.layernorm_backward(d_out, x, w, mean, rstd, d_x=d_x, d_weight=d_w,
                                                              d_bias=d_b)}, x.size


def _attention_forward(rng, rows):
    batch = max(1, rows // T)
    qkv = floats(rng, batch, T, 3 * C)
    out, row_max, row_sum = (np.empty((batch, T, C), np.float32), np.empty((batch, NH, T), np.float32),
                             np.empty((batch, NH, T), np.float32))
    buffers = dict(out=out, row_max=row_max, row_sum=row_sum)
    return {"gptcore": lambda: kernels.attention_forward(qkv, NH, **buffers),
            "numpy": lambda: numpy_twins.attention_forward(qkv, NH),
            "reference": lambda: reference.attention_forward(qkv, NH, **buffers)}, batch * T


def _attention_backward(rng, rows):
    # gptcore recomputes the weights from the forward's row statistics (one more q @ k^T per head);
    # the numpy expression reads the stored weights, as a framework that keeps them does
    batch = max(1, rows // T)
    qkv, d_out = floats(rng, batch, T, 3 * C), floats(rng, batch, T, C)
    _, row_max, row_sum = kernels.attention_forward(qkv, NH)
    _, att = numpy_twins.attention_forward(qkv, NH)
    d_qkv = np.zeros_like(qkv)
    return {"gptcore": lambda: kernels.attention_backward(d_out, qkv, row_max, row_sum, NH, d_qkv=d_qkv),
            "numpy": lambda: numpy_twins.attention_backward(d_out, qkv, att, NH),
            "reference": lambda: reference.attention_backward(d_out, qkv, row_max, row_sum, NH,
                                                              d_qkv=d_qkv)}, batch * T


def _cross_entropy_forward(rng, rows):
    batch = max(1, rows // T)
    logits = floats(rng, batch, T, V)
    targets = rng.integers(0, V, (batch, T))
    probs = np.empty_like(logits)
    return {"gptcore": lambda: kernels.cross_entropy_forward(logits, targets, probs=probs),
            "numpy": lambda: numpy_twins.cross_entropy_forward(logits, targets),
            "reference": lambda: reference.cross_entropy_forward(logits, targets, probs=probs)}, logits.size


def _cross_entropy_backward(rng, rows):
    batch = max(1, rows // T)
    _, probs = kernels.cross_entropy_forward(floats(rng, batch, T, V), np.zeros((batch, T), np.int64))
    targets = rng.integers(0, V, (batch, T))
    d_logits = np.zeros_like(probs)
    return {"gptcore": lambda: kernels.cross_entropy_backward(probs, targets, d_logits=d_logits),
            "numpy": lambda: numpy_twins.cross_entropy_backward(probs, targets),
            "reference": lambda: reference.cross_entropy_backward(probs, targets, d_logits=d_logits)}, probs.size


def _embedding_forward(rng, rows):
    batch = max(1, rows // T)
    idx, wte, wpe = rng.integers(0, V, (batch, T)), floats(rng, V, C), floats(rng, T, C)
    out = np.empty((batch, T, C), np.float32)
    return {"gptcore": lambda: kernels.embedding_forward(idx, wte, wpe, out=out),
            "numpy": lambda: numpy_twins.embedding_forward(idx, wte, wpe),
            "reference": lambda: reference.embedding_forward(idx, wte, wpe, out=out)}, out.size


def _embedding_backward(rng, rows):
    batch = max(1, rows // T)
    idx, d_out = rng.integers(0, V, (batch, T)), floats(rng, batch, T, C)
    d_wte, d_wpe = np.zeros((V, C), np.float32), np.zeros((T, C), np.float32)
    return {"gptcore": lambda: kernels.embedding_backward(d_out, idx, V, T, d_wte=d_wte, d_wpe=d_wpe),
            "numpy": lambda: numpy_twins.embedding_backward(d_out, idx, V, T),
            "reference": lambda: reference.embedding_backward(d_out, idx, V, T, d_wte=d_wte, d_wpe=d_wpe)}, d_out.size


def _residual_forward(rng, rows):
    a, b = floats(rng, rows, C), floats(rng, rows, C)
    out = np.empty_like(a)
    return {"gptcore": lambda: kernels.residual_forward(a, b, out=out),
            "numpy": lambda: numpy_twins.residual_forward(a, b),
            "reference": lambda: reference.residual_forward(a, b, out=out)}, a.size


def _adamw_update(rng, rows):
    # the baby GPT has ~0.8M parameters; we update rows * 1024 of them
    size = rows * 1024
    param, grad = floats(rng, size), floats(rng, size)
    m, v = np.zeros(size, np.float32), np.zeros(size, np.float32)
    hyper = dict(lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1, step=10)
    return {"gptcore": lambda: kernels.adamw_update(param, grad, m, v, **hyper),
            "numpy": lambda: numpy_twins.adamw_update(param, grad, m, v, *hyper.values()),
            "reference": lambda: reference.adamw_update(param, grad, m, v, **hyper)}, size


KERNELS = {
    "softmax_forward 768x65": _softmax_forward,
    "softmax_backward 768x65": _softmax_backward,
    "gelu_forward 768x512": _gelu_forward,
    "gelu_backward 768x512": _gelu_backward,
    "layernorm_forward 768x128": _layernorm_forward,
    "layernorm_backward 768x128": _layernorm_backward,
    "attention_forward B12 T64 C128 NH4": _attention_forward,
    "attention_backward B12 T64 C128 NH4": _attention_backward,
    "cross_entropy_forward 768x65": _cross_entropy_forward,
    "cross_entropy_backward 768x65": _cross_entropy_backward,
    "embedding_forward 768x128": _embedding_forward,
    "embedding_backward 768x128": _embedding_backward,
    "residual_forward 768x128": _residual_forward,
    "adamw_update 786k": _adamw_update,
}


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("group", list(KERNELS))
def test_kernel(benchmark, rng, group, implementation):
    rows = REFERENCE_ROWS if implementation == "reference" else N
    if implementation == "reference" and group.startswith(("attention", "cross_entropy", "embedding")):
        rows = T                     # one batch row: the reference's loops are per sequence
    functions, work = KERNELS[group](rng, rows)
    record(benchmark, group, implementation, work, "element")
    run(benchmark, implementation, functions[implementation])
