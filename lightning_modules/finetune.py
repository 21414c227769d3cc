"""Fine-tuning helpers: load a backbone from a checkpoint under a new head, freeze the backbone.

For timm-hosted or local pretrained weights, timm's own mechanism already works through the
module's ``pretrained=True`` (and ``model_kwargs.pretrained_cfg_overlay.file`` for a local file);
:func:`load_backbone_weights` adds zoo / Lightning checkpoints, whose keys carry a ``model.``
prefix, and accepts a classifier of another size (it is left at its fresh initialisation).
"""
from pathlib import Path
from typing import Dict, Union

import torch
import torch.nn as nn

from zoo.hub import verify_checkpoint

from .optim import head_parameters

__all__ = ['read_state_dict', 'load_backbone_weights', 'freeze_backbone']


def read_state_dict(path: Union[str, Path]) -> Dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file, a plain state dict or a Lightning checkpoint (safe loaders only)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f'Checkpoint {path} does not exist')
    try:
        if path.suffix == '.safetensors':
            from safetensors.torch import load_file
            return load_file(str(path))
        obj = torch.load(path, map_location='cpu', weights_only=True)
    except Exception as e:  # truncated / corrupt / not a checkpoint
        raise ValueError(f'Cannot read checkpoint {path} ({type(e).__name__}: {e}); is it complete?') from e
    verify_checkpoint(obj, path)  # a zoo-written checkpoint whose tensors changed on disk is refused
    if isinstance(obj, dict) and isinstance(obj.get('state_dict'), dict):
        obj = obj['state_dict']
    if not isinstance(obj, dict):
        raise ValueError(f'{path} does not hold a state dict')
    if any(k.startswith('model.') for k in obj):  # a zoo Lightning checkpoint: keep the model, not the EMA copy
        obj = {k[len('model.'):]: v for k, v in obj.items() if k.startswith('model.')}
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in obj.items()}


def load_backbone_weights(model: nn.Module, path: Union[str, Path]) -> None:
    """Load every weight of ``path`` into ``model``; a classifier of another shape is skipped."""
    state = read_state_dict(path)
    own = model.state_dict()
    head_names = {n for n, p in model.named_parameters() if any(p is h for h in head_parameters(model))}
    skipped = [k for k in state if k in head_names and state[k].shape != own[k].shape]
    for k in skipped:
        del state[k]
    bad_shape = [f'{k}: {tuple(v.shape)} vs {tuple(own[k].shape)}' for k, v in state.items()
                 if k in own and v.shape != own[k].shape]
    if bad_shape:
        raise ValueError(f'{path} does not fit the model: ' + '; '.join(bad_shape[:5]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if k not in head_names]
    if missing or unexpected:
        raise ValueError(f'{path} does not fit the model: missing {missing[:5]}, unexpected {unexpected[:5]}')


def freeze_backbone(model: nn.Module) -> None:
    """Only the classifier keeps training (norm estimates / running statistics still update in train mode)."""
    head = {id(p) for p in head_parameters(model)}
    if not head:
        raise ValueError(f'{type(model).__name__} has no classifier to keep trainable')
    for p in model.parameters():
        p.requires_grad_(id(p) in head)
