"""Segmenters (DeepLabV3, ``zoo.create_segmenter``) in Hub-style folders and Lightning checkpoints.

The same guarantees as the classifiers' folders (:mod:`zoo.hub.folders`), with the zoo's own
``config.json`` instead of timm's (timm builds no segmenters)::

    {"task": "segmentation", "architecture": "deeplabv3_resnet18_wsbcn", "num_classes": 11,
     "model_args": {"output_stride": 16, "aux_loss": false, ...},     # create_segmenter kwargs
     "label_names": [...],
     "pretrained_cfg": {"mean": [...], "std": [...], "eval_size": 180, "input_size": [3, 180, 180], ...},
     "zoo": {"state_dict_sha256": ..., "model_config_sha256": ..., "weights": "model.safetensors"}}

``task`` is one of the fields the ``model_config_sha256`` digest covers (with ``architecture``,
``num_classes``, ``model_args``): an edit is refused as for classifiers. :func:`zoo.load_hub_model`
(and so ``zoo.load_model``) reads ``task`` and builds a segmenter from such a folder or Hub repo;
``zoo.load_lightning_checkpoint`` builds one from a ``SemanticSegmenter`` checkpoint.

A segmenter built here carries ``pretrained_cfg`` (architecture, task, num_classes, mean, std,
eval_size, label_names, source) and ``_model_args`` (its ``create_segmenter`` kwargs), as timm
models do, so that publishing can treat both alike.
"""
import json
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Union

import safetensors.torch
import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

from .reading import WeightsError, load_weights, read_weights, state_dict_sha256, strip_to_model_keys

__all__ = ['SEGMENTATION_TASK', 'checkpoint_task', 'segmenter_build_kwargs', 'segmenter_from_checkpoint',
           'annotate_segmenter', 'save_hub_segmenter', 'load_hub_segmenter', 'is_segmenter']

SEGMENTATION_TASK = 'segmentation'
_TRAINING_ONLY_KWARGS = ('pretrained_backbone', 'checkpoint_head')  # no effect on the weights or eval outputs
_DEFAULT_EVAL_SIZE = 128  # round-trip input when the run recorded no eval size


def _segmenters():
    from zoo.segmentation import SEGMENTERS  # lazily: zoo.segmentation imports zoo.hub through zoo
    return SEGMENTERS


def is_segmenter(model: nn.Module) -> bool:
    """A model built here or loaded from a segmenter folder / checkpoint."""
    return (getattr(model, 'pretrained_cfg', None) or {}).get('task') == SEGMENTATION_TASK


def checkpoint_task(hparams: Mapping[str, Any], model_name: Optional[str] = None) -> str:
    """``'segmentation'`` for a ``SemanticSegmenter`` checkpoint (its class path, or a model name that is a
    registered segmenter), else ``'classification'``."""
    class_path = str(hparams.get('_class_path') or '')
    name = model_name or hparams.get('model_name')
    if '.segmentation.' in class_path or (isinstance(name, str) and name in _segmenters()):
        return SEGMENTATION_TASK
    return 'classification'


def _backbone_tag_args(name: str) -> Dict[str, Any]:
    """The build args a pretrained backbone's tag applied (e.g. ``ws_formula='bcn'`` for ``resnet50_wsbcn.in1k``),
    so that the architecture is rebuilt without downloading the ImageNet weights."""
    from zoo.models._weights import _spec
    from zoo.segmentation.deeplabv3 import backbone_variant
    backbone = name[len('deeplabv3_'):] if name.startswith('deeplabv3_') else ''
    if not backbone or backbone_variant(backbone) == 'bn':
        return {}
    spec = _spec(f'{backbone}.in1k')
    return dict(getattr(spec, 'model_args', None) or {})


def segmenter_build_kwargs(name: str, hparams: Mapping[str, Any]) -> Dict[str, Any]:
    """The ``create_segmenter(name, **kwargs)`` kwargs that rebuild a run's architecture (no pretrained download,
    no training-only switches) from its ``SemanticSegmenter`` hyper-parameters."""
    kwargs = {k: v for k, v in dict(hparams.get('model_kwargs') or {}).items() if k not in _TRAINING_ONLY_KWARGS}
    if hparams.get('num_classes') is not None:
        kwargs['num_classes'] = int(hparams['num_classes'])
    backbone_kwargs = {k: v for k, v in dict(kwargs.pop('backbone_kwargs', None) or {}).items()
                       if k != 'checkpoint_stages'}
    if hparams.get('pretrained_backbone'):
        backbone_kwargs = dict(_backbone_tag_args(name), **backbone_kwargs)
    if backbone_kwargs:
        kwargs['backbone_kwargs'] = backbone_kwargs
    for k, v in list(kwargs.items()):  # JSON-able: tuples as lists
        if isinstance(v, tuple):
            kwargs[k] = list(v)
    return kwargs


def annotate_segmenter(model: nn.Module, name: str, build_kwargs: Mapping[str, Any], **cfg) -> nn.Module:
    """Attach ``pretrained_cfg`` and ``_model_args`` (see the module docstring)."""
    base = dict(architecture=name, task=SEGMENTATION_TASK, num_classes=int(model.num_classes),
                mean=tuple(IMAGENET_DEFAULT_MEAN), std=tuple(IMAGENET_DEFAULT_STD), eval_size=None)
    base.update({k: v for k, v in cfg.items() if v is not None})
    model.pretrained_cfg = base
    model._model_args = dict(build_kwargs)
    return model


def segmenter_from_checkpoint(ckpt, model_name: Optional[str] = None, strict: bool = True, use_ema: bool = True,
                              **kwargs) -> nn.Module:
    """The segmenter inside a read :class:`~zoo.hub.lightning.LightningCheckpoint` (its EMA copy by the reader's rule)."""
    name = model_name or ckpt.hparams.get('model_name')
    if not isinstance(name, str):
        raise WeightsError(f'{ckpt.path}: the segmentation checkpoint does not name its segmenter (no model_name '
                           f'hyper-parameter); pass model_name=...')
    build_kwargs = dict(segmenter_build_kwargs(name, ckpt.hparams), **kwargs)
    model = _segmenters().create(name, **build_kwargs)  # an unknown name: the zoo's close-match error
    state_dict = strip_to_model_keys(ckpt.state_dict, model.state_dict().keys(), use_ema=use_ema)
    load_weights(model, state_dict, strict=strict)
    return annotate_segmenter(model, name, build_kwargs, source=str(ckpt.path))


# ----------------------------------------------------------------------------------- folders

def save_hub_segmenter(
        model: nn.Module,
        folder: Union[str, Path],
        label_names: Optional[Any] = None,
        data_config: Optional[Dict[str, Any]] = None,
        pretrained_cfg: Optional[Dict[str, Any]] = None,
        extra: Optional[Dict[str, Any]] = None,
) -> Path:
    """Write ``model.safetensors`` and the segmenter ``config.json`` (with both digests) to ``folder``.

    ``model`` is a segmenter from :func:`segmenter_from_checkpoint` / :func:`load_hub_segmenter` (or any
    ``create_segmenter`` model passed through :func:`annotate_segmenter`). ``data_config`` overrides
    mean / std / eval_size / input_size; ``pretrained_cfg`` adds other fields (a description).
    """
    from .folders import CONFIG_NAME, WEIGHTS_NAME, ZOO_CONFIG_KEY, model_config_sha256
    if not is_segmenter(model):
        raise ValueError('save_hub_segmenter: the model carries no segmenter pretrained_cfg; build it with '
                         'zoo.hub.segmenters.annotate_segmenter(model, name, build_kwargs)')
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.pretrained_cfg)
    cfg.update({k: v for k, v in (data_config or {}).items() if v is not None})
    cfg.update(pretrained_cfg or {})
    name = cfg.pop('architecture')
    for k in ('task', 'source', 'label_names', 'num_classes'):
        cfg.pop(k, None)
    eval_size = cfg.get('eval_size')
    cfg.setdefault('input_size', [3, eval_size or _DEFAULT_EVAL_SIZE, eval_size or _DEFAULT_EVAL_SIZE])
    cfg = json.loads(json.dumps(cfg))  # tuples as lists, as they read back
    state_dict = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    config: Dict[str, Any] = {
        'task': SEGMENTATION_TASK, 'architecture': name, 'num_classes': int(model.num_classes),
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


def load_hub_segmenter(folder: Path, label: str, config: Mapping[str, Any], **kwargs) -> nn.Module:
    """The segmenter of a folder whose ``config.json`` (already checked by ``verify_model_config``) records
    ``"task": "segmentation"``: weights read safely, checked against their digest, keys and shapes, then loaded.
    ``kwargs`` override the recorded ``create_segmenter`` kwargs. Called by :func:`zoo.load_hub_model`."""
    from .folders import WEIGHTS_NAME, _recorded_sha256, verify_state_dict
    name = config.get('architecture')
    if not isinstance(name, str):
        raise WeightsError(f'{label}: its config.json names no segmenter ("architecture").')
    builder = _segmenters().builder(name)  # an unknown name: UnknownModelError with close matches
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
    return annotate_segmenter(model, name, build_kwargs, label_names=config.get('label_names'), source=label, **cfg)
