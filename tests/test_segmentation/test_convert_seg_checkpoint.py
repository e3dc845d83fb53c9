# Copyright (c) transnext-mm contributors. All rights reserved.
"""tools/model_converters/convert_seg_checkpoint.py on checkpoints written in the released layouts.

The end-to-end check (a converted checkpoint evaluated by tools/test.py with the same mIoU) is in
test_seg_tools.py; these tests cover the layouts and the errors.
"""
import os.path as osp
from collections import OrderedDict

import pytest
import torch
from mmseg.datasets import ADE20KDataset

from tools.model_converters.convert_seg_checkpoint import convert, detect_source
from transnext_mm.utils.conversion import build_model
from transnext_mm.utils.safe_load import load_from_local_safely

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
UPERNET_DEMO = osp.join(ROOT, 'configs/demo/upernet_transnext-micro_synthetic-ade20k.py')
MASK2FORMER_DEMO = osp.join(ROOT, 'configs/demo/mask2former_transnext-micro_synthetic-ade20k.py')
UPERNET_TINY = osp.join(ROOT, 'configs/upernet/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py')


def mmseg0x_checkpoint(state_dict: dict) -> dict:
    """What mmcv 1.x's runner saved for an mmseg 0.x segmentor."""
    return dict(
        meta=dict(
            mmseg_version='0.30.0',
            mmcv_version='1.7.1',
            time='Tue Dec  5 2023',
            config="model = dict(type='EncoderDecoder', backbone=dict(type='transnext_t'))",
            CLASSES=ADE20KDataset.METAINFO['classes'],
            PALETTE=ADE20KDataset.METAINFO['palette'],
            env_info='sys.platform: linux',
            seed=0,
            exp_name='upernet.py',
            epoch=1,
            iter=160000,
            hook_msgs=dict(last_ckpt='iter_160000.pth')),
        state_dict=OrderedDict(state_dict),
        optimizer=dict(state={}, param_groups=[dict(lr=0.0, weight_decay=0.05, params=[0])]))


@pytest.fixture(scope='module')
def upernet():
    model, _ = build_model(UPERNET_DEMO)
    return model


def test_mmseg0x_upernet(tmp_path, upernet):
    state_dict = upernet.state_dict()
    wrapped = OrderedDict(('module.' + k, v) for k, v in state_dict.items())  # DDP prefix
    # Buffers some TransNeXt code bases save; this backbone derives them.
    wrapped['module.backbone.relative_pos_index1'] = torch.zeros(4, dtype=torch.long)
    wrapped['module.backbone.block1.0.attn.seq_length_scale'] = torch.zeros(4)
    src, dst = str(tmp_path / 'released.pth'), str(tmp_path / 'converted.pth')
    torch.save(mmseg0x_checkpoint(wrapped), src)

    summary = convert(src, dst, UPERNET_DEMO)
    assert summary['source'] == 'mmseg0.x'
    assert sorted(summary['dropped']) == [
        'backbone.block1.0.attn.seq_length_scale', 'backbone.relative_pos_index1'
    ]
    converted = load_from_local_safely(dst)
    assert set(converted) == {'meta', 'state_dict'}
    assert list(converted['state_dict']) == list(state_dict)
    assert all(torch.equal(converted['state_dict'][k], v) for k, v in state_dict.items())
    meta = converted['meta']
    assert meta['dataset_meta']['classes'] == ADE20KDataset.METAINFO['classes']
    assert meta['dataset_meta']['palette'][3] == list(ADE20KDataset.METAINFO['palette'][3])
    assert (meta['source_format'], meta['source_iter']) == ('mmseg0.x', 160000)


def test_mmseg1x_layout_and_dataset_meta_fallback(tmp_path, upernet):
    checkpoint = dict(meta=dict(mmseg_version='1.2.2'), state_dict=upernet.state_dict())
    assert detect_source(checkpoint) == 'mmseg1.x'
    assert detect_source(dict(state_dict={})) == 'unknown'
    src, dst = str(tmp_path / 'src.pth'), str(tmp_path / 'dst.pth')
    torch.save(checkpoint, src)
    convert(src, dst, UPERNET_DEMO)
    # No class names in the source: the config's dataset (ADE20K) provides them.
    assert load_from_local_safely(dst)['meta']['dataset_meta']['classes'] == \
        ADE20KDataset.METAINFO['classes']


def test_wrong_arch(tmp_path, upernet):
    src = str(tmp_path / 'micro.pth')
    torch.save(mmseg0x_checkpoint(upernet.state_dict()), src)
    with pytest.raises(
            ValueError, match="TransNeXt-micro .* but the config's backbone is TransNeXt-tiny"):
        convert(src, str(tmp_path / 'out.pth'), UPERNET_TINY)


def test_wrong_head(tmp_path, upernet):
    src = str(tmp_path / 'upernet.pth')
    torch.save(mmseg0x_checkpoint(upernet.state_dict()), src)
    with pytest.raises(
            ValueError,
            match='missing keys: decode_head.pixel_decoder.*unexpected '
            'keys: decode_head.conv_seg'):
        convert(src, str(tmp_path / 'out.pth'), MASK2FORMER_DEMO)


def test_missing_and_misshapen_keys(tmp_path, upernet):
    state_dict = upernet.state_dict()
    state_dict.pop('decode_head.conv_seg.bias')
    state_dict['auxiliary_head.conv_seg.weight'] = torch.zeros(19, 32, 1, 1)  # Cityscapes head
    src = str(tmp_path / 'bad.pth')
    torch.save(mmseg0x_checkpoint(state_dict), src)
    with pytest.raises(
            ValueError,
            match=r'1 missing keys: decode_head.conv_seg.bias; 1 keys of '
            r'the wrong shape: auxiliary_head.conv_seg.weight: \(19, 32, 1, 1\)'):
        convert(src, str(tmp_path / 'out.pth'), UPERNET_DEMO)


def test_not_a_segmentor_and_bad_source(tmp_path, upernet):
    src = str(tmp_path / 'backbone_only.pth')
    torch.save(dict(state_dict=upernet.backbone.state_dict()), src)
    with pytest.raises(ValueError, match="no 'backbone.\\*' keys"):
        convert(src, str(tmp_path / 'out.pth'), UPERNET_DEMO)
    with pytest.raises(ValueError, match='source must be one of'):
        convert(src, str(tmp_path / 'out.pth'), UPERNET_DEMO, source='mmseg2')


def test_config_is_required(tmp_path, capsys):
    from tools.model_converters.convert_seg_checkpoint import main
    with pytest.raises(SystemExit):
        main(['src.pth', str(tmp_path / 'out.pth')])
    assert 'the following arguments are required: --config' in capsys.readouterr().err
    with pytest.raises(ValueError, match='a config is required to convert a segmentor'):
        convert('src.pth', str(tmp_path / 'out.pth'))
