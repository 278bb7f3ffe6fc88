"""Pure-Python reference twins of every gptcore kernel: the oracle the compiled kernels answer to.

WHAT'S GOING ON HERE

  WHAT      One function per kernel of the shared kernel API, with the same name, the same signature
            and the same output-buffer semantics as gptcore.kernels, written the way the math reads:
            nested Python loops over Python floats. Every function states the shape of every argument
            and carries its math in comments; every backward sits right below the forward it inverts
            and carries its derivation, with shapes.
  WHERE     The tests use this module as the oracle: tests/test_reference.py checks it against finite
            differences in float64, and the kernel tests check gptcore.kernels against it. The
            benchmarks in bench/ use it as the baseline. Because the API is the same, the GPT model can
            run on this module instead of the compiled kernels (tiny configs only).
  HOW       Slow on purpose. There is no numpy in the math, no vectorization, no threads and no clever
            reordering. Inputs become nested lists of Python floats (.tolist()), so every sum, exp and
            sqrt happens in double precision, and each result is rounded to float32 once, when it is
            written into its numpy array. That makes this module more accurate than the float32
            kernels it checks, which is what an oracle should be. numpy appears only at the boundary:
            converting inputs, allocating results, writing or accumulating into buffers.
  CONTRACT  Float results are float32 numpy arrays; index arrays (idx, targets) are any integer dtype.
            Forward functions OVERWRITE the output buffers they are given (out=, mean=, rstd=, row_max=,
            row_sum=, probs=) and return them; given None, they allocate fresh arrays.
            Backward functions ACCUMULATE (+=) into the gradient buffers they are given (d_x=, ...)
            and return them; given None, they allocate fresh arrays holding just the gradient (except
            matmul_backward's d_bias, where None means "no bias": no bias gradient is computed). A call
            computes its whole gradient in double, rounds it to float32 and adds it to the buffer with
            one float32 add per element, so two calls into zeroed buffers give exactly twice one call.
            matmul and layernorm take any number of leading dimensions ((B, T, C) as well as (N, C)).
            We check less than gptcore.kernels does: shapes that do not fit together, output
            buffers of the wrong shape or dtype, bad n_head, ids out of range and T > block_size raise
            ValueError or TypeError. We accept any real float dtype for inputs (the finite-difference
            tests pass float64); the strict float32 and contiguity checks live in gptcore.kernels.
            Every input is copied into lists before anything is written, so an output buffer that
            aliases an input is harmless here (it is not in the compiled kernels).
  TWIN      This module is the twin. Each function in gptcore.compiled (and so in gptcore.kernels,
            which checks and then calls it) must agree with the function of the same name here, to
            float32 accuracy. The scratch keywords of the compiled twin (layernorm_backward's scratch,
            cross_entropy_forward's losses, sum_of_squares' partials) are accepted and ignored, and
            set_num_threads / get_num_threads exist, so gptcore.backends can hand either module to the
            model and the optimizers.

Dimension letters, used in every shape comment below:
  B   batch size                      T   time, the sequence length
  C   channels (n_embd)               NH  number of attention heads
  hs  head size, C // NH              V   vocabulary size
  N   rows: a (B, T, C) tensor seen as (N, C) has N = B*T
  IC, OC  a matmul's input and output channels
"""

import math

import numpy as np

from gptcore import dropout

# GELU, tanh approximation (the one GPT-2 was trained with): sqrt(2/pi) and the cubic coefficient.
GELU_SCALE = math.sqrt(2.0 / math.pi)
GELU_CUBIC = 0.044715

# Added to the variance before the square root, as in GPT-2 (and torch.nn.LayerNorm's default).
LAYERNORM_EPS = 1e-5


# ----------------------------------------------------------------------------------------------------
# The boundary: numpy arrays in, Python floats inside, float32 arrays out.


def _floats(a, name, ndim=None):
    """A real float array -> (nested lists of Python floats, its shape). Raises on ints or wrong ndim."""
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.floating):
        raise TypeError(f"{name} must be a float array, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    # float32 -> Python float is exact, so from here on the only rounding is double rounding.
    return arr.tolist(), arr.shape


def _ints(a, name, ndim, high):
    """An integer array of ids, each in [0, high) -> nested lists of Python ints."""
    arr = np.asarray(a)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{name} must be an integer array, got dtype {arr.dtype}")
    if arr.ndim != ndim:
        raise ValueError(f"{name} must be {ndim}-D, got shape {arr.shape}")
    if arr.size and (arr.min() < 0 or arr.max() >= high):
        raise ValueError(f"{name} must lie in [0, {high}), got values in [{arr.min()}, {arr.max()}]")
    return arr.astype(np.int64).tolist()


def _same_shape(shape, expected, name):
    if tuple(shape) != tuple(expected):
        raise ValueError(f"{name} has shape {tuple(shape)}, expected {tuple(expected)}")


def _check_buffer(buf, shape, name):
    if not isinstance(buf, np.ndarray) or buf.dtype != np.float32:
        raise TypeError(f"{name} must be a float32 numpy array, got {type(buf).__name__} "
                        f"{getattr(buf, 'dtype', '')}")
    _same_shape(buf.shape, shape, name)


def _write(buf, result, shape, name):
    """Forward convention: round result to float32 and OVERWRITE buf with it (or return a new array)."""
    values = np.asarray(result, dtype=np.float32).reshape(shape)
    if buf is None:
        return values
    _check_buffer(buf, shape, name)
    buf[...] = values
    return buf


def _accumulate(buf, result, shape, name):
    """Backward convention: round result to float32 and ADD it into buf (or return it as a new array)."""
    values = np.asarray(result, dtype=np.float32).reshape(shape)
    if buf is None:
        return values
    _check_buffer(buf, shape, name)
    buf += values
    return buf


def _zeros(*shape):
    """Nested lists of 0.0 with the given shape, where we sum gradient contributions in double."""
    if len(shape) == 1:
        return [0.0] * shape[0]
    return [_zeros(*shape[1:]) for _ in range(shape[0])]


# ----------------------------------------------------------------------------------------------------
# matmul: the linear layers (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj, and the tied lm_head).


def _transposed(rows):
    """The transpose of a list of equal-length lists."""
    return [list(column) for column in zip(*rows)]


def _product(a, b, initial):
    """The matrix product of nested lists a (M, K) and b (K, N), by the plain triple loop:
    result[m][n] = initial[n] + sum_k a[m][k] * b[k][n], the terms added in order of k."""
    K, N = len(b), len(initial)
    result = _zeros(len(a), N)
    for m, a_row in enumerate(a):
        for n in range(N):
            acc = initial[n]
            for k in range(K):
                acc += a_row[k] * b[k][n]
            result[m][n] = acc
    return result


def _rows(a, name):
    """An array (..., K) seen as the matrix (N, K), N the product of its leading dimensions, as
    (nested lists, (N, K), leading dimensions). A (B, T, C) activation becomes (B*T, C)."""
    arr = np.asarray(a)
    if arr.ndim < 2:
        raise ValueError(f"{name} must have at least 2 dimensions, got shape {arr.shape}")
    rows, shape = _floats(arr.reshape(-1, arr.shape[-1]), name, 2)
    return rows, shape, arr.shape[:-1]


def matmul_forward(inp, weight, bias=None, *, out=None, weight_transposed=False):
    """inp (..., IC), weight (IC, OC), bias (OC,) or None -> out (..., OC) = inp @ weight + bias.

    weight is stored (IC, OC), GPT-2's Conv1D layout, so a checkpoint loads without transposes.
    weight_transposed=True: weight is stored (OC, IC) (the tied LM head's wte (V, C)) and we
    multiply by its transpose. Leading dimensions of inp are rows: (B, T, IC) -> (B, T, OC).
    Example: inp [[1, 2]], weight [[1, 0, 1], [0, 1, 1]], bias [0, 0, 10] -> [[1, 2, 13]].
    """
    x, (N, IC), lead = _rows(inp, "inp")
    w, w_shape = _floats(weight, "weight", 2)
    if weight_transposed:
        w, w_shape = _transposed(w), w_shape[::-1]
    IC_w, OC = w_shape
    if IC_w != IC:
        raise ValueError(f"inp is (N, IC) = {(N, IC)} but weight is (IC, OC) = {(IC_w, OC)}")
    if bias is None:
        b = [0.0] * OC
    else:
        b, b_shape = _floats(bias, "bias", 1)
        _same_shape(b_shape, (OC,), "bias")

    # out[n, o] = bias[o] + sum_i inp[n, i] * weight[i, o]: one dot product per output element
    return _write(out, _product(x, w, b), (*lead, OC), "out")


def matmul_backward(d_out, inp, weight, *, d_inp=None, d_weight=None, d_bias=None, weight_transposed=False):
    """d_out (..., OC), inp (..., IC), weight (IC, OC) -> (d_inp (..., IC), d_weight (IC, OC), d_bias).

    d_inp and d_weight are accumulated into the buffers given (new arrays if None). d_bias (OC,) is
    accumulated if given; d_bias=None skips the bias gradient (a layer without a bias, such as the
    tied LM head) and returns None in its place. With weight_transposed, weight and d_weight are
    (OC, IC).
    """
    dy, (N, OC), lead = _rows(d_out, "d_out")
    x, x_shape, x_lead = _rows(inp, "inp")
    w, (IC, OC_w) = _floats(weight, "weight", 2)
    if weight_transposed:
        w, (IC, OC_w) = _transposed(w), (OC_w, IC)
    _same_shape((*x_lead, *x_shape[1:]), (*lead, IC), "inp")
    _same_shape((IC, OC_w), (IC, OC), "weight")

    # In the forward pass this was: out[n, o] = bias[o] + sum_i inp[n, i] * weight[i, o].
    # So each out[n, o] depends on inp[n, i] through weight[i, o], on weight[i, o] through inp[n, i],
    # and on bias[o] with slope 1. Summing over everything each input touched:
    #   d_inp[n, i]    = sum_o d_out[n, o] * weight[i, o]   d_inp (N, IC) = d_out (N, OC) @ weight^T (OC, IC)
    #   d_weight[i, o] = sum_n inp[n, i] * d_out[n, o]      d_weight (IC, OC) = inp^T (IC, N) @ d_out (N, OC)
    #   d_bias[o]      = sum_n d_out[n, o]                  d_bias (OC,) = d_out summed over rows
    dx = _product(dy, _transposed(w), [0.0] * IC)
    dw = _product(_transposed(x), dy, [0.0] * OC)
    if weight_transposed:
        dw = _transposed(dw)                 # back to weight's own (OC, IC) layout
    if d_bias is not None:
        db = [0.0] * OC
        for o in range(OC):
            acc = 0.0
            for n in range(N):
                acc += dy[n][o]
            db[o] = acc
        d_bias = _accumulate(d_bias, db, (OC,), "d_bias")
    return (_accumulate(d_inp, dx, (*lead, IC), "d_inp"),
            _accumulate(d_weight, dw, (OC, IC) if weight_transposed else (IC, OC), "d_weight"),
            d_bias)


# ----------------------------------------------------------------------------------------------------
# softmax over the last axis of a 2-D array. _softmax_row is the one softmax of this module:
# softmax_forward, cross-entropy and both attentions call it.


def _softmax_row(row):
    """A list of floats -> (its softmax as a list, m = max(row), total = sum_j exp(row_j - m)).

    p_j = exp(x_j - m) / sum_k exp(x_k - m). Subtracting m changes nothing mathematically (it cancels)
    but keeps exp from overflowing. Cross-entropy takes its loss from m and total.
    Example: [0, ln 3] -> ([0.25, 0.75], ln 3, 4/3).
    """
    m = max(row)
    exps = [math.exp(value - m) for value in row]
    total = sum(exps)
    return [e / total for e in exps], m, total


def softmax_forward(x, *, out=None):
    """x (N, V) -> probs (N, V), each row a probability distribution.

    Example: [[0, ln 3]] -> [[0.25, 0.75]].
    """
    xs, (N, V) = _floats(x, "x", 2)
    # probs[i, :] = softmax(x[i, :]), row by row
    probs = [_softmax_row(xs[i])[0] for i in range(N)]
    return _write(out, probs, (N, V), "out")


def softmax_backward(d_probs, probs, *, d_x=None):
    """d_probs (N, V), probs (N, V) [softmax_forward's output] -> d_x (N, V), accumulated."""
    dp, (N, V) = _floats(d_probs, "d_probs", 2)
    p, p_shape = _floats(probs, "probs", 2)
    _same_shape(p_shape, (N, V), "probs")

    # In the forward pass this was: p_j = exp(x_j) / Z with Z = sum_k exp(x_k) (one row).
    # Its Jacobian is dp_j/dx_i = p_j * (delta_ij - p_i), so
    #   d_x_i = sum_j d_p_j * p_j * (delta_ij - p_i) = p_i * (d_p_i - sum_j p_j * d_p_j).
    # The sum is one number per row: how much the row's output moves when all inputs move together.
    dx = _zeros(N, V)
    for i in range(N):
        dot = 0.0
        for k in range(V):
            dot += p[i][k] * dp[i][k]
        for j in range(V):
            dx[i][j] = p[i][j] * (dp[i][j] - dot)
    return _accumulate(d_x, dx, (N, V), "d_x")


# ----------------------------------------------------------------------------------------------------
# GELU: the MLP's nonlinearity, between mlp.c_fc and mlp.c_proj.


def gelu_forward(x, *, out=None):
    """x (any shape) -> out (same shape), GELU applied elementwise (tanh approximation).

    Example: gelu(0) = 0; gelu(x) -> x for large x and -> 0 for very negative x.
    """
    arr = np.asarray(x)
    xs, _ = _floats(arr.ravel(), "x")
    # out = 0.5 * x * (1 + tanh(u)),  u = sqrt(2/pi) * (x + 0.044715 * x^3)
    result = [0.0] * len(xs)
    for i, xi in enumerate(xs):
        u = GELU_SCALE * (xi + GELU_CUBIC * xi * xi * xi)
        result[i] = 0.5 * xi * (1.0 + math.tanh(u))
    return _write(out, result, arr.shape, "out")


def gelu_backward(d_out, x, *, d_x=None):
    """d_out (any shape), x (same shape) [gelu_forward's input] -> d_x (same shape), accumulated."""
    dy_arr = np.asarray(d_out)
    x_arr = np.asarray(x)
    _same_shape(x_arr.shape, dy_arr.shape, "x")
    dy, _ = _floats(dy_arr.ravel(), "d_out")
    xs, _ = _floats(x_arr.ravel(), "x")

    # In the forward pass this was: gelu(x) = 0.5 * x * (1 + th), th = tanh(u), u = s*(x + c*x^3).
    # Product rule, with d tanh(u)/du = 1 - th^2 and du/dx = s * (1 + 3*c*x^2):
    #   dgelu/dx = 0.5 * (1 + th) + 0.5 * x * (1 - th^2) * s * (1 + 3*c*x^2)
    # and d_x = d_out * dgelu/dx, elementwise.
    dx = [0.0] * len(xs)
    for i, xi in enumerate(xs):
        u = GELU_SCALE * (xi + GELU_CUBIC * xi * xi * xi)
        th = math.tanh(u)
        local = (0.5 * (1.0 + th)
                 + 0.5 * xi * (1.0 - th * th) * GELU_SCALE * (1.0 + 3.0 * GELU_CUBIC * xi * xi))
        dx[i] = dy[i] * local
    return _accumulate(d_x, dx, dy_arr.shape, "d_x")


# ----------------------------------------------------------------------------------------------------
# LayerNorm: ln_1 and ln_2 in every block, ln_f before the head.


def layernorm_forward(x, weight, bias, *, out=None, mean=None, rstd=None):
    """x (..., C), weight (C,), bias (C,) -> (out (..., C), mean (...), rstd (...)).

    Each row (the last axis) is normalised on its own; leading dimensions are rows, so x (B, T, C)
    gives mean (B, T). mean and rstd are the cache the backward needs; all three buffers are
    overwritten.
    Example: x [[1, 3]], weight [1, 1], bias [0, 0] -> out ~[[-1, 1]], mean [2], rstd ~[1].
    """
    xs, (N, C), lead = _rows(x, "x")
    w, w_shape = _floats(weight, "weight", 1)
    b, b_shape = _floats(bias, "bias", 1)
    _same_shape(w_shape, (C,), "weight")
    _same_shape(b_shape, (C,), "bias")

    # Per row: mean = sum_j x_j / C;  var = sum_j (x_j - mean)^2 / C  (biased, as torch and GPT-2);
    # rstd = 1 / sqrt(var + eps);  out_j = (x_j - mean) * rstd * weight_j + bias_j.
    # We compute the variance from the centred values (two passes), which stays accurate when the
    # mean is large compared with the spread.
    y = _zeros(N, C)
    means = [0.0] * N
    rstds = [0.0] * N
    for n in range(N):
        row = xs[n]
        mu = sum(row) / C
        var = 0.0
        for j in range(C):
            var += (row[j] - mu) * (row[j] - mu)
        var /= C
        r = 1.0 / math.sqrt(var + LAYERNORM_EPS)
        for j in range(C):
            y[n][j] = (row[j] - mu) * r * w[j] + b[j]
        means[n] = mu
        rstds[n] = r
    return (_write(out, y, (*lead, C), "out"),
            _write(mean, means, lead, "mean"),
            _write(rstd, rstds, lead, "rstd"))


def layernorm_backward(d_out, x, weight, mean, rstd, *, d_x=None, d_weight=None, d_bias=None, scratch=None):
    """d_out (..., C), x (..., C), weight (C,), mean (...), rstd (...) -> (d_x (..., C), d_weight (C,),
    d_bias (C,)).

    mean and rstd are layernorm_forward's cache; we use them as given rather than recomputing them,
    exactly as the compiled kernel does. All three gradients are accumulated. scratch is accepted
    for the compiled twin's signature and ignored.
    """
    dy, (N, C), lead = _rows(d_out, "d_out")
    xs, x_shape, x_lead = _rows(x, "x")
    w, w_shape = _floats(weight, "weight", 1)
    mu, mu_shape = _floats(np.asarray(mean).reshape(-1), "mean", 1)
    rs, rs_shape = _floats(np.asarray(rstd).reshape(-1), "rstd", 1)
    _same_shape((*x_lead, *x_shape[1:]), (*lead, C), "x")
    _same_shape(w_shape, (C,), "weight")
    _same_shape(np.shape(mean), lead, "mean")
    _same_shape(np.shape(rstd), lead, "rstd")

    # In the forward pass this was, per row: xhat_j = (x_j - mean) * rstd, out_j = weight_j*xhat_j + bias_j.
    # The parameters are the easy part, each summed over all N rows:
    #   d_bias_j = sum_rows d_out_j           d_weight_j = sum_rows d_out_j * xhat_j
    # For x, let g_j = d_out_j * weight_j = dL/dxhat_j. Every xhat_j depends on every x_i through mean
    # and rstd: d mean/dx_i = 1/C, and d rstd/dx_i = -rstd^3 * (x_i - mean)/C = -rstd^2 * xhat_i / C
    # (var = sum_k (x_k - mean)^2 / C; the mean's own derivative drops out because sum_k (x_k - mean) = 0).
    # So dxhat_j/dx_i = rstd * (delta_ij - 1/C) - rstd * xhat_j * xhat_i / C, and
    #   d_x_i = sum_j g_j dxhat_j/dx_i = rstd * (g_i - mean_C(g) - xhat_i * mean_C(g * xhat)).
    # The two means remove, from g, its component along the all-ones direction and along xhat:
    # the two directions in which the normalization cannot move its output.
    dx = _zeros(N, C)
    dw = [0.0] * C
    db = [0.0] * C
    for n in range(N):
        xhat = [(xs[n][j] - mu[n]) * rs[n] for j in range(C)]
        g = [dy[n][j] * w[j] for j in range(C)]
        g_mean = sum(g) / C
        gx_mean = 0.0
        for j in range(C):
            gx_mean += g[j] * xhat[j]
        gx_mean /= C
        for j in range(C):
            db[j] += dy[n][j]
            dw[j] += dy[n][j] * xhat[j]
            dx[n][j] = rs[n] * (g[j] - g_mean - xhat[j] * gx_mean)
    return (_accumulate(d_x, dx, (*lead, C), "d_x"),
            _accumulate(d_weight, dw, (C,), "d_weight"),
            _accumulate(d_bias, db, (C,), "d_bias"))


# ----------------------------------------------------------------------------------------------------
# Causal self-attention: between attn.c_attn (which makes qkv) and attn.c_proj (which mixes the heads).


def _attention_sizes(qkv_shape, n_head):
    B, T, C3 = qkv_shape
    if C3 % 3 != 0:
        raise ValueError(f"qkv's last axis must be 3*C, got {C3}")
    C = C3 // 3
    if not isinstance(n_head, (int, np.integer)) or n_head <= 0:
        raise ValueError(f"n_head must be a positive integer, got {n_head!r}")
    if C % n_head != 0:
        raise ValueError(f"C = {C} is not divisible by n_head = {n_head}")
    return B, T, C, int(n_head), C // n_head


def _attention_scores(rows, t, h, hs, C, scale):
    """The scores of query position t in head h over positions 0..t (a list of t + 1):
    q_t . k_s * scale, with rows[s] the qkv row (3C,) of position s."""
    q_off, k_off = h * hs, C + h * hs
    scores = []
    for s in range(t + 1):
        dot = 0.0
        for i in range(hs):
            dot += rows[t][q_off + i] * rows[s][k_off + i]
        scores.append(dot * scale)
    return scores


def _attention_row(rows, t, h, hs, C, scale):
    """softmax_s(q_t . k_s * scale) over s = 0..t: (the weights, a list of t + 1, their m, their total)."""
    return _softmax_row(_attention_scores(rows, t, h, hs, C, scale))


def _dropout_keep(p, key, n):
    """The keep decisions of elements 0..n-1 of a mask drawn from key (gptcore.dropout), as bools."""
    return (dropout.hashes(key, n) >= np.uint64(dropout.threshold(p))).tolist()


def _dropped(values, keep, p):
    """Inverted dropout of a list: kept values times 1 / (1 - p), the others 0."""
    return [value * dropout.scale(p) if k else 0.0 for value, k in zip(values, keep)]


def attention_forward(qkv, n_head, *, out=None, row_max=None, row_sum=None, dropout_p=0.0, dropout_key=0):
    """qkv (B, T, 3C), n_head = NH -> (out (B, T, C), row_max (B, NH, T), row_sum (B, NH, T)).

    qkv holds q, k, v side by side along the last axis: q = qkv[..., 0:C], k = qkv[..., C:2C],
    v = qkv[..., 2C:3C], and head h owns channels h*hs:(h+1)*hs of each. row_max and row_sum are
    the cache for the backward: each query row's softmax max m and normaliser Z, from which the
    backward recomputes the attention weights. With dropout_p > 0 the weights are dropped out
    (gptcore.dropout) with the mask drawn from dropout_key before they multiply v. All three buffers
    are overwritten.
    """
    xs, shape = _floats(qkv, "qkv", 3)
    B, T, C, NH, hs = _attention_sizes(shape, n_head)
    scale = 1.0 / math.sqrt(hs)

    # For each (b, h) and each query position t:
    #   scores[s] = q_t . k_s / sqrt(hs)              for s = 0..t only: t may not look at the future
    #   m = max_s scores[s],  Z = sum_s exp(scores[s] - m)                  kept: row_max, row_sum
    #   att[t, s] = exp(scores[s] - m) / Z            for s <= t (s > t is never computed: masked)
    #   a[t, s] = att[t, s] * keep[b, h, t, s] / (1 - p)    dropout; a = att when p = 0
    #   out_t     = sum_{s <= t} a[t, s] * v_s        (hs,), written to out[b, t, h*hs:(h+1)*hs]
    # keep[b, h, t, s] is element ((b * NH + h) * T + t) * T + s of the (B, NH, T, T) mask.
    # Dividing by sqrt(hs) keeps the scores' spread independent of the head size, so the softmax
    # does not saturate as hs grows.
    y = _zeros(B, T, C)
    maxes, totals = _zeros(B, NH, T), _zeros(B, NH, T)
    keep = _dropout_keep(dropout_p, dropout_key, B * NH * T * T) if dropout_p > 0 else None
    for b in range(B):
        for h in range(NH):
            v_off = 2 * C + h * hs
            for t in range(T):
                weights, maxes[b][h][t], totals[b][h][t] = _attention_row(xs[b], t, h, hs, C, scale)
                if keep is not None:
                    first = ((b * NH + h) * T + t) * T
                    weights = _dropped(weights, keep[first:first + t + 1], dropout_p)
                for i in range(hs):
                    acc = 0.0
                    for s in range(t + 1):
                        acc += weights[s] * xs[b][s][v_off + i]
                    y[b][t][h * hs + i] = acc
    return (_write(out, y, (B, T, C), "out"), _write(row_max, maxes, (B, NH, T), "row_max"),
            _write(row_sum, totals, (B, NH, T), "row_sum"))


def _check_row_stats(row_max, row_sum, B, NH, T):
    """row_max and row_sum must be (B, NH, T) float arrays. We recompute the weights from q and k
    alone, in double: the exact softmax, which is what the compiled kernel's float32 weights (rebuilt
    from its float32 m and Z) are held to. So their values are not needed here."""
    for name, array in (("row_max", row_max), ("row_sum", row_sum)):
        _same_shape(_floats(array, name, 3)[1], (B, NH, T), name)


def attention_weights(qkv, row_max, row_sum, n_head, *, out=None):
    """qkv (B, T, 3C), row_max and row_sum (B, NH, T) [attention_forward's] -> att (B, NH, T, T).

    The attention weights of attention_forward (before dropout), recomputed:
    att[b, h, t, s] = softmax_s(q_t . k_s / sqrt(hs)) = exp(score - m) / Z for s <= t, 0 above the
    diagonal (see _check_row_stats for why we recompute m and Z too).
    """
    xs, shape = _floats(qkv, "qkv", 3)
    B, T, C, NH, hs = _attention_sizes(shape, n_head)
    _check_row_stats(row_max, row_sum, B, NH, T)
    scale = 1.0 / math.sqrt(hs)
    att = _zeros(B, NH, T, T)
    for b in range(B):
        for h in range(NH):
            for t in range(T):
                att[b][h][t][:t + 1] = _attention_row(xs[b], t, h, hs, C, scale)[0]
    return _write(out, att, (B, NH, T, T), "out")


def attention_forward_cached(qkv, start, end, n_head, *, out=None):
    """qkv (B, T_max, 3C), query positions [start, end) -> out (B, end - start, C).

    The generation path with a KV cache: the same attention as attention_forward, computed only for
    the query rows t in [start, end), each against keys and values 0..t (rows before start are the
    cache of earlier steps).
    """
    xs, shape = _floats(qkv, "qkv", 3)
    B, T_max, C, NH, hs = _attention_sizes(shape, n_head)
    if not 0 <= start < end <= T_max:
        raise ValueError(f"need 0 <= start < end <= T_max={T_max}, got start={start}, end={end}")
    scale = 1.0 / math.sqrt(hs)
    y = _zeros(B, end - start, C)
    for b in range(B):
        for h in range(NH):
            v_off = 2 * C + h * hs
            for t in range(start, end):
                weights = _attention_row(xs[b], t, h, hs, C, scale)[0]
                for s in range(t + 1):
                    for i in range(hs):
                        y[b][t - start][h * hs + i] += weights[s] * xs[b][s][v_off + i]
    return _write(out, y, (B, end - start, C), "out")


def attention_backward(d_out, qkv, row_max, row_sum, n_head, *, d_qkv=None, dropout_p=0.0, dropout_key=0):
    """d_out (B, T, C), qkv (B, T, 3C), row_max and row_sum (B, NH, T), n_head -> d_qkv (B, T, 3C),
    accumulated. row_max, row_sum, dropout_p and dropout_key are attention_forward's: we recompute
    its weights (from q and k: see _check_row_stats) and its dropout mask (from the key).
    """
    xs, shape = _floats(qkv, "qkv", 3)
    B, T, C, NH, hs = _attention_sizes(shape, n_head)
    dy, dy_shape = _floats(d_out, "d_out", 3)
    _same_shape(dy_shape, (B, T, C), "d_out")
    _check_row_stats(row_max, row_sum, B, NH, T)
    scale = 1.0 / math.sqrt(hs)
    keep = _dropout_keep(dropout_p, dropout_key, B * NH * T * T) if dropout_p > 0 else None

    # In the forward pass this was, for one (b, h), reading bottom-up:
    #   out_t = sum_s a[t, s] * v_s                    (hs,)
    #   a[t, s] = att[t, s] * keep[t, s] / (1 - p)     (dropout; a = att when p = 0)
    #   att[t, :] = softmax(scores[t, :]) over s <= t
    #   scores[t, s] = q_t . k_s * scale
    # So now we have, going back up:
    #   d_a[t, s] = d_out_t . v_s                      and   d_v_s += a[t, s] * d_out_t
    #   d_att[t, s] = d_a[t, s] * keep[t, s] / (1 - p)
    #   d_scores[t, s] = att[t, s] * (d_att[t, s] - sum_r att[t, r] * d_att[t, r])   (softmax backward)
    #   d_q_t += d_scores[t, s] * scale * k_s           and   d_k_s += d_scores[t, s] * scale * q_t
    # with every sum over s <= t only: the masked entries have att = 0, so they carry no gradient.
    # v_s, k_s are used by every later query, so their gradients collect contributions from all t >= s.
    dx = _zeros(B, T, 3 * C)
    for b in range(B):
        for h in range(NH):
            q_off, k_off, v_off = h * hs, C + h * hs, 2 * C + h * hs
            for t in range(T):
                w = _attention_row(xs[b], t, h, hs, C, scale)[0]      # att[t, 0..t], recomputed
                row_keep = [True] * (t + 1)
                if keep is not None:
                    first = ((b * NH + h) * T + t) * T
                    row_keep = keep[first:first + t + 1]
                a = _dropped(w, row_keep, dropout_p) if keep is not None else w
                d_att = [0.0] * (t + 1)
                for s in range(t + 1):
                    dot = 0.0
                    for i in range(hs):
                        dot += dy[b][t][h * hs + i] * xs[b][s][v_off + i]
                        dx[b][s][v_off + i] += a[s] * dy[b][t][h * hs + i]
                    d_att[s] = dot
                if keep is not None:
                    d_att = _dropped(d_att, row_keep, dropout_p)
                row_dot = 0.0
                for r in range(t + 1):
                    row_dot += w[r] * d_att[r]
                for s in range(t + 1):
                    d_score = w[s] * (d_att[s] - row_dot)
                    for i in range(hs):
                        dx[b][t][q_off + i] += d_score * scale * xs[b][s][k_off + i]
                        dx[b][s][k_off + i] += d_score * scale * xs[b][t][q_off + i]
    return _accumulate(d_qkv, dx, (B, T, 3 * C), "d_qkv")


# ----------------------------------------------------------------------------------------------------
# Cross-entropy: softmax of the logits and the mean negative log-likelihood of the targets, in one.


def cross_entropy_forward(logits, targets, *, probs=None, losses=None):
    """logits (B, T, V), targets (B, T) ints in [0, V) -> (loss: Python float, probs (B, T, V)).

    probs is the cache for the backward (overwritten); losses is accepted for the compiled twin's
    signature and ignored. Example: uniform logits over V classes give
    loss = ln V whatever the targets, the loss of a model that has learned nothing.
    """
    z, (B, T, V) = _floats(logits, "logits", 3)
    ys = _ints(targets, "targets", 2, V)
    _same_shape(np.shape(targets), (B, T), "targets")

    # probs[b, t, :] = softmax(logits[b, t, :]);  loss = mean over the B*T positions of -log probs[target].
    # We take the log from the logits, not from the probabilities:
    #   -log probs[y] = log(sum_j exp(z_j - m)) - (z_y - m),   m = max_j z_j,
    # which is the same number but cannot hit log(0) when a probability underflows.
    p = _zeros(B, T, V)
    total_nll = 0.0
    for b in range(B):
        for t in range(T):
            row = z[b][t]
            p[b][t], m, total = _softmax_row(row)
            total_nll += math.log(total) - (row[ys[b][t]] - m)
    loss = total_nll / (B * T)
    return loss, _write(probs, p, (B, T, V), "probs")


def cross_entropy_backward(probs, targets, *, d_logits=None, d_loss=1.0):
    """probs (B, T, V) [cross_entropy_forward's cache], targets (B, T) -> d_logits (B, T, V), accumulated.

    d_loss is dL/dloss for whatever L the caller is minimizing; 1.0 when the loss is L itself.
    """
    p, (B, T, V) = _floats(probs, "probs", 3)
    ys = _ints(targets, "targets", 2, V)
    _same_shape(np.shape(targets), (B, T), "targets")
    d_loss = float(d_loss)

    # In the forward pass this was: loss = (1/(B*T)) * sum_{b,t} -log softmax(z_bt)[y_bt].
    # For one position, -log softmax(z)[y] = log sum_j exp(z_j) - z_y, whose derivative in z_v is
    # probs_v - [v == y]. The softmax and the log cancel into this simple form, which is why we
    # fuse them instead of chaining softmax_backward. So:
    #   d_logits[b, t, v] = d_loss * (probs[b, t, v] - [v == y_bt]) / (B*T)
    dz = _zeros(B, T, V)
    norm = d_loss / (B * T)
    for b in range(B):
        for t in range(T):
            for v in range(V):
                indicator = 1.0 if v == ys[b][t] else 0.0
                dz[b][t][v] = norm * (p[b][t][v] - indicator)
    return _accumulate(d_logits, dz, (B, T, V), "d_logits")


# ----------------------------------------------------------------------------------------------------
# Embeddings: token (wte) plus position (wpe), at the bottom of the model.


def embedding_forward(idx, wte, wpe, *, out=None):
    """idx (B, T) ints in [0, V), wte (V, C), wpe (block_size, C) -> out (B, T, C).

    Example: idx [[2, 0]] -> out[0, 0] = wte[2] + wpe[0], out[0, 1] = wte[0] + wpe[1].
    """
    te, (V, C) = _floats(wte, "wte", 2)
    pe, (block_size, C_p) = _floats(wpe, "wpe", 2)
    _same_shape((block_size, C_p), (block_size, C), "wpe")
    ids = _ints(idx, "idx", 2, V)
    B, T = np.shape(idx)
    if T > block_size:
        raise ValueError(f"sequence length T = {T} exceeds block_size = {block_size}")

    # out[b, t, c] = wte[idx[b, t], c] + wpe[t, c]: what the token is, plus where it is.
    y = _zeros(B, T, C)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                y[b][t][c] = te[ids[b][t]][c] + pe[t][c]
    return _write(out, y, (B, T, C), "out")


def embedding_backward(d_out, idx, vocab_size, block_size, *, d_wte=None, d_wpe=None):
    """d_out (B, T, C), idx (B, T) -> (d_wte (V, C), d_wpe (block_size, C)), both accumulated.

    vocab_size and block_size only give the gradients' shapes; nothing else here knows them.
    """
    dy, (B, T, C) = _floats(d_out, "d_out", 3)
    ids = _ints(idx, "idx", 2, vocab_size)
    _same_shape(np.shape(idx), (B, T), "idx")
    if T > block_size:
        raise ValueError(f"sequence length T = {T} exceeds block_size = {block_size}")

    # In the forward pass this was: out[b, t] = wte[idx[b, t]] + wpe[t], a copy with slope 1.
    # So each row of wte collects d_out from every position that held its token (a token that
    # appears twice gets both contributions; one that never appears gets nothing), and row t of wpe
    # collects d_out from position t of every sequence in the batch:
    #   d_wte[v] += sum_{b,t: idx[b,t] = v} d_out[b, t]        d_wpe[t] += sum_b d_out[b, t]
    dte = _zeros(vocab_size, C)
    dpe = _zeros(block_size, C)
    for b in range(B):
        for t in range(T):
            for c in range(C):
                dte[ids[b][t]][c] += dy[b][t][c]
                dpe[t][c] += dy[b][t][c]
    return (_accumulate(d_wte, dte, (vocab_size, C), "d_wte"),
            _accumulate(d_wpe, dpe, (block_size, C), "d_wpe"))


# ----------------------------------------------------------------------------------------------------
# Residual connection: x + f(x), twice in every block.


def residual_forward(a, b, *, out=None):
    """a (any shape), b (same shape) -> out (same shape) = a + b."""
    a_arr, b_arr = np.asarray(a), np.asarray(b)
    _same_shape(b_arr.shape, a_arr.shape, "b")
    xa, _ = _floats(a_arr.ravel(), "a")
    xb, _ = _floats(b_arr.ravel(), "b")
    result = [xa[i] + xb[i] for i in range(len(xa))]
    return _write(out, result, a_arr.shape, "out")


def residual_backward(d_out, *, d_a=None, d_b=None):
    """d_out (any shape) -> (d_a, d_b), both the same shape as d_out, both accumulated.

    In the forward pass this was out = a + b, slope 1 for each: the gradient goes down both paths
    unchanged. That is the whole point of the residual stream: a path back to the embeddings on which
    the gradient is never shrunk.
    """
    arr = np.asarray(d_out)
    dy, _ = _floats(arr.ravel(), "d_out")
    return (_accumulate(d_a, dy, arr.shape, "d_a"),
            _accumulate(d_b, dy, arr.shape, "d_b"))


# ----------------------------------------------------------------------------------------------------
# Dropout (gptcore.dropout says where and why): a mask drawn from a key, never stored.


def dropout_forward(x, p, key, *, out=None):
    """x (any shape), p in [0, 1), key (64-bit) -> out (same shape) = x * keep / (1 - p).

    keep[i] for element i of x (flattened) comes from gptcore.dropout's hash of (key, i): the
    backward draws the same mask again from the same key. out may be x itself.
    Example: p = 0.5 keeps about half of the elements and doubles them.
    """
    arr = np.asarray(x)
    xs, _ = _floats(arr.ravel(), "x")
    p = dropout.check_probability(p)
    result = _dropped(xs, _dropout_keep(p, key, len(xs)), p) if p > 0 else xs
    return _write(out, result, arr.shape, "out")


def dropout_backward(d_out, p, key, *, d_x=None):
    """d_out (any shape), p, key [dropout_forward's] -> d_x (same shape), accumulated.

    In the forward pass this was out_i = x_i * keep_i / (1 - p), a constant slope for each element:
    d_x_i = d_out_i * keep_i / (1 - p), the same mask and the same scale.
    """
    arr = np.asarray(d_out)
    dy, _ = _floats(arr.ravel(), "d_out")
    p = dropout.check_probability(p)
    result = _dropped(dy, _dropout_keep(p, key, len(dy)), p) if p > 0 else dy
    return _accumulate(d_x, result, arr.shape, "d_x")


# ----------------------------------------------------------------------------------------------------
# AdamW: one optimizer step for one parameter tensor, in place.


def adamw_update(param, grad, m, v, *, lr, beta1, beta2, eps, weight_decay, step, grad_scale=1.0):
    """param, grad, m, v (all one shape) -> None. param, m and v are updated in place; step t >= 1.

    m and v are the running first and second moments of the gradient (zeros before step 1). The
    gradient used is grad * grad_scale (gradient clipping's scale; grad itself is only read).
    """
    for name, buf in (("param", param), ("m", m), ("v", v)):
        if not isinstance(buf, np.ndarray) or buf.dtype != np.float32:
            raise TypeError(f"{name} must be a float32 numpy array (it is updated in place)")
    shape = param.shape
    _same_shape(np.shape(grad), shape, "grad")
    _same_shape(m.shape, shape, "m")
    _same_shape(v.shape, shape, "v")
    if int(step) != step or step < 1:
        raise ValueError(f"step counts from 1 (it sets the bias correction), got {step!r}")
    t = int(step)
    # 0) clipping's scale: g = grad * grad_scale, rounded to float32 as a float32 gradient scaled in
    #    place would be (the one float32 product of this function; the rest is in double)
    grad = np.asarray(grad)
    if grad_scale != 1.0:
        grad = grad * np.float32(grad_scale)
    ps, _ = _floats(param.ravel(), "param")
    gs, _ = _floats(grad.ravel(), "grad")
    ms, _ = _floats(m.ravel(), "m")
    vs, _ = _floats(v.ravel(), "v")

    # 1) the moments, exponential moving averages of g and g^2:
    #      m = beta1*m + (1-beta1)*g        v = beta2*v + (1-beta2)*g^2
    # 2) bias correction: both started at 0, so early on they are too small by a factor
    #    (1 - beta^t); dividing it out makes m_hat, v_hat unbiased from the very first step.
    # 3) decoupled weight decay, as torch.optim.AdamW does it, before the Adam step:
    #      param *= 1 - lr*weight_decay
    #    "decoupled" because it shrinks the weights directly instead of being added to g, where it
    #    would be rescaled by 1/sqrt(v_hat) like the rest of the gradient.
    # 4) the Adam step:  param -= lr * m_hat / (sqrt(v_hat) + eps)
    # Steps 3) and 4) together equal param -= lr * (m_hat/(sqrt(v_hat)+eps) + weight_decay*param)
    # with the old param; we do them in torch's order, as the kernel API specifies.
    correction1 = 1.0 - beta1 ** t
    correction2 = 1.0 - beta2 ** t
    for i in range(len(ps)):
        g = gs[i]
        ms[i] = beta1 * ms[i] + (1.0 - beta1) * g
        vs[i] = beta2 * vs[i] + (1.0 - beta2) * g * g
        m_hat = ms[i] / correction1
        v_hat = vs[i] / correction2
        ps[i] *= 1.0 - lr * weight_decay
        ps[i] -= lr * m_hat / (math.sqrt(v_hat) + eps)
    param[...] = np.asarray(ps, dtype=np.float32).reshape(shape)
    m[...] = np.asarray(ms, dtype=np.float32).reshape(shape)
    v[...] = np.asarray(vs, dtype=np.float32).reshape(shape)


# ----------------------------------------------------------------------------------------------------
# sum of squares (the squared global gradient norm, for clipping)


def sum_of_squares(x, partials=None):
    """sum_i x_i^2 over every element of x, as a Python float. partials is accepted for the compiled
    twin's signature and ignored."""
    total = 0.0
    for value in np.asarray(x).reshape(-1).tolist():
        total += value * value
    return total


# ----------------------------------------------------------------------------------------------------
# Threads: this module runs on the calling thread alone. The two functions exist so that code written
# against the kernel API (gptcore.backends.get) runs unchanged on either backend.


def set_num_threads(n):
    """Accepted and ignored: the reference is single-threaded."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"number of threads must be an int >= 1, got {n!r}")


def get_num_threads():
    """Always 1."""
    return 1
