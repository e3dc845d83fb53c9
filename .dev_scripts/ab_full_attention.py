# Copyright (c) transnext-mm contributors. All rights reserved.
"""Time the last stage's full attention both ways in one backbone, in one process, interleaved.

The two ways are those of ``transnext_mm.ops.dispatch``'s ``'full_attention'`` rule: explicit
scores (``attn_impl='reference'`` on the ``FullAttention`` layers: ``q @ k^T`` plus the bias,
softmax, a product with v) and PyTorch's ``F.scaled_dot_product_attention``
(``attn_impl='torch'``, what ``'auto'`` runs). Everything else runs as ``attn_impl='auto'``
picks. Each round times
``--steps`` training steps (train mode, forward, backward of the sum of the feature maps' means)
and warm eval forwards with each way, alternating which goes first; the report gives each way's
median over all timings and the ratio explicit / SDPA.

    python .dev_scripts/ab_full_attention.py --arch tiny --size 512 512 --rounds 6 --steps 3
"""
import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / 'tools'))

from benchmark import backbone_steps, build_backbone  # noqa: E402

from transnext_mm.models.layers.aggregated_attention import FullAttention  # noqa: E402

WAYS = {'explicit': 'reference', 'sdpa': 'torch'}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--arch', default='tiny')
    parser.add_argument('--size', nargs=2, type=int, default=[512, 512], metavar=('H', 'W'))
    parser.add_argument('--rounds', type=int, default=6)
    parser.add_argument('--steps', type=int, default=3, help='timings per way, round and kind')
    parser.add_argument('--threads', type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    height, width = args.size
    model = build_backbone(
        'transnext_mm',
        dict(
            type='TransNeXt',
            arch=args.arch,
            img_size=min(height, width),
            drop_path_rate=0.3,
            attn_impl='auto'))
    layers = [m for m in model.modules() if isinstance(m, FullAttention)]
    x = torch.randn(1, 3, height, width)

    eval_forward, train_forward = backbone_steps(model, x, x.device, torch.float32, False)

    def train_step():
        model.train()
        train_forward()

    def eval_step():
        model.eval()
        eval_forward()

    times = {(kind, way): [] for kind in ('train', 'eval') for way in WAYS}
    for rnd in range(args.rounds + 1):  # round 0 warms up
        for way in (list(WAYS) if rnd % 2 else list(WAYS)[::-1]):
            for layer in layers:
                layer.attn_impl = WAYS[way]
            for kind, step in (('train', train_step), ('eval', eval_step)):
                if kind == 'eval':
                    eval_step()  # the eval caches, rebuilt after train()
                for _ in range(args.steps):
                    start = time.perf_counter()
                    step()
                    if rnd:
                        times[(kind, way)].append(time.perf_counter() - start)
    print(f'TransNeXt-{args.arch}, 1x3x{height}x{width}, {args.threads} threads, '
          f'{args.rounds} rounds x {args.steps} timings per way and kind')
    for kind in ('train', 'eval'):
        explicit = statistics.median(times[(kind, 'explicit')]) * 1000
        sdpa = statistics.median(times[(kind, 'sdpa')]) * 1000
        print(f'{kind}: explicit {explicit:.1f} ms, sdpa {sdpa:.1f} ms, '
              f'explicit / sdpa {explicit / sdpa:.3f}')


if __name__ == '__main__':
    main()
