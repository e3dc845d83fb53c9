# Copyright (c) transnext-mm contributors. All rights reserved.
"""Converting released TransNeXt detector and segmentor checkpoints for transnext-mm's configs.

The steps that tools/model_converters/convert_det_checkpoint.py and convert_seg_checkpoint.py
share; each script supplies a :class:`ConversionTask` (the toolbox, the source formats and how
to tell them apart) and runs :func:`main`:

1. :func:`parse_args`: ``src dst [--config CONFIG] [--source SOURCE] [--cfg-options ...]``.
2. :func:`load_checkpoint`: the released file (path or URL) through transnext-mm's safe loader.
3. :func:`model_state_dict` and :func:`convert_state_dict`: the model's tensors without DDP
   ``module.`` prefixes; the backbone (under ``backbone.``) must be a complete TransNeXt of a known
   arch; buffers it derives (``relative_pos_index*``, ...) and an ImageNet classifier are dropped.
   Parameter names stay: the toolboxes did not rename them between their versions.
4. :func:`check_against_model`: with a config, its model is built (randomly initialised) and the
   result must fit it exactly (arch, keys, shapes), then loads into it strictly.
5. :func:`convert_meta` and :func:`save_checkpoint`: only ``state_dict`` and ``meta`` are
   written (optimizer state, message hub and schedulers are training state of another run); the
   class names become ``meta['dataset_meta']``, taken from the source (``dataset_meta``, or the
   older ``CLASSES`` / ``PALETTE``) or else from the config's test dataset.
"""
import argparse
import os
import os.path as osp
import pickle
import time
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Tuple

import torch

from .checkpoint import (arch_name, check_arch, describe_keys, infer_arch, keep_backbone_weights,
                         split_backbone_keys, unwrap_checkpoint, unwrap_state_dict)

BACKBONE_PREFIX = 'backbone.'


class ConversionTask:
    """What one converter script converts.

    Args:
        model (str): What the checkpoint holds, as messages name it: 'detector' or 'segmentor'.
        toolbox (str): The toolbox of the configs, 'mmdet' or 'mmseg'; the source's
            ``meta['<toolbox>_version']`` is kept as ``source_<toolbox>_version``.
        sources (tuple[str]): The source formats (the toolbox versions that saved the released
            checkpoints), for ``--source``.
        detect_source (callable): Reads the source format off a loaded checkpoint.
        description (str): The command line's description.
        config_required (bool): Whether ``--config`` must be given. Defaults to False.
    """

    def __init__(self,
                 model: str,
                 toolbox: str,
                 sources: Tuple[str, ...],
                 detect_source: Callable[[dict], str],
                 description: str,
                 config_required: bool = False):
        self.model = model
        self.toolbox = toolbox
        self.sources = tuple(sources)
        self.detect_source = detect_source
        self.description = description
        self.config_required = config_required

    @property
    def source_choices(self) -> Tuple[str, ...]:
        return ('auto', ) + self.sources


def parse_args(task: ConversionTask, argv: Optional[List[str]] = None) -> argparse.Namespace:
    """The command line of a converter script.

    Args:
        task (ConversionTask): The script's task.
        argv (list[str], optional): The arguments. Defaults to None (``sys.argv[1:]``).
    """
    from mmengine.config import DictAction

    parser = argparse.ArgumentParser(description=task.description)
    parser.add_argument('src', help='released checkpoint (path or URL)')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument(
        '--config',
        required=task.config_required,
        help='the config the result is for: it must fit its model exactly '
        '(arch, keys, shapes)' +
        ('' if task.config_required else '; without it only the backbone is checked'))
    parser.add_argument(
        '--source',
        '--source-format',
        dest='source',
        default='auto',
        choices=task.source_choices,
        help=f'{task.toolbox} version that saved src (auto: read from its meta)')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config (key=value), e.g. the number of '
        'classes of the heads')
    return parser.parse_args(argv)


def load_checkpoint(src: str) -> dict:
    """Load a checkpoint (local path or URL) with transnext-mm's safe loader.

    Raises:
        TypeError: if the file does not hold a dict.
    """
    from mmengine.runner.checkpoint import CheckpointLoader

    import transnext_mm  # noqa: F401  installs the safe loader for mmengine's CheckpointLoader
    checkpoint = CheckpointLoader.load_checkpoint(src, map_location='cpu')
    if not isinstance(checkpoint, dict):
        raise TypeError(f'{src}: a checkpoint must be a dict, got {type(checkpoint).__name__}')
    return checkpoint


def model_state_dict(checkpoint: dict) -> 'OrderedDict[str, torch.Tensor]':
    """The model's tensors of a checkpoint (under 'state_dict', 'model' or 'model_ema', or the
    checkpoint itself), without ``module.`` prefixes.

    Raises:
        ValueError: if an entry is not a tensor.
    """
    state_dict = unwrap_checkpoint(checkpoint)
    for key, value in state_dict.items():
        if not isinstance(value, torch.Tensor):
            raise ValueError(f'not a state dict: {key!r} holds a {type(value).__name__}')
    return state_dict


def convert_state_dict(state_dict: Dict[str, torch.Tensor],
                       model: str = 'detector') -> Tuple['OrderedDict[str, torch.Tensor]', dict]:
    """Verify the backbone of a model state dict and drop what this code base derives.

    Args:
        state_dict (dict): The model's tensors (see :func:`model_state_dict`).
        model (str): What it should be, for the messages. Defaults to 'detector'.

    Returns:
        tuple: The converted state dict and a summary: ``arch`` (the TransNeXt arch name),
        ``backbone_tensors`` and ``dropped`` (the keys removed).

    Raises:
        ValueError: if there is no ``backbone.`` part, or it is not a complete TransNeXt of a
            known arch.
    """
    from transnext_mm.models import TransNeXt

    if not any(k.startswith(BACKBONE_PREFIX) for k in state_dict):
        raise ValueError(f"not a {model} checkpoint: no '{BACKBONE_PREFIX}*' keys (its first "
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
    summary = dict(
        arch=name,
        backbone_tensors=len(weights),
        dropped=[BACKBONE_PREFIX + k for k in classifier + derived])
    return converted, summary


def build_model(config: str, cfg_options: Optional[dict] = None):
    """Build the model of a config, randomly initialised (no pretrained weights are loaded).

    Args:
        config (str): The config file; its ``default_scope`` picks the toolbox's registry.
        cfg_options (dict, optional): Overrides for the config. Defaults to None.

    Returns:
        tuple: ``(model, cfg)``.
    """
    from mmengine.config import Config
    from mmengine.registry import MODELS, init_default_scope

    import transnext_mm  # noqa: F401  registers TransNeXt

    cfg = Config.fromfile(config)
    if cfg_options:
        cfg.merge_from_dict(cfg_options)
    init_default_scope(cfg.get('default_scope', 'mmengine'))
    cfg.model.pop('pretrained', None)
    if cfg.model.get('backbone') is not None:
        cfg.model.backbone.init_cfg = None
    return MODELS.build(cfg.model), cfg


def check_against_model(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module,
                        config: str) -> None:
    """Require ``state_dict`` to fit ``model`` (built from ``config``) exactly, then load it.

    The TransNeXt arch is compared first, for a message that names both archs; then keys and
    shapes.

    Raises:
        ValueError: if the config's backbone is not TransNeXt, is of another arch, or the keys
            or shapes differ (listing the missing, unexpected and wrongly shaped tensors).
    """
    from transnext_mm.models import TransNeXt

    backbone = getattr(model, 'backbone', None)
    if not isinstance(backbone, TransNeXt):
        raise ValueError(f'{config}: the model\'s backbone is {type(backbone).__name__}, not '
                         'TransNeXt')
    check_arch(
        unwrap_state_dict(state_dict),
        backbone.arch,
        TransNeXt.arch_settings,
        target="the config's backbone")
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    wrong = [
        f'{k}: {tuple(state_dict[k].shape)} vs {tuple(own[k].shape)}' for k in own
        if k in state_dict and state_dict[k].shape != own[k].shape
    ]
    problems = [
        f'{len(keys)} {title}: {describe_keys(keys)}'
        for title, keys in (('missing keys', missing), ('unexpected keys', unexpected),
                            ('keys of the wrong shape', wrong)) if keys
    ]
    if problems:
        shapes = ' (shapes: checkpoint vs model)' if wrong else ''
        raise ValueError(f'the converted checkpoint does not fit the model of {config} (the '
                         'config of another model, or another number of classes?): ' +
                         '; '.join(problems) + shapes)
    model.load_state_dict(state_dict, strict=True)


def dataset_meta_of(checkpoint: dict, cfg=None) -> dict:
    """``dataset_meta`` for the converted checkpoint.

    From the source's ``meta['dataset_meta']``, else its ``meta['CLASSES']`` (and
    ``meta['PALETTE']``) as the older toolboxes saved them, else the classes (and palette) of the
    config's test dataset, else empty.
    """
    meta = checkpoint.get('meta') or {}
    if isinstance(meta.get('dataset_meta'), dict):
        return dict(meta['dataset_meta'])
    if meta.get('CLASSES') is not None:
        out = dict(classes=tuple(meta['CLASSES']))
        if meta.get('PALETTE') is not None:
            out['palette'] = [list(map(int, color)) for color in meta['PALETTE']]
        return out
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') if cfg is not None else None
    if not dataset:
        return {}
    metainfo = dict(dataset.get('metainfo') or {})
    if 'classes' not in metainfo:
        from mmengine.registry import DATASETS
        with DATASETS.switch_scope_and_registry(cfg.get('default_scope')) as registry:
            dataset_cls = registry.get(dataset.type)
        metainfo = dict(getattr(dataset_cls, 'METAINFO', {}), **metainfo)
    return {k: metainfo[k] for k in ('classes', 'palette') if k in metainfo}


def convert_meta(checkpoint: dict, task: ConversionTask, source: str, src: str, cfg=None) -> dict:
    """The converted checkpoint's ``meta``: ``dataset_meta`` (see :func:`dataset_meta_of`),
    where it came from (``converted_from``, ``source_format``, the source's toolbox version,
    epoch and iteration) and when it was converted."""
    source_meta = checkpoint.get('meta') or {}
    meta = dict(converted_from=osp.basename(src), source_format=source, time=time.asctime())
    dataset_meta = dataset_meta_of(checkpoint, cfg)
    if dataset_meta:
        meta['dataset_meta'] = dataset_meta
    for key in (f'{task.toolbox}_version', 'epoch', 'iter'):
        if key in source_meta:
            meta[f'source_{key}'] = source_meta[key]
    return meta


def save_checkpoint(state_dict: Dict[str, torch.Tensor], meta: dict, dst: str) -> None:
    """Write ``{'meta': meta, 'state_dict': state_dict}`` to ``dst`` (folders created)."""
    os.makedirs(osp.dirname(osp.abspath(dst)), exist_ok=True)
    torch.save(dict(meta=meta, state_dict=state_dict), dst)


def convert_checkpoint(task: ConversionTask,
                       src: str,
                       dst: str,
                       config: Optional[str] = None,
                       source: str = 'auto',
                       cfg_options: Optional[dict] = None) -> dict:
    """Convert ``src`` into ``dst``: load, convert the keys, check, save.

    Args:
        task (ConversionTask): The converter's task.
        src (str): Released checkpoint (path or URL).
        dst (str): Output file.
        config (str, optional): Config the result must fit exactly. Defaults to None (only the
            backbone is checked).
        source (str): 'auto' or one of ``task.sources``: the toolbox version that saved
            ``src``. Defaults to 'auto'.
        cfg_options (dict, optional): Overrides for the config. Defaults to None.

    Returns:
        dict: ``source``, ``arch``, ``tensors``, ``backbone_tensors``, ``dropped``, ``classes``
        (the number of class names) and ``checked_with`` (the config or None).
    """
    if source not in task.source_choices:
        raise ValueError(f'source must be one of {task.source_choices}, got {source!r}')
    if task.config_required and config is None:
        raise ValueError(f'a config is required to convert a {task.model} checkpoint')
    checkpoint = load_checkpoint(src)
    if source == 'auto':
        source = task.detect_source(checkpoint)
    state_dict, summary = convert_state_dict(model_state_dict(checkpoint), task.model)
    cfg = None
    if config is not None:
        model, cfg = build_model(config, cfg_options)
        check_against_model(state_dict, model, config)
    meta = convert_meta(checkpoint, task, source, src, cfg)
    save_checkpoint(state_dict, meta, dst)
    summary.update(
        source=source,
        tensors=len(state_dict),
        classes=len(meta.get('dataset_meta', {}).get('classes', ())),
        checked_with=config)
    return summary


def format_summary(src: str, dst: str, summary: dict) -> str:
    """What a converter prints about a conversion (see :func:`convert_checkpoint`)."""
    lines = [
        f'converted {src} ({summary["source"]}) -> {dst}: TransNeXt-{summary["arch"]}, '
        f'{summary["tensors"]} tensors ({summary["backbone_tensors"]} in the backbone), '
        f'{summary["classes"]} class names'
    ]
    dropped = summary['dropped']
    if dropped:
        lines.append(f'dropped {len(dropped)} backbone keys this code base derives or does not '
                     f'use: {describe_keys(dropped, limit=8)}')
    if summary['checked_with']:
        lines.append(f'checked: matches the model of {summary["checked_with"]} exactly (no '
                     'missing or unexpected keys, same shapes)')
    return '\n'.join(lines)


def main(task: ConversionTask, argv: Optional[List[str]] = None) -> None:
    """The command line of a converter script: parse, convert, print the summary.

    Raises:
        SystemExit: with the message, when the checkpoint cannot be converted.
    """
    args = parse_args(task, argv)
    try:
        summary = convert_checkpoint(task, args.src, args.dst, args.config, args.source,
                                     args.cfg_options)
    except (ValueError, TypeError, FileNotFoundError, pickle.UnpicklingError) as e:
        raise SystemExit(f'error: {e}')
    print(format_summary(args.src, args.dst, summary))
