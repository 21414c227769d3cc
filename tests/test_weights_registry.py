"""One home for weights (issue 17): every registered zoo tag loads from somewhere, and every shipped folder
is registered. Offline and fast: nothing here downloads."""
import timm
from timm.models import get_pretrained_cfg, split_model_name_tag

import zoo
from zoo.models._weights import SHIPPED_WEIGHTS_DIR, shipped_weights


def _zoo_tags():
    return sorted(t for t in timm.list_pretrained() if split_model_name_tag(t)[0] in zoo.ZOO_MODELS)


def test_every_zoo_tag_has_shipped_weights_or_a_remote_source():
    without = []
    for name in _zoo_tags():
        arch, tag = split_model_name_tag(name)
        cfg = get_pretrained_cfg(name).to_dict()
        if not (shipped_weights(name) or cfg.get('url')):
            without.append(name)
    assert not without, f'registered tags with no weights anywhere: {without}'


def test_every_shipped_folder_is_registered():
    shipped = sorted(p.name for p in SHIPPED_WEIGHTS_DIR.iterdir() if p.is_dir())
    assert shipped and set(shipped) <= set(_zoo_tags()), set(shipped) - set(_zoo_tags())


def test_unshipped_resnet56_has_no_tag():
    assert 'resnet56.cifar10' not in timm.list_pretrained('resnet56*')
    assert timm.create_model('resnet56').pretrained_cfg.get('tag') in (None, '')
