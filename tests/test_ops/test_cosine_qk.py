import pytest
import torch

from transnext_mm.ops import cosine_qk
from transnext_mm.ops.cosine_qk import cosine_queries_keys, cosine_queries_keys_torch
from transnext_mm.ops.dispatch import BUILD

requires_ext = pytest.mark.skipif(not BUILD.built, reason='transnext_mm._ext is not built')


def make_inputs(B, heads, N, d, dtype, tokens=9, split_heads=True):
    if split_heads:  # heads split out of a (B, N, 2*heads*d) projection: strided rows
        qk = torch.randn(B, N, 2 * heads, d, dtype=dtype) * 3
        q, k = qk.transpose(1, 2).chunk(2, dim=1)
    else:
        q, k = (torch.randn(B, heads, N, d, dtype=dtype) * 3 for _ in range(2))
    q[0, 0, 0] = 0  # a zero row: the norm's eps floor
    return (q, k, torch.randn(heads, 1, d, dtype=dtype), torch.rand(heads, N, 1, dtype=dtype) * 8,
            torch.randn(heads, d, tokens, dtype=dtype), torch.randn(heads, 1, tokens, dtype=dtype))


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize('B,heads,N,d,split', [(2, 3, 35, 24, True), (1, 1, 1, 5, True),
                                               (2, 4, 300, 8, False), (1, 12, 70, 24, True),
                                               (3, 2, 129, 7, False)])
def test_kernel_matches_pytorch(B, heads, N, d, split, dtype, tol):
    inputs = make_inputs(B, heads, N, d, dtype, split_heads=split)
    outs = cosine_qk.cosine_queries_keys_op(*inputs)
    refs = cosine_queries_keys_torch(*inputs)
    for name, out, ref in zip(('q', 'k', 'token_weight'), outs, refs):
        assert out.shape == ref.shape and out.dtype == dtype, name
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol, msg=name)
    assert outs[0].transpose(1, 2).is_contiguous()  # (B, N, heads, d) rows for the attention op


@requires_ext
def test_kernel_reads_channel_strided_inputs_and_passes_opcheck():
    q, k, *params = make_inputs(2, 2, 6, 5, torch.float32)
    q_t = q.transpose(-1, -2).contiguous().transpose(-1, -2)  # channels not contiguous
    for out, ref in zip(
            cosine_qk.cosine_queries_keys_op(q_t, k, *params),
            cosine_queries_keys_torch(q, k, *params)):
        torch.testing.assert_close(out, ref)
    torch.library.opcheck(
        torch.ops.transnext_mm.cosine_queries_keys.default, (q, k, *params),
        test_utils=('test_schema', 'test_faketensor'))


@requires_ext
def test_errors_name_the_argument():
    q, k, qe, scale, tokens, tbias = make_inputs(1, 2, 4, 8, torch.float32)
    with pytest.raises(RuntimeError, match='scale must have shape'):
        cosine_qk.cosine_queries_keys_op(q, k, qe, scale[:, :3], tokens, tbias)
    with pytest.raises(RuntimeError, match='learnable_bias must have shape'):
        cosine_qk.cosine_queries_keys_op(q, k, qe, scale, tokens, tbias[..., :4])
    with pytest.raises(RuntimeError, match='at most 16 learnable tokens'):
        cosine_qk.cosine_queries_keys_op(*make_inputs(1, 2, 4, 8, torch.float32, tokens=17))
    with pytest.raises(RuntimeError, match='float32 / float64'):
        cosine_qk.cosine_queries_keys_op(*(t.half() for t in (q, k, qe, scale, tokens, tbias)))
    with pytest.raises(ValueError, match='impl must be one of'):
        cosine_queries_keys(q, k, qe, scale, tokens, tbias, impl='fast')


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('B,heads,N,d,split,tokens',
                         [(2, 3, 35, 24, True, 9), (1, 1, 1, 5, True, 9), (3, 4, 129, 8, False, 3),
                          (1, 12, 70, 24, True, 9)])
def test_backward_matches_pytorch(B, heads, N, d, split, tokens, dtype, tol):
    """The compiled backward against autograd through the PyTorch formula: the gradients of all
    six inputs (q and k split out of one projection or separate, a zero row, a ragged block of
    rows, batch > 1)."""
    inputs = [t.requires_grad_() for t in make_inputs(B, heads, N, d, dtype, tokens, split)]
    leaves = inputs if not split else inputs[2:]
    if split:  # differentiate through the shared projection as the layer does
        qk = torch.randn(B, N, 2 * heads, d, dtype=dtype, requires_grad=True)
        with torch.no_grad():
            qk[0, 0, 0] = 0
        inputs[:2] = qk.transpose(1, 2).chunk(2, dim=1)
        leaves = [qk] + leaves
    outs = cosine_qk.cosine_queries_keys_op(*inputs)
    refs = cosine_queries_keys_torch(*inputs)
    grads = [torch.randn_like(r) for r in refs]
    for g, g_ref in zip(
            torch.autograd.grad(outs, leaves, grads), torch.autograd.grad(refs, leaves, grads)):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@requires_ext
def test_backward_gradcheck_opcheck_and_thread_independence(check_thread_independence):
    inputs = [t.requires_grad_() for t in make_inputs(2, 2, 6, 5, torch.float64)]
    inputs[0] = inputs[0].detach().clone().requires_grad_()
    with torch.no_grad():
        inputs[0][0, 0, 0] = 1  # gradcheck away from the norm's kink at zero
    assert torch.autograd.gradcheck(cosine_qk.cosine_queries_keys_op, inputs)
    q, k, qe, scale, tokens, _ = (t.detach() for t in inputs)
    grads = (torch.randn_like(q), torch.randn_like(k), torch.randn(2, 2, 6, 9, dtype=q.dtype))
    torch.library.opcheck(torch.ops.transnext_mm.cosine_queries_keys_backward.default,
                          (*grads, q, k, qe, scale, tokens))
    # The parameter gradients are sums of per-block partials in block order.
    q, k, qe, scale, tokens, _ = make_inputs(2, 3, 500, 24, torch.float32)
    grads = (torch.randn_like(q), torch.randn_like(k), torch.randn(2, 3, 500, 9))
    check_thread_independence(lambda: torch.ops.transnext_mm.cosine_queries_keys_backward(
        *grads, q, k, qe, scale, tokens))
    with pytest.raises(RuntimeError, match='grad_token_weight must have shape'):
        torch.ops.transnext_mm.cosine_queries_keys_backward(grads[0], grads[1], grads[2][..., :4],
                                                            q, k, qe, scale, tokens)


@requires_ext
def test_kernel_serves_inference_and_training(monkeypatch):
    calls = []
    kernel = cosine_qk.cosine_queries_keys_op
    monkeypatch.setattr(cosine_qk, 'cosine_queries_keys_op',
                        lambda *a: calls.append(1) or kernel(*a))
    inputs = make_inputs(1, 2, 5, 8, torch.float32)
    with torch.no_grad():
        cosine_queries_keys(*inputs)
        cosine_queries_keys(*inputs, impl='op')
    assert len(calls) == 2
    cosine_queries_keys(*inputs, impl='torch')
    q, k, qe, *rest = inputs
    outs = cosine_queries_keys(q, k, qe.requires_grad_(), *rest)  # training: the compiled kernels
    assert len(calls) == 3 and outs[0].requires_grad
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        cosine_queries_keys(*inputs)
    assert len(calls) == 3
