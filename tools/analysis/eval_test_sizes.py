# Copyright (c) transnext-mm contributors. All rights reserved.
"""Evaluate one segmentation checkpoint at several test sizes and position-bias modes.

For every (mode, size) pair the config is changed and mmengine's ``Runner`` runs mmseg's test
loop and ``IoUMetric`` on the test split, so the numbers are those ``tools/test.py`` prints:

* the test pipeline's ``Resize`` gets ``scale=(4 * size, size)`` (short side ``size``, as ADE20K's
  ``(2048, 512)``);
* the TransNeXt backbone gets the mode's settings:

  - ``interpolate``: log-CPB tabulated at ``img_size`` and bilinearly resized to each size
    (``--img-size``, default the config's);
  - ``extrapolate``: log-CPB evaluated at each size;
  - ``linear``: extrapolate, with the pooled grid of stages 1-3 fixed to ``--fixed-pool-size``
    (the paper's linear-complexity inference mode).

It writes ``test_sizes.csv``, ``test_sizes.md`` and ``test_sizes.png`` (mIoU and latency against
size) to ``--out-dir``. Latency is the median wall time of the model's test step per image (data
loading excluded; the first ``--warmup`` images, which also build the bias caches, excluded)::

    python tools/analysis/eval_test_sizes.py \\
        configs/upernet/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py CHECKPOINT \\
        --sizes 512 640 768 896 1024 1280 --out-dir outputs/test_sizes_tiny
"""
import argparse
import copy
import csv
import os
import os.path as osp
import statistics
import time
from typing import Dict, List, Optional, Sequence

import torch
from mmengine.config import Config, DictAction
from mmengine.hooks import Hook
from mmengine.runner import Runner

MODES = ('interpolate', 'extrapolate', 'linear')
MODE_LABELS = {
    'interpolate': 'interpolate (table at {img_size})',
    'extrapolate': 'extrapolate (log-CPB)',
    'linear': 'linear (pool {fixed_pool_size}x{fixed_pool_size}, log-CPB)',
}


class StepTimer(Hook):
    """Record the wall time of each test iteration (the data preprocessor and the model)."""
    priority = 'VERY_LOW'

    def __init__(self):
        self.times: List[float] = []
        self._start = 0.0

    @staticmethod
    def _sync():
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def before_test_iter(self, runner, batch_idx, data_batch=None):
        self._sync()
        self._start = time.perf_counter()

    def after_test_iter(self, runner, batch_idx, data_batch=None, outputs=None):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def configure(cfg: Config, mode: str, size: int, img_size: Optional[int],
              fixed_pool_size: int) -> Config:
    """Return a copy of ``cfg`` testing at short side ``size`` in position-bias ``mode``."""
    if mode not in MODES:
        raise ValueError(f'mode must be one of {MODES}, got {mode!r}')
    if size < 32:
        raise ValueError(f'sizes must be >= 32 pixels, got {size}')
    cfg = copy.deepcopy(cfg)
    backbone = cfg.model.backbone
    if backbone.get('type') != 'TransNeXt':
        raise ValueError(f"the config's backbone must be TransNeXt, got {backbone.get('type')!r}")
    backbone.pos_bias_mode = 'interpolate' if mode == 'interpolate' else 'extrapolate'
    backbone.fixed_pool_size = fixed_pool_size if mode == 'linear' else None
    if mode == 'interpolate' and img_size is not None:
        backbone.img_size = img_size
    backbone.init_cfg = None  # the checkpoint holds every weight

    resizes = [t for t in cfg.test_dataloader.dataset.pipeline if t.get('type') == 'Resize']
    if len(resizes) != 1:
        raise ValueError('the test pipeline must have exactly one Resize transform, found '
                         f'{len(resizes)}')
    resizes[0].pop('scale_factor', None)
    resizes[0].update(scale=(4 * size, size), keep_ratio=True)
    return cfg


def run_one(cfg: Config, checkpoint: str, work_dir: str, warmup: int) -> Dict[str, float]:
    """Test one configuration with mmengine's Runner; returns its metrics and latency."""
    cfg = copy.deepcopy(cfg)
    cfg.work_dir = work_dir
    cfg.load_from = checkpoint
    name = osp.basename(work_dir)
    cfg.experiment_name = name
    if 'visualizer' in cfg:
        cfg.visualizer.name = f'visualizer_{name}'
    runner = Runner.from_cfg(cfg)
    timer = StepTimer()
    runner.register_hook(timer)
    metrics = runner.test()
    times = timer.times[warmup:] or timer.times
    return dict(
        metrics,
        latency_ms=1000 * statistics.median(times),
        latency_ms_mean=1000 * statistics.fmean(times),
        images=len(timer.times))


def write_table(rows: List[dict], out_dir: str, labels: Dict[str, str]) -> None:
    fields = ['mode', 'size', 'mIoU', 'aAcc', 'mAcc', 'latency_ms', 'latency_ms_mean', 'images']
    with open(osp.join(out_dir, 'test_sizes.csv'), 'w', newline='') as f:
        writer = csv.DictWriter(f, fieldnames=fields, extrasaction='ignore')
        writer.writeheader()
        writer.writerows(rows)
    modes = list(dict.fromkeys(r['mode'] for r in rows))
    sizes = sorted({r['size'] for r in rows})
    by_key = {(r['mode'], r['size']): r for r in rows}
    lines = [
        '| short side | ' + ' | '.join(f'mIoU {labels[m]}'
                                       for m in modes) + ' | ' + ' | '.join(f'ms/img {m}'
                                                                            for m in modes) + ' |',
        '|' + '---:|' * (1 + 2 * len(modes))
    ]
    for size in sizes:
        cells = [f"{by_key[(m, size)]['mIoU']:.2f}" if (m, size) in by_key else '-' for m in modes]
        cells += [
            f"{by_key[(m, size)]['latency_ms']:.1f}" if (m, size) in by_key else '-' for m in modes
        ]
        lines.append(f'| {size} | ' + ' | '.join(cells) + ' |')
    with open(osp.join(out_dir, 'test_sizes.md'), 'w') as f:
        f.write('\n'.join(lines) + '\n')


def plot(rows: List[dict],
         out_path: str,
         labels: Dict[str, str],
         title: str,
         table_size: Optional[int] = None) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt

    fig, (ax_miou, ax_time) = plt.subplots(1, 2, figsize=(11, 4.2))
    for mode in dict.fromkeys(r['mode'] for r in rows):
        points = sorted((r['size'], r['mIoU'], r['latency_ms']) for r in rows if r['mode'] == mode)
        sizes = [p[0] for p in points]
        ax_miou.plot(sizes, [p[1] for p in points], marker='o', label=labels[mode])
        ax_time.plot(sizes, [p[2] for p in points], marker='o', label=labels[mode])
    ax_miou.set(xlabel='test short side (pixels)', ylabel='mIoU (%)', title='mIoU')
    ax_time.set(xlabel='test short side (pixels)', ylabel='ms / image (median)', title='latency')
    for ax in (ax_miou, ax_time):
        if table_size is not None and 'interpolate' in labels:
            ax.axvline(table_size, color='gray', linestyle=':', linewidth=1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_path, dpi=120)
    plt.close(fig)


def eval_test_sizes(config: str,
                    checkpoint: str,
                    sizes: Sequence[int],
                    modes: Sequence[str] = MODES,
                    out_dir: str = 'outputs/test_sizes',
                    img_size: Optional[int] = None,
                    fixed_pool_size: int = 7,
                    max_images: Optional[int] = None,
                    warmup: int = 1,
                    cfg_options: Optional[dict] = None,
                    log_level: str = 'WARNING') -> List[dict]:
    """Evaluate ``checkpoint`` at every size in every mode; returns the table rows.

    Args:
        config (str): Segmentation config with a TransNeXt backbone.
        checkpoint (str): Checkpoint to test.
        sizes (Sequence[int]): Test short sides in pixels.
        modes (Sequence[str]): Subset of ('interpolate', 'extrapolate', 'linear').
            Defaults to all three.
        out_dir (str): Output folder. Defaults to 'outputs/test_sizes'.
        img_size (int, optional): Table size of 'interpolate' mode. Defaults to None (the
            config's ``model.backbone.img_size``).
        fixed_pool_size (int): Pooled grid of 'linear' mode. Defaults to 7.
        max_images (int, optional): Test only the first images of the split. Defaults to None.
        warmup (int): Images left out of the latency. Defaults to 1.
        cfg_options (dict, optional): Overrides applied to the config first. Defaults to None.
        log_level (str): Log level of the runners. Defaults to 'WARNING'.
    """
    bad = [m for m in modes if m not in MODES]
    if bad or not modes:
        raise ValueError(f'modes must be a non-empty subset of {MODES}, got {list(modes)}')
    if not sizes:
        raise ValueError('give at least one size')
    if fixed_pool_size < 1:
        raise ValueError(f'fixed_pool_size must be >= 1, got {fixed_pool_size}')
    if not osp.isfile(checkpoint):
        raise FileNotFoundError(f'checkpoint {checkpoint} not found')
    base = Config.fromfile(config)
    if cfg_options:
        base.merge_from_dict(cfg_options)
    base.log_level = log_level
    if max_images is not None:
        base.test_dataloader.dataset.indices = int(max_images)
    table_size = img_size if img_size is not None else base.model.backbone.get('img_size', 224)
    labels = {
        m: MODE_LABELS[m].format(img_size=table_size, fixed_pool_size=fixed_pool_size)
        for m in modes
    }
    os.makedirs(out_dir, exist_ok=True)

    rows = []
    for mode in modes:
        for size in sizes:
            cfg = configure(base, mode, int(size), img_size, fixed_pool_size)
            result = run_one(cfg, checkpoint, osp.join(out_dir, 'runs', f'{mode}_{size}'), warmup)
            row = dict(
                mode=mode,
                size=int(size),
                **{
                    k: round(v, 2) if isinstance(v, float) else v
                    for k, v in result.items()
                })
            rows.append(row)
            print(
                f"{labels[mode]:<40} size {size:>5}: mIoU {row['mIoU']:6.2f}  "
                f"{row['latency_ms']:8.1f} ms/img ({row['images']} images)",
                flush=True)
            write_table(rows, out_dir, labels)  # keep partial results of long sweeps
    plot(rows, osp.join(out_dir, 'test_sizes.png'), labels,
         f'{osp.basename(config)}\n{osp.basename(checkpoint)}', table_size)
    return rows


def parse_args():
    parser = argparse.ArgumentParser(
        description='mIoU and latency of a TransNeXt segmentation checkpoint against test size, '
        'with the position bias interpolated, extrapolated, or in linear (fixed pool) mode')
    parser.add_argument('config', help='test config file')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--sizes',
        type=int,
        nargs='+',
        default=[512, 640, 768, 896, 1024, 1280],
        help='test short sides in pixels')
    parser.add_argument(
        '--modes',
        nargs='+',
        default=list(MODES),
        choices=MODES,
        help='position-bias modes to compare')
    parser.add_argument(
        '--img-size',
        type=int,
        default=None,
        help="table size of 'interpolate' mode (default: the config's img_size)")
    parser.add_argument(
        '--fixed-pool-size', type=int, default=7, help="pooled grid of 'linear' mode")
    parser.add_argument(
        '--max-images',
        type=int,
        default=None,
        help='test only the first N images of the test split')
    parser.add_argument(
        '--warmup', type=int, default=1, help='first images per run left out of the latency')
    parser.add_argument('--out-dir', default='outputs/test_sizes', help='output folder')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config (key=value)')
    return parser.parse_args()


def main():
    args = parse_args()
    import transnext_mm  # noqa: F401  (safe checkpoint loading; the config imports it too)
    eval_test_sizes(args.config, args.checkpoint, args.sizes, args.modes, args.out_dir,
                    args.img_size, args.fixed_pool_size, args.max_images, args.warmup,
                    args.cfg_options)
    print(f'wrote {osp.join(args.out_dir, "test_sizes.csv")}, test_sizes.md and test_sizes.png')


if __name__ == '__main__':
    main()
