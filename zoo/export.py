"""Deployment export: a zoo model as plain convolutions that give the same outputs in eval.

In eval mode every WS conv applies a fixed standardized weight, and every norm with fixed
statistics is a per-channel affine ``x * scale + shift``: BatchNorm (running statistics), BCN's
estimated batch stage (or its ``'batch'`` stage in eval) and BGN with running statistics. The
export writes the standardized weights into plain ``nn.Conv2d`` layers and folds those affines
into the conv that feeds them. What remains of BCN is its channel stage, a plain
``nn.GroupNorm`` (the group-wise affine spread to channels); GN stays GN.

For inference only: the folded weights are no longer standardized parameters, so fine-tuning
an exported model is not WS training (the WS authors' users report it breaks; see REFERENCE.md).
Keep the original model (or its checkpoint) for training; the export's parameters are frozen.
"""
import copy
from typing import Optional, Tuple

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

from .layers import (
    BatchChannelNorm2d, BatchGroupNorm2d, EstimatedBatchNorm2d, WSConv2d, conv_norm_pairs, running_stats_affine,
    standardize_weight)

__all__ = ['export_for_inference', 'plain_conv']

_HOOK_DICTS = ('_forward_pre_hooks', '_forward_pre_hooks_with_kwargs', '_forward_hooks',
               '_forward_hooks_with_kwargs', '_forward_hooks_always_called')


def _effective_weight(conv: nn.Conv2d) -> torch.Tensor:
    """The weight ``conv`` applies in eval (standardized for a WS conv), in float64 for folding."""
    w = conv.weight.detach().double()
    if isinstance(conv, WSConv2d):
        w = standardize_weight(w.contiguous(), conv.ws_formula)
    return w


def plain_conv(conv: nn.Conv2d, scale: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> nn.Conv2d:
    """A plain ``nn.Conv2d`` computing ``conv(x) * scale + shift`` (per output channel) in eval.

    The weight is ``conv``'s effective (standardized) weight; forward hooks of ``conv`` (e.g. a
    TSM temporal shift) are carried over.
    """
    w = _effective_weight(conv)
    b = conv.bias.detach().double() if conv.bias is not None else None
    if scale is not None:
        scale, shift = scale.detach().double(), shift.detach().double()
        w = w * scale.view(-1, 1, 1, 1)
        b = shift if b is None else b * scale + shift
    out = nn.Conv2d(
        conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
        dilation=conv.dilation, groups=conv.groups, bias=b is not None, padding_mode=conv.padding_mode,
        device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        out.weight.copy_(w)
        if b is not None:
            out.bias.copy_(b)
    for name in _HOOK_DICTS:
        if hasattr(conv, name):
            getattr(out, name).update(getattr(conv, name))
    return out.eval()


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks)


def _norm_affine(norm: nn.Module) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
    """``(scale, shift)`` of a norm that is a per-channel affine in eval, else ``None``."""
    if _has_hooks(norm):
        return None
    if isinstance(norm, (EstimatedBatchNorm2d, BatchGroupNorm2d)):
        if isinstance(norm, BatchGroupNorm2d) and not norm.track_running_stats:
            return None
        return norm.affine_coefficients()
    if isinstance(norm, _BatchNorm) and norm.track_running_stats and norm.running_mean is not None:
        return running_stats_affine(norm)
    if isinstance(norm, BatchChannelNorm2d):
        return _norm_affine(norm.bn)
    return None


def _after_fold(norm: nn.Module) -> nn.Module:
    """What replaces a norm whose per-channel affine went into the preceding conv."""
    if isinstance(norm, BatchChannelNorm2d):  # the channel stage stays: GN with per-channel affine
        gn = nn.GroupNorm(norm.num_groups, norm.num_channels, eps=norm.eps,
                          device=norm.weight.device, dtype=norm.weight.dtype)
        with torch.no_grad():
            weight, bias = norm.channel_affine()
            gn.weight.copy_(weight)
            gn.bias.copy_(bias)
        return gn
    return nn.Identity()


@torch.no_grad()
def export_for_inference(model: nn.Module, fold_norms: bool = True, inplace: bool = False) -> nn.Module:
    """A frozen eval-mode copy of ``model`` with plain convs that gives the same outputs in eval.

    Every :class:`~zoo.layers.WSConv2d` becomes an ``nn.Conv2d`` holding its standardized weight.
    With ``fold_norms``, a fixed-statistics norm (BatchNorm, BCN's batch stage, BGN with running
    statistics) right after a conv is folded into it; BCN keeps its channel stage as ``nn.GroupNorm``.

    Inference only: do not fine-tune the result (its weights are no longer standardized); fine-tune
    the original model. ``inplace=True`` converts ``model`` itself instead of a deep copy.
    """
    model = model if inplace else copy.deepcopy(model)
    model.eval()
    if fold_norms:
        for parent, conv_name, norm_name in list(conv_norm_pairs(model)):
            conv, norm = getattr(parent, conv_name, None), getattr(parent, norm_name, None)
            if not isinstance(conv, nn.Conv2d) or norm is None or getattr(norm, 'num_features', getattr(
                    norm, 'num_channels', None)) != conv.out_channels:
                continue
            affine = _norm_affine(norm)
            if affine is None:
                continue
            setattr(parent, conv_name, plain_conv(conv, *affine))
            setattr(parent, norm_name, _after_fold(norm))
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, WSConv2d):
                setattr(parent, name, plain_conv(child))
    return model.requires_grad_(False)
