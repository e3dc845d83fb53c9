# Copyright (c) transnext-mm contributors. All rights reserved.
"""Inputs and tolerance checks shared by the tests of the compiled op and of its CUDA replay."""
import torch
import torch.nn.functional as F

from transnext_mm.models.layers.log_cpb import log_cpb_axes
from transnext_mm.ops.aggregated_attention import PoolBiasTable, aggregated_attention_reference

NAMES = ('q', 'k', 'v', 'k_pool', 'v_pool', 'rpb_local', 'bias_pool', 'token_weight')


def make_inputs(B, heads, height, width, Np, d, dtype=torch.float64, device='cpu', q_scale=4.0):
    """Inputs like the backbone's: unit keys, queries scaled up to sharpen the softmax."""
    N = height * width
    gen = torch.Generator().manual_seed(B * 1000 + N * 10 + Np + d)

    def randn(*shape, scale=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dtype)

    tensors = [
        randn(B, heads, N, d, scale=q_scale),
        F.normalize(randn(B, heads, N, d), dim=-1),
        randn(B, heads, N, d),
        F.normalize(randn(B, heads, Np, d), dim=-1),
        randn(B, heads, Np, d),
        randn(heads, 9, scale=0.5),
        randn(heads, N, Np),
        randn(B, heads, N, 9, scale=0.5)
    ]
    return [t.to(device).requires_grad_() for t in tensors]


def reference_with_grads(tensors, height, width, grad_out):
    """Reference output and input gradients in float64 (from the same, possibly rounded, inputs)."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    out = aggregated_attention_reference(*leaves, height, width)
    return out, torch.autograd.grad(out, leaves, grad_out.double())


def assert_close_scaled(actual, expected, rel, name='', atol=0.0):
    """|actual - expected| <= rel * max|expected| + atol (errors relative to the scale)."""
    actual, expected = actual.double(), expected.double()
    assert actual.shape == expected.shape, name
    if expected.numel() == 0:
        return
    scale = expected.abs().max().clamp_min(1e-12)
    err = (actual - expected).abs().max()
    assert err <= rel * scale + atol, f'{name}: max error {err:.3g} > {rel} * {scale:.3g} + {atol}'


def make_table_inputs(B, heads, height, width, pool, d, dtype=torch.float64, q_scale=4.0):
    """The op's inputs with ``bias_pool`` in table form: log-CPB indices of the grids, a random
    table."""
    Np = pool[0] * pool[1]
    tensors = make_inputs(B, heads, height, width, Np, d, dtype=dtype, q_scale=q_scale)
    (coords_h, index_h), (coords_w, index_w) = log_cpb_axes((height, width), pool, 7,
                                                            torch.device('cpu'))
    gen = torch.Generator().manual_seed(height * 100 + width)
    table = torch.randn(
        heads, coords_h.numel() * coords_w.numel(), generator=gen,
        dtype=torch.float64).to(dtype).requires_grad_()
    bias = PoolBiasTable(table, index_h * coords_w.numel(), index_w)
    return tensors[:6] + [bias] + tensors[7:]


def make_tap_inputs(B,
                    heads,
                    height,
                    width,
                    pool,
                    d,
                    taps,
                    cols='folded',
                    dtype=torch.float64,
                    q_scale=4.0):
    """The op's inputs with ``bias_pool`` in table form with row taps: random row indices and
    weights (the weights in the op's accumulation type), a random table. ``cols``: 'folded'
    (contiguous per query column, ``x * Wk + px``, as a folded width gives) or 'log-cpb' (the
    offset indices of the grids)."""
    pool_h, pool_w = pool
    tensors = make_inputs(B, heads, height, width, pool_h * pool_w, d, dtype=dtype, q_scale=q_scale)
    gen = torch.Generator().manual_seed(height * 100 + width + taps)
    if cols == 'folded':
        index_cols = torch.arange(width * pool_w).view(width, pool_w)
        col_range = width * pool_w
    else:
        _, (coords_w, index_cols) = log_cpb_axes((height, width), pool, 7, torch.device('cpu'))
        col_range = coords_w.numel()
    table_rows = 2 * height + 3
    rows = torch.randint(0, table_rows, (taps, height, pool_h), generator=gen) * col_range
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    weights = torch.rand(taps, height, pool_h, generator=gen, dtype=torch.float64).to(acc)
    table = torch.randn(
        heads, table_rows * col_range, generator=gen,
        dtype=torch.float64).to(dtype).requires_grad_()
    bias = PoolBiasTable(table, rows, index_cols, weights)
    return tensors[:6] + [bias] + tensors[7:]


def table_oracle(tensors, height, width, grad_out):
    """Output and gradients (the table's in place of bias_pool's) of the reference on the
    materialised bias, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in tensors[:6] + tensors[7:]]
    table = tensors[6].table.detach().double().requires_grad_()
    weights = tensors[6].row_weights
    bias = tensors[6]._replace(
        table=table, row_weights=None if weights is None else weights.double()).dense()
    out = aggregated_attention_reference(*leaves[:6], bias, leaves[6], height, width)
    grads = torch.autograd.grad(out, leaves[:6] + [table] + leaves[6:], grad_out.double())
    return out, grads
