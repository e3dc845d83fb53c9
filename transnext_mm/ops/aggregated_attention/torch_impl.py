# Copyright (c) transnext-mm contributors. All rights reserved.
"""The pure-PyTorch fast path of aggregated attention (no compiled extension).

See :mod:`transnext_mm.ops.aggregated_attention` for the formula and shapes.
"""
import torch
import torch.nn.functional as F

from .reference import window_tables
from .shapes import WINDOW, WINDOW_AREA, check_attention_inputs

# Query rows per block of the PyTorch path's pooled scores: (B, heads, rows, Np) fits in cache.
ROW_BLOCK_BYTES = 4 << 20


def shifted_windows(t: torch.Tensor, height: int, width: int):
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
    check_attention_inputs(q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height,
                           width)
    B, heads, N, d = q.shape
    num_pool = k_pool.shape[2]
    q_grid = q.reshape(B, heads, height, width, d)
    s_local = torch.stack(
        [torch.linalg.vecdot(q_grid, kn) for kn in shifted_windows(k, height, width)],
        dim=-1).reshape(B, heads, N, WINDOW_AREA)
    valid, _ = window_tables(height, width, q.device)
    s_local = s_local + rpb_local.unsqueeze(1).masked_fill(~valid, float('-inf'))
    local_max = s_local.detach().amax(-1, keepdim=True)  # finite: the centre is always valid

    if num_pool == 0:  # no pooled keys: the softmax runs over the window alone
        weight = (s_local.softmax(-1) + token_weight).reshape(B, heads, height, width, WINDOW_AREA)
        out = q.new_zeros(B, heads, height, width, d)
        for j, vn in enumerate(shifted_windows(v, height, width)):
            out = out.addcmul_(weight[..., j:j + 1], vn)
        return out.reshape(B, heads, N, d)

    k_pool_t = k_pool.transpose(-2, -1)
    if torch.compiler.is_compiling():  # one block: no loop over symbolic sizes in the graph
        blocks = [(0, N)]
    else:
        rows = max(1, ROW_BLOCK_BYTES // (B * heads * num_pool * q.element_size()))
        blocks = [(r0, min(N, r0 + rows)) for r0 in range(0, N, rows)]
    out_pool, denom, row_max = [], [], []
    for r0, r1 in blocks:
        p = torch.matmul(q[:, :, r0:r1], k_pool_t).add_(bias_pool[:, r0:r1])
        m = torch.maximum(p.detach().amax(-1, keepdim=True), local_max[:, :, r0:r1])
        p = p.sub_(m).exp_()
        denom.append(p.sum(-1, keepdim=True))
        out_pool.append(torch.matmul(p, v_pool))
        row_max.append(m)
    out_pool, denom, row_max = (
        t[0] if len(t) == 1 else torch.cat(t, dim=2) for t in (out_pool, denom, row_max))

    p_local = (s_local - row_max).exp()
    inv_denom = 1.0 / (denom + p_local.sum(-1, keepdim=True))
    weight = (p_local * inv_denom + token_weight).reshape(B, heads, height, width, WINDOW_AREA)
    out = (out_pool * inv_denom).reshape(B, heads, height, width, d)
    for j, vn in enumerate(shifted_windows(v, height, width)):
        out = out.addcmul_(weight[..., j:j + 1], vn)
    return out.reshape(B, heads, N, d)
