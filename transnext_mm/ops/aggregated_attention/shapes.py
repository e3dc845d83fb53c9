# Copyright (c) transnext-mm contributors. All rights reserved.
"""Window size, argument checks and the dtype rule shared by every implementation of the
aggregated-attention core (see :mod:`transnext_mm.ops.aggregated_attention` for the formula and
shapes)."""
from typing import NamedTuple, Optional

import torch
from torch import Tensor

WINDOW = 3
WINDOW_AREA = WINDOW * WINDOW


class PoolBiasTable(NamedTuple):
    """The pooled-path bias in table form: a table and per-axis offsets into it.

    Entry ``(i, p)`` of head ``h``, for query ``i`` at ``(y, x)`` of the H x W grid and pooled key
    ``p`` at ``(py, px)`` of the Hk x Wk pooled grid, is
    ``table[h, index_rows[y, py] + index_cols[x, px]]``, or with ``row_weights`` a weighted sum
    over taps ``k``: ``sum_k row_weights[k, y, py] * table[h, index_rows[k, y, py] +
    index_cols[x, px]]``. A bias that is a function of the query-key offset has the log-CPB
    table over the per-axis offsets; one resized along one axis has that table gathered and
    resized along the axis; one resized along both has the width folded into the table and the
    height's bilinear taps as row taps (see
    :meth:`transnext_mm.models.layers.log_cpb.LogCPB.table_form`).

    Attributes:
        table (Tensor): (heads, table_size).
        index_rows (Tensor): (H, Hk) int64, or (taps, H, Hk) with ``row_weights``.
        index_cols (Tensor): (W, Wk) int64.
        row_weights (Tensor, optional): (taps, H, Hk) floating point, the taps' weights (the
            compiled op computes in float32, float64 for float64 inputs). Defaults to None: one
            tap of weight 1.
    """
    table: Tensor
    index_rows: Tensor
    index_cols: Tensor
    row_weights: Optional[Tensor] = None

    def dense(self) -> Tensor:
        """The materialised bias, (heads, H*W, Hk*Wk)."""
        rows = self.index_rows if self.row_weights is not None else self.index_rows[None]
        (_, height, pool_h), (width, pool_w) = rows.shape, self.index_cols.shape
        index = rows[:, :, None, :, None] + self.index_cols[None, None, :, None, :]
        bias = self.table[:, index]  # (heads, taps, H, W, Hk, Wk)
        if self.row_weights is None:
            bias = bias[:, 0]
        else:
            weights = self.row_weights.to(bias.dtype)[:, :, None, :, None]
            bias = (bias * weights).sum(1)
        return bias.reshape(self.table.shape[0], height * width, pool_h * pool_w)


def _check_bias_table(bias: PoolBiasTable, heads: int, height: int, width: int,
                      num_pool: int) -> None:
    if bias.table.dim() != 2 or bias.table.shape[0] != heads:
        raise ValueError(f'bias_pool.table must have shape ({heads}, table_size), '
                         f'got {tuple(bias.table.shape)}')
    taps = bias.row_weights is not None
    for name, index, rows, lead in (('index_rows', bias.index_rows, height, 'taps, ' * taps),
                                    ('index_cols', bias.index_cols, width, '')):
        if index.dim() != 2 + bool(lead) or index.shape[-2] != rows or index.dtype != torch.int64:
            raise ValueError(f'bias_pool.{name} must be an int64 ({lead}{rows}, pooled size) '
                             f'tensor, got {index.dtype} {tuple(index.shape)}')
    if taps and (bias.row_weights.shape != bias.index_rows.shape
                 or not bias.row_weights.is_floating_point() or bias.index_rows.shape[0] == 0):
        raise ValueError('bias_pool.row_weights must be a floating-point tensor of index_rows\' '
                         f'shape {tuple(bias.index_rows.shape)} with at least one tap, got '
                         f'{bias.row_weights.dtype} {tuple(bias.row_weights.shape)}')
    if bias.index_rows.shape[-1] * bias.index_cols.shape[1] != num_pool:
        raise ValueError(f'bias_pool.index_rows and index_cols give a pooled grid of '
                         f'{bias.index_rows.shape[-1]}x{bias.index_cols.shape[1]}, but k_pool has '
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
