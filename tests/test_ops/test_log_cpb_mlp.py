"""The compiled log-CPB MLP (transnext_mm.ops.log_cpb_mlp) against its PyTorch formula."""
import pytest
import torch

from transnext_mm.ops.dispatch import BUILD
from transnext_mm.ops.log_cpb_mlp import log_cpb_mlp_op, log_cpb_mlp_torch

requires_ext = pytest.mark.skipif(not BUILD.built, reason='transnext_mm._ext is not built')


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-6)])
@pytest.mark.parametrize('points,hidden,heads', [(1, 512, 3), (7, 512, 24), (1031, 512, 12),
                                                 (2500, 64, 5), (33, 512, 6), (3, 5, 1)])
def test_compiled_mlp_matches_pytorch(points, hidden, heads, dtype, tol):
    """The compiled MLP against F.linear -> ReLU -> F.linear: values and the gradients of the
    four weights (a ragged last tile and block of points; odd widths)."""
    torch.manual_seed(0)
    coords = torch.randn(points, 2, dtype=dtype)
    weights = [
        torch.randn(hidden, 2, dtype=dtype),
        torch.randn(hidden, dtype=dtype),
        torch.randn(heads, hidden, dtype=dtype) / 20,
        torch.randn(heads, dtype=dtype)
    ]
    weights = [w.requires_grad_() for w in weights]
    out = log_cpb_mlp_op(coords, *weights)
    expected = log_cpb_mlp_torch(coords, *weights)
    torch.testing.assert_close(out, expected, rtol=tol, atol=tol * expected.abs().max().item())
    grad = torch.randn_like(out)
    for g, g_ref in zip(
            torch.autograd.grad(out, weights, grad), torch.autograd.grad(expected, weights, grad)):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@requires_ext
def test_compiled_mlp_gradcheck_opcheck_determinism_and_errors(check_thread_independence):
    torch.manual_seed(0)
    coords = torch.randn(9, 2, dtype=torch.float64)
    weights = [torch.randn(6, 2), torch.randn(6), torch.randn(2, 6), torch.randn(2)]
    weights = [w.double().requires_grad_() for w in weights]
    assert torch.autograd.gradcheck(lambda *w: log_cpb_mlp_op(coords, *w), weights)
    torch.library.opcheck(torch.ops.transnext_mm.log_cpb_mlp.default,
                          (coords, *[w.detach() for w in weights]))
    torch.library.opcheck(
        torch.ops.transnext_mm.log_cpb_mlp_backward.default,
        (torch.randn(9, 2, dtype=torch.float64), coords, *[w.detach() for w in weights[:3]]))
    # Per-block partials summed in block order; each point's forward in one thread.
    coords = torch.randn(5000, 2)
    weights = [torch.randn(512, 2), torch.randn(512), torch.randn(3, 512), torch.randn(3)]
    grad = torch.randn(5000, 3)
    check_thread_independence(lambda: [log_cpb_mlp_op(coords, *weights)])
    check_thread_independence(
        lambda: torch.ops.transnext_mm.log_cpb_mlp_backward(grad, coords, *weights[:3]))
    with pytest.raises(RuntimeError, match='points must be'):
        log_cpb_mlp_op(torch.randn(4, 3), *weights)
    with pytest.raises(RuntimeError, match='weight2 must be'):
        log_cpb_mlp_op(torch.randn(4, 2), weights[0], weights[1], weights[2][:, :5], weights[3])
    with pytest.raises(RuntimeError, match='points are constants'):
        log_cpb_mlp_op(torch.randn(4, 2, requires_grad=True), *weights).sum().backward()
