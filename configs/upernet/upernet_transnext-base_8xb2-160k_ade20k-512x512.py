# UperNet + TransNeXt-Base on ADE20K. Paper: 53.0 mIoU, 53.5 / 53.7 multi-scale (interpolated /
# extrapolated position bias); 121M parameters.
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'
checkpoint_file = 'https://huggingface.co/DaiShiResearch/transnext-base-224-1k/resolve/main/transnext_base_224_1k.pth'  # noqa
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.7,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]),
    auxiliary_head=dict(in_channels=384))
