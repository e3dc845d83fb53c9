# TransNeXt-Small on ImageNet-1k at 224x224 (paper: 49.7M params, 10.3G FLOPs, 84.7 top-1):
# differences from TransNeXt-Tiny.
_base_ = './transnext-tiny_in1k-224px.py'

model = dict(backbone=dict(arch='small', drop_path_rate=0.45))
