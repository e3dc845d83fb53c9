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
tools/deployment/pytorch2onnx.py (DINO, Mask R-CNN) takes the place of config and checkpoint; it
runs in ONNX Runtime (``transnext_mm.deployment.inference``)::

    python tools/demo/det_demo.py skimage:astronaut dino.onnx --out-file outputs/astronaut_det.png

The flow is shared with tools/demo/seg_demo.py: :mod:`transnext_mm.deployment.demo`.
"""
from typing import List, Optional

from transnext_mm.deployment import demo


def main(argv: Optional[List[str]] = None) -> None:
    demo.main('detection', argv)


if __name__ == '__main__':
    main()
