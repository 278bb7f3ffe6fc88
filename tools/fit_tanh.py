"""Fit a float32 tanh(x) for auto-vectorized C (no libm, one division, no -ffast-math).

Evaluation (all float32; C = 9, beyond which float32 tanh rounds to +-1):

    ax = fabsf(x);  ax = ax > C ? C : ax;   t = ax*ax
    P1 = t*(p1 + t*(p2 + t*p3));   Q1 = t*(q1 + t*(q2 + t*q3))
    a  = ax + ax*P1;   b = a + a*Q1;   u = Q1 - 0.5f*a   # a = 2N, b = 2NQ, u = Q-N-1
    y  = copysignf(b / (1.0f + ((u + u + u*u) + b)), x)  # 2NQ/(Q^2+N^2) = tanh(x)
  (fabsf/copysignf are inlined as bit masks by gcc; NaN propagates; no output clamp)

Exactly, this is a rational x*A(x^2)/B(x^2) (numerator up to x^13), but it is evaluated
through the half angle, r = N/Q = tanh(x/2), and tanh(x) = 2r/(1+r^2):
  * float32 rounding errors in N and Q are damped by (1-r^2)/(1+r^2) = sech(x), so near
    |y| = 1 only the final add and division matter (plain Horner x*P(x^2)/Q(x^2) has
    ~12 undamped roundings there: ~6 ulp worst case instead of ~2);
  * Q^2+N^2 = 1 + (2u + u^2 + b): the parenthesis is O(x^2) for small x (y == x
    exactly for tiny x); for large x it reuses b, so the rounding of b cancels
    between numerator and denominator, and |y| <= 1 holds by construction.
Fit: with h = x/2, tanh(h)/h ~ P(h^2)/Q(h^2), P(0) = Q(0) = 1, on h in [0, C/2],
minimizing the max relative error of the final y = rel.err(r) * sech(2h).  The rational
fit is linearized as (P - f*Q)/(f*Q_prev), f = tanh(h)/h, solved by weighted least
squares in s = h^2/(C/2)^2 with Lawson weight updates (w *= |err|^0.5), which drives it
to the equioscillating minimax fit.  Coefficients (in x^2: c_k/4^k, an exact rescale)
are rounded to float32; the formula is simulated in numpy float32 vs float64 tanh.
"""
import numpy as np

C, NP, NQ, f32 = 9.0, 3, 3, np.float32

def fit(H=C / 2, n_p=NP, n_q=NQ, iters=400, n=6000):
    h = H * (1 - np.cos(np.linspace(0, np.pi / 2, n)))[1:]    # dense near 0 and H
    s, f, wt = (h / H) ** 2, np.tanh(h) / h, 1 / np.cosh(2 * h)
    V = np.vander(s, max(n_p, n_q) + 1, increasing=True)
    A = np.hstack([V[:, 1:n_p + 1], -f[:, None] * V[:, 1:n_q + 1]])
    w, q, best = np.ones_like(s), np.ones_like(s), (np.inf, None)
    for _ in range(iters):
        sc = w * wt / (f * q)                                  # -> rel. error of y
        a, *_ = np.linalg.lstsq(A * sc[:, None], (f - 1) * sc, rcond=None)
        q = 1 + V[:, 1:n_q + 1] @ a[n_p:]
        err = ((1 + V[:, 1:n_p + 1] @ a[:n_p]) / q / f - 1) * wt
        if np.abs(err).max() < best[0]:
            best = (np.abs(err).max(), a)
        w = np.maximum(w * np.abs(err) ** 0.5, 1e-300)
        w /= w.sum()
    a, sc = best[1], (2 * H) ** (-2.0 * np.arange(1, max(n_p, n_q) + 1))  # s -> x^2
    return best[0], (a[:n_p] * sc[:n_p]).astype(f32), (a[n_p:] * sc[:n_q]).astype(f32)

def tanh_f32(x, p, q, c=C):
    """Simulate the C kernel above in float32 (no FMA contraction)."""
    x = np.asarray(x, f32)
    ax = np.abs(x)
    ax = np.where(ax > c, f32(c), ax)
    t = ax * ax
    P1, Q1 = np.full_like(t, p[-1]), np.full_like(t, q[-1])
    for pk in p[-2::-1]:
        P1 = P1 * t + pk
    for qk in q[-2::-1]:
        Q1 = Q1 * t + qk
    P1, Q1 = P1 * t, Q1 * t
    a = ax + ax * P1
    b = a + a * Q1
    u = Q1 - f32(0.5) * a
    return np.copysign(b / (f32(1) + ((u + u + u * u) + b)), x)

def report(name, x, p, q):
    x = np.asarray(x, f32)
    y, ref = tanh_f32(x, p, q).astype(np.float64), np.tanh(x.astype(np.float64))
    ae = np.abs(y - ref)
    re = ae / np.where(ref != 0, np.abs(ref), 1)
    print(f"{name:30s} max abs {ae.max():.3e}  max rel {re.max():.3e}  max|y| {np.abs(y).max():.9g}")

if __name__ == "__main__":
    err, p, q = fit()
    print(f"fit: max rel error of y (float64 arithmetic) = {err:.2e}   clamp C = {C}")
    for name, cs in (("p", p), ("q", q)):
        print("\n".join(f"  {name}{i} = {float(v):.17g}f;  /* x^{2*i} */" for i, v in enumerate(cs, 1)))
    report("dense [-C, C], 1e7 points", np.linspace(-C, C, 10_000_001), p, q)
    for lo, hi in ((-8, -4), (-4, -3)):
        s = np.logspace(lo, hi, 500_001)
        report(f"small |x| in [1e{lo}, 1e{hi}]", np.r_[s, -s], p, q)
    report("|x| in [C, 1e4], +-inf", np.r_[np.linspace(C, 1e4, 100_001), -C - 1, np.inf, -np.inf], p, q)
    report("0, +-denormal, FLT_MIN", [0.0, 1e-45, -1e-45, 1.17549435e-38], p, q)
