"""The second link in the chain of oracles: the compiled kernels (gptcore.kernels) against their
pure-Python twins (gptcore.reference), which tests/test_reference.py holds to finite differences.

WHAT'S GOING ON HERE

  WHAT   Five groups of tests, one section each below:
           1. every kernel, forward and backward, against the reference on awkward sizes; the
              vectorized exp and tanh inside them swept against numpy in float64; NaN and -inf;
           2. 1 thread and 2 threads give bit-identical results, on sizes big enough to go parallel;
           3. forward overwrites its buffers, backward accumulates into them (twice gives 2x);
           4. the contract of every public function: bad dtypes, ranks, shapes, strides, ids, head
              counts and buffers raise TypeError/ValueError naming the argument at fault;
           5. the causal mask: attention never looks at, or sends gradient to, a later position.
  HOW THE TOLERANCES ARE SET
         The reference computes in double and rounds each result to float32 once, so it is within
         U = 2^-24 (float32's unit roundoff) relative of the exact answer. The kernel computes in
         float32, and every float32 operation adds at most U relative. So for a result that is a sum
         of K terms (in any order, with or without FMA) the textbook bound is
             |kernel - exact| <= K * U * sum_k |term_k|       (to first order in U),
         and we allow |kernel - reference| <= (K + a few) * U * sum_k |term_k|, elementwise, with
         sum |term_k| computed in float64 by numpy (e.g. |inp| @ |weight| for a matmul). Each kernel's
         bound is derived in the comment above its test. These bounds are rigorous rather than a guessed
         rtol, and tight: a kernel that drops a term, reads one element off, or sums in the wrong
         precision misses them by orders of magnitude, while honest float32 rounding never does.
  WHERE  tests/test_reference.py is the first link (reference vs finite differences); the model
         tests build on these kernels.
"""

import inspect
import zlib

import numpy as np
import pytest

from gptcore import backends, compiled
from gptcore import dropout as dropout_sites
from gptcore import kernels as K
from gptcore import reference as R

U = 2.0 ** -24   # float32 unit roundoff: a correctly rounded float32 result is within U relative

# ----------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------


def randn(rng, *shape, scale=1.0):
    return (scale * rng.standard_normal(shape)).astype(np.float32)


def dyadic(rng, *shape, denominator=8, high=8):
    """float32 values k / denominator with |k| <= high: sums of a few of them are exact in float32,
    whatever the order, so kernels that add in several steps must agree bit for bit."""
    return (rng.integers(-high, high + 1, shape) / denominator).astype(np.float32)


def f64(a):
    return np.asarray(a, dtype=np.float64)


def assert_within(got, want, bound, what):
    """|got - want| <= bound elementwise (bound an array or a scalar), with a readable failure."""
    got = np.asarray(got)
    assert got.dtype == np.float32, f"{what}: dtype {got.dtype}, expected float32"
    assert got.shape == np.shape(want), f"{what}: shape {got.shape}, expected {np.shape(want)}"
    assert np.all(np.isfinite(got)), f"{what}: non-finite values"
    err = np.abs(f64(got) - f64(want))
    bound = np.broadcast_to(f64(bound), err.shape)
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(np.where(bad, err / np.maximum(bound, 1e-300), 0)), err.shape)
        raise AssertionError(
            f"{what}: {bad.sum()} of {bad.size} elements outside the bound; worst at {i}: "
            f"got {got[i]!r}, want {np.asarray(want)[i]!r}, |diff| {err[i]:.3g} > bound {bound[i]:.3g}")


@pytest.fixture
def rng(request):
    # one fixed seed per test (and parameter set), so a failure reproduces
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def restore_threads():
    before = K.get_num_threads()
    yield
    K.set_num_threads(before)


# ====================================================================================================
# 1. The compiled kernels against the reference
# ====================================================================================================

# The matmul cuts its output into 6 x 32 tiles, with a 6 x 16 kernel for a last panel of <= 16
# columns. M (rows) covers: one row, a partial row block, exactly one block, one more, two and a bit;
# OC (columns) covers: 1, the half-edge panel (15, 16, 17), full panels (31, 32, 33), 65 = 2 panels + 1
# (half edge) and 100 = 3 panels + 4. K (the summed axis) covers 1, 3 and one longer than a lane (64).
MATMUL_M = [1, 5, 6, 7, 13]
MATMUL_OC = [1, 15, 16, 17, 31, 32, 33, 65, 100]
MATMUL_K = [1, 3, 64]


def matmul_bound(a, b, k, bias=None):
    """(k + 2) u (|a| @ |b| + |bias|): k roundings in the k-term dot product, one for the bias add, one
    for the reference's final rounding to float32."""
    magnitude = np.abs(f64(a)) @ np.abs(f64(b))
    if bias is not None:
        magnitude += np.abs(f64(bias))
    return (k + 2) * U * magnitude


@pytest.mark.parametrize("K_", MATMUL_K)
@pytest.mark.parametrize("OC", MATMUL_OC)
@pytest.mark.parametrize("M", MATMUL_M)
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "nobias"])
def test_matmul_forward_matches_reference_on_ragged_sizes(with_bias, M, OC, K_, rng):
    inp, weight = randn(rng, M, K_), randn(rng, K_, OC)
    bias = randn(rng, OC) if with_bias else None
    got = K.matmul_forward(inp, weight, bias)
    want = R.matmul_forward(inp, weight, bias)
    assert_within(got, want, matmul_bound(inp, weight, K_, bias), "matmul_forward")


# A matmul of at most 4 rows (generation's single token) skips the tiles: it streams the weight once,
# in its own layout, with the output columns cut into one part per thread. Sizes: below and above the
# work at which it goes parallel (2 N IC OC flops against _kernels.PARALLEL_MIN_WORK, 2^15), columns
# that do not fill whole 16-float lines of a part (1000 = 2 x 496 + 8), one part left empty (OC = 1
# on 2 threads), an (IC, OC) part wider than one 1024-column tile (2500), and every N up to 4.
FEW_ROWS_SIZES = [(1, 1, 1), (2, 3, 7), (1, 33, 1000), (3, 65, 1000), (4, 17, 2500), (1, 129, 1)]


@pytest.mark.parametrize("weight_transposed", [False, True], ids=["weight_in_out", "weight_out_in"])
@pytest.mark.parametrize("N, IC, OC", FEW_ROWS_SIZES)
def test_matmul_of_few_rows_matches_reference_in_both_weight_layouts(rng, N, IC, OC, weight_transposed):
    inp, bias = randn(rng, N, IC), randn(rng, OC)
    weight = randn(rng, OC, IC) if weight_transposed else randn(rng, IC, OC)
    got = K.matmul_forward(inp, weight, bias, weight_transposed=weight_transposed)
    want = R.matmul_forward(inp, weight, bias, weight_transposed=weight_transposed)
    as_in_out = weight.T if weight_transposed else weight
    assert_within(got, want, matmul_bound(inp, as_in_out, IC, bias), "matmul_forward (few rows)")


# Backward runs two products through the same tiled routine with the roles moved around:
# d_inp (N, IC) = d_out (N, OC) @ weight^T sums over OC and tiles over IC; d_weight (IC, OC) =
# inp^T @ d_out sums over N and tiles IC x OC. So the ragged sizes go on N, IC and OC alike.
@pytest.mark.parametrize("OC", [1, 15, 16, 17, 33, 65, 100])
@pytest.mark.parametrize("IC", [1, 3, 16, 17, 33, 64])
@pytest.mark.parametrize("N", [1, 5, 6, 7, 13])
def test_matmul_backward_matches_reference_on_ragged_sizes(N, IC, OC, rng):
    d_out, inp, weight = randn(rng, N, OC), randn(rng, N, IC), randn(rng, IC, OC)
    d_inp, d_weight, d_bias = K.matmul_backward(d_out, inp, weight, d_bias=np.zeros(OC, np.float32))
    r_inp, r_weight, r_bias = R.matmul_backward(d_out, inp, weight, d_bias=np.zeros(OC, np.float32))
    assert_within(d_inp, r_inp, matmul_bound(d_out, weight.T, OC), "d_inp")
    assert_within(d_weight, r_weight, matmul_bound(inp.T, d_out, N), "d_weight")
    # d_bias: a sum of N terms, summed in float32, plus the reference's rounding
    assert_within(d_bias, r_bias, (N + 1) * U * np.abs(f64(d_out)).sum(0), "d_bias")


# The matmul sums over k in blocks sized from the machine's caches (K.matmul_blocking()), and a block
# after the first continues from the partial sums the previous one left in the output. Each output is
# then still one running sum over k in order, so no blocking may change a single bit: we compare the
# default blocking with tiny ones (a K block of 1 float, a chunk of one row block) on sizes that are
# ragged in every dimension, with a bias, with the weight transposed, and accumulating into gradients
# that already hold values (an accumulating product continues from them too).
@pytest.fixture
def restore_blocking():
    before = K.matmul_blocking()
    yield
    K.set_matmul_blocking(before["k_block"], before["row_chunk"] // before["tile"][0])


def _matmul_products(rng, N, IC, OC, transposed):
    inp, bias, d_out = randn(rng, N, IC), randn(rng, OC), randn(rng, N, OC)
    weight = randn(rng, OC, IC) if transposed else randn(rng, IC, OC)
    d_inp0, d_weight0 = randn(rng, *inp.shape), randn(rng, *weight.shape)

    def run():
        out = K.matmul_forward(inp, weight, bias, weight_transposed=transposed)
        d_inp, d_weight, d_bias = K.matmul_backward(d_out, inp, weight, d_inp=d_inp0.copy(), d_weight=d_weight0.copy(),
                                                   d_bias=np.zeros(OC, np.float32), weight_transposed=transposed)
        return out, d_inp, d_weight, d_bias
    return run


@pytest.mark.parametrize("transposed", [False, True], ids=["weight", "weight_T"])
@pytest.mark.parametrize("N, IC, OC", [(193, 300, 65), (37, 517, 129), (7, 1030, 33)])
def test_matmul_results_do_not_depend_on_the_cache_blocking(N, IC, OC, transposed, rng, restore_blocking):
    run = _matmul_products(rng, N, IC, OC, transposed)
    default = run()
    for k_block, row_chunk_blocks in [(1, 1), (7, 1), (64, 2), (100_000, 1_000)]:
        K.set_matmul_blocking(k_block, row_chunk_blocks)
        for name, want, got in zip(["out", "d_inp", "d_weight", "d_bias"], default, run()):
            assert np.array_equal(got, want), f"{name} changed with k_block={k_block}, row chunk {row_chunk_blocks}"


@pytest.mark.parametrize("N, IC, OC", [(13, 700, 65), (700, 40, 17)])
def test_matmul_matches_reference_over_several_k_blocks_and_into_nonzero_gradients(N, IC, OC, rng):
    # K = 700 spans several K blocks at any blocking the machine picks (at most half of L1 in floats
    # per block), and the gradients start from values, as with gradient accumulation
    inp, weight, bias, d_out = randn(rng, N, IC), randn(rng, IC, OC), randn(rng, OC), randn(rng, N, OC)
    assert_within(K.matmul_forward(inp, weight, bias), R.matmul_forward(inp, weight, bias),
                  matmul_bound(inp, weight, IC, bias), "matmul_forward")
    d_inp0, d_weight0 = randn(rng, N, IC), randn(rng, IC, OC)
    d_inp, d_weight, _ = K.matmul_backward(d_out, inp, weight, d_inp=d_inp0.copy(), d_weight=d_weight0.copy())
    r_inp, r_weight, _ = R.matmul_backward(d_out, inp, weight, d_inp=d_inp0.copy(), d_weight=d_weight0.copy())
    # the old value is one more term of the running sum: one more rounding, and its magnitude
    assert_within(d_inp, r_inp, matmul_bound(d_out, weight.T, OC + 1) + 2 * U * np.abs(f64(d_inp0)), "d_inp")
    assert_within(d_weight, r_weight, matmul_bound(inp.T, d_out, N + 1) + 2 * U * np.abs(f64(d_weight0)), "d_weight")


def test_set_matmul_blocking_refuses_sizes_below_one(restore_blocking):
    with pytest.raises(ValueError, match="k_block must be >= 1"):
        K.set_matmul_blocking(0, 4)
    with pytest.raises(ValueError, match="row_chunk_blocks must be >= 1"):
        K.set_matmul_blocking(256, 0)


# Softmax, the fused cross-entropy and attention share a row computation:
#     p_j = exp(x_j - m) / sum_k exp(x_k - m),   m = max_k x_k.
# In float32, x_j - m rounds (U |x_j - m| absolute, which exp turns into the same relative error),
# the kernel's exp is within EXP_REL_ERR, the normaliser is a float32 sum of V positive terms (V U
# relative) that also carries every term's error (U max|x - m| + EXP_REL_ERR), 1/sum and the product
# round (U each), and the reference rounds once (U). Per element:
EXP_REL_ERR = 4 * U        # _kernels._exp claims ~2 float32 ulp; one ulp is at most 2U relative


def softmax_relative_error(x):
    """The bound above, relative to p_j, for rows along the last axis of x."""
    shifted = np.abs(f64(x) - f64(x).max(-1, keepdims=True))
    V = x.shape[-1]
    return U * (shifted + shifted.max(-1, keepdims=True) + V + 3) + 2 * EXP_REL_ERR


def softmax_bound(x, probs):
    return f64(probs) * softmax_relative_error(x)


@pytest.mark.parametrize("V", [1, 3, 7, 17, 33, 65])
@pytest.mark.parametrize("N", [1, 3, 7])
def test_softmax_forward_matches_reference(N, V, rng):
    x = randn(rng, N, V, scale=3.0)
    got = K.softmax_forward(x)
    want = R.softmax_forward(x)
    assert_within(got, want, softmax_bound(x, want), "probs")


@pytest.mark.parametrize("V", [1, 3, 7, 17, 33, 65])
@pytest.mark.parametrize("N", [1, 3, 7])
def test_softmax_backward_matches_reference(N, V, rng):
    probs = R.softmax_forward(randn(rng, N, V, scale=2.0))
    d_probs = randn(rng, N, V)
    got = K.softmax_backward(d_probs, probs)
    want = R.softmax_backward(d_probs, probs)
    # d_x_j = p_j (dp_j - w), w = sum_k p_k dp_k: the V-term dot w is off by V U S with
    # S = sum_k |p_k dp_k|; the subtraction and the product round (U |dp_j - w| + U |d_x_j|); and the
    # reference rounds (U |d_x_j|).
    weighted_abs = np.abs(f64(probs) * f64(d_probs)).sum(-1, keepdims=True)
    bound = f64(probs) * U * ((V + 2) * weighted_abs + 3 * np.abs(f64(d_probs))) + 2 * U * np.abs(f64(want))
    assert_within(got, want, bound, "d_x")


# GELU goes through tanh. The kernel uses a rational approximation of tanh (fitted by
# tools/fit_tanh.py, which reports a max abs error of 1.3e-7), evaluated in float32: we budget
# TANH_ABS_ERR = 2e-7 plus a few half-ulps of 1 for it. Its argument u = sqrt(2/pi) (x + 0.044715 x^3)
# is itself off by ~4U relative (two constants and three operations in float32), which moves tanh by
# at most 4U |u| sech^2(u) <= 2U absolute. So th is within DTH = TANH_ABS_ERR + 2U, absolute.
#     gelu  = 0.5 x (1 + th):  0.5 |x| DTH, plus 1 + th, the product and the reference rounding (3U |gelu|)
#     gelu' = 0.5 (1 + th) + 0.5 x (1 - th^2) du/dx:  DTH (0.5 + |x| |th| du/dx) from th (as
#             d(1 - th^2) = -2 th dth), 2U 0.5 |x| du/dx from rounding th^2 and 1 - th^2 (which
#             cancels in the tails), and ~8 roundings on the parts of the sum.
# Inputs span [-6, 6] (sweeps: [-10, 10]), which covers both tails where 1 + tanh and 1 - th^2 cancel.
TANH_ABS_ERR = 2e-7 + 3 * U
DTH = TANH_ABS_ERR + 2 * U
GELU_SCALE = np.sqrt(2 / np.pi)


def gelu_numpy(x):
    """gelu and gelu' in float64, straight from the formulas."""
    x = f64(x)
    du_dx = GELU_SCALE * (1 + 3 * 0.044715 * x ** 2)
    th = np.tanh(GELU_SCALE * (x + 0.044715 * x ** 3))
    return 0.5 * x * (1 + th), 0.5 * (1 + th) + 0.5 * x * (1 - th * th) * du_dx, th, du_dx


def gelu_forward_bound(x, want):
    return 0.5 * np.abs(f64(x)) * DTH + 3 * U * np.abs(f64(want))


def gelu_backward_bound(x, d_out, want):
    ax = np.abs(f64(x))
    _, _, th, du_dx = gelu_numpy(x)
    parts = 0.5 * (1 + np.abs(th)) + 0.5 * ax * (1 - th * th) * du_dx
    slope_err = DTH * (0.5 + ax * np.abs(th) * du_dx) + 2 * U * 0.5 * ax * du_dx + 8 * U * parts
    return np.abs(f64(d_out)) * slope_err + U * np.abs(f64(want))


GELU_SHAPES = [(1,), (3,), (7,), (17,), (33,), (65,), (3, 7), (2, 3, 5), (4097,), (8193,)]


def gelu_inputs(rng, shape):
    x = randn(rng, *shape, scale=2.0)
    flat = x.reshape(-1)
    flat[: min(flat.size, 5)] = np.array([0.0, -6.0, 6.0, -3.0, 1e-3], np.float32)[: min(flat.size, 5)]
    return np.clip(x, -6, 6)


@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
def test_gelu_forward_matches_reference(shape, rng):
    x = gelu_inputs(rng, shape)
    got = K.gelu_forward(x)
    want = R.gelu_forward(x)
    assert_within(got, want, gelu_forward_bound(x, want), "gelu")


@pytest.mark.parametrize("shape", GELU_SHAPES, ids=str)
def test_gelu_backward_matches_reference(shape, rng):
    x = gelu_inputs(rng, shape)
    d_out = randn(rng, *shape)
    got = K.gelu_backward(d_out, x)
    want = R.gelu_backward(d_out, x)
    assert_within(got, want, gelu_backward_bound(x, d_out, want), "d_x")


def test_gelu_and_its_tanh_are_accurate_over_a_dense_sweep():
    # 400k evenly spaced points over [-10, 10] against numpy's float64 tanh: this walks the fitted
    # tanh over its whole range, and past |x| ~ 3.5 (tanh argument > 9) into its clamp to +-1.
    x = np.linspace(-10, 10, 400_001).astype(np.float32)
    want, slope, _, _ = gelu_numpy(x)
    assert_within(K.gelu_forward(x), want, gelu_forward_bound(x, want), "gelu")
    ones = np.ones_like(x)
    assert_within(K.gelu_backward(ones, x), slope, gelu_backward_bound(x, ones, slope), "gelu'")


def test_softmax_exp_is_accurate_over_the_whole_range_it_is_used_on():
    # Softmax only ever takes exp of x - max <= 0. A row [x, 0] with x <= 0 has max 0, so the kernel
    # computes E = exp(x) with no rounding of the argument, then p0 = E * inv and p1 = 1 * inv = inv
    # exactly (inv = 1 / (E + 1)). So p0 / p1 = E to within p0's rounding (U). We sweep x down to -87,
    # where exp(x) is still a normal float32 (below -87.3 it goes subnormal, then 0).
    x = np.concatenate([np.linspace(-87, 0, 200_001), -np.logspace(-8, 0, 1001), [0.0]]).astype(np.float32)
    probs = K.softmax_forward(np.stack([x, np.zeros_like(x)], axis=1))
    exp_kernel = f64(probs[:, 0]) / f64(probs[:, 1])
    want = np.exp(f64(x))
    rel = np.abs(exp_kernel - want) / want
    assert rel.max() <= EXP_REL_ERR + U, f"exp off by {rel.max() / U:.2f} U at x = {x[np.argmax(rel)]!r}"


@pytest.mark.parametrize("name", ["softmax_forward", "gelu_forward", "cross_entropy_forward",
                                  "layernorm_forward"])
def test_nan_input_gives_nan_output_in_its_row(name, rng):
    x = randn(rng, 3, 33)
    x[1, 17] = np.nan
    if name == "softmax_forward":
        out = K.softmax_forward(x)
    elif name == "gelu_forward":
        out = K.gelu_forward(x)
        assert np.isnan(out[1, 17]) and np.isfinite(np.delete(out.reshape(-1), 33 + 17)).all()
        return
    elif name == "cross_entropy_forward":
        loss, out = K.cross_entropy_forward(x[None], np.zeros((1, 3), np.int64))
        assert np.isnan(loss)
        out = out[0]
    else:
        out = K.layernorm_forward(x, np.ones(33, np.float32), np.zeros(33, np.float32))[0]
    assert np.isnan(out[1]).all(), "a NaN must poison its own row"
    assert np.isfinite(out[[0, 2]]).all(), "and only its own row"


def test_softmax_gives_exactly_zero_probability_to_minus_infinity(rng):
    x = randn(rng, 4, 17)
    x[:, ::3] = -np.inf              # a mask, as attention-style code writes it
    probs = K.softmax_forward(x)
    assert np.all(probs[:, ::3] == 0.0)
    finite = np.where(np.isinf(x), x[:, 1:2], x)      # same max and spread, for the bound only
    assert_within(probs, R.softmax_forward(x), softmax_bound(finite, probs), "probs")


# LayerNorm, per row of C values, in float32:
#   mean m = (sum of C terms) / C:          (C + 1) U mean|x|, and the reference's U |m|;
#   var  = (sum of C terms (x - m)^2) / C:  (C + 4) U relative (the mean's own error only enters at
#          second order, as sum (x - m) = 0), plus eps, sqrtf and 1/: rstd within ((C + 4)/2 + 4) U;
#   out  = (x - m) r w + b:                 the mean's error times r |w|, rstd's relative error, three
#          roundings on (x - m) r w, the bias add and the reference's rounding (U |out| each).
@pytest.mark.parametrize("C", [1, 3, 7, 17, 33, 65])
@pytest.mark.parametrize("N", [1, 3, 7])
def test_layernorm_forward_matches_reference(N, C, rng):
    x = randn(rng, N, C, scale=2.0) + np.float32(0.5)
    weight, bias = randn(rng, C), randn(rng, C)
    out, mean, rstd = K.layernorm_forward(x, weight, bias)
    r_out, r_mean, r_rstd = R.layernorm_forward(x, weight, bias)
    mean_error = (C + 1) * U * np.abs(f64(x)).mean(1)
    assert_within(mean, r_mean, mean_error + U * np.abs(f64(r_mean)), "mean")
    rstd_relative = ((C + 4) / 2 + 4) * U
    assert_within(rstd, r_rstd, rstd_relative * f64(r_rstd), "rstd")
    centred = np.abs(f64(x) - f64(r_mean)[:, None])
    scale = f64(r_rstd)[:, None] * np.abs(f64(weight))
    bound = (scale * (mean_error[:, None] + (rstd_relative + 3 * U) * centred)
             + 2 * U * np.abs(f64(r_out)))
    assert_within(out, r_out, bound, "out")


@pytest.mark.parametrize("C", [1, 3, 7, 17, 33, 65])
@pytest.mark.parametrize("N", [1, 3, 7])
def test_layernorm_backward_matches_reference(N, C, rng):
    x = randn(rng, N, C, scale=2.0)
    weight, bias = randn(rng, C), randn(rng, C)
    _, mean, rstd = R.layernorm_forward(x, weight, bias)   # the same cache goes to both sides
    d_out = randn(rng, N, C)
    d_x, d_weight, d_bias = K.layernorm_backward(d_out, x, weight, mean, rstd)
    r_x, r_weight, r_bias = R.layernorm_backward(d_out, x, weight, mean, rstd)
    xhat = (f64(x) - f64(mean)[:, None]) * f64(rstd)[:, None]
    g = f64(d_out) * f64(weight)
    # d_x = r (g - mean(g) - xhat mean(g xhat)): g and xhat are 1 and 2 float32 roundings; the means
    # are C-term float32 sums (C U of the sum of |terms|) and a division; the final expression is ~4
    # more roundings. So (C + 6) U r (|g| + mean|g| + |xhat| mean|g xhat|), and the reference's U.
    mean_abs_g = np.abs(g).mean(1, keepdims=True)
    mean_abs_gx = np.abs(g * xhat).mean(1, keepdims=True)
    bound_x = (C + 6) * U * f64(rstd)[:, None] * (np.abs(g) + mean_abs_g + np.abs(xhat) * mean_abs_gx)
    assert_within(d_x, r_x, bound_x + U * np.abs(f64(r_x)), "d_x")
    # d_weight and d_bias: sums over N rows in float32; each d_weight term carries ~3U of its own
    assert_within(d_weight, r_weight, (N + 4) * U * np.abs(f64(d_out) * xhat).sum(0), "d_weight")
    assert_within(d_bias, r_bias, (N + 1) * U * np.abs(f64(d_out)).sum(0), "d_bias")


# (B, T, C, NH): a single token and a single channel, head sizes 1, 3, 11 and 13 (odd, and not a
# multiple of the 16 dot-product lanes) and 16 and 17 (one lane block, and one past it), T up to 33.
ATTENTION_SIZES = [(1, 1, 1, 1), (1, 3, 3, 1), (2, 7, 6, 2), (2, 5, 33, 3), (1, 7, 65, 5),
                   (1, 17, 32, 2), (1, 33, 4, 2), (2, 3, 34, 2)]


def split_heads(a, C, NH):
    """(B, T, 3C) -> q, k, v each (B, NH, T, hs), in float64."""
    B, T, _ = a.shape
    return [f64(a[:, :, i * C:(i + 1) * C]).reshape(B, T, NH, C // NH).transpose(0, 2, 1, 3)
            for i in range(3)]


def attention_with_weights(backend, qkv, NH, **dropout):
    """(out, att, row_max, row_sum): attention_forward, and its weights recomputed by attention_weights."""
    out, row_max, row_sum = backend.attention_forward(qkv, NH, **dropout)
    return out, backend.attention_weights(qkv, row_max, row_sum, NH), row_max, row_sum


def attention_row_error(qkv, NH):
    """(E, rel) of attention_forward_bound: per query row (B, NH, T, 1), the bound E on a score's
    absolute error and the bound rel on a weight's relative error."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = split_heads(qkv, C, NH)
    causal = np.tril(np.ones((T, T), bool))
    abs_dots = np.einsum("bhti,bhsi->bhts", np.abs(q), np.abs(k)) / np.sqrt(hs)
    scores = np.einsum("bhti,bhsi->bhts", q, k) / np.sqrt(hs)
    E = (hs + 3) * U * np.where(causal, abs_dots, 0).max(-1, keepdims=True)
    z = np.where(causal, scores, -np.inf)
    spread = np.where(causal, z.max(-1, keepdims=True) - z, 0).max(-1, keepdims=True)
    return E, 4 * E + 2 * U * spread + (np.arange(T)[:, None] + 4) * U + 2 * EXP_REL_ERR


def attention_forward_bound(qkv, att, NH, extra_rel=0.0):
    """Elementwise bounds on |att - ref| and |out - ref|.

    score_s = (q . k_s) / sqrt(hs): the hs-term dot is off by hs U sum|q k_s|, the scale by 2U, the
    product by U: E = (hs + 3) U max_s |q| . |k_s| / sqrt(hs) per row. A softmax turns absolute score
    errors into relative ones, at most twice the largest (the element's own and the normaliser's), and
    (max-shift, exp, a float32 sum of t + 1 terms, 1/sum) adds what softmax_relative_error says. So
        |d att_s| <= att_s (4 E + 2 U max|z - max| + (t + 4) U + 2 EXP_REL_ERR).
    out_t = sum_{s <= t} att_s v_s carries att's relative error, t + 1 roundings of the running sum
    and the reference's rounding, all times sum_s att_s |v_s|.
    """
    B, T, C3 = qkv.shape
    C = C3 // 3
    _, k, v = split_heads(qkv, C, NH)
    _, rel = attention_row_error(qkv, NH)
    rel = rel + extra_rel
    bound_att = f64(att) * rel
    weighted_v = np.einsum("bhts,bhsi->bhti", f64(att), np.abs(v))          # (B, NH, T, hs)
    steps = (np.arange(T) + 3)[None, None, :, None] * U
    bound_out = (rel + steps) * weighted_v
    return bound_att, bound_out.transpose(0, 2, 1, 3).reshape(B, T, C)


@pytest.mark.parametrize("B, T, C, NH", ATTENTION_SIZES)
def test_attention_forward_matches_reference(B, T, C, NH, rng):
    """out, the row statistics it keeps (m = the row's largest score, Z = its softmax normaliser) and
    the weights recomputed from them, each against the reference's own."""
    qkv = randn(rng, B, T, 3 * C)
    out, att, row_max, row_sum = attention_with_weights(K, qkv, NH)
    r_out, r_att, r_max, r_sum = attention_with_weights(R, qkv, NH)
    bound_att, bound_out = attention_forward_bound(qkv, r_att, NH)
    assert_within(att, r_att, bound_att, "att")
    assert_within(out, r_out, bound_out, "out")
    # m is one of the scores (error E) rounded once; Z = sum_s exp(score_s - m) has the relative error
    # of the normaliser, which rel (a weight's relative error) already covers
    E, rel = attention_row_error(qkv, NH)
    assert_within(row_max, r_max, E[..., 0] + U * np.abs(f64(r_max)), "row_max")
    assert_within(row_sum, r_sum, rel[..., 0] * f64(r_sum), "row_sum")


def attention_backward_bound(d_out, qkv, att, NH, keep_scale=1.0):
    """Elementwise bound on |d_qkv - ref|, from sums of absolute values along the backward's path.
    Both sides recompute att from the same row statistics; the kernel's att carries the relative
    error rel of attention_forward_bound, which reaches d_v as rel att |d_out| and d_score as at most
    rel att (P + 2 W) <= 2 rel MS sqrt(hs) (att enters d_score twice: as a factor and in W):
        P[t, s]  = |d_out_t| . |v_s|                     bounds d_att[t, s] (hs terms)
        W[t]     = sum_s att[t, s] P[t, s]               bounds the softmax's weighted sum (t+1 terms)
        MS[t, s] = att[t, s] (P[t, s] + W[t]) / sqrt(hs) bounds d_score[t, s]
    d_q_t = sum_s d_score[t, s] k_s, d_k_s = sum_t d_score[t, s] q_t and d_v_s = sum_t att[t, s] d_out_t
    then carry at most (hs + 2T + 8) U times the matching sums of MS |k|, MS |q| and att |d_out|:
    hs + T + 5 roundings reach each d_score, and up to T more are made summing over positions."""
    B, T, C3 = qkv.shape
    C = C3 // 3
    hs = C // NH
    q, k, v = split_heads(qkv, C, NH)
    dy = f64(d_out).reshape(B, T, NH, hs).transpose(0, 2, 1, 3)
    a = f64(att)
    # with dropout (keep_scale = keep / (1 - p), (B, NH, T, T)), d_att = keep_scale d_a, and d_v
    # gathers keep_scale att; each carries 2 U more (the scale's rounding and the product's)
    P = np.einsum("bhti,bhsi->bhts", np.abs(dy), np.abs(v)) * keep_scale
    W = (a * P).sum(-1, keepdims=True)
    MS = a * (P + W) / np.sqrt(hs)
    _, rel = attention_row_error(qkv, NH)
    rel = rel + (0.0 if np.isscalar(keep_scale) else 2 * U)
    MS = ((hs + 2 * T + 8) * U + 2 * rel * np.sqrt(hs)) * MS
    mag_q = np.einsum("bhts,bhsi->bhti", MS, np.abs(k))
    mag_k = np.einsum("bhts,bhti->bhsi", MS, np.abs(q))
    mag_v = np.einsum("bhts,bhti->bhsi", ((hs + 2 * T + 8) * U + rel) * a * keep_scale, np.abs(dy))
    return np.concatenate([m.transpose(0, 2, 1, 3).reshape(B, T, C) for m in (mag_q, mag_k, mag_v)], -1)


@pytest.mark.parametrize("B, T, C, NH", ATTENTION_SIZES)
def test_attention_backward_matches_reference(B, T, C, NH, rng):
    qkv = randn(rng, B, T, 3 * C)
    _, att, row_max, row_sum = attention_with_weights(R, qkv, NH)   # the same cache goes to both sides
    d_out = randn(rng, B, T, C)
    got = K.attention_backward(d_out, qkv, row_max, row_sum, NH)
    want = R.attention_backward(d_out, qkv, row_max, row_sum, NH)
    assert_within(got, want, attention_backward_bound(d_out, qkv, att, NH), "d_qkv")


# A fixed key, so that every test below sees one fixed mask
DROPOUT_KEY = dropout_sites.Dropout(p=0.1, seed=1337, counter=5).key(2, dropout_sites.ATTENTION_WEIGHTS)


def dropout_keep(p, key, shape):
    """The kernels' keep decisions (float64 0 or 1) for an array of `shape`, from gptcore.dropout's
    numpy twin of the hash: element i (flattened) is kept iff hash(key, i) >= floor(p * 2^64)."""
    n = int(np.prod(shape))
    return (dropout_sites.hashes(key, n) >= np.uint64(dropout_sites.threshold(p))).reshape(shape).astype(np.float64)


def test_the_dropout_hash_is_splitmix64():
    # splitmix64 seeded with 0 gives 0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4 first (its published
    # outputs); our element i of key k is output i of splitmix64 seeded with k, in numpy and in Python
    np.testing.assert_array_equal(dropout_sites.hashes(0, 2),
                                  np.array([0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4], np.uint64))
    assert dropout_sites.mix64(dropout_sites.GOLDEN) == 0xE220A8397B1DCDAF
    keys = {dropout_sites.Dropout(0.1, seed, counter).key(layer, site)
            for seed in (0, 1) for counter in (0, 1) for layer in (0, 1) for site in range(4)}
    assert len(keys) == 32                 # every (seed, counter, layer, site) its own mask


@pytest.mark.parametrize("p", [0.0, 0.1, 0.5, 0.9])
@pytest.mark.parametrize("shape", [(1,), (7, 33), (3, compiled.CHUNK_SIZE + 5)], ids=str)
def test_dropout_matches_reference_and_drops_the_same_elements(p, shape, rng):
    # out_i = x_i * float32(1 / (1 - p)): the scale's rounding and the product's, plus the
    # reference's: 3 U relative. The mask is bit for bit the same (it is integer arithmetic).
    x = randn(rng, *shape)
    keep = dropout_keep(p, DROPOUT_KEY, shape)
    got, want = K.dropout_forward(x, p, DROPOUT_KEY), R.dropout_forward(x, p, DROPOUT_KEY)
    np.testing.assert_array_equal(got != 0, keep != 0)
    np.testing.assert_array_equal(want != 0, keep != 0)
    assert_within(got, want, 3 * U * np.abs(want), "out")
    d_out = randn(rng, *shape)
    got, want = K.dropout_backward(d_out, p, DROPOUT_KEY), R.dropout_backward(d_out, p, DROPOUT_KEY)
    np.testing.assert_array_equal(got != 0, keep != 0)
    assert_within(got, want, 3 * U * np.abs(want), "d_x")
    in_place = x.copy()
    assert K.dropout_forward(in_place, p, DROPOUT_KEY, out=in_place) is in_place
    np.testing.assert_array_equal(in_place, K.dropout_forward(x, p, DROPOUT_KEY))
    if p == 0:
        np.testing.assert_array_equal(K.dropout_forward(x, p, DROPOUT_KEY), x)   # exactly the identity


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_keeps_a_fraction_1_minus_p_and_masks_differ_between_keys(p):
    # n Bernoulli(1 - p) draws: the kept count is within 5 standard deviations of n (1 - p); two
    # independent masks agree on a fraction p^2 + (1 - p)^2 of the elements.
    n = 1 << 20
    ones = np.ones(n, np.float32)
    first = K.dropout_forward(ones, p, DROPOUT_KEY) != 0
    second = K.dropout_forward(ones, p, DROPOUT_KEY + 1) != 0
    sigma = np.sqrt(p * (1 - p) / n)
    assert abs(first.mean() - (1 - p)) < 5 * sigma
    assert abs(second.mean() - (1 - p)) < 5 * sigma
    agree = p * p + (1 - p) ** 2
    assert abs((first == second).mean() - agree) < 5 * np.sqrt(agree * (1 - agree) / n)
    np.testing.assert_array_equal(K.dropout_forward(ones, p, DROPOUT_KEY)[first], np.float32(1 / (1 - p)))


@pytest.mark.parametrize("B, T, C, NH", [(1, 3, 3, 1), (2, 7, 6, 2), (2, 5, 33, 3), (1, 17, 32, 2)])
def test_attention_with_dropout_matches_reference(B, T, C, NH, rng):
    """Dropout on the weights: out uses a = att * keep / (1 - p), the mask of the (B, NH, T, T)
    weights from the key; the bounds are those without dropout with a in place of att, and 2 U more
    relative error per weight (the scale's rounding and the product's)."""
    p = 0.3
    drop = dict(dropout_p=p, dropout_key=DROPOUT_KEY)
    qkv = randn(rng, B, T, 3 * C)
    out, row_max, row_sum = K.attention_forward(qkv, NH, **drop)
    r_out, r_max, r_sum = R.attention_forward(qkv, NH, **drop)
    np.testing.assert_array_equal((row_max, row_sum), K.attention_forward(qkv, NH)[1:])  # no effect on m, Z
    r_att = R.attention_weights(qkv, r_max, r_sum, NH)
    keep_scale = dropout_keep(p, DROPOUT_KEY, (B, NH, T, T)) / (1 - p)
    _, bound_out = attention_forward_bound(qkv, f64(r_att) * keep_scale, NH, extra_rel=2 * U)
    assert_within(out, r_out, bound_out, "out")
    assert not np.allclose(out, K.attention_forward(qkv, NH)[0], atol=1e-3)   # the mask did something
    d_out = randn(rng, B, T, C)
    got = K.attention_backward(d_out, qkv, r_max, r_sum, NH, **drop)
    want = R.attention_backward(d_out, qkv, r_max, r_sum, NH, **drop)
    assert_within(got, want, attention_backward_bound(d_out, qkv, r_att, NH, keep_scale), "d_qkv")


@pytest.mark.parametrize("T", [1, 7, 33])
def test_the_recomputed_weights_are_the_forwards_bit_for_bit(T, rng):
    """The forward keeps no weights, so we read them off its output: with v = 0 except channel j of
    position s0, where it is 1, out_t[j] = sum_s att[t, s] v_s[j] has one nonzero term, att[t, s0]
    (exact: the other terms are exact zeros). The same holds for the backward's recomputed weights
    through d_v_s0 = sum_t att[t, s0] d_out_t with d_out = 0 except channel j of position t0.
    attention_weights must give both, bit for bit."""
    B, C, NH = 2, 12, 3
    hs = C // NH
    qkv = randn(rng, B, T, 3 * C, scale=2.0)
    qkv[..., 2 * C:] = 0.0
    _, row_max, row_sum = K.attention_forward(qkv, NH)
    att = K.attention_weights(qkv, row_max, row_sum, NH)
    for s0 in sorted({0, T // 2, T - 1}):
        for h in range(NH):
            j = h * hs + (s0 % hs)                                   # a channel of head h
            one_hot = qkv.copy()
            one_hot[:, s0, 2 * C + j] = 1.0
            out = K.attention_forward(one_hot, NH)[0]
            np.testing.assert_array_equal(out[:, :, j], att[:, h, :, s0])           # the forward's weights
            d_out = np.zeros((B, T, C), np.float32)
            d_out[:, s0, j] = 1.0
            d_v = K.attention_backward(d_out, qkv, row_max, row_sum, NH)[:, :, 2 * C + j]
            np.testing.assert_array_equal(d_v, att[:, h, s0, :])                    # the backward's


CROSS_ENTROPY_SIZES = [(1, 1, 1), (1, 3, 7), (2, 3, 17), (1, 7, 33), (3, 1, 65), (2, 5, 3)]


@pytest.mark.parametrize("B, T, V", CROSS_ENTROPY_SIZES)
def test_cross_entropy_forward_matches_reference(B, T, V, rng):
    logits = randn(rng, B, T, V, scale=3.0)
    targets = rng.integers(0, V, (B, T))
    loss, probs = K.cross_entropy_forward(logits, targets)
    r_loss, r_probs = R.cross_entropy_forward(logits, targets)
    assert_within(probs, r_probs, softmax_bound(logits, r_probs), "probs")
    # loss_n = log(sum exp(z - m)) - (z_y - m): the log turns the sum's relative error (softmax's
    # normaliser: U (max|z - m| + V) + EXP_REL_ERR) into an absolute one, z_y - m rounds
    # (U |z_y - m|), loss_n rounds to float32 (U |loss_n|); the log and the mean are in double.
    z = f64(logits).reshape(B * T, V)
    shifted = z.max(1, keepdims=True) - z
    picked = shifted[np.arange(B * T), targets.reshape(-1)]
    per_position = np.log(np.exp(-shifted).sum(1)) + picked
    bound = (U * (shifted.max(1) + V + picked + per_position + 1) + EXP_REL_ERR).mean()
    assert isinstance(loss, float)
    assert abs(loss - r_loss) <= bound, f"loss {loss!r} vs reference {r_loss!r}, bound {bound:.3g}"


@pytest.mark.parametrize("d_loss", [1.0, 0.37])
@pytest.mark.parametrize("B, T, V", CROSS_ENTROPY_SIZES)
def test_cross_entropy_backward_matches_reference(B, T, V, d_loss, rng):
    probs = R.softmax_forward(randn(rng, B * T, V, scale=2.0)).reshape(B, T, V)
    targets = rng.integers(0, V, (B, T))
    got = K.cross_entropy_backward(probs, targets, d_loss=d_loss)
    want = R.cross_entropy_backward(probs, targets, d_loss=d_loss)
    # scale = d_loss / (B T) rounds to float32 (U), then scale * p (U) and, at the target, - scale (U
    # of the result); the reference rounds once more. All terms are at most |scale| (p + onehot).
    onehot = np.zeros((B, T, V))
    np.put_along_axis(onehot, targets[..., None], 1.0, -1)
    bound = 4 * U * abs(d_loss) / (B * T) * (f64(probs) + onehot)
    assert_within(got, want, bound, "d_logits")


# (B, T, C, V, block_size): a 1x1x1 table, C = 33 (two blocks of 16 channels and one more), C = 65,
# V = 3 with 10 positions (every token repeats), T < block_size and T = block_size.
EMBEDDING_SIZES = [(1, 1, 1, 1, 1), (2, 3, 7, 5, 4), (3, 7, 17, 11, 7), (2, 5, 33, 3, 9), (1, 3, 65, 65, 3)]


@pytest.mark.parametrize("B, T, C, V, block_size", EMBEDDING_SIZES)
def test_embedding_forward_equals_reference_exactly(B, T, C, V, block_size, rng):
    idx = rng.integers(0, V, (B, T))
    wte, wpe = randn(rng, V, C), randn(rng, block_size, C)
    # one correctly rounded float32 add per element on both sides: bit-identical
    np.testing.assert_array_equal(K.embedding_forward(idx, wte, wpe), R.embedding_forward(idx, wte, wpe))


@pytest.mark.parametrize("B, T, C, V, block_size", EMBEDDING_SIZES)
def test_embedding_backward_matches_reference(B, T, C, V, block_size, rng):
    idx = rng.integers(0, V, (B, T))
    d_out = randn(rng, B, T, C)
    d_wte, d_wpe = K.embedding_backward(d_out, idx, V, block_size)
    r_wte, r_wpe = R.embedding_backward(d_out, idx, V, block_size)
    # each row sums the d_out rows routed to it in float32: (count + 1) U sum|terms|. The reference
    # is linear with coefficients 0 or 1, so on |d_out| it gives exactly those sums of |terms|.
    abs_wte, abs_wpe = R.embedding_backward(np.abs(d_out), idx, V, block_size)
    count = np.bincount(idx.reshape(-1), minlength=V)[:, None]
    assert_within(d_wte, r_wte, (count + 1) * U * f64(abs_wte), "d_wte")
    assert_within(d_wpe, r_wpe, (B + 1) * U * f64(abs_wpe), "d_wpe")
    # rows of the tables that nothing used get exactly nothing
    assert np.all(d_wte[count[:, 0] == 0] == 0)
    assert np.all(d_wpe[T:] == 0)


@pytest.mark.parametrize("shape", [(1,), (7,), (3, 5), (2, 3, 17), (4097,)], ids=str)
def test_residual_forward_and_backward_equal_reference_exactly(shape, rng):
    a, b, d_out = randn(rng, *shape), randn(rng, *shape), randn(rng, *shape)
    # a + b is one correctly rounded add, and backward copies d_out: bit-identical on both sides
    np.testing.assert_array_equal(K.residual_forward(a, b), R.residual_forward(a, b))
    for got, want in zip(K.residual_backward(d_out), R.residual_backward(d_out)):
        np.testing.assert_array_equal(got, want)


def adamw_bounds(p, g, m, v, lr, beta1, beta2, eps, wd, step, m_new, v_new, p_new):
    """Bounds on |m|, |v|, |param| - reference, if the kernel rounds each coefficient it uses (beta1,
    1 - beta1, beta2, 1 - beta2, 1 - lr wd, the bias corrections, eps) to float32 once, U each, and
    then does a handful of float32 operations, U each:
        m   = beta1 m + (1 - beta1) g            4 U (|beta1 m| + |(1 - beta1) g|)
        v   = beta2 v + (1 - beta2) g^2          4 U (beta2 v + (1 - beta2) g^2)
        upd = lr m_hat / (sqrt(v_hat) + eps)     m's error, half v's relative error, and ~6 U more
        p   = p (1 - lr wd) - upd                3 U |p (1 - lr wd)| + upd's error + 2 U |p_new|
    """
    p, g, m, v = f64(p), f64(g), f64(m), f64(v)
    m_new, v_new, p_new = f64(m_new), f64(v_new), f64(p_new)
    bound_m = 4 * U * (np.abs(beta1 * m) + np.abs((1 - beta1) * g))
    bound_v = 4 * U * (beta2 * v + (1 - beta2) * g * g)
    c1, c2 = 1 - beta1 ** step, 1 - beta2 ** step
    root = np.sqrt(v_new / c2)
    den = root + eps
    upd = lr * (m_new / c1) / den
    bound_den = root * (0.5 * bound_v / np.maximum(v_new, 1e-300) + 4 * U) + U * eps
    bound_upd = lr * (bound_m / c1) / den + np.abs(upd) * (bound_den / den + 6 * U)
    bound_p = 3 * U * np.abs(p * (1 - lr * wd)) + bound_upd + 2 * U * np.abs(p_new)
    return bound_m, bound_v, bound_p


def run_adamw(rng, shape, steps, **hyper):
    """`steps` AdamW steps on both sides from the same start; checks every step against the bounds."""
    param = randn(rng, *shape)
    m, v = np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    for step in range(1, steps + 1):
        grad = randn(rng, *shape)
        p_k, m_k, v_k = param.copy(), m.copy(), v.copy()
        p_r, m_r, v_r = param.copy(), m.copy(), v.copy()
        assert K.adamw_update(p_k, grad, m_k, v_k, step=step, **hyper) is None
        R.adamw_update(p_r, grad, m_r, v_r, step=step, **hyper)
        bound_m, bound_v, bound_p = adamw_bounds(param, grad, m, v, hyper["lr"], hyper["beta1"],
                                                 hyper["beta2"], hyper["eps"], hyper["weight_decay"],
                                                 step, m_r, v_r, p_r)
        assert_within(m_k, m_r, bound_m, f"m at step {step}")
        assert_within(v_k, v_r, bound_v, f"v at step {step}")
        assert_within(p_k, p_r, bound_p, f"param at step {step}")
        param, m, v = p_r, m_r, v_r    # continue from the reference state, so errors do not compound


# beta1 = 7/8 and beta2 = 127/128 are exact in float32, and so are 1 - beta1 and 1 - beta2, so these
# cases check the arithmetic of the update itself, whatever way the kernel derives its coefficients.
@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
@pytest.mark.parametrize("shape", [(1,), (7,), (17, 65), (4097,)], ids=str)
def test_adamw_update_matches_reference_over_several_steps(shape, weight_decay, rng):
    run_adamw(rng, shape, steps=3, lr=1e-2, beta1=0.875, beta2=0.9921875, eps=1e-8,
              weight_decay=weight_decay)


# GPT-2's / nanoGPT's betas (0.9, 0.95) and torch's default (0.9, 0.999) are not exact in float32.
# The kernel must compute 1 - beta in double and round it once, as torch and the reference do;
# rounding beta first would put an error of U beta / (1 - beta) into 1 - beta (~1000U for 0.999).
@pytest.mark.parametrize("beta1, beta2", [(0.9, 0.95), (0.9, 0.999)])
def test_adamw_update_rounds_its_coefficients_once_with_common_betas(beta1, beta2, rng):
    run_adamw(rng, (4097,), steps=3, lr=6e-4, beta1=beta1, beta2=beta2, eps=1e-8, weight_decay=0.1)


# ====================================================================================================
# 2. One thread and two threads give bit-identical results
# ====================================================================================================
# Every kernel only goes parallel above ~32k flops of work (PARALLEL_MIN_WORK in _kernels.pyx), so
# these sizes are all well above it. Every output element is owned by one thread that sums its terms
# in a fixed order, so the results must be equal bit for bit, not just close.

def _determinism_cases():
    def matmul(rng, n, ic, oc):
        inp, weight, bias = randn(rng, n, ic), randn(rng, ic, oc), randn(rng, oc)
        d_out = randn(rng, n, oc)
        return lambda: (K.matmul_forward(inp, weight, bias),
                        *K.matmul_backward(d_out, inp, weight, d_bias=np.zeros(oc, np.float32)))

    def softmax(rng):
        x, d_probs = randn(rng, 768, 65), randn(rng, 768, 65)
        return lambda: (K.softmax_forward(x), K.softmax_backward(d_probs, K.softmax_forward(x)))

    def gelu(rng):
        x, d_out = randn(rng, 768, 512), randn(rng, 768, 512)
        return lambda: (K.gelu_forward(x), K.gelu_backward(d_out, x))

    def layernorm(rng):
        x, w, b, d_out = randn(rng, 768, 128), randn(rng, 128), randn(rng, 128), randn(rng, 768, 128)

        def run():
            out, mean, rstd = K.layernorm_forward(x, w, b)
            return (out, mean, rstd, *K.layernorm_backward(d_out, x, w, mean, rstd))
        return run

    def attention(rng):
        qkv, d_out = randn(rng, 4, 64, 3 * 64), randn(rng, 4, 64, 64)

        def run():
            out, row_max, row_sum = K.attention_forward(qkv, 4)
            drop = dict(dropout_p=0.1, dropout_key=DROPOUT_KEY)
            dropped = K.attention_forward(qkv, 4, **drop)
            return (out, row_max, row_sum, K.attention_weights(qkv, row_max, row_sum, 4),
                    K.attention_backward(d_out, qkv, row_max, row_sum, 4), *dropped,
                    K.attention_backward(d_out, qkv, *dropped[1:], 4, **drop))
        return run

    def dropout(rng):
        x = randn(rng, 768, 512)
        return lambda: (K.dropout_forward(x, 0.1, DROPOUT_KEY), K.dropout_backward(x, 0.1, DROPOUT_KEY))

    def cross_entropy(rng):
        logits, targets = randn(rng, 12, 64, 65, scale=2.0), rng.integers(0, 65, (12, 64))

        def run():
            loss, probs = K.cross_entropy_forward(logits, targets)
            return np.float64(loss), probs, K.cross_entropy_backward(probs, targets, d_loss=0.5)
        return run

    def embedding(rng):
        idx, wte, wpe = rng.integers(0, 65, (8, 64)), randn(rng, 65, 128), randn(rng, 64, 128)
        d_out = randn(rng, 8, 64, 128)
        return lambda: (K.embedding_forward(idx, wte, wpe), *K.embedding_backward(d_out, idx, 65, 64))

    def residual(rng):
        a, b = randn(rng, 768, 512), randn(rng, 768, 512)
        return lambda: (K.residual_forward(a, b), *K.residual_backward(a))

    def adamw(rng):
        p, g, m, v = randn(rng, 200_003), randn(rng, 200_003), randn(rng, 200_003), randn(rng, 200_003)

        def run():
            state = [p.copy(), m.copy(), np.abs(v)]
            K.adamw_update(state[0], g, state[1], state[2], lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                           weight_decay=0.1, step=5)
            return tuple(state)
        return run

    def matmul_few_rows(rng, n, ic, oc):
        # generation's path (n <= 4 rows), in both weight layouts, with the columns split by thread
        inp, weight, bias = randn(rng, n, ic), randn(rng, ic, oc), randn(rng, oc)
        return lambda: (K.matmul_forward(inp, weight, bias),
                        K.matmul_forward(inp, np.ascontiguousarray(weight.T), bias, weight_transposed=True))

    return {
        "matmul few rows 1x768 @ 768x2304": lambda rng: matmul_few_rows(rng, 1, 768, 2304),
        "matmul few rows 3x129 @ 129x1001": lambda rng: matmul_few_rows(rng, 3, 129, 1001),
        # 192 rows, so that d_bias's column sums (N * OC flops) go parallel too
        "matmul 192x128 @ 128x200": lambda rng: matmul(rng, 192, 128, 200),
        "matmul 193x129 @ 129x201": lambda rng: matmul(rng, 193, 129, 201),
        "softmax": softmax, "gelu": gelu, "layernorm": layernorm, "attention": attention,
        "cross_entropy": cross_entropy, "embedding": embedding, "residual": residual, "adamw": adamw,
        "dropout": dropout,
    }


DETERMINISM_CASES = _determinism_cases()


@pytest.mark.parametrize("case", list(DETERMINISM_CASES))
def test_one_and_two_threads_give_bit_identical_results(case, rng, restore_threads):
    run = DETERMINISM_CASES[case](rng)
    K.set_num_threads(1)
    assert K.get_num_threads() == 1
    serial = run()
    K.set_num_threads(2)
    assert K.get_num_threads() == 2
    parallel = run()
    assert len(serial) == len(parallel)
    for i, (a, b) in enumerate(zip(serial, parallel)):
        assert np.array_equal(a, b), f"{case}: output {i} differs between 1 and 2 threads"


def test_set_num_threads_is_honoured_and_restored(restore_threads):
    K.set_num_threads(2)
    assert K.get_num_threads() == 2
    K.set_num_threads(1)
    assert K.get_num_threads() == 1


# ====================================================================================================
# 3. Forward overwrites its buffers; backward accumulates into them
# ====================================================================================================

def _backward_cases():
    """name -> (make inputs(rng) -> (args, buffer names, buffer shapes), call(args, **buffers)).

    Kernels that add into a buffer once per element (softmax, GELU, layernorm, residual, matmul's
    d_bias) need nothing special: a second call into zeroed buffers gives exactly 2g for any inputs
    (see FUSED below for the one subtlety). Kernels that add into the buffer in several steps
    (matmul: d_inp and d_weight continue their running sum over k from the buffer's value;
    attention: d_v_s gathers one term per later t; embedding: a row of d_wte gathers one per use of
    its token; cross-entropy: + scale p, then - scale at the target) round after each step, so we
    feed those dyadic values whose every partial sum is exact in float32, and the results must
    still be exact."""
    cases = {}

    def matmul(rng):
        N, IC, OC = 7, 17, 33
        return ((dyadic(rng, N, OC), dyadic(rng, N, IC), dyadic(rng, IC, OC)),
                {"d_inp": (N, IC), "d_weight": (IC, OC), "d_bias": (OC,)})
    # d_bias=None skips the bias gradient, so the call without buffers passes a zeroed one
    cases["matmul_backward"] = (matmul, lambda a, **b: K.matmul_backward(
        *a, **{"d_bias": np.zeros(a[0].shape[1], np.float32), **b}))

    def softmax(rng):
        probs = R.softmax_forward(randn(rng, 5, 17))
        return (randn(rng, 5, 17), probs), {"d_x": (5, 17)}
    cases["softmax_backward"] = (softmax, lambda a, **b: (K.softmax_backward(*a, **b),))

    def gelu(rng):
        return (randn(rng, 3, 33), randn(rng, 3, 33)), {"d_x": (3, 33)}
    cases["gelu_backward"] = (gelu, lambda a, **b: (K.gelu_backward(*a, **b),))

    def layernorm(rng):
        x, w = randn(rng, 7, 33), randn(rng, 33)
        _, mean, rstd = R.layernorm_forward(x, w, w)
        return (randn(rng, 7, 33), x, w, mean, rstd), {"d_x": (7, 33), "d_weight": (33,), "d_bias": (33,)}
    cases["layernorm_backward"] = (layernorm, lambda a, **b: K.layernorm_backward(*a, **b))

    def residual(rng):
        return (randn(rng, 3, 17),), {"d_a": (3, 17), "d_b": (3, 17)}
    cases["residual_backward"] = (residual, lambda a, **b: K.residual_backward(*a, **b))

    def attention(rng):
        # The weights are recomputed from q and k, so we pick q and k that make them dyadic: every
        # score is 0 or -128 (the kernel's exp gives exactly 1 or 0: it returns 0 below -88), with one
        # or two positions s <= t of score 0 in each row, so att[t, s] is 0, 1/2 or 1. hs = 4, so
        # 1/sqrt(hs) = 0.5 is exact.
        B, T, C, NH = 2, 5, 8, 2
        qkv = dyadic(rng, B, T, 3 * C, denominator=2, high=3)
        heads = np.arange(NH) * (C // NH)
        qkv[:, :, heads] = 2.0                                  # q's first channel of each head
        qkv[:, :, C:2 * C] = 0.0
        qkv[:, [1, 3, 4], C + heads[:, None]] = -128.0          # k_1, k_3, k_4 score -128 against every q
        row_max, row_sum = R.attention_forward(qkv, NH)[1:]
        return (dyadic(rng, B, T, C, denominator=2, high=3), qkv, row_max, row_sum, NH), {"d_qkv": (B, T, 3 * C)}
    cases["attention_backward"] = (attention, lambda a, **b: (K.attention_backward(*a, **b),))

    def embedding(rng):
        B, T, C, V = 3, 5, 33, 4          # 15 positions over 4 tokens: every row of d_wte adds often
        return (dyadic(rng, B, T, C), rng.integers(0, V, (B, T)), V, 6), {"d_wte": (V, C), "d_wpe": (6, C)}
    cases["embedding_backward"] = (embedding, lambda a, **b: K.embedding_backward(*a, **b))

    def cross_entropy(rng):
        B, T, V = 2, 2, 9                 # d_loss / (B T) = 0.25, probs in multiples of 1/16
        probs = rng.integers(0, 5, (B, T, V)).astype(np.float32) / 16
        return (probs, rng.integers(0, V, (B, T))), {"d_logits": (B, T, V)}
    cases["cross_entropy_backward"] = (cross_entropy, lambda a, **b: (K.cross_entropy_backward(*a, **b),))
    return cases


BACKWARD_CASES = _backward_cases()


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_called_twice_into_the_same_buffers_gives_exactly_twice(name, rng):
    make, call = BACKWARD_CASES[name]
    args, shapes = make(rng)
    once = call(args)
    buffers = {key: np.zeros(shape, np.float32) for key, shape in shapes.items()}
    first = call(args, **buffers)
    for got, buf in zip(first, buffers.values()):
        assert got is buf, f"{name} must return the buffers it was given"
    call(args, **buffers)
    for key, single in zip(shapes, once):
        assert np.any(single != 0), f"{name}: {key} is all zeros, the test would prove nothing"
        np.testing.assert_array_equal(buffers[key], 2 * single, err_msg=f"{name}: {key}")


# gcc contracts `d_x[j] += a * b` into one fused multiply-add, which rounds a*b + d_x once, where
# "compute g, then add it" rounds twice. Into a zeroed buffer that changes nothing (fma(a, b, 0) is
# round(a b) = g, and fma(a, b, g) = 2g exactly, as g's rounding error is under a quarter ulp of 2g),
# but into a prefilled buffer P the result may differ from numpy's P + g by g's own rounding: U |g|
# (plus the U |P + g| both round by). These gradients are formed by such a multiply-add:
FUSED = {("softmax_backward", "d_x"), ("gelu_backward", "d_x"), ("layernorm_backward", "d_x")}


@pytest.mark.parametrize("name", list(BACKWARD_CASES))
def test_backward_adds_into_prefilled_buffers(name, rng):
    make, call = BACKWARD_CASES[name]
    args, shapes = make(rng)
    once = call(args)
    prefill = {key: dyadic(rng, *shape) for key, shape in shapes.items()}
    buffers = {key: value.copy() for key, value in prefill.items()}
    call(args, **buffers)
    for key, single in zip(shapes, once):
        if (name, key) in FUSED:
            want = f64(prefill[key]) + f64(single)
            assert_within(buffers[key], want, U * (np.abs(want) + np.abs(f64(single))), f"{name}: {key}")
        else:
            np.testing.assert_array_equal(buffers[key], prefill[key] + single, err_msg=f"{name}: {key}")


def _forward_cases():
    """name -> make(rng) -> (call(**buffers) -> tuple of outputs, {buffer name: shape})."""
    def matmul(fn):
        def make(rng):
            inp, weight, bias = randn(rng, 7, 3), randn(rng, 3, 33), randn(rng, 33)
            return (lambda **b: (fn(inp, weight, bias, **b),)), {"out": (7, 33)}
        return make

    def softmax(rng):
        x = randn(rng, 3, 17)
        return (lambda **b: (K.softmax_forward(x, **b),)), {"out": (3, 17)}

    def gelu(rng):
        x = randn(rng, 2, 3, 7)
        return (lambda **b: (K.gelu_forward(x, **b),)), {"out": (2, 3, 7)}

    def layernorm(rng):
        x, w, b = randn(rng, 5, 17), randn(rng, 17), randn(rng, 17)
        shapes = {"out": (5, 17), "mean": (5,), "rstd": (5,)}
        return (lambda **bufs: K.layernorm_forward(x, w, b, **bufs)), shapes

    def attention(rng):
        qkv = randn(rng, 2, 7, 3 * 6)
        return (lambda **b: K.attention_forward(qkv, 2, **b)), {"out": (2, 7, 6), "row_max": (2, 2, 7),
                                                                "row_sum": (2, 2, 7)}

    def cross_entropy(rng):
        logits, targets = randn(rng, 2, 3, 7), rng.integers(0, 7, (2, 3))
        return (lambda **b: K.cross_entropy_forward(logits, targets, **b)[1:]), {"probs": (2, 3, 7)}

    def embedding(rng):
        idx, wte, wpe = rng.integers(0, 5, (2, 3)), randn(rng, 5, 17), randn(rng, 4, 17)
        return (lambda **b: (K.embedding_forward(idx, wte, wpe, **b),)), {"out": (2, 3, 17)}

    def residual(rng):
        a, b = randn(rng, 3, 17), randn(rng, 3, 17)
        return (lambda **bufs: (K.residual_forward(a, b, **bufs),)), {"out": (3, 17)}

    return {"matmul_forward": matmul(K.matmul_forward),
            "softmax_forward": softmax, "gelu_forward": gelu, "layernorm_forward": layernorm,
            "attention_forward": attention, "cross_entropy_forward": cross_entropy,
            "embedding_forward": embedding, "residual_forward": residual}


FORWARD_CASES = _forward_cases()


@pytest.mark.parametrize("name", list(FORWARD_CASES))
def test_forward_overwrites_buffers_filled_with_nan(name, rng):
    call, shapes = FORWARD_CASES[name](rng)
    fresh = call()
    buffers = {key: np.full(shape, np.nan, np.float32) for key, shape in shapes.items()}
    returned = call(**buffers)
    for key, got, buf, want in zip(shapes, returned, buffers.values(), fresh):
        assert got is buf, f"{name} must return the {key} buffer it was given"
        np.testing.assert_array_equal(buf, want, err_msg=f"{name}: {key}")


# ====================================================================================================
# 4. The contract: what each public function refuses, and that it says which argument is at fault
# ====================================================================================================
# Sizes here avoid any axis of length 1: numpy calls an array contiguous whatever its stride along an
# axis of length 1, so a strided view there would not test anything.

def valid_calls():
    """name -> make(rng) -> keyword arguments of a call that succeeds (output buffers included)."""
    N, IC, OC = 4, 3, 5
    B, T, C, NH, V, BS = 2, 3, 4, 2, 5, 4

    def z(*shape):
        return np.zeros(shape, np.float32)

    def matmul(rng):
        return dict(inp=randn(rng, N, IC), weight=randn(rng, IC, OC), bias=randn(rng, OC), out=z(N, OC))

    def layernorm_backward(rng):
        x = randn(rng, N, C)
        w = randn(rng, C)
        _, mean, rstd = R.layernorm_forward(x, w, w)
        return dict(d_out=randn(rng, N, C), x=x, weight=w, mean=mean, rstd=rstd,
                    d_x=z(N, C), d_weight=z(C), d_bias=z(C), scratch=z(N, 2 * C))

    def attention_backward(rng):
        qkv = randn(rng, B, T, 3 * C)
        _, row_max, row_sum = R.attention_forward(qkv, NH)
        return dict(d_out=randn(rng, B, T, C), qkv=qkv, row_max=row_max, row_sum=row_sum, n_head=NH,
                    d_qkv=z(B, T, 3 * C), dropout_p=0.5, dropout_key=7)

    def attention_weights(rng):
        qkv = randn(rng, B, T, 3 * C)
        _, row_max, row_sum = R.attention_forward(qkv, NH)
        return dict(qkv=qkv, row_max=row_max, row_sum=row_sum, n_head=NH, out=z(B, NH, T, T))

    return {
        "matmul_forward": matmul,
        "matmul_backward": lambda rng: dict(d_out=randn(rng, N, OC), inp=randn(rng, N, IC),
                                            weight=randn(rng, IC, OC), d_inp=z(N, IC),
                                            d_weight=z(IC, OC), d_bias=z(OC)),
        "softmax_forward": lambda rng: dict(x=randn(rng, N, V), out=z(N, V)),
        "softmax_backward": lambda rng: dict(d_probs=randn(rng, N, V),
                                             probs=R.softmax_forward(randn(rng, N, V)), d_x=z(N, V)),
        "gelu_forward": lambda rng: dict(x=randn(rng, N, C), out=z(N, C)),
        "gelu_backward": lambda rng: dict(d_out=randn(rng, N, C), x=randn(rng, N, C), d_x=z(N, C)),
        "layernorm_forward": lambda rng: dict(x=randn(rng, N, C), weight=randn(rng, C), bias=randn(rng, C),
                                              out=z(N, C), mean=z(N), rstd=z(N)),
        "layernorm_backward": layernorm_backward,
        "attention_forward": lambda rng: dict(qkv=randn(rng, B, T, 3 * C), n_head=NH, out=z(B, T, C),
                                              row_max=z(B, NH, T), row_sum=z(B, NH, T), dropout_p=0.5,
                                              dropout_key=7),
        "attention_backward": attention_backward,
        "attention_weights": attention_weights,
        "dropout_forward": lambda rng: dict(x=randn(rng, N, C), p=0.5, key=7, out=z(N, C)),
        "dropout_backward": lambda rng: dict(d_out=randn(rng, N, C), p=0.5, key=7, d_x=z(N, C)),
        "cross_entropy_forward": lambda rng: dict(logits=randn(rng, B, T, V),
                                                  targets=rng.integers(0, V, (B, T)), probs=z(B, T, V),
                                                  losses=z(B * T)),
        "cross_entropy_backward": lambda rng: dict(probs=R.softmax_forward(randn(rng, B * T, V))
                                                   .reshape(B, T, V),
                                                   targets=rng.integers(0, V, (B, T)), d_logits=z(B, T, V)),
        "embedding_forward": lambda rng: dict(idx=rng.integers(0, V, (B, T)), wte=randn(rng, V, C),
                                              wpe=randn(rng, BS, C), out=z(B, T, C)),
        "embedding_backward": lambda rng: dict(d_out=randn(rng, B, T, C), idx=rng.integers(0, V, (B, T)),
                                               vocab_size=V, block_size=BS, d_wte=z(V, C), d_wpe=z(BS, C)),
        "residual_forward": lambda rng: dict(a=randn(rng, N, C), b=randn(rng, N, C), out=z(N, C)),
        "residual_backward": lambda rng: dict(d_out=randn(rng, N, C), d_a=z(N, C), d_b=z(N, C)),
        "adamw_update": lambda rng: dict(param=randn(rng, N, C), grad=randn(rng, N, C), m=z(N, C),
                                         v=z(N, C), lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8,
                                         weight_decay=0.1, step=1),
        "sum_of_squares": lambda rng: dict(x=randn(rng, N, C)),
        "attention_forward_cached": lambda rng: dict(qkv=randn(rng, B, T, 3 * C), start=1, end=T, n_head=NH,
                                                     out=z(B, T - 1, C)),
    }


VALID = valid_calls()
PUBLIC_KERNELS = [name for name in K.__all__ if name not in compiled.SETTINGS]



def output_buffers(name):
    """The output buffers of a function: its keyword-only array arguments (out=, d_x=, ...)."""
    kwargs = VALID[name](np.random.default_rng(0))
    return {arg for arg, p in inspect.signature(getattr(K, name)).parameters.items()
            if p.kind is p.KEYWORD_ONLY and isinstance(kwargs.get(arg), np.ndarray)}


# Output buffers may be None (then the function allocates), and so may matmul's bias.
OPTIONAL = {(name, arg) for name in PUBLIC_KERNELS for arg in output_buffers(name)}
OPTIONAL |= {("matmul_forward", "bias")}
INDEX_ARGS = {"idx", "targets"}
# Of a function that takes any shape, the first array sets the shape; a change of rank there is legal
# (the error, if any, names the array compared with it).
SHAPE_LEADERS = {("gelu_forward", "x"), ("gelu_backward", "x"), ("residual_forward", "a"),
                 ("residual_backward", "d_out"), ("adamw_update", "param"), ("sum_of_squares", "x"),
                 ("dropout_forward", "x"), ("dropout_backward", "d_out")}
# matmul and layernorm take any number of leading dimensions (rows): there a rank of 1 is the error.
ROW_LEADERS = {("matmul_forward", "inp"), ("matmul_backward", "inp"), ("layernorm_forward", "x"),
               ("layernorm_backward", "x")}
SHAPE_LEADERS |= ROW_LEADERS


def float_array_args():
    cases = []
    for name in PUBLIC_KERNELS:
        kwargs = VALID[name](np.random.default_rng(0))
        for arg, value in kwargs.items():
            if isinstance(value, np.ndarray) and value.dtype == np.float32:
                cases.append((name, arg))
    return cases


FLOAT_ARGS = float_array_args()
INDEX_CASES = [(name, arg) for name in PUBLIC_KERNELS for arg in VALID[name](np.random.default_rng(0))
               if arg in INDEX_ARGS]


def call(name, kwargs):
    return getattr(K, name)(**kwargs)


def test_every_public_kernel_has_a_valid_call_and_a_reference_twin(rng):
    for name in PUBLIC_KERNELS:
        assert inspect.signature(getattr(K, name)).parameters.keys() == \
            inspect.signature(getattr(R, name)).parameters.keys(), name
        call(name, VALID[name](rng))       # the baseline every contract test perturbs is legal


def strided(a):
    """The same values and shape, but every axis strided: not C-contiguous."""
    base = np.zeros(tuple(2 * n for n in a.shape), a.dtype)
    view = base[tuple(slice(None, None, 2) for _ in a.shape)]
    view[...] = a
    assert not view.flags.c_contiguous
    return view


@pytest.mark.parametrize("name, arg", FLOAT_ARGS)
@pytest.mark.parametrize("dtype", [np.float64, np.float16, np.int32])
def test_float_argument_of_wrong_dtype_raises_type_error(name, arg, dtype, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = kwargs[arg].astype(dtype)
    with pytest.raises(TypeError, match=rf"^{arg} must have dtype float32"):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg", FLOAT_ARGS + INDEX_CASES)
def test_argument_given_as_a_list_raises_type_error(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = kwargs[arg].tolist()
    with pytest.raises(TypeError, match=rf"^{arg} must be a numpy array"):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg", [case for case in FLOAT_ARGS + INDEX_CASES if case not in OPTIONAL])
def test_required_argument_given_as_none_raises_type_error(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = None
    with pytest.raises(TypeError, match=rf"^{arg} must be a numpy array"):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg",
                         [case for case in FLOAT_ARGS + INDEX_CASES if case not in SHAPE_LEADERS])
def test_argument_of_wrong_rank_raises_value_error_naming_it(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = kwargs[arg][None]
    with pytest.raises(ValueError, match=rf"^{arg} must "):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg", sorted(ROW_LEADERS))
def test_row_argument_of_rank_one_raises_value_error_naming_it(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = np.ascontiguousarray(kwargs[arg][0])
    with pytest.raises(ValueError, match=rf"^{arg} must be at least 2-D"):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg", FLOAT_ARGS)
def test_non_contiguous_float_argument_raises_value_error(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = strided(kwargs[arg])
    with pytest.raises(ValueError, match=rf"^{arg} must be C-contiguous"):
        call(name, kwargs)


@pytest.mark.parametrize("name", ["matmul_forward", "matmul_backward"])
def test_transposed_matmul_input_raises_value_error(name, rng):
    kwargs = VALID[name](rng)
    kwargs["inp"] = np.ascontiguousarray(kwargs["inp"].T).T     # same shape and values, Fortran order
    with pytest.raises(ValueError, match=r"^inp must be C-contiguous"):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg", FLOAT_ARGS + INDEX_CASES)
def test_empty_argument_raises_value_error(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = kwargs[arg][:0]
    with pytest.raises(ValueError, match=rf"^{arg} must not be empty"):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg",
                         [(name, arg) for name in PUBLIC_KERNELS for arg in sorted(output_buffers(name))])
def test_read_only_output_buffer_raises_value_error(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg].flags.writeable = False
    with pytest.raises(ValueError, match=rf"^{arg} must be writeable"):
        call(name, kwargs)


@pytest.mark.parametrize("name", [name for name in PUBLIC_KERNELS if name != "adamw_update"])
def test_read_only_inputs_are_accepted(name, rng):
    # inputs are only read (const memoryviews in the compiled code), so a read-only array must do
    kwargs = VALID[name](rng)
    for arg, value in kwargs.items():
        if isinstance(value, np.ndarray) and arg not in output_buffers(name):
            value.flags.writeable = False
    call(name, kwargs)


@pytest.mark.parametrize("arg", ["param", "m", "v"])
def test_adamw_update_refuses_read_only_state(arg, rng):
    kwargs = VALID["adamw_update"](rng)
    kwargs[arg].flags.writeable = False
    with pytest.raises(ValueError, match=rf"^{arg} must be writeable"):
        call("adamw_update", kwargs)


def grow(axis):
    """Add one element along `axis` of an array (a shape mismatch that keeps the rank)."""
    def change(a):
        pad = [(0, 0)] * a.ndim
        pad[axis] = (0, 1)
        return np.ascontiguousarray(np.pad(a, pad))
    return change


# (function, argument, how to change it, the argument the error must name)
MISMATCHES = [
    *[(fn, arg, grow(axis), arg) for fn in ("matmul_forward",)
      for arg, axis in (("weight", 0), ("bias", 0), ("out", 0), ("out", 1))],
    ("matmul_backward", "weight", grow(0), "weight"),
    ("matmul_backward", "inp", grow(1), "weight"),          # IC of inp and weight disagree
    ("matmul_backward", "d_out", grow(0), "d_out"),
    ("matmul_backward", "d_out", grow(1), "d_out"),
    ("matmul_backward", "d_inp", grow(1), "d_inp"),
    ("matmul_backward", "d_weight", grow(0), "d_weight"),
    ("matmul_backward", "d_bias", grow(0), "d_bias"),
    ("softmax_forward", "out", grow(1), "out"),
    ("softmax_backward", "d_probs", grow(1), "d_probs"),
    ("softmax_backward", "d_x", grow(0), "d_x"),
    ("gelu_forward", "out", grow(1), "out"),
    ("gelu_backward", "d_out", grow(0), "d_out"),
    ("gelu_backward", "d_x", grow(1), "d_x"),
    ("layernorm_forward", "weight", grow(0), "weight"),
    ("layernorm_forward", "bias", grow(0), "bias"),
    ("layernorm_forward", "out", grow(1), "out"),
    ("layernorm_forward", "mean", grow(0), "mean"),
    ("layernorm_forward", "rstd", grow(0), "rstd"),
    ("layernorm_backward", "d_out", grow(1), "d_out"),
    ("layernorm_backward", "weight", grow(0), "weight"),
    ("layernorm_backward", "mean", grow(0), "mean"),
    ("layernorm_backward", "rstd", grow(0), "rstd"),
    ("layernorm_backward", "d_x", grow(0), "d_x"),
    ("layernorm_backward", "d_weight", grow(0), "d_weight"),
    ("layernorm_backward", "d_bias", grow(0), "d_bias"),
    ("layernorm_backward", "scratch", grow(1), "scratch"),
    ("attention_forward", "qkv", grow(2), "qkv"),           # last axis 13, not 3C
    ("attention_forward", "out", grow(2), "out"),
    ("attention_forward", "row_max", grow(2), "row_max"),
    ("attention_forward", "row_sum", grow(1), "row_sum"),
    ("attention_backward", "d_out", grow(2), "d_out"),
    ("attention_backward", "d_out", grow(1), "d_out"),
    ("attention_backward", "row_max", grow(1), "row_max"),
    ("attention_backward", "row_sum", grow(2), "row_sum"),
    ("attention_backward", "d_qkv", grow(2), "d_qkv"),
    ("attention_weights", "row_max", grow(2), "row_max"),
    ("attention_weights", "out", grow(3), "out"),
    ("dropout_forward", "out", grow(1), "out"),
    ("dropout_backward", "d_x", grow(0), "d_x"),
    ("cross_entropy_forward", "targets", grow(1), "targets"),
    ("cross_entropy_forward", "probs", grow(2), "probs"),
    ("cross_entropy_forward", "losses", grow(0), "losses"),
    ("cross_entropy_backward", "targets", grow(0), "targets"),
    ("cross_entropy_backward", "d_logits", grow(2), "d_logits"),
    ("embedding_forward", "wpe", grow(1), "wpe"),
    ("embedding_forward", "out", grow(2), "out"),
    ("embedding_backward", "idx", grow(1), "idx"),
    ("embedding_backward", "d_wte", grow(1), "d_wte"),
    ("embedding_backward", "d_wpe", grow(0), "d_wpe"),
    ("residual_forward", "b", grow(1), "b"),
    ("residual_forward", "out", grow(0), "out"),
    ("residual_backward", "d_a", grow(1), "d_a"),
    ("residual_backward", "d_b", grow(0), "d_b"),
    ("adamw_update", "grad", grow(1), "grad"),
    ("adamw_update", "m", grow(0), "m"),
    ("adamw_update", "v", grow(1), "v"),
]


@pytest.mark.parametrize("name, arg, change, named", MISMATCHES,
                         ids=[f"{m[0]}-{m[1]}-{i}" for i, m in enumerate(MISMATCHES)])
def test_mismatched_shapes_raise_value_error_naming_the_argument(name, arg, change, named, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = change(kwargs[arg])
    with pytest.raises(ValueError, match=rf"^{named} "):
        call(name, kwargs)


@pytest.mark.parametrize("bad", [5, 6, 99, -1, -5])
@pytest.mark.parametrize("name, arg", INDEX_CASES)
def test_out_of_range_index_raises_value_error(name, arg, bad, rng):
    kwargs = VALID[name](rng)        # every valid call here has V = vocab_size = 5
    kwargs[arg] = kwargs[arg].copy()
    kwargs[arg][1, 2] = bad
    with pytest.raises(ValueError, match=rf"^{arg} holds {bad}, outside \[0, "):
        call(name, kwargs)


@pytest.mark.parametrize("name, arg", INDEX_CASES)
def test_index_array_of_floats_raises_type_error(name, arg, rng):
    kwargs = VALID[name](rng)
    kwargs[arg] = kwargs[arg].astype(np.float32)
    with pytest.raises(TypeError, match=rf"^{arg} must have an integer dtype"):
        call(name, kwargs)


@pytest.mark.parametrize("dtype", [np.int8, np.uint8, np.int32, np.uint64, np.int64])
def test_index_arrays_of_any_integer_dtype_and_layout_give_the_same_result(dtype, rng):
    idx = rng.integers(0, 5, (3, 2))
    wte, wpe = randn(rng, 5, 4), randn(rng, 4, 4)
    d_out = randn(rng, 2, 3, 4)
    want = K.embedding_forward(np.ascontiguousarray(idx.T), wte, wpe)
    want_grads = K.embedding_backward(d_out, np.ascontiguousarray(idx.T), 5, 4)
    other = idx.astype(dtype).T                                  # a transposed (strided) view
    np.testing.assert_array_equal(K.embedding_forward(other, wte, wpe), want)
    for got, expected in zip(K.embedding_backward(d_out, other, 5, 4), want_grads):
        np.testing.assert_array_equal(got, expected)
    loss, _ = K.cross_entropy_forward(d_out, other % 4)
    assert loss == K.cross_entropy_forward(d_out, np.ascontiguousarray(idx.T) % 4)[0]


@pytest.mark.parametrize("name", ["attention_forward", "attention_backward", "attention_weights"])
@pytest.mark.parametrize("n_head, error", [(3, ValueError), (0, ValueError), (-2, ValueError),
                                           (8, ValueError), (2.0, TypeError), (True, TypeError)])
def test_bad_head_count_raises(name, n_head, error, rng):
    kwargs = VALID[name](rng)         # C = 4: 3 and 8 do not divide it
    kwargs["n_head"] = n_head
    with pytest.raises(error, match=r"^n_head"):
        call(name, kwargs)


@pytest.mark.parametrize("name", ["attention_backward", "attention_weights"])
def test_attention_refuses_row_statistics_of_a_different_head_count(name, rng):
    kwargs = VALID[name](rng)
    kwargs["n_head"] = 4              # legal for C = 4, but row_max was made with 2 heads
    with pytest.raises(ValueError, match=r"^row_max must have shape"):
        call(name, kwargs)


@pytest.mark.parametrize("name", ["dropout_forward", "dropout_backward", "attention_forward",
                                  "attention_backward"])
@pytest.mark.parametrize("p", [1.0, -0.1, 1.5, float("nan"), "0.1", True])
def test_a_dropout_probability_outside_0_1_raises(name, p, rng):
    kwargs = VALID[name](rng)
    kwargs["dropout_p" if name.startswith("attention") else "p"] = p
    with pytest.raises(ValueError, match=r"^dropout must be a probability in \[0, 1\)"):
        call(name, kwargs)


@pytest.mark.parametrize("key", [-1, 2 ** 64])
def test_a_dropout_key_outside_64_bits_raises(key, rng):
    kwargs = VALID["dropout_forward"](rng)
    kwargs["key"] = key
    with pytest.raises(ValueError, match=r"^a dropout key must be an integer in \[0, 2\^64\)"):
        call("dropout_forward", kwargs)


def test_embedding_forward_refuses_more_positions_than_block_size(rng):
    kwargs = VALID["embedding_forward"](rng)
    kwargs["wpe"] = kwargs["wpe"][:2].copy()          # block_size 2 < T = 3
    with pytest.raises(ValueError, match=r"more than block_size=2"):
        call("embedding_forward", kwargs)


def test_embedding_backward_refuses_more_positions_than_block_size(rng):
    kwargs = VALID["embedding_backward"](rng)
    kwargs["block_size"], kwargs["d_wpe"] = 2, None
    with pytest.raises(ValueError, match=r"more than block_size=2"):
        call("embedding_backward", kwargs)


@pytest.mark.parametrize("arg, value, error", [
    ("vocab_size", 0, ValueError), ("block_size", 0, ValueError),
    ("vocab_size", 5.0, TypeError), ("block_size", None, TypeError),
])
def test_embedding_backward_refuses_bad_table_sizes(arg, value, error, rng):
    kwargs = VALID["embedding_backward"](rng)
    kwargs[arg] = value
    with pytest.raises(error, match=rf"^{arg}"):
        call("embedding_backward", kwargs)


@pytest.mark.parametrize("d_loss", [float("nan"), float("inf")])
def test_cross_entropy_backward_refuses_non_finite_d_loss(d_loss, rng):
    kwargs = VALID["cross_entropy_backward"](rng)
    with pytest.raises(ValueError, match=r"^d_loss must be finite"):
        call("cross_entropy_backward", {**kwargs, "d_loss": d_loss})


@pytest.mark.parametrize("arg, value, error", [
    ("step", 0, ValueError), ("step", -1, ValueError), ("step", 1.0, TypeError),
    ("lr", -1e-3, ValueError), ("lr", float("nan"), ValueError), ("eps", -1.0, ValueError),
    ("weight_decay", float("inf"), ValueError), ("beta1", 1.0, ValueError), ("beta2", -0.1, ValueError),
])
def test_adamw_update_refuses_bad_hyperparameters(arg, value, error, rng):
    kwargs = VALID["adamw_update"](rng)
    kwargs[arg] = value
    with pytest.raises(error, match=rf"^{arg} must"):
        call("adamw_update", kwargs)


# Which (output buffer, input) pairs may not overlap: the compiled loops would read what they have
# already overwritten. Overlap is arranged by cutting both arrays from one block of memory.
ALIASES = [
    *[(fn, out, inp) for fn in ("matmul_forward",) for out, inp in
      (("out", "inp"), ("out", "weight"), ("out", "bias"))],
    ("matmul_backward", "d_inp", "d_out"), ("matmul_backward", "d_weight", "inp"),
    ("matmul_backward", "d_bias", "weight"),
    ("softmax_forward", "out", "x"), ("softmax_backward", "d_x", "probs"),
    ("softmax_backward", "d_x", "d_probs"),
    ("gelu_forward", "out", "x"), ("gelu_backward", "d_x", "x"), ("gelu_backward", "d_x", "d_out"),
    ("layernorm_forward", "out", "x"), ("layernorm_forward", "mean", "x"),
    ("layernorm_forward", "rstd", "weight"), ("layernorm_backward", "d_x", "d_out"),
    ("layernorm_backward", "d_weight", "x"), ("layernorm_backward", "d_bias", "rstd"),
    ("layernorm_backward", "scratch", "x"),
    ("attention_forward", "out", "qkv"), ("attention_forward", "row_max", "qkv"),
    ("attention_forward", "row_sum", "out"), ("attention_forward", "row_sum", "row_max"),
    ("attention_backward", "d_qkv", "qkv"), ("attention_backward", "d_qkv", "row_max"),
    ("attention_backward", "d_qkv", "d_out"), ("attention_weights", "out", "qkv"),
    ("dropout_backward", "d_x", "d_out"),
    ("cross_entropy_forward", "probs", "logits"), ("cross_entropy_forward", "losses", "logits"),
    ("cross_entropy_backward", "d_logits", "probs"),
    ("embedding_forward", "out", "wte"), ("embedding_forward", "out", "wpe"),
    ("embedding_backward", "d_wte", "d_out"), ("embedding_backward", "d_wpe", "d_out"),
    ("embedding_backward", "d_wpe", "d_wte"),
    ("residual_forward", "out", "a"), ("residual_forward", "out", "b"),
    ("residual_backward", "d_a", "d_out"), ("residual_backward", "d_b", "d_out"),
    ("residual_backward", "d_b", "d_a"),
]


@pytest.mark.parametrize("name, out, inp", ALIASES)
def test_output_buffer_sharing_memory_with_an_input_raises_value_error(name, out, inp, rng):
    kwargs = VALID[name](rng)
    a, b = kwargs[out], kwargs[inp]
    block = np.zeros(max(a.size, b.size), np.float32)
    kwargs[inp] = block[: b.size].reshape(b.shape)
    kwargs[inp][...] = b                       # the input keeps its (legal) values
    kwargs[out] = block[block.size - a.size:].reshape(a.shape)
    with pytest.raises(ValueError, match=rf"^{out} must not share memory with {inp}"):
        call(name, kwargs)


@pytest.mark.parametrize("n, error", [(0, ValueError), (-1, ValueError), (1.5, TypeError),
                                      ("2", TypeError), (True, TypeError)])
def test_set_num_threads_refuses_non_positive_or_non_int(n, error, restore_threads):
    before = K.get_num_threads()
    with pytest.raises(error, match=r"^n must"):
        K.set_num_threads(n)
    assert K.get_num_threads() == before


@pytest.mark.parametrize("n", [K.MAX_THREADS + 1, 2 ** 31, 3_000_000_000, 2 ** 70])
def test_set_num_threads_refuses_a_count_past_the_maximum_with_the_range(n, restore_threads):
    before = K.get_num_threads()
    with pytest.raises(ValueError, match=rf"^n must be in \[1, {K.MAX_THREADS}\], got {n}$"):
        K.set_num_threads(n)
    assert K.get_num_threads() == before


@pytest.mark.parametrize("step", [0, 2 ** 63, 2 ** 100])
def test_adamw_update_refuses_a_step_outside_a_c_long_long_with_the_range(step, rng):
    param, grad, m, v = (randn(rng, 5) for _ in range(4))
    before = param.copy()
    with pytest.raises(ValueError, match=rf"^step must be in \[1, {2 ** 63 - 1}\], got {step}$"):
        K.adamw_update(param, grad, m, v, lr=1e-3, beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.0,
                       step=step)
    np.testing.assert_array_equal(param, before)


def test_outputs_no_machine_could_hold_are_refused_before_allocation(rng):
    """A terabyte np.zeros can "succeed" under Linux's overcommit and kill the process later: the
    size check refuses it first, with ValueError."""
    d_out, idx = randn(rng, 1, 2, 4), np.zeros((1, 2), np.int64)
    with pytest.raises(ValueError, match=r"^d_wte of shape \(1099511627776, 4\) would need"):
        K.embedding_backward(d_out, idx, vocab_size=2 ** 40, block_size=2)
    # a (2^16, 2^22) float32 matmul output is 1 TiB, from a 256 kB inp and a 16 MB weight
    inp = np.zeros((2 ** 16, 1), np.float32)
    weight = np.zeros((1, 2 ** 22), np.float32)
    with pytest.raises(ValueError, match=r"^out of shape \(65536, 4194304\) would need 1,024.0 GiB"):
        K.matmul_forward(inp, weight)


# ====================================================================================================
# 5. The causal mask
# ====================================================================================================

@pytest.mark.parametrize("B, T, C, NH", [(2, 7, 6, 2), (1, 17, 32, 2), (4, 64, 64, 4)])
def test_attention_weights_are_exactly_zero_above_the_diagonal_and_rows_sum_to_one(B, T, C, NH, rng):
    _, att, _, _ = attention_with_weights(K, randn(rng, B, T, 3 * C, scale=3.0), NH)
    future = np.triu(np.ones((T, T), bool), k=1)
    assert np.all(att[..., future] == 0.0)
    assert np.all(att[..., ~future] > 0.0)
    # each row is a softmax of at most T terms: float32 normalisation leaves a few U per term
    np.testing.assert_allclose(att.sum(-1, dtype=np.float64), 1.0, rtol=0, atol=(T + 4) * U)


@pytest.mark.parametrize("t", [0, 3, 6])
def test_attention_output_at_t_ignores_every_later_position(t, rng):
    B, T, C, NH = 2, 7, 6, 2
    qkv = randn(rng, B, T, 3 * C)
    changed = qkv.copy()
    changed[:, t + 1:, :] = randn(rng, B, T - t - 1, 3 * C, scale=10.0)   # new q, k and v after t
    out, att, row_max, row_sum = attention_with_weights(K, qkv, NH)
    out2, att2, row_max2, row_sum2 = attention_with_weights(K, changed, NH)
    # bit for bit: position t's computation never reads a later position
    np.testing.assert_array_equal(out2[:, :t + 1], out[:, :t + 1])
    np.testing.assert_array_equal(att2[:, :, :t + 1], att[:, :, :t + 1])
    np.testing.assert_array_equal(row_max2[:, :, :t + 1], row_max[:, :, :t + 1])
    np.testing.assert_array_equal(row_sum2[:, :, :t + 1], row_sum[:, :, :t + 1])
    if t + 1 < T:
        assert not np.array_equal(out2[:, t + 1:], out[:, t + 1:])    # the change did reach later rows


@pytest.mark.parametrize("t", [0, 3])
def test_attention_backward_sends_no_gradient_to_later_positions(t, rng):
    B, T, C, NH = 2, 7, 6, 2
    qkv = randn(rng, B, T, 3 * C)
    _, row_max, row_sum = K.attention_forward(qkv, NH)
    d_out = np.zeros((B, T, C), np.float32)
    d_out[:, :t + 1] = randn(rng, B, t + 1, C)         # a loss on positions <= t only
    d_qkv = K.attention_backward(d_out, qkv, row_max, row_sum, NH)
    assert np.all(d_qkv[:, t + 1:] == 0.0)
    assert np.any(d_qkv[:, :t + 1] != 0.0)


@pytest.mark.parametrize("poison", [np.inf, -np.inf, np.nan])
@pytest.mark.parametrize("backend", [K, R], ids=["compiled", "reference"])
def test_the_issue_example_a_later_inf_does_not_reach_position_0(backend, poison):
    """qkv = zeros((1, 2, 3)); qkv[0, 1, 2] = inf (the value of position 1): position 0 stays 0."""
    qkv = np.zeros((1, 2, 3), np.float32)
    qkv[0, 1, 2] = poison
    out, att, _, _ = attention_with_weights(backend, qkv, 1)
    assert out[0, 0, 0] == 0.0 and att[0, 0, 0, 1] == 0.0


@pytest.mark.parametrize("poison", [np.inf, np.nan])
@pytest.mark.parametrize("T", [2, 7, 13, 33])         # the tiles are 6 rows: inside, at and past an edge
@pytest.mark.parametrize("backend", [K, R], ids=["compiled", "reference"])
def test_a_nonfinite_value_never_crosses_the_causal_mask(backend, T, poison, rng):
    """Masked pairs (t, s > t) are excluded from the sums, not multiplied by att = 0 (0 * inf = NaN).
    Forward: q, k, v of positions >= p poisoned leave out and att at t < p as they were, and so the
    backward's d_q at t < p. Backward: q and d_out of positions < p poisoned leave every gradient at
    positions >= p as it was (d_v_s and d_k_s collect from queries t >= s only). Bit for bit."""
    B, C, NH = 1, 4, 2
    qkv = dyadic(rng, B, T, 3 * C)
    d_out = dyadic(rng, B, T, C)
    out, att, row_max, row_sum = attention_with_weights(backend, qkv, NH)
    d_qkv = backend.attention_backward(d_out, qkv, row_max, row_sum, NH)
    for p in sorted({1, T // 2, T - 1}):
        later = qkv.copy()
        later[:, p:, :] = poison                       # q, k and v of p and every later position
        out2, att2, row_max2, row_sum2 = attention_with_weights(backend, later, NH)
        np.testing.assert_array_equal(out2[:, :p], out[:, :p])
        np.testing.assert_array_equal(att2[:, :, :p], att[:, :, :p])
        d_later = backend.attention_backward(d_out, later, row_max2, row_sum2, NH)
        np.testing.assert_array_equal(d_later[:, :p, :C], d_qkv[:, :p, :C])
        earlier, d_out_earlier = qkv.copy(), d_out.copy()
        earlier[:, :p, :C] = poison                    # the queries before p, and their gradient
        d_out_earlier[:, :p] = poison
        _, row_max3, row_sum3 = backend.attention_forward(earlier, NH)
        d_earlier = backend.attention_backward(d_out_earlier, earlier, row_max3, row_sum3, NH)
        np.testing.assert_array_equal(d_earlier[:, p:], d_qkv[:, p:])


@pytest.mark.parametrize("N, IC, OC", [(1, 1, 1), (7, 17, 65), (13, 64, 33)])
def test_matmul_with_transposed_weight_matches_reference(rng, N, IC, OC):
    # The tied LM head: weight stored (OC, IC), as wte (V, C) is. Bound as for the plain matmul: a
    # K-term float32 dot product is within (K + 2) U sum|terms| of the exact value.
    U = 2.0 ** -24
    inp, weight, d_out = randn(rng, N, IC), randn(rng, OC, IC), randn(rng, N, OC)
    x, w, dy = inp.astype(np.float64), weight.astype(np.float64), d_out.astype(np.float64)
    got = K.matmul_forward(inp, weight, weight_transposed=True)
    assert np.all(np.abs(got - x @ w.T) <= (IC + 2) * U * (np.abs(x) @ np.abs(w).T))
    assert np.all(np.abs(R.matmul_forward(inp, weight, weight_transposed=True) - x @ w.T)
                  <= U * np.abs(x @ w.T) + 1e-30)
    d_inp, d_weight, d_bias = K.matmul_backward(d_out, inp, weight, d_bias=np.zeros(OC, np.float32),
                                                weight_transposed=True)
    assert d_weight.shape == (OC, IC)
    assert np.all(np.abs(d_inp - dy @ w) <= (OC + 2) * U * (np.abs(dy) @ np.abs(w)))
    assert np.all(np.abs(d_weight - dy.T @ x) <= (N + 2) * U * (np.abs(dy).T @ np.abs(x)))
    assert np.all(np.abs(d_bias - dy.sum(0)) <= (N + 2) * U * np.abs(dy).sum(0))
    ref_inp, ref_weight, _ = R.matmul_backward(d_out, inp, weight, weight_transposed=True)
    assert np.all(np.abs(ref_weight - dy.T @ x) <= U * np.abs(dy.T @ x) + 1e-30)
    assert np.all(np.abs(ref_inp - dy @ w) <= U * np.abs(dy @ w) + 1e-30)


CHUNK = compiled.CHUNK_SIZE


@pytest.mark.parametrize("size", [1, 7, CHUNK, CHUNK + 1, 24 * CHUNK + 3])
def test_sum_of_squares_matches_reference_and_is_thread_count_independent(rng, size, restore_threads):
    # float32 lanes inside each chunk, double across chunks: within (CHUNK + 2) U of the exact
    # (nonnegative) sum
    x = randn(rng, size)
    exact = float(np.sum(x.astype(np.float64) ** 2))
    assert abs(R.sum_of_squares(x) - exact) <= 1e-12 * exact
    K.set_num_threads(1)
    one = K.sum_of_squares(x)
    K.set_num_threads(2)
    two = K.sum_of_squares(x)
    assert one == two
    assert abs(two - exact) <= (CHUNK + 2) * 2 ** -24 * exact


@pytest.mark.parametrize("B, T, C, NH, start, end", [(1, 1, 4, 1, 0, 1), (2, 9, 48, 4, 5, 9), (1, 33, 64, 4, 32, 33),
                                                   (3, 17, 24, 2, 0, 17), (1, 20, 16, 2, 7, 12)])
def test_attention_forward_cached_matches_full_attention_and_reference(rng, B, T, C, NH, start, end):
    # The KV-cache path computes rows [start, end) of the same attention; keys past `end` must not
    # matter, so we scramble them. Same float32 bounds as attention vs reference (a softmax-weighted
    # sum of hs-term dot products): 1e-5 absolute on unit-scale inputs.
    qkv = randn(rng, B, T, 3 * C)
    full = K.attention_forward(np.ascontiguousarray(qkv[:, :end]), NH)[0]
    scrambled = qkv.copy()
    scrambled[:, end:] = randn(rng, B, T - end, 3 * C) * 100
    got = K.attention_forward_cached(scrambled, start, end, NH)
    assert got.shape == (B, end - start, C)
    np.testing.assert_allclose(got, full[:, start:end], rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, R.attention_forward_cached(scrambled, start, end, NH), rtol=0, atol=1e-5)


@pytest.mark.parametrize("start, end", [(-1, 3), (3, 3), (4, 2), (0, 10)])
def test_attention_forward_cached_rejects_bad_positions(rng, start, end):
    with pytest.raises(ValueError, match="start"):
        K.attention_forward_cached(randn(rng, 1, 9, 12), start, end, 2)


# ====================================================================================================
# 6. The adapter (gptcore.compiled) and the API details the model relies on
# ====================================================================================================

def test_compiled_has_every_reference_function_with_the_same_parameters_and_required_outputs():
    for name in [name for name in K.__all__ if name not in compiled.SETTINGS]:
        ours = inspect.signature(getattr(compiled, name)).parameters
        assert list(ours) == list(inspect.signature(getattr(R, name)).parameters), name
        for arg in output_buffers(name) if name in VALID else ():
            optional = (name, arg) in {("matmul_backward", "d_bias"), ("layernorm_backward", "scratch"),
                                       ("cross_entropy_forward", "losses")}
            assert (ours[arg].default is None) == optional, f"{name}: {arg}"
            assert optional or ours[arg].default is inspect.Parameter.empty, f"{name}: {arg}"


@pytest.mark.parametrize("module", [K, R, compiled], ids=["kernels", "reference", "compiled"])
@pytest.mark.parametrize("transposed", [False, True])
def test_matmul_backward_without_d_bias_gives_the_same_d_inp_and_d_weight(module, transposed, rng):
    N, IC, OC = 13, 17, 33
    d_out, inp = randn(rng, N, OC), randn(rng, N, IC)
    weight = randn(rng, OC, IC) if transposed else randn(rng, IC, OC)

    def run(d_bias):
        grads = dict(d_inp=np.zeros((N, IC), np.float32), d_weight=np.zeros(weight.shape, np.float32))
        return module.matmul_backward(d_out, inp, weight, **grads, d_bias=d_bias, weight_transposed=transposed)
    with_bias = run(np.zeros(OC, np.float32))
    d_inp, d_weight, d_bias = run(None)
    assert d_bias is None
    np.testing.assert_array_equal(d_inp, with_bias[0])
    np.testing.assert_array_equal(d_weight, with_bias[1])
    assert np.any(with_bias[2] != 0)


# (B, T, C) activations go in as they are: the result is the 2-D call's, reshaped, bit for bit.
@pytest.mark.parametrize("module", [K, R, compiled], ids=["kernels", "reference", "compiled"])
def test_matmul_and_layernorm_accept_leading_dimensions(module, rng):
    B, T, IC, OC = 2, 7, 17, 33
    x, weight, bias = randn(rng, B, T, IC), randn(rng, IC, OC), randn(rng, OC)
    d_out = randn(rng, B, T, OC)
    flat = x.reshape(B * T, IC)

    def zeros(*shape):
        return np.zeros(shape, np.float32)

    def matmul(inp, d_y, rows):
        out = module.matmul_forward(inp, weight, bias, out=zeros(*rows, OC))
        grads = module.matmul_backward(d_y, inp, weight, d_inp=zeros(*rows, IC), d_weight=zeros(IC, OC),
                                       d_bias=zeros(OC))
        return out, *grads

    def layernorm(inp, d_y, rows):
        w, b = weight[0, :IC].copy(), bias[:IC].copy()
        out, mean, rstd = module.layernorm_forward(inp, w, b, out=zeros(*rows, IC), mean=zeros(*rows),
                                                   rstd=zeros(*rows))
        grads = module.layernorm_backward(d_y, inp, w, mean, rstd, d_x=zeros(*rows, IC), d_weight=zeros(IC),
                                          d_bias=zeros(IC))
        return out, mean, rstd, *grads

    d_ln = d_out[..., :IC].copy()
    for op, d_y in ((matmul, d_out), (layernorm, d_ln)):
        nd = op(x, d_y, (B, T))
        two_d = op(flat, d_y.reshape(B * T, -1), (B * T,))
        assert nd[0].shape[:2] == (B, T)
        for got, want in zip(nd, two_d):
            np.testing.assert_array_equal(got.reshape(want.shape), want)


def test_sum_of_squares_partials_come_from_the_exported_chunk_size(rng):
    # the chunk length is defined once, in _kernels.pyx; compiled and kernels size partials from it
    assert compiled.CHUNK_SIZE > 1
    x = randn(rng, 3 * compiled.CHUNK_SIZE + 1)
    chunks = -(-x.size // compiled.CHUNK_SIZE)
    want = K.sum_of_squares(x)
    assert K.sum_of_squares(x, np.empty(chunks)) == want
    assert compiled.sum_of_squares(x, np.empty(chunks)) == want
    with pytest.raises(ValueError, match=rf"^partials must have shape \({chunks},\)"):
        K.sum_of_squares(x, np.empty(chunks - 1))
    with pytest.raises(TypeError, match=r"^partials must have dtype float64"):
        K.sum_of_squares(x, np.empty(chunks, np.float32))
    # even unchecked, a partials array that is too short is refused, not overrun
    with pytest.raises(ValueError, match=r"^partials must hold"):
        compiled.sum_of_squares(x, np.empty(chunks - 1))


def test_backends_get_picks_the_module_by_name_and_environment(monkeypatch):
    monkeypatch.delenv("GPTCORE_BACKEND", raising=False)
    assert backends.get() is compiled
    assert backends.get("reference") is R
    monkeypatch.setenv("GPTCORE_BACKEND", "reference")
    assert backends.get() is R
    assert backends.get("compiled") is compiled
    with pytest.raises(ValueError, match=r"backend must be one of \['compiled', 'reference'\], got 'numpy'"):
        backends.get("numpy")
