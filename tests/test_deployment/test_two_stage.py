"""The fixed-size Mask R-CNN graph (transnext_mm.deployment.two_stage) in PyTorch against mmdet's
own ``predict``: same boxes, scores, labels and pasted masks, with fewer detections than
``max_per_img`` (padding) and fewer proposals than the RPN's ``max_per_img``. The backbone is the
tests' shallow one (tests/conftest.py): the graph is the detector's, whatever the depth."""
from pathlib import Path

import pytest
import torch

from transnext_mm.deployment.model import build_model, image_metas, load_config
from transnext_mm.deployment.runtime import compare_detections
from transnext_mm.deployment.two_stage import TwoStageDetectorNet, paste_masks

ROOT = Path(__file__).resolve().parents[2]
MASK_RCNN = ROOT / 'configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py'


def sparse_config(tmp_path) -> str:
    """The demo Mask R-CNN with a score threshold that random weights rarely pass, and more RPN
    proposals than a small image has anchors after NMS."""
    path = tmp_path / 'mask_rcnn_sparse.py'
    path.write_text(f"_base_ = ['{MASK_RCNN}']\n"
                    "model = dict(test_cfg=dict(rpn=dict(max_per_img=2000),\n"
                    "                           rcnn=dict(score_thr=0.37)))\n")
    return str(path)


@pytest.fixture(scope='module')
def model(tmp_path_factory, shallow_config):
    config = shallow_config(sparse_config(tmp_path_factory.mktemp('cfg')))
    torch.manual_seed(0)
    return build_model(load_config(config), config)


@pytest.mark.parametrize('batch, shape', [(1, (64, 96)), (2, (96, 64))])
def test_equals_mmdet_predict(model, batch, shape):
    from mmcv.ops import RoIAlign
    from mmdet.structures import DetDataSample
    x = torch.randn(batch, 3, *shape, generator=torch.Generator().manual_seed(batch))
    for module in model.modules():  # the reference: mmdet as trained, mmcv's RoIAlign
        if isinstance(module, RoIAlign):
            module.use_torchvision = False
    with torch.no_grad():
        reference = model.predict(
            x, [DetDataSample(metainfo=m) for m in image_metas(x)], rescale=False)
        boxes, scores, labels, masks = TwoStageDetectorNet(model).eval()(x)
    max_per_img = model.roi_head.test_cfg.max_per_img
    assert boxes.shape == (batch, max_per_img, 4) and masks.shape[:2] == (batch, max_per_img)
    for b, result in enumerate(reference):
        ref = result.pred_instances
        n = len(ref)
        assert 0 < n < max_per_img  # some detections, and padding
        # the graph's rows: mmdet's detections in its order, then padding (score 0, label -1)
        assert (labels[b, :n] >= 0).all() and (labels[b, n:] == -1).all()
        assert (scores[b, n:] == 0).all()
        expected = [ref.bboxes[None].numpy(), ref.scores[None].numpy(), ref.labels[None].numpy()]
        actual = [
            boxes[b:b + 1, :n].numpy(), scores[b:b + 1, :n].numpy(), labels[b:b + 1, :n].numpy()
        ]
        report = compare_detections(actual, expected)
        assert report['ok'] and report['min_iou'] > 0.9999, report
        pasted = paste_masks(masks[b, :n], boxes[b, :n], *shape)
        assert pasted.shape == ref.masks.shape
        assert (pasted == ref.masks).float().mean() >= 0.999


def test_paste_masks_empty():
    assert paste_masks(torch.zeros(0, 28, 28), torch.zeros(0, 4), 10, 12).shape == (0, 10, 12)
