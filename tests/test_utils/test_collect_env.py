"""`python -m transnext_mm.collect_env` and the GPU architectures read off a fatbinary."""
import os.path as osp
import shutil
import subprocess
import sys

import pytest

from transnext_mm.utils.collect_env import collect_env, fatbin_archs

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
    if BUILD.built:
        assert env['_ext CPU kernels'] == 'yes'
        assert env['_ext CUDA kernels'].startswith('yes' if BUILD.cuda else 'no')


def test_module_prints_the_environment():
    result = subprocess.run([sys.executable, '-m', 'transnext_mm.collect_env'], cwd=ROOT,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'mmsegmentation: ' in result.stdout and 'transnext_mm._ext: ' in result.stdout


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
    subprocess.run([nvcc, '-shared', '-Xcompiler', '-fPIC',
                    '-gencode', 'arch=compute_80,code=sm_80',
                    '-gencode', 'arch=compute_90,code=[sm_90,compute_90]',
                    str(tmp_path / 'a.cu'), str(tmp_path / 'b.cu'), '-o', str(library)],
                   check=True, timeout=300)
    assert fatbin_archs(str(library)) == ['sm_80', 'sm_90', 'compute_90']


def test_fatbin_archs_of_a_library_without_cuda():
    import transnext_mm.utils.collect_env as module
    assert fatbin_archs(sys.executable) == []
    assert fatbin_archs(module.__file__) == []  # not an ELF file at all
