# TransNeXt-Micro on ImageNet-1k at 224x224 (paper: 12.8M params, 2.7G FLOPs, 82.5 top-1):
# differences from TransNeXt-Tiny.
_base_ = './transnext-tiny_in1k-224px.py'

model = dict(backbone=dict(arch='micro', drop_path_rate=0.15), head=dict(in_channels=384))
