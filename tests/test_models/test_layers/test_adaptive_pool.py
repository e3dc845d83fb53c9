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
