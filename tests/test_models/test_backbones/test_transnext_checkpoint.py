"""Loading released ImageNet checkpoints (written here in the released layout) via init_cfg."""
import pytest
import torch

from transnext_mm import TransNeXt


def released_checkpoint(arch='micro', num_classes=10):
    """A state dict in the released layout: backbone keys, classifier head, derived buffers."""
    state = TransNeXt(arch=arch).state_dict()
    dims = state['norm4.weight'].shape[0]
    state['head.weight'] = torch.randn(num_classes, dims)
    state['head.bias'] = torch.randn(num_classes)
    state['relative_pos_index1'] = torch.zeros(4, dtype=torch.long)
    state['relative_coords_table1'] = torch.zeros(4, 2)
    return state


WRAPPINGS = {
    'plain': lambda s: s,
    'model': lambda s: {
        'model': s
    },
    'state_dict': lambda s: {
        'state_dict': s,
        'meta': {
            'epoch': 300
        }
    },
    'module': lambda s: {
        'model': {
            f'module.{k}': v
            for k, v in s.items()
        }
    },
    'backbone': lambda s: {
        'state_dict': {
            **{
                f'backbone.{k}': v
                for k, v in s.items()
            }, 'decode_head.conv_seg.weight': torch.zeros(1)
        }
    },
}


@pytest.mark.parametrize('wrapping', list(WRAPPINGS))
def test_init_cfg_loads_every_wrapping(tmp_path, wrapping):
    state = released_checkpoint()
    path = tmp_path / 'ckpt.pth'
    torch.save(WRAPPINGS[wrapping](state), path)
    model = TransNeXt(arch='micro', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    loaded = model.state_dict()
    for key, value in loaded.items():
        torch.testing.assert_close(value, state[key], msg=key)


def test_legacy_pretrained_warns_and_loads(tmp_path):
    state = released_checkpoint()
    path = tmp_path / 'ckpt.pth'
    torch.save(state, path)
    with pytest.warns(UserWarning, match='pretrained.*deprecated'):
        model = TransNeXt(arch='micro', pretrained=str(path))
    assert model.init_cfg == dict(type='Pretrained', checkpoint=str(path))
    model.init_weights()
    torch.testing.assert_close(model.norm4.weight, state['norm4.weight'])


def _init(tmp_path, checkpoint, arch='micro'):
    path = tmp_path / 'bad.pth'
    torch.save(checkpoint, path)
    TransNeXt(arch=arch, init_cfg=dict(type='Pretrained', checkpoint=str(path))).init_weights()


def test_not_a_transnext_checkpoint(tmp_path):
    with pytest.raises(ValueError, match="not a TransNeXt checkpoint.*'conv1.weight'"):
        _init(tmp_path, {'conv1.weight': torch.zeros(1), 'fc.weight': torch.zeros(1)})


def test_checkpoint_of_another_arch(tmp_path):
    with pytest.raises(ValueError, match=r'holds TransNeXt-tiny .* backbone is TransNeXt-micro'):
        _init(tmp_path, released_checkpoint('tiny'), arch='micro')


def test_missing_and_misshapen_keys(tmp_path):
    state = released_checkpoint()
    del state['block3.4.attn.learnable_tokens']
    with pytest.raises(ValueError, match=r'lacks 1 TransNeXt weights: block3\.4\.attn\.learnable'):
        _init(tmp_path, state)
    state = released_checkpoint()
    state['block2.0.attn.relative_pos_bias_local'] = torch.zeros(4, 3, 3)
    with pytest.raises(ValueError, match='wrong shape: block2.0.attn.relative_pos_bias_local'):
        _init(tmp_path, state)
    with pytest.raises(TypeError, match='must be a dict'):
        _init(tmp_path, [1, 2, 3])


def test_unexpected_keys_are_reported(tmp_path, caplog):
    state = released_checkpoint()
    state['block1.0.attn.extra_scale'] = torch.ones(1)
    path = tmp_path / 'extra.pth'
    torch.save(state, path)
    model = TransNeXt(arch='micro', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    from mmengine.logging import MMLogger
    logger = MMLogger.get_current_instance()
    messages = []
    handler = type('H', (__import__('logging').Handler, ), {
        'emit': lambda self, record: messages.append(record.getMessage())
    })()
    logger.addHandler(handler)
    try:
        model.init_weights()
    finally:
        logger.removeHandler(handler)
    text = '\n'.join(messages)
    assert 'unexpected keys' in text and 'block1.0.attn.extra_scale' in text
    assert "dropped classifier ['head.weight', 'head.bias']" in text
