# Copyright (c) transnext-mm contributors. All rights reserved.
"""Detection end to end on CPU through the command-line tools, on a tiny synthetic COCO set.

Mask R-CNN (TransNeXt-micro) trains and resumes with tools/train.py, validating at its end; the
weights in a released layout, converted by tools/model_converters/convert_det_checkpoint.py, give
tools/test.py the same bbox and segm mAP. DINO trains with mmdet's own train.py (TransNeXt found
through the config's custom_imports) and is tested with tools/test.py; Mask R-CNN trains with two
processes through tools/dist_train.sh (torchrun, gloo). DINO and the two-process run use the
tests' shallow backbone (tests/conftest.py): they check the entry points, not the depth.
Runs are a few iterations long: they show that everything runs, not that it learns (see the
demo training in the README for that).
"""
import os
import os.path as osp
import re
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_RCNN = 'configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py'
DINO = 'configs/demo/dino-4scale_transnext-micro_synthetic-coco.py'
MMDET_TRAIN = osp.join(osp.dirname(__import__('mmdet').__file__), '.mim', 'tools', 'train.py')
TIMEOUT = 600


def run(args, env=None):
    """Run a command from the repository root; fail with its output's tail if it fails."""
    full_env = dict(
        os.environ, OMP_NUM_THREADS=os.environ.get('OMP_NUM_THREADS', '1'), **(env or {}))
    proc = subprocess.run(
        args,
        cwd=ROOT,
        env=full_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=TIMEOUT)
    assert proc.returncode == 0, f'{" ".join(args)} failed:\n{proc.stdout[-6000:]}'
    return proc.stdout


def data_options(root: str):
    """--cfg-options values pointing a demo config at the dataset under ``root``."""
    root = root.rstrip('/') + '/'
    ann = root + 'annotations/instances_val.json'
    return [
        f'{loader}.dataset.data_root={root}'
        for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader')
    ] + [f'val_evaluator.ann_file={ann}', f'test_evaluator.ann_file={ann}']


def short_run(root: str, epochs: int, batch_size: int = 2, val_interval: int = 100):
    """A few iterations, a checkpoint per epoch; no validation unless ``val_interval`` says."""
    return data_options(root) + [
        f'train_cfg.max_epochs={epochs}', f'train_cfg.val_interval={val_interval}',
        f'train_dataloader.batch_size={batch_size}', 'default_hooks.checkpoint.interval=1',
        'default_hooks.logger.interval=1'
    ]


def metric(output: str, name: str) -> float:
    found = re.findall(rf'coco/{name}: (-?[\d.]+)', output)
    assert found, f'no coco/{name} in the output:\n{output[-3000:]}'
    return float(found[-1])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synthetic_coco'))
    run([
        sys.executable, 'tools/dataset_converters/make_synthetic_coco.py', '--out', root,
        '--num-train', '4', '--num-val', '2', '--seed', '1'
    ])
    return root


@pytest.fixture(scope='module')
def mask_rcnn_run(dataset, tmp_path_factory):
    """One epoch of Mask R-CNN (2 iterations) with tools/train.py."""
    work_dir = str(tmp_path_factory.mktemp('mask_rcnn'))
    output = run([
        sys.executable, 'tools/train.py', MASK_RCNN, '--work-dir', work_dir, '--cfg-options',
        *short_run(dataset, epochs=1)
    ])
    return work_dir, output


def test_mask_rcnn_train(mask_rcnn_run):
    work_dir, output = mask_rcnn_run
    assert 'Epoch(train) [1][2/2]' in output
    losses = re.findall(r'loss_mask: ([\d.]+)', output)
    assert losses and all(0 < float(v) < 100 for v in losses)
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))


@pytest.fixture(scope='module')
def resumed(dataset, mask_rcnn_run):
    """--resume to a second epoch, validated at its end: the mAP of epoch_2.pth's weights."""
    work_dir, _ = mask_rcnn_run
    output = run([
        sys.executable, 'tools/train.py', MASK_RCNN, '--work-dir', work_dir, '--resume',
        '--cfg-options', *short_run(dataset, epochs=2, val_interval=2)
    ])
    return osp.join(work_dir, 'epoch_2.pth'), output


def test_mask_rcnn_resume(resumed):
    checkpoint, output = resumed
    assert 'Auto resumed from the latest checkpoint' in output
    assert 'resumed epoch: 1, iter: 2' in output
    assert 'Epoch(train) [2][2/2]' in output and 'Epoch(train) [1]' not in output
    assert torch.load(checkpoint, map_location='cpu', weights_only=False)['meta']['iter'] == 4


def test_converted_release_layout_evaluates_like_the_original(dataset, resumed, tmp_path, capsys):
    """An mmdet 2.x-style release of the trained weights, converted, gives tools/test.py the
    bbox and segm mAP that the training's validation gave the original."""
    from tools.model_converters.convert_det_checkpoint import main as convert
    checkpoint, original_output = resumed
    trained = torch.load(checkpoint, map_location='cpu', weights_only=False)
    release = dict(
        state_dict=dict(trained['state_dict']),
        meta=dict(
            mmdet_version='2.28.2',
            CLASSES=('circle', 'square', 'triangle'),
            config='model = dict(...)  # mmdet 2.x config text'),
        optimizer=dict(state={}, param_groups=[]))
    # Buffers the released backbone code stores and transnext-mm derives.
    release['state_dict']['backbone.relative_pos_index1'] = torch.zeros(10, dtype=torch.long)
    release['state_dict']['backbone.relative_coords_table1'] = torch.zeros(5, 2)
    released = str(tmp_path / 'released.pth')
    converted = str(tmp_path / 'converted.pth')
    torch.save(release, released)
    convert([released, converted, '--config', MASK_RCNN])
    output = capsys.readouterr().out
    assert 'mmdet2' in output and 'TransNeXt-micro' in output and 'matches the model' in output

    output = run([
        sys.executable, 'tools/test.py', MASK_RCNN, converted, '--work-dir',
        str(tmp_path), '--cfg-options', *data_options(dataset)
    ])
    # mmengine loads checkpoints non-strictly: a mismatch would only be logged.
    assert 'do not match exactly' not in output
    assert 'Epoch(test) [2/2]' in output and 'Epoch(val) [2][2/2]' in original_output
    names = ('bbox_mAP', 'bbox_mAP_50', 'segm_mAP', 'segm_mAP_50')
    maps = [metric(output, n) for n in names]
    assert all(0 <= value <= 1 for value in maps)
    assert maps == [metric(original_output, n) for n in names]


def test_dino_with_mmdets_own_train_then_test(dataset, tmp_path, shallow_config):
    """mmdet's train.py finds TransNeXt through custom_imports; tools/test.py evaluates."""
    work_dir, config = str(tmp_path), shallow_config(DINO)
    output = run([
        sys.executable, MMDET_TRAIN, config, '--work-dir', work_dir, '--cfg-options',
        *short_run(dataset, epochs=1)
    ])
    assert 'Epoch(train) [1][2/2]' in output and 'loss_iou' in output
    output = run([
        sys.executable, 'tools/test.py', config,
        osp.join(work_dir, 'epoch_1.pth'), '--work-dir', work_dir, '--cfg-options',
        *data_options(dataset)
    ])
    assert 0 <= metric(output, 'bbox_mAP') <= 1


def test_distributed_train_two_processes(dataset, tmp_path, shallow_config):
    """tools/dist_train.sh with 2 CPU processes (torchrun, gloo): 4 images, 1 per process."""
    work_dir = str(tmp_path)
    output = run([
        'bash', 'tools/dist_train.sh',
        shallow_config(MASK_RCNN), '2', '--work-dir', work_dir, '--cfg-options',
        'env_cfg.dist_cfg.backend=gloo', *short_run(dataset, epochs=1, batch_size=1)
    ],
                 env=dict(PYTHON=sys.executable, PORT=str(free_port())))
    assert 'Distributed training: True' in output
    # 4 images over 2 processes x 1 image: 2 iterations per epoch (4 on a single process).
    assert 'Epoch(train) [1][2/2]' in output
    assert osp.isfile(osp.join(work_dir, 'epoch_1.pth'))


@pytest.mark.skipif(not torch.cuda.is_available(), reason='AmpOptimWrapper needs a GPU')
def test_amp_train_on_gpu(dataset, tmp_path):
    output = run([
        sys.executable, 'tools/train.py', MASK_RCNN, '--work-dir',
        str(tmp_path), '--amp', '--cfg-options', *short_run(dataset, epochs=1)
    ])
    assert 'AmpOptimWrapper' in output and 'Epoch(train) [1][2/2]' in output


def test_demo_draws_detections_on_a_photo(resumed, tmp_path):
    """tools/demo/det_demo.py on scikit-image's coffee photo writes boxes and masks as a PNG."""
    import cv2
    import skimage.data

    checkpoint, _ = resumed
    out_file = str(tmp_path / 'coffee.png')
    # Barely trained: keep every detection (no score threshold) so that there is one to draw.
    output = run([
        sys.executable, 'tools/demo/det_demo.py', 'skimage:coffee', MASK_RCNN, checkpoint,
        '--out-file', out_file, '--score-thr', '0', '--cfg-options',
        'model.test_cfg.rcnn.score_thr=0.0'
    ])
    assert re.search(r'skimage:coffee \(600x400\): [1-9]\d* detections above 0.0', output)
    drawn = cv2.cvtColor(cv2.imread(out_file), cv2.COLOR_BGR2RGB)
    photo = skimage.data.coffee()
    assert drawn.shape == photo.shape
    assert (np.abs(drawn.astype(int) - photo).sum(axis=2) > 30).mean() > 0.01
