import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize('mode', [[], ['--layer'], ['--glu'], ['--glu', '--backward']])
def test_benchmark_runs_each_mode(tmp_path, mode):
    """The benchmark tool runs end to end (a smoke test of the entry point, not a timing)."""
    out = tmp_path / 'result.json'
    cmd = [
        sys.executable,
        str(ROOT / 'tools' / 'benchmark.py'), '--arch', 'micro', '--size', '64', '48',
        '--attn-impl', 'torch', 'op', '--warmup', '0', '--repeats', '1', '--threads', '1', '--json',
        str(out), *mode
    ]
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


# ------------------------------------------------------------------------------- --peers
def _benchmark_module():
    spec = importlib.util.spec_from_file_location('benchmark_tool', ROOT / 'tools' / 'benchmark.py')
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_benchmark_peers_smoke(tmp_path):
    """--peers at a tiny size: every peer and TransNeXt timed in each timing, with peak memory,
    ratios and the --profile split in the JSON (a smoke test of the mode, not a timing)."""
    out = tmp_path / 'peers.json'
    cmd = [
        sys.executable,
        str(ROOT / 'tools' / 'benchmark.py'), '--peers', '--arch', 'micro', '--size', '64',
        '--batch', '1', '--rounds', '1', '--threads', '1', '--profile', '--json',
        str(out)
    ]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report['mode'] == 'peers' and report['env']['mmdet'] and report['memory']
    rows = {r['model']: r for r in report['results']}
    assert set(rows) == {'Swin-T', 'PVTv2-b2', 'ConvNeXt-T', 'TransNeXt-micro'}
    peers = [r for r in rows.values() if r['kind'] == 'peer']
    for row in rows.values():
        assert 'error' not in row, row
        assert row['size'] == [64, 64] and row['batch'] == 1
        assert set(row['ratio_to_fastest_peer']) == {'eval', 'cold_eval', 'train'}
        for timing in ('eval', 'cold_eval', 'train'):
            assert row[timing]['median_s'] > 0 and len(row[timing]['rounds']) == 1
            fastest = min(peers, key=lambda r: r[timing]['median_s'])
            assert row['fastest_peer'][timing] == fastest['model']
            assert row['ratio_to_fastest_peer'][timing] == pytest.approx(
                row[timing]['median_s'] / fastest[timing]['median_s'])
        assert row['eval']['peak_mem_mib'] > 0
        # The training step holds every parameter's gradient (float32) at its end.
        assert row['train']['peak_mem_mib'] >= row['params_m'] * 1e6 * 4 / 2**20
        profile = row['train']['profile']
        assert profile['matmul_gflop'] > 0 and profile['other_ms'] > 0, row['model']
        assert len(profile['costliest_other']) == 12
    assert 20 < rows['Swin-T']['params_m'] < 30 and rows['TransNeXt-micro']['attn_impl'] == 'auto'
    table = result.stdout
    assert 'input 1x3x64x64 | fastest peer: eval ' in table and 'x peer' in table
    assert all(name in table for name in rows)
    assert 'one profiled training step each' in table


def test_cpu_allocator_peak_follows_live_tensors():
    """The CPU peak memory is the most tensor memory live at once during the step."""
    benchmark = _benchmark_module()
    mib = 2**20

    def step():
        a = torch.ones(mib // 4)  # 1 MiB
        b = torch.ones(2 * mib // 4)  # 3 MiB live
        del a
        c = torch.ones(mib // 4)  # 3 MiB live again
        del b, c

    peak = benchmark.cpu_allocator_peak(step)
    assert 3 * mib <= peak < 3 * mib + 4096


def test_profile_train_step_counts_matmul_flops_and_other_time():
    """--profile's split: the matrix products' FLOPs (2 per multiply-add) and time, and the
    other ops' time with the costliest named."""
    benchmark = _benchmark_module()
    a, b, c = torch.randn(64, 32), torch.randn(32, 16), torch.randn(4, 8, 8)

    def step():
        torch.mm(a, b)
        torch.bmm(c, c)
        torch.randn(1 << 18).exp_()

    profile = benchmark.profile_train_step(step)
    assert profile['matmul_gflop'] * 1e9 == pytest.approx(2 * (64 * 32 * 16 + 4 * 8 * 8 * 8))
    assert profile['matmul_ms'] > 0 and profile['other_ms'] > 0
    ops = [o['op'] for o in profile['costliest_other']]
    assert 'aten::exp_' in ops and not set(ops) & set(benchmark.MATMUL_OPS)


@pytest.mark.parametrize('argv, message', [
    (['--peers', '--layer'], '--peers times whole backbones in eval and train (--steps): it '
     'takes no --layer'),
    (['--peers', '--attn-impl', 'reference-nocache'], 'reference-nocache (a process-wide switch)'),
    (['--peers', '--size', '16'], '--size: with --peers every side must be >= 32'),
    (['--peers', '--size', '64', '64', '64'], '--size takes H [W]'),
    (['--peers', 'resnet-50'], "argument --peers: invalid choice: 'resnet-50' (choose from "),
    (['--arch', 'micro', 'tiny'], '--arch takes one value without --peers'),
    (['--size', '64', '--size', '96'], '--size takes one value without --peers'),
    (['--steps', 'eval'], '--steps goes with --peers'),
    (['--profile'], '--profile goes with --peers'),
    (['--peers', '--profile', '--steps', 'eval'], '--profile profiles a training step on the CPU'),
])
def test_benchmark_rejects_bad_arguments(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _benchmark_module().parse_args(argv)
    assert exit_info.value.code == 2 and message in capsys.readouterr().err


def test_benchmark_peers_defaults():
    args = _benchmark_module().parse_args(['--peers'])
    assert args.peers == ['swin-t', 'pvtv2-b2', 'convnext-t']
    assert args.archs == ['micro', 'tiny'] and args.attn_impl == ['auto']
    assert args.sizes == [(512, 512), (800, 1344)] and args.batches == [1, 2]
    assert args.steps == ['eval', 'train']
    args = _benchmark_module().parse_args(['--size', '64', '48'])  # the per-impl mode: one size
    assert args.size == [64, 48] and args.arch == 'tiny' and args.batch == 1
