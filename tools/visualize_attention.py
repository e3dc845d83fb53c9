# Copyright (c) transnext-mm contributors. All rights reserved.
"""Attention maps (the paper's Figure 7) and effective receptive fields (Figures 2 and 8).

Examples::

    # Where the centre query of stage 3, block 0, head 0 looks, over the sliding-window path and
    # the pooled path (chelsea, astronaut and coffee are scikit-image's photos; or a file path):
    python tools/visualize_attention.py attention --arch tiny \
        --checkpoint transnext_tiny_224_1k.pth --image chelsea --stage 3 --block 0 --head 0
    # Effective receptive field of stage 4's central output pixel, over several images:
    python tools/visualize_attention.py erf --arch tiny --checkpoint transnext_tiny_224_1k.pth \
        --stage 4 --images chelsea astronaut coffee

Without ``--checkpoint`` the backbone has random weights. ``--checkpoint`` takes a released
checkpoint or any mmpretrain/mmdet/mmseg checkpoint of a TransNeXt model.

The attention probabilities are not stored by the backbone: a forward hook on the chosen block's
``attn`` module takes the layer's input and recomputes its softmax from the layer's own
parameters, with the math of :func:`transnext_mm.ops.aggregated_attention_reference`. The
recomputed probabilities are checked by rebuilding the layer's output from them, which must
match the output the hook saw.
"""
import argparse
import os
import os.path as osp
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from mmengine.runner.checkpoint import CheckpointLoader
from PIL import Image

from transnext_mm.models.backbones import TransNeXt
from transnext_mm.models.backbones.transnext import STAGE_STRIDES
from transnext_mm.models.layers import AggregatedAttention, FullAttention
from transnext_mm.ops.aggregated_attention import WINDOW, aggregated_attention_probs, unfold_window
from transnext_mm.utils.image import SKIMAGE_PHOTOS, SKIMAGE_PREFIX, load_image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CROP_RATIO = 0.875  # ImageNet evaluation: resize to size / 0.875, centre crop (below 384)


# ----------------------------------------------------------------------------- inputs
def preprocess(image: np.ndarray, size: int) -> Tuple[torch.Tensor, np.ndarray]:
    """ImageNet evaluation preprocessing; returns the normalised batch and the shown crop.

    Below 384 the short side is resized (bicubic) to ``size / 0.875`` and the centre
    ``size x size`` is cropped; from 384 on the whole image is resized to ``size x size``.
    """
    pil = Image.fromarray(image)
    if size >= 384:
        pil = pil.resize((size, size), Image.BICUBIC)
    else:
        short = int(size / CROP_RATIO)
        width, height = pil.size
        scale = short / min(width, height)
        pil = pil.resize((max(short, int(width * scale)), max(short, int(height * scale))),
                         Image.BICUBIC)
        left, top = (pil.size[0] - size) // 2, (pil.size[1] - size) // 2
        pil = pil.crop((left, top, left + size, top + size))
    shown = np.array(pil)
    x = torch.from_numpy(shown).float().div(255).permute(2, 0, 1)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    x = (x - mean[:, None, None]) / std[:, None, None]
    return x.unsqueeze(0), shown


def build_backbone(arch: str,
                   checkpoint: Optional[str],
                   img_size: int,
                   out_indices: Sequence[int] = (3, )) -> TransNeXt:
    """A TransNeXt backbone in eval mode, with the weights of ``checkpoint`` if given."""
    model = TransNeXt(arch=arch, img_size=img_size, out_indices=tuple(out_indices))
    if checkpoint:
        model.load_released_weights(
            CheckpointLoader.load_checkpoint(checkpoint, map_location='cpu'), source=checkpoint)
    return model.eval()


def attention_layer(model: TransNeXt, stage: int, block: int):
    """The ``attn`` module of block ``block`` (negative counts from the end) of ``stage`` (1-4)."""
    if stage not in (1, 2, 3, 4):
        raise ValueError(f'stage must be 1, 2, 3 or 4, got {stage}')
    blocks = getattr(model, f'block{stage}')
    if not -len(blocks) <= block < len(blocks):
        raise ValueError(f'block must be in {-len(blocks)}..{len(blocks) - 1} for stage {stage} '
                         f'of this arch ({len(blocks)} blocks), got {block}')
    return blocks[block].attn


# ------------------------------------------------------------------ attention probabilities
def aggregated_attention_maps(attn: AggregatedAttention, x: torch.Tensor, height: int, width: int,
                              pool_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """Recompute an aggregated-attention layer's softmax from its parameters and its input.

    Returns:
        dict: ``local`` (B, heads, N, 9) window probabilities (``F.unfold`` order, 0 outside the
        image), ``pool`` (B, heads, N, Np) pooled-path probabilities and ``output`` (B, N, C),
        the layer output rebuilt from them.
    """
    args = attn.core_inputs(x, height, width, pool_size)
    q, k, v, k_pool, v_pool, rpb_local, bias_pool, token_weight = args[:8]
    a_local, a_pool = aggregated_attention_probs(q, k, k_pool, rpb_local, bias_pool, height, width)
    out = ((a_local + token_weight).unsqueeze(-1) * unfold_window(v, height, width)).sum(-2)
    return dict(local=a_local, pool=a_pool, output=attn.project(out + a_pool @ v_pool))


def full_attention_maps(attn: FullAttention, x: torch.Tensor, height: int,
                        width: int) -> Dict[str, torch.Tensor]:
    """Recompute a full-attention (stage 4) layer's softmax: ``full`` (B, heads, N, N)."""
    B, N, C = x.shape
    q, k, v, bias = attn.attention_inputs(x, height, width)
    probs = (q @ k.transpose(-2, -1) + bias).softmax(dim=-1)
    output = attn.proj((probs @ v).transpose(1, 2).reshape(B, N, C))
    return dict(full=probs, output=output)


def capture_attention(model: TransNeXt, x: torch.Tensor, stage: int,
                      block: int) -> Dict[str, object]:
    """Run ``model`` on ``x`` and return the attention maps of one layer (see above).

    Also returns ``grid`` (the stage's H, W) and ``pool_grid``; raises if the maps do not
    rebuild the output that the layer produced.
    """
    attn = attention_layer(model, stage, block)
    seen = {}

    def hook(module, args, output):
        seen['args'], seen['output'] = args, output

    handle = attn.register_forward_hook(hook)
    try:
        with torch.no_grad():
            model(x)
            layer_input, height, width, pool_size = seen['args'][:4]
            if isinstance(attn, AggregatedAttention):
                maps = aggregated_attention_maps(attn, layer_input, height, width, pool_size)
            else:
                maps = full_attention_maps(attn, layer_input, height, width)
                pool_size = (height, width)
    finally:
        handle.remove()
    error = (maps['output'] - seen['output']).abs().max().item()
    scale = seen['output'].abs().max().item()
    if error > 1e-4 * max(scale, 1.0):
        raise RuntimeError(f'the recomputed attention does not rebuild the output of stage '
                           f'{stage} block {block} (max error {error:.3g}): the layer\'s math '
                           'changed; update tools/visualize_attention.py')
    maps.update(grid=(height, width), pool_grid=tuple(pool_size))
    return maps


def query_index(query_xy: Optional[Sequence[float]], image_size: int,
                grid: Tuple[int, int]) -> Tuple[int, int]:
    """Feature-grid (row, col) of the query at image pixel (x, y); the centre if None."""
    height, width = grid
    if query_xy is None:
        return height // 2, width // 2
    x, y = query_xy
    if not (0 <= x < image_size and 0 <= y < image_size):
        raise ValueError(f'--query must lie inside the {image_size}x{image_size} input, '
                         f'got ({x}, {y})')
    return min(int(y * height / image_size),
               height - 1), min(int(x * width / image_size), width - 1)


def select_head(maps: torch.Tensor, head) -> np.ndarray:
    """(1, heads, ...) -> (...) for one head index, or the mean over heads for 'mean'."""
    if head == 'mean':
        return maps[0].mean(0).numpy()
    if not 0 <= head < maps.shape[1]:
        raise ValueError(f"head must be 'mean' or in 0..{maps.shape[1] - 1}, got {head}")
    return maps[0, head].numpy()


# --------------------------------------------------------------------------- drawing
def _overlay(ax, image: np.ndarray, heat: np.ndarray, title: str, cmap='jet', **kwargs):
    size = image.shape[0]
    ax.imshow(image)
    im = ax.imshow(
        heat, cmap=cmap, alpha=0.55, extent=(0, size, size, 0), interpolation='nearest', **kwargs)
    ax.set_title(title, fontsize=9)
    ax.axis('off')
    return im


def draw_attention(image: np.ndarray, maps: Dict[str, object], row: int, col: int, head, title: str,
                   out_file: str) -> None:
    """Draw the maps of one query over the image and save a PNG."""
    size = image.shape[0]
    height, width = maps['grid']
    cell = size / width
    centre = ((col + 0.5) * cell, (row + 0.5) * cell)
    query = row * width + col

    if 'full' in maps:
        fig = Figure(figsize=(8, 4.3))
        axes = fig.subplots(1, 2)
        full = select_head(maps['full'], head)[query].reshape(height, width)
        _overlay(axes[1], image, full, f'full attention ({height}x{width} keys)')
        panels = axes
    else:
        fig = Figure(figsize=(16, 4.5))
        axes = fig.subplots(1, 4)
        local = select_head(maps['local'], head)[query]  # (9,)
        pool = select_head(maps['pool'], head)[query]
        pool_h, pool_w = maps['pool_grid']
        local_share, pool_share = local.sum(), pool.sum()

        # Sliding-window path: its 3x3 probabilities on the feature grid, zoomed on the query.
        window = np.zeros((height, width))
        for j, p in enumerate(local):
            r, c = row + j // WINDOW - 1, col + j % WINDOW - 1
            if 0 <= r < height and 0 <= c < width:
                window[r, c] = p
        _overlay(
            axes[1],
            image,
            np.ma.masked_equal(window, 0),
            f'sliding-window path ({local_share:.1%} of the mass)',
            vmin=0)
        half = 3.5 * cell
        axes[1].set_xlim(centre[0] - half, centre[0] + half)
        axes[1].set_ylim(centre[1] + half, centre[1] - half)
        for j, p in enumerate(local):
            r, c = row + j // WINDOW - 1, col + j % WINDOW - 1
            if 0 <= r < height and 0 <= c < width:
                axes[1].text(
                    (c + 0.5) * cell, (r + 0.5) * cell,
                    f'{p:.3f}',
                    ha='center',
                    va='center',
                    fontsize=8,
                    color='white')

        # Pooled path: one probability per pooled cell.
        _overlay(
            axes[2],
            image,
            pool.reshape(pool_h, pool_w),
            f'pooled path, {pool_h}x{pool_w} keys ({pool_share:.1%} of the mass)',
            vmin=0)

        # Both paths per feature cell: pooled probabilities spread evenly over their cells.
        rows = np.minimum(np.arange(height) * pool_h // height, pool_h - 1)
        cols = np.minimum(np.arange(width) * pool_w // width, pool_w - 1)
        counts = np.zeros((pool_h, pool_w))
        np.add.at(counts, (rows[:, None], cols[None, :]), 1)
        combined = (pool / counts.ravel()).reshape(pool_h, pool_w)[rows][:, cols] + window
        im = _overlay(
            axes[3],
            image,
            np.log10(combined + 1e-12),
            'both paths per feature cell (log10)',
            vmin=np.log10(combined.max()) - 4)
        fig.colorbar(im, ax=axes[3], fraction=0.046)
        panels = axes
    # The query's feature cell, and for aggregated attention its 3x3 window.
    span = 1 if 'full' in maps else WINDOW
    panels[0].imshow(image)
    panels[0].add_patch(
        Rectangle((centre[0] - span / 2 * cell, centre[1] - span / 2 * cell),
                  span * cell,
                  span * cell,
                  fill=False,
                  color='red',
                  lw=1.5))
    panels[0].plot(*centre, 'r+', ms=10)
    panels[0].set_title('query' + ('' if 'full' in maps else ' and its 3x3 window'), fontsize=9)
    panels[0].axis('off')
    for ax in panels[1:] if 'full' in maps else panels[2:]:  # the window zoom shows values
        ax.plot(*centre, 'w+', ms=10)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    _save(fig, out_file)


def _save(fig, out_file: str) -> None:
    os.makedirs(osp.dirname(osp.abspath(out_file)), exist_ok=True)
    fig.savefig(out_file, dpi=110)
    print(f'saved {out_file}')


# ------------------------------------------------------------- effective receptive field
def effective_receptive_field(model: TransNeXt, inputs: List[torch.Tensor]) -> np.ndarray:
    """Mean over images of |d centre output pixel / d input|, summed over input channels.

    The central pixel of the first output of ``model``, as the sum of its ReLU'd channels, is
    back-propagated to the input (a plain sum over channels would be degenerate: after the
    stage's LayerNorm it is nearly constant). Returns an (H, W) map of non-negative
    contributions.
    """
    model.requires_grad_(False)
    total = None
    for x in inputs:
        x = x.clone().requires_grad_(True)
        feature = model(x)[0]
        height, width = feature.shape[2:]
        centre = F.relu(feature[:, :, height // 2, width // 2]).sum()
        grad, = torch.autograd.grad(centre, x)
        score = grad.abs().sum(dim=1)[0]
        total = score if total is None else total + score
    return (total / len(inputs)).numpy()


def draw_erf(erf: np.ndarray, title: str, out_file: str) -> None:
    """Log-scaled heatmap of the ERF, relative to its maximum."""
    if not erf.max() > 0:
        raise RuntimeError('the effective receptive field is zero everywhere: the central '
                           'output pixel does not depend on the input')
    log_erf = np.log10(erf / erf.max() + 1e-12)
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    im = ax.imshow(log_erf, cmap='RdYlGn', vmin=max(log_erf.min(), -6), vmax=0)
    fig.colorbar(im, ax=ax, label='log10 contribution (relative to max)')
    ax.set_title(title, fontsize=8, wrap=True)
    ax.axis('off')
    fig.tight_layout()
    _save(fig, out_file)


# ------------------------------------------------------------------------------ CLI
def _head(value: str):
    return value if value == 'mean' else int(value)


def parse_args(argv: Optional[Sequence[str]] = None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    sub = parser.add_subparsers(dest='command', required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        '--arch',
        default='tiny',
        choices=sorted(TransNeXt.arch_settings),
        help='TransNeXt arch. Defaults to tiny')
    common.add_argument(
        '--checkpoint',
        help='weights (released or toolbox checkpoint); '
        'random weights if not given')
    common.add_argument(
        '--img-size',
        type=int,
        default=224,
        help='input size (ImageNet evaluation preprocessing). Defaults to 224')
    common.add_argument(
        '--stage', type=int, default=3, choices=(1, 2, 3, 4), help='stage (1-4). Defaults to 3')
    common.add_argument(
        '--out-dir',
        default='outputs/visualizations',
        help='where the PNG goes. Defaults to outputs/visualizations')

    attention = sub.add_parser(
        'attention', parents=[common], help='attention map of one query (Figure 7)')
    attention.add_argument(
        '--image',
        default='chelsea',
        help=f'image file or one of {SKIMAGE_PHOTOS}. Defaults to chelsea')
    attention.add_argument(
        '--block',
        type=int,
        default=0,
        help='block of the stage (negative: from the end). Defaults to 0')
    attention.add_argument(
        '--head', type=_head, default=0, help="head index or 'mean'. Defaults to 0")
    attention.add_argument(
        '--query',
        type=float,
        nargs=2,
        metavar=('X', 'Y'),
        help='query position in input pixels. Defaults to the centre')

    erf = sub.add_parser(
        'erf', parents=[common], help='effective receptive field of a stage (Figures 2 and 8)')
    erf.add_argument(
        '--images',
        nargs='+',
        default=list(SKIMAGE_PHOTOS),
        help=f'image files or names of {SKIMAGE_PHOTOS}. Defaults to all three')
    args = parser.parse_args(argv)
    if args.img_size < 32:
        parser.error(f'--img-size must be at least 32, got {args.img_size}')
    return args


def main(argv: Optional[Sequence[str]] = None) -> str:
    args = parse_args(argv)
    weights = osp.basename(args.checkpoint) if args.checkpoint else 'random weights'
    if args.command == 'attention':
        model = build_backbone(
            args.arch, args.checkpoint, args.img_size, out_indices=(args.stage - 1, ))
        x, shown = preprocess(load_image(args.image), args.img_size)
        maps = capture_attention(model, x, args.stage, args.block)
        row, col = query_index(args.query, args.img_size, maps['grid'])
        name = osp.splitext(osp.basename(args.image))[0].replace(SKIMAGE_PREFIX, '')
        out_file = osp.join(
            args.out_dir, f'attention_{args.arch}_stage{args.stage}_block'
            f'{args.block}_head{args.head}_{name}.png')
        title = (f'TransNeXt-{args.arch} ({weights}), stage {args.stage} block {args.block} '
                 f'head {args.head}, query at feature cell ({row}, {col}) of '
                 f'{maps["grid"][0]}x{maps["grid"][1]}')
        draw_attention(shown, maps, row, col, args.head, title, out_file)
    else:
        model = build_backbone(
            args.arch, args.checkpoint, args.img_size, out_indices=(args.stage - 1, ))
        inputs = [preprocess(load_image(name), args.img_size)[0] for name in args.images]
        erf = effective_receptive_field(model, inputs)
        out_file = osp.join(args.out_dir, f'erf_{args.arch}_stage{args.stage}.png')
        title = (f'ERF of TransNeXt-{args.arch} stage {args.stage} (stride '
                 f'{STAGE_STRIDES[args.stage - 1]})\n{weights}, {len(inputs)} images at '
                 f'{args.img_size}px')
        draw_erf(erf, title, out_file)
    return out_file


if __name__ == '__main__':
    main()
