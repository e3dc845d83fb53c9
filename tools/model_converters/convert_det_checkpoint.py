# Copyright (c) transnext-mm contributors. All rights reserved.
"""Convert a released TransNeXt detection checkpoint for the configs of transnext-mm (mmdet 3.x).

The released Mask R-CNN models were trained with mmdet 2.x, the DINO models with mmdet 3.x, both
with TransNeXt's own backbone code, whose parameters sit under ``backbone.`` in the released
layout (``backbone.patch_embed1.proj.weight``, ``backbone.block1.0.attn.q.weight``, ...).

What changes:

* Parameter names stay. mmdet 2.x and 3.x name the parameters of FPN, RPN and the RoI heads
  alike (``neck.lateral_convs.0.conv``, ``rpn_head.rpn_conv``, ``roi_head.bbox_head.fc_cls``,
  ``roi_head.mask_head.conv_logits``, ...); mmdet 3.x's own Mask R-CNN model zoo links 2.x
  checkpoints. The backbone keeps the released names, which transnext-mm's TransNeXt uses.
* The backbone is verified with :mod:`transnext_mm.utils.checkpoint` (it must be a complete
  TransNeXt of a known arch); buffers that some TransNeXt code bases save and transnext-mm derives
  (``relative_pos_index*``, ``relative_coords_table*``, ...) are dropped, and so is an ImageNet
  classifier if one was left in.
* Only ``state_dict`` and ``meta`` are kept: optimizer state, message hub and schedulers of the
  source run are training state of another code base. An mmdet 2.x ``meta['CLASSES']`` becomes
  mmdet 3.x's ``meta['dataset_meta']['classes']``; mmdet 2.x's config text is dropped.
* With ``--config``, the detector of that config is built (no weights are loaded) and the result
  must match it exactly: no missing, unexpected or wrongly shaped tensors.

Example::

    python tools/model_converters/convert_det_checkpoint.py \\
        mask_rcnn_transnext_tiny_fpn_1x_coco_in1k.pth mask-rcnn_transnext-tiny_converted.pth \\
        --config configs/mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py
"""
import argparse
import os.path as osp
from collections import OrderedDict
from typing import Dict, List, Optional, Tuple

import torch

BACKBONE_PREFIX = 'backbone.'
FORMATS = ('auto', 'mmdet2', 'mmdet3')


def load_source(path: str) -> dict:
    """Load a checkpoint (local path or URL) with transnext-mm's safe loader."""
    import transnext_mm  # noqa: F401  installs the safe loader for mmengine checkpoints
    from mmengine.runner.checkpoint import CheckpointLoader
    checkpoint = CheckpointLoader.load_checkpoint(path, map_location='cpu')
    if not isinstance(checkpoint, dict):
        raise TypeError(f'{path}: a checkpoint must be a dict, got {type(checkpoint).__name__}')
    return checkpoint


def source_format(checkpoint: dict) -> str:
    """'mmdet2' or 'mmdet3', read off the checkpoint's meta (mmdet 3 if it cannot tell)."""
    meta = checkpoint.get('meta') or {}
    version = str(meta.get('mmdet_version', ''))
    if version.startswith('2.') or 'CLASSES' in meta:
        return 'mmdet2'
    return 'mmdet3'


def convert_state_dict(state_dict: Dict[str, torch.Tensor]
                       ) -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """Verify the backbone of a detector state dict and drop what this code base derives.

    Returns:
        tuple: the converted state dict and a summary (arch, dropped keys).

    Raises:
        ValueError: if the state dict has no (complete) TransNeXt backbone under ``backbone.``.
    """
    from transnext_mm.models import TransNeXt
    from transnext_mm.utils.checkpoint import (arch_name, describe_keys, infer_arch,
                                               keep_backbone_weights, split_backbone_keys,
                                               unwrap_state_dict)
    state_dict = OrderedDict((k[len('module.'):] if k.startswith('module.') else k, v)
                             for k, v in state_dict.items())
    if not any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        raise ValueError(f'no {BACKBONE_PREFIX!r} keys: not a detector checkpoint (its first '
                         f'keys are {list(state_dict)[:5]})')
    backbone = unwrap_state_dict(state_dict)  # the 'backbone.' part, validated as TransNeXt
    arch = infer_arch(backbone)
    name = arch_name(arch, TransNeXt.arch_settings)
    if name is None:
        raise ValueError(f'the backbone is not a known TransNeXt arch '
                         f'({sorted(TransNeXt.arch_settings)}): {arch}')
    weights, classifier, derived = split_backbone_keys(backbone)
    expected = TransNeXt(arch=name).state_dict()
    missing = [k for k in expected if k not in weights]
    unexpected = [k for k in weights if k not in expected]
    wrong_shape = [k for k in expected if k in weights and weights[k].shape != expected[k].shape]
    if missing or unexpected or wrong_shape:
        raise ValueError(f'the backbone is an incomplete or altered TransNeXt-{name}: missing '
                         f'[{describe_keys(missing)}], unexpected [{describe_keys(unexpected)}], '
                         f'wrong shape [{describe_keys(wrong_shape)}]')
    converted = keep_backbone_weights(state_dict, weights, BACKBONE_PREFIX)
    summary = dict(arch=name, backbone_tensors=len(weights),
                   dropped=[BACKBONE_PREFIX + k for k in classifier + derived])
    return converted, summary


def convert_meta(checkpoint: dict, fmt: str, source: str) -> dict:
    """mmdet 3.x ``meta``: the source's classes as ``dataset_meta`` and where it came from."""
    meta = dict(checkpoint.get('meta') or {})
    converted = dict(converted_from=osp.basename(source), source_format=fmt)
    if 'dataset_meta' in meta:
        converted['dataset_meta'] = meta['dataset_meta']
    elif meta.get('CLASSES') is not None:
        converted['dataset_meta'] = dict(classes=tuple(meta['CLASSES']))
    for key in ('mmdet_version', 'epoch', 'iter'):
        if key in meta:
            converted[f'source_{key}'] = meta[key]
    return converted


def check_against_config(state_dict: Dict[str, torch.Tensor], config: str,
                         arch: Optional[str] = None) -> None:
    """Build the detector of ``config`` (no weights loaded) and require an exact match.

    Args:
        state_dict (dict): The converted state dict.
        config (str): Detector config.
        arch (str, optional): The checkpoint's TransNeXt arch, compared with the config's first
            for a clear message. Defaults to None.

    Raises:
        ValueError: listing missing, unexpected and wrongly shaped tensors.
    """
    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    from mmdet.registry import MODELS
    from transnext_mm.utils.checkpoint import describe_keys

    cfg = Config.fromfile(config)
    if arch is not None and cfg.model.backbone.get('arch') != arch:
        raise ValueError(f'the checkpoint holds a TransNeXt-{arch} backbone but {config} builds '
                         f'TransNeXt-{cfg.model.backbone.get("arch")}: pick the config of '
                         f'TransNeXt-{arch}')
    init_default_scope(cfg.get('default_scope', 'mmdet'))
    model_state = MODELS.build(cfg.model).state_dict()
    missing = [k for k in model_state if k not in state_dict]
    unexpected = [k for k in state_dict if k not in model_state]
    wrong_shape = [f'{k}: {tuple(state_dict[k].shape)} vs {tuple(v.shape)}'
                   for k, v in model_state.items()
                   if k in state_dict and state_dict[k].shape != v.shape]
    problems = [f'{title} ({len(keys)}): {describe_keys(keys)}'
                for title, keys in (('missing', missing), ('unexpected', unexpected),
                                    ('wrong shape (checkpoint vs model)', wrong_shape)) if keys]
    if problems:
        raise ValueError(f'the converted checkpoint does not fit the model of {config}:\n  '
                         + '\n  '.join(problems))


def convert(src: str, dst: str, config: Optional[str] = None, fmt: str = 'auto') -> dict:
    """Convert ``src`` into ``dst``; returns a summary.

    Args:
        src (str): Released checkpoint (path or URL).
        dst (str): Output file.
        config (str, optional): Detector config the result must fit exactly. Defaults to None.
        fmt (str): 'auto', 'mmdet2' or 'mmdet3': the toolbox version that saved ``src``.
            Defaults to 'auto'.
    """
    if fmt not in FORMATS:
        raise ValueError(f'fmt must be one of {FORMATS}, got {fmt!r}')
    checkpoint = load_source(src)
    if fmt == 'auto':
        fmt = source_format(checkpoint)
    state_dict = checkpoint.get('state_dict', checkpoint.get('model'))
    if not isinstance(state_dict, dict):
        raise ValueError(f'{src} has no state_dict (its keys are {list(checkpoint)[:5]})')
    state_dict, summary = convert_state_dict(state_dict)
    if config is not None:
        check_against_config(state_dict, config, summary['arch'])
    meta = convert_meta(checkpoint, fmt, src)
    torch.save(dict(meta=meta, state_dict=state_dict), dst)
    summary.update(format=fmt, tensors=len(state_dict), classes=len(
        meta.get('dataset_meta', {}).get('classes', ())), checked_with=config)
    return summary


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description='Convert a released TransNeXt Mask R-CNN (mmdet 2.x) or DINO (mmdet 3.x) '
        'checkpoint for the configs of transnext-mm')
    parser.add_argument('src', help='released checkpoint (path or URL)')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument('--config', help='check that the result fits this config exactly')
    parser.add_argument('--source-format', default='auto', choices=FORMATS,
                        help='mmdet version that saved src (auto: read from its meta)')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    summary = convert(args.src, args.dst, args.config, args.source_format)
    print(f'{args.src} ({summary["format"]}, TransNeXt-{summary["arch"]}): wrote '
          f'{summary["tensors"]} tensors ({summary["backbone_tensors"]} in the backbone) and '
          f'{summary["classes"]} class names to {args.dst}')
    if summary['dropped']:
        print(f'dropped {len(summary["dropped"])} backbone keys this code base derives or does '
              f'not use: {", ".join(summary["dropped"][:8])}'
              + (' ...' if len(summary['dropped']) > 8 else ''))
    if summary['checked_with']:
        print(f'checked: matches the model of {summary["checked_with"]} exactly')


if __name__ == '__main__':
    main()
