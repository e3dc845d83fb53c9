# Mask2Former with a TransNeXt backbone on ADE20K: mmseg's Mask2Former recipe (160k iterations,
# 8 GPUs x 2 images, AdamW lr 1e-4, weight decay 0.05) with the backbone swapped; TransNeXt-Tiny.
_base_ = 'mmseg::mask2former/mask2former_r50_8xb2-160k_ade20k-512x512.py'
# mmdet.models: the pixel decoder, losses and assigners; transnext_mm: the backbone.
custom_imports = dict(imports=['mmdet.models', 'transnext_mm'], allow_failed_imports=False)
model = dict(
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        img_size=512,
        pretrain_size=224,
        pos_bias_mode='interpolate',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3),
    decode_head=dict(in_channels=[72, 144, 288, 576]))

# The backbone learns at 0.1x the learning rate. Its query embedding, local position bias, log-CPB
# MLP, temperature and norm layers get no weight decay. mmengine applies only the longest key found
# in a parameter's name, so each no-decay key repeats lr_mult=0.1 and is longer than 'backbone';
# none of them occurs in the names of the Mask2Former head.
backbone_no_decay = dict(lr_mult=0.1, decay_mult=0.0)
optim_wrapper = dict(
    paramwise_cfg=dict(
        custom_keys={
            'backbone': dict(lr_mult=0.1, decay_mult=1.0),
            'attn.query_embedding': backbone_no_decay,
            'attn.relative_pos_bias_local': backbone_no_decay,
            'attn.cpb_fc': backbone_no_decay,
            'attn.temperature': backbone_no_decay,
            'attn.norm.': backbone_no_decay,  # norm of the pooled features
            'backbone.norm': backbone_no_decay,  # stage norms
            **{
                f'backbone.patch_embed{i}.norm': backbone_no_decay
                for i in range(1, 5)
            },
            **{
                f'norm{i}.{p}': backbone_no_decay
                for i in (1, 2)
                for p in ('weight', 'bias')
            },
        },
        norm_decay_mult=0.0))
