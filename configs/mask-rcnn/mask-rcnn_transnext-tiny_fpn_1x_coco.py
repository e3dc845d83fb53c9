_base_ = [
    '../_base_/models/mask-rcnn_transnext_fpn.py',
    'mmdet::_base_/datasets/coco_instance.py',
    '../_base_/schedules/det_adamw_1x.py',
    'mmdet::_base_/default_runtime.py',
]
# Released ImageNet-1K weights: a URL or a local path (or override with
# --cfg-options model.backbone.init_cfg.checkpoint=PATH).
pretrained = 'https://huggingface.co/DaiShiResearch/transnext-tiny-224-1k/resolve/main/transnext_tiny_224_1k.pth'  # noqa

model = dict(backbone=dict(init_cfg=dict(type='Pretrained', checkpoint=pretrained)))
