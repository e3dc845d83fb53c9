# Copyright (c) transnext-mm contributors. All rights reserved.
"""Write a small synthetic dataset in the ADE20K (ADEChallengeData2016) layout.

Each image is a textured background with a few textured, coloured shapes on it; every class has
its own colour and texture, so a segmenter can learn the classes from a few dozen images. The
layout and label encoding are ADE20K's, so mmseg's ``ADE20KDataset`` reads it unchanged::

    OUT/images/training/*.jpg       OUT/annotations/training/*.png
    OUT/images/validation/*.jpg     OUT/annotations/validation/*.png

Label PNGs are single-channel uint8: 0 is "other" (ignored: ``reduce_zero_label=True`` turns it
into 255) and ``k`` in 1..150 is ADE20K class ``k - 1``. Shapes get a thin 0-valued outline, like
the unlabelled boundaries of real ADE20K annotations.

Example::

    python tools/dataset_converters/make_synthetic_ade20k.py --out data/synthetic_ade20k \\
        --num-train 48 --num-val 12 --size 160 128
"""
import argparse
import os
import os.path as osp
from typing import List, Sequence, Tuple

import cv2
import numpy as np

# (ADE20K label value in the PNG = class index + 1, BGR colour, texture). The class names are
# ADE20K's: 1 wall, 3 sky, 4 floor, 5 tree, 10 grass, 13 person, 21 car, 22 water.
BACKGROUND_CLASSES = ((1, (170, 180, 190), 'plain'), (3, (235, 190, 120), 'gradient'),
                      (4, (70, 110, 150), 'checker'), (10, (60, 160, 70), 'noise'))
SHAPE_CLASSES = ((5, (40, 110, 30), 'stripes'), (13, (120, 150, 230), 'plain'),
                 (21, (40, 40, 200), 'checker'), (22, (160, 90, 20), 'waves'))
SHAPES = ('rectangle', 'ellipse', 'triangle')


def _texture(kind: str, color: Sequence[int], height: int, width: int,
             rng: np.random.Generator) -> np.ndarray:
    """A (height, width, 3) uint8 BGR texture of one class."""
    base = np.empty((height, width, 3), np.float32)
    base[:] = color
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 'gradient':
        base *= (0.75 + 0.35 * yy / max(height - 1, 1))[..., None]
    elif kind == 'checker':
        period = 8
        base *= np.where(((yy // period + xx // period) % 2) == 0, 1.0, 0.6)[..., None]
    elif kind == 'stripes':
        base *= np.where(((xx + yy) // 4) % 2 == 0, 1.0, 0.55)[..., None]
    elif kind == 'waves':
        base *= (0.8 + 0.2 * np.sin(xx / 3.0 + 2 * np.sin(yy / 7.0)))[..., None]
    elif kind == 'noise':
        base *= rng.uniform(0.7, 1.1, (height, width, 1)).astype(np.float32)
    elif kind != 'plain':
        raise ValueError(f'unknown texture {kind!r}')
    base += rng.normal(0, 6, base.shape).astype(np.float32)  # sensor noise
    return np.clip(base, 0, 255).astype(np.uint8)


def _shape_mask(shape: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    mask = np.zeros((height, width), np.uint8)
    h = int(rng.integers(height // 5, height // 2 + 1))
    w = int(rng.integers(width // 5, width // 2 + 1))
    top = int(rng.integers(0, height - h + 1))
    left = int(rng.integers(0, width - w + 1))
    if shape == 'rectangle':
        cv2.rectangle(mask, (left, top), (left + w - 1, top + h - 1), 1, thickness=-1)
    elif shape == 'ellipse':
        cv2.ellipse(mask, (left + w // 2, top + h // 2), (w // 2, h // 2), 0, 0, 360, 1, -1)
    else:
        points = np.array([[left + w // 2, top], [left, top + h - 1], [left + w - 1, top + h - 1]])
        cv2.fillPoly(mask, [points.astype(np.int32)], 1)
    return mask.astype(bool)


def make_sample(rng: np.random.Generator,
                width: int,
                height: int,
                max_shapes: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Return one (BGR image, label PNG array) pair."""
    label_value, color, kind = BACKGROUND_CLASSES[rng.integers(len(BACKGROUND_CLASSES))]
    image = _texture(kind, color, height, width, rng)
    label = np.full((height, width), label_value, np.uint8)
    outline = np.zeros((height, width), bool)
    for _ in range(int(rng.integers(1, max_shapes + 1))):
        label_value, color, kind = SHAPE_CLASSES[rng.integers(len(SHAPE_CLASSES))]
        mask = _shape_mask(SHAPES[rng.integers(len(SHAPES))], height, width, rng)
        image[mask] = _texture(kind, color, height, width, rng)[mask]
        label[mask] = label_value
        edge = cv2.morphologyEx(mask.astype(np.uint8), cv2.MORPH_GRADIENT, np.ones((3, 3)))
        outline = (outline & ~mask) | edge.astype(bool)
    label[outline] = 0  # unlabelled boundary ("other"), ignored in training and evaluation
    return image, label


def make_synthetic_ade20k(out_dir: str,
                          num_train: int = 48,
                          num_val: int = 12,
                          size: Sequence[int] = (160, 128),
                          seed: int = 0) -> List[str]:
    """Write the dataset and return the paths of the written images.

    Args:
        out_dir (str): Dataset root (``data_root`` of the configs).
        num_train (int): Training images. Defaults to 48.
        num_val (int): Validation images. Defaults to 12.
        size (Sequence[int]): Image (width, height). Defaults to (160, 128).
        seed (int): Random seed; the same seed writes the same files. Defaults to 0.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train} and {num_val}')
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f'size must be (width, height) with both >= 32, got {tuple(size)}')
    width, height = (int(s) for s in size)
    rng = np.random.default_rng(seed)
    written = []
    for split, count in (('training', num_train), ('validation', num_val)):
        img_dir = osp.join(out_dir, 'images', split)
        ann_dir = osp.join(out_dir, 'annotations', split)
        os.makedirs(img_dir, exist_ok=True)
        os.makedirs(ann_dir, exist_ok=True)
        prefix = 'ADE_train' if split == 'training' else 'ADE_val'
        for i in range(count):
            image, label = make_sample(rng, width, height)
            name = f'{prefix}_{i + 1:08d}'
            img_path = osp.join(img_dir, name + '.jpg')
            if not cv2.imwrite(img_path, image, [cv2.IMWRITE_JPEG_QUALITY, 95]):
                raise OSError(f'could not write {img_path}')
            if not cv2.imwrite(osp.join(ann_dir, name + '.png'), label):
                raise OSError(f'could not write {osp.join(ann_dir, name + ".png")}')
            written.append(img_path)
    return written


def parse_args():
    parser = argparse.ArgumentParser(
        description='Write a small synthetic dataset in the ADE20K layout (for demos and tests)')
    parser.add_argument('--out', default='data/synthetic_ade20k', help='dataset root')
    parser.add_argument('--num-train', type=int, default=48, help='training images')
    parser.add_argument('--num-val', type=int, default=12, help='validation images')
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        default=(160, 128),
        metavar=('WIDTH', 'HEIGHT'),
        help='image size')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args()


def main():
    args = parse_args()
    paths = make_synthetic_ade20k(args.out, args.num_train, args.num_val, args.size, args.seed)
    classes = sorted({v for v, _, _ in BACKGROUND_CLASSES + SHAPE_CLASSES})
    print(f'wrote {len(paths)} images ({args.num_train} train, {args.num_val} val) of '
          f'{args.size[0]}x{args.size[1]} to {args.out}; ADE20K label values {classes}')


if __name__ == '__main__':
    main()
