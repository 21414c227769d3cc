"""Turn an existing CNN into a zoo normalization variant: WS convs, and GN / BCN / BGN / BN norms.

``convert_model(model, 'wsbcn')`` is what a user with their own network (a torchvision detector,
a timm CNN the zoo does not register, ...) needs to train it at 1-2 images per device. The model
is converted in place (and returned); channels, device, dtype, train / eval mode and the
``requires_grad`` of carried-over parameters are kept.

Convs: every ``nn.Conv2d`` becomes a :class:`~zoo.layers.WSConv2d` sharing its parameters (so the
state-dict keys and values stay). Convs that are already standardized (``WSConv2d``, timm's
``StdConv2d`` / ``ScaledStdConv2d`` / ``StdConv2dSame``) are left as they are; other ``nn.Conv2d``
subclasses (timm's ``Conv2dSame``, ...) have a forward of their own that WS would drop, so they are
refused. ``ConvTranspose2d``, 1-D / 3-D convs and ``nn.Linear`` are no 2-D convs and stay plain, as
in the paper (its classifier and mmdet's mask up-sampling stay plain too).

Norms handled (``N`` is the source's channels):

==================================================== =======================================
source                                               becomes
==================================================== =======================================
``nn.BatchNorm2d``, ``nn.SyncBatchNorm``,            the variant's norm over ``N`` channels
torchvision / timm ``FrozenBatchNorm2d``,
``nn.GroupNorm`` (timm ``GroupNorm`` too)
timm ``BatchNormAct2d``, ``SyncBatchNormAct``,       :class:`NormAct2d` (the new norm, then the
``FrozenBatchNormAct2d``, ``GroupNormAct``           source's own drop and activation)
==================================================== =======================================

Other ``torch.nn`` batch / instance norms (``BatchNorm1d``, ``BatchNorm3d``, ``InstanceNorm2d``, ...)
are refused with their module names; ``LayerNorm`` is left as it is. The zoo's own BCN / BGN layers
are left as they are for the same norm and refused for another. ``exclude`` keeps modules
(fnmatch patterns on their qualified names, e.g. ``'roi_heads.box_predictor*'``) unconverted.

What carries over from a source norm (frozen ones become trainable: norms are never frozen):

- its per-channel affine (weight, bias): into the new norm's per-channel affine (BN, GN, BGN) or
  into BCN's batch stage, whose affine it is; BCN's group-wise affine starts at (1, 0). This keeps,
  for example, zero-initialised last-norm gammas of residual blocks.
- its ``eps`` (unless ``norm_kwargs`` sets one);
- its BN running statistics, into BN, BCN's batch stage (per channel) or BGN (per group, pooled
  over the group's channels with the law of total variance), **only when they still describe the
  activations**: ``running_stats='auto'`` carries them when the conversion changes no conv (a
  variant without WS, or a network whose convs are WS already). Turning plain convs into WS convs
  rescales every conv output, so a plain network's statistics would be wrong; pass
  ``running_stats=True`` / ``False`` to decide yourself. Carried statistics count as trained: an
  estimated BCN stage then updates them at its ``momentum`` right away instead of restarting its
  warm-up (which would replace them by the first batch's statistics).

A plain ``nn.BatchNorm2d`` (or timm ``BatchNormAct2d``) is already the ``'wsbn'`` variant's norm and
is left as it is.

Channels not divisible by ``norm_groups`` (GN, BCN, BGN): an error that names every such module.
Pass ``norm_groups=divisor_groups(32)`` (the largest group count <= 32 that divides the channels) or
any ``fn(channels) -> groups`` to choose per layer instead.
"""
import fnmatch
import math
from typing import Any, Callable, Dict, Iterable, Optional, Union

import torch
import torch.nn as nn
from timm.layers import (
    BatchNormAct2d, FrozenBatchNormAct2d, GroupNormAct, ScaledStdConv2d, StdConv2d, StdConv2dSame, SyncBatchNormAct)
from torch.nn.modules.batchnorm import _NormBase
from torchvision.ops.misc import FrozenBatchNorm2d

from .layers import DEFAULT_WS_FORMULA, BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, WSFormula
from .models._variants import NORM_VARIANTS, NormVariant, make_norm_layer

__all__ = ['convert_model', 'divisor_groups', 'NormAct2d', 'ConversionError']

_STANDARDIZED_CONVS = (WSConv2d, StdConv2d, ScaledStdConv2d, StdConv2dSame)
_BATCH_NORMS = (nn.BatchNorm2d, nn.SyncBatchNorm, FrozenBatchNorm2d, FrozenBatchNormAct2d)
_GROUP_NORMS = (nn.GroupNorm,)
_WITH_ACT = (BatchNormAct2d, SyncBatchNormAct, FrozenBatchNormAct2d, GroupNormAct)
_ZOO_NORMS = {BatchChannelNorm2d: 'bcn', BatchGroupNorm2d: 'bgn'}

GroupsArg = Union[int, Callable[[int], int]]


class ConversionError(TypeError, ValueError):
    """The model holds a layer :func:`convert_model` cannot convert faithfully (names listed)."""


class NormAct2d(nn.Module):
    """A converted timm norm+act layer: the new ``norm``, then the source's ``drop`` and ``act``."""

    def __init__(self, norm: nn.Module, drop: nn.Module, act: nn.Module):
        super().__init__()
        self.norm = norm
        self.drop = drop
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.drop(self.norm(x)))


def divisor_groups(max_groups: int = 32) -> Callable[[int], int]:
    """``fn(channels)``: the largest group count <= ``max_groups`` that divides ``channels``.

    For networks with channel counts such as 24 or 40 (EfficientNet, RegNet), where 32 groups
    do not fit; GN's paper found 8-32 groups about equally good.
    """
    def groups(channels: int) -> int:
        return max(g for g in range(1, min(max_groups, channels) + 1) if channels % g == 0)
    groups.__qualname__ = f'divisor_groups({max_groups})'
    return groups


def _resolve_variant(variant: Union[str, NormVariant]) -> NormVariant:
    if isinstance(variant, NormVariant):
        return variant
    if variant not in NORM_VARIANTS:
        raise ValueError(f'Unknown variant {variant!r}; choose one of {sorted(NORM_VARIANTS)}.')
    return NORM_VARIANTS[variant]


def _excluded(name: str, exclude: Iterable[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in exclude)


def _walk(module: nn.Module, exclude, prefix: str = ''):
    """(parent, attribute, qualified name, child) for every module not excluded, parents first.

    The inside of a zoo norm (BCN's batch stage is a BatchNorm2d) is no separate layer.
    """
    for attr, child in module.named_children():
        name = f'{prefix}{attr}'
        if _excluded(name, exclude):
            continue
        yield module, attr, name, child
        if not isinstance(child, tuple(_ZOO_NORMS)):
            yield from _walk(child, exclude, name + '.')


def _num_channels(norm: nn.Module) -> int:
    return norm.num_channels if isinstance(norm, nn.GroupNorm) else norm.weight.shape[0] if norm.weight is not None \
        else norm.running_mean.shape[0]


def _source_tensors(norm: nn.Module):
    """Device and dtype of the source norm (a buffer when it has no affine)."""
    ref = next(iter(norm.parameters()), None)
    if ref is None:
        ref = next(iter(norm.buffers()), None)
    return (ref.device, ref.dtype) if ref is not None else (None, None)


def _has_running_stats(norm: nn.Module) -> bool:
    return isinstance(norm, _BATCH_NORMS) and getattr(norm, 'running_mean', None) is not None


def _trained_count(norm: nn.Module, target_momentum: float) -> torch.Tensor:
    """Batch counter to give carried statistics: the source's, at least enough to skip a warm-up."""
    seen = int(norm.num_batches_tracked) if getattr(norm, 'num_batches_tracked', None) is not None else 0
    return torch.tensor(max(seen, math.ceil(1. / target_momentum)), dtype=torch.long)


@torch.no_grad()
def _copy_affine(src: nn.Module, dst_weight, dst_bias) -> None:
    for s, d in ((getattr(src, 'weight', None), dst_weight), (getattr(src, 'bias', None), dst_bias)):
        if s is not None and d is not None:
            d.copy_(s)
            if isinstance(s, nn.Parameter):
                d.requires_grad_(s.requires_grad)


@torch.no_grad()
def _carry_batch_stats(src: nn.Module, dst: nn.Module) -> None:
    """Per-channel running statistics into a BN-like ``dst`` (BatchNorm2d or EstimatedBatchNorm2d)."""
    dst.running_mean.copy_(src.running_mean)
    dst.running_var.copy_(src.running_var)
    momentum = dst.momentum if isinstance(dst, EstimatedBatchNorm2d) else 1.
    dst.num_batches_tracked.copy_(_trained_count(src, momentum or 1.))


@torch.no_grad()
def _carry_group_stats(src: nn.Module, dst: BatchGroupNorm2d) -> None:
    """Per-group statistics pooled from per-channel ones: mean of means; mean var + var of means."""
    mean = src.running_mean.float().view(dst.num_groups, -1)
    var = src.running_var.float().view(dst.num_groups, -1)
    dst.running_mean.copy_(mean.mean(1))
    dst.running_var.copy_(var.mean(1) + mean.var(1, unbiased=False))
    dst.num_batches_tracked.copy_(_trained_count(src, 1.))


def _new_norm(src: nn.Module, norm: str, groups: int, norm_kwargs: Dict[str, Any], carry_stats: bool) -> nn.Module:
    channels = _num_channels(src)
    device, dtype = _source_tensors(src)
    kwargs = dict(dict(eps=src.eps), **norm_kwargs)
    new = make_norm_layer(norm, groups, kwargs)(channels, device=device, dtype=dtype)
    carry_stats = carry_stats and _has_running_stats(src)
    if isinstance(new, BatchChannelNorm2d):  # the source's affine and statistics are its batch stage's
        _copy_affine(src, new.bn.weight, new.bn.bias)
        if carry_stats:
            _carry_batch_stats(src, new.bn)
    else:
        _copy_affine(src, new.weight, new.bias)
        if carry_stats and isinstance(new, nn.BatchNorm2d) and new.running_mean is not None:
            _carry_batch_stats(src, new)
        elif carry_stats and isinstance(new, BatchGroupNorm2d) and new.running_mean is not None:
            _carry_group_stats(src, new)
    new.train(src.training)
    if isinstance(src, _WITH_ACT):
        new = NormAct2d(new, src.drop, src.act)
        new.train(src.training)
    return new


def _unsupported(child: nn.Module, norm: str) -> Optional[str]:
    """Why ``child`` cannot be converted to the ``norm`` variant, or None when it can (or needs nothing)."""
    zoo_norm = next((n for cls, n in _ZOO_NORMS.items() if isinstance(child, cls)), None)
    if zoo_norm is not None and zoo_norm != norm:
        return f'{type(child).__name__} (a zoo norm already; build the zoo model in the variant you want)'
    if isinstance(child, nn.Conv2d) and not isinstance(child, _STANDARDIZED_CONVS) and type(child) is not nn.Conv2d:
        return f'{type(child).__name__} (an nn.Conv2d subclass with its own forward)'
    if isinstance(child, _NormBase) and not isinstance(child, _BATCH_NORMS):
        return f'{type(child).__name__} (only 2-D batch norms and group norms are converted)'
    return None


def convert_model(
        model: nn.Module,
        variant: Union[str, NormVariant] = 'wsgn',
        norm_groups: GroupsArg = 32,
        ws_formula: Union[str, WSFormula] = DEFAULT_WS_FORMULA,
        norm_kwargs: Optional[Dict[str, Any]] = None,
        running_stats: Union[bool, str] = 'auto',
        exclude: Iterable[str] = (),
) -> nn.Module:
    """Convert ``model``'s convs and norms to a zoo variant, in place; returns ``model``.

    Args:
        model: any network; a conv or norm itself is converted too (use the returned module).
        variant: a key of ``zoo.models.NORM_VARIANTS``: ``'wsbcn'``, ``'wsgn'``, ``'wsbgn'``,
            ``'wsbn'`` (WS convs) or ``'bcn'``, ``'gn'``, ``'bgn'`` (convs unchanged).
        norm_groups: groups of GN / BCN's channel stage / BGN: an int, or ``fn(channels) -> groups``
            such as :func:`divisor_groups`.
        ws_formula: WS formula of the new convs (see :mod:`zoo.layers.weight_standardization`).
        norm_kwargs: extra kwargs of the new norms, e.g. ``dict(batch_stage='batch')`` for BCN.
        running_stats: carry BN running statistics over (``True``), drop them (``False``), or
            ``'auto'``: carry them when no conv changes (see the module docstring).
        exclude: fnmatch patterns of qualified module names to leave as they are (with their children).

    Raises:
        ConversionError: a layer the function cannot convert faithfully, or channels that do not
            split into ``norm_groups`` groups; the message names every such module.
    """
    v = _resolve_variant(variant)
    if running_stats not in (True, False, 'auto'):
        raise ValueError(f"running_stats must be True, False or 'auto', got {running_stats!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    norm_kwargs = dict(norm_kwargs or {})
    groups_for = norm_groups if callable(norm_groups) else (lambda channels: norm_groups)
    root = nn.Sequential()
    root.add_module('model', model)  # a parent for the model itself, so that it can be replaced too
    nodes = [(root, 'model', '(model)', model)] + list(_walk(model, exclude))

    problems = [f'{name}: {why}' for _, _, name, child in nodes if (why := _unsupported(child, v.norm))]
    norms = [(p, a, n, c) for p, a, n, c in nodes if isinstance(c, _BATCH_NORMS + _GROUP_NORMS)]
    if v.norm != 'bn':
        problems += [f'{n}: {_num_channels(c)} channels do not split into {groups_for(_num_channels(c))} groups'
                     for _, _, n, c in norms if _num_channels(c) % groups_for(_num_channels(c))]
    if problems:
        hint = ('Pass norm_groups=zoo.convert.divisor_groups(32) (or your own fn(channels) -> groups) for the '
                'channel counts, and exclude=[...] for modules to keep as they are')
        raise ConversionError(f'convert_model({type(model).__name__}, {variant!r}) cannot convert:\n  '
                              + '\n  '.join(problems) + f'\n{hint}')

    convs = [(p, a, c) for p, a, _, c in nodes if type(c) is nn.Conv2d] if v.ws else []
    carry = (not convs) if running_stats == 'auto' else bool(running_stats)
    for parent, attr, child in convs:
        ws = WSConv2d.from_conv(child, ws_formula)
        ws.train(child.training)
        setattr(parent, attr, ws)
    for parent, attr, name, child in norms:
        if v.norm == 'bn' and type(child) in (nn.BatchNorm2d, BatchNormAct2d):
            continue  # already the variant's norm: left as it is
        setattr(parent, attr, _new_norm(child, v.norm, groups_for(_num_channels(child)), norm_kwargs, carry))
    return root.model
