# Copyright (c) transnext-mm contributors. All rights reserved.
"""Compare the log-CPB MLP CPU kernels of two builds in one process, interleaved.

As ``ab_attention_op.py``: the baseline build's ``transnext_mm/_ext*.so`` copied into a package
directory of its own and imported under another name beside this checkout's build. The inputs
are the log-CPB tables of a backbone's aggregated-attention layers (stages 1-3) at one input
size (the points of the table over the offsets between each stage's query grid and its pooled
grid; the MLP's 512 hidden units; the stage's heads). Each round times every stage's forward and
backward with both builds, alternating which goes first; the report gives per stage the median
over rounds of each build's best-of-3 time, and the total over all layers of the arch.

    cp transnext_mm/_ext*.so /tmp/base/basepkg/   # the baseline build (and an empty __init__.py)
    # ... change and rebuild: python setup.py build_ext --inplace
    python .dev_scripts/ab_log_cpb_mlp.py /tmp/base basepkg --arch tiny --size 512 --rounds 11
"""

import ab_builds
import torch
from benchmark import layer_shapes

from transnext_mm.models.layers.log_cpb import log_cpb_axes

HIDDEN = 512


def stage_inputs(heads, height, width, pool_h, pool_w, seed):
    """The MLP's points, weights (as ``nn.Linear`` initialises them, roughly) and an output
    gradient for one stage's table."""
    gen = torch.Generator().manual_seed(seed)
    (coords_h, _), (coords_w, _) = log_cpb_axes((height, width), (pool_h, pool_w), 16,
                                                torch.device('cpu'))
    points = torch.stack(torch.meshgrid(coords_h, coords_w, indexing='ij'), -1).reshape(-1, 2)
    weights = (torch.randn(HIDDEN, 2, generator=gen), torch.randn(HIDDEN, generator=gen) * 0.5,
               torch.randn(heads, HIDDEN, generator=gen) / HIDDEN**0.5,
               torch.randn(heads, generator=gen) * 0.02)
    return (points.contiguous(), *weights), torch.randn(points.shape[0], heads, generator=gen)


def prepare(ext, args, grad, part):
    if part == 'backward':
        return lambda: ext.log_cpb_mlp_backward(grad, *args[:4])
    return lambda: ext.log_cpb_mlp_forward(*args)


def main():
    args, new, old, arch = ab_builds.setup_builds(ab_builds.ab_parser(__doc__.split('\n\n')[0]))
    cases = [(count, heads, *stage_inputs(heads, h, w, ph, pw, seed=h))
             for count, heads, _, h, w, ph, pw in layer_shapes(arch, args.size, args.size)]
    for _, _, mlp_args, grad in cases:  # the builds compute the same, up to fp32 sum order
        out_new, out_old = new.log_cpb_mlp_forward(*mlp_args), old.log_cpb_mlp_forward(*mlp_args)
        torch.testing.assert_close(out_new, out_old, rtol=1e-4, atol=1e-5)
        ab_builds.assert_gradients_agree(
            new.log_cpb_mlp_backward(grad, *mlp_args[:4]),
            old.log_cpb_mlp_backward(grad, *mlp_args[:4]))
    times = ab_builds.time_rounds({
        'base': old,
        'new': new
    }, [(mlp_args, grad) for _, _, mlp_args, grad in cases], prepare, args.rounds)
    print(f'{args.arch} at {args.size}x{args.size}, {args.threads} threads, {args.rounds} rounds '
          '(ms: median over rounds of the best of 3)')
    ab_builds.report(times,
                     [(count, f'{count} layers, {mlp_args[0].shape[0]} points x {heads} heads')
                      for count, heads, mlp_args, _ in cases])


if __name__ == '__main__':
    main()
