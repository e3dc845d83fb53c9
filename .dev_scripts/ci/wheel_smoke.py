# Copyright (c) transnext-mm contributors. All rights reserved.
"""Smoke test of an installed transnext-mm wheel (run by .dev_scripts/ci/wheel_smoke.sh).

Runs outside the checkout, in the environment the wheel was installed into, and checks: the
sdist holds what a build needs; the wheel holds the compiled op and the ``.mim`` folder, and not
the tests' CPU replay of the CUDA kernels (no ``_ext_replay``, no replay symbols in ``_ext``); the
installed package (not the checkout) is imported; ``_ext`` is present; a backbone forward with
the compiled op equals the reference path; shipped configs are found under ``.mim`` and built;
``mim search`` lists the models; ``mim train`` and ``mim test`` run a shipped config by name.
"""
import argparse
import os
import os.path as osp
import re
import shutil
import subprocess
import sys
import tarfile
import zipfile

SDIST_NEEDS = [
    'setup.py', 'MANIFEST.in', 'README.md', 'model-index.yml', 'requirements/runtime.txt',
    'requirements/toolboxes.txt', 'ops/csrc/pytorch/pybind.cpp',
    'ops/csrc/common/aggregated_attention_geometry.h',
    'ops/csrc/common/cuda/aggregated_attention_blocks.cuh',
    'ops/csrc/common/cuda/aggregated_attention_launch.cuh',
    'ops/csrc/common/cuda/aggregated_attention_thread.cuh',
    'ops/csrc/pytorch/cpu/aggregated_attention_cpu.cpp',
    'ops/csrc/pytorch/cuda/aggregated_attention_kernels.cu',
    'ops/csrc/pytorch/cuda/aggregated_attention_glue.h',
    'ops/csrc/replay/aggregated_attention_cuda_replay.cpp', 'configs/mask-rcnn/metafile.yml',
    'configs/mask-rcnn/README.md', 'configs/_base_/models/mask-rcnn_transnext_fpn.py',
    'tools/train.py', 'tools/dataset_converters/make_synthetic_coco.py', 'transnext_mm/__init__.py'
]
WHEEL_NEEDS = [
    'transnext_mm/.mim/model-index.yml', 'transnext_mm/.mim/configs/dino/metafile.yml',
    'transnext_mm/.mim/configs/_base_/schedules/det_adamw_1x.py',
    'transnext_mm/.mim/tools/train.py', 'transnext_mm/.mim/tools/test.py',
    'transnext_mm/.mim/tools/dist_train.sh', 'transnext_mm/collect_env.py'
]
DEMO = 'mask-rcnn_transnext-micro_fpn_synthetic-coco.py'
# Repository scripts that must not ship as tools of the package (.mim/tools holds user tools).
DEV_TOOLS = ('setup_env.sh', 'run_tests.sh', 'check_cuda_build.sh', 'ci', 'gpu', 'run_demo.sh')
# The bindings of the tests' CPU replay of the CUDA kernels (transnext_mm._ext_replay), and a
# class of its code: none may be in the shipped _ext.
REPLAY_NAMES = ('aggregated_attention_forward_replay', 'aggregated_attention_backward_replay',
                'aggregated_attention_launch_plans', 'cuda_replay_selftest',
                'pool_grad_target_blocks', 'FiberBlock')


def check(condition, message):
    if not condition:
        sys.exit(f'[wheel_smoke] FAILED: {message}')


def run(cmd, timeout=600):
    print('[wheel_smoke] $', ' '.join(cmd), flush=True)
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    output = result.stdout + result.stderr
    check(result.returncode == 0, f'{cmd} exited with {result.returncode}:\n{output[-4000:]}')
    return output


def check_archives(sdist, wheel):
    with tarfile.open(sdist) as tar:
        names = tar.getnames()
    prefix = names[0].split('/')[0] + '/'
    files = {n[len(prefix):] for n in names if n.startswith(prefix)}
    missing = [f for f in SDIST_NEEDS if f not in files]
    check(not missing, f'the sdist lacks {missing}')
    check(not any('.mim' in f or f.endswith('.so') for f in files),
          'the sdist holds build outputs (.mim or .so)')
    with zipfile.ZipFile(wheel) as whl:
        wheel_files = set(whl.namelist())
    missing = [f for f in WHEEL_NEEDS if f not in wheel_files]
    check(not missing, f'the wheel lacks {missing}')
    check(
        any(re.match(r'transnext_mm/_ext\..*\.so$', f) for f in wheel_files),
        'the wheel holds no compiled transnext_mm/_ext*.so')
    tools = sorted(f[len('transnext_mm/.mim/tools/'):] for f in wheel_files
                   if f.startswith('transnext_mm/.mim/tools/'))
    dev = [f for f in tools if f.split('/')[0] in DEV_TOOLS]
    check(not dev, f'the wheel ships developer or CI scripts under .mim/tools: {dev}')
    replay = [f for f in wheel_files if '_ext_replay' in f]
    check(not replay, f'the wheel ships the tests\' CPU replay of the CUDA kernels: {replay}')
    configs = [f for f in files if f.startswith('configs/') and f.endswith('.py')]
    shipped = [
        f for f in wheel_files if f.startswith('transnext_mm/.mim/configs/') and f.endswith('.py')
    ]
    check(
        len(configs) == len(shipped), f'{len(configs)} configs in the sdist, '
        f'{len(shipped)} under .mim in the wheel')
    print(f'[wheel_smoke] sdist {len(files)} files, wheel {len(wheel_files)} files '
          f'({len(shipped)} configs under .mim)')


def replay_symbols(library):
    """What of the CPU replay the library holds: dynamic symbols that name it (``nm -DC``) and
    its names anywhere in the file (bindings, symbol table, debug information)."""
    found = []
    nm = shutil.which('nm')
    if nm:
        symbols = subprocess.run([nm, '-DC', library], capture_output=True, text=True).stdout
        found += [line for line in symbols.splitlines() if 'replay' in line.lower()]
    with open(library, 'rb') as f:
        data = f.read()
    return found + [name for name in REPLAY_NAMES if name.encode() in data]


def check_installed(checkout):
    import torch

    import transnext_mm
    from transnext_mm.ops.dispatch import BUILD, compiled_ext
    ext = compiled_ext()
    check(ext is not None, f'transnext_mm._ext does not import: {BUILD.error}')
    package = osp.dirname(osp.realpath(transnext_mm.__file__))
    check(not package.startswith(osp.realpath(checkout)),
          f'transnext_mm was imported from the checkout ({package})')
    check(osp.dirname(ext.__file__) == package, f'_ext at {ext.__file__}')
    replay = replay_symbols(ext.__file__)
    check(not replay, f'{ext.__file__} holds the CPU replay of the CUDA kernels: {replay[:10]}')
    check(not any(name.startswith('_ext_replay') for name in os.listdir(package)),
          'the installed package holds transnext_mm._ext_replay')
    mim = osp.join(package, '.mim')
    check(
        osp.isfile(osp.join(mim, 'model-index.yml')) and not osp.islink(osp.join(mim, 'configs')),
        f'{mim} lacks model-index.yml or holds links instead of copies')
    print(f'[wheel_smoke] transnext_mm {transnext_mm.__version__} from {package}; _ext '
          f'with_cuda={ext.with_cuda}')

    from transnext_mm.models.backbones import TransNeXt
    torch.manual_seed(0)
    x = torch.randn(2, 3, 61, 75)
    op = TransNeXt(arch='micro', attn_impl='op').eval()
    reference = TransNeXt(arch='micro', attn_impl='reference').eval()
    reference.load_state_dict(op.state_dict())
    with torch.no_grad():
        for a, b in zip(op(x), reference(x)):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    print('[wheel_smoke] backbone forward with the compiled op equals the reference path')

    from mmengine.config import Config
    from mmengine.registry import init_default_scope
    for config, scope in [('mask-rcnn/mask-rcnn_transnext-tiny_fpn_1x_coco.py', 'mmdet'),
                          ('upernet/upernet_transnext-tiny_8xb2-160k_ade20k-512x512.py', 'mmseg'),
                          ('classification/transnext-tiny_in1k-224px.py', 'mmpretrain')]:
        cfg = Config.fromfile(osp.join(mim, 'configs', config))
        init_default_scope(scope)
        from mmengine.registry import MODELS
        model = MODELS.build(cfg.model)
        check(type(model.backbone).__name__ == 'TransNeXt', f'{config} built {type(model)}')
        print(f'[wheel_smoke] built {config} from .mim ({type(model).__name__})')
    return package


def check_mim(work):
    out = run([sys.executable, '-m', 'mim', 'search', 'transnext_mm'])
    names = re.findall(r'^config id: (\S+)', out, flags=re.M)
    print(out[-2500:])
    check('mask-rcnn_transnext-tiny_fpn_1x_coco' in names and 'transnext-tiny_in1k-224px' in names,
          'mim search transnext_mm does not list the models')
    print(f'[wheel_smoke] mim search lists models, e.g. {names[:3]}')

    import transnext_mm
    tools = osp.join(osp.dirname(transnext_mm.__file__), '.mim', 'tools')
    run([
        sys.executable,
        osp.join(tools, 'dataset_converters', 'make_synthetic_coco.py'), '--num-train', '4',
        '--num-val', '2'
    ])
    options = [
        'train_cfg.max_epochs=1', 'train_dataloader.batch_size=2', 'train_dataloader.num_workers=0',
        'val_dataloader.num_workers=0', 'test_dataloader.num_workers=0',
        'default_hooks.logger.interval=1'
    ]
    out = run([
        sys.executable, '-m', 'mim', 'train', 'transnext_mm', DEMO, '--work-dir',
        osp.join(work, 'mim_train'), '--cfg-options', *options
    ])
    checkpoint = osp.join(work, 'mim_train', 'epoch_1.pth')
    check(osp.isfile(checkpoint), f'mim train wrote no {checkpoint}:\n{out[-3000:]}')
    # By path this time: the shipped copy under .mim.
    config = osp.join(osp.dirname(tools), 'configs', 'demo', DEMO)
    out = run([
        sys.executable, '-m', 'mim', 'test', 'transnext_mm', config, '--checkpoint', checkpoint,
        '--work-dir',
        osp.join(work, 'mim_test'), '--cfg-options', 'test_dataloader.num_workers=0'
    ])
    check('coco/bbox_mAP' in out and 'coco/segm_mAP' in out, f'mim test:\n{out[-3000:]}')
    print('[wheel_smoke] mim train ran the shipped demo config by name, mim test by path')


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('--sdist', required=True)
    parser.add_argument('--wheel', required=True)
    parser.add_argument('--checkout', required=True, help='the repository, never imported')
    args = parser.parse_args()
    check(
        osp.realpath(args.checkout) not in [osp.realpath(p or '.') for p in sys.path],
        'the checkout is on sys.path')
    check_archives(args.sdist, args.wheel)
    check_installed(args.checkout)
    check_mim(os.getcwd())
    run([sys.executable, '-m', 'transnext_mm.collect_env'])
    print('[wheel_smoke] all checks passed')


if __name__ == '__main__':
    main()
