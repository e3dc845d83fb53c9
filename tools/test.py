# Copyright (c) transnext-mm contributors. All rights reserved.
"""Test with an mmdet, mmseg or mmpretrain config: the toolbox's own tools/test.py.

The config's ``default_scope`` picks the toolbox; every option of its test.py works
(``--tta``, ``--out``, ``--show-dir``, ``--cfg-options``, ``--launcher``, ...).
"""
from transnext_mm.utils.toolbox import run_toolbox_tool

if __name__ == '__main__':
    run_toolbox_tool('test.py')
