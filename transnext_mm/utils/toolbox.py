# Copyright (c) transnext-mm contributors. All rights reserved.
"""Run a toolbox's own entry point (mmdet, mmseg or mmpretrain) with transnext_mm loaded."""
import importlib
import os.path as osp
import runpy
import sys

from mmengine.config import Config

from .dist import prepare_cpu_distributed

TOOLBOXES = {'mmdet': 'mmdet', 'mmseg': 'mmseg', 'mmpretrain': 'mmpretrain'}


def toolbox_of(config_path: str) -> str:
    """The toolbox a config belongs to, read from its ``default_scope``."""
    scope = Config.fromfile(config_path).get('default_scope')
    if scope not in TOOLBOXES:
        raise ValueError(f'{config_path}: default_scope must be one of {sorted(TOOLBOXES)} to '
                         f'pick the toolbox, got {scope!r}')
    return TOOLBOXES[scope]


def toolbox_tool_path(package: str, tool: str) -> str:
    """Path of ``tools/<tool>`` as shipped inside the toolbox's wheel (``<pkg>/.mim/tools``)."""
    root = osp.dirname(importlib.import_module(package).__file__)
    path = osp.join(root, '.mim', 'tools', tool)
    if not osp.isfile(path):
        raise FileNotFoundError(f'{package} does not ship {tool} at {path}; reinstall {package}')
    return path


def run_toolbox_tool(tool: str, argv=None) -> None:
    """Run the toolbox's ``tool`` (e.g. 'train.py') as ``__main__`` with ``argv``.

    The config (first ``.py`` argument) decides the toolbox. transnext_mm is imported first, so
    the TransNeXt backbone is registered and mmengine checkpoints load safely; ``--launcher
    pytorch`` also works without CUDA (see :mod:`transnext_mm.utils.dist`).
    """
    import transnext_mm  # noqa: F401

    argv = list(sys.argv[1:] if argv is None else argv)
    configs = [a for a in argv if a.endswith('.py') and not a.startswith('-')]
    usage = f'usage: {tool} CONFIG [args of the toolbox\'s own {tool}]'
    if not configs and any(a in ('-h', '--help') for a in argv):
        # ``mim train/test`` call ``tools/<tool> -h`` before running and need exit status 0.
        print(f'{usage}\n\nThe config\'s default_scope picks mmdet, mmseg or mmpretrain; '
              f'`{tool} CONFIG -h` shows that toolbox\'s options.')
        raise SystemExit(0)
    if not configs:
        raise SystemExit(usage)
    path = toolbox_tool_path(toolbox_of(configs[0]), tool)
    # torchrun on a machine without CUDA: gloo process group and DDP without device_ids.
    argv = prepare_cpu_distributed(argv)
    sys.argv = [path] + argv
    runpy.run_path(path, run_name='__main__')
