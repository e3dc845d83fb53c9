# Copyright (c) transnext-mm contributors. All rights reserved.
"""Window size, argument checks and the dtype rule shared by every implementation of the
aggregated-attention core (see :mod:`transnext_mm.ops.aggregated_attention` for the formula and
shapes)."""
from typing import NamedTuple

import torch
from torch import Tensor

WINDOW = 3
WINDOW_AREA = WINDOW * WINDOW


class PoolBiasTable(NamedTuple):
    """The pooled-path bias in table form: a table and per-axis offsets into it.

    Entry ``(i, p)`` of head ``h``, for query ``i`` at ``(y, x)`` of the H x W grid and pooled key
    ``p`` at ``(py, px)`` of the Hk x Wk pooled grid, is
    ``table[h, index_rows[y, py] + index_cols[x, px]]``. A bias that is a function of the
    query-key offset has the log-CPB table over the per-axis offsets; one resized along one axis
    has that table gathered and resized along the axis (see
    :meth:`transnext_mm.models.layers.log_cpb.LogCPB.table_form`).

    Attributes:
        table (Tensor): (heads, table_size).
        index_rows (Tensor): (H, Hk) int64.
        index_cols (Tensor): (W, Wk) int64.
    """
    table: Tensor
    index_rows: Tensor
    index_cols: Tensor

    def dense(self) -> Tensor:
        """The materialised bias, (heads, H*W, Hk*Wk)."""
        (height, pool_h), (width, pool_w) = self.index_rows.shape, self.index_cols.shape
        index = self.index_rows[:, None, :, None] + self.index_cols[None, :, None, :]
        return self.table[:, index].reshape(self.table.shape[0], height * width, pool_h * pool_w)


def _check_bias_table(bias: PoolBiasTable, heads: int, height: int, width: int,
                      num_pool: int) -> None:
    if bias.table.dim() != 2 or bias.table.shape[0] != heads:
        raise ValueError(f'bias_pool.table must have shape ({heads}, table_size), '
                         f'got {tuple(bias.table.shape)}')
    for name, index, rows in (('index_rows', bias.index_rows, height), ('index_cols',
                                                                        bias.index_cols, width)):
        if index.dim() != 2 or index.shape[0] != rows or index.dtype != torch.int64:
            raise ValueError(f'bias_pool.{name} must be an int64 ({rows}, pooled size) tensor, '
                             f'got {index.dtype} {tuple(index.shape)}')
    if bias.index_rows.shape[1] * bias.index_cols.shape[1] != num_pool:
        raise ValueError(f'bias_pool.index_rows and index_cols give a pooled grid of '
                         f'{bias.index_rows.shape[1]}x{bias.index_cols.shape[1]}, but k_pool has '
                         f'{num_pool} pooled keys')


def check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height: int,
                           width: int) -> None:
    """Raise a ValueError naming the first argument whose shape does not fit ``q``'s.

    ``bias_pool`` is a (heads, H*W, Np) tensor or a :class:`PoolBiasTable`.
    """
    B, heads, N, d = q.shape
    if N != height * width:
        raise ValueError(f'q has {N} positions but height*width = {height}*{width}')
    expected = [('k', k, q.shape), ('v', v, q.shape), ('v_pool', v_pool, k_pool.shape),
                ('rpb_local', rpb_local, (heads, WINDOW_AREA)),
                ('token_weight', token_weight, (B, heads, N, WINDOW_AREA))]
    if isinstance(bias_pool, PoolBiasTable):
        _check_bias_table(bias_pool, heads, height, width, k_pool.shape[2])
    else:
        expected.append(('bias_pool', bias_pool, (heads, N, k_pool.shape[2])))
    for name, t, shape in expected:
        if tuple(t.shape) != tuple(shape):
            raise ValueError(f'{name} must have shape {tuple(shape)}, got {tuple(t.shape)}')
    if k_pool.shape[:2] != (B, heads) or k_pool.shape[3] != d:
        raise ValueError(f'k_pool must have shape ({B}, {heads}, Np, {d}), '
                         f'got {tuple(k_pool.shape)}')


def common_dtype(tensors, device_type: str) -> torch.dtype:
    """The one dtype the compiled op and the flex_attention path compute in: the autocast dtype
    inside an autocast region on ``device_type`` (as for a matmul), else the promoted dtype of
    ``tensors``."""
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    return dtype
