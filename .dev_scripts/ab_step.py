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

import ab_builds

from transnext_mm.ops import dispatch


def main(argv=None):
    parser = ab_builds.ab_parser(__doc__.split('\n\n')[0])
    parser.add_argument('--steps', type=int, default=2, help='timings per build, round and kind')
    args = parser.parse_args(argv)
    new, base = ab_builds.load_builds(args)
    model, x = ab_builds.transnext_backbone(args.arch, args.size, args.size)

    def use(build):

        def setup():
            dispatch._ext = build  # the module every compiled op gets its kernels from

        return setup

    try:
        times, ratios = ab_builds.time_backbone_ways(model, x, {
            'base': use(base),
            'new': use(new)
        }, args.rounds, args.steps)
    finally:
        dispatch._ext = new
    print(f'TransNeXt-{args.arch}, 1x3x{args.size}x{args.size}, {args.threads} threads, '
          f'{args.rounds} rounds x {args.steps} timings per build and kind')
    ab_builds.report_ways(times, ratios)


if __name__ == '__main__':
    main()
