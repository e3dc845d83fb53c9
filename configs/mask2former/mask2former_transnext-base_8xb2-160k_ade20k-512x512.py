# Mask2Former + TransNeXt-Base on ADE20K, 160k iterations, 8 GPUs x 2 images.
# Paper: 54.7 mIoU (single scale); 109M parameters.
_base_ = '../_base_/models/mask2former_transnext.py'
checkpoint_file = 'https://huggingface.co/DaiShiResearch/transnext-base-224-1k/resolve/main/transnext_base_224_1k.pth'  # noqa
model = dict(
    backbone=dict(
        arch='base',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)),
    decode_head=dict(in_channels=[96, 192, 384, 768]))
