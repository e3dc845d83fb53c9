# Copyright (c) transnext-mm contributors. All rights reserved.
"""The GPU check (``.dev_scripts/gpu/run_all.sh``) rehearsed on the CPU with ``--dry-run``, so that
the script keeps working on machines without a GPU, and its report (``report.py``)."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest
import torch

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
GPU_DIR = osp.join(ROOT, '.dev_scripts', 'gpu')
SCRIPT = osp.join(GPU_DIR, 'run_all.sh')


def run_script(*args, timeout=600):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    return subprocess.run(['bash', SCRIPT, *args],
                          capture_output=True,
                          text=True,
                          env=env,
                          timeout=timeout,
                          cwd=ROOT)


def report_py(*args):
    return subprocess.run(
        [sys.executable, osp.join(GPU_DIR, 'report.py'), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT)


def test_usage_errors_name_the_allowed_values(tmp_path):
    proc = run_script()
    assert proc.returncode == 2 and 'usage: bash .dev_scripts/gpu/run_all.sh OUT' in proc.stderr
    proc = run_script(str(tmp_path), '--fast')
    assert proc.returncode == 2 and "unknown option '--fast' (allowed: --dry-run)" in proc.stderr


@pytest.mark.skipif(
    not glob.glob(osp.join(ROOT, 'transnext_mm', '_ext*.so')),
    reason='transnext_mm._ext is not built in place (the dry run would spend '
    'minutes compiling it)')
def test_dry_run_writes_the_report(tmp_path):
    proc = run_script(str(tmp_path), '--dry-run')
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert sorted(os.listdir(tmp_path)) == ['report.json', 'run_all.log']
    with open(tmp_path / 'report.json') as f:
        report = json.load(f)
    steps = report['steps']
    assert list(steps) == [
        'build', 'environment', 'pytest', 'sanitizer', 'bench_layers_train', 'bench_backbone_train',
        'bench_layers'
    ]
    assert all(steps[name]['status'] == 'ok' for name in steps if name != 'sanitizer'), steps
    assert steps['sanitizer'] == {'status': 'skipped', 'seconds': 0, 'note': 'dry run'}

    env = steps['environment']['result']
    assert env['transnext_mm'].endswith(f'({osp.join(ROOT, "transnext_mm")})')
    if not torch.cuda.is_available():
        assert env['CUDA self-check'] == 'not run: no CUDA device'
        counts = steps['pytest']['pytest']  # the CUDA tests: collected, skipped
        assert counts['tests'] > 50 and counts['skipped'] == counts['tests'], counts

    for name in ('bench_layers_train', 'bench_backbone_train', 'bench_layers'):
        result = steps[name]['result']
        assert result['args']['device'] == 'cpu' and result['args']['attn_impl'] == ['op']
        assert result['results'][0]['median_s'] > 0, result
    assert result['args']['layer'] and not result['args']['backward']

    assert report['summary'][0].startswith('step ')
    assert log.rstrip().endswith(report['summary'][-1])  # the summary table is printed last
    with open(tmp_path / 'run_all.log') as f:
        assert f.read().rstrip().endswith(report['summary'][-1])


def test_report_reads_pytest_sanitizer_benchmark_and_environment(tmp_path):
    report = tmp_path / 'report.json'
    junit = tmp_path / 'junit.xml'
    junit.write_text('<testsuites><testsuite tests="5" failures="1" errors="0" skipped="1">'
                     '<testcase classname="t" name="a"><failure message="boom"/></testcase>'
                     '</testsuite></testsuites>')
    sanitizer = tmp_path / 'memcheck.log'
    sanitizer.write_text('========= COMPUTE-SANITIZER\n....\n32 passed in 40.1s\n'
                         '========= ERROR SUMMARY: 0 errors\n')
    bench = tmp_path / 'bench.json'
    bench.write_text(
        json.dumps({
            'args': {},
            'results': [{
                'impl': 'torch',
                'median_s': 0.02
            }, {
                'impl': 'op',
                'error': 'OOM'
            }]
        }))
    env = tmp_path / 'env.txt'
    env.write_text('PyTorch: 2.11.0\n  - detail: x\nCUDA self-check cuda:0 float32: d=16 passed '
                   '(3 ms)\nCUDA self-check cuda:0 bfloat16: d=16 FAILED (output: ...)\n')
    for args in (('pytest', 1, 30, '--junit', junit), ('sanitizer_memcheck', 0, 41, '--sanitizer',
                                                       sanitizer),
                 ('bench', 0, 12, '--json', bench), ('environment', 0, 9, '--lines', env),
                 ('pytest_again', 124, 150, '--junit', tmp_path / 'missing.xml')):
        proc = report_py('step', report, *args)
        assert proc.returncode == 0, proc.stderr
    proc = report_py('summary', report)
    assert proc.returncode == 1, proc.stdout + proc.stderr  # a step failed
    rows = {
        cells[0]: cells[1:]
        for cells in ([c.strip() for c in line.split(' | ')] for line in proc.stdout.splitlines())
    }
    assert rows['pytest'] == ['failed (exit 1)', '30 s', '3 passed, 1 failed, 1 skipped']
    assert rows['sanitizer_memcheck'][2] == 'ERROR SUMMARY: 0 errors; 32 passed in 40.1s'
    assert rows['bench'][2] == 'torch 20.0 ms, op failed'
    assert rows['environment'][2] == 'self-check FAILED on cuda:0 bfloat16'
    assert rows['pytest_again'][0] == 'time box reached'
    with open(report) as f:
        data = json.load(f)
    assert data['steps']['pytest']['pytest']['failed_tests'] == ['t::a: boom']
    assert data['steps']['environment']['result'] == {
        'PyTorch': '2.11.0',
        'CUDA self-check cuda:0 float32': 'd=16 passed (3 ms)',
        'CUDA self-check cuda:0 bfloat16': 'd=16 FAILED (output: ...)'
    }
    assert data['summary'] == proc.stdout.splitlines()
