# Copyright (c) transnext-mm contributors. All rights reserved.
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


@pytest.mark.parametrize('tool', ['train.py', 'test.py'])
def test_tool_help_exits_zero_without_config(tool):
    """``mim train/test`` run ``tools/<tool> -h`` first and fail unless it exits with 0."""
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', tool), '-h'],
                         cwd=ROOT,
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f'usage: {tool} CONFIG' in out.stdout
    assert '--gpus' not in out.stdout  # mim would then pass --gpus, which the toolboxes lack


def test_tool_without_config_fails():
    out = subprocess.run([sys.executable, osp.join(ROOT, 'tools', 'train.py')],
                         cwd=ROOT,
                         capture_output=True,
                         text=True,
                         timeout=300)
    assert out.returncode != 0 and 'usage: train.py CONFIG' in out.stderr
