# Copyright (c) transnext-mm contributors. All rights reserved.
"""The gate of the convolutional GLU: ``GELU(depthwise_conv3x3(gate) + bias) * value``.

``hidden = [gate | value]`` is the fc1 output, (B, H*W, 2h) tokens of a row-major H x W grid;
``weight`` (h, 1, 3, 3) and ``bias`` (h) are the depthwise conv's. Returns (B, H*W, h).

:func:`conv_glu_gate_torch` is the PyTorch implementation and the oracle. On CPU (fp32 / fp64)
the compiled kernels in ``transnext_mm._ext`` compute it in one pass over the tokens (PyTorch needs
three passes and a oneDNN reorder of the strided gate, which dominate at stage 1), and its
backward in two: the conv is recomputed from the saved fc1 output (the only tensor saved), the
value's gradient and the conv's weight and bias gradients come out of the first pass, the gate's
gradient out of the second, into one (B, H*W, 2h) gradient of ``hidden`` (no split or
concatenation for fc1's backward). :func:`transnext_mm.ops.dispatch.choose` runs them for
inference and training. Elsewhere (CUDA, half precision, autocast, no extension) PyTorch runs the
gate: cuDNN's depthwise conv is not a slow path there.
"""
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from .dispatch import compiled_ext, conv_glu_recomputes_gate, select


def _gate_image(gate: Tensor, height: int, width: int) -> Tensor:
    """(B, H*W, h) tokens -> (B, h, H, W) channels-last view (no copy)."""
    return gate.reshape(gate.shape[0], height, width, -1).permute(0, 3, 1, 2)


def _image_tokens(image: Tensor) -> Tensor:
    """(B, h, H, W) -> (B, H*W, h)."""
    return image.flatten(2).transpose(1, 2)


def conv_glu_gate_torch(hidden: Tensor, weight: Tensor, bias: Tensor, height: int,
                        width: int) -> Tensor:
    """PyTorch implementation of the gate (see the module docstring)."""
    gate, value = hidden.chunk(2, dim=-1)
    pre = F.conv2d(_gate_image(gate, height, width), weight, bias, padding=1, groups=gate.shape[-1])
    return F.gelu(_image_tokens(pre)) * value


@torch.library.custom_op('transnext_mm::conv_glu_gate', mutates_args=())
def conv_glu_gate_op(hidden: Tensor, weight: Tensor, bias: Tensor, height: int,
                     width: int) -> Tensor:
    """The compiled gate as a custom op (CPU, fp32 / fp64; no dispatch: see
    :func:`conv_glu_gate`), with the compiled backward :func:`conv_glu_gate_backward_op`."""
    return compiled_ext().conv_glu_gate_forward(hidden, weight, bias, height, width)


@conv_glu_gate_op.register_fake
def _conv_glu_gate_op_fake(hidden, weight, bias, height, width):
    return hidden.new_empty((hidden.shape[0], hidden.shape[1], hidden.shape[2] // 2))


def _setup_context(ctx, inputs, output):
    hidden, weight, bias, height, width = inputs
    ctx.save_for_backward(hidden, weight, bias)
    ctx.grid = (height, width)


def _backward(ctx, grad: Tensor):
    hidden, weight, bias = ctx.saved_tensors
    height, width = ctx.grid
    if not any(ctx.needs_input_grad[:3]):
        return None, None, None, None, None
    grad_hidden, grad_weight, grad_bias = conv_glu_gate_backward_op(grad, hidden, weight, bias,
                                                                    height, width)
    return tuple(g if need else None
                 for g, need in zip((grad_hidden, grad_weight,
                                     grad_bias), ctx.needs_input_grad[:3])) + (None, None)


@torch.library.custom_op('transnext_mm::conv_glu_gate_backward', mutates_args=())
def conv_glu_gate_backward_op(grad: Tensor, hidden: Tensor, weight: Tensor, bias: Tensor,
                              height: int, width: int) -> Tuple[Tensor, Tensor, Tensor]:
    """The compiled gate's backward: the gradients of ``hidden`` (one (B, H*W, 2h) tensor,
    gate and value halves), ``weight`` and ``bias``."""
    grads = compiled_ext().conv_glu_gate_backward(grad, hidden, weight, bias, height, width)
    return tuple(grads[:3])


@conv_glu_gate_backward_op.register_fake
def _conv_glu_gate_backward_op_fake(grad, hidden, weight, bias, height, width):
    return torch.empty_like(hidden), torch.empty_like(weight), torch.empty_like(bias)


conv_glu_gate_op.register_autograd(_backward, setup_context=_setup_context)


class _GateLinear(torch.autograd.Function):
    """``F.linear(gate(hidden), fc2_weight, fc2_bias)`` with the compiled kernels, saving only
    ``hidden`` (and the weights): the backward recomputes the gate's output for fc2's weight
    gradient, in the same pass as the gate's gradients, and multiplies fc2's weight into the
    output gradient itself: on maps with long rows image row by image row, in cache, instead of
    writing that (B, H*W, h) product to memory (eager mode only; see
    :func:`conv_glu_gate_linear`)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fc2_weight, fc2_bias, height, width):
        ctx.save_for_backward(hidden, weight, bias, fc2_weight)
        ctx.grid = (height, width)
        ctx.fc2_bias = fc2_bias is not None
        # fc2 in the kernel too (row by row on long rows: the gate's output stays in cache).
        return compiled_ext().conv_glu_gate_forward(
            hidden, weight, bias, height, width, fc2_weight=fc2_weight, fc2_bias=fc2_bias)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        hidden, weight, bias, fc2_weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        grad_fc2_bias = grad_hidden = grad_weight = grad_bias = out = None
        rows = grad.reshape(-1, grad.shape[-1])
        if need[4] and ctx.fc2_bias:
            grad_fc2_bias = rows.sum(0)
        if any(need[:3]):
            # The kernel multiplies fc2's weight in (row by row on long rows).
            grad_hidden, grad_weight, grad_bias, out = compiled_ext().conv_glu_gate_backward(
                grad, hidden, weight, bias, *ctx.grid, with_output=need[3], fc2_weight=fc2_weight)
        elif need[3]:
            out = compiled_ext().conv_glu_gate_forward(hidden, weight, bias, *ctx.grid)
        grad_fc2_weight = rows.t() @ out.reshape(-1, out.shape[-1]) if need[3] else None
        return (grad_hidden if need[0] else None, grad_weight if need[1] else None,
                grad_bias if need[2] else None, grad_fc2_weight, grad_fc2_bias, None, None)


def conv_glu_gate_linear(hidden: Tensor,
                         weight: Tensor,
                         bias: Tensor,
                         fc2_weight: Tensor,
                         fc2_bias: Optional[Tensor],
                         height: int,
                         width: int,
                         impl: str = 'auto') -> Tensor:
    """``F.linear(conv_glu_gate(hidden, weight, bias, ...), fc2_weight, fc2_bias)``: in eager
    training with the compiled gate
    (:func:`transnext_mm.ops.dispatch.conv_glu_recomputes_gate`) one autograd step that saves
    only ``hidden`` and recomputes the gate's output in the backward; elsewhere the two steps.

    Args:
        impl (str): As for :func:`conv_glu_gate`. Defaults to 'auto'.
    """
    params = (weight, bias, fc2_weight) + (() if fc2_bias is None else (fc2_bias, ))
    if conv_glu_recomputes_gate(impl, hidden, params):
        dtype = hidden.dtype
        return _GateLinear.apply(hidden, weight.to(dtype), bias.to(dtype), fc2_weight.to(dtype),
                                 None if fc2_bias is None else fc2_bias.to(dtype), height, width)
    return F.linear(conv_glu_gate(hidden, weight, bias, height, width, impl), fc2_weight, fc2_bias)


def conv_glu_gate(hidden: Tensor,
                  weight: Tensor,
                  bias: Tensor,
                  height: int,
                  width: int,
                  impl: str = 'auto') -> Tensor:
    """The convolutional GLU's gate (see the module docstring).

    Args:
        impl (str): ``'auto'`` / ``'op'`` use the compiled kernels where they apply (CPU
            fp32 / fp64, no autocast) and PyTorch elsewhere; if it applies but is not
            built, ``'auto'`` warns once and uses PyTorch, ``'op'`` raises a RuntimeError
            (:func:`transnext_mm.ops.dispatch.select`); ``'torch'`` / ``'reference'`` always use
            PyTorch. Defaults to 'auto'.
    """
    if select('conv_glu_gate', impl, hidden, (weight, bias)) == 'op':
        return conv_glu_gate_op(hidden, weight.to(hidden.dtype), bias.to(hidden.dtype), height,
                                width)
    return conv_glu_gate_torch(hidden, weight, bias, height, width)
