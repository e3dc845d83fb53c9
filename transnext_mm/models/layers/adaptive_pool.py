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


def adaptive_avg_pool_tokens(x: torch.Tensor, height, width, pool_size) -> torch.Tensor:
    """Average-pool (B, H*W, C) tokens of a row-major grid as ``F.adaptive_avg_pool2d``:
    (B, Hp*Wp, C).

    Eager and ``torch.compile`` run ``F.adaptive_avg_pool2d``. Under ``torch.export`` each axis
    is pooled from its prefix sum at the bin bounds instead (equal up to rounding): exporters
    decompose adaptive pooling into gathers whose bins are fixed at the example size, wrong at
    any other size.
    """
    B, _, C = x.shape
    grid = x.reshape(B, height, width, C)
    if torch.compiler.is_exporting():
        pooled = _pool_axis(_pool_axis(grid, 1, pool_size[0]), 2, pool_size[1])
        return pooled.flatten(1, 2)
    return F.adaptive_avg_pool2d(grid.permute(0, 3, 1, 2), pool_size).flatten(2).transpose(1, 2)
