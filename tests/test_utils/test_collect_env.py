"""`python -m transnext_mm.collect_env` and the GPU architectures read off a fatbinary."""
import functools
import os.path as osp
import shutil
import subprocess
import sys

import pytest
import torch

from transnext_mm.ops import dispatch
from transnext_mm.ops.aggregated_attention.replay import aggregated_attention_cuda_replay
from transnext_mm.ops.aggregated_attention.selfcheck import run_self_check
from transnext_mm.utils.collect_env import collect_env, fatbin_archs, self_check_info

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_collect_env_names_versions_and_kernels():
    env = collect_env()
    for key in ('Python', 'PyTorch', 'CUDA available', 'MMEngine', 'mmcv', 'mmdet',
                'mmsegmentation', 'mmpretrain', 'transnext_mm', 'transnext_mm._ext'):
        assert key in env, key
    import mmdet
    import torch
    assert env['mmdet'] == mmdet.__version__
    assert env['PyTorch'] == torch.__version__
    from transnext_mm.ops.dispatch import BUILD
    if not torch.cuda.is_available():
        assert env['CUDA self-check'] == 'not run: no CUDA device'
    if BUILD.built:
        assert env['_ext CPU kernels'] == 'yes'
        assert env['_ext CUDA kernels'].startswith('yes' if BUILD.cuda else 'no')


def replay_wrong_at_head_dim_48(tensors, height, width, grad_out):
    """The CUDA kernels' code on CPU tensors, with a wrong output for head dim 48."""
    out, _, grads = aggregated_attention_cuda_replay(
        *[t.detach() for t in tensors], height, width, grad_out=grad_out)
    return (out * 1.1 if out.shape[-1] == 48 else out), grads


def test_self_check_info_reports_every_variant(monkeypatch):
    """On the CPU through dispatch's test hook (what a GPU run prints per CUDA device)."""
    check = functools.partial(run_self_check, kernel=replay_wrong_at_head_dim_48)
    with dispatch.self_check_for_tests(check):
        info = self_check_info([torch.device('cpu')])
        assert list(info) == [
            f'CUDA self-check cpu {t}' for t in ('float32', 'float16', 'bfloat16')
        ]
        for line in info.values():
            variants = line.split(', ')
            assert [v.split(' ')[0]
                    for v in variants] == ['d=16', 'd=24', 'd=32', 'd=48', 'd=64', 'generic']
            assert variants[5].startswith('generic (d=40) passed (')
            assert variants[3].startswith('d=48 FAILED (output: relative error ')
            assert all(' passed (' in v for i, v in enumerate(variants) if i != 3)
        monkeypatch.setenv(dispatch.SELF_CHECK_ENV, '0')
        assert self_check_info([torch.device('cpu')]) == {
            'CUDA self-check': 'off (TRANSNEXT_MM_CUDA_SELFCHECK=0)'
        }


def test_module_prints_the_environment():
    result = subprocess.run([sys.executable, '-m', 'transnext_mm.collect_env'],
                            cwd=ROOT,
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'mmsegmentation: ' in result.stdout and 'transnext_mm._ext: ' in result.stdout
    assert 'CUDA self-check' in result.stdout


def test_fatbin_archs_of_a_library_built_by_nvcc(tmp_path):
    """Machine code for sm_80 and sm_90 and PTX for compute_90 in two .cu files."""
    nvcc = shutil.which('nvcc')
    if nvcc is None:
        pytest.skip('nvcc not found')
    for name in ('a', 'b'):
        (tmp_path / f'{name}.cu').write_text(
            f'__global__ void k{name}(float* x) {{ x[threadIdx.x] += 1.f; }}\n'
            f'extern "C" void launch_{name}(float* x) {{ k{name}<<<1, 32>>>(x); }}\n')
    library = tmp_path / 'libk.so'
    subprocess.run([
        nvcc, '-shared', '-Xcompiler', '-fPIC', '-gencode', 'arch=compute_80,code=sm_80',
        '-gencode', 'arch=compute_90,code=[sm_90,compute_90]',
        str(tmp_path / 'a.cu'),
        str(tmp_path / 'b.cu'), '-o',
        str(library)
    ],
                   check=True,
                   timeout=300)
    assert fatbin_archs(str(library)) == ['sm_80', 'sm_90', 'compute_90']


def test_fatbin_archs_of_a_library_without_cuda():
    import transnext_mm.utils.collect_env as module
    assert fatbin_archs(sys.executable) == []
    assert fatbin_archs(module.__file__) == []  # not an ELF file at all
