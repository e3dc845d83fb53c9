# Copyright (c) transnext-mm contributors. All rights reserved.
"""tools/dataset_converters/make_synthetic_coco.py: valid COCO, deterministic, learnable."""
import filecmp
import importlib.util
import json
import os.path as osp

import cv2
import numpy as np
import pytest
from pycocotools.coco import COCO

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def load_generator():
    path = osp.join(ROOT, 'tools/dataset_converters/make_synthetic_coco.py')
    spec = importlib.util.spec_from_file_location('make_synthetic_coco', path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


generator = load_generator()


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
    root = str(tmp_path_factory.mktemp('coco'))
    generator.main(['--out', root, '--num-train', '12', '--num-val', '4', '--size', '128', '96'])
    return root


def test_coco_format(dataset):
    for split, num_images in (('train', 12), ('val', 4)):
        coco = COCO(osp.join(dataset, 'annotations', f'instances_{split}.json'))
        assert [c['name']
                for c in coco.loadCats(coco.getCatIds())] == ['circle', 'square', 'triangle']
        assert len(coco.getImgIds()) == num_images
        for image in coco.loadImgs(coco.getImgIds()):
            assert (image['width'], image['height']) == (128, 96)
            assert cv2.imread(osp.join(dataset, split, image['file_name'])).shape == (96, 128, 3)
            annotations = coco.loadAnns(coco.getAnnIds(imgIds=image['id']))
            assert 1 <= len(annotations) <= 4
            for ann in annotations:
                mask = coco.annToMask(ann)
                ys, xs = np.nonzero(mask)
                x, y, w, h = ann['bbox']
                assert ann['iscrowd'] == 0 and ann['area'] == mask.sum() > 0
                # The box is the polygon's extent: it holds the rasterised mask.
                assert x - 1 <= xs.min() and xs.max() <= x + w + 1
                assert y - 1 <= ys.min() and ys.max() <= y + h + 1


def test_classes_have_distinct_looks(dataset):
    """Each class's pixels are drawn around its own colour (BGR: red, green, blue shapes)."""
    coco = COCO(osp.join(dataset, 'annotations', 'instances_train.json'))
    pixels = {c: [] for c in coco.getCatIds()}
    for image in coco.loadImgs(coco.getImgIds()):
        bgr = cv2.imread(osp.join(dataset, 'train', image['file_name'])).astype(np.float32)
        for ann in coco.loadAnns(coco.getAnnIds(imgIds=image['id'])):
            pixels[ann['category_id']].append(bgr[coco.annToMask(ann).astype(bool)])
    dominant = {c: int(np.concatenate(p).mean(axis=0).argmax()) for c, p in pixels.items() if p}
    assert dominant == {1: 2, 2: 1, 3: 0}  # circle red, square green, triangle blue


def test_deterministic(dataset, tmp_path):
    generator.main([
        '--out',
        str(tmp_path / 'same'), '--num-train', '12', '--num-val', '4', '--size', '128', '96'
    ])
    generator.main([
        '--out',
        str(tmp_path / 'other'), '--num-train', '12', '--num-val', '4', '--size', '128', '96',
        '--seed', '1'
    ])
    ann = osp.join('annotations', 'instances_train.json')
    assert filecmp.cmp(osp.join(dataset, ann), str(tmp_path / 'same' / ann), shallow=False)
    assert filecmp.cmp(
        osp.join(dataset, 'val', '000003.png'),
        str(tmp_path / 'same' / 'val' / '000003.png'),
        shallow=False)
    with open(osp.join(dataset, ann)) as f, open(tmp_path / 'other' / ann) as g:
        assert json.load(f)['annotations'] != json.load(g)['annotations']


@pytest.mark.parametrize('kwargs, message', [
    (dict(num_train=0), 'num_train and num_val must be >= 1'),
    (dict(size=(16, 64)), r'size must be \(width, height\) with both >= 32'),
    (dict(max_objects=0), 'max_objects must be >= 1'),
    (dict(min_size=50, max_size=40), 'need 8 <= min_size <= max_size'),
])
def test_bad_arguments(tmp_path, kwargs, message):
    with pytest.raises(ValueError, match=message):
        generator.make_synthetic_coco(str(tmp_path), **kwargs)
