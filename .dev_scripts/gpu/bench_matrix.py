# Copyright (c) transnext-mm contributors. All rights reserved.
"""The benchmark matrix on the GPU (bf16 unless said), in one process per part.

Part of the prepared GPU run (``.dev_scripts/gpu/run_all.sh``); ``--dry-run`` runs the same code on the
CPU with tiny shapes. Times are medians of CUDA-event-timed calls after warm-up; peak memory is
``torch.cuda.max_memory_allocated`` above the starting point during one call.

Parts (``--parts``):
    core     copy bandwidth of the card; the 19 aggregated-attention layers of Tiny
             (``reference`` = the unfold path, ``torch``, ``op``; forward and forward+backward,
             per stage, with effective bandwidth); backbone training steps (``reference-nocache``,
             ``torch``, ``op``, timm's ``pvt_v2_b2`` and ``swin_tiny_patch4_window7_224``
             features only); fp16 inference at 512x512 batch 8; AMP training steps (fp16 with
             loss scaling, bf16) with ``attn_impl='auto'``; ``with_cp`` peak memory.
    flex     the 19 layers with ``flex_aggregated_attention`` (torch.compile'd), beside ``op``.
    compile  the backbone's inference, torch.compile'd against eager (``attn_impl='auto'``).
"""
import time

import torch

from common import (ROOT, Recorder, base_argparser, core_inputs, free_memory, peak_memory_mib,
                    pick_device, time_fn)

import sys  # noqa: E402  (tools/ holds benchmark.py, whose shape helpers are reused)
sys.path.insert(0, f'{ROOT}/tools')
from benchmark import layer_shapes  # noqa: E402

DTYPES = {'fp32': torch.float32, 'fp16': torch.float16, 'bf16': torch.bfloat16}
TIMM_MODELS = ('pvt_v2_b2', 'swin_tiny_patch4_window7_224')
QUICK = {'on': False}  # the dry run: one warm-up and one timed call (it checks the code)


def timed(step, device, warmup, repeats, budget_s=3.0):
    if QUICK['on']:
        warmup, repeats = 1, 1
    return time_fn(step, device, warmup=warmup, repeats=repeats, budget_s=budget_s)


# ---------------------------------------------------------------------------------- layers
def layer_impl(name):
    if name == 'flex':
        from transnext_mm.ops.aggregated_attention.flex import flex_aggregated_attention
        return flex_aggregated_attention
    from transnext_mm.ops.aggregated_attention import aggregated_attention

    def run(*args):
        return aggregated_attention(*args, impl=name)
    return run


def forward_bytes(B, heads, N, num_pool, d, elem):
    """Fewest bytes a forward must move: read q, k, v, k_pool, v_pool, bias_pool, token_weight,
    write out and the fp32 log-sum-exp."""
    return (elem * (4 * B * heads * N * d + 2 * B * heads * num_pool * d + heads * N * num_pool
                    + B * heads * N * 9) + 4 * B * heads * N)


def bench_layers(rec, device, sizes, impls, dtype_name, budget_s):
    from transnext_mm.models.backbones import TransNeXt
    arch = TransNeXt(arch='tiny').arch
    dtype = DTYPES[dtype_name]
    elem = torch.empty(0, dtype=dtype).element_size()
    for batch, height, width in sizes:
        size_key = f'layers.{height}x{width}_b{batch}'
        for impl in impls:
            fn = layer_impl(impl)
            for backward in (False, True):
                mode = 'fwd_bwd' if backward else 'fwd'
                key = f'{size_key}.{impl}.{mode}'
                if backward and impl == 'flex' and device == 'cpu':
                    rec.put(key, {'skipped': 'flex_attention has no backward on CPU'})
                    continue
                with rec.guard(key):
                    stages, total = [], 0.0
                    for count, heads, d, h, w, ph, pw in layer_shapes(arch, height, width):
                        N, Np = h * w, ph * pw
                        tensors = core_inputs(batch, heads, h, w, Np, d, dtype, device,
                                              requires_grad=backward)
                        grad_out = torch.randn(batch, heads, N, d, device=device, dtype=dtype)
                        args = (*tensors, h, w)
                        if impl == 'flex' and device == 'cpu':
                            args = (*args, False)  # eager: no compiler on the dry run

                        def step():
                            if backward:
                                out = fn(*args)
                                torch.autograd.grad(out, tensors, grad_out)
                            else:
                                with torch.no_grad():
                                    fn(*args)
                        start = time.perf_counter()
                        timing = timed(step, device, warmup=2, repeats=20, budget_s=budget_s)
                        stage = dict(count=count, B=batch, heads=heads, N=N, Np=Np, d=d,
                                     first_calls_s=round(time.perf_counter() - start, 2),
                                     **timing)
                        if not backward:
                            nbytes = forward_bytes(batch, heads, N, Np, d, elem)
                            stage['bytes'] = nbytes
                            stage['gbytes_per_s'] = round(nbytes / timing['median_ms'] / 1e6, 1)
                        stage['peak_mem_mib'] = peak_memory_mib(step, device)
                        stages.append(stage)
                        total += count * timing['median_ms']
                        del tensors, grad_out, args
                        free_memory()
                    rec.put(key, {'dtype': dtype_name, 'total_ms_19_layers': round(total, 3),
                                  'stages': stages})


# -------------------------------------------------------------------------------- backbones
def build_backbone(name, height, width, device, **kwargs):
    """TransNeXt-Tiny with an attention impl (``reference-nocache``: the unfold path with the
    position-bias cache off) or a timm model (features only, at this input size)."""
    from transnext_mm.models.layers.log_cpb import set_pos_bias_cache
    set_pos_bias_cache(name != 'reference-nocache')
    if name in TIMM_MODELS:
        import timm
        extra = {'img_size': (height, width)} if name.startswith('swin') else {}
        return timm.create_model(name, pretrained=False, features_only=True, **extra).to(device)
    from transnext_mm.models.backbones import TransNeXt
    impl = 'reference' if name == 'reference-nocache' else name
    return TransNeXt(arch='tiny', attn_impl=impl, **kwargs).to(device)


def train_step_fn(model, x, dtype, scaler=None, optimizer=None):
    device_type = x.device.type

    def step():
        with torch.autocast(device_type, dtype=dtype, enabled=dtype != torch.float32):
            outs = model(x)
        loss = sum(o.float().mean() for o in outs)
        if scaler is not None:
            scaler.scale(loss).backward()
        else:
            loss.backward()
        if optimizer is not None:
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        else:
            model.zero_grad(set_to_none=True)
        return loss
    return step


def bench_backbone_train(rec, device, sizes, names, dtype_name, budget_s):
    dtype = DTYPES[dtype_name]
    for batch, height, width in sizes:
        for name in names:
            key = f'backbone_train.{height}x{width}_b{batch}.{name}'
            if name in TIMM_MODELS:
                try:
                    import timm  # noqa: F401
                except ImportError:
                    rec.put(key, {'skipped': 'timm is not installed'})
                    continue
            with rec.guard(key):
                model = build_backbone(name, height, width, device).train()
                x = torch.randn(batch, 3, height, width, device=device)
                step = train_step_fn(model, x, dtype)
                timing = timed(step, device, warmup=2, repeats=10, budget_s=budget_s)
                rec.put(key, {'dtype': dtype_name, **timing,
                              'peak_mem_mib': peak_memory_mib(step, device)})
                del model, x, step
    from transnext_mm.models.layers.log_cpb import set_pos_bias_cache
    set_pos_bias_cache(True)


def bench_inference(rec, device, size, names, dtype_name, budget_s):
    dtype = DTYPES[dtype_name]
    batch, height, width = size
    for name in names:
        key = f'inference.{height}x{width}_b{batch}_{dtype_name}.{name}'
        with rec.guard(key):
            model = build_backbone(name, height, width, device).eval()
            x = torch.randn(batch, 3, height, width, device=device)

            def step():
                with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
                    model(x)
            timing = timed(step, device, warmup=2, repeats=10, budget_s=budget_s)
            rec.put(key, {'dtype': dtype_name, **timing,
                          'peak_mem_mib': peak_memory_mib(step, device)})
            del model, x
    from transnext_mm.models.layers.log_cpb import set_pos_bias_cache
    set_pos_bias_cache(True)


def bench_amp(rec, device, size, budget_s):
    """A full training step (AdamW) with attn_impl='auto': fp16 with loss scaling, bf16."""
    batch, height, width = size
    for dtype_name in ('fp16', 'bf16'):
        key = f'amp_train.{height}x{width}_b{batch}.{dtype_name}'
        if device == 'cpu' and dtype_name == 'fp16':
            rec.put(key, {'skipped': 'fp16 autocast with loss scaling is a CUDA check'})
            continue
        with rec.guard(key):
            model = build_backbone('auto', height, width, device).train()
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
            scaler = torch.amp.GradScaler(device) if dtype_name == 'fp16' else None
            x = torch.randn(batch, 3, height, width, device=device)
            step = train_step_fn(model, x, DTYPES[dtype_name], scaler, optimizer)
            losses = [float(step()) for _ in range(3)]
            timing = timed(step, device, warmup=1, repeats=10, budget_s=budget_s)
            finite = all(bool(torch.isfinite(p).all()) for p in model.parameters())
            rec.put(key, {**timing, 'first_losses': losses, 'params_finite': finite,
                          'loss_scale': scaler.get_scale() if scaler else None,
                          'peak_mem_mib': peak_memory_mib(step, device),
                          'pass': finite and all(map(lambda v: v == v, losses))})
            del model, optimizer, x, step


def bench_with_cp(rec, device, size, dtype_name, budget_s):
    batch, height, width = size
    for with_cp in (False, True):
        key = f'with_cp.{height}x{width}_b{batch}.{"on" if with_cp else "off"}'
        with rec.guard(key):
            model = build_backbone('op' if device == 'cuda' else 'auto', height, width, device,
                                   with_cp=with_cp).train()
            x = torch.randn(batch, 3, height, width, device=device)
            step = train_step_fn(model, x, DTYPES[dtype_name])
            timing = timed(step, device, warmup=1, repeats=5, budget_s=budget_s)
            rec.put(key, {'dtype': dtype_name, **timing,
                          'peak_mem_mib': peak_memory_mib(step, device)})
            del model, x, step


def bench_copy_bandwidth(rec, device):
    with rec.guard('copy_bandwidth'):
        nbytes = (2 << 30) if device == 'cuda' else (64 << 20)
        src = torch.randn(nbytes // 4, device=device)
        dst = torch.empty_like(src)
        timing = timed(lambda: dst.copy_(src), device, warmup=3, repeats=20)
        rec.put('copy_bandwidth', {'bytes_per_copy': 2 * nbytes, **timing,
                                   'gbytes_per_s': round(2 * nbytes / timing['median_ms'] / 1e6,
                                                         1),
                                   'note': 'a device-to-device copy: bytes read + written'})
        del src, dst


def bench_compile(rec, device, size, dtype_name, budget_s):
    batch, height, width = size
    dtype = DTYPES[dtype_name]
    model = build_backbone('auto', height, width, device).eval()
    x = torch.randn(batch, 3, height, width, device=device)
    for mode in ('eager', 'compiled'):
        key = f'compile.{height}x{width}_b{batch}_{dtype_name}.{mode}'
        with rec.guard(key):
            run = model if mode == 'eager' else torch.compile(model)

            def step():
                with torch.no_grad(), torch.autocast(x.device.type, dtype=dtype):
                    run(x)
            start = time.perf_counter()
            step()
            if device == 'cuda':
                torch.cuda.synchronize()
            first = time.perf_counter() - start
            timing = timed(step, device, warmup=2, repeats=10, budget_s=budget_s)
            rec.put(key, {'dtype': dtype_name, 'first_call_s': round(first, 2), **timing})


def main():
    parser = base_argparser(__doc__.splitlines()[0])
    parser.add_argument('--parts', nargs='+', default=['core'], choices=['core', 'flex',
                                                                           'compile'])
    args = parser.parse_args()
    device = pick_device(args.dry_run)
    torch.manual_seed(0)
    torch.backends.cudnn.benchmark = False
    try:  # one compiled graph per layer shape: more than dynamo's default of 8
        torch._dynamo.config.cache_size_limit = 64
    except AttributeError:
        pass
    rec = Recorder(args.out, {'device': device, 'dry_run': args.dry_run,
                              'torch': torch.__version__,
                              'device_name': torch.cuda.get_device_name()
                              if device == 'cuda' else 'cpu'})
    QUICK['on'] = args.dry_run
    if args.dry_run:
        layer_sizes, train_sizes = [(1, 32, 32)], [(1, 32, 32)]
        infer_size, infer_dtype, budget = (1, 32, 32), 'bf16', 0.5
    else:
        layer_sizes = train_sizes = [(8, 512, 512), (2, 800, 1344)]
        infer_size, infer_dtype, budget = (8, 512, 512), 'fp16', 3.0
    for part in args.parts:
        start = time.perf_counter()
        if part == 'core':
            bench_copy_bandwidth(rec, device)
            bench_layers(rec, device, layer_sizes, ('reference', 'torch', 'op'), 'bf16', budget)
            bench_backbone_train(rec, device, train_sizes,
                                 ('reference-nocache', 'torch', 'op', *TIMM_MODELS), 'bf16',
                                 budget)
            bench_inference(rec, device, infer_size, ('reference-nocache', 'torch', 'op'),
                            infer_dtype, budget)
            bench_amp(rec, device, train_sizes[0], budget)
            bench_with_cp(rec, device, train_sizes[0], 'bf16', budget)
        elif part == 'flex':
            bench_layers(rec, device, layer_sizes, ('flex',), 'bf16', budget)
        else:
            if args.dry_run:
                rec.put('compile', {'skipped': 'torch.compile of the backbone is a CUDA check '
                                               '(minutes of compiling on this CPU)'})
            else:
                bench_compile(rec, device, train_sizes[0], 'bf16', budget)
        rec.put(f'seconds.{part}', round(time.perf_counter() - start, 1))
        print(f'bench_matrix: {part} done in {time.perf_counter() - start:.1f} s', flush=True)


if __name__ == '__main__':
    main()
