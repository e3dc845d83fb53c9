# Copyright (c) transnext-mm contributors. All rights reserved.
"""What the A/B scripts share: for the two-build ones (``ab_attention_op.py``,
``ab_conv_glu_gate.py``, ``ab_cosine_qk.py``, ``ab_log_cpb_mlp.py``, ``ab_step.py``) the command
line and the two builds' extension modules, this checkout's and a baseline's copied into a
package of its own (see any of their docstrings); for those that time the whole backbone two ways
(``ab_step.py``, ``ab_full_attention.py``) the backbone and the interleaved timing of its
training step and eval. Importing this module puts the repository root and ``tools/`` on the
path."""
import argparse
import importlib
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / 'tools')]

from transnext_mm.models.backbones import TransNeXt  # noqa: E402


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


def setup_builds(parser: argparse.ArgumentParser):
    """The two-build scripts' start: parses the arguments of ``parser`` (an :func:`ab_parser`,
    perhaps with more), loads the builds and returns ``(args, new, base, arch)``, ``arch`` the
    arch's settings as the backbone completes them for the input size."""
    args = parser.parse_args()
    new, base = load_builds(args)
    return args, new, base, TransNeXt(arch=args.arch, img_size=args.size).arch


def assert_gradients_agree(new_grads, base_grads) -> None:
    """The two builds' gradients agree up to the order of fp32 sums: each within 1e-4 relative
    and 1e-5 of the baseline gradient's largest entry."""
    for a, b in zip(new_grads, base_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * b.abs().max().item())


def time_rounds(builds: dict, cases: list, prepare, rounds: int, repeats: int = 3) -> dict:
    """Each round times every case's forward and backward with both builds (``{'base': module,
    'new': module}``), alternating which goes first, each timing the best of ``repeats`` calls.
    ``cases``: ``(args, grad)`` per stage; ``prepare(ext, args, grad, part)`` does what must not
    be timed (e.g. the forward a backward needs) and returns the call to time. Returns the times
    (seconds) per ``(build, stage, part)``."""
    times = {}
    for r in range(rounds):
        for stage, (args, grad) in enumerate(cases):
            for part in ('forward', 'backward'):
                for name in (('base', 'new') if r % 2 == 0 else ('new', 'base')):
                    best = float('inf')
                    for _ in range(repeats):
                        call = prepare(builds[name], args, grad, part)
                        start = time.perf_counter()
                        call()
                        best = min(best, time.perf_counter() - start)
                    times.setdefault((name, stage, part), []).append(best)
    return times


def transnext_backbone(arch: str, height: int, width: int):
    """A TransNeXt backbone as the benchmarks build it (``img_size`` the input's shorter side,
    drop path 0.3, ``attn_impl='auto'``) and a 1 x 3 x height x width input."""
    from benchmark import build_backbone

    torch.manual_seed(0)
    model = build_backbone(
        'transnext_mm',
        dict(
            type='TransNeXt',
            arch=arch,
            img_size=min(height, width),
            drop_path_rate=0.3,
            attn_impl='auto'))
    return model, torch.randn(1, 3, height, width)


def time_backbone_ways(model, x, ways: dict, rounds: int, steps: int):
    """Times ``steps`` training steps (train mode, forward, backward of the sum of the feature
    maps' means) and ``steps`` warm eval forwards of ``model`` on ``x`` for each of two ways
    (``{name: setup}``, ``setup()`` switches the model to that way), in ``rounds`` rounds after
    one warm-up round, alternating which way goes first. Returns ``(times, ratios)``: seconds per
    ``(kind, name)`` and, per kind, each round's ratio of the second way's mean timing to the
    first's."""
    from benchmark import backbone_steps

    eval_forward, train_forward = backbone_steps(model, x, x.device, torch.float32, False)

    def train_step():
        model.train()
        train_forward()

    def eval_step():
        model.eval()
        eval_forward()

    first, second = ways
    times = {(kind, name): [] for kind in ('train', 'eval') for name in ways}
    ratios = {'train': [], 'eval': []}
    for rnd in range(rounds + 1):  # round 0 warms up
        means = {}
        for name in ((first, second) if rnd % 2 else (second, first)):
            ways[name]()
            for kind, step in (('train', train_step), ('eval', eval_step)):
                if kind == 'eval':
                    eval_step()  # the eval caches, rebuilt after train()
                timings = []
                for _ in range(steps):
                    start = time.perf_counter()
                    step()
                    timings.append(time.perf_counter() - start)
                if rnd:
                    times[(kind, name)] += timings
                means[(kind, name)] = statistics.mean(timings)
        if rnd:
            for kind in ratios:
                ratios[kind].append(means[(kind, second)] / means[(kind, first)])
    return times, ratios


def report_ways(times: dict, ratios: dict) -> None:
    """Prints :func:`time_backbone_ways`'s results: per kind each way's median over all its
    timings, the median over rounds of the ratio second / first and each round's ratio."""
    first, second = dict.fromkeys(name for _, name in times)
    for kind in ('train', 'eval'):
        medians = {name: statistics.median(times[(kind, name)]) * 1000 for name in (first, second)}
        print(f'{kind}: {first} {medians[first]:.1f} ms, {second} {medians[second]:.1f} ms, '
              f'per-round ratio {second} / {first} {statistics.median(ratios[kind]):.3f} '
              f'(rounds: {" ".join(f"{r:.3f}" for r in ratios[kind])})')


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
