# Copyright (c) transnext-mm contributors. All rights reserved.
"""The detection configs: they load, build the paper's detectors and run a forward pass."""
import os.path as osp

import pytest
import torch
from mmdet.registry import MODELS
from mmdet.structures import DetDataSample
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MASK_RCNN = {
    'configs/mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py': ('tiny', 0.3, 47.9),
    'configs/mask-rcnn/mask-rcnn_transnext-small_fpn_1x_coco.py': ('small', 0.5, 69.3),
    'configs/mask-rcnn/mask-rcnn_transnext-base_fpn_1x_coco.py': ('base', 0.6, 109.2),
}
DINO = {
    'configs/dino/dino-4scale_transnext-tiny_8xb2-12e_coco.py': ('tiny', 0.3, 47.8),
    'configs/dino/dino-5scale_transnext-tiny_8xb2-12e_coco.py': ('tiny', 0.3, 48.1),
    'configs/dino/dino-5scale_transnext-small_8xb2-12e_coco.py': ('small', 0.5, 69.6),
    'configs/dino/dino-5scale_transnext-base_8xb2-12e_coco.py': ('base', 0.6, 110.0),
}
DEMOS = [
    'configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py',
    'configs/demo/dino-4scale_transnext-micro_synthetic-coco.py'
]
# Top-level keys of mmdet 2.x configs that mmdet 3.x ignores or rejects.
MMDET2_KEYS = ('optimizer', 'optimizer_config', 'lr_config', 'runner', 'data', 'evaluation',
               'checkpoint_config', 'log_config', 'fp16', 'workflow', 'total_epochs')
NO_DECAY_NAMES = ('query_embedding', 'relative_pos_bias_local', 'cpb_fc', 'temperature')


def load(config: str) -> Config:
    return Config.fromfile(osp.join(ROOT, config))


def build(cfg: Config):
    """The detector of ``cfg`` with the torch attention path; no weights loaded."""
    init_default_scope('mmdet')
    cfg.model.backbone.attn_impl = 'torch'
    return MODELS.build(cfg.model)


def is_backbone_no_decay(name: str, module_types: dict) -> bool:
    return name.startswith('backbone.') and (any(
        key in name
        for key in NO_DECAY_NAMES) or module_types[name.rsplit('.', 1)[0]] is torch.nn.LayerNorm)


@pytest.mark.parametrize('config', [*MASK_RCNN, *DINO, *DEMOS])
def test_config_is_mmdet3(config):
    cfg = load(config)
    assert cfg.default_scope == 'mmdet'
    assert cfg.custom_imports == dict(imports=['transnext_mm'], allow_failed_imports=False)
    assert not [k for k in MMDET2_KEYS if k in cfg], 'mmdet 2.x keys in an mmdet 3.x config'
    # mmdet's train.py --amp turns exactly this wrapper into AmpOptimWrapper.
    assert cfg.optim_wrapper.type == 'OptimWrapper'
    backbone = cfg.model.backbone
    assert backbone.type == 'TransNeXt' and backbone.get('attn_impl', 'auto') == 'auto'


@pytest.mark.parametrize('config', [*MASK_RCNN, *DINO])
def test_paper_settings(config):
    cfg = load(config)
    arch, drop_path, _ = {**MASK_RCNN, **DINO}[config]
    backbone = cfg.model.backbone
    assert (backbone.arch, backbone.drop_path_rate) == (arch, drop_path)
    assert (backbone.img_size, backbone.pretrain_size) == (800, 224)
    assert backbone.pos_bias_mode == 'interpolate'
    assert backbone.init_cfg.type == 'Pretrained'
    assert backbone.init_cfg.checkpoint.endswith(f'transnext_{arch}_224_1k.pth')
    assert cfg.train_cfg.max_epochs == 12
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 1e-4, 0.05)
    if config in DINO:
        assert cfg.optim_wrapper.clip_grad == dict(max_norm=0.1, norm_type=2)
        levels = 4 if '4scale' in config else 5
        assert backbone.out_indices == ((1, 2, 3) if levels == 4 else (0, 1, 2, 3))
        assert cfg.model.num_feature_levels == cfg.model.neck.num_outs == levels
        assert cfg.model.encoder.layer_cfg.self_attn_cfg.num_levels == levels
        assert cfg.model.decoder.layer_cfg.cross_attn_cfg.num_levels == levels


@pytest.mark.parametrize('config', [*MASK_RCNN, *DINO])
def test_build_count_and_forward(config):
    """Paper parameter counts (whole detector), then inference on one small image.

    4-scale DINO selects its 900 queries among the encoder's tokens, so it needs >= 900 of them
    (a 192x256 input gives 1020); the others run on 128x160. Mask R-CNN keeps 100 instead of
    1000 proposals. The position-bias table is made at the input's height (no parameters
    depend on it): at the configs' img_size of 800 (test_paper_settings checks it) each stage-1
    block tabulates biases for 200^2 positions, most of the seconds this test took.
    """
    cfg = load(config)
    shape = (192, 256) if '4scale' in config else (128, 160)
    if config in MASK_RCNN:
        cfg.model.test_cfg.rpn.max_per_img = 100
    cfg.model.backbone.img_size = shape[0]
    model = build(cfg)
    expected = {**MASK_RCNN, **DINO}[config][2]
    params = sum(p.numel() for p in model.parameters()) / 1e6
    assert round(params, 1) == expected or (expected == 110.0 and round(params) == 110), params
    assert not model.backbone.is_init  # the released-checkpoint init_cfg was not run

    # DINO allocates some parameters uninitialised (e.g. `level_embed`) and fills them in
    # init_weights(): run it, without the released-checkpoint download.
    model.backbone.init_cfg = None
    model.init_weights()
    model.eval()
    inputs = torch.rand(3, *shape) * 255
    sample = DetDataSample(
        metainfo=dict(
            img_shape=shape,
            ori_shape=shape,
            scale_factor=(1., 1.),
            batch_input_shape=shape,
            pad_shape=shape))
    with torch.no_grad():
        data = model.data_preprocessor(dict(inputs=[inputs], data_samples=[sample]), False)
        results = model(**data, mode='predict')
    instances = results[0].pred_instances
    assert instances.bboxes.shape[1] == 4 and len(instances.scores) == len(instances.labels)
    assert torch.isfinite(instances.bboxes).all()
    if config in MASK_RCNN:
        assert instances.masks.shape[1:] == shape


@pytest.mark.parametrize('config', [
    'configs/mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py',
    'configs/dino/dino-4scale_transnext-tiny_8xb2-12e_coco.py',
])
def test_param_groups(config):
    """No weight decay on the backbone's special parameters and norms; DINO's backbone lr x0.1."""
    cfg = load(config)
    model = build(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    settings = {
        id(p): (g['lr'], g['weight_decay'])
        for g in optim_wrapper.param_groups
        for p in g['params']
    }
    module_types = {name: type(m) for name, m in model.named_modules()}
    base_lr, base_wd = 1e-4, 0.05
    is_dino = 'dino' in config
    checked = 0
    for name, param in model.named_parameters():
        lr, wd = settings[id(param)]
        in_backbone = name.startswith('backbone.')
        expected_lr = base_lr * (0.1 if is_dino and in_backbone else 1.0)
        if in_backbone:
            expected_wd = 0. if is_backbone_no_decay(name, module_types) else base_wd
        else:  # Mask R-CNN's heads have no norms; DINO keeps mmdet's decay outside the backbone
            expected_wd = base_wd
        assert lr == pytest.approx(expected_lr), name
        assert wd == pytest.approx(expected_wd), name
        checked += in_backbone and expected_wd == 0.
    # 4 special tensors (+ 2 x 2 CPB) and 3-4 norms per block, over 21 blocks.
    assert checked > 21 * 8


def test_dino_no_decay_keys_spare_the_detector():
    """DINO's own `query_embedding` and transformer norms are not caught by backbone keys."""
    cfg = load('configs/dino/dino-4scale_transnext-tiny_8xb2-12e_coco.py')
    keys = cfg.optim_wrapper.paramwise_cfg.custom_keys
    model = build(cfg)
    for name, _ in model.named_parameters():
        if not name.startswith('backbone.'):
            assert not [k for k in keys if k in name], name
