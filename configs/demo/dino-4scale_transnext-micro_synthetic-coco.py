# A 4-scale DINO that runs on a CPU: TransNeXt-Micro (from scratch), 100 queries, on the synthetic
# shapes dataset of tools/dataset_converters/make_synthetic_coco.py (boxes only). DETR-style
# detectors learn slowly; this config exists to exercise DINO's training and testing end to end.
_base_ = [
    '../dino/dino-5scale_transnext-tiny_8xb2-12e_coco.py', '../_base_/datasets/synthetic_coco.py'
]

num_levels = 4
num_classes = 3
model = dict(
    num_queries=100,
    num_feature_levels=num_levels,
    backbone=dict(
        arch='micro', img_size=160, drop_path_rate=0.1, out_indices=(1, 2, 3), init_cfg=None),
    neck=dict(in_channels=[96, 192, 384], num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))),
    bbox_head=dict(num_classes=num_classes),
    dn_cfg=dict(group_cfg=dict(num_dn_queries=20)),
    test_cfg=dict(max_per_img=100))

# The synthetic dataset's boxes-only section over the DINO config's COCO one.
data_root = _base_.synthetic_coco_root
metainfo = _base_.synthetic_coco_metainfo
image_scale = _base_.synthetic_coco_scale
train_pipeline = _base_.synthetic_coco_train_pipeline
test_pipeline = _base_.synthetic_coco_test_pipeline
train_dataloader = dict(batch_size=4, **_base_.synthetic_coco_train_dataloader)
val_dataloader = test_dataloader = _base_.synthetic_coco_val_dataloader
val_evaluator = test_evaluator = _base_.synthetic_coco_evaluator

max_epochs = 12
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
param_scheduler = [
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[int(max_epochs * 0.75)],
        gamma=0.1)
]
auto_scale_lr = dict(base_batch_size=4)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=max_epochs))
