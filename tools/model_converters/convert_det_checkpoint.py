# Copyright (c) transnext-mm contributors. All rights reserved.
"""Convert a released TransNeXt detection checkpoint for the configs of transnext-mm (mmdet 3.x).

The released Mask R-CNN models were trained with mmdet 2.x, the DINO models with mmdet 3.x, both
with TransNeXt's own backbone code, whose parameters sit under ``backbone.`` in the released
layout (``backbone.patch_embed1.proj.weight``, ``backbone.block1.0.attn.q.weight``, ...).

What changes (the steps are those of :mod:`transnext_mm.utils.conversion`, which the
segmentation converter shares):

* Parameter names stay. mmdet 2.x and 3.x name the parameters of FPN, RPN and the RoI heads
  alike (``neck.lateral_convs.0.conv``, ``rpn_head.rpn_conv``, ``roi_head.bbox_head.fc_cls``,
  ``roi_head.mask_head.conv_logits``, ...); mmdet 3.x's own Mask R-CNN model zoo links 2.x
  checkpoints. The backbone keeps the released names, which transnext-mm's TransNeXt uses.
* The backbone must be a complete TransNeXt of a known arch; buffers that some TransNeXt code
  bases save and transnext-mm derives (``relative_pos_index*``, ``relative_coords_table*``, ...)
  are dropped, and so is an ImageNet classifier if one was left in.
* Only ``state_dict`` and ``meta`` are kept: optimizer state, message hub and schedulers of the
  source run are training state of another code base. An mmdet 2.x ``meta['CLASSES']`` becomes
  mmdet 3.x's ``meta['dataset_meta']['classes']``; mmdet 2.x's config text is dropped.
* With ``--config``, the detector of that config is built (no weights are loaded) and the result
  must match it exactly: same TransNeXt arch, no missing, unexpected or wrongly shaped tensors.

Example::

    python tools/model_converters/convert_det_checkpoint.py \\
        mask_rcnn_transnext_tiny_fpn_1x_coco_in1k.pth mask-rcnn_transnext-tiny_converted.pth \\
        --config configs/mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py
"""
from typing import List, Optional

from transnext_mm.utils import conversion


def detect_source(checkpoint: dict) -> str:
    """'mmdet2' or 'mmdet3', read off the checkpoint's meta (mmdet 3 if it cannot tell)."""
    meta = checkpoint.get('meta') or {}
    version = str(meta.get('mmdet_version', ''))
    if version.startswith('2.') or 'CLASSES' in meta:
        return 'mmdet2'
    return 'mmdet3'


TASK = conversion.ConversionTask(
    model='detector',
    toolbox='mmdet',
    sources=('mmdet2', 'mmdet3'),
    detect_source=detect_source,
    description='Convert a released TransNeXt Mask R-CNN (mmdet 2.x) or DINO (mmdet 3.x) '
    'checkpoint for the configs of transnext-mm')


def parse_args(argv: Optional[List[str]] = None):
    return conversion.parse_args(TASK, argv)


def convert(src: str,
            dst: str,
            config: Optional[str] = None,
            source: str = 'auto',
            cfg_options: Optional[dict] = None) -> dict:
    """Convert ``src`` into ``dst`` (see :func:`transnext_mm.utils.conversion.convert_checkpoint`).

    Args:
        src (str): Released checkpoint (path or URL).
        dst (str): Output file.
        config (str, optional): Detector config the result must fit exactly. Defaults to None.
        source (str): 'auto', 'mmdet2' or 'mmdet3': the mmdet version that saved ``src``.
            Defaults to 'auto'.
        cfg_options (dict, optional): Overrides for the config. Defaults to None.
    """
    return conversion.convert_checkpoint(TASK, src, dst, config, source, cfg_options)


def main(argv: Optional[List[str]] = None) -> None:
    conversion.main(TASK, argv)


if __name__ == '__main__':
    main()
