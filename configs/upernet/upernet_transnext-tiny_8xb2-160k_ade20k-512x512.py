# UperNet + TransNeXt-Tiny on ADE20K: 160k iterations, 8 GPUs x 2 images.
# Paper: 51.1 mIoU (single scale), 51.5 / 51.7 multi-scale + flip with the position bias
# interpolated / extrapolated (see the _ms-interp.py and _ms-extrap.py configs); 59M parameters.
_base_ = [
    '../_base_/models/upernet_transnext.py', '../_base_/datasets/ade20k.py',
    'mmseg::_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
# The released ImageNet-1K checkpoint (a local path works too).
checkpoint_file = 'https://huggingface.co/DaiShiResearch/transnext-tiny-224-1k/resolve/main/transnext_tiny_224_1k.pth'  # noqa
model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))

# AdamW without weight decay on TransNeXt's query embedding, local position bias, log-CPB MLP,
# temperature and all norm layers.
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.05),
    paramwise_cfg=dict(
        custom_keys={
            'query_embedding': dict(decay_mult=0.),
            'relative_pos_bias_local': dict(decay_mult=0.),
            'cpb': dict(decay_mult=0.),
            'temperature': dict(decay_mult=0.),
            'norm': dict(decay_mult=0.)
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0, end=1500),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=1500, end=160000, by_epoch=False)
]
# Total batch 16 = 8 GPUs x 2 images.
train_dataloader = dict(batch_size=2)
auto_scale_lr = dict(enable=False, base_batch_size=16)
