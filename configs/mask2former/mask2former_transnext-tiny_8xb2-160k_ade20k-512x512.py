# Mask2Former + TransNeXt-Tiny on ADE20K, 160k iterations, 8 GPUs x 2 images.
# Paper: 53.4 mIoU (single scale); 47.5M parameters.
_base_ = '../_base_/models/mask2former_transnext.py'
checkpoint_file = 'https://huggingface.co/DaiShiResearch/transnext-tiny-224-1k/resolve/main/transnext_tiny_224_1k.pth'  # noqa
model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
