# UperNet + TransNeXt-Small on ADE20K. Paper: 52.2 mIoU, 52.5 / 52.8 multi-scale (interpolated /
# extrapolated position bias); 80M parameters.
_base_ = './upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py'
checkpoint_file = 'https://huggingface.co/DaiShiResearch/transnext-small-224-1k/resolve/main/transnext_small_224_1k.pth'  # noqa
model = dict(
    backbone=dict(
        arch='small',
        drop_path_rate=0.6,
        init_cfg=dict(type='Pretrained', checkpoint=checkpoint_file)))
