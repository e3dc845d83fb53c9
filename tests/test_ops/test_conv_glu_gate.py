import pytest
import torch

from transnext_mm.models.layers import ConvGLU
from transnext_mm.ops import conv_glu as gate_ops
from transnext_mm.ops.conv_glu import conv_glu_gate, conv_glu_gate_torch
from transnext_mm.ops.dispatch import BUILD

requires_ext = pytest.mark.skipif(not BUILD.built, reason='transnext_mm._ext is not built')


def gate_inputs(B, height, width, channels, dtype, requires_grad=False):
    hidden = torch.randn(B, height * width, 2 * channels, dtype=dtype) * 2
    weight = torch.randn(channels, 1, 3, 3, dtype=dtype) * 0.5
    bias = torch.randn(channels, dtype=dtype)
    return [t.requires_grad_(requires_grad) for t in (hidden, weight, bias)]


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize('B,height,width,channels', [(2, 5, 7, 6), (1, 1, 1, 3), (1, 1, 6, 17),
                                                     (2, 9, 4, 33), (1, 13, 11, 64)])
def test_compiled_gate_matches_pytorch(B, height, width, channels, dtype, tol):
    hidden, weight, bias = gate_inputs(B, height, width, channels, dtype)
    out = conv_glu_gate(hidden, weight, bias, height, width, impl='op')
    ref = conv_glu_gate_torch(hidden, weight, bias, height, width)
    assert out.shape == (B, height * width, channels)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('B,height,width,channels', [(2, 5, 7, 6), (1, 1, 6, 4), (1, 1, 1, 3),
                                                     (3, 6, 1, 17), (2, 9, 8, 40)])
def test_compiled_gate_backward_matches_pytorch(B, height, width, channels, dtype, tol):
    """The compiled backward (odd grids, single rows and columns, batch > 1) against autograd
    through the PyTorch formula."""
    args = gate_inputs(B, height, width, channels, dtype, requires_grad=True)
    out = gate_ops.conv_glu_gate_op(*args, height, width)
    ref = conv_glu_gate_torch(*args, height, width)
    grad = torch.randn_like(out)
    for g, g_ref in zip(torch.autograd.grad(out, args, grad), torch.autograd.grad(ref, args, grad)):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-7)])
def test_compiled_gate_gelu_over_the_whole_float_range(dtype, tol):
    """The GELU and its derivative at pre-activations from -1e4 to 1e4, far tails included (in
    whole vectors of channels and the tail after them): within ``tol`` of the float64 values,
    relative and absolute, however large the input (a 1x1 map whose conv weights are zero, so
    the pre-activation is the bias; value 1 and output gradient 1, so the bias gradient is
    GELU'(pre))."""
    from transnext_mm.ops.dispatch import compiled_ext
    ext = compiled_ext()
    pre = torch.cat(
        [-torch.logspace(-3, 4, 12),
         torch.linspace(-6, 6, 13),
         torch.logspace(-3, 4, 12)])
    channels = pre.numel()
    hidden = torch.cat([torch.zeros(1, 1, channels), torch.ones(1, 1, channels)], -1).to(dtype)
    weight = torch.zeros(channels, 1, 3, 3, dtype=dtype)
    out = ext.conv_glu_gate_forward(hidden, weight, pre.to(dtype), 1, 1)
    grad_bias = ext.conv_glu_gate_backward(
        torch.ones(1, 1, channels, dtype=dtype), hidden, weight, pre.to(dtype), 1, 1)[2]
    exact = pre.double().requires_grad_()
    gelu = torch.nn.functional.gelu(exact)
    slope, = torch.autograd.grad(gelu.sum(), exact)
    torch.testing.assert_close(out.reshape(-1).double(), gelu.detach(), rtol=tol, atol=tol)
    torch.testing.assert_close(grad_bias.double(), slope, rtol=tol, atol=tol)


@requires_ext
@pytest.mark.parametrize('dtype', [torch.float64, torch.float32])
def test_compiled_gate_backward_returns_the_output_it_recomputes(dtype):
    """``with_output=True`` adds the forward's output, recomputed in the backward's first pass,
    and leaves the gradients unchanged; without it the fourth tensor is empty."""
    from transnext_mm.ops.dispatch import compiled_ext
    ext = compiled_ext()
    hidden, weight, bias = gate_inputs(2, 6, 5, 19, dtype)
    grad = torch.randn(2, 30, 19, dtype=dtype)
    with_out = ext.conv_glu_gate_backward(grad, hidden, weight, bias, 6, 5, with_output=True)
    without = ext.conv_glu_gate_backward(grad, hidden, weight, bias, 6, 5)
    assert without[3].shape == (0, 30, 19)
    torch.testing.assert_close(
        with_out[3], ext.conv_glu_gate_forward(hidden, weight, bias, 6, 5), rtol=0, atol=0)
    for a, b in zip(with_out[:3], without[:3]):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('B,height,width,channels,out_channels', [(2, 6, 5, 19, 7), (1, 1, 9, 8, 3),
                                                                  (3, 4, 1, 5, 12),
                                                                  (2, 5, 131, 6, 4)])
def test_compiled_gate_backward_multiplies_fc2_in(B, height, width, channels, out_channels, dtype,
                                                  tol, check_thread_independence):
    """With ``fc2_weight``, ``grad`` is fc2's output gradient: the gradients equal those for
    ``grad @ fc2_weight`` (which the kernel computes row by row where rows have 128 tokens or
    more, as in the last case), the output too."""
    from transnext_mm.ops.dispatch import compiled_ext
    ext = compiled_ext()
    hidden, weight, bias = gate_inputs(B, height, width, channels, dtype)
    fc2_weight = torch.randn(out_channels, channels, dtype=dtype, requires_grad=True)
    grad = torch.randn(B, height * width, out_channels, dtype=dtype)
    fused = ext.conv_glu_gate_backward(
        grad, hidden, weight, bias, height, width, with_output=True, fc2_weight=fc2_weight)
    ref = ext.conv_glu_gate_backward(
        grad @ fc2_weight.detach(), hidden, weight, bias, height, width, with_output=True)
    for a, b in zip(fused, ref):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())
    if width >= 128:
        # Each row's product runs in one thread, whatever the thread count (the whole-gradient
        # product of short rows is PyTorch's matmul, as are fc1's and fc2's own).
        check_thread_independence(lambda: ext.conv_glu_gate_backward(
            grad, hidden, weight, bias, height, width, fc2_weight=fc2_weight.detach())[:3])
    with pytest.raises(RuntimeError, match=rf'fc2_weight must have shape \(C, {channels}\)'):
        ext.conv_glu_gate_backward(
            grad, hidden, weight, bias, height, width, fc2_weight=fc2_weight[:, 1:])
    with pytest.raises(
            RuntimeError, match=r"grad must have shape \(.*\) \(fc2's output gradient\)"):
        ext.conv_glu_gate_backward(
            grad[..., 1:], hidden, weight, bias, height, width, fc2_weight=fc2_weight)


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('B,height,width,with_bias', [(2, 6, 5, True), (1, 3, 130, True),
                                                      (2, 2, 129, False)])
def test_compiled_gate_forward_applies_fc2(B, height, width, with_bias, dtype, tol,
                                           check_thread_independence):
    """With ``fc2_weight`` (and ``fc2_bias``) the forward returns fc2's output (row by row on
    rows of 128 tokens or more); bad fc2 arguments are named."""
    from transnext_mm.ops.dispatch import compiled_ext
    ext = compiled_ext()
    hidden, weight, bias = gate_inputs(B, height, width, 7, dtype)
    fc2_weight = torch.randn(5, 7, dtype=dtype, requires_grad=True)
    fc2_bias = torch.randn(5, dtype=dtype) if with_bias else None
    out = ext.conv_glu_gate_forward(
        hidden, weight, bias, height, width, fc2_weight=fc2_weight, fc2_bias=fc2_bias)
    ref = torch.nn.functional.linear(
        conv_glu_gate_torch(hidden, weight, bias, height, width), fc2_weight.detach(), fc2_bias)
    assert out.shape == (B, height * width, 5)
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol * ref.abs().max().item())
    check_thread_independence(lambda: [
        ext.conv_glu_gate_forward(
            hidden, weight, bias, height, width, fc2_weight=fc2_weight.detach(), fc2_bias=fc2_bias)
    ])
    with pytest.raises(RuntimeError, match=r'fc2_weight must have shape \(C, 7\)'):
        ext.conv_glu_gate_forward(hidden, weight, bias, height, width, fc2_weight=fc2_weight.t())
    with pytest.raises(RuntimeError, match=r'fc2_bias must have shape \(5\)'):
        ext.conv_glu_gate_forward(
            hidden,
            weight,
            bias,
            height,
            width,
            fc2_weight=fc2_weight,
            fc2_bias=torch.zeros(4, dtype=dtype))
    with pytest.raises(RuntimeError, match='fc2_bias needs fc2_weight'):
        ext.conv_glu_gate_forward(
            hidden, weight, bias, height, width, fc2_bias=torch.zeros(5, dtype=dtype))


@requires_ext
def test_compiled_gate_gradcheck_and_thread_independence(check_thread_independence):
    args = gate_inputs(2, 5, 4, 6, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda h, w, b: gate_ops.conv_glu_gate_op(h, w, b, 5, 4), args)
    # The weight and bias gradients are sums of per-row partials in row order.
    hidden, weight, bias = gate_inputs(2, 23, 9, 16, torch.float32)
    grad = torch.randn(2, 23 * 9, 16)
    check_thread_independence(
        lambda: torch.ops.transnext_mm.conv_glu_gate_backward(grad, hidden, weight, bias, 23, 9))


@requires_ext
def test_compiled_gate_frozen_conv_and_opcheck():
    hidden, weight, bias = gate_inputs(2, 4, 5, 8, torch.float32)
    hidden.requires_grad_()
    out = gate_ops.conv_glu_gate_op(hidden, weight, bias, 4, 5)
    (grad_hidden, ) = torch.autograd.grad(out.sum(), hidden)  # weight and bias need no grad
    ref = conv_glu_gate_torch(hidden, weight, bias, 4, 5)
    torch.testing.assert_close(grad_hidden, torch.autograd.grad(ref.sum(), hidden)[0])
    torch.library.opcheck(torch.ops.transnext_mm.conv_glu_gate.default,
                          (hidden.detach(), weight, bias, 4, 5))
    torch.library.opcheck(torch.ops.transnext_mm.conv_glu_gate_backward.default,
                          (torch.randn(2, 20, 8), hidden.detach(), weight, bias, 4, 5))


@requires_ext
def test_compiled_gate_errors_name_the_argument():
    hidden, weight, bias = gate_inputs(1, 3, 3, 4, torch.float32)
    with pytest.raises(RuntimeError, match='weight must have shape'):
        gate_ops.conv_glu_gate_op(hidden, weight[:2], bias, 3, 3)
    with pytest.raises(RuntimeError, match='tokens but height'):
        gate_ops.conv_glu_gate_op(hidden, weight, bias, 3, 4)
    with pytest.raises(RuntimeError, match='grad must have shape'):
        gate_ops.conv_glu_gate_backward_op(torch.randn(1, 9, 3), hidden, weight, bias, 3, 3)
    with pytest.raises(ValueError, match='impl must be one of'):
        conv_glu_gate(hidden, weight, bias, 3, 3, impl='fast')


@requires_ext
def test_kernel_serves_inference_and_training(monkeypatch):
    calls = []
    kernel = gate_ops.conv_glu_gate_op
    monkeypatch.setattr(gate_ops, 'conv_glu_gate_op', lambda *a: calls.append(1) or kernel(*a))
    hidden, weight, bias = gate_inputs(1, 4, 4, 8, torch.float32)
    with torch.no_grad():
        conv_glu_gate(hidden, weight, bias, 4, 4)
    assert len(calls) == 1
    conv_glu_gate(hidden, weight.requires_grad_(), bias, 4, 4)  # training: the compiled backward
    assert len(calls) == 2
    conv_glu_gate(hidden, weight, bias, 4, 4, impl='torch')
    conv_glu_gate(hidden.double(), weight.detach().double(), bias.double(), 4, 4, impl='torch')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        conv_glu_gate(hidden, weight, bias, 4, 4)  # autocast: PyTorch
    assert len(calls) == 2


def test_conv_glu_impls_agree_and_fall_back():
    torch.manual_seed(0)
    glu = ConvGLU(12, 4)
    x = torch.randn(2, 6 * 5, 12)
    with torch.no_grad():  # inference: 'auto' runs the compiled gate when it is built
        glu.impl = 'torch'
        expected = glu(x, 6, 5)
        glu.impl = 'auto'
        torch.testing.assert_close(glu(x, 6, 5), expected)
    with torch.autocast('cpu', dtype=torch.bfloat16):  # no bf16 kernel: PyTorch runs it
        assert glu(x, 6, 5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match='impl must be one of'):
        ConvGLU(12, 4, impl='fast')


@requires_ext
@pytest.mark.parametrize('strip_rows', [1, 2, 3])
def test_conv_glu_strips_match_whole_map(monkeypatch, strip_rows):
    """Inference in strips of rows (ragged last strip, batch 2) equals the whole-map PyTorch
    result, and really runs strip by strip."""
    from transnext_mm.ops import dispatch
    torch.manual_seed(0)
    glu = ConvGLU(12, 4).eval()
    height, width = 7, 5
    x = torch.randn(2, height * width, 12)
    row_bytes = 2 * width * glu.fc1.out_features * x.element_size()
    monkeypatch.setattr(dispatch, 'CONV_GLU_STRIP_BYTES', strip_rows * row_bytes)
    fc1_calls = []
    glu.fc1.register_forward_hook(lambda *_: fc1_calls.append(1))
    with torch.no_grad():
        glu.impl = 'torch'
        expected = glu(x, height, width)
        assert len(fc1_calls) == 1
        glu.impl = 'auto'
        torch.testing.assert_close(glu(x, height, width), expected)
    assert len(fc1_calls) == 1 + -(-height // strip_rows)
    glu(x, height, width).sum().backward()  # training: whole map, one fc1
    assert len(fc1_calls) == 2 + -(-height // strip_rows)


@requires_ext
@pytest.mark.parametrize('dtype,tol', [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize('B,height,width', [(2, 7, 5), (1, 1, 9), (3, 4, 4), (2, 3, 130)])
def test_training_recomputes_the_gate_output(B, height, width, dtype, tol):
    """Eager training: gate and fc2 are one autograd step that saves only the fc1 output; its
    gradients (input and all parameters) equal the PyTorch path's, also with a frozen conv (the
    last grid has rows of 130 tokens: fc2's weight multiplied in row by row)."""
    torch.manual_seed(0)
    glu = ConvGLU(12, 4).to(dtype)
    x = torch.randn(B, height * width, 12, dtype=dtype, requires_grad=True)
    for frozen in (False, True):
        glu.dwconv.requires_grad_(not frozen)
        params = [x] + [p for p in glu.parameters() if p.requires_grad]
        glu.impl = 'auto'
        out = glu(x, height, width)
        assert out.grad_fn._forward_cls is gate_ops._GateLinear
        glu.impl = 'torch'
        ref = glu(x, height, width)
        torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
        grad = torch.randn_like(out)
        for g, g_ref in zip(
                torch.autograd.grad(out, params, grad), torch.autograd.grad(ref, params, grad)):
            torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())
    # Only fc2 trains (hidden needs no gradient): the output is recomputed by the forward kernel.
    glu.requires_grad_(False)
    glu.fc2.requires_grad_(True)
    for impl in ('auto', 'torch'):
        glu.impl = impl
        out = glu(x.detach(), height, width)
        grads = torch.autograd.grad(out, list(glu.fc2.parameters()), grad)
        if impl == 'auto':
            assert out.grad_fn._forward_cls is gate_ops._GateLinear
            expected = grads
    for g, g_ref in zip(expected, grads):
        torch.testing.assert_close(g, g_ref, rtol=tol, atol=tol * g_ref.abs().max().item())
    glu.requires_grad_(True)
    glu.impl = 'auto'
    with torch.no_grad():  # inference: no autograd step at all
        assert glu(x, height, width).grad_fn is None
    assert glu(x.detach(), height, width).grad_fn._forward_cls is gate_ops._GateLinear
    glu.requires_grad_(False)
    assert glu(x.detach(), height, width).grad_fn is None


@requires_ext
def test_compiled_training_paths_refuse_double_backward():
    """First-order gradients only: differentiating the compiled backwards raises instead of
    silently missing terms."""
    glu = ConvGLU(12, 4)
    x = torch.randn(1, 16, 12, requires_grad=True)
    out = glu(x, 4, 4)
    seed = torch.randn_like(out, requires_grad=True)
    (grad, ) = torch.autograd.grad(out, x, seed, create_graph=True)
    with pytest.raises(RuntimeError, match='once_differentiable'):
        grad.sum().backward()
    args = gate_inputs(1, 4, 4, 6, torch.float64, requires_grad=True)
    out = gate_ops.conv_glu_gate_op(*args, 4, 4)
    seed = torch.randn_like(out, requires_grad=True)
    (grad, ) = torch.autograd.grad(out, args[0], seed, create_graph=True)
    with pytest.raises(RuntimeError, match='no autograd formula'):
        grad.sum().backward()
