# Copyright (c) transnext-mm contributors. All rights reserved.
"""Write a small synthetic COCO-format instance segmentation dataset.

Every image is a noisy, textured background with a few non-overlapping shapes on it. The shape
is the class (circle, square, triangle); each class also has its own colour family and texture,
so a detector learns it from a few dozen images. Masks are polygons (COCO ``segmentation``
lists), boxes are the polygons' extents, so mmdet's ``CocoDataset`` and ``CocoMetric`` (bbox and
segm mAP from pycocotools) read the set unchanged::

    OUT/train/000000.png ...          OUT/annotations/instances_train.json
    OUT/val/000000.png ...            OUT/annotations/instances_val.json

The output depends only on the arguments: the same ``--seed`` writes the same files.

Example::

    python tools/dataset_converters/make_synthetic_coco.py --out data/synthetic_coco \\
        --num-train 64 --num-val 16 --size 160 160
"""
import argparse
import json
import math
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import cv2
import numpy as np
from pycocotools import mask as mask_utils

# name -> (BGR colour the class's colours are drawn around, texture)
CLASSES: Dict[str, Tuple[Tuple[int, int, int], str]] = {
    'circle': ((50, 60, 210), 'plain'),
    'square': ((60, 190, 70), 'stripes'),
    'triangle': ((210, 120, 40), 'checker'),
}
SPLITS = ('train', 'val')
CIRCLE_VERTICES = 32


def _polygon(shape: str, cx: float, cy: float, radius: float, angle: float) -> np.ndarray:
    """Vertices (K, 2) in (x, y) of a shape centred at (cx, cy) with circumradius ``radius``."""
    vertices = {'circle': CIRCLE_VERTICES, 'square': 4, 'triangle': 3}[shape]
    theta = angle + np.arange(vertices) * 2 * math.pi / vertices
    return np.stack([cx + radius * np.cos(theta), cy + radius * np.sin(theta)], axis=1)


def _texture(kind: str, color: np.ndarray, height: int, width: int,
             rng: np.random.Generator) -> np.ndarray:
    """A (height, width, 3) float32 BGR texture."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32)
    if kind == 'plain':
        shade = np.ones_like(xx)
    elif kind == 'stripes':
        shade = np.where(((xx + yy) // 3) % 2 == 0, 1.0, 0.6)
    elif kind == 'checker':
        shade = np.where(((xx // 4 + yy // 4) % 2) == 0, 1.0, 0.65)
    else:
        raise ValueError(f'texture must be plain, stripes or checker, got {kind!r}')
    texture = shade[..., None] * color[None, None, :]
    return texture + rng.normal(0, 8, texture.shape)


def _background(height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """Grey-ish gradient with blotches and sensor noise, float32 BGR."""
    low, high = rng.uniform(60, 190, 3), rng.uniform(60, 190, 3)
    ramp = np.linspace(0, 1, width, dtype=np.float32)[None, :, None]
    image = np.broadcast_to(low + (high - low) * ramp, (height, width, 3)).copy()
    blotches = cv2.GaussianBlur(
        rng.normal(0, 40, (height // 8 + 1, width // 8 + 1, 3)), (0, 0), 1.0)
    image += cv2.resize(blotches.astype(np.float32), (width, height))
    return image + rng.normal(0, 12, image.shape)


def _place_objects(height: int, width: int, num_objects: int, min_size: int, max_size: int,
                   rng: np.random.Generator) -> List[Tuple[str, np.ndarray]]:
    """Draw shapes whose boxes (with a margin) do not overlap, so every polygon is exact."""
    names = list(CLASSES)
    boxes, objects = [], []
    for _ in range(num_objects * 20):  # rejection sampling; gives up on crowded images
        if len(objects) == num_objects:
            break
        shape = names[rng.integers(len(names))]
        radius = rng.uniform(min_size, max_size) / 2
        cx, cy = rng.uniform(radius, width - radius), rng.uniform(radius, height - radius)
        polygon = _polygon(shape, cx, cy, radius, rng.uniform(0, 2 * math.pi))
        polygon[:, 0] = polygon[:, 0].clip(0, width - 1)
        polygon[:, 1] = polygon[:, 1].clip(0, height - 1)
        x1, y1 = polygon.min(axis=0) - 2
        x2, y2 = polygon.max(axis=0) + 2
        if any(x1 < bx2 and bx1 < x2 and y1 < by2 and by1 < y2 for bx1, by1, bx2, by2 in boxes):
            continue
        boxes.append((x1, y1, x2, y2))
        objects.append((shape, polygon))
    return objects


def make_image(height: int, width: int, max_objects: int, min_size: int, max_size: int,
               rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[str, np.ndarray]]]:
    """One image (uint8 BGR) and its objects as (class name, polygon (K, 2) in x, y)."""
    image = _background(height, width, rng)
    objects = _place_objects(height, width, int(rng.integers(1, max_objects + 1)), min_size,
                             max_size, rng)
    for shape, polygon in objects:
        base, texture = CLASSES[shape]
        color = np.clip(np.array(base, np.float32) + rng.uniform(-30, 30, 3), 0, 255)
        mask = np.zeros((height, width), np.uint8)
        cv2.fillPoly(mask, [np.round(polygon).astype(np.int32)], 1)
        inside = mask.astype(bool)
        image[inside] = _texture(texture, color, height, width, rng)[inside]
    return np.clip(image, 0, 255).astype(np.uint8), objects


def _annotation(polygon: np.ndarray, height: int, width: int) -> dict:
    """COCO ``segmentation``, ``bbox`` and ``area`` of one polygon (area as pycocotools)."""
    flat = [round(float(v), 2) for v in polygon.reshape(-1)]
    rle = mask_utils.merge(mask_utils.frPyObjects([flat], height, width))
    x1, y1 = polygon.min(axis=0)
    x2, y2 = polygon.max(axis=0)
    return dict(
        segmentation=[flat],
        area=float(mask_utils.area(rle)),
        bbox=[
            round(float(x1), 2),
            round(float(y1), 2),
            round(float(x2 - x1), 2),
            round(float(y2 - y1), 2)
        ],
        iscrowd=0)


def make_split(out_dir: str, split: str, num_images: int, size: Sequence[int], max_objects: int,
               min_size: int, max_size: int, rng: np.random.Generator) -> dict:
    """Write one split's images under ``out_dir/split`` and return its COCO dict."""
    width, height = size
    os.makedirs(osp.join(out_dir, split), exist_ok=True)
    categories = [
        dict(id=i + 1, name=name, supercategory='shape') for i, name in enumerate(CLASSES)
    ]
    category_ids = {c['name']: c['id'] for c in categories}
    images, annotations = [], []
    for index in range(num_images):
        image, objects = make_image(height, width, max_objects, min_size, max_size, rng)
        file_name = f'{index:06d}.png'
        cv2.imwrite(osp.join(out_dir, split, file_name), image)
        images.append(dict(id=index + 1, file_name=file_name, height=height, width=width))
        for shape, polygon in objects:
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=index + 1,
                    category_id=category_ids[shape],
                    **_annotation(polygon, height, width)))
    return dict(
        info=dict(description=f'transnext-mm synthetic shapes, {split} split'),
        licenses=[],
        images=images,
        annotations=annotations,
        categories=categories)


def make_synthetic_coco(out_dir: str,
                        num_train: int = 64,
                        num_val: int = 16,
                        size: Sequence[int] = (160, 160),
                        max_objects: int = 4,
                        min_size: int = 24,
                        max_size: int = 64,
                        seed: int = 0) -> Dict[str, str]:
    """Write the dataset; returns the annotation file of each split.

    Args:
        out_dir (str): Output folder (the config's ``data_root``).
        num_train (int): Training images. Defaults to 64.
        num_val (int): Validation images. Defaults to 16.
        size (Sequence[int]): Image (width, height). Defaults to (160, 160).
        max_objects (int): At most this many objects per image (at least one). Defaults to 4.
        min_size (int): Smallest object diameter in pixels. Defaults to 24.
        max_size (int): Largest object diameter in pixels. Defaults to 64.
        seed (int): Random seed; the output depends only on the arguments. Defaults to 0.
    """
    if num_train < 1 or num_val < 1:
        raise ValueError(f'num_train and num_val must be >= 1, got {num_train} and {num_val}')
    if len(size) != 2 or min(size) < 32:
        raise ValueError(f'size must be (width, height) with both >= 32, got {tuple(size)}')
    if max_objects < 1:
        raise ValueError(f'max_objects must be >= 1, got {max_objects}')
    if not 8 <= min_size <= max_size <= min(size):
        raise ValueError(f'need 8 <= min_size <= max_size <= min(size) = {min(size)}, got '
                         f'min_size={min_size} and max_size={max_size}')
    rng = np.random.default_rng(seed)
    ann_files = {}
    for split, num_images in zip(SPLITS, (num_train, num_val)):
        coco = make_split(out_dir, split, num_images, size, max_objects, min_size, max_size, rng)
        ann_file = osp.join(out_dir, 'annotations', f'instances_{split}.json')
        os.makedirs(osp.dirname(ann_file), exist_ok=True)
        with open(ann_file, 'w') as f:
            json.dump(coco, f)
        ann_files[split] = ann_file
    return ann_files


def parse_args(argv: Optional[List[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('--out', default='data/synthetic_coco', help='output folder')
    parser.add_argument('--num-train', type=int, default=64, help='training images')
    parser.add_argument('--num-val', type=int, default=16, help='validation images')
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        default=(160, 160),
        metavar=('WIDTH', 'HEIGHT'),
        help='image size')
    parser.add_argument('--max-objects', type=int, default=4, help='max objects per image')
    parser.add_argument('--min-size', type=int, default=24, help='min object diameter')
    parser.add_argument('--max-size', type=int, default=64, help='max object diameter')
    parser.add_argument('--seed', type=int, default=0, help='random seed')
    return parser.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> None:
    args = parse_args(argv)
    ann_files = make_synthetic_coco(args.out, args.num_train, args.num_val, args.size,
                                    args.max_objects, args.min_size, args.max_size, args.seed)
    for split, ann_file in ann_files.items():
        with open(ann_file) as f:
            coco = json.load(f)
        print(f'{split}: {len(coco["images"])} images, {len(coco["annotations"])} objects '
              f'-> {ann_file}')


if __name__ == '__main__':
    main()
