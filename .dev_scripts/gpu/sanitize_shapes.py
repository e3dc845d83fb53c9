# Copyright (c) transnext-mm contributors. All rights reserved.
"""Small calls of the compiled op's CUDA kernels (forward and backward) for compute-sanitizer.

``run_all.sh`` runs this under ``compute-sanitizer --tool memcheck|racecheck|synccheck``; the
shapes are small (the sanitizer slows kernels by orders of magnitude) but cover the kernels'
edges: partial query blocks, grids of one row / one column / one pixel, Np = 0, more pooled
keys than a shared-memory tile, head dims of the fixed-size and the generic kernels, strided
q / k / v views, fp32 and bf16. Each call is also checked against the float64 reference, so a
silent race shows as a wrong result too. ``--dry-run`` runs the same calls on the CPU kernels.
Exit status 1 if any result is wrong.
"""
import sys

import torch

from common import CORE_NAMES, base_argparser, core_inputs, pick_device, rel_error

# (B, heads, height, width, Np, d)
SHAPES = [(2, 3, 5, 7, 4, 24), (1, 2, 1, 1, 1, 24), (1, 1, 1, 9, 3, 16), (2, 1, 9, 1, 2, 32),
          (2, 2, 3, 4, 0, 24), (1, 2, 13, 11, 70, 24), (1, 1, 6, 6, 5, 48), (1, 1, 4, 5, 3, 7)]


def run_case(shape, dtype, device, strided=False):
    from transnext_mm.ops.aggregated_attention import (aggregated_attention_op,
                                                       aggregated_attention_reference)
    B, heads, height, width, num_pool, d = shape
    tensors = core_inputs(*shape, dtype, device)
    if strided:  # heads split out of a (B, N, heads * d) projection, as in the backbone
        tensors[:3] = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in tensors[:3]]
    tensors = [t.requires_grad_() for t in tensors]
    out = aggregated_attention_op(*tensors, height, width)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    grads = torch.autograd.grad(out, tensors, grad_out)
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    expected = aggregated_attention_reference(*leaves, height, width)
    grads_ref = torch.autograd.grad(expected, leaves, grad_out.double())
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    errors = {'out': rel_error(out, expected)}
    errors.update({n: rel_error(g, r) for n, g, r in zip(CORE_NAMES, grads, grads_ref)})
    return [k for k, v in errors.items() if not v <= (tol if k == 'out' else 4 * tol)]


def main():
    parser = base_argparser(__doc__.splitlines()[0])
    parser.add_argument('--quick', action='store_true',
                        help='fp32 only, the first 4 shapes (racecheck is slow)')
    args = parser.parse_args()
    device = pick_device(args.dry_run)
    shapes = SHAPES[:4] if args.quick else SHAPES
    dtypes = [torch.float32] if args.quick else [torch.float32, torch.bfloat16]
    bad = []
    count = 0
    for dtype in dtypes:
        for shape in shapes:
            for strided in (False, True):
                failed = run_case(shape, dtype, device, strided)
                count += 1
                if failed:
                    bad.append(f'{shape} {dtype} strided={strided}: {failed}')
    if device == 'cuda':
        torch.cuda.synchronize()
    with open(args.out, 'w') as f:
        f.write(f'{count} calls, {len(bad)} wrong\n' + '\n'.join(bad) + '\n')
    print(f'sanitize_shapes: {count} op calls (forward + backward), {len(bad)} wrong', flush=True)
    for line in bad:
        print('  WRONG', line)
    sys.exit(1 if bad else 0)


if __name__ == '__main__':
    main()
