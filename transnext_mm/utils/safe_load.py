# Copyright (c) transnext-mm contributors. All rights reserved.
"""Load mmengine checkpoints with PyTorch's safe (``weights_only``) loader.

PyTorch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10.7 calls
``torch.load`` without saying more. Its own checkpoints then fail to load (``--resume``,
``tools/test.py``): the message hub pickles ``HistoryBuffer`` objects, numpy arrays and scalars,
and the buffer's statistics functions, which pickle as ``getattr(HistoryBuffer, 'mean')``.

Instead of turning the safe loader off, this module registers loaders for local files and for
http(s) URLs in mmengine's ``CheckpointLoader`` that keep ``weights_only=True`` and allow exactly
those types (mmengine's own URL loader goes through ``torch.hub.load_state_dict_from_url``, which
loads with ``weights_only=False``; ours downloads into the same cache and loads safely).
``getattr`` itself is never allowed: the pickle's ``builtins.getattr`` is resolved to
:func:`history_buffer_statistic`, which only returns the statistics functions of
``HistoryBuffer`` and refuses everything else.
"""
import os
import os.path as osp
import pickle
import zipfile
from urllib.parse import urlparse

import numpy as np
import torch
from mmengine.dist import get_dist_info
from mmengine.logging.history_buffer import HistoryBuffer
from mmengine.runner.checkpoint import CheckpointLoader

_STATISTICS = ('min', 'max', 'current', 'mean')


def history_buffer_statistic(obj, name: str):
    """Stand-in for ``getattr`` in mmengine checkpoints: only HistoryBuffer statistics."""
    if obj is HistoryBuffer and name in _STATISTICS:
        return getattr(HistoryBuffer, name)
    raise pickle.UnpicklingError(
        f'refusing getattr({obj!r}, {name!r}) while loading a checkpoint: only the statistics '
        f'methods {_STATISTICS} of mmengine HistoryBuffer are allowed')


def _numpy_globals():
    """numpy's array/scalar/dtype reconstructors under both numpy 1.x and 2.x module paths."""
    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    entries = [np.ndarray, np.dtype]
    for module in ('numpy.core.multiarray', 'numpy._core.multiarray'):
        entries += [(multiarray._reconstruct, f'{module}._reconstruct'),
                    (multiarray.scalar, f'{module}.scalar')]
    # numpy >= 1.25 pickles dtypes by their class (numpy.dtypes.Float64DType, ...).
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        entries += [getattr(dtypes, name) for name in dir(dtypes) if name.endswith('DType')]
    return entries


SAFE_GLOBALS = [HistoryBuffer, (history_buffer_statistic, 'builtins.getattr'), *_numpy_globals()]


def _is_unreadable_archive(filename: str) -> bool:
    """Whether ``filename`` starts like a zip checkpoint (torch >= 1.6) but its archive cannot
    be read, as happens when the file is cut short."""
    with open(filename, 'rb') as f:
        if f.read(4) != b'PK\x03\x04':
            return False
    try:
        with zipfile.ZipFile(filename) as archive:
            archive.infolist()
        return False
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return True


def _corrupt_checkpoint_error(filename: str, error: Exception) -> RuntimeError:
    detail = (str(error).strip().splitlines() or [''])[0][:200]
    return RuntimeError(
        f'{filename} is truncated or corrupt ({osp.getsize(filename)} bytes): it cannot be read '
        f'as a PyTorch checkpoint (torch.load: {type(error).__name__}: {detail}); download or '
        'copy it again')


def load_from_local_safely(filename: str, map_location=None):
    """``torch.load`` with ``weights_only=True`` that also reads mmengine's own checkpoints.

    Raises:
        FileNotFoundError: if ``filename`` does not exist.
        pickle.UnpicklingError: if it holds objects the safe loader does not allow.
        RuntimeError: if it is truncated or corrupt (naming the file and its size), or for
            the errors of ``torch.load`` that are not about the file (e.g. ``map_location``).
    """
    filename = osp.expanduser(filename)
    if not osp.isfile(filename):
        raise FileNotFoundError(f'{filename} can not be found.')
    with torch.serialization.safe_globals(SAFE_GLOBALS):
        try:
            return torch.load(filename, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            refused = 'Unsupported global' in str(e) or 'refusing getattr' in str(e)
            if not refused:  # e.g. 'Unsupported operand': not a pickle
                raise _corrupt_checkpoint_error(filename, e) from e
            raise pickle.UnpicklingError(
                f'{filename} holds objects that the safe loader does not allow ({e}). '
                'transnext_mm allows tensors, numpy data and mmengine log buffers; if you trust '
                'the file, add the type with torch.serialization.add_safe_globals') from e
        except PermissionError:
            raise
        except (EOFError, OSError, KeyError) as e:  # a cut archive or pickle, garbage
            raise _corrupt_checkpoint_error(filename, e) from e
        except RuntimeError as e:  # zip reader errors, legacy format 'unexpected EOF'
            if _is_unreadable_archive(filename) or 'unexpected EOF' in str(e):
                raise _corrupt_checkpoint_error(filename, e) from e
            raise


def _download(url: str, model_dir: str = None) -> str:
    """Download ``url`` once into ``model_dir`` (default: torch.hub's checkpoint cache, as
    mmengine and torchvision use); return the local path."""
    model_dir = model_dir or osp.join(torch.hub.get_dir(), 'checkpoints')
    os.makedirs(model_dir, exist_ok=True)
    path = osp.join(model_dir, osp.basename(urlparse(url).path))
    if not osp.exists(path):
        torch.hub.download_url_to_file(url, path, progress=False)
    return path


def load_from_http_safely(filename: str, map_location=None, model_dir: str = None):
    """Download an http(s) checkpoint (local rank 0 first when distributed, like mmengine) and
    read it with :func:`load_from_local_safely`."""
    rank, world_size = get_dist_info()
    if rank == 0:
        path = _download(filename, model_dir)
    if world_size > 1:
        torch.distributed.barrier()
        if rank > 0:
            path = _download(filename, model_dir)
    return load_from_local_safely(path, map_location)


def install_safe_checkpoint_loader() -> None:
    """Make mmengine's ``CheckpointLoader`` read local files and http(s) URLs safely."""
    CheckpointLoader.register_scheme(prefixes='', loader=load_from_local_safely, force=True)
    CheckpointLoader.register_scheme(
        prefixes=('http://', 'https://'), loader=load_from_http_safely, force=True)
