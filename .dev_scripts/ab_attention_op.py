# Copyright (c) transnext-mm contributors. All rights reserved.
"""Compare the aggregated-attention CPU kernels of two builds in one process, interleaved.

A change to the kernels moves a layer's time by a few percent, less than this shared machine
moves between runs, so the two builds are timed side by side: the baseline build's
``transnext_mm/_ext*.so`` copied into a package directory of its own, imported under another
name beside this checkout's build. Inputs are those of a backbone's aggregated-attention layers
(stages 1-3) at one input size, the pooled bias in table form with log-CPB indices (the
training case); each round times every layer shape with both builds, alternating which goes
first, and the report gives per stage the median over rounds of each build's best-of-3 time and
the median of the per-round ratios, and the total over all layers of the arch. Both builds
must take the table op's ``row_weights`` argument (passed as None: one tap).

    cp transnext_mm/_ext*.so /tmp/base/basepkg/   # the baseline build (and an empty __init__.py)
    # ... change and rebuild: python setup.py build_ext --inplace
    python .dev_scripts/ab_attention_op.py /tmp/base basepkg --arch tiny --size 512 --rounds 11
"""

import ab_builds
import torch
import torch.nn.functional as F
from benchmark import layer_shapes

from transnext_mm.models.layers.log_cpb import log_cpb_axes


def layer_inputs(heads, d, height, width, pool_h, pool_w, seed, layout='heads'):
    """One layer's op inputs (batch 1, table-form bias) and an output gradient; with layout
    'rows' q, k, v and the gradient are (B, heads, N, d) views of (B, N, heads, d) tensors, as
    the backbone's layers pass them."""
    gen = torch.Generator().manual_seed(seed)
    N, Np = height * width, pool_h * pool_w

    def randn(*shape):
        return torch.randn(*shape, generator=gen)

    (coords_h, index_h), (coords_w, index_w) = log_cpb_axes((height, width), (pool_h, pool_w), 16,
                                                            torch.device('cpu'))

    def rows(t):
        return t.transpose(1, 2).contiguous().transpose(1, 2) if layout == 'rows' else t

    args = (rows(randn(1, heads, N, d) * 4), rows(F.normalize(randn(1, heads, N, d),
                                                              dim=-1)), rows(randn(1, heads, N, d)),
            F.normalize(randn(1, heads, Np, d), dim=-1), randn(1, heads, Np, d), randn(heads, 9),
            randn(heads,
                  coords_h.numel() * coords_w.numel()), (index_h * coords_w.numel()).contiguous(),
            index_w.contiguous(), None, randn(1, heads, N, 9) * 0.5, height, width)
    return args, rows(randn(1, heads, N, d))


def prepare(ext, args, grad, part):
    if part == 'forward':
        return lambda: ext.aggregated_attention_table_forward(*args)
    out, lse = ext.aggregated_attention_table_forward(*args)  # what the backward needs, untimed
    tensors, grid = args[:11], args[11:]
    return lambda: ext.aggregated_attention_table_backward(grad, *tensors, out, lse, *grid, True)


def main():
    parser = ab_builds.ab_parser(__doc__.split('\n\n')[0])
    parser.add_argument(
        '--layout',
        default='heads',
        choices=('heads', 'rows'),
        help="q, k, v and the output gradient contiguous per head ('heads') or as the "
        "backbone's layers pass them, (B, N, heads, d) tensors viewed per head ('rows')")
    args, new, old, arch = ab_builds.setup_builds(parser)  # arch: with the pooled-grid ratios
    shapes = layer_shapes(arch, args.size, args.size)
    cases = [(count, *layer_inputs(heads, d, h, w, ph, pw, seed=h, layout=args.layout))
             for count, heads, d, h, w, ph, pw in shapes]
    for _, op_args, grad in cases:  # the builds compute the same
        out_new, lse_new = new.aggregated_attention_table_forward(*op_args)
        out_old, _ = old.aggregated_attention_table_forward(*op_args)
        torch.testing.assert_close(out_new, out_old)
        grads_new = new.aggregated_attention_table_backward(grad, *op_args[:11], out_new, lse_new,
                                                            *op_args[11:], True)
        grads_old = old.aggregated_attention_table_backward(grad, *op_args[:11], out_new, lse_new,
                                                            *op_args[11:], True)
        ab_builds.assert_gradients_agree(grads_new, grads_old)
    times = ab_builds.time_rounds({
        'base': old,
        'new': new
    }, [(op_args, grad) for _, op_args, grad in cases], prepare, args.rounds)
    print(f'{args.arch} at {args.size}x{args.size}, batch 1, {args.threads} threads, '
          f'layout {args.layout}, '
          f'{args.rounds} rounds (ms: median over rounds of the best of 3)')
    ab_builds.report(times, [(count, f'{count} layers') for count, _, _ in cases])


if __name__ == '__main__':
    main()
