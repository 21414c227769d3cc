"""The normalization variants every zoo family comes in, and the norm layers they build.

A variant name is the suffix of a model name (``resnet50_wsbcn``): ``ws`` means every conv is a
:class:`~zoo.layers.WSConv2d`, the rest names the norm layer.
"""
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable, Dict, Optional

import torch.nn as nn
from timm.layers import GroupNorm
from timm.models import register_model

from zoo.layers import BatchChannelNorm2d, BatchGroupNorm2d

__all__ = ['NormVariant', 'NORM_VARIANTS', 'make_norm_layer', 'register_zoo_entrypoint']


@dataclass(frozen=True)
class NormVariant:
    ws: bool
    norm: str  # one of 'bn', 'gn', 'bcn', 'bgn'
    description: str


NORM_VARIANTS: Dict[str, NormVariant] = {
    'wsbcn': NormVariant(True, 'bcn', 'Weight Standardization + Batch-Channel Normalization'),
    'wsgn': NormVariant(True, 'gn', 'Weight Standardization + Group Normalization'),
    'wsbn': NormVariant(True, 'bn', 'Weight Standardization + Batch Normalization'),
    'bcn': NormVariant(False, 'bcn', 'Batch-Channel Normalization'),
    'gn': NormVariant(False, 'gn', 'Group Normalization'),
    'bgn': NormVariant(False, 'bgn', 'Batch Group Normalization'),
    'wsbgn': NormVariant(True, 'bgn', 'Weight Standardization + Batch Group Normalization'),
}
BN_VARIANT = NormVariant(False, 'bn', 'Batch Normalization')


def make_norm_layer(norm: str, num_groups: int, norm_kwargs: Optional[Dict[str, Any]] = None) -> Callable[..., nn.Module]:
    """A ``norm_layer(num_channels, device=, dtype=)`` factory for timm's ResNet blocks."""
    kw = dict(norm_kwargs or {})
    if norm == 'bn':
        return partial(nn.BatchNorm2d, **kw)
    if norm == 'gn':
        return partial(GroupNorm, num_groups=num_groups, **kw)
    if norm == 'bcn':
        return partial(BatchChannelNorm2d, num_groups=num_groups, **kw)
    if norm == 'bgn':
        return partial(BatchGroupNorm2d, num_groups=num_groups, **kw)
    raise ValueError(f'Unknown norm {norm!r}')


def register_zoo_entrypoint(name: str, module: str, doc: str, create: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``create(pretrained, **kwargs)`` in timm as the entrypoint ``name``.

    timm registers an entrypoint under its ``__name__`` and looks up its pretrained cfgs in
    ``default_cfgs`` of its ``__module__``, so both are set to what a hand-written ``def`` would have.
    """
    def entrypoint(pretrained: bool = False, **kwargs) -> nn.Module:
        return create(pretrained, **kwargs)

    entrypoint.__name__ = entrypoint.__qualname__ = name
    entrypoint.__module__ = module
    entrypoint.__doc__ = doc
    return register_model(entrypoint)
