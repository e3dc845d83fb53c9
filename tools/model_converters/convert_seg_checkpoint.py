# Copyright (c) transnext-mm contributors. All rights reserved.
"""Convert a released TransNeXt segmentation checkpoint for this repository's mmseg 1.x configs.

The released UperNet checkpoints were saved by mmseg 0.x (mmcv 1.x runner), the Mask2Former ones
by mmseg 1.x. Both keep the segmentor's parameters under ``state_dict`` as
``backbone.*`` / ``decode_head.*`` / ``auxiliary_head.*``. mmseg 1.x did not rename the parameters
of ``EncoderDecoder``, ``UPerHead`` or ``FCNHead``; what differs is the container:

* mmseg 0.x keeps the class names and palette as ``meta['CLASSES']`` / ``meta['PALETTE']``;
  mmseg 1.x reads ``meta['dataset_meta']`` (``init_model`` and the inferencer take the class
  names from it).
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
import argparse
import os
import os.path as osp
import time
from collections import OrderedDict
from typing import Dict, Optional, Tuple

import torch
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope
from mmengine.runner.checkpoint import CheckpointLoader

import transnext_mm  # noqa: F401  (registers TransNeXt, installs the safe checkpoint loader)
from transnext_mm.utils.checkpoint import (check_arch, describe_keys, keep_backbone_weights,
                                           split_backbone_keys, unwrap_state_dict)

SOURCE_LAYOUTS = ('auto', 'mmseg0.x', 'mmseg1.x')
BACKBONE_PREFIX = 'backbone.'


def detect_layout(checkpoint: dict) -> str:
    """Tell an mmseg 0.x (mmcv 1.x runner) checkpoint from an mmseg 1.x (mmengine) one."""
    meta = checkpoint.get('meta') or {}
    version = str(meta.get('mmseg_version', ''))
    if 'CLASSES' in meta or 'PALETTE' in meta or version.startswith('0.'):
        return 'mmseg0.x'
    if 'dataset_meta' in meta or 'message_hub' in checkpoint or version.startswith('1.'):
        return 'mmseg1.x'
    return 'unknown'


def segmentor_state_dict(checkpoint: dict) -> 'OrderedDict[str, torch.Tensor]':
    """The segmentor's parameters from a checkpoint, without ``module.`` prefixes."""
    state_dict = checkpoint
    for wrapper in ('state_dict', 'model'):
        if isinstance(checkpoint.get(wrapper), dict):
            state_dict = checkpoint[wrapper]
            break
    out = OrderedDict()
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'not a state dict: {key!r} holds a {type(value).__name__}')
        out[key[len('module.'):] if key.startswith('module.') else key] = value
    if not any(k.startswith(BACKBONE_PREFIX) for k in out):
        raise ValueError(f"not a segmentor checkpoint: no '{BACKBONE_PREFIX}*' keys (first keys: "
                         f'{list(out)[:5]})')
    return out


def convert_state_dict(state_dict: Dict[str, torch.Tensor],
                       expected_arch: dict) -> Tuple['OrderedDict[str, torch.Tensor]', list]:
    """Clean the backbone part (derived buffers, classifier) and check its TransNeXt arch.

    Returns:
        tuple: the converted state dict and the list of dropped keys.
    """
    backbone = unwrap_state_dict(state_dict)  # the 'backbone.*' keys, prefix stripped
    check_arch(backbone, expected_arch, transnext_mm.TransNeXt.arch_settings,
               target="the config's backbone")
    weights, classifier, derived = split_backbone_keys(backbone)
    dropped = [BACKBONE_PREFIX + k for k in classifier + derived]
    return keep_backbone_weights(state_dict, weights, BACKBONE_PREFIX), dropped


def build_segmentor(config: str, cfg_options: Optional[dict] = None):
    """Build the segmentor of a config, randomly initialised (no pretrained weights loaded)."""
    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmseg'))
    from mmseg.registry import MODELS
    cfg.model.backbone.init_cfg = None
    cfg.model.pop('pretrained', None)
    return MODELS.build(cfg.model), cfg


def check_against_model(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> None:
    """Raise unless ``state_dict`` fits ``model`` exactly (keys and shapes), then load it."""
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [f'{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in own
             if k in state_dict and state_dict[k].shape != own[k].shape]
    problems = []
    if missing:
        problems.append(f'{len(missing)} missing keys: {describe_keys(missing)}')
    if unexpected:
        problems.append(f'{len(unexpected)} unexpected keys: {describe_keys(unexpected)}')
    if wrong:
        problems.append(f'{len(wrong)} keys of the wrong shape: {describe_keys(wrong)}')
    if problems:
        raise ValueError('the converted checkpoint does not fit the config\'s model ('
                         'wrong config, e.g. UperNet vs Mask2Former or another num_classes?): '
                         + '; '.join(problems))
    model.load_state_dict(state_dict, strict=True)


def dataset_meta_of(checkpoint: dict, layout: str, cfg: Config) -> dict:
    """``dataset_meta`` for the converted checkpoint: from the source, else the config's dataset."""
    meta = checkpoint.get('meta') or {}
    if layout == 'mmseg1.x' and isinstance(meta.get('dataset_meta'), dict):
        return dict(meta['dataset_meta'])
    if 'CLASSES' in meta:
        out = dict(classes=tuple(meta['CLASSES']))
        if meta.get('PALETTE') is not None:
            out['palette'] = [list(map(int, c)) for c in meta['PALETTE']]
        return out
    from mmseg.registry import DATASETS
    dataset_cls = DATASETS.get(cfg.test_dataloader.dataset.type)
    metainfo = getattr(dataset_cls, 'METAINFO', {})
    return {k: metainfo[k] for k in ('classes', 'palette') if k in metainfo}


def convert_checkpoint(src: str, dst: str, config: str, source: str = 'auto',
                       cfg_options: Optional[dict] = None) -> dict:
    """Convert ``src`` to ``dst`` for ``config``; returns a summary dict.

    Args:
        src (str): Released checkpoint (local path or URL).
        dst (str): Output path.
        config (str): This repository's config the checkpoint is for.
        source (str): 'auto', 'mmseg0.x' or 'mmseg1.x'. Defaults to 'auto'.
        cfg_options (dict, optional): Overrides for the config. Defaults to None.
    """
    if source not in SOURCE_LAYOUTS:
        raise ValueError(f'source must be one of {SOURCE_LAYOUTS}, got {source!r}')
    checkpoint = CheckpointLoader.load_checkpoint(src, map_location='cpu')
    if not isinstance(checkpoint, dict):
        raise TypeError(f'{src}: expected a dict checkpoint, got {type(checkpoint).__name__}')
    layout = detect_layout(checkpoint) if source == 'auto' else source
    state_dict = segmentor_state_dict(checkpoint)

    model, cfg = build_segmentor(config, cfg_options)
    converted, dropped = convert_state_dict(state_dict, model.backbone.arch)
    check_against_model(converted, model)

    meta = dict(
        dataset_meta=dataset_meta_of(checkpoint, layout, cfg),
        converted_from=osp.basename(src),
        source_layout=layout,
        time=time.asctime())
    source_meta = checkpoint.get('meta') or {}
    for key in ('mmseg_version', 'iter', 'epoch'):
        if key in source_meta:
            meta[f'source_{key}'] = source_meta[key]
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(meta=meta, state_dict=converted), dst)
    return dict(layout=layout, num_tensors=len(converted), dropped=dropped,
                num_classes=len(meta['dataset_meta'].get('classes', ())))


def parse_args():
    parser = argparse.ArgumentParser(
        description='Convert a released TransNeXt UperNet (mmseg 0.x) or Mask2Former (mmseg 1.x) '
        'checkpoint for the mmseg 1.x configs of transnext-mm')
    parser.add_argument('src', help='released checkpoint (path or URL)')
    parser.add_argument('dst', help='output checkpoint path')
    parser.add_argument('--config', required=True,
                        help='the config to test it with (checked: arch, keys, shapes)')
    parser.add_argument('--source', default='auto', choices=SOURCE_LAYOUTS,
                        help='layout of src; auto: from its meta')
    parser.add_argument('--cfg-options', nargs='+', action=DictAction,
                        help='override settings of the config, e.g. model.decode_head.num_classes')
    return parser.parse_args()


def main():
    args = parse_args()
    summary = convert_checkpoint(args.src, args.dst, args.config, args.source, args.cfg_options)
    dropped = summary['dropped']
    print(f"converted {args.src} ({summary['layout']}) -> {args.dst}: "
          f"{summary['num_tensors']} tensors, {summary['num_classes']} classes"
          + (f'; dropped {len(dropped)} keys: {describe_keys(dropped)}' if dropped else '')
          + f'; loads into {osp.basename(args.config)} with no missing or unexpected keys')


if __name__ == '__main__':
    main()
