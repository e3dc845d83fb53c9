# Copyright (c) transnext-mm contributors. All rights reserved.
"""Log-spaced continuous position bias (log-CPB) for TransNeXt's pooled and full attention.

Key coordinates are the query coordinates ``0..n-1`` average-pooled to the key grid. Per axis
``delta = (q - k) / (P - 1) * 8`` with ``P`` the pretraining feature size of the stage, mapped to
``sign(delta) * log2(|delta| + 1) / log2(8)``; a 2-512-heads MLP gives the bias per head.

The bias is separable in its inputs: it only depends on the pair (delta_h, delta_w). So the MLP
is evaluated once on the grid of unique per-axis deltas and gathered into the (heads, N, Np)
bias, which gives exactly the values of evaluating it on every unique 2-D pair.
"""
import functools
import math
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

POS_BIAS_MODES = ('interpolate', 'extrapolate')
Size = Tuple[int, int]


@functools.lru_cache(maxsize=256)
def _axis_table_cpu(query_len: int, key_len: int,
                    pretrain_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    query = torch.arange(query_len, dtype=torch.float32)
    key = F.adaptive_avg_pool1d(query[None, None], key_len)[0, 0]
    delta = (query[:, None] - key[None, :]) / (pretrain_len - 1) * 8
    values, index = torch.unique(delta, return_inverse=True)
    coords = torch.sign(values) * torch.log2(values.abs() + 1.0) / math.log2(8)
    return coords, index


_axis_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def log_cpb_axis_table(query_len: int, key_len: int, pretrain_len: int,
                       device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unique log-spaced coordinates of one axis and the (query_len, key_len) index into them.

    Cached per size and device: coordinate tables are never rebuilt by a block.
    """
    key = (query_len, key_len, pretrain_len, str(device))
    table = _axis_cache.get(key)
    if table is None:
        table = tuple(t.to(device) for t in _axis_table_cpu(query_len, key_len, pretrain_len))
        _axis_cache[key] = table
    return table


def log_cpb_bias(fc1: nn.Linear, fc2: nn.Linear, query_size: Size, key_size: Size,
                 pretrain_len: int) -> torch.Tensor:
    """Evaluate log-CPB for a query grid against a key grid.

    Returns:
        Tensor: bias of shape (heads, Hq*Wq, Hk*Wk).
    """
    device = fc1.weight.device
    coords_h, index_h = log_cpb_axis_table(query_size[0], key_size[0], pretrain_len, device)
    coords_w, index_w = log_cpb_axis_table(query_size[1], key_size[1], pretrain_len, device)
    grid = torch.stack(torch.meshgrid(coords_h, coords_w, indexing='ij'), dim=-1)
    table = fc2(F.relu(fc1(grid.to(fc1.weight.dtype)))).permute(2, 0, 1)  # (heads, Uh, Uw)
    bias = table[:, index_h[:, None, :, None], index_w[None, :, None, :]]  # (heads, Hq, Wq, Hk, Wk)
    heads = bias.shape[0]
    return bias.reshape(heads, query_size[0] * query_size[1], key_size[0] * key_size[1])


def resize_bias(bias: torch.Tensor, table_query: Size, table_key: Size, query_size: Size,
                key_size: Size) -> torch.Tensor:
    """Bilinearly resize a tabulated bias, first over the key grid, then over the query grid."""
    heads = bias.shape[0]
    if tuple(table_key) != tuple(key_size):
        bias = F.interpolate(bias.reshape(1, -1, *table_key), size=key_size, mode='bilinear',
                             align_corners=False)
    num_keys = key_size[0] * key_size[1]
    if tuple(table_query) != tuple(query_size):
        bias = bias.reshape(heads, *table_query, num_keys).permute(0, 3, 1, 2)
        bias = F.interpolate(bias.reshape(1, heads * num_keys, *table_query), size=query_size,
                             mode='bilinear', align_corners=False)
        bias = bias.reshape(heads, num_keys, -1).transpose(1, 2).contiguous()
    return bias.reshape(heads, query_size[0] * query_size[1], num_keys)


_cache_enabled = True


def set_pos_bias_cache(enabled: bool) -> bool:
    """Enable or disable eval-mode caching of computed biases; returns the previous setting.

    Only benchmarks turn it off, to measure a baseline that recomputes the bias in every block.
    """
    global _cache_enabled
    previous, _cache_enabled = _cache_enabled, bool(enabled)
    return previous


class LogCPB:
    """Computes (and in eval mode caches) the log-CPB bias of one attention layer.

    A plain object, not a module, so that the MLP keeps the released checkpoint's names
    (``attn.cpb_fc1``, ``attn.cpb_fc2``) on the attention layer that owns it.

    Args:
        mode (str): 'interpolate' tabulates the bias at ``table_query`` x ``table_key`` and resizes
            it to the actual grids; 'extrapolate' evaluates log-CPB at the actual grids.
        table_query (tuple[int]): query grid of the table (``img_size // stride``).
        table_key (tuple[int]): key grid of the table (``img_size // 32``).
        pretrain_len (int): the stage's feature size at pretraining (``pretrain_size // stride``).
    """

    def __init__(self, mode: str, table_query: Size, table_key: Size, pretrain_len: int):
        if mode not in POS_BIAS_MODES:
            raise ValueError(f'pos_bias_mode must be one of {POS_BIAS_MODES}, got {mode!r}')
        if pretrain_len < 2:
            raise ValueError(f'pretrain_size gives a feature size of {pretrain_len} (< 2) in '
                             'some stage; pretrain_size must be at least 64')
        self.mode = mode
        self.table_query = tuple(table_query)
        self.table_key = tuple(table_key)
        self.pretrain_len = pretrain_len
        self._cache: Dict[tuple, Tuple[tuple, torch.Tensor]] = {}

    def clear_cache(self) -> None:
        self._cache.clear()

    @staticmethod
    def _weights_signature(fc1: nn.Linear, fc2: nn.Linear) -> tuple:
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return tuple((p._version, p.data_ptr(), p.dtype) for p in params)

    def compute(self, fc1: nn.Linear, fc2: nn.Linear, query_size: Size,
                key_size: Size) -> torch.Tensor:
        if self.mode == 'extrapolate':
            return log_cpb_bias(fc1, fc2, query_size, key_size, self.pretrain_len)
        bias = log_cpb_bias(fc1, fc2, self.table_query, self.table_key, self.pretrain_len)
        return resize_bias(bias, self.table_query, self.table_key, query_size, key_size)

    def __call__(self, fc1: nn.Linear, fc2: nn.Linear, query_size: Size, key_size: Size,
                 training: bool) -> torch.Tensor:
        # Cache only what no gradient can flow through: eval mode and no grad wanted by the MLP.
        cacheable = _cache_enabled and not training and not (
            torch.is_grad_enabled() and fc1.weight.requires_grad)
        if not cacheable:
            return self.compute(fc1, fc2, tuple(query_size), tuple(key_size))
        key = (tuple(query_size), tuple(key_size))
        signature = self._weights_signature(fc1, fc2)
        hit = self._cache.get(key)
        if hit is not None and hit[0] == signature:
            return hit[1]
        if hit is None and len(self._cache) >= 8:  # many test sizes: keep memory bounded
            self._cache.pop(next(iter(self._cache)))
        bias = self.compute(fc1, fc2, tuple(query_size), tuple(key_size)).detach()
        self._cache[key] = (signature, bias)
        return bias
