"""Load and save zoo models safely: Hub repos, Hub-style folders and Lightning checkpoints.

Everything about weights lives in this package, one module per job:
- :mod:`~zoo.hub.registry`: the single list of the zoo's weights (``zoo.list_pretrained()`` prints it);
- :mod:`~zoo.hub.reading`: the one checkpoint reader (files, digests, layouts, the EMA rule);
- :mod:`~zoo.hub.folders`: Hub-style folders and Hub repos;
- :mod:`~zoo.hub.lightning`: Lightning checkpoints;
- :mod:`~zoo.hub.task_models`: segmenters and detectors in folders and checkpoints (``"task": "segmentation"``,
  ``"detection"``), and the task of any model (video models are timm's: ``"task": "video-classification"``);
- :mod:`~zoo.hub.converters`: the authors' checkpoint layouts (``python -m zoo.converters`` converts a file);
- :mod:`~zoo.hub.publish`: model cards and publishing (``hub_upload.py`` is its entry point).
Downloads with timeouts and offline handling are :mod:`zoo._download`.

Weights are read only with safetensors or ``torch.load(weights_only=True)``, by the one checkpoint
reader (:mod:`zoo.hub.reading`, which also states the EMA rule). Every loader checks a
file before a model sees it, so a bad file raises :class:`WeightsError` and no model is ever
returned half-loaded:

- a truncated or unreadable file (the error names the file and what to do);
- a state dict whose digest differs from the one :func:`save_hub_folder` recorded in
  ``config.json`` (``{"zoo": {"state_dict_sha256": ...}}``): the file was modified after publishing;
- keys or shapes that do not fit the model;
- a folder whose ``config.json`` records no digests (unverifiable), unless the caller opts in with
  ``allow_unverified=True`` (or ``ZOO_ALLOW_UNVERIFIED=1``): it then loads with an
  :class:`UnverifiedWeightsWarning`. What each loader guarantees is listed in ``docs/hub.md``.

Hub repos and folders load through timm (``timm.create_model('hf-hub:ORG/NAME', pretrained=True)``
works on its own once ``zoo`` is imported); :func:`load_hub_model` adds the checks above, clear
errors for missing weights offline (``HF_HUB_OFFLINE=1``), and fails within ``ZOO_DOWNLOAD_TIMEOUT``
seconds when the Hub does not answer (:mod:`zoo._download`).
"""
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from . import registry  # noqa: F401 (zoo.hub.registry)
from .folders import (
    ALLOW_UNVERIFIED_ENV, CONFIG_NAME, WEIGHTS_NAME, ZOO_CONFIG_KEY, UnverifiedWeightsWarning, check_classifier,
    load_hub_model, main,
    model_config_sha256, record_model_config_digest, save_hub_folder, verify_model_config, verify_state_dict)
from .lightning import LightningCheckpoint, load_lightning_checkpoint, read_lightning_checkpoint
from .reading import (
    CHECKPOINT_DIGEST_KEY, WeightsError, check_state_dict, checkpoint_sha256, load_weights, read_state_dict,
    read_weights, state_dict_sha256, strip_to_model_keys, unwrap_checkpoint, verify_checkpoint)
from .registry import PretrainedEntry, list_pretrained
from .segmenters import load_hub_segmenter, save_hub_segmenter
from .task_models import load_hub_task_model, save_hub_task_model

__all__ = [
    'WeightsError', 'UnverifiedWeightsWarning', 'ALLOW_UNVERIFIED_ENV', 'WEIGHTS_NAME', 'CONFIG_NAME',
    'ZOO_CONFIG_KEY', 'CHECKPOINT_DIGEST_KEY', 'state_dict_sha256',
    'checkpoint_sha256', 'verify_checkpoint', 'read_weights', 'check_state_dict',
    'load_weights', 'verify_state_dict', 'model_config_sha256', 'verify_model_config', 'check_classifier',
    'record_model_config_digest', 'save_hub_folder', 'load_hub_model', 'LightningCheckpoint',
    'read_lightning_checkpoint', 'load_lightning_checkpoint', 'load_model', 'PretrainedEntry', 'list_pretrained',
    'read_state_dict', 'unwrap_checkpoint', 'strip_to_model_keys', 'save_hub_task_model', 'load_hub_task_model',
    'save_hub_segmenter', 'load_hub_segmenter',
]


def load_model(source: Union[str, Path], allow_unverified: Optional[bool] = None, **kwargs) -> nn.Module:
    """Any saved zoo model: a Lightning ``.ckpt``, a Hub folder, ``local-dir:``/``hf-hub:`` or ``ORG/NAME``.

    ``allow_unverified=True`` loads a folder that records no digests (refused otherwise); a checkpoint
    without the zoo's digest always loads, with an :class:`UnverifiedWeightsWarning`."""
    s = str(source)
    if Path(s).is_file():
        return load_lightning_checkpoint(s, **kwargs)
    return load_hub_model(s, allow_unverified=allow_unverified, **kwargs)
