# DINO with a TransNeXt-Tiny backbone and five feature levels (the four stages, strides 4-32,
# plus one extra level from the neck), 12 epochs. The 4-scale and the larger variants inherit it.
_base_ = 'mmdet::dino/dino-4scale_r50_8xb2-12e_coco.py'

custom_imports = dict(imports=['transnext_mm'], allow_failed_imports=False)

# Released ImageNet-1K weights: a URL or a local path (or override with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH).
pretrained = 'https://huggingface.co/DaiShiResearch/transnext-tiny-224-1k/resolve/main/transnext_tiny_224_1k.pth'  # noqa
num_levels = 5
model = dict(
    num_feature_levels=num_levels,
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        img_size=800,  # size at which 'interpolate' tabulates the pooled-path position bias
        pretrain_size=224,
        pos_bias_mode='interpolate',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3,
        init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[72, 144, 288, 576], num_outs=num_levels),
    encoder=dict(layer_cfg=dict(self_attn_cfg=dict(num_levels=num_levels))),
    decoder=dict(layer_cfg=dict(cross_attn_cfg=dict(num_levels=num_levels))))

# mmdet's DINO optimizer (AdamW lr 1e-4, gradient clipping at 0.1, backbone lr x0.1) with
# TransNeXt's weight decay of 0.05, which the backbone's query embeddings, local position
# biases, log-CPB MLPs, attention temperatures and norm layers do not get. mmengine applies only
# the longest custom key contained in a parameter's name, so every no-decay key is longer than
# 'backbone' and keeps its lr_mult=0.1. The keys match backbone parameters only: the detector's
# own `query_embedding` is not preceded by `attn.`, its norms are `norms.N`, `decoder.norm` and
# GroupNorms `gn`.
backbone_no_decay = dict(lr_mult=0.1, decay_mult=0.)
optim_wrapper = dict(
    optimizer=dict(weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1),
            'attn.query_embedding': backbone_no_decay,
            'attn.relative_pos_bias_local': backbone_no_decay,
            'attn.cpb_fc': backbone_no_decay,
            'attn.temperature': backbone_no_decay,
            'attn.norm.': backbone_no_decay,
            '.norm1.weight': backbone_no_decay,
            '.norm1.bias': backbone_no_decay,
            '.norm2.weight': backbone_no_decay,
            '.norm2.bias': backbone_no_decay,
            'backbone.norm': backbone_no_decay,
            'patch_embed1.norm': backbone_no_decay,
            'patch_embed2.norm': backbone_no_decay,
            'patch_embed3.norm': backbone_no_decay,
            'patch_embed4.norm': backbone_no_decay,
        }))
