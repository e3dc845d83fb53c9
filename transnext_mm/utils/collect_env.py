# Copyright (c) transnext-mm contributors. All rights reserved.
"""The environment for bug reports: ``python -m transnext_mm.collect_env``.

Prints mmengine's environment summary (platform, Python, CUDA, compilers, PyTorch and its build,
TorchVision, OpenCV, MMEngine), the versions of mmcv, mmdet, mmsegmentation and mmpretrain, and
what the compiled op ``transnext_mm._ext`` holds: CPU kernels (always, when it is built) and
CUDA kernels with the GPU architectures compiled into it (read from its fatbinary), and on each
GPU the outcome of the op's first-use self-check for every head-dim variant and dtype
(:mod:`transnext_mm.ops.aggregated_attention.selfcheck`), or that there is no CUDA device.
"""
import os.path as osp
import struct
from collections import OrderedDict
from typing import List, Optional

from .version_check import SUPPORTED_VERSIONS, installed_version

_FATBIN_MAGIC = 0xBA55ED50
_FATBIN_KINDS = {1: 'PTX', 2: 'SASS'}


def _elf_section(data: bytes, name: str) -> Optional[bytes]:
    """The contents of section ``name`` of a 64-bit little-endian ELF file, or None."""
    if data[:4] != b'\x7fELF' or data[4] != 2 or data[5] != 1:
        return None
    shoff, = struct.unpack_from('<Q', data, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', data, 0x3A)
    headers = [struct.unpack_from('<IIQQQQ', data, shoff + i * shentsize) for i in range(shnum)]
    names_offset = headers[shstrndx][4]
    for sh_name, _, _, _, offset, size in headers:
        end = data.index(b'\0', names_offset + sh_name)
        if data[names_offset + sh_name:end].decode() == name:
            return data[offset:offset + size]
    return None


def fatbin_archs(path: str) -> List[str]:
    """The GPU code in the CUDA fatbinary of a shared library, e.g. ``['sm_90', 'compute_90']``
    (``sm_XY``: machine code for that architecture; ``compute_XY``: PTX, JIT-compiled for
    newer GPUs). Empty when the library has no CUDA code."""
    with open(path, 'rb') as f:
        section = _elf_section(f.read(), '.nv_fatbin')
    archs = []
    position = 0
    # The section holds one fatbinary per compiled .cu file: a 16-byte header (magic, version,
    # header size, payload size), then entries (kind, ..., header size at 4, payload size at 8,
    # architecture at 28).
    while section is not None and position + 16 <= len(section):
        magic, _, header_size, payload_size = struct.unpack_from('<IHHQ', section, position)
        if magic != _FATBIN_MAGIC:
            position += 8  # containers are 8-byte aligned
            continue
        entry, end = position + header_size, position + header_size + payload_size
        while entry + 32 <= end:
            kind, _, entry_header, entry_size = struct.unpack_from('<HHIQ', section, entry)
            arch, = struct.unpack_from('<I', section, entry + 28)
            if kind in _FATBIN_KINDS and arch:
                name = f'{"sm" if kind == 2 else "compute"}_{arch}'
                if name not in archs:
                    archs.append(name)
            entry += entry_header + entry_size
        position = end
    return sorted(archs, key=lambda a: (int(a.split('_')[1]), a.startswith('compute')))


def ext_info() -> 'OrderedDict[str, str]':
    """What ``transnext_mm._ext`` holds: its file, CPU kernels, CUDA kernels and their GPU
    architectures; or why it cannot be imported."""
    from transnext_mm.ops.dispatch import BUILD, compiled_ext
    info = OrderedDict()
    ext = compiled_ext()
    if ext is None:
        info['transnext_mm._ext'] = f'not available ({BUILD.error}): the PyTorch paths are used'
        return info
    info['transnext_mm._ext'] = ext.__file__
    info['_ext CPU kernels'] = 'yes'
    if getattr(ext, 'with_cuda', False):
        try:
            archs = fatbin_archs(ext.__file__)
        except (OSError, ValueError, IndexError, struct.error):  # not an ELF we can read
            archs = []
        info['_ext CUDA kernels'] = 'yes, ' + (', '.join(archs) if archs else
                                               'architectures not readable from the binary')
    else:
        info['_ext CUDA kernels'] = 'no (built without CUDA)'
    return info


def self_check_info(devices: Optional[List] = None) -> 'OrderedDict[str, str]':
    """The first-use self-check of the compiled attention on each device, run now for every
    head-dim variant and CUDA dtype (or its outcome from earlier in this process).

    Args:
        devices (list[torch.device], optional): Devices to report on. Defaults to None (every
            visible CUDA device; without one, or without CUDA kernels, a line saying so).

    Returns:
        OrderedDict: ``'CUDA self-check <device> <dtype>'`` -> the outcome of each variant.
    """
    import torch

    from transnext_mm.ops.aggregated_attention import selfcheck
    from transnext_mm.ops.dispatch import (BUILD, SELF_CHECK_ENV, attention_self_check,
                                           head_dim_variant, self_check_enabled)
    info = OrderedDict()
    if devices is None:
        if not torch.cuda.is_available():
            info['CUDA self-check'] = 'not run: no CUDA device'
            return info
        if not BUILD.cuda:
            info['CUDA self-check'] = 'not run: transnext_mm._ext has no CUDA kernels'
            return info
        devices = [torch.device('cuda', i) for i in range(torch.cuda.device_count())]
    if not self_check_enabled():
        info['CUDA self-check'] = f'off ({SELF_CHECK_ENV}=0)'
        return info
    for device in devices:
        for dtype in selfcheck.cuda_dtypes():
            results = []
            for head_dim in selfcheck.check_head_dims():
                variant = head_dim_variant(head_dim)
                variant = f'generic (d={head_dim})' if variant == 'generic' else variant
                try:
                    outcome = attention_self_check(device, dtype, head_dim)
                except RuntimeError as e:  # the device is unusable after the check
                    results.append(f'{variant} FAILED ({e})')
                    break
                if outcome is None:
                    results.append(f'{variant} not checked on {device.type}')
                elif outcome.failure:
                    results.append(f'{variant} FAILED ({outcome.failure})')
                else:
                    results.append(f'{variant} passed ({outcome.seconds * 1e3:.0f} ms)')
            info[f'CUDA self-check {device} {str(dtype).replace("torch.", "")}'] = (
                ', '.join(results))
    return info


def collect_env() -> 'OrderedDict[str, str]':
    """Collect the environment: mmengine's summary, the OpenMMLab toolboxes' versions and the
    state of the compiled op.

    Returns:
        OrderedDict: name -> value, in the order printed.
    """
    from mmengine.utils.dl_utils import collect_env as collect_base_env

    import transnext_mm
    env = OrderedDict(collect_base_env())
    for name in SUPPORTED_VERSIONS:
        if name != 'mmengine':  # in mmengine's summary
            env[name] = installed_version(name) or 'not installed'
    env['transnext_mm'] = f'{transnext_mm.__version__} ({osp.dirname(transnext_mm.__file__)})'
    env.update(ext_info())
    env.update(self_check_info())
    return env


def main() -> None:
    for name, value in collect_env().items():
        print(f'{name}: {value}')


if __name__ == '__main__':
    main()
