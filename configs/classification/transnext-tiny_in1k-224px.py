# TransNeXt-Tiny on ImageNet-1k at 224x224 (paper: 28.2M params, 5.7G FLOPs, 84.0 top-1).
# Evaluate the released checkpoint as is (converted on load by TransNeXtClassifier):
#   python tools/test.py configs/classification/transnext-tiny_in1k-224px.py \
#       transnext_tiny_224_1k.pth
# Train (the paper: DeiT recipe, batch 1024 = 8 GPUs x 128):
#   bash tools/dist_train.sh configs/classification/transnext-tiny_in1k-224px.py 8
_base_ = [
    'mmpretrain::_base_/datasets/imagenet_bs64_swin_224.py',
    'mmpretrain::_base_/schedules/imagenet_bs1024_adamw_swin.py',
    'mmpretrain::_base_/default_runtime.py',
]
custom_imports = dict(
    imports=['transnext_mm', 'transnext_mm.models.classifiers'], allow_failed_imports=False)

model = dict(
    type='TransNeXtClassifier',
    backbone=dict(
        type='TransNeXt',
        arch='tiny',
        img_size=224,
        pretrain_size=224,
        out_indices=(3, ),
        drop_path_rate=0.25),
    # The released classifier: last-stage norm -> global average pool -> Linear.
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=576,
        loss=dict(type='LabelSmoothLoss', label_smooth_val=0.1, mode='original'),
        cal_acc=False,
        init_cfg=dict(type='TruncNormal', layer='Linear', std=0.02, bias=0.)),
    train_cfg=dict(augments=[dict(type='Mixup', alpha=0.8),
                             dict(type='CutMix', alpha=1.0)]),
)

# The paper's evaluation: PIL decoding, bicubic resize of the short side to 256 (crop ratio
# 0.875), 224 centre crop; ImageNet mean/std come from the dataset base's data_preprocessor.
test_pipeline = [
    dict(type='LoadImageFromFile', imdecode_backend='pillow'),
    dict(type='ResizeEdge', scale=256, edge='short', backend='pillow', interpolation='bicubic'),
    dict(type='CenterCrop', crop_size=224),
    dict(type='PackInputs'),
]
# DeiT training: repeated augmentation; the base's pipeline is the DeiT one (RandAugment m9,
# mstd 0.5, random erasing 0.25).
train_dataloader = dict(batch_size=128, sampler=dict(type='RepeatAugSampler', shuffle=True))
val_dataloader = dict(dataset=dict(pipeline=test_pipeline))
test_dataloader = val_dataloader

# AdamW, lr 1e-3 at batch 1024, wd 0.05 except norms, biases and the attention's query
# embedding, local position bias, log-CPB MLP and temperature; gradient clipping at 1.0.
optim_wrapper = dict(
    clip_grad=dict(max_norm=1.0),
    paramwise_cfg=dict(
        _delete_=True,
        norm_decay_mult=0.0,
        bias_decay_mult=0.0,
        flat_decay_mult=0.0,
        custom_keys={
            'query_embedding': dict(decay_mult=0.0),
            'relative_pos_bias_local': dict(decay_mult=0.0),
            'cpb': dict(decay_mult=0.0),
            'temperature': dict(decay_mult=0.0),
        }))
# 5 warm-up epochs from 1e-6, then cosine to 1e-5 over the 300 epochs.
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=True, end=5, convert_to_iter_based=True),
    dict(type='CosineAnnealingLR', eta_min=1e-5, by_epoch=True, begin=5),
]
default_hooks = dict(checkpoint=dict(max_keep_ckpts=3, save_best='auto'))
