# Copyright (c) transnext-mm contributors. All rights reserved.
"""When the compiled CPU inference kernels run (the ConvGLU gate and the cosine-attention inputs).

Both replace chains of memory-bound PyTorch ops that dominate on CPU; both serve inference only
(when a gradient is needed their PyTorch formulas run, whose saved activations make the backward
cheap), and elsewhere (CUDA, half precision, no extension) PyTorch's own kernels are not a slow
path, so no fallback warning is given.
"""
import torch
from torch import Tensor

try:
    from transnext_mm import _ext
except ImportError:  # not compiled: PyTorch computes everything
    _ext = None

IMPLS = ('auto', 'torch', 'op', 'reference')  # 'torch' / 'reference': PyTorch only
CPU_DTYPES = (torch.float32, torch.float64)


def check_impl(impl: str) -> None:
    """Raise a ValueError naming the allowed values if ``impl`` is not one of :data:`IMPLS`."""
    if impl not in IMPLS:
        raise ValueError(f'impl must be one of {IMPLS}, got {impl!r}')


def inference_kernel_applies(impl: str, x: Tensor, params=()) -> bool:
    """Whether a compiled CPU inference kernel runs: ``impl`` 'auto' / 'op', the extension built,
    ``x`` on CPU in fp32 / fp64 without autocast, and no gradient needed by ``x`` or
    ``params`` (the parameters that feed the kernel, also through layers computed before it).
    An ``impl`` outside :data:`IMPLS` raises a ValueError."""
    check_impl(impl)
    if impl not in ('auto', 'op') or _ext is None:
        return False
    if x.device.type != 'cpu' or x.dtype not in CPU_DTYPES or torch.is_autocast_enabled('cpu'):
        return False
    return not (torch.is_grad_enabled() and
                (x.requires_grad or any(p.requires_grad for p in params)))
