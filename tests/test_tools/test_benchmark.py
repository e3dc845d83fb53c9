import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('mode', [[], ['--layer'], ['--glu'], ['--glu', '--backward']])
def test_benchmark_runs_each_mode(tmp_path, mode):
    """The benchmark tool runs end to end (a smoke test of the entry point, not a timing)."""
    out = tmp_path / 'result.json'
    cmd = [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--arch', 'micro', '--size',
           '64', '48', '--attn-impl', 'torch', 'op', '--warmup', '0', '--repeats', '1',
           '--threads', '1', '--json', str(out), *mode]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert 'torch' in result.stdout and 'op' in result.stdout
    rows = json.loads(out.read_text())
    rows = rows['results']
    assert {r['impl'] for r in rows} == {'torch', 'op'}
    assert all('error' not in r and r['median_s'] > 0 for r in rows)


def test_benchmark_rejects_layer_with_glu():
    cmd = [sys.executable, str(ROOT / 'tools' / 'benchmark.py'), '--layer', '--glu']
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and '--layer and --glu are exclusive' in result.stderr
