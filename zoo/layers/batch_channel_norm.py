"""Batch-Channel Normalization (Qiao et al., arXiv:1903.10520): ``BCN(x) = CN(BN(x))``.

1. Batch stage, per channel with its own affine, in one of two modes:
   - ``'estimated'`` (default, for micro-batches): :class:`EstimatedBatchNorm2d`, running
     estimates normalize in training and eval, statistics reduced across processes.
   - ``'batch'`` (large batches): a plain ``nn.BatchNorm2d``, as in the authors' ImageNet code.
     Being a ``_BatchNorm``, it is converted by ``sync_batchnorm=True`` if you ask for that.
2. Channel stage: group normalization (``num_groups`` groups, per sample, no running
   statistics) followed by the authors' *group-wise* affine (one scale and shift per group).

Both modes have the same state-dict keys (``bn.weight``, ``bn.bias``, ``bn.running_mean``,
``bn.running_var``, ``bn.num_batches_tracked``, ``weight``, ``bias``), so a checkpoint trained in
one mode loads into the other; :func:`set_bcn_batch_stage` switches a built model.

Fast path: whenever the batch stage normalizes with fixed statistics (the estimated stage, in
training and eval, or a ``'batch'`` stage in eval), it is a per-channel affine ``a * x + b``, so the
whole layer is one affine per (sample, channel), ``y = A * x + B``, whose coefficients come from
the per-(sample, channel) mean and variance of ``x`` (law of total variance for the groups). One
read of ``x`` gives those moments (and the estimates' update), one pass writes ``y``; backward
(:class:`_FusedBCN`) needs two reductions and one pass, and saves only ``x``. A ``'batch'`` stage in
training is one :class:`MomentAffine` (memory-lean path). The plain two stages run when the batch
stage has hooks, and with autograd on when the memory-lean path is off (the fused functions support
one backward; the two stages support double backward).

Eval folding: in a zoo model in eval with autograd off, the WS conv before this layer applies the
batch-stage affine itself (:mod:`zoo.layers.eval_folding`) and this layer runs only its channel
stage, one ``group_norm``: as fast as GN, with the outputs of the unfolded layer.

FX and TorchScript: under any FX tracer the layer is one ``call_module`` node (:mod:`zoo.layers.fx_leaf`),
which runs this forward, fast paths included. Scripted, it runs the plain two stages.
"""
import math
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import register_notrace_module
from torch.nn.modules.batchnorm import _BatchNorm

from .estimated_batch_norm import EstimatedBatchNorm2d, sample_channel_moments
from .eval_folding import take_folded, tensors_state
from .fx_leaf import fx_leaf_call
from .memory_lean import is_exporting, lean_path_applies, memory_lean_enabled
from .moment_affine import MomentAffine, affine_per_sample_channel, per_sample_channel_sums

__all__ = ['BatchChannelNorm2d', 'BCN_BATCH_STAGES', 'running_stats_affine', 'set_bcn_batch_stage']

BCN_BATCH_STAGES = ('estimated', 'batch')


def _make_batch_stage(mode: str, num_channels: int, eps: float, momentum, dd) -> nn.Module:
    if mode == 'estimated':
        return EstimatedBatchNorm2d(num_channels, eps=eps, momentum=0.01 if momentum is None else momentum, **dd)
    if mode == 'batch':
        return nn.BatchNorm2d(num_channels, eps=eps, momentum=0.1 if momentum is None else momentum, **dd)
    raise ValueError(f'Unknown BCN batch stage {mode!r}; choose one of {BCN_BATCH_STAGES}.')


def running_stats_affine(bn: _BatchNorm):
    """``(scale, shift)`` per channel: a BatchNorm with running statistics as ``x * scale + shift`` (its eval form)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    return scale, (shift + bn.bias if bn.bias is not None else shift)


@register_notrace_module  # FX (timm, torchvision feature extraction): run as one module
class BatchChannelNorm2d(nn.Module):
    """Batch stage (estimated or batch statistics) followed by a group norm with group-wise affine.

    Args:
        num_channels: channels C; must be divisible by ``num_groups``.
        num_groups: groups of the channel stage (32 in the paper).
        eps: epsilon of both stages.
        batch_stage: ``'estimated'`` (micro-batches) or ``'batch'`` (large batches).
        momentum: update rate of the batch stage's running statistics; ``None`` picks 0.01 for
            ``'estimated'`` (see :class:`EstimatedBatchNorm2d`) and 0.1 for ``'batch'``.
    """

    def __init__(
            self,
            num_channels: int,
            num_groups: int = 32,
            eps: float = 1e-5,
            batch_stage: str = 'estimated',
            momentum=None,
            device=None,
            dtype=None,
    ):
        super().__init__()
        if num_channels % num_groups:
            raise ValueError(f'BatchChannelNorm2d: {num_channels} channels are not divisible into {num_groups} groups')
        dd = {'device': device, 'dtype': dtype}
        self.num_channels = num_channels
        self.num_groups = num_groups
        self.eps = eps
        self.batch_stage = batch_stage
        self.bn = _make_batch_stage(batch_stage, num_channels, eps, momentum, dd)
        self.weight = nn.Parameter(torch.ones(num_groups, **dd))
        self.bias = nn.Parameter(torch.zeros(num_groups, **dd))

    def extra_repr(self) -> str:
        return f'{self.num_channels}, num_groups={self.num_groups}, eps={self.eps}, batch_stage={self.batch_stage!r}'

    def _fixed_stage(self) -> bool:
        """Whether the batch stage is a fixed per-channel affine now (estimates, or running stats in eval)."""
        bn = self._modules['bn']  # not self.bn: Module.__getattr__ is slow, and this runs per layer and call
        if bn._forward_hooks or bn._forward_pre_hooks:
            return False  # the user observes the batch stage: run it as a module
        if is_exporting():
            return False  # torch.export: standard ops (batch_norm, group_norm) that every backend and ONNX know
        if isinstance(bn, EstimatedBatchNorm2d):
            return True
        return isinstance(bn, _BatchNorm) and not bn.training and bn._buffers.get('running_mean') is not None

    def fixed_in_eval(self) -> bool:
        """Whether the batch stage is a fixed per-channel affine in eval (so it can be folded)."""
        return not self._modules['bn'].training and self._fixed_stage()

    def eval_fold_tensors(self):
        """The tensors that eval folding derives this layer's folded values from (their cache key):
        the batch stage's parameters and statistics, then the channel stage's parameters."""
        bn = self._modules['bn']
        params, buffers = bn._parameters, bn._buffers
        return (params['weight'], params['bias'], buffers['running_mean'], buffers['running_var'],
                self._parameters['weight'], self._parameters['bias'])

    def batch_stage_affine(self):
        """``(scale, shift)`` per channel: the batch stage as ``x * scale + shift`` when it is fixed."""
        bn = self.bn
        return bn.affine_coefficients() if isinstance(bn, EstimatedBatchNorm2d) else running_stats_affine(bn)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.jit.is_scripting():  # the two stages: no fused kernel, folding or caches (Python state)
            return F.group_norm(self.bn(x), self.num_groups, *self.channel_affine(), self.eps)
        traced = fx_leaf_call(self, x)
        if traced is not None:
            return traced
        channel_affine = take_folded(self, x)
        if channel_affine is not None:  # the conv before applied the batch stage (eval folding)
            return self._channel_stage(x, channel_affine)
        if x.ndim == 4 and x.shape[0] == 0:
            return self._empty_forward(x)
        if x.ndim != 4 or not self._fixed_stage() or (torch.is_grad_enabled() and not memory_lean_enabled()):
            if self._lean_batch_stage_applies(x):
                return self._lean_batch_stage_forward(x)
            return self._two_stage_forward(x)
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        mean, var = sample_channel_moments(x)
        if self.bn.training:  # estimated stage: the same moments update the estimates (no second pass)
            self.bn.update_from_moments(mean, var, x.shape[2] * x.shape[3])
        a, b = self.batch_stage_affine()
        # Output dtype as the two-stage path gives it: CUDA autocast runs group_norm in float32.
        out_dtype = torch.float32 if x.device.type == 'cuda' and torch.is_autocast_enabled('cuda') else x.dtype
        args = (x, mean, var, a.to(stat_dtype), b.to(stat_dtype), self.weight.to(stat_dtype), self.bias.to(stat_dtype),
                self.num_groups, self.eps, out_dtype)
        return _FusedBCN.apply(*args) if torch.is_grad_enabled() else _FusedBCN.inference(*args)

    def _lean_batch_stage_applies(self, x: torch.Tensor) -> bool:
        """Whether a ``'batch'`` stage in training can run as one :class:`MomentAffine` (memory-lean path)."""
        bn = self._modules['bn']
        return (type(bn) is nn.BatchNorm2d and bn.training and bn.affine and bn.running_mean is not None
                and not bn._forward_hooks and not bn._forward_pre_hooks and lean_path_applies(x)
                and x.ndim == 4 and x.shape[0] * x.shape[2] * x.shape[3] > 1)

    def _lean_batch_stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        """Both stages, batch statistics included, as one affine of ``x`` that keeps only ``x`` for backward
        (the two-stage path also keeps the batch stage's output); running statistics as ``nn.BatchNorm2d``."""
        bn = self.bn
        stat_dtype = torch.promote_types(x.dtype, torch.float32)
        mean, var = sample_channel_moments(x)
        with torch.no_grad():
            _update_running_stats(bn, mean, var, x.shape[2] * x.shape[3])
        out_dtype = torch.float32 if x.device.type == 'cuda' and torch.is_autocast_enabled('cuda') else x.dtype
        coefficients = partial(_bcn_batch_coefficients, num_groups=self.num_groups, eps=self.eps)
        params = (bn.weight, bn.bias, self.weight, self.bias)
        return MomentAffine.apply(x, mean, var, coefficients, out_dtype, *(p.to(stat_dtype) for p in params))

    def _empty_forward(self, x: torch.Tensor) -> torch.Tensor:
        """No samples (e.g. a detector's mask head for an image without detections): nothing to normalize.

        An estimated stage in training still takes part in its statistics' all-reduce (other
        processes may have samples; the update itself skips an empty batch), and the output
        depends on every parameter, with zero gradients, so DDP finds them all used.
        """
        if self.bn.training and isinstance(self.bn, EstimatedBatchNorm2d):
            self.bn.update_estimates(x)
        return x + sum(p.sum() for p in self.parameters()) * 0.

    def _two_stage_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._channel_stage(self.bn(x))

    def _channel_stage(self, x: torch.Tensor, channel_affine=None) -> torch.Tensor:
        weight, bias = channel_affine or self._channel_affine()
        return F.group_norm(x, self.num_groups, weight, bias, self.eps)

    def channel_affine(self):
        """The group-wise affine spread to channels, so that one fused ``group_norm`` does the channel stage."""
        per_group = self.num_channels // self.num_groups
        return self.weight.repeat_interleave(per_group), self.bias.repeat_interleave(per_group)

    def _channel_affine(self):
        """:meth:`channel_affine`, kept between eval calls without autograd (they run per layer and call)."""
        if self.training or torch.is_grad_enabled() or torch.compiler.is_compiling():
            return self.channel_affine()
        weight, bias = self._parameters['weight'], self._parameters['bias']
        key = tensors_state(weight, bias) + (torch.is_inference_mode_enabled(),)
        cache = self.__dict__.get('_channel_affine_cache')
        if cache is None or cache[0] != key:
            cache = (key, *self.channel_affine())
            self.__dict__['_channel_affine_cache'] = cache
        return cache[1], cache[2]


def _bcn_coefficients(mean, var, a, b, gw, gb, num_groups, eps):
    """Per-(sample, channel) ``A, B`` of ``GN(a * x + b)`` with group-wise affine ``gw, gb``.

    ``mean, var``: (N, C) moments of ``x`` over (H, W); ``a, b``: (C,) batch-stage affine.
    Also returns the group mean ``mu`` and inverse std ``rstd`` of ``a * x + b``, (N, G, 1).
    Few ops on purpose: each costs a kernel launch per layer.
    """
    n, c = mean.shape
    a_g, b_g = a.view(1, num_groups, -1), b.view(1, num_groups, -1)
    z_mean = torch.addcmul(b_g, mean.view(n, num_groups, -1), a_g)   # channel means of z = a * x + b
    mu = z_mean.mean(2, keepdim=True)
    # Group variance = mean within-channel variance + variance of the channel means (no cancellation).
    dev = z_mean - mu
    z_var = torch.addcmul(var.view(n, num_groups, -1) * a_g.square(), dev, dev).mean(2, keepdim=True)
    rstd = z_var.add_(eps).rsqrt_()
    scale = rstd * gw.view(1, -1, 1)
    big_a = (a_g * scale).view(n, c)
    big_b = torch.addcmul(gb.view(1, -1, 1), b_g - mu, scale).view(n, c)
    return big_a, big_b, mu, rstd


def _batch_moments(mean: torch.Tensor, var: torch.Tensor):
    """Per-channel mean and biased variance over (N, H, W) from per-(sample, channel) moments."""
    batch_mean = mean.mean(0)
    return batch_mean, (var + (mean - batch_mean).square()).mean(0)


def _bcn_batch_coefficients(mean, var, bn_weight, bn_bias, gw, gb, num_groups: int, eps: float):
    """:class:`MomentAffine` coefficients of BCN with a ``'batch'`` stage: batch statistics, then the channel stage."""
    batch_mean, batch_var = _batch_moments(mean, var)
    a = bn_weight * torch.rsqrt(batch_var + eps)
    big_a, big_b, _, _ = _bcn_coefficients(mean, var, a, bn_bias - batch_mean * a, gw, gb, num_groups, eps)
    return big_a, big_b


def _update_running_stats(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, count: int) -> None:
    """``bn``'s running statistics updated as its training forward would, from per-(sample, channel) moments."""
    batch_mean, batch_var = _batch_moments(mean, var)
    n = mean.shape[0] * count
    bn.num_batches_tracked.add_(1)
    rate = 1. / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.lerp_(batch_mean.to(bn.running_mean.dtype), rate)
    bn.running_var.lerp_((batch_var * (n / (n - 1))).to(bn.running_var.dtype), rate)


class _FusedBCN(torch.autograd.Function):
    """``GN(a * x + b)`` with group-wise affine as one per-(sample, channel) affine of ``x``.

    ``a, b`` (the fixed-statistics batch stage) carry the gradients of its weight and bias. The
    backward is GN's, chained through ``a * x + b``, from the sums of ``dy`` and ``dy * x``.
    """

    @staticmethod
    def forward(ctx, x, mean, var, a, b, gw, gb, num_groups: int, eps: float, out_dtype: torch.dtype):
        big_a, big_b, mu, rstd = _bcn_coefficients(mean, var, a, b, gw, gb, num_groups, eps)
        ctx.save_for_backward(x, mean, var, a, b, gw, mu, rstd)
        ctx.num_groups = num_groups
        return affine_per_sample_channel(x, big_a.to(out_dtype), big_b.to(out_dtype))

    @staticmethod
    def inference(x, mean, var, a, b, gw, gb, num_groups: int, eps: float, out_dtype: torch.dtype):
        """The forward without the autograd.Function machinery, for use when autograd is off."""
        big_a, big_b, _, _ = _bcn_coefficients(mean, var, a, b, gw, gb, num_groups, eps)
        return affine_per_sample_channel(x, big_a.to(out_dtype), big_b.to(out_dtype))

    @staticmethod
    def backward(ctx, dy):
        if torch.is_grad_enabled() and not torch.compiler.is_compiling():
            raise RuntimeError('BCN\'s fused training path supports one backward; for double backward (e.g. a '
                               'gradient penalty) run the plain path: zoo.layers.memory_lean(False)')
        x, mean, var, a, b, gw, mu, rstd = ctx.saved_tensors
        g = ctx.num_groups
        n, c = mean.shape
        hw = x.shape[2] * x.shape[3]
        s_dy, s_dyx = per_sample_channel_sums(dy.to(mean.dtype), x.to(mean.dtype))   # (N, C)
        a_g, b_g = a.view(1, g, -1), b.view(1, g, -1)
        s_dy_g, s_dyx_g = s_dy.view(n, g, -1), s_dyx.view(n, g, -1)
        # sum(dy * zhat) per (n, c), zhat = (a * x + b - mu) * rstd
        s_dyz = rstd * (a_g * s_dyx_g + (b_g - mu) * s_dy_g)
        grad_gb = s_dy_g.sum((0, 2))
        grad_gw = s_dyz.sum((0, 2))
        m = hw * s_dy_g.shape[2]                               # elements per (sample, group)
        k1 = gw.view(1, -1, 1) * s_dy_g.sum(2, keepdim=True) / m      # mean of dzhat over the group
        k2 = gw.view(1, -1, 1) * s_dyz.sum(2, keepdim=True) / m       # mean of dzhat * zhat
        # dz = rstd * (gw * dy - k1 - zhat * k2) = c_dy * dy + c_x * x + c_0, per (n, c)
        c_dy = rstd * gw.view(1, -1, 1)
        c_x = -rstd.square() * k2 * a_g
        c_0 = -rstd * k1 - rstd.square() * k2 * (b_g - mu)
        # Parameter gradients of the batch stage: sums over (N, H, W) of dz and dz * x.
        mean_g, var_g = mean.view(n, g, -1), var.view(n, g, -1)
        s_dz = c_dy * s_dy_g + hw * (c_x * mean_g + c_0)
        # sum(dz * (x - mean)) uses the centred second moment: stable for large channel means.
        s_dz_xc = c_dy * (s_dyx_g - mean_g * s_dy_g) + c_x * hw * var_g
        grad_b = s_dz.sum(0).view(c)
        grad_a = (s_dz_xc + mean_g * s_dz).sum(0).view(c)
        grad_x = None
        if ctx.needs_input_grad[0]:  # dx = a * dz
            coef_dy, coef_x, coef_0 = ((t * a_g).reshape(n, c).to(dy.dtype) for t in (c_dy, c_x, c_0))
            grad_x = affine_per_sample_channel(x, coef_x, coef_0).addcmul_(dy, coef_dy[:, :, None, None])
        return grad_x, None, None, grad_a, grad_b, grad_gw, grad_gb, None, None, None


def set_bcn_batch_stage(model: nn.Module, batch_stage: str, momentum=None) -> nn.Module:
    """Switch every BCN layer of ``model`` to ``batch_stage``, keeping its learned state.

    For example, fine-tune at 2 images per device a model trained with large-batch BCN. Trained
    running statistics become the estimates and count as trained: the estimated stage's warm-up
    (rate ``1 / (t + 1)``) would replace them by the first batch's statistics, so a small update
    count (a release without the counter) is raised to where the rate is the momentum.
    """
    for m in model.modules():
        if isinstance(m, BatchChannelNorm2d) and m.batch_stage != batch_stage:
            old = m.bn
            ref = old.weight if old.weight is not None else old.running_mean
            new = _make_batch_stage(batch_stage, m.num_channels, m.eps, momentum, {'device': ref.device, 'dtype': ref.dtype})
            new.load_state_dict(old.state_dict())
            if isinstance(new, EstimatedBatchNorm2d):  # tensor ops only: works on 'meta' too
                trained = (old.num_batches_tracked > 0) | (old.running_mean != 0).any() | (old.running_var != 1).any()
                count = new.num_batches_tracked
                count.copy_(torch.where(trained, count.clamp(min=math.ceil(1. / new.momentum)), count))
            new.train(old.training)
            m.bn = new
            m.batch_stage = batch_stage
    return model
