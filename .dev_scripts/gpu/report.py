# Copyright (c) transnext-mm contributors. All rights reserved.
"""``report.json`` of ``run_all.sh``: one entry per step, and the summary table.

    report.py step REPORT NAME RC SECONDS [--junit XML] [--sanitizer LOG] [--json FILE]
                   [--lines FILE] [--note TEXT]
    report.py summary REPORT

``step`` records a step's status (from its exit code) and what it produced: pytest's counts and
failed tests (``--junit``), compute-sanitizer's summary lines (``--sanitizer``), a JSON file
(``--json``, e.g. ``tools/benchmark.py --json``) or ``name: value`` lines (``--lines``, e.g.
``python -m transnext_mm.collect_env``). The report is rewritten after every step, so it holds
everything up to the last finished one. ``summary`` prints one row per step and stores the rows
under ``summary``; its exit status is 1 when a step failed or reached its time box.
"""
import argparse
import json
import os
import re
import sys
import xml.etree.ElementTree as ET

STATUS = {0: 'ok', 124: 'time box reached', 137: 'time box reached', 125: 'skipped'}


def load(path):
    if os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {'steps': {}}


def save(path, report):
    with open(f'{path}.tmp', 'w') as f:
        json.dump(report, f, indent=1)
    os.replace(f'{path}.tmp', path)


def junit_counts(path):
    root = ET.parse(path).getroot()
    suite = root if root.tag == 'testsuite' else root.find('testsuite')
    counts = {name: int(suite.get(name, 0)) for name in ('tests', 'failures', 'errors', 'skipped')}
    counts['passed'] = counts['tests'] - counts['failures'] - counts['errors'] - counts['skipped']
    counts['failed_tests'] = [
        f'{case.get("classname")}::{case.get("name")}: '
        f'{(case.find(tag).get("message") or "")[:300]}' for case in suite.iter('testcase')
        for tag in ('failure', 'error') if case.find(tag) is not None
    ][:30]
    return counts


def step(args):
    entry = {'status': STATUS.get(args.rc, f'failed (exit {args.rc})'), 'seconds': args.seconds}
    if args.note:
        entry['note'] = args.note
    if args.junit:
        entry['pytest'] = (
            junit_counts(args.junit)
            if os.path.exists(args.junit) else 'no junit xml: pytest did not finish')
    if args.sanitizer and os.path.exists(args.sanitizer):
        with open(args.sanitizer, errors='replace') as f:
            text = f.read()
        entry['sanitizer'] = re.findall(r'(?:ERROR|RACECHECK) SUMMARY: .*', text)
        entry['pytest_line'] = (re.findall(r'^=* ?\d+ (?:passed|failed).*$', text, re.M)
                                or [''])[-1].strip('= ')
    if args.json and os.path.exists(args.json):
        with open(args.json) as f:
            entry['result'] = json.load(f)
    if args.lines and os.path.exists(args.lines):
        with open(args.lines) as f:
            entry['result'] = dict(
                line.rstrip('\n').split(': ', 1) for line in f
                if ': ' in line and not line[0].isspace())
    report = load(args.report)
    report['steps'][args.name] = entry
    save(args.report, report)


def detail(name, entry):
    """What a step found, in a few words."""
    if isinstance(entry.get('pytest'), dict):
        c = entry['pytest']
        return (f'{c["passed"]} passed, {c["failures"] + c["errors"]} failed, '
                f'{c["skipped"]} skipped')
    if 'sanitizer' in entry:
        return '; '.join(entry['sanitizer'] + [entry['pytest_line']]) or 'no summary'
    result = entry.get('result')
    if isinstance(result, dict) and 'results' in result:  # tools/benchmark.py --json
        cells = []
        for r in result['results']:
            timing = r if 'median_s' in r else r.get('train', r.get('eval', {}))  # --peers
            cells.append(f'{r.get("impl", r.get("key"))} ' + (
                f'{timing["median_s"] * 1e3:.1f} ms' if 'median_s' in timing else 'failed'))
        return ', '.join(cells)
    if isinstance(result, dict):  # python -m transnext_mm.collect_env
        checks = {
            k[len('CUDA self-check '):]: v
            for k, v in result.items() if k.startswith('CUDA self-check ')
        }
        failed = [k for k, v in checks.items() if 'FAILED' in v]
        if failed:
            return f'self-check FAILED on {", ".join(failed)}'
        return (f'self-check passed on {", ".join(checks)}'
                if checks else f'self-check {result.get("CUDA self-check", "not reported")}')
    return entry.get('note', '')


def summary(path):
    report = load(path)
    rows = [(name, entry['status'], f'{entry["seconds"]} s', detail(name, entry))
            for name, entry in report['steps'].items()]
    widths = [max(len(row[i]) for row in rows + [('step', 'status', 'time', '')]) for i in range(3)]
    lines = [
        ' | '.join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + ' | ' + row[3]
        for row in [('step', 'status', 'time', 'result')] + rows
    ]
    report['summary'] = lines
    save(path, report)
    print('\n'.join(lines))
    return any(entry['status'].startswith(('failed', 'time box'))
               for entry in report['steps'].values())


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('step')
    p.add_argument('report')
    p.add_argument('name')
    p.add_argument('rc', type=int)
    p.add_argument('seconds', type=int)
    for option in ('--junit', '--sanitizer', '--json', '--lines', '--note'):
        p.add_argument(option)
    sub.add_parser('summary').add_argument('report')
    args = parser.parse_args()
    if args.command == 'step':
        step(args)
    elif summary(args.report):
        sys.exit(1)  # a step failed


if __name__ == '__main__':
    main()
