# Copyright (c) transnext-mm contributors. All rights reserved.
"""First-use self-check of the compiled aggregated-attention op on CUDA.

The first time the compiled op would run on a CUDA device in a dtype with one of the CUDA
kernels' head-dim variants (exact ones for 16, 24, 32, 48 and 64, a generic one for other head
dims up to 128), :func:`transnext_mm.ops.dispatch.select` runs :func:`run_self_check` once: the
op, forward and backward, on small inputs against the readable reference implementation in
float64 from the same (rounded) inputs. The inputs cover the kernels' real code paths: batch 2,
2 heads, an 11x13 grid (odd, image borders on all four sides), 143 queries (one full block of
128 and a ragged one), 70 pooled keys (ragged last tiles of 16 and of 32 keys, and two blocks of
the pooled-key gradient kernel's 64 keys, the second ragged), ``v`` a strided view of a (B, N, 2C)
projection and the output gradient a view of (B, N, C) as in the backbone, and the gradients of
all 8 inputs, ``rpb_local`` and ``bias_pool`` included. Then the same with ``bias_pool`` in table
form (:class:`PoolBiasTable`, offset indices of the 11x13 grid and a 7x10 pooled grid), which the
layers hand the op: the kernels read the bias from the table and the backward gathers the table's
gradient; and once more with three weighted row taps per entry, the form of an input resized
along both axes in interpolation mode. The tolerances are the test suite's for the dtype
(:data:`TOLERANCES`).

On a mismatch, a NaN / Inf or a launch error, ``impl='auto'`` (``attn_impl='auto'`` in the
backbone) runs the PyTorch path for that (device, dtype, variant) for the rest of the process and
warns once, naming the output or gradient that failed, its relative error and the tolerance;
``impl='op'`` raises a RuntimeError with the same text. After a launch error the device is
synchronized and probed first: a sticky CUDA error (e.g. an illegal memory access) leaves the
process's CUDA context unusable, and then the check raises a RuntimeError saying so, whatever
``impl`` is. Under ``torch.compile`` the check runs once while the graph is traced; under
``torch.export`` it does not run (the exported program calls the op directly wherever it
runs). The check costs about 0.13 s per variant on the CPU replay of the CUDA kernels (2 cores);
one call on a GPU takes milliseconds after the CUDA context exists.

Environment: ``TRANSNEXT_MM_CUDA_SELFCHECK=0`` turns the check off (``1``, the default, keeps it
on). ``python -m transnext_mm.collect_env`` runs it for every variant and dtype on each GPU and
prints the outcomes.
"""
from contextlib import nullcontext
from typing import Callable, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from ..dispatch import CUDA_EXACT_HEAD_DIMS, KERNEL_DTYPES, register_attention_check
from .op import aggregated_attention_op, aggregated_attention_table_op
from .reference import aggregated_attention_reference
from .shapes import PoolBiasTable

# The check's inputs (see the module docstring): batch, heads, grid, pooled keys (a 7x10 grid in
# the table form).
BATCH, HEADS, HEIGHT, WIDTH, NUM_POOL = 2, 2, 11, 13, 70
POOL_GRID = (7, 10)
# Head dim at which collect_env checks the generic variant (select checks it at the first head
# dim it serves).
GENERIC_HEAD_DIM = 40
NAMES = ('q', 'k', 'v', 'k_pool', 'v_pool', 'rpb_local', 'bias_pool', 'token_weight')
TABLE_NAMES = NAMES[:6] + ('bias_table', ) + NAMES[7:]
# Largest error allowed relative to the largest value of the float64 reference, for the output;
# the gradients get GRAD_TOLERANCE_FACTOR times more (the CUDA tests of
# tests/test_ops/test_aggregated_attention/test_op.py use the same figures).
TOLERANCES = {torch.float64: 1e-10, torch.float32: 2e-5, torch.float16: 3e-3, torch.bfloat16: 2e-2}
GRAD_TOLERANCE_FACTOR = 4

# kernel(tensors, height, width, grad_out) -> (out, the 8 input gradients); in the table form
# tensors[6] is a PoolBiasTable and the 7th gradient the table's.
Kernel = Callable[[Sequence[Tensor], int, int, Tensor], Tuple[Tensor, Sequence[Tensor]]]


def _leaves(tensors: Sequence) -> List[Tensor]:
    """The 8 tensors that get gradients (the table in place of a table-form bias), detached."""
    bias = tensors[6]
    table = bias.table if isinstance(bias, PoolBiasTable) else bias
    return [t.detach().requires_grad_() for t in (*tensors[:6], table, *tensors[7:])]


def run_op(tensors: Sequence, height: int, width: int,
           grad_out: Tensor) -> Tuple[Tensor, Sequence[Tensor]]:
    """The compiled op forward, then its backward for ``grad_out``: ``(out, 8 gradients)``.
    With ``tensors[6]`` a :class:`PoolBiasTable`, the op's table form."""
    leaves = _leaves(tensors)
    if isinstance(tensors[6], PoolBiasTable):
        bias = tensors[6]._replace(table=leaves[6])
        out = aggregated_attention_table_op(*leaves[:6], bias, leaves[7], height, width)
    else:
        out = aggregated_attention_op(*leaves, height, width)
    return out, torch.autograd.grad(out, leaves, grad_out)


def self_check_inputs(device, dtype: torch.dtype, head_dim: int) -> Tuple[List[Tensor], Tensor]:
    """The check's 8 op inputs and output gradient on ``device`` in ``dtype`` (the same values
    every time: a fixed seed, independent of the global random state)."""
    B, heads, N, d = BATCH, HEADS, HEIGHT * WIDTH, head_dim
    gen = torch.Generator().manual_seed(1000 + head_dim)

    def randn(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen, dtype=torch.float64) * scale

    def heads_of(t, groups):  # (B, N, groups*heads*d) -> (B, groups*heads, N, d), a view
        return t.to(device, dtype).view(B, N, groups * heads, d).transpose(1, 2)

    # Like the backbone: unit keys, queries scaled up to sharpen the softmax, v and the output
    # gradient as head views of (B, N, C) projections.
    q = heads_of(randn(B, N, heads * d, scale=4.0), 1)
    k = heads_of(F.normalize(randn(B, N, heads, d), dim=-1).flatten(2), 1)
    v = heads_of(randn(B, N, 2 * heads * d), 2)[:, heads:]
    pooled = [
        F.normalize(randn(B, heads, NUM_POOL, d), dim=-1),
        randn(B, heads, NUM_POOL, d),
        randn(heads, 9, scale=0.5),
        randn(heads, N, NUM_POOL),
        randn(B, heads, N, 9, scale=0.5)
    ]
    tensors = [q, k, v] + [t.to(device, dtype) for t in pooled]
    return tensors, heads_of(randn(B, N, heads * d), 1)


def table_form_inputs(tensors: Sequence[Tensor]) -> list:
    """The check's inputs with ``bias_pool`` in table form: a function of the query-key offset
    on the HEIGHT x WIDTH grid and the POOL_GRID pooled grid (the entries of one query are
    distinct), a random table (fixed seed)."""
    device, dtype = tensors[6].device, tensors[6].dtype
    (pool_h, pool_w), span_w = POOL_GRID, WIDTH + POOL_GRID[1] - 1

    def offsets(length, pooled):  # (length, pooled): query - key + pooled - 1 >= 0
        return torch.arange(length)[:, None] - torch.arange(pooled)[None, :] + pooled - 1

    gen = torch.Generator().manual_seed(7)
    table = torch.randn(HEADS, (HEIGHT + pool_h - 1) * span_w, generator=gen, dtype=torch.float64)
    bias = PoolBiasTable(
        table.to(device, dtype), (offsets(HEIGHT, pool_h) * span_w).to(device),
        offsets(WIDTH, pool_w).to(device))
    return list(tensors[:6]) + [bias] + list(tensors[7:])


def row_taps_inputs(tensors: Sequence[Tensor]) -> list:
    """:func:`table_form_inputs` with three weighted row taps per entry (``row_weights``): the
    offset rows, flipped and rolled over the query rows, with random weights in [0, 1) (fixed
    seed) in the kernels' accumulation type."""
    tensors = table_form_inputs(tensors)
    bias = tensors[6]
    rows = bias.index_rows
    gen = torch.Generator().manual_seed(8)
    weights = torch.rand(3, *rows.shape, generator=gen, dtype=torch.float64)
    acc = torch.float64 if bias.table.dtype == torch.float64 else torch.float32
    tensors[6] = bias._replace(
        index_rows=torch.stack([rows, rows.flip(0), rows.roll(1, 0)]),
        row_weights=weights.to(rows.device, acc))
    return tensors


def _device_error(device: torch.device) -> str:
    """The error a CUDA device raises after a failure (a sticky error), or ''."""
    if device.type != 'cuda':
        return ''
    try:
        torch.cuda.synchronize(device)
        torch.ones(1, device=device).add_(1).item()
    except RuntimeError as e:
        return str(e).strip().splitlines()[0]
    return ''


def compare(out: Tensor,
            grads: Sequence[Tensor],
            expected_out: Tensor,
            expected_grads: Sequence[Tensor],
            dtype: torch.dtype,
            names: Sequence[str] = NAMES) -> List[str]:
    """What differs from the reference: one line per output or gradient with NaN / Inf, a wrong
    shape or an error above the tolerance (the relative error is ``max|x - ref| / max|ref|``).
    ``names``: the gradients' (:data:`NAMES`, or :data:`TABLE_NAMES` for the table form)."""
    failures = []
    tol = TOLERANCES[dtype]
    items = [('output', out, expected_out, tol)
             ] + [(f'gradient of {name}', g, g_ref, tol * GRAD_TOLERANCE_FACTOR)
                  for name, g, g_ref in zip(names, grads, expected_grads)]
    if len(grads) != len(names):
        failures.append(f'{len(grads)} gradients, expected {len(names)}')
    for name, actual, expected, limit in items:
        if actual is None or tuple(actual.shape) != tuple(expected.shape):
            shape = None if actual is None else tuple(actual.shape)
            failures.append(f'{name}: shape {shape}, expected {tuple(expected.shape)}')
            continue
        actual = actual.detach().double()
        bad = int((~torch.isfinite(actual)).sum())
        if bad:
            failures.append(f'{name}: {bad} NaN/Inf values of {actual.numel()}')
            continue
        scale = expected.abs().max().clamp_min(1e-12)
        error = float((actual - expected).abs().max() / scale)
        if error > limit:
            failures.append(f'{name}: relative error {error:.2e} > tolerance {limit:.0e}')
    return failures


def run_self_check(device,
                   dtype: torch.dtype,
                   head_dim: int,
                   kernel: Optional[Kernel] = None,
                   table_kernel: Optional[Kernel] = None) -> str:
    """Run ``kernel`` once on the check's inputs, then ``table_kernel`` on them with the bias in
    table form (without, then with row taps), against the reference in float64.

    Args:
        device (torch.device | str): Device of the inputs.
        dtype (torch.dtype): Dtype of the inputs, one of :data:`TOLERANCES`.
        head_dim (int): Head dim of the inputs.
        kernel (Callable, optional): ``kernel(tensors, height, width, grad_out) -> (out,
            gradients)``. Defaults to None (:func:`run_op`, the compiled op); tests pass the CPU
            replay of the CUDA kernels or deliberately wrong kernels.
        table_kernel (Callable, optional): The same for the table form (``tensors[6]`` a
            :class:`PoolBiasTable`). Defaults to None: :func:`run_op` where ``kernel`` is None,
            else no table-form check.

    Returns:
        str: What failed, with the figures (``'; '``-separated; failures of the table form
        prefixed with ``'bias in table form: '``, or ``'bias in table form with row taps: '``);
        ``''`` when the check passed.

    Raises:
        RuntimeError: If the device is unusable after the kernel failed (a sticky CUDA error:
            nothing can run on it any more in this process, the PyTorch path included).
    """
    device = torch.device(device)
    if dtype not in TOLERANCES:
        raise ValueError(f'dtype must be one of {tuple(TOLERANCES)}, got {dtype}')
    if kernel is None:
        kernel, table_kernel = run_op, run_op if table_kernel is None else table_kernel
    autocast_off = (
        torch.autocast(device.type, enabled=False) if device.type in ('cpu',
                                                                      'cuda') else nullcontext())
    with torch.inference_mode(False), torch.enable_grad(), autocast_off:
        tensors, grad_out = self_check_inputs(device, dtype, head_dim)
        failure = _check_form(kernel, tensors, grad_out, device, dtype, head_dim)
        if failure or table_kernel is None:
            return failure
        for form, make in (('bias in table form', table_form_inputs),
                           ('bias in table form with row taps', row_taps_inputs)):
            failure = _check_form(table_kernel, make(tensors), grad_out, device, dtype, head_dim)
            if failure:
                return f'{form}: {failure}'
    return ''


def _check_form(kernel: Kernel, tensors: Sequence, grad_out: Tensor, device: torch.device,
                dtype: torch.dtype, head_dim: int) -> str:
    """One run of ``kernel`` against the reference (see :func:`run_self_check`)."""
    try:
        out, grads = kernel(tensors, HEIGHT, WIDTH, grad_out)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)  # errors of asynchronous launches surface here
    except torch.OutOfMemoryError:
        raise  # not the kernel's fault: the next allocation decides
    except RuntimeError as e:
        sticky = _device_error(device)
        if sticky:
            raise RuntimeError(
                f'the compiled aggregated-attention op broke {device} in its first-use '
                f'self-check ({dtype}, head dim {head_dim}): {sticky}. This CUDA error is '
                'sticky: the CUDA context of this process cannot be recovered, so no '
                'fallback can run in it. Restart the process with attn_impl=\'torch\' and '
                'report the error with the output of `python -m transnext_mm.collect_env`') from e
        first_line = (str(e).strip().splitlines() or [''])[0]
        return f'the kernels raised {type(e).__name__}: {first_line}'
    leaves = [t.detach().double().requires_grad_() for t in _leaves(tensors)]
    bias = leaves[6]
    if isinstance(tensors[6], PoolBiasTable):
        bias = tensors[6]._replace(table=bias).dense()
    expected = aggregated_attention_reference(*leaves[:6], bias, leaves[7], HEIGHT, WIDTH)
    expected_grads = torch.autograd.grad(expected, leaves, grad_out.double())
    names = TABLE_NAMES if isinstance(tensors[6], PoolBiasTable) else NAMES
    return '; '.join(compare(out, grads, expected.detach(), expected_grads, dtype, names))


def check_head_dims() -> Tuple[int, ...]:
    """One head dim per CUDA kernel variant: the exact ones and :data:`GENERIC_HEAD_DIM`."""
    return CUDA_EXACT_HEAD_DIMS + (GENERIC_HEAD_DIM, )


def cuda_dtypes() -> Tuple[torch.dtype, ...]:
    """The dtypes the CUDA kernels compute in."""
    return tuple(KERNEL_DTYPES['attention']['cuda'])


register_attention_check(run_self_check)
