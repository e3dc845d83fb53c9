# Copyright (c) transnext-mm contributors. All rights reserved.
"""Segment one image with a TransNeXt segmentor and write the overlay as a PNG.

The image is a file, or one of scikit-image's bundled photos (``skimage:astronaut``,
``skimage:coffee``, ``skimage:chelsea``), so the demo runs without downloads::

    python tools/demo/seg_demo.py skimage:chelsea \\
        configs/upernet/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py CHECKPOINT \\
        --out-file outputs/chelsea_seg.png

It uses mmseg's ``init_model`` / ``inference_model`` and draws with ``SegLocalVisualizer``.
Without a checkpoint the model is randomly initialised (useful only to check a config).
An ``.onnx`` file written by tools/deployment/pytorch2onnx.py takes the place of config and
checkpoint; it runs in ONNX Runtime (``transnext_mm.deployment.inference``)::

    python tools/demo/seg_demo.py skimage:chelsea upernet.onnx --out-file outputs/chelsea_seg.png
"""
import argparse
import os
import os.path as osp
from typing import Optional

import numpy as np
from mmengine.config import DictAction

from transnext_mm.utils.image import SKIMAGE_PHOTOS, SKIMAGE_PREFIX, load_image


def segment(image_rgb: np.ndarray, config: str, checkpoint: Optional[str] = None,
            device: str = 'cpu', cfg_options: Optional[dict] = None):
    """Run the segmentor on an RGB image; returns ``(model, SegDataSample)``."""
    import transnext_mm  # noqa: F401  (safe checkpoint loading; the config imports it too)
    from mmseg.apis import inference_model, init_model

    model = init_model(config, checkpoint, device=device, cfg_options=cfg_options)
    if not getattr(model, 'dataset_meta', None):  # no checkpoint: the config dataset's classes
        from mmseg.registry import DATASETS
        metainfo = DATASETS.get(model.cfg.test_dataloader.dataset.type).METAINFO
        model.dataset_meta = dict(classes=metainfo['classes'], palette=metainfo['palette'])
    # mmseg's pipeline expects OpenCV's BGR order for arrays.
    result = inference_model(model, np.ascontiguousarray(image_rgb[..., ::-1]))
    return model, result


def draw(dataset_meta: dict, image_rgb: np.ndarray, result, out_file: str, opacity: float = 0.5,
         with_labels: bool = True) -> dict:
    """Write the overlay PNG; returns the share of the image of each predicted class."""
    from mmseg.visualization import SegLocalVisualizer

    visualizer = SegLocalVisualizer(name='seg_demo', alpha=opacity)
    visualizer.dataset_meta = dataset_meta
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    visualizer.add_datasample('seg_demo', image_rgb, result, draw_gt=False, draw_pred=True,
                              with_labels=with_labels, out_file=out_file)
    labels = result.pred_sem_seg.data[0].cpu().numpy()
    ids, counts = np.unique(labels, return_counts=True)
    classes = dataset_meta['classes']
    return {classes[i]: c / labels.size for i, c in zip(ids.tolist(), counts.tolist())}


def parse_args():
    parser = argparse.ArgumentParser(description='Segment an image and save the overlay (PNG)')
    parser.add_argument('image', help=f'image file, or {SKIMAGE_PREFIX}NAME with NAME in '
                        f'{", ".join(SKIMAGE_PHOTOS)}')
    parser.add_argument('config', help='segmentation config, or an exported .onnx file')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint (omit for random weights)')
    parser.add_argument('--out-file', default='outputs/seg_demo.png', help='output PNG')
    parser.add_argument('--device', default='cpu', help='device, e.g. cpu or cuda:0')
    parser.add_argument('--opacity', type=float, default=0.5,
                        help='opacity of the segmentation map, in (0, 1]')
    parser.add_argument('--no-labels', action='store_true', help='do not write class names')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config (key=value)')
    return parser.parse_args()


def main():
    args = parse_args()
    if not 0 < args.opacity <= 1:
        raise SystemExit(f'--opacity must be in (0, 1], got {args.opacity}')
    if not args.out_file.lower().endswith('.png'):
        raise SystemExit(f'--out-file must end with .png, got {args.out_file}')
    image = load_image(args.image)
    if args.config.endswith('.onnx'):
        if args.checkpoint or args.cfg_options:
            raise SystemExit('an .onnx model takes no checkpoint and no --cfg-options')
        from transnext_mm.deployment import DeployError
        from transnext_mm.deployment.inference import segment_onnx
        try:
            dataset_meta, result = segment_onnx(image, args.config)
        except DeployError as e:
            raise SystemExit(f'error: {e}')
    else:
        model, result = segment(image, args.config, args.checkpoint, args.device,
                                args.cfg_options)
        dataset_meta = model.dataset_meta
    shares = draw(dataset_meta, image, result, args.out_file, args.opacity, not args.no_labels)
    top = ', '.join(f'{name} {100 * share:.1f}%' for name, share in
                    sorted(shares.items(), key=lambda item: -item[1])[:5])
    print(f'{args.image} ({image.shape[1]}x{image.shape[0]}): {top}')
    print(f'wrote {args.out_file}')


if __name__ == '__main__':
    main()
