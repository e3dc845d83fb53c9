# Copyright (c) transnext-mm contributors. All rights reserved.
"""transnext_mm.utils.dist: torchrun jobs on machines without CUDA.

tests/test_detection/test_det_end_to_end.py trains with two processes through
tools/dist_train.sh; these tests cover the helper's pieces.
"""
import os
import subprocess
import sys

import pytest
import torch.distributed as torch_dist

from transnext_mm.utils.dist import (CPU_DDP_OPTION, init_cpu_process_group, launcher_of,
                                     prepare_cpu_distributed, with_cfg_option)


@pytest.mark.parametrize('argv, launcher', [
    (['cfg.py', '--launcher', 'pytorch'], 'pytorch'),
    (['cfg.py', '--launcher=slurm', '--amp'], 'slurm'),
    (['cfg.py', '--work-dir', 'w'], 'none'),
])
def test_launcher_of(argv, launcher):
    assert launcher_of(argv) == launcher


def test_non_distributed_command_lines_are_untouched():
    argv = ['cfg.py', '--work-dir', 'w', '--cfg-options', 'a=1']
    assert prepare_cpu_distributed(argv) == argv
    assert not torch_dist.is_initialized()


def test_cfg_option_is_appended_unless_given():
    assert with_cfg_option(['cfg.py'], 'x.y=None') == ['cfg.py', '--cfg-options', 'x.y=None']
    given = ['cfg.py', '--cfg-options', 'x.y=[0]']
    assert with_cfg_option(given, 'x.y=None') == given


def test_missing_torchrun_environment(monkeypatch):
    monkeypatch.delenv('MASTER_PORT', raising=False)
    with pytest.raises(RuntimeError, match=r"missing \[.*'MASTER_PORT'\].*dist_train.sh"):
        init_cpu_process_group()


def test_prepare_creates_a_gloo_group_under_torchrun_variables():
    """In a child process (a process group cannot be undone here): one rank, gloo."""
    code = ('import sys, torch.distributed as d\n'
            'from transnext_mm.utils.dist import prepare_cpu_distributed\n'
            'argv = prepare_cpu_distributed(["cfg.py", "--launcher", "pytorch"])\n'
            'print(argv, d.get_backend(), d.get_world_size())\n')
    env = dict(
        os.environ,
        RANK='0',
        LOCAL_RANK='0',
        WORLD_SIZE='1',
        MASTER_ADDR='127.0.0.1',
        MASTER_PORT='29731',
        CUDA_VISIBLE_DEVICES='')
    output = subprocess.run([sys.executable, '-c', code],
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=120,
                            check=True).stdout
    assert f"['cfg.py', '--launcher', 'pytorch', '--cfg-options', '{CPU_DDP_OPTION}'] gloo 1" \
        in output
