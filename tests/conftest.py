import os
import sys

import pytest
import torch

# Under pytest-xdist (.dev_scripts/run_tests.sh) every worker gets its share of the cores, so workers
# and the tools they start do not oversubscribe the machine.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault('OMP_NUM_THREADS', str(_THREADS))
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'cuda: needs a GPU and transnext_mm._ext built with CUDA kernels (skipped '
        'without them)')


def pytest_collection_modifyitems(config, items):
    from transnext_mm.ops.dispatch import BUILD
    if BUILD.cuda and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a GPU and transnext_mm._ext built with CUDA kernels '
                            f'(GPU visible: {torch.cuda.is_available()}, CUDA kernels built: '
                            f'{BUILD.cuda})')
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)
