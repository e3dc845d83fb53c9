"""type='TransNeXt' resolves from every toolbox's registry after importing the plugin."""
import importlib

import pytest

import transnext_mm  # noqa: F401
from transnext_mm import TransNeXt


@pytest.mark.parametrize(
    'registry_module',
    ['mmdet.registry', 'mmseg.registry', 'mmpretrain.registry', 'mmengine.registry'])
def test_build_from_toolbox_registry(registry_module):
    registry = importlib.import_module(registry_module).MODELS
    model = registry.build(dict(type='TransNeXt', arch='micro', out_indices=(3, )))
    assert isinstance(model, TransNeXt) and model.out_indices == (3, )


def test_custom_imports_in_a_config(tmp_path):
    from mmengine.config import Config
    cfg_file = tmp_path / 'cfg.py'
    cfg_file.write_text("custom_imports = dict(imports=['transnext_mm'], "
                        "allow_failed_imports=False)\n"
                        "model = dict(type='TransNeXt', arch='micro')\n")
    cfg = Config.fromfile(str(cfg_file))
    from mmdet.registry import MODELS
    assert isinstance(MODELS.build(cfg.model), TransNeXt)
