"""A first look at gptcore's kernels, called from ordinary numpy code.

WHAT'S GOING ON HERE
  We run three of the compiled kernels forward and backward on small random arrays, and check each
  against the same math written with numpy, so you can see what every function takes and returns:
    matmul     out = inp @ weight + bias           (N, IC) @ (IC, OC) + (OC,) -> (N, OC)
    softmax    probs = softmax over the last axis  (N, V) -> (N, V), rows sum to 1
    layernorm  out = (x - mean) / std * w + b      (N, C) -> (N, C), plus mean (N,) and rstd (N,)
  Backward functions take the gradient of some loss with respect to the output (here a random array
  d_out, as if the loss were sum(out * d_out)) and return the gradients with respect to the inputs.

Run it:  python python/kernels_tour.py
"""
import numpy as np

from gptcore import kernels


def main():
    rng = np.random.default_rng(0)
    N, IC, OC, V, C = 4, 8, 5, 6, 8          # rows, matmul in/out channels, softmax width, layernorm width

    # --- matmul: out (N, OC) = inp (N, IC) @ weight (IC, OC) + bias (OC,)
    inp = rng.standard_normal((N, IC), dtype=np.float32)
    weight = rng.standard_normal((IC, OC), dtype=np.float32)
    bias = rng.standard_normal(OC, dtype=np.float32)
    out = kernels.matmul_forward(inp, weight, bias)
    d_out = rng.standard_normal((N, OC), dtype=np.float32)
    d_inp, d_weight, d_bias = kernels.matmul_backward(d_out, inp, weight)
    print(f"matmul     {inp.shape} @ {weight.shape} + {bias.shape} -> {out.shape}")
    print(f"           max |out - numpy| = {np.abs(out - (inp @ weight + bias)).max():.1e}")
    print(f"           d_inp {d_inp.shape}: max |d_inp - d_out @ weight.T| = "
          f"{np.abs(d_inp - d_out @ weight.T).max():.1e}")
    print(f"           d_weight {d_weight.shape}: max |d_weight - inp.T @ d_out| = "
          f"{np.abs(d_weight - inp.T @ d_out).max():.1e}")
    print(f"           d_bias {d_bias.shape}: max |d_bias - d_out.sum(0)| = "
          f"{np.abs(d_bias - d_out.sum(0)).max():.1e}")

    # --- softmax over the last axis: probs (N, V)
    x = rng.standard_normal((N, V), dtype=np.float32)
    probs = kernels.softmax_forward(x)
    d_probs = rng.standard_normal((N, V), dtype=np.float32)
    d_x = kernels.softmax_backward(d_probs, probs)
    # d_x = p * (dp - sum(p * dp)): softmax's Jacobian is diag(p) - p p^T
    expected = probs * (d_probs - (probs * d_probs).sum(-1, keepdims=True))
    print(f"softmax    {x.shape} -> {probs.shape}, row sums {np.round(probs.sum(-1), 6)}")
    print(f"           max |d_x - p * (dp - sum(p dp))| = {np.abs(d_x - expected).max():.1e}")

    # --- layernorm: each row to mean 0 and variance 1, then scale and shift
    x = rng.standard_normal((N, C), dtype=np.float32) * 3 + 1
    w = rng.standard_normal(C, dtype=np.float32)
    b = rng.standard_normal(C, dtype=np.float32)
    y, mean, rstd = kernels.layernorm_forward(x, w, b)
    xhat = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
    d_y = rng.standard_normal((N, C), dtype=np.float32)
    d_x, d_w, d_b = kernels.layernorm_backward(d_y, x, w, mean, rstd)
    print(f"layernorm  {x.shape} -> {y.shape}, mean {mean.shape}, rstd {rstd.shape}")
    print(f"           max |out - numpy| = {np.abs(y - (xhat * w + b)).max():.1e}")
    print(f"           d_weight = sum(d_out * xhat): max error {np.abs(d_w - (d_y * xhat).sum(0)).max():.1e}")
    print(f"           d_bias = sum(d_out): max error {np.abs(d_b - d_y.sum(0)).max():.1e}, d_x {d_x.shape}")
    print(f"threads: {kernels.get_num_threads()}")


if __name__ == "__main__":
    main()
