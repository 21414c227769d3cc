"""Task models (segmenters, detectors) in Hub-style folders and Lightning checkpoints: one code path for both.

timm builds the classifiers and the TSM video models, so theirs are timm folders (:mod:`zoo.hub.folders`).
Segmenters (``zoo.create_segmenter``) and detectors (``zoo.create_detector``) come from the zoo's task
registries, so their ``config.json`` is the zoo's own, with the same guarantees::

    {"task": "detection", "architecture": "maskrcnn_resnet18_fpn_wsbcn", "num_classes": 3,
     "model_args": {"min_size": 64, "max_size": 96, ...},       # create_detector / create_segmenter kwargs
     "label_names": [...],
     "pretrained_cfg": {"mean": [...], "std": [...], "eval_size": 64, "input_size": [3, 64, 64], ...},
     "zoo": {"state_dict_sha256": ..., "model_config_sha256": ..., "weights": "model.safetensors"}}

``task`` picks the registry (:data:`TASK_KINDS`: ``"segmentation"`` -> ``SEGMENTERS``, ``"detection"`` ->
``DETECTORS``) and is one of the fields the ``model_config_sha256`` digest covers (with ``architecture``,
``num_classes``, ``model_args``): an edit is refused as for classifiers. A task or architecture this zoo
does not have, and weights that do not match their digest, are errors naming the file.

A model built here carries ``pretrained_cfg`` (architecture, task, num_classes, mean, std, eval_size,
label_names, source), ``_model_args`` (its builder kwargs) and ``num_classes``, as timm models do, so that publishing
treats all models alike. A detector normalizes and resizes its images itself, so its mean, std,
``eval_size`` (shorter side) and ``max_size`` are read from its ``GeneralizedRCNNTransform``.

The task names of the timm models live here too (:func:`model_task`): ``"classification"``, and
``"video-classification"`` for a model built with ``num_segments`` (``VideoClassifier`` passes it), whose
input is a clip (B, C, T, H, W).
"""
import importlib
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import safetensors.torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .reading import WeightsError, load_weights, read_weights, state_dict_sha256, strip_to_model_keys

__all__ = ['CLASSIFICATION_TASK', 'VIDEO_TASK', 'SEGMENTATION_TASK', 'DETECTION_TASK', 'TASK_KINDS', 'TaskKind',
           'model_task', 'is_task_model', 'is_segmenter', 'clip_frames', 'checkpoint_task', 'task_build_kwargs',
           'annotate_task_model', 'task_model_from_checkpoint', 'save_hub_task_model', 'load_hub_task_model']

CLASSIFICATION_TASK = 'classification'
VIDEO_TASK = 'video-classification'
SEGMENTATION_TASK = 'segmentation'
DETECTION_TASK = 'detection'

# No effect on the weights or on eval outputs: left out of the recorded build kwargs.
_TRAINING_ONLY_KWARGS = ('pretrained_backbone', 'checkpoint_head', 'checkpoint_heads')
_DEFAULT_EVAL_SIZE = 128  # round-trip input when the run recorded no eval size


class TaskKind:
    """What differs between the task-model families; everything else is shared below."""
    task = ''
    registry_name = ('', '')  # (module, attribute): imported lazily, those modules import zoo.hub through zoo
    module_marker = ''  # in the class path of the family's LightningModule

    def registry(self):
        module, attr = self.registry_name
        return getattr(importlib.import_module(module), attr)

    def backbone(self, name: str) -> str:
        """The backbone of a model name (``''`` when the name does not say)."""
        raise NotImplementedError

    def without_download(self, name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        """Kwargs that rebuild a pretrained-backbone run's architecture without downloading: the backbone tag's
        build args (e.g. ``ws_formula='bcn'`` for ``resnet50_wsbcn.in1k``) as ``backbone_kwargs``, under those the
        run gave explicitly."""
        from zoo.models._weights import _spec
        from zoo.segmentation.deeplabv3 import backbone_variant
        backbone = self.backbone(name)
        if not backbone or backbone_variant(backbone) == 'bn':
            return kwargs
        spec = _spec(f'{backbone}.in1k')
        tag_args = {k: v for k, v in dict(getattr(spec, 'model_args', None) or {}).items() if kwargs.get(k) is None}
        backbone_kwargs = dict(tag_args, **kwargs.get('backbone_kwargs', {}))
        return dict(kwargs, backbone_kwargs=backbone_kwargs) if backbone_kwargs else kwargs

    def checkpoint_kwargs(self, entries: Mapping[str, Any]) -> Dict[str, Any]:
        """Build kwargs the LightningModule keeps in its checkpoint outside its hyper-parameters."""
        return {}

    def checkpoint_labels(self, entries: Mapping[str, Any]) -> Optional[list]:
        """Class names by label that the LightningModule keeps in its checkpoint."""
        return None

    def applied_cfg(self, model: nn.Module) -> Dict[str, Any]:
        """Preprocessing the model applies itself (these values win over any other)."""
        return {}

    def num_classes(self, model: nn.Module) -> int:
        return int(model.num_classes)


class Segmenters(TaskKind):
    task = SEGMENTATION_TASK
    registry_name = ('zoo.segmentation', 'SEGMENTERS')
    module_marker = '.segmentation.'

    def backbone(self, name: str) -> str:
        return name[len('deeplabv3_'):] if name.startswith('deeplabv3_') else ''


class Detectors(TaskKind):
    task = DETECTION_TASK
    registry_name = ('zoo.detection', 'DETECTORS')
    module_marker = '.detection.'

    def backbone(self, name: str) -> str:
        from zoo.detection.models import detector_backbone
        return detector_backbone(name)[0]

    def without_download(self, name: str, kwargs: Dict[str, Any]) -> Dict[str, Any]:
        from zoo.detection.models import detector_backbone
        if detector_backbone(name)[1] is None and kwargs.get('frozen_bn') is None:
            return dict(kwargs, frozen_bn=True)  # the BN baseline freezes its BN with a pretrained backbone
        return super().without_download(name, kwargs)

    def checkpoint_kwargs(self, entries: Mapping[str, Any]) -> Dict[str, Any]:
        size = entries.get('detector_input_size')  # DetectionModule: the DataModule's sizes, which it resized with
        if not size:
            return {}
        min_size = [int(s) for s in size['min_size']]
        return {'min_size': min_size[0] if len(min_size) == 1 else min_size, 'max_size': int(size['max_size'])}

    def checkpoint_labels(self, entries: Mapping[str, Any]) -> Optional[list]:
        categories = entries.get('coco_categories')  # DetectionModule: label c is categories[c - 1]
        return ['__background__'] + [str(c['name']) for c in categories] if categories else None

    def num_classes(self, model: nn.Module) -> int:
        return int(model.roi_heads.box_predictor.cls_score.out_features)  # torchvision keeps no num_classes

    def applied_cfg(self, model: nn.Module) -> Dict[str, Any]:
        t = model.transform  # torchvision's GeneralizedRCNNTransform
        return dict(mean=tuple(t.image_mean), std=tuple(t.image_std), eval_size=int(t.min_size[-1]),
                    max_size=int(t.max_size))


TASK_KINDS: Dict[str, TaskKind] = {k.task: k for k in (Segmenters(), Detectors())}


# ----------------------------------------------------------------------------------- which task

def model_task(model: nn.Module) -> str:
    """A task model's ``task``; for timm models, ``'video-classification'`` for a clip model (TSM's
    ``num_segments``, or a model built with that kwarg, as ``VideoClassifier`` builds any)."""
    task = (getattr(model, 'pretrained_cfg', None) or {}).get('task')
    if task in TASK_KINDS:
        return task
    video = hasattr(model, 'num_segments') or 'num_segments' in (getattr(model, '_model_args', None) or {})
    return VIDEO_TASK if video else CLASSIFICATION_TASK


def is_task_model(model: nn.Module) -> bool:
    """A segmenter or detector built here or loaded from a folder / checkpoint."""
    return model_task(model) in TASK_KINDS


def is_segmenter(model: nn.Module) -> bool:
    return model_task(model) == SEGMENTATION_TASK


def clip_frames(model: nn.Module) -> int:
    """The frames T of a video model's clips (its ``num_segments``)."""
    return int(getattr(model, 'num_segments', None) or model._model_args['num_segments'])


def checkpoint_task(hparams: Mapping[str, Any], model_name: Optional[str] = None) -> str:
    """The task of a Lightning checkpoint: its LightningModule's class path, or a model name that a task registry
    lists; ``'video-classification'`` for a ``VideoClassifier`` (``num_segments``), else ``'classification'``."""
    class_path = str(hparams.get('_class_path') or '')
    name = model_name or hparams.get('model_name')
    for kind in TASK_KINDS.values():
        if kind.module_marker in class_path or (isinstance(name, str) and name in kind.registry()):
            return kind.task
    return VIDEO_TASK if '.video.' in class_path or 'num_segments' in hparams else CLASSIFICATION_TASK


def registry_listing(name: str):
    """The task registry (:class:`zoo.task_registry.TaskRegistry` of segmenters or detectors) that lists
    ``name``, or ``None``: for callers that take any zoo model name and must tell a task model from a timm one."""
    kind = _kind_listing(name)
    return kind.registry() if kind is not None else None


def _kind_listing(name: str) -> Optional[TaskKind]:
    """The kind whose registry lists ``name``, or ``None``."""
    return next((k for k in TASK_KINDS.values() if name in k.registry()), None)


def _kind(task: Optional[str], name: str) -> TaskKind:
    """The kind of ``task``, or (None) of the registry that lists ``name``."""
    if task is not None:
        return TASK_KINDS[task]
    kind = _kind_listing(name)
    if kind is None:
        from zoo.factory import UnknownModelError  # lazily: zoo.factory imports the models, which import zoo.hub
        raise UnknownModelError(f'Unknown task model {name!r}: no task registry lists it '
                                f'(zoo.list_segmenters(), zoo.list_detectors()).')
    return kind


# ----------------------------------------------------------------------------------- checkpoints

def task_build_kwargs(name: str, hparams: Mapping[str, Any], entries: Optional[Mapping[str, Any]] = None,
                      task: Optional[str] = None) -> Dict[str, Any]:
    """The builder kwargs that rebuild a run's architecture (no pretrained download, no training-only switch)
    from its LightningModule's hyper-parameters and checkpoint ``entries`` (a detector's input size)."""
    kind = _kind(task, name)
    kwargs = {k: v for k, v in dict(hparams.get('model_kwargs') or {}).items() if k not in _TRAINING_ONLY_KWARGS}
    if hparams.get('num_classes') is not None:
        kwargs['num_classes'] = int(hparams['num_classes'])
    backbone_kwargs = {k: v for k, v in dict(kwargs.pop('backbone_kwargs', None) or {}).items()
                       if k != 'checkpoint_stages'}
    if backbone_kwargs:
        kwargs['backbone_kwargs'] = backbone_kwargs
    if hparams.get('pretrained_backbone'):
        kwargs = kind.without_download(name, kwargs)
    kwargs.update(kind.checkpoint_kwargs(entries or {}))
    return json.loads(json.dumps(kwargs))  # JSON-able: tuples as lists, as they read back


def annotate_task_model(model: nn.Module, name: str, build_kwargs: Mapping[str, Any], task: Optional[str] = None,
                        **cfg) -> nn.Module:
    """Attach ``pretrained_cfg`` and ``_model_args`` (see the module docstring); ``task`` defaults to the
    registry that lists ``name``."""
    kind = _kind(task, name)
    model.num_classes = kind.num_classes(model)  # as timm models and the segmenters have it
    base = dict(architecture=name, task=kind.task, num_classes=model.num_classes,
                mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), eval_size=None)
    base.update({k: v for k, v in cfg.items() if v is not None})
    base.update(kind.applied_cfg(model))
    model.pretrained_cfg = base
    model._model_args = dict(build_kwargs)
    return model


def task_model_from_checkpoint(ckpt, model_name: Optional[str] = None, strict: bool = True, use_ema: bool = True,
                               task: Optional[str] = None, **kwargs) -> nn.Module:
    """The segmenter or detector inside a read :class:`~zoo.hub.lightning.LightningCheckpoint` (its EMA copy by
    the reader's rule); ``kwargs`` override the recorded builder kwargs."""
    task = task or checkpoint_task(ckpt.hparams, model_name)
    name = model_name or ckpt.hparams.get('model_name')
    if not isinstance(name, str):
        raise WeightsError(f'{ckpt.path}: the {task} checkpoint does not name its model (no model_name '
                           f'hyper-parameter); pass model_name=...')
    kind = TASK_KINDS[task]
    build_kwargs = dict(task_build_kwargs(name, ckpt.hparams, ckpt.entries, task), **kwargs)
    model = kind.registry().create(name, **build_kwargs)  # an unknown name: the zoo's close-match error
    state_dict = strip_to_model_keys(ckpt.state_dict, model.state_dict().keys(), use_ema=use_ema)
    load_weights(model, state_dict, strict=strict)
    return annotate_task_model(model, name, build_kwargs, task=task, source=str(ckpt.path),
                               label_names=kind.checkpoint_labels(ckpt.entries))


# ----------------------------------------------------------------------------------- folders

def save_hub_task_model(
        model: nn.Module,
        folder: Union[str, Path],
        label_names: Optional[Any] = None,
        data_config: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` and the zoo's ``config.json`` (with both digests) to ``folder``.

    ``model`` is a task model from :func:`task_model_from_checkpoint` / :func:`load_hub_task_model` (or any
    registry-built model passed through :func:`annotate_task_model`). ``data_config`` overrides mean / std /
    eval_size / input_size, except what a detector applies itself; ``pretrained_cfg`` adds other fields.
    """
    from .folders import CONFIG_NAME, WEIGHTS_NAME, ZOO_CONFIG_KEY, model_config_sha256
    if not is_task_model(model):
        raise ValueError('save_hub_task_model: the model carries no task pretrained_cfg; build it with '
                         'zoo.hub.task_models.annotate_task_model(model, name, build_kwargs)')
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    task = model_task(model)
    cfg = dict(model.pretrained_cfg)
    cfg.update({k: v for k, v in (data_config or {}).items() if v is not None})
    cfg.update(pretrained_cfg or {})
    cfg.update(TASK_KINDS[task].applied_cfg(model))
    name = cfg.pop('architecture')
    for k in ('task', 'source', 'label_names', 'num_classes'):
        cfg.pop(k, None)
    size = cfg.get('eval_size') or _DEFAULT_EVAL_SIZE
    cfg.setdefault('input_size', [3, size, size])
    cfg = json.loads(json.dumps(cfg))  # tuples as lists, as they read back
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config: Dict[str, Any] = {
        'task': task, 'architecture': name, 'num_classes': int(model.num_classes),
        'model_args': json.loads(json.dumps(getattr(model, '_model_args', {}))),
        'pretrained_cfg': dict(cfg, num_classes=int(model.num_classes)),
    }
    labels = label_names if label_names is not None else model.pretrained_cfg.get('label_names')
    if labels:
        config['label_names'] = list(labels)
    config[ZOO_CONFIG_KEY] = dict(extra or {}, state_dict_sha256=state_dict_sha256(state_dict), weights=WEIGHTS_NAME)
    config[ZOO_CONFIG_KEY]['model_config_sha256'] = model_config_sha256(config)
    safetensors.torch.save_file(state_dict, str(folder / WEIGHTS_NAME), metadata={'format': 'pt'})
    (folder / CONFIG_NAME).write_text(json.dumps(config, indent=2))
    return folder


def load_hub_task_model(folder: Path, label: str, config: Mapping[str, Any], **kwargs) -> nn.Module:
    """The task model of a folder whose ``config.json`` (already checked by ``verify_model_config``) records a
    task of :data:`TASK_KINDS`: weights read safely, checked against their digest, keys and shapes, then loaded.
    ``kwargs`` override the recorded builder kwargs. Called by :func:`zoo.load_hub_model`."""
    from .folders import CONFIG_NAME, WEIGHTS_NAME, _recorded_sha256, verify_state_dict
    task, name = config['task'], config.get('architecture')
    if not isinstance(name, str):
        raise WeightsError(f'{folder / CONFIG_NAME}: names no {task} model ("architecture").')
    try:
        builder = TASK_KINDS[task].registry().builder(name)
    except RuntimeError as e:  # the registry's UnknownModelError, with the close matches
        raise type(e)(f'{folder / CONFIG_NAME}: {e}') from None
    weights = folder / WEIGHTS_NAME
    state_dict = read_weights(weights)
    verify_state_dict(state_dict, _recorded_sha256(config), str(weights))  # the message names the file
    build_kwargs = dict(config.get('model_args') or {}, **kwargs)
    model = builder(**build_kwargs)
    try:
        load_weights(model, state_dict, strict=True)
    except WeightsError as e:
        raise WeightsError(f'Weights of {label} ({weights}) do not fit {name}: {e}') from e
    cfg = dict(config.get('pretrained_cfg') or {})
    cfg.pop('num_classes', None)
    return annotate_task_model(model, name, build_kwargs, task=task, label_names=config.get('label_names'),
                               source=label, **cfg)
