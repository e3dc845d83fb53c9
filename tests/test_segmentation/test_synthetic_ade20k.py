# Copyright (c) transnext-mm contributors. All rights reserved.
"""The synthetic ADE20K-format dataset: layout, label encoding, and mmseg's ADE20KDataset on it."""
import os
import os.path as osp

import cv2
import numpy as np
import pytest
from mmengine.registry import init_default_scope

from tools.dataset_converters.make_synthetic_ade20k import (BACKGROUND_CLASSES, SHAPE_CLASSES,
                                                            make_synthetic_ade20k)


@pytest.fixture(scope='module')
def dataset_root(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('synthetic_ade20k'))
    make_synthetic_ade20k(root, num_train=6, num_val=3, size=(96, 64), seed=1)
    return root


def test_layout_and_labels(dataset_root):
    for split, count in (('training', 6), ('validation', 3)):
        images = sorted(os.listdir(osp.join(dataset_root, 'images', split)))
        labels = sorted(os.listdir(osp.join(dataset_root, 'annotations', split)))
        assert len(images) == count and all(f.endswith('.jpg') for f in images)
        assert [f[:-4] for f in images] == [f[:-4] for f in labels]
    allowed = {0} | {v for v, _, _ in BACKGROUND_CLASSES + SHAPE_CLASSES}
    seen = set()
    for name in os.listdir(osp.join(dataset_root, 'annotations', 'training')):
        label = cv2.imread(
            osp.join(dataset_root, 'annotations', 'training', name), cv2.IMREAD_UNCHANGED)
        assert label.dtype == np.uint8 and label.shape == (64, 96)
        values = set(np.unique(label).tolist())
        assert values <= allowed
        assert 0 in values and len(values) >= 3  # boundary, background and at least one shape
        seen |= values
    assert len(seen) >= 5


def test_regions_are_distinguishable(dataset_root):
    """Each class has its own colour: per-class mean colours lie far apart."""
    means = {}
    for name in os.listdir(osp.join(dataset_root, 'images', 'training')):
        image = cv2.imread(osp.join(dataset_root, 'images', 'training', name)).astype(float)
        label = cv2.imread(
            osp.join(dataset_root, 'annotations', 'training', name.replace('.jpg', '.png')),
            cv2.IMREAD_UNCHANGED)
        for value in np.unique(label):
            if value:
                means.setdefault(int(value), []).append(image[label == value].mean(0))
    centres = {v: np.mean(m, 0) for v, m in means.items()}
    values = sorted(centres)
    gaps = [
        np.linalg.norm(centres[a] - centres[b]) for i, a in enumerate(values)
        for b in values[i + 1:]
    ]
    assert min(gaps) > 20


def test_same_seed_same_files(tmp_path, dataset_root):
    make_synthetic_ade20k(str(tmp_path), num_train=6, num_val=3, size=(96, 64), seed=1)
    name = 'annotations/validation/ADE_val_00000002.png'
    assert np.array_equal(
        cv2.imread(osp.join(dataset_root, name), cv2.IMREAD_UNCHANGED),
        cv2.imread(osp.join(str(tmp_path), name), cv2.IMREAD_UNCHANGED))


def test_mmseg_ade20k_dataset_reads_it(dataset_root):
    init_default_scope('mmseg')
    from mmseg.registry import DATASETS
    dataset = DATASETS.build(
        dict(
            type='ADE20KDataset',
            data_root=dataset_root,
            data_prefix=dict(img_path='images/validation', seg_map_path='annotations/validation'),
            pipeline=[
                dict(type='LoadImageFromFile'),
                dict(type='LoadAnnotations', reduce_zero_label=True),
                dict(type='PackSegInputs')
            ]))
    assert len(dataset) == 3 and len(dataset.metainfo['classes']) == 150
    sample = dataset[0]['data_samples']
    raw = cv2.imread(
        osp.join(dataset_root, 'annotations', 'validation', 'ADE_val_00000001.png'),
        cv2.IMREAD_UNCHANGED)
    reduced = sample.gt_sem_seg.data[0].numpy()
    assert np.array_equal(reduced[raw == 0], np.full((raw == 0).sum(), 255))
    assert np.array_equal(reduced[raw > 0], raw[raw > 0].astype(np.int64) - 1)


@pytest.mark.parametrize('kwargs, match', [
    (dict(num_train=0), 'num_train'),
    (dict(size=(16, 64)), 'size'),
])
def test_bad_arguments(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_synthetic_ade20k(str(tmp_path), **kwargs)
