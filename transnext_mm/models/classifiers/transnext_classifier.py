# Copyright (c) transnext-mm contributors. All rights reserved.
"""An mmpretrain ``ImageClassifier`` that loads released TransNeXt ImageNet checkpoints as is."""
from collections import OrderedDict
from typing import Dict, Tuple

import torch
from mmengine.logging import MMLogger
from mmpretrain.models.classifiers import ImageClassifier
from mmpretrain.registry import MODELS

from transnext_mm.models.backbones import TransNeXt
from transnext_mm.utils.checkpoint import (check_arch, describe_keys, find_wrapper,
                                           split_backbone_keys, unwrap_checkpoint)

# A released checkpoint is a plain state dict of the original model: backbone keys without a
# prefix (this one is always present) and the classifier Linear as ``head.weight/bias``.
RELEASED_MARKER = 'patch_embed1.proj.weight'


def convert_released_classifier(state_dict: Dict[str, torch.Tensor]) -> Tuple['OrderedDict', list]:
    """Map a released TransNeXt classifier state dict to mmpretrain's ImageClassifier layout.

    ``<key>`` becomes ``backbone.<key>`` and ``head.weight/bias`` becomes ``head.fc.weight/bias``
    (the ``fc`` of :class:`mmpretrain.models.LinearClsHead`); buffers that this implementation
    derives on the fly (relative position indices, coordinate tables, ...) are dropped.

    Returns:
        tuple: The converted state dict and the list of dropped keys.
    """
    weights, classifier, derived = split_backbone_keys(state_dict)
    converted = OrderedDict(('backbone.' + k, v) for k, v in weights.items())
    for key in classifier:  # 'head.weight' -> 'head.fc.weight'
        converted['head.fc.' + key.split('.', 1)[1]] = state_dict[key]
    return converted, derived


@MODELS.register_module()
class TransNeXtClassifier(ImageClassifier):
    """:class:`mmpretrain.models.ImageClassifier` that also loads released TransNeXt checkpoints.

    Behaves exactly like ``ImageClassifier`` (backbone -> neck -> head); the only addition is a
    ``load_state_dict`` pre-hook: when the loaded state dict is in the released layout (a plain
    state dict with ``patch_embed1.proj.weight`` at the top level), it is converted on the fly
    with :func:`convert_released_classifier`. So ``runner.load_checkpoint`` (``tools/test.py
    CONFIG RELEASED.pth``, ``load_from``), :func:`mmpretrain.apis.init_model` and
    ``model.load_state_dict`` read released and mmpretrain checkpoints alike, plain or wrapped as
    the backbone's ``init_cfg`` reads them (under ``'model'``, ``'model_ema'`` or
    ``'state_dict'``, with or without ``'module.'`` prefixes); a checkpoint of another TransNeXt
    arch is refused with a clear error instead of mmengine's warning.

    Args:
        backbone (dict): A ``TransNeXt`` backbone config.
        **kwargs: The other arguments of ``ImageClassifier`` (``neck``, ``head``,
            ``train_cfg``, ``data_preprocessor``, ``init_cfg``, ...).
    """

    def __init__(self, backbone: dict, **kwargs):
        super().__init__(backbone=backbone, **kwargs)
        if not isinstance(self.backbone, TransNeXt):
            raise TypeError(f'TransNeXtClassifier needs a TransNeXt backbone, got '
                            f'{type(self.backbone).__name__}; use ImageClassifier otherwise')
        self.register_load_state_dict_pre_hook(TransNeXtClassifier._convert_released_layout)

    def _convert_released_layout(self, state_dict: dict, prefix: str, *args) -> None:
        # Both torch's and mmengine's loaders hand every child the keys of this (mutable)
        # dict after this hook ran, so renaming in place is enough.
        logger = MMLogger.get_current_instance()
        local = [k for k in state_dict if k.startswith(prefix)]
        wrapper = find_wrapper({k[len(prefix):]: state_dict[k] for k in local})
        if wrapper or any(k.startswith(prefix + 'module.') for k in local):
            # The wrappings the backbone's init_cfg reads too: weights under 'model',
            # 'model_ema' or 'state_dict' (mmengine's loader only unwraps a top-level
            # 'state_dict'), DDP 'module.' prefixes; other entries (optimizer, epoch, ...) go.
            checkpoint = OrderedDict((k[len(prefix):], state_dict.pop(k)) for k in local)
            state_dict.update((prefix + k, v) for k, v in unwrap_checkpoint(checkpoint).items())
            if wrapper:
                others = [k for k in checkpoint if k != wrapper]
                logger.info(f'TransNeXtClassifier: loading the weights under {wrapper!r}' +
                            (f'; ignored {describe_keys(others)}' if others else ''))
        if prefix + RELEASED_MARKER not in state_dict:
            return  # mmpretrain layout (backbone.*, head.fc.*): nothing to convert
        released = OrderedDict(
            (k[len(prefix):], state_dict.pop(k)) for k in list(state_dict) if k.startswith(prefix))
        check_arch(released, self.backbone.arch, TransNeXt.arch_settings)
        converted, dropped = convert_released_classifier(released)
        if not hasattr(self.head, 'fc'):  # e.g. a head without a single Linear: keep names
            converted = OrderedDict(
                (k.replace('head.fc.', 'head.', 1), v) for k, v in converted.items())
        state_dict.update((prefix + k, v) for k, v in converted.items())
        logger.info(f'TransNeXtClassifier: converted a released TransNeXt checkpoint on load '
                    f'({len(converted)} tensors to backbone.*/head.fc.*' +
                    (f'; ignored derived buffers {describe_keys(dropped)}' if dropped else '') +
                    ')')
