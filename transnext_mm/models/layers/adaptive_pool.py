# Copyright (c) transnext-mm contributors. All rights reserved.
"""Adaptive average pooling of token grids, in a form that stays exact when sizes are symbolic.

Adaptive pooling of ``n`` positions into ``m`` bins averages bin ``j = [s_j, e_j)`` with
``s_j = floor(j*n/m)`` and ``e_j = ceil((j+1)*n/m)``. :func:`adaptive_pool_bins` computes those
bounds with integer arithmetic on ``arange``; log-CPB derives its key coordinates from them.
"""
from typing import Tuple

import torch
import torch.nn.functional as F


def adaptive_pool_bins(length, bins, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Start and end (exclusive) of the ``bins`` windows of adaptive pooling over ``length``.

    ``length`` and ``bins`` may be symbolic sizes (traced graphs).
    """
    j = torch.arange(bins, device=device)
    if torch.compiler.is_exporting():
        # sizes as 0-d tensors: the ONNX exporter's type promotion fails on tensor-SymInt
        # arithmetic in larger graphs (UperNet), and scalar_tensor keeps the size symbolic
        length = torch.scalar_tensor(length, dtype=torch.long, device=device)
        bins = torch.scalar_tensor(bins, dtype=torch.long, device=device)
    return (j * length) // bins, ((j + 1) * length + bins - 1) // bins


def _pool_axis(x: torch.Tensor, dim: int, bins) -> torch.Tensor:
    """Adaptive average pooling of ``x`` along ``dim`` from a prefix sum: no reshape or matmul,
    whose shape checks a symbolic size cannot pass."""
    start, end = adaptive_pool_bins(x.shape[dim], bins, x.device)
    prefix = torch.cat([torch.zeros_like(x.narrow(dim, 0, 1)), x.cumsum(dim)], dim=dim)
    sums = prefix.index_select(dim, end) - prefix.index_select(dim, start)
    shape = [1] * x.dim()
    shape[dim] = -1
    return sums / (end - start).to(x.dtype).reshape(shape)


def adaptive_avg_pool2d_prefix(x: torch.Tensor, output_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of (B, C, H, W) from prefix sums at the bin bounds: exact bins
    at any traced size (exporters fix adaptive pooling's bins at the example size)."""
    out_h, out_w = (output_size, output_size) if isinstance(output_size, int) else output_size
    return _pool_axis(_pool_axis(x, 2, out_h), 3, out_w)


def _pool_grid(x: torch.Tensor, height: int, width: int, pool_size) -> torch.Tensor:
    """``F.adaptive_avg_pool2d`` of (B, H*W, C) tokens, viewed channels-last: (B, Hp*Wp, C)."""
    grid = x.reshape(x.shape[0], height, width, x.shape[2]).permute(0, 3, 1, 2)
    return F.adaptive_avg_pool2d(grid, pool_size).flatten(2).transpose(1, 2)


class _UniformBinPool(torch.autograd.Function):
    """:func:`_pool_grid` where every bin is a (H / Hp) x (W / Wp) block: the same forward, and
    the backward as that block's broadcast of ``grad / area`` in the tokens' layout (PyTorch's
    adaptive-pooling backward makes three copies of the full-size gradient on the way)."""

    @staticmethod
    def forward(ctx, x, height, width, pool_size):
        ctx.grid = (height, width, *pool_size)
        return _pool_grid(x, height, width, pool_size)

    @staticmethod
    def backward(ctx, grad):
        height, width, pool_h, pool_w = ctx.grid
        B, _, C = grad.shape
        rows, cols = height // pool_h, width // pool_w
        blocks = (grad / (rows * cols)).reshape(B, pool_h, 1, pool_w, 1, C)
        return (blocks.expand(B, pool_h, rows, pool_w, cols, C).reshape(B, height * width,
                                                                        C), None, None, None)


def adaptive_avg_pool_tokens(x: torch.Tensor, height, width, pool_size) -> torch.Tensor:
    """Average-pool (B, H*W, C) tokens of a row-major grid as ``F.adaptive_avg_pool2d``:
    (B, Hp*Wp, C).

    Eager and ``torch.compile`` run ``F.adaptive_avg_pool2d``; where the pooled grid divides the
    grid (uniform bins, e.g. every stage at 512x512) and a gradient is needed, the backward is the
    bins' broadcast (:class:`_UniformBinPool`). Under ``torch.export`` each axis is pooled from
    its prefix sum at the bin bounds instead (equal up to rounding): exporters decompose adaptive
    pooling into gathers whose bins are fixed at the example size, wrong at any other size.
    """
    if torch.compiler.is_exporting():
        grid = x.reshape(x.shape[0], height, width, x.shape[2])
        pooled = _pool_axis(_pool_axis(grid, 1, pool_size[0]), 2, pool_size[1])
        return pooled.flatten(1, 2)
    pool_h, pool_w = pool_size
    if (x.requires_grad and torch.is_grad_enabled() and isinstance(height, int)
            and isinstance(width, int) and height % pool_h == 0 and width % pool_w == 0):
        return _UniformBinPool.apply(x, height, width, (pool_h, pool_w))
    return _pool_grid(x, height, width, pool_size)
