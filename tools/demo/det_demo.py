# Copyright (c) transnext-mm contributors. All rights reserved.
"""Detect objects in one image with a TransNeXt detector and write boxes and masks as a PNG.

The image is a file, or one of scikit-image's bundled photos (``skimage:astronaut``,
``skimage:coffee``, ``skimage:chelsea``), so the demo runs without downloads::

    python tools/demo/det_demo.py skimage:astronaut \\
        configs/mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py CHECKPOINT \\
        --out-file outputs/astronaut_det.png

It uses mmdet's ``init_detector`` / ``inference_detector`` and draws with ``DetLocalVisualizer``
(masks too for Mask R-CNN). A released checkpoint first goes through
tools/model_converters/convert_det_checkpoint.py. An ``.onnx`` file written by
tools/deployment/pytorch2onnx.py (DINO, Mask R-CNN) takes the place of config and checkpoint; it runs in
ONNX Runtime (``transnext_mm.deployment.inference``)::

    python tools/demo/det_demo.py skimage:astronaut dino.onnx --out-file outputs/astronaut_det.png
"""
import argparse
import os
import os.path as osp
from typing import List, Optional, Tuple

import numpy as np
from mmengine.config import DictAction

from transnext_mm.utils.image import SKIMAGE_PHOTOS, SKIMAGE_PREFIX, load_image


def detect(image_rgb: np.ndarray, config: str, checkpoint: str, device: str = 'cpu',
           cfg_options: Optional[dict] = None):
    """Run the detector on an RGB image; returns ``(model, DetDataSample)``."""
    import transnext_mm  # noqa: F401  (safe checkpoint loading; the config imports it too)
    from mmdet.apis import inference_detector, init_detector

    model = init_detector(config, checkpoint, device=device, cfg_options=cfg_options)
    # mmdet's pipeline expects OpenCV's BGR order for arrays.
    return model, inference_detector(model, np.ascontiguousarray(image_rgb[..., ::-1]))


def draw(dataset_meta: dict, image_rgb: np.ndarray, result, out_file: str,
         score_thr: float = 0.3) -> List[Tuple[str, float]]:
    """Write the image with the detections above ``score_thr``; returns (class, score) pairs."""
    from mmdet.visualization import DetLocalVisualizer

    visualizer = DetLocalVisualizer(name='det_demo')
    visualizer.dataset_meta = dataset_meta
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    visualizer.add_datasample('det_demo', image_rgb, result, draw_gt=False, draw_pred=True,
                              pred_score_thr=score_thr, out_file=out_file)
    instances = result.pred_instances
    keep = instances.scores > score_thr
    classes = dataset_meta['classes']
    return [(classes[label], score) for label, score in
            zip(instances.labels[keep].tolist(), instances.scores[keep].tolist())]


def parse_args():
    parser = argparse.ArgumentParser(
        description='Detect objects in an image and save boxes and masks (PNG)')
    parser.add_argument('image', help=f'image file, or {SKIMAGE_PREFIX}NAME with NAME in '
                        f'{", ".join(SKIMAGE_PHOTOS)}')
    parser.add_argument('config', help='detection config, or an exported .onnx file')
    parser.add_argument('checkpoint', nargs='?', default=None,
                        help='checkpoint of the detector (not with an .onnx file)')
    parser.add_argument('--out-file', default='outputs/det_demo.png', help='output PNG')
    parser.add_argument('--device', default='cpu', help='device, e.g. cpu or cuda:0')
    parser.add_argument('--score-thr', type=float, default=0.3,
                        help='draw detections scoring above this, in [0, 1)')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config (key=value)')
    return parser.parse_args()


def main():
    args = parse_args()
    if not 0 <= args.score_thr < 1:
        raise SystemExit(f'--score-thr must be in [0, 1), got {args.score_thr}')
    if not args.out_file.lower().endswith('.png'):
        raise SystemExit(f'--out-file must end with .png, got {args.out_file}')
    image = load_image(args.image)
    if args.config.endswith('.onnx'):
        if args.checkpoint or args.cfg_options:
            raise SystemExit('an .onnx model takes no checkpoint and no --cfg-options')
        from transnext_mm.deployment import DeployError
        from transnext_mm.deployment.inference import detect_onnx
        try:
            dataset_meta, result = detect_onnx(image, args.config)
        except DeployError as e:
            raise SystemExit(f'error: {e}')
    else:
        if args.checkpoint is None:
            raise SystemExit('a detection config needs a checkpoint')
        model, result = detect(image, args.config, args.checkpoint, args.device,
                               args.cfg_options)
        dataset_meta = model.dataset_meta
    detections = draw(dataset_meta, image, result, args.out_file, args.score_thr)
    top = ', '.join(f'{name} {score:.2f}' for name, score in detections[:8])
    print(f'{args.image} ({image.shape[1]}x{image.shape[0]}): {len(detections)} detections '
          f'above {args.score_thr}' + (f': {top}' if top else ''))
    print(f'wrote {args.out_file}')


if __name__ == '__main__':
    main()
