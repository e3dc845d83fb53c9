# Copyright (c) transnext-mm contributors. All rights reserved.
"""Build and install transnext-mm.

The aggregated-attention op (sources under ops/csrc) is compiled into ``transnext_mm._ext``.
"""
import os
import os.path as osp

from setuptools import find_packages, setup

ROOT = osp.dirname(osp.abspath(__file__))


def read_version() -> str:
    scope = {}
    with open(osp.join(ROOT, 'transnext_mm', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


def read_requirements(name: str):
    with open(osp.join(ROOT, 'requirements', name)) as f:
        return [line.strip() for line in f if line.strip() and not line.startswith('#')]


def _env_flag(name: str) -> bool:
    return os.getenv(name, '0').lower() in ('1', 'true', 'yes', 'on')


def get_extensions():
    """The compiled aggregated-attention op ``transnext_mm._ext``.

    CPU kernels are always built; CUDA kernels too when torch has CUDA, nvcc is found and either
    a GPU is visible or ``FORCE_CUDA=1``. ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS`` are honoured
    by torch's ``BuildExtension``. ``TRANSNEXT_MM_WITH_OPS=0`` skips the op. A failed compile
    only warns: the package then runs on its PyTorch path.
    """
    if os.getenv('TRANSNEXT_MM_WITH_OPS', '1') == '0':
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import (CUDA_HOME, BuildExtension, CppExtension,
                                               CUDAExtension)
    except ImportError:
        print('transnext-mm: torch is not importable at build time (use '
              '`pip install --no-build-isolation`); skipping the compiled op')
        return [], {}

    class OptionalBuildExtension(BuildExtension):
        """Warn instead of failing when the op cannot be compiled (e.g. no C++ compiler)."""

        def build_extensions(self):
            self._failed = []
            try:
                super().build_extensions()
            except Exception as e:  # e.g. no C++ compiler: torch's ABI check fails first
                self._warn(e)
                self._failed = list(self.extensions)
            # Nothing to copy or install for an extension that failed.
            self.extensions = [ext for ext in self.extensions if ext not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as e:  # compiler missing or failing: keep the PyTorch path
                if not getattr(ext, 'cpu_sources', None):
                    self._warn(e)
                    self._failed.append(ext)
                    return
                print(f'WARNING: transnext-mm: building the CUDA kernels failed ({e}); '
                      'retrying transnext_mm._ext with CPU kernels only')
                ext.sources = ext.cpu_sources
                ext.cpu_sources = None
                ext.define_macros = [m for m in ext.define_macros if m[0] != 'WITH_CUDA']
                ext.extra_compile_args.pop('nvcc', None)
                ext.libraries = [lib for lib in ext.libraries if 'cuda' not in lib]
                self.build_extension(ext)

        @staticmethod
        def _warn(error):
            print(f'WARNING: transnext-mm: building transnext_mm._ext failed ({error}); '
                  'aggregated attention will use its PyTorch implementation')

    csrc = osp.join('ops', 'csrc')
    sources = [osp.join(csrc, 'pytorch', 'pybind.cpp'),
               osp.join(csrc, 'pytorch', 'aggregated_attention.cpp'),
               osp.join(csrc, 'cpu', 'aggregated_attention_cpu.cpp'),
               osp.join(csrc, 'cpu', 'aggregated_attention_cuda_replay.cpp'),
               osp.join(csrc, 'pytorch', 'conv_glu.cpp'),
               osp.join(csrc, 'cpu', 'conv_glu_cpu.cpp'),
               osp.join(csrc, 'pytorch', 'cosine_qk.cpp'),
               osp.join(csrc, 'cpu', 'cosine_qk_cpu.cpp')]
    # -fno-trapping-math lets GCC vectorise the softmax loops' min/max (torch builds with it too).
    cxx_flags = ['-O3', '-std=c++20', '-fopenmp', '-fno-math-errno', '-fno-trapping-math']
    with_cuda = (torch.version.cuda is not None and CUDA_HOME is not None
                 and (torch.cuda.is_available() or _env_flag('FORCE_CUDA')))
    common = dict(name='transnext_mm._ext', include_dirs=[osp.join(ROOT, csrc)],
                  extra_link_args=['-fopenmp'])
    if not with_cuda:
        print('transnext-mm: building transnext_mm._ext with CPU kernels')
        ext = CppExtension(sources=sources, extra_compile_args={'cxx': cxx_flags}, **common)
        return [ext], {'build_ext': OptionalBuildExtension}
    print('transnext-mm: building transnext_mm._ext with CPU and CUDA kernels')
    ext = CUDAExtension(
        sources=sources + [osp.join(csrc, 'cuda', 'aggregated_attention_cuda.cpp'),
                           osp.join(csrc, 'cuda', 'aggregated_attention_kernels.cu')],
        define_macros=[('WITH_CUDA', None)],
        extra_compile_args={'cxx': cxx_flags,
                            'nvcc': ['-O3', '-std=c++20', '--expt-relaxed-constexpr']},
        **common)
    ext.cpu_sources = sources  # built instead if the CUDA build fails
    return [ext], {'build_ext': OptionalBuildExtension}


ext_modules, cmdclass = get_extensions()

setup(
    name='transnext-mm',
    version=read_version(),
    description='TransNeXt backbone (CVPR 2024) for mmdet 3.x, mmsegmentation 1.x and '
    'mmpretrain 1.x, with a compiled aggregated-attention op',
    long_description=open(osp.join(ROOT, 'README.md')).read() if osp.exists(
        osp.join(ROOT, 'README.md')) else '',
    long_description_content_type='text/markdown',
    packages=find_packages(include=['transnext_mm', 'transnext_mm.*']),
    python_requires='>=3.8',
    install_requires=read_requirements('runtime.txt'),
    extras_require={
        'toolboxes': read_requirements('toolboxes.txt'),
        'tests': read_requirements('tests.txt'),
        'deploy': read_requirements('deploy.txt'),
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
