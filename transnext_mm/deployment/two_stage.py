# Copyright (c) transnext-mm contributors. All rights reserved.
"""A two-stage detector (Mask R-CNN) as one graph: mmdet's networks, fixed-size post-processing.

mmdet's ``predict`` of a two-stage detector branches on data (``if not valid_mask.all()``, ``if
rois.shape[0] == 0``, one chunk per detection when pasting masks on the CPU), so ``torch.export``
either stops or specialises the graph to the example's box counts. This module runs the same
networks (backbone, neck, RPN head, RoI extractors, box and mask heads, box coders, anchors: all
mmdet's modules and weights) and re-expresses the selection steps without data-dependent shapes:

* RPN: per level the ``nms_pre`` best anchors (``topk``), decode, boxes not wider and higher
  than ``min_bbox_size`` scored -1, NMS per level, then exactly ``max_per_img`` proposals, the
  missing ones padded as invalid;
* RoI features: every RoI pooled at every FPN level and the level that mmdet's
  ``map_roi_levels`` assigns kept (no ``nonzero``);
* R-CNN: softmax, per-class decode, scores of invalid proposals and those not above
  ``score_thr`` set to -1, the best ``PRE_NMS_TOP_K`` candidates, class-wise NMS, exactly
  ``max_per_img`` detections;
* masks: the mask head's ``(M, M)`` probabilities of each detection's class. Pasting them into
  the image (mmdet's ``_do_paste_mask`` and ``mask_thr_binary``) is post-processing outside the
  graph (:func:`paste_masks`).

NMS is ``torchvision.ops.nms`` (ONNX ``NonMaxSuppression``) and RoIAlign torchvision's
(ONNX ``RoiAlign``): no custom op is in the graph. Outputs per image, ``K = max_per_img``:
``boxes (B, K, 4)`` in input pixels, ``scores (B, K)``, ``labels (B, K)`` and, with a mask head,
``masks (B, K, M, M)``; rows past the image's detections have score 0 and label -1.
"""
from typing import List, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

# Candidates (proposal x class above score_thr) that enter the R-CNN NMS; mmdet keeps all of
# them. Reached only when more than this many pass the score threshold (then the lowest-scoring
# ones are dropped before NMS, as mmdeploy's ``pre_top_k`` does).
PRE_NMS_TOP_K = 5000
INVALID = -1.0


def _select_fixed(keep: Tensor, size: int, boxes: Tensor, scores: Tensor, *rest:
                  Tensor) -> Tuple[Tensor, ...]:
    """Rows ``keep`` (any length) of ``boxes``, ``scores`` (and ``rest``, labels), cut or padded
    to exactly ``size`` rows; padding rows are an empty box, score INVALID, label -1."""
    dummy = boxes.shape[0]  # index of the padding row appended below
    keep = torch.cat([keep, keep.new_full((size, ), dummy)])[:size]
    padded = [
        torch.cat([boxes, boxes.new_zeros(1, 4)]),
        torch.cat([scores, scores.new_full((1, ), INVALID)])
    ]
    padded += [torch.cat([t, t.new_full((1, ), -1)]) for t in rest]
    return tuple(t[keep] for t in padded)


def batched_nms(boxes: Tensor, scores: Tensor, groups: Tensor, iou_threshold: float) -> Tensor:
    """Indices kept by NMS within each group, by decreasing score (boxes of different groups
    are moved apart, as mmcv's ``batched_nms`` does)."""
    from torchvision.ops import nms
    offsets = groups.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def roi_features(extractor: nn.Module, feats: Tuple[Tensor], rois: Tensor) -> Tensor:
    """mmdet's ``SingleRoIExtractor`` without ``nonzero``: each RoI pooled at every level, the
    level of ``map_roi_levels`` kept."""
    feats = feats[:extractor.num_inputs]
    if len(feats) == 1:
        return extractor.roi_layers[0](feats[0], rois)
    levels = extractor.map_roi_levels(rois, len(feats))
    out = 0
    for i, layer in enumerate(extractor.roi_layers):
        out = out + torch.where((levels == i)[:, None, None, None], layer(feats[i], rois), 0.)
    return out


class TwoStageDetectorNet(nn.Module):
    """Boxes, scores, labels (and mask probabilities) of an mmdet two-stage detector with a
    ``StandardRoIHead``; see the module docstring.

    Args:
        model (nn.Module): The mmdet detector (eval). Its RoIAlign layers are switched to
            torchvision's, which exports as ONNX ``RoiAlign``.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        from mmcv.ops import RoIAlign
        self.model = model
        for module in model.modules():
            if isinstance(module, RoIAlign):
                module.use_torchvision = True

    def forward(self, x: Tensor) -> Tuple[Tensor, ...]:
        feats = self.model.extract_feat(x)
        cls_scores, bbox_preds = self.model.rpn_head(feats)
        img_shape = tuple(x.shape[2:])
        outputs = []
        for b in range(x.shape[0]):
            proposals, valid = self._proposals([c[b] for c in cls_scores],
                                               [p[b] for p in bbox_preds], img_shape)
            outputs.append(
                self._detections([f[b:b + 1] for f in feats], proposals, valid, img_shape))
        return tuple(torch.stack(out) for out in zip(*outputs))

    def _proposals(self, cls_scores: List[Tensor], bbox_preds: List[Tensor],
                   img_shape: Tuple[int, int]) -> Tuple[Tensor, Tensor]:
        head = self.model.rpn_head
        cfg = head.test_cfg
        priors = head.prior_generator.grid_priors([c.shape[-2:] for c in cls_scores],
                                                  dtype=cls_scores[0].dtype,
                                                  device=cls_scores[0].device)
        all_scores, all_deltas, all_priors, levels = [], [], [], []
        for level, (cls_score, bbox_pred, prior) in enumerate(zip(cls_scores, bbox_preds, priors)):
            cls_score = cls_score.permute(1, 2, 0).reshape(-1, head.cls_out_channels)
            scores = (cls_score.sigmoid()
                      if head.use_sigmoid_cls else cls_score.softmax(-1)[:, :-1]).reshape(-1)
            deltas = bbox_pred.permute(1, 2, 0).reshape(-1, head.bbox_coder.encode_size)
            nms_pre = cfg.get('nms_pre', -1)
            if 0 < nms_pre < scores.shape[0]:
                scores, index = scores.topk(nms_pre)
                deltas, prior = deltas[index], prior[index]
            all_scores.append(scores)
            all_deltas.append(deltas)
            all_priors.append(prior)
            levels.append(torch.full_like(scores, level, dtype=torch.long))
        scores = torch.cat(all_scores)
        boxes = head.bbox_coder.decode(
            torch.cat(all_priors), torch.cat(all_deltas), max_shape=img_shape)
        min_size = cfg.get('min_bbox_size', -1)
        if min_size >= 0:
            size_ok = ((boxes[:, 2] - boxes[:, 0] > min_size) &
                       (boxes[:, 3] - boxes[:, 1] > min_size))
            scores = torch.where(size_ok, scores, INVALID)
        keep = batched_nms(boxes, scores, torch.cat(levels), cfg.nms['iou_threshold'])
        boxes, scores = _select_fixed(keep, cfg.max_per_img, boxes, scores)
        return boxes, scores > INVALID

    def _detections(self, feats: Tuple[Tensor], proposals: Tensor, valid: Tensor,
                    img_shape: Tuple[int, int]) -> Tuple[Tensor, ...]:
        roi_head = self.model.roi_head
        cfg = roi_head.test_cfg
        bbox_head = roi_head.bbox_head
        rois = torch.cat([proposals.new_zeros(proposals.shape[0], 1), proposals], dim=1)
        bbox_feats = roi_features(roi_head.bbox_roi_extractor, feats, rois)
        if roi_head.with_shared_head:
            bbox_feats = roi_head.shared_head(bbox_feats)
        cls_score, bbox_pred = bbox_head(bbox_feats)
        scores = (
            bbox_head.loss_cls.get_activation(cls_score)
            if bbox_head.custom_cls_channels else F.softmax(cls_score, dim=-1))
        num_rois, num_classes = scores.shape[0], scores.shape[1] - 1
        reg_classes = 1 if bbox_head.reg_class_agnostic else num_classes
        boxes = bbox_head.bbox_coder.decode(
            rois[:, 1:].repeat_interleave(reg_classes, dim=0),
            bbox_pred.reshape(-1, bbox_head.bbox_coder.encode_size),
            max_shape=img_shape)
        boxes = boxes.reshape(num_rois, reg_classes, 4).expand(num_rois, num_classes, 4)
        scores = scores[:, :num_classes]
        scores = torch.where((scores > cfg.score_thr) & valid[:, None], scores, INVALID)
        labels = torch.arange(num_classes, device=scores.device).expand(num_rois, num_classes)
        boxes, scores, labels = boxes.reshape(-1, 4), scores.reshape(-1), labels.reshape(-1)
        if scores.shape[0] > PRE_NMS_TOP_K:
            scores, index = scores.topk(PRE_NMS_TOP_K)
            boxes, labels = boxes[index], labels[index]
        keep = batched_nms(boxes, scores, labels, cfg.nms['iou_threshold'])
        boxes, scores, labels = _select_fixed(keep, cfg.max_per_img, boxes, scores, labels)
        found = scores > INVALID
        boxes = torch.where(found[:, None], boxes, 0.)
        scores = torch.where(found, scores, 0.)
        labels = torch.where(found, labels, -1)
        if not roi_head.with_mask:
            return boxes, scores, labels
        mask_rois = torch.cat([boxes.new_zeros(boxes.shape[0], 1), boxes], dim=1)
        mask_feats = roi_features(roi_head.mask_roi_extractor, feats, mask_rois)
        if roi_head.with_shared_head:
            mask_feats = roi_head.shared_head(mask_feats)
        mask_preds = roi_head.mask_head(mask_feats).sigmoid()
        channel = 0 if roi_head.mask_head.class_agnostic else labels.clamp(min=0)
        masks = mask_preds[torch.arange(mask_preds.shape[0], device=boxes.device), channel]
        return boxes, scores, labels, torch.where(found[:, None, None], masks, 0.)


def paste_masks(masks: Tensor,
                boxes: Tensor,
                height: int,
                width: int,
                threshold: float = 0.5) -> Tensor:
    """Binary ``(N, height, width)`` masks from the graph's ``(N, M, M)`` probabilities and
    their boxes (in the same pixels), with mmdet's own ``_do_paste_mask``."""
    from mmdet.models.roi_heads.mask_heads.fcn_mask_head import _do_paste_mask
    if masks.shape[0] == 0:
        return masks.new_zeros((0, height, width), dtype=torch.bool)
    pasted, _ = _do_paste_mask(masks[:, None], boxes, height, width, skip_empty=False)
    return pasted >= threshold
