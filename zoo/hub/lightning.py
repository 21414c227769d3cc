"""Lightning checkpoints: what they say about their model and run, and the model inside them (its EMA
copy by the reader's EMA rule, :mod:`zoo.hub.reading`)."""
import warnings
from copy import deepcopy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import timm
import torch
import torch.nn as nn
from timm.models import is_model, split_model_name_tag

from .reading import (
    CHECKPOINT_DIGEST_KEY, WeightsError, load_weights, read_weights, strip_to_model_keys, verify_checkpoint)
from .task_models import TASK_KINDS, checkpoint_task, task_model_from_checkpoint

__all__ = ['LightningCheckpoint', 'read_lightning_checkpoint', 'load_lightning_checkpoint']


_MODEL_NAME_KEYS = ('model_name', 'model', 'arch', 'architecture', 'backbone')
_MODEL_KWARG_KEYS = ('num_classes', 'in_chans', 'ws_formula', 'norm_groups', 'norm_kwargs', 'global_pool',
                     'num_segments')  # VideoClassifier's frames per clip, a model kwarg of TSM
_MODEL_KWARGS_DICTS = ('model_kwargs', 'model_args')
_WEIGHT_ENTRIES = ('state_dict', 'optimizer_states')


@dataclass
class LightningCheckpoint:
    """What a Lightning checkpoint tells about the model it holds and the run that produced it."""
    path: Path
    state_dict: Dict[str, torch.Tensor]
    hparams: Dict[str, Any]
    model_name: Optional[str]
    model_kwargs: Dict[str, Any] = field(default_factory=dict)
    epoch: Optional[int] = None
    global_step: Optional[int] = None
    epochs_completed: Optional[int] = None
    monitor: Optional[str] = None
    best_score: Optional[float] = None
    verified: bool = False  # its tensors matched the zoo_sha256 digest recorded in it (False: it has none)
    # Its other top-level entries but the optimizer state: loops, callbacks, and what the LightningModule's
    # on_save_checkpoint added (a detector's input size and COCO categories).
    entries: Dict[str, Any] = field(default_factory=dict)


def _epochs_completed(ckpt: Mapping[str, Any]) -> Optional[int]:
    """Whole epochs trained, from the fit loop's progress (``epoch`` alone is off by one after fit).

    A checkpoint written at the last training batch of an epoch (``every_n_train_steps`` landing on the run's
    last step) precedes that epoch's count: its batch progress says the epoch's batches were all processed."""
    try:
        fit = ckpt['loops']['fit_loop']
        epochs = fit['epoch_progress']['current']
        done = int(epochs['processed'])
        batches = fit.get('epoch_loop.batch_progress') or {}
        in_epoch = int(epochs['started']) > done
        if in_epoch and batches.get('is_last_batch') and batches['current']['processed'] == batches['current']['ready']:
            done += 1  # its last batch was trained; only the epoch-end bookkeeping was still to come
        return done
    except (KeyError, TypeError, ValueError):
        return None


def _walk(d: Any):
    if isinstance(d, Mapping):
        for k, v in d.items():
            yield k, v
            yield from _walk(v)


def _find_model_name(hparams: Mapping[str, Any]) -> Optional[str]:
    for k, v in _walk(hparams):
        if k in _MODEL_NAME_KEYS and isinstance(v, str) and is_model(split_model_name_tag(v)[0]):
            return v
    return None


def _find_model_kwargs(hparams: Mapping[str, Any]) -> Dict[str, Any]:
    kwargs = {}
    for k, v in _walk(hparams):
        if k in _MODEL_KWARGS_DICTS and isinstance(v, Mapping):
            kwargs.update(v)
    for k in _MODEL_KWARG_KEYS:
        if k in hparams and hparams[k] is not None:
            kwargs.setdefault(k, deepcopy(hparams[k]))
    return kwargs


def read_lightning_checkpoint(path: Union[str, Path]) -> LightningCheckpoint:
    """Read (``weights_only=True``) a Lightning ``.ckpt``: state dict, hyper-parameters, best score."""
    path = Path(path)
    ckpt = read_weights(path)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get('state_dict'), Mapping):
        raise WeightsError(f'{path} is not a Lightning checkpoint (no "state_dict" entry).')
    verify_checkpoint(ckpt, path)
    hparams = dict(ckpt.get('hyper_parameters') or {})
    monitor = best = None
    for state in (ckpt.get('callbacks') or {}).values():
        if isinstance(state, Mapping) and state.get('best_model_score') is not None:
            monitor, best = state.get('monitor'), float(state['best_model_score'])
            break
    return LightningCheckpoint(
        path=path, state_dict=dict(ckpt['state_dict']), hparams=hparams, model_name=_find_model_name(hparams),
        model_kwargs=_find_model_kwargs(hparams), epoch=ckpt.get('epoch'), global_step=ckpt.get('global_step'),
        epochs_completed=_epochs_completed(ckpt),
        monitor=monitor, best_score=best, verified=bool(ckpt.get(CHECKPOINT_DIGEST_KEY)),
        entries={k: v for k, v in ckpt.items() if k not in _WEIGHT_ENTRIES})


def load_lightning_checkpoint(
        path: Union[str, Path],
        model_name: Optional[str] = None,
        strict: bool = True,
        use_ema: bool = True,
        **kwargs,
) -> nn.Module:
    """The timm / zoo model inside a Lightning checkpoint, with its weights (its EMA copy if it has one).

    The architecture comes from ``model_name`` or the checkpoint's hyper-parameters (``model_name``,
    ``model``, ``arch``; plus ``num_classes``, ``ws_formula``, ``norm_kwargs``, ``model_kwargs``);
    the LightningModule's attribute prefix (``model.``) is found by matching the model's keys.
    A ``SemanticSegmenter`` or ``DetectionModule`` checkpoint gives its segmenter or detector
    (``zoo.create_segmenter`` / ``zoo.create_detector`` with the run's ``num_classes``, ``model_kwargs`` and,
    for a detector, the input size it resized to; see :mod:`zoo.hub.task_models`); a ``VideoClassifier``
    checkpoint its TSM model with the run's ``num_segments``.
    """
    ckpt = read_lightning_checkpoint(path)
    if not ckpt.verified:
        from .folders import UnverifiedWeightsWarning
        warnings.warn(f'{path} carries no {CHECKPOINT_DIGEST_KEY} digest (not written by zoo-train): its tensors are '
                      f'loaded unverified.', UnverifiedWeightsWarning, stacklevel=2)
    task = checkpoint_task(ckpt.hparams, model_name)
    if task in TASK_KINDS:
        return task_model_from_checkpoint(ckpt, model_name=model_name, strict=strict, use_ema=use_ema, task=task,
                                          **kwargs)
    name = model_name or ckpt.model_name
    if not name:
        raise WeightsError(
            f'{path}: the checkpoint does not name its model (no model_name/model/arch hyper-parameter); '
            f'pass model_name=...')
    build_kwargs = {k: v for k, v in ckpt.model_kwargs.items() if k not in ('pretrained', 'pretrained_cfg_overlay')}
    build_kwargs.update(kwargs)
    model = timm.create_model(name, **build_kwargs)
    state_dict = strip_to_model_keys(ckpt.state_dict, model.state_dict().keys(), use_ema=use_ema)
    classifier = model.pretrained_cfg.get('classifier') or 'fc'
    w = state_dict.get(f'{classifier}.weight')
    if 'num_classes' not in build_kwargs and w is not None and w.shape[0] != getattr(model, 'num_classes', w.shape[0]):
        model = timm.create_model(name, **dict(build_kwargs, num_classes=w.shape[0]))
    load_weights(model, state_dict, strict=strict)
    return model
