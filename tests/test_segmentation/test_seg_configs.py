# Copyright (c) transnext-mm contributors. All rights reserved.
"""The segmentation configs: paper settings, parameter counts, and a forward pass of each."""
import copy
import os.path as osp

import pytest
import torch
from mmengine.config import Config
from mmengine.optim import build_optim_wrapper
from mmengine.registry import init_default_scope
from mmseg.registry import MODELS
from mmseg.structures import SegDataSample

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
UPERNET = 'configs/upernet/upernet_transnext-{}_8xb2-160k_ade20k-512x512{}.py'
MASK2FORMER = 'configs/mask2former/mask2former_transnext-{}_8xb2-160k_ade20k-512x512.py'
# arch: (drop path, parameters as the paper rounds them: (value in M, decimals))
UPERNET_PAPER = {'tiny': (0.4, (59, 0)), 'small': (0.6, (80, 0)), 'base': (0.7, (121, 0))}
MASK2FORMER_PAPER = {'tiny': (0.3, (47.5, 1)), 'small': (0.5, (69.0, 1)), 'base': (0.6, (109, 0))}
MS_SUFFIXES = ('_ms-interp', '_ms-extrap')
DEMOS = [
    'configs/demo/upernet_transnext-micro_synthetic-ade20k.py',
    'configs/demo/upernet_transnext-micro_synthetic-ade20k_ms-interp.py',
    'configs/demo/upernet_transnext-micro_synthetic-ade20k_ms-extrap.py',
    'configs/demo/mask2former_transnext-micro_synthetic-ade20k.py'
]
ALL_CONFIGS = ([UPERNET.format(a, s) for a in UPERNET_PAPER
                for s in ('', ) + MS_SUFFIXES] + [MASK2FORMER.format(a)
                                                  for a in MASK2FORMER_PAPER] + DEMOS)
NO_DECAY_NAMES = ('query_embedding', 'relative_pos_bias_local', 'cpb_fc', 'temperature')
# The forward passes run at 128x128 with the interpolation table at that size too: the configs'
# img_size of 512 (800 in _ms-interp) tabulates biases of (heads, 128^2 (200^2), 16^2 (25^2))
# values per stage-1 block, seconds to minutes on a CPU. test_*_settings check the real values.
FORWARD_SIZE = 128


def load(config: str) -> Config:
    return Config.fromfile(osp.join(ROOT, config))


def build(cfg: Config):
    """The segmentor of ``cfg`` with the torch attention path, randomly initialised."""
    init_default_scope('mmseg')
    cfg = copy.deepcopy(cfg)
    cfg.model.backbone.update(attn_impl='torch', init_cfg=None, img_size=FORWARD_SIZE)
    return MODELS.build(cfg.model)


def count_millions(model) -> float:
    return sum(p.numel() for p in model.parameters()) / 1e6


def predict(model, size=(FORWARD_SIZE, FORWARD_SIZE)):
    meta = dict(img_shape=size, ori_shape=size, pad_shape=size, padding_size=[0, 0, 0, 0])
    model.eval()
    with torch.no_grad():
        return model.predict(torch.randn(1, 3, *size), [SegDataSample(metainfo=meta)])[0]


def is_backbone_no_decay(name: str, module_types: dict) -> bool:
    return name.startswith('backbone.') and (any(
        key in name
        for key in NO_DECAY_NAMES) or module_types[name.rsplit('.', 1)[0]] is torch.nn.LayerNorm)


@pytest.mark.parametrize('config', ALL_CONFIGS)
def test_config_is_mmseg1(config):
    cfg = load(config)
    assert cfg.default_scope == 'mmseg'
    assert 'transnext_mm' in cfg.custom_imports['imports']
    assert cfg.custom_imports['allow_failed_imports'] is False
    backbone = cfg.model.backbone
    assert backbone.type == 'TransNeXt' and backbone.get('attn_impl', 'auto') == 'auto'
    assert backbone.pretrain_size == 224
    # mmseg 0.x keys would be ignored silently by mmseg 1.x.
    assert not [k for k in ('lr_config', 'data', 'evaluation', 'runner') if k in cfg]
    assert cfg.get('optimizer', cfg.optim_wrapper.optimizer).type == 'AdamW'


@pytest.mark.parametrize('arch', list(UPERNET_PAPER))
def test_upernet_paper_settings(arch):
    cfg = load(UPERNET.format(arch, ''))
    drop_path, _ = UPERNET_PAPER[arch]
    backbone = cfg.model.backbone
    assert (backbone.arch, backbone.drop_path_rate) == (arch, drop_path)
    assert (backbone.img_size, backbone.pos_bias_mode) == (512, 'interpolate')
    assert backbone.init_cfg.checkpoint.endswith(f'transnext_{arch}_224_1k.pth')
    assert (cfg.model.decode_head.type, cfg.model.auxiliary_head.type) == ('UPerHead', 'FCNHead')
    assert cfg.model.decode_head.num_classes == cfg.model.auxiliary_head.num_classes == 150
    assert cfg.train_cfg.max_iters == 160000
    assert cfg.train_dataloader.batch_size == 2 and cfg.auto_scale_lr.base_batch_size == 16
    assert cfg.crop_size == (512, 512) and cfg.model.data_preprocessor.size == (512, 512)
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 6e-5, 0.05)
    assert cfg.optim_wrapper.paramwise_cfg.custom_keys == {
        k: dict(decay_mult=0.)
        for k in ('query_embedding', 'relative_pos_bias_local', 'cpb', 'temperature', 'norm')
    }
    warmup, poly = cfg.param_scheduler
    assert (warmup.type, warmup.begin, warmup.end) == ('LinearLR', 0, 1500)
    assert (poly.type, poly.power, poly.begin, poly.end) == ('PolyLR', 1.0, 1500, 160000)


@pytest.mark.parametrize('arch', list(UPERNET_PAPER))
def test_ms_configs_differ_only_in_position_bias(arch):
    single = load(UPERNET.format(arch, ''))
    for suffix, (mode, img_size) in zip(MS_SUFFIXES, (('interpolate', 800), ('extrapolate', 512))):
        multi = load(UPERNET.format(arch, suffix))
        assert (multi.model.backbone.pos_bias_mode, multi.model.backbone.img_size) == (mode,
                                                                                       img_size)
        # Multi-scale (0.5-1.75 of the 2048x512 test scale) + flip, through tools/test.py --tta.
        assert multi.tta_model.type == 'SegTTAModel'
        transforms = multi.tta_pipeline[1].transforms
        assert [t.scale for t in transforms[0]] == [(int(2048 * r), int(512 * r))
                                                    for r in (0.5, 0.75, 1.0, 1.25, 1.5, 1.75)]
        assert [t.prob for t in transforms[1]] == [0., 1.]
        a, b = single.to_dict(), multi.to_dict()
        for d in (a, b):
            d['model']['backbone'].pop('pos_bias_mode')
            d['model']['backbone'].pop('img_size')
        assert a == b


@pytest.mark.parametrize('arch', list(MASK2FORMER_PAPER))
def test_mask2former_paper_settings(arch):
    cfg = load(MASK2FORMER.format(arch))
    drop_path, _ = MASK2FORMER_PAPER[arch]
    backbone = cfg.model.backbone
    assert (backbone.arch, backbone.drop_path_rate, backbone.img_size) == (arch, drop_path, 512)
    assert backbone.init_cfg.checkpoint.endswith(f'transnext_{arch}_224_1k.pth')
    assert cfg.model.decode_head.type == 'Mask2FormerHead'
    assert cfg.model.decode_head.num_classes == 150
    assert 'mmdet.models' in cfg.custom_imports['imports']
    optimizer = cfg.optim_wrapper.optimizer
    assert (optimizer.type, optimizer.lr, optimizer.weight_decay) == ('AdamW', 1e-4, 0.05)
    assert cfg.train_cfg.max_iters == 160000 and cfg.train_dataloader.batch_size == 2


def test_mask2former_param_groups():
    """Backbone at 0.1x lr; no decay exactly on its norms and TransNeXt's special parameters."""
    cfg = load(MASK2FORMER.format('tiny'))
    model = build(cfg)
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    module_types = {name: type(m) for name, m in model.named_modules()}
    names = {id(p): n for n, p in model.named_parameters()}
    seen = 0
    for group in optim_wrapper.optimizer.param_groups:
        for param in group['params']:
            name = names[id(param)]
            seen += 1
            if name.startswith('backbone.'):
                assert group['lr'] == pytest.approx(1e-5), name
                expected = 0.0 if is_backbone_no_decay(name, module_types) else 0.05
                assert group['weight_decay'] == pytest.approx(expected), name
            else:  # the head keeps mmseg's Mask2Former recipe
                assert group['lr'] == pytest.approx(1e-4), name
                no_decay = (
                    any(k in name for k in ('query_embed', 'query_feat', 'level_embed'))
                    or issubclass(module_types[name.rsplit('.', 1)[0]],
                                  (torch.nn.LayerNorm, torch.nn.GroupNorm)))
                assert group['weight_decay'] == pytest.approx(0.0 if no_decay else 0.05), name
    assert seen == len(names)


@pytest.mark.parametrize('arch', list(UPERNET_PAPER))
def test_upernet_builds_counts_and_runs(arch):
    """Each UperNet config (single-scale and both ms) builds the paper's model and predicts."""
    _, (params, decimals) = UPERNET_PAPER[arch]
    for suffix in ('', ) + MS_SUFFIXES:
        model = build(load(UPERNET.format(arch, suffix)))
        assert round(count_millions(model), decimals) == params, suffix
        result = predict(model)
        assert result.pred_sem_seg.data.shape == (1, 128, 128)
        assert result.seg_logits.data.shape == (150, 128, 128)
        assert torch.isfinite(result.seg_logits.data).all()
        del model


@pytest.mark.parametrize('arch', list(MASK2FORMER_PAPER))
def test_mask2former_builds_counts_and_runs(arch):
    _, (params, decimals) = MASK2FORMER_PAPER[arch]
    model = build(load(MASK2FORMER.format(arch)))
    assert round(count_millions(model), decimals) == params
    result = predict(model)
    assert result.pred_sem_seg.data.shape == (1, 128, 128)
    assert torch.isfinite(result.seg_logits.data).all()


@pytest.mark.parametrize('config', DEMOS)
def test_demo_configs_run(config):
    cfg = load(config)
    assert cfg.model.backbone.arch == 'micro'
    assert cfg.train_dataloader.dataset.data_root == 'data/synthetic_ade20k'
    assert cfg.test_dataloader.dataset.type == 'ADE20KDataset'
    result = predict(build(cfg), size=(128, 160))
    assert result.pred_sem_seg.data.shape == (1, 128, 160)
