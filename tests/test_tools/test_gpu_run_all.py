# Copyright (c) transnext-mm contributors. All rights reserved.
"""The GPU check (``.dev_scripts/gpu/run_all.sh``) rehearsed on the CPU with ``--dry-run``, so that
the script keeps working on machines without a GPU."""
import glob
import json
import os
import os.path as osp
import subprocess
import sys

import pytest

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
SCRIPT = osp.join(ROOT, '.dev_scripts', 'gpu', 'run_all.sh')
sys.path.insert(0, osp.join(ROOT, '.dev_scripts', 'gpu'))
import report as gpu_report  # noqa: E402


def run_script(*args, timeout=1800):
    env = dict(os.environ, PYTHON=sys.executable, PYTHONPATH=ROOT)
    return subprocess.run(['bash', SCRIPT, *args], capture_output=True, text=True, env=env,
                          timeout=timeout, cwd=ROOT)


def test_usage_errors_name_the_allowed_values(tmp_path):
    proc = run_script()
    assert proc.returncode == 2 and 'usage: bash .dev_scripts/gpu/run_all.sh OUT_DIR' in proc.stderr
    proc = run_script(str(tmp_path), '--fast')
    assert proc.returncode == 2 and "unknown option '--fast' (allowed: --dry-run)" in proc.stderr


@pytest.mark.skipif(not glob.glob(osp.join(ROOT, 'transnext_mm', '_ext*.so')),
                    reason='transnext_mm._ext is not built in place (the dry run would spend '
                    'minutes compiling it)')
def test_dry_run_writes_the_full_report(tmp_path):
    proc = run_script(str(tmp_path), '--dry-run')
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-4000:]
    assert sorted(os.listdir(tmp_path)) == ['report.json', 'run_all.log']
    with open(tmp_path / 'report.json') as f:
        report = json.load(f)
    assert {'environment', 'tests', 'parity', 'benchmarks', 'summary'} <= set(report)

    env = report['environment']
    assert env['dry_run'] is True
    assert env['steps']['install']['status'] == 'skipped: dry run'
    assert env['system']['ext']['built'] is True
    assert env['system']['transnext_mm'].startswith(ROOT)

    pytest_result = report['tests']['pytest']
    assert pytest_result['exit_code'] == 0, pytest_result
    assert pytest_result['passed'] >= 5 and pytest_result['failures'] == 0
    assert report['environment']['steps']['sanitize_shapes_cpu']['status'] == 'ok'

    passed, failed, errored = gpu_report.count_checks(report['parity'])
    assert not failed and not errored, (failed, errored)
    # Every backbone run (op / torch against the fp64 reference), the op's edge cases, flex.
    assert len(passed) >= 14, passed
    backbone = report['parity']['backbone']['tiny_32x32_b1']
    for dtype in ('fp32', 'bf16'):
        for impl in ('op', 'torch'):
            run = backbone[dtype][impl]
            assert run['pass'] is True and run['grads_compared'] > 100, run
    assert backbone['fp32']['op']['grad_max_rel_err'] < 1e-4
    assert report['parity']['op']['deterministic_fp32']['pass'] is True
    assert 'skipped' in report['parity']['op']['non_default_stream']

    core = report['benchmarks']['core']
    _, _, bench_errors = gpu_report.count_checks(report['benchmarks'])
    assert not bench_errors, bench_errors
    layers = core['layers']['32x32_b1']
    for impl in ('reference', 'torch', 'op'):
        for mode in ('fwd', 'fwd_bwd'):
            assert layers[impl][mode]['total_ms_19_layers'] > 0
            assert [s['count'] for s in layers[impl][mode]['stages']] == [2, 2, 15]
    train = core['backbone_train']['32x32_b1']
    for impl in ('reference-nocache', 'torch', 'op'):
        assert train[impl]['median_ms'] > 0
    assert report['benchmarks']['flex']['layers']['32x32_b1']['flex']['fwd']['stages']
    assert core['amp_train']['32x32_b1']['bf16']['pass'] is True
    goals = {row['goal'] for row in report['benchmarks']['goals']}
    assert 'layers 32x32_b1 fwd: op vs unfold reference' in goals
    assert 'train step 32x32_b1: op vs unfold reference (no cache)' in goals

    assert report['summary'][-1] in log  # the summary table is printed last
    with open(tmp_path / 'run_all.log') as f:
        assert '== parity:' in f.read()


def test_goals_are_judged_from_the_measurements():
    def layer(ms):
        return {'total_ms_19_layers': ms, 'stages': [{'gbytes_per_s': 3000.0},
                                                     {'gbytes_per_s': 1000.0}]}

    report = {'benchmarks': {'core': {
        'copy_bandwidth': {'gbytes_per_s': 4000.0},
        'layers': {'512x512_b8': {'reference': {'fwd': layer(70.0), 'fwd_bwd': layer(100.0)},
                                  'torch': {'fwd': layer(30.0), 'fwd_bwd': layer(40.0)},
                                  'op': {'fwd': layer(10.0), 'fwd_bwd': layer(30.0)}}},
        'backbone_train': {'512x512_b8': {
            'reference-nocache': {'median_ms': 300.0, 'peak_mem_mib': 1000.0},
            'op': {'median_ms': 100.0, 'peak_mem_mib': 800.0},
            'pvt_v2_b2': {'median_ms': 90.0}}}}}}
    rows = {row['goal']: row for row in gpu_report.goals(report)}
    assert rows['layers 512x512_b8 fwd: op vs unfold reference']['value'] == 7.0
    assert rows['layers 512x512_b8 fwd: op vs unfold reference']['met'] is True
    assert rows['layers 512x512_b8 fwd_bwd: op vs unfold reference']['met'] is False  # 3.33x
    assert rows['layers 512x512_b8 fwd_bwd: op vs torch path']['met'] is False  # 1.33x
    bandwidth = rows['layers 512x512_b8 fwd: op bandwidth, stages 1-2, fraction of copy']
    assert bandwidth['value'] == 0.25 and bandwidth['met'] is False  # the slower stage counts
    assert rows['train step 512x512_b8: op vs unfold reference (no cache)']['met'] is True
    assert rows['train step 512x512_b8: op time / pvt_v2_b2 time']['met'] is True  # 1.11
    swin = rows['train step 512x512_b8: op time / swin_tiny_patch4_window7_224 time']
    assert swin['value'] is None and swin['met'] is None  # not measured: not judged
    memory = rows['train step 512x512_b8: op peak memory / reference peak memory']
    assert memory['value'] == 0.8 and memory['met'] is False
