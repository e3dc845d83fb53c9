# Copyright (c) transnext-mm contributors. All rights reserved.
"""The versions of the OpenMMLab packages that transnext_mm works with, checked at import.

The ranges are the API generations transnext_mm is written for (torch 2.x from 2.11, the oldest
the compiled op has been built and tested with; mmengine 0.x, mmcv 2.0-2.1 as
mmdet 3.x and mmseg 1.x require, mmdet 3.x, mmsegmentation 1.x, mmpretrain 1.x); the exact
versions tested are listed in the README. Packages that are not installed are not checked (the
toolboxes are optional), and versions are read from the installed distributions' metadata, so
the check imports none of them.
"""
import os
import warnings
from importlib import metadata
from typing import Dict, List, Optional, Tuple

# distribution name -> (lowest supported version, first unsupported version)
SUPPORTED_VERSIONS: Dict[str, Tuple[str, str]] = {
    'torch': ('2.11.0', '3.0.0'),
    'mmengine': ('0.10.0', '1.0.0'),
    'mmcv': ('2.0.0', '2.2.0'),
    'mmdet': ('3.0.0', '4.0.0'),
    'mmsegmentation': ('1.0.0', '2.0.0'),
    'mmpretrain': ('1.0.0', '2.0.0'),
}
SKIP_ENV = 'TRANSNEXT_MM_SKIP_VERSION_CHECK'


def _release(version: str) -> Tuple[int, ...]:
    """The numeric release of a version string ('2.1.0rc1' -> (2, 1, 0), pre-releases of a
    version count as that version)."""
    numbers = []
    for part in version.split('+')[0].split('.'):
        digits = ''
        for char in part:
            if not char.isdigit():
                break
            digits += char
        if not digits:
            break
        numbers.append(int(digits))
        if len(digits) != len(part):  # '0rc1': stop after the number
            break
    return tuple(numbers) + (0, ) * (3 - len(numbers))


def installed_version(distribution: str) -> Optional[str]:
    """The installed version of ``distribution``, or None when it is not installed."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def incompatible_packages(versions: Optional[Dict[str, Optional[str]]] = None) -> List[str]:
    """Describe every installed package of :data:`SUPPORTED_VERSIONS` outside its range.

    Args:
        versions (dict, optional): distribution name -> version (None: not installed) to check
            instead of the installed ones. Defaults to None.

    Returns:
        list[str]: One line per incompatible package, naming it, its version and the range.
    """
    problems = []
    for name, (low, high) in SUPPORTED_VERSIONS.items():
        version = installed_version(name) if versions is None else versions.get(name)
        if version is None:
            continue
        if not _release(low) <= _release(version) < _release(high):
            problems.append(f'{name} {version} is installed, but transnext_mm supports '
                            f'{name}>={low},<{high}')
    return problems


def check_versions(versions: Optional[Dict[str, Optional[str]]] = None) -> None:
    """Raise an ImportError naming every incompatible OpenMMLab package and its supported range.

    ``TRANSNEXT_MM_SKIP_VERSION_CHECK=1`` turns the error into a warning (at your own risk).

    Args:
        versions (dict, optional): See :func:`incompatible_packages`. Defaults to None.

    Raises:
        ImportError: if an installed package's version is outside its supported range.
    """
    problems = incompatible_packages(versions)
    if not problems:
        return
    message = ('transnext_mm: incompatible OpenMMLab packages: ' + '; '.join(problems) +
               '. Install a supported version (see README.md, "Tested versions")')
    if os.getenv(SKIP_ENV, '0').lower() in ('1', 'true', 'yes', 'on'):
        warnings.warn(f'{message}; continuing because {SKIP_ENV} is set')
        return
    raise ImportError(f'{message}, or set {SKIP_ENV}=1 to try anyway')
