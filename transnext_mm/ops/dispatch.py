# Copyright (c) transnext-mm contributors. All rights reserved.
"""The one place that decides which implementation of each kernel runs.

Three kernels have a compiled implementation in ``transnext_mm._ext`` beside their PyTorch one:

- ``'attention'``, the aggregated-attention core (CPU: fp32 / fp64, fp16 / bf16 computed in
  fp32; CUDA: fp32 / fp16 / bf16), forward and backward. Its PyTorch path is slower wherever the
  op has no kernel, so falling back to it is a *fallback*.
- ``'cosine_qk'``, the cosine-attention inputs, and ``'conv_glu_gate'``, the ConvGLU gate:
  CPU inference in fp32 / fp64 only. They replace chains of memory-bound PyTorch ops that
  dominate on CPU; when a gradient is needed their PyTorch formulas run by design (the saved
  activations make the backward cheap), and on other devices, in other dtypes or under autocast
  PyTorch's own kernels are not a slow path. Only a missing build is a fallback for them.

:func:`choose` is the rule (a pure function of kernel, requested implementation, device, dtype,
gradient state and what was built); :func:`select` applies it to tensors: on a fallback,
``impl='auto'`` warns once per reason (one warning however many kernels and layers share it) and
``impl='op'`` raises a RuntimeError with the same reason.
"""
import warnings
from typing import Iterable, NamedTuple, Optional

import torch
from torch import Tensor

try:
    from transnext_mm import _ext
    _IMPORT_ERROR = None
except ImportError as e:  # not compiled: PyTorch computes everything
    _ext = None
    _IMPORT_ERROR = e

IMPLS = ('auto', 'torch', 'op', 'reference')  # 'torch' / 'reference': PyTorch only
KERNELS = ('attention', 'cosine_qk', 'conv_glu_gate')
KERNEL_NAMES = {
    'attention': 'aggregated-attention op',
    'cosine_qk': 'cosine-attention input kernel',
    'conv_glu_gate': 'ConvGLU gate kernel',
}
# Devices and dtypes each compiled kernel has code for ('cuda' only when built with CUDA).
KERNEL_DTYPES = {
    'attention': {
        'cpu': (torch.float32, torch.float64, torch.float16, torch.bfloat16),
        'cuda': (torch.float32, torch.float16, torch.bfloat16)
    },
    'cosine_qk': {
        'cpu': (torch.float32, torch.float64)
    },
    'conv_glu_gate': {
        'cpu': (torch.float32, torch.float64)
    },
}
# Whether the kernel also serves training (has a compiled backward worth running).
KERNEL_TRAINS = {'attention': True, 'cosine_qk': False, 'conv_glu_gate': False}


class Build(NamedTuple):
    """What ``transnext_mm._ext`` provides: built at all, with CUDA kernels, and if not built,
    the import error."""
    built: bool
    cuda: bool
    error: str = ''


BUILD = Build(_ext is not None, bool(_ext is not None and _ext.with_cuda), str(_IMPORT_ERROR or ''))


def compiled_ext():
    """The compiled kernels, the module ``transnext_mm._ext``; None when it is not built (then
    :data:`BUILD` holds the import error)."""
    return _ext


class Choice(NamedTuple):
    """The implementation that runs (``'op'``, ``'torch'`` or ``'reference'``), why, and
    whether it is a fallback (the compiled kernel should run here but cannot)."""
    impl: str
    reason: str
    fallback: bool = False


def check_impl(impl: str) -> None:
    """Raise a ValueError naming the allowed values if ``impl`` is not one of :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')


def _not_built_reason(build: Build) -> str:
    return (f'the compiled kernels transnext_mm._ext are not built ({build.error}); reinstall '
            'with `pip install --no-build-isolation -e .` and a C++ compiler (and nvcc for CUDA)')


def choose(kernel: str, impl: str, device, dtype: torch.dtype, needs_grad: bool = False,
           autocast: bool = False, build: Optional[Build] = None) -> Choice:
    """Which implementation of ``kernel`` runs (the rule; no warning, no error for a fallback).

    Args:
        kernel (str): One of :data:`KERNELS`.
        impl (str): The requested implementation, one of :data:`IMPLS`.
        device (torch.device | str): Device of the inputs.
        dtype (torch.dtype): Dtype the kernel would compute in (for the attention core under
            autocast, the autocast dtype).
        needs_grad (bool): Whether a gradient flows through the kernel. Defaults to False.
        autocast (bool): Whether an autocast region is active on ``device``. Defaults to False.
        build (Build, optional): What was built. Defaults to None (this installation's
            :data:`BUILD`).

    Returns:
        Choice: ``(impl, reason, fallback)``.
    """
    if kernel not in KERNELS:
        raise ValueError(f'kernel must be one of {KERNELS}, got {kernel!r}')
    check_impl(impl)
    build = BUILD if build is None else build
    device = torch.device(device)
    name = KERNEL_NAMES[kernel]
    if impl == 'reference' and kernel == 'attention':
        return Choice('reference', "impl='reference': the readable unfold implementation")
    if impl in ('torch', 'reference'):
        return Choice('torch', f"impl={impl!r}: PyTorch")
    dtypes = KERNEL_DTYPES[kernel].get(device.type, ())
    if not KERNEL_TRAINS[kernel]:
        # CPU inference kernels: PyTorch by design elsewhere; only a missing build falls back.
        if needs_grad:
            return Choice('torch', f'a gradient is needed: the PyTorch formula of the {name} '
                          'saves the activations its backward reuses')
        if not dtypes:
            return Choice('torch', f"the {name} is for CPU inference; PyTorch's own "
                          f'{device.type} kernels serve it')
        if autocast or dtype not in dtypes:
            got = 'autocast' if autocast else str(dtype)
            return Choice('torch', f"the {name} computes {' / '.join(map(str, dtypes))} only, "
                          f"got {got}: PyTorch's kernels serve it")
        if not build.built:
            return Choice('torch', _not_built_reason(build), fallback=True)
        return Choice('op', f'the {name} runs {device.type} inference in {dtype}')
    if not build.built:
        return Choice('torch', _not_built_reason(build), fallback=True)
    if device.type == 'cuda' and not build.cuda:
        return Choice('torch', 'transnext_mm._ext was built without CUDA kernels (no nvcc, or no '
                      'GPU at build time): rebuild with '
                      '`FORCE_CUDA=1 pip install --no-build-isolation -e .`', fallback=True)
    if device.type not in KERNEL_DTYPES[kernel]:
        return Choice('torch', f'the compiled {name} has no kernels for device {device.type!r}',
                      fallback=True)
    if dtype not in dtypes:
        return Choice('torch', f'the compiled {name} has no {device.type} kernel for {dtype} '
                      f'(supported: {", ".join(str(t) for t in dtypes)})', fallback=True)
    return Choice('op', f'the compiled {name} has {device.type} kernels for {dtype}')


_warned = set()


def select(kernel: str, impl: str, x: Tensor, params: Iterable[Tensor] = (),
           build: Optional[Build] = None) -> str:
    """:func:`choose` for the input ``x`` (device, dtype, autocast, gradient state); returns the
    implementation to run.

    A fallback warns once per reason under ``impl='auto'`` and raises a RuntimeError under
    ``impl='op'``.

    Args:
        kernel (str): One of :data:`KERNELS`.
        impl (str): The requested implementation, one of :data:`IMPLS`.
        x (Tensor): The kernel's main input.
        params (Iterable[Tensor]): Further inputs (also parameters feeding them through layers
            computed before the kernel) whose gradient would flow through it. Defaults to ().
        build (Build, optional): What was built. Defaults to None (this installation's).
    """
    device_type = x.device.type
    autocast = device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type)
    dtype = x.dtype
    if autocast and kernel == 'attention':
        dtype = torch.get_autocast_dtype(device_type)  # the op computes in it
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or
                                              any(p.requires_grad for p in params))
    choice = choose(kernel, impl, x.device, dtype, needs_grad, autocast, build)
    if choice.fallback:
        if impl == 'op':
            raise RuntimeError(f"impl='op' (attn_impl='op' in the backbone) but {choice.reason}")
        if choice.reason not in _warned:
            _warned.add(choice.reason)
            warnings.warn(f"transnext_mm: {choice.reason}; impl='auto' is falling back to the "
                          'slower PyTorch path', stacklevel=3)
    return choice.impl


def inference_kernel_applies(impl: str, x: Tensor, params: Iterable[Tensor] = ()) -> bool:
    """Whether the compiled ConvGLU gate runs for ``x`` (see :func:`select`)."""
    return select('conv_glu_gate', impl, x, params) == 'op'
