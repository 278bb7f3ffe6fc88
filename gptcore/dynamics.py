"""gptcore.dynamics: the statistics of one training step that show how training is going, inside.

WHAT'S GOING ON HERE
====================

WHAT
  At every evaluation, gptcore train records these numbers of the training step that just ran into
  metrics.jsonl (the evaluation's line, under "dynamics"), and the report (gptcore.visualize) plots
  them against the step:

    block_out_rms[i]     sqrt(mean(out_i^2)) over the batch, block i's output: the residual stream's
                         size after block i. Pre-norm blocks add to the stream and never rescale it, so
                         it usually grows with depth; a stream that keeps growing from one evaluation to
                         the next is a warning sign.
    attn_entropy[i]      the mean over heads and positions of H(t) = -sum_s att[t, s] log att[t, s]
                         (nats) in block i, for the batch's first sequence (one sequence already
                         averages NH * T rows; the whole batch would cost B times as much). Position t may spread its attention over t + 1 positions, so
                         H(t) <= log(t + 1), reached by uniform attention; a head that looks at one token
                         only has H = 0. attn_entropy_uniform is that upper bound's mean over positions.
    grad_norm            sqrt(sum of every gradient^2), before clipping (what --grad-clip compares)
    grad_rms[name]       sqrt(mean(g^2)) of each parameter tensor's gradient, before clipping
    update_ratio[name]   rms(w_after - w_before) / rms(w_after): how far this step moved the tensor,
                         relative to its size. Around 1e-3 is the usual sign of a healthy learning rate;
                         1e-2 and up, the weights are being thrown about; 1e-5 and below, they hardly move.
                         null for a tensor that is all zeros.

HOW (cheap: computed from arrays the step already has)
  Everything is read from what the step computed anyway: the forward's activations (model.activations,
  still intact after the backward), the attention weights (model.attention_weights), the gradients.
  The one thing a step does not keep is the weights before the update, so a recorded step copies the
  flat parameter array once before AdamW runs (StepDynamics.before_update); after the update that copy
  becomes the update itself, in place (w_before - w_after), so no other array is allocated. Each sum
  of squares is the compiled kernels' sum_of_squares (in double, any thread count gives the same sum).
  Recording costs a few passes over the parameters and the block outputs, next to a step's ~6 flops
  per parameter per token: bench/test_dynamics_bench.py measures a recorded step against a plain one.
"""
import math

import numpy as np

from gptcore.model import parameter_shapes, views_of


def _rms(kernels, array):
    """sqrt(mean(array^2)), from the kernels' double-precision sum of squares."""
    return math.sqrt(kernels.sum_of_squares(array) / array.size)


def block_output_rms(model):
    """[rms of block i's output (B, T, C) in the last forward, for each block i]."""
    return [_rms(model.kernels, cache.out) for cache in model.activations.blocks]


def attention_entropy(att):
    """att (B, NH, T, T), rows summing to 1 -> the mean entropy of its rows in nats: -sum p log p, with
    0 log 0 = 0 (the zeros above the diagonal, and any weight that underflowed)."""
    logs = np.zeros_like(att)
    np.log(att, out=logs, where=att > 0)
    logs *= att
    return -float(logs.sum(dtype=np.float64)) / math.prod(att.shape[:3])


def uniform_attention_entropy(T):
    """The mean over positions t < T of log(t + 1): the entropy of causal attention spread evenly."""
    return float(np.mean(np.log(np.arange(1, T + 1))))


class StepDynamics:
    """One recorded step, in two halves around the optimizer's update:

        dynamics = StepDynamics.before_update(model, grads)     # after backward (and before clipping)
        optimizer.step(grads)
        record = dynamics.after_update(model)                   # -> a dict for metrics.jsonl
    """

    def __init__(self, grad_squares, weights_before):
        self.grad_squares = grad_squares        # {name: sum of the gradient's squares}
        self.weights_before = weights_before    # a copy of model.flat_params before the update

    @classmethod
    def before_update(cls, model, grads):
        squares = {name: model.kernels.sum_of_squares(g) for name, g in grads.items()}
        return cls(squares, model.flat_params.copy())

    def after_update(self, model):
        kernels, sizes = model.kernels, {name: p.size for name, p in model.params.items()}
        # the copy of the weights before the update becomes the update, in place: before - after
        update = self.weights_before
        np.subtract(update, model.flat_params, out=update)
        updates = views_of(update, parameter_shapes(model.config))
        ratios = {}
        for name, weight in model.params.items():
            weight_rms = _rms(kernels, weight)
            ratios[name] = _rms(kernels, updates[name]) / weight_rms if weight_rms > 0 else None
        self.weights_before = None
        T = model.activations.T
        return {
            "block_out_rms": block_output_rms(model),
            "attn_entropy": [attention_entropy(model.attention_weights(i)[:1]) for i in range(model.config.n_layer)],
            "attn_entropy_uniform": uniform_attention_entropy(T),
            "grad_norm": math.sqrt(sum(self.grad_squares.values())),
            "grad_rms": {name: math.sqrt(s / sizes[name]) for name, s in self.grad_squares.items()},
            "update_ratio": ratios,
        }
