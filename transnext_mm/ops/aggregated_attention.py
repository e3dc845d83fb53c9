# Copyright (c) transnext-mm contributors. All rights reserved.
"""The core of aggregated attention: 3x3 sliding window + pooled keys in one softmax.

Every implementation in this file (and the compiled op) computes the same function, written here
for one head and one query ``i`` at grid position ``(y, x)``; ``j`` runs over the 3x3 window in
``F.unfold`` order (row-major offsets ``(-1, -1), (-1, 0), ..., (1, 1)``)::

    s_local[j] = q[i] . k[nbr(i, j)] + rpb_local[j]       (-inf if nbr(i, j) is outside the image)
    s_pool[p]  = q[i] . k_pool[p] + bias_pool[i, p]
    a_local, a_pool = softmax([s_local, s_pool])           (one softmax over 9 + Np scores)
    out[i] = sum_j (a_local[j] + token_weight[i, j]) * v[nbr(i, j)] + sum_p a_pool[p] * v_pool[p]

The caller has already folded normalisation, query embedding and the length scale into ``q`` and
the learnable-token term ``q_hat . learnable_tokens + learnable_bias`` into ``token_weight``.

Shapes: ``q, k, v``: (B, heads, H*W, d); ``k_pool, v_pool``: (B, heads, Np, d);
``rpb_local``: (heads, 9); ``bias_pool``: (heads, H*W, Np), shared over the batch;
``token_weight``: (B, heads, H*W, 9). Returns (B, heads, H*W, d).
"""
import functools
from typing import Tuple

import torch
import torch.nn.functional as F

from .aggregated_attention_op import aggregated_attention_op
from .attention_shapes import WINDOW, WINDOW_AREA, check_attention_inputs
from .dispatch import IMPLS as ATTN_IMPLS
from .dispatch import choose, select
# Query rows per block of the PyTorch path's pooled scores: (B, heads, rows, Np) fits in cache.
_ROW_BLOCK_BYTES = 4 << 20


def _window_tables(height: int, width: int,
                   device=None) -> Tuple[torch.Tensor, torch.Tensor]:
    offsets = torch.arange(WINDOW, device=device) - WINDOW // 2

    def in_range(length):  # (length, 3): 0 <= i + offset < length, no tensor-size comparison
        i = torch.arange(length, device=device)[:, None]
        return (i + offsets >= 0) & (i.flip(0) - offsets >= 0)

    valid = in_range(height)[:, None, :, None] & in_range(width)[None, :, None, :]  # (H, W, 3, 3)
    valid = valid.reshape(height * width, WINDOW_AREA)
    return valid, valid.sum(-1)


_window_tables_cpu = functools.lru_cache(maxsize=64)(_window_tables)
_window_cache = {}


def window_tables(height: int, width: int,
                  device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """Return ``(valid, count)`` for the 3x3 window on an ``height x width`` grid.

    ``valid`` (N, 9) bool marks in-image neighbours (``F.unfold`` order); ``count`` (N,) counts
    them. Cached per size and device in eager mode, so no block recomputes them; when traced
    (``torch.compile``, ``torch.export``) computed in the graph, so sizes may be symbolic.
    """
    if torch.compiler.is_compiling():
        return _window_tables(height, width, device)
    key = (height, width, str(device))
    tables = _window_cache.get(key)
    if tables is None:
        tables = tuple(t.to(device) for t in _window_tables_cpu(height, width))
        _window_cache[key] = tables
    return tables


def unfold_window(t: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(B, heads, N, d) -> (B, heads, N, 9, d): each position's 3x3 window, zeros outside."""
    B, heads, N, d = t.shape
    t = F.unfold(t.transpose(-1, -2).reshape(B * heads, d, height, width), WINDOW,
                 padding=WINDOW // 2)
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
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width)
    a_local, a_pool = aggregated_attention_probs(q, k, k_pool, rpb_local, bias_pool, height,
                                                 width)
    v_local = unfold_window(v, height, width)
    out = ((a_local + token_weight).unsqueeze(-1) * v_local).sum(-2)
    return out + a_pool @ v_pool


def _shifted_windows(t: torch.Tensor, height: int, width: int):
    """Yield the 9 neighbour views of ``t`` (B, heads, N, d), zero-padded at the border."""
    B, heads, N, d = t.shape
    padded = F.pad(t.reshape(B, heads, height, width, d), (0, 0, 1, 1, 1, 1))
    for dy in range(WINDOW):
        for dx in range(WINDOW):
            yield padded[:, :, dy:dy + height, dx:dx + width]


def aggregated_attention_torch(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight,
                               height: int, width: int) -> torch.Tensor:
    """Pure-PyTorch fast path.

    Shifted views of the padded grid replace the unfolded (N, 9, d) copies, and the pooled path is
    a streaming softmax over blocks of query rows: each block's (heads, rows, Np) scores stay in
    cache while the bias is added, the shared maximum subtracted and the exponentials summed, and
    the softmax normalisation is applied to the (rows, d) outputs instead of the (rows, Np)
    probabilities. The maximum is detached (softmax does not depend on it), so the in-place steps
    keep autograd exact.
    """
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width)
    B, heads, N, d = q.shape
    num_pool = k_pool.shape[2]
    q_grid = q.reshape(B, heads, height, width, d)
    s_local = torch.stack(
        [torch.linalg.vecdot(q_grid, kn) for kn in _shifted_windows(k, height, width)],
        dim=-1).reshape(B, heads, N, WINDOW_AREA)
    valid, _ = window_tables(height, width, q.device)
    s_local = s_local + rpb_local.unsqueeze(1).masked_fill(~valid, float('-inf'))
    local_max = s_local.detach().amax(-1, keepdim=True)  # finite: the centre is always valid

    k_pool_t = k_pool.transpose(-2, -1)
    if torch.compiler.is_compiling():  # one block: no loop over symbolic sizes in the graph
        blocks = [(0, N)]
    else:
        rows = max(1, _ROW_BLOCK_BYTES // (B * heads * max(num_pool, 1) * q.element_size()))
        blocks = [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]
    out_pool, denom, row_max = [], [], []
    for r0, r1 in blocks:
        p = torch.matmul(q[:, :, r0:r1], k_pool_t).add_(bias_pool[:, r0:r1])
        m = torch.maximum(p.detach().amax(-1, keepdim=True), local_max[:, :, r0:r1])
        p = p.sub_(m).exp_()
        denom.append(p.sum(-1, keepdim=True))
        out_pool.append(torch.matmul(p, v_pool))
        row_max.append(m)
    out_pool, denom, row_max = (t[0] if len(t) == 1 else torch.cat(t, dim=2)
                                for t in (out_pool, denom, row_max))

    p_local = (s_local - row_max).exp()
    inv_denom = 1.0 / (denom + p_local.sum(-1, keepdim=True))
    weight = (p_local * inv_denom + token_weight).reshape(B, heads, height, width, WINDOW_AREA)
    out = (out_pool * inv_denom).reshape(B, heads, height, width, d)
    for j, vn in enumerate(_shifted_windows(v, height, width)):
        out = out.addcmul_(weight[..., j:j + 1], vn)
    return out.reshape(B, heads, N, d)


def op_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the compiled op has kernels for this device and dtype."""
    return choose('attention', 'op', device, dtype).impl == 'op'


def aggregated_attention(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight,
                         height: int, width: int, impl: str = 'auto') -> torch.Tensor:
    """Aggregated attention (see the module docstring) by the implementation that
    :func:`transnext_mm.ops.dispatch.select` picks.

    Args:
        impl (str): ``'auto'`` uses the compiled op when it has kernels for the input's device and
            dtype and otherwise the PyTorch path (warning once); ``'op'`` requires the op;
            ``'torch'`` the PyTorch fast path; ``'reference'`` the readable unfold path.
            Defaults to 'auto'.
    """
    args = (q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width)
    chosen = select('attention', impl, q)
    if chosen == 'op':
        return aggregated_attention_op(*args)
    if chosen == 'reference':
        return aggregated_attention_reference(*args)
    return aggregated_attention_torch(*args)
