# Copyright (c) transnext-mm contributors. All rights reserved.
"""Aggregated attention on flex_attention against the readable reference implementation.

On CPU PyTorch's flex_attention has no backward and compiling it takes tens of seconds, so the
CPU tests check the eager forward; the compiled forward and backward are checked on CUDA when a
GPU is present.
"""
import pytest
import torch

from transnext_mm.ops.aggregated_attention import aggregated_attention_reference
from transnext_mm.ops.aggregated_attention.flex import flex_aggregated_attention, window_block_mask

flex = pytest.importorskip('torch.nn.attention.flex_attention')
# The eager path is meant here (PyTorch warns once that it is unfused).
pytestmark = pytest.mark.filterwarnings('ignore:flex_attention called without torch.compile')
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason='needs a GPU')
NAMES = ('q', 'k', 'v', 'k_pool', 'v_pool', 'rpb_local', 'bias_pool', 'token_weight')


def make_inputs(B, heads, height, width, Np, d, dtype=torch.float64, device='cpu'):
    """Like the backbone's: unit keys, queries scaled up to sharpen the softmax."""
    N = height * width
    gen = torch.Generator().manual_seed(B * 1000 + N * 10 + Np + d)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    def unit(*shape):
        return torch.nn.functional.normalize(randn(*shape), dim=-1).to(dtype)

    tensors = [
        randn(B, heads, N, d, scale=4.0),
        unit(B, heads, N, d),
        randn(B, heads, N, d),
        unit(B, heads, Np, d),
        randn(B, heads, Np, d),
        randn(heads, 9, scale=0.5),
        randn(heads, N, Np),
        randn(B, heads, N, 9, scale=0.5)
    ]
    return [t.to(device) for t in tensors]


def rel_error(actual, expected):
    if expected.numel() == 0:
        return 0.0
    return ((actual.double() - expected.double()).norm() / expected.double().norm()).item()


# (B, heads, height, width, Np, d): odd grids, 1x1, a single row, Np = 0, more queries and
# more keys than a flex block (128), TransNeXt's head dim 24.
SHAPES = [(2, 3, 5, 7, 4, 24), (1, 2, 1, 1, 1, 8), (2, 1, 1, 6, 3, 16), (2, 2, 3, 4, 0, 8),
          (1, 2, 13, 17, 150, 24)]


@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('shape', SHAPES)
def test_eager_forward_matches_reference(shape, dtype, tol):
    B, heads, height, width, Np, d = shape
    tensors = make_inputs(*shape, dtype=dtype)
    out = flex_aggregated_attention(*tensors, height, width, compiled=False)
    expected = aggregated_attention_reference(*[t.double() for t in tensors], height, width)
    assert out.dtype == dtype and out.shape == (B, heads, height * width, d)
    assert rel_error(out, expected) < tol


def test_autocast_and_mixed_dtypes_like_the_op():
    tensors = make_inputs(2, 2, 6, 5, 4, 16, dtype=torch.float32)
    expected = aggregated_attention_reference(*[t.double() for t in tensors], 6, 5)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = flex_aggregated_attention(*tensors, 6, 5, compiled=False)
    assert out.dtype == torch.bfloat16
    assert rel_error(out, expected) < 2e-2
    tensors[6] = tensors[6].double()  # one float64 input: everything is promoted
    out = flex_aggregated_attention(*tensors, 6, 5, compiled=False)
    assert out.dtype == torch.float64 and rel_error(out, expected) < 1e-5


def test_block_mask_is_the_window_plus_pooled_keys_and_cached():
    height, width, Np = 40, 50, 25
    block_mask = window_block_mask(height, width, Np, torch.device('cpu'))
    assert window_block_mask(height, width, Np, torch.device('cpu')) is block_mask
    N = height * width
    assert block_mask.shape[-2:] == (N, N + Np)
    dense = block_mask.to_dense()[0, 0]  # (query blocks, key blocks): which blocks are computed
    block = block_mask.BLOCK_SIZE[0]
    # A query block touches the key blocks within one image row (+1) of it and the pooled keys.
    for qb in range(dense.shape[0]):
        lo, hi = max(qb * block - width - 1, 0), min((qb + 1) * block + width, N - 1)
        expected = torch.zeros(dense.shape[1], dtype=torch.bool)
        expected[lo // block:hi // block + 1] = True
        expected[N // block:] = True
        assert torch.equal(dense[qb].bool(), expected), qb
    assert block_mask.sparsity() > 50


def test_bad_shapes_name_the_argument():
    tensors = make_inputs(2, 2, 3, 4, 2, 8)
    tensors[6] = tensors[6][..., :1]
    with pytest.raises(ValueError, match='bias_pool must have shape'):
        flex_aggregated_attention(*tensors, 3, 4, compiled=False)
    with pytest.raises(ValueError, match='height\\*width'):
        flex_aggregated_attention(*make_inputs(2, 2, 3, 4, 2, 8), 4, 4, compiled=False)


@requires_cuda
@pytest.mark.parametrize('dtype,tol', [(torch.float32, 1e-4), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize('shape', [(2, 3, 5, 7, 4, 24), (2, 2, 3, 4, 0, 16),
                                   (2, 3, 33, 35, 121, 24)])
def test_cuda_compiled_forward_backward_match_reference(shape, dtype, tol):
    B, heads, height, width, Np, d = shape
    tensors = [t.requires_grad_() for t in make_inputs(*shape, dtype=dtype, device='cuda')]
    out = flex_aggregated_attention(*tensors, height, width)
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    expected = aggregated_attention_reference(*leaves, height, width)
    grads_ref = torch.autograd.grad(expected, leaves, grad_out.double())
    assert rel_error(out, expected) < tol
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == dtype, name
        assert rel_error(g, g_ref) < tol * 4, name
