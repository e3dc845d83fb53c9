"""tools/get_flops.py: the attention core is counted, numbers are stable and match the paper."""
import os.path as osp

import pytest
import torch

from tools.get_flops import analyze, build_backbone, main

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
MICRO_CONFIG = osp.join(ROOT, 'configs', 'classification', 'transnext-micro_in1k-224px.py')


def attention_core_macs(backbone, height, width):
    """MACs of the attention core, by op, written out from the paper's formulas.

    Aggregated attention (stages 1-3), per block with N queries, C channels, Np pooled keys:
    local scores and the window's weighted sum of values 9*N*C each (sums of products),
    pooled scores and their values N*Np*C each plus the learnable-token weights 9*N*C
    (matmuls), softmax over 9 + Np scores per head and query. Full attention (stage 4):
    two N*N*C matmuls and a softmax over N scores.
    """
    expected = dict(sum=0, matmul=0, softmax=0)
    height, width = (height + 3) // 4, (width + 3) // 4  # 7x7 stride-4 patch embedding
    for stage in range(4):
        if stage:
            height, width = (height + 1) // 2, (width + 1) // 2
        n, c = height * width, backbone.embed_dims[stage]
        heads, depth = backbone.arch['num_heads'][stage], backbone.arch['depths'][stage]
        if stage < 3:
            ratio = backbone.arch['pool_ratios'][stage]
            pooled = (height // ratio) * (width // ratio)
            expected['sum'] += depth * 2 * 9 * n * c
            expected['matmul'] += depth * (2 * n * pooled * c + 9 * n * c)
            expected['softmax'] += depth * heads * n * (9 + pooled)
        else:
            expected['matmul'] += depth * 2 * n * n * c
            expected['softmax'] += depth * heads * n * n
    return expected


@pytest.mark.parametrize('shape', [(64, 64), (96, 64)])
def test_attention_core_is_counted(shape):
    backbone = build_backbone('micro')
    result = analyze(backbone, (torch.randn(1, 3, *shape), ))
    counted = {op: result['by_operator'].get(op, 0) for op in ('sum', 'matmul', 'softmax')}
    assert counted == attention_core_macs(backbone, *shape)
    assert result['params'] == sum(p.numel() for p in backbone.parameters())
    assert sum(result['by_module'].values()) == result['flops']


def test_numbers_are_stable_and_add_up_for_a_config(capsys):
    first = main([MICRO_CONFIG, '--shape', '64'])
    second = main([MICRO_CONFIG, '--shape', '64'])
    assert first == second
    backbone = main(['--arch', 'micro', '--shape', '64'])
    by_module = first['by_module']
    assert by_module['backbone'] == backbone['flops']
    assert by_module['head'] == 384 * 1000  # the Linear(384, 1000)
    assert first['flops'] == backbone['flops'] + by_module['neck'] + by_module['head']
    assert first['params'] == backbone['params'] + 384 * 1000 + 1000
    out = capsys.readouterr().out
    assert 'FLOPs (MACs): ' in out and 'softmax' in out


def test_micro_matches_the_paper():
    """Paper: TransNeXt-Micro 2.7G FLOPs and 12.8M parameters at 224x224."""
    result = main([MICRO_CONFIG])
    assert round(result['flops'] / 1e9, 1) == 2.7
    assert round(result['params'] / 1e6, 1) == 12.8


def test_bad_arguments():
    with pytest.raises(SystemExit):
        main([])  # neither a config nor --arch
    with pytest.raises(SystemExit):
        main(['--arch', 'micro', '--shape', '16'])
    with pytest.raises(SystemExit):
        main(['--arch', 'huge'])


def test_a_peer_backbone_from_a_toolbox_config():
    """Another toolbox's backbone is counted too: mmdet's SwinTransformer (whose ``train()``
    returns None), with its window attention's two matmuls and softmax per window and head."""
    import mmdet
    config = osp.join(
        osp.dirname(mmdet.__file__), '.mim', 'configs', 'swin',
        'mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py')
    result = main([
        config, '--backbone-only', '--shape', '56', '--cfg-options',
        'model.backbone.depths=[2,2,2,2]'
    ])
    # 56x56 -> 14x14, 7x7, 4x4 and 2x2 tokens; windows of 7x7 = 49 tokens (smaller maps padded
    # to one window): 4, 1, 1, 1 windows of 96, 192, 384, 768 channels in 3, 6, 12, 24 heads.
    windows, channels, heads = (4, 1, 1, 1), (96, 192, 384, 768), (3, 6, 12, 24)
    blocks = 2
    assert result['by_operator']['matmul'] == blocks * sum(2 * n * 49 * 49 * c
                                                           for n, c in zip(windows, channels))
    assert result['by_operator']['softmax'] == blocks * sum(n * h * 49 * 49
                                                            for n, h in zip(windows, heads))
