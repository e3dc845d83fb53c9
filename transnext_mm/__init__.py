"""transnext-mm: the TransNeXt backbone for mmdet 3.x, mmsegmentation 1.x and mmpretrain 1.x.

Importing this package registers ``TransNeXt`` in mmengine's root ``MODELS`` registry (so mmdet,
mmseg and mmpretrain configs find it through ``custom_imports``) and makes mmengine load its own
checkpoints with PyTorch's safe loader (see :mod:`transnext_mm.utils.safe_load`). It first checks
that the installed OpenMMLab packages are of supported versions
(:mod:`transnext_mm.utils.version_check`).
"""
from .utils.version_check import check_versions

check_versions()

from .utils.safe_load import install_safe_checkpoint_loader  # noqa: E402
from .version import __version__  # noqa: E402

install_safe_checkpoint_loader()

from .models import TransNeXt  # noqa: E402

__all__ = ['TransNeXt', '__version__']
