import math

import pytest
import torch
import torch._dynamo
import torch.nn as nn
import torch.nn.functional as F

from transnext_mm.models.layers import log_cpb
from transnext_mm.models.layers.log_cpb import (LogCPB, log_cpb_axis, log_cpb_bias,
                                                set_pos_bias_cache)
from transnext_mm.ops import dispatch
from transnext_mm.ops.log_cpb_mlp import log_cpb_mlp_torch


def pairwise_log_cpb(fc1, fc2, query_size, key_size, pretrain_len):
    """Brute force: evaluate the MLP on the coordinates of every (query, key) pair."""

    def axis(n_query, n_key):
        q = torch.arange(n_query, dtype=torch.float32)
        # average-pool 0..n-1 into n_key bins the way adaptive pooling splits them
        k = torch.stack(
            [q[(i * n_query) // n_key:-(-(i + 1) * n_query // n_key)].mean() for i in range(n_key)])
        return q, k

    qh, kh = axis(query_size[0], key_size[0])
    qw, kw = axis(query_size[1], key_size[1])
    qy, qx = torch.meshgrid(qh, qw, indexing='ij')
    ky, kx = torch.meshgrid(kh, kw, indexing='ij')
    dy = (qy.reshape(-1, 1) - ky.reshape(1, -1)) / (pretrain_len - 1) * 8
    dx = (qx.reshape(-1, 1) - kx.reshape(1, -1)) / (pretrain_len - 1) * 8
    coords = torch.stack([dy, dx], dim=-1)
    coords = torch.sign(coords) * torch.log2(coords.abs() + 1) / math.log2(8)
    return fc2(F.relu(fc1(coords))).permute(2, 0, 1)


@pytest.fixture
def mlp():
    return nn.Linear(2, 512), nn.Linear(512, 3)


@pytest.mark.parametrize('query_size,key_size', [((7, 9), (3, 4)), ((5, 5), (5, 5)),
                                                 ((1, 6), (1, 1)), ((13, 11), (1, 2))])
def test_log_cpb_matches_pairwise(mlp, query_size, key_size):
    fc1, fc2 = mlp
    expected = pairwise_log_cpb(fc1, fc2, query_size, key_size, pretrain_len=56)
    bias = log_cpb_bias(fc1, fc2, query_size, key_size, pretrain_len=56)
    assert bias.shape == (3, query_size[0] * query_size[1], key_size[0] * key_size[1])
    torch.testing.assert_close(bias, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('query_size,key_size', [((9, 7), (3, 4)), ((6, 6), (2, 2)),
                                                 ((4, 11), (1, 1))])
def test_interpolation_is_the_resized_table(mlp, query_size, key_size):
    fc1, fc2 = mlp
    out = log_cpb_bias(fc1, fc2, query_size, key_size, 56, table_query=(6, 6), table_key=(2, 2))
    # explicit: tabulate, resize bilinearly over the key grid first, then over the query grid
    table = pairwise_log_cpb(fc1, fc2, (6, 6), (2, 2), 56).reshape(3 * 36, 1, 2, 2)
    step = F.interpolate(table, size=key_size, mode='bilinear', align_corners=False)
    num_keys = key_size[0] * key_size[1]
    step = step.reshape(3, 6, 6, num_keys).permute(0, 3, 1, 2).reshape(3 * num_keys, 1, 6, 6)
    step = F.interpolate(step, size=query_size, mode='bilinear', align_corners=False)
    expected = step.reshape(3, num_keys, -1).transpose(1, 2)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'query_size,key_size',
    [
        ((9, 7), (3, 4)),  # both axes up-sampled
        ((4, 3), (1, 1)),  # both down-sampled
        ((6, 11), (2, 4)),  # the width only
        ((9, 6), (3, 2)),  # the height only
        ((6, 6), (1, 3)),  # the key grid only
        ((6, 6), (2, 2)),  # nothing
        ((1, 13), (1, 2)),
    ])
def test_interpolated_bias_equals_resize_of_gathered_table(query_size, key_size):
    """The eager interpolation (width folded into the table, then the height's query and key
    resize as one image) equals the traced graphs' path (the gathered bias resized over the key
    grid, then the query grid), forward and backward, in float64."""
    (coords_h, index_h), (coords_w, index_w) = log_cpb.log_cpb_axes((6, 6), (2, 2), 56,
                                                                    torch.device('cpu'))
    table = torch.randn(
        3, coords_h.numel(), coords_w.numel(), dtype=torch.float64, requires_grad=True)
    ours = log_cpb.interpolated_bias(table, index_h, index_w, query_size, key_size)
    expected = log_cpb.resize_bias(
        log_cpb.gather_table(table, index_h, index_w), query_size, key_size)
    assert ours.shape == expected.shape == (3, query_size[0] * query_size[1],
                                            key_size[0] * key_size[1])
    torch.testing.assert_close(ours, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(*(torch.autograd.grad(y, table, grad)[0] for y in (ours, expected)))


@pytest.mark.parametrize('in_size,out_size', [((25, 25), (25, 42)), ((7, 5), (3, 11)),
                                              ((13, 4), (1, 4)), ((2, 9), (17, 6))])
def test_bilinear_matrix_equals_interpolate(in_size, out_size):
    """Resizing with bilinear_matrix (as interpolated_bias folds an axis) equals F.interpolate,
    up- and down-sampling, forward and backward."""
    x = torch.randn(5, *in_size, dtype=torch.float64, requires_grad=True)
    rows = log_cpb.bilinear_matrix(out_size[0], in_size[0], dtype=torch.float64)
    cols = log_cpb.bilinear_matrix(out_size[1], in_size[1], dtype=torch.float64)
    ours = rows @ x @ cols.T
    expected = F.interpolate(x[:, None], size=out_size, mode='bilinear', align_corners=False)[:, 0]
    torch.testing.assert_close(ours, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(*(torch.autograd.grad(y, x, grad)[0] for y in (ours, expected)))


@pytest.mark.parametrize('query_size,key_size', [((5, 7), (2, 3)), ((16, 16), (16, 16)),
                                                 ((1, 9), (1, 4)), ((13, 6), (3, 1))])
def test_gather_table_equals_indexing(query_size, key_size):
    """The per-axis gather equals indexing the table at every (query, key) pair, and so do its
    gradients (odd grids, full attention's equal grids, single rows / columns)."""
    (coords_h, index_h), (coords_w, index_w) = log_cpb.log_cpb_axes(query_size, key_size, 7,
                                                                    torch.device('cpu'))
    table = torch.randn(
        3, coords_h.numel(), coords_w.numel(), dtype=torch.float64, requires_grad=True)
    ours = log_cpb.gather_table(table, index_h, index_w)
    expected = table[:, index_h[:, None, :, None], index_w[None, :, None, :]]
    assert ours.shape == (3, query_size[0], query_size[1], key_size[0], key_size[1])
    assert torch.equal(ours, expected)
    grad = torch.randn_like(expected)
    torch.testing.assert_close(*(torch.autograd.grad(y, table, grad)[0] for y in (ours, expected)))


def test_interpolated_bias_gradients_match_explicit(mlp):
    fc1, fc2 = mlp
    params = [fc1.weight, fc1.bias, fc2.weight, fc2.bias]
    out = log_cpb_bias(fc1, fc2, (5, 7), (2, 3), 56, table_query=(4, 4), table_key=(2, 2))
    grads = torch.autograd.grad(out.square().sum(), params)
    table = pairwise_log_cpb(fc1, fc2, (4, 4), (2, 2), 56).reshape(3 * 16, 1, 2, 2)
    step = F.interpolate(table, size=(2, 3), mode='bilinear', align_corners=False)
    step = step.reshape(3, 4, 4, 6).permute(0, 3, 1, 2).reshape(18, 1, 4, 4)
    expected = F.interpolate(step, size=(5, 7), mode='bilinear', align_corners=False)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for g, e in zip(grads, expected_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def test_modes_agree_at_table_size_and_differ_elsewhere(mlp):
    fc1, fc2 = mlp
    interp = LogCPB('interpolate', (16, 16), (2, 2), 56)
    extrap = LogCPB('extrapolate', (16, 16), (2, 2), 56)
    torch.testing.assert_close(
        interp(fc1, fc2, (16, 16), (2, 2), True), extrap(fc1, fc2, (16, 16), (2, 2), True))
    assert not torch.allclose(
        interp(fc1, fc2, (24, 20), (3, 2), True),
        extrap(fc1, fc2, (24, 20), (3, 2), True),
        atol=1e-4)


def test_eval_cache_reuses_and_invalidates(mlp):
    fc1, fc2 = mlp
    cpb = LogCPB('extrapolate', (8, 8), (1, 1), 56)
    with torch.no_grad():
        first = cpb(fc1, fc2, (8, 8), (2, 2), training=False)
        assert cpb.cached_sizes() == [((8, 8), (2, 2))]
        assert cpb(fc1, fc2, (8, 8), (2, 2), training=False) is first
        fc2.weight.mul_(2)  # an optimiser step or load_state_dict changes the weights in place
        second = cpb(fc1, fc2, (8, 8), (2, 2), training=False)
        assert second is not first and not torch.allclose(second, first)
        cpb.clear_cache()
        assert cpb(fc1, fc2, (8, 8), (2, 2), training=False) is not second
    # training mode never caches and keeps the graph to the MLP
    bias = cpb(fc1, fc2, (8, 8), (2, 2), training=True)
    assert bias.requires_grad
    previous = set_pos_bias_cache(False)
    try:
        with torch.no_grad():
            assert cpb(fc1, fc2, (8, 8), (2, 2), False) is not cpb(fc1, fc2, (8, 8), (2, 2), False)
    finally:
        set_pos_bias_cache(previous)


def test_bad_mode_and_pretrain_len():
    with pytest.raises(ValueError, match='pos_bias_mode must be one of'):
        LogCPB('nearest', (8, 8), (1, 1), 56)
    with pytest.raises(ValueError, match='pretrain_size'):
        LogCPB('interpolate', (8, 8), (1, 1), 1)


def test_bias_backward_under_autocast():
    """The bias is gathered in float32 also inside an autocast region (a low-precision
    backward against float32 gather operators used to fail)."""
    fc1, fc2 = nn.Linear(2, 16), nn.Linear(16, 3)
    expected = log_cpb_bias(fc1, fc2, (4, 6), (2, 3), 8, (5, 5), (3, 3))
    grads_expected = torch.autograd.grad(expected.sum(), [fc1.weight, fc2.weight])
    with torch.autocast('cpu', dtype=torch.bfloat16):
        bias = log_cpb_bias(fc1, fc2, (4, 6), (2, 3), 8, (5, 5), (3, 3))
    assert bias.dtype == torch.float32
    grads = torch.autograd.grad(bias.sum(), [fc1.weight, fc2.weight])
    torch.testing.assert_close(bias, expected, rtol=2e-2, atol=2e-2)
    for g, g_expected in zip(grads, grads_expected):
        torch.testing.assert_close(g, g_expected, rtol=5e-2, atol=5e-2 * g_expected.abs().max())


@pytest.mark.parametrize('args', [((9, 7), (3, 4), 56), ((16, 16), (16, 16), 7),
                                  ((9, 7), (3, 4), 56, (6, 6), (2, 2)),
                                  ((5, 11), (5, 11), 7, (4, 4), (4, 4))])
def test_candidate_table_equals_compact_table(mlp, args, monkeypatch):
    """Traced, the table holds all 4n-3 doubled offsets per axis instead of the occurring ones:
    the same bias, computed without unique."""
    fc1, fc2 = mlp
    compact = log_cpb_bias(fc1, fc2, *args)
    coords, index = log_cpb_axis(args[0][0], args[1][0], args[2], torch.device('cpu'))
    monkeypatch.setattr(torch.compiler, 'is_compiling', lambda: True)
    full_coords, full_index = log_cpb_axis(args[0][0], args[1][0], args[2], torch.device('cpu'))
    assert full_coords.numel() == 4 * args[0][0] - 3 > coords.numel()
    assert torch.equal(full_coords[full_index], coords[index])
    torch.testing.assert_close(log_cpb_bias(fc1, fc2, *args), compact, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('mode', ['interpolate', 'extrapolate'])
def test_compiled_bias_equals_eager(mlp, mode):
    fc1, fc2 = mlp
    cpb = LogCPB(mode, (6, 6), (2, 2), 56)
    expected = cpb(fc1, fc2, (9, 7), (3, 4), training=True)
    torch._dynamo.reset()
    compiled = torch.compile(cpb, fullgraph=True, backend='eager')
    for _ in range(2):  # the second call finds nothing cached
        torch.testing.assert_close(compiled(fc1, fc2, (9, 7), (3, 4), False), expected)
    assert cpb.cached_sizes() == []


@pytest.mark.parametrize('chunk_rows', [1, 7, 512])
@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_chunked_mlp_matches_plain_mlp(monkeypatch, chunk_rows, dtype):
    """The chunked MLP (hidden blocks recomputed in the backward) against Linear -> ReLU ->
    Linear: values and the gradients of all four parameters and of the points, with a ragged
    last chunk."""
    monkeypatch.setattr(log_cpb, 'MLP_CHUNK_ROWS', chunk_rows)
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(2, 64).to(dtype), nn.Linear(64, 3).to(dtype)
    points = torch.randn(45, 2, dtype=dtype, requires_grad=True)
    assert dispatch.log_cpb_mlp_impl(fc1.weight, points) == 'chunked'  # points need a grad
    out = log_cpb.log_cpb_mlp(fc1, fc2, points)
    expected = fc2(F.relu(fc1(points)))
    torch.testing.assert_close(out, expected)
    grad = torch.randn_like(out)
    params = [points, *fc1.parameters(), *fc2.parameters()]
    for g, g_ref in zip(
            torch.autograd.grad(out, params, grad), torch.autograd.grad(expected, params, grad)):
        torch.testing.assert_close(g, g_ref)
    if dtype == torch.float64:
        assert torch.autograd.gradcheck(lambda p, *w: log_cpb._ChunkedMLP.apply(p, *w),
                                        (points, fc1.weight, fc1.bias, fc2.weight, fc2.bias))


def test_mlp_impl_rule(monkeypatch):
    """The compiled op in eager CPU fp32 / fp64 for constant points; the chunked MLP for points
    that need a gradient, other dtypes and devices, or a missing build (which warns once); the
    plain MLP under autocast, on meta tensors and in traced graphs."""
    weight, points = torch.zeros(4, 2), torch.zeros(3, 2)
    built = dispatch.Build(built=True, cuda=False)
    missing = dispatch.Build(built=False, cuda=False, error='No module named transnext_mm._ext')
    rule = dispatch.log_cpb_mlp_impl
    assert rule(weight, points, 'auto', built) == 'op'
    assert rule(weight.double(), points, 'op', built) == 'op'
    assert rule(weight, points, 'torch', built) == 'chunked'
    assert rule(weight, points, 'reference', built) == 'chunked'
    assert rule(weight, points.requires_grad_(), 'auto', built) == 'chunked'
    with torch.no_grad():
        assert rule(weight, points, 'auto', built) == 'op'
    points = points.detach()
    assert rule(weight.half(), points, 'auto', built) == 'chunked'
    monkeypatch.setattr(dispatch, '_warned', set())
    with pytest.warns(UserWarning, match='not built'):
        assert rule(weight, points, 'auto', missing) == 'chunked'
    with pytest.raises(RuntimeError, match="impl='op'.* not built"):
        rule(weight, points, 'op', missing)
    with pytest.raises(ValueError, match='impl must be one of'):
        rule(weight, points, 'fast', built)
    assert rule(weight.to('meta'), points, 'auto', built) == 'plain'
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert rule(weight, points, 'auto', built) == 'plain'
    torch._dynamo.reset()
    compiled = torch.compile(
        lambda w: w + float(dispatch.log_cpb_mlp_impl(w, points, 'auto', built) == 'plain'),
        backend='eager',
        fullgraph=True)
    torch.testing.assert_close(compiled(weight), weight + 1)


def test_layer_impl_picks_the_mlp(monkeypatch):
    """The layer's impl (the backbone's attn_impl) decides the MLP: PyTorch for 'torch' /
    'reference', the compiled op (where built) for 'auto' / 'op'; same values either way."""
    calls = []
    monkeypatch.setattr(log_cpb, 'log_cpb_mlp_op',
                        lambda *a: calls.append(1) or log_cpb_mlp_torch(*a))
    monkeypatch.setattr(
        log_cpb,
        'log_cpb_mlp_impl',
        lambda w, p, impl='auto': 'op' if impl in ('auto', 'op') else 'chunked')
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(2, 16), nn.Linear(16, 3)
    results = {}
    for impl in ('torch', 'reference', 'auto', 'op'):
        cpb = LogCPB('extrapolate', (6, 6), (2, 2), 56, impl)
        results[impl] = cpb.compute(fc1, fc2, (5, 7), (2, 3))
    assert len(calls) == 2
    for impl in ('reference', 'auto', 'op'):
        torch.testing.assert_close(results[impl], results['torch'])
    with pytest.raises(ValueError, match='impl must be one of'):
        LogCPB('extrapolate', (6, 6), (2, 2), 56, 'fast')
