# Copyright (c) transnext-mm contributors. All rights reserved.
"""What the two-build A/B scripts (``ab_attention_op.py``, ``ab_log_cpb_mlp.py``) share: the
command line and the two builds' extension modules, this checkout's and a baseline's copied
into a package of its own (see either script's docstring)."""
import argparse
import importlib
import statistics
import sys

import torch

from transnext_mm.models.backbones import TransNeXt


def ab_parser(description: str) -> argparse.ArgumentParser:
    """The shared arguments: the baseline's location, the arch, the input size, rounds and
    threads."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('base_dir', help='directory that holds the baseline package')
    parser.add_argument('base_package', help='the baseline package (holds the copied _ext*.so)')
    parser.add_argument('--arch', default='tiny', choices=sorted(TransNeXt.arch_settings))
    parser.add_argument('--size', type=int, default=512, help='square input size')
    parser.add_argument('--rounds', type=int, default=11)
    parser.add_argument('--threads', type=int, default=2)
    return parser


def load_builds(args: argparse.Namespace):
    """Sets the thread count; returns ``(new, base)``: this checkout's ``transnext_mm._ext``
    and the baseline's."""
    torch.set_num_threads(args.threads)
    new = importlib.import_module('transnext_mm._ext')
    sys.path.insert(0, args.base_dir)
    return new, importlib.import_module(f'{args.base_package}._ext')


def time_rounds(builds: dict, cases: list, best_of, rounds: int) -> dict:
    """Each round times every case's forward and backward with both builds (``{'base': module,
    'new': module}``), alternating which goes first. ``cases``: ``(args, grad)`` per stage;
    ``best_of(ext, args, grad, part)`` returns seconds. Returns the times per
    ``(build, stage, part)``."""
    times = {}
    for r in range(rounds):
        for stage, (args, grad) in enumerate(cases):
            for part in ('forward', 'backward'):
                for name in (('base', 'new') if r % 2 == 0 else ('new', 'base')):
                    times.setdefault((name, stage, part),
                                     []).append(best_of(builds[name], args, grad, part))
    return times


def report(times: dict, stages: list) -> None:
    """Prints per stage (``stages``: ``(layer count, label)``) each build's median over rounds and
    the median of the per-round ratios, and the totals over all layers."""
    for part in ('forward', 'backward'):
        total = {'base': 0.0, 'new': 0.0}
        for stage, (count, label) in enumerate(stages):
            base, new = times[('base', stage, part)], times[('new', stage, part)]
            ratio = statistics.median(b / a for a, b in zip(base, new))
            for name, series in (('base', base), ('new', new)):
                total[name] += count * statistics.median(series)
            print(f'{part:8s} stage {stage + 1} ({label}): base '
                  f'{statistics.median(base) * 1e3:7.2f}  new {statistics.median(new) * 1e3:7.2f}'
                  f'  per-round ratio {ratio:.3f}')
        print(f'{part:8s} all layers: base {total["base"] * 1e3:7.1f}  new '
              f'{total["new"] * 1e3:7.1f}  ratio {total["new"] / total["base"]:.3f}')
