"""Batch Group Normalization (Zhou et al., arXiv:2012.02782).

Each sample's (C, H, W) activations are flattened and split into ``num_groups`` groups; mean
and variance are taken over the batch *and* each group's C*H*W/G elements, so even one image
gives thousands of elements per statistic. A per-channel affine follows.

Inference (the paper leaves it open; the zoo's choice): like BN, training updates running
statistics per group (momentum ``momentum``, unbiased variance) and eval normalizes with them,
so an image's prediction never depends on the other images in its batch and batch-1 inference
is deterministic. Set ``track_running_stats=False`` to use batch statistics in eval too.
A running-statistics update that is not finite (NaN or inf in the batch) is skipped, counted in
``num_skipped_updates`` and warned about (:mod:`zoo.layers.nonfinite_stats`), so eval outputs
stay finite. The training output of that batch is NaN regardless: its batch statistics are.

``num_groups`` must divide ``num_channels``: groups are then whole channels (the flattened
split coincides with a channel split), so a group means the same thing at every resolution.

Groups for micro-batches: use GN's group counts, not few groups. The BGN paper picks few groups
for small batches (a third-party implementation uses G = 1), but on CIFAR-10 at 2 images per
device (ResNet-20, 15 epochs, seed 0; README table) fewer groups were worse at every step: G = 8
78.47%, G = 2 76.80%, G = 1 75.69%. With fewer groups one statistic pools more channels' means
and scales, as in LayerNorm (G = 1) against GroupNorm. So the defaults (32 here, 8 in the CIFAR
ResNets) are also the zoo's micro-batch recommendation; at 1-2 images per device, WS+BCN
(84.4-84.8% there, four seeds) is the better choice than BGN at any of these G.

FX and TorchScript: under any FX tracer the layer is one ``call_module`` node (:mod:`zoo.layers.fx_leaf`),
so traced graphs update the running statistics as eager does. Scripted, a skipped update is
counted but not warned about.
"""
from functools import partial
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .estimated_batch_norm import sample_channel_moments
from .fx_leaf import fx_leaf_call
from .memory_lean import lean_path_applies
from .moment_affine import MomentAffine
from .nonfinite_stats import keep_finite_update, load_skip_counter, register_skip_counter

__all__ = ['BatchGroupNorm2d']


def _group_moments(mean: torch.Tensor, var: torch.Tensor, num_groups: int):
    """(1, G, 1) mean and biased variance over (batch, group) from per-(sample, channel) moments."""
    n = mean.shape[0]
    grouped_mean, grouped_var = mean.view(n, num_groups, -1), var.view(n, num_groups, -1)
    group_mean = grouped_mean.mean((0, 2), keepdim=True)
    return group_mean, (grouped_var + (grouped_mean - group_mean).square()).mean((0, 2), keepdim=True)


def _bgn_coefficients(mean, var, weight, bias, num_groups: int, eps: float):
    """:class:`MomentAffine` coefficients of BGN: the group statistics' normalization, then the per-channel affine."""
    n, c = mean.shape
    group_mean, group_var = _group_moments(mean, var, num_groups)
    big_a = weight.view(1, num_groups, -1) * torch.rsqrt(group_var + eps)
    big_b = bias.view(1, num_groups, -1) - group_mean * big_a
    return big_a.expand(n, -1, -1).reshape(n, c), big_b.expand(n, -1, -1).reshape(n, c)


@register_notrace_module  # FX (timm, torchvision feature extraction): run as one module
class BatchGroupNorm2d(nn.Module):
    """Normalize over (batch, group of C*H*W/G); per-channel affine; running stats for eval."""

    def __init__(
            self,
            num_channels: int,
            num_groups: int = 32,
            eps: float = 1e-5,
            momentum: float = 0.1,
            track_running_stats: bool = True,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f'BatchGroupNorm2d: {num_channels} channels are not divisible into {num_groups} groups')
        dd = {'device': device, 'dtype': dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.momentum = momentum
        self.track_running_stats = track_running_stats
        self.weight = nn.Parameter(torch.ones(num_channels, **dd))
        self.bias = nn.Parameter(torch.zeros(num_channels, **dd))
        if track_running_stats:
            self.register_buffer('running_mean', torch.zeros(num_groups, device=device))
            self.register_buffer('running_var', torch.ones(num_groups, device=device))
            self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
            register_skip_counter(self, device)
        else:
            self.running_mean = self.running_var = self.num_batches_tracked = None

    def extra_repr(self) -> str:
        return (f'{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, momentum={self.momentum}, '
                f'track_running_stats={self.track_running_stats}')

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        load_skip_counter(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            traced = fx_leaf_call(self, x)
            if traced is not None:
                return traced
        if x.ndim != 4:
            raise ValueError(f'BatchGroupNorm2d expects a 4-D (N, C, H, W) input, got shape {list(x.shape)}')
        if x.shape[0] == 0:  # no samples (a detector head without regions): no statistics, nothing to update
            return x + (self.weight.sum() + self.bias.sum()) * 0.
        running_mean, running_var = self.running_mean, self.running_var
        if not self.training and running_mean is not None and running_var is not None:
            # Inference: running statistics make the layer one per-channel affine (a single pass).
            # batch_norm's eval kernel with zero mean, unit variance and eps 0 is x * scale + shift.
            scale, shift = self.affine_coefficients()
            if x.dtype != scale.dtype:  # e.g. bf16 activations, float32 parameters: float32 out, as before
                return (x * scale.view(1, -1, 1, 1)).add_(shift.view(1, -1, 1, 1))
            zeros, ones = scale.new_zeros(self.num_channels), scale.new_ones(self.num_channels)
            return F.batch_norm(x, zeros, ones, scale, shift, False, 0., 0.)
        if not torch.jit.is_scripting():
            if self.training and lean_path_applies(x):
                return self._lean_forward(x)
        # Groups become the "channels" of batch_norm, which then reduces over batch and group elements.
        grouped = x.reshape(x.shape[0], self.num_groups, -1)
        # batch_norm updates copies (autograd may keep them for backward); the buffers take them if finite.
        mean: Optional[torch.Tensor] = None
        var: Optional[torch.Tensor] = None
        if self.training and running_mean is not None and running_var is not None:
            mean, var = running_mean.clone(), running_var.clone()
        y = F.batch_norm(grouped, mean, var, None, None, training=True, momentum=self.momentum, eps=self.eps)
        if mean is not None and var is not None:
            if torch.jit.is_scripting():
                self._keep_finite_scripted(mean, var)
            else:
                self._keep_finite_running_stats(mean, var)
        weight, bias = self.weight.view(1, -1, 1, 1), self.bias.view(1, -1, 1, 1)
        return (y.view_as(x) * weight).add_(bias)  # in-place add: one temporary less

    def _lean_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Training as one affine of ``x`` that keeps only ``x`` for backward (:class:`MomentAffine`); the
        batch-norm path also keeps its normalized output for the per-channel affine's gradient."""
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        mean, var = sample_channel_moments(x)
        if self.running_mean is not None:
            with torch.no_grad():
                group_mean, group_var = _group_moments(mean, var, self.num_groups)
                count = x.numel() // self.num_groups
                rate = self.momentum
                self._keep_finite_running_stats(
                    torch.lerp(self.running_mean, group_mean.view(-1).to(self.running_mean.dtype), rate),
                    torch.lerp(self.running_var, (group_var.view(-1) * (count / max(count - 1, 1))).to(
                        self.running_var.dtype), rate))
        coefficients = partial(_bgn_coefficients, num_groups=self.num_groups, eps=self.eps)
        out_dtype = torch.promote_types(x.dtype, self.weight.dtype)
        return MomentAffine.apply(x, mean, var, coefficients, out_dtype, self.weight.to(stat_dtype),
                                  self.bias.to(stat_dtype))

    @torch.no_grad()
    def _keep_finite_running_stats(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
        keep_finite_update(self, finite, ((self.running_mean, mean), (self.running_var, var)))
        self.num_batches_tracked.add_(finite.long())

    def _keep_finite_scripted(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        """:meth:`_keep_finite_running_stats` in TorchScript (a skip is counted, not warned about)."""
        with torch.no_grad():
            finite = torch.isfinite(mean).all() & torch.isfinite(var).all()
            running_mean, running_var = self.running_mean, self.running_var
            if running_mean is not None and running_var is not None:
                running_mean.copy_(torch.where(finite, mean, running_mean))
                running_var.copy_(torch.where(finite, var, running_var))
                self.num_skipped_updates.add_((~finite).long())
                self.num_batches_tracked.add_(finite.long())

    def affine_coefficients(self):
        """``(scale, shift)`` per channel: the eval-mode layer is ``x * scale + shift``."""
        running_mean, running_var = self.running_mean, self.running_var  # locals: TorchScript refines them
        if running_mean is None or running_var is None:
            raise RuntimeError('BatchGroupNorm2d without running statistics is no fixed affine in eval')
        per_group = self.num_channels // self.num_groups
        rstd = torch.rsqrt(running_var + self.eps).repeat_interleave(per_group)
        scale = self.weight * rstd
        return scale, self.bias - running_mean.repeat_interleave(per_group) * scale
