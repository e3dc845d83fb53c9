# Copyright (c) transnext-mm contributors. All rights reserved.
"""Helpers shared by the drivers of the prepared GPU run (``.dev_scripts/gpu/run_all.sh``).

A driver writes one JSON part file and rewrites it after every measurement (atomically), so a
driver killed by its time box still leaves what it measured; ``report.py`` merges the part into
``report.json``. A failing measurement records its error and the driver goes on.
"""
import contextlib
import gc
import json
import os
import statistics
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def write_json(path: str, data) -> None:
    """Write ``data`` to ``path`` atomically (a reader never sees half a file)."""
    tmp = f'{path}.tmp{os.getpid()}'
    with open(tmp, 'w') as f:
        json.dump(data, f, indent=1, default=str)
    os.replace(tmp, path)


class Recorder:
    """A dict of results saved to ``path`` after every change.

    Args:
        path (str): The part file.
        meta (dict): Written under ``'meta'``. Defaults to None.
    """

    def __init__(self, path: str, meta: dict = None):
        self.path = path
        self.data = {'meta': dict(meta or {}), 'started': time.strftime('%H:%M:%S')}
        self.save()

    def save(self) -> None:
        write_json(self.path, self.data)

    def put(self, key: str, value) -> None:
        """Set ``data[key]`` (``key`` may be dotted: ``'layers.512x512'``) and save."""
        node = self.data
        *parents, last = key.split('.')
        for part in parents:
            node = node.setdefault(part, {})
        node[last] = value
        self.save()

    @contextlib.contextmanager
    def guard(self, key: str):
        """Run the body; on an exception record ``{'error': ...}`` under ``key`` and go on."""
        start = time.perf_counter()
        try:
            yield
        except Exception as e:  # noqa: BLE001 -- one failing check must not stop the run
            lines = traceback.format_exc().strip().splitlines()
            self.put(key, {'error': f'{type(e).__name__}: {e}'[:2000],
                           'traceback': lines[-12:],
                           'seconds': round(time.perf_counter() - start, 2)})
            print(f'[{key}] FAILED: {type(e).__name__}: {str(e)[:300]}', flush=True)
        finally:
            free_memory()


def free_memory() -> None:
    """Collect garbage and return cached GPU memory, so the next peak starts clean."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def rel_error(actual, expected) -> float:
    """``|actual - expected| / |expected|`` in the Frobenius norm, computed in float64; 0 for
    empty tensors, inf for a non-finite ``actual``."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.double(), expected.double()
    if not bool(actual.isfinite().all()):
        return float('inf')
    denom = expected.norm().item()
    diff = (actual - expected).norm().item()
    return diff / denom if denom > 0 else diff


def time_fn(fn, device, warmup: int = 3, repeats: int = 10, budget_s: float = 3.0) -> dict:
    """Median and minimum time of ``fn()`` in ms, after ``warmup`` calls.

    On CUDA each call is timed with CUDA events; on CPU with ``perf_counter``. Fewer than
    ``repeats`` calls are timed (at least 3, or ``repeats`` if fewer) when they would exceed
    ``budget_s``.
    """
    import torch
    cuda = torch.device(device).type == 'cuda'
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    if cuda:
        torch.cuda.synchronize()
    per_call = (time.perf_counter() - start) / max(warmup, 1)
    repeats = max(min(3, repeats), min(repeats, int(budget_s / max(per_call, 1e-6))))
    times = []
    for _ in range(repeats):
        if cuda:
            begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            begin.record()
            fn()
            end.record()
            end.synchronize()
            times.append(begin.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return {'median_ms': round(statistics.median(times), 4), 'min_ms': round(min(times), 4),
            'runs': len(times)}


def peak_memory_mib(fn, device):
    """Peak CUDA memory allocated above the starting point while ``fn()`` runs, in MiB
    (``torch.cuda.max_memory_allocated``); None on CPU (``fn`` is not run)."""
    import torch
    if torch.device(device).type != 'cuda':
        return None
    free_memory()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)


def base_argparser(description: str):
    import argparse
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument('--out', required=True, help='part file (JSON) to write')
    parser.add_argument('--dry-run', action='store_true',
                        help='CPU, tiny shapes: exercises the same code paths quickly')
    return parser


def pick_device(dry_run: bool) -> str:
    import torch
    if dry_run:
        return 'cpu'
    if not torch.cuda.is_available():
        raise SystemExit('no CUDA device visible (use --dry-run for the CPU rehearsal)')
    return 'cuda'


def core_inputs(B, heads, height, width, num_pool, head_dim, dtype, device, seed=0,
                requires_grad=False):
    """Random inputs of the attention core shaped like the backbone's: queries scaled up (the
    length-scaled cosine attention sharpens the softmax), unit keys, small biases."""
    import torch
    import torch.nn.functional as F
    N = height * width
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    tensors = [randn(B, heads, N, head_dim, scale=4.0),
               F.normalize(randn(B, heads, N, head_dim), dim=-1), randn(B, heads, N, head_dim),
               F.normalize(randn(B, heads, num_pool, head_dim), dim=-1),
               randn(B, heads, num_pool, head_dim), randn(heads, 9, scale=0.5),
               randn(heads, N, num_pool), randn(B, heads, N, 9, scale=0.5)]
    return [t.to(device=device, dtype=dtype).requires_grad_(requires_grad) for t in tensors]


CORE_NAMES = ('q', 'k', 'v', 'k_pool', 'v_pool', 'rpb_local', 'bias_pool', 'token_weight')
