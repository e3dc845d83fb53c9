# Copyright (c) transnext-mm contributors. All rights reserved.
"""The one place that decides which implementation of each kernel runs.

Three kernels have a compiled implementation in ``transnext_mm._ext`` beside their PyTorch one:

- ``'attention'``, the aggregated-attention core (CPU: fp32 / fp64, fp16 / bf16 computed in
  fp32; CUDA: fp32 / fp16 / bf16), forward and backward. Its PyTorch path is slower wherever the
  op has no kernel, so falling back to it is a *fallback*.
- ``'cosine_qk'``, the cosine-attention inputs, and ``'conv_glu_gate'``, the ConvGLU gate:
  CPU kernels in fp32 / fp64 only, forward and backward, which replace chains of memory-bound
  PyTorch ops that dominate on CPU (their backwards recompute from the saved inputs instead of
  saving PyTorch's intermediates). On other devices, in other dtypes or under autocast PyTorch's
  own kernels are not a slow path. Only a missing build is a fallback for them.

The log-CPB MLP has compiled CPU kernels too (fp32 / fp64, forward and backward);
:func:`log_cpb_mlp_impl` decides between them, a chunked PyTorch MLP and the plain one.

``'full_attention'``, the last stage's attention over all tokens, has no compiled kernel:
``impl='reference'`` computes its scores explicitly (the readable path), every other value runs
PyTorch's ``F.scaled_dot_product_attention``.

:func:`choose` is the rule (a pure function of kernel, requested implementation, device, dtype,
gradient state and what was built); :func:`select` applies it to tensors: on a fallback,
``impl='auto'`` warns once per reason (one warning however many kernels and layers share it) and
``impl='op'`` raises a RuntimeError with the same reason. :func:`conv_glu_strip_rows` decides
in how many strips of image rows the ConvGLU runs where its compiled gate runs.

First-use self-check: where :func:`select` would run the compiled attention on a CUDA device, it
first runs the check that :mod:`transnext_mm.ops.aggregated_attention.selfcheck` registers
(:func:`register_attention_check`), once per (device, dtype, head-dim variant of the kernels), and
treats a failed check as a fallback for that key for the rest of the process (one warning under
``impl='auto'``, a RuntimeError under ``impl='op'``). The environment variable
``TRANSNEXT_MM_CUDA_SELFCHECK=0`` turns the check off (``1``, the default, keeps it on).
"""
import os
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Dict, Iterable, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

try:
    from transnext_mm import _ext
    _IMPORT_ERROR = None
except ImportError as e:  # not compiled: PyTorch computes everything
    _ext = None
    _IMPORT_ERROR = e

IMPLS = ('auto', 'torch', 'op', 'reference')  # 'torch' / 'reference': PyTorch only
KERNELS = ('attention', 'full_attention', 'cosine_qk', 'conv_glu_gate')
KERNEL_NAMES = {
    'attention': 'aggregated-attention op',
    'full_attention': 'full attention',
    'cosine_qk': 'cosine-attention input kernel',
    'conv_glu_gate': 'ConvGLU gate kernel',
}
# Devices and dtypes each compiled kernel has code for ('cuda' only when built with CUDA); the
# full attention has no compiled kernel.
KERNEL_DTYPES = {
    'full_attention': {},
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
# The CPU kernels: elsewhere (other devices and dtypes, autocast) PyTorch serves them by design,
# not as a fallback.
CPU_KERNELS = ('cosine_qk', 'conv_glu_gate')
# What impl='reference' runs, for the kernels with a readable path of their own.
REFERENCES = {
    'attention': 'the readable unfold implementation',
    'full_attention': 'explicit scores and softmax',
}
# The log-CPB MLP's compiled kernels (CPU; see log_cpb_mlp_impl).
LOG_CPB_MLP_DTYPES = (torch.float32, torch.float64)
# Inference through the compiled ConvGLU gate on a large map runs fc1 -> gate -> fc2 over strips
# of image rows whose fc1 output (the 2h-channel hidden) is at most this big, so that it stays in
# cache instead of a round trip through memory (50 MB at stage 1 of a 512x512 input).
CONV_GLU_STRIP_BYTES = 8 << 20


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


def choose(kernel: str,
           impl: str,
           device,
           dtype: torch.dtype,
           needs_grad: bool = False,
           autocast: bool = False,
           build: Optional[Build] = None) -> Choice:
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
    if impl == 'reference' and kernel in REFERENCES:
        return Choice('reference', f"impl='reference': {REFERENCES[kernel]}")
    if impl in ('torch', 'reference'):
        return Choice('torch', f"impl={impl!r}: PyTorch")
    if kernel == 'full_attention':
        return Choice(
            'torch', f"the {name} has no compiled kernel: PyTorch's "
            'F.scaled_dot_product_attention serves it')
    dtypes = KERNEL_DTYPES[kernel].get(device.type, ())
    if kernel in CPU_KERNELS:
        # CPU kernels: PyTorch by design elsewhere; only a missing build falls back.
        if not dtypes:
            return Choice(
                'torch', f"the {name} is a CPU kernel; PyTorch's own "
                f'{device.type} kernels serve it')
        if autocast or dtype not in dtypes:
            got = 'autocast' if autocast else str(dtype)
            return Choice(
                'torch', f"the {name} computes {' / '.join(map(str, dtypes))} only, "
                f"got {got}: PyTorch's kernels serve it")
        if not build.built:
            return Choice('torch', _not_built_reason(build), fallback=True)
        return Choice(
            'op', f"the {name} runs {device.type} {'training' if needs_grad else 'inference'} "
            f'in {dtype}')
    if not build.built:
        return Choice('torch', _not_built_reason(build), fallback=True)
    if device.type == 'cuda' and not build.cuda:
        return Choice(
            'torch', 'transnext_mm._ext was built without CUDA kernels (no nvcc, or no '
            'GPU at build time): rebuild with '
            '`FORCE_CUDA=1 pip install --no-build-isolation -e .`',
            fallback=True)
    if device.type not in KERNEL_DTYPES[kernel]:
        return Choice(
            'torch',
            f'the compiled {name} has no kernels for device {device.type!r}',
            fallback=True)
    if dtype not in dtypes:
        return Choice(
            'torch', f'the compiled {name} has no {device.type} kernel for {dtype} '
            f'(supported: {", ".join(str(t) for t in dtypes)})',
            fallback=True)
    return Choice('op', f'the compiled {name} has {device.type} kernels for {dtype}')


_warned = set()


def select(kernel: str,
           impl: str,
           x: Tensor,
           params: Iterable[Tensor] = (),
           build: Optional[Build] = None) -> str:
    """:func:`choose` for the input ``x`` (device, dtype, autocast, gradient state), and for the
    attention core on CUDA the first-use self-check (:func:`attention_self_check`, head dim
    ``x.shape[-1]``); returns the implementation to run.

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
    needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad
                                                                     for p in params))
    choice = choose(kernel, impl, x.device, dtype, needs_grad, autocast, build)
    if kernel == 'attention' and choice.impl == 'op':
        choice = _checked_attention(choice, x.device, dtype, x.shape[-1])
    if choice.fallback:
        if impl == 'op':
            raise RuntimeError(f"impl='op' (attn_impl='op' in the backbone) but {choice.reason}")
        _warn_once(choice.reason)
    return choice.impl


@torch.compiler.assume_constant_result  # runs once at trace time under torch.compile
def _warn_once(reason: str) -> bool:
    """Warn (a UserWarning) that ``impl='auto'`` falls back to the PyTorch path for ``reason``,
    the first time the message occurs in the process."""
    message = f"transnext_mm: {reason}; impl='auto' is falling back to the slower PyTorch path"
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=4)
    return True


def attention_bias_form(impl: str,
                        x: Tensor,
                        params: Iterable[Tensor] = (),
                        build: Optional[Build] = None) -> str:
    """How the aggregated-attention layers hand the pooled-path position bias (see
    :meth:`transnext_mm.models.layers.log_cpb.LogCPB.table_form`) to the attention core.

    ``'table'``: a table and per-axis indices
    (:class:`~transnext_mm.ops.aggregated_attention.PoolBiasTable`), which the compiled kernels
    (CPU and CUDA) read and differentiate in place of the (heads, N, Np) bias; wherever
    :func:`select` runs the compiled op, in eager mode. ``'dense'``: the materialised bias
    everywhere else: the PyTorch and reference paths (the oracle), and graphs traced or exported
    with ``torch.compile``, ``torch.export``, ``torch.jit.trace`` or ``torch.fx`` (which keep the
    op's dense signature).

    Args:
        impl (str): The requested implementation, one of :data:`IMPLS`.
        x (Tensor): The attention layer's input.
        params (Iterable[Tensor]): As for :func:`select`. Defaults to ().
        build (Build, optional): What was built. Defaults to None (this installation's).

    Returns:
        str: ``'table'`` or ``'dense'``.
    """
    if x.device.type not in ('cpu', 'cuda') or _tracing():
        return 'dense'
    return 'table' if select('attention', impl, x, params, build) == 'op' else 'dense'


def log_cpb_mlp_impl(weight: Tensor,
                     points: Tensor,
                     impl: str = 'auto',
                     build: Optional[Build] = None) -> str:
    """How the log-CPB MLP runs (:mod:`transnext_mm.models.layers.log_cpb`).

    ``'plain'`` (``Linear -> ReLU -> Linear``) in traced graphs (``torch.compile``,
    ``torch.export``, ``torch.jit.trace``, ``torch.fx``), under autocast and on the meta device;
    in eager mode with ``impl`` 'auto' or 'op' ``'op'``, the compiled CPU kernels
    (:func:`transnext_mm.ops.log_cpb_mlp.log_cpb_mlp_op`), for fp32 / fp64 CPU weights and points
    that need no gradient; else ``'chunked'``, the MLP over chunks of points with the hidden
    activations recomputed in the backward (also for ``impl`` 'torch' / 'reference', and where
    the op would run but is not built: 'auto' warns once, 'op' raises a RuntimeError).

    Args:
        weight (Tensor): The MLP's first weight.
        points (Tensor): Its input points.
        impl (str): The requested implementation, one of :data:`IMPLS`. Defaults to 'auto'.
        build (Build, optional): What was built. Defaults to None (this installation's).

    Returns:
        str: ``'op'``, ``'chunked'`` or ``'plain'``.
    """
    check_impl(impl)
    build = BUILD if build is None else build
    device_type = weight.device.type
    autocast = device_type in ('cpu', 'cuda') and torch.is_autocast_enabled(device_type)
    if autocast or _tracing() or device_type == 'meta':
        return 'plain'
    if (impl in ('torch', 'reference') or device_type != 'cpu'
            or weight.dtype not in LOG_CPB_MLP_DTYPES
            or (torch.is_grad_enabled() and points.requires_grad)):
        return 'chunked'
    if not build.built:
        reason = _not_built_reason(build)
        if impl == 'op':
            raise RuntimeError(f"impl='op' (attn_impl='op' in the backbone) but {reason}")
        _warn_once(reason)
        return 'chunked'
    return 'op'


# torch.fx's symbolic tracing (torch.export and torch.compile are covered by is_compiling).
_fx_tracing = getattr(torch.fx._symbolic_trace, 'is_fx_symbolic_tracing',
                      torch.fx._symbolic_trace.is_fx_tracing)


def _tracing() -> bool:
    return (torch.compiler.is_compiling() or torch.compiler.is_exporting()
            or torch.jit.is_tracing() or _fx_tracing())


def conv_glu_strip_rows(impl: str,
                        x: Tensor,
                        params: Iterable[Tensor],
                        height: int,
                        width: int,
                        hidden_channels: int,
                        build: Optional[Build] = None) -> int:
    """Image rows per strip in which the ConvGLU runs fc1 -> gate -> fc2 on ``x``.

    Where the compiled gate runs inference (:func:`select` for ``'conv_glu_gate'``, with its
    fallback warning or error, and no gradient needed), strips whose fc1 output takes at most
    :data:`CONV_GLU_STRIP_BYTES`; elsewhere (training keeps every strip's fc1 output for the
    backward anyway), and when one strip holds the whole map, ``height``: one pass over the map.

    Args:
        impl (str): The requested implementation, one of :data:`IMPLS`.
        x (Tensor): The ConvGLU's input, (B, H*W, C).
        params (Iterable[Tensor]): The ConvGLU's parameters (their gradient state counts).
        height (int): Rows of the token grid.
        width (int): Columns of the token grid.
        hidden_channels (int): Channels of the fc1 output (gate and value halves).
        build (Build, optional): What was built. Defaults to None (this installation's).

    Returns:
        int: Rows per strip, between 1 and ``height``.
    """
    params = tuple(params)
    if select('conv_glu_gate', impl, x, params, build) != 'op':
        return height
    if torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in params)):
        return height
    row_bytes = x.shape[0] * width * hidden_channels * x.element_size()
    return min(height, max(1, CONV_GLU_STRIP_BYTES // row_bytes))


def conv_glu_recomputes_gate(impl: str,
                             hidden: Tensor,
                             params: Iterable[Tensor],
                             build: Optional[Build] = None) -> bool:
    """Whether the ConvGLU runs its gate and ``fc2`` as one autograd step that saves only the
    fc1 output and recomputes the gate's output in the backward (where ``fc2`` needs it for its
    weight gradient) instead of saving it: in eager training where the compiled gate runs
    (:func:`select` for ``'conv_glu_gate'``). The recompute is one cheap pass of the gate
    kernel; the saving is the (B, H*W, h) gate output of every block.

    Args:
        impl (str): The requested implementation, one of :data:`IMPLS`.
        hidden (Tensor): The fc1 output, (B, H*W, 2h).
        params (Iterable[Tensor]): The gate's and fc2's parameters.
        build (Build, optional): What was built. Defaults to None (this installation's).
    """
    params = tuple(params)
    needs_grad = torch.is_grad_enabled() and (hidden.requires_grad or any(p.requires_grad
                                                                          for p in params))
    return (needs_grad and not _tracing()
            and select('conv_glu_gate', impl, hidden, params, build) == 'op')


# ------------------------------------------------------------------------------------------------
# First-use self-check of the compiled attention on CUDA.

SELF_CHECK_ENV = 'TRANSNEXT_MM_CUDA_SELFCHECK'
# The CUDA kernels' head-dim variants (dispatch_head_dim in
# ops/csrc/common/cuda/aggregated_attention_blocks.cuh): exact ones, and a generic one for every
# other head dim up to CUDA_MAX_HEAD_DIM.
CUDA_EXACT_HEAD_DIMS = (16, 24, 32, 48, 64)
CUDA_MAX_HEAD_DIM = 128


class SelfCheck(NamedTuple):
    """Outcome of one self-check: what failed (``''`` when it passed), the head dim it ran with
    and its duration in seconds."""
    failure: str
    head_dim: int
    seconds: float


_attention_check: Optional[Callable[[torch.device, torch.dtype, int], str]] = None
_self_checks: Dict[Tuple[torch.device, torch.dtype, str], SelfCheck] = {}
_self_check_devices = ('cuda', )


def register_attention_check(check: Callable[[torch.device, torch.dtype, int], str]) -> None:
    """Set the self-check of the compiled attention (done once, by
    :mod:`transnext_mm.ops.aggregated_attention.selfcheck` on import).

    Args:
        check (Callable): ``check(device, dtype, head_dim)`` runs the compiled op on small inputs
            on ``device`` against the PyTorch path and returns what failed, with the figures
            (``''`` when it passed).
    """
    global _attention_check
    _attention_check = check


def self_check_enabled() -> bool:
    """Whether the first-use self-check runs: ``TRANSNEXT_MM_CUDA_SELFCHECK`` unset or ``1``
    (``0`` turns it off)."""
    value = os.environ.get(SELF_CHECK_ENV, '1')
    if value not in ('0', '1'):
        raise ValueError(f"{SELF_CHECK_ENV} must be '0' (no self-check) or '1' (the default), "
                         f'got {value!r}')
    return value == '1'


def head_dim_variant(head_dim: int) -> Optional[str]:
    """The CUDA kernels' variant for ``head_dim``: ``'d=16'`` ... ``'d=64'`` for the exact ones,
    ``'generic'`` for other head dims up to :data:`CUDA_MAX_HEAD_DIM`, None above (the kernels
    reject those with an error of their own)."""
    for exact in CUDA_EXACT_HEAD_DIMS:
        if head_dim == exact:
            return f'd={exact}'
    return 'generic' if 1 <= head_dim <= CUDA_MAX_HEAD_DIM else None


def attention_self_check(device, dtype: torch.dtype, head_dim: int) -> Optional[SelfCheck]:
    """The self-check's outcome for (``device``, ``dtype``, variant of ``head_dim``), running the
    registered check (with ``head_dim``) the first time the key is seen.

    Returns:
        SelfCheck | None: None where no check applies: not a CUDA device, the check turned off
        (:data:`SELF_CHECK_ENV`), a head dim the kernels reject, or no check registered.

    Raises:
        RuntimeError: From the check, when the device is unusable after it (a sticky CUDA error),
            or when the check would have to run during CUDA graph capture.
    """
    device = torch.device(device)
    variant = head_dim_variant(head_dim)
    if (device.type not in _self_check_devices or variant is None or _attention_check is None
            or not self_check_enabled()):
        return None
    key = (device, dtype, variant)
    if key not in _self_checks:
        if device.type == 'cuda' and torch.cuda.is_available() and _capturing(device):
            raise RuntimeError(
                f'the compiled aggregated-attention op has not been self-checked on {device} for '
                f'{dtype} and head-dim variant {variant}, and the check cannot run during CUDA '
                'graph capture: run the model once before capturing, or turn the check off with '
                f'{SELF_CHECK_ENV}=0')
        start = time.perf_counter()
        failure = _attention_check(device, dtype, head_dim)
        _self_checks[key] = SelfCheck(failure, head_dim, time.perf_counter() - start)
    return _self_checks[key]


def _capturing(device: torch.device) -> bool:
    with torch.cuda.device(device):
        return torch.cuda.is_current_stream_capturing()


def self_check_outcomes() -> Dict[Tuple[torch.device, torch.dtype, str], SelfCheck]:
    """The self-checks run so far in this process: ``{(device, dtype, variant): SelfCheck}``."""
    return dict(_self_checks)


@torch.compiler.assume_constant_result
def _self_check_failure(device_type: str, index: Optional[int], dtype: torch.dtype,
                        head_dim: int) -> str:
    # Runs eagerly, also while torch.compile traces a caller (its result becomes a constant).
    outcome = attention_self_check(torch.device(device_type, index), dtype, head_dim)
    if outcome is None or not outcome.failure:
        return ''
    variant = head_dim_variant(head_dim)
    variant = (f'the generic head-dim variant (checked at d={outcome.head_dim})'
               if variant == 'generic' else f'head-dim variant {variant}')
    return (f'the compiled {KERNEL_NAMES["attention"]} failed its first-use self-check on '
            f'{torch.device(device_type, index)} for {dtype} and {variant}: {outcome.failure} '
            "(impl='auto' runs the PyTorch path for this device, dtype and variant for the rest "
            f'of the process; {SELF_CHECK_ENV}=0 turns the check off)')


def _checked_attention(choice: Choice, device: torch.device, dtype: torch.dtype,
                       head_dim) -> Choice:
    """``choice`` (the compiled attention) unless its first-use self-check failed. Not under
    ``torch.export``: an exported program calls the op directly wherever it later runs."""
    if (device.type not in _self_check_devices or head_dim_variant(head_dim) is None
            or torch.compiler.is_exporting()):
        return choice
    if torch.compiler.is_compiling():  # a dynamic head dim becomes a constant (a guard)
        for concrete in range(1, CUDA_MAX_HEAD_DIM + 1):
            if head_dim == concrete:
                head_dim = concrete
                break
    failure = _self_check_failure(device.type, device.index, dtype, head_dim)
    return Choice('torch', failure, fallback=True) if failure else choice


@contextmanager
def self_check_for_tests(check: Callable[[torch.device, torch.dtype, int], str],
                         device_type: str = 'cpu'):
    """Test hook (not for use outside tests): within the block :func:`select` self-checks the
    compiled attention with ``check`` instead of the registered check, on ``device_type``
    devices as well as CUDA ones, starting from no outcomes and no fallback warnings; all three
    are restored at the end.

    Args:
        check (Callable): ``check(device, dtype, head_dim) -> failure text``, e.g. the self-check
            of :mod:`transnext_mm.ops.aggregated_attention.selfcheck` running the CPU replay of the
            CUDA kernels, or a deliberately wrong kernel, on CPU tensors.
        device_type (str): Device type checked besides ``'cuda'``. Defaults to 'cpu'.
    """
    global _attention_check, _self_checks, _self_check_devices, _warned
    saved = _attention_check, _self_checks, _self_check_devices, _warned
    _attention_check, _self_checks, _warned = check, {}, set()
    _self_check_devices = ('cuda', device_type)
    try:
        yield
    finally:
        _attention_check, _self_checks, _self_check_devices, _warned = saved
