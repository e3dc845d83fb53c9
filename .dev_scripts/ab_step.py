# Copyright (c) transnext-mm contributors. All rights reserved.
"""Compare two builds' compiled kernels in the whole backbone, in one process, interleaved.

A kernel change that moves a training step by a few percent is below what separate benchmark
runs on a shared machine resolve. Here one backbone runs with this checkout's
``transnext_mm._ext`` and with a baseline build's (copied into a package of its own, as for
``ab_attention_op.py``), switched between timings: every compiled op of
``transnext_mm.ops`` reaches its kernels through :func:`transnext_mm.ops.dispatch.compiled_ext`.
Each round times ``--steps`` training steps (train mode, forward, backward of the sum of the
feature maps' means) and warm eval forwards with each build, alternating which goes first; the
report gives each build's median over all timings and the median over rounds of the ratio
new / base of the round's mean timings (the ratio of neighbouring timings, which drifts on a
shared machine cancel).

    cp transnext_mm/_ext*.so /tmp/base/basepkg/   # the baseline build (and an empty __init__.py)
    # ... change and rebuild: python setup.py build_ext --inplace
    python .dev_scripts/ab_step.py /tmp/base basepkg --arch tiny --size 512 --rounds 8
"""
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / 'tools'))

from ab_builds import ab_parser, load_builds  # noqa: E402
from benchmark import backbone_steps, build_backbone  # noqa: E402

from transnext_mm.ops import dispatch  # noqa: E402


def main(argv=None):
    parser = ab_parser(__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=2, help='timings per build, round and kind')
    args = parser.parse_args(argv)
    new, base = load_builds(args)
    builds = {'base': base, 'new': new}
    torch.manual_seed(0)
    model = build_backbone(
        'transnext_mm',
        dict(
            type='TransNeXt',
            arch=args.arch,
            img_size=args.size,
            drop_path_rate=0.3,
            attn_impl='auto'))
    x = torch.randn(1, 3, args.size, args.size)
    eval_forward, train_forward = backbone_steps(model, x, x.device, torch.float32, False)

    def train_step():
        model.train()
        train_forward()

    def eval_step():
        model.eval()
        eval_forward()

    times = {(kind, name): [] for kind in ('train', 'eval') for name in builds}
    ratios = {'train': [], 'eval': []}
    try:
        for rnd in range(args.rounds + 1):  # round 0 warms up
            means = {}
            for name in (('base', 'new') if rnd % 2 else ('new', 'base')):
                dispatch._ext = builds[name]
                for kind, step in (('train', train_step), ('eval', eval_step)):
                    if kind == 'eval':
                        eval_step()  # the eval caches, rebuilt after train()
                    timings = []
                    for _ in range(args.steps):
                        start = time.perf_counter()
                        step()
                        timings.append(time.perf_counter() - start)
                    times[(kind, name)] += timings if rnd else []
                    means[(kind, name)] = statistics.mean(timings)
            for kind in ratios:
                if rnd:
                    ratios[kind].append(means[(kind, 'new')] / means[(kind, 'base')])
    finally:
        dispatch._ext = new
    print(f'TransNeXt-{args.arch}, 1x3x{args.size}x{args.size}, {args.threads} threads, '
          f'{args.rounds} rounds x {args.steps} timings per build and kind')
    for kind in ('train', 'eval'):
        base_ms = statistics.median(times[(kind, 'base')]) * 1000
        new_ms = statistics.median(times[(kind, 'new')]) * 1000
        print(f'{kind}: base {base_ms:.1f} ms, new {new_ms:.1f} ms, per-round ratio new / base '
              f'{statistics.median(ratios[kind]):.3f} (rounds: '
              f'{" ".join(f"{r:.3f}" for r in ratios[kind])})')


if __name__ == '__main__':
    main()
