# Copyright (c) transnext-mm contributors. All rights reserved.
"""FLOPs and parameters of a TransNeXt backbone or of any mmdet/mmseg/mmpretrain config.

Examples::

    python tools/get_flops.py --arch tiny                      # backbone at 224x224
    python tools/get_flops.py configs/classification/transnext-tiny_in1k-224px.py
    python tools/get_flops.py CONFIG --shape 512 512 --backbone-only

What is counted (OpenMMLab's convention: one multiply-add counts as one FLOP) is traced with
mmengine's jit-based ``FlopAnalyzer``:

* its defaults: ``linear``/``matmul``/``bmm``/``einsum`` and convolutions as MACs,
  ``layer_norm`` as 5 per element, ``adaptive_avg_pool2d`` 1 per input element,
  ``upsample_bilinear2d`` 4 per output element;
* added here for attention, which the defaults miss or under-count:
  ``sum(a * b)`` (a reduction of an elementwise product: the 3x3 sliding-window scores
  ``q . k`` and the window's weighted sum of values) as one MAC per product,
  ``softmax`` as one per score, and ``scaled_dot_product_attention`` as its two matmuls.

TransNeXt attention layers are switched to their reference implementation while tracing
(``attn_impl='reference'``: the same math, with every product an explicit op), and ConvGLU gates to
PyTorch (the depthwise conv is then a counted conv, not the compiled kernel); the pooled path's
``q @ k_pool`` and ``attn @ v_pool`` are matmuls. Other elementwise ops (activations, the GLU
gate, residual adds, normalisation of q and k) count zero, like in mmengine/fvcore.
"""
import argparse
import functools
from collections import Counter
from typing import Dict, Optional, Sequence

import torch
import torch.nn as nn
from mmengine.analysis import FlopAnalyzer, parameter_count
from mmengine.analysis.jit_handles import get_shape
from mmengine.config import Config, DictAction
from mmengine.registry import init_default_scope

from transnext_mm.models.backbones import TransNeXt
from transnext_mm.models.layers import AggregatedAttention, ConvGLU, FullAttention

ATTENTION_TYPES = (AggregatedAttention, FullAttention)


def _numel(value) -> int:
    shape = get_shape(value)
    return int(torch.Size(shape).numel()) if shape is not None else 0


def sum_of_products_flop(inputs, outputs) -> int:
    """``sum(a * b, dim)`` is a batch of dot products: one MAC per product. A plain sum is 0."""
    producer = inputs[0].node()
    return _numel(inputs[0]) if producer.kind() == 'aten::mul' else 0


def softmax_flop(inputs, outputs) -> int:
    """One per score (the normalisation's adds and divides are not counted)."""
    return _numel(inputs[0])


def sdpa_flop(inputs, outputs) -> int:
    """``softmax(q @ k^T + mask) @ v``: the two matmuls plus one per score for the softmax."""
    q, k, v = (get_shape(t) for t in inputs[:3])
    batch = int(torch.Size(q[:-2]).numel())
    scores = batch * q[-2] * k[-2]
    return scores * q[-1] + scores * v[-1] + scores


ATTENTION_HANDLES = {
    'aten::sum': sum_of_products_flop,
    'aten::softmax': softmax_flop,
    'aten::scaled_dot_product_attention': sdpa_flop,
}


def use_reference_attention(model: nn.Module) -> int:
    """Switch every TransNeXt attention layer (and ConvGLU gate) to PyTorch; returns how many
    attention layers."""
    layers = [m for m in model.modules() if isinstance(m, ATTENTION_TYPES)]
    for layer in layers:
        layer.attn_impl = 'reference'
    for glu in model.modules():
        if isinstance(glu, ConvGLU):
            glu.impl = 'reference'
    return len(layers)


def analyze(model: nn.Module, inputs: tuple) -> dict:
    """Trace ``model(*inputs)`` and count FLOPs (MACs) and parameters.

    Returns:
        dict: ``flops`` (total), ``params``, ``by_module`` (FLOPs of each top-level child),
        ``by_operator`` (FLOPs per traced op type) and ``uncounted`` (op types seen in the trace
        that count zero, with how often they occur).
    """
    use_reference_attention(model)
    analyzer = FlopAnalyzer(model, inputs)
    analyzer.set_op_handle(**ATTENTION_HANDLES)
    analyzer.unsupported_ops_warnings(False).uncalled_modules_warnings(False)
    analyzer.tracer_warnings('none')
    children = [name for name, _ in model.named_children()]
    by_module = analyzer.by_module()
    return dict(
        flops=int(analyzer.total()),
        params=int(parameter_count(model)['']),
        by_module={name: int(by_module.get(name, 0))
                   for name in children},
        by_operator=dict(Counter(analyzer.by_operator()).most_common()),
        uncounted=dict(analyzer.unsupported_ops()),
    )


def build_backbone(arch: str, **kwargs) -> nn.Module:
    return TransNeXt(arch=arch, **kwargs).eval()


def _data_samples(scope: str, height: int, width: int):
    """Data samples with the image metainfo that detectors/segmentors need in 'tensor' mode."""
    meta = dict(
        img_shape=(height, width),
        ori_shape=(height, width),
        pad_shape=(height, width),
        batch_input_shape=(height, width),
        scale_factor=(1.0, 1.0))
    if scope == 'mmdet':
        from mmdet.structures import DetDataSample
        return [DetDataSample(metainfo=meta)]
    if scope == 'mmseg':
        from mmseg.structures import SegDataSample
        return [SegDataSample(metainfo=meta)]
    return None


def build_from_config(cfg: Config, height: int, width: int, backbone_only: bool) -> nn.Module:
    """Build the model of a config; its forward takes the image tensor ('tensor' mode)."""
    scope = cfg.get('default_scope')
    if scope not in ('mmdet', 'mmseg', 'mmpretrain'):
        raise ValueError(f"the config's default_scope must be 'mmdet', 'mmseg' or 'mmpretrain', "
                         f'got {scope!r}')
    init_default_scope(scope)
    from mmengine.registry import MODELS
    model_cfg = cfg.model.get('backbone') if backbone_only else cfg.model
    if model_cfg is None:
        raise ValueError('--backbone-only: the config has no model.backbone')
    model = MODELS.build(model_cfg)
    model.eval()  # not chained: some backbones' train() returns None (mmdet's SwinTransformer)
    if not backbone_only:
        model.forward = functools.partial(
            model.forward, data_samples=_data_samples(scope, height, width), mode='tensor')
    return model


def _format(number: float, unit: str = '') -> str:
    for scale, suffix in ((1e9, 'G'), (1e6, 'M'), (1e3, 'K')):
        if abs(number) >= scale:
            return f'{number / scale:.3f}{suffix}{unit}'
    return f'{number:.0f}{unit}'


def report(result: dict, title: str, shape: Sequence[int], verbose: bool = False) -> str:
    lines = [
        '=' * 60, title, f'Input shape: {tuple(shape)}',
        f'FLOPs (MACs): {_format(result["flops"])}', f'Params: {_format(result["params"])}',
        '-' * 60, 'FLOPs by module:'
    ]
    lines += [
        f'  {name:<24}{_format(flops):>12}' for name, flops in result['by_module'].items() if flops
    ]
    lines.append('FLOPs by operator:')
    lines += [f'  {op:<40}{_format(flops):>12}' for op, flops in result['by_operator'].items()]
    if verbose:
        lines.append('Traced ops counted as zero (elementwise, shape and index ops):')
        lines += [f'  {op:<40}{count:>8}x' for op, count in result['uncounted'].items()]
    lines.append('=' * 60)
    return '\n'.join(lines)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('config', nargs='?', help='an mmdet/mmseg/mmpretrain config file')
    parser.add_argument(
        '--arch',
        choices=sorted(TransNeXt.arch_settings),
        help='count a bare TransNeXt backbone of this arch instead of a config')
    parser.add_argument(
        '--shape', type=int, nargs='+', default=[224], help='input height [width]. Defaults to 224')
    parser.add_argument(
        '--backbone-only', action='store_true', help="count only the config's backbone")
    parser.add_argument(
        '--verbose', action='store_true', help='also list the traced op types that count zero')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override config settings, as in tools/train.py')
    args = parser.parse_args(argv)
    if (args.config is None) == (args.arch is None):
        parser.error('give exactly one of CONFIG or --arch')
    if len(args.shape) not in (1, 2) or min(args.shape) < 32:
        parser.error(f'--shape takes 1 or 2 sizes of at least 32 pixels, got {args.shape}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    height, width = (args.shape * 2)[:2]
    if args.arch:
        model, title = build_backbone(args.arch), f'TransNeXt-{args.arch} backbone'
    else:
        cfg = Config.fromfile(args.config)
        if args.cfg_options:
            cfg.merge_from_dict(args.cfg_options)
        model = build_from_config(cfg, height, width, args.backbone_only)
        title = args.config + (' (backbone only)' if args.backbone_only else '')
    inputs = (torch.randn(1, 3, height, width), )
    try:
        result = analyze(model, inputs)
    except Exception as e:
        if args.arch or args.backbone_only:
            raise
        raise RuntimeError(f"could not trace the whole model of {args.config} in 'tensor' mode "
                           f'({type(e).__name__}: {e}); count its backbone with '
                           '--backbone-only') from e
    print(report(result, title, inputs[0].shape, args.verbose))
    return result


if __name__ == '__main__':
    main()
