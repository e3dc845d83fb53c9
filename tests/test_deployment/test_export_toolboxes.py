"""Export to ONNX / torch.export and compare ONNX Runtime (or the loaded program) with PyTorch.

The demo configs with the tests' shallow backbone (micro's widths, one block per stage; DINO
with one encoder and two decoder layers) at small sizes: one export per mechanism, each exported
file reused by the tests of its family. The tolerances are those of ``--verify``
(``transnext_mm.deployment.TOLERANCES``).
"""
import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip('onnxruntime')
pytest.importorskip('onnxscript')

from transnext_mm.deployment import export  # noqa: E402
from transnext_mm.deployment import DeployError, OrtModel, example_input, prepare, read_meta, verify

ROOT = Path(__file__).resolve().parents[2]
CLS = 'configs/classification/transnext-micro_in1k-224px.py'
UPERNET = 'configs/demo/upernet_transnext-micro_synthetic-ade20k.py'
MASK_RCNN = 'configs/demo/mask-rcnn_transnext-micro_fpn_synthetic-coco.py'
MASK2FORMER = 'configs/demo/mask2former_transnext-micro_synthetic-ade20k.py'
DINO = 'configs/demo/dino-4scale_transnext-micro_synthetic-coco.py'


def _tool(path='tools/deployment/pytorch2onnx.py'):
    spec = importlib.util.spec_from_file_location(Path(path).stem, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _dino(shallow_config):
    """DINO with one encoder layer and two decoder layers (the boxes refined between them)."""
    return shallow_config(DINO, encoder=dict(num_layers=1), decoder=dict(num_layers=2))


def _export(tmp_path_factory,
            config,
            shape,
            batch=1,
            fmt='onnx',
            dynamic=False,
            backbone_only=False):
    net, task, meta = prepare(config, None, shape, batch, backbone_only)
    suffix = '.onnx' if fmt == 'onnx' else '.pt2'
    out = str(tmp_path_factory.mktemp('deploy') / f'{Path(config).stem}{suffix}')
    export(net, meta, out, fmt, dynamic)
    return net, read_meta(out), out


def _check(net, meta, path, shapes=()):
    results = verify(net, meta, path, shapes)
    for shape, report in results:
        assert report['ok'], f'{path} at {shape}: {report}'
    return results


@pytest.fixture(scope='module')
def upernet_onnx(tmp_path_factory, shallow_config):
    # --dynamic: log-CPB in the graph, the pyramid pooling's bins follow the input size
    return _export(tmp_path_factory, shallow_config(UPERNET), (64, 96), batch=2, dynamic=True)


def test_segmentation_upernet(upernet_onnx):
    net, meta, path = upernet_onnx
    assert meta['task'] == 'segmentation' and meta['batch'] == 2 and meta['dynamic']
    logits = OrtModel(path)(example_input(meta).numpy())[0]
    assert logits.shape == (2, 150, 64, 96)
    # the export size and two others, one with sides that are not multiples of 32
    for shape, report in _check(net, meta, path, [(96, 64), (128, 152)]):
        assert report['rel_err'] <= 1e-3 and report['argmax_agreement'] >= 0.999, report


def test_verification_fails_on_a_changed_graph(upernet_onnx, tmp_path):
    """A corrupted weight in the graph makes --verify's comparison fail."""
    import onnx
    from onnx import numpy_helper
    net, meta, path = upernet_onnx
    model = onnx.load(path)
    biggest = max(model.graph.initializer, key=lambda t: int(np.prod(t.dims)))
    array = numpy_helper.to_array(biggest).copy()
    array *= 1.5
    biggest.CopyFrom(numpy_helper.from_array(array, biggest.name))
    changed = str(tmp_path / 'changed.onnx')
    onnx.save(model, changed)
    [(_, report)] = verify(net, meta, changed)
    assert not report['ok'] and report['rel_err'] > 1e-3


def test_segmentation_mask2former(tmp_path_factory, shallow_config):
    """Mask2Former: the pixel decoder's multi-scale deformable attention reads its level sizes
    as tensor data (exported as constants at the fixed shape)."""
    net, meta, path = _export(tmp_path_factory, shallow_config(MASK2FORMER), (64, 96))
    # the export shape with two random inputs: nothing of the example input is baked in
    for shape, report in _check(net, meta, path, [(64, 96)]):
        assert report['rel_err'] <= 1e-3 and report['argmax_agreement'] >= 0.999, report


@pytest.fixture(scope='module')
def dino_onnx(tmp_path_factory, shallow_config):
    return _export(tmp_path_factory, _dino(shallow_config), (64, 96))


def test_detection_dino(dino_onnx):
    net, meta, path = dino_onnx
    assert meta['task'] == 'detection' and meta['outputs'] == ['boxes', 'scores', 'labels']
    boxes, scores, labels = OrtModel(path)(example_input(meta).numpy())
    assert boxes.shape == (1, 100, 4) and scores.shape == labels.shape == (1, 100)
    for shape, report in _check(net, meta, path, [(64, 96)]):
        matched, total = map(int, report['matched'].split('/'))
        assert total >= 50 and report['min_iou'] >= 0.99, report


@pytest.fixture(scope='module')
def mask_rcnn_onnx(tmp_path_factory, shallow_config):
    from test_two_stage import sparse_config  # fewer detections than max_per_img: padding
    config = shallow_config(sparse_config(tmp_path_factory.mktemp('cfg')))
    return _export(tmp_path_factory, config, (64, 96))


def test_detection_mask_rcnn(mask_rcnn_onnx):
    """End to end with NMS and RoIAlign as ONNX ops; masks are the mask head's probabilities."""
    import onnx
    net, meta, path = mask_rcnn_onnx
    assert meta['outputs'] == ['boxes', 'scores', 'labels', 'masks']
    ops = {node.op_type for node in onnx.load(path).graph.node}
    assert {'NonMaxSuppression', 'RoiAlign'} <= ops
    boxes, scores, labels, masks = OrtModel(path)(example_input(meta).numpy())
    assert boxes.shape == (1, 50, 4) and masks.shape == (1, 50, 28, 28)
    assert (labels == -1).any() and (labels >= 0).any()  # padding after the detections
    for shape, report in _check(net, meta, path, [(64, 96)]):
        assert report['max_mask_diff'] <= 1e-3 and report['min_iou'] >= 0.99, report


def test_random_weights_are_the_models_own_initialisation(shallow_config):
    """Without a checkpoint the model is initialised by its init_weights: mmdet's DINO allocates
    `level_embed` uninitialised (zeros or leftover memory, now and then NaN: CI once exported a
    DINO whose every output was NaN)."""
    net, _, _ = prepare(_dino(shallow_config), None, (64, 96), 1)
    level_embed = net.model.level_embed.detach()
    assert 0.8 < float(level_embed.std()) < 1.2  # init_weights: normal_(level_embed)
    assert all(bool(p.isfinite().all()) for p in net.parameters())


def test_dino_dynamic_is_refused(tmp_path, shallow_config):
    net, _, meta = prepare(_dino(shallow_config), None, (64, 96), 1)
    with pytest.raises(
            DeployError,
            match='--dynamic is not supported for models with '
            'multi-scale deformable attention'):
        export(net, meta, str(tmp_path / 'dino.onnx'), dynamic=True)


# ---------------------------------------------------------------------------- the tool
def test_tool_exports_and_verifies(tmp_path, capsys, shallow_config):
    out = tmp_path / 'cls.onnx'
    code = _tool().main([shallow_config(CLS), '--shape', '64', '64', '--out', str(out), '--verify'])
    text = capsys.readouterr().out
    assert code == 0, text
    assert 'verify onnx vs PyTorch at 64x64: rel_err=' in text and '-> OK' in text


@pytest.mark.parametrize('args, message', [
    ([CLS, '--shape', '16', '16'], "below the backbone's minimum"),
    ([CLS, '--shape', '64', '64', '--format', 'torch-export'], '--out must end with .pt2'),
    (['configs/_base_/models/upernet_transnext.py', '--shape', '64', '64'], "default_scope None"),
])
def test_tool_rejects_bad_input(tmp_path, capsys, args, message):
    code = _tool().main([str(ROOT / args[0]), *args[1:], '--out', str(tmp_path / 'x.onnx')])
    err = capsys.readouterr().err
    assert code == 2 and message in err, err


def test_tool_rejects_unsupported_detector(tmp_path, capsys):
    config = tmp_path / 'cascade.py'
    config.write_text(f"_base_ = ['{ROOT / MASK_RCNN}']\nmodel = dict(type='CascadeRCNN')\n")
    code = _tool().main([str(config), '--shape', '64', '64', '--out', str(tmp_path / 'x.onnx')])
    err = capsys.readouterr().err
    assert code == 2 and 'is a CascadeRCNN; end-to-end detection export supports' in err, err


def test_tool_rejects_unreadable_checkpoint(tmp_path, capsys):
    bad = tmp_path / 'bad.pth'
    bad.write_bytes(b'not a checkpoint')
    code = _tool().main(
        [str(ROOT / CLS),
         str(bad), '--shape', '64', '64', '--out',
         str(tmp_path / 'x.onnx')])
    err = capsys.readouterr().err
    assert code == 2 and f'checkpoint: {bad} cannot be loaded' in err, err


# ---------------------------------------------------------------------------- the demos
# In this process (tests/test_tools/test_demo.py does the same); the demos run as scripts in
# tests/test_detection/test_det_end_to_end.py and tests/test_segmentation/test_seg_tools.py.
def test_seg_demo_onnx(upernet_onnx, tmp_path, capsys):
    out = tmp_path / 'seg.png'
    # a batch-2 file: the demo feeds the image twice and draws the first
    _tool('tools/demo/seg_demo.py').main(
        ['skimage:chelsea', upernet_onnx[2], '--out-file',
         str(out)])
    text = capsys.readouterr().out
    assert out.stat().st_size > 0 and 'wrote' in text
    import cv2
    assert cv2.imread(str(out)).shape == (300, 451, 3)


@pytest.mark.parametrize(
    'exported, image, size',
    [
        ('dino_onnx', 'astronaut', (512, 512)),
        ('mask_rcnn_onnx', 'coffee', (400, 600)),  # masks pasted and drawn too
    ])
def test_det_demo_onnx(request, tmp_path, capsys, exported, image, size):
    out = tmp_path / 'det.png'
    _tool('tools/demo/det_demo.py').main([
        f'skimage:{image}',
        request.getfixturevalue(exported)[2], '--out-file',
        str(out), '--score-thr', '0'
    ])
    text = capsys.readouterr().out
    assert 'wrote' in text and 'detections above 0.0' in text, text
    import cv2
    assert cv2.imread(str(out)).shape == (*size, 3)


def test_benchmark_onnx(upernet_onnx, tmp_path):
    out = tmp_path / 'bench.json'
    # a script: it times each implementation in a process of its own
    result = subprocess.run([
        sys.executable, 'tools/benchmark.py', '--onnx', upernet_onnx[2], '--attn-impl', 'torch',
        '--warmup', '0', '--repeats', '1', '--threads', '1', '--json',
        str(out)
    ],
                            cwd=ROOT,
                            capture_output=True,
                            text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import json
    rows = json.loads(out.read_text())['results']
    assert [r['impl'] for r in rows] == ['ort', 'torch']
    assert all('error' not in r and r['median_s'] > 0 for r in rows)
