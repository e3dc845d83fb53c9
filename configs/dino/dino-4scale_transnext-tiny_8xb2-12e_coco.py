# DINO with TransNeXt-Tiny and four feature levels: stages 2-4 (strides 8-32) plus one extra
# level from the neck.
_base_ = './dino-5scale_transnext-tiny_8xb2-12e_coco.py'

num_levels = 4
model = dict(
    num_feature_levels=num_levels,
    backbone=dict(out_indices=(1, 2, 3)),
    neck=dict(in_channels=[144, 288, 576], num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))))
