# The synthetic ADE20K-format dataset of tools/dataset_converters/make_synthetic_ade20k.py
# (160x128 images by default), read by mmseg's ADE20KDataset and scored by IoUMetric like ADE20K
# itself. Generate it with:
#   python tools/dataset_converters/make_synthetic_ade20k.py --out data/synthetic_ade20k
# The images are about 4 times smaller than ADE20K's: so are the scales (see ade20k.py).
#
# The segmentor configs that the demos inherit already hold ADE20K's dataset section, and mmengine
# does not let two bases of one config define the same key. So this file defines only
# `synthetic_ade20k_*` variables, which a config listing it applies over ADE20K's settings:
#   train_dataloader = _base_.synthetic_ade20k_train_dataloader
synthetic_ade20k_root = 'data/synthetic_ade20k'
synthetic_ade20k_crop_size = (128, 128)

synthetic_ade20k_train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='RandomResize', scale=(512, 128), ratio_range=(0.75, 1.5), keep_ratio=True),
    dict(type='RandomCrop', crop_size=synthetic_ade20k_crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
synthetic_ade20k_test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='Resize', scale=(512, 128), keep_ratio=True),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(type='PackSegInputs')
]
# Multi-scale + flip test (tools/test.py --tta): ADE20K's ratios of the test scale.
synthetic_ade20k_tta_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale=(int(512 * r), int(128 * r)), keep_ratio=True)
                for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)
            ],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='LoadAnnotations')],
            [dict(type='PackSegInputs')],
        ])
]
# Images are tiny: batches of 4, loaded in the main process.
synthetic_ade20k_train_dataloader = dict(
    batch_size=4,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=synthetic_ade20k_root, pipeline=synthetic_ade20k_train_pipeline))
synthetic_ade20k_val_dataloader = dict(
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root=synthetic_ade20k_root, pipeline=synthetic_ade20k_test_pipeline))
