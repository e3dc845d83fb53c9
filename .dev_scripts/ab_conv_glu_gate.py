# Copyright (c) transnext-mm contributors. All rights reserved.
"""Compare the ConvGLU gate's CPU kernels of two builds in one process, interleaved.

As ``ab_attention_op.py``: the baseline build's ``transnext_mm/_ext*.so`` copied into a package
directory of its own and imported under another name beside this checkout's build. The inputs
are those of a backbone's ConvGLU layers (all four stages) at one input size: random fc1 outputs
(B = 1, H*W tokens, 2 x hidden channels), the depthwise conv's weight and bias and fc2's weight
of a freshly initialised ConvGLU, and an output gradient. "forward" is the gate alone, as eval
runs it; "backward" is the training step's backward, fc2's weight multiplied in and the gate's
output recomputed for fc2's weight gradient. Each round times every stage with both builds,
alternating which goes first; the report gives per stage the median over rounds of each build's
best-of-3 time, and the total over all layers of the arch.

    cp transnext_mm/_ext*.so /tmp/base/basepkg/   # the baseline build (and an empty __init__.py)
    # ... change and rebuild: python setup.py build_ext --inplace
    python .dev_scripts/ab_conv_glu_gate.py /tmp/base basepkg --arch tiny --size 512 --rounds 11
"""

import ab_builds
import torch
from benchmark import stage_sizes

from transnext_mm.models.layers import ConvGLU


def stage_inputs(channels, mlp_ratio, height, width, seed):
    """One stage's gate inputs ``(hidden, weight, bias, fc2_weight, height, width)`` and output
    gradient: a ConvGLU layer's own conv and fc2 weights (its channel counts and
    initialisation) and random fc1 outputs."""
    torch.manual_seed(seed)
    layer = ConvGLU(channels, mlp_ratio)
    conv = layer.dwconv.dwconv
    tokens = height * width
    args = (torch.randn(1, tokens,
                        layer.fc1.out_features), conv.weight.detach(), conv.bias.detach(),
            layer.fc2.weight.detach(), height, width)
    return args, torch.randn(1, tokens, channels)


def prepare(ext, args, grad, part):
    hidden, weight, bias, fc2_weight, height, width = args
    if part == 'backward':
        return lambda: ext.conv_glu_gate_backward(
            grad, hidden, weight, bias, height, width, with_output=True, fc2_weight=fc2_weight)
    return lambda: ext.conv_glu_gate_forward(hidden, weight, bias, height, width)


def main():
    args, new, old, arch = ab_builds.setup_builds(ab_builds.ab_parser(__doc__.split('\n\n')[0]))
    cases = []
    for stage, (h, w) in enumerate(stage_sizes(args.size, args.size)):
        gate_args, grad = stage_inputs(
            arch['embed_dims'][stage], arch['mlp_ratios'][stage], h, w, seed=stage)
        cases.append((arch['depths'][stage], gate_args, grad))
    for _, gate_args, grad in cases:  # the builds compute the same, up to fp32 rounding
        hidden, weight, bias, fc2_weight, h, w = gate_args
        torch.testing.assert_close(
            new.conv_glu_gate_forward(hidden, weight, bias, h, w),
            old.conv_glu_gate_forward(hidden, weight, bias, h, w))
        backward = dict(with_output=True, fc2_weight=fc2_weight)
        ab_builds.assert_gradients_agree(
            new.conv_glu_gate_backward(grad, hidden, weight, bias, h, w, **backward),
            old.conv_glu_gate_backward(grad, hidden, weight, bias, h, w, **backward))
    times = ab_builds.time_rounds({
        'base': old,
        'new': new
    }, [(gate_args, grad) for _, gate_args, grad in cases], prepare, args.rounds)
    print(f'{args.arch} at {args.size}x{args.size}, batch 1, {args.threads} threads, '
          f'{args.rounds} rounds (ms: median over rounds of the best of 3)')
    ab_builds.report(times, [(count, f'{count} layers, {gate_args[0].shape[1]} tokens x '
                              f'{gate_args[0].shape[2] // 2} channels')
                             for count, gate_args, _ in cases])


if __name__ == '__main__':
    main()
