"""The import-time check of the OpenMMLab packages' versions."""
import os
import os.path as osp
import subprocess
import sys

import pytest

from transnext_mm.utils.version_check import (SKIP_ENV, SUPPORTED_VERSIONS, check_versions,
                                              incompatible_packages)

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))


def test_the_installed_stack_is_supported():
    assert incompatible_packages() == []
    check_versions()


@pytest.mark.parametrize('name,version', [('mmcv', '2.2.0'), ('mmcv', '1.7.2'), ('mmdet', '2.28.2'),
                                          ('mmsegmentation', '0.30.0'), ('mmpretrain', '2.0.0rc0'),
                                          ('mmengine', '0.9.1')])
def test_an_unsupported_version_is_named_with_its_range(name, version, monkeypatch):
    versions = {
        'mmengine': '0.10.7',
        'mmcv': '2.1.0',
        'mmdet': '3.3.0',
        'mmsegmentation': '1.2.2',
        'mmpretrain': '1.2.0',
        name: version
    }
    low, high = SUPPORTED_VERSIONS[name]
    monkeypatch.delenv(SKIP_ENV, raising=False)
    with pytest.raises(
            ImportError,
            match=rf'{name} {version} is installed, but transnext_mm '
            rf'supports {name}>={low},<{high}') as info:
        check_versions(versions)
    assert str(info.value).count('is installed') == 1  # only the incompatible one is named
    monkeypatch.setenv(SKIP_ENV, '1')
    with pytest.warns(UserWarning, match=f'{name} {version} is installed'):
        check_versions(versions)


def test_missing_toolboxes_are_not_checked():
    assert incompatible_packages({'mmengine': '0.10.7', 'mmdet': None}) == []


def test_import_names_an_incompatible_installed_toolbox(tmp_path):
    """`import transnext_mm` with an mmdet 2.x distribution first on the path."""
    info = tmp_path / 'mmdet-2.28.2.dist-info'
    info.mkdir()
    (info / 'METADATA').write_text('Metadata-Version: 2.1\nName: mmdet\nVersion: 2.28.2\n')
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT]))
    env.pop(SKIP_ENV, None)
    result = subprocess.run([sys.executable, '-c', 'import transnext_mm'],
                            env=env,
                            capture_output=True,
                            text=True,
                            timeout=300)
    assert result.returncode != 0
    assert ('ImportError: transnext_mm: incompatible OpenMMLab packages: mmdet 2.28.2 is '
            'installed, but transnext_mm supports mmdet>=3.0.0,<4.0.0') in result.stderr
