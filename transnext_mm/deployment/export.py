# Copyright (c) transnext-mm contributors. All rights reserved.
"""Export a TransNeXt model to ONNX or to a ``torch.export`` program (``.pt2``)."""
import contextlib
import functools
import json
import os
import os.path as osp
from typing import Optional, Sequence, Tuple

import torch
import torch.nn as nn

from .model import (NETS, DeployError, build_model, load_config, output_names, preprocess_meta,
                    task_of)

FORMATS = ('onnx', 'torch-export')
FORMAT_SUFFIXES = {'onnx': '.onnx', 'torch-export': '.pt2'}
META_KEY = 'transnext_mm'
# The smallest side of a --dynamic graph: a multiple of 32 at which every exported head traces
# (UperNet's pyramid pooling guards on sides >= 61; the backbone alone needs 32).
MIN_DYNAMIC_SIDE = 64
MAX_DYNAMIC_SIDE = 4096
OPSET = 18


def prepare(config: str,
            checkpoint: Optional[str] = None,
            shape: Sequence[int] = (224, 224),
            batch: int = 1,
            backbone_only: bool = False,
            attn_impl: str = 'torch') -> Tuple[nn.Module, str, dict]:
    """Build the exported network and check the input shape.

    Args:
        config (str): Config file.
        checkpoint (str, optional): Checkpoint of the whole model. Defaults to None (random).
        shape (Sequence[int]): Input (H, W). Defaults to (224, 224).
        batch (int): Batch size. Defaults to 1.
        backbone_only (bool): Export the backbone's feature maps. Defaults to False.
        attn_impl (str): The backbone's ``attn_impl``: 'torch' to export, others only to
            benchmark PyTorch. Defaults to 'torch'.

    Returns:
        tuple: ``(net, task, meta)``: the network (eval), the task and the metadata written next
        to the graph (task, shape, preprocessing, classes, palette, output names).
    """
    cfg = load_config(config)
    task = task_of(cfg, config, backbone_only)
    if len(shape) != 2 or min(shape) < 1 or batch < 1:
        raise DeployError(f'--shape must be two positive ints H W and --batch >= 1, got shape '
                          f'{list(shape)}, batch {batch}')
    model = build_model(cfg, config, checkpoint, attn_impl)
    net = NETS[task](model).eval()
    backbone = model.backbone if hasattr(model, 'backbone') else model
    try:
        backbone._check_input(torch.zeros(1, backbone.in_channels, *shape))
    except ValueError as e:
        raise DeployError(f'--shape {shape[0]} {shape[1]}: below the backbone\'s minimum: {e}')
    meta = dict(
        task=task,
        config=config,
        shape=list(shape),
        batch=batch,
        **preprocess_meta(model.cfg),
        **model.dataset_meta)
    rcnn = (model.cfg.model.get('test_cfg') or {}).get('rcnn') or {}
    if task == 'detection' and 'mask_thr_binary' in rcnn:
        meta['mask_thr_binary'] = float(rcnn['mask_thr_binary'])
    return net, task, meta


def example_input(meta: dict, shape: Optional[Sequence[int]] = None, seed: int = 0) -> torch.Tensor:
    """A random normalised image batch of the exported batch size (and ``shape``)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(meta['batch'], 3, *(shape or meta['shape']), generator=gen)


def _dynamic_shapes(dynamic: bool):
    if not dynamic:
        return None
    height = torch.export.Dim('height', min=MIN_DYNAMIC_SIDE, max=MAX_DYNAMIC_SIDE)
    width = torch.export.Dim('width', min=MIN_DYNAMIC_SIDE, max=MAX_DYNAMIC_SIDE)
    return {'x': {2: height, 3: width}}


def export(net: nn.Module, meta: dict, out: str, fmt: str = 'onnx', dynamic: bool = False) -> str:
    """Export ``net`` (from :func:`prepare`) to ``out``.

    Args:
        net (nn.Module): The network.
        meta (dict): Its metadata; stored in the ONNX file (``metadata_props``) or in the
            ``.pt2`` archive's extra files, so that the demos need no config.
        out (str): Output file, ``.onnx`` for 'onnx', ``.pt2`` for 'torch-export'.
        fmt (str): 'onnx' or 'torch-export'. Defaults to 'onnx'.
        dynamic (bool): Leave height and width free (batch stays fixed). Defaults to False:
            the position biases are folded as constants at the export size.

    Returns:
        str: ``out``.
    """
    if fmt not in FORMATS:
        raise DeployError(f'--format must be one of {FORMATS}, got {fmt!r}')
    if not out.endswith(FORMAT_SUFFIXES[fmt]):
        raise DeployError(f'--out must end with {FORMAT_SUFFIXES[fmt]} for --format {fmt}, '
                          f'got {out}')
    x = example_input(meta)
    meta = dict(meta, dynamic=dynamic, format=fmt)
    with torch.no_grad():
        reference = net(x)  # fills the eval caches (biases, tables) at the export size
    outputs = reference if isinstance(reference, (tuple, list)) else (reference, )
    meta['outputs'] = output_names(meta['task'], len(outputs))
    os.makedirs(osp.dirname(osp.abspath(out)), exist_ok=True)
    folding = traceable_adaptive_pools(net) if dynamic else folded_position_biases(net, x)
    try:
        with torch.no_grad(), folding, static_feature_sizes(net, dynamic, meta['config']):
            program = torch.export.export(net, (x, ), dynamic_shapes=_dynamic_shapes(dynamic))
        if fmt == 'onnx':
            _export_onnx(program, x, out, meta)
        else:
            torch.export.save(program, out, extra_files={META_KEY: json.dumps(meta)})
    except DeployError:
        raise
    except Exception as e:
        mode = 'with --dynamic' if dynamic else f'at {meta["shape"]}'
        hint = ('; a fixed shape (without --dynamic) folds the position biases and needs no '
                'symbolic log-CPB' if dynamic else '')
        raise DeployError(
            f'{meta["config"]}: export to {fmt} {mode} failed '
            f'({type(e).__name__}: {str(e).strip().splitlines()[0][:400]}){hint}') from e
    return out


class _RecordedBias:
    """Wraps a layer's position bias (``LogCPB``) and keeps its dense form per size (what a
    traced graph asks for, whichever form the eager recording pass used)."""

    def __init__(self, pos_bias):
        self.pos_bias = pos_bias
        self.biases = {}

    def __call__(self, fc1, fc2, query_size, key_size, training: bool, form: str = 'dense'):
        bias = self.pos_bias(fc1, fc2, query_size, key_size, training, form)
        dense = bias if form == 'dense' else self.pos_bias(fc1, fc2, query_size, key_size, training,
                                                           'dense')
        self.biases[(tuple(query_size), tuple(key_size))] = dense.detach().clone()
        return bias

    def clear_cache(self) -> None:
        self.pos_bias.clear_cache()


class _FoldedBias(_RecordedBias):
    """Returns the recorded dense biases as constants (a dense bias is valid for either form);
    any other size is an error."""

    def __call__(self,
                 fc1,
                 fc2,
                 query_size,
                 key_size,
                 training: bool,
                 form: str = 'dense') -> torch.Tensor:
        sizes = (tuple(query_size), tuple(key_size))
        if sizes not in self.biases:
            raise DeployError(f'position bias folded at {sorted(self.biases)}, asked for {sizes}')
        return self.biases[sizes]


@contextlib.contextmanager
def folded_position_biases(net: nn.Module, x: torch.Tensor):
    """Within the context, every attention layer of ``net`` returns its position bias at the
    size of ``x`` as a constant (what the eval cache holds), so a fixed-shape graph carries the
    biases as initializers instead of the log-CPB MLP and its sparse gather."""
    from transnext_mm.models.layers.log_cpb import LogCPB
    layers = [m for m in net.modules() if isinstance(getattr(m, 'pos_bias', None), LogCPB)]
    originals = [m.pos_bias for m in layers]
    try:
        for m in layers:
            m.pos_bias = _RecordedBias(m.pos_bias)
        with torch.no_grad():
            net(x)
        for m in layers:
            folded = _FoldedBias(m.pos_bias.pos_bias)
            folded.biases = m.pos_bias.biases
            m.pos_bias = folded
        yield net
    finally:
        for m, original in zip(layers, originals):
            m.pos_bias = original


@contextlib.contextmanager
def traceable_adaptive_pools(net: nn.Module):
    """Within the context, the heads' ``nn.AdaptiveAvgPool2d`` layers (UperNet's pyramid pooling)
    pool from prefix sums, so a ``--dynamic`` graph pools with the bins of its input size
    (exporters decompose adaptive pooling with the bins of the example size)."""
    from transnext_mm.models.layers.adaptive_pool import adaptive_avg_pool2d_prefix
    pools = [m for m in net.modules() if isinstance(m, nn.AdaptiveAvgPool2d)]
    for pool in pools:
        size = pool.output_size
        if size is None or (not isinstance(size, int) and None in tuple(size)):
            raise DeployError(f'--dynamic: AdaptiveAvgPool2d with output_size {size} is not '
                              'supported')
        pool.forward = functools.partial(adaptive_avg_pool2d_prefix, output_size=size)
    try:
        yield
    finally:
        for pool in pools:
            del pool.forward


@contextlib.contextmanager
def static_feature_sizes(net: nn.Module, dynamic: bool, config: str):
    """Lets ``torch.export`` see the feature sizes that mmcv's multi-scale deformable attention
    (DINO, Mask2Former's pixel decoder) reads as tensor data, as the constants they are at a
    fixed input shape.

    mmdet builds the level sizes with ``torch._shape_as_tensor(feat)`` and later reads them back
    (``split`` sizes, ``linspace`` counts, ``view`` shapes); traced, each read is a
    data-dependent value and the export stops. Within the context, ``_shape_as_tensor`` builds
    the tensor from the (static) sizes and the fake-tensor mode keeps small tensors made from
    Python numbers as constants, so every read folds to a number. A no-op for networks without
    deformable attention; with ``--dynamic`` their sizes are symbolic and the export is refused.
    """
    from mmcv.ops import MultiScaleDeformableAttention
    if not any(isinstance(m, MultiScaleDeformableAttention) for m in net.modules()):
        yield
        return
    if dynamic:
        raise DeployError(f'{config}: --dynamic is not supported for models with multi-scale '
                          'deformable attention (DINO, Mask2Former): mmdet/mmseg read its level '
                          'sizes as tensor data; export at a fixed --shape')
    from torch._subclasses import fake_tensor
    shape_as_tensor, limit = torch._shape_as_tensor, fake_tensor.CONSTANT_NUMEL_LIMIT
    torch._shape_as_tensor = lambda t: torch.tensor(tuple(t.shape), dtype=torch.long)
    fake_tensor.CONSTANT_NUMEL_LIMIT = max(limit, 64)  # level sizes: (levels, 2) and cumsums
    try:
        yield
    finally:
        torch._shape_as_tensor, fake_tensor.CONSTANT_NUMEL_LIMIT = shape_as_tensor, limit


def _export_onnx(program, x: torch.Tensor, out: str, meta: dict) -> None:
    """The ``torch.export`` program to ONNX (opset 18). The ONNX-level optimiser is skipped:
    it took minutes on the backbone's graph, and ONNX Runtime optimises the graph itself."""
    import onnx
    onnx_program = torch.onnx.export(
        program, (x, ),
        dynamo=True,
        input_names=['input'],
        output_names=meta['outputs'],
        opset_version=OPSET,
        external_data=False,
        optimize=False,
        verbose=False)
    model = onnx_program.model_proto
    entry = model.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(meta)
    onnx.save(model, out)


def read_meta(path: str) -> dict:
    """The metadata that :func:`export` stored in an ``.onnx`` or ``.pt2`` file."""
    if not osp.isfile(path):
        raise DeployError(f'{path} is not a file')
    try:
        if path.endswith('.onnx'):
            import onnx
            model = onnx.load(path, load_external_data=False)
            props = {p.key: p.value for p in model.metadata_props}
        elif path.endswith('.pt2'):
            extra = {META_KEY: ''}
            torch.export.load(path, extra_files=extra)
            props = extra
        else:
            raise DeployError(f'{path}: expected an .onnx or .pt2 file')
    except DeployError:
        raise
    except Exception as e:
        raise DeployError(f'{path} is not a readable (corrupt?) exported model '
                          f'({type(e).__name__}: {str(e)[:300]})') from e
    if not props.get(META_KEY):
        raise DeployError(f'{path} was not written by tools/deployment/pytorch2onnx.py '
                          f'(no {META_KEY!r} metadata)')
    return json.loads(props[META_KEY])
