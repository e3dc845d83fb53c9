"""The model index (model-index.yml -> configs/*/metafile.yml) lists exactly the shipped configs,
each with the paper's results, and every method folder documents them."""
import glob
import os.path as osp

import pytest
import yaml

ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
# Configs that are not models of the paper: bases and the synthetic-data demos.
NOT_INDEXED = ('_base_', 'demo')
HF = 'https://huggingface.co/DaiShiResearch/'


def load_index():
    with open(osp.join(ROOT, 'model-index.yml')) as f:
        index = yaml.safe_load(f)
    models, collections = [], []
    for metafile in index['Import']:
        assert osp.isfile(osp.join(ROOT, metafile)), f'model-index.yml imports {metafile}'
        with open(osp.join(ROOT, metafile)) as f:
            meta = yaml.safe_load(f)
        collections += meta['Collections']
        models += [dict(model, metafile=metafile) for model in meta['Models']]
    return models, collections


def shipped_configs():
    return sorted(
        osp.relpath(path, ROOT) for path in glob.glob(osp.join(ROOT, 'configs', '*', '*.py'))
        if osp.basename(osp.dirname(path)) not in NOT_INDEXED)


def test_every_indexed_config_exists_and_every_config_is_indexed():
    models, _ = load_index()
    indexed = [m['Config'] for m in models]
    assert len(indexed) == len(set(indexed)), 'a config is listed twice'
    missing = [c for c in indexed if not osp.isfile(osp.join(ROOT, c))]
    assert not missing, f'model-index lists configs that do not exist: {missing}'
    unlisted = sorted(set(shipped_configs()) - set(indexed))
    assert not unlisted, f'configs missing from model-index.yml: {unlisted}'
    # Every method folder's metafile is imported.
    metafiles = sorted(
        osp.relpath(p, ROOT) for p in glob.glob(osp.join(ROOT, 'configs', '*', 'metafile.yml')))
    assert metafiles == sorted({m['metafile'] for m in models})


def test_every_model_has_results_parameters_resources_and_weights():
    models, collections = load_index()
    names = {c['Name'] for c in collections}
    assert len({m['Name'] for m in models}) == len(models)
    for model in models:
        name = model['Name']
        assert name == osp.splitext(osp.basename(model['Config']))[0]
        assert model['In Collection'] in names
        meta = model['Metadata']
        assert meta['Parameters'] > 1e6 and meta['Training Resources'], name
        assert model['Weights'].startswith(HF) and model['Weights'].endswith('.pth'), name
        assert model['Results'], name
        for result in model['Results']:
            assert result['Task'] and result['Dataset'] in ('ImageNet-1k', 'COCO', 'ADE20K')
            assert all(0 < v < 100 for v in result['Metrics'].values()), name
        if 'classification' in model['Config']:
            assert meta['FLOPs'] > 1e9, name
    for collection in collections:
        assert osp.isfile(osp.join(ROOT, collection['README'])), collection['README']
        assert collection['Paper']['URL'] == 'https://arxiv.org/abs/2311.17132'


@pytest.mark.parametrize(
    'metafile',
    sorted(glob.glob(osp.join(ROOT, 'configs', '*', 'metafile.yml'))),
    ids=lambda p: osp.basename(osp.dirname(p)))
def test_method_readme_has_results_citation_and_evaluation(metafile):
    folder = osp.dirname(metafile)
    with open(osp.join(folder, 'README.md')) as f:
        readme = f.read()
    with open(metafile) as f:
        meta = yaml.safe_load(f)
    assert '@inproceedings{shi2024transnext' in readme  # the citation
    assert 'tools/test.py' in readme  # how to evaluate
    for model in meta['Models']:
        assert osp.basename(model['Config']) in readme, model['Name']
        assert model['Weights'] in readme, model['Name']  # where to download it
        for result in model['Results']:
            for value in result['Metrics'].values():
                assert str(value) in readme, (model['Name'], value)
