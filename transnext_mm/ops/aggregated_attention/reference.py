# Copyright (c) transnext-mm contributors. All rights reserved.
"""The readable, paper-faithful aggregated attention (unfold the window, one softmax): the test
oracle of every other implementation, and the 3x3 window tables the layers share.

See :mod:`transnext_mm.ops.aggregated_attention` for the formula and shapes.
"""
import functools
from typing import Tuple

import torch
import torch.nn.functional as F

from .shapes import WINDOW, WINDOW_AREA, check_attention_inputs


def compute_window_tables(height: int,
                          width: int,
                          device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`window_tables` computed afresh (no cache): ``(valid, count)`` on ``device``.

    Args:
        height (int): Grid height.
        width (int): Grid width.
        device (torch.device, optional): Device of the tables. Defaults to None (the default
            device).
    """
    offsets = torch.arange(WINDOW, device=device) - WINDOW // 2

    def in_range(length):  # (length, 3): 0 <= i + offset < length, no tensor-size comparison
        i = torch.arange(length, device=device)[:, None]
        return (i + offsets >= 0) & (i.flip(0) - offsets >= 0)

    valid = in_range(height)[:, None, :, None] & in_range(width)[None, :, None, :]  # (H, W, 3, 3)
    valid = valid.reshape(height * width, WINDOW_AREA)
    return valid, valid.sum(-1)


_window_tables_cpu = functools.lru_cache(maxsize=64)(compute_window_tables)
_window_cache = {}


def window_tables(height: int, width: int,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(valid, count)`` for the 3x3 window on an ``height x width`` grid.

    ``valid`` (N, 9) bool marks in-image neighbours (``F.unfold`` order); ``count`` (N,) counts
    them. Cached per size and device in eager mode, so no block recomputes them; when traced
    (``torch.compile``, ``torch.export``) computed in the graph, so sizes may be symbolic.
    """
    if torch.compiler.is_compiling():
        return compute_window_tables(height, width, device)
    key = (height, width, str(device))
    tables = _window_cache.get(key)
    if tables is None:
        # Normal tensors even when first asked for under torch.inference_mode: the cache also
        # serves later training steps, which cannot save inference tensors for backward.
        with torch.inference_mode(False):
            tables = tuple(t.to(device) for t in _window_tables_cpu(height, width))
        _window_cache[key] = tables
    return tables


def unfold_window(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, N, d) -> (B, heads, N, 9, d): each position's 3x3 window, zeros outside."""
    B, heads, N, d = t.shape
    t = F.unfold(
        t.transpose(-1, -2).reshape(B * heads, d, height, width), WINDOW, padding=WINDOW // 2)
    return t.reshape(B, heads, d, WINDOW_AREA, N).permute(0, 1, 4, 3, 2)


def aggregated_attention_probs(q, k, k_pool, rpb_local, bias_pool, height: int,
                               width: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """The softmax of aggregated attention, split into window (B, heads, N, 9) and pooled
    (B, heads, N, Np) probabilities; out-of-image window positions get 0."""
    valid, _ = window_tables(height, width, q.device)
    s_local = (q.unsqueeze(-2) * unfold_window(k, height, width)).sum(-1)
    s_local = (s_local + rpb_local.unsqueeze(1)).masked_fill(~valid, float('-inf'))
    s_pool = q @ k_pool.transpose(-2, -1) + bias_pool
    attn = torch.cat([s_local, s_pool], dim=-1).softmax(dim=-1)
    return attn.split([WINDOW_AREA, k_pool.shape[2]], dim=-1)


def aggregated_attention_reference(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight,
                                   height: int, width: int) -> torch.Tensor:
    """Readable, paper-faithful implementation: unfold the window, one softmax. The test oracle."""
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height,
                           width)
    a_local, a_pool = aggregated_attention_probs(q, k, k_pool, rpb_local, bias_pool, height, width)
    v_local = unfold_window(v, height, width)
    out = ((a_local + token_weight).unsqueeze(-1) * v_local).sum(-2)
    return out + a_pool @ v_pool
