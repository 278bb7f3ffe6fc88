"""gptcore.optim on its own: AdamW, SGD, clip_grad_norm and cosine_lr against formulas and against torch.

WHAT'S GOING ON HERE

  WHAT   1. AdamW against torch.optim.AdamW's formula written out in float64 numpy (bias correction
            m_hat = m / (1 - b1^t), v_hat = v / (1 - b2^t), decoupled weight decay on the 2-D
            parameters only), over several steps with a changing learning rate; and against
            torch.optim.AdamW itself;
         2. AdamW's state_dict / load_state_dict: a resumed optimizer continues bit for bit;
         3. the contract: bad settings, parameters and gradients raise ValueError / TypeError;
         4. SGD with momentum against torch.optim.SGD; cosine_lr at nanoGPT's landmarks;
            clip_grad_norm against torch.nn.utils.clip_grad_norm_.
  HOW    The parameters are a few named float32 arrays shaped like a model's (matrices and vectors,
         one larger than the compiled kernel's 4096-element chunk), with random gradients: an
         optimizer only ever sees arrays, so no model is needed. The AdamW tests build their optimizer
         through the `make_adamw` fixture, the one place that says how, and on which backend (both).
  HOW THE TOLERANCES ARE SET
         Tensors are compared by relative error, max|got - want| / max|want| (as in tests/test_model.py).
         For AdamW we compare how far each parameter moved, p - p0, rather than p itself: that is what
         the optimizer computes, and a wrong bias correction changes it by an order-1 factor: with
         betas 0.9, 0.99, dropping m's correction makes the first step 10 times too small, dropping
         v's makes it 10 times too large, and dropping both is 26% off from the second step on.
         gptcore keeps p, m and v in float32, and so does torch: every step rounds p to float32, an
         error of up to 2^-24 |p| = 2.4e-7 at |p| <= 4 here, plus a few roundings of 6e-8 of the
         step. Relative to the largest displacement in a tensor this is worst after the first step,
         when that is lr = 1e-2: one rounding on each of two sides, ~5e-7, is 5e-5 of it; after more
         steps the displacement grows about as fast as the roundings. We allow 1e-4; each test says
         what we measured.
"""
import math

import numpy as np
import pytest

from gptcore import SGD, AdamW, clip_grad_norm, cosine_lr
from tolerances import rel_err, worst


# Shaped like a model's parameters: matrices decay, vectors do not. "wte.weight" has 65 * 129 = 8385
# elements, more than two of the compiled AdamW's 4096-element chunks, the last one partial.
SHAPES = {"wte.weight": (65, 129), "h.0.attn.c_attn.weight": (8, 24), "h.0.attn.c_attn.bias": (24,),
          "ln_f.weight": (7,), "ln_f.bias": (7,)}


def make_params(rng):
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in SHAPES.items()}


def make_grads(rng):
    """Random gradients, each tensor at its own scale (1e-3 .. 10): Adam's per-coordinate scaling
    should make the step size independent of it."""
    return {name: (rng.standard_normal(shape) * 10.0 ** rng.uniform(-3, 1)).astype(np.float32)
            for name, shape in SHAPES.items()}


def copies(arrays):
    return {name: a.copy() for name, a in arrays.items()}


# Every AdamW test runs on both backends: the compiled update kernel and its pure-Python twin.
BACKENDS = ["compiled", "reference"]


@pytest.fixture(params=BACKENDS)
def make_adamw(request):
    """A function (params, **settings) -> gptcore's AdamW: how every AdamW test builds its optimizer."""
    return lambda params, **settings: AdamW(params, backend=request.param, **settings)


# ====================================================================================================
# 1. AdamW against its formula and against torch
# ====================================================================================================

ADAMW = dict(betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
LRS = [1e-2, 2e-2, 3e-2, 2e-2, 1e-2, 5e-3]          # a learning rate per step, as a schedule sets it


def adamw_float64(params, grads_per_step, lrs, betas, eps, weight_decay):
    """torch.optim.AdamW's update in float64 numpy, weight decay on the 2-D parameters only.
    Returns the parameters, m and v after the last step."""
    beta1, beta2 = betas
    p = {name: x.astype(np.float64) for name, x in params.items()}
    m = {name: np.zeros_like(x) for name, x in p.items()}
    v = {name: np.zeros_like(x) for name, x in p.items()}
    for t, (grads, lr) in enumerate(zip(grads_per_step, lrs), start=1):
        for name in p:
            g = grads[name].astype(np.float64)
            if p[name].ndim == 2:
                p[name] *= 1 - lr * weight_decay                       # decoupled weight decay
            m[name] = beta1 * m[name] + (1 - beta1) * g
            v[name] = beta2 * v[name] + (1 - beta2) * g * g
            m_hat = m[name] / (1 - beta1 ** t)                         # bias correction
            v_hat = v[name] / (1 - beta2 ** t)
            p[name] -= lr * m_hat / (np.sqrt(v_hat) + eps)
    return p, m, v


def test_adamw_matches_a_float64_numpy_adamw_with_bias_correction_over_six_steps(make_adamw):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    start = copies(params)
    grads_per_step = [make_grads(rng) for _ in LRS]
    opt = make_adamw(params, lr=LRS[0], **ADAMW)
    for grads, lr in zip(grads_per_step, LRS):
        opt.lr = lr
        opt.step(copies(grads))
    want_p, want_m, want_v = adamw_float64(start, grads_per_step, LRS, **ADAMW)

    assert opt.step_count == len(LRS)
    # see the header for the bound (here only one side rounds); we measured 5e-6
    moved = {name: rel_err(params[name] - start[name].astype(np.float64), want_p[name] - start[name])
             for name in params}
    assert worst(moved)[0] <= 1e-4, f"worst displacement: {worst(moved)}"
    # m and v are float32 running averages of 6 terms: a few roundings of 6e-8 each; we measured 2e-7
    for kind, got, want in (("m", opt.m, want_m), ("v", opt.v, want_v)):
        errors = {name: rel_err(got[name], want[name]) for name in params}
        assert worst(errors)[0] <= 1e-6, f"worst {kind}: {worst(errors)}"


def test_adamw_first_step_moves_every_weight_by_lr_against_the_sign_of_its_gradient(make_adamw):
    # at t = 1 bias correction gives m_hat = g and v_hat = g^2, so the step is lr * g / (|g| + eps),
    # lr * sign(g) whatever the gradient's scale (1e-3 <= |g| <= 10 here)
    rng = np.random.default_rng(1)
    params = make_params(rng)
    start = copies(params)
    grads = {}
    for name, p in params.items():
        sign, size = rng.choice([-1.0, 1.0], p.shape), 10.0 ** rng.uniform(-3, 1, p.shape)
        grads[name] = (sign * size).astype(np.float32)
    make_adamw(params, lr=0.01, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0).step(grads)
    for name in params:
        # a step of 1e-2: eps / |g| <= 1e-5 of it, and rounding p (|p| <= 4) to float32 up to 2.4e-7,
        # 2.4e-5 of it (the float32 difference start - params is exact: the two are that close)
        np.testing.assert_allclose(start[name] - params[name], 0.01 * np.sign(grads[name]), rtol=1e-4,
                                   err_msg=name)


def test_adamw_decays_only_the_matrices(make_adamw):
    # with zero gradients m and v stay zero and the Adam step is exactly 0: only weight decay moves
    # the parameters, by the factor (1 - lr * weight_decay) per step on the 2-D ones, not at all on the
    # vectors (biases and LayerNorm gains)
    params = make_params(np.random.default_rng(2))
    start = copies(params)
    opt = make_adamw(params, lr=0.1, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.5)
    for _ in range(3):
        opt.step({name: np.zeros_like(p) for name, p in params.items()})
    for name, p in params.items():
        if p.ndim == 2:
            # three float32 multiplications by 0.95: within 3 roundings (2e-7) of 0.95^3 = 0.857
            np.testing.assert_allclose(p, start[name] * 0.95 ** 3, rtol=3e-7, err_msg=name)
        else:
            np.testing.assert_array_equal(p, start[name], err_msg=name)


def test_adamw_matches_torch_adamw_over_six_steps(make_adamw, torch):
    rng = np.random.default_rng(3)
    params = make_params(rng)
    start = copies(params)
    tensors = {name: torch.from_numpy(p.copy()).requires_grad_(True) for name, p in params.items()}
    opt = make_adamw(params, lr=LRS[0], **ADAMW)
    t_opt = torch.optim.AdamW(
        [{"params": [t for t in tensors.values() if t.ndim == 2], "weight_decay": ADAMW["weight_decay"]},
         {"params": [t for t in tensors.values() if t.ndim != 2], "weight_decay": 0.0}],
        lr=LRS[0], betas=ADAMW["betas"], eps=ADAMW["eps"], foreach=False)
    for step, lr in enumerate(LRS):
        grads = make_grads(rng)
        for name, t in tensors.items():
            t.grad = torch.from_numpy(grads[name].copy())
        opt.lr = lr
        opt.step(grads)
        for group in t_opt.param_groups:
            group["lr"] = lr
        t_opt.step()
        # both in float32, in different orders: see the header; we measured 3.4e-5 (after step 0)
        moved = {name: rel_err(params[name] - start[name].astype(np.float64),
                               tensors[name].detach().numpy() - start[name].astype(np.float64))
                 for name in params}
        assert worst(moved)[0] <= 1e-4, f"after step {step}: worst displacement {worst(moved)}"


# ====================================================================================================
# 2. Resuming from the optimizer's state
# ====================================================================================================


def test_adamw_resumed_from_its_state_dict_continues_bit_for_bit(make_adamw):
    rng = np.random.default_rng(4)
    params = make_params(rng)
    grads_per_step = [make_grads(rng) for _ in range(6)]
    opt = make_adamw(params, lr=1e-2, **ADAMW)
    for grads in grads_per_step[:3]:
        opt.step(copies(grads))
    # what a checkpoint holds: copies of the parameters and of the state, taken after step 3
    arrays, meta = opt.state_dict()
    saved_params, saved_arrays, saved_meta = copies(params), copies(arrays), dict(meta)

    resumed_params = copies(saved_params)
    resumed = make_adamw(resumed_params, lr=1e-2, **ADAMW)
    resumed.load_state_dict(saved_arrays, saved_meta)
    assert resumed.step_count == 3
    for grads in grads_per_step[3:]:
        opt.step(copies(grads))
        resumed.step(copies(grads))
    for name in params:
        np.testing.assert_array_equal(resumed_params[name], params[name], err_msg=name)
        np.testing.assert_array_equal(resumed.m[name], opt.m[name], err_msg=name)
        np.testing.assert_array_equal(resumed.v[name], opt.v[name], err_msg=name)


def test_adamw_load_state_dict_refuses_moments_of_the_wrong_shape(make_adamw):
    params = make_params(np.random.default_rng(5))
    arrays, meta = make_adamw(params).state_dict()
    arrays = copies(arrays)
    arrays["v.ln_f.bias"] = np.zeros(8, np.float32)                  # ln_f.bias has 7
    with pytest.raises(ValueError, match=r"v\.ln_f\.bias"):
        make_adamw(params).load_state_dict(arrays, meta)


# ====================================================================================================
# 3. The contract
# ====================================================================================================

BAD_ADAMW_SETTINGS = [
    dict(lr=-1e-3), dict(lr=float("nan")), dict(lr=float("inf")),
    dict(betas=(1.0, 0.99)), dict(betas=(0.9, -0.1)), dict(betas=(0.9,)), dict(betas=(0.9, 0.99, 0.999)),
    dict(eps=-1e-8), dict(weight_decay=-0.1),
]


def settings_id(settings):
    return ",".join(f"{key}={value}" for key, value in settings.items())


@pytest.mark.parametrize("settings", BAD_ADAMW_SETTINGS, ids=settings_id)
def test_adamw_refuses_bad_settings_with_value_error(make_adamw, settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        make_adamw(make_params(np.random.default_rng(0)), **settings)


def test_adamw_step_refuses_a_learning_rate_set_to_nan_between_steps(make_adamw):
    params = make_params(np.random.default_rng(0))
    opt = make_adamw(params)
    opt.lr = float("nan")
    with pytest.raises(ValueError, match="lr"):
        opt.step({name: np.zeros_like(p) for name, p in params.items()})


def read_only(a):
    a.flags.writeable = False
    return a


BAD_PARAMS = [
    ([np.zeros(3, np.float32)], TypeError, "dict"),
    ({}, TypeError, "non-empty dict"),
    ({"w": np.zeros(3, np.float64)}, TypeError, r"params\['w'\].*float32"),
    ({"w": np.zeros((4, 4), np.float32)[:, ::2]}, ValueError, r"params\['w'\] must be C-contiguous"),
    ({"w": read_only(np.zeros(3, np.float32))}, ValueError, r"params\['w'\] must be writeable"),
]


@pytest.mark.parametrize("optimizer", [AdamW, SGD], ids=["AdamW", "SGD"])
@pytest.mark.parametrize("params, error, message", BAD_PARAMS,
                         ids=["list", "empty", "float64", "strided", "read-only"])
def test_optimizers_refuse_params_they_cannot_update_in_place(optimizer, params, error, message):
    with pytest.raises(error, match=message):
        optimizer(params)


def wrong_grads(params):
    """(name, grads, error, message): every way a step's gradients can fail to match the parameters."""
    good = lambda: {name: np.zeros_like(p) for name, p in params.items()}
    missing, extra, float64, shape = good(), good(), good(), good()
    del missing["ln_f.bias"]
    extra["lm_head.weight"] = np.zeros((2, 2), np.float32)
    float64["ln_f.bias"] = float64["ln_f.bias"].astype(np.float64)
    shape["ln_f.bias"] = np.zeros(8, np.float32)
    return [("missing", missing, ValueError, r"missing \['ln_f.bias'\]"),
            ("unexpected", extra, ValueError, r"unexpected \['lm_head.weight'\]"),
            ("float64", float64, TypeError, r"grads\['ln_f.bias'\].*float32"),
            ("shape", shape, ValueError, r"grads\['ln_f.bias'\] must have shape \(7,\)")]


@pytest.mark.parametrize("optimizer", ["AdamW", "SGD"])
def test_optimizer_step_refuses_gradients_that_do_not_match_the_parameters(optimizer, make_adamw):
    params = make_params(np.random.default_rng(0))
    opt = make_adamw(params) if optimizer == "AdamW" else SGD(params)
    before = copies(params)
    for case, grads, error, message in wrong_grads(params):
        with pytest.raises(error, match=message):
            opt.step(grads)
        for name in params:                       # refused before anything was written
            np.testing.assert_array_equal(params[name], before[name], err_msg=f"{case}: {name}")


@pytest.mark.parametrize("settings", [dict(lr=-0.1), dict(lr=float("nan")), dict(momentum=1.0),
                                      dict(momentum=-0.5), dict(weight_decay=-1e-4)],
                         ids=settings_id)
def test_sgd_refuses_bad_settings_with_value_error(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        SGD(make_params(np.random.default_rng(0)), **settings)


# ====================================================================================================
# 4. SGD, the learning-rate schedule, clipping
# ====================================================================================================


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_with_momentum_matches_torch_over_five_steps(torch, weight_decay):
    rng = np.random.default_rng(0)
    params = make_params(rng)
    tensors = {name: torch.from_numpy(p.copy()).requires_grad_(True) for name, p in params.items()}
    opt = SGD(params, lr=0.1, momentum=0.9, weight_decay=weight_decay)
    t_opt = torch.optim.SGD(list(tensors.values()), lr=0.1, momentum=0.9, weight_decay=weight_decay)
    for step in range(5):
        grads = make_grads(rng)
        for name, t in tensors.items():        # the same gradients on both sides: this tests the optimizer
            t.grad = torch.from_numpy(grads[name].copy())
        opt.step(grads)
        t_opt.step()
        # SGD is linear in the gradients: the two sides differ by a rounding or two per step
        errors = {name: rel_err(p, tensors[name].detach().numpy()) for name, p in params.items()}
        assert worst(errors)[0] <= 1e-6, f"after step {step}: {worst(errors)}"


def test_cosine_lr_matches_nanogpt_schedule_at_its_landmarks():
    # nanoGPT's get_lr: 1) warmup from max_lr / (warmup + 1) up to max_lr; 2) min_lr from the end of
    # decay on; 3) in between, min_lr + 0.5 * (1 + cos(pi * progress)) * (max_lr - min_lr)
    max_lr, min_lr, warmup, decay = 6e-4, 6e-5, 10, 110
    lr = lambda step: cosine_lr(step, max_lr, min_lr, warmup, decay)
    assert lr(0) == pytest.approx(max_lr / 11, rel=1e-12)                   # warmup starts above 0
    assert lr(4) == pytest.approx(max_lr * 5 / 11, rel=1e-12)
    assert lr(9) == pytest.approx(max_lr * 10 / 11, rel=1e-12)              # last warmup step
    assert lr(10) == pytest.approx(max_lr, rel=1e-12)                       # end of warmup
    assert lr(35) == pytest.approx(min_lr + (1 + math.cos(math.pi / 4)) / 2 * (max_lr - min_lr), rel=1e-12)
    assert lr(60) == pytest.approx((max_lr + min_lr) / 2, rel=1e-12)        # midpoint of the decay
    assert lr(110) == pytest.approx(min_lr, rel=1e-12)                      # end
    assert lr(111) == lr(5000) == min_lr                                    # after the end
    steps = [lr(s) for s in range(0, 200)]
    assert all(a < b for a, b in zip(steps[:10], steps[1:11]))
    assert all(a >= b for a, b in zip(steps[10:], steps[11:]))


@pytest.mark.parametrize("backend", BACKENDS)
def test_clip_grad_norm_returns_the_norm_and_scales_as_torch_does(torch, backend):
    rng = np.random.default_rng(0)
    shapes = {"a": (7, 5), "b": (300,), "c": (65, 64)}
    for max_norm in [1.0, 1e3]:                  # the norm (~67) above max_norm (clipped), below (left alone)
        grads = {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}
        original = {name: g.copy() for name, g in grads.items()}
        tensors = [torch.from_numpy(g.copy()).requires_grad_(True) for g in grads.values()]
        for t, g in zip(tensors, grads.values()):
            t.grad = torch.from_numpy(g.copy())
        norm = clip_grad_norm(grads, max_norm, backend=backend)
        t_norm = torch.nn.utils.clip_grad_norm_(tensors, max_norm).item()
        exact = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in original.values()))
        assert isinstance(norm, float)
        assert norm == pytest.approx(exact, rel=1e-6)
        assert norm == pytest.approx(t_norm, rel=1e-6)
        for (name, g), t in zip(grads.items(), tensors):
            np.testing.assert_allclose(g, t.grad.numpy(), rtol=1e-6, atol=1e-7, err_msg=name)
        if exact < max_norm:
            for name in grads:
                np.testing.assert_array_equal(grads[name], original[name], err_msg=name)
        else:
            after = math.sqrt(sum(float(np.sum(g.astype(np.float64) ** 2)) for g in grads.values()))
            assert after == pytest.approx(max_norm, rel=1e-5)


# ====================================================================================================
# 5. Clipping folded into AdamW's update
# ====================================================================================================

@pytest.mark.parametrize("max_norm", [1.0, 1e6], ids=["clipped", "not-clipped"])
def test_adamw_step_with_max_norm_is_clip_grad_norm_then_step_bit_for_bit(make_adamw, max_norm):
    # the gradients' norms are between 1 and 1e6 here: max_norm 1 scales them, 1e6 leaves them alone
    rng = np.random.default_rng(5)
    params = make_params(rng)
    separate_params = copies(params)
    fused, separate = make_adamw(params, lr=1e-2, **ADAMW), make_adamw(separate_params, lr=1e-2, **ADAMW)
    backend = "compiled" if fused.kernels.__name__.endswith("compiled") else "reference"
    for _ in range(3):
        grads = make_grads(rng)
        untouched = copies(grads)
        clipped = copies(grads)
        want_norm = clip_grad_norm(clipped, max_norm, backend=backend)
        separate.step(clipped)
        assert fused.step(grads, max_norm=max_norm) == want_norm
        assert 1.0 < want_norm < 1e6
        for name in params:
            np.testing.assert_array_equal(grads[name], untouched[name], err_msg=f"{name}: grads were written")
            np.testing.assert_array_equal(params[name], separate_params[name], err_msg=name)
            np.testing.assert_array_equal(fused.m[name], separate.m[name], err_msg=name)
            np.testing.assert_array_equal(fused.v[name], separate.v[name], err_msg=name)


def test_adamw_step_without_max_norm_returns_none_and_refuses_a_bad_one(make_adamw):
    params = make_params(np.random.default_rng(0))
    opt = make_adamw(params)
    zeros = {name: np.zeros_like(p) for name, p in params.items()}
    assert opt.step(zeros) is None
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="max_norm"):
            opt.step(zeros, max_norm=bad)
