# Copyright (c) transnext-mm contributors. All rights reserved.
"""Convert a released TransNeXt segmentation checkpoint for this repository's mmseg 1.x configs.

The released UperNet checkpoints were saved by mmseg 0.x (mmcv 1.x runner), the Mask2Former ones
by mmseg 1.x. Both keep the segmentor's parameters under ``state_dict`` as
``backbone.*`` / ``decode_head.*`` / ``auxiliary_head.*``. mmseg 1.x did not rename the parameters
of ``EncoderDecoder``, ``UPerHead`` or ``FCNHead``; what differs is the container (the steps are
those of :mod:`transnext_mm.utils.conversion`, which the detection converter shares):

* mmseg 0.x keeps the class names and palette as ``meta['CLASSES']`` / ``meta['PALETTE']``;
  mmseg 1.x reads ``meta['dataset_meta']`` (``init_model`` and the inferencer take the class
  names from it). Without either, the config's dataset provides them.
* mmcv 1.x runner entries (``optimizer``, ``meta['config']`` in 0.x syntax, ``hook_msgs``) and
  mmengine training state (``message_hub``, ``param_schedulers``) are not needed for testing.
* DDP ``module.`` prefixes, and buffers that some TransNeXt code bases save but this backbone
  derives on the fly (``relative_pos_index*``, ``relative_coords_table*``, ...), are removed.

The converted state dict is checked against the model built from ``--config``: same TransNeXt
arch, no missing and no unexpected keys, same shapes, and a strict ``load_state_dict``. The
result loads in ``tools/test.py`` and ``mmseg.apis.init_model``::

    python tools/model_converters/convert_seg_checkpoint.py \\
        upernet_transnext_tiny_512x512_160k_ade20k_in1k.pth \\
        checkpoints/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.pth \\
        --config configs/upernet/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py
"""
from typing import List, Optional

from transnext_mm.utils import conversion


def detect_source(checkpoint: dict) -> str:
    """'mmseg0.x', 'mmseg1.x' or 'unknown', read off the checkpoint's meta and entries."""
    meta = checkpoint.get('meta') or {}
    version = str(meta.get('mmseg_version', ''))
    if 'CLASSES' in meta or 'PALETTE' in meta or version.startswith('0.'):
        return 'mmseg0.x'
    if 'dataset_meta' in meta or 'message_hub' in checkpoint or version.startswith('1.'):
        return 'mmseg1.x'
    return 'unknown'


TASK = conversion.ConversionTask(
    model='segmentor',
    toolbox='mmseg',
    sources=('mmseg0.x', 'mmseg1.x'),
    detect_source=detect_source,
    description='Convert a released TransNeXt UperNet (mmseg 0.x) or Mask2Former (mmseg 1.x) '
    'checkpoint for the mmseg 1.x configs of transnext-mm',
    config_required=True)


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
        config (str, optional): Segmentation config the result must fit exactly; required
            here (None raises ValueError). Defaults to None.
        source (str): 'auto', 'mmseg0.x' or 'mmseg1.x': the mmseg version that saved ``src``.
            Defaults to 'auto'.
        cfg_options (dict, optional): Overrides for the config. Defaults to None.
    """
    return conversion.convert_checkpoint(TASK, src, dst, config, source, cfg_options)


def main(argv: Optional[List[str]] = None) -> None:
    conversion.main(TASK, argv)


if __name__ == '__main__':
    main()
