# TransNeXt-Base fine-tuned on ImageNet-1k at 384x384 (paper: 89.7M params, 56.3G FLOPs,
# 86.2 top-1): differences from TransNeXt-Small at 384px.
_base_ = './transnext-small_in1k-384px.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.8), head=dict(in_channels=768))
