# Copyright (c) transnext-mm contributors. All rights reserved.
"""The CUDA kernels' code (block bodies, launch plans, host glue) replayed on the CPU against the
readable reference implementation and the CPU kernels.

The replay is a test extension of its own (transnext_mm._ext_replay), built only when asked for:
these tests fail, saying how to build it, when it is missing (see
:func:`transnext_mm.ops.aggregated_attention.replay.replay_ext`).
"""
import pytest
import torch
import torch.nn.functional as F
from aggregated_attention_cases import (NAMES, assert_close_scaled, make_inputs, make_table_inputs,
                                        make_tap_inputs, reference_with_grads, table_oracle)

from transnext_mm.ops import dispatch
from transnext_mm.ops.aggregated_attention import PoolBiasTable
from transnext_mm.ops.aggregated_attention.replay import (aggregated_attention_cuda_replay,
                                                          replay_ext)


def cpu_kernels():
    """The compiled op's module (the CPU kernels the replay is compared with)."""
    assert dispatch.BUILD.built, f'transnext_mm._ext is not built ({dispatch.BUILD.error})'
    return dispatch.compiled_ext()


def test_replay_is_built():
    """Fails, saying how to build it, where the replay is missing (it is never skipped)."""
    assert replay_ext().__name__ == 'transnext_mm._ext_replay'


# Gradient tolerances of the replayed CUDA kernels: with fp16 / bf16 storage the backward
# recomputes delta in fp32 from the probabilities (not from the rounded output), which keeps
# the gradients' error at the inputs' rounding (with the rounded output: up to 5e-3 in fp16).
REPLAY_GRAD_REL = {
    torch.float64: 4e-10,
    torch.float32: 8e-5,
    torch.float16: 1e-3,
    torch.bfloat16: 1e-2
}


@pytest.mark.parametrize(
    'dtype,rel', [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.float16, 3e-3),
                  (torch.bfloat16, 2e-2)],
    ids=['float64', 'float32', 'float16', 'bfloat16'])
@pytest.mark.parametrize('shape', [(2, 3, 5, 7, 4, 24), (1, 2, 20, 17, 70, 24),
                                   (2, 2, 9, 13, 5, 32), (1, 1, 1, 6, 3, 5), (2, 1, 3, 4, 0, 8)])
def test_cuda_kernels_replayed_on_cpu_match_reference(shape, dtype, rel):
    """The CUDA kernels' block bodies, grids and host glue, their threads run as fibers."""
    B, heads, height, width, Np, d = shape
    tensors = [t.detach() for t in make_inputs(*shape, dtype=dtype)]
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64).to(dtype)
    out, lse, grads = aggregated_attention_cuda_replay(*tensors, height, width, grad_out=grad_out)
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    assert out.dtype == dtype
    assert lse.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close_scaled(out, out_ref, rel, 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert_close_scaled(g, g_ref, REPLAY_GRAD_REL[dtype], name)


@pytest.mark.parametrize('unaligned', [False, True])
@pytest.mark.parametrize('d,dtype', [(16, torch.float16), (48, torch.float16), (64, torch.float16),
                                     (64, torch.float32)])
def test_replayed_head_dim_variants_and_row_alignment(d, dtype, unaligned):
    """The exact head-dim variants, with 16-byte vector loads / stores of aligned rows and the
    element-wise fallback for q / k / v rows that are not 16-byte aligned."""
    shape = B, heads, height, width, Np, d = 2, 2, 5, 7, 40, d
    tensors = [t.detach() for t in make_inputs(*shape, dtype=dtype)]
    if unaligned:  # channel-contiguous views starting one element into their rows
        for j in range(3):
            padded = torch.zeros(B, heads, height * width, d + 1, dtype=dtype)
            padded[..., 1:] = tensors[j]
            tensors[j] = padded[..., 1:]
            assert tensors[j].data_ptr() % 16 != 0
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64).to(dtype)
    out, _, grads = aggregated_attention_cuda_replay(*tensors, height, width, grad_out=grad_out)
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    assert_close_scaled(out, out_ref, REPLAY_GRAD_REL[dtype], 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, g_ref, REPLAY_GRAD_REL[dtype], name)


@pytest.mark.parametrize(
    'B,Np,target_blocks,lanes,groups,group_len', [(3, 5, 1, 2, 1, 4), (3, 5, 4, 2, 2, 2),
                                                  (5, 70, 1, 4, 1, 8)],
    ids=['one-group-two-passes', 'two-groups', 'four-lanes-three-key-tiles'])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float16])
def test_replayed_pool_grad_schedules(B, Np, target_blocks, lanes, groups, group_len, dtype):
    """The pooled-key gradient kernel with the batch in the grid and in the block's batch lanes:
    one chunk and one group of all 3 batch elements in two passes of 2 lanes (the second pass
    with one busy lane adds to the bias gradient the first wrote), 3 chunks and groups of
    2 + 1 batch elements (per-group partial sums, summed afterwards), or 4 lanes of 32 keys
    (70 keys: 3 key tiles, the last ragged) over 5 batch elements (passes of 4 + 1)."""
    shape = B, heads, height, width, Np, d = B, 1, 7, 10, Np, 24
    plan = replay_ext().aggregated_attention_launch_plans(B, heads, height * width, Np, d, True,
                                                          target_blocks)['pool_grad']
    assert plan[3] == 128 and plan[6] == lanes
    key_tiles = -(-Np // (128 // lanes))
    assert plan[0] == key_tiles * groups and plan[2] == heads  # groups fastest in grid x
    assert plan[5] == group_len  # whole passes of `lanes` batch elements
    tensors = [t.detach() for t in make_inputs(*shape, dtype=dtype)]
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64).to(dtype)
    _, _, grads = aggregated_attention_cuda_replay(
        *tensors, height, width, grad_out=grad_out, pool_target_blocks=target_blocks)
    _, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, g_ref, REPLAY_GRAD_REL[dtype], name)


def test_launch_plans_put_the_batch_in_the_grid():
    """TransNeXt-Micro stage 1 at 224x224, batch 64: the pooled-key gradient kernel used to run
    8 blocks (chunks capped at 256 / B, batch looped per thread); now it fills the GPU."""
    ext = replay_ext()
    plans = ext.aggregated_attention_launch_plans(64, 2, 56 * 56, 49, 24, True,
                                                  ext.pool_grad_target_blocks)
    gx, gy, gz, threads, chunk_len, group_len, lanes = plans['pool_grad']
    assert gx * gy * gz >= 512 and threads == 128 and lanes == 4
    assert gy * chunk_len >= 56 * 56 > (gy - 1) * chunk_len  # chunks cover the queries once
    assert gz == 2  # heads
    key_tiles = 2  # 49 keys in tiles of 128 / 4 lanes = 32
    assert gx % key_tiles == 0
    groups = gx // key_tiles  # grid x: key tiles x batch groups
    assert group_len % lanes == 0  # whole passes of 4 batch elements
    assert groups * group_len >= 64 > (groups - 1) * group_len  # groups cover the batch once
    assert groups * 2 * 56 * 56 * 49 <= 1 << 24  # bounded bias partial sums
    # Query side: one block per (query block, head, batch element), 1-D grid; a grid this large
    # needs no query split.
    assert plans['forward'] == [25 * 2 * 64, 1, 1, 128, 1]
    assert plans['backward_query'] == [25 * 2 * 64, 1, 1, 128]
    # batch x heads above CUDA's 65535 limit of grid y / z: still one plain 1-D grid.
    plans = ext.aggregated_attention_launch_plans(40000, 2, 9, 4, 24, True, 1024)
    assert plans['forward'] == [80000, 1, 1, 128, 1] and plans['pool_grad'][2] == 2


@pytest.mark.parametrize('batch,blocks,split', [(1, 384, 4), (2, 384, 2), (4, 384, 1), (8, 768, 1)])
def test_launch_plans_split_queries_of_small_grids(batch, blocks, split):
    """TransNeXt-Tiny stage 3 at 512x512 (32x32 queries, 12 heads, 256 pooled keys, head dim
    24): at batch 1 the forward would run 96 blocks of 128 queries on a GPU of 132 SMs; below
    about two blocks per SM each query's pooled keys are split over 2 or 4 threads."""
    ext = replay_ext()
    plans = ext.aggregated_attention_launch_plans(batch, 12, 32 * 32, 256, 24, True, 1024)
    assert plans['forward'] == [blocks, 1, 1, 128, split]
    assert plans['backward_query'] == [8 * 12 * batch, 1, 1, 128]  # not split
    # Not for the generic head-dim variant, nor with fewer than two pooled keys per part.
    assert ext.aggregated_attention_launch_plans(1, 12, 1024, 256, 40, True, 1)['forward'][4] == 1
    assert ext.aggregated_attention_launch_plans(1, 12, 1024, 3, 24, True, 1)['forward'][4] == 2
    assert ext.aggregated_attention_launch_plans(1, 12, 1024, 1, 24, True, 1)['forward'][4] == 1


@pytest.mark.parametrize('split', [1, 2, 4])
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32, torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 2, 5, 7, 70, 24), (1, 3, 9, 13, 33, 16), (2, 1, 3, 4, 1, 32),
                                   (1, 2, 3, 5, 0, 24)])
def test_replayed_forward_query_split(shape, dtype, split):
    """The forward with each query's pooled keys over 1, 2 or 4 threads whose online-softmax
    states are merged in shared memory: ragged tiles, a ragged last block of queries, one
    pooled key (parts without keys) and none."""
    B, heads, height, width, Np, d = shape
    tensors = [t.detach() for t in make_inputs(*shape, dtype=dtype)]
    out, lse = replay_ext().aggregated_attention_forward_replay(*tensors, height, width, split)
    out_ref, _ = reference_with_grads(tensors, height, width,
                                      torch.zeros(B, heads, height * width, d, dtype=dtype))
    rel = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 2e-2}[dtype]
    assert_close_scaled(out, out_ref, rel, 'out')
    out_1, lse_1 = replay_ext().aggregated_attention_forward_replay(*tensors, height, width, 1)
    torch.testing.assert_close(lse, lse_1, rtol=rel, atol=rel)


def test_replay_barrier_model():
    """What lets the replay catch a misplaced __syncthreads in the shared kernel bodies: threads
    run in reverse order between barriers, shared memory starts as NaN, and a barrier that not
    all threads reach is an error. (Dropping either ctx.sync() of for_each_pool_tile in
    common/cuda/aggregated_attention_blocks.cuh makes
    test_cuda_kernels_replayed_on_cpu_match_reference fail for every shape with pooled keys:
    checked again after the bias_pool tile joined the pooled-key tiles, 16 of its 20 cases
    failed, the 4 passing ones being Np = 0.)"""
    ext = replay_ext()
    torch.testing.assert_close(
        ext.cuda_replay_selftest('barrier'), torch.arange(63, -1, -1, dtype=torch.float32))
    racy = ext.cuda_replay_selftest('no_barrier')
    assert racy[32:].isnan().all() and not racy[:32].isnan().any()  # read before written
    with pytest.raises(RuntimeError, match='not reached by every thread'):
        ext.cuda_replay_selftest('divergent')
    with pytest.raises(RuntimeError, match="mode must be 'barrier'"):
        ext.cuda_replay_selftest('fast')


def test_replay_without_bias_grad_and_fast_cpu_path_agree():
    tensors = [t.detach() for t in make_inputs(2, 2, 9, 13, 40, 24, dtype=torch.float32)]
    grad_out = torch.randn(2, 2, 9 * 13, 24)
    ext, cpu = replay_ext(), cpu_kernels()
    out, lse = cpu.aggregated_attention_forward(*tensors, 9, 13)
    grads = cpu.aggregated_attention_backward(grad_out, *tensors, out, lse, 9, 13, False)
    assert grads[6].numel() == 0  # no bias_pool gradient asked for
    out_r, lse_r = ext.aggregated_attention_forward_replay(*tensors, 9, 13, 0)
    grads_r = ext.aggregated_attention_backward_replay(grad_out, *tensors, out, lse, 9, 13, True,
                                                       ext.pool_grad_target_blocks)
    torch.testing.assert_close(out_r, out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse_r, lse, rtol=1e-5, atol=1e-5)
    for i, (g, g_r) in enumerate(zip(grads, grads_r)):
        if i != 6:
            torch.testing.assert_close(g_r, g, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize('dtype', [torch.float64, torch.float16])
def test_strided_views_are_read_in_place(dtype):
    """q / k / v / grad_out as head views of (B, N, C) projections: no copies, same results,
    outputs laid out as (B, N, heads, d); both the CPU kernels and the CUDA kernels' replay."""
    B, heads, height, width, Np, d = 2, 3, 9, 14, 37, 24
    N = height * width
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(
        B, N, heads * d, generator=gen, dtype=torch.float64).view(B, N, heads, d).transpose(1,
                                                                                            2) * 3
    kv = torch.randn(
        B, N, 2 * heads * d, generator=gen, dtype=torch.float64).view(B, N, 2 * heads,
                                                                      d).transpose(1, 2)
    k, v = F.normalize(kv[:, :heads], dim=-1), kv[:, heads:]
    grad_out = torch.randn(
        B, N, heads * d, generator=gen, dtype=torch.float64).view(B, N, heads, d).transpose(1, 2)
    others = [t.detach() for t in make_inputs(B, heads, height, width, Np, d)[3:]]
    tensors = [t.to(dtype) for t in (q, k, v, *others)]
    grad_out = grad_out.to(dtype)
    assert not any(t.is_contiguous() for t in tensors[:3] + [grad_out])
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    rel = 1e-10 if dtype == torch.float64 else 3e-3
    ext, cpu = replay_ext(), cpu_kernels()

    def replay_forward(*args):
        return ext.aggregated_attention_forward_replay(*args, 0)

    def replay_backward(*args):
        return ext.aggregated_attention_backward_replay(*args, ext.pool_grad_target_blocks)

    for forward, backward in ((cpu.aggregated_attention_forward, cpu.aggregated_attention_backward),
                              (replay_forward, replay_backward)):
        out, lse = forward(*tensors, height, width)
        assert out.transpose(1, 2).is_contiguous()  # (B, N, heads, d) memory
        grads = backward(grad_out, *tensors, out, lse, height, width, True)
        assert_close_scaled(out, out_ref, rel, 'out')
        for name, g, g_ref in zip(NAMES, grads, grads_ref):
            assert_close_scaled(g, g_ref, rel * 4, name)


# ------------------------------------------------------------------------------------------------
# The pooled bias in table form: the kernels read each entry from the table, the backward gathers
# the table's gradient per entry.
TABLE_NAMES = NAMES[:6] + ('bias_table', ) + NAMES[7:]

# Every dtype of the CUDA kernels (float64 only on the replay), with the output's tolerance.
TABLE_DTYPES = pytest.mark.parametrize(
    'dtype,rel', [(torch.float64, 1e-10), (torch.float32, 2e-5), (torch.float16, 3e-3),
                  (torch.bfloat16, 2e-2)],
    ids=['float64', 'float32', 'float16', 'bfloat16'])


def check_replayed_table_form(tensors, height, width, dtype, rel, target_blocks=None):
    """The replayed kernels on table-form inputs (the table detached) against the reference on
    the materialised bias, forward and backward."""
    tensors = [
        t.detach() if torch.is_tensor(t) else t._replace(table=t.table.detach()) for t in tensors
    ]
    B, heads, _, d = tensors[0].shape
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64).to(dtype)
    out, _, grads = aggregated_attention_cuda_replay(
        *tensors, height, width, grad_out=grad_out, pool_target_blocks=target_blocks)
    out_ref, grads_ref = table_oracle(tensors, height, width, grad_out)
    assert out.dtype == dtype
    assert_close_scaled(out, out_ref, rel, 'out')
    for name, g, g_ref in zip(TABLE_NAMES, grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape, name
        assert_close_scaled(g, g_ref, REPLAY_GRAD_REL[dtype], name)


@TABLE_DTYPES
@pytest.mark.parametrize('shape', [(2, 3, 5, 7, (2, 3), 24), (1, 2, 20, 17, (5, 4), 24),
                                   (3, 1, 13, 11, (3, 5), 5), (1, 2, 1, 6, (1, 2), 32),
                                   (2, 1, 7, 9, (1, 1), 40)])
def test_replayed_table_form_matches_reference(shape, dtype, rel):
    """The CUDA kernels with the table form against the reference on the materialised bias:
    odd grids, one row, batch > 1, exact (24, 32) and generic (5, 40) head dims, a 1x1 pooled
    grid."""
    B, heads, height, width, pool, d = shape
    check_replayed_table_form(make_table_inputs(*shape, dtype=dtype), height, width, dtype, rel)


@TABLE_DTYPES
@pytest.mark.parametrize('target_blocks', [1, 4, None], ids=['one-group', 'groups', 'gpu-plan'])
@pytest.mark.parametrize('shape,cols', [((2, 3, 5, 7, (2, 3), 24, 4), 'folded'),
                                        ((3, 1, 13, 11, (3, 5), 5, 3), 'log-cpb'),
                                        ((1, 2, 9, 8, (4, 4), 32, 2), 'folded')])
def test_replayed_table_form_row_taps_match_reference(shape, cols, target_blocks, dtype, rel):
    """Row taps (``row_weights``, float32 for the half types): the kernels sum the weighted taps
    of each entry, and the table gradient kernel weights each tap's gathered sum; one batch
    group, several (per-group partial sums of the bias gradient), the GPU's plan."""
    B, heads, height, width, pool, d, taps = shape
    check_replayed_table_form(
        make_tap_inputs(*shape, cols=cols, dtype=dtype), height, width, dtype, rel, target_blocks)


@pytest.mark.parametrize('target_blocks', [1, 4, None], ids=['one-group', 'groups', 'gpu-plan'])
@pytest.mark.parametrize('order', ['log-cpb', 'mixed'])
def test_replayed_table_form_equals_dense(order, target_blocks):
    """The table form computes what the dense kernels compute from the materialised bias: the
    output and the other gradients bit for bit, the table gradient as the dense bias gradient
    summed per entry. Column indices in log-CPB's order and mixed (every other row reversed:
    no common step); one batch group, several (per-group partial sums), the GPU's plan."""
    B, heads, height, width, pool, d = 3, 2, 9, 8, (4, 4), 24
    tensors = make_table_inputs(B, heads, height, width, pool, d, dtype=torch.float64)
    bias = tensors[6]
    cols = bias.index_cols.clone()
    if order == 'mixed':
        cols[1::2] = cols[1::2].flip(1)
    bias = PoolBiasTable(bias.table.detach(), bias.index_rows, cols)
    tensors = [t.detach() for t in tensors[:6]] + [bias] + [tensors[7].detach()]
    dense = tensors[:6] + [bias.dense()] + tensors[7:]
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64)
    kwargs = dict(grad_out=grad_out, pool_target_blocks=target_blocks)
    out, lse, grads = aggregated_attention_cuda_replay(*tensors, height, width, **kwargs)
    out_d, lse_d, grads_d = aggregated_attention_cuda_replay(*dense, height, width, **kwargs)
    assert torch.equal(out, out_d) and torch.equal(lse, lse_d)
    for j, name in enumerate(TABLE_NAMES):
        if j != 6:
            assert torch.equal(grads[j], grads_d[j]), name
    index = bias.index_rows[:, None, :, None] + bias.index_cols[None, :, None, :]
    expected = torch.zeros_like(bias.table).index_add_(
        1, index.flatten(), grads_d[6].view(heads, height, width, *pool).flatten(1))
    torch.testing.assert_close(grads[6], expected, rtol=1e-12, atol=1e-12)
    # A fixed gathering order: the same bits on every run.
    _, _, again = aggregated_attention_cuda_replay(*tensors, height, width, **kwargs)
    assert torch.equal(again[6], grads[6])


def test_replayed_table_form_index_changed_in_place():
    """What the op derives from the index tensors (their bounds, their grouping by value for the
    table gradient) is kept per tensor and version: the same tensors changed in place between
    calls give the gradient of the new indices."""
    B, heads, height, width, pool, d = 2, 2, 9, 8, (4, 4), 8
    tensors = make_table_inputs(B, heads, height, width, pool, d, dtype=torch.float64)
    bias = tensors[6]
    rows, cols = bias.index_rows.clone(), bias.index_cols.clone()
    detached = [t.detach() for t in tensors[:6]], tensors[7].detach()
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64)

    def table_grad():
        table_bias = PoolBiasTable(bias.table.detach(), rows, cols)
        _, _, grads = aggregated_attention_cuda_replay(
            *detached[0], table_bias, detached[1], height, width, grad_out=grad_out)
        _, grads_ref = table_oracle(detached[0] + [table_bias] + [detached[1]], height, width,
                                    grad_out)
        return grads[6], grads_ref[6]

    first, first_ref = table_grad()
    assert_close_scaled(first, first_ref, REPLAY_GRAD_REL[torch.float64], 'bias_table')
    cols[1::2] = cols[1::2].flip(1).clone()  # in place: same tensor, new version
    second, second_ref = table_grad()
    assert not torch.allclose(second_ref, first_ref)
    assert_close_scaled(second, second_ref, REPLAY_GRAD_REL[torch.float64], 'bias_table')


@pytest.mark.parametrize('shift', [7, -3])
def test_replayed_table_form_signed_indices(shift):
    """Only the sums index_rows + index_cols must lie in the table: rows moved below zero (or
    columns), the other axis moved back, give the same bias and the same gradients bit for
    bit."""
    B, heads, height, width, pool, d = 2, 2, 7, 5, (3, 2), 8
    tensors = make_table_inputs(B, heads, height, width, pool, d, dtype=torch.float64)
    tensors = [t.detach() for t in tensors[:6]] + [tensors[6]] + [tensors[7].detach()]
    bias = tensors[6]
    moved = PoolBiasTable(bias.table.detach(), bias.index_rows - shift, bias.index_cols + shift)
    assert (moved.index_rows < 0).any() or (moved.index_cols < 0).any()
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64)
    results = [
        aggregated_attention_cuda_replay(
            *tensors[:6], table, tensors[7], height, width, grad_out=grad_out)
        for table in (PoolBiasTable(bias.table.detach(), bias.index_rows, bias.index_cols), moved)
    ]
    (out, _, grads), (out_moved, _, grads_moved) = results
    assert torch.equal(out, out_moved)
    for name, g, g_moved in zip(TABLE_NAMES, grads, grads_moved):
        assert torch.equal(g, g_moved), name


def test_replayed_table_form_sparse_table_and_no_bias_grad():
    """Table entries that no (query, key) pair reads get a zero gradient; the indices may leave
    gaps between column values. Without the bias gradient the forward and the other gradients are
    unchanged."""
    B, heads, height, width, pool, d = 2, 2, 5, 6, (2, 3), 16
    tensors = make_table_inputs(B, heads, height, width, pool, d, dtype=torch.float64)
    bias = tensors[6]
    # Spread the column values out (gaps), shift the rows into a larger table.
    cols = bias.index_cols * 3
    stride = int(cols.max()) + 5
    rows = bias.index_rows // (int(bias.index_cols.max()) + 1) * stride + stride
    table = torch.randn(heads, int(rows.max()) + stride, dtype=torch.float64)
    bias = PoolBiasTable(table, rows, cols)
    tensors = [t.detach() for t in tensors[:6]] + [bias] + [tensors[7].detach()]
    grad_out = torch.randn(B, heads, height * width, d, dtype=torch.float64)
    out, lse, grads = aggregated_attention_cuda_replay(*tensors, height, width, grad_out=grad_out)
    out_ref, grads_ref = table_oracle(tensors, height, width, grad_out)
    assert_close_scaled(out, out_ref, 1e-10, 'out')
    for name, g, g_ref in zip(TABLE_NAMES, grads, grads_ref):
        assert_close_scaled(g, g_ref, REPLAY_GRAD_REL[torch.float64], name)
    read = torch.zeros(table.shape[1], dtype=torch.bool)
    read[(rows[:, None, :, None] + cols[None, :, None, :]).flatten()] = True
    assert (~read).any() and (grads[6][:, ~read] == 0).all()
    args = [grad_out, *tensors[:6], table, rows, cols, None, tensors[7], out, lse, height, width]
    no_bias = replay_ext().aggregated_attention_table_backward_replay(
        *args, False,
        replay_ext().pool_grad_target_blocks)
    assert no_bias[6].shape == (0, table.shape[1])
    for j in (0, 1, 2, 3, 4, 5, 7):
        assert torch.equal(no_bias[j], grads[j]), TABLE_NAMES[j]
