"""``freeze_norms``: the same network with every normalization replaced by a fixed per-channel affine.

A benchmark baseline. WS+BCN's cost in time and memory is the cost of the normalization layers
plus everything else (convs, heads, sampling, optimizer); comparing against "the same architecture
with frozen affine norms" (torchvision's ``FrozenBatchNorm2d``: ``x * scale + shift`` per channel,
no statistics, no gradient, as torchvision's detectors use for BN) isolates what the
normalization itself costs. WS convs stay WS convs, so the WS cost is not part of the difference.

The fixed affine does not train a useful model. Without calibration it is the identity (times the
norm's own per-channel weight and bias), which lets activations of a from-scratch WS network grow
layer after layer (WS outputs are not normalized) until they overflow, and inf / NaN change the
work a detector does (its proposals vanish). ``calibrate`` runs the model once before freezing
and gives every frozen layer the statistics its norm saw on that input, so activations keep their
scale and the frozen network does the same work as the normalized one.
"""
from typing import Any, Callable, Dict, Optional

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm
from torchvision.ops import FrozenBatchNorm2d

from .batch_channel_norm import BatchChannelNorm2d
from .batch_group_norm import BatchGroupNorm2d
from .estimated_batch_norm import EstimatedBatchNorm2d

__all__ = ['FROZEN_NORM_TYPES', 'freeze_norms', 'is_norm']

# What freeze_norms replaces: torch's BatchNorm (any dimension is taken as 2d here: the zoo's
# convolutional models; timm's BatchNormAct2d is a subclass) and GroupNorm (timm's GroupNorm,
# GroupNormAct), and the zoo's norms. torchvision's FrozenBatchNorm2d is already frozen: kept.
FROZEN_NORM_TYPES = (_BatchNorm, nn.GroupNorm, BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d)


def is_norm(module: nn.Module) -> bool:
    """Whether ``freeze_norms`` replaces ``module``."""
    return isinstance(module, FROZEN_NORM_TYPES) and not isinstance(module, FrozenBatchNorm2d)


def _num_channels(norm: nn.Module) -> int:
    for attr in ('num_features', 'num_channels'):
        if isinstance(getattr(norm, attr, None), int):
            return getattr(norm, attr)
    raise TypeError(f'freeze_norms: cannot tell the channels of {type(norm).__name__}')


def _channel_affine(norm: nn.Module, channels: int):
    """The norm's own per-channel weight and bias (BCN: its group-wise affine spread to channels), or None."""
    if isinstance(norm, BatchChannelNorm2d):
        return tuple(t.detach() for t in norm.channel_affine())
    weight, bias = getattr(norm, 'weight', None), getattr(norm, 'bias', None)
    if isinstance(weight, torch.Tensor) and weight.shape == (channels,):
        bias = bias.detach() if isinstance(bias, torch.Tensor) and bias.shape == (channels,) else torch.zeros_like(weight)
        return weight.detach(), bias
    return None


class _Moments:
    """Per-channel sums of x and x^2 over every call (float64), from a forward pre-hook."""

    def __init__(self):
        self.count, self.sum, self.sumsq = 0, None, None

    def __call__(self, module, args):
        x = args[0]
        if not isinstance(x, torch.Tensor) or x.ndim < 2 or x.numel() == 0:
            return
        x = x.detach().transpose(0, 1).reshape(x.shape[1], -1).double()
        s, sq = x.sum(1), (x * x).sum(1)
        self.sum = s if self.sum is None else self.sum + s
        self.sumsq = sq if self.sumsq is None else self.sumsq + sq
        self.count += x.shape[1]

    def mean_var(self):
        if not self.count:
            return None
        mean = self.sum / self.count
        return mean, (self.sumsq / self.count - mean * mean).clamp_min(0)


def _targets(module: nn.Module, prefix: str = '') -> Dict[str, nn.Module]:
    """The outermost norms under ``module`` by qualified name (a BCN's inner batch stage is not one)."""
    found = {}
    for name, child in module.named_children():
        qualified = f'{prefix}{name}'
        if is_norm(child):
            found[qualified] = child
        else:
            found.update(_targets(child, qualified + '.'))
    return found


def freeze_norms(model: nn.Module, calibrate: Optional[Callable[[nn.Module], Any]] = None) -> nn.Module:
    """Replace every normalization layer of ``model`` in place by a ``FrozenBatchNorm2d``; returns ``model``.

    Replaced: ``nn.BatchNorm*`` and ``nn.GroupNorm`` (timm's norm-act variants keep their
    activation: ``Sequential(frozen, drop, act)``), the zoo's ``BatchChannelNorm2d``,
    ``BatchGroupNorm2d`` and ``EstimatedBatchNorm2d``. Kept: torchvision's ``FrozenBatchNorm2d``,
    WS convs and everything else. The frozen layers have no parameters (buffers only), so nothing
    of them trains.

    Args:
        calibrate: optional ``calibrate(model)``, run once under ``torch.no_grad()`` before the
            replacement (e.g. a training-mode forward on a real batch). Each frozen layer then
            normalizes with the per-channel mean and variance its norm's input had in that call,
            times the norm's own per-channel weight and bias. Without it: mean 0, variance 1.
    """
    targets = _targets(model)
    stats: Dict[str, _Moments] = {}
    if calibrate is not None:
        handles = []
        for name, norm in targets.items():
            stats[name] = _Moments()
            handles.append(norm.register_forward_pre_hook(stats[name]))
        try:
            with torch.no_grad():
                calibrate(model)
        finally:
            for h in handles:
                h.remove()
    for name, norm in targets.items():
        channels = _num_channels(norm)
        frozen = FrozenBatchNorm2d(channels, eps=float(getattr(norm, 'eps', 1e-5)))
        ref = next(iter(norm.parameters()), None)
        if ref is None:
            ref = next(iter(norm.buffers()), None)
        if ref is not None:
            frozen = frozen.to(device=ref.device, dtype=ref.dtype if ref.is_floating_point() else None)
        affine = _channel_affine(norm, channels)
        if affine is not None:
            frozen.weight.copy_(affine[0])
            frozen.bias.copy_(affine[1])
        moments = stats[name].mean_var() if name in stats else None
        if moments is not None:
            frozen.running_mean.copy_(moments[0])
            frozen.running_var.copy_(moments[1])
        replacement: nn.Module = frozen
        if isinstance(getattr(norm, 'act', None), nn.Module):  # timm BatchNormAct2d / GroupNormAct
            replacement = nn.Sequential(frozen, getattr(norm, 'drop', nn.Identity()), norm.act)
        parent_name, _, attr = name.rpartition('.')
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, replacement)
    return model
