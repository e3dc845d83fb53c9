# Copyright (c) transnext-mm contributors. All rights reserved.
"""The one dispatch rule (transnext_mm.ops.dispatch) for the attention core, the full attention,
the cosine-attention inputs and the ConvGLU gate (and its strips), and the import structure of
transnext_mm.ops."""
import ast
import os
import os.path as osp
import warnings

import pytest
import torch

from transnext_mm.ops import dispatch
from transnext_mm.ops.dispatch import Build, choose, select

CPU, CUDA, META = torch.device('cpu'), torch.device('cuda'), torch.device('meta')
F16, F32, F64, BF16 = torch.float16, torch.float32, torch.float64, torch.bfloat16
FULL = Build(built=True, cuda=True)
CPU_ONLY = Build(built=True, cuda=False)
NONE = Build(built=False, cuda=False, error='No module named transnext_mm._ext')

# (kernel, impl, device, dtype, needs_grad, autocast, build) -> (impl run, fallback, reason part)
RULES = [
    # the attention core: compiled wherever it has kernels, forward and backward
    ('attention', 'auto', CPU, F32, True, False, CPU_ONLY, 'op', False, 'cpu kernels'),
    ('attention', 'auto', CPU, BF16, False, False, CPU_ONLY, 'op', False, 'cpu kernels'),
    ('attention', 'op', CUDA, F16, True, True, FULL, 'op', False, 'cuda kernels'),
    ('attention', 'auto', CUDA, F64, False, False, FULL, 'torch', True, 'no cuda kernel for'),
    ('attention', 'auto', CUDA, F32, False, False, CPU_ONLY, 'torch', True, 'without CUDA'),
    ('attention', 'auto', META, F32, False, False, FULL, 'torch', True, "device 'meta'"),
    ('attention', 'auto', CPU, torch.int32, False, False, FULL, 'torch', True, 'no cpu kernel'),
    ('attention', 'auto', CPU, F32, False, False, NONE, 'torch', True, 'not built'),
    ('attention', 'torch', CPU, F32, False, False, FULL, 'torch', False, "impl='torch'"),
    ('attention', 'reference', CUDA, F32, True, False, FULL, 'reference', False, 'unfold'),
    # the full attention: explicit scores for 'reference', PyTorch's SDPA for the rest
    ('full_attention', 'reference', CPU, F32, True, False, FULL, 'reference', False, 'explicit'),
    ('full_attention', 'reference', CUDA, F16, False, True, NONE, 'reference', False, 'explicit'),
    ('full_attention', 'auto', CPU, F32, False, False, FULL, 'torch', False,
     'scaled_dot_product_attention'),
    ('full_attention', 'op', CUDA, BF16, True, True, FULL, 'torch', False, 'no compiled kernel'),
    ('full_attention', 'auto', CPU, F32, False, False, NONE, 'torch', False, 'no compiled kernel'),
    ('full_attention', 'torch', CPU, F64, True, False, CPU_ONLY, 'torch', False, "impl='torch'"),
    # the CPU kernels (inference and training): PyTorch by design outside CPU fp32/fp64
    ('cosine_qk', 'auto', CPU, F32, False, False, CPU_ONLY, 'op', False, 'cpu inference'),
    ('conv_glu_gate', 'op', CPU, F64, False, False, CPU_ONLY, 'op', False, 'cpu inference'),
    ('conv_glu_gate', 'auto', CPU, F32, True, False, CPU_ONLY, 'op', False, 'cpu training'),
    ('conv_glu_gate', 'auto', CUDA, F32, True, False, FULL, 'torch', False, "PyTorch's own cuda"),
    ('cosine_qk', 'auto', CPU, F64, True, False, FULL, 'op', False, 'cpu training'),
    ('conv_glu_gate', 'op', CUDA, F32, False, False, FULL, 'torch', False, "PyTorch's own cuda"),
    ('conv_glu_gate', 'auto', CPU, BF16, False, False, FULL, 'torch', False, 'got torch.bfloat16'),
    ('cosine_qk', 'auto', CPU, F32, False, True, FULL, 'torch', False, 'got autocast'),
    ('cosine_qk', 'reference', CPU, F32, False, False, FULL, 'torch', False, "impl='reference'"),
    ('conv_glu_gate', 'auto', CPU, F32, False, False, NONE, 'torch', True, 'not built'),
    ('conv_glu_gate', 'auto', CUDA, F32, False, False, NONE, 'torch', False, "PyTorch's own"),
]


@pytest.mark.parametrize('kernel,impl,device,dtype,grad,autocast,build,run,fallback,why', RULES)
def test_rule(kernel, impl, device, dtype, grad, autocast, build, run, fallback, why):
    choice = choose(kernel, impl, device, dtype, needs_grad=grad, autocast=autocast, build=build)
    assert (choice.impl, choice.fallback) == (run, fallback), choice
    assert why in choice.reason


def test_bad_arguments_name_the_allowed_values():
    with pytest.raises(ValueError, match="impl must be one of .*'auto'.*got 'fast'"):
        choose('attention', 'fast', CPU, F32)
    with pytest.raises(ValueError, match="kernel must be one of .*'conv_glu_gate'.*got 'gelu'"):
        choose('gelu', 'auto', CPU, F32)


def test_select_reads_the_gradient_state_and_autocast():
    x, w = torch.randn(2, 3), torch.randn(3, requires_grad=True)
    assert select('cosine_qk', 'auto', x, (w, ), build=CPU_ONLY) == 'op'  # training
    assert select('cosine_qk', 'auto', x.half(), (w, ), build=CPU_ONLY) == 'torch'
    with torch.no_grad():
        assert select('cosine_qk', 'auto', x, (w, ), build=CPU_ONLY) == 'op'
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert select('conv_glu_gate', 'auto', x, build=CPU_ONLY) == 'torch'
            assert select('attention', 'auto', x, build=CPU_ONLY) == 'op'  # computes in bf16


def test_one_warning_per_reason_and_op_raises(monkeypatch):
    monkeypatch.setattr(dispatch, '_warned', set())
    x = torch.randn(2, 3)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter('always')
        with torch.no_grad():
            for _ in range(3):  # every kernel, several layers: one shared reason, one warning
                for kernel in dispatch.KERNELS:
                    assert select(kernel, 'auto', x, build=NONE) == 'torch'
        for _ in range(2):
            select('attention', 'auto', x.to('meta'), build=FULL)  # another reason
            select('attention', 'auto', torch.zeros(2, dtype=torch.int32), build=FULL)  # and one
    messages = [str(w.message) for w in caught]
    assert len(messages) == 3, messages
    assert 'not built' in messages[0] and 'is falling back to the slower PyTorch' in messages[0]
    assert "device 'meta'" in messages[1] and 'no cpu kernel for torch.int32' in messages[2]
    with pytest.raises(RuntimeError, match="impl='op'.* but the compiled kernels .* not built"):
        select('conv_glu_gate', 'op', x, build=NONE)
    with pytest.raises(RuntimeError, match="impl='op'.* but .*no cpu kernel for torch.int32"):
        select('attention', 'op', torch.zeros(2, dtype=torch.int32), build=FULL)


ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
OPS = 'transnext_mm.ops'


def test_full_attention_never_falls_back():
    """No compiled kernel to miss: 'op' neither warns nor raises, whatever was built."""
    x = torch.randn(2, 3, requires_grad=True)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        for impl, expected in (('op', 'torch'), ('auto', 'torch'), ('reference', 'reference')):
            for build in (FULL, NONE):
                assert select('full_attention', impl, x, build=build) == expected


def conv_glu_input(B=2, height=7, width=5, channels=12, dtype=torch.float32):
    return torch.randn(B, height * width, channels, dtype=dtype)


@pytest.mark.parametrize('budget_rows,expected', [(1, 1), (3, 3), (6, 6), (7, 7), (100, 7)])
def test_conv_glu_strips_fill_the_byte_budget(monkeypatch, budget_rows, expected):
    """Inference with the compiled gate: strips of the most rows whose fc1 output (B x width x
    hidden channels) fits in CONV_GLU_STRIP_BYTES, at least one row, at most the map."""
    x = conv_glu_input()
    row_bytes = 2 * 5 * 24 * 4
    monkeypatch.setattr(dispatch, 'CONV_GLU_STRIP_BYTES', budget_rows * row_bytes + row_bytes - 1)
    with torch.no_grad():
        assert dispatch.conv_glu_strip_rows('auto', x, (), 7, 5, 24, build=CPU_ONLY) == expected
    monkeypatch.setattr(dispatch, 'CONV_GLU_STRIP_BYTES', 0)  # less than a row: one row
    with torch.no_grad():
        assert dispatch.conv_glu_strip_rows('op', x, (), 7, 5, 24, build=CPU_ONLY) == 1


def test_conv_glu_runs_whole_maps_where_pytorch_runs_the_gate(monkeypatch):
    """One pass over the map (rows = height) in training (the compiled gate, whose backward
    needs every strip's fc1 output anyway) and wherever PyTorch runs the gate: impl='torch' /
    'reference', bf16, CUDA, autocast, or a missing build (which warns)."""
    monkeypatch.setattr(dispatch, 'CONV_GLU_STRIP_BYTES', 1)  # one-row strips if it applied
    monkeypatch.setattr(dispatch, '_warned', set())
    x, w = conv_glu_input(), torch.randn(3, requires_grad=True)
    assert dispatch.conv_glu_strip_rows('auto', x, (w, ), 7, 5, 24, build=CPU_ONLY) == 7
    with torch.no_grad():
        for impl in ('torch', 'reference'):
            assert dispatch.conv_glu_strip_rows(impl, x, (w, ), 7, 5, 24, build=CPU_ONLY) == 7
        bf16 = conv_glu_input(dtype=BF16)
        assert dispatch.conv_glu_strip_rows('auto', bf16, (), 7, 5, 24, build=CPU_ONLY) == 7
        assert dispatch.conv_glu_strip_rows('auto', x.to(META), (), 7, 5, 24, build=FULL) == 7
        with torch.autocast('cpu', dtype=torch.bfloat16):
            assert dispatch.conv_glu_strip_rows('auto', x, (), 7, 5, 24, build=CPU_ONLY) == 7
        with pytest.warns(UserWarning, match='not built'):
            assert dispatch.conv_glu_strip_rows('auto', x, (), 7, 5, 24, build=NONE) == 7
        with pytest.raises(RuntimeError, match='not built'):
            dispatch.conv_glu_strip_rows('op', x, (), 7, 5, 24, build=NONE)


def _ops_modules():
    """{dotted name under transnext_mm.ops: path} of every module of the ops package (a
    subpackage under its own name, e.g. 'aggregated_attention' and 'aggregated_attention.op')."""
    ops_dir = osp.dirname(dispatch.__file__)
    modules = {}
    for folder, _, files in os.walk(ops_dir):
        package = osp.relpath(folder, ops_dir).replace(os.sep, '.').lstrip('.')
        for name in files:
            if name.endswith('.py'):
                module = package if name == '__init__.py' else '.'.join(
                    filter(None, [package, name[:-3]]))
                modules[module] = osp.join(folder, name)
    return modules


def _imported_modules(node, module, is_package):
    """Absolute dotted names that an import statement of ``module`` (its name under
    transnext_mm, '' for transnext_mm itself) refers to: ``from a import b`` names both ``a`` and
    ``a.b`` (``b`` may be a submodule)."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    base = node.module or ''
    if node.level:
        parts = f'transnext_mm.{module}'.rstrip('.').split('.')
        parts = parts if is_package else parts[:-1]
        parts = parts[:len(parts) - node.level + 1]
        base = '.'.join(parts + ([base] if base else []))
    return [base] + [f'{base}.{a.name}' for a in node.names]


def test_ops_modules_form_no_import_cycle():
    modules = _ops_modules()
    graph = {}
    for module, path in modules.items():
        targets = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                for name in _imported_modules(node, f'ops.{module}' if module else 'ops',
                                              path.endswith('__init__.py')):
                    if name.startswith(OPS + '.') and name[len(OPS) + 1:] in modules:
                        targets.add(name[len(OPS) + 1:])
        graph[module] = targets - {module}
    assert graph['dispatch'] == set(), 'dispatch.py decides; it imports no other ops module'
    assert 'aggregated_attention.op' in graph and 'aggregated_attention.replay' in graph

    def reaches(start, target, seen=()):
        return any(n == target or (n not in seen and reaches(n, target, seen + (n, )))
                   for n in graph[start])

    cycles = [m for m in graph if reaches(m, m)]
    assert not cycles, f'import cycle through {cycles}: {graph}'


# The one module that loads each compiled extension.
EXTENSION_OWNERS = {
    'transnext_mm._ext': 'transnext_mm/ops/dispatch.py',
    'transnext_mm._ext_replay': 'transnext_mm/ops/aggregated_attention/replay.py',
}


def test_no_module_imports_private_names_of_another():
    """Private names stay in their module: a name that others need is public in its owner
    (e.g. dispatch.compiled_ext()); only the owner of a compiled extension imports it."""
    offenders = []
    for top in ('transnext_mm', 'tools', 'tests', '.dev_scripts'):
        for folder, _, files in os.walk(osp.join(ROOT, top)):
            for name in files:
                if not name.endswith('.py'):
                    continue
                path = osp.join(folder, name)
                rel = osp.relpath(path, ROOT).replace(os.sep, '/')
                parts = rel[:-3].split('/')
                is_package = parts[-1] == '__init__'
                module = '.'.join(parts[1:-1] if is_package else parts[1:])
                for node in ast.walk(ast.parse(open(path).read())):
                    if not isinstance(node, (ast.Import, ast.ImportFrom)):
                        continue
                    if isinstance(node, ast.ImportFrom) and node.level and top != 'transnext_mm':
                        continue  # relative imports outside the package: not ours
                    names = _imported_modules(node, module, is_package)
                    for full in names[1:] if isinstance(node, ast.ImportFrom) else names:
                        if not full.startswith('transnext_mm'):
                            continue
                        private = [
                            p for p in full.split('.')
                            if p.startswith('_') and not p.startswith('__')
                        ]
                        if private and EXTENSION_OWNERS.get(full) != rel:
                            offenders.append(f'{rel}:{node.lineno} imports {full}')
    assert not offenders, offenders
