"""mmengine's own checkpoints load (test, resume) with the safe weights_only loader still on."""
import pickle

import pytest
import torch
import torch.nn as nn
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.model import BaseModel
from mmengine.runner import Runner
from mmengine.runner.checkpoint import _load_checkpoint

import transnext_mm  # noqa: F401  (installs the loader)


class TinyRegressor(BaseModel):

    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x, y=None, mode='tensor'):
        out = self.linear(torch.stack(x) if isinstance(x, list) else x)
        if mode == 'loss':
            return dict(loss=((out - y)**2).mean())
        return out


def make_runner(work_dir, max_epochs, resume=False):
    data = [dict(x=torch.randn(2), y=torch.randn(1)) for _ in range(8)]
    return Runner(
        model=TinyRegressor(),
        work_dir=str(work_dir),
        experiment_name=f'run{max_epochs}{resume}',
        train_dataloader=dict(
            dataset=data,
            batch_size=2,
            collate_fn=dict(type='default_collate'),
            sampler=dict(type='DefaultSampler', shuffle=True)),
        train_cfg=dict(by_epoch=True, max_epochs=max_epochs),
        optim_wrapper=dict(optimizer=dict(type='SGD', lr=0.1)),
        default_hooks=dict(checkpoint=dict(type='CheckpointHook', interval=1)),
        resume=resume)


@pytest.fixture(scope='module')
def mmengine_checkpoint(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('safe_load')
    make_runner(work_dir, max_epochs=1).train()
    return work_dir, work_dir / 'epoch_1.pth'


def test_torch_default_loader_is_still_safe(mmengine_checkpoint):
    _, path = mmengine_checkpoint
    with pytest.raises(pickle.UnpicklingError):
        torch.load(path)  # the global default stays weights_only=True and unpatched


def test_mmengine_loads_its_checkpoint(mmengine_checkpoint):
    _, path = mmengine_checkpoint
    checkpoint = _load_checkpoint(str(path), map_location='cpu')
    buffer = checkpoint['message_hub']['log_scalars']['train/loss']
    assert isinstance(buffer, HistoryBuffer) and buffer.mean() > 0
    assert set(checkpoint) >= {'meta', 'state_dict', 'optimizer', 'message_hub'}


def test_resume_continues(mmengine_checkpoint):
    work_dir, _ = mmengine_checkpoint
    runner = make_runner(work_dir, max_epochs=2, resume=True)
    runner.train()
    assert runner.epoch == 2 and (work_dir / 'epoch_2.pth').exists()


class _GetattrPayload:
    """Pickles as getattr(HistoryBuffer, name): only the statistics methods may load."""

    def __init__(self, name):
        self.name = name

    def __reduce__(self):
        return getattr, (HistoryBuffer, self.name)


def test_getattr_is_restricted(tmp_path):
    ok = tmp_path / 'ok.pth'
    torch.save({'stat': _GetattrPayload('mean')}, ok)
    assert _load_checkpoint(str(ok))['stat'] is HistoryBuffer.mean
    bad = tmp_path / 'bad.pth'
    torch.save({'stat': _GetattrPayload('__init__')}, bad)
    with pytest.raises(pickle.UnpicklingError, match="refusing getattr"):
        _load_checkpoint(str(bad))


def test_http_checkpoints_load_safely(mmengine_checkpoint, tmp_path, monkeypatch):
    """An mmengine checkpoint served over http downloads into torch.hub's cache and loads with
    the safe loader; a file with a disallowed global is refused (mmengine's own URL loader
    would have unpickled it with weights_only=False)."""
    import functools
    import http.server
    import shutil
    import threading

    _, path = mmengine_checkpoint
    served = tmp_path / 'served'
    served.mkdir()
    shutil.copy(path, served / 'epoch_1.pth')
    torch.save({'stat': _GetattrPayload('__init__')}, served / 'bad.pth')
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(served))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(('127.0.0.1', 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch_home'))
    try:
        url = f'http://127.0.0.1:{server.server_address[1]}'
        checkpoint = _load_checkpoint(f'{url}/epoch_1.pth', map_location='cpu')
        assert isinstance(checkpoint['message_hub']['log_scalars']['train/loss'], HistoryBuffer)
        assert (tmp_path / 'torch_home' / 'hub' / 'checkpoints' / 'epoch_1.pth').exists()
        with pytest.raises(pickle.UnpicklingError, match='refusing getattr'):
            _load_checkpoint(f'{url}/bad.pth')
    finally:
        server.shutdown()


def test_truncated_or_corrupt_checkpoints_are_named(tmp_path):
    from mmengine.runner.checkpoint import CheckpointLoader
    good = tmp_path / 'good.pth'
    torch.save({f'w{i}': torch.randn(100, 100) for i in range(5)}, good)
    data = good.read_bytes()
    torch.save({'w': torch.randn(100, 100)},
               tmp_path / 'legacy.pth',
               _use_new_zipfile_serialization=False)
    legacy = (tmp_path / 'legacy.pth').read_bytes()
    broken = dict(
        half=data[:len(data) // 2],
        last_byte=data[:-1],
        header=data[:4],
        empty=b'',
        text=b'not a checkpoint\n' * 10,
        legacy_cut=legacy[:len(legacy) // 2],
        garbage=bytes(range(256)) * 20)
    # Cut at every 997th byte: torch.load fails with the zip reader's RuntimeError ('failed
    # finding central directory'), OSError [Errno 22] or EOFError, all named as corruption.
    errors = set()
    for cut in range(0, len(data), 997):
        path = tmp_path / 'sweep.pth'
        path.write_bytes(data[:cut])
        with pytest.raises(RuntimeError, match=r'sweep\.pth is truncated or corrupt') as info:
            CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
        errors.add(type(info.value.__cause__).__name__)
    assert {'RuntimeError', 'OSError'} <= errors, errors  # both kinds were met and named
    for name, content in broken.items():
        path = tmp_path / f'{name}.pth'
        path.write_bytes(content)
        with pytest.raises(
                RuntimeError,
                match=rf'{name}\.pth is truncated or corrupt '
                rf'\({len(content)} bytes\)'):
            CheckpointLoader.load_checkpoint(str(path), map_location='cpu')
    # Not corruption: a disallowed type keeps its own message, a good file loads.
    import argparse
    torch.save({'args': argparse.Namespace(lr=1.0)}, tmp_path / 'namespace.pth')
    with pytest.raises(pickle.UnpicklingError, match='safe loader does not allow'):
        CheckpointLoader.load_checkpoint(str(tmp_path / 'namespace.pth'))
    assert set(CheckpointLoader.load_checkpoint(str(good))) == {f'w{i}' for i in range(5)}


def test_truncated_checkpoint_through_the_backbone_init_cfg(tmp_path):
    from transnext_mm.models.backbones import TransNeXt
    path = tmp_path / 'transnext_micro_224_1k.pth'
    torch.save(TransNeXt(arch='micro').state_dict(), path)
    path.write_bytes(path.read_bytes()[:-1000])
    model = TransNeXt(arch='micro', init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    with pytest.raises(RuntimeError, match='transnext_micro_224_1k.pth is truncated or corrupt'):
        model.init_weights()
