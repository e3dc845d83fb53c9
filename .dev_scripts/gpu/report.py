# Copyright (c) transnext-mm contributors. All rights reserved.
"""``report.json`` of the prepared GPU run: merge parts into it, describe the environment,
read pytest's and compute-sanitizer's results, judge the goals and print the summary.

Sections: ``environment``, ``tests``, ``parity``, ``benchmarks`` (and ``summary``). Every
command loads the report, changes one key and writes it back atomically, so the report is
complete up to the last finished step whenever the run stops.

Usage (from ``run_all.sh``)::

    report.py set REPORT KEY [--json TEXT | --file PART.json]
    report.py step REPORT NAME STATUS SECONDS [--log FILE]
    report.py environment REPORT
    report.py pytest REPORT JUNIT.xml SECONDS RC
    report.py sanitizer REPORT TOOL LOG SECONDS RC
    report.py summary REPORT
"""
import argparse
import json
import os
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET

from common import ROOT, write_json

SECTIONS = ('environment', 'tests', 'parity', 'benchmarks')


def load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {name: {} for name in SECTIONS}


def set_key(path, key, value):
    report = load(path)
    node = report
    *parents, last = key.split('.')
    for part in parents:
        node = node.setdefault(part, {})
    node[last] = value
    write_json(path, report)


def _run(cmd):
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        return (proc.stdout + proc.stderr).strip()
    except (OSError, subprocess.SubprocessError) as e:
        return f'unavailable ({type(e).__name__}: {e})'


def environment():
    from importlib import metadata
    info = {'python': sys.version.split()[0], 'executable': sys.executable,
            'platform': platform.platform(), 'cpu_count': os.cpu_count()}
    packages = {}
    for name in ('torch', 'triton', 'numpy', 'mmengine', 'mmcv-lite', 'mmcv', 'timm', 'pytest'):
        try:
            packages[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            packages[name] = None
    info['packages'] = packages
    import torch
    info['torch_cuda'] = torch.version.cuda
    info['cuda_available'] = torch.cuda.is_available()
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info['gpu'] = {'name': props.name, 'capability': f'{props.major}.{props.minor}',
                       'multiprocessors': props.multi_processor_count,
                       'memory_gib': round(props.total_memory / 2**30, 1),
                       'l2_mib': round(getattr(props, 'L2_cache_size', 0) / 2**20, 1)}
        info['nvidia_smi'] = _run(['nvidia-smi', '--query-gpu=name,driver_version,clocks.sm,'
                                   'clocks.max.sm,clocks.mem,power.limit,temperature.gpu',
                                   '--format=csv'])
    info['nvcc'] = _run(['nvcc', '--version']).splitlines()[-2:]
    try:
        import transnext_mm
        from transnext_mm.ops import dispatch
        ext = dispatch.compiled_ext()
        info['transnext_mm'] = transnext_mm.__file__
        info['ext'] = {'built': dispatch.BUILD.built, 'with_cuda': dispatch.BUILD.cuda,
                       'import_error': dispatch.BUILD.error or None}
        if ext is not None:
            info['ext']['file'] = ext.__file__
            if dispatch.BUILD.cuda:
                elf = _run(['cuobjdump', '--list-elf', ext.__file__])
                info['ext']['cubin_archs'] = sorted(set(re.findall(r'sm_\d+a?', elf)))
    except Exception as e:  # noqa: BLE001 -- recorded: the run goes on without the package
        info['transnext_mm'] = f'import failed: {type(e).__name__}: {e}'
    return info


def pytest_results(junit, seconds, rc):
    result = {'seconds': float(seconds), 'exit_code': int(rc)}
    if not os.path.exists(junit):
        result['error'] = 'no junit xml (pytest did not finish: time box or crash)'
        return result
    root = ET.parse(junit).getroot()
    suite = root if root.tag == 'testsuite' else root.find('testsuite')
    for name in ('tests', 'failures', 'errors', 'skipped'):
        result[name] = int(suite.get(name, 0))
    result['passed'] = result['tests'] - result['failures'] - result['errors'] - result['skipped']
    failed, skip_reasons = [], {}
    for case in suite.iter('testcase'):
        name = f'{case.get("classname")}::{case.get("name")}'
        for tag in ('failure', 'error'):
            node = case.find(tag)
            if node is not None:
                failed.append({'test': name, 'message': (node.get('message') or '')[:500]})
        node = case.find('skipped')
        if node is not None:
            reason = (node.get('message') or '')[:120]
            skip_reasons[reason] = skip_reasons.get(reason, 0) + 1
    result['failed_tests'] = failed[:50]
    result['skip_reasons'] = skip_reasons
    return result


def sanitizer_results(log, seconds, rc):
    text = open(log, errors='replace').read() if os.path.exists(log) else ''
    result = {'seconds': float(seconds), 'exit_code': int(rc)}
    summary = re.findall(r'ERROR SUMMARY: (\d+) error', text)
    refused = re.search(r'(Device not supported|not supported on this|Unable to|'
                        r'error 999|Target application returned an error|'
                        r'unrecognized option|Unknown option)[^\n]*', text, re.I)
    if summary:
        result['errors'] = sum(int(n) for n in summary)
        result['pass'] = result['errors'] == 0 and int(rc) == 0
    elif int(rc) in (124, 137):
        result['status'] = 'time box reached'
    elif refused:
        result['status'] = f'refused or failed: {refused.group(0)[:300]}'
    result['log_tail'] = text[-3000:]
    return result


# ------------------------------------------------------------------------------------ goals
def _get(d, *keys):
    for key in keys:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def _ratio(a, b):
    return round(a / b, 3) if a and b else None


def goals(report):
    """Each performance goal with the measured value, the target and whether it is met."""
    core = _get(report, 'benchmarks', 'core') or {}
    flex = _get(report, 'benchmarks', 'flex') or {}
    out = []

    def goal(name, value, target, ok):
        out.append({'goal': name, 'value': value, 'target': target,
                    'met': None if value is None else bool(ok)})

    copy_bw = _get(core, 'copy_bandwidth', 'gbytes_per_s')
    for size, impls in (core.get('layers') or {}).items():
        total = {(impl, mode): _get(impls, impl, mode, 'total_ms_19_layers')
                 for impl in ('reference', 'torch', 'op') for mode in ('fwd', 'fwd_bwd')}
        for mode, target in (('fwd', 6), ('fwd_bwd', 4)):
            r = _ratio(total['reference', mode], total['op', mode])
            goal(f'layers {size} {mode}: op vs unfold reference', r, f'>= {target}x',
                 r is not None and r >= target)
            r = _ratio(total['torch', mode], total['op', mode])
            goal(f'layers {size} {mode}: op vs torch path', r, '>= 2x', r is not None and r >= 2)
            flex_ms = _get(flex, 'layers', size, 'flex', mode, 'total_ms_19_layers')
            r = _ratio(flex_ms, total['op', mode])
            goal(f'layers {size} {mode}: flex time / op time (info: >1 means op wins)', r,
                 'info', True)
        stages = _get(impls, 'op', 'fwd', 'stages') or []
        if copy_bw and len(stages) >= 2:
            frac = round(min(s['gbytes_per_s'] for s in stages[:2]) / copy_bw, 3)
            goal(f'layers {size} fwd: op bandwidth, stages 1-2, fraction of copy', frac,
                 '>= 0.5', frac >= 0.5)
    for size, models in (core.get('backbone_train') or {}).items():
        op = _get(models, 'op', 'median_ms')
        r = _ratio(_get(models, 'reference-nocache', 'median_ms'), op)
        goal(f'train step {size}: op vs unfold reference (no cache)', r, '>= 2x',
             r is not None and r >= 2)
        for timm_name in ('pvt_v2_b2', 'swin_tiny_patch4_window7_224'):
            r = _ratio(op, _get(models, timm_name, 'median_ms'))
            goal(f'train step {size}: op time / {timm_name} time', r, '<= 1.3',
                 r is not None and r <= 1.3)
        ref_mem = _get(models, 'reference-nocache', 'peak_mem_mib')
        op_mem = _get(models, 'op', 'peak_mem_mib')
        r = _ratio(op_mem, ref_mem)
        goal(f'train step {size}: op peak memory / reference peak memory', r, '<= 0.75',
             r is not None and r <= 0.75)
    for size, models in (core.get('inference') or {}).items():
        r = _ratio(_get(models, 'reference-nocache', 'median_ms'), _get(models, 'op', 'median_ms'))
        goal(f'inference {size}: op vs unfold reference (no cache)', r, '>= 3x',
             r is not None and r >= 3)
    for size, modes in (core.get('with_cp') or {}).items():
        r = _ratio(_get(modes, 'on', 'peak_mem_mib'), _get(modes, 'off', 'peak_mem_mib'))
        goal(f'with_cp {size}: peak memory on / off', r, '< 1', r is not None and r < 1)
    for size, modes in (core.get('amp_train') or {}).items():
        for dtype, res in modes.items():
            if isinstance(res, dict) and 'pass' in res:
                goal(f'AMP train step {size} {dtype}: finite loss and weights', res['pass'],
                     'True', res['pass'])
    compile_part = _get(report, 'benchmarks', 'compile', 'compile') or {}
    for size, modes in compile_part.items():
        if isinstance(modes, dict):
            r = _ratio(_get(modes, 'eager', 'median_ms'), _get(modes, 'compiled', 'median_ms'))
            goal(f'inference {size}: torch.compile speed-up over eager (info)', r, 'info', True)
    return out


def count_checks(node, results=None, prefix=''):
    """(passed, failed, errored) names of every check with a ``pass`` or ``error`` key."""
    results = results if results is not None else ([], [], [])
    if isinstance(node, dict):
        if 'error' in node and 'traceback' in node:
            results[2].append(prefix)
        elif node.get('pass') is True:
            results[0].append(prefix)
        elif node.get('pass') is False:
            results[1].append(prefix)
        else:
            for key, value in node.items():
                count_checks(value, results, f'{prefix}.{key}' if prefix else key)
    return results


def summary(path):
    report = load(path)
    lines = []
    env = report.get('environment', {})
    system = env.get('system', {})
    gpu = _get(system, 'gpu', 'name') or 'no GPU'
    lines.append(f'== transnext-mm GPU run ({"dry run, CPU" if env.get("dry_run") else gpu}) '
                 f'torch {_get(system, "packages", "torch")}, python {system.get("python")}')
    for name, step in (env.get('steps') or {}).items():
        lines.append(f'  step {name:<10} {step.get("status")} ({step.get("seconds")} s)')
    ext = system.get('ext') or {}
    lines.append(f'  _ext built={ext.get("built")} with_cuda={ext.get("with_cuda")} '
                 f'archs={ext.get("cubin_archs")}')
    tests = report.get('tests', {})
    pt = tests.get('pytest') or {}
    lines.append(f'== tests: pytest passed={pt.get("passed")} failed={pt.get("failures")} '
                 f'errors={pt.get("errors")} skipped={pt.get("skipped")} '
                 f'({pt.get("seconds")} s){" " + pt["error"] if "error" in pt else ""}')
    for f in pt.get('failed_tests', [])[:10]:
        lines.append(f'  FAILED {f["test"]}')
    for tool, res in (tests.get('sanitizer') or {}).items():
        if not isinstance(res, dict):
            lines.append(f'  sanitizer {tool}: {res}')
            continue
        state = (f'errors={res["errors"]}' if 'errors' in res else
                 res.get('status') or res.get('skipped') or f'rc={res.get("exit_code")}')
        lines.append(f'  sanitizer {tool:<10} {state}')
    passed, failed, errored = count_checks(report.get('parity', {}))
    lines.append(f'== parity: {len(passed)} passed, {len(failed)} failed, '
                 f'{len(errored)} errored')
    for name in failed + errored:
        lines.append(f'  {"FAILED" if name in failed else "ERROR "} {name}')
    table = goals(report)
    report.setdefault('benchmarks', {})['goals'] = table
    _, _, bench_errors = count_checks(report.get('benchmarks', {}))
    lines.append(f'== benchmarks: {len(table)} goal rows, {len(bench_errors)} measurements '
                 f'errored; copy bandwidth '
                 f'{_get(report, "benchmarks", "core", "copy_bandwidth", "gbytes_per_s")} GB/s')
    for name in bench_errors:
        lines.append(f'  ERROR  {name}')
    for row in table:
        mark = {True: 'met', False: 'MISSED', None: 'n/a'}[row['met']]
        if row['target'] == 'info':
            mark = 'info'
        lines.append(f'  {mark:<6} {row["goal"]}: {row["value"]} (goal {row["target"]})')
    report['summary'] = lines
    write_json(path, report)
    print('\n'.join(lines))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='cmd', required=True)
    p = sub.add_parser('set')
    p.add_argument('report')
    p.add_argument('key')
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument('--json')
    group.add_argument('--file')
    p = sub.add_parser('step')
    p.add_argument('report')
    p.add_argument('name')
    p.add_argument('status')
    p.add_argument('seconds')
    p.add_argument('--log', default=None, help='keep the last 3000 characters of this file')
    p = sub.add_parser('environment')
    p.add_argument('report')
    p = sub.add_parser('pytest')
    p.add_argument('report')
    p.add_argument('junit')
    p.add_argument('seconds')
    p.add_argument('rc')
    p = sub.add_parser('sanitizer')
    p.add_argument('report')
    p.add_argument('tool')
    p.add_argument('log')
    p.add_argument('seconds')
    p.add_argument('rc')
    p = sub.add_parser('summary')
    p.add_argument('report')
    args = parser.parse_args()
    if args.cmd == 'set':
        if args.file:
            if os.path.exists(args.file):
                with open(args.file) as f:
                    value = json.load(f)
            else:
                value = {'error': f'{os.path.basename(args.file)} was not written '
                                  '(the driver failed before its first result)',
                         'traceback': []}
        else:
            value = json.loads(args.json)
        set_key(args.report, args.key, value)
    elif args.cmd == 'step':
        step = {'status': args.status, 'seconds': float(args.seconds)}
        if args.log and os.path.exists(args.log):
            step['log_tail'] = open(args.log, errors='replace').read()[-3000:]
        set_key(args.report, f'environment.steps.{args.name}', step)
    elif args.cmd == 'environment':
        set_key(args.report, 'environment.system', environment())
    elif args.cmd == 'pytest':
        set_key(args.report, 'tests.pytest', pytest_results(args.junit, args.seconds, args.rc))
    elif args.cmd == 'sanitizer':
        set_key(args.report, f'tests.sanitizer.{args.tool}',
                sanitizer_results(args.log, args.seconds, args.rc))
    else:
        summary(args.report)


if __name__ == '__main__':
    sys.path.insert(0, ROOT)
    main()
