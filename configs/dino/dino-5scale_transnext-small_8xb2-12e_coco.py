_base_ = './dino-5scale_transnext-tiny_8xb2-12e_coco.py'

pretrained = 'https://huggingface.co/DaiShiResearch/transnext-small-224-1k/resolve/main/transnext_small_224_1k.pth'  # noqa
model = dict(
    backbone=dict(
        arch='small', drop_path_rate=0.5, init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
