# Copyright (c) transnext-mm contributors. All rights reserved.
"""The compiled aggregated-attention op (``transnext_mm._ext``) as a PyTorch custom op.

Computes exactly :func:`~transnext_mm.ops.aggregated_attention.aggregated_attention_reference` (see
:mod:`transnext_mm.ops.aggregated_attention` for the formula and shapes) with fused kernels that
never build unfolded keys / values or the (B, heads, N, 9 + Np) score tensor: on CUDA one pass per
query over the 3x3 window and the pooled keys with an online softmax (fp32 statistics); on CPU per
chunk of 128 queries whose scores stay in cache, the chunk's products in tiles of 4 queries kept in
registers (fp32, head dim 8/16/24/32; forward and backward), else in BLAS calls. Only the output and
the log-sum-exp are saved; backward recomputes the probabilities. No atomics: the batch-shared
``bias_pool`` gradient is owned per (head, query) and summed over the batch in place (on CUDA per
batch group, the groups' partial sums added afterwards).

Kernels: CPU for fp32 / fp64 (fp16 / bf16 are computed in fp32), CUDA for fp32 / fp16 / bf16 with
fp32 accumulation when the extension was built with CUDA. Forward and backward are registered
with ``torch.library`` (fake kernels and autograd formula), so ``torch.compile`` keeps them as
single graph nodes instead of breaking the graph.
"""
from typing import Optional, Tuple

import torch
from torch import Tensor

from ..dispatch import choose, compiled_ext
from .shapes import PoolBiasTable, check_attention_inputs, common_dtype


def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _empty_rows_like(t: Tensor) -> Tensor:
    """(B, heads, N, d) stored as (B, N, heads, d), the layout the kernels write outputs in."""
    B, heads, N, d = t.shape
    return t.new_empty((B, N, heads, d)).permute(0, 2, 1, 3)


@torch.library.custom_op('transnext_mm::aggregated_attention_forward', mutates_args=())
def _forward(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor, rpb_local: Tensor,
             bias_pool: Tensor, token_weight: Tensor, height: int,
             width: int) -> Tuple[Tensor, Tensor]:
    out, lse = compiled_ext().aggregated_attention_forward(q, k, v, k_pool, v_pool, rpb_local,
                                                           bias_pool, token_weight, height, width)
    return out, lse


@_forward.register_fake
def _forward_fake(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width):
    return _empty_rows_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op('transnext_mm::aggregated_attention_backward', mutates_args=())
def _backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor,
        rpb_local: Tensor, bias_pool: Tensor, token_weight: Tensor, out: Tensor, lse: Tensor,
        height: int, width: int,
        bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = compiled_ext().aggregated_attention_backward(grad_out, q, k, v, k_pool, v_pool,
                                                         rpb_local, bias_pool, token_weight, out,
                                                         lse, height, width, bias_grad)
    return tuple(grads)


@_backward.register_fake
def _backward_fake(grad_out, q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, out, lse,
                   height, width, bias_grad):
    heads, num_tokens, num_pool = bias_pool.shape
    return (_empty_rows_like(q), _empty_rows_like(k), _empty_rows_like(v),
            k_pool.new_empty(k_pool.shape), v_pool.new_empty(v_pool.shape),
            rpb_local.new_empty(rpb_local.shape),
            bias_pool.new_empty((heads if bias_grad else 0, num_tokens, num_pool)),
            token_weight.new_empty(token_weight.shape))


def _setup_context(ctx, inputs, output):
    *tensors, height, width = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, out, lse)
    ctx.grid = (height, width)


def _backward_formula(ctx, grad_out, grad_lse):
    bias_grad = ctx.needs_input_grad[6]
    grads = _backward(grad_out, *ctx.saved_tensors, *ctx.grid, bias_grad)
    grads = list(grads)
    if not bias_grad:
        grads[6] = None
    return (*grads, None, None)


_forward.register_autograd(_backward_formula, setup_context=_setup_context)

# ------------------------------------------------------------------------------------------------
# The pooled bias in table form: ``bias_pool[h, i, p] = bias_table[h, index_rows[y, py] +
# index_cols[x, px]]`` for query ``i = (y, x)`` and pooled key ``p = (py, px)``. The kernels read
# the bias from the table, so the (heads, N, Np) bias is neither materialised nor saved for the
# backward. The CPU kernels accumulate the table's gradient directly (per group of query chunks,
# then summed in a fixed order). The CUDA backward writes the bias gradient of the layer's pairs
# as per-batch-group partial sums, as with a dense bias, and a fourth kernel gathers them per
# table entry in a fixed order (no atomics); that scratch lives only during the backward call.


@torch.library.custom_op('transnext_mm::aggregated_attention_table_forward', mutates_args=())
def _table_forward(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor,
                   rpb_local: Tensor, bias_table: Tensor, index_rows: Tensor, index_cols: Tensor,
                   row_weights: Optional[Tensor], token_weight: Tensor, height: int,
                   width: int) -> Tuple[Tensor, Tensor]:
    out, lse = compiled_ext().aggregated_attention_table_forward(q, k, v, k_pool, v_pool, rpb_local,
                                                                 bias_table, index_rows, index_cols,
                                                                 row_weights, token_weight, height,
                                                                 width)
    return out, lse


@_table_forward.register_fake
def _table_forward_fake(q, k, v, k_pool, v_pool, rpb_local, bias_table, index_rows, index_cols,
                        row_weights, token_weight, height, width):
    return _empty_rows_like(q), q.new_empty(q.shape[:3], dtype=_lse_dtype(q.dtype))


@torch.library.custom_op('transnext_mm::aggregated_attention_table_backward', mutates_args=())
def _table_backward(
        grad_out: Tensor, q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor,
        rpb_local: Tensor, bias_table: Tensor, index_rows: Tensor, index_cols: Tensor,
        row_weights: Optional[Tensor], token_weight: Tensor, out: Tensor, lse: Tensor, height: int,
        width: int,
        bias_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = compiled_ext().aggregated_attention_table_backward(grad_out, q, k, v, k_pool, v_pool,
                                                               rpb_local, bias_table, index_rows,
                                                               index_cols, row_weights,
                                                               token_weight, out, lse, height,
                                                               width, bias_grad)
    return tuple(grads)


@_table_backward.register_fake
def _table_backward_fake(grad_out, q, k, v, k_pool, v_pool, rpb_local, bias_table, index_rows,
                         index_cols, row_weights, token_weight, out, lse, height, width, bias_grad):
    heads, table_size = bias_table.shape
    return (_empty_rows_like(q), _empty_rows_like(k), _empty_rows_like(v),
            k_pool.new_empty(k_pool.shape), v_pool.new_empty(v_pool.shape),
            rpb_local.new_empty(rpb_local.shape),
            bias_table.new_empty((heads if bias_grad else 0, table_size)),
            token_weight.new_empty(token_weight.shape))


def _table_setup_context(ctx, inputs, output):
    *tensors, height, width = inputs
    out, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(*tensors, out, lse)
    ctx.grid = (height, width)


def _table_backward_formula(ctx, grad_out, grad_lse):
    bias_grad = ctx.needs_input_grad[6]
    grads = list(_table_backward(grad_out, *ctx.saved_tensors, *ctx.grid, bias_grad))
    if not bias_grad:
        grads[6] = None
    dq, dk, dv, dk_pool, dv_pool, drpb, dtable, dtoken_weight = grads
    return (dq, dk, dv, dk_pool, dv_pool, drpb, dtable, None, None, None, dtoken_weight, None, None)


_table_forward.register_autograd(_table_backward_formula, setup_context=_table_setup_context)


def op_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled op has kernels for this device and dtype."""
    return choose('attention', 'op', device, dtype).impl == 'op'


def aggregated_attention_op(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor,
                            rpb_local: Tensor, bias_pool: Tensor, token_weight: Tensor, height: int,
                            width: int) -> Tensor:
    """Aggregated attention with the compiled kernels (same arguments as the reference).

    Inputs are cast to one dtype: the autocast dtype inside an autocast region (as for a matmul),
    else their promoted dtype. Gradients flow to all eight tensors. ``q``, ``k`` and ``v`` may be
    strided views (e.g. heads split out of a (B, N, C) projection) as long as their channels are
    contiguous: they are read in place.

    Returns:
        Tensor: (B, heads, H*W, d) in the common dtype, stored as (B, H*W, heads, d) so that
        ``out.transpose(1, 2).reshape(B, H*W, heads*d)`` is a view.
    """
    if compiled_ext() is None:
        raise RuntimeError(choose('attention', 'op', q.device, q.dtype).reason)
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height,
                           width)
    tensors = (q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight)
    dtype = common_dtype(tensors, q.device.type)
    tensors = [t.to(dtype) for t in tensors]
    out, _ = torch.ops.transnext_mm.aggregated_attention_forward(*tensors, height, width)
    return out


def aggregated_attention_table_op(q: Tensor, k: Tensor, v: Tensor, k_pool: Tensor, v_pool: Tensor,
                                  rpb_local: Tensor, bias: PoolBiasTable, token_weight: Tensor,
                                  height: int, width: int) -> Tensor:
    """:func:`aggregated_attention_op` with the pooled bias in table form.

    Args:
        bias (PoolBiasTable): ``(table, index_rows, index_cols, row_weights)``, see
            :class:`PoolBiasTable`. Gradients flow to ``bias.table`` (and the seven other
            tensors), not to the row weights.

    Returns:
        Tensor: as :func:`aggregated_attention_op`.
    """
    if compiled_ext() is None:
        raise RuntimeError(choose('attention', 'op', q.device, q.dtype).reason)
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias, token_weight, height, width)
    tensors = (q, k, v, k_pool, v_pool, rpb_local, bias.table, token_weight)
    dtype = common_dtype(tensors, q.device.type)
    q, k, v, k_pool, v_pool, rpb_local, table, token_weight = [t.to(dtype) for t in tensors]
    row_weights = bias.row_weights
    if row_weights is not None:  # in the kernels' accumulation type, without a gradient
        row_weights = row_weights.detach().to(_lse_dtype(dtype))
    out, _ = torch.ops.transnext_mm.aggregated_attention_table_forward(
        q, k, v, k_pool, v_pool, rpb_local, table, bias.index_rows, bias.index_cols, row_weights,
        token_weight, height, width)
    return out
