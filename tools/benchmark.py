# Copyright (c) transnext-mm contributors. All rights reserved.
"""Benchmark the TransNeXt backbone (or only its aggregated-attention core) per attention impl.

Each implementation runs in its own fresh process (clean memory figures, no shared caches);
with ``--rounds R`` the implementations are interleaved R times and the median of the per-round
medians is reported, which keeps comparisons fair on a shared, noisy machine.

Implementations (``--attn-impl``, several allowed):
    reference-nocache  the straightforward implementation: the readable unfold path with the
                       position-bias cache disabled (every block recomputes its log-CPB bias)
    reference          the unfold path with the bias cache
    torch              the PyTorch fast path
    op                 the compiled op (transnext_mm._ext)
    auto               what attn_impl='auto' picks

Examples::

    python tools/benchmark.py --arch tiny --size 512 512 --threads 2
    python tools/benchmark.py --arch tiny --size 512 512 --layer --backward
    python tools/benchmark.py --arch tiny --size 512 512 --glu --attn-impl torch op
    python tools/benchmark.py --device cuda --dtype fp16 --batch 8 --attn-impl torch op
    python tools/benchmark.py --onnx upernet.onnx --attn-impl torch auto --threads 2

With ``--onnx FILE`` (written by tools/deployment/pytorch2onnx.py) the exported file runs in
ONNX Runtime (CPU, ``ort``) beside the PyTorch model of the config it was exported from (random
weights, same task, input size and batch) with each ``--attn-impl``.
"""
import argparse
import json
import os
import os.path as osp
import statistics
import subprocess
import sys
import threading
import time

IMPLS = ('reference-nocache', 'reference', 'torch', 'op', 'auto')
LABELS = {'reference-nocache': 'reference(no-cache)'}
DTYPES = {'fp32': 'float32', 'fp16': 'float16', 'bf16': 'bfloat16'}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument('--arch', default='tiny', help='micro, tiny, small or base')
    parser.add_argument('--size', nargs=2, type=int, default=[512, 512], metavar=('H', 'W'),
                        help='input image size')
    parser.add_argument('--batch', type=int, default=1)
    parser.add_argument('--img-size', type=int, default=224,
                        help="backbone img_size (where 'interpolate' tabulates the bias)")
    parser.add_argument('--pos-bias-mode', default='interpolate',
                        choices=['interpolate', 'extrapolate'])
    parser.add_argument('--fixed-pool-size', type=int, default=None)
    parser.add_argument('--attn-impl', nargs='+', default=['reference-nocache', 'torch', 'op'],
                        choices=IMPLS)
    parser.add_argument('--device', default='cpu', choices=['cpu', 'cuda'])
    parser.add_argument('--dtype', default='fp32', choices=list(DTYPES),
                        help='fp16 / bf16 run under torch.autocast')
    parser.add_argument('--threads', type=int, default=None, help='torch CPU threads')
    parser.add_argument('--backward', action='store_true',
                        help='time forward + backward (train mode) instead of forward (eval)')
    parser.add_argument('--layer', action='store_true',
                        help='time only the aggregated-attention core over the arch\'s '
                        'stage 1-3 layer shapes')
    parser.add_argument('--glu', action='store_true',
                        help='time only the ConvGLU layers (fc1, gate, fc2) at every stage\'s '
                        'feature size; \'op\' / \'auto\' use the compiled gate for inference')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--rounds', type=int, default=1,
                        help='interleave the implementations this many times')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--onnx', default=None,
                        help='time this exported .onnx file in ONNX Runtime beside PyTorch')
    parser.add_argument('--json', default=None, help='also write the results to this file')
    parser.add_argument('--worker', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.batch < 1 or args.warmup < 0 or args.repeats < 1 or args.rounds < 1:
        parser.error('--batch, --repeats and --rounds must be >= 1 and --warmup >= 0')
    if args.layer and args.glu:
        parser.error('--layer and --glu are exclusive')
    if args.onnx and (args.layer or args.glu or args.backward or args.device != 'cpu'
                      or args.dtype != 'fp32'):
        parser.error('--onnx times CPU fp32 inference of the whole exported model: it takes no '
                     '--layer, --glu, --backward, --device cuda or --dtype')
    if args.device == 'cpu' and args.dtype == 'fp16':
        parser.error('--dtype fp16 is not supported on CPU (use fp32 or bf16)')
    return args


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
        shapes.append((arch['depths'][stage], heads, arch['embed_dims'][stage] // heads, h, w,
                       ph, pw))
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
        run, _, _ = prepare(meta['config'], None, meta['shape'], meta['batch'],
                            meta['task'] == 'backbone', attn_impl=impl)

    def step():
        with torch.no_grad():
            run(x)

    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    peak = _peak_rss_during(step)
    if impl == 'ort':
        import onnxruntime
        version = f'onnxruntime {onnxruntime.__version__}'
    else:
        version = torch.__version__
    return dict(impl=impl, median_s=statistics.median(times), min_s=min(times),
                peak_mem_mib=max(peak, 0) / 2**20, retained_mib=0.0,
                threads=args.threads or torch.get_num_threads(), torch=version,
                device=_cpu_name(), task=meta['task'])


def run_worker(args) -> dict:
    import torch

    from transnext_mm.models.backbones import TransNeXt
    from transnext_mm.models.layers.log_cpb import set_pos_bias_cache
    from transnext_mm.ops.aggregated_attention import aggregated_attention

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

    def sync():
        if cuda:
            torch.cuda.synchronize()

    model = TransNeXt(arch=args.arch, img_size=args.img_size, pos_bias_mode=args.pos_bias_mode,
                      fixed_pool_size=args.fixed_pool_size, attn_impl=attn_impl).to(device)
    if args.layer:
        # Random inputs at every aggregated-attention layer shape; the core only.
        layers = []
        for count, heads, d, h, w, ph, pw in layer_shapes(model.arch, *args.size,
                                                          args.fixed_pool_size):
            B, N, Np = args.batch, h * w, ph * pw
            tensors = [torch.randn(B, heads, N, d), torch.randn(B, heads, N, d),
                       torch.randn(B, heads, N, d), torch.randn(B, heads, Np, d),
                       torch.randn(B, heads, Np, d), torch.randn(heads, 9) * 0.02,
                       torch.randn(heads, N, Np) * 0.1, torch.randn(B, heads, N, 9) * 0.1]
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
            glus.append((model.arch['depths'][stage], layer, x.requires_grad_(args.backward), h,
                         w))

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

        def step():
            with torch.autocast(device.type, dtype=amp_dtype, enabled=use_amp):
                outs = model(x)
            if args.backward:
                sum(o.float().mean() for o in outs).backward()
                model.zero_grad(set_to_none=True)

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
        times = []
        for _ in range(args.repeats):
            sync()
            start = time.perf_counter()
            step()
            sync()
            times.append(time.perf_counter() - start)
        # Transient memory of one run, measured outside the timed runs.
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
            step()
            sync()
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = _peak_rss_during(step)
    return dict(impl=impl, median_s=statistics.median(times), min_s=min(times),
                peak_mem_mib=max(peak, 0) / 2**20, retained_mib=max(retained, 0) / 2**20,
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
    mode = ('aggregated-attention core (stages 1-3)' if args.layer else
            'ConvGLU layers' if args.glu else 'backbone')
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
              f'{args.warmup} warm-up, {args.rounds} round(s); peak mem: '
              + ('max_memory_allocated' if args.device == 'cuda' else 'peak RSS (sampled)')
              + ' increase during one run; retained: memory kept after warm-up (caches)')
    rows = [('impl', 'median ms', 'min ms', 'img/s', 'peak mem MiB', 'retained MiB', 'speed-up')]
    base = next((r['median_s'] for r in results if 'error' not in r), None)
    for r in results:
        label = LABELS.get(r['impl'], r['impl'])
        if 'error' in r:
            rows.append((label, 'failed: ' + r['error'][:80], '', '', '', '', ''))
            continue
        rows.append((label, f'{r["median_s"] * 1e3:.1f}', f'{r["min_s"] * 1e3:.1f}',
                     f'{args.batch / r["median_s"]:.2f}', f'{r["peak_mem_mib"]:.0f}',
                     f'{r["retained_mib"]:.0f}',
                     f'{base / r["median_s"]:.2f}x'))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = [' | '.join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in
                        enumerate(zip(row, widths))) for row in rows]
    lines.insert(1, '-+-'.join('-' * w for w in widths))
    return header + '\n' + '\n'.join(lines)


def _onnx_meta(path: str) -> dict:
    from transnext_mm.deployment import read_meta
    return read_meta(path)


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    if args.worker:
        print(json.dumps(run_onnx_worker(args) if args.onnx else run_worker(args)))
        return
    impls = args.attn_impl
    if args.onnx:
        from transnext_mm.deployment import DeployError
        try:
            meta = _onnx_meta(args.onnx)
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
        with open(args.json, 'w') as f:
            json.dump(dict(args=vars(args), results=results), f, indent=2)


if __name__ == '__main__':
    main()
