"""Sources of URL weights fall back in order, each checked against its SHA-256 (issue 17): for the authors'
GN+WS releases, the authors' URL, then the OpenMMLab mirror, whose file name carries the first 8 hex
digits of its SHA-256. Offline: local files (file:// URLs) play each source."""
import hashlib
import shutil

import pytest
import timm
import torch

from test_convert_authors import X, _authors_checkpoint, _save_release
from zoo._download import fetch_first
from zoo.hub import WeightsError, registry


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def online(monkeypatch):
    monkeypatch.delenv('HF_HUB_OFFLINE', raising=False)


@pytest.fixture
def release(tmp_path):
    """A small file in a www/ folder, and a mirror copy named like OpenMMLab's (hash prefix in the name)."""
    www = tmp_path / 'www'
    www.mkdir()
    authors = www / 'R-50-GN-WS.pth.tar'
    torch.save({'w': torch.arange(10.)}, authors)
    mirror = www / f'resnet50_gn_ws-{_sha256(authors)[:8]}.pth'
    shutil.copy(authors, mirror)
    return authors, mirror


def _sources(authors, mirror):
    entry = registry._authors_in1k('resnet50_wsgn.in1k', authors.as_uri(), mirror.as_uri(), 23.72)
    return entry.urls, entry.sha256


def test_registry_takes_the_mirror_digest_from_its_file_name():
    entry = registry.get_entry('resnet50_wsgn.in1k')
    assert entry.urls[0].endswith('/R-50-GN-WS.pth.tar') and 'openmmlab' in entry.urls[1]
    assert entry.sha256 == (None, '15beedd8')  # the authors publish no digest
    assert registry.get_entry('resnet50_wsbcn.in1k').urls[1:] == ()


def test_authors_url_first(release, tmp_path, online):
    authors, mirror = release
    path = fetch_first(*_sources(authors, mirror), tmp_path / 'cache')
    assert path == tmp_path / 'cache' / authors.name
    assert [p.name for p in (tmp_path / 'cache').iterdir()] == [authors.name]


def test_unreachable_authors_url_falls_back_to_the_checked_mirror(release, tmp_path, online):
    authors, mirror = release
    urls, sha256 = _sources(authors, mirror)
    authors.unlink()  # the authors' server is gone
    path = fetch_first(urls, sha256, tmp_path / 'cache')
    assert path == tmp_path / 'cache' / mirror.name and _sha256(path).startswith(sha256[1])


def test_a_source_whose_digest_differs_is_deleted_and_the_next_one_used(release, tmp_path, online):
    authors, mirror = release
    urls, _ = _sources(authors, mirror)
    sha256 = ('0' * 64, _sha256(mirror))  # the first source serves another file than the registry's digest
    path = fetch_first(urls, sha256, tmp_path / 'cache')
    assert path.name == mirror.name and not (tmp_path / 'cache' / authors.name).exists()


def test_every_failure_is_listed_in_order(release, tmp_path, online):
    authors, mirror = release
    urls, sha256 = _sources(authors, mirror)
    authors.unlink()
    mirror.write_bytes(b'not the release')  # a mirror file that fails its hash prefix
    with pytest.raises(WeightsError) as info:
        fetch_first(urls, sha256, tmp_path / 'cache')
    message = str(info.value)
    assert message.startswith('Could not get the weights from any of their 2 sources')
    assert message.index(authors.as_uri()) < message.index(mirror.as_uri())
    assert f'has SHA-256 {_sha256(mirror)[:16]}..., expected {sha256[1]}' in message
    assert not list((tmp_path / 'cache').iterdir())


def test_cached_copies_come_first_and_are_checked(release, tmp_path, online, monkeypatch):
    authors, mirror = release
    urls, sha256 = _sources(authors, mirror)
    cache = tmp_path / 'cache'
    cache.mkdir()
    (cache / mirror.name).write_bytes(b'a corrupted copy')
    authors.unlink()
    assert fetch_first(urls, sha256, cache) == cache / mirror.name  # deleted, then downloaded again
    assert _sha256(cache / mirror.name) == _sha256(mirror)
    mirror.unlink()  # no source left: the cached, checked copy is used
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    assert fetch_first(urls, sha256, cache) == cache / mirror.name


def test_offline_uses_only_the_cache(release, tmp_path, monkeypatch):
    authors, mirror = release
    monkeypatch.setenv('HF_HUB_OFFLINE', '1')
    with pytest.raises(WeightsError, match=r'Offline \(HF_HUB_OFFLINE=1\).*no download was attempted.*Mirror: '):
        fetch_first(*_sources(authors, mirror), tmp_path / 'cache')
    assert not (tmp_path / 'cache').exists()


def test_in1k_tag_loads_from_the_mirror_when_the_authors_url_fails(tmp_path, online, monkeypatch):
    """The whole route: timm.create_model on a registry tag, the authors' URL gone, the mirror's file
    (mmcv layout, as OpenMMLab serves it) checked, converted and loaded."""
    ref = _authors_checkpoint('resnet50', 'gn')
    www = tmp_path / 'www'
    www.mkdir()
    staged = www / 'staged.pth'
    _save_release(ref, staged, 'mmcv')
    mirror = www / f'resnet50_gn_ws-{_sha256(staged)[:8]}.pth'
    staged.rename(mirror)
    entry = registry._authors_in1k('resnet50_wsgn.in1k', (www / 'R-50-GN-WS.pth.tar').as_uri(), mirror.as_uri())
    monkeypatch.setattr(registry, 'ENTRIES', tuple(entry if e.name == entry.name else e for e in registry.ENTRIES))
    monkeypatch.setenv('TORCH_HOME', str(tmp_path / 'torch'))
    model = timm.create_model('resnet50_wsgn.in1k', pretrained=True).eval()
    assert model.pretrained_cfg['file'] == str(tmp_path / 'torch' / 'hub' / 'checkpoints' / mirror.name)
    with torch.no_grad():
        torch.testing.assert_close(model(X), ref(X), rtol=1e-4, atol=1e-4)
