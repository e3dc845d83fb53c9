# Copyright (c) transnext-mm contributors. All rights reserved.
"""Distributed training and testing on machines without CUDA (e.g. CI with torchrun and gloo).

mmengine 0.10.7 cannot run ``--launcher pytorch`` on a CPU-only machine in two places:

* ``mmengine.dist.init_dist('pytorch')`` calls ``torch.cuda.set_device(LOCAL_RANK)`` before it
  creates the process group, which raises "Found no NVIDIA driver" without CUDA;
* ``Runner.wrap_model`` passes ``device_ids=[LOCAL_RANK]`` to DistributedDataParallel, which
  DDP rejects for a module on the CPU.

:func:`prepare_cpu_distributed` works around both without patching mmengine: it creates the
default process group itself with the gloo backend (the Runner then finds it initialised and
skips ``init_dist``), and returns the command line with ``model_wrapper_cfg.device_ids=None``
added to ``--cfg-options``, a setting mmengine passes on to DDP. With CUDA, or without a
``--launcher pytorch`` argument, it changes nothing.
"""
import atexit
import os
from datetime import timedelta
from typing import List, Optional, Sequence

import torch
import torch.distributed as torch_dist

TORCHRUN_VARIABLES = ('RANK', 'LOCAL_RANK', 'WORLD_SIZE', 'MASTER_ADDR', 'MASTER_PORT')
CPU_BACKEND = 'gloo'
CPU_DDP_OPTION = 'model_wrapper_cfg.device_ids=None'


def launcher_of(argv: Sequence[str]) -> str:
    """The value of ``--launcher`` in a train.py/test.py command line ('none' if absent)."""
    for i, arg in enumerate(argv):
        if arg == '--launcher' and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith('--launcher='):
            return arg.split('=', 1)[1]
    return 'none'


def init_cpu_process_group(timeout_s: Optional[float] = None) -> bool:
    """Create the default gloo process group from torchrun's environment variables.

    Args:
        timeout_s (float, optional): Collective timeout in seconds; None keeps torch's default.
            Defaults to None.

    Returns:
        bool: True if this call created the group, False if one existed already.

    Raises:
        RuntimeError: if a torchrun variable (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR,
            MASTER_PORT) is missing, i.e. the process was not started by torchrun.
    """
    if torch_dist.is_initialized():
        return False
    missing = [name for name in TORCHRUN_VARIABLES if name not in os.environ]
    if missing:
        raise RuntimeError(f'--launcher pytorch needs the torchrun environment variables '
                           f'{TORCHRUN_VARIABLES}; missing {missing}. Start the job with '
                           'tools/dist_train.sh or tools/dist_test.sh (torchrun)')
    kwargs = {} if timeout_s is None else dict(timeout=timedelta(seconds=timeout_s))
    torch_dist.init_process_group(
        backend=CPU_BACKEND,
        rank=int(os.environ['RANK']),
        world_size=int(os.environ['WORLD_SIZE']),
        **kwargs)
    # Tear the group down before interpreter shutdown: a gloo group still alive when the C++
    # statics are destroyed aborts the process ("terminate called without an active exception").
    atexit.register(_destroy_process_group)
    return True


def _destroy_process_group() -> None:
    if torch_dist.is_initialized():
        torch_dist.destroy_process_group()


def with_cfg_option(argv: Sequence[str], option: str) -> List[str]:
    """Append ``--cfg-options OPTION`` unless the command line already sets that key."""
    key = option.split('=', 1)[0]
    if any(arg.startswith(key + '=') for arg in argv):
        return list(argv)
    return list(argv) + ['--cfg-options', option]


def prepare_cpu_distributed(argv: Sequence[str]) -> List[str]:
    """Make a ``--launcher pytorch`` train.py/test.py command line work without CUDA.

    Call it before running the toolbox's train.py/test.py with ``argv``. On a machine with
    CUDA, or when the launcher is not 'pytorch', it returns ``argv`` unchanged and does nothing.

    Args:
        argv (Sequence[str]): The tool's arguments (without the program name).

    Returns:
        list[str]: The arguments to run the tool with.
    """
    if launcher_of(argv) != 'pytorch' or torch.cuda.is_available():
        return list(argv)
    init_cpu_process_group()
    return with_cfg_option(argv, CPU_DDP_OPTION)
