# Copyright (c) transnext-mm contributors. All rights reserved.
"""Aggregated attention on ``torch.nn.attention.flex_attention`` (no compiled extension).

Computes the function of
:func:`~transnext_mm.ops.aggregated_attention.aggregated_attention_reference` (see
:mod:`transnext_mm.ops.aggregated_attention` for the formula and shapes) as one flex attention over
a key sequence of length ``N + Np``: the grid's ``N`` keys, of which a block mask keeps each
query's 3x3 neighbourhood (so out-of-image neighbours and all other grid keys are masked), followed
by the ``Np`` pooled keys, which every query sees. The ``score_mod`` adds ``rpb_local`` by window
offset to the window scores and ``bias_pool`` by pooled index to the pooled ones; the scale is 1
(the caller has folded it into ``q``). The learnable-token term
``sum_j token_weight[i, j] * v[nbr(i, j)]`` is not part of the softmax and is added outside.

This is an alternative to the compiled op, checked against the reference in
tests/test_ops/test_aggregated_attention/test_flex.py; it is not part of the ``attn_impl``
dispatch. Limits of flex_attention itself: its fused kernels come from ``torch.compile``
(``compiled=False`` runs the unfused eager implementation, which materialises the full score
matrix), and its backward runs on CUDA only. The key / value concatenation copies ``k`` and
``v`` once per call.
"""
from typing import Tuple

import torch
from torch import Tensor

from .shapes import WINDOW, check_attention_inputs, common_dtype
from .torch_impl import shifted_windows

_block_masks = {}
_compiled_core = None


def _neighbour_offsets(q_idx: Tensor, kv_idx: Tensor, width: int) -> Tuple[Tensor, Tensor]:
    """Row and column offset of grid key ``kv_idx`` from query ``q_idx`` (raster order)."""
    return kv_idx // width - q_idx // width, kv_idx % width - q_idx % width


def window_block_mask(height: int, width: int, num_pool: int, device: torch.device):
    """The :class:`BlockMask` "3x3 neighbourhood of the query, or a pooled key" over
    ``N + num_pool`` keys, cached per grid, pooled length and device."""
    from torch.nn.attention.flex_attention import create_block_mask
    key = (height, width, num_pool, str(device))
    block_mask = _block_masks.get(key)
    if block_mask is None:
        num_tokens = height * width
        half = WINDOW // 2

        def mask_mod(b, h, q_idx, kv_idx):
            dy, dx = _neighbour_offsets(q_idx, kv_idx, width)
            in_window = (kv_idx < num_tokens) & (dy.abs() <= half) & (dx.abs() <= half)
            return in_window | (kv_idx >= num_tokens)

        block_mask = create_block_mask(
            mask_mod, None, None, num_tokens, num_tokens + num_pool, device=device)
        _block_masks[key] = block_mask
    return block_mask


def _flex_core(q: Tensor, keys: Tensor, values: Tensor, rpb_local: Tensor, bias_pool: Tensor,
               block_mask, width: int) -> Tensor:
    """softmax over [window scores + rpb_local, pooled scores + bias_pool] times the values."""
    from torch.nn.attention.flex_attention import flex_attention
    num_tokens, num_pool = bias_pool.shape[1:]
    half = WINDOW // 2

    def score_mod(score, b, h, q_idx, kv_idx):
        dy, dx = _neighbour_offsets(q_idx, kv_idx, width)
        # Clamped: scores of masked keys are computed too, and must index in bounds.
        j = (dy.clamp(-half, half) + half) * WINDOW + dx.clamp(-half, half) + half
        local = rpb_local[h, j]
        if num_pool == 0:
            return score + local
        pooled = bias_pool[h, q_idx, (kv_idx - num_tokens).clamp(min=0)]
        return score + torch.where(kv_idx < num_tokens, local, pooled)

    return flex_attention(q, keys, values, score_mod=score_mod, block_mask=block_mask, scale=1.0)


def flex_aggregated_attention(q: Tensor,
                              k: Tensor,
                              v: Tensor,
                              k_pool: Tensor,
                              v_pool: Tensor,
                              rpb_local: Tensor,
                              bias_pool: Tensor,
                              token_weight: Tensor,
                              height: int,
                              width: int,
                              compiled: bool = True) -> Tensor:
    """Aggregated attention with ``flex_attention`` (same arguments as the reference).

    Inputs are cast to one dtype as by the compiled op: the autocast dtype inside an autocast
    region, else their promoted dtype; the attention then runs with autocast off.

    Args:
        compiled (bool): Run flex_attention through ``torch.compile`` (fused kernels, one
            compilation per shape; the backward needs this and CUDA). ``False`` runs PyTorch's
            unfused eager implementation (forward only; PyTorch warns once). Defaults to True.

    Returns:
        Tensor: (B, heads, H*W, d) in the common dtype.
    """
    global _compiled_core
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height,
                           width)
    B, heads, num_tokens, d = q.shape
    tensors = (q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight)
    dtype = common_dtype(tensors, q.device.type)
    q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight = (t.to(dtype) for t in tensors)
    block_mask = window_block_mask(height, width, k_pool.shape[2], q.device)
    core = _flex_core
    if compiled:
        if _compiled_core is None:
            _compiled_core = torch.compile(_flex_core, dynamic=False)
        core = _compiled_core
    with torch.autocast(q.device.type, enabled=False):
        out = core(q, torch.cat([k, k_pool], dim=2), torch.cat([v, v_pool], dim=2), rpb_local,
                   bias_pool, block_mask, width)
        # The learnable-token term: token weights times the window's values (zeros outside).
        out = out.reshape(B, heads, height, width, d)
        weight = token_weight.reshape(B, heads, height, width, token_weight.shape[-1])
        for j, v_shifted in enumerate(shifted_windows(v, height, width)):
            out = torch.addcmul(out, weight[..., j:j + 1], v_shifted)
    return out.reshape(B, heads, num_tokens, d)
