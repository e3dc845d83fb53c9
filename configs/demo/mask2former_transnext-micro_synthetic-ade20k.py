# Small Mask2Former + TransNeXt-Micro (from scratch) on the synthetic ADE20K-format dataset written
# by tools/dataset_converters/make_synthetic_ade20k.py, with a narrow (64-channel), shallow head
# so that it trains on a CPU:
#   python tools/train.py configs/demo/mask2former_transnext-micro_synthetic-ade20k.py
_base_ = ['../_base_/models/mask2former_transnext.py', '../_base_/datasets/synthetic_ade20k.py']
# The synthetic dataset's section over the Mask2Former config's ADE20K one.
data_root = _base_.synthetic_ade20k_root
crop_size = _base_.synthetic_ade20k_crop_size
embed_dims = 64
attn_cfg = dict(embed_dims=embed_dims, num_heads=4)
ffn_cfg = dict(embed_dims=embed_dims, feedforward_channels=2 * embed_dims)
model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='micro', img_size=128, drop_path_rate=0.1, init_cfg=None),
    decode_head=dict(
        in_channels=[48, 96, 192, 384],
        feat_channels=embed_dims,
        out_channels=embed_dims,
        num_queries=16,
        pixel_decoder=dict(
            encoder=dict(num_layers=1, layer_cfg=dict(self_attn_cfg=attn_cfg, ffn_cfg=ffn_cfg)),
            positional_encoding=dict(num_feats=embed_dims // 2)),
        positional_encoding=dict(num_feats=embed_dims // 2),
        transformer_decoder=dict(
            num_layers=3,
            layer_cfg=dict(self_attn_cfg=attn_cfg, cross_attn_cfg=attn_cfg, ffn_cfg=ffn_cfg)),
        train_cfg=dict(num_points=1024)))

# Mask2Former's shortest-edge scale jitter (mmseg's recipe) at the synthetic scale.
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations', reduce_zero_label=True),
    dict(
        type='RandomChoiceResize',
        scales=[int(128 * x * 0.1) for x in range(8, 16)],
        resize_type='ResizeShortestEdge',
        max_size=512),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PhotoMetricDistortion'),
    dict(type='PackSegInputs')
]
test_pipeline = _base_.synthetic_ade20k_test_pipeline
tta_pipeline = _base_.synthetic_ade20k_tta_pipeline  # --tta at the synthetic scale
train_dataloader = dict(
    _base_.synthetic_ade20k_train_dataloader,
    dataset=dict(data_root=data_root, pipeline=train_pipeline))
val_dataloader = test_dataloader = _base_.synthetic_ade20k_val_dataloader

# From scratch on a few dozen images: a higher learning rate, looser gradient clipping and a
# short schedule (the backbone keeps its 0.1x learning rate).
max_iters = 400
optim_wrapper = dict(optimizer=dict(lr=1e-3), clip_grad=dict(max_norm=1.0, norm_type=2))
param_scheduler = [
    dict(type='PolyLR', eta_min=0, power=0.9, begin=0, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_iters, save_best=None))
