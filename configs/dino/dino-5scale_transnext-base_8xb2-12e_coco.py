_base_ = './dino-5scale_transnext-tiny_8xb2-12e_coco.py'

pretrained = 'https://huggingface.co/DaiShiResearch/transnext-base-224-1k/resolve/main/transnext_base_224_1k.pth'  # noqa
model = dict(
    backbone=dict(
        arch='base', drop_path_rate=0.6, init_cfg=dict(type='Pretrained', checkpoint=pretrained)),
    neck=dict(in_channels=[96, 192, 384, 768]))
