"""ImageNet classification through mmpretrain: configs, released checkpoints, tools/test.py."""
import glob
import os
import os.path as osp
import pickle
import subprocess
import sys

import numpy as np
import pytest
import torch
from mmengine.config import Config
from mmengine.dataset import Compose
from mmengine.registry import init_default_scope
from PIL import Image

from transnext_mm.models.backbones import TransNeXt

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
CONFIG_DIR = osp.join(ROOT, 'configs', 'classification')
MICRO_CONFIG = osp.join(CONFIG_DIR, 'transnext-micro_in1k-224px.py')
IMAGENET_MEAN = torch.tensor([123.675, 116.28, 103.53])
IMAGENET_STD = torch.tensor([58.395, 57.12, 57.375])


def build_classifier(config, **backbone_overrides):
    cfg = Config.fromfile(config)
    cfg.model.backbone.update(backbone_overrides)
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    return MODELS.build(cfg.model).eval(), cfg


def released_classifier_state(arch='micro'):
    """Random weights in the released layout: plain state dict, head.*, a derived buffer."""
    backbone = TransNeXt(arch=arch)
    state = {
        k: v + 0.02 * torch.randn_like(v) if v.is_floating_point() else v
        for k, v in backbone.state_dict().items()
    }
    dims = backbone.embed_dims[-1]
    state['head.weight'] = 0.05 * torch.randn(1000, dims)
    state['head.bias'] = 0.1 * torch.randn(1000)
    state['relative_pos_index1'] = torch.zeros(9, dtype=torch.long)
    return state


def logits_by_hand(state, x, arch='micro'):
    """The released classifier: stage-4 norm -> global average pool -> Linear(C, 1000)."""
    backbone = TransNeXt(arch=arch, out_indices=(3, ), attn_impl='reference').eval()
    backbone.load_state_dict({
        k: v
        for k, v in state.items() if not k.startswith('head.') and k != 'relative_pos_index1'
    })
    with torch.no_grad():
        pooled = backbone(x)[0].mean(dim=(2, 3))
    return pooled @ state['head.weight'].t() + state['head.bias']


@pytest.fixture(scope='module')
def released_micro(tmp_path_factory):
    torch.manual_seed(1)
    state = released_classifier_state()
    path = tmp_path_factory.mktemp('released') / 'transnext_micro_224_1k.pth'
    torch.save(state, path)
    return state, str(path)


@pytest.mark.parametrize(
    'config', sorted(glob.glob(osp.join(CONFIG_DIR, '*.py'))), ids=osp.basename)
def test_config_builds_and_predicts(config):
    model, cfg = build_classifier(config)
    assert type(model).__name__ == 'TransNeXtClassifier'
    assert model.backbone.out_indices == (3, )
    assert model.head.fc.in_features == model.backbone.embed_dims[-1]
    from mmpretrain.structures import DataSample
    data = dict(
        inputs=[torch.randint(0, 256, (3, 64, 64), dtype=torch.uint8)], data_samples=[DataSample()])
    with torch.no_grad():
        sample, = model.test_step(data)
    assert sample.pred_score.shape == (1000, )
    torch.testing.assert_close(sample.pred_score.sum(), torch.tensor(1.0))
    assert sample.pred_label.item() == sample.pred_score.argmax().item()


def test_released_checkpoint_logits_through_init_model(released_micro):
    state, path = released_micro
    from mmpretrain.apis import init_model
    model = init_model(MICRO_CONFIG, path, device='cpu')
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x, mode='tensor')
    torch.testing.assert_close(logits, logits_by_hand(state, x), rtol=1e-4, atol=1e-4)


def test_released_checkpoint_through_runner_and_roundtrip(released_micro, tmp_path):
    """Runner.load_checkpoint (the tools/test.py and load_from path); then its own layout."""
    state, path = released_micro
    from mmengine.runner import Runner
    cfg = Config.fromfile(MICRO_CONFIG)
    cfg.work_dir = str(tmp_path)
    runner = Runner.from_cfg(cfg)
    runner.load_checkpoint(path, map_location='cpu')
    model = runner.model.eval()
    torch.testing.assert_close(model.head.fc.weight, state['head.weight'])
    torch.testing.assert_close(model.backbone.block3[7].attn.cpb_fc2.bias,
                               state['block3.7.attn.cpb_fc2.bias'])
    x = torch.randn(1, 3, 96, 64)
    with torch.no_grad():
        logits = model(x, mode='tensor')
    torch.testing.assert_close(logits, logits_by_hand(state, x), rtol=1e-4, atol=1e-4)

    # A checkpoint saved by mmpretrain (backbone.*, head.fc.*) loads unchanged.
    fresh, _ = build_classifier(MICRO_CONFIG)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        torch.testing.assert_close(fresh(x, mode='tensor'), logits)


@pytest.mark.parametrize(
    'wrapping',
    ['model', 'state_dict', 'model_ema', 'model+module.', 'module.', 'model+training-state'])
def test_every_wrapping_of_the_backbone_loads_through_the_classifier(released_micro, tmp_path,
                                                                     wrapping):
    """The wrappings the backbone's init_cfg reads also load through the classification config
    (mmengine's load_checkpoint, as tools/test.py and load_from use it): weights under 'model'
    (the paper's fine-tuning code), 'state_dict' or 'model_ema', DDP 'module.' prefixes, and
    training state beside the weights."""
    state, _ = released_micro
    weights = ({
        'module.' + k: v
        for k, v in state.items()
    } if 'module.' in wrapping else dict(state))
    wrapper = wrapping.split('+')[0]
    checkpoint = weights if wrapper == 'module.' else {wrapper: weights}
    if 'training-state' in wrapping:
        checkpoint.update(epoch=300, optimizer={'state': {}, 'param_groups': []})
    path = tmp_path / f'{wrapping}.pth'
    torch.save(checkpoint, path)
    from mmengine.logging import MMLogger
    from mmengine.runner import load_checkpoint
    model, _ = build_classifier(MICRO_CONFIG)
    logger = MMLogger.get_instance(f'wrapping-{wrapping}', log_file=str(tmp_path / 'log.txt'))
    load_checkpoint(model, str(path), map_location='cpu', strict=True, logger=logger)
    torch.testing.assert_close(model.head.fc.weight, state['head.weight'])
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        logits = model(x, mode='tensor')
    torch.testing.assert_close(logits, logits_by_hand(state, x), rtol=1e-4, atol=1e-4)


def test_checkpoint_of_another_arch_is_refused(released_micro):
    _, path = released_micro
    from mmengine.runner import load_checkpoint
    model, _ = build_classifier(osp.join(CONFIG_DIR, 'transnext-tiny_in1k-224px.py'))
    with pytest.raises(ValueError, match='TransNeXt-micro.*model is TransNeXt-tiny'):
        load_checkpoint(model, path, map_location='cpu')


def test_classifier_needs_transnext_backbone():
    init_default_scope('mmpretrain')
    from mmpretrain.registry import MODELS
    with pytest.raises(TypeError, match='needs a TransNeXt backbone'):
        MODELS.build(dict(type='TransNeXtClassifier', backbone=dict(type='ResNet', depth=18)))


def _resize_short_and_crop(image, short, crop):
    """The paper's evaluation transform, written with PIL (bicubic, centre crop)."""
    width, height = image.size
    if width < height:
        size = (short, int(short * height / width))
    else:
        size = (int(short * width / height), short)
    image = image.resize(size, Image.BICUBIC)
    left = int(round((size[0] - crop) / 2))
    top = int(round((size[1] - crop) / 2))
    return np.asarray(image.crop((left, top, left + crop, top + crop)))


@pytest.mark.parametrize('config,expected', [
    ('transnext-tiny_in1k-224px.py', lambda im: _resize_short_and_crop(im, 256, 224)),
    ('transnext-base_in1k-384px.py', lambda im: np.asarray(im.resize((384, 384), Image.BICUBIC))),
])
def test_test_pipeline_is_the_papers(tmp_path, config, expected):
    import skimage.data
    path = tmp_path / 'coffee.png'
    Image.fromarray(skimage.data.coffee()).save(path)  # 400x600
    cfg = Config.fromfile(osp.join(CONFIG_DIR, config))
    init_default_scope('mmpretrain')
    packed = Compose(cfg.test_dataloader.dataset.pipeline)(dict(img_path=str(path)))
    bgr = packed['inputs'].permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(bgr[..., ::-1], expected(Image.open(path).convert('RGB')))


def test_optimizer_skips_weight_decay_like_the_paper():
    model, cfg = build_classifier(MICRO_CONFIG)
    from mmengine.optim import build_optim_wrapper
    optim_wrapper = build_optim_wrapper(model, cfg.optim_wrapper)
    decay = {}
    for group in optim_wrapper.optimizer.param_groups:
        for param in group['params']:
            decay[param] = group['weight_decay']
    named = dict(model.named_parameters())
    no_decay = [
        'backbone.block1.0.attn.query_embedding', 'backbone.block1.0.attn.temperature',
        'backbone.block1.0.attn.relative_pos_bias_local', 'backbone.block1.0.attn.cpb_fc1.weight',
        'backbone.block4.0.attn.cpb_fc2.weight', 'backbone.block1.0.norm1.weight',
        'backbone.block1.0.mlp.dwconv.dwconv.bias', 'head.fc.bias'
    ]
    with_decay = [
        'backbone.block1.0.attn.q.weight', 'backbone.block1.0.attn.learnable_tokens',
        'backbone.block4.0.attn.qkv.weight', 'backbone.patch_embed1.proj.weight', 'head.fc.weight'
    ]
    assert {name: decay[named[name]] for name in no_decay} == dict.fromkeys(no_decay, 0.0)
    assert {name: decay[named[name]] for name in with_decay} == dict.fromkeys(with_decay, 0.05)
    assert optim_wrapper.optimizer.defaults['lr'] == 1e-3
    assert optim_wrapper.clip_grad_kwargs == dict(max_norm=1.0)


PHOTOS = [('chelsea', 281), ('astronaut', 0), ('coffee', 967)]  # with ImageNet-ish labels


def make_imagenet(data_root, split, photos=PHOTOS):
    """scikit-image photos in mmpretrain's ImageNet layout: <split>/*.JPEG + meta/<split>.txt."""
    import skimage.data
    (data_root / split).mkdir(parents=True)
    (data_root / 'meta').mkdir(exist_ok=True)
    lines = []
    for i, (name, label) in enumerate(photos):
        filename = f'ILSVRC2012_{split}_{i + 1:08d}.JPEG'
        Image.fromarray(getattr(skimage.data, name)()).save(
            data_root / split / filename, quality=95)
        lines.append(f'{filename} {label}')
    (data_root / 'meta' / f'{split}.txt').write_text('\n'.join(lines) + '\n')
    return lines


def test_train_setup_runs(tmp_path):
    """The paper's training recipe through mmengine's Runner: 6 short epochs at 64px."""
    from mmengine.runner import Runner
    data_root = tmp_path / 'imagenet'
    make_imagenet(data_root, 'train', PHOTOS[:2])
    cfg = Config.fromfile(MICRO_CONFIG)
    cfg.work_dir = str(tmp_path / 'work')
    cfg.train_dataloader.update(batch_size=2, num_workers=0, persistent_workers=False)
    cfg.train_dataloader.dataset.data_root = str(data_root)
    cfg.train_dataloader.dataset.pipeline[1].scale = 64  # RandomResizedCrop
    cfg.train_cfg.update(max_epochs=6)  # warm-up ends after epoch 5
    cfg.val_dataloader = cfg.val_cfg = cfg.val_evaluator = None
    cfg.default_hooks.checkpoint.save_best = None
    cfg.default_hooks.logger.interval = 1
    runner = Runner.from_cfg(cfg)
    runner.train()

    sampler = runner.train_dataloader.sampler
    assert type(sampler).__name__ == 'RepeatAugSampler'
    assert runner.iter == 6  # one batch of 2 photos per epoch
    history = runner.message_hub.log_scalars
    assert torch.isfinite(torch.tensor(history['train/loss'].data[0])).all()
    # Linear warm-up from 1e-6 over 5 epochs, then the cosine schedule at 1e-3.
    lrs = history['train/lr'].data[0]
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(1e-3)
    checkpoint = torch.load(osp.join(cfg.work_dir, 'epoch_6.pth'), weights_only=False)
    assert 'backbone.block3.14.attn.cpb_fc1.weight' in checkpoint['state_dict']
    assert 'head.fc.weight' in checkpoint['state_dict']


def test_tools_test_py_evaluates_a_released_checkpoint(released_micro, tmp_path):
    """`python tools/test.py CONFIG RELEASED.pth` on an ImageNet-layout val set of 3 photos."""
    state, path = released_micro
    data_root = tmp_path / 'imagenet'
    lines = make_imagenet(data_root, 'val')
    photos = PHOTOS

    out = tmp_path / 'preds.pkl'
    cmd = [
        sys.executable,
        osp.join(ROOT, 'tools', 'test.py'), MICRO_CONFIG, path, '--work-dir',
        str(tmp_path / 'work'), '--out',
        str(out), '--cfg-options', f'test_dataloader.dataset.data_root={data_root}',
        'test_dataloader.batch_size=3', 'test_dataloader.num_workers=0'
    ]
    env = dict(os.environ, OMP_NUM_THREADS='1')
    result = subprocess.run(
        cmd, cwd=str(tmp_path), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert 'converted a released TransNeXt checkpoint' in result.stdout + result.stderr
    assert 'accuracy/top1' in result.stdout + result.stderr
    with open(out, 'rb') as f:
        predictions = pickle.load(f)

    # The same photos, preprocessed and classified by hand.
    images = [
        _resize_short_and_crop(
            Image.open(data_root / 'val' / line.split()[0]).convert('RGB'), 256, 224)
        for line in lines
    ]
    x = torch.stack([(torch.from_numpy(im.copy()).float() - IMAGENET_MEAN) / IMAGENET_STD
                     for im in images]).permute(0, 3, 1, 2)
    expected = logits_by_hand(state, x).softmax(dim=-1)
    scores = torch.stack([torch.as_tensor(p['pred_score']) for p in predictions])
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-6)
    assert [int(p['gt_label'][0]) for p in predictions] == [label for _, label in photos]
