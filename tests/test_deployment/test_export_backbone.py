"""The TransNeXt backbone exported at a fixed shape (position biases folded as constants):
ONNX Runtime and the loaded ``torch.export`` program against eager PyTorch (batch 2, odd size).

The backbone is the tests' shallow one (micro's widths, one block per stage): every block is
exported the same way, so depth would only add tracing time."""
import numpy as np
import pytest
import torch

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

from transnext_mm.deployment import example_input  # noqa: E402
from transnext_mm.deployment import DeployError, OrtModel, compare, export, read_meta, verify
from transnext_mm.deployment.export import folded_position_biases  # noqa: E402
from transnext_mm.deployment.model import BackboneNet  # noqa: E402
from transnext_mm.models.backbones import TransNeXt  # noqa: E402
from transnext_mm.ops import dispatch  # noqa: E402

META = dict(
    task='backbone',
    config='TransNeXt-shallow',
    shape=[64, 40],
    batch=2,
    mean=[0., 0., 0.],
    std=[1., 1., 1.],
    bgr_to_rgb=False)


@pytest.fixture(scope='module')
def backbone(shallow_arch):
    torch.manual_seed(0)
    model = TransNeXt(
        arch=shallow_arch, img_size=128, pos_bias_mode='extrapolate', attn_impl='torch')
    return BackboneNet(model).eval()


@pytest.mark.parametrize('fmt, suffix', [('onnx', '.onnx'), ('torch-export', '.pt2')])
def test_backbone_maps_equal_pytorch(backbone, tmp_path, fmt, suffix):
    path = str(tmp_path / f'backbone{suffix}')
    export(backbone, META, path, fmt)
    meta = read_meta(path)
    assert meta['outputs'] == ['feat0', 'feat1', 'feat2', 'feat3'] and not meta['dynamic']
    [(shape, report)] = verify(backbone, meta, path)
    assert report['ok'] and report['rel_err'] <= 1e-4, report
    if fmt == 'onnx':
        maps = OrtModel(path)(example_input(meta).numpy())
        assert [m.shape for m in maps] == [(2, 48, 16, 10), (2, 96, 8, 5), (2, 192, 4, 3),
                                           (2, 384, 2, 2)]
        with pytest.raises(DeployError, match='exported at'):
            OrtModel(path)(np.zeros((2, 3, 64, 64), np.float32))


def test_folded_biases_are_restored_and_size_checked(backbone):
    x = example_input(META)
    attn = backbone.backbone.block1[0].attn
    original = attn.pos_bias
    with folded_position_biases(backbone, x):
        assert attn.pos_bias is not original
        with pytest.raises(DeployError, match='folded at'):
            backbone(example_input(META, [64, 64]))
    assert attn.pos_bias is original


@pytest.mark.skipif(not dispatch.BUILD.built, reason='transnext_mm._ext is not built')
def test_folding_records_dense_biases_when_the_op_reads_tables(shallow_arch):
    """The recording pass runs eagerly, where the compiled CPU op takes the pooled bias in table
    form; the folded constants are the dense biases a traced graph asks for."""
    torch.manual_seed(0)
    net = BackboneNet(
        TransNeXt(arch=shallow_arch, img_size=128, pos_bias_mode='extrapolate',
                  attn_impl='op')).eval()
    x = example_input(META)
    with torch.no_grad():
        expected = net(x)
    with folded_position_biases(net, x):
        attn = net.backbone.block1[0].attn
        assert all(b.dim() == 3 for b in attn.pos_bias.biases.values())
        with torch.no_grad():
            folded = net(x)
    for a, b in zip(expected, folded):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_corrupt_file_is_named(tmp_path):
    bad = tmp_path / 'bad.onnx'
    bad.write_bytes(b'\x00garbage')
    with pytest.raises(DeployError, match='not a readable'):
        OrtModel(str(bad))


def test_compare_detections_rejects_moved_boxes():
    boxes = np.array([[[0, 0, 10, 10], [5, 5, 20, 20]]], np.float32)
    scores = np.array([[0.9, 0.5]], np.float32)
    labels = np.array([[1, 2]])
    assert compare('detection', [boxes, scores, labels], [boxes, scores, labels])['ok']
    moved = boxes + np.array([0, 0, 1, 0], np.float32)
    assert not compare('detection', [moved, scores, labels], [boxes, scores, labels])['ok']
    assert not compare('detection', [boxes, scores, labels[:, ::-1]], [boxes, scores, labels])['ok']


def test_compare_names_non_finite_outputs():
    boxes = np.array([[[0, 0, 10, 10]]], np.float32)
    scores, labels = np.array([[0.9]], np.float32), np.array([[1]])
    nan_scores = np.full_like(scores, np.nan)
    report = compare('detection', [boxes, scores, labels], [boxes, nan_scores, labels])
    assert not report['ok'] and report['error'] == 'PyTorch output 1 has NaN or Inf values'
    report = compare('backbone', [np.array([np.inf], np.float32)], [np.ones(1, np.float32)])
    assert not report['ok'] and report['error'] == 'exported output 0 has NaN or Inf values'
