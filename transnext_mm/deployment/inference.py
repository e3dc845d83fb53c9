# Copyright (c) transnext-mm contributors. All rights reserved.
"""Inference of one image with an exported ``.onnx`` file (ONNX Runtime): what the demos run.

The image is resized to the export size (``--dynamic`` files take it at its own size), normalised
as the model's data preprocessor does, and the outputs are turned into the toolboxes' data
samples (``SegDataSample`` / ``DetDataSample``) at the image's size, so the toolboxes'
visualizers draw them exactly as for a PyTorch model.
"""
from typing import Tuple

import numpy as np
import torch
import torch.nn.functional as F

from .model import DeployError
from .runtime import OrtModel


def preprocess(image_rgb: np.ndarray, meta: dict) -> Tuple[np.ndarray, Tuple[float, float]]:
    """The normalised (1, 3, H, W) input and the (x, y) scale from the image to it."""
    import cv2
    height, width = image_rgb.shape[:2]
    if meta['dynamic']:
        size = (height, width)
    else:
        size = tuple(meta['shape'])
    image = image_rgb if meta['bgr_to_rgb'] else image_rgb[..., ::-1]  # the model's order
    if size != (height, width):
        image = cv2.resize(
            np.ascontiguousarray(image), (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    x = (image.astype(np.float32) - np.float32(meta['mean'])) / np.float32(meta['std'])
    x = np.ascontiguousarray(x.transpose(2, 0, 1)[None])
    if meta['batch'] != 1:
        x = np.repeat(x, meta['batch'], axis=0)
    return x, (size[1] / width, size[0] / height)


def _check_task(model: OrtModel, task: str, path: str) -> None:
    if model.meta['task'] != task:
        raise DeployError(f'{path} is a {model.meta["task"]} model; this demo needs {task}')


def segment_onnx(image_rgb: np.ndarray, path: str):
    """Segment an RGB image with an exported segmentor; returns ``(dataset_meta,
    SegDataSample)`` with ``pred_sem_seg`` and ``seg_logits`` at the image's size."""
    from mmengine.structures import PixelData
    from mmseg.structures import SegDataSample

    model = OrtModel(path)
    _check_task(model, 'segmentation', path)
    x, _ = preprocess(image_rgb, model.meta)
    logits = torch.from_numpy(model(x)[0][:1])
    logits = F.interpolate(
        logits, size=image_rgb.shape[:2], mode='bilinear', align_corners=False)[0]
    result = SegDataSample()
    result.seg_logits = PixelData(data=logits)
    result.pred_sem_seg = PixelData(data=logits.argmax(0, keepdim=True))
    return _dataset_meta(model.meta), result


def detect_onnx(image_rgb: np.ndarray, path: str):
    """Detect objects in an RGB image with an exported detector; returns ``(dataset_meta,
    DetDataSample)`` with ``pred_instances`` in the image's pixels."""
    from mmdet.structures import DetDataSample
    from mmengine.structures import InstanceData

    model = OrtModel(path)
    _check_task(model, 'detection', path)
    x, (sx, sy) = preprocess(image_rgb, model.meta)
    outputs = [torch.from_numpy(o[0]) for o in model(x)]
    found = outputs[2] >= 0  # two-stage exports pad with label -1
    boxes, scores, labels = (o[found] for o in outputs[:3])
    boxes = boxes / boxes.new_tensor([sx, sy, sx, sy])
    height, width = image_rgb.shape[:2]
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, height)
    result = DetDataSample(metainfo=dict(img_shape=(height, width), ori_shape=(height, width)))
    instances = InstanceData(bboxes=boxes, scores=scores, labels=labels.long())
    if len(outputs) > 3:  # Mask R-CNN: the mask head's probabilities, pasted as mmdet does
        from .two_stage import paste_masks
        instances.masks = paste_masks(outputs[3][found], boxes, height, width,
                                      model.meta.get('mask_thr_binary', 0.5))
    result.pred_instances = instances
    return _dataset_meta(model.meta), result


def _dataset_meta(meta: dict) -> dict:
    out = {k: meta[k] for k in ('classes', 'palette') if meta.get(k)}
    if 'palette' in out:  # JSON gave lists; the visualizers take an (r, g, b) tuple per class
        out['palette'] = [tuple(color) for color in out['palette']]
    if not out.get('classes'):
        raise DeployError(f'the exported file has no class names ({meta.get("config")})')
    return out
