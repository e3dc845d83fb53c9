# Copyright (c) transnext-mm contributors. All rights reserved.
"""The PyTorch fast path of aggregated attention against the readable reference."""
import pytest
import torch
import torch.nn.functional as F

from transnext_mm.ops.aggregated_attention import (aggregated_attention,
                                                   aggregated_attention_reference,
                                                   aggregated_attention_torch, torch_impl)


def random_core_inputs(B=2, heads=3, height=5, width=7, Np=4, d=8, dtype=torch.float64):
    N = height * width
    g = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=True)  # noqa: E731
    q = g(B, heads, N, d)
    k = F.normalize(torch.randn(B, heads, N, d, dtype=dtype), dim=-1).requires_grad_()
    kp = F.normalize(torch.randn(B, heads, Np, d, dtype=dtype), dim=-1).requires_grad_()
    return (q, k, g(B, heads, N, d), kp, g(B, heads, Np,
                                           d), g(heads, 9), g(heads, N, Np), g(B, heads, N,
                                                                               9), height, width)


@pytest.mark.parametrize('height,width,Np', [(5, 7, 4), (1, 1, 1), (1, 6, 2), (9, 13, 3),
                                             (4, 5, 0)])
def test_torch_path_matches_reference_forward_and_backward(height, width, Np):
    args = random_core_inputs(height=height, width=width, Np=Np)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out_ref = aggregated_attention_reference(*args)
    # With Np = 0 the pooled tensors are empty and the PyTorch path does not use them.
    grads_ref = torch.autograd.grad(
        out_ref.square().sum(), tensors, allow_unused=True, materialize_grads=True)
    out = aggregated_attention_torch(*args)
    grads = torch.autograd.grad(
        out.square().sum(), tensors, allow_unused=True, materialize_grads=True)
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


@pytest.mark.parametrize('block_rows', [1, 4, 7])
def test_torch_path_row_blocks_match_reference(monkeypatch, block_rows):
    """The streaming softmax over blocks of query rows (ragged last block, batch 2) equals the
    one-softmax reference, also with large scores where a missing max shift would overflow."""
    args = list(random_core_inputs(height=5, width=6, Np=5))
    with torch.no_grad():
        args[0].mul_(40)  # scores of a few hundred: exp overflows without the shared maximum
    B, heads, _, _ = args[0].shape
    monkeypatch.setattr(torch_impl, 'ROW_BLOCK_BYTES', block_rows * B * heads * 5 * 8)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    out_ref = aggregated_attention_reference(*args)
    grads_ref = torch.autograd.grad(out_ref.square().sum(), tensors)
    out = aggregated_attention_torch(*args)
    grads = torch.autograd.grad(out.square().sum(), tensors)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


def test_core_shape_errors_and_impl_names():
    args = list(random_core_inputs())
    args[6] = args[6][:, :-1]
    with pytest.raises(ValueError, match='bias_pool must have shape'):
        aggregated_attention_torch(*args)
    with pytest.raises(ValueError, match='impl must be one of'):
        aggregated_attention(*random_core_inputs(), impl='cuda')
