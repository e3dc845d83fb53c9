# Copyright (c) transnext-mm contributors. All rights reserved.
"""tools/demo/det_demo.py and seg_demo.py: their shared flow (transnext_mm.deployment.demo) on the
micro demo configs with random weights, in this process.

Trained models and exported files are drawn in tests/test_detection/test_det_end_to_end.py,
tests/test_segmentation/test_seg_tools.py and tests/test_deployment/test_export_toolboxes.py.
"""
import importlib.util
import os.path as osp
import re

import cv2
import numpy as np
import pytest
import skimage.data
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_RCNN = osp.join(ROOT, 'configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py')
UPERNET = osp.join(ROOT, 'configs/demo/upernet_transnext-micro_synthetic-ade20k.py')


def load_tool(name):
    spec = importlib.util.spec_from_file_location(name, osp.join(ROOT, 'tools/demo', name + '.py'))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope='module')
def mask_rcnn_checkpoint(tmp_path_factory):
    """A randomly initialised Mask R-CNN saved as mmengine saves checkpoints."""
    init_default_scope('mmdet')
    torch.manual_seed(0)
    model = MODELS.build(Config.fromfile(MASK_RCNN).model)
    model.init_weights()
    path = str(tmp_path_factory.mktemp('det') / 'mask_rcnn.pth')
    torch.save(
        dict(
            meta=dict(dataset_meta=dict(classes=('circle', 'square', 'triangle'))),
            state_dict=model.state_dict()), path)
    return path


def drawn_on(out_file, photo):
    drawn = cv2.cvtColor(cv2.imread(out_file), cv2.COLOR_BGR2RGB)
    assert drawn.shape == photo.shape
    return (np.abs(drawn.astype(int) - photo).sum(axis=2) > 30).mean()


def test_det_demo(mask_rcnn_checkpoint, tmp_path, capsys):
    out_file = str(tmp_path / 'coffee.png')
    # Random weights: keep every detection, so that there are some to draw.
    load_tool('det_demo').main([
        'skimage:coffee', MASK_RCNN, mask_rcnn_checkpoint, '--out-file', out_file, '--score-thr',
        '0', '--cfg-options', 'model.test_cfg.rcnn.score_thr=0.0'
    ])
    out = capsys.readouterr().out
    assert re.search(
        r'skimage:coffee \(600x400\): [1-9]\d* detections above 0.0: '
        r'(circle|square|triangle) ', out), out
    assert f'wrote {out_file}' in out
    assert drawn_on(out_file, skimage.data.coffee()) > 0.01


def test_seg_demo_without_checkpoint(tmp_path, capsys):
    out_file = str(tmp_path / 'chelsea.png')
    load_tool('seg_demo').main(
        ['skimage:chelsea', UPERNET, '--out-file', out_file, '--opacity', '1', '--no-labels'])
    out = capsys.readouterr().out
    # No checkpoint: the class names are the config dataset's (ADE20K).
    assert re.search(r'skimage:chelsea \(451x300\): \w[\w ]*\d+\.\d%', out), out
    assert f'wrote {out_file}' in out
    assert drawn_on(out_file, skimage.data.chelsea()) > 0.5


@pytest.mark.parametrize('tool, args, message', [
    ('det_demo', ['skimage:coffee', MASK_RCNN, 'x.pth', '--score-thr', '1.5'
                  ], 'error: --score-thr must be in [0, 1), got 1.5'),
    ('det_demo', ['skimage:coffee', MASK_RCNN], 'error: a detection config needs a checkpoint'),
    ('det_demo', ['skimage:coffee', 'det.onnx', 'x.pth'
                  ], 'error: an .onnx model takes no checkpoint and no --cfg-options'),
    ('seg_demo', ['skimage:chelsea', UPERNET, '--opacity', '0'
                  ], 'error: --opacity must be in (0, 1], got 0.0'),
    ('seg_demo', ['skimage:chelsea', UPERNET, '--out-file', 'overlay.jpg'
                  ], 'error: --out-file must end with .png, got overlay.jpg'),
    ('seg_demo', ['skimage:camera', UPERNET],
     "error: image: skimage photo must be one of ('astronaut', 'chelsea', 'coffee'), got "
     "'camera'"),
    ('seg_demo', ['no_such_image.png', UPERNET], "error: image: 'no_such_image.png' is neither"),
])
def test_bad_arguments(tool, args, message):
    with pytest.raises(SystemExit) as error:
        load_tool(tool).main(args)
    assert str(error.value).startswith(message), error.value
