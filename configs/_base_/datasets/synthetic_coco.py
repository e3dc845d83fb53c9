# The synthetic COCO-format shapes dataset of tools/dataset_converters/make_synthetic_coco.py
# (160x160 images, 3 classes, boxes and polygon masks), read by mmdet's CocoDataset and scored by
# CocoMetric like COCO itself; boxes-only settings. Generate it with:
#   python tools/dataset_converters/make_synthetic_coco.py --out data/synthetic_coco
#
# Detector configs such as DINO's already hold COCO's dataset section, and mmengine does not let
# two bases of one config define the same key. So this file defines only `synthetic_coco_*`
# variables, which a config listing it applies over COCO's settings:
#   train_dataloader = _base_.synthetic_coco_train_dataloader
# det_synthetic_coco_detection.py does this for configs whose other bases hold no dataset section.
synthetic_coco_root = 'data/synthetic_coco/'
synthetic_coco_metainfo = dict(
    classes=('circle', 'square', 'triangle'), palette=[(220, 20, 60), (0, 160, 60), (40, 90, 230)])
synthetic_coco_scale = (160, 160)

synthetic_coco_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(type='Resize', scale=synthetic_coco_scale, keep_ratio=True),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackDetInputs')
]
synthetic_coco_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=synthetic_coco_scale, keep_ratio=True),
    dict(type='LoadAnnotations', with_bbox=True),
    dict(
        type='PackDetInputs',
        meta_keys=('img_id', 'img_path', 'ori_shape', 'img_shape', 'scale_factor'))
]
# Images are tiny: load them in the main process.
synthetic_coco_train_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=synthetic_coco_root,
        metainfo=synthetic_coco_metainfo,
        ann_file='annotations/instances_train.json',
        data_prefix=dict(img='train/'),
        pipeline=synthetic_coco_train_pipeline))
synthetic_coco_val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(
        data_root=synthetic_coco_root,
        metainfo=synthetic_coco_metainfo,
        ann_file='annotations/instances_val.json',
        data_prefix=dict(img='val/'),
        pipeline=synthetic_coco_test_pipeline))
synthetic_coco_evaluator = dict(ann_file=synthetic_coco_root + 'annotations/instances_val.json')
