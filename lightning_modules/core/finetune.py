"""Fine-tuning helpers: load a backbone from a checkpoint under a new head, freeze the backbone,
say what pretrained weights were loaded, and pick BCN's batch stage for the images per device.

For timm-hosted or local pretrained weights, timm's own mechanism already works through the
module's ``pretrained=True`` (and ``model_kwargs.pretrained_cfg_overlay.file`` for a local file);
:func:`load_backbone_weights` adds zoo / Lightning checkpoints, whose keys carry a ``model.``
prefix, and accepts a classifier of another size (it is left at its fresh initialisation). Files are
read by the zoo's one checkpoint reader (:func:`zoo.hub.read_state_dict`): a checkpoint with an EMA
copy that fits gives the EMA weights, as every zoo loader does.
"""
from pathlib import Path
from typing import Optional, Union

import torch.nn as nn

from zoo.hub import WeightsError, read_state_dict
from zoo.layers import BCN_BATCH_STAGES, BatchChannelNorm2d, set_bcn_batch_stage
from .optim import head_parameters

__all__ = ['read_state_dict', 'load_backbone_weights', 'freeze_backbone', 'describe_pretrained',
           'choose_bcn_batch_stage', 'MICRO_BATCH']

# Below this many images per device, batch statistics are unreliable: BN's error grows quickly
# under 16 images per GPU (Wu & He, Group Normalization, 2018, Fig. 1).
MICRO_BATCH = 16


def load_backbone_weights(model: nn.Module, path: Union[str, Path], use_ema: bool = True) -> None:
    """Load every weight of ``path`` into ``model``; a classifier of another shape is skipped."""
    own = model.state_dict()
    state = read_state_dict(path, model_keys=own.keys(), use_ema=use_ema)
    head_names = {n for n, p in model.named_parameters() if any(p is h for h in head_parameters(model))}
    skipped = [k for k in state if k in head_names and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    bad_shape = [f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
    if bad_shape:
        raise WeightsError(f'{path} does not fit the model: ' + '; '.join(bad_shape[:5]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_names]
    if missing or unexpected:
        raise WeightsError(f'{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}')


def freeze_backbone(model: nn.Module) -> None:
    """Only the classifier keeps training (norm estimates / running statistics still update in train mode)."""
    head = {id(p) for p in head_parameters(model)}
    if not head:
        raise ValueError(f'{type(model).__name__} has no classifier to keep trainable')
    for p in model.parameters():
        p.requires_grad_(id(p) in head)


def describe_pretrained(model: nn.Module, num_classes: int) -> str:
    """One line on the pretrained weights timm loaded: source, tag, and whether the head is new."""
    cfg = getattr(model, 'pretrained_cfg', None) or {}
    source = next((f'{k} {cfg[k]}' for k in ('file', 'hf_hub_id', 'url') if cfg.get(k)), 'unknown source')
    trained_classes = cfg.get('num_classes')
    head = ('the trained head kept' if trained_classes in (None, num_classes)
            else f'a new {num_classes}-class head (the weights have {trained_classes} classes)')
    return f"Pretrained weights: {cfg.get('architecture', '?')}.{cfg.get('tag') or '(no tag)'} from {source}; {head}"


def choose_bcn_batch_stage(model: nn.Module, images_per_device: Optional[int],
                           batch_stage: Optional[str] = None) -> Optional[str]:
    """Set the batch stage of ``model``'s BCN layers for fine-tuning; a message when something changed.

    ``batch_stage`` ``'estimated'`` or ``'batch'`` is applied as given. ``None`` switches a
    large-batch (``'batch'``) stage, as in the authors' BCN+WS ImageNet weights, to the estimated
    stage when a device trains on fewer than :data:`MICRO_BATCH` images: batch statistics of 1-2
    images are exactly what BCN exists to avoid. The estimates start from the weights' running
    statistics (their update count is kept, so the first batches do not overwrite them).
    """
    if batch_stage is not None and batch_stage not in BCN_BATCH_STAGES:
        raise ValueError(f'bcn_batch_stage must be one of {BCN_BATCH_STAGES} or None, got {batch_stage!r}')
    stages = {m.batch_stage for m in model.modules() if isinstance(m, BatchChannelNorm2d)}
    if not stages:
        return None
    target = batch_stage
    if target is None:
        if 'batch' not in stages or images_per_device is None or images_per_device >= MICRO_BATCH:
            return None
        target = 'estimated'
    if stages == {target}:
        return None
    set_bcn_batch_stage(model, target)
    why = 'as asked (bcn_batch_stage)' if batch_stage else (
        f'because a device trains on {images_per_device} images (< {MICRO_BATCH}); '
        f"set bcn_batch_stage: batch to keep batch statistics")
    return f'BCN batch stage: {", ".join(sorted(stages))} -> {target}, starting from the running statistics, {why}'
