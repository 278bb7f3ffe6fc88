"""A first look at gptcore's kernels, called from ordinary numpy code.

WHAT'S GOING ON HERE
  We run three of the compiled kernels forward and backward on small random arrays, and check every
  result against the same math written with numpy in float64, so you can see what each function takes
  and returns:
    matmul     out = inp @ weight + bias           (N, IC) @ (IC, OC) + (OC,) -> (N, OC)
    softmax    probs = exp(x) / sum(exp(x))        (N, V) -> (N, V), over the last axis
    layernorm  out = (x - mean) / std * w + b      (N, C) -> (N, C), plus mean (N,) and rstd (N,)
  Backward functions take the gradient of some loss with respect to the output (here a random array
  d_out, as if the loss were sum(out * d_out)) and return the gradients with respect to the inputs.
  If any result is off by more than float32 rounding explains, the tour stops with an AssertionError
  naming it (tests/test_examples.py runs this file, so a wrong kernel fails the test suite here too).

Run it:  python python/kernels_tour.py
"""
import numpy as np

from gptcore import kernels

# The kernels compute in float32, which keeps 24 bits: each rounding is off by at most 2^-24 = 6e-8
# of the value rounded. A result that adds up K terms can be off by about K roundings of its largest
# terms, here K <= 8: 5e-7; a sum can be a few times smaller than its terms (they cancel), so that
# can reach ~2e-6 of the result. We allow 1e-5 of the result's largest entry (we see ~1e-7). A wrong
# index or a missing term is off by far more, ~1.
TOL = 1e-5


def check(name, got, expected, tol=TOL):
    """Print how far a kernel's result is from numpy's float64 answer; stop if it is further than tol.
    The error is max|got - expected| measured against the largest entry of expected."""
    expected = np.asarray(expected, np.float64)
    if got.shape != expected.shape:
        raise AssertionError(f"{name}: shape {got.shape}, expected {expected.shape}")
    error = np.abs(got - expected).max() / np.abs(expected).max()
    print(f"  {name:<18} {str(got.shape):<8} relative error {error:.1e} (allowed {tol:.0e})")
    if not error <= tol:
        raise AssertionError(f"{name} is off by {error:.1e} of its largest entry, more than {tol:.0e}")


def main():
    rng = np.random.default_rng(0)
    N, IC, OC, V, C = 4, 8, 5, 6, 8          # rows, matmul in/out channels, softmax width, layernorm width
    f64 = lambda a: a.astype(np.float64)    # numpy's side of every check runs in float64

    # --- matmul: out (N, OC) = inp (N, IC) @ weight (IC, OC) + bias (OC,)
    inp = rng.standard_normal((N, IC), dtype=np.float32)
    weight = rng.standard_normal((IC, OC), dtype=np.float32)
    bias = rng.standard_normal(OC, dtype=np.float32)
    out = kernels.matmul_forward(inp, weight, bias)
    d_out = rng.standard_normal((N, OC), dtype=np.float32)
    # backward kernels add (+=) into their gradient buffers, so a model can sum the gradients of a
    # weight used twice; new buffers start at zero, and we pass d_bias in to ask for the bias gradient
    d_inp, d_weight, d_bias = kernels.matmul_backward(d_out, inp, weight, d_bias=np.zeros(OC, np.float32))
    print(f"matmul     {inp.shape} @ {weight.shape} + {bias.shape} -> {out.shape}")
    check("matmul out", out, f64(inp) @ f64(weight) + f64(bias))
    check("matmul d_inp", d_inp, f64(d_out) @ f64(weight).T)       # d_inp = d_out @ weight^T
    check("matmul d_weight", d_weight, f64(inp).T @ f64(d_out))    # d_weight = inp^T @ d_out
    check("matmul d_bias", d_bias, f64(d_out).sum(0))              # d_bias = d_out summed over rows

    # --- softmax over the last axis: probs (N, V)
    x = rng.standard_normal((N, V), dtype=np.float32)
    probs = kernels.softmax_forward(x)
    d_probs = rng.standard_normal((N, V), dtype=np.float32)
    d_x = kernels.softmax_backward(d_probs, probs)
    e = np.exp(f64(x) - f64(x).max(-1, keepdims=True))         # minus the row max: exp cannot overflow
    p = e / e.sum(-1, keepdims=True)
    print(f"softmax    {x.shape} -> {probs.shape}")
    check("softmax probs", probs, p)
    # softmax's Jacobian is diag(p) - p p^T, so d_x = p * (d_probs - sum(p * d_probs))
    check("softmax d_x", d_x, p * (f64(d_probs) - (p * f64(d_probs)).sum(-1, keepdims=True)))

    # --- layernorm: each row to mean 0 and variance 1, then scale and shift
    x = rng.standard_normal((N, C), dtype=np.float32) * 3 + 1
    w = rng.standard_normal(C, dtype=np.float32)
    b = rng.standard_normal(C, dtype=np.float32)
    y, mean, rstd = kernels.layernorm_forward(x, w, b)
    d_y = rng.standard_normal((N, C), dtype=np.float32)
    d_x, d_w, d_b = kernels.layernorm_backward(d_y, x, w, mean, rstd)
    mu = f64(x).mean(-1)
    sigma_inv = 1 / np.sqrt(f64(x).var(-1) + 1e-5)              # 1 / std, with LayerNorm's eps 1e-5
    xhat = (f64(x) - mu[:, None]) * sigma_inv[:, None]
    # backward: with g = d_y * w, the gradient through the normalisation is
    #   d_x = (g - mean(g) - xhat * mean(g * xhat)) / std          (means over each row's C entries)
    g = f64(d_y) * f64(w)
    want_d_x = (g - g.mean(-1, keepdims=True)
                - xhat * (g * xhat).mean(-1, keepdims=True)) * sigma_inv[:, None]
    print(f"layernorm  {x.shape} -> {y.shape}, mean {mean.shape}, rstd {rstd.shape}")
    check("layernorm out", y, xhat * f64(w) + f64(b))
    check("layernorm mean", mean, mu)
    check("layernorm rstd", rstd, sigma_inv)
    check("layernorm d_x", d_x, want_d_x)
    check("layernorm d_weight", d_w, (f64(d_y) * xhat).sum(0))     # sum over rows of d_y * xhat
    check("layernorm d_bias", d_b, f64(d_y).sum(0))                # sum over rows of d_y
    print(f"every result agrees with numpy; threads: {kernels.get_num_threads()}")


if __name__ == "__main__":
    main()
