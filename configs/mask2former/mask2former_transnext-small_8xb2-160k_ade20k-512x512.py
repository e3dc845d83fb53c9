# Mask2Former + TransNeXt-Small on ADE20K, 160k iterations, 8 GPUs x 2 images.
# Paper: 54.1 mIoU (single scale); 69.0M parameters.
_base_ = '../_base_/models/mask2former_transnext.py'
checkpoint_file = 'https://huggingface.co/DaiShiResearch/transnext-small-224-1k/resolve/main/transnext_small_224_1k.pth'  # noqa
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.5,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
