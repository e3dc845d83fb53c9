# Copyright (c) transnext-mm contributors. All rights reserved.
"""End to end on the synthetic ADE20K-format dataset, through the command-line entry points.

Short UperNet and Mask2Former trainings (``tools/train.py``) save checkpoints; their checkpoints,
rewritten in the released layouts and converted, give ``tools/test.py`` the mIoU the training's
validation gave; ``tools/test.py --tta`` runs the interpolation and extrapolation demo configs;
the test-size sweep writes its table and plot; the demo writes an overlay.
"""
import csv
import os
import os.path as osp
import re
import runpy
import subprocess
import sys
from collections import OrderedDict

import cv2
import numpy as np
import pytest
import torch
from mmseg.datasets import ADE20KDataset

from tools.dataset_converters.make_synthetic_ade20k import make_synthetic_ade20k
from transnext_mm.utils.safe_load import load_from_local_safely

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
UPERNET = 'configs/demo/upernet_transnext-micro_synthetic-ade20k.py'
MASK2FORMER = 'configs/demo/mask2former_transnext-micro_synthetic-ade20k.py'
MS_INTERP = 'configs/demo/upernet_transnext-micro_synthetic-ade20k_ms-interp.py'
MS_EXTRAP = 'configs/demo/upernet_transnext-micro_synthetic-ade20k_ms-extrap.py'
TRAIN_ITERS = 3
MIOU = re.compile(r'mIoU: ([\d.]+)')


def run_tool(*args, timeout=300):
    """Run ``python tools/...`` from the repository root; return its output."""
    env = dict(os.environ, OMP_NUM_THREADS='1', PYTHONWARNINGS='ignore')
    result = subprocess.run([sys.executable, *args],
                            cwd=ROOT,
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=timeout)
    output = result.stdout + result.stderr
    assert result.returncode == 0, f'{" ".join(args)} failed:\n{output[-4000:]}'
    return output


def run_script_in_process(capsys, script, *args):
    """Run a light tool's command line in this process (no interpreter start-up); its output."""
    argv = sys.argv
    sys.argv = [script, *args]
    try:
        runpy.run_path(osp.join(ROOT, script), run_name='__main__')
    finally:
        sys.argv = argv
    return capsys.readouterr().out


def data_options(root):
    return [
        f'{loader}.dataset.data_root={root}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ]


@pytest.fixture(scope='module')
def data_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synthetic_ade20k'))
    make_synthetic_ade20k(root, num_train=8, num_val=3, size=(160, 128), seed=0)
    return root


def train(config, data_root, work_dir):
    """``tools/train.py`` for TRAIN_ITERS iterations; returns (checkpoint, validation mIoU)."""
    output = run_tool('tools/train.py', config, '--work-dir', work_dir, '--cfg-options',
                      *data_options(data_root), f'train_cfg.max_iters={TRAIN_ITERS}',
                      f'train_cfg.val_interval={TRAIN_ITERS}',
                      f'default_hooks.checkpoint.interval={TRAIN_ITERS}',
                      'default_hooks.logger.interval=1', 'randomness.seed=0')
    checkpoint = osp.join(work_dir, f'iter_{TRAIN_ITERS}.pth')
    assert osp.isfile(checkpoint), output[-2000:]
    assert f'Iter(train) [{TRAIN_ITERS}/{TRAIN_ITERS}]' in output
    return checkpoint, float(MIOU.findall(output)[-1])


@pytest.fixture(scope='module')
def upernet_run(data_root, tmp_path_factory):
    return train(UPERNET, data_root, str(tmp_path_factory.mktemp('upernet')))


@pytest.fixture(scope='module')
def strong_bias_checkpoint(upernet_run, tmp_path_factory):
    """The trained UperNet with log-CPB MLP layers scaled x30.

    After a few iterations the MLP is still near its initialisation and its biases are ~1e-3,
    too small to move a prediction; x30 on both layers gives biases of a few units, as in
    trained models, so the position-bias mode visibly matters.
    """
    checkpoint = load_from_local_safely(upernet_run[0])
    for key, value in checkpoint['state_dict'].items():
        if '.cpb_fc' in key:
            value.mul_(30)
    path = str(tmp_path_factory.mktemp('strong_bias') / 'strong_bias.pth')
    torch.save(dict(meta=checkpoint['meta'], state_dict=checkpoint['state_dict']), path)
    return path


def test_upernet_train_released_layout_and_test(upernet_run, data_root, tmp_path, capsys):
    """UperNet: train, rewrite as mmseg 0.x released it, convert, tools/test.py: same mIoU."""
    checkpoint, val_miou = upernet_run
    state_dict = load_from_local_safely(checkpoint)['state_dict']
    released = str(tmp_path / 'upernet_released_0x.pth')
    torch.save(
        dict(
            meta=dict(
                mmseg_version='0.30.0',
                mmcv_version='1.7.1',
                CLASSES=ADE20KDataset.METAINFO['classes'],
                PALETTE=ADE20KDataset.METAINFO['palette'],
                iter=TRAIN_ITERS),
            state_dict=OrderedDict(state_dict),
            optimizer=dict(state={})), released)
    converted = str(tmp_path / 'upernet_converted.pth')
    output = run_script_in_process(capsys, 'tools/model_converters/convert_seg_checkpoint.py',
                                   released, converted, '--config', UPERNET)
    assert '(mmseg0.x)' in output and 'no missing or unexpected keys' in output

    output = run_tool('tools/test.py', UPERNET, converted, '--work-dir', str(tmp_path / 'test'),
                      '--cfg-options', *data_options(data_root))
    assert 'Iter(test) [3/3]' in output
    assert 'missing keys' not in output and 'unexpected key' not in output
    assert float(MIOU.findall(output)[-1]) == val_miou


def test_mask2former_train_released_layout_and_test(data_root, tmp_path, capsys):
    """Mask2Former: train; its mmseg 1.x checkpoint (the released layout) converts and tests."""
    checkpoint, val_miou = train(MASK2FORMER, data_root, str(tmp_path / 'train'))
    released = load_from_local_safely(checkpoint)
    assert {'meta', 'state_dict', 'message_hub', 'optimizer'} <= set(released)
    converted = str(tmp_path / 'mask2former_converted.pth')
    output = run_script_in_process(capsys, 'tools/model_converters/convert_seg_checkpoint.py',
                                   checkpoint, converted, '--config', MASK2FORMER)
    assert '(mmseg1.x)' in output
    output = run_tool('tools/test.py', MASK2FORMER, converted, '--work-dir', str(tmp_path / 'test'),
                      '--cfg-options', *data_options(data_root))
    assert 'missing keys' not in output and 'unexpected key' not in output
    assert float(MIOU.findall(output)[-1]) == val_miou


def test_tta_interpolate_vs_extrapolate(strong_bias_checkpoint, data_root, tmp_path):
    """tools/test.py --tta with both ms configs: multi-scale + flip, different predictions."""
    predictions = {}
    for name, config in (('interp', MS_INTERP), ('extrap', MS_EXTRAP)):
        out_dir = str(tmp_path / name)
        output = run_tool('tools/test.py', config, strong_bias_checkpoint, '--tta', '--out',
                          out_dir, '--work-dir', str(tmp_path / f'work_{name}'), '--cfg-options',
                          *data_options(data_root), 'test_dataloader.dataset.indices=1')
        assert 'TestTimeAug' in output and MIOU.search(output)
        predictions[name] = {
            f: cv2.imread(osp.join(out_dir, f), cv2.IMREAD_UNCHANGED)
            for f in sorted(os.listdir(out_dir))
        }
    assert list(predictions['interp']) == ['ADE_val_00000001.png']
    changed = [
        np.mean(predictions['interp'][f] != predictions['extrap'][f]) for f in predictions['interp']
    ]
    assert max(changed) > 0, 'interpolated and extrapolated position bias gave equal predictions'


def test_position_bias_modes_agree_only_at_the_table_size(strong_bias_checkpoint):
    """The control of the TTA test: same logits at the tabulated size, different elsewhere."""
    from mmseg.apis import init_model
    from mmseg.structures import SegDataSample

    models = {
        mode:
        init_model(
            osp.join(ROOT, UPERNET),
            strong_bias_checkpoint,
            device='cpu',
            cfg_options={
                'model.backbone.pos_bias_mode': mode,
                'model.backbone.img_size': 128
            })
        for mode in ('interpolate', 'extrapolate')
    }

    def logits(model, size):
        torch.manual_seed(0)
        meta = dict(img_shape=size, ori_shape=size, pad_shape=size, padding_size=[0] * 4)
        with torch.no_grad():
            return model.predict(torch.randn(1, 3, *size),
                                 [SegDataSample(metainfo=meta)])[0].seg_logits.data

    same = [logits(m, (128, 128)) for m in models.values()]
    torch.testing.assert_close(same[0], same[1], rtol=0, atol=1e-5)
    other = [logits(m, (192, 160)) for m in models.values()]
    assert (other[0] - other[1]).abs().max() > 1e-2


def test_eval_test_sizes(strong_bias_checkpoint, data_root, tmp_path):
    out_dir = str(tmp_path / 'sizes')
    output = run_tool('tools/analysis/eval_test_sizes.py', UPERNET, strong_bias_checkpoint,
                      '--sizes', '64', '160', '--max-images', '1', '--out-dir', out_dir,
                      '--cfg-options', f'test_dataloader.dataset.data_root={data_root}')
    with open(osp.join(out_dir, 'test_sizes.csv')) as f:
        rows = list(csv.DictReader(f))
    assert [(r['mode'], r['size']) for r in rows] == [
        (mode, size) for mode in ('interpolate', 'extrapolate', 'linear') for size in ('64', '160')
    ]
    for row in rows:
        assert 0 <= float(row['mIoU']) <= 100 and float(row['latency_ms']) > 0
        assert row['images'] == '1'
        assert f"mIoU {float(row['mIoU']):6.2f}" in output  # what the runner's IoUMetric gave
    table = open(osp.join(out_dir, 'test_sizes.md')).read()
    assert 'interpolate (table at 128)' in table and 'linear (pool 7x7' in table
    plot = cv2.imread(osp.join(out_dir, 'test_sizes.png'))
    assert plot is not None and plot.shape[1] > 800 and plot.std() > 10


def test_seg_demo(upernet_run, tmp_path):
    """The script on a trained checkpoint (its arguments' errors: tests/test_tools/test_demo.py)."""
    out_file = str(tmp_path / 'astronaut.png')
    output = run_tool('tools/demo/seg_demo.py', 'skimage:astronaut', UPERNET, upernet_run[0],
                      '--out-file', out_file)
    assert 'skimage:astronaut (512x512)' in output and f'wrote {out_file}' in output
    import skimage.data
    overlay = cv2.cvtColor(cv2.imread(out_file), cv2.COLOR_BGR2RGB)
    assert overlay.shape == (512, 512, 3)
    assert np.abs(overlay.astype(int) - skimage.data.astronaut()).mean() > 5
