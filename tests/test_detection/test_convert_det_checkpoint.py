# Copyright (c) transnext-mm contributors. All rights reserved.
"""tools/model_converters/convert_det_checkpoint.py on checkpoints written in the released layout.

No download: the tests build the demo detectors, save their weights the way the released
checkpoints are saved (mmdet 2.x Mask R-CNN, mmdet 3.x DINO, backbone under ``backbone.``) and
convert them. tests/test_detection/test_det_end_to_end.py evaluates a converted file with
tools/test.py.
"""
import importlib.util
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmengine.config import Config
from mmengine.registry import init_default_scope

from transnext_mm.utils import conversion

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_RCNN = osp.join(ROOT, 'configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py')
DINO = osp.join(ROOT, 'configs/demo/dino-4scale_transnext-micro_synthetic-coco.py')
CLASSES = ('circle', 'square', 'triangle')


def load_converter():
    path = osp.join(ROOT, 'tools/model_converters/convert_det_checkpoint.py')
    spec = importlib.util.spec_from_file_location('convert_det_checkpoint', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


converter = load_converter()


def detector_state_dict(config: str):
    init_default_scope('mmdet')
    return MODELS.build(Config.fromfile(config).model).state_dict()


@pytest.fixture(scope='module')
def mask_rcnn_state():
    return detector_state_dict(MASK_RCNN)


def mmdet2_release(state_dict):
    """How mmdet 2.x (mmcv 1.x) saved the released Mask R-CNN checkpoints."""
    return dict(
        meta=dict(
            mmdet_version='2.28.2',
            CLASSES=CLASSES,
            epoch=12,
            iter=88000,
            config='optimizer = dict(type="AdamW")'),
        state_dict=dict(state_dict),
        optimizer=dict(state={}, param_groups=[]))


def test_mmdet2_mask_rcnn(mask_rcnn_state, tmp_path):
    release = mmdet2_release(mask_rcnn_state)
    # Derived buffers some TransNeXt code saves; transnext-mm recomputes them.
    release['state_dict']['backbone.relative_pos_index1'] = torch.zeros(7, dtype=torch.long)
    release['state_dict']['backbone.relative_coords_table1'] = torch.zeros(3, 2)
    src, dst = str(tmp_path / 'release.pth'), str(tmp_path / 'converted.pth')
    torch.save(release, src)
    summary = converter.convert(src, dst, config=MASK_RCNN)
    assert summary['source'] == 'mmdet2' and summary['arch'] == 'micro'
    assert sorted(
        summary['dropped']) == ['backbone.relative_coords_table1', 'backbone.relative_pos_index1']

    converted = torch.load(dst, map_location='cpu', weights_only=True)
    assert set(converted) == {'meta', 'state_dict'}  # no optimizer, no mmdet 2 config text
    assert converted['meta']['dataset_meta'] == dict(classes=CLASSES)
    assert converted['meta']['source_format'] == 'mmdet2'
    assert list(converted['state_dict']) == list(mask_rcnn_state)
    for key, value in mask_rcnn_state.items():
        assert torch.equal(converted['state_dict'][key], value), key
    # mmdet 2.x and 3.x share these names: the converted file loads into the mmdet 3 model.
    for key in ('rpn_head.rpn_conv.weight', 'roi_head.bbox_head.fc_cls.weight',
                'roi_head.mask_head.conv_logits.weight', 'neck.lateral_convs.0.conv.weight'):
        assert key in converted['state_dict']
    init_default_scope('mmdet')
    model = MODELS.build(Config.fromfile(MASK_RCNN).model)
    assert not model.load_state_dict(converted['state_dict'], strict=True).missing_keys


def test_mmdet3_dino_keeps_dataset_meta(tmp_path):
    state = detector_state_dict(DINO)
    src, dst = str(tmp_path / 'release.pth'), str(tmp_path / 'converted.pth')
    dataset_meta = dict(classes=CLASSES, palette=[(1, 2, 3)] * 3)
    torch.save(
        dict(
            meta=dict(mmdet_version='3.3.0', dataset_meta=dataset_meta, epoch=12),
            state_dict=state,
            message_hub=dict(log_scalars={}),
            optimizer=dict(state={}, param_groups=[])), src)
    summary = converter.convert(src, dst, config=DINO)
    assert summary['source'] == 'mmdet3' and summary['dropped'] == []
    converted = torch.load(dst, map_location='cpu', weights_only=True)
    assert converted['meta']['dataset_meta'] == dataset_meta
    assert converted['meta']['source_epoch'] == 12
    assert list(converted['state_dict']) == list(state)


def test_config_of_another_arch_is_rejected(mask_rcnn_state, tmp_path):
    src = str(tmp_path / 'release.pth')
    torch.save(mmdet2_release(mask_rcnn_state), src)
    tiny = osp.join(ROOT, 'configs/mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py')
    with pytest.raises(
            ValueError, match="TransNeXt-micro .* but the config's backbone is TransNeXt-tiny"):
        converter.convert(src, str(tmp_path / 'out.pth'), config=tiny)


def test_head_mismatch_is_reported(mask_rcnn_state, tmp_path):
    release = mmdet2_release(mask_rcnn_state)
    release['state_dict']['roi_head.bbox_head.fc_cls.weight'] = torch.zeros(81, 1024)
    del release['state_dict']['roi_head.mask_head.conv_logits.bias']
    src = str(tmp_path / 'release.pth')
    torch.save(release, src)
    with pytest.raises(ValueError) as error:
        converter.convert(src, str(tmp_path / 'out.pth'), config=MASK_RCNN)
    message = str(error.value)
    assert '1 missing keys: roi_head.mask_head.conv_logits.bias' in message
    assert 'roi_head.bbox_head.fc_cls.weight: (81, 1024) vs (4, 1024)' in message
    assert not osp.exists(tmp_path / 'out.pth')


def test_incomplete_backbone_is_rejected(mask_rcnn_state):
    state = dict(mask_rcnn_state)
    del state['backbone.block3.4.attn.temperature']
    with pytest.raises(ValueError, match=r'incomplete .* missing \[block3\.4\.attn\.temperature\]'):
        conversion.convert_state_dict(state)


def test_not_a_detector_is_rejected(mask_rcnn_state):
    backbone_only = {
        k[len('backbone.'):]: v
        for k, v in mask_rcnn_state.items() if k.startswith('backbone.')
    }
    with pytest.raises(ValueError, match=r"not a detector checkpoint: no 'backbone\.\*' keys"):
        conversion.convert_state_dict(backbone_only)


def test_bad_source_format(tmp_path):
    with pytest.raises(ValueError, match=r"source must be one of \('auto', 'mmdet2', 'mmdet3'\)"):
        converter.convert('unused.pth', str(tmp_path / 'out.pth'), source='mmdet1')


def test_classes_from_the_config_when_the_source_has_none(mask_rcnn_state, tmp_path):
    """A source without class names takes them from the config's test dataset."""
    src, dst = str(tmp_path / 'release.pth'), str(tmp_path / 'converted.pth')
    torch.save(dict(meta=dict(mmdet_version='3.3.0'), state_dict=dict(mask_rcnn_state)), src)
    assert converter.convert(src, dst, config=MASK_RCNN)['classes'] == len(CLASSES)
    meta = torch.load(dst, map_location='cpu', weights_only=True)['meta']
    assert tuple(meta['dataset_meta']['classes']) == CLASSES
    # Without a config there is nothing to take them from.
    assert converter.convert(src, dst)['classes'] == 0


def test_command_line(mask_rcnn_state, tmp_path, capsys):
    """main(argv): --source-format and --source name the same option; errors are messages."""
    src, dst = str(tmp_path / 'release.pth'), str(tmp_path / 'converted.pth')
    torch.save(mmdet2_release(mask_rcnn_state), src)
    for flag in ('--source-format', '--source'):
        converter.main([src, dst, '--config', MASK_RCNN, flag, 'mmdet2'])
        out = capsys.readouterr().out
        assert f'converted {src} (mmdet2) -> {dst}: TransNeXt-micro' in out
        assert f'checked: matches the model of {MASK_RCNN} exactly' in out
    with pytest.raises(SystemExit) as error:
        converter.main([src, dst, '--source', 'mmseg1.x'])
    assert error.value.code == 2
    assert "argument --source/--source-format: invalid choice: 'mmseg1.x'" in \
        capsys.readouterr().err
    with pytest.raises(SystemExit, match=r'^error: .*missing\.pth can not be found'):
        converter.main([str(tmp_path / 'missing.pth'), dst])
