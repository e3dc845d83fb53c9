# Copyright (c) transnext-mm contributors. All rights reserved.
"""Benchmark the TransNeXt backbone: per attention implementation, or beside its peers.

Per implementation (the default mode), each implementation runs in its own fresh process (clean
memory figures, no shared caches); with ``--rounds R`` the implementations are interleaved R
times and the median of the per-round medians is reported, which keeps comparisons fair on a
shared, noisy machine.

Implementations (``--attn-impl``, several allowed):
    reference-nocache  the straightforward implementation: the readable unfold path with the
                       position-bias cache disabled (every block recomputes its log-CPB bias)
    reference          the unfold path with the bias cache
    torch              the PyTorch fast path
    op                 the compiled op (transnext_mm._ext)
    auto               what attn_impl='auto' picks

With ``--peers`` the backbones a user weighs TransNeXt against run side by side with TransNeXt
(``--arch``, default micro and tiny; ``--attn-impl``, default auto) in one process, all built
from their toolbox's registry with the settings of the toolbox's Mask R-CNN configs; TransNeXt's
``img_size`` is each input's shorter side (as when training at ``img_size``) unless
``--img-size`` sets it:

    swin-t      mmdet SwinTransformer (Swin-T: embed_dims 96, depths 2,2,6,2, window 7,
                drop_path_rate 0.2)
    pvtv2-b2    mmdet PyramidVisionTransformerV2 (b2: embed_dims 64, num_layers 3,4,6,3,
                drop_path_rate 0.1)
    convnext-t  mmpretrain ConvNeXt (tiny, drop_path_rate 0.4, layer scale,
                gap_before_final_norm False)

For every input size (``--size``, default 512x512 and 800x1344) and batch (``--batch``, default 1
and 2) each backbone gets three timings (``--steps`` picks eval and/or train):

    train      a training step: train mode, forward, backward of the sum of the means of the
               four feature maps, gradients zeroed (set to None)
    cold eval  the first forward (no grad) after switching from train() to eval(): caches that
               depend on the mode are rebuilt here
    eval       a warm forward (no grad) in eval mode

Round r runs every backbone once (train steps, then the cold eval, then the eval forwards), in
an order rotated by r, so that a slow spell of a shared machine spreads over all of them; the
table gives the median over the rounds (of each round's median with ``--repeats`` > 1), each
backbone's parameters, its peak memory, and every row's ratio to the fastest peer in each
timing (ratio > 1: slower than that peer).

Peak memory (``--peers``) is the peak of the bytes held by PyTorch's allocator during one step
(run after the timed rounds, not timed) above what was allocated when the step began (weights,
input, caches kept from earlier steps): activations, gradients and temporaries of the step. On
CUDA it is ``torch.cuda.max_memory_allocated``; on the CPU the same quantity is read from
``torch.profiler``'s memory events (``profile_memory=True``: every allocation and free of
PyTorch's CPU allocator, with its running total). Neither counts the allocator's cached but free
blocks, the Python heap, or memory a library allocates outside PyTorch's allocator (e.g. oneDNN
scratch buffers, allocations made inside OpenMP worker threads), so process RSS is larger.

``--profile`` (``--peers`` on the CPU) then runs one more training step of each backbone under
``torch.profiler`` and prints where its time goes: the FLOPs the profiler counts for the matrix
products (``aten::mm``, ``addmm``, ``bmm``: the linear layers and attention's products, 2 FLOPs
per multiply-add), their self time and rate, the self time of all other ops, and the costliest
of those. It shows how much of a gap between backbones is arithmetic the matrix products do and
how much is everything else (attention kernels, elementwise ops, copies). Profiled times include
the profiler's overhead: compare them within the table, not with the timed columns.

Examples::

    python tools/benchmark.py --arch tiny --size 512 512 --threads 2
    python tools/benchmark.py --arch tiny --size 512 512 --layer --backward
    python tools/benchmark.py --arch tiny --size 512 512 --glu --attn-impl torch op
    python tools/benchmark.py --device cuda --dtype fp16 --batch 8 --attn-impl torch op
    python tools/benchmark.py --onnx upernet.onnx --attn-impl torch auto --threads 2
    python tools/benchmark.py --peers --threads 2 --json peers.json
    python tools/benchmark.py --peers swin-t convnext-t --arch tiny --size 512 --batch 1 \\
        --steps train --rounds 5 --threads 2
    python tools/benchmark.py --peers --arch tiny --size 512 --batch 1 --steps train --profile
    python tools/benchmark.py --peers --device cuda --dtype bf16 --json peers_cuda.json

With ``--onnx FILE`` (written by tools/deployment/pytorch2onnx.py) the exported file runs in
ONNX Runtime (CPU, ``ort``) beside the PyTorch model of the config it was exported from (random
weights, same task, input size and batch) with each ``--attn-impl``.

``--json OUT`` writes ``{"args": ..., "results": [...]}``; with ``--peers`` also ``"mode":
"peers"``, ``"env"`` and ``"memory"`` (the method), and one result per backbone, size and batch:
``model``, ``key``, ``kind`` ('peer' or 'transnext'), ``attn_impl``, ``params_m``, ``size``,
``batch``, and per timing (``eval``, ``cold_eval``, ``train``) ``median_s``, ``min_s``,
``rounds`` (each round's median) and, for eval and train, ``peak_mem_mib``; with ``--profile``
``train`` also has ``profile``: ``matmul_gflop``, ``matmul_ms``, ``other_ms`` and
``costliest_other`` (the 12 costliest other ops: a list of ``op`` and ``ms``; the table
prints 4); then ``ratio_to_fastest_peer`` and ``fastest_peer`` per timing. A backbone that
fails (e.g. out of memory) has ``error`` instead of its figures.
"""
import argparse
import contextlib
import json
import os
import os.path as osp
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time

IMPLS = ('reference-nocache', 'reference', 'torch', 'op', 'auto')
LABELS = {'reference-nocache': 'reference(no-cache)'}
DTYPES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}
ARCHS = ('micro', 'tiny', 'small', 'base')
STEPS = ('eval', 'train')
# The peers: (label, toolbox whose registry builds it, config), with the backbone settings of
# mmdet's configs swin/mask-rcnn_swin-t-p4-w7_fpn_1x_coco.py, pvt/retinanet_pvtv2-b2_fpn_1x_coco.py
# and convnext/mask-rcnn_convnext-t-p4-w7_fpn_amp-ms-crop-3x_coco.py.
PEERS = {
    'swin-t': ('Swin-T', 'mmdet',
               dict(
                   type='SwinTransformer',
                   embed_dims=96,
                   depths=[2, 2, 6, 2],
                   num_heads=[3, 6, 12, 24],
                   window_size=7,
                   mlp_ratio=4,
                   qkv_bias=True,
                   drop_rate=0.,
                   attn_drop_rate=0.,
                   drop_path_rate=0.2,
                   patch_norm=True,
                   out_indices=(0, 1, 2, 3),
                   with_cp=False)),
    'pvtv2-b2': ('PVTv2-b2', 'mmdet',
                 dict(
                     type='PyramidVisionTransformerV2',
                     embed_dims=64,
                     num_layers=[3, 4, 6, 3],
                     out_indices=(0, 1, 2, 3))),
    'convnext-t': ('ConvNeXt-T', 'mmpretrain',
                   dict(
                       type='ConvNeXt',
                       arch='tiny',
                       out_indices=[0, 1, 2, 3],
                       drop_path_rate=0.4,
                       layer_scale_init_value=1.0,
                       gap_before_final_norm=False)),
}
# TransNeXt beside the peers: the drop path rate of
# configs/_base_/models/mask-rcnn_transnext_fpn.py.
PEERS_TRANSNEXT_DROP_PATH = 0.3
REGISTRIES = {
    'transnext_mm': 'mmengine.registry',
    'mmdet': 'mmdet.registry',
    'mmpretrain': 'mmpretrain.registry'
}
MIN_PEERS_SIDE = 32
MEMORY_METHODS = {
    'cuda':
    'torch.cuda.max_memory_allocated during one step, minus memory_allocated before it',
    'cpu':
    "peak of PyTorch's CPU allocator total during one step (torch.profiler memory events), "
    'minus the total when it began; excludes cached free blocks, the Python heap and '
    "memory libraries allocate outside PyTorch's allocator (process RSS is larger)",
}


def _positive_sizes(parser, values, flag):
    sizes = []
    for value in values:
        if len(value) not in (1, 2) or min(value) < 1:
            parser.error(f'{flag} takes H [W] (positive pixels; W defaults to H), got '
                         f'{" ".join(map(str, value))}')
        sizes.append((value[0], value[-1]))
    return sizes


def parse_args(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        '--arch',
        nargs='+',
        default=None,
        choices=ARCHS,
        help='TransNeXt arch (default: tiny; with --peers several, default: '
        'micro tiny)')
    parser.add_argument(
        '--size',
        nargs='+',
        type=int,
        action='append',
        default=None,
        metavar=('H', 'W'),
        help='input image size, H W or one side for a square (default: 512 '
        '512); with --peers repeat the flag for several sizes (default: '
        '--size 512 512 --size 800 1344)')
    parser.add_argument(
        '--batch',
        nargs='+',
        type=int,
        default=None,
        help='batch size (default: 1; with --peers several, default: 1 2)')
    parser.add_argument(
        '--img-size',
        type=int,
        default=None,
        help="backbone img_size (where 'interpolate' tabulates the bias; default: 224, with "
        "--peers the shorter side of each input, as when training at img_size)")
    parser.add_argument(
        '--pos-bias-mode', default='interpolate', choices=['interpolate', 'extrapolate'])
    parser.add_argument('--fixed-pool-size', type=int, default=None)
    parser.add_argument(
        '--attn-impl',
        nargs='+',
        default=None,
        choices=IMPLS,
        help='attention implementations (default: reference-nocache torch op; '
        'with --peers: auto, and not reference-nocache)')
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument(
        '--dtype',
        default='fp32',
        choices=list(DTYPES),
        help='fp16 / bf16 run under torch.autocast')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument(
        '--backward',
        action='store_true',
        help='time forward + backward (train mode) instead of forward (eval)')
    parser.add_argument(
        '--layer',
        action='store_true',
        help='time only the aggregated-attention core over the arch\'s '
        'stage 1-3 layer shapes')
    parser.add_argument(
        '--glu',
        action='store_true',
        help='time only the ConvGLU layers (fc1, gate, fc2) at every stage\'s '
        'feature size; \'op\' / \'auto\' use the compiled gate for inference')
    parser.add_argument(
        '--peers',
        nargs='*',
        default=None,
        choices=list(PEERS),
        help='time TransNeXt beside these peers in one process (no value: all '
        'of them); see the description above for what is timed and how peak '
        'memory is measured')
    parser.add_argument(
        '--steps',
        nargs='+',
        default=None,
        choices=STEPS,
        help='with --peers: what to time, eval (warm and cold eval forwards) '
        'and/or train (training steps) (default: both)')
    parser.add_argument(
        '--profile',
        action='store_true',
        help='with --peers on the CPU: after the timed rounds, profile one training step of '
        'each backbone and print where its time goes (see the description above)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=None,
        help='untimed runs first (default: 2; with --peers 1 per timing)')
    parser.add_argument(
        '--repeats',
        type=int,
        default=None,
        help='timed runs per round (default: 5; with --peers 1 per timing)')
    parser.add_argument(
        '--rounds',
        type=int,
        default=None,
        help='interleave the implementations (with --peers: the backbones) this '
        'many times (default: 1; with --peers 3)')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument(
        '--onnx', default=None, help='time this exported .onnx file in ONNX Runtime beside PyTorch')
    parser.add_argument(
        '--json',
        default=None,
        help='also write the results to this file (JSON; its layout is described '
        'above)')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    peers = args.peers is not None
    defaults = dict(
        arch=['micro', 'tiny'] if peers else ['tiny'],
        size=[[512, 512], [800, 1344]] if peers else [[512, 512]],
        batch=[1, 2] if peers else [1],
        attn_impl=['auto'] if peers else ['reference-nocache', 'torch', 'op'],
        warmup=1 if peers else 2,
        repeats=1 if peers else 5,
        rounds=3 if peers else 1)
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.archs, args.batches = args.arch, args.batch
    args.sizes = _positive_sizes(parser, args.size, '--size')
    if min(args.batches) < 1 or args.warmup < 0 or args.repeats < 1 or args.rounds < 1:
        parser.error('--batch, --repeats and --rounds must be >= 1 and --warmup >= 0')
    if args.device == 'cpu' and args.dtype == 'fp16':
        parser.error('--dtype fp16 is not supported on CPU (use fp32 or bf16)')
    if peers:
        _check_peers_args(parser, args)
        return args
    for flag, values in (('--arch', args.archs), ('--size', args.sizes), ('--batch', args.batches)):
        if len(values) > 1:
            parser.error(f'{flag} takes one value without --peers')
    if args.steps is not None:
        parser.error('--steps goes with --peers (without it, --backward times training)')
    if args.profile:
        parser.error('--profile goes with --peers')
    args.arch, args.size, args.batch = args.archs[0], list(args.sizes[0]), args.batches[0]
    if args.layer and args.glu:
        parser.error('--layer and --glu are exclusive')
    if args.onnx and (args.layer or args.glu or args.backward or args.device != 'cpu'
                      or args.dtype != 'fp32'):
        parser.error('--onnx times CPU fp32 inference of the whole exported model: it takes no '
                     '--layer, --glu, --backward, --device cuda or --dtype')
    return args


def _check_peers_args(parser, args):
    others = [
        flag for flag, on in (('--layer', args.layer), ('--glu', args.glu),
                              ('--backward', args.backward), ('--onnx', args.onnx)) if on
    ]
    if others:
        parser.error(f'--peers times whole backbones in eval and train (--steps): it takes no '
                     f'{", ".join(others)}')
    if 'reference-nocache' in args.attn_impl:
        parser.error('--peers runs every backbone in one process: --attn-impl reference-nocache '
                     '(a process-wide switch) is not allowed; use reference, torch, op or auto')
    if min(min(size) for size in args.sizes) < MIN_PEERS_SIDE:
        parser.error(f'--size: with --peers every side must be >= {MIN_PEERS_SIDE} (the '
                     f'backbones downsample by 32), got '
                     f'{", ".join(f"{h}x{w}" for h, w in args.sizes)}')
    args.size = [list(size) for size in args.sizes]
    args.peers = list(dict.fromkeys(args.peers or PEERS))
    args.steps = list(dict.fromkeys(args.steps or STEPS))
    if args.profile and (args.device != 'cpu' or 'train' not in args.steps):
        parser.error('--profile profiles a training step on the CPU: it needs --device cpu and '
                     'train in --steps')


# ---------------------------------------------------------------------------- shared helpers
def build_backbone(toolbox: str, cfg: dict):
    """Build a backbone from ``cfg`` through the registry of ``toolbox``.

    Args:
        toolbox (str): 'transnext_mm' (TransNeXt, registered in mmengine's root registry),
            'mmdet' or 'mmpretrain'.
        cfg (dict): The backbone's config, with ``type``.

    Returns:
        torch.nn.Module: The backbone, randomly initialised.
    """
    import importlib

    import transnext_mm  # noqa: F401  registers TransNeXt
    if toolbox not in REGISTRIES:
        raise ValueError(f'toolbox must be one of {sorted(REGISTRIES)}, got {toolbox!r}')
    registry = importlib.import_module(REGISTRIES[toolbox]).MODELS
    return registry.build(dict(cfg))


def transnext_cfg(args, arch: str, attn_impl: str, **overrides) -> dict:
    """The TransNeXt config of the command line (arch, bias mode, pooling, implementation)."""
    return dict(
        type='TransNeXt',
        arch=arch,
        img_size=args.img_size or 224,
        pos_bias_mode=args.pos_bias_mode,
        fixed_pool_size=args.fixed_pool_size,
        attn_impl=attn_impl,
        **overrides)


def synchronizer(device):
    """A function that waits for ``device``'s queued work (a no-op on the CPU)."""
    import torch
    if device.type == 'cuda':
        return lambda: torch.cuda.synchronize(device)
    return lambda: None


def time_runs(step, repeats: int, sync) -> list:
    """Seconds of each of ``repeats`` runs of ``step``, the device synchronised around each."""
    times = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return times


def backbone_steps(model, x, device, amp_dtype, use_amp: bool):
    """The eval step (forward without grad) and the training step (forward, backward of the sum
    of the outputs' means, gradients set to None) of a backbone on input ``x``."""
    import torch

    def eval_step():
        with torch.no_grad(), torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
            model(x)

    def train_step():
        with torch.enable_grad():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outs = model(x)
            sum(o.float().mean() for o in outs).backward()
        model.zero_grad(set_to_none=True)

    return eval_step, train_step


# The profiler's own log lines (kineto start/stop, device probing, frees of blocks allocated
# before it started), filtered from stderr while it runs.
_PROFILER_LOG = re.compile(r'^(USDT|INFO|WARNING|ERROR|STAGE):\d{4}-\d\d-\d\d [\d:]+ .*\.cpp:\d+\]'
                           r'|Memory block of unknown size')


@contextlib.contextmanager
def _profiler_logs_filtered():
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as captured:
        os.dup2(captured.fileno(), 2)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            captured.seek(0)
            for line in captured.read().decode(errors='replace').splitlines(keepends=True):
                if not _PROFILER_LOG.search(line):
                    sys.stderr.write(line)


def cpu_allocator_peak(step) -> int:
    """Peak bytes held by PyTorch's CPU allocator while ``step`` runs, above the total at its
    start, from ``torch.profiler``'s memory events (each carries the allocator's running total
    of the blocks allocated while profiling)."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    with _profiler_logs_filtered():
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            step()
    allocation = torch._C._profiler._EventType.Allocation
    events, stack = [], list(prof.profiler.kineto_results.experimental_event_tree())
    while stack:
        event = stack.pop()
        stack.extend(event.children)
        if event.tag == allocation and event.extra_fields.device.type == 'cpu':
            events.append(event)
    if not events:
        return 0
    events.sort(key=lambda e: e.start_time_ns)
    first = events[0].extra_fields
    start = first.total_allocated - first.alloc_size
    return max(e.extra_fields.total_allocated for e in events) - start


# What torch.profiler counts FLOPs of and a training step spends most of its time in: the
# matrix products of the linear layers and of attention.
MATMUL_OPS = ('aten::mm', 'aten::addmm', 'aten::bmm')


def profile_train_step(train_step, top: int = 12) -> dict:
    """One training step under ``torch.profiler`` (CPU, self times; the profiler adds some
    overhead): the FLOPs (2 per multiply-add) and self time of the matrix products
    (:data:`MATMUL_OPS`), the self time of every other op, and the ``top`` costliest others."""
    from torch.profiler import ProfilerActivity, profile

    with _profiler_logs_filtered():
        with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
            train_step()
    matmul_flops = matmul_us = other_us = 0
    others = []
    for event in prof.key_averages():
        if event.key in MATMUL_OPS:
            matmul_flops += event.flops
            matmul_us += event.self_cpu_time_total
        else:
            other_us += event.self_cpu_time_total
            others.append((event.self_cpu_time_total, event.key))
    others.sort(reverse=True)
    return dict(
        matmul_gflop=matmul_flops / 1e9,
        matmul_ms=matmul_us / 1e3,
        other_ms=other_us / 1e3,
        costliest_other=[dict(op=name, ms=us / 1e3) for us, name in others[:top]])


def peak_memory(step, device, sync) -> int:
    """Peak bytes of PyTorch's allocator during one run of ``step`` above the level before it
    (``torch.cuda.max_memory_allocated`` on CUDA, :func:`cpu_allocator_peak` on the CPU)."""
    import torch
    if device.type != 'cuda':
        return cpu_allocator_peak(step)
    sync()
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    sync()
    return torch.cuda.max_memory_allocated(device) - base


# ----------------------------------------------------------------------------------- worker
def _rss_bytes() -> int:
    with open('/proc/self/statm') as f:
        return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def _peak_rss_during(fn) -> int:
    """Peak RSS increase while ``fn`` runs, sampled every 0.5 ms by a helper thread."""
    base = _rss_bytes()
    peak = [base]
    done = threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            time.sleep(0.0005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        fn()
    finally:
        done.set()
        sampler.join()
    return max(peak[0], _rss_bytes()) - base


def stage_sizes(height: int, width: int):
    """Feature-map sizes of the 4 stages (conv patch embeddings: stride 4, then 2)."""
    sizes = []
    for stage in range(4):
        stride = 4 if stage == 0 else 2
        height, width = (height - 1) // stride + 1, (width - 1) // stride + 1
        sizes.append((height, width))
    return sizes


def layer_shapes(arch: dict, height: int, width: int, fixed_pool_size=None):
    """(count, heads, head_dim, feat_h, feat_w, pool_h, pool_w) of the aggregated-attention
    layers (stages 1-3), following the backbone's feature and pooled sizes."""
    shapes = []
    for stage, (h, w) in enumerate(stage_sizes(height, width)[:3]):
        if fixed_pool_size is not None:
            ph = pw = fixed_pool_size
        else:
            ratio = arch['pool_ratios'][stage]
            ph, pw = h // ratio, w // ratio
        heads = arch['num_heads'][stage]
        shapes.append(
            (arch['depths'][stage], heads, arch['embed_dims'][stage] // heads, h, w, ph, pw))
    return shapes


def run_onnx_worker(args) -> dict:
    """Latency of the exported file (impl 'ort') or of the PyTorch model it came from."""
    import torch

    from transnext_mm.deployment import OrtModel, example_input, prepare, read_meta

    impl = args.worker
    if args.threads:
        torch.set_num_threads(args.threads)
    meta = read_meta(args.onnx)
    x = example_input(meta)
    if impl == 'ort':
        run = OrtModel(args.onnx, threads=args.threads)
    else:
        if impl == 'reference-nocache':
            raise ValueError('--onnx compares with torch, op, auto or reference')
        run, _, _ = prepare(
            meta['config'],
            None,
            meta['shape'],
            meta['batch'],
            meta['task'] == 'backbone',
            attn_impl=impl)

    def step():
        with torch.no_grad():
            run(x)

    for _ in range(args.warmup):
        step()
    times = time_runs(step, args.repeats, lambda: None)
    peak = _peak_rss_during(step)
    if impl == 'ort':
        import onnxruntime
        version = f'onnxruntime {onnxruntime.__version__}'
    else:
        version = torch.__version__
    return dict(
        impl=impl,
        median_s=statistics.median(times),
        min_s=min(times),
        peak_mem_mib=max(peak, 0) / 2**20,
        retained_mib=0.0,
        threads=args.threads or torch.get_num_threads(),
        torch=version,
        device=_cpu_name(),
        task=meta['task'])


def run_worker(args) -> dict:
    import torch

    from transnext_mm.models.layers.log_cpb import set_pos_bias_cache
    from transnext_mm.ops import aggregated_attention

    impl = args.worker
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    amp_dtype = getattr(torch, DTYPES[args.dtype])
    use_amp = args.dtype != 'fp32'
    attn_impl = 'reference' if impl == 'reference-nocache' else impl
    set_pos_bias_cache(impl != 'reference-nocache')
    cuda = device.type == 'cuda'
    sync = synchronizer(device)

    model = build_backbone('transnext_mm', transnext_cfg(args, args.arch, attn_impl)).to(device)
    if args.layer:
        # Random inputs at every aggregated-attention layer shape; the core only.
        layers = []
        for count, heads, d, h, w, ph, pw in layer_shapes(model.arch, *args.size,
                                                          args.fixed_pool_size):
            B, N, Np = args.batch, h * w, ph * pw
            tensors = [
                torch.randn(B, heads, N, d),
                torch.randn(B, heads, N, d),
                torch.randn(B, heads, N, d),
                torch.randn(B, heads, Np, d),
                torch.randn(B, heads, Np, d),
                torch.randn(heads, 9) * 0.02,
                torch.randn(heads, N, Np) * 0.1,
                torch.randn(B, heads, N, 9) * 0.1
            ]
            tensors = [t.to(device).requires_grad_(args.backward) for t in tensors]
            layers.append((count, tensors, h, w))

        def step():
            for count, tensors, h, w in layers:
                for _ in range(count):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        out = aggregated_attention(*tensors, h, w, impl=attn_impl)
                    if args.backward:
                        out.float().mean().backward()
    elif args.glu:
        # Each stage's first ConvGLU at the stage's feature size, run depth times.
        model.train(args.backward)
        glus = []
        for stage, (h, w) in enumerate(stage_sizes(*args.size)):
            layer = getattr(model, f'block{stage + 1}')[0].mlp
            x = torch.randn(args.batch, h * w, model.arch['embed_dims'][stage], device=device)
            glus.append((model.arch['depths'][stage], layer, x.requires_grad_(args.backward), h, w))

        def step():
            for count, layer, x, h, w in glus:
                for _ in range(count):
                    with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                        out = layer(x, h, w)
                    if args.backward:
                        out.float().mean().backward()
    else:
        model.train(args.backward)
        x = torch.randn(args.batch, 3, *args.size, device=device)
        eval_step, train_step = backbone_steps(model, x, device, amp_dtype, use_amp)
        step = train_step if args.backward else eval_step

    grad = torch.enable_grad() if args.backward else torch.no_grad()

    def allocated():
        return torch.cuda.memory_allocated(device) if cuda else _rss_bytes()

    with grad:
        before_warmup = allocated()
        for _ in range(args.warmup):
            step()
        sync()
        # Memory kept after the warm-up: eval-mode bias caches, window tables, allocator pools.
        retained = allocated() - before_warmup
        times = time_runs(step, args.repeats, sync)
        # Transient memory of one run, measured outside the timed runs.
        peak = peak_memory(step, device, sync) if cuda else _peak_rss_during(step)
    return dict(
        impl=impl,
        median_s=statistics.median(times),
        min_s=min(times),
        peak_mem_mib=max(peak, 0) / 2**20,
        retained_mib=max(retained, 0) / 2**20,
        threads=torch.get_num_threads(),
        torch=torch.__version__,
        device=torch.cuda.get_device_name(device) if cuda else _cpu_name())


def _cpu_name() -> str:
    try:
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return f'{line.split(":", 1)[1].strip()} ({os.cpu_count()} logical CPUs)'
    except OSError:
        pass
    return f'CPU ({os.cpu_count()} logical CPUs)'


# ------------------------------------------------------------------------------------ peers
def peers_entries(args) -> list:
    """(key, label, kind, attn_impl, toolbox, config) of the backbones of ``--peers``: the
    peers first, then TransNeXt per arch and implementation."""
    entries = [(key, PEERS[key][0], 'peer', None, PEERS[key][1], PEERS[key][2])
               for key in args.peers]
    for arch in args.archs:
        for impl in args.attn_impl:
            label = f'TransNeXt-{arch}' + (f' ({impl})' if len(args.attn_impl) > 1 else '')
            key = f'transnext-{arch}' + (f'-{impl}' if len(args.attn_impl) > 1 else '')
            cfg = transnext_cfg(args, arch, impl, drop_path_rate=PEERS_TRANSNEXT_DROP_PATH)
            entries.append((key, label, 'transnext', impl, 'transnext_mm', cfg))
    return entries


def _error_text(error: BaseException) -> str:
    lines = str(error).strip().splitlines() or ['']
    return f'{type(error).__name__}: {lines[0][:300]}'


def _summary(rounds: list, runs: list) -> dict:
    return dict(median_s=statistics.median(rounds), min_s=min(runs), rounds=rounds)


def run_peers(args) -> dict:
    """Time every backbone of ``--peers`` in this process; returns the JSON report."""
    import torch

    if args.device == 'cuda' and not torch.cuda.is_available():
        raise SystemExit('error: --device cuda: no CUDA device is available')
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cuda = device.type == 'cuda'
    sync = synchronizer(device)
    amp_dtype = getattr(torch, DTYPES[args.dtype])
    use_amp = args.dtype != 'fp32'

    models, built_img_size = {}, {}
    entries = peers_entries(args)

    def build(img_size=None):
        """Build the backbones not built yet, and TransNeXt again for another img_size."""
        for key, label, kind, impl, toolbox, cfg in entries:
            if kind == 'transnext' and img_size is not None:
                cfg = dict(cfg, img_size=img_size)
            if key in models and built_img_size.get(key) == cfg.get('img_size'):
                continue
            models.pop(key, None)
            torch.manual_seed(args.seed)
            models[key] = model = build_backbone(toolbox, cfg).to(device)
            built_img_size[key] = cfg.get('img_size')
            print(
                f'built {label}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M '
                'parameters' + (f', img_size {img_size}' if kind == 'transnext' else ''),
                file=sys.stderr)

    results = []
    for height, width in args.sizes:
        # TransNeXt's img_size follows the input (the pooled-path bias is then the function of
        # the query-key offset that training at img_size uses) unless --img-size fixes it.
        build(args.img_size or min(height, width))
        for batch in args.batches:
            torch.manual_seed(args.seed)
            x = torch.randn(batch, 3, height, width, device=device)
            results += _run_peers_config(args, entries, models, x, device, sync, amp_dtype, use_amp)
            del x
    env = dict(
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        device=(torch.cuda.get_device_name(device) if cuda else _cpu_name()))
    for package in ('mmdet', 'mmpretrain', 'mmengine', 'transnext_mm'):
        env[package] = __import__(package).__version__
    return dict(
        mode='peers', env=env, memory=MEMORY_METHODS['cuda' if cuda else 'cpu'], results=results)


def _run_peers_config(args, entries, models, x, device, sync, amp_dtype, use_amp) -> list:
    """Warm-up, interleaved rounds and peak memory of every backbone on input ``x``."""
    import torch

    step_fns = {
        key: backbone_steps(models[key], x, device, amp_dtype, use_amp)
        for key, *_ in entries
    }
    train = 'train' in args.steps
    evaluate = 'eval' in args.steps
    timings = (['train'] if train else []) + (['cold_eval', 'eval'] if evaluate else [])
    runs = {key: {timing: [] for timing in timings} for key, *_ in entries}
    rounds = {key: {timing: [] for timing in timings} for key, *_ in entries}
    errors, memory_of = {}, {}

    def guarded(key, fn):
        if key in errors:
            return
        try:
            fn()
        except (RuntimeError, ValueError) as error:  # e.g. out of memory, too small an input
            errors[key] = _error_text(error)
            if device.type == 'cuda':
                torch.cuda.empty_cache()

    def warm_up(key):
        model, (eval_step, train_step) = models[key], step_fns[key]
        for _ in range(args.warmup):
            if train:
                model.train()
                train_step()
            if evaluate:
                model.eval()
                eval_step()
        sync()

    def one_turn(key):
        """One round of one backbone: train steps, then the cold and the warm eval runs."""
        model, (eval_step, train_step) = models[key], step_fns[key]
        timed = {}
        model.train()
        if train:
            timed['train'] = time_runs(train_step, args.repeats, sync)
        if evaluate:
            model.eval()
            timed['cold_eval'] = time_runs(eval_step, 1, sync)
            timed['eval'] = time_runs(eval_step, args.repeats, sync)
        for timing, times in timed.items():
            runs[key][timing] += times
            rounds[key][timing].append(statistics.median(times))

    def memory(key):
        model, (eval_step, train_step) = models[key], step_fns[key]
        peaks = {}
        if train:
            model.train()
            peaks['train'] = peak_memory(train_step, device, sync)
        if evaluate:
            model.train()
            model.eval()
            eval_step()  # the cold run: what it builds is kept, not part of a warm step
            peaks['eval'] = peak_memory(eval_step, device, sync)
        memory_of[key] = peaks

    keys = [key for key, *_ in entries]
    for key in keys:
        guarded(key, lambda: warm_up(key))
    for r in range(args.rounds):
        shift = r % len(keys)
        for key in keys[shift:] + keys[:shift]:
            guarded(key, lambda: one_turn(key))
    for key in keys:
        guarded(key, lambda: memory(key))
    profile_of = {}
    if args.profile:
        for key in keys:
            models[key].train()
            guarded(key, lambda: profile_of.update({key: profile_train_step(step_fns[key][1])}))

    rows = []
    height, width = x.shape[2:]
    for key, label, kind, impl, toolbox, cfg in entries:
        row = dict(
            model=label,
            key=key,
            kind=kind,
            attn_impl=impl,
            params_m=sum(p.numel() for p in models[key].parameters()) / 1e6,
            size=[int(height), int(width)],
            batch=int(x.shape[0]))
        if key in errors:
            row['error'] = errors[key]
        else:
            for timing in timings:
                row[timing] = _summary(rounds[key][timing], runs[key][timing])
            for timing, peak in memory_of[key].items():
                row[timing]['peak_mem_mib'] = max(peak, 0) / 2**20
            if key in profile_of:
                row['train']['profile'] = profile_of[key]
        rows.append(row)
    _add_ratios(rows, timings)
    return rows


def _add_ratios(rows: list, timings: list) -> None:
    """Every row's median over the fastest peer's, per timing (rows of one size and batch)."""
    for row in rows:
        if 'error' in row:
            continue
        row['ratio_to_fastest_peer'], row['fastest_peer'] = {}, {}
        for timing in timings:
            peers = [r for r in rows if r['kind'] == 'peer' and 'error' not in r]
            if not peers:
                continue
            fastest = min(peers, key=lambda r: r[timing]['median_s'])
            row['ratio_to_fastest_peer'][timing] = (
                row[timing]['median_s'] / fastest[timing]['median_s'])
            row['fastest_peer'][timing] = fastest['model']


def format_peers_table(args, report: dict) -> str:
    env = report['env']
    runs = f'{args.repeats} run(s)' if args.repeats > 1 else 'one run'
    lines = [
        f'TransNeXt and its peers in one process | {args.device} {args.dtype} | threads '
        f'{env["threads"]} | torch {env["torch"]} | device: {env["device"]}',
        f'{args.rounds} interleaved round(s) in rotating order, {runs} per timing and round '
        f'after {args.warmup} warm-up; medians over the rounds',
        'train: forward + backward (train mode) | cold eval: first forward after train() '
        '-> eval() | eval: warm forward, no grad',
        "x peer: the median over the fastest peer's in that column (> 1: slower)",
        f'peak mem: {report["memory"]}'
    ]
    timings = (['eval', 'cold_eval']
               if 'eval' in args.steps else []) + (['train'] if 'train' in args.steps else [])
    names = dict(eval='eval', cold_eval='cold eval', train='train')
    header = ['model', 'params M']
    for timing in timings:
        header += [f'{names[timing]} ms', 'x peer']
    header += [f'{names[p]} peak MiB' for p in ('eval', 'train') if p in timings]
    configs = []
    for row in report['results']:
        if (row['size'], row['batch']) not in configs:
            configs.append((row['size'], row['batch']))
    for size, batch in configs:
        rows = [r for r in report['results'] if (r['size'], r['batch']) == (size, batch)]
        first = next((r for r in rows if 'fastest_peer' in r), {})
        fastest = ', '.join(f'{names[p]} {first["fastest_peer"][p]}' for p in timings
                            if p in first.get('fastest_peer', {}))
        table = [header]
        for r in rows:
            if 'error' in r:
                table.append([r['model'], f'{r["params_m"]:.1f}', 'failed: ' + r['error'][:100]] +
                             [''] * (len(header) - 3))
                continue
            cells = [r['model'], f'{r["params_m"]:.1f}']
            for timing in timings:
                ratio = r['ratio_to_fastest_peer'].get(timing)
                cells += [
                    f'{r[timing]["median_s"] * 1e3:.1f}',
                    f'{ratio:.2f}x' if ratio is not None else ''
                ]
            cells += [f'{r[p]["peak_mem_mib"]:.0f}' for p in ('eval', 'train') if p in timings]
            table.append(cells)
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        text = [
            ' | '.join(
                c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
            for row in table
        ]
        text.insert(1, '-+-'.join('-' * w for w in widths))
        lines += [
            '', f'input {batch}x3x{size[0]}x{size[1]}' +
            (f' | fastest peer: {fastest}' if fastest else '')
        ] + text
        lines += _format_profiles(rows)
    return '\n'.join(lines)


def _format_profiles(rows: list) -> list:
    """The --profile table of one input: where each backbone's training step spends its time."""
    profiled = [r for r in rows if 'profile' in r.get('train', {})]
    if not profiled:
        return []
    table = [['model', 'matmul GFLOP', 'matmul ms', 'GFLOP/s', 'other ms', 'costliest other ops']]
    for r in profiled:
        p = r['train']['profile']
        rate = p['matmul_gflop'] / (p['matmul_ms'] / 1e3) if p['matmul_ms'] else 0.0
        table.append([
            r['model'], f'{p["matmul_gflop"]:.1f}', f'{p["matmul_ms"]:.0f}', f'{rate:.0f}',
            f'{p["other_ms"]:.0f}',
            ', '.join(f'{o["op"]} {o["ms"]:.0f}' for o in p['costliest_other'][:4])
        ])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    text = [
        ' | '.join(
            c.ljust(w) if i in (0, 5) else c.rjust(w)
            for i, (c, w) in enumerate(zip(row, widths))).rstrip() for row in table
    ]
    text.insert(1, '-+-'.join('-' * w for w in widths))
    return [
        '', 'one profiled training step each (torch.profiler self CPU times, with its overhead): '
        'matmul = ' + ', '.join(MATMUL_OPS) + ' (FLOPs: 2 per multiply-add); other: every other op'
    ] + text


# ------------------------------------------------------------------------------------ driver
def _worker_argv(argv, impl):
    return [sys.executable, osp.abspath(__file__), *argv, '--worker', impl]


def run_impl(argv, impl) -> dict:
    proc = subprocess.run(_worker_argv(argv, impl), capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith('{')]
    if proc.returncode != 0 or not lines:
        err = (proc.stderr.strip().splitlines() or ['no output'])[-1]
        return dict(impl=impl, error=err)
    return json.loads(lines[-1])


def format_table(args, results) -> str:
    mode = ('aggregated-attention core (stages 1-3)'
            if args.layer else 'ConvGLU layers' if args.glu else 'backbone')
    mode += ', forward+backward (train)' if args.backward else ', forward (eval)'
    first = next((r for r in results if 'error' not in r), {})
    model = f'TransNeXt-{args.arch}'
    if args.onnx:
        meta = _onnx_meta(args.onnx)
        model, mode = meta['config'], f'{meta["task"]}, forward (eval), ort = {args.onnx}'
        args.batch, args.size = meta['batch'], meta['shape']
    header = (f'{model} {mode} | input {args.batch}x3x{args.size[0]}x{args.size[1]} '
              f'| {args.pos_bias_mode} | {args.device} {args.dtype} | '
              f'threads {first.get("threads", "?")} | torch {first.get("torch", "?")}\n'
              f'device: {first.get("device", "?")} | median of {args.repeats} runs after '
              f'{args.warmup} warm-up, {args.rounds} round(s); peak mem: ' +
              ('max_memory_allocated' if args.device == 'cuda' else 'peak RSS (sampled)') +
              ' increase during one run; retained: memory kept after warm-up (caches)')
    rows = [('impl', 'median ms', 'min ms', 'img/s', 'peak mem MiB', 'retained MiB', 'speed-up')]
    base = next((r['median_s'] for r in results if 'error' not in r), None)
    for r in results:
        label = LABELS.get(r['impl'], r['impl'])
        if 'error' in r:
            rows.append((label, 'failed: ' + r['error'][:80], '', '', '', '', ''))
            continue
        rows.append((label, f'{r["median_s"] * 1e3:.1f}', f'{r["min_s"] * 1e3:.1f}',
                     f'{args.batch / r["median_s"]:.2f}', f'{r["peak_mem_mib"]:.0f}',
                     f'{r["retained_mib"]:.0f}', f'{base / r["median_s"]:.2f}x'))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [
        ' | '.join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
        for row in rows
    ]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return header + '\n' + '\n'.join(lines)


def _onnx_meta(path: str) -> dict:
    from transnext_mm.deployment import read_meta
    return read_meta(path)


def _write_json(path: str, report: dict) -> None:
    with open(path, 'w') as f:
        json.dump(report, f, indent=2)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_onnx_worker(args) if args.onnx else run_worker(args)))
        return
    if args.peers is not None:
        report = run_peers(args)
        print(format_peers_table(args, report))
        if args.json:
            _write_json(args.json, dict(args=vars(args), **report))
        return
    impls = args.attn_impl
    if args.onnx:
        from transnext_mm.deployment import DeployError
        try:
            _onnx_meta(args.onnx)  # a readable model with its metadata, or the error
        except DeployError as e:
            raise SystemExit(f'error: --onnx {e}')
        impls = ['ort'] + [i for i in impls if i != 'reference-nocache']
        if '--attn-impl' not in argv:
            impls = ['ort', 'torch', 'auto']
    per_impl = {impl: [] for impl in impls}
    for _ in range(args.rounds):
        for impl in impls:
            per_impl[impl].append(run_impl(argv, impl))
    results = []
    for impl, runs in per_impl.items():
        ok = [r for r in runs if 'error' not in r]
        if not ok:
            results.append(runs[-1])
            continue
        merged = dict(ok[0])
        merged['median_s'] = statistics.median(r['median_s'] for r in ok)
        merged['min_s'] = min(r['min_s'] for r in ok)
        merged['peak_mem_mib'] = max(r['peak_mem_mib'] for r in ok)
        merged['retained_mib'] = max(r['retained_mib'] for r in ok)
        merged['rounds'] = [r['median_s'] for r in ok]
        results.append(merged)
    print(format_table(args, results))
    if args.json:
        _write_json(args.json, dict(args=vars(args), results=results))


if __name__ == '__main__':
    main()
