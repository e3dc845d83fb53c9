# Copyright (c) transnext-mm contributors. All rights reserved.
"""Export a TransNeXt model (classification, UperNet, Mask2Former, DINO, Mask R-CNN, or any
config's backbone) to ONNX, or to a ``torch.export`` program, and check it against PyTorch.

The graph's input is the normalised image batch (B, 3, H, W) float32 (the data preprocessor's
mean/std and channel order are stored in the file's metadata); its outputs are the logits
(classification), the per-pixel class logits at (H, W) (segmentation), boxes/scores/labels after
post-processing (detection; Mask R-CNN adds the mask head's per-box probabilities), or the
backbone's feature maps (``--backbone-only``). The aggregated
attention exports through its PyTorch path. Examples::

    python tools/deployment/pytorch2onnx.py \\
        configs/demo/upernet_transnext-micro_synthetic-ade20k.py CKPT --shape 128 128 \\
        --out work_dirs/upernet.onnx --verify
    python tools/deployment/pytorch2onnx.py configs/classification/transnext-micro_in1k-224px.py \\
        --shape 224 224 --out micro.onnx --dynamic --verify
    python tools/deployment/pytorch2onnx.py CONFIG CKPT --shape 128 128 --out model.pt2 \\
        --format torch-export --verify

``--verify`` runs the file (ONNX Runtime, or ``torch.export.load``) and PyTorch on the same
random input (with ``--dynamic`` also at two other sizes), prints the error figures and exits
with status 1 when they exceed the tolerances of ``transnext_mm.deployment.TOLERANCES``.
Errors in the config, checkpoint, shape or options exit with status 2.
"""
import argparse
import sys
import time

from transnext_mm.deployment import FORMATS, DeployError, export, format_report, prepare, verify


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('config', help='config file (configs/...)')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        default=None,
        help='checkpoint of the whole model (omit for random weights)')
    parser.add_argument(
        '--shape',
        nargs=2,
        type=int,
        required=True,
        metavar=('H', 'W'),
        help='input height and width at export')
    parser.add_argument('--out', required=True, help='output file (.onnx, or .pt2)')
    parser.add_argument('--format', default='onnx', choices=FORMATS)
    parser.add_argument('--batch', type=int, default=1, help='batch size of the input')
    parser.add_argument(
        '--dynamic',
        action='store_true',
        help='leave height and width free (the position biases are computed in '
        'the graph)')
    parser.add_argument(
        '--backbone-only',
        action='store_true',
        help='export only the TransNeXt backbone (its feature maps)')
    parser.add_argument(
        '--verify',
        action='store_true',
        help='compare the exported file with PyTorch; exit 1 if out of tolerance')
    parser.add_argument(
        '--verify-shapes',
        nargs='+',
        type=int,
        default=None,
        metavar='H W',
        help='other input sizes to verify a --dynamic file at (pairs H W); '
        'default: two sizes near --shape')
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        if args.verify_shapes and (len(args.verify_shapes) % 2 or not args.dynamic):
            raise DeployError('--verify-shapes takes pairs H W and needs --dynamic')
        net, task, meta = prepare(args.config, args.checkpoint, args.shape, args.batch,
                                  args.backbone_only)
        start = time.perf_counter()
        export(net, meta, args.out, args.format, args.dynamic)
        print(f'{args.config}: {task} exported to {args.out} ({args.format}, '
              f'{"dynamic H, W" if args.dynamic else "fixed"} {args.batch}x3x{args.shape[0]}x'
              f'{args.shape[1]}) in {time.perf_counter() - start:.1f} s')
        if not args.verify:
            return 0
        if args.verify_shapes:
            pairs = args.verify_shapes
            shapes = [pairs[i:i + 2] for i in range(0, len(pairs), 2)]
        elif args.dynamic:
            height, width = args.shape
            shapes = [[height + 32, width - 16 if width > 64 else width + 48],
                      [height + 40, width + 24]]
        else:
            shapes = []
        meta['format'] = args.format
        results = verify(net, meta, args.out, shapes)
    except DeployError as e:
        print(f'error: {e}', file=sys.stderr)
        return 2
    ok = True
    for shape, report in results:
        print(f'verify {args.format} vs PyTorch at {shape[0]}x{shape[1]}: '
              f'{format_report(report)}')
        ok &= report['ok']
    if not ok:
        print(
            'error: verification failed: the exported model differs from PyTorch beyond the '
            'tolerances',
            file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
