# A Mask R-CNN that trains in minutes on a CPU: TransNeXt-Micro (from scratch) on the synthetic
# shapes dataset (configs/_base_/datasets/det_synthetic_coco_instance.py), with fewer proposals
# and RoIs than on COCO. Evaluates bbox and segm mAP with CocoMetric after every epoch.
_base_ = [
    '../_base_/models/mask-rcnn_transnext_fpn.py',
    '../_base_/datasets/det_synthetic_coco_instance.py',
    '../_base_/schedules/det_adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
num_classes = 3
model = dict(
    backbone=dict(arch='micro', img_size=160, drop_path_rate=0.1),
    neck=dict(in_channels=[48, 96, 192, 384]),
    roi_head=dict(bbox_head=dict(num_classes=num_classes), mask_head=dict(num_classes=num_classes)),
    train_cfg=dict(
        rpn_proposal=dict(nms_pre=500, max_per_img=200), rcnn=dict(sampler=dict(num=64))),
    test_cfg=dict(rpn=dict(nms_pre=300, max_per_img=100), rcnn=dict(max_per_img=50)))

max_epochs = 12
train_dataloader = dict(batch_size=4)
train_cfg = dict(max_epochs=max_epochs, val_interval=max_epochs)
# From scratch with a batch of 4: a larger learning rate and a short warm-up.
optim_wrapper = dict(optimizer=dict(lr=4e-4))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0, end=50),
    dict(
        type='MultiStepLR',
        begin=0,
        end=max_epochs,
        by_epoch=True,
        milestones=[int(max_epochs * 0.75)],
        gamma=0.1)
]
auto_scale_lr = dict(enable=False, base_batch_size=4)
default_hooks = dict(logger=dict(interval=5), checkpoint=dict(interval=max_epochs))
