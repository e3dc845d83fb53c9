# Mask R-CNN + FPN with a TransNeXt-Tiny backbone: mmdet's ResNet-50 model with the backbone and
# the FPN input channels replaced; children set the pretrained checkpoint, other archs their
# widths and drop path rates.
_base_ = 'mmdet::_base_/models/mask-rcnn_r50_fpn.py'

custom_imports = dict(imports=['transnext_mm'], allow_failed_imports=False)

model = dict(
    backbone=dict(
        _delete_=True,
        type='TransNeXt',
        arch='tiny',
        img_size=800,  # size at which 'interpolate' tabulates the pooled-path position bias
        pretrain_size=224,
        pos_bias_mode='interpolate',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.3),
    neck=dict(in_channels=[72, 144, 288, 576]))
