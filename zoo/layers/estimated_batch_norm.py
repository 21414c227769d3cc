"""Estimated batch normalization: the batch stage of BCN for micro-batches.

With 1-2 images per device, batch statistics are too noisy to normalize with. Following the BCN
paper, this layer normalizes with running *estimates* of the mean and variance, in training and
in eval alike, and only updates the estimates (without gradient) from each training batch:

    mu_b  = mean of x over (N, H, W)
    var_b = mean of (x - mu_hat)^2 over (N, H, W)      # around the previous estimate
    mu_hat  <- (1 - r) mu_hat  + r mu_b
    var_hat <- (1 - r) var_hat + r var_b
    y = (x - mu_hat) / sqrt(var_hat + eps) * weight + bias

Update rate (the authors' code leaves it unset, so this is the zoo's documented choice): a
warm-up of cumulative averaging, ``r_t = max(1 / (t + 1), momentum)`` for the t-th update, then
the fixed ``momentum``. The first update (t = 0, r = 1) has no previous estimate to centre on, so
it takes the batch variance around the batch mean. Estimates are updated before they normalize
the batch that produced them.

An update whose statistics are not finite (a NaN or inf in the batch) is skipped, counted in the
non-persistent ``num_skipped_updates`` buffer and warned about (:mod:`zoo.layers.nonfinite_stats`),
so one bad sample cannot poison the estimates, and with them every later output.

FX and TorchScript: under any FX tracer the layer is one ``call_module`` node (:mod:`zoo.layers.fx_leaf`),
so traced graphs update the estimates as eager does. Scripted, training updates the estimates
from the exact (Welford) moments of this process's batch: no all-reduce, no warning of a skip.

Activation checkpointing (:mod:`zoo.layers.activation_checkpoint`): a checkpointed segment is run
again in backward, on the estimates its forward left; that run updates nothing and all-reduces nothing.

Under ``torch.distributed`` the per-channel sums are all-reduced inside the layer (one
all-reduce per update), so every process sees the statistics of the global batch and the
estimates stay identical on every rank; DDP's buffer broadcast then changes nothing. This class
deliberately does not subclass ``_BatchNorm``: ``SyncBatchNorm.convert_sync_batchnorm`` (and so
Lightning's ``sync_batchnorm=True``) would otherwise replace it by a plain SyncBatchNorm.
"""
from typing import Optional

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module

from .activation_checkpoint import recomputing
from .fx_leaf import fx_leaf_call
from .nonfinite_stats import keep_finite_update, load_skip_counter, register_skip_counter

__all__ = ['EstimatedBatchNorm2d', 'sample_channel_moments']


def _distributed_world(process_group) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def sample_channel_moments(x: torch.Tensor):
    """Mean and biased variance of ``x`` over (H, W) for each (sample, channel): two (N, C) tensors.

    Computed without autograd, in float32 at least: on CPU as two pure reductions, sum and sum
    of squares, about twice as fast as a kernel that also writes a normalized output; elsewhere by
    the native group-norm kernel with one channel per group (Welford moments). ``E[x^2] - mean^2``
    loses about ``mean^2 / var`` float epsilons, so the CPU path keeps its result only where every
    channel has ``mean^2 <= 10 var`` (then within ~1e-5 relative, as after WS convs, whose
    zero-mean weights give near-zero-mean outputs) and otherwise recomputes with the kernel
    (a compiled graph computes both and selects, so compiled and eager runs agree).
    """
    x = x.detach()
    stat_dtype = torch.promote_types(x.dtype, torch.float32)
    n, c, h, w = x.shape
    if x.device.type == 'cpu':
        mean = x.sum((2, 3), dtype=stat_dtype).div_(h * w)
        mean_sq = torch.linalg.vector_norm(x, dim=(2, 3), dtype=stat_dtype).square_().div_(h * w)
        var = torch.addcmul(mean_sq, mean, mean, value=-1.)
        inexact = (mean_sq > 11. * var).any()  # some channel has mean^2 > 10 var
        if torch.compiler.is_compiling():  # no data-dependent branch in a graph: select instead
            exact_mean, exact_var = _welford_moments(x.to(stat_dtype))
            return torch.where(inexact, exact_mean, mean), torch.where(inexact, exact_var, var.clamp_(min=0.))
        if not bool(inexact):
            return mean, var.clamp_(min=0.)
    return _welford_moments(x.to(stat_dtype))


def _welford_moments(x: torch.Tensor):
    n, c = x.shape[0], x.shape[1]  # indexed, not unpacked: TorchScript-compatible
    _, mean, rstd = torch.ops.aten.native_group_norm(x, None, None, n, c, x.shape[2] * x.shape[3], c, 0.)
    return mean, rstd.pow(-2)  # eps 0: rstd = var ** -0.5 (inf for a constant channel, giving var 0)


def _moment_sums(mean: torch.Tensor, var: torch.Tensor, count: int, running_mean: torch.Tensor) -> torch.Tensor:
    """Per channel, the sums of ``x - mu_hat`` and ``(x - mu_hat)^2``, then the element count: one
    tensor (one all-reduce), from per-row moments of ``count`` elements each (see ``update_from_moments``)."""
    c = running_mean.shape[0]
    mean, var = mean.reshape(-1, c), var.reshape(-1, c)
    shift = mean - running_mean.to(mean.dtype)
    total = torch.full((1,), shift.shape[0] * count, dtype=mean.dtype, device=mean.device)
    return torch.cat([shift.sum(0) * count, (var + shift.square()).sum(0) * count, total])


def _updated_estimates(stats: torch.Tensor, running_mean: torch.Tensor, running_var: torch.Tensor,
                       num_batches_tracked: torch.Tensor, momentum: float):
    """``(finite, apply, mean, var)``: the estimates after an update with :func:`_moment_sums`'s
    ``stats``, whether those were finite, and whether to keep the update (finite and not empty)."""
    c = running_mean.shape[0]
    n = stats[-1]
    shift = stats[:c] / n                       # mu_b - mu_hat
    var_around_prev = stats[c:2 * c] / n
    first = num_batches_tracked == 0
    var_b = torch.where(first, var_around_prev - shift.square(), var_around_prev).clamp_(min=0.)
    rate = (1. / (num_batches_tracked + 1).float()).clamp(min=momentum)
    # A NaN / inf anywhere in the (all-reduced, so on every rank the same) statistics skips the
    # whole update; an empty batch changes nothing either. Decided on device (see nonfinite_stats).
    finite = torch.isfinite(stats).all()
    apply = finite & (n > 0)
    return finite, apply, running_mean + rate * shift, running_var + rate * (var_b - running_var)


@register_notrace_module  # FX (timm, torchvision feature extraction): run as one module
class EstimatedBatchNorm2d(nn.Module):
    """Per-channel normalization with running estimates updated from each training batch."""

    def __init__(
            self,
            num_features: int,
            eps: float = 1e-5,
            momentum: float = 0.01,
            affine: bool = True,
            process_group: Optional[object] = None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if not 0. < momentum <= 1.:
            raise ValueError(f'momentum must be in (0, 1], got {momentum}')
        dd = {'device': device, 'dtype': dtype}
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.process_group = process_group
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **dd))
            self.bias = nn.Parameter(torch.zeros(num_features, **dd))
        else:
            self.register_parameter('weight', None)
            self.register_parameter('bias', None)
        self.register_buffer('running_mean', torch.zeros(num_features, device=device))
        self.register_buffer('running_var', torch.ones(num_features, device=device))
        self.register_buffer('num_batches_tracked', torch.tensor(0, dtype=torch.long, device=device))
        register_skip_counter(self, device)

    def extra_repr(self) -> str:
        return f'{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.weight is not None}'

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        load_skip_counter(self)

    @torch.no_grad()
    def update_estimates(self, x: torch.Tensor) -> None:
        """Fold the statistics of batch ``x`` (all processes together) into the estimates."""
        if recomputing():  # a checkpointed segment's second run: its forward updated them already
            return
        # One read of x: per-(sample, channel) moments, combined across samples below.
        mean, var = sample_channel_moments(x)
        self.update_from_moments(mean, var, x.shape[2] * x.shape[3])

    @torch.no_grad()
    def update_from_moments(self, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
        """Fold per-channel moments into the estimates, as :meth:`update_estimates` does for a batch.

        ``mean`` and ``var`` (biased) have shape ``(..., C)``: each row holds the moments of
        ``count`` elements per channel (e.g. one row per sample, ``count = H * W``), so a fused
        layer that already has per-sample moments (BCN) updates the estimates without another
        pass over the activations. Nothing happens (no update, no all-reduce) while a checkpointed
        segment is recomputed in backward.
        """
        if recomputing():
            return
        stats = _moment_sums(mean, var, count, self.running_mean)
        if _distributed_world(self.process_group):
            dist.all_reduce(stats, group=self.process_group)
        finite, apply, new_mean, new_var = _updated_estimates(
            stats, self.running_mean, self.running_var, self.num_batches_tracked, self.momentum)
        keep_finite_update(self, finite, ((self.running_mean, new_mean), (self.running_var, new_var)), apply)
        self.num_batches_tracked.add_(apply.long())

    def _update_estimates_scripted(self, x: torch.Tensor) -> None:
        """:meth:`update_estimates` in TorchScript: Welford moments, local batch, skips counted silently."""
        with torch.no_grad():
            x = x.detach()
            mean, var = _welford_moments(x.to(torch.promote_types(x.dtype, torch.float32)))
            stats = _moment_sums(mean, var, x.shape[2] * x.shape[3], self.running_mean)
            finite, apply, new_mean, new_var = _updated_estimates(
                stats, self.running_mean, self.running_var, self.num_batches_tracked, self.momentum)
            self.running_mean.copy_(torch.where(apply, new_mean, self.running_mean))
            self.running_var.copy_(torch.where(apply, new_var, self.running_var))
            self.num_skipped_updates.add_((~finite).long())
            self.num_batches_tracked.add_(apply.long())

    def affine_coefficients(self):
        """``(scale, shift)`` per channel: the layer is ``x * scale + shift`` with the current estimates.

        Lets a following channel stage (BCN) or an exporter fold this stage into one affine.
        """
        scale = torch.rsqrt(self.running_var + self.eps)
        if self.weight is not None:
            scale = scale * self.weight
        shift = -self.running_mean * scale
        if self.bias is not None:
            shift = shift + self.bias
        return scale, shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not torch.jit.is_scripting():
            traced = fx_leaf_call(self, x)
            if traced is not None:
                return traced
        if x.ndim != 4:
            raise ValueError(f'EstimatedBatchNorm2d expects a 4-D (N, C, H, W) input, got shape {list(x.shape)}')
        if self.training:
            if torch.jit.is_scripting():
                self._update_estimates_scripted(x)
            else:
                self.update_estimates(x)
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, training=False, momentum=0., eps=self.eps)
