# Copyright (c) transnext-mm contributors. All rights reserved.
"""Time the last stage's full attention both ways in one backbone, in one process, interleaved.

The two ways are those of ``transnext_mm.ops.dispatch``'s ``'full_attention'`` rule: explicit
scores (``attn_impl='reference'`` on the ``FullAttention`` layers: ``q @ k^T`` plus the bias,
softmax, a product with v) and PyTorch's ``F.scaled_dot_product_attention``
(``attn_impl='torch'``, what ``'auto'`` runs). Everything else runs as ``attn_impl='auto'``
picks. Each round times
``--steps`` training steps (train mode, forward, backward of the sum of the feature maps' means)
and warm eval forwards with each way, alternating which goes first; the report gives each way's
median over all timings and the median over rounds of the ratio explicit / SDPA.

    python .dev_scripts/ab_full_attention.py --arch tiny --size 512 512 --rounds 6 --steps 3
"""
import argparse

import torch
from ab_builds import report_ways, time_backbone_ways, transnext_backbone

from transnext_mm.models.layers.aggregated_attention import FullAttention

WAYS = {'sdpa': 'torch', 'explicit': 'reference'}  # the ratio: explicit / sdpa


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', nargs=2, type=int, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--steps', type=int, default=3, help='timings per way, round and kind')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    height, width = args.size
    model, x = transnext_backbone(args.arch, height, width)
    layers = [m for m in model.modules() if isinstance(m, FullAttention)]

    def use(impl):

        def setup():
            for layer in layers:
                layer.attn_impl = impl

        return setup

    times, ratios = time_backbone_ways(model, x, {
        way: use(impl)
        for way, impl in WAYS.items()
    }, args.rounds, args.steps)
    print(f'TransNeXt-{args.arch}, 1x3x{height}x{width}, {args.threads} threads, '
          f'{args.rounds} rounds x {args.steps} timings per way and kind')
    report_ways(times, ratios)


if __name__ == '__main__':
    main()
