# Copyright (c) transnext-mm contributors. All rights reserved.
"""Reading released TransNeXt checkpoints: unwrapping, prefix stripping and arch detection."""
import re
from collections import OrderedDict
from typing import Dict, List, Optional

import torch

# Buffers some TransNeXt code bases save that this implementation derives on the fly.
DERIVED_BUFFER_PATTERN = re.compile(
    r'(^|\.)(relative_pos_index\d*|relative_coords_table\d*|seq_length_scale|'
    r'local_len|pool_len|padding_mask)$')
CLASSIFIER_PREFIXES = ('head.', 'fc.')
# The arch settings that decide the parameter names and shapes (see :func:`infer_arch`).
ARCH_KEYS = ('embed_dims', 'num_heads', 'depths')
_BACKBONE_MARKER = 'patch_embed1.proj.weight'

# The entries of a checkpoint dict that hold its weights, in the order they are looked for.
CHECKPOINT_WRAPPERS = ('state_dict', 'model', 'model_ema')


def find_wrapper(checkpoint: dict) -> Optional[str]:
    """The first of :data:`CHECKPOINT_WRAPPERS` under which ``checkpoint`` holds a dict, or
    None when it is a plain state dict."""
    for wrapper in CHECKPOINT_WRAPPERS:
        if isinstance(checkpoint.get(wrapper), dict):
            return wrapper
    return None


def unwrap_checkpoint(checkpoint) -> 'OrderedDict[str, torch.Tensor]':
    """Return the state dict of a checkpoint: the dict under the first of
    :data:`CHECKPOINT_WRAPPERS` that holds one, or the checkpoint itself; ``'module.'`` (DDP)
    prefixes removed. The other entries (optimizer, epoch, ...) are dropped.

    Raises:
        TypeError: if ``checkpoint`` is not a dict.
    """
    if not isinstance(checkpoint, dict):
        raise TypeError(f'a TransNeXt checkpoint must be a dict, got {type(checkpoint).__name__}')
    wrapper = find_wrapper(checkpoint)
    state_dict = checkpoint[wrapper] if wrapper else checkpoint
    return OrderedDict(
        (k[len('module.'):] if k.startswith('module.') else k, v) for k, v in state_dict.items())


def unwrap_state_dict(checkpoint) -> Dict[str, torch.Tensor]:
    """Return the backbone state dict of a checkpoint in any common wrapping.

    Accepts a plain state dict or one under ``'model'``, ``'state_dict'`` or ``'model_ema'``, with
    or without ``'module.'`` (DDP) and ``'backbone.'`` (mmdet/mmseg/mmpretrain) prefixes. Keys of
    other parts of a detector or segmenter (necks, heads) are dropped when a ``'backbone.'``
    prefix is present.

    Raises:
        TypeError: if ``checkpoint`` is not a mapping of tensors.
        ValueError: if it does not hold a TransNeXt backbone.
    """
    state_dict = unwrap_checkpoint(checkpoint)
    if any(k.startswith('backbone.') for k in state_dict):
        state_dict = OrderedDict(
            (k[len('backbone.'):], v) for k, v in state_dict.items() if k.startswith('backbone.'))
    if _BACKBONE_MARKER not in state_dict:
        keys = list(state_dict)[:5]
        raise ValueError(f'not a TransNeXt checkpoint: no {_BACKBONE_MARKER!r} after unwrapping '
                         f"('model'/'state_dict', 'module.'/'backbone.' prefixes); "
                         f'its first keys are {keys}')
    return state_dict


def infer_arch(state_dict: Dict[str, torch.Tensor]) -> dict:
    """Read embed_dims, num_heads and depths off a TransNeXt state dict."""
    embed_dims, depths, num_heads = [], [], []
    for stage in range(1, 5):
        weight = state_dict.get(f'patch_embed{stage}.proj.weight')
        if weight is None:
            raise ValueError(f'not a TransNeXt checkpoint: missing patch_embed{stage}.proj.weight')
        embed_dims.append(int(weight.shape[0]))
        blocks = {
            int(m.group(1))
            for k in state_dict
            for m in [re.match(rf'block{stage}\.(\d+)\.', k)] if m
        }
        depths.append(max(blocks) + 1 if blocks else 0)
        temperature = state_dict.get(f'block{stage}.0.attn.temperature')
        num_heads.append(int(temperature.shape[0]) if temperature is not None else 0)
    return dict(embed_dims=embed_dims, num_heads=num_heads, depths=depths)


def split_backbone_keys(state_dict: Dict[str, torch.Tensor]):
    """Split a backbone state dict into (weights, classifier keys, derived buffer keys)."""
    weights, classifier, derived = OrderedDict(), [], []
    for k, v in state_dict.items():
        if k.startswith(CLASSIFIER_PREFIXES):
            classifier.append(k)
        elif DERIVED_BUFFER_PATTERN.search(k):
            derived.append(k)
        else:
            weights[k] = v
    return weights, classifier, derived


def keep_backbone_weights(state_dict: Dict[str, torch.Tensor],
                          weights: Dict[str, torch.Tensor],
                          prefix: str = 'backbone.') -> 'OrderedDict[str, torch.Tensor]':
    """``state_dict`` without the ``prefix`` keys that are not backbone ``weights`` (the
    classifier and derived buffers that :func:`split_backbone_keys` set apart); other keys are
    kept as they are."""
    return OrderedDict((k, v) for k, v in state_dict.items()
                       if not k.startswith(prefix) or k[len(prefix):] in weights)


def describe_keys(keys: List[str], limit: int = 10) -> str:
    shown = ', '.join(keys[:limit])
    return shown + (f', ... ({len(keys) - limit} more)' if len(keys) > limit else '')


def arch_name(arch: dict, settings: Dict[str, dict]) -> Optional[str]:
    for name, setting in settings.items():
        if all(list(setting[k]) == list(arch[k]) for k in ARCH_KEYS):
            return name
    return None


def check_arch(state_dict: Dict[str, torch.Tensor],
               arch: dict,
               arch_settings: Dict[str, dict],
               source: str = 'the checkpoint',
               target: str = 'the model') -> None:
    """Check that a TransNeXt backbone state dict is of the requested arch.

    Args:
        state_dict (dict): A TransNeXt backbone state dict, unwrapped and without prefixes (see
            :func:`unwrap_state_dict`).
        arch (dict): The requested arch; its ``embed_dims``, ``num_heads`` and ``depths`` are
            compared, other keys are ignored.
        arch_settings (dict): The named archs (``TransNeXt.arch_settings``), used to name both
            archs in the error.
        source (str): The checkpoint, as the error names it. Defaults to 'the checkpoint'.
        target (str): What the checkpoint is loaded into, as the error names it. Defaults to
            'the model'.

    Raises:
        ValueError: if the state dict's arch is not ``arch``, naming the checkpoint, the detected
            arch and the requested one.
    """
    found = infer_arch(state_dict)
    wanted = {k: [int(v) for v in arch[k]] for k in ARCH_KEYS}
    if found == wanted:
        return
    found_name = arch_name(found, arch_settings) or 'custom'
    wanted_name = arch_name(wanted, arch_settings) or 'custom'
    if found_name == 'custom':
        fix = 'the arch of the checkpoint'
    else:
        fix = f"arch='{found_name}' (a TransNeXt-{found_name} config)"
    raise ValueError(f'{source} holds TransNeXt-{found_name} {found}, but {target} is '
                     f'TransNeXt-{wanted_name} {wanted}: use {fix}, or load a '
                     f'TransNeXt-{wanted_name} checkpoint')
