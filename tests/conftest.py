import os
import sys

import pytest
import torch

# Under pytest-xdist (.dev_scripts/run_tests.sh) every worker gets its share of the cores, so
# workers and the tools they start do not oversubscribe the machine.
_WORKERS = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', '1'))
if _WORKERS > 1:
    _THREADS = max(1, (os.cpu_count() or 1) // _WORKERS)
    os.environ.setdefault('OMP_NUM_THREADS', str(_THREADS))
    torch.set_num_threads(int(os.environ['OMP_NUM_THREADS']))

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# TransNeXt-micro's widths with one block per stage: the backbone of the export and tool tests
# whose checks do not depend on depth (the micro configs' necks and heads take it unchanged).
SHALLOW_ARCH = dict(embed_dims=[48, 96, 192, 384], num_heads=[2, 4, 8, 16], depths=[1, 1, 1, 1])


@pytest.fixture(autouse=True)
def _deterministic():
    torch.manual_seed(0)
    yield


@pytest.fixture
def check_thread_independence():
    """``check(fn)``: runs ``fn()`` (a sequence of tensors) with 1, 2 and 3 threads, asserts the
    results are equal bit for bit (a kernel's partial sums must not follow the thread count) and
    returns them; the thread count is restored."""

    def check(fn):
        threads = torch.get_num_threads()
        try:
            results = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                results.append(list(fn()))
        finally:
            torch.set_num_threads(threads)
        for n, other in zip((2, 3), results[1:]):
            assert len(other) == len(results[0])
            for i, (a, b) in enumerate(zip(results[0], other)):
                assert torch.equal(a, b), f'result {i} differs between 1 and {n} threads'
        return results[0]

    return check


@pytest.fixture(scope='session')
def shallow_arch():
    """The ``arch`` dict of the shallow backbone (``SHALLOW_ARCH``)."""
    return {key: list(value) for key, value in SHALLOW_ARCH.items()}


@pytest.fixture(scope='session')
def shallow_config(tmp_path_factory):
    """``shallow_config(config, **model)``: the path of a config that inherits ``config``
    (relative to the repository root or absolute) with the shallow backbone; ``model`` overrides
    other parts of its model (e.g. a transformer's ``num_layers``)."""

    def make(config, **model):
        arch = dict(SHALLOW_ARCH, _delete_=True)  # a dict replacing the base's arch name
        model['backbone'] = dict(model.get('backbone', {}), arch=arch)
        name = os.path.splitext(os.path.basename(config))[0] + '_shallow.py'
        path = tmp_path_factory.mktemp('shallow_config') / name
        path.write_text(f'_base_ = [{os.path.join(ROOT, config)!r}]\nmodel = {model!r}\n')
        return str(path)

    return make


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` (the marker is declared in setup.cfg) skip without a GPU and the
    CUDA kernels."""
    from transnext_mm.ops.dispatch import BUILD
    if BUILD.cuda and torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason='needs a GPU and transnext_mm._ext built with CUDA kernels '
                            f'(GPU visible: {torch.cuda.is_available()}, CUDA kernels built: '
                            f'{BUILD.cuda})')
    for item in items:
        if item.get_closest_marker('cuda') is not None:
            item.add_marker(skip)
