import math

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from transnext_mm.models.layers import AggregatedAttention, FullAttention, LogCPB
from transnext_mm.ops import dispatch
from transnext_mm.ops.aggregated_attention import op_available


def loop_aggregated_attention(layer, x, height, width, pool_size):
    """Per-query, per-head loops straight from the paper's equations (slow, obviously right)."""
    B, N, C = x.shape
    heads, d = layer.num_heads, layer.head_dim
    q = layer.q(x).reshape(B, N, heads, d)
    k, v = layer.kv(x).reshape(B, N, 2, heads, d).unbind(2)
    pooled = F.adaptive_avg_pool2d(
        F.gelu(layer.sr(x.transpose(1, 2).reshape(B, C, height, width))), pool_size)
    pooled = layer.norm(pooled.flatten(2).transpose(1, 2))
    kp, vp = layer.kv(pooled).reshape(B, -1, 2, heads, d).unbind(2)
    bias_pool = layer.pos_bias.compute(layer.cpb_fc1, layer.cpb_fc2, (height, width), pool_size)
    out = torch.zeros(B, N, heads, d, dtype=x.dtype)
    for b in range(B):
        for h in range(heads):
            temp = F.softplus(layer.temperature[h, 0, 0])
            for y in range(height):
                for xx in range(width):
                    i = y * width + xx
                    qh = F.normalize(q[b, i, h], dim=0)
                    neighbours = []
                    offsets = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1)]
                    for j, (dy, dx) in enumerate(offsets):
                        yy, xj = y + dy, xx + dx
                        if 0 <= yy < height and 0 <= xj < width:
                            neighbours.append((j, yy * width + xj))
                    scale = temp * math.log(len(neighbours) + kp.shape[1])
                    qs = (qh + layer.query_embedding[h, 0]) * scale
                    scores = [
                        qs @ F.normalize(k[b, n, h], dim=0) + layer.relative_pos_bias_local[h, j]
                        for j, n in neighbours
                    ]
                    scores += [
                        qs @ F.normalize(kp[b, p, h], dim=0) + bias_pool[h, i, p]
                        for p in range(kp.shape[1])
                    ]
                    attn = torch.stack(scores).softmax(0)
                    acc = torch.zeros(d, dtype=x.dtype)
                    for a, (j, n) in zip(attn, neighbours):
                        token = qh @ layer.learnable_tokens[h, :, j] + layer.learnable_bias[h, 0, j]
                        acc = acc + (a + token) * v[b, n, h]
                    for p in range(kp.shape[1]):
                        acc = acc + attn[len(neighbours) + p] * vp[b, p, h]
                    out[b, i, h] = acc
    return layer.proj(out.reshape(B, N, C))


def make_layer(mode='extrapolate', heads=2, dims=16):
    layer = AggregatedAttention(
        dims, heads, LogCPB(mode, (8, 8), (1, 1), 56), attn_impl='reference')
    with torch.no_grad():  # non-trivial values for parameters initialised to ~0
        layer.relative_pos_bias_local.normal_(0, 0.5)
        layer.learnable_bias.normal_(0, 0.5)
        layer.query_embedding.normal_(0, 0.5)
    return layer.double()


@pytest.mark.parametrize('height,width,pool', [(4, 5, (2, 2)), (1, 3, (1, 1)), (3, 3, (1, 2))])
def test_layer_matches_paper_loops(height, width, pool):
    layer = make_layer()
    x = torch.randn(2, height * width, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = loop_aggregated_attention(layer, x, height, width, pool)
        # 'op' (when built) runs the compiled cosine-input and attention kernels here.
        impls = ('reference', 'torch') + (('op', ) if op_available(x.device, x.dtype) else ())
        for impl in impls:
            layer.attn_impl = impl
            torch.testing.assert_close(layer(x, height, width, pool), expected)


def test_full_attention_sdpa_matches_explicit():
    layer = FullAttention(48, 2, LogCPB('extrapolate', (4, 4), (4, 4), 7)).double()
    x = torch.randn(2, 20, 48, dtype=torch.float64, requires_grad=True)
    layer.attn_impl = 'reference'
    out_ref = layer(x, 4, 5)
    grads_ref = torch.autograd.grad(out_ref.sum(), [x, layer.cpb_fc1.weight, layer.temperature])
    layer.attn_impl = 'torch'
    out = layer(x, 4, 5)
    grads = torch.autograd.grad(out.sum(), [x, layer.cpb_fc1.weight, layer.temperature])
    torch.testing.assert_close(out, out_ref)
    for g, g_ref in zip(grads, grads_ref):
        torch.testing.assert_close(g, g_ref)


class FunctionCalls(TorchFunctionMode):
    """Records the names of the torch functions called inside it."""

    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        self.names.append(getattr(func, '__name__', str(func)))
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize('impl', ['reference', 'torch', 'auto', 'op'])
def test_full_attention_runs_what_dispatch_chooses(impl):
    """'reference': explicit scores; the rest: F.scaled_dot_product_attention."""
    layer = FullAttention(48, 2, LogCPB('extrapolate', (4, 4), (4, 4), 7), attn_impl=impl)
    x = torch.randn(1, 20, 48)
    with torch.no_grad(), FunctionCalls() as calls:
        layer(x, 4, 5)
    chosen = dispatch.choose('full_attention', impl, x.device, x.dtype).impl
    assert ('scaled_dot_product_attention' in calls.names) == (chosen == 'torch')
    assert ('softmax' in calls.names) == (chosen == 'reference')
