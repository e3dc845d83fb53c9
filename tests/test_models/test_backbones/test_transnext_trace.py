"""TransNeXt traced: torch.compile without graph breaks, torch.export / ONNX with free H and W,
forward on the meta device, and a bf16 autocast training step."""
import pytest
import torch
import torch._dynamo
from torch.export import Dim

from transnext_mm import TransNeXt
from transnext_mm.ops.aggregated_attention import op_available

# Micro's widths and heads, two blocks in stage 3: enough to see one graph for all blocks, and
# affordable to trace on two CPU cores.
ARCH = dict(embed_dims=[48, 96, 192, 384], num_heads=[2, 4, 8, 16], depths=[1, 1, 2, 1])
needs_op = pytest.mark.skipif(not op_available(torch.device('cpu'), torch.float32),
                              reason='compiled op not built')


def make_backbone(**kwargs):
    model = TransNeXt(arch=ARCH, img_size=64, **kwargs)
    with torch.no_grad():  # a pronounced position bias, as after training
        for name, p in model.named_parameters():
            if 'cpb_fc2' in name:
                p.mul_(50)
    return model


def assert_outputs_close(outs, expected, rtol=1e-4):
    assert len(outs) == len(expected)
    for out, ref in zip(outs, expected):
        out = torch.as_tensor(out)
        assert out.shape == ref.shape
        err = ((out - ref).abs().max() / ref.abs().max()).item()
        assert err <= rtol, f'relative error {err:.2e} > {rtol}'


def fresh_dynamo():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()


def compile_stats():
    counters = torch._dynamo.utils.counters
    return counters['stats']['unique_graphs'], sum(counters['recompiles'].values())


@pytest.mark.parametrize('attn_impl', ['torch', pytest.param('op', marks=needs_op)])
@pytest.mark.parametrize('pos_bias_mode', ['interpolate', 'extrapolate'])
def test_compile_fullgraph_eval(attn_impl, pos_bias_mode):
    model = make_backbone(attn_impl=attn_impl, pos_bias_mode=pos_bias_mode).eval()
    x = torch.randn(2, 3, 67, 45)
    with torch.no_grad():
        expected = model(x)
        fresh_dynamo()
        compiled = torch.compile(model, fullgraph=True, backend='eager')
        assert_outputs_close(compiled(x), expected, rtol=1e-5)
        assert_outputs_close(compiled(x), expected, rtol=1e-5)
    # one graph for all five blocks: no graph break, no recompilation per block
    assert compile_stats() == (1, 0)


@pytest.mark.parametrize('attn_impl', ['torch', pytest.param('op', marks=needs_op)])
def test_compile_fullgraph_train_step(attn_impl):
    model = make_backbone(attn_impl=attn_impl, pos_bias_mode='extrapolate').train()
    x = torch.randn(2, 3, 45, 67)
    sum(o.square().mean() for o in model(x)).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    fresh_dynamo()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')
    sum(o.square().mean() for o in compiled(x)).backward()
    assert compile_stats() == (1, 0)
    for name, p in model.named_parameters():
        torch.testing.assert_close(p.grad, expected[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize('pos_bias_mode', ['interpolate', 'extrapolate'])
def test_meta_device_forward(pos_bias_mode):
    with torch.device('meta'):
        model = TransNeXt(arch='micro', attn_impl='torch', pos_bias_mode=pos_bias_mode)
        x = torch.empty(2, 3, 67, 93)
    for training in (True, False):
        outs = model.train(training)(x)
        assert [o.device.type for o in outs] == ['meta'] * 4
        assert [tuple(o.shape) for o in outs] == [
            (2, c, -(-67 // s), -(-93 // s)) for c, s in zip((48, 96, 192, 384), (4, 8, 16, 32))]


@pytest.mark.parametrize('pos_bias_mode,fixed_pool_size', [('interpolate', None),
                                                           ('extrapolate', None),
                                                           ('interpolate', 3)])
def test_export_and_onnx_with_free_height_and_width(pos_bias_mode, fixed_pool_size, tmp_path):
    ort = pytest.importorskip('onnxruntime')
    model = make_backbone(attn_impl='torch', pos_bias_mode=pos_bias_mode,
                          fixed_pool_size=fixed_pool_size).eval()
    dynamic_shapes = {'x': {2: Dim('height', min=64, max=4096),
                            3: Dim('width', min=64, max=4096)}}
    program = torch.onnx.export(model, (torch.randn(2, 3, 67, 77), ), dynamo=True,
                                dynamic_shapes=dynamic_shapes)
    program.save(str(tmp_path / 'backbone.onnx'))
    session = ort.InferenceSession(str(tmp_path / 'backbone.onnx'),
                                   providers=['CPUExecutionProvider'])
    exported = program.exported_program.module()  # the torch.export program behind the ONNX
    for size in [(96, 128), (131, 70)]:
        x = torch.randn(2, 3, *size)
        with torch.no_grad():
            expected = model(x)
            assert_outputs_close(exported(x), expected)
        assert_outputs_close(session.run(None, {session.get_inputs()[0].name: x.numpy()}),
                             expected)


@pytest.mark.xfail(strict=True, reason='open finding (issue #12): under CPU bf16 autocast the '
                   'patch_embed1 gradient has cosine ~0.01 to the fp32 one; bf16 noise or a '
                   'bug in a low-precision backward, not yet diagnosed')
def test_bf16_autocast_train_step():
    model = make_backbone(attn_impl='auto', pos_bias_mode='extrapolate').train()
    x = torch.randn(2, 3, 67, 45)
    sum(o.float().square().mean() for o in model(x)).backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    with torch.autocast('cpu', dtype=torch.bfloat16):
        outs = model(x)
    assert all(o.dtype == torch.bfloat16 for o in outs)
    sum(o.float().square().mean() for o in outs).backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), name
        cos = torch.nn.functional.cosine_similarity(p.grad.flatten(), expected[name].flatten(), 0)
        assert cos > 0.9, f'{name}: cosine {cos:.3f} to the fp32 gradient'
