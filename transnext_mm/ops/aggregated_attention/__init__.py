# Copyright (c) transnext-mm contributors. All rights reserved.
"""The core of aggregated attention: 3x3 sliding window + pooled keys in one softmax.

Every implementation in this package (and the compiled op) computes the same function, written
here for one head and one query ``i`` at grid position ``(y, x)``; ``j`` runs over the 3x3 window
in ``F.unfold`` order (row-major offsets ``(-1, -1), (-1, 0), ..., (1, 1)``)::

    s_local[j] = q[i] . k[nbr(i, j)] + rpb_local[j]       (-inf if nbr(i, j) is outside the image)
    s_pool[p]  = q[i] . k_pool[p] + bias_pool[i, p]
    a_local, a_pool = softmax([s_local, s_pool])           (one softmax over 9 + Np scores)
    out[i] = sum_j (a_local[j] + token_weight[i, j]) * v[nbr(i, j)] + sum_p a_pool[p] * v_pool[p]

The caller has already folded normalisation, query embedding and the length scale into ``q`` and
the learnable-token term ``q_hat . learnable_tokens + learnable_bias`` into ``token_weight``.

Shapes: ``q, k, v``: (B, heads, H*W, d); ``k_pool, v_pool``: (B, heads, Np, d);
``rpb_local``: (heads, 9); ``bias_pool``: (heads, H*W, Np), shared over the batch;
``token_weight``: (B, heads, H*W, 9). Returns (B, heads, H*W, d). ``bias_pool`` may also be given in
table form (:class:`.shapes.PoolBiasTable`, e.g. a function of the query-key offset), which the
compiled kernels (CPU and CUDA) read without materialising it.

Modules: :mod:`.shapes` (window size, argument checks, dtype rule), :mod:`.reference` (the
readable unfold implementation, the test oracle, and the window tables), :mod:`.torch_impl` (the
PyTorch fast path), :mod:`.op` (the compiled op as a ``torch.library`` custom op with autograd),
:mod:`.flex` (on ``flex_attention``, benchmarked beside the op), :mod:`.replay` (the CPU replay of
the CUDA kernels, for tests), :mod:`.selfcheck` (the op's first-use self-check on CUDA, which
:mod:`transnext_mm.ops.dispatch` runs). :func:`aggregated_attention` runs the implementation that
:func:`transnext_mm.ops.dispatch.select` picks.
"""
import torch

from ..dispatch import IMPLS as ATTN_IMPLS
from ..dispatch import select
from .op import aggregated_attention_op, aggregated_attention_table_op, op_available
from .reference import (aggregated_attention_probs, aggregated_attention_reference,
                        compute_window_tables, unfold_window, window_tables)
from .selfcheck import run_self_check  # registers the self-check with dispatch
from .shapes import WINDOW, WINDOW_AREA, PoolBiasTable, check_attention_inputs
from .torch_impl import aggregated_attention_torch


def aggregated_attention(q,
                         k,
                         v,
                         k_pool,
                         v_pool,
                         rpb_local,
                         bias_pool,
                         token_weight,
                         height: int,
                         width: int,
                         impl: str = 'auto') -> torch.Tensor:
    """Aggregated attention (see the package docstring) by the implementation that
    :func:`transnext_mm.ops.dispatch.select` picks.

    Args:
        bias_pool (Tensor | PoolBiasTable): The (heads, H*W, Np) bias, or its table form (the
            compiled kernels read it as it is; every other implementation materialises it
            first).
        impl (str): ``'auto'`` uses the compiled op when it has kernels for the input's device and
            dtype and otherwise the PyTorch path (warning once); ``'op'`` requires the op;
            ``'torch'`` the PyTorch fast path; ``'reference'`` the readable unfold path.
            Defaults to 'auto'.
    """
    chosen = select('attention', impl, q)
    if isinstance(bias_pool, PoolBiasTable):
        if chosen == 'op':
            return aggregated_attention_table_op(q, k, v, k_pool, v_pool, rpb_local, bias_pool,
                                                 token_weight, height, width)
        bias_pool = bias_pool.dense()
    args = (q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight, height, width)
    if chosen == 'op':
        return aggregated_attention_op(*args)
    if chosen == 'reference':
        return aggregated_attention_reference(*args)
    return aggregated_attention_torch(*args)


__all__ = [
    'ATTN_IMPLS', 'WINDOW', 'WINDOW_AREA', 'PoolBiasTable', 'aggregated_attention',
    'aggregated_attention_op', 'aggregated_attention_probs', 'aggregated_attention_reference',
    'aggregated_attention_table_op', 'aggregated_attention_torch', 'check_attention_inputs',
    'compute_window_tables', 'op_available', 'run_self_check', 'unfold_window', 'window_tables'
]
