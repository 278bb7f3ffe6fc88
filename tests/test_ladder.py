"""The matmul ladder (gptcore.ladder): every rung computes the same product, and the command that
measures them runs.

WHAT'S GOING ON HERE

  WHAT   Four groups of tests, one section each below:
           1. every rung of ladder.RUNGS (the production kernel included) against inp @ weight in
              float64, on awkward sizes: ragged row blocks, ragged panels, blocks of matmul_tiled;
           2. the threaded rungs give bit-identical results on 1 and 2 threads, and matmul_tiled gives
              exactly matmul_threads' bits (its comment says blocking does not change the sums);
           3. the contract of every rung: bad dtypes, ranks, shapes, strides and out buffers raise
              TypeError/ValueError naming the argument, exactly as gptcore.kernels does;
           4. `python bench/ladder.py --quick` prints its table, so `make ladder` never rots.
  HOW THE TOLERANCE IS SET
         Every rung sums the IC products of out[n, o] in float32, one product and one add (or one
         fused multiply-add) per term, in some order. The textbook bound for such a dot product is
             |rung - exact| <= gamma_IC * sum_i |inp[n, i] * weight[i, o]|,   gamma_IC = IC u / (1 - IC u)
         with u = 2^-24 (float32's unit roundoff). We compare with the product computed by numpy in
         float64, whose own error is ~2^-29 times smaller, and allow (IC + 1) u * (|inp| @ |weight|):
         IC u to first order, plus one u for the second-order term and float64's error. A rung that
         drops a term, reads one element off or sums in half precision misses this by orders of
         magnitude; honest float32 rounding never does.
  WHERE  tests/test_kernels.py holds the production kernel to the pure-Python reference more
         thoroughly; here it is one rung among seven, held to the same numpy product as the others.
"""
import pathlib
import subprocess
import sys
import zlib

import numpy as np
import pytest

from gptcore import _ladder, kernels, ladder

U = 2.0 ** -24
RUNG_NAMES = [name for name, _, _ in ladder.RUNGS]
RUNG = {name: function for name, function, _ in ladder.RUNGS}
THREADED = ["threads", "tiled", "packed", "microkernel", "production"]
LADDER_COMMAND = pathlib.Path(__file__).resolve().parent.parent / "bench" / "ladder.py"


@pytest.fixture
def rng(request):
    # one fixed seed per test (and parameter set), so a failure reproduces
    return np.random.default_rng(zlib.crc32(request.node.name.encode()))


@pytest.fixture
def restore_threads():
    before = kernels.get_num_threads()
    yield
    kernels.set_num_threads(before)


def randn(rng, *shape):
    return rng.standard_normal(shape).astype(np.float32)


def assert_matches_float64(got, inp, weight, what):
    a, b = inp.astype(np.float64), weight.astype(np.float64)
    bound = (inp.shape[1] + 1) * U * (np.abs(a) @ np.abs(b))
    err = np.abs(got.astype(np.float64) - a @ b)
    assert got.dtype == np.float32 and got.shape == (inp.shape[0], weight.shape[1]), what
    bad = err > bound
    if bad.any():
        i = np.unravel_index(np.argmax(err - bound), err.shape)
        raise AssertionError(f"{what}: {bad.sum()} of {bad.size} outside the bound; worst at {i}: "
                             f"|diff| {err[i]:.3g} > bound {bound[i]:.3g}")


def test_rungs_are_the_ladder_in_order_ending_with_the_production_kernel():
    assert RUNG_NAMES == ["naive", "loop_order", "threads", "tiled", "packed", "microkernel",
                          "production"]
    assert ladder.RUNGS[-1][1] is kernels.matmul_forward
    for name, function, idea in ladder.RUNGS[:-1]:
        assert function is getattr(ladder, f"matmul_{name}")
        assert getattr(_ladder, f"matmul_{name}")                    # its compiled twin exists
    assert all(isinstance(idea, str) and idea and "\n" not in idea for _, _, idea in ladder.RUNGS)


# ====================================================================================================
# 1. Every rung against numpy in float64
# ====================================================================================================
# N (rows) covers one row, a partial 6-row block, one more than a block, two blocks and a bit, and
# five and a bit; OC (columns) covers 1, a few, half a panel + 1, exactly one 32-column panel, one
# more, and 65 = two panels + one column (the LM head's ragged width); IC (the summed axis) covers 1,
# a few, and a long ragged sum.
LADDER_N = [1, 5, 7, 13, 33]
LADDER_OC = [1, 5, 17, 32, 33, 65]
LADDER_IC = [1, 7, 65]


@pytest.mark.parametrize("IC", LADDER_IC)
@pytest.mark.parametrize("OC", LADDER_OC)
@pytest.mark.parametrize("N", LADDER_N)
@pytest.mark.parametrize("rung", RUNG_NAMES)
def test_rung_matches_float64_product_on_awkward_sizes(rung, N, OC, IC, rng):
    inp, weight = randn(rng, N, IC), randn(rng, IC, OC)
    assert_matches_float64(RUNG[rung](inp, weight), inp, weight, f"{rung} {N}x{IC} @ {IC}x{OC}")


# Bigger than every block of matmul_tiled in every dimension, with a ragged last block in each (and
# more than one panel and row block for the packed rungs).
BLOCK_CROSSING = [(37, 300, 260), (50, 65, 129)]


@pytest.mark.parametrize("N, IC, OC", BLOCK_CROSSING)
@pytest.mark.parametrize("rung", RUNG_NAMES)
def test_rung_matches_float64_product_across_tile_blocks(rung, N, IC, OC, rng):
    blocks = _ladder.TILED_BLOCKS
    assert N > blocks["rows"] and IC > blocks["k"] and OC > blocks["cols"]
    assert N % blocks["rows"] and IC % blocks["k"] and OC % blocks["cols"]
    inp, weight = randn(rng, N, IC), randn(rng, IC, OC)
    assert_matches_float64(RUNG[rung](inp, weight), inp, weight, f"{rung} {N}x{IC} @ {IC}x{OC}")


@pytest.mark.parametrize("rung", RUNG_NAMES)
def test_rung_overwrites_and_returns_the_out_buffer(rung, rng):
    inp, weight = randn(rng, 13, 33), randn(rng, 33, 65)
    out = np.full((13, 65), np.nan, np.float32)           # a rung that read out first would stay NaN
    assert RUNG[rung](inp, weight, out=out) is out
    assert_matches_float64(out, inp, weight, rung)


# ====================================================================================================
# 2. Threads do not change the bits
# ====================================================================================================
# Each output element is computed by one thread, which sums its terms in ascending i whatever the
# thread count. These sizes are far above the work below which a product stays on one thread.

def test_threaded_rungs_use_the_thread_count_set_in_kernels(restore_threads):
    for n in (1, 2):
        kernels.set_num_threads(n)
        assert _ladder.num_threads() == n


@pytest.mark.parametrize("N, IC, OC", [(193, 129, 201), (768, 128, 65)])
@pytest.mark.parametrize("rung", THREADED)
def test_threaded_rung_gives_bit_identical_results_on_one_and_two_threads(rung, N, IC, OC, rng,
                                                                          restore_threads):
    inp, weight = randn(rng, N, IC), randn(rng, IC, OC)
    kernels.set_num_threads(1)
    serial = RUNG[rung](inp, weight)
    kernels.set_num_threads(2)
    parallel = RUNG[rung](inp, weight)
    assert np.array_equal(serial, parallel)


@pytest.mark.parametrize("N, IC, OC", BLOCK_CROSSING + [(768, 512, 128)])
def test_tiling_changes_no_bits_of_the_threaded_rung(N, IC, OC, rng):
    inp, weight = randn(rng, N, IC), randn(rng, IC, OC)
    assert np.array_equal(ladder.matmul_tiled(inp, weight), ladder.matmul_threads(inp, weight))


# ====================================================================================================
# 3. The contract
# ====================================================================================================

def valid(rng):
    return randn(rng, 7, 5), randn(rng, 5, 3)


@pytest.mark.parametrize("rung", RUNG_NAMES)
@pytest.mark.parametrize("arg", ["inp", "weight"])
def test_argument_not_an_array_or_not_float32_raises_type_error(rung, arg, rng):
    args = dict(zip(("inp", "weight"), valid(rng)))
    with pytest.raises(TypeError, match=rf"^{arg} must be a numpy array"):
        RUNG[rung](**{**args, arg: args[arg].tolist()})
    with pytest.raises(TypeError, match=rf"^{arg} must have dtype float32"):
        RUNG[rung](**{**args, arg: args[arg].astype(np.float64)})


@pytest.mark.parametrize("rung", RUNG_NAMES)
@pytest.mark.parametrize("arg", ["inp", "weight"])
def test_argument_of_wrong_rank_strides_or_empty_raises_value_error(rung, arg, rng):
    args = dict(zip(("inp", "weight"), valid(rng)))
    bad = {
        "must be (at least )?2-D": args[arg].reshape(-1),     # the production kernel takes (..., IC)
        "must be C-contiguous": np.asfortranarray(args[arg]),
        "must not be empty": args[arg][:0] if arg == "inp" else args[arg][:, :0],
    }
    for message, value in bad.items():
        with pytest.raises(ValueError, match=rf"^{arg} {message}"):
            RUNG[rung](**{**args, arg: value})


@pytest.mark.parametrize("rung", RUNG_NAMES)
def test_mismatched_inner_dimension_raises_value_error_naming_weight(rung, rng):
    inp, weight = valid(rng)
    with pytest.raises(ValueError, match=r"^weight must have shape \(5, OC\)"):
        RUNG[rung](inp, randn(rng, 4, 3))


@pytest.mark.parametrize("rung", RUNG_NAMES)
def test_bad_out_buffer_raises(rung, rng):
    inp, weight = valid(rng)
    with pytest.raises(ValueError, match=r"^out must have shape \(7, 3\)"):
        RUNG[rung](inp, weight, out=np.empty((7, 4), np.float32))
    with pytest.raises(TypeError, match=r"^out must have dtype float32"):
        RUNG[rung](inp, weight, out=np.empty((7, 3), np.float64))
    with pytest.raises(ValueError, match=r"^out must not share memory with inp"):
        square = randn(rng, 5, 5)
        RUNG[rung](square, randn(rng, 5, 5), out=square)


# ====================================================================================================
# 4. The command that measures the ladder
# ====================================================================================================

def run_ladder_command(*args):
    result = subprocess.run([sys.executable, str(LADDER_COMMAND), "--quick", *args],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


def table_rows(stdout):
    return {line.split("|")[1].strip(): line for line in stdout.splitlines() if line.startswith("| ")}


def test_ladder_command_prints_a_row_per_rung_and_numpy():
    stdout = run_ladder_command()
    rows = table_rows(stdout)
    expected = [f"{i} {name}" for i, name in enumerate(RUNG_NAMES, 1)] + ["numpy"]
    assert list(rows)[1:] == expected                       # the first row is the header
    for name in expected:
        cells = rows[name].strip().strip("|").split("|")[2:]
        assert len(cells) == 3 and all(float(cell) > 0 for cell in cells), rows[name]
    assert "threads" in stdout and "CPU" in stdout


def test_ladder_command_skips_cells_over_its_time_budget_and_says_so():
    rows = table_rows(run_ladder_command("--budget", "0"))    # every call takes longer than 0 s
    for name, row in list(rows.items())[1:]:
        assert row.count("skipped (~") == 3, row
