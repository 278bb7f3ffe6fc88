"""gptcore.optim: the optimizers (AdamW, SGD with momentum), the learning-rate schedule, clipping.

WHAT'S GOING ON HERE
====================

WHAT
  After backward() every parameter p has a gradient g = dL/dp. An optimizer turns g into a step.
    SGD with momentum:  buf = momentum * buf + g;  p -= lr * buf        (torch.optim.SGD, dampening 0)
    AdamW:              m = b1 m + (1 - b1) g;  v = b2 v + (1 - b2) g^2          running moments
                        p -= lr * wd * p                                          decoupled weight decay
                        p -= lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
  Adam divides each coordinate's step by a running estimate of that coordinate's gradient size, so
  every parameter moves at roughly the rate lr whatever the scale of its gradient. "Decoupled" weight
  decay (the W in AdamW) shrinks the weights directly instead of adding wd * p to g, where Adam's
  division would rescale it; as in nanoGPT, only the matrices (2-D: the embeddings and the linear
  weights) decay, never biases or LayerNorm gains.

  cosine_lr: linear warmup from ~0 to max_lr, then a half cosine down to min_lr (nanoGPT's get_lr).
  Clipping: if the global norm sqrt(sum of g^2 over every parameter) exceeds max_norm, every gradient
  is scaled by max_norm / norm: one bad batch cannot throw the weights far.

HOW
  The AdamW update is one fused kernel call per parameter tensor (adamw_update): it reads p, g, m, v
  once and writes p, m, v once. Clipping with AdamW is AdamW.step(grads, max_norm): the norm takes one
  read of every gradient (one sum_of_squares per tensor), and the scale is folded into the update
  (adamw_update's grad_scale), which uses the float32 product g * scale, the bits that scaling the
  gradients in place first would store. So a clipped step reads the gradients twice and never writes
  them, where clip_grad_norm (in place, for SGD or any other use) followed by step reads them three
  times and writes them once: at GPT-2 124M's 497 MB of gradients, 1 GB less traffic per step
  (bench/test_step124_bench.py::test_optimizer_passes times both). The kernels come from the
  optimizer's backend (gptcore.backends: "compiled" or "reference", the same choice as the model's),
  so a reference run computes every number of a training step in plain Python. The checks (every
  gradient present, float32, the right shape) run here first, once per step.
"""
import math

import numpy as np

from gptcore import backends, validate


def _check_grads(params, grads):
    """Every parameter has a gradient: float32, C-contiguous, of the parameter's shape."""
    if set(grads) != set(params):
        missing, extra = set(params) - set(grads), set(grads) - set(params)
        raise ValueError(f"grads must have the same names as params (missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(extra)[:3]})")
    for name, p in params.items():
        validate.expect_shape(f"grads[{name!r}]", validate.float_array(f"grads[{name!r}]", grads[name]), p.shape)


def _check_params(params):
    """A non-empty dict of float32, C-contiguous, writeable arrays (the optimizer updates them in place)."""
    if not isinstance(params, dict) or not params:
        raise TypeError("params must be a non-empty dict of name -> numpy array")
    for name, p in params.items():
        validate.float_array(f"params[{name!r}]", p)
        if not p.flags.writeable:
            raise ValueError(f"params[{name!r}] must be writeable: the optimizer updates it in place")
    return params


class AdamW:
    """AdamW as torch.optim.AdamW computes it; weight decay on the 2-D parameters only.

        opt = AdamW(model.params, lr=1e-3, betas=(0.9, 0.99), eps=1e-8, weight_decay=0.1)
        opt.step(grads)        # updates model.params in place; opt.lr may be changed between steps
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, backend=None):
        self.params = _check_params(params)
        self.kernels = backends.get(backend)
        if not (math.isfinite(lr) and lr >= 0):
            raise ValueError(f"lr must be finite and >= 0, got {lr}")
        if not all(0.0 <= b < 1.0 for b in betas) or len(betas) != 2:
            raise ValueError(f"betas must be two numbers in [0, 1), got {betas}")
        if not (eps >= 0 and weight_decay >= 0):
            raise ValueError(f"eps and weight_decay must be >= 0, got {eps}, {weight_decay}")
        self.lr, self.betas, self.eps, self.weight_decay = lr, tuple(betas), eps, weight_decay
        self.m = {name: np.zeros_like(p) for name, p in params.items()}    # first moment
        self.v = {name: np.zeros_like(p) for name, p in params.items()}    # second moment
        self.step_count = 0

    def decays(self, name):
        """Weight decay applies to matrices (embeddings, linear weights), not to vectors."""
        return self.params[name].ndim >= 2

    def step(self, grads, max_norm=None):
        """One update from grads (left as they are). With max_norm, the gradients are clipped first
        to a global norm of at most max_norm, as clip_grad_norm would, folded into the update; the
        norm before clipping is returned (None without max_norm)."""
        _check_grads(self.params, grads)
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be finite and >= 0, got {self.lr}")
        norm, scale = None, 1.0
        if max_norm is not None:
            norm, scale = _clip_scale(grads, max_norm, self.kernels)
        self.step_count += 1
        beta1, beta2 = self.betas
        for name, p in self.params.items():
            self.kernels.adamw_update(p, grads[name], self.m[name], self.v[name], lr=self.lr, beta1=beta1,
                                      beta2=beta2, eps=self.eps,
                                      weight_decay=self.weight_decay if self.decays(name) else 0.0,
                                      step=self.step_count, grad_scale=scale)
        return norm

    def state_dict(self):
        """Everything needed to resume exactly: the moments (by parameter name) and the step count."""
        state = {f"m.{name}": m for name, m in self.m.items()}
        state.update({f"v.{name}": v for name, v in self.v.items()})
        return state, {"step_count": self.step_count}

    def load_state_dict(self, arrays, meta):
        for name in self.params:
            for kind, table in (("m", self.m), ("v", self.v)):
                value = arrays[f"{kind}.{name}"]
                if value.shape != table[name].shape:
                    raise ValueError(f"optimizer state {kind}.{name} has shape {value.shape}, "
                                     f"expected {table[name].shape}")
                table[name][...] = value
        self.step_count = int(meta["step_count"])


class SGD:
    """Stochastic gradient descent with momentum (torch.optim.SGD with dampening 0, no nesterov):
    buf = momentum * buf + g + weight_decay * p;  p -= lr * buf."""

    def __init__(self, params, lr=1e-2, momentum=0.9, weight_decay=0.0):
        self.params = _check_params(params)
        if not (math.isfinite(lr) and lr >= 0) or not 0 <= momentum < 1 or weight_decay < 0:
            raise ValueError(f"need lr >= 0, 0 <= momentum < 1, weight_decay >= 0; got {lr}, {momentum}, "
                             f"{weight_decay}")
        self.lr, self.momentum, self.weight_decay = lr, momentum, weight_decay
        self.buf = {name: np.zeros_like(p) for name, p in params.items()}

    def step(self, grads):
        _check_grads(self.params, grads)
        for name, p in self.params.items():
            buf = self.buf[name]
            buf *= self.momentum
            buf += grads[name]
            if self.weight_decay:
                buf += self.weight_decay * p
            p -= np.float32(self.lr) * buf


def cosine_lr(step, max_lr, min_lr, warmup_iters, decay_iters):
    """The learning rate at `step` (0-based), as nanoGPT schedules it:
      1) linear warmup for warmup_iters steps, from max_lr / (warmup_iters + 1) up to max_lr;
      2) after decay_iters, min_lr;
      3) in between, a half cosine from max_lr down to min_lr."""
    if step < warmup_iters:
        return max_lr * (step + 1) / (warmup_iters + 1)
    if step >= decay_iters:
        return min_lr
    progress = (step - warmup_iters) / max(1, decay_iters - warmup_iters)     # 0 -> 1
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def _clip_scale(grads, max_norm, kernels):
    """(the global norm of grads, the factor clipping multiplies them by), as
    torch.nn.utils.clip_grad_norm_ computes them, with its 1e-6 guard:
    norm = sqrt(sum over every tensor of sum g^2), factor = min(1, max_norm / (norm + 1e-6))."""
    if not (math.isfinite(max_norm) and max_norm > 0):
        raise ValueError(f"max_norm must be finite and > 0, got {max_norm}")
    total = math.sqrt(sum(kernels.sum_of_squares(g) for g in grads.values()))
    return total, min(1.0, max_norm / (total + 1e-6))


def clip_grad_norm(grads, max_norm, backend=None):
    """Scale every gradient in place so their global norm is at most max_norm; return the norm
    before clipping (as torch.nn.utils.clip_grad_norm_ does). backend picks the kernels that compute
    the norm (gptcore.backends). With AdamW, AdamW.step(grads, max_norm) does the same without the
    pass that writes the gradients."""
    for name, g in grads.items():
        validate.float_array(f"grads[{name!r}]", g)
    total, scale = _clip_scale(grads, max_norm, backends.get(backend))
    if scale < 1.0:
        for g in grads.values():
            g *= np.float32(scale)
    return total
