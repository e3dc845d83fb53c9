# UperNet (+ FCN auxiliary head) with a TransNeXt backbone; TransNeXt-Tiny's settings.
# Importing transnext_mm registers the TransNeXt backbone; every child config inherits this.
custom_imports = dict(imports=['transnext_mm'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(512, 512))  # training crops are padded to this size
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='TransNeXt',
        arch='tiny',
        # Size at which 'interpolate' mode tabulates the pooled-path position bias.
        img_size=512,
        # ImageNet pretraining size: scales log-CPB's relative coordinates.
        pretrain_size=224,
        pos_bias_mode='interpolate',
        out_indices=(0, 1, 2, 3),
        drop_path_rate=0.4),
    decode_head=dict(
        type='UPerHead',
        in_channels=[72, 144, 288, 576],
        in_index=[0, 1, 2, 3],
        pool_scales=(1, 2, 3, 6),
        channels=512,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=dict(
        type='FCNHead',
        in_channels=288,
        in_index=2,
        channels=256,
        num_convs=1,
        concat_input=False,
        dropout_ratio=0.1,
        num_classes=150,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(type='CrossEntropyLoss', use_sigmoid=False, loss_weight=0.4)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
