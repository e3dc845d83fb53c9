# Copyright (c) transnext-mm contributors. All rights reserved.
"""The compiled op with the pooled bias in table form against the PyTorch oracle (the reference on
the materialised bias), the layers' choice of form, and the backbone end to end."""
import warnings

import pytest
import torch
import torch.nn as nn
from aggregated_attention_cases import (NAMES, assert_close_scaled, make_table_inputs,
                                        make_tap_inputs, table_oracle)

from transnext_mm.models.layers.log_cpb import LogCPB
from transnext_mm.ops import dispatch
from transnext_mm.ops.aggregated_attention import (PoolBiasTable, aggregated_attention,
                                                   aggregated_attention_reference,
                                                   aggregated_attention_table_op)

requires_op = pytest.mark.skipif(
    not dispatch.BUILD.built, reason=f'transnext_mm._ext is not built ({dispatch.BUILD.error})')


def table_op_grads(tensors, height, width, grad_out=None):
    out = aggregated_attention_table_op(*tensors, height, width)
    grad_out = torch.randn_like(out) if grad_out is None else grad_out
    leaves = tensors[:6] + [tensors[6].table] + tensors[7:]
    return out, grad_out, torch.autograd.grad(out, leaves, grad_out)


# (B, heads, height, width, pool, d): odd grids, single rows / columns, batch > 1, the fp32
# register-tile head dims (8, 24) and generic ones, a 1x1 pooled grid; pooled rows of 8 keys and
# more (the fp32 kernels gather the bias of 8 queries of an image row at once, 8 keys at a time:
# 11 and 16 keys per pooled row, query chunks of 128 that start inside an image row).
SHAPES = [(2, 3, 5, 7, (2, 3), 24), (1, 2, 1, 6, (1, 2), 5), (3, 1, 13, 11, (3, 5), 3),
          (2, 2, 9, 8, (4, 4), 8), (1, 1, 7, 9, (1, 1), 24), (2, 2, 20, 17, (5, 4), 24),
          (2, 2, 13, 29, (3, 11), 24), (1, 1, 10, 16, (2, 16), 5)]


def assert_table_op_matches_oracle(tensors, height, width, dtype, rel):
    out, grad_out, grads = table_op_grads(tensors, height, width)
    out_ref, grads_ref = table_oracle(tensors, height, width, grad_out)
    assert out.dtype == dtype
    assert_close_scaled(out, out_ref, rel, 'out')
    names = NAMES[:6] + ('bias_table', ) + NAMES[7:]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert_close_scaled(g, g_ref, rel, name)


@requires_op
@pytest.mark.parametrize('dtype,rel', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('shape', SHAPES)
def test_table_form_matches_reference(shape, dtype, rel):
    B, heads, height, width, pool, d = shape
    assert_table_op_matches_oracle(
        make_table_inputs(*shape, dtype=dtype), height, width, dtype, rel)


@requires_op
@pytest.mark.parametrize('dtype,rel', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('order', ['log-cpb', 'reversed', 'mixed'])
def test_table_form_column_index_orders(order, dtype, rel):
    """The kernels take any column indices, not only log-CPB's (every row stepping by one common
    negative amount): one common positive step (reversed) and rows with different steps (mixed:
    every other row reversed)."""
    height, width, pool = 9, 8, (4, 4)
    tensors = make_table_inputs(2, 2, height, width, pool, 24, dtype=dtype)
    bias = tensors[6]
    cols = bias.index_cols
    if order == 'reversed':
        cols = cols.flip(1)
    elif order == 'mixed':
        cols = cols.clone()
        cols[1::2] = cols[1::2].flip(1)
    steps = (cols[:, 1:] - cols[:, :-1]).unique()
    assert len(steps) == (2 if order == 'mixed' else 1)
    tensors[6] = PoolBiasTable(bias.table, bias.index_rows, cols.contiguous())
    assert_table_op_matches_oracle(tensors, height, width, dtype, rel)


# (B, heads, height, width, pool, d, taps): row taps (a bias resized along both axes has up to
# four bilinear taps per pooled row), odd grids, batch > 1, the fp32 register-tile head dims (24,
# 8) and a generic one, 11 keys per pooled row, one tap.
TAP_SHAPES = [(2, 3, 5, 7, (2, 3), 24, 4), (1, 2, 13, 29, (3, 11), 24, 2),
              (3, 1, 9, 8, (4, 4), 5, 3), (2, 2, 20, 17, (5, 4), 8, 1)]


@requires_op
@pytest.mark.parametrize('dtype,rel', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('cols', ['folded', 'log-cpb'])
@pytest.mark.parametrize('shape', TAP_SHAPES)
def test_table_form_row_taps_match_reference(shape, cols, dtype, rel):
    """Row taps (``row_weights``): each entry a weighted sum of table entries, with column
    indices contiguous per query column (a folded width) or log-CPB's offsets."""
    B, heads, height, width, pool, d, taps = shape
    tensors = make_tap_inputs(*shape, cols=cols, dtype=dtype)
    assert_table_op_matches_oracle(tensors, height, width, dtype, rel)


@requires_op
def test_table_form_one_tap_of_weight_one_is_the_plain_form():
    """``row_weights`` of ones over one tap compute what the plain table form computes."""
    height, width = 9, 8
    tensors = make_table_inputs(2, 2, height, width, (4, 4), 24, dtype=torch.float32)
    bias = tensors[6]
    out, grad_out, grads = table_op_grads(tensors, height, width)
    tensors[6] = bias._replace(
        index_rows=bias.index_rows[None], row_weights=torch.ones(1, height, 4))
    out_taps, _, grads_taps = table_op_grads(tensors, height, width, grad_out)
    torch.testing.assert_close(out_taps, out, rtol=0, atol=0)
    for name, g, g_taps in zip(NAMES, grads, grads_taps):
        torch.testing.assert_close(g_taps, g, rtol=1e-6, atol=1e-6, msg=name)


@requires_op
def test_table_form_large_table():
    """A table of more than 2^24 entries over all heads (a resized axis folded in, as at detection
    sizes): the backward splits the queries into fewer groups (each owns a partial table
    gradient); the result is the oracle's. The indices are moved to the table's far end."""
    height, width, pool = 20, 17, (3, 4)  # 3 chunks of 128 queries: groups of 2 and 1 chunks
    tensors = make_table_inputs(2, 2, height, width, pool, 24, dtype=torch.float32)
    bias = tensors[6]
    table_size = 2**23 + 5
    shift = table_size - bias.table.shape[1]
    table = torch.zeros(2, table_size)
    table[:, shift:] = bias.table.detach()
    tensors[6] = PoolBiasTable(table.requires_grad_(), bias.index_rows + shift, bias.index_cols)
    assert_table_op_matches_oracle(tensors, height, width, torch.float32, 2e-5)


@requires_op
@pytest.mark.parametrize('taps', [0, 4])
def test_table_form_equals_dense_op_and_is_deterministic(taps):
    """The table form (plain, and with row taps) computes what the dense op computes, and its
    table gradient (per-group partial sums reduced in a fixed order) is the same bit for bit on
    every run."""
    height, width = 23, 19
    if taps:
        tensors = make_tap_inputs(2, 2, height, width, (4, 3), 24, taps, dtype=torch.float32)
    else:
        tensors = make_table_inputs(2, 2, height, width, (4, 3), 24, dtype=torch.float32)
    out, grad_out, grads = table_op_grads(tensors, height, width)
    dense = tensors[:6] + [tensors[6].dense()] + tensors[7:]
    out_dense = aggregated_attention(*dense, height, width, impl='op')
    torch.testing.assert_close(out, out_dense, rtol=1e-6, atol=1e-6)
    for _ in range(3):
        _, _, again = table_op_grads(tensors, height, width, grad_out)
        assert all(torch.equal(g, g2) for g, g2 in zip(grads, again))


@requires_op
@pytest.mark.parametrize('height,width,pool,taps', [(5, 7, (2, 2), 0), (1, 1, (1, 1), 0),
                                                    (4, 9, (2, 3), 0), (5, 6, (2, 3), 3)])
def test_table_form_gradcheck_float64(height, width, pool, taps):
    if taps:
        tensors = make_tap_inputs(2, 2, height, width, pool, 3, taps, q_scale=1.0)
    else:
        tensors = make_table_inputs(2, 2, height, width, pool, 3, q_scale=1.0)
    bias = tensors[6]

    def fn(q, k, v, k_pool, v_pool, rpb_local, table, token_weight):
        return aggregated_attention_table_op(q, k, v, k_pool, v_pool, rpb_local,
                                             bias._replace(table=table), token_weight, height,
                                             width)

    inputs = tensors[:6] + [bias.table] + tensors[7:]
    assert torch.autograd.gradcheck(fn, inputs, eps=1e-6, atol=1e-7, rtol=1e-5)


@requires_op
def test_table_form_frozen_table_gets_no_gradient():
    tensors = make_table_inputs(2, 2, 5, 6, (2, 2), 8)
    tensors[6] = tensors[6]._replace(table=tensors[6].table.detach())
    out = aggregated_attention_table_op(*tensors, 5, 6)
    trainable = [t for t in tensors[:6] + tensors[7:] if t.requires_grad]
    grads = torch.autograd.grad(out, trainable, torch.ones_like(out))
    assert len(grads) == 7


@requires_op
def test_table_form_opcheck():
    height, width = 3, 5
    tensors = [
        t.detach() if isinstance(t, torch.Tensor) else t
        for t in make_table_inputs(2, 2, height, width, (1, 2), 4, dtype=torch.float32)
    ]
    bias = tensors[6]._replace(table=tensors[6].table.detach())
    args = (*tensors[:6], bias.table, bias.index_rows, bias.index_cols, None, tensors[7], height,
            width)
    grad_args = (*tensors[:6], bias.table.clone().requires_grad_(), bias.index_rows,
                 bias.index_cols, None, tensors[7], height, width)
    torch.library.opcheck(torch.ops.transnext_mm.aggregated_attention_table_forward.default,
                          grad_args)
    out, lse = torch.ops.transnext_mm.aggregated_attention_table_forward(*args)
    for bias_grad in (True, False):
        torch.library.opcheck(
            torch.ops.transnext_mm.aggregated_attention_table_backward.default,
            (torch.randn_like(out), *args[:11], out, lse, height, width, bias_grad))


@requires_op
def test_table_form_bad_inputs_name_the_argument():
    tensors = make_table_inputs(1, 2, 4, 5, (2, 2), 8, dtype=torch.float32)
    bias = tensors[6]
    bad = bias._replace(index_cols=bias.index_cols[:, :1])
    with pytest.raises(ValueError, match='index_rows and index_cols give a pooled grid'):
        aggregated_attention_table_op(*tensors[:6], bad, tensors[7], 4, 5)
    bad = bias._replace(index_rows=bias.index_rows.int())
    with pytest.raises(ValueError, match='bias_pool.index_rows must be an int64'):
        aggregated_attention_table_op(*tensors[:6], bad, tensors[7], 4, 5)
    bad = bias._replace(table=bias.table[:1])
    with pytest.raises(ValueError, match=r'bias_pool.table must have shape \(2, table_size\)'):
        aggregated_attention_table_op(*tensors[:6], bad, tensors[7], 4, 5)
    with pytest.raises(ValueError, match=r'bias_pool.index_rows must be an int64 \(taps, 4'):
        aggregated_attention_table_op(*tensors[:6], bias._replace(row_weights=torch.ones(4, 2)),
                                      tensors[7], 4, 5)
    taps = bias._replace(
        index_rows=bias.index_rows.expand(3, 4, 2), row_weights=torch.ones(2, 4, 2))
    with pytest.raises(
            ValueError,
            match=r"bias_pool.row_weights must be a floating-point tensor "
            r"of index_rows' shape \(3, 4, 2\)"):
        aggregated_attention_table_op(*tensors[:6], taps, tensors[7], 4, 5)
    bad = bias._replace(index_rows=bias.index_rows + bias.table.shape[1])
    detached = [t.detach() for t in tensors[:6] + tensors[7:]]
    # The op's own check: the weights in the accumulation type (float32 for float32 inputs).
    with pytest.raises(RuntimeError, match=r'row_weights must be a Float tensor'):
        torch.ops.transnext_mm.aggregated_attention_table_forward(
            *detached[:6], bias.table.detach(),
            bias.index_rows.expand(3, 4, 2).contiguous(), bias.index_cols,
            torch.ones(3, 4, 2, dtype=torch.float64), detached[6], 4, 5)
    with pytest.raises(RuntimeError, match=r'index_rows \+ index_cols must lie in'):
        torch.ops.transnext_mm.aggregated_attention_table_forward(*detached[:6],
                                                                  bias.table.detach(),
                                                                  bad.index_rows, bad.index_cols,
                                                                  None, detached[6], 4, 5)


@requires_op
def test_table_form_index_bounds_rechecked_after_in_place_change():
    """The op remembers index pairs whose bounds passed (on a GPU the check waits for the
    device); the same tensors changed in place, or a table too small for them, are checked
    again."""
    tensors = make_table_inputs(1, 2, 4, 5, (2, 2), 8, dtype=torch.float32)
    detached = [t.detach() for t in tensors[:6] + tensors[7:]]
    bias = tensors[6]
    table, rows, cols = bias.table.detach(), bias.index_rows.clone(), bias.index_cols.clone()

    def forward(table):
        return torch.ops.transnext_mm.aggregated_attention_table_forward(
            *detached[:6], table, rows, cols, None, detached[6], 4, 5)

    out, _ = forward(table)
    torch.testing.assert_close(forward(table)[0], out, rtol=0, atol=0)
    with pytest.raises(RuntimeError, match=r'index_rows \+ index_cols must lie in'):
        forward(table[:, :int(rows.max() + cols.max())])
    rows.add_(table.shape[1])
    with pytest.raises(RuntimeError, match=r'index_rows \+ index_cols must lie in'):
        forward(table)
    cols.sub_(3 * table.shape[1])
    rows.sub_(table.shape[1])
    with pytest.raises(RuntimeError, match=r'index_rows \+ index_cols must lie in'):
        forward(table)


def test_layers_hand_over_the_same_index_tensors_every_step():
    """The table form's index tensors are cached per grids in eager mode (the op's bounds check
    then runs once), also where an axis is resized; the table itself is recomputed."""
    fc1, fc2 = nn.Linear(2, 16), nn.Linear(16, 2)
    # (mode, query grid, key grid); interpolation from an (8, 8) x (2, 2) table: unresized,
    # columns resized, rows resized, both.
    cases = [('extrapolate', (9, 7), (3, 2)), ('interpolate', (8, 8), (2, 2)),
             ('interpolate', (8, 6), (2, 2)), ('interpolate', (6, 8), (2, 2)),
             ('interpolate', (6, 10), (2, 3))]
    for mode, query, key in cases:
        log_cpb = LogCPB(mode, (8, 8), (2, 2), pretrain_len=7)
        first = log_cpb.table_form(fc1, fc2, query, key)
        second = log_cpb.table_form(fc1, fc2, query, key)
        assert first.index_rows is second.index_rows, (mode, query)
        assert first.index_cols is second.index_cols, (mode, query)
        assert first.row_weights is second.row_weights, (mode, query)
        assert (first.row_weights is None) == (query != (6, 10)), (mode, query)
        assert first.table is not second.table
        torch.testing.assert_close(first.dense(), log_cpb.compute(fc1, fc2, query, key))


def test_table_index_cache_keeps_the_most_recently_used_grids(monkeypatch):
    """Multi-scale training meets many grids: the index cache keeps the most recent ones."""
    from transnext_mm.models.layers import log_cpb
    monkeypatch.setattr(log_cpb, 'TABLE_INDEX_CACHE_SIZE', 2)
    monkeypatch.setattr(log_cpb, '_table_index_cache', log_cpb.OrderedDict())
    fc1, fc2 = nn.Linear(2, 16), nn.Linear(16, 2)
    model = LogCPB('extrapolate', (8, 8), (2, 2), pretrain_len=7)
    first = model.table_form(fc1, fc2, (5, 6), (2, 2))
    model.table_form(fc1, fc2, (7, 6), (2, 2))
    assert model.table_form(fc1, fc2, (5, 6), (2, 2)).index_rows is first.index_rows
    model.table_form(fc1, fc2, (9, 6), (2, 2))  # evicts (7, 6), the least recently used
    assert len(log_cpb._table_index_cache) == 2
    assert [key[2] for key in log_cpb._table_index_cache] == [(5, 6), (9, 6)]


def test_other_implementations_materialise_the_table():
    """The PyTorch and reference paths take a table too: they materialise it (the oracle)."""
    height, width = 5, 6
    tensors = make_table_inputs(2, 2, height, width, (2, 3), 8)
    dense = tensors[:6] + [tensors[6].dense()] + tensors[7:]
    expected = aggregated_attention_reference(*dense, height, width)
    for impl in ('torch', 'reference'):
        out = aggregated_attention(*tensors, height, width, impl=impl)
        torch.testing.assert_close(out, expected)


def test_bias_form_decided_in_dispatch():
    x = torch.randn(1, 4, 8)
    built = dispatch.Build(True, False)
    assert dispatch.attention_bias_form('torch', x, build=built) == 'dense'
    assert dispatch.attention_bias_form('reference', x, build=built) == 'dense'
    assert dispatch.attention_bias_form('op', x, build=built) == 'table'
    assert dispatch.attention_bias_form('auto', x, build=built) == 'table'
    assert dispatch.attention_bias_form('op', x.to('meta'), build=built) == 'dense'

    def form(t):
        return dispatch.attention_bias_form('op', t, build=built)

    torch._dynamo.reset()
    compiled = torch.compile(lambda t: t + len(form(t)), backend='eager', fullgraph=True)
    torch.testing.assert_close(compiled(x), x + len('dense'))
    traced = torch.jit.trace(lambda t: t + len(form(t)), (x, ), check_trace=False)
    torch.testing.assert_close(traced(x), x + len('dense'))


@pytest.mark.parametrize(
    'mode,query,key,resized',
    [
        ('extrapolate', (9, 7), (3, 4), ()),
        ('interpolate', (8, 8), (2, 2), ()),
        ('interpolate', (8, 13), (2, 4), (1, )),  # W up-sampled (a detector's 800x1344)
        ('interpolate', (8, 5), (2, 1), (1, )),  # W down-sampled
        ('interpolate', (11, 8), (3, 2), (0, )),  # H up-sampled
        ('interpolate', (8, 8), (2, 3), (1, )),  # only the key grid resized
        ('interpolate', (9, 7), (3, 4), (0, 1)),  # H up, W down (a 768x1344 input)
        ('interpolate', (5, 13), (1, 3), (0, 1)),  # H down, W up
        ('interpolate', (8, 13), (3, 3), (0, 1)),  # H: only the key rows resized
        ('interpolate', (11, 9), (2, 2), (0, 1)),  # H: only the query rows resized
    ])
def test_log_cpb_table_form_equals_dense_bias(mode, query, key, resized):
    """The table form is the dense bias at any size: the MLP table where nothing is resized, a
    folded axis where one is, the folded width and the height's bilinear row taps (up to four:
    two query-row times two key-row taps, one where that grid is the table's) where both are.
    No warning. Gradients reach the MLP alike."""
    torch.manual_seed(0)
    fc1, fc2 = nn.Linear(2, 32), nn.Linear(32, 3)
    cpb = LogCPB(mode, (8, 8), (2, 2), 56)
    assert cpb.resized_axes(query, key) == resized
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        dense = cpb(fc1, fc2, query, key, training=True)
        got = cpb(fc1, fc2, query, key, training=True, form='table')
    assert isinstance(got, PoolBiasTable)
    torch.testing.assert_close(got.dense(), dense)
    weights = torch.randn_like(dense)
    params = list(fc1.parameters()) + list(fc2.parameters())
    grads = torch.autograd.grad((dense * weights).sum(), params)
    grads_table = torch.autograd.grad((got.dense() * weights).sum(), params)
    for g, g_table in zip(grads, grads_table):
        torch.testing.assert_close(g_table, g)
    if resized:
        # A resized axis is folded into the table: it holds (U x Q x K) entries per head.
        axis = resized[-1]
        assert got.table.shape[1] % (query[axis] * key[axis]) == 0
    if len(resized) == 2:
        taps = (1 if query[0] == 8 else 2) * (1 if key[0] == 2 else 2)
        assert got.row_weights.shape == got.index_rows.shape == (taps, query[0], key[0])
        assert got.row_weights.dtype == torch.float32
        torch.testing.assert_close(got.row_weights.sum(0), torch.ones(query[0], key[0]))
    else:
        assert got.row_weights is None
    with pytest.raises(ValueError, match="form must be one of"):
        cpb(fc1, fc2, query, key, training=True, form='sparse')


def test_log_cpb_table_form_eval_cache():
    fc1, fc2 = nn.Linear(2, 16), nn.Linear(16, 2)
    cpb = LogCPB('extrapolate', (8, 8), (2, 2), 56)
    with torch.no_grad():
        first = cpb(fc1, fc2, (6, 5), (2, 2), training=False, form='table')
        again = cpb(fc1, fc2, (6, 5), (2, 2), training=False, form='table')
        assert again.table is first.table
        fc2.bias.add_(1.0)
        changed = cpb(fc1, fc2, (6, 5), (2, 2), training=False, form='table')
        assert changed.table is not first.table
        torch.testing.assert_close(changed.table, first.table + 1.0)
    cpb.clear_cache()


@requires_op
@pytest.mark.parametrize(
    'mode,img_size,size',
    [
        ('extrapolate', 224, (67, 93)),
        ('interpolate', 96, (96, 96)),
        ('interpolate', 64, (64, 93)),  # W resized in every stage: its table form
        ('interpolate', 64, (93, 64)),  # H resized
        ('interpolate', 224, (67, 93)),  # both resized: row taps
    ])
def test_backbone_table_form_matches_torch_path(mode, img_size, size):
    """Training step of the backbone with the op (table form) against the PyTorch path (dense
    bias): outputs and every gradient, the log-CPB MLPs' included, at batch 2, without a
    warning."""
    from transnext_mm.models.backbones import TransNeXt
    torch.manual_seed(0)
    cfg = dict(arch='micro', pos_bias_mode=mode, img_size=img_size)
    model_torch = TransNeXt(attn_impl='torch', **cfg).train()
    model_op = TransNeXt(attn_impl='op', **cfg).train()
    model_op.load_state_dict(model_torch.state_dict())
    x = torch.randn(2, 3, *size)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        outs_torch, outs_op = model_torch(x), model_op(x)
    for o_t, o_op in zip(outs_torch, outs_op):
        torch.testing.assert_close(o_op, o_t, rtol=1e-4, atol=1e-4)
    weights = [torch.randn_like(o) for o in outs_torch]
    sum((o * w).sum() for o, w in zip(outs_torch, weights)).backward()
    sum((o * w).sum() for o, w in zip(outs_op, weights)).backward()
    params_op = dict(model_op.named_parameters())
    noise = 1e-8 * max(p.grad.abs().max() for p in model_torch.parameters() if p.grad is not None)
    cpb_checked = 0
    for name, p in model_torch.named_parameters():
        if p.grad is None:
            assert params_op[name].grad is None, name
            continue
        assert_close_scaled(params_op[name].grad, p.grad, 1e-4, name, atol=noise)
        cpb_checked += 'cpb_fc' in name
    assert cpb_checked > 8
    with torch.no_grad():
        for o_t, o_op in zip(model_torch.eval()(x), model_op.eval()(x)):
            torch.testing.assert_close(o_op, o_t, rtol=1e-4, atol=1e-4)
