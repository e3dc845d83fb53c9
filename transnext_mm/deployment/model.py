# Copyright (c) transnext-mm contributors. All rights reserved.
"""The networks that are exported: a toolbox model behind one tensor-in, tensors-out module.

Every exported graph takes the normalised image batch ``(B, 3, H, W)`` (float32, after the data
preprocessor's mean/std and channel order) and returns:

* ``backbone``: the TransNeXt feature maps of ``out_indices`` (any config);
* ``classification``: the logits ``(B, num_classes)``, what ``model(x, mode='tensor')`` returns;
* ``segmentation``: the per-pixel class logits resized to ``(H, W)``, what mmseg's ``predict``
  computes before it crops padding and takes the argmax (``encode_decode``);
* ``detection``: ``boxes (B, K, 4)`` in input pixels (x1, y1, x2, y2), ``scores (B, K)`` and
  ``labels (B, K)`` after post-processing: DINO through mmdet's own ``predict`` (top-K, no NMS);
  Mask R-CNN through :mod:`.two_stage` (fixed-size, with NMS and RoIAlign as ONNX ops), plus
  ``masks (B, K, M, M)``, the mask head's probabilities, pasted outside the graph.

The attention runs on its PyTorch path (``attn_impl='torch'``), so no compiled op is in a graph.
"""
import copy
import logging
import os.path as osp
from typing import List, Optional, Tuple

import torch
import torch.nn as nn
from mmengine.config import Config

TASKS = ('backbone', 'classification', 'segmentation', 'detection')
SCOPE_TASKS = {'mmpretrain': 'classification', 'mmseg': 'segmentation', 'mmdet': 'detection'}
# Detectors whose end-to-end graph (post-processing included) exports: DINO through mmdet's
# predict, two-stage detectors with a StandardRoIHead through two_stage.TwoStageDetectorNet.
EXPORTABLE_DETECTORS = ('DINO', 'MaskRCNN', 'FasterRCNN')


class DeployError(Exception):
    """A bad config, checkpoint, shape or option for the exporter; the message says which."""


def load_config(config: str) -> Config:
    """Read ``config`` and check that it belongs to a toolbox the exporter supports."""
    if not osp.isfile(config):
        raise DeployError(f'config: {config} is not a file')
    try:
        cfg = Config.fromfile(config)
    except Exception as e:
        raise DeployError(f'config: {config} cannot be read ({type(e).__name__}: {e})') from e
    scope = cfg.get('default_scope')
    if scope not in SCOPE_TASKS:
        raise DeployError(f'config: {config} has default_scope {scope!r}; the exporter supports '
                          f'{sorted(SCOPE_TASKS)}')
    if cfg.model.get('backbone', {}).get('type') != 'TransNeXt':
        raise DeployError(f'config: {config} has no TransNeXt backbone (model.backbone.type = '
                          f'{cfg.model.get("backbone", {}).get("type")!r})')
    return cfg


def task_of(cfg: Config, config: str, backbone_only: bool = False) -> str:
    """The exported task: the toolbox's, or 'backbone'; unsupported detectors are refused."""
    if backbone_only:
        return 'backbone'
    task = SCOPE_TASKS[cfg.default_scope]
    if task == 'detection' and cfg.model.type not in EXPORTABLE_DETECTORS:
        raise DeployError(
            f'config: {config} is a {cfg.model.type}; end-to-end detection export supports '
            f'{list(EXPORTABLE_DETECTORS)}; --backbone-only exports its backbone')
    return task


def build_model(cfg: Config,
                config: str,
                checkpoint: Optional[str] = None,
                attn_impl: str = 'torch') -> nn.Module:
    """Build the toolbox model of ``cfg`` in eval mode with the PyTorch attention path.

    Args:
        cfg (Config): From :func:`load_config`.
        config (str): Its path (for messages).
        checkpoint (str, optional): A checkpoint of the whole model (loaded strictly, with the
            project's safe loader). Defaults to None: random weights, initialised by the
            model's own ``init_weights`` as a training run would start.
        attn_impl (str): The backbone's ``attn_impl``; export needs 'torch' (benchmarks compare
            others). Defaults to 'torch'.

    Returns:
        nn.Module: The model, with ``dataset_meta`` from the checkpoint or the config's dataset.
    """
    import importlib

    from mmengine.logging import MMLogger
    from mmengine.model import revert_sync_batchnorm
    from mmengine.registry import init_default_scope
    from mmengine.runner import load_checkpoint

    import transnext_mm  # noqa: F401  (registers TransNeXt and the safe checkpoint loader)

    cfg = copy.deepcopy(cfg)
    scope = cfg.default_scope
    cfg.model.backbone.attn_impl = attn_impl  # 'torch': no compiled op in the graph
    cfg.model.backbone.init_cfg = None  # weights come from `checkpoint` (or are random)
    cfg.model.pop('pretrained', None)
    init_default_scope(scope)
    registry = importlib.import_module(f'{scope}.registry').MODELS
    model = revert_sync_batchnorm(registry.build(cfg.model))
    model.cfg = cfg
    meta = {}
    if checkpoint is None:
        # Some toolbox parameters are allocated uninitialised and only filled by init_weights
        # (mmdet's DINO `level_embed` is torch.Tensor(...)): without it a random model reads
        # whatever memory held, sometimes NaN. Its per-parameter report is not for the console.
        logger = MMLogger.get_current_instance()
        level = logger.level
        logger.setLevel(logging.WARNING)
        try:
            model.init_weights()
        finally:
            logger.setLevel(level)
    else:
        if not osp.isfile(checkpoint):
            raise DeployError(f'checkpoint: {checkpoint} is not a file')
        try:
            ckpt = load_checkpoint(
                model, checkpoint, map_location='cpu', strict=True, logger='silent')
        except Exception as e:
            raise DeployError(f'checkpoint: {checkpoint} cannot be loaded into {config} '
                              f'({type(e).__name__}: {str(e)[:500]})') from e
        meta = dict(ckpt.get('meta', {}).get('dataset_meta') or {})
    if not meta.get('classes'):
        meta = _config_dataset_meta(cfg)
    model.dataset_meta = meta
    return model.eval()


def _config_dataset_meta(cfg: Config) -> dict:
    """Classes (and palette) of the config's test dataset, as the toolboxes' demos use."""
    import importlib
    registry = importlib.import_module(f'{cfg.default_scope}.registry').DATASETS
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    metainfo = dict(dataset.get('metainfo') or {})
    if not metainfo.get('classes') and dataset.get('type'):
        try:
            metainfo = dict(getattr(registry.get(dataset.type), 'METAINFO', {}))
        except Exception:
            metainfo = {}
    return {k: list(v) for k, v in metainfo.items() if k in ('classes', 'palette')}


def preprocess_meta(cfg: Config) -> dict:
    """Mean, std and channel order of the model's data preprocessor (applied before the graph)."""
    # mmpretrain configs keep it at the top level (the runner moves it into the model).
    pre = cfg.model.get('data_preprocessor') or cfg.get('data_preprocessor') or {}
    return dict(
        mean=[float(v) for v in pre.get('mean', [0., 0., 0.])],
        std=[float(v) for v in pre.get('std', [1., 1., 1.])],
        bgr_to_rgb=bool(pre.get('bgr_to_rgb', pre.get('to_rgb', False))))


def image_metas(x: torch.Tensor) -> List[dict]:
    """Per-image meta information of a batch ``x`` (B, 3, H, W) of unpadded, unscaled images, as
    the toolboxes' predict methods read it."""
    height, width = x.shape[2:]
    meta = dict(
        img_shape=(height, width),
        pad_shape=(height, width),
        batch_input_shape=(height, width),
        ori_shape=(height, width),
        scale_factor=(1., 1.))
    return [dict(meta) for _ in range(x.shape[0])]


class BackboneNet(nn.Module):
    """The TransNeXt feature maps."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.backbone = model.backbone if hasattr(model, 'backbone') else model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, ...]:
        return tuple(self.backbone(x))


class ClassifierNet(nn.Module):
    """The classification logits, ``model(x, mode='tensor')``."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x, mode='tensor')


class SegmentorNet(nn.Module):
    """Per-pixel class logits at the input size (mmseg's ``encode_decode``)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model.encode_decode(x, image_metas(x))


class DetectorNet(nn.Module):
    """Boxes, scores and labels after mmdet's post-processing (``predict``, no rescale)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from mmdet.structures import DetDataSample
        samples = [DetDataSample(metainfo=meta) for meta in image_metas(x)]
        results = self.model.predict(x, samples, rescale=False)
        instances = [r.pred_instances for r in results]
        return (torch.stack([i.bboxes
                             for i in instances]), torch.stack([i.scores for i in instances]),
                torch.stack([i.labels for i in instances]))


def detector_net(model: nn.Module) -> nn.Module:
    """The exported network of a detector: two-stage ones through :mod:`.two_stage`."""
    from mmdet.models.detectors import TwoStageDetector
    if isinstance(model, TwoStageDetector):
        from .two_stage import TwoStageDetectorNet
        return TwoStageDetectorNet(model)
    return DetectorNet(model)


NETS = dict(
    backbone=BackboneNet,
    classification=ClassifierNet,
    segmentation=SegmentorNet,
    detection=detector_net)
OUTPUT_NAMES = dict(
    classification=['logits'],
    segmentation=['seg_logits'],
    detection=['boxes', 'scores', 'labels', 'masks'])


def output_names(task: str, num_outputs: int) -> List[str]:
    """Names of the graph outputs of ``task``."""
    if task == 'backbone':
        return [f'feat{i}' for i in range(num_outputs)]
    return OUTPUT_NAMES[task][:num_outputs]
