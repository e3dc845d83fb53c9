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


def get_extensions():
    return [], {}


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
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    zip_safe=False,
)
