# Copyright (c) transnext-mm contributors. All rights reserved.
"""The log-CPB MLP, ``fc2(relu(fc1(points)))`` for (P, 2) points, as a compiled CPU op.

Its input is a table of 2-d log-spaced offsets (tens of thousands of points at stage 1) and its
hidden layer is 512 wide with one output per head, so PyTorch's two GEMMs spend their time moving
the (P, 512) activations through memory, most of all in the backward (recompute, ReLU mask,
hidden gradient, three weight-gradient products, a column sum). The kernels in
``transnext_mm._ext`` keep a few points' hidden rows in L1 and compute the outputs, or every
weight gradient, from them in one pass; the weight gradients are summed per block of points in a
fixed order (independent of the thread count). The points are constants: they get no gradient.

:func:`log_cpb_mlp_torch` is the PyTorch formula and the oracle;
:func:`transnext_mm.ops.dispatch.log_cpb_mlp_impl` decides where the op runs.
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import compiled_ext


def log_cpb_mlp_torch(points: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor,
                      bias2: Tensor) -> Tensor:
    """PyTorch implementation: ``F.linear(relu(F.linear(points, weight1, bias1)), weight2,
    bias2)``."""
    return F.linear(F.relu(F.linear(points, weight1, bias1)), weight2, bias2)


@torch.library.custom_op('transnext_mm::log_cpb_mlp', mutates_args=())
def log_cpb_mlp_op(points: Tensor, weight1: Tensor, bias1: Tensor, weight2: Tensor,
                   bias2: Tensor) -> Tensor:
    """The compiled MLP (CPU, fp32 / fp64; no dispatch), differentiable in the four weights
    through :func:`log_cpb_mlp_backward_op`."""
    return compiled_ext().log_cpb_mlp_forward(points, weight1, bias1, weight2, bias2)


@log_cpb_mlp_op.register_fake
def _log_cpb_mlp_op_fake(points, weight1, bias1, weight2, bias2):
    return points.new_empty((points.shape[0], weight2.shape[0]))


@torch.library.custom_op('transnext_mm::log_cpb_mlp_backward', mutates_args=())
def log_cpb_mlp_backward_op(grad: Tensor, points: Tensor, weight1: Tensor, bias1: Tensor,
                            weight2: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``weight1``, ``bias1``, ``weight2`` and ``bias2``."""
    return tuple(compiled_ext().log_cpb_mlp_backward(grad, points, weight1, bias1, weight2))


@log_cpb_mlp_backward_op.register_fake
def _log_cpb_mlp_backward_op_fake(grad, points, weight1, bias1, weight2):
    return (torch.empty_like(weight1), torch.empty_like(bias1), torch.empty_like(weight2),
            weight2.new_empty(weight2.shape[:1]))


def _setup_context(ctx, inputs, output):
    points, weight1, bias1, weight2, _ = inputs
    ctx.save_for_backward(points, weight1, bias1, weight2)


def _backward(ctx, grad: Tensor):
    if ctx.needs_input_grad[0]:
        raise RuntimeError('log_cpb_mlp_op: the points are constants and get no gradient; use '
                           'log_cpb_mlp_torch for points that need one')
    if not any(ctx.needs_input_grad[1:]):
        return None, None, None, None, None
    grads = log_cpb_mlp_backward_op(grad.contiguous(), *ctx.saved_tensors)
    return (None, ) + tuple(g if need else None for g, need in zip(grads, ctx.needs_input_grad[1:]))


log_cpb_mlp_op.register_autograd(_backward, setup_context=_setup_context)
