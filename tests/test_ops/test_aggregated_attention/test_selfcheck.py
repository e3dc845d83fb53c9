# Copyright (c) transnext-mm contributors. All rights reserved.
"""The first-use self-check of the compiled op on CUDA (transnext_mm.ops.aggregated_attention.
selfcheck) and the decision on its outcome (transnext_mm.ops.dispatch).

On the CPU the check runs through dispatch's test hook (``self_check_for_tests``): with the CPU
replay of the CUDA kernels (the kernels' code, which must pass) and with deliberately wrong
kernels built on it (which must be caught and lead to the fallback).
"""
import functools
import re
import warnings

import pytest
import torch
from aggregated_attention_cases import make_inputs

from transnext_mm.ops import dispatch
from transnext_mm.ops.aggregated_attention import (aggregated_attention, aggregated_attention_op,
                                                   aggregated_attention_torch, selfcheck)
from transnext_mm.ops.aggregated_attention.replay import aggregated_attention_cuda_replay

F16, F32, F64, BF16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
CPU = torch.device('cpu')


def replay_kernel(tensors, height, width, grad_out):
    """The CUDA kernels' code on CPU tensors."""
    out, _, grads = aggregated_attention_cuda_replay(
        *[t.detach() for t in tensors], height, width, grad_out=grad_out)
    return out, grads


def perturbed(index, region=(Ellipsis, ), factor=1.01):
    """The replay with output (index None) or gradient ``index`` scaled by ``factor`` in
    ``region``."""

    def kernel(tensors, height, width, grad_out):
        out, grads = replay_kernel(tensors, height, width, grad_out)
        results = [out.clone()] + [g.clone() for g in grads]
        target = results[0 if index is None else index + 1]
        target[region] *= factor
        return results[0], results[1:]

    return kernel


def nan_output(tensors, height, width, grad_out):
    out, grads = replay_kernel(tensors, height, width, grad_out)
    out = out.clone()
    out[1, 0, 5, 3] = float('nan')
    return out, grads


def launch_error(tensors, height, width, grad_out):
    raise RuntimeError('CUDA error: too many resources requested for launch\nCUDA kernel errors '
                       'might be asynchronously reported at some other API call')


def replay_table_kernel(tensors, height, width, grad_out):
    """The CUDA kernels' code on CPU tensors, the pooled bias in table form (tensors[6])."""
    out, _, grads = aggregated_attention_cuda_replay(*tensors, height, width, grad_out=grad_out)
    return out, grads


def wrong_table_gradient(tensors, height, width, grad_out):
    out, grads = replay_table_kernel(tensors, height, width, grad_out)
    grads = list(grads)
    grads[6] = grads[6] * 1.01
    return out, grads


def check_with(kernel):
    return functools.partial(selfcheck.run_self_check, kernel=kernel)


def inputs(d=24, dtype=F32, height=5, width=7):
    return make_inputs(2, 2, height, width, 4, d, dtype=dtype)


@pytest.mark.parametrize('dtype', [F32, F16, BF16])
@pytest.mark.parametrize('head_dim', selfcheck.check_head_dims() + (5, 128))
def test_replayed_cuda_kernels_pass(head_dim, dtype):
    """Every variant (and unaligned / largest generic head dims) of the CUDA kernels' code
    passes within the tolerances: the check gives no false alarm on correct kernels."""
    assert selfcheck.run_self_check(CPU, dtype, head_dim, kernel=replay_kernel) == ''


@pytest.mark.parametrize('dtype', [F64, F32, F16, BF16])
def test_cpu_op_passes_the_default_check(dtype):
    """The default kernel (the compiled op itself, here its CPU kernels)."""
    assert selfcheck.run_self_check(CPU, dtype, 24) == ''


def test_inputs_cover_the_kernels_edges():
    tensors, grad_out = selfcheck.self_check_inputs(CPU, F32, 24)
    B, heads, N, d = tensors[0].shape
    num_pool = tensors[3].shape[2]
    assert B == 2 and N % 128 and N > 128  # a full and a ragged query block
    assert num_pool % 16 and num_pool % 32 and num_pool % 64 and num_pool > 64  # ragged tiles
    assert selfcheck.HEIGHT % 2 and selfcheck.WIDTH % 2
    assert not tensors[2].is_contiguous() and not grad_out.is_contiguous()  # head views
    again, _ = selfcheck.self_check_inputs(CPU, F32, 24)
    assert all(torch.equal(a, b) for a, b in zip(tensors, again))  # fixed seed


@pytest.mark.parametrize('kernel,message', [
    (perturbed(6), 'gradient of bias_pool: relative error 1.0[0-9]e-02 > tolerance 8e-05'),
    (perturbed(5), 'gradient of rpb_local: relative error 1.0[0-9]e-02 > tolerance 8e-05'),
    (nan_output, 'output: 1 NaN/Inf values of 13728'),
    (launch_error, 'the kernels raised RuntimeError: CUDA error: too many resources requested '
     'for launch$'),
])
def test_wrong_kernels_are_named_with_their_figures(kernel, message):
    failure = selfcheck.run_self_check(CPU, F32, 24, kernel=kernel)
    assert failure and re.search(message, failure), failure


# One wrong value in a place only inputs with that edge reach: the ragged second query block,
# the last (ragged) pooled-key tile, batch element 1, the image's bottom-right corner.
@pytest.mark.parametrize(
    'index,region', [
        (None, (Ellipsis, slice(128, None), slice(None))),
        (3, (Ellipsis, slice(64, None), slice(None))),
        (0, (1, )),
        (7, (Ellipsis, -1, slice(None))),
    ],
    ids=['ragged-query-block', 'ragged-pool-tile', 'batch-element-1', 'corner-query'])
def test_errors_at_the_kernels_edges_are_caught(index, region):
    failure = selfcheck.run_self_check(CPU, BF16, 24, kernel=perturbed(index, region, 1.5))
    assert 'relative error' in failure, failure


def test_failed_check_falls_back_once_with_one_warning():
    tensors = inputs()
    with dispatch.self_check_for_tests(check_with(perturbed(6))):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter('always')
            outs = [aggregated_attention(*tensors, 5, 7, impl='auto') for _ in range(2)]
        messages = [str(w.message) for w in caught]
        assert len(messages) == 1, messages
        assert ('failed its first-use self-check on cpu for torch.float32 and head-dim variant '
                'd=24: gradient of bias_pool: relative error' in messages[0]), messages[0]
        assert 'tolerance 8e-05' in messages[0] and 'falling back' in messages[0]
        expected = aggregated_attention_torch(*tensors, 5, 7)
        assert all(torch.equal(out, expected) for out in outs)  # the PyTorch path
        grads = torch.autograd.grad(outs[0].sum(), tensors)
        assert all(
            torch.equal(g, e) for g, e in zip(grads, torch.autograd.grad(expected.sum(), tensors)))
        with pytest.raises(
                RuntimeError,
                match="impl='op'.* but the compiled aggregated-attention "
                'op failed its first-use self-check .*gradient of bias_pool: relative '
                'error .* > tolerance 8e-05'):
            aggregated_attention(*tensors, 5, 7, impl='op')
        outcome, = dispatch.self_check_outcomes().values()
        assert outcome.head_dim == 24 and 'bias_pool' in outcome.failure
    assert all(key[0] != CPU for key in dispatch.self_check_outcomes())  # state restored


@pytest.mark.parametrize('kernel,message', [(nan_output, 'output: 1 NaN/Inf'),
                                            (launch_error, 'too many resources')])
def test_nan_and_launch_errors_fall_back_and_op_raises(kernel, message):
    tensors = inputs(d=16, dtype=BF16)
    with dispatch.self_check_for_tests(check_with(kernel)):
        with pytest.warns(UserWarning, match=message):
            out = aggregated_attention(*tensors, 5, 7)
        assert torch.equal(out, aggregated_attention_torch(*tensors, 5, 7))
        with pytest.raises(RuntimeError, match=f'd=16: .*{message}'):
            aggregated_attention(*tensors, 5, 7, impl='op')


def test_passing_check_runs_the_op():
    tensors = inputs()
    with dispatch.self_check_for_tests(check_with(replay_kernel)):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            out = aggregated_attention(*tensors, 5, 7, impl='auto')
            out_op = aggregated_attention(*tensors, 5, 7, impl='op')
        assert torch.equal(out, aggregated_attention_op(*tensors, 5, 7))
        assert torch.equal(out_op, out)
        (key, outcome), = dispatch.self_check_outcomes().items()
        assert key == (CPU, F32, 'd=24') and outcome.failure == '' and outcome.seconds > 0


def test_check_runs_its_backward_under_inference_mode():
    tensors = [t.detach() for t in inputs()]
    with dispatch.self_check_for_tests(check_with(perturbed(5))), torch.inference_mode():
        with pytest.warns(UserWarning, match='gradient of rpb_local'):
            out = aggregated_attention(*tensors, 5, 7)
        assert torch.equal(out, aggregated_attention_torch(*tensors, 5, 7))


def test_environment_variable_turns_the_check_off(monkeypatch):
    tensors = inputs()
    monkeypatch.setenv(dispatch.SELF_CHECK_ENV, '0')
    with dispatch.self_check_for_tests(check_with(launch_error)):
        with warnings.catch_warnings():
            warnings.simplefilter('error')
            out = aggregated_attention(*tensors, 5, 7, impl='op')
        assert torch.equal(out, aggregated_attention_op(*tensors, 5, 7))
        assert dispatch.self_check_outcomes() == {}
        monkeypatch.setenv(dispatch.SELF_CHECK_ENV, 'off')
        with pytest.raises(
                ValueError, match="TRANSNEXT_MM_CUDA_SELFCHECK must be '0' .* or '1' "
                ".*got 'off'"):
            aggregated_attention(*tensors, 5, 7)


def test_outcomes_are_kept_per_device_dtype_and_variant():
    calls = []

    def check(device, dtype, head_dim):
        calls.append((device, dtype, head_dim))
        return 'wrong' if head_dim == 16 else ''

    with dispatch.self_check_for_tests(check), torch.no_grad():
        for dtype, d in ((F32, 24), (F32, 24), (F64, 24), (F32, 16), (F32, 40), (F32, 8),
                         (F32, 128), (F32, 129), (F32, 16)):
            x = torch.zeros(1, 1, 1, d, dtype=dtype)
            dispatch.select('attention', 'torch', x)  # PyTorch chosen: nothing to check
            with warnings.catch_warnings():
                warnings.simplefilter('ignore')
                chosen = dispatch.select('attention', 'auto', x)
            assert chosen == ('torch' if d == 16 else 'op')
        for index in (0, 1, 0):  # devices are told apart by their index
            assert dispatch.attention_self_check(torch.device('cuda', index), F16, 24) == (
                dispatch.self_check_outcomes()[(torch.device('cuda', index), F16, 'd=24')])
        assert dispatch.attention_self_check(torch.device('meta'), F32, 24) is None
        keys = set(dispatch.self_check_outcomes())
    # d = 8, 128 share the generic variant with 40 (checked at 40); 129 has no variant.
    assert calls == [(CPU, F32, 24), (CPU, F64, 24), (CPU, F32, 16), (CPU, F32, 40),
                     (torch.device('cuda', 0), F16, 24), (torch.device('cuda', 1), F16, 24)]
    assert (CPU, F32, 'generic') in keys and len(keys) == 6


def test_head_dim_variants():
    assert [dispatch.head_dim_variant(d) for d in (1, 16, 24, 32, 48, 64, 65, 128, 129)
            ] == ['generic', 'd=16', 'd=24', 'd=32', 'd=48', 'd=64', 'generic', 'generic', None]


def test_torch_compile_keeps_the_fallback_in_one_graph():
    """Under torch.compile the check and the warning run once while tracing; a failed check
    compiles the PyTorch path into the graph."""
    tensors = inputs(d=16)

    def loss_fn(*t):
        return aggregated_attention(*t, 5, 7, impl='auto').square().sum()

    torch._dynamo.reset()
    with dispatch.self_check_for_tests(check_with(perturbed(6))):
        with pytest.warns(UserWarning, match='gradient of bias_pool'):
            loss = torch.compile(loss_fn, backend='aot_eager', fullgraph=True)(*tensors)
    torch._dynamo.reset()
    expected = aggregated_attention_torch(*tensors, 5, 7).square().sum()
    torch.testing.assert_close(loss, expected)


@pytest.mark.parametrize('strict', [False, True])
def test_export_records_the_op_without_a_check(strict):
    """An exported program calls the op directly wherever it later runs: no check at export."""
    tensors = tuple(t.detach() for t in inputs())

    class Core(torch.nn.Module):

        def forward(self, *t):
            return aggregated_attention(*t, 5, 7, impl='op')

    with dispatch.self_check_for_tests(check_with(launch_error)):
        program = torch.export.export(Core(), tensors, strict=strict)
        assert dispatch.self_check_outcomes() == {}
    assert 'aggregated_attention_forward' in str(program.graph)


@pytest.mark.cuda
@pytest.mark.parametrize('dtype', selfcheck.cuda_dtypes())
def test_cuda_self_check_passes_for_every_variant(dtype):
    device = torch.device('cuda', torch.cuda.current_device())
    for head_dim in selfcheck.check_head_dims():
        outcome = dispatch.attention_self_check(device, dtype, head_dim)
        assert outcome is not None and outcome.failure == '', outcome
    tensors = make_inputs(2, 2, 5, 7, 4, 24, dtype=dtype, device='cuda')
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        aggregated_attention(*tensors, 5, 7, impl='op')
    assert (device, dtype, 'd=24') in dispatch.self_check_outcomes()


@pytest.mark.parametrize('dtype', [F32, BF16])
@pytest.mark.parametrize('head_dim', [24, selfcheck.GENERIC_HEAD_DIM])
def test_replayed_table_form_passes(head_dim, dtype):
    """The check's second part, the pooled bias in table form, passes on the CUDA kernels'
    code."""
    assert selfcheck.run_self_check(
        CPU, dtype, head_dim, kernel=replay_kernel, table_kernel=replay_table_kernel) == ''


def test_table_form_inputs():
    tensors, _ = selfcheck.self_check_inputs(CPU, F32, 24)
    bias = selfcheck.table_form_inputs(tensors)[6]
    assert bias.index_rows.shape == (selfcheck.HEIGHT, 7) and bias.index_cols.shape == (13, 10)
    index = bias.index_rows[:, None, :, None] + bias.index_cols[None, :, None, :]
    assert index.min() == 0 and index.max() == bias.table.shape[1] - 1
    per_query = index.reshape(selfcheck.HEIGHT * selfcheck.WIDTH, -1)
    assert all(len(row.unique()) == selfcheck.NUM_POOL for row in per_query)  # distinct entries


def test_row_taps_inputs():
    tensors, _ = selfcheck.self_check_inputs(CPU, F32, 24)
    plain = selfcheck.table_form_inputs(tensors)[6]
    bias = selfcheck.row_taps_inputs(tensors)[6]
    assert bias.index_rows.shape == bias.row_weights.shape == (3, selfcheck.HEIGHT, 7)
    assert bias.row_weights.dtype == F32 and torch.equal(bias.index_rows[0], plain.index_rows)
    assert not torch.equal(bias.index_rows[1], plain.index_rows)
    assert selfcheck.row_taps_inputs(selfcheck.self_check_inputs(CPU, F64,
                                                                 24)[0])[6].row_weights.dtype == F64


def ignores_row_weights(tensors, height, width, grad_out):
    """The replayed kernels with every row tap of weight 1 (a kernel that drops the weights)."""
    bias = tensors[6]
    if bias.row_weights is not None:
        bias = bias._replace(row_weights=torch.ones_like(bias.row_weights))
    return replay_table_kernel([*tensors[:6], bias, *tensors[7:]], height, width, grad_out)


def test_wrong_row_taps_are_named():
    """The third part, row taps, runs after the plain table form passed."""
    failure = selfcheck.run_self_check(
        CPU, F32, 24, kernel=replay_kernel, table_kernel=ignores_row_weights)
    assert failure.startswith('bias in table form with row taps: output: relative error'), failure


def test_wrong_table_gradient_is_named():
    failure = selfcheck.run_self_check(
        CPU, F32, 24, kernel=replay_kernel, table_kernel=wrong_table_gradient)
    assert re.fullmatch(
        r'bias in table form: gradient of bias_table: relative error 1.0\de-02 > tolerance 8e-05',
        failure), failure
    # A failure of the dense part is reported without running the table form.
    failure = selfcheck.run_self_check(
        CPU, F32, 24, kernel=nan_output, table_kernel=wrong_table_gradient)
    assert failure == 'output: 1 NaN/Inf values of 13728', failure
