# Copyright (c) transnext-mm contributors. All rights reserved.
"""Train with an mmdet, mmseg or mmpretrain config: the toolbox's own tools/train.py.

The config's ``default_scope`` picks the toolbox; every option of its train.py works
(``--work-dir``, ``--resume``, ``--amp``, ``--cfg-options``, ``--launcher``, ...).
"""
from transnext_mm.utils.toolbox import run_toolbox_tool

if __name__ == '__main__':
    run_toolbox_tool('train.py')
