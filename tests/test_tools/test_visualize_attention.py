"""tools/visualize_attention.py: recomputed attention probabilities, attention and ERF PNGs."""
import numpy as np
import pytest
import torch
from PIL import Image

import tools.visualize_attention as vis
from transnext_mm.ops.aggregated_attention import window_tables


@pytest.fixture(scope='module')
def micro():
    torch.manual_seed(0)
    model = vis.build_backbone('micro', None, img_size=64, out_indices=(0, 1, 2, 3))
    for p in model.parameters():  # non-trivial biases, norms and position biases
        p.data.add_(0.05 * torch.randn_like(p))
    return model


def test_aggregated_attention_probabilities(micro):
    x = torch.randn(1, 3, 64, 80)
    # capture_attention raises unless the probabilities rebuild the layer's real output.
    maps = vis.capture_attention(micro, x, stage=1, block=-1)
    height, width = maps['grid']
    assert (height, width) == (16, 20) and maps['pool_grid'] == (2, 2)
    local, pool = maps['local'], maps['pool']
    assert local.shape == (1, 2, height * width, 9) and pool.shape == (1, 2, height * width, 4)
    torch.testing.assert_close(local.sum(-1) + pool.sum(-1), torch.ones(1, 2, height * width))
    valid, _ = window_tables(height, width, x.device)
    assert (local[..., ~valid] == 0).all() and (local[..., valid] > 0).all()
    assert (pool > 0).all()


def test_full_attention_probabilities(micro):
    maps = vis.capture_attention(micro, torch.randn(1, 3, 64, 64), stage=4, block=1)
    assert maps['grid'] == (2, 2) and maps['full'].shape == (1, 16, 4, 4)
    torch.testing.assert_close(maps['full'].sum(-1), torch.ones(1, 16, 4))


def test_wrong_recomputation_is_caught(micro, monkeypatch):
    original = vis.aggregated_attention_maps

    def off_by_a_bit(*args):
        maps = original(*args)
        return dict(maps, output=maps['output'] * 1.01)

    monkeypatch.setattr(vis, 'aggregated_attention_maps', off_by_a_bit)
    with pytest.raises(RuntimeError, match='does not rebuild the output of stage 2 block 0'):
        vis.capture_attention(micro, torch.randn(1, 3, 64, 64), stage=2, block=0)


def test_bad_layer_and_query(micro):
    with pytest.raises(ValueError, match='block must be in -2..1 for stage 1'):
        vis.attention_layer(micro, 1, 2)
    with pytest.raises(ValueError, match='stage must be 1, 2, 3 or 4'):
        vis.attention_layer(micro, 5, 0)
    with pytest.raises(ValueError, match='--query must lie inside'):
        vis.query_index((64, 3), 64, (16, 16))
    assert vis.query_index(None, 64, (16, 20)) == (8, 10)
    assert vis.query_index((63, 0), 64, (16, 16)) == (0, 15)


@pytest.mark.parametrize('stage,head', [(2, '1'), (4, 'mean')])
def test_attention_png(tmp_path, stage, head):
    out = vis.main([
        'attention', '--arch', 'micro', '--img-size', '64', '--stage',
        str(stage), '--head', head, '--image', 'coffee', '--query', '10', '50', '--out-dir',
        str(tmp_path)
    ])
    assert out == str(tmp_path / f'attention_micro_stage{stage}_block0_head{head}_coffee.png')
    with Image.open(out) as png:
        assert png.format == 'PNG' and png.width > png.height > 200


def test_erf_png_and_its_centre(tmp_path):
    out = vis.main([
        'erf', '--arch', 'micro', '--img-size', '64', '--stage', '1', '--images', 'chelsea',
        'astronaut', '--out-dir',
        str(tmp_path)
    ])
    with Image.open(out) as png:
        assert png.format == 'PNG'
    model = vis.build_backbone('micro', None, 64, out_indices=(0, ))
    inputs = [vis.preprocess(vis.load_image(name), 64)[0] for name in ('chelsea', 'coffee')]
    erf = vis.effective_receptive_field(model, inputs)
    assert erf.shape == (64, 64) and (erf >= 0).all()
    # Stage 1's central output pixel (8, 8) sees input pixels 29..35 through its 7x7 stride-4
    # patch embedding: its strongest gradients are there.
    row, col = np.unravel_index(erf.argmax(), erf.shape)
    assert 29 <= row <= 35 and 29 <= col <= 35


def test_unknown_image():
    with pytest.raises(FileNotFoundError, match="neither a file nor one of scikit-image"):
        vis.load_image('no_such_image.png')
