# Copyright (c) transnext-mm contributors. All rights reserved.
"""The image demos (tools/demo/det_demo.py, tools/demo/seg_demo.py): one flow for both tasks.

:func:`main` parses the command line, reads the image (a file or a bundled scikit-image photo),
runs the model (a config and checkpoint through the toolbox's own inference API, or an exported
``.onnx`` file in ONNX Runtime, see :mod:`transnext_mm.deployment.inference`), draws the result
with the toolbox's visualizer, writes it as a PNG and prints a one-line summary. What differs
between the tasks (their options, the toolbox's API and visualizer, the summary) is a
:class:`DemoTask`: :class:`DetectionDemo` and :class:`SegmentationDemo`.
"""
import argparse
import os
import os.path as osp
from typing import List, Optional

import numpy as np

from transnext_mm.utils.image import SKIMAGE_PHOTOS, SKIMAGE_PREFIX, load_image


class DemoTask:
    """What one demo does; subclasses fill in the task's steps."""
    #: The task's name, as :data:`DEMOS` and exported files (``meta['task']``) name it.
    task = ''
    description = ''
    default_out_file = ''
    #: Whether a config needs a checkpoint (without one the model is randomly initialised).
    checkpoint_required = True

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add the task's own options."""

    def check_args(self, args: argparse.Namespace) -> None:
        """Raise ValueError naming the option when a task option is out of range."""

    def infer(self, image_rgb: np.ndarray, args: argparse.Namespace):
        """Run the config's model on an RGB image; returns ``(dataset_meta, data sample)``."""
        raise NotImplementedError

    def infer_onnx(self, image_rgb: np.ndarray, path: str):
        """Run an exported file on an RGB image; returns ``(dataset_meta, data sample)``."""
        raise NotImplementedError

    def draw(self, dataset_meta: dict, image_rgb: np.ndarray, result,
             args: argparse.Namespace) -> str:
        """Write the drawn image to ``args.out_file``; returns what it shows, in words."""
        raise NotImplementedError


class DetectionDemo(DemoTask):
    """Boxes (and masks for Mask R-CNN) with mmdet's ``init_detector`` / ``inference_detector``
    and ``DetLocalVisualizer``."""
    task = 'detection'
    description = 'Detect objects in an image and save boxes and masks (PNG)'
    default_out_file = 'outputs/det_demo.png'

    def add_arguments(self, parser):
        parser.add_argument(
            '--score-thr',
            type=float,
            default=0.3,
            help='draw detections scoring above this, in [0, 1)')

    def check_args(self, args):
        if not 0 <= args.score_thr < 1:
            raise ValueError(f'--score-thr must be in [0, 1), got {args.score_thr}')

    def infer(self, image_rgb, args):
        from mmdet.apis import inference_detector, init_detector

        model = init_detector(
            args.config, args.checkpoint, device=args.device, cfg_options=args.cfg_options)
        # mmdet's pipeline expects OpenCV's BGR order for arrays.
        result = inference_detector(model, np.ascontiguousarray(image_rgb[..., ::-1]))
        return model.dataset_meta, result

    def infer_onnx(self, image_rgb, path):
        from .inference import detect_onnx
        return detect_onnx(image_rgb, path)

    def draw(self, dataset_meta, image_rgb, result, args):
        from mmdet.visualization import DetLocalVisualizer

        visualizer = DetLocalVisualizer(name='det_demo')
        visualizer.dataset_meta = dataset_meta
        visualizer.add_datasample(
            'det_demo',
            image_rgb,
            result,
            draw_gt=False,
            draw_pred=True,
            pred_score_thr=args.score_thr,
            out_file=args.out_file)
        instances = result.pred_instances
        keep = instances.scores > args.score_thr
        classes = dataset_meta['classes']
        detections = [(classes[label], score) for label, score in zip(
            instances.labels[keep].tolist(), instances.scores[keep].tolist())]
        top = ', '.join(f'{name} {score:.2f}' for name, score in detections[:8])
        return (f'{len(detections)} detections above {args.score_thr}' +
                (f': {top}' if top else ''))


class SegmentationDemo(DemoTask):
    """A class overlay with mmseg's ``init_model`` / ``inference_model`` and
    ``SegLocalVisualizer``; without a checkpoint the model is randomly initialised (useful only
    to check a config)."""
    task = 'segmentation'
    description = 'Segment an image and save the overlay (PNG)'
    default_out_file = 'outputs/seg_demo.png'
    checkpoint_required = False

    def add_arguments(self, parser):
        parser.add_argument(
            '--opacity', type=float, default=0.5, help='opacity of the segmentation map, in (0, 1]')
        parser.add_argument('--no-labels', action='store_true', help='do not write class names')

    def check_args(self, args):
        if not 0 < args.opacity <= 1:
            raise ValueError(f'--opacity must be in (0, 1], got {args.opacity}')

    def infer(self, image_rgb, args):
        from mmseg.apis import inference_model, init_model

        model = init_model(
            args.config, args.checkpoint, device=args.device, cfg_options=args.cfg_options)
        if not getattr(model, 'dataset_meta', None):  # no checkpoint: the config dataset's classes
            from mmseg.registry import DATASETS
            metainfo = DATASETS.get(model.cfg.test_dataloader.dataset.type).METAINFO
            model.dataset_meta = dict(classes=metainfo['classes'], palette=metainfo['palette'])
        # mmseg's pipeline expects OpenCV's BGR order for arrays.
        result = inference_model(model, np.ascontiguousarray(image_rgb[..., ::-1]))
        return model.dataset_meta, result

    def infer_onnx(self, image_rgb, path):
        from .inference import segment_onnx
        return segment_onnx(image_rgb, path)

    def draw(self, dataset_meta, image_rgb, result, args):
        from mmseg.visualization import SegLocalVisualizer

        visualizer = SegLocalVisualizer(name='seg_demo', alpha=args.opacity)
        visualizer.dataset_meta = dataset_meta
        visualizer.add_datasample(
            'seg_demo',
            image_rgb,
            result,
            draw_gt=False,
            draw_pred=True,
            with_labels=not args.no_labels,
            out_file=args.out_file)
        labels = result.pred_sem_seg.data[0].cpu().numpy()
        ids, counts = np.unique(labels, return_counts=True)
        classes = dataset_meta['classes']
        shares = sorted(
            ((classes[i], c / labels.size) for i, c in zip(ids.tolist(), counts.tolist())),
            key=lambda item: -item[1])
        return ', '.join(f'{name} {100 * share:.1f}%' for name, share in shares[:5])


DEMOS = {demo.task: demo for demo in (DetectionDemo(), SegmentationDemo())}


def parse_args(demo: DemoTask, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line of a demo: the common arguments and the task's own options."""
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=demo.description)
    parser.add_argument(
        'image',
        help=f'image file, or {SKIMAGE_PREFIX}NAME with NAME in '
        f'{", ".join(SKIMAGE_PHOTOS)}')
    parser.add_argument('config', help=f'{demo.task} config, or an exported .onnx file')
    parser.add_argument(
        'checkpoint',
        nargs='?',
        default=None,
        help='checkpoint of the model (not with an .onnx file)' +
        ('' if demo.checkpoint_required else '; omit for random weights'))
    parser.add_argument('--out-file', default=demo.default_out_file, help='output PNG')
    parser.add_argument('--device', default='cpu', help='device, e.g. cpu or cuda:0')
    demo.add_arguments(parser)
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config (key=value)')
    return parser.parse_args(argv)


def check_args(demo: DemoTask, args: argparse.Namespace) -> None:
    """Raise ValueError, naming the argument, for arguments that do not go together."""
    if not args.out_file.lower().endswith('.png'):
        raise ValueError(f'--out-file must end with .png, got {args.out_file}')
    demo.check_args(args)
    if args.config.endswith('.onnx'):
        if args.checkpoint or args.cfg_options:
            raise ValueError('an .onnx model takes no checkpoint and no --cfg-options')
    elif demo.checkpoint_required and args.checkpoint is None:
        raise ValueError(f'a {demo.task} config needs a checkpoint (the argument after the '
                         'config)')


def run(demo: DemoTask, args: argparse.Namespace, image: np.ndarray) -> str:
    """Infer on the RGB ``image``, draw and write ``args.out_file``; returns the summary line."""
    if args.config.endswith('.onnx'):
        dataset_meta, result = demo.infer_onnx(image, args.config)
    else:
        import transnext_mm  # noqa: F401  (safe checkpoint loading; the config imports it too)
        dataset_meta, result = demo.infer(image, args)
    os.makedirs(osp.dirname(osp.abspath(args.out_file)), exist_ok=True)
    shown = demo.draw(dataset_meta, image, result, args)
    return f'{args.image} ({image.shape[1]}x{image.shape[0]}): {shown}'


def main(task: str, argv: Optional[List[str]] = None) -> None:
    """Run the demo of ``task`` ('detection' or 'segmentation') with ``argv``.

    Raises:
        SystemExit: with a message naming the argument for bad input (an image that cannot be
            read, options out of range, an exported file of another task).
    """
    from .model import DeployError

    if task not in DEMOS:
        raise ValueError(f'task must be one of {sorted(DEMOS)}, got {task!r}')
    demo = DEMOS[task]
    args = parse_args(demo, argv)
    try:
        check_args(demo, args)
        image = load_image(args.image)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f'error: {e}')
    try:
        summary = run(demo, args, image)
    except DeployError as e:  # an exported file of another task, without class names, ...
        raise SystemExit(f'error: {e}')
    print(summary)
    print(f'wrote {args.out_file}')
