import pytest
import torch
import torch.nn.functional as F

from transnext_mm.models.layers.adaptive_pool import adaptive_avg_pool_tokens, adaptive_pool_bins


@pytest.mark.parametrize('length,bins', [(7, 3), (13, 13), (128, 16), (29, 1), (10, 4)])
def test_pool_bins_are_adaptive_pooling_bins(length, bins):
    start, end = adaptive_pool_bins(length, bins)
    values = torch.arange(length, dtype=torch.float64)
    expected = F.adaptive_avg_pool1d(values[None, None], bins)[0, 0]
    means = torch.stack([values[s:e].mean() for s, e in zip(start.tolist(), end.tolist())])
    assert torch.equal(means, expected)


@pytest.mark.parametrize('size,pool', [((17, 12), (2, 1)), ((33, 45), (4, 5)), ((7, 7), (7, 7))])
def test_export_pooling_equals_adaptive_avg_pool(size, pool, monkeypatch):
    x = torch.randn(2, size[0] * size[1], 5)
    expected = adaptive_avg_pool_tokens(x, *size, pool)
    torch.testing.assert_close(
        expected,
        F.adaptive_avg_pool2d(x.transpose(1, 2).reshape(2, 5, *size),
                              pool).flatten(2).transpose(1, 2))
    monkeypatch.setattr(torch.compiler, 'is_exporting', lambda: True)  # the prefix-sum path
    torch.testing.assert_close(adaptive_avg_pool_tokens(x, *size, pool), expected)


@pytest.mark.parametrize('B,size,pool,uniform', [(2, (16, 12), (4, 3), True),
                                                 (1, (15, 21), (5, 7), True),
                                                 (3, (7, 7), (7, 7), True),
                                                 (2, (13, 17), (4, 5), False)])
def test_pooling_gradient_equals_adaptive_avg_pool(B, size, pool, uniform):
    """The pooled tokens and their gradient (uniform bins: the broadcast backward; other sizes:
    PyTorch's) equal ``F.adaptive_avg_pool2d``'s on the (B, C, H, W) image, and the broadcast
    backward is itself differentiable."""
    x = torch.randn(B, size[0] * size[1], 6, dtype=torch.float64, requires_grad=True)
    out = adaptive_avg_pool_tokens(x, *size, pool)
    assert (type(out.grad_fn).__name__ == '_UniformBinPoolBackward') == uniform
    image = x.transpose(1, 2).reshape(B, 6, *size)
    ref = F.adaptive_avg_pool2d(image, pool).flatten(2).transpose(1, 2)
    torch.testing.assert_close(out, ref)
    grad = torch.randn_like(out)
    torch.testing.assert_close(
        torch.autograd.grad(out, x, grad)[0],
        torch.autograd.grad(ref, x, grad)[0],
        rtol=1e-12,
        atol=1e-12)
    if uniform:
        assert torch.autograd.gradgradcheck(lambda t: adaptive_avg_pool_tokens(t, *size, pool),
                                            (x, ))
    with torch.no_grad():
        torch.testing.assert_close(adaptive_avg_pool_tokens(x, *size, pool), ref)
