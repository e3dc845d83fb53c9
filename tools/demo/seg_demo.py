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

The flow is shared with tools/demo/det_demo.py: :mod:`transnext_mm.deployment.demo`.
"""
from typing import List, Optional

from transnext_mm.deployment import demo


def main(argv: Optional[List[str]] = None) -> None:
    demo.main('segmentation', argv)


if __name__ == '__main__':
    main()
