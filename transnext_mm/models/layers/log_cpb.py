# Copyright (c) transnext-mm contributors. All rights reserved.
"""Log-spaced continuous position bias (log-CPB) for TransNeXt's pooled and full attention.

Per axis, the key coordinates are the query coordinates ``0..n-1`` average-pooled into ``m``
bins. Adaptive pooling's bin ``j`` covers ``[s_j, e_j)`` with ``s_j = floor(j*n/m)`` and
``e_j = ceil((j+1)*n/m)``, so ``k_j = (s_j + e_j - 1) / 2`` and the doubled offset
``2*(q - k_j)`` is an integer in ``[-(2n-2), 2n-2]``. With ``P`` the stage's pretraining feature
size, ``delta = (q - k) / (P - 1) * 8`` is mapped to ``sign(delta) * log2(|delta| + 1) / log2(8)``,
and a 2-512-heads MLP gives the bias per head.

The bias only depends on the pair of per-axis offsets, so the MLP is evaluated on a table over
the per-axis offset values (``U_h x U_w`` points) and every (query, key) pair gathers its entry
with integer indices. In eager mode the table holds only the offsets that occur
(``torch.unique``, computed once per size and device); when traced (``torch.compile``,
``torch.export``) it holds all ``4n - 3`` candidates, whose indices are computed from ``arange``
in the graph, so sizes stay symbolic and no Python-side cache is consulted. Both give the same
value at every pair (the MLP sees the same inputs).

Interpolation mode tabulates the bias at fixed grids (``img_size``) and resizes it bilinearly
(``align_corners=False``), first over the key grid, then over the query grid (as traced graphs
do it, with ``F.interpolate``). The resizes are separable, so eager mode applies the same weights
axis by axis (:func:`interpolated_bias`): the width's query and key resize on the small MLP table
(products with :func:`bilinear_matrix`), then the height's on the gathered rows.

The bias can also be handed over in table form (:class:`PoolBiasTable`: a table and per-axis
indices) to attention kernels that gather it themselves, at any size:

- a function of the offset (extrapolation at any size, interpolation at the table's own grids):
  the MLP table and the per-axis indices;
- interpolation where one axis keeps the table's grids and the other is resized (e.g. a
  detector's 800x1344 input with ``img_size`` 800): the MLP table gathered and resized along the
  resized axis only (:func:`fold_resized_axis`), a table of ``U x Hq*Hk`` (or ``U x Wq*Wk``)
  entries per head instead of the ``Hq*Wq x Hk*Wk`` dense bias;
- interpolation with both axes resized (e.g. 768x1344 with ``img_size`` 800): the width folded
  in as above, and the height's bilinear resize as row taps (:func:`resized_row_taps`): each
  entry the weighted sum of up to four table entries, two query-row taps times two key-row taps.
"""
import contextlib
import functools
import math
import os
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from transnext_mm.ops.aggregated_attention import PoolBiasTable
from transnext_mm.ops.dispatch import check_impl, log_cpb_mlp_impl
from transnext_mm.ops.log_cpb_mlp import log_cpb_mlp_op
from .adaptive_pool import adaptive_pool_bins

POS_BIAS_MODES = ('interpolate', 'extrapolate')
BIAS_FORMS = ('dense', 'table')
Size = Tuple[int, int]


def _concrete(*sizes) -> bool:
    """Whether this runs eagerly on concrete sizes: not traced by ``torch.compile`` /
    ``torch.export`` and every size a Python int (not symbolic)."""
    return not torch.compiler.is_compiling() and all(isinstance(n, int) for n in sizes)


def doubled_offsets(query_len, key_len, device=None) -> torch.Tensor:
    """``2 * (q - k_j)`` of one axis: (query_len, key_len) int64 in ``[-(2n-2), 2n-2]``."""
    start, end = adaptive_pool_bins(query_len, key_len, device)
    return 2 * torch.arange(query_len, device=device)[:, None] - (start + end - 1)


def log_spaced_coords(doubled: torch.Tensor, pretrain_len: int) -> torch.Tensor:
    """The MLP input of one axis for doubled offsets: float32 ``sign(d) log2(|d|+1) / 3``."""
    delta = doubled.float() / 2 / (pretrain_len - 1) * 8
    return torch.sign(delta) * torch.log2(delta.abs() + 1.0) / math.log2(8)


@functools.lru_cache(maxsize=256)
def _compact_axis_cpu(query_len: int, key_len: int,
                      pretrain_len: int) -> Tuple[torch.Tensor, torch.Tensor]:
    values, index = torch.unique(doubled_offsets(query_len, key_len), return_inverse=True)
    return log_spaced_coords(values, pretrain_len), index


_axis_cache: Dict[tuple, Tuple[torch.Tensor, torch.Tensor]] = {}


def log_cpb_axis(query_len, key_len, pretrain_len: int,
                 device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """MLP coordinates of one axis, (U,) float32, and each pair's index into them, (n, m) int64.

    Eager: the offsets that occur, cached per sizes and device. Traced (or symbolic sizes): all
    ``4n - 3`` candidates, computed in the graph.
    """
    if not _concrete(query_len, key_len):
        span = 2 * query_len - 2
        candidates = torch.arange(-span, span + 1, device=device)
        return (log_spaced_coords(candidates,
                                  pretrain_len), doubled_offsets(query_len, key_len, device) + span)
    key = (query_len, key_len, pretrain_len, str(device))
    entry = _axis_cache.get(key)
    if entry is None:
        # Normal tensors even under torch.inference_mode: later training steps use them too.
        with torch.inference_mode(False):
            entry = tuple(t.to(device) for t in _compact_axis_cpu(query_len, key_len, pretrain_len))
        _axis_cache[key] = entry
    return entry


# The least recently used grids go first when full: multi-scale training meets many grid pairs.
TABLE_INDEX_CACHE_SIZE = 256
TableIndices = Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]
_table_index_cache: 'OrderedDict[tuple, TableIndices]' = OrderedDict()


def table_form_indices(index_h: torch.Tensor, index_w: torch.Tensor, table_w: int,
                       resized: Tuple[int, ...], query_size: Size, key_size: Size,
                       axes_key: tuple) -> TableIndices:
    """``(index_rows, index_cols, row_weights)`` of :meth:`LogCPB.table_form` from the axes'
    indices into the MLP table (U_h, U_w); ``resized``: the axes resized, whose (query, key)
    pairs then index the folded table.

    Unresized: rows step over U_w entries. Rows resized, table (Hq * Hk, U_w): the row pairs
    step over U_w entries. Columns resized, table (U_h, Wq * Wk): rows step over Wq * Wk. Both
    resized, the same table: the rows' bilinear taps (:func:`resized_row_taps`). ``row_weights``
    is None except with taps.

    Eager: cached per grids (``axes_key``: what decides ``index_h`` / ``index_w``; the
    :data:`TABLE_INDEX_CACHE_SIZE` most recently used), so that every step hands the op the
    same tensors and the op checks their bounds once (a read back from the device, see the op's
    input checks).
    """

    def pairs(axis):
        query_len, key_len = query_size[axis], key_size[axis]
        return torch.arange(query_len * key_len, device=index_h.device).view(query_len, key_len)

    def build():
        if not resized:
            return index_h * table_w, index_w, None
        if resized == (0, ):
            return pairs(0) * table_w, index_w, None
        columns = query_size[1] * key_size[1]
        if resized == (1, ):
            return index_h * columns, pairs(1), None
        rows, weights = resized_row_taps(index_h, query_size[0], key_size[0], columns)
        return rows, pairs(1), weights

    if not _concrete(*query_size, *key_size):
        return build()
    key = (axes_key, resized, tuple(query_size), tuple(key_size))
    entry = _table_index_cache.get(key)
    if entry is not None:
        _table_index_cache.move_to_end(key)
        return entry
    # Normal tensors even under torch.inference_mode (see log_cpb_axis).
    with torch.inference_mode(False):
        entry = build()
    _table_index_cache[key] = entry
    if len(_table_index_cache) > TABLE_INDEX_CACHE_SIZE:
        _table_index_cache.popitem(last=False)
    return entry


# Points per chunk of the chunked MLP: a (rows, 512) hidden block of 1 MB stays in cache.
MLP_CHUNK_ROWS = 512


class _ChunkedMLP(torch.autograd.Function):
    """``fc2(relu(fc1(points)))`` over chunks of points: the (points, hidden) activations are
    never held in full, and the backward recomputes each chunk's hidden block instead of saving
    it (a stage-1 table at 512x512 has 61k points: 126 MB of hidden activations per layer)."""

    @staticmethod
    def forward(ctx, points, weight1, bias1, weight2, bias2):
        out = points.new_empty(points.shape[0], weight2.shape[0])
        for r0 in range(0, points.shape[0], MLP_CHUNK_ROWS):
            hidden = torch.addmm(bias1, points[r0:r0 + MLP_CHUNK_ROWS], weight1.t()).relu_()
            torch.addmm(bias2, hidden, weight2.t(), out=out[r0:r0 + MLP_CHUNK_ROWS])
        ctx.save_for_backward(points, weight1, bias1, weight2)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        points, weight1, bias1, weight2 = ctx.saved_tensors
        grad_w1, grad_b1 = torch.zeros_like(weight1), torch.zeros_like(bias1)
        grad_w2 = torch.zeros_like(weight2)
        grad_points = torch.zeros_like(points) if ctx.needs_input_grad[0] else None
        for r0 in range(0, points.shape[0], MLP_CHUNK_ROWS):
            x = points[r0:r0 + MLP_CHUNK_ROWS]
            grad = grad_out[r0:r0 + MLP_CHUNK_ROWS]
            hidden = torch.addmm(bias1, x, weight1.t()).relu_()
            grad_w2.addmm_(grad.t(), hidden)
            grad_hidden = (grad @ weight2).mul_(hidden > 0)
            grad_w1.addmm_(grad_hidden.t(), x)
            grad_b1 += grad_hidden.sum(0)
            if grad_points is not None:
                grad_points[r0:r0 + MLP_CHUNK_ROWS] = grad_hidden @ weight1
        return grad_points, grad_w1, grad_b1, grad_w2, grad_out.sum(0)


def log_cpb_mlp(fc1: nn.Linear,
                fc2: nn.Linear,
                points: torch.Tensor,
                impl: str = 'auto') -> torch.Tensor:
    """``fc2(relu(fc1(points)))`` for (P, 2) points: the compiled op or the chunked MLP where
    :func:`transnext_mm.ops.dispatch.log_cpb_mlp_impl` says so for ``impl`` (one of
    :data:`transnext_mm.ops.dispatch.IMPLS`; same values)."""
    points = points.to(fc1.weight.dtype)
    impl = log_cpb_mlp_impl(fc1.weight, points, impl)
    if impl != 'plain' and fc1.bias is not None and fc2.bias is not None:
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        if impl == 'op':
            return log_cpb_mlp_op(points, *(p.to(points.dtype) for p in params))
        return _ChunkedMLP.apply(points, *params)
    return fc2(F.relu(fc1(points)))


def log_cpb_table(fc1: nn.Linear,
                  fc2: nn.Linear,
                  coords_h: torch.Tensor,
                  coords_w: torch.Tensor,
                  impl: str = 'auto') -> torch.Tensor:
    """The MLP (:func:`log_cpb_mlp`, ``impl``) on every (coords_h[i], coords_w[j]) pair: float32
    (heads, U_h, U_w)."""
    grid = torch.stack(torch.meshgrid(coords_h, coords_w, indexing='ij'), dim=-1)
    table = log_cpb_mlp(fc1, fc2, grid.reshape(-1, 2), impl).float()
    return table.t().reshape(-1, coords_h.numel(), coords_w.numel())


def gather_table(table: torch.Tensor, index_h: torch.Tensor, index_w: torch.Tensor) -> torch.Tensor:
    """(heads, U_h, U_w) table -> (heads, Hq, Wq, Hk, Wk) bias for per-axis indices (Hq, Hk)
    and (Wq, Wk), a permuted view (callers reshape it).

    One ``index_select`` per axis: their backward adds whole rows (``index_add``), where a 4-D
    advanced index would gather element by element and scatter its gradient one value at a time
    (hundreds of milliseconds per stage-1 layer at detection sizes)."""
    heads = table.shape[0]
    (query_h, key_h), (query_w, key_w) = index_h.shape, index_w.shape
    columns = table.index_select(2, index_w.reshape(-1))  # (heads, U_h, Wq * Wk)
    rows = columns.index_select(1, index_h.reshape(-1))  # (heads, Hq * Hk, Wq * Wk)
    return rows.view(heads, query_h, key_h, query_w, key_w).permute(0, 1, 3, 2, 4)


def bilinear_taps(out_len: int, in_len: int, device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """The two taps of each output of ``F.interpolate(mode='bilinear', align_corners=False)``
    along one axis (no antialiasing): input indices (2, out_len) int64 and their weights
    (2, out_len) float64 (at the edges both taps may be the same input)."""
    out = torch.arange(out_len, device=device, dtype=torch.float64)
    src = ((out + 0.5) * (in_len / out_len) - 0.5).clamp_min(0)
    low = src.floor().long().clamp_max(in_len - 1)
    frac = src - low
    return torch.stack([low, (low + 1).clamp_max(in_len - 1)]), torch.stack([1 - frac, frac])


def bilinear_matrix(out_len: int, in_len: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(out_len, in_len) weights of ``F.interpolate(mode='bilinear', align_corners=False)``
    along one axis (no antialiasing): row ``i`` holds the two taps of output ``i``
    (:func:`bilinear_taps`)."""
    index, weight = bilinear_taps(out_len, in_len, device)
    rows = torch.arange(out_len, device=device).expand(2, -1)
    matrix = torch.zeros(out_len, in_len, device=device, dtype=torch.float64)
    matrix.index_put_((rows, index), weight, accumulate=True)
    return matrix.to(dtype)


def resized_row_taps(index_h: torch.Tensor, query_len: int, key_len: int,
                     row_step: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The height's bilinear resize (``align_corners=False``, query rows and key rows alike) as
    row taps of a table form: ``index_rows`` (taps, query_len, key_len) int64 and
    ``row_weights`` (taps, query_len, key_len) float32, for the height's (Q', K') indices at the
    table grids whose rows step over ``row_step`` table entries. Two taps along each of the
    query and key rows where resized, one of weight 1 where not: up to four."""

    def taps(out_len, in_len):
        if out_len == in_len:
            return (torch.arange(out_len, device=index_h.device)[None],
                    torch.ones(1, out_len, device=index_h.device, dtype=torch.float64))
        return bilinear_taps(out_len, in_len, index_h.device)

    (query_index, query_weight), (key_index, key_weight) = (taps(query_len, index_h.shape[0]),
                                                            taps(key_len, index_h.shape[1]))
    rows = index_h[query_index[:, None, :, None], key_index[None, :, None, :]] * row_step
    weights = query_weight[:, None, :, None] * key_weight[None, :, None, :]
    return rows.reshape(-1, query_len, key_len), weights.reshape(-1, query_len, key_len).float()


def _autocast_disabled(device: torch.device):
    """A context without autocast on ``device``: the resizes keep the bias's dtype."""
    if device.type in ('cpu', 'cuda'):
        return torch.autocast(device.type, enabled=False)
    return contextlib.nullcontext()


def fold_resized_axis(table: torch.Tensor, index: torch.Tensor, axis: int, query_len: int,
                      key_len: int) -> torch.Tensor:
    """The (heads, U_h, U_w) MLP table gathered along one axis (``axis`` 0: H, 1: W) with that
    axis's (Q', K') indices at the table grids, and resized bilinearly to (query_len, key_len)
    (``align_corners=False``, the weights of :func:`resize_bias`): (heads, U_w, Q, K) for the H
    axis, (heads, U_h, Q, K) for the W axis."""
    heads = table.shape[0]
    table_q, table_k = index.shape
    device = table.device
    if axis == 0:
        table = table.transpose(1, 2)
    gathered = table.index_select(2, index.reshape(-1))  # (heads, U_other, Q' * K')
    rows = gathered.shape[1]
    with _autocast_disabled(device):
        # Two matrix products (faster here than F.interpolate and than two-tap gathers).
        grid = gathered.reshape(heads, rows, table_q, table_k)
        if table_k != key_len:
            grid = grid @ bilinear_matrix(key_len, table_k, device, grid.dtype).T
        if table_q != query_len:
            grid = bilinear_matrix(query_len, table_q, device, grid.dtype) @ grid
    return grid


def resize_bias(bias: torch.Tensor, query_size: Size, key_size: Size) -> torch.Tensor:
    """Bilinearly resize a (heads, Hq', Wq', Hk', Wk') bias over the key grid, then over the
    query grid (``align_corners=False``) with ``F.interpolate``: (heads, Hq*Wq, Hk*Wk). The path
    of traced graphs (see :func:`interpolated_bias`)."""
    heads, table_qh, table_qw, table_kh, table_kw = bias.shape
    num_keys = key_size[0] * key_size[1]
    # Traced sizes are symbolic: resize unconditionally (a resize to the same size is exact), and
    # compare the sizes only outside torch.compile / torch.export, where they would be
    # specialised.
    tracing = torch.compiler.is_compiling()
    if tracing or (table_kh, table_kw) != tuple(key_size):
        bias = F.interpolate(
            bias.reshape(heads * table_qh * table_qw, 1, table_kh, table_kw),
            size=tuple(key_size),
            mode='bilinear',
            align_corners=False)
    bias = bias.reshape(heads, table_qh, table_qw, num_keys)
    if tracing or (table_qh, table_qw) != tuple(query_size):
        # Keys as channels (a channels-last view): no copy before or after the resize.
        bias = F.interpolate(
            bias.permute(0, 3, 1, 2), size=tuple(query_size), mode='bilinear',
            align_corners=False).permute(0, 2, 3, 1)
    return bias.reshape(heads, query_size[0] * query_size[1], num_keys)


def interpolated_bias(table: torch.Tensor, index_h: torch.Tensor, index_w: torch.Tensor,
                      query_size: Size, key_size: Size) -> torch.Tensor:
    """The interpolation-mode bias (heads, Hq*Wq, Hk*Wk) from the (heads, U_h, U_w) MLP table
    and the per-axis indices at the table's grids: ``resize_bias(gather_table(...))``.

    In eager mode the same bilinear weights are applied axis by axis instead (they are
    separable, so the query and key resizes of one axis can go together), in fewer and smaller
    passes over the dense bias: the width is folded into the small table first
    (:func:`fold_resized_axis`), then its rows are gathered at the table's (query row, key row)
    pairs and resized over both at once, one bilinear image per column (channels last: no copy
    before or after the resize), and a single copy puts the axes in order. Traced graphs keep
    :func:`resize_bias` (``F.interpolate`` with symbolic sizes).
    """
    if torch.jit.is_tracing() or not _concrete(*query_size, *key_size):
        return resize_bias(gather_table(table, index_h, index_w), query_size, key_size)
    heads = table.shape[0]
    (query_h, query_w), (key_h, key_w) = query_size, key_size
    table_qh, table_kh = index_h.shape
    columns = query_w * key_w
    folded = fold_resized_axis(table, index_w, 1, query_w, key_w).reshape(heads, -1, columns)
    grid = folded.index_select(1, index_h.reshape(-1)).view(heads, table_qh, table_kh, columns)
    if (table_qh, table_kh) != (query_h, key_h):
        with _autocast_disabled(table.device):
            grid = F.interpolate(
                grid.permute(0, 3, 1, 2),
                size=(query_h, key_h),
                mode='bilinear',
                align_corners=False).permute(0, 2, 3, 1)
    bias = grid.reshape(heads, query_h, key_h, query_w, key_w).transpose(2, 3)
    return bias.reshape(heads, query_h * query_w, key_h * key_w)


def log_cpb_axes(query_size: Size, key_size: Size, pretrain_len: int, device: torch.device):
    """:func:`log_cpb_axis` of both axes: ``((coords_h, index_h), (coords_w, index_w))``."""
    return (log_cpb_axis(query_size[0], key_size[0], pretrain_len,
                         device), log_cpb_axis(query_size[1], key_size[1], pretrain_len, device))


def log_cpb_bias(fc1: nn.Linear,
                 fc2: nn.Linear,
                 query_size: Size,
                 key_size: Size,
                 pretrain_len: int,
                 table_query: Size = None,
                 table_key: Size = None,
                 impl: str = 'auto') -> torch.Tensor:
    """Evaluate log-CPB for a query grid against a key grid.

    Args:
        fc1 (nn.Linear): The 2 -> hidden layer of the MLP.
        fc2 (nn.Linear): The hidden -> heads layer of the MLP.
        query_size (tuple[int]): Query grid (H, W).
        key_size (tuple[int]): Key grid (Hk, Wk).
        pretrain_len (int): The stage's feature size at pretraining.
        table_query (tuple[int], optional): Query grid of the table to resize from
            (interpolation mode, with ``table_key``). Defaults to None: evaluate at
            ``query_size`` and ``key_size``.
        table_key (tuple[int], optional): Key grid of that table. Defaults to None.
        impl (str): How the MLP runs, see :func:`log_cpb_mlp`. Defaults to 'auto'.

    Returns:
        Tensor: float32 bias of shape (heads, H*W, Hk*Wk).
    """
    interpolate = table_query is not None
    grids = (table_query, table_key) if interpolate else (query_size, key_size)
    (coords_h, index_h), (coords_w, index_w) = log_cpb_axes(*grids, pretrain_len, fc1.weight.device)
    table = log_cpb_table(fc1, fc2, coords_h, coords_w, impl)
    if interpolate:
        return interpolated_bias(table, index_h, index_w, query_size, key_size)
    bias = gather_table(table, index_h, index_w)
    return bias.reshape(bias.shape[0], query_size[0] * query_size[1], key_size[0] * key_size[1])


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
    """Computes (and in eager eval mode caches) the log-CPB bias of one attention layer.

    A plain object, not a module, so that the MLP keeps the released checkpoint's names
    (``attn.cpb_fc1``, ``attn.cpb_fc2``) on the attention layer that owns it. When traced
    (``torch.compile``, ``torch.export``) it computes the bias in the graph and never touches the
    cache, whose keys hold object ids and data pointers.

    Args:
        mode (str): 'interpolate' tabulates the bias at ``table_query`` x ``table_key`` and resizes
            it to the actual grids; 'extrapolate' evaluates log-CPB at the actual grids.
        table_query (tuple[int]): query grid of the table (``img_size // stride``).
        table_key (tuple[int]): key grid of the table (``img_size // 32``).
        pretrain_len (int): the stage's feature size at pretraining (``pretrain_size // stride``).
        impl (str): How the MLP runs (the backbone's ``attn_impl``), see :func:`log_cpb_mlp`.
            Defaults to 'auto'.
    """

    def __init__(self,
                 mode: str,
                 table_query: Size,
                 table_key: Size,
                 pretrain_len: int,
                 impl: str = 'auto'):
        if mode not in POS_BIAS_MODES:
            raise ValueError(f'pos_bias_mode must be one of {POS_BIAS_MODES}, got {mode!r}')
        if pretrain_len < 2:
            raise ValueError(f'pretrain_size gives a feature size of {pretrain_len} (< 2) in '
                             'some stage; pretrain_size must be at least 64')
        check_impl(impl)
        self.mode = mode
        self.impl = impl
        self.table_query = tuple(table_query)
        self.table_key = tuple(table_key)
        self.pretrain_len = pretrain_len

    def clear_cache(self) -> None:
        _evict(lambda key: key[0] == id(self))

    def cached_sizes(self) -> list:
        """The (query, key) grids whose (dense) bias this layer holds in the eval cache."""
        return [key[1:] for key in _bias_cache if key[0] == id(self) and len(key) == 3]

    def resized_axes(self, query_size: Size, key_size: Size) -> Tuple[int, ...]:
        """The axes (0: H, 1: W) along which the bias at these grids is resized from the table's
        grids: none in extrapolation mode, where it is evaluated at the actual grids."""
        if self.mode == 'extrapolate':
            return ()
        grids = zip(query_size, key_size, self.table_query, self.table_key)
        return tuple(axis for axis, (q, k, table_q, table_k) in enumerate(grids)
                     if (q, k) != (table_q, table_k))

    def table_form(self, fc1: nn.Linear, fc2: nn.Linear, query_size: Size,
                   key_size: Size) -> PoolBiasTable:
        """The bias in table form, computed without any cache: float32 table (heads, table_size)
        and the offsets of each (query, key) pair into it.

        Unresized (a function of the offset): the MLP table (heads, U_h * U_w). One axis resized:
        the MLP table gathered and resized along that axis (:func:`fold_resized_axis`), indexed
        along the other axis by its offset, e.g. (heads, U_h * Wq * Wk) where W is resized. Both
        resized: that same W-folded table, and the height's resize as row taps with weights
        (:func:`resized_row_taps`).
        """
        resized = self.resized_axes(query_size, key_size)
        device = fc1.weight.device
        # Along an unresized axis the actual grids are the table's.
        grids = (self.table_query, self.table_key) if resized else (query_size, key_size)
        (coords_h, index_h), (coords_w, index_w) = log_cpb_axes(*grids, self.pretrain_len, device)
        table = log_cpb_table(fc1, fc2, coords_h, coords_w, self.impl)
        index_rows, index_cols, row_weights = table_form_indices(
            index_h, index_w, coords_w.numel(), resized, query_size, key_size,
            (grids, self.pretrain_len, str(device)))
        if not resized:
            return PoolBiasTable(table.flatten(1), index_rows, index_cols)
        if resized == (0, ):  # (heads, Hq, Hk, U_w)
            folded = fold_resized_axis(table, index_h, 0, query_size[0], key_size[0])
            folded = folded.permute(0, 2, 3, 1)
        else:  # (heads, U_h, Wq, Wk)
            folded = fold_resized_axis(table, index_w, 1, query_size[1], key_size[1])
        return PoolBiasTable(folded.flatten(1), index_rows, index_cols, row_weights)

    @staticmethod
    def _weights_signature(fc1: nn.Linear, fc2: nn.Linear) -> tuple:
        params = (fc1.weight, fc1.bias, fc2.weight, fc2.bias)
        return tuple((p._version, p.data_ptr(), p.dtype) for p in params)

    def compute(self, fc1: nn.Linear, fc2: nn.Linear, query_size: Size,
                key_size: Size) -> torch.Tensor:
        """The bias (heads, H*W, Hk*Wk), computed without any cache."""
        if self.mode == 'extrapolate':
            return log_cpb_bias(fc1, fc2, query_size, key_size, self.pretrain_len, impl=self.impl)
        return log_cpb_bias(fc1, fc2, query_size, key_size, self.pretrain_len, self.table_query,
                            self.table_key, self.impl)

    def _cached_table_bias(self, fc1, fc2, query_size: Size, key_size: Size,
                           signature: tuple) -> torch.Tensor:
        """Interpolation mode in eval: the MLP table does not depend on the input size, so it
        is evaluated once per weights and only gathered and resized for each new size."""
        (coords_h, index_h), (coords_w, index_w) = log_cpb_axes(self.table_query, self.table_key,
                                                                self.pretrain_len,
                                                                fc1.weight.device)
        key = (id(self), 'table')
        hit = _bias_cache.get(key)
        if hit is None or hit[0] != signature:
            hit = (signature, log_cpb_table(fc1, fc2, coords_h, coords_w, self.impl).detach())
            self._store(key, hit)
        return interpolated_bias(hit[1], index_h, index_w, query_size, key_size)

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

    def __call__(self,
                 fc1: nn.Linear,
                 fc2: nn.Linear,
                 query_size: Size,
                 key_size: Size,
                 training: bool,
                 form: str = 'dense'):
        """The bias (heads, H*W, Hk*Wk), or with ``form='table'`` its :class:`PoolBiasTable`
        (:meth:`table_form`). Eager eval mode caches either."""
        if form not in BIAS_FORMS:
            raise ValueError(f'form must be one of {BIAS_FORMS}, got {form!r}')
        query_size, key_size = tuple(query_size), tuple(key_size)
        table = form == 'table'
        # Cache only in eager mode, on a device with data, and only what no gradient can flow
        # through: eval mode and no grad wanted by the MLP.
        cacheable = (
            _cache_enabled and not training and not torch.compiler.is_compiling()
            and fc1.weight.device.type != 'meta'
            and not (torch.is_grad_enabled() and fc1.weight.requires_grad))
        if table and not cacheable:
            return self.table_form(fc1, fc2, query_size, key_size)
        if not cacheable:
            return self.compute(fc1, fc2, query_size, key_size)
        signature = self._weights_signature(fc1, fc2)
        if table:
            return self._cached_table_form(fc1, fc2, query_size, key_size, signature)
        key = (id(self), query_size, key_size)
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

    def _cached_table_form(self, fc1, fc2, query_size: Size, key_size: Size,
                           signature: tuple) -> PoolBiasTable:
        key = (id(self), 'table form', query_size, key_size)
        hit = _bias_cache.get(key)
        if hit is None or hit[0] != signature:
            bias = self.table_form(fc1, fc2, query_size, key_size)
            hit = (signature, bias.table.detach(), *bias[1:])
            self._store(key, hit)
        else:
            _bias_cache.move_to_end(key)
        return PoolBiasTable(*hit[1:])

    def __del__(self):
        try:
            self.clear_cache()
        except Exception:  # interpreter shutdown
            pass
