# TransNeXt-Small fine-tuned on ImageNet-1k at 384x384 (paper: 49.7M params, 32.1G FLOPs,
# 86.0 top-1). Differences from the 224px TransNeXt-Tiny config (Small differs from Tiny only in
# arch and drop path), following the released fine-tuning: 5 epochs from the 224px weights at a
# constant lr of 1e-5, drop path 0.7, Mixup without CutMix.
#   python tools/test.py configs/classification/transnext-small_in1k-384px.py \
#       transnext_small_384_1k_ft_1k.pth
#   bash tools/dist_train.sh configs/classification/transnext-small_in1k-384px.py 8 \
#       --cfg-options load_from=transnext_small_224_1k.pth
_base_ = './transnext-tiny_in1k-224px.py'

# The released 384px models were fine-tuned with the log-CPB coordinates of the 224px
# pretraining (pretrain_size=224); img_size=384 tabulates the position bias at 384.
model = dict(
    backbone=dict(arch='small', img_size=384, pretrain_size=224, drop_path_rate=0.7),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8)]))

train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='RandomResizedCrop', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(
        type='RandAugment',
        policies='timm_increasing',
        num_policies=2,
        total_level=10,
        magnitude_level=9,
        magnitude_std=0.5,
        hparams=dict(pad_val=[104, 116, 124], interpolation='bicubic')),
    dict(
        type='RandomErasing',
        erase_prob=0.25,
        mode='rand',
        min_area_ratio=0.02,
        max_area_ratio=1 / 3,
        fill_color=[103.53, 116.28, 123.675],
        fill_std=[57.375, 57.12, 58.395]),
    dict(type='PackInputs'),
]
# At 384 and above the paper warps the whole image to 384x384 (no crop).
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow'),
    dict(type='Resize', scale=384, backend='pillow', interpolation='bicubic'),
    dict(type='PackInputs'),
]
train_dataloader = dict(dataset=dict(pipeline=train_pipeline))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

optim_wrapper = dict(optimizer=dict(lr=1e-5))
param_scheduler = [dict(type='ConstantLR', factor=1.0, by_epoch=True)]
train_cfg = dict(max_epochs=5)
