"""Hub-style model folders (``model.safetensors``, timm's ``config.json``, a model card): saving them, and
loading them from a directory or a Hub repo with every check (digests of the weights and of the fields
of ``config.json`` that define the model, a trained head never silently replaced).

A folder whose ``config.json`` lacks either digest (a ``"zoo"`` block deleted, a plain timm folder, one
published before the zoo recorded both) cannot be checked: nothing would tell an edited architecture
from the original. The zoo refuses it unless the caller opts in (``allow_unverified=True``, or
``ZOO_ALLOW_UNVERIFIED=1`` for ``timm.create_model``), and then loads it with an
:class:`UnverifiedWeightsWarning`.

``python -m zoo.hub record-digest FOLDER...`` records the digests of original folders.
"""
import hashlib
import json
import os
import re
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Tuple, Union

import timm
import torch
import torch.nn as nn
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError)
from timm.models import is_model
from timm.models._hub import load_model_config_from_path, save_for_hf

from zoo._download import hub_download
from .reading import WeightsError, read_weights, state_dict_sha256
from .task_models import CLASSIFICATION_TASK, TASK_KINDS, VIDEO_TASK, load_hub_task_model, model_task

__all__ = ['WEIGHTS_NAME', 'CONFIG_NAME', 'ZOO_CONFIG_KEY', 'ALLOW_UNVERIFIED_ENV', 'UnverifiedWeightsWarning',
           'verify_state_dict', 'model_config_sha256',
           'verify_model_config', 'check_classifier', 'save_hub_folder', 'record_model_config_digest',
           'load_hub_model', 'main']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
ZOO_CONFIG_KEY = 'zoo'  # top-level config.json key timm ignores; holds the digest
ALLOW_UNVERIFIED_ENV = 'ZOO_ALLOW_UNVERIFIED'  # =1: load folders without digests (with a warning)


class UnverifiedWeightsWarning(UserWarning):
    """Weights loaded on the caller's request although nothing could check them (no digest recorded)."""


_REPO_ID = re.compile(r'^[\w.\-]+/[\w.\-]+(@[\w.\-/]+)?$')


def verify_state_dict(state_dict: Mapping[str, torch.Tensor], expected_sha256: Optional[str], source: str) -> None:
    """Compare with the digest recorded at publishing time (skipped when none was recorded)."""
    if not expected_sha256:
        return
    actual = state_dict_sha256(state_dict)
    if actual != expected_sha256:
        raise WeightsError(
            f'The weights of {source} do not match the digest recorded in its {CONFIG_NAME} '
            f'(expected sha256 {expected_sha256[:16]}..., got {actual[:16]}...): the file was modified or '
            f'corrupted after publishing. Delete it and download it again.')


def _recorded_sha256(config: Mapping[str, Any]) -> Optional[str]:
    zoo_meta = config.get(ZOO_CONFIG_KEY)
    return zoo_meta.get('state_dict_sha256') if isinstance(zoo_meta, Mapping) else None


# What timm builds the model from (``timm.models._hub._parse_model_cfg`` and ``load_pretrained``):
# the architecture, its arguments (WS formula, norm args, ...), the number of classes, and where the
# classifier and stem are. Labels, descriptions and data settings may be edited freely.
_MODEL_CONFIG_FIELDS = ('architecture', 'num_classes', 'model_args')
_MODEL_PRETRAINED_CFG_FIELDS = ('num_classes', 'classifier', 'first_conv', 'label_offset', 'custom_load')


def model_config_sha256(config: Mapping[str, Any]) -> str:
    """SHA-256 over the ``config.json`` fields that define the model (not labels or descriptions)."""
    pretrained_cfg = config.get('pretrained_cfg', config)  # timm's legacy configs are one flat dict
    defining = {'config': {k: config.get(k) for k in _MODEL_CONFIG_FIELDS},
                'pretrained_cfg': {k: pretrained_cfg.get(k) for k in _MODEL_PRETRAINED_CFG_FIELDS}}
    if config.get('task') is not None:  # task-model and video folders (zoo.hub.task_models); absent for classifiers'
        defining['task'] = config['task']
    return hashlib.sha256(json.dumps(defining, sort_keys=True, separators=(',', ':')).encode()).hexdigest()


def _allowed_unverified(allow_unverified: Optional[bool]) -> bool:
    if allow_unverified is not None:
        return bool(allow_unverified)
    return os.environ.get(ALLOW_UNVERIFIED_ENV, '').strip().lower() in ('1', 'true', 'yes', 'on')


def verify_model_config(config: Mapping[str, Any], source: str, allow_unverified: Optional[bool] = None) -> None:
    """Refuse a ``config.json`` whose model-defining fields differ from those recorded at publishing time,
    and one that records no digest of them or of the weights (unverifiable) unless ``allow_unverified``
    (default: ``ZOO_ALLOW_UNVERIFIED=1``), which loads it with an :class:`UnverifiedWeightsWarning`.
    """
    zoo_meta = config.get(ZOO_CONFIG_KEY) or {}
    if not isinstance(zoo_meta, Mapping):
        zoo_meta = {}
    expected = zoo_meta.get('model_config_sha256')
    missing = [k for k in ('state_dict_sha256', 'model_config_sha256') if not zoo_meta.get(k)]
    if missing:
        what = ' and '.join(missing)
        if _allowed_unverified(allow_unverified):
            warnings.warn(
                f'{source} is loaded UNVERIFIED, as asked: its {CONFIG_NAME} records no {what}, so neither edits of '
                f'its architecture or model arguments nor a modified weights file can be detected.',
                UnverifiedWeightsWarning, stacklevel=3)
            return
        raise WeightsError(
            f'{source} cannot be verified: its {CONFIG_NAME} records no {what} (the "{ZOO_CONFIG_KEY}" block that '
            f'hub_upload.py and zoo.save_hub_folder write), so an edited architecture or model argument, or a '
            f'modified weights file, would load as if it were the original. Refused. If you know this folder is '
            f'the original (a plain timm folder of your own, say), record its digests with '
            f'`python -m zoo.hub record-digest FOLDER`; or load it unverified with '
            f'zoo.load_model(..., allow_unverified=True), or set {ALLOW_UNVERIFIED_ENV}=1 (which timm.create_model '
            f'and zoo-export follow too).')
    if model_config_sha256(config) != expected:
        fields = ', '.join(list(_MODEL_CONFIG_FIELDS) + [f'pretrained_cfg.{k}' for k in _MODEL_PRETRAINED_CFG_FIELDS])
        raise WeightsError(
            f'The {CONFIG_NAME} of {source} was modified after publishing: the fields that define the model '
            f'({fields}) differ from the digest recorded with it, so the weights would build another model '
            f'than the one they were trained as. Restore the original {CONFIG_NAME}; to fine-tune with another '
            f'number of classes, pass num_classes=... to the loader instead of editing the file.')


def check_classifier(state_dict: Mapping[str, torch.Tensor], pretrained_cfg: Mapping[str, Any],
                     num_classes: Optional[int], source: str) -> None:
    """Refuse to drop a trained head that fits: timm replaces the classifier whenever the model's
    ``num_classes`` differs from the config's, even when the weights' head has the model's size
    (a ``config.json`` whose ``num_classes`` was edited). Another ``num_classes`` asked for by the
    caller still gets a new head."""
    classifier, n = pretrained_cfg.get('classifier'), pretrained_cfg.get('num_classes')
    names = (classifier,) if isinstance(classifier, str) else tuple(classifier or ())
    for name in names:
        w = state_dict.get(f'{name}.weight')
        if w is None or n is None or num_classes in (None, n) or w.ndim < 1 or w.shape[0] != num_classes:
            continue
        raise WeightsError(
            f'{source}: the config says num_classes={n}, but the classifier {name}.weight in the weights has '
            f'{w.shape[0]} outputs, the size the model was built with, so the trained head would be silently '
            f'replaced. If {CONFIG_NAME} was edited, restore it; for a file of your own, pass '
            f'pretrained_cfg_overlay=dict(num_classes={w.shape[0]}).')


# ----------------------------------------------------------------------------------- saving

def save_hub_folder(
        model: nn.Module,
        folder: Union[str, Path],
        label_names: Optional[Any] = None,
        data_config: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` and timm's ``config.json`` (with the state-dict digest) to ``folder``.

    Uses timm's ``save_for_hf``, so the folder loads with ``timm.create_model('local-dir:FOLDER')``
    and, once pushed, with ``hf-hub:``. ``data_config`` overrides mean/std/input size/crop;
    ``pretrained_cfg`` overrides other fields (e.g. the description); ``extra`` goes under ``"zoo"``.
    A video model (built with ``num_segments``, recorded in ``model_args``) is marked
    ``"task": "video-classification"``, a field timm ignores and the digest covers.
    """
    folder = Path(folder)
    zoo_meta = dict(extra or {}, state_dict_sha256=state_dict_sha256(model.state_dict()), weights=WEIGHTS_NAME)
    model_config = {ZOO_CONFIG_KEY: zoo_meta}
    if model_task(model) != CLASSIFICATION_TASK:
        model_config['task'] = model_task(model)
    if pretrained_cfg:
        model_config['pretrained_cfg'] = dict(pretrained_cfg)
    if label_names:
        model_config['label_names'] = list(label_names)
    save_for_hf(model, folder, model_config=model_config, safe_serialization=True, data_config=data_config)
    record_model_config_digest(folder, check_weights=False)  # the weights digest was just computed from the model
    return folder


def record_model_config_digest(folder: Union[str, Path], check_weights: bool = True) -> str:
    """Write ``zoo.model_config_sha256`` into a folder's ``config.json`` (after checking its weights digest),
    and ``zoo.state_dict_sha256`` too if it has none.

    :func:`save_hub_folder` calls it; run it by hand (``python -m zoo.hub record-digest FOLDER``) only
    for a folder whose ``config.json`` and weights are known to be the original.
    """
    cfg_file = Path(folder) / CONFIG_NAME
    config = json.loads(cfg_file.read_text())
    if check_weights:
        state_dict = read_weights(Path(folder) / WEIGHTS_NAME)
        verify_state_dict(state_dict, _recorded_sha256(config), str(folder))
        config.setdefault(ZOO_CONFIG_KEY, {}).setdefault('state_dict_sha256', state_dict_sha256(state_dict))
    digest = model_config_sha256(config)
    config.setdefault(ZOO_CONFIG_KEY, {})['model_config_sha256'] = digest
    cfg_file.write_text(json.dumps(config, indent=2))  # timm's save_for_hf layout
    return digest


# ----------------------------------------------------------------------------------- Hub repos and folders

def _offline() -> bool:
    return bool(hf_constants.HF_HUB_OFFLINE)


@contextmanager
def _hub_errors(repo_id: str, revision: Optional[str]):
    """Turn huggingface_hub's download errors into ones that say what to download or set."""
    where = f'{repo_id}' + (f'@{revision}' if revision else '')
    try:
        yield
    except LocalEntryNotFoundError as e:
        raise WeightsError(
            f'{where} is not in the Hugging Face cache ({hf_constants.HF_HUB_CACHE}) and the Hub cannot be reached'
            f'{" (HF_HUB_OFFLINE=1)" if _offline() else ""}. Where there is internet, run '
            f'`hf download {repo_id}{f" --revision {revision}" if revision else ""}` and bring that cache here '
            f'(or point HF_HUB_CACHE at it), or save the model folder and load it with local-dir:PATH.') from e
    except RevisionNotFoundError as e:
        raise WeightsError(f'{where}: revision {revision!r} does not exist.') from e
    except RepositoryNotFoundError as e:
        raise WeightsError(
            f'{where}: no such repo, or it is private or gated. Log in with `hf auth login` '
            f'or set HF_TOKEN to a token that can read it.') from e
    except EntryNotFoundError as e:
        raise WeightsError(f'{where} has no {e}: was it published with hub_upload.py (or timm push_to_hf_hub)?') from e


def _resolve_folder(source: str, revision: Optional[str], cache_dir) -> Tuple[Path, str]:
    """``(folder holding config.json and the weights, label for messages)`` for a dir or a repo id."""
    if source.startswith('local-dir:'):
        source = source[len('local-dir:'):]
        if not Path(source).is_dir():
            raise WeightsError(f'local-dir:{source} is not a directory.')
    if Path(source).is_dir():
        folder = Path(source)
        if not (folder / CONFIG_NAME).is_file():
            raise WeightsError(f'{folder} has no {CONFIG_NAME}: not a Hub-style model folder (see hub_upload.py).')
        if not (folder / WEIGHTS_NAME).is_file():
            raise WeightsError(f'{folder} has no {WEIGHTS_NAME}: copy the weights next to {CONFIG_NAME}.')
        return folder, str(folder)
    repo_id = source[len('hf-hub:'):] if source.startswith(('hf-hub:', 'hf_hub:')) else source
    if not _REPO_ID.match(repo_id):
        raise WeightsError(f'{source!r} is neither an existing folder nor a Hub repo id (ORG/NAME).')
    if '@' in repo_id:
        repo_id, revision = repo_id.split('@', 1)
    with _hub_errors(repo_id, revision):
        cfg_file = hub_download(repo_id, CONFIG_NAME, revision=revision, cache_dir=cache_dir)
        hub_download(repo_id, WEIGHTS_NAME, revision=revision, cache_dir=cache_dir)
    return Path(cfg_file).parent, f'hf-hub:{repo_id}' + (f'@{revision}' if revision else '')


def load_hub_model(
        source: str,
        revision: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        allow_unverified: Optional[bool] = None,
        **kwargs,
) -> nn.Module:
    """A model from a Hub repo (``ORG/NAME``, ``hf-hub:ORG/NAME[@REV]``) or a folder (``local-dir:PATH``).

    Checks the weights (readable, digest, keys and shapes) before timm builds the model and loads
    them; kwargs go to ``timm.create_model`` (e.g. ``num_classes=5`` re-initialises the classifier).
    A folder whose ``config.json`` records a task-model ``task`` (``"segmentation"``, ``"detection"``) builds
    its model with ``zoo.create_segmenter`` / ``zoo.create_detector`` instead
    (:func:`zoo.hub.task_models.load_hub_task_model`), with the same checks; an unknown task is refused naming
    the file.
    A folder without the zoo's digests is refused unless ``allow_unverified=True`` (see the module docstring).
    """
    folder, label = _resolve_folder(source, revision, cache_dir)
    config = json.loads((folder / CONFIG_NAME).read_text())
    verify_model_config(config, label, allow_unverified)
    task = config.get('task')
    if task in TASK_KINDS:  # the zoo's task-model config (zoo.hub.task_models), not timm's
        return load_hub_task_model(folder, label, config, **kwargs)
    if task not in (None, CLASSIFICATION_TASK, VIDEO_TASK):
        known = ', '.join([CLASSIFICATION_TASK, VIDEO_TASK, *TASK_KINDS])
        raise WeightsError(f'{folder / CONFIG_NAME}: unknown task {task!r}; this zoo builds {known} models '
                           f'(a folder of a newer zoo?).')
    state_dict = read_weights(folder / WEIGHTS_NAME)
    verify_state_dict(state_dict, _recorded_sha256(config), str(folder / WEIGHTS_NAME))  # the message names the file
    pretrained_cfg, arch, model_args = load_model_config_from_path(folder)
    if not is_model(arch):
        raise WeightsError(f'{folder / CONFIG_NAME} names architecture {arch!r}, which is not registered (import its '
                           f'package first).')
    for k in ('source', 'file', 'hf_hub_id', 'hf_hub_filename', 'url'):
        pretrained_cfg.pop(k, None)
    pretrained_cfg['state_dict'] = state_dict  # timm's highest-priority weight source: no second read
    for k, v in (model_args or {}).items():
        kwargs.setdefault(k, v)
    try:
        model = timm.create_model(arch, pretrained=True, pretrained_cfg=pretrained_cfg, **kwargs)
    except RuntimeError as e:
        if isinstance(e, WeightsError):
            raise
        raise WeightsError(f'Weights of {label} do not fit {arch}: {e}') from e
    model.pretrained_cfg.pop('state_dict', None)
    model.pretrained_cfg['source'] = label
    return model


def main(argv=None) -> int:
    """``python -m zoo.hub record-digest FOLDER...``: record the digests of original folders."""
    import argparse
    p = argparse.ArgumentParser(prog='python -m zoo.hub')
    sub = p.add_subparsers(dest='command', required=True)
    rec = sub.add_parser('record-digest', help='record the digests of folders known to be the original')
    rec.add_argument('folders', nargs='+')
    args = p.parse_args(argv)
    for folder in args.folders:
        print(f'{folder}: model_config_sha256 {record_model_config_digest(folder)}')
    return 0
