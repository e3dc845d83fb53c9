# Copyright (c) transnext-mm contributors. All rights reserved.
"""Build and install transnext-mm.

The aggregated-attention op (sources under ops/csrc) is compiled into ``transnext_mm._ext``; the
CPU replay of its CUDA kernels, a test tool, into ``transnext_mm._ext_replay`` when asked for
(``TRANSNEXT_MM_WITH_REPLAY=1``, as the development install does).
The configs, tools and model index are placed under ``transnext_mm/.mim`` (copied into sdist
builds and wheels, symlinked for editable installs), where OpenMMLab's ``mim`` looks for them.
"""
import glob
import os
import os.path as osp
import shutil
import sys
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


# What ``mim`` finds under ``<package>/.mim``: configs and tools (``mim train/test``) and the
# model index (``mim search``).
MIM_ITEMS = ('configs', 'tools', 'model-index.yml')
MIM_IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc', '*.so')
# tools/ holds user tools only (developer and CI scripts live in .dev_scripts/); run_demo.sh is
# the repository's one-command demo (it sets up the checkout's .venv), not a tool of the package.
MIM_TOOLS_IGNORE = shutil.ignore_patterns('__pycache__', '*.pyc', '*.so', 'run_demo.sh')


def add_mim_extension():
    """Place :data:`MIM_ITEMS` under ``transnext_mm/.mim`` for the running setup command.

    Editable installs (``develop``, ``editable_wheel``) get relative symlinks, so the checkout's
    files stay the only copy; builds of a wheel or an install get copies, which ``package_data``
    ships. Other commands (``sdist``, ``egg_info``, ...) leave ``.mim`` alone: the sdist holds the
    items at its top level and ``MANIFEST.in`` prunes ``.mim``.
    """
    if {'develop', 'editable_wheel'} & set(sys.argv):
        mode = 'symlink'
    elif {'bdist_wheel', 'build', 'build_py', 'install'} & set(sys.argv):
        mode = 'copy'
    else:
        return
    mim_dir = osp.join(ROOT, 'transnext_mm', '.mim')
    os.makedirs(mim_dir, exist_ok=True)
    for item in MIM_ITEMS:
        src, dst = osp.join(ROOT, item), osp.join(mim_dir, item)
        if not osp.exists(src):
            raise FileNotFoundError(f'transnext-mm: {src} is missing; it is shipped under '
                                    'transnext_mm/.mim (the sdist must hold it)')
        if osp.islink(dst) or osp.isfile(dst):
            os.remove(dst)
        elif osp.isdir(dst):
            shutil.rmtree(dst)
        if mode == 'symlink':
            os.symlink(osp.relpath(src, mim_dir), dst)
        elif osp.isdir(src):
            shutil.copytree(src, dst, ignore=MIM_TOOLS_IGNORE if item == 'tools' else MIM_IGNORE)
        else:
            shutil.copyfile(src, dst)


def _env_flag(name: str) -> bool:
    return os.getenv(name, '0').lower() in ('1', 'true', 'yes', 'on')


# What a failed build of each extension leaves.
WITHOUT = {
    'transnext_mm._ext': 'aggregated attention will use its PyTorch implementation',
    'transnext_mm._ext_replay': "the tests of the CUDA kernels' CPU replay will fail",
}


def get_extensions():
    """The compiled aggregated-attention op ``transnext_mm._ext`` and, when asked for, the CPU
    replay of its CUDA kernels ``transnext_mm._ext_replay``.

    ``_ext``: CPU kernels are always built; CUDA kernels too when torch has CUDA, nvcc is found
    and either a GPU is visible or ``FORCE_CUDA=1``. ``TORCH_CUDA_ARCH_LIST`` and ``MAX_JOBS``
    are honoured by torch's ``BuildExtension``. ``TRANSNEXT_MM_WITH_OPS=0`` skips the op. A
    failed compile only warns: the package then runs on its PyTorch path.

    ``_ext_replay`` (``ops/csrc/replay``; CPU only): the CUDA kernels' block bodies, launch plans
    and host glue run on CPU tensors, for the tests. It is no part of the product, so it is built
    only with ``TRANSNEXT_MM_WITH_REPLAY=1`` (``.dev_scripts/setup_env.sh`` sets it for the
    development install).
    """
    with_ops = os.getenv('TRANSNEXT_MM_WITH_OPS', '1') != '0'
    with_replay = _env_flag('TRANSNEXT_MM_WITH_REPLAY')
    if not (with_ops or with_replay):
        return [], {}
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
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
                for ext in self.extensions:
                    self._warn(ext, e)
                self._failed = list(self.extensions)
            # Nothing to copy or install for an extension that failed.
            self.extensions = [ext for ext in self.extensions if ext not in self._failed]

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
                return
            except Exception as e:  # compiler missing or failing: keep the PyTorch path
                if not getattr(ext, 'cpu_sources', None):
                    self._warn(ext, e)
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
        def _warn(ext, error):
            print(f'WARNING: transnext-mm: building {ext.name} failed ({error}); '
                  f'{WITHOUT[ext.name]}')

    csrc = osp.join('ops', 'csrc')

    def find_sources(*patterns):  # paths relative to ROOT, as setuptools wants them
        return sorted(
            osp.relpath(path, ROOT) for pattern in patterns
            for path in glob.glob(osp.join(ROOT, csrc, pattern)))

    # mmcv's layout: pytorch/ (bindings, device dispatch and checks), pytorch/cpu/ (CPU kernels),
    # pytorch/cuda/ (CUDA launchers and kernels, only with CUDA); common/ holds the headers they
    # share. replay/ (with its own bindings) is the test extension.
    sources = find_sources(osp.join('pytorch', '*.cpp'), osp.join('pytorch', 'cpu', '*.cpp'))
    replay_sources = find_sources(osp.join('replay', '*.cpp'))
    if not sources or (with_replay and not replay_sources):
        raise FileNotFoundError(f'transnext-mm: C++ sources missing under {osp.join(ROOT, csrc)}')
    # -fno-trapping-math lets GCC vectorise the softmax loops' min/max (torch builds with it too).
    # -falign-loops=64: every loop starts a cache line, so a short hot loop never straddles two;
    # where one did (the ConvGLU gate's 30-byte conv-tap loop, before the gate kept its sums in
    # registers), an unrelated change elsewhere in the extension made it ~10% slower or faster.
    cxx_flags = [
        '-O3', '-std=c++20', '-fopenmp', '-fno-math-errno', '-fno-trapping-math', '-falign-loops=64'
    ]
    extensions = []
    if with_replay:
        print('transnext-mm: building transnext_mm._ext_replay (the CPU replay of the CUDA '
              'kernels, for the tests)')
        extensions.append(
            CppExtension(
                name='transnext_mm._ext_replay',
                sources=replay_sources,
                include_dirs=[osp.join(ROOT, csrc)],
                extra_link_args=['-fopenmp'],
                extra_compile_args={'cxx': cxx_flags}))
    if not with_ops:
        return extensions, {'build_ext': OptionalBuildExtension}
    with_cuda = (
        torch.version.cuda is not None and CUDA_HOME is not None
        and (torch.cuda.is_available() or _env_flag('FORCE_CUDA')))
    common = dict(
        name='transnext_mm._ext', include_dirs=[osp.join(ROOT, csrc)], extra_link_args=['-fopenmp'])
    if not with_cuda:
        print('transnext-mm: building transnext_mm._ext with CPU kernels')
        ext = CppExtension(sources=sources, extra_compile_args={'cxx': cxx_flags}, **common)
        return [ext] + extensions, {'build_ext': OptionalBuildExtension}
    print('transnext-mm: building transnext_mm._ext with CPU and CUDA kernels')
    ext = CUDAExtension(
        sources=sources +
        find_sources(osp.join('pytorch', 'cuda', '*.cpp'), osp.join('pytorch', 'cuda', '*.cu')),
        define_macros=[('WITH_CUDA', None)],
        extra_compile_args={
            'cxx': cxx_flags,
            'nvcc': ['-O3', '-std=c++20', '--expt-relaxed-constexpr']
        },
        **common)
    ext.cpu_sources = sources  # built instead if the CUDA build fails
    return [ext] + extensions, {'build_ext': OptionalBuildExtension}


add_mim_extension()
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
    package_data={
        'transnext_mm': [
            '.mim/model-index.yml', '.mim/configs/**/*.py', '.mim/configs/**/*.yml',
            '.mim/configs/**/*.md', '.mim/tools/**/*.py', '.mim/tools/**/*.sh'
        ]
    },
    author='transnext-mm contributors',
    license='Apache-2.0',
    license_files=['LICENSE'],
    project_urls={'Paper': 'https://arxiv.org/abs/2311.17132'},
    keywords='computer vision, object detection, semantic segmentation, backbone, TransNeXt, '
    'OpenMMLab',
    classifiers=[
        'Development Status :: 4 - Beta',
        'Intended Audience :: Developers',
        'Intended Audience :: Science/Research',
        'License :: OSI Approved :: Apache Software License',
        'Operating System :: POSIX :: Linux',
        'Programming Language :: C++',
        'Programming Language :: Python :: 3',
        'Programming Language :: Python :: 3.10',
        'Programming Language :: Python :: 3.11',
        'Programming Language :: Python :: 3.12',
        'Environment :: GPU :: NVIDIA CUDA',
        'Topic :: Scientific/Engineering :: Artificial Intelligence',
        'Topic :: Scientific/Engineering :: Image Recognition',
    ],
    # torch 2.11 is the oldest torch the op has been built and tested with (its sources use
    # torch.library.custom_op, torch.compiler.is_exporting and C++20); torch itself is not
    # installed from here (users pick their CUDA build), but import checks the range.
    python_requires='>=3.10',
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
