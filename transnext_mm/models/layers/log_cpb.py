# Copyright (c) transnext-mm contributors. All rights reserved.
"""Log-spaced continuous position bias (log-CPB) for TransNeXt's pooled and full attention.

Key coordinates are the query coordinates ``0..n-1`` average-pooled to the key grid. Per axis
``delta = (q - k) / (P - 1) * 8`` with ``P`` the pretraining feature size of the stage, mapped to
``sign(delta) * log2(|delta| + 1) / log2(8)``; a 2-512-heads MLP gives the bias per head.

Two facts keep this cheap. The bias only depends on the pair (delta_h, delta_w), so the MLP is
evaluated once on the grid of unique per-axis deltas (``U_h x U_w`` points), which gives exactly
the values of evaluating it on every unique 2-D pair. And everything after the MLP is linear and
separable per axis: gathering the table entries of each (query, key) pair and, in interpolation
mode, bilinearly resizing the table (first over the key grid, then over the query grid) is one
sparse matrix per axis, ``A_h`` of shape (Hq*Hk, U_h) and ``A_w`` of shape (Wq*Wk, U_w), with at
most 4 non-zeros a row. So ``bias = A_h M A_w^T`` (per head) costs a few passes over the output,
never materialises the tabulated bias, and is cached per size and device like the coordinates.
"""
import functools
import math
import os
from collections import OrderedDict
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

POS_BIAS_MODES = ('interpolate', 'extrapolate')
Size = Tuple[int, int]


@functools.lru_cache(maxsize=256)
def _axis_table_cpu(query_len: int, key_len: int,
                    pretrain_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Unique log-spaced coordinates of one axis and the (query_len, key_len) index into them."""
    query = torch.arange(query_len, dtype=torch.float32)
    key = F.adaptive_avg_pool1d(query[None, None], key_len)[0, 0]
    delta = (query[:, None] - key[None, :]) / (pretrain_len - 1) * 8
    values, index = torch.unique(delta, return_inverse=True)
    coords = torch.sign(values) * torch.log2(values.abs() + 1.0) / math.log2(8)
    return coords, index


def _linear_resize_matrix(in_len: int, out_len: int) -> torch.Tensor:
    """(out_len, in_len) weights of 1-D linear resizing, align_corners=False (as F.interpolate)."""
    if in_len == out_len:
        return torch.eye(in_len)
    return F.interpolate(torch.eye(in_len)[None], size=out_len, mode='linear',
                         align_corners=False)[0].t()


@functools.lru_cache(maxsize=256)
def _axis_operator_cpu(query_len: int, key_len: int, table_query: int, table_key: int,
                       pretrain_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """Coordinates of one axis and its sparse (query_len*key_len, U) gather-and-resize matrix."""
    coords, index = _axis_table_cpu(table_query, table_key, pretrain_len)
    resize_q = _linear_resize_matrix(table_query, query_len)
    resize_k = _linear_resize_matrix(table_key, key_len)
    rows_q, cols_q = resize_q.nonzero(as_tuple=True)
    rows_k, cols_k = resize_k.nonzero(as_tuple=True)
    weight_q, weight_k = resize_q[rows_q, cols_q], resize_k[rows_k, cols_k]
    rows = (rows_q[:, None] * key_len + rows_k[None, :]).flatten()
    cols = index[cols_q[:, None], cols_k[None, :]].flatten()
    values = (weight_q[:, None] * weight_k[None, :]).flatten()
    operator = torch.sparse_coo_tensor(torch.stack([rows, cols]), values,
                                       (query_len * key_len, coords.numel()),
                                       check_invariants=True).coalesce()
    return coords, operator


_axis_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def log_cpb_axis_operator(query_len: int, key_len: int, table_query: int, table_key: int,
                          pretrain_len: int,
                          device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per-axis coordinates and sparse operator (see the module docstring) on ``device``.

    Cached per sizes and device: no block rebuilds them.
    """
    key = (query_len, key_len, table_query, table_key, pretrain_len, str(device))
    entry = _axis_cache.get(key)
    if entry is None:
        entry = tuple(t.to(device) for t in _axis_operator_cpu(
            query_len, key_len, table_query, table_key, pretrain_len))
        _axis_cache[key] = entry
    return entry


def log_cpb_bias(fc1: nn.Linear, fc2: nn.Linear, query_size: Size, key_size: Size,
                 pretrain_len: int, table_query: Size = None,
                 table_key: Size = None) -> torch.Tensor:
    """Evaluate log-CPB for a query grid against a key grid.

    Args:
        fc1 (nn.Linear): The 2 -> hidden layer of the MLP.
        fc2 (nn.Linear): The hidden -> heads layer of the MLP.
        query_size (tuple[int]): Query grid (H, W).
        key_size (tuple[int]): Key grid (Hk, Wk).
        pretrain_len (int): The stage's feature size at pretraining.
        table_query (tuple[int], optional): Query grid of the table to resize from
            (interpolation mode). Defaults to None: evaluate at ``query_size``.
        table_key (tuple[int], optional): Key grid of that table. Defaults to None.

    Returns:
        Tensor: float32 bias of shape (heads, H*W, Hk*Wk).
    """
    table_query = tuple(table_query or query_size)
    table_key = tuple(table_key or key_size)
    device = fc1.weight.device
    coords_h, op_h = log_cpb_axis_operator(query_size[0], key_size[0], table_query[0],
                                           table_key[0], pretrain_len, device)
    coords_w, op_w = log_cpb_axis_operator(query_size[1], key_size[1], table_query[1],
                                           table_key[1], pretrain_len, device)
    table = log_cpb_table(fc1, fc2, coords_h, coords_w)
    return apply_axis_operators(table, op_h, op_w, query_size, key_size)


def log_cpb_table(fc1: nn.Linear, fc2: nn.Linear, coords_h: torch.Tensor,
                  coords_w: torch.Tensor) -> torch.Tensor:
    """The MLP on every (coords_h[i], coords_w[j]) pair: float32 (U_h, U_w, heads)."""
    grid = torch.stack(torch.meshgrid(coords_h, coords_w, indexing='ij'), dim=-1)
    return fc2(F.relu(fc1(grid.to(fc1.weight.dtype)))).float()


def apply_axis_operators(table: torch.Tensor, op_h: torch.Tensor, op_w: torch.Tensor,
                         query_size: Size, key_size: Size) -> torch.Tensor:
    """Gather (and resize) a (U_h, U_w, heads) table into the (heads, N, Nk) bias."""
    num_h, num_w, heads = table.shape
    # In float32 also under autocast: autocast would run the sparse products' backward in the
    # low precision against the float32 operators and fail.
    with torch.autocast(table.device.type, enabled=False):
        # h axis: (Hq*Hk, U_h) @ (U_h, U_w*heads); w axis: (Wq*Wk, U_w) @ (U_w, Hq*Hk*heads)
        bias = torch.sparse.mm(op_h, table.reshape(num_h, num_w * heads))
        bias = bias.reshape(-1, num_w, heads).transpose(0, 1).reshape(num_w, -1)
        bias = torch.sparse.mm(op_w, bias)
    bias = bias.reshape(query_size[1], key_size[1], query_size[0], key_size[0], heads)
    return bias.permute(4, 2, 0, 3, 1).reshape(heads, query_size[0] * query_size[1],
                                               key_size[0] * key_size[1])


_cache_enabled = True
# Eval-mode biases of all layers share one LRU with a byte budget: multi-scale testing meets many
# sizes, and one stage-1 bias at a large test size takes hundreds of MB.
CACHE_BUDGET_BYTES = int(os.environ.get('TRANSNEXT_MM_BIAS_CACHE_MB', '2048')) * 2**20
_bias_cache: 'OrderedDict[tuple, Tuple[tuple, torch.Tensor]]' = OrderedDict()
_bias_cache_bytes = 0


def set_pos_bias_cache(enabled: bool) -> bool:
    """Enable or disable eval-mode caching of computed biases; returns the previous setting.

    Only benchmarks turn it off, to measure a baseline that recomputes the bias in every block.
    """
    global _cache_enabled
    previous, _cache_enabled = _cache_enabled, bool(enabled)
    if not _cache_enabled:
        _evict(lambda key: True)
    return previous


def _evict(predicate) -> None:
    global _bias_cache_bytes
    for key in [k for k in _bias_cache if predicate(k)]:
        _bias_cache_bytes -= _nbytes(_bias_cache.pop(key)[1])


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


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

    def clear_cache(self) -> None:
        _evict(lambda key: key[0] == id(self))

    def cached_sizes(self) -> list:
        """The (query, key) grids whose bias this layer holds in the eval cache."""
        return [key[1:] for key in _bias_cache if key[0] == id(self) and key[1] != 'table']

    @staticmethod
    def _weights_signature(fc1: nn.Linear, fc2: nn.Linear) -> tuple:
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return tuple((p._version, p.data_ptr(), p.dtype) for p in params)

    def compute(self, fc1: nn.Linear, fc2: nn.Linear, query_size: Size,
                key_size: Size) -> torch.Tensor:
        if self.mode == 'extrapolate':
            return log_cpb_bias(fc1, fc2, query_size, key_size, self.pretrain_len)
        return log_cpb_bias(fc1, fc2, query_size, key_size, self.pretrain_len,
                            self.table_query, self.table_key)

    def _cached_table_bias(self, fc1, fc2, query_size: Size, key_size: Size,
                           signature: tuple) -> torch.Tensor:
        """Interpolation mode in eval: the MLP table does not depend on the input size, so it
        is evaluated once per weights and only gathered and resized for each new size."""
        coords_h, op_h = log_cpb_axis_operator(*self._axis_args(0, query_size, key_size, fc1))
        coords_w, op_w = log_cpb_axis_operator(*self._axis_args(1, query_size, key_size, fc1))
        key = (id(self), 'table')
        hit = _bias_cache.get(key)
        if hit is None or hit[0] != signature:
            hit = (signature, log_cpb_table(fc1, fc2, coords_h, coords_w).detach())
            self._store(key, hit)
        return apply_axis_operators(hit[1], op_h, op_w, query_size, key_size)

    def _axis_args(self, axis: int, query_size: Size, key_size: Size, fc1: nn.Linear) -> tuple:
        return (query_size[axis], key_size[axis], self.table_query[axis], self.table_key[axis],
                self.pretrain_len, fc1.weight.device)

    @staticmethod
    def _store(key: tuple, entry: tuple) -> None:
        global _bias_cache_bytes
        _evict(lambda k: k == key)
        size = _nbytes(entry[1])
        if size > CACHE_BUDGET_BYTES:
            return
        while _bias_cache and _bias_cache_bytes + size > CACHE_BUDGET_BYTES:
            _bias_cache_bytes -= _nbytes(_bias_cache.popitem(last=False)[1][1])
        _bias_cache[key] = entry
        _bias_cache_bytes += size

    def __call__(self, fc1: nn.Linear, fc2: nn.Linear, query_size: Size, key_size: Size,
                 training: bool) -> torch.Tensor:
        query_size, key_size = tuple(query_size), tuple(key_size)
        # Cache only what no gradient can flow through: eval mode and no grad wanted by the MLP.
        cacheable = _cache_enabled and not training and not (
            torch.is_grad_enabled() and fc1.weight.requires_grad)
        if not cacheable:
            return self.compute(fc1, fc2, query_size, key_size)
        key = (id(self), query_size, key_size)
        signature = self._weights_signature(fc1, fc2)
        hit = _bias_cache.get(key)
        if hit is not None and hit[0] == signature:
            _bias_cache.move_to_end(key)
            return hit[1]
        if self.mode == 'interpolate':
            bias = self._cached_table_bias(fc1, fc2, query_size, key_size, signature)
        else:
            bias = self.compute(fc1, fc2, query_size, key_size).detach()
        self._store(key, (signature, bias))
        return bias

    def __del__(self):
        try:
            self.clear_cache()
        except Exception:  # interpreter shutdown
            pass
