# Copyright (c) transnext-mm contributors. All rights reserved.
"""Run exported models (ONNX Runtime, ``torch.export`` programs) and compare them with PyTorch."""
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from .export import example_input, read_meta
from .model import DeployError

# Tolerances of --verify: fp32 relative errors and detection matching.
TOLERANCES = dict(
    rel_err=dict(backbone=1e-4, classification=1e-4, segmentation=1e-3),
    seg_argmax_agreement=0.999,
    det_box_iou=0.99,
    det_score_diff=1e-3,
    det_mask_diff=1e-3)


class OrtModel:
    """An exported ``.onnx`` file in an ONNX Runtime CPU session.

    Args:
        path (str): The file written by :func:`transnext_mm.deployment.export.export`.
        threads (int, optional): Intra-op threads. Defaults to None (ONNX Runtime's choice).
    """

    def __init__(self, path: str, threads: Optional[int] = None):
        import onnxruntime as ort
        self.meta = read_meta(path)
        options = ort.SessionOptions()
        options.log_severity_level = 3  # errors only (not the constant-folding notes)
        if threads:
            options.intra_op_num_threads = threads
        try:
            self.session = ort.InferenceSession(path, options, providers=['CPUExecutionProvider'])
        except Exception as e:
            raise DeployError(f'{path}: ONNX Runtime cannot load it ({type(e).__name__}: '
                              f'{str(e)[:300]})') from e
        self.input_name = self.session.get_inputs()[0].name

    def __call__(self, x) -> List[np.ndarray]:
        x = x.numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
        batch = self.meta['batch']
        if x.ndim != 4 or x.shape[0] != batch or x.shape[1] != 3:
            raise DeployError(f'input must have shape ({batch}, 3, H, W), got {x.shape}')
        if not self.meta['dynamic'] and list(x.shape[2:]) != self.meta['shape']:
            raise DeployError(f'this file was exported at {self.meta["shape"]} without '
                              f'--dynamic; got input {list(x.shape[2:])}')
        return self.session.run(None, {self.input_name: x.astype(np.float32, copy=False)})


def as_numpy(outputs) -> List[np.ndarray]:
    outputs = outputs if isinstance(outputs, (tuple, list)) else (outputs, )
    return [
        o.detach().cpu().numpy() if isinstance(o, torch.Tensor) else np.asarray(o) for o in outputs
    ]


def rel_err(actual: np.ndarray, expected: np.ndarray) -> float:
    """max |actual - expected| / max |expected|."""
    scale = max(float(np.abs(expected).max()), 1e-12)
    return float(np.abs(actual.astype(np.float64) - expected).max()) / scale


def box_iou(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """IoU matrix of (N, 4) and (M, 4) x1y1x2y2 boxes."""
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.clip(rb - lt, 0, None).prod(-1)
    area_a = np.clip(a[:, 2:] - a[:, :2], 0, None).prod(-1)
    area_b = np.clip(b[:, 2:] - b[:, :2], 0, None).prod(-1)
    return inter / np.maximum(area_a[:, None] + area_b[None, :] - inter, 1e-12)


def compare(task: str, actual: Sequence[np.ndarray], expected: Sequence[np.ndarray]) -> Dict:
    """Error figures of exported outputs against PyTorch's, and whether they pass.

    Returns:
        dict: the figures and ``ok`` (all within :data:`TOLERANCES`).
    """
    if len(actual) != len(expected):
        return dict(ok=False, error=f'{len(actual)} outputs, PyTorch gave {len(expected)}')
    for i, (a, e) in enumerate(zip(actual, expected)):
        if a.shape != e.shape:
            return dict(ok=False, error=f'output shape {a.shape}, PyTorch {e.shape}')
        # NaN compares unequal to everything: say where it came from instead of a mismatch
        for name, out in (('PyTorch', e), ('exported', a)):
            if np.issubdtype(out.dtype, np.floating) and not np.isfinite(out).all():
                return dict(ok=False, error=f'{name} output {i} has NaN or Inf values')
    if task in ('backbone', 'classification'):
        err = max(rel_err(a, e) for a, e in zip(actual, expected))
        return dict(rel_err=err, ok=err <= TOLERANCES['rel_err'][task])
    if task == 'segmentation':
        err = rel_err(actual[0], expected[0])
        agree = float((actual[0].argmax(1) == expected[0].argmax(1)).mean())
        return dict(
            rel_err=err,
            argmax_agreement=agree,
            ok=err <= TOLERANCES['rel_err'][task] and agree >= TOLERANCES['seg_argmax_agreement'])
    return compare_detections(actual, expected)


def compare_detections(actual, expected) -> Dict:
    """Match every PyTorch detection to one of the same label with box IoU >= 0.99 and score
    within 1e-3 (and, with a fourth output, mask probabilities within 1e-3). Detections whose
    score ties with the last kept one (within 1e-3) may be swapped with unkept ones by top-K and
    are not required to match; rows of score 0 are padding."""
    boxes, scores, labels = actual[:3]
    ref_boxes, ref_scores, ref_labels = expected[:3]
    with_masks = len(expected) > 3
    matched = total = 0
    worst_iou, worst_score, worst_mask = 1.0, 0.0, 0.0
    for b in range(ref_boxes.shape[0]):
        iou = box_iou(ref_boxes[b], boxes[b])
        floor = ref_scores[b].min() + TOLERANCES['det_score_diff'] if ref_scores[b].size else 0
        for i in range(ref_boxes.shape[1]):
            if ref_scores[b, i] <= floor:
                continue
            total += 1
            same = (labels[b] == ref_labels[b, i]) & (
                np.abs(scores[b] - ref_scores[b, i]) <= TOLERANCES['det_score_diff'])
            best = float(iou[i][same].max()) if same.any() else 0.0
            worst_iou = min(worst_iou, best)
            ok = best >= TOLERANCES['det_box_iou']
            if same.any():
                worst_score = max(worst_score,
                                  float(np.abs(scores[b][same] - ref_scores[b, i]).min()))
            if same.any() and with_masks:
                j = np.flatnonzero(same)[iou[i][same].argmax()]
                diff = float(np.abs(actual[3][b, j] - expected[3][b, i]).max())
                worst_mask = max(worst_mask, diff)
                ok &= diff <= TOLERANCES['det_mask_diff']
            matched += ok
    report = dict(matched=f'{matched}/{total}', min_iou=worst_iou, max_score_diff=worst_score)
    if with_masks:
        report['max_mask_diff'] = worst_mask
    return dict(report, ok=total > 0 and matched == total)


def format_report(report: Dict) -> str:
    parts = []
    for key, value in report.items():
        if key == 'ok':
            continue
        parts.append(f'{key}={value:.3g}' if isinstance(value, float) else f'{key}={value}')
    return ', '.join(parts) + (' -> OK' if report['ok'] else ' -> FAILED')


def verify(net, meta: dict, path: str, shapes=None, threads=None) -> list:
    """Run the exported ``path`` and ``net`` (PyTorch) on the same random input at the export
    shape and at each of ``shapes``; returns ``[(shape, report)]`` (see :func:`compare`)."""
    runner = _runner(path, threads)
    results = []
    for i, shape in enumerate([meta['shape']] + [list(s) for s in shapes or []]):
        x = example_input(meta, shape, seed=i)
        with torch.no_grad():
            expected = as_numpy(net(x))
            actual = as_numpy(runner(x))
        results.append((shape, compare(meta['task'], actual, expected)))
    return results


def _runner(path: str, threads=None):
    if path.endswith('.onnx'):
        return OrtModel(path, threads)
    module = torch.export.load(path).module()
    return lambda x: module(x)
