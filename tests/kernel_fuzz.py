"""A property-based fuzz of the public kernel API (gptcore.kernels), run as its own process.

WHAT'S GOING ON HERE
  WHAT   Hypothesis draws a kernel and its arguments: usually consistent shapes (sizes 0..8, so empty
         and awkward ones too), then often one argument spoiled: another dtype, a transposed (non-
         contiguous) view, a dimension more or less or of another size, None, a list, a scalar, a
         bool; ints that are 0, negative or far past any C type (2^31, 2^40, 2^63, 2^70); token ids
         out of range. The one property: the call raises TypeError or ValueError, or it returns what
         gptcore.reference returns for the same arguments (float32 rounding apart).
  WHY A PROCESS
         The compiled loops run without bounds checks: an argument the checks let through wrongly
         is a segfault, which would take a pytest run down with it. tests/test_kernel_fuzz.py runs
         this file with `python tests/kernel_fuzz.py N` and calls any exit status but 0 a failure.
         Values are finite and moderate: where both sides meet NaN or inf they may differ honestly
         (the compiled exp saturates), and tests/test_kernels.py covers those cases one by one.
"""
import sys

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gptcore import kernels as K
from gptcore import reference as R

SIZE = st.integers(0, 8)
HUGE = st.sampled_from([0, -1, -(2 ** 31), 2 ** 31, 2 ** 40, 2 ** 63, 2 ** 70])
NOT_AN_INT = st.sampled_from([None, 2.0, True, "3", [2]])


def values(draw, shape):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    return (rng.standard_normal(shape) * draw(st.sampled_from([0.1, 1.0, 4.0]))).astype(np.float32)


def spoil(draw, array):
    """The array as it is, or made wrong in one way."""
    how = draw(st.sampled_from(["keep"] * 6 + ["float64", "int64", "float16", "transposed", "fewer", "more",
                                              "shorter", "None", "list", "scalar"]))
    if how == "keep":
        return array
    if how in ("float64", "int64", "float16"):
        return array.astype(how)
    if how == "transposed":
        return array.T if array.ndim > 1 else array[::-1][::-1].repeat(2)[::2]
    if how == "fewer":
        return array.reshape(-1) if array.ndim > 1 else np.float32(array.sum())     # a 0-d value
    if how == "more":
        return array[None]
    if how == "shorter":
        return array[..., :max(array.shape[-1] - 1, 0)] if array.ndim else array
    if how == "None":
        return None
    if how == "list":
        return array.tolist()
    return 1.5


def an_int(draw, good, huge=HUGE):
    """`good` (a valid int) most of the time, else a huge or negative one, or not an int at all."""
    return draw(st.one_of(st.just(good), st.just(good), st.just(good), huge, NOT_AN_INT))


# A table of 2^31 rows (embedding_backward's vocab_size or block_size) is legal when the machine has
# the 8 GiB per channel its d_wte or d_wpe takes, but the reference would then build 2^31 rows of
# Python floats: we fuzz those sizes with ones that cannot be allocated at all (and small, negative).
HUGE_ROWS = st.sampled_from([0, -1, -(2 ** 31), 2 ** 40, 2 ** 63, 2 ** 70])


def token_ids(draw, shape, V):
    rng = np.random.default_rng(draw(st.integers(0, 2 ** 32 - 1)))
    ids = rng.integers(0, max(V, 1), shape).astype(np.int64)
    if draw(st.booleans()) and ids.size:
        ids.flat[draw(st.integers(0, ids.size - 1))] = draw(st.sampled_from([-1, V, 2 ** 62]))
    return draw(st.sampled_from([ids, ids, ids, ids.astype(np.int32), ids.astype(np.float32)]))


def row_statistics(draw, qkv, NH):
    """attention_forward's row_max and row_sum of qkv (the kernels recompute the weights from them,
    the reference from qkv alone, so only the forward's own agree), each possibly spoiled; random
    ones where qkv makes no forward."""
    try:
        stats = K.attention_forward(qkv, NH)[1:]
    except (TypeError, ValueError):
        B, T = qkv.shape[:2]
        stats = values(draw, (B, NH, T)), values(draw, (B, NH, T))
    return [spoil(draw, s) for s in stats]


def call(draw, name):
    """(positional args, keyword args) for kernels.<name>."""
    B, T, N, V = (draw(SIZE) for _ in range(4))
    NH = draw(st.integers(1, 3))
    C = NH * draw(st.integers(0, 3))
    f = lambda *shape: spoil(draw, values(draw, shape))
    if name == "matmul_forward":
        transposed = draw(st.booleans())
        IC, OC = draw(SIZE), draw(SIZE)
        weight = f(OC, IC) if transposed else f(IC, OC)
        return (f(N, IC), weight, draw(st.one_of(st.none(), st.just(f(OC))))), {"weight_transposed": transposed}
    if name == "matmul_backward":
        IC, OC = draw(SIZE), draw(SIZE)
        return (f(N, OC), f(N, IC), f(IC, OC)), {}
    if name in ("softmax_forward", "gelu_forward", "sum_of_squares"):
        return (f(N, V),) if name == "softmax_forward" else (f(N),), {}
    if name in ("softmax_backward", "gelu_backward", "residual_forward"):
        shape = (N, V) if name == "softmax_backward" else (N,)
        return (f(*shape), f(*shape)), {}
    if name == "residual_backward":
        return (f(N),), {}
    if name == "layernorm_forward":
        return (f(N, C), f(C), f(C)), {}
    if name == "attention_forward":
        return (f(B, T, 3 * C), an_int(draw, NH)), {"dropout_p": draw(st.sampled_from([0.0, 0.5, 1.0])),
                                                    "dropout_key": an_int(draw, 7)}
    if name == "attention_backward":
        qkv = values(draw, (B, T, 3 * C))
        return (f(B, T, C), spoil(draw, qkv), *row_statistics(draw, qkv, NH), an_int(draw, NH)), {
            "dropout_p": draw(st.sampled_from([0.0, 0.5, 1.0])), "dropout_key": an_int(draw, 7)}
    if name == "attention_weights":
        qkv = values(draw, (B, T, 3 * C))
        return (spoil(draw, qkv), *row_statistics(draw, qkv, NH), an_int(draw, NH)), {}
    if name in ("dropout_forward", "dropout_backward"):
        return (f(N), draw(st.sampled_from([0.0, 0.5, 1.0, -0.1])), draw(st.sampled_from([0, 7, -1]))), {}
    if name == "attention_forward_cached":
        start = draw(st.integers(-1, T + 1))
        return (f(B, T, 3 * C), an_int(draw, start), an_int(draw, draw(st.integers(start, T + 1))),
                an_int(draw, NH)), {}
    if name in ("cross_entropy_forward", "cross_entropy_backward"):
        return (f(B, T, V), token_ids(draw, (B, T), V)), {}
    if name == "embedding_forward":
        return (token_ids(draw, (B, T), V), f(V, C), f(draw(st.integers(0, 9)), C)), {}
    if name == "embedding_backward":
        return (f(B, T, C), token_ids(draw, (B, T), V), an_int(draw, V, HUGE_ROWS),
                an_int(draw, max(T, 1), HUGE_ROWS)), {}
    if name == "adamw_update":
        param, grad, m = f(N), f(N), f(N)
        v = np.abs(values(draw, (N,)))
        return (param, grad, m, spoil(draw, v)), {
            "lr": draw(st.sampled_from([1e-3, 0.0, -1.0, float("nan")])), "beta1": 0.9,
            "beta2": draw(st.sampled_from([0.99, 1.0])), "eps": 1e-8, "weight_decay": 0.1,
            "step": an_int(draw, draw(st.integers(1, 10))),
            "grad_scale": draw(st.sampled_from([1.0, 0.25, -1.0, float("inf")]))}
    raise AssertionError(name)


NAMES = ["matmul_forward", "matmul_backward", "softmax_forward", "softmax_backward", "gelu_forward",
         "gelu_backward", "residual_forward", "residual_backward", "layernorm_forward", "attention_forward",
         "attention_backward", "attention_weights", "attention_forward_cached", "cross_entropy_forward",
         "cross_entropy_backward", "dropout_forward", "dropout_backward",
         "embedding_forward", "embedding_backward", "adamw_update", "sum_of_squares", "set_num_threads"]


def copies(args, kwargs):
    copy = lambda a: a.copy() if isinstance(a, np.ndarray) else a
    return [copy(a) for a in args], {key: copy(value) for key, value in kwargs.items()}


def assert_same(got, want, where):
    if isinstance(got, tuple):
        assert isinstance(want, tuple) and len(got) == len(want), where
        for g, w in zip(got, want):
            assert_same(g, w, where)
    elif got is None:
        assert want is None, where
    else:
        np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=2e-4,
                                   atol=2e-4, err_msg=where)


def run(examples):
    @settings(max_examples=examples, deadline=None, database=None, derandomize=True,
              suppress_health_check=list(HealthCheck))
    @given(st.data())
    def property_holds(data):
        name = data.draw(st.sampled_from(NAMES))
        if name == "set_num_threads":
            before = K.get_num_threads()
            n = data.draw(st.one_of(st.integers(1, 4), HUGE, NOT_AN_INT))
            try:
                K.set_num_threads(n)
            except (TypeError, ValueError):
                assert K.get_num_threads() == before
            else:
                assert K.get_num_threads() == n
            K.set_num_threads(before)
            return
        args, kwargs = call(data.draw, name)
        kernel_args, kernel_kwargs = copies(args, kwargs)
        try:
            got = getattr(K, name)(*kernel_args, **kernel_kwargs)
        except (TypeError, ValueError):
            return
        reference_args, reference_kwargs = copies(args, kwargs)
        want = getattr(R, name)(*reference_args, **reference_kwargs)
        assert_same(got, want, name)
        for g, w in zip(kernel_args, reference_args):          # in-place outputs (adamw_update)
            if isinstance(g, np.ndarray):
                assert_same(g, w, f"{name} (in place)")

    property_holds()


if __name__ == "__main__":
    run(int(sys.argv[1]) if len(sys.argv) > 1 else 2000)
    print("kernel fuzz: every call raised TypeError/ValueError or matched the reference")
