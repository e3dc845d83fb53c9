# TransNeXt-Base on ImageNet-1k at 224x224 (paper: 89.7M params, 18.4G FLOPs, 84.8 top-1):
# differences from TransNeXt-Tiny.
_base_ = './transnext-tiny_in1k-224px.py'

model = dict(backbone=dict(arch='base', drop_path_rate=0.6), head=dict(in_channels=768))
