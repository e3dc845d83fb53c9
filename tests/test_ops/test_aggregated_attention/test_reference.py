# Copyright (c) transnext-mm contributors. All rights reserved.
"""The window tables of the reference module against ``F.unfold``."""
import pytest
import torch
import torch.nn.functional as F

from transnext_mm.ops.aggregated_attention import compute_window_tables, window_tables


@pytest.mark.parametrize('size', [(1, 1), (3, 5), (6, 4)])
def test_window_tables_match_unfold(size):
    valid, count = compute_window_tables(*size)
    expected = F.unfold(torch.ones(1, 1, *size), 3, padding=1)[0].t().bool()
    assert torch.equal(valid, expected) and torch.equal(count, expected.sum(-1))
    cached = window_tables(*size, torch.device('cpu'))
    assert torch.equal(cached[0], expected) and torch.equal(cached[1], expected.sum(-1))
