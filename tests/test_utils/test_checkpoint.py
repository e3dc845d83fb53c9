"""transnext_mm.utils.checkpoint.check_arch: the arch check of the backbone, classifier and
converters."""
import pytest
import torch

from transnext_mm import TransNeXt
from transnext_mm.utils.checkpoint import check_arch


def arch_state_dict(embed_dims, num_heads, depths):
    """The tensors infer_arch reads: patch embeddings, block indices and attention temperatures."""
    state = {}
    for stage, (dims, heads, depth) in enumerate(zip(embed_dims, num_heads, depths), 1):
        state[f'patch_embed{stage}.proj.weight'] = torch.zeros(dims, 3, 1, 1)
        for block in range(depth):
            state[f'block{stage}.{block}.attn.temperature'] = torch.zeros(heads, 1, 1)
    return state


def named_state_dict(name):
    setting = TransNeXt.arch_settings[name]
    return arch_state_dict(setting['embed_dims'], setting['num_heads'], setting['depths'])


@pytest.mark.parametrize('name', sorted(TransNeXt.arch_settings))
def test_matching_arch_passes(name):
    setting = TransNeXt.arch_settings[name]
    check_arch(named_state_dict(name), setting, TransNeXt.arch_settings)
    # Tuples (a custom arch dict) compare equal to the lists read off the checkpoint.
    as_tuples = {k: tuple(v) for k, v in setting.items() if isinstance(v, (list, tuple))}
    check_arch(named_state_dict(name), as_tuples, TransNeXt.arch_settings)


def test_other_arch_names_checkpoint_and_both_archs():
    with pytest.raises(ValueError) as error:
        check_arch(
            named_state_dict('tiny'),
            TransNeXt.arch_settings['micro'],
            TransNeXt.arch_settings,
            source='tiny.pth',
            target='this backbone')
    message = str(error.value)
    assert message.startswith('tiny.pth holds TransNeXt-tiny {')
    assert 'but this backbone is TransNeXt-micro {' in message
    assert "use arch='tiny'" in message
    assert str(TransNeXt.arch_settings['tiny']['embed_dims']) in message


def test_custom_arch_is_called_custom():
    custom = dict(embed_dims=[8, 16, 32, 64], num_heads=[1, 2, 4, 8], depths=[1, 1, 1, 1])
    with pytest.raises(
            ValueError,
            match=r'the checkpoint holds TransNeXt-custom .* but the model '
            r'is TransNeXt-micro .*use the arch of the checkpoint'):
        check_arch(
            arch_state_dict(**custom), TransNeXt.arch_settings['micro'], TransNeXt.arch_settings)
