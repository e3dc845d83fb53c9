# Copyright (c) transnext-mm contributors. All rights reserved.
"""``python -m transnext_mm.collect_env``: the environment for bug reports (see
:mod:`transnext_mm.utils.collect_env`)."""
from transnext_mm.utils.collect_env import main

if __name__ == '__main__':
    main()
