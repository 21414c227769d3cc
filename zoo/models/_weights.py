"""The builder every zoo entrypoint shares: a tag's build args and converter (from the weights
registry, :mod:`zoo.hub.registry`), timeouts for downloads, and checks of the weights.

Some weights were trained with settings other than the zoo's defaults: the authors' GN+WS
ImageNet weights need ``ws_formula='ws'``, their BCN+WS ones ``ws_formula='bcn'`` and a
large-batch BCN stage. The registry entry of ``'arch.tag'`` carries those build args and a
converter for the published file layout (families outside the registry can still add a
:class:`WeightSpec` with :func:`register_weight_spec`); :func:`build_zoo_model` applies them.

When the tag's args apply (the zoo's decision):
- an explicit tag (``timm.create_model('resnet50_wsbcn.in1k')``): always, pretrained or not,
  so the model is the one those weights fit (load a local copy later, or fine-tune it);
- no tag and ``pretrained=True``: the default tag's weights are loaded, so its args apply;
- no tag and ``pretrained=False``: the zoo defaults (``ws_formula='zoo'``, estimated BCN stage);
- a ``pretrained_cfg`` dict (``hf-hub:``, ``local-dir:``): never; such configs carry their own
  ``model_args``.
Explicit kwargs always win over a tag's args.

Weights from a Hub repo or folder written by :func:`zoo.hub.save_hub_folder` are checked against
the digests in its ``config.json`` (of the weights, and of the fields that define the model), a
classifier that does not have the configured number of classes is refused rather than replaced,
and unreadable files raise :class:`zoo.hub.WeightsError`.
"""
import json
import pickle
import socket
import urllib.error
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Optional

from safetensors import SafetensorError
from timm.models import build_model_with_cfg, resolve_pretrained_cfg

from zoo.hub.registry import SHIPPED_WEIGHTS_DIR, get_entry, shipped_weights

__all__ = ['WeightSpec', 'WEIGHT_SPECS', 'register_weight_spec', 'weight_spec_for', 'build_zoo_model',
           'SHIPPED_WEIGHTS_DIR', 'shipped_weights']


@dataclass(frozen=True)
class WeightSpec:
    """Build args a tag's weights need, and a converter ``fn(state_dict, model)`` for their layout."""
    model_args: Dict[str, Any] = field(default_factory=dict)
    filter_fn: Optional[Callable] = None


WEIGHT_SPECS: Dict[str, WeightSpec] = {}  # tags outside the registry (other families)


def register_weight_spec(name_with_tag: str, spec: WeightSpec) -> None:
    if '.' not in name_with_tag:
        raise ValueError(f'register_weight_spec needs "arch.tag", got {name_with_tag!r}')
    WEIGHT_SPECS[name_with_tag] = spec


def _spec(name_with_tag: str) -> Optional[WeightSpec]:
    if name_with_tag in WEIGHT_SPECS:
        return WEIGHT_SPECS[name_with_tag]
    entry = get_entry(name_with_tag)
    if entry is None or not (entry.model_args or entry.converter):
        return None
    from zoo.hub.converters import CONVERTERS
    return WeightSpec(model_args=dict(entry.model_args), filter_fn=CONVERTERS[entry.converter] if entry.converter else None)


def weight_spec_for(variant: str, pretrained: bool, pretrained_cfg: Any, pretrained_cfg_overlay=None) -> Optional[WeightSpec]:
    """The spec that applies to this build (see the module docstring), or None."""
    if isinstance(pretrained_cfg, str) and pretrained_cfg:
        return _spec(f'{variant}.{pretrained_cfg}')
    if pretrained_cfg is None and pretrained:
        tag = resolve_pretrained_cfg(variant, None, pretrained_cfg_overlay).tag
        return _spec(f'{variant}.{tag}') if tag else None
    return None


def _folder_config(pretrained_cfg: Dict[str, Any], cache_dir) -> Optional[Dict[str, Any]]:
    """The config.json next to Hub / local-dir / Hub-folder file weights, else None."""
    from zoo.hub import CONFIG_NAME, WEIGHTS_NAME
    source = pretrained_cfg.get('source')
    if source == 'local-dir' and pretrained_cfg.get('file'):
        cfg_file = Path(pretrained_cfg['file']) / CONFIG_NAME
    elif not source and pretrained_cfg.get('file') and Path(pretrained_cfg['file']).name == WEIGHTS_NAME:
        cfg_file = Path(pretrained_cfg['file']).parent / CONFIG_NAME  # a file inside a Hub-ready folder
    elif source == 'hf-hub' and pretrained_cfg.get('hf_hub_id'):
        from timm.models._hub import hf_split
        from zoo._download import hub_download
        repo_id, revision = hf_split(pretrained_cfg['hf_hub_id'])
        cfg_file = Path(hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir))
    else:
        return None
    return json.loads(cfg_file.read_text()) if cfg_file.is_file() else None


def _make_filter(spec: Optional[WeightSpec], cache_dir) -> Callable:
    def filter_fn(state_dict, model):
        from zoo.hub import check_classifier, check_state_dict, verify_model_config, verify_state_dict
        from zoo.hub.folders import _recorded_sha256
        cfg = model.pretrained_cfg
        source = cfg.get('hf_hub_id') or cfg.get('file') or ''
        folder_config = _folder_config(cfg, cache_dir)
        if folder_config is not None:
            verify_model_config(folder_config, source)
            verify_state_dict(state_dict, _recorded_sha256(folder_config), source)
        if spec is not None and spec.filter_fn is not None:
            state_dict = spec.filter_fn(state_dict, model)
        check_classifier(state_dict, cfg, getattr(model, 'num_classes', None), source)
        # timm adapts the classifier (other num_classes) and the stem (other in_chans) after this
        # filter; check everything else up front, so a bad file never reaches load_state_dict.
        adapted = set()
        classifier = cfg.get('classifier')
        if classifier and getattr(model, 'num_classes', None) != cfg.get('num_classes'):
            adapted |= {f'{classifier}.weight', f'{classifier}.bias'}
        if cfg.get('first_conv'):
            adapted.add(f'{cfg["first_conv"]}.weight')
        expected = model.state_dict()
        check_state_dict(model, {k: v for k, v in state_dict.items() if k not in adapted}, strict=False)
        missing = [k for k in expected if k not in state_dict and k not in adapted]
        unexpected = [k for k in state_dict if k not in expected and k not in adapted]  # num_classes=0: no fc
        if missing or unexpected:
            from zoo.hub import WeightsError
            raise WeightsError(
                f'Pretrained weights for {cfg.get("architecture")} do not fit the model: missing '
                f'{missing[:5]} ({len(missing)}), unexpected {unexpected[:5]} ({len(unexpected)}).')
        return state_dict
    return filter_fn


def _weights_location(variant: str, pretrained_cfg, overlay) -> str:
    if isinstance(pretrained_cfg, dict):
        cfg = pretrained_cfg
    else:
        cfg = resolve_pretrained_cfg(variant, pretrained_cfg, overlay).to_dict()
    return str(cfg.get('file') or cfg.get('hf_hub_id') or cfg.get('url') or variant)


def _prefetch(variant: str, pretrained_cfg, overlay, cache_dir) -> Optional[Path]:
    """Fetch URL / Hub weights with a timeout (offline: not at all) before timm reads them from its cache.

    A registry tag's URL weights come from its sources in order (the authors' URL, then mirrors), each
    checked against its SHA-256 where one is published; returns the file when it is not where timm
    looks for the tag's URL (a mirror's), else None. A URL of the caller's is fetched as it is."""
    from zoo._download import fetch_first, fetch_url, hub_download, url_cache_path
    from huggingface_hub.errors import EntryNotFoundError
    from timm.models._builder import _resolve_pretrained_source
    from timm.models._hub import hf_split
    cfg = pretrained_cfg if isinstance(pretrained_cfg, dict) else resolve_pretrained_cfg(
        variant, pretrained_cfg, overlay).to_dict()
    load_from, where = _resolve_pretrained_source(cfg)
    entry = get_entry(f'{variant}.{cfg.get("tag")}') if cfg.get('tag') else None
    own_url = isinstance(pretrained_cfg, dict) or (overlay or {}).get('url')
    if load_from == 'url' and entry is not None and entry.urls and not own_url:
        path = fetch_first(entry.urls, entry.sha256, cache_dir, what=f'weights of {variant}.{entry.tag}')
        return None if path == url_cache_path(where, cache_dir) else path
    if load_from == 'url':
        fetch_url(where, cache_dir, what=f'weights of {variant}')
    elif load_from == 'hf-hub':
        repo, filename = where if isinstance(where, (tuple, list)) else (where, 'model.safetensors')
        repo_id, revision = hf_split(repo)
        try:
            hub_download(repo_id, filename, revision=revision, cache_dir=cache_dir)
        except EntryNotFoundError:
            pass  # another file name (pytorch_model.bin): timm looks for it
    return None


def build_zoo_model(model_cls, variant: str, pretrained: bool = False, pretrained_cfg=None,
                    pretrained_cfg_overlay=None, cache_dir=None, **kwargs):
    """``timm.build_model_with_cfg`` plus tag build args, layout converters and weight checks."""
    from zoo.hub import WeightsError
    if pretrained:
        fetched = _prefetch(variant, pretrained_cfg, pretrained_cfg_overlay, cache_dir)
        if fetched is not None:  # a mirror's file, under its own name: timm would look for the original's
            pretrained_cfg_overlay = dict(pretrained_cfg_overlay or {}, file=str(fetched))
    spec = weight_spec_for(variant, pretrained, pretrained_cfg, pretrained_cfg_overlay)
    tag_args = deepcopy(spec.model_args) if spec else {}
    for k, v in tag_args.items():
        kwargs.setdefault(k, v)
    try:
        model = build_model_with_cfg(
            model_cls, variant, pretrained, pretrained_cfg=pretrained_cfg,
            pretrained_cfg_overlay=pretrained_cfg_overlay, cache_dir=cache_dir,
            pretrained_filter_fn=_make_filter(spec, cache_dir), **kwargs)
    except WeightsError:
        raise
    except Exception as e:
        if not pretrained:
            raise
        where = _weights_location(variant, pretrained_cfg, pretrained_cfg_overlay)
        from zoo._download import url_cache_path
        from zoo.hub.reading import unreadable_file_error
        refused = unreadable_file_error(url_cache_path(where, cache_dir) if '://' in where else where)
        if refused is not None:  # the zoo's own words (timm's advise retrying with weights_only=False)
            raise refused from None
        if not isinstance(e, (OSError, EOFError, ValueError, RuntimeError, SafetensorError, pickle.UnpicklingError)):
            raise
        if isinstance(e, (urllib.error.URLError, socket.timeout, TimeoutError, ConnectionError)):
            what = 'The download failed (network)'
        else:
            what = ('If the file is truncated or corrupted, delete it (from the HF cache or ~/.cache/torch/hub) '
                    'and download it again')
        raise WeightsError(
            f'Could not load the pretrained weights of {variant} from {where}: {type(e).__name__}: {e}. {what}; '
            f'offline, download it elsewhere and pass pretrained_cfg_overlay=dict(file=PATH), or load a saved '
            f'folder with local-dir:PATH.') from e
    # Recorded as model args so that an export (timm save_for_hf) rebuilds the same model.
    model._model_args = dict(tag_args, **getattr(model, '_model_args', {}))
    return model
