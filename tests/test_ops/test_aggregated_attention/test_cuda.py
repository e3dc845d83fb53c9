# Copyright (c) transnext-mm contributors. All rights reserved.
"""The compiled op on CUDA beyond test_op.py's comparisons with the reference: the kernels'
edge shapes and the pooled bias in table form (the calls compute-sanitizer checks in
.dev_scripts/gpu/run_all.sh), bitwise repeatability, a non-default stream, batch x heads above
CUDA's 65535 grid limit, and the TransNeXt backbone's outputs and gradients against float64.
Every test needs a GPU (marker ``cuda``, see tests/conftest.py); the helpers take the device, so
they run on the CPU too."""
import pytest
import torch
from aggregated_attention_cases import (NAMES, assert_close_scaled, make_inputs, make_table_inputs,
                                        make_tap_inputs, reference_with_grads, table_oracle)

from transnext_mm.models.backbones import TransNeXt
from transnext_mm.models.layers.aggregated_attention import FullAttention
from transnext_mm.ops.aggregated_attention import (PoolBiasTable, aggregated_attention_op,
                                                   aggregated_attention_table_op)
from transnext_mm.ops.aggregated_attention.selfcheck import GRAD_TOLERANCE_FACTOR, TOLERANCES

pytestmark = pytest.mark.cuda
F16, F32, BF16, F64 = torch.float16, torch.float32, torch.bfloat16, torch.float64

# (B, heads, height, width, Np, d): a ragged query block, grids of one pixel / one row / one
# column, Np = 0, more pooled keys than a tile, the exact head dims 16, 24, 32, 48 and the
# generic kernel (7).
EDGE_SHAPES = [(2, 3, 5, 7, 4, 24), (1, 2, 1, 1, 1, 24), (1, 1, 1, 9, 3, 16), (2, 1, 9, 1, 2, 32),
               (2, 2, 3, 4, 0, 24), (1, 2, 13, 11, 70, 24), (1, 1, 6, 6, 5, 48), (1, 1, 4, 5, 3, 7)]
# Stage 1 of TransNeXt-Tiny at 512x512, batch 8.
TINY_STAGE1 = (8, 3, 128, 128, 256, 24)


def op_with_grads(tensors, height, width, grad_out):
    """The op's output and the gradients of its 8 inputs."""
    leaves = [t.detach().requires_grad_() for t in tensors]
    out = aggregated_attention_op(*leaves, height, width)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def check_against_reference(shape, dtype, device, strided=False):
    """The op against the float64 reference within the self-check's tolerances; ``strided``:
    q / k / v as head views of (B, N, heads * d) tensors, as in the backbone."""
    B, heads, height, width, Np, d = shape
    tensors = [t.detach() for t in make_inputs(*shape, dtype=dtype, device=device)]
    if strided:
        tensors[:3] = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:3]]
    grad_out = torch.randn(B, heads, height * width, d, dtype=F64).to(device, dtype)
    out, *grads = op_with_grads(tensors, height, width, grad_out)
    out_ref, grads_ref = reference_with_grads(tensors, height, width, grad_out)
    assert_close_scaled(out, out_ref, TOLERANCES[dtype], 'out')
    for name, g, g_ref in zip(NAMES, grads, grads_ref):
        assert_close_scaled(g, g_ref, TOLERANCES[dtype] * GRAD_TOLERANCE_FACTOR, name)


@pytest.mark.parametrize('strided', [False, True], ids=['contiguous', 'strided'])
@pytest.mark.parametrize('dtype', [F32, BF16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize('shape', EDGE_SHAPES, ids=lambda s: 'x'.join(map(str, s)))
def test_edge_shapes(shape, dtype, strided):
    check_against_reference(shape, dtype, 'cuda', strided)


def table_op_with_grads(tensors, height, width, grad_out):
    """The table-form op's output and the gradients of its 8 inputs (the table's 7th)."""
    bias = tensors[6]
    leaves = [t.detach().requires_grad_() for t in (*tensors[:6], bias.table, tensors[7])]
    out = aggregated_attention_table_op(*leaves[:6], bias._replace(table=leaves[6]), leaves[7],
                                        height, width)
    return (out, *torch.autograd.grad(out, leaves, grad_out))


def check_table_form_against_reference(shape, dtype, device, taps=0):
    """The op with the pooled bias in table form (with ``taps`` row taps, folded columns)
    against the float64 reference on the materialised bias, and two runs bit for bit equal (the
    table gradient is gathered in a fixed order)."""
    B, heads, height, width, pool, d = shape
    if taps:
        tensors = make_tap_inputs(*shape, taps, dtype=dtype)
    else:
        tensors = make_table_inputs(*shape, dtype=dtype)
    bias = tensors[6]
    tensors = [t.detach().to(device) for t in tensors[:6]
               ] + [PoolBiasTable(*(None if t is None else t.detach().to(device)
                                    for t in bias))] + [tensors[7].detach().to(device)]
    grad_out = torch.randn(B, heads, height * width, d, dtype=F64).to(device, dtype)
    out, *grads = table_op_with_grads(tensors, height, width, grad_out)
    out_ref, grads_ref = table_oracle(tensors, height, width, grad_out)
    assert_close_scaled(out, out_ref, TOLERANCES[dtype], 'out')
    names = NAMES[:6] + ('bias_table', ) + NAMES[7:]
    for name, g, g_ref in zip(names, grads, grads_ref):
        assert g.shape == g_ref.shape, name
        assert_close_scaled(g, g_ref, TOLERANCES[dtype] * GRAD_TOLERANCE_FACTOR, name)
    again = table_op_with_grads(tensors, height, width, grad_out)
    for name, a, b in zip(('out', ) + names, (out, *grads), again):
        assert torch.equal(a, b), name


@pytest.mark.parametrize('dtype', [F32, BF16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize(
    'shape', [(2, 3, 5, 7, (2, 3), 24), (1, 2, 20, 17, (5, 4), 24), (3, 1, 13, 11, (3, 5), 7),
              (2, 2, 32, 32, (16, 16), 24)],
    ids=lambda s: 'x'.join(map(str, s)))
def test_table_form(shape, dtype):
    check_table_form_against_reference(shape, dtype, 'cuda')


@pytest.mark.parametrize('dtype', [F32, BF16], ids=['float32', 'bfloat16'])
@pytest.mark.parametrize(
    'shape,taps', [((2, 3, 5, 7, (2, 3), 24), 4), ((1, 2, 20, 17, (5, 4), 24), 2),
                   ((2, 2, 32, 32, (16, 16), 24), 4)],
    ids=lambda s: 'x'.join(map(str, s)) if isinstance(s, tuple) else str(s))
def test_table_form_row_taps(shape, taps, dtype):
    """Row taps (an input resized along both axes in interpolation mode)."""
    check_table_form_against_reference(shape, dtype, 'cuda', taps)


def test_table_form_steady_state_does_not_synchronise():
    """Once the op has checked an index pair's bounds (one read back from the device), later
    steps with the same index tensors, forward and backward with the table gradient, queue their
    work without waiting for the device."""
    B, heads, height, width, pool, d = 2, 2, 32, 32, (16, 16), 24
    tensors = make_table_inputs(B, heads, height, width, pool, d, dtype=BF16)
    bias = tensors[6]
    tensors = [t.detach().cuda() for t in tensors[:6]] + [
        PoolBiasTable(bias.table.detach().cuda(), bias.index_rows.cuda(), bias.index_cols.cuda())
    ] + [tensors[7].detach().cuda()]
    grad_out = torch.randn(B, heads, height * width, d, device='cuda', dtype=BF16)
    first = table_op_with_grads(tensors, height, width, grad_out)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode('error')
    try:
        second = table_op_with_grads(tensors, height, width, grad_out)
    finally:
        torch.cuda.set_sync_debug_mode('default')
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def check_repeat_is_bitwise_equal(shape, dtype, device):
    B, heads, height, width, Np, d = shape
    tensors = make_inputs(*shape, dtype=dtype, device=device)
    grad_out = torch.randn(B, heads, height * width, d).to(device, dtype)
    first = op_with_grads(tensors, height, width, grad_out)
    second = op_with_grads(tensors, height, width, grad_out)
    for name, a, b in zip(('out', ) + NAMES, first, second):
        assert torch.equal(a, b), name


@pytest.mark.parametrize('dtype', [F32, BF16], ids=['float32', 'bfloat16'])
def test_repeat_is_bitwise_equal(dtype):
    """No atomics: two runs give the same bits, forward and backward."""
    check_repeat_is_bitwise_equal(TINY_STAGE1, dtype, 'cuda')


def test_non_default_stream():
    """The op on a side stream whose input q is written late (after ~50 ms of spinning) on that
    stream: bitwise equal to the default stream's result only if every launch, forward and
    backward, goes to the current stream."""
    B, heads, height, width, Np, d = TINY_STAGE1
    tensors = [t.detach() for t in make_inputs(*TINY_STAGE1, dtype=BF16, device='cuda')]
    grad_out = torch.randn(B, heads, height * width, d).to('cuda', BF16)
    expected = op_with_grads(tensors, height, width, grad_out)
    side = torch.cuda.Stream()
    q_late = torch.full_like(tensors[0], float('nan'))
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)
        q_late.copy_(tensors[0])
        results = op_with_grads([q_late, *tensors[1:]], height, width, grad_out)
    torch.cuda.current_stream().wait_stream(side)
    for name, a, b in zip(('out', ) + NAMES, results, expected):
        assert torch.equal(a, b), name


def test_batch_times_heads_above_grid_limit():
    """2731 x 24 = 65544 (batch, head) pairs: more than CUDA allows in grid y or z."""
    check_against_reference((2731, 24, 3, 5, 4, 24), F32, 'cuda')


def rel_error(actual, expected):
    """``|actual - expected| / |expected|`` (Frobenius norms, float64)."""
    actual, expected = actual.double(), expected.double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-300))


def backbone_step(model, x, dtype):
    """Outputs and gradients (input and parameters, float64) of one training step: forward,
    then backward of a fixed random projection of the four outputs; fp16 / bf16 under
    autocast."""
    device = x.device
    model.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_()
    with torch.autocast(device.type, dtype=dtype, enabled=dtype in (F16, BF16)):
        outs = model(x)
    weights = [
        torch.randn(o.shape, generator=torch.Generator().manual_seed(100 + i), dtype=F64).to(device)
        for i, o in enumerate(outs)
    ]
    sum((o.double() * w).sum() for o, w in zip(outs, weights)).backward()
    grads = {'input': x.grad.double()}
    grads.update({
        name: p.grad.double()
        for name, p in model.named_parameters() if p.grad is not None
    })
    return [o.detach().double() for o in outs], grads


def zero_gradient_parameters(model):
    """Parameters whose true gradient is zero: in a full-attention layer ``cpb_fc2.bias`` adds
    one constant per head to every logit of that head, which softmax ignores."""
    return {
        f'{name}.cpb_fc2.bias'
        for name, module in model.named_modules() if isinstance(module, FullAttention)
    }


# Relative (norm) error a whole training step with the op may add to what the readable path
# in the same dtype gets (x4 for gradients).
BACKBONE_TOLERANCES = {F32: 1e-4, F16: 1e-2, BF16: 2e-2}


def check_backbone_against_float64(device, dtype, size=(2, 256, 320), **cfg):
    """Every output and gradient of a training step with the op, against the readable path in
    float64: the op's error may exceed the readable path's own error in ``dtype`` (what the
    precision costs any implementation; up to 8e-2 on bf16 parameter gradients) by at most the
    dtype's tolerance. Parameters whose true gradient is zero are checked to be zero in float64
    and skipped (a relative error of rounding noise means nothing)."""
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    state = TransNeXt(**cfg).state_dict()
    x = torch.randn(size[0], 3, *size[1:], generator=torch.Generator().manual_seed(1))
    models = {}
    for impl in ('reference', 'op'):
        models[impl] = TransNeXt(attn_impl=impl, **cfg)
        models[impl].load_state_dict(state)
        models[impl].to(device).train()
    truth_outs, truth_grads = backbone_step(models['reference'].double(),
                                            x.double().to(device), F64)
    models['reference'].float()
    zero = zero_gradient_parameters(models['op'])
    largest = max(g.norm() for g in truth_grads.values())
    for name in zero:
        assert truth_grads[name].norm() <= 1e-9 * largest, name
    errors = {}
    for impl in ('reference', 'op'):
        outs, grads = backbone_step(models[impl], x.to(device), dtype)
        errors[impl] = {
            f'out{i}': rel_error(o, t)
            for i, (o, t) in enumerate(zip(outs, truth_outs))
        }
        errors[impl].update({
            name:
            rel_error(grads[name], truth_grads[name]) if name in grads else float('inf')
            for name in truth_grads if name not in zero
        })
    assert len(errors['op']) > 100
    failed = []
    for name, err in errors['op'].items():
        tol = BACKBONE_TOLERANCES[dtype] * (1 if name.startswith('out') else GRAD_TOLERANCE_FACTOR)
        if not err <= errors['reference'][name] + tol:
            failed.append(f'{name}: {err:.2e} > {errors["reference"][name]:.2e} + {tol:.0e}')
    assert not failed, failed


@pytest.mark.parametrize('dtype', [F32, BF16, F16], ids=['float32', 'bfloat16', 'float16'])
def test_backbone_matches_float64(dtype):
    check_backbone_against_float64('cuda', dtype, arch='tiny')


def test_backbone_fixed_pool_size_matches_float64():
    check_backbone_against_float64('cuda', F32, size=(2, 224, 288), arch='tiny', fixed_pool_size=7)
