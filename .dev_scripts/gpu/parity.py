# Copyright (c) transnext-mm contributors. All rights reserved.
"""Parity of the attention implementations at the backbone's real layouts and sizes.

Part of the prepared GPU run (``.dev_scripts/gpu/run_all.sh``); ``--dry-run`` runs the same checks on
the CPU with tiny shapes.

* ``backbone``: TransNeXt-Tiny (512x512 batch 8, 800x1344 batch 2), one training step
  (forward + backward of a fixed random projection of the four outputs) with ``attn_impl``
  ``op``, ``torch`` and ``reference`` in fp32 and under fp16 / bf16 autocast, against the
  ``reference`` implementation in float64 (at 800x1344 in fp32 without TF32, for memory).
  Errors are ``|x - truth| / |truth|`` per output and per gradient (the input's and every
  parameter's). ``op`` and ``torch`` pass when every error is
  within ``max(tolerance of the dtype, 2 x the error of the reference implementation in the
  same dtype)``, i.e. they add no error beyond what that precision costs the readable path.
* ``op``: the compiled op's edge cases against the float64 reference from the same (rounded)
  inputs: Np = 0, head dims 16 / 24 / 32 / 48 / 64, batch * heads above 65535, a non-default
  stream (CUDA), two runs bitwise equal; and the backbone with ``fixed_pool_size``.
* ``flex``: ``flex_aggregated_attention`` (compiled, forward and backward on CUDA; eager forward
  on CPU) at the stage 1-3 shapes of Tiny at 512x512 batch 8.
"""
import time

import torch

from common import (CORE_NAMES, Recorder, base_argparser, core_inputs, free_memory,
                    pick_device, rel_error)

# Relative (norm) tolerances: backbone runs (19 layers deep) and single op calls.
BACKBONE_TOL = {'fp32': 1e-4, 'fp16': 1e-2, 'bf16': 2e-2}
OP_TOL = {'fp32': 2e-5, 'fp16': 3e-3, 'bf16': 2e-2}
DTYPES = {'fp64': torch.float64, 'fp32': torch.float32, 'fp16': torch.float16,
          'bf16': torch.bfloat16}
GRAD_FACTOR = 4  # gradients go through one more rounding step than outputs


def backbone_step(state, arch_cfg, impl, dtype_name, x, device):
    """One forward + backward of a fixed random projection of the outputs (the same for every
    run); returns (outputs, {name: grad}) in float64 on ``device``."""
    from transnext_mm.models.backbones import TransNeXt
    dtype = DTYPES[dtype_name]
    model = TransNeXt(attn_impl=impl, **arch_cfg)
    model.load_state_dict(state)
    model = model.to(device).train()
    autocast = dtype in (torch.float16, torch.bfloat16)
    if dtype == torch.float64:
        model = model.double()
    x = x.to(device, torch.float64 if dtype == torch.float64 else torch.float32)
    x = x.clone().requires_grad_()
    with torch.autocast(torch.device(device).type, dtype=dtype, enabled=autocast):
        outs = model(x)
    loss = 0
    for i, o in enumerate(outs):
        w = torch.randn(o.shape, generator=torch.Generator().manual_seed(100 + i),
                        dtype=torch.float64)
        loss = loss + (o.double() * w.to(device)).sum()
    loss.backward()
    grads = {'input': x.grad.double()}
    grads.update({name: p.grad.double() for name, p in model.named_parameters()
                  if p.grad is not None})
    return [o.detach().double() for o in outs], grads


def compare(outs, grads, truth):
    """Errors of one run against the float64 truth."""
    t_outs, t_grads = truth
    errors = {f'out{i}': rel_error(o, t) for i, (o, t) in enumerate(zip(outs, t_outs))}
    missing = sorted(set(t_grads) - set(grads))
    for name, g in grads.items():
        errors[f'grad.{name}'] = rel_error(g, t_grads[name]) if name in t_grads else float('inf')
    for name in missing:
        errors[f'grad.{name}'] = float('inf')
    return errors


def judge(errors, baseline, tol):
    """Pass when every error is within max(tol, 2 x the baseline's error of that tensor)."""
    worst, worst_ratio, failed = None, 0.0, []
    for name, err in errors.items():
        limit = tol * (1 if name.startswith('out') else GRAD_FACTOR)
        if baseline is not None and name in baseline:
            limit = max(limit, 2 * baseline[name])
        ratio = err / limit if limit > 0 else float('inf')
        if ratio > worst_ratio:
            worst, worst_ratio = name, ratio
        if not err <= limit:
            failed.append(name)
    return worst, worst_ratio, failed


def summarise(errors):
    outs = [v for k, v in errors.items() if k.startswith('out')]
    grads = {k: v for k, v in errors.items() if k.startswith('grad.')}
    top = sorted(grads.items(), key=lambda kv: -kv[1])[:5]
    return {'out_max_rel_err': max(outs), 'out_rel_err': outs,
            'grad_max_rel_err': max(grads.values()), 'grads_compared': len(grads),
            'grad_input_rel_err': grads.get('grad.input'),
            'grad_top5': {k[5:]: v for k, v in top}}


def check_backbone(rec, device, sizes, dtypes, impls, arch):
    from transnext_mm.models.backbones import TransNeXt
    arch_cfg = dict(arch=arch)
    state = TransNeXt(**arch_cfg).state_dict()
    for batch, height, width, truth_dtype in sizes:
        key = f'backbone.{arch}_{height}x{width}_b{batch}'
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(1))
        truth = None
        with rec.guard(f'{key}.truth'):
            start = time.perf_counter()
            truth = backbone_step(state, arch_cfg, 'reference', truth_dtype, x, device)
            rec.put(f'{key}.truth', {'impl': 'reference', 'dtype': truth_dtype,
                                     'seconds': round(time.perf_counter() - start, 2)})
        if truth is not None:
            for dtype_name in dtypes:
                baseline = None
                for impl in ('reference', *[i for i in impls if i != 'reference']):
                    run_key = f'{key}.{dtype_name}.{impl}'
                    with rec.guard(run_key):
                        start = time.perf_counter()
                        outs, grads = backbone_step(state, arch_cfg, impl, dtype_name, x,
                                                    device)
                        errors = compare(outs, grads, truth)
                        del outs, grads
                        result = summarise(errors)
                        result['seconds'] = round(time.perf_counter() - start, 2)
                        tol = BACKBONE_TOL[dtype_name]
                        if impl == 'reference':
                            baseline = errors
                            result['role'] = 'baseline (the readable path in this precision)'
                            result['pass'] = None
                        else:
                            worst, ratio, failed = judge(errors, baseline, tol)
                            result.update(worst=worst, worst_error_over_limit=round(ratio, 3),
                                          failed=failed[:20], tolerance=tol,
                                          rule='err <= max(tol (x4 for grads), '
                                          '2 x reference err in this dtype)',
                                          **{'pass': not failed})
                        rec.put(run_key, result)
                    free_memory()
            del truth
            free_memory()


def op_case(device, B, heads, height, width, num_pool, head_dim, dtype_name, seed=0):
    """Errors of the op's output and 8 gradients against float64 reference autograd."""
    from transnext_mm.ops.aggregated_attention import (aggregated_attention_op,
                                                       aggregated_attention_reference)
    dtype = DTYPES[dtype_name]
    tensors = core_inputs(B, heads, height, width, num_pool, head_dim, dtype, device, seed,
                          requires_grad=True)
    out = aggregated_attention_op(*tensors, height, width)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1))
    grad_out = grad_out.to(device, dtype)
    grads = torch.autograd.grad(out, tensors, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    expected = aggregated_attention_reference(*leaves, height, width)
    grads_ref = torch.autograd.grad(expected, leaves, grad_out.double())
    errors = {'out': rel_error(out, expected)}
    errors.update({f'grad.{n}': rel_error(g, r) for n, g, r in zip(CORE_NAMES, grads, grads_ref)})
    tol = OP_TOL[dtype_name]
    failed = [k for k, v in errors.items() if not v <= tol * (1 if k == 'out' else GRAD_FACTOR)]
    return {'shape': dict(B=B, heads=heads, height=height, width=width, Np=num_pool,
                          d=head_dim), 'dtype': dtype_name, 'rel_err': errors,
            'tolerance': tol, 'failed': failed, 'pass': not failed}


def op_run(tensors, grad_out, height, width):
    from transnext_mm.ops.aggregated_attention import aggregated_attention_op
    out = aggregated_attention_op(*tensors, height, width)
    return (out, *torch.autograd.grad(out, tensors, grad_out))


def check_op(rec, device, dry_run):
    cuda = device == 'cuda'
    dtypes = ['fp32', 'bf16']
    head_dims = (16, 64) if dry_run else (16, 24, 32, 48, 64)
    # Np = 0 (the empty pooled path).
    for dtype_name in dtypes:
        key = f'op.np0_{dtype_name}'
        with rec.guard(key):
            rec.put(key, op_case(device, 2, 3, 9, 13, 0, 24, dtype_name))
    # Head dims.
    grid = (7, 9) if dry_run else (17, 23)
    for head_dim in head_dims:
        for dtype_name in dtypes:
            key = f'op.head_dim_{head_dim}_{dtype_name}'
            with rec.guard(key):
                rec.put(key, op_case(device, 2, 2, *grid, 12, head_dim, dtype_name))
    # batch * heads above 65535 (once the grid's y limit; now blocks on a 1-D grid).
    # (The dry run exercises the code with a small batch: the limit is the CUDA grid's.)
    key = 'op.batch_heads_above_65535'
    with rec.guard(key):
        B, heads = (4, 3) if dry_run else (2731, 24)
        result = op_case(device, B, heads, 3, 5, 4, 24, 'fp32')
        result['batch_x_heads'] = B * heads
        rec.put(key, result)
    # Stage 1 of Tiny at 512x512 batch 8 (tiny on the dry run): stream and determinism.
    shape = (2, 3, 8, 8, 4, 24) if dry_run else (8, 3, 128, 128, 256, 24)
    B, heads, height, width, num_pool, head_dim = shape
    for dtype_name in dtypes:
        key = f'op.deterministic_{dtype_name}'
        with rec.guard(key):
            tensors = core_inputs(*shape, DTYPES[dtype_name], device, requires_grad=True)
            grad_out = torch.randn(B, heads, height * width, head_dim).to(device, tensors[0].dtype)
            first = op_run(tensors, grad_out, height, width)
            second = op_run(tensors, grad_out, height, width)
            same = {name: bool(torch.equal(a, b)) for name, a, b in
                    zip(('out',) + CORE_NAMES, first, second)}
            rec.put(key, {'shape': shape, 'bitwise_equal': same, 'pass': all(same.values())})
    key = 'op.non_default_stream'
    with rec.guard(key):
        if not cuda:
            rec.put(key, {'skipped': 'no CUDA streams on the CPU dry run'})
        else:
            rec.put(key, check_stream(shape, device))
    # The backbone in the fixed-pool (linear) mode: op vs reference, fp32, train step.
    key = 'op.backbone_fixed_pool_size_7'
    with rec.guard(key):
        from transnext_mm.models.backbones import TransNeXt
        cfg = dict(arch='tiny', fixed_pool_size=7)
        state = TransNeXt(**cfg).state_dict()
        size = (1, 32, 32) if dry_run else (2, 224, 288)
        x = torch.randn(size[0], 3, *size[1:], generator=torch.Generator().manual_seed(2))
        truth = backbone_step(state, cfg, 'reference', 'fp64', x, device)
        outs, grads = backbone_step(state, cfg, 'op', 'fp32', x, device)
        errors = compare(outs, grads, truth)
        worst, ratio, failed = judge(errors, None, BACKBONE_TOL['fp32'])
        rec.put(key, {**summarise(errors), 'worst': worst, 'failed': failed[:20],
                      'pass': not failed, 'input': list(size)})


def check_stream(shape, device):
    """The op on a side stream whose inputs are written by a late kernel on that stream: the
    result is right only if every launch (forward and backward) goes to the current stream."""
    B, heads, height, width, num_pool, head_dim = shape
    tensors = core_inputs(*shape, torch.bfloat16, device, requires_grad=True)
    grad_out = torch.randn(B, heads, height * width, head_dim).to(device, torch.bfloat16)
    expected = op_run(tensors, grad_out, height, width)
    side = torch.cuda.Stream()
    q_late = torch.full_like(tensors[0], float('nan')).requires_grad_()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        torch.cuda._sleep(100_000_000)  # ~50 ms of spinning before q is written
        with torch.no_grad():
            q_late.copy_(tensors[0])
        results = op_run([q_late, *tensors[1:]], grad_out, height, width)
    torch.cuda.current_stream().wait_stream(side)
    same = {name: bool(torch.equal(a, b)) for name, a, b in
            zip(('out',) + CORE_NAMES, results, expected)}
    return {'shape': shape, 'bitwise_equal_to_default_stream': same, 'pass': all(same.values())}


def check_flex(rec, device, dry_run):
    from transnext_mm.ops.aggregated_attention import aggregated_attention_reference
    from transnext_mm.ops.aggregated_attention.flex import flex_aggregated_attention
    # (B, heads, H, W, Np, d): Tiny's stages 1-3 at 512x512 batch 8.
    shapes = [(2, 3, 8, 8, 4, 24)] if dry_run else [(8, 3, 128, 128, 256, 24),
                                                    (8, 6, 64, 64, 256, 24),
                                                    (8, 12, 32, 32, 256, 24)]
    for dtype_name in (['fp32'] if dry_run else ['bf16', 'fp32']):
        for shape in shapes:
            key = f'flex.{dtype_name}_{"x".join(map(str, shape))}'
            with rec.guard(key):
                B, heads, height, width, num_pool, head_dim = shape
                dtype = DTYPES[dtype_name]
                tensors = core_inputs(*shape, dtype, device, requires_grad=not dry_run)
                start = time.perf_counter()
                out = flex_aggregated_attention(*tensors, height, width, compiled=not dry_run)
                leaves = [t.detach().double().requires_grad_() for t in tensors]
                expected = aggregated_attention_reference(*leaves, height, width)
                errors = {'out': rel_error(out, expected)}
                if not dry_run:
                    grad_out = torch.randn(out.shape).to(device, dtype)
                    grads = torch.autograd.grad(out, tensors, grad_out)
                    grads_ref = torch.autograd.grad(expected, leaves, grad_out.double())
                    errors.update({f'grad.{n}': rel_error(g, r)
                                   for n, g, r in zip(CORE_NAMES, grads, grads_ref)})
                tol = OP_TOL[dtype_name] * 5  # flex rounds P to the input dtype before P @ V
                failed = [k for k, v in errors.items()
                          if not v <= tol * (1 if k == 'out' else GRAD_FACTOR)]
                rec.put(key, {'rel_err': errors, 'tolerance': tol, 'failed': failed,
                              'pass': not failed, 'compiled': not dry_run,
                              'backward': not dry_run,
                              'seconds_incl_compile': round(time.perf_counter() - start, 2)})


def main():
    parser = base_argparser(__doc__.splitlines()[0])
    parser.add_argument('--parts', nargs='+', default=['op', 'backbone', 'flex'],
                        choices=['op', 'backbone', 'flex'])
    args = parser.parse_args()
    device = pick_device(args.dry_run)
    # fp32 means fp32: no TF32 in convolutions or matmuls.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    rec = Recorder(args.out, {'device': device, 'dry_run': args.dry_run,
                              'torch': torch.__version__})
    if args.dry_run:
        sizes, dtypes = [(1, 32, 32, 'fp64')], ['fp32', 'bf16']
    else:
        # At 800x1344 the pooled path has 1050 keys per query in every stage: the float64
        # reference would need about 90 GiB, so the truth there is the reference in fp32.
        sizes = [(8, 512, 512, 'fp64'), (2, 800, 1344, 'fp32')]
        dtypes = ['fp32', 'bf16', 'fp16']
    for part in args.parts:
        start = time.perf_counter()
        if part == 'op':
            check_op(rec, device, args.dry_run)
        elif part == 'backbone':
            check_backbone(rec, device, sizes, dtypes, ('reference', 'torch', 'op'), 'tiny')
        else:
            check_flex(rec, device, args.dry_run)
        rec.put(f'seconds.{part}', round(time.perf_counter() - start, 1))
        print(f'parity: {part} done in {time.perf_counter() - start:.1f} s', flush=True)


if __name__ == '__main__':
    main()
