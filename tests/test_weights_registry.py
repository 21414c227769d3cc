"""One home for weights (issue 17): the registry (zoo/hub/registry.py) is the single list of weights.
Every registered zoo tag loads from somewhere, every shipped folder is registered, and the family
files, benchmarks and ``zoo.list_pretrained`` all read the registry. Offline and fast: nothing downloads.

Adding weights: one entry in zoo/hub/registry.py ENTRIES, plus its folder in zoo/pretrained/ or its URLs.
"""
import io
import re
from pathlib import Path

import timm
from huggingface_hub import ModelCard
from timm.models import get_pretrained_cfg, split_model_name_tag

import zoo
from zoo.hub import registry
from zoo.models.resnet import _TIMM_OWNED

REPO_ROOT = Path(__file__).resolve().parents[1]


def _zoo_tags():
    """Tags of architectures the zoo registers (not timm's own resnet50_gn)."""
    return sorted(t for t in timm.list_pretrained()
                  if split_model_name_tag(t)[0] in set(zoo.ZOO_MODELS) - _TIMM_OWNED)


def test_every_zoo_tag_has_shipped_weights_or_a_remote_source_in_the_registry():
    for name in _zoo_tags():
        entry = registry.get_entry(name)
        assert entry is not None, f'{name} is registered in timm but not in zoo/hub/registry.py'
        assert entry.shipped or entry.urls, f'{name}: no shipped folder and no URL'
        cfg = get_pretrained_cfg(name).to_dict()
        assert cfg.get('file') == (str(entry.shipped) if entry.shipped else None)
        assert cfg.get('url') == (entry.urls[0] if entry.urls else '')


def test_every_shipped_folder_is_registered_and_every_shipped_entry_has_its_folder():
    shipped = sorted(p.name for p in registry.SHIPPED_WEIGHTS_DIR.iterdir() if p.is_dir())
    in_registry = sorted(e.folder for e in registry.ENTRIES if e.folder)
    assert shipped and shipped == in_registry
    assert set(shipped) <= set(_zoo_tags())
    assert set(_zoo_tags()) == {e.name for e in registry.ENTRIES}  # nothing listed without weights


def test_resnet56_default_tag_is_its_shipped_bn_baseline():
    """``resnet56.cifar10`` is registered now that its weights ship (before, it was listed with none)."""
    assert 'resnet56.cifar10' in timm.list_pretrained('resnet56*')
    assert timm.create_model('resnet56').pretrained_cfg.get('tag') == 'cifar10'
    model = timm.create_model('resnet56', pretrained=True)  # the shipped folder: no network
    assert model.num_classes == 10


def test_a_shipped_tag_exists_exactly_when_its_folder_does(tmp_path, monkeypatch):
    monkeypatch.setattr(registry, 'SHIPPED_WEIGHTS_DIR', tmp_path)
    assert registry.pretrained_cfgs('resnet20') == {}
    (tmp_path / 'resnet20.cifar10_b2').mkdir()
    (tmp_path / 'resnet20.cifar10_b2' / 'model.safetensors').write_bytes(b'x')
    assert list(registry.pretrained_cfgs('resnet20')) == ['resnet20.cifar10_b2']
    assert registry.pretrained_cfgs('resnet50_wsgn') == {'resnet50_wsgn.in1k': registry.pretrained_cfgs(
        'resnet50_wsgn')['resnet50_wsgn.in1k']}  # URL weights do not depend on folders


def test_shipped_entries_name_the_recipe_their_card_came_from():
    for entry in registry.entries(dataset='cifar10'):
        card = (entry.shipped.parent / 'README.md').read_text()
        config = entry.recipe.split(',')[0]
        assert (REPO_ROOT / config).is_file(), config
        assert f'runs/cifar10/{Path(config).stem}/checkpoints/' in card, (entry.name, config)


def test_list_pretrained_prints_tags_with_the_metrics_of_their_cards():
    out = io.StringIO()
    names = zoo.list_pretrained(file=out)
    lines = out.getvalue().splitlines()
    assert names == [e.name for e in registry.entries()] and len(lines) == len(names)
    card = ModelCard.load(registry.SHIPPED_WEIGHTS_DIR / 'resnet20_wsbcn.cifar10' / 'README.md').data
    top1 = next(r.metric_value for r in card.eval_results if r.metric_name == 'top-1 accuracy')
    line = next(l for l in lines if l.startswith('resnet20_wsbcn.cifar10:'))
    assert f'top-1 accuracy {top1:g}% (cifar10 test)' in line and 'configs/cifar10/resnet20_wsbcn.yaml' in line
    line = next(l for l in lines if l.startswith('resnet50_wsgn.in1k:'))
    assert 'top-1 error 23.72% (imagenet-1k val)' in line and 'R-50-GN-WS.pth.tar' in line
    assert zoo.list_pretrained('resnet56*', file=io.StringIO()) == ['resnet56.cifar10', 'resnet56_wsbcn.cifar10']


def test_benchmarks_take_tags_from_the_registry():
    import cifar_results  # benchmarks/cifar_results.py (pytest's pythonpath)
    for entry in registry.entries(dataset='cifar10'):
        card = (entry.shipped.parent / 'README.md').read_text()
        ipd = int(re.search(r'\*\*Images per device:\*\* (\d+)', card).group(1))
        model = entry.architecture
        assert cifar_results.tag_for(model, cifar_results.norm_of(model), ipd) == entry.name


def test_published_card_names_the_registry_recipe():
    from zoo.hub.publish import RunInfo, build_model_card
    model = zoo.create_model('resnet20_wsbcn')
    entry = registry.get_entry('resnet20_wsbcn.cifar10')
    card = str(build_model_card(model, 'wsbcn-zoo/resnet20_wsbcn.cifar10', RunInfo(source='run.ckpt', dataset='cifar10')))
    assert f'- **Recipe:** {entry.recipe}' in card
    assert '**Recipe:**' not in str(build_model_card(model, 'me/resnet20_wsbcn.mine', RunInfo(source='run.ckpt')))
