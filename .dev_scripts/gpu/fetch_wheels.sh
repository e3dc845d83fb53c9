#!/usr/bin/env bash
# Fetch the pure-Python wheels that .dev_scripts/gpu/run_all.sh installs on a GPU machine without
# a package index into .whl/ (git-ignored; copy it there with the working tree), and check that
# they are complete.
#
# The GPU machine's Python packages (Python 3.12.3, torch 2.11.0+cu130, as listed on 2026-11-17)
# lack mmengine and mmcv. transnext_mm imports mmengine (registry, BaseModule, logging,
# checkpoint) and mmcv.cnn.bricks (DropPath); mmcv 2.x has no binary wheels, but mmcv-lite 2.1.0
# (the same Python package without the compiled ops, which transnext_mm does not use) is a
# pure-Python wheel that installs as `mmcv`. Their pure-Python needs missing there: addict,
# termcolor, yapf (-> platformdirs). Versions are those of this project's CPU environment.
#
# Usage: bash .dev_scripts/gpu/fetch_wheels.sh [DEST]      (DEST defaults to .whl; PYTHON=...
#                                                          picks the interpreter that runs pip)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
DEST="${1:-$ROOT/.whl}"
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  if [ -x "$ROOT/.venv/bin/python" ]; then PY="$ROOT/.venv/bin/python"; else PY=python3; fi
fi
WHEELS=(mmengine==0.10.7 mmcv-lite==2.1.0 addict==2.4.0 termcolor==3.3.0 yapf==0.43.0
        platformdirs==4.14.8)
# What the wheels need that the GPU machine has.
GPU_MACHINE=(matplotlib numpy opencv-python-headless packaging pillow pyyaml rich)

mkdir -p "$DEST"
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
  --implementation cp --abi cp312 --platform manylinux_2_28_x86_64 \
  --platform manylinux2014_x86_64 --platform any -d "$DEST" "${WHEELS[@]}"

# Every wheel pure Python, one version of each, every requirement (markers evaluated for
# CPython 3.12 on Linux) met by a wheel here or a package of the GPU machine.
"$PY" - "$DEST" "${GPU_MACHINE[@]}" <<'PYEOF'
import email.parser
import glob
import os
import sys
import zipfile

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

dest, device = sys.argv[1], {canonicalize_name(name) for name in sys.argv[2:]}
# The GPU machine has cv2 from opencv-python-headless; mmengine / mmcv ask for opencv-python.
if 'opencv-python-headless' in device:
    device.add('opencv-python')
env = {'python_version': '3.12', 'python_full_version': '3.12.3', 'sys_platform': 'linux',
       'platform_system': 'Linux', 'platform_machine': 'x86_64', 'os_name': 'posix',
       'implementation_name': 'cpython', 'platform_python_implementation': 'CPython',
       'extra': ''}
wheels, problems = {}, []
for path in sorted(glob.glob(os.path.join(dest, '*.whl'))):
    name, version, _, tags = parse_wheel_filename(os.path.basename(path))
    if name in wheels:
        problems.append(f'two versions of {name}: {wheels[name][0]} and {version}')
    if not any(t.abi == 'none' and t.platform == 'any' for t in tags):
        problems.append(f'{os.path.basename(path)} is not pure Python')
    with zipfile.ZipFile(path) as zf:
        meta_name = next(n for n in zf.namelist() if n.endswith('.dist-info/METADATA'))
        meta = email.parser.Parser().parsestr(zf.read(meta_name).decode())
    wheels[name] = (version, meta.get_all('Requires-Dist') or [])
for name, (version, requires) in wheels.items():
    for line in requires:
        req = Requirement(line)
        if req.marker is not None and not req.marker.evaluate(env):
            continue
        dep = canonicalize_name(req.name)
        if dep in wheels:
            if req.specifier and not req.specifier.contains(str(wheels[dep][0]), prereleases=True):
                problems.append(f'{name} needs {req}, the wheel is {wheels[dep][0]}')
        elif dep not in device:
            problems.append(f'{name} needs {req}: neither a wheel here nor on the GPU machine')
print(f'fetch_wheels: {len(wheels)} wheels in {dest}: '
      + ', '.join(f'{n} {v}' for n, (v, _) in sorted(wheels.items())))
if problems:
    print('fetch_wheels: INCOMPLETE:\n  ' + '\n  '.join(problems))
    sys.exit(1)
print('fetch_wheels: all pure Python; every requirement is met by these wheels or the GPU '
      'machine')
PYEOF
du -sh "$DEST" | awk '{print "fetch_wheels: " $1 " in all"}'
