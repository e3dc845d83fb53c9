# Copyright (c) transnext-mm contributors. All rights reserved.
"""Queries, keys and token weights of TransNeXt's length-scaled cosine attention.

With ``q_hat = q / max(|q|, 1e-12)`` per head (``F.normalize``)::

    q_out        = (q_hat + query_embedding) * scale
    k_out        = k / max(|k|, 1e-12)
    token_weight = q_hat @ learnable_tokens + learnable_bias

for ``q``, ``k`` of shape (B, heads, N, d), ``query_embedding`` (heads, 1, d), ``scale``
(heads, N, 1) (``softplus(temperature) * ln(keys seen)``), ``learnable_tokens`` (heads, d, 9) and
``learnable_bias`` (heads, 1, 9): the first inputs of the aggregated-attention core.

:func:`cosine_queries_keys_torch` is the PyTorch formula and the oracle. On CPU (fp32 / fp64) the
compiled kernels in ``transnext_mm._ext`` do it in one pass over the rows (PyTorch makes seven
memory-bound passes: about 45 ms of a TransNeXt-Tiny forward at 512x512 on two cores, in-process
A/B), and its backward in one more: each row's normalised q and k are recomputed, the gradients of
q, k and the scale written, and those of the query embedding, learnable tokens and their bias
summed per block of rows in a fixed order. The same rule as for the ConvGLU gate decides where
they run (:func:`transnext_mm.ops.dispatch.choose`).
"""
from typing import Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .dispatch import compiled_ext, select


def cosine_queries_keys_torch(q: Tensor, k: Tensor, query_embedding: Tensor, scale: Tensor,
                              learnable_tokens: Tensor,
                              learnable_bias: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """PyTorch implementation (see the module docstring)."""
    q_hat = F.normalize(q, dim=-1)
    return ((q_hat + query_embedding) * scale, F.normalize(k, dim=-1),
            q_hat @ learnable_tokens + learnable_bias)


@torch.library.custom_op('transnext_mm::cosine_queries_keys', mutates_args=())
def cosine_queries_keys_op(q: Tensor, k: Tensor, query_embedding: Tensor, scale: Tensor,
                           learnable_tokens: Tensor,
                           learnable_bias: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """The compiled kernel as a custom op (CPU, fp32 / fp64; no dispatch: see
    :func:`cosine_queries_keys`), with the compiled backward
    :func:`cosine_queries_keys_backward_op`."""
    q_out, k_out, token_weight = compiled_ext().cosine_queries_keys_forward(
        q, k, query_embedding, scale, learnable_tokens, learnable_bias)
    return q_out, k_out, token_weight


@cosine_queries_keys_op.register_fake
def _cosine_queries_keys_op_fake(q, k, query_embedding, scale, learnable_tokens, learnable_bias):
    B, heads, N, d = q.shape
    rows = q.new_empty((B, N, heads, d)).permute(0, 2, 1, 3)
    return rows, torch.empty_like(rows), q.new_empty((B, heads, N, learnable_tokens.shape[-1]))


@torch.library.custom_op('transnext_mm::cosine_queries_keys_backward', mutates_args=())
def cosine_queries_keys_backward_op(
        grad_q: Tensor, grad_k: Tensor, grad_token_weight: Tensor, q: Tensor, k: Tensor,
        query_embedding: Tensor, scale: Tensor,
        learnable_tokens: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The gradients of ``q``, ``k``, ``query_embedding``, ``scale``, ``learnable_tokens`` and
    ``learnable_bias``."""
    return tuple(compiled_ext().cosine_queries_keys_backward(grad_q, grad_k, grad_token_weight, q,
                                                             k, query_embedding, scale,
                                                             learnable_tokens))


@cosine_queries_keys_backward_op.register_fake
def _cosine_queries_keys_backward_op_fake(grad_q, grad_k, grad_token_weight, q, k, query_embedding,
                                          scale, learnable_tokens):
    B, heads, N, d = q.shape
    rows = q.new_empty((B, N, heads, d)).permute(0, 2, 1, 3)
    return (rows, torch.empty_like(rows), torch.empty_like(query_embedding),
            torch.empty_like(scale), torch.empty_like(learnable_tokens),
            q.new_empty((heads, 1, learnable_tokens.shape[-1])))


def _setup_context(ctx, inputs, output):
    q, k, query_embedding, scale, learnable_tokens, _ = inputs
    ctx.save_for_backward(q, k, query_embedding, scale, learnable_tokens)


def _backward(ctx, grad_q, grad_k, grad_token_weight):
    q, k, query_embedding, scale, learnable_tokens = ctx.saved_tensors
    B, heads, N, d = q.shape
    grads = [grad_q, grad_k, grad_token_weight]
    shapes = [q.shape, q.shape, (B, heads, N, learnable_tokens.shape[-1])]
    grads = [q.new_zeros(shape) if g is None else g for g, shape in zip(grads, shapes)]
    out = cosine_queries_keys_backward_op(*grads, q, k, query_embedding, scale, learnable_tokens)
    return tuple(g if need else None for g, need in zip(out, ctx.needs_input_grad))


cosine_queries_keys_op.register_autograd(_backward, setup_context=_setup_context)


def cosine_queries_keys(q: Tensor,
                        k: Tensor,
                        query_embedding: Tensor,
                        scale: Tensor,
                        learnable_tokens: Tensor,
                        learnable_bias: Tensor,
                        impl: str = 'auto') -> Tuple[Tensor, Tensor, Tensor]:
    """``(q_out, k_out, token_weight)`` (see the module docstring).

    Args:
        impl (str): ``'auto'`` / ``'op'`` use the compiled kernels where they apply (CPU
            fp32 / fp64, no autocast) and PyTorch elsewhere; if it applies but is not
            built, ``'auto'`` warns once and uses PyTorch, ``'op'`` raises a RuntimeError
            (:func:`transnext_mm.ops.dispatch.select`); ``'torch'`` / ``'reference'`` always use
            PyTorch. Defaults to 'auto'.
    """
    inputs = (q, k, query_embedding, scale, learnable_tokens, learnable_bias)
    if select('cosine_qk', impl, q, inputs[1:]) == 'op':
        return cosine_queries_keys_op(*(t.to(q.dtype) for t in inputs))
    return cosine_queries_keys_torch(*inputs)
