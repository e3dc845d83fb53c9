# Copyright (c) transnext-mm contributors. All rights reserved.
"""The compiled aggregated-attention op against the readable reference implementation."""
import os
import os.path as osp
import shutil
import subprocess
import warnings

import pytest
import torch
from aggregated_attention_cases import NAMES, assert_close_scaled, make_inputs, reference_with_grads

from transnext_mm.ops import dispatch
from transnext_mm.ops.aggregated_attention import (aggregated_attention, aggregated_attention_op,
                                                   aggregated_attention_reference, op_available)
from transnext_mm.ops.aggregated_attention.reference import aggregated_attention_probs
from transnext_mm.ops.aggregated_attention.selfcheck import GRAD_TOLERANCE_FACTOR, TOLERANCES

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__)))))
EXT = dispatch.compiled_ext()
requires_op = pytest.mark.skipif(
    not dispatch.BUILD.built, reason=f'transnext_mm._ext is not built ({dispatch.BUILD.error})')
requires_cuda = pytest.mark.cuda  # skipped without a GPU (tests/conftest.py)

# (B, heads, height, width, Np, d): odd grids, 1x1, single rows, more queries than a CUDA block
# (128), more pooled keys than a tile (fp32 CPU: 24 keys, with tails of 8 and 16; CUDA: 32), ragged
# 4-query tiles, the head dims with fixed-size kernels (fp32 CPU: 8, 16, 24, 32; CUDA: 24) and
# generic ones, Np = 0.
SHAPES = [(2, 3, 5, 7, 4, 24), (1, 2, 1, 1, 1, 5), (2, 1, 1, 6, 3, 7), (2, 2, 9, 13, 5, 32),
          (1, 2, 20, 17, 70, 24), (2, 2, 7, 9, 40, 24), (3, 1, 13, 11, 33, 3), (2, 1, 3, 4, 0, 8),
          (2, 2, 6, 11, 64, 16)]


def test_extension_is_built_when_a_compiler_exists():
    if shutil.which(os.environ.get('CXX', 'c++')) is None:
        pytest.skip('no C++ compiler: the package runs on its PyTorch path')
    assert dispatch.BUILD.built, f'transnext_mm._ext failed to import: {dispatch.BUILD.error}'
    assert op_available(torch.device('cpu'), torch.float32)


@requires_op
def test_compiled_ext_holds_no_replay():
    """The CPU replay of the CUDA kernels is a test extension of its own (_ext_replay), not part
    of the op that ships."""
    names = [
        name for name in dir(EXT)
        if 'replay' in name or name in ('aggregated_attention_launch_plans',
                                        'pool_grad_target_blocks')
    ]
    assert not names, names


@requires_op
@pytest.mark.parametrize('dtype,rel', [(torch.float64, 1e-10), (torch.float32, 2e-5)])
@pytest.mark.parametrize('shape', SHAPES)
def test_cpu_op_matches_reference(shape, dtype, rel):
    B, heads, height, width, Np, d = shape
    tensors = make_inputs(*shape, dtype=dtype)
    out = aggregated_attention(*tensors, height, width, impl='op')
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    assert out.dtype == dtype and out.shape == (B, heads, height * width, d)
    assert_close_scaled(out, out_ref, rel, 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == dtype and g.shape == g_ref.shape
        assert_close_scaled(g, g_ref, rel, name)


@requires_op
@pytest.mark.parametrize('shape', [(2, 2, 5, 7, 30, 24), (1, 2, 6, 5, 9, 7)])
def test_cpu_op_float32_with_scores_spread_past_underflow(shape):
    """Scores that span hundreds (sharp queries): a third or more of the probabilities underflow
    float32 (the fp32 kernels clamp the exponential's argument at -87); outputs and gradients
    still match a float64 reference."""
    B, heads, height, width, Np, d = shape
    tensors = make_inputs(*shape, dtype=torch.float32, q_scale=40.0)
    out = aggregated_attention(*tensors, height, width, impl='op')
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    q, k, _, k_pool, _, rpb_local, bias_pool, _ = (t.detach().double() for t in tensors)
    probs = torch.cat(
        aggregated_attention_probs(q, k, k_pool, rpb_local, bias_pool, height, width), dim=-1)
    assert (probs < 1e-38).float().mean() > 0.3  # the case this test is for
    assert_close_scaled(out, out_ref, 1e-4, 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, g_ref, 1e-4, name)


@requires_op
@pytest.mark.parametrize('dtype,d', [(torch.float32, 24), (torch.float32, 5), (torch.float64, 24)])
def test_cpu_op_gradients_do_not_depend_on_the_thread_count(dtype, d, check_thread_independence):
    """The pooled keys' and values' gradients are per-group partial sums (rows added in order,
    groups fixed by the grid, not by the threads) reduced in group order: on the register-tiled
    fp32 path (head dim 24), the BLAS path (head dim 5) and in float64."""
    B, heads, height, width, Np = 2, 3, 23, 19, 37
    tensors = make_inputs(B, heads, height, width, Np, d, dtype=dtype)
    out = aggregated_attention(*tensors, height, width, impl='op')
    grad_out = torch.randn_like(out)
    check_thread_independence(lambda: torch.autograd.grad(
        aggregated_attention(*tensors, height, width, impl='op'), tensors, grad_out))


@requires_op
@pytest.mark.parametrize('height,width,Np,fast', [(5, 7, 1, False), (5, 7, 5, False),
                                                  (1, 1, 1, False), (1, 6, 2, False),
                                                  (9, 13, 3, True)])
def test_gradcheck_float64(height, width, Np, fast):
    tensors = make_inputs(2, 2, height, width, Np, 3, q_scale=1.0)

    def fn(*t):
        return aggregated_attention_op(*t, height, width)

    # fast_mode (random projections of the Jacobian) keeps the largest grid cheap.
    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=fast)


@requires_op
def test_frozen_bias_pool_gets_no_gradient():
    """The backbone's cached eval-mode bias is detached: the op then skips its gradient."""
    tensors = make_inputs(2, 2, 5, 6, 4, 8)
    tensors[6] = tensors[6].detach()
    out = aggregated_attention_op(*tensors, 5, 6)
    grad_out = torch.randn_like(out)
    trainable = [t for t in tensors if t.requires_grad]
    grads = torch.autograd.grad(out, trainable, grad_out)
    _, grads_ref = reference_with_grads(tensors, 5, 6, grad_out)
    for g, g_ref in zip(grads, grads_ref[:6] + grads_ref[7:]):
        assert_close_scaled(g, g_ref, 1e-10)


@requires_op
def test_non_contiguous_inputs_and_mixed_dtypes():
    B, heads, height, width, Np, d = 2, 3, 4, 6, 5, 8
    N = height * width
    # Like the backbone: heads split out of a (B, N, heads * d) projection.
    q = torch.randn(B, N, heads * d).view(B, N, heads, d).transpose(1, 2)
    tensors = make_inputs(B, heads, height, width, Np, d, dtype=torch.float32)
    tensors = [t.detach() for t in tensors]
    tensors[0] = q
    tensors[6] = tensors[6].double()  # bias in float64: everything is promoted
    out = aggregated_attention_op(*tensors, height, width)
    assert out.dtype == torch.float64
    expected = aggregated_attention_reference(*[t.double() for t in tensors], height, width)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


@requires_op
@pytest.mark.parametrize('d', [24, 5])
def test_backward_of_per_head_views(d):
    """q, k, v and the output gradient as the backbone passes them (per-head views of
    (B, N, heads, d) tensors): the same gradients as from contiguous inputs, in the inputs'
    layouts (fp32: the register-tiled kernels at d = 24, the generic ones at d = 5)."""
    B, heads, height, width, Np = 2, 3, 5, 7, 6
    tensors = [t.detach().float() for t in make_inputs(B, heads, height, width, Np, d)]
    grad_out = torch.randn(B, heads, height * width, d)

    def as_views(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2)

    def grads(qkv, grad):
        inputs = [t.clone().requires_grad_() for t in tensors]
        inputs[:3] = [t.clone().requires_grad_() for t in qkv]
        out = aggregated_attention_op(*inputs, height, width)
        return torch.autograd.grad(out, inputs, grad)

    views = [as_views(t) for t in tensors[:3]]
    assert not views[0].is_contiguous()
    expected = grads(tensors[:3], grad_out)
    actual = grads(views, as_views(grad_out))
    for name, g, g_ref in zip(NAMES, actual, expected):
        torch.testing.assert_close(g, g_ref, rtol=1e-5, atol=1e-5, msg=name)
    for g, view in zip(actual[:3], views):
        assert g.stride() == view.stride()


@requires_op
def test_cpu_autocast_bfloat16():
    if not torch.amp.is_autocast_available('cpu'):
        pytest.skip('CPU autocast is not available in this torch build')
    height, width = 6, 5
    tensors = make_inputs(2, 2, height, width, 4, 24, dtype=torch.float32)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = aggregated_attention(*tensors, height, width, impl='op')
    assert out.dtype == torch.bfloat16
    grad_out = torch.randn(out.shape)
    grads = torch.autograd.grad(out, tensors, grad_out.to(out.dtype))
    bf16_inputs = [t.detach().to(torch.bfloat16) for t in tensors]
    out_ref, grads_ref = reference_with_grads(bf16_inputs, height, width, grad_out)
    assert_close_scaled(out, out_ref, 1e-2, 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == torch.float32, name  # autograd casts back to the leaves' dtype
        assert_close_scaled(g, g_ref, 4e-2, name)


@requires_op
def test_torch_compile_keeps_the_op_in_one_graph():
    height, width = 5, 7
    tensors = make_inputs(2, 2, height, width, 3, 8, dtype=torch.float32)

    def loss_fn(*t):
        return aggregated_attention(*t, height, width, impl='op').square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(loss_fn, backend='aot_eager', fullgraph=True)  # fails on a break
    loss = compiled(*tensors)
    grads = torch.autograd.grad(loss, tensors)
    loss_eager = loss_fn(*tensors)
    grads_eager = torch.autograd.grad(loss_eager, tensors)
    torch.testing.assert_close(loss, loss_eager)
    for g, g_eager in zip(grads, grads_eager):
        torch.testing.assert_close(g, g_eager)


@requires_op
def test_library_registration_opcheck():
    height, width = 3, 5
    tensors = make_inputs(2, 2, height, width, 3, 4, dtype=torch.float32)
    torch.library.opcheck(torch.ops.transnext_mm.aggregated_attention_forward.default,
                          (*tensors, height, width))
    detached = [t.detach() for t in tensors]
    out, lse = torch.ops.transnext_mm.aggregated_attention_forward(*detached, height, width)
    for bias_grad in (True, False):
        torch.library.opcheck(
            torch.ops.transnext_mm.aggregated_attention_backward.default,
            (torch.randn_like(out), *detached, out, lse, height, width, bias_grad))


@requires_op
def test_dispatch_and_messages():
    cpu, meta = torch.device('cpu'), torch.device('meta')
    assert op_available(cpu, torch.float64) and op_available(cpu, torch.bfloat16)
    assert not op_available(meta, torch.float32)

    def reason(device, dtype):
        return dispatch.choose('attention', 'auto', device, dtype).reason

    assert "no kernels for device 'meta'" in reason(meta, torch.float32)
    assert 'no cpu kernel for torch.int32' in reason(cpu, torch.int32)
    if not dispatch.BUILD.cuda:
        assert 'built without CUDA kernels' in reason(torch.device('cuda'), torch.float32)
    meta_inputs = [t.detach().to(meta) for t in make_inputs(1, 2, 3, 4, 2, 8)]
    with pytest.raises(RuntimeError, match="impl='op'.* but .*no kernels for device 'meta'"):
        aggregated_attention(*meta_inputs, 3, 4, impl='op')
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        out = aggregated_attention(*meta_inputs, 3, 4, impl='auto')
    assert out.device == meta and out.shape == (1, 2, 12, 8)
    assert any('falling back' in str(w.message) for w in caught)
    with warnings.catch_warnings():
        warnings.simplefilter('error')  # 'auto' on CPU uses the op: no warning
        aggregated_attention(*make_inputs(1, 2, 3, 4, 2, 8), 3, 4, impl='auto')


@requires_op
def test_bad_shapes_name_the_argument():
    tensors = make_inputs(2, 2, 3, 4, 2, 8)
    tensors[7] = tensors[7][..., :8]
    with pytest.raises(ValueError, match='token_weight must have shape'):
        aggregated_attention_op(*tensors, 3, 4)
    with pytest.raises(ValueError, match='height\\*width'):
        aggregated_attention_op(*make_inputs(2, 2, 3, 4, 2, 8), 4, 4)
    with pytest.raises(RuntimeError, match='k_pool must have shape'):  # checked in C++ as well
        EXT.aggregated_attention_forward(*[t.detach() for t in make_inputs(2, 2, 3, 4, 2, 8)][:3],
                                         torch.zeros(2, 2, 2, 7, dtype=torch.float64),
                                         *[t.detach() for t in make_inputs(2, 2, 3, 4, 2, 8)][4:],
                                         3, 4)


@requires_op
@pytest.mark.parametrize('batch', [1, 2])
def test_backbone_op_matches_torch_path(batch):
    from transnext_mm.models.backbones import TransNeXt
    torch.manual_seed(0)
    model_torch = TransNeXt(arch='micro', attn_impl='torch').train()
    model_op = TransNeXt(arch='micro', attn_impl='op').train()
    model_op.load_state_dict(model_torch.state_dict())
    x = torch.randn(batch, 3, 67, 93)
    outs_torch, outs_op = model_torch(x), model_op(x)
    for o_t, o_op in zip(outs_torch, outs_op):
        assert o_t.shape == o_op.shape
        torch.testing.assert_close(o_op, o_t, rtol=1e-4, atol=1e-4)
    weights = [torch.randn_like(o) for o in outs_torch]
    sum((o * w).sum() for o, w in zip(outs_torch, weights)).backward()
    sum((o * w).sum() for o, w in zip(outs_op, weights)).backward()
    params_op = dict(model_op.named_parameters())
    # Floor for parameters whose gradient is zero up to rounding noise (the last stage's log-CPB
    # output bias: softmax gradients sum to zero over the keys).
    noise = 1e-8 * max(p.grad.abs().max() for p in model_torch.parameters() if p.grad is not None)
    checked = 0
    for name, p in model_torch.named_parameters():
        if p.grad is None:
            assert params_op[name].grad is None, name
            continue
        assert_close_scaled(params_op[name].grad, p.grad, 1e-4, name, atol=noise)
        checked += 1
    assert checked > 100
    # Eval mode (cached, detached position bias): outputs still agree.
    with torch.no_grad():
        for o_t, o_op in zip(model_torch.eval()(x), model_op.eval()(x)):
            torch.testing.assert_close(o_op, o_t, rtol=1e-4, atol=1e-4)


# ------------------------------------------------------------------------------------- CUDA
@requires_cuda
@pytest.mark.parametrize('dtype', [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize('shape', [(2, 3, 5, 7, 4, 24),
                                   (1, 2, 20, 17, 70, 24), (2, 2, 9, 13, 5, 32), (1, 1, 1, 6, 3, 5),
                                   (2, 4, 64, 64, 256, 24)])
def test_cuda_op_matches_reference(shape, dtype):
    """Within the tolerances of the op's first-use self-check (the same figures)."""
    rel = TOLERANCES[dtype]
    B, heads, height, width, Np, d = shape
    tensors = make_inputs(*shape, dtype=dtype, device='cuda')
    out = aggregated_attention(*tensors, height, width, impl='op')
    grad_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, tensors, grad_out)
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    assert_close_scaled(out, out_ref, rel, 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert g.dtype == dtype, name
        assert_close_scaled(g, g_ref, rel * GRAD_TOLERANCE_FACTOR, name)


@requires_cuda
def test_cuda_backbone_autocast_matches_torch_path():
    from transnext_mm.models.backbones import TransNeXt
    model_torch = TransNeXt(arch='micro', attn_impl='torch').cuda().train()
    model_op = TransNeXt(arch='micro', attn_impl='op').cuda().train()
    model_op.load_state_dict(model_torch.state_dict())
    x = torch.randn(2, 3, 67, 93, device='cuda')
    with torch.autocast('cuda', dtype=torch.float16):
        outs_torch, outs_op = model_torch(x), model_op(x)
    for o_t, o_op in zip(outs_torch, outs_op):
        assert_close_scaled(o_op, o_t, 2e-2)
    sum(o.float().sum() for o in outs_op).backward()
    assert all(
        p.grad is not None and torch.isfinite(p.grad).all() for p in model_op.parameters()
        if p.requires_grad)


@pytest.mark.skipif(shutil.which('nvcc') is None, reason='nvcc not found')
def test_cuda_sources_compile():
    """CI-cheap compile check of the CUDA kernels and launchers (no GPU needed)."""
    proc = subprocess.run(['bash', osp.join(ROOT, '.dev_scripts', 'check_cuda_build.sh')],
                          capture_output=True,
                          text=True,
                          timeout=900)
    if proc.returncode == 77:
        pytest.skip(proc.stdout.strip())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
