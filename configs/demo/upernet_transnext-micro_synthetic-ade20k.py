# Small UperNet + TransNeXt-Micro (from scratch) on the synthetic ADE20K-format dataset written
# by tools/dataset_converters/make_synthetic_ade20k.py: trains and evaluates on a CPU in minutes.
#   python tools/dataset_converters/make_synthetic_ade20k.py --out data/synthetic_ade20k
#   python tools/train.py configs/demo/upernet_transnext-micro_synthetic-ade20k.py
_base_ = [
    '../upernet/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py',
    '../_base_/datasets/synthetic_ade20k.py'
]
# The synthetic dataset's section over the UperNet config's ADE20K one.
data_root = _base_.synthetic_ade20k_root
crop_size = _base_.synthetic_ade20k_crop_size
train_pipeline = _base_.synthetic_ade20k_train_pipeline
test_pipeline = _base_.synthetic_ade20k_test_pipeline
tta_pipeline = _base_.synthetic_ade20k_tta_pipeline
train_dataloader = _base_.synthetic_ade20k_train_dataloader
val_dataloader = test_dataloader = _base_.synthetic_ade20k_val_dataloader

model = dict(
    data_preprocessor=dict(size=crop_size),
    backbone=dict(arch='micro', img_size=128, drop_path_rate=0.1, init_cfg=None),
    decode_head=dict(in_channels=[48, 96, 192, 384], channels=64),
    auxiliary_head=dict(in_channels=192, channels=32))

# From scratch on a few dozen images: a higher learning rate and a short schedule.
max_iters = 400
optim_wrapper = dict(optimizer=dict(lr=1e-3))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-3, by_epoch=False, begin=0, end=20),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=20, end=max_iters, by_epoch=False)
]
train_cfg = dict(max_iters=max_iters, val_interval=max_iters)
default_hooks = dict(logger=dict(interval=10), checkpoint=dict(interval=max_iters))
